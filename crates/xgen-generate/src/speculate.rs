//! The decode loop of one sequence: a step per token, or with prompt lookup
//! ([`crate::lookup`]) a verify step per draft: the last accepted token and the drafted ones in
//! one forward pass, every row's logits stepped by [`Sequence::verify`], the rejected rows'
//! positions dropped from the cache so that it holds what plain decoding would have written.
//! Each step verifies as much of its draft as [`draft_plan::plan`] finds worth its rows, from the
//! step times measured here.

use std::time::Instant;

use rand::Rng;
use xgen_model::KvCache;

use crate::{
    draft_plan::{self, StepCosts},
    error::Result,
    generator::{forward_beside_masks, Generator, Sequence, Step},
};

impl Generator<'_> {
    /// Generates `seq` to its end from `logits` (the raw logits after its prompt, whose
    /// positions `cache` holds), reporting each token to `on_step`.
    pub(crate) fn decode(
        &self,
        seq: &mut Sequence,
        cache: &mut KvCache,
        logits: Vec<f32>,
        rng: &mut impl Rng,
        on_step: &mut dyn FnMut(&Step),
    ) -> Result<()> {
        let model = self.model;
        // rows[i]: the logits after the last accepted token and the first i drafted ones.
        let (mut rows, mut draft) = (vec![logits], Vec::new());
        let mut costs = StepCosts::default();
        loop {
            self.check_cancel()?;
            let steps = seq.verify(&rows, &draft, rng)?;
            for s in &steps {
                let logprob = s.logprob.as_ref();
                on_step(&Step { row: 0, token: s.token, text: &s.text, logprob, finish: s.finish });
            }
            // The rows fed were the last token and the draft; the rejected drafts leave the cache
            // (also at the end: a session reuses the cache for its next turn).
            cache.truncate(cache.len() + steps.len() - draft.len() - 1);
            if seq.is_finished() {
                return Ok(());
            }
            let last = steps.last().expect("a verify step takes at least one step").token;
            draft = seq.draft();
            draft.truncate(draft_plan::plan(&costs, &[seq.candidate()])[0]);
            let fed: Vec<u32> = std::iter::once(last).chain(draft.iter().copied()).collect();
            let ids = model.ids_tensor(&fed)?; // [1, 1 + draft]
            let started = Instant::now();
            let (next, masks) = forward_beside_masks(vec![&mut *seq], || -> Result<Vec<Vec<f32>>> {
                if fed.len() == 1 {
                    return Ok(vec![model.forward_last(&ids, cache)?.squeeze(0)?.to_vec1()?]);
                }
                let hidden = model.forward_hidden(&ids, cache)?; // [1, t, d]
                Ok(model.logits(&hidden)?.squeeze(0)?.to_vec2()?) // [t, v]
            });
            costs.record(fed.len(), started.elapsed().as_secs_f64());
            masks?;
            rows = next?;
        }
    }
}
