//! Prompt products of q8_0/q4_0/q4_1/q4_k weights on Intel AMX int8 tiles (`tdpbssd`), where the CPU and
//! the OS offer them ([`amx::has`]); elsewhere prompts run on the VNNI tiles of [`super::x86`].
//!
//! One `tdpbssd` multiplies a 16 × 32 tile of signed weights (16 features, one block of 32
//! values) by an 8 × 64 tile of activations (the same block of 16 activation rows, 4 values of
//! each row per tile row: AMX's pair-of-dwords operand layout) into 16 × 16 exact i32 sums. Each
//! block has its own scales, so every block's sums are stored and added into 16 f32 registers as
//! `sum · d_w · d_x` (llama.cpp's AMX kernels do the same; `../shared/docs/amx-prefill-facts.md`);
//! the minimums of q4_1 and q4_k subtract `min · d_x·Σ x` with one more FMA.
//! Two blocks per step keep two tile products in flight while the previous pair is scaled.
//!
//! - Weights: per strip of 16 features, the packed runs ([`super::layout`]) are unpacked once per
//!   product into plain signed bytes `[16, k]` (an 8 × 16 transpose of dwords per group of 16
//!   blocks), so block `b`'s A tile is `strip + 32 b` with a stride of `k` (rounded up to 2 blocks).
//! - Activations: [`TileActs`], rows padded to 16, each (16 rows, block) laid out as its B tile.
//!
//! The tile instructions sit behind [`TileMul`]: AMX's, and in tests an emulation of `tdpbssd`'s
//! definition, so the packing, the loops and the scaling are tested on every AVX-512 host and the
//! instructions themselves where the CPU has them.

use std::arch::{asm, x86_64::*};

use rayon::prelude::*;

use super::{kernel::Columns, layout::GROUP_BLOCKS, Activations, BlockFormat, PackedMatrix, BLOCK};
use crate::kernels::{
    amx::{self, TileConfig, Unit},
    work_split,
};

/// Rows of a tile: features of an A tile, activation rows of a B tile.
const TILE: usize = 16;
/// Bytes of one B tile: 8 rows of 16 × 4 (= 16 rows × one block).
const B_TILE: usize = TILE * BLOCK;
/// Strips of 16 features per chunk of work handed to a thread ([`work_split`]).
const CHUNK_STRIPS: usize = 4;

/// Whether prompts of packed weights run here: AMX-INT8 granted, and AVX-512 for the scaling.
pub(super) fn available() -> bool {
    super::x86::available() && amx::has(Unit::Int8)
}

/// Whether [`matmul_many`] takes these matrices: features in whole strips of 16.
pub(super) fn fits(ws: &[&PackedMatrix]) -> bool {
    ws.iter().all(|w| w.n.is_multiple_of(TILE))
}

/// Blocks per row, rounded up to the 2 blocks of a step (the extra block is zeros).
fn padded_blocks(k: usize) -> usize {
    (k / BLOCK).next_multiple_of(2)
}

/// Activation rows as AMX B tiles: rows padded to a multiple of 16; for each group of 16 rows and
/// each block, 8 tile rows of 64 bytes (tile row `p`: values `4p..4p + 4` of the block for each
/// of the 16 activation rows), and the 16 rows' scales of the block.
struct TileActs {
    groups: usize,
    /// Blocks per row, [`padded_blocks`].
    nb: usize,
    /// `[groups, nb, 8, 16, 4]`.
    q: Vec<i8>,
    /// `[groups, nb, 16]`.
    d: Vec<f32>,
    /// `[groups, nb, 16]`: `d · Σ q` per block (for the minimums of q4_1 and q4_k).
    dx_sums: Vec<f32>,
}

