//! Labels from the chat template against transformers' reference: SmolLM2's
//! `sft_loss` case in `../shared/models/smollm2-reference.json` (labels -100 up
//! to and including the generation prompt, the assistant turn and its end of
//! turn trained), and the Qwen2.5 tool-calling conversation of tiny-qwen2.

mod common;

use std::path::Path;

use anneal_stages::model::tokenizer::Tokenizer;
use anneal_stages::train::data::{self, DataSpec, TokenClass, TrainOn};
use serde_json::{Value, json};

fn shared() -> &'static Path {
    Box::leak(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared")
            .into_boxed_path(),
    )
}

fn spec(v: Value) -> DataSpec {
    serde_json::from_value(v).unwrap()
}

#[test]
fn labels_match_the_smollm2_reference() {
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("models/smollm2-reference.json")).unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&shared().join("models/smollm2-tokenizer")).unwrap();
    let sft = &r["sft_loss"];
    let row = json!({"messages": sft["messages"]});
    let conv = data::conversation(&row, &spec(json!({}))).unwrap();
    let s = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap();
    let want_ids: Vec<u32> = serde_json::from_value(sft["input_ids"].clone()).unwrap();
    let want_labels: Vec<i64> = serde_json::from_value(sft["labels"].clone()).unwrap();
    assert_eq!(s.ids, want_ids);
    assert_eq!(s.labels, want_labels);
    // train_on_prompt trains everything; cutoff keeps the chosen end.
    let all = data::tokenize(&tok, &conv, &spec(json!({"train_on_prompt": true}))).unwrap();
    assert!(
        all.labels
            .iter()
            .zip(&all.ids)
            .all(|(l, i)| *l == *i as i64)
    );
    let left = data::tokenize(
        &tok,
        &conv,
        &spec(json!({"cutoff_len": 10, "truncation_side": "left"})),
    )
    .unwrap();
    assert_eq!(
        (left.ids.as_slice(), left.truncated),
        (&want_ids[want_ids.len() - 10..], true)
    );
    let right = data::tokenize(&tok, &conv, &spec(json!({"cutoff_len": 10}))).unwrap();
    assert_eq!(right.ids, want_ids[..10]);
}

/// tiny-qwen2's tokenizer and `reference.json`.
fn tiny_qwen2() -> (Tokenizer, Value) {
    let dir = shared().join("fixtures/tiny-qwen2");
    let r = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
        .unwrap();
    (Tokenizer::from_dir(&dir).unwrap(), r)
}

/// The ids that `s` trains on, in order.
fn trained_ids(s: &data::Sample) -> Vec<u32> {
    s.labels
        .iter()
        .filter(|&&l| l >= 0)
        .map(|&l| l as u32)
        .collect()
}

#[test]
fn tool_call_tokens_are_classed_and_filtered() {
    let (tok, r) = tiny_qwen2();
    let case = &r["chat"][2];
    let row = json!({"messages": case["messages"], "tools": case["tools"]});
    let conv = data::conversation(&row, &spec(json!({}))).unwrap();
    let s = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap();
    let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
    assert_eq!(s.ids, want_ids);
    let text_of = |keep: &dyn Fn(usize) -> bool| {
        let ids: Vec<u32> = (0..s.ids.len())
            .filter(|&k| keep(k))
            .map(|k| s.ids[k])
            .collect();
        tok.decode(&ids, false).unwrap()
    };
    let tool = text_of(&|k| s.classes[k] == TokenClass::ToolCall);
    assert_eq!(
        tool,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
    );
    let reasoning = text_of(&|k| s.classes[k] == TokenClass::Reasoning);
    assert_eq!(reasoning, "<|im_end|>\nIt is 18 C in Paris.<|im_end|>\n");
    let only_calls = data::tokenize(&tok, &conv, &spec(json!({"train_on": "tool_calls"}))).unwrap();
    assert_eq!(trained_text(&tok, &only_calls), tool);
    let _ = TrainOn::Reasoning;
}

