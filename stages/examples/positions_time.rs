//! Host time of building a forward pass's rotary tables and attention mask
//! (`CausalLm::positions` and `positions_packed`) at the GPU benchmark's
//! shape: batch 4, 2,048 tokens, Qwen2.5-0.5B's heads (14 query heads over 2
//! kv heads, head dim 64), on the CPU backend. With 2 kv heads the time
//! includes Flex copying the mask into the grouped-query layout; with 14 (no
//! grouping) it is the host work and upload alone.
//!
//!   cargo run --release -p anneal-stages --example positions_time

use std::time::Instant;

use anneal_stages::model::{CausalLm, ModelConfig, init::random_tensors};
use burn::backend::Flex;
use serde_json::json;

fn main() {
    let device = Default::default();
    let (b, t) = (4, 2048);
    let positions: Vec<Vec<usize>> = (0..b).map(|_| (0..t).collect()).collect();
    let valid: Vec<Vec<bool>> = (0..b)
        .map(|r| (0..t).map(|j| j < t - 100 * r).collect())
        .collect();
    let segments: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..t).map(|j| (j / 300) as u32).collect())
        .collect();
    for kv_heads in [2, 14] {
        let cfg = json!({
            "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 896, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 14, "num_key_value_heads": kv_heads, "vocab_size": 64,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": true,
        });
        let config = ModelConfig::from_json(&cfg, std::path::Path::new("config.json")).unwrap();
        let net =
            CausalLm::<Flex>::from_tensors(&config, random_tensors(&config, 0.02, 0), &device)
                .unwrap();
        let (mut plain, mut packed) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t0 = Instant::now();
            drop(net.positions(&positions, &valid, &device));
            plain.push(t0.elapsed().as_secs_f64() * 1e3);
            let t0 = Instant::now();
            drop(net.positions_packed(&segments, &device));
            packed.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        for v in [&mut plain, &mut packed] {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "kv_heads={kv_heads} positions_median_ms={:.1} positions_packed_median_ms={:.1}",
            plain[2], packed[2]
        );
    }
}
