//! Tokenizers for the models xgen runs, behind one interface ([`Tokenizer`]):
//!
//! - XGen's exact tokenizer ([`XgenTokenizer`], `tokenization_xgen.py`, current `main`), with no
//!   run-time data files: the reference's `encode(text, allowed_special="all")`, lossy UTF-8
//!   decoding like Python's `errors="replace"`;
//! - the tokenizer another model brings: a GGUF file's `tokenizer.ggml.*` ([`GgufVocab`], as
//!   llama.cpp reads it) or an HF directory's `tokenizer.json`, run by HF `tokenizers`.
//!
//! [`StreamDecoder`] decodes any of them incrementally.

mod bpe;
mod error;
mod export;
pub mod gguf_vocab;
mod hf_dir;
mod pretokenize;
mod stream;
mod tokenizer;
mod vocab;
mod xgen;

pub use error::TokenizerError;
pub use export::{byte_to_char, BpeTable, TokenKind};
pub use gguf_vocab::{GgufVocab, VocabModel};
pub use stream::StreamDecoder;
pub use tokenizer::{SpecialIds, Specials, Tokenizer, TokenizerKind};
pub use vocab::{TokenId, EOS_TOKEN, EOS_TOKEN_ID, N_VOCAB};
pub use xgen::XgenTokenizer;
