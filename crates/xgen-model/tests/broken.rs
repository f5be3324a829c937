//! Broken model directories built by the test: each load fails with an error naming the culprit
//! (file, tensor or config field), never a panic.

use std::{fs, path::Path};

use xgen_model::{DType, Device, Model, ModelError, Tensor};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

/// A writable copy of a fixture model directory.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> ModelError {
    match Model::load(dir, DType::F32, &Device::Cpu, &mut |_| {}) {
        Ok(_) => panic!("{} loaded despite the damage", dir.display()),
        Err(e) => e,
    }
}

fn assert_mentions(err: &ModelError, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "{msg:?} does not mention {p:?}");
    }
}

/// Rewrites the single-file safetensors fixture with `edit` applied to its tensors.
fn rewrite_safetensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
}

#[test]
fn truncated_pickle_shard() {
    let dir = copy("tiny-xgen-8k-bin");
    let shard = dir.path().join("pytorch_model-00001-of-00003.bin");
    let len = fs::metadata(&shard).unwrap().len();
    fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len / 2).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Format { .. }), "{err}");
    assert_mentions(&err, &["pytorch_model-00001-of-00003.bin"]);
}

#[test]
fn truncated_safetensors() {
    let dir = copy("tiny-xgen-8k-st");
    let file = dir.path().join("model.safetensors");
    let len = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 1000).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn corrupted_safetensors_header() {
    for (offset, bytes) in [(0usize, &[0xff; 8][..]), (8, &b"{{{{"[..])] {
        let dir = copy("tiny-xgen-8k-st");
        let file = dir.path().join("model.safetensors");
        let mut data = fs::read(&file).unwrap();
        data[offset..offset + bytes.len()].copy_from_slice(bytes);
        fs::write(&file, data).unwrap();
        let err = load_err(dir.path());
        assert!(matches!(err, ModelError::Format { .. }), "{err}");
        assert_mentions(&err, &["model.safetensors"]);
    }
}

#[test]
fn corrupted_pickle_data() {
    let dir = copy("tiny-xgen-8k-bin");
    let shard = dir.path().join("pytorch_model-00002-of-00003.bin");
    let mut data = fs::read(&shard).unwrap();
    // Damage the pickle stream near the start of the archive (after the zip local header).
    let at = data.windows(8).position(|w| w == b"data.pkl").unwrap() + 40;
    data[at..at + 32].fill(0x7f);
    fs::write(&shard, data).unwrap();
    assert_mentions(&load_err(dir.path()), &["pytorch_model-00002-of-00003.bin"]);
}

#[test]
fn wrong_shape() {
    let dir = copy("tiny-xgen-8k-st");
    rewrite_safetensors(dir.path(), |ts| {
        let (_, t) = ts.iter_mut().find(|(n, _)| n == "model.layers.1.mlp.up_proj.weight").unwrap();
        *t = t.narrow(0, 0, 100).unwrap();
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::TensorShape { .. }), "{err}");
    assert_mentions(
        &err,
        &["model.layers.1.mlp.up_proj.weight", "model.safetensors", "[100, 64]", "[176, 64]"],
    );
}

#[test]
fn missing_and_unexpected_tensors() {
    let dir = copy("tiny-xgen-8k-st");
    rewrite_safetensors(dir.path(), |ts| ts.retain(|(n, _)| n != "lm_head.weight"));
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");
    assert_mentions(&err, &["lm_head.weight"]);

    let dir = copy("tiny-xgen-8k-st");
    rewrite_safetensors(dir.path(), |ts| {
        ts.push((
            "model.layers.7.self_attn.q_proj.weight".into(),
            Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
        ))
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::UnexpectedTensor { .. }), "{err}");
    assert_mentions(&err, &["model.layers.7.self_attn.q_proj.weight", "model.safetensors"]);
}

#[test]
fn unsupported_dtype() {
    let dir = copy("tiny-xgen-8k-st");
    rewrite_safetensors(dir.path(), |ts| {
        let (_, t) = ts.iter_mut().find(|(n, _)| n == "model.norm.weight").unwrap();
        *t = t.to_dtype(DType::F64).unwrap();
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::TensorDtype { .. }), "{err}");
    assert_mentions(&err, &["model.norm.weight", "F64"]);
}

#[test]
fn index_problems() {
    let dir = copy("tiny-xgen-8k-bin");
    let index_path = dir.path().join("pytorch_model.bin.index.json");
    let index: serde_json::Value = serde_json::from_str(&fs::read_to_string(&index_path).unwrap()).unwrap();

    let mut missing_entry = index.clone();
    missing_entry["weight_map"].as_object_mut().unwrap().remove("model.layers.0.mlp.down_proj.weight");
    fs::write(&index_path, missing_entry.to_string()).unwrap();
    assert_mentions(&load_err(dir.path()), &["model.layers.0.mlp.down_proj.weight", "index"]);

    let mut missing_shard = index.clone();
    missing_shard["weight_map"]["lm_head.weight"] = "pytorch_model-00009-of-00003.bin".into();
    fs::write(&index_path, missing_shard.to_string()).unwrap();
    assert_mentions(&load_err(dir.path()), &["pytorch_model-00009-of-00003.bin"]);

    fs::write(&index_path, "{\"weight_map\": 3}").unwrap();
    assert_mentions(&load_err(dir.path()), &["pytorch_model.bin.index.json", "weight_map"]);
}

#[test]
fn bad_config_field() {
    let dir = copy("tiny-xgen-8k-bin");
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    config["num_attention_heads"] = 5.into();
    fs::write(&path, config.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::ConfigField { .. }), "{err}");
    assert_mentions(&err, &["num_attention_heads"]);

    // A config that disagrees with the weights: the shape check names the tensor and the file.
    config["num_attention_heads"] = 4.into();
    config["intermediate_size"] = 200.into();
    fs::write(&path, config.to_string()).unwrap();
    assert_mentions(&load_err(dir.path()), &["mlp.gate_proj.weight", "[200, 64]", ".bin"]);

    fs::write(&path, "{ not json").unwrap();
    assert_mentions(&load_err(dir.path()), &["config.json", "invalid JSON"]);
}

#[test]
fn no_weights() {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(fixture("tiny-xgen-8k-st").join("config.json"), dir.path().join("config.json")).unwrap();
    assert!(matches!(load_err(dir.path()), ModelError::NoWeights { .. }));
}
