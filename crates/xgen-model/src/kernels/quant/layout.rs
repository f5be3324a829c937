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
//!
//! Activations use q8_0's run order ([`super::Activations`]), unbiased.

use super::{BlockFormat, BLOCK};

/// Blocks per group: 16 i32 lanes of a 512-bit register.
pub(crate) const GROUP_BLOCKS: usize = 16;

/// Byte offset (within the row) and shift of quant `i` (0..32) of block `b`, row of `nb` blocks.
pub(crate) fn position(format: BlockFormat, nb: usize, b: usize, i: usize) -> (usize, u32) {
    let (g, lane) = (b / GROUP_BLOCKS, b % GROUP_BLOCKS);
    let run = 4 * GROUP_BLOCKS.min(nb - g * GROUP_BLOCKS);
    let base = g * GROUP_BLOCKS * format.quant_bytes() + 4 * lane;
    match format {
        BlockFormat::Q8_0 => (base + run * (i / 4) + i % 4, 0),
        BlockFormat::Q4_0 => {
            let (v, m) = (i / 8, i % 8);
            (base + run * v + m % 4, 4 * (m / 4) as u32)
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

/// One row of GGUF blocks -> packed quants `q` (zeroed) and scale bits `d`.
pub(crate) fn pack_row(format: BlockFormat, row: &[u8], q: &mut [u8], d: &mut [u16]) {
    let bb = format.ggml_block_bytes();
    let nb = row.len() / bb;
    for (b, block) in row.chunks_exact(bb).enumerate() {
        d[b] = u16::from_le_bytes([block[0], block[1]]);
        let quants = &block[2..];
        match format {
            BlockFormat::Q8_0 => {
                for i in (0..BLOCK).step_by(4) {
                    let (at, _) = position(format, nb, b, i);
                    for (o, &v) in q[at..at + 4].iter_mut().zip(&quants[i..i + 4]) {
                        *o = v ^ 0x80; // i8 + 128 as u8
                    }
                }
            }
            BlockFormat::Q4_0 => {
                for i in (0..BLOCK).step_by(8) {
                    let (at, _) = position(format, nb, b, i);
                    for m in 0..4 {
                        q[at + m] = ggml_nibble(quants, i + m) | ggml_nibble(quants, i + 4 + m) << 4;
                    }
                }
            }
        }
    }
}

/// The inverse of [`pack_row`]: GGUF blocks into `row` (zeroed).
pub(crate) fn unpack_row(format: BlockFormat, q: &[u8], d: &[u16], row: &mut [u8]) {
    let bb = format.ggml_block_bytes();
    let nb = row.len() / bb;
    for (b, block) in row.chunks_exact_mut(bb).enumerate() {
        block[..2].copy_from_slice(&d[b].to_le_bytes());
        for (i, v) in signed_block(format, q, nb, b).into_iter().enumerate() {
            match format {
                BlockFormat::Q8_0 => block[2 + i] = v as u8,
                BlockFormat::Q4_0 => block[2 + i % 16] |= ((v + 8) as u8) << (4 * (i / 16)),
            }
        }
    }
}

/// Block `b`'s 32 quants as signed values in order (offsets removed).
pub(crate) fn signed_block(format: BlockFormat, q: &[u8], nb: usize, b: usize) -> [i8; BLOCK] {
    std::array::from_fn(|i| {
        let (at, shift) = position(format, nb, b, i);
        match format {
            BlockFormat::Q8_0 => (q[at] ^ 0x80) as i8,
            BlockFormat::Q4_0 => ((q[at] >> shift) & 0x0F) as i8 - 8,
        }
    })
}
