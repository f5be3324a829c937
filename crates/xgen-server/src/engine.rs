//! The engine thread: owns the model and runs continuous batching. Requests wait in a bounded
//! queue; a request is admitted when a batch slot is free (up to `max_batch` sequences) and its
//! KV cache fits the budget ([`KvPool`]), starting from the longest cached prefix of its prompt.
//! Each engine step then reads at most [`Model::prefill_chunk`] prompt tokens of the admitted
//! prompts (oldest first; several may share a step) and advances every running sequence by one
//! token ([`Model::forward_rows`]: each weight read once), so running streams keep flowing while a
//! long prompt is read. A client that goes away is noticed at the next token it would receive,
//! and its slot and KV cache are freed at once.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError},
        Arc,
    },
    thread::JoinHandle,
    time::Instant,
};

use rand::{rngs::StdRng, SeedableRng};
use tokio::sync::mpsc::UnboundedSender;
use xgen_generate::{GenerationConfig, Sequence, StepOutput};
use xgen_model::{KvCache, Model, Tensor};
use xgen_tokenizer::Tokenizer;

use crate::{
    kv_pool::{KvPool, PrefixCache, Refused, Reserved},
    metrics::Metrics,
};

/// One sequence to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// New tokens allowed.
    pub budget: usize,
    pub seed: u64,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
}

/// What the engine reports for a job.
#[derive(Debug)]
pub enum Event {
    /// A generated token; its `finish` is set on the last one.
    Token(StepOutput),
    Error(String),
}

/// The request side of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: SyncSender<Job>,
    metrics: Arc<Metrics>,
    cancel: Arc<AtomicBool>,
}

impl EngineHandle {
    /// Ends every running and queued sequence with an error, and every later one (shutdown).
    pub fn cancel_all(&self) {
        self.cancel.store(true, Relaxed);
    }

    /// Queues `job`.
    pub fn submit(&self, job: Job) -> Result<(), Rejected> {
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        let result = match self.jobs.try_send(job) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => Rejected::QueueFull,
            Err(TrySendError::Disconnected(_)) => Rejected::Stopped,
        };
        self.metrics.queue_depth.fetch_sub(1, Relaxed);
        Err(result)
    }
}

/// Why a job was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    QueueFull,
    /// The engine thread has ended (model load failure or a crash).
    Stopped,
}

/// Clears the ready flag when the engine thread ends, however it ends.
struct ReadyGuard(Arc<AtomicBool>);

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
}

/// A running sequence (its cache lives in the parallel `caches` vector).
struct Active<'t> {
    seq: Sequence<'t>,
    /// The prompt's ids (the sequence's cache holds them, then the generated ones).
    prompt: Vec<u32>,
    rng: StdRng,
    events: UnboundedSender<Event>,
    logits: Vec<f32>,
    submitted: Instant,
    last_token: Option<Instant>,
}

/// A sequence whose prompt is being read, a chunk per engine step.
struct Prefilling {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already in `cache` (from the prefix cache or earlier chunks).
    done: usize,
}

/// How the engine schedules and bounds its work.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Sequences being read or decoded at most.
    pub max_batch: usize,
    /// Requests waiting for admission at most (beyond: [`Rejected::QueueFull`]).
    pub max_queue: usize,
    /// KV cache bytes at most (running sequences and prefix entries); `None`: unbounded.
    pub kv_budget: Option<usize>,
    pub prefix_cache: PrefixCache,
}

/// Starts the engine thread; `load` runs on it and `ready` is set once the model is loaded.
/// `kv_budget` is resolved on the thread once the model is loaded (so `auto` can see the memory
/// left after the weights).
pub fn spawn(
    load: impl FnOnce() -> Result<Model, String> + Send + 'static,
    options: EngineOptions,
    kv_budget: impl FnOnce() -> Option<usize> + Send + 'static,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> (EngineHandle, JoinHandle<Result<(), String>>) {
    let (tx, rx) = mpsc::sync_channel(options.max_queue);
    let cancel = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle { jobs: tx, metrics: metrics.clone(), cancel: cancel.clone() };
    let thread = std::thread::spawn(move || {
        let model = load()?;
        let tokenizer = Tokenizer::xgen();
        let pool = KvPool::new(&model, options.kv_budget.or_else(kv_budget), options.prefix_cache)?;
        metrics.kv_budget_bytes.store(pool.budget().map_or(-1, |b| b as i64), Relaxed);
        metrics.kv_bytes_per_token.store(pool.bytes_for(1) as i64, Relaxed);
        metrics.prefill_chunk.store(model.prefill_chunk() as i64, Relaxed);
        ready.store(true, Relaxed);
        let _ready = ReadyGuard(ready);
        Engine {
            model: &model,
            tokenizer: &tokenizer,
            metrics: &metrics,
            pool,
            max_batch: options.max_batch,
        }
        .run(&rx, &cancel);
        Ok(())
    });
    (handle, thread)
}

