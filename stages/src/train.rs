//! Kind `train`: supervised fine-tuning (full or LoRA) of a Hugging Face
//! checkpoint with burn, resumable from checkpoints in the stage's scratch
//! directory, with LLaMA-Factory / HF TrainingArguments parameter names.

pub mod data;
pub mod freeze;
pub mod plot;
pub mod schedule;
pub mod stats;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::model::checkpoint;
use crate::model::decoder::arange_rows;
use crate::model::lora::{self, LoraConfig};
use crate::model::optim::{AdamW, AdamWConfig, Grads};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{self, SaveDtype};
use crate::model::{
    CausalLm, DEFAULT_MAX_SHARD_BYTES, DeviceSpec, Holding, Model, OnDevice, run_on,
};
use crate::params::{self, OnError, Validate};
use crate::rows::RowReader;
use crate::train_val_split::permutation;
use crate::{ConfigError, KeySpec, Stage, StageContext};
use data::{DataSpec, Sample, Side, TrainOn};
pub use schedule::{Schedule, Scheduler};

/// The `train` kind.
pub struct Train;

/// `full` or `lora`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinetuningType {
    /// Every weight is trained.
    Full,
    /// Low-rank adapters on the projections; the base is frozen.
    Lora,
    /// Only some decoder layers (and chosen modules) train, as
    /// LLaMA-Factory's `freeze`; the output is a full model.
    Freeze,
}

/// When checkpoints are saved or the validation set is evaluated (HF's
/// `save_strategy` / `eval_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every `save_steps` / `eval_steps` optimizer steps.
    Steps,
    /// At the end of each epoch.
    Epoch,
    /// Never during training.
    No,
}

/// Params of `train` (names as in LLaMA-Factory and HF TrainingArguments).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Base model directory, when not given as the `init` input. Only this
    /// path is part of the stage key, not the files in it: prefer `init`, whose
    /// content is hashed, so a changed model reruns the stage.
    pub model_name_or_path: Option<String>,
    /// `full` or `lora` (default).
    #[serde(default = "default_ft")]
    pub finetuning_type: FinetuningType,
    /// `freeze`: how many decoder layers train, the last ones (or the first
    /// ones when negative); LLaMA-Factory's default 2.
    #[serde(default = "default_freeze_layers")]
    pub freeze_trainable_layers: i64,
    /// `freeze`: which modules of those layers train: `all` or some of
    /// `self_attn`, `mlp`, `input_layernorm`, `post_attention_layernorm`.
    #[serde(default = "default_freeze_modules")]
    pub freeze_trainable_modules: Value,
    /// `freeze`: modules outside the layers that train too (`embed_tokens`,
    /// `norm`, `lm_head`).
    #[serde(default)]
    pub freeze_extra_modules: Value,
    /// LoRA rank.
    #[serde(default = "default_rank")]
    pub lora_rank: usize,
    /// LoRA alpha (default: twice the rank).
    pub lora_alpha: Option<f64>,
    /// LoRA dropout on the adapters' input (seeded per step, so resumes match).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Projections with adapters: `all`, a comma-separated string or a list;
    /// `experts` adds a mixture's routed experts (PEFT's `target_parameters`).
    #[serde(default = "default_target")]
    pub lora_target: Value,
    /// rsLoRA: scale the adapters by `lora_alpha / sqrt(lora_rank)` instead of
    /// `lora_alpha / lora_rank` (PEFT's and LLaMA-Factory's `use_rslora`).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (PEFT's and LLaMA-Factory's `use_dora`): the adapters also
    /// train a magnitude per output column of each adapted weight, whose
    /// direction is `W + scaling * A B`.
    #[serde(default)]
    pub use_dora: bool,
    /// LoRA+ (LLaMA-Factory's `loraplus_lr_ratio`, PEFT's
    /// `create_loraplus_optimizer`): the adapters' `B` factors learn at this
    /// multiple of the learning rate (typically 16).
    pub loraplus_lr_ratio: Option<f64>,
    /// Also fold the adapters into a full HF model (the `model` output).
    #[serde(default)]
    pub merge_lora: bool,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    /// Passes over the data (may be fractional).
    #[serde(default = "default_epochs")]
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides `num_train_epochs`.
    pub max_steps: Option<u64>,
    /// Samples per micro-batch.
    #[serde(default = "one")]
    pub per_device_train_batch_size: usize,
    /// Samples per validation batch (default: `per_device_train_batch_size`).
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimizer step; the loss is normalised by the
    /// trained tokens of the whole accumulated batch.
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    /// Any HF schedule: `cosine` (default), `linear`, `constant`,
    /// `constant_with_warmup`, `cosine_with_restarts`, `polynomial`,
    /// `inverse_sqrt`, `cosine_with_min_lr`, `cosine_warmup_with_min_lr`,
    /// `warmup_stable_decay`, or, following the validation loss,
    /// `reduce_lr_on_plateau` and `greedy`.
    #[serde(default = "default_sched")]
    pub lr_scheduler_type: Scheduler,
    /// The schedule's own arguments, as HF's `lr_scheduler_kwargs` (e.g.
    /// `{min_lr_rate: 0.1}` for `cosine_with_min_lr`).
    #[serde(default)]
    pub lr_scheduler_kwargs: Map<String, Value>,
    /// Share of steps for linear warmup.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Warmup steps (overrides `warmup_ratio`).
    pub warmup_steps: Option<u64>,
    /// Decoupled weight decay (not on biases and norm weights).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW beta1.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    /// AdamW beta2.
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Global gradient-norm clip (0 disables).
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Seed of data order and adapter initialisation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// bf16 mixed precision: matmuls and attention in bf16, f32 master
    /// weights, optimizer state and loss (torch autocast). Projection
    /// weights that do not train (LoRA's base, freeze tuning's frozen
    /// layers) are held in bf16 when the checkpoint's values are bf16
    /// values, which changes no result. Meant for CUDA; on CPU it is slower
    /// than f32 and only useful to check numerics.
    #[serde(default)]
    pub bf16: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Checkpoint every N steps (and at the end).
    #[serde(default = "default_save")]
    pub save_steps: u64,
    /// When to checkpoint (HF's `save_strategy`): `steps` (default, every
    /// `save_steps`), `epoch` (at the end of each epoch) or `no` (only the
    /// final model; a killed run starts over).
    #[serde(default = "default_save_strategy")]
    pub save_strategy: Strategy,
    /// When to evaluate on `val` (HF's `eval_strategy`, also read as
    /// `evaluation_strategy`): `steps` (every `eval_steps`), `epoch` or `no`.
    /// Unset: every `eval_steps` when given, and at the end.
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: Option<Strategy>,
    /// The optimizer by HF's name: `adamw_torch` (the default; torch's
    /// AdamW) or `adamw_torch_fused` (the same update).
    pub optim: Option<String>,
    /// Read only the first N rows of `train` and of `val` (LLaMA-Factory's
    /// `max_samples`, for quick runs).
    pub max_samples: Option<usize>,
    /// Keep at most this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Evaluate on `val` every N steps (and at the end).
    pub eval_steps: Option<u64>,
    /// The `model` output is the checkpoint with the lowest validation loss
    /// among those saved (every `save_steps`, a multiple of `eval_steps`) and
    /// the final one, as HF's `load_best_model_at_end`; `save_total_limit`
    /// never prunes it.
    #[serde(default)]
    pub load_best_model_at_end: bool,
    /// What `load_best_model_at_end` compares: `loss` (HF's default, the
    /// validation loss; `eval_loss` is the same).
    pub metric_for_best_model: Option<String>,
    /// Key of verl prompt messages.
    #[serde(default = "data::default_prompt_key")]
    pub prompt_key: String,
    /// Key of the verl response (`extra_info.<key>` or `<key>`).
    #[serde(default = "data::default_response_key")]
    pub response_key: String,
    /// Key of multi-turn messages.
    #[serde(default = "data::default_messages_key")]
    pub messages_key: String,
    /// Train on prompt tokens too.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Train on the last assistant turn only (LLaMA-Factory's
    /// `mask_history`); earlier turns are context. With a conversation
    /// longer than `cutoff_len`, `truncation_side: left` keeps that turn.
    #[serde(default)]
    pub mask_history: bool,
    /// More chat-template variables, as transformers' and vLLM's
    /// `chat_template_kwargs` (e.g. `{enable_thinking: false}` for Qwen3:
    /// the empty think block then belongs to the prompt and is not trained).
    #[serde(default)]
    pub chat_template_kwargs: Map<String, Value>,
    /// Longest sample in tokens.
    #[serde(default = "data::default_cutoff")]
    pub cutoff_len: usize,
    /// `right` (default) or `left`.
    #[serde(default)]
    pub truncation_side: Side,
    /// `all`, `reasoning` or `tool_calls`.
    #[serde(default)]
    pub train_on: TrainOn,
    /// Also log entropy, perplexity and top-k probabilities, overall and per
    /// token class, on each step's batch and on the validation set.
    #[serde(default)]
    pub detailed_metrics: bool,
    /// Pack each step's samples into rows of up to `cutoff_len` tokens
    /// (first fit, in order); attention and positions stay within each sample,
    /// so the result equals unpacked training with less padding.
    #[serde(default)]
    pub packing: bool,
    /// Keep only each decoder layer's input from the forward pass and
    /// recompute the layer in the backward pass (HF's
    /// `gradient_checkpointing`): activation memory of one layer instead of
    /// all, for one more forward pass of the layers. Trains the same model.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// NEFTune (HF's `neftune_noise_alpha`): uniform noise of magnitude
    /// `alpha / sqrt(seq * hidden)` added to the embeddings in training
    /// (not in evaluation); typical values 5-15.
    pub neftune_noise_alpha: Option<f64>,
    /// Mixtures of experts (LLaMA-Factory's `moe_aux_loss_coef`): add the
    /// routers' load-balancing loss times this to the training and
    /// validation losses, as transformers does with `output_router_logits`;
    /// 0 turns it off. Unset: as the model's `config.json` says
    /// (`output_router_logits`, `router_aux_loss_coef`; off by default).
    pub moe_aux_loss_coef: Option<f64>,
    /// `fail` (default) or `skip` on a row that cannot be used.
    #[serde(default)]
    pub on_error: OnError,
}

