//! The machine's side: CPU kernels for the products and attention the model (`model.rs`,
//! `attention.rs`, `linear.rs`) describes, chosen at run time by what the CPU offers, each with a
//! portable path and tested against a reference kept in the repo (candle's matmul, the f32
//! `causal_attention`). The model reads as the paper; these files read as the machine.
//!
//! - [`matvec`]: 16-bit float products (decode rows, AMX prompt tiles via `amx`).
//! - [`quant`]: q8_0/q4_0 matrices in a VNNI layout and their products (VNNI tiles; AMX int8
//!   tiles for prompts where the CPU has them).
//! - [`decode_attention`]: one query per sequence over the KV cache.
//! - [`prompt_attention`]: a prompt chunk over the KV cache, flash-attention style.
//! - [`paging`]: where a cached position lives (the block tables the attention kernels read).
//! - [`work_split`]: splitting products over the thread pool.
//! - [`bandwidth`], [`peak`]: the memory-read and f32-FMA probes behind `xgen bench`'s ratios.

/// Rows a step may have for each of them to be computed exactly as a one-row step computes it
/// (bit for bit: the products' and attention's few-row paths): decode steps, speculative verify
/// steps, continuous-batching steps up to this many rows in all. Longer steps are prompts, on
/// kernels ordered for throughput (AMX tiles, k slices, bf16 pair products).
pub const EXACT_ROWS: usize = 15;

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod bandwidth;
pub(crate) mod decode_attention;
pub mod matvec;
pub mod paging;
pub mod peak;
pub mod prompt_attention;
pub mod quant;
pub(crate) mod work_split;
#[cfg(target_arch = "x86_64")]
mod x86_math;

/// Whether the CPU runs the AVX2 kernels (AVX2 with FMA and F16C), those of CPUs without
/// AVX-512: one test for the products, the attention and their tests.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}
