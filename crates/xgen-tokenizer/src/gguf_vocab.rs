//! A GGUF file's tokenizer (`tokenizer.ggml.*`) as llama.cpp reads it, built into an HF
//! `tokenizers` pipeline:
//!
//! - `gpt2`: byte-level BPE over `tokens` + `merges`, pre-tokenized by the regexes llama.cpp
//!   assigns to `tokenizer.ggml.pre` (`llama-vocab.cpp`, `llm_tokenizer_bpe`); `llama3`-style
//!   vocabularies take a piece that is a whole token without merging (`ignore_merges`).
//! - `llama`: SentencePiece-style BPE: `▁` for spaces (one prefixed to each text run when
//!   `add_space_prefix`), merges ordered by the merged token's score, unknown bytes as `<0xXX>`
//!   tokens (byte fallback).
//!
//! Control and user-defined tokens are matched in raw text (llama.cpp's `parse_special`);
//! bos/eos come from the ids the file names; `add_bos_token` follows llama.cpp's defaults
//! (`llama` vocabularies add BOS, `gpt2` ones do not, unless the file says otherwise).

use tokenizers::{
    models::bpe::BPE,
    normalizers::{
        prepend::Prepend, replace::Replace, utils::Sequence as NormalizerSequence, NormalizerWrapper,
    },
    pre_tokenizers::{
        byte_level::ByteLevel,
        sequence::Sequence,
        split::{Split, SplitPattern},
        PreTokenizerWrapper,
    },
    AddedToken, SplitDelimiterBehavior,
};

