//! `GenerationConfig`: transformers' generation settings (`generation_config.json` names), with
//! the library defaults for absent keys, and the token budget they imply.

use std::path::Path;

use serde_json::Value;
use xgen_model::Config;

use crate::constraint::Format;
use crate::lookup::{PromptLookup, DEFAULT_NGRAM};
use crate::{
    error::{GenerateError, Result},
    penalties::Penalties,
    sampler::{SampleParams, Sampling},
};

/// What to do when the prompt plus the requested tokens exceed the model's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Fail before any compute.
    #[default]
    Error,
    /// Drop the oldest prompt tokens until it fits.
    Left,
}

/// Whether special tokens (other than the stop tokens, never shown) appear in the output text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SpecialText {
    /// As their strings, like transformers' `decode`.
    #[default]
    Keep,
    /// Left out, like `decode(..., skip_special_tokens=True)`.
    Skip,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Total length, prompt included (transformers' `max_length`, default 20).
    pub max_length: usize,
    /// New tokens; overrides `max_length` when set.
    pub max_new_tokens: Option<usize>,
    pub sampling: Sampling,
    pub penalties: Penalties,
    /// Generation ends when one of these is generated (it is kept in the ids).
    pub eos_token_ids: Vec<u32>,
    /// Fed to finished rows of a batch and used for left padding.
    pub pad_token_id: u32,
    /// Generation ends when the text contains one of these (it is not part of the text).
    pub stop_strings: Vec<String>,
    /// `Some(n)`: report the log-probability of each chosen token and of the `n` most likely.
    pub top_logprobs: Option<usize>,
    pub truncation: Truncation,
    pub special_text: SpecialText,
    /// The format the output must match (constrained decoding), if any.
    pub format: Option<Format>,
    /// Draft tokens from the prompt and output and verify them in one pass (speculative decoding
    /// with the same output), if set.
    pub prompt_lookup: Option<PromptLookup>,
}

impl GenerationConfig {
    /// transformers' defaults for a model: greedy, `max_length` 20, the model's eos and pad ids.
    pub fn defaults_for(model: &Config) -> Self {
        Self {
            max_length: 20,
            max_new_tokens: None,
            sampling: Sampling::Greedy,
            penalties: Penalties::default(),
            eos_token_ids: model.eos_token_id.clone(),
            pad_token_id: model.pad_token_id.unwrap_or(0),
            stop_strings: Vec::new(),
            top_logprobs: None,
            truncation: Truncation::Error,
            special_text: SpecialText::Keep,
            format: None,
            prompt_lookup: None,
        }
    }

    /// The defaults of `dir/generation_config.json` when it exists, else [`Self::defaults_for`].
    pub fn for_model_dir(dir: &Path, model: &Config) -> Result<Self> {
        Self::from_json(&Self::read_json(dir)?, model)
    }

    /// The JSON of `dir/generation_config.json`, or `{}` when there is none: what
    /// transformers' `generate(**kwargs)` overrides key by key.
    pub fn read_json(dir: &Path) -> Result<Value> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Value::Object(Default::default()));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|source| GenerateError::Io { path: path.clone(), source })?;
        serde_json::from_str(&text).map_err(|source| GenerateError::Json { path, source })
    }

    /// Reads the keys transformers' `GenerationConfig` defines; absent keys keep the defaults.
    pub fn from_json(v: &Value, model: &Config) -> Result<Self> {
        let mut c = Self::defaults_for(model);
        let uint = |k: &str| -> Result<Option<u64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| GenerateError::setting(k, format!("expected an integer, got {x}"))),
            }
        };
        let float = |k: &str| -> Result<Option<f32>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(|f| Some(f as f32))
                    .ok_or_else(|| GenerateError::setting(k, format!("expected a number, got {x}"))),
            }
        };
        if let Some(n) = uint("max_length")? {
            c.max_length = n as usize;
        }
        c.max_new_tokens = uint("max_new_tokens")?.map(|n| n as usize);
        match v.get("eos_token_id") {
            Some(Value::Array(ids)) => {
                c.eos_token_ids = ids.iter().filter_map(Value::as_u64).map(|i| i as u32).collect();
            }
            Some(x) if x.is_u64() => c.eos_token_ids = vec![x.as_u64().unwrap_or_default() as u32],
            _ => {}
        }
        if let Some(p) = uint("pad_token_id")? {
            c.pad_token_id = p as u32;
        }
        if let Some(n) = uint("prompt_lookup_num_tokens")? {
            let ngram = uint("max_matching_ngram_size")?.map_or(DEFAULT_NGRAM, |m| m as usize);
            c.prompt_lookup = Some(PromptLookup::new(n as usize, ngram)?);
        }
        if let Some(r) = float("repetition_penalty")? {
            c.penalties.repetition = r;
        }
        if v.get("do_sample").and_then(Value::as_bool).unwrap_or(false) {
            let mut p = SampleParams::default();
            if let Some(t) = float("temperature")? {
                p.temperature = t;
            }
            if let Some(k) = uint("top_k")? {
                p.top_k = (k > 0).then_some(k as usize);
            }
            if let Some(x) = float("top_p")? {
                p.top_p = x;
            }
            if let Some(x) = float("min_p")? {
                p.min_p = x;
            }
            c.sampling = Sampling::Sample(p);
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks value ranges; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        if let Sampling::Sample(p) = &self.sampling {
            if !(p.temperature > 0.0 && p.temperature.is_finite()) {
                return Err(GenerateError::setting(
                    "temperature",
                    format!("{} must be > 0 (use greedy for 0)", p.temperature),
                ));
            }
            if !(p.top_p > 0.0 && p.top_p <= 1.0) {
                return Err(GenerateError::setting("top_p", format!("{} must be in (0, 1]", p.top_p)));
            }
            if !(0.0..=1.0).contains(&p.min_p) {
                return Err(GenerateError::setting("min_p", format!("{} must be in [0, 1]", p.min_p)));
            }
        }
        if !(self.penalties.repetition > 0.0 && self.penalties.repetition.is_finite()) {
            return Err(GenerateError::setting(
                "repetition_penalty",
                format!("{} must be > 0", self.penalties.repetition),
            ));
        }
        if self.max_new_tokens == Some(0) {
            return Err(GenerateError::setting("max_new_tokens", "must be at least 1"));
        }
        Ok(())
    }

    /// New tokens to generate after a prompt of `prompt` tokens, and how many prompt tokens to
    /// drop on the left to fit `context`. Errors before any compute when it cannot fit.
    pub fn budget(&self, prompt: usize, context: usize) -> Result<(usize, usize)> {
        if prompt == 0 {
            return Err(GenerateError::EmptyPrompt);
        }
        let new = match self.max_new_tokens {
            Some(n) => n,
            None if self.max_length > prompt => self.max_length - prompt,
            None => return Err(GenerateError::NoRoom { prompt, max_length: self.max_length }),
        };
        if prompt + new <= context {
            return Ok((new, 0));
        }
        match self.truncation {
            Truncation::Left if new < context => Ok((new, prompt + new - context)),
            _ => Err(GenerateError::ContextOverflow { prompt, new, context }),
        }
    }
}
