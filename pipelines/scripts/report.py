"""Side-by-side markdown report of the split statistics."""
import argparse
import json

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("stats", nargs="+", help="NAME=stats.json")
a = p.parse_args()

cols = [(s.split("=", 1)[0], json.load(open(s.split("=", 1)[1], encoding="utf-8"))) for s in a.stats]
keys = sorted({k for _, c in cols for k in c})
lines = ["| metric | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---|" * len(cols)]
lines += ["| " + k + " | " + " | ".join(str(c.get(k, "")) for _, c in cols) + " |" for k in keys]
open(a.out, "w", encoding="utf-8").write("\n".join(lines) + "\n")
print("\n".join(lines))
