//! The f32 FMA peak of the pool's threads, measured: what `xgen bench` divides prompt speeds by,
//! so a ratio can be read on any host. Each thread runs independent chains of the widest FMA the
//! CPU has (12 AVX-512 accumulators, enough to cover the instruction's latency), no memory.

use std::{hint::black_box, time::Instant};

/// FMA steps per thread in one measurement (about 0.1 s on a 3 GHz core with AVX-512).
const STEPS: usize = 20_000_000;
/// Independent accumulator chains.
const CHAINS: usize = 12;

/// FLOP/s (a multiply-add counts 2) of all threads of the current rayon pool together, running at
/// once; the best of `passes`.
pub fn f32_fma_flops(passes: usize) -> f64 {
    (0..passes.max(1)).map(|_| one_pass()).fold(0.0, f64::max)
}

fn one_pass() -> f64 {
    let start = Instant::now();
    let flops: f64 = rayon::broadcast(|_| per_thread()).into_iter().sum();
    flops / start.elapsed().as_secs_f64()
}

/// FLOPs one thread did.
fn per_thread() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        unsafe { black_box(chains_avx512(STEPS)) };
        return (STEPS * CHAINS * 16 * 2) as f64;
    }
    black_box(chains_portable(STEPS / 4));
    (STEPS / 4 * CHAINS * 8 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn chains_avx512(steps: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..steps {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x)))
}

/// Multiply-adds in lanes of 8 the compiler can vectorise (unfused where the target lacks FMA).
fn chains_portable(steps: usize) -> f32 {
    let mut acc = [[1f32; 8]; CHAINS];
    for _ in 0..steps {
        for lanes in acc.iter_mut() {
            for x in lanes.iter_mut() {
                *x = *x * 0.999_999 + 1e-7;
            }
        }
    }
    acc.iter().flatten().sum()
}
