//! One engine step after another: admit, read a chunk of prompts, sample, grow caches, decode.
//!
//! A sequence takes the KV blocks of its prompt when admitted and one block more whenever its
//! tokens fill the last (never beyond prompt + `max_tokens`), so memory is taken as tokens are
//! written. When the pool cannot give a running cache its next block, the newest admitted sequence
//! is preempted: its blocks are freed and it waits, ahead of new requests, to be recomputed
//! (prompt and the tokens it generated so far read again as a prompt) and continue where it
//! stopped. A sequence alone always fits (requests larger than the pool are refused), so the
//! oldest always makes progress. A sequence is admitted only while the running ones keep
//! [`KV_STEP`] positions each of room to grow beside it: admitting whatever fits the prompt
//! alone leads to preemptions that recompute long prompts. Reading prompts (admission's
//! reservation, the prefill chunk, scores and progress) is in [`prompt`].

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc::{Receiver, TryRecvError},
    },
    time::Instant,
};

use rand::rngs::StdRng;
use tokio::sync::mpsc::UnboundedSender;
use xgen_generate::{
    draft_plan::{self, Candidate, StepCosts},
    forward_beside_masks, Sequence,
};
use xgen_model::{KvCache, Model, KV_BLOCK};
use xgen_tokenizer::Tokenizer;

use super::{Event, Job};
use crate::{
    kv_pool::{KvPool, Refused},
    metrics::Metrics,
};

mod prompt;

use prompt::Prefilling;

/// Positions of growth every running sequence keeps room for when another is admitted.
const KV_STEP: usize = 256;

/// Sent to every sequence still running when the server shuts down.
const SHUTDOWN: &str = "the server is shutting down";

/// A running sequence (its cache lives in the parallel `caches` vector).
struct Active<'t> {
    seq: Sequence<'t>,
    /// The prompt's ids (the sequence's cache holds them, then the generated ones).
    prompt: Vec<u32>,
    /// Positions it may reach: prompt + `max_tokens`.
    limit: usize,
    /// Admission order (preemption takes the newest).
    admitted: u64,
    rng: StdRng,
    events: UnboundedSender<Event>,
    /// The raw logits after its last token (`rows[0]`) and after each drafted one.
    rows: Vec<Vec<f32>>,
    /// Tokens drafted by prompt lookup for the next step (fed after the last token).
    draft: Vec<u32>,
    submitted: Instant,
    last_token: Option<Instant>,
}

impl Active<'_> {
    /// The tokens its cache holds: the prompt, then the generated ones.
    fn tokens(&self) -> Vec<u32> {
        self.prompt.iter().chain(&self.seq.output().ids).copied().collect()
    }
}

/// What a sequence admitted but not running is: a new request, or a preempted sequence.
enum Waiting<'t> {
    New(Box<Job>),
    Resumed(Box<Active<'t>>),
}

impl Waiting<'_> {
    /// The tokens to read into its cache: the prompt, or prompt + generated tokens.
    fn tokens(&self) -> Vec<u32> {
        match self {
            Self::New(job) => job.prompt.clone(),
            Self::Resumed(a) => a.tokens(),
        }
    }

    /// Positions it may reach.
    fn limit(&self) -> usize {
        match self {
            Self::New(job) => job.prompt.len() + job.budget,
            Self::Resumed(a) => a.limit,
        }
    }

    fn events(&self) -> &UnboundedSender<Event> {
        match self {
            Self::New(job) => &job.events,
            Self::Resumed(a) => &a.events,
        }
    }
}

/// The sequences of an engine: preempted ones waiting for room, admitted ones being read, and
/// running ones (their caches in the parallel `caches`).
#[derive(Default)]
struct Batch<'t> {
    preempted: VecDeque<(u64, Active<'t>)>,
    prefilling: VecDeque<Prefilling<'t>>,
    active: Vec<Active<'t>>,
    caches: Vec<KvCache>,
}

/// The engine thread's state.
pub(super) struct Engine<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    metrics: &'m Metrics,
    pool: KvPool,
    max_batch: usize,
    /// Decode steps' times by row count, for the drafts' plans.
    costs: StepCosts,
    admitted: u64,
}

