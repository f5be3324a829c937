//! The engine thread: owns the model and runs continuous batching. Requests wait in a bounded
//! queue; a request is admitted when a batch slot is free (up to `max_batch` sequences) and its
//! first KV cache step fits the budget ([`KvPool`]), starting from the longest cached prefix of
//! its prompt (in memory, then in the disk prompt cache); caches grow as tokens are written, and preemption keeps them within the budget
//! ([`schedule`]).
//! Each engine step then reads at most [`Model::prefill_chunk`] prompt tokens of the admitted
//! prompts (oldest first; several may share a step) and advances every running sequence by one
//! token, or verifies its prompt-lookup draft, in one pass ([`Model::forward_segments`]: each
//! weight read once), so running streams keep flowing while a long prompt is read. A client that goes away is noticed at the next token it would receive,
//! and its slot and KV cache are freed at once. A job may ask for its prompt's scores (every
//! prompt token's log-probability; such a prompt is read whole, reusing no cache) and for progress
//! reports while its prompt is read.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc::{self, SyncSender, TrySendError},
        Arc,
    },
    thread::JoinHandle,
    time::Instant,
};

use tokio::sync::mpsc::UnboundedSender;
use xgen_generate::{Constraint, DraftStats, GenerationConfig, ModelText, StepOutput, TokenLogprob};
use xgen_kvstore::DiskCache;
use xgen_model::Model;

use crate::{
    kv_pool::{KvPool, PrefixCache},
    metrics::Metrics,
};

/// One sequence to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub config: GenerationConfig,
    /// The output format's matcher, when the request names one.
    pub constraint: Option<Constraint>,
    /// New tokens allowed; 0 scores the prompt only (with `score`).
    pub budget: usize,
    pub seed: u64,
    /// Whether the prompt's tokens are scored ([`Event::Prompt`]).
    pub score: Scoring,
    /// Whether [`Event::Progress`] is sent while the prompt is read.
    pub progress: Progress,
    pub events: UnboundedSender<Event>,
    pub submitted: Instant,
}

/// Whether a job's prompt tokens get log-probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    Off,
    /// Each prompt token's log-probability and the `top` most likely alternatives. The prompt is
    /// then read whole (no prefix reuse: every position's logits are needed).
    Prompt {
        top: usize,
    },
}

/// Whether a job reports how far its prompt has been read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    Silent,
    Report,
}

/// How far a prompt has been read (llama.cpp's `prompt_progress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptProgress {
    /// Prompt tokens in all.
    pub total: usize,
    /// Of them, taken from the prefix cache (memory or disk) without computing.
    pub cache: usize,
    /// In the cache now (cached and computed).
    pub processed: usize,
    /// Since the prompt began to be read.
    pub time_ms: u64,
}

/// What the engine reports for a job.
#[derive(Debug)]
pub enum Event {
    /// After each chunk of the prompt read, with [`Progress::Report`].
    Progress(PromptProgress),
    /// The prompt's scores, with [`Scoring::Prompt`]: one entry per prompt token, `None` for the
    /// first (nothing predicts it). A job with no budget ends with it.
    Prompt(Vec<Option<TokenLogprob>>),
    /// A generated token; its `finish` is set on the last one.
    Token(StepOutput),
    /// Tokens drafted by prompt lookup and accepted, sent before the last token of a sequence
    /// that speculated.
    Drafts(DraftStats),
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

/// How the engine schedules and bounds its work.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Sequences being read or decoded at most.
    pub max_batch: usize,
    /// Requests waiting for admission at most (beyond: [`Rejected::QueueFull`]).
    pub max_queue: usize,
    /// KV cache bytes at most (running sequences and prefix entries); `None`: room for
    /// `max_batch` sequences of the model's whole context.
    pub kv_budget: Option<usize>,
    pub prefix_cache: PrefixCache,
}

/// Opens the disk prompt cache for the loaded model (on the engine thread, after loading).
pub type OpenDiskCache = Box<dyn FnOnce(&Model) -> Result<DiskCache, String> + Send>;

/// Starts the engine thread; `load` runs on it and `ready` is set once the model is loaded.
/// `kv_budget` is resolved on the thread once the model is loaded (so `auto` can see the memory
/// left after the weights).
pub fn spawn(
    load: impl FnOnce() -> Result<Model, String> + Send + 'static,
    options: EngineOptions,
    text: Arc<ModelText>,
    kv_budget: impl FnOnce() -> Option<usize> + Send + 'static,
    disk_cache: Option<OpenDiskCache>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> (EngineHandle, JoinHandle<Result<(), String>>) {
    let (tx, rx) = mpsc::sync_channel(options.max_queue);
    let cancel = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle { jobs: tx, metrics: metrics.clone(), cancel: cancel.clone() };
    let thread = std::thread::spawn(move || {
        let model = load()?;
        let budget = options.kv_budget.or_else(kv_budget);
        let disk = disk_cache.map(|open| open(&model)).transpose()?.map(Arc::new);
        if let Some(d) = &disk {
            let _ = metrics.disk.set(d.clone());
        }
        let pool = KvPool::new(&model, budget, options.max_batch, options.prefix_cache, disk)?;
        metrics.kv_budget_bytes.store(pool.budget() as i64, Relaxed);
        metrics.kv_blocks.store(pool.blocks().0 as i64, Relaxed);
        metrics.kv_bytes_per_token.store(pool.bytes_per_token() as i64, Relaxed);
        metrics.prefill_chunk.store(model.prefill_chunk() as i64, Relaxed);
        ready.store(true, Relaxed);
        let _ready = ReadyGuard(ready);
        Engine::new(&model, &text.tokenizer, &metrics, pool, options.max_batch).run(&rx, &cancel);
        Ok(())
    });
    (handle, thread)
}

mod schedule;
mod scores;

use schedule::Engine;