impl TileActs {
    fn new(acts: &Activations) -> Self {
        let (nb, real) = (padded_blocks(acts.k), acts.k / BLOCK);
        let groups = acts.rows.div_ceil(TILE);
        let mut q = vec![0i8; groups * nb * B_TILE];
        let mut d = vec![0f32; groups * nb * TILE];
        let mut dx_sums = vec![0f32; groups * nb * TILE];
        let parts = q
            .par_chunks_mut(nb * B_TILE)
            .zip(d.par_chunks_mut(nb * TILE).zip(dx_sums.par_chunks_mut(nb * TILE)));
        parts.enumerate().for_each(|(g, (q, (d, dx_sums)))| {
            for n in 0..TILE.min(acts.rows - g * TILE) {
                let r = g * TILE + n;
                let (row, scales, sums) = (acts.row_grouped(r), acts.row_d(r), acts.row_sums(r));
                for b in 0..real {
                    d[b * TILE + n] = scales[b];
                    dx_sums[b * TILE + n] = sums[b] as f32 * scales[b];
                }
                // Group by group: run p's dword `lane` is values 4p..4p + 4 of block 16 g + lane.
                for (gi, runs) in row.chunks(GROUP_BLOCKS * BLOCK).enumerate() {
                    let t = runs.len() / BLOCK;
                    for (p, run) in runs.chunks_exact(4 * t).enumerate() {
                        for (lane, four) in run.chunks_exact(4).enumerate() {
                            let b = gi * GROUP_BLOCKS + lane;
                            q[b * B_TILE + p * 64 + 4 * n..][..4].copy_from_slice(four);
                        }
                    }
                }
            }
        });
        Self { groups, nb, q, d, dx_sums }
    }

    /// The B tiles of row group `g` from block `b` on (each block's tile follows the previous).
    fn tiles(&self, g: usize, b: usize) -> &[i8] {
        &self.q[(g * self.nb + b) * B_TILE..(g + 1) * self.nb * B_TILE]
    }

    fn scales(&self, g: usize, b: usize) -> &[f32] {
        &self.d[(g * self.nb + b) * TILE..][..TILE]
    }

    fn dx_sums(&self, g: usize, b: usize) -> &[f32] {
        &self.dx_sums[(g * self.nb + b) * TILE..][..TILE]
    }
}

/// `[rows, n_m]` per matrix `m` (as [`super::kernel::matmul_many`]) on AMX tiles. Needs
/// [`available`] and [`fits`].
pub(super) fn matmul_many(ws: &[&PackedMatrix], acts: &Activations) -> Vec<Vec<f32>> {
    matmul_many_with::<Amx>(ws, acts)
}

fn matmul_many_with<T: TileMul>(ws: &[&PackedMatrix], acts: &Activations) -> Vec<Vec<f32>> {
    assert!(fits(ws) && ws.iter().all(|w| w.k == acts.k), "whole strips of 16 features, one width");
    let (rows, k) = (acts.rows, acts.k);
    let tiles = TileActs::new(acts);
    // Feature f of the concatenation is row f - starts[m] of matrix m.
    let starts: Vec<usize> = ws.iter().scan(0, |at, w| Some(std::mem::replace(at, *at + w.n))).collect();
    let strips = ws.iter().map(|w| w.n).sum::<usize>() / TILE;
    let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; rows * w.n]).collect();
    let outputs: Vec<Columns> = ys.iter_mut().zip(ws).map(|(y, w)| Columns::new(y, w.n)).collect();
    let mut claimed = vec![(); strips];
    work_split::for_each_chunk(strips, CHUNK_STRIPS, &mut claimed, 1, |chunk, _| {
        let _config = T::configure();
        // Per strip: signed quants [16, stride], scales and minimums [16, nb], results [16
        // features, rows].
        let (stride, nb) = (padded_blocks(k) * BLOCK, padded_blocks(k));
        let (mut strip, mut scales) = (vec![0i8; TILE * stride], Scales::new(TILE * nb));
        let mut block = vec![0f32; TILE * rows];
        for s in chunk {
            let f = s * TILE;
            let m = starts.partition_point(|&at| at <= f) - 1;
            let j = f - starts[m];
            // SAFETY: `available()` (AVX-512) was checked by the caller (or the test).
            unsafe { unpack_strip(ws[m], j, &mut strip, &mut scales) };
            let has_min = matches!(ws[m].format, BlockFormat::Q4_1 | BlockFormat::Q4K);
            let mins = has_min.then_some(&scales.min[..]);
            for g in 0..tiles.groups {
                let mut sums = Sums([[0f32; TILE]; TILE]);
                // SAFETY: as above; the strip and the tiles hold `nb` blocks.
                unsafe { strip_times_group::<T>(&strip, (&scales.scale, mins), &tiles, g, &mut sums) };
                for (fm, sums) in sums.0.iter().enumerate() {
                    let n = TILE.min(rows - g * TILE);
                    block[fm * rows + g * TILE..][..n].copy_from_slice(&sums[..n]);
                }
            }
            // SAFETY: strip s's features belong to this chunk alone (for_each_chunk).
            unsafe { outputs[m].write_columns(j, 0, &block, rows) };
        }
    });
    ys
}

