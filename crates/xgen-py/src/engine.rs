//! What a loaded `xgen.Model` holds: the weights, the tokenizer, its own thread pool and the
//! model's generation defaults (generation_config.json as JSON, which call keywords override).

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use xgen_generate::{chat::ChatFormat, prompt_cache, Dtype, GenerateError, ModelText, Session, Source};
use xgen_kvstore::DiskCache;
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
    /// The disk prompt cache (`cache_dir=`).
    pub disk: Option<DiskCache>,
    /// The KV cache of the last one-prompt call (its prompt and answer, or what it read before
    /// Ctrl-C stopped it): the next call reads only what follows their common prefix.
    pub session: Mutex<Session>,
}

/// `cache_dir=` and `cache_disk_budget=`.
pub struct CacheDir {
    pub dir: PathBuf,
    pub budget: Option<u64>,
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
    pub fn load(
        named: Named<'_>,
        dtype: Dtype,
        threads: Option<usize>,
        cache: Option<CacheDir>,
    ) -> Result<Self, GenerateError> {
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
        let warn: xgen_kvstore::Warn = Arc::new(|w: &str| {
            let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("xgen: warning: {w}\n"));
        });
        let disk = match cache {
            Some(c) => Some(pool.install(|| prompt_cache::open(&c.dir, c.budget, &source, &model, warn))?),
            None => None,
        };
        Ok(Engine {
            model,
            tokenizer: text.tokenizer,
            chat: text.chat,
            pool,
            generation,
            name,
            disk,
            session: Mutex::default(),
        })
    }

    /// The model's context length in tokens.
    pub fn context(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}
