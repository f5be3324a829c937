//! The generation loop: prefill the prompt(s), then sample and decode one token per step, with
//! penalties, stops, streaming text and log-probabilities. Several prompts run as one left-padded
//! batch, as transformers batches them.

use std::sync::atomic::{AtomicBool, Ordering};

use rand::Rng;
use xgen_kvstore::DiskCache;
use xgen_model::{KvCache, Model, Tensor};
use xgen_tokenizer::{StreamDecoder, Tokenizer};

use crate::{
    config::{GenerationConfig, SpecialText},
    constraint::{Constraint, Grammars},
    draft_plan::Candidate,
    error::{GenerateError, Result},
    lookup::{DraftStats, Drafts},
    penalties::History,
    sampler,
    stop::{FinishReason, StopStrings},
};

/// The log-probability (natural log, under the model's raw distribution) of a chosen token and
/// of the most likely alternatives at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What happened in one row at one step, for streaming.
#[derive(Clone, Debug)]
pub struct Step<'a> {
    pub row: usize,
    /// The token generated.
    pub token: u32,
    /// Text that became final with this step (possibly empty).
    pub text: &'a str,
    pub logprob: Option<&'a TokenLogprob>,
    /// Set on the row's last step.
    pub finish: Option<FinishReason>,
}

/// One generated sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// The prompt as run (after any left truncation).
    pub prompt_ids: Vec<u32>,
    /// Generated ids, including a final eos token when generation stopped on it.
    pub ids: Vec<u32>,
    /// Generated text: without the eos token and without a stop string and what followed it.
    pub text: String,
    pub finish_reason: FinishReason,
    /// One entry per generated id, when `top_logprobs` was requested.
    pub logprobs: Vec<TokenLogprob>,
    /// Tokens drafted by prompt lookup, and how many of them were accepted.
    pub draft: DraftStats,
    /// Prompt positions restored from the disk prompt cache instead of computed.
    pub restored: usize,
}

/// One sequence being generated: its output so far, penalty history, incremental decoder and stop
/// filter. [`Generator`] drives these for a batch; a server engine can drive them one per request.
pub struct Sequence<'t> {
    tokenizer: &'t Tokenizer,
    config: GenerationConfig,
    /// New tokens allowed in all.
    budget: usize,
    out: Output,
    history: History,
    decoder: StreamDecoder<'t>,
    stops: StopStrings,
    /// The format the output must match, if any.
    constraint: Option<Constraint>,
    /// Its prompt-lookup drafts: the last one looked up, and how often they are accepted.
    drafts: Drafts,
    finished: bool,
}

/// What one [`Sequence::step`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub token: u32,
    /// Text that became final with this token (possibly empty).
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    /// Set when this token ended the sequence.
    pub finish: Option<FinishReason>,
}

impl<'t> Sequence<'t> {
    /// A sequence continuing `prompt` for at most `budget` new tokens (see
    /// [`GenerationConfig::budget`]).
    pub fn new(tokenizer: &'t Tokenizer, prompt: Vec<u32>, config: GenerationConfig, budget: usize) -> Self {
        Self {
            tokenizer,
            drafts: Drafts::default(),
            history: History::new(&prompt),
            decoder: tokenizer.stream_decoder(),
            stops: StopStrings::new(config.stop_strings.clone()),
            out: Output {
                prompt_ids: prompt,
                ids: Vec::new(),
                text: String::new(),
                finish_reason: FinishReason::Length,
                logprobs: Vec::new(),
                draft: DraftStats::default(),
                restored: 0,
            },
            config,
            budget,
            constraint: None,
            finished: false,
        }
    }

    /// Whether an output format constrains it.
    pub fn is_constrained(&self) -> bool {
        self.constraint.is_some()
    }

    /// Computes the next step's token mask ahead, when constrained: run it beside the forward
    /// pass that produces the step's logits.
    pub fn prepare(&mut self) -> Result<()> {
        match &mut self.constraint {
            Some(c) if !self.finished => c.compute(),
            _ => Ok(()),
        }
    }

