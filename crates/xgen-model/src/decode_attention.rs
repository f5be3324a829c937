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
        #[cfg(target_arch = "x86_64")]
        (CpuStorage::F16(k), CpuStorage::F16(v)) if x86::applies(hd) => {
            x86::run(&qs, bits(&k[ko..]), bits(&v[vo..]), x86::Widen::F16, &shape, padding, &mut out)
        }
        #[cfg(target_arch = "x86_64")]
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) if x86::applies(hd) => {
            x86::run(&qs, bits(&k[ko..]), bits(&v[vo..]), x86::Widen::Bf16, &shape, padding, &mut out)
        }
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

/// The bit patterns of 16-bit floats.
#[cfg(target_arch = "x86_64")]
fn bits<T: Copy>(s: &[T]) -> &[u16] {
    assert_eq!(std::mem::size_of::<T>(), 2);
    // SAFETY: T is f16 or bf16, `#[repr(transparent)]` wrappers of u16 (size checked above).
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
}

/// AVX-512 per-head kernel for 16-bit caches with head_dim 64 or 128: the query (scaled) and
/// the output stay in registers; each cached row is widened in registers and prefetched a few
/// rows ahead. `run` above stays the reference path (and the test compares both to
/// `causal_attention`). At 4096 cached positions the generic path read the f16 cache at about
/// 10 GB/s (widening each row into a buffer, the output accumulated through memory).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::Shape;

    #[derive(Clone, Copy)]
    pub enum Widen {
        F16,
        Bf16,
    }

    pub fn applies(hd: usize) -> bool {
        matches!(hd, 64 | 128) && is_x86_feature_detected!("avx512f")
    }

    pub fn run(
        qs: &[f32],
        k: &[u16],
        v: &[u16],
        widen: Widen,
        s: &Shape,
        padding: &[usize],
        out: &mut [f32],
    ) {
        let (hd, n_rep) = (s.hd, s.h / s.kv_h);
        out.par_chunks_mut(hd).enumerate().for_each(|(bh, o)| {
            let (bi, head) = (bh / s.h, bh % s.h);
            let base = (bi * s.kv_h + head / n_rep) * s.capacity * hd;
            let (k, v) = (&k[base..base + s.len * hd], &v[base..base + s.len * hd]);
            let q = &qs[bh * hd..(bh + 1) * hd];
            let first = padding.get(bi).copied().unwrap_or(0).min(s.len.saturating_sub(1));
            // SAFETY: `applies` checked AVX-512F; k and v hold `len` rows of `hd`.
            unsafe {
                match hd {
                    64 => one_head::<4>(q, k, v, first, widen, o),
                    _ => one_head::<8>(q, k, v, first, widen, o),
                }
            }
        });
    }

    /// 16 cached values at `p`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const u16, widen: Widen) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values.
        let raw = unsafe { _mm256_loadu_si256(p.cast()) };
        match widen {
            Widen::F16 => _mm512_cvtph_ps(raw),
            Widen::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw))),
        }
    }

    /// One head: rows `first..` of `k`/`v` (`C` × 16 values each).
    #[target_feature(enable = "avx512f")]
    unsafe fn one_head<const C: usize>(
        q: &[f32],
        k: &[u16],
        v: &[u16],
        first: usize,
        widen: Widen,
        o: &mut [f32],
    ) {
        let hd = 16 * C;
        let len = k.len() / hd;
        let scale = _mm512_set1_ps(1.0 / (hd as f32).sqrt());
        // SAFETY (all loads and prefetches): rows `first..len` are within k and v; prefetches
        // may point past them (harmless).
        let qv: [__m512; C] =
            std::array::from_fn(|c| unsafe { _mm512_mul_ps(_mm512_loadu_ps(q.as_ptr().add(16 * c)), scale) });
        let scores: Vec<f32> = (first..len)
            .map(|j| {
                let row = unsafe { k.as_ptr().add(j * hd) };
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(8 * hd).cast());
                let mut acc = [_mm512_setzero_ps(); 2];
                for c in 0..C {
                    acc[c % 2] =
                        _mm512_fmadd_ps(unsafe { load16(row.add(16 * c), widen) }, qv[c], acc[c % 2]);
                }
                _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut acc = [_mm512_setzero_ps(); C];
        for (j, &w) in (first..len).zip(&weights) {
            let row = unsafe { v.as_ptr().add(j * hd) };
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(8 * hd).cast());
            let p = _mm512_set1_ps(w / total);
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(unsafe { load16(row.add(16 * c), widen) }, p, *a);
            }
        }
        for (c, a) in acc.iter().enumerate() {
            // SAFETY: o holds hd = 16 · C values.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), *a) };
        }
    }
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
                (1, 4, 4, 128, 300, 290, vec![0]),
                (2, 4, 2, 64, 40, 33, vec![5, 0]),
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
