//! Prompt scoring over HTTP (`/v1/completions` with `echo` and `logprobs`, `max_tokens: 0`,
//! batched prompts), `return_progress`, and token accounting in llama.cpp's and vLLM's shapes,
//! against transformers' mean NLL of the fixture prompts (expected.json) and stated properties.

use serde_json::{json, Value};
use xgen_generate::{ModelText, Source};
use xgen_model::Config;

mod common;

use common::*;

/// The fixture prompts transformers scored: (ids, mean NLL).
fn scored_prompts() -> Vec<(Vec<u64>, f64)> {
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    e["float32"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["n_tokens"].as_u64().unwrap() <= 300)
        .filter_map(|p| {
            let ids = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            Some((ids, p["mean_nll"].as_f64()?))
        })
        .collect()
}

fn score(s: &Server, prompt: Value) -> Value {
    post(s, "/v1/completions", &json!({"prompt": prompt, "echo": true, "max_tokens": 0, "logprobs": 1}))
        .unwrap()
}

/// The prompt tokens' log-probabilities of a scored choice (the first is null).
fn token_logprobs(choice: &Value) -> Vec<f64> {
    let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lps[0], Value::Null, "nothing predicts the first token");
    assert_eq!(choice["logprobs"]["top_logprobs"][0], Value::Null);
    lps[1..].iter().map(|v| v.as_f64().unwrap()).collect()
}

#[test]
fn echoed_prompt_scores_equal_transformers_nll_also_after_the_prompt_was_cached() {
    let s = start_setup(Setup { prefill_chunk: Some(64), ..Setup::new(4, 16) });
    for (ids, mean_nll) in scored_prompts() {
        // The same prompt once unscored: its cache is kept, yet scoring recomputes every position.
        post(&s, "/v1/completions", &json!({"prompt": ids, "max_tokens": 1})).unwrap();
        let r = score(&s, json!(ids));
        let choice = &r["choices"][0];
        let lps = token_logprobs(choice);
        assert_eq!(lps.len() + 1, ids.len());
        let nll = -lps.iter().sum::<f64>() / lps.len() as f64;
        assert!(
            (nll - mean_nll).abs() / mean_nll < 1e-4,
            "{} tokens: {nll} vs transformers {mean_nll}",
            ids.len()
        );
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(
            r["usage"],
            json!({"prompt_tokens": ids.len(), "completion_tokens": 0, "total_tokens": ids.len()})
        );
        // The tokens spell the echoed text; each alternative is at least as likely as the token,
        // equal to it when it is the token.
        let tokens: Vec<&str> =
            choice["logprobs"]["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tokens.len(), ids.len());
        let offsets = choice["logprobs"]["text_offset"].as_array().unwrap();
        assert_eq!(offsets.len(), ids.len());
        assert_eq!(offsets[0], 0);
        let text = choice["text"].as_str().unwrap();
        if !text.contains('\u{fffd}') {
            assert_eq!(tokens.concat(), text);
            let mut at = 0;
            for (t, o) in tokens.iter().zip(offsets) {
                assert_eq!(o.as_u64().unwrap() as usize, at);
                at += t.chars().count();
            }
        }
        for (i, lp) in lps.iter().enumerate() {
            let top = choice["logprobs"]["top_logprobs"][i + 1].as_object().unwrap();
            let (best, best_lp) = top.iter().next().unwrap();
            assert!(best_lp.as_f64().unwrap() >= *lp);
            if best == tokens[i + 1] {
                assert_eq!(best_lp.as_f64().unwrap(), *lp);
            }
        }
    }
}

#[test]
fn batched_prompts_are_scored_in_one_request_as_one_by_one() {
    let s = start_setup(Setup { prefill_chunk: Some(48), ..Setup::new(4, 16) });
    let prompts: Vec<Vec<u64>> = scored_prompts().into_iter().map(|p| p.0).collect();
    let together = score(&s, json!(prompts));
    let choices = together["choices"].as_array().unwrap();
    assert_eq!(choices.len(), prompts.len());
    for (i, ids) in prompts.iter().enumerate() {
        assert_eq!(choices[i]["index"], i);
        let alone = token_logprobs(&score(&s, json!(ids))["choices"][0]);
        let batched = token_logprobs(&choices[i]);
        assert_eq!(alone.len(), batched.len());
        for (a, b) in alone.iter().zip(&batched) {
            assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "prompt {i}: {a} vs {b}");
        }
    }
    // A list of strings too: each choice echoes its own text.
    let r = score(&s, json!(["Hello world", "The quick brown fox"]));
    assert_eq!(r["choices"][1]["text"], "The quick brown fox");
    assert_eq!(r["choices"][1]["logprobs"]["tokens"].as_array().unwrap().len(), 4);
}

