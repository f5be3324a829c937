//! Prompt work of one chunk, XGen-7B shapes, same run, `ROWS` query/activation rows (default 256,
//! the prefill chunk):
//! - products with block-quantized weights: xgen's packed kernels (AMX int8 tiles where the CPU has
//!   them, else the VNNI tiles; the line names which) against candle's `QMatMul` on the same GGUF blocks;
//! - products with bf16 weights and activations: `matvec::matmul_wt` (the `vdpbf16ps` or AMX tile
//!   where the CPU has them) against candle's `matmul`;
//! - attention of the chunk over an f16 cache of 4K and 8K positions: the fused kernel
//!   (`kernels::prompt_attention`) against `attention::causal_attention` (the f32 path it replaced).
//!
//! Prints tera-operations per second (2 per multiply-add) and the ratio to the f32 FMA peak of the
//! same threads, measured in the same run. Runs inside the rayon pool, as the engine does.
//!
//! `cargo bench -p xgen-model --bench prompt` (env: ROWS, FORMAT=q8_0|q4_0|bf16 for one format,
//! FORMAT=attention for the attention alone, REFERENCE=off to skip candle's side)

use std::{hint::black_box, time::Instant};

use candle_core::{
    quantized::{QMatMul, QTensor},
    Device, Module, Tensor,
};
use xgen_model::{
    attention::causal_attention,
    kernels::{matvec::matmul_wt, peak, prompt_attention::prompt_attention},
    quant::{self, BlockFormat, PackedMatrix},
    DType, KvCache, KvType,
};

const SHAPES: [(usize, usize, &str); 3] =
    [(4096, 4096, "q/k/v/o"), (11008, 4096, "gate/up"), (4096, 11008, "down")];

fn main() {
    rayon::ThreadPoolBuilder::new().build().unwrap().install(run);
}

fn run() {
    let dev = Device::Cpu;
    let rows = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let only = std::env::var("FORMAT").ok();
    let reference = std::env::var("REFERENCE").map_or(true, |v| v != "off");
    let peak = peak::f32_fma_flops(3);
    println!("f32 FMA peak of {} threads: {:.0} GFLOP/s", rayon::current_num_threads(), peak / 1e9);
    if only.as_deref().is_none_or(|f| f == "attention") {
        attention(rows, peak);
    }
    if only.as_deref().is_none_or(|f| f == "bf16") {
        bf16(rows, peak, reference);
    }
    for format in [BlockFormat::Q8_0, BlockFormat::Q4_0] {
        if only.as_deref().is_some_and(|f| f != format!("{format:?}").to_lowercase()) {
            continue;
        }
        for &(n, k, name) in &SHAPES {
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, format.ggml()).unwrap();
            let packed = PackedMatrix::from_ggml(format, n, k, &q.data().unwrap()).unwrap();
            let x = Tensor::randn(0f32, 1., (1, rows, k), &dev).unwrap();
            let ops = 2.0 * (n * k * rows) as f64;
            let ours = ops / seconds(|| packed.forward(&x).unwrap());
            let theirs = if reference {
                let candle = QMatMul::from_qtensor(q).unwrap();
                ops / seconds(|| candle.forward(&x).unwrap())
            } else {
                f64::NAN
            };
            println!(
                "{format:?} {n}x{k} ({name}) rows {rows}: xgen {:.3} TOPS ({:.2}x f32 peak, {})   candle {:.3} TOPS   ratio {:.2}x",
                ours / 1e12,
                ours / peak,
                quant::prompt_kernel(),
                theirs / 1e12,
                ours / theirs
            );
        }
    }
}

/// bf16 weights `[n, k]` times `rows` bf16 activation rows, for each 7B shape.
fn bf16(rows: usize, peak: f64, reference: bool) {
    let dev = Device::Cpu;
    for &(n, k, name) in &SHAPES {
        let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let x = Tensor::randn(0f32, 1., (1, rows, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let ops = 2.0 * (n * k * rows) as f64;
        let ours = ops / seconds(|| matmul_wt(&x, &w).unwrap().expect("applies"));
        let theirs =
            if reference { ops / seconds(|| x.broadcast_matmul(&w.t().unwrap()).unwrap()) } else { f64::NAN };
        println!(
            "bf16 {n}x{k} ({name}) rows {rows}: xgen {:.3} TOPS ({:.2}x f32 peak)   candle {:.3} TOPS   ratio {:.2}x",
            ours / 1e12,
            ours / peak,
            theirs / 1e12,
            ours / theirs
        );
    }
}

/// The last `rows` positions of a 4K and an 8K prompt attending over an f16 cache (32 heads of
/// 128, one layer): the fused kernel and the f32 reference path, same data.
fn attention(rows: usize, peak: f64) {
    let dev = Device::Cpu;
    let (h, hd) = (32, 128);
    for len in [4096, 8192] {
        let past = len - rows;
        let mut cache = KvCache::new(1, 1, h, hd, len, KvType::Float(DType::F16), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1., (1, h, len, hd), &dev).unwrap();
        cache.append(0, &kv, &kv).unwrap();
        let q = Tensor::randn(0f32, 1., (1, h, rows, hd), &dev).unwrap();
        // Causal: the chunk's queries see past + (1..=rows) keys; q·k and p·v, 2 ops each.
        let ops = 4.0 * (h * hd) as f64 * (rows * past + rows * (rows + 1) / 2) as f64;
        let (k, v) = cache.buffers(0);
        let paging = cache.paging();
        let fused =
            ops / seconds(|| prompt_attention(&q, k, v, &paging, past, &[0]).unwrap().expect("applies"));
        let (kf, vf) = cache.views(0, len).unwrap();
        let reference = ops / seconds(|| causal_attention(&q, &kf, &vf, past, &[0]).unwrap());
        println!(
            "attention {rows} rows after {past} (f16 cache): fused {:.3} TOPS ({:.2}x f32 peak)   causal_attention {:.3} TOPS   ratio {:.2}x",
            fused / 1e12,
            fused / peak,
            reference / 1e12,
            fused / reference
        );
    }
}

/// Fastest of 7 timed calls after a warm-up, in seconds: the host is shared, and the fastest
/// call is the one least disturbed by other tenants.
fn seconds(f: impl Fn() -> Tensor) -> f64 {
    black_box(f());
    (0..7)
        .map(|_| {
            let start = Instant::now();
            black_box(f());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
