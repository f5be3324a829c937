//! Per-layer key/value storage, preallocated once and written in place.
//!
//! Appending with `Tensor::cat` copies the whole cache every token (1.4 s per token at 4096
//! positions for the 7B, see docs/cpu-performance.md); here each layer owns `[b, kv_h, capacity,
//! hd]` buffers and a step writes only its `t` new positions with `slice_set`.
//!
//! Keys and values are stored in a float dtype, or as q8_0 ([`KvType::Q8_0`]): per position and
//! head, blocks of 32 values as `round(x / d) + 128` (u8) with an f16 scale `d = max|x| / 127`,
//! 1.06 bytes per value instead of 2 (the same numbers as GGUF's q8_0, held as tensors so any
//! device can store them).

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};

/// Values per q8_0 block.
const Q8_BLOCK: usize = 32;

/// How keys and values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    /// As floats of this dtype.
    Float(DType),
    /// As q8_0 blocks (half the bytes of f16; head_dim must be a multiple of 32).
    Q8_0,
}

/// One layer's keys or values.
#[derive(Debug)]
pub enum KvBuffer {
    /// `[b, kv_h, capacity, hd]`.
    Float(Tensor),
    /// `q` `[b, kv_h, capacity, hd]` u8 (`round(x / d) + 128`), `d` `[b, kv_h, capacity, hd / 32]` f16.
    Q8_0 { q: Tensor, d: Tensor },
}

impl KvBuffer {
    pub(crate) fn zeros(kind: KvType, shape: (usize, usize, usize, usize), device: &Device) -> Result<Self> {
        let (b, kv_h, capacity, hd) = shape;
        Ok(match kind {
            KvType::Float(dtype) => Self::Float(Tensor::zeros(shape, dtype, device)?),
            KvType::Q8_0 => Self::Q8_0 {
                q: Tensor::zeros(shape, DType::U8, device)?,
                d: Tensor::zeros((b, kv_h, capacity, hd / Q8_BLOCK), DType::F16, device)?,
            },
        })
    }

    fn size_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Float(t) => bytes(t),
            Self::Q8_0 { q, d } => bytes(q) + bytes(d),
        }
    }

    /// Writes `x` `[b, kv_h, t, hd]` at position `at`.
    pub(crate) fn write(&self, x: &Tensor, at: usize) -> Result<()> {
        match self {
            Self::Float(t) => t.slice_set(&x.to_dtype(t.dtype())?.contiguous()?, 2, at)?,
            Self::Q8_0 { q, d } => {
                let (qx, dx) = quantize_q8(x)?;
                q.slice_set(&qx, 2, at)?;
                d.slice_set(&dx, 2, at)?;
            }
        }
        Ok(())
    }

    /// Positions `0..len` as `[b, kv_h, len, hd]` (a view for floats; dequantized to f32 for q8_0).
    pub(crate) fn view(&self, len: usize) -> Result<Tensor> {
        match self {
            Self::Float(t) => Ok(t.narrow(2, 0, len)?),
            Self::Q8_0 { q, d } => {
                let (b, kv_h, _, hd) = q.dims4()?;
                let blocks = (b, kv_h, len, hd / Q8_BLOCK, Q8_BLOCK);
                let q = (q.narrow(2, 0, len)?.to_dtype(DType::F32)? - 128.0)?.reshape(blocks)?;
                let d = d.narrow(2, 0, len)?.to_dtype(DType::F32)?.unsqueeze(4)?;
                Ok(q.broadcast_mul(&d)?.reshape((b, kv_h, len, hd))?)
            }
        }
    }
}

