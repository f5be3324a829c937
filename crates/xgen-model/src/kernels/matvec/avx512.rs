//! AVX-512 kernels of the 16-bit float products: decode rows, few-row steps, prompt tiles.

use std::arch::x86_64::*;

use super::{widen, Kind, Partial, FEW_GROUP, FEW_K_BLOCK, GROUP};

pub unsafe fn dot_row(w: &[u16], xs: &[f32], stride: usize, kind: Kind, out: &mut [f32]) {
    // SAFETY: as the caller's.
    unsafe {
        match out.len() {
            1 => rows::<1>(w, xs, stride, kind, out),
            2 => rows::<2>(w, xs, stride, kind, out),
            3 => rows::<3>(w, xs, stride, kind, out),
            _ => rows::<GROUP>(w, xs, stride, kind, out),
        }
    }
}

/// 4 weight rows × [`GROUP`] activation rows over a block of the width: 16 accumulators, each
/// activation load used by four weight rows.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile(
    w4: &[u16],
    xs: &[f32],
    k: usize,
    range: std::ops::Range<usize>,
    kind: Kind,
    partial: &mut Partial,
) {
    // SAFETY: `Partial` is 16 rows of 16 f32, one register each.
    let mut acc: [[__m512; GROUP]; 4] = std::array::from_fn(|i| {
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(partial.0[i][r].as_ptr()) })
    });
    let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let mut i = range.start;
    while i + 32 <= range.end {
        // SAFETY (whole block): i + 32 <= k; w4 is [4, k] and xs [GROUP, k].
        let raw: [__m512i; 4] =
            std::array::from_fn(|row| unsafe { _mm512_loadu_si512(w4.as_ptr().add(row * k + i).cast()) });
        // One half (16 values) at a time keeps 16 accumulators, 4 weights and one activation
        // vector in registers (both halves at once spilled).
        for half in 0..2 {
            let ws: [__m512; 4] = std::array::from_fn(|row| match kind {
                Kind::Bf16 if half == 0 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw[row])),
                Kind::Bf16 => _mm512_castsi512_ps(_mm512_and_si512(raw[row], high_halves)),
                Kind::F16 => _mm512_cvtph_ps(if half == 0 {
                    _mm512_castsi512_si256(raw[row])
                } else {
                    _mm512_extracti64x4_epi64::<1>(raw[row])
                }),
            });
            for r in 0..GROUP {
                let x = unsafe { _mm512_loadu_ps(xs.as_ptr().add(r * k + i + 16 * half)) };
                for (row_acc, wv) in acc.iter_mut().zip(&ws) {
                    row_acc[r] = _mm512_fmadd_ps(*wv, x, row_acc[r]);
                }
            }
        }
        i += 32;
    }
    for (row, acc) in acc.iter().enumerate() {
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: 16 f32 in each.
            unsafe { _mm512_storeu_ps(partial.0[row][r].as_mut_ptr(), *a) };
        }
    }
}

/// [`tile`] with bf16 activations `xb` in natural order: `vdpbf16ps` adds the products of
/// each pair of values into one lane (the lanes are summed in [`Partial::finish`], so the
/// lane a product lands in does not matter). Products of bf16 values are exact in f32.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn tile_bf16(
    w4: &[u16],
    xb: &[u16],
    k: usize,
    range: std::ops::Range<usize>,
    partial: &mut Partial,
) {
    // SAFETY: `Partial` is 16 rows of 16 f32, one register each.
    let mut acc: [[__m512; GROUP]; 4] = std::array::from_fn(|i| {
        std::array::from_fn(|r| unsafe { _mm512_loadu_ps(partial.0[i][r].as_ptr()) })
    });
    let mut i = range.start;
    while i + 32 <= range.end {
        // SAFETY (whole block): i + 32 <= k; w4 is [4, k] and xb [GROUP, k].
        let ws: [__m512bh; 4] =
            std::array::from_fn(|row| unsafe { load_pairs(w4.as_ptr().add(row * k + i)) });
        for r in 0..GROUP {
            let x = unsafe { load_pairs(xb.as_ptr().add(r * k + i)) };
            for (row_acc, wv) in acc.iter_mut().zip(&ws) {
                row_acc[r] = _mm512_dpbf16_ps(row_acc[r], *wv, x);
            }
        }
        i += 32;
    }
    for (row, acc) in acc.iter().enumerate() {
        for (r, a) in acc.iter().enumerate() {
            // SAFETY: 16 f32 in each.
            unsafe { _mm512_storeu_ps(partial.0[row][r].as_mut_ptr(), *a) };
        }
    }
}

/// 32 bf16 values (bits) from `p` as `vdpbf16ps`'s operand.
///
/// # Safety
/// `p` points at 32 readable values; the CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_pairs(p: *const u16) -> __m512bh {
    // SAFETY: 64 readable bytes (the contract); both types are 64-byte vectors.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
}

/// `R` activation rows; separate accumulators for the two halves of each load keep 2R
/// independent FMA chains (one chain per row was latency-bound at half the FMA rate).
#[target_feature(enable = "avx512f")]
unsafe fn rows<const R: usize>(w: &[u16], xs: &[f32], stride: usize, kind: Kind, out: &mut [f32]) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    // SAFETY: as the caller's.
    unsafe {
        accumulate::<R>(w, xs, stride, kind, 0..w.len() / 32 * 32, &mut acc);
        finish::<R>(w, xs, stride, kind, &acc, out);
    }
}

