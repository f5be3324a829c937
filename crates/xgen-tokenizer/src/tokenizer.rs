//! The one tokenizer interface every front end uses: XGen's exact tokenizer, or the tokenizer a
//! model brings (a GGUF file's `tokenizer.ggml.*`, an HF directory's `tokenizer.json`) run by
//! HF `tokenizers`.
//!
//! Invariants, for every kind:
//! - decoding is the concatenation of the tokens' bytes ([`Tokenizer::token_bytes`]; specials as
//!   their text), made lossy UTF-8 by Python's `errors="replace"` rule; [`StreamDecoder`]
//!   yields the same text incrementally;
//! - [`Tokenizer::encode`] recognises special strings in the text and adds what the model adds
//!   (BOS where `add_bos`); [`Specials::AsText`] treats special strings as text.

use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::{
    gguf_vocab::{GgufVocab, VocabModel, END_OF_GENERATION_TEXTS},
    hf_dir, StreamDecoder, TokenId, TokenizerError, XgenTokenizer, EOS_TOKEN_ID,
};

/// What `encode` does with special-token strings found in the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Specials {
    /// Each special string becomes its special id (the reference tokenizer's behaviour).
    #[default]
    Recognize,
    /// Special strings are ordinary text (for untrusted input).
    AsText,
}

/// Whether an encoding gets the BOS/EOS the model's tokenizer adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ends {
    Model,
    None,
}

/// Which tokenizer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// XGen's exact tokenizer (XGen checkpoints, `xgen quantize` output, llama.cpp's XGen files).
    Xgen,
    /// A GGUF file's own vocabulary.
    Gguf(VocabModel),
    /// An HF directory's `tokenizer.json`.
    HfJson,
}

/// The special ids a model names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Tokens that end generation (eos, end of turn, ...), as llama.cpp collects them.
    pub end_of_generation: Vec<TokenId>,
    /// Whether encoding a text puts `bos` first.
    pub add_bos: bool,
    pub add_eos: bool,
}

/// A model's tokenizer. Build it once and share it: all methods take `&self` and it is `Sync`.
pub struct Tokenizer {
    engine: Engine,
    ids: SpecialIds,
}

enum Engine {
    Xgen(XgenTokenizer),
    Pipeline(Box<Pipeline>),
}

/// A `tokenizers` pipeline with the byte table decoding reads.
struct Pipeline {
    kind: TokenizerKind,
    /// Recognises special strings.
    recognizing: tokenizers::Tokenizer,
    /// The same with special strings as text.
    as_text: tokenizers::Tokenizer,
    /// Whether the pipeline's own post-processor adds BOS/EOS (`tokenizer.json`), or `ids` says.
    adds: Adds,
    /// The bytes of every id.
    pieces: Vec<Vec<u8>>,
    special: Vec<bool>,
    /// Special tokens' texts with their ids; `matcher` finds them in text (leftmost-longest).
    special_list: Vec<(String, TokenId)>,
    matcher: Option<AhoCorasick>,
    by_bytes: FxHashMap<Vec<u8>, TokenId>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Adds {
    PostProcessor,
    FromIds,
}

impl Default for Tokenizer {
    fn default() -> Self {
        Self::xgen()
    }
}

impl Tokenizer {
    /// The exact XGen tokenizer (51200 ids, embedded).
    pub fn xgen() -> Self {
        let ids = SpecialIds {
            bos: Some(EOS_TOKEN_ID),
            eos: Some(EOS_TOKEN_ID),
            end_of_generation: vec![EOS_TOKEN_ID],
            add_bos: false,
            add_eos: false,
        };
        Self { engine: Engine::Xgen(XgenTokenizer::new()), ids }
    }

