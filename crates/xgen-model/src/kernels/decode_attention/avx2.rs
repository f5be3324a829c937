//! AVX2 (with FMA and F16C) per-head kernel: [`super::x86`]'s one pass with an online softmax
//! over blocks of 16 positions, on 8-lane registers (a row of `hd` values is `C = hd / 8` of
//! them; a block's 16 scores are two). Same invariant: each query's operations are those it
//! would run alone, so a verify step's attention equals its single steps' bit for bit. Driven by
//! [`super::x86::run`] (rows, prefetches and the per-head tasks are shared).
//!
//! A block's 16 key rows, then its 16 value rows, are widened once into an f32 buffer (L1) that
//! every query reads. Scores: per query and 8 rows, 8 dot products accumulated lane-wise (one
//! chain per row over the `C` chunks), then one transposing `hadd` tree gives the 8 scores (the
//! row's lanes summed in a fixed order, whatever the other rows hold). Values: per query, its
//! output chunks stay in registers across the block's rows. Against the first AVX2 kernel (a key
//! in registers, a horizontal sum per score, the output accumulated through memory for each
//! row), SmolLM2 at depth 1800: an 8-row verify step 3.68x → see docs/performance.md.

use std::arch::x86_64::*;

use super::x86::{group_rows, Rows, BLOCK_ROWS};
use crate::kernels::x86_math::exp8;

/// Rows per half block (one score register).
const HALF: usize = 8;

/// The queries of one key/value head: query `i` (`q[i·hd..]`, `C` × 8 values) over positions
/// `first..lens[i]` (row `at(j)` of `k`/`v`) -> `o[i·hd..]`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `q` and `o` hold `lens.len() · hd` values; rows `first..` up
/// to the longest `lens` exist; `C` is a multiple of 8.
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
    // The block's rows widened (keys, then values); in a last, shorter block the rows past it
    // hold earlier ones, never used (their scores are masked, their values not summed).
    let mut rows_f32 = [[_mm256_setzero_ps(); C]; BLOCK_ROWS];
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for j0 in (first..len).step_by(BLOCK_ROWS) {
        let n = BLOCK_ROWS.min(len - j0);
        let (rows, ahead) = (group_rows(&at, j0, len), group_rows(&at, j0 + BLOCK_ROWS, len));
        let sees = |i: usize, r: usize| j0 + r < lens[i];
        // (Loops, not closures: closures do not inherit this function's target features.)
        for r in 0..n {
            k.prefetch(hd, ahead[r]);
            for (c, x) in rows_f32[r].iter_mut().enumerate() {
                *x = unsafe { k.chunk8(hd, rows[r], c) };
            }
        }
        for i in (0..nq).filter(|&i| sees(i, 0)) {
            for h in 0..BLOCK_ROWS / HALF {
                let mut dot = [_mm256_setzero_ps(); HALF];
                for c in 0..C {
                    let qc = qv[i][c];
                    for (r, d) in dot.iter_mut().enumerate() {
                        *d = _mm256_fmadd_ps(rows_f32[HALF * h + r][c], qc, *d);
                    }
                }
                // Rows this query does not see (past its position or the block) score -inf.
                let seen = (lens[i] - j0).saturating_sub(HALF * h).min(HALF) as i32;
                let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(seen), lanes));
                let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), sum_rows(dot), valid);
                unsafe { _mm256_storeu_ps(scores[i].as_mut_ptr().add(HALF * h), s) };
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
            for (c, x) in rows_f32[r].iter_mut().enumerate() {
                *x = unsafe { v.chunk8(hd, rows[r], c) };
            }
        }
        for i in (0..nq).filter(|&i| sees(i, 0)) {
            let seen = BLOCK_ROWS.min(lens[i] - j0);
            // Eight output chunks at a time in registers over the rows the query sees.
            for c0 in (0..C).step_by(HALF) {
                let mut a: [__m256; HALF] = std::array::from_fn(|c| acc[i][c0 + c]);
                for (r, row) in rows_f32.iter().enumerate().take(seen) {
                    let w = _mm256_set1_ps(weights[i][r]);
                    for (c, a) in a.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(row[c0 + c], w, *a);
                    }
                }
                acc[i][c0..c0 + HALF].copy_from_slice(&a);
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

/// Lane `r` of the result: the 8 lanes of `d[r]` added, `((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7))`
/// for every row alike (one transposing tree of `hadd`s for 8 rows).
#[target_feature(enable = "avx")]
fn sum_rows(d: [__m256; HALF]) -> __m256 {
    let t = [
        _mm256_hadd_ps(d[0], d[1]),
        _mm256_hadd_ps(d[2], d[3]),
        _mm256_hadd_ps(d[4], d[5]),
        _mm256_hadd_ps(d[6], d[7]),
    ];
    // [r0 01+23, r1 .., r2 .., r3 .. | r0 45+67, r1 .., r2 .., r3 ..] and rows 4..8 alike.
    let (u0, u1) = (_mm256_hadd_ps(t[0], t[1]), _mm256_hadd_ps(t[2], t[3]));
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
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
