//! A cache's blocks as bytes: what a disk store saves and restores (`xgen-kvstore`).
//!
//! One block's bytes are, for each layer, its keys then its values, and in each of those every
//! KV head's [`KV_BLOCK`] rows as the pool stores them (`hd` floats per row; for q8_0 the block's
//! quants `[KV_BLOCK, hd]` u8 then its scales `[KV_BLOCK, hd / 32]` f16). Each head's rows lie
//! side by side in the pool's buffer (`[kv_h, blocks, KV_BLOCK, hd]`), so a block is read and
//! written as `2 × layers × kv_h` copies of contiguous runs: no per-position work.

use candle_core::{backend::BackendStorage, CpuStorage, InplaceOp1, Layout, Storage, Tensor};

use super::{buffer::KvBuffer, KvCache, KV_BLOCK};
use crate::error::{ModelError, Result};

impl KvCache {
    /// Bytes of one block of one sequence (all layers, keys and values).
    pub fn block_bytes(&self) -> usize {
        self.pool.block_bytes()
    }

    /// Appends the bytes of block `k` (positions `k·KV_BLOCK..`) of the first sequence to `out`.
    pub fn read_block(&self, k: usize, out: &mut Vec<u8>) -> Result<()> {
        let id = self.block_id(k)?;
        for layer in 0..self.pool.layers() {
            let (keys, values) = self.pool.layer(layer);
            for buffer in [keys, values] {
                for (t, rows) in self.block_runs(buffer, id) {
                    read_rows(t, rows, out)?;
                }
            }
        }
        Ok(())
    }

    /// Writes `bytes` (as [`KvCache::read_block`] gives them) into block `k` of the first
    /// sequence, which must already hold that block alone (see [`KvCache::ready`]), and returns the
    /// bytes it used. Positions become readable only through [`KvCache::set_restored`].
    pub fn write_block(&mut self, k: usize, bytes: &[u8]) -> Result<usize> {
        let id = self.block_id(k)?;
        if bytes.len() < self.block_bytes() {
            let msg = format!("a block's bytes end early: {} of {}", bytes.len(), self.block_bytes());
            return Err(candle_core::Error::Msg(msg).into());
        }
        if self.pool.is_shared(id as u32) {
            return Err(
                candle_core::Error::Msg(format!("block {k} is shared: ready it before writing")).into()
            );
        }
        let mut at = 0;
        for layer in 0..self.pool.layers() {
            let (keys, values) = self.pool.layer(layer);
            for buffer in [keys, values] {
                for (t, rows) in self.block_runs(buffer, id) {
                    at += write_rows(t, rows, &bytes[at.min(bytes.len())..])?;
                }
            }
        }
        Ok(at)
    }

    /// Declares positions `0..len` written (by [`KvCache::write_block`] after the positions the
    /// cache already held): a restored prefix. `len` must lie within the blocks it holds.
    pub fn set_restored(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(ModelError::CacheFull { positions: len, capacity: self.capacity() });
        }
        self.len = len;
        Ok(())
    }

    fn block_id(&self, k: usize) -> Result<usize> {
        self.tables[0].get(k).map(|&id| id as usize).ok_or_else(|| {
            candle_core::Error::Msg(format!("the cache holds {} blocks, not block {k}", self.tables[0].len()))
                .into()
        })
    }

    /// The tensors of `buffer` and, in each, the flat rows of every head's part of block `id`:
    /// `(tensor, first row, rows)`.
    fn block_runs<'b>(&self, buffer: &'b KvBuffer, id: usize) -> Vec<(&'b Tensor, (usize, usize))> {
        let head = self.pool.blocks() * KV_BLOCK;
        let tensors: Vec<&Tensor> = match buffer {
            KvBuffer::Float(t) => vec![t],
            KvBuffer::Q8_0 { q, d } => vec![q, d],
        };
        tensors
            .into_iter()
            .flat_map(|t| (0..self.pool.kv_heads()).map(move |g| (t, (g * head + id * KV_BLOCK, KV_BLOCK))))
            .collect()
    }
}

/// Row width in bytes of a `[.., w]` tensor.
fn row_bytes(t: &Tensor) -> usize {
    t.dims().last().copied().unwrap_or(1) * t.dtype().size_in_bytes()
}

/// Appends flat rows `first..first + n` of the CPU tensor `t` to `out`.
fn read_rows(t: &Tensor, (first, n): (usize, usize), out: &mut Vec<u8>) -> Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return Err(not_cpu()) };
    let w = row_bytes(t);
    let bytes = as_bytes(cpu);
    let start = layout.start_offset() * t.dtype().size_in_bytes() + first * w;
    let run = bytes.get(start..start + n * w).ok_or_else(|| candle_core::Error::Msg(outside(first, n)))?;
    out.extend_from_slice(run);
    Ok(())
}

