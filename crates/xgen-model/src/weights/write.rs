//! Writing weights — one file, or shards of at most a given size plus an index — as safetensors
//! (`model.safetensors`) or PyTorch zip/pickle (`pytorch_model.bin`), streaming: only the tensors of
//! the safetensors shard being filled are held; `.bin` shards take each tensor as it comes.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};

use super::{check, names, stream_with_progress, torch_zip::TorchZipWriter, Checkpoint, LoadProgress};
use crate::{
    config::Config,
    error::{ModelError, Result},
};

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// The file format written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Safetensors,
    /// PyTorch zip/pickle, the layout of the official XGen checkpoints.
    Pickle,
}

impl OutputFormat {
    fn file_names(self, n: usize) -> Vec<String> {
        let (single, stem, ext) = match self {
            Self::Safetensors => ("model.safetensors", "model", "safetensors"),
            Self::Pickle => ("pytorch_model.bin", "pytorch_model", "bin"),
        };
        if n == 1 {
            vec![single.into()]
        } else {
            (1..=n).map(|i| format!("{stem}-{i:05}-of-{n:05}.{ext}")).collect()
        }
    }

    fn index_name(self) -> &'static str {
        match self {
            Self::Safetensors => "model.safetensors.index.json",
            Self::Pickle => "pytorch_model.bin.index.json",
        }
    }
}

/// The shard being written.
enum OpenShard {
    None,
    Safetensors(Vec<(String, Tensor)>),
    Pickle(Box<TorchZipWriter>),
}

/// Writes tensors in a fixed order into shards planned up front from their sizes.
pub struct ShardedWriter {
    dir: PathBuf,
    format: OutputFormat,
    /// Output file of each tensor, by name.
    file_of: HashMap<String, String>,
    files: Vec<String>,
    current: OpenShard,
    current_file: usize,
    total_size: u64,
}

impl ShardedWriter {
    /// Plans shards for `tensors` (name, bytes), in the order they will be pushed: a new shard
    /// starts when the next tensor would take the current one past `max_shard_bytes`.
    pub fn new(
        dir: &Path,
        format: OutputFormat,
        tensors: &[(String, u64)],
        max_shard_bytes: u64,
    ) -> Result<Self> {
        let mut shard_of = Vec::with_capacity(tensors.len());
        let (mut shard, mut bytes) = (0usize, 0u64);
        for (_, size) in tensors {
            if bytes > 0 && bytes + size > max_shard_bytes {
                shard += 1;
                bytes = 0;
            }
            bytes += size;
            shard_of.push(shard);
        }
        let files = format.file_names(shard + 1);
        let file_of =
            tensors.iter().zip(&shard_of).map(|((name, _), &s)| (name.clone(), files[s].clone())).collect();
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let total_size = tensors.iter().map(|(_, s)| s).sum();
        Ok(Self {
            dir: dir.into(),
            format,
            file_of,
            files,
            current: OpenShard::None,
            current_file: 0,
            total_size,
        })
    }

    /// Adds the next tensor; writes the previous shard out when this one belongs to the next.
    pub fn push(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let file = self
            .file_of
            .get(name)
            .ok_or_else(|| ModelError::format(&self.dir, format!("unplanned tensor `{name}`")))?;
        let index = self.files.iter().position(|f| f == file).unwrap_or(0);
        if index != self.current_file {
            self.flush()?;
            self.current_file = index;
        }
        if matches!(self.current, OpenShard::None) {
            self.current = match self.format {
                OutputFormat::Safetensors => OpenShard::Safetensors(Vec::new()),
                OutputFormat::Pickle => {
                    OpenShard::Pickle(Box::new(TorchZipWriter::create(&self.dir.join(&self.files[index]))?))
                }
            };
        }
        match &mut self.current {
            OpenShard::Safetensors(tensors) => tensors.push((name.to_string(), tensor)),
            OpenShard::Pickle(writer) => writer.add(name, &tensor)?,
            OpenShard::None => unreachable!("opened above"),
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let path = self.dir.join(&self.files[self.current_file]);
        match std::mem::replace(&mut self.current, OpenShard::None) {
            OpenShard::None => Ok(()),
            OpenShard::Pickle(writer) => writer.finish(),
            OpenShard::Safetensors(tensors) => {
                let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
                safetensors::serialize_to_file(
                    tensors.iter().map(|(n, t)| (n.as_str(), t)),
                    Some(metadata),
                    &path,
                )
                .map_err(|e| ModelError::format(&path, e))
            }
        }
    }

    /// Writes the last shard and, when sharded, the index. Returns the files written.
    pub fn finish(mut self) -> Result<Vec<String>> {
        self.flush()?;
        if self.files.len() > 1 {
            let weight_map: BTreeMap<&String, &String> = self.file_of.iter().collect();
            let index =
                serde_json::json!({"metadata": {"total_size": self.total_size}, "weight_map": weight_map});
            let path = self.dir.join(self.format.index_name());
            let text = serde_json::to_string_pretty(&index).map_err(|e| ModelError::format(&path, e))?;
            std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))?;
        }
        Ok(self.files)
    }
}

