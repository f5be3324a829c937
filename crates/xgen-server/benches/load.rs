//! Bounded load test of `xgen serve` on loopback: requests/s, time to first token and per-token
//! latency (p50/p99) at concurrency 1, 4 and 16, each client streaming a fixed number of requests.
//! The model is the `small` random-weights preset in bf16 (4 layers, hidden 512), so the figures
//! measure the server and batching rather than a 7B forward pass. Then a mixed workload: 4 chatty
//! streaming clients alone, and again beside one client sending 3000-token prompts (each new, so
//! the prefix cache does not help): the chatty clients' per-token p50/p99 in both.
//!
//! `cargo bench -p xgen-server --bench load` (env PREFILL_CHUNK: prompt tokens per engine step)

use std::{
    io::{BufRead, BufReader},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::json;
use xgen_generate::GenerationConfig;
use xgen_model::{weights::random, DType, Device, Model};
use xgen_server::{EngineOptions, PrefixCache, ServeOptions, Ui};

const REQUESTS_PER_CLIENT: usize = 8;
const MAX_TOKENS: usize = 32;

fn main() {
    let base = start();
    println!("model: random `small` bf16; {REQUESTS_PER_CLIENT} streamed requests of {MAX_TOKENS} tokens per client");
    for clients in [1, 4, 16] {
        let started = Instant::now();
        let results: Vec<(Duration, Vec<Duration>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|c| {
                    let base = &base;
                    scope.spawn(move || {
                        (0..REQUESTS_PER_CLIENT).map(|r| one(base, c * 1000 + r)).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("client thread")).collect()
        });
        let elapsed = started.elapsed().as_secs_f64();
        let mut ttft: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64()).collect();
        let mut itl: Vec<f64> = results.iter().flat_map(|r| r.1.iter().map(Duration::as_secs_f64)).collect();
        println!(
            "concurrency {clients:>2}: {:6.2} req/s  {:7.1} tok/s  TTFT p50 {:6.1} ms p99 {:6.1} ms  per-token p50 {:6.1} ms p99 {:6.1} ms",
            results.len() as f64 / elapsed,
            (results.len() * MAX_TOKENS) as f64 / elapsed,
            pct(&mut ttft, 0.5) * 1e3,
            pct(&mut ttft, 0.99) * 1e3,
            pct(&mut itl, 0.5) * 1e3,
            pct(&mut itl, 0.99) * 1e3,
        );
    }
    mixed(&base);
}

/// 4 chatty clients, alone and beside a client reading 3000-token prompts back to back.
fn mixed(base: &str) {
    for long_client in [false, true] {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (itl, long_prompts) = std::thread::scope(|scope| {
            let long = scope.spawn(|| {
                let mut read = 0;
                while long_client && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<u32> = (0..3000).map(|i| 1000 + (read * 7 + i) as u32 % 40000).collect();
                    let body = json!({"prompt": ids, "max_tokens": 1, "temperature": 0});
                    ureq::post(&format!("{base}/v1/completions")).send_json(body).expect("long request");
                    read += 1;
                }
                read
            });
            let chatty: Vec<_> = (0..4)
                .map(|c| {
                    scope.spawn(move || {
                        (0..REQUESTS_PER_CLIENT).map(|r| one(base, 50_000 + c * 1000 + r)).collect::<Vec<_>>()
                    })
                })
                .collect();
            let mut itl: Vec<f64> = chatty
                .into_iter()
                .flat_map(|h| h.join().expect("client thread"))
                .flat_map(|r| r.1.into_iter().map(|d| d.as_secs_f64()))
                .collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            itl.sort_by(f64::total_cmp);
            (itl, long.join().expect("long client"))
        });
        let mut itl = itl;
        println!(
            "4 chatty clients{}: per-token p50 {:6.1} ms p99 {:6.1} ms",
            if long_client {
                format!(" + one reading 3000-token prompts ({long_prompts} read)")
            } else {
                String::new()
            },
            pct(&mut itl, 0.5) * 1e3,
            pct(&mut itl, 0.99) * 1e3,
        );
    }
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// One streamed request: time to the first chunk and the gaps between later chunks.
fn one(base: &str, seed: usize) -> (Duration, Vec<Duration>) {
    let body = json!({"prompt": format!("Request {seed}: the world is"), "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": seed, "stream": true, "logit_bias": {"50256": -100}});
    let start = Instant::now();
    let r = ureq::post(&format!("{base}/v1/completions")).send_json(body).expect("request");
    let mut last = None;
    let mut gaps = Vec::new();
    let mut first = Duration::ZERO;
    for line in BufReader::new(r.into_reader()).lines() {
        let line = line.expect("read stream");
        if !line.starts_with("data: {") {
            continue;
        }
        let now = Instant::now();
        match last {
            None => first = now - start,
            Some(t) => gaps.push(now - t),
        }
        last = Some(now);
    }
    (first, gaps)
}

fn start() -> String {
    let config = random::preset("small").expect("preset");
    let options = ServeOptions {
        model_name: "small".into(),
        defaults: GenerationConfig::defaults_for(&config),
        context: config.max_position_embeddings,
        config: config.clone(),
        text: std::sync::Arc::new(xgen_generate::ModelText::xgen()),
        api_key: None,
        ui: Ui::Off,
        replica_id: "bench".into(),
        engine: EngineOptions {
            max_batch: 16,
            max_queue: 64,
            kv_budget: None,
            prefix_cache: PrefixCache::On,
        },
        kv_budget_after_load: || None,
        disk_cache: None,
        body_limit: 1 << 20,
        drain_timeout: Duration::from_secs(1),
    };
    let (port_tx, port_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            port_tx.send(listener.local_addr().expect("addr").port()).expect("send port");
            let load = move || {
                let t = random::tensors(&config, DType::BF16, &Device::Cpu, &mut |_| {})
                    .map_err(|e| e.to_string())?;
                let mut model =
                    Model::from_tensors(config, t, DType::BF16, &Device::Cpu).map_err(|e| e.to_string())?;
                if let Some(tokens) = std::env::var("PREFILL_CHUNK").ok().and_then(|v| v.parse().ok()) {
                    model.set_prefill_chunk(tokens);
                }
                Ok(model)
            };
            xgen_server::serve(options, listener, load, std::future::pending()).await.expect("serve");
        });
    });
    let base = format!("http://127.0.0.1:{}", port_rx.recv().expect("port"));
    while ureq::get(&format!("{base}/health")).call().is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    base
}
