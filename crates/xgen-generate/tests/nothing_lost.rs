//! A session's turn that ends early (cancelled while reading its prompt or while decoding) keeps
//! what it computed: the next call reuses it and gives what a cold run gives.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use rand::{rngs::StdRng, SeedableRng};
use xgen_generate::{GenerationConfig, Generator, Session};
use xgen_model::{DType, Device, Model};
use xgen_tokenizer::Tokenizer;

fn load() -> (Model, GenerationConfig) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin");
    let m = Model::load(&dir, DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    let g = GenerationConfig::for_model_dir(&dir, m.config()).unwrap();
    (m, g)
}

fn rng() -> StdRng {
    StdRng::seed_from_u64(0)
}

#[test]
fn a_turn_cancelled_while_decoding_keeps_its_prompt_and_answer() {
    let tokenizer = Tokenizer::xgen();
    let (m, defaults) = load();
    let config = GenerationConfig { max_new_tokens: Some(30), eos_token_ids: vec![], ..defaults };
    let flag = AtomicBool::new(false);
    let gen = Generator::new(&m, &tokenizer).cancellable(&flag);
    let prompt = tokenizer.encode("The world is a large place with many rivers and mountains");
    let mut session = Session::default();
    let mut seen = 0;
    let err = gen
        .generate_in(&mut session, &prompt, &config, &mut rng(), &mut |_| {
            seen += 1;
            if seen == 5 {
                flag.store(true, Ordering::Relaxed);
            }
        })
        .unwrap_err();
    assert!(err.is_cancelled(), "{err}");
    // The prompt and the five tokens chosen before the cancel (each is fed back to the model
    // before the flag is looked at again).
    assert_eq!(session.cached(), prompt.len() + 5);
    flag.store(false, Ordering::Relaxed);
    let again = gen.generate_in(&mut session, &prompt, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(session.reused(), prompt.len() - 1, "all of the prompt but its last token");
    let cold = Generator::new(&m, &tokenizer).generate(&prompt, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(again.ids, cold.ids);
}

#[test]
fn a_turn_cancelled_while_reading_its_prompt_keeps_what_it_read() {
    let tokenizer = Tokenizer::xgen();
    let (mut m, defaults) = load();
    m.set_prefill_chunk(16);
    let config = GenerationConfig { max_new_tokens: Some(8), eos_token_ids: vec![], ..defaults };
    let text: String = (0..600).map(|i| format!("word{} ", i % 97)).collect();
    let prompt = tokenizer.encode(&text);
    assert!(prompt.len() > 1000);
    let flag = AtomicBool::new(false);
    let gen = Generator::new(&m, &tokenizer).cancellable(&flag);
    // Cancel from another thread after a while; retried with other delays until the cancel lands
    // in the middle of the prompt (how far 20 ms gets depends on the machine).
    let mut session = Session::default();
    let kept = [20u64, 5, 60, 2, 150, 400, 1].iter().find_map(|&ms| {
        session = Session::default();
        flag.store(false, Ordering::Relaxed);
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(ms));
                flag.store(true, Ordering::Relaxed);
            });
            gen.generate_in(&mut session, &prompt, &config, &mut rng(), &mut |_| {})
        });
        let partial = out.is_err_and(|e| e.is_cancelled()) && (1..prompt.len()).contains(&session.cached());
        partial.then_some(session.cached())
    });
    let kept = kept.expect("a cancel in the middle of the prompt");
    assert_eq!(kept % 16, 0, "whole prompt chunks");
    flag.store(false, Ordering::Relaxed);
    let again = gen.generate_in(&mut session, &prompt, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(session.reused(), kept);
    let cold = Generator::new(&m, &tokenizer).generate(&prompt, &config, &mut rng(), &mut |_| {}).unwrap();
    assert_eq!(again.ids, cold.ids);
}
