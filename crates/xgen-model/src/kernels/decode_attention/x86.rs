//! AVX-512 per-head kernel (and its driver, shared with the AVX2 one in [`super::avx2`]) for
//! 16-bit and q8_0 caches with head_dim 64 or 128: one pass over the
//! cached positions in blocks of 16 with an online softmax (running max `m` and sum `l`; the
//! output is rescaled when a block raises the max), so each block's keys and values stream
//! together with the arithmetic between them. The query (scaled) and the output stay in
//! registers; rows are widened in registers and prefetched a block ahead; the exponentials are
//! vectorised ([`exp`]). The parent's `run` stays the reference path (the tests compare both to
//! `causal_attention`).
//!
//! Performance notes: the previous kernel made three passes per head (all scores, then a scalar
//! `expf` per position, then the values): at 4096 cached positions the exponentials alone were
//! ~10% of the attention's time and left memory idle, and the value pass restarted cold streams.
//! The first version (a per-row buffer widened by `half`, output accumulated through memory) read
//! the f16 cache at about 10 GB/s.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{Paging, Shape};
use crate::kernels::x86_math::exp;

/// The SIMD kernels of this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    /// AVX2 with FMA and F16C ([`super::avx2`]).
    Avx2,
}

impl Simd {
    /// The best one this CPU has.
    pub fn detect() -> Option<Self> {
        Self::available().into_iter().next()
    }

    /// Every one this CPU has, best first.
    pub fn available() -> Vec<Self> {
        let mut simd = Vec::new();
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") {
            simd.push(Self::Avx512);
        }
        if crate::kernels::has_avx2() {
            simd.push(Self::Avx2);
        }
        simd
    }
}

/// Whether the kernels take `hd` over `paging` (whose blocks, when a sequence has several, hold
/// at least a group of 16 positions: a group crosses at most one block).
pub fn applies(hd: usize, paging: &Paging) -> bool {
    let groups = paging.block >= BLOCK_ROWS || paging.tables.iter().all(|t| t.len() <= 1);
    groups && matches!(hd, 64 | 128)
}

/// Positions per block of the online softmax: one score per lane (two registers on AVX2).
pub(super) const BLOCK_ROWS: usize = 16;
/// Below this many cache bytes read per step (keys and values of all heads), heads run on the
/// calling thread: waking a second one costs more (30-50 µs) than it saves.
const PARALLEL_BYTES: usize = 512 << 10;

/// Cached key or value rows (a whole buffer, flat rows over `[blocks, kv_h, block]`) in a storage
/// format, read 16 values at a time.
pub trait Rows: Sync {
    /// Bytes per cached row.
    fn row_bytes(hd: usize) -> usize;
    /// Values `16c..16c + 16` of row `r` as f32.
    ///
    /// # Safety
    /// AVX-512F and F16C are available and row `r` is within the rows.
    unsafe fn chunk(&self, hd: usize, r: usize, c: usize) -> __m512;
    /// Values `8c..8c + 8` of row `r` as f32 (the AVX2 kernel).
    ///
    /// # Safety
    /// AVX2 and F16C are available and row `r` is within the rows.
    unsafe fn chunk8(&self, hd: usize, r: usize, c: usize) -> __m256;
    /// Asks for every cache line of row `r` (which may lie past the rows: prefetches never
    /// fault). All of them: a sequence's rows are contiguous only as far as its blocks are
    /// adjacent, and where they are not the hardware prefetcher loses the stream (one head, one
    /// thread, 64-position blocks in shuffled order: 8.3 GB/s prefetching a line per row, 11.5
    /// prefetching whole rows).
    fn prefetch(&self, hd: usize, r: usize);
}

/// A 16-bit float cache (bit patterns, `[.., hd]` per row): bf16 when `BF16`, else f16.
pub struct HalfRows<'a, const BF16: bool>(pub &'a [u16]);
/// A q8_0 cache: quants (`+ 128`, `hd` per row) and f16 scale bits (`hd / 32` per row).
pub struct Q8Rows<'a> {
    pub q: &'a [u8],
    pub d: &'a [u16],
}

