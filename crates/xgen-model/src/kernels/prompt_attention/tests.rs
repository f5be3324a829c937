//! Both paths against `attention::causal_attention` (the f32 reference) on the cache's own values:
//! chunks not a multiple of the blocks, chunks after the first, positions past 4K, grouped heads,
//! left padding, and every storage the cache offers.

use candle_core::{DType, Device, Tensor};

use super::{prompt_attention_on, Path};
use crate::{
    attention::grouped_causal_attention,
    kernels::paging::{scatter_buffer, Paging},
    kv_cache::KvBuffer,
    KvType,
};

/// `(b, h, kv_h, hd, past, t, padding)`.
type Case = (usize, usize, usize, usize, usize, usize, Vec<usize>);

fn cases() -> Vec<Case> {
    vec![
        (1, 4, 4, 128, 0, 70, vec![0]),
        (1, 2, 1, 64, 130, 67, vec![0]),
        (2, 4, 2, 64, 0, 40, vec![5, 0]),
        (2, 2, 2, 128, 10, 130, vec![0, 75]),
        (1, 2, 2, 128, 4100, 65, vec![0]),
        (1, 2, 2, 20, 3, 9, vec![0]),
        (1, 1, 1, 64, 0, 2, vec![0]),
    ]
}

/// `causal_attention` over slots `0..past + t` of `k`/`v`, each key/value head shared by
/// `h / kv_h` query heads.
fn reference(q: &Tensor, k: &KvBuffer, v: &KvBuffer, past: usize, padding: &[usize]) -> Tensor {
    let len = past + q.dim(2).unwrap();
    let f32s = |x: &KvBuffer| x.view(len).unwrap().to_dtype(DType::F32).unwrap();
    grouped_causal_attention(q, &f32s(k), &f32s(v), past, padding).unwrap()
}

fn buffer(kind: KvType, shape: (usize, usize, usize, usize), scale: f64) -> KvBuffer {
    let dev = Device::Cpu;
    let buf = KvBuffer::zeros(kind, shape, &dev).unwrap();
    buf.write(&Tensor::randn(0f32, scale as f32, shape, &dev).unwrap(), 0).unwrap();
    buf
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn equals_the_reference_attention_on_every_path_and_storage() {
    let dev = Device::Cpu;
    let kinds =
        [KvType::Float(DType::F32), KvType::Float(DType::F16), KvType::Float(DType::BF16), KvType::Q8_0];
    let mut ran = 0;
    for path in [Path::Avx512, Path::Avx2, Path::Portable] {
        for (b, h, kv_h, hd, past, t, padding) in cases() {
            if !path.runs(hd) {
                continue;
            }
            for kind in kinds {
                if kind == KvType::Q8_0 && hd % 32 != 0 {
                    continue;
                }
                // Capacity beyond the chunk: slots past it hold values that must not be read.
                let shape = (b, kv_h, past + t + 5, hd);
                let (k, v) = (buffer(kind, shape, 1.0), buffer(kind, shape, 1.0));
                let q = Tensor::randn(0f32, 1., (b, h, t, hd), &dev).unwrap();
                let want = reference(&q, &k, &v, past, &padding);
                // As one block per sequence, and scattered over blocks of 32 positions.
                let tables = Paging::identity(b);
                let contiguous = Paging::contiguous(&tables, shape.2, kv_h);
                let ((ks, tables32, slots), (vs, _, _)) = (scatter_buffer(&k, 32), scatter_buffer(&v, 32));
                let paged = Paging::pooled(&tables32, 32, slots, kv_h);
                for (k, v, paging) in [(&k, &v, contiguous), (&ks, &vs, paged)] {
                    let got = prompt_attention_on(path, &q, k, v, &paging, past, &padding)
                        .unwrap()
                        .expect("applies");
                    let err = max_diff(&got, &want);
                    let block = paging.block;
                    assert!(
                        err < 1e-4,
                        "{path:?} {kind:?} b{b} h{h}/{kv_h} hd{hd} past {past} t {t} block {block}: {err}"
                    );
                    ran += 1;
                }
            }
        }
    }
    // The portable path on every case and storage (54), each SIMD one on those of head_dim 64
    // and 128 (48) where the CPU has it.
    let least = 54 + [Path::Avx512, Path::Avx2].iter().filter(|p| p.runs(64)).count() * 48;
    assert!(ran >= least, "{ran} cases ran");
}

#[test]
fn scores_that_keep_rising_rescale_what_came_before() {
    // Keys grow along the positions, so every block raises each row's max (earlier weights and
    // outputs are rescaled every block); and the reverse, where no block after the first does.
    let dev = Device::Cpu;
    let (h, hd, past, t) = (2, 128, 630, 70);
    let len = past + t;
    let q = (Tensor::ones((1, h, t, hd), DType::F32, &dev).unwrap() * 0.3).unwrap();
    let ramp = Tensor::arange(0f32, len as f32, &dev).unwrap().affine(4.0 / len as f64, 0.0).unwrap();
    let ramp = ramp.reshape((1, 1, len, 1)).unwrap();
    for ramp in [ramp.clone(), ramp.affine(-1.0, 4.0).unwrap()] {
        let k = Tensor::randn(0f32, 0.01, (1, h, len, hd), &dev).unwrap().broadcast_add(&ramp).unwrap();
        let v = Tensor::randn(0f32, 1., (1, h, len, hd), &dev).unwrap();
        let (k, v) = (KvBuffer::Float(k), KvBuffer::Float(v));
        let tables = Paging::identity(1);
        let paging = Paging::contiguous(&tables, len, h);
        for path in [Path::Avx512, Path::Avx2, Path::Portable].into_iter().filter(|p| p.runs(hd)) {
            let got = prompt_attention_on(path, &q, &k, &v, &paging, past, &[0]).unwrap().expect("applies");
            let err = max_diff(&got, &reference(&q, &k, &v, past, &[0]));
            assert!(err < 1e-4, "{path:?}: {err}");
        }
    }
}

#[test]
fn declines_what_it_cannot_read() {
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (1, 2, 3, 64), &dev).unwrap();
    let k = KvBuffer::Float(Tensor::zeros((1, 2, 2, 64), DType::F32, &dev).unwrap());
    let tables = Paging::identity(1);
    let paging = Paging::contiguous(&tables, 2, 2);
    // Three queries after one cached slot need four slots; the buffer has two.
    assert!(prompt_attention_on(Path::Portable, &q, &k, &k, &paging, 1, &[0]).unwrap().is_none());
    // Three query heads cannot share two key/value heads.
    let q3 = Tensor::randn(0f32, 1., (1, 3, 1, 64), &dev).unwrap();
    assert!(prompt_attention_on(Path::Portable, &q3, &k, &k, &paging, 0, &[0]).unwrap().is_none());
    // A table naming a block the buffer does not have.
    let (far, one) = (vec![vec![5]], Tensor::randn(0f32, 1., (1, 2, 1, 64), &dev).unwrap());
    let paging = Paging::contiguous(&far, 2, 2);
    assert!(prompt_attention_on(Path::Portable, &one, &k, &k, &paging, 0, &[0]).unwrap().is_none());
}
