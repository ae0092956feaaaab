//! Kind `init_model`: a small random-initialised Hugging Face checkpoint with
//! a byte-level BPE tokenizer trained on the `corpus` input and a ChatML chat
//! template, for pipelines that must run offline with no downloaded model.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::model::init::{InitSpec, corpus_texts, init_checkpoint};
use crate::params::{self, Validate};
use crate::{ConfigError, KeySpec, Stage, StageContext};

/// The `init_model` kind.
pub struct InitModel;

impl Validate for InitSpec {
    fn validate(&self) -> Result<(), ConfigError> {
        InitSpec::validate(self).map_err(|(key, message)| ConfigError {
            key: format!("params.{key}"),
            message,
        })
    }
}

const INPUTS: &[KeySpec] = &[KeySpec {
    name: "corpus",
    required: true,
    doc: "text the tokenizer is trained on (.jsonl/.parquet string fields, or a text file)",
}];
const OUTPUTS: &[KeySpec] = &[KeySpec {
    name: "model",
    required: true,
    doc: "the checkpoint directory (config.json, model.safetensors, tokenizer files)",
}];

impl Stage for InitModel {
    fn kind(&self) -> &'static str {
        "init_model"
    }

    /// 2: qwen2 tokenizers use Qwen2's normalizer and pre-tokenizer.
    fn version(&self) -> u32 {
        2
    }

    fn inputs(&self) -> &'static [KeySpec] {
        INPUTS
    }

    fn outputs(&self) -> &'static [KeySpec] {
        OUTPUTS
    }

    fn check(&self, _config: &BTreeMap<String, Value>, params: &Value) -> Vec<ConfigError> {
        params::check::<InitSpec>(params)
    }

    fn run(&self, ctx: &StageContext) -> anyhow::Result<()> {
        let spec: InitSpec = params::for_run(&ctx.params)?;
        let corpus = ctx.input("corpus")?;
        let out = ctx
            .output("model")
            .ok_or_else(|| anyhow::anyhow!("declare the output 'model' under outs:"))?;
        let texts = corpus_texts(&[corpus.as_path()], spec.max_corpus_bytes)?;
        tracing::info!(
            "training a {}-token BPE tokenizer on {} texts",
            spec.vocab_size.map_or("preset".into(), |v| v.to_string()),
            texts.len()
        );
        let summary = init_checkpoint(&out, &spec, &texts)?;
        ctx.report(&json!(summary));
        Ok(())
    }
}
