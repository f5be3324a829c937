//! Generation against transformers' `generate` on the fixture models: greedy ids for every f32
//! prompt, the left-padded batch, stops, streaming and budgets.

use std::path::PathBuf;

use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;
use xgen_generate::{
    FinishReason, GenerateError, GenerationConfig, Generator, SampleParams, Sampling, Session, Truncation,
};
use xgen_model::{DType, Device, Model};
use xgen_tokenizer::Tokenizer;

fn dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model)
}

fn expected(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir(model).join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(model: &str) -> (Model, GenerationConfig) {
    let m = Model::load(&dir(model), DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    let g = GenerationConfig::for_model_dir(&dir(model), m.config()).unwrap();
    (m, g)
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(0)
}

#[test]
fn greedy_equals_transformers_for_every_f32_prompt() {
    let tokenizer = Tokenizer::xgen();
    for model in ["tiny-xgen-8k-bin", "tiny-xgen-8k-st"] {
        let (m, defaults) = load(model);
        assert_eq!(
            (defaults.max_length, &defaults.sampling, &defaults.eos_token_ids[..]),
            (20, &Sampling::Greedy, &[50256][..])
        );
        let gen = Generator::new(&m, &tokenizer);
        for p in expected(model)["float32"]["prompts"].as_array().unwrap() {
            let prompt = ids(&p["ids"]);
            let config = GenerationConfig {
                max_length: p["greedy"]["max_length"].as_u64().unwrap() as usize,
                ..defaults.clone()
            };
            let mut streamed = String::new();
            let out = gen.generate(&prompt, &config, &mut rng(), &mut |s| streamed.push_str(s.text)).unwrap();
            let want = ids(&p["greedy"]["new_ids"]);
            assert_eq!(out.ids, want, "{model} {}", p["name"]);
            let eos = p["greedy"]["stopped_on_eos"].as_bool().unwrap();
            assert_eq!(out.finish_reason, if eos { FinishReason::Eos } else { FinishReason::Length });
            assert_eq!(streamed, out.text, "streamed text equals the final text");
            let visible: Vec<u32> = want.iter().copied().filter(|&t| t != 50256).collect();
            assert_eq!(out.text, tokenizer.decode(&visible).unwrap());
        }
    }
}

#[test]
fn left_padded_batch_equals_transformers_and_single_runs() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-bin");
    let batch = &expected("tiny-xgen-8k-bin")["float32"]["batch"];
    let prompts: Vec<Vec<u32>> = batch["prompts"].as_array().unwrap().iter().map(ids).collect();
    let config = GenerationConfig { max_new_tokens: Some(32), pad_token_id: 0, ..defaults };
    let gen = Generator::new(&m, &tokenizer);
    let outs = gen.generate_batch(&prompts, &config, &mut rng(), &mut |_| {}).unwrap();
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.ids, ids(&batch["new_ids"][i]), "row {i}");
        assert_eq!(out.ids, ids(&batch["unbatched_new_ids"][i]), "row {i}");
        let single = gen.generate(&prompts[i], &config, &mut rng(), &mut |_| {}).unwrap();
        assert_eq!(single.ids, out.ids);
    }
}

#[test]
fn stop_string_split_across_tokens_is_caught() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-bin");
    let gen = Generator::new(&m, &tokenizer);
    let p = &expected("tiny-xgen-8k-bin")["float32"]["prompts"][3];
    let prompt = ids(&p["ids"]);
    let config = GenerationConfig { max_new_tokens: Some(32), ..defaults };
    let full = gen.generate(&prompt, &config, &mut rng(), &mut |_| {}).unwrap();
    // A stop string made of the end of token 5's text and the start of token 6's.
    let pieces: Vec<String> = full.ids.iter().map(|&t| tokenizer.decode(&[t]).unwrap()).collect();
    let (a, b) = (&pieces[5], &pieces[6]);
    let stop =
        format!("{}{}", &a[a.len() - a.chars().last().unwrap().len_utf8()..], b.chars().next().unwrap());
    let before: String = pieces[..5].concat() + &a[..a.len() - a.chars().last().unwrap().len_utf8()];
    assert!(!before.contains(&stop), "the stop string first appears across tokens 5 and 6");
    let config = GenerationConfig { stop_strings: vec![stop.clone()], ..config };
    let mut streamed = String::new();
    let out = gen.generate(&prompt, &config, &mut rng(), &mut |s| streamed.push_str(s.text)).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.ids, full.ids[..7]);
    assert_eq!(out.text, before);
    assert_eq!(streamed, before, "no part of the stop string was streamed");
}

