#!/usr/bin/env bash
# The main job on the bundled default: build peftdb, make the demo zoo, ingest it, and query it.
# The demo zoo is GENERATED (seeded synthetic adapters named after ../shared/tasks), plus the real adapters
# written by Hugging Face PEFT in ../shared/peft-fixtures. A trained demo zoo replaces it in a later release.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dev profile optimises dependencies (opt-level 3) and shares its build with `scripts/test.sh`.
cargo build --quiet --bin peftdb --example make_demo_zoo
P=target/debug/peftdb
DEMO=target/demo
rm -rf "$DEMO" && mkdir -p "$DEMO"
export PEFTDB_PATH="$DEMO/demo.redb"
target/debug/examples/make_demo_zoo "$DEMO/zoo" ../shared/tasks
echo "== peftdb init"; $P init
echo "== peftdb ingest (generated zoo + real PEFT fixtures)"
$P ingest "$DEMO/zoo"
$P ingest ../shared/peft-fixtures --task peft-fixtures || true
echo "== peftdb ls tasks"; $P ls tasks
echo "== peftdb stats"; $P stats
echo "== peftdb show movie_sentiment"; $P show movie_sentiment
echo "== peftdb nearest --task movie_sentiment (all spaces: the paper's 3-method ensemble)"
$P nearest --task movie_sentiment -k 5
echo "== peftdb nearest --task movie_sentiment --similarity centered --method lora"
$P nearest --task movie_sentiment -k 5 --similarity centered --method lora
ID=$($P ls objects --task movie_sentiment --method lora --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['id'])")
echo "== peftdb export $ID (byte-identical round trip)"
$P export "$ID" --out "$DEMO/export"
cmp "$DEMO/export/adapter_model.safetensors" "$DEMO/zoo/movie_sentiment/lora/adapter_model.safetensors" && echo "identical"
