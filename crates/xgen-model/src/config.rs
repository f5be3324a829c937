//! `config.json`: HF `LlamaConfig` field names 1:1, transformers' defaults for absent keys,
//! validation with errors that name the field.
//!
//! Fields are read one by one from the JSON object (not through serde derive) so that a wrong type
//! or value is reported as `config field `hidden_size`: …`, never as a bare line/column.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// RoPE scaling for running past the trained context, as transformers defines it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (`inv_freq / factor`).
    Linear { factor: f64 },
    /// NTK-aware: past `original_max_position_embeddings`, the base grows with the sequence length.
    Dynamic { factor: f64, original_max_position_embeddings: usize },
}

/// A validated model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype`), informational.
    pub torch_dtype: Option<String>,
}

impl Config {
    /// Reads and validates `path` (a `config.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.into(), source })?;
        Self::from_json(&value)
    }

    /// Validates a parsed `config.json`.
    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| ModelError::field("(root)", "expected a JSON object"))?;
        let f = Fields(obj);
        if let Some(t) = f.string("model_type")? {
            if t != "llama" {
                return Err(ModelError::field(
                    "model_type",
                    format!("`{t}` is not supported (expected `llama`)"),
                ));
            }
        }
        let act = f.string("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" && act != "swish" {
            return Err(ModelError::field(
                "hidden_act",
                format!("`{act}` is not supported (expected `silu`)"),
            ));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if f.bool(flag)?.unwrap_or(false) {
                return Err(ModelError::field(flag, "biases are not supported (XGen has none)"));
            }
        }
        let hidden_size = f.positive("hidden_size")?.unwrap_or(4096);
        let num_attention_heads = f.positive("num_attention_heads")?.unwrap_or(32);
        let head_dim = match f.positive("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(ModelError::field(
                    "num_attention_heads",
                    format!("{num_attention_heads} does not divide hidden_size {hidden_size}"),
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(ModelError::field(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head size"),
            ));
        }
        let num_key_value_heads = f.positive("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(ModelError::field(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let vocab_size = f.positive("vocab_size")?.unwrap_or(32000);
        let max_position_embeddings = f.positive("max_position_embeddings")?.unwrap_or(2048);
        let rope_parameters = f.object("rope_parameters")?;
        let rope_theta = match rope_parameters.and_then(|p| p.get("rope_theta")) {
            Some(v) => positive_float("rope_parameters.rope_theta", v)?,
            None => f.positive_float("rope_theta")?.unwrap_or(10000.0),
        };
        let rope_scaling = match (f.object("rope_scaling")?, rope_parameters) {
            (Some(s), _) => rope_scaling("rope_scaling", s, max_position_embeddings)?,
            (None, Some(p)) => rope_scaling("rope_parameters", p, max_position_embeddings)?,
            (None, None) => None,
        };
        let config = Self {
            vocab_size,
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?.unwrap_or(11008),
            num_hidden_layers: f.positive("num_hidden_layers")?.unwrap_or(32),
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: f.positive_float("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.token_id("bos_token_id", vocab_size)?.or(Some(1)),
            eos_token_id: f.token_ids("eos_token_id", vocab_size)?.unwrap_or_else(|| vec![2]),
            pad_token_id: f.token_id("pad_token_id", vocab_size)?,
            torch_dtype: f.string("torch_dtype")?.or(f.string("dtype")?),
        };
        Ok(config)
    }

    /// The HF `config.json` of this configuration, stored as `dtype`.
    pub fn to_json(&self, dtype: candle_core::DType) -> Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": if self.eos_token_id.len() == 1 { serde_json::json!(self.eos_token_id[0]) } else { serde_json::json!(self.eos_token_id) },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": crate::weights::write::torch_dtype_name(dtype),
        });
        v["rope_scaling"] = match self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Dynamic { factor, original_max_position_embeddings }) => serde_json::json!({
                "rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": original_max_position_embeddings
            }),
        };
        v
    }

    /// Width of the query projection output, `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key/value projection outputs, `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

fn rope_scaling(field: &str, s: &Map<String, Value>, max_pos: usize) -> Result<Option<RopeScaling>> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = |s: &Map<String, Value>| -> Result<f64> {
        let name = format!("{field}.factor");
        let v = s.get("factor").ok_or_else(|| ModelError::field(&name, "missing"))?;
        let factor = positive_float(&name, v)?;
        if factor < 1.0 {
            return Err(ModelError::field(name, format!("{factor} is below 1")));
        }
        Ok(factor)
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor(s)? })),
        "dynamic" => {
            let original = match s.get("original_max_position_embeddings") {
                Some(v) => positive_int(&format!("{field}.original_max_position_embeddings"), v)?,
                None => max_pos,
            };
            Ok(Some(RopeScaling::Dynamic { factor: factor(s)?, original_max_position_embeddings: original }))
        }
        other => Err(ModelError::field(
            format!("{field}.rope_type"),
            format!("`{other}` is not supported (supported: linear, dynamic)"),
        )),
    }
}