/// A strip's per-block weight scales and minimums (`[16, nb]` each; `w = scale · q - min`).
struct Scales {
    scale: Vec<f32>,
    min: Vec<f32>,
}

impl Scales {
    fn new(len: usize) -> Self {
        Self { scale: vec![0f32; len], min: vec![0f32; len] }
    }
}

/// 16 × 16 values of a tile, aligned as `tilestored` prefers.
#[repr(C, align(64))]
struct Sums<T>([[T; TILE]; TILE]);

/// The tile instruction step: two blocks' 16 × 16 i32 sums.
trait TileMul {
    type Config;

    /// Prepares this thread's tiles for [`TileMul::product2`].
    fn configure() -> Self::Config;

    /// `c[h][m][n] = Σ_i a[m · a_stride + 32 h + i] · b[512 h + (i / 4) · 64 + 4 n + i % 4]`
    /// for `h < 2`, `m, n < 16`, `i < 32` (`tdpbssd` on a zeroed accumulator).
    ///
    /// # Safety
    /// `a` holds 16 rows of `a_stride` bytes (at least 64 each), `b` 1024 bytes, and
    /// [`TileMul::configure`] ran on this thread.
    unsafe fn product2(a: *const i8, a_stride: usize, b: *const i8, c: &mut [Sums<i32>; 2]);
}

/// Intel AMX: `tmm0`/`tmm3` sums, `tmm1`/`tmm4` weights (16 × 32 B), `tmm2`/`tmm5` activations
/// (8 × 64 B).
struct Amx;

impl TileMul for Amx {
    type Config = TileConfig;

    fn configure() -> TileConfig {
        TileConfig::load(&[(16, 64), (16, 32), (8, 64), (16, 64), (16, 32), (8, 64)])
    }

    unsafe fn product2(a: *const i8, a_stride: usize, b: *const i8, c: &mut [Sums<i32>; 2]) {
        // SAFETY: the contract above; the tiles' shapes were loaded by `configure`.
        unsafe {
            asm!(
                "tileloadd tmm1, [{a0} + {as_}*1]",
                "tileloadd tmm4, [{a1} + {as_}*1]",
                "tileloadd tmm2, [{b0} + {bs}*1]",
                "tileloadd tmm5, [{b1} + {bs}*1]",
                "tilezero tmm0",
                "tilezero tmm3",
                "tdpbssd tmm0, tmm1, tmm2",
                "tdpbssd tmm3, tmm4, tmm5",
                "tilestored [{c0} + {bs}*1], tmm0",
                "tilestored [{c1} + {bs}*1], tmm3",
                a0 = in(reg) a,
                a1 = in(reg) a.add(BLOCK),
                as_ = in(reg) a_stride,
                b0 = in(reg) b,
                b1 = in(reg) b.add(B_TILE),
                bs = in(reg) 64usize,
                c0 = in(reg) c[0].0.as_mut_ptr(),
                c1 = in(reg) c[1].0.as_mut_ptr(),
                options(nostack),
            );
        }
    }
}

