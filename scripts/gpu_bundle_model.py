#!/usr/bin/env python3
"""Pack or unpack the test model for a GPU bundle (scripts/gpu-bundle.sh).

    gpu_bundle_model.py pack MODEL_DIR OUT_DIR TEXT_FILE...   # needs numpy, safetensors, tokenizers
    gpu_bundle_model.py unpack DIR                            # needs numpy, safetensors

`pack` keeps every tensor of all-MiniLM-L6-v2 exact (f32) except the rows of the word-embedding table that no
text of the given files can produce: those are left out, and `unpack` writes them back as zeros. The outputs
for those texts are therefore bit-identical to the real model's (the tokenizer maps them to kept rows only),
while the bundle carries about half the bytes. TEXT_FILE: JSONL with a "text" field per line, or task.json
(its label texts), or any other file (each line a text).
"""
import json
import sys


def pack(model_dir, out_dir, files):
    import numpy as np
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    texts = []
    for f in files:
        if f.endswith("task.json"):
            texts += [l["text"] for l in json.load(open(f))["labels"]]
        elif f.endswith(".jsonl"):
            texts += [json.loads(l)["text"] for l in open(f) if l.strip()]
        else:
            texts += [l.rstrip("\n") for l in open(f)]
    ids = set(range(200))  # [PAD], [UNK], [CLS], [SEP], [MASK] and the unused slots around them
    for e in tok.encode_batch(texts):
        ids.update(e.ids)
    ids = np.array(sorted(ids), dtype=np.int64)
    w = load_file(f"{model_dir}/model.safetensors")
    we = w.pop("embeddings.word_embeddings.weight")
    w["peftdb_vocab_ids"] = ids
    w["peftdb_vocab_rows"] = we[ids]
    w["peftdb_vocab_shape"] = np.array(we.shape, dtype=np.int64)
    save_file(w, f"{out_dir}/packed.safetensors")
    print(f"packed: {len(ids)} of {we.shape[0]} word-embedding rows kept ({len(texts)} texts)")


def unpack(d):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    w = load_file(f"{d}/packed.safetensors")
    ids, rows, shape = w.pop("peftdb_vocab_ids"), w.pop("peftdb_vocab_rows"), w.pop("peftdb_vocab_shape")
    we = np.zeros(tuple(int(x) for x in shape), dtype=np.float32)
    we[ids] = rows
    w["embeddings.word_embeddings.weight"] = we
    save_file(w, f"{d}/model.safetensors")
    print(f"unpacked: {len(ids)} of {we.shape[0]} rows")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "pack":
        pack(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) == 3 and sys.argv[1] == "unpack":
        unpack(sys.argv[2])
    else:
        sys.exit(__doc__)
