//! Batched autoregressive generation with a KV cache: greedy or sampled
//! (temperature, top-k, top-p, seeded), stopping on end-of-sequence tokens,
//! stop strings or a length limit.
//!
//! Prompts are left-padded so every row's next token sits in the last column;
//! rows that finish leave the batch (and the cache) at once.

use burn::tensor::{Int, Tensor, TensorData};

use super::backend::ModelBackend;
use super::decoder::{CausalLm, KvCache, project};
use crate::rng::SplitMix64;

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax); otherwise logits are divided by it and sampled.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of the sampler; prompt `i` uses its own stream, so results do not
    /// depend on how prompts are batched.
    pub seed: u64,
    /// Per-prompt seeds, overriding `seed` when not empty (one per prompt):
    /// for callers that batch prompts in varying groups.
    pub row_seeds: Vec<u64>,
    /// Token ids that end a sequence (kept in the output ids).
    pub eos_token_ids: Vec<u32>,
    /// Strings that end a sequence (cut from the output text).
    pub stop: Vec<String>,
    /// Token used to left-pad prompts (never attended to).
    pub pad_token_id: u32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            row_seeds: Vec::new(),
            eos_token_ids: Vec::new(),
            stop: Vec::new(),
            pad_token_id: 0,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-sequence token was generated.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One prompt's continuation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// New token ids (an eos token that ended it included).
    pub ids: Vec<u32>,
    /// Why it ended.
    pub finish: Finish,
    /// The decoded text, cut before a stop string (when a decoder was given).
    pub text: Option<String>,
}

/// Turns token ids into text.
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> String;

/// Generates a continuation of every prompt. `decode` turns ids into text;
/// it is needed for stop strings and fills [`Generated::text`].
pub fn generate<B: ModelBackend>(
    net: &CausalLm<B>,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
    decode: Option<Decode<'_>>,
) -> Vec<Generated> {
    let device = net.embed_tokens.device();
    let n = prompts.len();
    let mut out: Vec<Generated> = (0..n)
        .map(|_| Generated {
            ids: Vec::new(),
            finish: Finish::Length,
            text: None,
        })
        .collect();
    if n == 0 {
        return out;
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut key_valid: Vec<Vec<bool>> = Vec::with_capacity(n);
    for p in prompts {
        let pad = width - p.len();
        let mut row = vec![opts.pad_token_id; pad];
        row.extend_from_slice(p);
        ids.push(row);
        let mut pos = vec![0usize; pad];
        pos.extend(0..p.len());
        positions.push(pos);
        let mut valid = vec![false; pad];
        valid.extend(std::iter::repeat_n(true, p.len()));
        key_valid.push(valid);
    }
    let mut next_pos: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut rngs: Vec<SplitMix64> = (0..n)
        .map(|i| match opts.row_seeds.get(i) {
            Some(&s) => SplitMix64(s),
            None => SplitMix64(opts.seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)),
        })
        .collect();
    let mut active: Vec<usize> = (0..n).collect();
    let mut cache = KvCache::new(net.layers.len());
    let mut step_ids = ids;
    let mut step_pos = positions;
    let mut decoded_len: Vec<usize> = vec![0; n];
    let (head_w, head_b) = net.inference_head();
    for _ in 0..opts.max_new_tokens {
        let pos = net.positions(&step_pos, &key_valid, &device);
        let input = CausalLm::<B>::ids_tensor(&step_ids, &device);
        let hidden = net.forward_hidden(input, &pos, Some(&mut cache));
        let [b, t, _] = hidden.dims();
        let logits = net.cap_logits(project(
            hidden.narrow(1, t - 1, 1),
            head_w.clone(),
            head_b.clone(),
            false,
        ));
        let vocab = logits.dims()[2];
        let values: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("logits are floats");
        let mut keep = Vec::with_capacity(b);
        for (row, &seq) in active.iter().enumerate() {
            let l = &values[row * vocab..(row + 1) * vocab];
            let tok = choose(l, opts, &mut rngs[seq]);
            let g = &mut out[seq];
            g.ids.push(tok);
            let mut done = false;
            if opts.eos_token_ids.contains(&tok) {
                g.finish = Finish::Eos;
                done = true;
            } else if !opts.stop.is_empty()
                && let Some(decode) = decode
            {
                let text = decode(&g.ids);
                // Only text after what was already checked can complete a stop string.
                let from = decoded_len[seq].saturating_sub(max_len(&opts.stop));
                let from = floor_char_boundary(&text, from);
                if let Some(cut) = find_stop(&text, from, &opts.stop) {
                    g.finish = Finish::Stop;
                    g.text = Some(text[..cut].to_owned());
                    done = true;
                }
                decoded_len[seq] = text.len();
            }
            if !done {
                keep.push(row);
            }
        }
        let last: Vec<u32> = active
            .iter()
            .map(|&s| *out[s].ids.last().unwrap())
            .collect();
        if keep.len() < active.len() {
            if keep.is_empty() {
                active.clear();
                break;
            }
            let rows: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
            let len = rows.len();
            cache.retain_rows(Tensor::<B, 1, Int>::from_data(
                TensorData::new(rows, [len]),
                &device,
            ));
        }
        let mut new_active = Vec::with_capacity(keep.len());
        let mut new_valid = Vec::with_capacity(keep.len());
        step_ids = Vec::with_capacity(keep.len());
        step_pos = Vec::with_capacity(keep.len());
        for &row in &keep {
            let seq = active[row];
            new_active.push(seq);
            let mut v = std::mem::take(&mut key_valid[row]);
            v.push(true);
            new_valid.push(v);
            step_ids.push(vec![last[row]]);
            step_pos.push(vec![next_pos[seq]]);
            next_pos[seq] += 1;
        }
        active = new_active;
        key_valid = new_valid;
    }
    if let Some(decode) = decode {
        for g in &mut out {
            if g.text.is_none() {
                g.text = Some(decode(&g.ids));
            }
        }
    }
    out
}

