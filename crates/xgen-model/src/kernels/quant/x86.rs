//! AVX-512 VNNI kernels for the quantized product: up to 4 weight rows against up to
//! [`GROUP`](super::kernel::GROUP) activation rows, one group of 16 blocks per step.
//!
//! In the packed layout ([`super::layout`]) each 64-byte run of a group holds 4 quants of each of
//! its 16 blocks, so `vpdpbusd` (u8 weight × i8 activation, 4 products summed per i32 lane) adds
//! block `b`'s products into lane `b`. Lane `b` starts at `-offset · Σ x` over block `b` (the
//! weights' unsigned offset: 128 for q8_0, 8 for q4_0), so after the group's 8 runs it holds the
//! block's exact integer dot product: one conversion and one FMA with `d_w · d_x` per 16 blocks,
//! no shuffles. A q4_0 run is one load, then a mask (runs `2v`) or a shift and a mask (`2v + 1`).
//! q4_1 and q4_k run as q4_0 with no offset, their minimums one more FMA per 16 blocks
//! (`- min · d_x·Σ x`); q4_k's scales (`D·s`, `M·m`) come from the 6-bit integers per group and row.
//!
//! Performance notes (`cargo bench -p xgen-model --bench quant`): the earlier layout (block pairs
//! per register, scales spread by a permute per pair, q8_0's offset removed per weight vector) did
//! 2-3x the vector work per byte and capped q4_0 at the compute of two cores. Four weight rows per
//! tile keep four streams in flight and share the activation loads; a software prefetch of the next
//! tile's rows (to L2) carries the streams across pages; a short one into L1 covers the current rows.

use std::arch::x86_64::*;

use super::{kernel::Tile, layout::GROUP_BLOCKS, Activations, BlockFormat, PackedMatrix, BLOCK};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Bytes ahead of the current pair fetched into L1.
const L1_AHEAD: usize = 256;

/// [`rows`]' const format parameter (const generics take no enums on stable Rust).
pub(super) const Q8_0: u8 = 0;
pub(super) const Q4_0: u8 = 1;
pub(super) const Q4_1: u8 = 2;
pub(super) const Q4K: u8 = 3;

/// Whether format `f` has minimums (and so no offset in its quants).
pub(super) const fn has_min(f: u8) -> bool {
    f == Q4_1 || f == Q4K
}

/// Where a kernel reads: `WR` weight rows from `j` (quants, scales, minimums) and `R` activation
/// rows from `first` (grouped quants, scales, sums per block).
pub(super) struct Operands<const WR: usize, const R: usize> {
    pub qs: [*const u8; WR],
    pub wd: [*const u16; WR],
    pub extra: [*const u16; WR],
    pub xq: [*const i8; R],
    pub xd: [*const f32; R],
    pub xsum: [*const i32; R],
}

impl<const WR: usize, const R: usize> Operands<WR, R> {
    pub(super) fn new(w: &PackedMatrix, j: usize, acts: &Activations, first: usize) -> Self {
        Self {
            qs: std::array::from_fn(|i| w.row_qs(j + i).as_ptr()),
            wd: std::array::from_fn(|i| w.row_d(j + i).as_ptr()),
            extra: std::array::from_fn(|i| w.row_extra(j + i).as_ptr()),
            xq: std::array::from_fn(|r| acts.row_grouped(first + r).as_ptr()),
            xd: std::array::from_fn(|r| acts.row_d(first + r).as_ptr()),
            xsum: std::array::from_fn(|r| acts.row_sums(first + r).as_ptr()),
        }
    }
}

/// One [`Tile`] (see its docs) on the SIMD kernels.
pub(super) fn tile(w: &PackedMatrix, acts: &Activations, t: Tile, out: &mut [f32]) {
    let Tile { j, wr, first, r, stride, groups } = t;
    macro_rules! go {
        ($wr:literal, $f:expr, $j:expr, $out:expr) => {
            // SAFETY: `available()` was checked by the caller (kernel::pick); every pointer below
            // stays within the rows' quants and activations (shapes checked in kernel::matmul).
            unsafe {
                match r {
                    1 => rows::<$wr, 1, { $f }>(w, $j, acts, first, $out, stride, groups),
                    2 => rows::<$wr, 2, { $f }>(w, $j, acts, first, $out, stride, groups),
                    3 => rows::<$wr, 3, { $f }>(w, $j, acts, first, $out, stride, groups),
                    _ => rows::<$wr, 4, { $f }>(w, $j, acts, first, $out, stride, groups),
                }
            }
        };
    }
    macro_rules! format {
        ($f:expr) => {
            if wr == 4 {
                go!(4, $f, j, out)
            } else {
                (0..wr).for_each(|i| go!(1, $f, j + i, &mut out[i * stride..]))
            }
        };
    }
    match w.format {
        BlockFormat::Q8_0 => format!(Q8_0),
        BlockFormat::Q4_0 => format!(Q4_0),
        BlockFormat::Q4_1 => format!(Q4_1),
        BlockFormat::Q4K => format!(Q4K),
    }
}

