//! Per-layer key/value storage, preallocated once and written in place.
//!
//! Appending with `Tensor::cat` copies the whole cache every token (1.4 s per token at 4096
//! positions for the 7B, see docs/cpu-performance.md); here each layer owns `[b, kv_h, capacity,
//! hd]` buffers and a step writes only its `t` new positions with `slice_set`.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The KV cache of a whole model for one batch of sequences.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys and values, `[b, kv_h, capacity, hd]`.
    layers: Vec<(Tensor, Tensor)>,
    /// Positions filled (equal in every layer between forward calls).
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache for `batch` sequences of up to `capacity` positions.
    pub fn new(
        num_layers: usize,
        batch: usize,
        num_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, num_kv_heads, capacity, head_dim);
        let layers = (0..num_layers)
            .map(|_| Ok((Tensor::zeros(shape, dtype, device)?, Tensor::zeros(shape, dtype, device)?)))
            .collect::<Result<_>>()?;
        Ok(Self { layers, len: 0, capacity })
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the buffers.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }

    /// Forgets every position (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Fails before any compute if `t` more positions do not fit.
    pub fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(ModelError::CacheFull { positions: self.len + t, capacity: self.capacity });
        }
        Ok(())
    }

    /// Writes `k`, `v` `[b, kv_h, t, hd]` of `layer` after the cached positions and returns all
    /// keys and values so far, `[b, kv_h, len + t, hd]` (views into the buffers).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        self.check_room(t)?;
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kc.narrow(2, 0, self.len + t)?, vc.narrow(2, 0, self.len + t)?))
    }

    /// Marks `t` positions as written in every layer; called once per forward step.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
