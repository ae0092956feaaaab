#!/usr/bin/env bash
# Generation speed of SmolLM2-135M-Instruct (built by .ci/smollm2.sh) with
# `anneal model generate`: greedy, KV cache, GSM8K questions in the chat
# template, a fixed number of new tokens (eos ignored), batch 1 and batch 16.
# Reports generated tokens per second of generation time (weights load excluded),
# median of RUNS runs.
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
[ -x "$BIN" ] || die "$BIN not built (cargo build --release)"
[ -f "$MODEL/model.safetensors" ] || die "$MODEL missing (bash .ci/smollm2.sh)"

mapfile -t questions < <(python3 -c '
import json, sys
for line in list(open(sys.argv[1]))[:16]:
    print(json.loads(line)["question"].replace("\n", " "))' "$SHARED/data/gsm8k/test.jsonl")

out="bench/results/generate-$DEVICE"
mkdir -p "$out"
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
    echo "batch=$batch device=$DEVICE new_tokens_per_prompt=$NEW median_tokens_per_s=$(median "${rates[@]}")"
done
