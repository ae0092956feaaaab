"""Extractive summaries for per-step agent samples: an offline baseline for the summarize step.

For each sample it writes `summary` in the summary format of prompts/summary.md:
  Question: <the question>
  <think_summary> the first sentence of each reasoning block </think_summary>
  <information_summary> for each retrieved document, the sentences that share a
  content word with the question or the latest search query, quoted verbatim </information_summary>
Nothing from the expected answer is used. Rows are streamed; output order follows input.
"""
import argparse
import json
import re

p = argparse.ArgumentParser()
p.add_argument("--in", dest="inp", required=True)
p.add_argument("--out", required=True)
p.add_argument("--max-quotes", type=int, default=6)
a = p.parse_args()

BLOCK = re.compile(r"<(think|search|information)>\n(.*?)\n</\1>", re.S)
DOC = re.compile(r"Document \d+:\nTitle: (.*?)\nContent: (.*?)(?=\n\nDocument \d+:\n|\Z)", re.S)
SENT = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"\w+", re.U)
STOP = set("a an the of in on at to for by with from and or is was were be been are who what which when where how did does do this that it its as".split())


def words(text):
    return {w.lower() for w in WORD.findall(text) if w.lower() not in STOP and len(w) > 2}


def summarize(prompt):
    question = prompt.split("\n\n", 1)[0].removeprefix("Question: ").strip()
    thoughts, query, docs = [], "", []
    for kind, body in BLOCK.findall(prompt):
        if kind == "think":
            first = SENT.split(body.strip(), 1)[0]
            if first:
                thoughts.append(first)
        elif kind == "search":
            query = body.strip()
        else:
            docs = DOC.findall(body)
    keys = words(question) | words(query)
    quotes = []
    for title, content in docs:
        for s in SENT.split(content.strip()):
            if s and words(s) & keys:
                quotes.append(f'"{s}" ({title.strip()})')
                break
    info = "\n".join(quotes[: a.max_quotes]) or "No retrieved document mentions the question."
    return (
        f"Question: {question}\n"
        f"<think_summary>{' '.join(thoughts) or 'No reasoning yet.'}</think_summary>\n"
        f"<information_summary>\n{info}\n</information_summary>"
    )


n = 0
with open(a.inp, encoding="utf-8") as f, open(a.out, "w", encoding="utf-8") as g:
    for line in f:
        if not line.strip():
            continue
        row = json.loads(line)
        row["summary"] = summarize(row["prompt"][0]["content"])
        g.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
print(f"summarized {n} samples")
