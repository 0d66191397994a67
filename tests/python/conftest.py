"""Shared fixtures of the Python tests: the repository's data (PEFT fixtures, the demo zoo, the task data,
the test model) and the `peftdb` CLI built by `cargo test` (compared with the bindings' answers)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("PEFTDB_FIXTURES", ROOT / "tests" / "fixtures" / "peft"))
DEMO_ZOO = ROOT / "examples" / "demo-zoo"


def _tasks_dir() -> Path:
    env = os.environ.get("PEFTDB_TASKS_DIR")
    if env:
        return Path(env)
    for d in (ROOT.parent / "shared" / "tasks", ROOT / "data" / "tasks"):
        if (d / "social_support" / "task.json").is_file():
            return d
    raise RuntimeError("task data not found: run scripts/fetch-tasks.sh (writes data/tasks), or set PEFTDB_TASKS_DIR")


@pytest.fixture(scope="session")
def tasks_dir() -> Path:
    return _tasks_dir()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    d = Path(os.environ.get("PEFTDB_MODEL_DIR", ROOT / "models" / "all-MiniLM-L6-v2"))
    assert (d / "model.safetensors").is_file(), f"test model not found at {d}: run scripts/fetch-model.sh"
    return d


@pytest.fixture(scope="session")
def cli() -> Path:
    """The peftdb binary (`cargo test` / `cargo build` put it in target/debug)."""
    p = Path(os.environ.get("PEFTDB_BIN", ROOT / "target" / "debug" / "peftdb"))
    assert p.is_file(), f"{p}: build the CLI first (cargo build --bin peftdb), or set PEFTDB_BIN"
    return p


def run_cli(cli: Path, db: Path, *args: str) -> str:
    out = subprocess.run([str(cli), "--db", str(db), "--json", *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture()
def fixture_zoo(tmp_path: Path) -> Path:
    """A zoo folder of the real PEFT fixtures, one task folder per adapter."""
    zoo = tmp_path / "zoo"
    for name in ("lora_r8_qv", "lora_rslora", "lora_bias_all", "ia3", "prefix_20", "prompt_10"):
        shutil.copytree(FIXTURES / name, zoo / name)
    return zoo
