//! One optimisation step against PyTorch on the tiny fixtures: full fine-tuning
//! (AdamW, decay groups, global-norm clipping) and LoRA from a PEFT adapter.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use anneal_stages::model::checkpoint;
use anneal_stages::model::decoder::{arange_rows, shifted_targets};
use anneal_stages::model::lora;
use anneal_stages::model::optim::{AdamW, AdamWConfig, Grads};
use anneal_stages::model::weights::HostTensor;
use anneal_stages::model::{CausalLm, Model, TrainBackend};
use burn::backend::{Autodiff, Flex};
use burn::tensor::ElementConversion;
use common::{Batch, batch, fixture, json, max_diff_unpadded, python_json};
use serde_json::Value;

type AB = Autodiff<Flex>;

struct Ref {
    json: Value,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

fn reference(dir: &Path) -> Ref {
    Ref {
        json: json(&dir.join("reference.json")),
        tensors: common::reference(dir),
    }
}

/// Held by every test here that seeds or draws from the backend's generator,
/// which is one per process: a test comparing two seeded passes must not have
/// another test reseed it between them.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

/// How close a backend must come to torch after one step.
struct Tol {
    /// Relative difference of losses and the gradient norm.
    rel: f64,
    /// Largest difference of an updated weight.
    weight: f64,
    /// Largest |logit difference| with the LoRA adapter.
    logits: f64,
    /// Largest difference of an updated weight whose gradient is below 1e-6
    /// (see `full_step`), as a fraction of the learning rate.
    ill: f64,
}

const CPU_TOL: Tol = Tol {
    rel: 1e-4,
    weight: 1e-5,
    logits: 1e-4,
    ill: 0.5,
};

fn loss_of<AB: TrainBackend>(net: &CausalLm<AB>, b: &Batch) -> f64 {
    net.loss(&b.ids, &b.mask, &b.labels)
        .0
        .into_scalar()
        .elem::<f64>()
}

/// The loss of one batch and its gradients: by autodiff of the whole pass
/// or, with `ckpt`, with gradient checkpointing (dropout seed 0).
fn loss_and_grads<AB: TrainBackend>(
    net: &CausalLm<AB>,
    b: &Batch,
    ckpt: bool,
) -> (f64, Grads<AB::InnerBackend>) {
    let mut g = Grads::default();
    if ckpt {
        let pos = net.positions(&arange_rows(&b.ids), &b.mask, &net.embed_tokens.device());
        let k = shifted_targets(&b.labels, b.ids[0].len()).0.len();
        let (loss, _) =
            checkpoint::loss_and_grads(net, &b.ids, &pos, &b.labels, 0, k, &mut g).unwrap();
        (loss.into_scalar().elem::<f64>(), g)
    } else {
        let (loss, _) = net.loss(&b.ids, &b.mask, &b.labels);
        let before = loss.clone().into_scalar().elem::<f64>();
        g.accumulate(net, &loss.backward());
        (before, g)
    }
}

fn full_step<AB: TrainBackend>(name: &str, device: &AB::Device, tol: &Tol, ckpt: bool) {
    full_step_in::<AB>(name, &fixture(name), device, tol, ckpt);
}

/// Our module path of the HF weight `name` (where our gradients are kept;
/// Mixtral's experts under transformers 5's in-memory names).
fn module_path(name: &str) -> String {
    match name {
        "model.embed_tokens.weight" => "embed_tokens".into(),
        n => {
            let n = n.strip_prefix("model.").unwrap_or(n);
            let n = n.replace(".block_sparse_moe.", ".mlp.");
            [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")]
                .iter()
                .fold(n, |n, (a, b)| {
                    n.replace(&format!(".{a}."), &format!(".{b}."))
                })
        }
    }
}

/// Clips `g` at 1.0 and takes one AdamW step (weight decay 0.1) at
/// `ts["lr"]`, checking the gradient norm before clipping and the loss after
/// the step against torch's in `ts` (`train_step` or `lora_train_step`).
/// Returns the stepped net, the norm and the rate.
fn torch_step<AB: TrainBackend>(
    what: &str,
    net: CausalLm<AB>,
    g: &mut Grads<AB::InnerBackend>,
    b: &Batch,
    ts: &Value,
    tol: &Tol,
) -> (CausalLm<AB>, f64, f64) {
    let norm = g.clip(1.0);
    let want_norm = ts["grad_norm_before_clip"].as_f64().unwrap();
    eprintln!("{what}: grad norm {norm} vs {want_norm}");
    assert!(
        rel(norm, want_norm) < tol.rel,
        "{what}: grad norm {norm} vs {want_norm}"
    );
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    });
    let lr = ts["lr"].as_f64().unwrap();
    let net = opt.step(net, g, lr);
    let after = loss_of(&net, b);
    let want_after = ts["loss_after"].as_f64().unwrap();
    eprintln!("{what}: loss after {after} vs {want_after}");
    assert!(
        rel(after, want_after) < tol.rel,
        "{what}: loss after {after} vs {want_after}"
    );
    (net, norm, lr)
}

fn full_step_in<AB: TrainBackend>(
    name: &str,
    dir: &Path,
    device: &AB::Device,
    tol: &Tol,
    ckpt: bool,
) {
    let r = reference(dir);
    let ts = &r.json["train_step"];
    let b = batch(&r.tensors);
    let model = Model::<AB>::load(dir, device).unwrap();
    let (before, mut g) = loss_and_grads(&model.net, &b, ckpt);
    assert!(
        rel(before, ts["loss_before"].as_f64().unwrap()) < tol.rel,
        "{name}: loss before {before}"
    );
    // Every weight the reference holds after the step, with its gradient.
    let watched: Vec<(String, Option<Vec<f32>>)> = r
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("after_step."))
        .map(|t| {
            // None for an expert no token reached (its gradient is zero).
            let grad = g.map.get(&module_path(t));
            let grad = grad.map(|g| g.to_data().convert::<f32>().into_vec().unwrap());
            (t.to_owned(), grad)
        })
        .collect();
    let idle: Vec<&Value> = ts["idle_experts"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let unreached = watched.iter().filter(|(_, g)| g.is_none()).count();
    assert_eq!(
        unreached > 0,
        !idle.is_empty(),
        "{name}: torch's idle experts {idle:?}, ours {unreached} tensors without gradient"
    );
    assert!(watched.len() >= 2, "{name}: no after_step tensors");
    let (net, norm, lr) = torch_step(name, model.net, &mut g, &b, ts, tol);
    // Adam's first step moves each weight by about lr * g / (|g| + eps): where
    // the clipped gradient is within two orders of eps (1e-6) the update depends
    // on float32 rounding noise of a near-cancelled gradient, in torch as here,
    // and can land anywhere in (-lr, lr). Those elements are held to
    // `tol.ill * lr`: lr / 2 on the CPU (the matmul kernels' summation order,
    // AVX2 or AVX-512, moves them by up to ~lr / 4), lr on a GPU (0.71 lr seen
    // on wgpu); all others to `tol.weight`, as are the weights of an expert no
    // token reached, which only decay.
    let coef = (1.0 / (norm + 1e-6)).min(1.0);
    let tensors = net.to_tensors();
    for (t, grad) in &watched {
        let t = t.as_str();
        let got = &tensors[t].data;
        let want = &r.tensors[&format!("after_step.{t}")].1;
        let cols = *tensors[t].shape.last().unwrap();
        let rows = tensors[t].data.len() / cols;
        // Our gradients are in the module's layout: [in, out] for projections
        // (the matrices but the embedding).
        let transposed = tensors[t].shape.len() == 2 && !t.contains("embed_tokens");
        let ill = |k: usize| {
            let gk = match grad {
                None => return false,
                Some(g) if transposed => g[(k % cols) * rows + k / cols],
                Some(g) => g[k],
            };
            (gk as f64 * coef).abs() < 1e-6
        };
        step_matches(name, t, got, want, ill, tol, lr);
    }
}

