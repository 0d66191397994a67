#!/usr/bin/env python3
"""Tiny Hugging Face decoders with biased linear layers, and transformers' logits on them, for checking that
peftdb's Llama-family loader reads their biases (tests/decoder.rs).

Writes, under tests/fixtures/decoder/:
  qwen2_tiny/              a Qwen2ForCausalLM (biases on q_proj, k_proj, v_proj; rope_theta 1e6; tied head)
  llama_biased_tiny/       a LlamaForCausalLM with attention_bias and mlp_bias true (biases on all seven)
  tiny_reference.json      for each: token ids of three sequences (one left-padded batch), the first 32
                           logits at every real position and the argmax over the whole vocabulary

Each model has hidden 64, 2 layers, 4 heads, 2 key/value heads, intermediate 128, vocabulary 512, seeded
random weights (seed 0) with every bias drawn N(0, 0.5) so that a missing bias shows; saved in f32.
usage: decoder_tiny_reference.py   (needs torch, transformers)
"""
import json
import os

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "decoder")
SEQS = [[5, 17, 300, 42, 7, 99], [11, 400, 2], [8, 8, 8, 200, 1]]
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def build(name):
    torch.manual_seed(0)
    if name == "qwen2_tiny":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, tie_word_embeddings=True, **COMMON))
    else:
        model = LlamaForCausalLM(LlamaConfig(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                             **COMMON))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


@torch.no_grad()
def logits(model):
    n = max(map(len, SEQS))
    ids = torch.tensor([[0] * (n - len(s)) + s for s in SEQS])
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in SEQS])
    # positions over the real tokens only, as peftdb numbers them
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    return ([out[i, n - len(s):, :32].tolist() for i, s in enumerate(SEQS)],
            [out[i, n - len(s):].argmax(-1).tolist() for i, s in enumerate(SEQS)])


def main():
    ref = {"versions": {"transformers": transformers.__version__, "torch": torch.__version__}, "sequences": SEQS}
    for name in ["qwen2_tiny", "llama_biased_tiny"]:
        model = build(name)
        d = os.path.join(OUT, name)
        model.save_pretrained(d, safe_serialization=True)
        gc = os.path.join(d, "generation_config.json")
        if os.path.exists(gc):
            os.remove(gc)
        ref[name] = {"biases": sorted({n.rsplit(".", 2)[-2] for n, _ in model.named_parameters()
                                       if n.endswith(".bias")}),
                     }
        ref[name]["logits"], ref[name]["argmax"] = logits(model)
    with open(os.path.join(OUT, "tiny_reference.json"), "w") as fh:
        json.dump(ref, fh)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
