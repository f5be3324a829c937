//! Safetensors shards, memory-mapped: the header parsed by the `safetensors` crate, each tensor
//! copied out of the mapping and its pages released right after ([`MappedFile::release`]), so a
//! shard's mapped pages never pile up in the resident set.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{tensor::Metadata, SafeTensors};

use super::{mapped::MappedFile, Shard, TensorHeader};
use crate::error::{ModelError, Result};

pub(crate) struct SafetensorsShard {
    file: MappedFile,
    /// Where tensor data starts (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

pub(crate) fn open(file: &Path) -> Result<SafetensorsShard> {
    let file = MappedFile::open(file)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(file.all()).map_err(|e| ModelError::format(file.path(), e))?;
    Ok(SafetensorsShard { data_start: 8 + header_len, metadata, file })
}

impl Shard for SafetensorsShard {
    fn headers(&self) -> Vec<TensorHeader> {
        let mut headers: Vec<TensorHeader> = self
            .metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| TensorHeader {
                dtype: info.dtype.try_into().ok(),
                dtype_name: format!("{:?}", info.dtype),
                shape: info.shape.clone(),
                name,
            })
            .collect();
        headers.sort_by(|a, b| a.name.cmp(&b.name));
        headers
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let path = self.file.path();
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.into(), file: Some(path.into()) })?;
        let dtype: DType =
            info.dtype.try_into().map_err(|e| ModelError::format(path, format!("tensor `{name}`: {e}")))?;
        let (begin, end) = info.data_offsets;
        let range = self.data_start + begin..self.data_start + end;
        let bytes = self.file.bytes(range.clone(), &format!("tensor `{name}`"))?;
        let tensor = Tensor::from_raw_buffer(bytes, dtype, &info.shape, &Device::Cpu)
            .map_err(|e| ModelError::format(path, format!("tensor `{name}`: {e}")))?;
        self.file.release(range);
        Ok(tensor)
    }
}
