//! Matrix × a few vectors with 16-bit (bf16/f16) weights on the CPU: the decode-step kernel.
//!
//! A decode step multiplies every weight matrix by one activation row (or a handful, in a batch).
//! That is memory-bound: the floor is reading the weights once. candle's `matmul` on bf16 widens
//! the whole weight to f32 on every call (0.77 GB/s effective on the project's CPU; f16 reaches
//! 8.4 GB/s on one core, see docs/cpu-performance.md). Here each weight row is streamed once,
//! widened in registers (bf16: a 16-bit shift; f16: `vcvtph2ps`), multiplied into f32 accumulators,
//! and rows are split across rayon threads. Results are rounded to the weight dtype once, as
//! transformers' bf16 linear layers do.
//!
//! Steps of up to [`EXACT_ROWS`] rows (a verify or continuous-batching step) multiply each row
//! exactly as a one-row step does: f32 activations, up to 8 rows per pass over a weight row, the
//! width in blocks that keep the rows' activations in L1 with every sum carried between blocks
//! (the same accumulation order as one pass). Longer ones (prompts) take the tiled kernels (AMX
//! or bf16 pair products), ordered differently.
//!
//! candle's `matmul` stays the reference: a test compares both on odd shapes.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::EXACT_ROWS;
use crate::error::Result;

/// Activation rows per pass over the weights: a prompt is multiplied in tiles of this many rows
/// (their f32 activations, 32 × 11008 × 4 bytes = 1.4 MB, stay in L2 while four weight rows at a
/// time are reused from L1 for all of them). pp128 on 8 layers: 16 rows 39 tok/s, 32 rows 42,
/// 64 rows 43.
pub const TILE_ROWS: usize = 32;
/// Activation rows multiplied per pass over a weight row (accumulators kept in registers); a
/// weight row is reused from L1 for the next group.
const GROUP: usize = 4;
/// Activation rows per pass over a weight row in a few-row step ([`avx512::few_rows`]; AVX2's
/// 16 registers take [`GROUP`]).
const FEW_GROUP: usize = 8;
/// Values of the width per block in a few-row step: 15 rows of f32 activations (30 KB) stay in L1.
const FEW_K_BLOCK: usize = 512;
/// Output features per rayon task.
const BLOCK: usize = 32;
/// Prompt tiles run over `k` in blocks of this many values, so that a group's activations
/// (4 rows × 1024 × f32 = 16 KB) stay in L1 while the task's weight tiles pass them; over the
/// whole width they came from L2 on every weight tile.
const K_BLOCK: usize = 1024;

/// `x` `[.., k]` times `w`ᵀ, `w` `[n, k]` bf16/f16, on the CPU, in tiles of [`TILE_ROWS`] rows.
/// Returns `None` when the kernel does not apply (other dtype or device).
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (n, k) = w.dims2()?;
    let rows = x.elem_count() / k.max(1);
    if !matches!(w.device(), Device::Cpu) || rows == 0 || x.dim(candle_core::D::Minus1)? != k {
        return Ok(None);
    }
    if !matches!(w.dtype(), DType::BF16 | DType::F16) || !w.is_contiguous() {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else { return Ok(None) };
    let simd = Simd::detect();
    let mut out_shape = x.dims().to_vec();
    *out_shape.last_mut().expect("x has a last dimension") = n;
    // Activations widened to f32 once: [rows, k].
    let widened = || -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let y = match cpu {
        CpuStorage::BF16(data) => {
            let w = bits(weights(data, layout, n * k));
            let y = match amx_product(w, x, rows, k, n)? {
                Some(y) => y,
                None => {
                    let pairs = if rows > EXACT_ROWS && x.dtype() == DType::BF16 && bf16_dot(simd) {
                        Some(x.flatten_all()?.to_vec1::<bf16>()?)
                    } else {
                        None
                    };
                    let mut xs = widened()?;
                    simd.order_bf16(&mut xs, k);
                    let acts = Acts { widened: &xs, bf16: pairs.as_deref().map(bits), simd };
                    tiled(w, acts, rows, k, n, Kind::Bf16)
                }
            };
            Tensor::from_vec(y.into_iter().map(bf16::from_f32).collect::<Vec<_>>(), out_shape, x.device())?
        }
        CpuStorage::F16(data) => {
            let xs = widened()?;
            let y = tiled(
                bits(weights(data, layout, n * k)),
                Acts { widened: &xs, bf16: None, simd },
                rows,
                k,
                n,
                Kind::F16,
            );
            Tensor::from_vec(y.into_iter().map(f16::from_f32).collect::<Vec<_>>(), out_shape, x.device())?
        }
        _ => return Ok(None),
    };
    Ok(Some(y))
}

/// The kernel that multiplies prompts (several rows) by a `dtype` weight here: `amx-bf16`,
/// `avx512-bf16`, `avx512`, `avx2`, `portable`, or `candle` (the f32 gemm candle runs for other
/// dtypes).
pub fn prompt_kernel(dtype: DType) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::BF16 && crate::kernels::amx::available() {
        return "amx-bf16";
    }
    let simd = Simd::detect();
    match dtype {
        DType::BF16 if bf16_dot(simd) => "avx512-bf16",
        DType::BF16 | DType::F16 => simd.name(),
        _ => "candle",
    }
}

