//! `xgen eval`: what each weight format and KV-cache type costs in quality, over one text. Every
//! candidate (a `--dtype` with a `--kv-type`) runs beside a higher-precision reference (`--reference`,
//! default f32; a GGUF file's weights dequantized) over the same windows, and one table gives its
//! perplexity and, against the reference's next-token distributions, the mean KL divergence and
//! top-1 agreement (llama.cpp's `llama-perplexity --kl-divergence`, for several formats at once).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use xgen_generate::{hub, ModelText};
use xgen_model::{
    perplexity::{self, Agreement, Perplexity, Window},
    Model,
};

use crate::{
    exit::bad_input,
    model_args::{dtype_parser, kv_type_name, show_progress, tensor_progress_bar, Dtype, KvTypeArg, Source},
    perplexity::WindowArgs,
    text_input::read_text,
};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The model: a directory (config.json + weights), a GGUF file, or a Hugging Face Hub id.
    #[arg(long, default_value = hub::DEFAULT_MODEL)]
    pub model: String,
    /// Hub revision for a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Deterministic random weights of a preset shape instead of a checkpoint.
    #[arg(long, value_name = "PRESET", conflicts_with = "model")]
    pub random_weights: Option<String>,
    /// A UTF-8 text file (`-` reads stdin), tokenized with the model's tokenizer.
    #[arg(long)]
    pub file: PathBuf,
    /// Score only the text's first N tokens.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// The reference run's dtype (for a GGUF file: its weights dequantized to it).
    #[arg(long, value_parser = dtype_parser(), default_value = "f32")]
    pub reference: Dtype,
    /// Weight formats to compare, comma-separated: dtype names, and `stored` for a GGUF file's
    /// own block types (a GGUF file's weights are requantized from its values for the others).
    /// Default: stored,bf16,q8_0,q4_k,q4_0 for a GGUF file, else bf16,q8_0,q4_k,q4_0.
    #[arg(long, value_delimiter = ',', value_parser = format_parser())]
    pub dtype: Vec<Candidate>,
    /// KV cache types to compare with each format, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_value = "auto")]
    pub kv_type: Vec<KvTypeArg>,
    #[command(flatten)]
    pub window: WindowArgs,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// A weight format to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// A GGUF file's tensors as stored.
    Stored,
    Dtype(Dtype),
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::Stored => "stored",
            Candidate::Dtype(d) => d.name(),
        }
    }
}

fn format_parser() -> impl clap::builder::TypedValueParser<Value = Candidate> {
    use clap::builder::TypedValueParser;
    let names: Vec<&'static str> = std::iter::once("stored").chain(Dtype::ALL.map(Dtype::name)).collect();
    clap::builder::PossibleValuesParser::new(names).map(|name| match name.as_str() {
        "stored" => Candidate::Stored,
        other => Candidate::Dtype(other.parse().expect("a listed dtype name")),
    })
}

/// One row of the table.
struct Row {
    format: String,
    kv: String,
    ppl: Perplexity,
    agreement: Option<Agreement>,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let text = read_text(&args.file)?;
    let source = match &args.random_weights {
        Some(preset) => Source::random(preset)?,
        None => Source::resolve(&args.model, &args.revision)?,
    };
    let config = source.config()?;
    let tokenizer = ModelText::of(&source, &config)?.tokenizer;
    let mut ids = tokenizer.encode(&text);
    if let Some(n) = args.max_tokens {
        ids.truncate(n);
    }
    if ids.len() < 2 {
        return Err(bad_input(format!(
            "{}: eval needs at least 2 tokens, got {}",
            args.file.display(),
            ids.len()
        )));
    }
    let window = args.window.resolve(config.max_position_embeddings)?;
    let gguf = matches!(source, Source::Gguf(_));
    let candidates = match (args.dtype.is_empty(), gguf) {
        (false, _) => args.dtype.clone(),
        (true, true) => vec![Candidate::Stored].into_iter().chain(default_dtypes()).collect(),
        (true, false) => default_dtypes().collect(),
    };
    if candidates.contains(&Candidate::Stored) && !gguf {
        return Err(bad_input("--dtype stored: only a GGUF file stores its own block types"));
    }
    let bar = score_bar((ids.len() - 1) * (1 + candidates.len() * args.kv_type.len()));
    let reference = load(&source, Candidate::Dtype(args.reference))?;
    bar.set_message(format!("reference {}", args.reference.name()));
    let ppl = perplexity::score_with(&reference, &ids, window, &mut |n| {
        bar.inc(n as u64);
        Ok(())
    })?;
    let mut rows = vec![Row {
        format: format!("{} (reference)", args.reference.name()),
        kv: kv_type_name(reference.kv_type()),
        ppl,
        agreement: None,
    }];
    for &candidate in &candidates {
        let mut model = load(&source, candidate)?;
        for &kv in &args.kv_type {
            if let Some(kind) = kv.kind() {
                model.set_kv_type(kind).map_err(|e| bad_input(format!("--kv-type: {e}")))?;
            }
            let label = format!("{} {}", candidate.name(), kv_type_name(model.kv_type()));
            bar.set_message(label);
            let (ppl, agreement) = perplexity::evaluate(&reference, &model, &ids, window, &mut |n| {
                bar.inc(n as u64);
                Ok(())
            })?;
            let format = match candidate {
                Candidate::Stored => format!("stored ({})", model.weight_format_name()),
                Candidate::Dtype(d) => d.name().to_string(),
            };
            rows.push(Row { format, kv: kv_type_name(model.kv_type()), ppl, agreement: Some(agreement) });
        }
    }
    bar.finish_and_clear();
    print(&rows, ids.len(), window, args.json);
    Ok(())
}

