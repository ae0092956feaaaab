#!/usr/bin/env bash
# Full fine-tuning throughput of anneal's `train` stage against plain PyTorch +
# transformers (eager, sdpa attention) on the same device, same model, same
# token rows, same optimizer: a Qwen2.5-0.5B-shaped Qwen2ForCausalLM with
# random weights (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate
# 4864, vocab 151936, tied embeddings, rope_theta 1e6, rms eps 1e-6, max
# positions 32768), rows of SEQ tokens, bf16 mixed precision by default.
#
#   bench/train_gpu.sh                                   # cuda, full shape, SEQ 2048, BATCH 4
#   DEVICE=cpu SHAPE=tiny SEQ=256 BATCH=2 STEPS=3 bench/train_gpu.sh   # CPU check
#   PREPARE_ONLY=1 bench/train_gpu.sh                    # only (re)build the kit, see below
#
# Env (defaults): DEVICE (cuda; cpu, cuda or cuda:N), SHAPE (full = Qwen2.5-0.5B
# shape; tiny = hidden 128, 2 layers, 4 heads, 2 kv heads, intermediate 256),
# VOCAB (151936), SEQ (2048), BATCH (4 rows a step), STEPS (10 measured steps),
# WARMUP (2 steps run first, left out of the medians), BF16 (1), PACKING (0),
# GC (0; 1: gradient checkpointing on both sides, MFU still counts model FLOPs),
# PEAK_TFLOPS (989: H100/H200 dense bf16; used for MFU on any device),
# ANNEAL_BIN (target/release/anneal; for CUDA a `--features cuda` build),
# PYTHON (python3, needs torch + transformers), TORCH=0 / ANNEAL=0 skip a side,
# TOKENIZER_DIR (target/smollm2), GSM8K (../shared/data/gsm8k/train.jsonl),
# CUDA_PATH (/usr/local/cuda).
#
# Kit: the run needs SmolLM2's tokenizer and some GSM8K rows, which live outside
# the repo (target/smollm2, ../shared). Whenever they are there the script
# copies them into bench/results/train_gpu_kit/ (tokenizer files + the first
# 2000 GSM8K rows, ~4 MB, git-ignored); where they are not (the GPU machine) it
# uses that kit, so carry `bench/results/train_gpu_kit` with the binary.
#
# Model: bench/make_random_qwen2.py writes the random-init checkpoint
# (transformers' init, seed 0) in bf16 with SmolLM2's tokenizer copied in (ids <
# 49152 <= vocab); both sides load it into f32 master weights.
#
# Data: identical token rows on both sides, every row exactly SEQ tokens, no
# padding. Each sample is a multi-turn chat (GSM8K question / answer pairs as
# user / assistant turns, consecutive rows, cycling) grown until its chat-template
# rendering is longer than SEQ tokens, then cut to SEQ (anneal's cutoff_len,
# right truncation; train_torch.py cuts the same way). anneal: train_on_prompt:
# true (every token but the first of a sample has a label, so the LM head runs
# on all positions as in the PyTorch loop), packing: false (PACKING=1 sets
# packing: true; each packed row then holds exactly one sample, so the rows are
# the same and only anneal's packed attention path, block-diagonal mask and
# per-sample positions, is exercised). Both take the samples in anneal's
# shuffled order (SplitMix64 permutation, seed 42; bench/train_torch.py).
# Attention on both sides is plain causal attention over the whole row (one
# sample per row, so nothing crosses a sample boundary).
#
# Optimizer, both sides: AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0),
# lr 1e-5 cosine over WARMUP+STEPS steps, global grad-norm clip 1.0. BF16=1:
# anneal `bf16: true`; PyTorch torch.autocast(device, bfloat16) with the model
# in f32 (matmuls and attention in bf16, f32 weights, optimizer state, loss).
#
# Measured, per optimizer step (both sides time from the top of the step
# through optimizer.step; PyTorch with torch.cuda.synchronize at both ends):
#   processed tokens = tokens that went through forward and backward
#     (BATCH * SEQ here). PyTorch reports it; for anneal it is metrics.jsonl
#     `tokens` (trained tokens: all but the first of each sample) + `rows`
#     (samples in the step), which the script checks against PyTorch's count.
#   step seconds (anneal: tokens / tokens_per_s from metrics.jsonl).
#   tokens/s = processed tokens / step seconds; the reported value is the
#     median over steps WARMUP+1 .. WARMUP+STEPS. Trained tokens/s too.
# FLOPs per processed token (a Kaplan/PaLM-style count, causal masking NOT
# discounted):
#   F = 6 * N_nonemb + 6 * hidden * vocab + 12 * layers * hidden * SEQ
#   N_nonemb = unique parameters minus the embedding (the tied LM head is the
#   embedding matrix; its matmul is the 6 * hidden * vocab term = 2*h*V forward
#   x 3 for forward + backward; the embedding lookup costs no FLOPs);
#   12 * L * h * SEQ = QK^T and AV, 2 * 2 * SEQ * h forward per layer, x 3.
#   Full shape: N_nonemb = 357,898,112, F = 3.49 GFLOP per token at SEQ 2048.
# MFU = tokens/s * F / (PEAK_TFLOPS * 1e12).
# Memory: PyTorch's torch.cuda.max_memory_allocated (tensors only). anneal has
# no such counter: nvidia-smi --query-gpu=memory.used is sampled about every
# 0.2-0.3 s in the background during each side's run (the whole GPU: CUDA context and
# allocator caches included, other processes too; the idle reading before the
# run is reported as the baseline); it is sampled for PyTorch as well, so the
# two nvidia-smi peaks compare like with like. On CPU: peak RSS (/usr/bin/time
# where installed, else PyTorch's ru_maxrss only).
#
# Output: a line per side, then
#   device=... shape=... seq=... batch=... anneal_tokens_per_s=...
#   pytorch_tokens_per_s=... ratio=... anneal_mfu=... pytorch_mfu=... params=...
# and everything in bench/results/train_gpu/summary.json (logs, the pipeline,
# metrics and the PyTorch result beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

