"""Dataset statistics: sample count, words per turn, reasoning steps, answer range."""
import argparse
import json
import statistics

p = argparse.ArgumentParser()
p.add_argument("--in", dest="inp", required=True)
p.add_argument("--out", required=True)
a = p.parse_args()

rows = [json.loads(l) for l in open(a.inp, encoding="utf-8") if l.strip()]
if not rows:
    raise SystemExit(f"{a.inp}: no samples")
words = lambda role: [len(m["content"].split()) for r in rows for m in r["messages"] if m["role"] == role]
answers = [float(r["final_answer"]) for r in rows if r["final_answer"].replace(".", "", 1).lstrip("-").isdigit()]
stats = {
    "samples": len(rows),
    "question_words_mean": round(statistics.mean(words("user")), 2),
    "answer_words_mean": round(statistics.mean(words("assistant")), 2),
    "reasoning_steps_mean": round(statistics.mean(r["reasoning_lines"] for r in rows), 2),
    "numeric_answers": len(answers),
    "answer_min": min(answers) if answers else None,
    "answer_max": max(answers) if answers else None,
}
with open(a.out, "w", encoding="utf-8") as g:
    json.dump(stats, g, indent=2, sort_keys=True)
    g.write("\n")
print(json.dumps(stats))
