//! The server over real HTTP on a loopback port, with the tiny fixture model.

use std::{
    io::{BufRead, BufReader, Read},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use xgen_generate::{chat::ChatFormat, chat_template::ChatTemplate, GenerationConfig, ModelText};
use xgen_model::Config;
use xgen_server::{EngineOptions, PrefixCache, ServeOptions, Ui};
use xgen_tokenizer::Tokenizer;

mod common;

use common::*;

#[test]
fn greedy_completion_equals_transformers_and_streams_the_same_text() {
    let s = start(None, 8, 64, 1 << 20);
    let (prompt, new) = expected_greedy();
    let want = Tokenizer::xgen().decode(&new).unwrap();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 32, "temperature": 0});
    let r = post(&s, "/v1/completions", &body).unwrap();
    assert_eq!(r["choices"][0]["text"], want.as_str());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"], json!({"prompt_tokens": 40, "completion_tokens": 32, "total_tokens": 72}));
    let mut streaming = body.clone();
    streaming["stream"] = true.into();
    assert_eq!(streamed_text(&stream(&s, "/v1/completions", &streaming), "text"), want);

    let chat = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 12, "temperature": 0});
    let r = post(&s, "/v1/chat/completions", &chat).unwrap();
    let content = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let mut streaming = chat.clone();
    streaming["stream"] = true.into();
    assert_eq!(streamed_text(&stream(&s, "/v1/chat/completions", &streaming), "content").trim(), content);
}

#[test]
fn sixteen_concurrent_streams_complete_and_agree() {
    let s = start(None, 8, 64, 1 << 20);
    let (prompt, new) = expected_greedy();
    let want = Tokenizer::xgen().decode(&new).unwrap();
    let body = json!({"prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": true});
    let texts: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| streamed_text(&stream(&s, "/v1/completions", &body), "text")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(texts.iter().all(|t| *t == want), "{texts:?}");
}

#[test]
fn a_disconnected_stream_frees_its_slot() {
    let s = start(None, 1, 4, 1 << 20);
    let long = json!({"prompt": "The world is", "max_tokens": 8000, "temperature": 0, "stream": true});
    let r = ureq::post(&format!("{}/v1/completions", s.base)).send_json(long).unwrap();
    let mut reader = BufReader::new(r.into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "));
    drop(reader);
    // With one slot, this completes only once the abandoned sequence has left the batch.
    let started = Instant::now();
    let r = post(&s, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4, "temperature": 0})).unwrap();
    assert_eq!(r["usage"]["completion_tokens"], 4);
    assert!(started.elapsed() < Duration::from_secs(20));
    // The engine updates the gauge right after sending the last token: allow it a moment.
    let metrics = || ureq::get(&format!("{}/metrics", s.base)).call().unwrap().into_string().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !metrics().contains("xgen_running_sequences 0") {
        assert!(Instant::now() < deadline, "{}", metrics());
        std::thread::sleep(Duration::from_millis(10));
    }
    let metrics = metrics();
    assert!(metrics.contains("xgen_requests_total{endpoint=\"completions\",status=\"200\"} 2"), "{metrics}");
    assert!(metrics.contains("xgen_time_to_first_token_seconds_count 2"), "{metrics}");
}