/// `[rows, n]` f32 for prompts with bf16 activations on AMX tiles ([`crate::kernels::amx`]), where the CPU
/// has them and the shape is in whole blocks of 32; `None` otherwise.
#[cfg(target_arch = "x86_64")]
fn amx_product(w: &[u16], x: &Tensor, rows: usize, k: usize, n: usize) -> Result<Option<Vec<f32>>> {
    use crate::kernels::amx;
    let whole = n.is_multiple_of(amx::BLOCK) && k.is_multiple_of(amx::BLOCK);
    if rows <= EXACT_ROWS || !whole || x.dtype() != DType::BF16 || !amx::available() {
        return Ok(None);
    }
    let xb: Vec<bf16> = x.flatten_all()?.to_vec1()?;
    Ok(Some(amx::matmul(w, bits(&xb), rows, k, n)))
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_product(_: &[u16], _: &Tensor, _: usize, _: usize, _: usize) -> Result<Option<Vec<f32>>> {
    Ok(None)
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

/// A prompt's activation rows `[rows, k]` as the kernels read them: widened to f32 (in
/// [`even_odd`] order for bf16 weights on the SIMD kernels), and for bf16 weights on a CPU with
/// AVX512-BF16 also as bf16 bits in natural order, which the prompt tiles then multiply with
/// `vdpbf16ps` (32 products per instruction instead of two FMAs of 16); `simd`, the kernels.
#[derive(Clone, Copy)]
struct Acts<'a> {
    widened: &'a [f32],
    bf16: Option<&'a [u16]>,
    simd: Simd,
}

impl<'a> Acts<'a> {
    /// Rows `first..` (`k` values each).
    fn rows_after(self, first: usize, k: usize) -> Self {
        Self { widened: &self.widened[first * k..], bf16: self.bf16.map(|b| &b[first * k..]), ..self }
    }
}

/// The kernels that run the products here (tests force each that the CPU has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Simd {
    /// AVX-512F: decode and few-row steps, prompt tiles of 4 × 4 rows.
    Avx512,
    /// AVX2 with FMA and F16C: decode and few-row steps; prompts in groups of 4 rows.
    Avx2,
    Portable,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            return Self::Avx512;
        } else if crate::kernels::has_avx2() {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// Activation rows (`k` values each) for bf16 weights in the order these kernels widen
    /// them: [`even_odd`] on the SIMD ones.
    fn order_bf16(self, xs: &mut [f32], k: usize) {
        if self != Self::Portable {
            xs.chunks_mut(k).for_each(even_odd);
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }
}

/// Whether the CPU multiplies bf16 pairs (`vdpbf16ps`, AVX512-BF16).
fn bf16_dot(simd: Simd) -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd == Simd::Avx512 && std::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`run`] over tiles of [`TILE_ROWS`] activation rows, `[rows, n]` f32.
fn tiled(w: &[u16], acts: Acts, rows: usize, k: usize, n: usize, kind: Kind) -> Vec<f32> {
    let mut y = Vec::with_capacity(rows * n);
    for first in (0..rows).step_by(TILE_ROWS) {
        let tile_rows = TILE_ROWS.min(rows - first);
        y.extend(run(w, acts.rows_after(first, k), tile_rows, k, n, kind));
    }
    y
}

