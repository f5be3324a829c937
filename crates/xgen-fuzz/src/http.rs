//! HTTP request bodies from strangers: one `xgen serve` per process on a loopback port (the tiny
//! fixture model, a 256-token context so that any request finishes fast, a small KV budget so
//! that some requests exceed it), and each input sent to one endpoint picked by its first byte.
//! Any body must get a complete 2xx or 4xx answer: a 5xx, a dropped connection or no answer
//! within a minute fails.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{Arc, OnceLock},
    time::Duration,
};

use xgen_generate::{GenerationConfig, ModelText};
use xgen_model::{Config, DType, Device, Model};
use xgen_server::{EngineOptions, PrefixCache, ServeOptions, Ui};

/// The endpoints a body goes to, by the input's first byte (modulo their number).
const ENDPOINTS: [(&str, &str); 11] = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/apply-template"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/detokenize"),
    ("GET", "/tokenizer_info"),
];

/// Context per sequence of the fuzzed server, in tokens.
const CONTEXT: usize = 256;

/// Sends the rest of `data` to the endpoint its first byte picks; panics unless the answer is a
/// whole 2xx or 4xx response.
pub fn request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    let (method, path) = ENDPOINTS[which as usize % ENDPOINTS.len()];
    let response = exchange(server(), method, path, body);
    let status = status_of(&response).unwrap_or_else(|| {
        panic!("{method} {path}: no status line in {:?}", String::from_utf8_lossy(&response))
    });
    assert!(
        (200..500).contains(&status),
        "{method} {path} answered {status} to {:?}: {}",
        String::from_utf8_lossy(body),
        String::from_utf8_lossy(&response)
    );
}

/// One request on a new connection, read to its end (`Connection: close`).
fn exchange(port: u16, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("the fuzzed server accepts connections");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).and_then(|()| c.write_all(body)).expect("sending the request");
    let mut response = Vec::new();
    c.read_to_end(&mut response).unwrap_or_else(|e| panic!("{method} {path}: no whole answer: {e}"));
    response
}

fn status_of(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line.strip_prefix(b"HTTP/1.1 ")?).ok()?.get(..3)?.parse().ok()
}

/// The port of this process's server, started on first use and healthy before it is returned.
fn server() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || run_server(tx));
        let port = rx.recv().expect("the fuzzed server's port");
        for _ in 0..3000 {
            if status_of(&exchange(port, "GET", "/health", b"")) == Some(200) {
                return port;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the fuzzed server never became healthy");
    })
}

fn run_server(port: std::sync::mpsc::Sender<u16>) {
    let dir = crate::fixtures().join("models/tiny-xgen-8k-st");
    let config = Config::load(&dir.join("config.json")).expect("fixture config");
    let options = ServeOptions {
        model_name: "tiny".into(),
        defaults: GenerationConfig::for_model_dir(&dir, &config).expect("fixture generation config"),
        context: CONTEXT,
        config,
        text: Arc::new(ModelText::xgen()),
        api_key: None,
        ui: Ui::On,
        replica_id: "fuzz".into(),
        // 192 positions of f32 KV: a request for the whole context is over the budget.
        engine: EngineOptions {
            max_batch: 4,
            max_queue: 16,
            kv_budget: Some(192 << 10),
            prefix_cache: PrefixCache::On,
        },
        kv_budget_after_load: || None,
        disk_cache: None,
        body_limit: 1 << 20,
        drain_timeout: Duration::from_millis(100),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        port.send(listener.local_addr().unwrap().port()).unwrap();
        let load =
            move || Model::load(&dir, DType::F32, &Device::Cpu, &mut |_| {}).map_err(|e| e.to_string());
        xgen_server::serve(options, listener, load, std::future::pending()).await.expect("the fuzzed server");
    });
}
