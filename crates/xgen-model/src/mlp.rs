//! The SiLU-gated feed-forward block: `down(silu(gate(x)) * up(x))`.

use candle_core::Tensor;

use crate::{error::Result, linear::Linear};

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `x` `[b, t, d]` -> `[b, t, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up] = Linear::forward_many([&self.gate_proj, &self.up_proj], x)?; // [b, t, f] each
        self.down_proj.forward(&(gate.silu()? * up)?) // [b, t, f] -> [b, t, d]
    }
}
