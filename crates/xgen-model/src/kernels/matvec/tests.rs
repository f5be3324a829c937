//! The 16-bit float products against candle's matmul, and few-row steps against one-row steps.

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
            let err =
                (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale;
            // One rounding of the f32 sum to the 16-bit output: 2^-8 (bf16) or 2^-11 (f16).
            let tol = if dtype == DType::BF16 { 4e-3 } else { 5e-4 };
            assert!(err < tol, "{dtype:?} rows {rows} k {k} n {n}: {err}");
        }
    }
}

/// The kernel paths this CPU runs.
fn paths() -> Vec<Simd> {
    #[allow(unused_mut)]
    let mut paths = vec![Simd::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            paths.push(Simd::Avx512);
        }
        if crate::kernels::has_avx2() {
            paths.push(Simd::Avx2);
        }
    }
    paths
}

/// `x` `[rows, k]` times `w` `[n, k]` (`kind` bits) on `simd`'s kernels, `[rows, n]` f32 before
/// rounding; `pairs`: also the activations as bf16 bits (the `vdpbf16ps` prompt tiles).
fn product(
    w: &[u16],
    x: &[f32],
    pairs: Option<&[u16]>,
    shape: (usize, usize, usize),
    kind: Kind,
    simd: Simd,
) -> Vec<f32> {
    let (rows, k, n) = shape;
    let mut xs = x.to_vec();
    if kind == Kind::Bf16 {
        simd.order_bf16(&mut xs, k);
    }
    tiled(w, Acts { widened: &xs, bf16: pairs, simd }, rows, k, n, kind)
}

/// Every path forced (AVX-512 with and without bf16 pair products where the CPU has them, AVX2,
/// portable), for bf16 and f16, against candle's f32 matmul of the same values; and on each,
/// the rows of a step of up to `EXACT_ROWS` rows equal one-row steps bit for bit.
#[test]
fn every_path_equals_candle_matmul_and_few_rows_equal_one_row() {
    let dev = Device::Cpu;
    let shapes =
        [(9, 1100, 7), (13, 2100, 40), (33, 2048, 96), (8, 64, 12), (2, 96, 37), (15, 2048, 7), (1, 4096, 5)];
    for simd in paths() {
        for kind in [Kind::Bf16, Kind::F16] {
            let dtype = if kind == Kind::Bf16 { DType::BF16 } else { DType::F16 };
            for (rows, k, n) in shapes {
                let w = Tensor::randn(0f32, 1., (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let x = Tensor::randn(0f32, 1., (rows, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let wf = w.to_dtype(DType::F32).unwrap();
                let want: Vec<f32> = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&wf.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xs: Vec<f32> = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let wbits: Vec<u16> = match kind {
                    Kind::Bf16 => bits(&w.flatten_all().unwrap().to_vec1::<bf16>().unwrap()).to_vec(),
                    Kind::F16 => bits(&w.flatten_all().unwrap().to_vec1::<f16>().unwrap()).to_vec(),
                };
                let xb: Vec<bf16> = xs.iter().map(|&v| bf16::from_f32(v)).collect();
                let pairs = [
                    None,
                    Some(bits(&xb)).filter(|_| kind == Kind::Bf16 && rows > EXACT_ROWS && bf16_dot(simd)),
                ];
                for pairs in pairs.into_iter().collect::<std::collections::HashSet<_>>() {
                    let got = product(&wbits, &xs, pairs, (rows, k, n), kind, simd);
                    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                    let name =
                        format!("{simd:?} {dtype:?} pairs {} rows {rows} k {k} n {n}", pairs.is_some());
                    assert!(err < 1e-5, "{name}: {err}");
                    if rows <= EXACT_ROWS {
                        for (r, x) in xs.chunks(k).enumerate() {
                            let one = product(&wbits, x, None, (1, k, n), kind, simd);
                            assert!(
                                got[r * n..(r + 1) * n] == one[..],
                                "{name}: row {r} is not the one-row step's"
                            );
                        }
                    }
                }
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
