//! What every handler shares.

use std::sync::{atomic::AtomicBool, Arc};

use xgen_generate::GenerationConfig;
use xgen_tokenizer::Tokenizer;

use crate::{engine::EngineHandle, metrics::Metrics};

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    /// The id reported by `/v1/models` and in responses.
    pub model_name: String,
    /// Tokens of context per sequence (prompt + completion).
    pub context: usize,
    pub vocab: u32,
    /// The model's generation defaults (eos, pad); requests override sampling and stops.
    pub defaults: GenerationConfig,
    pub api_key: Option<String>,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub body_limit: usize,
}

pub type SharedState = Arc<AppState>;
