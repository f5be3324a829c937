//! The engine thread: owns the model and runs continuous batching. Requests wait in a bounded
//! queue; between decode steps new ones are prefilled and join the running batch (up to
//! `max_batch` sequences), finished or abandoned ones leave it. One decode step advances every
//! running sequence together ([`Model::forward_rows`]: each weight is read once per step).
//! A client that goes away is noticed at the next token it would receive, and its slot and KV
//! cache are freed at once.

use std::{
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

use crate::metrics::Metrics;

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
    rng: StdRng,
    events: UnboundedSender<Event>,
    logits: Vec<f32>,
    submitted: Instant,
    last_token: Option<Instant>,
}

/// Starts the engine thread; `load` runs on it and `ready` is set once the model is loaded.
pub fn spawn(
    load: impl FnOnce() -> Result<Model, String> + Send + 'static,
    max_batch: usize,
    max_queue: usize,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> (EngineHandle, JoinHandle<Result<(), String>>) {
    let (tx, rx) = mpsc::sync_channel(max_queue);
    let cancel = Arc::new(AtomicBool::new(false));
    let handle = EngineHandle { jobs: tx, metrics: metrics.clone(), cancel: cancel.clone() };
    let thread = std::thread::spawn(move || {
        let model = load()?;
        let tokenizer = Tokenizer::xgen();
        ready.store(true, Relaxed);
        let _ready = ReadyGuard(ready);
        run(&model, &tokenizer, &rx, max_batch, &metrics, &cancel);
        Ok(())
    });
    (handle, thread)
}

/// Sent to every sequence still running when the server shuts down.
const SHUTDOWN: &str = "the server is shutting down";

fn run(
    model: &Model,
    tokenizer: &Tokenizer,
    jobs: &Receiver<Job>,
    max_batch: usize,
    metrics: &Metrics,
    cancel: &AtomicBool,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut caches: Vec<KvCache> = Vec::new();
    loop {
        if cancel.load(Relaxed) && !active.is_empty() {
            for a in active.drain(..) {
                let _ = a.events.send(Event::Error(SHUTDOWN.into()));
            }
            caches.clear();
            metrics.running.store(0, Relaxed);
        }
        // Admit waiting jobs between steps; block only when idle.
        while active.len() < max_batch {
            let job = if active.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            metrics.queue_depth.fetch_sub(1, Relaxed);
            if job.events.is_closed() {
                continue;
            }
            if cancel.load(Relaxed) {
                let _ = job.events.send(Event::Error(SHUTDOWN.into()));
                continue;
            }
            match prefill(model, &job) {
                Ok((cache, logits)) => {
                    metrics.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
                    caches.push(cache);
                    active.push(Active {
                        seq: Sequence::new(tokenizer, job.prompt, job.config, job.budget),
                        rng: StdRng::seed_from_u64(job.seed),
                        events: job.events,
                        logits,
                        submitted: job.submitted,
                        last_token: None,
                    });
                }
                Err(e) => {
                    let _ = job.events.send(Event::Error(e));
                }
            }
        }
        // Sample one token for every running sequence; drop finished and abandoned ones.
        let mut keep = Vec::with_capacity(active.len());
        for a in active.iter_mut() {
            let stay = match a.seq.step(&a.logits, &mut a.rng) {
                Ok(out) => {
                    record_latency(metrics, a);
                    metrics.generated_tokens.fetch_add(1, Relaxed);
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
        let mut it = keep.iter();
        active.retain(|_| *it.next().unwrap_or(&false));
        let mut it = keep.iter();
        caches.retain(|_| *it.next().unwrap_or(&false));
        metrics.running.store(active.len() as i64, Relaxed);
        metrics.kv_cache_bytes.store(caches.iter().map(KvCache::size_bytes).sum::<usize>() as i64, Relaxed);
        if active.is_empty() {
            continue;
        }
        if let Err(e) = decode_step(model, &mut active, &mut caches) {
            for a in active.drain(..) {
                let _ = a.events.send(Event::Error(e.clone()));
            }
            caches.clear();
        }
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

/// Runs a job's prompt through the model in its own cache; returns the cache and the last logits.
fn prefill(model: &Model, job: &Job) -> Result<(KvCache, Vec<f32>), String> {
    let run = || -> xgen_model::Result<(KvCache, Vec<f32>)> {
        let mut cache = model.new_cache(1, job.prompt.len() + job.budget)?;
        let logits = model.forward_last(&model.ids_tensor(&job.prompt)?, &mut cache)?;
        Ok((cache, logits.squeeze(0)?.to_vec1()?))
    };
    run().map_err(|e| e.to_string())
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
