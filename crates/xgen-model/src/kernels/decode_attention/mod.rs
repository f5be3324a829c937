//! Attention of a few new queries per sequence over the whole KV cache, on the CPU: the decode
//! step (one query) and a speculative verify step (up to [`FEW_QUERIES`] new positions).
//!
//! The general path (`attention::causal_attention`) converts all cached keys and values to f32
//! and runs candle matmuls over strided views; at 4096 cached positions that dominated a decode
//! step (a q8_0 7B fell from 3.4 to 0.27 tok/s). Here each head reads its keys and values once,
//! straight from the cache buffers `[b, kv_h, capacity, hd]` in their stored dtype, widening in
//! registers: scores `q·k_j / √hd` in f32, a softmax, and `Σ p_j v_j`. Key/value heads run in
//! parallel (on the calling thread when the step reads little of the cache). Rows are found
//! through the block tables ([`Paging`]): a table lookup per row, nothing copied.
//!
//! Every query that shares a key/value head (the `t` new positions, and under grouped-query
//! attention the `h / kv_h` query heads) is served by one task that reads each cached row once
//! for all of them. Invariant: each query's arithmetic is the same, operation for operation, as
//! when it is the only query (the new position `past + i` sees `past + i + 1` positions), so a
//! verify step's attention equals that of the single steps it stands for, bit for bit.
//! `causal_attention` is the reference in the test.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::paging::Paging;
use crate::{error::Result, kv_cache::KvBuffer};

/// Lanes of independent f32 accumulators (lets the compiler vectorise the reductions).
const LANES: usize = 16;

/// New positions per sequence that this kernel takes (a verify step's rows); longer chunks are
/// prompts, for [`super::prompt_attention`].
pub const FEW_QUERIES: usize = 16;

/// `q` `[b, h, t, hd]` (t ≤ [`FEW_QUERIES`]) at positions `len - t..len` against positions
/// `padding[i]..` of `keys`/`values` (`[blocks, kv_h, block, ..]`, sequence `i`'s positions where
/// `paging` says), causal -> `[b, h, t, hd]` f32. `None` when not applicable (too many query rows,
/// a padded row whose queries see only padding, not on the CPU, or an unsupported dtype).
pub fn decode_attention(
    q: &Tensor,
    keys: &KvBuffer,
    values: &KvBuffer,
    paging: &Paging,
    len: usize,
    padding: &[usize],
) -> Result<Option<Tensor>> {
    decode_attention_on(Kernel::detect(), q, keys, values, paging, len, padding)
}

/// Which per-head kernel runs: a SIMD one where the CPU has it (and the shape suits it, see
/// `x86::applies`), else the portable reference. Tests force each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Simd(x86::Simd),
}

impl Kernel {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = x86::Simd::detect() {
            return Self::Simd(simd);
        }
        Self::Portable
    }

    /// The SIMD kernel for head width `hd` over `paging`, if this one is SIMD and takes them.
    #[cfg(target_arch = "x86_64")]
    fn simd(self, hd: usize, paging: &Paging) -> Option<x86::Simd> {
        match self {
            Self::Simd(simd) if x86::applies(hd, paging) => Some(simd),
            _ => None,
        }
    }
}

/// [`decode_attention`] on `kernel`.
fn decode_attention_on(
    kernel: Kernel,
    q: &Tensor,
    keys: &KvBuffer,
    values: &KvBuffer,
    paging: &Paging,
    len: usize,
    padding: &[usize],
) -> Result<Option<Tensor>> {
    let (b, h, t, hd) = q.dims4()?;
    let first_len = len + 1 - t.min(len);
    if t == 0
        || t > FEW_QUERIES
        || t > len
        || padding.iter().any(|&p| t > 1 && p >= first_len)
        || !matches!(q.device(), Device::Cpu)
        || !paging.reads(keys.rows(), b, len)
        || values.dims() != keys.dims()
    {
        return Ok(None);
    }
    let qs: Vec<f32> = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let shape = Shape { h, hd, len, t };
    let out = match (keys, values) {
        (KvBuffer::Float(k), KvBuffer::Float(v)) => float_cache(kernel, &qs, k, v, paging, &shape, padding)?,
        (KvBuffer::Q8_0 { q: kq, d: kd }, KvBuffer::Q8_0 { q: vq, d: vd }) => {
            q8_cache(kernel, &qs, [kq, kd, vq, vd], paging, &shape, padding)?
        }
        _ => None,
    };
    out.map(|o| Ok(Tensor::from_vec(o, (b, h, t, hd), q.device())?)).transpose()
}

