//! Generation keywords (`max_new_tokens=`, `do_sample=`, `stop=`, ...) validated once into a
//! `GenerationConfig`, with transformers' meaning: the model's generation_config.json updated by
//! the keywords given, so `do_sample=False` (the XGen default) is greedy whatever `temperature`.

use pyo3::{
    exceptions::{PyTypeError, PyValueError},
    prelude::*,
    types::{PyDict, PyString},
};
use serde_json::{Map, Value};
use xgen_generate::{Format, GenerationConfig, Truncation};
use xgen_model::Config;

use crate::errors::generate_error;

/// Keys of generation_config.json a keyword replaces, with the JSON kind each must have.
const CONFIG_KEYS: [(&str, Kind); 12] = [
    ("max_length", Kind::Count),
    ("max_new_tokens", Kind::Count),
    ("do_sample", Kind::Bool),
    ("temperature", Kind::Number),
    ("top_k", Kind::Count),
    ("top_p", Kind::Number),
    ("min_p", Kind::Number),
    ("repetition_penalty", Kind::Number),
    ("eos_token_id", Kind::Ids),
    ("pad_token_id", Kind::Count),
    ("prompt_lookup_num_tokens", Kind::Count),
    ("max_matching_ngram_size", Kind::Count),
];

/// Keywords that are not generation_config.json keys.
const OTHER_KEYS: [&str; 9] = [
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "truncate",
    "json_schema",
    "regex",
    "grammar",
    "choice",
];

#[derive(Clone, Copy)]
enum Kind {
    Count,
    Bool,
    Number,
    Ids,
}

/// The generation keywords of one call.
pub struct GenArgs {
    /// generation_config.json with the keywords' keys replaced.
    json: Map<String, Value>,
    stop: Vec<String>,
    pub seed: Option<u64>,
    presence: f32,
    frequency: f32,
    truncation: Truncation,
    format: Option<Format>,
    /// Whether max_length or max_new_tokens was given (chat picks its own budget otherwise).
    pub has_budget: bool,
}

impl GenArgs {
    /// Reads `kwargs` over `base` (generation_config.json); `method` names the call in errors.
    pub fn parse(base: &Value, kwargs: Option<&Bound<'_, PyDict>>, method: &str) -> PyResult<Self> {
        let mut json = base.as_object().cloned().unwrap_or_default();
        let mut args = GenArgs {
            json: Map::new(),
            stop: Vec::new(),
            seed: None,
            presence: 0.0,
            frequency: 0.0,
            truncation: Truncation::Error,
            format: None,
            has_budget: false,
        };
        for (key, value) in kwargs.map(|k| k.iter().collect::<Vec<_>>()).unwrap_or_default() {
            let key: String = key.extract()?;
            if value.is_none() {
                continue;
            }
            if let Some(&(_, kind)) = CONFIG_KEYS.iter().find(|(k, _)| *k == key) {
                json.insert(key.clone(), json_value(&value, kind, &key)?);
                args.has_budget |= key == "max_length" || key == "max_new_tokens";
            } else if OTHER_KEYS.contains(&key.as_str()) {
                args.other(&key, &value)?;
            } else {
                return Err(PyTypeError::new_err(format!(
                    "{method}() got an unexpected keyword argument '{key}'"
                )));
            }
        }
        args.json = json;
        Ok(args)
    }