fn positive_int(name: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .filter(|&n| n > 0)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ModelError::field(name, format!("expected a positive integer, got {v}")))
}

fn positive_float(name: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite() && *x > 0.0)
        .ok_or_else(|| ModelError::field(name, format!("expected a positive number, got {v}")))
}

/// Typed access to optional fields; `null` counts as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn positive(&self, name: &str) -> Result<Option<usize>> {
        self.get(name).map(|v| positive_int(name, v)).transpose()
    }

    fn positive_float(&self, name: &str) -> Result<Option<f64>> {
        self.get(name).map(|v| positive_float(name, v)).transpose()
    }

    fn bool(&self, name: &str) -> Result<Option<bool>> {
        self.get(name)
            .map(|v| {
                v.as_bool().ok_or_else(|| ModelError::field(name, format!("expected true or false, got {v}")))
            })
            .transpose()
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        self.get(name)
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| ModelError::field(name, format!("expected a string, got {v}")))
            })
            .transpose()
    }

    fn object(&self, name: &str) -> Result<Option<&Map<String, Value>>> {
        self.get(name)
            .map(|v| {
                v.as_object().ok_or_else(|| ModelError::field(name, format!("expected an object, got {v}")))
            })
            .transpose()
    }

    fn token_id(&self, name: &str, vocab_size: usize) -> Result<Option<u32>> {
        self.get(name).map(|v| token_id(name, v, vocab_size)).transpose()
    }

    /// An id or a list of ids (transformers accepts both for `eos_token_id`).
    fn token_ids(&self, name: &str, vocab_size: usize) -> Result<Option<Vec<u32>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                items.iter().map(|v| token_id(name, v, vocab_size)).collect::<Result<_>>().map(Some)
            }
            Some(v) => Ok(Some(vec![token_id(name, v, vocab_size)?])),
        }
    }
}

fn token_id(name: &str, v: &Value, vocab_size: usize) -> Result<u32> {
    v.as_u64().filter(|&id| id < vocab_size as u64).map(|id| id as u32).ok_or_else(|| {
        ModelError::field(name, format!("expected a token id below vocab_size {vocab_size}, got {v}"))
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn xgen_config_with_transformers_defaults() {
        let c = Config::from_json(&json!({
            "architectures": ["LlamaForCausalLM"], "bos_token_id": 50256, "eos_token_id": 50256,
            "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
            "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 32,
            "num_hidden_layers": 32, "pad_token_id": 0, "rms_norm_eps": 1e-06, "tie_word_embeddings": false,
            "torch_dtype": "float32", "transformers_version": "4.29.2", "use_cache": true, "vocab_size": 51200
        }))
        .unwrap();
        assert_eq!(
            (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rope_scaling),
            (32, 128, 10000.0, None)
        );
        assert_eq!(
            (c.eos_token_id.as_slice(), c.bos_token_id, c.pad_token_id),
            (&[50256][..], Some(50256), Some(0))
        );
        assert_eq!(c.max_position_embeddings, 8192);
    }

    #[test]
    fn rope_scaling_variants() {
        let c = Config::from_json(&json!({"rope_scaling": {"type": "linear", "factor": 2.0}})).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        let c = Config::from_json(
            &json!({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "dynamic", "factor": 2}}),
        )
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Dynamic { factor: 2.0, original_max_position_embeddings: 4096 })
        );
        let c =
            Config::from_json(&json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}))
                .unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (500000.0, None));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (json!({"hidden_size": "big"}), "hidden_size"),
            (json!({"hidden_size": 0}), "hidden_size"),
            (json!({"hidden_size": 100, "num_attention_heads": 3}), "num_attention_heads"),
            (json!({"num_key_value_heads": 5}), "num_key_value_heads"),
            (json!({"rms_norm_eps": -1}), "rms_norm_eps"),
            (json!({"hidden_act": "gelu"}), "hidden_act"),
            (json!({"model_type": "gpt2"}), "model_type"),
            (json!({"rope_scaling": {"type": "yarn", "factor": 4.0}}), "rope_scaling.rope_type"),
            (json!({"rope_scaling": {"type": "linear", "factor": 0.5}}), "rope_scaling.factor"),
            (json!({"rope_scaling": {"type": "linear"}}), "rope_scaling.factor"),
            (json!({"vocab_size": 100, "eos_token_id": 100}), "eos_token_id"),
            (json!({"attention_bias": true}), "attention_bias"),
            (json!({"tie_word_embeddings": "no"}), "tie_word_embeddings"),
            (json!([1, 2]), "(root)"),
        ];
        for (value, field) in cases {
            match Config::from_json(&value) {
                Err(ModelError::ConfigField { field: f, .. }) => assert_eq!(f, field, "{value}"),
                other => panic!("{value}: expected an error naming {field}, got {other:?}"),
            }
        }
    }
}
