#!/usr/bin/env python3
"""The README's side-by-side of two transfer studies (`peftdb experiment transfer` reports): per target, the
bare model, the oracle source applied unchanged and its gain (report section 1), and suggest's answer and
LIMITED few-shot from it against scratch (section 2), then the means. Reads only the two report.md files.
usage: compare_transfer.py [A_REPORT] [B_REPORT] (default: examples/transfer/report.md for MiniLM,
examples/transfer-smollm2/report.md for SmolLM2)"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "examples/transfer/report.md")
B = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "examples/transfer-smollm2/report.md")
NAMES = ("MiniLM", "SmolLM2") if len(sys.argv) <= 3 else tuple(sys.argv[3].split(","))


def table(md, heading):
    """Rows (dicts by column name) of the first markdown table after the line starting with `heading`."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(heading))
    rows, cols = [], None
    for l in lines[start + 1:]:
        if l.startswith("## ") or l.startswith("### "):
            break
        if not l.startswith("|"):
            if cols:
                break
            continue
        cells = [c.strip() for c in l.strip().strip("|").split("|")]
        if cols is None:
            cols = cells
        elif not set(l) <= set("|-: "):
            rows.append(dict(zip(cols, cells)))
    return rows


def num(s):
    """The leading signed number of a cell ('+9.2 +- 3.3' -> 9.2), None for '-' or empty."""
    m = re.match(r"^[+-]?\d+(\.\d+)?", s or "")
    return float(m.group(0)) if m else None


def study(path):
    md = open(path).read()
    zero = {r["target"]: r for r in table(md, "## 1.")}
    answer = {r["target"]: r for r in table(md, "## 2.")}
    seeds = re.search(r"seeds \[([0-9, ]*)\] \(final, scratch\)", md)
    return zero, answer, (seeds.group(1) if seeds else "?")


def mean(xs):
    xs = [x for x in xs if x is not None]
    return (sum(xs) / len(xs), len(xs)) if xs else (float("nan"), 0)


a, b = study(A), study(B)
targets = sorted(set(a[0]) | set(b[0]))
head = "| target |"
for n in NAMES:
    head += f" {n} bare | oracle source: acc (gain) | answer - bare | few-shot: answer - scratch |"
print(head)
print("|---|" + "---:|---|---:|---:|" * 2)
for t in targets:
    row = f"| {t} |"
    for zero, answer, _ in (a, b):
        z, s = zero.get(t), answer.get(t)
        if z is None:
            row += " - | - | - | - |"
            continue
        mark = " **T**" if z["transfer target"] == "yes" else ""
        row += f' {z["bare"]} | {z["oracle source (a)"]}: {z["oracle acc"]} ({num(z["gain +- SE"]):+.1f}){mark} |'
        row += f' {s["answer - bare"] if s else "-"} | {s["diff +- SE"] if s else "-"} |'
    print(row)
print()
for name, (zero, answer, seeds) in zip(NAMES, (a, b)):
    tt = [t for t, z in zero.items() if z["transfer target"] == "yes"]
    bare, n = mean(num(z["bare"]) for z in zero.values())
    gain, _ = mean(num(z["gain +- SE"]) for z in zero.values())
    ans_tt, n_tt = mean(num(answer[t]["answer - bare"]) for t in tt if t in answer)
    ans_all, n_all = mean(num(r["answer - bare"]) for r in answer.values())
    fs_tt, n_fs = mean(num(answer[t]["diff +- SE"]) for t in tt if t in answer)
    worst = min(((num(r["answer - bare"]), t) for t, r in answer.items()), default=(None, "-"))
    print(f"- {name} (seeds {seeds}): {n} targets, mean bare {bare:.1f}, mean oracle gain {gain:+.1f}; "
          f"{len(tt)} transfer targets; answer - bare {ans_tt:+.1f} on the {n_tt} transfer targets with an "
          f"answer, {ans_all:+.1f} on all {n_all}; worst {worst[1]} {worst[0]:+.1f}; few-shot answer - scratch "
          f"{fs_tt:+.1f} on {n_fs} transfer targets (means of the rounded cells)"
          if worst[0] is not None else f"- {name}: {n} targets, mean bare {bare:.1f}, mean oracle gain "
          f"{gain:+.1f}; {len(tt)} transfer targets; no answers yet")
