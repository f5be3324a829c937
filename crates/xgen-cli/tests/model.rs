//! `xgen perplexity` and `xgen convert` end to end on the fixture models, against transformers'
//! mean NLL from `expected.json`.

mod common;

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model)
}

fn xgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xgen")).args(args).output().expect("run xgen")
}

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// (ids, mean NLL) of prompt `index` of a fixture's float32 run.
fn prompt(model: &str, index: usize) -> (Vec<u64>, f64) {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(model).join("expected.json")).unwrap())
            .unwrap();
    let p = &expected["float32"]["prompts"][index];
    let ids = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    (ids, p["mean_nll"].as_f64().unwrap())
}

fn write_ids(dir: &tempfile::TempDir, ids: &[u64]) -> String {
    let path = dir.path().join("ids.json");
    std::fs::write(&path, serde_json::to_string(ids).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn perplexity_json_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    for model in ["tiny-xgen-8k-bin", "tiny-xgen-8k-st"] {
        let (ids, want) = prompt(model, 4);
        let ids_file = write_ids(&tmp, &ids);
        let dir = fixture(model);
        let out = stdout_json(&xgen(&[
            "perplexity",
            "--model",
            dir.to_str().unwrap(),
            "--ids-file",
            &ids_file,
            "--dtype",
            "f32",
            "--json",
        ]));
        assert_eq!(out["tokens"], ids.len());
        let got = out["mean_nll"].as_f64().unwrap();
        assert!((got - want).abs() / want < 1e-4, "{model}: {got} vs {want}");
        assert!((out["perplexity"].as_f64().unwrap() / got.exp() - 1.0).abs() < 1e-9);
    }
}

#[test]
fn convert_to_sharded_safetensors_keeps_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("converted");
    let src = fixture("tiny-xgen-8k-bin");
    let out = xgen(&[
        "convert",
        "--model",
        src.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
        "--dtype",
        "f32",
        "--shard-size",
        "10MB",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["weight_map"].as_object().unwrap().len(), 2 + 2 * 9 + 1, "every tensor, no inv_freq");
    assert!(out_dir.join("model-00003-of-00003.safetensors").is_file());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");

    let (ids, want) = prompt("tiny-xgen-8k-bin", 3);
    let ids_file = write_ids(&tmp, &ids);
    let scored = stdout_json(&xgen(&[
        "perplexity",
        "--model",
        out_dir.to_str().unwrap(),
        "--ids-file",
        &ids_file,
        "--dtype",
        "f32",
        "--json",
    ]));
    let got = scored["mean_nll"].as_f64().unwrap();
    assert!((got - want).abs() / want < 1e-4, "{got} vs {want}");

    let again = xgen(&["convert", "--model", src.to_str().unwrap(), "--out", out_dir.to_str().unwrap()]);
    assert!(!again.status.success(), "refuses to write over existing weights");
}

#[test]
fn sliding_window_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (ids, _) = prompt("tiny-xgen-8k-bin", 4);
    let ids_file = write_ids(&tmp, &ids);
    let dir = fixture("tiny-xgen-8k-bin");
    let args = [
        "perplexity",
        "--model",
        dir.to_str().unwrap(),
        "--ids-file",
        &ids_file,
        "--dtype",
        "f32",
        "--window",
        "128",
        "--stride",
        "64",
    ];
    let out = stdout_json(&xgen(&[&args[..], &["--json"]].concat()));
    assert_eq!(
        (out["windows"].as_u64(), out["stride"].as_u64(), out["scored_tokens"].as_u64()),
        (Some(4), Some(64), Some(299))
    );
    let text = String::from_utf8(xgen(&args).stdout).unwrap();
    assert!(text.contains("sliding window: 4 windows of 128 tokens, stride 64"), "{text}");
}

