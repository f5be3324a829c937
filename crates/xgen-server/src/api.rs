//! OpenAI request fields: read one by one from the JSON body, each checked for type and range,
//! so a bad value is a 400 that names the parameter.

use serde_json::{Map, Value};
use xgen_generate::{
    lookup::{DEFAULT_NGRAM, MAX_DRAFT},
    GenerationConfig, PromptLookup, SampleParams, Sampling,
};

use crate::error::ApiError;

/// At most this many choices per request (`n`, times the number of prompts).
pub const MAX_CHOICES: usize = 16;

/// How a request asks for log-probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobsField {
    /// `/v1/completions`: `logprobs: N` (0..=5) alternatives per token.
    Completions,
    /// `/v1/chat/completions`: `logprobs: true` and `top_logprobs: N` (0..=20).
    Chat,
}

/// Settings shared by both endpoints.
pub struct Common {
    pub config: GenerationConfig,
    /// The request field that named `config.format`.
    pub format_param: Option<&'static str>,
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub seed: Option<u64>,
    pub echo: bool,
}

pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn from_body(body: &'a Value) -> Result<Self, ApiError> {
        body.as_object()
            .map(Fields)
            .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))
    }

    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::invalid(
                    name,
                    format!("`{name}` must be a number in [{lo}, {hi}], got {v}"),
                )),
            },
        }
    }

    pub fn integer(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::invalid(
                    name,
                    format!("`{name}` must be an integer in [{lo}, {hi}], got {v}"),
                )),
            },
        }
    }

    pub fn boolean(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::invalid(name, format!("`{name}` must be true or false, got {v}"))),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::invalid(name, format!("`{name}` must be a string, got {v}"))),
        }
    }

    /// `stop`: a string or a list of up to 4 strings.
    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let bad = || ApiError::invalid("stop", "`stop` must be a string or a list of at most 4 strings");
        match self.get("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) if items.len() <= 4 => {
                items.iter().map(|i| i.as_str().map(String::from).ok_or_else(bad)).collect()
            }
            Some(_) => Err(bad()),
        }
    }

    /// `logit_bias`: `{"token id": bias in [-100, 100]}`.
    fn logit_bias(&self, vocab: u32) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(v) = self.get("logit_bias") else { return Ok(Vec::new()) };
        let map =
            v.as_object().ok_or_else(|| ApiError::invalid("logit_bias", "`logit_bias` must be an object"))?;
        map.iter()
            .map(|(k, b)| {
                let id = k.parse::<u32>().ok().filter(|&id| id < vocab);
                let bias = b.as_f64().filter(|x| (-100.0..=100.0).contains(x));
                match (id, bias) {
                    (Some(id), Some(bias)) => Ok((id, bias as f32)),
                    _ => Err(ApiError::invalid("logit_bias", format!("`logit_bias` entry {k}: {b} needs a token id below {vocab} and a bias in [-100, 100]"))),
                }
            })
            .collect()
    }

    /// The sampling, penalty, stop and streaming fields over `base`.
    pub fn common(
        &self,
        mut base: GenerationConfig,
        logprobs: LogprobsField,
        vocab: u32,
    ) -> Result<Common, ApiError> {
        if let Some(m) = self.get("model") {
            if !m.is_string() {
                return Err(ApiError::invalid("model", "`model` must be a string"));
            }
        }
        let temperature = self.number("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
        let top_p = self.number("top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
        if top_p == 0.0 {
            return Err(ApiError::invalid("top_p", "`top_p` must be above 0"));
        }
        let top_k = self.integer("top_k", -1, i64::from(vocab))?.filter(|&k| k > 0).map(|k| k as usize);
        let min_p = self.number("min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32;
        base.sampling = if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Sample(SampleParams { temperature, top_k, top_p, min_p })
        };
        base.penalties.presence = self.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
        base.penalties.frequency = self.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32;
        if let Some(r) = self.number("repetition_penalty", 0.01, 100.0)? {
            base.penalties.repetition = r as f32;
        }
        base.penalties.logit_bias = self.logit_bias(vocab)?;
        base.stop_strings = self.stop()?;
        base.top_logprobs = match logprobs {
            LogprobsField::Completions => self.integer("logprobs", 0, 5)?.map(|n| n as usize),
            LogprobsField::Chat => {
                let top = self.integer("top_logprobs", 0, 20)?.map(|n| n as usize);
                match (self.boolean("logprobs")?, top) {
                    (true, top) => Some(top.unwrap_or(0)),
                    (false, Some(_)) => {
                        return Err(ApiError::invalid(
                            "top_logprobs",
                            "`top_logprobs` needs `logprobs: true`",
                        ))
                    }
                    (false, None) => None,
                }
            }
        };
        let include_usage = match self.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => Fields(o).boolean("include_usage")?,
            Some(_) => return Err(ApiError::invalid("stream_options", "`stream_options` must be an object")),
        };
        self.string("user")?;
        // Prompt lookup (transformers' names): per request, over the server's default.
        if let Some(n) = self.integer("prompt_lookup_num_tokens", 0, MAX_DRAFT as i64)? {
            let ngram = self.integer("max_matching_ngram_size", 1, 16)?.map_or(DEFAULT_NGRAM, |m| m as usize);
            base.prompt_lookup = match n {
                0 => None,
                n => Some(
                    PromptLookup::new(n as usize, ngram)
                        .map_err(|e| ApiError::invalid("prompt_lookup_num_tokens", e.to_string()))?,
                ),
            };
        } else if let (Some(m), Some(lookup)) =
            (self.integer("max_matching_ngram_size", 1, 16)?, &mut base.prompt_lookup)
        {
            lookup.max_ngram = m as usize;
        }
        let format = self.format()?;
        base.format = format.as_ref().map(|(f, _)| f.clone());
        Ok(Common {
            format_param: format.map(|(_, p)| p),
            config: base,
            max_tokens: self.integer("max_tokens", 0, i64::MAX)?.map(|n| n as usize),
            n: self.integer("n", 1, MAX_CHOICES as i64)?.unwrap_or(1) as usize,
            stream: self.boolean("stream")?,
            include_usage,
            seed: self.integer("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
            echo: self.boolean("echo")?,
        })
    }
}
