//! Checkpoint loading: find the files of a model directory, check every tensor's name, shape and
//! dtype against the config, and convert to the compute dtype one tensor at a time, shard by shard.
//!
//! Memory: only the converted tensors are kept; each source tensor (an f32 copy read from a pickle
//! shard, or an mmap-backed safetensors view) is dropped right after its conversion, so loading
//! the fp32 7B checkpoint as bf16 peaks near the bf16 size plus one tensor.

pub(crate) mod mapped;
pub mod names;
mod pickle;
mod pickle_check;

pub mod random;
mod safetensors;
mod torch_zip;
pub mod write;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use candle_core::{DType, Device, Tensor};

use crate::{
    config::Config,
    error::{ModelError, Result},
};

/// Weights by checkpoint name, in the compute dtype, on the compute device.
pub type TensorMap = HashMap<String, Tensor>;

/// The on-disk layout of a model directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `model.safetensors.index.json` + shards, or a single `model.safetensors`.
    Safetensors,
    /// `pytorch_model.bin.index.json` + shards, or a single `pytorch_model.bin` (zip/pickle).
    Pickle,
}

/// The weight files of a model directory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub format: Format,
    /// Shard files in order.
    pub shards: Vec<PathBuf>,
    /// The index's `weight_map` (tensor name -> file), for sharded checkpoints.
    pub index: Option<HashMap<String, PathBuf>>,
}

impl Checkpoint {
    /// Finds the weights in `dir`; safetensors are preferred over pickle when both exist.
    pub fn find(dir: &Path) -> Result<Self> {
        let candidates = [
            ("model.safetensors.index.json", Format::Safetensors, true),
            ("model.safetensors", Format::Safetensors, false),
            ("pytorch_model.bin.index.json", Format::Pickle, true),
            ("pytorch_model.bin", Format::Pickle, false),
        ];
        for (file, format, is_index) in candidates {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            if !is_index {
                return Ok(Self { format, shards: vec![path], index: None });
            }
            let (shards, index) = read_index(dir, &path)?;
            return Ok(Self { format, shards, index: Some(index) });
        }
        Err(ModelError::NoWeights { dir: dir.into() })
    }
}

fn read_index(dir: &Path, path: &Path) -> Result<(Vec<PathBuf>, HashMap<String, PathBuf>)> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.into(), source })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::format(path, "no `weight_map` object"))?;
    let mut index = HashMap::with_capacity(map.len());
    let mut shards: Vec<PathBuf> = Vec::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .filter(|f| !f.contains('/') && !f.contains('\\') && !f.is_empty())
            .ok_or_else(|| ModelError::format(path, format!("weight_map[`{name}`] is not a file name")))?;
        let file = dir.join(file);
        if !shards.contains(&file) {
            if !file.is_file() {
                return Err(ModelError::format(
                    path,
                    format!("lists shard {} which does not exist", file.display()),
                ));
            }
            shards.push(file.clone());
        }
        index.insert(name.clone(), file);
    }
    shards.sort();
    Ok((shards, index))
}

/// A tensor's header: what a shard says before any data is read.
pub(crate) struct TensorHeader {
    pub name: String,
    pub dtype: Option<DType>,
    pub dtype_name: String,
    pub shape: Vec<usize>,
}

/// One open shard file of either format.
pub(crate) trait Shard {
    fn headers(&self) -> Vec<TensorHeader>;
    /// The tensor's data, in its stored dtype, on the CPU.
    fn load(&self, name: &str) -> Result<Tensor>;
}

/// Loading progress, reported after each tensor.
#[derive(Clone, Debug)]
pub struct LoadProgress<'a> {
    pub file: &'a Path,
    pub tensors_done: usize,
    pub tensors_total: usize,
}

/// A checked tensor of a checkpoint: its name, the shard holding it, and its stored dtype.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shard: usize,
    pub shape: Vec<usize>,
    pub stored_dtype: DType,
}

