//! What a loaded `xgen.Model` holds: the weights, the tokenizer, its own thread pool and the
//! model's generation defaults (generation_config.json as JSON, which call keywords override).

use std::sync::Arc;

use xgen_generate::{chat::ChatFormat, Dtype, GenerateError, ModelText, Source};
use xgen_model::Model;
use xgen_tokenizer::Tokenizer;

pub struct Engine {
    pub model: Model,
    pub tokenizer: Arc<Tokenizer>,
    /// The model's chat format (its template; XGen-Inst for XGen models).
    pub chat: ChatFormat,
    /// The threads the model's kernels run on (`threads=`), not Python's or rayon's global pool.
    pub pool: rayon::ThreadPool,
    /// generation_config.json (`{}` when the model has none).
    pub generation: serde_json::Value,
    /// Where the weights came from, for `repr`.
    pub name: String,
}

/// How a model is named by the caller.
pub enum Named<'a> {
    /// A directory, a GGUF file or a Hub id, and the Hub revision.
    Model { model: &'a str, revision: &'a str },
    /// Random weights of a preset shape.
    Random(&'a str),
}

impl Engine {
    /// Resolves and loads a model in `dtype` with a pool of `threads` (all cores when `None`).
    pub fn load(named: Named<'_>, dtype: Dtype, threads: Option<usize>) -> Result<Self, GenerateError> {
        let (source, name) = match named {
            Named::Model { model, revision } => (Source::resolve(model, revision)?, model.to_string()),
            Named::Random(preset) => (Source::random(preset)?, format!("random-{preset}")),
        };
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("xgen-{i}"))
            .build()
            .map_err(|e| GenerateError::Setting { field: "threads".into(), message: e.to_string() })?;
        let generation = source.generation_json()?;
        let text = ModelText::of(&source, &source.config()?)?;
        let model = pool.install(|| source.load(dtype.format(), &mut |_| {}))?;
        Ok(Engine { model, tokenizer: text.tokenizer, chat: text.chat, pool, generation, name })
    }

    /// The model's context length in tokens.
    pub fn context(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}
