#!/usr/bin/env bash
# Ingestion and query speed against the Python stack, in one run:
#   1. the Rust side (benches/ingest.rs, one-shot measurement; the criterion runs are `cargo bench`),
#   2. the Python reference (benches/ingest_reference.py: safetensors + numpy) on the same zoo,
#   3. the ratios.
# Usage: scripts/bench-python.sh [N_ADAPTERS]   (default 1000; PYTHON=python3 to pick the interpreter)
# Skips the Python part, with a message, when Python with safetensors and numpy is not available.
set -euo pipefail
cd "$(dirname "$0")/.."
export PEFTDB_BENCH_ADAPTERS="${1:-${PEFTDB_BENCH_ADAPTERS:-1000}}"
PY="${PYTHON:-python3}"
OUT="${CARGO_TARGET_DIR:-target}/peftdb-bench"
mkdir -p "$OUT"
PEFTDB_BENCH_SUMMARY_ONLY=1 cargo bench --bench ingest
ZOO="$OUT/zoo-$PEFTDB_BENCH_ADAPTERS"
if ! command -v "$PY" >/dev/null || ! "$PY" -c 'import safetensors, numpy' 2>/dev/null; then
  echo "skipping the Python comparison: $PY with safetensors and numpy not found (pip install safetensors numpy)"
  exit 0
fi
"$PY" benches/ingest_reference.py "$ZOO" --json "$OUT/python.json"
"$PY" - "$OUT/rust.json" "$OUT/python.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))
n = r["adapters"]; mb = r["bytes"] / 1e6
print()
print(f"| {n} BERT-base LoRA adapters ({mb:.0f} MB) | adapters/s | MB/s | vs raw read |")
print("|---|---|---|---|")
print(f"| raw read (Rust, parallel) | {n / r['raw_read_s']:.0f} | {mb / r['raw_read_s']:.0f} | 1.00x |")
print(f"| peftdb ingest (read, validate, hash, TuPaTE, redb commit) | {n / r['ingest_s']:.1f} | {mb / r['ingest_s']:.0f} | {r['raw_read_s'] / r['ingest_s']:.2f}x |")
print(f"| Python safetensors + numpy (read + TuPaTE, no store) | {p['adapters'] / p['ingest_s']:.1f} | {p['bytes'] / 1e6 / p['ingest_s']:.0f} | {r['raw_read_s'] / p['ingest_s']:.2f}x |")
print(f"\npeftdb ingest is {p['ingest_s'] / r['ingest_s']:.2f}x the speed of the Python reference")
for k in ("10000", "100000"):
    rq, pq = r["query_s"][k], p["query_s"][k]
    rl = r.get("loop_query_s", {}).get(k, float("nan"))
    print(f"exact top-10 over {int(k):>6} x 384: peftdb index scan {rq * 1e3:.3f} ms/query (plain Rust loop {rl * 1e3:.3f}), numpy {pq * 1e3:.3f} ms/query (peftdb = {pq / rq:.2f}x numpy speed)")
PYEOF