#[test]
fn mask_history_trains_the_last_assistant_turn_only() {
    let (tok, r) = tiny_qwen2();
    // Two user/assistant exchanges; then a tool call, its result and the answer.
    for case in [&r["chat"][1], &r["chat"][2]] {
        let row = json!({"messages": case["messages"], "tools": case["tools"]});
        let conv = data::conversation(&row, &spec(json!({}))).unwrap();
        let all = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap();
        let last = data::tokenize(&tok, &conv, &spec(json!({"mask_history": true}))).unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(last.ids, want_ids);
        let messages = case["messages"].as_array().unwrap();
        let answer = messages.last().unwrap()["content"].as_str().unwrap();
        assert_eq!(trained_text(&tok, &last), format!("{answer}<|im_end|>\n"));
        // Without it, the earlier assistant turn is trained as well.
        assert!(trained_ids(&all).len() > trained_ids(&last).len());
        assert!(trained_ids(&all).ends_with(&trained_ids(&last)));
        // The earlier turns are context (class `Ignored`); the last keeps its classes.
        let n = trained_ids(&last).len();
        let k = all.ids.len() - n;
        assert_eq!(all.classes[k..], last.classes[k..]);
        assert!(last.classes[..k].iter().all(|&c| c == TokenClass::Ignored));

        // A cut on the right keeps the trained turn: the earliest tokens go.
        let cut = |cutoff: usize| {
            let s = spec(json!({"mask_history": true, "cutoff_len": cutoff}));
            data::tokenize(&tok, &conv, &s).unwrap()
        };
        let short = cut(n + 5);
        assert!(short.truncated);
        assert_eq!(short.ids, want_ids[want_ids.len() - n - 5..]);
        assert_eq!(trained_ids(&short), trained_ids(&last));
        // A turn longer than cutoff_len keeps its beginning.
        let shorter = cut(n - 3);
        assert_eq!(shorter.ids, want_ids[k..k + n - 3]);
        assert!(shorter.labels.iter().all(|&l| l != -100));
        // Without mask_history the right cut keeps the start, as before.
        let plain = data::tokenize(&tok, &conv, &spec(json!({"cutoff_len": n + 5}))).unwrap();
        assert_eq!(plain.ids, want_ids[..n + 5]);
    }
}

