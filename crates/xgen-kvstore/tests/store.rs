//! The store against cold runs: restored prompts give a cold run's logits bit for bit (f16, bf16
//! and q8_0 KV on block-quantized weights: step-invariant models), a shared prefix is reused in
//! part, every kind of bad file is ignored, removed and recomputed with a warning, a writer killed
//! mid-write leaves nothing a later run uses, concurrent writers, and the budget.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use xgen_kvstore::{dir::Dir, file, key::block_keys, DiskCache, Fingerprint, FingerprintBuilder, Warn};
use xgen_model::{
    kv_cache::blocks_for, weights, DType, Device, KvCache, KvType, Model, Quant, WeightFormat, KV_BLOCK,
};

fn model(dtype: DType, linear: Option<Quant>, kv: KvType) -> Model {
    let config = weights::random::preset("small").unwrap(); // head width 64: q8_0 KV fits
    let format = WeightFormat { dtype, linear };
    let w = weights::random::tensors_with(&config, dtype, &Device::Cpu, &mut |_| {}, &mut |n, t| {
        format.convert(n, t)
    })
    .unwrap();
    let mut m = Model::from_weights(config, w, dtype, &Device::Cpu).unwrap();
    m.set_kv_type(kv).unwrap();
    m
}

fn q4_model(kv: KvType) -> Model {
    model(DType::F32, Some(Quant::Q4_0), kv)
}

fn fingerprint(m: &Model) -> Fingerprint {
    let kv = format!("{:?}", m.kv_type());
    FingerprintBuilder::default()
        .part("test model", m.weight_format_name().as_bytes())
        .part("kv", kv.as_bytes())
        .finish()
}

/// A store whose warnings are collected.
fn open(dir: &Path, m: &Model, budget: Option<u64>) -> (DiskCache, Arc<Mutex<Vec<String>>>) {
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let sink = warnings.clone();
    let warn: Warn = Arc::new(move |w: &str| sink.lock().unwrap().push(w.to_string()));
    (DiskCache::open(dir, budget, fingerprint(m), m, warn).unwrap(), warnings)
}

fn cache(m: &Model, len: usize) -> KvCache {
    KvCache::in_pool(&m.new_pool(blocks_for(len)).unwrap(), len)
}

fn prompt(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i.wrapping_mul(7919).wrapping_add(seed * 104729 + 13)) % 50000).collect()
}

/// The last position's logits, computed from what `cache` already holds.
fn finish(m: &Model, cache: &mut KvCache, prompt: &[u32]) -> Vec<f32> {
    let rest = m.ids_tensor(&prompt[cache.len()..]).unwrap();
    m.forward_last(&rest, cache).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// A cold run of `prompt` that saves its blocks; its logits.
fn cold_and_save(m: &Model, store: &DiskCache, prompt: &[u32]) -> Vec<f32> {
    let mut c = cache(m, prompt.len());
    let logits = finish(m, &mut c, prompt);
    store.save(&c, prompt);
    store.flush();
    logits
}

/// A run that restores what it can first: its logits and the positions restored.
fn restored(m: &Model, store: &DiskCache, prompt: &[u32]) -> (Vec<f32>, usize) {
    let mut c = cache(m, prompt.len());
    let held = store.restore_prompt(&mut c, prompt);
    (finish(m, &mut c, prompt), held)
}

fn cold(m: &Model, prompt: &[u32]) -> Vec<f32> {
    finish(m, &mut cache(m, prompt.len()), prompt)
}

fn argmax(v: &[f32]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

#[test]
fn a_restored_prompt_gives_a_cold_runs_logits() {
    let kvs = [KvType::Float(DType::F16), KvType::Float(DType::BF16), KvType::Q8_0];
    for kv in kvs {
        let m = q4_model(kv);
        // Bit for bit where the packed block kernels run (CPUs with AVX-512 VNNI); AMX tiles and
        // candle's kernels (CPUs without AVX-512, e.g. AVX2-only hosts) only promise the token.
        let packed = xgen_model::quant::has_fast_kernels();
        assert!(m.step_invariant() || !packed || m.prompt_kernel_name().contains("amx"));
        let dir = tempfile::tempdir().unwrap();
        let (store, warnings) = open(dir.path(), &m, None);
        let p = prompt(300, 1);
        let want = cold_and_save(&m, &store, &p);
        let (got, held) = restored(&m, &store, &p);
        assert_eq!(held, 256, "{kv:?}: every full block before the last token");
        if m.step_invariant() {
            assert!(got == want, "{kv:?}: logits after a restore differ from a cold run's");
        } else {
            assert_eq!(argmax(&got), argmax(&want), "{kv:?}");
        }
        let s = store.stats();
        assert_eq!((s.restored_tokens, s.bad_files), (256, 0));
        assert_eq!(s.written_bytes, s.read_bytes, "4 blocks written, 4 read");
        assert!(warnings.lock().unwrap().is_empty());
    }
}

#[test]
fn float_weights_restore_with_the_same_greedy_token() {
    let m = model(DType::BF16, None, KvType::Float(DType::BF16));
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), &m, None);
    let p = prompt(200, 2);
    let want = cold_and_save(&m, &store, &p);
    let (got, held) = restored(&m, &store, &p);
    assert_eq!(held, 192);
    assert_eq!(argmax(&got), argmax(&want));
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 0.1, "bf16 logits after a restore are a cold run's up to rounding: {worst}");
}

