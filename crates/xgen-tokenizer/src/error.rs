//! The tokenizer's error type.

use crate::TokenId;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenizerError {
    /// An id outside the vocabulary.
    #[error("token id {id} is out of range: the XGen vocabulary has ids 0..{n_vocab}")]
    UnknownId { id: TokenId, n_vocab: u32 },
}
