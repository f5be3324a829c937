//! `--cache-dir` and `--cache-disk-budget`: the disk prompt cache (`xgen-kvstore`) of `generate`,
//! `chat` and `serve`, and byte sizes with suffixes.

use std::{io::Write, path::PathBuf, sync::Arc};

use clap::Args;
use xgen_generate::{prompt_cache, Source};
use xgen_kvstore::{DiskCache, Warn};
use xgen_model::Model;

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// A directory for the disk prompt cache: the KV blocks of prompts read are saved there, and a
    /// later prompt (in any process, after a restart) that starts with the same tokens restores
    /// them instead of reading them again. Keyed by the model's weights, format and KV type;
    /// bad files are ignored and removed. Off unless given.
    #[arg(long, value_name = "DIR", env = "XGEN_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// With --cache-dir: the most bytes its files may take (suffixes K, M, G, T: powers of 1024);
    /// least recently used blocks are removed beyond it. Default: unbounded.
    #[arg(long, value_name = "BYTES", requires = "cache_dir", value_parser = parse_bytes)]
    pub cache_disk_budget: Option<u64>,
}

impl CacheArgs {
    /// Opens the store for `model` (loaded from `source`, settings applied), when asked for.
    pub fn open(&self, source: &Source, model: &Model) -> anyhow::Result<Option<DiskCache>> {
        let Some(dir) = &self.cache_dir else { return Ok(None) };
        Ok(Some(prompt_cache::open(dir, self.cache_disk_budget, source, model, warn_on_stderr())?))
    }
}

/// Warnings printed as `xgen: warning: …` (dropped when stderr is closed: a cache's warning must
/// never stop the work).
pub fn warn_on_stderr() -> Warn {
    Arc::new(|w: &str| {
        let _ = writeln!(std::io::stderr(), "xgen: warning: {w}");
    })
}

/// A byte count: digits with an optional suffix K, M, G or T (powers of 1024), at least 1.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let what = || format!("{s:?}: a byte count (suffix K, M, G or T)");
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(what()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| what())?;
    match n.checked_mul(1 << shift) {
        Some(0) | None => Err(format!("{s:?}: must be positive and at most 2^64 bytes")),
        Some(bytes) => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_counts_take_suffixes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("2T"), Ok(2 << 40));
        for bad in ["", "0", "8P", "G", "-1", "1.5G", "99999999999999999999G", "20000000T"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
