#!/usr/bin/env python3
"""PyTorch + PEFT reference for benches/engine.rs: the same work on the same inputs.

forward: BertModel on 32 x 64 token ids (same formula as the Rust bench), mean pooling, no grad.
train step: LoRA r=8 alpha 16 on query,value; batch 8 x 64 plus the verbalizers "positive"/"negative",
mean pooling, cosine logits / 0.05, cross-entropy, backward, AdamW (lr 5e-4) on the LoRA parameters.
Prints one JSON object. Exits with status 3 (skipped) when torch, transformers or peft is missing.
usage: torch_reference.py MODEL_DIR [REPEATS]
"""
import json
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer
    from peft import LoraConfig, get_peft_model
except ImportError as e:  # pragma: no cover
    print(f"needs torch, transformers and peft ({e})", file=sys.stderr)
    sys.exit(3)


def rows(b, s):
    return [[101 if j == 0 else 102 if j == s - 1 else 1000 + ((i * s + j) * 7919 % 20000)
             for j in range(s)] for i in range(b)]


def pool(h, m):
    m = m.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def timed(n, f):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    model_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    big = torch.tensor(rows(32, 64))
    big_m = torch.ones_like(big)

    def fwd():
        with torch.no_grad():
            pool(model(input_ids=big, attention_mask=big_m).last_hidden_state, big_m).sum().item()

    forward_s = timed(n, fwd)

    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    peft_model.train()
    for mod in peft_model.modules():  # dropout off, as in the candle engine
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
    small = torch.tensor(rows(8, 64))
    small_m = torch.ones_like(small)
    lab = tok(["positive", "negative"], padding=True, return_tensors="pt")
    targets = torch.tensor([i % 2 for i in range(8)])

    def step():
        e_in = pool(peft_model(input_ids=small, attention_mask=small_m).last_hidden_state, small_m)
        e_lab = pool(peft_model(input_ids=lab["input_ids"], attention_mask=lab["attention_mask"]).last_hidden_state,
                     lab["attention_mask"])
        logits = F.normalize(e_in, dim=-1) @ F.normalize(e_lab, dim=-1).T / 0.05
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()

    train_step_s = timed(n, step)
    print(json.dumps({"forward_s": forward_s, "train_step_s": train_step_s, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
