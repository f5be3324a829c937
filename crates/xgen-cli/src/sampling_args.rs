//! Sampling, penalty, stop and output-format flags shared by `generate` and `chat`, validated into
//! a `GenerationConfig` once.

use std::path::PathBuf;

use clap::Args;
use xgen_generate::{Format, GenerationConfig, Grammars, ModelText, PromptLookup, SampleParams, Sampling};
use xgen_tokenizer::Tokenizer;

use crate::exit::bad_input;

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Always take the most likely token (overrides the sampling flags and generation_config.json).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p"])]
    pub greedy: bool,
    /// Sample with this temperature (0 means greedy).
    #[arg(long, allow_hyphen_values = true)]
    pub temperature: Option<f32>,
    /// Sample from the K most likely tokens (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens with this much probability mass.
    #[arg(long, allow_hyphen_values = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, allow_hyphen_values = true)]
    pub min_p: Option<f32>,
    /// transformers' repetition penalty (1 = off).
    #[arg(long, allow_hyphen_values = true)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI presence penalty: subtracted once from every generated token's logit.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted per occurrence of a generated token.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// Add BIAS to the logit of token ID (repeatable), e.g. --logit-bias 50256=-100.
    #[arg(long, value_name = "ID=BIAS", value_parser = parse_bias)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Random seed: the same seed gives the same output (default: a fresh one, reported in --json).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains STR (repeatable); STR is not part of the output.
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
    /// The output is JSON valid under the JSON schema in FILE (constrained decoding).
    #[arg(long, value_name = "FILE", group = "format")]
    pub json_schema: Option<PathBuf>,
    /// The output matches the regular expression RE, whole.
    #[arg(long, value_name = "RE", group = "format")]
    pub regex: Option<String>,
    /// The output is in the language of the Lark grammar in FILE (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "format")]
    pub grammar: Option<PathBuf>,
    /// The output is exactly one of these comma-separated choices.
    #[arg(long, value_name = "A,B,...", value_delimiter = ',', group = "format")]
    pub choice: Option<Vec<String>>,
    /// Prompt-lookup speculation: draft up to N tokens (1-14; 6 when N is left out) copied from the
    /// prompt and output and verify them in one pass. The output is the same as without it.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "6")]
    pub prompt_lookup: Option<usize>,
    /// With --prompt-lookup: the longest n-gram matched to find a draft.
    #[arg(long, value_name = "M", requires = "prompt_lookup", default_value_t = xgen_generate::lookup::DEFAULT_NGRAM)]
    pub ngram: usize,
}

impl SamplingArgs {
    /// Applies the flags over `base` (the model's generation defaults), for a model with this
    /// tokenizer and `n_vocab` ids.
    pub fn apply(
        &self,
        mut base: GenerationConfig,
        tokenizer: &Tokenizer,
        n_vocab: usize,
    ) -> anyhow::Result<GenerationConfig> {
        let sampling_flags = self.temperature.is_some()
            || self.top_k.is_some()
            || self.top_p.is_some()
            || self.min_p.is_some();
        if self.greedy || self.temperature == Some(0.0) {
            base.sampling = Sampling::Greedy;
        } else if sampling_flags {
            let mut p = match base.sampling {
                Sampling::Sample(p) => p,
                Sampling::Greedy => SampleParams::default(),
            };
            p.temperature = self.temperature.unwrap_or(p.temperature);
            if let Some(k) = self.top_k {
                p.top_k = (k > 0).then_some(k);
            }
            p.top_p = self.top_p.unwrap_or(p.top_p);
            p.min_p = self.min_p.unwrap_or(p.min_p);
            base.sampling = Sampling::Sample(p);
        }
        if let Some(r) = self.repetition_penalty {
            base.penalties.repetition = r;
        }
        base.penalties.presence = self.presence_penalty;
        base.penalties.frequency = self.frequency_penalty;
        let bias_ids: Vec<u32> = self.logit_bias.iter().map(|&(id, _)| id).collect();
        ModelText::check_ids(&bias_ids, n_vocab, "--logit-bias").map_err(|e| bad_input(e.to_string()))?;
        base.penalties.logit_bias = self.logit_bias.clone();
        base.stop_strings.extend(self.stop.iter().cloned());
        base.format = self.format(tokenizer, n_vocab)?;
        if let Some(n) = self.prompt_lookup {
            base.prompt_lookup =
                Some(PromptLookup::new(n, self.ngram).map_err(|e| bad_input(e.to_string()))?);
        }
        base.validate().map_err(|e| bad_input(e.to_string()))?;
        Ok(base)
    }

    /// The output format the flags ask for, checked (a bad schema, regex or grammar is the
    /// user's to fix, reported before any compute).
    fn format(&self, tokenizer: &Tokenizer, n_vocab: usize) -> anyhow::Result<Option<Format>> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|e| bad_input(format!("--{flag} {}: {e}", path.display())))
        };
        let format = if let Some(path) = &self.json_schema {
            let schema = serde_json::from_str(&read("json-schema", path)?)
                .map_err(|e| bad_input(format!("--json-schema {}: invalid JSON: {e}", path.display())))?;
            Format::JsonSchema(schema)
        } else if let Some(rx) = &self.regex {
            Format::Regex(rx.clone())
        } else if let Some(path) = &self.grammar {
            Format::Grammar(read("grammar", path)?)
        } else if let Some(choices) = &self.choice {
            Format::Choice(choices.clone())
        } else {
            return Ok(None);
        };
        let grammars = Grammars::new(tokenizer, n_vocab)?;
        grammars.constraint(&format).map_err(|e| bad_input(e.to_string()))?;
        Ok(Some(format))
    }

    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or_else(rand::random)
    }
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=BIAS"))?;
    let id = id.trim().parse().map_err(|_| format!("`{s}`: {id} is not a token id"))?;
    let bias = bias.trim().parse().map_err(|_| format!("`{s}`: {bias} is not a number"))?;
    Ok((id, bias))
}
