//! Prompt products with bf16 weights on Intel AMX tiles (`tdpbf16ps`), where the CPU and the OS
//! offer them (Sapphire Rapids and later; Linux grants the tile state on request); also the
//! detection and tile configuration that the int8 tiles of [`crate::kernels::quant`] share.
//!
//! `y = x · wᵀ` with the weight as the tiles' A operand, read in place (16 features × 32 values of
//! `k` per tile, row-major as checkpoints store it), and the activations as B, packed once per call
//! in AMX's pair layout (row `p` holds values `2p, 2p + 1` of each of 32 activation rows). Each
//! step loads two weight tiles and two activation tiles and issues four `tdpbf16ps`, adding a
//! 32 features × 32 rows block of f32 sums (bf16 products, f32 accumulation, as the AVX-512 path).
//!
//! Measured on the 2-core VM this is tuned on: one core 343-356 GFLOP/s on `[32, 4096] ×
//! [4096, 11008]`, where the AVX-512 FMA tile reaches about 100 (docs/performance.md).
//! Tests compare it with plain f32 sums of the same products and with candle's matmul; without
//! AMX the AVX-512 path of [`crate::kernels::matvec`] runs.

use std::arch::asm;

use rayon::prelude::*;

/// Features and activation rows per output block (two 16-row tiles each way).
pub(crate) const BLOCK: usize = 32;

/// Whether AMX-BF16 runs here: the CPU has it and Linux grants this process the tile state.
pub(crate) fn available() -> bool {
    has(Unit::Bf16)
}

/// The AMX multiply units, by their CPUID.(EAX=7, ECX=0):EDX bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// `tdpbf16ps` (bit 22).
    Bf16,
    /// `tdpbssd` and its sign variants (bit 25).
    Int8,
}

/// Whether `unit` runs here: the CPU has it and the tiles (bit 24), and Linux grants this process
/// the tile state.
pub(crate) fn has(unit: Unit) -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // Leaf 7 only where the CPU reports it (its highest leaf, from leaf 0).
    let leaf7 = (__cpuid(0).eax >= 7).then(|| __cpuid_count(7, 0));
    let Some(leaf7) = leaf7 else { return false };
    let bit = match unit {
        Unit::Bf16 => 22,
        Unit::Int8 => 25,
    };
    let (unit, tiles) = (leaf7.edx & (1 << bit) != 0, leaf7.edx & (1 << 24) != 0);
    unit && tiles && request_tile_state()
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    /// `arch_prctl` request and the XSAVE feature number of tile data (`asm/prctl.h`).
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: asks for a permission; no memory is passed.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// `[rows, n]` f32: bf16 activations `x` `[rows, k]` (bits, natural order) times bf16 weights `w`
/// `[n, k]`ᵀ. Needs `n` and `k` multiples of [`BLOCK`] and [`available`] true.
pub(crate) fn matmul(w: &[u16], x: &[u16], rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(n.is_multiple_of(BLOCK) && k.is_multiple_of(BLOCK) && w.len() == n * k && x.len() == rows * k);
    let groups = rows.div_ceil(BLOCK);
    let packed = pack_pairs(x, rows, k, groups);
    // Feature-major blocks: [n / 32][groups][32 features × 32 rows].
    let mut yt = vec![0f32; n * groups * BLOCK];
    yt.par_chunks_mut(4 * BLOCK * groups * BLOCK).enumerate().for_each(|(t, chunk)| {
        let _tiles = TileConfig::load(&[(16, 64); 8]);
        for (fb, out) in chunk.chunks_mut(groups * BLOCK * BLOCK).enumerate() {
            let f = (t * 4 + fb) * BLOCK;
            for (g, block) in out.chunks_mut(BLOCK * BLOCK).enumerate() {
                // SAFETY: tiles configured by `_tiles`; 32 weight rows from `f`, the group's pairs,
                // and a 32 × 32 output block, all in bounds (shapes asserted above).
                unsafe { block_product(&w[f * k..(f + BLOCK) * k], k, &packed[g * k * BLOCK..], block) };
            }
        }
    });
    let mut y = vec![0f32; rows * n];
    for (fb, blocks) in yt.chunks(groups * BLOCK * BLOCK).enumerate() {
        for (r, row) in y.chunks_mut(n).enumerate() {
            let block = &blocks[(r / BLOCK) * BLOCK * BLOCK..];
            for i in 0..BLOCK {
                row[fb * BLOCK + i] = block[i * BLOCK + r % BLOCK];
            }
        }
    }
    y
}