impl<'m> Engine<'m> {
    pub(super) fn new(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        metrics: &'m Metrics,
        pool: KvPool,
        max_batch: usize,
    ) -> Self {
        Self { model, tokenizer, metrics, pool, max_batch, costs: StepCosts::default(), admitted: 0 }
    }

    pub(super) fn run(&mut self, jobs: &Receiver<Job>, cancel: &AtomicBool) {
        let mut batch = Batch::default();
        // The oldest request not yet admitted (it waits for a slot or for KV room).
        let mut next: Option<Job> = None;
        loop {
            if cancel.load(Relaxed) {
                self.end_all(&mut batch, SHUTDOWN);
            }
            let idle = batch.active.is_empty() && batch.prefilling.is_empty() && batch.preempted.is_empty();
            if idle && next.is_none() {
                match jobs.recv() {
                    Ok(job) => next = Some(job),
                    Err(_) => return,
                }
            }
            self.admit(jobs, &mut next, &mut batch, cancel);
            self.prefill_step(&mut batch);
            self.sample(&mut batch);
            plan_drafts(&mut batch.active, &self.costs);
            self.make_room(&mut batch);
            self.decode(&mut batch);
            self.publish(&batch);
        }
    }

    /// Admits preempted sequences first (oldest first), then waiting requests, while a slot is
    /// free and their first cache step fits.
    fn admit(
        &mut self,
        jobs: &Receiver<Job>,
        next: &mut Option<Job>,
        batch: &mut Batch<'m>,
        cancel: &AtomicBool,
    ) {
        while batch.active.len() + batch.prefilling.len() < self.max_batch {
            if let Some((order, a)) = batch.preempted.pop_front() {
                match self.reserve(Waiting::Resumed(Box::new(a)), order, batch) {
                    Ok(()) => continue,
                    Err(Waiting::Resumed(a)) => batch.preempted.push_front((order, *a)),
                    Err(Waiting::New(_)) => unreachable!("a preempted sequence stays one"),
                }
                return;
            }
            let job = match next.take() {
                Some(job) => job,
                None => match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
                },
            };
            if job.events.is_closed() {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                continue;
            }
            let why = if cancel.load(Relaxed) {
                Some(SHUTDOWN.to_string())
            } else if let Err(e) = self.model.check_ids(&job.prompt) {
                Some(e.to_string())
            } else {
                self.pool.refuse(job.prompt.len() + job.budget).map(refusal)
            };
            if let Some(why) = why {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                let _ = job.events.send(Event::Error(why));
                continue;
            }
            self.admitted += 1;
            match self.reserve(Waiting::New(Box::new(job)), self.admitted, batch) {
                Ok(()) => {
                    self.metrics.queue_depth.fetch_sub(1, Relaxed);
                }
                Err(Waiting::New(job)) => {
                    // Waits (still counted in the queue) until a running sequence ends.
                    self.admitted -= 1;
                    *next = Some(*job);
                    return;
                }
                Err(Waiting::Resumed(_)) => unreachable!("a new request stays one"),
            }
        }
    }

    /// Steps every running sequence through its logits: one token, or with a draft the accepted
    /// drafted tokens and one more (their rejected positions leave the cache and its blocks go
    /// back to the pool); then drafts its next step. Finished and abandoned ones leave, their
    /// caches to the pool.
    fn sample(&mut self, batch: &mut Batch<'m>) {
        let (active, caches) = (std::mem::take(&mut batch.active), std::mem::take(&mut batch.caches));
        for (mut a, cache) in active.into_iter().zip(caches) {
            let mut cache = Some(cache);
            let before = a.seq.output().draft.accepted;
            let stay = match a.seq.verify(&a.rows, &a.draft, &mut a.rng) {
                Ok(steps) => {
                    let m = self.metrics;
                    let accepted = a.seq.output().draft.accepted - before;
                    m.generated_tokens.fetch_add(steps.len() as u64, Relaxed);
                    m.draft_tokens.fetch_add(a.draft.len() as u64, Relaxed);
                    m.draft_accepted_tokens.fetch_add(accepted as u64, Relaxed);
                    if let (false, Some(c)) = (a.draft.is_empty(), cache.as_mut()) {
                        // The step fed the last token and the draft.
                        c.truncate(c.len() + steps.len() - a.draft.len() - 1);
                        c.release_unused();
                    }
                    let finished = steps.iter().any(|o| o.finish.is_some());
                    if finished {
                        // Kept (and saved) before the client sees its last token.
                        if let Some(c) = cache.take() {
                            self.pool.release(a.admitted, c, &a.tokens());
                        }
                    }
                    let mut open = true;
                    for out in steps {
                        record_latency(m, &mut a);
                        if out.finish.is_some() && a.seq.config().prompt_lookup.is_some() {
                            let _ = a.events.send(Event::Drafts(a.seq.output().draft));
                        }
                        open &= a.events.send(Event::Token(out)).is_ok();
                    }
                    open && !finished
                }
                Err(e) => {
                    let _ = a.events.send(Event::Error(e.to_string()));
                    false
                }
            };
            match cache {
                Some(cache) if stay => {
                    a.draft = a.seq.draft();
                    batch.active.push(a);
                    batch.caches.push(cache);
                }
                Some(cache) => self.pool.release(a.admitted, cache, &a.tokens()),
                None => {}
            }
        }
    }

    /// Gives every running cache the blocks for its next token and draft where it needs them
    /// (dropping the draft first, then preempting the newest sequences, while the pool cannot).
    fn make_room(&mut self, batch: &mut Batch<'m>) {
        let mut i = 0;
        while i < batch.active.len() {
            let next = batch.caches[i].len() + 1 + batch.active[i].draft.len();
            match self.pool.ready(&mut batch.caches[i], next) {
                Ok(()) => i += 1,
                Err(Refused::Busy) if !batch.active[i].draft.is_empty() => batch.active[i].draft.clear(),
                Err(Refused::Busy) => {
                    // The newest running sequence gives its cache back (possibly this one).
                    let newest =
                        (0..batch.active.len()).max_by_key(|&j| batch.active[j].admitted).expect("one runs");
                    self.preempt(batch, newest);
                    if newest < i {
                        i -= 1;
                    }
                }
                Err(why) => {
                    let a = batch.active.remove(i);
                    batch.caches.remove(i);
                    let _ = a.events.send(Event::Error(refusal(why)));
                }
            }
        }
    }

    /// Gives up running sequence `i`'s blocks: its cache becomes a prefix entry (evicted, oldest
    /// first, only as far as room is needed; what is left serves its recomputation), and it
    /// waits to be recomputed, oldest first.
    fn preempt(&mut self, batch: &mut Batch<'m>, i: usize) {
        let a = batch.active.remove(i);
        self.pool.release(a.admitted, batch.caches.remove(i), &a.tokens());
        self.metrics.preemptions.fetch_add(1, Relaxed);
        let at = batch.preempted.partition_point(|(order, _)| *order < a.admitted);
        batch.preempted.insert(at, (a.admitted, a));
    }

    /// Feeds every running sequence its last token and its draft in one forward pass (each
    /// weight read once for all rows) and stores each fed token's logits.
    fn decode(&mut self, batch: &mut Batch<'m>) {
        if batch.active.is_empty() {
            return;
        }
        let model = self.model;
        let rows: usize = batch.active.iter().map(|a| 1 + a.draft.len()).sum();
        let started = Instant::now();
        let mut run = || -> xgen_model::Result<Vec<Vec<f32>>> {
            let mut ids = Vec::new();
            let mut lens = Vec::with_capacity(batch.active.len());
            for a in &batch.active {
                ids.push(*a.seq.output().ids.last().unwrap_or(&0));
                ids.extend_from_slice(&a.draft);
                lens.push(1 + a.draft.len());
            }
            // Output formats' masks for the next step are computed while the model runs. A failing
            // one is computed again at its sequence's step, which reports the error to it alone.
            let sequences = batch.active.iter_mut().map(|a| &mut a.seq).collect();
            let (hidden, _) =
                forward_beside_masks(sequences, || model.forward_segments(&ids, &lens, &mut batch.caches));
            let hidden = hidden?; // [1, Σ lens, d]
            Ok(model.logits(&hidden.squeeze(0)?)?.to_vec2()?) // [Σ lens, v]
        };
        match run() {
            Ok(logits) => {
                self.costs.record(rows, started.elapsed().as_secs_f64());
                let mut rows = logits.into_iter();
                for a in &mut batch.active {
                    a.rows = rows.by_ref().take(1 + a.draft.len()).collect();
                }
            }
            Err(e) => {
                // The failed step advanced no cache: each keeps what it held before it.
                for (a, cache) in batch.active.drain(..).zip(batch.caches.drain(..)) {
                    let _ = a.events.send(Event::Error(e.to_string()));
                    self.pool.release(a.admitted, cache, &a.tokens());
                }
            }
        }
    }

    /// Ends every admitted, preempted and running sequence with `why`, their caches kept as
    /// entries (and saved to the disk prompt cache, if any).
    fn end_all(&mut self, batch: &mut Batch<'m>, why: &str) {
        for p in batch.prefilling.drain(..) {
            self.pool.release(p.admitted, p.cache, &p.tokens[..p.done]);
            let _ = p.what.events().send(Event::Error(why.into()));
        }
        for (_, a) in batch.preempted.drain(..) {
            let _ = a.events.send(Event::Error(why.into()));
        }
        for (a, cache) in batch.active.drain(..).zip(batch.caches.drain(..)) {
            self.pool.release(a.admitted, cache, &a.tokens());
            let _ = a.events.send(Event::Error(why.into()));
        }
    }

    fn publish(&self, batch: &Batch<'m>) {
        let m = self.metrics;
        m.running.store(batch.active.len() as i64, Relaxed);
        m.prefilling.store(batch.prefilling.len() as i64, Relaxed);
        m.preempted.store(batch.preempted.len() as i64, Relaxed);
        m.kv_cache_bytes.store(self.pool.held() as i64, Relaxed);
        let (blocks, used) = self.pool.blocks();
        m.kv_blocks.store(blocks as i64, Relaxed);
        m.kv_blocks_used.store(used as i64, Relaxed);
        m.prefix_cache_entries.store(self.pool.entries() as i64, Relaxed);
    }
}

