//! Fuzz target `chat_template`: see `xgen_fuzz::text::chat_template`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| xgen_fuzz::text::chat_template(data));
