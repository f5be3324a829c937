//! [`DiskCache`]: restoring a prompt's stored prefix into a KV cache, and saving a cache's full
//! blocks from a writer thread.
//!
//! Invariants: a block is restored only after its whole file passed [`file::check`]; a restore
//! never leaves the cache holding fewer positions than it had; a save holds the blocks it writes
//! (a fork of the cache) until they are on disk, so the pool cannot reuse them meanwhile; within a
//! chain, earlier blocks are always marked used after later ones, so least-recently-used
//! eviction cuts chains from their ends and a stored prefix stays usable.

use std::{
    io,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc::{sync_channel, Receiver, SyncSender, TrySendError},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::Instant,
};

use xgen_model::{KvCache, Model, KV_BLOCK};

use crate::{
    dir::Dir,
    file::{self, HEADER},
    key::{block_keys, Digest, Fingerprint},
};

/// Where warnings go (a bad file, a full disk): the command line prints them.
pub type Warn = Arc<dyn Fn(&str) + Send + Sync>;

/// Saves waiting for the writer beyond the one it writes; more are dropped (it is a cache).
const QUEUE: usize = 4;

/// Slowest read speed a restore is planned for (a network volume), bytes per second.
const SLOW_DISK: f64 = 200e6;
/// Fastest prompt compute a restore competes with (AMX tiles on many cores), FLOP per second.
const FAST_COMPUTE: f64 = 500e9;

/// What the store did since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Prompt positions restored instead of computed.
    pub restored_tokens: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Files ignored and removed as truncated, corrupted, foreign or of another version.
    pub bad_files: u64,
    /// Milliseconds spent restoring.
    pub read_ms: u64,
}

/// Blocks `first..first + keys.len()` of a prompt, all on disk when planned.
#[derive(Debug)]
pub struct Plan {
    first: usize,
    keys: Vec<Digest>,
}

impl Plan {
    /// Positions held once every planned block is restored.
    pub fn end(&self) -> usize {
        (self.first + self.keys.len()) * KV_BLOCK
    }
}

/// Saves in progress: the count, and a signal when it drops to zero.
#[derive(Default)]
struct Pending {
    count: Mutex<usize>,
    idle: Condvar,
}

struct Shared {
    dir: Dir,
    fingerprint: Fingerprint,
    block_bytes: usize,
    budget: Option<u64>,
    /// FLOP to compute one prompt position (2 × linear parameters).
    flops_per_position: f64,
    warn: Warn,
    restored: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    bad: AtomicU64,
    read_ms: AtomicU64,
    /// Bytes of the store's files as last counted plus those written since.
    stored: AtomicU64,
    /// A write failed (full disk?) and was reported; the next success clears it.
    failing: AtomicBool,
    pending: Pending,
}

/// A store of KV blocks in a directory, for one model (fingerprint) and KV storage.
pub struct DiskCache {
    shared: Arc<Shared>,
    queue: Option<SyncSender<Save>>,
    writer: Option<JoinHandle<()>>,
}

/// A cache's first full blocks to write: the fork holds them, `keys[k]` names block `k`.
struct Save {
    cache: KvCache,
    keys: Vec<Digest>,
}

