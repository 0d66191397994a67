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
cargo test --all-targets "$@"
cargo test --doc "$@"
