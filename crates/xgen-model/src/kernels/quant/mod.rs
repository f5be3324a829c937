//! Block-quantized weight matrices (q8_0, q4_0, q4_1, q4_k) held once, in a layout made for the CPU
//! kernels of this module, and their product with activation rows.
//!
//! The numbers are GGUF's: a row of `k` weights is cut into blocks of 32, each with an f16 scale
//! `d`; q8_0 stores `round(w / d)` as i8, q4_0 stores `round(w / d) + 8` as a nibble (0..=15).
//! q4_1 adds an f16 minimum `m` per block: `w = d · q + m`. q4_k groups 8 blocks under an f16
//! scale `D` and minimum scale `M` (256 values); each block has 6-bit integers `s`, `m` and
//! nibbles `q`, so `w = D·s · q - M·m`.
//! Activations are quantized to q8_0 per 32 values, so a block's contribution is
//! `d_w · d_x · Σ w_q·x_q` (q4_1, q4_k: plus the minimum times `d_x · Σ x_q`), summed exactly in i32.
//! (llama.cpp and candle quantize activations for q4_k per 256 values instead (q8_K): finer here.)
//! q8_0, q4_0 and q4_1 keep GGUF's bytes per block; q4_k holds its 6-bit scales as bytes.
//!
//! Layout: per row, the quants in groups of 16 blocks interleaved so that one `vpdpbusd` sums 4
//! products of each of 16 blocks (`layout.rs` has the details); scales `[n, k/32]` apart (f16
//! bits; for q4_k `s | m << 8`), and where a format has them the minimums apart (`extra`).
//! Prompts on AMX (`amx.rs`) unpack 16 rows at a time from the same layout: one copy of the weights.
//!
//! candle's quantized matmul (`QMatMul`) is the reference in tests. Ours exists because candle's
//! x86 path keeps a repacked second copy of q8_0/q4_k weights next to the original and has no
//! fast q4_0 path (see docs/performance.md).

mod activations;
#[cfg(target_arch = "x86_64")]
mod amx;
mod kernel;
mod layout;
pub mod repack;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;
#[cfg(target_arch = "x86_64")]
mod x86_few;

use candle_core::{quantized::GgmlDType, DType, Tensor};
use rayon::prelude::*;

pub use activations::Activations;

use crate::error::{ModelError, Result};

/// Values per block.
pub const BLOCK: usize = 32;

/// Whether this CPU runs SIMD kernels of this module (AVX-512 with VNNI, or AVX2 with FMA and
/// F16C). Elsewhere the portable kernel is correct but slow, and the model uses candle's quantized
/// kernels (NEON) instead.
pub fn has_fast_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::available() || x86_avx2::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel that multiplies prompts (16 rows or more, features in strips of 16) by packed
/// weights here: `amx-int8`, `avx512-vnni`, `avx2` or `portable`.
pub fn prompt_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        return "amx-int8";
    } else if x86::available() {
        return "avx512-vnni";
    } else if x86_avx2::available() {
        return "avx2";
    }
    "portable"
}

/// The block formats with kernels here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
    /// GGUF's q4_1: q4_0's nibbles without the offset, with an f16 minimum per block.
    Q4_1,
    /// GGUF's q4_K: blocks of 32 nibbles with 6-bit scales and minimums, under an f16 scale and
    /// minimum scale per 256 values (4.5 bits per weight in the file, 4.625 here).
    Q4K,
}

/// Values under one q4_k super-block scale.
pub(crate) const SUPER_BLOCK: usize = 256;

impl BlockFormat {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// Values of one GGUF block.
    pub fn ggml_block_values(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 => BLOCK,
            Self::Q4K => SUPER_BLOCK,
        }
    }

    /// Bytes of one GGUF block: f16 scale (and q4_1's f16 minimum) + quants; q4_k: `D`, `M`, 12
    /// bytes of 6-bit scales and minimums, 128 bytes of nibbles.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 => 2 + self.quant_bytes(),
            Self::Q4_1 => 4 + self.quant_bytes(),
            Self::Q4K => 4 + 12 + SUPER_BLOCK / 2,
        }
    }

    /// Packed quant bytes of one block of 32.
    fn quant_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 | Self::Q4_1 | Self::Q4K => BLOCK / 2,
        }
    }
}

