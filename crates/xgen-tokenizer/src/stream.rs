//! Incremental, UTF-8-safe decoding for streaming generated tokens.
//!
//! Tokens can end inside a multi-byte character (a CJK character or an emoji is often split over
//! two or three byte-level tokens). [`StreamDecoder`] holds back an incomplete trailing sequence
//! until it is completed or proven invalid, so each emission is final text. Invalid bytes become
//! U+FFFD by the same maximal-subpart rule as [`Tokenizer::decode`](crate::Tokenizer::decode), so
//! the concatenation of all emissions plus [`StreamDecoder::finish`] equals `decode` of all ids.

use crate::{TokenId, Tokenizer, TokenizerError};

/// Decodes one id at a time. Created by [`Tokenizer::stream_decoder`].
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes of an incomplete UTF-8 sequence at the end of the input so far (at most 3).
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, pending: Vec::with_capacity(8) }
    }

    /// Feeds `id`; returns the text that is now final (possibly empty).
    pub fn push(&mut self, id: TokenId) -> Result<String, TokenizerError> {
        self.pending.extend_from_slice(self.tokenizer.token_bytes(id)?);
        let mut out = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.drain(..len - keep);
        Ok(out)
    }

    /// Whether bytes of an incomplete character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: held-back bytes of a character that never completed, as U+FFFD.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}
