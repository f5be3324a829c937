//! Matrix × a few vectors with 16-bit (bf16/f16) weights on the CPU: the decode-step kernel.
//!
//! A decode step multiplies every weight matrix by one activation row (or a handful, in a batch).
//! That is memory-bound: the floor is reading the weights once. candle's `matmul` on bf16 widens
//! the whole weight to f32 on every call (0.77 GB/s effective on the project's CPU; f16 reaches
//! 8.4 GB/s on one core, see docs/cpu-performance.md). Here each weight row is streamed once,
//! widened in registers (bf16: a 16-bit shift; f16: `vcvtph2ps`), multiplied into f32 accumulators
//! for up to 4 activation rows at a time (then reused from L1 for the next 4, up to 16 rows: a
//! continuous-batching decode step), and rows are split across rayon threads. Results are rounded to the
//! weight dtype once, as transformers' bf16 linear layers do.
//!
//! candle's `matmul` stays the reference: a test compares both on odd shapes.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;

/// Largest number of activation rows handled here; more rows (prompts) go to candle's GEMM.
pub const MAX_ROWS: usize = 16;
/// Activation rows multiplied per pass over a weight row (accumulators kept in registers); a
/// weight row is reused from L1 for the next group.
const GROUP: usize = 4;
/// Output features per rayon task.
const BLOCK: usize = 32;

/// `x` `[.., k]` (at most [`MAX_ROWS`] rows) times `w`ᵀ, `w` `[n, k]` bf16/f16, on the CPU.
/// Returns `None` when the kernel does not apply (other dtype or device, too many rows).
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    if !matches!(w.device(), Device::Cpu)
        || rows == 0
        || rows > MAX_ROWS
        || x.dim(candle_core::D::Minus1)? != k
    {
        return Ok(None);
    }
    if !matches!(w.dtype(), DType::BF16 | DType::F16) || !w.is_contiguous() {
        return Ok(None);
    }
    // Activations widened to f32 once: [rows, k].
    let mut xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has a last dimension") = n;
    let y = match cpu {
        CpuStorage::BF16(data) => {
            if simd() {
                xs.chunks_mut(k).for_each(even_odd);
            }
            let y = run(bits(weights(data, layout, n * k)), &xs, rows, k, n, Kind::Bf16);
            Tensor::from_vec(y.into_iter().map(bf16::from_f32).collect::<Vec<_>>(), out_shape, w.device())?
        }
        CpuStorage::F16(data) => {
            let y = run(bits(weights(data, layout, n * k)), &xs, rows, k, n, Kind::F16);
            Tensor::from_vec(y.into_iter().map(f16::from_f32).collect::<Vec<_>>(), out_shape, w.device())?
        }
        _ => return Ok(None),
    };
    Ok(Some(y))
}

fn weights<'a, T>(data: &'a [T], layout: &Layout, len: usize) -> &'a [T] {
    &data[layout.start_offset()..layout.start_offset() + len]
}

/// The raw 16-bit patterns of bf16/f16 values.
fn bits<T: bytemuck_like::Bits16>(w: &[T]) -> &[u16] {
    T::as_bits(w)
}

mod bytemuck_like {
    /// 16-bit float types viewed as their bit patterns.
    pub trait Bits16: Sized {
        fn as_bits(s: &[Self]) -> &[u16];
    }
    impl Bits16 for half::bf16 {
        fn as_bits(s: &[Self]) -> &[u16] {
            // SAFETY: bf16 is a `#[repr(transparent)]` wrapper of u16.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
        }
    }
    impl Bits16 for half::f16 {
        fn as_bits(s: &[Self]) -> &[u16] {
            // SAFETY: f16 is a `#[repr(transparent)]` wrapper of u16.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bf16,
    F16,
}

/// `y[r][j] = sum_i w[j][i] * x[r][i]`, returned as `[rows, n]` f32.
fn run(w: &[u16], xs: &[f32], rows: usize, k: usize, n: usize, kind: Kind) -> Vec<f32> {
    // Computed feature-major ([n, rows]) so each task owns a contiguous slice, then transposed.
    let mut yt = vec![0f32; n * rows];
    yt.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, chunk)| {
        for (jj, out) in chunk.chunks_mut(rows).enumerate() {
            let j = b * BLOCK + jj;
            for (g, out) in out.chunks_mut(GROUP).enumerate() {
                let x = &xs[g * GROUP * k..(g * GROUP + out.len()) * k];
                dot_row(&w[j * k..(j + 1) * k], x, k, kind, out);
            }
        }
    });
    let mut y = vec![0f32; n * rows];
    for j in 0..n {
        for r in 0..rows {
            y[r * n + j] = yt[j * rows + r];
        }
    }
    y
}

