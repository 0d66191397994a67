#!/usr/bin/env python3
"""Reference output of HF PEFT 0.21.2 (transformers 5.23, torch 2.15) for ../shared/peft-fixtures/prompt_10,
which reference_outputs.json lacks: mean of the last hidden state over the input tokens only (the virtual
tokens excluded) and over all positions, first 8 values, for the fixtures' input sentence.
Used by tests/engine_fixtures.rs (prompt_tuning_matches_peft). usage: peft-prompt-reference.py [MODEL_DIR]"""
import sys
import torch, json
from transformers import AutoModel
from peft import PeftModel
m = AutoModel.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else 'models/all-MiniLM-L6-v2').eval()
ids = torch.tensor([[101,21877,6199,18939,14148,2049,2830,3413,2114,21877,6199,1012,102]])
pm = PeftModel.from_pretrained(m, '../shared/peft-fixtures/prompt_10').eval()
with torch.no_grad():
    out = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
print(out.shape)
print(json.dumps({"input_only": out[0,10:].mean(0)[:8].tolist(), "all": out[0].mean(0)[:8].tolist()}))
