//! `xgen eval` end to end on the fixture model: one row per format and KV type, each
//! candidate's perplexity the one `xgen perplexity` gives in that format, the reference format
//! agreeing with itself exactly, and bad input exiting 2 with the flag named.

use serde_json::Value;

mod common;

use common::*;

fn xgen(args: &[&str]) -> std::process::Output {
    xgen_with(args, b"")
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn eval_rows_equal_xgen_perplexity_per_format_and_the_reference_agrees_with_itself() {
    let model = fixtures("models/tiny-xgen-8k-bin");
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(12)).unwrap();
    let text = text.to_str().unwrap();
    let args =
        ["eval", "--model", model, "--file", text, "--dtype", "f32,q8_0,q4_0", "--kv-type", "auto,bf16"];
    let rows = json_lines(&xgen(&[&args[..], &["--window", "64", "--stride", "32", "--json"]].concat()));
    assert_eq!(rows.len(), 1 + 3 * 2, "the reference, then each format with each KV type");
    assert_eq!((rows[0]["dtype"].as_str(), &rows[0]["mean_kl"]), (Some("f32 (reference)"), &Value::Null));
    let kinds: Vec<(&str, &str)> =
        rows[1..].iter().map(|r| (r["dtype"].as_str().unwrap(), r["kv_type"].as_str().unwrap())).collect();
    assert_eq!(
        kinds,
        [
            ("f32", "f32"),
            ("f32", "bf16"),
            ("q8_0", "f16"),
            ("q8_0", "bf16"),
            ("q4_0", "f16"),
            ("q4_0", "bf16")
        ]
    );
    // The reference format against itself: the same distributions.
    assert_eq!((rows[1]["mean_kl"].as_f64(), rows[1]["top1_agreement"].as_f64()), (Some(0.0), Some(1.0)));
    assert_eq!(rows[1]["mean_nll"], rows[0]["mean_nll"]);
    for r in &rows[2..] {
        assert!(r["mean_kl"].as_f64().unwrap() > 0.0 && r["top1_agreement"].as_f64().unwrap() <= 1.0, "{r}");
    }
    assert!(rows[6]["mean_kl"].as_f64() > rows[3]["mean_kl"].as_f64(), "q4_0 strays further than q8_0");
    // Each candidate's perplexity is `xgen perplexity`'s in that format.
    for (row, dtype, kv) in [(&rows[3], "q8_0", "auto"), (&rows[6], "q4_0", "bf16")] {
        let out = xgen(&[
            "perplexity",
            "--model",
            model,
            "--file",
            text,
            "--dtype",
            dtype,
            "--kv-type",
            kv,
            "--window",
            "64",
            "--stride",
            "32",
            "--json",
        ]);
        let want = &json_lines(&out)[0];
        assert_eq!(row["mean_nll"], want["mean_nll"], "{dtype} {kv}");
        assert_eq!(row["scored_tokens"], want["scored_tokens"]);
    }
    // The table for people.
    let out = xgen(&["eval", "--model", model, "--file", text, "--dtype", "q8_0", "--max-tokens", "40"]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("39 tokens scored"), "{table}");
    assert!(table.contains("| f32 (reference) | f32 |") && table.contains("| q8_0 | f16 |"), "{table}");
}

#[test]
fn bad_eval_input_exits_2_naming_the_flag() {
    let model = fixtures("models/tiny-xgen-8k-bin");
    let model = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "Hello world, once more.").unwrap();
    let text = text.to_str().unwrap();
    for (extra, says) in [
        (&["--dtype", "stored"][..], "--dtype stored"),
        (&["--window", "1"][..], "--window"),
        (&["--stride", "9000"][..], "--stride"),
        (&["--max-tokens", "1"][..], "at least 2 tokens"),
    ] {
        let out = xgen(&[&["eval", "--model", model, "--file", text][..], extra].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
    }
    let out = xgen(&["eval", "--model", model, "--file", "/nonexistent.txt"]);
    assert_eq!(out.status.code(), Some(2));
}
