//! A weight file mapped read-only, whose pages are handed back to the OS once a tensor has been
//! converted: the process's resident set then holds the converted weights and one source tensor,
//! not the converted weights plus every mapped page touched so far (a q8_0 GGUF of the 7B peaked
//! at 15.3 GB for 7.9 GB of weights before; the pages stay in the page cache).

use std::{
    ops::Range,
    path::{Path, PathBuf},
};

use crate::error::{ModelError, Result};

pub(crate) struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: mapped read-only; like every mmap-based loader we rely on the file not being
        // modified while it is open.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Ok(Self { path: path.into(), mmap })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn all(&self) -> &[u8] {
        &self.mmap
    }

    /// Bytes `range` of the file; `what` names them in the error when the file is too short.
    pub fn bytes(&self, range: Range<usize>, what: &str) -> Result<&[u8]> {
        self.mmap
            .get(range)
            .ok_or_else(|| ModelError::format(&self.path, format!("{what} ends past the end of the file")))
    }

    /// Drops the pages of `range` from this process's resident set (they are read from the file
    /// again if touched; a hint: failure changes nothing but memory).
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED discards nothing: a
        // later read of these pages refetches the file's bytes. No slice of them is used after
        // this call (callers release a tensor once converted).
        let _ = unsafe {
            self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        };
        #[cfg(not(unix))]
        let _ = range;
    }
}
