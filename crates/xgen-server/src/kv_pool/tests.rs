//! The pool's bookkeeping on the tiny fixture model: blocks never exceed the pool, prefixes are
//! forked and reused, entries are evicted oldest first, a running cache takes a block at a time.

use std::path::PathBuf;

use xgen_model::{DType, Device, KvCache, Model};

use super::{KvPool, PrefixCache, Refused, Reuse};

fn model() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-xgen-8k-bin");
    Model::load(&dir, DType::F32, &Device::Cpu, &mut |_| {}).unwrap()
}

/// A pool of `blocks` blocks.
fn pool(model: &Model, blocks: usize, prefix: PrefixCache) -> KvPool {
    let bytes = model.kv_block_bytes().unwrap();
    KvPool::new(model, Some(blocks * bytes + bytes / 2), 4, prefix, None).unwrap()
}

/// Reserves a cache for `prompt` and reads what the prefix cache did not give, as the engine does.
fn run(model: &Model, pool: &mut KvPool, prompt: &[u32], limit: usize) -> (KvCache, usize) {
    let r = pool.reserve(prompt, limit, Reuse::LongestPrefix).unwrap_or_else(|e| panic!("{e:?}"));
    let mut cache = r.cache;
    let ids = model.ids_tensor(&prompt[r.reused..]).unwrap();
    model.forward_hidden(&ids, &mut cache).unwrap();
    (cache, r.reused)
}

fn tokens(from: u32, n: usize) -> Vec<u32> {
    (from..from + n as u32).collect()
}

#[test]
fn the_pool_bounds_every_cache_and_refuses_what_never_fits() {
    let model = model();
    let b = model.kv_block_bytes().unwrap();
    let mut pool = pool(&model, 4, PrefixCache::Off);
    assert_eq!((pool.budget(), pool.blocks()), (4 * b, (4, 0)), "rounded down to whole blocks");
    let a = pool.reserve(&tokens(100, 100), 150, Reuse::LongestPrefix).unwrap();
    assert_eq!(pool.held(), 2 * b, "the prompt's blocks, not max_tokens'");
    assert!(matches!(pool.reserve(&tokens(300, 130), 200, Reuse::LongestPrefix), Err(Refused::Busy)));
    assert_eq!(pool.held(), 2 * b, "a refused request takes nothing");
    let c = pool.reserve(&tokens(300, 60), 64, Reuse::LongestPrefix).unwrap();
    assert_eq!(pool.blocks(), (4, 3));
    assert!(pool.refuse(256).is_none());
    assert!(
        matches!(pool.refuse(257), Some(Refused::TooLarge { needed, budget }) if needed == 5 * b && budget == 4 * b)
    );
    pool.release(1, a.cache, &tokens(100, 100));
    assert_eq!((pool.held(), pool.entries()), (b, 0), "prefix caching off: freed");
    drop(c);
    assert_eq!(pool.held(), 0);
    let small = KvPool::new(&model, Some(b - 1), 4, PrefixCache::On, None).err().expect("less than a block");
    assert!(small.contains("less than one block"), "{small}");
}

#[test]
fn a_shared_prefix_is_forked_and_entries_are_evicted_oldest_first() {
    let model = model();
    let mut pool = pool(&model, 5, PrefixCache::On);
    let doc = tokens(100, 100);
    let (cache, reused) = run(&model, &mut pool, &doc, 200);
    assert_eq!(reused, 0);
    pool.release(2, cache, &doc);
    assert_eq!((pool.entries(), pool.blocks().1), (1, 2));
    // The same document and a question: its 100 positions are reused; the block holding
    // positions 64..128, shared with the entry, is copied before the question is written.
    let asked: Vec<u32> = doc.iter().copied().chain([7, 8, 9]).collect();
    let (cache, reused) = run(&model, &mut pool, &asked, 200);
    assert_eq!((reused, cache.len(), pool.blocks().1), (100, 103, 3));
    pool.release(3, cache, &asked);
    // The identical prompt again: all but its last token come from the cache.
    let (cache, reused) = run(&model, &mut pool, &asked, 300);
    assert_eq!(reused, 102);
    drop(cache);
    assert_eq!(pool.entries(), 2);
    // A prompt sharing nothing that needs every block: both entries go.
    let other = tokens(1000, 300);
    let (cache, reused) = run(&model, &mut pool, &other, 320);
    assert_eq!((reused, pool.entries(), pool.blocks().1), (0, 0, 5));
    drop(cache);
    // Two entries (1 block, then the document's 2); a prompt of 3 blocks evicts the older.
    let first = tokens(1500, 60);
    let (cache, _) = run(&model, &mut pool, &first, 64);
    pool.release(4, cache, &first);
    let (cache, _) = run(&model, &mut pool, &doc, 128);
    pool.release(5, cache, &doc);
    assert_eq!((pool.entries(), pool.blocks().1), (2, 3));
    let (_c, reused) = run(&model, &mut pool, &tokens(2000, 180), 192);
    assert_eq!((reused, pool.entries()), (0, 1));
    let (_d, reused) = run(&model, &mut pool, &doc, 128);
    assert_eq!(reused, 99, "the newer entry (the document) survived");
}

