//! Rotary position embeddings in HF's `rotate_half` layout, with transformers' scaling variants.
//!
//! The angle tables are computed the way transformers computes them, in f32:
//! `inv_freq[i] = 1 / theta^(2i / hd)`, `angle = f32(position) * inv_freq[i]`, then cos and sin.
//! Matching the f32 rounding of `position * inv_freq` matters at long context: at position 8000
//! one f32 ulp of the angle is 5e-4 rad, and the reference carries that rounding.

use candle_core::{DType, Device, Tensor};

use crate::{
    config::{Config, RopeScaling},
    error::Result,
};

/// RoPE parameters of a model. Tables are built per forward call for the positions it needs
/// (cheap: `t * hd / 2` cos/sin pairs), which also lets dynamic scaling follow the sequence length.
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: Option<RopeScaling>,
}

impl Rope {
    pub fn new(config: &Config) -> Self {
        Self { head_dim: config.head_dim, theta: config.rope_theta, scaling: config.rope_scaling }
    }

    /// `inv_freq` for a sequence of `seq_len` positions (only dynamic scaling depends on it).
    fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let hd = self.head_dim;
        let (base, divisor) = match self.scaling {
            None => (self.theta, 1.0),
            Some(RopeScaling::Linear { factor }) => (self.theta, factor as f32),
            Some(RopeScaling::Dynamic { factor, original_max_position_embeddings: max }) => {
                // transformers `_compute_dynamic_ntk_parameters`; unchanged up to the trained length.
                let len = seq_len.max(max) as f64;
                let exponent = hd as f64 / (hd as f64 - 2.0);
                (self.theta * ((factor * len / max as f64) - (factor - 1.0)).powf(exponent), 1.0)
            }
        };
        let base = base as f32;
        (0..hd / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / hd as f32) / divisor).collect()
    }

    /// cos and sin for positions `start..start + t`, each `[t, hd / 2]` in `dtype`.
    pub fn cos_sin(&self, start: usize, t: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        self.cos_sin_padded(start, t, &[0], dtype, device)
            .and_then(|(c, s)| Ok((c.squeeze(0)?, s.squeeze(0)?)))
    }

    /// cos and sin `[b, t, hd / 2]` for cache slots `start..start + t` of sequences whose first
    /// `padding[i]` slots are padding: slot `p` of row `i` is position `p - padding[i]` (padding
    /// slots get position 0; nothing attends to them).
    pub fn cos_sin_padded(
        &self,
        start: usize,
        t: usize,
        padding: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        // Dynamic scaling follows the longest sequence, as transformers' max(position_ids) + 1.
        let min_pad = padding.iter().copied().min().unwrap_or(0);
        let inv_freq = self.inv_freq(start + t - min_pad);
        let half = self.head_dim / 2;
        let n = padding.len() * t * half;
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &pad in padding {
            for slot in start..start + t {
                let pos = slot.saturating_sub(pad);
                for &f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (padding.len(), t, half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// Applies RoPE to `x` `[b, h, t, hd]` with tables `[t, hd / 2]` or `[b, t, hd / 2]` (rotate_half
/// layout).
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: Option<RopeScaling>) -> Config {
        let mut c =
            Config::from_json(&serde_json::json!({"hidden_size": 64, "num_attention_heads": 4})).unwrap();
        c.rope_scaling = scaling;
        c
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let plain = Rope::new(&config(None));
        let linear = Rope::new(&config(Some(RopeScaling::Linear { factor: 4.0 })));
        let (c1, _) = plain.cos_sin(10, 1, DType::F32, &Device::Cpu).unwrap();
        let (c4, _) = linear.cos_sin(40, 1, DType::F32, &Device::Cpu).unwrap();
        let diff = (c1 - c4).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn dynamic_scaling_only_past_the_trained_length() {
        let plain = Rope::new(&config(None));
        let dynamic = Rope::new(&config(Some(RopeScaling::Dynamic {
            factor: 2.0,
            original_max_position_embeddings: 16,
        })));
        assert_eq!(plain.inv_freq(16), dynamic.inv_freq(16));
        let (p, d) = (plain.inv_freq(32), dynamic.inv_freq(32));
        assert_eq!(p[0], d[0]);
        assert!(d[1..].iter().zip(&p[1..]).all(|(d, p)| d < p), "a larger base lowers every frequency");
        // transformers: base' = base * (factor * len / max - (factor - 1)) ^ (hd / (hd - 2)).
        let base = 10000f64 * 3f64.powf(16.0 / 14.0);
        assert!((d[1] as f64 - 1.0 / base.powf(2.0 / 16.0)).abs() < 1e-6);
    }

    #[test]
    fn rotate_half_layout() {
        // One head of size 4 at angle a: (x0, x1, x2, x3) -> (x0 c - x2 s, x1 c' - x3 s', x2 c + x0 s, …).
        let rope = Rope { head_dim: 4, theta: 10000.0, scaling: None };
        let (cos, sin) = rope.cos_sin(1, 1, DType::F32, &Device::Cpu).unwrap();
        let x = Tensor::new(&[[[[1f32, 0., 0., 0.]]]], &Device::Cpu).unwrap();
        let y: Vec<f32> = apply(&x, &cos, &sin).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!(
            (y[0] - c).abs() < 1e-6 && y[1].abs() < 1e-6 && (y[2] - s).abs() < 1e-6 && y[3].abs() < 1e-6,
            "{y:?}"
        );
    }
}
