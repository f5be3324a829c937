//! One stored block's file: a fixed header, then the block's bytes.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "XGENKVB\0"
//!      8     4  format version (u32 LE), [`VERSION`]
//!     12     4  positions in the block (u32 LE), KV_BLOCK
//!     16    32  model fingerprint
//!     48    32  the block's key (also the file's name)
//!     80     8  payload bytes (u64 LE)
//!     88    32  BLAKE3 of the payload
//!    120     8  zero
//!    128     …  payload: the block as `KvCache::read_block` gives it
//! ```
//!
//! A file is used only when every field matches what the reader expects and the payload's hash
//! is its checksum; anything else is a [`BadFile`].

use xgen_model::KV_BLOCK;

use crate::key::{Digest, Fingerprint};

const MAGIC: &[u8; 8] = b"XGENKVB\0";
/// The format written; files of other versions are ignored (and removed).
pub const VERSION: u32 = 1;
/// Header bytes before the payload.
pub const HEADER: usize = 128;

/// Why a stored file was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadFile {
    #[error("truncated: {got} bytes where {want} were expected")]
    Truncated { got: usize, want: usize },
    #[error("not an xgen KV block file (bad magic)")]
    Magic,
    #[error("format version {0}, this build reads version {VERSION}")]
    Version(u32),
    #[error("written for another model, weight format or KV type (fingerprint differs)")]
    OtherModel,
    #[error("holds another prefix than its name says")]
    OtherKey,
    #[error("a block of {0} bytes where this model's blocks have {1}")]
    Size(u64, usize),
    #[error("checksum mismatch: the payload is corrupted")]
    Checksum,
}

/// BLAKE3 of a payload, hashed on the thread pool (a 7B block is 32 MiB).
fn checksum(payload: &[u8]) -> [u8; 32] {
    *blake3::Hasher::new().update_rayon(payload).finalize().as_bytes()
}

/// The header of the block `key` of `fingerprint` with `payload`.
pub fn header(fingerprint: &Fingerprint, key: &Digest, payload: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(KV_BLOCK as u32).to_le_bytes());
    h[16..48].copy_from_slice(&fingerprint.0 .0);
    h[48..80].copy_from_slice(&key.0);
    h[80..88].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[88..120].copy_from_slice(&checksum(payload));
    h
}

/// The payload of a whole file's `bytes` when they are block `key` of `fingerprint` with
/// `block_bytes` bytes, intact.
pub fn check<'b>(
    bytes: &'b [u8],
    fingerprint: &Fingerprint,
    key: &Digest,
    block_bytes: usize,
) -> Result<&'b [u8], BadFile> {
    let want = HEADER + block_bytes;
    if bytes.len() < HEADER {
        return Err(BadFile::Truncated { got: bytes.len(), want });
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if &bytes[0..8] != MAGIC {
        return Err(BadFile::Magic);
    }
    if u32_at(8) != VERSION {
        return Err(BadFile::Version(u32_at(8)));
    }
    if bytes[16..48] != fingerprint.0 .0 || u32_at(12) as usize != KV_BLOCK {
        return Err(BadFile::OtherModel);
    }
    if bytes[48..80] != key.0 {
        return Err(BadFile::OtherKey);
    }
    let stated = u64::from_le_bytes(bytes[80..88].try_into().expect("8 bytes"));
    if stated != block_bytes as u64 {
        return Err(BadFile::Size(stated, block_bytes));
    }
    if bytes.len() != want {
        return Err(BadFile::Truncated { got: bytes.len(), want });
    }
    let payload = &bytes[HEADER..];
    if checksum(payload)[..] != bytes[88..120] {
        return Err(BadFile::Checksum);
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::FingerprintBuilder;

    fn file(payload: &[u8]) -> (Vec<u8>, Fingerprint, Digest) {
        let fp = FingerprintBuilder::default().part("m", b"1").finish();
        let key = Digest([7; 32]);
        let mut bytes = header(&fp, &key, payload).to_vec();
        bytes.extend_from_slice(payload);
        (bytes, fp, key)
    }

    #[test]
    fn an_intact_file_gives_its_payload_and_each_defect_is_named() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let (bytes, fp, key) = file(&payload);
        assert_eq!(check(&bytes, &fp, &key, 1000), Ok(&payload[..]));
        assert_eq!(
            check(&bytes[..bytes.len() - 1], &fp, &key, 1000),
            Err(BadFile::Truncated { got: 1127, want: 1128 })
        );
        assert!(matches!(check(&bytes[..10], &fp, &key, 1000), Err(BadFile::Truncated { .. })));
        let mut flipped = bytes.clone();
        flipped[HEADER + 500] ^= 1;
        assert_eq!(check(&flipped, &fp, &key, 1000), Err(BadFile::Checksum));
        let mut old = bytes.clone();
        old[8] = 0;
        assert_eq!(check(&old, &fp, &key, 1000), Err(BadFile::Version(0)));
        let other = FingerprintBuilder::default().part("m", b"2").finish();
        assert_eq!(check(&bytes, &other, &key, 1000), Err(BadFile::OtherModel));
        assert_eq!(check(&bytes, &fp, &Digest([8; 32]), 1000), Err(BadFile::OtherKey));
        assert_eq!(check(&bytes, &fp, &key, 999), Err(BadFile::Size(1000, 999)));
        let mut magic = bytes;
        magic[0] = b'Y';
        assert_eq!(check(&magic, &fp, &key, 1000), Err(BadFile::Magic));
    }
}
