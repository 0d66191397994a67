#!/usr/bin/env bash
# Fetch the test model if needed, then benchmark the engine against PyTorch + PEFT (when importable by
# $PYTHON, default python3). Prints candle and PyTorch times and their ratio.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/fetch-model.sh" >/dev/null
cd "$ROOT" && cargo bench --bench engine "$@"
