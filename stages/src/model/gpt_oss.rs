//! gpt-oss checkpoints. A layer's experts are stacked tensors there —
//! `mlp.experts.gate_up_proj` `[experts, hidden, 2 · width]` with gate and up
//! columns interleaved, `mlp.experts.down_proj` `[experts, width, hidden]`,
//! their biases `[experts, …]`, the router `mlp.router` — or, as OpenAI
//! publishes them, MXFP4-quantised (`…_blocks`, `…_scales`). anneal holds each
//! expert as the other mixtures do (`mlp.experts.N.gate_proj.weight` `[width,
//! hidden]`, …, the router as `mlp.gate`); these functions convert between
//! the two on load and save.

use std::collections::BTreeMap;

use anyhow::bail;

use super::config::ModelConfig;
use super::weights::HostTensor;

/// FP4 (E2M1) values by their 4-bit code, as the MXFP4 format defines them.
const FP4: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Dequantises MXFP4 `blocks` `[experts, rows, groups, 16]` (bytes, two
/// 4-bit codes each, low nibble first) with `scales` `[experts, rows, groups]`
/// (E8M0 exponents, biased by 127), as transformers'
/// `convert_moe_packed_tensors`: `[experts, groups · 32, rows]`, the stacked
/// parameter's layout.
pub fn dequantize_mxfp4(
    name: &str,
    blocks: &HostTensor,
    scales: &HostTensor,
) -> anyhow::Result<HostTensor> {
    let (b, s) = (&blocks.shape, &scales.shape);
    if b.len() != 4 || b[3] != 16 || s.len() != 3 || b[..3] != s[..] {
        bail!(
            "'{name}_blocks' {b:?} and '{name}_scales' {s:?} are not MXFP4 blocks [experts, rows, \
             groups, 16] with scales [experts, rows, groups]"
        );
    }
    let (experts, rows, groups) = (b[0], b[1], b[2]);
    let cols = groups * 32;
    let mut out = vec![0f32; experts * cols * rows];
    for e in 0..experts {
        for r in 0..rows {
            for g in 0..groups {
                let at = (e * rows + r) * groups + g;
                let exp = scales.data[at] as i32 - 127;
                let scale = 2f32.powi(exp);
                for (j, &byte) in blocks.data[at * 16..at * 16 + 16].iter().enumerate() {
                    let byte = byte as u8;
                    for (half, code) in [(0, byte & 0x0f), (1, byte >> 4)] {
                        let c = g * 32 + 2 * j + half;
                        out[(e * cols + c) * rows + r] = FP4[code as usize] * scale;
                    }
                }
            }
        }
    }
    Ok(HostTensor {
        shape: vec![experts, cols, rows],
        data: out,
    })
}

/// The checkpoint's tensors under anneal's names: each layer's stacked (or
/// MXFP4) experts split per expert, the router renamed. Other tensors pass
/// through.
pub fn unstack(
    config: &ModelConfig,
    mut tensors: BTreeMap<String, HostTensor>,
) -> anyhow::Result<BTreeMap<String, HostTensor>> {
    let Some((h, w, n)) = sizes(config) else {
        return Ok(tensors);
    };
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}.mlp");
        rename(&mut tensors, &p, "router", "gate");
        let mut take = |name: &str, shape: &[usize]| -> anyhow::Result<HostTensor> {
            let full = format!("{p}.experts.{name}");
            let t = match tensors.remove(&full) {
                Some(t) => t,
                None => match (
                    tensors.remove(&format!("{full}_blocks")),
                    tensors.remove(&format!("{full}_scales")),
                ) {
                    (Some(b), Some(s)) => dequantize_mxfp4(&full, &b, &s)?,
                    _ => bail!(
                        "checkpoint has no tensor '{full}' (expected shape {shape:?}), nor its \
                         MXFP4 '{full}_blocks' and '{full}_scales'"
                    ),
                },
            };
            if t.shape != shape {
                bail!(
                    "tensor '{full}' has shape {:?}, but config.json implies {shape:?}",
                    t.shape
                );
            }
            Ok(t)
        };
        let gate_up = take("gate_up_proj", &[n, h, 2 * w])?;
        let gate_up_bias = take("gate_up_proj_bias", &[n, 2 * w])?;
        let down = take("down_proj", &[n, w, h])?;
        let down_bias = take("down_proj_bias", &[n, h])?;
        for x in 0..n {
            let at = format!("{p}.experts.{x}");
            let gu = &gate_up.data[x * h * 2 * w..(x + 1) * h * 2 * w];
            let gub = &gate_up_bias.data[x * 2 * w..(x + 1) * 2 * w];
            // `[hidden, 2w]` with gate columns even, up columns odd, to
            // `[w, hidden]` each.
            for (name, odd) in [("gate_proj", 0), ("up_proj", 1)] {
                let mut m = vec![0f32; w * h];
                for i in 0..h {
                    for j in 0..w {
                        m[j * h + i] = gu[i * 2 * w + 2 * j + odd];
                    }
                }
                tensors.insert(format!("{at}.{name}.weight"), host(vec![w, h], m));
                let b = (0..w).map(|j| gub[2 * j + odd]).collect();
                tensors.insert(format!("{at}.{name}.bias"), host(vec![w], b));
            }
            let d = host(vec![w, h], down.data[x * w * h..(x + 1) * w * h].to_vec());
            tensors.insert(format!("{at}.down_proj.weight"), d.transposed());
            let db = down_bias.data[x * h..(x + 1) * h].to_vec();
            tensors.insert(format!("{at}.down_proj.bias"), host(vec![h], db));
        }
    }
    Ok(tensors)
}

