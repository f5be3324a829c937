//! The KV cache of a batch of sequences: block tables over a [`BlockPool`].
//!
//! Appending with `Tensor::cat` copies the whole cache every token (1.4 s per token at 4096
//! positions for the 7B, see docs/cpu-performance.md); here each step writes only its `t` new
//! positions, into the blocks of [`KV_BLOCK`] positions its table lists. A cache takes blocks as
//! its tokens are written (from its own pool, sized at creation, or from a pool shared by a
//! server's sequences), shares the blocks of a common prefix with the cache it was forked from
//! ([`KvCache::fork`]), and copies a shared block before writing into it, so forks never see each
//! other's writes. Keys and values are stored in a float dtype or as q8_0 ([`KvType`]).

mod block_io;
mod blocks;
mod buffer;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

pub use self::{
    blocks::{BlockPool, KV_BLOCK},
    buffer::{quantize_q8, KvBuffer},
};
use crate::{
    error::{ModelError, Result},
    kernels::paging::Paging,
};

/// How keys and values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    /// As floats of this dtype.
    Float(DType),
    /// As q8_0 blocks (half the bytes of f16; head_dim must be a multiple of 32).
    Q8_0,
}

/// Blocks that hold `positions` positions of one sequence.
pub fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(KV_BLOCK)
}

/// The KV cache of a whole model for one batch of sequences.
#[derive(Debug)]
pub struct KvCache {
    pool: Arc<BlockPool>,
    /// Per sequence (batch row): the blocks holding its positions, in order.
    tables: Vec<Vec<u32>>,
    /// Positions filled (equal in every layer between forward calls).
    len: usize,
    /// Positions it may grow to.
    limit: usize,
    /// Left padding of each sequence: row `i`'s first `padding[i]` positions hold pad tokens that
    /// no query attends to, and its real tokens are numbered from 0 after them.
    padding: Vec<usize>,
}

impl KvCache {
    /// A cache for `batch` sequences of up to `capacity` positions, with a pool of its own
    /// holding exactly that (memory is committed as positions are first written).
    pub fn new(
        num_layers: usize,
        batch: usize,
        num_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        kind: KvType,
        device: &Device,
    ) -> Result<Self> {
        let blocks = batch * blocks_for(capacity);
        let pool = BlockPool::new(num_layers, num_kv_heads, head_dim, blocks, kind, device)?;
        let mut cache = Self::in_pool(&pool, capacity);
        cache.tables = vec![Vec::new(); batch];
        cache.padding = vec![0; batch];
        cache.reserve(capacity)?;
        Ok(cache)
    }

