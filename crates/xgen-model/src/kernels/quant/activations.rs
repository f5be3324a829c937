//! Activation rows quantized to q8_0 (as ggml's `quantize_row_q8_0`, candle's `BlockQ8_0::from_float`),
//! with the per-row derived arrays the SIMD kernels read.

use rayon::prelude::*;

use super::{layout::position, BlockFormat, BLOCK};

/// `rows` activation rows of `k` values, quantized per block of 32.
pub struct Activations {
    pub(crate) rows: usize,
    pub(crate) k: usize,
    /// `[rows, k / 32]`: the block scales, rounded to f16 as GGUF stores them.
    pub(crate) d: Vec<f32>,
    /// `[rows, k]`: the quants `round(x / d)`, in the packed weights' run order (q8_0's, see
    /// [`super::layout`]).
    pub(crate) grouped: Vec<i8>,
    /// `[rows, k / 32]`: `Σ q` per block (to remove the weights' offsets).
    pub(crate) sums: Vec<i32>,
}

impl Activations {
    /// Quantizes `xs` `[rows, k]`; `k` must be a multiple of 32.
    pub fn quantize(xs: &[f32], rows: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && xs.len() == rows * k);
        let nb = k / BLOCK;
        let mut grouped = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * nb];
        let mut sums = vec![0i32; rows * nb];
        let parts = xs.chunks(k).zip(grouped.chunks_mut(k).zip(d.chunks_mut(nb).zip(sums.chunks_mut(nb))));
        if rows >= 8 {
            parts.par_bridge().for_each(|(x, (g, (d, sums)))| quantize_row(x, g, d, sums));
        } else {
            parts.for_each(|(x, (g, (d, sums)))| quantize_row(x, g, d, sums));
        }
        Self { rows, k, d, grouped, sums }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Block `b` of row `r`, in order (gathered from the run layout; for the portable kernel).
    pub(crate) fn block_q(&self, r: usize, b: usize) -> [i8; BLOCK] {
        let (row, nb) = (self.row_grouped(r), self.k / BLOCK);
        std::array::from_fn(|i| row[position(BlockFormat::Q8_0, nb, b, i).0])
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

/// One row `x` of `k` values -> its quants in run order `g`, block scales `d` and block sums.
fn quantize_row(x: &[f32], g: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    let nb = x.len() / BLOCK;
    for (b, x) in x.chunks_exact(BLOCK).enumerate() {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        d[b] = half::f16::from_f32(scale).to_f32();
        let q: [i8; BLOCK] = std::array::from_fn(|i| (x[i] * inv).round() as i8);
        sums[b] = q.iter().map(|&v| v as i32).sum();
        for i in (0..BLOCK).step_by(4) {
            let (at, _) = position(BlockFormat::Q8_0, nb, b, i);
            g[at..at + 4].copy_from_slice(&q[i..i + 4]);
        }
    }
}
