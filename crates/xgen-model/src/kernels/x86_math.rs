//! Vectorised math shared by the AVX-512 kernels.

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

#[cfg(test)]
mod tests {
    use std::arch::x86_64::*;

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