#[test]
fn echo_with_generation_scores_the_prompt_then_the_greedy_tokens() {
    let s = start(None, 4, 16, 1 << 20);
    let (prompt, new) = expected_greedy();
    let body = json!({"prompt": prompt, "echo": true, "max_tokens": 4, "logprobs": 2, "temperature": 0});
    let r = post(&s, "/v1/completions", &body).unwrap();
    let choice = &r["choices"][0];
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len() + 4);
    assert_eq!(lp["top_logprobs"][prompt.len()].as_object().unwrap().len(), 2);
    // The generated tokens are transformers' greedy ones, and they are the most likely.
    let tok = xgen_tokenizer::Tokenizer::xgen();
    for (k, &id) in new[..4].iter().enumerate() {
        let at = prompt.len() + k;
        assert_eq!(lp["tokens"][at], tok.decode(&[id]).unwrap());
        let best = lp["top_logprobs"][at].as_object().unwrap().values().next().unwrap().clone();
        assert_eq!(lp["token_logprobs"][at], best);
    }
    let echoed = tok.decode(&prompt.iter().map(|&i| i as u32).collect::<Vec<_>>()).unwrap();
    assert_eq!(choice["text"], format!("{echoed}{}", tok.decode(&new[..4]).unwrap()));
    // text_offset runs on over the generated text.
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(offsets[prompt.len()], echoed.chars().count());
    // Streamed: the same text, tokens and offsets, chunk by chunk.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = stream(&s, "/v1/completions", &streamed);
    let (mut text, mut tokens, mut offsets_seen) = (String::new(), Vec::new(), Vec::new());
    for c in &chunks[..chunks.len() - 1] {
        let c: Value = serde_json::from_str(c).unwrap();
        let choice = &c["choices"][0];
        text += choice["text"].as_str().unwrap();
        tokens.extend(choice["logprobs"]["tokens"].as_array().unwrap().clone());
        offsets_seen.extend(choice["logprobs"]["text_offset"].as_array().unwrap().clone());
    }
    assert_eq!(text, choice["text"].as_str().unwrap());
    assert_eq!((&tokens, &offsets_seen), (lp["tokens"].as_array().unwrap(), offsets));
}

