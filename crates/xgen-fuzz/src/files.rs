//! Model files from strangers: a GGUF file, a safetensors or pickle shard beside a known config,
//! and the JSON files of a model directory. Each is written to a fresh temporary directory and
//! opened the way `--model` opens it; what loads is then used (tokenizer, chat template, one
//! short forward step), so a file that passes the checks cannot break what runs after them.

use std::path::Path;

use xgen_generate::{chat::Role, GenerationConfig, ModelText, Source};
use xgen_model::{DType, Model, WeightFormat};

/// Largest model (in parameters, from the config) worth a forward step: the file holds the
/// weights, so this only bounds the time a fuzz input can take.
const MAX_PARAMS: usize = 50_000_000;

/// A GGUF file as `--model FILE.gguf`: the config from its metadata, its tokenizer and chat
/// template, then its weights and a forward step.
pub fn gguf(data: &[u8]) {
    let dir = scratch();
    let path = dir.path().join("model.gguf");
    write(&path, data);
    let source = Source::Gguf(path);
    let Ok(config) = source.config() else { return };
    if let Ok(text) = ModelText::of(&source, &config) {
        use_text(&text);
    }
    if params(&config) <= MAX_PARAMS {
        if let Ok(model) = source.load(WeightFormat { dtype: DType::F32, linear: None }, &mut |_| {}) {
            forward(&model);
        }
    }
}

/// The config the shard targets load against: a model small enough that a whole checkpoint is a
/// seed of a few kilobytes (`fuzz/seeds/make.py` writes it in both formats).
pub const SHARD_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
"max_position_embeddings": 64, "rms_norm_eps": 1e-06, "bos_token_id": 0, "eos_token_id": 0}"#;

/// A `model.safetensors` beside [`SHARD_CONFIG`].
pub fn safetensors(data: &[u8]) {
    shard("model.safetensors", data);
}

/// A `pytorch_model.bin` (zip + pickle, or a bare pickle) beside [`SHARD_CONFIG`].
pub fn pickle(data: &[u8]) {
    shard("pytorch_model.bin", data);
}

fn shard(name: &str, data: &[u8]) {
    let dir = scratch();
    write(&dir.path().join("config.json"), SHARD_CONFIG.as_bytes());
    write(&dir.path().join(name), data);
    if let Ok(model) = Model::load(dir.path(), DType::F32, &xgen_model::Device::Cpu, &mut |_| {}) {
        forward(&model);
    }
}

/// The files of a model directory: the first byte picks which one the rest replaces (config.json,
/// tokenizer.json, tokenizer_config.json, generation_config.json); the others are the gpt2-slice
/// fixture's. Read as `--model DIR` reads them: config, tokenizer, chat template, generation
/// defaults.
pub fn model_dir(data: &[u8]) {
    const FILES: [&str; 4] =
        ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"];
    let Some((&which, content)) = data.split_first() else { return };
    let dir = scratch();
    for file in &FILES[..3] {
        copy_fixture(&format!("tokenizers/gpt2-slice-hf/{file}"), &dir.path().join(file));
    }
    write(&dir.path().join(FILES[which as usize % FILES.len()]), content);
    let source = Source::Dir(dir.path().into());
    let Ok(config) = source.config() else { return };
    let _ = GenerationConfig::for_model_dir(dir.path(), &config);
    if let Ok(text) = ModelText::of(&source, &config) {
        use_text(&text);
    }
}

/// Encodes and decodes a text with specials, and renders a conversation in the chat format.
fn use_text(text: &ModelText) {
    let t = &text.tokenizer;
    let ids = t.encode("Hello <|endoftext|> wörld\n\n  42 ��");
    let _ = t.decode(&ids);
    let mut stream = t.stream_decoder();
    for &id in &ids {
        let _ = stream.push(id);
    }
    let messages =
        [(Role::System, "Be brief."), (Role::User, "Hi"), (Role::Assistant, "Hello"), (Role::User, "Sum?")];
    let _ = text.chat.render(&messages);
    let _ = text.chat.render(&messages[1..2]);
}

/// One three-token step through a loaded model (ids kept inside its vocabulary).
fn forward(model: &Model) {
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = [0, 1, 2].iter().map(|i| i % vocab.max(1)).collect();
    let Ok(mut cache) = model.new_cache(1, 4) else { return };
    if let Ok(ids) = model.ids_tensor(&ids) {
        let _ = model.forward_last(&ids, &mut cache);
    }
}

fn params(c: &xgen_model::Config) -> usize {
    let (h, f) = (c.hidden_size as u128, c.intermediate_size as u128);
    let layer = h.saturating_mul(h).saturating_mul(4).saturating_add(h.saturating_mul(f).saturating_mul(3));
    let embeddings = (c.vocab_size as u128).saturating_mul(h).saturating_mul(2);
    let all = (c.num_hidden_layers as u128).saturating_mul(layer).saturating_add(embeddings);
    usize::try_from(all).unwrap_or(usize::MAX)
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("writing a fuzz input");
}

fn copy_fixture(rel: &str, to: &Path) {
    std::fs::copy(crate::fixtures().join(rel), to).unwrap_or_else(|e| panic!("fixture {rel}: {e}"));
}