/// Checks the tensor `t` after one step, `got`, against torch's, `want`:
/// elements where `ill` (whose gradient is below 1e-6, see `full_step_in`)
/// to `tol.ill * lr`, all others to `tol.weight`.
fn step_matches(
    name: &str,
    t: &str,
    got: &[f32],
    want: &[f64],
    ill: impl Fn(usize) -> bool,
    tol: &Tol,
    lr: f64,
) {
    assert_eq!(got.len(), want.len(), "{name}: {t}");
    let (mut worst, mut worst_ill, mut n_ill) = (0f64, 0f64, 0);
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        let d = (*a as f64 - b).abs();
        if ill(k) {
            n_ill += 1;
            worst_ill = worst_ill.max(d);
        } else {
            worst = worst.max(d);
        }
    }
    eprintln!(
        "{name}: {t}: max diff {worst:e}; {n_ill} of {} elements with |g| < 1e-6: max diff {worst_ill:e}",
        got.len()
    );
    assert!(worst <= tol.weight, "{name}: {t} differs by {worst:e}");
    assert!(
        worst_ill <= tol.ill * lr,
        "{name}: {t} differs by {worst_ill:e} where |g| < 1e-6"
    );
}

fn lora_step<AB: TrainBackend>(name: &str, device: &AB::Device, tol: &Tol, ckpt: bool) {
    let dir = fixture(name);
    let r = reference(&dir);
    let b = batch(&r.tensors);
    let model = Model::<AB>::load(&dir, device).unwrap();
    let (net, cfg) = lora::load_adapter(model.net, &dir.join("lora-init")).unwrap();
    assert_eq!((cfg.r, cfg.alpha, cfg.targets.len()), (4, 8.0, 7));
    // Logits with the adapter.
    let logits: Vec<f32> = net
        .logits(&b.ids, &b.mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let (shape, want) = &r.tensors["lora_logits"];
    let (t, v) = (shape[1], shape[2]);
    let worst = max_diff_unpadded(&logits, want, &b.mask, t, v);
    assert!(
        worst <= tol.logits,
        "{name}: lora logits differ by {worst:e}"
    );
    let ls = &r.json["lora_train_step"];
    let (before, g) = loss_and_grads(&net, &b, ckpt);
    assert!(
        rel(before, r.json["lora_loss"].as_f64().unwrap()) < tol.rel / 10.0,
        "{name}: lora loss {before}"
    );
    assert_eq!(
        g.map.len(),
        2 * 7 * 2,
        "only the LoRA factors have gradients"
    );
    assert!(
        g.map.keys().all(|k| k.contains("lora_")),
        "{:?}",
        g.map.keys()
    );
    let mut opt = AdamW::new(AdamWConfig::default());
    let net = opt.step(net, &g, 0.01);
    let after = loss_of(&net, &b);
    let want_after = ls["loss_after"].as_f64().unwrap();
    eprintln!("{name}: lora loss after {after} vs {want_after}");
    assert!(
        rel(after, want_after) < tol.rel,
        "{name}: lora loss after {after} vs {want_after}"
    );

    saved_adapter_matches_peft(name, &net, &cfg, &dir, &b, device, tol);
}

/// Saves `net`'s adapter `cfg` in PEFT format and checks it against PEFT's
/// `lora-init/` in `dir` (the tensor names and shapes, the config), then
/// loads it back (the same logits) and merges it (logits within
/// `tol.logits`).
fn saved_adapter_matches_peft<AB: TrainBackend>(
    name: &str,
    net: &CausalLm<AB>,
    cfg: &lora::LoraConfig,
    dir: &Path,
    b: &Batch,
    device: &AB::Device,
    tol: &Tol,
) {
    let out = tempfile::tempdir().unwrap();
    lora::save_adapter(net, cfg, None, out.path()).unwrap();
    // The same tensor names, shapes and config keys as PEFT wrote in lora-init/.
    let layout = |d: &Path| -> Vec<(String, Vec<usize>)> {
        let mut m = BTreeMap::new();
        anneal_stages::model::weights::load_file_into(&d.join("adapter_model.safetensors"), &mut m)
            .unwrap();
        m.into_iter().map(|(k, v)| (k, v.shape)).collect()
    };
    assert_eq!(layout(out.path()), layout(&dir.join("lora-init")));
    let cfg_json = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours, peft) = (cfg_json(out.path()), cfg_json(&dir.join("lora-init")));
    for k in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "bias",
        "fan_in_fan_out",
        "use_rslora",
        "use_dora",
    ] {
        assert_eq!(ours[k], peft[k], "adapter_config.json key {k}");
    }
    let sorted = |v: &Value| {
        let mut t: Vec<String> = serde_json::from_value(v.clone()).unwrap_or_default();
        t.sort();
        t
    };
    for k in ["target_modules", "target_parameters"] {
        assert_eq!(sorted(&ours[k]), sorted(&peft[k]), "{name}: {k}");
    }
    let base = Model::<AB>::load(dir, device).unwrap();
    let (again, cfg2) = lora::load_adapter(base.net, out.path()).unwrap();
    assert_eq!(&cfg2, cfg);
    let l1: Vec<f32> = net
        .logits(&b.ids, &b.mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let l2: Vec<f32> = again
        .logits(&b.ids, &b.mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    assert_eq!(l1, l2);
    // Merged into the base weights: the same function without adapters.
    let merged = lora::merge(again);
    let l3: Vec<f32> = merged
        .logits(&b.ids, &b.mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let worst = l1
        .iter()
        .zip(&l3)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        (worst as f64) < tol.logits,
        "{name}: merged logits differ by {worst:e}"
    );
}

/// Qwen3 (the per-head q/k norms train too), Mistral, Qwen2 with a sliding
/// window on its second layer (the backward pass under the window's mask),
/// Gemma 3, SmolLM3, OLMo 2, OLMo 3 (YaRN), multimodal Gemma 3 and Gemma 2
/// (the soft caps' gradients) and Phi-3 (fused projections), from
/// checkpoints transformers builds at test time.
#[test]
fn tiny_arch_full_steps_match_torch() {
    let archs = [
        "qwen3",
        "mistral",
        "qwen2-window",
        "gemma3",
        "smollm3",
        "olmo2",
        "olmo3",
        "gemma3-mm",
        "gemma2",
        "phi3",
        "phi3-longrope",
    ];
    let dirs = common::tiny_archs(&archs);
    for arch in archs {
        let dir = dirs.path().join(arch);
        full_step_in::<AB>(
            &format!("tiny-{arch}"),
            &dir,
            &Default::default(),
            &CPU_TOL,
            false,
        );
    }
}

/// One full AdamW step of each mixture of experts, with and without
/// gradient checkpointing: the router and the experts train, and expert 1
/// of layer 0 ends where torch's does; so does, with 64 experts, one that no
/// token reached, which only decays.
#[test]
fn tiny_moe_full_steps_match_torch() {
    let archs = [
        "qwen2-moe",
        "qwen3-moe",
        "qwen3-moe-many",
        "mixtral",
        "mixtral-aux",
        "olmoe",
        "gpt-oss",
    ];
    let dirs = common::tiny_archs(&archs);
    for arch in archs {
        let dir = dirs.path().join(arch);
        for ckpt in [false, true] {
            let name = format!("tiny-{arch}");
            full_step_in::<AB>(&name, &dir, &Default::default(), &CPU_TOL, ckpt);
        }
    }
}

/// A PEFT adapter on each mixture of experts with the routed experts
/// adapted through `target_parameters` (one pair of factors per projection
/// for all experts of a layer), from `lora-init/`: the logits, one AdamW step
/// (weight decay 0.1, clipping at 1.0), layer 0's expert factors after it in
/// PEFT's layout (those of the experts no token reached only decay), and the
/// adapter saved, reloaded and merged; with and without gradient
/// checkpointing.
#[test]
fn tiny_moe_lora_steps_match_peft() {
    let archs = [
        "qwen3-moe-many",
        "qwen2-moe",
        "mixtral-aux",
        "olmoe",
        "gpt-oss",
    ];
    let dirs = common::tiny_archs(&archs);
    for arch in archs {
        let dir = dirs.path().join(arch);
        for ckpt in [false, true] {
            moe_lora_step(&format!("tiny-{arch}"), &dir, &CPU_TOL, ckpt);
        }
    }
}

fn moe_lora_step(name: &str, dir: &Path, tol: &Tol, ckpt: bool) {
    let device = &Default::default();
    let r = reference(dir);
    let b = batch(&r.tensors);
    let model = Model::<AB>::load(dir, device).unwrap();
    let (net, cfg) = lora::load_adapter(model.net, &dir.join("lora-init")).unwrap();
    assert!(
        cfg.targets.iter().any(|t| lora::is_expert_target(t)),
        "{name}: {:?}",
        cfg.targets
    );
    let logits: Vec<f32> = net
        .logits(&b.ids, &b.mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let (shape, want) = &r.tensors["lora_logits"];
    let worst = max_diff_unpadded(&logits, want, &b.mask, shape[1], shape[2]);
    assert!(
        worst <= tol.logits,
        "{name}: lora logits differ by {worst:e}"
    );
    let ls = &r.json["lora_train_step"];
    let (before, mut g) = loss_and_grads(&net, &b, ckpt);
    let want = ls["loss_before"].as_f64().unwrap();
    assert!(
        rel(before, want) < tol.rel,
        "{name}: lora loss {before} vs {want}"
    );
    assert!(
        g.map.keys().all(|k| k.contains("lora_")),
        "{:?}",
        g.map.keys()
    );
    let (net, _, lr) = torch_step(&format!("{name} lora"), net, &mut g, &b, ls, tol);
    let ours = lora::adapter_tensors(&net, false);
    let mut compared = 0;
    for (k, (_, want)) in &r.tensors {
        let Some(k) = k.strip_prefix("after_lora_step.") else {
            continue;
        };
        let got = &ours
            .get(k)
            .unwrap_or_else(|| panic!("{name}: we have no {k}"))
            .data;
        // The experts no token reached have a zero gradient: they only decay.
        let grad = expert_factor_grad(&g, &ours, k, cfg.r, net.gate_up_interleaved);
        let ill = |j: usize| grad[j].abs() < 1e-6 && grad[j] != 0.0;
        step_matches(name, k, got, want, ill, tol, lr);
        compared += 1;
    }
    assert!(compared >= 2, "{name}: no after_lora_step tensors");
    saved_adapter_matches_peft(name, &net, &cfg, dir, &b, device, tol);
}

/// Our gradient in `g` of the routed experts' LoRA factor `key` (PEFT's name,
/// with both expert projections adapted, rank `r`) in PEFT's layout, with
/// zeros for the experts no token reached; `ours` holds the factors;
/// `interleaved`: the gate/up parameter interleaves its rows (gpt-oss).
fn expert_factor_grad(
    g: &Grads<Flex>,
    ours: &BTreeMap<String, HostTensor>,
    key: &str,
    r: usize,
    interleaved: bool,
) -> Vec<f32> {
    let layer = key
        .split(".layers.")
        .nth(1)
        .and_then(|k| k.split('.').next());
    let module = match key.contains(".experts.base_layer.") {
        true => "gate_up_lora",
        false => "down_proj.lora",
    };
    // PEFT's lora_A [experts * r, in] and lora_B [out, r * experts].
    let [sa, sb] = ["lora_A", "lora_B"].map(|f| {
        let k = key.replace("lora_A", f).replace("lora_B", f);
        ours[&k].shape.clone()
    });
    let (n, inp, out) = (sa[0] / r, sa[1], sb[0]);
    let grad = |e: usize, factor: &str, shape: [usize; 2]| HostTensor {
        shape: shape.to_vec(),
        data: g
            .map
            .get(&format!(
                "layers.{}.mlp.experts.{e}.{module}.{factor}",
                layer.unwrap()
            ))
            .map_or(vec![0.0; shape[0] * shape[1]], |t| {
                t.to_data().convert::<f32>().into_vec().unwrap()
            }),
    };
    let per_expert: Vec<_> = (0..n)
        .map(|e| (grad(e, "lora_a", [inp, r]), grad(e, "lora_b", [r, out])))
        .collect();
    let (a, mut b) = lora::stack_experts(&per_expert);
    if module == "gate_up_lora" && interleaved {
        b = lora::interleave_gate_up(&b);
    }
    match key.contains("lora_A") {
        true => a.data,
        false => b.data,
    }
}

#[test]
fn qwen2_full_step_matches_torch() {
    full_step::<AB>("tiny-qwen2", &Default::default(), &CPU_TOL, false);
}

#[test]
fn llama_full_step_matches_torch() {
    full_step::<AB>("tiny-llama", &Default::default(), &CPU_TOL, false);
}

#[test]
fn qwen2_lora_step_matches_peft() {
    lora_step::<AB>("tiny-qwen2", &Default::default(), &CPU_TOL, false);
}

#[test]
fn llama_lora_step_matches_peft() {
    lora_step::<AB>("tiny-llama", &Default::default(), &CPU_TOL, false);
}

/// The same steps with gradient checkpointing, against the same references.
#[test]
fn steps_with_gradient_checkpointing_match_torch_and_peft() {
    let _rng = rng_lock();
    for name in ["tiny-qwen2", "tiny-llama"] {
        full_step::<AB>(name, &Default::default(), &CPU_TOL, true);
        lora_step::<AB>(name, &Default::default(), &CPU_TOL, true);
    }
}

/// `net`'s adapter factors re-attached to the fixture in `dir` with
/// `dropout`, through a PEFT directory as a user's would be.
fn with_dropout(
    dir: &Path,
    net: &CausalLm<AB>,
    mut cfg: lora::LoraConfig,
    dropout: f64,
) -> CausalLm<AB> {
    cfg.dropout = dropout;
    let tmp = tempfile::tempdir().unwrap();
    lora::save_adapter(net, &cfg, None, tmp.path()).unwrap();
    let base = Model::<AB>::load(dir, &Default::default()).unwrap();
    let (net, got) = lora::load_adapter(base.net, tmp.path()).unwrap();
    assert_eq!(got.dropout, dropout);
    net
}

/// The largest difference between two sets of gradients of the same
/// parameters, relative to the largest element of each parameter's.
fn grads_diff(a: &Grads<Flex>, b: &Grads<Flex>) -> f32 {
    assert_eq!(
        a.map.keys().collect::<Vec<_>>(),
        b.map.keys().collect::<Vec<_>>()
    );
    a.map
        .iter()
        .map(|(name, x)| {
            let x: Vec<f32> = x.to_data().convert::<f32>().into_vec().unwrap();
            let y: Vec<f32> = b.map[name].to_data().convert::<f32>().into_vec().unwrap();
            let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            d / scale.max(1e-12)
        })
        .fold(0f32, f32::max)
}

/// With LoRA dropout, gradient checkpointing recomputes each layer with the
/// masks of the forward pass: its gradients are those of the whole pass
/// with the same seed ([`CausalLm::train_loss`]), and another seed gives
/// others. The same with DoRA, whose dropout path also multiplies the
/// dropped-out input by the base weight.
#[test]
fn gradient_checkpointing_keeps_the_dropout_masks() {
    let _rng = rng_lock();
    let dir = fixture("tiny-llama");
    let b = batch(&reference(&dir).tensors);
    let device = Default::default();
    for dora in [false, true] {
        let (net, cfg) = if dora {
            let cfg = dora_config();
            let base = Model::<AB>::load(&dir, &device).unwrap().net;
            (lora::attach(base, &cfg, 3), cfg)
        } else {
            lora::load_adapter(
                Model::<AB>::load(&dir, &device).unwrap().net,
                &dir.join("lora-init"),
            )
            .unwrap()
        };
        // B = 0 in a fresh adapter would hide A's gradient: take one step first.
        let (_, g) = loss_and_grads(&net, &b, false);
        let net = AdamW::new(AdamWConfig::default()).step(net, &g, 0.01);
        if dora {
            // A dropout that keeps every element: the dropout path's algebra
            // must give the dropout-free output.
            let kept = with_dropout(&dir, &net, cfg.clone(), 1e-9);
            let (a, b) = (loss_of(&kept, &b), loss_of(&net, &b));
            assert!(rel(a, b) < 1e-6, "DoRA with dropout 1e-9: {a} against {b}");
        }
        let net = with_dropout(&dir, &net, cfg, 0.3);
        let pos = net.positions(&arange_rows(&b.ids), &b.mask, &device);
        let k = shifted_targets(&b.labels, b.ids[0].len()).0.len();
        let whole = |seed| {
            let (loss, _) = net.train_loss(&b.ids, &pos, &b.labels, seed);
            let mut g = Grads::default();
            g.accumulate(&net, &loss.backward());
            g
        };
        let ckpt = |seed| {
            let mut g = Grads::default();
            checkpoint::loss_and_grads(&net, &b.ids, &pos, &b.labels, seed, k, &mut g).unwrap();
            g
        };
        let (w1, c1, c2) = (whole(1), ckpt(1), ckpt(2));
        assert_eq!(
            c1.map.len(),
            2 * 7 * if dora { 3 } else { 2 },
            "only the adapters have gradients"
        );
        let same = grads_diff(&w1, &c1);
        let other = grads_diff(&w1, &c2);
        eprintln!(
            "DoRA {dora}: relative gradient difference: same seed {same:e}, other seed {other:e}"
        );
        assert!(
            same < 1e-5,
            "checkpointing changed the gradients by {same:e}"
        );
        assert!(other > 1e-2, "another seed kept the masks ({other:e})");
    }
}

/// NEFTune's noise is uniform in `±alpha / sqrt(seq * hidden)` as in
/// transformers' hook, seeded per micro-batch, added in training only, and
/// gradient checkpointing keeps it: its gradients are the whole pass's.
#[test]
fn neftune_noise_is_uniform_seeded_and_kept_by_checkpointing() {
    let _rng = rng_lock();
    use burn::tensor::Tensor;
    let dir = fixture("tiny-llama");
    let b = batch(&reference(&dir).tensors);
    let device = Default::default();
    let mut net = Model::<AB>::load(&dir, &device).unwrap().net;
    let pos = net.positions(&arange_rows(&b.ids), &b.mask, &device);
    let k = shifted_targets(&b.labels, b.ids[0].len()).0.len();
    let whole = |net: &CausalLm<AB>, seed| {
        let (loss, _) = net.train_loss(&b.ids, &pos, &b.labels, seed);
        let mut g = Grads::default();
        g.accumulate(net, &loss.backward());
        g
    };
    let plain = whole(&net, 1);
    net.neftune_noise_alpha = 5.0;

    let (t, h) = (b.ids[0].len(), net.embed_tokens.val().dims()[1]);
    let zeros = || Tensor::<Flex, 3>::zeros([64, t, h], &device);
    let noise: Vec<f32> = net.neftune(zeros(), 7).into_data().into_vec().unwrap();
    let mag = 5.0 / ((t * h) as f64).sqrt();
    let n = noise.len() as f64;
    let mean = noise.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = noise
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let top = noise.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
    eprintln!(
        "neftune: {n} draws, magnitude {mag}, max |noise| {top}, mean {mean:e}, variance {var:e} (uniform: {:e})",
        mag * mag / 3.0
    );
    assert!(top <= mag && top > 0.99 * mag, "{top} against {mag}");
    assert!(mean.abs() < 0.01 * mag, "{mean}");
    assert!((var / (mag * mag / 3.0) - 1.0).abs() < 0.02, "{var}");
    let again: Vec<f32> = net.neftune(zeros(), 7).into_data().into_vec().unwrap();
    assert_eq!(noise, again, "same seed, same noise");
    let other: Vec<f32> = net.neftune(zeros(), 8).into_data().into_vec().unwrap();
    assert_ne!(noise, other);

    let (w1, w2) = (whole(&net, 1), whole(&net, 2));
    let mut c1 = Grads::default();
    checkpoint::loss_and_grads(&net, &b.ids, &pos, &b.labels, 1, k, &mut c1).unwrap();
    let (same, noisy, other) = (
        grads_diff(&w1, &c1),
        grads_diff(&plain, &w1),
        grads_diff(&w1, &w2),
    );
    eprintln!(
        "relative gradient difference: checkpointing {same:e}, noise on/off {noisy:e}, other seed {other:e}"
    );
    assert!(
        same < 1e-5,
        "checkpointing changed the gradients by {same:e}"
    );
    assert!(noisy > 1e-3 && other > 1e-3, "{noisy:e} {other:e}");
    // Evaluation has no noise.
    assert_eq!(loss_of(&net, &b), {
        net.neftune_noise_alpha = 0.0;
        loss_of(&net, &b)
    });
}

#[test]
fn lora_dropout_is_seeded_and_off_in_eval() {
    let _rng = rng_lock();
    use burn::module::AutodiffModule;
    use burn::tensor::backend::Backend;
    let dir = fixture("tiny-llama");
    let r = reference(&dir);
    let b = batch(&r.tensors);
    let model = Model::<AB>::load(&dir, &Default::default()).unwrap();
    let (net, cfg) = lora::load_adapter(model.net, &dir.join("lora-init")).unwrap();
    let drop_net = with_dropout(&dir, &net, cfg, 0.3);
    let device = Default::default();
    let train_loss = |seed| {
        AB::seed(&device, seed);
        loss_of(&drop_net, &b)
    };
    let (a, a2, c) = (train_loss(1), train_loss(1), train_loss(2));
    assert_eq!(a, a2, "same seed, same masks");
    assert_ne!(a, c, "another seed, other masks");
    let plain = loss_of(&net, &b);
    assert_ne!(a, plain, "dropout is active while training");
    let eval = drop_net
        .valid()
        .loss(&b.ids, &b.mask, &b.labels)
        .0
        .into_scalar()
        .elem::<f64>();
    assert!(
        rel(eval, plain) < 1e-6,
        "no dropout in eval: {eval} vs {plain}"
    );
}

/// bf16 mixed precision changes the loss and gradients by bf16 rounding only
/// (8 mantissa bits: about 0.4% per product), and a step still lowers the loss.
#[test]
fn bf16_mixed_precision_stays_close_to_f32() {
    bf16_check::<AB>(&Default::default());
}

fn bf16_check<AB: TrainBackend>(device: &AB::Device) {
    for name in ["tiny-qwen2", "tiny-llama"] {
        let dir = fixture(name);
        let r = reference(&dir);
        let b = batch(&r.tensors);
        let run = |bf16: bool| {
            let mut model = Model::<AB>::load(&dir, device).unwrap();
            model.net.set_bf16(bf16);
            let (loss, _) = model.net.loss(&b.ids, &b.mask, &b.labels);
            let before = loss.clone().into_scalar().elem::<f64>();
            let grads = loss.backward();
            let mut g = Grads::default();
            g.accumulate(&model.net, &grads);
            let norm = g.clip(1.0);
            let mut opt = AdamW::new(AdamWConfig::default());
            let net = opt.step(model.net, &g, 0.01);
            (before, norm, loss_of(&net, &b))
        };
        let (l32, n32, a32) = run(false);
        let (l16, n16, a16) = run(true);
        eprintln!("{name}: f32 loss {l32} norm {n32} after {a32}; bf16 {l16} {n16} {a16}");
        assert!(l16 != l32, "{name}: bf16 had no effect");
        assert!(rel(l16, l32) < 1e-2, "{name}: bf16 loss {l16} vs f32 {l32}");
        assert!(
            rel(n16, n32) < 5e-2,
            "{name}: bf16 grad norm {n16} vs {n32}"
        );
        assert!(a16 < l16, "{name}: bf16 step did not lower the loss");
    }
}

/// anneal's attention op (its own backward pass, causal chunks) against
/// burn's attention differentiated through its fallback, on one backend:
/// `tokens` new tokens after `past` cached keys, `rep` query heads per kv
/// head stacked token by token, the second batch row with every fifth key
/// masked as padding, scores soft-capped at `softcap` where set. With
/// `bf16` ours runs on bf16 inputs and is held to `tol` relative to the
/// largest value; otherwise to `tol` absolute.
fn attention_check<AB: TrainBackend>(
    device: &AB::Device,
    (kv_heads, tokens, rep, past): (usize, usize, usize, usize),
    softcap: Option<f32>,
    bf16: bool,
    tol: f32,
) {
    use anneal_stages::model::attention::{Causal, masked_attention};
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, Distribution, FloatDType, Tensor, TensorData};

    AB::seed(device, 7);
    let (b, d) = (2, 64);
    let (rows, keys) = (tokens * rep, past + tokens);
    let rand = |n: usize| {
        Tensor::<AB, 4>::random([b, kv_heads, n, d], Distribution::Normal(0.0, 1.0), device)
    };
    let (q, k, v, dout) = (rand(rows), rand(keys), rand(keys), rand(rows));
    let mask: Vec<bool> = (0..b * rows * keys)
        .map(|n| {
            let (j, i, row) = (n % keys, n / keys % rows / rep, n / (keys * rows));
            j > past + i || (row == 1 && j % 5 == 0 && j != past + i)
        })
        .collect();
    let mask = Tensor::<AB, 4, Bool>::from_data(TensorData::new(mask, [b, 1, rows, keys]), device)
        .expand([b, kv_heads, rows, keys]);
    let run = |ours: bool| {
        let (q, k, v) = (
            q.clone().require_grad(),
            k.clone().require_grad(),
            v.clone().require_grad(),
        );
        let out = if ours {
            let cast = |x: Tensor<AB, 4>| if bf16 { x.cast(FloatDType::BF16) } else { x };
            let causal = Some(Causal {
                rep,
                past,
                window: 0,
            });
            masked_attention(
                cast(q.clone()),
                cast(k.clone()),
                cast(v.clone()),
                mask.clone(),
                causal,
                softcap,
            )
            .cast(FloatDType::F32)
        } else {
            burn::tensor::module::attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(mask.clone()),
                None,
                AttentionModuleOptions {
                    softcap: softcap.map(f64::from),
                    ..Default::default()
                },
            )
        };
        let g = (out.clone() * dout.clone()).sum().backward();
        [
            out.inner(),
            q.grad(&g).unwrap(),
            k.grad(&g).unwrap(),
            v.grad(&g).unwrap(),
        ]
    };
    let (ours, want) = (run(true), run(false));
    for (name, (a, w)) in ["out", "dq", "dk", "dv"]
        .iter()
        .zip(ours.into_iter().zip(want))
    {
        let diff: f32 = (a.cast(FloatDType::F32) - w.clone())
            .abs()
            .max()
            .into_scalar()
            .elem();
        let size: f32 = w.abs().max().into_scalar().elem();
        let bound = if bf16 { tol * size } else { tol };
        eprintln!(
            "attention {kv_heads}x{tokens}x{rep} past {past} softcap {softcap:?} bf16 {bf16}: \
             {name} max diff {diff:e} (largest {size:e})"
        );
        assert!(
            diff <= bound,
            "attention: {name} differs by {diff:e} (bound {bound:e})"
        );
    }
}

