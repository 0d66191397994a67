#!/usr/bin/env python3
"""The README's table of the SmolLM2 zoo: one row per trained task of ZOO (default
examples/transfer-smollm2/zoo), with the MiniLM zoo's test accuracy (examples/transfer/zoo) beside it.
usage: zoo_table.py [ZOO] [MINILM_ZOO]"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
zoo = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "examples/transfer-smollm2/zoo")
mini = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "examples/transfer/zoo")
print("| task | best step / steps | dev | test | MiniLM zoo's test | minutes (1 thread) |")
print("|---|---|---|---|---|---|")
for t in sorted(os.listdir(zoo)):
    p = os.path.join(zoo, t, "train_report.json")
    if t.startswith(".") or not os.path.isfile(p):
        continue
    r = json.load(open(p))
    mp = os.path.join(mini, t, "train_report.json")
    m = f'{json.load(open(mp))["best"]["test_accuracy"]:.3f}' if os.path.isfile(mp) else "-"
    stop = " (plateau)" if r["stopped_early"] else ""
    b = r["best"]
    print(f'| {t} | {b["step"]} / {r["steps"]}{stop} | {b["dev_accuracy"]:.3f} | {b["test_accuracy"]:.3f} | {m} '
          f'| {round(r["seconds"] / 60)} |')