/// An `[n, k]` weight matrix in a [`BlockFormat`].
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    format: BlockFormat,
    n: usize,
    k: usize,
    /// `[n, k · quant_bytes / 32]`, layout in the module docs.
    qs: Vec<u8>,
    /// Per block, `[n, k / 32]`: f16 scale bits; q4_k: its 6-bit scale `s | m << 8` (minimum).
    d: Vec<u16>,
    /// Minimums, f16 bits: q4_1 `[n, k / 32]`; q4_k `[n, k / 256, 2]` (`D`, `M`); else empty.
    extra: Vec<u16>,
}

impl PackedMatrix {
    /// From GGUF block bytes of an `[n, k]` matrix (row-major blocks).
    pub fn from_ggml(format: BlockFormat, n: usize, k: usize, bytes: &[u8]) -> Result<Self> {
        let mut m = Self::zeroed(format, n, k)?;
        m.pack_rows(0..n, bytes)?;
        Ok(m)
    }

    /// An `[n, k]` matrix packed from GGUF blocks that `chunk` makes `rows` rows at a time (row
    /// range → its block bytes): a conversion holds one chunk at a time besides the result.
    pub(crate) fn from_ggml_chunks(
        format: BlockFormat,
        n: usize,
        k: usize,
        rows: usize,
        mut chunk: impl FnMut(std::ops::Range<usize>) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        let mut m = Self::zeroed(format, n, k)?;
        for start in (0..n).step_by(rows.max(1)) {
            let range = start..(start + rows.max(1)).min(n);
            let bytes = chunk(range.clone())?;
            m.pack_rows(range, &bytes)?;
        }
        Ok(m)
    }

