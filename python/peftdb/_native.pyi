"""Type stub of ``peftdb._native``, the Rust core's bindings. Use the ``peftdb`` package instead: it wraps
these in dataclasses, progress bars and keyword arguments. Records cross as JSON strings (the same JSON the
CLI's ``--json`` prints); every error is raised as a :mod:`peftdb.errors` class."""

from os import PathLike
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike[str]]
_Progress = Optional[Callable[[str, int, int], Any]]

VERSION: str
SCHEMA_VERSION: int

class Store:
    """An open store; the GIL is released while it works."""

    path: str
    closed: bool
    writable: bool
    def __init__(self, path: _Path, create: bool = False, read_only: bool = False) -> None: ...
    def close(self) -> None:
        """Close the store and release its write lock (idempotent)."""
    def ingest(
        self,
        paths: Sequence[_Path],
        manifest: Optional[_Path] = None,
        task: Optional[str] = None,
        base_model: Optional[str] = None,
        strict: bool = False,
        allow_non_finite: bool = False,
        batch_size: int = 64,
        progress: _Progress = None,
    ) -> str:
        """JSON list of ``{path, status, id | reason}``. Ctrl-C or an exception raised by ``progress`` stops
        after the batch being committed (each committed batch stays) and is re-raised."""
    def tasks(self) -> str:
        """JSON list of task records, each with ``objects`` (its object count)."""
    def objects(self, task: Optional[str] = None, method: Optional[str] = None) -> str:
        """JSON list of object records."""
    def object(self, id: int) -> str:
        """JSON object record."""
    def embedding(self, id: int, kind: str = "tupate") -> Tuple[npt.NDArray[np.float32], str]:
        """The embedding (moved into numpy without a copy) and its space id."""
    def export(self, id: int, out: _Path) -> None:
        """Write the object back as its adapter folder."""
    def remove(self, ids: Sequence[int]) -> str:
        """JSON list of the removed records."""
    def stats(self) -> str:
        """JSON counts, bytes and spaces."""
    def nearest(
        self,
        task: Optional[str] = None,
        object: Optional[int] = None,
        adapter: Optional[_Path] = None,
        vector: Optional[Sequence[float]] = None,
        space: Optional[str] = None,
        k: int = 10,
        similarity: str = "tupate",
        method: Optional[str] = None,
        group: Optional[str] = None,
        tags: Sequence[str] = ...,
        base_model: Optional[str] = None,
        include_self: bool = False,
        mode: str = "auto",
    ) -> str:
        """The JSON ``peftdb --json nearest`` prints."""

class Model:
    """A base model loaded once (a Hugging Face encoder folder, or a Llama-family GGUF file)."""

    path: str
    device: str
    max_len: int
    def __init__(
        self,
        path: _Path,
        device: str = "cpu",
        max_len: int = 128,
        prompt: Optional[str] = None,
        dtype: str = "f32",
        matmul: str = "f32",
    ) -> None: ...

class TaskSpec:
    """A task: Python data (``(id, verbalizer)`` labels, ``(text, label id)`` rows) or a folder."""

    name: str
    labels: List[Tuple[str, str]]
    def __init__(
        self,
        name: str,
        labels: Sequence[Tuple[str, str]],
        train: Sequence[Tuple[str, str]],
        dev: Sequence[Tuple[str, str]],
        test: Sequence[Tuple[str, str]],
        group: Optional[str] = None,
    ) -> None: ...
    @staticmethod
    def load(dir: _Path) -> "TaskSpec": ...
    def counts(self) -> List[Tuple[str, int]]: ...

def suggest(
    store: Store,
    model: Model,
    task: TaskSpec,
    out: _Path,
    adapter: Optional[_Path] = None,
    k: int = ...,
    shots: int = 16,
    seed: int = 0,
    indicator: Optional[str] = None,
    tau: float = ...,
    method: str = "lora",
    merge: str = "delta-cat",
    rank: Optional[int] = None,
    similarity: str = "delta",
    noise_z: float = ...,
    accuracy_guard: bool = ...,
    steps: int = 20,
    base_model: Optional[str] = None,
    label_prior: Optional[str] = None,
    temperature: float = ...,
    progress: _Progress = None,
) -> str:
    """Write the initialization into ``out``; returns the report as JSON."""

def evaluate(
    model: Model,
    task: TaskSpec,
    adapter: Optional[_Path] = None,
    store: Optional[Store] = None,
    object: Optional[int] = None,
    split: str = "test",
    batch_size: int = 32,
    temperature: float = ...,
    progress: _Progress = None,
) -> str:
    """JSON ``{task, split, adapter, examples, accuracy, loss, majority_rate, temperature}``."""
