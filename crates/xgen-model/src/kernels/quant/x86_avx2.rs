//! AVX2 kernel (with FMA and F16C) for the quantized product on x86 CPUs without AVX-512 VNNI
//! (AMD Zen 2/3, most Intel client cores): any [`Tile`] of 1 to 8 activation rows, so decode
//! steps, verify steps and prompt tiles all run here, each weight run loaded and unpacked once
//! for all the tile's rows.
//!
//! The packed layout ([`super::layout`]) is made for 16 i32 lanes; a 256-bit register takes half
//! a group: lanes `0..8` are blocks `8h..8h + 8` of the group (bytes `32h..32h + 32` of every
//! run). AVX2 has no `vpdpbusd`; `vpmaddubsw` (u8 × i8, pairs summed to i16) then `vpmaddwd` with
//! ones gives the same 4 products per i32 lane:
//! - q4_0, q4_1, q4_k: nibbles (0..=15) times activations (|x| ≤ 127: [`Activations`] scales each
//!   block by its maximum over 127) give at most 3810 per i16 pair, so a half group's 8 products
//!   (4 runs × low and high nibbles) are summed in i16 (at most 30480) before one `vpmaddwd`.
//!   q4_0's offset comes off as `- 8 · Σ x` per block.
//! - q8_0: the stored `q + 128` times x would overflow i16; as llama.cpp's AVX2 path,
//!   `|q|` × `x · sign(q)` (at most 2 · 128 · 127 per pair), summed to i32 per run.
//!
//! Then per half group and (weight row, activation row) one `acc += f32(sum) · (d_w · d_x)` (and
//! `acc -= min_w · d_x·Σ x` for q4_1/q4_k), reduced across lanes at the end. The integer sums are
//! exact and the float operations per (weight row, activation row) do not depend on the tile's
//! other rows, so a verify step's rows equal one-row steps bit for bit (tested in `tests.rs`).
//! A pass takes 4 weight rows and 1 or 2 activation rows, or 2 weight rows and 3 or 4 (`WR · R ≤
//! 8` i16/i32 sums), so the sums, one unpacked weight run and the constants fit the 16 registers.

use std::arch::x86_64::*;

use super::{
    kernel::Tile,
    layout::GROUP_BLOCKS,
    x86::{has_min, Operands, Q4K, Q4_0, Q4_1, Q8_0},
    Activations, BlockFormat, PackedMatrix, BLOCK,
};

/// Blocks per 256-bit register: half a group.
const HALF: usize = GROUP_BLOCKS / 2;

pub(super) fn available() -> bool {
    crate::kernels::has_avx2()
}

/// Widest `k` whose products take 3 or 4 activation rows per pass (their activations, 4 × k
/// bytes, stay in L1 beside the weight runs).
const NARROW_K: usize = 2048;

