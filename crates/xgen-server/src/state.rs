//! What every handler shares.

use std::sync::{atomic::AtomicBool, Arc, OnceLock};

use xgen_generate::{Constraint, Format, GenerationConfig, Grammars, ModelText};

use crate::{engine::EngineHandle, error::ApiError, metrics::Metrics};

pub struct AppState {
    pub engine: EngineHandle,
    /// The model's tokenizer and chat format.
    pub text: Arc<ModelText>,
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
    /// Whether `GET /` serves the chat page.
    pub ui: crate::ui::Ui,
    /// Every response's `X-Xgen-Replica` header.
    pub replica: axum::http::HeaderValue,
    /// The vocabulary for output formats, built by the first request that names one.
    pub grammars: OnceLock<Grammars>,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// A fresh matcher for `format`, given by request field `param`; a bad schema, regex or
    /// grammar is a 400 naming the field and the problem.
    pub fn constraint(&self, format: &Format, param: &'static str) -> Result<Constraint, ApiError> {
        let grammars = match self.grammars.get() {
            Some(g) => g,
            None => {
                let g = Grammars::new(&self.text.tokenizer, self.vocab as usize)
                    .map_err(|e| ApiError::invalid(param, e.to_string()))?;
                self.grammars.get_or_init(|| g)
            }
        };
        grammars.constraint(format).map_err(|e| ApiError::invalid(param, format!("`{param}`: {e}")))
    }
}
