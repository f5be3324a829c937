//! The AMX path's packing, loops and scaling against the portable kernel, through an emulation of
//! `tdpbssd` (any AVX-512 VNNI host), and AMX's own instructions against the emulation where the
//! CPU has them.

use super::*;
use crate::kernels::quant::{kernel::dot_scalar, layout::signed_block};

/// `tdpbssd`'s definition (Intel SDM: `dst.row[m].dword[n] += Σ DPBD(src1.row[m].dword[k],
/// src2.row[k].dword[n])`), on zeroed accumulators.
struct Emulated;

impl TileMul for Emulated {
    type Config = ();

    fn configure() {}

    unsafe fn product2(a: *const i8, a_stride: usize, b: *const i8, c: &mut [Sums<i32>; 2]) {
        for (h, c) in c.iter_mut().enumerate() {
            for m in 0..TILE {
                for n in 0..TILE {
                    c.0[m][n] = (0..BLOCK)
                        .map(|i| {
                            // SAFETY: within the 16 rows of `a` and the 1024 bytes of `b`.
                            let (x, y) = unsafe {
                                (
                                    *a.add(m * a_stride + BLOCK * h + i),
                                    *b.add(B_TILE * h + i / 4 * 64 + 4 * n + i % 4),
                                )
                            };
                            x as i32 * y as i32
                        })
                        .sum();
                }
            }
        }
    }
}

fn simd() -> bool {
    let here = crate::kernels::quant::x86::available();
    if !here {
        eprintln!("no AVX-512 VNNI here: the AMX path (which needs it) is not taken on this CPU");
    }
    here
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u64 + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (h as f32 / (1u64 << 24) as f32 - 0.5) * (1.0 + (i % 7) as f32)
        })
        .collect()
}

fn matrix(format: BlockFormat, n: usize, k: usize, seed: u64) -> PackedMatrix {
    let w = candle_core::Tensor::from_vec(random(n * k, seed), (n, k), &candle_core::Device::Cpu).unwrap();
    PackedMatrix::quantize(&w, format).unwrap()
}

/// Block counts: one short group (3), a full group and a one-block group (17), full groups (32),
/// 21 full groups and a half one (344, the 7B's down projection); q4_k takes the multiples of 256
/// (with one more: a group and a half, 24).
const WIDTHS: [usize; 5] = [96, 544, 768, 1024, 11008];

const FORMATS: [BlockFormat; 4] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q4K];

fn holds(format: BlockFormat, k: usize) -> bool {
    k.is_multiple_of(format.ggml_block_values())
}

#[test]
fn unpacked_strips_are_the_blocks_in_order() {
    if !simd() {
        return;
    }
    for format in FORMATS {
        for k in WIDTHS.into_iter().filter(|&k| holds(format, k)) {
            let (w, nb) = (matrix(format, 32, k, 3), padded_blocks(k));
            let (mut strip, mut scales) = (vec![0i8; TILE * nb * BLOCK], Scales::new(TILE * nb));
            // SAFETY: AVX-512 (checked above).
            unsafe { unpack_strip(&w, 16, &mut strip, &mut scales) };
            for m in 0..TILE {
                let qs = w.row_qs(16 + m);
                for b in 0..nb {
                    let got = &strip[m * nb * BLOCK + b * BLOCK..][..BLOCK];
                    let (want, scale) = if b < k / BLOCK {
                        (signed_block(format, qs, k / BLOCK, b), w.block_scale(16 + m, b))
                    } else {
                        ([0; BLOCK], (0.0, 0.0))
                    };
                    assert_eq!(got, want, "{format:?} k {k} feature {m} block {b}");
                    let at = m * nb + b;
                    assert_eq!(
                        (scales.scale[at], scales.min[at]),
                        scale,
                        "{format:?} k {k} feature {m} block {b}"
                    );
                }
            }
        }
    }
}

#[test]
fn tile_activations_hold_each_block() {
    for (rows, k) in [(37, 544), (16, 96), (5, 1024)] {
        let acts = Activations::quantize(&random(rows * k, 4), rows, k);
        let tiles = TileActs::new(&acts);
        assert_eq!((tiles.groups, tiles.nb), (rows.div_ceil(TILE), padded_blocks(k)));
        for r in 0..tiles.groups * TILE {
            for b in 0..tiles.nb {
                let real = r < rows && b < k / BLOCK;
                let want = if real { acts.block_q(r, b) } else { [0; BLOCK] };
                let tile = &tiles.tiles(r / TILE, b)[..B_TILE];
                let got: [i8; BLOCK] = std::array::from_fn(|i| tile[i / 4 * 64 + 4 * (r % TILE) + i % 4]);
                assert_eq!(got, want, "rows {rows} k {k} row {r} block {b}");
                let scale = if real { acts.row_d(r)[b] } else { 0.0 };
                assert_eq!(tiles.scales(r / TILE, b)[r % TILE], scale);
                let sum = if real { acts.row_sums(r)[b] as f32 * scale } else { 0.0 };
                assert_eq!(tiles.dx_sums(r / TILE, b)[r % TILE], sum);
            }
        }
    }
}

/// `[rows, n]` from the portable kernel, the definition every path must match.
fn portable(w: &PackedMatrix, acts: &Activations) -> Vec<f32> {
    let mut y = vec![0f32; acts.rows * w.n];
    for j in 0..w.n {
        let mut col = vec![0f32; acts.rows];
        dot_scalar(w, j, acts, 0, 0..w.k / BLOCK, &mut col);
        col.iter().enumerate().for_each(|(r, &v)| y[r * w.n + j] = v);
    }
    y
}

fn max_rel(want: &[f32], got: &[f32]) -> f32 {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    want.iter().zip(got).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// (rows, k, n): one tile of rows, row counts not a multiple of 16, every kind of last group,
/// several matrices sharing the activations (q/k/v-style) in one pass.
const SHAPES: [(usize, &[usize], usize); 7] = [
    (16, &[16], 64),
    (37, &[48, 16], 544),
    (70, &[32], 96),
    (33, &[16, 32, 16], 1024),
    (20, &[16], 11008),
    (16, &[16], 256),
    (37, &[48, 16], 768),
];

fn check<T: TileMul>(label: &str) {
    for format in FORMATS {
        for (rows, ns, k) in SHAPES.into_iter().filter(|&(_, _, k)| holds(format, k)) {
            let ws: Vec<PackedMatrix> =
                ns.iter().enumerate().map(|(i, &n)| matrix(format, n, k, 10 + i as u64)).collect();
            let refs: Vec<&PackedMatrix> = ws.iter().collect();
            let acts = Activations::quantize(&random(rows * k, 5), rows, k);
            let ys = matmul_many_with::<T>(&refs, &acts);
            for (w, y) in ws.iter().zip(&ys) {
                let err = max_rel(&portable(w, &acts), y);
                assert!(err < 1e-5, "{label} {format:?} rows {rows} k {k} n {}: {err}", w.n);
            }
        }
    }
}

#[test]
fn emulated_tiles_equal_the_portable_kernel() {
    if simd() {
        check::<Emulated>("emulated");
    }
}

#[test]
fn amx_tiles_equal_the_portable_kernel() {
    if !available() {
        eprintln!("no AMX-INT8 here: the path is not taken on this CPU");
        return;
    }
    check::<Amx>("amx");
}
