//! The model layer used by the train and evaluate stages: Llama/Qwen2
//! decoders in burn, loaded from and saved to Hugging Face checkpoints.

pub mod chat;
pub mod config;
pub mod decoder;
pub mod device;
pub mod generate;
pub mod infer;
pub mod init;
pub mod lora;
pub mod optim;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::backend::Backend;

pub use config::{Arch, ModelConfig};
pub use decoder::{CausalLm, KvCache};
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
}

impl<B: Backend> Model<B> {
    /// Loads `dir/config.json` and its safetensors weights onto `device`.
    pub fn load(dir: &Path, device: &B::Device) -> anyhow::Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let tensors = weights::load_dir(dir)?;
        let net = CausalLm::from_tensors(&config, tensors, device)
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        Ok(Model {
            config,
            net,
            source: Some(dir.to_path_buf()),
        })
    }

    /// Writes a Hugging Face checkpoint to `dir`: `config.json`, the weights
    /// (sharded above `max_shard_bytes`), and the tokenizer and generation
    /// files of the source directory.
    pub fn save(&self, dir: &Path, dtype: SaveDtype, max_shard_bytes: u64) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        self.config.save(dir, dtype.torch_name())?;
        weights::save_dir(dir, &self.net.to_tensors(), dtype, max_shard_bytes)?;
        if let Some(src) = &self.source {
            copy_side_files(src, dir)?;
        }
        Ok(())
    }
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
