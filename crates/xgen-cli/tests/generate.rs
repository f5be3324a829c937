//! `xgen generate` and `xgen chat` end to end on the fixture models.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use serde_json::Value;
use xgen_tokenizer::Tokenizer;

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model)
}

fn xgen(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xgen");
    // The child may exit before it reads (bad input): a closed pipe is not the test's failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn expected(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(model).join("expected.json")).unwrap()).unwrap()
}

fn csv(ids: &Value) -> String {
    ids.as_array().unwrap().iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn greedy_json_equals_transformers() {
    for model in ["tiny-xgen-8k-bin", "tiny-xgen-8k-st"] {
        let dir = fixture(model);
        for p in expected(model)["float32"]["prompts"].as_array().unwrap().iter().take(5) {
            let args = [
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &csv(&p["ids"]),
                "--max-new-tokens",
                "32",
                "--greedy",
                "--dtype",
                "f32",
                "--json",
            ];
            let out = xgen(&args, "");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let got: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
            assert_eq!(got["ids"], p["greedy"]["new_ids"], "{model} {}", p["name"]);
            assert_eq!(got["prompt_ids"], p["ids"]);
            let eos = p["greedy"]["stopped_on_eos"].as_bool().unwrap();
            assert_eq!(got["finish_reason"], if eos { "eos" } else { "length" });
            // llama.cpp's timings: counts equal the ids, speeds equal counts over times.
            let t = &got["timings"];
            assert_eq!(t["prompt_n"].as_u64(), p["ids"].as_array().map(|a| a.len() as u64), "{t}");
            assert_eq!(t["predicted_n"].as_u64(), got["ids"].as_array().map(|a| a.len() as u64), "{t}");
            let (n, ms, speed) = (
                t["predicted_n"].as_f64().unwrap(),
                t["predicted_ms"].as_f64().unwrap(),
                t["predicted_per_second"].as_f64().unwrap(),
            );
            assert!(
                t["prompt_ms"].as_f64().unwrap() > 0.0
                    && (speed - n / ms * 1e3).abs() <= 1e-6 * speed.max(1.0),
                "{t}"
            );
        }
    }
}

#[test]
fn prompt_lookup_gives_the_same_ids_and_reports_its_drafts() {
    // `--prompt-lookup` alone drafts up to 6 tokens; the greedy ids stay transformers'.
    let dir = fixture("tiny-xgen-8k-bin");
    let mut drafted = 0;
    for p in expected("tiny-xgen-8k-bin")["float32"]["prompts"].as_array().unwrap().iter().take(4) {
        let ids = csv(&p["ids"]);
        let args =
            ["generate", "--model", dir.to_str().unwrap(), "--prompt-ids", &ids, "--max-new-tokens", "32"];
        let out =
            xgen(&[&args[..], &["--greedy", "--dtype", "f32", "--json", "--prompt-lookup"]].concat(), "");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["ids"], p["greedy"]["new_ids"], "{}", p["name"]);
        let t = &got["timings"];
        assert!(t["draft_n_accepted"].as_u64().unwrap() <= t["draft_n"].as_u64().unwrap(), "{t}");
        drafted += t["draft_n"].as_u64().unwrap();
    }
    assert!(drafted > 0);
    let out =
        xgen(&["generate", "--model", dir.to_str().unwrap(), "--prompt", "Hi", "--prompt-lookup", "15"], "");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompt_lookup_num_tokens"));
}

#[test]
fn streamed_text_equals_json_text() {
    let dir = fixture("tiny-xgen-8k-bin");
    let base = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "The world is",
        "--max-new-tokens",
        "20",
        "--dtype",
        "f32",
    ];
    let json: Value = serde_json::from_slice(&xgen(&[&base[..], &["--json"]].concat(), "").stdout).unwrap();
    let streamed = xgen(&base, "");
    assert!(streamed.status.success());
    assert_eq!(String::from_utf8(streamed.stdout).unwrap(), format!("{}\n", json["text"].as_str().unwrap()));
    assert_eq!(json["prompt_ids"], serde_json::json!([464, 995, 318]));
}

