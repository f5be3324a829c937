//! `xgen.Model`: load once, then `generate` / `stream` / `chat` with transformers' keywords,
//! and `logits` / `nll` / `perplexity` for scoring. Every call runs on a worker thread with the
//! GIL released and stops on Ctrl-C (`worker`).

use std::sync::{atomic::AtomicBool, Arc};

use pyo3::{
    exceptions::PyValueError,
    prelude::*,
    types::{PyDict, PyList},
};
use rand::{rngs::StdRng, SeedableRng};
use xgen_generate::{
    chat::{ChatFormat, Role},
    hub::DEFAULT_MODEL,
    Dtype, GenerateError, GenerationConfig, Generator, Output, SpecialText,
};

use crate::{
    engine::{CacheDir, Engine, Named},
    errors::{generate_error, model_error},
    gen_args::GenArgs,
    prompts::Prompts,
    scoring,
    stream::{Event, TextStream},
    tokenizer::Tokenizer,
    worker::{self, Channel},
};

/// A loaded XGen model (or any LLaMA-architecture model xgen reads).
#[pyclass(module = "xgen", frozen)]
pub struct Model {
    engine: Arc<Engine>,
}

/// Runs `prompts` as one left-padded batch; `on_text` sees each row's new text as it is final.
/// One prompt runs in the engine's session: the part it shares with the last such call's prompt
/// and answer (or with what a cancelled call read) is not computed again.
fn generate_rows(
    engine: &Engine,
    cancel: &AtomicBool,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    seed: u64,
    on_text: &mut dyn FnMut(&str),
) -> Result<Vec<Output>, GenerateError> {
    let mut generator = Generator::new(&engine.model, &engine.tokenizer).cancellable(cancel);
    if let Some(disk) = &engine.disk {
        generator = generator.with_prompt_cache(disk);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    if let [prompt] = prompts {
        // Waits for a cancelled call's worker to stop and store what it read.
        let mut session = engine.session.lock().unwrap_or_else(|e| e.into_inner());
        return Ok(vec![
            generator.generate_in(&mut session, prompt, config, &mut rng, &mut |step| on_text(step.text))?
        ]);
    }
    generator.generate_batch(prompts, config, &mut rng, &mut |step| on_text(step.text))
}

#[pymethods]
impl Model {
    /// Loads `model`: a directory (config.json + weights), a `.gguf` file, or a Hugging Face Hub
    /// id resolved through the HF cache (downloaded when missing unless `HF_HUB_OFFLINE=1`).
    #[new]
    /// `cache_dir`: a directory for the disk prompt cache (prompts' KV blocks saved there and
    /// restored by any later call or process whose prompt starts the same way), within
    /// `cache_disk_budget` bytes when given.
    #[pyo3(signature = (model = DEFAULT_MODEL.to_string(), *, dtype = "bf16".to_string(), threads = None, revision = "main".to_string(), random_weights = None, cache_dir = None, cache_disk_budget = None),
           text_signature = "(model='Salesforce/xgen-7b-8k-base', *, dtype='bf16', threads=None, revision='main', random_weights=None, cache_dir=None, cache_disk_budget=None)")]
    #[allow(clippy::too_many_arguments)] // Python keywords
    fn new(
        py: Python<'_>,
        model: String,
        dtype: String,
        threads: Option<usize>,
        revision: String,
        random_weights: Option<String>,
        cache_dir: Option<std::path::PathBuf>,
        cache_disk_budget: Option<u64>,
    ) -> PyResult<Self> {
        let dtype: Dtype = dtype.parse().map_err(generate_error)?;
        if threads == Some(0) {
            return Err(PyValueError::new_err("threads: must be at least 1"));
        }
        if cache_disk_budget == Some(0) || (cache_disk_budget.is_some() && cache_dir.is_none()) {
            return Err(PyValueError::new_err("cache_disk_budget: a positive byte count, with cache_dir"));
        }
        let cache = cache_dir.map(|dir| CacheDir { dir, budget: cache_disk_budget });
        let engine = worker::run_uncancellable(py, move || {
            let named = match &random_weights {
                Some(preset) => Named::Random(preset),
                None => Named::Model { model: &model, revision: &revision },
            };
            Engine::load(named, dtype, threads, cache)
        })?
        .map_err(generate_error)?;
        Ok(Model { engine: Arc::new(engine) })
    }

    /// A `Tokenizer` (the model's vocabulary).
    #[getter]
    fn tokenizer(&self) -> Tokenizer {
        Tokenizer::with_core(Arc::clone(&self.engine.tokenizer))
    }

    /// The model's shape: hidden_size, num_hidden_layers, ..., max_position_embeddings.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.engine.model.config();
        let d = PyDict::new(py);
        d.set_item("vocab_size", c.vocab_size)?;
        d.set_item("hidden_size", c.hidden_size)?;
        d.set_item("intermediate_size", c.intermediate_size)?;
        d.set_item("num_hidden_layers", c.num_hidden_layers)?;
        d.set_item("num_attention_heads", c.num_attention_heads)?;
        d.set_item("num_key_value_heads", c.num_key_value_heads)?;
        d.set_item("max_position_embeddings", c.max_position_embeddings)?;
        d.set_item("rms_norm_eps", c.rms_norm_eps)?;
        d.set_item("rope_theta", c.rope_theta)?;
        Ok(d)
    }

    /// The model's generation_config.json (what `generate` keywords override).
    #[getter]
    fn generation_config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?.call_method1("loads", (self.engine.generation.to_string(),))
    }

    /// Context length in tokens.
    #[getter]
    fn context_length(&self) -> usize {
        self.engine.context()
    }

    /// The weight format that runs: the linear layers' storage (`bf16`, `q8_0`, ... as loaded;
    /// `q4_k+q6_k` for a mixed GGUF file).
    #[getter]
    fn dtype(&self) -> String {
        self.engine.model.weight_format_name()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.engine.pool.current_num_threads()
    }

    /// What the disk prompt cache did since the model was loaded (`None` without `cache_dir`):
    /// `restored_tokens`, `read_bytes`, `written_bytes`, `bad_files`, `stored_bytes`. Waits for
    /// the saves in progress first.
    #[getter]
    fn cache_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(disk) = &self.engine.disk else { return Ok(None) };
        py.detach(|| disk.flush());
        let (s, d) = (disk.stats(), PyDict::new(py));
        d.set_item("restored_tokens", s.restored_tokens)?;
        d.set_item("read_bytes", s.read_bytes)?;
        d.set_item("written_bytes", s.written_bytes)?;
        d.set_item("bad_files", s.bad_files)?;
        d.set_item("stored_bytes", disk.stored_bytes())?;
        Ok(Some(d))
    }

    /// The in-memory KV cache kept from the last one-prompt call: `tokens` (positions it holds:
    /// that call's prompt and answer, or what it had read when Ctrl-C stopped it) and `reused`
    /// (prompt tokens the last call took from it instead of computing).
    #[getter]
    fn kv_cache<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (tokens, reused) = py.detach(|| {
            let session = self.engine.session.lock().unwrap_or_else(|e| e.into_inner());
            (session.cached(), session.reused())
        });
        let d = PyDict::new(py);
        d.set_item("tokens", tokens)?;
        d.set_item("reused", reused)?;
        Ok(d)
    }

    /// Frees the in-memory KV cache kept from the last call (see `kv_cache`).
    fn reset(&self, py: Python<'_>) {
        py.detach(|| *self.engine.session.lock().unwrap_or_else(|e| e.into_inner()) = Default::default());
    }

    /// Continues prompts with transformers' `generate` semantics (see the stubs for keywords).
    /// Text in, the new text out; ids in, the full sequences out (prompt + new tokens).
    #[pyo3(signature = (inputs = None, *, input_ids = None, attention_mask = None, **kwargs))]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        inputs: Option<&Bound<'py, PyAny>>,
        input_ids: Option<&Bound<'py, PyAny>>,
        attention_mask: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prompts = Prompts::parse(inputs, input_ids, attention_mask)?;
        let args = GenArgs::parse(&self.engine.generation, kwargs, "generate")?;
        let config =
            args.config(self.engine.model.config(), &self.engine.tokenizer.special_ids().end_of_generation)?;
        let pad = args.output_pad(&config);
        let rows = self.rows(py, &prompts);
        let seed = args.seed.unwrap_or_else(rand::random);
        let outs = worker::run(py, &self.engine, move |e, cancel| {
            generate_rows(e, cancel, &rows, &config, seed, &mut |_| {})
        })?
        .map_err(generate_error)?;
        match prompts {
            Prompts::Text { batch: false, .. } => Ok(outs[0].text.clone().into_pyobject(py)?.into_any()),
            Prompts::Text { batch: true, .. } => {
                Ok(PyList::new(py, outs.iter().map(|o| o.text.as_str()))?.into_any())
            }
            Prompts::Ids(rows) => {
                let new: Vec<Vec<u32>> = outs.into_iter().map(|o| o.ids).collect();
                rows.output(py, &new, pad)
            }
        }
    }

    /// Like `generate` for one prompt, returning a `TextStream` of the new text as it is final.
    #[pyo3(signature = (inputs = None, *, input_ids = None, **kwargs))]
    fn stream(
        &self,
        py: Python<'_>,
        inputs: Option<&Bound<'_, PyAny>>,
        input_ids: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TextStream> {
        let prompts = Prompts::parse(inputs, input_ids, None)?;
        let args = GenArgs::parse(&self.engine.generation, kwargs, "stream")?;
        let config =
            args.config(self.engine.model.config(), &self.engine.tokenizer.special_ids().end_of_generation)?;
        let rows = self.rows(py, &prompts);
        if rows.len() != 1 {
            return Err(PyValueError::new_err("stream: one prompt at a time"));
        }
        self.start_stream(rows, config, args.seed, |text| text.to_string())
    }

    /// Answers the last user message of `messages` (`[{"role": "system"|"user"|"assistant",
    /// "content": str}, ...]`) in the model's chat template (XGen-Inst for XGen models), with
    /// the model card's sampling (top-k
    /// 100) unless keywords say otherwise; up to 2048 new tokens by default. Returns the answer,
    /// or a `TextStream` of it with `stream=True`.
    #[pyo3(signature = (messages, *, stream = false, **kwargs))]
    fn chat<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        stream: bool,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let prompt = chat_prompt(&self.engine.chat, messages)?;
        let ids = py.detach(|| self.engine.tokenizer.encode(&prompt));
        let mut args = GenArgs::parse(&self.engine.generation, kwargs, "chat")?;
        args.default("do_sample", true.into());
        args.default("top_k", 100.into());
        if !args.has_budget {
            args.default(
                "max_new_tokens",
                2048.min(self.engine.context().saturating_sub(ids.len()).max(1)).into(),
            );
        }
        let mut config =
            args.config(self.engine.model.config(), &self.engine.tokenizer.special_ids().end_of_generation)?;
        config.stop_strings.extend(self.engine.chat.stop_strings());
        config.special_text = SpecialText::Skip;
        if stream {
            let mut answer = self.engine.chat.answer_stream();
            let s = self.start_stream(vec![ids], config, args.seed, move |text| answer.push(text))?;
            return Ok(Bound::new(py, s)?.into_any());
        }
        let seed = args.seed.unwrap_or_else(rand::random);
        let outs = worker::run(py, &self.engine, move |e, cancel| {
            generate_rows(e, cancel, &[ids], &config, seed, &mut |_| {})
        })?
        .map_err(generate_error)?;
        Ok(self.engine.chat.clean_answer(&outs[0].text).into_pyobject(py)?.into_any())
    }

    /// The f32 logits of every position of `ids` (a text is encoded first): a numpy array
    /// `[len(ids), vocab_size]`.
    fn logits<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let ids = self.score_ids(py, ids)?;
        let (t, v) = (ids.len(), self.engine.model.config().vocab_size);
        let flat = worker::run(py, &self.engine, move |e, cancel| scoring::logits(&e.model, &ids, cancel))?
            .map_err(model_error)?;
        let bytes: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
        crate::tensors::array(py, &bytes, "float32", &[t, v], crate::tensors::TensorKind::Numpy)
    }

    /// Mean next-token negative log-likelihood of `ids` (transformers' causal-LM loss with
    /// labels = ids); longer than `window` (default: the context), scored in windows every
    /// `stride` tokens (default: half the window).
    #[pyo3(signature = (ids, *, window = None, stride = None))]
    fn nll(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        window: Option<usize>,
        stride: Option<usize>,
    ) -> PyResult<f64> {
        let ids = self.score_ids(py, ids)?;
        let window = scoring::window(self.engine.context(), ids.len(), window, stride)?;
        let scored = worker::run(py, &self.engine, move |e, cancel| {
            xgen_model::perplexity::score_until(&e.model, &ids, window, cancel)
        })?
        .map_err(model_error)?;
        Ok(scored.mean_nll)
    }

    /// `exp(nll(ids))`.
    #[pyo3(signature = (ids, *, window = None, stride = None))]
    fn perplexity(
        &self,
        py: Python<'_>,
        ids: &Bound<'_, PyAny>,
        window: Option<usize>,
        stride: Option<usize>,
    ) -> PyResult<f64> {
        Ok(self.nll(py, ids, window, stride)?.exp())
    }

    fn __repr__(&self) -> String {
        format!("xgen.Model({:?}, dtype={:?}, threads={})", self.engine.name, self.dtype(), self.threads())
    }
}

