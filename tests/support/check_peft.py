"""Loads a LoRA adapter written by anneal with PEFT and compares it with anneal's merged model.

    python3 tests/support/check_peft.py BASE_DIR ADAPTER_DIR MERGED_DIR [BASE_DIR ADAPTER_DIR MERGED_DIR ...]

BASE_DIR is the model the adapter was trained on, ADAPTER_DIR anneal's PEFT
adapter (adapter_config.json + adapter_model.safetensors), MERGED_DIR the
merged checkpoint anneal wrote (merge_lora: true). Prints JSON: the largest
logit difference between PeftModel(base, adapter) and the merged model, and
between the base and the adapted model (the adapter must change something),
and the class transformers loaded. Exits non-zero when a checkpoint lacks a
tensor transformers expects or holds one it does not (which from_pretrained
would only warn about, initialising the missing ones at random). Given several
triples (one Python start for them all), it prints a JSON list, one report per
triple.
"""

import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    args = sys.argv[1:]
    if not args or len(args) % 3:
        sys.exit(__doc__)
    reports = [check(*args[i:i + 3]) for i in range(0, len(args), 3)]
    print(json.dumps(reports[0] if len(reports) == 1 else reports))


def check(base_dir, adapter_dir, merged_dir):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base_dir)
    text = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"
    ids = torch.tensor([tok(text)["input_ids"][:48]])
    load = dict(torch_dtype=torch.float32)
    def strict(path):
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **load)
        bad = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
        if bad or info.get("error_msgs"):
            sys.exit(f"{path}: transformers' loading info {bad} {info.get('error_msgs')}")
        return model.eval()

    base = strict(base_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    merged = strict(merged_dir)
    with torch.no_grad():
        merged_logits = merged(ids).logits
    config = peft_model.peft_config["default"]
    targets = config.target_modules or []
    params = config.target_parameters or []
    return {
        "tokens": ids.shape[1],
        "peft_vs_merged_max_abs": (peft_logits - merged_logits).abs().max().item(),
        "peft_vs_base_max_abs": (peft_logits - base_logits).abs().max().item(),
        "logit_scale": base_logits.abs().max().item(),
        "class": type(merged).__name__,
        "peft_type": peft_model.peft_config["default"].peft_type.value,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "target_parameters": sorted(params),
    }


if __name__ == "__main__":
    main()