#[test]
fn a_prompt_sharing_a_prefix_restores_the_shared_full_blocks() {
    let m = q4_model(KvType::Float(DType::F16));
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), &m, None);
    let doc = prompt(400, 3);
    cold_and_save(&m, &store, &doc);
    // Same document, another question after its first 230 tokens.
    let mut other = doc[..230].to_vec();
    other.extend(prompt(50, 4));
    let (got, held) = restored(&m, &store, &other);
    assert_eq!(held, 192, "the 3 full blocks both share");
    if m.step_invariant() {
        assert!(got == cold(&m, &other));
    }
    // A prompt sharing less than a block restores nothing.
    let mut short = doc[..40].to_vec();
    short.extend(prompt(100, 5));
    assert_eq!(restored(&m, &store, &short).1, 0);
}

/// A change to a file's bytes.
type Edit = Box<dyn Fn(&mut Vec<u8>)>;

/// Replaces block 0's file of `p` by `edit` of its bytes; the next restore must ignore it.
fn damage(dir: &Path, m: &Model, p: &[u32], edit: impl Fn(&mut Vec<u8>)) -> std::path::PathBuf {
    let key = block_keys(&fingerprint(m), p)[0];
    let path = Dir::open(dir).unwrap().path(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn each_kind_of_bad_file_is_ignored_removed_and_recomputed() {
    let m = q4_model(KvType::Float(DType::F16));
    let p = prompt(200, 6);
    let want = cold(&m, &p);
    // Another model's and another KV type's files, put under this model's names.
    let foreign = |other: &Model| {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = open(d.path(), other, None);
        cold_and_save(other, &s, &p);
        std::fs::read(Dir::open(d.path()).unwrap().path(&block_keys(&fingerprint(other), &p)[0])).unwrap()
    };
    let other_kv = foreign(&q4_model(KvType::Float(DType::BF16)));
    let other_model = foreign(&model(DType::F32, Some(Quant::Q8_0), KvType::Float(DType::F16)));
    let cases: Vec<(&str, Edit)> = vec![
        ("truncated", Box::new(|b| b.truncate(b.len() / 2))),
        ("checksum", Box::new(|b| *b.last_mut().unwrap() ^= 0x10)),
        ("version", Box::new(|b| b[8..12].copy_from_slice(&0u32.to_le_bytes()))),
        ("another model", Box::new(move |b| *b = other_model.clone())),
        ("fingerprint", Box::new(move |b| *b = other_kv.clone())),
    ];
    for (what, edit) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (store, warnings) = open(dir.path(), &m, None);
        cold_and_save(&m, &store, &p);
        let path = damage(dir.path(), &m, &p, edit);
        let (got, held) = restored(&m, &store, &p);
        assert_eq!(held, 0, "{what}: nothing restored past a bad first block");
        assert!(got == want, "{what}: computed instead");
        let w = warnings.lock().unwrap();
        assert!(
            w.len() == 1 && w[0].contains(&path.display().to_string()) && w[0].contains(what),
            "{what}: {w:?}"
        );
        assert!(!path.exists(), "{what}: the bad file is removed");
        assert_eq!(store.stats().bad_files, 1);
    }
}

#[test]
fn a_writer_killed_mid_write_leaves_nothing_a_later_run_uses() {
    if let Ok(dir) = std::env::var("XGEN_KVSTORE_TEST_WRITER") {
        // The child: save prompts until killed.
        let m = q4_model(KvType::Float(DType::F16));
        let (store, _) = open(Path::new(&dir), &m, None);
        for seed in 100.. {
            cold_and_save(&m, &store, &prompt(2 * KV_BLOCK, seed));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_writer_killed_mid_write_leaves_nothing_a_later_run_uses", "--nocapture"])
        .env("XGEN_KVSTORE_TEST_WRITER", dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let d = Dir::open(dir.path()).unwrap();
    let start = Instant::now();
    while d.files().len() < 6 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL, wherever it is
    child.wait().unwrap();
    let m = q4_model(KvType::Float(DType::F16));
    let block_bytes = m.kv_block_bytes().unwrap();
    let files = d.files();
    assert!(files.len() >= 6);
    for f in &files {
        let bytes = std::fs::read(&f.path).unwrap();
        let name = f.path.file_stem().unwrap().to_str().unwrap();
        let key = xgen_kvstore::Digest(std::array::from_fn(|i| {
            u8::from_str_radix(&name[2 * i..2 * i + 2], 16).unwrap()
        }));
        assert!(
            file::check(&bytes, &fingerprint(&m), &key, block_bytes).is_ok(),
            "{}: a visible file is whole",
            f.path.display()
        );
    }
    // The prompts it finished restore exactly.
    let (store, warnings) = open(dir.path(), &m, None);
    let p = prompt(2 * KV_BLOCK, 100);
    let (got, held) = restored(&m, &store, &p);
    assert_eq!(held, KV_BLOCK);
    if m.step_invariant() {
        assert!(got == cold(&m, &p));
    }
    assert!(warnings.lock().unwrap().is_empty());
}

#[test]
fn concurrent_writers_of_the_same_prompt_leave_whole_files() {
    let m = Arc::new(q4_model(KvType::Q8_0));
    let dir = tempfile::tempdir().unwrap();
    let p = prompt(5 * KV_BLOCK + 3, 7);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let (store, _) = open(dir.path(), &m, None);
                for _ in 0..3 {
                    cold_and_save(&m, &store, &p);
                }
            });
        }
    });
    let (store, warnings) = open(dir.path(), &m, None);
    let (got, held) = restored(&m, &store, &p);
    assert_eq!(held, 5 * KV_BLOCK);
    if m.step_invariant() {
        assert!(got == cold(&m, &p));
    }
    assert!(warnings.lock().unwrap().is_empty());
    assert_eq!(Dir::open(dir.path()).unwrap().files().len(), 5);
}

