//! `xgen perplexity`: mean next-token NLL and perplexity of a text or a list of ids.

use std::path::{Path, PathBuf};

use clap::Args;
use xgen_model::perplexity::{self, Window};

use crate::{
    exit::bad_input,
    model_args::{dtype_parser, Dtype, ModelArgs},
    text_input::read_text,
};

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A UTF-8 text file (`-` reads stdin), tokenized with the XGen tokenizer (special strings
    /// recognised).
    #[arg(long, conflicts_with = "ids_file", required_unless_present = "ids_file")]
    pub file: Option<PathBuf>,
    /// A JSON file holding an array of token ids (or an object with an `ids` array).
    #[arg(long)]
    pub ids_file: Option<PathBuf>,
    #[command(flatten)]
    pub window: WindowArgs,
    /// Also compare with the same model loaded in this dtype (e.g. f32 or bf16 for a quantized
    /// model): mean KL divergence and top-1 agreement of the next-token distributions.
    #[arg(long, value_parser = dtype_parser(), value_name = "DTYPE")]
    pub kl_reference: Option<Dtype>,
    /// Print one JSON object: {"tokens", "mean_nll", "perplexity", ...}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &PerplexityArgs) -> anyhow::Result<()> {
    let text = args.file.as_ref().map(|f| read_text(f)).transpose()?;
    let ids_file = args.ids_file.as_ref().map(|f| read_ids(f)).transpose()?;
    let loaded = args.model.load()?;
    let ids = match (text, ids_file) {
        (Some(text), _) => loaded.text.tokenizer.encode(&text),
        (None, Some(ids)) => ids,
        (None, None) => unreachable!("clap requires --file or --ids-file"),
    };
    if ids.len() < 2 {
        return Err(bad_input(format!("perplexity needs at least 2 tokens, got {}", ids.len())));
    }
    let model = loaded.model;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= model.config().vocab_size) {
        return Err(bad_input(format!(
            "token id {id} is outside the model's vocabulary of {}",
            model.config().vocab_size
        )));
    }
    let Window { size, stride } = args.window.resolve(model.config().max_position_embeddings)?;
    let scored = perplexity::score(&model, &ids, Window { size, stride })?;
    let sliding = ids.len() > size;
    let agreement = match args.kl_reference {
        None => None,
        Some(dtype) => {
            let reference = args.model.source()?.load(dtype.format(), &mut |_| {})?;
            Some((dtype, perplexity::compare(&reference, &model, &ids, Window { size, stride })?))
        }
    };
    if args.json {
        let out = serde_json::json!({
            "tokens": scored.tokens,
            "mean_nll": scored.mean_nll,
            "perplexity": scored.perplexity,
            "scored_tokens": scored.logprobs.len(),
            "windows": scored.windows,
            "window": size,
            "stride": if sliding { Some(stride) } else { None },
            "dtype": args.model.dtype.name(),
        });
        let mut out = out;
        if let Some((dtype, a)) = &agreement {
            out["kl_reference"] = serde_json::json!({
                "dtype": dtype.name(), "mean_kl": a.mean_kl, "top1_agreement": a.top1_agreement, "positions": a.positions,
            });
        }
        println!("{out}");
    } else {
        println!("tokens:     {}", scored.tokens);
        println!("mean NLL:   {:.6}", scored.mean_nll);
        println!("perplexity: {:.4}", scored.perplexity);
        if sliding {
            println!(
                "scored with a sliding window: {} windows of {size} tokens, stride {stride}",
                scored.windows
            );
        }
    }
    Ok(())
}

/// How a text longer than the window is scored (`xgen perplexity`, `xgen eval`).
#[derive(Args, Debug)]
pub struct WindowArgs {
    /// Tokens of context per window (default and maximum: the model's context).
    #[arg(long)]
    pub window: Option<usize>,
    /// Sequences longer than the window are scored in windows starting every STRIDE tokens
    /// (default: half the window), each scoring only tokens no earlier window scored.
    #[arg(long)]
    pub stride: Option<usize>,
}

impl WindowArgs {
    /// The window for a model of `context` tokens, checked.
    pub fn resolve(&self, context: usize) -> anyhow::Result<Window> {
        window(context, self.window, self.stride)
    }
}

/// `--window` (default and maximum: the model's `context`) and `--stride` (default: half the
/// window), checked.
fn window(context: usize, size: Option<usize>, stride: Option<usize>) -> anyhow::Result<Window> {
    let size = size.unwrap_or(context);
    if size < 2 || size > context {
        return Err(bad_input(format!("--window {size} must be in 2..={context} (the model's context)")));
    }
    let stride = stride.unwrap_or(size / 2);
    if stride == 0 || stride >= size {
        return Err(bad_input(format!("--stride {stride} must be in 1..{size} (below the window)")));
    }
    Ok(Window { size, stride })
}

/// `[1, 2, 3]` or `{"ids": [1, 2, 3]}`.
fn read_ids(path: &Path) -> anyhow::Result<Vec<u32>> {
    let text = read_text(path)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))?;
    let list = match &value {
        serde_json::Value::Object(o) => o.get("ids"),
        v => Some(v),
    };
    let list = list.and_then(|v| v.as_array()).ok_or_else(|| {
        bad_input(format!("{}: expected a JSON array of token ids or {{\"ids\": [...]}}", path.display()))
    })?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| bad_input(format!("{}: ids[{i}] = {v} is not a token id", path.display())))
        })
        .collect()
}
