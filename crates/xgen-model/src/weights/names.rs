//! The one table mapping checkpoint tensor names (HF Llama) to model fields, with their shapes.

use crate::config::Config;

/// A tensor of one decoder layer, by its HF name within `model.layers.{i}.`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    InputLayernorm,
    PostAttentionLayernorm,
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 9] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
        Self::InputLayernorm,
        Self::PostAttentionLayernorm,
    ];

    /// Name suffix after `model.layers.{i}.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::QProj => "self_attn.q_proj.weight",
            Self::KProj => "self_attn.k_proj.weight",
            Self::VProj => "self_attn.v_proj.weight",
            Self::OProj => "self_attn.o_proj.weight",
            Self::GateProj => "mlp.gate_proj.weight",
            Self::UpProj => "mlp.up_proj.weight",
            Self::DownProj => "mlp.down_proj.weight",
            Self::InputLayernorm => "input_layernorm.weight",
            Self::PostAttentionLayernorm => "post_attention_layernorm.weight",
        }
    }

    /// Name suffix after `blk.{i}.` in GGUF (llama.cpp's names).
    pub fn gguf_suffix(self) -> &'static str {
        match self {
            Self::QProj => "attn_q.weight",
            Self::KProj => "attn_k.weight",
            Self::VProj => "attn_v.weight",
            Self::OProj => "attn_output.weight",
            Self::GateProj => "ffn_gate.weight",
            Self::UpProj => "ffn_up.weight",
            Self::DownProj => "ffn_down.weight",
            Self::InputLayernorm => "attn_norm.weight",
            Self::PostAttentionLayernorm => "ffn_norm.weight",
        }
    }

    /// Shape `[out, in]` (linear layers) or `[d]` (norms) for `config`.
    pub fn shape(self, c: &Config) -> Vec<usize> {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        match self {
            Self::QProj => vec![c.q_dim(), d],
            Self::KProj | Self::VProj => vec![c.kv_dim(), d],
            Self::OProj => vec![d, c.q_dim()],
            Self::GateProj | Self::UpProj => vec![f, d],
            Self::DownProj => vec![d, f],
            Self::InputLayernorm | Self::PostAttentionLayernorm => vec![d],
        }
    }
}

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// GGUF names of the non-layer tensors, in the order of [`EMBED_TOKENS`], [`NORM`], [`LM_HEAD`].
const GGUF_GLOBALS: [(&str, &str); 3] =
    [(EMBED_TOKENS, "token_embd.weight"), (NORM, "output_norm.weight"), (LM_HEAD, "output.weight")];

/// The GGUF (llama.cpp) name of checkpoint tensor `name`, if it is one of the model's.
pub fn to_gguf(name: &str) -> Option<String> {
    if let Some(&(_, g)) = GGUF_GLOBALS.iter().find(|(hf, _)| *hf == name) {
        return Some(g.to_string());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let t = LayerTensor::ALL.iter().find(|t| t.suffix() == suffix)?;
    Some(format!("blk.{layer}.{}", t.gguf_suffix()))
}

/// The checkpoint name of GGUF tensor `name` (the inverse of [`to_gguf`]).
pub fn from_gguf(name: &str) -> Option<String> {
    if let Some(&(hf, _)) = GGUF_GLOBALS.iter().find(|(_, g)| *g == name) {
        return Some(hf.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let t = LayerTensor::ALL.iter().find(|t| t.gguf_suffix() == suffix)?;
    Some(layer_name(layer, *t))
}

/// The checkpoint name of a layer tensor.
pub fn layer_name(layer: usize, t: LayerTensor) -> String {
    format!("model.layers.{layer}.{}", t.suffix())
}

/// Whether `name` is the weight of a linear layer (a projection or `lm_head`).
pub fn is_linear(name: &str) -> bool {
    name == LM_HEAD || name.ends_with("_proj.weight")
}

/// Buffers some checkpoints carry that hold no learned weight (transformers ≤ 4.30 saved them).
pub fn is_ignored(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Every tensor the model needs, with its shape, in checkpoint order.
pub fn expected_tensors(c: &Config) -> Vec<(String, Vec<usize>)> {
    let mut all = vec![(EMBED_TOKENS.to_string(), vec![c.vocab_size, c.hidden_size])];
    for layer in 0..c.num_hidden_layers {
        all.extend(LayerTensor::ALL.iter().map(|&t| (layer_name(layer, t), t.shape(c))));
    }
    all.push((NORM.to_string(), vec![c.hidden_size]));
    if !c.tie_word_embeddings {
        all.push((LM_HEAD.to_string(), vec![c.vocab_size, c.hidden_size]));
    }
    all
}

/// Tensors a checkpoint may carry that are not needed: `lm_head` when tied to the embeddings.
pub fn is_optional(c: &Config, name: &str) -> bool {
    c.tie_word_embeddings && name == LM_HEAD
}