/// anneal's tensors under the checkpoint's names: the inverse of
/// [`unstack`] (never quantised).
pub fn stack(
    config: &ModelConfig,
    mut tensors: BTreeMap<String, HostTensor>,
) -> BTreeMap<String, HostTensor> {
    let Some((h, w, n)) = sizes(config) else {
        return tensors;
    };
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}.mlp");
        rename(&mut tensors, &p, "gate", "router");
        let (mut gate_up, mut gate_up_bias) = (vec![0f32; n * h * 2 * w], vec![0f32; n * 2 * w]);
        let (mut down, mut down_bias) = (Vec::with_capacity(n * w * h), Vec::new());
        for x in 0..n {
            let at = format!("{p}.experts.{x}");
            let mut take = |name: &str| {
                tensors
                    .remove(&format!("{at}.{name}"))
                    .expect("the model holds every expert's weights and biases")
            };
            for (name, odd) in [("gate_proj", 0), ("up_proj", 1)] {
                let m = take(&format!("{name}.weight"));
                let gu = &mut gate_up[x * h * 2 * w..(x + 1) * h * 2 * w];
                for i in 0..h {
                    for j in 0..w {
                        gu[i * 2 * w + 2 * j + odd] = m.data[j * h + i];
                    }
                }
                let b = take(&format!("{name}.bias"));
                for j in 0..w {
                    gate_up_bias[x * 2 * w + 2 * j + odd] = b.data[j];
                }
            }
            down.extend(take("down_proj.weight").transposed().data);
            down_bias.extend(take("down_proj.bias").data);
        }
        let e = format!("{p}.experts");
        tensors.insert(
            format!("{e}.gate_up_proj"),
            host(vec![n, h, 2 * w], gate_up),
        );
        tensors.insert(
            format!("{e}.gate_up_proj_bias"),
            host(vec![n, 2 * w], gate_up_bias),
        );
        tensors.insert(format!("{e}.down_proj"), host(vec![n, w, h], down));
        tensors.insert(format!("{e}.down_proj_bias"), host(vec![n, h], down_bias));
    }
    tensors
}

/// `(hidden, expert width, experts)`, or `None` without experts.
fn sizes(config: &ModelConfig) -> Option<(usize, usize, usize)> {
    let moe = config.moe.as_ref()?;
    Some((
        config.hidden_size,
        moe.expert_intermediate_size,
        moe.num_experts,
    ))
}

