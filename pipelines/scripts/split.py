"""Deterministic train/validation split: a sample's side depends on a hash of its content and the seed."""
import argparse
import hashlib
import json

p = argparse.ArgumentParser()
p.add_argument("--in", dest="inp", required=True)
p.add_argument("--val-fraction", type=float, required=True)
p.add_argument("--seed", type=int, required=True)
p.add_argument("--train", required=True)
p.add_argument("--val", required=True)
a = p.parse_args()
if not 0.0 < a.val_fraction < 1.0:
    raise SystemExit(f"--val-fraction must be between 0 and 1, got {a.val_fraction}")

counts = {"train": 0, "val": 0}
with open(a.inp, encoding="utf-8") as f, open(a.train, "w", encoding="utf-8") as tr, open(a.val, "w", encoding="utf-8") as va:
    for line in f:
        h = hashlib.blake2b(f"{a.seed}:{line}".encode(), digest_size=8).digest()
        side = "val" if int.from_bytes(h, "big") / 2**64 < a.val_fraction else "train"
        (va if side == "val" else tr).write(line)
        counts[side] += 1
print(f"train {counts['train']}, val {counts['val']}")
