//! No prompt read is thrown away: however a request ends (its client leaves after the first
//! token or while its prompt is read, it is preempted, the server shuts down) the blocks it
//! filled serve the next prompt that shares them, with the output of a cold run.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{json, Value};
use xgen_server::PrefixCache;

mod common;

use common::*;

/// A 300-token document (ids) followed by a question.
fn asking(question: &[u64]) -> Vec<u64> {
    (0..300u64).map(|i| 1000 + (i * 37) % 5000).chain(question.iter().copied()).collect()
}

fn body(prompt: &[u64], stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "logit_bias": {"50256": -100}, "stream": stream})
}

/// When a client hangs up.
#[derive(Clone, Copy, PartialEq)]
enum Leave {
    /// Once its first token arrived.
    AfterFirstToken,
    /// Once the server has read a block of its prompt, before any token.
    WhileReading,
}

/// Sends a streamed completion over a raw connection and hangs up as `when` says.
fn leave(s: &Server, body: &Value, when: Leave) {
    let addr = s.base.trim_start_matches("http://");
    let mut c = TcpStream::connect(addr).unwrap();
    let b = body.to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        b.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(b.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    if when == Leave::WhileReading {
        while metric(s, "xgen_prompt_tokens_total") < 64 {
            std::thread::sleep(Duration::from_micros(200));
        }
        return;
    }
    while !String::from_utf8_lossy(&got).contains("data: {") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "the server closed first");
        got.extend_from_slice(&buf[..n]);
    }
} // dropped: the connection closes

/// The text a server without any prefix cache answers.
fn cold(prompt: &[u64]) -> Value {
    let mut setup = Setup::new(4, 16);
    setup.engine.prefix_cache = PrefixCache::Off;
    let s = start_setup(setup);
    post(&s, "/v1/completions", &body(prompt, false)).unwrap()["choices"][0]["text"].clone()
}

#[test]
fn a_client_that_leaves_after_its_first_token_leaves_its_prompt_for_the_next_question() {
    let s = start(None, 4, 16, 1 << 20);
    leave(&s, &body(&asking(&[464, 318]), true), Leave::AfterFirstToken);
    // At once, while the first request may still be running.
    let next = asking(&[40, 1101, 257]);
    let got = post(&s, "/v1/completions", &body(&next, false)).unwrap();
    assert!(metric(&s, "xgen_prefix_cache_hit_tokens_total") >= 256, "the document's full blocks");
    assert_eq!(got["choices"][0]["text"], cold(&next));
}

#[test]
fn a_client_that_leaves_while_its_prompt_is_read_leaves_what_was_read() {
    // 16 tokens per step: the 302-token prompt takes 19 engine steps.
    let s = start_setup(Setup { prefill_chunk: Some(16), ..Setup::new(4, 16) });
    leave(&s, &body(&asking(&[464, 318]), true), Leave::WhileReading);
    let next = asking(&[40, 1101, 257]);
    let got = post(&s, "/v1/completions", &body(&next, false)).unwrap();
    assert!(metric(&s, "xgen_prefix_cache_hit_tokens_total") >= 64, "the blocks read so far");
    assert_eq!(got["choices"][0]["text"], cold(&next));
}

#[test]
fn a_preempted_sequence_resumes_from_its_own_blocks() {
    // Three different prompts of 4 tokens + 600 positions (10 blocks) each in a pool of 24: one is
    // preempted at 8 blocks; its cache stays as an entry, the other two take 4 of its blocks to
    // finish, and its recomputation reuses the rest (only its own blocks share more than 4
    // tokens with it).
    let mut setup = Setup::new(8, 16);
    setup.engine.kv_budget = Some(kv_block_bytes() * 24);
    let s = start_setup(setup);
    let unbounded = start(None, 8, 16, 1 << 20);
    let bodies: Vec<Value> = [[464u64, 2068, 7586, 21831], [40, 1101, 257, 1332], [818, 262, 3726, 373]]
        .iter()
        .map(|p| json!({"prompt": p, "max_tokens": 600, "temperature": 0, "logit_bias": {"50256": -100}}))
        .collect();
    let results: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            bodies.iter().map(|b| scope.spawn(|| post(&s, "/v1/completions", b).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (b, r) in bodies.iter().zip(&results) {
        let want = post(&unbounded, "/v1/completions", b).unwrap();
        assert_eq!(r["choices"][0]["text"], want["choices"][0]["text"]);
    }
    assert!(metric(&s, "xgen_preemptions_total") > 0);
    assert!(metric(&s, "xgen_prefix_cache_hit_tokens_total") >= 64, "a resumed sequence reused its blocks");
}

#[test]
fn requests_ended_by_a_shutdown_are_saved_for_the_next_server() {
    let dir = tempfile::tempdir().unwrap();
    let opener = |dir: std::path::PathBuf| -> xgen_server::OpenDiskCache {
        Box::new(move |m: &xgen_model::Model| {
            let source = xgen_generate::Source::Dir(fixture());
            let warn: xgen_kvstore::Warn = std::sync::Arc::new(|w: &str| panic!("{w}"));
            xgen_generate::prompt_cache::open(&dir, None, &source, m, warn).map_err(|e| e.to_string())
        })
    };
    let mut s = start_setup(Setup { disk_cache: Some(opener(dir.path().into())), ..Setup::new(4, 16) });
    // A long generation still running when the server stops (its drain timeout is 300 ms).
    let long = json!({"prompt": asking(&[464]), "max_tokens": 5000, "temperature": 0, "logit_bias": {"50256": -100}, "stream": true});
    let base = s.base.clone();
    let client = std::thread::spawn(move || {
        // Ended by the shutdown: an error or a cut stream, either way not this test's concern.
        if let Ok(r) = ureq::post(&format!("{base}/v1/completions")).send_json(long) {
            let _ = r.into_string();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    s.stop.take().unwrap().send(()).unwrap();
    s.done
        .lock()
        .unwrap()
        .recv_timeout(Duration::from_secs(30))
        .expect("serve() returned, the saves flushed");
    client.join().unwrap();
    let s = start_setup(Setup { disk_cache: Some(opener(dir.path().into())), ..Setup::new(4, 16) });
    let next = asking(&[40, 1101, 257]);
    let got = post(&s, "/v1/completions", &body(&next, false)).unwrap();
    assert!(metric(&s, "xgen_disk_cache_restored_tokens_total") >= 256);
    assert_eq!(got["choices"][0]["text"], cold(&next));
}