/// `WR` weight rows from `j` (or one, `j` shifted by the caller's loop) times `R` activation
/// rows; `F` is the weights' format ([`Q8_0`], [`Q4_0`], [`Q4_1`], [`Q4K`]).
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
    let next_scales: *const u8 = w.d.as_ptr().wrapping_add((j + WR) * nb).cast();
    // Two accumulator chains per (weight row, activation row) when there are few of them, so
    // `vpdpbusd`'s latency stays hidden.
    let split = WR * R <= 8;
    let minus_offset = _mm512_set1_epi32(if F == Q8_0 { -128 } else { -8 });
    let nibble = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); R]; WR];

    // The group of blocks `g0..g0 + t`; `$full`: t = 16 (plain loads), else masked loads.
    macro_rules! group {
        ($g0:expr, $full:literal) => {{
            let g0 = $g0;
            let t = if $full { GROUP_BLOCKS } else { nb - g0 };
            let run = 4 * t;
            let lanes: __mmask16 = if $full { !0 } else { ((1u32 << t) - 1) as u16 };
            let bytes: __mmask64 = if $full { !0 } else { (1u64 << run) - 1 };
            // SAFETY (every load here): runs, scales and sums of blocks g0..g0 + t lie within
            // their rows; masked loads touch only the selected bytes.
            let load = |p: *const u8| unsafe {
                if $full {
                    _mm512_loadu_si512(p.cast())
                } else {
                    _mm512_maskz_loadu_epi8(bytes, p.cast())
                }
            };
            let weight_run = |i: usize, at: usize| {
                let p = qs[i].wrapping_add(g0 * block_bytes + run * at);
                if $full {
                    // The same place in the next tile's rows (to L2), and ahead in this row.
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(WR * row_bytes).cast());
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(L1_AHEAD).cast());
                }
                load(p)
            };
            let x_run = |r: usize, u: usize| load(xq[r].wrapping_add(g0 * BLOCK + run * u).cast());
            let start: [__m512i; R] = std::array::from_fn(|r| unsafe {
                if has_min(F) {
                    _mm512_setzero_si512()
                } else {
                    _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(lanes, xsum[r].add(g0).cast()), minus_offset)
                }
            });
            let mut sum = [start; WR];
            let mut sum2 = [[_mm512_setzero_si512(); R]; WR];
            // Runs in pairs: the second of each goes to the second chain when `split`.
            let mut add = |i: usize, r: usize, first: (__m512i, __m512i), second: (__m512i, __m512i)| {
                sum[i][r] = _mm512_dpbusd_epi32(sum[i][r], first.0, first.1);
                if split {
                    sum2[i][r] = _mm512_dpbusd_epi32(sum2[i][r], second.0, second.1);
                } else {
                    sum[i][r] = _mm512_dpbusd_epi32(sum[i][r], second.0, second.1);
                }
            };
            for v in 0..4 {
                let x0: [__m512i; R] = std::array::from_fn(|r| x_run(r, 2 * v));
                let x1: [__m512i; R] = std::array::from_fn(|r| x_run(r, 2 * v + 1));
                for i in 0..WR {
                    let (w0, w1) = if F == Q8_0 {
                        (weight_run(i, 2 * v), weight_run(i, 2 * v + 1))
                    } else {
                        let packed = weight_run(i, v);
                        (
                            _mm512_and_si512(packed, nibble),
                            _mm512_and_si512(_mm512_srli_epi16::<4>(packed), nibble),
                        )
                    };
                    for r in 0..R {
                        add(i, r, (w0, x0[r]), (w1, x1[r]));
                    }
                }
            }
            let d_x: [__m512; R] =
                std::array::from_fn(|r| unsafe { _mm512_maskz_loadu_ps(lanes, xd[r].add(g0)) });
            // d_x · Σ x per block, for the minimums.
            let dx_sums: [__m512; R] = std::array::from_fn(|r| {
                if has_min(F) {
                    let sums = unsafe { _mm512_maskz_loadu_epi32(lanes, xsum[r].add(g0).cast()) };
                    _mm512_mul_ps(_mm512_cvtepi32_ps(sums), d_x[r])
                } else {
                    _mm512_setzero_ps()
                }
            });
            for i in 0..WR {
                let bits = unsafe { _mm256_maskz_loadu_epi16(lanes, wd[i].add(g0).cast()) };
                // The weights' scale and minimum per block (`w = d_w · q - min_w`).
                let (d_w, min_w) = match F {
                    // SAFETY: the group's super-blocks (one per 8 blocks) lie within the row.
                    Q4K => unsafe { q4k_scales(bits, extra[i].add(2 * (g0 / 8)), t > 8) },
                    Q4_1 => {
                        // SAFETY: the group's minimums lie within the row.
                        let m = unsafe { _mm256_maskz_loadu_epi16(lanes, extra[i].add(g0).cast()) };
                        (_mm512_cvtph_ps(bits), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtph_ps(m)))
                    }
                    _ => (_mm512_cvtph_ps(bits), _mm512_setzero_ps()),
                };
                for r in 0..R {
                    let total = if split { _mm512_add_epi32(sum[i][r], sum2[i][r]) } else { sum[i][r] };
                    acc[i][r] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d_w, d_x[r]), acc[i][r]);
                    if has_min(F) {
                        acc[i][r] = _mm512_fnmadd_ps(min_w, dx_sums[r], acc[i][r]);
                    }
                }
            }
            // The next tile's scales (WR rows × nb f16, contiguous): this group's share.
            for at in (0..WR * 2 * GROUP_BLOCKS).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(next_scales.wrapping_add(g0 * WR * 2 + at).cast());
            }
        }};
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

