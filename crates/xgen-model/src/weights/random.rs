//! Deterministic random weights of a given shape, with no files: for benchmarks and memory checks
//! at the real XGen-7B size (`--random-weights xgen-7b`), and small presets for tests.
//!
//! Every value is a pure function of (tensor name, element index): the same on every machine and
//! thread count. Linear weights are uniform with std `1/sqrt(in_features)`, embeddings std 1,
//! norm weights uniform in [0.6, 1.4], so activations stay O(1) through the layers.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::{names, LoadProgress, TensorMap};
use crate::{
    config::Config,
    error::{ModelError, Result},
};

/// Elements generated from one seed; chunks are filled in parallel.
const CHUNK: usize = 1 << 16;

/// (name, hidden, intermediate, layers, heads, context)
const PRESETS: [(&str, usize, usize, usize, usize, usize); 4] = [
    ("xgen-7b", 4096, 11008, 32, 32, 8192),
    ("xgen-7b-8l", 4096, 11008, 8, 32, 8192),
    ("small", 512, 1376, 4, 8, 8192),
    ("tiny", 64, 176, 2, 4, 8192),
];

/// The configuration of a preset: XGen's vocabulary and special ids at the preset's sizes.
pub fn preset(name: &str) -> Result<Config> {
    let known = || PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ");
    let &(_, hidden, inter, layers, heads, ctx) = PRESETS
        .iter()
        .find(|p| p.0 == name)
        .ok_or_else(|| ModelError::UnknownPreset(name.into(), known()))?;
    Config::from_json(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 51200,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "max_position_embeddings": ctx, "rms_norm_eps": 1e-6,
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 0, "tie_word_embeddings": false,
    }))
}

/// All tensors of `config`, generated in f32 one at a time and converted to `dtype`.
pub fn tensors(
    config: &Config,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<TensorMap> {
    tensors_with(config, dtype, device, progress, &mut |_, t| Ok(t))
}

/// [`tensors`], passing each through `convert` (e.g. quantization) as soon as it is generated.
pub fn tensors_with<W>(
    config: &Config,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
    convert: &mut dyn FnMut(&str, Tensor) -> Result<W>,
) -> Result<HashMap<String, W>> {
    let expected = names::expected_tensors(config);
    let mut map = HashMap::with_capacity(expected.len());
    for (i, (name, shape)) in expected.iter().enumerate() {
        map.insert(name.clone(), convert(name, tensor(name, shape, dtype, device)?)?);
        progress(LoadProgress {
            file: std::path::Path::new("(random)"),
            tensors_done: i + 1,
            tensors_total: expected.len(),
        });
    }
    Ok(map)
}

/// One tensor named `name` of `shape`.
pub fn tensor(name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let (center, half_width) = match shape {
        [_] => (1.0f32, 0.4f32),
        _ if name == names::EMBED_TOKENS => (0.0, 3f32.sqrt()),
        [_, fan_in] => (0.0, (3.0 / *fan_in as f32).sqrt()),
        _ => (0.0, 1.0),
    };
    let seed = fnv1a(name.as_bytes());
    let mut data = vec![0f32; n];
    data.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let mut state = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for x in chunk {
            // Uniform in [-1, 1) from the top 24 bits.
            let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            *x = center + half_width * u;
        }
    });
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_scaled() {
        let a = tensor("model.layers.0.mlp.up_proj.weight", &[300, 400], DType::F32, &Device::Cpu).unwrap();
        let b = tensor("model.layers.0.mlp.up_proj.weight", &[300, 400], DType::F32, &Device::Cpu).unwrap();
        let c = tensor("model.layers.1.mlp.up_proj.weight", &[300, 400], DType::F32, &Device::Cpu).unwrap();
        let (a, b, c): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
            c.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        let var = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len() as f64;
        assert!((var * 400.0 - 1.0).abs() < 0.05, "std 1/sqrt(fan_in): var*fan_in = {}", var * 400.0);
        let norm = tensor("model.norm.weight", &[1000], DType::F32, &Device::Cpu).unwrap();
        let norm: Vec<f32> = norm.to_vec1().unwrap();
        assert!(norm.iter().all(|&x| (0.6..=1.4).contains(&x)));
    }

    #[test]
    fn presets() {
        let c = preset("xgen-7b").unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.vocab_size, c.head_dim), (4096, 32, 51200, 128));
        assert!(matches!(preset("xgen-70b"), Err(ModelError::UnknownPreset(..))));
    }
}
