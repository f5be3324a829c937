//! One layer's keys or values in a paged buffer `[kv_h, blocks, block, hd]`, stored as floats or
//! as q8_0, written row by row through the block tables.
//!
//! q8_0 ([`KvType::Q8_0`]): per position and head, blocks of 32 values as `round(x / d) + 128`
//! (u8) with an f16 scale `d = max|x| / 127`, 1.06 bytes per value instead of 2 (the same numbers
//! as GGUF's q8_0, held as tensors so any device can store them).

use candle_core::{backend::BackendStorage, CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, D};
use half::{bf16, f16};

use super::KvType;
use crate::error::Result;

/// Values per q8_0 block.
pub(crate) const Q8_BLOCK: usize = 32;

/// One layer's keys or values.
#[derive(Debug)]
pub enum KvBuffer {
    /// `[kv_h, blocks, block, hd]`.
    Float(Tensor),
    /// `q` `[kv_h, blocks, block, hd]` u8 (`round(x / d) + 128`), `d` `[kv_h, blocks, block, hd / 32]` f16.
    Q8_0 { q: Tensor, d: Tensor },
}

impl KvBuffer {
    /// A zeroed buffer; on the CPU its pages are taken from the OS only when first written, so
    /// an unused part of a pool costs address space, not memory.
    pub(crate) fn zeros(kind: KvType, shape: (usize, usize, usize, usize), device: &Device) -> Result<Self> {
        let (a, b, c, hd) = shape;
        Ok(match kind {
            KvType::Float(dtype) => Self::Float(lazy_zeros(shape, dtype, device)?),
            KvType::Q8_0 => Self::Q8_0 {
                q: lazy_zeros(shape, DType::U8, device)?,
                d: lazy_zeros((a, b, c, hd / Q8_BLOCK), DType::F16, device)?,
            },
        })
    }

