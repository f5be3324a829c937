//! The XGen / Llama decoder: embed → layers (attention, MLP, each pre-normed and residual) →
//! norm → `lm_head`.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, RmsNorm};

use crate::{
    attention::{Attention, Caches},
    config::Config,
    embedding::TokenEmbedding,
    error::{ModelError, Result},
    gguf::read::Conversion,
    kernels::{prompt_attention, work_split},
    kv_cache::{BlockPool, KvCache, KvType},
    linear::{Linear, Quant, Weight},
    mlp::Mlp,
    rope::Rope,
    weights::{
        self,
        names::{self, LayerTensor},
        Checkpoint, LoadProgress, TensorMap,
    },
};

/// How weights are held: the compute dtype of activations and float weights, and optionally a
/// quantized format for the linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightFormat {
    pub dtype: DType,
    /// `Some` quantizes every linear layer whose input width fits the format's blocks; the others
    /// (and embeddings, norms) stay in `dtype`.
    pub linear: Option<Quant>,
}

impl WeightFormat {
    /// What checkpoint tensor `name` becomes.
    pub fn convert(&self, name: &str, t: Tensor) -> Result<Weight> {
        let linear = names::is_linear(name);
        match self.linear {
            Some(q) if linear && t.rank() == 2 && q.fits(t.dim(1)?) => q.quantize(&t),
            _ => Ok(Weight::Float(t)),
        }
    }
}

/// Tokens per forward step when a long prompt is processed, by default (see
/// [`Model::set_prefill_chunk`]): bounds activations (an `[8192, 11008]` f32 MLP intermediate
/// would be 360 MB; at 256 tokens the step's activations take about 50 MB for the 7B) while
/// keeping matrix products large. Chosen by measurement (docs/performance.md, "Prefill chunk"):
/// on the 8-layer 7B shape, pp4096 alternated twice, q4_0 101/97 tok/s at 256 against 90/86 at
/// 512, q8_0 93/82 against 79/91, bf16 36/37 once; 128 was slower again.
pub const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// `x` `[b, t, d]` -> `[b, t, d]`.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        layer: usize,
        caches: &mut Caches,
    ) -> Result<Tensor> {
        let attn_norm = self.input_layernorm.forward(x)?;
        let attn_out = self.self_attn.forward(&attn_norm, cos, sin, layer, caches)?;
        let h = (x + attn_out)?;
        let ffn_norm = self.post_attention_layernorm.forward(&h)?;
        let ffn_out = self.mlp.forward(&ffn_norm)?;
        Ok((h + ffn_out)?)
    }
}

/// A loaded model. Immutable: all per-sequence state lives in the [`KvCache`] passed in.
#[derive(Debug, Clone)]
pub struct Model {
    config: Config,
    embed_tokens: TokenEmbedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    /// Dtype of the KV cache: the compute dtype, except f16 when the linear layers are quantized
    /// (their f32 activations would double the cache: 8.4 GB at 8K tokens for the 7B).
    kv: KvType,
    /// Tokens per forward step of a long prompt ([`PREFILL_CHUNK`] unless set).
    prefill_chunk: usize,
    device: Device,
}