/// Sent to every sequence still running when the server shuts down.
const SHUTDOWN: &str = "the server is shutting down";

/// The engine thread's state.
struct Engine<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    metrics: &'m Metrics,
    pool: KvPool,
    max_batch: usize,
}

/// The sequences of an engine: admitted prompts being read, and running ones (their caches in
/// the parallel `caches`).
#[derive(Default)]
struct Batch<'t> {
    prefilling: VecDeque<Prefilling>,
    active: Vec<Active<'t>>,
    caches: Vec<KvCache>,
}

impl<'m> Engine<'m> {
    fn run(&mut self, jobs: &Receiver<Job>, cancel: &AtomicBool) {
        let mut batch = Batch::default();
        // The oldest request not yet admitted (it waits for a slot or for KV room).
        let mut next: Option<Job> = None;
        loop {
            if cancel.load(Relaxed) {
                self.end_all(&mut batch, SHUTDOWN);
            }
            let idle = batch.active.is_empty() && batch.prefilling.is_empty();
            if idle && next.is_none() {
                match jobs.recv() {
                    Ok(job) => next = Some(job),
                    Err(_) => return,
                }
            }
            self.admit(jobs, &mut next, &mut batch, cancel);
            self.prefill_step(&mut batch);
            self.sample_and_decode(&mut batch);
            self.publish(&batch);
        }
    }

    /// Admits waiting requests while a slot is free and their caches fit.
    fn admit(
        &mut self,
        jobs: &Receiver<Job>,
        next: &mut Option<Job>,
        batch: &mut Batch<'m>,
        cancel: &AtomicBool,
    ) {
        while batch.active.len() + batch.prefilling.len() < self.max_batch {
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
            if cancel.load(Relaxed) {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                let _ = job.events.send(Event::Error(SHUTDOWN.into()));
                continue;
            }
            if let Err(e) = self.model.check_ids(&job.prompt) {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                let _ = job.events.send(Event::Error(e.to_string()));
                continue;
            }
            match self.pool.reserve(self.model, &job.prompt, job.prompt.len() + job.budget) {
                Ok(Reserved { cache, reused }) => {
                    self.metrics.queue_depth.fetch_sub(1, Relaxed);
                    self.metrics.prefix_cache_hit_tokens.fetch_add(reused as u64, Relaxed);
                    batch.prefilling.push_back(Prefilling { job, cache, done: reused });
                }
                Err(Refused::Busy) if !(batch.active.is_empty() && batch.prefilling.is_empty()) => {
                    // Waits (still counted in the queue) until a running sequence ends.
                    *next = Some(job);
                    return;
                }
                Err(why) => {
                    self.metrics.queue_depth.fetch_sub(1, Relaxed);
                    let _ = job.events.send(Event::Error(refusal(why)));
                }
            }
        }
    }

    /// Reads up to one prefill chunk of prompt tokens, oldest admitted prompt first; a prompt
    /// read to its end joins the running batch with its last position's logits.
    fn prefill_step(&mut self, batch: &mut Batch<'m>) {
        let mut tokens = self.model.prefill_chunk();
        while tokens > 0 {
            let Some(p) = batch.prefilling.front_mut() else { return };
            let n = tokens.min(p.job.prompt.len() - p.done);
            let last = p.done + n == p.job.prompt.len();
            let chunk = &p.job.prompt[p.done..p.done + n];
            let mut step = || -> xgen_model::Result<Option<Vec<f32>>> {
                let ids = self.model.ids_tensor(chunk)?;
                if last {
                    Ok(Some(self.model.forward_last(&ids, &mut p.cache)?.squeeze(0)?.to_vec1()?))
                } else {
                    self.model.forward_hidden(&ids, &mut p.cache)?;
                    Ok(None)
                }
            };
            let result = step();
            tokens -= n;
            p.done += n;
            self.metrics.prompt_tokens.fetch_add(n as u64, Relaxed);
            match result {
                Ok(None) => {}
                Ok(Some(logits)) => {
                    let p = batch.prefilling.pop_front().expect("the front prompt");
                    let Job { prompt, config, budget, seed, events, submitted } = p.job;
                    batch.caches.push(p.cache);
                    batch.active.push(Active {
                        seq: Sequence::new(self.tokenizer, prompt.clone(), config, budget),
                        prompt,
                        rng: StdRng::seed_from_u64(seed),
                        events,
                        logits,
                        submitted,
                        last_token: None,
                    });
                }
                Err(e) => {
                    let p = batch.prefilling.pop_front().expect("the front prompt");
                    self.pool.forget(&p.cache);
                    let _ = p.job.events.send(Event::Error(e.to_string()));
                }
            }
        }
    }

