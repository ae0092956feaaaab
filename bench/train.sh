#!/usr/bin/env bash
# Full fine-tuning throughput of SmolLM2-135M-Instruct (built by .ci/smollm2.sh)
# with the `train` stage on CPU: GSM8K train questions as chat samples, batch
# BATCH, STEPS optimizer steps (f32, AdamW). Reports the median over runs of
# the median per-step throughput in trained tokens (assistant tokens with a
# label; prompts go through forward and backward too but are not counted) and
# the peak RSS of the whole `anneal run` (the stage process included).
# Then, on the same rows, RUNS runs of bench/train_torch.py (plain PyTorch loop
# over a transformers model, same batches, masking, AdamW settings and
# per-step trained-tokens/s definition; CPU, f32), its median and peak RSS
# (of the python process, measured the same way), and the ratio of the medians
# anneal / PyTorch. TORCH=0 skips it; PYTHON picks the interpreter.
# Long rows: TURNS consecutive questions per chat (default 1), CUTOFF tokens at
# most (default 512), TRAIN_ON_PROMPT=1 trains on every token (both sides).
# LORA=8 trains LoRA adapters of rank 8 instead (alpha 16, dropout 0, on every
# linear layer but the LM head: anneal `lora_target: all`, PEFT "all-linear";
# the PyTorch side needs peft), at LR (default 1e-5, with LORA 1e-4).
# DORA=1 with LORA makes them DoRA adapters (anneal `use_dora: true`, PEFT
# use_dora=True). EXPERTS=1 with LORA, on a mixture of experts, adapts the
# routed experts too (anneal `lora_target: all, experts`; PEFT
# target_parameters on the experts' fused gate_up_proj and down_proj).
# FREEZE=2 trains only the last 2 decoder layers instead (anneal
# `finetuning_type: freeze`, `freeze_trainable_layers: 2`; train_torch.py
# --freeze 2 turns requires_grad off for the rest), at LR (default 1e-5).
# GC=1 turns gradient checkpointing on, on both sides (anneal
# `gradient_checkpointing: true`, transformers' gradient_checkpointing_enable).
# BF16=1 trains in bf16 mixed precision on both sides (anneal `bf16: true`;
# train_torch.py --bf16: autocast, and with LORA or FREEZE the model loaded in
# bf16 with the weights that train in f32, as LLaMA-Factory and PEFT do).
#
#   RUNS=3 STEPS=4 BATCH=4 bench/train.sh
#   RUNS=3 STEPS=2 BATCH=1 TURNS=6 CUTOFF=1024 TRAIN_ON_PROMPT=1 bench/train.sh
#   RUNS=3 STEPS=4 BATCH=4 LORA=8 bench/train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

RUNS="${RUNS:-3}"
STEPS="${STEPS:-4}"
BATCH="${BATCH:-4}"
TURNS="${TURNS:-1}"
CUTOFF="${CUTOFF:-512}"
TRAIN_ON_PROMPT="${TRAIN_ON_PROMPT:-0}"
LORA="${LORA:-0}"
FREEZE="${FREEZE:-0}"
DORA="${DORA:-0}"
[ "$DORA" = 0 ] || [ "$LORA" != 0 ] || die "DORA=1 needs LORA=<rank>"
EXPERTS="${EXPERTS:-0}"
[ "$EXPERTS" = 0 ] || [ "$LORA" != 0 ] || die "EXPERTS=1 needs LORA=<rank>"
GC="${GC:-0}"
BF16="${BF16:-0}"
if [ "$LORA" != 0 ]; then LR="${LR:-1.0e-4}"; else LR="${LR:-1.0e-5}"; fi
BIN="$(pwd)/${ANNEAL_BIN:-target/release/anneal}"
MODEL="$(pwd)/${MODEL:-target/smollm2}"
SHARED="$(cd "${ANNEAL_SHARED:-../shared}" && pwd)"
[ -x "$BIN" ] || die "$BIN not built (cargo build --release)"
[ -f "$MODEL/model.safetensors" ] || die "$MODEL missing (bash .ci/smollm2.sh)"
TORCH="${TORCH:-1}"
PYTHON="${PYTHON:-python3}"
if [ "$TORCH" != 0 ]; then
    "$PYTHON" -c 'import torch, transformers' 2>/dev/null ||
        die "the PyTorch comparison needs torch and transformers for $PYTHON (pip install torch transformers), or set TORCH=0 to skip it"
fi

work="bench/results/train"
rm -rf "$work" && mkdir -p "$work"
python3 - "$SHARED/data/gsm8k/train.jsonl" "$work/train.jsonl" "$TURNS" <<'PY'
import json, sys
turns = int(sys.argv[3])
rows = [json.loads(l) for l in list(open(sys.argv[1]))[:256 * turns]]
with open(sys.argv[2], "w") as f:
    for i in range(0, len(rows), turns):
        messages = []
        for r in rows[i:i + turns]:
            messages += [{"role": "user", "content": r["question"]},
                         {"role": "assistant", "content": r["answer"]}]
        f.write(json.dumps({"messages": messages}) + "\n")