#[test]
fn bad_input_gets_openai_errors() {
    let s = start(None, 8, 64, 2000);
    let cases = [
        (json!({"prompt": "x", "temperature": "hot"}), "temperature"),
        (json!({"prompt": "x", "temperature": 3}), "temperature"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "n": 17}), "n"),
        (json!({"prompt": "x", "stop": [1, 2]}), "stop"),
        (json!({"prompt": "x", "logit_bias": {"99999": 1}}), "logit_bias"),
        (json!({"prompt": [1, 51200]}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "x", "logprobs": 9}), "logprobs"),
        (json!({"prompt": "x", "stream": "yes"}), "stream"),
    ];
    for (body, param) in cases {
        let (code, err, _) = post(&s, "/v1/completions", &body).unwrap_err();
        assert_eq!((code, err["error"]["param"].as_str()), (400, Some(param)), "{body}: {err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
    }
    let (code, err, _) =
        post(&s, "/v1/chat/completions", &json!({"messages": [{"role": "assistant", "content": "x"}]}))
            .unwrap_err();
    assert_eq!((code, err["error"]["param"].as_str()), (400, Some("messages")));
    let (code, err, _) =
        post(&s, "/v1/completions", &json!({"prompt": "x", "max_tokens": 8200})).unwrap_err();
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(code == 400 && msg.contains("8192") && msg.contains("8201"), "{msg}");
    match ureq::post(&format!("{}/v1/completions", s.base))
        .set("content-type", "application/json")
        .send_string("{not json")
    {
        Err(ureq::Error::Status(400, r)) => {
            assert!(r.into_json::<Value>().unwrap()["error"]["message"].is_string())
        }
        other => panic!("{other:?}"),
    }
    let big = json!({"prompt": "x".repeat(3000)});
    let (code, err, _) = post(&s, "/v1/completions", &big).unwrap_err();
    assert_eq!(code, 413, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("2000"));
    assert_eq!(post(&s, "/nope", &json!({})).unwrap_err().0, 404);
}

#[test]
fn a_models_chat_template_renders_and_its_errors_are_400s() {
    let src = "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('Roles must end with the user') }}{% endif %}\
               {% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{% endfor %}{{ eos_token }}";
    let chat =
        ChatFormat::Template(Box::new(ChatTemplate::new(src, "<|endoftext|>", "<|endoftext|>").unwrap()));
    let text = std::sync::Arc::new(ModelText { tokenizer: std::sync::Arc::new(Tokenizer::xgen()), chat });
    let s = start_setup(Setup { text, ..Setup::new(2, 8) });
    let user = json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": " Hi "}]});
    assert_eq!(post(&s, "/apply-template", &user).unwrap()["prompt"], "<system>S<user>Hi<|endoftext|>");
    let done =
        post(&s, "/v1/chat/completions", &json!({"messages": user["messages"], "max_tokens": 2})).unwrap();
    assert_eq!(
        done["usage"]["prompt_tokens"],
        Tokenizer::xgen().encode("<system>S<user>Hi<|endoftext|>").len()
    );
    // The template's own exception, and malformed messages: 400s naming `messages`, never a 5xx.
    let last_assistant =
        json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]});
    for path in ["/apply-template", "/v1/chat/completions"] {
        let (code, err, _) = post(&s, path, &last_assistant).unwrap_err();
        assert_eq!((code, err["error"]["param"].as_str()), (400, Some("messages")), "{err}");
        assert!(err["error"]["message"].as_str().unwrap().contains("Roles must end with the user"), "{err}");
    }
    for body in [
        json!({}),
        json!({"messages": 3}),
        json!({"messages": [{"role": "user"}]}),
        json!({"messages": [{"role": 1, "content": "x"}]}),
    ] {
        let (code, err, _) = post(&s, "/apply-template", &body).unwrap_err();
        assert_eq!(code, 400, "{body}: {err}");
    }
    // The chat page leaves the system prompt to the template (XGen's header is XGen-Inst's).
    let page = ureq::get(&format!("{}/", s.base)).call().unwrap().into_string().unwrap();
    assert!(page.contains("const DEFAULT_HEADER = \"\";") && !page.contains("A chat between"));
}

