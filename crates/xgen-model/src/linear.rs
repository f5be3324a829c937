//! A bias-free linear layer, `y = x Wᵀ` with `W` `[out, in]` as checkpoints store it. Few-row
//! inputs with 16-bit weights on the CPU (decode steps) use [`crate::matvec`]; everything else
//! uses candle's matmul.

use candle_core::Tensor;

use crate::{error::Result, matvec};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x` `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = matvec::matmul_wt(x, &self.weight)? {
            return Ok(y);
        }
        Ok(x.broadcast_matmul(&self.weight.t()?)?)
    }
}
