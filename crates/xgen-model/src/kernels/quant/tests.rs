//! The packed kernels against candle's quantized matmul (same GGUF blocks, activations quantized
//! the same way), the portable kernel against the SIMD one, and the layout round trip.

use candle_core::{
    quantized::{QMatMul, QTensor},
    Device, Module, Tensor,
};

use super::{kernel, Activations, BlockFormat, PackedMatrix};

fn random(n: usize, k: usize, seed: u64) -> Tensor {
    // Deterministic, varied magnitudes per row (so block scales differ).
    let v: Vec<f32> = (0..n * k)
        .map(|i| {
            let h = (i as u64 + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            let u = h as f32 / (1u64 << 24) as f32 - 0.5;
            u * (1.0 + (i / k % 7) as f32)
        })
        .collect();
    Tensor::from_vec(v, (n, k), &Device::Cpu).unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// (rows, k, n): full groups of 16 blocks and every kind of short last group (k/32 = 2, 3, 4, 5,
/// 6, 7, 32, 128, 344) and row counts across the tile sizes; prompts wider than one k slice of
/// the driver (4096 values), with and without a short last group (k/32 = 149, 256); for q4_k
/// (whole super-blocks of 8 blocks) one group, a group and a half, and the wider shapes.
const SHAPES: [(usize, usize, usize); 15] = [
    (33, 512, 23),
    (70, 768, 18),
    (1, 4096, 37),
    (33, 544, 23),
    (3, 96, 70),
    (4, 64, 1),
    (2, 1024, 129),
    (7, 160, 33),
    (16, 64, 5),
    (70, 128, 18),
    (1, 192, 9),
    (5, 224, 11),
    (1, 11008, 8),
    (9, 4768, 6),
    (6, 8192, 5),
];

#[test]
fn equals_candle_quantized_matmul() {
    for format in [BlockFormat::Q8_0, BlockFormat::Q4_0] {
        for (rows, k, n) in SHAPES {
            let w = random(n, k, 1);
            let x = random(rows, k, 2).unsqueeze(0).unwrap();
            let q = QTensor::quantize(&w, format.ggml()).unwrap();
            let want: Vec<f32> = QMatMul::from_qtensor(q)
                .unwrap()
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let packed = PackedMatrix::quantize(&w, format).unwrap();
            let got = packed.forward(&x).unwrap();
            assert_eq!(got.dims(), &[1, rows, n]);
            let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            // Same integer sums and scales; only the f32 summation order differs.
            let err = max_rel(&want, &got);
            assert!(err < 1e-5, "{format:?} rows {rows} k {k} n {n}: {err}");
        }
    }
}

const FORMATS: [BlockFormat; 4] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q4K];

/// Every format with the shapes it can hold (q4_k: widths in whole 256-value super-blocks).
fn cases() -> impl Iterator<Item = (BlockFormat, (usize, usize, usize))> {
    FORMATS.into_iter().flat_map(|format| {
        let values = format.ggml_block_values();
        SHAPES
            .into_iter()
            .filter(move |&(_, k, _)| k.is_multiple_of(values))
            .map(move |shape| (format, shape))
    })
}

/// The formats with minimums against their definition: candle's (GGUF's) dequantized weights
/// times the activations as quantized here (candle's own q4_1 and q4_k products quantize
/// activations as q8_1 and q8_K instead).
#[test]
fn minimum_formats_equal_dequantized_weights_times_quantized_activations() {
    let mut shapes = 0;
    for (format, (rows, k, n)) in cases().filter(|(f, _)| matches!(f, BlockFormat::Q4_1 | BlockFormat::Q4K)) {
        let q = QTensor::quantize(&random(n, k, 1), format.ggml()).unwrap();
        let w: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let packed = PackedMatrix::from_ggml(format, n, k, &q.data().unwrap()).unwrap();
        let mut row = vec![0f32; k];
        for j in 0..n {
            packed.dequantize_row(j, &mut row);
            assert_eq!(row, w[j * k..(j + 1) * k], "{format:?} row {j} dequantizes as GGUF's");
        }
        let xs: Vec<f32> = random(rows, k, 2).flatten_all().unwrap().to_vec1().unwrap();
        let acts = Activations::quantize(&xs, rows, k);
        let x: Vec<f64> = (0..rows)
            .flat_map(|r| (0..k / 32).flat_map(move |b| (0..32).map(move |i| (r, b, i))))
            .map(|(r, b, i)| acts.block_q(r, b)[i] as f64 * acts.row_d(r)[b] as f64)
            .collect();
        let want: Vec<f32> = (0..rows * n)
            .map(|o| {
                let (r, j) = (o / n, o % n);
                (0..k).map(|i| w[j * k + i] as f64 * x[r * k + i]).sum::<f64>() as f32
            })
            .collect();
        let err = max_rel(&want, &packed.matmul(&acts));
        assert!(err < 1e-5, "{format:?} rows {rows} k {k} n {n}: {err}");
        shapes += 1;
    }
    assert!(shapes >= 20, "shapes tested: {shapes}");
}

#[test]
fn portable_kernel_equals_simd_kernel() {
    for (format, (rows, k, n)) in cases() {
        let w = PackedMatrix::quantize(&random(n, k, 3), format).unwrap();
        let xs: Vec<f32> = random(rows, k, 4).flatten_all().unwrap().to_vec1().unwrap();
        let acts = Activations::quantize(&xs, rows, k);
        let fast = w.matmul(&acts);
        let mut portable = vec![0f32; rows * n];
        for j in 0..n {
            for r in 0..rows {
                kernel::dot_scalar(&w, j, &acts, r, 0..k / 32, &mut portable[r * n + j..r * n + j + 1]);
            }
        }
        let err = max_rel(&portable, &fast);
        assert!(err < 1e-5, "{format:?} rows {rows} k {k} n {n}: {err}");
    }
}

/// The VNNI and portable tile drivers forced (where AMX runs, prompts of 16 rows and more take
/// its tiles instead), each against the portable definition, for every format.
#[test]
fn every_tile_path_equals_the_portable_definition() {
    let mut paths: Vec<(&str, kernel::Kernels)> = vec![("portable", kernel::Kernels::PORTABLE)];
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        paths.push(("avx512-vnni", kernel::Kernels { tile: super::x86::tile, few: super::x86_few::tile }));
    }
    #[cfg(target_arch = "x86_64")]
    if super::x86_avx2::available() {
        paths.push(("avx2", kernel::Kernels::AVX2));
    }
    for format in FORMATS {
        let few = [(2, 512, 37), (3, 768, 10), (5, 4608, 9), (8, 512, 21), (11, 768, 7), (15, 512, 6)];
        for (rows, k, n) in [(16, 512, 32), (37, 768, 48), (70, 4096, 16)].into_iter().chain(few) {
            let ws = [
                PackedMatrix::quantize(&random(n, k, 3), format).unwrap(),
                PackedMatrix::quantize(&random(16, k, 6), format).unwrap(),
            ];
            let xs: Vec<f32> = random(rows, k, 4).flatten_all().unwrap().to_vec1().unwrap();
            let acts = Activations::quantize(&xs, rows, k);
            for (name, tile_fn) in &paths {
                let ys = kernel::tiles_many(&[&ws[0], &ws[1]], &acts, *tile_fn);
                // Steps of a few rows: each row's product is the one-row step's, bit for bit.
                if rows < 16 {
                    for (r, x) in xs.chunks(k).enumerate() {
                        let one =
                            kernel::tiles_many(&[&ws[0], &ws[1]], &Activations::quantize(x, 1, k), *tile_fn);
                        for (y, one) in ys.iter().zip(&one) {
                            let n = one.len();
                            assert!(
                                y[r * n..][..n] == one[..],
                                "{name} {format:?} row {r} of {rows}: not exact"
                            );
                        }
                    }
                }
                for (w, y) in ws.iter().zip(ys) {
                    let mut want = vec![0f32; rows * w.n];
                    for j in 0..w.n {
                        for r in 0..rows {
                            kernel::dot_scalar(w, j, &acts, r, 0..k / 32, &mut want[r * w.n + j..][..1]);
                        }
                    }
                    let err = max_rel(&want, &y);
                    assert!(err < 1e-5, "{name} {format:?} rows {rows} k {k} n {}: {err}", w.n);
                }
            }
        }
    }
}

