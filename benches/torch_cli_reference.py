#!/usr/bin/env python3
"""PyTorch + PEFT reference for whole `peftdb eval` / `peftdb train` runs (scripts/bench-engine.sh).

eval  MODEL TASK_DIR: the bare model on the test split, as `peftdb eval`: texts truncated to 128 tokens,
      scored in length order in batches of 32, mean pooling, logits = cos(e(x), e(verbalizer)) / 0.05.
train MODEL TASK_DIR K STEPS TEST_EVALS: as `peftdb train --method lora --k K --steps STEPS`: K examples
      per label (sampled here with Python's RNG, seed 0: not the same examples as peftdb's sampler, the
      same amount of work), LoRA r=8 alpha 16 on query,value, AdamW lr 5e-4, batch 8, dev evaluation
      (batch 64) every 10 steps and after the last, then TEST_EVALS test evaluations (peftdb scores the
      test split once per distinct checkpoint, best and early).
Times everything after the imports (model load included, as in the peftdb process). Prints one JSON object.
"""
import json
import random
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

T = 0.05
MAX_LEN = 128


def load_task(d):
    task = json.load(open(f"{d}/task.json"))
    ids = [str(l["id"]) for l in task["labels"]]
    texts = [l["text"] for l in task["labels"]]

    def split(name):
        out = []
        for line in open(f"{d}/{name}.jsonl"):
            if line.strip():
                r = json.loads(line)
                out.append((r["text"], ids.index(str(r["label"]))))
        return out

    return texts, split("train"), split("dev"), split("test")


def pool(h, m):
    m = m.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model, tok, texts):
    b = tok(texts, padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return pool(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state,
                b["attention_mask"])


def score(model, tok, labels, examples, batch):
    """Accuracy of head-free label scoring, inputs in length order (as the engine)."""
    with torch.no_grad():
        e_lab = F.normalize(embed(model, tok, labels), dim=-1)
        lens = [len(tok(t, truncation=True, max_length=MAX_LEN)["input_ids"]) for t, _ in examples]
        order = sorted(range(len(examples)), key=lambda i: (lens[i], i))
        correct = 0
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            e = F.normalize(embed(model, tok, [examples[i][0] for i in idx]), dim=-1)
            pred = (e @ e_lab.T / T).softmax(-1).argmax(-1)
            correct += sum(int(p) == examples[i][1] for p, i in zip(pred.tolist(), idx))
    return correct / len(examples)


def main():
    mode, model_dir, task_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    labels, train, dev, test = load_task(task_dir)
    if mode == "eval":
        acc = score(model, tok, labels, test, 32)
        print(json.dumps({"mode": "eval", "seconds": time.perf_counter() - t0, "accuracy": acc,
                          "examples": len(test), "threads": torch.get_num_threads()}))
        return
    k, steps, test_evals = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    rng = random.Random(0)
    shots = []
    for c in range(len(labels)):
        pool_c = [e for e in train if e[1] == c]
        shots += rng.sample(pool_c, min(k, len(pool_c)))
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    for mod in pm.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
    order, cursor, dev_acc = [], 0, []
    t_loop = time.perf_counter()
    for step in range(1, steps + 1):
        if cursor >= len(order):
            order = list(range(len(shots)))
            rng.shuffle(order)
            cursor = 0
        idx = order[cursor:cursor + 8]
        cursor += len(idx)
        pm.train()
        e_in = F.normalize(embed(pm, tok, [shots[i][0] for i in idx]), dim=-1)
        e_lab = F.normalize(embed(pm, tok, labels), dim=-1)
        loss = F.cross_entropy(e_in @ e_lab.T / T, torch.tensor([shots[i][1] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps:
            pm.eval()
            dev_acc.append(score(pm, tok, labels, dev, 64))
    loop_s = time.perf_counter() - t_loop
    pm.eval()
    test_acc = [score(pm, tok, labels, test, 64) for _ in range(test_evals)]
    print(json.dumps({"mode": "train", "seconds": time.perf_counter() - t0, "loop_seconds": loop_s,
                      "steps": steps, "dev_accuracy": dev_acc, "test_accuracy": test_acc,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
