//! Replays every committed fuzz input through its target's check: the seeds (`fuzz/seeds/T/`,
//! where long campaigns start) and each input that once failed (`fuzz/regressions/T/`), so that a
//! fixed crash stays fixed without libFuzzer or nightly.

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

fn replay(name: &str, check: xgen_fuzz::Check, kind: &str) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(kind).join(name);
    let files = inputs(&dir);
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "fuzz target {name} fails on {}", file.display());
    }
    files.len()
}

#[test]
fn every_target_has_seeds_and_passes_them() {
    for (name, check) in xgen_fuzz::TARGETS {
        let n = replay(name, check, "seeds");
        assert!(n > 0, "fuzz/seeds/{name} has no seed");
    }
}

#[test]
fn past_crashes_stay_fixed() {
    for (name, check) in xgen_fuzz::TARGETS {
        replay(name, check, "regressions");
    }
}

/// The checks can fail: a target's check is not a no-op (each would catch a broken round trip or
/// a 5xx). Here, a tokenizer check on text whose round trip holds, and the HTTP check against a
/// path that does not exist, which must be a 404 (a 4xx passes).
#[test]
fn checks_run_their_inputs() {
    xgen_fuzz::text::xgen_tokenizer("héllo <|endoftext|> wörld".as_bytes());
    let mut body = vec![2u8]; // /tokenize
    body.extend_from_slice(br#"{"content": "hello"}"#);
    xgen_fuzz::http::request(&body);
}

/// The checkpoint seeds are whole models of the shard config, so that fuzzing starts past the
/// format checks (a seed that no longer loads would leave the loading paths unfuzzed).
#[test]
fn checkpoint_seeds_load() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds");
    for (target, file) in [("safetensors", "model.safetensors"), ("pickle", "pytorch_model.bin")] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), xgen_fuzz::files::SHARD_CONFIG).unwrap();
        std::fs::copy(seeds.join(target).join("whole-checkpoint"), dir.path().join(file)).unwrap();
        let model = xgen_model::Model::load(
            dir.path(),
            xgen_model::DType::F32,
            &xgen_model::Device::Cpu,
            &mut |_| {},
        );
        assert!(model.is_ok(), "{target} seed: {}", model.err().unwrap());
    }
    let gguf = seeds.join("gguf/llama-f32-no-vocab");
    let model =
        xgen_model::Model::load_gguf(&gguf, xgen_model::DType::F32, &xgen_model::Device::Cpu, &mut |_| {});
    assert!(model.is_ok(), "gguf seed: {}", model.err().unwrap());
}
