//! Prometheus metrics: requests by endpoint and status, tokens, time to first token and
//! inter-token latency histograms, queue depth, sequences being read and running, KV-cache bytes
//! against the budget, the prefix cache's entries and the prompt tokens it served, and the disk
//! prompt cache's restored tokens, bytes read and written, bad files and size.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
};

use xgen_kvstore::DiskCache;

const LATENCY_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Histogram {
    /// Per bucket (non-cumulative) counts, then the +Inf bucket.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Tokens drafted by prompt lookup, and those of them accepted.
    pub draft_tokens: AtomicU64,
    pub draft_accepted_tokens: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    pub queue_depth: AtomicI64,
    pub running: AtomicI64,
    /// Admitted sequences whose prompts are still being read.
    pub prefilling: AtomicI64,
    pub kv_cache_bytes: AtomicI64,
    /// The pool's bytes (0 until the model is loaded).
    pub kv_budget_bytes: AtomicI64,
    /// KV blocks in the pool, and in use.
    pub kv_blocks: AtomicI64,
    pub kv_blocks_used: AtomicI64,
    /// KV bytes per position of one sequence (0 until the model is loaded).
    pub kv_bytes_per_token: AtomicI64,
    /// Prompt tokens read per engine step (0 until the model is loaded).
    pub prefill_chunk: AtomicI64,
    pub prefix_cache_entries: AtomicI64,
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Sequences whose caches were freed to make room, to be recomputed.
    pub preemptions: AtomicU64,
    /// Preempted sequences waiting to be recomputed.
    pub preempted: AtomicI64,
    /// The disk prompt cache, once the engine opened it (`--cache-dir`).
    pub disk: OnceLock<Arc<DiskCache>>,
}

fn observe(h: &Mutex<Histogram>, seconds: f64) {
    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
    let i = LATENCY_BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(LATENCY_BUCKETS.len());
    h.counts[i] += 1;
    h.sum += seconds;
    h.count += 1;
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((endpoint, status)).or_default() += 1;
    }

    pub fn time_to_first_token(&self, seconds: f64) {
        observe(&self.ttft, seconds);
    }

    pub fn inter_token_latency(&self, seconds: f64) {
        observe(&self.itl, seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP xgen_requests_total HTTP requests by endpoint and status.\n# TYPE xgen_requests_total counter\n");
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "xgen_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let counters = [
            ("xgen_prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens.load(Relaxed) as i64),
            ("xgen_generation_tokens_total", "Tokens generated.", self.generated_tokens.load(Relaxed) as i64),
            (
                "xgen_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache instead of computed.",
                self.prefix_cache_hit_tokens.load(Relaxed) as i64,
            ),
            (
                "xgen_draft_tokens_total",
                "Tokens drafted by prompt lookup and verified.",
                self.draft_tokens.load(Relaxed) as i64,
            ),
            (
                "xgen_draft_accepted_tokens_total",
                "Drafted tokens that verification accepted.",
                self.draft_accepted_tokens.load(Relaxed) as i64,
            ),
            (
                "xgen_preemptions_total",
                "Sequences whose KV cache was freed for room, to be recomputed later.",
                self.preemptions.load(Relaxed) as i64,
            ),
        ];
        let disk = self.disk.get().map(|d| (d.stats(), d.stored_bytes())).unwrap_or_default();
        let disk_counters = [
            (
                "xgen_disk_cache_restored_tokens_total",
                "Prompt tokens restored from the disk prompt cache instead of computed.",
                disk.0.restored_tokens as i64,
            ),
            (
                "xgen_disk_cache_read_bytes_total",
                "Bytes read from the disk prompt cache.",
                disk.0.read_bytes as i64,
            ),
            (
                "xgen_disk_cache_written_bytes_total",
                "Bytes written to the disk prompt cache.",
                disk.0.written_bytes as i64,
            ),
            (
                "xgen_disk_cache_bad_files_total",
                "Disk prompt cache files ignored and removed (truncated, corrupted, foreign, old version).",
                disk.0.bad_files as i64,
            ),
        ];
        for (name, help, v) in counters.into_iter().chain(disk_counters) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let gauges = [
            ("xgen_queue_depth", "Requests waiting for a batch slot.", &self.queue_depth),
            ("xgen_running_sequences", "Sequences in the running batch.", &self.running),
            (
                "xgen_prefilling_sequences",
                "Admitted sequences whose prompts are being read.",
                &self.prefilling,
            ),
            (
                "xgen_kv_cache_bytes",
                "Bytes of KV cache held: admitted sequences and prefix-cache entries.",
                &self.kv_cache_bytes,
            ),
            (
                "xgen_kv_budget_bytes",
                "The KV block pool's bytes: the budget in whole blocks.",
                &self.kv_budget_bytes,
            ),
            ("xgen_kv_blocks", "KV blocks in the pool.", &self.kv_blocks),
            (
                "xgen_kv_blocks_used",
                "KV blocks held by admitted sequences and prefix-cache entries (shared ones once).",
                &self.kv_blocks_used,
            ),
            (
                "xgen_kv_bytes_per_token",
                "KV cache bytes per position of one sequence.",
                &self.kv_bytes_per_token,
            ),
            ("xgen_prefill_chunk_tokens", "Prompt tokens read per engine step at most.", &self.prefill_chunk),
            (
                "xgen_prefix_cache_entries",
                "Finished sequences' caches kept for later prompts.",
                &self.prefix_cache_entries,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Relaxed));
        }
        let name = "xgen_disk_cache_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes of the disk prompt cache's files.\n# TYPE {name} gauge\n{name} {}",
            disk.1
        );
        for (name, help, h) in [
            ("xgen_time_to_first_token_seconds", "From request to first generated token.", &self.ttft),
            ("xgen_inter_token_latency_seconds", "Between consecutive tokens of a sequence.", &self.itl),
        ] {
            let h = h.lock().unwrap_or_else(|e| e.into_inner());
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                h.count, h.sum, h.count
            );
        }
        out
    }
}
