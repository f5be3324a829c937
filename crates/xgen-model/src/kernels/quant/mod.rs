//! Block-quantized weight matrices (q8_0, q4_0) held once, in a layout made for the CPU kernels of
//! this module, and their product with activation rows.
//!
//! The numbers are GGUF's: a row of `k` weights is cut into blocks of 32, each with an f16 scale
//! `d`; q8_0 stores `round(w / d)` as i8, q4_0 stores `round(w / d) + 8` as a nibble (0..=15).
//! Activations are quantized to q8_0 per 32 values (as llama.cpp and candle do), so a block's
//! contribution is `d_w · d_x · Σ w_q·x_q`, summed exactly in i32.
//!
//! Layout: per row, the quants in groups of 16 blocks interleaved so that one `vpdpbusd` sums 4
//! products of each of 16 blocks (`layout.rs` has the details); scales `[n, k/32]` f16 bits apart.
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

use candle_core::{quantized::GgmlDType, DType, Tensor};
use rayon::prelude::*;

pub use activations::Activations;

use crate::error::{ModelError, Result};

/// Values per block.
pub const BLOCK: usize = 32;

/// Whether this CPU runs the SIMD kernels (AVX-512 with VNNI). Elsewhere the portable kernel is
/// correct but slow, and the model uses candle's quantized kernels (AVX2/NEON) instead.
pub fn has_fast_kernels() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernel that multiplies prompts (16 rows or more, features in strips of 16) by packed
/// weights here: `amx-int8`, `avx512-vnni` or `portable`.
pub fn prompt_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if amx::available() {
        return "amx-int8";
    }
    if has_fast_kernels() {
        "avx512-vnni"
    } else {
        "portable"
    }
}

/// The block formats with kernels here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
}

impl BlockFormat {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// Bytes of one block in GGUF: f16 scale + quants.
    pub fn ggml_block_bytes(self) -> usize {
        2 + self.quant_bytes()
    }

    /// Quant bytes of one block.
    fn quant_bytes(self) -> usize {
        match self {
            Self::Q8_0 => BLOCK,
            Self::Q4_0 => BLOCK / 2,
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
    /// f16 scale bits, `[n, k / 32]`.
    d: Vec<u16>,
}

impl PackedMatrix {
    /// From GGUF block bytes of an `[n, k]` matrix (row-major blocks).
    pub fn from_ggml(format: BlockFormat, n: usize, k: usize, bytes: &[u8]) -> Result<Self> {
        let (nb, bb) = (k / BLOCK, format.ggml_block_bytes());
        if !k.is_multiple_of(BLOCK) || bytes.len() != n * nb * bb {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "{format:?} [{n}, {k}] needs k divisible by {BLOCK} and {} bytes, got {}",
                n * nb * bb,
                bytes.len()
            ))));
        }
        let row_qs = nb * format.quant_bytes();
        let mut qs = vec![0u8; n * row_qs];
        let mut d = vec![0u16; n * nb];
        qs.par_chunks_mut(row_qs)
            .zip(d.par_chunks_mut(nb))
            .enumerate()
            .for_each(|(j, (q, d))| layout::pack_row(format, &bytes[j * nb * bb..(j + 1) * nb * bb], q, d));
        Ok(Self { format, n, k, qs, d })
    }

    /// Quantizes `w` `[n, k]` (any float dtype) with candle's GGUF quantizer.
    pub fn quantize(w: &Tensor, format: BlockFormat) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let q = candle_core::quantized::QTensor::quantize(&w.to_dtype(DType::F32)?, format.ggml())?;
        Self::from_ggml(format, n, k, &q.data()?)
    }

    /// Back to GGUF block bytes (the inverse of [`PackedMatrix::from_ggml`]).
    pub fn to_ggml(&self) -> Vec<u8> {
        let (nb, bb) = (self.k / BLOCK, self.format.ggml_block_bytes());
        let mut out = vec![0u8; self.n * nb * bb];
        for (j, row) in out.chunks_mut(nb * bb).enumerate() {
            layout::unpack_row(self.format, self.row_qs(j), self.row_d(j), row);
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
        self.qs.len() + 2 * self.d.len()
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

    /// Row `j` dequantized into `out` (`k` values): `d · q` per block, as GGUF's dequantizers.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let (qs, d, nb) = (self.row_qs(j), self.row_d(j), self.k / BLOCK);
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            let scale = half::f16::from_bits(d[b]).to_f32();
            let q = layout::signed_block(self.format, qs, nb, b);
            o.iter_mut().zip(q).for_each(|(o, q)| *o = q as f32 * scale);
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
}

#[cfg(test)]
mod tests;
