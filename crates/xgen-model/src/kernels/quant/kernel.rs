//! The quantized product's driver: output features split across the pool's threads in chunks
//! ([`work_split`]), activation rows taken in groups of [`GROUP`] per pass over a weight row (the
//! row stays in L1 for the next group), long prompts in tiles of [`TILE`] rows so a tile's
//! activations stay in L2. Each (weight row, row group) goes to the SIMD kernel when the CPU has
//! one (AVX-512 VNNI, else AVX2), else to [`dot_scalar`]. Prompts of 16 rows or more go to AMX tiles instead where the CPU
//! has them ([`super::amx`]).

use super::{
    layout::{signed_block, GROUP_BLOCKS},
    Activations, PackedMatrix, BLOCK,
};
use crate::kernels::{work_split, EXACT_ROWS};

/// Activation rows from which prompts take AMX tiles where the CPU has them (one full tile).
/// Steps of up to [`EXACT_ROWS`] rows (decode, verify) stay on the VNNI tiles, exact per row.
const AMX_ROWS: usize = EXACT_ROWS + 1;
/// Activation rows per pass over a weight row (accumulators kept in registers).
pub(crate) const GROUP: usize = 4;
/// Activation rows per pass over a weight row in a step of fewer than [`AMX_ROWS`] rows (a
/// verify or batched decode step), on [`Kernels::few`].
const FEW_GROUP: usize = 8;
/// Activation rows per tile.
const TILE: usize = 64;
/// Weight rows per chunk of work handed to a thread ([`work_split`]): 64 rows of a 4096-wide q4_0
/// matrix are 147 KB, ~10 µs of streaming.
const CHUNK_ROWS: usize = 64;
/// Weight rows per tile (streams in flight, sharing each activation load).
const WEIGHT_ROWS: usize = 4;
/// Groups of 16 blocks per k slice of a prompt tile: 4096 values, so 4 q8_0 weight rows (16 KB)
/// and 4 activation rows (16 KB) fit L1 together.
const SLICE_GROUPS: usize = 8;

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
    #[cfg(target_arch = "x86_64")]
    if acts.rows >= AMX_ROWS && super::amx::fits(ws) && super::amx::available() {
        return super::amx::matmul_many(ws, acts);
    }
    tiles_many(ws, acts, pick())
}

/// [`matmul_many`] on `kernels`' tiles (the VNNI kernels or [`tile_scalar`]; tests force each).
pub(super) fn tiles_many(ws: &[&PackedMatrix], acts: &Activations, kernels: Kernels) -> Vec<Vec<f32>> {
    let rows = acts.rows;
    // Steps of a few rows take them up to 8 at a time on the few-row kernel.
    let group = if rows < AMX_ROWS { FEW_GROUP } else { GROUP };
    // Feature f of the concatenation is row f - starts[m] of matrix m.
    let starts: Vec<usize> = ws.iter().scan(0, |at, w| Some(std::mem::replace(at, *at + w.n))).collect();
    let n: usize = ws.iter().map(|w| w.n).sum();
    let groups = acts.k.div_ceil(BLOCK * GROUP_BLOCKS);
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; rows * w.n]).collect();
    let outputs: Vec<Columns> = ys.iter_mut().zip(ws).map(|(y, w)| Columns::new(y, w.n)).collect();
    for start in (0..rows).step_by(TILE) {
        let tile = TILE.min(rows - start);
        // One slot per feature: each chunk's work lands in its features' columns of `ys`.
        let mut claimed = vec![(); n];
        work_split::for_each_chunk(n, CHUNK_ROWS, &mut claimed, 1, |features, _| {
            let (first, in_chunk) = (features.start, features.len());
            // Feature-major `[in_chunk, tile]`: the kernels write one feature's rows together.
            let mut block = vec![0f32; in_chunk * tile];
            // Prompts take k in slices, so a tile's weight rows and activation rows both stay in
            // L1 while it runs (a whole 11008-wide row group would not). Steps of fewer than
            // AMX_ROWS rows (decode, verify) do not: each row's sums are then added in the order
            // of a one-row step, so a verify step's products equal its single steps' exactly.
            let slice = if rows >= AMX_ROWS { SLICE_GROUPS } else { usize::MAX };
            for g0 in (0..groups).step_by(slice) {
                let mut jj = 0;
                while jj < in_chunk {
                    let f = first + jj;
                    let m = starts.partition_point(|&s| s <= f) - 1;
                    let (w, j) = (ws[m], f - starts[m]);
                    // A tile stays within one matrix.
                    let wr = WEIGHT_ROWS.min(in_chunk - jj).min(w.n - j);
                    for g in (0..tile).step_by(group) {
                        let r = group.min(tile - g);
                        let tile_fn = if r > 1 && group == FEW_GROUP { kernels.few } else { kernels.tile };
                        let out = &mut block[jj * tile + g..];
                        let groups = (g0, groups.min(g0.saturating_add(slice)));
                        tile_fn(w, acts, Tile { j, wr, first: start + g, r, stride: tile, groups }, out);
                    }
                    jj += wr;
                }
            }
            // The block's columns into the outputs, a run of features within one matrix at a time.
            let mut jj = 0;
            while jj < in_chunk {
                let f = first + jj;
                let m = starts.partition_point(|&s| s <= f) - 1;
                let run = in_chunk.min(jj + ws[m].n - (f - starts[m]));
                // SAFETY: features first..first + in_chunk belong to this chunk alone
                // (for_each_chunk hands each item to one call): no other call writes them.
                unsafe {
                    outputs[m].write_columns(f - starts[m], start, &block[jj * tile..run * tile], tile)
                };
                jj = run;
            }
        });
    }
    ys
}