#[test]
fn ggml_bytes_round_trip_through_the_packed_layout() {
    for format in FORMATS {
        let widths: [(usize, usize); 8] =
            [(96, 3), (64, 2), (4096, 2), (160, 2), (192, 3), (224, 2), (256, 3), (768, 2)];
        for (k, n) in widths.into_iter().filter(|(k, _)| k.is_multiple_of(format.ggml_block_values())) {
            let q = QTensor::quantize(&random(n, k, 5), format.ggml()).unwrap();
            let bytes = q.data().unwrap().into_owned();
            let packed = PackedMatrix::from_ggml(format, n, k, &bytes).unwrap();
            assert_eq!(packed.to_ggml(), bytes, "{format:?} [{n}, {k}]");
            // q4_k holds its 6-bit scales and minimums as bytes: 16 in place of 12 per 256 values.
            let unpacked_scales = if format == BlockFormat::Q4K { n * k / 256 * 4 } else { 0 };
            assert_eq!(packed.bytes(), bytes.len() + unpacked_scales, "{format:?} [{n}, {k}]");
        }
    }
}

#[test]
fn rejects_bytes_that_do_not_fit_the_shape() {
    let err = PackedMatrix::from_ggml(BlockFormat::Q8_0, 2, 64, &[0u8; 100]).unwrap_err().to_string();
    assert!(err.contains("136 bytes, got 100"), "{err}");
    assert!(PackedMatrix::from_ggml(BlockFormat::Q4_0, 1, 40, &[0u8; 18]).is_err());
}

