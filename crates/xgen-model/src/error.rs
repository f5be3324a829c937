//! The model library's error type: every variant names the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("config field `{field}`: {message}")]
    ConfigField { field: String, message: String },

    #[error(
        "{dir}: no weights found (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
    )]
    NoWeights { dir: PathBuf },

    #[error("{file}: cannot read weights: {message}")]
    Format { file: PathBuf, message: String },

    #[error("tensor `{name}` is missing{}", .file.as_ref().map(|f| format!(" (the index places it in {})", f.display())).unwrap_or_default())]
    MissingTensor { name: String, file: Option<PathBuf> },

    #[error("{file}: unexpected tensor `{name}` (not part of this model's architecture)")]
    UnexpectedTensor { name: String, file: PathBuf },

    #[error("{file}: tensor `{name}` appears twice (also in {first})")]
    DuplicateTensor { name: String, file: PathBuf, first: PathBuf },

    #[error("{file}: tensor `{name}` has shape {got:?}, expected {expected:?} from config.json")]
    TensorShape { name: String, file: PathBuf, expected: Vec<usize>, got: Vec<usize> },

    #[error("{file}: tensor `{name}` has dtype {dtype}; supported: F32, BF16, F16")]
    TensorDtype { name: String, file: PathBuf, dtype: String },

    #[error("unknown random-weights preset `{0}` (known: {1})")]
    UnknownPreset(String, String),

    #[error("{positions} positions exceed the KV cache capacity of {capacity}")]
    CacheFull { positions: usize, capacity: usize },

    #[error("the KV block pool has {free} free blocks, {needed} needed")]
    PoolDry { needed: usize, free: usize },

    #[error("token id {id} is outside the model's vocabulary of {vocab_size}")]
    TokenOutOfRange { id: u32, vocab_size: usize },

    #[error("cancelled")]
    Cancelled,

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }

    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ConfigField { field: field.into(), message: message.into() }
    }

    pub(crate) fn format(file: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Format { file: file.into(), message: message.to_string() }
    }
}
