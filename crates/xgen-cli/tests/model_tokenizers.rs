//! Models that bring their own tokenizer and chat template, end to end through the CLI and the
//! server: the small fixtures of `tests/fixtures/tokenizers` (ids recorded with llama.cpp and HF
//! tokenizers, `make.py` there), and bad ids as usage errors / 400s.

mod common;

use common::{fixtures, jsonl, post, serve, xgen_with};
use serde_json::{json, Value};

fn model(name: &str) -> String {
    fixtures("tokenizers").join(name).to_string_lossy().into_owned()
}

fn expected(fixture: &str) -> Vec<(String, Value)> {
    jsonl(&fixtures("tokenizers/expected.jsonl"))
        .into_iter()
        .filter(|r| r["fixture"] == fixture)
        .map(|r| (r["text"].as_str().unwrap().to_string(), r["ids"].clone()))
        .collect()
}

/// `xgen tokenize --jsonl --model M` over `cases`, compared line by line.
fn assert_tokenizes(m: &str, cases: &[(String, Value)]) {
    let input: String = cases.iter().map(|(t, _)| json!({"text": t}).to_string() + "\n").collect();
    let out = xgen_with(&["tokenize", "--jsonl", "--model", m], input.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len());
    for ((text, ids), got) in cases.iter().zip(&lines) {
        assert_eq!(&got["ids"], ids, "{m}: {text:?}");
    }
}

#[test]
fn gguf_and_tokenizer_json_vocabularies_tokenize_like_their_references() {
    for fixture in ["gpt2-slice.gguf", "gpt2-slice-hf", "spm.gguf"] {
        let cases = expected(fixture);
        assert!(cases.len() >= 10, "{fixture}: {} cases", cases.len());
        assert_tokenizes(&model(fixture), &cases);
    }
}

#[test]
fn detokenize_gives_back_the_text() {
    // Byte-level BPE is lossless; SentencePiece adds BOS and one space before the text.
    for (fixture, skip, prefix) in
        [("gpt2-slice.gguf", 0, ""), ("gpt2-slice-hf", 0, ""), ("spm.gguf", 1, " ")]
    {
        for (text, ids) in expected(fixture).into_iter().filter(|(t, _)| !t.contains('<')) {
            let ids: Vec<u64> =
                ids.as_array().unwrap().iter().skip(skip).map(|v| v.as_u64().unwrap()).collect();
            let out =
                xgen_with(&["detokenize", "--model", &model(fixture)], json!(ids).to_string().as_bytes());
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let want = if text.is_empty() { String::new() } else { format!("{prefix}{text}") };
            assert_eq!(String::from_utf8(out.stdout).unwrap(), want, "{fixture}");
        }
    }
}

#[test]
fn ids_outside_the_model_vocabulary_are_usage_errors() {
    let m = model("gpt2-slice.gguf");
    // 3256 GPT-2 tokens + 4 specials.
    for (args, stdin, says) in [
        (
            vec!["detokenize", "--model", &m],
            "[3260]",
            "id 3260 at index 0 is out of range: the vocabulary has ids 0..3260",
        ),
        (vec!["generate", "--model", &m, "--prompt-ids", "1,3260"], "", "3260"),
        (vec!["generate", "--model", &m, "--prompt", "hi", "--logit-bias", "5000=1"], "", "5000"),
    ] {
        let out = xgen_with(&args, stdin.as_bytes());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says) && err.contains("3260"), "{args:?}: {err}");
    }
    // `xgen quantize` writes XGen's tokenizer into its GGUF files: a model with its own is refused.
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("x.gguf");
    let args = [
        "quantize",
        "--model",
        &model("gpt2-slice-hf"),
        "--out",
        out_file.to_str().unwrap(),
        "--type",
        "q8_0",
    ];
    let out = xgen_with(&args, b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("its own"), "{err}");
    assert!(!out_file.exists());
    // A model without a chat template refuses chat, saying so.
    let out = xgen_with(&["chat", "--model", &model("spm.gguf"), "--max-new-tokens", "2"], b"Hi\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains("no chat template"), "{err}");
    // An unreadable model tokenizer is named at load: a directory with a broken tokenizer.json.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures("tokenizers/gpt2-slice-hf/config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 5}").unwrap();
    let out = xgen_with(&["tokenize", "--model", tmp.path().to_str().unwrap(), "--text", "x"], b"");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tokenizer.json"), "{err}");
}

#[test]
fn generate_and_serve_use_the_model_tokenizer_and_template() {
    let m = model("gpt2-slice.gguf");
    let (text, ids) = expected("gpt2-slice.gguf").into_iter().next().unwrap();
    let out =
        xgen_with(&["generate", "--model", &m, "--prompt", &text, "--max-new-tokens", "3", "--json"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["prompt_ids"], ids);

    let s = serve(&m, &[]);
    let (status, tokens) = post(&s, "/tokenize", json!({"content": text}));
    assert_eq!((status, &tokens["tokens"]), (200, &ids));
    // The template of make.py, rendered as its text says.
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let (status, rendered) = post(&s, "/apply-template", json!({"messages": messages}));
    assert_eq!(status, 200);
    assert_eq!(
        rendered["prompt"],
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\n"
    );
    let (status, chat) = post(&s, "/v1/chat/completions", json!({"messages": messages, "max_tokens": 4}));
    assert_eq!(status, 200, "{chat}");
    let (_, rendered_ids) = post(&s, "/tokenize", json!({"prompt": rendered["prompt"]}));
    assert_eq!(chat["usage"]["prompt_tokens"], rendered_ids["count"], "{chat}");
    // Ids the model does not have: 400s naming the parameter, never a 500.
    for (body, param) in [
        (json!({"prompt": [1, 3260], "max_tokens": 1}), "prompt"),
        (json!({"prompt": "hi", "max_tokens": 1, "logit_bias": {"4000": 1}}), "logit_bias"),
    ] {
        let (status, err) = post(&s, "/v1/completions", body);
        assert_eq!((status, err["error"]["param"].as_str()), (400, Some(param)), "{err}");
    }
    let (status, err) = post(&s, "/detokenize", json!({"tokens": [3260]}));
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("tokens")), "{err}");
}
