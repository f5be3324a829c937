//! AVX2 (with FMA) micro-kernels of the prompt attention: the AVX-512 ones ([`super::x86`]) on
//! 8-lane registers, same contracts. Scores as tiles of 3 query rows × 32 keys (12 accumulators;
//! per head-dim step 4 key loads and 3 broadcasts feed 12 FMAs), `P·V` as tiles of 3 rows × 32
//! head-dim values (12 accumulators), the softmax row with the 8-lane `exp8`.

use std::arch::x86_64::*;

use super::BK;
use crate::kernels::x86_math::exp8;

/// Keys per score tile, and head-dim values per `P·V` tile: four 8-lane vectors.
const SPAN: usize = 32;
/// Query rows per tile.
const ROWS: usize = 3;

pub fn applies(hd: usize) -> bool {
    matches!(hd, 64 | 128) && crate::kernels::has_avx2()
}

/// `s` `[rows, BK]` = `q` `[rows, hd]` · `kt` `[hd, BK]`.
///
/// # Safety
/// AVX2 and FMA are available; `q` holds `rows · hd` values, `kt` `hd · BK`, `s` `rows · BK`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn scores(q: &[f32], hd: usize, kt: &[f32], s: &mut [f32]) {
    let rows = s.len() / BK;
    let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    // SAFETY (each call): rows r..r + R exist in q and s; keys k0..k0 + SPAN in every row of kt.
    unsafe {
        for k0 in (0..BK).step_by(SPAN) {
            let mut r = 0;
            while r + ROWS <= rows {
                score_tile::<ROWS>(q.add(r * hd), hd, kt.add(k0), s.add(r * BK + k0));
                r += ROWS;
            }
            let (q, s) = (q.add(r * hd), s.add(r * BK + k0));
            match rows - r {
                1 => score_tile::<1>(q, hd, kt.add(k0), s),
                2 => score_tile::<2>(q, hd, kt.add(k0), s),
                _ => {}
            }
        }
    }
}

/// `R` query rows against the `SPAN` keys at `kt` (a row of `kt` is `BK` apart).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_tile<const R: usize>(q: *const f32, hd: usize, kt: *const f32, s: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); SPAN / 8]; R];
    for d in 0..hd {
        // SAFETY: d < hd, so row d of kt and element d of each query row exist.
        let k: [__m256; SPAN / 8] =
            std::array::from_fn(|c| unsafe { _mm256_loadu_ps(kt.add(d * BK + 8 * c)) });
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_set1_ps(unsafe { *q.add(r * hd + d) });
            for (a, &k) in acc.iter_mut().zip(&k) {
                *a = _mm256_fmadd_ps(x, k, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            // SAFETY: row r of s holds the tile's SPAN values.
            unsafe { _mm256_storeu_ps(s.add(r * BK + 8 * c), a) };
        }
    }
}

/// The parent's `portable_softmax` on one row of `BK` scores.
///
/// # Safety
/// AVX2 and FMA are available and `s` holds `BK` values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax(s: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
    let p = s.as_mut_ptr();
    // SAFETY: s holds BK = 8 · (BK / 8) values.
    let x: [__m256; BK / 8] = std::array::from_fn(|c| unsafe { _mm256_loadu_ps(p.add(8 * c)) });
    let max = x.iter().fold(_mm256_set1_ps(f32::NEG_INFINITY), |a, &b| _mm256_max_ps(a, b));
    let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
    let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
    let block_max = _mm_cvtss_f32(_mm_max_ss(max, _mm_movehdup_ps(max)));
    let m_new = m.max(block_max);
    if m_new == f32::NEG_INFINITY {
        s.fill(0.0);
        return 1.0;
    }
    let alpha = (*m - m_new).exp();
    let (shift, minus_inf) = (_mm256_set1_ps(m_new), _mm256_set1_ps(f32::NEG_INFINITY));
    let mut sum = _mm256_setzero_ps();
    for (c, &x) in x.iter().enumerate() {
        let visible = _mm256_cmp_ps::<_CMP_NEQ_OQ>(x, minus_inf);
        let w = _mm256_and_ps(visible, exp8(_mm256_sub_ps(x, shift)));
        sum = _mm256_add_ps(sum, w);
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(p.add(8 * c), w) };
    }
    let sum = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
    let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    *l = *l * alpha + _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
    *m = m_new;
    alpha
}

/// `o` `[rows, hd]` += `p` `[rows, BK]` · `v` `[n, hd]`, `n = v.len() / hd`.
///
/// # Safety
/// AVX2 and FMA are available; `hd` is a multiple of 32; `p` holds `rows · BK`, `o` `rows · hd`
/// values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn accumulate(p: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
    let (rows, n) = (o.len() / hd, v.len() / hd);
    let (p, v, o) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr());
    // SAFETY (each call): rows r.. exist in p and o; values c0..c0 + SPAN in every row of v and o.
    unsafe {
        for c0 in (0..hd).step_by(SPAN) {
            let mut r = 0;
            while r + ROWS <= rows {
                accumulate_tile::<ROWS>(p.add(r * BK), v.add(c0), hd, n, o.add(r * hd + c0));
                r += ROWS;
            }
            while r < rows {
                accumulate_tile::<1>(p.add(r * BK), v.add(c0), hd, n, o.add(r * hd + c0));
                r += 1;
            }
        }
    }
}

/// `R` output rows' `SPAN` values at `o` (rows `hd` apart) += their weights at `p` (rows `BK`
/// apart) times the `n` value rows' `SPAN` values at `v` (rows `hd` apart).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_tile<const R: usize>(p: *const f32, v: *const f32, hd: usize, n: usize, o: *mut f32) {
    // SAFETY (all accesses): R rows of o and p, n ≤ BK rows of v, SPAN values each.
    let mut acc: [[__m256; SPAN / 8]; R] =
        std::array::from_fn(|r| std::array::from_fn(|c| unsafe { _mm256_loadu_ps(o.add(r * hd + 8 * c)) }));
    for j in 0..n {
        let w: [__m256; R] = std::array::from_fn(|r| _mm256_set1_ps(unsafe { *p.add(r * BK + j) }));
        for c in 0..SPAN / 8 {
            let x = unsafe { _mm256_loadu_ps(v.add(j * hd + 8 * c)) };
            for (acc, &w) in acc.iter_mut().zip(&w) {
                acc[c] = _mm256_fmadd_ps(w, x, acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            unsafe { _mm256_storeu_ps(o.add(r * hd + 8 * c), a) };
        }
    }
}
