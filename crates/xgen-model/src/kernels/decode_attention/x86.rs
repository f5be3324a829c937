//! AVX-512 per-head kernel for 16-bit and q8_0 caches with head_dim 64 or 128: one pass over the
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

/// Whether this CPU runs the kernel for `hd` over `paging` (whose blocks, when a sequence has
/// several, hold at least a group of 16 positions: a group crosses at most one block).
pub fn applies(hd: usize, paging: &Paging) -> bool {
    let groups = paging.block >= BLOCK_ROWS || paging.tables.iter().all(|t| t.len() <= 1);
    groups
        && matches!(hd, 64 | 128)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("f16c")
}

/// Positions per block of the online softmax: one score per lane.
const BLOCK_ROWS: usize = 16;
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

/// Every head `bh` of `out` (`[b·h, hd]`): query `qs[bh]` over positions `padding[b]..len` of
/// its key/value head, found in `(k, v)` through `paging`.
pub fn run<K: Rows, V: Rows>(
    qs: &[f32],
    (k, v): (K, V),
    paging: &Paging,
    s: &Shape,
    padding: &[usize],
    out: &mut [f32],
) {
    let (hd, n_rep) = (s.hd, s.h / paging.kv_h);
    let head = |(bh, o): (usize, &mut [f32])| {
        let (bi, head) = (bh / s.h, bh % s.h);
        let at = |j: usize| paging.row(bi, head / n_rep, j);
        let q = &qs[bh * hd..(bh + 1) * hd];
        let first = padding.get(bi).copied().unwrap_or(0).min(s.len.saturating_sub(1));
        // SAFETY: `applies` checked AVX-512F and F16C; the caller checked that the tables hold
        // `len` positions.
        unsafe {
            match hd {
                64 => one_head::<4, K, V>(q, &k, &v, at, first, s.len, o),
                _ => one_head::<8, K, V>(q, &k, &v, at, first, s.len, o),
            }
        }
    };
    let bytes = out.len() / hd * s.len * (K::row_bytes(hd) + V::row_bytes(hd));
    if bytes < PARALLEL_BYTES {
        out.chunks_mut(hd).enumerate().for_each(head);
    } else {
        out.par_chunks_mut(hd).enumerate().for_each(head);
    }
}

/// Rows of positions `j0..j0 + 16` (the last position repeated past `len`): two table lookups
/// when the rows follow each other (within a block, or across adjacent ones: with blocks of at
/// least 16 positions, equal ends imply equal middles), a lookup each otherwise. A lookup per row
/// made the kernel about 15% slower on a contiguous cache.
#[inline(always)]
fn group_rows(at: &impl Fn(usize) -> usize, j0: usize, len: usize) -> [usize; BLOCK_ROWS] {
    let last = (j0 + BLOCK_ROWS - 1).min(len - 1);
    let first = j0.min(last);
    let base = at(first);
    if at(last) == base + (last - first) {
        std::array::from_fn(|r| base + (j0 + r).min(last) - first)
    } else {
        std::array::from_fn(|r| at((j0 + r).min(len - 1)))
    }
}

/// One head: positions `first..len` (row `at(j)` of `k`/`v`, `C` × 16 values per row) -> `o`.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn one_head<const C: usize, K: Rows, V: Rows>(
    q: &[f32],
    k: &K,
    v: &V,
    at: impl Fn(usize) -> usize,
    first: usize,
    len: usize,
    o: &mut [f32],
) {
    let hd = 16 * C;
    let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
    // SAFETY (all loads): q and o hold hd values; rows first..len exist (the caller's promise).
    let qv: [__m512; C] =
        std::array::from_fn(|c| unsafe { _mm512_mul_ps(_mm512_loadu_ps(q.as_ptr().add(16 * c)), scale) });
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    let mut acc = [_mm512_setzero_ps(); C];
    for j0 in (first..len).step_by(BLOCK_ROWS) {
        let n = BLOCK_ROWS.min(len - j0);
        // Scores q·k_j (scaled) of the block; missing lanes stay -inf.
        let mut scores = [f32::NEG_INFINITY; BLOCK_ROWS];
        // Rows of the block, and of the next one to prefetch.
        let (rows, ahead) = (group_rows(&at, j0, len), group_rows(&at, j0 + BLOCK_ROWS, len));
        for (r, score) in scores[..n].iter_mut().enumerate() {
            k.prefetch(hd, ahead[r]);
            let mut dot = [_mm512_setzero_ps(); 2];
            for c in 0..C {
                dot[c % 2] = _mm512_fmadd_ps(unsafe { k.chunk(hd, rows[r], c) }, qv[c], dot[c % 2]);
            }
            *score = _mm512_reduce_add_ps(_mm512_add_ps(dot[0], dot[1]));
        }
        let s = unsafe { _mm512_loadu_ps(scores.as_ptr()) };
        let block_max = _mm512_reduce_max_ps(s);
        if block_max > max {
            // Earlier weights were relative to the old max.
            let rescale = (max - block_max).exp();
            acc.iter_mut().for_each(|a| *a = _mm512_mul_ps(*a, _mm512_set1_ps(rescale)));
            sum *= rescale;
            max = block_max;
        }
        let valid: __mmask16 = ((1u32 << n) - 1) as u16;
        let p = _mm512_maskz_mov_ps(valid, exp(_mm512_sub_ps(s, _mm512_set1_ps(max))));
        sum += _mm512_reduce_add_ps(p);
        let mut weights = [0f32; BLOCK_ROWS];
        unsafe { _mm512_storeu_ps(weights.as_mut_ptr(), p) };
        for (r, &w) in weights[..n].iter().enumerate() {
            v.prefetch(hd, ahead[r]);
            let w = _mm512_set1_ps(w);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(unsafe { v.chunk(hd, rows[r], c) }, w, *a);
            }
        }
    }
    let inv = _mm512_set1_ps(1.0 / sum);
    for (c, a) in acc.iter().enumerate() {
        unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), _mm512_mul_ps(*a, inv)) };
    }
}