#[test]
fn streamed_scoring_reports_progress_chunk_by_chunk_then_the_echo() {
    let s = start_setup(Setup { prefill_chunk: Some(16), ..Setup::new(4, 16) });
    let (ids, _) = scored_prompts().into_iter().find(|p| p.0.len() == 150).unwrap();
    let body = json!({"prompt": ids, "echo": true, "max_tokens": 0, "logprobs": 0, "stream": true, "return_progress": true});
    let chunks = stream(&s, "/v1/completions", &body);
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let values: Vec<Value> =
        chunks[..chunks.len() - 1].iter().map(|c| serde_json::from_str(c).unwrap()).collect();
    let progress: Vec<&Value> = values.iter().filter_map(|v| v.get("prompt_progress")).collect();
    assert_eq!(progress.len(), 150usize.div_ceil(16), "one per chunk read");
    let processed: Vec<u64> = progress.iter().map(|p| p["processed"].as_u64().unwrap()).collect();
    assert!(processed.windows(2).all(|w| w[0] < w[1]) && processed.last() == Some(&150));
    assert!(progress.iter().all(|p| p["total"] == 150 && p["cache"] == 0 && p["time_ms"].is_u64()));
    let rest: Vec<&Value> = values.iter().filter(|v| v.get("prompt_progress").is_none()).collect();
    assert_eq!(rest.len(), 2, "the echo with its scores, then the finish");
    assert_eq!(rest[0]["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len(), 150);
    assert_eq!(rest[0]["choices"][0]["logprobs"]["top_logprobs"][1], json!({}));
    assert_eq!(rest[1]["choices"][0]["finish_reason"], "length");
    // Without return_progress nothing but the answer; a cached prompt reports its cache.
    let plain = json!({"prompt": ids, "max_tokens": 1, "stream": true});
    assert!(stream(&s, "/v1/completions", &plain).iter().all(|c| !c.contains("prompt_progress")));
    let again = json!({"prompt": ids, "max_tokens": 1, "stream": true, "return_progress": true});
    let chunks = stream(&s, "/v1/completions", &again);
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["prompt_progress"]["cache"], 149, "all but the last token came from the cache");
}

#[test]
fn bad_scoring_requests_are_400s_naming_the_field() {
    let s = start(None, 4, 16, 1 << 20);
    let cases = [
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 0, "logprobs": 1}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": -1, "echo": true}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 0, "echo": true, "logprobs": 6}), "logprobs"),
        (json!({"prompt": "x", "max_tokens": 0, "echo": true, "logprobs": -1}), "logprobs"),
        (json!({"prompt": "x", "max_tokens": 0, "echo": "yes"}), "echo"),
        (json!({"prompt": "", "max_tokens": 0, "echo": true, "logprobs": 1}), "prompt"),
        (json!({"prompt": [], "max_tokens": 0, "echo": true}), "prompt"),
        (json!({"prompt": [[]], "max_tokens": 0, "echo": true}), "prompt"),
        (json!({"prompt": ["a", ""], "max_tokens": 0, "echo": true}), "prompt"),
        (json!({"prompt": "x", "stream": true, "return_progress": 1}), "return_progress"),
    ];
    for (body, param) in cases {
        let (code, err, _) = post(&s, "/v1/completions", &body).unwrap_err();
        assert_eq!((code, err["error"]["param"].as_str()), (400, Some(param)), "{body}: {err}");
    }
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0});
    let (code, err, _) = post(&s, "/v1/chat/completions", &chat).unwrap_err();
    assert_eq!((code, err["error"]["param"].as_str()), (400, Some("max_tokens")));
    // echo without logprobs and no budget: the prompt back, nothing generated.
    let r =
        post(&s, "/v1/completions", &json!({"prompt": "Hi there", "max_tokens": 0, "echo": true})).unwrap();
    assert_eq!((&r["choices"][0]["text"], &r["choices"][0]["logprobs"]), (&json!("Hi there"), &Value::Null));
}

