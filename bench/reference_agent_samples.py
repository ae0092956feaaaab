"""Reference implementation of anneal's `agent_samples` kind, written from the
spec the way the original Python preparation scripts work (whole file in memory).

Used two ways:
  - tests compare anneal's output with this one's on pipelines/data/agent_traces.jsonl;
  - bench/data_stages.sh times it against `anneal exec-stage` on the same input.

Usage: reference_agent_samples.py --mode per_step|multiturn [--think-drop-prob P]
       [--seed S] --in TRACES --out SAMPLES
think_drop_prob other than 0 or 1 needs the `blake3` package (the draw is
blake3(seed_le64 || turn_le64 || question)[:8] as a little-endian u64, top 53 bits / 2^53).
"""
import argparse
import json
import struct


def wrap(tag, body):
    return f"<{tag}>\n{body}\n</{tag}>"


def render_docs(docs):
    return "<information>\n" + "\n\n".join(
        f"Document {i}:\nTitle: {d.get('title', '')}\nContent: {d.get('content', '')}" for i, d in enumerate(docs, 1)
    ) + "\n</information>"


def render(step):
    t = step["type"]
    if t == "reasoning":
        return wrap("think", step["content"])
    if t == "search":
        return wrap("search", step["query"])
    if t == "CorrectAnswer":
        return wrap("answer", step["content"])
    if t == "search_result":
        return render_docs(step["documents"])
    return wrap(t, step["content"])


def per_step(trace, a):
    steps = trace["trace"]
    results = [i for i, s in enumerate(steps) if s["type"] == "search_result"]
    out = []
    for k, s in enumerate(results):
        end = results[k + 1] if k + 1 < len(results) else len(steps)
        response = steps[s + 1:end]
        if not response:
            continue
        prompt = (f"Question: {trace['question']}\n\n" + "".join(render(x) + "\n\n" for x in steps[: s + 1])).strip()
        answer = "".join(render(x) + "\n\n" for x in response).strip()
        out.append({
            "data_source": "search_r1",
            "prompt": [{"role": "user", "content": prompt}],
            "ability": "search_reasoning",
            "extra_info": {"question": prompt, "answer": answer, "split_index": k, "total_splits": len(results)},
        })
    return out


def keep_think(seed, question, turn, p):
    if p <= 0:
        return True
    if p >= 1:
        return False
    import blake3

    h = blake3.blake3(struct.pack("<QQ", seed, turn) + question.encode()).digest()
    return (struct.unpack("<Q", h[:8])[0] >> 11) / 2**53 >= p


def turns_of(steps):
    turns, cur = [], {"reasoning": [], "parts": [], "result": None}
    for s in steps:
        t = s["type"]
        if t == "reasoning":
            cur["reasoning"].append(s["content"])
        elif t == "search":
            cur["parts"].append(wrap("search", s["query"]))
        elif t == "search_result":
            cur["result"] = render_docs(s["documents"])
            turns.append(cur)
            cur = {"reasoning": [], "parts": [], "result": None}
        elif t == "CorrectAnswer":
            cur["parts"].append(wrap("answer", s["content"]))
            turns.append(cur)
            cur = {"reasoning": [], "parts": [], "result": None}
        else:
            cur["parts"].append(wrap(t, s["content"]))
    if cur["reasoning"] or cur["parts"]:
        turns.append(cur)
    return turns


def multiturn(trace, a):
    q = trace["question"]
    turns = turns_of(trace["trace"])
    texts = []
    for i, t in enumerate(turns):
        blocks = ([wrap("think", "\n".join(t["reasoning"]))] if t["reasoning"] and keep_think(a.seed, q, i, a.think_drop_prob) else []) + t["parts"]
        texts.append("\n\n".join(blocks).strip())
    leading = 0
    while leading < len(turns) and turns[leading]["result"] is not None:
        leading += 1
    n = min(leading, len(turns) - 1) + 1 if turns else 0
    out = []
    for j in range(n):
        if not texts[j]:
            continue
        prompt = [{"role": "user", "content": q}]
        for i in range(j):
            prompt += [{"role": "assistant", "content": texts[i]}, {"role": "user", "content": turns[i]["result"]}]
        out.append({
            "data_source": "search_r1", "prompt": prompt, "ability": "search_reasoning", "answer": texts[j],
            "extra_info": {"question": q, "split_index": j, "total_splits": n, "turn_index": j, "num_assistant_turns": len(turns)},
        })
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["per_step", "multiturn"], required=True)
    ap.add_argument("--think-drop-prob", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    with open(a.inp, encoding="utf-8") as f:
        traces = [json.loads(l) for l in f if l.strip()]
    fn = per_step if a.mode == "per_step" else multiturn
    samples = [s for t in traces for s in fn(t, a)]
    with open(a.out, "w", encoding="utf-8") as g:
        for s in samples:
            g.write(json.dumps(s, ensure_ascii=False, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
