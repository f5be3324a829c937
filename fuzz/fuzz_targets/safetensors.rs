//! Fuzz target `safetensors`: see `xgen_fuzz::files::safetensors`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::files::safetensors(data));