PY
rates=()
rss=()
for run in $(seq "$RUNS"); do
    d="$work/run$run"
    mkdir -p "$d"
    cp "$work/train.jsonl" "$d/"
    cat >"$d/p.yaml" <<YAML
name: bench_train
stages:
  sft:
    kind: train
    deps: {train: train.jsonl}
    params:
      model_name_or_path: $MODEL
$(if [ "$LORA" != 0 ]; then
    printf '      finetuning_type: lora\n      lora_rank: %s\n      lora_target: all%s\n' "$LORA" \
        "$([ "$EXPERTS" = 0 ] || echo ', experts')"
    [ "$DORA" = 0 ] || printf '      use_dora: true\n'
elif [ "$FREEZE" != 0 ]; then
    printf '      finetuning_type: freeze\n      freeze_trainable_layers: %s\n' "$FREEZE"
else
    printf '      finetuning_type: full\n'
fi)
      learning_rate: $LR
      max_steps: $STEPS
      per_device_train_batch_size: $BATCH
      save_steps: 100000
      cutoff_len: $CUTOFF
      train_on_prompt: $([ "$TRAIN_ON_PROMPT" = 1 ] && echo true || echo false)
$(if [ "$GC" = 1 ]; then printf '      gradient_checkpointing: true\n'; fi)
$(if [ "$BF16" = 1 ]; then printf '      bf16: true\n'; fi)
    outs: {model: out/, metrics: metrics.jsonl}
YAML
    secs="$(timed "$d/log" "$d/time" "$BIN" run "$d/p.yaml")"
    r="$(python3 -c '
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])]
print(statistics.median(x["tokens_per_s"] for x in m))' "$d/metrics.jsonl")"
    rates+=("$r")
    rss+=("$(rss_mb "$(cat "$d/time")")")
    log "run $run: ${secs}s wall, median step $r trained tokens/s, peak RSS $(rss_mb "$(cat "$d/time")") MB"
done
anneal_median="$(median "${rates[@]}")"
echo "steps=$STEPS batch=$BATCH turns=$TURNS cutoff=$CUTOFF lora=$LORA dora=$DORA experts=$EXPERTS freeze=$FREEZE gc=$GC bf16=$BF16 median_trained_tokens_per_s=$anneal_median peak_rss_mb=$(median "${rss[@]}")"
[ "$TORCH" = 0 ] && exit 0

log "anneal trained tokens per step (run 1): $(python3 -c '
import json, sys
print(" ".join(str(json.loads(l)["tokens"]) for l in open(sys.argv[1])))' "$work/run1/metrics.jsonl")"
trates=()
trss=()
for run in $(seq "$RUNS"); do
    d="$work/torch$run"
    mkdir -p "$d"
    secs="$(timed "$d/log" "$d/time" "$PYTHON" bench/train_torch.py "$MODEL" --data "$work/train.jsonl" \
        --steps "$STEPS" --batch "$BATCH" --cutoff "$CUTOFF" --device cpu --lr "$LR" --lora "$LORA" --freeze "$FREEZE" \
        $([ "$DORA" != 0 ] && echo --dora) $([ "$EXPERTS" != 0 ] && echo --experts) \
        $([ "$TRAIN_ON_PROMPT" = 1 ] && echo --train-on-prompt) $([ "$GC" = 1 ] && echo --gradient-checkpointing) $([ "$BF16" = 1 ] && echo --bf16))"
    grep -o '{"steps".*' "$d/log" | tail -n1 >"$d/result.json" ||
        die "no result line in $d/log"
    read -r r toks < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(r["median_trained_tokens_per_s"], " ".join(str(s["tokens"]) for s in r["per_step"]))' "$d/result.json")
    trates+=("$r")
    trss+=("$(rss_mb "$(cat "$d/time")")")
    log "PyTorch run $run: ${secs}s wall, median step $r trained tokens/s, peak RSS $(rss_mb "$(cat "$d/time")") MB, trained tokens per step: $toks"
done
torch_median="$(median "${trates[@]}")"
echo "steps=$STEPS batch=$BATCH turns=$TURNS cutoff=$CUTOFF lora=$LORA dora=$DORA experts=$EXPERTS freeze=$FREEZE gc=$GC pytorch_median_trained_tokens_per_s=$torch_median pytorch_peak_rss_mb=$(median "${trss[@]}") ratio_anneal_over_pytorch=$(awk -v a="$anneal_median" -v b="$torch_median" 'BEGIN { printf "%.3f", a / b }')"
