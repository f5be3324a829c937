//! Writing checkpoints: every output format reloads to transformers' numbers.

use std::path::{Path, PathBuf};

use xgen_model::{
    perplexity::{self, Window},
    weights::{
        random,
        write::{self, OutputFormat},
        Checkpoint, Format,
    },
    DType, Device, Model,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

/// (ids, mean NLL) of the 150-token prompt of a fixture's float32 run.
fn prompt(model: &str) -> (Vec<u32>, f64) {
    let text = std::fs::read_to_string(fixture(model).join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &expected["float32"]["prompts"][3];
    let ids = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    (ids, p["mean_nll"].as_f64().unwrap())
}

fn mean_nll(dir: &Path, ids: &[u32]) -> f64 {
    let model = Model::load(dir, DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    perplexity::score(&model, ids, Window { size: 8192, stride: 4096 }).unwrap().mean_nll
}

#[test]
fn each_output_format_reloads_to_the_reference() {
    let (ids, want) = prompt("tiny-xgen-8k-st");
    for (format, shard_bytes, expect_format, expect_shards) in [
        (OutputFormat::Pickle, 10_000_000, Format::Pickle, 3),
        (OutputFormat::Pickle, write::DEFAULT_SHARD_BYTES, Format::Pickle, 1),
        (OutputFormat::Safetensors, 10_000_000, Format::Safetensors, 3),
        (OutputFormat::Safetensors, write::DEFAULT_SHARD_BYTES, Format::Safetensors, 1),
    ] {
        let out = tempfile::tempdir().unwrap();
        write::convert(&fixture("tiny-xgen-8k-st"), out.path(), format, DType::F32, shard_bytes, &mut |_| {})
            .unwrap();
        let found = Checkpoint::find(out.path()).unwrap();
        assert_eq!((found.format, found.shards.len()), (expect_format, expect_shards), "{format:?}");
        let got = mean_nll(out.path(), &ids);
        assert!((got - want).abs() / want < 1e-4, "{format:?}: {got} vs {want}");
    }
}

#[test]
fn bf16_output_is_the_bf16_weights() {
    // The fixture stores bf16: a bf16 copy holds the same values, so it scores identically.
    let (ids, want) = prompt("tiny-xgen-8k-st");
    let out = tempfile::tempdir().unwrap();
    write::convert(
        &fixture("tiny-xgen-8k-st"),
        out.path(),
        OutputFormat::Pickle,
        DType::BF16,
        u64::MAX,
        &mut |_| {},
    )
    .unwrap();
    let got = mean_nll(out.path(), &ids);
    assert!((got - want).abs() / want < 1e-4, "{got} vs {want}");
}

#[test]
fn random_weights_round_trip_through_files() {
    let config = random::preset("tiny").unwrap();
    let out = tempfile::tempdir().unwrap();
    write::write_random(&config, out.path(), OutputFormat::Safetensors, DType::F32, u64::MAX).unwrap();
    let from_files = Model::load(out.path(), DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    let stored = xgen_model::Config { torch_dtype: Some("float32".into()), ..config.clone() };
    assert_eq!(from_files.config(), &stored);
    let tensors = random::tensors(&config, DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    let in_memory = Model::from_tensors(config, tensors, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..50).map(|i| i * 997 % 51200).collect();
    let window = Window { size: 8192, stride: 4096 };
    let a = perplexity::score(&from_files, &ids, window).unwrap();
    let b = perplexity::score(&in_memory, &ids, window).unwrap();
    assert_eq!(a.logprobs, b.logprobs);
}
