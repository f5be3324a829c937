//! Multi-head (and grouped-query) causal self-attention of one layer over the KV cache:
//! q/k/v projections, RoPE, the cache write, attention, the output projection.
//!
//! Attention runs on the CPU kernels where they apply (`kernels::decode_attention` for one query
//! row, `kernels::prompt_attention` for a prompt chunk); elsewhere, and as their tests'
//! reference, on [`causal_attention`]. Scores and softmax are computed in f32 whatever the compute
//! dtype, as transformers' CPU SDPA does for bf16/f16. `causal_attention` takes query rows in
//! chunks so that at most `SCORE_BUDGET_BYTES` of scores exist at once: an 8K prompt never
//! materialises an f32 `[h, 8192, 8192]` tensor (8 GiB for the 7B).

use candle_core::{DType, Tensor};

use crate::{
    error::Result,
    kernels::{decode_attention::decode_attention, prompt_attention::prompt_attention},
    kv_cache::KvCache,
    linear::Linear,
    rope,
};

/// Upper bound on the f32 scores materialised per chunk of query rows.
const SCORE_BUDGET_BYTES: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x` `[b, t, d]` at each row's next positions -> `[b, t, d]`; writes this layer's keys and
    /// values into the cache(s).
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer: usize,
        caches: &mut Caches,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kv_h, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // [b, t, d] -> [b, t, n * hd] each (one pass over the three weights where it can).
        let [q, k, v] = Linear::forward_many([&self.q_proj, &self.k_proj, &self.v_proj], x)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            // [b, t, n * hd] -> [b, n, t, hd]
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope::apply(&heads(q, h)?, cos, sin)?; // [b, h, t, hd]
        let k = rope::apply(&heads(k, kv_h)?, cos, sin)?; // [b, kv_h, t, hd]
        let v = heads(v, kv_h)?; // [b, kv_h, t, hd]
        let attn = match caches {
            Caches::Batch(cache) => self.attend(&q, &k, &v, layer, cache)?,
            Caches::Segments(caches, lens) => {
                // One row of positions, sequence i's `lens[i]` after the previous ones'.
                let mut at = 0;
                let mut parts = Vec::with_capacity(lens.len());
                for (cache, &t) in caches.iter_mut().zip(lens.iter()) {
                    let part = |x: &Tensor| x.narrow(2, at, t)?.contiguous();
                    parts.push(self.attend(&part(&q)?, &part(&k)?, &part(&v)?, layer, cache)?);
                    at += t;
                }
                Tensor::cat(&parts, 2)?
            }
        };
        let attn = attn.to_dtype(x.dtype())?.transpose(1, 2)?.reshape((b, t, h * hd))?; // [b, t, h * hd]
        self.o_proj.forward(&attn) // [b, t, d]
    }

    /// Appends `k`, `v` to `cache` and attends `q` over everything cached: `[b, h, t, hd]` f32.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (past, s) = (cache.len(), cache.len() + q.dim(2)?);
        cache.append(layer, k, v)?;
        let (keys, values) = cache.buffers(layer); // [blocks, kv_h, KV_BLOCK, ..]
        let paging = cache.paging(); // where each row's positions are
        if let Some(out) = decode_attention(q, keys, values, &paging, s, cache.padding())? {
            return Ok(out);
        }
        if let Some(out) = prompt_attention(q, keys, values, &paging, past, cache.padding())? {
            return Ok(out);
        }
        let (k, v) = cache.views(layer, s)?; // [b, kv_h, s, hd]
        grouped_causal_attention(q, &k, &v, past, cache.padding())
    }
}

/// The KV storage of a forward step.
pub enum Caches<'c> {
    /// One cache holding all `b` rows (a prompt, or a left-padded batch that started together).
    Batch(&'c mut KvCache),
    /// One batch row whose positions are segments, each sequence's new tokens with its own
    /// single-row cache (`caches[i]` takes `lens[i]` positions).
    Segments(&'c mut [KvCache], &'c [usize]),
}

/// `[b, kv_h, s, hd]` -> `[b, kv_h * n_rep, s, hd]`, each key/value head shared by `n_rep` heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv_h, s, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv_h, n_rep, s, hd))?.reshape((b, kv_h * n_rep, s, hd))?)
}

/// [`causal_attention`] with `k`, `v` `[b, kv_h, s, hd]`, each key/value head shared by `h / kv_h`
/// query heads (the reference the CPU kernels' tests compare with).
pub(crate) fn grouped_causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: usize,
    padding: &[usize],
) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    causal_attention(q, &repeat_kv(k, n_rep)?, &repeat_kv(v, n_rep)?, past, padding)
    // [b, h, t, hd]
}

/// softmax(q kᵀ / √hd + mask) v, in f32, for queries at cache slots `past..past + t`: causal, and
/// row `i` never attends to its first `padding[i]` slots (left padding).
/// `q` `[b, h, t, hd]`, `k` and `v` `[b, h, s, hd]` with `s = past + t` -> `[b, h, t, hd]` f32.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: usize,
    padding: &[usize],
) -> Result<Tensor> {
    let (b, h, t, _) = q.dims4()?;
    let rows = (SCORE_BUDGET_BYTES / (b * h * k.dim(2)? * 4)).clamp(1, t.max(1));
    attention_in_chunks(q, k, v, past, padding, rows)
}

/// [`causal_attention`] with `rows` query rows per chunk.
fn attention_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    past: usize,
    padding: &[usize],
    rows: usize,
) -> Result<Tensor> {
    let padded = padding.iter().any(|&p| p > 0);
    let (_, _, t, hd) = q.dims4()?;
    let s = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
    let kt = k.t()?; // [b, h, hd, s]
    let mut out = Vec::with_capacity(t.div_ceil(rows));
    for r0 in (0..t).step_by(rows) {
        let rc = rows.min(t - r0);
        let scores = (q.narrow(2, r0, rc)?.matmul(&kt)? * scale)?; // [b, h, rc, s]
                                                                   // Row i (position past + r0 + i) sees keys 0..=past + r0 + i: no mask only when the
                                                                   // chunk's first row is already the last position (a decode step).
        let scores = if padded {
            scores.broadcast_add(&padded_causal_mask(past + r0, rc, s, padding, q.device())?)?
        } else if past + r0 + 1 < s {
            scores.broadcast_add(&causal_mask(past + r0, rc, s, q.device())?)?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?; // [b, h, rc, s]
        out.push(probs.matmul(&v)?); // [b, h, rc, hd]
    }
    Ok(Tensor::cat(&out, 2)?)
}

/// `[rows, s]`: 0 where key j may be seen by the query at position `first + i`, else -inf.
fn causal_mask(first: usize, rows: usize, s: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..rows)
        .flat_map(|i| (0..s).map(move |j| if j <= first + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Ok(Tensor::from_vec(mask, (rows, s), device)?)
}

/// Score added for a padding key: finite, so that a padding query row (which sees only padding)
/// gets a uniform softmax instead of NaN; `exp` of it underflows to 0 next to any real key.
const PAD_SCORE: f32 = -1e30;

/// `[b, 1, rows, s]`: [`causal_mask`] plus [`PAD_SCORE`] on each row's padding keys.
fn padded_causal_mask(
    first: usize,
    rows: usize,
    s: usize,
    padding: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = padding
        .iter()
        .flat_map(|&pad| {
            (0..rows).flat_map(move |i| {
                (0..s).map(move |j| match (j <= first + i, j >= pad) {
                    (false, _) => f32::NEG_INFINITY,
                    (true, false) => PAD_SCORE,
                    (true, true) => 0.0,
                })
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (padding.len(), 1, rows, s), device)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The chunked path equals one full softmax over the masked score matrix.
    #[test]
    fn chunked_equals_unchunked() {
        let dev = Device::Cpu;
        let (b, h, past, t, hd) = (1, 2, 3, 700, 8);
        let s = past + t;
        let q = Tensor::randn(0f32, 1., (b, h, t, hd), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, h, s, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, h, s, hd), &dev).unwrap();
        let got = attention_in_chunks(&q, &k, &v, past, &[0], 64).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let scores = scores.broadcast_add(&causal_mask(past, t, s, &dev).unwrap()).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