impl<const BF16: bool> Rows for HalfRows<'_, BF16> {
    fn row_bytes(hd: usize) -> usize {
        2 * hd
    }

    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn chunk(&self, hd: usize, r: usize, c: usize) -> __m512 {
        // SAFETY: the caller guarantees row r exists and the CPU features.
        let raw = unsafe { _mm256_loadu_si256(self.0.as_ptr().add(r * hd + 16 * c).cast()) };
        if BF16 {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
        } else {
            _mm512_cvtph_ps(raw)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn chunk8(&self, hd: usize, r: usize, c: usize) -> __m256 {
        // SAFETY: the caller guarantees row r exists and the CPU features.
        let raw = unsafe { _mm_loadu_si128(self.0.as_ptr().add(r * hd + 8 * c).cast()) };
        if BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        } else {
            _mm256_cvtph_ps(raw)
        }
    }

    #[inline]
    fn prefetch(&self, hd: usize, r: usize) {
        let row: *const i8 = self.0.as_ptr().wrapping_add(r * hd).cast();
        for line in (0..2 * hd).step_by(64) {
            // SAFETY: SSE is part of x86_64; a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line)) };
        }
    }
}

impl Rows for Q8Rows<'_> {
    fn row_bytes(hd: usize) -> usize {
        hd + hd / 16
    }

    /// `d_b (u - 128)` for the 16 values, `b = c / 2` the block of 32 they belong to.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn chunk(&self, hd: usize, r: usize, c: usize) -> __m512 {
        // SAFETY: the caller guarantees row r exists (hd quants, hd / 32 scales) and the CPU
        // features.
        unsafe {
            let u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                self.q.as_ptr().add(r * hd + 16 * c).cast(),
            )));
            let bits = *self.d.get_unchecked(r * (hd / 32) + c / 2);
            let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)));
            _mm512_mul_ps(_mm512_sub_ps(u, _mm512_set1_ps(128.0)), d)
        }
    }

    /// `d_b (u - 128)` for the 8 values, `b = c / 4`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn chunk8(&self, hd: usize, r: usize, c: usize) -> __m256 {
        // SAFETY: as `chunk`'s.
        unsafe {
            let u = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                self.q.as_ptr().add(r * hd + 8 * c).cast(),
            )));
            let bits = *self.d.get_unchecked(r * (hd / 32) + c / 4);
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)));
            _mm256_mul_ps(_mm256_sub_ps(u, _mm256_set1_ps(128.0)), d)
        }
    }

    #[inline]
    fn prefetch(&self, hd: usize, r: usize) {
        let row: *const i8 = self.q.as_ptr().wrapping_add(r * hd).cast();
        for line in (0..hd).step_by(64) {
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line)) };
        }
        // SAFETY: SSE is part of x86_64; a prefetch never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(self.d.as_ptr().wrapping_add(r * (hd / 32)).cast()) };
    }
}

/// Every query row of `out` (`[b, h, t, hd]` flattened), the queries of one key/value head
/// together: query `qs[i]` over positions `padding[b]..` of its key/value head up to its own
/// position, found in `(k, v)` through `paging`. A head's queries go in one task, or in several
/// ([`query_parts`]) when there are too few heads to keep the threads busy; which task runs a
/// query changes none of its operations (blocks start at the same position for all of them).
pub fn run<K: Rows, V: Rows>(
    simd: Simd,
    qs: &[f32],
    (k, v): (K, V),
    paging: &Paging,
    s: &Shape,
    padding: &[usize],
    out: &mut [f32],
) {
    let (hd, kv_h) = (s.hd, paging.kv_h);
    let group = s.group(kv_h) * hd;
    let heads = out.len() / group;
    let per_part = s.group(kv_h).div_ceil(query_parts(heads, s.group(kv_h), rayon::current_num_threads()));
    let task = |(g, part, o): (usize, usize, &mut [f32])| {
        let (bi, lens) = s.queries(g, kv_h);
        let at = |j: usize| paging.row(bi, g % kv_h, j);
        // The first new position sees the fewest: its padding bound is every query's (the caller
        // declined padding that a new position would not see past).
        let first = padding.get(bi).copied().unwrap_or(0).min(lens[0] - 1);
        let mine = part * per_part..(part * per_part + o.len() / hd);
        let q = &qs[g * group + mine.start * hd..g * group + mine.end * hd];
        let lens = &lens[mine];
        // SAFETY: `simd` is one this CPU has (Simd::available); the caller checked that the
        // tables hold `len` positions.
        unsafe {
            match (simd, hd) {
                (Simd::Avx512, 64) => queries::<4, K, V>(q, lens, &k, &v, at, first, o),
                (Simd::Avx512, _) => queries::<8, K, V>(q, lens, &k, &v, at, first, o),
                (Simd::Avx2, 64) => super::avx2::queries::<8, K, V>(q, lens, &k, &v, at, first, o),
                (Simd::Avx2, _) => super::avx2::queries::<16, K, V>(q, lens, &k, &v, at, first, o),
            }
        }
    };
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(group)
        .enumerate()
        .flat_map(|(g, o)| o.chunks_mut(per_part * hd).enumerate().map(move |(p, o)| (g, p, o)))
        .collect();
    // Each task reads its head's rows once.
    let bytes = tasks.len() * s.len * (K::row_bytes(hd) + V::row_bytes(hd));
    if bytes < PARALLEL_BYTES {
        tasks.into_iter().for_each(task);
    } else {
        tasks.into_par_iter().for_each(task);
    }
}