/// Reads every shard's header and checks it against `config` before any tensor data is read:
/// names, shapes, dtypes, the index, duplicates, and that nothing is missing. Returns the entries
/// in shard order.
pub fn check(checkpoint: &Checkpoint, config: &Config) -> Result<Vec<Entry>> {
    let expected: HashMap<String, Vec<usize>> = names::expected_tensors(config).into_iter().collect();
    let mut entries = Vec::with_capacity(expected.len());
    let mut origin: HashMap<String, usize> = HashMap::new();
    for (shard, file) in checkpoint.shards.iter().enumerate() {
        for h in open(checkpoint.format, file)?.headers() {
            if names::is_ignored(&h.name) || names::is_optional(config, &h.name) {
                continue;
            }
            if let Some(index) = &checkpoint.index {
                if index.get(&h.name) != Some(file) {
                    return Err(ModelError::format(
                        file,
                        format!("tensor `{}` is not listed for this file in the index", h.name),
                    ));
                }
            }
            let shape = expected
                .get(&h.name)
                .ok_or_else(|| ModelError::UnexpectedTensor { name: h.name.clone(), file: file.clone() })?;
            if *shape != h.shape {
                return Err(ModelError::TensorShape {
                    name: h.name,
                    file: file.clone(),
                    expected: shape.clone(),
                    got: h.shape,
                });
            }
            let Some(stored_dtype @ (DType::F32 | DType::BF16 | DType::F16)) = h.dtype else {
                return Err(ModelError::TensorDtype {
                    name: h.name,
                    file: file.clone(),
                    dtype: h.dtype_name,
                });
            };
            if let Some(first) = origin.insert(h.name.clone(), shard) {
                let first = checkpoint.shards[first].clone();
                return Err(ModelError::DuplicateTensor { name: h.name, file: file.clone(), first });
            }
            entries.push(Entry { name: h.name, shard, shape: h.shape, stored_dtype });
        }
    }
    if let Some((name, _)) =
        names::expected_tensors(config).into_iter().find(|(n, _)| !origin.contains_key(n))
    {
        let file = checkpoint.index.as_ref().and_then(|i| i.get(&name).cloned());
        return Err(ModelError::MissingTensor { name, file });
    }
    Ok(entries)
}

fn open(format: Format, file: &Path) -> Result<Box<dyn Shard>> {
    Ok(match format {
        Format::Safetensors => Box::new(safetensors::open(file)?),
        Format::Pickle => Box::new(pickle::open(file)?),
    })
}

/// Streams the checked `entries` shard by shard: each tensor is read, converted to `dtype` on
/// `device` and handed to `sink` before the next is read; a shard is closed (its mapping dropped)
/// before the next opens.
pub fn stream(
    checkpoint: &Checkpoint,
    entries: &[Entry],
    dtype: DType,
    device: &Device,
    sink: &mut dyn FnMut(&Entry, Tensor) -> Result<()>,
) -> Result<()> {
    for (shard, file) in checkpoint.shards.iter().enumerate() {
        let mut in_shard = entries.iter().filter(|e| e.shard == shard).peekable();
        if in_shard.peek().is_none() {
            continue;
        }
        let reader = open(checkpoint.format, file)?;
        for entry in in_shard {
            // Convert, then move: the stored-dtype copy is dropped at the end of this statement.
            let tensor = reader.load(&entry.name)?.to_dtype(dtype)?.to_device(device)?;
            sink(entry, tensor)?;
        }
    }
    Ok(())
}

/// [`stream`], reporting each tensor to `progress` once `sink` has taken it.
pub fn stream_with_progress(
    checkpoint: &Checkpoint,
    entries: &[Entry],
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
    sink: &mut dyn FnMut(&Entry, Tensor) -> Result<()>,
) -> Result<()> {
    let mut done = 0;
    stream(checkpoint, entries, dtype, device, &mut |entry, tensor| {
        sink(entry, tensor)?;
        done += 1;
        let file = &checkpoint.shards[entry.shard];
        progress(LoadProgress { file, tensors_done: done, tensors_total: entries.len() });
        Ok(())
    })
}

/// Checks and loads every tensor of `checkpoint` for `config`, converted to `dtype` on `device`.
pub fn load(
    checkpoint: &Checkpoint,
    config: &Config,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<TensorMap> {
    load_with(checkpoint, config, dtype, device, progress, &mut |_, t| Ok(t))
}

/// [`load`], passing each tensor through `convert` (e.g. quantization) as soon as it is read, so
/// only converted tensors accumulate.
pub fn load_with<W>(
    checkpoint: &Checkpoint,
    config: &Config,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(LoadProgress),
    convert: &mut dyn FnMut(&str, Tensor) -> Result<W>,
) -> Result<HashMap<String, W>> {
    let entries = check(checkpoint, config)?;
    let mut loaded = HashMap::with_capacity(entries.len());
    stream_with_progress(checkpoint, &entries, dtype, device, progress, &mut |entry, tensor| {
        loaded.insert(entry.name.clone(), convert(&entry.name, tensor)?);
        Ok(())
    })?;
    Ok(loaded)
}
