//! AVX-512 VNNI kernel for steps of a few activation rows (2 to 8: a speculative verify step, a
//! continuous-batching step): each weight run is loaded and unpacked once for all the rows, and
//! only the integer block sums live in registers.
//!
//! The numbers are [`super::x86`]'s, operation for operation per (weight row, activation row):
//! exact i32 block sums (started at `-offset · Σ x`), then per group of 16 blocks one
//! `acc += f32(sum) · (d_w · d_x)` (and `acc -= min_w · d_x·Σ x` for q4_1/q4_k), reduced across
//! lanes at the end. So a row's product is bit for bit the one-row decode step's, whatever the
//! other rows (tested in `tests.rs` and by the model's verify test).
//!
//! Why a second kernel: [`super::x86`]'s 4 × 4 tile holds 16 f32 accumulators and 16 i32 sums
//! (plus the activation runs of all rows) and spills; an 8-row step ran as two such tiles and
//! unpacked every weight run twice. Here the loop goes row by row inside a run (weights unpacked
//! once, kept in registers: `2 · WR`), the f32 accumulators stay in memory (touched once per
//! group), and 8 rows take weight rows in pairs. In-cache q4_0 `[4096, 4096]`: see
//! docs/performance.md ("Verify cost").

use std::arch::x86_64::*;

use super::{
    kernel::Tile,
    layout::GROUP_BLOCKS,
    x86::{has_min, q4k_scales, Operands, Q4K, Q4_0, Q4_1, Q8_0},
    Activations, BlockFormat, PackedMatrix, BLOCK,
};

/// One [`Tile`] of 2 to 8 activation rows (`t.r`) on the few-row kernel.
pub(super) fn tile(w: &PackedMatrix, acts: &Activations, t: Tile, out: &mut [f32]) {
    let Tile { j, wr, first, r, stride, groups } = t;
    macro_rules! go {
        ($wr:literal, $f:expr, $j:expr, $out:expr) => {
            // SAFETY: `x86::available()` was checked by the caller (kernel::pick); every pointer
            // stays within the rows' quants and activations (shapes checked in kernel::matmul).
            unsafe {
                match r {
                    2 => rows::<$wr, 2, { $f }>(w, $j, acts, first, $out, stride, groups),
                    3 => rows::<$wr, 3, { $f }>(w, $j, acts, first, $out, stride, groups),
                    4 => rows::<$wr, 4, { $f }>(w, $j, acts, first, $out, stride, groups),
                    5 => rows::<$wr, 5, { $f }>(w, $j, acts, first, $out, stride, groups),
                    6 => rows::<$wr, 6, { $f }>(w, $j, acts, first, $out, stride, groups),
                    7 => rows::<$wr, 7, { $f }>(w, $j, acts, first, $out, stride, groups),
                    _ => rows::<$wr, 8, { $f }>(w, $j, acts, first, $out, stride, groups),
                }
            }
        };
    }
    // Up to 4 rows: 4 weight rows per pass (16 sums); more: 2 (up to 16 sums).
    macro_rules! format {
        ($f:expr) => {{
            let mut i = 0;
            while i < wr {
                let out = &mut out[i * stride..];
                if r <= 4 && wr - i >= 4 {
                    go!(4, $f, j + i, out);
                    i += 4;
                } else if wr - i >= 2 {
                    go!(2, $f, j + i, out);
                    i += 2;
                } else {
                    go!(1, $f, j + i, out);
                    i += 1;
                }
            }
        }};
    }
    debug_assert!((2..=8).contains(&r), "few-row tiles take 2 to 8 rows");
    match w.format {
        BlockFormat::Q8_0 => format!(Q8_0),
        BlockFormat::Q4_0 => format!(Q4_0),
        BlockFormat::Q4_1 => format!(Q4_1),
        BlockFormat::Q4K => format!(Q4K),
    }
}

