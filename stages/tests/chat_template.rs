//! Chat templates and tokenizers against transformers' own output: the
//! `reference.json` files of the model fixtures (built with transformers 5) and
//! SmolLM2's real tokenizer and template.

use std::path::{Path, PathBuf};

use anneal_stages::model::chat::ChatTemplate;
use anneal_stages::model::tokenizer::Tokenizer;
use serde_json::Value;

/// `shared/` beside the repository (fixtures and models live there, not in git).
fn shared(rel: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(rel);
    assert!(
        path.exists(),
        "test data {} is missing: these tests need the project's shared/ directory \
         beside the repository checkout (shared/fixtures and shared/models)",
        path.display()
    );
    path
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

/// All messages but the last.
fn prompt_messages(messages: &Value) -> Value {
    let list = messages.as_array().expect("messages is a list");
    Value::Array(list[..list.len() - 1].to_vec())
}

/// Every `chat[]` case of a fixture: text, token ids and generation prompt
/// byte-equal to transformers'; the template in tokenizer_config.json renders
/// the same as chat_template.jinja.
fn check_fixture(name: &str) {
    let dir = shared(&format!("fixtures/{name}"));
    let tok = Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let config_template = ChatTemplate::from_tokenizer_config(
        &read_json(&dir.join("tokenizer_config.json")),
        "tokenizer_config.json",
    )
    .unwrap()
    .expect("tokenizer_config.json has a chat_template");
    let reference = read_json(&dir.join("reference.json"));
    let cases = reference["chat"].as_array().expect("reference.json chat[]");
    assert_eq!(cases.len(), 3, "{name}: expected three chat cases");
    for (i, case) in cases.iter().enumerate() {
        let messages = &case["messages"];
        let tools = case.get("tools").filter(|t| !t.is_null());
        let text = tok
            .apply_chat_template(messages, tools, false)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e:#}"));
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{name} case {i}: rendered text differs from transformers'"
        );
        assert_eq!(
            config_template.render(messages, tools, false).unwrap(),
            text,
            "{name} case {i}: tokenizer_config.json's template renders differently"
        );
        assert_eq!(
            tok.encode(&text, false).unwrap(),
            ids(&case["input_ids"]),
            "{name} case {i}: input_ids differ from transformers'"
        );
        let prompt = tok
            .apply_chat_template(&prompt_messages(messages), tools, true)
            .unwrap_or_else(|e| panic!("{name} case {i}: {e:#}"));
        assert_eq!(
            prompt,
            case["generation_prompt_text"].as_str().unwrap(),
            "{name} case {i}: generation prompt differs from transformers'"
        );
        if i == 2 {
            assert_eq!(
                tok.encode(&prompt, false).unwrap(),
                ids(&reference["generate"]["prompt_ids"]),
                "{name}: generate.prompt_ids (case 3's generation prompt) differ"
            );
        }
    }
    assert_eq!(tok.eos_token_id(), tok.token_id("<|im_end|>"));
    assert_eq!(tok.pad_token_id(), Some(0));
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_fixture("tiny-qwen2");
}

#[test]
fn tiny_llama_matches_transformers() {
    check_fixture("tiny-llama");
}

fn smollm2() -> (Tokenizer, Value) {
    let tok = Tokenizer::from_dir(&shared("models/smollm2-tokenizer")).unwrap();
    let reference = read_json(&shared("models/smollm2-reference.json"));
    (tok, reference)
}

#[test]
fn smollm2_generation_prompts_match_transformers() {
    let (tok, reference) = smollm2();
    let cases = reference["generate"].as_array().expect("generate[]");
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let prompt = tok
            .apply_chat_template(&case["messages"], None, true)
            .unwrap();
        assert_eq!(
            tok.encode(&prompt, false).unwrap(),
            ids(&case["prompt_ids"]),
            "generate[{i}]: prompt ids differ from transformers'"
        );
    }
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.bos_token_id(), Some(1));
}

#[test]
fn smollm2_sft_input_ids_match_transformers() {
    let (tok, reference) = smollm2();
    let sft = &reference["sft_loss"];
    let messages = &sft["messages"];
    let text = tok.apply_chat_template(messages, None, false).unwrap();
    let input_ids = ids(&sft["input_ids"]);
    assert_eq!(tok.encode(&text, false).unwrap(), input_ids);

    // The rule: labels are -100 on the prompt, i.e. everything up to and
    // including the generation prompt of all but the last message.
    let prompt = tok
        .apply_chat_template(&prompt_messages(messages), None, true)
        .unwrap();
    let prompt_ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(&input_ids[..prompt_ids.len()], prompt_ids.as_slice());
    let labels: Vec<i64> = sft["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let masked = labels.iter().take_while(|&&l| l == -100).count();
    assert_eq!(masked, prompt_ids.len(), "{}", sft["rule"]);
    assert!(
        labels[masked..]
            .iter()
            .zip(&input_ids[masked..])
            .all(|(&l, &id)| l == i64::from(id))
    );
}

/// A directory written by `save_to_dir` renders and encodes like the original.
#[test]
fn saved_fixture_tokenizer_reloads_identically() {
    let dir = shared("fixtures/tiny-qwen2");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let out = tempfile::tempdir().unwrap();
    tok.save_to_dir(out.path()).unwrap();
    let back = Tokenizer::from_dir(out.path()).unwrap();
    let reference = read_json(&dir.join("reference.json"));
    for case in reference["chat"].as_array().unwrap() {
        let tools = case.get("tools");
        let text = back
            .apply_chat_template(&case["messages"], tools, false)
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        assert_eq!(back.encode(&text, false).unwrap(), ids(&case["input_ids"]));
    }
    let config = read_json(&out.path().join("tokenizer_config.json"));
    assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(config["eos_token"], "<|im_end|>");
}
