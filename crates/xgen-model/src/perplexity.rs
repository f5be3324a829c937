//! Next-token log-likelihood of a token sequence: per-position log-probabilities, mean NLL and
//! perplexity (transformers' causal-LM loss with `labels = input_ids`), with a strided sliding
//! window for sequences longer than the context.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Tensor;

use crate::{
    error::{ModelError, Result},
    kv_cache::KvCache,
    model::Model,
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
    score_until(model, ids, window, &AtomicBool::new(false))
}

/// [`score`], stopping with [`ModelError::Cancelled`] once `cancel` is set (checked between
/// forward steps): how a caller on another thread interrupts a long sequence.
pub fn score_until(model: &Model, ids: &[u32], window: Window, cancel: &AtomicBool) -> Result<Perplexity> {
    score_with(model, ids, window, &mut |_| match cancel.load(Ordering::Relaxed) {
        true => Err(ModelError::Cancelled),
        false => Ok(()),
    })
}

/// [`score`], calling `progress` with the number of tokens scored after each forward step (an
/// error from it stops the scoring).
pub fn score_with(model: &Model, ids: &[u32], window: Window, progress: &mut Progress) -> Result<Perplexity> {
    let mut logprobs = Vec::with_capacity(ids.len().saturating_sub(1));
    let windows = for_each_scored_chunk(&[model], ids, window, &mut |logits, targets| {
        let rows: Vec<Vec<f32>> = logits[0].to_vec2()?; // [r, v]
        logprobs.extend(rows.iter().zip(targets).map(|(row, &t)| log_softmax_at(row, t as usize)));
        progress(targets.len())
    })?;
    Ok(Perplexity::of(ids.len(), logprobs, windows))
}

/// Told how many tokens each forward step scored; may stop the scoring with an error.
pub type Progress<'a> = dyn FnMut(usize) -> Result<()> + 'a;

impl Perplexity {
    fn of(tokens: usize, logprobs: Vec<f32>, windows: usize) -> Self {
        let mean_nll = -logprobs.iter().map(|&l| l as f64).sum::<f64>() / logprobs.len() as f64;
        Self { tokens, logprobs, mean_nll, perplexity: mean_nll.exp(), windows }
    }
}

/// `log Σ exp(row)`, accumulated in f64: the normalizer of every log-probability xgen reports
/// (perplexity, `Model.nll`, the servers' prompt and token logprobs), so they agree to the bit
/// for the same logits.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// `log softmax(row)[i]` in f32, against [`log_sum_exp`].
pub fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    (row[i] as f64 - log_sum_exp(row)) as f32
}

/// How closely a model's next-token distributions follow a reference model's (for quantization).
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    /// Positions compared (each predicting the next token).
    pub positions: usize,
    /// Mean KL(reference ‖ candidate) in nats.
    pub mean_kl: f64,
    /// Fraction of positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
}

/// Compares `candidate` with `reference` at every position of `ids` (same windows as [`score`]).
pub fn compare(reference: &Model, candidate: &Model, ids: &[u32], window: Window) -> Result<Agreement> {
    Ok(evaluate(reference, candidate, ids, window, &mut |_| Ok(()))?.1)
}

/// The candidate's perplexity and its agreement with `reference`, in one pass over the windows
/// of `ids` (both models run side by side); `progress` as for [`score_with`].
pub fn evaluate(
    reference: &Model,
    candidate: &Model,
    ids: &[u32],
    window: Window,
    progress: &mut Progress,
) -> Result<(Perplexity, Agreement)> {
    let (mut kl, mut agree, mut logprobs) = (0.0f64, 0usize, Vec::with_capacity(ids.len()));
    let windows = for_each_scored_chunk(&[reference, candidate], ids, window, &mut |logits, targets| {
        let p: Vec<Vec<f32>> = logits[0].to_vec2()?; // [r, v]
        let q: Vec<Vec<f32>> = logits[1].to_vec2()?; // [r, v]
        for ((p, q), &t) in p.iter().zip(&q).zip(targets) {
            let (lse_p, lse_q) = (log_sum_exp(p), log_sum_exp(q));
            // KL(p ‖ q) = Σ p (log p - log q), with log p = x - lse.
            kl += p
                .iter()
                .zip(q)
                .map(|(&a, &b)| {
                    let lp = a as f64 - lse_p;
                    lp.exp() * (lp - (b as f64 - lse_q))
                })
                .sum::<f64>();
            agree += usize::from(argmax(p) == argmax(q));
            logprobs.push((q[t as usize] as f64 - lse_q) as f32);
        }
        progress(targets.len())
    })?;
    let positions = logprobs.len();
    let n = positions.max(1) as f64;
    let agreement = Agreement { positions, mean_kl: kl / n, top1_agreement: agree as f64 / n };
    Ok((Perplexity::of(ids.len(), logprobs, windows), agreement))
}

/// The index of the largest entry (the first of equal ones).
fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
        .0
}

/// Receives each chunk's f32 logits (one `[r, v]` tensor per model) and its `r` target ids.
type ChunkVisitor<'a> = dyn FnMut(&[Tensor], &[u32]) -> Result<()> + 'a;

/// Runs `models` side by side over the windows of `ids` and hands `f` each chunk's f32 logits
/// (`[r, v]`, one tensor per model) for the positions whose next token (`targets`, `r` of them)
/// no earlier window scored. Returns the number of windows.
fn for_each_scored_chunk(
    models: &[&Model],
    ids: &[u32],
    window: Window,
    f: &mut ChunkVisitor,
) -> Result<usize> {
    let context = models.iter().map(|m| m.config().max_position_embeddings).min().unwrap_or(0);
    if window.size < 2 || window.size > context {
        return Err(ModelError::field("window", format!("size {} must be in 2..={context}", window.size)));
    }
    if window.stride == 0 || window.stride >= window.size {
        return Err(ModelError::field("stride", format!("{} must be in 1..{}", window.stride, window.size)));
    }
    let mut caches = Vec::with_capacity(models.len());
    for m in models {
        m.check_ids(ids)?;
        caches.push(m.new_cache(1, window.size.min(ids.len()))?);
    }
    let mut windows = 0;
    // Window `begin..end` scores targets `next..end`; `begin < next` since stride < size.
    let (mut begin, mut next) = (0, 1);
    while next < ids.len() {
        let end = (begin + window.size).min(ids.len());
        caches.iter_mut().for_each(KvCache::clear);
        let w = &ids[begin..end];
        let first = next - begin;
        let step = models.iter().map(|m| m.prefill_chunk()).min().unwrap_or(1);
        for start in (0..w.len() - 1).step_by(step) {
            let len = step.min(w.len() - 1 - start);
            // Row j predicts w[start + j + 1]; keep rows whose target is at or after `first`.
            let skip = first.saturating_sub(start + 1).min(len);
            let mut logits = Vec::with_capacity(models.len());
            for (m, cache) in models.iter().zip(caches.iter_mut()) {
                let input = Tensor::new(&w[start..start + len], m.device())?.unsqueeze(0)?; // [1, len]
                let hidden = m.forward_hidden(&input, cache)?; // [1, len, d]
                if skip < len {
                    logits.push(m.logits(&hidden.narrow(1, skip, len - skip)?.squeeze(0)?)?);
                    // [r, v]
                }
            }
            if skip < len {
                f(&logits, &w[start + skip + 1..start + len + 1])?;
            }
        }
        windows += 1;
        next = end;
        begin += window.stride;
    }
    Ok(windows)
}
