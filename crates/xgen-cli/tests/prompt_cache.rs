//! The disk prompt cache end to end: `xgen generate --file` run twice (the second restores the
//! document, same ids), a different question after the same document, a corrupted file
//! (warned, recomputed), `xgen chat --document`, and `xgen serve` restarted between two requests.

mod common;

use std::time::{Duration, Instant};

use common::{fixtures, post, serve, xgen_with};
use serde_json::{json, Value};

/// A document of about 600 tokens and a question after it.
fn document(question: &str) -> String {
    let words = ["the", "cache", "keeps", "every", "block", "of", "a", "long", "document", "read", "once"];
    let text: Vec<&str> = (0..600).map(|i| words[(i * 7 + i / 5) % words.len()]).collect();
    format!("{}\n\nQuestion: {question}", text.join(" "))
}

fn model() -> String {
    fixtures("models/tiny-xgen-8k-st").to_str().unwrap().to_string()
}

/// `xgen generate --file` on `text` with `extra` flags: the --json object and stderr.
fn generate(dir: &std::path::Path, text: &str, extra: &[&str]) -> (Value, String) {
    let file = dir.join(format!("prompt-{}.txt", text.len()));
    std::fs::write(&file, text).unwrap();
    let (model, file) = (model(), file.to_str().unwrap().to_string());
    let mut args = vec!["generate", "--model", &model, "--file", &file];
    args.extend(["--max-new-tokens", "8", "--greedy", "--json"]);
    args.extend(extra);
    let out = xgen_with(&args, b"");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn a_document_read_once_is_restored_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let flags = ["--cache-dir", cache.to_str().unwrap()];
    let (plain, _) = generate(tmp.path(), &document("who reads it?"), &[]);
    assert!(plain["timings"].get("cache_n").is_none(), "no disk cache, no disk timings");
    let (first, _) = generate(tmp.path(), &document("who reads it?"), &flags);
    let (second, stderr) = generate(tmp.path(), &document("who reads it?"), &flags);
    assert_eq!(first["ids"], plain["ids"]);
    assert_eq!(second["ids"], plain["ids"], "restored: the same greedy ids");
    let prompt_n = first["timings"]["prompt_n"].as_u64().unwrap();
    assert_eq!(first["timings"]["cache_n"], 0);
    assert_eq!(second["timings"]["cache_n"].as_u64().unwrap(), (prompt_n - 1) / 64 * 64);
    assert!(first["timings"]["disk_written_bytes"].as_u64().unwrap() > 0);
    assert_eq!(second["timings"]["disk_read_bytes"], first["timings"]["disk_written_bytes"]);
    assert_eq!(second["timings"]["disk_written_bytes"], 0, "nothing new to store");
    assert!(!stderr.contains("warning"), "{stderr}");

    // Another question after the same document: the document's blocks are restored.
    let (other, _) = generate(tmp.path(), &document("and what does it cost?"), &flags);
    let (other_plain, _) = generate(tmp.path(), &document("and what does it cost?"), &[]);
    assert_eq!(other["ids"], other_plain["ids"]);
    assert!(other["timings"]["cache_n"].as_u64().unwrap() >= 512);
}

#[test]
fn a_corrupted_cache_file_is_warned_about_and_recomputed() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let flags = ["--cache-dir", cache.to_str().unwrap()];
    let (first, _) = generate(tmp.path(), &document("q"), &flags);
    // Flip a byte in the middle of every stored block.
    for fan in std::fs::read_dir(cache.join("kv")).unwrap().flatten().filter(|f| f.file_name() != "tmp") {
        for f in std::fs::read_dir(fan.path()).unwrap().flatten() {
            let mut bytes = std::fs::read(f.path()).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
            std::fs::write(f.path(), bytes).unwrap();
        }
    }
    let (second, stderr) = generate(tmp.path(), &document("q"), &flags);
    assert_eq!(second["ids"], first["ids"]);
    assert_eq!(second["timings"]["cache_n"], 0);
    assert!(stderr.contains("xgen: warning: KV cache file") && stderr.contains("checksum"), "{stderr}");
    // It was removed and stored again whole: the third run restores.
    let (third, _) = generate(tmp.path(), &document("q"), &flags);
    assert!(third["timings"]["cache_n"].as_u64().unwrap() > 0);
    assert_eq!(third["ids"], first["ids"]);
}

#[test]
fn a_budget_needs_a_directory() {
    let out =
        xgen_with(&["generate", "--model", &model(), "--prompt", "hi", "--cache-disk-budget", "1G"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache-dir"));
    let out = xgen_with(
        &["generate", "--model", &model(), "--prompt", "hi", "--cache-dir", "x", "--cache-disk-budget", "1Q"],
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn chat_with_a_document_restores_it_in_the_next_session() {
    let tmp = tempfile::tempdir().unwrap();
    let doc = tmp.path().join("doc.txt");
    std::fs::write(&doc, document("")).unwrap();
    let cache = tmp.path().join("cache");
    let args = [
        "chat",
        "--model",
        &model(),
        "--document",
        doc.to_str().unwrap(),
        "--greedy",
        "--max-new-tokens",
        "6",
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    let first = xgen_with(&args, b"summarize it\n");
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stored: Vec<_> = walk(&cache);
    assert!(stored.len() >= 9, "the document's blocks are stored: {}", stored.len());
    let second = xgen_with(&args, b"summarize it\n");
    assert_eq!(second.stdout, first.stdout);
    assert_eq!(walk(&cache), stored, "all restored, nothing new written");
}

fn walk(cache: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(cache.join("kv"))
        .unwrap()
        .flatten()
        .filter(|f| f.file_name() != "tmp")
        .flat_map(|fan| std::fs::read_dir(fan.path()).unwrap().flatten())
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn metric(base: &str, name: &str) -> u64 {
    let text = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_restarted_server_restores_a_prompt_it_read_before() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let flags = ["--cache-dir", cache.to_str().unwrap()];
    let body = |q: &str| json!({"prompt": document(q), "max_tokens": 6, "temperature": 0});
    let plain = serve(&model(), &[]);
    let (_, want) = post(&plain, "/v1/completions", body("second"));
    drop(plain);
    let first = serve(&model(), &flags);
    let (status, _) = post(&first, "/v1/completions", body("first"));
    assert_eq!(status, 200);
    // SIGTERM: a graceful shutdown finishes writing the blocks before the process exits.
    let mut first = first;
    let kill = std::process::Command::new("kill").args(["-TERM", &first.0.id().to_string()]).status();
    assert!(kill.unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "never shut down");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!walk(&cache).is_empty());
    let second = serve(&model(), &flags);
    let (status, got) = post(&second, "/v1/completions", body("second"));
    assert_eq!(status, 200);
    assert_eq!(got["choices"][0]["text"], want["choices"][0]["text"]);
    assert!(metric(&second.1, "xgen_disk_cache_restored_tokens_total") >= 512);
    assert_eq!(metric(&second.1, "xgen_prefix_cache_hit_tokens_total"), 0, "not from memory");
    assert_eq!(metric(&second.1, "xgen_disk_cache_bad_files_total"), 0);
}
