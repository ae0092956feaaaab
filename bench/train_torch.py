#!/usr/bin/env python3
"""Plain-PyTorch counterpart of anneal's `train` stage (finetuning_type: full, or
lora with --lora RANK), for bench/train.sh. No HF Trainer: a hand-written loop
over a transformers model (a PEFT model with --lora).

Data, as in stages/src/train/data.rs: each row's `messages` rendered with the
model's chat template and tokenized without special tokens; a token is trained
(label = its id) when its start offset lies in an assistant turn, the span from
the end of the prefix rendered with `add_generation_prompt=True` to the end of
the prefix rendered through that turn (so `<|im_end|>\\n` of the turn is trained,
the `<|im_start|>assistant\\n` header is not); every other label is -100. Samples
are cut to `--cutoff` tokens (the right end goes) and dropped if no label is
left after the shift. Step k takes samples k*B .. k*B+B-1 of the same stream as
anneal: an epoch-wise permutation of the samples by SplitMix64 seeded with
seed + epoch (anneal's default seed 42), so both train on the same batches
(`--order sequential` takes rows in file order instead). Right-padded per batch.
AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0, torch's default
implementation), global grad-norm clip 1.0, lr 1e-5 on anneal's default cosine
schedule without warmup; loss = mean cross entropy over the label tokens.

What is measured, per step, matching anneal's metrics.jsonl `tokens_per_s`
(stages/src/train.rs: `total_tokens / t0.elapsed()`, t0 taken at the top of the
step, read right after the optimizer step):
  - tokens: trained tokens of the step, i.e. label tokens after the shift
    (labels[:, 1:] != -100), summed over the batch; padding and prompt tokens
    are not counted although the prompts go through forward and backward;
  - time: wall time from the start of the step (building the padded batch from
    the pre-tokenized samples, as anneal's `pad`) through forward, loss,
    backward, grad clip and optimizer.step (plus zero_grad), with
    torch.cuda.synchronize() before the clock is read on CUDA. Loading the
    model and tokenizing the data are outside it, as in anneal.
  tokens_per_s = tokens / time. The summary is the median over steps.
  Also per step: processed_tokens, the non-padding tokens of the batch (all
  that went through forward and backward), and processed_tokens_per_s.
peak_rss_mb: ru_maxrss of this process / 1024 (MiB, the whole process);
peak_cuda_allocated_mb: torch.cuda.max_memory_allocated / 2**20 on CUDA (null
on CPU): tensors only, not the CUDA context or the allocator's cached blocks.

--lora RANK: PEFT LoRA (peft.LoraConfig: r=RANK, lora_alpha=--lora-alpha,
default 2*RANK as anneal's, dropout 0, target_modules "all-linear": every
linear layer but the LM head, as anneal's `lora_target: all`; on a mixture of
experts, the names of the nn.Linear modules but the LM head, as
LLaMA-Factory's `lora_target: all` and anneal's: the attention's projections,
since transformers 5 holds the experts and routers otherwise, and PEFT's
"all-linear" would wrap those too) on the f32 model;
AdamW, clipping and the loss as above, over the adapters' parameters only.
--dora makes them DoRA adapters (use_dora=True; anneal's `use_dora: true`).
--experts adds adapters on a mixture's routed experts (target_parameters
mlp.experts.gate_up_proj and mlp.experts.down_proj; anneal's `lora_target:
all, experts`).

--freeze N: only the last N decoder layers train (every weight whose name
contains `.{i}.` for those layers: LLaMA-Factory's freeze tuning with
freeze_trainable_modules all and no extra modules, anneal's
`finetuning_type: freeze`); the rest has requires_grad off.

--train-on-prompt labels every token (anneal's `train_on_prompt: true`), so
trained tokens are all tokens but the first of each sample. --attn picks the
transformers attention implementation (default sdpa, PyTorch eager's fast path,
where the model supports it: Gemma 2 does not, since SDPA cannot soft-cap its
scores, and gets eager, as transformers gives it).

Per-step lines go to stderr; one JSON line to stdout:
  {"steps", "batch", "median_trained_tokens_per_s",
   "median_processed_tokens_per_s", "per_step": [...], "peak_rss_mb",
   "peak_cuda_allocated_mb", "torch", "threads", ...}

  python3 bench/train_torch.py target/smollm2 --data train.jsonl --steps 4 --batch 4 \
      --cutoff 512 [--device cpu|cuda] [--bf16] [--train-on-prompt] [--attn sdpa]
"""