    /// All-zero quants and scales of an `[n, k]` matrix (`k` in whole GGUF blocks).
    fn zeroed(format: BlockFormat, n: usize, k: usize) -> Result<Self> {
        let values = format.ggml_block_values();
        if !k.is_multiple_of(values) {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "{format:?} [{n}, {k}] needs k divisible by {values}"
            ))));
        }
        let nb = k / BLOCK;
        let (qs, d) = (vec![0u8; n * nb * format.quant_bytes()], vec![0u16; n * nb]);
        Ok(Self { format, n, k, qs, d, extra: vec![0u16; n * layout::extra_len(format, nb)] })
    }

    /// Rows `rows` from their GGUF block bytes.
    fn pack_rows(&mut self, rows: std::ops::Range<usize>, bytes: &[u8]) -> Result<()> {
        let (format, n, k) = (self.format, self.n, self.k);
        let row = k / format.ggml_block_values() * format.ggml_block_bytes();
        if rows.end > n || bytes.len() != rows.len() * row {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "{format:?} [{n}, {k}] rows {rows:?} need {} bytes, got {}",
                rows.len() * row,
                bytes.len()
            ))));
        }
        let nb = k / BLOCK;
        let (row_qs, row_extra) = (nb * format.quant_bytes(), layout::extra_len(format, nb));
        let qs = self.qs[rows.start * row_qs..rows.end * row_qs].par_chunks_mut(row_qs);
        let quants = qs.zip(self.d[rows.start * nb..rows.end * nb].par_chunks_mut(nb));
        let src = |j: usize| &bytes[j * row..(j + 1) * row];
        if row_extra == 0 {
            quants.enumerate().for_each(|(j, (q, d))| layout::pack_row(format, src(j), q, d, &mut []));
        } else {
            let extra = self.extra[rows.start * row_extra..rows.end * row_extra].par_chunks_mut(row_extra);
            quants
                .zip(extra)
                .enumerate()
                .for_each(|(j, ((q, d), e))| layout::pack_row(format, src(j), q, d, e));
        }
        Ok(())
    }

    /// Quantizes `w` `[n, k]` (any float dtype) with candle's GGUF quantizer.
    pub fn quantize(w: &Tensor, format: BlockFormat) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let q = candle_core::quantized::QTensor::quantize(&w.to_dtype(DType::F32)?, format.ggml())?;
        Self::from_ggml(format, n, k, &q.data()?)
    }

    /// Back to GGUF block bytes (the inverse of [`PackedMatrix::from_ggml`]).
    pub fn to_ggml(&self) -> Vec<u8> {
        let row = self.k / self.format.ggml_block_values() * self.format.ggml_block_bytes();
        let mut out = vec![0u8; self.n * row];
        for (j, row) in out.chunks_mut(row).enumerate() {
            layout::unpack_row(self.format, self.row_qs(j), self.row_d(j), self.row_extra(j), row);
        }
        out
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held (and read per product).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.extra.len())
    }

    /// `x` `[.., k]` (f32 or any float dtype, CPU) -> `[.., n]` f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.k.max(1);
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let acts = Activations::quantize(&xs, rows, self.k);
        let y = self.matmul(&acts);
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("x has a last dimension") = self.n;
        Ok(Tensor::from_vec(y, shape, x.device())?)
    }

    /// `[rows, n]` f32: each activation row times every weight row.
    pub fn matmul(&self, acts: &Activations) -> Vec<f32> {
        kernel::matmul(self, acts)
    }

    /// `x` `[.., k]` times each of `ws` (all `[n_m, k]`) in one pass: `[.., n_m]` f32 per matrix.
    /// Same numbers as [`PackedMatrix::forward`] on each.
    pub fn forward_many(ws: &[&Self], x: &Tensor) -> Result<Vec<Tensor>> {
        let k = ws.first().map_or(0, |w| w.k);
        if ws.iter().any(|w| w.k != k) {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "matrices multiplied together must share their input width".into(),
            )));
        }
        let rows = x.elem_count() / k.max(1);
        let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let acts = Activations::quantize(&xs, rows, k);
        let ys = kernel::matmul_many(ws, &acts);
        ws.iter()
            .zip(ys)
            .map(|(w, y)| {
                let mut shape = x.dims().to_vec();
                *shape.last_mut().expect("x has a last dimension") = w.n;
                Ok(Tensor::from_vec(y, shape, x.device())?)
            })
            .collect()
    }

    /// Row `j` dequantized into `out` (`k` values): `d · q - min` per block (the minimum is 0 for
    /// q8_0/q4_0, minus q4_1's), as GGUF's dequantizers.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (qs, nb) = (self.row_qs(j), self.k / BLOCK);
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let (scale, min) = self.block_scale(j, b);
            let q = layout::signed_block(self.format, qs, nb, b);
            o.iter_mut().zip(q).for_each(|(o, q)| *o = scale * q as f32 - min);
        }
    }

    /// Block `b` of row `j`'s scale and minimum in f32, computed as GGUF's dequantizers do: the
    /// weights are `scale · q - min` (q4_1's `d · q + m` has `min = -m`; q8_0/q4_0: `min = 0`).
    pub(crate) fn block_scale(&self, j: usize, b: usize) -> (f32, f32) {
        let f16 = |bits: u16| half::f16::from_bits(bits).to_f32();
        let d = self.row_d(j)[b];
        match self.format {
            BlockFormat::Q8_0 | BlockFormat::Q4_0 => (f16(d), 0.0),
            BlockFormat::Q4_1 => (f16(d), -f16(self.row_extra(j)[b])),
            BlockFormat::Q4K => {
                let sd = &self.row_extra(j)[2 * (b * BLOCK / SUPER_BLOCK)..];
                (f16(sd[0]) * (d & 0xFF) as f32, f16(sd[1]) * (d >> 8) as f32)
            }
        }
    }

    /// Quant bytes of one row (`k / 32 · quant bytes`).
    fn row_bytes(&self) -> usize {
        self.k / BLOCK * self.format.quant_bytes()
    }

    fn row_qs(&self, j: usize) -> &[u8] {
        let len = self.row_bytes();
        &self.qs[j * len..(j + 1) * len]
    }

    fn row_d(&self, j: usize) -> &[u16] {
        let nb = self.k / BLOCK;
        &self.d[j * nb..(j + 1) * nb]
    }

    /// Row `j`'s minimums (see the field `extra`).
    fn row_extra(&self, j: usize) -> &[u16] {
        let len = layout::extra_len(self.format, self.k / BLOCK);
        &self.extra[j * len..(j + 1) * len]
    }
}

#[cfg(test)]
mod tests;