/// One [`Tile`] (1 to 8 activation rows, up to 4 weight rows) on the AVX2 kernel. Activation rows
/// go in pairs against 4 weight rows at a time (8 sums; the weight rows stay in L1 for the next
/// pair); on narrow matrices (`k` ≤ [`NARROW_K`]) in fours, an odd count's first three together,
/// against 2 weight rows (8 or 6 sums).
/// 8-row steps of the 8-layer 7B: pairs 200-201 ms (q4_0), 200-214 (q8_0); fours 198-200 and
/// 213-219; all 8 rows against one weight row at a time 211-218 and 236-248 (their activations,
/// 8 × 4 KB and more, did not stay in L1). On SmolLM2 (k = 576 and 1536), pairs and a lone row
/// unpacked each weight run for too few products: 3, 4 and 8 rows cost 1.81x, 1.99x and 3.44x a
/// 1-row step at depth 64, against 1.31x, 1.55x and 2.83x in threes and fours (the 7B's
/// products, k = 4096 and 11008, within noise either way, so they keep pairs).
pub(super) fn tile(w: &PackedMatrix, acts: &Activations, t: Tile, out: &mut [f32]) {
    debug_assert!((1..=8).contains(&t.r), "AVX2 tiles take 1 to 8 rows");
    let narrow = w.k <= NARROW_K;
    let mut done = 0;
    while done < t.r {
        let left = t.r - done;
        let r = match left {
            _ if !narrow || left < 3 => left.min(2),
            _ if left.is_multiple_of(4) => 4,
            _ if left % 2 == 1 => 3,
            _ => 2,
        };
        let part = Tile { first: t.first + done, r, ..t };
        let out = &mut out[done..];
        macro_rules! format {
            ($f:expr) => {
                match r {
                    4 => pass::<2, 4, { $f }>(w, acts, part, out),
                    3 => pass::<2, 3, { $f }>(w, acts, part, out),
                    2 => pass::<4, 2, { $f }>(w, acts, part, out),
                    _ => pass::<4, 1, { $f }>(w, acts, part, out),
                }
            };
        }
        match w.format {
            BlockFormat::Q8_0 => format!(Q8_0),
            BlockFormat::Q4_0 => format!(Q4_0),
            BlockFormat::Q4_1 => format!(Q4_1),
            BlockFormat::Q4K => format!(Q4K),
        }
        done += r;
    }
}

/// The tile's `R` activation rows against its weight rows, `WR` at a time (the rest one by one).
fn pass<const WR: usize, const R: usize, const F: u8>(
    w: &PackedMatrix,
    acts: &Activations,
    t: Tile,
    out: &mut [f32],
) {
    let mut i = 0;
    while i < t.wr {
        let out = &mut out[i * t.stride..];
        // SAFETY: `available()` was checked by the caller (kernel::pick); every pointer stays
        // within the rows' quants and activations (shapes checked in kernel::matmul).
        unsafe {
            if t.wr - i >= WR {
                rows::<WR, R, F>(w, t.j + i, acts, t.first, out, t.stride, t.groups);
                i += WR;
            } else {
                rows::<1, R, F>(w, t.j + i, acts, t.first, out, t.stride, t.groups);
                i += 1;
            }
        }
    }
}