    /// A GGUF file's tokenizer; XGen's exact one when the file's vocabulary is XGen's (files
    /// `xgen quantize` writes, llama.cpp's conversions of XGen).
    pub fn from_gguf(vocab: &GgufVocab) -> Result<Self, TokenizerError> {
        let model = match vocab.model.as_str() {
            "llama" => VocabModel::Llama,
            _ => VocabModel::Gpt2,
        };
        let pieces = vocab.token_bytes(model);
        if vocab.model == "gpt2" && is_xgen_vocabulary(&pieces) {
            return Ok(Self::xgen());
        }
        let built = vocab.build()?;
        let special: Vec<bool> = (0..vocab.tokens.len())
            .map(|i| vocab.kind(i) == crate::gguf_vocab::token_type::CONTROL)
            .collect();
        let mut eog: Vec<TokenId> = [vocab.eos, vocab.eot, vocab.eom].into_iter().flatten().collect();
        for (i, t) in vocab.tokens.iter().enumerate() {
            if special[i] && END_OF_GENERATION_TEXTS.contains(&t.as_str()) && !eog.contains(&(i as u32)) {
                eog.push(i as u32);
            }
        }
        let ids = SpecialIds {
            bos: vocab.bos,
            eos: vocab.eos,
            end_of_generation: eog,
            add_bos: built.add_bos,
            add_eos: built.add_eos,
        };
        Pipeline::new(TokenizerKind::Gguf(built.model), built.tokenizer, Adds::FromIds, pieces, special)
            .map(|p| Self { engine: Engine::Pipeline(Box::new(p)), ids })
    }