    /// The same sequence, its tokens masked to those `constraint` allows.
    pub fn constrained(mut self, constraint: Constraint) -> Self {
        self.constraint = Some(constraint);
        self
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn output(&self) -> &Output {
        &self.out
    }

    /// Records that the first `n` prompt positions came from the disk prompt cache.
    pub fn set_restored(&mut self, n: usize) {
        self.out.restored = n;
    }

    pub fn into_output(self) -> Output {
        self.out
    }

    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }

    /// The tokens that may be verified after the last one, looked up in the prompt and the
    /// output ([`lookup::draft`], up to `prompt_lookup_num_tokens`); never more than the budget
    /// has room for after the model's own token. Empty without prompt lookup. How many of them a
    /// step verifies is the caller's choice ([`crate::draft_plan::plan`] with
    /// [`Sequence::candidate`]); the rest still tell [`Sequence::verify`] whether one more would
    /// have been accepted.
    pub fn draft(&mut self) -> Vec<u32> {
        let room = self.budget.saturating_sub(self.out.ids.len() + 1);
        let tokens: Vec<u32> = match self.config.prompt_lookup {
            Some(_) => self.out.prompt_ids.iter().chain(&self.out.ids).copied().collect(),
            None => Vec::new(),
        };
        self.drafts.look_up(self.config.prompt_lookup, &tokens, room)
    }

    /// The last draft's length and this sequence's acceptance rate, for the step's plan.
    pub fn candidate(&self) -> Candidate {
        self.drafts.candidate()
    }

    /// A verify step: `rows[i]` are the raw logits after the last accepted token (`i = 0`) and
    /// after `draft[..i]`. Each row is stepped exactly as plain decoding steps it (penalties,
    /// constraint mask, sampler, stops), accepting the next row only while the chosen token
    /// equals the draft's; so the output (and, sampling, the random stream) is plain decoding's.
    /// Returns the steps taken: the accepted drafts, then the model's own token.
    pub fn verify(
        &mut self,
        rows: &[Vec<f32>],
        draft: &[u32],
        rng: &mut impl Rng,
    ) -> Result<Vec<StepOutput>> {
        let mut steps = Vec::with_capacity(draft.len() + 1);
        for (i, raw) in rows.iter().take(draft.len() + 1).enumerate() {
            let s = self.step(raw, rng)?;
            let go_on = !self.finished && draft.get(i) == Some(&s.token);
            steps.push(s);
            if !go_on {
                break;
            }
        }
        let accepted = steps.iter().zip(draft).take_while(|(s, d)| s.token == **d).count();
        self.out.draft.drafted += draft.len();
        self.out.draft.accepted += accepted;
        let chosen: Vec<u32> = steps.iter().map(|s| s.token).collect();
        self.drafts.observe(draft, &chosen, accepted);
        Ok(steps)
    }

    /// Chooses the next token from the model's raw logits for this sequence and records it.
    pub fn step(&mut self, raw: &[f32], rng: &mut impl Rng) -> Result<StepOutput> {
        let token = if self.config.penalties.is_noop() && self.constraint.is_none() {
            sampler::sample(raw, &self.config.sampling, rng)
        } else {
            let mut logits = raw.to_vec();
            self.history.apply(&self.config.penalties, &mut logits);
            if let Some(c) = &mut self.constraint {
                c.mask(&mut logits)?;
            }
            sampler::sample(&logits, &self.config.sampling, rng)
        };
        let complete = match &mut self.constraint {
            Some(c) => {
                c.accept(token)?;
                c.is_done()
            }
            None => false,
        };
        let logprob = self.config.top_logprobs.map(|n| token_logprob(raw, token, n));
        self.accept(token, logprob, complete)
    }

