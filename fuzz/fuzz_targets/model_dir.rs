//! Fuzz target `model_dir`: see `xgen_fuzz::files::model_dir`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::files::model_dir(data));