#[test]
fn generation_config_defaults_apply() {
    // generation_config.json has no max_length: transformers' 20, prompt included.
    let dir = fixture("tiny-xgen-8k-bin");
    let out = xgen(
        &[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            "464,995,318",
            "--dtype",
            "f32",
            "--json",
        ],
        "",
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["ids"].as_array().unwrap().len(), 17);
    assert_eq!(got["finish_reason"], "length");
}

#[test]
fn bad_generate_input_exits_2() {
    let dir = fixture("tiny-xgen-8k-st");
    let model = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--prompt-ids", "1,2", "--max-new-tokens", "9000"], "beyond the model's context of 8192"),
        (&["--prompt-ids", "1,51200"], "51200 is not a token id"),
        (&["--prompt-ids", "1", "--temperature", "-1"], "temperature"),
        (&["--prompt-ids", "1,2,3", "--max-length", "2"], "max_length is 2"),
        (&["--prompt", ""], "empty"),
    ];
    for (extra, expect) in cases {
        let out = xgen(&[&["generate", "--model", model, "--dtype", "f32"][..], extra].concat(), "");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(expect), "{extra:?}: {err}");
    }
}

#[test]
fn offline_hub_id_lists_missing_files() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args(["generate", "--prompt", "The world is", "--max-length", "128"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    for f in [
        "config.json",
        "pytorch_model.bin.index.json",
        "pytorch_model-00003-of-00003.bin",
        "Salesforce/xgen-7b-8k-base",
    ] {
        assert!(err.contains(f), "{err}");
    }
}

#[test]
fn chat_answers_each_piped_line() {
    let dir = fixture("tiny-xgen-8k-st");
    let args =
        ["chat", "--model", dir.to_str().unwrap(), "--greedy", "--max-new-tokens", "8", "--dtype", "f32"];
    let out = xgen(&args, "Hello there\n\nWhat next?\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = text.lines().collect();
    assert_eq!(answers.len(), 2, "one answer per non-empty line: {text:?}");
    for a in answers {
        assert!(
            !a.is_empty() && !a.contains("Assistant:") && !a.contains("###") && !a.contains("<|endoftext|>"),
            "{a:?}"
        );
    }
    // Same seed-free greedy run: identical answers.
    assert_eq!(String::from_utf8(xgen(&args, "Hello there\n\nWhat next?\n").stdout).unwrap(), text);
}

#[test]
fn same_seed_same_sample_on_any_thread_count() {
    let dir = fixture("tiny-xgen-8k-bin");
    let run = |threads: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_xgen"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "The world is",
                "--max-new-tokens",
                "24",
            ])
            .args(["--temperature", "1.5", "--top-k", "0", "--seed", "42", "--dtype", "f32", "--json"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["ids"].clone(), v["seed"].clone())
    };
    let one = run("1");
    assert_eq!(one.1, 42);
    assert_eq!(run("2"), one);
    assert_eq!(run("3"), one);
}

/// README's main command, with the model in a Hugging Face cache (a mock holding the tiny fixture
/// under the official name), offline.
#[test]
fn readme_main_command_runs_from_the_hf_cache() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--Salesforce--xgen-7b-8k-base");
    let commit = "3987e094377fae577bba039af1b300ee8086f9e1";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-xgen-8k-bin")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args(["generate", "--prompt", "The world is", "--max-length", "128"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let ids = Tokenizer::xgen().encode(text.trim_end_matches('\n'));
    assert!(ids.len() >= 100, "about 125 new tokens: {} ({text:?})", ids.len());
}

