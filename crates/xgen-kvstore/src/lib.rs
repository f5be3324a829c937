//! A prompt cache on disk: the KV blocks of prompts already read, stored by content so that any
//! later run (another process, after a restart, a different question about the same document)
//! restores the longest stored prefix of its prompt instead of computing it.
//!
//! - Keys ([`key`]): a block is named by the model's [`Fingerprint`] (weights, format, KV type,
//!   kernels) and every token up to its end, at the KV pool's block granularity
//!   ([`xgen_model::KV_BLOCK`] positions).
//! - Files ([`file`], [`dir`]): a versioned header with the fingerprint, the key and a BLAKE3
//!   checksum, then the block's bytes; written under a temporary name and renamed; a file that
//!   fails any check is ignored with a warning, removed, and its positions computed.
//! - Budget: the least recently used files go first when the store outgrows its byte budget.
//! - [`DiskCache`]: restore into a [`xgen_model::KvCache`], and save a cache's full blocks in the
//!   background (a writer thread reads them from the pool while the caller goes on).
//!
//! Exactness: a restored block holds the bits the run that stored it computed. Where the model is
//! [`xgen_model::Model::step_invariant`], those are the bits any cold run computes, and the
//! logits after a restore equal a cold run's exactly.

pub mod dir;
pub mod file;
pub mod key;
mod store;

pub use key::{Digest, Fingerprint, FingerprintBuilder};
pub use store::{DiskCache, Plan, Stats, Warn};
