#!/usr/bin/env bash
# Train the SmolLM2 zoo: one LoRA (r=8, alpha 16, q_proj+v_proj) of SmolLM2-135M-Instruct
# (scripts/fetch-decoder.sh) per task, on its whole train split until dev accuracy plateaus: batch 8,
# lr 5e-4, evaluated on the full dev split every 25 steps, stopped after 3 evaluations without a better
# dev accuracy, at most 300 steps; prompt "Input: {text}\nAnswer:" (peftdb's default), texts cut to 64
# tokens. Tasks whose verbalizers are single tokens go first (one sequence per input); each label of
# several tokens costs a sequence of its own. Resumable and parallel exactly as scripts/train-zoo.sh,
# which it runs. Usage: bash scripts/train-zoo-smollm2.sh [OUT] [TASKS_DIR]
# (defaults: examples/transfer-smollm2/zoo ../shared/tasks)
set -euo pipefail
cd "$(dirname "$0")/.."
export PEFTDB_MODEL="${PEFTDB_MODEL:-models/smollm2-135m-instruct/model.gguf}"
export TARGETS=q_proj,v_proj LR=5e-4 BATCH=8 STEPS=300 EVAL_EVERY=25 PATIENCE=3 MAX_LEN=64
export TASK_LIST="movie_sentiment tweet_sentiment bbc_topic strategyqa winowhy metaphor_paraphrase play_dialog vitaminc logical_fallacy movie_subjectivity social_support multiemo epistemic_reasoning intent_recognition"
exec bash scripts/train-zoo.sh "${1:-examples/transfer-smollm2/zoo}" "${2:-../shared/tasks}"
