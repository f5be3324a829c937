//! Properties on generated text, and a differential test against tiktoken-rs's `CoreBPE` built
//! with the same ranks, specials and tiktoken's spelling of the GPT-2 pattern (the reference path).

mod reference;

use std::sync::LazyLock;

use proptest::prelude::*;
use reference::reference;
use tiktoken_rs::CoreBPE;
use xgen_tokenizer::{TokenId, Tokenizer, N_VOCAB};

/// Built once per test binary: construction costs tens of milliseconds.
static TOKENIZER: LazyLock<Tokenizer> = LazyLock::new(Tokenizer::xgen);
static REFERENCE: LazyLock<CoreBPE> = LazyLock::new(|| reference(&TOKENIZER));

/// Text pieces chosen to exercise every branch of the pattern and of BPE.
fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z]{1,8}",
        2 => "[0-9]{1,6}",
        2 => "[ \t\n\r]{1,4}",
        2 => "[!-/:-@\\[-`{-~]{1,3}",
        1 => Just("'".to_string()),
        1 => prop::sample::select(vec!["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x"]).prop_map(String::from),
        1 => (1usize..45).prop_map(|n| " ".repeat(n)),
        1 => (1usize..14).prop_map(|n| "\t".repeat(n)),
        1 => prop::sample::select(vec![
            "é", "ß", "日本語", "中文", "한국어", "😀", "👍🏽", "\u{3000}", "\u{85}", "\u{2028}", "\u{a0}",
            "\u{200b}", "\u{feff}", "\u{301}", "٣", "Ⅻ", "½", "\u{1c}", "\u{10ffff}",
        ]).prop_map(String::from),
        1 => prop::sample::select(vec![
            "<|endoftext|>", "<fim_prefix>", "<mask_1>", "<mask_881>", "<mask_0>", "<mask_882>", "<sep>",
            "<eom>", "<dummy_3>", "<dummy_4>", "<|fim_prefix|>", "<fim_prefix", "<", ">", "<<", "<>",
        ]).prop_map(String::from),
        1 => any::<char>().prop_map(String::from),
        1 => prop::sample::select(vec!["字", "a", "!", "7", "é"]).prop_flat_map(|s| (100usize..300).prop_map(move |n| s.repeat(n))),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(atom(), 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn encode_equals_tiktoken_rs(s in text()) {
        let (t, r) = (&*TOKENIZER, &*REFERENCE);
        prop_assert_eq!(t.encode(&s), r.encode_with_special_tokens(&s));
        prop_assert_eq!(t.encode_ordinary(&s), r.encode_ordinary(&s));
    }

    #[test]
    fn encode_allowing_equals_tiktoken_rs_with_allowed_special(s in text()) {
        // tiktoken's `encode(text, allowed_special={...})`: only the listed specials are recognised.
        let (t, r) = (&*TOKENIZER, &*REFERENCE);
        let allowed: std::collections::HashSet<&str> = ["<sep>", "<mask_1>", "<|endoftext|>"].into();
        let ids: Vec<TokenId> = allowed.iter().map(|s| t.special_token_id(s).unwrap()).collect();
        let want = r.encode(&s, &allowed).unwrap().0;
        prop_assert_eq!(t.encode_allowing(&s, &|id| ids.contains(&id)), want);
        // The disallowed check finds the leftmost special that is not allowed: the first such id
        // in the reference's all-specials encoding.
        let refused = |id: TokenId| t.is_special(id) && !ids.contains(&id);
        let first = r.encode_with_special_tokens(&s).into_iter().find(|&id| refused(id));
        prop_assert_eq!(t.find_special_where(&s, &refused).map(|(_, id)| id), first);
    }

    #[test]
    fn round_trips_and_ordinary_never_yields_specials(s in text()) {
        let t = &*TOKENIZER;
        let ids = t.encode(&s);
        prop_assert_eq!(t.decode(&ids).unwrap(), s.clone());
        let ordinary = t.encode_ordinary(&s);
        prop_assert!(ordinary.iter().all(|&id| !t.is_special(id)));
        prop_assert_eq!(t.decode(&ordinary).unwrap(), s);
    }

    #[test]
    fn stream_decoder_equals_decode(ids in prop::collection::vec(0..N_VOCAB, 0..64)) {
        let t = &*TOKENIZER;
        let mut d = t.stream_decoder();
        let mut text = String::new();
        for &id in &ids {
            text.push_str(&d.push(id).unwrap());
        }
        text.push_str(&d.finish());
        prop_assert_eq!(text, t.decode(&ids).unwrap());
    }

    #[test]
    fn stream_decoder_equals_decode_on_byte_tokens(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        // Single-byte tokens make every invalid or truncated UTF-8 form reachable.
        let t = &*TOKENIZER;
        let ids: Vec<TokenId> = bytes.iter().map(|&b| byte_token(t, b)).collect();
        let mut d = t.stream_decoder();
        let mut text = String::new();
        for &id in &ids {
            text.push_str(&d.push(id).unwrap());
        }
        text.push_str(&d.finish());
        prop_assert_eq!(t.decode_bytes(&ids).unwrap(), bytes.clone());
        prop_assert_eq!(text, String::from_utf8_lossy(&bytes).into_owned());
    }
}

/// The id whose bytes are the single byte `b`.
fn byte_token(t: &Tokenizer, b: u8) -> TokenId {
    (0..N_VOCAB).find(|&id| t.token_bytes(id).unwrap() == [b]).expect("every byte has a token")
}
