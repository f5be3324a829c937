//! The quantized product's driver: output features split across rayon tasks, activation rows
//! taken in groups of [`GROUP`] per pass over a weight row (the row stays in L1 for the next
//! group), long prompts in tiles of [`TILE`] rows so a tile's activations stay in L2. Each
//! (weight row, row group) goes to the SIMD kernel when the CPU has one, else to [`dot_scalar`].

use rayon::prelude::*;

use super::{layout::signed_block, Activations, PackedMatrix, BLOCK};

/// Activation rows per pass over a weight row (accumulators kept in registers).
pub(crate) const GROUP: usize = 4;
/// Activation rows per tile.
const TILE: usize = 64;
/// Rayon tasks per thread: few, because each task's first rows start cold (the prefetch runs
/// ahead within a task), yet more than one so a slow thread does not hold up the product.
const TASKS_PER_THREAD: usize = 2;
/// Weight rows per tile (streams in flight, sharing each activation load).
const WEIGHT_ROWS: usize = 4;

/// `[rows, n]`: every activation row times every weight row.
pub(super) fn matmul(w: &PackedMatrix, acts: &Activations) -> Vec<f32> {
    assert_eq!(acts.k, w.k, "activation width must equal the weight's");
    let (rows, n) = (acts.rows, w.n);
    let tile_fn = pick();
    let mut y = vec![0f32; rows * n];
    for start in (0..rows).step_by(TILE) {
        let tile = TILE.min(rows - start);
        // Feature-major `[n, tile]` so each task owns a contiguous slice.
        let mut yt = vec![0f32; n * tile];
        let features =
            n.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()).next_multiple_of(WEIGHT_ROWS);
        yt.par_chunks_mut(features * tile).enumerate().for_each(|(b, chunk)| {
            let in_chunk = chunk.len() / tile;
            for jj in (0..in_chunk).step_by(WEIGHT_ROWS) {
                let wr = WEIGHT_ROWS.min(in_chunk - jj);
                for g in (0..tile).step_by(GROUP) {
                    let r = GROUP.min(tile - g);
                    let out = &mut chunk[jj * tile + g..];
                    let at = Tile { j: b * features + jj, wr, first: start + g, r, stride: tile };
                    tile_fn(w, acts, at, out);
                }
            }
        });
        for j in 0..n {
            for r in 0..tile {
                y[(start + r) * n + j] = yt[j * tile + r];
            }
        }
    }
    y
}

/// A tile: weight rows `j..j + wr` (wr ≤ 4) against activation rows `first..first + r` (r ≤ 4);
/// `out[w * stride + i]` receives weight row `j + w` times activation row `first + i`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub j: usize,
    pub wr: usize,
    pub first: usize,
    pub r: usize,
    pub stride: usize,
}

type TileFn = fn(&PackedMatrix, &Activations, Tile, &mut [f32]);

fn pick() -> TileFn {
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        return super::x86::tile;
    }
    tile_scalar
}

fn tile_scalar(w: &PackedMatrix, acts: &Activations, t: Tile, out: &mut [f32]) {
    for i in 0..t.wr {
        dot_scalar(w, t.j + i, acts, t.first, &mut out[i * t.stride..i * t.stride + t.r]);
    }
}

/// The portable kernel, and the definition the SIMD ones must match.
pub(crate) fn dot_scalar(w: &PackedMatrix, j: usize, acts: &Activations, first: usize, out: &mut [f32]) {
    let (qs, wd, nb) = (w.row_qs(j), w.row_d(j), w.k / BLOCK);
    let weights: Vec<[i8; BLOCK]> = (0..nb).map(|b| signed_block(w.format, qs, nb, b)).collect();
    for (i, o) in out.iter_mut().enumerate() {
        let (xq, xd) = (acts.row_q(first + i), acts.row_d(first + i));
        *o = weights
            .iter()
            .zip(xq.chunks_exact(BLOCK))
            .enumerate()
            .map(|(b, (wq, xq))| {
                let s: i32 = wq.iter().zip(xq).map(|(&a, &c)| a as i32 * c as i32).sum();
                half::f16::from_bits(wd[b]).to_f32() * xd[b] * s as f32
            })
            .sum();
    }
}
