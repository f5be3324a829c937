//! The exact XGen-7B tokenizer (`tokenization_xgen.py`, current `main`), with no run-time data files.
//!
//! - [`XgenTokenizer::encode`] is the reference's `encode(text, allowed_special="all")`: every
//!   special string in the text becomes its id. [`XgenTokenizer::encode_ordinary`] recognises none,
//!   for untrusted text. No BOS/EOS is added.
//! - Decoding is the concatenation of the tokens' bytes ([`XgenTokenizer::token_bytes`]); the
//!   model-independent interface ([`crate::Tokenizer`]) turns them into lossy UTF-8 text.
//!
//! Pipeline: text → special-token split → [`pretokenize`] pieces → [`bpe`] merges → ids.

use rayon::prelude::*;

use crate::{
    bpe, pretokenize,
    vocab::{Vocab, N_VOCAB},
    Specials, TokenId, TokenizerError, EOS_TOKEN_ID,
};

/// The XGen tokenizer. Build it once ([`XgenTokenizer::new`], a few milliseconds) and share it:
/// all methods take `&self` and it is `Sync`.
pub struct XgenTokenizer {
    pub(crate) vocab: Vocab,
}

impl Default for XgenTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

impl XgenTokenizer {
    /// The current XGen vocabulary (51200 ids), from data embedded at build time.
    pub fn new() -> Self {
        Self { vocab: Vocab::xgen() }
    }

    /// Number of ids (51200).
    pub fn n_vocab(&self) -> u32 {
        N_VOCAB
    }

    /// The eos (and bos) id, `<|endoftext|>`.
    pub fn eos_token_id(&self) -> TokenId {
        EOS_TOKEN_ID
    }

