//! The burn decoders against transformers: logits, loss, greedy generation and
//! save/load on the tiny fixtures in `../shared/fixtures`, and SmolLM2-135M
//! built from PyPI by `../shared/models/smollm2_from_pypi.py` (see `.ci/smollm2.sh`).

mod common;

use std::path::{Path, PathBuf};

use anneal_stages::model::{GenerateOptions, Model, ModelBackend, SaveDtype, generate};
use burn::backend::Flex;
use burn::tensor::ElementConversion;
use common::{Batch, batch, fixture, json, max_diff_unpadded, reference, shared};
use serde_json::Value;

type B = Flex;

/// How close a backend must come to transformers.
struct Tol {
    /// Largest |logit difference|.
    logits: f64,
    /// Relative loss difference.
    loss: f64,
}

const CPU_TOL: Tol = Tol {
    logits: 1e-4,
    loss: 1e-5,
};

fn logits_of<B: ModelBackend>(model: &Model<B>, b: &Batch) -> Vec<f32> {
    model
        .net
        .logits(&b.ids, &b.mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap()
}

fn check_fixture<B: ModelBackend>(name: &str, device: &B::Device, tol: &Tol) {
    check_dir::<B>(name, &fixture(name), device, tol);
}

fn check_dir<B: ModelBackend>(name: &str, dir: &Path, device: &B::Device, tol: &Tol) {
    let dir = dir.to_path_buf();
    let model = Model::<B>::load(&dir, device).unwrap();
    let r = reference(&dir);
    let refj = json(&dir.join("reference.json"));
    let b = batch(&r);
    let (shape, want) = &r["logits"];
    let (t, v) = (shape[1], shape[2]);
    let got = logits_of(&model, &b);
    assert_eq!(got.len(), want.len());
    let worst = max_diff_unpadded(&got, want, &b.mask, t, v);
    let compared: usize = b.mask.iter().flatten().filter(|m| **m).count();
    eprintln!("{name}: max |logit diff| {worst:e} over {compared} positions");
    assert!(
        worst <= tol.logits,
        "{name}: max |logit diff| {worst:e} > {:e}",
        tol.logits
    );

    let (loss, n) = model.net.loss(&b.ids, &b.mask, &b.labels);
    assert!(n > 0);
    let loss = loss.into_scalar().elem::<f64>();
    let want_loss = refj["loss"].as_f64().unwrap();
    let rel = ((loss - want_loss) / want_loss).abs();
    eprintln!("{name}: loss {loss} vs {want_loss} (rel {rel:e})");
    assert!(
        rel <= tol.loss,
        "{name}: loss {loss} vs {want_loss} (rel {rel:e})"
    );

    // Greedy generation with the KV cache, no early stop on eos.
    let g = &refj["generate"];
    let prompt: Vec<u32> = ids_of(&g["prompt_ids"]);
    let want_new: Vec<u32> = ids_of(&g["new_ids"]);
    let opts = GenerateOptions {
        max_new_tokens: want_new.len(),
        ..Default::default()
    };
    let out = generate(&model.net, std::slice::from_ref(&prompt), &opts, None);
    assert_eq!(out[0].ids, want_new, "{name}: greedy tokens");
    // The same prompt batched with a shorter one (left padding) gives the
    // same tokens, and so does the shorter one.
    let short = prompt[prompt.len() / 2..].to_vec();
    let alone = generate(&model.net, std::slice::from_ref(&short), &opts, None);
    let out2 = generate(&model.net, &[short, prompt], &opts, None);
    assert_eq!(
        out2[1].ids, want_new,
        "{name}: greedy tokens in a padded batch"
    );
    assert_eq!(
        out2[0].ids, alone[0].ids,
        "{name}: greedy tokens of the padded prompt"
    );

    // Save -> load gives identical logits, single file and sharded.
    for (max_shard, dtype) in [(u64::MAX, SaveDtype::F32), (200_000, SaveDtype::F32)] {
        let out = tempfile::tempdir().unwrap();
        model.save(out.path(), dtype, max_shard).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.path().join(f).is_file(), "{f} saved");
        }
        // The same tensor names and shapes as transformers wrote; MXFP4
        // experts (`…_blocks` `[experts, out, in / 32, 16]` and `…_scales`)
        // are saved dequantised, `[experts, in, out]`, as transformers
        // saves them once dequantised.
        let names = |d: &Path| -> Vec<(String, Vec<usize>)> {
            let mut out: Vec<(String, Vec<usize>)> = anneal_stages::model::weights::load_dir(d)
                .unwrap()
                .into_iter()
                .filter(|(k, _)| !k.ends_with("_scales"))
                .map(|(k, v)| match k.strip_suffix("_blocks") {
                    Some(k) => {
                        let s = v.shape;
                        (k.to_owned(), vec![s[0], s[2] * 32, s[1]])
                    }
                    None => (k, v.shape),
                })
                .collect();
            out.sort();
            out
        };
        let config = std::fs::read_to_string(out.path().join("config.json")).unwrap();
        assert!(
            !config.contains("quantization_config"),
            "{name}: saved weights are not quantised"
        );
        assert_eq!(
            names(out.path()),
            names(&dir),
            "{name}: saved tensor layout"
        );
        let again = Model::<B>::load(out.path(), device).unwrap();
        assert_eq!(logits_of(&again, &b), got, "{name}: logits after save/load");
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Qwen3 (per-head q/k norms, a head wider than hidden / heads), Mistral,
/// sliding-window attention (Mistral's on every layer, Qwen2's from
/// `max_window_layers` on), Gemma 3, SmolLM3 (a NoPE layer), OLMo 2 (norms
/// after each block, q/k norms over all heads), OLMo 3 (sliding layers, YaRN
/// on the global one), YaRN on every layer (`qwen2-yarn`), multimodal Gemma 3
/// Gemma 2 (soft-capped scores and logits), Phi-3 (fused projections, a
/// window on every layer) and Phi-3 with LongRoPE on half of each head (the
/// batch within its original positions, the prompt past them), built by
/// transformers at test time from tiny-qwen2's sizes.
#[test]
fn tiny_archs_match_transformers() {
    let archs = [
        "qwen3",
        "mistral",
        "mistral-window",
        "qwen2-window",
        "gemma3",
        "smollm3",
        "olmo2",
        "olmo3",
        "qwen2-yarn",
        "gemma3-mm",
        "gemma2",
        "phi3",
        "phi3-longrope",
    ];
    let dirs = common::tiny_archs(&archs);
    for arch in archs {
        let dir = dirs.path().join(arch);
        check_dir::<B>(&format!("tiny-{arch}"), &dir, &Default::default(), &CPU_TOL);
    }
}

/// Mixtures of experts: Qwen3-MoE (top 2 of 4 renormalised, its second
/// layer dense), Mixtral and OLMoE (top 2 of 4 as they are), gpt-oss
/// (attention sinks, biased experts with a clamped SwiGLU; and with its
/// experts in MXFP4, as OpenAI publishes them), built by
/// transformers at test time from tiny-qwen2's sizes: logits of the padded
/// batch and greedy generation with the KV cache.
#[test]
fn tiny_moe_archs_match_transformers() {
    let archs = [
        "qwen2-moe",
        "qwen3-moe",
        "mixtral",
        "mixtral-aux",
        "olmoe",
        "gpt-oss",
        "gpt-oss-mxfp4",
    ];
    let dirs = common::tiny_archs(&archs);
    for arch in archs {
        let dir = dirs.path().join(arch);
        check_dir::<B>(&format!("tiny-{arch}"), &dir, &Default::default(), &CPU_TOL);
    }
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_fixture::<B>("tiny-qwen2", &Default::default(), &CPU_TOL);
}

#[test]
fn tiny_llama_matches_transformers() {
    check_fixture::<B>("tiny-llama", &Default::default(), &CPU_TOL);
}

#[test]
fn load_errors_name_the_tensor() {
    let src = fixture("tiny-llama");
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let model = Model::<B>::load(&src, &device).unwrap();
    let mut tensors = model.net.to_tensors();
    let t = tensors.remove("model.layers.1.mlp.up_proj.weight").unwrap();
    tensors.insert("model.layers.1.mlp.extra.weight".into(), t);
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    anneal_stages::model::weights::save_dir(dir.path(), &tensors, SaveDtype::F32, u64::MAX)
        .unwrap();
    let e = format!("{:#}", Model::<B>::load(dir.path(), &device).unwrap_err());
    assert!(
        e.contains("no tensor 'model.layers.1.mlp.up_proj.weight'"),
        "{e}"
    );
}

/// SmolLM2-135M-Instruct, built from PyPI by `.ci/smollm2.sh`.
fn smollm2_path() -> PathBuf {
    std::env::var_os("ANNEAL_SMOLLM2_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/smollm2"))
}

