//! The disk prompt cache (`xgen-kvstore`) for a loaded model: its fingerprint, from where the
//! weights came from and everything that shapes the values its KV cache holds, and opening the
//! store for it. Shared by the command line, the server and Python.

use std::path::Path;

use xgen_kvstore::{DiskCache, Fingerprint, FingerprintBuilder, Warn};
use xgen_model::{weights::Checkpoint, KvCache, Model};

use crate::{
    error::{GenerateError, Result},
    generator::Generator,
    source::Source,
};

/// The identity of `model`'s KV values: the weights' bytes (the GGUF file, or config.json and the
/// checkpoint's files, hashed; a random preset by name and shape), the format they were converted
/// to, the KV storage, the kernels this CPU runs and this build's version. Hashing a 7B GGUF file
/// takes about a second on two cores.
pub fn fingerprint(source: &Source, model: &Model) -> Result<Fingerprint> {
    let mut b = FingerprintBuilder::default().part("xgen", env!("CARGO_PKG_VERSION").as_bytes());
    b = match source {
        Source::Gguf(path) => b.file("gguf", path).map_err(|e| io(path, e))?,
        Source::Dir(dir) => {
            let config = dir.join("config.json");
            let mut b = b.file("config.json", &config).map_err(|e| io(&config, e))?;
            let checkpoint = Checkpoint::find(dir)?;
            for shard in &checkpoint.shards {
                b = b.file("shard", shard).map_err(|e| io(shard, e))?;
            }
            b
        }
        Source::Random { preset, .. } => b.part("random preset", preset.as_bytes()),
    };
    let kernels = [model.prompt_kernel_name(), model.attention_kernel_name().to_string()].join(" ");
    Ok(b.part("config", format!("{:?}", model.config()).as_bytes())
        .part("weights", model.weight_format_name().as_bytes())
        .part("dtype", format!("{:?}", model.dtype()).as_bytes())
        .part("kv", format!("{:?}", model.kv_type()).as_bytes())
        .part("kernels", kernels.as_bytes())
        .finish())
}

fn io(path: &Path, source: std::io::Error) -> GenerateError {
    GenerateError::Io { path: path.to_path_buf(), source }
}

/// Opens the store in `dir` for `model` (loaded from `source`, its settings applied), within
/// `budget` bytes; warnings (bad files, a full disk) go to `warn`.
pub fn open(
    dir: &Path,
    budget: Option<u64>,
    source: &Source,
    model: &Model,
    warn: Warn,
) -> Result<DiskCache> {
    let fingerprint = fingerprint(source, model)?;
    DiskCache::open(dir, budget, fingerprint, model, warn).map_err(|e| io(dir, e))
}

impl Generator<'_> {
    /// Restores the stored prefix of `prompt` into `cache` (which holds its first `cache.len()`
    /// positions) when a disk cache is set; the positions restored.
    pub(crate) fn restore_prompt(&self, cache: &mut KvCache, prompt: &[u32]) -> usize {
        let Some(disk) = self.disk else { return 0 };
        let from = cache.len();
        disk.restore_prompt(cache, prompt) - from
    }

    /// Saves the full blocks of `cache` (holding `tokens`) that the disk cache lacks, if set.
    pub(crate) fn save_prompt(&self, cache: &KvCache, tokens: &[u32]) {
        if let Some(disk) = self.disk {
            disk.save(cache, tokens);
        }
    }
}
