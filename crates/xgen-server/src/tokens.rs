//! Token accounting: `/tokenize` and `/detokenize` (also under `/v1/`) in both common shapes,
//! llama.cpp's (`content`, `add_special`, `parse_special`, `with_pieces`; answers `tokens` and
//! `content`) and vLLM's (`prompt` or `messages`, `add_special_tokens`, `return_token_strs`;
//! answers `tokens`, `count`, `max_model_len` and `prompt`), and vLLM's `/tokenizer_info`, which
//! lm-evaluation-harness's remote tokenizer reads.

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, State},
    response::Response,
};
use serde_json::{json, Value};
use xgen_tokenizer::Specials;

use crate::{
    api::Fields,
    completions,
    error::ApiError,
    routes::{json_body, respond},
    state::SharedState,
};

pub async fn tokenize(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let body = json_body(&state, body)?;
        tokenize_body(&state, &Fields::from_body(&body)?)
    })();
    respond(&state, "tokenize", result)
}

fn tokenize_body(state: &SharedState, fields: &Fields) -> Result<Value, ApiError> {
    let tokenizer = &state.text.tokenizer;
    // Which shape: `content` (llama.cpp), `prompt` or `messages` (vLLM); the defaults follow it.
    let given: Vec<&str> =
        ["content", "prompt", "messages"].into_iter().filter(|f| fields.get(f).is_some()).collect();
    if given.len() > 1 {
        return Err(ApiError::invalid(
            given[1],
            format!("give one of `content`, `prompt`, `messages`, not {}", given.join(" and ")),
        ));
    }
    let shape = *given.first().ok_or_else(|| {
        ApiError::invalid("prompt", "`prompt` or `content` (a string) or `messages` (a chat) is required")
    })?;
    let text = match shape {
        "messages" => {
            // The prompt a chat request runs: the assistant's turn opened, never continued.
            if fields.get("add_generation_prompt").is_some() && !fields.boolean("add_generation_prompt")? {
                return Err(ApiError::invalid(
                    "add_generation_prompt",
                    "only `add_generation_prompt: true` is supported (the prompt /v1/chat/completions runs)",
                ));
            }
            if fields.boolean("continue_final_message")? {
                return Err(ApiError::invalid(
                    "continue_final_message",
                    "`continue_final_message` is not supported",
                ));
            }
            completions::chat_prompt(state, fields)?
        }
        field => fields.string(field)?.unwrap_or_default().to_string(),
    };
    // llama.cpp adds no BOS unless asked; vLLM adds it for text and not for a chat (whose
    // template writes its own).
    let add_default = shape == "prompt";
    let add = match (fields.get("add_special"), fields.get("add_special_tokens")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "add_special_tokens",
                "give `add_special` or `add_special_tokens`, not both",
            ))
        }
        (Some(_), None) => fields.boolean("add_special")?,
        (None, Some(_)) => fields.boolean("add_special_tokens")?,
        (None, None) => add_default,
    };
    let specials = match fields.get("parse_special") {
        None => Specials::Recognize,
        Some(_) if fields.boolean("parse_special")? => Specials::Recognize,
        Some(_) => Specials::AsText,
    };
    let tokens = match add {
        true => tokenizer.encode_with(&text, specials),
        false => tokenizer.encode_bare(&text, specials),
    };
    let piece = |id: u32| -> Value {
        let bytes = tokenizer.token_bytes(id).unwrap_or_default();
        match std::str::from_utf8(bytes) {
            Ok(s) => s.into(),
            Err(_) => bytes.to_vec().into(),
        }
    };
    let mut out = json!({"count": tokens.len(), "max_model_len": state.context});
    out["tokens"] = match fields.boolean("with_pieces")? {
        true => tokens.iter().map(|&id| json!({"id": id, "piece": piece(id)})).collect(),
        false => json!(tokens),
    };
    if fields.boolean("return_token_strs")? {
        out["token_strs"] =
            tokens.iter().map(|&id| tokenizer.decode(&[id]).unwrap_or_default()).collect::<Vec<_>>().into();
    }
    Ok(out)
}

pub async fn detokenize(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = (|| {
        let body = json_body(&state, body)?;
        let tokens = body
            .get("tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::invalid("tokens", "`tokens` (a list of token ids) is required"))?;
        let ids = tokens
            .iter()
            .map(|t| t.as_u64().filter(|&id| id < u64::from(state.vocab)).map(|id| id as u32))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                ApiError::invalid("tokens", format!("every token must be an id below {}", state.vocab))
            })?;
        let text =
            state.text.tokenizer.decode(&ids).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
        // `prompt` for vLLM's clients, `content` for llama.cpp's.
        Ok(json!({"prompt": text, "content": text}))
    })();
    respond(&state, "detokenize", result)
}

/// vLLM's `/tokenizer_info`: the special tokens and chat template a client needs to tokenize
/// and format as the server does (through `/tokenize`).
pub async fn tokenizer_info(State(state): State<SharedState>) -> Response {
    let tokenizer = &state.text.tokenizer;
    let ids = tokenizer.special_ids();
    let name = |id: Option<u32>| id.and_then(|id| tokenizer.decode(&[id]).ok());
    let kind = match tokenizer.kind() {
        xgen_tokenizer::TokenizerKind::Xgen => "xgen (tiktoken gpt2 + whitespace runs + specials)",
        xgen_tokenizer::TokenizerKind::Gguf(_) => "gguf",
        xgen_tokenizer::TokenizerKind::HfJson => "tokenizer.json",
    };
    let info = json!({
        "tokenizer_class": kind,
        "bos_token": name(ids.bos),
        "eos_token": name(ids.eos),
        "pad_token": null,
        "add_bos_token": ids.add_bos,
        "add_eos_token": ids.add_eos,
        "chat_template": state.text.chat.template_source(),
        "model_max_length": state.context,
        "vocab_size": state.vocab,
    });
    respond(&state, "tokenizer_info", Ok(info))
}
