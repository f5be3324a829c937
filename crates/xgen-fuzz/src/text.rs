//! Text-side inputs: chat templates (any source, rendered with a fixed conversation), and text and
//! ids for XGen's tokenizer and the model tokenizers read from files. Beyond "no panic", each
//! checks the properties the tokenizers promise: byte-level encodings decode to the same text,
//! and streamed decoding equals decoding at once.

use std::sync::OnceLock;

use xgen_generate::{
    chat_template::{ChatTemplate, Message},
    ModelText, Source,
};
use xgen_tokenizer::{TokenId, Tokenizer, TokenizerKind};

/// Any template source, compiled and rendered with a conversation, with and without the
/// generation prompt: an error is fine, a panic, a hang or an unbounded output is not.
pub fn chat_template(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") else { return };
    let messages: Vec<Message> =
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?")]
            .iter()
            .map(|(role, content)| Message { role: role.to_string(), content: content.to_string() })
            .collect();
    let _ = template.render(&messages, true);
    let _ = template.render(&messages[..2], false);
}

/// XGen's tokenizer: the input as text (lossy UTF-8) encodes, with specials recognised, as plain
/// text and with every other special allowed, to ids that decode back to that text; the input as
/// little-endian ids decodes (unknown ids are an error) and streams to the same text.
pub fn xgen_tokenizer(data: &[u8]) {
    static XGEN: OnceLock<Tokenizer> = OnceLock::new();
    let t = XGEN.get_or_init(Tokenizer::xgen);
    let text = String::from_utf8_lossy(data);
    round_trip(t, &text);
    let even = t.encode_allowing(&text, &|id| id % 2 == 0);
    assert_eq!(t.decode(&even).unwrap(), text, "encode_allowing then decode");
    decode_ids(t, data);
}

/// The model tokenizers from files (the gpt2-slice and SentencePiece GGUF fixtures, the
/// gpt2-slice HF directory), picked by the first byte; the rest is text and ids as for XGen's.
/// Byte-level BPE round-trips exactly; SentencePiece may add its space prefix, so only
/// "no panic" and streaming are checked there.
pub fn model_tokenizers(data: &[u8]) {
    static ALL: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let f = crate::fixtures().join("tokenizers");
        let sources = [
            Source::Gguf(f.join("gpt2-slice.gguf")),
            Source::Gguf(f.join("spm.gguf")),
            Source::Dir(f.join("gpt2-slice-hf")),
        ];
        sources
            .iter()
            .map(|s| {
                let config = s.config().expect("fixture config");
                let text = ModelText::of(s, &config).expect("fixture tokenizer");
                std::sync::Arc::try_unwrap(text.tokenizer).ok().expect("sole owner")
            })
            .collect()
    });
    let Some((&which, rest)) = data.split_first() else { return };
    let t = &all[which as usize % all.len()];
    let text = String::from_utf8_lossy(rest);
    let byte_level = matches!(t.kind(), TokenizerKind::HfJson)
        || matches!(t.kind(), TokenizerKind::Gguf(xgen_tokenizer::VocabModel::Gpt2));
    if byte_level {
        round_trip(t, &text);
    } else {
        let _ = t.decode(&t.encode(&text)).unwrap();
        let _ = t.decode(&t.encode_ordinary(&text)).unwrap();
    }
    let _ = t.encode_allowing(&text, &|id| id % 2 == 1);
    decode_ids(t, rest);
}

/// `text` encodes, as plain text and with specials recognised, to ids that decode back to it
/// (added BOS/EOS ids left out), and streams back to it.
fn round_trip(t: &Tokenizer, text: &str) {
    let special = t.special_ids().clone();
    let strip = |mut ids: Vec<TokenId>| {
        if special.add_bos && ids.first() == special.bos.as_ref() {
            ids.remove(0);
        }
        if special.add_eos && ids.last() == special.eos.as_ref() {
            ids.pop();
        }
        ids
    };
    for ids in [strip(t.encode_ordinary(text)), strip(t.encode(text))] {
        assert_eq!(t.decode(&ids).unwrap(), text, "decode(encode(text)) for ids {ids:?}");
        assert_eq!(streamed(t, &ids), text, "streamed decode of {ids:?}");
    }
}

/// `data` as little-endian u32 ids (taken modulo a little over the vocabulary, so that most are
/// known and some are not): decoding fails on the first unknown id, else equals streaming.
fn decode_ids(t: &Tokenizer, data: &[u8]) {
    let n = t.n_vocab() + 4;
    let ids: Vec<TokenId> =
        data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % n).collect();
    match t.decode(&ids) {
        Ok(text) => assert_eq!(streamed(t, &ids), text, "streamed decode of {ids:?}"),
        Err(_) => {
            assert!(ids.iter().any(|&id| t.token_bytes(id).is_err()), "decode failed on known ids {ids:?}")
        }
    }
}

fn streamed(t: &Tokenizer, ids: &[TokenId]) -> String {
    let mut stream = t.stream_decoder();
    let mut out: String = ids.iter().map(|&id| stream.push(id).expect("a known id")).collect();
    out.push_str(&stream.finish());
    out
}