    /// Records `token`: ids, text (through the stop filter), finish conditions (`complete`: the
    /// constraint admits nothing more, a stop).
    fn accept(&mut self, token: u32, logprob: Option<TokenLogprob>, complete: bool) -> Result<StepOutput> {
        self.out.ids.push(token);
        self.history.accept(token);
        if let Some(lp) = &logprob {
            self.out.logprobs.push(lp.clone());
        }
        let mut finish = None;
        let mut text = String::new();
        if self.config.eos_token_ids.contains(&token) {
            finish = Some(FinishReason::Eos);
        } else if self.config.special_text == SpecialText::Skip && self.tokenizer.is_special(token) {
            // Not part of the text.
        } else if self.tokenizer.token_bytes(token).is_err() {
            // A model with a larger vocabulary than the tokenizer: the id is kept, it has no text.
        } else {
            let piece = self.decoder.push(token)?;
            let (emit, stopped) = self.stops.push(&piece);
            text = emit;
            if stopped {
                finish = Some(FinishReason::Stop);
            }
        }
        let stop_string = finish == Some(FinishReason::Stop);
        if finish.is_none() && complete {
            finish = Some(FinishReason::Stop);
        }
        if finish.is_none() && self.out.ids.len() >= self.budget {
            finish = Some(FinishReason::Length);
        }
        if let Some(reason) = finish {
            if !stop_string {
                // Release what the decoder and the stop filter held back: it was no stop.
                let tail = std::mem::replace(&mut self.decoder, self.tokenizer.stream_decoder()).finish();
                let (emit, stopped) = self.stops.push(&tail);
                text.push_str(&emit);
                if !stopped {
                    text.push_str(&self.stops.finish());
                }
            }
            self.out.finish_reason = reason;
            self.finished = true;
        }
        self.out.text.push_str(&text);
        Ok(StepOutput { token, text, logprob, finish })
    }
}

/// Runs generation with a model and the tokenizer that goes with it.
pub struct Generator<'a> {
    pub(crate) model: &'a Model,
    pub(crate) tokenizer: &'a Tokenizer,
    /// The vocabulary for constraints, built when a config first asks for a format.
    grammars: std::sync::OnceLock<Grammars>,
    /// Set by the caller (from another thread) to stop; checked between prompt chunks and tokens.
    cancel: Option<&'a AtomicBool>,
    /// Where prompts' KV blocks are restored from and saved to.
    pub(crate) disk: Option<&'a DiskCache>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Model, tokenizer: &'a Tokenizer) -> Self {
        Self { model, tokenizer, grammars: std::sync::OnceLock::new(), cancel: None, disk: None }
    }

    /// Stops with [`GenerateError::Cancelled`] once `flag` is set (between prompt chunks and
    /// between tokens): how a caller on another thread interrupts a long call.
    pub fn cancellable(mut self, flag: &'a AtomicBool) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Restores one-prompt calls' prompts from `disk` where stored, and saves what they compute.
    pub fn with_prompt_cache(mut self, disk: &'a DiskCache) -> Self {
        self.disk = Some(disk);
        self
    }

    pub(crate) fn check_cancel(&self) -> Result<()> {
        match self.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(GenerateError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Reads `input` `[b, t]` into `cache` (stopping between steps once cancelled); the f32 logits
    /// of the last position, `[b, v]`.
    pub(crate) fn prefill(&self, input: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(match self.cancel {
            Some(flag) => self.model.forward_last_until(input, cache, flag)?,
            None => self.model.forward_last(input, cache)?,
        })
    }

    /// A sequence for `prompt`, constrained when `config` names a format.
    pub(crate) fn sequence(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        steps: usize,
    ) -> Result<Sequence<'a>> {
        let seq = Sequence::new(self.tokenizer, prompt.to_vec(), config.clone(), steps);
        let Some(format) = &config.format else { return Ok(seq) };
        let grammars = match self.grammars.get() {
            Some(g) => g,
            None => {
                let g = Grammars::new(self.tokenizer, self.model.config().vocab_size)?;
                self.grammars.get_or_init(|| g)
            }
        };
        Ok(seq.constrained(grammars.constraint(format)?))
    }

    /// Generates a continuation of `prompt`; `on_step` sees each token and its text as produced.
    pub fn generate(
        &self,
        prompt: &[u32],
        config: &GenerationConfig,
        rng: &mut impl Rng,
        on_step: &mut dyn FnMut(&Step),
    ) -> Result<Output> {
        let mut outs = self.generate_batch(&[prompt.to_vec()], config, rng, on_step)?;
        Ok(outs.remove(0))
    }

    /// Generates for several prompts at once, left-padded to the longest with `pad_token_id`
    /// (transformers' batching: `max_length` counts the padded length). Rows finish
    /// independently; a finished row is fed pad tokens until all are done.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerationConfig,
        rng: &mut impl Rng,
        on_step: &mut dyn FnMut(&Step),
    ) -> Result<Vec<Output>> {
        config.validate()?;
        let context = self.model.config().max_position_embeddings;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if prompts.iter().any(Vec::is_empty) {
            return Err(GenerateError::EmptyPrompt);
        }
        let (steps, drop) = config.budget(longest, context)?;
        for p in prompts {
            self.model.check_ids(p)?;
        }
        self.model.check_ids(&[config.pad_token_id])?;
        if drop > 0 && prompts.len() > 1 {
            return Err(GenerateError::ContextOverflow { prompt: longest, new: steps, context });
        }
        let prompts: Vec<&[u32]> = prompts.iter().map(|p| &p[drop.min(p.len() - 1)..]).collect();
        let width = longest - drop;
        let padding: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let mut input = Vec::with_capacity(prompts.len() * width);
        for (p, &pad) in prompts.iter().zip(&padding) {
            input.extend(std::iter::repeat_n(config.pad_token_id, pad));
            input.extend_from_slice(p);
        }
        let mut rows: Vec<Sequence> =
            prompts.iter().map(|p| self.sequence(p, config, steps)).collect::<Result<_>>()?;

        let model = self.model;
        let mut cache = model.new_cache(prompts.len(), width + steps)?;
        cache.set_padding(padding)?;
        // One prompt: its stored prefix from the disk cache, if any (a batch reads its prompts).
        let restored = match &prompts[..] {
            [p] => self.restore_prompt(&mut cache, p),
            _ => 0,
        };
        let input =
            Tensor::from_vec(input[restored..].to_vec(), (prompts.len(), width - restored), model.device())?;
        let mut logits = self.prefill(&input, &mut cache)?; // [b, v]
        if let ([row], [p]) = (&mut rows[..], &prompts[..]) {
            self.save_prompt(&cache, p);
            row.set_restored(restored);
            self.decode(row, &mut cache, logits.squeeze(0)?.to_vec1()?, rng, on_step)?;
            return Ok(rows.into_iter().map(Sequence::into_output).collect());
        }
        loop {
            self.check_cancel()?;
            let all: Vec<Vec<f32>> = logits.to_vec2()?;
            let mut next = vec![config.pad_token_id; rows.len()];
            for (i, (row, raw)) in rows.iter_mut().zip(all).enumerate() {
                if row.is_finished() {
                    continue;
                }
                let s = row.step(&raw, rng)?;
                next[i] = s.token;
                on_step(&Step {
                    row: i,
                    token: s.token,
                    text: &s.text,
                    logprob: s.logprob.as_ref(),
                    finish: s.finish,
                });
            }
            if rows.iter().all(Sequence::is_finished) {
                break;
            }
            let ids = Tensor::from_vec(next, (rows.len(), 1), model.device())?;
            let (next_logits, masks) =
                forward_beside_masks(rows.iter_mut().collect(), || model.forward_last(&ids, &mut cache));
            masks?;
            logits = next_logits?;
        }
        Ok(rows.into_iter().map(Sequence::into_output).collect())
    }
}

