#!/usr/bin/env python3
"""Writes a randomly initialised Qwen2ForCausalLM checkpoint for bench/train_gpu.sh
(or, with --shape gemma3-270m, gemma2-270m, qwen3-moe-small or gpt-oss-small,
a Gemma3ForCausalLM, Gemma2ForCausalLM, Qwen3MoeForCausalLM or
GptOssForCausalLM one for bench/train.sh).

  python3 bench/make_random_qwen2.py OUT_DIR --shape qwen2.5-0.5b|tiny|gemma3-270m|gemma2-270m|qwen3-moe-small|gpt-oss-small
      [--vocab N] --tokenizer-dir DIR [--dtype bf16|f32] [--seed 0]

Shapes (vocab 151936 unless --vocab; tie_word_embeddings true, rope_theta 1e6,
rms_norm_eps 1e-6, max_position_embeddings 32768, q/k/v biases as Qwen2):
  qwen2.5-0.5b  hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864
  tiny          hidden 128,  2 layers,  4 heads, 2 kv heads, intermediate 256
  gemma3-270m   Gemma 3 270M's layers: hidden 640, 18 layers, 4 heads of 256
                over 1 kv head, intermediate 2048, every sixth layer global and
                the others sliding over 512 keys (RoPE bases 1e6 and 1e4),
                query_pre_attn_scalar 256 (Gemma3TextConfig's defaults
                otherwise); its real vocabulary is 262144
  gemma2-270m   the same sizes with Gemma 2's layers: no q/k norms, every other
                layer sliding over 512 keys (one RoPE base, 1e4), attention
                scores soft-capped at 50 and logits at 30 (Gemma2Config's
                defaults otherwise)
  qwen3-moe-small  Qwen3-30B-A3B's layout at a CPU's size: hidden 512, 8
                layers, 8 heads of 64 over 2 kv heads (q/k norms), every MLP a
                mixture of 32 experts 256 wide, top 4 renormalised (as
                Qwen3-30B-A3B's 128 experts, top 8): 131M parameters, of
                which 25M the (tied) embedding; 18M of the others active per
                token
  gpt-oss-small gpt-oss-20b's layout at a CPU's size: hidden 512, 8 layers, 8
                heads of 64 over 2 kv heads with biases and a learned sink
                each, every other layer sliding over 128 keys, YaRN (factor
                32 over 4096 positions), every MLP a mixture of 32 experts
                256 wide with biases and the clamped SwiGLU, top 4 (as
                gpt-oss-20b's 32 experts, top 4)

Weights: transformers' own initialisation (normal, std 0.02) under a fixed seed,
written with save_pretrained(safe_serialization=True) in bf16 by default (half
the bytes; anneal and transformers both load bf16 checkpoints into f32 master
weights, so the training runs do not depend on it). The tokenizer files of
--tokenizer-dir (SmolLM2's: ids < 49152 <= vocab) are copied beside the
weights, so anneal and PyTorch tokenise identically; bos/eos/pad ids are
SmolLM2's (1, 2, 2).

Prints one JSON line: {"params", "embedding_params", "nonembedding_params",
"hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "shape",
"dtype"}, also written to --info FILE when given (outside the model directory,
so anneal sees only a plain HF checkpoint).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    Qwen2Config,
    Qwen3MoeConfig,
)

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256),
    "gemma3-270m": dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, intermediate_size=2048),
    "gemma2-270m": dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, intermediate_size=2048),
    "qwen3-moe-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2, head_dim=64, intermediate_size=1536),
    "gpt-oss-small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=64, intermediate_size=256),
}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--info", help="also write the JSON line to this file")
    a = ap.parse_args()

    tok_dir = Path(a.tokenizer_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        sys.exit(f"make_random_qwen2.py: {tok_dir}/tokenizer.json missing")
    if a.vocab < 49152:
        sys.exit("make_random_qwen2.py: --vocab must be >= 49152 (SmolLM2's tokenizer)")
    common = dict(
        vocab_size=a.vocab,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **SHAPES[a.shape],
    )
    if a.shape == "gemma3-270m":
        cfg = Gemma3TextConfig(sliding_window=512, query_pre_attn_scalar=256, **common)
    elif a.shape == "gemma2-270m":
        cfg = Gemma2Config(sliding_window=512, query_pre_attn_scalar=256,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                           **common)
    elif a.shape == "qwen3-moe-small":
        cfg = Qwen3MoeConfig(num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                             **common)
    elif a.shape == "gpt-oss-small":
        cfg = GptOssConfig(num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
                           **common)
    else:
        cfg = Qwen2Config(
            rope_theta=1e6,  # transformers 5 stores it as rope_parameters.rope_theta
            use_sliding_window=False,
            hidden_act="silu",
            **common,
        )
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.pad_token_id = 2
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model.to(dtype)

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)

    # Unique parameters (the tied LM head is the embedding, counted once).
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    info = {
        "params": total,
        "embedding_params": emb,
        "nonembedding_params": total - emb,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "intermediate": cfg.intermediate_size,
        "vocab": cfg.vocab_size,
        "shape": a.shape,
        "dtype": a.dtype,
    }
    if a.info:
        Path(a.info).write_text(json.dumps(info) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
