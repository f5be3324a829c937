//! Prompt-lookup speculation: the output is plain decoding's, id for id. On the fixture models
//! (f32, against transformers' greedy ids) and on random weights in bf16, q8_0 and q4_0 (against
//! the same generation without lookup) with prompts that repeat themselves so that drafts are
//! accepted; sampling gives the same ids for the same seed; a constrained format holds; a session
//! reusing its cache after speculation answers as a fresh one. `Sequence::verify` on made-up
//! logits covers drafts accepted whole, in part, rejected at their first token, and EOS, a stop
//! string and the token budget inside a draft.

use std::path::PathBuf;

use rand::{rngs::StdRng, SeedableRng};
use serde_json::Value;
use xgen_generate::{
    FinishReason, Format, GenerationConfig, Generator, PromptLookup, SampleParams, Sampling, Sequence,
    Session,
};
use xgen_model::{weights, DType, Device, Model, Quant, WeightFormat};
use xgen_tokenizer::Tokenizer;

fn fixture(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(model)
}

fn random(dtype: DType, linear: Option<Quant>) -> Model {
    let config = weights::random::preset("small").unwrap();
    let format = WeightFormat { dtype, linear };
    let w = weights::random::tensors_with(&config, dtype, &Device::Cpu, &mut |_| {}, &mut |n, t| {
        format.convert(n, t)
    })
    .unwrap();
    Model::from_weights(config, w, dtype, &Device::Cpu).unwrap()
}

fn lookup(n: usize) -> Option<PromptLookup> {
    Some(PromptLookup::new(n, 3).unwrap())
}

fn run(model: &Model, prompt: &[u32], config: &GenerationConfig, seed: u64) -> xgen_generate::Output {
    let tokenizer = Tokenizer::xgen();
    let mut streamed = Vec::new();
    let out = Generator::new(model, &tokenizer)
        .generate(prompt, config, &mut StdRng::seed_from_u64(seed), &mut |s| streamed.push(s.token))
        .unwrap();
    assert_eq!(streamed, out.ids, "every accepted token is streamed, in order");
    out
}

/// Prompts whose text repeats (drafts found and accepted), and one that does not.
fn prompts() -> Vec<Vec<u32>> {
    let tokenizer = Tokenizer::xgen();
    let phrase = "The quick brown fox jumps over the lazy dog. ";
    [phrase.repeat(6), format!("{}{}", "a b c d e f g h ".repeat(5), "a b c"), "Hello".to_string()]
        .iter()
        .map(|t| tokenizer.encode(t))
        .collect()
}

#[test]
fn greedy_ids_equal_transformers_with_lookup_on_the_fixture_models() {
    for model in ["tiny-xgen-8k-bin", "tiny-xgen-8k-st"] {
        let m = Model::load(&fixture(model), DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
        let defaults = GenerationConfig::for_model_dir(&fixture(model), m.config()).unwrap();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(model).join("expected.json")).unwrap())
                .unwrap();
        for p in expected["float32"]["prompts"].as_array().unwrap() {
            let ids = |v: &Value| {
                v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>()
            };
            let config = GenerationConfig {
                max_length: p["greedy"]["max_length"].as_u64().unwrap() as usize,
                prompt_lookup: lookup(4),
                ..defaults.clone()
            };
            let out = run(&m, &ids(&p["ids"]), &config, 0);
            assert_eq!(out.ids, ids(&p["greedy"]["new_ids"]), "{model} {}", p["name"]);
        }
    }
}

#[test]
fn greedy_ids_are_plain_decodings_in_every_format() {
    let mut drafted = 0;
    let mut accepted = 0;
    for (dtype, linear) in
        [(DType::BF16, None), (DType::F32, Some(Quant::Q8_0)), (DType::F32, Some(Quant::Q4_0))]
    {
        let m = random(dtype, linear);
        for prompt in prompts() {
            let plain =
                GenerationConfig { max_new_tokens: Some(120), ..GenerationConfig::defaults_for(m.config()) };
            let want = run(&m, &prompt, &plain, 0);
            for n in [1, 3, 8] {
                let got =
                    run(&m, &prompt, &GenerationConfig { prompt_lookup: lookup(n), ..plain.clone() }, 0);
                assert_eq!(got.ids, want.ids, "{dtype:?} {linear:?} N={n}");
                assert_eq!((got.text.as_str(), got.finish_reason), (want.text.as_str(), want.finish_reason));
                assert!(got.draft.accepted <= got.draft.drafted);
                drafted += got.draft.drafted;
                accepted += got.draft.accepted;
            }
        }
    }
    // The prompts made drafts, some accepted and some not (120 tokens: random weights fall into
    // the loops that lookup drafts from; at 40 none was accepted on an AMD Zen 4 host).
    assert!(accepted > 0 && accepted < drafted, "{accepted} of {drafted}");
}