/// q4_k's scales and minimums of a group of blocks, `(D·s, M·m)` per lane, from the blocks'
/// `s | m << 8` (`bits`, 16-bit lanes) and the super-block values at `sd` (`D, M` of the group's
/// first 8 blocks, then of the next 8 where `two`).
///
/// # Safety
/// `sd` holds 2 (4 where `two`) values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn q4k_scales(bits: __m256i, sd: *const u16, two: bool) -> (__m512, __m512) {
    // [D0, M0, D1, M1] (the second pair zero when absent), spread to lanes 0..8 and 8..16.
    let super_scales =
        _mm_cvtph_ps(unsafe { _mm_maskz_loadu_epi16(if two { 0b1111 } else { 0b11 }, sd.cast()) });
    let spread = |first: i32| {
        let (a, b) = (first, first + 2);
        _mm512_permutexvar_ps(
            _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a),
            _mm512_castps128_ps512(super_scales),
        )
    };
    let pairs = _mm512_cvtepu16_epi32(bits);
    let s = _mm512_cvtepi32_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFF)));
    let mins = _mm512_cvtepi32_ps(_mm512_srli_epi32::<8>(pairs));
    (_mm512_mul_ps(s, spread(0)), _mm512_mul_ps(mins, spread(1)))
}

/// [`super::activations::quantize_row_any`] on AVX-512: one block of 32 values per two registers.
///
/// # Safety
/// The CPU has the features of [`available`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn quantize_row(x: &[f32], g: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    let nb = x.len() / BLOCK;
    assert!(g.len() == x.len() && d.len() == nb && sums.len() == nb, "row buffers of one width");
    let sign = _mm512_set1_epi32(i32::MIN);
    let (one, half) = (_mm512_set1_ps(1.0), _mm512_set1_ps(0.5));
    for b in 0..nb {
        let (gi, lane) = (b / GROUP_BLOCKS, b % GROUP_BLOCKS);
        let t = GROUP_BLOCKS.min(nb - gi * GROUP_BLOCKS);
        // SAFETY: block b's 32 values lie within `x` (b < nb).
        let v = unsafe {
            [_mm512_loadu_ps(x.as_ptr().add(b * BLOCK)), _mm512_loadu_ps(x.as_ptr().add(b * BLOCK + 16))]
        };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        d[b] = half::f16::from_f32(scale).to_f32();
        let mut q = [_mm512_setzero_si512(); 2];
        // (A loop, not a closure: closures do not inherit this function's target features.)
        for h in 0..2 {
            // Round half away from zero: trunc, then one step away where |frac| >= 0.5.
            let y = _mm512_mul_ps(v[h], inv);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(y, t)), half);
            let y_sign = _mm512_and_epi32(_mm512_castps_si512(y), sign);
            let step = _mm512_castsi512_ps(_mm512_or_epi32(y_sign, _mm512_castps_si512(one)));
            q[h] = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step));
        }
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
        // Values 4u..4u + 4 of the block go to 4t·u + 4·lane of its group (see `layout`).
        let mut bytes = [0u32; 8];
        // SAFETY: 2 × 16 bytes into the 32 of `bytes`.
        unsafe {
            _mm_storeu_si128(bytes.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q[0]));
            _mm_storeu_si128(bytes.as_mut_ptr().add(4).cast(), _mm512_cvtepi32_epi8(q[1]));
        }
        let group = &mut g[gi * GROUP_BLOCKS * BLOCK..];
        for (u, four) in bytes.iter().enumerate() {
            let at = 4 * t * u + 4 * lane;
            // SAFETY: `at + 4` lies within the group's `32 t` bytes (u < 8, lane < t).
            unsafe { group.as_mut_ptr().add(at).cast::<u32>().write_unaligned(*four) };
        }
    }
}
