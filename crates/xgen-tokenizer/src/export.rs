//! The vocabulary as a GPT-2-style byte-level BPE table (token strings, merges, token kinds): the
//! form GGUF (`tokenizer.ggml.*`) and HF `tokenizer.json` store, for other engines to read.
//!
//! Token strings map each byte through GPT-2's `bytes_to_unicode` (printable bytes stay, the rest
//! shift to U+0100…). Merges are recovered from the ranks: a mergeable token of rank `r` is the
//! merge of the two parts that BPE with only the ranks below `r` leaves of its bytes. XGen's
//! whitespace runs rank *below* the shorter runs they contain, so BPE over lower ranks cannot
//! build them; tiktoken joins any two adjacent parts whose concatenation is a token, so for them
//! every split into two tokens is listed (at the token's rank), which makes merge-list BPE
//! (llama.cpp, HF) join them in tiktoken's order. Tokens with no split at all are listed in
//! [`BpeTable::unreachable`] (none for XGen).

use rustc_hash::FxHashMap;

use crate::{bpe, vocab::N_VOCAB, TokenId, XgenTokenizer};

/// How a token is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A mergeable (BPE) token.
    Normal,
    /// A special token (`<|endoftext|>`, FIM and mask tokens).
    Control,
}

/// The vocabulary in GPT-2 byte-level form.
pub struct BpeTable {
    /// Byte-level string of every id, `0..N_VOCAB`; specials as their text.
    pub tokens: Vec<String>,
    pub kinds: Vec<TokenKind>,
    /// `"left right"` in byte-level strings, in rank order.
    pub merges: Vec<String>,
    /// Mergeable multi-byte tokens with no split into two tokens.
    pub unreachable: Vec<TokenId>,
}

/// GPT-2's `bytes_to_unicode`: byte -> the char that stands for it in token strings.
pub fn byte_to_char() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    table
}

impl XgenTokenizer {
    /// The vocabulary as a byte-level BPE table (a few seconds: one BPE run per token).
    pub fn bpe_table(&self) -> BpeTable {
        let chars = byte_to_char();
        let text = |bytes: &[u8]| bytes.iter().map(|&b| chars[b as usize]).collect::<String>();
        let mut tokens = Vec::with_capacity(N_VOCAB as usize);
        let mut kinds = Vec::with_capacity(N_VOCAB as usize);
        let mut merges = Vec::new();
        let mut unreachable = Vec::new();
        let mut lower: bpe::Ranks = FxHashMap::default();
        for id in 0..N_VOCAB {
            let bytes = self.vocab.token_bytes(id).expect("ids below N_VOCAB exist");
            if self.vocab.is_special(id) {
                tokens.push(String::from_utf8_lossy(bytes).into_owned());
                kinds.push(TokenKind::Control);
                continue;
            }
            tokens.push(text(bytes));
            kinds.push(TokenKind::Normal);
            if bytes.len() >= 2 {
                let bounds = bpe::merge_scan(&lower, bytes);
                if bounds.len() == 3 {
                    merges.push(format!("{} {}", text(&bytes[..bounds[1]]), text(&bytes[bounds[1]..])));
                } else {
                    let before = merges.len();
                    for cut in 1..bytes.len() {
                        let (a, b) = bytes.split_at(cut);
                        if self.vocab.ranks.contains_key(a) && self.vocab.ranks.contains_key(b) {
                            merges.push(format!("{} {}", text(a), text(b)));
                        }
                    }
                    if merges.len() == before {
                        unreachable.push(id);
                    }
                }
            }
            lower.insert(bytes.to_vec(), id);
        }
        BpeTable { tokens, kinds, merges, unreachable }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_part_has_gpt2s_merges() {
        let table = XgenTokenizer::new().bpe_table();
        assert_eq!(table.tokens.len(), N_VOCAB as usize);
        // GPT-2's merges.txt: 50000 merges, the first `Ġ t`, for ids 256..50256.
        assert_eq!(table.merges[0], "Ġ t");
        assert_eq!(table.tokens[220], "Ġ");
        assert_eq!(table.tokens[198], "Ċ");
        assert_eq!(table.tokens[50256], "<|endoftext|>");
        assert_eq!(table.kinds[50256], TokenKind::Control);
        assert_eq!(table.kinds[50257], TokenKind::Normal);
        assert!(table.unreachable.is_empty(), "{:?}", table.unreachable);
        // Then the whitespace runs: 2 spaces = 1 + 1, ..., 31 spaces = every split; tabs alike.
        let space_splits: usize = (2..=31).map(|n| n - 1).sum();
        let tab_splits: usize = (2..=9).map(|n| n - 1).sum();
        assert_eq!(table.merges.len(), 50000 + space_splits + tab_splits);
        assert_eq!(table.merges[50000], format!("Ġ {}", "Ġ".repeat(30)));
        // Every merge joins two tokens into a token.
        let ids: FxHashMap<&str, usize> =
            table.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        for m in &table.merges {
            let (a, b) = m.split_once(' ').unwrap();
            assert!(ids.contains_key(a) && ids.contains_key(b), "{m}");
            assert!(ids.contains_key(format!("{a}{b}").as_str()), "{m}");
        }
    }
}