#[test]
fn sampling_with_lookup_gives_the_same_ids_for_the_same_seed() {
    // Each position is sampled once from the same distribution with the same random stream.
    let m = random(DType::BF16, None);
    let sample =
        Sampling::Sample(SampleParams { temperature: 1.0, top_k: Some(40), top_p: 0.95, min_p: 0.0 });
    // Random weights are nearly flat: a bias makes " b", " c", " d", " e" the likely tokens, so that
    // sampled text often repeats what came before and drafts are sometimes accepted.
    let bias: Vec<(u32, f32)> =
        Tokenizer::xgen().encode(" b c d e").into_iter().map(|id| (id, 12.0)).collect();
    let mut accepted = 0;
    for seed in 0..6 {
        for prompt in prompts() {
            let mut plain = GenerationConfig {
                max_new_tokens: Some(24),
                sampling: sample.clone(),
                ..GenerationConfig::defaults_for(m.config())
            };
            plain.penalties.logit_bias = bias.clone();
            let want = run(&m, &prompt, &plain, seed);
            let got = run(&m, &prompt, &GenerationConfig { prompt_lookup: lookup(5), ..plain }, seed);
            assert_eq!(got.ids, want.ids, "seed {seed}");
            accepted += got.draft.accepted;
        }
    }
    assert!(accepted > 0, "some sampled tokens came from drafts");
}

#[test]
fn penalties_logprobs_and_a_constrained_format_hold_with_lookup() {
    let m = random(DType::BF16, None);
    let prompt = &prompts()[1];
    let mut plain = GenerationConfig {
        max_new_tokens: Some(30),
        top_logprobs: Some(3),
        ..GenerationConfig::defaults_for(m.config())
    };
    plain.penalties.repetition = 1.3;
    plain.penalties.frequency = 0.2;
    let want = run(&m, prompt, &plain, 0);
    let got = run(&m, prompt, &GenerationConfig { prompt_lookup: lookup(6), ..plain.clone() }, 0);
    assert_eq!((got.ids, got.logprobs), (want.ids, want.logprobs));
    let format = Some(Format::Regex("(a b c d )+e".into()));
    let constrained = GenerationConfig { format, top_logprobs: None, ..plain };
    let want = run(&m, prompt, &constrained, 0);
    let got = run(&m, prompt, &GenerationConfig { prompt_lookup: lookup(6), ..constrained }, 0);
    assert_eq!((&got.ids, &got.text), (&want.ids, &want.text));
    assert!(got.text.starts_with("a b c d") && got.text.ends_with('e'), "{:?}", got.text);
    assert!(got.draft.accepted > 0, "the format's repeats were drafted");
}

#[test]
fn a_session_after_speculation_reuses_a_cache_equal_to_plain_decodings() {
    let m = random(DType::F32, Some(Quant::Q4_0));
    let tokenizer = Tokenizer::xgen();
    let gen = Generator::new(&m, &tokenizer);
    let base = GenerationConfig { max_new_tokens: Some(20), ..GenerationConfig::defaults_for(m.config()) };
    let first = prompts()[0].clone();
    let mut turns = Vec::new();
    for config in [base.clone(), GenerationConfig { prompt_lookup: lookup(8), ..base.clone() }] {
        let mut session = Session::default();
        let a = gen
            .generate_in(&mut session, &first, &config, &mut StdRng::seed_from_u64(0), &mut |_| {})
            .unwrap();
        // The next turn: the conversation so far plus a new message.
        let next: Vec<u32> =
            first.iter().chain(&a.ids).copied().chain(tokenizer.encode(" Again: the quick")).collect();
        let b =
            gen.generate_in(&mut session, &next, &base, &mut StdRng::seed_from_u64(0), &mut |_| {}).unwrap();
        assert!(session.reused() > first.len(), "the second turn reused the first's cache");
        turns.push((a.ids, b.ids));
    }
    assert_eq!(turns[0], turns[1]);
}

/// A row of logits whose argmax is `id`.
fn peak(id: u32) -> Vec<f32> {
    let mut row = vec![0f32; 51200];
    row[id as usize] = 10.0;
    row
}

fn sequence<'t>(tokenizer: &'t Tokenizer, config: GenerationConfig, budget: usize) -> Sequence<'t> {
    Sequence::new(tokenizer, vec![464, 2068], config, budget)
}

#[test]
fn verify_accepts_the_drafts_the_model_agrees_with_then_its_own_token() {
    let tokenizer = Tokenizer::xgen();
    let config = GenerationConfig::defaults_for(&weights::random::preset("tiny").unwrap());
    let rng = &mut StdRng::seed_from_u64(0);
    let draft = [11, 12, 13];
    // Accepted whole: 3 drafts and the model's next token.
    let mut seq = sequence(&tokenizer, config.clone(), 100);
    let steps = seq.verify(&[peak(11), peak(12), peak(13), peak(14)], &draft, rng).unwrap();
    assert_eq!(steps.iter().map(|s| s.token).collect::<Vec<_>>(), [11, 12, 13, 14]);
    assert_eq!((seq.output().draft.drafted, seq.output().draft.accepted), (3, 3));
    // In part: the model differs at the second draft; its token there ends the step.
    let mut seq = sequence(&tokenizer, config.clone(), 100);
    let steps = seq.verify(&[peak(11), peak(99), peak(13), peak(14)], &draft, rng).unwrap();
    assert_eq!(steps.iter().map(|s| s.token).collect::<Vec<_>>(), [11, 99]);
    // Rejected at the first token.
    let mut seq = sequence(&tokenizer, config.clone(), 100);
    let steps = seq.verify(&[peak(7), peak(12), peak(13), peak(14)], &draft, rng).unwrap();
    assert_eq!(steps.iter().map(|s| s.token).collect::<Vec<_>>(), [7]);
    assert_eq!(seq.output().draft.accepted, 0);
}

