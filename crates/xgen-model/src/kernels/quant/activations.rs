//! Activation rows quantized to q8_0 (as ggml's `quantize_row_q8_0`, candle's `BlockQ8_0::from_float`),
//! with the per-row derived arrays the SIMD kernels read.

use rayon::prelude::*;

use super::{
    layout::{position, GROUP_BLOCKS},
    BlockFormat, BLOCK,
};

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
        if rows >= 8 {
            xs.par_chunks(k)
                .zip(grouped.par_chunks_mut(k))
                .zip(d.par_chunks_mut(nb).zip(sums.par_chunks_mut(nb)))
                .for_each(|((x, g), (d, sums))| quantize_row(x, g, d, sums));
        } else {
            let parts =
                xs.chunks(k).zip(grouped.chunks_mut(k)).zip(d.chunks_mut(nb).zip(sums.chunks_mut(nb)));
            parts.for_each(|((x, g), (d, sums))| quantize_row(x, g, d, sums));
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
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        // SAFETY: the CPU has the AVX-512 kernels' features (checked just above).
        return unsafe { super::x86::quantize_row(x, g, d, sums) };
    } else if super::x86_avx2::available() {
        // SAFETY: the CPU has the AVX2 kernel's features (checked just above).
        return unsafe { super::x86_avx2::quantize_row(x, g, d, sums) };
    }
    quantize_row_any(x, g, d, sums)
}

/// The portable quantizer, and the definition the SIMD one must match.
pub(super) fn quantize_row_any(x: &[f32], g: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    let nb = x.len() / BLOCK;
    // Group by group of 16 blocks: in a group of `t` blocks, quants 4u..4u + 4 of its block `b`
    // sit at 4t·u + 4b (see `layout`; `position` says the same per value).
    for (gi, (xg, gg)) in x.chunks(BLOCK * GROUP_BLOCKS).zip(g.chunks_mut(BLOCK * GROUP_BLOCKS)).enumerate() {
        let t = xg.len() / BLOCK;
        for (lane, x) in xg.chunks_exact(BLOCK).enumerate() {
            let b = gi * GROUP_BLOCKS + lane;
            // Lane-wise maxima first (a single running maximum would not vectorise).
            let mut lanes = [0f32; 16];
            for i in 0..BLOCK {
                lanes[i % 16] = lanes[i % 16].max(x[i].abs());
            }
            let mut amax = 0f32;
            for m in lanes {
                amax = amax.max(m);
            }
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            d[b] = half::f16::from_f32(scale).to_f32();
            let mut q = [0i8; BLOCK];
            let mut sum = 0i32;
            for i in 0..BLOCK {
                q[i] = round_half_away(x[i] * inv) as i8;
                sum += q[i] as i32;
            }
            sums[b] = sum;
            for (u, four) in q.chunks_exact(4).enumerate() {
                gg[4 * t * u + 4 * lane..][..4].copy_from_slice(four);
            }
        }
    }
    debug_assert_eq!(d.len(), nb);
}

/// `v.round()` (halves away from zero, as ggml's `roundf`), as the SIMD quantizer computes it:
/// `v - trunc(v)` is exact, so the comparison decides exactly as `roundf` does.
fn round_half_away(v: f32) -> f32 {
    let t = v.trunc();
    if (v - t).abs() >= 0.5 {
        t + 1f32.copysign(v)
    } else {
        t
    }
}
