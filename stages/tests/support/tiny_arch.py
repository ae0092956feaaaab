"""Builds a tiny random checkpoint of another architecture, with references
from transformers, in the format of ../shared/fixtures (see its README).

    python3 stages/tests/support/tiny_arch.py ARCH SRC_FIXTURE OUT_DIR

ARCH may also be several, comma-separated (one Python start for them all);
each then goes to OUT_DIR/ARCH.

ARCH is `qwen3` (q/k norms, and a head_dim of 32, wider than hidden / heads),
`mistral` (no sliding window), `mistral-window` (every layer attends over the
last 24 keys) or `qwen2-window` (`use_sliding_window` with a window of 16
from layer `max_window_layers` = 1 on, so layer 0 attends over everything),
or `gemma3` (`gemma3_text`: (1 + w) norms around attention and MLP, GeGLU,
scaled and tied embeddings, head_dim 32 with query_pre_attn_scalar 24, layer 0
sliding over 16 keys with RoPE base 1e4, layer 1 global with linear RoPE
scaling 4), or `smollm3` (layer 1 a NoPE layer: no rotary embedding), or
`olmo2` (norms on the attention's and MLP's outputs only, q/k norms over all
heads together, 4 query heads over 2 kv heads), or `olmo3` (OLMo 2's layers,
layer 0 sliding over 16 keys with plain RoPE, layer 1 global with YaRN,
factor 4 over 128 original positions), or `qwen2-yarn` (YaRN on every layer:
factor 4 over 128 positions, betas 8 and 2, no truncation, an explicit
attention_factor), or `gemma3-mm` (`gemma3` inside a multimodal
Gemma3ForConditionalGeneration with a one-layer SigLIP vision tower, run on
text only; `after_step` names are the language model's, `model.…`), or
`gemma2` (Gemma 2: Gemma's norms, GeGLU and scaled tied embeddings without
q/k norms, head_dim 32 with query_pre_attn_scalar 24, layer 0 sliding over 16
keys, attention scores soft-capped at 4 and logits at 5, tight enough to
bend them; eager attention, as transformers runs Gemma 2), or `phi3` (Phi-3:
q/k/v in one `qkv_proj`, gate and up in one `gate_up_proj`, every layer
sliding over 24 keys), or `phi3-longrope` (Phi-3.5 / Phi-4-mini style: RoPE
on the first half of each head only, LongRoPE over 128 original positions,
so the batch takes the short factors and the prompt the long ones), or a
mixture of experts: `qwen2-moe` (Qwen2-MoE: 4 experts 32 wide, top 2 not
renormalised, and a shared expert 48 wide behind its sigmoid gate),
`qwen3-moe` (Qwen3-MoE: 4 experts 32 wide, top 2
renormalised, layer 1 dense through `mlp_only_layers`), `mixtral` (4
experts, top 2, `block_sparse_moe` names), `mixtral-aux` (the same with
`output_router_logits`: the loss includes the routers' load-balancing loss,
at a coefficient of 0.5 so that it weighs), `olmoe` (OLMoE: 4 experts, top
2 not renormalised, q/k norms over all heads) or `qwen3-moe-many` (Qwen3-MoE
with 64 experts 8 wide, top 2, so that some of layer 0's experts get no
token: `train_step.idle_experts` lists them), or `gpt-oss` (gpt-oss: biased
attention with a sink per head, layer 0 sliding over 16 keys, YaRN factor 4
over 128 positions without truncation; 4 experts 32 wide with biases, top
2, the SwiGLU clamped at 0.5 so that the clamp binds, and the routers'
load-balancing loss at 0.5; sinks drawn from N(0, 1) and biases from N(0,
0.2); after_step also holds layer 0's sinks and the router's bias, and
expert 1's biases under anneal's per-expert names), or `gpt-oss-mxfp4`
(the same with its experts' matrices stored as OpenAI publishes them, MXFP4
blocks and scales drawn at random, `quantization_config` mxfp4; the
references come from the model transformers dequantises from them); the
batch (91 tokens) and the prompt (about 500) are longer than the windows.
The sizes, tokenizer, chat template and batch are SRC_FIXTURE's (tiny-qwen2); weights are drawn with seed 1234 and
std 0.2, norm weights from U(0.5, 1.5). OUT_DIR gets the checkpoint and
`reference.json` (`loss`, `generate`, `train_step`) and
`reference.safetensors` (the batch, `logits`, and `after_step.<name>` for
layer 0's q_proj, the embedding and, for qwen3, layer 0's q/k norms; for a
mixture of experts, layer 0's router and expert 1's three projections under
their checkpoint names, and the first idle expert's) computed
as the fixtures' are: one AdamW step at lr 1e-2, betas (0.9, 0.999), eps 1e-8,
weight decay 0.1 except on names with `bias` or `norm`, clipping at 1.0.
A mixture of experts also gets a PEFT adapter in OUT_DIR/lora-init with the
routed experts adapted through `target_parameters`, and its step the same way
(`lora_train_step`, `lora_logits`, `after_lora_step.<name>`; see lora_step).
"""

