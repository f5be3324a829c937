//! Fuzz target `gguf`: see `xgen_fuzz::files::gguf`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::files::gguf(data));
