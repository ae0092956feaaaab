//! `anneal model ...`: thin glue over `anneal_stages::model`.

use std::path::{Path, PathBuf};

use anneal_stages::model::infer::{TextRequest, generate_texts};
use anneal_stages::model::init::{InitSpec, corpus_texts, init_checkpoint};
use anneal_stages::model::tokenizer::Tokenizer;
use anneal_stages::model::{DeviceSpec, GenerateOptions};
use anyhow::Context;

use crate::cli::ModelCommand;

/// Runs one `anneal model` subcommand; returns the exit code.
pub fn run(cmd: &ModelCommand) -> anyhow::Result<i32> {
    match cmd {
        ModelCommand::Init {
            corpus,
            out,
            arch,
            size,
            vocab_size,
            seed,
            dtype,
            json,
        } => init(
            corpus,
            out,
            InitSpec {
                arch: arch.clone(),
                size: size.clone(),
                vocab_size: *vocab_size,
                seed: *seed,
                dtype: dtype.clone(),
                ..Default::default()
            },
            *json,
        ),
        ModelCommand::Template {
            model,
            messages,
            add_generation_prompt,
            json,
        } => template(model, messages, *add_generation_prompt, *json),
        ModelCommand::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            ignore_eos,
            device,
            json,
        } => {
            let device: DeviceSpec = device.parse()?;
            let req = TextRequest {
                prompts: prompt.clone(),
                chat: *chat,
                options: GenerateOptions {
                    max_new_tokens: *max_new_tokens,
                    temperature: *temperature,
                    top_p: *top_p,
                    top_k: *top_k,
                    seed: *seed,
                    stop: stop.clone(),
                    ..Default::default()
                },
                ignore_eos: *ignore_eos,
            };
            let report = generate_texts(model, device, &req)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for c in &report.completions {
                    println!("{}", c.text);
                }
                eprintln!(
                    "{} tokens in {:.2}s ({:.1} tokens/s on {}; load {:.2}s)",
                    report.new_tokens,
                    report.generate_seconds,
                    report.tokens_per_second,
                    report.device,
                    report.load_seconds
                );
            }
            Ok(0)
        }
    }
}

fn init(corpus: &[PathBuf], out: &Path, spec: InitSpec, json: bool) -> anyhow::Result<i32> {
    if let Err((key, msg)) = spec.validate() {
        anyhow::bail!("--{}: {msg}", key.replace('_', "-"));
    }
    let files: Vec<&Path> = corpus.iter().map(PathBuf::as_path).collect();
    let texts = corpus_texts(&files, spec.max_corpus_bytes)?;
    let summary = init_checkpoint(out, &spec, &texts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "wrote {}: {} model, {} parameters, {}-token tokenizer trained on {} texts",
            out.display(),
            summary.arch,
            summary.parameters,
            summary.vocab_size,
            summary.corpus_texts
        );
    }
    Ok(0)
}

fn template(
    model: &Path,
    messages: &Path,
    add_generation_prompt: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let text = if messages.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the conversation from stdin")?
    } else {
        std::fs::read_to_string(messages)
            .with_context(|| format!("cannot read {}", messages.display()))?
    };
    let conv: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", messages.display()))?;
    let msgs = conv.get("messages").with_context(|| {
        format!(
            "{}: expected an object with a 'messages' list (and optionally 'tools')",
            messages.display()
        )
    })?;
    let tools = conv.get("tools").filter(|t| !t.is_null());
    let tok = Tokenizer::from_dir(model)?;
    let rendered = tok.apply_chat_template(msgs, tools, add_generation_prompt)?;
    if json {
        let ids = tok.encode(&rendered, false)?;
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"text": rendered, "input_ids": ids}))?
        );
    } else {
        print!("{rendered}");
    }
    Ok(0)
}
