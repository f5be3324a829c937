//! PyTorch `.bin` shards (zip + pickle, as written by `torch.save`), through candle's pickle reader.

use std::path::{Path, PathBuf};

use candle_core::{pickle::PthTensors, Tensor};

use super::{Shard, TensorHeader};
use crate::error::{ModelError, Result};

pub(crate) struct PickleShard {
    file: PathBuf,
    pth: PthTensors,
}

pub(crate) fn open(file: &Path) -> Result<PickleShard> {
    if !file.is_file() {
        return Err(ModelError::io(file, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    super::pickle_check::check(file)?;
    let pth = PthTensors::new(file, None).map_err(|e| ModelError::format(file, e))?;
    Ok(PickleShard { file: file.into(), pth })
}

impl Shard for PickleShard {
    fn headers(&self) -> Vec<TensorHeader> {
        let mut headers: Vec<TensorHeader> = self
            .pth
            .tensor_infos()
            .values()
            .map(|info| TensorHeader {
                name: info.name.clone(),
                dtype: Some(info.dtype),
                dtype_name: format!("{:?}", info.dtype),
                shape: info.layout.shape().dims().to_vec(),
            })
            .collect();
        headers.sort_by(|a, b| a.name.cmp(&b.name));
        headers
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        match self.pth.get(name) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => {
                Err(ModelError::format(&self.file, format!("tensor `{name}` vanished while loading")))
            }
            Err(e) => Err(ModelError::format(&self.file, format!("tensor `{name}`: {e}"))),
        }
    }
}
