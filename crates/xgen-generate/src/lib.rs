//! Text generation for XGen with transformers' `generate` semantics: greedy and sampling
//! ([`Sampling`]), penalties, stop tokens and stop strings, token budgets, log-probabilities,
//! streaming, left-padded batches; chat formats (XGen-Inst, a model's own template); a model's
//! tokenizer and template ([`ModelText`]); model resolution through the HF cache.
//!
//! Data flow: prompt ids → [`Generator`] (model prefill, then per step: logits → penalties →
//! constraint mask → sampler → token → incremental decoder → stop filter → text).

pub mod chat;
pub mod chat_template;
pub mod config;
pub mod constraint;
pub mod draft_plan;
pub mod error;
pub mod generator;
pub mod hub;
pub mod lookup;
pub mod model_text;
pub mod penalties;
pub mod prompt_cache;
pub mod sampler;
pub mod session;
pub mod source;
mod speculate;
pub mod stop;
mod template_guard;
pub mod timings;

pub use config::{GenerationConfig, SpecialText, Truncation};
pub use constraint::{Constraint, Format, Grammars};
pub use error::{GenerateError, Result};
pub use generator::{forward_beside_masks, Generator, Output, Sequence, Step, StepOutput, TokenLogprob};
pub use lookup::{DraftStats, PromptLookup};
pub use model_text::ModelText;
pub use penalties::Penalties;
pub use sampler::{SampleParams, Sampling};
pub use session::Session;
pub use source::{Dtype, Source};
pub use stop::FinishReason;