DEVICE="${DEVICE:-cuda}"
SHAPE="${SHAPE:-full}"
VOCAB="${VOCAB:-151936}"
SEQ="${SEQ:-2048}"
BATCH="${BATCH:-4}"
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-2}"
BF16="${BF16:-1}"
PACKING="${PACKING:-0}"
GC="${GC:-0}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
TORCH="${TORCH:-1}"
ANNEAL="${ANNEAL:-1}"
PYTHON="${PYTHON:-python3}"
BIN="$(pwd)/${ANNEAL_BIN:-target/release/anneal}"
TOKENIZER_DIR="${TOKENIZER_DIR:-target/smollm2}"
GSM8K="${GSM8K:-../shared/data/gsm8k/train.jsonl}"
KIT="${KIT:-bench/results/train_gpu_kit}"
work="bench/results/train_gpu"

case "$SHAPE" in
    full | qwen2.5-0.5b) shape_arg=qwen2.5-0.5b ;;
    tiny) shape_arg=tiny ;;
    *) die "SHAPE must be full or tiny, not '$SHAPE'" ;;
esac
case "$DEVICE" in
    cpu) gpu_index="" ;;
    cuda | gpu) DEVICE=cuda gpu_index=0 ;;
    cuda:*) gpu_index="${DEVICE#cuda:}" ;;
    *) die "DEVICE must be cpu, cuda or cuda:N, not '$DEVICE'" ;;
esac
for v in SEQ BATCH STEPS VOCAB; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ "$WARMUP" =~ ^[0-9]+$ ]] || die "WARMUP must be a non-negative integer, not '$WARMUP'"
total_steps=$((STEPS + WARMUP))
t_start="$(now_ns)"