#[test]
fn generate_reads_the_prompt_from_a_file_or_stdin() {
    let dir = fixture("tiny-xgen-8k-bin");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, "The world is").unwrap();
    let base =
        ["generate", "--model", dir.to_str().unwrap(), "--max-new-tokens", "12", "--dtype", "f32", "--json"];
    let run = |extra: &[&str], stdin: &str| -> Value {
        let out = xgen(&[&base[..], extra].concat(), stdin);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let inline = run(&["--prompt", "The world is"], "");
    assert_eq!(inline["prompt_ids"], serde_json::json!([464, 995, 318]));
    for got in [run(&["--file", file.to_str().unwrap()], ""), run(&["--file", "-"], "The world is")] {
        assert_eq!(got["prompt_ids"], inline["prompt_ids"]);
        assert_eq!(got["ids"], inline["ids"]);
    }
    // A missing file is bad input naming it.
    let missing = tmp.path().join("nope.txt");
    let out = xgen(&[&base[..], &["--file", missing.to_str().unwrap()]].concat(), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nope.txt"), "{err}");
}

#[test]
fn chat_places_a_document_in_the_first_turn() {
    use xgen_generate::chat::{clean_answer, ChatFormat, Conversation};
    let dir = fixture("tiny-xgen-8k-st");
    let tmp = tempfile::tempdir().unwrap();
    let doc = tmp.path().join("doc.txt");
    let text = "XGen reads long documents.\nThis one has two lines.";
    std::fs::write(&doc, text).unwrap();
    let model = dir.to_str().unwrap();
    let common = ["--model", model, "--greedy", "--max-new-tokens", "8", "--dtype", "f32"];
    let out =
        xgen(&[&["chat", "--document", doc.to_str().unwrap()][..], &common[..]].concat(), "Summarize it.\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = String::from_utf8(out.stdout).unwrap();
    // The same prompt through `generate`: document, blank line, message, in the XGen-Inst format.
    let prompt =
        Conversation::default().prompt(&ChatFormat::XgenInst, &format!("{text}\n\nSummarize it.")).unwrap();
    let gen =
        xgen(&[&["generate", "--prompt", &prompt, "--stop", "###", "--json"][..], &common[..]].concat(), "");
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    let gen: Value = serde_json::from_slice(&gen.stdout).unwrap();
    assert_eq!(answer.trim_end_matches('\n'), clean_answer(gen["text"].as_str().unwrap()));

    // A document beyond the context is bad input that says so; `-` (stdin holds the messages) too.
    std::fs::write(&doc, " hello".repeat(9000)).unwrap();
    for path in [doc.to_str().unwrap(), "-"] {
        let out = xgen(&[&["chat", "--document", path][..], &common[..]].concat(), "Summarize it.\n");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("document"), "{err}");
    }
}

#[test]
fn format_flags_constrain_the_output_and_bad_formats_are_usage_errors() {
    let dir = fixture("tiny-xgen-8k-bin");
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"n":{"type":"integer","minimum":0,"maximum":9},"w":{"enum":["a\"b","é"]}},"required":["n","w"],"additionalProperties":false}"#,
    )
    .unwrap();
    let base = [
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--dtype",
        "f32",
        "--prompt",
        "JSON:",
        "--max-new-tokens",
        "60",
    ];
    for seed in ["1", "2"] {
        let out =
            xgen(&[&base[..], &["--json-schema", schema.to_str().unwrap(), "--seed", seed]].concat(), "");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            v["n"].as_u64().is_some_and(|n| n <= 9) && ["a\"b", "é"].contains(&v["w"].as_str().unwrap()),
            "{v}"
        );
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    }
    let out = xgen(&[&base[..], &["--choice", "yes,no way", "--greedy"]].concat(), "");
    assert!(["yes", "no way"].contains(&String::from_utf8_lossy(&out.stdout).trim_end()), "{out:?}");
    let out = xgen(&[&base[..], &["--regex", "[0-9]{2}-[a-z]{2}"]].concat(), "");
    let text = String::from_utf8(out.stdout).unwrap();
    let text = text.trim_end();
    assert!(text.len() == 5 && text.as_bytes()[2] == b'-', "{text:?}");
    // The same flags in chat.
    let chat =
        ["chat", "--model", dir.to_str().unwrap(), "--dtype", "f32", "--max-new-tokens", "30", "--greedy"];
    let out = xgen(&[&chat[..], &["--choice", "sure,never"]].concat(), "hello\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        if out.stdout.starts_with(b"s") { "sure" } else { "never" }
    );
    for (flag, value, named) in
        [("--regex", "((", "regex"), ("--json-schema", "/nonexistent.json", "json-schema")]
    {
        let out = xgen(&[&base[..], &[flag, value]].concat(), "");
        assert_eq!(out.status.code(), Some(2), "{flag}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(named), "{out:?}");
    }
}
