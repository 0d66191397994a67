#!/usr/bin/env bash
# The Python package's tests: `pip install .` into a fresh virtual environment (target/pyvenv), then pytest
# on tests/python. The wheel is built by maturin in the dev profile (MATURIN_PEP517_ARGS), which reuses the
# dependencies `cargo test` already compiled; a user's `pip install .` builds the release profile.
# Needs the peftdb CLI in target/debug (scripts/test.sh's cargo test builds it) and the test model.
# Set PEFTDB_PEFT_PYTHON to a python with torch, transformers and peft to also load a suggested
# initialization with PeftModel.from_pretrained.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=target/pyvenv
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q pytest numpy
cargo build --quiet --bin peftdb
MATURIN_PEP517_ARGS="${MATURIN_PEP517_ARGS:---profile dev}" "$VENV/bin/python" -m pip install -q .
# Imported from the installed wheel, not the source tree.
(cd /tmp && "$OLDPWD/$VENV/bin/python" -c 'import peftdb, sys; print("peftdb", peftdb.__version__, "from", peftdb.__file__)')
"$VENV/bin/python" -m pytest -q tests/python