    /// Encodes `text`, recognising every special string (the reference behaviour).
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        self.encode_with(text, Specials::Recognize)
    }

    /// Encodes `text` with special strings treated as plain text; never yields a special id.
    pub fn encode_ordinary(&self, text: &str) -> Vec<TokenId> {
        self.encode_with(text, Specials::AsText)
    }

    /// Encodes `text` with the given treatment of special strings.
    pub fn encode_with(&self, text: &str, specials: Specials) -> Vec<TokenId> {
        match specials {
            Specials::Recognize => self.encode_allowing(text, &|_| true),
            Specials::AsText => {
                let mut out = Vec::with_capacity(text.len() / 3 + 1);
                self.encode_ordinary_into(text, &mut out);
                out
            }
        }
    }

    /// Encodes `text`, recognising the special strings whose id `allowed` accepts; the others are
    /// ordinary text (tiktoken's `encode(text, allowed_special=...)` with nothing disallowed).
    pub fn encode_allowing(&self, text: &str, allowed: &dyn Fn(TokenId) -> bool) -> Vec<TokenId> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut start = 0;
        while let Some((s, e, id)) = self.find_special(text, start, allowed) {
            self.encode_ordinary_into(&text[start..s], &mut out);
            out.push(id);
            start = e;
        }
        self.encode_ordinary_into(&text[start..], &mut out);
        out
    }

    /// The first special string in `text` whose id `which` accepts, and its id: how tiktoken's
    /// `disallowed_special` check finds what to refuse.
    pub fn find_special_where<'s>(
        &self,
        text: &'s str,
        which: &dyn Fn(TokenId) -> bool,
    ) -> Option<(&'s str, TokenId)> {
        self.find_special(text, 0, which).map(|(s, e, id)| (&text[s..e], id))
    }

    /// Encodes every text in parallel on rayon's thread pool; results are in input order.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S], specials: Specials) -> Vec<Vec<TokenId>> {
        texts.par_iter().map(|t| self.encode_with(t.as_ref(), specials)).collect()
    }

    fn encode_ordinary_into(&self, text: &str, out: &mut Vec<TokenId>) {
        for piece in pretokenize::pieces(text) {
            bpe::encode_piece(&self.vocab.ranks, piece.as_bytes(), out);
        }
    }

    /// The leftmost special token at or after byte `from` whose id `accept` takes: (start, end, id).
    ///
    /// Every special has the form `<…>` with no `<` or `>` inside (checked by a test), so an
    /// occurrence starting at a `<` can only end at the first `>` after it, with no `<` between;
    /// two occurrences never overlap, so skipping a refused one loses nothing.
    fn find_special(
        &self,
        text: &str,
        from: usize,
        accept: &dyn Fn(TokenId) -> bool,
    ) -> Option<(usize, usize, TokenId)> {
        let bytes = text.as_bytes();
        let mut pos = from;
        while let Some(i) = memchr::memchr(b'<', &bytes[pos..]).map(|i| pos + i) {
            let j = i + 1 + memchr::memchr2(b'<', b'>', &bytes[i + 1..])?;
            if bytes[j] == b'<' {
                pos = j;
                continue;
            }
            if let Some(&id) = self.vocab.specials.get(&text[i..=j]).filter(|&&id| accept(id)) {
                return Some((i, j + 1, id));
            }
            pos = j + 1;
        }
        None
    }

    /// The bytes of one token.
    pub fn token_bytes(&self, id: TokenId) -> Result<&[u8], TokenizerError> {
        self.vocab.token_bytes(id).ok_or(TokenizerError::UnknownId { id, n_vocab: N_VOCAB })
    }

    /// The id of a special token's text, e.g. `"<fim_prefix>"` -> 50295.
    pub fn special_token_id(&self, text: &str) -> Option<TokenId> {
        self.vocab.specials.get(text).copied()
    }

    /// The id of one whole token given by its bytes (a special token's text, or an ordinary
    /// token's bytes), like tiktoken's `encode_single_token`; `None` when no token has them.
    pub fn token_id(&self, bytes: &[u8]) -> Option<TokenId> {
        let special = std::str::from_utf8(bytes).ok().and_then(|s| self.vocab.specials.get(s));
        special.or_else(|| self.vocab.ranks.get(bytes)).copied()
    }

    /// The text of a special id, or `None` for ordinary or unknown ids.
    pub fn special_token(&self, id: TokenId) -> Option<&str> {
        if !self.vocab.is_special(id) {
            return None;
        }
        self.vocab.token_bytes(id).and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: TokenId) -> bool {
        self.vocab.is_special(id)
    }

    /// All special tokens with their ids, in id order.
    pub fn special_tokens(&self) -> Vec<(&str, TokenId)> {
        let mut all: Vec<(&str, TokenId)> =
            self.vocab.specials.iter().map(|(s, &id)| (s.as_str(), id)).collect();
        all.sort_by_key(|&(_, id)| id);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vectors() {
        let t = XgenTokenizer::new();
        assert_eq!(t.encode("The world is"), [464, 995, 318]);
        assert_eq!(t.encode("a<|endoftext|>b"), [64, 50256, 65]);
        assert_eq!(t.encode_ordinary("a<|endoftext|>b"), [64, 27, 91, 437, 1659, 5239, 91, 29, 65]);
        assert_eq!(t.encode(&(" ".repeat(40) + "x")), [50257, 50280, 2124]);
    }

    #[test]
    fn specials_have_the_shape_find_special_relies_on() {
        let t = XgenTokenizer::new();
        let specials = t.special_tokens();
        assert_eq!(specials.len(), 906);
        for (s, id) in specials {
            let inner = &s[1..s.len() - 1];
            assert!(s.starts_with('<') && s.ends_with('>'), "{s}");
            assert!(!inner.contains(['<', '>']), "{s}");
            assert_eq!(t.special_token_id(s), Some(id));
            assert_eq!(t.special_token(id), Some(s));
        }
    }

    #[test]
    fn finds_specials_among_look_alikes() {
        let t = XgenTokenizer::new();
        let ids = t.encode("<<mask_1><mask_0><sep>>");
        assert_eq!(ids.iter().filter(|&&id| t.is_special(id)).count(), 2);
        assert!(ids.contains(&51199) && ids.contains(&50317));
    }

    #[test]
    fn token_id_finds_whole_tokens_by_their_bytes() {
        let t = XgenTokenizer::new();
        assert_eq!(t.token_id(b"<|endoftext|>"), Some(50256));
        assert_eq!(t.token_id(b"<mask_1>"), Some(51199));
        assert_eq!(t.token_id(b" world"), Some(995));
        assert_eq!(t.token_id(&[b' '; 31]), Some(50257));
        for id in 0..N_VOCAB {
            assert_eq!(t.token_id(t.token_bytes(id).unwrap()), Some(id), "every token's bytes name it");
        }
        assert_eq!(t.token_id(b" world is"), None);
        assert_eq!(t.token_id(b"<mask_0>"), None);
    }

    #[test]
    fn unknown_id_is_an_error() {
        let err = TokenizerError::UnknownId { id: 51200, n_vocab: 51200 };
        assert_eq!(XgenTokenizer::new().token_bytes(51200), Err(err));
    }

    #[test]
    fn merge_implementations_agree() {
        let t = XgenTokenizer::new();
        let texts =
            ["x".repeat(300), "日本語のテキスト".repeat(40), "!?".repeat(200), "1234567890".repeat(30)];
        for text in &texts {
            for piece in pretokenize::pieces(text).filter(|p| p.len() >= 2) {
                let b = piece.as_bytes();
                assert_eq!(bpe::merge_scan(&t.vocab.ranks, b), bpe::merge_heap(&t.vocab.ranks, b), "{piece}");
            }
        }
    }
}