/// 300 tokens: five causal chunks of 64 tokens, each against its own keys;
/// plain and with soft-capped scores.
#[test]
fn attention_matches_burns_attention() {
    let _rng = rng_lock();
    attention_check::<AB>(&Default::default(), (2, 300, 3, 4), None, false, 1e-5);
    // Gemma 2's soft cap, tight enough (2, scores of about ±3) to bend them.
    attention_check::<AB>(&Default::default(), (2, 300, 3, 4), Some(2.0), false, 1e-5);
}

#[test]
fn bf16_attention_stays_close_to_f32() {
    let _rng = rng_lock();
    attention_check::<AB>(&Default::default(), (2, 300, 3, 4), None, true, 3e-2);
}

/// The attention op's forward and backward under a sliding window of 256 at
/// 2,048 tokens (2 kv heads with 4 query heads each, head dim 64), told of
/// the window and not told (the same mask): median wall times, printed. A
/// benchmark, so ignored; run it in a release build:
/// `cargo test --release -p anneal-stages --test train_parity sliding_window_attention_timing -- --ignored --nocapture`.
#[test]
#[ignore]
fn sliding_window_attention_timing() {
    use anneal_stages::model::attention::{Causal, masked_attention};
    use burn::tensor::{Bool, Distribution, Tensor, TensorData};
    let (kvh, rep, t, d, w) = (2, 4, 2048, 64, 256);
    let device = Default::default();
    let rows = t * rep;
    let mask: Vec<bool> = (0..kvh * rows * t)
        .map(|n| {
            let (j, i) = (n % t, (n / t) % rows / rep);
            j > i || j + w <= i
        })
        .collect();
    let mask = Tensor::<AB, 4, Bool>::from_data(TensorData::new(mask, [1, kvh, rows, t]), &device);
    let r = |n| Tensor::<AB, 4>::random([1, kvh, n, d], Distribution::Normal(0.0, 1.0), &device);
    let (q, k, v) = (
        r(rows).require_grad(),
        r(t).require_grad(),
        r(t).require_grad(),
    );
    for window in [0, w] {
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                let causal = Causal {
                    rep,
                    past: 0,
                    window,
                };
                let out = masked_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    mask.clone(),
                    Some(causal),
                    None,
                );
                let g = out.sum().backward();
                let _ = q.grad(&g).unwrap().into_data();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        eprintln!(
            "sliding window attention, Causal::window {window}: median {:.1} ms of 5",
            ms[2]
        );
    }
}

