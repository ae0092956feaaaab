#!/usr/bin/env bash
# The GPU code paths without an NVIDIA GPU. With the developer feature
# `gpu-on-wgpu`, `device: cuda` runs on burn's wgpu backend instead of its CUDA
# backend: the same cubecl kernels, fusion and autotune, another compiler
# (WGSL instead of NVRTC) and no bf16. Here it runs over Mesa's lavapipe, a
# Vulkan driver on the CPU (`apt-get install mesa-vulkan-drivers`).
#
#   1. the parity tests' `cuda` modules: logits and loss of both tiny fixtures
#      against transformers; a full and a LoRA training step against torch and
#      PEFT (bf16 is skipped: wgpu has none);
#   2. one pipeline run twice, with `device: cpu` and with `device: cuda`:
#      full training of a Qwen3-shaped model (detailed metrics, checkpoints),
#      DoRA on top (dropout 0, merged), sampled generation (llm_map, backend local), teacher-forced and
#      GSM8K evaluation. Losses, gradient norms, weights and generated text
#      are compared between the two;
#   3. the full training stage on `device: cuda` again, killed (SIGKILL) after
#      its step-2 checkpoint and run again: it must resume from that
#      checkpoint and end with the weights of the uninterrupted run.
#
#   bash bench/gpu_on_wgpu.sh   # pipeline in bench/gpu_on_wgpu.yaml
# Env: CARGO_TARGET_DIR (target-wgpu beside the repo, so the normal build is
# left alone), ANNEAL_SHARED (../shared), WORK (a temp dir).
# Lavapipe refuses buffers over 128 MiB (maxStorageBufferRange), so the
# pipeline keeps sequences short; a real GPU has no such limit.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/../target-wgpu}"
export ANNEAL_SHARED="${ANNEAL_SHARED:-$repo/../shared}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
WORK="${WORK:-$(mktemp -d)}"
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
    echo "no lavapipe Vulkan driver: apt-get install mesa-vulkan-drivers" >&2
    exit 2
fi

echo "== 1. parity tests on wgpu"
# A failure here is reported (with its assertion) and parts 2 and 3 still run;
# the script then exits 1.
parity_failed=0
for t in model_parity train_parity; do
    cargo test --locked -p anneal-stages --features gpu-on-wgpu --test "$t" cuda \
        -- --test-threads 1 --nocapture 2>&1 |
        grep -E '^(tiny|test |test result)|panicked|assertion| *(left|right):' ||
        parity_failed=1
done

