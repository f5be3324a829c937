//! Safetensors shards, memory-mapped (candle's reader).

use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, Device, Tensor};

use super::{Shard, TensorHeader};
use crate::error::{ModelError, Result};

pub(crate) struct SafetensorsShard {
    file: PathBuf,
    st: MmapedSafetensors,
}

pub(crate) fn open(file: &Path) -> Result<SafetensorsShard> {
    // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not being
    // modified while the model loads (the mapping is dropped once this shard is converted).
    let st = unsafe { MmapedSafetensors::new(file) }.map_err(|e| ModelError::format(file, e))?;
    Ok(SafetensorsShard { file: file.into(), st })
}

impl Shard for SafetensorsShard {
    fn headers(&self) -> Vec<TensorHeader> {
        let mut headers: Vec<TensorHeader> = self
            .st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let dtype_name = format!("{:?}", view.dtype());
                TensorHeader {
                    dtype: view.dtype().try_into().ok(),
                    dtype_name,
                    shape: view.shape().to_vec(),
                    name,
                }
            })
            .collect();
        headers.sort_by(|a, b| a.name.cmp(&b.name));
        headers
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        self.st
            .load(name, &Device::Cpu)
            .map_err(|e| ModelError::format(&self.file, format!("tensor `{name}`: {e}")))
    }
}