fn default_ft() -> FinetuningType {
    FinetuningType::Lora
}
fn default_freeze_layers() -> i64 {
    2
}
fn default_freeze_modules() -> Value {
    json!("all")
}
fn default_rank() -> usize {
    8
}
fn default_target() -> Value {
    json!("all")
}
fn default_lr() -> f64 {
    5e-5
}
fn default_epochs() -> f64 {
    3.0
}
fn one() -> usize {
    1
}
fn default_sched() -> Scheduler {
    Scheduler::Cosine
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    42
}
fn default_save() -> u64 {
    500
}
fn default_save_strategy() -> Strategy {
    Strategy::Steps
}
fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: format!("params.{key}"),
        message: message.into(),
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.learning_rate > 0.0 && self.learning_rate <= 1.0) {
            return Err(err(
                "learning_rate",
                format!(
                    "learning_rate must be in (0, 1], not {}",
                    self.learning_rate
                ),
            ));
        }
        // Rows are materialised per step: a bound far above any real batch
        // turns a typo into an error instead of an allocation failure.
        const MOST_ROWS: usize = 1 << 20;
        for (key, v) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size.unwrap_or(1),
            ),
        ] {
            if v == 0 || v > MOST_ROWS {
                return Err(err(
                    key,
                    format!("{key} must be in 1..={MOST_ROWS}, not {v}"),
                ));
            }
        }
        if self.per_device_train_batch_size * self.gradient_accumulation_steps > MOST_ROWS {
            return Err(err(
                "gradient_accumulation_steps",
                format!(
                    "per_device_train_batch_size x gradient_accumulation_steps must be at most {MOST_ROWS}"
                ),
            ));
        }
        if self.max_steps == Some(0) {
            return Err(err(
                "max_steps",
                "max_steps must be at least 1 (or left out to train num_train_epochs)",
            ));
        }
        if self.eval_steps == Some(0) {
            return Err(err(
                "eval_steps",
                "eval_steps must be at least 1 (or left out to evaluate at the end only)",
            ));
        }
        for (key, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(err(key, format!("{key} must be in [0, 1), not {v}")));
            }
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            return Err(err(
                "adam_epsilon",
                format!("adam_epsilon must be positive, not {}", self.adam_epsilon),
            ));
        }
        for (key, v, zero) in [
            ("weight_decay", self.weight_decay, "0"),
            ("max_grad_norm", self.max_grad_norm, "0 (no clipping)"),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(err(
                    key,
                    format!("{key} must be {zero} or positive, not {v}"),
                ));
            }
        }
        if let Some(a) = self.lora_alpha
            && !(a > 0.0 && a.is_finite())
        {
            return Err(err(
                "lora_alpha",
                format!("lora_alpha must be positive, not {a}"),
            ));
        }
        if self.max_steps.is_none()
            && (self.num_train_epochs.is_nan() || self.num_train_epochs <= 0.0)
        {
            return Err(err("num_train_epochs", "num_train_epochs must be positive"));
        }
        self.schedule().map_err(|e| kwarg_err(&e))?;
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(err("warmup_ratio", "warmup_ratio must be in [0, 1)"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(err("lora_dropout", "lora_dropout must be in [0, 1)"));
        }
        if let Some(a) = self.neftune_noise_alpha
            && !(a > 0.0 && a.is_finite())
        {
            return Err(err(
                "neftune_noise_alpha",
                format!(
                    "neftune_noise_alpha must be positive (typically 5 to 15), not {a}; leave it out for no noise"
                ),
            ));
        }
        if let Some(c) = self.moe_aux_loss_coef
            && !(c >= 0.0 && c.is_finite())
        {
            return Err(err(
                "moe_aux_loss_coef",
                format!("moe_aux_loss_coef must be 0 or more (typically 0.001 to 0.01), not {c}"),
            ));
        }
        if let Some(r) = self.loraplus_lr_ratio {
            if !(r > 0.0 && r.is_finite()) {
                return Err(err(
                    "loraplus_lr_ratio",
                    format!("loraplus_lr_ratio must be positive (typically 16), not {r}"),
                ));
            }
            if self.finetuning_type != FinetuningType::Lora {
                return Err(err(
                    "loraplus_lr_ratio",
                    "loraplus_lr_ratio scales the LoRA B factors' learning rate: it needs finetuning_type: lora",
                ));
            }
        }
        for (key, on) in [("use_rslora", self.use_rslora), ("use_dora", self.use_dora)] {
            if on && self.finetuning_type != FinetuningType::Lora {
                return Err(err(
                    key,
                    format!("{key} changes the LoRA adapters: it needs finetuning_type: lora"),
                ));
            }
        }
        if self.mask_history && self.train_on_prompt {
            return Err(err(
                "mask_history",
                "mask_history (train on the last turn only) contradicts train_on_prompt (train on everything); set one of them",
            ));
        }
        if let Some(m) = &self.metric_for_best_model
            && m != "loss"
            && m != "eval_loss"
        {
            return Err(err(
                "metric_for_best_model",
                format!("only the validation loss can choose the best model (`loss`), not '{m}'"),
            ));
        }
        if self.lr_scheduler_type.needs_metric() && self.eval_strategy() == Strategy::No {
            return Err(err(
                "lr_scheduler_type",
                format!(
                    "{} lowers the learning rate when the validation loss stops improving: \
                     set eval_steps (or eval_strategy: epoch) and declare a `val` input",
                    self.lr_scheduler_type.name()
                ),
            ));
        }
        if self.eval_strategy == Some(Strategy::Steps) && self.eval_steps.is_none() {
            return Err(err(
                "eval_strategy",
                "eval_strategy: steps needs eval_steps (how many steps between evaluations)",
            ));
        }
        if let Some(o) = &self.optim
            && o != "adamw_torch"
            && o != "adamw_torch_fused"
        {
            return Err(err(
                "optim",
                format!(
                    "optim '{o}' is not supported: anneal's optimizer is torch's AdamW \
                     (`adamw_torch`, or `adamw_torch_fused`, the same update); leave optim out"
                ),
            ));
        }
        if self.max_samples == Some(0) {
            return Err(err(
                "max_samples",
                "max_samples must be at least 1 (or left out to read every row)",
            ));
        }
        if self.load_best_model_at_end {
            match (self.save_strategy, self.eval_strategy(), self.eval_steps) {
                (_, Strategy::No, _) => {
                    return Err(err(
                        "load_best_model_at_end",
                        "load_best_model_at_end needs eval_steps (or eval_strategy: epoch) and a `val` input to compare checkpoints",
                    ));
                }
                (save, eval, _) if save != eval => {
                    return Err(err(
                        "save_strategy",
                        format!(
                            "with load_best_model_at_end, save_strategy ({}) must match eval_strategy ({}), so every checkpoint has a validation loss",
                            save.name(),
                            eval.name()
                        ),
                    ));
                }
                (Strategy::Steps, _, Some(e)) if !self.save_steps.is_multiple_of(e) => {
                    return Err(err(
                        "save_steps",
                        format!(
                            "with load_best_model_at_end, save_steps ({}) must be a multiple of eval_steps ({e}), so every checkpoint has a validation loss",
                            self.save_steps
                        ),
                    ));
                }
                _ => {}
            }
        }
        if self.save_steps == 0 {
            return Err(err("save_steps", "save_steps must be at least 1"));
        }
        if self.cutoff_len < 2 {
            return Err(err("cutoff_len", "cutoff_len must be at least 2"));
        }
        if self.finetuning_type == FinetuningType::Freeze {
            let (modules, extra) = self.freeze_modules()?;
            freeze::check(&modules, &extra).map_err(|(key, message)| err(key, message))?;
            if self.freeze_trainable_layers == 0 {
                return Err(err(
                    "freeze_trainable_layers",
                    "freeze_trainable_layers is 0, so nothing would train: use N for the last N layers or -N for the first N",
                ));
            }
        }
        if self.finetuning_type == FinetuningType::Lora {
            if self.lora_rank == 0 {
                return Err(err("lora_rank", "lora_rank must be at least 1"));
            }
            lora_targets(&self.lora_target).map_err(|e| err("lora_target", e.to_string()))?;
        }
        Ok(())
    }
}

