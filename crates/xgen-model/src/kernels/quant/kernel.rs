//! The quantized product's driver: output features split across the pool's threads in chunks
//! ([`work_split`]), activation rows taken in groups of [`GROUP`] per pass over a weight row (the
//! row stays in L1 for the next group), long prompts in tiles of [`TILE`] rows so a tile's
//! activations stay in L2. Each (weight row, row group) goes to the SIMD kernel when the CPU has
//! one, else to [`dot_scalar`].

use super::{layout::signed_block, Activations, PackedMatrix, BLOCK};
use crate::kernels::work_split;

/// Activation rows per pass over a weight row (accumulators kept in registers).
pub(crate) const GROUP: usize = 4;
/// Activation rows per tile.
const TILE: usize = 64;
/// Weight rows per chunk of work handed to a thread ([`work_split`]): 64 rows of a 4096-wide q4_0
/// matrix are 147 KB, ~10 µs of streaming.
const CHUNK_ROWS: usize = 64;
/// Weight rows per tile (streams in flight, sharing each activation load).
const WEIGHT_ROWS: usize = 4;

/// `[rows, n]`: every activation row times every weight row.
pub(super) fn matmul(w: &PackedMatrix, acts: &Activations) -> Vec<f32> {
    matmul_many(&[w], acts).pop().expect("one matrix")
}

/// `[rows, n_m]` per matrix `m`: matrices sharing the activations (q/k/v, gate/up) multiplied in
/// one parallel pass over their rows taken end to end, so the threads meet once instead of once
/// per matrix (each meeting costs streams that restart cold and a tail where one thread waits).
pub(super) fn matmul_many(ws: &[&PackedMatrix], acts: &Activations) -> Vec<Vec<f32>> {
    for w in ws {
        assert_eq!(acts.k, w.k, "activation width must equal the weight's");
    }
    let rows = acts.rows;
    // Feature f of the concatenation is row f - starts[m] of matrix m.
    let starts: Vec<usize> = ws.iter().scan(0, |at, w| Some(std::mem::replace(at, *at + w.n))).collect();
    let n: usize = ws.iter().map(|w| w.n).sum();
    let tile_fn = pick();
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; rows * w.n]).collect();
    for start in (0..rows).step_by(TILE) {
        let tile = TILE.min(rows - start);
        // Feature-major `[n, tile]` so each chunk owns a contiguous slice.
        let mut yt = vec![0f32; n * tile];
        work_split::for_each_chunk(n, CHUNK_ROWS, &mut yt, tile, |features, chunk| {
            let (first, in_chunk) = (features.start, features.len());
            let mut jj = 0;
            while jj < in_chunk {
                let f = first + jj;
                let m = starts.partition_point(|&s| s <= f) - 1;
                let (w, j) = (ws[m], f - starts[m]);
                // A tile stays within one matrix.
                let wr = WEIGHT_ROWS.min(in_chunk - jj).min(w.n - j);
                for g in (0..tile).step_by(GROUP) {
                    let r = GROUP.min(tile - g);
                    let out = &mut chunk[jj * tile + g..];
                    tile_fn(w, acts, Tile { j, wr, first: start + g, r, stride: tile }, out);
                }
                jj += wr;
            }
        });
        for (m, y) in ys.iter_mut().enumerate() {
            let (s0, nm) = (starts[m], ws[m].n);
            if tile == 1 {
                // One row (a decode step): feature-major is already the row.
                y[start * nm..(start + 1) * nm].copy_from_slice(&yt[s0..s0 + nm]);
                continue;
            }
            transpose_into(&yt[s0 * tile..(s0 + nm) * tile], tile, &mut y[start * nm..(start + tile) * nm]);
        }
    }
    ys
}

/// `src` `[n, rows]` (feature-major) into `dst` `[rows, n]`, in 16 × 16 blocks so both sides
/// move whole cache lines (the element loop this replaced wrote one line per value: 5% of a
/// prompt's time).
fn transpose_into(src: &[f32], rows: usize, dst: &mut [f32]) {
    const B: usize = 16;
    let n = src.len() / rows.max(1);
    for j0 in (0..n).step_by(B) {
        for r0 in (0..rows).step_by(B) {
            for j in j0..(j0 + B).min(n) {
                for r in r0..(r0 + B).min(rows) {
                    dst[r * n + j] = src[j * rows + r];
                }
            }
        }
    }
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
        let xd = acts.row_d(first + i);
        *o = weights
            .iter()
            .enumerate()
            .map(|(b, wq)| {
                let xq = acts.block_q(first + i, b);
                let s: i32 = wq.iter().zip(&xq).map(|(&a, &c)| a as i32 * c as i32).sum();
                half::f16::from_bits(wd[b]).to_f32() * xd[b] * s as f32
            })
            .sum();
    }
}