#[test]
fn tokenize_answers_llama_cpp_and_vllm_shapes() {
    // A SentencePiece model that adds BOS (id 1), so the shapes' defaults differ.
    let spm = fixture().join("../../tokenizers/spm.gguf");
    let config = Config::load(&fixture().join("config.json")).unwrap();
    let text = std::sync::Arc::new(ModelText::of(&Source::Gguf(spm), &config).unwrap());
    let s = start_setup(Setup { text, ..Setup::new(2, 8) });
    let tokens =
        |v: &Value| v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect::<Vec<_>>();
    let vllm = post(&s, "/tokenize", &json!({"prompt": "Hello world"})).unwrap();
    let ids = tokens(&vllm);
    assert_eq!(ids[0], 1, "vLLM adds special tokens by default");
    assert_eq!(
        (vllm["count"].as_u64(), vllm["max_model_len"].as_u64()),
        (Some(ids.len() as u64), Some(8192))
    );
    let bare =
        post(&s, "/v1/tokenize", &json!({"prompt": "Hello world", "add_special_tokens": false})).unwrap();
    assert_eq!(tokens(&bare), ids[1..]);
    let llama = post(&s, "/tokenize", &json!({"content": "Hello world"})).unwrap();
    assert_eq!(tokens(&llama), ids[1..], "llama.cpp adds none unless add_special");
    let with_bos = post(&s, "/tokenize", &json!({"content": "Hello world", "add_special": true})).unwrap();
    assert_eq!(tokens(&with_bos), ids);
    let pieces = post(&s, "/tokenize", &json!({"content": "Hello world", "with_pieces": true})).unwrap();
    let pieces = pieces["tokens"].as_array().unwrap();
    assert_eq!(pieces.iter().map(|p| p["id"].as_u64().unwrap()).collect::<Vec<_>>(), ids[1..]);
    let detok = post(&s, "/detokenize", &json!({"tokens": ids[1..]})).unwrap();
    let spelled: String =
        pieces.iter().map(|p| p["piece"].as_str().unwrap().replace('\u{2581}', " ")).collect();
    assert_eq!(detok["content"], detok["prompt"]);
    assert_eq!(detok["content"].as_str().unwrap().trim(), spelled.trim());
    assert_eq!(post(&s, "/v1/detokenize", &json!({"tokens": ids[1..]})).unwrap()["prompt"], detok["prompt"]);
    let strs = post(&s, "/tokenize", &json!({"prompt": "Hello", "return_token_strs": true})).unwrap();
    assert_eq!(strs["token_strs"].as_array().unwrap().len(), strs["count"].as_u64().unwrap() as usize);
    let info: Value = ureq::get(&format!("{}/tokenizer_info", s.base)).call().unwrap().into_json().unwrap();
    assert_eq!((info["bos_token"].as_str(), info["add_bos_token"].as_bool()), (Some("<s>"), Some(true)));
    assert_eq!(info["model_max_length"], 8192);
    for (body, param) in [
        (json!({"prompt": "a", "content": "b"}), "prompt"),
        (json!({}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "a", "add_special_tokens": "no"}), "add_special_tokens"),
        (json!({"content": "a", "with_pieces": 1}), "with_pieces"),
        (json!({"messages": [{"role": "user"}]}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": false}),
            "add_generation_prompt",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}], "continue_final_message": true}),
            "continue_final_message",
        ),
    ] {
        let (code, err, _) = post(&s, "/tokenize", &body).unwrap_err();
        assert_eq!((code, err["error"]["param"].as_str()), (400, Some(param)), "{body}: {err}");
    }
    let (code, err, _) = post(&s, "/detokenize", &json!({"tokens": [1, -2]})).unwrap_err();
    assert_eq!((code, err["error"]["param"].as_str()), (400, Some("tokens")));
}

#[test]
fn tokenize_a_chat_renders_it_as_chat_completions_would() {
    let s = start(None, 2, 8, 1 << 20);
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let t = post(&s, "/tokenize", &json!({"messages": messages})).unwrap();
    let prompt = post(&s, "/apply-template", &json!({"messages": messages})).unwrap()["prompt"].clone();
    let tok = xgen_tokenizer::Tokenizer::xgen();
    let want: Vec<u32> = tok.encode(prompt.as_str().unwrap());
    assert_eq!(t["tokens"], json!(want));
    let info: Value = ureq::get(&format!("{}/tokenizer_info", s.base)).call().unwrap().into_json().unwrap();
    assert_eq!(
        (info["eos_token"].as_str(), info["bos_token"].as_str()),
        (Some("<|endoftext|>"), Some("<|endoftext|>"))
    );
}