/// `x` `[b, kv_h, t, hd]` -> q8_0 quants `[b, kv_h, t, hd]` u8 (`+ 128`) and scales
/// `[b, kv_h, t, hd / 32]` f16, as GGUF's `quantize_row_q8_0` (round half away from zero).
pub fn quantize_q8(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, kv_h, t, hd) = x.dims4()?;
    if !hd.is_multiple_of(Q8_BLOCK) {
        return Err(candle_core::Error::Msg(format!(
            "a q8_0 KV cache needs head_dim divisible by {Q8_BLOCK}, got {hd}"
        ))
        .into());
    }
    let blocks = x.to_dtype(DType::F32)?.reshape((b, kv_h, t, hd / Q8_BLOCK, Q8_BLOCK))?;
    let d = (blocks.abs()?.max_keepdim(D::Minus1)? / 127.0)?; // [.., nb, 1]
                                                              // As ggml: quantized with the f32 scale, stored in f16; all-zero blocks stay 0.
    let inv = d.maximum(f32::MIN_POSITIVE)?.recip()?;
    let q = (blocks.broadcast_mul(&inv)?.round()?.clamp(-127f32, 127f32)? + 128.0)?;
    let d = d.to_dtype(DType::F16)?.squeeze(4)?.contiguous()?;
    Ok((q.to_dtype(DType::U8)?.reshape((b, kv_h, t, hd))?, d))
}