/// The same steps on burn's CUDA backend, where a GPU is present (built with
/// `--features cuda`; see `bench/device.sh`), or on burn's wgpu backend
/// standing in for it (`--features gpu-on-wgpu`; see `bench/gpu_on_wgpu.sh`).
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
mod cuda {
    use super::*;

    type Gpu = Autodiff<anneal_stages::model::device::Gpu>;

    /// Reductions on the GPU sum in another order (or in TF32): looser than
    /// the CPU, still far below the effect of any real bug.
    const CUDA_TOL: Tol = Tol {
        rel: 1e-3,
        weight: 1e-4,
        logits: 2e-3,
        ill: 1.0,
    };

    #[test]
    fn full_steps_match_torch_on_cuda() {
        let Some(device) = common::gpu() else { return };
        for name in ["tiny-qwen2", "tiny-llama"] {
            for ckpt in [false, true] {
                full_step::<Gpu>(name, &device, &CUDA_TOL, ckpt);
            }
        }
    }

    /// A sliding window, Gemma 3, OLMo 3, Gemma 2, Phi-3 and two mixtures
    /// of experts (`common::tiny_archs`).
    #[test]
    fn tiny_arch_full_steps_match_torch_on_cuda() {
        let Some(device) = common::gpu() else { return };
        let archs = [
            "qwen2-window",
            "gemma3",
            "olmo3",
            "gemma2",
            "phi3",
            "qwen2-moe",
            "qwen3-moe",
            "mixtral-aux",
        ];
        let dirs = common::tiny_archs(&archs);
        for arch in archs {
            let dir = dirs.path().join(arch);
            full_step_in::<Gpu>(&format!("tiny-{arch}"), &dir, &device, &CUDA_TOL, false);
        }
    }

