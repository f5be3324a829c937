//! Constrained decoding on the tiny fixture model, whose random weights produce arbitrary text
//! (every unconstrained output would fail these checks): the output parses and validates against
//! each schema, matches the regex, is one of the choices; greedy constrained output is the argmax
//! over the allowed tokens at every step; bad formats are errors naming the setting.

use std::path::PathBuf;

use rand::{rngs::StdRng, SeedableRng};
use serde_json::{json, Value};
use xgen_generate::{
    FinishReason, Format, GenerateError, GenerationConfig, Generator, Grammars, SampleParams, Sampling,
};
use xgen_model::{DType, Device, Model};
use xgen_tokenizer::Tokenizer;

fn model() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin");
    Model::load(&dir, DType::F32, &Device::Cpu, &mut |_| {}).unwrap()
}

fn config(model: &Model, format: Format, sampling: Sampling) -> GenerationConfig {
    let mut c = GenerationConfig::defaults_for(model.config());
    c.max_new_tokens = Some(120);
    c.sampling = sampling;
    c.format = Some(format);
    c
}

fn sampled() -> Sampling {
    Sampling::Sample(SampleParams { temperature: 1.0, top_k: None, top_p: 1.0, min_p: 0.0 })
}

/// The subset of JSON Schema the test schemas use: type, properties, required,
/// additionalProperties: false, items, minItems/maxItems, enum, minimum/maximum, maxLength.
fn validate(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{at}: {why} ({v})"));
    if let Some(options) = schema["enum"].as_array() {
        return if options.contains(v) { Ok(()) } else { fail("not in the enum") };
    }
    let ok = match schema["type"].as_str() {
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("number") => v.is_number(),
        Some("boolean") => v.is_boolean(),
        Some(other) => return fail(&format!("the test validator has no type {other}")),
        None => true,
    };
    if !ok {
        return fail("wrong type");
    }
    if let (Some(props), Some(obj)) = (schema["properties"].as_object(), v.as_object()) {
        for key in schema["required"].as_array().into_iter().flatten() {
            if !obj.contains_key(key.as_str().unwrap()) {
                return fail(&format!("missing {key}"));
            }
        }
        for (k, x) in obj {
            match props.get(k) {
                Some(s) => validate(s, x, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == json!(false) => return fail(&format!("extra {k}")),
                None => {}
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if schema["minItems"].as_u64().is_some_and(|m| n < m)
            || schema["maxItems"].as_u64().is_some_and(|m| n > m)
        {
            return fail("item count");
        }
        for (i, x) in items.iter().enumerate() {
            validate(&schema["items"], x, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(x) = v.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| x < m)
            || schema["maximum"].as_f64().is_some_and(|m| x > m)
        {
            return fail("out of range");
        }
    }
    if let (Some(s), Some(max)) = (v.as_str(), schema["maxLength"].as_u64()) {
        if s.chars().count() as u64 > max {
            return fail("too long");
        }
    }
    Ok(())
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a\"b", "é ü", "x\\ny", "日本"]}, "maxItems": 3}
        }, "required": ["name", "age", "tags"], "additionalProperties": false}),
        json!({"type": "object", "properties": {
            "point": {"type": "object", "properties": {
                "x": {"type": "number", "minimum": -5, "maximum": 5},
                "ok": {"type": "boolean"}
            }, "required": ["x", "ok"], "additionalProperties": false},
            "kind": {"enum": ["circle", "square"]}
        }, "required": ["point", "kind"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 4}),
    ]
}

#[test]
fn output_validates_against_each_schema_greedy_and_sampled() {
    let (model, tok) = (model(), Tokenizer::xgen());
    let generator = Generator::new(&model, &tok);
    let prompt = tok.encode("Describe it as JSON:");
    for schema in schemas() {
        for (seed, sampling) in [(0, Sampling::Greedy), (1, sampled()), (2, sampled())] {
            let c = config(&model, Format::JsonSchema(schema.clone()), sampling);
            let out = generator.generate(&prompt, &c, &mut StdRng::seed_from_u64(seed), &mut |_| {}).unwrap();
            assert_ne!(out.finish_reason, FinishReason::Length, "{schema}: unfinished {:?}", out.text);
            let v: Value = serde_json::from_str(&out.text).unwrap_or_else(|e| panic!("{e}: {:?}", out.text));
            validate(&schema, &v, "$").unwrap_or_else(|e| panic!("{schema}: {e}"));
        }
    }
    // Any JSON object.
    let c = config(&model, Format::JsonObject, Sampling::Greedy);
    let mut c = c;
    c.max_new_tokens = Some(400);
    let out = generator.generate(&prompt, &c, &mut StdRng::seed_from_u64(0), &mut |_| {}).unwrap();
    if out.finish_reason != FinishReason::Length {
        assert!(serde_json::from_str::<Value>(&out.text).unwrap().is_object(), "{:?}", out.text);
    } else {
        assert!(out.text.starts_with('{'), "{:?}", out.text);
    }
}

