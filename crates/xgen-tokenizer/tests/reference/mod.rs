//! The reference path shared by the differential tests and the benchmark: tiktoken-rs's `CoreBPE`
//! built with the XGen ranks and specials and tiktoken's spelling of the GPT-2 pattern.

use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;
use xgen_tokenizer::{Tokenizer, N_VOCAB};

/// tiktoken's current spelling of the GPT-2 split pattern (fixtures `vocab.json` `pat_str`).
pub const PAT_STR: &str = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

/// `CoreBPE` over exactly `t`'s vocabulary.
pub fn reference(t: &Tokenizer) -> CoreBPE {
    let mut encoder = FxHashMap::default();
    let mut specials = FxHashMap::default();
    for id in 0..N_VOCAB {
        match t.special_token(id) {
            Some(s) => specials.insert(s.to_string(), id),
            None => encoder.insert(t.token_bytes(id).expect("every id has bytes").to_vec(), id),
        };
    }
    CoreBPE::new(encoder, specials, PAT_STR).expect("reference CoreBPE")
}
