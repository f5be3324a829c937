//! `xgen serve`: the OpenAI-compatible HTTP server.

use std::net::SocketAddr;

use clap::Args;
use xgen_generate::GenerationConfig;
use xgen_server::ServeOptions;

use crate::{
    exit::bad_input,
    model_args::{ModelArgs, Source},
};

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
    let defaults = match &source {
        Source::Dir(dir) => GenerationConfig::for_model_dir(dir, &config)?,
        Source::Gguf(_) | Source::Random(_) => GenerationConfig::defaults_for(&config),
    };
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| bad_input(format!("--host {} --port {}: {e}", args.host, args.port)))?;
    let model_name = match &source {
        Source::Dir(_) | Source::Gguf(_) => args.model.model.clone(),
        Source::Random(_) => format!("random-{}", args.model.random_weights.as_deref().unwrap_or_default()),
    };
    let options = ServeOptions {
        model_name,
        config,
        defaults,
        context,
        api_key: args.api_key.clone(),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        body_limit: args.max_body_bytes,
        drain_timeout: std::time::Duration::from_secs(args.drain_timeout),
    };
    let format = args.model.dtype.format();
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
            move || source.load(format, &mut |_| {}).map_err(|e| e.to_string()),
            shutdown_signal(),
        )
        .await?;
        eprintln!("xgen: shut down");
        Ok(())
    })
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