import argparse
import json
import math
import resource
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
except ImportError as e:
    sys.exit(
        f"train_torch.py: {e}: PyTorch and transformers are needed for the comparison "
        "(pip install torch transformers), or run the benchmark with TORCH=0"
    )

MASK = (1 << 64) - 1


def splitmix_permutation(n, seed):
    """anneal's `permutation` (stages/src/train_val_split.rs, stages/src/rng.rs)."""
    state = seed & MASK

    def next_u64():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    p = list(range(n))
    for i in range(n - 1, 0, -1):
        j = (next_u64() * (i + 1)) >> 64
        p[i], p[j] = p[j], p[i]
    return p


def tokenize(tok, messages, cutoff, train_on_prompt=False):
    """ids and labels of one conversation, as anneal's `data::tokenize`."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        p = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        q = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (q.startswith(p) and full.startswith(q)):
            raise ValueError(f"the chat template does not render message {i} as a prefix")
        spans.append((len(p), len(q)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        t if train_on_prompt or any(a <= s < b for a, b in spans) else -100
        for t, (s, _) in zip(ids, enc["offset_mapping"])
    ]
    return ids[:cutoff], labels[:cutoff]


def lr_at(peak, step, total):
    """anneal's default schedule: cosine to 0, no warmup."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def main():
    hf_logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--data", required=True, help="jsonl rows with chat `messages`")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast with f32 weights and optimizer; with --lora or --freeze the model "
        "loads in bf16 and the weights that train are f32 (LLaMA-Factory's and PEFT's defaults)",
    )
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=42, help="data order seed (anneal's default)")
    ap.add_argument("--order", choices=["anneal", "sequential"], default="anneal")
    ap.add_argument("--train-on-prompt", action="store_true", help="label every token")
    ap.add_argument("--attn", default=None, help="attn_implementation (default sdpa, or eager where unsupported)")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (PEFT); 0: full fine-tuning")
    ap.add_argument("--lora-alpha", type=float, default=None, help="default: 2 * rank")
    ap.add_argument("--freeze", type=int, default=0, help="train the last N layers only")
    ap.add_argument("--dora", action="store_true", help="with --lora: DoRA adapters (use_dora)")
    ap.add_argument(
        "--experts", action="store_true", help="with --lora: adapt the routed experts too (target_parameters)"
    )
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="transformers' gradient checkpointing (non-reentrant), as HF Trainer's flag",
    )
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("train_torch.py: --device cuda but torch.cuda.is_available() is false")

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    samples = []
    with open(a.data, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ids, labels = tokenize(
                    tok, json.loads(line)["messages"], a.cutoff, a.train_on_prompt
                )
                if any(l != -100 for l in labels[1:]):
                    samples.append((ids, labels))
    n = len(samples)
    if n == 0:
        sys.exit(f"train_torch.py: no usable samples in {a.data}")

    attn = a.attn
    if attn is None:
        model_type = json.load(open(f"{a.model_dir}/config.json")).get("model_type")
        # transformers runs Gemma 2 eagerly (soft-capped scores) and gpt-oss has
        # no sdpa path (attention sinks).
        attn = "eager" if model_type in ("gemma2", "gpt_oss") else "sdpa"
    frozen_bf16 = a.bf16 and (a.lora or a.freeze)
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.bfloat16 if frozen_bf16 else torch.float32, attn_implementation=attn
    )
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.lora:
        try:
            import peft
        except ImportError as e:
            sys.exit(f"train_torch.py: {e}: --lora needs peft (pip install peft)")
        config = peft.LoraConfig(
            r=a.lora,
            lora_alpha=a.lora_alpha if a.lora_alpha is not None else 2.0 * a.lora,
            lora_dropout=0.0,
            target_modules=lora_targets(model),
            task_type="CAUSAL_LM",
            use_dora=a.dora,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if a.experts else None,
        )
        model = peft.get_peft_model(model, config)
    if a.freeze:
        n_layers = model.config.num_hidden_layers
        keep = [f".{i}." for i in range(max(0, n_layers - a.freeze), n_layers)]
        for name, p in model.named_parameters():
            p.requires_grad_(any(k in name for k in keep))
            if p.requires_grad:
                p.data = p.data.float()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = tok.pad_token_id
    if pad_id is None:
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    opt = torch.optim.AdamW(
        params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    order, order_epoch = None, None

    def pick(step):
        nonlocal order, order_epoch
        out = []
        for k in range(a.batch):
            pos = step * a.batch + k
            if a.order == "sequential":
                out.append(samples[pos % n])
                continue
            epoch = pos // n
            if epoch != order_epoch:
                order, order_epoch = splitmix_permutation(n, a.seed + epoch), epoch
            out.append(samples[order[pos % n]])
        return out

    per_step = []
    for step in range(a.steps):
        picked = pick(step)
        sync()
        t0 = time.perf_counter()
        t = max(len(ids) for ids, _ in picked)
        input_ids = torch.tensor([ids + [pad_id] * (t - len(ids)) for ids, _ in picked])
        mask = torch.tensor([[1] * len(ids) + [0] * (t - len(ids)) for ids, _ in picked])
        labels = torch.tensor([l + [-100] * (t - len(l)) for _, l in picked])
        input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
        target = labels[:, 1:]
        tokens = int((target != -100).sum())
        processed = sum(len(ids) for ids, _ in picked)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=-100,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(a.lr, step, a.steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_v = loss.item()
        sync()
        secs = time.perf_counter() - t0
        rec = {
            "step": step + 1,
            "tokens": tokens,
            "processed_tokens": processed,
            "rows": len(picked),
            "seq_len": t,
            "seconds": secs,
            "tokens_per_s": tokens / max(secs, 1e-9),
            "processed_tokens_per_s": processed / max(secs, 1e-9),
            "loss": loss_v,
            "grad_norm": float(grad_norm),
        }
        per_step.append(rec)
        print(
            f"step {step + 1}/{a.steps}: {tokens} trained tokens, {len(picked)} rows of <= {t}, "
            f"{secs:.3f}s, {rec['tokens_per_s']:.1f} trained tokens/s, loss {loss_v:.4f}",
            file=sys.stderr,
        )

    print(
        json.dumps(
            {
                "steps": a.steps,
                "batch": a.batch,
                "median_trained_tokens_per_s": statistics.median(r["tokens_per_s"] for r in per_step),
                "median_processed_tokens_per_s": statistics.median(
                    r["processed_tokens_per_s"] for r in per_step
                ),
                "per_step": per_step,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_cuda_allocated_mb": (
                    torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                ),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "transformers": transformers.__version__,
                "device": str(device),
                "bf16": a.bf16,
                "order": a.order,
                "train_on_prompt": a.train_on_prompt,
                "lora_rank": a.lora,
                "use_dora": a.dora,
                "lora_experts": a.experts,
                "freeze_trainable_layers": a.freeze,
                "trainable_params": sum(p.numel() for p in params),
                "attn_implementation": model.config._attn_implementation,
                # Mixtures of experts: transformers 5's expert kernels
                # (grouped_mm when torch can run it, else the per-expert loop).
                "experts_implementation": getattr(model.config, "_experts_implementation", None),
                "samples": n,
            }
        )
    )


def lora_targets(model):
    """PEFT's "all-linear", or, on a mixture of experts, the nn.Linear module
    names but the LM head's (see --lora)."""
    if not any(hasattr(model.config, k) for k in ("num_experts", "num_local_experts")):
        return "all-linear"
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    })


if __name__ == "__main__":
    main()