/// Writes the first `n` rows' bytes of `bytes` at flat rows `first..first + n` of `t`; the bytes
/// it used.
fn write_rows(t: &Tensor, (first, n): (usize, usize), bytes: &[u8]) -> Result<usize> {
    let len = n * row_bytes(t);
    if bytes.len() < len {
        return Err(
            candle_core::Error::Msg(format!("a block's bytes end early: {} of {len}", bytes.len())).into()
        );
    }
    t.inplace_op1(&WriteRows { first, n, bytes: &bytes[..len] })?;
    Ok(len)
}

/// The CPU side of [`write_rows`].
struct WriteRows<'a> {
    first: usize,
    n: usize,
    bytes: &'a [u8],
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-block"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let size = storage.dtype().size_in_bytes();
        let w = layout.dims().last().copied().unwrap_or(1) * size;
        let bytes = as_bytes_mut(storage);
        let start = layout.start_offset() * size + self.first * w;
        match bytes.get_mut(start..start + self.n * w) {
            Some(dst) => dst.copy_from_slice(self.bytes),
            None => candle_core::bail!("{}", outside(self.first, self.n)),
        }
        Ok(())
    }
}

/// The bytes of a CPU buffer of the dtypes a KV pool holds.
fn as_bytes(s: &CpuStorage) -> &[u8] {
    // SAFETY: u8, f16, bf16 and f32 are plain data without padding; the slice covers exactly the
    // vector's initialized elements.
    unsafe {
        match s {
            CpuStorage::U8(v) => v,
            CpuStorage::F16(v) => std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 2),
            CpuStorage::BF16(v) => std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 2),
            CpuStorage::F32(v) => std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 4),
            _ => &[],
        }
    }
}

/// [`as_bytes`], writable.
fn as_bytes_mut(s: &mut CpuStorage) -> &mut [u8] {
    // SAFETY: as `as_bytes`; every bit pattern is a valid u8, f16, bf16 and f32.
    unsafe {
        match s {
            CpuStorage::U8(v) => v,
            CpuStorage::F16(v) => std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 2),
            CpuStorage::BF16(v) => std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 2),
            CpuStorage::F32(v) => std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 4),
            _ => &mut [],
        }
    }
}

fn not_cpu() -> ModelError {
    candle_core::Error::Msg("KV blocks are saved and restored only on the CPU".into()).into()
}

fn outside(first: usize, n: usize) -> String {
    format!("rows {first}..{} lie outside the KV buffer", first + n)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::kv_cache::{BlockPool, KvType};

    /// A block's bytes restored into another pool's cache read back as the same positions.
    #[test]
    fn a_block_written_from_its_bytes_reads_back_the_same_positions() {
        for kind in
            [KvType::Float(DType::F16), KvType::Float(DType::BF16), KvType::Float(DType::F32), KvType::Q8_0]
        {
            let pool = BlockPool::new(2, 2, 32, 4, kind, &Device::Cpu).unwrap();
            let mut a = KvCache::in_pool(&pool, 200);
            a.prepare(130).unwrap();
            let k = Tensor::randn(0f32, 1., (1, 2, 130, 32), &Device::Cpu).unwrap();
            for layer in 0..2 {
                a.append(layer, &k, &(&k * 2.0).unwrap()).unwrap();
            }
            a.advance(130);
            let (mut b0, mut b1) = (Vec::new(), Vec::new());
            a.read_block(0, &mut b0).unwrap();
            a.read_block(1, &mut b1).unwrap();
            assert_eq!(b0.len(), a.block_bytes(), "{kind:?}");

            // Another pool, its blocks taken in another order.
            let other = BlockPool::new(2, 2, 32, 5, kind, &Device::Cpu).unwrap();
            let _hole = other.take(1, None);
            let mut b = KvCache::in_pool(&other, 200);
            b.ready(128).unwrap();
            assert_eq!(b.write_block(0, &b0).unwrap(), b0.len());
            assert_eq!(b.write_block(1, &b1).unwrap(), b1.len());
            b.set_restored(128).unwrap();
            for layer in 0..2 {
                let (ka, va) = a.views(layer, 128).unwrap();
                let (kb, vb) = b.views(layer, 128).unwrap();
                let same = |x: &Tensor, y: &Tensor| {
                    let d = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap();
                    d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0
                };
                assert!(same(&ka, &kb) && same(&va, &vb), "{kind:?} layer {layer}");
            }
            // Too few bytes are an error, not a partial block.
            assert!(b.write_block(0, &b0[..b0.len() - 1]).is_err());
        }
    }
}
