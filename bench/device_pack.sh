#!/usr/bin/env bash
# Packs what bench/device.sh needs on a GPU machine that has no Rust toolchain
# and no network into `.device/` (git-ignored), to be named in the device
# tool's `carry`:
#   .device/bin/{anneal,train_parity,model_parity}.xz  --features cuda builds,
#       stripped and xz-compressed (the carry limit is 64 MiB in all)
#   .device/shared/fixtures/tiny-{qwen2,llama}   the references the tests read
#   .device/shared/data/gsm8k/test.jsonl         16 questions for the generation bench
#   .device/kit/                                 bench/results/train_gpu_kit
#
#   bench/device_pack.sh          # build (release, cuda) and pack
# Env: CARGO_TARGET_DIR (target), SHARED (../shared), CUDARC_CUDA_VERSION (13000).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

SHARED="${SHARED:-../shared}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
target="${CARGO_TARGET_DIR:-target}"
out=.device
[ -d "$SHARED/fixtures" ] || die "$SHARED/fixtures missing (set SHARED)"
command -v xz >/dev/null || die "xz not found (apt-get install xz-utils)"

log "building anneal and the parity tests with --features cuda (release) ..."
cargo build --release --locked --features cuda -p anneal
tests_json="$(cargo test --release --locked --features cuda -p anneal-stages \
    --test train_parity --test model_parity --no-run --message-format=json 2>/dev/null)"
exe_of() {
    printf '%s\n' "$tests_json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1" | tail -n1
}

rm -rf "$out" && mkdir -p "$out/bin" "$out/shared/fixtures" "$out/shared/data/gsm8k"
for pair in "anneal:$target/release/anneal" "train_parity:$(exe_of train_parity)" \
    "model_parity:$(exe_of model_parity)"; do
    name="${pair%%:*}" src="${pair#*:}"
    [ -x "$src" ] || die "no executable for $name ($src)"
    strip -o "$out/bin/$name" "$src"
    xz -T0 -6 "$out/bin/$name"
done
for f in tiny-qwen2 tiny-llama; do cp -r "$SHARED/fixtures/$f" "$out/shared/fixtures/"; done
head -n 16 "$SHARED/data/gsm8k/test.jsonl" >"$out/shared/data/gsm8k/test.jsonl"
PREPARE_ONLY=1 bash bench/train_gpu.sh >/dev/null
cp -r bench/results/train_gpu_kit "$out/kit"
chmod -R u+w "$out"
echo "packed $out: $(du -sh "$out" | cut -f1) (carry limit 64 MiB with the working tree)"
du -h "$out"/bin/*