    /// An empty one-sequence cache of up to `limit` positions taking its blocks from `pool` as
    /// they are needed.
    pub fn in_pool(pool: &Arc<BlockPool>, limit: usize) -> Self {
        Self { pool: pool.clone(), tables: vec![Vec::new()], len: 0, limit, padding: vec![0] }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the blocks it holds cover (at most its limit).
    pub fn capacity(&self) -> usize {
        (self.tables[0].len() * KV_BLOCK).min(self.limit)
    }

    /// How keys and values are stored.
    pub fn kind(&self) -> KvType {
        self.pool.kind()
    }

    /// Blocks it holds (shared ones included).
    pub fn held_blocks(&self) -> usize {
        self.tables.iter().map(Vec::len).sum()
    }

    /// Bytes of the blocks it holds.
    pub fn size_bytes(&self) -> usize {
        self.held_blocks() * self.pool.block_bytes()
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.padding.len()
    }

    /// Left padding per sequence (see [`KvCache::set_padding`]).
    pub fn padding(&self) -> &[usize] {
        &self.padding
    }

    /// Declares that row `i` starts with `padding[i]` pad tokens (left padding, as transformers
    /// batches prompts of different lengths). Set before the first forward step.
    pub fn set_padding(&mut self, padding: Vec<usize>) -> Result<()> {
        if padding.len() != self.padding.len() {
            return Err(candle_core::Error::Msg(format!(
                "padding for {} sequences given to a cache of {}",
                padding.len(),
                self.padding.len()
            ))
            .into());
        }
        self.padding = padding;
        Ok(())
    }

    /// Whether any sequence is padded.
    pub fn is_padded(&self) -> bool {
        self.padding.iter().any(|&p| p > 0)
    }

    /// Forgets every position and the padding (the blocks are kept).
    pub fn clear(&mut self) {
        self.len = 0;
        self.padding.fill(0);
    }

    /// Keeps the first `len` positions (the blocks are kept).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Gives the pool back the blocks past those holding its positions (after a
    /// [`KvCache::truncate`] that dropped a verify step's rejected drafts).
    pub fn release_unused(&mut self) {
        let keep = blocks_for(self.len);
        for table in &mut self.tables {
            if table.len() > keep {
                self.pool.release(&table[keep..]);
                table.truncate(keep);
            }
        }
    }

    /// Blocks the pool must still give for every sequence to hold `positions`.
    pub fn blocks_needed(&self, positions: usize) -> usize {
        let want = blocks_for(positions.min(self.limit));
        self.tables.iter().map(|t| want.saturating_sub(t.len())).sum()
    }

    /// Takes the blocks every sequence needs to hold `positions` (all or none).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        if positions > self.limit {
            return Err(ModelError::CacheFull { positions, capacity: self.limit });
        }
        let needed = self.blocks_needed(positions);
        if needed == 0 {
            return Ok(());
        }
        let after = self.tables.last().and_then(|t| t.last().copied());
        let mut ids = self
            .pool
            .take(needed, after)
            .ok_or_else(|| ModelError::PoolDry { needed, free: self.pool.free_blocks() })?
            .into_iter();
        let want = blocks_for(positions);
        for table in &mut self.tables {
            let n = want.saturating_sub(table.len());
            table.extend(ids.by_ref().take(n));
        }
        Ok(())
    }

    /// A cache holding this one's first `len` positions by sharing its blocks (none copied now; a
    /// shared block is copied when either writes into it), growing to `limit` from the same pool.
    pub fn fork(&self, len: usize, limit: usize) -> Result<Self> {
        let len = len.min(self.len);
        let keep = blocks_for(len);
        let tables: Vec<Vec<u32>> = self.tables.iter().map(|t| t[..keep.min(t.len())].to_vec()).collect();
        tables.iter().for_each(|t| self.pool.share(t));
        Ok(Self {
            pool: self.pool.clone(),
            tables,
            len,
            limit: limit.max(len),
            padding: self.padding.clone(),
        })
    }

    /// Fails before any compute if `t` more positions exceed the limit.
    pub fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.limit {
            return Err(ModelError::CacheFull { positions: self.len + t, capacity: self.limit });
        }
        Ok(())
    }

    /// Readies the blocks of the next `t` positions (see [`KvCache::ready`]).
    pub fn prepare(&mut self, t: usize) -> Result<()> {
        self.check_room(t)?;
        self.ready(self.len + t)
    }

    /// Readies the blocks of positions `len()..positions`: taken from the pool where missing
    /// ([`ModelError::PoolDry`] when it has too few), copied where shared with another cache.
    pub fn ready(&mut self, positions: usize) -> Result<()> {
        self.reserve(positions)?;
        if positions <= self.len {
            return Ok(());
        }
        let blocks = self.len / KV_BLOCK..blocks_for(positions);
        for row in 0..self.tables.len() {
            for k in blocks.clone() {
                let id = self.tables[row][k];
                if self.pool.is_shared(id) {
                    let fresh = self.pool.take(1, None).ok_or(ModelError::PoolDry { needed: 1, free: 0 })?[0];
                    self.pool.copy_block(id, fresh)?;
                    self.pool.release(&[id]);
                    self.tables[row][k] = fresh;
                }
            }
        }
        Ok(())
    }

    /// Writes `k`, `v` `[b, kv_h, t, hd]` of `layer` after the cached positions (in the cache's
    /// storage: float dtype, or q8_0). The blocks must be [`KvCache::prepare`]d.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let (b, kv_h, t, _) = k.dims4()?;
        if self.len + t > self.capacity() {
            return Err(ModelError::CacheFull { positions: self.len + t, capacity: self.capacity() });
        }
        let paging = self.paging();
        let rows: Vec<usize> = (0..b)
            .flat_map(|bi| (0..kv_h).flat_map(move |g| (0..t).map(move |i| (bi, g, i))))
            .map(|(bi, g, i)| paging.row(bi, g, self.len + i))
            .collect();
        let (kc, vc) = self.pool.layer(layer);
        kc.write_rows(k, &rows)?;
        vc.write_rows(v, &rows)
    }

    /// Keys and values of positions `0..len` of `layer`, `[b, kv_h, len, hd]`: gathered from the
    /// blocks in the stored dtype for a float cache, dequantized (f32) for q8_0.
    pub fn views(&self, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = self.pool.layer(layer);
        let (kv_h, hd) = (self.pool.kv_heads(), k.dims().3);
        let paging = self.paging();
        let rows: Vec<u32> = (0..self.batch())
            .flat_map(|bi| (0..kv_h).flat_map(move |g| (0..len).map(move |j| (bi, g, j))))
            .map(|(bi, g, j)| paging.row(bi, g, j) as u32)
            .collect();
        let shape = [self.batch(), kv_h, len, hd];
        Ok((k.gather(&rows, &shape)?, v.gather(&rows, &shape)?))
    }

    /// The key and value buffers of `layer`, `[kv_h, blocks, KV_BLOCK, ..]`, read through
    /// [`KvCache::paging`].
    pub fn buffers(&self, layer: usize) -> (&KvBuffer, &KvBuffer) {
        let (k, v) = self.pool.layer(layer);
        (k, v)
    }

    /// Where each sequence's positions live in the buffers.
    pub fn paging(&self) -> Paging<'_> {
        Paging::pooled(&self.tables, KV_BLOCK, self.pool.blocks(), self.pool.kv_heads())
    }

    /// Marks `t` positions as written in every layer; called once per forward step.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.tables.iter().for_each(|t| self.pool.release(t));
    }
}

#[cfg(test)]
mod tests;