#[test]
fn no_request_body_gets_a_5xx() {
    use rand::{seq::IndexedRandom, Rng, SeedableRng};
    let s = start(None, 4, 64, 1 << 20);
    let values = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1),
        json!(3.5),
        json!(1e300),
        json!(1u64 << 40),
        json!(""),
        json!("x"),
        json!("<|endoftext|>"),
        json!([]),
        json!([1, 2]),
        json!([99_999_999]),
        json!([-5]),
        json!([[1], [2, 3]]),
        json!({"a": 1}),
        json!([{"role": "user", "content": "hi"}]),
        json!([{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]),
        json!({"type": "json_object"}),
        json!({"50256": -100}),
        json!({"x": 1}),
        json!(["a", 1]),
        json!("\u{0}\u{ffff}"),
    ];
    let fields = [
        "prompt",
        "messages",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "n",
        "stop",
        "seed",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "echo",
        "response_format",
        "guided_regex",
        "guided_choice",
        "guided_json",
        "presence_penalty",
        "repetition_penalty",
        "tokens",
        "content",
        "stream_options",
        "return_progress",
        "add_special_tokens",
        "add_special",
        "parse_special",
        "with_pieces",
        "return_token_strs",
    ];
    let paths = [
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/v1/tokenize",
        "/v1/detokenize",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(25);
    for i in 0..300 {
        let mut body = serde_json::Map::new();
        for _ in 0..rng.random_range(0..5) {
            body.insert(
                fields.choose(&mut rng).unwrap().to_string(),
                values.choose(&mut rng).unwrap().clone(),
            );
        }
        // Short generations: the point is the validation, not the tokens.
        let max_tokens = [json!(2), json!(0), json!("x"), json!(null), json!(1e12)];
        body.insert("max_tokens".into(), max_tokens.choose(&mut rng).unwrap().clone());
        let path = paths[i % paths.len()];
        let body = Value::Object(body);
        if let Err((code, err, _)) = post(&s, path, &body) {
            assert!(code < 500, "{path} {body}: {code} {err}");
            assert!(err["error"]["message"].is_string(), "{path} {body}: {err}");
        }
    }
}

#[test]
fn api_key_is_required_when_set() {
    let s = start(Some("sekret"), 8, 64, 1 << 20);
    let body = json!({"prompt": "x", "max_tokens": 1});
    let url = format!("{}/v1/completions", s.base);
    for auth in [None, Some("Bearer wrong")] {
        let mut req = ureq::post(&url);
        if let Some(a) = auth {
            req = req.set("Authorization", a);
        }
        match req.send_json(body.clone()) {
            Err(ureq::Error::Status(401, r)) => {
                assert_eq!(r.into_json::<Value>().unwrap()["error"]["type"], "authentication_error")
            }
            other => panic!("{auth:?}: {other:?}"),
        }
    }
    let ok = ureq::post(&url).set("Authorization", "Bearer sekret").send_json(body).unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ureq::get(&format!("{}/health", s.base)).call().unwrap().status(), 200, "health needs no key");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = start(None, 1, 1, 1 << 20);
    let long = json!({"prompt": "The world is", "max_tokens": 8000, "temperature": 0, "stream": true});
    // Hold the only slot and the only queue place with long streams, read slowly.
    let mut held = Vec::new();
    let mut saw_429 = None;
    for _ in 0..6 {
        match ureq::post(&format!("{}/v1/completions", s.base)).send_json(long.clone()) {
            Ok(r) => held.push(r.into_reader()),
            Err(ureq::Error::Status(429, r)) => {
                saw_429 = Some(r.header("retry-after").map(String::from));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(saw_429, Some(Some("1".to_string())), "held {} streams", held.len());
    let mut first = [0u8; 6];
    held[0].read_exact(&mut first).unwrap();
    assert_eq!(&first, b"data: ");
}

#[test]
fn health_is_503_while_loading() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let s = start_with(Setup::new(8, 64), move || {
        let _ = release_rx.recv();
    });
    match ureq::get(&format!("{}/health", s.base)).call() {
        Err(ureq::Error::Status(503, _)) => {}
        other => panic!("{other:?}"),
    }
    let (code, err, _) = post(&s, "/v1/completions", &json!({"prompt": "x"})).unwrap_err();
    assert_eq!((code, err["error"]["type"].as_str()), (503, Some("server_error")));
    release_tx.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{}/health", s.base)).call().is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        post(&s, "/v1/completions", &json!({"prompt": "x", "max_tokens": 2})).unwrap()["usage"]
            ["completion_tokens"],
        2
    );
}

