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
        let (ids, mask, labels) = padded;
        let Some((logits, targets, at)) = net.counted_logits(ids, mask, labels) else {
            return;
        };
        let vocab = logits.dims()[1];
        let probs: Vec<f32> = softmax(logits, 1)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("probabilities are floats");
        // Rows in parallel, summed in order: the same sums on any core count.
        let rows: Vec<Row> = probs
            .par_chunks(vocab)
            .zip(&targets)
            .map(|(p, &target)| Row::of(p, target as usize))
            .collect();
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
}