fn lora_targets(v: &Value) -> anyhow::Result<Vec<String>> {
    let names = params::name_list(v).map_err(|e| anyhow::anyhow!("lora_target {e}"))?;
    LoraConfig::resolve_targets(&names)
}

impl Strategy {
    /// The name users write.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Steps => "steps",
            Strategy::Epoch => "epoch",
            Strategy::No => "no",
        }
    }

    /// Steps between two events: every `steps`, every epoch, or never.
    fn every(self, steps: Option<u64>, steps_per_epoch: u64) -> u64 {
        match self {
            Strategy::Steps => steps.unwrap_or(u64::MAX),
            Strategy::Epoch => steps_per_epoch,
            Strategy::No => u64::MAX,
        }
    }
}

impl Params {
    /// `eval_strategy` as set, or what the keys imply: `steps` with
    /// `eval_steps`, otherwise `no` (with a final evaluation, see
    /// [`Self::evaluates_at_end`]).
    fn eval_strategy(&self) -> Strategy {
        self.eval_strategy.unwrap_or(if self.eval_steps.is_some() {
            Strategy::Steps
        } else {
            Strategy::No
        })
    }

    /// Whether the last step is evaluated: unless `eval_strategy: no` says
    /// never.
    fn evaluates_at_end(&self) -> bool {
        self.eval_strategy != Some(Strategy::No)
    }

    fn data_spec(&self) -> DataSpec {
        DataSpec {
            prompt_key: self.prompt_key.clone(),
            response_key: self.response_key.clone(),
            messages_key: self.messages_key.clone(),
            train_on_prompt: self.train_on_prompt,
            cutoff_len: self.cutoff_len,
            truncation_side: self.truncation_side,
            train_on: self.train_on,
            mask_history: self.mask_history,
            chat_template_kwargs: self.chat_template_kwargs.clone(),
        }
    }

    /// `freeze_trainable_modules` and `freeze_extra_modules` as lists.
    fn freeze_modules(&self) -> Result<(Vec<String>, Vec<String>), ConfigError> {
        let modules = freeze::names(&self.freeze_trainable_modules).map_err(|e| {
            err(
                "freeze_trainable_modules",
                format!("freeze_trainable_modules {e}"),
            )
        })?;
        let extra = freeze::names(&self.freeze_extra_modules)
            .map_err(|e| err("freeze_extra_modules", format!("freeze_extra_modules {e}")))?;
        Ok((modules, extra))
    }

