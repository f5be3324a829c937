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
    /// Left padding of each sequence: row `i`'s first `padding[i]` positions hold pad tokens that
    /// no query attends to, and its real tokens are numbered from 0 after them.
    padding: Vec<usize>,
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
        Ok(Self { layers, len: 0, capacity, padding: vec![0; batch] })
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

    /// The dtype keys and values are stored in.
    pub fn dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, |(k, _)| k.dtype())
    }

    /// Bytes held by the buffers.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
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

    /// Forgets every position and the padding (the buffers are kept).
    pub fn clear(&mut self) {
        self.len = 0;
        self.padding.fill(0);
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
        // Stored in the cache's dtype (f16 for quantized models computing in f32).
        kc.slice_set(&k.to_dtype(kc.dtype())?.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.to_dtype(vc.dtype())?.contiguous()?, 2, self.len)?;
        Ok((kc.narrow(2, 0, self.len + t)?, vc.narrow(2, 0, self.len + t)?))
    }

    /// The whole key and value buffers of `layer`, `[b, kv_h, capacity, hd]`; positions from
    /// `len()` on are not written yet.
    pub fn buffers(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Marks `t` positions as written in every layer; called once per forward step.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
