#!/usr/bin/env python3
"""PyTorch + transformers counterpart of `anneal model generate --chat --ignore-eos`,
for bench/generate.sh.

What is measured: `model.generate` on the first B questions, each rendered as one
user message with the model's own chat template (`add_generation_prompt=True`,
no system message beyond what the template adds by itself) and tokenized without
special tokens, as anneal does (same token ids, checked against
`anneal model template --add-generation-prompt --json`). The batch is left-padded
(pad token = eos if the tokenizer has none). Greedy, KV cache, exactly N new
tokens per prompt (`min_new_tokens = max_new_tokens = N`, so eos never stops a
row, as with anneal's --ignore-eos). The timer covers only the `generate` call
(prefill of the prompts included; loading the weights and tokenizing excluded),
like anneal's `generate_seconds`; CUDA is synchronized before the timer stops.
One untimed warm-up call, then R timed calls.
Tokens/s = B * N / seconds, the definition of anneal's `tokens_per_second`.

Prints one JSON line on stdout:
  {"batch", "new", "tokens_per_s": [per run], "median", "torch", "threads", ...}

  python3 bench/generate_torch.py target/smollm2 --questions Q.txt --batch 16 \
      --new 64 --runs 5 --device cpu
--questions: a text file with one question per line, or a GSM8K .jsonl file
(its "question" fields, newlines replaced by spaces as bench/generate.sh does).
"""

import argparse
import json
import statistics
import sys
import time

try:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
except ImportError as e:
    sys.exit(
        f"generate_torch.py: {e}: PyTorch and transformers are needed for the comparison "
        "(pip install torch transformers), or run the benchmark with TORCH=0"
    )


def read_questions(path):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["question"].replace("\n", " ") for line in f if line.strip()]
        return [line.rstrip("\n") for line in f if line.strip()]


def main():
    hf_logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--questions", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--new", type=int, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    a = ap.parse_args()

    questions = read_questions(a.questions)
    if len(questions) < a.batch:
        sys.exit(f"generate_torch.py: {a.questions} has {len(questions)} questions, need {a.batch}")
    questions = questions[: a.batch]
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("generate_torch.py: --device cuda but torch.cuda.is_available() is false")

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    prompt_len = enc["input_ids"].shape[1]

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype))
    model.to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run():
        sync()
        t0 = time.perf_counter()
        out = model.generate(
            **enc,
            max_new_tokens=a.new,
            min_new_tokens=a.new,
            do_sample=False,
            use_cache=True,
            pad_token_id=tok.pad_token_id,
        )
        sync()
        secs = time.perf_counter() - t0
        new = out.shape[1] - prompt_len
        if new != a.new:
            sys.exit(f"generate_torch.py: generated {new} tokens per prompt, expected {a.new}")
        return secs

    with torch.inference_mode():
        run()  # warm-up, not timed
        rates = []
        for r in range(a.runs):
            secs = run()
            rates.append(a.batch * a.new / secs)
            print(
                f"run {r + 1}: {a.batch * a.new} tokens in {secs:.3f}s, {rates[-1]:.1f} tokens/s",
                file=sys.stderr,
            )
    print(
        json.dumps(
            {
                "batch": a.batch,
                "new": a.new,
                "tokens_per_s": rates,
                "median": statistics.median(rates),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "transformers": transformers.__version__,
                "device": str(device),
                "dtype": a.dtype,
                "prompt_tokens": enc["attention_mask"].sum(dim=1).tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