    /// An HF model directory's tokenizer: `tokenizer.json` when there is one; XGen's when the
    /// directory is an XGen checkpoint (`tokenizer_class` `XgenTokenizer`, or no tokenizer files).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        match hf_dir::read(dir)? {
            None => Ok(Self::xgen()),
            Some(found) => {
                let ids = found.ids.clone();
                Pipeline::new(
                    TokenizerKind::HfJson,
                    found.tokenizer,
                    Adds::PostProcessor,
                    found.pieces,
                    found.special,
                )
                .map(|p| Self { engine: Engine::Pipeline(Box::new(p)), ids })
            }
        }
    }

    pub fn kind(&self) -> TokenizerKind {
        match &self.engine {
            Engine::Xgen(_) => TokenizerKind::Xgen,
            Engine::Pipeline(p) => p.kind,
        }
    }

    /// XGen's tokenizer, when that is what runs.
    pub fn as_xgen(&self) -> Option<&XgenTokenizer> {
        match &self.engine {
            Engine::Xgen(x) => Some(x),
            Engine::Pipeline(_) => None,
        }
    }

    /// Number of ids.
    pub fn n_vocab(&self) -> u32 {
        match &self.engine {
            Engine::Xgen(x) => x.n_vocab(),
            Engine::Pipeline(p) => p.pieces.len() as u32,
        }
    }

    pub fn special_ids(&self) -> &SpecialIds {
        &self.ids
    }

    /// The eos id (XGen: `<|endoftext|>`, 50256). Models without one report 0.
    pub fn eos_token_id(&self) -> TokenId {
        self.ids.eos.unwrap_or(0)
    }

    /// Encodes `text`, recognising every special string, with the model's BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<TokenId> {
        self.encode_with(text, Specials::Recognize)
    }

    /// Encodes `text` with special strings treated as plain text.
    pub fn encode_ordinary(&self, text: &str) -> Vec<TokenId> {
        self.encode_with(text, Specials::AsText)
    }

    /// Encodes `text` with the given treatment of special strings.
    pub fn encode_with(&self, text: &str, specials: Specials) -> Vec<TokenId> {
        self.encode_ends(text, specials, Ends::Model)
    }

    /// Encodes `text` without the BOS/EOS the model's tokenizer adds (vLLM's
    /// `add_special_tokens: false`); special strings as `specials` says.
    pub fn encode_bare(&self, text: &str, specials: Specials) -> Vec<TokenId> {
        self.encode_ends(text, specials, Ends::None)
    }

    fn encode_ends(&self, text: &str, specials: Specials, ends: Ends) -> Vec<TokenId> {
        match &self.engine {
            Engine::Xgen(x) => x.encode_with(text, specials),
            Engine::Pipeline(p) => {
                let t = match specials {
                    Specials::Recognize => &p.recognizing,
                    Specials::AsText => &p.as_text,
                };
                let ends = ends == Ends::Model;
                let mut ids = p.run(t, text, ends && p.adds == Adds::PostProcessor);
                if ends && p.adds == Adds::FromIds {
                    self.add_ends(&mut ids);
                }
                ids
            }
        }
    }

    /// Encodes `text`, recognising the special strings whose id `allowed` accepts; the others are
    /// ordinary text (tiktoken's `encode(text, allowed_special=...)` with nothing disallowed).
    pub fn encode_allowing(&self, text: &str, allowed: &dyn Fn(TokenId) -> bool) -> Vec<TokenId> {
        let p = match &self.engine {
            Engine::Xgen(x) => return x.encode_allowing(text, allowed),
            Engine::Pipeline(p) => p,
        };
        // All or none allowed: the pipeline's own encoding (its post-processor included).
        if p.special_list.iter().all(|&(_, id)| allowed(id)) {
            return self.encode_with(text, Specials::Recognize);
        }
        if !p.special_list.iter().any(|&(_, id)| allowed(id)) {
            return self.encode_with(text, Specials::AsText);
        }
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut start = 0;
        for m in p.matcher.iter().flat_map(|m| m.find_iter(text)) {
            let id = p.special_list[m.pattern().as_usize()].1;
            if allowed(id) {
                ids.extend(p.run(&p.as_text, &text[start..m.start()], false));
                ids.push(id);
                start = m.end();
            }
        }
        ids.extend(p.run(&p.as_text, &text[start..], false));
        self.add_ends(&mut ids);
        ids
    }

    fn add_ends(&self, ids: &mut Vec<TokenId>) {
        if let (true, Some(bos)) = (self.ids.add_bos, self.ids.bos) {
            ids.insert(0, bos);
        }
        if let (true, Some(eos)) = (self.ids.add_eos, self.ids.eos) {
            ids.push(eos);
        }
    }

    /// The first special string in `text` whose id `which` accepts, and its id: how tiktoken's
    /// `disallowed_special` check finds what to refuse.
    pub fn find_special_where<'s>(
        &self,
        text: &'s str,
        which: &dyn Fn(TokenId) -> bool,
    ) -> Option<(&'s str, TokenId)> {
        match &self.engine {
            Engine::Xgen(x) => x.find_special_where(text, which),
            Engine::Pipeline(p) => p.matcher.as_ref()?.find_iter(text).find_map(|m| {
                let id = p.special_list[m.pattern().as_usize()].1;
                which(id).then(|| (&text[m.start()..m.end()], id))
            }),
        }
    }

    /// Encodes every text in parallel on rayon's thread pool; results are in input order.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S], specials: Specials) -> Vec<Vec<TokenId>> {
        texts.par_iter().map(|t| self.encode_with(t.as_ref(), specials)).collect()
    }

    /// The bytes of one token (a special token's text for specials).
    pub fn token_bytes(&self, id: TokenId) -> Result<&[u8], TokenizerError> {
        match &self.engine {
            Engine::Xgen(x) => x.token_bytes(id),
            Engine::Pipeline(p) => p
                .pieces
                .get(id as usize)
                .map(Vec::as_slice)
                .ok_or(TokenizerError::UnknownId { id, n_vocab: p.pieces.len() as u32 }),
        }
    }

    /// The concatenated bytes of `ids`.
    pub fn decode_bytes(&self, ids: &[TokenId]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id)?);
        }
        Ok(out)
    }

    /// Decodes `ids` to text; invalid UTF-8 becomes U+FFFD (Python's `errors="replace"`).
    pub fn decode(&self, ids: &[TokenId]) -> Result<String, TokenizerError> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// A decoder fed one id at a time, for streaming.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }

    /// The id of a special token's text, e.g. `"<fim_prefix>"` -> 50295.
    pub fn special_token_id(&self, text: &str) -> Option<TokenId> {
        match &self.engine {
            Engine::Xgen(x) => x.special_token_id(text),
            Engine::Pipeline(p) => p.special_list.iter().find(|(t, _)| t == text).map(|&(_, id)| id),
        }
    }

    /// The id of one whole token given by its bytes (a special token's text, or an ordinary
    /// token's bytes); `None` when no token has them.
    pub fn token_id(&self, bytes: &[u8]) -> Option<TokenId> {
        match &self.engine {
            Engine::Xgen(x) => x.token_id(bytes),
            Engine::Pipeline(p) => p.by_bytes.get(bytes).copied(),
        }
    }

    /// The text of a special id, or `None` for ordinary or unknown ids.
    pub fn special_token(&self, id: TokenId) -> Option<&str> {
        match &self.engine {
            Engine::Xgen(x) => x.special_token(id),
            Engine::Pipeline(p) => p
                .special
                .get(id as usize)
                .filter(|&&s| s)
                .and_then(|_| std::str::from_utf8(&p.pieces[id as usize]).ok()),
        }
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: TokenId) -> bool {
        match &self.engine {
            Engine::Xgen(x) => x.is_special(id),
            Engine::Pipeline(p) => p.special.get(id as usize).copied().unwrap_or(false),
        }
    }

    /// All special tokens with their ids, in id order.
    pub fn special_tokens(&self) -> Vec<(&str, TokenId)> {
        match &self.engine {
            Engine::Xgen(x) => x.special_tokens(),
            Engine::Pipeline(p) => p.special_list.iter().map(|(t, id)| (t.as_str(), *id)).collect(),
        }
    }
}

