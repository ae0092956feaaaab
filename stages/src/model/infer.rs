//! Text in, text out: load a checkpoint with its tokenizer on a device and
//! generate, with timings. Used by `anneal model generate` and the benchmarks.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::device::{DeviceSpec, OnDevice, run_on};
use super::generate::{Finish, GenerateOptions, generate};
use super::tokenizer::Tokenizer;
use super::{Model, ModelConfig};

/// One prompt's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Completion {
    /// The prompt as given to the model (after the chat template).
    pub prompt: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The generated text (special tokens removed, cut before a stop string).
    pub text: String,
    /// The generated token ids.
    pub ids: Vec<u32>,
    /// Why generation ended.
    pub finish: Finish,
}

/// Results and timings of [`generate_texts`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationReport {
    /// One per prompt, in order.
    pub completions: Vec<Completion>,
    /// Seconds to load weights and tokenizer.
    pub load_seconds: f64,
    /// Seconds spent generating.
    pub generate_seconds: f64,
    /// Generated tokens over all prompts.
    pub new_tokens: usize,
    /// `new_tokens / generate_seconds`.
    pub tokens_per_second: f64,
    /// Where it ran.
    pub device: String,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct TextRequest {
    /// Prompts: plain text, or user messages when `chat`.
    pub prompts: Vec<String>,
    /// Render each prompt as one user message with the model's chat template.
    pub chat: bool,
    /// Sampling and stopping; eos ids and pad id are filled from the model when empty.
    pub options: GenerateOptions,
    /// Do not stop on end-of-sequence tokens.
    pub ignore_eos: bool,
}

struct Job<'a> {
    dir: &'a Path,
    req: &'a TextRequest,
    spec: DeviceSpec,
}

impl OnDevice for Job<'_> {
    type Output = GenerationReport;

    fn run<B: crate::model::TrainBackend>(
        self,
        device: B::Device,
    ) -> anyhow::Result<GenerationReport> {
        let t0 = Instant::now();
        let tok = Tokenizer::from_dir(self.dir)?;
        let model = Model::<B::InnerBackend>::load(self.dir, &device)?;
        let load_seconds = t0.elapsed().as_secs_f64();
        let mut opts = self.req.options.clone();
        fill_special_ids(&mut opts, &model.config, &tok, self.req.ignore_eos);
        let mut texts = Vec::new();
        let mut prompts = Vec::new();
        for p in &self.req.prompts {
            let text = if self.req.chat {
                tok.apply_chat_template(&json!([{"role": "user", "content": p}]), None, true)?
            } else {
                p.clone()
            };
            prompts.push(tok.encode(&text, false)?);
            texts.push(text);
        }
        let decode = |ids: &[u32]| tok.decode(ids, true).unwrap_or_default();
        let t1 = Instant::now();
        let out = generate(&model.net, &prompts, &opts, Some(&decode));
        let generate_seconds = t1.elapsed().as_secs_f64();
        let new_tokens = out.iter().map(|g| g.ids.len()).sum();
        let completions = out
            .into_iter()
            .zip(texts)
            .zip(&prompts)
            .map(|((g, prompt), ids)| Completion {
                prompt,
                prompt_tokens: ids.len(),
                text: g.text.unwrap_or_default(),
                ids: g.ids,
                finish: g.finish,
            })
            .collect();
        Ok(GenerationReport {
            completions,
            load_seconds,
            generate_seconds,
            new_tokens,
            tokens_per_second: new_tokens as f64 / generate_seconds.max(1e-9),
            device: self.spec.to_string(),
        })
    }
}

/// End-of-sequence and padding ids from the config and tokenizer, unless set.
pub fn fill_special_ids(
    opts: &mut GenerateOptions,
    config: &ModelConfig,
    tok: &Tokenizer,
    ignore_eos: bool,
) {
    if opts.eos_token_ids.is_empty() && !ignore_eos {
        opts.eos_token_ids = config.eos_token_ids.clone();
        if let Some(id) = tok.eos_token_id()
            && !opts.eos_token_ids.contains(&id)
        {
            opts.eos_token_ids.push(id);
        }
    }
    if ignore_eos {
        opts.eos_token_ids.clear();
    }
    if let Some(pad) = tok.pad_token_id().or(config.pad_token_id) {
        opts.pad_token_id = pad;
    }
}

/// Loads the checkpoint in `dir` on `device` and generates for every prompt in one batch.
pub fn generate_texts(
    dir: &Path,
    device: DeviceSpec,
    req: &TextRequest,
) -> anyhow::Result<GenerationReport> {
    run_on(
        device,
        Job {
            dir,
            req,
            spec: device,
        },
    )
}