    pub(crate) fn size_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Self::Float(t) => bytes(t),
            Self::Q8_0 { q, d } => bytes(q) + bytes(d),
        }
    }

    /// Writes the rows of `x` `[.., hd]` (in order) at flat rows `rows`, in the buffer's storage.
    pub(crate) fn write_rows(&self, x: &Tensor, rows: &[usize]) -> Result<()> {
        let hd = x.dim(D::Minus1)?;
        let x = x.reshape((rows.len(), hd))?;
        match self {
            Self::Float(t) => scatter_rows(t, &x.to_dtype(t.dtype())?, rows),
            Self::Q8_0 { q, d } => {
                let (qx, dx) = quantize_q8(&x)?;
                scatter_rows(q, &qx, rows)?;
                scatter_rows(d, &dx, rows)
            }
        }
    }

    /// Copies flat rows `from..from + n` to `to..to + n` (a block of one head to another).
    pub(crate) fn copy_rows(&self, from: usize, to: usize, n: usize) -> Result<()> {
        let copy = |t: &Tensor| -> Result<()> {
            let flat = rows_of(t)?;
            // `index_select` copies just these rows (`Tensor::copy` of a view clones the whole
            // storage: a fork of a 3000-token prefix in a 23 GB pool took 126 s).
            let idx = Tensor::arange(from as u32, (from + n) as u32, t.device())?;
            Ok(flat.slice_set(&flat.index_select(&idx, 0)?, 0, to)?)
        };
        match self {
            Self::Float(t) => copy(t),
            Self::Q8_0 { q, d } => {
                copy(q)?;
                copy(d)
            }
        }
    }

    /// Flat rows `rows` as `shape` `[.., hd]`: in the stored dtype for floats, dequantized to f32
    /// for q8_0.
    pub(crate) fn gather(&self, rows: &[u32], shape: &[usize]) -> Result<Tensor> {
        let take = |t: &Tensor| -> Result<Tensor> {
            let idx = Tensor::new(rows, t.device())?;
            Ok(rows_of(t)?.index_select(&idx, 0)?) // [n, w]
        };
        match self {
            Self::Float(t) => Ok(take(t)?.reshape(shape)?),
            Self::Q8_0 { q, d } => {
                let n = rows.len();
                let hd = q.dim(3)?;
                let q = (take(q)?.to_dtype(DType::F32)? - 128.0)?.reshape((n, hd / Q8_BLOCK, Q8_BLOCK))?;
                let d = take(d)?.to_dtype(DType::F32)?.unsqueeze(2)?;
                Ok(q.broadcast_mul(&d)?.reshape(shape)?)
            }
        }
    }

    /// Test helper: writes `x` `[b, kv_h, t, hd]` at position `at` of a buffer read as
    /// `[b, kv_h, capacity, hd]` (one block per sequence).
    #[cfg(test)]
    pub(crate) fn write(&self, x: &Tensor, at: usize) -> Result<()> {
        let (b, kv_h, t, _) = x.dims4()?;
        let capacity = self.dims().2;
        let rows: Vec<usize> =
            (0..b * kv_h).flat_map(|r| (0..t).map(move |i| r * capacity + at + i)).collect();
        self.write_rows(x, &rows)
    }

    /// Test helper: positions `0..len` of a buffer read as `[b, kv_h, capacity, hd]`, as f32 for
    /// q8_0.
    #[cfg(test)]
    pub(crate) fn view(&self, len: usize) -> Result<Tensor> {
        let (b, kv_h, capacity, hd) = self.dims();
        let rows: Vec<u32> =
            (0..b * kv_h).flat_map(|r| (0..len).map(move |j| (r * capacity + j) as u32)).collect();
        self.gather(&rows, &[b, kv_h, len, hd])
    }

    /// Rows of `hd` values (over all but the last dimension).
    pub(crate) fn rows(&self) -> usize {
        let t = match self {
            Self::Float(t) | Self::Q8_0 { q: t, .. } => t,
        };
        t.elem_count() / t.dims().last().copied().unwrap_or(1).max(1)
    }

    /// The 4 dimensions (`[kv_h, blocks, block, hd]` in a pool, `[b, kv_h, capacity, hd]` in the
    /// tests' contiguous buffers).
    pub(crate) fn dims(&self) -> (usize, usize, usize, usize) {
        let t = match self {
            Self::Float(t) | Self::Q8_0 { q: t, .. } => t,
        };
        t.dims4().expect("KV buffers are 4-d")
    }
}

/// `[.., w]` as `[rows, w]` (same storage).
fn rows_of(t: &Tensor) -> Result<Tensor> {
    let w = t.dim(D::Minus1)?;
    Ok(t.reshape((t.elem_count() / w, w))?)
}

/// A zeroed tensor whose CPU memory comes from `alloc_zeroed` (pages committed on first write):
/// candle's `zeros` fills 16-bit floats element by element, touching every page at once.
fn lazy_zeros(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    // SAFETY (both): f16 and bf16 are `#[repr(transparent)]` u16s, and all-zero bits are +0.0.
    let tensor = match (device, dtype) {
        (Device::Cpu, DType::F16) => {
            Tensor::from_vec(unsafe { reinterpret::<f16>(vec![0u16; n]) }, shape, device)?
        }
        (Device::Cpu, DType::BF16) => {
            Tensor::from_vec(unsafe { reinterpret::<bf16>(vec![0u16; n]) }, shape, device)?
        }
        _ => Tensor::zeros(shape, dtype, device)?, // f32 and u8 zeros already use alloc_zeroed
    };
    Ok(tensor)
}

