//! Memory read bandwidth, the floor generation speed is judged against: a parallel read of a
//! buffer with the widest loads the CPU has and no arithmetic to hide (STREAM's read kernel).
//!
//! Performance notes: a `u64` fold (what this replaced) compiles to 16-byte loads and measured
//! 15-17 GB/s where 64-byte loads read 20-22 GB/s on the same 2 threads, flattering the ratios.

use std::{hint::black_box, time::Instant};

use rayon::prelude::*;

/// Bytes per second reading `bytes` (rounded up to 256) in chunks of `chunk` bytes on the rayon
/// pool; the best of `passes`.
pub fn read_bytes_per_s(bytes: usize, chunk: usize, passes: usize) -> f64 {
    let data = vec![1u8; bytes.next_multiple_of(256)];
    (0..passes.max(1)).map(|_| read_once(&data, chunk)).fold(0.0, f64::max)
}

/// Bytes per second of one parallel read of `data` in chunks of `chunk` bytes.
pub fn read_once(data: &[u8], chunk: usize) -> f64 {
    let start = Instant::now();
    let sum = data.par_chunks(chunk.max(256)).map(read_chunk).reduce(|| 0, u64::wrapping_add);
    black_box(sum);
    data.len() as f64 / start.elapsed().as_secs_f64()
}

/// Every byte of `c` loaded once; the xor of all 8-byte words (so nothing is optimised away).
pub fn read_chunk(c: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected.
        return unsafe { read_chunk_avx512(c) };
    } else if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe { read_chunk_avx2(c) };
    }
    read_chunk_portable(c)
}

/// [`read_chunk`] in 32-byte loads: the portable fold read 4.4-5.0 GB/s on an AVX2 host whose
/// decode steps read weights at 17-30 GB/s, so `xgen bench`'s floors were wrong there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_chunk_avx2(c: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let lines = c.chunks_exact(128);
    let rest = lines.remainder();
    for line in lines {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: 4 × 32 bytes within `line`.
            *a = _mm256_xor_si256(*a, unsafe { _mm256_loadu_si256(line.as_ptr().add(32 * k).cast()) });
        }
    }
    let all = _mm256_xor_si256(_mm256_xor_si256(acc[0], acc[1]), _mm256_xor_si256(acc[2], acc[3]));
    let mut words = [0u64; 4];
    // SAFETY: 32 bytes into `words`.
    unsafe { _mm256_storeu_si256(words.as_mut_ptr().cast(), all) };
    words.iter().fold(read_chunk_portable(rest), |a, &w| a ^ w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_chunk_avx512(c: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let lines = c.chunks_exact(256);
    let rest = lines.remainder();
    for line in lines {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: 4 × 64 bytes within `line`.
            *a = _mm512_xor_si512(*a, unsafe { _mm512_loadu_si512(line.as_ptr().add(64 * k).cast()) });
        }
    }
    let all = _mm512_xor_si512(_mm512_xor_si512(acc[0], acc[1]), _mm512_xor_si512(acc[2], acc[3]));
    let mut words = [0u64; 8];
    // SAFETY: 64 bytes into `words`.
    unsafe { _mm512_storeu_si512(words.as_mut_ptr().cast(), all) };
    words.iter().fold(read_chunk_portable(rest), |a, &w| a ^ w)
}

fn read_chunk_portable(c: &[u8]) -> u64 {
    c.chunks(8).fold(0u64, |a, b| {
        let mut word = [0u8; 8];
        word[..b.len()].copy_from_slice(b);
        a ^ u64::from_le_bytes(word)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_wide_read_sees_every_byte() {
        // The xor of all words: the SIMD path must agree with a plain fold, tail included.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 251) as u8).collect();
        for len in [1000, 256, 7, 0] {
            let want = super::read_chunk_portable(&data[..len]);
            assert_eq!(super::read_chunk(&data[..len]), want, "{len} bytes");
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was just detected.
                assert_eq!(unsafe { super::read_chunk_avx2(&data[..len]) }, want, "avx2, {len} bytes");
            }
        }
        assert_ne!(super::read_chunk(&data), 0);
    }
}
