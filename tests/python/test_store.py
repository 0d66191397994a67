"""The store from Python: open/create/close, ingest (with its report), records, embeddings (checked against a
numpy TuPaTE of the fixture's own safetensors), export, remove, and nearest (checked against the CLI)."""

import filecmp
import json
import struct
from pathlib import Path

import numpy as np
import pytest

import peftdb
from conftest import DEMO_ZOO, FIXTURES, run_cli


def read_safetensors(path: Path) -> dict:
    """A safetensors file as numpy arrays, by hand (the format: u64 header length, JSON header, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": None}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=dtypes[t["dtype"]]).reshape(t["shape"])
    return out


def numpy_tupate(tensors: dict) -> np.ndarray:
    """TuPaTE (schema/store.md): per layer, the tensors keyed by their name inside the layer, sorted, flattened
    row-major and concatenated; then the mean over layers."""
    layers: dict = {}
    for name, t in tensors.items():
        head, rest = name.split(".layer.", 1)
        idx, key = rest.split(".", 1)
        layers.setdefault(int(idx), []).append((key, t))
    rows = [np.concatenate([t.astype(np.float64).ravel() for _, t in sorted(ts, key=lambda kt: kt[0].encode())])
            for _, ts in sorted(layers.items())]
    return np.mean(rows, axis=0)


def test_create_open_close_and_context_manager(tmp_path):
    path = tmp_path / "zoo.peftdb"
    with pytest.raises(peftdb.StoreNotFoundError) as e:
        peftdb.Store(path)
    assert str(path) in str(e.value) and isinstance(e.value, FileNotFoundError)
    with peftdb.Store(path, create=True) as db:
        assert db.writable and not db.closed and db.tasks() == []
    assert db.closed
    with pytest.raises(ValueError, match="closed"):
        db.tasks()
    db.close()  # idempotent
    with peftdb.Store(path, read_only=True) as ro:
        assert not ro.writable


def test_ingest_reports_every_folder_and_records_read_back(tmp_path, fixture_zoo):
    bad = fixture_zoo / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    events = []
    with peftdb.Store(tmp_path / "z.peftdb", create=True) as db:
        rep = db.ingest(fixture_zoo, progress=lambda ev, done, total: events.append((ev, done, total)))
        assert len(rep.items) == 7 and len(rep.ingested) == 6
        assert [i.path for i in rep.rejected] == [str(bad)]
        assert str(bad / "adapter_model.safetensors") in rep.rejected[0].reason
        assert events[0] == ("ingest", 0, 7) and events[-1] == ("ingest", 7, 7)
        again = db.ingest([fixture_zoo / "ia3"])
        assert [i.status for i in again.items] == ["already_present"]
        tasks = {t.name: t for t in db.tasks()}
        assert set(tasks) == {"lora_r8_qv", "lora_rslora", "lora_bias_all", "ia3", "prefix_20", "prompt_10"}
        assert all(t.objects == 1 for t in tasks.values())
        loras = db.objects(method="lora")
        assert sorted(o.task for o in loras) == ["lora_bias_all", "lora_r8_qv", "lora_rslora"]
        (o,) = db.objects(task="lora_r8_qv")
        assert db.object(o.id) == o
        assert o.method == "lora" and o.config["r"] == 8 and o.tensor_count == 24
        with pytest.raises(peftdb.NotFoundError) as e:
            db.object(10_000)
        assert isinstance(e.value, LookupError)
        stats = db.stats()
        assert stats["objects"] == 6


def test_embedding_is_the_numpy_tupate_of_the_fixture(tmp_path):
    with peftdb.Store(tmp_path / "z.peftdb", create=True) as db:
        (item,) = db.ingest([FIXTURES / "lora_r8_qv"]).ingested
        emb = db.embedding(item.id)
        assert emb.dtype == np.float32 and emb.shape == (4 * 8 * 384,)
        want = numpy_tupate(read_safetensors(FIXTURES / "lora_r8_qv" / "adapter_model.safetensors"))
        # The store keeps embeddings as f16 scaled by the vector's largest |element| (schema/store.md): the
        # error is at most 2^-11 of that element. A wrong order or layer mean would be off by O(1).
        bound = np.abs(want).max() * 2.0**-11
        np.testing.assert_allclose(emb, want, rtol=0, atol=bound)
        assert np.corrcoef(emb, want)[0, 1] > 0.999999
        # The space id works as a vector query: the object's own task comes back first with cosine 1.
        space = db.embedding_space(item.id)
        hits = db.nearest(vector=emb, space=space, k=1, include_self=True)
        assert hits[0].task == "lora_r8_qv" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        with pytest.raises(peftdb.NotFoundError, match="delta-sketch|embedding"):
            db.embedding(item.id, kind="nope")


def test_export_is_byte_identical_and_remove_forgets(tmp_path):
    with peftdb.Store(tmp_path / "z.peftdb", create=True) as db:
        (item,) = db.ingest([FIXTURES / "ia3"]).ingested
        out = db.export(item.id, tmp_path / "out")
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert filecmp.cmp(out / f, FIXTURES / "ia3" / f, shallow=False), f
        with pytest.raises(peftdb.AlreadyExistsError):
            db.export(item.id, tmp_path / "out")
        (gone,) = db.remove(item.id)
        assert gone.id == item.id and db.objects() == []


def test_nearest_matches_the_cli(tmp_path, cli):
    path = tmp_path / "demo.peftdb"
    with peftdb.Store(path, create=True) as db:
        assert len(db.ingest(DEMO_ZOO).ingested) == 14
    for sim in ("tupate", "delta", "centered"):
        with peftdb.Store(path) as db:
            got = db.nearest(task="tweet_sentiment", k=5, similarity=sim)
        want = json.loads(run_cli(cli, path, "nearest", "--task", "tweet_sentiment", "-k", "5", "--similarity", sim))
        assert got.to_dict() == want, sim
        assert [h.task for h in got] == [t["task"] for t in want["tasks"]]
        assert len(got) == 5 and "tweet_sentiment" not in [h.task for h in got]
    with peftdb.Store(path) as db:
        by_adapter = db.nearest(adapter=DEMO_ZOO / "movie_sentiment" / "lora", k=3, similarity="delta")
        want = json.loads(run_cli(cli, path, "nearest", "--adapter", str(DEMO_ZOO / "movie_sentiment" / "lora"), "-k", "3",
                                  "--similarity", "delta"))
        assert by_adapter.to_dict() == want


def test_a_progress_callback_may_read_the_store_it_reports_on(tmp_path, fixture_zoo):
    seen = []
    with peftdb.Store(tmp_path / "z.peftdb", create=True) as db:
        rep = db.ingest(fixture_zoo, batch_size=2, progress=lambda ev, done, total: seen.append(len(db.objects())))
    assert len(rep.ingested) == 6
    # Each report comes after its batch is committed, so the store already holds it.
    assert seen[0] == 0 and seen[-1] == 6 and seen == sorted(seen)
