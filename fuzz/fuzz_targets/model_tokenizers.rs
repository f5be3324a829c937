//! Fuzz target `model_tokenizers`: see `xgen_fuzz::text::model_tokenizers`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::text::model_tokenizers(data));