#[test]
fn shutdown_cancels_what_does_not_drain_in_time() {
    let mut s = start(None, 4, 8, 1 << 20);
    let long = json!({"prompt": "The world is", "max_tokens": 8000, "temperature": 0, "stream": true});
    let r = ureq::post(&format!("{}/v1/completions", s.base)).send_json(long).unwrap();
    let mut lines = BufReader::new(r.into_reader()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("data: {"));
    s.stop.take().unwrap().send(()).unwrap();
    // The stream ends (drain timeout 300 ms) with an error chunk, then [DONE].
    let rest: Vec<String> = lines.map(Result::unwrap).filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(rest.last().map(String::as_str), Some("data: [DONE]"));
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{:?}", &rest[rest.len().saturating_sub(3)..]);
    s.done
        .lock()
        .unwrap()
        .recv_timeout(Duration::from_secs(10))
        .expect("serve returned after the drain timeout");
}

#[test]
fn a_model_that_fails_to_load_stops_the_server_with_its_error() {
    let config = Config::load(&fixture().join("config.json")).unwrap();
    let options = ServeOptions {
        model_name: "broken".into(),
        defaults: GenerationConfig::defaults_for(&config),
        context: config.max_position_embeddings,
        config,
        text: std::sync::Arc::new(xgen_generate::ModelText::xgen()),
        api_key: None,
        ui: Ui::On,
        replica_id: "r".into(),
        engine: EngineOptions { max_batch: 1, max_queue: 1, kv_budget: None, prefix_cache: PrefixCache::On },
        kv_budget_after_load: || None,
        disk_cache: None,
        body_limit: 1 << 20,
        drain_timeout: Duration::from_millis(100),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let err = rt
        .block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let load = || Err("model.safetensors: truncated".to_string());
            tokio::time::timeout(
                Duration::from_secs(10),
                xgen_server::serve(options, listener, load, std::future::pending()),
            )
            .await
            .expect("serve returns")
        })
        .unwrap_err();
    assert!(err.to_string().contains("model.safetensors: truncated"), "{err}");
}

/// Greedy, never ending at eos (random weights would end anywhere).
fn endless(prompt: Value, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logit_bias": {"50256": -100}, "stream": true})
}

/// The arrival time of every `data:` payload of an SSE response.
fn timed_stream(s: &Server, body: &Value) -> Vec<Instant> {
    let r = ureq::post(&format!("{}/v1/completions", s.base)).send_json(body.clone()).unwrap();
    BufReader::new(r.into_reader())
        .lines()
        .map(Result::unwrap)
        .filter(|l| l.starts_with("data: "))
        .map(|_| Instant::now())
        .collect()
}

/// `n` copies of `body` sent at once to `/v1/completions`: the responses, and the highest
/// `xgen_kv_cache_bytes` seen meanwhile (polled every 2 ms).
fn concurrent_watching_kv(s: &Server, body: &Value, n: usize) -> (Vec<Value>, i64) {
    let peak = std::sync::atomic::AtomicI64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let results = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(metric(s, "xgen_kv_cache_bytes"), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let handles: Vec<_> =
            (0..n).map(|_| scope.spawn(|| post(s, "/v1/completions", body).unwrap())).collect();
        let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        results
    });
    (results, peak.into_inner())
}

#[test]
fn a_stream_keeps_producing_tokens_while_a_long_prompt_is_read() {
    let chunk = 16;
    let s = start_setup(Setup { prefill_chunk: Some(chunk), ..Setup::new(4, 16) });
    let (started_tx, started_rx) = mpsc::channel();
    let long: Vec<u32> = (1000..2600).collect();
    let (running, (submitted, first_of_long)) = std::thread::scope(|scope| {
        let running = scope.spawn(|| {
            let r = ureq::post(&format!("{}/v1/completions", s.base))
                .send_json(endless(json!("Once"), 600))
                .unwrap();
            let mut times = Vec::new();
            for line in BufReader::new(r.into_reader()).lines().map(Result::unwrap) {
                if line.starts_with("data: ") {
                    times.push(Instant::now());
                    if times.len() == 5 {
                        started_tx.send(()).unwrap();
                    }
                }
            }
            times
        });
        started_rx.recv().unwrap();
        let submitted = Instant::now();
        let long = timed_stream(&s, &endless(json!(long), 1));
        (running.join().unwrap(), (submitted, long[0]))
    });
    // The long prompt takes 100 steps of 16 tokens; a whole-prompt prefill would let the running
    // stream produce nothing meanwhile.
    let during = running.iter().filter(|&&t| t > submitted && t < first_of_long).count();
    let steps = long.len() / chunk;
    assert!(during >= steps / 2, "{during} tokens of the running stream during {steps} prefill steps");
}