use crate::{export::byte_to_char, TokenId, TokenizerError};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The tokenizer keys of a GGUF file, as stored.
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre` (gpt2 only; `default` when absent, as llama.cpp).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (all normal when absent).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges` (gpt2): `"left right"`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores` (llama).
    pub scores: Vec<f32>,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub eot: Option<TokenId>,
    pub eom: Option<TokenId>,
    pub unk: Option<TokenId>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

/// The model kind of a GGUF vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabModel {
    /// Byte-level BPE with merges.
    Gpt2,
    /// SentencePiece-style BPE with scores and byte fallback.
    Llama,
}

/// A GGUF vocabulary turned into a `tokenizers` pipeline, with what it adds around a text.
pub struct Built {
    pub tokenizer: tokenizers::Tokenizer,
    pub model: VocabModel,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The texts llama.cpp treats as ending generation when a vocabulary has them as tokens
/// (`llama-vocab.cpp`: its end-of-generation list).
pub const END_OF_GENERATION_TEXTS: [&str; 10] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
    "<|return|>",
    "<|call|>",
];

/// The pre-tokenizer regexes llama.cpp uses for `pre`, and whether whole tokens skip merging.
fn pre_regexes(pre: &str) -> Result<(&'static [&'static str], bool), TokenizerError> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" => (&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"], false),
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de"
        | "gigachat" | "mellum" | "modern-bert" => (&[GPT2], false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            (&[LLAMA3], pre.starts_with("llama") || pre == "falcon3" || pre == "pixtral")
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2], false)
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => (&[QWEN2], false),
        "falcon" => (&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"], false),
        other => {
            return Err(TokenizerError::invalid(
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer {other:?} is not supported (supported: default, gpt-2, llama3, \
                     llama-bpe, smollm, starcoder, refact, qwen2, falcon and their aliases)"
                ),
            ))
        }
    })
}

impl GgufVocab {
    /// Checks the arrays against each other and builds the pipeline.
    pub fn build(&self) -> Result<Built, TokenizerError> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(TokenizerError::invalid("tokenizer.ggml.tokens", "missing or empty"));
        }
        if !self.token_types.is_empty() && self.token_types.len() != n {
            return Err(TokenizerError::invalid(
                "tokenizer.ggml.token_type",
                format!("{} entries for {n} tokens", self.token_types.len()),
            ));
        }
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", self.bos),
            ("tokenizer.ggml.eos_token_id", self.eos),
            ("tokenizer.ggml.eot_token_id", self.eot),
            ("tokenizer.ggml.eom_token_id", self.eom),
            ("tokenizer.ggml.unknown_token_id", self.unk),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(TokenizerError::invalid(key, format!("id {id} is outside the {n} tokens")));
            }
        }
        let (model, mut tokenizer, default_bos) = match self.model.as_str() {
            "gpt2" => (VocabModel::Gpt2, self.byte_level()?, false),
            "llama" => (VocabModel::Llama, self.sentencepiece()?, true),
            other => {
                return Err(TokenizerError::invalid(
                    "tokenizer.ggml.model",
                    format!("tokenizer model {other:?} is not supported (supported: gpt2, llama)"),
                ))
            }
        };
        let added: Vec<AddedToken> = (0..n)
            .filter(|&i| matches!(self.kind(i), token_type::CONTROL | token_type::USER_DEFINED))
            .map(|i| AddedToken::from(self.tokens[i].clone(), self.kind(i) == token_type::CONTROL))
            .collect();
        tokenizer.add_special_tokens(&added);
        let add_bos = self.add_bos.unwrap_or(default_bos) && self.bos.is_some();
        let add_eos = self.add_eos.unwrap_or(false) && self.eos.is_some();
        Ok(Built { tokenizer, model, add_bos, add_eos })
    }

    /// The type of token `i` (normal when the file has no types).
    pub fn kind(&self, i: usize) -> i32 {
        self.token_types.get(i).copied().unwrap_or(token_type::NORMAL)
    }

    fn vocab_map(&self) -> Result<ahash_map::Map, TokenizerError> {
        let mut map = ahash_map::Map::default();
        for (i, t) in self.tokens.iter().enumerate() {
            if map.insert(t.clone(), i as u32).is_some() && self.kind(i) == token_type::NORMAL {
                return Err(TokenizerError::invalid(
                    "tokenizer.ggml.tokens",
                    format!("token {t:?} (id {i}) appears twice"),
                ));
            }
        }
        Ok(map)
    }

    fn byte_level(&self) -> Result<tokenizers::Tokenizer, TokenizerError> {
        let pre = self.pre.as_deref().unwrap_or("default");
        let (regexes, ignore_merges) = pre_regexes(pre)?;
        let merges = self
            .merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                    TokenizerError::invalid(
                        "tokenizer.ggml.merges",
                        format!("entry {i} {m:?} is not \"a b\""),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(self.vocab_map()?, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| TokenizerError::invalid("tokenizer.ggml.merges", e))?;
        let mut steps = Vec::with_capacity(regexes.len() + 1);
        for r in regexes {
            let split =
                Split::new(SplitPattern::Regex(r.to_string()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| {
                        TokenizerError::invalid("tokenizer.ggml.pre", format!("regex {r:?}: {e}"))
                    })?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(Sequence::new(steps)));
        Ok(t)
    }

    fn sentencepiece(&self) -> Result<tokenizers::Tokenizer, TokenizerError> {
        if self.scores.len() != self.tokens.len() {
            return Err(TokenizerError::invalid(
                "tokenizer.ggml.scores",
                format!("{} scores for {} tokens", self.scores.len(), self.tokens.len()),
            ));
        }
        let vocab = self.vocab_map()?;
        // Every split of a normal token into two tokens is a merge, ranked by the merged token's
        // score (higher first), as llama.cpp's SentencePiece bigram queue orders them.
        let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
        for (i, t) in self.tokens.iter().enumerate() {
            if self.kind(i) != token_type::NORMAL {
                continue;
            }
            for (cut, _) in t.char_indices().skip(1) {
                let (a, b) = t.split_at(cut);
                if vocab.contains_key(a) && vocab.contains_key(b) {
                    ranked.push((self.scores[i], i as u32, a.to_string(), b.to_string()));
                }
            }
        }
        ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let merges = ranked.into_iter().map(|(_, _, a, b)| (a, b)).collect();
        let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
        if let Some(unk) = self.unk {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = builder.build().map_err(|e| TokenizerError::invalid("tokenizer.ggml.scores", e))?;
        // Spaces become `▁`; with `add_space_prefix` every text run starts with one, also after a
        // special token (llama.cpp's `is_prev_special`), which a per-run normalizer gives.
        let replace =
            Replace::new(" ", "▁").map_err(|e| TokenizerError::invalid("tokenizer.ggml.model", e))?;
        let mut steps = vec![NormalizerWrapper::Replace(replace)];
        if self.add_space_prefix.unwrap_or(true) {
            steps.insert(0, NormalizerWrapper::Prepend(Prepend::new("▁".to_string())));
        }
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_normalizer(Some(NormalizerSequence::new(steps)));
        Ok(t)
    }

    /// The bytes each token stands for, as llama.cpp's `token_to_piece` renders them with
    /// specials shown: normal gpt2 tokens through GPT-2's byte map, `llama` tokens with `▁` as
    /// a space and `<0xXX>` byte tokens as their byte, control and user-defined tokens as text.
    pub fn token_bytes(&self, model: VocabModel) -> Vec<Vec<u8>> {
        let mut from_char = std::collections::HashMap::with_capacity(256);
        for (b, c) in byte_to_char().into_iter().enumerate() {
            from_char.insert(c, b as u8);
        }
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| match (self.kind(i), model) {
                (token_type::NORMAL, VocabModel::Gpt2) => t
                    .chars()
                    .map(|c| from_char.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
                (token_type::BYTE, VocabModel::Llama) => {
                    byte_token(t).map_or_else(|| t.as_bytes().to_vec(), |b| vec![b])
                }
                (token_type::NORMAL | token_type::UNUSED, VocabModel::Llama) => {
                    t.replace('▁', " ").into_bytes()
                }
                _ => t.as_bytes().to_vec(),
            })
            .collect()
    }
}

/// The byte of a `<0xXX>` token.
pub(crate) fn byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// `tokenizers`' vocabulary map type.
mod ahash_map {
    pub type Map = tokenizers::models::bpe::Vocab;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Specials, Tokenizer, TokenizerKind};

    /// GPT-2's 256 byte tokens, the merges `h e`, `he l`, `hel l`, `hell o` (ids 256..259), and
    /// `<|end|>` (control), `<|tool|>` (user-defined), `<|start|>` (control).
    fn tiny() -> GgufVocab {
        let chars = byte_to_char();
        let mut tokens: Vec<String> = (0..=255u8).map(|b| chars[b as usize].to_string()).collect();
        tokens.extend(["he", "hel", "hell", "hello", "<|end|>", "<|tool|>", "<|start|>"].map(String::from));
        let mut types = vec![token_type::NORMAL; 260];
        types.extend([token_type::CONTROL, token_type::USER_DEFINED, token_type::CONTROL]);
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens,
            token_types: types,
            merges: ["h e", "he l", "hel l", "hell o"].map(String::from).to_vec(),
            eos: Some(260),
            ..GgufVocab::default()
        }
    }

    #[test]
    fn merges_specials_and_bytes_follow_the_definitions() {
        let t = Tokenizer::from_gguf(&tiny()).unwrap();
        assert_eq!(t.kind(), TokenizerKind::Gguf(VocabModel::Gpt2));
        // "hello" merges whole; " hello" is its own piece (no " h" merge): space byte, then merges.
        assert_eq!(t.encode("hello"), [259]);
        assert_eq!(t.encode(" hello"), [space_id(), 259]);
        assert_eq!(t.encode("hello<|end|>hel"), [259, 260, 257]);
        assert_eq!(t.encode_with("<|end|>", Specials::AsText).len(), 7);
        // User-defined tokens are parsed even as text (llama.cpp), control tokens are not.
        assert_eq!(t.encode_with("<|tool|>", Specials::AsText), [261]);
        assert_eq!(t.decode(&[259, 260, 261]).unwrap(), "hello<|end|><|tool|>");
        assert_eq!(t.special_ids().end_of_generation, [260]);
        assert!(t.is_special(260) && !t.is_special(261) && !t.is_special(259));
        assert_eq!(t.find_special_where("a<|end|>", &|_| true), Some(("<|end|>", 260)));
        assert_eq!(t.encode_allowing("he<|end|>", &|_| false).len(), 8);
        // tiktoken's allowed set: only `<|end|>` is special here; `<|start|>` is its 9 bytes.
        let ids = t.encode_allowing("<|start|>x<|end|>", &|id| id == 260);
        assert_eq!((ids.len(), ids[0], ids[9], ids[10]), (11, u32::from(b'<'), u32::from(b'x'), 260));
        assert_eq!(t.token_id(b"hell"), Some(258));
        // Bytes that are not UTF-8 still decode (lossily) and round-trip through the byte table.
        assert_eq!(t.decode_bytes(&t.encode("é")).unwrap(), "é".as_bytes());
    }

    fn space_id() -> u32 {
        // GPT-2 maps the space byte to `Ġ`, stored at the byte's own index here.
        b' ' as u32
    }

    #[test]
    fn bad_descriptions_name_their_key() {
        type Spoil = fn(&mut GgufVocab);
        let cases: [(Spoil, &str); 6] = [
            (|v| v.pre = Some("klingon".into()), "tokenizer.ggml.pre"),
            (|v| v.model = "bert".into(), "tokenizer.ggml.model"),
            (|v| v.eos = Some(9999), "tokenizer.ggml.eos_token_id"),
            (|v| v.token_types.pop().map(drop).unwrap_or(()), "tokenizer.ggml.token_type"),
            (|v| v.merges.push("nospace".into()), "tokenizer.ggml.merges"),
            (|v| v.tokens.clear(), "tokenizer.ggml.tokens"),
        ];
        for (spoil, key) in cases {
            let mut v = tiny();
            spoil(&mut v);
            let err = Tokenizer::from_gguf(&v).err().expect("an error").to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let mut llama = tiny();
        llama.model = "llama".into();
        let err = Tokenizer::from_gguf(&llama).err().expect("no scores").to_string();
        assert!(err.contains("tokenizer.ggml.scores"), "{err}");
    }

    #[test]
    fn byte_tokens_parse() {
        assert_eq!(byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token("<0xFF>"), Some(255));
        assert_eq!(byte_token("<0x0>"), None);
        assert_eq!(byte_token("0x0A"), None);
    }
}
