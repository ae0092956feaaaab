#!/usr/bin/env python3
"""Checks a LLaMA-Factory ShareGPT export the way LLaMA-Factory reads it
(SharegptDatasetConverter and FunctionFormatter), stdlib only:

    python3 check_llamafactory.py DIR      # DIR holds dataset_info.json and the files it names

Every dataset_info.json entry: formatting "sharegpt", the columns and tags below.
Every row: roles alternate human|observation (even positions) and gpt|function_call
(odd positions; a leading "system" message is taken as the system prompt), an even,
non-zero count, no empty value, each function_call value JSON {name, arguments:
object} or a list of them after an optional <think>...</think>, system a string and
tools a JSON string of a list ("" = no tools) when present. Prints
{"conversations", "turns", "invalid": ["index: reason"], "roles"}; exit 1 if invalid.
"""
import json, os, re, sys

COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def row_problem(row, strip_system, roles):
    msgs = row.get("conversations") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        return "conversations is not a non-empty list of objects"
    for m in msgs:
        roles[str(m.get("from"))] = roles.get(str(m.get("from")), 0) + 1
    if strip_system and msgs[0].get("from") == "system":
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        who, v = m.get("from"), m.get("value")
        if who not in (("human", "observation"), ("gpt", "function_call"))[i % 2]:
            return f"message {i}: role {who!r} at an {('even', 'odd')[i % 2]} position"
        if not isinstance(v, str) or not v.strip():
            return f"message {i}: empty or non-string value"
        if who == "function_call":
            try:
                calls = json.loads(THINK.sub("", v, count=1))
            except ValueError:
                return f"message {i}: function_call value is not JSON"
            calls = calls if isinstance(calls, list) else [calls]
            if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                    and isinstance(c.get("arguments"), dict) for c in calls):
                return f"message {i}: function_call is not {{name, arguments: object}}"
    if len(msgs) % 2:
        return f"odd message count {len(msgs)} (must end with gpt or function_call)"
    if "system" in row and not isinstance(row["system"], str):
        return "system is not a string"
    tools = row.get("tools", "")
    try:
        if tools != "" and not isinstance(json.loads(tools), list):
            raise ValueError
    except (TypeError, ValueError):
        return "tools is not a JSON string of a list"
    return None


def main(d):
    info = json.load(open(os.path.join(d, "dataset_info.json"), encoding="utf-8"))
    out = {"conversations": 0, "turns": 0, "invalid": [], "roles": {}}
    for name, e in info.items():
        pre = f"{name}/" if len(info) > 1 else ""
        bad = [k for k, v in COLUMNS.items() if e.get("columns", {}).get(k) != v]
        bad += [k for k, v in e.get("tags", {}).items() if TAGS.get(k) != v]
        if e.get("formatting") != "sharegpt" or bad:
            out["invalid"].append(f"{pre}entry: formatting {e.get('formatting')!r}, wrong {bad}")
            continue
        path = os.path.join(d, e["file_name"])
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(l) for l in f if l.strip()] if path.endswith(".jsonl") else json.load(f)
        for i, row in enumerate(rows):
            p = row_problem(row, "system_tag" in e.get("tags", {}), out["roles"])
            out["conversations"] += 1
            msgs = row.get("conversations") if isinstance(row, dict) else None
            out["turns"] += len(msgs) if isinstance(msgs, list) else 0
            if p:
                out["invalid"].append(f"{pre}{i}: {p}")
    print(json.dumps(out, ensure_ascii=False))
    return 1 if out["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