#[test]
fn a_budget_smaller_than_the_load_queues_and_completes_every_request() {
    // Each request holds prompt + max_tokens = 4 + 60 positions, one block of the two; eight are
    // sent (admission also keeps growth room per running sequence, so they run one by one).
    let budget = kv_block_bytes() * 2;
    let mut setup = Setup::new(8, 16);
    setup.engine.kv_budget = Some(budget);
    let s = start_setup(setup);
    let body = json!({"prompt": "Hello there, how", "max_tokens": 60, "temperature": 0, "logit_bias": {"50256": -100}});
    let (results, peak) = concurrent_watching_kv(&s, &body, 8);
    let texts: Vec<&str> = results.iter().map(|r| r["choices"][0]["text"].as_str().unwrap()).collect();
    assert!(texts.iter().all(|t| t == &texts[0]), "{texts:?}");
    assert!(results.iter().all(|r| r["usage"]["completion_tokens"] == 60));
    assert!(peak > 0 && peak <= budget as i64, "KV bytes peaked at {peak} of a budget of {budget}");
    assert_eq!(metric(&s, "xgen_kv_budget_bytes"), budget as i64);
    // Finished requests' blocks stay as prefix entries, counted in the bytes held.
    assert_eq!(metric(&s, "xgen_kv_blocks"), 2);
    let held = metric(&s, "xgen_kv_blocks_used") * (budget as i64 / 2);
    assert!(held > 0 && held == metric(&s, "xgen_kv_cache_bytes"), "{held} bytes in blocks");
    // A request that could never fit is refused at once, with the numbers.
    let (code, err, _) =
        post(&s, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 200})).unwrap_err();
    assert_eq!(code, 400);
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains(&budget.to_string()) && message.contains("KV cache"), "{message}");
    assert_eq!(err["error"]["param"], "max_tokens");
}

#[test]
fn a_repeated_prefix_is_served_from_the_cache_with_identical_output() {
    let s = start(None, 8, 64, 1 << 20);
    let (prompt, new) = expected_greedy();
    let want = Tokenizer::xgen().decode(&new).unwrap();
    let body = json!({"prompt": prompt, "max_tokens": new.len(), "temperature": 0});
    let first = post(&s, "/v1/completions", &body).unwrap();
    assert_eq!(metric(&s, "xgen_prefix_cache_hit_tokens_total"), 0);
    let second = post(&s, "/v1/completions", &body).unwrap();
    // All but the last prompt token come from the first request's cache.
    assert_eq!(metric(&s, "xgen_prefix_cache_hit_tokens_total"), prompt.len() as i64 - 1);
    for r in [&first, &second] {
        assert_eq!(r["choices"][0]["text"], want.as_str(), "the reference's greedy text");
    }
    // A longer prompt that starts with the first: the whole first request is reused (its prompt
    // and the generated tokens in its cache).
    let mut longer: Vec<u64> = prompt.clone();
    longer.extend(new.iter().map(|&t| t as u64));
    longer.extend([13, 13]);
    let before = metric(&s, "xgen_prefix_cache_hit_tokens_total");
    let fresh = start_setup(Setup {
        engine: EngineOptions {
            max_batch: 8,
            max_queue: 64,
            kv_budget: None,
            prefix_cache: PrefixCache::Off,
        },
        ..Setup::new(8, 64)
    });
    let body = json!({"prompt": longer, "max_tokens": 8, "temperature": 0});
    let cached = post(&s, "/v1/completions", &body).unwrap();
    let uncached = post(&fresh, "/v1/completions", &body).unwrap();
    assert!(
        metric(&s, "xgen_prefix_cache_hit_tokens_total") - before >= (prompt.len() + new.len() - 1) as i64
    );
    assert_eq!(metric(&fresh, "xgen_prefix_cache_hit_tokens_total"), 0);
    assert_eq!(cached["choices"][0]["text"], uncached["choices"][0]["text"]);
}

