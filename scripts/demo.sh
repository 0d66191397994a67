#!/usr/bin/env bash
# The main job on the bundled default: the quickstart over the demo zoo committed in examples/demo-zoo
# (LoRA and BitFit adapters trained by peftdb's own harness on 13 of the 14 tasks in ../shared/tasks;
# movie_sentiment is left out to play the new task).
#   1. fetch the base model if missing   2. ingest the zoo   3. nearest tasks of one task
#   4. suggest an initialization for the left-out task, and compare it with the bare model.
# Takes a few minutes on 2 cores (most of it the first build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
# The dev profile optimises dependencies (opt-level 3) and shares its build with `scripts/test.sh`.
cargo build --quiet --bin peftdb
P=target/debug/peftdb
MODEL=models/all-MiniLM-L6-v2
NEW=../shared/tasks/movie_sentiment
DEMO=target/demo
rm -rf "$DEMO" && mkdir -p "$DEMO"
export PEFTDB_PATH="$DEMO/demo.redb"
echo "== peftdb init"; $P init
echo "== peftdb ingest examples/demo-zoo"; $P ingest examples/demo-zoo
echo "== peftdb ls tasks"; $P ls tasks
echo "== peftdb stats"; $P stats
echo "== peftdb nearest --task tweet_sentiment (mean over the LoRA and BitFit spaces: the papers' ensemble)"
$P nearest --task tweet_sentiment -k 5
echo "== peftdb nearest --task tweet_sentiment --method lora --similarity delta"
$P nearest --task tweet_sentiment -k 5 --method lora --similarity delta
echo "== peftdb suggest: an initialization for the new task movie_sentiment (not in the zoo)"
$P suggest --model "$MODEL" --task "$NEW" --out "$DEMO/movie_sentiment-init" -k 5 --max-len 48 --steps 16 --shots 16
echo "== peftdb eval: the bare model vs the suggested initialization (dev split, before any training)"
echo "-- bare model:"; $P eval --model "$MODEL" --task "$NEW" --split dev --max-len 48
echo "-- suggested initialization:"; $P eval --model "$MODEL" --task "$NEW" --split dev --max-len 48 --adapter "$DEMO/movie_sentiment-init"
echo "== done: the initialization is a Hugging Face PEFT folder in $DEMO/movie_sentiment-init"