    /// Freezes what `finetuning_type: freeze` does not train (a no-op for
    /// other types, whose freezing is their own).
    fn apply_freeze<B: burn::tensor::backend::Backend>(
        &self,
        net: CausalLm<B>,
    ) -> anyhow::Result<CausalLm<B>> {
        if self.finetuning_type != FinetuningType::Freeze {
            return Ok(net);
        }
        let (modules, extra) = self
            .freeze_modules()
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        if extra.iter().any(|m| m == "lm_head") && net.lm_head.is_none() {
            bail!(
                "freeze_extra_modules: this model ties lm_head to embed_tokens; name embed_tokens instead"
            );
        }
        let patterns = freeze::patterns(
            self.freeze_trainable_layers,
            net.layers.len(),
            &modules,
            &extra,
        );
        let trains = |name: &str| patterns.iter().any(|p| name.contains(p.as_str()));
        Ok(lora::freeze_unless(net, &trains))
    }

    /// The schedule with its kwargs, not yet sized to a run.
    fn schedule(&self) -> Result<Schedule, schedule::KwargError> {
        Schedule::new(
            self.lr_scheduler_type,
            &self.lr_scheduler_kwargs,
            self.learning_rate,
        )
    }

    fn lora_config(&self) -> anyhow::Result<LoraConfig> {
        Ok(LoraConfig {
            r: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * self.lora_rank as f64),
            dropout: self.lora_dropout,
            targets: lora_targets(&self.lora_target)?,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            multimodal: false,
        })
    }
}

/// The config error for a problem with `lr_scheduler_kwargs`.
fn kwarg_err(e: &schedule::KwargError) -> ConfigError {
    let key = if e.key.is_empty() {
        "lr_scheduler_kwargs".to_owned()
    } else {
        format!("lr_scheduler_kwargs.{}", e.key)
    };
    err(&key, e.message.clone())
}

const INPUTS: &[KeySpec] = &[
    KeySpec {
        name: "train",
        required: true,
        doc: "training rows (.jsonl or .parquet): verl, messages or ShareGPT",
    },
    KeySpec {
        name: "val",
        required: false,
        doc: "validation rows, evaluated every eval_steps (or as eval_strategy says) and at the end",
    },
    KeySpec {
        name: "init",
        required: false,
        doc: "the base model directory (e.g. ${stages.phase1.outs.model})",
    },
];
const OUTPUTS: &[KeySpec] = &[
    KeySpec {
        name: "model",
        required: true,
        doc: "the trained model: HF checkpoint (full, or LoRA with merge_lora) or PEFT adapter",
    },
    KeySpec {
        name: "metrics",
        required: false,
        doc: "per-step metrics (.jsonl)",
    },
    KeySpec {
        name: "checkpoints",
        required: false,
        doc: "a directory with global_step_N/ per kept checkpoint and the final model (HF or PEFT)",
    },
    KeySpec {
        name: "plot",
        required: false,
        doc: "the loss curve, training and validation (.png)",
    },
];

impl Stage for Train {
    fn kind(&self) -> &'static str {
        "train"
    }

    /// 2: a step never spans two epochs (the last step of an epoch takes
    /// what is left, as in HF Trainer); `constant` has no warmup.
    /// 3: each layer's LoRA dropout masks come from a seed of their own, so
    /// that `gradient_checkpointing` trains the same model.
    /// 4: the learning rate is `peak * factor` as in transformers' `LambdaLR`
    /// (warmup and linear decay were rounded otherwise, an ulp apart).
    fn version(&self) -> u32 {
        4
    }

    fn inputs(&self) -> &'static [KeySpec] {
        INPUTS
    }

    fn outputs(&self) -> &'static [KeySpec] {
        OUTPUTS
    }

    fn check(&self, _config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError> {
        params::check::<Params>(params)
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let p: Params = params::for_run(&ctx.params)?;
        let base = match (ctx.deps.get("init"), &p.model_name_or_path) {
            (Some(_), Some(_)) => {
                bail!(
                    "give the base model once: either the input 'init' or params.model_name_or_path"
                )
            }
            (Some(_), None) => ctx.input("init")?,
            (None, Some(m)) => ctx.workdir.join(m),
            (None, None) => bail!(
                "no base model: declare the input 'init' (deps: {{init: path/or/${{stages.x.outs.model}}}}) \
                 or set params.model_name_or_path"
            ),
        };
        if base.join("adapter_config.json").is_file() && !base.join("config.json").is_file() {
            bail!(
                "{} is a LoRA adapter, not a full model; train the earlier phase with merge_lora: true \
                 so later phases start from a merged model",
                base.display()
            );
        }
        let out = ctx
            .output("model")
            .context("declare the output 'model' under outs:")?;
        run_on(
            p.device,
            Job {
                ctx,
                p: &p,
                base: &base,
                out: &out,
            },
        )
    }
}

struct Job<'a> {
    ctx: &'a StageContext,
    p: &'a Params,
    base: &'a Path,
    out: &'a Path,
}

/// Reads and tokenises every row of `path` (the first `max_rows`, if set);
/// returns the samples and counts by outcome.
pub(crate) fn load_samples(
    path: &Path,
    tok: &Tokenizer,
    spec: &DataSpec,
    on_error: OnError,
    counts: &mut BTreeMap<String, u64>,
    prefix: &str,
    max_rows: Option<usize>,
) -> anyhow::Result<Vec<Sample>> {
    let mut reader = RowReader::open(path)?;
    let mut out = Vec::new();
    let mut bump = |k: &str| *counts.entry(format!("{prefix}{k}")).or_default() += 1;
    let mut rows = 0;
    while max_rows.is_none_or(|m| rows < m)
        && let Some(row) = reader.next_row()
    {
        rows += 1;
        let (line, row) = match row {
            Ok(r) => r,
            Err(e) if on_error == OnError::Skip => {
                tracing::warn!("{e}");
                bump("skipped_malformed");
                continue;
            }
            Err(e) => return Err(e).context("set `on_error: skip` to leave such rows out"),
        };
        let sample = data::conversation(&row, spec).and_then(|c| data::tokenize(tok, &c, spec));
        match sample {
            Ok(s) if s.labels.iter().skip(1).all(|&l| l == -100) => {
                if s.truncated {
                    // cutoff_len cut off every trained token (a prompt longer than it).
                    bump("truncated");
                    bump("skipped_no_trained_tokens_after_truncation");
                } else {
                    bump("skipped_no_trained_tokens");
                }
            }
            Ok(s) => {
                if s.truncated {
                    bump("truncated");
                }
                bump("samples");
                out.push(s);
            }
            Err(e) if on_error == OnError::Skip => {
                tracing::warn!("{}:{line}: {e}", path.display());
                bump("skipped_invalid");
            }
            Err(e) => bail!(
                "{}:{line}: {e} (set `on_error: skip` to leave such rows out)",
                path.display()
            ),
        }
    }
    Ok(out)
}

