//! The XGen vocabulary: embedded GPT-2 ranks, the 38 whitespace-run ranks and the 906 specials.
//!
//! Construction follows `tokenization_xgen.py` (current `main`) step by step; ids are consecutive:
//!
//! | ids           | what                                                   | kind      |
//! |---------------|--------------------------------------------------------|-----------|
//! | 0..50255      | GPT-2 (`r50k_base`) mergeable ranks                    | mergeable |
//! | 50256         | `<|endoftext|>` (bos = eos)                            | special   |
//! | 50257..50286  | runs of 31, 30, …, 2 spaces                            | mergeable |
//! | 50287..50294  | runs of 9, 8, …, 2 tabs                                | mergeable |
//! | 50295..50312  | 18 FIM / code tokens, `<fim_prefix>` … `<reponame>`    | special   |
//! | 50313..50318  | `<dummy_0>`…`<dummy_3>`, `<sep>`, `<eom>`              | special   |
//! | 50319..51199  | `<mask_881>`, `<mask_880>`, …, `<mask_1>`              | special   |

use rustc_hash::FxHashMap;

/// A token id; also the BPE rank of a mergeable token.
pub type TokenId = u32;

/// Number of ids, equal to the model's `vocab_size`.
pub const N_VOCAB: u32 = 51200;
/// `<|endoftext|>`: XGen's bos, eos and document separator.
pub const EOS_TOKEN_ID: TokenId = 50256;
/// The text of [`EOS_TOKEN_ID`].
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Rank 0..50256 of tiktoken's `gpt2`, written by `build.rs` as (`u16` LE length, bytes) records.
const GPT2_RANKS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gpt2_ranks.bin"));
const GPT2_N_RANKS: u32 = 50256;
const FIRST_WHITESPACE_ID: TokenId = 50257;
const LONGEST_SPACE_RUN: usize = 31;
const LONGEST_TAB_RUN: usize = 9;
const FIRST_CODE_SPECIAL_ID: TokenId = 50295;
const CODE_SPECIALS: [&str; 18] = [
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
];
const N_MASKS: u32 = 881;

/// The vocabulary tables. Built once by [`Vocab::xgen`]; read-only afterwards.
pub(crate) struct Vocab {
    /// Mergeable token bytes -> rank (= id), for BPE. 50294 entries.
    pub ranks: FxHashMap<Vec<u8>, TokenId>,
    /// Special token text -> id. 906 entries.
    pub specials: FxHashMap<String, TokenId>,
    /// Bytes of every id, concatenated; id `i` is `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    /// Whether each id is special.
    is_special: Vec<bool>,
}

impl Vocab {
    pub fn xgen() -> Self {
        let mut tokens: Vec<(Vec<u8>, bool)> = Vec::with_capacity(N_VOCAB as usize);
        let mut blob = GPT2_RANKS;
        for _ in 0..GPT2_N_RANKS {
            let len = usize::from(u16::from_le_bytes([blob[0], blob[1]]));
            tokens.push((blob[2..2 + len].to_vec(), false));
            blob = &blob[2 + len..];
        }
        debug_assert!(blob.is_empty(), "gpt2_ranks.bin holds exactly 50256 ranks");
        tokens.push((EOS_TOKEN.as_bytes().to_vec(), true));
        debug_assert_eq!(tokens.len() as u32, FIRST_WHITESPACE_ID);
        for n in (2..=LONGEST_SPACE_RUN).rev() {
            tokens.push((vec![b' '; n], false));
        }
        for n in (2..=LONGEST_TAB_RUN).rev() {
            tokens.push((vec![b'\t'; n], false));
        }
        debug_assert_eq!(tokens.len() as u32, FIRST_CODE_SPECIAL_ID);
        let additional = (0..4)
            .map(|i| format!("<dummy_{i}>"))
            .chain(["<sep>".to_string(), "<eom>".to_string()])
            .chain((1..=N_MASKS).rev().map(|i| format!("<mask_{i}>")));
        let code = CODE_SPECIALS.iter().map(|s| s.to_string());
        tokens.extend(code.chain(additional).map(|s| (s.into_bytes(), true)));
        debug_assert_eq!(tokens.len() as u32, N_VOCAB);
        Self::from_tokens(tokens)
    }

    fn from_tokens(tokens: Vec<(Vec<u8>, bool)>) -> Self {
        let mut ranks = FxHashMap::default();
        let mut specials = FxHashMap::default();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        let mut is_special = Vec::with_capacity(tokens.len());
        offsets.push(0);
        for (id, (token, special)) in tokens.into_iter().enumerate() {
            let id = id as TokenId;
            bytes.extend_from_slice(&token);
            offsets.push(bytes.len() as u32);
            is_special.push(special);
            if special {
                let text = String::from_utf8(token).expect("special tokens are ASCII");
                specials.insert(text, id);
            } else {
                ranks.insert(token, id);
            }
        }
        Self { ranks, specials, bytes, offsets, is_special }
    }

    /// The bytes of `id`, or `None` when `id >= N_VOCAB`.
    #[inline]
    pub fn token_bytes(&self, id: TokenId) -> Option<&[u8]> {
        let i = id as usize;
        let (start, end) = (*self.offsets.get(i)?, *self.offsets.get(i + 1)?);
        Some(&self.bytes[start as usize..end as usize])
    }

    pub fn is_special(&self, id: TokenId) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_reference_construction() {
        let v = Vocab::xgen();
        assert_eq!(v.ranks.len(), 50294);
        assert_eq!(v.specials.len(), 906);
        assert_eq!(v.token_bytes(50257), Some(&[b' '; 31][..]));
        assert_eq!(v.token_bytes(50286), Some(&b"  "[..]));
        assert_eq!(v.token_bytes(50287), Some(&[b'\t'; 9][..]));
        assert_eq!(v.token_bytes(50294), Some(&b"\t\t"[..]));
        assert_eq!(v.specials["<fim_prefix>"], 50295);
        assert_eq!(v.specials["<reponame>"], 50312);
        assert_eq!(v.specials["<dummy_0>"], 50313);
        assert_eq!(v.specials["<eom>"], 50318);
        assert_eq!(v.specials["<mask_881>"], 50319);
        assert_eq!(v.specials["<mask_1>"], 51199);
        assert_eq!(v.token_bytes(N_VOCAB), None);
        assert!(v.is_special(EOS_TOKEN_ID) && !v.is_special(50257) && !v.is_special(N_VOCAB));
    }
}
