"""Turn GSM8K-style {question, answer} rows into chat samples with a separate final answer.

Rows that lack a `#### N` final answer are reported and dropped; nothing is written on error.
"""
import argparse
import json
import sys

p = argparse.ArgumentParser()
p.add_argument("--in", dest="inp", required=True)
p.add_argument("--out", required=True)
p.add_argument("--system", default="Solve the problem step by step, then give the final answer after '####'.")
a = p.parse_args()

kept, dropped = [], 0
with open(a.inp, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"{a.inp}:{n}: not JSON: {e}")
        reasoning, sep, final = row.get("answer", "").rpartition("####")
        if not sep or not final.strip():
            print(f"{a.inp}:{n}: no '#### answer'; dropped", file=sys.stderr)
            dropped += 1
            continue
        kept.append({
            "messages": [
                {"role": "system", "content": a.system},
                {"role": "user", "content": row["question"].strip()},
                {"role": "assistant", "content": row["answer"].strip()},
            ],
            "final_answer": final.strip().replace(",", ""),
            "reasoning_lines": len([l for l in reasoning.splitlines() if l.strip()]),
        })

with open(a.out, "w", encoding="utf-8") as g:
    for r in kept:
        g.write(json.dumps(r, ensure_ascii=False) + "\n")
print(f"prepared {len(kept)} samples, dropped {dropped}")