/// Right-padded ids, mask and labels of `samples`.
pub(crate) type Padded = (Vec<Vec<u32>>, Vec<Vec<bool>>, Vec<Vec<i64>>);

pub(crate) fn pad(samples: &[&Sample], pad_id: u32) -> Padded {
    let t = samples.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut labels = Vec::new();
    for s in samples {
        let n = s.ids.len();
        let mut i = s.ids.clone();
        i.resize(t, pad_id);
        let mut m = vec![true; n];
        m.resize(t, false);
        let mut l = s.labels.clone();
        l.resize(t, -100);
        ids.push(i);
        mask.push(m);
        labels.push(l);
    }
    (ids, mask, labels)
}

/// A packed row: ids, the sample index of each token, labels.
type PackedRow = (Vec<u32>, Vec<u32>, Vec<i64>);

/// First-fit packing of `samples` (in order) into rows of at most `max_len` tokens.
/// The first label of each sample is -100 so nothing is predicted across samples.
fn pack(samples: &[&Sample], max_len: usize) -> Vec<PackedRow> {
    let mut rows: Vec<PackedRow> = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        let n = s.ids.len();
        let row = match rows.iter().position(|r| r.0.len() + n <= max_len) {
            Some(i) => i,
            None => {
                rows.push((Vec::new(), Vec::new(), Vec::new()));
                rows.len() - 1
            }
        };
        let r = &mut rows[row];
        r.0.extend_from_slice(&s.ids);
        r.1.extend(std::iter::repeat_n(k as u32, n));
        r.2.push(-100);
        r.2.extend_from_slice(&s.labels[1..]);
    }
    rows
}

/// Right-padded packed rows: ids, segment ids, labels.
type PackedBatch = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<i64>>);

/// Right-pads packed rows; padding gets its own segment id.
fn pad_packed(rows: &[PackedRow], pad_id: u32) -> PackedBatch {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (ids, segs, labels) in rows {
        let mut i = ids.clone();
        i.resize(t, pad_id);
        let mut s = segs.clone();
        s.resize(t, u32::MAX);
        let mut l = labels.clone();
        l.resize(t, -100);
        out.0.push(i);
        out.1.push(s);
        out.2.push(l);
    }
    out
}

fn counted(s: &Sample) -> usize {
    s.labels.iter().skip(1).filter(|&&l| l != -100).count()
}

/// Mean loss over all counted tokens of `samples`, without gradients.
fn evaluate<B: crate::model::ModelBackend>(
    net: &CausalLm<B>,
    samples: &[Sample],
    batch: usize,
    pad_id: u32,
) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for chunk in samples.chunks(batch) {
        let refs: Vec<&Sample> = chunk.iter().collect();
        let (ids, mask, labels) = pad(&refs, pad_id);
        let (loss, k) = net.loss(&ids, &mask, &labels);
        if k > 0 {
            sum += loss.into_scalar().elem::<f64>() * k as f64;
            n += k;
        }
    }
    (if n > 0 { sum / n as f64 } else { f64::NAN }, n)
}

