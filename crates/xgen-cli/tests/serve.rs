//! `xgen serve` end to end: the model flags reach the engine the server loads.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin")
}

/// A running `xgen serve`; killed when dropped.
struct Serve(Child, String);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(extra: &[&str]) -> Serve {
    let model = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args(["serve", "--model", model.to_str().unwrap(), "--dtype", "f32", "--port", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run xgen serve");
    let stderr = child.stderr.take().unwrap();
    let line =
        BufReader::new(stderr).lines().map(Result::unwrap).find(|l| l.contains("http://")).expect("address");
    let base = line[line.find("http://").unwrap()..].split_whitespace().next().unwrap().to_string();
    let s = Serve(child, base);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ureq::get(&format!("{}/health", s.1)).call().is_err() {
        assert!(Instant::now() < deadline, "never healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    s
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
