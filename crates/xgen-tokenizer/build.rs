//! Build-time data for the tokenizer: the GPT-2 ranks and the Unicode class table.
//!
//! Both are written to `OUT_DIR` and embedded with `include_bytes!`/`include!`, so the tokenizer
//! needs no network and no data files at run time.
//!
//! - `gpt2_ranks.bin`: for rank 0..50256 in order, a little-endian `u16` length then the token bytes.
//!   Read from tiktoken-rs's `r50k_base` (byte-identical to tiktoken's `gpt2`).
//! - `unicode_classes.rs`: a two-level table mapping every code point to the pre-tokenizer class
//!   (other, `\p{L}`, `\p{N}`, `\s`), taken from regex-syntax, whose tables the regex engines behind
//!   tiktoken use.

use std::{env, fs, path::PathBuf};

use regex_syntax::hir::{Class, HirKind};

const GPT2_RANKS: u32 = 50256;
const BLOCK: usize = 256;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("gpt2_ranks.bin"), gpt2_ranks()).expect("write gpt2_ranks.bin");
    fs::write(out.join("unicode_classes.rs"), unicode_classes()).expect("write unicode_classes.rs");
    println!("cargo:rerun-if-changed=build.rs");
}

fn gpt2_ranks() -> Vec<u8> {
    let bpe = tiktoken_rs::r50k_base().expect("tiktoken-rs r50k_base");
    let mut blob = Vec::with_capacity(400_000);
    for rank in 0..GPT2_RANKS {
        let bytes = bpe.decode_bytes(&[rank]).expect("every gpt2 rank decodes");
        let len = u16::try_from(bytes.len()).expect("token shorter than 64 KiB");
        blob.extend_from_slice(&len.to_le_bytes());
        blob.extend_from_slice(&bytes);
    }
    blob
}

/// Code point ranges of one regex class, as regex-syntax resolves it.
fn ranges(class: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::Parser::new().parse(class).expect("valid class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        other => panic!("{class} is not a Unicode class: {other:?}"),
    }
}

fn unicode_classes() -> String {
    // Class codes must match `CharClass` in src/pretokenize.rs.
    let mut class = vec![0u8; 0x11_0000];
    for (code, pattern) in [(1u8, r"\p{L}"), (2, r"\p{N}"), (3, r"\s")] {
        for (lo, hi) in ranges(pattern) {
            for cp in lo..=hi {
                assert_eq!(class[cp as usize], 0, "classes overlap at U+{cp:04X}");
                class[cp as usize] = code;
            }
        }
    }
    let mut blocks: Vec<&[u8]> = Vec::new();
    let mut index = Vec::with_capacity(class.len() / BLOCK);
    for chunk in class.chunks(BLOCK) {
        let i = blocks.iter().position(|b| *b == chunk).unwrap_or_else(|| {
            blocks.push(chunk);
            blocks.len() - 1
        });
        index.push(u16::try_from(i).expect("fewer than 65536 distinct blocks"));
    }
    let mut src = String::new();
    src.push_str(&format!("const CLASS_BLOCK: usize = {BLOCK};\n"));
    src.push_str(&format!("static CLASS_INDEX: [u16; {}] = {:?};\n", index.len(), index));
    src.push_str(&format!("static CLASS_BLOCKS: [[u8; {BLOCK}]; {}] = [\n", blocks.len()));
    for b in &blocks {
        src.push_str(&format!("    {b:?},\n"));
    }
    src.push_str("];\n");
    src
}
