//! Where each quant of a row sits in the packed layout, and the conversions from and to GGUF's
//! block bytes.
//!
//! A row's blocks go in groups of [`GROUP_BLOCKS`] (the last group may be shorter: `t` blocks).
//! A group's quants are runs of `4t` bytes, 8 runs for q8_0 and 4 for q4_0; in every run, bytes
//! `4b..4b + 4` belong to block `b` of the group. So one load of a run gives `vpdpbusd` block `b`'s
//! next 4 products in i32 lane `b`, and the runs of a group sum whole blocks lane by lane: a
//! block's scale is applied once per block, with no shuffles.
//! - q8_0: run `u` holds weights `4u..4u + 4` of each block, stored as `q + 128` (u8; the kernels'
//!   unsigned operand, the offset removed with `128 · Σ x`).
//! - q4_0: byte `m` (0..4) of run `v` holds weight `8v + m` in its low nibble and `8v + 4 + m` in
//!   its high nibble, as GGUF's nibbles `q + 8` (the offset removed with `8 · Σ x`): a mask, or a
//!   shift and a mask, gives the weights of q8_0's runs `2v` and `2v + 1`.
//! - q4_1, q4_k: the nibbles as q4_0's (no offset: the block's minimum is applied with `Σ x`
//!   instead). q4_1: its f16 `d` per block, `m` apart; q4_k: per block `s | m << 8` from the 12
//!   packed scale bytes, per 256 values `D`, `M` apart.
//!
//! Activations use q8_0's run order ([`super::Activations`]), unbiased.

use super::{BlockFormat, BLOCK, SUPER_BLOCK};

/// Blocks per group: 16 i32 lanes of a 512-bit register.
pub(crate) const GROUP_BLOCKS: usize = 16;

/// Byte offset (within the row) and shift of quant `i` (0..32) of block `b`, row of `nb` blocks.
pub(crate) fn position(format: BlockFormat, nb: usize, b: usize, i: usize) -> (usize, u32) {
    let (g, lane) = (b / GROUP_BLOCKS, b % GROUP_BLOCKS);
    let run = 4 * GROUP_BLOCKS.min(nb - g * GROUP_BLOCKS);
    let base = g * GROUP_BLOCKS * format.quant_bytes() + 4 * lane;
    match format {
        BlockFormat::Q8_0 => (base + run * (i / 4) + i % 4, 0),
        BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q4K => {
            let (v, m) = (i / 8, i % 8);
            (base + run * v + m % 4, 4 * (m / 4) as u32)
        }
    }
}

/// Minimum values per row of `nb` blocks: q4_1's `m` per block, q4_k's `D` and `M` per 256
/// values, none for q8_0/q4_0.
pub(crate) fn extra_len(format: BlockFormat, nb: usize) -> usize {
    match format {
        BlockFormat::Q4_1 => nb,
        BlockFormat::Q4K => 2 * nb * BLOCK / SUPER_BLOCK,
        BlockFormat::Q8_0 | BlockFormat::Q4_0 => 0,
    }
}

/// q4_k's 6-bit scale and minimum of block `j` (0..8) from its super-block's 12 bytes (GGUF's
/// `get_scale_min_k4`).
fn q4k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The inverse of [`q4k_scale_min`]: 8 (scale, minimum) pairs of 6 bits into 12 bytes.
fn q4k_pack_scales(pairs: &[(u8, u8); 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        let ((s, m), (s4, m4)) = (pairs[j], pairs[j + 4]);
        q[j] = s | (s4 >> 4) << 6;
        q[j + 4] = m | (m4 >> 4) << 6;
        q[j + 8] = (s4 & 0xF) | (m4 & 0xF) << 4;
    }
    q
}