    #[test]
    fn lora_steps_match_peft_on_cuda() {
        let Some(device) = common::gpu() else { return };
        for name in ["tiny-qwen2", "tiny-llama"] {
            for ckpt in [false, true] {
                lora_step::<Gpu>(name, &device, &CUDA_TOL, ckpt);
            }
        }
    }

    /// Qwen2.5-0.5B's attention (2 kv heads of 7 query heads, head dim 64)
    /// over 1,024 tokens: burn's fused forward, our chunked backward; plain
    /// and with scores soft-capped.
    #[test]
    fn attention_matches_burns_attention_on_cuda() {
        let Some(device) = common::gpu() else { return };
        attention_check::<Gpu>(&device, (2, 1024, 7, 0), None, false, 1e-4);
        attention_check::<Gpu>(&device, (2, 1024, 7, 0), Some(2.0), false, 1e-4);
    }

    /// The model's matmuls against Flex at contraction lengths that burn's
    /// double-buffered GPU kernels get wrong when autotune picks one (an odd
    /// multiple of a stage's `k`: on wgpu `[2, 520] · [520, 16]` was 2.2 off
    /// before `matmul::safe_contraction`), and at safe ones around them.
    /// Shapes: a decoding step's `p · v`, a projection, a weight gradient
    /// `xᵀ g`, and a one-row and a one-column product (a batch-1 decoding
    /// step's projections).
    #[test]
    fn matmuls_match_flex_at_every_contraction_on_cuda() {
        use anneal_stages::model::ModelBackend;
        use anneal_stages::model::device::Gpu as G;
        use burn::tensor::ops::FloatTensorOps;
        use burn::tensor::{Distribution, Tensor, TensorPrimitive};
        let Some(device) = common::gpu() else { return };
        let rand = |s: [usize; 4]| {
            Tensor::<Flex, 4>::random(s, Distribution::Normal(0.0, 1.0), &Default::default())
        };
        let gpu = |t: &Tensor<Flex, 4>| Tensor::<G, 4>::from_data(t.to_data(), &device);
        let prim = |t: Tensor<G, 4>| t.into_primitive().tensor();
        let host = |t| Tensor::<G, 4>::from_primitive(TensorPrimitive::Float(t)).into_data();
        let mut worst = 0f32;
        for k in [
            8, 16, 48, 96, 513, 514, 516, 520, 528, 536, 544, 576, 896, 1032, 1040,
        ] {
            for (what, a, b, transposed) in [
                ("p·v", rand([1, 2, 2, k]), rand([1, 2, k, 16]), false),
                (
                    "projection",
                    rand([1, 1, 64, k]),
                    rand([1, 1, k, 96]),
                    false,
                ),
                ("xᵀ g", rand([1, 1, k, 64]), rand([1, 1, k, 96]), true),
                ("one row", rand([1, 1, 1, k]), rand([1, 1, k, 96]), false),
                ("one column", rand([1, 1, 64, k]), rand([1, 1, k, 1]), false),
            ] {
                let lhs = |t: Tensor<G, 4>| if transposed { t.swap_dims(2, 3) } else { t };
                let want = match transposed {
                    true => a.clone().swap_dims(2, 3),
                    false => a.clone(),
                }
                .matmul(b.clone());
                let [h, m, n] = [want.dims()[1], want.dims()[2], want.dims()[3]];
                let mut got = vec![(
                    "batched",
                    host(G::batched_matmul(prim(lhs(gpu(&a))), prim(gpu(&b)))),
                )];
                if h == 1 {
                    let two = |t: Tensor<G, 4>| {
                        let [_, _, r, c] = t.dims();
                        t.reshape([r, c]).into_primitive().tensor()
                    };
                    let a2 = match transposed {
                        true => G::float_transpose(two(gpu(&a))),
                        false => two(gpu(&a)),
                    };
                    let y = G::matmul_2d(a2, two(gpu(&b)));
                    got.push((
                        "2-d",
                        Tensor::<G, 2>::from_primitive(TensorPrimitive::Float(y))
                            .reshape([1, 1, m, n])
                            .into_data(),
                    ));
                }
                let want = want.into_data().to_vec::<f32>().unwrap();
                for (op, got) in got {
                    let got = got.to_vec::<f32>().unwrap();
                    let diff = want
                        .iter()
                        .zip(&got)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    // Sums of k products of unit normals: rounding grows like sqrt(k).
                    let tol = 1e-4 * (k as f32).sqrt() * 8.0;
                    assert!(
                        diff <= tol,
                        "{what} ({op}), k = {k}: {diff:e} off (tolerance {tol:e})"
                    );
                    worst = worst.max(diff / tol);
                }
            }
        }
        eprintln!("matmuls: worst difference {worst:.3} of the tolerance");
    }