echo "== 2. one pipeline, device cpu and device cuda (= wgpu)"
cargo build --locked --features gpu-on-wgpu --bin anneal
bin="$CARGO_TARGET_DIR/debug/anneal"
python3 - "$repo/pipelines/data/gsm8k_sample.jsonl" bench/gpu_on_wgpu.yaml "$WORK" <<'EOF'
import json, os, sys
src, yaml, work = sys.argv[1:]
rows = [json.loads(l) for l in open(src)]
chats = [json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                  {"role": "assistant", "content": r["answer"]}]}) for r in rows]
pipeline = open(yaml).read()
for dev in ["cpu", "cuda"]:
    d = os.path.join(work, dev)
    os.makedirs(d + "/data", exist_ok=True)
    open(d + "/data/train.jsonl", "w").write("\n".join(chats[:48]) + "\n")
    open(d + "/data/val.jsonl", "w").write("\n".join(chats[48:]) + "\n")
    open(d + "/data/gsm.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows[:12]))
    open(d + "/prompt.md", "w").write("Solve this problem: {question}\n")
    open(d + "/p.yaml", "w").write(pipeline.replace("DEVICE", dev))
EOF
for dev in cpu cuda; do
    (cd "$WORK/$dev" && /usr/bin/time -f "$dev: %e s" "$bin" run -q p.yaml)
done
python3 - "$WORK" <<'EOF'
import json, sys
import numpy as np
from safetensors.numpy import load_file
work = sys.argv[1]
cpu, gpu = f"{work}/cpu/work", f"{work}/cuda/work"
bad = []
def check(what, worst, tol):
    print(f"{what}: {worst:.3g} (tolerance {tol:g})")
    if not worst <= tol:
        bad.append(what)
def rel(a, b):
    return abs(a - b) / max(abs(a), 1e-12)
def leaves(v, p=""):
    if isinstance(v, dict):
        for k, x in v.items():
            yield from leaves(x, f"{p}.{k}")
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield p, v
a = [json.loads(l) for l in open(f"{cpu}/phase1.jsonl")]
b = [json.loads(l) for l in open(f"{gpu}/phase1.jsonl")]
assert len(a) == len(b) == 6, (len(a), len(b))
for k in ["loss", "grad_norm", "eval_loss"]:
    check(f"phase1 {k}, worst relative difference over steps",
          max((rel(x[k], y[k]) for x, y in zip(a, b) if k in x), default=0.0), 1e-5)
worst = max(rel(v, dict(leaves(y[s]))[n]) for x, y in zip(a, b)
            for s in ["train_detail", "eval_detail"] if s in x for n, v in leaves(x[s]))
check("phase1 detailed metrics, worst relative difference", worst, 1e-4)
for f, tol in [("phase1/model.safetensors", 1e-5), ("phase2/model.safetensors", 1e-5),
               ("phase2/adapter/adapter_model.safetensors", 1e-5)]:
    x, y = load_file(f"{cpu}/{f}"), load_file(f"{gpu}/{f}")
    assert x.keys() == y.keys(), f
    check(f"{f}, worst absolute weight difference",
          max(float(np.abs(x[k].astype(np.float32) - y[k].astype(np.float32)).max()) for k in x), tol)
x, y = json.load(open(f"{cpu}/tf.json")), json.load(open(f"{gpu}/tf.json"))
check("teacher-forced loss, relative difference", rel(x["metrics"]["loss"], y["metrics"]["loss"]), 1e-5)
for f in ["gen.jsonl", "gsm_results.jsonl"]:
    same = open(f"{cpu}/{f}").read() == open(f"{gpu}/{f}").read()
    print(f"{f} (generated text): {'identical' if same else 'DIFFERENT'}")
    if not same:
        bad.append(f)
print("FAIL: " + ", ".join(bad) if bad else "PASS: device cuda (on wgpu) matches device cpu")
sys.exit(1 if bad else 0)
EOF

echo "== 3. killed after a checkpoint on device cuda, then resumed"
r="$WORK/cuda-killed"
mkdir -p "$r"
cp -r "$WORK/cuda/data" "$WORK/cuda/p.yaml" "$WORK/cuda/prompt.md" "$r/"
cd "$r"
"$bin" run -q p.yaml -s phase1 >killed.log 2>&1 &
pid=$!
for _ in $(seq 3000); do
    [ -n "$(find .anneal -path '*global_step_2/state.json' 2>/dev/null)" ] && break
    sleep 0.1
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
sleep 0.5
if [ -e work/phase1/model.safetensors ]; then
    echo "FAIL: the run finished before it was killed"
    exit 1
fi
"$bin" run -q p.yaml -s phase1
"$bin" status p.yaml --json >status.json
python3 - "$r" "$WORK/cuda" <<'EOF'
import json, sys
import numpy as np
from safetensors.numpy import load_file
killed, whole = sys.argv[1:]
st = {s["stage"]: s for s in json.load(open(f"{killed}/status.json"))["stages"]}
resumed = st["phase1"]["report"]["resumed_from_step"]
x = load_file(f"{killed}/work/phase1/model.safetensors")
y = load_file(f"{whole}/work/phase1/model.safetensors")
worst = max(float(np.abs(x[k] - y[k]).max()) for k in x)
# Bit-exact on lavapipe; autotune may pick other kernels in another process.
ok = resumed >= 2 and worst <= 1e-6
print(f"resumed from step {resumed}; worst absolute weight difference to the "
      f"uninterrupted run {worst:.3g} (tolerance 1e-6)")
print("PASS: killed and resumed on device cuda (on wgpu)" if ok else "FAIL: resume")
sys.exit(0 if ok else 1)
EOF
if [ "$parity_failed" != 0 ]; then
    echo "FAIL: part 1 (parity tests on wgpu), above"
    exit 1
fi
