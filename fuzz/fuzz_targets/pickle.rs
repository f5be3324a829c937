//! Fuzz target `pickle`: see `xgen_fuzz::files::pickle`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::files::pickle(data));
