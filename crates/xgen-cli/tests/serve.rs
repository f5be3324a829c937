//! `xgen serve` end to end: the model flags reach the engine the server loads.

mod common;

use common::Serve;

fn serve(extra: &[&str]) -> Serve {
    let model = common::fixtures("models/tiny-xgen-8k-bin");
    common::serve(model.to_str().unwrap(), &[&["--dtype", "f32"][..], extra].concat())
}

fn metric(s: &Serve, name: &str) -> i64 {
    let text = ureq::get(&format!("{}/metrics", s.1)).call().unwrap().into_string().unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
    line[name.len() + 1..].trim().parse().unwrap()
}

#[test]
fn model_flags_reach_the_served_model() {
    // Regression: serve loaded the model itself and ignored --prefill-chunk and --kv-type.
    let s = serve(&["--prefill-chunk", "7", "--kv-type", "f16", "--kv-budget", "1M"]);
    assert_eq!(metric(&s, "xgen_prefill_chunk_tokens"), 7);
    // 2 layers x (keys + values) x 4 heads x 16 values x 2 bytes.
    assert_eq!(metric(&s, "xgen_kv_bytes_per_token"), 512);
    assert_eq!(metric(&s, "xgen_kv_budget_bytes"), 1 << 20);
    drop(s);
    // Defaults: serve's chunk, the compute dtype's cache (f32).
    let s = serve(&[]);
    assert_eq!(metric(&s, "xgen_prefill_chunk_tokens"), 128);
    assert_eq!(metric(&s, "xgen_kv_bytes_per_token"), 1024);
    assert!(metric(&s, "xgen_kv_budget_bytes") > 0, "auto: from the memory available");
}
