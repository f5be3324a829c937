//! Where the model comes from (`--model DIR|HUB_ID` or `--random-weights PRESET`) and in which
//! dtype; resolving and loading it with a progress bar on a terminal.

use std::{io::IsTerminal, path::PathBuf, time::Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use xgen_generate::{hub, ModelText};
use xgen_model::{weights, DType, KvType, Model};

pub use xgen_generate::{Dtype, Source};

/// `--dtype` values: the library's [`Dtype`] names, listed in `--help`.
pub fn dtype_parser() -> impl clap::builder::TypedValueParser<Value = Dtype> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Dtype::ALL.map(Dtype::name))
        .map(|name| name.parse::<Dtype>().expect("a listed dtype name"))
}

/// How the KV cache stores keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvTypeArg {
    /// The compute dtype (f16 for quantized weights).
    Auto,
    F32,
    Bf16,
    F16,
    /// 8-bit blocks (GGUF q8_0): about half the bytes of f16.
    #[value(name = "q8_0")]
    Q8_0,
}

impl KvTypeArg {
    /// `None` for the model's own choice.
    pub fn kind(self) -> Option<KvType> {
        match self {
            KvTypeArg::Auto => None,
            KvTypeArg::F32 => Some(KvType::Float(DType::F32)),
            KvTypeArg::Bf16 => Some(KvType::Float(DType::BF16)),
            KvTypeArg::F16 => Some(KvType::Float(DType::F16)),
            KvTypeArg::Q8_0 => Some(KvType::Q8_0),
        }
    }
}

/// The model settings given on the command line (`None`: the model's default), applied after
/// loading; `Send` so a server's engine thread can apply them to the model it loads.
#[derive(Clone, Copy, Debug)]
pub struct ModelSettings {
    pub prefill_chunk: Option<usize>,
    pub kv_type: Option<KvType>,
}

impl ModelSettings {
    pub fn apply(self, model: &mut Model) -> anyhow::Result<()> {
        if let Some(tokens) = self.prefill_chunk {
            model.set_prefill_chunk(tokens);
        }
        if let Some(kind) = self.kv_type {
            model.set_kv_type(kind).map_err(|e| crate::exit::bad_input(format!("--kv-type: {e}")))?;
        }
        Ok(())
    }
}

/// A short name for a cache storage (`f16`, `q8_0`, ...).
pub fn kv_type_name(kind: KvType) -> String {
    match kind {
        KvType::Float(dtype) => dtype.as_str().to_string(),
        KvType::Q8_0 => "q8_0".to_string(),
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model directory (config.json + weights), a GGUF file (`*.gguf`, from `xgen quantize` or
    /// llama.cpp) or a Hugging Face Hub id, resolved through the HF cache (HF_HOME /
    /// HF_HUB_CACHE) and downloaded when missing unless HF_HUB_OFFLINE=1.
    #[arg(long, default_value = hub::DEFAULT_MODEL)]
    pub model: String,
    /// Hub revision (branch, tag or commit) for a Hub id.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Instead of --model: deterministic random weights of a preset shape (xgen-7b, xgen-7b-8l, small, tiny).
    #[arg(long, value_name = "PRESET")]
    pub random_weights: Option<String>,
    /// Compute dtype (weights are converted on load).
    #[arg(long, value_parser = dtype_parser(), default_value = "bf16")]
    pub dtype: Dtype,
    /// KV cache storage: the compute dtype (auto), a float dtype, or q8_0 (half of f16's memory).
    #[arg(long, value_enum, default_value_t = KvTypeArg::Auto)]
    pub kv_type: KvTypeArg,
    /// Tokens per forward step when a prompt is read (larger: bigger products, more activation
    /// memory; in `xgen serve`, also longer pauses of running streams per step). Default 256, and
    /// 128 for `xgen serve`: chosen by measurement, docs/performance.md.
    #[arg(long, value_name = "N", value_parser = positive)]
    pub prefill_chunk: Option<usize>,
}

/// A whole number of at least 1.
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got {s:?}")),
    }
}

/// A loaded model, its tokenizer and chat format, where it came from, and the directory it came
/// from (`None` for random weights and GGUF files).
pub struct Loaded {
    pub model: Model,
    pub text: ModelText,
    pub source: Source,
    pub dir: Option<PathBuf>,
}

impl ModelArgs {
    /// Resolves `--model` (through the Hub cache) or `--random-weights`.
    pub fn source(&self) -> anyhow::Result<Source> {
        Ok(match &self.random_weights {
            Some(preset) => Source::random(preset)?,
            None => Source::resolve(&self.model, &self.revision)?,
        })
    }

    /// What `--prefill-chunk` and `--kv-type` change on a loaded model.
    pub fn settings(&self) -> ModelSettings {
        ModelSettings { prefill_chunk: self.prefill_chunk, kv_type: self.kv_type.kind() }
    }

    /// Resolves and loads the model on the CPU, showing progress on a terminal.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let start = Instant::now();
        let bar = tensor_progress_bar();
        let mut progress = |p: weights::LoadProgress| show_progress(&bar, &p);
        let source = self.source()?;
        let text = ModelText::of(&source, &source.config()?)?;
        let mut model = source.load(self.dtype.format(), &mut progress)?;
        self.settings().apply(&mut model)?;
        let (quantized, linear) = model.quantized_linear_layers();
        let gguf = matches!(source, Source::Gguf(_));
        if gguf && self.dtype.format().linear.is_some() {
            eprintln!(
                "xgen: note: --dtype {} is ignored for a GGUF file: its stored types are used",
                self.dtype.name()
            );
        }
        if !gguf && self.dtype.format().linear.is_some() && quantized < linear {
            eprintln!(
                "xgen: note: {} of {linear} linear layers stay f32: their input width is not a multiple of the {} block",
                linear - quantized,
                self.dtype.name()
            );
        }
        let dir = match &source {
            Source::Dir(dir) => Some(dir.clone()),
            Source::Gguf(_) | Source::Random { .. } => None,
        };
        let loaded = Loaded { model, text, source, dir };
        bar.finish_and_clear();
        status(&format!("loaded in {:.1} s", start.elapsed().as_secs_f64()));
        Ok(loaded)
    }
}

/// A progress bar over tensors (drawn only when stderr is a terminal).
pub fn tensor_progress_bar() -> ProgressBar {
    ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors {elapsed}")
            .expect("valid template"),
    )
}

/// Moves `bar` to `p`, naming the file being read.
pub fn show_progress(bar: &ProgressBar, p: &weights::LoadProgress) {
    bar.set_length(p.tensors_total as u64);
    bar.set_position(p.tensors_done as u64);
    bar.set_message(p.file.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default());
}

/// A status line on stderr, only when stderr is a terminal (keeps piped output clean).
pub fn status(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("xgen: {msg}");
    }
}