#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
fn smollm2_dir_exists() -> bool {
    smollm2_path().join("model.safetensors").is_file()
}

fn smollm2_dir() -> PathBuf {
    let dir = smollm2_path();
    assert!(
        dir.join("model.safetensors").is_file(),
        "SmolLM2 checkpoint not found in {}; build it with `bash .ci/smollm2.sh` \
         (or point ANNEAL_SMOLLM2_DIR at it)",
        dir.display()
    );
    dir
}

#[test]
fn smollm2_reproduces_transformers() {
    smollm2_check::<B>(&Default::default());
}

fn smollm2_check<B: ModelBackend>(device: &B::Device) {
    let dir = smollm2_dir();
    let refj = json(&shared().join("models/smollm2-reference.json"));
    let model = Model::<B>::load(&dir, device).unwrap();
    let cases = refj["generate"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["prompt_ids"])).collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| ids_of(&c["greedy_new_ids"])).collect();
    let opts = GenerateOptions {
        max_new_tokens: want.iter().map(Vec::len).max().unwrap(),
        ..Default::default()
    };
    let out = generate(&model.net, &prompts, &opts, None);
    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
        assert_eq!(&g.ids[..w.len()], &w[..], "prompt {i}: greedy tokens");
    }
    let sft = &refj["sft_loss"];
    let ids = vec![ids_of(&sft["input_ids"])];
    let labels: Vec<Vec<i64>> = vec![
        sft["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect(),
    ];
    let mask = vec![vec![true; ids[0].len()]];
    let (loss, _) = model.net.loss(&ids, &mask, &labels);
    let loss = loss.into_scalar().elem::<f64>();
    let want_loss = sft["loss"].as_f64().unwrap();
    let rel = ((loss - want_loss) / want_loss).abs();
    eprintln!("smollm2: SFT loss {loss} vs {want_loss} (rel {rel:e})");
    assert!(rel <= 1e-3, "SFT loss {loss} vs {want_loss} (rel {rel:e})");
}

