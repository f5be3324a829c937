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

use crate::{
    draft_plan::{Acceptance, Candidate},
    error::{GenerateError, Result},
};

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

/// A sequence's drafting state: what its last lookup found (a step may verify only a part of it)
/// and how often its drafted tokens are accepted.
#[derive(Clone, Debug, Default)]
pub(crate) struct Drafts {
    acceptance: Acceptance,
    looked_up: Vec<u32>,
}

impl Drafts {
    /// Up to `num_tokens` (and `room`) tokens drafted from `tokens` (prompt and output), kept
    /// for [`Drafts::observe`]; none without prompt lookup.
    pub(crate) fn look_up(&mut self, lookup: Option<PromptLookup>, tokens: &[u32], room: usize) -> Vec<u32> {
        self.looked_up = match lookup {
            Some(l) => draft(tokens, l.max_ngram, l.num_tokens.min(room)).to_vec(),
            None => Vec::new(),
        };
        self.looked_up.clone()
    }

    pub(crate) fn candidate(&self) -> Candidate {
        Candidate { available: self.looked_up.len(), rate: self.acceptance.rate() }
    }

    /// Updates the acceptance rate from a verify step that fed `draft` and chose `chosen` (the
    /// accepted drafted tokens, then the model's own or the end), `accepted` of the draft taken:
    /// the accepted ones, the rejected one (not the positions after an end inside the draft:
    /// they were never tried), and, where the lookup had drafted further than the step
    /// verified, whether the model's own token equals the next looked-up one.
    pub(crate) fn observe(&mut self, draft: &[u32], chosen: &[u32], accepted: usize) {
        (0..accepted).for_each(|_| self.acceptance.observe(true));
        if accepted < draft.len() && accepted < chosen.len() {
            self.acceptance.observe(false);
        } else if chosen.len() == draft.len() + 1 && self.looked_up.starts_with(draft) {
            if let Some(&next) = self.looked_up.get(draft.len()) {
                self.acceptance.observe(chosen[draft.len()] == next);
            }
        }
        self.looked_up.clear();
    }
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