#[test]
fn bad_perplexity_input_exits_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-xgen-8k-st");
    let model = dir.to_str().unwrap();
    for (content, expect) in [
        ("[1]", "at least 2 tokens"),
        ("[1, -2]", "ids[1]"),
        ("{\"x\": 1}", "expected a JSON array"),
        ("[1, 2", "invalid JSON"),
    ] {
        let path = tmp.path().join("bad.json");
        std::fs::write(&path, content).unwrap();
        let out = xgen(&["perplexity", "--model", model, "--ids-file", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{content}: {err}");
        assert!(err.contains(expect), "{content}: {err}");
    }
    let ids_file = write_ids(&tmp, &[1, 2, 3]);
    let out = xgen(&["perplexity", "--model", model, "--ids-file", &ids_file, "--stride", "9000"]);
    assert_eq!(out.status.code(), Some(2));
    let out = xgen(&["perplexity", "--model", "/nonexistent/model", "--ids-file", &ids_file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("/nonexistent/model") && err.matches("no such directory").count() == 1, "{err}");
    // A directory without config.json: the error names the file, once.
    let empty = tempfile::tempdir().unwrap();
    let out = xgen(&["perplexity", "--model", empty.path().to_str().unwrap(), "--ids-file", &ids_file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json") && err.matches("No such file").count() == 1, "{err}");
}

#[test]
fn kl_reference_reports_agreement_with_the_f32_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (ids, _) = prompt("tiny-xgen-8k-bin", 4);
    let ids_file = write_ids(&tmp, &ids);
    let dir = fixture("tiny-xgen-8k-bin");
    let args = ["perplexity", "--model", dir.to_str().unwrap(), "--ids-file", &ids_file, "--json"];
    let out = xgen(&[&args[..], &["--dtype", "q8_0", "--kl-reference", "f32"]].concat());
    let v = stdout_json(&out);
    let kl = &v["kl_reference"];
    assert_eq!((kl["dtype"].as_str(), kl["positions"].as_u64()), (Some("f32"), Some(299)));
    let (mean_kl, agree) = (kl["mean_kl"].as_f64().unwrap(), kl["top1_agreement"].as_f64().unwrap());
    assert!(mean_kl > 0.0 && mean_kl < 0.05 && agree > 0.9, "{kl}");
    // down_proj (176 wide) does not fit q8_0's 32-blocks: said on stderr.
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 of 15 linear layers stay f32"));
    let same = stdout_json(&xgen(&[&args[..], &["--dtype", "f32", "--kl-reference", "f32"]].concat()));
    assert_eq!(same["kl_reference"]["top1_agreement"].as_f64(), Some(1.0));
}

#[test]
fn quantize_writes_a_gguf_that_runs_with_the_tokenizer_inside() {
    let tmp = tempfile::tempdir().unwrap();
    let model = "tiny-xgen-8k-st";
    let gguf = tmp.path().join("tiny-q8_0.gguf");
    let gguf_arg = gguf.to_str().unwrap();
    let dir = fixture(model);
    let out = xgen(&["quantize", "--model", dir.to_str().unwrap(), "--out", gguf_arg, "--type", "q8_0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The tokenizer travels in the file: 51200 gpt2-style tokens with merges, eos 50256.
    let file = xgen_model::gguf::read::GgufFile::open(&gguf).unwrap();
    let meta = file.metadata();
    assert_eq!(meta["tokenizer.ggml.model"].to_string().unwrap(), "gpt2");
    assert_eq!(meta["tokenizer.ggml.tokens"].to_vec().unwrap().len(), 51200);
    assert_eq!(meta["tokenizer.ggml.tokens"].to_vec().unwrap()[50256].to_string().unwrap(), "<|endoftext|>");
    assert!(meta["tokenizer.ggml.merges"].to_vec().unwrap().len() > 50000);
    assert_eq!(meta["tokenizer.ggml.eos_token_id"].to_u32().unwrap(), 50256);
    // Read back, its vocabulary is XGen's, so XGen's exact tokenizer runs: the reference ids of
    // the tokenizer fixture's cases (special strings, whitespace runs and all).
    let cases = std::fs::read_to_string(fixture("../tokenizer/encode.jsonl")).unwrap();
    let cases: Vec<Value> = cases.lines().take(300).map(|l| serde_json::from_str(l).unwrap()).collect();
    let input: String =
        cases.iter().map(|c| serde_json::json!({"text": c["text"]}).to_string() + "\n").collect();
    let out = common::xgen_with(&["tokenize", "--jsonl", "--model", gguf_arg], input.as_bytes());
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), cases.len());
    for (case, got) in cases.iter().zip(&lines) {
        assert_eq!(got["ids"], case["ids"], "{}", case["text"]);
    }

    // The GGUF scores like transformers' f32 model up to q8_0's error (measured: 6.6e-4 relative
    // on this random-weight model, whose NLL is ~45).
    let (ids, want) = prompt(model, 4);
    let ids_file = write_ids(&tmp, &ids);
    let got = stdout_json(&xgen(&["perplexity", "--model", gguf_arg, "--ids-file", &ids_file, "--json"]));
    let nll = got["mean_nll"].as_f64().unwrap();
    assert!((nll - want).abs() / want < 2e-3, "GGUF q8_0 mean NLL {nll} vs transformers f32 {want}");

    // `xgen bench` names what it ran: the file's q8_0 (it said the default `bf16` before).
    let out = xgen(&["bench", "--model", gguf_arg, "-p", "4", "-n", "0", "-t", "1", "-r", "1", "--json"]);
    let bench = stdout_json(&out);
    assert!(bench["dtype"].as_str().unwrap().starts_with("q8_0"), "{bench}");

    // Refusals: an existing file, a name not ending in .gguf (exit 2, nothing written).
    for out_name in [gguf_arg.to_string(), tmp.path().join("x.bin").to_string_lossy().into_owned()] {
        let out = xgen(&["quantize", "--model", dir.to_str().unwrap(), "--out", &out_name, "--type", "q4_0"]);
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!tmp.path().join("x.bin").exists());
}