/// `out[m][n]` = feature `m` of the strip times activation row `16 g + n`, over all blocks.
///
/// # Safety
/// AVX-512F and FMA; `strip` `[16, 32 · nb]`, `scales` (and `mins` where the format has them)
/// `[16, nb]` with `nb` = `tiles.nb`; [`TileMul::configure`] ran on this thread.
#[target_feature(enable = "avx512f,fma")]
unsafe fn strip_times_group<T: TileMul>(
    strip: &[i8],
    (scales, mins): (&[f32], Option<&[f32]>),
    tiles: &TileActs,
    g: usize,
    out: &mut Sums<f32>,
) {
    let nb = tiles.nb;
    let stride = nb * BLOCK;
    assert!(strip.len() >= TILE * stride && scales.len() >= TILE * nb, "a strip of 16 rows of nb blocks");
    assert!(mins.is_none_or(|m| m.len() >= TILE * nb), "minimums as the scales");
    let mut acc = [_mm512_setzero_ps(); TILE];
    let mut c = [Sums([[0i32; TILE]; TILE]), Sums([[0i32; TILE]; TILE])];
    for b in (0..nb).step_by(2) {
        // SAFETY: blocks b, b + 1 of 16 strip rows and of the row group's tiles are in bounds.
        unsafe {
            T::product2(
                strip.as_ptr().add(b * BLOCK),
                stride,
                tiles.tiles(g, b)[..2 * B_TILE].as_ptr(),
                &mut c,
            )
        };
        for (h, c) in c.iter().enumerate() {
            // SAFETY: 16 scales per (group, block); `c` rows are 16 i32.
            let d_x = unsafe { _mm512_loadu_ps(tiles.scales(g, b + h).as_ptr()) };
            let dx_sums = unsafe { _mm512_loadu_ps(tiles.dx_sums(g, b + h).as_ptr()) };
            for (m, acc) in acc.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(_mm512_set1_ps(scales[m * nb + b + h]), d_x);
                let sums = unsafe { _mm512_cvtepi32_ps(_mm512_load_si512(c.0[m].as_ptr().cast())) };
                *acc = _mm512_fmadd_ps(sums, scale, *acc);
                if let Some(mins) = mins {
                    *acc = _mm512_fnmadd_ps(_mm512_set1_ps(mins[m * nb + b + h]), dx_sums, *acc);
                }
            }
        }
    }
    for (o, acc) in out.0.iter_mut().zip(acc) {
        // SAFETY: 16 f32 per row.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), acc) };
    }
}

/// Features `j..j + 16` of `w` into `strip` as signed quants (block `b` of feature `m` at
/// `m · stride + 32 b`, `stride` = `strip.len() / 16`) and their scales and minimums into
/// `scales` (`[16, nb]` f32 each). Blocks past `w`'s are left as they are (zeros).
///
/// # Safety
/// AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn unpack_strip(w: &PackedMatrix, j: usize, strip: &mut [i8], scales: &mut Scales) {
    let (stride, nb) = (strip.len() / TILE, scales.scale.len() / TILE);
    let real = w.k / BLOCK;
    assert!(real <= nb && nb * BLOCK <= stride && j + TILE <= w.n, "strip within the matrix");
    for m in 0..TILE {
        let (qs, d) = (w.row_qs(j + m), w.row_d(j + m));
        let (scale, min) = (&mut scales.scale[m * nb..][..real], &mut scales.min[m * nb..][..real]);
        if matches!(w.format, BlockFormat::Q4_1 | BlockFormat::Q4K) {
            for (b, (s, mn)) in scale.iter_mut().zip(min).enumerate() {
                (*s, *mn) = w.block_scale(j + m, b);
            }
        } else {
            for (o, bits) in scale.chunks_mut(16).zip(d.chunks(16)) {
                let lanes = ((1u32 << bits.len()) - 1) as u16;
                // SAFETY: `bits.len()` (≤ 16) values read and written.
                unsafe {
                    let v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, bits.as_ptr().cast()));
                    _mm512_mask_storeu_ps(o.as_mut_ptr(), lanes, v);
                }
            }
        }
        for g in 0..real.div_ceil(GROUP_BLOCKS) {
            let out = &mut strip[m * stride + g * GROUP_BLOCKS * BLOCK..]
                [..BLOCK * GROUP_BLOCKS.min(real - g * GROUP_BLOCKS)];
            // SAFETY: the caller's features; the group lies within the row.
            unsafe { unpack_group(w.format, qs, real, g, out) };
        }
    }
}

