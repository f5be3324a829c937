//! Next-token log-likelihood of a token sequence: per-position log-probabilities, mean NLL and
//! perplexity (transformers' causal-LM loss with `labels = input_ids`), with a strided sliding
//! window for sequences longer than the context.

use candle_core::{DType, Tensor, D};

use crate::{
    error::{ModelError, Result},
    model::{Model, PREFILL_CHUNK},
};

/// How a sequence longer than the window is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Tokens of context per forward pass (at most the model's context).
    pub size: usize,
    /// How far each window starts after the previous one (`1..size`, so windows overlap).
    pub stride: usize,
}

/// The result of scoring a sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// Tokens in the sequence.
    pub tokens: usize,
    /// `log p(ids[i] | context)` for i = 1..n, natural log; `tokens - 1` values.
    pub logprobs: Vec<f32>,
    /// Mean negative log-likelihood over `logprobs`, accumulated in f64 (NaN for one token).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Forward windows used (1 when the sequence fits the context).
    pub windows: usize,
}

/// Scores `ids`: each token from position 1 on is predicted once. A sequence that fits
/// `window.size` is one pass; otherwise windows of `window.size` tokens start every
/// `window.stride` tokens and each scores the tokens that no earlier window scored, so every token
/// keeps at least `size - stride` tokens of context.
pub fn score(model: &Model, ids: &[u32], window: Window) -> Result<Perplexity> {
    if window.size < 2 || window.size > model.config().max_position_embeddings {
        return Err(ModelError::field(
            "window",
            format!("size {} must be in 2..={}", window.size, model.config().max_position_embeddings),
        ));
    }
    if window.stride == 0 || window.stride >= window.size {
        return Err(ModelError::field("stride", format!("{} must be in 1..{}", window.stride, window.size)));
    }
    model.ids_tensor(ids)?;
    let mut logprobs = Vec::with_capacity(ids.len().saturating_sub(1));
    let mut cache = model.new_cache(1, window.size.min(ids.len()))?;
    let mut windows = 0;
    // Window `begin..end` scores targets `next..end`; `begin < next` since stride < size.
    let (mut begin, mut next) = (0, 1);
    while next < ids.len() {
        let end = (begin + window.size).min(ids.len());
        cache.clear();
        logprobs.extend(window_logprobs(model, &ids[begin..end], next - begin, &mut cache)?);
        windows += 1;
        next = end;
        begin += window.stride;
    }
    let mean_nll = -logprobs.iter().map(|&l| l as f64).sum::<f64>() / logprobs.len() as f64;
    Ok(Perplexity { tokens: ids.len(), logprobs, mean_nll, perplexity: mean_nll.exp(), windows })
}

/// Log-probabilities of `ids[first..]`, each given the tokens of `ids` before it.
fn window_logprobs(model: &Model, ids: &[u32], first: usize, cache: &mut crate::KvCache) -> Result<Vec<f32>> {
    let input = model.ids_tensor(ids)?; // [1, n]
    let mut out = Vec::with_capacity(ids.len() - first);
    for start in (0..ids.len() - 1).step_by(PREFILL_CHUNK) {
        let len = PREFILL_CHUNK.min(ids.len() - 1 - start);
        let hidden = model.forward_hidden(&input.narrow(1, start, len)?, cache)?; // [1, len, d]
                                                                                  // Row j predicts ids[start + j + 1]; keep rows whose target is at or after `first`.
        let skip = first.saturating_sub(start + 1).min(len);
        if skip == len {
            continue;
        }
        let hidden = hidden.narrow(1, skip, len - skip)?.squeeze(0)?; // [r, d]
        let targets: Vec<u32> = ids[start + skip + 1..start + len + 1].to_vec();
        let targets = Tensor::new(targets.as_slice(), model.device())?.unsqueeze(1)?; // [r, 1]
        let logits = model.logits(&hidden)?; // [r, v] f32
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?.gather(&targets, 1)?; // [r, 1]
        out.extend(lp.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(out)
}
