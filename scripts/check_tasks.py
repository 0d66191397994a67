#!/usr/bin/env python3
"""Compare two tasks folders (e.g. ../shared/tasks and a rebuild by scripts/build_tasks.py).

    python3 scripts/check_tasks.py A B

Per task (the folders of A and B holding a task.json) it prints:
  bytes     every file byte-identical (yes / no)
  rows      per split, the % of positions i where row i of A equals row i of B (text and label)
  sets      per split, whether the two hold the same rows as a multiset, whatever the order
  texts     % of A's distinct texts (all splits) found anywhere in B
  labels    whether the label sets (task.json labels and the labels in the data) agree
  task.json equal as JSON (key order included), else the differing keys
Exit status: 0 when every task is byte-identical in both, 1 otherwise. Standard library only.
"""
import collections
import json
import sys
from pathlib import Path

SPLITS = ("train", "dev", "test")
FILES = ("task.json",) + tuple(sp + ".jsonl" for sp in SPLITS)


def tasks(d):
    return {p.name for p in d.iterdir() if (p / "task.json").is_file()}


def read_rows(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append((r["text"], r["label"]))
    return rows


def read_task(d):
    meta = json.loads((d / "task.json").read_text(encoding="utf-8"), object_pairs_hook=list)
    splits = {sp: read_rows(d / f"{sp}.jsonl") if (d / f"{sp}.jsonl").is_file() else [] for sp in SPLITS}
    return meta, splits


def pct(a, b):
    return 100.0 * a / b if b else 100.0


def compare(a, b):
    ma, sa = read_task(a)
    mb, sb = read_task(b)
    identical = all((a / f).is_file() and (b / f).is_file() and (a / f).read_bytes() == (b / f).read_bytes()
                    for f in FILES)
    rows, sets = [], []
    for sp in SPLITS:
        x, y = sa[sp], sb[sp]
        eq = sum(1 for p, q in zip(x, y) if p == q)
        rows.append(f"{sp} {pct(eq, max(len(x), len(y))):.1f}% ({eq}/{len(x)} vs {len(y)})")
        sets.append(f"{sp} {'same' if collections.Counter(x) == collections.Counter(y) else 'differ'}")
    ta = {t for sp in SPLITS for t, _ in sa[sp]}
    tb = {t for sp in SPLITS for t, _ in sb[sp]}
    da, db = dict(ma), dict(mb)
    la_meta = [d["id"] if isinstance(d, dict) else dict(d)["id"] for d in da.get("labels", [])]
    lb_meta = [d["id"] if isinstance(d, dict) else dict(d)["id"] for d in db.get("labels", [])]
    la_data = {l for sp in SPLITS for _, l in sa[sp]}
    lb_data = {l for sp in SPLITS for _, l in sb[sp]}
    labels_ok = la_meta == lb_meta and la_data == lb_data
    if ma == mb:
        meta = "equal"
    else:
        keys = [k for k in dict.fromkeys(list(da) + list(db)) if da.get(k) != db.get(k)]
        if not keys and list(da) != list(db):
            keys = ["(key order)"]
        meta = "differ: " + ", ".join(keys)
    return identical, [
        f"  bytes     {'identical' if identical else 'differ'}",
        f"  rows      {'; '.join(rows)}",
        f"  sets      {'; '.join(sets)}",
        f"  texts     {pct(len(ta & tb), len(ta)):.1f}% of A's {len(ta)} distinct texts are in B",
        f"  labels    {'equal' if labels_ok else f'differ: A {la_meta} {sorted(la_data)} / B {lb_meta} {sorted(lb_data)}'}",
        f"  task.json {meta}",
    ]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().split("\n\n")[1])
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    for d in (a, b):
        if not d.is_dir():
            sys.exit(f"check_tasks: error: {d} is not a folder")
    na, nb = tasks(a), tasks(b)
    ok = na == nb
    for n in sorted(na - nb):
        print(f"{n}: only in A")
    for n in sorted(nb - na):
        print(f"{n}: only in B")
    same = 0
    for n in sorted(na & nb):
        identical, lines = compare(a / n, b / n)
        same += identical
        ok &= identical
        print(f"{n}: {'IDENTICAL' if identical else 'DIFFERENT'}")
        print("\n".join(lines))
    print(f"{same}/{len(na | nb)} tasks byte-identical")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
