//! `detailed_metrics`: per-token confidence statistics of a batch, overall and
//! by the class of the target token (reasoning or tool call).

use burn::tensor::activation::softmax;
use rayon::prelude::*;
use serde_json::{Value, json};

use super::data::{Sample, TokenClass};
use crate::model::CausalLm;

/// Sums of the statistics of one token class.
#[derive(Debug, Clone, Default)]
pub struct Acc {
    tokens: u64,
    nll: f64,
    entropy_bits: f64,
    top: [f64; 4],
}

/// The k of the cumulative top-k probabilities.
pub const TOP_K: [usize; 4] = [1, 2, 5, 10];

/// One token's statistics: negative log-likelihood, binary entropy of the
/// top-1 probability in bits, cumulative top-k probabilities.
#[derive(Debug, Clone, Copy)]
struct Row {
    nll: f64,
    entropy_bits: f64,
    top: [f64; 4],
}

impl Row {
    fn of(probs: &[f32], target: usize) -> Row {
        let mut best: Vec<f32> = Vec::with_capacity(11);
        for &p in probs {
            if best.len() < 10 || p > *best.last().unwrap() {
                let at = best.partition_point(|&b| b >= p);
                best.insert(at, p);
                best.truncate(10);
            }
        }
        let p1 = best[0] as f64;
        let h = |p: f64| if p <= 0.0 { 0.0 } else { -p * p.log2() };
        Row {
            nll: -(probs[target].max(f32::MIN_POSITIVE) as f64).ln(),
            entropy_bits: h(p1) + h(1.0 - p1),
            top: TOP_K.map(|k| best.iter().take(k).map(|&p| p as f64).sum::<f64>()),
        }
    }
}

impl Acc {
    fn add(&mut self, r: &Row) {
        self.entropy_bits += r.entropy_bits;
        for (sum, t) in self.top.iter_mut().zip(r.top) {
            *sum += t;
        }
        self.nll += r.nll;
        self.tokens += 1;
    }

    /// Means as JSON (null when no token of the class was seen).
    pub fn to_json(&self) -> Value {
        if self.tokens == 0 {
            return Value::Null;
        }
        let n = self.tokens as f64;
        let loss = self.nll / n;
        json!({
            "tokens": self.tokens,
            "loss": loss,
            "perplexity": loss.exp().min(1e6),
            "entropy_bits": self.entropy_bits / n,
            "top1": self.top[0] / n,
            "top2": self.top[1] / n,
            "top5": self.top[2] / n,
            "top10": self.top[3] / n,
        })
    }
}

/// Statistics over all, reasoning and tool-call tokens.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    all: Acc,
    reasoning: Acc,
    tool_call: Acc,
}

impl Stats {
    /// Adds the counted tokens of `batch` (padded ids, mask, labels of `samples`).
    pub fn add_batch<B: crate::model::ModelBackend>(
        &mut self,
        net: &CausalLm<B>,
        samples: &[&Sample],
        padded: &super::Padded,
    ) {
        self.add_chunked(net, samples, padded, B::LOGIT_CHUNK_ELEMS);
    }

    /// [`Self::add_batch`] with the logits of at most `chunk_elems` elements
    /// at a time.
    fn add_chunked<B: crate::model::ModelBackend>(
        &mut self,
        net: &CausalLm<B>,
        samples: &[&Sample],
        padded: &super::Padded,
        chunk_elems: usize,
    ) {
        let (ids, mask, labels) = padded;
        let Some((hidden, targets, at)) = net.counted_hidden(ids, mask, labels) else {
            return;
        };
        let vocab = net.embed_tokens.dims()[0];
        let per_chunk = (chunk_elems / vocab.max(1)).max(1);
        let mut rows: Vec<Row> = Vec::with_capacity(targets.len());
        // A chunk of rows' logits at a time; each chunk's rows in parallel,
        // kept in order, so the sums are the same on any core count.
        for (start, targets) in (0..).step_by(per_chunk).zip(targets.chunks(per_chunk)) {
            let logits = net.lm_head(hidden.clone().narrow(0, start, targets.len()));
            let probs: Vec<f32> = softmax(logits, 1)
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("probabilities are floats");
            rows.par_extend(
                probs
                    .par_chunks(vocab)
                    .zip(targets)
                    .map(|(p, &target)| Row::of(p, target as usize)),
            );
        }
        for (r, &(b, t)) in rows.iter().zip(&at) {
            self.all.add(r);
            match samples[b].classes.get(t + 1) {
                Some(TokenClass::ToolCall) => self.tool_call.add(r),
                _ => self.reasoning.add(r),
            }
        }
    }

