//! Writing one PyTorch `.bin` file the way `torch.save(state_dict)` does: a zip archive (stored, not
//! compressed) with `{archive}/data.pkl` (a pickle of an `OrderedDict` name ->
//! `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`),
//! `{archive}/data/{i}` (raw little-endian storage bytes), `byteorder` and `version`.
//!
//! Tensors are streamed into the archive one at a time; only names and shapes are kept for the
//! pickle written at the end. Used to produce XGen-layout checkpoints (e.g. a 7B-shaped fp32
//! sharded `.bin` from random weights) for loading tests and memory measurements.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use candle_core::{DType, Tensor};
use zip::{write::SimpleFileOptions, CompressionMethod, ZipWriter};

use crate::error::{ModelError, Result};

pub struct TorchZipWriter {
    path: PathBuf,
    zip: ZipWriter<BufWriter<File>>,
    /// Folder inside the archive: the file name without `.bin`, as torch.save names it.
    prefix: String,
    tensors: Vec<(String, DType, Vec<usize>)>,
}

impl TorchZipWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| ModelError::io(path, e))?;
        let prefix = path.file_stem().and_then(|s| s.to_str()).unwrap_or("archive").to_string();
        Ok(Self { path: path.into(), zip: ZipWriter::new(BufWriter::new(file)), prefix, tensors: Vec::new() })
    }

    fn options() -> SimpleFileOptions {
        SimpleFileOptions::default().compression_method(CompressionMethod::Stored).large_file(true)
    }

    fn entry(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let name = format!("{}/{name}", self.prefix);
        self.zip.start_file(name, Self::options()).map_err(|e| ModelError::format(&self.path, e))?;
        self.zip.write_all(bytes).map_err(|e| ModelError::io(&self.path, e))
    }

    /// Appends `tensor` (F32, BF16 or F16) as the next storage.
    pub fn add(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        let key = self.tensors.len();
        let bytes: Vec<u8> = match tensor.dtype() {
            DType::F32 => {
                tensor.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            DType::BF16 => {
                tensor.flatten_all()?.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            DType::F16 => {
                tensor.flatten_all()?.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
            other => {
                return Err(ModelError::format(
                    &self.path,
                    format!("cannot store `{name}` of dtype {other:?}"),
                ))
            }
        };
        self.entry(&format!("data/{key}"), &bytes)?;
        self.tensors.push((name.to_string(), tensor.dtype(), tensor.dims().to_vec()));
        Ok(())
    }

    /// Writes the pickle and the zip directory.
    pub fn finish(mut self) -> Result<()> {
        let pickle = state_dict_pickle(&self.tensors);
        self.entry("data.pkl", &pickle)?;
        self.entry("byteorder", b"little")?;
        self.entry("version", b"3\n")?;
        let mut out = self.zip.finish().map_err(|e| ModelError::format(&self.path, e))?;
        out.flush().map_err(|e| ModelError::io(&self.path, e))
    }
}

/// Protocol-2 pickle of `OrderedDict([(name, _rebuild_tensor_v2(...)), ...])`.
fn state_dict_pickle(tensors: &[(String, DType, Vec<usize>)]) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]);
    p.ordered_dict();
    p.op(b'(');
    for (key, (name, dtype, shape)) in tensors.iter().enumerate() {
        p.unicode(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // Persistent id: ('storage', torch.<Kind>Storage, key, 'cpu', numel).
        p.op(b'(');
        p.unicode("storage");
        let storage = match dtype {
            DType::BF16 => "BFloat16Storage",
            DType::F16 => "HalfStorage",
            _ => "FloatStorage",
        };
        p.global("torch", storage);
        p.unicode(&key.to_string());
        p.unicode("cpu");
        p.int(shape.iter().product());
        p.op(b't');
        p.op(b'Q');
        p.int(0); // storage offset
        p.tuple(shape);
        let mut stride = vec![1usize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        p.tuple(&stride);
        p.op(0x89); // requires_grad = False
        p.ordered_dict(); // backward hooks
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u');
    p.op(b'.');
    p.0
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn unicode(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// BININT (signed 32-bit) or LONG1 for larger values.
    fn int(&mut self, n: usize) {
        if let Ok(n) = i32::try_from(n) {
            self.0.push(b'J');
            self.0.extend_from_slice(&n.to_le_bytes());
        } else {
            let bytes = (n as u64).to_le_bytes();
            self.0.extend_from_slice(&[0x8a, 9]);
            self.0.extend_from_slice(&bytes);
            self.0.push(0); // sign byte: keeps the value positive
        }
    }

    fn tuple(&mut self, items: &[usize]) {
        self.op(b'(');
        for &i in items {
            self.int(i);
        }
        self.op(b't');
    }

    /// `collections.OrderedDict()`.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
}
