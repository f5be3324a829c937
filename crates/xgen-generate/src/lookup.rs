//! Prompt-lookup drafts (transformers' `prompt_lookup_num_tokens` / `max_matching_ngram_size`,
//! llama.cpp's n-gram speculation): the tokens that followed the most recent earlier occurrence
//! of the sequence's last `n` tokens (`n` from the longest allowed down to 1), proposed as the
//! next ones and verified in one forward pass by [`crate::Sequence::verify`].
//!
//! Drafts only change how many forward passes run, never which tokens come out: each position is
//! still chosen from the model's processed distribution (see `Sequence::verify`). transformers
//! takes the earliest match; the most recent one is taken here (llama.cpp's choice), which on
//! documents tends to continue the passage being copied.

use xgen_model::kernels::EXACT_ROWS;

use crate::error::{GenerateError, Result};

/// Drafted tokens per verify step at most: with the last token, a step of up to
/// [`EXACT_ROWS`] rows, on the kernels' few-row paths where every row's arithmetic is that of a
/// one-row decode step (so greedy output is identical to plain decoding, id for id).
pub const MAX_DRAFT: usize = EXACT_ROWS - 1;

/// The default longest n-gram matched (`--ngram`): measured in docs/performance.md.
pub const DEFAULT_NGRAM: usize = 3;

/// How drafts are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptLookup {
    /// Tokens drafted per step at most (transformers' `prompt_lookup_num_tokens`).
    pub num_tokens: usize,
    /// The longest n-gram matched (transformers' `max_matching_ngram_size`).
    pub max_ngram: usize,
}

impl PromptLookup {
    /// Checks the settings; errors name the parameter.
    pub fn new(num_tokens: usize, max_ngram: usize) -> Result<Self> {
        if !(1..=MAX_DRAFT).contains(&num_tokens) {
            return Err(GenerateError::setting(
                "prompt_lookup_num_tokens",
                format!("{num_tokens} must be in 1..={MAX_DRAFT}"),
            ));
        }
        if max_ngram == 0 {
            return Err(GenerateError::setting("max_matching_ngram_size", "must be at least 1"));
        }
        Ok(Self { num_tokens, max_ngram })
    }
}

/// Up to `limit` tokens that followed the most recent earlier occurrence of `tokens`' last `n`
/// tokens, for the longest `n ≤ max_ngram` that has one; empty when none does.
pub fn draft(tokens: &[u32], max_ngram: usize, limit: usize) -> &[u32] {
    let len = tokens.len();
    if limit == 0 || len < 2 {
        return &[];
    }
    for n in (1..=max_ngram.min(len - 1)).rev() {
        let tail = &tokens[len - n..];
        // Occurrences starting before len - n (not the tail itself), latest first.
        if let Some(start) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == tail) {
            let from = start + n;
            return &tokens[from..(from + limit).min(len)];
        }
    }
    &[]
}

/// Drafted and accepted tokens over a generation (llama.cpp's `draft_n`, `draft_n_accepted`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DraftStats {
    pub drafted: usize,
    pub accepted: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_longest_ngram_then_the_latest_occurrence() {
        let t = [1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3];
        // Trigram "7 2 3" has no earlier occurrence; bigram "2 3" last occurred at 5 -> 5, 7.
        assert_eq!(draft(&t, 3, 2), &[5, 7]);
        assert_eq!(draft(&t, 3, 10), &[5, 7, 2, 3]);
        // Unigrams only: "3" last occurred at 6 -> 5.
        assert_eq!(draft(&t, 1, 1), &[5]);
        // A longer match wins over a later shorter one.
        let t = [8, 2, 3, 4, 1, 3, 6, 8, 2, 3];
        assert_eq!(draft(&t, 3, 3), &[4, 1, 3]);
        assert_eq!(draft(&t, 1, 3), &[6, 8, 2]);
    }

    #[test]
    fn nothing_to_draft() {
        assert!(draft(&[1, 2, 3], 3, 5).is_empty());
        assert!(draft(&[7], 3, 5).is_empty());
        assert!(draft(&[1, 1], 3, 0).is_empty());
        // The match may end at the last token: the draft stops there.
        assert_eq!(draft(&[1, 1], 3, 5), &[1]);
    }

    #[test]
    fn settings_are_checked() {
        assert!(PromptLookup::new(0, 3).is_err());
        assert!(PromptLookup::new(MAX_DRAFT + 1, 3).is_err());
        assert!(PromptLookup::new(4, 0).is_err());
        assert_eq!(PromptLookup::new(4, 2).unwrap(), PromptLookup { num_tokens: 4, max_ngram: 2 });
    }
}
