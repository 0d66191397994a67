#!/usr/bin/env bash
# The main job on the bundled default: the quickstart over the demo zoo committed in examples/demo-zoo
# (one LoRA per task of the 14 tasks, trained by scripts/train-zoo.sh until dev accuracy plateaus, f16).
# Any task can play the new one: `suggest` never proposes the new task's own adapter.
#   1. fetch the base model if missing   2. ingest the zoo   3. nearest tasks of one task
#   4. suggest an initialization for social_support (3-way sentiment of short posts) from the other 13
#      tasks' adapters (the transfer study's answer there: a merge led by tweet_sentiment on every seed;
#      +8.7 points on test over the bare model, mean of 5 seeds)
#   5. test accuracy of the bare model, the suggested initialization and each candidate source alone.
# Takes a few minutes on 2 cores (most of it the first build). NEW=path/to/task picks another task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
# The dev profile optimises dependencies (opt-level 3) and shares its build with `scripts/test.sh`.
cargo build --quiet --bin peftdb
P=target/debug/peftdb
MODEL=models/all-MiniLM-L6-v2
# The task data: ../shared/tasks beside the repository, else data/tasks built from the public packages.
TASKS="${PEFTDB_TASKS_DIR:-../shared/tasks}"
[ -f "$TASKS/social_support/task.json" ] || TASKS="$(bash scripts/fetch-tasks.sh | tail -1)"
NEW="${NEW:-$TASKS/social_support}"
DEMO=target/demo
LEN=64
rm -rf "$DEMO" && mkdir -p "$DEMO"
export PEFTDB_PATH="$DEMO/demo.redb"
echo "== peftdb init"; $P init
echo "== peftdb ingest examples/demo-zoo"; $P ingest examples/demo-zoo
echo "== peftdb ls tasks"; $P ls tasks
echo "== peftdb nearest --task tweet_sentiment (what training changed: the LoRA updates B.A)"
$P nearest --task tweet_sentiment -k 5 --similarity delta
echo "== peftdb suggest: an initialization for the new task $(basename "$NEW") from the other tasks' adapters"
$P suggest --model "$MODEL" --task "$NEW" --out "$DEMO/init" --max-len $LEN
echo "== test accuracy (full test split), before any training on the new task"
{
  echo "bare model"; $P --json eval --model "$MODEL" --task "$NEW" --split test --max-len $LEN
  echo "suggested initialization"
  $P --json eval --model "$MODEL" --task "$NEW" --split test --max-len $LEN --adapter "$DEMO/init"
  python3 -c 'import json,sys; [print(c["task"], c["object"]) for c in json.load(open(sys.argv[1]))["candidates"]]' \
    "$DEMO/init/peftdb_report.json" | while read -r task id; do
    echo "source $task alone"
    $P --json eval --model "$MODEL" --task "$NEW" --split test --max-len $LEN --object "$id"
  done
} > "$DEMO/eval.txt"
python3 - "$DEMO/eval.txt" <<'EOF'
import json, sys
lines = open(sys.argv[1]).read().split("\n")
rows, label, buf = [], None, []
for line in lines + [""]:
    if line and not line.startswith(("{", " ", "}")) and not buf:
        label = line
    else:
        buf.append(line)
        if line == "}":
            rows.append((label, json.loads("\n".join(buf))))
            buf = []
bare = rows[0][1]["accuracy"]
init = rows[1][1]["accuracy"]
sources = rows[2:]
best = max(sources, key=lambda r: r[1]["accuracy"]) if sources else None
for name, r in rows:
    print(f"  {name:<40} {r['accuracy']:.3f}  ({r['accuracy'] - bare:+.3f} vs bare)")
print(f"suggested initialization {init:.3f} vs bare model {bare:.3f} ({100 * (init - bare):+.1f} points)"
      + (f"; best single candidate {best[0].removeprefix('source ').removesuffix(' alone')} {best[1]['accuracy']:.3f}" if best else ""))
EOF
echo "== done: the initialization is a Hugging Face PEFT folder in $DEMO/init (report: $DEMO/init/peftdb_report.json)"