/// `WR` weight rows from `j` times `R` activation rows from `first` over the groups of 16 blocks
/// `groups.0..groups.1`; `out[i · stride + r]` gains weight row `j + i` times row `first + r`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    let block_bytes = w.format.quant_bytes();
    let Operands { qs, wd, extra, xq, xd, xsum } = Operands::<WR, R>::new(w, j, acts, first);
    let ones = _mm256_set1_epi16(1);
    let nibble = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(i8::MIN);
    let mut acc = [[_mm256_setzero_ps(); R]; WR];

    // Blocks b0..b0 + lanes of the group at g0 (the half from block b0 = g0 + 8h), whose runs
    // are `run` bytes apart; `$full`: 8 lanes (plain loads), else masked loads.
    macro_rules! half {
        ($g0:expr, $h:expr, $run:expr, $lanes:expr, $full:literal) => {{
            let (g0, h, run, lanes) = ($g0, $h, $run, $lanes);
            let b0 = g0 + HALF * h;
            let mask = if $full {
                _mm256_set1_epi32(-1)
            } else {
                _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
            };
            // SAFETY (every load here): the half's runs, scales and sums lie within their rows;
            // masked loads touch only the selected lanes.
            macro_rules! load {
                ($p:expr) => {
                    if $full {
                        _mm256_loadu_si256($p.cast())
                    } else {
                        _mm256_maskload_epi32($p.cast(), mask)
                    }
                };
            }
            // Eight f16 values (scales or minimums) of the half, widened.
            macro_rules! halves {
                ($p:expr) => {{
                    let p: *const u16 = $p;
                    let bits = if $full {
                        _mm_loadu_si128(p.cast())
                    } else {
                        let mut b = [0u16; HALF];
                        std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), lanes);
                        _mm_loadu_si128(b.as_ptr().cast())
                    };
                    bits
                }};
            }
            let weight = |i: usize, u: usize| qs[i].wrapping_add(g0 * block_bytes + run * u + 32 * h);
            let x = |r: usize, u: usize| xq[r].wrapping_add(g0 * BLOCK + run * u + 32 * h);
            // (Loops, not closures, around intrinsics: closures do not inherit target features.)
            // Σ x per block: q4_0's offset and the minimums (q8_0 has neither).
            let mut sums = [_mm256_setzero_si256(); R];
            if F != Q8_0 {
                for r in 0..R {
                    sums[r] = load!(xsum[r].add(b0));
                }
            }
            // The blocks' exact integer dot products per (weight row, activation row).
            let mut sum = [[_mm256_setzero_si256(); R]; WR];
            if F == Q8_0 {
                for u in 0..8 {
                    for i in 0..WR {
                        let q = _mm256_xor_si256(load!(weight(i, u)), flip);
                        let magnitude = _mm256_abs_epi8(q);
                        for r in 0..R {
                            let p = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(load!(x(r, u)), q));
                            sum[i][r] = _mm256_add_epi32(sum[i][r], _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            } else {
                let mut pairs = [[_mm256_setzero_si256(); R]; WR];
                for v in 0..4 {
                    for i in 0..WR {
                        let packed = load!(weight(i, v));
                        let low = _mm256_and_si256(packed, nibble);
                        let high = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), nibble);
                        for r in 0..R {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(low, load!(x(r, 2 * v))),
                                _mm256_maddubs_epi16(high, load!(x(r, 2 * v + 1))),
                            );
                            pairs[i][r] = _mm256_add_epi16(pairs[i][r], p);
                        }
                    }
                }
                for i in 0..WR {
                    for r in 0..R {
                        sum[i][r] = _mm256_madd_epi16(pairs[i][r], ones);
                        if F == Q4_0 {
                            sum[i][r] = _mm256_sub_epi32(sum[i][r], _mm256_slli_epi32::<3>(sums[r]));
                        }
                    }
                }
            }
            // The activations' scales, and d_x · Σ x per block for the minimums.
            let (mut d_x, mut dx_sums) = ([_mm256_setzero_ps(); R], [_mm256_setzero_ps(); R]);
            for r in 0..R {
                d_x[r] = if $full {
                    _mm256_loadu_ps(xd[r].add(b0))
                } else {
                    _mm256_maskload_ps(xd[r].add(b0), mask)
                };
                if has_min(F) {
                    dx_sums[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(sums[r]), d_x[r]);
                }
            }
            for i in 0..WR {
                let bits = halves!(wd[i].add(b0));
                // The weights' scale and minimum per block (`w = d_w · q - min_w`).
                let (d_w, min_w) = match F {
                    Q4K => {
                        // One super-block (8 blocks): its `D`, `M` times each block's `s`, `m`.
                        let sd = extra[i].add(2 * (b0 / HALF));
                        let f16 = |p: *const u16| half::f16::from_bits(p.read()).to_f32();
                        let pairs = _mm256_cvtepu16_epi32(bits);
                        let s = _mm256_cvtepi32_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(0xFF)));
                        let m = _mm256_cvtepi32_ps(_mm256_srli_epi32::<8>(pairs));
                        (
                            _mm256_mul_ps(s, _mm256_set1_ps(f16(sd))),
                            _mm256_mul_ps(m, _mm256_set1_ps(f16(sd.add(1)))),
                        )
                    }
                    Q4_1 => {
                        let m = _mm256_cvtph_ps(halves!(extra[i].add(b0)));
                        (_mm256_cvtph_ps(bits), _mm256_sub_ps(_mm256_setzero_ps(), m))
                    }
                    _ => (_mm256_cvtph_ps(bits), _mm256_setzero_ps()),
                };
                for r in 0..R {
                    acc[i][r] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i][r]), _mm256_mul_ps(d_w, d_x[r]), acc[i][r]);
                    if has_min(F) {
                        acc[i][r] = _mm256_fnmadd_ps(min_w, dx_sums[r], acc[i][r]);
                    }
                }
            }
        }};
    }

    for g in groups.0..groups.1.min(nb.div_ceil(GROUP_BLOCKS)) {
        let g0 = g * GROUP_BLOCKS;
        let t = GROUP_BLOCKS.min(nb - g0);
        // SAFETY: blocks g0..g0 + t lie within the rows (g0 < nb).
        unsafe {
            if t == GROUP_BLOCKS {
                half!(g0, 0, 4 * t, HALF, true);
                half!(g0, 1, 4 * t, HALF, true);
            } else {
                half!(g0, 0, 4 * t, t.min(HALF), false);
                if t > HALF {
                    half!(g0, 1, 4 * t, t - HALF, false);
                }
            }
        }
    }
    for i in 0..WR {
        for r in 0..R {
            out[i * stride + r] += sum_lanes(acc[i][r]);
        }
    }
}