#[test]
fn a_running_cache_takes_a_block_at_a_time_evicting_entries_first() {
    let model = model();
    let mut pool = pool(&model, 3, PrefixCache::On);
    let (mut a, _) = run(&model, &mut pool, &tokens(100, 60), 192);
    assert_eq!(pool.blocks().1, 1);
    pool.ready(&mut a, 65).unwrap();
    assert_eq!(pool.blocks().1, 2);
    let (entry, _) = run(&model, &mut pool, &tokens(900, 10), 20);
    pool.release(6, entry, &tokens(900, 10));
    assert_eq!((pool.entries(), pool.blocks().1), (1, 3));
    pool.ready(&mut a, 129).unwrap();
    assert_eq!((pool.entries(), pool.blocks().1, a.held_blocks()), (0, 3, 3), "the entry made room");
    assert!(
        matches!(pool.reserve(&tokens(50, 10), 64, Reuse::LongestPrefix), Err(Refused::Busy)),
        "running caches hold every block"
    );
    assert!(matches!(pool.ready(&mut a, 193), Err(Refused::Model(_))), "past its limit");
    assert_eq!(a.held_blocks(), 3, "a refused block takes nothing");
}

#[test]
fn a_running_sequences_full_blocks_serve_a_prompt_sharing_them_and_outlive_its_end() {
    let model = model();
    let mut pool = pool(&model, 12, PrefixCache::On);
    let doc = tokens(100, 200);
    // Sequence 1 has read 150 of its 200 prompt tokens: 2 full blocks are published.
    let r = pool.reserve(&doc, 300, Reuse::LongestPrefix).unwrap();
    let mut cache = r.cache;
    model.forward_hidden(&model.ids_tensor(&doc[..150]).unwrap(), &mut cache).unwrap();
    pool.publish(1, &cache, &doc[..150]);
    pool.publish(1, &cache, &doc[..150]); // again: still one entry
    assert_eq!(pool.entries(), 1);
    let used = pool.blocks().1;
    // Another prompt with the same document is served the 128 positions while 1 still runs,
    // sharing its blocks (no copy: they are full and 1 writes past them).
    let (other, reused) = run(&model, &mut pool, &doc, 300);
    assert_eq!(reused, 128);
    model.forward_hidden(&model.ids_tensor(&doc[150..]).unwrap(), &mut cache).unwrap();
    assert_eq!(pool.blocks().1, used + 2, "the other prompt's own 2 blocks only");
    drop(other);
    // Cancelled after 200 positions: its whole cache replaces what it published.
    pool.release(1, cache, &doc);
    assert_eq!(pool.entries(), 1);
    let (_, reused) = run(&model, &mut pool, &doc, 300);
    assert_eq!(reused, 199);
}

#[test]
fn a_scored_prompt_reuses_nothing_and_its_cache_still_serves_later_prompts() {
    let model = model();
    let mut pool = pool(&model, 12, PrefixCache::On);
    let doc = tokens(100, 200);
    let (cache, _) = run(&model, &mut pool, &doc, 300);
    pool.release(1, cache, &doc);
    let r = pool.reserve(&doc, 300, Reuse::Nothing).unwrap();
    assert_eq!((r.reused, r.restored, r.cache.len()), (0, 0, 0), "every position is computed");
    let mut cache = r.cache;
    model.forward_hidden(&model.ids_tensor(&doc).unwrap(), &mut cache).unwrap();
    pool.release(2, cache, &doc);
    let (_, reused) = run(&model, &mut pool, &doc, 300);
    assert_eq!(reused, 199);
}
