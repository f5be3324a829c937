//! GGUF block types with no kernel here, loaded into q8_0 (whose kernels run prompts and decode
//! steps at compute and memory speed) instead of candle's generic path (on the real-weights Q4_1
//! file that path read prompts at a tenth of llama.cpp's speed; q4_1 has kernels of its own now).
//!
//! - q5_0 → q8_0 is exact: a q5_0 block is `d · (q - 16)` with `q` in 0..32, so the q8_0 block
//!   keeps `d` and holds `q - 16` as its quants.
//! - q5_1 (a per-block minimum), q2_k, q3_k, q5_k, q6_k (sub-block scales) are dequantized
//!   and quantized again to q8_0: near-exact, the added error at most half a q8_0 step
//!   (`max |w| / 254` per block of 32), a fraction of the source format's own step.
//!
//! Memory: q8_0 holds 8.5 bits per weight, more than these formats (5-6.6). q4_1 (5 bits) and q4_k
//! (4.625 bits here) have kernels of their own: they load as they are, exactly.

use candle_core::{
    quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor},
    Device,
};

use super::{BlockFormat, PackedMatrix, BLOCK};
use crate::error::Result;

/// Values converted at a time (4 MiB of f32).
const CHUNK_VALUES: usize = 1 << 20;

/// How a block type reaches the packed kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repack {
    /// Already a packed format.
    Direct(BlockFormat),
    /// Converted to q8_0 without changing any value.
    ExactQ8_0,
    /// Dequantized and quantized to q8_0.
    RequantizeQ8_0,
    /// Left to candle's kernels.
    None,
}

