//! The SSE stream of a request: chunks for every choice as its events arrive (progress while its
//! prompt is read, the echoed prompt with its scores, each token), then usage (if asked) and
//! `data: [DONE]`.

use axum::response::sse::Event as SseEvent;
use futures_util::{stream, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use xgen_generate::{chat::AnswerStream, StepOutput, TokenLogprob};

use super::{chat_logprobs, completion_logprobs, finish_str, usage, Kind, Prepared};
use crate::{
    engine::{Event, PromptProgress},
    state::SharedState,
};

/// Where one choice's stream stands.
struct ChoiceState {
    answer: AnswerStream,
    /// Nothing of it sent yet (chat: the role goes with the first delta).
    first: bool,
    /// The prompt was echoed (`echo`).
    echoed: bool,
    /// Characters of text sent so far (`text_offset` continues from here).
    sent_chars: usize,
    finished: bool,
}

/// The chunks of one request, built as its events arrive.
struct Chunks {
    state: SharedState,
    p: Prepared,
    head: Value,
    choices: Vec<ChoiceState>,
    completion_tokens: usize,
}

/// The SSE stream for `p`, whose choices report on `receivers`.
pub(super) fn chunks(
    state: SharedState,
    p: Prepared,
    receivers: Vec<UnboundedReceiver<Event>>,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    // Each choice's events, then `None` when its channel closes.
    let merged = stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(e) => Some((Some(e), Some(rx))),
                None => Some((None, None)),
            }
        })
        .map(move |e| (i, e))
        .boxed()
    }));
    let object = if p.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let head = json!({"id": p.id, "object": object, "created": p.created, "model": state.model_name});
    let choices = (0..p.prompts.len())
        .map(|_| ChoiceState {
            answer: state.text.chat.answer_stream(),
            first: true,
            echoed: false,
            sent_chars: 0,
            finished: false,
        })
        .collect();
    let mut c = Chunks { state, p, head, choices, completion_tokens: 0 };
    merged
        .flat_map(move |(index, event)| stream::iter(c.on(index, event)))
        .map(|c| Ok(SseEvent::default().data(c.to_string())))
        .chain(stream::once(async { Ok(SseEvent::default().data("[DONE]")) }))
}

impl Chunks {
    /// The chunks choice `index`'s event (`None`: its channel closed) makes.
    fn on(&mut self, index: usize, event: Option<Event>) -> Vec<Value> {
        match event {
            Some(Event::Error(e)) => {
                vec![json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}})]
            }
            Some(Event::Drafts(_)) => Vec::new(),
            Some(Event::Progress(pp)) => vec![self.progress(index, pp)],
            Some(Event::Prompt(scores)) => vec![self.echo(index, Some(&scores), Value::Null)],
            Some(Event::Token(step)) => self.token(index, step),
            // With no budget, the prompt read is the whole answer.
            None if self.p.budget == 0 && !self.choices[index].finished => {
                let mut out = vec![self.echo(index, None, "length".into())];
                out.extend(self.finished(index));
                out
            }
            None => Vec::new(),
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let mut c = self.head.clone();
        c["choices"] = choices;
        if self.p.common.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// llama.cpp's `prompt_progress` chunk (no choices; `index` names the choice).
    fn progress(&self, index: usize, pp: PromptProgress) -> Value {
        let mut c = self.chunk(json!([]));
        c["prompt_progress"] = json!({
            "index": index, "total": pp.total, "cache": pp.cache, "processed": pp.processed, "time_ms": pp.time_ms,
        });
        c
    }

    /// Choice `index`'s text for its next chunk: the prompt first while it is still to be echoed
    /// (with `echo`), then `tail`; and where the chunk's text starts in the choice's whole text.
    fn text(&mut self, index: usize, tail: &str) -> (String, usize) {
        let choice = &mut self.choices[index];
        let echo = match (self.p.common.echo, choice.echoed) {
            (true, false) => self.p.prompts[index].1.as_str(),
            _ => "",
        };
        choice.echoed |= self.p.common.echo;
        let text = format!("{echo}{tail}");
        let start = choice.sent_chars;
        choice.sent_chars += text.chars().count();
        (text, start)
    }

    /// The echoed prompt text (once; empty after) with its `scores`, when asked for.
    fn echo(&mut self, index: usize, scores: Option<&[Option<TokenLogprob>]>, finish: Value) -> Value {
        let (text, start) = self.text(index, "");
        let logprobs = match scores {
            Some(s) => {
                completion_logprobs(&self.state, &self.p, &self.p.prompts[index].0, Some(s), &[], start)
            }
            None => Value::Null,
        };
        self.chunk(json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]))
    }

    fn token(&mut self, index: usize, step: StepOutput) -> Vec<Value> {
        self.completion_tokens += 1;
        let finish = finish_str(step.finish);
        let steps = std::slice::from_ref(&step);
        let choice_json = match self.p.kind {
            Kind::Completion => {
                let (text, start) = self.text(index, &step.text);
                // The token's text is the end of the chunk's.
                let start = start + text.chars().count() - step.text.chars().count();
                let logprobs = completion_logprobs(&self.state, &self.p, &[], None, steps, start);
                json!([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])
            }
            Kind::Chat => {
                let choice = &mut self.choices[index];
                let mut delta = json!({"content": choice.answer.push(&step.text)});
                if choice.first {
                    delta["role"] = "assistant".into();
                }
                let logprobs = chat_logprobs(&self.state, &self.p, steps);
                json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
            }
        };
        self.choices[index].first = false;
        let mut out = vec![self.chunk(choice_json)];
        if step.finish.is_some() {
            out.extend(self.finished(index));
        }
        out
    }

    /// Marks choice `index` finished; the usage chunk once every choice has (when asked for).
    fn finished(&mut self, index: usize) -> Option<Value> {
        self.choices[index].finished = true;
        if !self.p.common.include_usage || !self.choices.iter().all(|c| c.finished) {
            return None;
        }
        let prompt_tokens = self.p.prompts.iter().map(|t| t.0.len()).step_by(self.p.common.n).sum::<usize>();
        let mut u = self.head.clone();
        u["choices"] = json!([]);
        u["usage"] = usage(prompt_tokens, self.completion_tokens);
        Some(u)
    }
}
