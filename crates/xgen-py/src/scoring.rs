//! Scoring helpers: every position's logits, and the sliding window `nll` scores with.

use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::{exceptions::PyValueError, PyResult};
use xgen_model::{perplexity::Window, Model, ModelError, Tensor};

/// The f32 logits of every position of `ids`, row-major `[len, vocab]`, computed in steps of the
/// model's prefill chunk (checking `cancel` between steps).
pub fn logits(model: &Model, ids: &[u32], cancel: &AtomicBool) -> Result<Vec<f32>, ModelError> {
    let context = model.config().max_position_embeddings;
    if ids.len() > context {
        return Err(ModelError::CacheFull { positions: ids.len(), capacity: context });
    }
    let mut cache = model.new_cache(1, ids.len())?;
    let mut out = Vec::with_capacity(ids.len() * model.config().vocab_size);
    for chunk in ids.chunks(model.prefill_chunk()) {
        if cancel.load(Ordering::Relaxed) {
            return Err(ModelError::Cancelled);
        }
        let input = Tensor::new(chunk, model.device())?.unsqueeze(0)?; // [1, len]
        let hidden = model.forward_hidden(&input, &mut cache)?; // [1, len, d]
        let logits = model.logits(&hidden.squeeze(0)?)?; // [len, v] f32
        out.extend(logits.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// The window and stride for scoring `tokens` tokens: `size` (default and maximum: the model's
/// `context`) and `stride` (default: half the window), checked.
pub fn window(context: usize, tokens: usize, size: Option<usize>, stride: Option<usize>) -> PyResult<Window> {
    if tokens < 2 {
        return Err(PyValueError::new_err(format!("perplexity needs at least 2 tokens, got {tokens}")));
    }
    let size = size.unwrap_or(context);
    if size < 2 || size > context {
        return Err(PyValueError::new_err(format!(
            "window {size} must be in 2..={context} (the model's context)"
        )));
    }
    let stride = stride.unwrap_or(size / 2);
    if stride == 0 || stride >= size {
        return Err(PyValueError::new_err(format!(
            "stride {stride} must be in 1..{size} (below the window)"
        )));
    }
    Ok(Window { size, stride })
}
