//! Hugging Face fast tokenizers (`tokenizer.json`) with their `tokenizer_config.json`
//! and chat template, read from and written to checkpoint directories, plus
//! training of a small byte-level BPE tokenizer with a ChatML template.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value as Json, json};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

/// Qwen2's pre-tokenizer split pattern (as in its `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

use super::chat::{ChatTemplate, SpecialTokens};

/// A tokenizer as transformers loads it from a checkpoint directory: the fast
/// tokenizer (`tokenizer.json`), the settings of `tokenizer_config.json`
/// (special tokens, `model_max_length`, ...) and the chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: Json,
    special: SpecialTokens,
    chat: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional; special tokens
    /// missing there are taken from `special_tokens_map.json`) and the chat
    /// template (see [`ChatTemplate::from_dir`]) from a checkpoint directory.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("tokenizer.json");
        // A LoRA adapter saved without tokenizer files uses its base model's.
        if !path.is_file()
            && dir.join("adapter_config.json").is_file()
            && let Ok(Some(base)) = super::lora::adapter_base(dir)
            && base != dir
            && base.join("tokenizer.json").is_file()
        {
            return Self::from_dir(&base);
        }
        if !path.is_file() {
            bail!(
                "{} not found: a Hugging Face fast tokenizer is needed; save one with \
                 transformers' `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`",
                path.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot load the tokenizer: {e}; the file must be a tokenizer.json \
                 written by Hugging Face tokenizers",
                path.display()
            )
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = match read_json(&config_path)? {
            Some(c) if c.is_object() => c,
            Some(_) => bail!(
                "{}: expected a JSON object; fix or regenerate the file",
                config_path.display()
            ),
            None => json!({}),
        };
        let mut special = SpecialTokens::from_tokenizer_config(&config);
        if let Some(map) = read_json(&dir.join("special_tokens_map.json"))? {
            special = special.or(SpecialTokens::from_tokenizer_config(&map));
        }
        let chat = ChatTemplate::from_dir(dir)?;
        Ok(Tokenizer {
            inner,
            config,
            special,
            chat,
        })
    }

    /// Wraps a tokenizer (e.g. from [`train_bpe`]) with the contents of a
    /// `tokenizer_config.json` (e.g. from [`chatml_tokenizer_config`]), whose
    /// special tokens and `chat_template` are used.
    pub fn new(inner: tokenizers::Tokenizer, config: Json) -> anyhow::Result<Self> {
        if !config.is_object() {
            bail!("a tokenizer config must be a JSON object");
        }
        let special = SpecialTokens::from_tokenizer_config(&config);
        let chat = ChatTemplate::from_tokenizer_config(&config, "tokenizer_config.json")?;
        Ok(Tokenizer {
            inner,
            config,
            special,
            chat,
        })
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The `tokenizer_config.json` contents (an empty object when there was none).
    pub fn config(&self) -> &Json {
        &self.config
    }

    /// The special tokens of the configuration.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Token ids of `text`. `add_special_tokens` runs the tokenizer's
    /// post-processor (e.g. a BOS token for Llama-style tokenizers; nothing for
    /// byte-level ChatML ones), like transformers' `encode(text, add_special_tokens=...)`.
    /// Special tokens written in the text (`<|im_start|>`) are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizing {} bytes of text: {e}", text.len()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of token ids, optionally without special tokens. No
    /// `clean_up_tokenization_spaces` is applied.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> anyhow::Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("decoding {} token ids: {e}", ids.len()))
    }

    /// The id of a token (vocabulary entry or added token), given its text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of the token with id `id`.
    pub fn id_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the configuration's `bos_token`, if set and known.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special
            .bos_token
            .as_deref()
            .and_then(|t| self.token_id(t))
    }

    /// The id of the configuration's `eos_token`, if set and known (e.g.
    /// `<|im_end|>` for ChatML models): generation stops there.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special
            .eos_token
            .as_deref()
            .and_then(|t| self.token_id(t))
    }

    /// The id of the configuration's `pad_token`, if set and known.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special
            .pad_token
            .as_deref()
            .and_then(|t| self.token_id(t))
    }

    /// The number of tokens including added tokens (transformers' `len(tokenizer)`).
    /// A model's embedding matrix may have more rows than this.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template, if the checkpoint has one.
    pub fn chat(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders a conversation with the chat template (see [`ChatTemplate::render`]);
    /// an error when the tokenizer has no template.
    pub fn apply_chat_template(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> anyhow::Result<String> {
        self.apply_chat_template_with(messages, tools, add_generation_prompt, &Default::default())
    }

    /// [`Self::apply_chat_template`] with more template variables
    /// (`chat_template_kwargs`, see [`ChatTemplate::render_with`]).
    pub fn apply_chat_template_with(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, Json>,
    ) -> anyhow::Result<String> {
        let Some(chat) = &self.chat else {
            bail!(
                "this tokenizer has no chat template: add a chat_template.jinja (or a \
                 `chat_template` in tokenizer_config.json) to the model directory, e.g. \
                 the ChatML one"
            );
        };
        chat.render_with(messages, tools, add_generation_prompt, kwargs)
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and, when there is a
    /// single chat template, `chat_template.jinja` into `dir` (created if
    /// needed), so that transformers (4.4x and 5.x) loads the directory with
    /// `AutoTokenizer.from_pretrained`. The template is also kept in
    /// `tokenizer_config.json` for transformers versions that do not read
    /// `chat_template.jinja`; a transformers 5 `TokenizersBackend` class is
    /// written as its transformers 4 name `PreTrainedTokenizerFast`.
    pub fn save_to_dir(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("tokenizer.json");
        let text = self
            .inner
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;

        let mut config = self.config.clone();
        let obj = config
            .as_object_mut()
            .context("the tokenizer config is not a JSON object")?;
        match obj.get("tokenizer_class").and_then(Json::as_str) {
            None | Some("TokenizersBackend") => {
                obj.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
            }
            Some(_) => {}
        }
        let single = self
            .chat
            .as_ref()
            .filter(|_| !matches!(obj.get("chat_template"), Some(Json::Array(_))));
        if let Some(chat) = single {
            obj.insert("chat_template".into(), chat.source().into());
        }
        let path = dir.join("tokenizer_config.json");
        let mut text = serde_json::to_string_pretty(&config)?;
        text.push('\n');
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;

        if let Some(chat) = single {
            let path = dir.join("chat_template.jinja");
            std::fs::write(&path, chat.source())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

fn read_json(path: &Path) -> anyhow::Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{} is not valid JSON; fix or regenerate it", path.display()))
}

/// Trains a byte-level BPE tokenizer (GPT-2 / Qwen style) on `corpus`.
///
/// The pre-tokenizer is `ByteLevel` (GPT-2 split regex, no prefix space), the
/// decoder `ByteLevel` and the post-processor `ByteLevel` with
/// `trim_offsets=false` (it adds no tokens). The vocabulary starts with
/// `special_tokens` (ids `0..n`, in the given order, registered as special
/// added tokens), then the 256 byte-level characters, then merges up to
/// `vocab_size` tokens in all. Training is deterministic: the same corpus gives
/// the same `tokenizer.json`.
///
/// With `qwen2`, the normalizer and pre-tokenizer are Qwen2's instead (NFC,
/// then its split regex, which takes digits one at a time, then `ByteLevel`
/// without its own regex): transformers builds a `Qwen2Tokenizer` with those
/// for any `model_type: qwen2` checkpoint, so a tokenizer trained otherwise
/// would give other ids there (and in vLLM) than it gave in training.
pub fn train_bpe(
    corpus: &[String],
    vocab_size: usize,
    special_tokens: &[&str],
    qwen2: bool,
) -> anyhow::Result<tokenizers::Tokenizer> {
    let alphabet = ByteLevel::alphabet();
    let minimum = alphabet.len() + special_tokens.len();
    if vocab_size < minimum {
        bail!(
            "vocab_size {vocab_size} is too small for a byte-level BPE tokenizer: it needs \
             at least {minimum} (256 byte tokens + {} special tokens)",
            special_tokens.len()
        );
    }
    let specials = special_tokens
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet.into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::from(trainer);
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    let pre = if qwen2 {
        let split = Split::new(
            SplitPattern::Regex(QWEN2_SPLIT.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow::anyhow!("Qwen2 split pattern: {e}"))?;
        tokenizer.with_normalizer(Some(NormalizerWrapper::from(NFC)));
        PreTokenizerWrapper::from(Sequence::new(vec![
            PreTokenizerWrapper::from(split),
            PreTokenizerWrapper::from(ByteLevel::new(false, false, false)),
        ]))
    } else {
        PreTokenizerWrapper::from(ByteLevel::new(false, true, true))
    };
    tokenizer
        .with_pre_tokenizer(Some(pre))
        .with_decoder(Some(DecoderWrapper::from(ByteLevel::default())))
        .with_post_processor(Some(PostProcessorWrapper::from(
            ByteLevel::default().trim_offsets(false),
        )));
    tokenizer
        .train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow::anyhow!("training the BPE tokenizer: {e}"))?;
    Ok(tokenizer)
}

/// The special tokens of a ChatML tokenizer, in id order: pass them to
/// [`train_bpe`] so that they get ids 0, 1, 2.
pub const CHATML_SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A ChatML chat template: `<|im_start|>{role}\n{content}<|im_end|>\n` for each
/// message, `<|im_start|>assistant\n` as generation prompt. With `tools`, a
/// system turn (the conversation's own system message, if any, first) lists
/// them as JSON inside `<tools></tools>` as Qwen2.5 does; an assistant's
/// `tool_calls` become `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
/// (string arguments are written as they are, objects as JSON), and `tool`
/// messages become `<tool_response>` blocks, consecutive ones in one user turn.
/// There is no default system prompt.
pub const CHATML_TEMPLATE: &str = r##"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"##;

/// A `tokenizer_config.json` for a ChatML tokenizer (e.g. from [`train_bpe`]
/// with [`CHATML_SPECIAL_TOKENS`]) that transformers 4.4x and 5.x load:
/// `PreTrainedTokenizerFast`, `eos_token` `<|im_end|>`, `pad_token`
/// `<|endoftext|>`, no `bos_token` or `unk_token`, [`CHATML_TEMPLATE`],
/// `model_max_length`, and `added_tokens_decoder` listing the tokenizer's added
/// tokens by id.
pub fn chatml_tokenizer_config(tokenizer: &tokenizers::Tokenizer, model_max_length: usize) -> Json {
    let mut added: Vec<(u32, AddedToken)> =
        tokenizer.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let decoder: serde_json::Map<String, Json> = added
        .into_iter()
        .map(|(id, t)| {
            (
                id.to_string(),
                json!({
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }),
            )
        })
        .collect();
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": CHATML_SPECIAL_TOKENS[2],
        "pad_token": CHATML_SPECIAL_TOKENS[0],
        "unk_token": null,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": decoder,
        "chat_template": CHATML_TEMPLATE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = [
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
            "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
            "Il fait 18 °C à Paris; l'été est très agréable. 日本語のテキストも少し。 emoji 😀👍",
            "How many clips did Natalia sell altogether in April and May? #### 72",
        ];
        (0..20)
            .flat_map(|i| base.iter().map(move |s| format!("{s} {i}")))
            .collect()
    }

    #[test]
    fn qwen2_tokenizers_take_digits_one_at_a_time() {
        let corpus = corpus();
        let q = train_bpe(&corpus, 400, &CHATML_SPECIAL_TOKENS, true).unwrap();
        let g = train_bpe(&corpus, 400, &CHATML_SPECIAL_TOKENS, false).unwrap();
        let words = |t: &tokenizers::Tokenizer, s: &str| -> Vec<String> {
            use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
            let mut pts = PreTokenizedString::from(s);
            t.get_pre_tokenizer()
                .unwrap()
                .pre_tokenize(&mut pts)
                .unwrap();
            pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(w, _, _)| w.to_owned())
                .collect()
        };
        assert_eq!(words(&q, "sold 2024"), ["sold", "Ġ", "2", "0", "2", "4"]);
        assert_eq!(words(&g, "sold 2024"), ["sold", "Ġ2024"]);
        for text in &corpus {
            let ids = q.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(&q.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn train_bpe_round_trips_and_puts_special_tokens_first() {
        let corpus = corpus();
        let tok = train_bpe(&corpus, 400, &CHATML_SPECIAL_TOKENS, false).unwrap();
        for (i, t) in CHATML_SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(i as u32), "{t}");
        }
        assert_eq!(tok.get_vocab_size(true), 400);
        let config = chatml_tokenizer_config(&tok, 2048);
        let tok = Tokenizer::new(tok, config).unwrap();
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.pad_token_id(), Some(0));
        assert_eq!(tok.bos_token_id(), None);

        let text = "<|im_start|>user\nÀ Paris il fait 18 °C — 日本 😀 ok?<|im_end|>\n";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 1, "special tokens in text are single tokens");
        assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            "user\nÀ Paris il fait 18 °C — 日本 😀 ok?\n"
        );
        // merges were learned: common words are single tokens
        assert!(tok.encode(" clips", false).unwrap().len() == 1);
    }

    #[test]
    fn train_bpe_is_deterministic() {
        let corpus = corpus();
        let a = train_bpe(&corpus, 380, &CHATML_SPECIAL_TOKENS, false).unwrap();
        let b = train_bpe(&corpus, 380, &CHATML_SPECIAL_TOKENS, false).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        assert!(train_bpe(&corpus, 100, &CHATML_SPECIAL_TOKENS, false).is_err());
    }

    #[test]
    fn chatml_template_renders_tools_calls_and_responses() {
        let chat = ChatTemplate::new(CHATML_TEMPLATE, SpecialTokens::default()).unwrap();
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather: <temp> & 'humidity' (°C)",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let messages = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}
            ]},
            {"role": "tool", "content": "{\"temp_c\": 18}"},
            {"role": "tool", "content": "{\"temp_c\": 25.5}"},
            {"role": "assistant", "content": "18 °C and 25.5 °C."}
        ]);
        let out = chat.render(&messages, Some(&tools), false).unwrap();
        let expected = concat!(
            "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather: <temp> & 'humidity' (°C)\", ",
            "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>\n\n",
            "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\n{\"temp_c\": 18}\n</tool_response>\n<tool_response>\n{\"temp_c\": 25.5}\n</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n18 °C and 25.5 °C.<|im_end|>\n",
        );
        assert_eq!(out, expected);

        let plain = json!([{"role": "user", "content": "Hi"}]);
        assert_eq!(
            chat.render(&plain, None, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system =
            json!([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]);
        assert_eq!(
            chat.render(&with_system, None, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn save_to_dir_round_trips() {
        let corpus = corpus();
        let tok = train_bpe(&corpus, 320, &CHATML_SPECIAL_TOKENS, false).unwrap();
        let config = chatml_tokenizer_config(&tok, 1024);
        assert_eq!(config["added_tokens_decoder"]["2"]["content"], "<|im_end|>");
        let tok = Tokenizer::new(tok, config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_to_dir(dir.path()).unwrap();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let back = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(back.chat().unwrap().source(), CHATML_TEMPLATE);
        assert_eq!(back.eos_token_id(), Some(2));
        assert_eq!(back.vocab_size(), 320);
        let text = "<|im_start|>user\nhello °C<|im_end|>\n";
        assert_eq!(
            back.encode(text, false).unwrap(),
            tok.encode(text, false).unwrap()
        );
        let err = Tokenizer::from_dir(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