#[test]
fn budgets_and_context() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-st");
    let gen = Generator::new(&m, &tokenizer);
    let prompt: Vec<u32> = (0..8190).map(|i| (i * 31 % 50000) as u32).collect();
    let config = GenerationConfig { max_new_tokens: Some(10), ..defaults.clone() };
    match gen.generate(&prompt, &config, &mut rng(), &mut |_| {}) {
        Err(GenerateError::ContextOverflow { prompt: 8190, new: 10, context: 8192 }) => {}
        other => panic!("expected a context error, got {other:?}"),
    }
    let err = gen.generate(&[1; 25], &defaults, &mut rng(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, GenerateError::NoRoom { prompt: 25, max_length: 20 }), "{err}");
    let truncating =
        GenerationConfig { max_new_tokens: Some(4), truncation: Truncation::Left, ..defaults.clone() };
    let out = gen.generate(&prompt, &truncating, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(out.prompt_ids, prompt[2..]);
    assert_eq!(out.ids.len(), 4);
    assert!(matches!(gen.generate(&[], &defaults, &mut rng(), &mut |_| {}), Err(GenerateError::EmptyPrompt)));
    assert!(gen.generate(&[51200], &defaults, &mut rng(), &mut |_| {}).is_err());
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-bin");
    let gen = Generator::new(&m, &tokenizer);
    let prompt = ids(&expected("tiny-xgen-8k-bin")["float32"]["prompts"][2]["ids"]);
    let base = GenerationConfig { max_new_tokens: Some(16), ..defaults };
    let greedy = gen.generate(&prompt, &base, &mut rng(), &mut |_| {}).unwrap();
    let top1 = GenerationConfig {
        sampling: Sampling::Sample(SampleParams { top_k: Some(1), ..Default::default() }),
        ..base.clone()
    };
    assert_eq!(
        gen.generate(&prompt, &top1, &mut StdRng::seed_from_u64(9), &mut |_| {}).unwrap().ids,
        greedy.ids
    );
    let hot = GenerationConfig {
        sampling: Sampling::Sample(SampleParams { temperature: 5.0, top_k: None, ..Default::default() }),
        ..base
    };
    let a = gen.generate(&prompt, &hot, &mut StdRng::seed_from_u64(3), &mut |_| {}).unwrap();
    let b = gen.generate(&prompt, &hot, &mut StdRng::seed_from_u64(3), &mut |_| {}).unwrap();
    let c = gen.generate(&prompt, &hot, &mut StdRng::seed_from_u64(4), &mut |_| {}).unwrap();
    assert_eq!(a.ids, b.ids);
    assert_ne!(a.ids, c.ids, "a different seed gives a different sample at temperature 5");
}

#[test]
fn logprobs_are_natural_log_of_the_model_distribution() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-bin");
    let gen = Generator::new(&m, &tokenizer);
    let p = &expected("tiny-xgen-8k-bin")["float32"]["prompts"][3];
    let prompt = ids(&p["ids"]);
    let config = GenerationConfig { max_new_tokens: Some(3), top_logprobs: Some(5), ..defaults };
    let out = gen.generate(&prompt, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(out.logprobs.len(), 3);
    let first = &out.logprobs[0];
    // Greedy picks the most likely token: it heads the top list with the same log-probability.
    assert_eq!(first.top[0], (first.id, first.logprob));
    assert_eq!(first.top.len(), 5);
    assert!(first.top.windows(2).all(|w| w[0].1 >= w[1].1));
    // The reference top-20 logits of this prompt give the same log-probability differences.
    let top20 = &p["last_logits_top20"];
    let want = top20["values"][0].as_f64().unwrap() - top20["values"][1].as_f64().unwrap();
    let got = (first.top[0].1 - first.top[1].1) as f64;
    assert!((got - want).abs() < 1e-3, "{got} vs {want}");
    assert_eq!(first.top[1].0 as u64, top20["ids"][1].as_u64().unwrap());
}