    /// `{all, reasoning, tool_call}`.
    pub fn to_json(&self) -> Value {
        json!({
            "all": self.all.to_json(),
            "reasoning": self.reasoning.to_json(),
            "tool_call": self.tool_call.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confident_and_uniform_tokens() {
        let mut a = Acc::default();
        a.add(&Row::of(&[1.0, 0.0, 0.0, 0.0], 0));
        let j = a.to_json();
        assert_eq!(
            (j["entropy_bits"].as_f64(), j["top1"].as_f64()),
            (Some(0.0), Some(1.0))
        );
        assert_eq!(j["loss"].as_f64(), Some(0.0));
        let mut u = Acc::default();
        u.add(&Row::of(&[0.5, 0.5], 1));
        let j = u.to_json();
        assert_eq!(j["entropy_bits"].as_f64(), Some(1.0));
        assert_eq!(
            (j["top1"].as_f64(), j["top2"].as_f64()),
            (Some(0.5), Some(1.0))
        );
        assert!((j["perplexity"].as_f64().unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(Acc::default().to_json(), Value::Null);
    }

    /// On a random model: the overall loss is the decoder's mean loss, the
    /// classes split the tokens, and two rows of logits at a time give the
    /// same statistics as all at once.
    #[test]
    fn chunks_of_rows_give_the_whole_batchs_statistics() {
        use crate::model::init::random_tensors;
        use crate::model::{CausalLm, ModelConfig};
        use burn::backend::Flex;
        let cfg = json!({
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 50,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        });
        let config = ModelConfig::from_json(&cfg, std::path::Path::new("config.json")).unwrap();
        let net: CausalLm<Flex> = CausalLm::from_tensors(
            &config,
            random_tensors(&config, 0.5, 3),
            &Default::default(),
        )
        .unwrap();
        let sample = |len: usize, seed: u32| {
            let ids: Vec<u32> = (0..len as u32).map(|i| (i * 7 + seed) % 50).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| if i < 2 { -100 } else { id as i64 })
                .collect();
            let classes = (0..len)
                .map(|i| {
                    if i % 3 == 0 {
                        TokenClass::ToolCall
                    } else {
                        TokenClass::Reasoning
                    }
                })
                .collect();
            Sample {
                ids,
                labels,
                classes,
                truncated: false,
            }
        };
        let samples = [sample(9, 1), sample(6, 4)];
        let refs: Vec<&Sample> = samples.iter().collect();
        let padded = super::super::pad(&refs, 0);
        let mut whole = Stats::default();
        whole.add_chunked(&net, &refs, &padded, usize::MAX);
        let mut chunked = Stats::default();
        chunked.add_chunked(&net, &refs, &padded, 2 * 50);
        let (w, c) = (whole.to_json(), chunked.to_json());
        let (loss, n) = net.loss(&padded.0, &padded.1, &padded.2);
        assert_eq!(w["all"]["tokens"], n, "{w}");
        let loss: f32 = loss.into_scalar();
        assert!(
            (w["all"]["loss"].as_f64().unwrap() - loss as f64).abs() < 1e-5,
            "{w} vs {loss}"
        );
        let split =
            w["reasoning"]["tokens"].as_u64().unwrap() + w["tool_call"]["tokens"].as_u64().unwrap();
        assert_eq!(split, n as u64);
        for class in ["all", "reasoning", "tool_call"] {
            for (key, v) in w[class].as_object().unwrap() {
                let (a, b) = (v.as_f64().unwrap(), c[class][key].as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                    "{class}.{key}: {a} vs {b}"
                );
            }
        }
    }
}
