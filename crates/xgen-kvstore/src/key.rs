//! What a stored block is named by: the model's fingerprint and every token up to the block's end.
//!
//! Keys are chained as vLLM's prefix caching hashes its blocks: block `k`'s key is
//! `blake3(key[k-1] ‖ tokens of block k)`, starting from the fingerprint, so a key stands for the
//! whole prefix `tokens[..(k + 1)·KV_BLOCK]` and two prompts share exactly the keys of the full
//! blocks they share.

use std::{fmt, path::Path};

use xgen_model::KV_BLOCK;

/// 32 bytes of BLAKE3.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lowercase hex, the name of a stored block's file.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex()[..16])
    }
}

/// The identity of the values a model computes: its weights and configuration, the format they are
/// held in, the KV storage, the kernels that compute them. Built from named parts, each
/// length-prefixed so that no two lists of parts hash alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(pub Digest);

/// Builds a [`Fingerprint`].
pub struct FingerprintBuilder(blake3::Hasher);

impl Default for FingerprintBuilder {
    fn default() -> Self {
        Self(blake3::Hasher::new_derive_key("xgen-kvstore 2026-12 model fingerprint"))
    }
}

impl FingerprintBuilder {
    /// Adds `value` under `name`.
    pub fn part(mut self, name: &str, value: &[u8]) -> Self {
        for bytes in [name.as_bytes(), value] {
            self.0.update(&(bytes.len() as u64).to_le_bytes());
            self.0.update(bytes);
        }
        self
    }

    /// Adds the contents of the file at `path` under `name` (memory-mapped, hashed on the thread
    /// pool: about a second for a 4 GB GGUF file on two cores).
    pub fn file(self, name: &str, path: &Path) -> std::io::Result<Self> {
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(path)?;
        Ok(self.part(name, h.finalize().as_bytes()))
    }

    pub fn finish(self) -> Fingerprint {
        Fingerprint(Digest(*self.0.finalize().as_bytes()))
    }
}

/// The keys of the full blocks of `tokens` under `fingerprint`, first block first.
pub fn block_keys(fingerprint: &Fingerprint, tokens: &[u32]) -> Vec<Digest> {
    let mut prev = fingerprint.0;
    tokens
        .chunks_exact(KV_BLOCK)
        .map(|block| {
            let mut h = blake3::Hasher::new();
            h.update(&prev.0);
            for t in block {
                h.update(&t.to_le_bytes());
            }
            prev = Digest(*h.finalize().as_bytes());
            prev
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(name: &[u8]) -> Fingerprint {
        FingerprintBuilder::default().part("model", name).finish()
    }

    #[test]
    fn keys_are_shared_exactly_by_the_full_blocks_two_prompts_share() {
        let a: Vec<u32> = (0..300).collect();
        let mut b = a.clone();
        b[150] = 7; // differs in block 2
        let (ka, kb) = (block_keys(&fp(b"m"), &a), block_keys(&fp(b"m"), &b));
        assert_eq!(ka.len(), 300 / KV_BLOCK);
        assert_eq!(ka[..2], kb[..2]);
        assert!(ka[2..].iter().zip(&kb[2..]).all(|(x, y)| x != y), "a key stands for its whole prefix");
        assert_ne!(block_keys(&fp(b"other"), &a)[0], ka[0], "the fingerprint is part of every key");
    }

    #[test]
    fn parts_are_length_prefixed() {
        let ab = FingerprintBuilder::default().part("x", b"ab").part("y", b"c").finish();
        let a_bc = FingerprintBuilder::default().part("x", b"a").part("y", b"bc").finish();
        assert_ne!(ab, a_bc);
    }
}
