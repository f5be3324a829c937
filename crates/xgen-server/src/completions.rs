//! `POST /v1/completions` and `POST /v1/chat/completions`: validate, queue one engine job per
//! choice, then answer with one JSON object or an SSE stream of chunks ending in `data: [DONE]`
//! ([`stream`]).
//!
//! Prompt scoring (OpenAI's original semantics, as vLLM serves them): `/v1/completions` with
//! `echo: true` and `logprobs: N` returns the prompt's tokens with their log-probabilities before
//! the generated ones (the first `null`), and `max_tokens: 0` (only with `echo`) generates
//! nothing: how lm-evaluation-harness scores choices and perplexity over HTTP.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::{
    body::Bytes,
    extract::{rejection::BytesRejection, State},
    response::{IntoResponse, Response, Sse},
};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use xgen_generate::{
    chat::Role, timings::timings, DraftStats, FinishReason, SpecialText, StepOutput, TokenLogprob,
};

use crate::{
    api::{Common, Fields, LogprobsField, MAX_CHOICES},
    engine::{Event, Job, Progress, Rejected, Scoring},
    error::ApiError,
    logprobs,
    routes::{json_body, respond},
    state::SharedState,
};

mod stream;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

/// A validated request: one entry of `prompts` per choice.
struct Prepared {
    kind: Kind,
    common: Common,
    /// (prompt ids, prompt text for `echo`) per choice, in choice order.
    prompts: Vec<(Vec<u32>, String)>,
    /// The output format's matcher per choice, when the request names one.
    constraints: Vec<Option<xgen_generate::Constraint>>,
    budget: usize,
    /// Whether the prompts are scored (`echo` with `logprobs`).
    scoring: Scoring,
    /// Whether a stream reports how far each prompt has been read (`return_progress`).
    progress: Progress,
    id: String,
    created: u64,
}

pub async fn completions(State(state): State<SharedState>, body: Result<Bytes, BytesRejection>) -> Response {
    run(state.clone(), prepare(&state, body, Kind::Completion), "completions").await
}

pub async fn chat_completions(
    State(state): State<SharedState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    run(state.clone(), prepare(&state, body, Kind::Chat), "chat_completions").await
}

fn prepare(
    state: &SharedState,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Prepared, ApiError> {
    if !state.ready.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::loading());
    }
    let body = json_body(state, body)?;
    let fields = Fields::from_body(&body)?;
    let field = if kind == Kind::Chat { LogprobsField::Chat } else { LogprobsField::Completions };
    let mut common = fields.common(state.defaults.clone(), field, state.vocab)?;
    let scoring = match (kind, common.echo, common.config.top_logprobs) {
        (Kind::Completion, true, Some(top)) => Scoring::Prompt { top },
        _ => Scoring::Off,
    };
    if common.max_tokens == Some(0) && !(kind == Kind::Completion && common.echo) {
        let why = match kind {
            Kind::Completion => "`max_tokens: 0` generates nothing: it needs `echo: true` (to return or, with `logprobs`, score the prompt)",
            Kind::Chat => "`max_tokens` must be at least 1",
        };
        return Err(ApiError::invalid("max_tokens", why));
    }
    let progress = match fields.boolean("return_progress")? && common.stream {
        true => Progress::Report,
        false => Progress::Silent,
    };
    let texts = match kind {
        Kind::Completion => prompt_texts(state, &fields)?,
        Kind::Chat => {
            common.config.stop_strings.extend(state.text.chat.stop_strings());
            common.config.special_text = SpecialText::Skip;
            let prompt = chat_prompt(state, &fields)?;
            vec![(state.text.tokenizer.encode(&prompt), prompt)]
        }
    };
    if texts.len() * common.n > MAX_CHOICES {
        return Err(ApiError::invalid(
            "n",
            format!("at most {MAX_CHOICES} choices per request (prompts x n)"),
        ));
    }
    let longest = texts.iter().map(|t| t.0.len()).max().unwrap_or(0);
    let budget = match (common.max_tokens, kind) {
        (Some(n), _) => n,
        (None, Kind::Completion) => 16,
        (None, Kind::Chat) => state.context.saturating_sub(longest).max(1),
    };
    if longest + budget > state.context {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({longest} in the prompt, {budget} for the completion).",
                state.context,
                longest + budget
            ),
        ));
    }
    check_kv_budget(state, longest + budget)?;
    let prompts: Vec<(Vec<u32>, String)> =
        texts.into_iter().flat_map(|t| std::iter::repeat_n(t, common.n)).collect();
    // Each choice its own matcher; a bad format is a 400 before anything is queued.
    let constraints = match (&common.config.format, common.format_param) {
        (Some(format), Some(param)) => {
            prompts.iter().map(|_| state.constraint(format, param).map(Some)).collect::<Result<_, _>>()?
        }
        _ => prompts.iter().map(|_| None).collect(),
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    Ok(Prepared {
        kind,
        common,
        prompts,
        constraints,
        budget,
        scoring,
        progress,
        id: format!("{prefix}-{:016x}", rand::random::<u64>()),
        created,
    })
}