/// The 8 lanes of `v` added: halves, then pairs, then the last two.
#[target_feature(enable = "avx2")]
fn sum_lanes(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// [`super::activations::quantize_row_any`] on AVX2: one block of 32 values per four registers,
/// the same operations per value (so the same quants, scales and sums).
///
/// # Safety
/// The CPU has the features of [`available`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row(x: &[f32], g: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    let nb = x.len() / BLOCK;
    assert!(g.len() == x.len() && d.len() == nb && sums.len() == nb, "row buffers of one width");
    let (sign, magnitude) = (_mm256_set1_ps(-0.0), _mm256_set1_ps(f32::from_bits(0x7FFF_FFFF)));
    let (one, half) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
    for b in 0..nb {
        let (gi, lane) = (b / GROUP_BLOCKS, b % GROUP_BLOCKS);
        let t = GROUP_BLOCKS.min(nb - gi * GROUP_BLOCKS);
        let mut v = [_mm256_setzero_ps(); 4];
        let mut amax = _mm256_setzero_ps();
        for (h, v) in v.iter_mut().enumerate() {
            // SAFETY: block b's 32 values lie within `x` (b < nb).
            *v = unsafe { _mm256_loadu_ps(x.as_ptr().add(b * BLOCK + 8 * h)) };
            amax = _mm256_max_ps(amax, _mm256_and_ps(*v, magnitude));
        }
        let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps::<1>(amax));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        d[b] = half::f16::from_f32(scale).to_f32();
        let mut q = [_mm256_setzero_si256(); 4];
        let mut total = _mm256_setzero_si256();
        for h in 0..4 {
            // Round half away from zero: trunc, then one step away where |frac| >= 0.5.
            let y = _mm256_mul_ps(v[h], inv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(_mm256_sub_ps(y, t), magnitude), half);
            let step = _mm256_or_ps(_mm256_and_ps(y, sign), one);
            q[h] = _mm256_cvttps_epi32(_mm256_blendv_ps(t, _mm256_add_ps(t, step), away));
            total = _mm256_add_epi32(total, q[h]);
        }
        let s = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        sums[b] = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
        // 32 i32 (|q| ≤ 127) to bytes in order: the packs interleave 128-bit lanes, the permute
        // puts the four-byte runs back.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let mut runs = [0u32; 8];
        // SAFETY: 32 bytes into the 32 of `runs`.
        unsafe { _mm256_storeu_si256(runs.as_mut_ptr().cast(), bytes) };
        let group = &mut g[gi * GROUP_BLOCKS * BLOCK..];
        for (u, four) in runs.iter().enumerate() {
            let at = 4 * t * u + 4 * lane;
            // SAFETY: `at + 4` lies within the group's `32 t` bytes (u < 8, lane < t).
            unsafe { group.as_mut_ptr().add(at).cast::<u32>().write_unaligned(*four) };
        }
    }
}