#[test]
fn caches_grow_as_tokens_are_written_and_a_dry_pool_preempts_and_recomputes() {
    // Three sequences of 4 + 600 positions (10 blocks each) start with one block and take one
    // more every 64 tokens; 20 blocks hold all three at first but not grown, so some are
    // preempted and recomputed. Their output must not change.
    let budget = kv_block_bytes() * 20;
    let mut setup = Setup::new(8, 16);
    setup.engine.kv_budget = Some(budget);
    let s = start_setup(setup);
    let unbounded = start(None, 8, 16, 1 << 20);
    let body =
        json!({"prompt": "Once upon", "max_tokens": 600, "temperature": 0, "logit_bias": {"50256": -100}});
    let want = post(&unbounded, "/v1/completions", &body).unwrap()["choices"][0]["text"].clone();
    let (results, peak) = concurrent_watching_kv(&s, &body, 3);
    for r in &results {
        assert_eq!(r["choices"][0]["text"], want);
        assert_eq!(r["usage"]["completion_tokens"], 600);
    }
    assert!(metric(&s, "xgen_preemptions_total") > 0, "the pool ran dry");
    assert!(peak <= budget as i64, "KV bytes peaked at {peak} of a budget of {budget}");
}

#[test]
fn response_format_and_guided_fields_constrain_every_choice() {
    let s = start(None, 8, 16, 1 << 20);
    let schema = json!({"type": "object", "properties": {
        "city": {"enum": ["Paris", "Zürich", "a \"quoted\" one"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 50}
    }, "required": ["city", "n"], "additionalProperties": false});
    let check = |text: &str| {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(v["n"].as_u64().is_some_and(|n| n <= 50) && v["city"].is_string(), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    };
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": true}});
    let chat = json!({"messages": [{"role": "user", "content": "Where?"}], "max_tokens": 60,
                      "response_format": format, "n": 2, "temperature": 1, "seed": 4});
    let r = post(&s, "/v1/chat/completions", &chat).unwrap();
    for choice in r["choices"].as_array().unwrap() {
        check(choice["message"]["content"].as_str().unwrap());
        assert_eq!(choice["finish_reason"], "stop");
    }
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["n"] = json!(1);
    check(&streamed_text(&stream(&s, "/v1/chat/completions", &streamed), "text"));
    // The completions endpoint and vLLM's fields.
    let base = json!({"prompt": "Answer:", "max_tokens": 20, "temperature": 0});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        post(&s, "/v1/completions", &b).unwrap()["choices"][0].clone()
    };
    let c = with("guided_choice", json!(["left", "right"]));
    assert!(["left", "right"].contains(&c["text"].as_str().unwrap()), "{c}");
    assert_eq!(c["finish_reason"], "stop");
    let c = with("guided_regex", json!("[0-9]{2}:[0-9]{2}"));
    assert_eq!(c["text"].as_str().unwrap().len(), 5, "{c}");
    check(
        with(
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}),
        )["text"]
            .as_str()
            .unwrap(),
    );
    let c = with("response_format", json!({"type": "json_object"}));
    assert!(c["text"].as_str().unwrap().starts_with('{'), "{c}");
    // max_tokens running out mid-structure is `length`.
    let mut short = base.clone();
    short["max_tokens"] = json!(2);
    short["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}});
    assert_eq!(post(&s, "/v1/completions", &short).unwrap()["choices"][0]["finish_reason"], "length");
    // Bad formats are 400s naming the field.
    for (k, v) in [
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}}}),
        ),
        ("response_format", json!({"type": "xml"})),
        ("guided_regex", json!("((")),
        ("guided_grammar", json!("start: (")),
        ("guided_choice", json!([])),
    ] {
        let mut b = base.clone();
        b[k] = v;
        let (code, err, _) = post(&s, "/v1/completions", &b).unwrap_err();
        assert_eq!((code, err["error"]["param"].as_str()), (400, Some(k)), "{err}");
    }
}

