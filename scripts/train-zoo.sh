#!/usr/bin/env bash
# Train the transfer zoo: one LoRA (r=8, alpha 16, query+value) per task of ../shared/tasks on its whole
# train split, until dev accuracy plateaus (evaluated every 25 steps of batch 16, stopped after 4
# evaluations without a better dev accuracy, at most 600 steps), with `peftdb train`: the product's own
# training. Each task's OUT/<task>/train_report.json records dev and test accuracy (full splits) and the
# wall-clock seconds. Resumable: a task whose report exists is skipped; a killed task is retrained.
# Several workers may run at once (each takes a task by creating OUT/.lock-<task> with its pid; a lock
# whose process is gone is taken over), e.g. two single-threaded workers on 2 cores:
#   RAYON_NUM_THREADS=1 bash scripts/train-zoo.sh & RAYON_NUM_THREADS=1 REVERSE=1 bash scripts/train-zoo.sh
# Usage: bash scripts/train-zoo.sh [OUT] [TASKS_DIR]     (defaults: examples/transfer/zoo ../shared/tasks)
# The settings above are the MiniLM zoo's; the environment overrides them for other models
# (scripts/train-zoo-smollm2.sh): PEFTDB_MODEL, TARGETS, LR, BATCH, STEPS, EVAL_EVERY, PATIENCE, MAX_LEN,
# and TASK_LIST (task names, space-separated, in the order to train them; default: every task folder).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-examples/transfer/zoo}"
TASKS="${2:-../shared/tasks}"
P="${PEFTDB_BIN:-target/release/peftdb}"
MODEL="${PEFTDB_MODEL:-models/all-MiniLM-L6-v2}"
mkdir -p "$OUT"
if [[ -n "${TASK_LIST:-}" ]]; then
  dirs=()
  for t in $TASK_LIST; do dirs+=("$TASKS/$t/"); done
else
  dirs=("$TASKS"/*/)
fi
if [[ -n "${REVERSE:-}" ]]; then
  for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do rev+=("${dirs[$i]}"); done
  dirs=("${rev[@]}")
fi
for dir in "${dirs[@]}"; do
  t="$(basename "$dir")"
  [[ -f "$OUT/$t/train_report.json" ]] && continue
  lock="$OUT/.lock-$t"
  if ! mkdir "$lock" 2>/dev/null; then
    pid="$(cat "$lock/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then continue; fi
  fi
  echo $$ > "$lock/pid"
  rm -rf "$OUT/.tmp-$t"
  echo "== $t"
  "$P" train --model "$MODEL" --task "$dir" --method lora --r 8 --alpha 16 \
    --targets "${TARGETS:-query,value}" --lr "${LR:-1e-3}" --batch-size "${BATCH:-16}" \
    --steps "${STEPS:-600}" --eval-every "${EVAL_EVERY:-25}" --patience "${PATIENCE:-4}" \
    --max-len "${MAX_LEN:-64}" --seed 0 --out "$OUT/.tmp-$t" >&2
  rm -rf "$OUT/$t"
  mv "$OUT/.tmp-$t" "$OUT/$t"
  rm -rf "$lock"
done
