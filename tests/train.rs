//! The `train` kind on the real binary: phases chained through the DAG, full
//! and LoRA fine-tuning, metrics, caching, and a killed run that resumes from
//! its checkpoint and ends with the same weights as an uninterrupted one.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// GSM8K sample rows as chat `messages` rows, split 48 / 12.
fn write_data(p: &Project) {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/data/gsm8k_sample.jsonl"),
    )
    .unwrap();
    let rows: Vec<String> = src
        .lines()
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            json!({"messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]}
            ]})
            .to_string()
        })
        .collect();
    p.write("data/train.jsonl", &(rows[..48].join("\n") + "\n"));
    p.write("data/val.jsonl", &(rows[48..].join("\n") + "\n"));
}

const PIPELINE: &str = r#"
name: sft
stages:
  base:
    kind: init_model
    deps: {corpus: data/train.jsonl}
    params: {size: SIZE, vocab_size: 512, seed: 1}
    outs: {model: work/base/}
  phase1:
    kind: train
    deps:
      train: data/train.jsonl
      val: data/val.jsonl
      init: ${stages.base.outs.model}
    params:
      finetuning_type: full
      learning_rate: 1.0e-3
      max_steps: STEPS
      per_device_train_batch_size: 2
      gradient_accumulation_steps: 2
      warmup_ratio: 0.1
      weight_decay: 0.01
      save_steps: SAVE
      cutoff_len: 160
      eval_steps: 3
      per_device_eval_batch_size: 5
      detailed_metrics: true
    outs: {model: work/phase1/, metrics: work/phase1.jsonl, plot: work/phase1_loss.png, checkpoints: work/phase1_ckpt/}
  phase2:
    kind: train
    deps:
      train: data/train.jsonl
      init: ${stages.phase1.outs.model}
    params:
      finetuning_type: lora
      lora_rank: 4
      use_rslora: true
      use_dora: true
      lora_dropout: 0.05
      lora_target: all
      merge_lora: true
      learning_rate: 2.0e-3
      max_steps: 3
      per_device_train_batch_size: 2
      cutoff_len: 160
    outs: {model: work/phase2/}
"#;

fn pipeline(size: &str, steps: u32, save: u32) -> String {
    PIPELINE
        .replace("SIZE", size)
        .replace("STEPS", &steps.to_string())
        .replace("SAVE", &save.to_string())
}

/// `(step, eval_loss)` of every evaluated step in `m`, and the step with the
/// lowest loss (the first of equal ones).
fn eval_losses(m: &[Value]) -> (Vec<(u64, f64)>, u64) {
    let evals: Vec<(u64, f64)> = m
        .iter()
        .filter_map(|x| Some((x["step"].as_u64()?, x["eval_loss"].as_f64()?)))
        .collect();
    let best = evals
        .iter()
        .fold(evals[0], |b, &e| if e.1 < b.1 { e } else { b })
        .0;
    (evals, best)
}

/// The entries of the directory `rel`, sorted.
fn names_in(p: &Project, rel: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(p.path(rel))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The token ids `anneal model generate` gives for "2+3?" (greedy, EOS
/// ignored) with `args`.
fn generated_ids(p: &Project, model: &str, args: &[&str]) -> Value {
    let mut all = vec![
        "model",
        "generate",
        model,
        "-p",
        "2+3?",
        "--ignore-eos",
        "--json",
    ];
    all.extend_from_slice(args);
    let g = p.anneal(&all);
    assert_eq!(g.code, 0, "{g:?}");
    g.json()["completions"][0]["ids"].clone()
}

/// The tensors of the safetensors file `rel`.
fn tensors(
    p: &Project,
    rel: &str,
) -> std::collections::BTreeMap<String, anneal_stages::model::HostTensor> {
    let mut m = std::collections::BTreeMap::new();
    anneal_stages::model::weights::load_file_into(&p.path(rel), &mut m).unwrap();
    m
}

fn metrics(p: &Project, rel: &str) -> Vec<Value> {
    p.read(rel)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn phases_train_chain_and_cache() {
    let p = Project::new();
    write_data(&p);
    p.write("sft.yaml", &pipeline("tiny", 6, 2));
    let out = p.run_ok("sft.yaml", &[]);
    assert_eq!(
        out,
        pairs(&[("base", "done"), ("phase1", "done"), ("phase2", "done")])
    );
    let m = metrics(&p, "work/phase1.jsonl");
    assert_eq!(m.len(), 6);
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["step"], i as u64 + 1);
        for k in ["loss", "lr", "grad_norm", "tokens", "tokens_per_s"] {
            assert!(line[k].is_number(), "{k} in {line}");
        }
    }
    assert_eq!(m[0]["lr"], 0.0, "warmup starts at 0");
    assert!(m[2]["eval_loss"].is_number() && m[5]["eval_ppl"].is_number());
    // detailed_metrics: per-class statistics on the step's batch and on validation.
    let d = &m[0]["train_detail"];
    assert_eq!(d["all"]["tokens"], m[0]["tokens"], "{d}");
    assert_eq!(
        d["reasoning"]["tokens"], d["all"]["tokens"],
        "no tool calls in this data"
    );
    assert!(d["tool_call"].is_null());
    let top = |k: &str| d["all"][k].as_f64().unwrap();
    assert!(0.0 < top("top1") && top("top1") <= top("top2") && top("top5") <= top("top10"));
    assert!(top("top10") <= 1.0 + 1e-6 && top("entropy_bits") <= 1.0);
    // Before the update, the batch's loss equals the step's loss.
    assert!(
        (top("loss") - m[0]["loss"].as_f64().unwrap()).abs() < 1e-4,
        "{d}"
    );
    let e = &m[2]["eval_detail"]["all"];
    assert!((e["loss"].as_f64().unwrap() - m[2]["eval_loss"].as_f64().unwrap()).abs() < 1e-4);
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[5]["loss"].as_f64().unwrap(),
    );
    assert!(last < first, "loss {first} -> {last}");
    // Phase 1 is a full HF checkpoint; phase 2 a merged model plus its PEFT adapter.
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
    ] {
        assert!(p.exists(&format!("work/phase1/{f}")), "phase1 {f}");
        assert!(p.exists(&format!("work/phase2/{f}")), "phase2 {f}");
    }
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(p.exists(&format!("work/phase2/adapter/{f}")), "{f}");
    }
    // PEFT loads the adapter onto phase 1 and computes what anneal's merged model computes.
    let peft = phase2_adapter_matches_peft(&p, "llama");
    assert_eq!(peft["peft_type"], "LORA", "{peft}");
    let adapter: Value =
        serde_json::from_str(&p.read("work/phase2/adapter/adapter_config.json")).unwrap();
    assert_eq!(adapter["use_rslora"], true, "{adapter}");
    assert_eq!(adapter["use_dora"], true, "{adapter}");
    // The merged model, and the adapter alone (loaded on its base model from
    // adapter_config.json), generate the same tokens.
    let ids = |model: &str| generated_ids(&p, model, &["--chat", "--max-new-tokens", "3"]);
    assert_eq!(ids("work/phase2"), ids("work/phase2/adapter"));
    // The run record carries the stage's report.
    let status = p.anneal(&["status", "sft.yaml", "--json"]);
    assert!(
        status.stdout.contains("\"trained_tokens_this_run\""),
        "{}",
        status.stdout
    );

    assert!(p.run_ok("sft.yaml", &[]).iter().all(|(_, o)| o == "cached"));
    // A later phase's param change reruns only that phase.
    p.write(
        "sft.yaml",
        &pipeline("tiny", 6, 2).replace("learning_rate: 2.0e-3", "learning_rate: 1.0e-3"),
    );
    let out = p.run_ok("sft.yaml", &[]);
    assert_eq!(
        out,
        pairs(&[("base", "cached"), ("phase1", "cached"), ("phase2", "done")])
    );
}