/// A float cache (`[blocks, kv_h, block, hd]` each): the per-head SIMD kernel for 16-bit caches
/// where the CPU has one, else [`run`].
fn float_cache(
    kernel: Kernel,
    qs: &[f32],
    keys: &Tensor,
    values: &Tensor,
    paging: &Paging,
    shape: &Shape,
    padding: &[usize],
) -> Result<Option<Vec<f32>>> {
    let hd = shape.hd;
    if !keys.is_contiguous() || !values.is_contiguous() {
        return Ok(None);
    }
    let (ks, kl) = keys.storage_and_layout();
    let (vs, vl) = values.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else { return Ok(None) };
    let mut out = vec![0f32; qs.len()];
    let (ko, vo) = (kl.start_offset(), vl.start_offset());
    // Row `r` (flat index over [blocks, kv_h, block]) of a slice, widened by `f`.
    fn rows<'a, T>(
        x: &'a [T],
        hd: usize,
        f: impl Fn(&[T], &mut [f32]) + Sync + 'a,
    ) -> impl Fn(usize, &mut [f32]) + Sync + 'a
    where
        T: Sync,
    {
        move |r, d| f(&x[r * hd..(r + 1) * hd], d)
    }
    let copy = |s: &[f32], d: &mut [f32]| d.copy_from_slice(s);
    let f16s = |s: &[f16], d: &mut [f32]| s.convert_to_f32_slice(d);
    let bf16s = |s: &[bf16], d: &mut [f32]| s.convert_to_f32_slice(d);
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = kernel.simd(hd, paging) {
        match (kc, vc) {
            (CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let rows = (x86::HalfRows::<false>(bits(&k[ko..])), x86::HalfRows::<false>(bits(&v[vo..])));
                x86::run(simd, qs, rows, paging, shape, padding, &mut out);
                return Ok(Some(out));
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let rows = (x86::HalfRows::<true>(bits(&k[ko..])), x86::HalfRows::<true>(bits(&v[vo..])));
                x86::run(simd, qs, rows, paging, shape, padding, &mut out);
                return Ok(Some(out));
            }
            _ => {}
        }
    }
    match (kc, vc) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => {
            run(qs, rows(&k[ko..], hd, copy), rows(&v[vo..], hd, copy), paging, shape, padding, &mut out)
        }
        (CpuStorage::F16(k), CpuStorage::F16(v)) => {
            run(qs, rows(&k[ko..], hd, f16s), rows(&v[vo..], hd, f16s), paging, shape, padding, &mut out)
        }
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
            run(qs, rows(&k[ko..], hd, bf16s), rows(&v[vo..], hd, bf16s), paging, shape, padding, &mut out)
        }
        _ => return Ok(None),
    }
    Ok(Some(out))
}