#[test]
fn matrices_multiplied_together_equal_each_alone() {
    // Row counts that split 4-row tiles across matrices, one and several activation rows.
    for format in FORMATS {
        let k = 96.max(format.ggml_block_values());
        let ws: Vec<PackedMatrix> = [37, 70, 5]
            .iter()
            .map(|&n| PackedMatrix::quantize(&random(n, k, n as u64), format).unwrap())
            .collect();
        for rows in [1, 70] {
            let x = random(rows, k, 9).unsqueeze(0).unwrap();
            let together = PackedMatrix::forward_many(&ws.iter().collect::<Vec<_>>(), &x).unwrap();
            for (w, got) in ws.iter().zip(together) {
                let want: Vec<f32> = w.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want,
                    "{format:?} rows {rows}"
                );
            }
        }
    }
    let mismatched = [
        PackedMatrix::quantize(&random(4, 64, 1), BlockFormat::Q8_0).unwrap(),
        PackedMatrix::quantize(&random(4, 96, 1), BlockFormat::Q8_0).unwrap(),
    ];
    assert!(PackedMatrix::forward_many(&[&mismatched[0], &mismatched[1]], &random(1, 64, 2)).is_err());
}

#[test]
fn simd_quantizers_equal_the_portable_one() {
    // A row of 21 blocks (a group of 16 and a short one): random values, a block of zeros, and
    // blocks whose scale is exactly 1 so that x / d lands on halves (ties round away from zero).
    let k = 21 * 32;
    let mut x: Vec<f32> = random(1, k, 9).flatten_all().unwrap().to_vec1().unwrap();
    x[64..96].fill(0.0);
    for (i, v) in x[96..160].iter_mut().enumerate() {
        *v = if i % 32 == 0 { 127.0 } else { (i as f32 - 32.0) + 0.5 };
    }
    x[160] = -127.0;
    x[161] = -2.5;
    let nb = k / 32;
    let (mut g1, mut d1, mut s1) = (vec![0i8; k], vec![0f32; nb], vec![0i32; nb]);
    super::activations::quantize_row_any(&x, &mut g1, &mut d1, &mut s1);
    assert!(g1.contains(&-3) && g1.contains(&-31), "ties present and rounded away from zero");
    type Quantizer = unsafe fn(&[f32], &mut [i8], &mut [f32], &mut [i32]);
    let mut simd: Vec<(&str, Quantizer)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if super::x86::available() {
        simd.push(("avx512", super::x86::quantize_row));
    }
    #[cfg(target_arch = "x86_64")]
    if super::x86_avx2::available() {
        simd.push(("avx2", super::x86_avx2::quantize_row));
    }
    if simd.is_empty() {
        eprintln!("no SIMD quantizer here: the portable one is the one in use");
    }
    for (name, quantize) in simd {
        let (mut g2, mut d2, mut s2) = (vec![0i8; k], vec![0f32; nb], vec![0i32; nb]);
        // SAFETY: the CPU has the quantizer's features (checked above).
        unsafe { quantize(&x, &mut g2, &mut d2, &mut s2) };
        assert_eq!(d1, d2, "{name}");
        assert_eq!(s1, s2, "{name}");
        assert_eq!(g1, g2, "{name}");
    }
}