/// `torch_dtype` spelling of a compute dtype.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Copies `src`'s model directory to `out` in `format` and `dtype`, streaming tensor by tensor.
/// Small files (configs, tokenizer code, README) are copied; `config.json` gets the new
/// `torch_dtype`. Returns the weight files written.
pub fn convert(
    src: &Path,
    out: &Path,
    format: OutputFormat,
    dtype: DType,
    max_shard_bytes: u64,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<Vec<String>> {
    let config = Config::load(&src.join("config.json"))?;
    let checkpoint = Checkpoint::find(src)?;
    if out.exists() && Checkpoint::find(out).is_ok() {
        return Err(ModelError::format(out, "already holds model weights; choose an empty directory"));
    }
    let entries = check(&checkpoint, &config)?;
    let sizes: Vec<(String, u64)> = entries
        .iter()
        .map(|e| (e.name.clone(), (e.shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64))
        .collect();
    let mut writer = ShardedWriter::new(out, format, &sizes, max_shard_bytes)?;
    stream_with_progress(&checkpoint, &entries, dtype, &Device::Cpu, progress, &mut |entry, tensor| {
        writer.push(&entry.name, tensor)
    })?;
    let files = writer.finish()?;
    copy_small_files(src, out, dtype)?;
    Ok(files)
}

/// Copies the small files of `src` (configs, tokenizer code, README) into `out`, with
/// `config.json`'s `torch_dtype` set to `dtype`.
fn copy_small_files(src: &Path, out: &Path, dtype: DType) -> Result<()> {
    let read = std::fs::read_dir(src).map_err(|e| ModelError::io(src, e))?;
    for entry in read {
        let path = entry.map_err(|e| ModelError::io(src, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let is_weights =
            name.ends_with(".bin") || name.ends_with(".safetensors") || name.ends_with(".index.json");
        if !path.is_file() || is_weights {
            continue;
        }
        let target = out.join(&name);
        if name == "config.json" {
            let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
            let mut value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|source| ModelError::Json { path: path.clone(), source })?;
            value["torch_dtype"] = torch_dtype_name(dtype).into();
            let text = serde_json::to_string_pretty(&value)
                .map_err(|source| ModelError::Json { path: path.clone(), source })?;
            std::fs::write(&target, text + "\n").map_err(|e| ModelError::io(&target, e))?;
        } else if std::fs::metadata(&path).map(|m| m.len() < 16 << 20).unwrap_or(false) {
            std::fs::copy(&path, &target).map_err(|e| ModelError::io(&target, e))?;
        }
    }
    Ok(())
}

/// Writes a random-weights model of `config` (see [`super::random`]) to `out`.
pub fn write_random(
    config: &Config,
    out: &Path,
    format: OutputFormat,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    let expected = names::expected_tensors(config);
    let sizes: Vec<(String, u64)> = expected
        .iter()
        .map(|(n, s)| (n.clone(), (s.iter().product::<usize>() * dtype.size_in_bytes()) as u64))
        .collect();
    let mut writer = ShardedWriter::new(out, format, &sizes, max_shard_bytes)?;
    for (name, shape) in &expected {
        writer.push(name, super::random::tensor(name, shape, dtype, &Device::Cpu)?)?;
    }
    let files = writer.finish()?;
    let path = out.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_json(dtype))
        .map_err(|source| ModelError::Json { path: path.clone(), source })?;
    std::fs::write(&path, text + "\n").map_err(|e| ModelError::io(&path, e))?;
    Ok(files)
}
