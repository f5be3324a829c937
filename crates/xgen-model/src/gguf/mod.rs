//! GGUF files of XGen in llama.cpp's layout: arch `llama`, llama.cpp's tensor names
//! ([`crate::weights::names::to_gguf`]), q/k rows permuted for llama.cpp's RoPE, every
//! hyper-parameter under `llama.*`, the HF `config.json` under [`HF_CONFIG_KEY`] (so a reload
//! restores the exact configuration) and, written by the caller, the tokenizer under
//! `tokenizer.ggml.*`. [`write`](mod@write) streams a checkpoint into one; [`read`] loads ours and
//! llama.cpp's.
//!
//! The permutation: llama.cpp rotates adjacent pairs (2i, 2i+1) of a head, HF's `rotate_half`
//! rotates (i, i + head_dim/2). llama.cpp's converter reorders each head's q/k output rows so the
//! two agree: GGUF row `2i + s` of a head holds HF row `s · head_dim/2 + i`. Rows are whole
//! blocks of any GGUF type, so the reorder works on quantized bytes as well.

pub mod read;
pub mod write;

pub use candle_core::quantized::GgmlDType;

pub use candle_core::quantized::gguf_file::Value;

/// Metadata key holding the HF `config.json` (a JSON string) in files xgen writes.
pub const HF_CONFIG_KEY: &str = "xgen.hf_config";
/// Data alignment (GGUF's default).
pub(crate) const ALIGNMENT: u64 = 32;

/// GGUF's id of a ggml type.
pub(crate) fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes of `elems` values of type `t`.
pub(crate) fn type_bytes(t: GgmlDType, elems: usize) -> usize {
    elems / t.block_size() * t.type_size()
}

/// Reorders the rows of a q/k projection (`rows` rows of `row_bytes` bytes) between HF's order and
/// llama.cpp's; `to_gguf` picks the direction.
pub(crate) fn permute_rope_rows(bytes: &[u8], row_bytes: usize, head_dim: usize, to_gguf: bool) -> Vec<u8> {
    let rows = bytes.len() / row_bytes;
    let half = head_dim / 2;
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        let (head, within) = (r / head_dim, r % head_dim);
        // GGUF row `2i + s` <-> HF row `s · half + i`.
        let (i, s) = (within / 2, within % 2);
        let hf = head * head_dim + s * half + i;
        let (dst, src) = if to_gguf { (r, hf) } else { (hf, r) };
        out[dst * row_bytes..(dst + 1) * row_bytes]
            .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
    }
    out
}

/// Storage for [`aligned`]'s copies.
pub(crate) type AlignedCopy = Vec<u64>;

/// `bytes` at an address aligned for every GGML block type (candle reads tensor data as `&[T]`,
/// which needs `T`'s alignment: 4 for f32): as they are when aligned, else copied into `copy`.
/// A file's `general.alignment` may be 1 and its offsets odd (fuzzing found one), so the mapped
/// bytes of a tensor are not always aligned.
pub(crate) fn aligned<'a>(bytes: &'a [u8], copy: &'a mut AlignedCopy) -> &'a [u8] {
    if bytes.as_ptr().align_offset(std::mem::align_of::<u64>()) == 0 {
        return bytes;
    }
    *copy = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: the u64s are initialized and at least `bytes.len()` bytes long; u8 has no
    // alignment or validity requirement, and `copy` stays borrowed for as long as the slice.
    let out = unsafe { std::slice::from_raw_parts_mut(copy.as_mut_ptr().cast::<u8>(), bytes.len()) };
    out.copy_from_slice(bytes);
    out
}

/// Whether checkpoint tensor `name` is a q or k projection (permuted in GGUF).
pub(crate) fn is_rope_permuted(name: &str) -> bool {
    name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.k_proj.weight")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_permutation_matches_llama_cpp_and_inverts() {
        // llama.cpp: w.reshape(n_head, 2, hd // 2, k).swapaxes(1, 2).reshape(...): for hd = 4 the
        // rows of a head go 0, 2, 1, 3.
        let rows: Vec<u8> = (0..8).collect(); // 2 heads × 4 rows of 1 byte
        let gguf = permute_rope_rows(&rows, 1, 4, true);
        assert_eq!(gguf, [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(permute_rope_rows(&gguf, 1, 4, false), rows);
        let wide: Vec<u8> = (0..48).collect(); // 1 head of 8 rows × 6 bytes
        assert_eq!(permute_rope_rows(&permute_rope_rows(&wide, 6, 8, true), 6, 8, false), wide);
    }

    #[test]
    fn unaligned_tensor_bytes_are_copied_to_an_aligned_address() {
        let backing: Vec<u64> = (0..9).collect();
        // SAFETY: a byte view of initialized u64s.
        let all = unsafe { std::slice::from_raw_parts(backing.as_ptr().cast::<u8>(), 72) };
        for start in 0..8 {
            let bytes = &all[start..start + 64];
            let mut copy = AlignedCopy::new();
            let out = aligned(bytes, &mut copy);
            assert_eq!(out, bytes);
            assert_eq!(out.as_ptr().align_offset(8), 0, "start {start}");
            assert_eq!(copy.is_empty(), start == 0, "copied only when unaligned");
        }
    }
}
