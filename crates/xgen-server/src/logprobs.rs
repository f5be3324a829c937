//! OpenAI's log-probability objects: the legacy completions shape (`tokens`, `token_logprobs`,
//! `top_logprobs`, `text_offset`; an echoed prompt's scores first, its first token's `null` as
//! nothing predicts it) and the chat shape (`content`, an object per token).

use serde_json::{json, Map, Value};
use xgen_generate::TokenLogprob;
use xgen_tokenizer::Tokenizer;

/// The legacy completions object for `ids`, each with its log-probability (`None`: the first
/// prompt token); `text_offset` counts characters from `start`.
pub fn completion(tokenizer: &Tokenizer, ids: &[u32], lps: &[Option<&TokenLogprob>], start: usize) -> Value {
    let token = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let top = |l: &TokenLogprob| -> Value {
        l.top.iter().map(|&(id, lp)| (token(id), json!(lp))).collect::<Map<_, _>>().into()
    };
    json!({
        "tokens": ids.iter().map(|&id| token(id)).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.map(|l| l.logprob)).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.map_or(Value::Null, top)).collect::<Vec<_>>(),
        "text_offset": text_offsets(tokenizer, ids, start),
    })
}

/// The chat object for generated tokens.
pub fn chat(tokenizer: &Tokenizer, lps: &[&TokenLogprob]) -> Value {
    let token = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    let bytes = |id: u32| tokenizer.token_bytes(id).map(<[u8]>::to_vec).unwrap_or_default();
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            json!({
                "token": token(l.id), "logprob": l.logprob, "bytes": bytes(l.id),
                "top_logprobs": l.top.iter().map(|&(id, lp)| json!({"token": token(id), "logprob": lp, "bytes": bytes(id)})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "content": content })
}

/// Where each token's text starts in the text of `ids` (lossy UTF-8), in characters from
/// `start`: the characters that end before the token's first byte. A character whose bytes span
/// two tokens counts for the later one, so the offsets index the decoded text exactly.
pub fn text_offsets(tokenizer: &Tokenizer, ids: &[u32], start: usize) -> Vec<usize> {
    let mut bytes = Vec::new();
    let mut starts = Vec::with_capacity(ids.len());
    for &id in ids {
        starts.push(bytes.len());
        bytes.extend_from_slice(tokenizer.token_bytes(id).unwrap_or_default());
    }
    // The byte where each character of the lossy decoding ends (an invalid run is one U+FFFD).
    let mut char_ends = Vec::with_capacity(bytes.len());
    let mut at = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            at += c.len_utf8();
            char_ends.push(at);
        }
        if !chunk.invalid().is_empty() {
            at += chunk.invalid().len();
            char_ends.push(at);
        }
    }
    starts.iter().map(|&b| start + char_ends.partition_point(|&end| end <= b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_index_the_decoded_text_in_characters() {
        let t = Tokenizer::xgen();
        let text = "Grüße, 世界! ok";
        let ids = t.encode(text);
        let offsets = text_offsets(&t, &ids, 0);
        let chars: Vec<char> = text.chars().collect();
        // Each token's own text (where it is whole UTF-8) is found at its offset.
        for (i, &id) in ids.iter().enumerate() {
            if let Ok(piece) = std::str::from_utf8(t.token_bytes(id).unwrap()) {
                let at: String = chars[offsets[i]..].iter().collect();
                assert!(at.starts_with(piece), "token {i} {piece:?} at {}: {at:?}", offsets[i]);
            }
        }
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(text_offsets(&t, &ids, 7)[0], 7);
    }

    #[test]
    fn a_character_split_across_tokens_belongs_to_the_token_that_completes_it() {
        let t = Tokenizer::xgen();
        // "世" is e4 b8 96: its first byte alone, then the rest, as two byte-level tokens.
        let first = t.token_id(&[0xe4]).unwrap();
        let rest = t.token_id(&[0xb8]).unwrap();
        let last = t.token_id(&[0x96]).unwrap();
        let a = t.token_id(b"a").unwrap();
        assert_eq!(text_offsets(&t, &[a, first, rest, last, a], 0), vec![0, 1, 1, 1, 2]);
        // A lone continuation byte is one U+FFFD of its own.
        assert_eq!(text_offsets(&t, &[rest, a], 0), vec![0, 1]);
    }
}
