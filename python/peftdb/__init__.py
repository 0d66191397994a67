"""peftdb: an embedded database for parameter-efficient adapters (LoRA, IA3, prefix and prompt tuning,
BitFit, bottleneck adapters).

It stores a zoo of adapters with their TuPaTE task embeddings in one crash-safe file, finds the source
tasks nearest to a new one, and suggests an initialization for the new task: the candidates that help on
a few of its examples, merged into a Hugging Face PEFT folder that ``PeftModel.from_pretrained`` loads.

    import peftdb
    with peftdb.Store("zoo.peftdb", create=True) as db:
        db.ingest(["zoo/"])
        hits = db.nearest(task="sst2", k=5)
        res = peftdb.suggest(db, model="models/all-MiniLM-L6-v2", task="tasks/new", out="init/")

This package is a thin layer over the Rust library (``peftdb._native``): the same pipeline the ``peftdb``
command runs, with its errors as :mod:`peftdb.errors` exceptions. Long operations release the GIL.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native, errors
from .errors import *  # noqa: F401,F403 - the exception classes are part of the top-level API

__version__: str = _native.VERSION
SCHEMA_VERSION: int = _native.SCHEMA_VERSION

PathLike = Union[str, "os.PathLike[str]"]
#: ``progress(event, done, total)``; ``event`` names the stage (``ingest``, ``target adapter``,
#: ``rerank`` ...). ``None``: a tqdm bar when tqdm is importable; ``False``: nothing.
Progress = Union[None, bool, Callable[[str, int, int], Any]]

__all__ = [
    "Store",
    "Model",
    "TaskData",
    "TaskRecord",
    "ObjectRecord",
    "IngestItem",
    "IngestReport",
    "NearestResult",
    "TaskHit",
    "Suggestion",
    "Evaluation",
    "suggest",
    "evaluate",
    "errors",
    "SCHEMA_VERSION",
] + errors.__all__


def _fspath(p: Optional[PathLike]) -> Optional[str]:
    return os.fspath(p) if p is not None else None


def _progress(progress: Progress) -> Optional[Callable[[str, int, int], Any]]:
    """The callable handed to the native module: the user's, a tqdm bar, or none."""
    if progress is False:
        return None
    if callable(progress):
        return progress
    try:
        from tqdm.auto import tqdm  # type: ignore[import-not-found]
    except ImportError:
        return None
    bars: Dict[str, Any] = {}

    def update(event: str, done: int, total: int) -> None:
        bar = bars.get(event)
        if bar is None:
            for other in bars.values():
                other.close()
            bars.clear()
            bar = bars[event] = tqdm(total=total, desc=event, leave=False, file=sys.stderr)
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
        if total and done >= total:
            bar.close()

    return update


@dataclass(frozen=True)
class TaskRecord:
    """A task of the store."""

    name: str
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    train_size: Optional[int] = None
    description: Optional[str] = None
    #: Objects of this task in the store.
    objects: int = 0


@dataclass(frozen=True)
class ObjectRecord:
    """A stored adapter ("lightweight object"): everything but its tensors and embeddings."""

    id: int
    task: str
    #: ``lora``, ``ia3``, ``prefix``, ``prompt``, ``bitfit`` or ``adapter``.
    method: str
    base_model: str
    format: str
    content_hash: str
    dtype: str
    tensor_count: int
    num_params: int
    data_bytes: int
    added_at: int
    config_json: str
    source: Optional[str] = None
    stage: Optional[str] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    #: ``[{"kind": "tupate", "space": "..."}]``: the spaces this object is embedded in.
    embeddings: List[Dict[str, Any]] = field(default_factory=list)
    #: Why an object has no embedding of some kind.
    no_embedding: List[Dict[str, Any]] = field(default_factory=list)
    safetensors_metadata: Optional[Dict[str, str]] = None

    @property
    def config(self) -> Dict[str, Any]:
        """The adapter's ``adapter_config.json``."""
        return json.loads(self.config_json)

    @classmethod
    def _from(cls, d: Mapping[str, Any]) -> "ObjectRecord":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class IngestItem:
    """What happened to one adapter folder."""

    path: str
    #: ``ingested``, ``already_present`` or ``rejected``.
    status: str
    id: Optional[int] = None
    reason: Optional[str] = None