#[test]
fn generation_stops_on_stop_strings_and_eos() {
    use anneal_stages::model::Finish;
    use anneal_stages::model::tokenizer::Tokenizer;
    let dir = fixture("tiny-qwen2");
    let model = Model::<B>::load(&dir, &Default::default()).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let refj = json(&dir.join("reference.json"));
    let prompt = ids_of(&refj["generate"]["prompt_ids"]);
    let want = ids_of(&refj["generate"]["new_ids"]);
    let decode = |ids: &[u32]| tok.decode(ids, false).unwrap();
    let full = decode(&want);
    // A stop string spanning tokens 5..7 of the greedy continuation.
    let start = decode(&want[..5]).len();
    let stop = full[start..].chars().take(3).collect::<String>();
    let cut = full.find(&stop).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        stop: vec![stop.clone()],
        ..Default::default()
    };
    let g = &generate(
        &model.net,
        std::slice::from_ref(&prompt),
        &opts,
        Some(&decode),
    )[0];
    assert_eq!(g.finish, Finish::Stop, "stop {stop:?} in {full:?}");
    assert_eq!(g.text.as_deref(), Some(&full[..cut]));
    assert_eq!(&want[..g.ids.len()], &g.ids[..]);
    // The fourth greedy token as eos: it ends the sequence and is kept.
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        eos_token_ids: vec![want[3]],
        ..Default::default()
    };
    let first = want.iter().position(|&t| t == want[3]).unwrap();
    let g = &generate(&model.net, &[prompt], &opts, None)[0];
    assert_eq!((g.finish, &g.ids[..]), (Finish::Eos, &want[..=first]));
}

/// The same checks on burn's CUDA backend, where a GPU is present (built with
/// `--features cuda`; see `bench/device.sh`), or on burn's wgpu backend
/// standing in for it (`--features gpu-on-wgpu`; see `bench/gpu_on_wgpu.sh`).
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
mod cuda {
    use super::*;

    /// f32 matmuls on the GPU may sum in another order (or in TF32): looser
    /// than the CPU, still far below the effect of any real bug.
    const CUDA_TOL: Tol = Tol {
        logits: 2e-3,
        loss: 1e-4,
    };

    #[test]
    fn tiny_fixtures_match_transformers_on_cuda() {
        let Some(device) = common::gpu() else { return };
        for name in ["tiny-qwen2", "tiny-llama"] {
            check_fixture::<anneal_stages::model::device::Gpu>(name, &device, &CUDA_TOL);
        }
    }

    /// Qwen3, the sliding windows, Gemma 3, SmolLM3, OLMo 2 and 3, YaRN,
    /// Gemma 2, Phi-3 and the mixtures of experts, from checkpoints
    /// transformers builds here (`common::tiny_archs`).
    #[test]
    fn tiny_archs_match_transformers_on_cuda() {
        let Some(device) = common::gpu() else { return };
        let archs = [
            "qwen3",
            "mistral-window",
            "qwen2-window",
            "gemma3",
            "smollm3",
            "olmo2",
            "olmo3",
            "qwen2-yarn",
            "gemma2",
            "phi3",
            "phi3-longrope",
            "qwen2-moe",
            "qwen3-moe",
            "mixtral",
            "mixtral-aux",
            "olmoe",
            "gpt-oss",
        ];
        let dirs = common::tiny_archs(&archs);
        for arch in archs {
            let dir = dirs.path().join(arch);
            check_dir::<anneal_stages::model::device::Gpu>(
                &format!("tiny-{arch}"),
                &dir,
                &device,
                &CUDA_TOL,
            );
        }
    }

    #[test]
    fn smollm2_matches_transformers_on_cuda() {
        let Some(device) = common::gpu() else { return };
        if !smollm2_dir_exists() {
            eprintln!("no SmolLM2 checkpoint (ANNEAL_SMOLLM2_DIR): test skipped");
            return;
        }
        smollm2_check::<anneal_stages::model::device::Gpu>(&device);
    }
}
