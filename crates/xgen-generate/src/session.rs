//! A conversation's KV cache kept between turns: each turn's prompt (the whole conversation so
//! far) is compared with the tokens the cache holds, and only what follows their common prefix is
//! computed. A 2000-token conversation then costs its new message per reply, not a full prefill;
//! a turn that is cancelled or fails keeps what it read (nothing lost on Ctrl-C).

use rand::Rng;
use xgen_model::{kv_cache::blocks_for, KvCache};

use crate::{
    error::{GenerateError, Result},
    generator::{Generator, Output, Sequence, Step},
    GenerationConfig,
};

/// The cache of one conversation and the tokens at its positions.
#[derive(Default)]
pub struct Session {
    cache: Option<KvCache>,
    tokens: Vec<u32>,
    reused: usize,
}

impl Session {
    /// Prompt tokens the last turn took from the cache (in memory, or restored from the disk
    /// prompt cache) instead of computing.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Positions the cache holds (prompt and answer so far), what the next turn can reuse.
    pub fn cached(&self) -> usize {
        self.tokens.len()
    }
}

impl Generator<'_> {
    /// As [`Generator::generate`] for one prompt, reusing `session`'s cache for the prompt's
    /// longest prefix already computed (at most all but its last token) and keeping the cache,
    /// with the generated tokens, for the next call. Same numbers as without the session.
    pub fn generate_in(
        &self,
        session: &mut Session,
        prompt: &[u32],
        config: &GenerationConfig,
        rng: &mut impl Rng,
        on_step: &mut dyn FnMut(&Step),
    ) -> Result<Output> {
        config.validate()?;
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let model = self.model;
        let (steps, drop) = config.budget(prompt.len(), model.config().max_position_embeddings)?;
        let prompt = &prompt[drop.min(prompt.len() - 1)..];
        model.check_ids(prompt)?;
        let mut seq = self.sequence(prompt, config, steps)?;
        let common = session.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // A dropped (truncated) prompt starts at other positions: nothing carries over.
        let reuse = if drop > 0 { 0 } else { common.min(prompt.len() - 1) };
        session.tokens.clear();
        // A pool for the whole context: its blocks are taken (and their memory committed) only
        // as the conversation's positions are written, so the cache grows without copies.
        let mut cache = match session.cache.take() {
            Some(mut cache) => {
                cache.truncate(reuse);
                cache
            }
            None => {
                let context = model.config().max_position_embeddings;
                KvCache::in_pool(&model.new_pool(blocks_for(context))?, context)
            }
        };
        let restored = self.restore_prompt(&mut cache, prompt); // past what memory held
        let reuse = cache.len();
        session.reused = reuse;
        seq.set_restored(restored);
        let outcome = self.read_and_decode(&mut seq, &mut cache, prompt, reuse, rng, on_step);
        // Whatever ended the turn (its end, a cancel, an error), the cache keeps what it holds:
        // a turn interrupted while reading a long prompt leaves that prompt read for the next.
        session.tokens = prompt.iter().chain(&seq.output().ids).copied().take(cache.len()).collect();
        session.cache = Some(cache);
        outcome?;
        Ok(seq.into_output())
    }

    /// Reads `prompt[reuse..]` into `cache` (saving the prompt's blocks to the disk cache, also
    /// the part read before a cancel), then decodes `seq`.
    fn read_and_decode(
        &self,
        seq: &mut Sequence,
        cache: &mut KvCache,
        prompt: &[u32],
        reuse: usize,
        rng: &mut impl Rng,
        on_step: &mut dyn FnMut(&Step),
    ) -> Result<()> {
        let read = self
            .model
            .ids_tensor(&prompt[reuse..])
            .map_err(Into::into)
            .and_then(|ids| self.prefill(&ids, cache));
        self.save_prompt(cache, prompt);
        let logits = read?; // [1, v]
        self.decode(seq, cache, logits.squeeze(0)?.to_vec1()?, rng, on_step)
    }
}