/// A q8_0 cache: `[kq, kd, vq, vd]`, quants `[blocks, kv_h, block, hd]` u8 (`+ 128`) and scales
/// `[blocks, kv_h, block, hd / 32]` f16; rows dequantized one at a time into [`run`].
fn q8_cache(
    kernel: Kernel,
    qs: &[f32],
    [kq, kd, vq, vd]: [&Tensor; 4],
    paging: &Paging,
    shape: &Shape,
    padding: &[usize],
) -> Result<Option<Vec<f32>>> {
    let hd = shape.hd;
    let storages = [kq, kd, vq, vd].map(|t| t.storage_and_layout());
    let [(kqs, kql), (kds, kdl), (vqs, vql), (vds, vdl)] = &storages;
    let (Storage::Cpu(CpuStorage::U8(kq)), Storage::Cpu(CpuStorage::F16(kd))) = (&**kqs, &**kds) else {
        return Ok(None);
    };
    let (Storage::Cpu(CpuStorage::U8(vq)), Storage::Cpu(CpuStorage::F16(vd))) = (&**vqs, &**vds) else {
        return Ok(None);
    };
    let (kq, kd) = (&kq[kql.start_offset()..], &kd[kdl.start_offset()..]);
    let (vq, vd) = (&vq[vql.start_offset()..], &vd[vdl.start_offset()..]);
    fn dequant<'a>(q: &'a [u8], d: &'a [f16], hd: usize) -> impl Fn(usize, &mut [f32]) + Sync + 'a {
        let nb = hd / 32;
        move |r, out| {
            let (q, d) = (&q[r * hd..(r + 1) * hd], &d[r * nb..(r + 1) * nb]);
            for ((o, q), d) in out.chunks_exact_mut(32).zip(q.chunks_exact(32)).zip(d) {
                let d = d.to_f32();
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = (q as i32 - 128) as f32 * d;
                }
            }
        }
    }
    let mut out = vec![0f32; qs.len()];
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = kernel.simd(hd, paging) {
        let (kd, vd) = (bits(kd), bits(vd));
        let rows = (x86::Q8Rows { q: kq, d: kd }, x86::Q8Rows { q: vq, d: vd });
        x86::run(simd, qs, rows, paging, shape, padding, &mut out);
        return Ok(Some(out));
    }
    run(qs, dequant(kq, kd, hd), dequant(vq, vd, hd), paging, shape, padding, &mut out);
    Ok(Some(out))
}

/// Query heads, head width, cached positions after the step, new positions (queries per head).
struct Shape {
    h: usize,
    hd: usize,
    len: usize,
    t: usize,
}

impl Shape {
    /// Query rows (`[b, h, t]` flattened) served together: those of one key/value head.
    fn group(&self, kv_h: usize) -> usize {
        self.h / kv_h * self.t
    }

    /// Group `g` (flat over `[b, kv_h]`): its sequence, and each query's positions seen
    /// (`len - t + i + 1` for new position `i`), in the order of the group's query rows.
    fn queries(&self, g: usize, kv_h: usize) -> (usize, Vec<usize>) {
        let bi = g / kv_h;
        let lens = (0..self.group(kv_h)).map(|q| self.len - self.t + q % self.t + 1).collect();
        (bi, lens)
    }
}

