#!/usr/bin/env python3
"""A real PEFT LoRA that saves a whole module (`modules_to_save`), for tests/decoder_pipeline.rs.

PEFT's SEQ_CLS task type trains a new classification head beside the LoRA and saves it whole: on a Llama
model, LoraConfig(task_type="SEQ_CLS") adds `classifier` and `score` to `modules_to_save`, and
save_pretrained writes `base_model.model.score.weight` next to the lora_A/lora_B tensors.

Writes tests/fixtures/decoder/lora_seq_cls_score/ (adapter_config.json, adapter_model.safetensors; README.md
removed): LoRA r=8, alpha 16 on q_proj and v_proj (init_lora_weights=False, seed 0) of a
LlamaForSequenceClassification with SmolLM2-135M-Instruct's shapes (30 layers, hidden 576, 9 heads, 3 KV
heads, intermediate 1536, vocabulary 49152; 2 labels), saved in f16 to keep it small. The base weights are
a seeded random init: the adapter's layout and names are what the test checks, not its outputs.
base_model_name_or_path is "smollm2-135m-instruct", the name peftdb gives the GGUF test model.

usage: decoder_saved_modules_fixture.py   (needs torch, transformers, peft)
"""
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification
from peft import LoraConfig, get_peft_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "decoder", "lora_seq_cls_score")

torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    num_labels=2,
    pad_token_id=2,
)
model = LlamaForSequenceClassification(cfg)
model.name_or_path = "smollm2-135m-instruct"
peft_model = get_peft_model(
    model,
    LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
               init_lora_weights=False),
)
peft_model.half()
if os.path.exists(OUT):
    shutil.rmtree(OUT)
peft_model.save_pretrained(OUT)
readme = os.path.join(OUT, "README.md")
if os.path.exists(readme):
    os.remove(readme)
print("wrote", OUT, sorted(os.listdir(OUT)))
