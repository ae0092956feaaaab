#!/usr/bin/env python3
"""Loads a checkpoint directory written by anneal with Hugging Face's own
libraries (no torch needed) and prints what they see, as JSON:

- transformers.AutoConfig: model_type and sizes
- safetensors: tensor names and shapes
- transformers.AutoTokenizer: the chat template rendered and encoded for a
  conversation given on stdin (JSON: {"messages": [...], "tools": [...] | null})

    python3 check_hf_checkpoint.py DIR < conversation.json
"""
import json
import os
import sys

from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

d = sys.argv[1]
conv = json.load(sys.stdin)
cfg = AutoConfig.from_pretrained(d)
shapes = {}
for name in sorted(os.listdir(d)):
    if name.endswith(".safetensors"):
        with safe_open(os.path.join(d, name), "np") as f:
            for k in f.keys():
                shapes[k] = list(f.get_slice(k).get_shape())
tok = AutoTokenizer.from_pretrained(d)
kwargs = {"tools": conv["tools"]} if conv.get("tools") else {}
text = tok.apply_chat_template(conv["messages"], tokenize=False, **kwargs)
prompt = tok.apply_chat_template(conv["messages"][:-1], tokenize=False, add_generation_prompt=True, **kwargs)
print(json.dumps({
    "model_type": cfg.model_type,
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_hidden_layers,
    "vocab_size": cfg.vocab_size,
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "tensors": shapes,
    "text": text,
    "generation_prompt_text": prompt,
    "input_ids": tok(text, add_special_tokens=False)["input_ids"],
    "eos_token": tok.eos_token,
    "pad_token": tok.pad_token,
}, ensure_ascii=False))