/// Activation rows in groups of 32 (the last padded with zeros), each group `[k / 2, 32, 2]`.
fn pack_pairs(x: &[u16], rows: usize, k: usize, groups: usize) -> Vec<u16> {
    let mut packed = vec![0u16; groups * BLOCK * k];
    packed.par_chunks_mut(BLOCK * k).enumerate().for_each(|(g, group)| {
        for r in 0..BLOCK.min(rows - g * BLOCK) {
            let row = &x[(g * BLOCK + r) * k..][..k];
            for p in 0..k / 2 {
                group[p * 2 * BLOCK + 2 * r] = row[2 * p];
                group[p * 2 * BLOCK + 2 * r + 1] = row[2 * p + 1];
            }
        }
    });
    packed
}

/// Tile shapes loaded on this thread (`ldtilecfg`), released on drop (`tilerelease`).
pub(crate) struct TileConfig;

#[repr(C, align(64))]
struct Palette {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// `shapes[i]` = (rows, bytes per row) of tile `tmm{i}`; tiles past the list stay unused.
    /// The caller checked [`has`] for the unit it will run.
    pub(crate) fn load(shapes: &[(u8, u16)]) -> Self {
        assert!(
            shapes.len() <= 8 && shapes.iter().all(|&(r, c)| r <= 16 && c <= 64),
            "AMX tiles: 8 of 16 × 64 B"
        );
        let mut cfg = Palette { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        for (i, &(rows, colsb)) in shapes.iter().enumerate() {
            (cfg.rows[i], cfg.colsb[i]) = (rows, colsb);
        }
        // SAFETY: a valid palette-1 configuration (reserved bytes zero, shapes within limits);
        // the tile state was granted by `has`.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack)) };
        TileConfig
    }
}

impl Drop for TileConfig {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `load`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `out` `[32 features, 32 rows]` = weights `w` `[32, k]` times one packed activation group.
///
/// # Safety
/// A [`TileConfig`] must be loaded on this thread; `w` holds `32 · k` values, `pairs` `32 · k`,
/// `out` 1024.
unsafe fn block_product(w: &[u16], k: usize, pairs: &[u16], out: &mut [f32]) {
    let (w_stride, x_stride, out_stride) = (2 * k, 4 * BLOCK, 4 * BLOCK);
    // SAFETY (every tile instruction): addresses within the slices named in the contract.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for kk in (0..k).step_by(BLOCK) {
            // tmm4/5: features 0-15 / 16-31 × values kk..kk + 32; tmm6/7: rows 0-15 / 16-31.
            asm!(
                "tileloadd tmm4, [{a0} + {ws}*1]",
                "tileloadd tmm5, [{a1} + {ws}*1]",
                "tileloadd tmm6, [{b0} + {xs}*1]",
                "tileloadd tmm7, [{b1} + {xs}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) w.as_ptr().add(kk),
                a1 = in(reg) w.as_ptr().add(16 * k + kk),
                b0 = in(reg) pairs.as_ptr().add(kk * BLOCK),
                b1 = in(reg) pairs.as_ptr().add(kk * BLOCK + 32),
                ws = in(reg) w_stride,
                xs = in(reg) x_stride,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c1} + {cs}*1], tmm1",
            "tilestored [{c2} + {cs}*1], tmm2",
            "tilestored [{c3} + {cs}*1], tmm3",
            c0 = in(reg) out.as_mut_ptr(),
            c1 = in(reg) out.as_mut_ptr().add(16),
            c2 = in(reg) out.as_mut_ptr().add(16 * BLOCK),
            c3 = in(reg) out.as_mut_ptr().add(16 * BLOCK + 16),
            cs = in(reg) out_stride,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain f32 sum of the same bf16 products (only where AMX runs; elsewhere the path
    /// is never taken, which `available` decides).
    #[test]
    fn equals_f32_sums_of_bf16_products() {
        if !available() {
            eprintln!("no AMX-BF16 here: the path is not taken on this CPU");
            return;
        }
        let bf = |v: f32| (v.to_bits() >> 16) as u16;
        let widen = |b: u16| f32::from_bits((b as u32) << 16);
        for (rows, k, n) in [(1, 32, 32), (31, 64, 96), (70, 320, 64)] {
            let w: Vec<u16> = (0..n * k).map(|i| bf(((i * 7919 % 1000) as f32 / 500.0) - 1.0)).collect();
            let x: Vec<u16> = (0..rows * k).map(|i| bf(((i * 104_729 % 997) as f32 / 498.5) - 1.0)).collect();
            let y = matmul(&w, &x, rows, k, n);
            for r in 0..rows {
                for j in 0..n {
                    let want: f32 = (0..k).map(|i| widen(w[j * k + i]) * widen(x[r * k + i])).sum();
                    let got = y[r * n + j];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{k}x{n} [{r}, {j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}
