//! The model layer used by the train and evaluate stages: Llama/Qwen2
//! decoders in burn, loaded from and saved to Hugging Face checkpoints.

pub mod attention;
pub mod backend;
mod binary_op;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod device;
pub mod generate;
pub mod gpt_oss;
pub mod infer;
pub mod init;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod optim;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod tokenizer;
pub mod vmath;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::tensor::backend::Backend;

pub use backend::{ModelBackend, TrainBackend};
pub use config::{Arch, ModelConfig};
pub use decoder::{CausalLm, Holding, KvCache};
pub use device::{DeviceSpec, OnDevice, run_on};
pub use generate::{Finish, GenerateOptions, Generated, generate};
pub use weights::{HostTensor, SaveDtype};

/// Files besides config and weights that make a checkpoint directory usable
/// by transformers; copied along when a model is saved.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Shard size used by [`Model::save`] unless told otherwise (as transformers).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// A loaded model: its config and its burn module.
#[derive(Debug)]
pub struct Model<B: Backend> {
    /// Architecture from `config.json`.
    pub config: ModelConfig,
    /// The weights.
    pub net: CausalLm<B>,
    /// Where it was loaded from (side files are copied from here on save).
    pub source: Option<PathBuf>,
    /// Tensors outside the language model, saved back unchanged: a
    /// multimodal Gemma 3 checkpoint's vision tower and projector (shared,
    /// so the checkpoints of a run do not copy them).
    pub extra: Arc<BTreeMap<String, HostTensor>>,
}

impl<B: ModelBackend> Model<B> {
    /// Loads `dir/config.json` and its safetensors weights onto `device`.
    /// A PEFT LoRA adapter directory (`adapter_config.json`, no `config.json`)
    /// loads as its local base model with the adapter merged in.
    pub fn load(dir: &Path, device: &B::Device) -> anyhow::Result<Self> {
        Self::load_held(dir, device, Holding::F32)
    }

    /// [`Self::load`], holding the projection weights and the embedding as
    /// `holding` says.
    pub fn load_held(dir: &Path, device: &B::Device, holding: Holding) -> anyhow::Result<Self> {
        if !dir.join("config.json").is_file() && dir.join("adapter_config.json").is_file() {
            return Self::load_adapter_dir(dir, device, holding);
        }
        let config = ModelConfig::from_dir(dir)?;
        let (tensors, extra) = split_tensors(&config, weights::load_dir(dir)?);
        let net = config
            .internal_tensors(tensors)
            .and_then(|tensors| CausalLm::from_tensors_held(&config, tensors, device, holding))
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        Ok(Model {
            config,
            net,
            source: Some(dir.to_path_buf()),
            extra: Arc::new(extra),
        })
    }

    fn load_adapter_dir(dir: &Path, device: &B::Device, holding: Holding) -> anyhow::Result<Self> {
        let file = dir.join("adapter_config.json");
        let Some(base) = lora::adapter_base(dir)? else {
            anyhow::bail!(
                "{}: 'base_model_name_or_path' is not set, so the adapter's base model is unknown; \
                 set it to the base model's directory, or use the merged model (merge_lora: true)",
                file.display()
            );
        };
        if !base.join("config.json").is_file() {
            anyhow::bail!(
                "{}: the base model '{}' is not a local model directory (anneal reads models \
                 from disk and downloads nothing); point 'base_model_name_or_path' at it, \
                 or use the merged model (merge_lora: true)",
                file.display(),
                base.display()
            );
        }
        let model = Self::load_held(&base, device, holding)?;
        let (net, _) = lora::load_adapter(model.net, dir)
            .with_context(|| format!("loading the LoRA adapter in {}", dir.display()))?;
        Ok(Model {
            config: model.config,
            net: lora::merge(net),
            source: Some(dir.to_path_buf()),
            extra: model.extra,
        })
    }
}

impl<B: Backend> Model<B> {
    /// Writes a Hugging Face checkpoint to `dir`: `config.json`, the weights
    /// (sharded above `max_shard_bytes`), and the tokenizer and generation
    /// files of the source directory.
    pub fn save(&self, dir: &Path, dtype: SaveDtype, max_shard_bytes: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.config.save(dir, dtype.torch_name())?;
        let mut tensors: BTreeMap<String, HostTensor> = self
            .config
            .checkpoint_tensors(self.net.to_tensors())
            .into_iter()
            .map(|(name, t)| (self.config.hf_name(&name), t))
            .collect();
        tensors.extend(self.extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        weights::save_dir(dir, &tensors, dtype, max_shard_bytes)?;
        if let Some(src) = &self.source {
            copy_side_files(src, dir)?;
        }
        Ok(())
    }
}

/// A checkpoint's tensors under the language model's names, and those
/// outside it (see [`ModelConfig::internal_name`]).
fn split_tensors(
    config: &ModelConfig,
    tensors: BTreeMap<String, HostTensor>,
) -> (BTreeMap<String, HostTensor>, BTreeMap<String, HostTensor>) {
    let (mut lm, mut extra) = (BTreeMap::new(), BTreeMap::new());
    for (name, t) in tensors {
        match config.internal_name(&name) {
            Some(n) => lm.insert(n, t),
            None => extra.insert(name, t),
        };
    }
    (lm, extra)
}

/// Copies [`SIDE_FILES`] present in `src` to `dst`.
pub fn copy_side_files(src: &Path, dst: &Path) -> anyhow::Result<()> {
    if src == dst {
        return Ok(());
    }
    for name in SIDE_FILES {
        let from = src.join(name);
        if from.is_file() {
            let to = dst.join(name);
            std::fs::copy(&from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}
