//! `xgen serve`: the OpenAI-compatible HTTP server.

use std::net::SocketAddr;

use clap::Args;
use xgen_server::{EngineOptions, PrefixCache, ServeOptions, Ui};

use crate::{
    cache_args::{parse_bytes, warn_on_stderr, CacheArgs},
    exit::bad_input,
    model_args::{ModelArgs, ModelSettings, Source},
};

/// Prompt tokens per engine step unless `--prefill-chunk` says otherwise: each step pauses the
/// running streams while it reads them. 128 halved the streams' per-token p50 against 256 beside a
/// client reading 3000-token prompts (`cargo bench -p xgen-server --bench load`) and read an
/// 8-layer 7B's 4096-token prompt as fast (docs/performance.md); 64 lost 17% there.
const SERVE_PREFILL_CHUNK: usize = 128;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on the API endpoints (also from XGEN_API_KEY).
    #[arg(long, env = "XGEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together at most (continuous batching).
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Requests waiting for a slot at most; beyond it, 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Context per sequence, prompt and completion (default and maximum: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// On SIGTERM or Ctrl-C, seconds in-flight requests may take to finish before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Largest request body accepted (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// KV cache memory at most, running sequences and prefix cache together: bytes (suffixes K,
    /// M, G, T: powers of 1024), or `auto`: the memory available once the model is loaded, less 1 GiB
    /// for activations and the runtime. A request waits in the queue until its cache (prompt +
    /// max_tokens) fits; one that never could is a 400.
    #[arg(long, default_value = "auto", value_parser = parse_kv_budget)]
    pub kv_budget: KvBudget,
    /// Keep finished sequences' caches so later prompts that start the same way (the XGen-Inst
    /// header, a system prompt, earlier turns, the same document) skip those tokens.
    #[arg(long, value_enum, default_value_t = PrefixCacheArg::On)]
    pub prefix_cache: PrefixCacheArg,
    /// Do not serve the chat page at `/` (the API only).
    #[arg(long)]
    pub no_ui: bool,
    /// Prompt-lookup speculation by default: draft up to N tokens (1-14; 6 when N is left out) per step from each
    /// request's prompt and output (a request's `prompt_lookup_num_tokens` overrides it; 0 turns
    /// it off). The output is the same as without it.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "6")]
    pub prompt_lookup: Option<usize>,
    /// With --prompt-lookup: the longest n-gram matched (a request's `max_matching_ngram_size`
    /// overrides it).
    #[arg(long, value_name = "M", requires = "prompt_lookup", default_value_t = xgen_generate::lookup::DEFAULT_NGRAM)]
    pub ngram: usize,
    /// This replica's name, sent in every response's `X-Xgen-Replica` header (default: the
    /// host name, a pod's name in Kubernetes).
    #[arg(long, env = "XGEN_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// The disk prompt cache: ended requests' KV blocks are saved under --cache-dir, and prompts
    /// restore them after the in-memory prefix cache (also after a restart, and across replicas
    /// sharing the directory).
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// The host's name (`$HOSTNAME`, else `/etc/hostname`, else `xgen`).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "xgen".into())
}

/// `--kv-budget`, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBudget {
    Auto,
    Bytes(usize),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixCacheArg {
    On,
    Off,
}

fn parse_kv_budget(s: &str) -> Result<KvBudget, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(KvBudget::Auto);
    }
    let bytes = parse_bytes(s).map_err(|e| format!("{e}, or auto"))?;
    usize::try_from(bytes)
        .map(KvBudget::Bytes)
        .map_err(|_| format!("{s:?}: larger than this machine's memory sizes"))
}

