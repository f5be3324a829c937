//! Writing GGUF: a streaming writer (header first with every tensor's place, then each tensor's
//! bytes as it is produced, in any order) and [`quantize_checkpoint`], which streams a checkpoint
//! shard by shard into a quantized GGUF.

use std::{
    collections::HashMap,
    fs::File,
    io::{Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use candle_core::{quantized::GgmlDType, DType, Device, Tensor};
use rayon::prelude::*;

use super::{is_rope_permuted, permute_rope_rows, type_bytes, type_id, Value, ALIGNMENT, HF_CONFIG_KEY};
use crate::{
    config::{Config, RopeScaling},
    error::{ModelError, Result},
    weights::{self, names, Checkpoint, LoadProgress},
};

/// A tensor the file will hold: GGUF name, shape in HF order (`[out, in]`), type.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

/// Writes a GGUF whose header (metadata and tensor table) is fixed up front; tensor data is
/// then written by name in any order.
pub struct GgufWriter {
    path: PathBuf,
    file: File,
    /// GGUF name -> (absolute offset, bytes, written yet).
    places: HashMap<String, (u64, usize, bool)>,
    end: u64,
}

impl GgufWriter {
    pub fn create(path: &Path, metadata: &[(String, Value)], tensors: &[TensorPlan]) -> Result<Self> {
        let io = |e| ModelError::io(path, e);
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            put_string(&mut header, key);
            put_value(&mut header, value, true);
        }
        let mut relative = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                header.extend_from_slice(&(d as u64).to_le_bytes());
            }
            header.extend_from_slice(&type_id(t.dtype).to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            let bytes = type_bytes(t.dtype, t.shape.iter().product());
            relative.push((offset, bytes));
            offset = align(offset + bytes as u64);
        }
        let data_start = align(header.len() as u64);
        header.resize(data_start as usize, 0);
        let mut file = File::create(path).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        let places = tensors
            .iter()
            .zip(relative)
            .map(|(t, (off, bytes))| (t.name.clone(), (data_start + off, bytes, false)))
            .collect();
        Ok(Self { path: path.into(), file, places, end: data_start + offset })
    }

    /// Writes the data of tensor `name` (its exact byte count).
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let place = self.places.get_mut(name).ok_or_else(|| {
            ModelError::format(&self.path, format!("tensor `{name}` is not in the planned header"))
        })?;
        if place.1 != bytes.len() || place.2 {
            return Err(ModelError::format(
                &self.path,
                format!(
                    "tensor `{name}`: {} bytes planned, {} given (or written twice)",
                    place.1,
                    bytes.len()
                ),
            ));
        }
        let io = |e| ModelError::io(&self.path, e);
        self.file.seek(SeekFrom::Start(place.0)).map_err(io)?;
        self.file.write_all(bytes).map_err(io)?;
        place.2 = true;
        Ok(())
    }

    /// Checks every tensor was written and sets the file's final length.
    pub fn finish(self) -> Result<()> {
        if let Some(name) = self.places.iter().find(|(_, p)| !p.2).map(|(n, _)| n) {
            return Err(ModelError::format(&self.path, format!("tensor `{name}` was never written")));
        }
        self.file.set_len(self.end).map_err(|e| ModelError::io(&self.path, e))?;
        self.file.sync_all().map_err(|e| ModelError::io(&self.path, e))
    }
}

fn align(x: u64) -> u64 {
    x.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type ids.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value, with_type: bool) {
    if with_type {
        out.extend_from_slice(&value_type(v).to_le_bytes());
    }
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            // An empty array is written as an array of u32.
            out.extend_from_slice(&items.first().map_or(4, value_type).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|item| put_value(out, item, false));
        }
    }
}

