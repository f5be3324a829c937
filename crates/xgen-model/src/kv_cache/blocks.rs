//! The block pool: every layer's keys and values for a fixed number of blocks of
//! [`KV_BLOCK`] positions, handed to caches one block at a time and shared by reference count
//! (as vLLM's PagedAttention does).
//!
//! Invariants: a block is either free or held by at least one cache (`refs > 0`); a cache writes
//! only blocks it holds alone (it copies a shared block first, see `KvCache::make_writable`); the
//! blocks in use never exceed [`BlockPool::blocks`], so the pool's memory is bounded by its size.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Device;

use super::{buffer::KvBuffer, KvType};
use crate::error::Result;

/// Positions per block: a multiple of the attention kernels' 16-row groups, small enough that a
/// sequence wastes little of its last block (7B f16: 32 MiB a block).
pub const KV_BLOCK: usize = 64;

/// Blocks of every layer's keys and values, and which are free.
#[derive(Debug)]
pub struct BlockPool {
    /// Per layer: keys and values, `[kv_h, blocks, KV_BLOCK, hd]` (each head's blocks side by
    /// side, see [`Paging::pooled`](crate::kernels::paging::Paging::pooled)).
    layers: Vec<(KvBuffer, KvBuffer)>,
    kind: KvType,
    kv_h: usize,
    blocks: usize,
    alloc: Mutex<Alloc>,
}

/// The free list and each block's holders.
#[derive(Debug)]
struct Alloc {
    /// Free blocks; the last freed is taken first (its pages are the warmest).
    free: Vec<u32>,
    refs: Vec<u32>,
}

impl BlockPool {
    /// A pool of `blocks` blocks for a model of `num_layers` layers.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        blocks: usize,
        kind: KvType,
        device: &Device,
    ) -> Result<Arc<Self>> {
        let shape = (num_kv_heads, blocks, KV_BLOCK, head_dim);
        let layers = (0..num_layers)
            .map(|_| Ok((KvBuffer::zeros(kind, shape, device)?, KvBuffer::zeros(kind, shape, device)?)))
            .collect::<Result<_>>()?;
        let alloc = Alloc { free: (0..blocks as u32).rev().collect(), refs: vec![0; blocks] };
        Ok(Arc::new(Self { layers, kind, kv_h: num_kv_heads, blocks, alloc: Mutex::new(alloc) }))
    }

    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Layers of keys and values.
    pub(crate) fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Blocks held by at least one cache.
    pub fn used_blocks(&self) -> usize {
        self.blocks - self.lock().free.len()
    }

    /// Blocks no cache holds.
    pub fn free_blocks(&self) -> usize {
        self.lock().free.len()
    }

    /// Bytes of one block (all layers, keys and values).
    pub fn block_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.size_bytes() + v.size_bytes()).sum::<usize>() / self.blocks.max(1)
    }

    /// How keys and values are stored.
    pub fn kind(&self) -> KvType {
        self.kind
    }

    pub(crate) fn kv_heads(&self) -> usize {
        self.kv_h
    }

    /// Layer `layer`'s key and value buffers.
    pub(crate) fn layer(&self, layer: usize) -> &(KvBuffer, KvBuffer) {
        &self.layers[layer]
    }

    /// `n` free blocks, each now held once, `after + 1` first when it is free (a sequence whose
    /// blocks follow each other reads each head as one stream); `None` (nothing taken) when fewer
    /// are free.
    pub(crate) fn take(&self, n: usize, after: Option<u32>) -> Option<Vec<u32>> {
        let mut a = self.lock();
        let at = a.free.len().checked_sub(n)?;
        if let Some(next) = after.map(|id| id + 1).filter(|&id| (id as usize) < self.blocks) {
            if a.refs[next as usize] == 0 {
                let i = a.free.iter().rposition(|&id| id == next).expect("a block nobody holds is free");
                let last = a.free.len() - 1;
                a.free.swap(i, last);
            }
        }
        let mut ids = a.free.split_off(at);
        ids.reverse(); // the free list's end first: ascending in a fresh pool
        ids.iter().for_each(|&id| a.refs[id as usize] = 1);
        Some(ids)
    }

    /// One more holder for each of `ids`.
    pub(crate) fn share(&self, ids: &[u32]) {
        let mut a = self.lock();
        ids.iter().for_each(|&id| a.refs[id as usize] += 1);
    }

    /// Whether more than one cache holds `id`.
    pub(crate) fn is_shared(&self, id: u32) -> bool {
        self.lock().refs[id as usize] > 1
    }

    /// One holder fewer for each of `ids`; blocks nobody holds become free.
    pub(crate) fn release(&self, ids: &[u32]) {
        let mut a = self.lock();
        for &id in ids {
            let r = &mut a.refs[id as usize];
            debug_assert!(*r > 0, "block {id} released more often than taken");
            *r -= 1;
            if *r == 0 {
                a.free.push(id);
            }
        }
    }

    /// Copies block `from` to block `to` in every layer and head.
    pub(crate) fn copy_block(&self, from: u32, to: u32) -> Result<()> {
        let (from, to, head) = (from as usize * KV_BLOCK, to as usize * KV_BLOCK, self.blocks * KV_BLOCK);
        for (k, v) in &self.layers {
            for g in 0..self.kv_h {
                k.copy_rows(g * head + from, g * head + to, KV_BLOCK)?;
                v.copy_rows(g * head + from, g * head + to, KV_BLOCK)?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Alloc> {
        // A panic elsewhere never leaves the free list half-updated (each update is one step).
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }
}