/// The KV cache of a whole model for one batch of sequences.
#[derive(Debug)]
pub struct KvCache {
    /// Per layer: keys and values, `[b, kv_h, capacity, hd]`.
    layers: Vec<(KvBuffer, KvBuffer)>,
    kind: KvType,
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
        kind: KvType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, num_kv_heads, capacity, head_dim);
        let layers = (0..num_layers)
            .map(|_| Ok((KvBuffer::zeros(kind, shape, device)?, KvBuffer::zeros(kind, shape, device)?)))
            .collect::<Result<_>>()?;
        Ok(Self { layers, kind, len: 0, capacity, padding: vec![0; batch] })
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

    /// How keys and values are stored.
    pub fn kind(&self) -> KvType {
        self.kind
    }

    /// Bytes held by the buffers.
    pub fn size_bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| k.size_bytes() + v.size_bytes()).sum()
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

    /// A cache of `capacity` positions (at least [`KvCache::len`]) holding a copy of this one's
    /// positions and padding: how a cached prefix moves into a sequence that needs more room.
    pub fn resized(&self, capacity: usize) -> Result<Self> {
        let len = self.len;
        if capacity < len {
            return Err(ModelError::CacheFull { positions: len, capacity });
        }
        let copy = |from: &KvBuffer, device: &Device| -> Result<KvBuffer> {
            let (b, kv_h, _, hd) = match from {
                KvBuffer::Float(t) | KvBuffer::Q8_0 { q: t, .. } => t.dims4()?,
            };
            let to = KvBuffer::zeros(self.kind, (b, kv_h, capacity, hd), device)?;
            match (from, &to) {
                (KvBuffer::Float(f), KvBuffer::Float(t)) => {
                    t.slice_set(&f.narrow(2, 0, len)?.contiguous()?, 2, 0)?
                }
                (KvBuffer::Q8_0 { q: fq, d: fd }, KvBuffer::Q8_0 { q: tq, d: td }) => {
                    tq.slice_set(&fq.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                    td.slice_set(&fd.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                _ => unreachable!("both buffers are of the cache's kind"),
            }
            Ok(to)
        };
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| {
                let device = match k {
                    KvBuffer::Float(t) | KvBuffer::Q8_0 { q: t, .. } => t.device().clone(),
                };
                Ok((copy(k, &device)?, copy(v, &device)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, kind: self.kind, len, capacity, padding: self.padding.clone() })
    }

    /// Fails before any compute if `t` more positions do not fit.
    pub fn check_room(&self, t: usize) -> Result<()> {
        if self.len + t > self.capacity {
            return Err(ModelError::CacheFull { positions: self.len + t, capacity: self.capacity });
        }
        Ok(())
    }

    /// Writes `k`, `v` `[b, kv_h, t, hd]` of `layer` after the cached positions (in the cache's
    /// storage: float dtype, or q8_0).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.check_room(k.dim(2)?)?;
        let (kc, vc) = &self.layers[layer];
        kc.write(k, self.len)?;
        vc.write(v, self.len)
    }

    /// Keys and values of positions `0..len` of `layer`, `[b, kv_h, len, hd]`: views for a float
    /// cache, dequantized (f32) for q8_0.
    pub fn views(&self, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (k, v) = &self.layers[layer];
        Ok((k.view(len)?, v.view(len)?))
    }

    /// The whole key and value buffers of `layer`, `[b, kv_h, capacity, ..]`; positions from
    /// `len()` on are not written yet.
    pub fn buffers(&self, layer: usize) -> (&KvBuffer, &KvBuffer) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Marks `t` positions as written in every layer; called once per forward step.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{quantized::QTensor, Device, Tensor};

    use super::*;

    #[test]
    fn q8_quants_and_scales_are_ggufs() {
        let dev = Device::Cpu;
        let mut x = Tensor::randn(0f32, 2., (2, 3, 5, 64), &dev).unwrap();
        // One all-zero block.
        x = x
            .slice_assign(
                &[0..1, 0..1, 0..1, 32..64],
                &Tensor::zeros((1, 1, 1, 32), DType::F32, &dev).unwrap(),
            )
            .unwrap();
        let (q, d) = quantize_q8(&x).unwrap();
        assert_eq!((q.dims(), d.dims()), (&[2, 3, 5, 64][..], &[2, 3, 5, 2][..]));
        let want = QTensor::quantize(&x.reshape((30, 64)).unwrap(), candle_core::quantized::GgmlDType::Q8_0)
            .unwrap();
        let want = want.data().unwrap();
        let q: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
        let d: Vec<half::f16> = d.flatten_all().unwrap().to_vec1().unwrap();
        for (blk, bytes) in want.chunks_exact(34).enumerate() {
            assert_eq!(d[blk].to_bits(), u16::from_le_bytes([bytes[0], bytes[1]]), "scale of block {blk}");
            let ours: Vec<i8> = q[blk * 32..(blk + 1) * 32].iter().map(|&v| (v as i32 - 128) as i8).collect();
            let theirs: Vec<i8> = bytes[2..].iter().map(|&v| v as i8).collect();
            assert_eq!(ours, theirs, "quants of block {blk}");
        }
    }

    #[test]
    fn a_resized_cache_holds_the_same_positions() {
        let dev = Device::Cpu;
        for kind in [KvType::Float(DType::F16), KvType::Q8_0] {
            let mut small = KvCache::new(2, 1, 2, 32, 4, kind, &dev).unwrap();
            let k = Tensor::randn(0f32, 1., (1, 2, 3, 32), &dev).unwrap();
            let v = (&k + 1.0).unwrap();
            for layer in 0..2 {
                small.append(layer, &k, &v).unwrap();
            }
            small.advance(3);
            let big = small.resized(9).unwrap();
            assert_eq!((big.len(), big.capacity()), (3, 9));
            assert_eq!(big.size_bytes() * 4, small.size_bytes() * 9);
            for layer in 0..2 {
                let (a, b) = (small.views(layer, 3).unwrap(), big.views(layer, 3).unwrap());
                for (x, y) in [(a.0, b.0), (a.1, b.1)] {
                    let diff = (x.to_dtype(DType::F32).unwrap() - y.to_dtype(DType::F32).unwrap()).unwrap();
                    assert_eq!(diff.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
                }
            }
            assert!(small.resized(2).is_err(), "{kind:?}: fewer positions than are cached");
        }
    }

    #[test]
    fn q8_cache_holds_half_the_bytes_and_reads_back_within_a_step() {
        let dev = Device::Cpu;
        let f16 = KvCache::new(2, 1, 4, 64, 10, KvType::Float(DType::F16), &dev).unwrap();
        let mut q8 = KvCache::new(2, 1, 4, 64, 10, KvType::Q8_0, &dev).unwrap();
        // 64 + 4 bytes per 64 values against 128.
        assert_eq!(q8.size_bytes() * 128, f16.size_bytes() * 68);
        let k = Tensor::randn(0f32, 1., (1, 4, 3, 64), &dev).unwrap();
        let v = (&k * 3.0).unwrap();
        q8.append(1, &k, &v).unwrap();
        let (kr, vr) = q8.views(1, 3).unwrap();
        for (got, want) in [(kr, &k), (vr, &v)] {
            // Per block, d = max|x| / 127: rounding to the nearest quant errs by ≤ d/2, and storing d
            // in f16 (relative error ≤ 2^-11) by ≤ 127 · d · 2^-11 more: ≤ 0.5621 d (0.57 with margin).
            let amax = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= amax / 127.0 * 0.57, "{err} vs {amax}");
        }
    }
}