import copy
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GptOssConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)


MOE = ("qwen2-moe", "qwen3-moe", "qwen3-moe-many", "mixtral", "mixtral-aux", "olmoe")
# Mixtures whose experts' steps are checked.
FULL_MOE = MOE + ("gpt-oss",)


def main():
    archs, src, out = sys.argv[1:4]
    archs = archs.split(",")
    if len(archs) == 1:
        build(archs[0], src, out)
    else:
        for arch in archs:
            os.makedirs(f"{out}/{arch}", exist_ok=True)
            build(arch, src, f"{out}/{arch}")


def build(arch, src, out):
    base = json.load(open(f"{src}/config.json"))
    sizes = dict(
        vocab_size=base["vocab_size"],
        hidden_size=base["hidden_size"],
        intermediate_size=base["intermediate_size"],
        num_hidden_layers=base["num_hidden_layers"],
        num_attention_heads=base["num_attention_heads"],
        num_key_value_heads=base["num_key_value_heads"],
        max_position_embeddings=base["max_position_embeddings"],
        rms_norm_eps=base["rms_norm_eps"],
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=base["eos_token_id"],
        pad_token_id=base["pad_token_id"],
    )
    if arch == "qwen3":
        config = Qwen3Config(
            head_dim=32,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **sizes,
        )
    elif arch in ("mistral", "mistral-window"):
        config = MistralConfig(
            sliding_window=24 if arch == "mistral-window" else None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e5},
            **sizes,
        )
    elif arch == "qwen2-window":
        config = Qwen2Config(
            use_sliding_window=True,
            sliding_window=16,
            max_window_layers=1,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **sizes,
        )
        assert config.layer_types == ["full_attention", "sliding_attention"], config.layer_types
    elif arch == "smollm3":
        config = SmolLM3Config(
            no_rope_layers=[1, 0],
            rope_parameters={"rope_type": "default", "rope_theta": 2e6},
            **sizes,
        )
    elif arch == "olmo2":
        config = Olmo2Config(
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
            **sizes,
        )
    elif arch == "olmo3":
        config = Olmo3Config(
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 5e5},
                "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                   "original_max_position_embeddings": 128},
            },
            **sizes,
        )
    elif arch == "qwen2-yarn":
        config = Qwen2Config(
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                             "original_max_position_embeddings": 128, "beta_fast": 8,
                             "beta_slow": 2, "truncate": False, "attention_factor": 1.1},
            **sizes,
        )
    elif arch == "phi3":
        config = Phi3Config(
            sliding_window=24,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            **sizes,
        )
    elif arch == "phi3-longrope":
        config = Phi3Config(
            original_max_position_embeddings=128,
            rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                             "partial_rotary_factor": 0.5,
                             "short_factor": [1.0, 1.3, 2.0, 3.5],
                             "long_factor": [1.5, 4.0, 9.0, 20.0]},
            **sizes,
        )
        assert config.head_dim == 16 if hasattr(config, "head_dim") else True
    elif arch == "gemma2":
        sizes["tie_word_embeddings"] = True
        config = Gemma2Config(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=16,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=5.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            **sizes,
        )
        assert config.layer_types == ["sliding_attention", "full_attention"], config.layer_types
    elif arch in ("gemma3", "gemma3-mm"):
        sizes["tie_word_embeddings"] = True
        config = Gemma3TextConfig(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
            **sizes,
        )
    elif arch == "qwen3-moe":
        config = Qwen3MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **sizes,
        )
    elif arch == "qwen2-moe":
        config = Qwen2MoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **sizes,
        )
    elif arch in ("mixtral", "mixtral-aux"):
        config = MixtralConfig(
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=arch == "mixtral-aux",
            router_aux_loss_coef=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **sizes,
        )
    elif arch == "olmoe":
        config = OlmoeConfig(
            num_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4},
            **sizes,
        )
    elif arch == "qwen3-moe-many":
        config = Qwen3MoeConfig(
            num_experts=64,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            **sizes,
        )
    elif arch in ("gpt-oss", "gpt-oss-mxfp4"):
        sizes["intermediate_size"] = 32
        config = GptOssConfig(
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            swiglu_limit=0.5,
            output_router_logits=True,
            router_aux_loss_coef=0.5,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                             "original_max_position_embeddings": 128, "beta_fast": 32.0,
                             "beta_slow": 1.0, "truncate": False},
            **sizes,
        )
    else:
        sys.exit(f"unknown ARCH {arch}")
    mm = arch == "gemma3-mm"
    if mm:
        v = sizes["vocab_size"]
        config = Gemma3Config(
            text_config=config.to_dict(),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=28, patch_size=14),
            mm_tokens_per_image=4,
            boi_token_index=v - 3,
            eoi_token_index=v - 2,
            image_token_index=v - 1,
            eos_token_id=sizes["eos_token_id"],
            pad_token_id=sizes["pad_token_id"],
        )
    torch.manual_seed(1234)
    gpt_oss = arch.startswith("gpt-oss")
    extra = {"attn_implementation": "eager"} if gpt_oss else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gpt_oss and "sinks" in name:
                p.normal_(0.0, 1.0)
            elif gpt_oss and "bias" in name:
                p.normal_(0.0, 0.2)
            if "norm" in name:
                # Gemma's norms scale by 1 + w.
                p.uniform_(-0.5, 0.5) if arch.startswith("gemma") else p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(out)
    if arch == "gpt-oss-mxfp4":
        model = mxfp4(out, extra)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        shutil.copy(f"{src}/{f}", f"{out}/{f}")

    ref = load_file(f"{src}/reference.safetensors")
    batch = {k: ref[k].long() for k in ["input_ids", "attention_mask", "labels"]}
    src_ref = json.load(open(f"{src}/reference.json"))
    with torch.no_grad():
        result = model(**batch)
        prompt = src_ref["generate"]["prompt_ids"]
        ids = torch.tensor([prompt])
        new = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=config.pad_token_id,
        )[0, len(prompt):].tolist()

    lora = None
    if arch in MOE or arch == "gpt-oss":
        lora = lora_step(arch, model, batch, out)

    model.train()
    params = dict(model.named_parameters())
    decay = [p for k, p in params.items() if "bias" not in k and "norm" not in k]
    no_decay = [p for k, p in params.items() if "bias" in k or "norm" in k]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    loss = model(**batch).loss
    loss.backward()
    # Layer 0's experts no token was routed to: their gradient is zero.
    idle = []
    if arch in FULL_MOE or gpt_oss:
        grad = params["model.layers.0.mlp.experts.down_proj"].grad
        idle = [e for e in range(grad.shape[0]) if not grad[e].any()]
        assert idle or arch != "qwen3-moe-many", "every one of the 64 experts was routed to"
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    opt.step()
    with torch.no_grad():
        after = model(**batch).loss.item()
    watched = ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    if arch.startswith("phi3"):
        watched = [
            "model.layers.0.self_attn.qkv_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.1.mlp.gate_up_proj.weight",
        ]
    if arch in ("qwen3", "gemma3", "gemma3-mm", "olmo2", "olmo3", "qwen3-moe", "olmoe"):
        watched += ["model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"]
    if arch == "olmo2":
        watched += [
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.post_feedforward_layernorm.weight",
        ]
    if arch.startswith("gemma"):
        watched += [
            "model.layers.0.pre_feedforward_layernorm.weight",
            "model.layers.0.post_feedforward_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
        ]
    tensors = {k: ref[k] for k in ["input_ids", "attention_mask", "labels"]}
    tensors["logits"] = result.logits.detach().contiguous()
    if gpt_oss:
        # Stacked [experts, in, out] with gate and up columns interleaved; under
        # anneal's per-expert names ([out, in]).
        experts = "model.layers.0.mlp.experts"
        at = "after_step.model.layers.0.mlp"
        gate_up, bias = params[f"{experts}.gate_up_proj"][1], params[f"{experts}.gate_up_proj_bias"][1]
        for name, cols in [("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))]:
            tensors[f"{at}.experts.1.{name}.weight"] = gate_up[:, cols].T.detach().contiguous()
            tensors[f"{at}.experts.1.{name}.bias"] = bias[cols].detach().contiguous()
        tensors[f"{at}.experts.1.down_proj.weight"] = params[f"{experts}.down_proj"][1].T.detach().contiguous()
        tensors[f"{at}.experts.1.down_proj.bias"] = params[f"{experts}.down_proj_bias"][1].detach().contiguous()
        for part in ["weight", "bias"]:
            tensors[f"{at}.gate.{part}"] = params[f"model.layers.0.mlp.router.{part}"].detach().contiguous()
        watched += ["model.layers.0.self_attn.sinks", "model.layers.1.self_attn.o_proj.bias"]
    if arch in MOE:
        # transformers 5 holds the experts as [experts, ...] parameters (gate
        # and up in one, gate first); checkpoints name each expert's matrices.
        block, (gate, up, down) = (
            ("block_sparse_moe", ("w1", "w3", "w2")) if arch.startswith("mixtral")
            else ("mlp", ("gate_proj", "up_proj", "down_proj"))
        )
        experts = "model.layers.0.mlp.experts"
        gate_up, width = params[f"{experts}.gate_up_proj"][1], params[f"{experts}.down_proj"].shape[2]
        at = f"after_step.model.layers.0.{block}"
        tensors[f"{at}.gate.weight"] = params["model.layers.0.mlp.gate.weight"].detach().contiguous()
        tensors[f"{at}.experts.1.{gate}.weight"] = gate_up[:width].detach().contiguous()
        tensors[f"{at}.experts.1.{up}.weight"] = gate_up[width:].detach().contiguous()
        tensors[f"{at}.experts.1.{down}.weight"] = params[f"{experts}.down_proj"][1].detach().contiguous()
        for e in idle[:1]:
            gate_up = params[f"{experts}.gate_up_proj"][e]
            tensors[f"{at}.experts.{e}.{gate}.weight"] = gate_up[:width].detach().contiguous()
            tensors[f"{at}.experts.{e}.{up}.weight"] = gate_up[width:].detach().contiguous()
            tensors[f"{at}.experts.{e}.{down}.weight"] = params[f"{experts}.down_proj"][e].detach().contiguous()
        if arch == "qwen2-moe":
            for k in ["shared_expert.up_proj.weight", "shared_expert_gate.weight"]:
                tensors[f"{at}.{k}"] = params[f"model.layers.0.mlp.{k}"].detach().contiguous()
    for k in watched:
        # transformers 5 nests the multimodal model's language model.
        name = k.replace("model.", "model.language_model.", 1) if mm else k
        tensors[f"after_step.{k}"] = params[name].detach().contiguous()
    if lora:
        tensors.update(lora[1])
    save_file(tensors, f"{out}/reference.safetensors")
    json.dump(
        {
            "model": f"tiny-{arch}",
            "loss": result.loss.item(),
            "generate": {"prompt_ids": prompt, "new_ids": new},
            "train_step": {
                "lr": 1e-2,
                "loss_before": loss.item(),
                "grad_norm_before_clip": norm,
                "loss_after": after,
                "idle_experts": idle,
            },
            **({"lora_train_step": lora[0]} if lora else {}),
        },
        open(f"{out}/reference.json", "w"),
    )


def mxfp4(out, extra):
    """Rewrites the gpt-oss checkpoint in OUT with random MXFP4 experts
    (blocks `[experts, out, in / 32, 16]` of two FP4 codes a byte, E8M0
    scales `[experts, out, in / 32]` between 2^-9 and 2^-3) and returns the
    model transformers dequantises from it."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    t = load_file(f"{out}/model.safetensors")
    g = torch.Generator().manual_seed(5)
    for k in [k for k in t if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, i, o = t.pop(k).shape
        t[f"{k}_blocks"] = torch.randint(0, 256, (e, o, i // 32, 16), generator=g, dtype=torch.uint8)
        t[f"{k}_scales"] = torch.randint(118, 125, (e, o, i // 32), generator=g, dtype=torch.uint8)
    save_file(t, f"{out}/model.safetensors", metadata={"format": "pt"})
    config = json.load(open(f"{out}/config.json"))
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }
    json.dump(config, open(f"{out}/config.json", "w"), indent=2)
    model = GptOssForCausalLM.from_pretrained(
        out, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32, **extra
    )
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    return model.eval()


def lora_step(arch, model, batch, out):
    """A PEFT adapter on a mixture of experts, with the routed experts
    adapted through `target_parameters` (one pair of factors per projection
    for all experts): written to OUT/lora-init with random factors (B too, so
    that the adapter changes the logits), then one AdamW step as the full
    one, at weight decay 0.1. Returns the `lora_train_step` summary and the
    tensors `lora_logits` and `after_lora_step.<adapter tensor>` for layer
    0's experts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(99)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        # Qwen2-MoE's shared expert is a module (for its down_proj); PEFT
        # reads `down_proj` elsewhere as the experts' parameter.
        target_modules=["q_proj", "v_proj"] + (["down_proj"] if arch == "qwen2-moe" else []),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(f"{out}/lora-init")
    with torch.no_grad():
        logits = peft_model(**batch).logits
    peft_model.train()
    trainable = {k: p for k, p in peft_model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    loss = peft_model(**batch).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0).item()
    opt.step()
    with torch.no_grad():
        after = peft_model(**batch).loss.item()
    tensors = {"lora_logits": logits.contiguous()}
    for k, p in trainable.items():
        if ".layers.0." in k and ".experts." in k:
            tensors["after_lora_step." + k.replace(".default.weight", ".weight")] = p.detach().contiguous()
    summary = {"lr": 1e-2, "loss_before": loss.item(), "grad_norm_before_clip": norm, "loss_after": after}
    return summary, tensors


if __name__ == "__main__":
    main()
