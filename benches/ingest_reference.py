#!/usr/bin/env python3
"""Python reference for benches/ingest.rs: the same work with safetensors + numpy.

For every adapter folder of the zoo: read adapter_config.json and adapter_model.safetensors
(safetensors.numpy.load_file), then compute the TuPaTE embedding: per Transformer layer, the layer's
tensors sorted by their name relative to the layer, flattened row-major and concatenated; averaged over
layers. Then nearest-task queries: numpy brute-force cosine top-10 over 10k and 100k embeddings of
dimension 384 (100 queries, unit-norm rows, one matrix-vector product per query).

Usage: ingest_reference.py ZOO_DIR [--json OUT]
Exits 2 with a message when safetensors or numpy is missing.
"""
import json
import os
import re
import sys
import time

try:
    import numpy as np
    from safetensors.numpy import load_file
except ImportError as e:  # pragma: no cover
    print(f"skipping the Python reference: {e} (pip install safetensors numpy)", file=sys.stderr)
    sys.exit(2)

LAYER = re.compile(r"(?:^|\.)(?:encoder\.layer|layers|block|h)\.(\d+)\.(.+)$")


def tupate(tensors):
    layers = {}
    for name, t in tensors.items():
        m = LAYER.search(name)
        if m:
            layers.setdefault(int(m.group(1)), []).append((m.group(2), t))
    acc = None
    for _, entries in sorted(layers.items()):
        entries.sort(key=lambda e: e[0])
        v = np.concatenate([t.astype(np.float32, copy=False).ravel() for _, t in entries])
        acc = v.astype(np.float64) if acc is None else acc + v
    return (acc / len(layers)).astype(np.float32)


def adapter_dirs(zoo):
    out = []
    for root, _dirs, files in os.walk(zoo):
        if "adapter_config.json" in files:
            out.append(root)
    out.sort()
    return out


def ingest(zoo):
    dirs = adapter_dirs(zoo)
    nbytes = 0
    embs = []
    t0 = time.perf_counter()
    for d in dirs:
        with open(os.path.join(d, "adapter_config.json"), "rb") as f:
            cfg = f.read()
            json.loads(cfg)
        side = os.path.join(d, "peftdb.json")
        if os.path.exists(side):
            with open(side, "rb") as f:
                s = f.read()
                json.loads(s)
            nbytes += len(s)
        p = os.path.join(d, "adapter_model.safetensors")
        nbytes += len(cfg) + os.path.getsize(p)
        tensors = load_file(p)
        embs.append(tupate(tensors))
    return len(dirs), nbytes, time.perf_counter() - t0


def embeddings(n, dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.random((n, dim), dtype=np.float32) - 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def query(n, dim=384, nq=100):
    rows = embeddings(n, dim, 7)
    qs = embeddings(nq, dim, 99)
    t0 = time.perf_counter()
    for q in qs:
        s = rows @ q
        top = np.argpartition(-s, 10)[:10]
        top[np.argsort(-s[top])]
    return (time.perf_counter() - t0) / nq


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    zoo = sys.argv[1]
    out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    ingest(zoo)  # warm-up pass (page cache, imports), like the Rust side
    n, nbytes, secs = ingest(zoo)
    mb = nbytes / 1e6
    print(f"python ingest (read + TuPaTE) {n} adapters, {mb:.1f} MB: {secs:.2f} s = "
          f"{n / secs:.1f} adapters/s, {mb / secs:.1f} MB/s")
    q = {}
    for nq in (10_000, 100_000):
        q[str(nq)] = query(nq)
        print(f"python numpy brute-force cosine top-10 over {nq:>6} x 384: {q[str(nq)] * 1e3:.3f} ms/query")
    if out:
        with open(out, "w") as f:
            json.dump({"adapters": n, "bytes": nbytes, "ingest_s": secs, "query_s": q,
                       "numpy": np.__version__}, f)


if __name__ == "__main__":
    main()