/// Adds to `acc[r]` (lanes of the even and odd halves of each run) the products of weight row
/// `w` and activation row `r` (from `xs[r · stride]`) over `range`, whole runs of 32 values:
/// the per-lane sums run along the width in order, so splitting the width into ranges (the
/// few-row driver) leaves every sum as one pass makes it.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate<const R: usize>(
    w: &[u16],
    xs: &[f32],
    stride: usize,
    kind: Kind,
    range: std::ops::Range<usize>,
    acc: &mut [[__m512; 2]; R],
) {
    let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let mut i = range.start;
    while i < range.end {
        // The hardware prefetcher stops at page boundaries: fetch ahead into the next rows
        // (a 4096-wide bf16 row is 2 pages).
        _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(i + 2 * stride).cast());
        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + 256).cast());
        // SAFETY (whole block): i + 32 <= k = w.len(); x rows have k values from r · stride.
        let (lo, hi) = match kind {
            Kind::Bf16 => {
                // 32 bf16: a shift widens the even ones, a mask the odd ones (x is in
                // even/odd order to match).
                let raw = unsafe { _mm512_loadu_si512(w.as_ptr().add(i).cast()) };
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw)),
                    _mm512_castsi512_ps(_mm512_and_si512(raw, high_halves)),
                )
            }
            Kind::F16 => unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i).cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i + 16).cast())),
                )
            },
        };
        for (r, [a, b]) in acc.iter_mut().enumerate() {
            let x = unsafe { xs.as_ptr().add(r * stride + i) };
            *a = _mm512_fmadd_ps(lo, unsafe { _mm512_loadu_ps(x) }, *a);
            *b = _mm512_fmadd_ps(hi, unsafe { _mm512_loadu_ps(x.add(16)) }, *b);
        }
        i += 32;
    }
}

/// `out[r] +=` the lanes of `acc[r]` and the products past the whole runs of 32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn finish<const R: usize>(
    w: &[u16],
    xs: &[f32],
    stride: usize,
    kind: Kind,
    acc: &[[__m512; 2]; R],
    out: &mut [f32],
) {
    let (k, full) = (w.len(), w.len() / 32 * 32);
    for (r, [a, b]) in acc.iter().enumerate() {
        let tail: f32 = (full..k).map(|t| widen(w[t], kind) * xs[r * stride + t]).sum();
        out[r] += _mm512_reduce_add_ps(_mm512_add_ps(*a, *b)) + tail;
    }
}

/// A few-row step's products (2 to [`super::EXACT_ROWS`] rows): `out` `[features, rows]`
/// (feature-major) gains weight rows `w` `[features, k]` times activation rows `xs`
/// `[rows, k]`. The width is taken in blocks of [`FEW_K_BLOCK`] so that every row's block of
/// activations stays in L1 while the weight rows pass (a whole 15-row width does not fit:
/// an 8-row bf16 step read its activations from L2), with each (weight row, activation row)
/// sum carried between blocks: the arithmetic of [`rows`], row for row.
#[target_feature(enable = "avx512f")]
pub unsafe fn few_rows(w: &[u16], xs: &[f32], rows: usize, k: usize, kind: Kind, out: &mut [f32]) {
    let (features, full) = (w.len() / k, k / 32 * 32);
    let groups = rows.div_ceil(FEW_GROUP);
    let mut acc = vec![[[_mm512_setzero_ps(); 2]; FEW_GROUP]; features * groups];
    macro_rules! each_group {
        ($j:expr, $g:expr, $f:ident, $($args:expr),*) => {{
            let (wj, a) = (&w[$j * k..($j + 1) * k], &mut acc[$j * groups + $g]);
            let x = &xs[$g * FEW_GROUP * k..];
            // SAFETY: as the caller's; `a` holds FEW_GROUP ≥ r sums.
            unsafe {
                match rows - $g * FEW_GROUP {
                    1 => $f::<1>(wj, x, k, kind, $($args,)* (&mut a[..1]).try_into().expect("1 sum")),
                    2 => $f::<2>(wj, x, k, kind, $($args,)* (&mut a[..2]).try_into().expect("2 sums")),
                    3 => $f::<3>(wj, x, k, kind, $($args,)* (&mut a[..3]).try_into().expect("3 sums")),
                    4 => $f::<4>(wj, x, k, kind, $($args,)* (&mut a[..4]).try_into().expect("4 sums")),
                    5 => $f::<5>(wj, x, k, kind, $($args,)* (&mut a[..5]).try_into().expect("5 sums")),
                    6 => $f::<6>(wj, x, k, kind, $($args,)* (&mut a[..6]).try_into().expect("6 sums")),
                    7 => $f::<7>(wj, x, k, kind, $($args,)* (&mut a[..7]).try_into().expect("7 sums")),
                    _ => $f::<8>(wj, x, k, kind, $($args,)* (&mut a[..8]).try_into().expect("8 sums")),
                }
            }
        }};
    }
    for start in (0..full).step_by(FEW_K_BLOCK) {
        let range = start..(start + FEW_K_BLOCK).min(full);
        for j in 0..features {
            for g in 0..groups {
                each_group!(j, g, accumulate, range.clone());
            }
        }
    }
    for j in 0..features {
        for g in 0..groups {
            let out = &mut out[j * rows + g * FEW_GROUP..];
            each_group!(j, g, finish_into, out);
        }
    }
}

/// [`finish`] with the arguments in [`few_rows`]' order.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn finish_into<const R: usize>(
    w: &[u16],
    xs: &[f32],
    stride: usize,
    kind: Kind,
    out: &mut [f32],
    acc: &mut [[__m512; 2]; R],
) {
    // SAFETY: as the caller's.
    unsafe { finish::<R>(w, xs, stride, kind, acc, out) }
}