# --- the kit: tokenizer + GSM8K rows, refreshed from their sources when present
if [ -f "$TOKENIZER_DIR/tokenizer.json" ] && [ -f "$GSM8K" ]; then
    mkdir -p "$KIT/tokenizer"
    for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
        if [ -f "$TOKENIZER_DIR/$f" ]; then cp -f "$TOKENIZER_DIR/$f" "$KIT/tokenizer/$f" && chmod u+w "$KIT/tokenizer/$f"; fi
    done
    head -n 2000 "$GSM8K" >"$KIT/gsm8k.jsonl"
    log "kit refreshed from $TOKENIZER_DIR and $GSM8K: $KIT"
fi
[ -f "$KIT/tokenizer/tokenizer.json" ] && [ -s "$KIT/gsm8k.jsonl" ] ||
    die "no kit at $KIT and no sources ($TOKENIZER_DIR/tokenizer.json, $GSM8K) to build it from; run PREPARE_ONLY=1 $0 where they are and carry $KIT"
if [ "${PREPARE_ONLY:-0}" = 1 ]; then
    echo "kit ready: $KIT ($(du -sh "$KIT" | cut -f1))"
    exit 0
fi

# --- checks
if [ "$ANNEAL" != 0 ]; then [ -x "$BIN" ] || die "$BIN not built"; fi
"$PYTHON" -c 'import torch, transformers, safetensors' 2>/dev/null ||
    die "$PYTHON needs torch, transformers and safetensors (the model is written with them)"