/// `WR` weight rows from `j` times `R` activation rows from `first`; `F` the weights' format.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const WR: usize, const R: usize, const F: u8>(
    w: &PackedMatrix,
    j: usize,
    acts: &Activations,
    first: usize,
    out: &mut [f32],
    stride: usize,
    groups: (usize, usize),
) {
    let nb = w.k / BLOCK;
    let (row_bytes, block_bytes) = (w.row_bytes(), w.format.quant_bytes());
    let Operands { qs, wd, extra, xq, xd, xsum } = Operands::<WR, R>::new(w, j, acts, first);
    // Two chains per sum when there are few of them, so `vpdpbusd`'s latency stays hidden.
    let split = WR * R <= 8;
    let minus_offset = _mm512_set1_epi32(if F == Q8_0 { -128 } else { -8 });
    let nibble = _mm512_set1_epi8(0x0F);
    // f32 accumulators, in memory: read and written once per group.
    let mut acc = [[_mm512_setzero_ps(); R]; WR];

    macro_rules! group {
        // SAFETY (the whole group): runs, scales and sums of blocks g0..g0 + t lie within their
        // rows; masked loads touch only the selected bytes.
        ($g0:expr, $full:literal) => {
            unsafe {
                let g0 = $g0;
                let t = if $full { GROUP_BLOCKS } else { nb - g0 };
                let run = 4 * t;
                let lanes: __mmask16 = if $full { !0 } else { ((1u32 << t) - 1) as u16 };
                let bytes: __mmask64 = if $full { !0 } else { (1u64 << run) - 1 };
                macro_rules! load {
                    ($p:expr) => {
                        if $full {
                            _mm512_loadu_si512($p.cast())
                        } else {
                            _mm512_maskz_loadu_epi8(bytes, $p.cast())
                        }
                    };
                }
                let mut sum = [[_mm512_setzero_si512(); R]; WR];
                let mut sum2 = [[_mm512_setzero_si512(); R]; WR];
                if !has_min(F) {
                    for r in 0..R {
                        let s = _mm512_maskz_loadu_epi32(lanes, xsum[r].add(g0).cast());
                        let start = _mm512_mullo_epi32(s, minus_offset);
                        for i in 0..WR {
                            sum[i][r] = start;
                        }
                    }
                }
                for v in 0..4 {
                    // This run of every weight row, unpacked once: (run 2v, run 2v + 1).
                    let mut wv = [(_mm512_setzero_si512(), _mm512_setzero_si512()); WR];
                    for i in 0..WR {
                        let at = |u: usize| qs[i].wrapping_add(g0 * block_bytes + run * u);
                        if $full {
                            // The same place in the next tile's rows (to L2), and ahead in this row.
                            _mm_prefetch::<_MM_HINT_T1>(at(v).wrapping_add(WR * row_bytes).cast());
                            _mm_prefetch::<_MM_HINT_T0>(at(v).wrapping_add(256).cast());
                        }
                        wv[i] = if F == Q8_0 {
                            (load!(at(2 * v)), load!(at(2 * v + 1)))
                        } else {
                            let packed = load!(at(v));
                            (
                                _mm512_and_si512(packed, nibble),
                                _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble),
                            )
                        };
                    }
                    for r in 0..R {
                        let x0 = load!(xq[r].wrapping_add(g0 * BLOCK + run * (2 * v)));
                        let x1 = load!(xq[r].wrapping_add(g0 * BLOCK + run * (2 * v + 1)));
                        for i in 0..WR {
                            sum[i][r] = _mm512_dpbusd_epi32(sum[i][r], wv[i].0, x0);
                            if split {
                                sum2[i][r] = _mm512_dpbusd_epi32(sum2[i][r], wv[i].1, x1);
                            } else {
                                sum[i][r] = _mm512_dpbusd_epi32(sum[i][r], wv[i].1, x1);
                            }
                        }
                    }
                }
                // The weights' scale and minimum per block (`w = d_w · q - min_w`), per weight row.
                let mut scales = [(_mm512_setzero_ps(), _mm512_setzero_ps()); WR];
                for (i, sc) in scales.iter_mut().enumerate() {
                    let bits = _mm256_maskz_loadu_epi16(lanes, wd[i].add(g0).cast());
                    *sc = match F {
                        // SAFETY: the group's super-blocks (one per 8 blocks) lie within the row.
                        Q4K => q4k_scales(bits, extra[i].add(2 * (g0 / 8)), t > 8),
                        Q4_1 => {
                            let m = _mm256_maskz_loadu_epi16(lanes, extra[i].add(g0).cast());
                            (_mm512_cvtph_ps(bits), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtph_ps(m)))
                        }
                        _ => (_mm512_cvtph_ps(bits), _mm512_setzero_ps()),
                    };
                }
                for r in 0..R {
                    let d_x = _mm512_maskz_loadu_ps(lanes, xd[r].add(g0));
                    // d_x · Σ x per block, for the minimums.
                    let dx_sum = if has_min(F) {
                        let sums = _mm512_maskz_loadu_epi32(lanes, xsum[r].add(g0).cast());
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums), d_x)
                    } else {
                        _mm512_setzero_ps()
                    };
                    for (i, &(d_w, min_w)) in scales.iter().enumerate() {
                        let total = if split { _mm512_add_epi32(sum[i][r], sum2[i][r]) } else { sum[i][r] };
                        acc[i][r] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d_w, d_x), acc[i][r]);
                        if has_min(F) {
                            acc[i][r] = _mm512_fnmadd_ps(min_w, dx_sum, acc[i][r]);
                        }
                    }
                }
            }
        };
    }

    let full = nb / GROUP_BLOCKS;
    for g in groups.0..groups.1.min(full) {
        group!(g * GROUP_BLOCKS, true);
    }
    if !nb.is_multiple_of(GROUP_BLOCKS) && (groups.0..groups.1).contains(&full) {
        group!(full * GROUP_BLOCKS, false);
    }
    for i in 0..WR {
        for r in 0..R {
            out[i * stride + r] += _mm512_reduce_add_ps(acc[i][r]);
        }
    }
}
