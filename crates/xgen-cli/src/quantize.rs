//! `xgen quantize`: a model directory (or Hub id) -> one self-contained GGUF (weights in a block
//! format, every hyper-parameter, the XGen tokenizer as a gpt2-style vocabulary), streaming.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use xgen_generate::hub::{self, HubCache, Network};
use xgen_model::gguf::{write, Value};
use xgen_tokenizer::{TokenKind, Tokenizer, TokenizerKind, XgenTokenizer};

use crate::{
    exit::bad_input,
    model_args::{show_progress, status, tensor_progress_bar},
};

/// `--type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum QuantType {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
}

impl QuantType {
    fn ggml(self) -> xgen_model::gguf::GgmlDType {
        use xgen_model::gguf::GgmlDType as G;
        match self {
            Self::Q8_0 => G::Q8_0,
            Self::Q4_0 => G::Q4_0,
            Self::Q4K => G::Q4K,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::Q8_0 => 7,
            Self::Q4_0 => 2,
            Self::Q4K => 14,
        }
    }
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Source model: a directory (config.json + weights) or a Hugging Face Hub id.
    #[arg(long)]
    pub model: String,
    /// Hub revision for a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Output file (.gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// Block format of the matrices (embeddings included); norms stay f32.
    #[arg(long = "type", value_enum)]
    pub quant: QuantType,
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    if args.out.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(bad_input(format!("--out {}: the file name must end in .gguf", args.out.display())));
    }
    if args.out.exists() {
        return Err(bad_input(format!("--out {}: already exists", args.out.display())));
    }
    let dir = hub::resolve(&args.model, &args.revision, &HubCache::from_env(), Network::from_env())?;
    if Tokenizer::from_hf_dir(&dir)?.kind() != TokenizerKind::Xgen {
        return Err(bad_input(format!(
            "--model {}: the GGUF file would carry XGen's tokenizer, but this model has its own \
             (tokenizer.json); convert it with llama.cpp's convert_hf_to_gguf.py instead",
            dir.display()
        )));
    }
    let bar = tensor_progress_bar();
    let report = write::quantize_checkpoint(
        &dir,
        &args.out,
        args.quant.ggml(),
        args.quant.file_type(),
        tokenizer_metadata(&XgenTokenizer::new()),
        &mut |p| show_progress(&bar, &p),
    );
    bar.finish_and_clear();
    let report = report.inspect_err(|_| {
        let _ = std::fs::remove_file(&args.out);
    })?;
    if !report.kept_f16.is_empty() {
        eprintln!(
            "xgen: note: {} matrices stay f16 (width not a multiple of the block): {}",
            report.kept_f16.len(),
            report.kept_f16.join(", ")
        );
    }
    status(&format!(
        "wrote {} ({} tensors, {:.2} GB)",
        args.out.display(),
        report.tensors,
        report.bytes as f64 / 1e9
    ));
    Ok(())
}

/// The tokenizer as llama.cpp's `tokenizer.ggml.*` keys: gpt2-style byte-level BPE.
pub fn tokenizer_metadata(tokenizer: &XgenTokenizer) -> Vec<(String, Value)> {
    let table = tokenizer.bpe_table();
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    // llama.cpp's token types: 1 normal, 3 control.
    let kinds =
        table.kinds.iter().map(|k| Value::I32(if *k == TokenKind::Control { 3 } else { 1 })).collect();
    let eos = tokenizer.eos_token_id();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), strings(table.tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(kinds)),
        ("tokenizer.ggml.merges".into(), strings(table.merges)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}