if [ -n "$gpu_index" ]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found"
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        die "torch.cuda.is_available() is false for $PYTHON"
    export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
    anneal_env=(env "CUDA_PATH=$CUDA_PATH" "LD_LIBRARY_PATH=$CUDA_PATH/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
else
    anneal_env=(env)
fi
[ "$BF16" = 1 ] && bf16_yaml=true || bf16_yaml=false
[ "$PACKING" = 1 ] && packing_yaml=true || packing_yaml=false

rm -rf "$work" && mkdir -p "$work"
work_abs="$(cd "$work" && pwd)"

# run_measured NAME CMD...: runs CMD with output to $work/NAME.log, its wall
# seconds to $work/NAME.secs, its peak RSS (KiB, where /usr/bin/time exists) to
# $work/NAME.rss and, on CUDA, nvidia-smi memory.used samples (MiB) to
# $work/NAME.gpumem (the idle reading first, in $work/NAME.gpubase).
sampler_pid=""
stop_sampler() {
    if [ -n "$sampler_pid" ]; then
        kill "$sampler_pid" 2>/dev/null || true
        wait "$sampler_pid" 2>/dev/null || true
        sampler_pid=""
    fi
}
trap stop_sampler EXIT
run_measured() {
    local name="$1" t0 t1 rc=0
    shift
    if [ -n "$gpu_index" ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu_index" \
            >"$work/$name.gpubase"
        # A loop of single queries rather than `nvidia-smi -lms`, whose output
        # may sit in a stdio buffer when it is killed.
        while :; do
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu_index" || break
            sleep 0.2
        done >"$work/$name.gpumem" 2>/dev/null &
        sampler_pid=$!
    fi
    t0="$(now_ns)"
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -f '%M' -o "$work/$name.rss" "$@" >"$work/$name.log" 2>&1 || rc=$?
    else
        "$@" >"$work/$name.log" 2>&1 || rc=$?
    fi
    t1="$(now_ns)"
    stop_sampler
    elapsed "$t0" "$t1" >"$work/$name.secs"
    if ((rc != 0)); then
        echo "$script_name: $name failed (exit $rc): $*" >&2
        echo "--- last lines of $work/$name.log:" >&2
        tail -n 30 "$work/$name.log" >&2
        exit 1
    fi
}

log "device=$DEVICE shape=$SHAPE vocab=$VOCAB seq=$SEQ batch=$BATCH steps=$STEPS+$WARMUP warmup bf16=$BF16 packing=$PACKING gc=$GC"

# --- the model
t0="$(now_ns)"
"$PYTHON" bench/make_random_qwen2.py "$work/model" --shape "$shape_arg" --vocab "$VOCAB" \
    --tokenizer-dir "$KIT/tokenizer" --info "$work/params.json" >"$work/make_model.log" 2>&1 ||
    { tail -n 20 "$work/make_model.log" >&2; die "writing the model failed"; }
log "model: $(cat "$work/params.json") in $(elapsed "$t0" "$(now_ns)")s"
if [ "$ANNEAL" != 0 ]; then
    # anneal loads the checkpoint (CPU, 2 greedy tokens): fails early and cheaply.
    "$BIN" model generate "$work/model" -p hi --max-new-tokens 2 --ignore-eos --json \
        >"$work/generate_check.json" 2>"$work/generate_check.log" ||
        { tail -n 20 "$work/generate_check.log" >&2; die "anneal cannot load $work/model"; }
fi

# --- the data: samples of > SEQ tokens, cut to SEQ by both sides
t0="$(now_ns)"
"$PYTHON" - "$KIT/gsm8k.jsonl" "$work/model" "$SEQ" "$((BATCH * total_steps))" "$work/train.jsonl" <<'PY'
import json, sys
from transformers import AutoTokenizer
from transformers.utils import logging
logging.set_verbosity_error()
src, model, seq, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [json.loads(l) for l in open(src) if l.strip()]
tok = AutoTokenizer.from_pretrained(model)
length = lambda m: len(tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
k, lens = 0, []
with open(out, "w") as f:
    for _ in range(n):
        msgs = []
        while True:
            r = rows[k % len(rows)]
            k += 1
            msgs += [{"role": "user", "content": r["question"]},
                     {"role": "assistant", "content": r["answer"]}]
            if len(msgs) >= 4 and length(msgs) > seq:
                break
            if len(msgs) > 4 * seq:
                sys.exit("cannot grow a sample past SEQ tokens")
        lens.append(length(msgs))
        f.write(json.dumps({"messages": msgs}) + "\n")
print(f"{n} samples from {k} GSM8K rows, {min(lens)}..{max(lens)} tokens before the cut to {seq}",
      file=sys.stderr)
PY
log "data: $work/train.jsonl in $(elapsed "$t0" "$(now_ns)")s"

# --- anneal
if [ "$ANNEAL" != 0 ]; then
    d="$work/anneal"
    mkdir -p "$d"
    cp "$work/train.jsonl" "$d/"
    cat >"$d/p.yaml" <<YAML
name: bench_train_gpu
stages:
  sft:
    kind: train
    deps: {train: train.jsonl}
    params:
      model_name_or_path: $work_abs/model
      finetuning_type: full
      learning_rate: 1.0e-5
      max_steps: $total_steps
      per_device_train_batch_size: $BATCH
      save_steps: 1000000
      cutoff_len: $SEQ
      train_on_prompt: true
$(if [ "$GC" = 1 ]; then printf '      gradient_checkpointing: true\n'; fi)
      packing: $packing_yaml
      bf16: $bf16_yaml
      device: $DEVICE
    outs: {model: out/, metrics: metrics.jsonl}
YAML
    log "anneal run ($DEVICE) ..."
    run_measured anneal "${anneal_env[@]}" "$BIN" run "$d/p.yaml"
    cp "$d/metrics.jsonl" "$work/anneal_metrics.jsonl"
    log "anneal: $(cat "$work/anneal.secs")s wall (model load, kernel compilation, $total_steps steps, saving the f32 model)"
fi

# --- PyTorch
if [ "$TORCH" != 0 ]; then
    targs=(--data "$work/train.jsonl" --steps "$total_steps" --batch "$BATCH" --cutoff "$SEQ"
        --device "$DEVICE" --train-on-prompt --attn sdpa)
    [ "$BF16" = 1 ] && targs+=(--bf16)
    [ "$GC" = 1 ] && targs+=(--gradient-checkpointing)
    log "PyTorch run ($DEVICE) ..."
    run_measured torch "$PYTHON" bench/train_torch.py "$work/model" "${targs[@]}"
    grep -o '{"steps".*' "$work/torch.log" | tail -n1 >"$work/torch_result.json" ||
        die "no result line in $work/torch.log"
    log "PyTorch: $(cat "$work/torch.secs")s wall (imports, model load, $total_steps steps)"
fi

# --- summary
python3 - "$work" "$DEVICE" "$SHAPE" "$SEQ" "$BATCH" "$STEPS" "$WARMUP" "$BF16" "$PACKING" "$GC" \
    "$PEAK_TFLOPS" "$ANNEAL" "$TORCH" "$(elapsed "$t_start" "$(now_ns)")" <<'PY'
import json, os, statistics, sys
(work, device, shape, seq, batch, steps, warmup, bf16, packing, gc, peak, do_anneal, do_torch,
 elapsed) = sys.argv[1:]
seq, batch, steps, warmup, peak = int(seq), int(batch), int(steps), int(warmup), float(peak)
p = json.load(open(f"{work}/params.json"))
flops_tok = 6 * p["nonembedding_params"] + 6 * p["hidden"] * p["vocab"] + 12 * p["layers"] * p["hidden"] * seq

def read(name, ext):
    f = f"{work}/{name}.{ext}"
    return open(f).read().split() if os.path.exists(f) else []

def memory(name):
    m = {}
    samples = [int(x) for x in read(name, "gpumem") if x.isdigit()]
    base = [int(x) for x in read(name, "gpubase") if x.isdigit()]
    if samples:
        m["nvidia_smi_peak_used_mib"] = max(samples)
        m["nvidia_smi_idle_used_mib"] = base[0] if base else None
        m["nvidia_smi_samples"] = len(samples)
    rss = read(name, "rss")
    if rss:
        m["peak_rss_mb"] = round(int(rss[0]) * 1024 / 1e6, 1)
    return m

def side(name, per_step):
    """per_step: list of (processed, trained, seconds), all steps."""
    measured = per_step[warmup:]
    if not measured:
        sys.exit(f"no steps after the {warmup} warmup steps")
    tps = statistics.median(pr / s for pr, _, s in measured)
    r = {
        "tokens_per_s": tps,
        "trained_tokens_per_s": statistics.median(tr / s for _, tr, s in measured),
        "mean_tokens_per_s": sum(pr for pr, _, _ in measured) / sum(s for _, _, s in measured),
        "mfu": tps * flops_tok / (peak * 1e12),
        "achieved_tflops": tps * flops_tok / 1e12,
        "median_step_s": statistics.median(s for _, _, s in measured),
        "processed_tokens_per_step": [pr for pr, _, _ in per_step],
        "trained_tokens_per_step": [tr for _, tr, _ in per_step],
        "step_seconds": [round(s, 4) for _, _, s in per_step],
        "wall_s": float(read(name, "secs")[0]),
    }
    r.update(memory(name))
    return r

out = {"device": device, "shape": shape, "seq": seq, "batch": batch, "steps": steps,
       "warmup": warmup, "bf16": bf16 == "1", "packing": packing == "1",
       "gradient_checkpointing": gc == "1",
       "peak_tflops": peak, "params": p, "flops_per_token": flops_tok,
       "flops_formula": "6*N_nonemb + 6*hidden*vocab + 12*layers*hidden*seq",
       "tokens": "processed (forward+backward) tokens per second, median over measured steps"}
if do_anneal != "0":
    m = [json.loads(l) for l in open(f"{work}/anneal_metrics.jsonl") if l.strip()]
    # train_on_prompt: trained = all tokens but the first of each sample; rows = samples
    # (unpacked, or packed with one sample per row).
    out["anneal"] = side("anneal", [(x["tokens"] + x["rows"], x["tokens"], x["tokens"] / x["tokens_per_s"]) for x in m])
    out["anneal"]["loss_per_step"] = [x["loss"] for x in m]
if do_torch != "0":
    t = json.load(open(f"{work}/torch_result.json"))
    out["pytorch"] = side("torch", [(x["processed_tokens"], x["tokens"], x["seconds"]) for x in t["per_step"]])
    out["pytorch"]["loss_per_step"] = [x["loss"] for x in t["per_step"]]
    out["pytorch"]["torch_max_memory_allocated_mib"] = t.get("peak_cuda_allocated_mb")
    out["pytorch"]["peak_rss_mb_python"] = round(t["peak_rss_mb"] * 1.048576, 1)
    out["versions"] = {"torch": t["torch"], "transformers": t["transformers"], "threads": t["threads"],
                       "attn_implementation": t.get("attn_implementation")}
a, tr = out.get("anneal"), out.get("pytorch")
if a and tr:
    out["tokens_per_step_agree"] = a["processed_tokens_per_step"] == tr["processed_tokens_per_step"] \
        and a["trained_tokens_per_step"] == tr["trained_tokens_per_step"]
    out["ratio"] = a["tokens_per_s"] / tr["tokens_per_s"]
out["elapsed_s"] = float(elapsed)
json.dump(out, open(f"{work}/summary.json", "w"), indent=2)

def mem(r):
    bits = []
    if r.get("torch_max_memory_allocated_mib") is not None:
        bits.append(f"torch_max_memory_allocated={r['torch_max_memory_allocated_mib']:.0f}MiB")
    if "nvidia_smi_peak_used_mib" in r:
        bits.append(f"nvidia_smi_peak_used={r['nvidia_smi_peak_used_mib']}MiB(idle {r['nvidia_smi_idle_used_mib']}MiB)")
    if "peak_rss_mb" in r:
        bits.append(f"peak_rss={r['peak_rss_mb']}MB")
    elif "peak_rss_mb_python" in r:
        bits.append(f"peak_rss={r['peak_rss_mb_python']}MB")
    return " ".join(bits)

for name, r in (("anneal", a), ("pytorch", tr)):
    if r:
        print(f"{name}: tokens_per_s={r['tokens_per_s']:.1f} trained_tokens_per_s={r['trained_tokens_per_s']:.1f} "
              f"mfu={r['mfu']:.4g} tflops={r['achieved_tflops']:.2f} median_step_s={r['median_step_s']:.4f} "
              f"wall_s={r['wall_s']:.1f} {mem(r)}")
        print(f"{name}: processed tokens per step {r['processed_tokens_per_step']}, trained {r['trained_tokens_per_step']}, "
              f"step seconds {r['step_seconds']}, loss {[round(x, 4) for x in r['loss_per_step']]}")
if a and tr:
    print(f"token counts per step agree: {out['tokens_per_step_agree']}")
fmt = lambda r, k, f: (f % r[k]) if r else "na"
print(f"device={device} shape={shape} seq={seq} batch={batch} steps={steps} warmup={warmup} "
      f"anneal_tokens_per_s={fmt(a, 'tokens_per_s', '%.1f')} pytorch_tokens_per_s={fmt(tr, 'tokens_per_s', '%.1f')} "
      f"ratio={'%.3f' % out['ratio'] if 'ratio' in out else 'na'} "
      f"anneal_mfu={fmt(a, 'mfu', '%.4g')} pytorch_mfu={fmt(tr, 'mfu', '%.4g')} "
      f"params={p['params']} flops_per_token={flops_tok:.4g} elapsed_s={float(elapsed):.1f}")
if a and tr and not out["tokens_per_step_agree"]:
    sys.exit("train_gpu.sh: anneal and PyTorch processed different token counts per step")
PY