impl Model {
    /// Loads `dir/config.json` and the weights of `dir`, converted to `dtype` on `device`.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        Self::load_as(dir, WeightFormat { dtype, linear: None }, device, progress)
    }

    /// [`Model::load`] with the linear layers quantized on load when `format.linear` says so.
    pub fn load_as(
        dir: &Path,
        format: WeightFormat,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let config = Config::load(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::find(dir)?;
        let weights =
            weights::load_with(&checkpoint, &config, format.dtype, device, progress, &mut |name, t| {
                format.convert(name, t)
            })?;
        Self::from_weights(config, weights, format.dtype, device)
    }

    /// Loads a GGUF file (xgen's or llama.cpp's): configuration from its metadata, block-quantized
    /// matrices kept in their format, float tensors in `dtype` (f32 when any matrix is quantized:
    /// the quantized kernels take f32 activations).
    pub fn load_gguf(
        path: &Path,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let file = crate::gguf::read::GgufFile::open(path)?;
        let config = file.config()?;
        let dtype = if file.has_quantized_matrices() { DType::F32 } else { dtype };
        let weights = file.weights(&config, Conversion::AsStored(dtype), device, progress)?;
        Self::from_weights(config, weights, dtype, device)
    }

    /// Loads a GGUF file with every tensor dequantized and then held in `format` (requantized
    /// from the file's values, or floats), whatever the file stores: one file's weights in
    /// several formats, for comparing them.
    pub fn load_gguf_as(
        path: &Path,
        format: WeightFormat,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let file = crate::gguf::read::GgufFile::open(path)?;
        let config = file.config()?;
        let weights = file.weights(&config, Conversion::To(format), device, progress)?;
        Self::from_weights(config, weights, format.dtype, device)
    }

    /// Builds the model from checked float tensors (see [`weights::load`]).
    pub fn from_tensors(config: Config, tensors: TensorMap, dtype: DType, device: &Device) -> Result<Self> {
        let weights = tensors.into_iter().map(|(n, t)| (n, Weight::Float(t))).collect();
        Self::from_weights(config, weights, dtype, device)
    }

    /// Builds the model from checked weights, float or quantized.
    pub fn from_weights(
        config: Config,
        mut weights: HashMap<String, Weight>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut take = |name: &str| {
            weights.remove(name).ok_or_else(|| ModelError::MissingTensor { name: name.into(), file: None })
        };
        let float = |w: Weight, name: &str| match w {
            Weight::Float(t) => Ok(t),
            Weight::Quantized(_) | Weight::Packed(_) => {
                Err(ModelError::field(name, "only linear layers can be quantized"))
            }
        };
        let eps = config.rms_norm_eps;
        // A packed table (from a GGUF file) is looked up in place, and is `lm_head` when tied.
        let (embed_tokens, tied) = match take(names::EMBED_TOKENS)? {
            Weight::Packed(p) => (TokenEmbedding::Packed(p.clone()), Weight::Packed(p)),
            w => {
                let t = float(w, names::EMBED_TOKENS)?;
                (TokenEmbedding::Table(Embedding::new(t.clone(), config.hidden_size)), Weight::Float(t))
            }
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut t = |which| take(&names::layer_name(i, which));
            let norm = |w, which| float(w, &names::layer_name(i, which));
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::new(
                    norm(t(LayerTensor::InputLayernorm)?, LayerTensor::InputLayernorm)?,
                    eps,
                ),
                self_attn: Attention {
                    q_proj: Linear::new(t(LayerTensor::QProj)?)?,
                    k_proj: Linear::new(t(LayerTensor::KProj)?)?,
                    v_proj: Linear::new(t(LayerTensor::VProj)?)?,
                    o_proj: Linear::new(t(LayerTensor::OProj)?)?,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                post_attention_layernorm: RmsNorm::new(
                    norm(t(LayerTensor::PostAttentionLayernorm)?, LayerTensor::PostAttentionLayernorm)?,
                    eps,
                ),
                mlp: Mlp {
                    gate_proj: Linear::new(t(LayerTensor::GateProj)?)?,
                    up_proj: Linear::new(t(LayerTensor::UpProj)?)?,
                    down_proj: Linear::new(t(LayerTensor::DownProj)?)?,
                },
            });
        }
        let norm = RmsNorm::new(float(take(names::NORM)?, names::NORM)?, eps);
        let lm_head = if config.tie_word_embeddings { tied } else { take(names::LM_HEAD)? };
        let lm_head = Linear::new(lm_head)?;
        let mut model = Self {
            embed_tokens,
            lm_head,
            rope: Rope::new(&config),
            layers,
            norm,
            config,
            dtype,
            kv: KvType::Float(dtype),
            prefill_chunk: PREFILL_CHUNK,
            device: device.clone(),
        };
        if dtype == DType::F32 && model.quantized_linear_layers().0 > 0 {
            model.kv = KvType::Float(DType::F16);
        }
        Ok(model)
    }

    /// Every linear layer, `lm_head` last.
    fn linear_layers(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
            })
            .chain(std::iter::once(&self.lm_head))
    }

    /// Weights of all linear layers (`lm_head` included): each is one multiply-add per token.
    pub fn linear_parameters(&self) -> usize {
        self.linear_layers().map(|l| l.parameters()).sum()
    }

    /// (quantized, all) linear layers, `lm_head` included.
    pub fn quantized_linear_layers(&self) -> (usize, usize) {
        let all: Vec<&Linear> = self.linear_layers().collect();
        (all.iter().filter(|l| l.is_quantized()).count(), all.len())
    }

    /// The storage formats of the linear layers, most common first, joined by `+` when mixed
    /// (`q4_0`, or `q4k+q6k` for a llama.cpp Q4_K_M file).
    pub fn weight_format_name(&self) -> String {
        Self::by_count(self.linear_layers().map(|l| l.format_name()))
    }

    /// The kernels that multiply prompts by the linear layers (as [`Model::weight_format_name`]),
    /// e.g. `avx512-vnni` or `amx-bf16`.
    pub fn prompt_kernel_name(&self) -> String {
        Self::by_count(self.linear_layers().map(|l| l.prompt_kernel().to_string()))
    }

    /// Whether every position's keys, values and logits come out bit for bit the same however
    /// its prompt is cut into steps (a cold run's last chunk of 160 rows, or 32 rows after a
    /// restored prefix): every linear layer packed and multiplied on the VNNI or portable block
    /// kernels, whose per-row arithmetic ignores the row count (`tests/prompt_cache.rs`).
    /// candle's float matmul blocks rows by count and the AMX tiles add in another order, so
    /// there a restored prefix's logits can differ from a cold run's in the last bits.
    pub fn step_invariant(&self) -> bool {
        self.linear_layers().all(|l| l.is_packed() && l.prompt_kernel() != "amx-int8")
    }

    /// The prompt attention's micro-kernels on this CPU: `avx512`, `avx2` or `portable`.
    pub fn attention_kernel_name(&self) -> &'static str {
        match prompt_attention::Path::detect(self.config.head_dim) {
            prompt_attention::Path::Avx512 => "avx512",
            prompt_attention::Path::Avx2 => "avx2",
            prompt_attention::Path::Portable => "portable",
        }
    }

    /// Distinct names, most frequent first, joined by `+`.
    fn by_count(names: impl Iterator<Item = String>) -> String {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for name in names {
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => counts.push((name, 1)),
            }
        }
        counts.sort_by_key(|c| std::cmp::Reverse(c.1));
        counts.into_iter().map(|(n, _)| n).collect::<Vec<_>>().join("+")
    }

    /// Bytes of all weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
                    .iter()
                    .map(|p| p.weight_bytes())
                    .sum::<usize>()
                    + 2 * self.config.hidden_size * self.dtype.size_in_bytes()
            })
            .sum();
        let lm_head = if self.config.tie_word_embeddings { 0 } else { self.lm_head.weight_bytes() };
        let norm = self.config.hidden_size * self.dtype.size_in_bytes();
        self.embed_tokens.bytes() + layers + norm + lm_head
    }

    /// Weight bytes a decode step reads: everything but the embedding table, of which it reads
    /// one row (with tied embeddings the table is read whole, as `lm_head`).
    pub fn weight_bytes_per_token(&self) -> usize {
        if self.config.tie_word_embeddings {
            return self.weight_bytes();
        }
        self.weight_bytes() - self.embed_tokens.bytes() + self.embed_tokens.row_bytes()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How new caches store keys and values: the compute dtype by default (f16 when the linear
    /// layers are quantized and the compute dtype is f32).
    pub fn kv_type(&self) -> KvType {
        self.kv
    }

    /// Stores keys and values of new caches as `kind` (q8_0 needs a head_dim divisible by 32).
    pub fn set_kv_type(&mut self, kind: KvType) -> Result<()> {
        if kind == KvType::Q8_0 && !self.config.head_dim.is_multiple_of(32) {
            return Err(candle_core::Error::Msg(format!(
                "a q8_0 KV cache needs head_dim divisible by 32, this model has {}",
                self.config.head_dim
            ))
            .into());
        }
        self.kv = kind;
        Ok(())
    }

    /// Tokens per forward step when a prompt is read ([`Model::forward_last`], perplexity).
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Reads prompts `tokens` at a time (at least 1): larger chunks make larger products and
    /// hold larger activations (about `tokens × 4 × (3 × hidden + 2 × intermediate)` bytes).
    pub fn set_prefill_chunk(&mut self, tokens: usize) {
        self.prefill_chunk = tokens.max(1);
    }

    /// A pool of `blocks` KV blocks of [`KV_BLOCK`](crate::KV_BLOCK) positions that caches made by
    /// [`KvCache::in_pool`] share (a server's sequences).
    pub fn new_pool(&self, blocks: usize) -> Result<Arc<BlockPool>> {
        let c = &self.config;
        BlockPool::new(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, blocks, self.kv, &self.device)
    }

    /// Bytes of one KV block (all layers, keys and values) in this model's KV storage.
    pub fn kv_block_bytes(&self) -> Result<usize> {
        Ok(self.new_pool(1)?.block_bytes())
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.config;
        KvCache::new(
            c.num_hidden_layers,
            batch,
            c.num_key_value_heads,
            c.head_dim,
            capacity,
            self.kv,
            &self.device,
        )
    }

    /// Fails on the first id outside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            Some(&id) => Err(ModelError::TokenOutOfRange { id, vocab_size: self.config.vocab_size }),
            None => Ok(()),
        }
    }

    /// `ids` as a `[1, t]` tensor on the model's device, after checking each is in the vocabulary.
    pub fn ids_tensor(&self, ids: &[u32]) -> Result<Tensor> {
        self.check_ids(ids)?;
        Ok(Tensor::new(ids, &self.device)?.unsqueeze(0)?)
    }

    /// One forward step: `ids` `[b, t]` at positions `cache.len()..` -> final hidden states
    /// `[b, t, d]` (after `model.norm`). Writes the step's keys and values into `cache`.
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = ids.dim(1)?;
        cache.prepare(t)?; // blocks for the step's positions
                           // [t, hd/2], or [b, t, hd/2] when rows are left-padded (their positions differ).
        let (cos, sin) = if cache.is_padded() {
            self.rope.cos_sin_padded(cache.len(), t, cache.padding(), self.dtype, &self.device)?
        } else {
            self.rope.cos_sin(cache.len(), t, self.dtype, &self.device)?
        };
        let hidden = self.layers_forward(ids, &cos, &sin, &mut Caches::Batch(cache))?;
        cache.advance(t);
        Ok(hidden)
    }

    /// Like [`Model::forward_hidden`] for independent sequences (joined a running batch at
    /// different times, each at its own position) that each feed their own number of tokens: `ids`
    /// holds `lens[i]` tokens for `caches[i]` (single-row caches), one after the other. Every
    /// token goes through the linear layers together (each weight read once for all: a
    /// continuous-batching step in which some sequences verify drafts); attention runs per
    /// sequence. -> hidden `[1, Σ lens, d]`.
    pub fn forward_segments(&self, ids: &[u32], lens: &[usize], caches: &mut [KvCache]) -> Result<Tensor> {
        let total: usize = lens.iter().sum();
        if lens.len() != caches.len() || total != ids.len() || caches.iter().any(|c| c.batch() != 1) {
            return Err(candle_core::Error::Msg(format!(
                "{} segments of {total} tokens need as many single-row caches and {} ids",
                lens.len(),
                ids.len()
            ))
            .into());
        }
        let (mut cos, mut sin) = (Vec::with_capacity(lens.len()), Vec::with_capacity(lens.len()));
        for (c, &t) in caches.iter_mut().zip(lens) {
            c.prepare(t)?; // blocks for the segment's positions
            let (c, s) = self.rope.cos_sin(c.len(), t, self.dtype, &self.device)?; // [t, hd/2]
            cos.push(c);
            sin.push(s);
        }
        let (cos, sin) = (Tensor::cat(&cos, 0)?, Tensor::cat(&sin, 0)?); // [Σ lens, hd/2]
        let ids = self.ids_tensor(ids)?; // [1, Σ lens]
        let hidden = self.layers_forward(&ids, &cos, &sin, &mut Caches::Segments(caches, lens))?;
        caches.iter_mut().zip(lens).for_each(|(c, &t)| c.advance(t));
        Ok(hidden)
    }

    /// embed → layers → norm: `ids` `[b, t]` -> `[b, t, d]`.
    fn layers_forward(
        &self,
        ids: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        caches: &mut Caches,
    ) -> Result<Tensor> {
        on_pool(|| {
            let mut x = self.embed_tokens.forward(ids)?; // [b, t, d]
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.forward(&x, cos, sin, i, caches)?;
            }
            Ok(self.norm.forward(&x)?)
        })
    }

    /// `lm_head`: hidden `[.., d]` -> logits `[.., v]` in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        on_pool(|| Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?))
    }

    /// Runs `ids` `[b, t]` in steps of at most [`Model::prefill_chunk`] tokens and returns the f32
    /// logits of the last position, `[b, v]`.
    pub fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_last_until(ids, cache, &AtomicBool::new(false))
    }

    /// [`Model::forward_last`], stopping with [`ModelError::Cancelled`] once `cancel` is set
    /// (checked before each step): how a caller on another thread interrupts a long prompt.
    pub fn forward_last_until(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        cancel: &AtomicBool,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        cache.check_room(t)?;
        let mut last = None;
        let step = self.prefill_chunk;
        for start in (0..t).step_by(step) {
            if cancel.load(Ordering::Relaxed) {
                return Err(ModelError::Cancelled);
            }
            let chunk = ids.narrow(1, start, step.min(t - start))?;
            last = Some(self.forward_hidden(&chunk, cache)?);
        }
        let hidden =
            last.ok_or_else(|| candle_core::Error::Msg("forward_last needs at least one token".into()))?;
        self.logits(&hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?)
    }
}

/// Runs `f` on a rayon worker (inline when already on one), the pool's other workers kept awake
/// meanwhile ([`work_split::on_pool_awake`]). The kernels' parallel loops then start on a worker
/// that takes its share at once, instead of parking the caller and waking the pool for every
/// product: in-cache q8_0 products ran 2x faster this way (`cargo bench --bench quant`).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    work_split::on_pool_awake(f)
}

/// Natural-log softmax over the last dimension, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?)
}
