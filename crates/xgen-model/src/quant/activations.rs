//! Activation rows quantized to q8_0 (as ggml's `quantize_row_q8_0`, candle's `BlockQ8_0::from_float`),
//! with the per-row derived arrays the SIMD kernels read.

use rayon::prelude::*;

use super::{layout::position, BlockFormat, BLOCK};

/// `rows` activation rows of `k` values, quantized per block of 32.
pub struct Activations {
    pub(crate) rows: usize,
    pub(crate) k: usize,
    /// `[rows, k]`: `round(x / d)`.
    pub(crate) q: Vec<i8>,
    /// `[rows, k / 32]`: the block scales, rounded to f16 as GGUF stores them.
    pub(crate) d: Vec<f32>,
    /// `[rows, k]`: `q` in the packed weights' run order (q8_0's, see [`super::layout`]).
    pub(crate) grouped: Vec<i8>,
    /// `[rows, k / 32]`: `Σ q` per block (to remove the weights' offsets).
    pub(crate) sums: Vec<i32>,
}

impl Activations {
    /// Quantizes `xs` `[rows, k]`; `k` must be a multiple of 32.
    pub fn quantize(xs: &[f32], rows: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && xs.len() == rows * k);
        let nb = k / BLOCK;
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * nb];
        let quantize_row = |(x, (q, d)): (&[f32], (&mut [i8], &mut [f32]))| {
            for ((x, q), d) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                *d = half::f16::from_f32(scale).to_f32();
                for (q, &v) in q.iter_mut().zip(x) {
                    *q = (v * inv).round() as i8;
                }
            }
        };
        let parts = xs.chunks(k).zip(q.chunks_mut(k).zip(d.chunks_mut(nb)));
        if rows >= 8 {
            parts.par_bridge().for_each(quantize_row);
        } else {
            parts.for_each(quantize_row);
        }
        let mut grouped = vec![0i8; rows * k];
        for (q, g) in q.chunks_exact(k).zip(grouped.chunks_exact_mut(k)) {
            for (b, block) in q.chunks_exact(BLOCK).enumerate() {
                for i in (0..BLOCK).step_by(4) {
                    let (at, _) = position(BlockFormat::Q8_0, nb, b, i);
                    g[at..at + 4].copy_from_slice(&block[i..i + 4]);
                }
            }
        }
        let sums = q.chunks_exact(BLOCK).map(|b| b.iter().map(|&v| v as i32).sum()).collect();
        Self { rows, k, q, d, grouped, sums }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn row_q(&self, r: usize) -> &[i8] {
        &self.q[r * self.k..(r + 1) * self.k]
    }

    pub(crate) fn row_d(&self, r: usize) -> &[f32] {
        let nb = self.k / BLOCK;
        &self.d[r * nb..(r + 1) * nb]
    }

    pub(crate) fn row_grouped(&self, r: usize) -> &[i8] {
        &self.grouped[r * self.k..(r + 1) * self.k]
    }

    pub(crate) fn row_sums(&self, r: usize) -> &[i32] {
        let nb = self.k / BLOCK;
        &self.sums[r * nb..(r + 1) * nb]
    }
}
