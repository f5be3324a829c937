//! Causal attention of a prompt chunk (many query rows) over the KV cache, flash-attention style:
//! per head, blocks of [`BQ`] queries against blocks of [`BK`] cached keys with an online softmax
//! (running max `m` and sum `l` per row; the output rows are rescaled when a block raises the
//! max), so no `[t, s]` score matrix ever exists: at most `BQ × BK` f32 scores per thread.
//!
//! Per (sequence, head) task the cached keys `0..past + t` (found through the block tables,
//! [`Paging`]) are widened once to f32 (from f32, f16,
//! bf16 or q8_0 storage), keys transposed in blocks (`[s / BK, hd, BK]`, so a score tile is `R`
//! query rows × 64 keys of FMAs with broadcast queries), values as rows `[s, hd]`; every query
//! block of the chunk then reads them. Blocks that lie past a block's last query are skipped, and
//! only blocks crossing the diagonal (or the padding) are masked.
//!
//! The micro-kernels (scores tile, softmax row, `P·V` tile) come in an AVX-512 version
//! ([`x86`]), an AVX2 one ([`avx2`]) and a portable one with the same loops; [`Path`] picks one
//! at run time and the tests force each against `attention::causal_attention`, the f32 reference.
//!
//! Memory per task: `2 · s · hd` f32 (8 MB at 8K positions and hd 128), one task per thread.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::paging::Paging;
use crate::{error::Result, kv_cache::KvBuffer};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Query rows per block.
pub const BQ: usize = 64;
/// Cached keys per block (four 16-lane vectors of scores per query row).
pub const BK: usize = 64;

/// Which micro-kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// AVX-512F (head_dim 64 or 128).
    Avx512,
    /// AVX2 with FMA (head_dim 64 or 128).
    Avx2,
    /// Plain Rust loops, any CPU and head_dim.
    Portable,
}

impl Path {
    /// The fastest path this CPU runs for `hd`.
    pub fn detect(hd: usize) -> Self {
        [Self::Avx512, Self::Avx2].into_iter().find(|p| p.runs(hd)).unwrap_or(Self::Portable)
    }

    /// Whether this CPU can run the path for head_dim `hd`.
    pub fn runs(self, hd: usize) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => x86::applies(hd),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2::applies(hd),
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx512 | Self::Avx2 => false,
        }
    }
}

/// `q` `[b, h, t, hd]` (queries at cache slots `past..past + t`) against slots `0..past + t` of
/// `keys`/`values` (`[blocks, kv_h, block, ..]`, written already, sequence `i`'s slots where
/// `paging` says) -> `[b, h, t, hd]` f32: causal, and
/// row `i` never attends to its first `padding[i]` slots (a padding query, which sees only
/// padding, gets their plain mean, as the reference's finite pad score gives). `None` when not
/// applicable (not on the CPU, or a storage this kernel does not read).
pub fn prompt_attention(
    q: &Tensor,
    keys: &KvBuffer,
    values: &KvBuffer,
    paging: &Paging,
    past: usize,
    padding: &[usize],
) -> Result<Option<Tensor>> {
    prompt_attention_on(Path::detect(q.dim(3)?), q, keys, values, paging, past, padding)
}

/// [`prompt_attention`] on a chosen [`Path`] (`None` also when this CPU cannot run it).
pub fn prompt_attention_on(
    path: Path,
    q: &Tensor,
    keys: &KvBuffer,
    values: &KvBuffer,
    paging: &Paging,
    past: usize,
    padding: &[usize],
) -> Result<Option<Tensor>> {
    let (b, h, t, hd) = q.dims4()?;
    if !matches!(q.device(), Device::Cpu) || !path.runs(hd) || padding.len() != b {
        return Ok(None);
    }
    let guards = [keys, values].map(Guards::new);
    let (Some(kg), Some(vg)) = (&guards[0], &guards[1]) else { return Ok(None) };
    let (Some(k), Some(v)) = (kg.rows(), vg.rows()) else { return Ok(None) };
    let kv_h = paging.kv_h;
    if h % kv_h != 0 || !paging.reads(keys.rows(), b, past + t) || values.dims() != keys.dims() {
        return Ok(None);
    }
    let scale = 1.0 / (hd as f64).sqrt();
    // [b, h, t, hd], pre-scaled by 1/√hd.
    let qs: Vec<f32> = (q.to_dtype(DType::F32)? * scale)?.flatten_all()?.to_vec1()?;
    let shape = Shape { hd, t, past };
    let mut out = vec![0f32; b * h * t * hd];
    out.par_chunks_mut(t * hd).zip(qs.par_chunks(t * hd)).enumerate().for_each(|(bh, (o, q))| {
        let (bi, head) = (bh / h, bh % h);
        let at = |j: usize| paging.row(bi, head / (h / kv_h), j);
        one_head(path, &shape, q, (&k, &v), at, padding[bi], o);
    });
    Ok(Some(Tensor::from_vec(out, (b, h, t, hd), q.device())?))
}