impl Model {
    /// The prompts' token rows (texts encoded with special strings recognised).
    fn rows(&self, py: Python<'_>, prompts: &Prompts) -> Vec<Vec<u32>> {
        match prompts {
            Prompts::Text { texts, .. } => {
                py.detach(|| texts.iter().map(|t| self.engine.tokenizer.encode(t)).collect())
            }
            Prompts::Ids(rows) => rows.prompts.clone(),
        }
    }

    /// Ids to score: a text (encoded) or one sequence of ids, checked against the vocabulary.
    fn score_ids(&self, py: Python<'_>, value: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
        let rows = self.rows(py, &Prompts::parse(Some(value), None, None)?);
        let [ids] = <[Vec<u32>; 1]>::try_from(rows)
            .map_err(|_| PyValueError::new_err("ids: one sequence at a time"))?;
        self.engine.model.check_ids(&ids).map_err(model_error)?;
        Ok(ids)
    }

    /// Starts generating `rows` (one prompt) on a worker; `piece` maps each new text piece.
    fn start_stream(
        &self,
        rows: Vec<Vec<u32>>,
        config: GenerationConfig,
        seed: Option<u64>,
        mut piece: impl FnMut(&str) -> String + Send + 'static,
    ) -> PyResult<TextStream> {
        let seed = seed.unwrap_or_else(rand::random);
        let (rx, cancel) = worker::spawn(&self.engine, move |e, cancel, tx| {
            let result = generate_rows(e, cancel, &rows, &config, seed, &mut |text| {
                let _ = tx.send(Event::Text(piece(text)));
            });
            let _ = tx.send(Event::Done(result.map(|mut outs| outs.remove(0).finish_reason.as_str())));
        })?;
        Ok(TextStream::new(Channel::new(rx, cancel)))
    }
}

/// The prompt for OpenAI-style `messages` in the model's chat format.
fn chat_prompt(format: &ChatFormat, messages: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut turns = Vec::new();
    for (i, m) in messages.try_iter()?.enumerate() {
        let m = m?;
        let field = |k: &str| -> PyResult<String> {
            m.get_item(k)
                .and_then(|v| v.extract())
                .map_err(|_| PyValueError::new_err(format!("messages[{i}].{k}: expected a str")))
        };
        let role = match field("role")?.as_str() {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(PyValueError::new_err(format!(
                    "messages[{i}].role: {other:?} is not one of system, user, assistant"
                )))
            }
        };
        turns.push((role, field("content")?));
    }
    let refs: Vec<(Role, &str)> = turns.iter().map(|(r, c)| (*r, c.as_str())).collect();
    format.render(&refs).map_err(|e| PyValueError::new_err(format!("messages: {e}")))
}
