//! Every case of the reference tokenizer fixtures (HF `tokenization_xgen.py` over tiktoken 0.14).

use std::path::PathBuf;

use serde::Deserialize;
use xgen_tokenizer::{TokenId, Tokenizer};

#[derive(Deserialize)]
struct Case {
    kind: String,
    text: String,
    ids: Vec<TokenId>,
}

fn cases(file: &str) -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer").join(file);
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data.lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{file}:{}: {e}", i + 1)))
        .collect()
}

#[test]
fn encode_matches_every_reference_case() {
    let t = Tokenizer::xgen();
    let cases = cases("encode.jsonl");
    assert_eq!(cases.len(), 1578);
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(t.encode(&c.text), c.ids, "encode.jsonl:{} ({}) {:?}", i + 1, c.kind, truncate(&c.text));
    }
}

#[test]
fn batch_encode_matches_every_reference_case() {
    let t = Tokenizer::xgen();
    let cases = cases("encode.jsonl");
    let texts: Vec<&str> = cases.iter().map(|c| c.text.as_str()).collect();
    let got = t.encode_batch(&texts, xgen_tokenizer::Specials::Recognize);
    for (c, ids) in cases.iter().zip(got) {
        assert_eq!(ids, c.ids, "{}", c.kind);
    }
}

#[test]
fn decode_matches_every_reference_case() {
    let t = Tokenizer::xgen();
    let mut cases = cases("decode.jsonl");
    assert_eq!(cases.len(), 1479);
    // encode.jsonl states that every case round-trips: decode(ids) == text.
    cases.extend(self::cases("encode.jsonl"));
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(t.decode(&c.ids).unwrap(), c.text, "case {} ({}) {:?}", i + 1, c.kind, c.ids);
    }
}

#[test]
fn stream_decoder_equals_decode_on_every_case() {
    let t = Tokenizer::xgen();
    let mut all = cases("decode.jsonl");
    all.extend(cases("encode.jsonl"));
    for c in &all {
        let mut d = t.stream_decoder();
        let mut text = String::new();
        for &id in &c.ids {
            text.push_str(&d.push(id).unwrap());
        }
        text.push_str(&d.finish());
        assert_eq!(text, c.text, "{} {:?}", c.kind, c.ids);
    }
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let t = Tokenizer::xgen();
    // "語" is three bytes; find a case in the fixtures where a token ends inside a character.
    let ids = t.encode("語");
    assert!(ids.len() > 1, "a CJK character split over byte tokens: {ids:?}");
    let mut d = t.stream_decoder();
    let emitted: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
    assert!(emitted[..ids.len() - 1].iter().all(String::is_empty), "{emitted:?}");
    assert_eq!(emitted.last().unwrap(), "語");
    assert!(!d.has_pending());
}

fn truncate(s: &str) -> &str {
    s.char_indices().nth(80).map_or(s, |(i, _)| &s[..i])
}