/// Complete checkpoints (`global_step_N/` with its `state.json`) in `dir`,
/// oldest first.
fn checkpoints(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let n = e
                .file_name()
                .to_string_lossy()
                .strip_prefix("global_step_")?
                .parse()
                .ok()?;
            e.path().join("state.json").is_file().then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Newest complete checkpoint in `dir`.
fn newest_checkpoint(dir: &Path) -> Option<(u64, PathBuf)> {
    checkpoints(dir).ok()?.pop()
}

impl OnDevice for Job<'_> {
    type Output = ();

    fn run<B: crate::model::TrainBackend>(self, device: B::Device) -> anyhow::Result<()> {
        let (ctx, p) = (self.ctx, self.p);
        let started = Instant::now();
        let tok = Tokenizer::from_dir(self.base)?;
        let mut counts = BTreeMap::new();
        let spec = p.data_spec();
        let train = load_samples(
            &ctx.input("train")?,
            &tok,
            &spec,
            p.on_error,
            &mut counts,
            "",
            p.max_samples,
        )?;
        if train.is_empty() {
            bail!(
                "no usable training samples in {}",
                ctx.input("train")?.display()
            );
        }
        if p.lr_scheduler_type.needs_metric() && !ctx.deps.contains_key("val") {
            bail!(
                "lr_scheduler_type: {} follows the validation loss: declare a `val` input \
                 (e.g. val: ${{stages.split.outs.val}})",
                p.lr_scheduler_type.name()
            );
        }
        if p.load_best_model_at_end && !ctx.deps.contains_key("val") {
            bail!(
                "load_best_model_at_end chooses by validation loss: declare a `val` input \
                 (e.g. val: ${{stages.split.outs.val}})"
            );
        }
        let val = match ctx.deps.get("val") {
            Some(_) => load_samples(
                &ctx.input("val")?,
                &tok,
                &spec,
                p.on_error,
                &mut counts,
                "val_",
                p.max_samples,
            )?,
            None => Vec::new(),
        };
        if p.load_best_model_at_end && val.is_empty() {
            bail!(
                "load_best_model_at_end: no usable validation samples in {}",
                ctx.input("val")?.display()
            );
        }
        // Weights that do not train are held in bf16 under mixed precision
        // (where that loses nothing); full fine-tuning trains them all.
        let holding = match (p.bf16, p.finetuning_type) {
            (true, FinetuningType::Lora | FinetuningType::Freeze) => Holding::Bf16WhereExact,
            _ => Holding::F32,
        };
        let base = Model::<B>::load_held(self.base, &device, holding)?;
        let config = base.config.clone();
        let extra = base.extra.clone();
        let ctx_len = config.max_position_embeddings;
        let too_long = train
            .iter()
            .chain(&val)
            .filter(|s| s.ids.len() > ctx_len)
            .count();
        if too_long > 0 {
            tracing::warn!(
                "{too_long} samples are longer than the model's max_position_embeddings \
                 ({ctx_len}); servers such as vLLM refuse prompts past it: lower cutoff_len \
                 or use a model with a longer context"
            );
            counts.insert(
                "samples_longer_than_max_position_embeddings".into(),
                too_long as u64,
            );
        }
        let pad_id = tok.pad_token_id().or(config.pad_token_id).unwrap_or(0);
        let lora_cfg = match p.finetuning_type {
            FinetuningType::Lora => Some(
                LoraConfig {
                    multimodal: config.multimodal,
                    ..p.lora_config()?
                }
                .fit_to(config.arch, &base.net.projection_names())
                .context("params.lora_target")?,
            ),
            FinetuningType::Full | FinetuningType::Freeze => None,
        };
        if let Some(w) = lora_cfg.as_ref().and_then(|c| c.peft_caveat(config.arch)) {
            tracing::warn!("{w}");
        }
        let per_step = p.per_device_train_batch_size * p.gradient_accumulation_steps;
        let steps_per_epoch = train.len().div_ceil(per_step) as u64;
        let total = p
            .max_steps
            .unwrap_or_else(|| (p.num_train_epochs * steps_per_epoch as f64).ceil() as u64)
            .max(1);
        let warmup = p
            .warmup_steps
            .unwrap_or_else(|| (p.warmup_ratio * total as f64).ceil() as u64);
        let mut schedule = p
            .schedule()
            .and_then(|s| s.for_run(warmup, total))
            .map_err(|e| {
                let e = kwarg_err(&e);
                anyhow::anyhow!("{}: {}", e.key, e.message)
            })?;

        // Resume from the newest checkpoint in scratch, if any.
        let ckpt_dir = ctx.scratch.join("checkpoints");
        std::fs::create_dir_all(&ckpt_dir)?;
        let metrics_path = ctx.scratch.join("metrics.jsonl");
        let mut opt = AdamW::<B::InnerBackend>::new(AdamWConfig {
            beta1: p.adam_beta1,
            beta2: p.adam_beta2,
            eps: p.adam_epsilon,
            weight_decay: p.weight_decay,
            lora_b_lr_ratio: p.loraplus_lr_ratio.unwrap_or(1.0),
        });
        let (net, start) = match newest_checkpoint(&ckpt_dir) {
            None => {
                let net = match &lora_cfg {
                    Some(c) => lora::attach(base.net, c, p.seed),
                    None => p.apply_freeze(base.net)?,
                };
                std::fs::write(&metrics_path, "")?;
                (net, 0)
            }
            Some((step, dir)) => {
                tracing::info!("resuming from {}", dir.display());
                ctx.progress
                    .message(format!("resuming from checkpoint global_step_{step}"));
                let net = load_weights(&dir.join("model"), &lora_cfg, &device, holding, || {
                    Ok(base.net)
                })?;
                let net = p.apply_freeze(net)?;
                let mut state = BTreeMap::new();
                weights::load_file_into(&dir.join("optimizer.safetensors"), &mut state)?;
                opt.load_state(step, state, &device)?;
                let saved: Value = serde_json::from_str(
                    &std::fs::read_to_string(dir.join("state.json")).with_context(|| {
                        format!("cannot read {}", dir.join("state.json").display())
                    })?,
                )
                .with_context(|| format!("{} is not JSON", dir.join("state.json").display()))?;
                schedule.restore(&saved["scheduler"]).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {e}; delete the stage's scratch directory to train from the start",
                        dir.join("state.json").display()
                    )
                })?;
                // Keep the metrics of the steps up to the checkpoint.
                let kept: String = std::fs::read_to_string(&metrics_path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v["step"].as_u64())
                            .is_some_and(|s| s <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&metrics_path, kept)?;
                (net, step)
            }
        };
        let save_to = SaveTo {
            config: &config,
            extra: &extra,
            base: self.base,
            lora: &lora_cfg,
        };
        let mut metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open {}", metrics_path.display()))?;
        let mut net = net.trainable_in_f32();
        let (held, held_bytes) = net.held_in_bf16();
        if held > 0 {
            tracing::info!(
                "{held} weights that do not train are held in bf16 ({:.1} MB)",
                held_bytes as f64 / 1e6
            );
        }
        net.set_bf16(p.bf16);
        net.neftune_noise_alpha = p.neftune_noise_alpha.unwrap_or(0.0);
        if let Some(c) = p.moe_aux_loss_coef {
            if config.moe.is_none() {
                bail!(
                    "params.moe_aux_loss_coef: the routers' load-balancing loss is for mixtures \
                     of experts, and this {} model has none; leave it out",
                    config.arch.model_type()
                );
            }
            net.router_aux_loss_coef = c;
        }
        ctx.progress.set_total(total);
        ctx.progress.set_done(start);

        let n = train.len();
        let mut order_epoch = u64::MAX;
        let mut order: Vec<u32> = Vec::new();
        let mut last_loss = f64::NAN;
        let mut trained_tokens = 0usize;
        let eval_every = p.eval_strategy().every(p.eval_steps, steps_per_epoch);
        let save_every = p.save_strategy.every(Some(p.save_steps), steps_per_epoch);
        let eval_bs = p
            .per_device_eval_batch_size
            .unwrap_or(p.per_device_train_batch_size);
        let mut last_eval = None;
        let loop_started = Instant::now();
        for step in start..total {
            let t0 = Instant::now();
            // Samples of this step: each epoch its own shuffle, cut into steps
            // of `per_step` samples; the epoch's last step takes what is left.
            let epoch = step / steps_per_epoch;
            if epoch != order_epoch {
                order = permutation(n, p.seed.wrapping_add(epoch));
                order_epoch = epoch;
            }
            let first = (step % steps_per_epoch) as usize * per_step;
            let picked: Vec<&Sample> = order[first..(first + per_step).min(n)]
                .iter()
                .map(|&i| &train[i as usize])
                .collect();
            let total_tokens: usize = picked.iter().map(|s| counted(s)).sum();
            let train_detail = p.detailed_metrics.then(|| {
                let inner = net.valid();
                let mut st = stats::Stats::default();
                for micro in picked.chunks(p.per_device_train_batch_size) {
                    st.add_batch(&inner, micro, &pad(micro, pad_id));
                }
                st.to_json()
            });
            let mut grads = Grads::<B::InnerBackend>::default();
            // The loss and the gradient norm stay on the device until the
            // optimizer step is queued: one sync per step on a GPU.
            let mut loss_dev: Option<Tensor<B::InnerBackend, 1>> = None;
            let packed = p.packing.then(|| pack(&picked, p.cutoff_len));
            let bs = p.per_device_train_batch_size;
            let micros = packed.as_ref().map_or(picked.len(), Vec::len).div_ceil(bs);
            for m in 0..micros {
                // Dropout masks depend only on (seed, step, micro-batch, layer).
                let seed =
                    p.seed ^ (step.wrapping_mul(1_000_003) + m as u64).wrapping_mul(0x9E37_79B9);
                let (ids, pos, labels) = match &packed {
                    Some(rows) => {
                        let chunk = &rows[m * bs..((m + 1) * bs).min(rows.len())];
                        let (ids, segs, labels) = pad_packed(chunk, pad_id);
                        (ids, net.positions_packed(&segs, &device), labels)
                    }
                    None => {
                        let micro = &picked[m * bs..((m + 1) * bs).min(picked.len())];
                        let (ids, mask, labels) = pad(micro, pad_id);
                        let pos = net.positions(&arange_rows(&ids), &mask, &device);
                        (ids, pos, labels)
                    }
                };
                let part = if p.gradient_checkpointing {
                    checkpoint::loss_and_grads(
                        &net,
                        &ids,
                        &pos,
                        &labels,
                        seed,
                        total_tokens,
                        &mut grads,
                    )
                    .map(|(part, _)| part)
                } else {
                    let (loss, k) = net.train_loss(&ids, &pos, &labels, seed);
                    (k > 0).then(|| {
                        let scaled = loss.mul_scalar(k as f64 / total_tokens as f64);
                        grads.accumulate(&net, &scaled.backward());
                        scaled.inner()
                    })
                };
                if let Some(part) = part {
                    loss_dev = Some(match loss_dev {
                        Some(sum) => sum + part,
                        None => part,
                    });
                }
            }
            let norm_dev = if p.max_grad_norm > 0.0 {
                grads.clip_tensor(p.max_grad_norm)
            } else {
                grads.norm_tensor()
            };
            let lr = schedule.lr(step);
            net = opt.step(net, &grads, lr);
            let [loss_sum, grad_norm] =
                [loss_dev, norm_dev].map(|t| t.map_or(0.0, |t| t.into_scalar().elem::<f64>()));
            // A diverged step was applied above, but nothing of it is written.
            if !loss_sum.is_finite() || !grad_norm.is_finite() {
                bail!(
                    "step {}: training diverged (loss {loss_sum}, gradient norm {grad_norm}); \
                     lower learning_rate, keep max_grad_norm on, or check the data; \
                     no model was written",
                    step + 1
                );
            }
            trained_tokens += total_tokens;
            last_loss = loss_sum;
            let secs = t0.elapsed().as_secs_f64();
            let done = step + 1;
            let mut line = json!({
                "step": done,
                "epoch": done as f64 / steps_per_epoch as f64,
                "loss": loss_sum,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": total_tokens,
                "rows": packed.as_ref().map_or(picked.len(), Vec::len),
                "tokens_per_s": total_tokens as f64 / secs.max(1e-9),
            });
            if !val.is_empty()
                && (done % eval_every == 0 || (done == total && p.evaluates_at_end()))
            {
                let (vl, _) = evaluate(&net.valid(), &val, eval_bs, pad_id);
                if !vl.is_finite() {
                    bail!(
                        "step {done}: the validation loss is {vl}: training diverged; \
                         lower learning_rate or check adam_epsilon; no model was written"
                    );
                }
                // The loss-driven schedules set the rate of the next steps.
                schedule.observe(vl);
                line["eval_loss"] = json!(vl);
                line["eval_ppl"] = json!(vl.exp().min(1e6));
                if p.detailed_metrics {
                    let inner = net.valid();
                    let mut st = stats::Stats::default();
                    let refs: Vec<&Sample> = val.iter().collect();
                    for chunk in refs.chunks(eval_bs) {
                        st.add_batch(&inner, chunk, &pad(chunk, pad_id));
                    }
                    line["eval_detail"] = st.to_json();
                }
                last_eval = Some(vl);
            }
            if let Some(d) = train_detail {
                line["train_detail"] = d;
            }
            writeln!(metrics, "{line}")?;
            metrics.flush()?;
            ctx.progress.set_done(done);
            let per_step_s = loop_started.elapsed().as_secs_f64() / (done - start) as f64;
            ctx.progress.message(format!(
                "step {done}/{total} loss {loss_sum:.4} lr {lr:.2e} {:.0} tok/s, ETA {}",
                total_tokens as f64 / secs.max(1e-9),
                eta((total - done) as f64 * per_step_s)
            ));
            if done % save_every == 0 && done < total {
                let state = json!({
                    "global_step": done,
                    "eval_loss": line["eval_loss"].as_f64(),
                    "scheduler": schedule.state(),
                });
                save_checkpoint(&ckpt_dir, state, &net, &save_to, &opt)?;
                let keep = p
                    .load_best_model_at_end
                    .then(|| best_saved(&ckpt_dir))
                    .flatten();
                prune(&ckpt_dir, p.save_total_limit, keep.map(|b| b.step))?;
            }
        }

        // The best saved checkpoint replaces the final model unless the final
        // one is strictly better (HF keeps the first of equal ones).
        let mut best = None;
        if p.load_best_model_at_end {
            let last = last_eval.context("no validation loss at the last step")?;
            let mut chosen = Saved {
                step: total,
                eval_loss: Some(last),
            };
            if let Some(b) = best_saved(&ckpt_dir)
                && b.eval_loss.is_some_and(|l| l <= last)
            {
                // The final weights still go out as the last checkpoint.
                if let Some(out) = ctx.output("checkpoints") {
                    let to = out.join(format!("global_step_{total}"));
                    save_weights(&net, &save_to, &to)?;
                }
                let dir = ckpt_dir
                    .join(format!("global_step_{}", b.step))
                    .join("model");
                tracing::info!("loading the best checkpoint, {}", dir.display());
                net = load_weights(&dir, &lora_cfg, &device, holding, || {
                    Ok(Model::<B>::load_held(self.base, &device, holding)?.net)
                })?;
                chosen = b;
            }
            best = Some(chosen);
        }

        // Outputs.
        let inner = net.valid();
        match &lora_cfg {
            None => Model {
                config: config.clone(),
                net: inner,
                source: Some(self.base.to_path_buf()),
                extra: extra.clone(),
            }
            .save(self.out, SaveDtype::F32, DEFAULT_MAX_SHARD_BYTES)?,
            Some(c) if p.merge_lora => {
                lora::save_adapter(
                    &inner,
                    c,
                    Some(&self.base.display().to_string()),
                    &self.out.join("adapter"),
                )?;
                Model {
                    config: config.clone(),
                    net: lora::merge(inner),
                    source: Some(self.base.to_path_buf()),
                    extra: extra.clone(),
                }
                .save(self.out, SaveDtype::F32, DEFAULT_MAX_SHARD_BYTES)?
            }
            Some(c) => {
                lora::save_adapter(&inner, c, Some(&self.base.display().to_string()), self.out)?;
                crate::model::copy_side_files(self.base, self.out)?;
                std::fs::remove_file(self.out.join("generation_config.json")).ok();
            }
        }
        drop(metrics);
        if let Some(m) = ctx.output("metrics") {
            std::fs::copy(&metrics_path, &m)
                .with_context(|| format!("cannot write {}", m.display()))?;
        }
        if let Some(dir) = ctx.output("checkpoints") {
            std::fs::create_dir_all(&dir)?;
            // The saved steps before the last, newest first, within save_total_limit
            // (which counts the final one too).
            let mut saved = checkpoints(&ckpt_dir)?;
            saved.retain(|(n, _)| *n < total);
            saved.reverse();
            let keep = p
                .save_total_limit
                .filter(|k| *k > 0)
                .map_or(usize::MAX, |k| k - 1);
            let best_step = best.as_ref().map(|b| b.step);
            for (i, (n, path)) in saved.into_iter().enumerate() {
                if i < keep || Some(n) == best_step {
                    copy_dir(&path.join("model"), &dir.join(format!("global_step_{n}")))?;
                }
            }
            // The final checkpoint in the same format as the others: the PEFT
            // adapter for LoRA, even when `out` holds the merged model.
            if best_step.is_none_or(|b| b == total) {
                let final_src = match &lora_cfg {
                    Some(_) if p.merge_lora => self.out.join("adapter"),
                    _ => self.out.to_path_buf(),
                };
                copy_dir(&final_src, &dir.join(format!("global_step_{total}")))?;
            }
        }
        if let Some(png) = ctx.output("plot") {
            let (mut tr, mut ev) = (Vec::new(), Vec::new());
            for l in std::fs::read_to_string(&metrics_path)?.lines() {
                let v: Value = serde_json::from_str(l)?;
                let step = v["step"].as_f64().unwrap_or(0.0);
                if let Some(x) = v["loss"].as_f64() {
                    tr.push((step, x));
                }
                if let Some(x) = v["eval_loss"].as_f64() {
                    ev.push((step, x));
                }
            }
            plot::loss_png(&png, &tr, &ev)?;
        }
        let mut report = json!({
            "steps": total,
            "resumed_from_step": start,
            "final_loss": last_loss,
            "trained_tokens_this_run": trained_tokens,
            "seconds": started.elapsed().as_secs_f64(),
            "finetuning_type": format!("{:?}", p.finetuning_type).to_lowercase(),
        });
        if p.bf16 {
            report["weights_held_in_bf16"] = json!(held);
        }
        if let Some(v) = last_eval {
            report["eval_loss"] = json!(v);
        }
        if let Some(b) = &best {
            report["best_step"] = json!(b.step);
            report["best_eval_loss"] = json!(b.eval_loss);
        }
        for (k, v) in counts {
            report[k] = json!(v);
        }
        ctx.report(&report);
        Ok(())
    }
}