fn default_dtypes() -> impl Iterator<Item = Candidate> {
    [Dtype::Bf16, Dtype::Q8_0, Dtype::Q4K, Dtype::Q4_0].into_iter().map(Candidate::Dtype)
}

/// The model in `candidate`'s format, with a tensor progress bar on a terminal.
fn load(source: &Source, candidate: Candidate) -> anyhow::Result<Model> {
    let bar = tensor_progress_bar();
    let mut progress = |p: xgen_model::weights::LoadProgress| show_progress(&bar, &p);
    let device = xgen_model::Device::Cpu;
    let model = match (candidate, source) {
        (Candidate::Stored, Source::Gguf(path)) => {
            Model::load_gguf(path, xgen_model::DType::F32, &device, &mut progress)?
        }
        (Candidate::Dtype(d), Source::Gguf(path)) => {
            Model::load_gguf_as(path, d.format(), &device, &mut progress)?
        }
        (Candidate::Dtype(d), _) => source.load(d.format(), &mut progress)?,
        (Candidate::Stored, _) => {
            return Err(bad_input("--dtype stored: only a GGUF file stores its own block types"))
        }
    };
    bar.finish_and_clear();
    Ok(model)
}

/// A bar over the tokens every run scores (drawn only when stderr is a terminal).
fn score_bar(total: usize) -> ProgressBar {
    ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} tokens scored {elapsed} (eta {eta})")
            .expect("valid template"),
    )
}

fn print(rows: &[Row], tokens: usize, window: Window, json_lines: bool) {
    let reference = rows[0].ppl.perplexity;
    if json_lines {
        for r in rows {
            println!(
                "{}",
                json!({
                    "dtype": r.format, "kv_type": r.kv, "tokens": tokens, "scored_tokens": r.ppl.logprobs.len(),
                    "window": window.size, "stride": window.stride,
                    "perplexity": r.ppl.perplexity, "mean_nll": r.ppl.mean_nll,
                    "mean_kl": r.agreement.as_ref().map(|a| a.mean_kl),
                    "top1_agreement": r.agreement.as_ref().map(|a| a.top1_agreement),
                })
            );
        }
        return;
    }
    let scored = rows[0].ppl.logprobs.len();
    println!("{scored} tokens scored (window {}, stride {})", window.size, window.stride);
    println!("| dtype | KV cache | perplexity | Δ perplexity | mean KL (nats) | top-1 agreement |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in rows {
        let delta = 100.0 * (r.ppl.perplexity / reference - 1.0);
        let (kl, top1) = match &r.agreement {
            Some(a) => (format!("{:.6}", a.mean_kl), format!("{:.2}%", 100.0 * a.top1_agreement)),
            None => ("-".into(), "-".into()),
        };
        println!("| {} | {} | {:.4} | {delta:+.2}% | {kl} | {top1} |", r.format, r.kv, r.ppl.perplexity);
    }
}
