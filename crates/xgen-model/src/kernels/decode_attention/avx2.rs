//! AVX2 (with FMA and F16C) per-head kernel: [`super::x86`]'s one pass with an online softmax
//! over blocks of 16 positions, on 8-lane registers (a row of `hd` values is `C = hd / 8` of
//! them; a block's 16 scores are two). Same invariant: each query's operations are those it
//! would run alone, so a verify step's attention equals its single steps' bit for bit. Driven by
//! [`super::x86::run`] (rows, prefetches and the per-head tasks are shared).

use std::arch::x86_64::*;

use super::x86::{group_rows, Rows, BLOCK_ROWS};
use crate::kernels::x86_math::exp8;

/// The queries of one key/value head: query `i` (`q[i·hd..]`, `C` × 8 values) over positions
/// `first..lens[i]` (row `at(j)` of `k`/`v`) -> `o[i·hd..]`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `q` and `o` hold `lens.len() · hd` values; rows `first..` up
/// to the longest `lens` exist.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn queries<const C: usize, K: Rows, V: Rows>(
    q: &[f32],
    lens: &[usize],
    k: &K,
    v: &V,
    at: impl Fn(usize) -> usize,
    first: usize,
    o: &mut [f32],
) {
    let hd = 8 * C;
    let nq = lens.len();
    let len = lens.iter().copied().max().unwrap_or(0);
    let scale = _mm256_set1_ps(1.0 / (hd as f32).sqrt());
    // SAFETY (all loads): q and o hold nq · hd values; rows first..len exist (the caller's promise).
    let mut qv = vec![[_mm256_setzero_ps(); C]; nq];
    for (i, qi) in qv.iter_mut().enumerate() {
        for (c, x) in qi.iter_mut().enumerate() {
            *x = unsafe { _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(i * hd + 8 * c)), scale) };
        }
    }
    // Per query: running max and sum, output accumulators, this block's scores and weights.
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; nq], vec![0f32; nq]);
    let mut acc = vec![[_mm256_setzero_ps(); C]; nq];
    let mut scores = vec![[f32::NEG_INFINITY; BLOCK_ROWS]; nq];
    let mut weights = vec![[0f32; BLOCK_ROWS]; nq];
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for j0 in (first..len).step_by(BLOCK_ROWS) {
        let n = BLOCK_ROWS.min(len - j0);
        let (rows, ahead) = (group_rows(&at, j0, len), group_rows(&at, j0 + BLOCK_ROWS, len));
        let sees = |i: usize, r: usize| j0 + r < lens[i];
        scores.iter_mut().for_each(|s| *s = [f32::NEG_INFINITY; BLOCK_ROWS]);
        for r in 0..n {
            k.prefetch(hd, ahead[r]);
            // (Loops, not closures: closures do not inherit this function's target features.)
            let mut key = [_mm256_setzero_ps(); C];
            for (c, x) in key.iter_mut().enumerate() {
                *x = unsafe { k.chunk8(hd, rows[r], c) };
            }
            for i in (0..nq).filter(|&i| sees(i, r)) {
                let mut dot = [_mm256_setzero_ps(); 2];
                for c in 0..C {
                    dot[c % 2] = _mm256_fmadd_ps(key[c], qv[i][c], dot[c % 2]);
                }
                scores[i][r] = sum_lanes(_mm256_add_ps(dot[0], dot[1]));
            }
        }
        for i in (0..nq).filter(|&i| sees(i, 0)) {
            let n = BLOCK_ROWS.min(lens[i] - j0) as i32;
            let s =
                unsafe { [_mm256_loadu_ps(scores[i].as_ptr()), _mm256_loadu_ps(scores[i].as_ptr().add(8))] };
            let block_max = max_lanes(_mm256_max_ps(s[0], s[1]));
            if block_max > max[i] {
                // Earlier weights were relative to the old max.
                let rescale = (max[i] - block_max).exp();
                acc[i].iter_mut().for_each(|a| *a = _mm256_mul_ps(*a, _mm256_set1_ps(rescale)));
                sum[i] *= rescale;
                max[i] = block_max;
            }
            let mut total = _mm256_setzero_ps();
            for (h, s) in s.into_iter().enumerate() {
                let valid =
                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8 * h as i32), lanes));
                let p = _mm256_and_ps(valid, exp8(_mm256_sub_ps(s, _mm256_set1_ps(max[i]))));
                total = _mm256_add_ps(total, p);
                unsafe { _mm256_storeu_ps(weights[i].as_mut_ptr().add(8 * h), p) };
            }
            sum[i] += sum_lanes(total);
        }
        for r in 0..n {
            v.prefetch(hd, ahead[r]);
            let mut value = [_mm256_setzero_ps(); C];
            for (c, x) in value.iter_mut().enumerate() {
                *x = unsafe { v.chunk8(hd, rows[r], c) };
            }
            for i in (0..nq).filter(|&i| sees(i, r)) {
                let w = _mm256_set1_ps(weights[i][r]);
                for (c, a) in acc[i].iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(value[c], w, *a);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let inv = _mm256_set1_ps(1.0 / sum[i]);
        for (c, a) in a.iter().enumerate() {
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(i * hd + 8 * c), _mm256_mul_ps(*a, inv)) };
        }
    }
}

/// The 8 lanes added: halves, pairs, the last two.
#[target_feature(enable = "avx2")]
fn sum_lanes(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The largest of the 8 lanes.
#[target_feature(enable = "avx2")]
fn max_lanes(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}
