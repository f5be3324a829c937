//! Byte-pair encoding of one pre-tokenized piece, exactly as tiktoken's `byte_pair_encode`.
//!
//! Invariant (tiktoken's): a piece that is itself a token is that token. Otherwise start from single
//! bytes and repeatedly merge the adjacent pair whose concatenation has the lowest rank, the
//! leftmost such pair on ties, until no adjacent pair is a token. The output is the ranks of the
//! final parts, left to right.
//!
//! Two implementations of that one rule:
//! - [`merge_scan`] rescans all pairs after each merge: O(n²) for a piece of n bytes, fastest for
//!   the short pieces that make up nearly all text (tiktoken's own choice);
//! - [`merge_heap`] keeps pairs in a min-heap keyed by (rank, start) with lazy invalidation:
//!   O(n log n), used for long pieces (CJK runs, long punctuation or digit runs) where the scan
//!   would be quadratic. The key order reproduces "lowest rank, leftmost on ties".
//!
//! A unit test compares the two on long pieces; the differential test against tiktoken-rs
//! reaches both through random text.

use std::{cmp::Reverse, collections::BinaryHeap};

use rustc_hash::FxHashMap;

use crate::TokenId;

/// The mergeable ranks: token bytes -> rank.
pub(crate) type Ranks = FxHashMap<Vec<u8>, TokenId>;

/// Pieces at least this long use [`merge_heap`].
const HEAP_MIN_LEN: usize = 128;

const NO_RANK: TokenId = TokenId::MAX;

#[inline]
fn rank_of(ranks: &Ranks, bytes: &[u8]) -> TokenId {
    ranks.get(bytes).copied().unwrap_or(NO_RANK)
}

/// Appends the tokens of `piece` to `out`.
#[inline]
pub(crate) fn encode_piece(ranks: &Ranks, piece: &[u8], out: &mut Vec<TokenId>) {
    if let Some(&id) = ranks.get(piece) {
        out.push(id);
        return;
    }
    let bounds = if piece.len() < HEAP_MIN_LEN { merge_scan(ranks, piece) } else { merge_heap(ranks, piece) };
    out.extend(bounds.windows(2).map(|w| rank_of(ranks, &piece[w[0]..w[1]])));
}

/// Part boundaries after merging (`[0, …, piece.len()]`), by rescanning. `piece.len() >= 2`.
pub(crate) fn merge_scan(ranks: &Ranks, piece: &[u8]) -> Vec<usize> {
    // parts[i] = (start of part i, rank of merging part i with part i + 1).
    let mut parts: Vec<(usize, TokenId)> =
        (0..piece.len() - 1).map(|i| (i, rank_of(ranks, &piece[i..i + 2]))).collect();
    parts.push((piece.len() - 1, NO_RANK));
    parts.push((piece.len(), NO_RANK));
    // Rank of merging parts i and i + 1 once i + 1 has absorbed i + 2.
    let merged_rank = |parts: &[(usize, TokenId)], i: usize| {
        if i + 3 < parts.len() {
            rank_of(ranks, &piece[parts[i].0..parts[i + 3].0])
        } else {
            NO_RANK
        }
    };
    loop {
        let (rank, i) = parts[..parts.len() - 1]
            .iter()
            .enumerate()
            .map(|(i, &(_, r))| (r, i))
            .min()
            .expect("at least one pair");
        if rank == NO_RANK {
            break;
        }
        if i > 0 {
            parts[i - 1].1 = merged_rank(&parts, i - 1);
        }
        parts[i].1 = merged_rank(&parts, i);
        parts.remove(i + 1);
    }
    parts.into_iter().map(|(start, _)| start).collect()
}

/// Part boundaries after merging, with a heap. Same result as [`merge_scan`].
pub(crate) fn merge_heap(ranks: &Ranks, piece: &[u8]) -> Vec<usize> {
    let n = piece.len();
    // Parts form a linked list over their start offsets; `end[s]` is the end of the part starting
    // at `s`, `prev[s]` the start of the part before it; `alive[s]` is false once merged away.
    let mut end: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|s| s.wrapping_sub(1)).collect();
    let mut alive = vec![true; n];
    // (rank, left start, right end): merging the parts [left, mid) and [mid, right end).
    let mut heap: BinaryHeap<Reverse<(TokenId, usize, usize)>> = (0..n - 1)
        .filter_map(|s| {
            let r = rank_of(ranks, &piece[s..s + 2]);
            (r != NO_RANK).then_some(Reverse((r, s, s + 2)))
        })
        .collect();
    while let Some(Reverse((_, left, right_end))) = heap.pop() {
        // Stale unless `left` is still a part and it plus its right neighbour span the same bytes.
        let mid = end[left];
        if !alive[left] || mid >= n || end[mid] != right_end {
            continue;
        }
        alive[mid] = false;
        end[left] = right_end;
        if right_end < n {
            prev[right_end] = left;
            let r = rank_of(ranks, &piece[left..end[right_end]]);
            if r != NO_RANK {
                heap.push(Reverse((r, left, end[right_end])));
            }
        }
        if left > 0 {
            let p = prev[left];
            let r = rank_of(ranks, &piece[p..right_end]);
            if r != NO_RANK {
                heap.push(Reverse((r, p, right_end)));
            }
        }
    }
    let mut bounds: Vec<usize> = (0..n).filter(|&s| alive[s]).collect();
    bounds.push(n);
    bounds
}