/// `auto`: the memory available now (after the weights), less 1 GiB; unbounded where the system
/// does not say (no `/proc/meminfo`).
fn auto_kv_budget() -> Option<usize> {
    const MARGIN: usize = 1 << 30;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kib * 1024).saturating_sub(MARGIN).max(1))
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    if args.max_batch == 0 || args.max_queue == 0 {
        return Err(bad_input("--max-batch and --max-queue must be at least 1"));
    }
    let source = args.model.source()?;
    let config = source.config()?;
    let context = args.ctx.unwrap_or(config.max_position_embeddings);
    if context == 0 || context > config.max_position_embeddings {
        return Err(bad_input(format!("--ctx {context} must be in 1..={}", config.max_position_embeddings)));
    }
    let text = xgen_generate::ModelText::of(&source, &config)?;
    let mut defaults = source.generation_config(&config)?;
    text.add_stops(&mut defaults);
    if let Some(n) = args.prompt_lookup {
        defaults.prompt_lookup = Some(
            xgen_generate::PromptLookup::new(n, args.ngram)
                .map_err(|e| bad_input(format!("--prompt-lookup: {e}")))?,
        );
    }
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| bad_input(format!("--host {} --port {}: {e}", args.host, args.port)))?;
    let model_name = match &source {
        Source::Dir(_) | Source::Gguf(_) => args.model.model.clone(),
        Source::Random { preset, .. } => format!("random-{preset}"),
    };
    let options = ServeOptions {
        model_name,
        config,
        text: std::sync::Arc::new(text),
        defaults,
        context,
        api_key: args.api_key.clone(),
        ui: if args.no_ui { Ui::Off } else { Ui::On },
        replica_id: args.replica_id.clone().unwrap_or_else(host_name),
        engine: EngineOptions {
            max_batch: args.max_batch,
            max_queue: args.max_queue,
            kv_budget: match args.kv_budget {
                KvBudget::Auto => None,
                KvBudget::Bytes(b) => Some(b),
            },
            prefix_cache: match args.prefix_cache {
                PrefixCacheArg::On => PrefixCache::On,
                PrefixCacheArg::Off => PrefixCache::Off,
            },
        },
        kv_budget_after_load: match args.kv_budget {
            KvBudget::Auto => auto_kv_budget,
            KvBudget::Bytes(_) => || None,
        },
        disk_cache: disk_cache(&args.cache, &source),
        body_limit: args.max_body_bytes,
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
    };
    let format = args.model.dtype.format();
    let settings = ModelSettings {
        prefill_chunk: Some(args.model.prefill_chunk.unwrap_or(SERVE_PREFILL_CHUNK)),
        ..args.model.settings()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!(
            "xgen: serving {} on http://{} (loading the model; /health says when ready)",
            options.model_name,
            listener.local_addr()?
        );
        xgen_server::serve(
            options,
            listener,
            move || {
                let mut model = source.load(format, &mut |_| {}).map_err(|e| e.to_string())?;
                settings.apply(&mut model).map_err(|e| e.to_string())?;
                Ok(model)
            },
            shutdown_signal(),
        )
        .await?;
        eprintln!("xgen: shut down");
        Ok(())
    })
}

/// Opens `--cache-dir` for the model once it is loaded, when given.
fn disk_cache(args: &CacheArgs, source: &Source) -> Option<xgen_server::OpenDiskCache> {
    let dir = args.cache_dir.clone()?;
    let (budget, source) = (args.cache_disk_budget, source.clone());
    Some(Box::new(move |model: &xgen_model::Model| {
        xgen_generate::prompt_cache::open(&dir, budget, &source, model, warn_on_stderr())
            .map_err(|e| e.to_string())
    }))
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_kv_budget, KvBudget};

    #[test]
    fn kv_budget_takes_bytes_suffixes_and_auto() {
        assert_eq!(parse_kv_budget("auto"), Ok(KvBudget::Auto));
        assert_eq!(parse_kv_budget("1000"), Ok(KvBudget::Bytes(1000)));
        assert_eq!(parse_kv_budget("8G"), Ok(KvBudget::Bytes(8 << 30)));
        assert_eq!(parse_kv_budget("512m"), Ok(KvBudget::Bytes(512 << 20)));
        for bad in ["", "0", "8P", "G", "-1", "1.5G", "99999999999999999999G"] {
            assert!(parse_kv_budget(bad).is_err(), "{bad:?}");
        }
    }
}
