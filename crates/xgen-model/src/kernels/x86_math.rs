//! Vectorised math shared by the SIMD kernels (AVX-512 and AVX2).

use std::arch::x86_64::*;

/// `e^x` per lane for `x ≤ 0` (larger inputs are not needed here), within 2 ulp of `f32::exp`
/// down to `e^-87` (below that, ~1e-38): Cephes' `expf` — `x = n ln 2 + r`, a degree-6 polynomial
/// for `e^r`, times `2^n` by `vscalefps`.
#[target_feature(enable = "avx512f")]
pub(crate) fn exp(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    // r = x - n ln 2, ln 2 split in two so the product is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_2e-4);
    for coefficient in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(coefficient));
    }
    let y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    _mm512_scalef_ps(y, n)
}

/// [`exp`] on AVX2 (8 lanes): the same polynomial, `2^n` built in the exponent bits (`n ≥ -126`
/// for `x ≥ -87.34`, so the power is a normal float; `vscalefps` is AVX-512 only).
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_2e-4);
    for coefficient in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(coefficient));
    }
    let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let power = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(power))
}

#[cfg(test)]
mod tests {
    use std::arch::x86_64::*;

    #[test]
    fn avx2_exp_is_within_two_ulp_of_the_standard_library() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipped: no AVX2 and FMA on this CPU");
            return;
        }
        let xs: Vec<f32> = (0..=100_000)
            .map(|i| -87.0 * i as f32 / 100_000.0)
            .chain([0.0, -1e-7, -0.5, -87.3, -1000.0])
            .collect();
        for x in xs.chunks(8) {
            let mut lanes = [0f32; 8];
            lanes[..x.len()].copy_from_slice(x);
            let mut got = [0f32; 8];
            // SAFETY: AVX2 and FMA checked above; 8 values read and written.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), super::exp8(_mm256_loadu_ps(lanes.as_ptr()))) };
            for (&x, &got) in lanes.iter().zip(&got) {
                let want = x.max(-87.336_55).exp();
                let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let xs: Vec<f32> =
            (0..=100_000).map(|i| -87.0 * i as f32 / 100_000.0).chain([0.0, -1e-7, -0.5]).collect();
        for x in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..x.len()].copy_from_slice(x);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above; 16 values read and written.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), super::exp(_mm512_loadu_ps(lanes.as_ptr()))) };
            for (&x, &got) in lanes.iter().zip(&got) {
                let want = x.exp();
                let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
            }
        }
    }
}