/// A row-major `[rows, n]` output written column by column from several threads, each column by
/// one of them.
pub(super) struct Columns {
    ptr: *mut f32,
    len: usize,
    n: usize,
}

// SAFETY: calls write disjoint columns (see `write_column`'s contract).
unsafe impl Sync for Columns {}

impl Columns {
    pub(super) fn new(y: &mut [f32], n: usize) -> Self {
        Self { ptr: y.as_mut_ptr(), len: y.len(), n }
    }

    /// `y[(row0 + r) · n + j0 + c] = columns[c · rows + r]` for every column `c` of the
    /// feature-major `columns` (`rows` values each): row by row, so each write is a contiguous run.
    ///
    /// # Safety
    /// No other thread reads or writes columns `j0..` meanwhile, and the `Vec` behind `ptr`
    /// outlives the call.
    pub(super) unsafe fn write_columns(&self, j0: usize, row0: usize, columns: &[f32], rows: usize) {
        let width = columns.len() / rows;
        assert!(j0 + width <= self.n && (row0 + rows) * self.n <= self.len, "columns within the output");
        for r in 0..rows {
            // SAFETY: in bounds (checked above); exclusive per the contract.
            let out =
                unsafe { std::slice::from_raw_parts_mut(self.ptr.add((row0 + r) * self.n + j0), width) };
            out.iter_mut().zip(columns[r..].iter().step_by(rows)).for_each(|(o, &v)| *o = v);
        }
    }
}

/// A tile: weight rows `j..j + wr` (wr ≤ 4) against activation rows `first..first + r` (r ≤ 4),
/// over the groups of 16 blocks `groups.0..groups.1` of k; `out[w * stride + i]` gains weight row
/// `j + w` times activation row `first + i` over those blocks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub j: usize,
    pub wr: usize,
    pub first: usize,
    pub r: usize,
    pub stride: usize,
    pub groups: (usize, usize),
}

pub(super) type TileFn = fn(&PackedMatrix, &Activations, Tile, &mut [f32]);

/// The tile functions a product runs on.
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    /// Up to [`GROUP`] rows: prompt tiles and one-row steps.
    pub tile: TileFn,
    /// 2 to [`FEW_GROUP`] rows of a step of fewer than [`AMX_ROWS`] rows.
    pub few: TileFn,
}

impl Kernels {
    /// The portable definition for both.
    pub(super) const PORTABLE: Self = Self { tile: tile_scalar, few: tile_scalar };
    /// One AVX2 kernel for every row count.
    #[cfg(target_arch = "x86_64")]
    pub(super) const AVX2: Self = Self { tile: super::x86_avx2::tile, few: super::x86_avx2::tile };
}

fn pick() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        return Kernels { tile: super::x86::tile, few: super::x86_few::tile };
    } else if super::x86_avx2::available() {
        return Kernels::AVX2;
    }
    Kernels::PORTABLE
}

pub(super) fn tile_scalar(w: &PackedMatrix, acts: &Activations, t: Tile, out: &mut [f32]) {
    let nb = w.k / BLOCK;
    let blocks = t.groups.0 * GROUP_BLOCKS..nb.min(t.groups.1.saturating_mul(GROUP_BLOCKS));
    for i in 0..t.wr {
        let out = &mut out[i * t.stride..i * t.stride + t.r];
        dot_scalar(w, t.j + i, acts, t.first, blocks.clone(), out);
    }
}

/// The portable kernel, and the definition the SIMD ones must match: `out[i]` gains weight row `j`
/// times activation row `first + i` over `blocks`.
pub(crate) fn dot_scalar(
    w: &PackedMatrix,
    j: usize,
    acts: &Activations,
    first: usize,
    blocks: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let (qs, nb) = (w.row_qs(j), w.k / BLOCK);
    let weights: Vec<(usize, [i8; BLOCK], (f32, f32))> =
        blocks.map(|b| (b, signed_block(w.format, qs, nb, b), w.block_scale(j, b))).collect();
    for (i, o) in out.iter_mut().enumerate() {
        let (xd, xsum) = (acts.row_d(first + i), acts.row_sums(first + i));
        *o += weights
            .iter()
            .map(|&(b, wq, (scale, min))| {
                let xq = acts.block_q(first + i, b);
                let s: i32 = wq.iter().zip(&xq).map(|(&a, &c)| a as i32 * c as i32).sum();
                // `min` is 0 but for q4_1 and q4_k: `Σ (scale · q - min) · x`.
                scale * xd[b] * s as f32 - min * (xsum[b] as f32 * xd[b])
            })
            .sum::<f32>();
    }
}