/// Copies the files of `from` (recursively) into `to`.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), &dst).with_context(|| {
                format!("cannot copy {} to {}", e.path().display(), dst.display())
            })?;
        }
    }
    Ok(())
}

/// `1h02m`, `3m05s`, `42s`.
fn eta(secs: f64) -> String {
    let s = secs.round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// What saving trained weights needs besides them: the base model's
/// config, its tensors outside the language model, where it came from
/// (side files, the adapter's base) and the adapter's settings for LoRA.
struct SaveTo<'a> {
    config: &'a crate::model::ModelConfig,
    extra: &'a Arc<BTreeMap<String, crate::model::HostTensor>>,
    base: &'a Path,
    lora: &'a Option<LoraConfig>,
}

/// Saves checkpoint `state["global_step"]` with `state` as its
/// `state.json` (step, validation loss, the schedule's state).
fn save_checkpoint<B: AutodiffBackend>(
    dir: &Path,
    state: Value,
    net: &CausalLm<B>,
    to: &SaveTo,
    opt: &AdamW<B::InnerBackend>,
) -> anyhow::Result<()> {
    let step = state["global_step"]
        .as_u64()
        .context("a checkpoint needs its step")?;
    let final_dir = dir.join(format!("global_step_{step}"));
    let tmp = dir.join(format!(".global_step_{step}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    save_weights(net, to, &tmp.join("model"))?;
    weights::save_dir(&tmp, &opt.state_tensors(), SaveDtype::F32, u64::MAX)?;
    std::fs::rename(
        tmp.join("model.safetensors"),
        tmp.join("optimizer.safetensors"),
    )?;
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?,
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)?;
    Ok(())
}

/// A checkpoint's weights in `dir`: an HF model, or the PEFT adapter.
fn save_weights<B: AutodiffBackend>(
    net: &CausalLm<B>,
    to: &SaveTo,
    dir: &Path,
) -> anyhow::Result<()> {
    let inner = net.valid();
    match to.lora {
        Some(c) => lora::save_adapter(&inner, c, Some(&to.base.display().to_string()), dir),
        None => Model {
            config: to.config.clone(),
            net: inner,
            source: Some(to.base.to_path_buf()),
            extra: to.extra.clone(),
        }
        .save(dir, SaveDtype::F32, DEFAULT_MAX_SHARD_BYTES),
    }
}

/// The weights that [`save_weights`] wrote to `dir`: an HF model, or the
/// PEFT adapter attached to the base model that `base` loads (only then).
fn load_weights<B: crate::model::TrainBackend>(
    dir: &Path,
    lora_cfg: &Option<LoraConfig>,
    device: &B::Device,
    holding: Holding,
    base: impl FnOnce() -> anyhow::Result<CausalLm<B>>,
) -> anyhow::Result<CausalLm<B>> {
    Ok(match lora_cfg {
        Some(_) => lora::load_adapter(base()?, dir)?.0,
        None => Model::<B>::load_held(dir, device, holding)?.net,
    })
}

/// Deletes the oldest checkpoints beyond `keep`, except step `spare` (the
/// best so far, which HF Trainer keeps too).
fn prune(dir: &Path, keep: Option<usize>, spare: Option<u64>) -> anyhow::Result<()> {
    // As HF Trainer: no limit, or 0, keeps every checkpoint.
    let Some(keep) = keep.filter(|k| *k > 0) else {
        return Ok(());
    };
    let mut steps = checkpoints(dir)?;
    let mut keep = keep;
    // The spared one is kept with the newest, even at a limit of 1.
    if let Some(i) = steps.iter().position(|(n, _)| Some(*n) == spare)
        && i + 1 < steps.len()
    {
        let s = steps.remove(i);
        steps.push(s);
        keep = keep.max(2);
    }
    let drop_n = steps.len().saturating_sub(keep);
    for (_, path) in steps.into_iter().take(drop_n) {
        std::fs::remove_dir_all(&path)?;
    }
    Ok(())
}

/// A saved checkpoint: its step and its validation loss, if it was evaluated.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Saved {
    step: u64,
    eval_loss: Option<f64>,
}

/// The saved checkpoint with the lowest validation loss (the earliest of
/// equal ones), from the `state.json` of each.
fn best_saved(dir: &Path) -> Option<Saved> {
    let mut best: Option<Saved> = None;
    for (step, path) in checkpoints(dir).ok()? {
        let state: Value = std::fs::read_to_string(path.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())?;
        let Some(l) = state["eval_loss"].as_f64() else {
            continue;
        };
        if best.is_none_or(|b| b.eval_loss.is_some_and(|x| l < x)) {
            best = Some(Saved {
                step,
                eval_loss: Some(l),
            });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_errors_name_the_key() {
        let e = params::check::<Params>(&json!({"lora_target": "qq_proj"}));
        assert_eq!(e[0].key, "params.lora_target");
        assert!(e[0].message.contains("'qq_proj'"), "{}", e[0].message);
        let e = params::check::<Params>(&json!({"learning_rat": 1e-5}));
        assert!(
            e[0].message.contains("did you mean 'learning_rate'"),
            "{}",
            e[0].message
        );
    }
}
