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
/// Activation rows per pass over a weight row in a few-row step ([`avx512::few_rows`]).
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
                    let pairs = if rows > EXACT_ROWS && x.dtype() == DType::BF16 && bf16_dot() {
                        Some(x.flatten_all()?.to_vec1::<bf16>()?)
                    } else {
                        None
                    };
                    let mut xs = widened()?;
                    if simd() {
                        xs.chunks_mut(k).for_each(even_odd);
                    }
                    let acts = Acts { widened: &xs, bf16: pairs.as_deref().map(bits) };
                    tiled(w, acts, rows, k, n, Kind::Bf16)
                }
            };
            Tensor::from_vec(y.into_iter().map(bf16::from_f32).collect::<Vec<_>>(), out_shape, x.device())?
        }
        CpuStorage::F16(data) => {
            let xs = widened()?;
            let y = tiled(
                bits(weights(data, layout, n * k)),
                Acts { widened: &xs, bf16: None },
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
/// `avx512`, or `candle` (the f32 gemm candle runs for other dtypes).
pub fn prompt_kernel(dtype: DType) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if dtype == DType::BF16 && crate::kernels::amx::available() {
        return "amx-bf16";
    }
    match dtype {
        DType::BF16 if bf16_dot() => "avx512-bf16",
        DType::BF16 | DType::F16 if simd() => "avx512",
        DType::BF16 | DType::F16 => "portable",
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
/// [`even_odd`] order for bf16 weights under [`simd`]), and for bf16 weights on a CPU with
/// AVX512-BF16 also as bf16 bits in natural order, which the prompt tiles then multiply with
/// `vdpbf16ps` (32 products per instruction instead of two FMAs of 16).
#[derive(Clone, Copy)]
struct Acts<'a> {
    widened: &'a [f32],
    bf16: Option<&'a [u16]>,
}

impl<'a> Acts<'a> {
    /// Rows `first..` (`k` values each).
    fn rows_after(self, first: usize, k: usize) -> Self {
        Self { widened: &self.widened[first * k..], bf16: self.bf16.map(|b| &b[first * k..]) }
    }
}

/// Whether the CPU multiplies bf16 pairs (`vdpbf16ps`, AVX512-BF16).
fn bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd() && std::is_x86_feature_detected!("avx512bf16");
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
        let tiles = if rows > EXACT_ROWS && simd() { features / 4 } else { 0 };
        prompt_tiles(
            &w[first * k..(first + 4 * tiles) * k],
            acts,
            rows,
            k,
            kind,
            &mut chunk[..4 * tiles * rows],
        );
        #[cfg(target_arch = "x86_64")]
        if rows > 1 && tiles == 0 && simd() {
            // SAFETY: the CPU supports AVX-512F (checked); shapes as for `dot_row`.
            unsafe { avx512::few_rows(&w[first * k..(first + features) * k], xs, rows, k, kind, chunk) };
            return;
        }
        let done = if tiles > 0 { rows / GROUP * GROUP } else { 0 };
        for (jj, out) in chunk.chunks_mut(rows).enumerate() {
            let (j, from) = (first + jj, if jj < 4 * tiles { done } else { 0 });
            for (g, out) in out[from..].chunks_mut(GROUP).enumerate() {
                dot_row(&w[j * k..(j + 1) * k], &xs[(from + g * GROUP) * k..], k, kind, out);
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

/// `out[r] += dot(w, x[r])` for each activation row `r` (at most [`GROUP`]; row `r` starts at
/// `xs[r * stride]`, `w.len()` values); bf16 activations in [`even_odd`] order when [`simd`].
fn dot_row(w: &[u16], xs: &[f32], stride: usize, kind: Kind, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU supports AVX-512F (checked above); slices are in bounds by construction.
        unsafe { avx512::dot_row(w, xs, stride, kind, out) };
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
    // SAFETY: callers check `simd()`; slices are [4, k] and [GROUP, k], range within k.
    unsafe {
        avx512::tile(w4, xs, k, range, kind, acc)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w4, xs, k, range, kind, acc);
        unreachable!("dot_tile runs only where simd() holds")
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
mod avx512 {
    use std::arch::x86_64::*;

    use super::{widen, Kind, Partial, FEW_GROUP, FEW_K_BLOCK, GROUP};

    pub unsafe fn dot_row(w: &[u16], xs: &[f32], stride: usize, kind: Kind, out: &mut [f32]) {
        // SAFETY: as the caller's.
        unsafe {
            match out.len() {
                1 => rows::<1>(w, xs, stride, kind, out),
                2 => rows::<2>(w, xs, stride, kind, out),
                3 => rows::<3>(w, xs, stride, kind, out),
                _ => rows::<GROUP>(w, xs, stride, kind, out),
            }
        }
    }

    /// 4 weight rows × [`GROUP`] activation rows over a block of the width: 16 accumulators, each
    /// activation load used by four weight rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(
        w4: &[u16],
        xs: &[f32],
        k: usize,
        range: std::ops::Range<usize>,
        kind: Kind,
        partial: &mut Partial,
    ) {
        // SAFETY: `Partial` is 16 rows of 16 f32, one register each.
        let mut acc: [[__m512; GROUP]; 4] = std::array::from_fn(|i| {
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(partial.0[i][r].as_ptr()) })
        });
        let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let mut i = range.start;
        while i + 32 <= range.end {
            // SAFETY (whole block): i + 32 <= k; w4 is [4, k] and xs [GROUP, k].
            let raw: [__m512i; 4] =
                std::array::from_fn(|row| unsafe { _mm512_loadu_si512(w4.as_ptr().add(row * k + i).cast()) });
            // One half (16 values) at a time keeps 16 accumulators, 4 weights and one activation
            // vector in registers (both halves at once spilled).
            for half in 0..2 {
                let ws: [__m512; 4] = std::array::from_fn(|row| match kind {
                    Kind::Bf16 if half == 0 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(raw[row])),
                    Kind::Bf16 => _mm512_castsi512_ps(_mm512_and_si512(raw[row], high_halves)),
                    Kind::F16 => _mm512_cvtph_ps(if half == 0 {
                        _mm512_castsi512_si256(raw[row])
                    } else {
                        _mm512_extracti64x4_epi64::<1>(raw[row])
                    }),
                });
                for r in 0..GROUP {
                    let x = unsafe { _mm512_loadu_ps(xs.as_ptr().add(r * k + i + 16 * half)) };
                    for (row_acc, wv) in acc.iter_mut().zip(&ws) {
                        row_acc[r] = _mm512_fmadd_ps(*wv, x, row_acc[r]);
                    }
                }
            }
            i += 32;
        }
        for (row, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: 16 f32 in each.
                unsafe { _mm512_storeu_ps(partial.0[row][r].as_mut_ptr(), *a) };
            }
        }
    }

    /// [`tile`] with bf16 activations `xb` in natural order: `vdpbf16ps` adds the products of
    /// each pair of values into one lane (the lanes are summed in [`Partial::finish`], so the
    /// lane a product lands in does not matter). Products of bf16 values are exact in f32.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_bf16(
        w4: &[u16],
        xb: &[u16],
        k: usize,
        range: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        // SAFETY: `Partial` is 16 rows of 16 f32, one register each.
        let mut acc: [[__m512; GROUP]; 4] = std::array::from_fn(|i| {
            std::array::from_fn(|r| unsafe { _mm512_loadu_ps(partial.0[i][r].as_ptr()) })
        });
        let mut i = range.start;
        while i + 32 <= range.end {
            // SAFETY (whole block): i + 32 <= k; w4 is [4, k] and xb [GROUP, k].
            let ws: [__m512bh; 4] =
                std::array::from_fn(|row| unsafe { load_pairs(w4.as_ptr().add(row * k + i)) });
            for r in 0..GROUP {
                let x = unsafe { load_pairs(xb.as_ptr().add(r * k + i)) };
                for (row_acc, wv) in acc.iter_mut().zip(&ws) {
                    row_acc[r] = _mm512_dpbf16_ps(row_acc[r], *wv, x);
                }
            }
            i += 32;
        }
        for (row, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: 16 f32 in each.
                unsafe { _mm512_storeu_ps(partial.0[row][r].as_mut_ptr(), *a) };
            }
        }
    }

    /// 32 bf16 values (bits) from `p` as `vdpbf16ps`'s operand.
    ///
    /// # Safety
    /// `p` points at 32 readable values; the CPU has AVX-512F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_pairs(p: *const u16) -> __m512bh {
        // SAFETY: 64 readable bytes (the contract); both types are 64-byte vectors.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
    }

    /// `R` activation rows; separate accumulators for the two halves of each load keep 2R
    /// independent FMA chains (one chain per row was latency-bound at half the FMA rate).
    #[target_feature(enable = "avx512f")]
    unsafe fn rows<const R: usize>(w: &[u16], xs: &[f32], stride: usize, kind: Kind, out: &mut [f32]) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        // SAFETY: as the caller's.
        unsafe {
            accumulate::<R>(w, xs, stride, kind, 0..w.len() / 32 * 32, &mut acc);
            finish::<R>(w, xs, stride, kind, &acc, out);
        }
    }

    /// Adds to `acc[r]` (lanes of the even and odd halves of each run) the products of weight row
    /// `w` and activation row `r` (from `xs[r · stride]`) over `range`, whole runs of 32 values:
    /// the per-lane sums run along the width in order, so splitting the width into ranges (the
    /// few-row driver) leaves every sum as one pass makes it.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate<const R: usize>(
        w: &[u16],
        xs: &[f32],
        stride: usize,
        kind: Kind,
        range: std::ops::Range<usize>,
        acc: &mut [[__m512; 2]; R],
    ) {
        let high_halves = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let mut i = range.start;
        while i < range.end {
            // The hardware prefetcher stops at page boundaries: fetch ahead into the next rows
            // (a 4096-wide bf16 row is 2 pages).
            _mm_prefetch::<_MM_HINT_T1>(w.as_ptr().wrapping_add(i + 2 * stride).cast());
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + 256).cast());
            // SAFETY (whole block): i + 32 <= k = w.len(); x rows have k values from r · stride.
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
            for (r, [a, b]) in acc.iter_mut().enumerate() {
                let x = unsafe { xs.as_ptr().add(r * stride + i) };
                *a = _mm512_fmadd_ps(lo, unsafe { _mm512_loadu_ps(x) }, *a);
                *b = _mm512_fmadd_ps(hi, unsafe { _mm512_loadu_ps(x.add(16)) }, *b);
            }
            i += 32;
        }
    }

    /// `out[r] +=` the lanes of `acc[r]` and the products past the whole runs of 32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish<const R: usize>(
        w: &[u16],
        xs: &[f32],
        stride: usize,
        kind: Kind,
        acc: &[[__m512; 2]; R],
        out: &mut [f32],
    ) {
        let (k, full) = (w.len(), w.len() / 32 * 32);
        for (r, [a, b]) in acc.iter().enumerate() {
            let tail: f32 = (full..k).map(|t| widen(w[t], kind) * xs[r * stride + t]).sum();
            out[r] += _mm512_reduce_add_ps(_mm512_add_ps(*a, *b)) + tail;
        }
    }

    /// A few-row step's products (2 to [`super::EXACT_ROWS`] rows): `out` `[features, rows]`
    /// (feature-major) gains weight rows `w` `[features, k]` times activation rows `xs`
    /// `[rows, k]`. The width is taken in blocks of [`FEW_K_BLOCK`] so that every row's block of
    /// activations stays in L1 while the weight rows pass (a whole 15-row width does not fit:
    /// an 8-row bf16 step read its activations from L2), with each (weight row, activation row)
    /// sum carried between blocks: the arithmetic of [`rows`], row for row.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn few_rows(w: &[u16], xs: &[f32], rows: usize, k: usize, kind: Kind, out: &mut [f32]) {
        let (features, full) = (w.len() / k, k / 32 * 32);
        let groups = rows.div_ceil(FEW_GROUP);
        let mut acc = vec![[[_mm512_setzero_ps(); 2]; FEW_GROUP]; features * groups];
        macro_rules! each_group {
            ($j:expr, $g:expr, $f:ident, $($args:expr),*) => {{
                let (wj, a) = (&w[$j * k..($j + 1) * k], &mut acc[$j * groups + $g]);
                let x = &xs[$g * FEW_GROUP * k..];
                // SAFETY: as the caller's; `a` holds FEW_GROUP ≥ r sums.
                unsafe {
                    match rows - $g * FEW_GROUP {
                        1 => $f::<1>(wj, x, k, kind, $($args,)* (&mut a[..1]).try_into().expect("1 sum")),
                        2 => $f::<2>(wj, x, k, kind, $($args,)* (&mut a[..2]).try_into().expect("2 sums")),
                        3 => $f::<3>(wj, x, k, kind, $($args,)* (&mut a[..3]).try_into().expect("3 sums")),
                        4 => $f::<4>(wj, x, k, kind, $($args,)* (&mut a[..4]).try_into().expect("4 sums")),
                        5 => $f::<5>(wj, x, k, kind, $($args,)* (&mut a[..5]).try_into().expect("5 sums")),
                        6 => $f::<6>(wj, x, k, kind, $($args,)* (&mut a[..6]).try_into().expect("6 sums")),
                        7 => $f::<7>(wj, x, k, kind, $($args,)* (&mut a[..7]).try_into().expect("7 sums")),
                        _ => $f::<8>(wj, x, k, kind, $($args,)* (&mut a[..8]).try_into().expect("8 sums")),
                    }
                }
            }};
        }
        for start in (0..full).step_by(FEW_K_BLOCK) {
            let range = start..(start + FEW_K_BLOCK).min(full);
            for j in 0..features {
                for g in 0..groups {
                    each_group!(j, g, accumulate, range.clone());
                }
            }
        }
        for j in 0..features {
            for g in 0..groups {
                let out = &mut out[j * rows + g * FEW_GROUP..];
                each_group!(j, g, finish_into, out);
            }
        }
    }

    /// [`finish`] with the arguments in [`few_rows`]' order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish_into<const R: usize>(
        w: &[u16],
        xs: &[f32],
        stride: usize,
        kind: Kind,
        out: &mut [f32],
        acc: &mut [[__m512; 2]; R],
    ) {
        // SAFETY: as the caller's.
        unsafe { finish::<R>(w, xs, stride, kind, acc, out) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_candle_matmul() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (rows, k, n) in [
                (1, 4096, 37),
                (3, 33, 70),
                (4, 16, 1),
                (2, 1000, 129),
                (7, 100, 33),
                (16, 64, 5),
                (37, 96, 9),
                (9, 1100, 7),
                // Prompt tiles over several blocks of the width, with leftover rows and a tail.
                (13, 2100, 40),
                // Whole blocks of 32: bf16 prompts take the AMX path where the CPU has it.
                (40, 96, 64),
                (33, 2048, 96),
                (5, 32, 160),
            ] {
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

    /// bf16 prompts run on `vdpbf16ps` where the CPU has it; the widening FMA path (every other
    /// AVX-512 CPU) is forced here, and both are held to candle's f32 matmul.
    #[test]
    fn both_bf16_prompt_paths_equal_candle_matmul() {
        let dev = Device::Cpu;
        for (rows, k, n) in [(9, 1100, 7), (13, 2100, 40), (33, 2048, 96), (8, 64, 12)] {
            let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let x = Tensor::randn(0f32, 1., (rows, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let want: Vec<f32> = x
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let wb: Vec<bf16> = w.flatten_all().unwrap().to_vec1().unwrap();
            let xb: Vec<bf16> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut xs: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            if simd() {
                xs.chunks_mut(k).for_each(even_odd);
            }
            let paths = [Some(bits(&xb)).filter(|_| bf16_dot()), None];
            for pairs in paths.into_iter().collect::<std::collections::HashSet<_>>() {
                let got = tiled(bits(&wb), Acts { widened: &xs, bf16: pairs }, rows, k, n, Kind::Bf16);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                assert!(err < 1e-5, "bf16 pairs {} rows {rows} k {k} n {n}: {err}", pairs.is_some());
            }
        }
    }

    /// Steps of up to `EXACT_ROWS` rows: each row's product is the one-row step's, bit for bit
    /// (widths with and without a tail past whole runs, wider than one few-row block).
    #[test]
    fn few_row_steps_equal_one_row_steps_exactly() {
        let dev = Device::Cpu;
        for dtype in [DType::BF16, DType::F16] {
            for (rows, k, n) in [(2, 96, 37), (5, 1100, 33), (8, 4096, 9), (9, 1030, 40), (15, 2048, 7)] {
                let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let x = Tensor::randn(0f32, 1., (rows, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let all: Vec<Vec<f32>> =
                    matmul_wt(&x, &w).unwrap().unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap();
                for (r, got) in all.iter().enumerate() {
                    let one = matmul_wt(&x.narrow(0, r, 1).unwrap(), &w).unwrap().unwrap();
                    let want: Vec<f32> =
                        one.to_dtype(DType::F32).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
                    assert!(*got == want, "{dtype:?} rows {rows} k {k}: row {r} is not the one-row step's");
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((8, 16), DType::F32, &dev).unwrap();
        assert!(matmul_wt(&Tensor::zeros((1, 16), DType::F32, &dev).unwrap(), &w).unwrap().is_none());
        let x = Tensor::zeros((1, 16), DType::BF16, &dev).unwrap();
        let transposed = Tensor::zeros((16, 8), DType::BF16, &dev).unwrap().t().unwrap();
        assert!(!transposed.is_contiguous());
        assert!(matmul_wt(&x, &transposed).unwrap().is_none());
    }
}