/// Tasks per key/value head: one, unless `heads` tasks would leave some of the `threads` idle
/// or unevenly loaded (SmolLM2 has 3 key/value heads: on 2 threads one took two heads, the other
/// one); then enough parts of at least [`PART_QUERIES`] queries (a part reads and widens the
/// head's rows again) that there are two tasks per thread.
fn query_parts(heads: usize, queries: usize, threads: usize) -> usize {
    if heads >= 2 * threads || heads.is_multiple_of(threads.max(1)) {
        return 1;
    }
    (2 * threads).div_ceil(heads).min(queries / PART_QUERIES).max(1)
}

/// Fewest queries in a part of a head's queries (see [`query_parts`]). SmolLM2 at depth 1800:
/// parts of 1 (a decode step's 3 queries in 2 tasks) made decoding slower (70-75 against 76-81
/// tok/s); verify steps of 2 to 8 rows gained from parts of 3 or more (8 rows: 3.37x → 3.04-3.16x
/// a 1-row step).
const PART_QUERIES: usize = 3;

/// Rows of positions `j0..j0 + 16` (the last position repeated past `len`): two table lookups
/// when the rows follow each other (within a block, or across adjacent ones: with blocks of at
/// least 16 positions, equal ends imply equal middles), a lookup each otherwise. A lookup per row
/// made the kernel about 15% slower on a contiguous cache.
#[inline(always)]
pub(super) fn group_rows(at: &impl Fn(usize) -> usize, j0: usize, len: usize) -> [usize; BLOCK_ROWS] {
    let last = (j0 + BLOCK_ROWS - 1).min(len - 1);
    let first = j0.min(last);
    let base = at(first);
    if at(last) == base + (last - first) {
        std::array::from_fn(|r| base + (j0 + r).min(last) - first)
    } else {
        std::array::from_fn(|r| at((j0 + r).min(len - 1)))
    }
}