/// Gemma 2, Gemma 3, SmolLM3, OLMo 2, OLMo 3 and Phi-3 end to end: init_model
/// writes the checkpoint (Gemma's layers sliding over 24 keys, Gemma 2's
/// scores and logits soft-capped, Phi-3's fused projections (so LoRA adapts
/// `qkv_proj` and `gate_up_proj` whole, as PEFT does), SmolLM3's every fourth
/// without RoPE, OLMo 2's norms after each block, OLMo 3's three layers in
/// four sliding over 24 keys), the full phase trains it, the
/// LoRA phase (DoRA) merges; transformers loads both as their own classes
/// and PEFT's view of the adapter computes what the merged model computes.
#[test]
fn gemma_smollm3_olmo_and_phi3_train_and_their_adapters_load_in_peft() {
    let mut runs = Vec::new();
    for (arch, extra) in [
        ("gemma2", "sliding_window: 24, "),
        ("gemma3_text", "sliding_window: 24, "),
        ("smollm3", "num_hidden_layers: 4, "),
        ("olmo2", ""),
        ("olmo3", "sliding_window: 24, num_hidden_layers: 4, "),
        ("phi3", "sliding_window: 24, "),
    ] {
        let (p, config) = trains_as(arch, extra);
        runs.push((p, arch, config));
    }
    let cases: Vec<(&Project, &str)> = runs.iter().map(|(p, arch, _)| (p, *arch)).collect();
    let reports = phase2_adapters_match_peft(&cases);
    for ((_, arch, config), peft) in runs.iter().zip(&reports) {
        assert_eq!(peft["class"], config["architectures"][0], "{arch}: {peft}");
    }
}

/// The test pipeline on a tiny `arch` model from init_model (`extra`: more
/// of its params, each followed by ", "), run whole: phase 2's config names
/// the arch and phase 1's loss falls over its four steps.
fn trains_as(arch: &str, extra: &str) -> (Project, Value) {
    let p = Project::new();
    write_data(&p);
    let yaml = pipeline("tiny", 4, 100).replace(
        "{size: tiny,",
        &format!("{{arch: {arch}, {extra}size: tiny,"),
    );
    p.write("sft.yaml", &yaml);
    p.run_ok("sft.yaml", &[]);
    let config: Value = serde_json::from_str(&p.read("work/phase2/config.json")).unwrap();
    assert_eq!(config["model_type"], arch, "{config}");
    let m = metrics(&p, "work/phase1.jsonl");
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    assert!(loss(3) < loss(0), "{arch}: loss {} -> {}", loss(0), loss(3));
    (p, config)
}

