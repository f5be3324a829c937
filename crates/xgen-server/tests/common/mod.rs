//! What the server's test files share: a server on a loopback port with the tiny fixture model,
//! requests, SSE streams and metrics.

#![allow(dead_code)] // each test file uses its own part

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;
use xgen_generate::{GenerationConfig, ModelText};
use xgen_model::{Config, DType, Device, Model};
use xgen_server::{EngineOptions, OpenDiskCache, PrefixCache, ServeOptions, Ui};

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin")
}

/// A running server; stops when dropped.
pub struct Server {
    pub base: String,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Receives once `serve` has returned.
    pub done: std::sync::Mutex<mpsc::Receiver<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn start(api_key: Option<&str>, max_batch: usize, max_queue: usize, body_limit: usize) -> Server {
    start_setup(Setup { api_key: api_key.map(String::from), body_limit, ..Setup::new(max_batch, max_queue) })
}

/// What a test server runs with.
pub struct Setup {
    pub api_key: Option<String>,
    pub engine: EngineOptions,
    pub body_limit: usize,
    /// Prompt tokens per engine step (the model's default when `None`).
    pub prefill_chunk: Option<usize>,
    pub ui: Ui,
    /// The tokenizer and chat format (XGen's by default).
    pub text: std::sync::Arc<ModelText>,
    /// The disk prompt cache's opener (none by default).
    pub disk_cache: Option<OpenDiskCache>,
}

impl Setup {
    pub fn new(max_batch: usize, max_queue: usize) -> Self {
        Self {
            api_key: None,
            engine: EngineOptions { max_batch, max_queue, kv_budget: None, prefix_cache: PrefixCache::On },
            body_limit: 1 << 20,
            prefill_chunk: None,
            ui: Ui::On,
            text: std::sync::Arc::new(ModelText::xgen()),
            disk_cache: None,
        }
    }
}

/// Starts a server and waits until it is healthy.
pub fn start_setup(setup: Setup) -> Server {
    let server = start_with(setup, || ());
    let deadline = Instant::now() + Duration::from_secs(30);
    while ureq::get(&format!("{}/health", server.base)).call().is_err() {
        assert!(Instant::now() < deadline, "server never became healthy");
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

/// Starts a server whose model load first runs `before_load` (to hold it in the loading state).
pub fn start_with(setup: Setup, before_load: impl FnOnce() + Send + 'static) -> Server {
    let config = Config::load(&fixture().join("config.json")).unwrap();
    let options = ServeOptions {
        model_name: "tiny".into(),
        defaults: GenerationConfig::for_model_dir(&fixture(), &config).unwrap(),
        context: config.max_position_embeddings,
        config,
        text: setup.text,
        api_key: setup.api_key,
        ui: setup.ui,
        replica_id: "replica-7".into(),
        engine: setup.engine,
        kv_budget_after_load: || None,
        disk_cache: setup.disk_cache,
        body_limit: setup.body_limit,
        drain_timeout: Duration::from_millis(300),
    };
    let prefill_chunk = setup.prefill_chunk;
    let (port_tx, port_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            port_tx.send(listener.local_addr().unwrap().port()).unwrap();
            let load = move || {
                before_load();
                let mut model = Model::load(&fixture(), DType::F32, &Device::Cpu, &mut |_| {})
                    .map_err(|e| e.to_string())?;
                if let Some(tokens) = prefill_chunk {
                    model.set_prefill_chunk(tokens);
                }
                Ok(model)
            };
            xgen_server::serve(options, listener, load, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
        let _ = done_tx.send(());
    });
    let base = format!("http://127.0.0.1:{}", port_rx.recv().unwrap());
    Server { base, stop: Some(stop_tx), done: std::sync::Mutex::new(done_rx) }
}

pub fn post(s: &Server, path: &str, body: &Value) -> Result<Value, (u16, Value, Option<String>)> {
    match ureq::post(&format!("{}{path}", s.base)).send_json(body.clone()) {
        Ok(r) => Ok(r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => {
            let retry = r.header("retry-after").map(String::from);
            Err((code, r.into_json().unwrap_or(Value::Null), retry))
        }
        Err(e) => panic!("transport error: {e}"),
    }
}

/// The `data:` payloads of an SSE response, up to and including `[DONE]`.
pub fn stream(s: &Server, path: &str, body: &Value) -> Vec<String> {
    let r = ureq::post(&format!("{}{path}", s.base)).send_json(body.clone()).unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    BufReader::new(r.into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

pub fn streamed_text(chunks: &[String], key: &str) -> String {
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str::<Value>(c).unwrap())
        .filter_map(|c| {
            c["choices"].get(0).map(|ch| {
                ch[key]
                    .as_str()
                    .map(String::from)
                    .or_else(|| ch["delta"]["content"].as_str().map(String::from))
                    .unwrap_or_default()
            })
        })
        .collect()
}

pub fn expected_greedy() -> (Vec<u64>, Vec<u32>) {
    let e: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap();
    let p = &e["float32"]["prompts"][2];
    let ids = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let new = p["greedy"]["new_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    (ids, new)
}

/// KV cache bytes per position of the fixture model in f32.
/// Bytes of one KV block (`KV_BLOCK` positions) of the fixture model.
pub fn kv_block_bytes() -> usize {
    let model = Model::load(&fixture(), DType::F32, &Device::Cpu, &mut |_| {}).unwrap();
    model.kv_block_bytes().unwrap()
}

pub fn metric(s: &Server, name: &str) -> i64 {
    let text = ureq::get(&format!("{}/metrics", s.base)).call().unwrap().into_string().unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} in {text}"));
    line[name.len() + 1..].trim().parse().unwrap()
}
