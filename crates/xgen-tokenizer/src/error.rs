//! The tokenizer's error type.

use crate::TokenId;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenizerError {
    /// An id outside the vocabulary.
    #[error("token id {id} is out of range: the vocabulary has ids 0..{n_vocab}")]
    UnknownId { id: TokenId, n_vocab: u32 },
    /// A model's tokenizer description (GGUF `tokenizer.ggml.*`, `tokenizer.json`) that cannot
    /// be built: `field` names the key or file, `message` what is wrong with it.
    #[error("tokenizer: `{field}`: {message}")]
    Invalid { field: String, message: String },
}

impl TokenizerError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Invalid { field: field.into(), message: message.to_string() }
    }
}
