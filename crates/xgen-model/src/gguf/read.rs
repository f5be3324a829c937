//! Reading GGUF (files xgen writes and llama.cpp's XGen conversions), memory-mapped: the
//! configuration from the metadata, and each tensor checked against it, un-permuted (q/k) and
//! turned into a model [`Weight`]: q8_0/q4_0/q4_k matrices into the packed CPU layout (where the
//! CPU runs its kernels), q5_0/q4_1/q5_1/q2_k/q3_k/q5_k/q6_k converted to packed q8_0
//! ([`Repack`]), the rest into candle's quantized storage, quantized embeddings dequantized,
//! floats converted.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::{
    quantized::{ggml_file::qtensor_from_ggml, gguf_file::Content, GgmlDType},
    DType, Device,
};
use serde_json::json;

use super::{aligned, is_rope_permuted, permute_rope_rows, type_bytes, AlignedCopy, Value, HF_CONFIG_KEY};
use crate::{
    config::Config,
    error::{ModelError, Result},
    kernels::quant::repack::Repack,
    linear::Weight,
    model::WeightFormat,
    weights::{mapped::MappedFile, names, LoadProgress},
};

/// How a GGUF file's tensors become weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// Block types as stored (packed or on candle's kernels), float tensors in this dtype.
    AsStored(DType),
    /// Every tensor dequantized to f32, then held as a checkpoint's would be in this format
    /// (requantized, or floats): one file compared across formats (`xgen eval`).
    To(WeightFormat),
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: MappedFile,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let content = Content::read(&mut std::io::Cursor::new(file.all()))
            .map_err(|e| ModelError::format(path, format!("not a readable GGUF file: {e}")))?;
        let gguf = Self { path: path.into(), content, file };
        match gguf.content.metadata.get("general.architecture") {
            Some(Value::String(a)) if a == "llama" => Ok(gguf),
            other => {
                Err(gguf.meta_error("general.architecture", format!("expected \"llama\", found {other:?}")))
            }
        }
    }

    /// Whether any matrix is stored block-quantized.
    pub fn has_quantized_matrices(&self) -> bool {
        let float = |t: GgmlDType| matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        self.content.tensor_infos.values().any(|i| i.shape.rank() == 2 && !float(i.ggml_dtype))
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn meta_error(&self, key: &str, message: impl std::fmt::Display) -> ModelError {
        ModelError::format(&self.path, format!("metadata `{key}`: {message}"))
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        self.content.metadata.get(key).map(|v| v.to_u64().map_err(|e| self.meta_error(key, e))).transpose()
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        let v = self.content.metadata.get(key);
        v.map(|v| match v {
            Value::F32(x) => Ok(*x as f64),
            Value::F64(x) => Ok(*x),
            other => Err(self.meta_error(key, format!("expected a float, found {other:?}"))),
        })
        .transpose()
    }

    /// The model configuration: the stored HF config when xgen wrote the file, else from
    /// llama.cpp's `llama.*` keys and the tensor shapes.
    pub fn config(&self) -> Result<Config> {
        if let Some(v) = self.content.metadata.get(HF_CONFIG_KEY) {
            let text = v.to_string().map_err(|e| self.meta_error(HF_CONFIG_KEY, e))?;
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| self.meta_error(HF_CONFIG_KEY, e))?;
            return Config::from_json(&value);
        }
        let need = |key: &str| self.meta_u64(key)?.ok_or_else(|| self.meta_error(key, "missing"));
        let heads = need("llama.attention.head_count")?;
        let embed = self.content.tensor_infos.get("token_embd.weight").ok_or_else(|| {
            ModelError::MissingTensor { name: "token_embd.weight".into(), file: Some(self.path.clone()) }
        })?;
        let hidden = need("llama.embedding_length")?;
        let mut config = json!({
            "model_type": "llama",
            "vocab_size": embed.shape.dims()[0],
            "hidden_size": hidden,
            "intermediate_size": need("llama.feed_forward_length")?,
            "num_hidden_layers": need("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.meta_u64("llama.attention.head_count_kv")?.unwrap_or(heads),
            "max_position_embeddings": need("llama.context_length")?,
            "rms_norm_eps": self.meta_f64("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-6),
            "rope_theta": self.meta_f64("llama.rope.freq_base")?.unwrap_or(10000.0),
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "bos_token_id": self.meta_u64("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.meta_u64("tokenizer.ggml.eos_token_id")?,
        });
        if let Some(Value::String(kind)) = self.content.metadata.get("llama.rope.scaling.type") {
            if kind == "linear" {
                let factor = self.meta_f64("llama.rope.scaling.factor")?.unwrap_or(1.0);
                config["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
            }
        }
        Config::from_json(&config)
    }

    /// Every tensor of the model, checked against `config`, as model weights; float tensors in
    /// `dtype` on `device`.
    pub fn weights(
        &self,
        config: &Config,
        conversion: Conversion,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<HashMap<String, Weight>> {
        let expected = names::expected_tensors(config);
        for name in self.content.tensor_infos.keys() {
            let known = names::from_gguf(name).is_some_and(|hf| expected.iter().any(|(n, _)| *n == hf));
            if !known && !name.starts_with("rope_") {
                return Err(ModelError::UnexpectedTensor { name: name.clone(), file: self.path.clone() });
            }
        }
        let mut out = HashMap::with_capacity(expected.len());
        for (i, (hf, shape)) in expected.iter().enumerate() {
            let weight = self.tensor(hf, shape, config, conversion, device)?;
            out.insert(hf.clone(), weight);
            progress(LoadProgress { file: &self.path, tensors_done: i + 1, tensors_total: expected.len() });
        }
        Ok(out)
    }

    fn tensor(
        &self,
        hf: &str,
        shape: &[usize],
        config: &Config,
        conversion: Conversion,
        device: &Device,
    ) -> Result<Weight> {
        let name = names::to_gguf(hf).expect("every expected tensor has a GGUF name");
        let info = self
            .content
            .tensor_infos
            .get(&name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.clone(), file: Some(self.path.clone()) })?;
        if info.shape.dims() != shape {
            return Err(ModelError::TensorShape {
                name,
                file: self.path.clone(),
                expected: shape.to_vec(),
                got: info.shape.dims().to_vec(),
            });
        }
        let t = info.ggml_dtype;
        let elems: usize = shape.iter().product();
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let len = type_bytes(t, elems);
        let bytes = self.file.bytes(start..start + len, &format!("tensor `{name}`"))?;
        let unpermuted;
        let bytes = if is_rope_permuted(hf) {
            unpermuted = permute_rope_rows(bytes, len / shape[0], config.head_dim, false);
            &unpermuted[..]
        } else {
            bytes
        };
        let dtype = match conversion {
            Conversion::AsStored(dtype) => dtype,
            Conversion::To(format) => {
                let mut copy = AlignedCopy::new();
                let q = qtensor_from_ggml(t, aligned(bytes, &mut copy), shape.to_vec(), device)?;
                let float = q.dequantize(device)?.to_dtype(format.dtype)?;
                self.file.release(start..start + len);
                return format.convert(hf, float);
            }
        };
        let linear = names::is_linear(hf);
        let float = matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        // Block types with packed kernels, or convertible to one (`Repack`), where they run.
        let fast = (linear || hf == names::EMBED_TOKENS)
            && device.is_cpu()
            && crate::kernels::quant::has_fast_kernels();
        let packed = if fast { Repack::of(t).apply(t, shape[0], shape[1], bytes)? } else { None };
        let mut copy = AlignedCopy::new();
        let bytes = aligned(bytes, &mut copy);
        let weight = match packed {
            Some(p) => Weight::Packed(std::sync::Arc::new(p)),
            _ if linear && !float => {
                Weight::Quantized(std::sync::Arc::new(qtensor_from_ggml(t, bytes, shape.to_vec(), device)?))
            }
            _ => {
                let q = qtensor_from_ggml(t, bytes, shape.to_vec(), device)?;
                Weight::Float(q.dequantize(device)?.to_dtype(dtype)?)
            }
        };
        // Converted into memory of its own: the file's pages can go.
        self.file.release(start..start + len);
        Ok(weight)
    }
}
