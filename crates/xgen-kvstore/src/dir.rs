//! The directory: where each block's file lives, how one is written (under a temporary name, then
//! renamed, so that no reader in any process sees half a file), marked used when read, and
//! evicted, least recently used first, under a byte budget.
//!
//! Layout: `DIR/kv/ab/abcdef….kvb` (the key in hex, fanned out by its first byte) and
//! `DIR/kv/tmp/` for files being written; a writer killed mid-write leaves only a temporary file,
//! removed by the next process that opens the directory once it is [`STALE`].

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::key::Digest;

/// Age after which a temporary file is a dead writer's (writing one block takes well under a second).
pub const STALE: Duration = Duration::from_secs(600);

const EXT: &str = "kvb";

/// A stored block's file: where, how large, last used.
pub struct Stored {
    pub path: PathBuf,
    pub bytes: u64,
    pub used: SystemTime,
}

/// The store's directory.
#[derive(Debug)]
pub struct Dir {
    root: PathBuf,
    tmp: PathBuf,
}

impl Dir {
    /// Opens (creating) the store under `dir` and removes stale temporary files.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let root = dir.join("kv");
        let tmp = root.join("tmp");
        fs::create_dir_all(&tmp)?;
        let d = Self { root, tmp };
        d.remove_stale();
        Ok(d)
    }

    /// Where block `key` lives.
    pub fn path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.root.join(&hex[..2]).join(format!("{hex}.{EXT}"))
    }

    pub fn exists(&self, key: &Digest) -> bool {
        self.path(key).is_file()
    }

    /// Reads block `key`'s whole file into `buf` (one sequential read).
    pub fn read(&self, key: &Digest, buf: &mut Vec<u8>) -> io::Result<()> {
        use io::Read;
        let mut f = fs::File::open(self.path(key))?;
        buf.clear();
        f.read_to_end(buf)?;
        Ok(())
    }

    /// Marks block `key` used now (best effort: it only orders eviction).
    pub fn touch(&self, key: &Digest) {
        if let Ok(f) = fs::File::options().append(true).open(self.path(key)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Writes `parts` as block `key`'s file: to a temporary file, then renamed into place (a
    /// concurrent writer of the same key renames an identical file). The bytes written.
    pub fn write(&self, key: &Digest, parts: &[&[u8]]) -> io::Result<u64> {
        use io::Write;
        let path = self.path(key);
        let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let tmp = self.tmp.join(format!("{}.{}.{stamp}.tmp", key.hex(), std::process::id()));
        let result = (|| {
            let mut f = io::BufWriter::with_capacity(1 << 20, fs::File::create(&tmp)?);
            for p in parts {
                f.write_all(p)?;
            }
            f.into_inner().map_err(io::IntoInnerError::into_error)?;
            fs::create_dir_all(path.parent().expect("a fan-out directory"))?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| parts.iter().map(|p| p.len() as u64).sum())
    }

    /// Removes block `key`'s file (a bad one), if it is still there.
    pub fn remove(&self, key: &Digest) {
        let _ = fs::remove_file(self.path(key));
    }

    /// Every stored block's file.
    pub fn files(&self) -> Vec<Stored> {
        let Ok(fans) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut out = Vec::new();
        for fan in fans.flatten().filter(|e| e.path() != self.tmp) {
            for f in fs::read_dir(fan.path()).into_iter().flatten().flatten() {
                let path = f.path();
                let Ok(meta) = f.metadata() else { continue };
                if path.extension().is_some_and(|e| e == EXT) && meta.is_file() {
                    let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push(Stored { path, bytes: meta.len(), used });
                }
            }
        }
        out
    }

    /// Removes the least recently used files until the rest take at most `budget` bytes; the
    /// bytes left.
    pub fn evict(&self, budget: u64) -> u64 {
        self.remove_stale();
        let mut files = self.files();
        let mut total: u64 = files.iter().map(|f| f.bytes).sum();
        files.sort_by_key(|f| f.used);
        for f in files {
            if total <= budget {
                break;
            }
            if fs::remove_file(&f.path).is_ok() {
                total -= f.bytes;
            }
        }
        total
    }

    fn remove_stale(&self) {
        let now = SystemTime::now();
        for f in fs::read_dir(&self.tmp).into_iter().flatten().flatten() {
            let old = f
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > STALE);
            if old {
                let _ = fs::remove_file(f.path());
            }
        }
    }
}
