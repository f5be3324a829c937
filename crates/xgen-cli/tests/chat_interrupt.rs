//! `xgen chat`: Ctrl-C during an answer stops that turn, not the chat; what the turn read (the
//! document) stays cached, so the next message reuses it and answers as a cold chat would.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::Command,
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use common::{fixtures, spawn_xgen, xgen_with};
use serde_json::Value;

/// The `--timings` JSON lines of a chat's stderr.
fn timings(stderr: &str) -> Vec<Value> {
    stderr.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn ctrl_c_stops_the_answer_and_the_next_message_reuses_the_document() {
    let tmp = tempfile::tempdir().unwrap();
    let doc = tmp.path().join("doc.txt");
    let words = ["river", "stone", "market", "winter", "signal", "harbor", "lantern", "engine"];
    let text: Vec<&str> = (0..2000).map(|i| words[(i * 7 + i / 3) % words.len()]).collect();
    std::fs::write(&doc, text.join(" ")).unwrap();
    let model = fixtures("models/tiny-xgen-8k-st");
    let args = [
        "chat",
        "--model",
        model.to_str().unwrap(),
        "--dtype",
        "f32",
        "--greedy",
        "--max-new-tokens",
        "400",
        "--timings",
        "--document",
        doc.to_str().unwrap(),
    ];

    // Cold: the second question alone.
    let cold = xgen_with(&args, b"What comes next?\n");
    assert!(cold.status.success(), "{}", String::from_utf8_lossy(&cold.stderr));
    let cold_answer = String::from_utf8(cold.stdout).unwrap();
    let cold_timings = timings(&String::from_utf8_lossy(&cold.stderr));
    assert_eq!(cold_timings[0]["cache_n"], 0);
    // The first question's answer is long (this fixture never ends it early): room for Ctrl-C.
    assert_eq!(cold_timings[0]["predicted_n"], 400);

    let mut child = spawn_xgen(&args);
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let mut out_pipe = child.stdout.take().unwrap();
    let sink = stdout.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = out_pipe.read(&mut buf) {
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let (lines_tx, lines) = mpsc::channel();
    let err_pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err_pipe).lines() {
            let _ = lines_tx.send(line.unwrap());
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Summarize it.\n").unwrap();
    // Once the answer streams, the document has been read: interrupt.
    let deadline = Instant::now() + Duration::from_secs(120);
    while stdout.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no answer");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut stderr = Vec::new();
    let kept = loop {
        let line = lines.recv_timeout(Duration::from_secs(120)).expect("the chat says it was interrupted");
        stderr.push(line.clone());
        if let Some(rest) = line.strip_prefix("xgen: interrupted; ") {
            break rest.split(' ').next().unwrap().parse::<usize>().unwrap();
        }
    };
    assert!(kept > 2000, "the document stays cached: {kept} tokens");
    stdin.write_all(b"What comes next?\n").unwrap();
    drop(stdin);
    let exit = child.wait().unwrap();
    reader.join().unwrap();
    stderr.extend(lines.iter());
    let stderr = stderr.join("\n");
    assert!(exit.success(), "{stderr}");
    let out = String::from_utf8(stdout.lock().unwrap().clone()).unwrap();
    assert!(out.ends_with(&format!("\n{cold_answer}")), "{out:?} does not end with {cold_answer:?}");
    let turns = timings(&stderr);
    assert_eq!(turns.len(), 1, "the interrupted turn reports no timings: {stderr}");
    let cache_n = turns[0]["cache_n"].as_u64().unwrap() as usize;
    assert!(cache_n > 2000 && cache_n <= kept, "the second turn reused the document: {stderr}");
}