impl Repack {
    pub fn of(t: GgmlDType) -> Self {
        match t {
            GgmlDType::Q8_0 => Self::Direct(BlockFormat::Q8_0),
            GgmlDType::Q4_0 => Self::Direct(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Self::Direct(BlockFormat::Q4_1),
            GgmlDType::Q4K => Self::Direct(BlockFormat::Q4K),
            GgmlDType::Q5_0 => Self::ExactQ8_0,
            GgmlDType::Q5_1 | GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q5K | GgmlDType::Q6K => {
                Self::RequantizeQ8_0
            }
            _ => Self::None,
        }
    }

    /// The `[n, k]` matrix of GGUF blocks `bytes` (of type `t`) in a packed format; `None` for
    /// [`Repack::None`].
    pub fn apply(self, t: GgmlDType, n: usize, k: usize, bytes: &[u8]) -> Result<Option<PackedMatrix>> {
        Ok(Some(match self {
            Self::Direct(format) => PackedMatrix::from_ggml(format, n, k, bytes)?,
            // Converted in chunks of rows: the f32 values (or q8_0 blocks) of a large matrix (a
            // q6_k `lm_head` of 51200 × 4096: 839 MB of f32) are never all in memory at once.
            Self::ExactQ8_0 | Self::RequantizeQ8_0 => {
                let row = bytes.len() / n.max(1);
                let rows = (CHUNK_VALUES / k.max(1)).max(1);
                PackedMatrix::from_ggml_chunks(BlockFormat::Q8_0, n, k, rows, |range| {
                    let part = &bytes[range.start * row..range.end * row];
                    if self == Self::ExactQ8_0 {
                        return Ok(q5_0_as_q8_0(part));
                    }
                    let w = qtensor_from_ggml(t, part, vec![range.len(), k], &Device::Cpu)?
                        .dequantize(&Device::Cpu)?;
                    Ok(QTensor::quantize(&w, GgmlDType::Q8_0)?.data()?.into_owned())
                })?
            }
            Self::None => return Ok(None),
        }))
    }
}

/// q5_0 blocks (f16 `d`, 32 high bits, 16 bytes of low nibbles: 22 bytes) as q8_0 blocks (f16 `d`,
/// 32 i8: 34 bytes) of the same values. Value `j < 16` is the low nibble of byte `j`, value
/// `j + 16` its high nibble; bit `j` of the high bits is value `j`'s fifth bit.
fn q5_0_as_q8_0(bytes: &[u8]) -> Vec<u8> {
    const Q5: usize = 22;
    let mut out = Vec::with_capacity(bytes.len() / Q5 * (2 + BLOCK));
    for block in bytes.chunks_exact(Q5) {
        out.extend_from_slice(&block[..2]);
        let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        let qs = &block[6..];
        out.extend((0..BLOCK).map(|j| {
            let low = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
            let q = low | (((high >> j) & 1) as u8) << 4;
            (q as i8 - 16) as u8
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use candle_core::{
        quantized::{GgmlDType, QTensor},
        Device, Tensor,
    };

    use super::*;

    /// The packed matrix's values (through its GGUF q8_0 bytes and candle's dequantizer).
    fn values(p: &PackedMatrix) -> Vec<f32> {
        let (n, k) = p.dims();
        let q = qtensor_from_ggml(GgmlDType::Q8_0, &p.to_ggml(), vec![n, k], &Device::Cpu).unwrap();
        q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn source(t: GgmlDType, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t).unwrap();
        let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (q.data().unwrap().into_owned(), want)
    }

    #[test]
    fn q5_0_becomes_q8_0_without_changing_a_value() {
        let (n, k) = (7, 96);
        let (bytes, want) = source(GgmlDType::Q5_0, n, k);
        let packed = Repack::of(GgmlDType::Q5_0).apply(GgmlDType::Q5_0, n, k, &bytes).unwrap().unwrap();
        assert_eq!(values(&packed), want);
    }

    #[test]
    fn other_block_types_are_within_half_a_q8_0_step() {
        for t in [GgmlDType::Q5_1, GgmlDType::Q2K, GgmlDType::Q3K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (n, k) = (5, 512);
            let (bytes, want) = source(t, n, k);
            let packed = Repack::of(t).apply(t, n, k, &bytes).unwrap().unwrap();
            let got = values(&packed);
            for (b, (g, w)) in got.chunks(BLOCK).zip(want.chunks(BLOCK)).enumerate() {
                let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Half a step d = amax / 127, and d's f16 rounding over up to 127 steps (see the
                // q8_0 KV cache test): ≤ 0.5621 d.
                let err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err <= amax / 127.0 * 0.57, "{t:?} block {b}: {err} vs max {amax}");
            }
        }
    }

    /// Matrices past one chunk of rows (here 256 rows of 4096 values) convert chunk by chunk to
    /// the same blocks as a conversion of the whole matrix at once.
    #[test]
    fn large_matrices_convert_in_chunks_of_rows() {
        let (n, k) = (600, 4096);
        for t in [GgmlDType::Q5_0, GgmlDType::Q6K] {
            let (bytes, want) = source(t, n, k);
            let packed = Repack::of(t).apply(t, n, k, &bytes).unwrap().unwrap();
            let at_once = if t == GgmlDType::Q5_0 {
                PackedMatrix::from_ggml(BlockFormat::Q8_0, n, k, &q5_0_as_q8_0(&bytes)).unwrap()
            } else {
                let whole = Tensor::from_vec(want, (n, k), &Device::Cpu).unwrap();
                PackedMatrix::quantize(&whole, BlockFormat::Q8_0).unwrap()
            };
            assert!(packed.to_ggml() == at_once.to_ggml(), "{t:?}");
        }
    }

    /// q4_1 and q4_k have kernels: their blocks load as they are, every value as GGUF's.
    #[test]
    fn q4_1_and_q4_k_load_as_they_are() {
        for (t, format) in [(GgmlDType::Q4_1, BlockFormat::Q4_1), (GgmlDType::Q4K, BlockFormat::Q4K)] {
            let (n, k) = (5, 512);
            let (bytes, want) = source(t, n, k);
            assert_eq!(Repack::of(t), Repack::Direct(format));
            let packed = Repack::of(t).apply(t, n, k, &bytes).unwrap().unwrap();
            assert_eq!(packed.to_ggml(), bytes, "{t:?}");
            let mut got = vec![0f32; n * k];
            got.chunks_mut(k).enumerate().for_each(|(j, row)| packed.dequantize_row(j, row));
            assert_eq!(got, want, "{t:?}");
        }
    }
}
