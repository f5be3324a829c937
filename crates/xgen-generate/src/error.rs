//! The generation library's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] xgen_model::ModelError),

    #[error(transparent)]
    Tokenizer(#[from] xgen_tokenizer::TokenizerError),

    #[error(transparent)]
    Template(#[from] crate::chat_template::TemplateError),

    #[error("the prompt is empty: generation needs at least one token")]
    EmptyPrompt,

    #[error("the prompt has {prompt} tokens but max_length is {max_length} (prompt included): nothing left to generate; raise max_length or set max_new_tokens")]
    NoRoom { prompt: usize, max_length: usize },

    #[error("the prompt ({prompt} tokens) plus {new} new tokens is {} tokens, beyond the model's context of {context}; shorten the prompt, ask for fewer tokens, or truncate the prompt on the left", prompt + new)]
    ContextOverflow { prompt: usize, new: usize, context: usize },

    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("generation setting `{field}`: {message}")]
    Setting { field: String, message: String },

    /// The model is neither a local path nor complete in the Hub cache (and cannot be downloaded).
    #[error("{0}")]
    NotFound(String),

    /// The caller asked the work to stop (its cancel flag was set).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = GenerateError> = std::result::Result<T, E>;

impl From<xgen_model::CandleError> for GenerateError {
    fn from(e: xgen_model::CandleError) -> Self {
        Self::Model(e.into())
    }
}

impl GenerateError {
    pub(crate) fn setting(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Setting { field: field.into(), message: message.into() }
    }

    /// Whether the work stopped because its cancel flag was set: between tokens
    /// ([`GenerateError::Cancelled`]) or between prompt chunks (the model's own `Cancelled`).
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Self::Cancelled | Self::Model(xgen_model::ModelError::Cancelled))
    }
}
