//! `xgen bench`, like llama-bench: prompt processing (`-p`) and generation (`-n`, optionally after a
//! `-d`-token context) in tokens per second, repeated `-r` times; median, min and max. With
//! `--verify-rows K`, the cost of one K-row step (what a speculative verify pass runs: K new
//! tokens, logits for each) over a 1-row step, both measured in the same run.

use std::time::Instant;

use clap::Args;
use serde_json::json;
use xgen_model::{Model, Tensor};

use crate::model_args::{kv_type_name, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt-processing test: tokens in one prompt (0 = skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    pub prompt: usize,
    /// Generation test: tokens generated one at a time (0 = skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    pub generate: usize,
    /// Context already in the cache before the generation test.
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    pub depth: usize,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    pub reps: usize,
    /// Skip the memory-bandwidth measurement (a parallel read of 1 GiB) that gives generation's floor.
    #[arg(long)]
    pub no_bandwidth: bool,
    /// Also time one step of K rows (K new tokens with all their logits, after the -d context)
    /// against a step of 1 row: `"test": "verify K"` with `"cost_ratio"` (comma-separated Ks).
    #[arg(long, value_name = "K", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=256))]
    pub verify_rows: Vec<u16>,
    /// One JSON object per test.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let model = args.model.load()?.model;
    let context = model.config().max_position_embeddings;
    anyhow::ensure!(
        args.depth + args.generate <= context && args.prompt <= context,
        "tests exceed the context of {context}"
    );
    anyhow::ensure!(args.reps > 0, "-r must be at least 1");
    let mut tests = Vec::new();
    if args.prompt > 0 {
        let speeds = repeat(args.reps, || prompt_speed(&model, args.prompt))?;
        tests.push((format!("pp{}", args.prompt), speeds));
    }
    if args.generate > 0 {
        let name = if args.depth > 0 {
            format!("tg{}@d{}", args.generate, args.depth)
        } else {
            format!("tg{}", args.generate)
        };
        let speeds = repeat(args.reps, || generation_speed(&model, args.depth, args.generate))?;
        tests.push((name, speeds));
    }
    // Before the bandwidth pass, whose 1 GiB buffer is not the model's.
    let peak_rss = peak_rss_bytes();
    // Generation reads every weight once per token: bandwidth / bytes read per token is its floor
    // (the KV cache's reads, which grow with -d, are not counted).
    let bandwidth = (!args.no_bandwidth && args.generate > 0).then(read_bandwidth);
    // The f32 FMA peak of the same threads, for prompt speeds: FLOPs per token over it is theirs.
    let fma_peak = (args.prompt > 0).then(|| xgen_model::kernels::peak::f32_fma_flops(3));
    let kv_bytes_per_position = model.kv_block_bytes()? / xgen_model::KV_BLOCK;
    let (weights, kernel) = (model.weight_format_name(), model.prompt_kernel_name());
    let attention_kernel = model.attention_kernel_name();
    let kv_type = kv_type_name(model.kv_type());
    for (test, mut speeds) in tests {
        speeds.sort_by(f64::total_cmp);
        let (min, median, max) = (speeds[0], speeds[speeds.len() / 2], speeds[speeds.len() - 1]);
        // Bytes a generated token reads: every weight once, and the cached keys and values of
        // (on average) depth + n/2 positions.
        let kv_bytes = kv_bytes_per_position * (args.depth + args.generate.div_ceil(2));
        // A prompt token's products: 2 FLOPs per weight of the linear layers (attention's own,
        // which grow with the prompt, are not counted).
        let flops_per_token = 2.0 * model.linear_parameters() as f64;
        let bytes_per_token = model.weight_bytes_per_token() + kv_bytes;
        let floor = bandwidth.filter(|_| test.starts_with("tg")).map(|bw| bw / bytes_per_token as f64);
        if args.json {
            let mut obj = json!({
                "test": test, "dtype": weights, "threads": threads, "repetitions": args.reps,
                "tok_s_median": median, "tok_s_min": min, "tok_s_max": max,
                "weight_bytes": model.weight_bytes(), "peak_rss_bytes": peak_rss, "kv_type": kv_type,
                "kernel": kernel, "attention_kernel": attention_kernel,
            });
            if let (Some(peak), true) = (fma_peak, test.starts_with("pp")) {
                obj["f32_fma_peak_flops"] = json!(peak);
                obj["flops_per_token"] = json!(flops_per_token);
                obj["fraction_of_f32_peak"] = json!(median * flops_per_token / peak);
            }
            if let (Some(bw), Some(floor)) = (bandwidth, floor) {
                obj["read_bandwidth_bytes_s"] = json!(bw);
                obj["weight_bytes_per_token"] = json!(model.weight_bytes_per_token());
                obj["kv_bytes_per_token"] = json!(kv_bytes);
                obj["floor_tok_s"] = json!(floor);
                obj["fraction_of_floor"] = json!(median / floor);
            }
            println!("{obj}");
        } else {
            println!(
                "{test:>12}  {weights:>5}  t={threads}  {median:8.2} tok/s (min {min:.2}, max {max:.2})  weights {:.2} GB  peak RSS {:.2} GB  kernels {kernel}, attention {attention_kernel}",
                model.weight_bytes() as f64 / 1e9,
                peak_rss as f64 / 1e9
            );
            if let (Some(peak), true) = (fma_peak, test.starts_with("pp")) {
                println!(
                    "{:>12}  f32 FMA peak of these threads {:.0} GFLOP/s; {:.1} GFLOP per token -> {:.2}x of it",
                    "",
                    peak / 1e9,
                    flops_per_token / 1e9,
                    median * flops_per_token / peak
                );
            }
            if let (Some(bw), Some(floor)) = (bandwidth, floor) {
                println!(
                    "{:>12}  read bandwidth {:.1} GB/s, {:.2} GB per token ({kv_type} KV {:.2} GB) -> floor {floor:.2} tok/s; median is {:.0}% of it",
                    "",
                    bw / 1e9,
                    bytes_per_token as f64 / 1e9,
                    kv_bytes as f64 / 1e9,
                    100.0 * median / floor
                );
            }
        }
    }
    verify_costs(&model, args)
}

/// Bytes per second of a parallel read of 1 GiB (best of 3): generation's floor.
fn read_bandwidth() -> f64 {
    xgen_model::bandwidth::read_bytes_per_s(1 << 30, 1 << 18, 3)
}

/// Prints, per `--verify-rows` K, the median time of a K-row step and of a 1-row step at the same
/// depth and their ratio. The steps alternate (1 row, K rows) so drift hits both alike.
fn verify_costs(model: &Model, args: &BenchArgs) -> anyhow::Result<()> {
    let depth = args.depth.max(1);
    let weights = model.weight_format_name();
    for &k in &args.verify_rows {
        let k = usize::from(k);
        anyhow::ensure!(
            depth + k <= model.config().max_position_embeddings,
            "verify {k} exceeds the context"
        );
        let mut cache = model.new_cache(1, depth + k)?;
        model.forward_last(&model.ids_tensor(&tokens(depth, model.config().vocab_size))?, &mut cache)?;
        let rows = model.ids_tensor(&tokens(k, model.config().vocab_size))?;
        let one = model.ids_tensor(&tokens(1, model.config().vocab_size))?;
        let mut step = |ids: &Tensor| -> anyhow::Result<f64> {
            let start = Instant::now();
            let hidden = model.forward_hidden(ids, &mut cache)?; // [1, rows, d]
            model.logits(&hidden)?; // [1, rows, v]: every row's logits, as verification needs
            let secs = start.elapsed().as_secs_f64();
            cache.truncate(depth);
            Ok(secs)
        };
        step(&rows)?; // warm-up
        let (mut t1, mut tk) = (Vec::new(), Vec::new());
        for _ in 0..args.reps {
            t1.push(step(&one)?);
            tk.push(step(&rows)?);
        }
        let (m1, mk) = (median(&mut t1), median(&mut tk));
        if args.json {
            let obj = json!({"test": format!("verify {k}"), "dtype": weights, "rows": k, "depth": depth,
                "repetitions": args.reps, "step_1_ms": m1 * 1e3, "step_k_ms": mk * 1e3, "cost_ratio": mk / m1});
            println!("{obj}");
        } else {
            println!(
                "{:>12}  {weights:>5}  1 row {:8.2} ms  {k} rows {:8.2} ms  cost ratio {:.2}",
                format!("verify {k}"),
                m1 * 1e3,
                mk * 1e3,
                mk / m1
            );
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn repeat(reps: usize, mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<Vec<f64>> {
    (0..reps).map(|_| f()).collect()
}

/// Deterministic token ids spread over the vocabulary.
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab.min(50000)) as u32).collect()
}

fn prompt_speed(model: &Model, n: usize) -> anyhow::Result<f64> {
    let ids = model.ids_tensor(&tokens(n, model.config().vocab_size))?;
    let mut cache = model.new_cache(1, n)?;
    let start = Instant::now();
    model.forward_last(&ids, &mut cache)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn generation_speed(model: &Model, depth: usize, n: usize) -> anyhow::Result<f64> {
    let mut cache = model.new_cache(1, depth + n + 1)?;
    let first = tokens(depth.max(1), model.config().vocab_size);
    let mut logits = model.forward_last(&model.ids_tensor(&first)?, &mut cache)?;
    let start = Instant::now();
    for _ in 0..n {
        let next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let ids = Tensor::new(next.as_slice(), model.device())?.unsqueeze(0)?;
        logits = model.forward_last(&ids, &mut cache)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// The process's peak resident set (`VmHWM`), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
