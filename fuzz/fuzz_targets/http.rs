//! Fuzz target `http`: see `xgen_fuzz::http::request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::http::request(data));
