//! Constrained decoding: the output must match a JSON schema, any JSON object, a regular
//! expression, a Lark grammar or one of a list of choices. Built on llguidance: a [`Grammars`]
//! holds the XGen vocabulary as llguidance's token trie (byte-level tokens; the specials behind
//! its 0xff marker, so text can never produce them), and each sequence gets a [`Constraint`]
//! whose mask sets every token the format cannot take next to -inf before sampling, greedy or
//! not. eos (50256) is allowed only where the format may end.
//!
//! JSON is generated compact (no free whitespace between tokens) unless the schema says
//! otherwise through llguidance's `x-guidance` options: free whitespace lets a model wander in
//! blank space until `max_tokens`.

use std::sync::Arc;

use llguidance::{api::TopLevelGrammar, Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use xgen_tokenizer::Tokenizer;

use crate::error::{GenerateError, Result};

/// What the output must be.
#[derive(Clone, Debug, PartialEq)]
pub enum Format {
    /// A JSON value valid under this schema.
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// Text matching this regular expression, whole.
    Regex(String),
    /// Text in the language of this Lark grammar (llguidance's dialect: `start: ...`).
    Grammar(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl Format {
    /// The llguidance grammar for this format.
    fn grammar(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Self::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            Self::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({"type": "object"}))),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Grammar(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err(invalid("choice", "the list of choices is empty"));
                }
                let quoted: Vec<String> =
                    choices.iter().map(|c| serde_json::to_string(c).expect("a string serializes")).collect();
                TopLevelGrammar::from_lark(format!("start: {}", quoted.join(" | ")))
            }
        })
    }

    /// The name of the setting, for errors.
    fn name(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "json_schema",
            Self::JsonObject => "json_object",
            Self::Regex(_) => "regex",
            Self::Grammar(_) => "grammar",
            Self::Choice(_) => "choice",
        }
    }
}

/// `schema` with llguidance's whitespace made compact unless it sets its own.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        let options = map.entry("x-guidance").or_insert_with(|| json!({}));
        if let Value::Object(options) = options {
            options.entry("whitespace_flexible").or_insert(json!(false));
        }
    }
    schema
}

fn invalid(field: &str, message: impl Into<String>) -> GenerateError {
    GenerateError::setting(field, message)
}

/// The vocabulary as llguidance sees it; makes a [`Constraint`] per sequence. Building it reads
/// the whole vocabulary once (make one per process and share it).
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
}

impl Grammars {
    /// For `tokenizer`'s vocabulary, padded to `vocab_size` ids (the model's logits; ids without
    /// bytes can never be chosen).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Self> {
        let eos = tokenizer.eos_token_id();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| match tokenizer.special_token(id) {
                Some(text) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], text.as_bytes()].concat(),
                None => tokenizer.token_bytes(id).map(<[u8]>::to_vec).unwrap_or_default(),
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, eos), &words);
        let env = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&(env as toktrie::TokEnv))
            .map_err(|e| invalid("constraint", format!("llguidance: {e}")))?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A fresh matcher for `format`; a bad schema, regex or grammar is an error naming it.
    pub fn constraint(&self, format: &Format) -> Result<Constraint> {
        let parser = self.factory.create_parser(format.grammar()?);
        let matcher = Matcher::new(parser);
        match matcher.get_error() {
            Some(e) => Err(invalid(format.name(), e)),
            None => Ok(Constraint { matcher, ready: None }),
        }
    }
}

/// One sequence's place in its format.
pub struct Constraint {
    matcher: Matcher,
    /// The next step's allowed tokens, computed ahead (while the model runs).
    ready: Option<SimpleVob>,
}

impl Constraint {
    /// Computes the next step's allowed tokens now, so that [`Constraint::mask`] only applies
    /// them: callers run this beside the model's forward pass.
    pub fn compute(&mut self) -> Result<()> {
        if self.ready.is_none() && !self.matcher.is_stopped() {
            self.ready = Some(self.matcher.compute_mask().map_err(|e| invalid("constraint", e.to_string()))?);
        }
        Ok(())
    }

    /// Sets the logits of every token the format cannot take next to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = match self.ready.take() {
            Some(allowed) => allowed,
            None => self.matcher.compute_mask().map_err(|e| invalid("constraint", e.to_string()))?,
        };
        let known = allowed.len();
        for (id, x) in logits.iter_mut().enumerate() {
            if id >= known || !allowed.is_allowed(id as u32) {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past `token` (one the mask allowed).
    pub fn accept(&mut self, token: u32) -> Result<()> {
        self.ready = None;
        self.matcher.consume_token(token).map_err(|e| invalid("constraint", e.to_string()))
    }

    /// Whether the format is complete and nothing may follow (not even more of it).
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}