@dataclass(frozen=True)
class IngestReport:
    """The outcome of :meth:`Store.ingest`, one item per adapter folder found."""

    items: List[IngestItem]

    @property
    def ingested(self) -> List[IngestItem]:
        return [i for i in self.items if i.status == "ingested"]

    @property
    def already_present(self) -> List[IngestItem]:
        return [i for i in self.items if i.status == "already_present"]

    @property
    def rejected(self) -> List[IngestItem]:
        """Adapters that were not stored, each with the reason (naming the file)."""
        return [i for i in self.items if i.status == "rejected"]


@dataclass(frozen=True)
class TaskHit:
    """One nearest task."""

    rank: int
    task: str
    score: float
    group: Optional[str] = None
    #: ``[{"label": space, "score": s}]``: the score in each space searched.
    per_space: List[Dict[str, Any]] = field(default_factory=list)
    #: ``[{"id": ..., "score": ...}]``: the task's objects that matched.
    objects: List[Dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class NearestResult:
    """The answer of :meth:`Store.nearest`; :meth:`to_dict` is what ``peftdb --json nearest`` prints."""

    tasks: List[TaskHit]
    raw: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return self.raw

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> TaskHit:
        return self.tasks[i]


@dataclass(frozen=True)
class Suggestion:
    """The answer of :func:`suggest`: the folder written and its report (``peftdb_report.json``)."""

    out: Path
    report: Dict[str, Any]

    @property
    def decision(self) -> str:
        """``ensemble``, ``best-single`` or ``scratch``."""
        return self.report["decision"]

    @property
    def candidates(self) -> List[Dict[str, Any]]:
        """Every candidate source: task, object, scores, gain over the bare model, helps, weight."""
        return self.report["candidates"]

    @property
    def weights(self) -> Dict[str, float]:
        """Weight of each source task in the initialization (those with weight > 0)."""
        return {c["task"]: c["weight"] for c in self.candidates if c["weight"] > 0}


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and loss on a task split (the number ``peftdb eval`` prints)."""

    task: str
    split: str
    adapter: str
    examples: int
    accuracy: float
    loss: float
    majority_rate: float
    temperature: float


class Store:
    """A peftdb store: one file holding the zoo. A context manager (``with Store(p) as db``).

    ``Store(path)`` opens it for writing (one writer at a time: another process gets
    :class:`StoreLockedError`); ``create=True`` creates it when missing; ``read_only=True`` opens it
    for reading, beside a writer.
    """

    def __init__(self, path: PathLike, create: bool = False, read_only: bool = False) -> None:
        self._s = _native.Store(os.fspath(path), create=create, read_only=read_only)

    @property
    def path(self) -> Path:
        return Path(self._s.path)

    @property
    def closed(self) -> bool:
        return self._s.closed

    @property
    def writable(self) -> bool:
        return self._s.writable

    def close(self) -> None:
        """Close the store and release its lock (idempotent)."""
        self._s.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._s)

    def ingest(
        self,
        paths: Union[PathLike, Sequence[PathLike]] = (),
        *,
        manifest: Optional[PathLike] = None,
        task: Optional[str] = None,
        base_model: Optional[str] = None,
        strict: bool = False,
        allow_non_finite: bool = False,
        batch_size: int = 64,
        progress: Progress = None,
    ) -> IngestReport:
        """Ingest adapter folders or whole zoo folders (walked for adapters), or a zoo manifest.

        Bad adapters are reported in :attr:`IngestReport.rejected` with the reason, unless ``strict``
        (then :class:`InvalidAdapterError` stops at the first, after committing those before it).
        Ctrl-C stops after the batch being committed: what is committed stays, re-running skips it.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        items = json.loads(
            self._s.ingest(
                [os.fspath(p) for p in paths],
                manifest=_fspath(manifest),
                task=task,
                base_model=base_model,
                strict=strict,
                allow_non_finite=allow_non_finite,
                batch_size=batch_size,
                progress=_progress(progress),
            )
        )
        return IngestReport([IngestItem(**i) for i in items])

    def tasks(self) -> List[TaskRecord]:
        """Every task, with its object count."""
        return [TaskRecord(**t) for t in json.loads(self._s.tasks())]

    def objects(self, task: Optional[str] = None, method: Optional[str] = None) -> List[ObjectRecord]:
        """Object records, optionally only of one task and/or method."""
        return [ObjectRecord._from(o) for o in json.loads(self._s.objects(task=task, method=method))]

    def object(self, id: int) -> ObjectRecord:
        """One object's record (:class:`NotFoundError` if there is none)."""
        return ObjectRecord._from(json.loads(self._s.object(id)))

    def embedding(self, id: int, kind: str = "tupate") -> "Any":
        """The object's embedding as a float32 numpy array (``kind``: ``tupate`` or ``delta-sketch``)."""
        return self._s.embedding(id, kind)[0]

    def embedding_space(self, id: int, kind: str = "tupate") -> str:
        """The id of the space the object's embedding of ``kind`` lives in (for ``nearest(vector=...)``)."""
        return self._s.embedding(id, kind)[1]

    def export(self, id: int, out: PathLike) -> Path:
        """Write the object back as the adapter folder it was ingested from (byte-identical tensors)."""
        self._s.export(id, os.fspath(out))
        return Path(out)

    def remove(self, ids: Union[int, Iterable[int]]) -> List[ObjectRecord]:
        """Remove objects; returns their records."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        return [ObjectRecord._from(o) for o in json.loads(self._s.remove(ids))]

    def stats(self) -> Dict[str, Any]:
        """Counts, bytes and spaces of the store."""
        return json.loads(self._s.stats())

    def nearest(
        self,
        task: Optional[str] = None,
        *,
        object: Optional[int] = None,
        adapter: Optional[PathLike] = None,
        vector: Optional[Any] = None,
        space: Optional[str] = None,
        k: int = 10,
        similarity: str = "tupate",
        method: Optional[str] = None,
        group: Optional[str] = None,
        tags: Sequence[str] = (),
        base_model: Optional[str] = None,
        include_self: bool = False,
        mode: str = "auto",
    ) -> NearestResult:
        """The ``k`` tasks nearest to a stored task, an object, an adapter folder, or a vector of a space.

        ``similarity``: ``tupate`` (the paper), ``centered`` or ``delta`` (LoRA updates). The query's own
        task is left out unless ``include_self``.
        """
        vec = None
        if vector is not None:
            vec = [float(x) for x in (vector.tolist() if hasattr(vector, "tolist") else vector)]
        raw = json.loads(
            self._s.nearest(
                task=task,
                object=object,
                adapter=_fspath(adapter),
                vector=vec,
                space=space,
                k=k,
                similarity=similarity,
                method=method,
                group=group,
                tags=list(tags),
                base_model=base_model,
                include_self=include_self,
                mode=mode,
            )
        )
        hits = [TaskHit(**t) for t in raw["tasks"]]
        return NearestResult(hits, raw)


class Model:
    """A base model, loaded once: a BERT-family encoder (Hugging Face folder: config.json,
    model.safetensors, tokenizer.json) or a Llama-family decoder (a GGUF file, or a folder holding one).
    ``prompt`` (decoders only) wraps each input text, with ``{text}`` where it goes; each label's
    verbalizer (a space and its text) follows it. ``None``: ``"Input: {text}\nAnswer:"``. ``dtype``
    (decoders only): ``"f32"``, ``"bf16"`` or ``"f16"``, the dtype the frozen base's matrices are held in
    (half the memory; activations and adapters stay f32). ``matmul`` (encoders on the CPU): ``"f32"``
    (exact) or ``"bf16"``, the frozen linear layers' products with weights and inputs rounded to bf16
    (faster on CPUs with AVX512-BF16, at a small accuracy cost: README "Performance")."""

    def __init__(
        self,
        path: PathLike,
        device: str = "cpu",
        max_len: int = 128,
        prompt: Optional[str] = None,
        dtype: str = "f32",
        matmul: str = "f32",
    ) -> None:
        self._m = _native.Model(
            os.fspath(path), device=device, max_len=max_len, prompt=prompt, dtype=dtype, matmul=matmul
        )

    @property
    def path(self) -> Path:
        return Path(self._m.path)

    def __repr__(self) -> str:
        return repr(self._m)


def _model(model: Union[Model, PathLike], device: str, max_len: int) -> "_native.Model":
    return model._m if isinstance(model, Model) else _native.Model(os.fspath(model), device=device, max_len=max_len)


class TaskData:
    """A task given as Python data rather than a folder.

    ``labels``: ``{id: verbalizer}`` or ``[(id, verbalizer), ...]`` (the verbalizer is the text a label
    is scored by). ``train``/``dev``/``test``: ``[(text, label_id), ...]``. ``suggest`` draws its few
    shots per class from train and dev; ``test`` may be empty.
    """

    def __init__(
        self,
        name: str,
        labels: Union[Mapping[str, str], Sequence[Tuple[str, str]]],
        train: Sequence[Tuple[str, Any]],
        dev: Sequence[Tuple[str, Any]],
        test: Sequence[Tuple[str, Any]] = (),
        group: Optional[str] = None,
    ) -> None:
        pairs = list(labels.items()) if isinstance(labels, Mapping) else [tuple(p) for p in labels]

        def rows(split: Sequence[Tuple[str, Any]]) -> List[Tuple[str, str]]:
            return [(str(t), str(l)) for t, l in split]

        self._t = _native.TaskSpec(
            name, [(str(i), str(v)) for i, v in pairs], rows(train), rows(dev), rows(test), group=group
        )

    @classmethod
    def load(cls, folder: PathLike) -> "TaskData":
        """A task folder (task.json + train/dev/test.jsonl)."""
        self = cls.__new__(cls)
        self._t = _native.TaskSpec.load(os.fspath(folder))
        return self

    @property
    def name(self) -> str:
        return self._t.name

    @property
    def labels(self) -> List[Tuple[str, str]]:
        return self._t.labels

    def counts(self) -> Dict[str, int]:
        return dict(self._t.counts())

    def __repr__(self) -> str:
        return f"TaskData({self.name!r}, labels={[i for i, _ in self.labels]!r}, counts={self.counts()!r})"


def _task(task: Union[TaskData, PathLike]) -> "_native.TaskSpec":
    return task._t if isinstance(task, TaskData) else _native.TaskSpec.load(os.fspath(task))


def suggest(
    db: Store,
    model: Union[Model, PathLike],
    task: Union[TaskData, PathLike],
    out: PathLike,
    *,
    adapter: Optional[PathLike] = None,
    k: Optional[int] = None,
    shots: int = 16,
    seed: int = 0,
    indicator: Optional[str] = None,
    tau: Optional[float] = None,
    method: str = "lora",
    merge: str = "delta-cat",
    rank: Optional[int] = None,
    similarity: str = "delta",
    noise_z: Optional[float] = None,
    accuracy_guard: Optional[bool] = None,
    steps: int = 20,
    base_model: Optional[str] = None,
    label_prior: Optional[str] = None,
    device: str = "cpu",
    max_len: int = 128,
    progress: Progress = None,
) -> Suggestion:
    """Which stored adapters transfer to the new ``task``, and the initialization they make.

    The pipeline of ``peftdb suggest``: short-tune (or take ``adapter``) a target adapter on ``shots``
    examples per class, retrieve the ``k`` nearest tasks, score each candidate against the bare model on
    the few examples, and merge those that help (softmax of their scores over ``tau``) into a PEFT folder
    ``out`` (which must not exist or be empty), with ``peftdb_report.json`` beside it. Options left
    ``None`` take the library's defaults (tuned on the transfer study's dev split).
    """
    kw: Dict[str, Any] = {
        "adapter": _fspath(adapter),
        "shots": shots,
        "seed": seed,
        "indicator": indicator,
        "method": method,
        "merge": merge,
        "rank": rank,
        "similarity": similarity,
        "steps": steps,
        "base_model": base_model,
        "label_prior": label_prior,
        "progress": _progress(progress),
    }
    for name, value in (("k", k), ("tau", tau), ("noise_z", noise_z), ("accuracy_guard", accuracy_guard)):
        if value is not None:
            kw[name] = value
    report = json.loads(_native.suggest(db._s, _model(model, device, max_len), _task(task), os.fspath(out), **kw))
    return Suggestion(Path(out), report)


def evaluate(
    model: Union[Model, PathLike],
    task: Union[TaskData, PathLike],
    adapter: Optional[PathLike] = None,
    *,
    db: Optional[Store] = None,
    object: Optional[int] = None,
    split: str = "test",
    batch_size: int = 32,
    device: str = "cpu",
    max_len: int = 128,
    progress: Progress = None,
) -> Evaluation:
    """Accuracy and loss of an adapter folder, a stored object (``db`` and ``object``) or the bare model
    (neither) on a split of ``task``: the number ``peftdb eval`` and the transfer study report."""
    raw = _native.evaluate(
        _model(model, device, max_len),
        _task(task),
        adapter=_fspath(adapter),
        store=db._s if db is not None else None,
        object=object,
        split=split,
        batch_size=batch_size,
        progress=_progress(progress),
    )
    return Evaluation(**json.loads(raw))