/// A template in the manner of Qwen3's: an assistant turn after the last user
/// query carries a `<think>` block when it is the last message or has
/// reasoning; earlier turns lose theirs. The last assistant message therefore
/// renders differently from how the whole conversation renders it.
const THINKING_TEMPLATE: &str = r#"
{%- set ns = namespace(last_query=messages|length - 1, searching=true) %}
{%- for m in messages|reverse %}
  {%- if ns.searching and m.role == "user" %}
    {%- set ns.searching = false %}
    {%- set ns.last_query = messages|length - loop.index %}
  {%- endif %}
{%- endfor %}
{%- for m in messages %}
  {%- if m.role == "user" or m.role == "system" %}
    {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
  {%- elif m.role == "assistant" %}
    {%- set content = m.content %}
    {%- set reasoning = '' %}
    {%- if '</think>' in content %}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
      {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {{- '<|im_start|>assistant\n' }}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
      {{- '<think>\n' + reasoning + '\n</think>\n\n' }}
    {%- endif %}
    {{- content }}
    {%- for call in m.tool_calls or [] %}
      {{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson) + '}\n</tool_call>' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
  {%- elif m.role == "tool" %}
    {{- '<|im_start|>user\n<tool_response>\n' + m.content + '\n</tool_response><|im_end|>\n' }}
  {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
  {{- '<|im_start|>assistant\n' }}
  {%- if enable_thinking is defined and enable_thinking is false %}
    {{- '<think>\n\n</think>\n\n' }}
  {%- endif %}
{%- endif %}
"#;

/// tiny-qwen2's tokenizer with another chat template.
fn with_template(template: &str) -> Tokenizer {
    let (base, _) = tiny_qwen2();
    let mut config = base.config().clone();
    config["chat_template"] = json!(template);
    Tokenizer::new(base.inner().clone(), config).unwrap()
}

fn trained_text(tok: &Tokenizer, s: &data::Sample) -> String {
    tok.decode(&trained_ids(s), false).unwrap()
}

#[test]
fn turns_that_render_differently_when_last_are_found_in_the_whole_conversation() {
    let tok = with_template(THINKING_TEMPLATE);
    let two_queries = json!({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}
    ]});
    let tools = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"},
        {"role": "assistant", "content": "It is 18 C."}
    ]});
    for (row, want, calls) in [
        (
            &two_queries,
            // The first answer as the whole conversation shows it: no reasoning.
            "4<|im_end|>\n<think>\nadd again\n</think>\n\n6<|im_end|>\n",
            "",
        ),
        (
            &tools,
            "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
             <think>\n\n</think>\n\nIt is 18 C.<|im_end|>\n",
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ),
    ] {
        let conv = data::conversation(row, &spec(json!({}))).unwrap();
        let s = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap();
        let full = tok
            .apply_chat_template(&Value::Array(conv.messages.clone()), None, false)
            .unwrap();
        assert_eq!(s.ids, tok.encode(&full, false).unwrap());
        assert!(
            !full.contains("add them"),
            "the template drops earlier reasoning: {full}"
        );
        assert_eq!(trained_text(&tok, &s), want);
        let call_ids: Vec<u32> = (0..s.ids.len())
            .filter(|&k| s.classes[k] == TokenClass::ToolCall)
            .map(|k| s.ids[k])
            .collect();
        assert_eq!(tok.decode(&call_ids, false).unwrap(), calls);
        let last = data::tokenize(&tok, &conv, &spec(json!({"mask_history": true}))).unwrap();
        assert!(want.ends_with(&trained_text(&tok, &last)));
        assert!(trained_text(&tok, &last).starts_with("<think>"));
    }

    // Without thinking (`chat_template_kwargs`), the empty think block of
    // the last turn belongs to the prompt, as the model sees it when served.
    let no_think = spec(json!({"chat_template_kwargs": {"enable_thinking": false}}));
    let conv = data::conversation(&tools, &no_think).unwrap();
    let s = data::tokenize(&tok, &conv, &no_think).unwrap();
    assert_eq!(
        trained_text(&tok, &s),
        "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n\
         It is 18 C.<|im_end|>\n"
    );
    let bad = spec(json!({"chat_template_kwargs": {"add_generation_prompt": true}}));
    let e = data::tokenize(&tok, &conv, &bad).unwrap_err();
    assert!(
        e.contains("`add_generation_prompt` is set by anneal"),
        "{e}"
    );

    // A template whose every rendering depends on the whole conversation
    // (here: the message count up front): each turn is still found after
    // its role header, from the previous message on, and ends before the
    // next message's header.
    let counting = with_template(&format!("{{{{ messages|length }}}}{THINKING_TEMPLATE}"));
    let conv = data::conversation(&two_queries, &spec(json!({}))).unwrap();
    let s = data::tokenize(&counting, &conv, &spec(json!({}))).unwrap();
    assert_eq!(
        trained_text(&counting, &s),
        "4<|im_end|>\n<think>\nadd again\n</think>\n\n6<|im_end|>\n"
    );

    // One that renders the messages out of order cannot be labelled turn by
    // turn.
    let reversed = with_template(
        "{% for m in messages|reverse %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
         {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    let e = data::tokenize(&reversed, &conv, &spec(json!({}))).unwrap_err();
    assert!(e.contains("does not render message"), "{e}");
    assert!(e.contains("train_on_prompt: true"), "{e}");
}

/// A chat template in the form of Gemma 3's instruction-tuned checkpoints'
/// (written out here from that form, not copied from a checkpoint): roles
/// `user` and `model`, the system message folded into the first user turn,
/// contents trimmed, a BOS token first, `raise_exception` on roles that do
/// not alternate.
const GEMMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// Gemma 3's template renders as transformers renders it (jinja2), and the
/// `model` turns are trained: their trimmed content and `<end_of_turn>`.
#[test]
fn gemma3_template_renders_as_transformers_does_and_trains_the_model_turns() {
    let (base, _) = tiny_qwen2();
    let mut config = base.config().clone();
    config["chat_template"] = json!(GEMMA3_TEMPLATE);
    config["bos_token"] = json!("<bos>");
    let tok = Tokenizer::new(base.inner().clone(), config).unwrap();
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " 2+2? "},
        {"role": "assistant", "content": "4\n"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": " 6"}
    ]);
    let conv = data::conversation(&json!({ "messages": messages }), &spec(json!({}))).unwrap();
    let ours = tok
        .apply_chat_template(&Value::Array(conv.messages.clone()), None, false)
        .unwrap();
    let theirs = common::python_json(
        "import json, sys\n\
         from transformers.utils.chat_template_utils import render_jinja_template\n\
         out, _ = render_jinja_template(conversations=[json.loads(sys.argv[2])], \
         chat_template=sys.argv[1], bos_token='<bos>')\n\
         print(json.dumps(out[0]))",
        &[GEMMA3_TEMPLATE.as_ref(), messages.to_string().as_ref()],
        "transformers",
    );
    assert_eq!(ours, theirs.as_str().unwrap());
    let s = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap();
    assert_eq!(trained_text(&tok, &s), "4<end_of_turn>\n6<end_of_turn>\n");
    let last = data::tokenize(&tok, &conv, &spec(json!({"mask_history": true}))).unwrap();
    assert_eq!(trained_text(&tok, &last), "6<end_of_turn>\n");
    // Roles that do not alternate fail with the template's own message.
    let bad = json!({"messages": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}
    ]});
    let conv = data::conversation(&bad, &spec(json!({}))).unwrap();
    let e = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap_err();
    assert!(e.contains("Conversation roles must alternate"), "{e}");
}

