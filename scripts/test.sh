#!/usr/bin/env bash
# Runs every test of peftdb: fetches the test model if missing, then the whole cargo test suite.
# Usage: bash scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d ../shared/tasks ] || [ ! -d ../shared/peft-fixtures ]; then
  echo "error: ../shared (tasks and peft-fixtures) must sit beside this repository" >&2
  exit 1
fi
if [ -x scripts/fetch-model.sh ] || [ -f scripts/fetch-model.sh ]; then
  bash scripts/fetch-model.sh
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
