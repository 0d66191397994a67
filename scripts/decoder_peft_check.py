#!/usr/bin/env python3
"""Score a task split with Hugging Face transformers + PEFT the way peftdb scores it on a decoder, to check
that an adapter peftdb trained (or merged) loads in PEFT and gives the same answers.

The model is the GGUF file transformers dequantizes (as scripts/decoder_reference.py does); each input is
`prompt.replace("{text}", text)` with the text cut where its MAX_LEN-th token ends, tokenized as one
string (no special tokens; SmolLM2's GGUF adds no BOS), and each label's score is the summed log-likelihood of `" " + label text` after it.
LoRA, IA3, prefix and prompt tuning (the last two scored one sequence at a time, see below) are checked
the same way.
Prints one JSON object: the accuracy without and with the adapter, and the first examples' scores.

usage: decoder_peft_check.py MODEL.gguf ADAPTER_DIR TASK_DIR [--split test] [--max-len 64]
                             [--prompt 'Input: {text}\\nAnswer:'] [--limit N]
"""
import argparse
import json
import os

import torch

torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from peft import PeftModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("adapter")
    ap.add_argument("task")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--prompt", default="Input: {text}\nAnswer:")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    task = json.load(open(os.path.join(a.task, "task.json")))
    labels = [l["text"] for l in task["labels"]]
    label_of = {l["id"]: i for i, l in enumerate(task["labels"])}
    rows = [json.loads(x) for x in open(os.path.join(a.task, a.split + ".jsonl")) if x.strip()]
    if a.limit:
        rows = rows[: a.limit]
    head, tail = a.prompt.split("{text}", 1)
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731

    def cut(text):
        # the text up to where its max_len-th token ends, as peftdb cuts it
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= a.max_len:
            return text
        return text[: enc["offset_mapping"][a.max_len - 1][1]]

    # the rendered prompt is tokenized as one string
    prompts = [ids(head + cut(r["text"]) + tail) for r in rows]
    verbs = [ids(" " + l) for l in labels]
    gold = [r["label"] if isinstance(r["label"], int) else label_of[r["label"]] for r in rows]

    @torch.no_grad()
    def scores(m, batch):
        out = []
        pairs = [(p, v) for p in prompts for v in verbs]
        for s in range(0, len(pairs), batch):
            chunk = pairs[s : s + batch]
            seqs = [p + v for p, v in chunk]
            n = max(map(len, seqs))
            x = torch.tensor([[tok.eos_token_id] * (n - len(q)) + q for q in seqs])
            mask = torch.tensor([[0] * (n - len(q)) + [1] * len(q) for q in seqs])
            logp = torch.log_softmax(m(input_ids=x, attention_mask=mask).logits.float(), -1)
            # counted from the end: prompt tuning's logits also cover its virtual tokens, put first
            total = logp.shape[1]
            for i, (p, v) in enumerate(chunk):
                out.append(sum(float(logp[i, total - len(v) - 1 + j, t]) for j, t in enumerate(v)))
        nl = len(verbs)
        return [out[i * nl : (i + 1) * nl] for i in range(len(prompts))]

    def acc(sc):
        return sum(int(max(range(len(s)), key=lambda c: s[c]) == g) for s, g in zip(sc, gold)) / len(gold)

    bare = scores(model, a.batch)
    peft_model = PeftModel.from_pretrained(model, a.adapter).eval()
    # PEFT puts a prompt-tuning table before the left padding, which moves the text's rotary positions
    # relative to the prompt by the padding's length; with prefix tuning (a cached past), the positions of a
    # left-padded text start after the prefix *and* the padding. One sequence at a time, as peftdb scores it.
    prompt_learning = peft_model.peft_config["default"].peft_type in ("PROMPT_TUNING", "PREFIX_TUNING")
    adapted = scores(peft_model, 1 if prompt_learning else a.batch)
    print(json.dumps({
        "examples": len(rows),
        "bare_accuracy": acc(bare),
        "adapter_accuracy": acc(adapted),
        "peft_type": peft_model.peft_config["default"].peft_type,
        "task_type": peft_model.peft_config["default"].task_type,
        "first_scores_bare": bare[:3],
        "first_scores_adapter": adapted[:3],
    }))


if __name__ == "__main__":
    main()
