#!/usr/bin/env python3
"""Reference outputs of transformers + PEFT for a prefix-tuning adapter on the decoder test model
SmolLM2-135M-Instruct (the Q4_1 GGUF dequantized to f32, as scripts/decoder_reference.py loads it), for
checking the Rust decoder's prefix tuning against.

Writes, under tests/fixtures/decoder/:
  prefix_t6/              PEFT's PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6). SmolLM2 has
                          grouped-query attention (9 query heads, 3 key/value heads of 64), so PEFT lays the
                          prefix out as 30 layers x 2 x 192 per virtual token. Its keys and values are the base
                          model's own keys and values of a 6-token text (what a prefix looks like once trained,
                          not noise the attention ignores) plus N(0, 0.1) noise, rounded to f16
  prefix_reference.json   the verbalizers' log-likelihoods after two prompts, with the adapter (PEFT passes the
                          prefix as cached past keys/values: the text's positions start at 6)

usage: decoder_prefix_reference.py [MODEL_DIR]   (default models/smollm2-135m-instruct, with model.gguf)
"""
import torch
from peft import PrefixTuningConfig, get_peft_model

# the model, the prompts and the scoring are the IA3 reference's (same folder)
from decoder_ia3_reference import load, logliks
from decoder_prompt_reference import save

T = 6


def main():
    tok, model, ref = load()
    cfg = model.config
    ids = tok("Review of a film, sentiment", add_special_tokens=False)["input_ids"][:T]
    assert len(ids) == T, ids
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = out.past_key_values
    rows = []
    for i in range(cfg.num_hidden_layers):
        layer = cache.layers[i]
        # (1, kv_heads, T, head_dim) -> (T, kv_heads * head_dim)
        k = layer.keys[0].permute(1, 0, 2).reshape(T, -1)
        v = layer.values[0].permute(1, 0, 2).reshape(T, -1)
        rows += [k, v]
    table = torch.cat(rows, dim=1)
    g = torch.Generator().manual_seed(0)
    table = (table + 0.1 * torch.randn(table.shape, generator=g)).to(torch.float16)
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T)).eval()
    pc = pm.peft_config["default"]
    assert pc.token_dim == cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads), pc
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(table.to(torch.float32))
    ref["prefix"] = {
        "adapter_dir": "prefix_t6",
        "num_virtual_tokens": T,
        "token_dim": pc.token_dim,
        "logliks": [logliks(pm, tok, p) for p in ref["prompts"]],
    }
    save(pm, table, "prefix_t6", "prefix_reference.json", ref)


if __name__ == "__main__":
    main()
