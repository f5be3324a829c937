//! What the CLI test files share: running `xgen` with stdin, and a running `xgen serve`.

#![allow(dead_code)] // each test file uses its own part

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// A path under the repository's `tests/fixtures`.
pub fn fixtures(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(rel)
}

/// Starts `xgen ARGS` with piped stdin, stdout and stderr.
pub fn spawn_xgen(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn xgen")
}

/// Runs `xgen ARGS` with `stdin`.
pub fn xgen_with(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = spawn_xgen(args);
    let mut pipe = child.stdin.take().expect("stdin");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || pipe.write_all(&input));
    let out = child.wait_with_output().expect("wait xgen");
    writer.join().expect("writer thread").expect("write stdin");
    out
}

/// The lines of a JSON-lines file.
pub fn jsonl(path: &PathBuf) -> Vec<serde_json::Value> {
    let data = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data.lines().map(|l| serde_json::from_str(l).expect("fixture JSON")).collect()
}

/// A running `xgen serve`; killed when dropped. `.1` is its base URL.
pub struct Serve(pub Child, pub String);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `xgen serve --model MODEL --port 0 EXTRA...` and waits until it is healthy.
pub fn serve(model: &str, extra: &[&str]) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgen"))
        .args(["serve", "--model", model, "--port", "0"])
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

/// POSTs `body` to `path`: (status, JSON body).
pub fn post(s: &Serve, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = ureq::post(&format!("{}{path}", s.1)).send_json(body);
    let response = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{path}: {e}"),
    };
    let status = response.status();
    (status, response.into_json().expect("JSON response"))
}
