#!/usr/bin/env bash
# Fetch the test model if needed, then benchmark the engine against PyTorch + PEFT (when importable by
# $PYTHON, default python3): `cargo bench --bench engine` (forward 32x64, LoRA training step; pass
# `none` to skip the criterion part), then whole CLI runs side by side with benches/torch_cli_reference.py:
# `peftdb eval` of the bare model on bbc_topic test and `peftdb train` of a 16-shot LoRA, 100 steps, on
# movie_sentiment (skip with PEFTDB_BENCH_CLI=0). Prints each time and the ratio candle / PyTorch, then
# both commands again with `--matmul bf16` and their ratio to the f32 runs.
#
# PEFTDB_BENCH_VENV=DIR makes (once) a virtual environment in DIR with torch, transformers and peft from
# PyPI and uses its python (PyPI's Linux torch wheel pulls in the CUDA libraries: about 3 GB).
# Tasks come from $PEFTDB_TASKS (default ../shared/tasks next to the repository, else /work/shared/tasks).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="$("$ROOT/scripts/fetch-model.sh")"
if [[ -n "${PEFTDB_BENCH_VENV:-}" ]]; then
  if [[ ! -x "$PEFTDB_BENCH_VENV/bin/python" ]] || ! "$PEFTDB_BENCH_VENV/bin/python" -c 'import torch, transformers, peft' 2>/dev/null; then
    python3 -m venv "$PEFTDB_BENCH_VENV"
    "$PEFTDB_BENCH_VENV/bin/pip" install --quiet torch transformers peft
  fi
  export PYTHON="$PEFTDB_BENCH_VENV/bin/python"
fi
PY="${PYTHON:-python3}"
export PYTHON="$PY"
cd "$ROOT"
echo "load before: $(uptime)"
cargo bench --bench engine "$@"
[[ "${PEFTDB_BENCH_CLI:-1}" == "0" ]] && exit 0
if ! "$PY" -c 'import torch, transformers, peft' 2>/dev/null; then
  echo "CLI comparison skipped: $PY cannot import torch, transformers and peft"
  exit 0
fi
TASKS="${PEFTDB_TASKS:-}"
if [[ -z "$TASKS" ]]; then
  for d in "$ROOT/../shared/tasks" /work/shared/tasks; do [[ -d "$d" ]] && TASKS="$d" && break; done
fi
[[ -d "$TASKS/bbc_topic" && -d "$TASKS/movie_sentiment" ]] || { echo "CLI comparison skipped: no tasks at '$TASKS'"; exit 0; }
cargo build --release --bin peftdb
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/peftdb"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
secs() { python3 -c 'import sys; print(float(sys.argv[2]) - float(sys.argv[1]))' "$@"; }

t0=$(date +%s.%N)
"$BIN" eval --model "$MODEL" --task "$TASKS/bbc_topic" --split test --json > "$OUT/eval.json"
t1=$(date +%s.%N)
c_eval=$(secs "$t0" "$t1")
p_eval_json=$("$PY" "$ROOT/benches/torch_cli_reference.py" eval "$MODEL" "$TASKS/bbc_topic")
echo "eval bbc_topic test (bare model): peftdb $(printf %.2f "$c_eval") s, accuracy $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accuracy"])' "$OUT/eval.json")"
echo "  pytorch: $p_eval_json"
p_eval=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$p_eval_json")
echo "  ratio peftdb/pytorch: $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$c_eval" "$p_eval")"

t0=$(date +%s.%N)
"$BIN" train --model "$MODEL" --task "$TASKS/movie_sentiment" --method lora --k 16 --steps 100 \
  --patience 1000 --out "$OUT/train" --json > "$OUT/train.json"
t1=$(date +%s.%N)
c_train=$(secs "$t0" "$t1")
test_evals=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(1 if r["best"]["step"] == r["early"]["step"] else 2)' "$OUT/train/train_report.json" 2>/dev/null || echo 1)
p_train_json=$("$PY" "$ROOT/benches/torch_cli_reference.py" train "$MODEL" "$TASKS/movie_sentiment" 16 100 "$test_evals")
echo "train movie_sentiment LoRA 16-shot 100 steps: peftdb $(printf %.2f "$c_train") s ($test_evals test evaluation(s))"
echo "  pytorch: $p_train_json"
p_train=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$p_train_json")
echo "  ratio peftdb/pytorch: $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$c_train" "$p_train")"

# The same two commands with the frozen products in bf16 (`--matmul bf16`), against the f32 runs above.
t0=$(date +%s.%N)
"$BIN" eval --model "$MODEL" --task "$TASKS/bbc_topic" --split test --matmul bf16 --json > "$OUT/eval16.json"
t1=$(date +%s.%N)
h_eval=$(secs "$t0" "$t1")
acc16=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["accuracy"])' "$OUT/eval16.json")
echo "eval, --matmul bf16 (AVX512-BF16: $(grep -qw avx512_bf16 /proc/cpuinfo && echo yes || echo no)): $(printf %.2f "$h_eval") s, accuracy $acc16; ratio to f32 peftdb $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$h_eval" "$c_eval"), to pytorch $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$h_eval" "$p_eval")"
t0=$(date +%s.%N)
"$BIN" train --model "$MODEL" --task "$TASKS/movie_sentiment" --method lora --k 16 --steps 100 \
  --patience 1000 --matmul bf16 --out "$OUT/train16" --json > "$OUT/train16.json"
t1=$(date +%s.%N)
h_train=$(secs "$t0" "$t1")
test16=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["best"].get("test_accuracy"))' "$OUT/train16/train_report.json" 2>/dev/null || echo "?")
test32=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["best"].get("test_accuracy"))' "$OUT/train/train_report.json" 2>/dev/null || echo "?")
echo "train, --matmul bf16: $(printf %.2f "$h_train") s, best test accuracy $test16 (f32: $test32); ratio to f32 peftdb $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$h_train" "$c_train"), to pytorch $(python3 -c 'import sys; print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}x")' "$h_train" "$p_train")"
echo "load after: $(uptime)"