/// Whether the AVX-512 kernel runs here.
fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Reorders each full run of 32 values of an activation row to its 16 even-indexed values, then
/// its 16 odd ones: the order in which the bf16 kernel widens a 64-byte load of weights (a shift
/// gives the even bf16 values as f32, a mask the odd ones). The tail stays in order.
fn even_odd(x: &mut [f32]) {
    for run in x.chunks_exact_mut(32) {
        let copy: [f32; 32] = run.try_into().expect("32 values");
        for i in 0..16 {
            run[i] = copy[2 * i];
            run[16 + i] = copy[2 * i + 1];
        }
    }
}

/// `out[r] = dot(w, x[r])` for each activation row `r` (at most [`GROUP`]); bf16 activations
/// in [`even_odd`] order when [`simd`].
fn dot_row(w: &[u16], xs: &[f32], k: usize, kind: Kind, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU supports AVX-512F (checked above); slices are in bounds by construction.
        unsafe { avx512::dot_row(w, xs, k, kind, out) };
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        let x = &xs[r * k..(r + 1) * k];
        *o = w.iter().zip(x).map(|(&b, &xv)| widen(b, kind) * xv).sum();
    }
}

#[inline]
fn widen(b: u16, kind: Kind) -> f32 {
    match kind {
        Kind::Bf16 => f32::from_bits((b as u32) << 16),
        Kind::F16 => f16::from_bits(b).to_f32(),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{widen, Kind, GROUP};

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_row(w: &[u16], xs: &[f32], k: usize, kind: Kind, out: &mut [f32]) {
        let rows = out.len();
        let mut acc = [_mm512_setzero_ps(); GROUP];
        let full = k / 32 * 32;
        let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let mut i = 0;
        while i < full {
            // The hardware prefetcher stops at page boundaries: fetch ahead into the next rows
            // (a 4096-wide bf16 row is 2 pages).
            _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(i + 2 * k).cast());
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + 256).cast());
            // SAFETY (whole block): i + 32 <= k = w.len(); x rows are k long.
            let (lo, hi) = match kind {
                Kind::Bf16 => {
                    // 32 bf16: a shift widens the even ones, a mask the odd ones (x is in
                    // even/odd order to match).
                    let raw = unsafe { _mm512_loadu_si512(w.as_ptr().add(i).cast()) };
                    (
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw)),
                        _mm512_castsi512_ps(_mm512_and_si512(raw, high_halves)),
                    )
                }
                Kind::F16 => unsafe {
                    (
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i).cast())),
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.as_ptr().add(i + 16).cast())),
                    )
                },
            };
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let x = unsafe { xs.as_ptr().add(r * k + i) };
                *a = _mm512_fmadd_ps(lo, unsafe { _mm512_loadu_ps(x) }, *a);
                *a = _mm512_fmadd_ps(hi, unsafe { _mm512_loadu_ps(x.add(16)) }, *a);
            }
            i += 32;
        }
        for r in 0..rows {
            let tail: f32 = (full..k).map(|t| widen(w[t], kind) * xs[r * k + t]).sum();
            out[r] = _mm512_reduce_add_ps(acc[r]) + tail;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_candle_matmul() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (rows, k, n) in
                [(1, 4096, 37), (3, 33, 70), (4, 16, 1), (2, 1000, 129), (7, 100, 33), (16, 64, 5)]
            {
                let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let x = Tensor::randn(0f32, 1., (1, rows, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let got = matmul_wt(&x, &w).unwrap().expect("kernel applies");
                assert_eq!(got.dims(), &[1, rows, n]);
                let want = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                    .unwrap();
                let got = got.to_dtype(DType::F32).unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
                    / scale;
                // One rounding of the f32 sum to the 16-bit output: 2^-8 (bf16) or 2^-11 (f16).
                let tol = if dtype == DType::BF16 { 4e-3 } else { 5e-4 };
                assert!(err < tol, "{dtype:?} rows {rows} k {k} n {n}: {err}");
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((8, 16), DType::F32, &dev).unwrap();
        assert!(matmul_wt(&Tensor::zeros((1, 16), DType::F32, &dev).unwrap(), &w).unwrap().is_none());
        let w = w.to_dtype(DType::BF16).unwrap();
        assert!(matmul_wt(&Tensor::zeros((17, 16), DType::BF16, &dev).unwrap(), &w).unwrap().is_none());
    }
}
