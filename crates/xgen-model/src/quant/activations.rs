//! Activation rows quantized to q8_0 (as ggml's `quantize_row_q8_0`, candle's `BlockQ8_0::from_float`),
//! with the per-row derived arrays the SIMD kernels read.

use rayon::prelude::*;

use super::BLOCK;

/// `rows` activation rows of `k` values, quantized per block of 32.
pub struct Activations {
    pub(crate) rows: usize,
    pub(crate) k: usize,
    /// `[rows, k]`: `round(x / d)`.
    pub(crate) q: Vec<i8>,
    /// `[rows, k / 32]`: the block scales, rounded to f16 as GGUF stores them.
    pub(crate) d: Vec<f32>,
    /// `[rows, k]`: `q + 128` (the unsigned operand of `vpdpbusd` against signed q8_0 weights).
    pub(crate) q_biased: Vec<u8>,
    /// `[rows, k / 64, 16]`: the scales of a block pair spread over the 16 i32 lanes that
    /// `vpdpbusd` fills from 64 values (lanes 0..8: first block, 8..16: second).
    pub(crate) d_lanes: Vec<f32>,
    /// `[rows, k / 64, 16]`: `-8 · Σ q` over each lane's 4 values (q4_0's nibble offset).
    pub(crate) q4_offset: Vec<i32>,
}

impl Activations {
    /// Quantizes `xs` `[rows, k]`; `k` must be a multiple of 32.
    pub fn quantize(xs: &[f32], rows: usize, k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && xs.len() == rows * k);
        let (nb, pairs) = (k / BLOCK, k / (2 * BLOCK));
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
        let q_biased = q.iter().map(|&v| (v as i32 + 128) as u8).collect();
        let mut d_lanes = vec![0f32; rows * pairs * 16];
        let mut q4_offset = vec![0i32; rows * pairs * 16];
        for r in 0..rows {
            for p in 0..pairs {
                let at = (r * pairs + p) * 16;
                for lane in 0..16 {
                    d_lanes[at + lane] = d[r * nb + 2 * p + lane / 8];
                    let x = &q[r * k + p * 2 * BLOCK + 4 * lane..][..4];
                    q4_offset[at + lane] = -8 * x.iter().map(|&v| v as i32).sum::<i32>();
                }
            }
        }
        Self { rows, k, q, d, q_biased, d_lanes, q4_offset }
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
}