impl Pipeline {
    fn new(
        kind: TokenizerKind,
        recognizing: tokenizers::Tokenizer,
        adds: Adds,
        pieces: Vec<Vec<u8>>,
        special: Vec<bool>,
    ) -> Result<Self, TokenizerError> {
        let mut as_text = recognizing.clone();
        as_text.set_encode_special_tokens(true);
        let mut special_list: Vec<(String, TokenId)> = (0..pieces.len())
            .filter(|&i| special[i])
            .filter_map(|i| Some((String::from_utf8(pieces[i].clone()).ok()?, i as TokenId)))
            .filter(|(t, _)| !t.is_empty())
            .collect();
        special_list.sort_by_key(|&(_, id)| id);
        let matcher = if special_list.is_empty() {
            None
        } else {
            let texts = special_list.iter().map(|(t, _)| t.as_str());
            let m = AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(texts);
            Some(m.map_err(|e| TokenizerError::invalid("special tokens", e))?)
        };
        let mut by_bytes = FxHashMap::default();
        for (i, b) in pieces.iter().enumerate().rev() {
            by_bytes.insert(b.clone(), i as TokenId);
        }
        Ok(Self { kind, recognizing, as_text, adds, pieces, special, special_list, matcher, by_bytes })
    }

    /// Runs `t` over `text`. The pipelines built here cannot fail on a `&str` (every byte has a
    /// token or a byte fallback); should one fail, the text is encoded byte by byte.
    fn run(&self, t: &tokenizers::Tokenizer, text: &str, post_process: bool) -> Vec<TokenId> {
        if text.is_empty() && !post_process {
            return Vec::new();
        }
        match t.encode_fast(text, post_process) {
            Ok(e) => e.get_ids().to_vec(),
            Err(_) => text.bytes().filter_map(|b| self.by_bytes.get(&[b][..]).copied()).collect(),
        }
    }
}

/// Whether a gpt2 vocabulary's token bytes are XGen's: the same 51200 tokens, each with the
/// same bytes.
fn is_xgen_vocabulary(pieces: &[Vec<u8>]) -> bool {
    let xgen = XgenTokenizer::new();
    if pieces.len() != xgen.n_vocab() as usize {
        return false;
    }
    pieces.iter().enumerate().all(|(id, b)| xgen.token_bytes(id as TokenId).is_ok_and(|x| x == b.as_slice()))
}
