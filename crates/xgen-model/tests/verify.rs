//! A speculative verify step (k new tokens in one forward pass, every row's logits) against the k
//! single decode steps it stands for: equal bit for bit for 16-bit and block-quantized weights
//! (f32 weights go through candle's matmul and are not covered) and for f16, bf16 and q8_0 KV caches (the invariant of `kernels::decode_attention`, the
//! few-row products of `kernels::matvec` and `kernels::quant`). Also: truncating the cache after a
//! verify step leaves exactly the state of a run that never fed the rejected tokens.

use xgen_model::{weights, DType, Device, KvType, Model, Quant, Tensor, WeightFormat};

fn model(dtype: DType, linear: Option<Quant>, kv: Option<KvType>) -> Model {
    let config = weights::random::preset("small").unwrap(); // head width 64: the SIMD attention
    let format = WeightFormat { dtype, linear };
    let w = weights::random::tensors_with(&config, dtype, &Device::Cpu, &mut |_| {}, &mut |n, t| {
        format.convert(n, t)
    })
    .unwrap();
    let mut m = Model::from_weights(config, w, dtype, &Device::Cpu).unwrap();
    if let Some(kv) = kv {
        m.set_kv_type(kv).unwrap();
    }
    m
}

fn ids(m: &Model, ids: &[u32]) -> Tensor {
    m.ids_tensor(ids).unwrap()
}

/// Logits `[t, v]` of one step over `tokens`.
fn step(m: &Model, tokens: &[u32], cache: &mut xgen_model::KvCache) -> Vec<Vec<f32>> {
    let hidden = m.forward_hidden(&ids(m, tokens), cache).unwrap();
    m.logits(&hidden).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

const PROMPT: [u32; 37] = [
    464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 198, 464, 2068, 7586, 21831, 18045, 625, 262,
    16931, 3290, 13, 198, 40, 1101, 257, 1332, 11, 290, 428, 318, 257, 4171, 286, 617, 2420, 13, 198,
];
const DRAFT: [u32; 9] = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290];

#[test]
fn a_verify_step_equals_single_steps_exactly() {
    let cases: [(DType, Option<Quant>, Option<KvType>); 7] = [
        (DType::BF16, None, None),
        (DType::F16, None, None),
        (DType::BF16, None, Some(KvType::Q8_0)),
        (DType::F32, Some(Quant::Q8_0), None),
        (DType::F32, Some(Quant::Q4_0), None),
        (DType::BF16, Some(Quant::Q4K), Some(KvType::Float(DType::BF16))),
        (DType::BF16, Some(Quant::Q4_0), Some(KvType::Q8_0)),
    ];
    for (dtype, linear, kv) in cases {
        let m = model(dtype, linear, kv);
        let capacity = PROMPT.len() + DRAFT.len() + 1;
        let mut cache = m.new_cache(1, capacity).unwrap();
        m.forward_last(&ids(&m, &PROMPT), &mut cache).unwrap();
        let mut singles = Vec::new();
        for &t in &DRAFT {
            singles.push(step(&m, &[t], &mut cache).remove(0));
        }
        cache.truncate(PROMPT.len());
        let verify = step(&m, &DRAFT, &mut cache);
        for (i, (got, want)) in verify.iter().zip(&singles).enumerate() {
            assert!(got == want, "{dtype:?} {linear:?} kv {kv:?}: row {i} of the verify step differs");
        }
    }
}

#[test]
fn truncating_after_a_verify_step_equals_never_drafting() {
    let m = model(DType::F32, Some(Quant::Q4_0), None);
    let capacity = PROMPT.len() + DRAFT.len() + 2;
    // Verify the draft, keep its first 3 tokens (the rejected rest leaves the cache), then step.
    let mut cache = m.new_cache(1, capacity).unwrap();
    m.forward_last(&ids(&m, &PROMPT), &mut cache).unwrap();
    step(&m, &DRAFT, &mut cache);
    cache.truncate(PROMPT.len() + 3);
    let after = step(&m, &[11], &mut cache);
    // The same tokens, fed one at a time, never drafted.
    let mut plain = m.new_cache(1, capacity).unwrap();
    m.forward_last(&ids(&m, &PROMPT), &mut plain).unwrap();
    for &t in &DRAFT[..3] {
        step(&m, &[t], &mut plain);
    }
    let want = step(&m, &[11], &mut plain);
    assert_eq!(cache.len(), plain.len());
    assert!(after == want, "the step after truncation equals the never-drafted run's");
}

#[test]
fn segments_of_several_sequences_equal_each_run_alone() {
    // A continuous-batching step where one sequence decodes a token and another verifies a draft.
    let m = model(DType::F32, Some(Quant::Q4_0), Some(KvType::Q8_0));
    let pool = m.new_pool(8).unwrap();
    let prompts: [&[u32]; 2] = [&PROMPT[..20], &PROMPT[5..]];
    let fed: [&[u32]; 2] = [&[11], &DRAFT[..4]];
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|p| {
            let mut c = xgen_model::KvCache::in_pool(&pool, 64);
            m.forward_last(&ids(&m, p), &mut c).unwrap();
            c
        })
        .collect();
    let mut alone = Vec::new();
    for (c, f) in caches.iter_mut().zip(fed) {
        let len = c.len();
        alone.extend(step(&m, f, c));
        c.truncate(len);
    }
    let flat: Vec<u32> = fed.concat();
    let hidden = m.forward_segments(&flat, &[1, 4], &mut caches).unwrap();
    let together: Vec<Vec<f32>> = m.logits(&hidden.squeeze(0).unwrap()).unwrap().to_vec2().unwrap();
    assert!(together == alone, "each segment's logits are its sequence's alone");
    assert_eq!((caches[0].len(), caches[1].len()), (21, PROMPT.len() - 5 + 4));
    // Rejected drafts leave the cache and the blocks they alone took go back to the pool.
    let mut long = xgen_model::KvCache::in_pool(&pool, 128);
    m.forward_last(&ids(&m, &[PROMPT, PROMPT].concat()), &mut long).unwrap(); // 74 positions: 2 blocks
    let held = pool.used_blocks();
    long.truncate(40);
    long.release_unused();
    assert_eq!((long.held_blocks(), pool.used_blocks()), (1, held - 1));
}