/// Cuts each running sequence's draft to what the step's plan verifies ([`draft_plan::plan`]:
/// the drafted tokens whose expected gain pays for their rows, at most [`EXACT_ROWS`] rows in
/// all, so each row runs as it would alone and a speculating stream's output is plain
/// decoding's even in a full batch).
///
/// [`EXACT_ROWS`]: xgen_model::kernels::EXACT_ROWS
fn plan_drafts(active: &mut [Active<'_>], costs: &StepCosts) {
    let candidates: Vec<Candidate> =
        active.iter().map(|a| Candidate { available: a.draft.len(), rate: a.seq.candidate().rate }).collect();
    for (a, k) in active.iter_mut().zip(draft_plan::plan(costs, &candidates)) {
        a.draft.truncate(k);
    }
}

fn record_latency(metrics: &Metrics, a: &mut Active<'_>) {
    let now = Instant::now();
    match a.last_token {
        None => metrics.time_to_first_token((now - a.submitted).as_secs_f64()),
        Some(t) => metrics.inter_token_latency((now - t).as_secs_f64()),
    }
    a.last_token = Some(now);
}

/// The error a refused request receives.
fn refusal(why: Refused) -> String {
    match why {
        Refused::TooLarge { needed, budget } => format!(
            "the request needs {needed} bytes of KV cache (prompt + max_tokens, in blocks of {KV_BLOCK} positions), over the server's whole budget of {budget} (--kv-budget)"
        ),
        Refused::Busy => "no KV block free while nothing else runs".into(),
        Refused::Model(e) => e,
    }
}
