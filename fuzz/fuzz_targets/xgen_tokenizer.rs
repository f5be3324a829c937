//! Fuzz target `xgen_tokenizer`: see `xgen_fuzz::text::xgen_tokenizer`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::text::xgen_tokenizer(data));