/// Renames the router's weight and bias under `mlp` from `from` to `to`.
fn rename(tensors: &mut BTreeMap<String, HostTensor>, mlp: &str, from: &str, to: &str) {
    for part in ["weight", "bias"] {
        if let Some(t) = tensors.remove(&format!("{mlp}.{from}.{part}")) {
            tensors.insert(format!("{mlp}.{to}.{part}"), t);
        }
    }
}

fn host(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
    HostTensor { shape, data }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn config() -> ModelConfig {
        let v = json!({"model_type": "gpt_oss", "vocab_size": 8, "hidden_size": 64,
            "intermediate_size": 3, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "num_local_experts": 2,
            "num_experts_per_tok": 1});
        ModelConfig::from_json(&v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn unstack_then_stack_gives_the_checkpoint_back() {
        let c = config();
        let seq = |shape: Vec<usize>, k: f32| {
            let n = shape.iter().product::<usize>();
            host(shape, (0..n).map(|i| i as f32 * k).collect())
        };
        let p = "model.layers.0.mlp";
        let stacked: BTreeMap<String, HostTensor> = [
            (
                format!("{p}.experts.gate_up_proj"),
                seq(vec![2, 64, 6], 1.0),
            ),
            (
                format!("{p}.experts.gate_up_proj_bias"),
                seq(vec![2, 6], 0.5),
            ),
            (format!("{p}.experts.down_proj"), seq(vec![2, 3, 64], -1.0)),
            (format!("{p}.experts.down_proj_bias"), seq(vec![2, 64], 2.0)),
            (format!("{p}.router.weight"), seq(vec![2, 64], 3.0)),
            (format!("{p}.router.bias"), seq(vec![2], 4.0)),
        ]
        .into_iter()
        .collect();
        let ours = unstack(&c, stacked.clone()).unwrap();
        // Expert 1's up projection: odd columns of its [64, 6] block, transposed.
        let up = &ours[&format!("{p}.experts.1.up_proj.weight")];
        assert_eq!(up.shape, [3, 64]);
        assert_eq!(up.data[2 * 64 + 5], (64 * 6 + 5 * 6 + 2 * 2 + 1) as f32);
        assert_eq!(
            ours[&format!("{p}.experts.1.gate_proj.bias")].data,
            [3.0, 4.0, 5.0]
        );
        assert!(ours.contains_key(&format!("{p}.gate.bias")));
        assert_eq!(stack(&c, ours), stacked);
    }

    #[test]
    fn mxfp4_blocks_dequantise_by_code_and_exponent() {
        // One expert, 2 rows, 2 groups of 32 values.
        let mut blocks = vec![0f32; 2 * 2 * 16];
        blocks[0] = f32::from(0x71u8); // row 0, group 0: codes 1 (0.5), 7 (6.0)
        blocks[16 + 15] = f32::from(0x9fu8); // row 0, group 1, last byte: -6.0, -0.5
        blocks[32] = f32::from(0x02u8); // row 1, group 0: 1.0, 0.0
        let scales = host(vec![1, 2, 2], vec![127.0, 129.0, 126.0, 127.0]);
        let t = dequantize_mxfp4("x", &host(vec![1, 2, 2, 16], blocks), &scales).unwrap();
        assert_eq!(t.shape, [1, 64, 2]);
        let at = |col: usize, row: usize| t.data[col * 2 + row];
        assert_eq!((at(0, 0), at(1, 0)), (0.5, 6.0));
        assert_eq!((at(62, 0), at(63, 0)), (-24.0, -2.0));
        assert_eq!((at(0, 1), at(1, 1)), (0.5, 0.0));
        let bad = dequantize_mxfp4("x", &host(vec![1, 2, 2, 8], vec![0.0; 32]), &scales);
        assert!(format!("{:#}", bad.unwrap_err()).contains("'x_blocks' [1, 2, 2, 8]"));
    }
}
