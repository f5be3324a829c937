//! KV memory as one pool of fixed-size blocks under a budget, and the prefix cache.
//!
//! The pool ([`BlockPool`]) holds `budget / block bytes` blocks of [`KV_BLOCK`] positions, taken
//! from the OS as they are first written. A sequence takes the blocks of its prompt when admitted
//! and one more whenever its tokens fill the last ([`KvPool::ready`]); when none is free, prefix
//! entries are evicted and, failing that, the engine preempts. A sequence's cache is kept, with
//! the tokens it holds, as a prefix entry: its full blocks as they are filled ([`KvPool::publish`]:
//! a prompt sharing them is served while it still runs), and its whole cache when it ends however
//! it ends (finished, cancelled, preempted, failed: no prompt read is thrown away). A later prompt that starts with the same
//! tokens (the XGen-Inst header, a shared system prompt, earlier turns of a conversation, the same
//! document) forks it, sharing its blocks (a shared block is copied only when written), and
//! computes only the rest. Entries shrink from their ends, least recently used first, when blocks
//! run out.
//!
//! With a disk prompt cache (`--cache-dir`), every ended sequence's full blocks are also saved
//! there (in the background), so entries evicted here, and everything after a restart, can be
//! restored: a prompt takes the longest prefix in memory, then the stored blocks that continue it.
//!
//! Invariant: the blocks in use (running sequences' and entries', each counted once however
//! many hold it) never exceed the pool, so KV memory never exceeds the budget.

use std::sync::Arc;

use xgen_kvstore::DiskCache;
use xgen_model::{
    kv_cache::{blocks_for, BlockPool},
    KvCache, Model, ModelError, KV_BLOCK,
};

/// Whether finished sequences' caches are kept for later prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefixCache {
    On,
    Off,
}

/// Whether a new sequence starts from the cached prefix of its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// The longest prefix in memory, then the disk prompt cache's blocks that continue it.
    LongestPrefix,
    /// Nothing: every position is computed (a scored prompt needs each position's logits).
    Nothing,
}

/// A cache kept for later prompts and the tokens at its positions: an ended sequence's, or a
/// running one's full blocks so far (`owner`: its admission number), replaced as it fills more.
struct Entry {
    tokens: Vec<u32>,
    cache: KvCache,
    owner: Option<u64>,
}

/// The block pool, and the prefix entries holding some of its blocks.
pub struct KvPool {
    blocks: Arc<BlockPool>,
    /// Least recently used first.
    entries: Vec<Entry>,
    prefix: PrefixCache,
    disk: Option<Arc<DiskCache>>,
}

/// A cache for a new sequence: `reused` of its prompt's positions are already computed, the last
/// `restored` of them read from the disk prompt cache.
pub struct Reserved {
    pub cache: KvCache,
    pub reused: usize,
    pub restored: usize,
}

/// Why a sequence got no blocks.
#[derive(Debug)]
pub enum Refused {
    /// Not now: the running sequences hold the blocks. Try again when one ends.
    Busy,
    /// Never: it needs more than the whole pool.
    TooLarge {
        needed: usize,
        budget: usize,
    },
    Model(String),
}

impl KvPool {
    /// A pool of `budget` bytes (rounded down to whole blocks); `None`: room for `max_batch`
    /// sequences of the model's whole context, so that nothing admitted is ever preempted.
    pub fn new(
        model: &Model,
        budget: Option<usize>,
        max_batch: usize,
        prefix: PrefixCache,
        disk: Option<Arc<DiskCache>>,
    ) -> Result<Self, String> {
        let block_bytes = model.kv_block_bytes().map_err(|e| e.to_string())?;
        let blocks = match budget {
            Some(bytes) => bytes / block_bytes,
            None => max_batch * blocks_for(model.config().max_position_embeddings),
        };
        if blocks == 0 {
            return Err(format!(
                "a KV budget of {} bytes is less than one block of {KV_BLOCK} positions ({block_bytes} bytes); raise --kv-budget",
                budget.unwrap_or(0)
            ));
        }
        let blocks = model.new_pool(blocks).map_err(|e| e.to_string())?;
        Ok(Self { blocks, entries: Vec::new(), prefix, disk })
    }

    /// Cache bytes per position of one sequence.
    pub fn bytes_per_token(&self) -> usize {
        self.blocks.block_bytes() / KV_BLOCK
    }

    /// Bytes of the blocks in use: running sequences' and prefix entries'.
    pub fn held(&self) -> usize {
        self.blocks.used_blocks() * self.blocks.block_bytes()
    }

    /// Bytes of the whole pool.
    pub fn budget(&self) -> usize {
        self.blocks.blocks() * self.blocks.block_bytes()
    }