/// `y[r][j] = sum_i w[j][i] * x[r][i]`, returned as `[rows, n]` f32.
fn run(w: &[u16], acts: Acts, rows: usize, k: usize, n: usize, kind: Kind) -> Vec<f32> {
    let xs = acts.widened;
    // Computed feature-major ([n, rows]) so each task owns a contiguous slice, then transposed.
    let mut yt = vec![0f32; n * rows];
    yt.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, chunk)| {
        let first = b * BLOCK;
        let features = chunk.len() / rows;
        // Prompts: 4 weight rows × 4 activation rows per pass (features in tiles of 4, rows in
        // groups of 4), then what is left over one weight row at a time.
        let tiles = if rows > EXACT_ROWS && acts.simd == Simd::Avx512 { features / 4 } else { 0 };
        prompt_tiles(
            &w[first * k..(first + 4 * tiles) * k],
            acts,
            rows,
            k,
            kind,
            &mut chunk[..4 * tiles * rows],
        );
        #[cfg(target_arch = "x86_64")]
        if rows > 1 && tiles == 0 && acts.simd != Simd::Portable {
            let w = &w[first * k..(first + features) * k];
            // SAFETY: the CPU has the features (Simd::detect, or a test's check); shapes as for
            // `dot_row`.
            unsafe {
                match acts.simd {
                    Simd::Avx512 => avx512::few_rows(w, xs, rows, k, kind, chunk),
                    _ => avx2::few_rows(w, xs, rows, k, kind, chunk),
                }
            }
            return;
        }
        let done = if tiles > 0 { rows / GROUP * GROUP } else { 0 };
        for (jj, out) in chunk.chunks_mut(rows).enumerate() {
            let (j, from) = (first + jj, if jj < 4 * tiles { done } else { 0 });
            for (g, out) in out[from..].chunks_mut(GROUP).enumerate() {
                dot_row(&w[j * k..(j + 1) * k], &xs[(from + g * GROUP) * k..], k, kind, acts.simd, out);
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

/// `out` `[4t, rows]` (feature-major): the first `rows / GROUP · GROUP` rows of each feature,
/// for the `t` weight tiles `w` `[4t, k]`. The width is taken in blocks of [`K_BLOCK`], a group's
/// activations staying in L1 while every tile passes them, with partial sums kept between blocks.
fn prompt_tiles(w: &[u16], acts: Acts, rows: usize, k: usize, kind: Kind, out: &mut [f32]) {
    let (tiles, groups) = (w.len() / (4 * k).max(1), rows / GROUP);
    let tile = |t: usize| &w[4 * t * k..4 * (t + 1) * k];
    let group = |g: usize| &acts.widened[g * GROUP * k..(g + 1) * GROUP * k];
    let mut partial = vec![Partial::default(); tiles * groups];
    for start in (0..k).step_by(K_BLOCK) {
        let end = (start + K_BLOCK).min(k);
        for g in 0..groups {
            for t in 0..tiles {
                let acc = &mut partial[t * groups + g];
                match acts.bf16 {
                    Some(xb) => {
                        dot_tile_bf16(tile(t), &xb[g * GROUP * k..(g + 1) * GROUP * k], k, start..end, acc)
                    }
                    None => dot_tile(tile(t), group(g), k, start..end, kind, acc),
                }
            }
        }
    }
    for t in 0..tiles {
        for g in 0..groups {
            let sums = partial[t * groups + g].finish(tile(t), group(g), k, kind);
            for (i, o) in sums.iter().enumerate() {
                out[(4 * t + i) * rows + g * GROUP..][..GROUP].copy_from_slice(o);
            }
        }
    }
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

/// `out[r] += dot(w, x[r])` for each activation row `r` (at most [`GROUP`]; row `r` starts at
/// `xs[r * stride]`, `w.len()` values); bf16 activations in [`even_odd`] order on the SIMD kernels.
fn dot_row(w: &[u16], xs: &[f32], stride: usize, kind: Kind, simd: Simd, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd != Simd::Portable {
        // SAFETY: the CPU has the features (Simd::detect, or a test's check); slices are in
        // bounds by construction.
        unsafe {
            match simd {
                Simd::Avx512 => avx512::dot_row(w, xs, stride, kind, out),
                _ => avx2::dot_row(w, xs, stride, kind, out),
            }
        }
        return;
    }
    for (r, o) in out.iter_mut().enumerate() {
        let x = &xs[r * stride..r * stride + w.len()];
        *o += w.iter().zip(x).map(|(&b, &xv)| widen(b, kind) * xv).sum::<f32>();
    }
}

/// Unreduced sums of a 4 × [`GROUP`] tile: 16 lanes per (weight row, activation row), over the
/// full 32-value runs of `k` seen so far.
#[derive(Clone, Copy, Default)]
struct Partial([[[f32; 16]; GROUP]; 4]);

impl Partial {
    /// `out[i][r] = dot(weight row i, activation row r)`: the lanes summed, plus the tail of `k`
    /// past its last full run of 32.
    fn finish(&self, w4: &[u16], xs: &[f32], k: usize, kind: Kind) -> [[f32; GROUP]; 4] {
        let full = k / 32 * 32;
        std::array::from_fn(|i| {
            std::array::from_fn(|r| {
                let tail: f32 = (full..k).map(|t| widen(w4[i * k + t], kind) * xs[r * k + t]).sum();
                self.0[i][r].iter().sum::<f32>() + tail
            })
        })
    }
}

/// Adds the full runs of 32 values within `range` (which starts on a run) of 4 weight rows (`w4`,
/// `[4, k]`) times [`GROUP`] activation rows (`xs`, `[GROUP, k]`) to `acc`; AVX-512 only (see
/// [`simd`]).
fn dot_tile(w4: &[u16], xs: &[f32], k: usize, range: std::ops::Range<usize>, kind: Kind, acc: &mut Partial) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: callers check for Simd::Avx512; slices are [4, k] and [GROUP, k], range within k.
    unsafe {
        avx512::tile(w4, xs, k, range, kind, acc)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w4, xs, k, range, kind, acc);
        unreachable!("dot_tile runs only on AVX-512")
    }
}

/// As [`dot_tile`] for bf16 weights and bf16 activations `xb` (`[GROUP, k]`, natural order);
/// only where [`bf16_dot`] holds.
fn dot_tile_bf16(w4: &[u16], xb: &[u16], k: usize, range: std::ops::Range<usize>, acc: &mut Partial) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: callers check `bf16_dot()`; slices are [4, k] and [GROUP, k], range within k.
    unsafe {
        avx512::tile_bf16(w4, xb, k, range, acc)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w4, xb, k, range, acc);
        unreachable!("dot_tile_bf16 runs only where bf16_dot() holds")
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
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;
