//! The cache against what was written into it: q8_0 numbers against GGUF's, positions read back
//! across scattered blocks, forks that share blocks without seeing each other's writes, and a
//! pool that gives all of a request or nothing.

use candle_core::{quantized::QTensor, Device, Tensor};

use super::*;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
    d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Writes `t` random positions into every layer of `cache` (prepared first) and returns them
/// (keys; values are keys + 1).
fn write(cache: &mut KvCache, t: usize) -> Tensor {
    cache.prepare(t).unwrap();
    let (kv_h, _, _, hd) = cache.buffers(0).0.dims();
    let k = Tensor::randn(0f32, 1., (cache.batch(), kv_h, t, hd), &Device::Cpu).unwrap();
    for layer in 0..2 {
        cache.append(layer, &k, &(&k + 1.0).unwrap()).unwrap();
    }
    cache.advance(t);
    k
}

fn pool(blocks: usize, kind: KvType) -> Arc<BlockPool> {
    BlockPool::new(2, 2, 32, blocks, kind, &Device::Cpu).unwrap()
}

#[test]
fn q8_quants_and_scales_are_ggufs() {
    let dev = Device::Cpu;
    let mut x = Tensor::randn(0f32, 2., (2, 3, 5, 64), &dev).unwrap();
    // One all-zero block.
    x = x
        .slice_assign(&[0..1, 0..1, 0..1, 32..64], &Tensor::zeros((1, 1, 1, 32), DType::F32, &dev).unwrap())
        .unwrap();
    let (q, d) = quantize_q8(&x).unwrap();
    assert_eq!((q.dims(), d.dims()), (&[2, 3, 5, 64][..], &[2, 3, 5, 2][..]));
    let want =
        QTensor::quantize(&x.reshape((30, 64)).unwrap(), candle_core::quantized::GgmlDType::Q8_0).unwrap();
    let want = want.data().unwrap();
    let q: Vec<u8> = q.flatten_all().unwrap().to_vec1().unwrap();
    let d: Vec<half::f16> = d.flatten_all().unwrap().to_vec1().unwrap();
    for (blk, bytes) in want.chunks_exact(34).enumerate() {
        assert_eq!(d[blk].to_bits(), u16::from_le_bytes([bytes[0], bytes[1]]), "scale of block {blk}");
        let ours: Vec<i8> = q[blk * 32..(blk + 1) * 32].iter().map(|&v| (v as i32 - 128) as i8).collect();
        let theirs: Vec<i8> = bytes[2..].iter().map(|&v| v as i8).collect();
        assert_eq!(ours, theirs, "quants of block {blk}");
    }
}

#[test]
fn positions_read_back_across_scattered_blocks() {
    // Two sequences growing in turn take interleaved blocks; each reads back its own values.
    for kind in [KvType::Float(DType::F32), KvType::Float(DType::BF16)] {
        let pool = pool(8, kind);
        let (mut a, mut b) = (KvCache::in_pool(&pool, 300), KvCache::in_pool(&pool, 300));
        let mut written = (Vec::new(), Vec::new());
        for t in [50, 30, 1, 70, 3] {
            written.0.push(write(&mut a, t));
            written.1.push(write(&mut b, t + 2));
        }
        assert!(a.paging().tables[0].windows(2).any(|w| w[1] != w[0] + 1), "blocks interleave");
        for (cache, parts) in [(&a, &written.0), (&b, &written.1)] {
            let want = Tensor::cat(parts, 2).unwrap();
            for layer in 0..2 {
                let (k, v) = cache.views(layer, cache.len()).unwrap();
                let tol = if kind == KvType::Float(DType::F32) { 0.0 } else { 0.04 };
                assert!(max_diff(&k, &want) <= tol, "{kind:?} keys of layer {layer}");
                assert!(max_diff(&v, &(&want + 1.0).unwrap()) <= tol * 2.0, "{kind:?} values");
            }
        }
    }
}

#[test]
fn a_fork_shares_blocks_and_never_sees_the_other_writes() {
    for kind in [KvType::Float(DType::F16), KvType::Q8_0] {
        let pool = pool(6, kind);
        let mut a = KvCache::in_pool(&pool, 400);
        write(&mut a, 100); // 2 blocks
        let before = a.views(0, 100).unwrap();
        let mut b = a.fork(70, 400).unwrap();
        assert_eq!((b.len(), pool.used_blocks()), (70, 2), "{kind:?}: shared, nothing copied");
        // b writes into the block holding positions 64..128, which a shares: it is copied first.
        let new = write(&mut b, 10);
        assert_eq!(pool.used_blocks(), 3);
        let after = a.views(0, 100).unwrap();
        assert_eq!(max_diff(&before.0, &after.0), 0.0, "{kind:?}: a's keys unchanged");
        let (bk, _) = b.views(0, 80).unwrap();
        assert_eq!(max_diff(&bk.narrow(2, 0, 70).unwrap(), &before.0.narrow(2, 0, 70).unwrap()), 0.0);
        let tol = if kind == KvType::Q8_0 { 0.05 } else { 0.01 };
        assert!(max_diff(&bk.narrow(2, 70, 10).unwrap(), &new) <= tol, "{kind:?}: b's own positions");
        drop(a);
        assert_eq!(pool.used_blocks(), 2, "b's blocks stay");
        drop(b);
        assert_eq!(pool.free_blocks(), 6);
    }
}

#[test]
fn the_pool_gives_all_blocks_or_none() {
    let pool = pool(3, KvType::Float(DType::F16));
    let mut a = KvCache::in_pool(&pool, 1000);
    match a.reserve(3 * KV_BLOCK + 1) {
        Err(ModelError::PoolDry { needed: 4, free: 3 }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(pool.free_blocks(), 3, "nothing taken");
    assert!(matches!(a.reserve(1001), Err(ModelError::CacheFull { positions: 1001, capacity: 1000 })));
    a.reserve(3 * KV_BLOCK).unwrap();
    assert_eq!((pool.free_blocks(), a.capacity(), a.size_bytes()), (0, 3 * KV_BLOCK, 3 * pool.block_bytes()));
    drop(a);
    assert_eq!(pool.free_blocks(), 3);
}

#[test]
fn q8_cache_holds_half_the_bytes_and_reads_back_within_a_step() {
    let dev = Device::Cpu;
    let f16 = KvCache::new(2, 1, 4, 64, 10, KvType::Float(DType::F16), &dev).unwrap();
    let mut q8 = KvCache::new(2, 1, 4, 64, 10, KvType::Q8_0, &dev).unwrap();
    // 64 + 4 bytes per 64 values against 128.
    assert_eq!(q8.size_bytes() * 128, f16.size_bytes() * 68);
    let k = Tensor::randn(0f32, 1., (1, 4, 3, 64), &dev).unwrap();
    let v = (&k * 3.0).unwrap();
    q8.prepare(3).unwrap();
    q8.append(1, &k, &v).unwrap();
    let (kr, vr) = q8.views(1, 3).unwrap();
    for (got, want) in [(kr, &k), (vr, &v)] {
        // Per block, d = max|x| / 127: rounding to the nearest quant errs by ≤ d/2, and storing d
        // in f16 (relative error ≤ 2^-11) by ≤ 127 · d · 2^-11 more: ≤ 0.5621 d (0.57 with margin).
        let amax = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(err <= amax / 127.0 * 0.57, "{err} vs {amax}");
    }
}
