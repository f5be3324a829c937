//! Loading keeps the resident set near the weights: each file's mapped pages are released once
//! their tensor is converted, so the peak is the converted weights plus the tensor in flight (its
//! mapped bytes and one conversion copy), not the weights plus the whole mapped file. One test in
//! this file, so the process's peak (`VmHWM`, reset through `/proc/self/clear_refs`) is its own.

use xgen_model::{
    gguf::write::quantize_checkpoint,
    weights::{random::preset, write::write_random, write::OutputFormat},
    DType, Device, Model, WeightFormat,
};

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Bytes the process's resident set grew by at its peak while `load` ran.
fn peak_growth(load: impl FnOnce() -> Model) -> (u64, Model) {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident set");
    let before = status_kb("VmRSS:");
    let model = load();
    ((status_kb("VmHWM:") - before) * 1024, model)
}

#[test]
fn peak_while_loading_is_the_weights_and_one_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("small");
    let config = preset("small").unwrap();
    write_random(&config, &dir, OutputFormat::Safetensors, DType::F32, u64::MAX).unwrap();
    let gguf = tmp.path().join("small-q8_0.gguf");
    quantize_checkpoint(&dir, &gguf, candle_core::quantized::GgmlDType::Q8_0, 7, vec![], &mut |_| {})
        .unwrap();
    // The largest tensor: the embedding, [51200, 512] f32 (105 MB; its q8_0 blocks are smaller).
    let largest = (config.vocab_size * config.hidden_size * 4) as u64;
    let slack = 16 << 20;

    let format = WeightFormat { dtype: DType::F32, linear: None };
    let (grew, model) = peak_growth(|| Model::load_as(&dir, format, &Device::Cpu, &mut |_| {}).unwrap());
    let weights = model.weight_bytes() as u64;
    drop(model);
    // Safetensors f32 as f32: each tensor is copied out of its mapped pages, then they go.
    assert!(grew <= weights + largest + slack, "safetensors: grew {grew} for {weights} of weights");

    let (grew, model) =
        peak_growth(|| Model::load_gguf(&gguf, DType::F32, &Device::Cpu, &mut |_| {}).unwrap());
    let weights = model.weight_bytes() as u64;
    // GGUF: the embedding's blocks mapped and copied while it is dequantized to f32 (kept).
    let blocks = largest / 4 * 34 / 32;
    assert!(grew <= weights + 2 * blocks + slack, "GGUF: grew {grew} for {weights} of weights");
}
