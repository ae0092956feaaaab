#!/usr/bin/env bash
# Generation speed of SmolLM2-135M-Instruct (built by .ci/smollm2.sh) with
# `anneal model generate`: greedy, KV cache, GSM8K questions in the chat
# template, a fixed number of new tokens (eos ignored), batch 1 and batch 16.
# Reports generated tokens per second of generation time (weights load excluded),
# median of RUNS runs.
# In the same run, for each batch, the same prompts through PyTorch +
# transformers `generate` (bench/generate_torch.py: f32, greedy, KV cache,
# exactly NEW tokens, one untimed warm-up then RUNS timed calls), with the ratio
# of the medians anneal / PyTorch. TORCH=0 skips it; PYTHON picks the interpreter.
#
#   RUNS=5 NEW=64 DEVICE=cpu bench/generate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

RUNS="${RUNS:-5}"
NEW="${NEW:-64}"
DEVICE="${DEVICE:-cpu}"
BIN="${ANNEAL_BIN:-target/release/anneal}"
MODEL="${MODEL:-target/smollm2}"
SHARED="${ANNEAL_SHARED:-../shared}"
TORCH="${TORCH:-1}"
PYTHON="${PYTHON:-python3}"
[ -x "$BIN" ] || die "$BIN not built (cargo build --release)"
[ -f "$MODEL/model.safetensors" ] || die "$MODEL missing (bash .ci/smollm2.sh)"
if [ "$TORCH" != 0 ]; then
    "$PYTHON" -c 'import torch, transformers' 2>/dev/null ||
        die "the PyTorch comparison needs torch and transformers for $PYTHON (pip install torch transformers), or set TORCH=0 to skip it"
fi

mapfile -t questions < <(python3 -c '
import json, sys
for line in list(open(sys.argv[1]))[:16]:
    print(json.loads(line)["question"].replace("\n", " "))' "$SHARED/data/gsm8k/test.jsonl")

out="bench/results/generate-$DEVICE"
mkdir -p "$out"
printf '%s\n' "${questions[@]}" >"$out/questions.txt"
for batch in 1 16; do
    args=()
    for q in "${questions[@]:0:$batch}"; do args+=(-p "$q"); done
    rates=()
    for run in $(seq "$RUNS"); do
        "$BIN" model generate "$MODEL" --chat "${args[@]}" --max-new-tokens "$NEW" \
            --ignore-eos --device "$DEVICE" --json >"$out/b$batch-$run.json"
        rates+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens_per_second"])' "$out/b$batch-$run.json")")
    done
    log "batch $batch: tokens/s per run: ${rates[*]}"
    anneal_median="$(median "${rates[@]}")"
    echo "batch=$batch device=$DEVICE new_tokens_per_prompt=$NEW median_tokens_per_s=$anneal_median"
    [ "$TORCH" = 0 ] && continue
    "$PYTHON" bench/generate_torch.py "$MODEL" --questions "$out/questions.txt" --batch "$batch" \
        --new "$NEW" --runs "$RUNS" --device "$DEVICE" >"$out/torch-b$batch.json" 2>"$out/torch-b$batch.log" || {
        tail -n 20 "$out/torch-b$batch.log" >&2
        die "bench/generate_torch.py failed (batch $batch; log: $out/torch-b$batch.log)"
    }
    read -r torch_median torch_rates < <("$PYTHON" -c '
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(r["median"], " ".join("%.1f" % x for x in r["tokens_per_s"]), "(torch %s, %d threads)" % (r["torch"], r["threads"]))' "$out/torch-b$batch.json")
    log "batch $batch: PyTorch tokens/s per run: $torch_rates"
    echo "batch=$batch device=$DEVICE pytorch_median_tokens_per_s=$torch_median ratio_anneal_over_pytorch=$(awk -v a="$anneal_median" -v b="$torch_median" 'BEGIN { printf "%.3f", a / b }')"
done