/// A template in gpt-oss's harmony style (written for this test): the last
/// assistant turn ends with `<|return|>` and keeps its reasoning (its
/// `analysis` message), earlier turns end with `<|end|>` and lose it, a tool
/// call ends with `<|call|>` and loses its reasoning once a final answer
/// follows, and every message starts with `<|start|>`.
const HARMONY_STYLE: &str = r#"{{- "<|start|>system<|message|>Reasoning: medium<|end|>" -}}
{%- for m in messages -%}
{%- if m.role == "user" -%}<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == "tool" -%}<|start|>functions to=assistant<|channel|>commentary<|message|>{{ m.content|tojson }}<|end|>
{%- elif m.role == "assistant" and m.tool_calls -%}
{%- set later = namespace(final=false) -%}
{%- for f in messages[loop.index:] -%}{%- if f.role == "assistant" and not f.tool_calls -%}{%- set later.final = true -%}{%- endif -%}{%- endfor -%}
{%- if m.thinking and not later.final -%}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{%- endif -%}
<|start|>assistant to=functions.{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>{{ m.tool_calls[0].function.arguments|tojson }}<|call|>
{%- elif m.role == "assistant" and loop.last and not add_generation_prompt -%}
{%- if m.thinking -%}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|return|>
{%- elif m.role == "assistant" -%}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"#;

/// Each assistant turn of a multi-turn tool-calling conversation under a
/// harmony-style template is trained as the whole conversation renders it,
/// from after its `<|start|>assistant` to its own end (`<|end|>`,
/// `<|call|>`, or the last turn's reasoning, answer and `<|return|>`), and
/// nothing of the other messages is.
#[test]
fn harmony_style_turns_are_found_in_the_whole_conversation() {
    let mut inner =
        tokenizers::Tokenizer::from_file(shared().join("fixtures/tiny-qwen2/tokenizer.json"))
            .unwrap();
    let specials = [
        "<|start|>",
        "<|end|>",
        "<|message|>",
        "<|channel|>",
        "<|return|>",
        "<|call|>",
    ];
    inner.add_special_tokens(
        &specials.map(|t| tokenizers::AddedToken::from(t, true).normalized(false)),
    );
    let config = json!({"chat_template": HARMONY_STYLE, "eos_token": "<|return|>"});
    let tok = Tokenizer::new(inner, config).unwrap();
    let call = json!([{"type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]);
    let row = json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "thinking": "greet"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "thinking": "use the tool", "tool_calls": call},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "thinking": "report"},
    ]});
    let conv = data::conversation(&row, &spec(json!({}))).unwrap();
    let s = data::tokenize(&tok, &conv, &spec(json!({}))).unwrap();
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (&id, &l) in s.ids.iter().zip(&s.labels) {
        match (l >= 0, prev) {
            (true, false) => runs.push(vec![id]),
            (true, true) => runs.last_mut().unwrap().push(id),
            _ => {}
        }
        prev = l >= 0;
    }
    let trained: Vec<String> = runs.iter().map(|r| tok.decode(r, false).unwrap()).collect();
    assert_eq!(
        trained,
        [
            "<|channel|>final<|message|>Hello!<|end|>",
            " to=functions.get_weather<|channel|>commentary json<|message|>{\"city\": \"Paris\"}<|call|>",
            "<|channel|>analysis<|message|>report<|end|><|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>",
        ]
    );
}
