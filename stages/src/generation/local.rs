//! `backend: local`: a Hugging Face checkpoint run in-process with burn,
//! prompts rendered with its chat template, generated in batches of similar
//! length with a KV cache.

use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;
use serde_json::{Value, json};

use super::{GenParams, GenStats, Generator, Reply, Request, Sampling};
use crate::model::device::{OnDevice, run_on};
use crate::model::generate::{GenerateOptions, generate};
use crate::model::infer::fill_special_ids;
use crate::model::tokenizer::Tokenizer;
use crate::model::{DeviceSpec, Model};

/// blake3 over the checkpoint's files (names and bytes, sorted by name), so
/// cached replies follow the weights, tokenizer and template.
pub fn checkpoint_digest(dir: &Path) -> anyhow::Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the model directory {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(f.file_name().unwrap_or_default().as_encoded_bytes());
        h.update(&[0]);
        let file = std::fs::File::open(&f).with_context(|| format!("reading {}", f.display()))?;
        h.update_reader(file)
            .with_context(|| format!("reading {}", f.display()))?;
        h.update(&[0]);
    }
    Ok(h.finalize().to_hex().to_string())
}

struct Local<'a, B: Backend> {
    model: Model<B>,
    tok: Tokenizer,
    digest: String,
    device: DeviceSpec,
    batch_size: usize,
    sampling: &'a Sampling,
    stats: RefCell<GenStats>,
}

impl<B: crate::model::ModelBackend> Generator for Local<'_, B> {
    fn identity(&self) -> Value {
        json!({"backend": "local", "checkpoint": self.digest})
    }

    fn generate(
        &self,
        requests: &[Request],
        done: &mut dyn FnMut(usize, Result<Reply, String>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let s = self.sampling;
        let mut prompts = Vec::with_capacity(requests.len());
        for r in requests {
            let text = self.tok.apply_chat_template_with(
                &Value::Array(r.messages.clone()),
                None,
                true,
                &s.chat_template_kwargs,
            )?;
            let ids = self.tok.encode(&text, false)?;
            // A stream per prompt and sample, whatever the batch it lands in.
            let h = blake3::hash(text.as_bytes());
            let base = u64::from_le_bytes(h.as_bytes()[..8].try_into()?);
            let seed = base ^ s.seed.unwrap_or(0).wrapping_add(r.sample as u64);
            prompts.push((ids, seed));
        }
        // Longest first, so rows of a batch have similar lengths.
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].0.len()));
        let mut base_opts = GenerateOptions {
            max_new_tokens: s.max_tokens as usize,
            temperature: s.temperature as f32,
            top_p: s.top_p.unwrap_or(1.0) as f32,
            top_k: s.top_k.unwrap_or(0),
            stop: s.stop.clone(),
            ..Default::default()
        };
        fill_special_ids(&mut base_opts, &self.model.config, &self.tok, false);
        let decode = |ids: &[u32]| self.tok.decode(ids, true).unwrap_or_default();
        for batch in order.chunks(self.batch_size) {
            let ids: Vec<Vec<u32>> = batch.iter().map(|&i| prompts[i].0.clone()).collect();
            let opts = GenerateOptions {
                row_seeds: batch.iter().map(|&i| prompts[i].1).collect(),
                ..base_opts.clone()
            };
            let t0 = Instant::now();
            let out = generate(&self.model.net, &ids, &opts, Some(&decode));
            {
                let mut st = self.stats.borrow_mut();
                st.generate_seconds += t0.elapsed().as_secs_f64();
                st.requests += batch.len() as u64;
                st.prompt_tokens += ids.iter().map(|x| x.len() as u64).sum::<u64>();
                st.completion_tokens += out.iter().map(|g| g.ids.len() as u64).sum::<u64>();
            }
            for (&i, g) in batch.iter().zip(out) {
                done(
                    i,
                    Ok(Reply {
                        text: g.text.unwrap_or_default(),
                        completion_tokens: Some(g.ids.len() as u64),
                    }),
                )?;
            }
        }
        Ok(())
    }

    fn stats(&self) -> GenStats {
        self.stats.borrow().clone()
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.tok)
    }

    fn status(&self) -> String {
        let st = self.stats.borrow();
        format!(
            "{} on {}, {:.1} tokens/s",
            st.requests,
            self.device,
            st.completion_tokens as f64 / st.generate_seconds.max(1e-9)
        )
    }
}

struct Job<'a, F> {
    dir: &'a Path,
    params: &'a GenParams,
    sampling: Sampling,
    f: F,
}

impl<T, F: FnOnce(&dyn Generator) -> anyhow::Result<T>> OnDevice for Job<'_, F> {
    type Output = T;

    fn run<B: crate::model::TrainBackend>(self, device: B::Device) -> anyhow::Result<T> {
        let digest = checkpoint_digest(self.dir)?;
        let tok = Tokenizer::from_dir(self.dir)?;
        let model = Model::<B::InnerBackend>::load(self.dir, &device)?;
        let g = Local {
            model,
            tok,
            digest,
            device: self.params.device,
            batch_size: self.params.batch_size,
            sampling: &self.sampling,
            stats: RefCell::new(GenStats::default()),
        };
        (self.f)(&g)
    }
}

/// Loads the checkpoint in `dir` on `params.device` and hands the generator to `f`.
pub fn with_local<T>(
    dir: &Path,
    params: &GenParams,
    sampling: Sampling,
    f: impl FnOnce(&dyn Generator) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    run_on(
        params.device,
        Job {
            dir,
            params,
            sampling,
            f,
        },
    )
}
