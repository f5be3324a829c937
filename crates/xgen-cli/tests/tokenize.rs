//! `xgen tokenize` / `xgen detokenize` end to end: the reference fixtures through `--jsonl`, the
//! plain modes, and bad input (one message naming the line, exit code 2).

mod common;

use std::{path::PathBuf, process::Output};

use serde_json::Value;

fn xgen(args: &[&str], stdin: &[u8]) -> Output {
    common::xgen_with(args, stdin)
}

fn fixture(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer").join(name);
    let data = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data.lines().map(|l| serde_json::from_str(l).expect("fixture JSON")).collect()
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("output line is JSON"))
        .collect()
}

#[test]
fn tokenize_jsonl_matches_the_reference() {
    let cases = fixture("encode.jsonl");
    let input: String =
        cases.iter().map(|c| format!("{}\n", serde_json::json!({"text": c["text"]}))).collect();
    let got = json_lines(&xgen(&["tokenize", "--jsonl"], input.as_bytes()));
    assert_eq!(got.len(), cases.len());
    for (g, c) in got.iter().zip(&cases) {
        assert_eq!(g["ids"], c["ids"], "{}", c["kind"]);
    }
}

#[test]
fn detokenize_jsonl_matches_the_reference() {
    let cases = fixture("decode.jsonl");
    let input: String = cases.iter().map(|c| format!("{}\n", serde_json::json!({"ids": c["ids"]}))).collect();
    let got = json_lines(&xgen(&["detokenize", "--jsonl"], input.as_bytes()));
    assert_eq!(got.len(), cases.len());
    for (g, c) in got.iter().zip(&cases) {
        assert_eq!(g["text"], c["text"], "{}", c["kind"]);
    }
}

#[test]
fn plain_modes() {
    let out = xgen(&["tokenize"], b"The world is");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[464,995,318]");
    let out = xgen(&["tokenize", "--text", "a<|endoftext|>b"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[64,50256,65]");
    let out = xgen(&["tokenize", "--no-special", "--text", "a<|endoftext|>b"], b"");
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).expect("JSON ids");
    assert!(!ids.contains(&50256) && ids.len() > 3, "{ids:?}");
    let out = xgen(&["detokenize"], b"[464, 995, 318]");
    assert_eq!(out.stdout, b"The world is");
    let out = xgen(&["tokenize", "--jsonl", "--no-special"], b"{\"text\": \"<sep>\"}\n");
    assert_ne!(json_lines(&out)[0]["ids"], serde_json::json!([50317]));
}

/// Runs a bad input; asserts exit code 2 and a message containing `expect`; returns stdout.
fn rejects(args: &[&str], stdin: &[u8], expect: &str) -> String {
    let out = xgen(args, stdin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(expect), "{args:?}: {err:?} lacks {expect:?}");
    assert_eq!(err.lines().count(), 1, "one message: {err}");
    String::from_utf8(out.stdout).expect("UTF-8 stdout")
}

#[test]
fn bad_input_names_the_line_and_exits_2() {
    let written = rejects(&["tokenize", "--jsonl"], b"{\"text\": \"a\"}\n{\"text\": 1}\n", "line 2");
    assert_eq!(written, "{\"ids\":[64]}\n", "lines before the bad one are written");
    rejects(&["tokenize", "--jsonl"], b"{\"text\": \"a\"}\nnot json\n", "line 2");
    rejects(
        &["tokenize", "--jsonl"],
        b"{\"txt\": \"a\"}\n",
        "line 1: expected {\"text\": string}: missing field `text`",
    );
    rejects(&["tokenize", "--jsonl"], b"{\"text\": \"a\"}\n\xff\n", "line 2: not valid UTF-8");
    rejects(&["tokenize"], b"\xff", "stdin: not valid UTF-8");
    rejects(
        &["detokenize", "--jsonl"],
        b"{\"ids\": [1]}\n{\"ids\": [1, 51200]}\n",
        "line 2: id 51200 at index 1 is out of range",
    );
    rejects(&["detokenize", "--jsonl"], b"{\"ids\": [-1]}\n", "line 1: id -1 at index 0 is out of range");
    rejects(&["detokenize", "--jsonl"], b"{\"ids\": [1.5]}\n", "line 1: expected {\"ids\"");
    rejects(&["detokenize", "--jsonl"], b"{\"text\": \"x\"}\n", "missing field `ids`");
    rejects(&["detokenize"], b"[1, 2", "stdin: expected a JSON array");
    rejects(&["detokenize"], b"[51200]", "id 51200 at index 0 is out of range");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let out = xgen(&["tokenize", "--bogus"], b"");
    assert_eq!(out.status.code(), Some(2));
}