/// The largest products the formats allow, where SIMD kernels sum in narrow integers (AVX2 adds a
/// q4 block's nibble products in i16, q8_0's pairs as `|q| · ±x`): nibbles all 15 or all 0, q8_0
/// quants of -128 (GGUF files may hold them) and 127, against activations of ±127.
#[test]
fn extreme_blocks_sum_exactly() {
    let k = 512 + 96; // a full group of 16 blocks and a short one
    let block = |format: BlockFormat, quants: u8| -> Vec<u8> {
        let one = half::f16::from_f32(1.0).to_bits().to_le_bytes();
        let mut b = one.to_vec();
        if format == BlockFormat::Q4_1 {
            b.extend(half::f16::from_f32(-3.0).to_bits().to_le_bytes());
        }
        b.resize(format.ggml_block_bytes(), quants);
        b
    };
    let cases = [
        (BlockFormat::Q4_0, [0xFF, 0x00]),
        (BlockFormat::Q4_1, [0xFF, 0x00]),
        (BlockFormat::Q8_0, [0x80, 0x7F]),
    ];
    for (format, quants) in cases {
        let bytes: Vec<u8> = quants.iter().flat_map(|&q| block(format, q).repeat(k / 32)).collect();
        let w = PackedMatrix::from_ggml(format, 2, k, &bytes).unwrap();
        let xs: Vec<f32> = [1.0f32, -1.0, 0.5].iter().flat_map(|&v| vec![v; k]).collect();
        let acts = Activations::quantize(&xs, 3, k);
        let got = w.matmul(&acts);
        let mut want = vec![0f32; 3 * 2];
        for j in 0..2 {
            for r in 0..3 {
                kernel::dot_scalar(&w, j, &acts, r, 0..k / 32, &mut want[r * 2 + j..][..1]);
            }
        }
        // Exact integer sums both ways; only the order of the f32 additions differs.
        let err = max_rel(&want, &got);
        assert!(err < 1e-6, "{format:?}: {got:?} against {want:?}");
        // Weight row 0 times x = 1 (quants 127): k · w · 127 · d_x, w = 7 (q4_0), 15 - 3 (q4_1), -128.
        let w0 = match format {
            BlockFormat::Q4_0 => 7.0,
            BlockFormat::Q4_1 => 12.0,
            _ => -128.0,
        };
        let exact = k as f64 * w0 * 127.0 * acts.row_d(0)[0] as f64;
        assert!(((got[0] as f64 - exact) / exact).abs() < 1e-6, "{format:?}: {} against {exact}", got[0]);
    }
}
