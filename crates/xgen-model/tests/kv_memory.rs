//! A KV block pool commits memory only where blocks are written, and forking a cache copies one
//! block, not the pool: the resident set of a process holding a large, mostly unused pool stays
//! near what was written. One test in this file, so the process's peak (`VmHWM`, reset through
//! `/proc/self/clear_refs`) is its own.

use xgen_model::{BlockPool, DType, Device, KvCache, KvType, Tensor};

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_large_pool_costs_what_is_written_and_a_fork_copies_one_block() {
    let dev = Device::Cpu;
    // 20000 blocks of 64 positions, 2 heads of 64, f16: 328 MB of keys and as much of values.
    let (kv_h, hd, blocks) = (2, 64, 20_000);
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident set");
    let before = status_kb("VmRSS:");
    let pool = BlockPool::new(1, kv_h, hd, blocks, KvType::Float(DType::F16), &dev).unwrap();
    let mut a = KvCache::in_pool(&pool, 1000);
    let write = |cache: &mut KvCache, t: usize| {
        cache.prepare(t).unwrap();
        let k = Tensor::randn(0f32, 1., (1, kv_h, t, hd), &dev).unwrap();
        cache.append(0, &k, &k).unwrap();
        cache.advance(t);
    };
    write(&mut a, 100);
    // The fork shares both blocks; its first write copies the block holding positions 64..128.
    let mut b = a.fork(90, 1000).unwrap();
    write(&mut b, 5);
    assert_eq!(pool.used_blocks(), 3);
    let grew = (status_kb("VmHWM:") - before) * 1024;
    let pool_bytes = (pool.blocks() * pool.block_bytes()) as u64;
    assert!(pool_bytes > 600 << 20);
    assert!(grew < 32 << 20, "the resident set peaked {grew} bytes higher for a {pool_bytes}-byte pool");
}
