//! AVX2 (with FMA and F16C) kernels of the 16-bit float products, for CPUs without AVX-512:
//! decode rows and few-row steps with [`super::avx512`]'s structure on 256-bit registers.
//!
//! A run of 32 weights is two 256-bit loads; bf16 widens by a shift (the even values) and a mask
//! (the odd ones), so the activations are in [`super::even_odd`] order, as for AVX-512: a run's
//! even part is `x[0..16]` (the first load's evens, then the second's), its odd part `x[16..32]`.
//! f16 widens 8 values per `vcvtph2ps`. Each (weight row, activation row) keeps two accumulators
//! (the run's first 16 activations, its last 16) that run along the width in order, so the
//! width split into blocks ([`few_rows`]) leaves every sum as one pass ([`dot_row`]) makes it:
//! a few-row step's rows equal one-row steps bit for bit.

use std::arch::x86_64::*;

use super::{widen, Kind, FEW_K_BLOCK, GROUP};

/// `out[r] += dot(w, x[r])` for up to [`GROUP`] activation rows (row `r` from `xs[r · stride]`).
///
/// # Safety
/// The CPU has the features of [`available`]; each row has `w.len()` values.
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows<const R: usize>(w: &[u16], xs: &[f32], stride: usize, kind: Kind, out: &mut [f32]) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // SAFETY: as the caller's.
    unsafe {
        accumulate::<R>(w, xs, stride, kind, 0..w.len() / 32 * 32, &mut acc);
        finish::<R>(w, xs, stride, kind, &acc, out);
    }
}

/// Adds to `acc[r]` the products of weight row `w` and activation row `r` (from `xs[r · stride]`)
/// over `range`, whole runs of 32 values, in order along the width.
///
/// # Safety
/// As [`dot_row`]'s; `range` ends within the whole runs of `w`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate<const R: usize>(
    w: &[u16],
    xs: &[f32],
    stride: usize,
    kind: Kind,
    range: std::ops::Range<usize>,
    acc: &mut [[__m256; 2]; R],
) {
    let high_halves = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut i = range.start;
    while i < range.end {
        // Ahead in this row, and the same place in the rows after it: the next weight rows that
        // a few-row step's block (and a one-row step's next rows across pages) will read.
        // SAFETY (whole run): i + 32 <= w.len(); x rows have w.len() values from r · stride.
        // The run's weights widened in the activations' order: 4 × 8 values.
        let ws: [__m256; 4] = unsafe {
            match kind {
                Kind::Bf16 => {
                    let (a, b) = (
                        _mm256_loadu_si256(w.as_ptr().add(i).cast()),
                        _mm256_loadu_si256(w.as_ptr().add(i + 16).cast()),
                    );
                    [
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(a)),
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(b)),
                        _mm256_castsi256_ps(_mm256_and_si256(a, high_halves)),
                        _mm256_castsi256_ps(_mm256_and_si256(b, high_halves)),
                    ]
                }
                Kind::F16 => [
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 8).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 16).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i + 24).cast())),
                ],
            }
        };
        for (r, [a, b]) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            unsafe {
                let x = xs.as_ptr().add(r * stride + i);
                *a = _mm256_fmadd_ps(ws[0], _mm256_loadu_ps(x), *a);
                *a = _mm256_fmadd_ps(ws[1], _mm256_loadu_ps(x.add(8)), *a);
                *b = _mm256_fmadd_ps(ws[2], _mm256_loadu_ps(x.add(16)), *b);
                *b = _mm256_fmadd_ps(ws[3], _mm256_loadu_ps(x.add(24)), *b);
            }
        }
        i += 32;
    }
}

/// `out[r] +=` the lanes of `acc[r]` and the products past the whole runs of 32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish<const R: usize>(
    w: &[u16],
    xs: &[f32],
    stride: usize,
    kind: Kind,
    acc: &[[__m256; 2]; R],
    out: &mut [f32],
) {
    let (k, full) = (w.len(), w.len() / 32 * 32);
    for (r, [a, b]) in acc.iter().enumerate() {
        let tail: f32 = (full..k).map(|t| widen(w[t], kind) * xs[r * stride + t]).sum();
        let v = _mm256_add_ps(*a, *b);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[r] += _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s))) + tail;
    }
}

/// Steps of several rows: `out` `[features, rows]` (feature-major) gains weight rows `w`
/// `[features, k]` times activation rows `xs` `[rows, k]`, [`GROUP`] rows per pass over a block
/// of [`FEW_K_BLOCK`] values of a weight row (the rows' blocks stay in L1, the weight block is
/// reused from L1 by the next group), every sum carried between blocks: [`rows`]' arithmetic.
///
/// # Safety
/// The CPU has the features of [`available`]; `w` is `[features, k]`, `xs` `[rows, k]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn few_rows(w: &[u16], xs: &[f32], rows: usize, k: usize, kind: Kind, out: &mut [f32]) {
    let (features, full) = (w.len() / k, k / 32 * 32);
    let groups = rows.div_ceil(GROUP);
    let mut acc = vec![[[_mm256_setzero_ps(); 2]; GROUP]; features * groups];
    macro_rules! each_group {
        ($j:expr, $g:expr, $f:ident, $($args:expr),*) => {{
            let (wj, a) = (&w[$j * k..($j + 1) * k], &mut acc[$j * groups + $g]);
            let x = &xs[$g * GROUP * k..];
            // SAFETY: as the caller's; `a` holds GROUP ≥ r sums.
            unsafe {
                match rows - $g * GROUP {
                    1 => $f::<1>(wj, x, k, kind, $($args,)* (&mut a[..1]).try_into().expect("1 sum")),
                    2 => $f::<2>(wj, x, k, kind, $($args,)* (&mut a[..2]).try_into().expect("2 sums")),
                    3 => $f::<3>(wj, x, k, kind, $($args,)* (&mut a[..3]).try_into().expect("3 sums")),
                    _ => $f::<4>(wj, x, k, kind, $($args,)* (&mut a[..4]).try_into().expect("4 sums")),
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
            let out = &mut out[j * rows + g * GROUP..];
            each_group!(j, g, finish_into, out);
        }
    }
}

/// [`finish`] with the arguments in [`few_rows`]' order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish_into<const R: usize>(
    w: &[u16],
    xs: &[f32],
    stride: usize,
    kind: Kind,
    out: &mut [f32],
    acc: &mut [[__m256; 2]; R],
) {
    // SAFETY: as the caller's.
    unsafe { finish::<R>(w, xs, stride, kind, acc, out) }
}
