"""`suggest` and `evaluate` from Python on the demo zoo: a task given as Python data or as a folder, the
initialization written as a PEFT folder, the numbers equal to the CLI's, and (where PEFT is installed) the
folder loaded by `PeftModel.from_pretrained`."""

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

import peftdb
from conftest import DEMO_ZOO, ROOT, run_cli

FAST = dict(shots=4, steps=4, k=4, progress=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "demo.peftdb"
    with peftdb.Store(path, create=True) as db:
        db.ingest(DEMO_ZOO, progress=False)
    return path


def rows(path: Path):
    return [(r["text"], r["label"]) for r in map(json.loads, path.read_text().splitlines())]


def test_suggest_from_python_data_writes_a_peft_folder_and_the_report(demo, tasks_dir, model_dir, tmp_path):
    folder = tasks_dir / "social_support"
    meta = json.loads((folder / "task.json").read_text())
    task = peftdb.TaskData(
        "social_support",
        {l["id"]: l["text"] for l in meta["labels"]},
        rows(folder / "train.jsonl"),
        rows(folder / "dev.jsonl"),
    )
    assert task.counts() == {"train": 527, "dev": 106, "test": 0}
    model = peftdb.Model(model_dir, max_len=64)
    events = []
    with peftdb.Store(demo, read_only=True) as db:
        res = peftdb.suggest(db, model, task, tmp_path / "init", **{**FAST, "progress": lambda *e: events.append(e)})
        # The same episode from the task folder gives the same answer (one pipeline, one seeding rule).
        again = peftdb.suggest(db, model, folder, tmp_path / "init2", **FAST)
    assert res.report["task"] == "social_support" and res.report["k_used"] == 4
    assert res.decision in ("ensemble", "best-single", "scratch")
    assert "social_support" not in [c["task"] for c in res.candidates]
    assert abs(sum(c["weight"] for c in res.candidates) - (0 if res.decision == "scratch" else 1)) < 1e-6
    assert {e[0] for e in events} >= {"target adapter", "retrieval"}
    files = {p.name for p in (tmp_path / "init").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "peftdb_report.json"}
    assert json.loads((tmp_path / "init" / "peftdb_report.json").read_text()) == res.report
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}
    assert strip(again.report) == strip(res.report)


def test_evaluate_equals_the_cli(demo, tasks_dir, model_dir, cli):
    folder = tasks_dir / "metaphor_paraphrase"
    with peftdb.Store(demo, read_only=True) as db:
        (obj,) = db.objects(task="movie_sentiment")
        got = peftdb.evaluate(model_dir, folder, db=db, object=obj.id, split="dev", max_len=64, progress=False)
    want = json.loads(run_cli(cli, demo, "eval", "--model", str(model_dir), "--task", str(folder), "--split", "dev",
                              "--max-len", "64", "--object", str(obj.id)))
    assert got.accuracy == want["accuracy"] and got.examples == want["examples"] == 80
    assert got.loss == pytest.approx(want["loss"], rel=1e-12)
    bare = peftdb.evaluate(model_dir, folder, split="dev", max_len=64, progress=False)
    assert bare.adapter == "base model" and 0 <= bare.accuracy <= 1
    # bf16 products (`--matmul bf16`): the same numbers as the CLI's; an unknown precision is refused.
    half = peftdb.Model(model_dir, max_len=64, matmul="bf16")
    got = peftdb.evaluate(half, folder, split="dev", progress=False)
    want = json.loads(run_cli(cli, demo, "eval", "--model", str(model_dir), "--task", str(folder), "--split", "dev",
                              "--max-len", "64", "--matmul", "bf16"))
    assert got.accuracy == want["accuracy"] and got.loss == pytest.approx(want["loss"], rel=1e-9)
    assert got.loss != pytest.approx(bare.loss, rel=1e-9), "bf16 products changed nothing"
    with pytest.raises(ValueError, match="f32 \\(exact\\) or bf16"):
        peftdb.Model(model_dir, matmul="f16")


PEFT_PYTHON = os.environ.get("PEFTDB_PEFT_PYTHON")


@pytest.mark.skipif(not PEFT_PYTHON, reason="set PEFTDB_PEFT_PYTHON to a python with torch, transformers and peft")
def test_the_initialization_loads_in_peft(demo, tasks_dir, model_dir, tmp_path):
    with peftdb.Store(demo, read_only=True) as db:
        res = peftdb.suggest(db, model_dir, tasks_dir / "movie_sentiment", tmp_path / "init", **FAST)
    script = textwrap.dedent("""
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        from peft import PeftModel
        base = AutoModel.from_pretrained(sys.argv[1])
        model = PeftModel.from_pretrained(base, sys.argv[2])
        saved = load_file(sys.argv[2] + "/adapter_model.safetensors")
        state = model.state_dict()
        n = 0
        for name, t in saved.items():
            key = name.replace(".weight", ".default.weight")
            assert torch.equal(state[key], t), name
            n += 1
        print(n)
    """)
    out = subprocess.run([PEFT_PYTHON, "-c", script, str(model_dir), str(res.out)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 24  # LoRA r=8 on query and value of 6 layers: A and B


def test_a_decoder_model_evaluates_like_the_cli(tasks_dir, cli):
    """A Llama-family GGUF (scripts/fetch-decoder.sh) loads as a Model, with a prompt, and scores a task as
    `peftdb eval` does; the PEFT LoRA fixture for it runs too."""
    gguf = ROOT / "models" / "smollm2-135m-instruct" / "model.gguf"
    assert gguf.is_file(), f"{gguf}: run scripts/fetch-decoder.sh"
    folder = tasks_dir / "metaphor_paraphrase"
    prompt = "Text: {text}\nIs it a paraphrase? Answer:"
    m = peftdb.Model(gguf, max_len=32, prompt=prompt)
    lora = ROOT / "tests" / "fixtures" / "decoder" / "lora_r8_all"
    for adapter in (None, lora):
        got = peftdb.evaluate(m, folder, adapter, split="dev", progress=False)
        args = ["eval", "--model", str(gguf), "--task", str(folder), "--split", "dev", "--max-len", "32",
                "--prompt", prompt]
        if adapter is not None:
            args += ["--adapter", str(adapter)]
        want = json.loads(run_cli(cli, ROOT / "unused.peftdb", *args))
        assert got.accuracy == want["accuracy"] and got.examples == want["examples"] == 80
        assert got.loss == pytest.approx(want["loss"], rel=1e-9)
    with pytest.raises(peftdb.errors.InvalidInputError):
        peftdb.Model(gguf, prompt="no placeholder")
    # A bf16 base scores as `peftdb eval --dtype bf16` does; an unknown dtype is refused by name.
    half = peftdb.Model(gguf, max_len=32, prompt=prompt, dtype="bf16")
    got = peftdb.evaluate(half, folder, None, split="dev", progress=False)
    want = json.loads(run_cli(cli, ROOT / "unused.peftdb", "eval", "--model", str(gguf), "--task", str(folder),
                              "--split", "dev", "--max-len", "32", "--prompt", prompt, "--dtype", "bf16"))
    assert got.accuracy == want["accuracy"] and got.loss == pytest.approx(want["loss"], rel=1e-9)
    with pytest.raises(ValueError, match="f32, bf16 or f16"):
        peftdb.Model(gguf, dtype="f64")
