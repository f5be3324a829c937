//! AVX-512 VNNI kernels for the quantized product: one weight row against up to
//! [`GROUP`](super::kernel::GROUP) activation rows, 64 weights (a block pair) per step.
//!
//! Per block pair, `vpdpbusd` (u8 × i8, four products summed into each i32 lane) gives 16 lanes:
//! lanes 0..8 the first block's partial sums, lanes 8..16 the second's. They are converted to f32
//! and multiplied by `d_w · d_x` spread the same way, so no horizontal sum happens before the end.
//! - q8_0: the unsigned operand is the activation biased by 128 (`Activations::q_biased`); the
//!   bias is removed with `128 · Σ w` per lane, computed once per weight pair for all rows.
//! - q4_0: the unsigned operand is the weight nibble (0..=15); its offset of 8 is removed by
//!   starting the sum at `-8 · Σ x` per lane (`Activations::q4_offset`). One 64-byte load holds
//!   two block pairs (low nibbles, high nibbles).
//!
//! Performance notes (`cargo bench -p xgen-model --bench quant`): the loop is bound by memory, not
//! by these instructions. Four weight rows per tile keep four streams in flight and share the
//! activation loads; a software prefetch 4 KB ahead (to L2) carries the streams across pages.
//! Without them q8_0 read 15-16 GB/s on 2 threads, with both 20-22 (candle's repacked tiles: 24-26).

use std::arch::x86_64::*;

use super::{kernel::Tile, Activations, PackedMatrix, BLOCK};

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Bytes ahead of the current pair fetched into L1.
const L1_AHEAD: usize = 256;

/// Lane `l` of entry `c` selects scale `2c + l / 8` out of 16 loaded scales.
static PAIR_SCALE_INDEX: [[i32; 16]; 8] = pair_scale_index();

const fn pair_scale_index() -> [[i32; 16]; 8] {
    let mut table = [[0i32; 16]; 8];
    let mut c = 0;
    while c < 8 {
        let mut lane = 0;
        while lane < 16 {
            table[c][lane] = (2 * c + lane / 8) as i32;
            lane += 1;
        }
        c += 1;
    }
    table
}

/// One [`Tile`] (see its docs) on the SIMD kernels.
pub(super) fn tile(w: &PackedMatrix, acts: &Activations, t: Tile, out: &mut [f32]) {
    let Tile { j, wr, first, r, stride } = t;
    macro_rules! go {
        ($wr:literal, $q8:literal, $j:expr, $out:expr) => {
            // SAFETY: `available()` was checked by the caller (kernel::pick); every pointer below
            // stays within the rows' quants and activations (shapes checked in kernel::matmul).
            unsafe {
                match r {
                    1 => rows::<$wr, 1, $q8>(w, $j, acts, first, $out, stride),
                    2 => rows::<$wr, 2, $q8>(w, $j, acts, first, $out, stride),
                    3 => rows::<$wr, 3, $q8>(w, $j, acts, first, $out, stride),
                    _ => rows::<$wr, 4, $q8>(w, $j, acts, first, $out, stride),
                }
            }
        };
    }
    let q8 = w.format == super::BlockFormat::Q8_0;
    match (wr, q8) {
        (4, true) => go!(4, true, j, out),
        (4, false) => go!(4, false, j, out),
        (_, true) => (0..wr).for_each(|i| go!(1, true, j + i, &mut out[i * stride..])),
        (_, false) => (0..wr).for_each(|i| go!(1, false, j + i, &mut out[i * stride..])),
    }
}

