//! `xgen convert`: a model directory (any supported format) or random weights -> sharded
//! safetensors in the chosen dtype, streaming.

use std::path::PathBuf;

use clap::Args;
use xgen_model::weights::{self, write};

use crate::{
    exit::bad_input,
    model_args::{dtype_parser, show_progress, status, tensor_progress_bar, Dtype},
};

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// model.safetensors / sharded with model.safetensors.index.json.
    Safetensors,
    /// pytorch_model.bin / sharded with pytorch_model.bin.index.json (zip/pickle, as torch.save).
    Bin,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Source model directory.
    #[arg(long, required_unless_present = "random_weights")]
    pub model: Option<PathBuf>,
    /// Instead of --model: write deterministic random weights of a preset shape.
    #[arg(long, value_name = "PRESET", conflicts_with = "model")]
    pub random_weights: Option<String>,
    /// Output directory (created; must not already hold weights).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype of the output.
    #[arg(long, value_parser = dtype_parser(), default_value = "bf16")]
    pub dtype: Dtype,
    /// Output file format.
    #[arg(long, value_enum, default_value_t = Format::Safetensors)]
    pub format: Format,
    /// Largest shard, e.g. 5GB, 500MB or a byte count.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub shard_size: u64,
}

pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    let dtype = args.dtype.candle();
    let format = match args.format {
        Format::Safetensors => write::OutputFormat::Safetensors,
        Format::Bin => write::OutputFormat::Pickle,
    };
    let files = match (&args.model, &args.random_weights) {
        (Some(src), _) => {
            if src.canonicalize().ok() == args.out.canonicalize().ok() {
                return Err(bad_input("--out must differ from --model"));
            }
            let bar = tensor_progress_bar();
            let files = write::convert(src, &args.out, format, dtype, args.shard_size, &mut |p| {
                show_progress(&bar, &p)
            })?;
            bar.finish_and_clear();
            files
        }
        (None, Some(preset)) => {
            write::write_random(&weights::random::preset(preset)?, &args.out, format, dtype, args.shard_size)?
        }
        (None, None) => unreachable!("clap requires --model or --random-weights"),
    };
    status(&format!("wrote {} ({} file(s))", args.out.display(), files.len()));
    Ok(())
}

/// `5GB`, `500MB`, `64KB` (powers of 1000, like transformers' `max_shard_size`) or bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is not a size like 5GB, 500MB or 1000000"))?;
    let scale = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("unknown unit in `{s}` (use KB, MB or GB)")),
    };
    n.checked_mul(scale).filter(|&b| b > 0).ok_or_else(|| format!("`{s}` is not a positive size"))
}
