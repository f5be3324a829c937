//! An HF model directory's tokenizer: `tokenizer.json` run by `tokenizers`, with the special
//! tokens `tokenizer_config.json` names. XGen checkpoints have no `tokenizer.json` (their
//! tokenizer is Python code); they get XGen's exact tokenizer.

use std::path::Path;

use serde_json::Value;
use tokenizers::DecoderWrapper;

use crate::{
    gguf_vocab::{byte_token, END_OF_GENERATION_TEXTS},
    SpecialIds, TokenId, TokenizerError,
};

/// What a directory's `tokenizer.json` gives.
pub(crate) struct Found {
    pub tokenizer: tokenizers::Tokenizer,
    pub pieces: Vec<Vec<u8>>,
    pub special: Vec<bool>,
    pub ids: SpecialIds,
}

/// Reads `dir`'s tokenizer: `None` for an XGen checkpoint.
pub(crate) fn read(dir: &Path) -> Result<Option<Found>, TokenizerError> {
    let json_path = dir.join("tokenizer.json");
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    if !json_path.is_file() {
        let class = config.as_ref().and_then(|c| c.get("tokenizer_class")).and_then(Value::as_str);
        let xgen = class.is_none_or(|c| c.to_ascii_lowercase().contains("xgen"));
        if xgen && !dir.join("tokenizer.model").exists() {
            return Ok(None);
        }
        return Err(TokenizerError::invalid(
            json_path.display().to_string(),
            format!(
                "missing: this {} tokenizer needs its tokenizer.json (save it with transformers' \
                 `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
                class.unwrap_or("SentencePiece")
            ),
        ));
    }
    let field = json_path.display().to_string();
    let tokenizer =
        tokenizers::Tokenizer::from_file(&json_path).map_err(|e| TokenizerError::invalid(&field, e))?;
    let byte_level = tokenizer.get_decoder().is_some_and(byte_level_decoder);
    let vocab = tokenizer.get_vocab(true);
    let n = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    let mut pieces = vec![Vec::new(); n];
    let mut special = vec![false; n];
    let chars = byte_level.then(byte_map);
    for (token, &id) in &vocab {
        pieces[id as usize] = match &chars {
            Some(map) => token
                .chars()
                .map(|c| map.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| token.as_bytes().to_vec()),
            None => byte_token(token).map_or_else(|| token.replace('▁', " ").into_bytes(), |b| vec![b]),
        };
    }
    for (id, added) in tokenizer.get_added_tokens_decoder() {
        pieces[id as usize] = added.content.clone().into_bytes();
        special[id as usize] = added.special;
    }
    let named = |key: &str| -> Option<TokenId> {
        let v = config.as_ref()?.get(key)?;
        let text = v.as_str().or_else(|| v.get("content").and_then(Value::as_str))?;
        tokenizer.token_to_id(text)
    };
    let (bos, eos) = (named("bos_token"), named("eos_token"));
    let mut end_of_generation: Vec<TokenId> = eos.into_iter().collect();
    for (id, p) in pieces.iter().enumerate() {
        let text = std::str::from_utf8(p).unwrap_or_default();
        if special[id] && END_OF_GENERATION_TEXTS.contains(&text) && !end_of_generation.contains(&(id as u32))
        {
            end_of_generation.push(id as TokenId);
        }
    }
    let flag = |key: &str| config.as_ref().and_then(|c| c.get(key)).and_then(Value::as_bool).unwrap_or(false);
    let ids = SpecialIds {
        bos,
        eos,
        end_of_generation,
        add_bos: flag("add_bos_token"),
        add_eos: flag("add_eos_token"),
    };
    Ok(Some(Found { tokenizer, pieces, special, ids }))
}

/// A JSON file, `None` when it does not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TokenizerError::invalid(path.display().to_string(), e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| TokenizerError::invalid(path.display().to_string(), e))
}

/// Whether a decoder (or a sequence of them) undoes GPT-2's byte-level mapping.
fn byte_level_decoder(d: &DecoderWrapper) -> bool {
    match d {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(s) => s.get_decoders().iter().any(byte_level_decoder),
        _ => false,
    }
}

/// GPT-2's byte map reversed: the char in token strings -> the byte.
fn byte_map() -> std::collections::HashMap<char, u8> {
    crate::export::byte_to_char().into_iter().enumerate().map(|(b, c)| (c, b as u8)).collect()
}

#[cfg(test)]
mod tests {
    use crate::{Tokenizer, TokenizerKind};

    /// A fresh directory under the system's temp folder holding `files`.
    fn dir_with(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xgen-hf-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn xgen_checkpoints_keep_xgens_tokenizer_and_others_need_tokenizer_json() {
        // The tokenizer_config.json of the XGen repos (tokenization_xgen.py behind auto_map).
        let xgen = r#"{"eos_token": "<|endoftext|>", "tokenizer_class": "XgenTokenizer",
                       "model_max_length": 1000000000000000019884624838656}"#;
        for (name, files) in [("xgen", vec![("tokenizer_config.json", xgen)]), ("bare", vec![])] {
            let dir = dir_with(name, &files);
            assert_eq!(Tokenizer::from_hf_dir(&dir).unwrap().kind(), TokenizerKind::Xgen, "{name}");
            std::fs::remove_dir_all(dir).unwrap();
        }
        let llama = dir_with(
            "spm",
            &[("tokenizer_config.json", r#"{"tokenizer_class": "LlamaTokenizer"}"#), ("tokenizer.model", "")],
        );
        let err = Tokenizer::from_hf_dir(&llama).err().expect("no tokenizer.json").to_string();
        assert!(err.contains("tokenizer.json") && err.contains("LlamaTokenizer"), "{err}");
        std::fs::remove_dir_all(llama).unwrap();
        let broken = dir_with("broken", &[("tokenizer.json", "{\"model\": 5}")]);
        let err = Tokenizer::from_hf_dir(&broken).err().expect("unparsable").to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(broken).unwrap();
    }
}