#[test]
fn the_budget_evicts_least_recently_used_blocks_from_the_ends_of_chains() {
    let m = q4_model(KvType::Float(DType::F16));
    let file_bytes = (file::HEADER + m.kv_block_bytes().unwrap()) as u64;
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), &m, Some(4 * file_bytes));
    let (a, b) = (prompt(3 * KV_BLOCK + 1, 8), prompt(3 * KV_BLOCK + 1, 9));
    cold_and_save(&m, &store, &a);
    std::thread::sleep(Duration::from_millis(20));
    cold_and_save(&m, &store, &b);
    assert!(store.stored_bytes() <= 4 * file_bytes);
    assert_eq!(Dir::open(dir.path()).unwrap().files().len(), 4);
    // b (newest) is whole; a lost its last blocks first, so its first block still restores.
    assert_eq!(restored(&m, &store, &b).1, 3 * KV_BLOCK);
    assert_eq!(restored(&m, &store, &a).1, KV_BLOCK);
}

#[test]
fn a_directory_that_cannot_be_written_is_a_warning_not_a_failure() {
    let m = q4_model(KvType::Float(DType::F16));
    let dir = tempfile::tempdir().unwrap();
    let (store, warnings) = open(dir.path(), &m, None);
    // The fan-out directory the first block needs is a file: every write fails.
    let p = prompt(KV_BLOCK + 1, 10);
    let key = block_keys(&fingerprint(&m), &p)[0];
    let fan = Dir::open(dir.path()).unwrap().path(&key).parent().unwrap().to_path_buf();
    std::fs::write(&fan, b"in the way").unwrap();
    let want = cold_and_save(&m, &store, &p);
    assert_eq!(warnings.lock().unwrap().len(), 1, "{:?}", warnings.lock().unwrap());
    let (got, held) = restored(&m, &store, &p);
    assert_eq!(held, 0);
    assert!(got == want || !m.step_invariant());
}
