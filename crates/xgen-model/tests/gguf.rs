//! GGUF round trip: a checkpoint written by `quantize_checkpoint` reloads to exactly the model one
//! gets by applying the same conversions to the checkpoint's f32 tensors in memory (so the file
//! loses nothing beyond the quantization itself, and the q/k permutation is undone), and the
//! reloaded configuration equals the original.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use candle_core::quantized::{GgmlDType, QTensor};
use xgen_model::{
    gguf::{read::GgufFile, write},
    weights::{self, names, Checkpoint},
    Config, DType, Device, Model, Quant, Weight, WeightFormat,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin")
}

/// The fixture's configuration and f32 tensors.
fn fixture_tensors() -> (Config, weights::TensorMap) {
    let dir = fixture();
    let config = Config::load(&dir.join("config.json")).unwrap();
    let tensors =
        weights::load(&Checkpoint::find(&dir).unwrap(), &config, DType::F32, &Device::Cpu, &mut |_| {})
            .unwrap();
    (config, tensors)
}

/// The model the GGUF should hold: matrices in `quant` (f16 when they do not fit; the embedding
/// quantized then dequantized), norms f32.
fn expected_model(quant: Quant, ggml: GgmlDType) -> Model {
    let (config, tensors) = fixture_tensors();
    let mut out: HashMap<String, Weight> = HashMap::new();
    for (name, t) in tensors {
        let matrix = t.rank() == 2;
        let fits = matrix && quant.fits(t.dim(1).unwrap());
        let w = if names::is_linear(&name) && fits {
            quant.quantize(&t).unwrap()
        } else if fits {
            let q = Arc::new(QTensor::quantize(&t, ggml).unwrap());
            Weight::Float(q.dequantize(&Device::Cpu).unwrap())
        } else if matrix {
            Weight::Float(t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap())
        } else {
            Weight::Float(t)
        };
        out.insert(name, w);
    }
    Model::from_weights(config, out, DType::F32, &Device::Cpu).unwrap()
}

fn logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(1, ids.len()).unwrap();
    m.forward_last(&m.ids_tensor(ids).unwrap(), &mut cache).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn quantized_gguf_reloads_to_the_same_logits() {
    let ids: Vec<u32> = (0..40).map(|i| (i * 7919 % 50000) as u32).collect();
    for (quant, ggml, file_type) in [
        (Quant::Q8_0, GgmlDType::Q8_0, 7),
        (Quant::Q4_0, GgmlDType::Q4_0, 2),
        (Quant::Q4K, GgmlDType::Q4K, 14),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.gguf");
        let extra = vec![("tokenizer.ggml.eos_token_id".to_string(), xgen_model::gguf::Value::U32(50256))];
        write::quantize_checkpoint(&fixture(), &path, ggml, file_type, extra, &mut |_| {}).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.config().unwrap(), Config::load(&fixture().join("config.json")).unwrap());
        let loaded = Model::load_gguf(&path, DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
        let (got, want) = (logits(&loaded, &ids), logits(&expected_model(quant, ggml), &ids));
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff == 0.0, "{quant:?}: max |Δ logit| {diff}");
    }
}

/// The fixture's tensors as a `ggml` file holds them, dequantized to f32.
fn dequantized_model(quant: Quant, ggml: GgmlDType) -> Model {
    let (config, tensors) = fixture_tensors();
    let mut out: HashMap<String, Weight> = HashMap::new();
    for (name, t) in tensors {
        let matrix = t.rank() == 2;
        let w = if matrix && quant.fits(t.dim(1).unwrap()) {
            QTensor::quantize(&t, ggml).unwrap().dequantize(&Device::Cpu).unwrap()
        } else if matrix {
            t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap()
        } else {
            t
        };
        out.insert(name, Weight::Float(w));
    }
    Model::from_weights(config, out, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn a_gguf_loads_dequantized_or_requantized_into_another_format() {
    let ids: Vec<u32> = (0..40).map(|i| (i * 7919 % 50000) as u32).collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.gguf");
    write::quantize_checkpoint(&fixture(), &path, GgmlDType::Q8_0, 7, Vec::new(), &mut |_| {}).unwrap();
    // In f32: exactly the file's values.
    let f32_format = WeightFormat { dtype: DType::F32, linear: None };
    let dequantized = Model::load_gguf_as(&path, f32_format, &Device::Cpu, &mut |_| {}).unwrap();
    let want = logits(&dequantized_model(Quant::Q8_0, GgmlDType::Q8_0), &ids);
    assert_eq!(logits(&dequantized, &ids), want);
    // Requantized to q8_0, the file's own format: the same blocks, so the model as stored.
    let q8 = WeightFormat { dtype: DType::F32, linear: Some(Quant::Q8_0) };
    let requantized = Model::load_gguf_as(&path, q8, &Device::Cpu, &mut |_| {}).unwrap();
    let stored = Model::load_gguf(&path, DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    assert_eq!(logits(&requantized, &ids), logits(&stored, &ids));
}
