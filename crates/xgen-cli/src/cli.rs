//! Command-line arguments: the contract outside scripts rely on. Extend freely; never rename.

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "xgen", version, about = "Run Salesforce XGen-7B models: exact tokenizer, CLI and server")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Text -> token ids (the reference XGen tokenizer).
    ///
    /// Reads text from stdin (or --text) and prints a JSON array of ids. With --jsonl, maps lines
    /// `{"text": ...}` to lines `{"ids": [...]}` in order, streaming.
    Tokenize(TokenizeArgs),
    /// Token ids -> text (lossy UTF-8, like the reference).
    ///
    /// Reads a JSON array of ids from stdin and prints the text. With --jsonl, maps lines
    /// `{"ids": [...]}` to lines `{"text": ...}` in order, streaming.
    Detokenize(DetokenizeArgs),
    /// Continue a prompt (transformers' generate semantics), streaming the text.
    Generate(crate::generate::GenerateArgs),
    /// Chat with a model in its own chat template (XGen-Inst for XGen models), one message per line.
    Chat(crate::chat::ChatArgs),
    /// Mean next-token negative log-likelihood and perplexity of a text or token ids.
    ///
    /// Transformers' causal-LM loss with labels = input ids; sequences longer than the window are
    /// scored with a strided sliding window.
    Perplexity(crate::perplexity::PerplexityArgs),
    /// What each weight format and KV-cache type costs in quality over a text: perplexity, and
    /// the mean KL divergence and top-1 agreement against a higher-precision reference, in one
    /// table (with a progress bar).
    Eval(crate::eval::EvalArgs),
    /// Re-save a model as sharded safetensors (with index and config), streaming shard by shard.
    Convert(crate::convert::ConvertArgs),
    /// Write one self-contained GGUF (q8_0, q4_0 or q4_k; arch llama, with the tokenizer),
    /// streaming the checkpoint shard by shard. Load it with `--model FILE.gguf`.
    Quantize(crate::quantize::QuantizeArgs),
    /// Measure prompt-processing and generation speed (tok/s), like llama-bench.
    Bench(crate::bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with streaming and continuous batching.
    Serve(crate::serve::ServeArgs),
}

/// Whose tokenizer: XGen's (the default), or a model's own.
#[derive(Args, Debug)]
pub struct TokenizerChoice {
    /// Use this model's tokenizer (a GGUF file, a directory with tokenizer.json, or a Hub id);
    /// XGen's exact tokenizer when omitted or when the model is an XGen model.
    #[arg(long)]
    pub model: Option<String>,
    /// Hub revision for a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

impl TokenizerChoice {
    /// The tokenizer (reads the model's tokenizer files or GGUF header only, not its weights).
    pub fn tokenizer(&self) -> anyhow::Result<std::sync::Arc<xgen_tokenizer::Tokenizer>> {
        let Some(model) = &self.model else {
            return Ok(std::sync::Arc::new(xgen_tokenizer::Tokenizer::xgen()));
        };
        let source = xgen_generate::Source::resolve(model, &self.revision)?;
        Ok(xgen_generate::ModelText::of(&source, &source.config()?)?.tokenizer)
    }
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub tokenizer: TokenizerChoice,
    /// The text to encode, instead of reading stdin.
    #[arg(long, conflicts_with = "jsonl")]
    pub text: Option<String>,
    /// Read JSON lines `{"text": ...}` from stdin, write `{"ids": [...]}` lines to stdout.
    #[arg(long)]
    pub jsonl: bool,
    /// Treat special-token strings such as `<|endoftext|>` as plain text (for untrusted input).
    #[arg(long)]
    pub no_special: bool,
}

#[derive(Args, Debug)]
pub struct DetokenizeArgs {
    #[command(flatten)]
    pub tokenizer: TokenizerChoice,
    /// Read JSON lines `{"ids": [...]}` from stdin, write `{"text": ...}` lines to stdout.
    #[arg(long)]
    pub jsonl: bool,
}