    /// The same in bf16 (inputs, matmuls; softmax in f32) against f32.
    #[cfg(feature = "cuda")]
    #[test]
    fn bf16_attention_stays_close_to_f32_on_cuda() {
        let Some(device) = common::gpu() else { return };
        attention_check::<Gpu>(&device, (2, 1024, 7, 0), None, true, 3e-2);
    }

    // wgpu has no bf16.
    #[cfg(feature = "cuda")]
    #[test]
    fn bf16_stays_close_to_f32_on_cuda() {
        let Some(device) = common::gpu() else { return };
        bf16_check::<Gpu>(&device);
    }
}

/// Attention at the GPU benchmark's shape (batch 4, 2,048 tokens, 14 query
/// heads over 2 kv heads, head dim 64, bf16; on wgpu, which has no bf16, a
/// small f32 shape): our op against burn's fused (flash) forward, in the
/// decoder's stacked layout with its mask and in the per-head layout with
/// `is_causal`. Each fused output must stay within rounding of ours; the
/// median times it prints are collected by `bench/device.sh` (part
/// `attention`), next to PyTorch's from `bench/attention_torch.py`. Not in the
/// `cuda` module, so the parity part does not run it.
#[cfg(any(feature = "cuda", feature = "gpu-on-wgpu"))]
mod attention_timing {
    use std::time::Instant;

    use anneal_stages::model::attention::{Causal, masked_attention};
    use anneal_stages::model::device::Gpu;
    use burn::tensor::backend::Backend;
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, Distribution, FloatDType, Tensor, TensorData};

    use super::*;

    type G = Gpu;
    type AG = Autodiff<Gpu>;

    /// Median wall time of `runs` calls of `f`, each waited for, after one
    /// call that is not timed (autotuning and kernel compilation).
    fn median_ms(device: &burn::tensor::Device<G>, runs: usize, mut f: impl FnMut()) -> f64 {
        f();
        G::sync(device).expect("GPU sync");
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t0 = Instant::now();
                f();
                G::sync(device).expect("GPU sync");
                t0.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[runs / 2]
    }

    fn max_abs(t: Tensor<G, 4>) -> f32 {
        t.cast(FloatDType::F32).abs().max().into_scalar().elem()
    }

    #[test]
    fn attention_timing() {
        let Some(device) = common::gpu() else { return };
        let (b, kvh, rep, t, d, dtype, rel) = if cfg!(feature = "cuda") {
            (4, 2, 7, 2048, 64, FloatDType::BF16, 2e-2)
        } else {
            (1, 2, 3, 96, 16, FloatDType::F32, 5e-3)
        };
        let (h, rows) = (kvh * rep, t * rep);
        G::seed(&device, 11);
        let rand = |n: usize| {
            Tensor::<G, 4>::random([b, kvh, n, d], Distribution::Normal(0.0, 1.0), &device)
                .cast(dtype)
        };
        let (q, k, v, dout) = (rand(rows), rand(t), rand(t), rand(rows));
        // The decoder's mask for unpadded rows: query row `i * rep + r` sees keys `0..=i`.
        let host: Vec<bool> = (0..rows * t).map(|n| n % t > n / t / rep).collect();
        let mask = Tensor::<G, 4, Bool>::from_data(TensorData::new(host, [1, 1, rows, t]), &device)
            .repeat_dim(0, b)
            .repeat_dim(1, kvh);
        let causal = Some(Causal {
            rep,
            past: 0,
            window: 0,
        });

        // Per-head layout: [b, h, t, d] queries, keys and values repeated per query head.
        let per_head = |x: Tensor<G, 4>| {
            x.reshape([b, kvh, t, rep, d])
                .swap_dims(2, 3)
                .reshape([b, h, t, d])
        };
        let stacked = |x: Tensor<G, 4>| {
            x.reshape([b, kvh, rep, t, d])
                .swap_dims(2, 3)
                .reshape([b, kvh, rows, d])
        };
        let repeat = |x: Tensor<G, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kvh, rep, t, d])
                .reshape([b, h, t, d])
        };
        let (qh, kh, vh) = (per_head(q.clone()), repeat(k.clone()), repeat(v.clone()));
        let causal_opts = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };

        let ours = || masked_attention(q.clone(), k.clone(), v.clone(), mask.clone(), causal, None);
        let fused_stacked = || {
            let opts = Default::default();
            attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(mask.clone()),
                None,
                opts,
            )
        };
        let fused_heads = || attention(qh.clone(), kh.clone(), vh.clone(), None, None, causal_opts);
        let want = ours();
        let size = max_abs(want.clone());
        let diff_stacked = max_abs(fused_stacked() - want.clone());
        let diff_heads = max_abs(stacked(fused_heads()) - want);

        let runs = 5;
        let ours_fwd = median_ms(&device, runs, || drop(ours()));
        let ours_fwd_bwd = median_ms(&device, runs, || {
            let [qa, ka, va] =
                [&q, &k, &v].map(|x| Tensor::<AG, 4>::from_inner(x.clone()).require_grad());
            let mask = Tensor::from_inner(mask.clone());
            let out = masked_attention(qa.clone(), ka.clone(), va.clone(), mask, causal, None);
            let g = (out * Tensor::<AG, 4>::from_inner(dout.clone()))
                .sum()
                .backward();
            let _ = [qa, ka, va].map(|x| x.grad(&g).expect("gradient"));
        });
        let fused_stacked_fwd = median_ms(&device, runs, || drop(fused_stacked()));
        let fused_heads_fwd = median_ms(&device, runs, || drop(fused_heads()));
        eprintln!(
            "attention timing b{b} h{h}/kv{kvh} t{t} d{d} {dtype:?}: ours forward {ours_fwd:.2} ms, \
             ours forward+backward {ours_fwd_bwd:.2} ms, fused forward stacked+mask \
             {fused_stacked_fwd:.2} ms, fused forward per-head+is_causal {fused_heads_fwd:.2} ms; \
             max diff against ours: stacked {diff_stacked:e}, per-head {diff_heads:e} (largest |out| {size:e})"
        );
        let bound = rel * size;
        assert!(
            diff_stacked <= bound && diff_heads <= bound,
            "burn's fused attention differs from ours by {diff_stacked:e} (stacked) / \
             {diff_heads:e} (per head), bound {bound:e}"
        );
    }
}