/// The queries of one key/value head: query `i` (`q[i·hd..]`, `C` × 16 values) over positions
/// `first..lens[i]` (row `at(j)` of `k`/`v`) -> `o[i·hd..]`. Each cached row is widened once for
/// all queries; each query's operations are those it would run alone (the module's invariant).
#[target_feature(enable = "avx512f,f16c")]
unsafe fn queries<const C: usize, K: Rows, V: Rows>(
    q: &[f32],
    lens: &[usize],
    k: &K,
    v: &V,
    at: impl Fn(usize) -> usize,
    first: usize,
    o: &mut [f32],
) {
    let hd = 16 * C;
    let nq = lens.len();
    let len = lens.iter().copied().max().unwrap_or(0);
    let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
    // SAFETY (all loads): q and o hold nq · hd values; rows first..len exist (the caller's promise).
    let mut qv = vec![[_mm512_setzero_ps(); C]; nq];
    for (i, qi) in qv.iter_mut().enumerate() {
        for (c, x) in qi.iter_mut().enumerate() {
            *x = unsafe { _mm512_mul_ps(_mm512_loadu_ps(q.as_ptr().add(i * hd + 16 * c)), scale) };
        }
    }
    // Per query: running max and sum of the online softmax, output accumulators, this block's
    // scores (missing lanes -inf) and weights.
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; nq], vec![0f32; nq]);
    let mut acc = vec![[_mm512_setzero_ps(); C]; nq];
    let mut scores = vec![[f32::NEG_INFINITY; BLOCK_ROWS]; nq];
    let mut weights = vec![[0f32; BLOCK_ROWS]; nq];
    for j0 in (first..len).step_by(BLOCK_ROWS) {
        let n = BLOCK_ROWS.min(len - j0);
        // Rows of the block, and of the next one to prefetch.
        let (rows, ahead) = (group_rows(&at, j0, len), group_rows(&at, j0 + BLOCK_ROWS, len));
        // The queries that see position j0 + r.
        let sees = |i: usize, r: usize| j0 + r < lens[i];
        scores.iter_mut().for_each(|s| *s = [f32::NEG_INFINITY; BLOCK_ROWS]);
        for r in 0..n {
            k.prefetch(hd, ahead[r]);
            // (Loops, not closures: closures do not inherit this function's target features.)
            let mut key = [_mm512_setzero_ps(); C];
            for (c, x) in key.iter_mut().enumerate() {
                *x = unsafe { k.chunk(hd, rows[r], c) };
            }
            for i in (0..nq).filter(|&i| sees(i, r)) {
                let mut dot = [_mm512_setzero_ps(); 2];
                for c in 0..C {
                    dot[c % 2] = _mm512_fmadd_ps(key[c], qv[i][c], dot[c % 2]);
                }
                scores[i][r] = _mm512_reduce_add_ps(_mm512_add_ps(dot[0], dot[1]));
            }
        }
        for i in (0..nq).filter(|&i| sees(i, 0)) {
            let n = BLOCK_ROWS.min(lens[i] - j0);
            let s = unsafe { _mm512_loadu_ps(scores[i].as_ptr()) };
            let block_max = _mm512_reduce_max_ps(s);
            if block_max > max[i] {
                // Earlier weights were relative to the old max.
                let rescale = (max[i] - block_max).exp();
                acc[i].iter_mut().for_each(|a| *a = _mm512_mul_ps(*a, _mm512_set1_ps(rescale)));
                sum[i] *= rescale;
                max[i] = block_max;
            }
            let valid: __mmask16 = ((1u32 << n) - 1) as u16;
            let p = _mm512_maskz_mov_ps(valid, exp(_mm512_sub_ps(s, _mm512_set1_ps(max[i]))));
            sum[i] += _mm512_reduce_add_ps(p);
            unsafe { _mm512_storeu_ps(weights[i].as_mut_ptr(), p) };
        }
        for r in 0..n {
            v.prefetch(hd, ahead[r]);
            let mut value = [_mm512_setzero_ps(); C];
            for (c, x) in value.iter_mut().enumerate() {
                *x = unsafe { v.chunk(hd, rows[r], c) };
            }
            for i in (0..nq).filter(|&i| sees(i, r)) {
                let w = _mm512_set1_ps(weights[i][r]);
                for (c, a) in acc[i].iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(value[c], w, *a);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let inv = _mm512_set1_ps(1.0 / sum[i]);
        for (c, a) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(i * hd + 16 * c), _mm512_mul_ps(*a, inv)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::query_parts;

    #[test]
    fn few_heads_split_their_queries_across_the_threads() {
        // SmolLM2 (3 key/value heads) on 2 threads: an 8-row verify step's 24 queries per head
        // in 2 tasks; a decode step's 3 stay together; heads that fill the threads stay whole.
        assert_eq!(query_parts(3, 24, 2), 2);
        assert_eq!(query_parts(3, 6, 2), 2);
        assert_eq!(query_parts(3, 3, 2), 1);
        assert_eq!(query_parts(3, 8, 4), 2);
        assert_eq!(query_parts(32, 32, 2), 1);
        assert_eq!(query_parts(2, 24, 2), 1);
        assert_eq!(query_parts(1, 16, 2), 4);
        assert_eq!(query_parts(1, 9, 2), 3);
    }
}