/// A sequence of `positions` (prompt + max_tokens) whose KV cache could never fit the server's
/// budget is refused at once, with the numbers (one that fits waits for room in the queue).
fn check_kv_budget(state: &SharedState, positions: usize) -> Result<(), ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let per_token = state.metrics.kv_bytes_per_token.load(Relaxed);
    let budget = state.metrics.kv_budget_bytes.load(Relaxed);
    let block = xgen_model::KV_BLOCK;
    let needed = (positions.div_ceil(block) * block) as i64 * per_token;
    if per_token > 0 && budget >= 0 && needed > budget {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "The request needs {needed} bytes of KV cache ({positions} positions of prompt and completion in blocks of {block}, {per_token} bytes each), over the server's KV budget of {budget} bytes (--kv-budget). Lower max_tokens or shorten the prompt."
            ),
        ));
    }
    Ok(())
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
fn prompt_texts(state: &SharedState, fields: &Fields) -> Result<Vec<(Vec<u32>, String)>, ApiError> {
    let bad = || {
        ApiError::invalid("prompt", "`prompt` must be a non-empty string, list of strings, list of token ids, or list of token-id lists")
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| v.as_u64().filter(|&id| id < u64::from(state.vocab)).map(|id| id as u32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("prompt", format!("token ids must be integers below {}", state.vocab))
            })
    };
    let from_ids = |v: Vec<u32>| -> Result<(Vec<u32>, String), ApiError> {
        let text = state.text.tokenizer.decode(&v).map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
        Ok((v, text))
    };
    let prompts = match fields.get("prompt").ok_or_else(bad)? {
        Value::String(s) => vec![(state.text.tokenizer.encode(s), s.clone())],
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|s| (state.text.tokenizer.encode(s), s.to_string()))
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_number) => vec![from_ids(ids(items)?)?],
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|i| from_ids(ids(i.as_array().map_or(&[][..], Vec::as_slice))?))
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.0.is_empty()) {
        return Err(bad());
    }
    Ok(prompts)
}

/// `messages` rendered in the model's chat format (a template error is a 400 naming it).
pub fn chat_prompt(state: &SharedState, fields: &Fields) -> Result<String, ApiError> {
    let bad = |m: &str| ApiError::invalid("messages", m.to_string());
    let items = fields
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("`messages` must be a non-empty list"))?;
    let mut messages = Vec::with_capacity(items.len());
    for m in items {
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            _ => return Err(bad("each message needs a `role` of system, user or assistant")),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // The list form: concatenated text parts.
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect()
            }
            _ => return Err(bad("each message needs a string `content`")),
        };
        messages.push((role, content));
    }
    let refs: Vec<(Role, &str)> = messages.iter().map(|(r, c)| (*r, c.as_str())).collect();
    state.text.chat.render(&refs).map_err(|e| bad(&e.to_string()))
}

async fn run(state: SharedState, prepared: Result<Prepared, ApiError>, endpoint: &'static str) -> Response {
    let mut p = match prepared {
        Ok(p) => p,
        Err(e) => return respond(&state, endpoint, Err(e)),
    };
    let base_seed = p.common.seed.unwrap_or_else(rand::random);
    let started = Instant::now();
    let mut receivers = Vec::with_capacity(p.prompts.len());
    let constraints = std::mem::take(&mut p.constraints);
    for (i, ((prompt, _), constraint)) in p.prompts.iter().zip(constraints).enumerate() {
        let (tx, rx) = unbounded_channel();
        let job = Job {
            prompt: prompt.clone(),
            config: p.common.config.clone(),
            constraint,
            budget: p.budget,
            seed: base_seed.wrapping_add(i as u64),
            score: p.scoring,
            progress: p.progress,
            events: tx,
            submitted: Instant::now(),
        };
        if let Err(why) = state.engine.submit(job) {
            // Dropping the receivers cancels the choices already queued.
            let error = match why {
                Rejected::QueueFull => ApiError::queue_full(),
                Rejected::Stopped => ApiError::internal("the engine has stopped; see the server log"),
            };
            return respond(&state, endpoint, Err(error));
        }
        receivers.push(rx);
    }
    if p.common.stream {
        state.metrics.request(endpoint, 200);
        return Sse::new(stream::chunks(state.clone(), p, receivers)).into_response();
    }
    let mut choices = Vec::with_capacity(receivers.len());
    let mut completion_tokens = 0;
    let mut times = Timing::default();
    for (index, rx) in receivers.into_iter().enumerate() {
        match collect(rx, &mut times, p.budget).await {
            Ok(out) => {
                completion_tokens += out.steps.len();
                choices.push(choice_json(&state, &p, index, &out));
            }
            Err(e) => return respond(&state, endpoint, Err(ApiError::internal(e))),
        }
    }
    let prompt_tokens = p.prompts.iter().map(|t| t.0.len()).step_by(p.common.n).sum::<usize>();
    let object = if p.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    respond(
        &state,
        endpoint,
        Ok(json!({
            "id": p.id, "object": object, "created": p.created, "model": state.model_name, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            "timings": times.json(started, prompt_tokens, completion_tokens),
        })),
    )
}