#[test]
fn output_matches_the_regex_and_is_one_of_the_choices() {
    let (model, tok) = (model(), Tokenizer::xgen());
    let generator = Generator::new(&model, &tok);
    let prompt = tok.encode("Code:");
    let rx = regex::Regex::new(r"^[0-9]{3}-[a-z]{2,4}( ok)?$").unwrap();
    let choices = vec!["yes".to_string(), "no".to_string(), "maybe so".to_string()];
    for (seed, sampling) in [(0, Sampling::Greedy), (1, sampled()), (5, sampled())] {
        let c = config(&model, Format::Regex(r"[0-9]{3}-[a-z]{2,4}( ok)?".into()), sampling.clone());
        let out = generator.generate(&prompt, &c, &mut StdRng::seed_from_u64(seed), &mut |_| {}).unwrap();
        assert!(rx.is_match(&out.text), "{:?}", out.text);
        let c = config(&model, Format::Choice(choices.clone()), sampling);
        let out = generator.generate(&prompt, &c, &mut StdRng::seed_from_u64(seed), &mut |_| {}).unwrap();
        assert!(choices.contains(&out.text), "{:?}", out.text);
        assert_ne!(out.finish_reason, FinishReason::Length);
    }
    let c = config(
        &model,
        Format::Grammar(
            r#"start: "(" num ("," num)* ")"
num: /[0-9]/"#
                .into(),
        ),
        Sampling::Greedy,
    );
    let out = generator.generate(&prompt, &c, &mut StdRng::seed_from_u64(0), &mut |_| {}).unwrap();
    let rx = regex::Regex::new(r"^\([0-9](,[0-9])*\)?$").unwrap();
    assert!(rx.is_match(&out.text), "{:?}", out.text);
}

#[test]
fn greedy_constrained_output_is_the_argmax_over_the_allowed_tokens() {
    let (model, tok) = (model(), Tokenizer::xgen());
    let generator = Generator::new(&model, &tok);
    let prompt = tok.encode("Once upon a time");
    let format = Format::JsonSchema(schemas()[0].clone());
    let out = generator
        .generate(
            &prompt,
            &config(&model, format.clone(), Sampling::Greedy),
            &mut StdRng::seed_from_u64(0),
            &mut |_| {},
        )
        .unwrap();
    let grammars = Grammars::new(&tok, model.config().vocab_size).unwrap();
    let mut replay = grammars.constraint(&format).unwrap();
    for (i, &token) in out.ids.iter().enumerate() {
        let ids: Vec<u32> = prompt.iter().chain(&out.ids[..i]).copied().collect();
        let mut cache = model.new_cache(1, ids.len()).unwrap();
        let logits = model.forward_last(&model.ids_tensor(&ids).unwrap(), &mut cache).unwrap();
        let mut logits: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
        let raw_best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        replay.mask(&mut logits).unwrap();
        let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
        assert_eq!(best as u32, token, "step {i}");
        if i == 0 {
            assert_ne!(
                raw_best as u32, token,
                "the mask changed the first choice (else the test shows little)"
            );
        }
        replay.accept(token).unwrap();
    }
}

#[test]
fn bad_formats_are_errors_naming_the_setting() {
    let tok = Tokenizer::xgen();
    let grammars = Grammars::new(&tok, 51200).unwrap();
    for (format, field) in [
        (Format::JsonSchema(json!({"type": "nonsense"})), "json_schema"),
        (Format::Regex("((".into()), "regex"),
        (Format::Grammar("start: (".into()), "grammar"),
        (Format::Choice(vec![]), "choice"),
    ] {
        match grammars.constraint(&format) {
            Err(GenerateError::Setting { field: f, message }) => {
                assert_eq!(f, field, "{message}");
                assert!(!message.is_empty());
            }
            Err(e) => panic!("{format:?}: {e}"),
            Ok(_) => panic!("{format:?} accepted"),
        }
    }
}
