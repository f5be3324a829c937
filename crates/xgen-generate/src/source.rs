//! Where a model's weights come from (a directory, a GGUF file, a Hub id resolved through the HF
//! cache, or deterministic random weights of a preset shape) and in which dtype they are held:
//! resolved once, then loaded. Shared by the command line and the Python package.

use std::{fmt, path::PathBuf, str::FromStr};

use xgen_model::{weights, Config, DType, Device, Model, Quant, WeightFormat};

use crate::{
    config::GenerationConfig,
    error::{GenerateError, Result},
    hub::{self, HubCache, Network},
};

/// How the weights are held: a float compute dtype, or linear layers quantized on load (GGUF
/// block formats; activations, embeddings and norms then in f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl Dtype {
    /// Every dtype, in the order help texts list them.
    pub const ALL: [Dtype; 6] = [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Q8_0, Dtype::Q4_0, Dtype::Q4K];

    /// The dtype of activations and float weights.
    pub fn candle(self) -> DType {
        match self {
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 | Dtype::Q8_0 | Dtype::Q4_0 | Dtype::Q4K => DType::F32,
        }
    }

    pub fn format(self) -> WeightFormat {
        let linear = match self {
            Dtype::Q8_0 => Some(Quant::Q8_0),
            Dtype::Q4_0 => Some(Quant::Q4_0),
            Dtype::Q4K => Some(Quant::Q4K),
            Dtype::F32 | Dtype::Bf16 | Dtype::F16 => None,
        };
        WeightFormat { dtype: self.candle(), linear }
    }

    /// The name on the command line and in Python (`bf16`, `q4_k`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::Q8_0 => "q8_0",
            Dtype::Q4_0 => "q4_0",
            Dtype::Q4K => "q4_k",
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Dtype {
    type Err = GenerateError;

    fn from_str(s: &str) -> Result<Self> {
        Dtype::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Dtype::ALL.iter().map(|d| d.name()).collect();
            GenerateError::setting("dtype", format!("unknown dtype {s:?} (known: {})", names.join(", ")))
        })
    }
}

/// Where the weights will come from, resolved but not loaded.
#[derive(Clone, Debug)]
pub enum Source {
    Dir(PathBuf),
    /// A GGUF file (its block types are used as stored; the dtype applies to float tensors).
    Gguf(PathBuf),
    /// Deterministic random weights of a preset shape (`xgen-7b`, `small`, `tiny`, ...).
    Random {
        preset: String,
        config: Config,
    },
}

impl Source {
    /// Resolves `model`: an existing `*.gguf` file, a directory, or a Hub id looked up in the HF
    /// cache (`HF_HOME` / `HF_HUB_CACHE`) and downloaded when missing unless `HF_HUB_OFFLINE=1`.
    pub fn resolve(model: &str, revision: &str) -> Result<Self> {
        if model.ends_with(".gguf") && std::path::Path::new(model).is_file() {
            return Ok(Source::Gguf(PathBuf::from(model)));
        }
        Ok(Source::Dir(hub::resolve(model, revision, &HubCache::from_env(), Network::from_env())?))
    }

    /// Random weights of the preset named `preset`.
    pub fn random(preset: &str) -> Result<Self> {
        Ok(Source::Random { preset: preset.to_string(), config: weights::random::preset(preset)? })
    }

    /// The model's configuration (reads config.json or the GGUF header only).
    pub fn config(&self) -> Result<Config> {
        Ok(match self {
            Source::Dir(dir) => Config::load(&dir.join("config.json"))?,
            Source::Gguf(path) => xgen_model::gguf::read::GgufFile::open(path)?.config()?,
            Source::Random { config, .. } => config.clone(),
        })
    }

    /// The model's generation_config.json (`{}` when it has none: a GGUF file, random weights).
    pub fn generation_json(&self) -> Result<serde_json::Value> {
        match self {
            Source::Dir(dir) => GenerationConfig::read_json(dir),
            Source::Gguf(_) | Source::Random { .. } => Ok(serde_json::Value::Object(Default::default())),
        }
    }

    /// The model's generation defaults: its generation_config.json over transformers' defaults.
    pub fn generation_config(&self, config: &Config) -> Result<GenerationConfig> {
        GenerationConfig::from_json(&self.generation_json()?, config)
    }

    /// Loads the weights in `format` on the CPU, reporting each tensor to `progress`.
    pub fn load(
        &self,
        format: WeightFormat,
        progress: &mut dyn FnMut(weights::LoadProgress),
    ) -> xgen_model::Result<Model> {
        match self {
            Source::Dir(dir) => Model::load_as(dir, format, &Device::Cpu, progress),
            Source::Gguf(path) => Model::load_gguf(path, format.dtype, &Device::Cpu, progress),
            Source::Random { config, .. } => {
                let w = weights::random::tensors_with(
                    config,
                    format.dtype,
                    &Device::Cpu,
                    progress,
                    &mut |n, t| format.convert(n, t),
                )?;
                Model::from_weights(config.clone(), w, format.dtype, &Device::Cpu)
            }
        }
    }
}
