//! AVX-512F micro-kernels of the prompt attention (same contracts as the portable ones in the
//! parent): scores as tiles of 6 query rows × 64 keys (24 accumulators; per head-dim step 4 key
//! loads and 6 broadcasts feed 24 FMAs), `P·V` as tiles of rows × head_dim (24 accumulators:
//! 3 rows × 128 or 6 rows × 64), and the softmax row with the vectorised `exp`.

use std::arch::x86_64::*;

use super::BK;
use crate::kernels::x86_math::exp;

/// Vectors of 16 scores per query row.
const SV: usize = BK / 16;

pub fn applies(hd: usize) -> bool {
    matches!(hd, 64 | 128) && is_x86_feature_detected!("avx512f")
}

/// `s` `[rows, BK]` = `q` `[rows, hd]` · `kt` `[hd, BK]`.
///
/// # Safety
/// AVX-512F is available; `q` holds `rows · hd` values, `kt` `hd · BK`, `s` `rows · BK`.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores(q: &[f32], hd: usize, kt: &[f32], s: &mut [f32]) {
    let rows = s.len() / BK;
    let (q, kt, s) = (q.as_ptr(), kt.as_ptr(), s.as_mut_ptr());
    let mut r = 0;
    // SAFETY (each call): rows r..r + R exist in q and s.
    unsafe {
        while r + 6 <= rows {
            score_tile::<6>(q.add(r * hd), hd, kt, s.add(r * BK));
            r += 6;
        }
        let (q, s) = (q.add(r * hd), s.add(r * BK));
        match rows - r {
            1 => score_tile::<1>(q, hd, kt, s),
            2 => score_tile::<2>(q, hd, kt, s),
            3 => score_tile::<3>(q, hd, kt, s),
            4 => score_tile::<4>(q, hd, kt, s),
            5 => score_tile::<5>(q, hd, kt, s),
            _ => {}
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn score_tile<const R: usize>(q: *const f32, hd: usize, kt: *const f32, s: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); SV]; R];
    for d in 0..hd {
        // SAFETY: d < hd, so row d of kt and element d of each query row exist.
        let k: [__m512; SV] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(kt.add(d * BK + 16 * c)) });
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(unsafe { *q.add(r * hd + d) });
            for c in 0..SV {
                acc[c] = _mm512_fmadd_ps(x, k[c], acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            // SAFETY: row r of s holds BK values.
            unsafe { _mm512_storeu_ps(s.add(r * BK + 16 * c), a) };
        }
    }
}

/// The parent's `portable_softmax` on one row of `BK` scores.
///
/// # Safety
/// AVX-512F is available and `s` holds `BK` values.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax(s: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
    let p = s.as_mut_ptr();
    // SAFETY: s holds BK = 16 · SV values.
    let x: [__m512; SV] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(p.add(16 * c)) });
    let block_max =
        _mm512_reduce_max_ps(x.iter().fold(_mm512_set1_ps(f32::NEG_INFINITY), |a, &b| _mm512_max_ps(a, b)));
    let m_new = m.max(block_max);
    if m_new == f32::NEG_INFINITY {
        s.fill(0.0);
        return 1.0;
    }
    let alpha = (*m - m_new).exp();
    let (shift, minus_inf) = (_mm512_set1_ps(m_new), _mm512_set1_ps(f32::NEG_INFINITY));
    let mut sum = _mm512_setzero_ps();
    for (c, &x) in x.iter().enumerate() {
        let visible = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(x, minus_inf);
        let w = _mm512_maskz_mov_ps(visible, exp(_mm512_sub_ps(x, shift)));
        sum = _mm512_add_ps(sum, w);
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(p.add(16 * c), w) };
    }
    *l = *l * alpha + _mm512_reduce_add_ps(sum);
    *m = m_new;
    alpha
}

/// `o` `[rows, hd]` += `p` `[rows, BK]` · `v` `[n, hd]`, `n = v.len() / hd`.
///
/// # Safety
/// AVX-512F is available; `hd` is 64 or 128; `p` holds `rows · BK`, `o` `rows · hd` values.
#[target_feature(enable = "avx512f")]
pub unsafe fn accumulate(p: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
    let (rows, n) = (o.len() / hd, v.len() / hd);
    // SAFETY: the caller's promise, passed on.
    unsafe {
        match hd {
            64 => accumulate_rows::<4, 6>(p.as_ptr(), v.as_ptr(), n, o.as_mut_ptr(), rows),
            _ => accumulate_rows::<8, 3>(p.as_ptr(), v.as_ptr(), n, o.as_mut_ptr(), rows),
        }
    }
}

/// Tiles of `R` rows (then the leftover rows one by one), head_dim `16 · C`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_rows<const C: usize, const R: usize>(
    p: *const f32,
    v: *const f32,
    n: usize,
    o: *mut f32,
    rows: usize,
) {
    let hd = 16 * C;
    let mut r = 0;
    // SAFETY (each call): rows r.. exist in p and o.
    unsafe {
        while r + R <= rows {
            accumulate_tile::<C, R>(p.add(r * BK), v, n, o.add(r * hd));
            r += R;
        }
        while r < rows {
            accumulate_tile::<C, 1>(p.add(r * BK), v, n, o.add(r * hd));
            r += 1;
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_tile<const C: usize, const R: usize>(
    p: *const f32,
    v: *const f32,
    n: usize,
    o: *mut f32,
) {
    let hd = 16 * C;
    // SAFETY (all accesses): R rows of o (hd values) and p (BK values), n ≤ BK rows of v.
    let mut acc: [[__m512; C]; R] =
        std::array::from_fn(|r| std::array::from_fn(|c| unsafe { _mm512_loadu_ps(o.add(r * hd + 16 * c)) }));
    for j in 0..n {
        let w: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(unsafe { *p.add(r * BK + j) }));
        for c in 0..C {
            let x = unsafe { _mm512_loadu_ps(v.add(j * hd + 16 * c)) };
            for (acc, &w) in acc.iter_mut().zip(&w) {
                acc[c] = _mm512_fmadd_ps(w, x, acc[c]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (c, &a) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(o.add(r * hd + 16 * c), a) };
        }
    }
}
