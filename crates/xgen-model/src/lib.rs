//! XGen-7B (HF `LlamaForCausalLM`) on candle: `config.json`, checkpoint loading (PyTorch `.bin` and
//! safetensors, single or sharded), the forward pass with a KV cache, and perplexity.
//!
//! Data flow: ids → [`Model::forward_hidden`] (embed → layers → norm, writing the [`KvCache`]) →
//! [`Model::logits`]. The model knows nothing of text; the tokenizer is another crate.

pub mod attention;
pub mod config;
pub mod embedding;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod kv_cache;
pub mod linear;
mod mlp;
pub mod model;
pub mod perplexity;
mod rope;
pub mod weights;

pub use candle_core::{DType, Device, Error as CandleError, Tensor};
pub use config::{Config, RopeScaling};
pub use error::{ModelError, Result};
pub use kernels::{bandwidth, matvec, quant};
pub use kv_cache::{BlockPool, KvCache, KvType, KV_BLOCK};
pub use linear::{Quant, Weight};
pub use model::{Model, WeightFormat};