    /// Samples one token for every running sequence, drops finished and abandoned ones (their
    /// caches go to the pool), then runs one decode step for the rest.
    fn sample_and_decode(&mut self, batch: &mut Batch<'m>) {
        let mut keep = Vec::with_capacity(batch.active.len());
        for a in batch.active.iter_mut() {
            let stay = match a.seq.step(&a.logits, &mut a.rng) {
                Ok(out) => {
                    record_latency(self.metrics, a);
                    self.metrics.generated_tokens.fetch_add(1, Relaxed);
                    let finished = out.finish.is_some();
                    a.events.send(Event::Token(out)).is_ok() && !finished
                }
                Err(e) => {
                    let _ = a.events.send(Event::Error(e.to_string()));
                    false
                }
            };
            keep.push(stay);
        }
        let (active, caches) = (std::mem::take(&mut batch.active), std::mem::take(&mut batch.caches));
        for ((a, cache), stay) in active.into_iter().zip(caches).zip(keep) {
            if stay {
                batch.active.push(a);
                batch.caches.push(cache);
            } else {
                let tokens: Vec<u32> = a.prompt.iter().chain(&a.seq.output().ids).copied().collect();
                self.pool.release(cache, &tokens);
            }
        }
        if batch.active.is_empty() {
            return;
        }
        if let Err(e) = decode_step(self.model, &mut batch.active, &mut batch.caches) {
            for (a, cache) in batch.active.drain(..).zip(batch.caches.drain(..)) {
                self.pool.forget(&cache);
                let _ = a.events.send(Event::Error(e.clone()));
            }
        }
    }

    /// Ends every admitted and running sequence with `why`.
    fn end_all(&mut self, batch: &mut Batch<'m>, why: &str) {
        for p in batch.prefilling.drain(..) {
            self.pool.forget(&p.cache);
            let _ = p.job.events.send(Event::Error(why.into()));
        }
        for (a, cache) in batch.active.drain(..).zip(batch.caches.drain(..)) {
            self.pool.forget(&cache);
            let _ = a.events.send(Event::Error(why.into()));
        }
    }

    fn publish(&self, batch: &Batch<'m>) {
        let m = self.metrics;
        m.running.store(batch.active.len() as i64, Relaxed);
        m.prefilling.store(batch.prefilling.len() as i64, Relaxed);
        m.kv_cache_bytes.store(self.pool.held() as i64, Relaxed);
        m.prefix_cache_entries.store(self.pool.entries() as i64, Relaxed);
    }
}

/// The error a refused request receives.
fn refusal(why: Refused) -> String {
    match why {
        Refused::TooLarge { needed, budget } => format!(
            "the request needs {needed} bytes of KV cache (prompt + max_tokens), over the server's whole budget of {budget} (--kv-budget)"
        ),
        Refused::Busy => "no KV cache room while nothing else runs".into(),
        Refused::Model(e) => e,
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

/// Feeds every running sequence its last token and stores the next logits.
fn decode_step(model: &Model, active: &mut [Active<'_>], caches: &mut [KvCache]) -> Result<(), String> {
    let mut run = || -> xgen_model::Result<Vec<Vec<f32>>> {
        let last: Vec<u32> = active.iter().map(|a| *a.seq.output().ids.last().unwrap_or(&0)).collect();
        let ids = Tensor::from_vec(last, (active.len(), 1), model.device())?;
        let hidden = model.forward_rows(&ids, caches)?; // [n, 1, d]
        Ok(model.logits(&hidden.squeeze(1)?)?.to_vec2()?)
    };
    let rows = run().map_err(|e| e.to_string())?;
    for (a, row) in active.iter_mut().zip(rows) {
        a.logits = row;
    }
    Ok(())
}
