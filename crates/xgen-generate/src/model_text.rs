//! A model's text side, read from where its weights come from: its tokenizer (XGen's exact one
//! for XGen models, else the model's own) and its chat format (the model's template; XGen-Inst
//! for XGen models without one).
//!
//! | source | tokenizer | chat format |
//! |---|---|---|
//! | GGUF file | `tokenizer.ggml.*` (XGen's when the vocabulary is XGen's) | `tokenizer.chat_template` |
//! | HF directory | `tokenizer.json` (XGen's when the checkpoint has none) | `chat_template` in `tokenizer_config.json`, or `chat_template.jinja` |
//! | random weights | XGen's | XGen-Inst |

use std::{collections::HashMap, path::Path, sync::Arc};

use xgen_model::{gguf::Value, Config};
use xgen_tokenizer::{GgufVocab, Tokenizer, TokenizerKind};

use crate::{
    chat::ChatFormat,
    chat_template::ChatTemplate,
    error::{GenerateError, Result},
    source::Source,
    GenerationConfig,
};

/// A model's tokenizer and chat format.
pub struct ModelText {
    pub tokenizer: Arc<Tokenizer>,
    pub chat: ChatFormat,
}

impl ModelText {
    /// Reads the text side of `source`, checked against the model's vocabulary size.
    pub fn of(source: &Source, config: &Config) -> Result<Self> {
        let (tokenizer, template) = match source {
            Source::Gguf(path) => {
                let file = xgen_model::gguf::read::GgufFile::open(path)?;
                let meta = file.metadata();
                let vocab = gguf_vocab(path, meta)?;
                let template = meta.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
                (Tokenizer::from_gguf(&vocab).map_err(|e| in_file(path, e))?, template)
            }
            Source::Dir(dir) => (Tokenizer::from_hf_dir(dir)?, dir_template(dir)?),
            Source::Random { .. } => (Tokenizer::xgen(), None),
        };
        if tokenizer.n_vocab() as usize > config.vocab_size {
            return Err(GenerateError::setting(
                "tokenizer",
                format!(
                    "the tokenizer has {} ids but the model's vocabulary only {}",
                    tokenizer.n_vocab(),
                    config.vocab_size
                ),
            ));
        }
        let chat = match template {
            Some(src) => {
                let name =
                    |id: Option<u32>| id.and_then(|id| tokenizer.decode(&[id]).ok()).unwrap_or_default();
                let ids = tokenizer.special_ids();
                ChatFormat::Template(Box::new(ChatTemplate::new(&src, &name(ids.bos), &name(ids.eos))?))
            }
            None if tokenizer.kind() == TokenizerKind::Xgen => ChatFormat::XgenInst,
            None => ChatFormat::Missing,
        };
        Ok(Self { tokenizer: Arc::new(tokenizer), chat })
    }

    /// XGen's tokenizer and the XGen-Inst format.
    pub fn xgen() -> Self {
        Self { tokenizer: Arc::new(Tokenizer::xgen()), chat: ChatFormat::XgenInst }
    }

    /// Adds the tokenizer's end-of-generation tokens (eos, end of turn) to `config`'s eos ids,
    /// as llama.cpp stops at any of them.
    pub fn add_stops(&self, config: &mut GenerationConfig) {
        for &id in &self.tokenizer.special_ids().end_of_generation {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
    }

    /// An error unless every id is in the model's vocabulary (`n_vocab` ids): `field` names where
    /// the ids came from.
    pub fn check_ids(ids: &[u32], n_vocab: usize, field: &str) -> Result<()> {
        match ids.iter().position(|&id| id as usize >= n_vocab) {
            None => Ok(()),
            Some(i) => Err(GenerateError::setting(
                field,
                format!(
                    "token id {} (at index {i}) is outside the model's vocabulary: ids are 0..{n_vocab}",
                    ids[i]
                ),
            )),
        }
    }
}

fn in_file(path: &Path, e: xgen_tokenizer::TokenizerError) -> GenerateError {
    GenerateError::setting(path.display().to_string(), e.to_string())
}

/// The `tokenizer.ggml.*` keys of a GGUF file.
fn gguf_vocab(path: &Path, meta: &HashMap<String, Value>) -> Result<GgufVocab> {
    let bad = |key: &str, what: &str| {
        in_file(
            path,
            xgen_tokenizer::TokenizerError::Invalid { field: key.to_string(), message: what.to_string() },
        )
    };
    let string = |key: &str| -> Result<Option<String>> {
        meta.get(key).map(|v| v.to_string().cloned().map_err(|_| bad(key, "expected a string"))).transpose()
    };
    let list = |key: &str| -> Result<&[Value]> {
        match meta.get(key) {
            None => Ok(&[]),
            Some(v) => v.to_vec().map(Vec::as_slice).map_err(|_| bad(key, "expected an array")),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        list(key)?.iter().map(|v| v.to_string().cloned().map_err(|_| bad(key, "expected strings"))).collect()
    };
    let id = |key: &str| -> Result<Option<u32>> {
        meta.get(key)
            .map(|v| {
                v.to_u32()
                    .or_else(|_| v.to_i32().map(|i| i as u32))
                    .map_err(|_| bad(key, "expected a token id"))
            })
            .transpose()
    };
    let flag = |key: &str| -> Result<Option<bool>> {
        meta.get(key).map(|v| v.to_bool().map_err(|_| bad(key, "expected a bool"))).transpose()
    };
    let model = string("tokenizer.ggml.model")?.ok_or_else(|| bad("tokenizer.ggml.model", "missing"))?;
    Ok(GgufVocab {
        model,
        pre: string("tokenizer.ggml.pre")?,
        tokens: strings("tokenizer.ggml.tokens")?,
        token_types: list("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().map_err(|_| bad("tokenizer.ggml.token_type", "expected i32 values")))
            .collect::<Result<_>>()?,
        merges: strings("tokenizer.ggml.merges")?,
        scores: list("tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.to_f32().map_err(|_| bad("tokenizer.ggml.scores", "expected f32 values")))
            .collect::<Result<_>>()?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        eot: id("tokenizer.ggml.eot_token_id")?,
        eom: id("tokenizer.ggml.eom_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        add_bos: flag("tokenizer.ggml.add_bos_token")?,
        add_eos: flag("tokenizer.ggml.add_eos_token")?,
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
    })
}

/// An HF directory's chat template: `chat_template` in `tokenizer_config.json` (a string, or a
/// list of named templates of which `default` is used), or `chat_template.jinja`.
fn dir_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| GenerateError::Io { path: jinja, source });
    }
    let path = dir.join("tokenizer_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(GenerateError::Io { path, source }),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| GenerateError::Json { path: path.clone(), source })?;
    Ok(match &v["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .or(named.first())
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    })
}