#[test]
fn the_chat_page_is_served_at_the_root_unless_turned_off() {
    let s = start(Some("secret"), 2, 4, 1 << 20);
    let r = ureq::get(&format!("{}/", s.base)).call().unwrap();
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let page = r.into_string().unwrap();
    // Self-contained (no URL leaves the server), relative API URLs (works behind a prefix), the
    // XGen-Inst header as the default system prompt, and model text only ever set as text.
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("src=\""));
    assert!(page.contains("\"v1/chat/completions\"") && page.contains("\"v1/completions\""));
    assert!(!page.contains("fetch(\"/"), "absolute API URLs");
    assert!(page.contains("A chat between a curious human") && !page.contains("__XGEN_DEFAULT_HEADER__"));
    assert!(!page.contains("innerHTML") && !page.contains("insertAdjacentHTML"));
    // Every response names the replica that answered, errors included.
    assert_eq!(
        ureq::get(&format!("{}/health", s.base)).call().unwrap().header("x-xgen-replica"),
        Some("replica-7")
    );
    let refused = ureq::get(&format!("{}/v1/models", s.base)).call().unwrap_err().into_response().unwrap();
    assert_eq!(refused.header("x-xgen-replica"), Some("replica-7"));
    // The page needs no key; the API still does.
    assert_eq!(
        ureq::get(&format!("{}/v1/models", s.base)).call().unwrap_err().into_response().unwrap().status(),
        401
    );
    let off = start_setup(Setup { ui: Ui::Off, ..Setup::new(2, 4) });
    let err = ureq::get(&format!("{}/", off.base)).call().unwrap_err();
    assert_eq!(err.into_response().unwrap().status(), 404);
}

#[test]
fn prompt_lookup_speculates_inside_the_batch_with_the_same_output() {
    let s = start(None, 8, 64, 1 << 20);
    let (prompt, new) = expected_greedy();
    let want = Tokenizer::xgen().decode(&new).unwrap();
    let body = |lookup: bool, stream: bool| {
        let mut b = json!({"prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": stream});
        if lookup {
            b["prompt_lookup_num_tokens"] = 6.into();
        }
        b
    };
    // 8 concurrent requests, half of them speculating (their verify rows in the same steps as the
    // others' decode rows), half streamed: each is transformers' greedy text.
    let texts: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let b = body(i % 2 == 0, i % 4 < 2);
                let s = &s;
                scope.spawn(move || match b["stream"].as_bool() {
                    Some(true) => streamed_text(&stream(s, "/v1/completions", &b), "text"),
                    _ => {
                        post(s, "/v1/completions", &b).unwrap()["choices"][0]["text"].as_str().unwrap().into()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(texts.iter().all(|t| *t == want), "{texts:?}");
    let r = post(&s, "/v1/completions", &body(true, false)).unwrap();
    assert_eq!(r["choices"][0]["text"], want.as_str());
    let t = &r["timings"];
    assert_eq!((t["prompt_n"].as_u64(), t["predicted_n"].as_u64()), (Some(40), Some(32)), "{t}");
    assert!(t["draft_n_accepted"].as_u64().unwrap() <= t["draft_n"].as_u64().unwrap(), "{t}");
    assert!(metric(&s, "xgen_draft_accepted_tokens_total") > 0, "the greedy text repeats: drafts accepted");
    assert!(metric(&s, "xgen_draft_tokens_total") >= metric(&s, "xgen_draft_accepted_tokens_total"));
    let plain = post(&s, "/v1/completions", &body(false, false)).unwrap();
    assert!(plain["timings"]["draft_n"].is_null(), "no drafts reported without lookup");
    let err =
        post(&s, "/v1/completions", &json!({"prompt": "Hi", "prompt_lookup_num_tokens": 99})).unwrap_err();
    assert_eq!((err.0, &err.1["error"]["param"]), (400, &json!("prompt_lookup_num_tokens")), "{err:?}");
}