/// Regression: a model whose vocabulary is larger than the tokenizer's may generate ids with no
/// text; they are returned, not an error.
#[test]
fn ids_beyond_the_tokenizer_are_kept_without_text() {
    let config = xgen_model::Config::from_json(&serde_json::json!({
        "vocab_size": 51300, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 1,
        "num_attention_heads": 4, "max_position_embeddings": 256, "eos_token_id": 50256,
    }))
    .unwrap();
    let tensors =
        xgen_model::weights::random::tensors(&config, DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    let model = Model::from_tensors(config.clone(), tensors, DType::F32, &Device::Cpu).unwrap();
    let tokenizer = Tokenizer::xgen();
    let mut generation =
        GenerationConfig { max_new_tokens: Some(3), ..GenerationConfig::defaults_for(&config) };
    generation.penalties.logit_bias = vec![(51250, 1000.0)];
    let out = Generator::new(&model, &tokenizer)
        .generate(&[464, 995], &generation, &mut rng(), &mut |_| {})
        .unwrap();
    assert_eq!(out.ids, [51250, 51250, 51250]);
    assert_eq!(out.text, "");
}

#[test]
fn a_session_reuses_the_conversation_and_equals_generation_without_it() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-bin");
    let gen = Generator::new(&m, &tokenizer);
    let p = &expected("tiny-xgen-8k-bin")["float32"]["prompts"][2];
    let first = ids(&p["ids"]);
    let config = GenerationConfig { max_new_tokens: Some(6), max_length: 8192, ..defaults };
    let mut session = Session::default();
    let turn1 = gen.generate_in(&mut session, &first, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(session.reused(), 0);
    // The reference's greedy ids, through the session too.
    assert_eq!(turn1.ids, ids(&p["greedy"]["new_ids"])[..turn1.ids.len()]);
    // The next turn: the conversation so far, then a new message.
    let second: Vec<u32> =
        first.iter().chain(&turn1.ids).copied().chain(tokenizer.encode(" and then?")).collect();
    let turn2 = gen.generate_in(&mut session, &second, &config, &mut rng(), &mut |_| {}).unwrap();
    // Everything the cache holds: the first prompt and all generated tokens but the last.
    assert_eq!(session.reused(), first.len() + turn1.ids.len() - 1);
    let plain = gen.generate(&second, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(turn2.ids, plain.ids, "identical with and without the session");
    // A prompt that shares nothing starts afresh, still equal.
    let other = tokenizer.encode("Something else entirely");
    let turn3 = gen.generate_in(&mut session, &other, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(session.reused(), 0);
    assert_eq!(turn3.ids, gen.generate(&other, &config, &mut rng(), &mut |_| {}).unwrap().ids);
}

#[test]
fn a_cancelled_generator_stops_between_steps() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load("tiny-xgen-8k-bin");
    let config = GenerationConfig { max_new_tokens: Some(50), eos_token_ids: vec![], ..defaults };
    let flag = AtomicBool::new(false);
    let gen = Generator::new(&m, &tokenizer).cancellable(&flag);
    // Not set: the whole budget.
    assert_eq!(gen.generate(&[464], &config, &mut rng(), &mut |_| {}).unwrap().ids.len(), 50);
    // Set before the prompt: the first prompt step refuses.
    flag.store(true, Ordering::Relaxed);
    let err = gen.generate(&[464], &config, &mut rng(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, GenerateError::Model(xgen_model::ModelError::Cancelled)), "{err}");
    // Set by the 5th token's callback: no token after it.
    flag.store(false, Ordering::Relaxed);
    let mut seen = 0;
    let err = gen
        .generate(&[464], &config, &mut rng(), &mut |_| {
            seen += 1;
            if seen == 5 {
                flag.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
    assert!(matches!(err, GenerateError::Cancelled) && seen == 5, "{err} after {seen}");
}