/// Two AdamW steps (lr 1e-2, weight decay 0.1; with `ratio` > 1 PEFT's LoRA+
/// optimizer, `create_loraplus_optimizer`, which decays each group at its own
/// rate) in PEFT from the adapter in `init`; then PEFT's merge of the adapter
/// anneal trained. With DoRA, also PEFT's own initial magnitudes for the same
/// base, to compare with ours.
const ADAPTER_STEPS_PEFT: &str = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_loraplus_optimizer
fixture, init, ours, ratio = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
torch.manual_seed(0)
ref = load_file(f"{fixture}/reference.safetensors")
batch = {k: ref[k].long() for k in ["input_ids", "attention_mask", "labels"]}
base = lambda: AutoModelForCausalLM.from_pretrained(fixture, torch_dtype=torch.float32)
def ours_name(k):
    return k.replace(".default.weight", "") if "magnitude" in k else k.replace(".default", "")
def group(k):
    return "M" if "magnitude" in k else "A" if "lora_A" in k else "B"
cfg = json.load(open(f"{init}/adapter_config.json"))
start = load_file(f"{init}/adapter_model.safetensors")
init_diff = 0.0
if cfg.get("use_dora"):
    fresh = get_peft_model(base(), LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                                              target_modules=cfg["target_modules"], use_dora=True))
    init_diff = max((start[ours_name(k)] - v).abs().max().item()
                    for k, v in fresh.state_dict().items() if "magnitude" in k)
model = PeftModel.from_pretrained(base(), init, is_trainable=True)
if ratio > 1:
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=ratio,
                                    loraplus_weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
else:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
losses = []
for _ in range(2):
    opt.zero_grad()
    loss = model(**batch).loss
    losses.append(loss.item())
    loss.backward()
    opt.step()
with torch.no_grad():
    losses.append(model(**batch).loss.item())
mine = load_file(f"{ours}/adapter/adapter_model.safetensors")
theirs = {ours_name(k): v for k, v in model.state_dict().items() if "lora_" in k}
assert sorted(mine) == sorted(theirs), (sorted(mine), sorted(theirs))
diff, scale, moved = {}, {}, 0.0
for k, v in mine.items():
    f = group(k)
    diff[f] = max(diff.get(f, 0.0), (v - theirs[k]).abs().max().item())
    scale[f] = max(scale.get(f, 0.0), theirs[k].abs().max().item())
    if f == "M":
        moved = max(moved, (theirs[k] - start[k]).abs().max().item())
merged = PeftModel.from_pretrained(base(), f"{ours}/adapter").merge_and_unload().state_dict()
mine_merged = load_file(f"{ours}/merged/model.safetensors")
merged_diff = max((v - merged[k]).abs().max().item() for k, v in mine_merged.items())
print(json.dumps({"init_diff": init_diff, "losses": losses, "diff": diff, "scale": scale,
                  "moved": moved, "merged_diff": merged_diff}))
"#;

/// [`ADAPTER_STEPS_PEFT`] against the same two steps here from `net`, whose
/// adapters are `cfg`: the losses to 1e-4 relative, every adapter tensor
/// (`A`, `B` and DoRA's magnitudes `M`) within 1e-4 of its scale, and our
/// merge within 1e-6 of PEFT's. Returns PEFT's JSON.
fn adapter_steps_match_peft(
    what: &str,
    dir: &Path,
    mut net: CausalLm<AB>,
    cfg: &lora::LoraConfig,
    ratio: f64,
) -> Value {
    use anneal_stages::model::weights::{self, SaveDtype};
    use burn::module::AutodiffModule;
    let b = batch(&reference(dir).tensors);
    let (init, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    lora::save_adapter(&net, cfg, None, init.path()).unwrap();
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: 0.1,
        lora_b_lr_ratio: ratio,
        ..Default::default()
    });
    let mut losses = Vec::new();
    for _ in 0..2 {
        let (loss, g) = loss_and_grads(&net, &b, false);
        losses.push(loss);
        net = opt.step(net, &g, 1e-2);
    }
    losses.push(loss_of(&net, &b));
    lora::save_adapter(&net, cfg, None, &out.path().join("adapter")).unwrap();
    let merged = out.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let tensors = lora::merge(net.valid()).to_tensors();
    weights::save_dir(&merged, &tensors, SaveDtype::F32, u64::MAX).unwrap();
    let peft = python_json(
        ADAPTER_STEPS_PEFT,
        &[
            dir.as_os_str(),
            init.path().as_os_str(),
            out.path().as_os_str(),
            ratio.to_string().as_ref(),
        ],
        "torch transformers peft",
    );
    eprintln!("{what} against PEFT: losses {losses:?}, PEFT {peft}");
    for (i, (ours, theirs)) in losses
        .iter()
        .zip(peft["losses"].as_array().unwrap())
        .enumerate()
    {
        let theirs = theirs.as_f64().unwrap();
        assert!(
            rel(*ours, theirs) < 1e-4,
            "{what}: loss {i}: {ours} vs PEFT's {theirs}"
        );
    }
    for (f, d) in peft["diff"].as_object().unwrap() {
        let (d, s) = (d.as_f64().unwrap(), peft["scale"][f].as_f64().unwrap());
        assert!(
            d <= 1e-4 * s.max(1.0),
            "{what}: {f}: {d:e} apart (largest {s})"
        );
    }
    let merged_diff = peft["merged_diff"].as_f64().unwrap();
    assert!(
        merged_diff <= 1e-6,
        "{what}: merged weights differ from PEFT's merge_and_unload of the adapter by {merged_diff}"
    );
    peft
}

#[test]
fn loraplus_steps_match_peft() {
    let dir = fixture("tiny-llama");
    let (net, cfg) = lora::load_adapter(
        Model::<AB>::load(&dir, &Default::default()).unwrap().net,
        &dir.join("lora-init"),
    )
    .unwrap();
    adapter_steps_match_peft("LoRA+ (ratio 16)", &dir, net, &cfg, 16.0);
}

/// `finetuning_type: freeze` by LLaMA-Factory's rule (the last layer's
/// attention, and every weight whose name contains `norm`) against the same
/// weights trained in torch: one AdamW step with decay groups and clipping
/// over the trainable weights only.
const FREEZE_TORCH: &str = r#"
import json, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
fixture, ours = sys.argv[1], sys.argv[2]
layers, modules, extra = 1, ["self_attn"], ["norm"]
ref = load_file(f"{fixture}/reference.safetensors")
batch = {k: ref[k].long() for k in ["input_ids", "attention_mask", "labels"]}
model = AutoModelForCausalLM.from_pretrained(fixture, torch_dtype=torch.float32)
n = model.config.num_hidden_layers
ids = range(max(0, n - layers), n) if layers > 0 else range(min(-layers, n))
pats = [f".{i}.{m}" if m != "all" else f".{i}." for m in modules for i in ids] + extra
for name, p in model.named_parameters():
    p.requires_grad_(any(x in name for x in pats))
trainable = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
decay = [p for k, p in trainable if "bias" not in k and "norm" not in k]
no_decay = [p for k, p in trainable if "bias" in k or "norm" in k]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                         {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
before = {k: p.detach().clone() for k, p in model.named_parameters()}
loss = model(**batch).loss
loss.backward()
norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0).item()
grads = {k: p.grad.clone() for k, p in trainable}
opt.step()
mine = load_file(f"{ours}/model.safetensors")
params = dict(model.named_parameters())
out = {"loss": loss.item(), "grad_norm": norm, "tensors": {}}
for k, v in mine.items():
    theirs = params[k].detach()
    d = (v - theirs).abs()
    g = grads.get(k)
    ill = (g.abs() < 1e-6) if g is not None else torch.zeros_like(d, dtype=torch.bool)
    out["tensors"][k] = {
        "trained": k in grads,
        "moved": (theirs != before[k]).any().item(),
        "well": d[~ill].max().item() if (~ill).any() else 0.0,
        "ill": d[ill].max().item() if ill.any() else 0.0,
    }
print(json.dumps(out))
"#;

