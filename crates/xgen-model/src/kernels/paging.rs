//! Where a cached position lives in a paged KV buffer: the block tables the attention kernels read.
//!
//! A pool's KV buffer is `[kv_h, blocks, block, ..]`: block `i` holds `block` consecutive
//! positions of every key/value head. A sequence's positions are spread over the blocks its table
//! lists, in order, so sequences grow a block at a time without copies and can share the blocks
//! of a common prefix. A plain `[b, kv_h, capacity, ..]` buffer is the case of one block of
//! `capacity` positions per sequence ([`Paging::contiguous`]); the kernels read both through
//! [`Paging::row`].

/// The block tables of a batch of sequences over one buffer, and the buffer's strides.
#[derive(Clone, Copy, Debug)]
pub struct Paging<'a> {
    /// Per sequence (batch row): the blocks holding its positions, in order.
    pub tables: &'a [Vec<u32>],
    /// Positions per block.
    pub block: usize,
    /// Rows from a block to the next one, in the same head.
    pub block_stride: usize,
    /// Rows from a head to the next one, in the same block.
    pub head_stride: usize,
    /// Key/value heads.
    pub kv_h: usize,
}

impl<'a> Paging<'a> {
    /// Tables over a pool `[kv_h, blocks, block, ..]`: each head's blocks side by side, so a
    /// sequence whose blocks were handed out in order reads each head as one stream, as a
    /// contiguous cache does (with blocks as the outer dimension every block is a jump).
    pub fn pooled(tables: &'a [Vec<u32>], block: usize, blocks: usize, kv_h: usize) -> Self {
        Self { tables, block, block_stride: block, head_stride: blocks * block, kv_h }
    }

    /// Tables for a plain `[b, kv_h, capacity, ..]` buffer: sequence `i` is block `i` (the
    /// kernels' tests read such buffers).
    #[cfg(test)]
    pub fn contiguous(tables: &'a [Vec<u32>], capacity: usize, kv_h: usize) -> Self {
        Self { tables, block: capacity, block_stride: kv_h * capacity, head_stride: capacity, kv_h }
    }

    /// The identity tables of [`Paging::contiguous`] for `b` sequences.
    #[cfg(test)]
    pub fn identity(b: usize) -> Vec<Vec<u32>> {
        (0..b as u32).map(|i| vec![i]).collect()
    }

    /// Flat row (over the buffer's rows) of sequence `b`'s position `j` in head `g`.
    #[inline]
    pub fn row(&self, b: usize, g: usize, j: usize) -> usize {
        self.tables[b][j / self.block] as usize * self.block_stride + g * self.head_stride + j % self.block
    }

    /// Whether a buffer of `rows` rows holds the first `len` positions of sequences `0..b` where
    /// these tables say (the kernels' precondition for unchecked reads).
    pub fn reads(&self, rows: usize, b: usize, len: usize) -> bool {
        let last =
            |id: u32| id as usize * self.block_stride + (self.kv_h - 1) * self.head_stride + self.block;
        let held = |t: &Vec<u32>| t.len() * self.block >= len && t.iter().all(|&id| last(id) <= rows);
        self.kv_h > 0 && self.tables.len() >= b && self.tables[..b].iter().all(held)
    }
}

/// Test helper: a `[b, kv_h, capacity, w]` tensor rearranged into a pool `[kv_h, slots, block,
/// w]` of blocks of `block` positions in a shuffled order (unused blocks in between), the tables
/// that find each sequence's positions again, and the number of slots.
#[cfg(test)]
pub(crate) fn scatter(x: &candle_core::Tensor, block: usize) -> (candle_core::Tensor, Vec<Vec<u32>>, usize) {
    use candle_core::Tensor;
    let (b, kv_h, capacity, w) = x.dims4().unwrap();
    let per_row = capacity.div_ceil(block);
    // Block k of row i goes to slot 2·(k·b + i) + 1 reversed: interleaved, backwards, with gaps.
    let slots = 2 * per_row * b + 1;
    let slot = |i: usize, k: usize| (slots - 2 - 2 * (k * b + i)) as u32;
    let padded = x.pad_with_zeros(2, 0, per_row * block - capacity).unwrap();
    let mut pool: Vec<Tensor> = (0..slots)
        .map(|_| Tensor::full(7f32, (kv_h, 1, block, w), x.device()).unwrap().to_dtype(x.dtype()).unwrap())
        .collect();
    let mut tables = vec![Vec::new(); b];
    for (i, table) in tables.iter_mut().enumerate() {
        for k in 0..per_row {
            let s = slot(i, k);
            let part = padded.narrow(0, i, 1).unwrap().narrow(2, k * block, block).unwrap(); // [1, kv_h, block, w]
            pool[s as usize] = part.transpose(0, 1).unwrap(); // [kv_h, 1, block, w]
            table.push(s);
        }
    }
    (Tensor::cat(&pool, 1).unwrap().contiguous().unwrap(), tables, slots)
}

/// Test helper: [`scatter`] for a KV buffer (quants and scales of a q8_0 one alike).
#[cfg(test)]
pub(crate) fn scatter_buffer(
    buf: &crate::kv_cache::KvBuffer,
    block: usize,
) -> (crate::kv_cache::KvBuffer, Vec<Vec<u32>>, usize) {
    use crate::kv_cache::KvBuffer;
    match buf {
        KvBuffer::Float(t) => {
            let (t, tables, slots) = scatter(t, block);
            (KvBuffer::Float(t), tables, slots)
        }
        KvBuffer::Q8_0 { q, d } => {
            let ((q, tables, slots), (d, _, _)) = (scatter(q, block), scatter(d, block));
            (KvBuffer::Q8_0 { q, d }, tables, slots)
        }
    }
}
