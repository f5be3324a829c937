//! Linear layers quantized on load (GGUF block formats through candle's kernels) stay within stated
//! error bounds of the f32 model; layers whose width does not fit the blocks stay in float.

use std::path::PathBuf;

use xgen_model::{
    perplexity::{self, Window},
    weights::random,
    DType, Device, KvType, Model, Quant, WeightFormat,
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin")
}

fn small(linear: Option<Quant>) -> Model {
    let config = random::preset("small").unwrap();
    let format = WeightFormat { dtype: DType::F32, linear };
    let w = random::tensors_with(&config, DType::F32, &Device::Cpu, &mut |_| {}, &mut |n, t| {
        format.convert(n, t)
    })
    .unwrap();
    Model::from_weights(config, w, DType::F32, &Device::Cpu).unwrap()
}

/// (max |Δ logit| / max |logit| at the last position, mean KL(f32 ‖ quantized) over positions,
/// top-1 agreement over positions).
fn compare(reference: &Model, quantized: &Model, ids: &[u32]) -> (f64, f64, f64) {
    let (a, b) = (last_of(reference, ids), last_of(quantized, ids));
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    let rel = a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max) / scale;
    let window = Window { size: 8192, stride: 4096 };
    let agreement = perplexity::compare(reference, quantized, ids, window).unwrap();
    assert_eq!(agreement.positions, ids.len() - 1);
    (rel, agreement.mean_kl, agreement.top1_agreement)
}

fn last_of(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(1, ids.len()).unwrap();
    m.forward_last(&m.ids_tensor(ids).unwrap(), &mut cache).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

fn ids(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 7919 % 50000) as u32).collect()
}

#[test]
fn quantized_formats_stay_close_to_f32() {
    let reference = small(None);
    let ids = ids(64);
    // Measured here: q8_0 rel 0.020, KL 2.1e-4, agreement 0.97; q4_k 0.13, 9.1e-3, 0.62 (candle's
    // kernels, q8_K activations; ours, q8_0 activations: 0.135, 9.1e-3, 0.65); q4_0 0.17, 0.014,
    // 0.43 (random weights, deterministic; they quantize worse than trained ones). Bounds leave
    // margin for other CPUs' kernels.
    for (quant, max_rel, max_kl, min_agree) in
        [(Quant::Q8_0, 0.04, 0.002, 0.85), (Quant::Q4K, 0.25, 0.05, 0.5), (Quant::Q4_0, 0.3, 0.08, 0.3)]
    {
        let (rel, kl, agree) = compare(&reference, &small(Some(quant)), &ids);
        eprintln!("{quant:?}: last-logit rel err {rel:.4}, mean KL {kl:.5}, top-1 agreement {agree:.2}");
        assert!(rel <= max_rel && kl <= max_kl && agree >= min_agree, "{quant:?}: {rel} {kl} {agree}");
        assert!(rel > 0.0, "{quant:?}: the quantized model must differ from f32 (it was quantized)");
    }
}

#[test]
fn q8_0_fixture_model_tracks_transformers_perplexity() {
    // In-features 64 fit q8_0's 32-blocks; down_proj's 176 does not and stays f32.
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &expected["float32"]["prompts"][4];
    let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let want = p["mean_nll"].as_f64().unwrap();
    let format = WeightFormat { dtype: DType::F32, linear: Some(Quant::Q8_0) };
    let model = Model::load_as(&fixture(), format, &Device::Cpu, &mut |_| {}).unwrap();
    let f32_model = Model::load(&fixture(), DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    assert!(model.weight_bytes() < f32_model.weight_bytes(), "linear layers are stored in ~8.5 bits");
    assert_eq!(
        model.new_cache(1, 4).unwrap().kind(),
        KvType::Float(DType::F16),
        "quantized models keep an f16 KV cache"
    );
    assert_eq!(f32_model.new_cache(1, 4).unwrap().kind(), KvType::Float(DType::F32));
    let got = perplexity::score(&model, &ids, Window { size: 8192, stride: 4096 }).unwrap().mean_nll;
    let err = (got - want).abs() / want;
    eprintln!("q8_0 mean NLL {got} vs transformers f32 {want}: rel {err:.2e}");
    assert!(err < 5e-3 && err > 0.0, "{err}");
}

#[test]
fn a_model_agrees_with_itself() {
    let model = small(None);
    let a = perplexity::compare(&model, &model, &ids(40), Window { size: 16, stride: 8 }).unwrap();
    assert_eq!((a.positions, a.top1_agreement), (39, 1.0));
    assert!(a.mean_kl.abs() < 1e-6, "{}", a.mean_kl);
}

#[test]
fn q8_0_kv_cache_stays_close_to_the_f32_cache() {
    let reference = small(None);
    let mut q8kv = small(None);
    q8kv.set_kv_type(KvType::Q8_0).unwrap();
    assert_eq!(q8kv.new_cache(1, 4).unwrap().kind(), KvType::Q8_0);
    let ids = ids(64);
    // The prompt at once (attention over the dequantized cache).
    let (rel, kl, agree) = compare(&reference, &q8kv, &ids);
    // One token at a time (the decode kernel reading the q8_0 buffers).
    let want = last_of(&reference, &ids);
    let mut cache = q8kv.new_cache(1, ids.len()).unwrap();
    let mut got: Vec<f32> = Vec::new();
    for &id in &ids {
        got = q8kv
            .forward_last(&q8kv.ids_tensor(&[id]).unwrap(), &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let step_rel = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
    eprintln!("q8_0 KV: prompt rel {rel:.4}, KL {kl:.2e}, agreement {agree:.2}; decode rel {step_rel:.4}");
    // Measured here: prompt rel 0.0038, KL 1.4e-5, agreement 1.00; decode rel 0.0038 (keys and values
    // quantized, weights f32).
    assert!(rel < 0.01 && kl < 1e-4 && agree >= 0.95, "{rel} {kl} {agree}");
    assert!(step_rel < 0.01 && step_rel > 0.0, "{step_rel}");
}

#[test]
fn q8_0_kv_cache_needs_head_dim_divisible_by_32() {
    let mut model = Model::load(&fixture(), DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    let err = model.set_kv_type(KvType::Q8_0).unwrap_err().to_string();
    assert!(err.contains("head_dim divisible by 32") && err.contains("16"), "{err}");
}

#[test]
fn evaluate_gives_the_candidates_perplexity_and_its_agreement_in_one_pass() {
    let reference = small(None);
    let candidate = small(Some(Quant::Q4_0));
    let ids = ids(50);
    let window = Window { size: 24, stride: 12 };
    let mut scored = 0;
    let (ppl, agreement) = perplexity::evaluate(&reference, &candidate, &ids, window, &mut |n| {
        scored += n;
        Ok(())
    })
    .unwrap();
    assert_eq!(scored, ids.len() - 1, "progress counts every scored token once");
    assert_eq!(ppl, perplexity::score(&candidate, &ids, window).unwrap(), "the same logits as score");
    assert_eq!(agreement, perplexity::compare(&reference, &candidate, &ids, window).unwrap());
    assert!(agreement.mean_kl > 0.0 && agreement.top1_agreement < 1.0);
}