impl DiskCache {
    /// Opens the store in `dir` for `model`'s blocks under `fingerprint`, keeping its files within
    /// `budget` bytes (`None`: unbounded).
    pub fn open(
        dir: &Path,
        budget: Option<u64>,
        fingerprint: Fingerprint,
        model: &Model,
        warn: Warn,
    ) -> io::Result<Self> {
        let dir = Dir::open(dir)?;
        let stored = match budget {
            Some(b) => dir.evict(b),
            None => dir.files().iter().map(|f| f.bytes).sum(),
        };
        let block_bytes = model.kv_block_bytes().map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            dir,
            fingerprint,
            block_bytes,
            budget,
            flops_per_position: 2.0 * model.linear_parameters() as f64,
            warn,
            restored: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            read_ms: AtomicU64::new(0),
            stored: AtomicU64::new(stored),
            failing: AtomicBool::new(false),
            pending: Pending::default(),
        });
        let (queue, jobs) = sync_channel(QUEUE);
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("xgen-kv-writer".into())
                .spawn(move || write_loop(&shared, jobs))?
        };
        Ok(Self { shared, queue: Some(queue), writer: Some(writer) })
    }

    /// What the store did so far.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            restored_tokens: s.restored.load(Relaxed),
            read_bytes: s.read.load(Relaxed),
            written_bytes: s.written.load(Relaxed),
            bad_files: s.bad.load(Relaxed),
            read_ms: s.read_ms.load(Relaxed),
        }
    }

    /// Bytes of the store's files (as last counted, plus writes since).
    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored.load(Relaxed)
    }

    /// The stored blocks that continue a cache holding `from` positions of `prompt`: from the
    /// block holding position `from` while each next one is on disk, never reaching the prompt's
    /// last token (its logits must be computed). `None` when they would add nothing, or when
    /// reading them could take longer than computing them (tiny prefixes of tiny models).
    pub fn plan(&self, prompt: &[u32], from: usize) -> Option<Plan> {
        let usable = prompt.len().saturating_sub(1) / KV_BLOCK * KV_BLOCK;
        if usable <= from {
            return None;
        }
        let first = from / KV_BLOCK;
        let keys: Vec<Digest> = block_keys(&self.shared.fingerprint, &prompt[..usable])
            .into_iter()
            .skip(first)
            .take_while(|k| self.shared.dir.exists(k))
            .collect();
        let plan = Plan { first, keys };
        let gained = plan.end().saturating_sub(from);
        let read_s = (plan.keys.len() * (HEADER + self.shared.block_bytes)) as f64 / SLOW_DISK;
        let compute_s = gained as f64 * self.shared.flops_per_position / FAST_COMPUTE;
        (gained > 0 && read_s < compute_s).then_some(plan)
    }

    /// Restores `plan`'s blocks into `cache` (its blocks up to [`Plan::end`] ready: held alone)
    /// in order until one is missing or bad (warned about and removed); the positions `cache`
    /// holds afterwards, never fewer than before.
    pub fn restore(&self, cache: &mut KvCache, plan: &Plan) -> usize {
        let (s, start, from) = (&self.shared, Instant::now(), cache.len());
        let mut buf = Vec::with_capacity(HEADER + s.block_bytes);
        let mut done = 0;
        for (i, key) in plan.keys.iter().enumerate() {
            match s.dir.read(key, &mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => break, // evicted meanwhile
                Err(e) => {
                    (s.warn)(&format!(
                        "KV cache file {}: {e}; computing it instead",
                        s.dir.path(key).display()
                    ));
                    break;
                }
            }
            let payload = match file::check(&buf, &s.fingerprint, key, s.block_bytes) {
                Ok(p) => p,
                Err(why) => {
                    let path = s.dir.path(key);
                    (s.warn)(&format!(
                        "KV cache file {}: {why}; removed, computing it instead",
                        path.display()
                    ));
                    s.dir.remove(key);
                    s.bad.fetch_add(1, Relaxed);
                    break;
                }
            };
            if let Err(e) = cache.write_block(plan.first + i, payload) {
                (s.warn)(&format!("restoring a KV block: {e}"));
                break;
            }
            s.read.fetch_add(buf.len() as u64, Relaxed);
            done += 1;
        }
        plan.keys[..done].iter().rev().for_each(|k| s.dir.touch(k));
        let held = from.max((plan.first + done) * KV_BLOCK);
        cache.set_restored(held).expect("restored positions lie in the cache's blocks");
        s.restored.fetch_add((held - from) as u64, Relaxed);
        s.read_ms.fetch_add(start.elapsed().as_millis() as u64, Relaxed);
        held
    }

    /// [`DiskCache::plan`] and [`DiskCache::restore`] for a cache whose own pool has the blocks
    /// (the command line's and Python's caches): the prompt positions it holds afterwards.
    pub fn restore_prompt(&self, cache: &mut KvCache, prompt: &[u32]) -> usize {
        let from = cache.len();
        match self.plan(prompt, from) {
            Some(plan) if cache.ready(plan.end()).is_ok() => self.restore(cache, &plan),
            _ => from,
        }
    }

    /// Saves the full blocks of `cache`, which holds `tokens` at its first positions, that the
    /// store lacks: in the background, holding the blocks until written. Dropped when the
    /// writer is far behind.
    pub fn save(&self, cache: &KvCache, tokens: &[u32]) {
        let full = cache.len().min(tokens.len()) / KV_BLOCK;
        let Some(queue) = &self.queue else { return };
        if full == 0 {
            return;
        }
        let keys = block_keys(&self.shared.fingerprint, &tokens[..full * KV_BLOCK]);
        let Ok(cache) = cache.fork(full * KV_BLOCK, full * KV_BLOCK) else { return };
        let pending = &self.shared.pending;
        *pending.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            queue.try_send(Save { cache, keys })
        {
            done_one(pending);
        }
    }

    /// Waits until every save so far is on disk (or failed).
    pub fn flush(&self) {
        let p = &self.shared.pending;
        let mut count = p.count.lock().unwrap_or_else(|e| e.into_inner());
        while *count > 0 {
            count = p.idle.wait(count).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for DiskCache {
    /// Finishes the saves in progress.
    fn drop(&mut self) {
        self.queue.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn done_one(p: &Pending) {
    let mut count = p.count.lock().unwrap_or_else(|e| e.into_inner());
    *count -= 1;
    if *count == 0 {
        p.idle.notify_all();
    }
}

/// The writer thread: each save's missing blocks, last first (so a chain's earlier blocks are
/// its most recently used), then the budget.
fn write_loop(s: &Shared, jobs: Receiver<Save>) {
    let mut buf = Vec::with_capacity(s.block_bytes);
    for save in jobs {
        for (k, key) in save.keys.iter().enumerate().rev() {
            if s.dir.exists(key) {
                s.dir.touch(key);
                continue;
            }
            buf.clear();
            if let Err(e) = save.cache.read_block(k, &mut buf) {
                (s.warn)(&format!("saving a KV block: {e}"));
                break;
            }
            let header = file::header(&s.fingerprint, key, &buf);
            match s.dir.write(key, &[&header, &buf]) {
                Ok(n) => {
                    s.written.fetch_add(n, Relaxed);
                    s.stored.fetch_add(n, Relaxed);
                    s.failing.store(false, Relaxed);
                }
                Err(e) => {
                    if !s.failing.swap(true, Relaxed) {
                        (s.warn)(&format!(
                            "KV cache directory: {e}; prompts are not saved until writes succeed"
                        ));
                    }
                    break;
                }
            }
        }
        drop(save.cache); // the blocks go back to the pool
        if let Some(budget) = s.budget.filter(|&b| s.stored.load(Relaxed) > b) {
            s.stored.store(s.dir.evict(budget), Relaxed);
        }
        done_one(&s.pending);
    }
}
