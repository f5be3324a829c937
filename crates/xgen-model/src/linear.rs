//! A bias-free linear layer, `y = x Wᵀ` with `W` `[out, in]` as checkpoints store it, over float
//! or block-quantized (GGUF layouts) weights. Few-row inputs with 16-bit weights on the CPU
//! (decode steps) use [`crate::kernels::matvec`]; other float cases use candle's matmul. q8_0/q4_0 on the
//! CPU use [`crate::kernels::quant`]'s packed kernels; other block formats and devices use candle's.

use std::sync::Arc;

use candle_core::{
    quantized::{GgmlDType, QMatMul, QTensor},
    DType, Module, Tensor,
};

use crate::{
    error::Result,
    kernels::{
        matvec,
        quant::{BlockFormat, PackedMatrix},
    },
};

/// Block-quantized formats for the linear layers (GGUF-compatible block layouts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// 8-bit, blocks of 32 with an f16 scale (8.5 bits per weight).
    Q8_0,
    /// 4-bit, blocks of 32 with an f16 scale (4.5 bits per weight).
    Q4_0,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits per weight).
    Q4K,
}

impl Quant {
    fn ggml(self) -> GgmlDType {
        match self {
            Quant::Q8_0 => GgmlDType::Q8_0,
            Quant::Q4_0 => GgmlDType::Q4_0,
            Quant::Q4K => GgmlDType::Q4K,
        }
    }

    /// Whether a weight with `in_features` columns can be stored in this format.
    pub fn fits(self, in_features: usize) -> bool {
        in_features.is_multiple_of(self.ggml().block_size())
    }

    /// The packed CPU format with kernels in [`crate::kernels::quant`], if any (and if this CPU runs them
    /// fast; see [`crate::kernels::quant::has_fast_kernels`]).
    fn packed(self) -> Option<BlockFormat> {
        if !crate::kernels::quant::has_fast_kernels() {
            return None;
        }
        match self {
            Quant::Q8_0 => Some(BlockFormat::Q8_0),
            Quant::Q4_0 => Some(BlockFormat::Q4_0),
            Quant::Q4K => Some(BlockFormat::Q4K),
        }
    }

    /// Quantizes `w` `[out, in]`.
    pub fn quantize(self, w: &Tensor) -> Result<Weight> {
        match self.packed() {
            Some(format) if w.device().is_cpu() => {
                Ok(Weight::Packed(Arc::new(PackedMatrix::quantize(w, format)?)))
            }
            _ => Ok(Weight::Quantized(Arc::new(QTensor::quantize(w, self.ggml())?))),
        }
    }
}

/// A checkpoint tensor as the model holds it.
#[derive(Debug, Clone)]
pub enum Weight {
    Float(Tensor),
    /// Blocks in candle's storage, multiplied by candle's kernels.
    Quantized(Arc<QTensor>),
    /// q8_0/q4_0/q4_k in [`crate::kernels::quant`]'s layout (CPU).
    Packed(Arc<PackedMatrix>),
}

#[derive(Debug, Clone)]
pub struct Linear {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Float(Tensor),
    Quantized { matmul: QMatMul, bytes: usize },
    Packed(Arc<PackedMatrix>),
}

impl Linear {
    pub fn new(weight: Weight) -> Result<Self> {
        let kind = match weight {
            Weight::Float(t) => Kind::Float(t),
            Weight::Quantized(q) => {
                let bytes = q.storage_size_in_bytes();
                Kind::Quantized { matmul: QMatMul::from_arc(q)?, bytes }
            }
            Weight::Packed(p) => Kind::Packed(p),
        };
        Ok(Self { kind })
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self.kind, Kind::Float(_))
    }

    /// Whether the weight is held in the VNNI block layout of [`crate::kernels::quant`].
    pub fn is_packed(&self) -> bool {
        matches!(self.kind, Kind::Packed(_))
    }

    /// How the weight is stored: a dtype (`bf16`) or block format (`q4_0`, `q6k`).
    pub fn format_name(&self) -> String {
        match &self.kind {
            Kind::Float(t) => t.dtype().as_str().to_string(),
            Kind::Quantized { matmul: QMatMul::QTensor(q), .. } => format!("{:?}", q.dtype()).to_lowercase(),
            Kind::Quantized { matmul: QMatMul::Tensor(t) | QMatMul::TensorF16(t), .. } => {
                t.dtype().as_str().to_string()
            }
            Kind::Packed(p) => format!("{:?}", p.format()).to_lowercase(),
        }
    }

    /// The kernel that multiplies prompts by this weight on the CPU (see [`matvec::prompt_kernel`]).
    pub fn prompt_kernel(&self) -> &'static str {
        match &self.kind {
            Kind::Float(t) => matvec::prompt_kernel(t.dtype()),
            Kind::Quantized { .. } => "candle",
            Kind::Packed(_) => crate::kernels::quant::prompt_kernel(),
        }
    }

    /// Weights in the matrix (`out · in`).
    pub fn parameters(&self) -> usize {
        match &self.kind {
            Kind::Float(t) => t.elem_count(),
            Kind::Quantized { matmul: QMatMul::QTensor(q), .. } => q.shape().elem_count(),
            Kind::Quantized { matmul: QMatMul::Tensor(t) | QMatMul::TensorF16(t), .. } => t.elem_count(),
            Kind::Packed(p) => p.dims().0 * p.dims().1,
        }
    }

    /// Bytes of the weight as held.
    pub fn weight_bytes(&self) -> usize {
        match &self.kind {
            Kind::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Kind::Quantized { bytes, .. } => *bytes,
            Kind::Packed(p) => p.bytes(),
        }
    }

    /// Each of `linears` applied to the same `x`: packed q8_0/q4_0 weights of equal input width in
    /// one parallel pass ([`PackedMatrix::forward_many`]), anything else one by one.
    pub fn forward_many<const N: usize>(linears: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let packed: Vec<&PackedMatrix> = linears
            .iter()
            .filter_map(|l| match &l.kind {
                Kind::Packed(p) => Some(p.as_ref()),
                _ => None,
            })
            .collect();
        let ys: Vec<Tensor> =
            if packed.len() == N && packed.windows(2).all(|p| p[0].dims().1 == p[1].dims().1) {
                PackedMatrix::forward_many(&packed, x)?
                    .into_iter()
                    .map(|y| Ok(y.to_dtype(x.dtype())?))
                    .collect::<Result<_>>()?
            } else {
                linears.iter().map(|l| l.forward(x)).collect::<Result<_>>()?
            };
        Ok(ys.try_into().expect("one output per linear"))
    }

    /// `x` `[.., in]` -> `[.., out]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.kind {
            Kind::Float(w) => {
                if let Some(y) = matvec::matmul_wt(x, w)? {
                    return Ok(y);
                }
                Ok(x.broadcast_matmul(&w.t()?)?)
            }
            // candle's quantized kernels take and give f32.
            Kind::Quantized { matmul, .. } => {
                Ok(matmul.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?)
            }
            Kind::Packed(p) => Ok(p.forward(x)?.to_dtype(x.dtype())?),
        }
    }
}
