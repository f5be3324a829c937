//! The pool's bookkeeping on the tiny fixture model: the budget is never exceeded, prefixes are
//! found and reused, entries are evicted oldest first.

use std::path::PathBuf;

use xgen_model::{DType, Device, Model};

use super::{KvPool, PrefixCache, Refused};

fn model() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin");
    Model::load(&dir, DType::F32, &Device::Cpu, &mut |_| {}).unwrap()
}

/// Writes `tokens` into a reserved cache as a forward pass would (positions only matter here).
fn run(model: &Model, pool: &mut KvPool, prompt: &[u32], capacity: usize) -> (xgen_model::KvCache, usize) {
    let r = pool.reserve(model, prompt, capacity).unwrap_or_else(|e| panic!("{e:?}"));
    let mut cache = r.cache;
    let ids = model.ids_tensor(&prompt[r.reused..]).unwrap();
    model.forward_hidden(&ids, &mut cache).unwrap();
    (cache, r.reused)
}

#[test]
fn the_budget_bounds_every_cache_and_a_too_large_request_is_refused() {
    let model = model();
    let probe = KvPool::new(&model, None, PrefixCache::Off).unwrap();
    let per = probe.bytes_for(1);
    let mut pool = KvPool::new(&model, Some(per * 100), PrefixCache::Off).unwrap();
    let a = pool.reserve(&model, &[1, 2, 3], 60).unwrap();
    assert_eq!(pool.held(), per * 60);
    assert!(matches!(pool.reserve(&model, &[4, 5], 50), Err(Refused::Busy)));
    let b = pool.reserve(&model, &[4, 5], 40).unwrap();
    assert_eq!(pool.held(), per * 100);
    assert!(
        matches!(pool.reserve(&model, &[6], 101), Err(Refused::TooLarge { needed, budget }) if needed == per * 101 && budget == per * 100)
    );
    pool.release(a.cache, &[1, 2, 3]);
    assert_eq!((pool.held(), pool.entries()), (per * 40, 0), "prefix caching off: freed");
    pool.forget(&b.cache);
    assert_eq!(pool.held(), 0);
}

#[test]
fn a_shared_prefix_is_reused_and_entries_are_evicted_oldest_first() {
    let model = model();
    let per = KvPool::new(&model, None, PrefixCache::Off).unwrap().bytes_for(1);
    let mut pool = KvPool::new(&model, Some(per * 64), PrefixCache::On).unwrap();
    let doc: Vec<u32> = (100..120).collect();
    let (cache, reused) = run(&model, &mut pool, &doc, 24);
    assert_eq!(reused, 0);
    pool.release(cache, &doc);
    assert_eq!((pool.entries(), pool.held()), (1, per * 24));
    // The same document and a question: the document's 20 positions are reused, in place.
    let asked: Vec<u32> = doc.iter().copied().chain([7, 8, 9]).collect();
    let (cache, reused) = run(&model, &mut pool, &asked, 24);
    assert_eq!((reused, cache.len(), pool.entries()), (20, 23, 0));
    pool.release(cache, &asked);
    // The identical prompt again: all but its last token come from the cache.
    let (cache, reused) = run(&model, &mut pool, &asked, 40);
    assert_eq!((reused, cache.capacity()), (22, 40), "copied into a larger cache");
    pool.release(cache, &asked);
    // Another prompt sharing nothing: it needs room, so the entry goes.
    let other: Vec<u32> = (500..510).collect();
    let (cache, reused) = run(&model, &mut pool, &other, 30);
    assert_eq!((reused, pool.entries()), (0, 0));
    assert!(pool.held() <= per * 64);
    pool.release(cache, &other);
    // Two entries; a third prompt that fits beside one evicts the older.
    let (cache, _) = run(&model, &mut pool, &doc, 20);
    pool.release(cache, &doc);
    assert_eq!(pool.entries(), 2);
    let (_c, reused) = run(&model, &mut pool, &[900, 901], 20);
    assert_eq!((reused, pool.entries()), (0, 1));
    let (_d, reused) = run(&model, &mut pool, &doc, 21);
    assert_eq!(reused, 19, "the newer entry (the document) survived");
}

#[test]
fn a_cache_grows_within_the_budget_and_is_refused_room_beyond_it() {
    let model = model();
    let per = KvPool::new(&model, None, PrefixCache::Off).unwrap().bytes_for(1);
    let mut pool = KvPool::new(&model, Some(per * 100), PrefixCache::On).unwrap();
    let (cache, _) = run(&model, &mut pool, &[1, 2, 3], 10);
    assert!(pool.refuse(100).is_none() && matches!(pool.refuse(101), Some(Refused::TooLarge { .. })));
    // 10 -> 40 needs 50 during the copy: fits; 40 -> 70 needs 110: does not.
    let grown = pool.grow(&cache, 40).unwrap();
    drop(cache);
    assert_eq!((grown.len(), grown.capacity(), pool.held()), (3, 40, per * 40));
    assert!(matches!(pool.grow(&grown, 70), Err(Refused::Busy)));
    assert_eq!(pool.held(), per * 40, "a refused growth takes nothing");
    // A prefix entry is evicted to let a running cache grow.
    let other = pool.reserve(&model, &[9, 9], 20).unwrap();
    pool.release(other.cache, &[9, 9]);
    assert_eq!((pool.entries(), pool.held()), (0, per * 40), "nothing written: no entry kept");
    let (cache, _) = run(&model, &mut pool, &[9, 9], 20);
    pool.release(cache, &[9, 9]);
    assert_eq!(pool.entries(), 1);
    let grown = pool.grow(&grown, 55).unwrap();
    assert_eq!((pool.entries(), pool.held()), (0, per * 55));
    pool.forget(&grown);
    assert_eq!(pool.held(), 0);
}