fn max_len(stop: &[String]) -> usize {
    stop.iter().map(String::len).max().unwrap_or(0)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Byte offset of the earliest stop string starting at or after `from`.
fn find_stop(text: &str, from: usize, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
        .min()
}

/// Picks the next token from one row of logits.
pub fn choose(logits: &[f32], opts: &GenerateOptions, rng: &mut SplitMix64) -> u32 {
    if opts.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / opts.temperature))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if opts.top_k > 0 && opts.top_k < cand.len() {
        cand.truncate(opts.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if opts.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= opts.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let mut u = rng.unit();
    for (i, p) in probs.iter().enumerate() {
        if u < *p {
            return cand[i].0;
        }
        u -= p;
    }
    cand[probs.len() - 1].0
}

/// Index of the largest value (the first one on ties, as torch does).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_top_k_and_top_p() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let mut rng = SplitMix64(7);
        let greedy = GenerateOptions::default();
        assert_eq!(choose(&logits, &greedy, &mut rng), 1);
        let top1 = GenerateOptions {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert!((0..50).all(|_| choose(&logits, &top1, &mut rng) == 1));
        let top2 = GenerateOptions {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let seen: std::collections::BTreeSet<u32> =
            (0..200).map(|_| choose(&logits, &top2, &mut rng)).collect();
        assert_eq!(seen, [1, 2].into());
        // p(1) = 0.665 of all four: top_p 0.5 keeps only token 1.
        let nucleus = GenerateOptions {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        assert!((0..50).all(|_| choose(&logits, &nucleus, &mut rng) == 1));
    }

    #[test]
    fn stop_strings() {
        let stop = vec!["</a>".to_owned(), "\n\n".to_owned()];
        assert_eq!(find_stop("x</a>y\n\n", 0, &stop), Some(1));
        assert_eq!(
            find_stop("héllo", floor_char_boundary("héllo", 2), &stop),
            None
        );
    }
}
