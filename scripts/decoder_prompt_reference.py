#!/usr/bin/env python3
"""Reference outputs of transformers + PEFT for a prompt-tuning adapter on the decoder test model
SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to f32, as scripts/decoder_reference.py loads it), for
checking the Rust decoder's prompt tuning against.

Writes, under tests/fixtures/decoder/:
  prompt_t8/              PEFT's PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8): the table is
                          the word embeddings of 8 seeded random tokens plus N(0, 0.02) noise, rounded to f16
  prompt_reference.json   the verbalizers' log-likelihoods after two prompts, with the adapter (PEFT prepends
                          the virtual tokens to the input embeddings; its logits cover them too, so a label
                          token at real position i is read at i + 8)

usage: decoder_prompt_reference.py [MODEL_DIR]   (default models/smollm2-135m-instruct, with model.gguf)
"""
import json
import os

import torch
from peft import PromptTuningConfig, get_peft_model

# the model, the prompts and the scoring are the IA3 reference's (same folder)
from decoder_ia3_reference import OUT, load, logliks

T = 8


def main():
    tok, model, ref = load()
    pm = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (T,), generator=g)
    emb = model.get_input_embeddings().weight[ids].detach()
    table = (emb + 0.02 * torch.randn(emb.shape, generator=g)).to(torch.float16)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(table.to(torch.float32))
    ref["prompt"] = {
        "adapter_dir": "prompt_t8",
        "num_virtual_tokens": T,
        "logliks": [logliks(pm, tok, p, T) for p in ref["prompts"]],
    }
    save(pm, table, "prompt_t8", "prompt_reference.json", ref)


def save(pm, table, adapter_dir, ref_file, ref):
    """Write a prompt-learning adapter with its f16 `table` under OUT/adapter_dir (no README) and the
    reference `ref` as OUT/ref_file."""
    pm.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.data = table
    adir = os.path.join(OUT, adapter_dir)
    pm.save_pretrained(adir)
    rm = os.path.join(adir, "README.md")
    if os.path.exists(rm):
        os.remove(rm)
    with open(os.path.join(OUT, ref_file), "w") as fh:
        json.dump(ref, fh, indent=1)
    print("wrote", adir, "and", ref_file)


if __name__ == "__main__":
    main()
