//! Attention of one new query per sequence over the whole KV cache, on the CPU: the decode step.
//!
//! The general path (`attention::causal_attention`) converts all cached keys and values to f32
//! and runs candle matmuls over strided views; at 4096 cached positions that dominated a decode
//! step (a q8_0 7B fell from 3.4 to 0.27 tok/s). Here each head reads its keys and values once,
//! straight from the cache buffers `[b, kv_h, capacity, hd]` in their stored dtype, widening in
//! registers: scores `q·k_j / √hd` in f32, a softmax, and `Σ p_j v_j`. Heads run in parallel.
//! `causal_attention` is the reference in the test.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::error::Result;

/// Lanes of independent f32 accumulators (lets the compiler vectorise the reductions).
const LANES: usize = 16;

/// `q` `[b, h, 1, hd]` against positions `padding[i]..len` of `keys`/`values`
/// (`[b, kv_h, capacity, hd]`, contiguous) -> `[b, h, 1, hd]` f32. `None` when not applicable
/// (not on the CPU, or an unsupported dtype).
pub fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    len: usize,
    padding: &[usize],
) -> Result<Option<Tensor>> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, kv_h, capacity, _) = keys.dims4()?;
    if t != 1 || !matches!(q.device(), Device::Cpu) || !keys.is_contiguous() || !values.is_contiguous() {
        return Ok(None);
    }
    let qs: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else { return Ok(None) };
    let shape = Shape { h, kv_h, capacity, hd, len };
    let mut out = vec![0f32; b * h * hd];
    let (ko, vo) = (kl.start_offset(), vl.start_offset());
    match (kc, vc) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => run(
            &qs,
            &k[ko..],
            &v[vo..],
            |s: &[f32], d: &mut [f32]| d.copy_from_slice(s),
            &shape,
            padding,
            &mut out,
        ),
        (CpuStorage::F16(k), CpuStorage::F16(v)) => run(
            &qs,
            &k[ko..],
            &v[vo..],
            |s: &[f16], d: &mut [f32]| s.convert_to_f32_slice(d),
            &shape,
            padding,
            &mut out,
        ),
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => run(
            &qs,
            &k[ko..],
            &v[vo..],
            |s: &[bf16], d: &mut [f32]| s.convert_to_f32_slice(d),
            &shape,
            padding,
            &mut out,
        ),
        _ => return Ok(None),
    }
    Ok(Some(Tensor::from_vec(out, (b, h, 1, hd), q.device())?))
}

struct Shape {
    h: usize,
    kv_h: usize,
    capacity: usize,
    hd: usize,
    len: usize,
}

/// `widen` converts a row of cached values to f32 (SIMD conversions where the CPU has them).
fn run<T: Copy + Send + Sync>(
    qs: &[f32],
    k: &[T],
    v: &[T],
    widen: impl Fn(&[T], &mut [f32]) + Sync,
    s: &Shape,
    padding: &[usize],
    out: &mut [f32],
) {
    let (hd, n_rep) = (s.hd, s.h / s.kv_h);
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| {
        let (bi, head) = (bh / s.h, bh % s.h);
        let base = (bi * s.kv_h + head / n_rep) * s.capacity * hd;
        let q = &qs[bh * hd..(bh + 1) * hd];
        let first = padding.get(bi).copied().unwrap_or(0).min(s.len.saturating_sub(1));
        let rows = |j: usize| base + j * hd..base + (j + 1) * hd;
        let mut row = vec![0f32; hd];
        let scores: Vec<f32> = (first..s.len)
            .map(|j| {
                widen(&k[rows(j)], &mut row);
                dot(q, &row) * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        o.fill(0.0);
        for (j, &w) in (first..s.len).zip(&weights) {
            let p = w / total;
            widen(&v[rows(j)], &mut row);
            for (a, &x) in o.iter_mut().zip(&row) {
                *a += p * x;
            }
        }
    });
}

fn dot(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut qc = q.chunks_exact(LANES);
    let mut kc = k.chunks_exact(LANES);
    for (qq, kk) in (&mut qc).zip(&mut kc) {
        for l in 0..LANES {
            acc[l] += qq[l] * kk[l];
        }
    }
    let tail: f32 = qc.remainder().iter().zip(kc.remainder()).map(|(&a, &b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::causal_attention;

    #[test]
    fn equals_the_reference_attention() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (b, h, kv_h, hd, capacity, len, padding) in [
                (1, 4, 4, 16, 50, 37, vec![0]),
                (2, 4, 2, 20, 64, 64, vec![3, 0]),
                (1, 2, 1, 8, 9, 1, vec![0]),
            ] {
                let q = Tensor::randn(0f32, 1., (b, h, 1, hd), &dev).unwrap().to_dtype(dtype).unwrap();
                let k =
                    Tensor::randn(0f32, 1., (b, kv_h, capacity, hd), &dev).unwrap().to_dtype(dtype).unwrap();
                let v =
                    Tensor::randn(0f32, 1., (b, kv_h, capacity, hd), &dev).unwrap().to_dtype(dtype).unwrap();
                let got = decode_attention(&q, &k, &v, len, &padding).unwrap().expect("applies on the CPU");
                let n_rep = h / kv_h;
                let rep = |x: &Tensor| {
                    let x = x.narrow(2, 0, len).unwrap();
                    let (b, kv, s, d) = x.dims4().unwrap();
                    x.unsqueeze(2)
                        .unwrap()
                        .expand((b, kv, n_rep, s, d))
                        .unwrap()
                        .reshape((b, kv * n_rep, s, d))
                        .unwrap()
                };
                let want = causal_attention(&q, &rep(&k), &rep(&v), len - 1, &padding).unwrap();
                let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 1e-4, "{dtype:?} b{b} h{h}/{kv_h} len {len}: {err}");
            }
        }
    }
}