    /// Blocks in the pool, and in use.
    pub fn blocks(&self) -> (usize, usize) {
        (self.blocks.blocks(), self.blocks.used_blocks())
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    /// Whether `blocks` fit in the pool beside nothing else.
    pub fn has_room(&self, blocks: usize) -> bool {
        blocks <= self.blocks.blocks()
    }

    /// A cache of up to `limit` positions for `prompt`, its prompt's blocks taken, starting from
    /// the longest cached prefix of it (at most all but its last token, whose logits the caller
    /// needs) unless `reuse` says [`Reuse::Nothing`].
    pub fn reserve(&mut self, prompt: &[u32], limit: usize, reuse: Reuse) -> Result<Reserved, Refused> {
        if let Some(why) = self.refuse(limit) {
            return Err(why);
        }
        let prefix = match reuse {
            Reuse::LongestPrefix => self.longest_prefix(prompt),
            Reuse::Nothing => None,
        };
        let mut cache = match prefix {
            Some((i, len)) => {
                let entry = self.entries.remove(i);
                let cache = entry.cache.fork(len, limit).map_err(model_error)?;
                self.entries.push(entry); // now the most recently used
                cache
            }
            None => KvCache::in_pool(&self.blocks, limit),
        };
        let in_memory = cache.len();
        if reuse == Reuse::LongestPrefix {
            self.restore(&mut cache, prompt);
        }
        self.ready(&mut cache, prompt.len())?;
        let reused = cache.len();
        Ok(Reserved { cache, reused, restored: reused - in_memory })
    }

    /// Before a prompt already admitted is read further: when an entry now shares more of it
    /// than `cache` holds by at least a block (another sequence read the same document meanwhile),
    /// `cache` becomes a fork of that entry, its prompt's blocks readied (kept as it was when the
    /// pool cannot). The positions gained.
    pub fn catch_up(&mut self, cache: &mut KvCache, prompt: &[u32], limit: usize) -> usize {
        let from = cache.len();
        let Some((i, len)) = self.longest_prefix(prompt).filter(|&(_, len)| len >= from + KV_BLOCK) else {
            return 0;
        };
        let Ok(mut fork) = self.entries[i].cache.fork(len, limit) else { return 0 };
        let entry = self.entries.remove(i);
        self.entries.push(entry); // now the most recently used
        if self.ready(&mut fork, prompt.len()).is_err() {
            return 0;
        }
        *cache = fork; // the old cache's blocks go back to the pool
        cache.len() - from
    }

    /// Restores the stored blocks that continue `cache`'s positions of `prompt` from the disk
    /// prompt cache, when there is one and the pool can give their blocks.
    fn restore(&mut self, cache: &mut KvCache, prompt: &[u32]) {
        let Some(disk) = self.disk.clone() else { return };
        if let Some(plan) = disk.plan(prompt, cache.len()) {
            if self.ready(cache, plan.end()).is_ok() {
                disk.restore(cache, &plan);
            }
        }
    }

    /// Readies `cache`'s blocks up to `positions` (taken where missing, copied where shared),
    /// shrinking prefix entries, least recently used first, while the pool is dry;
    /// [`Refused::Busy`] when running sequences hold every block.
    pub fn ready(&mut self, cache: &mut KvCache, positions: usize) -> Result<(), Refused> {
        loop {
            match cache.ready(positions) {
                Ok(()) => return Ok(()),
                Err(ModelError::PoolDry { .. }) if !self.entries.is_empty() => self.shrink_oldest(),
                Err(ModelError::PoolDry { .. }) => return Err(Refused::Busy),
                Err(e) => return Err(model_error(e)),
            }
        }
    }

    /// Gives up the least recently used entry's last block (the whole entry once nothing is
    /// left): entries shrink from their ends as room is needed, so what remains of each is still
    /// a prefix that serves (a preempted sequence keeps most of its blocks when a few are needed).
    fn shrink_oldest(&mut self) {
        let e = &mut self.entries[0];
        let keep = e.cache.len().saturating_sub(1) / KV_BLOCK * KV_BLOCK;
        if keep == 0 {
            self.entries.remove(0);
            return;
        }
        e.cache.truncate(keep);
        e.cache.release_unused();
        e.tokens.truncate(keep);
    }

    /// Why a sequence of `positions` could never run here (`None`: it fits the pool alone).
    pub fn refuse(&self, positions: usize) -> Option<Refused> {
        let (needed, budget) = (blocks_for(positions) * self.blocks.block_bytes(), self.budget());
        (needed > budget).then_some(Refused::TooLarge { needed, budget })
    }

    /// Running sequence `owner`'s full blocks so far (its cache holds `tokens` at its first
    /// positions) become an entry, replacing the one it published before: a prompt sharing them
    /// is served while it still runs, and they outlive its end however it ends. Sharing only
    /// full blocks, the entry never makes the sequence copy the block it writes. Also saved to
    /// the disk prompt cache.
    pub fn publish(&mut self, owner: u64, cache: &KvCache, tokens: &[u32]) {
        if let Some(disk) = &self.disk {
            disk.save(cache, tokens);
        }
        let full = cache.len().min(tokens.len()) / KV_BLOCK * KV_BLOCK;
        let current = self.entries.iter().position(|e| e.owner == Some(owner));
        if self.prefix == PrefixCache::Off
            || full == 0
            || current.is_some_and(|i| self.entries[i].tokens.len() == full)
        {
            return;
        }
        let Ok(fork) = cache.fork(full, full) else { return };
        if let Some(i) = current {
            self.entries.remove(i);
        }
        self.entries.push(Entry { tokens: tokens[..full].to_vec(), cache: fork, owner: Some(owner) });
    }

    /// Sequence `owner` ended (finished, cancelled, preempted, failed): its cache, holding
    /// `tokens` at its first positions, becomes a prefix entry in place of what it published (or
    /// its blocks are freed when prefix caching is off), and its full blocks go to the disk
    /// prompt cache.
    pub fn release(&mut self, owner: u64, cache: KvCache, tokens: &[u32]) {
        self.entries.retain(|e| e.owner != Some(owner));
        let len = cache.len().min(tokens.len());
        if let Some(disk) = &self.disk {
            disk.save(&cache, tokens);
        }
        if self.prefix == PrefixCache::Off || len == 0 {
            return;
        }
        self.entries.push(Entry { tokens: tokens[..len].to_vec(), cache, owner: None });
    }

    /// The entry sharing the most leading tokens with `prompt` (at most `prompt.len() - 1`),
    /// and that count; `None` when none shares any.
    fn longest_prefix(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(limit)))
            .filter(|&(_, len)| len > 0)
            .max_by_key(|&(i, len)| (len, i))
    }
}

fn model_error(e: ModelError) -> Refused {
    Refused::Model(e.to_string())
}

#[cfg(test)]
mod tests;