/// `key(r, row)` and `value(r, row)` write cached row `r` (flat index over `[blocks, kv_h,
/// block]`) as f32 into `row`. Each query reads the rows itself (the portable reference).
fn run(
    qs: &[f32],
    key: impl Fn(usize, &mut [f32]) + Sync,
    value: impl Fn(usize, &mut [f32]) + Sync,
    paging: &Paging,
    s: &Shape,
    padding: &[usize],
    out: &mut [f32],
) {
    let (hd, kv_h) = (s.hd, paging.kv_h);
    let scale = 1.0 / (hd as f32).sqrt();
    let group = s.group(kv_h) * hd;
    out.par_chunks_mut(group).enumerate().for_each(|(g, o)| {
        let (bi, lens) = s.queries(g, kv_h);
        let at = |j: usize| paging.row(bi, g % kv_h, j);
        for ((qi, o), len) in o.chunks_mut(hd).enumerate().zip(lens) {
            let q = &qs[g * group + qi * hd..][..hd];
            let first = padding.get(bi).copied().unwrap_or(0).min(len - 1);
            let mut row = vec![0f32; hd];
            let scores: Vec<f32> = (first..len)
                .map(|j| {
                    key(at(j), &mut row);
                    dot(q, &row) * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|&x| (x - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            o.fill(0.0);
            for (j, &w) in (first..len).zip(&weights) {
                let p = w / total;
                value(at(j), &mut row);
                for (a, &x) in o.iter_mut().zip(&row) {
                    *a += p * x;
                }
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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod x86;

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
    use crate::KvType;
    use crate::{
        attention::grouped_causal_attention,
        kernels::paging::{scatter, scatter_buffer},
    };

    /// Every kernel this CPU runs (the SIMD ones decline head widths they do not take).
    fn kernels() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        kernels.extend(x86::Simd::available().into_iter().map(Kernel::Simd));
        kernels
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// `causal_attention` of the last `t` queries (`q` `[b, h, t, hd]`) over `k`, `v`
    /// `[b, kv_h, len, hd]`, each key/value head shared by `h / kv_h` query heads.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, padding: &[usize]) -> Tensor {
        grouped_causal_attention(q, k, v, k.dim(2).unwrap() - q.dim(2).unwrap(), padding).unwrap()
    }

    #[test]
    fn equals_the_reference_attention() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (b, h, kv_h, hd, capacity, len, padding, t) in [
                (1, 4, 4, 16, 50, 37, vec![0], 1),
                (2, 4, 2, 20, 64, 64, vec![3, 0], 1),
                (2, 4, 2, 20, 64, 64, vec![3, 0], 5),
                (1, 2, 1, 8, 9, 1, vec![0], 1),
                (1, 4, 4, 128, 300, 290, vec![0], 1),
                (1, 4, 4, 128, 300, 290, vec![0], 16),
                (2, 4, 2, 64, 40, 33, vec![5, 0], 1),
                (2, 4, 2, 64, 40, 33, vec![5, 0], 9),
                (1, 6, 2, 64, 40, 16, vec![0], 16),
            ] {
                let q = Tensor::randn(0f32, 1., (b, h, t, hd), &dev).unwrap().to_dtype(dtype).unwrap();
                let k =
                    Tensor::randn(0f32, 1., (b, kv_h, capacity, hd), &dev).unwrap().to_dtype(dtype).unwrap();
                let v =
                    Tensor::randn(0f32, 1., (b, kv_h, capacity, hd), &dev).unwrap().to_dtype(dtype).unwrap();
                let at = |x: &Tensor| x.narrow(2, 0, len).unwrap();
                let want = reference(&q, &at(&k), &at(&v), &padding);
                // As one block per sequence, and scattered over blocks of 16 positions.
                let tables = Paging::identity(b);
                let (kb, vb) = (KvBuffer::Float(k.clone()), KvBuffer::Float(v.clone()));
                let contiguous = Paging::contiguous(&tables, capacity, kv_h);
                let ((ks, tables16, slots), (vs, _, _)) = (scatter(&k, 16), scatter(&v, 16));
                let (ksb, vsb) = (KvBuffer::Float(ks), KvBuffer::Float(vs));
                let paged = Paging::pooled(&tables16, 16, slots, kv_h);
                for (kb, vb, paging) in [(&kb, &vb, contiguous), (&ksb, &vsb, paged)] {
                    for kernel in kernels() {
                        let got = decode_attention_on(kernel, &q, kb, vb, &paging, len, &padding);
                        let err = max_diff(&got.unwrap().expect("applies"), &want);
                        assert!(
                            err < 1e-4,
                            "{kernel:?} {dtype:?} b{b} h{h}/{kv_h} t{t} len {len} block {}: {err}",
                            paging.block
                        );
                    }
                }
            }
        }
    }

    /// The module's invariant: `t` new positions at once give, bit for bit, what `t` one-query
    /// steps give (the query at position `len - t + i` over `len - t + i + 1` positions), on the
    /// SIMD path (head width 64, 128) and the portable one (20), for 16-bit and q8_0 caches. On
    /// two threads, so that 3 key/value heads split their 24 queries in two tasks each (the
    /// single steps do not).
    #[test]
    fn few_queries_equal_single_steps_exactly() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(few_queries_equal_single_steps);
    }

    fn few_queries_equal_single_steps() {
        let dev = Device::Cpu;
        let kinds = [KvType::Float(DType::F16), KvType::Float(DType::BF16), KvType::Q8_0];
        let shapes = [(4, 4, 128, 70, 7), (6, 2, 64, 40, 16), (4, 2, 32, 33, 3), (9, 3, 64, 300, 8)];
        for (kind, (h, kv_h, hd, len, t)) in kinds.iter().flat_map(|&k| shapes.map(|s| (k, s))) {
            let shape = (1, kv_h, len, hd);
            let [k, v] = [0, 1].map(|_| {
                let buf = KvBuffer::zeros(kind, shape, &dev).unwrap();
                buf.write(&Tensor::randn(0f32, 1., shape, &dev).unwrap(), 0).unwrap();
                buf
            });
            let q = Tensor::randn(0f32, 1., (1, h, t, hd), &dev).unwrap();
            let tables = Paging::identity(1);
            let paging = Paging::contiguous(&tables, len, kv_h);
            for kernel in kernels() {
                let all =
                    decode_attention_on(kernel, &q, &k, &v, &paging, len, &[0]).unwrap().expect("applies");
                for i in 0..t {
                    let one = q.narrow(2, i, 1).unwrap();
                    let single = decode_attention_on(kernel, &one, &k, &v, &paging, len - t + i + 1, &[0])
                        .unwrap()
                        .unwrap();
                    let got: Vec<f32> =
                        all.narrow(2, i, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let want: Vec<f32> = single.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(got, want, "{kernel:?} {kind:?} h{h}/{kv_h} hd{hd} row {i} of {t}");
                }
            }
        }
    }

    #[test]
    fn scores_that_keep_rising_rescale_what_came_before() {
        // Keys grow along the positions, so each block of the online softmax raises the max
        // (the earlier weights and output are rescaled every block); and the reverse.
        let dev = Device::Cpu;
        let (b, h, hd, len) = (1, 2, 128, 700);
        let q = Tensor::ones((b, h, 1, hd), DType::F32, &dev).unwrap();
        let ramp = Tensor::arange(0f32, len as f32, &dev).unwrap().affine(2.0 / len as f64, 0.0).unwrap();
        let ramp = ramp.reshape((1, 1, len, 1)).unwrap();
        for ramp in [ramp.clone(), ramp.affine(-1.0, 2.0).unwrap()] {
            let k = Tensor::randn(0f32, 0.01, (b, h, len, hd), &dev).unwrap().broadcast_add(&ramp).unwrap();
            let v = Tensor::randn(0f32, 1., (b, h, len, hd), &dev).unwrap();
            let (k, v) = (k.to_dtype(DType::F16).unwrap(), v.to_dtype(DType::F16).unwrap());
            let (kb, vb) = (KvBuffer::Float(k.clone()), KvBuffer::Float(v.clone()));
            let tables = Paging::identity(1);
            let paging = Paging::contiguous(&tables, len, h);
            let want = reference(&q, &k, &v, &[0]);
            for kernel in kernels() {
                let got =
                    decode_attention_on(kernel, &q, &kb, &vb, &paging, len, &[0]).unwrap().expect("applies");
                assert!(max_diff(&got, &want) < 1e-4, "{kernel:?}: {}", max_diff(&got, &want));
            }
        }
    }

    #[test]
    fn q8_cache_equals_the_reference_on_its_dequantized_values() {
        let dev = Device::Cpu;
        for (b, h, kv_h, hd, capacity, len, padding) in [
            (1, 4, 4, 128, 300, 290, vec![0]),
            (2, 4, 2, 64, 40, 33, vec![5, 0]),
            (1, 2, 1, 32, 9, 1, vec![0]),
        ] {
            let q = Tensor::randn(0f32, 1., (b, h, 1, hd), &dev).unwrap();
            let shape = (b, kv_h, capacity, hd);
            let [k, v] = [0, 1].map(|_| {
                let buf = KvBuffer::zeros(crate::KvType::Q8_0, shape, &dev).unwrap();
                buf.write(&Tensor::randn(0f32, 1., shape, &dev).unwrap(), 0).unwrap();
                buf
            });
            let tables = Paging::identity(b);
            let paging = Paging::contiguous(&tables, capacity, kv_h);
            let want = reference(&q, &k.view(len).unwrap(), &v.view(len).unwrap(), &padding);
            // Also the same quants and scales scattered over blocks of 32 positions.
            let ((ks, tables32, slots), (vs, _, _)) = (scatter_buffer(&k, 32), scatter_buffer(&v, 32));
            let paged = Paging::pooled(&tables32, 32, slots, kv_h);
            for kernel in kernels() {
                for (k, v, paging) in [(&k, &v, &paging), (&ks, &vs, &paged)] {
                    let got = decode_attention_on(kernel, &q, k, v, paging, len, &padding)
                        .unwrap()
                        .expect("applies");
                    let block = paging.block;
                    assert!(
                        max_diff(&got, &want) < 1e-4,
                        "{kernel:?} q8_0 b{b} h{h}/{kv_h} len {len} block {block}"
                    );
                }
            }
        }
    }
}
