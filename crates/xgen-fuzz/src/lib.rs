//! The checks behind the fuzz targets: each takes arbitrary bytes as one kind of untrusted input
//! (a GGUF file, a safetensors or pickle shard, a model directory's tokenizer and template files,
//! a chat template, text and ids for the tokenizers, an HTTP request body) and panics when xgen
//! mishandles it: a panic inside xgen, a broken round trip, or a 5xx. A clean error is a pass.
//!
//! `fuzz/` wraps each in a libFuzzer target (coverage-guided, `cargo fuzz`); `tests/corpus.rs`
//! replays the committed seeds and every input that once failed, on stable, in CI.

pub mod files;
pub mod http;
pub mod text;

/// What a target does with one input: returns, or panics on a defect.
pub type Check = fn(&[u8]);

/// Every target's name and check, in the order `fuzz/` and the docs list them.
pub const TARGETS: [(&str, Check); 8] = [
    ("gguf", files::gguf),
    ("safetensors", files::safetensors),
    ("pickle", files::pickle),
    ("model_dir", files::model_dir),
    ("chat_template", text::chat_template),
    ("xgen_tokenizer", text::xgen_tokenizer),
    ("model_tokenizers", text::model_tokenizers),
    ("http", http::request),
];

/// The repository's test fixtures (the tiny XGen checkpoint, the tokenizer files).
pub fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}
