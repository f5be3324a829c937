//! Reading prompts: a sequence admitted takes its prompt's blocks (starting from the cached
//! prefix, unless its prompt is scored) and waits among the prompts being read; each engine step
//! reads up to one prefill chunk of them, oldest first, reporting progress and gathering scores
//! where the request asked; a prompt read to its end runs with its last position's logits.

use std::{sync::atomic::Ordering::Relaxed, time::Instant};

use rand::{rngs::StdRng, SeedableRng};
use xgen_generate::Sequence;
use xgen_model::{kv_cache::blocks_for, KvCache};

use super::{refusal, Active, Batch, Engine, Waiting, KV_STEP};
use crate::{
    engine::{scores::Scores, Event, Job, Progress, PromptProgress, Scoring},
    kv_pool::{Refused, Reserved, Reuse},
};

/// A sequence whose tokens are being read, a chunk per engine step.
pub(super) struct Prefilling<'t> {
    pub(super) what: Waiting<'t>,
    pub(super) tokens: Vec<u32>,
    pub(super) cache: KvCache,
    /// Tokens already in `cache` (from the prefix cache or earlier chunks).
    pub(super) done: usize,
    pub(super) admitted: u64,
    /// The prompt's scores so far, when its request asked for them.
    scores: Option<Scores>,
    /// When reading began and the positions the prefix cache gave, when its request asked for
    /// progress.
    progress: Option<(Instant, usize)>,
}

impl Prefilling<'_> {
    /// Reports how far the prompt has been read, when asked to.
    fn report_progress(&self) {
        if let Some((started, cache)) = self.progress {
            let _ = self.what.events().send(Event::Progress(PromptProgress {
                total: self.tokens.len(),
                cache,
                processed: self.done,
                time_ms: started.elapsed().as_millis() as u64,
            }));
        }
    }
}

