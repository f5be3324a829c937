//! Decode-step matrix × vector with block-quantized weights: xgen's packed kernels against candle's
//! `QMatMul` on the same GGUF blocks, and against a plain parallel read of as many bytes, same run, XGen-7B
//! shapes. Weights rotate over > 1 GB so they stream from memory as in a decode step. Prints GB/s of
//! weights read (each side's own bytes). Runs inside the rayon pool, as the engine does.
//!
//! `cargo bench -p xgen-model --bench quant` (env: ROWS activation rows, TOTAL_MB rotated
//! weights, ROUNDS alternations of the read and the kernel, SMALL=NxK for one shape, e.g.
//! 512x4096 with TOTAL_MB=1 to stay in cache)

use std::{hint::black_box, time::Instant};

use candle_core::{
    quantized::{QMatMul, QTensor},
    Device, Module, Tensor,
};
use xgen_model::{
    bandwidth,
    quant::{BlockFormat, PackedMatrix},
};

const SHAPES: [(usize, usize, &str); 3] =
    [(4096, 4096, "q/k/v/o"), (11008, 4096, "gate/up"), (4096, 11008, "down")];

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    rayon::ThreadPoolBuilder::new().build().unwrap().install(run);
}

fn run() {
    let dev = Device::Cpu;
    let (rows, total) = (env("ROWS", 1), env("TOTAL_MB", 1024));
    for format in [BlockFormat::Q8_0, BlockFormat::Q4_0] {
        // SMALL=NxK: one shape small enough to stay in cache (with TOTAL_MB=1).
        let small: Vec<(usize, usize, &str)> = std::env::var("SMALL")
            .ok()
            .and_then(|v| {
                v.split_once('x').and_then(|(n, k)| Some((n.parse().ok()?, k.parse().ok()?, "small")))
            })
            .into_iter()
            .collect();
        let shapes: &[(usize, usize, &str)] = if small.is_empty() { &SHAPES } else { &small };
        for &(n, k, name) in shapes {
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, format.ggml()).unwrap();
            let bytes = q.storage_size_in_bytes();
            let count = (total << 20) / bytes + 1;
            let packed: Vec<PackedMatrix> = (0..count)
                .map(|_| PackedMatrix::from_ggml(format, n, k, &q.data().unwrap()).unwrap())
                .collect();
            let x = Tensor::randn(0f32, 1., (1, rows, k), &dev).unwrap();
            // The same bytes read plainly, in as many chunks per matrix as the kernel's tasks,
            // alternated with the kernel's passes so both see the same moments of a shared host.
            let plain = vec![1u8; count * bytes];
            let chunk = bytes / (2 * rayon::current_num_threads());
            let (read, ours, of_read) = alternate(
                || bandwidth::read_once(&plain, chunk) / 1e9,
                || gb_per_s(&packed, bytes, |m| m.forward(&x).unwrap()),
            );
            drop(plain);
            drop(packed);
            let candle: Vec<QMatMul> = (0..count)
                .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, format.ggml()).unwrap()).unwrap())
                .collect();
            let theirs = median_of(5, || gb_per_s(&candle, bytes, |m| m.forward(&x).unwrap()));
            println!(
                "{format:?} {n}x{k} ({name}) rows {rows}: read {read:6.2}   xgen {ours:6.2} GB/s ({:3.0}% of read)   candle {theirs:6.2} GB/s   ratio {:.2}x",
                100.0 * of_read,
                ours / theirs
            );
        }
    }
}

/// `ROUNDS` (default 9) alternated passes of `read` and `kernel` (GB/s each): their medians and
/// the median of the per-round ratio kernel / read.
fn alternate(read: impl Fn() -> f64, kernel: impl Fn() -> f64) -> (f64, f64, f64) {
    kernel();
    let rounds: Vec<(f64, f64)> = (0..env("ROUNDS", 9).max(1)).map(|_| (read(), kernel())).collect();
    let median = |f: fn(&(f64, f64)) -> f64| median(rounds.iter().map(f).collect());
    (median(|r| r.0), median(|r| r.1), median(|r| r.1 / r.0))
}

/// Bytes of all matrices / time to multiply each once, over at least 0.2 s (so small,
/// in-cache runs measure too).
fn gb_per_s<M>(ms: &[M], bytes: usize, f: impl Fn(&M) -> Tensor) -> f64 {
    let start = Instant::now();
    let mut passes = 0;
    while passes == 0 || start.elapsed().as_secs_f64() < 0.2 {
        for m in ms {
            black_box(f(m));
        }
        passes += 1;
    }
    (passes * ms.len() * bytes) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn median_of(n: usize, f: impl Fn() -> f64) -> f64 {
    median((0..n).map(|_| f()).collect())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