struct Shape {
    hd: usize,
    /// Query rows of the chunk.
    t: usize,
    /// Slots cached before the chunk.
    past: usize,
}

/// One head: `q` `[t, hd]` (scaled) over the key/value head whose slot `j` is row `at(j)` of `k`
/// and `v`, its first `pad` slots padding -> `o` `[t, hd]`.
fn one_head(
    path: Path,
    s: &Shape,
    q: &[f32],
    (k, v): (&Rows, &Rows),
    at: impl Fn(usize) -> usize,
    pad: usize,
    o: &mut [f32],
) {
    let (hd, len) = (s.hd, s.past + s.t);
    let blocks = len.div_ceil(BK);
    // Keys [blocks, hd, BK] (transposed per block), values [blocks · BK, hd]; zero past `len`.
    let mut kt = vec![0f32; blocks * hd * BK];
    let mut vs = vec![0f32; blocks * BK * hd];
    let mut row = vec![0f32; hd];
    for j in 0..len {
        k.widen(at(j), hd, &mut row);
        let tile = &mut kt[j / BK * hd * BK + j % BK..];
        for (d, &x) in row.iter().enumerate() {
            tile[d * BK] = x;
        }
        v.widen(at(j), hd, &mut vs[j * hd..(j + 1) * hd]);
    }
    let mut scores = vec![0f32; BQ * BK]; // [rows, BK]
    for (qb, o) in o.chunks_mut(BQ * hd).enumerate() {
        let rows = o.len() / hd;
        let first = s.past + qb * BQ; // slot of the block's first query
        let q = &q[qb * BQ * hd..qb * BQ * hd + rows * hd];
        let mut m = [f32::NEG_INFINITY; BQ];
        let mut l = [0f32; BQ];
        o.fill(0.0);
        // A padding query attends to slots 0..=its own; the others from `pad` on.
        let lo = if first < pad { 0 } else { pad };
        for kb in (lo / BK * BK..first + rows).step_by(BK) {
            let n = BK.min(len - kb);
            let scores = &mut scores[..rows * BK];
            path.scores(q, hd, &kt[kb * hd..(kb + BK) * hd], scores);
            if kb + BK > first + 1 || kb < pad {
                mask(scores, kb, first, pad);
            }
            for (r, srow) in scores.chunks_exact_mut(BK).enumerate() {
                let alpha = path.softmax(srow, &mut m[r], &mut l[r]);
                if alpha != 1.0 {
                    o[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= alpha);
                }
            }
            path.accumulate(scores, &vs[kb * hd..(kb + n) * hd], hd, o);
        }
        for (r, orow) in o.chunks_exact_mut(hd).enumerate() {
            let inv = 1.0 / l[r];
            orow.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Scores of keys `kb..kb + BK` for query rows at slots `first..`: -inf where a row may not look
/// (a later slot, or padding for a real query), 0 for a padding query's visible slots (uniform,
/// as the reference's equal pad scores give).
fn mask(scores: &mut [f32], kb: usize, first: usize, pad: usize) {
    for (r, srow) in scores.chunks_exact_mut(BK).enumerate() {
        let slot = first + r;
        let padding_row = slot < pad;
        let lo = if padding_row { 0 } else { pad };
        for (j, x) in srow.iter_mut().enumerate() {
            let key = kb + j;
            if key < lo || key > slot {
                *x = f32::NEG_INFINITY;
            } else if padding_row {
                *x = 0.0;
            }
        }
    }
}

impl Path {
    /// `s` `[rows, BK]` = `q` `[rows, hd]` · `kt` `[hd, BK]`.
    fn scores(self, q: &[f32], hd: usize, kt: &[f32], s: &mut [f32]) {
        debug_assert!(q.len() / hd == s.len() / BK && kt.len() == hd * BK);
        match self {
            // SAFETY: `runs` checked AVX-512F or AVX2 + FMA (every constructor of a running path goes through
            // `prompt_attention_on`); the shapes are asserted above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::scores(q, hd, kt, s) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::scores(q, hd, kt, s) },
            _ => portable_scores(q, hd, kt, s),
        }
    }

    /// One row's online-softmax step over a block of scores (-inf = not visible): `s` becomes the
    /// weights `e^(s - m_new)`, `l` and `m` are updated; returns the factor `e^(m - m_new)` the
    /// row's output must be scaled by.
    fn softmax(self, s: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
        match self {
            // SAFETY: as in `scores`; `s` holds BK values.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::softmax(s, m, l) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::softmax(s, m, l) },
            _ => portable_softmax(s, m, l),
        }
    }

    /// `o` `[rows, hd]` += `p` `[rows, BK]` · `v` `[n, hd]` (weights past `n` are 0).
    fn accumulate(self, p: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
        debug_assert!(p.len() / BK == o.len() / hd && v.len() <= BK * hd);
        match self {
            // SAFETY: as in `scores`; shapes asserted above.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::accumulate(p, v, hd, o) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::accumulate(p, v, hd, o) },
            _ => portable_accumulate(p, v, hd, o),
        }
    }
}

fn portable_scores(q: &[f32], hd: usize, kt: &[f32], s: &mut [f32]) {
    for (qrow, srow) in q.chunks_exact(hd).zip(s.chunks_exact_mut(BK)) {
        srow.fill(0.0);
        for (&x, krow) in qrow.iter().zip(kt.chunks_exact(BK)) {
            srow.iter_mut().zip(krow).for_each(|(s, &k)| *s += x * k);
        }
    }
}

fn portable_softmax(s: &mut [f32], m: &mut f32, l: &mut f32) -> f32 {
    let m_new = s.iter().copied().fold(*m, f32::max);
    if m_new == f32::NEG_INFINITY {
        s.fill(0.0);
        return 1.0;
    }
    let alpha = (*m - m_new).exp(); // 0 for the first visible block (m = -inf)
    let mut sum = 0f32;
    for x in s.iter_mut() {
        *x = if *x == f32::NEG_INFINITY { 0.0 } else { (*x - m_new).exp() };
        sum += *x;
    }
    *l = *l * alpha + sum;
    *m = m_new;
    alpha
}

fn portable_accumulate(p: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
    for (prow, orow) in p.chunks_exact(BK).zip(o.chunks_exact_mut(hd)) {
        for (&w, vrow) in prow.iter().zip(v.chunks_exact(hd)) {
            if w != 0.0 {
                orow.iter_mut().zip(vrow).for_each(|(o, &x)| *o += w * x);
            }
        }
    }
}

/// A read lock on a tensor's storage.
type Lock<'a> = Box<dyn std::ops::Deref<Target = Storage> + 'a>;

/// The storage locks of one cache buffer, held while its rows are read.
struct Guards<'a> {
    data: Lock<'a>,
    offset: usize,
    scales: Option<(Lock<'a>, usize)>,
}

impl<'a> Guards<'a> {
    fn new(buf: &'a KvBuffer) -> Option<Self> {
        let (t, scales) = match buf {
            KvBuffer::Float(t) => (t, None),
            KvBuffer::Q8_0 { q, d } => (q, Some(d)),
        };
        if !t.is_contiguous() || scales.is_some_and(|d| !d.is_contiguous()) {
            return None;
        }
        let (data, layout) = t.storage_and_layout();
        let (data, offset): (Lock, _) = (Box::new(data), layout.start_offset());
        let scales = scales.map(|d| {
            let (s, l) = d.storage_and_layout();
            (Box::new(s) as Lock, l.start_offset())
        });
        Some(Self { data, offset, scales })
    }

    fn rows(&self) -> Option<Rows<'_>> {
        let Storage::Cpu(data) = &**self.data else { return None };
        let o = self.offset;
        Some(match (data, &self.scales) {
            (CpuStorage::F32(x), None) => Rows::F32(&x[o..]),
            (CpuStorage::F16(x), None) => Rows::F16(&x[o..]),
            (CpuStorage::BF16(x), None) => Rows::Bf16(&x[o..]),
            (CpuStorage::U8(q), Some((d, od))) => match &***d {
                Storage::Cpu(CpuStorage::F16(d)) => Rows::Q8 { q: &q[o..], d: &d[*od..] },
                _ => return None,
            },
            _ => return None,
        })
    }
}

/// Cached rows (`[.., hd]` each) in their stored form.
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    /// Quants `+ 128` and one f16 scale per 32 values.
    Q8 {
        q: &'a [u8],
        d: &'a [f16],
    },
}

impl Rows<'_> {
    /// Row `r` as f32.
    fn widen(&self, r: usize, hd: usize, out: &mut [f32]) {
        let at = r * hd..(r + 1) * hd;
        match self {
            Self::F32(x) => out.copy_from_slice(&x[at]),
            Self::F16(x) => x[at].convert_to_f32_slice(out),
            Self::Bf16(x) => x[at].convert_to_f32_slice(out),
            Self::Q8 { q, d } => {
                let d = &d[r * hd / 32..(r + 1) * hd / 32];
                for ((o, q), d) in out.chunks_exact_mut(32).zip(q[at].chunks_exact(32)).zip(d) {
                    let d = d.to_f32();
                    o.iter_mut().zip(q).for_each(|(o, &q)| *o = (q as i32 - 128) as f32 * d);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
