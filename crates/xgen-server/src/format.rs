//! The output-format fields of a request: OpenAI's `response_format` (`text`, `json_object`,
//! `json_schema` with `{name, schema, strict}`) and vLLM's `guided_json`, `guided_regex`,
//! `guided_grammar` (a Lark grammar) and `guided_choice`. At most one may name a format.

use serde_json::Value;
use xgen_generate::Format;

use crate::{api::Fields, error::ApiError};

impl Fields<'_> {
    /// The format the request asks for and the field that named it.
    pub fn format(&self) -> Result<Option<(Format, &'static str)>, ApiError> {
        let mut found = Vec::new();
        if let Some(v) = self.get("response_format") {
            if let Some(f) = response_format(v)? {
                found.push((f, "response_format"));
            }
        }
        if let Some(v) = self.get("guided_json") {
            let schema = match v {
                Value::String(s) => serde_json::from_str(s).map_err(|e| {
                    ApiError::invalid("guided_json", format!("`guided_json` is not JSON: {e}"))
                })?,
                Value::Object(_) => v.clone(),
                _ => return Err(ApiError::invalid("guided_json", "`guided_json` must be a JSON schema")),
            };
            found.push((Format::JsonSchema(schema), "guided_json"));
        }
        for (name, make) in
            [("guided_regex", Format::Regex as fn(String) -> Format), ("guided_grammar", Format::Grammar)]
        {
            match self.get(name) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => found.push((make(s.clone()), name)),
                Some(_) => return Err(ApiError::invalid(name, format!("`{name}` must be a string"))),
            }
        }
        match self.get("guided_choice") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_string) => {
                let choices = items.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect();
                found.push((Format::Choice(choices), "guided_choice"));
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "guided_choice",
                    "`guided_choice` must be a non-empty list of strings",
                ))
            }
        }
        if found.len() > 1 {
            let names: Vec<&str> = found.iter().map(|(_, n)| *n).collect();
            return Err(ApiError::invalid(
                names[1],
                format!("only one output format per request: {}", names.join(", ")),
            ));
        }
        Ok(found.pop())
    }
}

/// `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
fn response_format(v: &Value) -> Result<Option<Format>, ApiError> {
    let bad = |why: &str| ApiError::invalid("response_format", format!("`response_format` {why}"));
    let obj = v.as_object().ok_or_else(|| bad("must be an object"))?;
    match obj.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Format::JsonObject)),
        Some("json_schema") => {
            let spec = obj
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("of type json_schema needs a `json_schema` object with a `schema`"))?;
            match spec.get("schema") {
                Some(schema @ Value::Object(_)) => Ok(Some(Format::JsonSchema(schema.clone()))),
                Some(_) => Err(bad("`json_schema.schema` must be a JSON schema object")),
                // OpenAI allows a schema-less json_schema: any JSON object then.
                None => Ok(Some(Format::JsonObject)),
            }
        }
        Some(other) => Err(bad(&format!("type {other:?} is not one of text, json_object, json_schema"))),
        None => Err(bad("needs a `type`")),
    }
}