/// Group `g` of a packed row (`nb` blocks) into `out`: its `t` blocks' 32 signed quants each, in
/// order (`out.len()` = `32 t`).
///
/// # Safety
/// AVX-512F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_group(format: BlockFormat, qs: &[u8], nb: usize, g: usize, out: &mut [i8]) {
    let t = GROUP_BLOCKS.min(nb - g * GROUP_BLOCKS);
    assert_eq!(out.len(), BLOCK * t, "one group's blocks");
    let start = g * GROUP_BLOCKS * format.quant_bytes();
    assert!(start + t * format.quant_bytes() <= qs.len(), "group within the row");
    let run = 4 * t;
    let bytes: __mmask64 = if t == GROUP_BLOCKS { !0 } else { (1u64 << run) - 1 };
    // Run p: dword `b` holds values 4p..4p + 4 of block b (see `layout`), made signed.
    let mut runs = [_mm512_setzero_si512(); 8];
    // SAFETY (loads): `run` bytes from each run's start, all within the group (asserted above).
    match format {
        BlockFormat::Q8_0 => {
            for (p, r) in runs.iter_mut().enumerate() {
                let v = unsafe { _mm512_maskz_loadu_epi8(bytes, qs.as_ptr().add(start + run * p).cast()) };
                *r = _mm512_xor_si512(v, _mm512_set1_epi8(i8::MIN));
            }
        }
        BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q4K => {
            // q4_0's nibbles are offset by 8; the others' are not (their minimum is apart).
            let offset = _mm512_set1_epi8(if format == BlockFormat::Q4_0 { 8 } else { 0 });
            let nibble = _mm512_set1_epi8(0x0F);
            for v in 0..4 {
                let x = unsafe { _mm512_maskz_loadu_epi8(bytes, qs.as_ptr().add(start + run * v).cast()) };
                runs[2 * v] = _mm512_sub_epi8(_mm512_and_si512(x, nibble), offset);
                runs[2 * v + 1] =
                    _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<4>(x), nibble), offset);
            }
        }
    }
    for (pair, v) in transpose_8x16(runs).into_iter().enumerate().take(t.div_ceil(2)) {
        // Blocks 2·pair and 2·pair + 1 (only the first when it is the group's last).
        let keep: __mmask64 = if 2 * pair + 1 < t { !0 } else { u32::MAX as u64 };
        // SAFETY: the kept bytes are blocks < t of `out`.
        unsafe { _mm512_mask_storeu_epi8(out.as_mut_ptr().add(2 * pair * BLOCK).cast(), keep, v) };
    }
}

/// Dwords `r[p][b]` (8 × 16) to block order: output `j` holds `r[0..8][2j]` then `r[0..8][2j + 1]`.
#[target_feature(enable = "avx512f")]
fn transpose_8x16(r: [__m512i; 8]) -> [__m512i; 8] {
    let idx = |v: [i64; 8]| _mm512_set_epi64(v[7], v[6], v[5], v[4], v[3], v[2], v[1], v[0]);
    // Dword pairs: (r[2i][b], r[2i + 1][b]) as qword b % 8, blocks 0..8 (`low`) and 8..16 (`high`).
    let pairs = |half: i32| {
        let lanes: [i32; 16] =
            std::array::from_fn(|l| (l / 2) as i32 + 8 * half + if l % 2 == 1 { 16 } else { 0 });
        let i = _mm512_set_epi32(
            lanes[15], lanes[14], lanes[13], lanes[12], lanes[11], lanes[10], lanes[9], lanes[8], lanes[7],
            lanes[6], lanes[5], lanes[4], lanes[3], lanes[2], lanes[1], lanes[0],
        );
        [0, 1, 2, 3].map(|i2| _mm512_permutex2var_epi32(r[2 * i2], i, r[2 * i2 + 1]))
    };
    let mut out = [_mm512_setzero_si512(); 8];
    for (half, p) in [pairs(0), pairs(1)].into_iter().enumerate() {
        // Qword interleave: 128-bit lane c of `quad[s][q]` = runs 4q..4q + 4 of block 4s + c.
        let quad = |s: i64| {
            let i =
                idx([4 * s, 8 + 4 * s, 4 * s + 1, 9 + 4 * s, 4 * s + 2, 10 + 4 * s, 4 * s + 3, 11 + 4 * s]);
            [_mm512_permutex2var_epi64(p[0], i, p[1]), _mm512_permutex2var_epi64(p[2], i, p[3])]
        };
        for s in 0..2 {
            let [lo, hi] = quad(s);
            // Block 4s + c = runs 0..4 (lane c of lo) then runs 4..8 (lane c of hi).
            for c2 in 0..2i64 {
                let i = idx([
                    4 * c2,
                    4 * c2 + 1,
                    8 + 4 * c2,
                    9 + 4 * c2,
                    4 * c2 + 2,
                    4 * c2 + 3,
                    10 + 4 * c2,
                    11 + 4 * c2,
                ]);
                out[4 * half + 2 * s as usize + c2 as usize] = _mm512_permutex2var_epi64(lo, i, hi);
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "amx_tests.rs"]
mod tests;
