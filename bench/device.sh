#!/usr/bin/env bash
# Everything a lent GPU machine (no Rust, no network) checks and measures, in
# one call of the device tool, from what bench/device_pack.sh put in .device/:
#   1. bench/train_gpu.sh: full fine-tuning of a Qwen2.5-0.5B-shaped model,
#      seq 2048, bf16, against PyTorch + transformers, with MFU (first: it is
#      the issue's headline figure);
#   2. the CUDA parity tests (stages/tests/{model,train}_parity.rs `cuda`
#      modules: logits, loss and greedy tokens against transformers; a full and
#      a LoRA training step against torch/PEFT, with and without gradient
#      checkpointing; bf16 against f32);
#   3. bench/generate.sh on that model, batch 1 and 16, against transformers;
#   4. attention alone at the training shape: anneal's op forward and backward
#      and burn's fused (flash) forward (`attention_timing` in
#      stages/tests/train_parity.rs), then PyTorch's SDPA
#      (bench/attention_torch.py).
# Each part's log goes to $OUT (or bench/results/device) as it finishes, so a
# part that runs out of time leaves the earlier ones.
#
#   run(command="bash bench/device.sh", carry=[".device"], timeout_s=570)
# Env: PARTS (train,parity,generate,attention), CUDA_PATH (/usr/local/cuda), STEPS (10),
# RUNS (3), NEW (64).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT" .device/run
PARTS="${PARTS:-train,parity,generate,attention}"
export CUDA_PATH="${CUDA_PATH:-/usr/local/cuda}"
export LD_LIBRARY_PATH="$CUDA_PATH/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$OUT/summary.txt"; }

for f in .device/bin/*.xz; do
    xz -dkc "$f" >".device/run/$(basename "$f" .xz)" && chmod +x ".device/run/$(basename "$f" .xz)"
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -n1; python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
} >"$OUT/machine.txt" 2>&1
stamp "machine: $(tr '\n' ' ' <"$OUT/machine.txt")"

if [[ ",$PARTS," == *,train,* ]]; then
    ANNEAL_BIN=.device/run/anneal KIT=.device/kit TOKENIZER_DIR=/nonexistent GSM8K=/nonexistent STEPS="${STEPS:-10}" \
        timeout 330 bash bench/train_gpu.sh >"$OUT/train_gpu.log" 2>&1
    stamp "train_gpu: exit $? — $(grep -E 'ratio=' "$OUT/train_gpu.log" | tail -n1)"
    cp bench/results/train_gpu/summary.json "$OUT/train_gpu_summary.json" 2>/dev/null
fi
if [[ ",$PARTS," == *,parity,* ]]; then
    for t in model_parity train_parity; do
        ANNEAL_SHARED=.device/shared timeout 240 ".device/run/$t" cuda --test-threads 1 --nocapture \
            >"$OUT/$t.log" 2>&1
        rc=$?
        stamp "$t (cuda): exit $rc — $(grep -E '^test result' "$OUT/$t.log" | tail -n1)$(
            grep -q 'CUDA test skipped' "$OUT/$t.log" && echo ' (SKIPPED: no NVIDIA driver)')"
    done
fi
if [[ ",$PARTS," == *,generate,* ]]; then
    model=bench/results/train_gpu/model
    [ -f "$model/config.json" ] || python3 bench/make_random_qwen2.py "$model" --shape qwen2.5-0.5b \
        --tokenizer-dir .device/kit/tokenizer >"$OUT/make_model.log" 2>&1
    ANNEAL_BIN=.device/run/anneal MODEL="$model" ANNEAL_SHARED=.device/shared DEVICE=cuda \
        RUNS="${RUNS:-3}" NEW="${NEW:-64}" timeout 200 bash bench/generate.sh >"$OUT/generate.log" 2>&1
    stamp "generate: exit $? — $(grep -E 'ratio_' "$OUT/generate.log" | tr '\n' ' ')"
fi
if [[ ",$PARTS," == *,attention,* ]]; then
    timeout 120 .device/run/train_parity attention_timing --nocapture >"$OUT/attention.log" 2>&1
    stamp "attention (anneal): exit $? — $(grep -E '^attention timing' "$OUT/attention.log" | tail -n1)"
    timeout 60 python3 bench/attention_torch.py >>"$OUT/attention.log" 2>&1
    stamp "attention (torch): exit $? — $(grep -E 'sdpa timing' "$OUT/attention.log" | tail -n1)"
fi
stamp "done"