impl<'m> Engine<'m> {
    /// The blocks of `what`'s prompt and its place among the prompts being read; gives `what`
    /// back when there is no room now (and something else runs that will make room).
    pub(super) fn reserve(
        &mut self,
        what: Waiting<'m>,
        order: u64,
        batch: &mut Batch<'m>,
    ) -> Result<(), Waiting<'m>> {
        let tokens = what.tokens();
        // Headroom: every running sequence (and this one) must keep room to grow a step, or
        // admitting this one would only lead to preemptions.
        let running = batch.caches.iter().chain(batch.prefilling.iter().map(|p| &p.cache));
        let (sequences, held) = running.fold((0, 0), |(n, b), c| (n + 1, b + c.held_blocks()));
        if sequences > 0
            && !self.pool.has_room(held + blocks_for(tokens.len()) + (sequences + 1) * blocks_for(KV_STEP))
        {
            return Err(what);
        }
        let (scoring, progress) = match &what {
            Waiting::New(job) => (job.score, job.progress),
            Waiting::Resumed(_) => (Scoring::Off, Progress::Silent),
        };
        let reuse = match scoring {
            Scoring::Off => Reuse::LongestPrefix,
            Scoring::Prompt { .. } => Reuse::Nothing,
        };
        match self.pool.reserve(&tokens, what.limit(), reuse) {
            Ok(Reserved { cache, reused, restored }) => {
                self.metrics.prefix_cache_hit_tokens.fetch_add((reused - restored) as u64, Relaxed);
                batch.prefilling.push_back(Prefilling {
                    what,
                    tokens,
                    cache,
                    done: reused,
                    admitted: order,
                    scores: match scoring {
                        Scoring::Off => None,
                        Scoring::Prompt { top } => Some(Scores::new(top)),
                    },
                    progress: (progress == Progress::Report).then(|| (Instant::now(), reused)),
                });
                Ok(())
            }
            Err(Refused::Busy) if !(batch.active.is_empty() && batch.prefilling.is_empty()) => Err(what),
            Err(why) => {
                let _ = what.events().send(Event::Error(refusal(why)));
                Ok(())
            }
        }
    }

    /// Reads up to one prefill chunk of tokens, oldest admitted first; a sequence read to its end
    /// runs (again) with its last position's logits.
    pub(super) fn prefill_step(&mut self, batch: &mut Batch<'m>) {
        let mut budget = self.model.prefill_chunk();
        while budget > 0 {
            let Some(p) = batch.prefilling.front_mut() else { return };
            if p.what.events().is_closed() {
                // The client left while its prompt was read: what was read stays as an entry.
                let p = batch.prefilling.pop_front().expect("the front sequence");
                self.pool.release(p.admitted, p.cache, &p.tokens[..p.done]);
                continue;
            }
            if p.scores.is_none() {
                let gained = self.pool.catch_up(&mut p.cache, &p.tokens, p.what.limit());
                p.done += gained;
                self.metrics.prefix_cache_hit_tokens.fetch_add(gained as u64, Relaxed);
            }
            let n = budget.min(p.tokens.len() - p.done);
            budget -= n;
            let result = self.read_chunk(p, n);
            self.metrics.prompt_tokens.fetch_add(n as u64, Relaxed);
            match result {
                Ok(None) => {}
                Ok(Some(logits)) => {
                    let p = batch.prefilling.pop_front().expect("the front sequence");
                    self.prompt_read(p, logits, batch);
                }
                Err(e) => {
                    let p = batch.prefilling.pop_front().expect("the front sequence");
                    let _ = p.what.events().send(Event::Error(e.to_string()));
                    self.pool.release(p.admitted, p.cache, &p.tokens[..p.done]);
                }
            }
        }
    }

    /// Reads the next `n` tokens of `p` into its cache (scoring them when asked), publishes its
    /// full blocks and reports progress; the last position's logits once the prompt is read.
    fn read_chunk(&mut self, p: &mut Prefilling<'m>, n: usize) -> xgen_model::Result<Option<Vec<f32>>> {
        let last = p.done + n == p.tokens.len();
        let logits = match p.scores.as_mut() {
            Some(scores) => {
                let row = scores.read(self.model, &mut p.cache, &p.tokens, p.done, n)?;
                last.then_some(row)
            }
            None => {
                let ids = self.model.ids_tensor(&p.tokens[p.done..p.done + n])?; // [1, n]
                if last {
                    Some(self.model.forward_last(&ids, &mut p.cache)?.squeeze(0)?.to_vec1()?)
                // [v]
                } else {
                    self.model.forward_hidden(&ids, &mut p.cache)?;
                    None
                }
            }
        };
        p.done += n;
        self.pool.publish(p.admitted, &p.cache, &p.tokens[..p.done]);
        p.report_progress();
        Ok(logits)
    }

    /// A prompt read to its end: its scores go out, and it runs (a new request, or a preempted
    /// sequence again) with `logits`; a request that only scored its prompt ends here.
    fn prompt_read(&mut self, p: Prefilling<'m>, logits: Vec<f32>, batch: &mut Batch<'m>) {
        if let Some(scores) = p.scores {
            let _ = p.what.events().send(Event::Prompt(scores.into_logprobs()));
        }
        let active = match p.what {
            Waiting::Resumed(a) => Active { rows: vec![logits], draft: Vec::new(), ..*a },
            Waiting::New(job) if job.budget == 0 => {
                // Scored only: its cache is kept as a prefix entry, like any ending.
                self.pool.release(p.admitted, p.cache, &p.tokens);
                return;
            }
            Waiting::New(job) => {
                let Job { prompt, config, constraint, budget, seed, events, submitted, .. } = *job;
                let seq = Sequence::new(self.tokenizer, prompt.clone(), config, budget);
                Active {
                    seq: match constraint {
                        Some(c) => seq.constrained(c),
                        None => seq,
                    },
                    limit: prompt.len() + budget,
                    prompt,
                    admitted: p.admitted,
                    rng: StdRng::seed_from_u64(seed),
                    events,
                    rows: vec![logits],
                    draft: Vec::new(),
                    submitted,
                    last_token: None,
                }
            }
        };
        batch.active.push(active);
        batch.caches.push(p.cache);
    }
}