/// Runs `forward` (the model step that produces the next logits) while the constrained ones among
/// `sequences` compute their next token masks on another thread; `forward` alone, on this thread,
/// when none is constrained. Returns `forward`'s result and the masks' outcome.
pub fn forward_beside_masks<R: Send>(
    mut sequences: Vec<&mut Sequence<'_>>,
    forward: impl FnOnce() -> R,
) -> (R, Result<()>) {
    sequences.retain(|s| s.is_constrained());
    if sequences.is_empty() {
        return (forward(), Ok(()));
    }
    std::thread::scope(|scope| {
        let masks = scope.spawn(move || sequences.into_iter().try_for_each(|s| s.prepare()));
        (forward(), masks.join().expect("the mask thread does not panic"))
    })
}

/// log-softmax of `raw` at `token`, and the `n` largest entries.
pub fn token_logprob(raw: &[f32], token: u32, n: usize) -> TokenLogprob {
    let lse = xgen_model::perplexity::log_sum_exp(raw);
    let lp = |x: f32| (x as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = raw.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if n > 0 && n < top.len() {
        top.select_nth_unstable_by(n - 1, by_logit);
    }
    top.truncate(n);
    top.sort_by(by_logit);
    TokenLogprob {
        id: token,
        logprob: lp(raw[token as usize]),
        top: top.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}
