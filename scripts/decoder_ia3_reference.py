#!/usr/bin/env python3
"""Reference outputs of transformers + PEFT for an IA3 adapter on the decoder test model SmolLM2-135M-Instruct
(the Q4_1 GGUF dequantized to f32, as scripts/decoder_reference.py loads it), for checking the Rust decoder's
IA3 hooks against.

Writes, under tests/fixtures/decoder/:
  ia3_kvd/             PEFT's IA3 with its Llama defaults (target k_proj, v_proj, down_proj; down_proj a
                       feed-forward module, scaling its input), vectors 1 + N(0, 0.1) (seed 0) rounded to f16
  ia3_reference.json   the verbalizers' log-likelihoods after two prompts, bare and with the adapter

usage: decoder_ia3_reference.py [MODEL_DIR]   (default models/smollm2-135m-instruct, with model.gguf)
"""
import json
import os
import sys

import torch

torch.set_num_threads(2)

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import IA3Config, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "decoder")
PROMPTS = ["Input: a wonderful, moving film\nAnswer:", "Input: dull and far too long\nAnswer:"]
VERBALIZERS = [" positive", " negative", " very bad indeed"]


@torch.no_grad()
def logliks(model, tok, prompt, offset=0):
    """Each verbalizer's summed log-likelihood after `prompt`; `offset` skips logits of virtual tokens that
    a prompt-learning adapter puts first."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    out = {}
    for v in VERBALIZERS:
        v_ids = tok(v, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([p + v_ids])).logits[0, offset:]
        logp = torch.log_softmax(logits.double(), -1)
        out[v] = float(sum(logp[len(p) - 1 + i, t] for i, t in enumerate(v_ids)))
    return out


def load():
    """The tokenizer and the f32 model from MODEL_DIR/model.gguf, and the reference's header (versions, the
    prompts, the bare model's log-likelihoods)."""
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models", "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file="model.gguf", dtype=torch.float32).eval()
    ref = {
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        "prompts": PROMPTS,
        "bare": [logliks(model, tok, p) for p in PROMPTS],
    }
    return tok, model, ref


def main():
    tok, model, ref = load()
    pm = get_peft_model(model, IA3Config(task_type="CAUSAL_LM")).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.data = (1.0 + 0.1 * torch.randn_like(p)).to(torch.float16).to(torch.float32)
    cfg = pm.peft_config["default"]
    ref["ia3"] = {
        "adapter_dir": "ia3_kvd",
        "target_modules": sorted(cfg.target_modules),
        "feedforward_modules": sorted(cfg.feedforward_modules),
        "logliks": [logliks(pm, tok, p) for p in PROMPTS],
    }
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.data = p.data.to(torch.float16)
    cfg.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    adir = os.path.join(OUT, "ia3_kvd")
    pm.save_pretrained(adir)
    rm = os.path.join(adir, "README.md")
    if os.path.exists(rm):
        os.remove(rm)
    # sets are saved in arbitrary order: sort them so a rerun leaves the fixture unchanged
    cp = os.path.join(adir, "adapter_config.json")
    c = json.load(open(cp))
    for k in ("target_modules", "feedforward_modules"):
        if isinstance(c.get(k), list):
            c[k] = sorted(c[k])
    with open(cp, "w") as fh:
        json.dump(c, fh, indent=2, sort_keys=True)
    with open(os.path.join(OUT, "ia3_reference.json"), "w") as fh:
        json.dump(ref, fh, indent=1)
    print("wrote", adir, "and ia3_reference.json")


if __name__ == "__main__":
    main()
