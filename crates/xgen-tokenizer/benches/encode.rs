//! Encode throughput: xgen-tokenizer against tiktoken-rs's `CoreBPE` with the same ranks, same run.
//!
//! Corpus: every text of `tests/fixtures/tokenizer/encode.jsonl` (code, prose, licences, CJK and
//! other scripts, emoji, whitespace runs, special tokens), 1.5 MB. Prints MB/s (median of the
//! repetitions) and the ratio to tiktoken-rs, then the batch API's scaling over thread counts.
//!
//! `cargo bench -p xgen-tokenizer` (add `-- --reps N` for more repetitions).

use std::{hint::black_box, path::PathBuf, time::Instant};

#[path = "../tests/reference/mod.rs"]
mod reference;

use reference::reference;
use xgen_tokenizer::{Specials, Tokenizer};

fn main() {
    let reps =
        std::env::args().skip_while(|a| a != "--reps").nth(1).and_then(|n| n.parse().ok()).unwrap_or(7);
    let texts = corpus();
    let bytes: usize = texts.iter().map(String::len).sum();
    let t = Tokenizer::xgen();
    let r = reference(&t);
    println!("corpus: {} texts, {:.2} MB; median of {reps} repetitions", texts.len(), bytes as f64 / 1e6);

    let ours = mb_per_s(bytes, reps, || texts.iter().map(|s| t.encode(s).len()).sum());
    let theirs = mb_per_s(bytes, reps, || texts.iter().map(|s| r.encode_with_special_tokens(s).len()).sum());
    println!(
        "encode, 1 thread   xgen {ours:7.2} MB/s   tiktoken-rs {theirs:7.2} MB/s   ratio {:.2}x",
        ours / theirs
    );
    let ours = mb_per_s(bytes, reps, || texts.iter().map(|s| t.encode_ordinary(s).len()).sum());
    let theirs = mb_per_s(bytes, reps, || texts.iter().map(|s| r.encode_ordinary(s).len()).sum());
    println!(
        "ordinary, 1 thread xgen {ours:7.2} MB/s   tiktoken-rs {theirs:7.2} MB/s   ratio {:.2}x",
        ours / theirs
    );

    let max_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut base = 0.0;
    for threads in (0..).map(|i| 1 << i).take_while(|&n| n <= max_threads) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        let speed = pool.install(|| {
            mb_per_s(bytes, reps, || t.encode_batch(&texts, Specials::Recognize).iter().map(Vec::len).sum())
        });
        if threads == 1 {
            base = speed;
        }
        println!("encode_batch, {threads} thread(s): {speed:7.2} MB/s   scaling {:.2}x", speed / base);
    }
}

fn mb_per_s(bytes: usize, reps: usize, mut f: impl FnMut() -> usize) -> f64 {
    black_box(f());
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            black_box(f());
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    bytes as f64 / 1e6 / times[times.len() / 2]
}

fn corpus() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer/encode.jsonl");
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("fixture line is JSON");
            v["text"].as_str().expect("fixture line has text").to_string()
        })
        .collect()
}
