//! An OpenAI-compatible HTTP server for XGen (`xgen serve`): `/v1/completions`,
//! `/v1/chat/completions` (the model's chat template; XGen-Inst for XGen), `/v1/models`,
//! `/health`, `/metrics`, `/tokenize`, `/detokenize`, `/apply-template`; SSE streaming; continuous batching on one engine thread that owns the model.

mod api;
mod completions;
pub mod engine;
mod error;
mod format;
mod kv_pool;
mod logprobs;
pub mod metrics;
mod routes;
mod state;
mod tokens;
mod ui;

use std::{
    future::Future,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use tokio::net::TcpListener;
use xgen_generate::{GenerationConfig, ModelText};
use xgen_model::{Config, Model};

pub use engine::{EngineOptions, OpenDiskCache};
pub use error::ApiError;
pub use kv_pool::PrefixCache;
pub use routes::app;
pub use state::AppState;
pub use ui::Ui;

/// Server settings, validated by the caller.
pub struct ServeOptions {
    pub model_name: String,
    /// The model's configuration (read before the weights load).
    pub config: Config,
    /// The model's tokenizer and chat format (read before the weights load).
    pub text: Arc<ModelText>,
    pub defaults: GenerationConfig,
    /// Context per sequence (at most the model's).
    pub context: usize,
    pub api_key: Option<String>,
    /// Whether `GET /` serves the chat page.
    pub ui: Ui,
    /// Sent in every response's `X-Xgen-Replica` header (which replica answered, behind a proxy).
    pub replica_id: String,
    pub engine: EngineOptions,
    /// The KV budget when `engine.kv_budget` is `None`, decided once the model is loaded (`auto`:
    /// from the memory then available); `None` from it too: unbounded.
    pub kv_budget_after_load: fn() -> Option<usize>,
    pub body_limit: usize,
    /// Opens the disk prompt cache once the model is loaded (`--cache-dir`): finished sequences'
    /// blocks are saved there and prompts restored from it after the in-memory prefix cache.
    pub disk_cache: Option<OpenDiskCache>,
    /// After the shutdown signal, in-flight requests may finish for this long; then they are
    /// cancelled (ended with an error) so the server exits.
    pub drain_timeout: Duration,
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting, lets in-flight requests
/// finish for `drain_timeout` and cancels the rest. `load` runs on the engine thread; `/health`
/// answers 503 until it is done.
pub async fn serve(
    options: ServeOptions,
    listener: TcpListener,
    load: impl FnOnce() -> Result<Model, String> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (engine, thread) = engine::spawn(
        load,
        options.engine,
        options.text.clone(),
        options.kv_budget_after_load,
        options.disk_cache,
        metrics.clone(),
        ready.clone(),
    );
    // The engine ends only on a load failure or a crash: then the server stops too.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    std::thread::spawn(move || {
        let why = match thread.join() {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => "the engine thread panicked".to_string(),
        };
        let _ = failed_tx.send(why);
    });
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let failure_slot = failure.clone();
    let canceller = engine.clone();
    let drain = options.drain_timeout;
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            Ok(why) = failed_rx => {
                *failure_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
            }
        }
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            canceller.cancel_all();
        });
    };
    let state = Arc::new(AppState {
        engine,
        text: options.text,
        model_name: options.model_name,
        context: options.context,
        vocab: options.config.vocab_size as u32,
        defaults: options.defaults,
        api_key: options.api_key,
        ready,
        metrics: metrics.clone(),
        body_limit: options.body_limit,
        grammars: std::sync::OnceLock::new(),
        ui: options.ui,
        replica: axum::http::HeaderValue::from_str(&options.replica_id)
            .unwrap_or_else(|_| axum::http::HeaderValue::from_static("xgen")),
    });
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).await?;
    if let Some(disk) = metrics.disk.get() {
        disk.flush(); // finished requests' blocks reach the disk before the process exits
    }
    let why = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    match why {
        Some(why) => Err(std::io::Error::other(format!("the model engine stopped: {why}"))),
        None => Ok(()),
    }
}
