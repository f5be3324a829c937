//! Decode-step matrix × vector with 16-bit weights: xgen's kernel against candle's `matmul`, same
//! run, on the XGen-7B shapes. Weights rotate over enough matrices (> 1 GB) that they stream from
//! memory as in a real decode step. Prints GB/s of weights read and the ratio.
//!
//! `cargo bench -p xgen-model --bench matvec`

use std::{hint::black_box, time::Instant};

use candle_core::{DType, Device, Tensor};
use xgen_model::matvec;

const SHAPES: [(usize, usize, &str); 3] =
    [(4096, 4096, "q/k/v/o"), (11008, 4096, "gate/up"), (4096, 11008, "down")];

fn main() {
    let dev = Device::Cpu;
    for dtype in [DType::BF16, DType::F16] {
        for (n, k, name) in SHAPES {
            let bytes = n * k * 2;
            let count = (1 << 30) / bytes + 1;
            let ws: Vec<Tensor> = (0..count)
                .map(|_| Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(dtype).unwrap())
                .collect();
            let x = Tensor::randn(0f32, 1., (1, 1, k), &dev).unwrap().to_dtype(dtype).unwrap();
            let ours = gb_per_s(&ws, bytes, |w| matvec::matmul_wt(&x, w).unwrap().unwrap());
            let candle = gb_per_s(&ws, bytes, |w| x.broadcast_matmul(&w.t().unwrap()).unwrap());
            println!(
                "{dtype:?} {n}x{k} ({name}): xgen {ours:6.2} GB/s   candle {candle:6.2} GB/s   ratio {:.1}x",
                ours / candle
            );
        }
    }
}

/// Median over 3 passes of (bytes of all matrices) / (time to multiply each once).
fn gb_per_s(ws: &[Tensor], bytes: usize, f: impl Fn(&Tensor) -> Tensor) -> f64 {
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            for w in ws {
                black_box(f(w));
            }
            (ws.len() * bytes) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[1]
}
