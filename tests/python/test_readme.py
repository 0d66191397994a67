"""The README's "From Python" example runs as written: its first code block in a folder laid out like the
repository root (the demo zoo, the test model and data/tasks linked in), then, with PEFTDB_PEFT_PYTHON set,
its second block (PeftModel.from_pretrained on the folder the first wrote)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def blocks():
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_python_example_runs_as_written(tmp_path, tasks_dir, model_dir):
    first, second = blocks()
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "demo-zoo").symlink_to(ROOT / "examples" / "demo-zoo")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "all-MiniLM-L6-v2").symlink_to(model_dir)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tasks").symlink_to(tasks_dir)
    out = subprocess.run([sys.executable, "-c", first], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "14 ingested, 0 rejected"
    assert re.fullmatch(r"initialization: accuracy 0\.\d{3} on 264 test examples", lines[-1]), lines[-1]
    assert (tmp_path / "init" / "adapter_model.safetensors").is_file()
    peft_python = os.environ.get("PEFTDB_PEFT_PYTHON")
    if peft_python:
        out = subprocess.run([peft_python, "-c", second], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