#[test]
fn freeze_step_matches_torch() {
    use anneal_stages::train::freeze;
    use burn::module::AutodiffModule;
    let _rng = rng_lock();
    let dir = fixture("tiny-llama");
    let b = batch(&reference(&dir).tensors);
    let device = Default::default();
    let model = Model::<AB>::load(&dir, &device).unwrap();
    let pats = freeze::patterns(
        1,
        model.net.layers.len(),
        &["self_attn".into()],
        &["norm".into()],
    );
    let net = lora::freeze_unless(model.net, &|n: &str| {
        pats.iter().any(|p| n.contains(p.as_str()))
    });
    let (loss, mut g) = loss_and_grads(&net, &b, false);
    // Checkpointing stops under the lowest trained weight, with the same gradients.
    let (_, gc) = loss_and_grads(&net, &b, true);
    let same = grads_diff(&g, &gc);
    assert!(
        same < 1e-5,
        "checkpointing changed the gradients by {same:e}"
    );
    // Only the last layer: nothing under it runs again.
    let last = freeze::patterns(1, 2, &["all".into()], &[]);
    let top = lora::freeze_unless(Model::<AB>::load(&dir, &device).unwrap().net, &|n: &str| {
        last.iter().any(|p| n.contains(p.as_str()))
    });
    let (whole, ckpt) = (
        loss_and_grads(&top, &b, false).1,
        loss_and_grads(&top, &b, true).1,
    );
    assert!(
        whole.map.keys().all(|k| k.starts_with("layers.1.")),
        "{:?}",
        whole.map.keys()
    );
    assert!(grads_diff(&whole, &ckpt) < 1e-5);
    let norm = g.clip(1.0);
    let mut opt = AdamW::new(AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    });
    let net = opt.step(net, &g, 1e-2);
    let out = tempfile::tempdir().unwrap();
    Model {
        config: model.config.clone(),
        net: net.valid(),
        source: None,
        extra: Default::default(),
    }
    .save(
        out.path(),
        anneal_stages::model::weights::SaveDtype::F32,
        u64::MAX,
    )
    .unwrap();
    let torch = python_json(
        FREEZE_TORCH,
        &[dir.as_os_str(), out.path().as_os_str()],
        "torch transformers",
    );
    eprintln!(
        "freeze: loss {loss}, grad norm {norm}; torch {}, {}",
        torch["loss"], torch["grad_norm"]
    );
    assert!(rel(loss, torch["loss"].as_f64().unwrap()) < 1e-5);
    assert!(rel(norm, torch["grad_norm"].as_f64().unwrap()) < 1e-4);
    let tensors = torch["tensors"].as_object().unwrap();
    let trained: Vec<&String> = tensors
        .keys()
        .filter(|k| tensors[*k]["trained"] == true)
        .collect();
    assert_eq!(
        trained.len(),
        4 + 2 * 2 + 1,
        "layer 1's attention, both layers' two norms and the final norm: {trained:?}"
    );
    assert_eq!(g.map.len(), trained.len(), "{:?}", g.map.keys());
    for (k, t) in tensors {
        assert_eq!(t["moved"], t["trained"], "{k}");
        let (well, ill) = (t["well"].as_f64().unwrap(), t["ill"].as_f64().unwrap());
        if t["trained"] == false {
            assert_eq!((well, ill), (0.0, 0.0), "{k}: a frozen weight moved");
        }
        assert!(well <= 1e-5 && ill <= 0.5e-2, "{k}: {t}");
    }
}

/// Rank-4 DoRA adapters (alpha 8, no dropout) on every projection.
fn dora_config() -> lora::LoraConfig {
    lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: lora::LoraConfig::resolve_targets(&["all".into()]).unwrap(),
        use_rslora: false,
        use_dora: true,
        multimodal: false,
    }
}

/// DoRA from the adapter anneal attached (its magnitudes PEFT's own), two
/// steps plain and under LoRA+ (where the magnitudes join the B factors'
/// group), and the merge.
#[test]
fn dora_steps_and_merge_match_peft() {
    let dir = fixture("tiny-llama");
    let cfg = dora_config();
    for ratio in [1.0, 16.0] {
        let base = Model::<AB>::load(&dir, &Default::default()).unwrap().net;
        let net = lora::attach(base, &cfg, 7);
        let what = format!("DoRA (LoRA+ ratio {ratio})");
        let peft = adapter_steps_match_peft(&what, &dir, net, &cfg, ratio);
        let num = |k: &str| peft[k].as_f64().unwrap();
        assert!(
            num("init_diff") <= 1e-6,
            "{what}: initial magnitudes differ from PEFT's by {}",
            num("init_diff")
        );
        assert!(
            peft["diff"].get("M").is_some() && num("moved") > 1e-3,
            "{what}: the magnitudes did not train: {peft}"
        );
    }
}

/// Under bf16 mixed precision, weights that do not train held in bf16
/// (`Holding::Bf16WhereExact`) take the same step, bit for bit, as the same
/// weights held in f32, since every product rounds them to bf16 anyway and
/// the embedding looks up the same values: DoRA
/// adapters on a frozen base (its magnitudes measured on the base, the
/// merge folding them in) and freeze tuning (the last layer's attention and
/// the norms train, and go back to f32 to do so). The checkpoints are the
/// fixtures saved in bf16; the fixtures themselves (f32 values) hold nothing
/// in bf16.
#[test]
fn frozen_weights_held_in_bf16_take_the_same_step() {
    use anneal_stages::model::Holding;
    use anneal_stages::model::weights::SaveDtype;
    use anneal_stages::train::freeze;
    use burn::module::AutodiffModule;
    let _rng = rng_lock();
    let device = Default::default();
    for name in ["tiny-qwen2", "tiny-llama"] {
        let dir = fixture(name);
        let b = batch(&reference(&dir).tensors);
        let f32_held = Model::<AB>::load_held(&dir, &device, Holding::Bf16WhereExact).unwrap();
        assert_eq!(
            f32_held.net.held_in_bf16().0,
            0,
            "{name}: f32 values held in bf16"
        );
        let bf16 = tempfile::tempdir().unwrap();
        f32_held
            .save(bf16.path(), SaveDtype::Bf16, u64::MAX)
            .unwrap();
        for dora in [true, false] {
            let step = |holding: Holding| {
                let model = Model::<AB>::load_held(bf16.path(), &device, holding).unwrap();
                let net = if dora {
                    lora::attach(model.net, &dora_config(), 3)
                } else {
                    let pats = freeze::patterns(
                        1,
                        model.net.layers.len(),
                        &["self_attn".into()],
                        &["norm".into()],
                    );
                    lora::freeze_unless(model.net, &|n: &str| {
                        pats.iter().any(|p| n.contains(p.as_str()))
                    })
                };
                let mut net = net.trainable_in_f32();
                let held = net.held_in_bf16().0;
                net.set_bf16(true);
                let (loss, mut g) = loss_and_grads(&net, &b, false);
                let norm = g.clip(1.0);
                let net = AdamW::new(AdamWConfig::default()).step(net, &g, 1e-2);
                let after = loss_of(&net, &b);
                let net = net.valid();
                let net = if dora { lora::merge(net) } else { net };
                (held, loss, norm, after, net.to_tensors())
            };
            let what = format!("{name}, {}", if dora { "DoRA" } else { "freeze" });
            let (held32, l32, n32, a32, t32) = step(Holding::F32);
            let (held16, l16, n16, a16, t16) = step(Holding::Bf16WhereExact);
            eprintln!("{what}: {held16} weights held in bf16; loss {l16}, norm {n16}, after {a16}");
            assert_eq!(held32, 0, "{what}");
            // tiny: the embedding and 2 layers of 7 projections; freeze:
            // layer 1's 4 attention projections train.
            let weights = 1 + 2 * 7 + usize::from(t32.contains_key("lm_head.weight"));
            assert_eq!(held16, weights - if dora { 0 } else { 4 }, "{what}");
            assert_eq!((l16, n16, a16), (l32, n32, a32), "{what}");
            assert!(a16 < l16, "{what}: the step did not lower the loss");
            assert_eq!(
                t16.keys().collect::<Vec<_>>(),
                t32.keys().collect::<Vec<_>>()
            );
            for (k, t) in &t32 {
                assert!(t16[k] == *t, "{what}: {k} differs");
            }
        }
    }
}