/// Nibble `i` (0..32) of block `j` (0..8) of a q4_k super-block's 128 quant bytes: blocks `2p` and
/// `2p + 1` share bytes `32p..32p + 32`, low and high nibbles.
fn q4k_nibble(qs: &[u8], j: usize, i: usize) -> u8 {
    (qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 0x0F
}

/// Writes block `b`'s 32 nibbles (0..=15) into the packed q4 layout.
fn put_nibbles(q: &mut [u8], nb: usize, b: usize, nibbles: impl Fn(usize) -> u8) {
    for i in (0..BLOCK).step_by(8) {
        let (at, _) = position(BlockFormat::Q4_0, nb, b, i);
        for m in 0..4 {
            q[at + m] = nibbles(i + m) | nibbles(i + 4 + m) << 4;
        }
    }
}

/// The nibble (0..=15) of weight `i` of a GGUF q4_0 block's 16 quant bytes.
fn ggml_nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

/// One row of GGUF blocks -> packed quants `q` (zeroed), per-block scale bits `d` and the
/// minimums `extra` (see [`extra_len`]).
pub(crate) fn pack_row(format: BlockFormat, row: &[u8], q: &mut [u8], d: &mut [u16], extra: &mut [u16]) {
    let bb = format.ggml_block_bytes();
    let nb = row.len() / bb * (format.ggml_block_values() / BLOCK);
    let le = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    for (s, block) in row.chunks_exact(bb).enumerate() {
        match format {
            BlockFormat::Q8_0 => {
                d[s] = le(block);
                for i in (0..BLOCK).step_by(4) {
                    let (at, _) = position(format, nb, s, i);
                    for (o, &v) in q[at..at + 4].iter_mut().zip(&block[2 + i..2 + i + 4]) {
                        *o = v ^ 0x80; // i8 + 128 as u8
                    }
                }
            }
            BlockFormat::Q4_0 => {
                d[s] = le(block);
                put_nibbles(q, nb, s, |i| ggml_nibble(&block[2..], i));
            }
            BlockFormat::Q4_1 => {
                (d[s], extra[s]) = (le(block), le(&block[2..]));
                put_nibbles(q, nb, s, |i| ggml_nibble(&block[4..], i));
            }
            BlockFormat::Q4K => {
                (extra[2 * s], extra[2 * s + 1]) = (le(block), le(&block[2..]));
                let (scales, qs) = (&block[4..16], &block[16..]);
                for j in 0..SUPER_BLOCK / BLOCK {
                    let (sc, m) = q4k_scale_min(j, scales);
                    d[8 * s + j] = sc as u16 | (m as u16) << 8;
                    put_nibbles(q, nb, 8 * s + j, |i| q4k_nibble(qs, j, i));
                }
            }
        }
    }
}

/// The inverse of [`pack_row`]: GGUF blocks into `row` (zeroed).
pub(crate) fn unpack_row(format: BlockFormat, q: &[u8], d: &[u16], extra: &[u16], row: &mut [u8]) {
    let nb = d.len();
    for (s, block) in row.chunks_exact_mut(format.ggml_block_bytes()).enumerate() {
        match format {
            BlockFormat::Q8_0 => {
                block[..2].copy_from_slice(&d[s].to_le_bytes());
                for (i, v) in signed_block(format, q, nb, s).into_iter().enumerate() {
                    block[2 + i] = v as u8;
                }
            }
            BlockFormat::Q4_0 => {
                block[..2].copy_from_slice(&d[s].to_le_bytes());
                for (i, v) in signed_block(format, q, nb, s).into_iter().enumerate() {
                    block[2 + i % 16] |= ((v + 8) as u8) << (4 * (i / 16));
                }
            }
            BlockFormat::Q4_1 => {
                block[..2].copy_from_slice(&d[s].to_le_bytes());
                block[2..4].copy_from_slice(&extra[s].to_le_bytes());
                for (i, v) in signed_block(format, q, nb, s).into_iter().enumerate() {
                    block[4 + i % 16] |= (v as u8) << (4 * (i / 16));
                }
            }
            BlockFormat::Q4K => {
                block[..2].copy_from_slice(&extra[2 * s].to_le_bytes());
                block[2..4].copy_from_slice(&extra[2 * s + 1].to_le_bytes());
                let pairs: [(u8, u8); 8] = std::array::from_fn(|j| {
                    let v = d[8 * s + j];
                    (v as u8, (v >> 8) as u8)
                });
                block[4..16].copy_from_slice(&q4k_pack_scales(&pairs));
                for j in 0..SUPER_BLOCK / BLOCK {
                    for (i, v) in signed_block(format, q, nb, 8 * s + j).into_iter().enumerate() {
                        block[16 + 32 * (j / 2) + i] |= (v as u8) << (4 * (j % 2));
                    }
                }
            }
        }
    }
}

/// Block `b`'s 32 quants as signed values in order (offsets removed; q4_1's and q4_k's are their
/// nibbles 0..=15, the minimum apart).
pub(crate) fn signed_block(format: BlockFormat, q: &[u8], nb: usize, b: usize) -> [i8; BLOCK] {
    std::array::from_fn(|i| {
        let (at, shift) = position(format, nb, b, i);
        match format {
            BlockFormat::Q8_0 => (q[at] ^ 0x80) as i8,
            BlockFormat::Q4_0 => ((q[at] >> shift) & 0x0F) as i8 - 8,
            BlockFormat::Q4_1 | BlockFormat::Q4K => ((q[at] >> shift) & 0x0F) as i8,
        }
    })
}