/// `WR` weight rows from `j` (or one, `j` shifted by the caller's loop) times `R` activation
/// rows; `Q8` picks q8_0, else q4_0.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows<const WR: usize, const R: usize, const Q8: bool>(
    w: &PackedMatrix,
    j: usize,
    acts: &Activations,
    first: usize,
    out: &mut [f32],
    stride: usize,
) {
    let k = w.k;
    let (nb, pairs) = (k / BLOCK, k / (2 * BLOCK));
    let row_bytes = w.row_bytes();
    let qs: [*const u8; WR] = std::array::from_fn(|i| w.row_qs(j + i).as_ptr());
    let wd: [&[u16]; WR] = std::array::from_fn(|i| w.row_d(j + i));
    let x_unsigned: [*const u8; R] = std::array::from_fn(|r| acts.q_biased[(first + r) * k..].as_ptr());
    let x_signed: [*const i8; R] = std::array::from_fn(|r| acts.q[(first + r) * k..].as_ptr());
    let lanes_at = |r: usize| (first + r) * pairs * 16;
    let d_lanes: [*const f32; R] = std::array::from_fn(|r| acts.d_lanes[lanes_at(r)..].as_ptr());
    let offsets: [*const i32; R] = std::array::from_fn(|r| acts.q4_offset[lanes_at(r)..].as_ptr());
    let x_scales = acts.row_d(first).as_ptr();
    let next_scales = w.d.as_ptr().wrapping_add((j + WR) * nb);

    let mut acc = [[_mm512_setzero_ps(); R]; WR];
    let mut scales = [_mm512_setzero_ps(); WR]; // 16 block scales per weight row, f32
    let bias = _mm512_set1_epi8(-128); // 0x80: 128 as the unsigned operand
    let nibble = _mm512_set1_epi8(0x0F);
    let high_half_by_4 = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    // q4_0 pairs that belong to groups of 4 blocks (two pairs per 64-byte load).
    let quad_pairs = if Q8 { 0 } else { nb / 4 * 2 };

    // Block pair `p` with weight rows `$wv`: scales, then every (weight row, activation row).
    macro_rules! pair {
        ($p:expr, $wv:expr) => {{
            let p = $p;
            if p % 8 == 0 {
                let left = nb - 2 * p;
                let mask: __mmask16 = if left >= 16 { 0xFFFF } else { ((1u32 << left) - 1) as u16 };
                for (s, d) in scales.iter_mut().zip(&wd) {
                    // SAFETY: the mask keeps the load within the row's `nb` scales.
                    let bits = unsafe { _mm256_maskz_loadu_epi16(mask, d.as_ptr().add(2 * p).cast()) };
                    *s = _mm512_cvtph_ps(bits);
                }
                if R == 1 {
                    // One activation row: fold its block scales in here, once per 16 blocks.
                    // SAFETY: as above, within the row's `nb` scales.
                    let d_x = unsafe { _mm512_maskz_loadu_ps(mask, x_scales.add(2 * p)) };
                    scales.iter_mut().for_each(|s| *s = _mm512_mul_ps(*s, d_x));
                }
            }
            if p % 4 == 0 {
                // The next tile's scales (WR rows × nb f16: a 64-byte line per 4 pairs here).
                _mm_prefetch::<_MM_HINT_T1>(next_scales.wrapping_add(p * 8).cast());
            }
            // SAFETY (loads below): the table is 8 × 16 i32; pair p lies within each row's
            // activations.
            let index = unsafe { _mm512_loadu_si512(PAIR_SCALE_INDEX[p % 8].as_ptr().cast()) };
            let xs: [__m512i; R] = std::array::from_fn(|r| unsafe {
                if Q8 {
                    _mm512_loadu_si512(x_unsigned[r].add(64 * p).cast())
                } else {
                    _mm512_loadu_si512(x_signed[r].add(64 * p).cast())
                }
            });
            let d_x: [__m512; R] = std::array::from_fn(|r| unsafe {
                if R == 1 {
                    _mm512_set1_ps(1.0) // already in `scales`
                } else {
                    _mm512_loadu_ps(d_lanes[r].add(16 * p))
                }
            });
            let offset: [__m512i; R] = std::array::from_fn(|r| unsafe {
                if Q8 {
                    _mm512_setzero_si512()
                } else {
                    _mm512_loadu_si512(offsets[r].add(16 * p).cast())
                }
            });
            for (i, &wv) in $wv.iter().enumerate() {
                let d_w = _mm512_permutexvar_ps(index, scales[i]);
                for r in 0..R {
                    let dot = if Q8 {
                        let minus_bias = _mm512_sub_epi32(
                            _mm512_setzero_si512(),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, wv),
                        );
                        _mm512_dpbusd_epi32(minus_bias, xs[r], wv)
                    } else {
                        _mm512_dpbusd_epi32(offset[r], wv, xs[r])
                    };
                    let s = if R == 1 { d_w } else { _mm512_mul_ps(d_w, d_x[r]) };
                    acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i][r]);
                }
            }
        }};
    }

    // The hardware prefetcher stops at page boundaries (a q8_0 row of 4096 is one page):
    // fetching the same place of the row the next tile reads keeps the streams going; a short
    // fetch into L1 covers the current rows.
    // The hardware prefetcher stops at page boundaries (a q8_0 row of 4096 is one page):
    // fetching the same place of the row the next tile reads keeps the streams going; a short
    // fetch into L1 covers the current rows.
    let prefetch = |at: usize| {
        for q in &qs {
            _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(at + WR * row_bytes).cast());
            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(at + L1_AHEAD).cast());
        }
    };
    let mut p = 0;
    while p < pairs {
        // SAFETY (weight loads): pair p (and p + 1 in a group of 4) lies within each row.
        if Q8 {
            prefetch(64 * p);
            let wv: [__m512i; WR] =
                std::array::from_fn(|i| unsafe { _mm512_loadu_si512(qs[i].add(64 * p).cast()) });
            pair!(p, wv);
            p += 1;
        } else if p < quad_pairs {
            prefetch(32 * p);
            let packed: [__m512i; WR] =
                std::array::from_fn(|i| unsafe { _mm512_loadu_si512(qs[i].add(32 * p).cast()) });
            let low = packed.map(|v| _mm512_and_si512(v, nibble));
            pair!(p, low);
            let high = packed.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble));
            pair!(p + 1, high);
            p += 2;
        } else {
            let wv: [__m512i; WR] = std::array::from_fn(|i| {
                let packed = unsafe { _mm256_loadu_si256(qs[i].add(32 * p).cast()) };
                let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(packed), packed);
                _mm512_and_si512(_mm512_srlv_epi64(both, high_half_by_4), nibble)
            });
            pair!(p, wv);
            p += 1;
        }
    }
    for i in 0..WR {
        for r in 0..R {
            out[i * stride + r] = _mm512_reduce_add_ps(acc[i][r]) + odd_block(w, j + i, acts, first + r);
        }
    }
}

/// The last block of a row with an odd block count (0 otherwise), computed as `dot_scalar` does.
fn odd_block(w: &PackedMatrix, j: usize, acts: &Activations, row: usize) -> f32 {
    let nb = w.k / BLOCK;
    if nb.is_multiple_of(2) {
        return 0.0;
    }
    let b = nb - 1;
    // The last block alone: q8_0 quants, or a q4_0 group of one block (GGUF's order).
    let quants = &w.row_qs(j)[b * w.format.quant_bytes()..];
    let weight = |i: usize| match w.format {
        super::BlockFormat::Q8_0 => quants[i] as i8 as i32,
        super::BlockFormat::Q4_0 => ((quants[i % 16] >> (4 * (i / 16))) & 0x0F) as i32 - 8,
    };
    let s: i32 = acts.row_q(row)[b * BLOCK..].iter().enumerate().map(|(i, &c)| weight(i) * c as i32).sum();
    half::f16::from_bits(w.row_d(j)[b]).to_f32() * acts.row_d(row)[b] * s as f32
}