/// # Safety
/// `T` has the size, alignment and bit validity of `u16`.
unsafe fn reinterpret<T>(v: Vec<u16>) -> Vec<T> {
    assert_eq!((std::mem::size_of::<T>(), std::mem::align_of::<T>()), (2, 2));
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same size and alignment (asserted), so the allocation's layout is unchanged.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// `dst` `[.., w]` row `rows[i]` = `src` `[n, w]` row `i` (same dtype). On the CPU one pass; on
/// other devices a `slice_set` per run of consecutive rows.
fn scatter_rows(dst: &Tensor, src: &Tensor, rows: &[usize]) -> Result<()> {
    let src = src.contiguous()?;
    if matches!(dst.device(), Device::Cpu) {
        return Ok(dst.inplace_op2(&src, &ScatterRows { rows })?);
    }
    let flat = rows_of(dst)?;
    let mut i = 0;
    while i < rows.len() {
        let run = rows[i..].iter().enumerate().take_while(|&(k, &r)| r == rows[i] + k).count();
        flat.slice_set(&src.narrow(0, i, run)?.contiguous()?, 0, rows[i])?;
        i += run;
    }
    Ok(())
}

/// The CPU side of [`scatter_rows`].
struct ScatterRows<'a> {
    rows: &'a [usize],
}

impl InplaceOp2 for ScatterRows<'_> {
    fn name(&self) -> &'static str {
        "kv-scatter-rows"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        fn go<T: Copy>(dst: &mut [T], src: &[T], w: usize, rows: &[usize]) -> candle_core::Result<()> {
            if src.len() < rows.len() * w || rows.iter().any(|&r| (r + 1) * w > dst.len()) {
                candle_core::bail!("kv-scatter-rows: a row lies outside the buffer");
            }
            for (s, &r) in src.chunks_exact(w).zip(rows) {
                dst[r * w..(r + 1) * w].copy_from_slice(s);
            }
            Ok(())
        }
        let w = *dl.dims().last().unwrap_or(&1);
        if !dl.is_contiguous() || !sl.is_contiguous() || sl.dims().last() != Some(&w) {
            candle_core::bail!("kv-scatter-rows: needs contiguous rows of equal width");
        }
        let (d0, s0) = (dl.start_offset(), sl.start_offset());
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => go(&mut d[d0..], &s[s0..], w, self.rows),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => go(&mut d[d0..], &s[s0..], w, self.rows),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => go(&mut d[d0..], &s[s0..], w, self.rows),
            (CpuStorage::U8(d), CpuStorage::U8(s)) => go(&mut d[d0..], &s[s0..], w, self.rows),
            (d, s) => {
                candle_core::bail!("kv-scatter-rows: {:?} rows into a {:?} buffer", s.dtype(), d.dtype())
            }
        }
    }
}

/// `x` `[.., hd]` -> q8_0 quants `[.., hd]` u8 (`+ 128`) and scales `[.., hd / 32]` f16, as
/// GGUF's `quantize_row_q8_0` (round half away from zero).
pub fn quantize_q8(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = x.dims().to_vec();
    let hd = *dims.last().unwrap_or(&0);
    if hd == 0 || !hd.is_multiple_of(Q8_BLOCK) {
        return Err(candle_core::Error::Msg(format!(
            "a q8_0 KV cache needs head_dim divisible by {Q8_BLOCK}, got {hd}"
        ))
        .into());
    }
    let n = x.elem_count() / hd;
    let blocks = x.to_dtype(DType::F32)?.reshape((n, hd / Q8_BLOCK, Q8_BLOCK))?;
    let d = (blocks.abs()?.max_keepdim(D::Minus1)? / 127.0)?; // [n, nb, 1]
                                                              // As ggml: quantized with the f32 scale, stored in f16; all-zero blocks stay 0.
    let inv = d.maximum(f32::MIN_POSITIVE)?.recip()?;
    let q = (blocks.broadcast_mul(&inv)?.round()?.clamp(-127f32, 127f32)? + 128.0)?;
    let mut d_dims = dims.clone();
    *d_dims.last_mut().expect("hd checked") = hd / Q8_BLOCK;
    let d = d.to_dtype(DType::F16)?.reshape(d_dims)?.contiguous()?;
    Ok((q.to_dtype(DType::U8)?.reshape(dims)?, d))
}