/// When a request's tokens came, and what its choices drafted (for llama.cpp's `timings`).
#[derive(Default)]
struct Timing {
    first: Option<Instant>,
    last: Option<Instant>,
    drafts: Option<DraftStats>,
}

impl Timing {
    fn token(&mut self) {
        let now = Instant::now();
        self.first = Some(self.first.map_or(now, |f| f.min(now)));
        self.last = Some(now);
    }

    /// A scored prompt was read (its request may generate nothing).
    fn prompt_read(&mut self) {
        self.first.get_or_insert_with(Instant::now);
    }

    fn drafts(&mut self, d: DraftStats) {
        let sum = self.drafts.get_or_insert_with(DraftStats::default);
        sum.drafted += d.drafted;
        sum.accepted += d.accepted;
    }

    /// `timings` of a request submitted at `started`: the prompt until its first token, the rest
    /// as generation.
    fn json(&self, started: Instant, prompt_n: usize, predicted_n: usize) -> Value {
        let first = self.first.unwrap_or(started);
        let predicted = self.last.map_or(Default::default(), |l| l - first);
        timings(prompt_n, predicted_n, first - started, predicted, self.drafts)
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// What one choice produced: its prompt's scores (when scored) and its steps.
#[derive(Default)]
struct ChoiceOutput {
    prompt: Option<Vec<Option<TokenLogprob>>>,
    steps: Vec<StepOutput>,
}

/// All of one choice, up to its finish (with no `budget`: until the engine is done with its
/// prompt); its times and drafts into `times`.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    times: &mut Timing,
    budget: usize,
) -> Result<ChoiceOutput, String> {
    let mut out = ChoiceOutput::default();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Progress(_) => {}
            Event::Prompt(scores) => {
                times.prompt_read();
                out.prompt = Some(scores);
            }
            Event::Drafts(d) => times.drafts(d),
            Event::Token(step) => {
                times.token();
                let done = step.finish.is_some();
                out.steps.push(step);
                if done {
                    return Ok(out);
                }
            }
            Event::Error(e) => return Err(e),
        }
    }
    match budget {
        0 => Ok(out),
        _ => Err("the engine stopped before the sequence finished".into()),
    }
}

pub(crate) fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        Some(FinishReason::Length) => "length".into(),
        Some(_) => "stop".into(),
        None => Value::Null,
    }
}

fn choice_json(state: &SharedState, p: &Prepared, index: usize, out: &ChoiceOutput) -> Value {
    let text: String = out.steps.iter().map(|s| s.text.as_str()).collect();
    // With no budget nothing was generated: the prompt was read to its end (`length`).
    let finish = match p.budget {
        0 => "length".into(),
        _ => finish_str(out.steps.last().and_then(|s| s.finish)),
    };
    match p.kind {
        Kind::Completion => {
            let (prompt, text) = match p.common.echo {
                true => (out.prompt.as_deref(), format!("{}{text}", p.prompts[index].1)),
                false => (None, text),
            };
            let logprobs = completion_logprobs(state, p, &p.prompts[index].0, prompt, &out.steps, 0);
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Chat => json!({
            "index": index, "message": {"role": "assistant", "content": state.text.chat.clean_answer(&text)},
            "logprobs": chat_logprobs(state, p, &out.steps), "finish_reason": finish,
        }),
    }
}

/// The legacy completions logprobs object for the scored `prompt` (when echoed) and `steps`,
/// `text_offset` counted from `start`; null when not requested.
fn completion_logprobs(
    state: &SharedState,
    p: &Prepared,
    prompt_ids: &[u32],
    prompt: Option<&[Option<TokenLogprob>]>,
    steps: &[StepOutput],
    start: usize,
) -> Value {
    if p.common.config.top_logprobs.is_none() {
        return Value::Null;
    }
    let mut ids = Vec::new();
    let mut lps = Vec::new();
    if let Some(scores) = prompt {
        ids.extend_from_slice(prompt_ids);
        lps.extend(scores.iter().map(Option::as_ref));
    }
    for l in steps.iter().filter_map(|s| s.logprob.as_ref()) {
        ids.push(l.id);
        lps.push(Some(l));
    }
    logprobs::completion(&state.text.tokenizer, &ids, &lps, start)
}

/// The chat logprobs object for `steps`, null when not requested.
fn chat_logprobs(state: &SharedState, p: &Prepared, steps: &[StepOutput]) -> Value {
    if p.common.config.top_logprobs.is_none() {
        return Value::Null;
    }
    let lps: Vec<&TokenLogprob> = steps.iter().filter_map(|s| s.logprob.as_ref()).collect();
    logprobs::chat(&state.text.tokenizer, &lps)
}
