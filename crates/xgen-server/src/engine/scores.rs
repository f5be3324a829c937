//! A scored prompt's log-probabilities: each prompt token's under the model given the tokens
//! before it (with the most likely alternatives), gathered chunk by chunk as the prompt is read,
//! from the same f32 logits and normaliser as `xgen perplexity` ([`token_logprob`] over
//! [`xgen_model::perplexity::log_sum_exp`]).

use xgen_generate::{generator::token_logprob, TokenLogprob};
use xgen_model::{KvCache, Model};

/// The scores of one prompt so far.
pub(super) struct Scores {
    /// Alternatives per position.
    top: usize,
    /// One per prompt token read, `None` for the first.
    logprobs: Vec<Option<TokenLogprob>>,
}

impl Scores {
    pub(super) fn new(top: usize) -> Self {
        Self { top, logprobs: vec![None] }
    }

    /// Reads `tokens[at..at + n]` into `cache`, scoring the prompt tokens they predict
    /// (`tokens[at + 1..=at + n]`, as far as the prompt goes), and returns the last row's logits.
    pub(super) fn read(
        &mut self,
        model: &Model,
        cache: &mut KvCache,
        tokens: &[u32],
        at: usize,
        n: usize,
    ) -> xgen_model::Result<Vec<f32>> {
        let ids = model.ids_tensor(&tokens[at..at + n])?; // [1, n]
        let hidden = model.forward_hidden(&ids, cache)?; // [1, n, d]
        let mut rows: Vec<Vec<f32>> = model.logits(&hidden.squeeze(0)?)?.to_vec2()?; // [n, v]
        for (j, row) in rows.iter().enumerate() {
            if let Some(&next) = tokens.get(at + j + 1) {
                self.logprobs.push(Some(token_logprob(row, next, self.top)));
            }
        }
        Ok(rows.pop().unwrap_or_default())
    }

    pub(super) fn into_logprobs(self) -> Vec<Option<TokenLogprob>> {
        self.logprobs
    }
}
