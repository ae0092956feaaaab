#!/usr/bin/env bash
# Full fine-tuning throughput of SmolLM2-135M-Instruct (built by .ci/smollm2.sh)
# with the `train` stage on CPU: GSM8K train questions as chat samples, batch
# BATCH, STEPS optimizer steps (f32, AdamW). Reports the median over runs of
# the median per-step throughput in trained tokens (assistant tokens with a
# label; prompts go through forward and backward too but are not counted) and
# the peak RSS of the whole `anneal run` (the stage process included).
#
#   RUNS=3 STEPS=4 BATCH=4 bench/train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

RUNS="${RUNS:-3}"
STEPS="${STEPS:-4}"
BATCH="${BATCH:-4}"
BIN="$(pwd)/${ANNEAL_BIN:-target/release/anneal}"
MODEL="$(pwd)/${MODEL:-target/smollm2}"
SHARED="$(cd "${ANNEAL_SHARED:-../shared}" && pwd)"
[ -x "$BIN" ] || die "$BIN not built (cargo build --release)"
[ -f "$MODEL/model.safetensors" ] || die "$MODEL missing (bash .ci/smollm2.sh)"

work="bench/results/train"
rm -rf "$work" && mkdir -p "$work"
python3 - "$SHARED/data/gsm8k/train.jsonl" "$work/train.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in list(open(sys.argv[1]))[:256]]
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                         {"role": "assistant", "content": r["answer"]}]}) + "\n")
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
      finetuning_type: full
      learning_rate: 1.0e-5
      max_steps: $STEPS
      per_device_train_batch_size: $BATCH
      save_steps: 100000
      cutoff_len: 512
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
echo "steps=$STEPS batch=$BATCH median_trained_tokens_per_s=$(median "${rates[@]}") peak_rss_mb=$(median "${rss[@]}")"