/// Mixtures of experts end to end: init_model writes a Qwen3-MoE, a
/// Mixtral, an OLMoE and a Qwen2-MoE checkpoint (4 experts, top 2; Qwen2-MoE
/// with its shared expert), the full phase trains every weight (routers and
/// experts included), the LoRA phase (DoRA) adapts the attention only (and
/// Qwen2-MoE's shared expert and its gate), as LLaMA-Factory's
/// `lora_target: all` under transformers 5, and merges; transformers loads
/// both checkpoints as their own classes with no tensor
/// missing or unexpected, and PEFT's view of the adapter computes what the
/// merged model computes; so does, on Qwen3-MoE and Mixtral, a LoRA phase
/// with `lora_target: all, experts`, whose adapter also holds the routed
/// experts' factors in PEFT's `target_parameters` format.
/// `moe_aux_loss_coef` adds the routers' load-balancing loss.
#[test]
fn mixtures_of_experts_train_and_their_adapters_load_in_peft() {
    let mut runs = Vec::new();
    for arch in ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"] {
        let (p, config) = trains_as(arch, "");
        let (base, tuned) = (
            tensors(&p, "work/base/model.safetensors"),
            tensors(&p, "work/phase1/model.safetensors"),
        );
        let block = if arch == "mixtral" {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        let experts: Vec<&String> = base.keys().filter(|k| k.contains(".experts.")).collect();
        assert_eq!(experts.len(), 2 * 4 * 3, "{arch}: {experts:?}");
        for k in experts
            .into_iter()
            .chain([&format!("model.layers.1.{block}.gate.weight")])
        {
            assert!(base[k].data != tuned[k].data, "{arch}: {k} did not train");
        }
        // Qwen2-MoE's shared expert and its gate are `nn.Linear` modules.
        let adapter = tensors(&p, "work/phase2/adapter/adapter_model.safetensors");
        let adapted = |k: &String| {
            k.contains(".self_attn.") || (arch == "qwen2_moe" && k.contains(".mlp.shared_expert"))
        };
        assert!(adapter.keys().all(adapted), "{arch}: {:?}", adapter.keys());
        let gate = "mlp.shared_expert_gate.lora_B.weight";
        assert_eq!(
            adapter.keys().any(|k| k.ends_with(gate)),
            arch == "qwen2_moe",
            "{arch}"
        );
        runs.push((p, arch, config));
    }
    let cases: Vec<(&Project, &str)> = runs.iter().map(|(p, arch, _)| (p, *arch)).collect();
    let reports = phase2_adapters_match_peft(&cases);
    for ((_, arch, config), peft) in runs.iter().zip(&reports) {
        assert_eq!(peft["class"], config["architectures"][0], "{arch}: {peft}");
    }
    assert_eq!(reports[3]["target_modules"].as_array().unwrap().len(), 8);
    // `lora_target: all, experts` adapts the routed experts too, in PEFT's
    // `target_parameters` format (one pair of factors per projection for
    // all experts of a layer): PEFT loads it and computes what our merge
    // computes.
    let with_experts: Vec<(&Project, &str)> = runs[..2]
        .iter()
        .map(|(p, arch, _)| {
            run_expert_lora(p, &format!("arch: {arch}"));
            let adapter = tensors(p, "work/experts/adapter/adapter_model.safetensors");
            // B starts at zero: trained, it moves.
            for k in ["experts.base_layer.lora_B", "experts.lora_B"] {
                let k = format!("base_model.model.model.layers.1.mlp.{k}.weight");
                let b = adapter.get(&k);
                let b = b.unwrap_or_else(|| panic!("{arch}: no {k}: {:?}", adapter.keys()));
                assert!(
                    b.data.iter().any(|x| *x != 0.0),
                    "{arch}: {k} did not train"
                );
            }
            (p, *arch)
        })
        .collect();
    let reports = adapters_match_peft(&with_experts, "work/experts");
    for (peft, (_, arch)) in reports.iter().zip(&with_experts) {
        assert_eq!(
            peft["target_parameters"],
            serde_json::json!(["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
            "{arch}: {peft}"
        );
    }
    // The routers' load-balancing loss (transformers' `output_router_logits`,
    // here through `moe_aux_loss_coef`) joins the training loss: near-uniform
    // routers at initialisation make it about top_k = 2, so the first step's
    // loss grows by about 0.1 * 2 over the same step without it.
    let p = &runs[0].0;
    let yaml = pipeline("tiny", 1, 100)
        .replace("{size: tiny,", "{arch: qwen3_moe, size: tiny,")
        .replace(
            "finetuning_type: full",
            "finetuning_type: full\n      moe_aux_loss_coef: 0.1",
        )
        .replace("work/phase1", "work/aux1");
    p.write("aux.yaml", &yaml);
    p.run_ok("aux.yaml", &["--stage", "phase1"]);
    let (plain, aux) = (
        metrics(p, "work/phase1.jsonl"),
        metrics(p, "work/aux1.jsonl"),
    );
    let step0 = |m: &[Value]| m[0]["loss"].as_f64().unwrap();
    let added = step0(&aux) - step0(&plain);
    assert!((added - 0.2).abs() < 0.05, "{added}");
}

/// gpt-oss end to end: init_model writes a gpt-oss checkpoint (4 experts,
/// top 2, every other layer sliding over 8 keys) in its stacked layout, the
/// full phase trains every weight (the experts' stacked matrices and
/// biases, the routers, the attention sinks), the LoRA phase adapts the
/// attention (and, with `lora_target: all, experts`, the routed experts),
/// and transformers loads both checkpoints as GptOssForCausalLM with no
/// tensor missing or unexpected; PEFT's view of each adapter computes what
/// the merged model computes.
#[test]
fn gpt_oss_trains_and_loads_in_transformers_and_peft() {
    let (p, config) = trains_as("gpt_oss", "sliding_window: 8, ");
    assert_eq!(
        config["layer_types"],
        serde_json::json!(["sliding_attention", "full_attention"])
    );
    let (base, tuned) = (
        tensors(&p, "work/base/model.safetensors"),
        tensors(&p, "work/phase1/model.safetensors"),
    );
    let mut stacked: Vec<&String> = base
        .keys()
        .filter(|k| k.contains(".experts.") || k.contains(".router.") || k.ends_with(".sinks"))
        .collect();
    stacked.sort();
    assert_eq!(stacked.len(), 2 * 7, "{stacked:?}");
    for k in stacked {
        assert!(base[k].data != tuned[k].data, "{k} did not train");
    }
    let up = &tuned["model.layers.1.mlp.experts.gate_up_proj"];
    assert_eq!(up.shape[0], 4, "experts first: {:?}", up.shape);
    let adapter = tensors(&p, "work/phase2/adapter/adapter_model.safetensors");
    assert!(
        adapter.keys().all(|k| k.contains(".self_attn.")),
        "{:?}",
        adapter.keys()
    );
    let peft = phase2_adapters_match_peft(&[(&p, "gpt_oss")]);
    assert_eq!(peft[0]["class"], "GptOssForCausalLM", "{}", peft[0]);
    // The experts' adapters too: PEFT's `target_parameters`, gate and up rows
    // interleaved as gpt-oss's `gate_up_proj` interleaves its columns.
    run_expert_lora(&p, "arch: gpt_oss, sliding_window: 8");
    let peft = adapters_match_peft(&[(&p, "gpt_oss experts")], "work/experts");
    assert_eq!(
        peft[0]["target_parameters"],
        serde_json::json!(["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]),
        "{}",
        peft[0]
    );
}

/// Runs phase 2 of the pipeline with `lora_target: all, experts` (no DoRA,
/// no dropout) into `work/experts/`, the base model made with `init`
/// (`arch: …` and other init_model params).
fn run_expert_lora(p: &Project, init: &str) {
    let yaml = pipeline("tiny", 4, 100)
        .replace("{size: tiny,", &format!("{{{init}, size: tiny,"))
        .replace(
            "use_dora: true\n      lora_dropout: 0.05\n      lora_target: all",
            "lora_target: all, experts",
        )
        .replace("work/phase2/", "work/experts/");
    p.write("experts.yaml", &yaml);
    p.run_ok("experts.yaml", &["--stage", "phase2"]);
}

/// A multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration, built by
/// transformers from tiny-qwen2's sizes with a one-layer vision tower)
/// trains on text: the full phase writes the language model back beside the
/// untouched vision tower (transformers loads it with no tensor missing or
/// unexpected), and the LoRA phase's adapter, restricted to the language
/// model, loads in PEFT and computes what the merged model computes.
#[test]
fn multimodal_gemma3_trains_its_language_model() {
    let p = Project::new();
    write_data(&p);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/support/tiny_arch.py");
    let fixture = shared("fixtures/tiny-qwen2");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg("gemma3-mm")
        .arg(&fixture)
        .arg(p.path("mm"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = pipeline("tiny", 4, 100).replace("init: ${stages.base.outs.model}", "init: mm/");
    p.write("sft.yaml", &yaml);
    p.run_ok("sft.yaml", &["--stage", "phase2"]);
    let config: Value = serde_json::from_str(&p.read("work/phase1/config.json")).unwrap();
    assert_eq!(config["model_type"], "gemma3", "{config}");
    let m = metrics(&p, "work/phase1.jsonl");
    let loss = |i: usize| m[i]["loss"].as_f64().unwrap();
    assert!(loss(3) < loss(0), "loss {} -> {}", loss(0), loss(3));
    // The vision tower is saved back as it was.
    let (before, after) = (
        tensors(&p, "mm/model.safetensors"),
        tensors(&p, "work/phase1/model.safetensors"),
    );
    let vision: Vec<&String> = before
        .keys()
        .filter(|k| k.starts_with("vision_tower."))
        .collect();
    assert!(!vision.is_empty());
    for k in vision {
        assert!(before[k].data == after[k].data, "{k} changed");
    }
    let q = "language_model.model.layers.0.self_attn.q_proj.weight";
    assert!(before[q].data != after[q].data, "{q} did not train");
    // anneal reads its multimodal adapter back (names under
    // model.language_model.) onto phase 1's model: it generates what the
    // merged model generates.
    assert_eq!(
        generated_ids(&p, "work/phase2/adapter", &[]),
        generated_ids(&p, "work/phase2", &[])
    );
    let peft = phase2_adapter_matches_peft(&p, "gemma3 multimodal");
    assert_eq!(peft["class"], "Gemma3ForConditionalGeneration", "{peft}");
}

/// `tests/support/check_peft.py` on `p`'s phase 2: PEFT's view of its
/// adapter on phase 1's model computes what the merged phase 2 model
/// computes (to 1e-4 of the largest logit), and differs from phase 1's
/// model. Returns the script's report; `what` names the case in failures.
fn phase2_adapter_matches_peft(p: &Project, what: &str) -> Value {
    phase2_adapters_match_peft(&[(p, what)]).remove(0)
}

/// [`phase2_adapter_matches_peft`] for several projects in one Python run.
fn phase2_adapters_match_peft(cases: &[(&Project, &str)]) -> Vec<Value> {
    adapters_match_peft(cases, "work/phase2")
}

/// [`phase2_adapters_match_peft`] with phase 2's model in `phase2`.
fn adapters_match_peft(cases: &[(&Project, &str)], phase2: &str) -> Vec<Value> {
    require_python(&["torch", "peft", "transformers"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/check_peft.py");
    let mut args = vec![script.clone()];
    for (p, _) in cases {
        let adapter = format!("{phase2}/adapter");
        args.extend(["work/phase1", &adapter, phase2].map(|d| p.path(d)));
    }
    let args: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
    let peft = python_json(&args, &script.display().to_string());
    let reports = match peft {
        Value::Array(reports) => reports,
        one => vec![one],
    };
    assert_eq!(reports.len(), cases.len(), "{reports:?}");
    for ((_, what), peft) in cases.iter().zip(&reports) {
        eprintln!("PEFT check ({what}): {peft}");
        let scale = peft["logit_scale"].as_f64().unwrap();
        assert!(
            peft["peft_vs_merged_max_abs"].as_f64().unwrap() < 1e-4 * scale.max(1.0),
            "{what}: {peft}"
        );
        assert!(
            peft["peft_vs_base_max_abs"].as_f64().unwrap() > 1e-5,
            "{what}: the adapter changes nothing: {peft}"
        );
    }
    reports
}

fn find_file(dir: &Path, suffix: &str) -> Option<PathBuf> {
    walkdir(dir)
        .into_iter()
        .find(|e| e.to_string_lossy().ends_with(suffix))
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walkdir(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// `finetuning_type: freeze` trains only the chosen layers, also after a
/// resume (which must freeze the reloaded weights again).
#[test]
fn freeze_trains_the_last_layers_and_resumes() {
    let yaml = pipeline("small", 12, 3).replacen(
        "finetuning_type: full",
        "finetuning_type: freeze\n      freeze_trainable_layers: 1\n      freeze_extra_modules: embed_tokens",
        1,
    );
    let p = resumes_to_the_same_weights(&yaml);
    let (base, tuned) = (
        tensors(&p, "work/base/model.safetensors"),
        tensors(&p, "work/phase1/model.safetensors"),
    );
    let layers = base
        .keys()
        .filter(|k| k.ends_with("input_layernorm.weight"))
        .count();
    assert!(layers >= 2, "{layers}");
    let last = format!("model.layers.{}.", layers - 1);
    for (k, t) in &base {
        let trains = k.starts_with(&last) || k == "model.embed_tokens.weight";
        assert_eq!(t.data != tuned[k].data, trains, "{k}: trained {}", !trains);
    }
}

/// LoRA with DoRA magnitudes and dropout resumes to the same adapter: the
/// magnitudes, their AdamW moments and the dropout generator come back. The
/// base is stored in bf16 and trains under `bf16: true`, so its projections
/// are held in bf16, before and after the resume.
#[test]
fn dora_training_resumes_to_the_same_adapter() {
    let yaml = pipeline("small", 12, 3)
        .replace("{size: small,", "{dtype: bfloat16, size: small,")
        .replacen(
            "finetuning_type: full",
            "finetuning_type: lora\n      lora_rank: 4\n      use_dora: true\n      \
             lora_dropout: 0.1\n      lora_target: all\n      merge_lora: true\n      bf16: true",
            1,
        );
    let p = resumes_to_the_same_weights(&yaml);
    let cfg: Value =
        serde_json::from_str(&p.read("work/phase1/adapter/adapter_config.json")).unwrap();
    assert_eq!(cfg["use_dora"], json!(true));
    let base: Value = serde_json::from_str(&p.read("work/base/config.json")).unwrap();
    assert_eq!(base["torch_dtype"], "bfloat16");
    let status: Value =
        serde_json::from_str(&p.anneal(&["status", "sft.yaml", "--json"]).stdout).unwrap();
    let report = &status["stages"][1]["report"];
    let layers = base["num_hidden_layers"].as_u64().unwrap();
    // The embedding (also the tied LM head) and seven projections a layer.
    assert_eq!(
        report["weights_held_in_bf16"],
        json!(1 + 7 * layers),
        "{report}"
    );
}

/// LoRA on a mixture's routed experts resumes to the same adapter: the
/// experts' factors and their AdamW moments come back.
#[test]
fn expert_lora_training_resumes_to_the_same_adapter() {
    let yaml = pipeline("small", 12, 3)
        .replace("{size: small,", "{arch: qwen3_moe, size: small,")
        .replacen(
            "finetuning_type: full",
            "finetuning_type: lora\n      lora_rank: 4\n      lora_target: q_proj, experts\n      \
             merge_lora: true",
            1,
        );
    let p = resumes_to_the_same_weights(&yaml);
    let cfg: Value =
        serde_json::from_str(&p.read("work/phase1/adapter/adapter_config.json")).unwrap();
    assert_eq!(
        (&cfg["target_modules"], &cfg["target_parameters"]),
        (
            &json!(["q_proj"]),
            &json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        )
    );
}

/// A killed run resumes from its checkpoint to the same weights, metrics
/// and learning rates. The schedule is `reduce_lr_on_plateau`, whose state
/// (best loss, counters, rate) must come back from the checkpoint too; it
/// lowers the rate after evaluations that did not improve, as torch's
/// `ReduceLROnPlateau` does when HF Trainer feeds it the same validation
/// losses.
#[test]
fn killed_training_resumes_to_the_same_weights_and_schedule() {
    // Only a loss below half the best counts as better, so every evaluation
    // after the first lowers the rate (patience 0); warmup is ignored, as HF
    // ignores it for this schedule.
    let yaml = pipeline("small", 12, 3).replacen(
        "warmup_ratio: 0.1",
        "warmup_ratio: 0.1\n      lr_scheduler_type: reduce_lr_on_plateau\n      \
         lr_scheduler_kwargs: {patience: 0, factor: 0.5, threshold: 0.5}",
        1,
    );
    let p = resumes_to_the_same_weights(&yaml);
    let m = metrics(&p, "work/phase1.jsonl");
    let (evals, _) = eval_losses(&m);
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        [3, 6, 9, 12],
        "{m:?}"
    );
    let losses: Vec<f64> = evals.iter().map(|e| e.1).collect();
    // The rate of each step: the scheduler's after the evaluations before it.
    let script = r#"
import json, sys, warnings
import torch
from transformers import get_scheduler
warnings.simplefilter("ignore")
losses, every, steps = json.loads(sys.argv[1]), 3, 12
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
s = get_scheduler("reduce_lr_on_plateau", opt, scheduler_specific_kwargs=
                  {"patience": 0, "factor": 0.5, "threshold": 0.5})
lrs = []
for step in range(1, steps + 1):
    lrs.append(opt.param_groups[0]["lr"])
    if step % every == 0:
        s.step(losses[step // every - 1])
print(json.dumps(lrs))
"#;
    let arg = json!(losses).to_string();
    let want = python_json(&["-c", script, &arg], "torch transformers");
    let got: Vec<Value> = m.iter().map(|x| x["lr"].clone()).collect();
    assert_eq!(json!(got), want, "eval losses {losses:?}");
    let distinct: std::collections::BTreeSet<String> = got.iter().map(|v| v.to_string()).collect();
    assert_eq!(distinct.len(), 3, "the rate fell twice: {got:?}");

    // Without evaluations during training there is nothing to follow.
    let q = Project::new();
    write_data(&q);
    q.write("sft.yaml", &yaml.replace("      eval_steps: 3\n", ""));
    let r = q.anneal(&["plan", "sft.yaml"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("params.lr_scheduler_type") && r.stderr.contains("eval_steps"),
        "{}",
        r.stderr
    );
}

/// Trains `yaml`'s phase 1 uninterrupted, and again killed after its step 6
/// checkpoint and resumed; both end with the same weights (and adapter, for
/// LoRA) and metrics. Returns the resumed project.
fn resumes_to_the_same_weights(yaml: &str) -> Project {
    // Uninterrupted.
    let a = Project::new();
    write_data(&a);
    a.write("sft.yaml", yaml);
    a.run_ok("sft.yaml", &["--stage", "phase1"]);
    // Killed after the checkpoint of step 6, then resumed.
    let b = Project::new();
    write_data(&b);
    b.write("sft.yaml", yaml);
    let mut child = b.spawn(&["run", "sft.yaml", "--stage", "phase1"]);
    let store = b.path(".anneal");
    wait_for("checkpoint global_step_6", || {
        find_file(&store, "global_step_6/state.json").is_some()
    });
    // SIGKILL the engine: its stage process dies with it (PDEATHSIG).
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !b.exists("work/phase1/model.safetensors"),
        "the run was killed before it finished; lower the poll interval or add steps"
    );
    let r = b.anneal(&["plan", "sft.yaml", "--json"]);
    assert!(
        r.stdout.contains("resumes an interrupted run"),
        "{}",
        r.stdout
    );
    let run = b.anneal(&["run", "sft.yaml", "--stage", "phase1", "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let st = b.anneal(&["status", "sft.yaml", "--json"]);
    assert!(
        st.stdout.contains("\"resumed_from_step\": 6")
            || st.stdout.contains("\"resumed_from_step\":6"),
        "{}",
        st.stdout
    );
    // Byte equality, reported by file (the bytes themselves are megabytes).
    for f in [
        "work/phase1/model.safetensors",
        "work/phase1/adapter/adapter_model.safetensors",
    ] {
        if a.exists(f) {
            assert!(
                std::fs::read(a.path(f)).unwrap() == std::fs::read(b.path(f)).unwrap(),
                "{f}: the resumed run's differs from the uninterrupted run's"
            );
        }
    }
    let losses = |p: &Project| -> Vec<Value> {
        metrics(p, "work/phase1.jsonl")
            .into_iter()
            .map(|m| json!([m["step"], m["loss"], m["grad_norm"], m["lr"]]))
            .collect()
    };
    assert_eq!(losses(&a), losses(&b));
    b
}

#[test]
fn packing_trains_the_same_function_with_less_padding() {
    let losses = |packing: bool| {
        let p = Project::new();
        write_data(&p);
        let yaml = pipeline("tiny", 4, 100)
            .replace(
                "      detailed_metrics: true\n",
                &format!("      detailed_metrics: false\n      packing: {packing}\n"),
            )
            .replacen("cutoff_len: 160", "cutoff_len: 1024", 1);
        p.write("sft.yaml", &yaml);
        p.run_ok("sft.yaml", &["--stage", "phase1"]);
        metrics(&p, "work/phase1.jsonl")
    };
    let (plain, packed) = (losses(false), losses(true));
    for (a, b) in plain.iter().zip(&packed) {
        for k in ["loss", "grad_norm", "eval_loss"] {
            if let (Some(x), Some(y)) = (a[k].as_f64(), b[k].as_f64()) {
                assert!(
                    ((x - y) / x).abs() < 1e-4,
                    "step {}: {k} {x} vs {y}",
                    a["step"]
                );
            }
        }
        assert_eq!(a["tokens"], b["tokens"]);
    }
    let rows = |m: &[Value]| m.iter().map(|x| x["rows"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(rows(&plain), 16, "4 steps of 4 samples");
    assert!(
        rows(&packed) < 12,
        "packing put several samples in a row: {}",
        rows(&packed)
    );
}

/// `gradient_checkpointing: true` recomputes each layer in the backward pass
/// and trains the same model: full fine-tuning with NEFTune's noise, then
/// LoRA with dropout (each layer's masks, and the noise, drawn again from
/// the same seed).
#[test]
fn gradient_checkpointing_trains_the_same_model() {
    let run = |on: bool, neftune: &str| {
        let p = Project::new();
        write_data(&p);
        // A Qwen3 model: checkpointing recomputes its per-head q/k norms
        // too, and its second layer's sliding window.
        let yaml = pipeline("tiny", 4, 100)
            .replace(
                "{size: tiny,",
                "{arch: qwen3, sliding_window: 48, max_window_layers: 1, size: tiny,",
            )
            .replace(
                "      detailed_metrics: true\n",
                &format!("      gradient_checkpointing: {on}\n{neftune}"),
            )
            .replace(
                "      merge_lora: true\n",
                &format!("      merge_lora: true\n      gradient_checkpointing: {on}\n"),
            )
            .replace(
                "outs: {model: work/phase2/}",
                "outs: {model: work/phase2/, metrics: work/phase2.jsonl}",
            );
        p.write("sft.yaml", &yaml);
        p.run_ok("sft.yaml", &[]);
        let config = p.read("work/phase2/config.json");
        assert!(config.contains("\"qwen3\""), "{config}");
        assert!(config.contains("\"sliding_window\": 48"), "{config}");
        [
            metrics(&p, "work/phase1.jsonl"),
            metrics(&p, "work/phase2.jsonl"),
        ]
    };
    let noise = "      neftune_noise_alpha: 5.0\n";
    let (plain, ckpt, quiet) = (run(false, noise), run(true, noise), run(false, ""));
    let loss = |m: &[Value]| m[0]["loss"].as_f64().unwrap();
    assert_ne!(
        loss(&plain[0]),
        loss(&quiet[0]),
        "the noise is on in phase 1"
    );
    assert_ne!(
        loss(&plain[1]),
        loss(&quiet[1]),
        "phase 2 starts from phase 1's model"
    );
    for (phase, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            for k in ["loss", "grad_norm", "eval_loss"] {
                if let (Some(u), Some(v)) = (x[k].as_f64(), y[k].as_f64()) {
                    assert!(
                        ((u - v) / u).abs() < 1e-6,
                        "phase {}: step {}: {k} {u} without checkpointing, {v} with",
                        phase + 1,
                        x["step"]
                    );
                }
            }
        }
    }
}

/// Steps per epoch, the last step of an epoch, `constant`, `save_total_limit`
/// and bad params, as HF Trainer / LLaMA-Factory users expect them.
#[test]
fn epochs_schedules_and_checkpoint_limits_follow_hf_trainer() {
    let p = Project::new();
    write_data(&p);
    // 10 training rows, 4 a step: 3 steps an epoch (4, 4, then the 2 left).
    let rows: Vec<String> = p
        .read("data/train.jsonl")
        .lines()
        .take(10)
        .map(String::from)
        .collect();
    p.write("data/ten.jsonl", &(rows.join("\n") + "\n"));
    let yaml = pipeline("tiny", 1, 1)
        .replace(
            "train: data/train.jsonl\n      val",
            "train: data/ten.jsonl\n      val",
        )
        .replace("      max_steps: 1\n", "      num_train_epochs: 2\n")
        .replace(
            "gradient_accumulation_steps: 2",
            "gradient_accumulation_steps: 1",
        )
        .replace(
            "per_device_train_batch_size: 2\n      gradient",
            "per_device_train_batch_size: 4\n      gradient",
        )
        .replace(
            "warmup_ratio: 0.1",
            "warmup_steps: 2\n      lr_scheduler_type: constant\n      save_total_limit: 2",
        )
        .replace("      detailed_metrics: true\n", "")
        .replacen("cutoff_len: 160", "cutoff_len: 1024", 1);
    p.write("sft.yaml", &yaml);
    p.run_ok("sft.yaml", &["--stage", "phase1"]);
    let m = metrics(&p, "work/phase1.jsonl");
    let rows: Vec<u64> = m.iter().map(|x| x["rows"].as_u64().unwrap()).collect();
    assert_eq!(rows, [4, 4, 2, 4, 4, 2], "{m:?}");
    let epochs: Vec<f64> = m.iter().map(|x| x["epoch"].as_f64().unwrap()).collect();
    assert!(
        (epochs[2] - 1.0).abs() < 1e-9 && (epochs[5] - 2.0).abs() < 1e-9,
        "{epochs:?}"
    );
    assert!(
        m.iter().all(|x| x["lr"].as_f64() == Some(1e-3)),
        "constant ignores warmup: {m:?}"
    );
    // save_steps 1 with save_total_limit 2: the final checkpoint and the one before it.
    assert_eq!(
        names_in(&p, "work/phase1_ckpt"),
        ["global_step_5", "global_step_6"]
    );

    // A schedule with kwargs reaches the steps (each schedule's values are
    // checked against transformers in stages/tests/schedules.rs).
    let kwargs =
        "lr_scheduler_type: cosine_with_min_lr\n      lr_scheduler_kwargs: {min_lr: 4.0e-4}";
    p.write(
        "sft.yaml",
        &yaml.replace("lr_scheduler_type: constant", kwargs),
    );
    p.run_ok("sft.yaml", &["--stage", "phase1"]);
    let m = metrics(&p, "work/phase1.jsonl");
    let schedule = anneal_stages::train::Schedule::new(
        anneal_stages::train::Scheduler::CosineWithMinLr,
        json!({"min_lr": 4.0e-4}).as_object().unwrap(),
        1e-3,
    )
    .and_then(|s| s.for_run(2, 6))
    .unwrap();
    let lrs: Vec<f64> = m.iter().map(|x| x["lr"].as_f64().unwrap()).collect();
    let want: Vec<f64> = (0..6).map(|s| schedule.lr(s)).collect();
    assert_eq!(lrs, want);
    assert!(lrs[5] > 4.0e-4 && lrs[5] < 5.0e-4, "{lrs:?}");

    // HF's strategies: at the end of each epoch (steps 3 and 6), whatever
    // save_steps and eval_steps say; `no` never during training.
    let strategies = |save: &str, eval: &str| {
        let y = yaml.replacen("eval_steps: 3", "eval_steps: 2", 1).replacen(
            "      save_total_limit: 2\n",
            &format!("      save_strategy: {save}\n      eval_strategy: {eval}\n"),
            1,
        );
        p.write("sft.yaml", &y);
        p.run_ok("sft.yaml", &["--stage", "phase1"]);
        let evaluated: Vec<u64> = metrics(&p, "work/phase1.jsonl")
            .iter()
            .filter(|x| x.get("eval_loss").is_some())
            .map(|x| x["step"].as_u64().unwrap())
            .collect();
        (names_in(&p, "work/phase1_ckpt"), evaluated)
    };
    let (saved, evaluated) = strategies("epoch", "epoch");
    assert_eq!(saved, ["global_step_3", "global_step_6"]);
    assert_eq!(evaluated, [3, 6]);
    let (saved, evaluated) = strategies("no", "steps");
    assert_eq!(saved, ["global_step_6"]);
    assert_eq!(evaluated, [2, 4, 6]);
    let (_, evaluated) = strategies("steps", "no");
    assert_eq!(evaluated, Vec::<u64>::new());

    // max_samples: the first 5 rows of each file, so 2 steps an epoch.
    p.write(
        "sft.yaml",
        &yaml.replacen(
            "      save_total_limit: 2\n",
            "      max_samples: 5\n      optim: adamw_torch\n",
            1,
        ),
    );
    p.run_ok("sft.yaml", &["--stage", "phase1"]);
    let m = metrics(&p, "work/phase1.jsonl");
    let rows: Vec<u64> = m.iter().map(|x| x["rows"].as_u64().unwrap()).collect();
    assert_eq!(rows, [4, 1, 4, 1], "{m:?}");

    for (bad, key) in [
        ("eval_steps: 0", "params.eval_steps"),
        ("max_steps: 0", "params.max_steps"),
        ("adam_beta1: 1.0", "params.adam_beta1"),
        (
            "mask_history: true\n      train_on_prompt: true",
            "params.mask_history",
        ),
        ("loraplus_lr_ratio: 16", "params.loraplus_lr_ratio"),
        ("use_dora: true", "params.use_dora"),
        ("optim: adamw_8bit", "params.optim"),
        ("max_samples: 0", "params.max_samples"),
        (
            "load_best_model_at_end: true\n      save_strategy: epoch",
            "params.save_strategy",
        ),
        ("eval_strategy: steps", "params.eval_strategy"),
        (
            "lr_scheduler_kwargs: {min_lr: 1.0e-5}",
            "params.lr_scheduler_kwargs.min_lr",
        ),
    ] {
        let y = if bad.starts_with("eval_steps") || bad.starts_with("eval_strategy") {
            yaml.replacen("eval_steps: 3", bad, 1)
        } else {
            yaml.replacen(
                "      eval_steps: 3\n",
                &format!("      eval_steps: 3\n      {bad}\n"),
                1,
            )
        };
        p.write("bad.yaml", &y);
        let r = p.anneal(&["plan", "bad.yaml"]);
        assert_eq!(r.code, 2, "{bad}: {r:?}");
        assert!(r.stderr.contains(key), "{bad}: {r:?}");
    }
}

/// `load_best_model_at_end`: the `model` output is the saved checkpoint with
/// the lowest validation loss, which `save_total_limit` never prunes, and the
/// final weights are still the last checkpoint.
#[test]
fn load_best_model_at_end_outputs_the_best_checkpoint() {
    let p = Project::new();
    write_data(&p);
    // A learning rate high enough that the validation loss goes up again.
    let yaml = pipeline("tiny", 8, 2)
        .replace("learning_rate: 1.0e-3", "learning_rate: 5.0e-2")
        .replace(
            "eval_steps: 3",
            "eval_steps: 2\n      load_best_model_at_end: true\n      save_total_limit: 1",
        )
        .replace("      detailed_metrics: true\n", "")
        .replace(
            "      train: data/train.jsonl\n      init: ${stages.phase1",
            "      train: data/train.jsonl\n      val: data/val.jsonl\n      init: ${stages.phase1",
        )
        .replace(
            "learning_rate: 2.0e-3\n      max_steps: 3",
            "learning_rate: LR2\n      max_steps: 6\n      save_steps: 1\n      eval_steps: 1\n      load_best_model_at_end: true",
        )
        .replace(
            "outs: {model: work/phase2/}",
            "outs: {model: work/phase2/, metrics: work/phase2.jsonl, checkpoints: work/phase2_ckpt/}",
        )
        .replace("LR2", "1.0e-1");
    p.write("sft.yaml", &yaml);
    p.run_ok("sft.yaml", &[]);
    let (evals2, best2) = eval_losses(&metrics(&p, "work/phase2.jsonl"));
    eprintln!("LoRA validation losses: {evals2:?}");
    // LoRA with merge_lora: the adapter and the merged model are the best step's.
    assert_ne!(best2, 6, "{evals2:?}");
    let adapter =
        |dir: &str| std::fs::read(p.path(&format!("{dir}/adapter_model.safetensors"))).unwrap();
    assert!(
        adapter("work/phase2/adapter") == adapter(&format!("work/phase2_ckpt/global_step_{best2}"))
    );
    assert!(adapter("work/phase2/adapter") != adapter("work/phase2_ckpt/global_step_6"));
    let ids = |model: &str| generated_ids(&p, model, &["--max-new-tokens", "4"]);
    assert_eq!(
        ids("work/phase2"),
        ids("work/phase2/adapter"),
        "the merged model is the best adapter's"
    );
    let (evals, best) = eval_losses(&metrics(&p, "work/phase1.jsonl"));
    eprintln!("validation losses: {evals:?}");
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 6, 8]);
    assert_ne!(best, 8, "the final step is not the best here: {evals:?}");
    let weights = |rel: &str| std::fs::read(p.path(rel)).unwrap();
    assert!(
        weights("work/phase1/model.safetensors")
            == weights(&format!(
                "work/phase1_ckpt/global_step_{best}/model.safetensors"
            )),
        "the model output is the best checkpoint"
    );
    assert!(
        weights("work/phase1/model.safetensors")
            != weights("work/phase1_ckpt/global_step_8/model.safetensors"),
        "the final checkpoint holds the final weights"
    );
    // save_total_limit 1 keeps the best (and the final one, which the output holds).
    assert_eq!(
        names_in(&p, "work/phase1_ckpt"),
        [format!("global_step_{best}"), "global_step_8".into()]
    );
    let status = p.anneal(&["status", "sft.yaml", "--json"]).json();
    let report = &status["stages"][1]["report"];
    assert_eq!(status["stages"][1]["stage"], "phase1");
    assert_eq!(report["best_step"], best, "{report}");

    for (edit, key) in [
        ("", "params.load_best_model_at_end"),
        ("      eval_steps: 3\n", "params.save_steps"),
        (
            "      eval_steps: 2\n      metric_for_best_model: accuracy\n",
            "params.metric_for_best_model",
        ),
    ] {
        p.write("bad.yaml", &yaml.replacen("      eval_steps: 2\n", edit, 1));
        let r = p.anneal(&["plan", "bad.yaml"]);
        assert_eq!(r.code, 2, "{edit}: {r:?}");
        assert!(r.stderr.contains(key), "{edit}: {r:?}");
    }
}
