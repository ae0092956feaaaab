//! `anneal model init|template|generate` on the real binary, and the checkpoint
//! it writes read back by Hugging Face's own libraries (transformers' config and
//! tokenizer, safetensors), with no torch needed.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

fn conversation() -> Value {
    json!({
        "messages": [
            {"role": "system", "content": "You solve grade-school math."},
            {"role": "user", "content": "Find the weather in Paris, then add 2 + 3."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ]},
            {"role": "tool", "content": "{\"temp_c\": 18}"},
            {"role": "assistant", "content": "It is 18 °C in Paris, and 2 + 3 = 5."}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather by city: returns <temp> & 'humidity' (°C)",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }}]
    })
}

fn python_view(dir: &Path, conv: &Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/check_hf_checkpoint.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), conv.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} failed (CI installs transformers and safetensors): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn model_init_writes_a_checkpoint_that_transformers_reads() {
    let p = Project::new();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/data/gsm8k_sample.jsonl");
    let corpus = corpus.to_str().unwrap();
    let init = |out: &str| {
        let r = p.anneal(&[
            "model",
            "init",
            "--corpus",
            corpus,
            "--out",
            out,
            "--vocab-size",
            "600",
            "--json",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        r.json()
    };
    let summary = init("m");
    assert_eq!(summary["arch"], "llama");
    let vocab = summary["vocab_size"].as_u64().unwrap();
    assert!((300..=600).contains(&vocab), "{summary}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        assert!(p.exists(&format!("m/{f}")), "{f} written");
    }
    // Same corpus and seed, same bytes.
    init("m2");
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert_eq!(
            std::fs::read(p.path(&format!("m/{f}"))).unwrap(),
            std::fs::read(p.path(&format!("m2/{f}"))).unwrap(),
            "{f} is deterministic"
        );
    }

    // transformers reads config, weights and tokenizer; its chat template
    // rendering and token ids equal anneal's.
    let conv = conversation();
    let hf = python_view(&p.path("m"), &conv);
    assert_eq!(hf["model_type"], "llama");
    assert_eq!(hf["vocab_size"].as_u64().unwrap(), vocab);
    assert_eq!(hf["tie_word_embeddings"], true);
    let tensors = hf["tensors"].as_object().unwrap();
    assert_eq!(tensors["model.embed_tokens.weight"], json!([vocab, 64]));
    assert_eq!(
        tensors["model.layers.1.mlp.down_proj.weight"],
        json!([64, 128])
    );
    assert_eq!(
        tensors.len(),
        1 + 2 * 9 + 1,
        "embedding, 9 per layer, final norm"
    );
    assert_eq!(hf["eos_token"], "<|im_end|>");
    p.write("conv.json", &conv.to_string());
    assert_template_matches(&p, "m", &hf);
    assert!(
        hf["text"]
            .as_str()
            .unwrap()
            .contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        "{}",
        hf["text"]
    );
    let mut head = conv.clone();
    head["messages"].as_array_mut().unwrap().pop();
    p.write("head.json", &head.to_string());
    let prompt = p.anneal(&[
        "model",
        "template",
        "m",
        "--messages",
        "head.json",
        "--add-generation-prompt",
    ]);
    assert_eq!(
        prompt.stdout,
        hf["generation_prompt_text"].as_str().unwrap()
    );

    // It generates: batched prompts, exact token budget when eos is ignored.
    let g = p.anneal(&[
        "model",
        "generate",
        "m",
        "-p",
        "Natalia sold clips",
        "-p",
        "How many",
        "--max-new-tokens",
        "5",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(g.code, 0, "{g:?}");
    let g = g.json();
    for c in g["completions"].as_array().unwrap() {
        assert_eq!(c["ids"].as_array().unwrap().len(), 5, "{c}");
        assert_eq!(c["finish"], "length");
    }
    assert_eq!(g["new_tokens"], 10);

    // Sampling with a seed is reproducible.
    let sample = || {
        let r = p.anneal(&[
            "model",
            "generate",
            "m",
            "-p",
            "Weng earns",
            "--chat",
            "--temperature",
            "0.9",
            "--top-p",
            "0.9",
            "--top-k",
            "50",
            "--seed",
            "7",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--json",
        ]);
        assert_eq!(r.code, 0, "{r:?}");
        r.json()["completions"][0]["ids"].clone()
    };
    assert_eq!(sample(), sample());

    // The Qwen2 preset: q/k/v biases, read back by transformers as qwen2.
    let r = p.anneal(&[
        "model",
        "init",
        "--corpus",
        corpus,
        "--out",
        "q",
        "--arch",
        "qwen2",
        "--vocab-size",
        "2000",
        "--dtype",
        "bfloat16",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
    let hf = python_view(&p.path("q"), &conv);
    assert_eq!(hf["model_type"], "qwen2");
    // Stored in bf16, as config.json says.
    let st = std::fs::read(p.path("q/model.safetensors")).unwrap();
    let len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + len]).unwrap();
    let dtypes: std::collections::BTreeSet<&str> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap())
        .collect();
    assert_eq!(dtypes, ["BF16"].into(), "{header}");
    let config: Value = serde_json::from_str(&p.read("q/config.json")).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let tensors = hf["tensors"].as_object().unwrap();
    assert_eq!(tensors["model.layers.0.self_attn.k_proj.bias"], json!([32]));
    assert!(!tensors.contains_key("model.layers.0.self_attn.o_proj.bias"));
    // transformers builds its own Qwen2Tokenizer for model_type qwen2 (digits
    // one at a time); anneal's trained tokenizer must give the same ids.
    assert_template_matches(&p, "q", &hf);
}

/// `anneal model template DIR --messages conv.json` renders and tokenizes as
/// transformers did (`hf`: [`python_view`]'s report).
fn assert_template_matches(p: &Project, dir: &str, hf: &Value) {
    let ours = p.anneal(&[
        "model",
        "template",
        dir,
        "--messages",
        "conv.json",
        "--json",
    ]);
    assert_eq!(ours.code, 0, "{ours:?}");
    let ours = ours.json();
    assert_eq!(ours["text"], hf["text"]);
    assert_eq!(ours["input_ids"], hf["input_ids"]);
}

#[test]
fn model_errors_are_clear() {
    let p = Project::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-llama");
    let r = p.anneal(&[
        "model",
        "generate",
        fixture.to_str().unwrap(),
        "-p",
        "hi",
        "--device",
        "cuda",
    ]);
    if cfg!(feature = "cuda") {
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("cuda"), "{r:?}");
    } else if !cfg!(feature = "gpu-on-wgpu") {
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains("built without CUDA support"), "{r:?}");
    }
    let r = p.anneal(&["model", "generate", "nowhere", "-p", "hi"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("nowhere/tokenizer.json"), "{r:?}");
    p.write("bad/config.json", r#"{"model_type": "gpt2"}"#);
    p.write(
        "bad/tokenizer.json",
        &std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap(),
    );
    let r = p.anneal(&["model", "generate", "bad", "-p", "hi"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr
            .contains("bad/config.json: key 'model_type' is 'gpt2'"),
        "{r:?}"
    );
    for (flag, value, message) in [
        (
            "--size",
            "huge",
            "--size: size 'huge' is not one of: tiny, small, base",
        ),
        (
            "--dtype",
            "fp8",
            "--dtype: dtype 'fp8' is not one of: float32, bfloat16",
        ),
    ] {
        let r = p.anneal(&[
            "model", "init", "--corpus", "none.txt", "--out", "x", flag, value,
        ]);
        assert_eq!(r.code, 2, "{r:?}");
        assert!(r.stderr.contains(message), "{r:?}");
    }
}