    fn other(&mut self, key: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let number = |v: &Bound<'_, PyAny>| {
            v.extract::<f32>().map_err(|_| PyTypeError::new_err(format!("{key}: expected a number")))
        };
        match key {
            "stop" => {
                self.stop = if value.is_instance_of::<PyString>() {
                    vec![value.extract()?]
                } else {
                    value
                        .extract()
                        .map_err(|_| PyTypeError::new_err("stop: expected a str or a list of str"))?
                }
            }
            "seed" => {
                self.seed =
                    Some(value.extract().map_err(|_| PyTypeError::new_err("seed: expected an int >= 0"))?)
            }
            "presence_penalty" => self.presence = number(value)?,
            "frequency_penalty" => self.frequency = number(value)?,
            "truncate" => {
                self.truncation = match value.extract::<String>().ok().as_deref() {
                    Some("left") => Truncation::Left,
                    _ => return Err(PyValueError::new_err("truncate: expected \"left\" or None")),
                }
            }
            _ => self.format(key, value)?,
        }
        Ok(())
    }

    /// `json_schema=` (a dict or JSON text), `regex=`, `grammar=` (Lark) or `choice=` (a list).
    fn format(&mut self, key: &str, value: &Bound<'_, PyAny>) -> PyResult<()> {
        if self.format.is_some() {
            return Err(PyValueError::new_err(
                "json_schema, regex, grammar and choice exclude each other: give one",
            ));
        }
        let text = |v: &Bound<'_, PyAny>| {
            v.extract::<String>().map_err(|_| PyTypeError::new_err(format!("{key}: expected a str")))
        };
        self.format = Some(match key {
            "json_schema" => {
                let text = if value.is_instance_of::<PyString>() {
                    text(value)?
                } else {
                    value.py().import("json")?.call_method1("dumps", (value,))?.extract()?
                };
                Format::JsonSchema(
                    serde_json::from_str(&text)
                        .map_err(|e| PyValueError::new_err(format!("json_schema: invalid JSON: {e}")))?,
                )
            }
            "regex" => Format::Regex(text(value)?),
            "grammar" => Format::Grammar(text(value)?),
            _ => Format::Choice(
                value.extract().map_err(|_| PyTypeError::new_err("choice: expected a list of str"))?,
            ),
        });
        Ok(())
    }

    /// The call's config for a model with `config`, checked; generation also ends at the
    /// tokenizer's `end_of_generation` ids (eos, end of turn).
    pub fn config(&self, config: &Config, end_of_generation: &[u32]) -> PyResult<GenerationConfig> {
        let mut c =
            GenerationConfig::from_json(&Value::Object(self.json.clone()), config).map_err(generate_error)?;
        for &id in end_of_generation {
            if !c.eos_token_ids.contains(&id) {
                c.eos_token_ids.push(id);
            }
        }
        c.stop_strings.extend(self.stop.iter().cloned());
        c.penalties.presence = self.presence;
        c.penalties.frequency = self.frequency;
        c.truncation = self.truncation;
        c.format = self.format.clone();
        c.validate().map_err(generate_error)?;
        Ok(c)
    }

    /// What finished rows are padded with in `generate`'s output: `pad_token_id` when the call
    /// or generation_config.json sets it, else the first eos id (as transformers does).
    pub fn output_pad(&self, config: &GenerationConfig) -> u32 {
        match self.json.get("pad_token_id") {
            Some(_) => config.pad_token_id,
            None => config.eos_token_ids.first().copied().unwrap_or(config.pad_token_id),
        }
    }

    /// Sets `key` unless the call gave it (how chat lays the model card's defaults under them).
    pub fn default(&mut self, key: &str, value: Value) {
        self.json.entry(key.to_string()).or_insert(value);
    }
}

/// A keyword's value as the JSON generation_config.json would hold.
fn json_value(value: &Bound<'_, PyAny>, kind: Kind, key: &str) -> PyResult<Value> {
    let wrong = |what: &str| PyTypeError::new_err(format!("{key}: expected {what}"));
    Ok(match kind {
        Kind::Count => Value::from(value.extract::<u64>().map_err(|_| wrong("an int >= 0"))?),
        Kind::Bool => Value::from(value.extract::<bool>().map_err(|_| wrong("a bool"))?),
        Kind::Number => Value::from(value.extract::<f64>().map_err(|_| wrong("a number"))?),
        Kind::Ids => match value.extract::<u32>() {
            Ok(id) => Value::from(id),
            Err(_) => Value::from(value.extract::<Vec<u32>>().map_err(|_| wrong("an id or a list of ids"))?),
        },
    })
}