/// The `general.*` and `llama.*` metadata of `config` (llama.cpp's keys) plus the HF config.
pub fn model_metadata(config: &Config, name: &str, file_type: u32) -> Vec<(String, Value)> {
    let u32v = |x: usize| Value::U32(x as u32);
    let mut m = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("llama.context_length".into(), u32v(config.max_position_embeddings)),
        ("llama.embedding_length".into(), u32v(config.hidden_size)),
        ("llama.block_count".into(), u32v(config.num_hidden_layers)),
        ("llama.feed_forward_length".into(), u32v(config.intermediate_size)),
        ("llama.rope.dimension_count".into(), u32v(config.head_dim)),
        ("llama.attention.head_count".into(), u32v(config.num_attention_heads)),
        ("llama.attention.head_count_kv".into(), u32v(config.num_key_value_heads)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(config.rms_norm_eps as f32)),
        ("llama.rope.freq_base".into(), Value::F32(config.rope_theta as f32)),
        ("llama.vocab_size".into(), u32v(config.vocab_size)),
        (HF_CONFIG_KEY.into(), Value::String(config.to_json(DType::F32).to_string())),
    ];
    if let Some(RopeScaling::Linear { factor }) = config.rope_scaling {
        m.push(("llama.rope.scaling.type".into(), Value::String("linear".into())));
        m.push(("llama.rope.scaling.factor".into(), Value::F32(factor as f32)));
    }
    m
}

/// What [`quantize_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct QuantizeReport {
    pub tensors: usize,
    pub bytes: u64,
    /// Matrices left in f16 because their width is not a multiple of the block size.
    pub kept_f16: Vec<String>,
}

/// Streams the checkpoint in `dir` into the GGUF `out`: matrices in `quant` (f16 where their
/// width does not fit its blocks), norms in f32; `metadata` is written after the model's own
/// (the tokenizer, from the caller). One tensor is in memory at a time.
pub fn quantize_checkpoint(
    dir: &Path,
    out: &Path,
    quant: GgmlDType,
    file_type: u32,
    metadata: Vec<(String, Value)>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<QuantizeReport> {
    let config = Config::load(&dir.join("config.json"))?;
    let checkpoint = Checkpoint::find(dir)?;
    let entries = weights::check(&checkpoint, &config)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "xgen".into());
    let mut meta = model_metadata(&config, &name, file_type);
    meta.extend(metadata);
    let mut kept_f16 = Vec::new();
    // (checkpoint name, plan) in the file's order.
    let planned: Vec<(String, TensorPlan)> = names::expected_tensors(&config)
        .into_iter()
        .map(|(hf, shape)| {
            let dtype = match shape.as_slice() {
                [_, k] if k % quant.block_size() == 0 => quant,
                [_, _] => {
                    kept_f16.push(hf.clone());
                    GgmlDType::F16
                }
                _ => GgmlDType::F32,
            };
            let name = names::to_gguf(&hf).expect("every expected tensor has a GGUF name");
            (hf, TensorPlan { name, shape, dtype })
        })
        .collect();
    let plans: Vec<TensorPlan> = planned.iter().map(|(_, p)| p.clone()).collect();
    let by_hf: HashMap<String, TensorPlan> = planned.into_iter().collect();
    let mut writer = GgufWriter::create(out, &meta, &plans)?;
    weights::stream_with_progress(
        &checkpoint,
        &entries,
        DType::F32,
        &Device::Cpu,
        progress,
        &mut |entry, tensor| {
            let plan = &by_hf[&entry.name];
            let mut bytes = encode(&tensor, plan.dtype)?;
            if is_rope_permuted(&entry.name) {
                bytes = permute_rope_rows(&bytes, bytes.len() / plan.shape[0], config.head_dim, true);
            }
            writer.write_tensor(&plan.name, &bytes)
        },
    )?;
    writer.finish()?;
    let bytes = std::fs::metadata(out).map_err(|e| ModelError::io(out, e))?.len();
    Ok(QuantizeReport { tensors: plans.len(), bytes, kept_f16 })
}

/// `t` (f32) as GGUF bytes of `dtype`; quantized in parallel over row chunks.
pub fn encode(t: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    match dtype {
        GgmlDType::F32 => {
            Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
        GgmlDType::F16 => Ok(t
            .to_dtype(DType::F16)?
            .flatten_all()?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect()),
        q => {
            let rows = t.dim(0)?;
            let chunk = 64;
            let parts: Vec<Vec<u8>> = (0..rows)
                .step_by(chunk)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|start| -> Result<Vec<u8>> {
                    // A fresh tensor: candle's quantizer reads storage from its start.
                    let part = t.narrow(0, start, chunk.min(rows - start))?;
                    let part =
                        Tensor::from_vec(part.flatten_all()?.to_vec1::<f32>()?, part.dims(), t.device())?;
                    Ok(candle_core::quantized::QTensor::quantize(&part, q)?.data()?.into_owned())
                })
                .collect::<Result<_>>()?;
            Ok(parts.concat())
        }
    }
}
