//! Decode-step matrix × vector with block-quantized weights: xgen's packed kernels against candle's
//! `QMatMul` on the same GGUF blocks, same run, XGen-7B shapes. Weights rotate over > 1 GB so they
//! stream from memory as in a decode step. Prints GB/s of weights read (each side's own bytes).
//!
//! `cargo bench -p xgen-model --bench quant`

use std::{hint::black_box, time::Instant};

use candle_core::{
    quantized::{QMatMul, QTensor},
    Device, Module, Tensor,
};
use xgen_model::quant::{BlockFormat, PackedMatrix};

const SHAPES: [(usize, usize, &str); 3] =
    [(4096, 4096, "q/k/v/o"), (11008, 4096, "gate/up"), (4096, 11008, "down")];

fn main() {
    let dev = Device::Cpu;
    let rows: usize = std::env::var("ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    for format in [BlockFormat::Q8_0, BlockFormat::Q4_0] {
        let small = [(1024, 1024, "in-cache")];
        let shapes: &[(usize, usize, &str)] = if std::env::var("SMALL").is_ok() { &small } else { &SHAPES };
        for &(n, k, name) in shapes {
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, format.ggml()).unwrap();
            let bytes = q.storage_size_in_bytes();
            let total: usize = std::env::var("TOTAL_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
            let count = (total << 20) / bytes + 1;
            let packed: Vec<PackedMatrix> = (0..count)
                .map(|_| PackedMatrix::from_ggml(format, n, k, &q.data().unwrap()).unwrap())
                .collect();
            let x = Tensor::randn(0f32, 1., (1, rows, k), &dev).unwrap();
            let ours = gb_per_s(&packed, bytes, |m| m.forward(&x).unwrap());
            drop(packed);
            let candle: Vec<QMatMul> = (0..count)
                .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, format.ggml()).unwrap()).unwrap())
                .collect();
            let theirs = gb_per_s(&candle, bytes, |m| m.forward(&x).unwrap());
            println!(
                "{format:?} {n}x{k} ({name}) rows {rows}: xgen {ours:6.2} GB/s   candle {theirs:6.2} GB/s   ratio {:.2}x",
                ours / theirs
            );
        }
    }
}

/// Median over 5 passes of (bytes of all matrices) / (time to multiply each once).
fn gb_per_s<M>(ms: &[M], bytes: usize, f: impl Fn(&M) -> Tensor) -> f64 {
    f(&ms[0]);
    let mut rates: Vec<f64> = (0..5)
        .map(|_| {
            // At least 0.2 s per pass, so small (in-cache) runs measure too.
            let start = Instant::now();
            let mut passes = 0;
            while passes == 0 || start.elapsed().as_secs_f64() < 0.2 {
                for m in ms {
                    black_box(f(m));
                }
                passes += 1;
            }
            (passes * ms.len() * bytes) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[2]
}
