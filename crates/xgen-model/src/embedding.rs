//! The token embedding: `ids` `[b, t]` -> rows of the table `[b, t, d]`. The table is a float
//! tensor, or, for a GGUF file whose `token_embd` is block-quantized, the packed matrix itself
//! (rows dequantized as they are looked up): one copy that also serves as `lm_head` when the
//! embeddings are tied, where the f32 table it replaced was 8x the q4_0 bytes (839 MB for the
//! 7B's 51200 × 4096).

use std::sync::Arc;

use candle_core::{Module, Tensor};
use candle_nn::Embedding;

use crate::{error::Result, kernels::quant::PackedMatrix};

#[derive(Debug, Clone)]
pub enum TokenEmbedding {
    /// `[vocab, d]` in the compute dtype.
    Table(Embedding),
    /// `[vocab, d]` blocks; rows come out in f32.
    Packed(Arc<PackedMatrix>),
}

impl TokenEmbedding {
    /// `ids` `[b, t]` -> `[b, t, d]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Table(e) => Ok(e.forward(ids)?),
            Self::Packed(m) => {
                let (vocab, d) = m.dims();
                let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let mut out = vec![0f32; flat.len() * d];
                for (&id, row) in flat.iter().zip(out.chunks_exact_mut(d)) {
                    if id as usize >= vocab {
                        return Err(crate::ModelError::TokenOutOfRange { id, vocab_size: vocab });
                    }
                    m.dequantize_row(id as usize, row);
                }
                let (b, t) = ids.dims2()?;
                Ok(Tensor::from_vec(out, (b, t, d), ids.device())?)
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Table(e) => e.embeddings().elem_count() * e.embeddings().dtype().size_in_bytes(),
            Self::Packed(m) => m.bytes(),
        }
    }

    /// Bytes of one row (what a decode step reads of an untied table).
    pub fn row_bytes(&self) -> usize {
        let vocab = match self {
            Self::Table(e) => e.embeddings().dim(0).unwrap_or(1),
            Self::Packed(m) => m.dims().0,
        };
        self.bytes() / vocab.max(1)
    }
}