#[test]
fn eos_a_stop_string_and_the_budget_end_a_draft() {
    let tokenizer = Tokenizer::xgen();
    let config = GenerationConfig::defaults_for(&weights::random::preset("tiny").unwrap());
    let rng = &mut StdRng::seed_from_u64(0);
    // EOS drafted and chosen: generation ends there, nothing after it is taken.
    let mut seq = sequence(&tokenizer, config.clone(), 100);
    let steps = seq.verify(&[peak(11), peak(50256), peak(13)], &[11, 50256], rng).unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!((seq.is_finished(), seq.output().finish_reason), (true, FinishReason::Eos));
    // A stop string completed inside the draft.
    let stop = GenerationConfig { stop_strings: vec![" fox".into()], ..config.clone() };
    let (quick, brown, fox) = (2068, 7586, 21831); // " quick", " brown", " fox"
    let mut seq = sequence(&tokenizer, stop, 100);
    let steps =
        seq.verify(&[peak(quick), peak(brown), peak(fox), peak(1)], &[quick, brown, fox], rng).unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(seq.output().finish_reason, FinishReason::Stop);
    assert_eq!(seq.output().text, " quick brown");
    // The budget: 2 new tokens allowed, so a 3-token draft stops after 2 (and drafts are cut to
    // leave room for the model's own token).
    let mut seq = sequence(&tokenizer, config.clone(), 2);
    let steps = seq.verify(&[peak(11), peak(12), peak(13), peak(14)], &[11, 12, 13], rng).unwrap();
    assert_eq!((steps.len(), seq.output().finish_reason), (2, FinishReason::Length));
    let lookup = GenerationConfig { prompt_lookup: Some(PromptLookup::new(8, 3).unwrap()), ..config };
    let mut seq = Sequence::new(&tokenizer, vec![1, 2, 3, 1, 2, 3, 1, 2], lookup, 3);
    assert_eq!(seq.draft(), [3, 1]);
}

#[test]
fn acceptance_learns_from_verified_drafts_and_from_the_token_after_them() {
    let tokenizer = Tokenizer::xgen();
    let base = GenerationConfig::defaults_for(&weights::random::preset("tiny").unwrap());
    let config = GenerationConfig { prompt_lookup: Some(PromptLookup::new(4, 3).unwrap()), ..base };
    let rng = &mut StdRng::seed_from_u64(0);
    let mut seq = Sequence::new(&tokenizer, vec![1, 2, 3, 1, 2, 3, 1, 2], config, 100);
    let rate = |seq: &Sequence| seq.candidate().rate;
    let start = rate(&seq);
    // Looked up [3, 1, 2]; the step verified none of it: the model's own 3 agrees with the
    // first, so one more drafted token would have been accepted.
    assert_eq!(seq.draft(), [3, 1, 2]);
    assert_eq!(seq.candidate().available, 3);
    seq.verify(&[peak(3)], &[], rng).unwrap();
    let agreed = rate(&seq);
    assert!(agreed > start, "{agreed} after {start}");
    // Looked up [1, 2, 3, ...]; verified [1]: accepted, then the model's 9 differs from the 2
    // after it: one success, one failure.
    assert_eq!(seq.draft()[..2], [1, 2]);
    seq.verify(&[peak(1), peak(9)], &[1], rng).unwrap();
    let mut expected = xgen_generate::draft_plan::Acceptance::new();
    [true, true, false].into_iter().for_each(|a| expected.observe(a));
    assert!((rate(&seq) - expected.rate()).abs() < 1e-12, "{} != {}", rate(&seq), expected.rate());
    // A draft rejected at its first token.
    let before = rate(&seq);
    seq.draft();
    seq.verify(&[peak(5), peak(6)], &[7], rng).unwrap();
    assert!(rate(&seq) < before);
    // EOS accepted inside a draft ends it: the positions after it were never tried.
    seq.draft();
    seq.verify(&[peak(8), peak(50256), peak(4), peak(5)], &[8, 50256, 4], rng).unwrap();
    assert!(seq.is_finished());
    let mut expected = xgen_generate::draft_plan::Acceptance::new();
    [true, true, false, false, true, true].into_iter().for_each(|a| expected.observe(a));
    assert!((rate(&seq) - expected.rate()).abs() < 1e-12, "two successes, nothing else");
}
