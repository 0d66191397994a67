"""Every kind of failure arrives as its peftdb.errors class, with the library's message (naming the file and
the fix); a second writer is refused naming the holder's pid; Ctrl-C during an ingestion leaves the store
whole, and re-running finishes it."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peftdb
from conftest import DEMO_ZOO, FIXTURES, ROOT


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "z.peftdb"
    peftdb.Store(path, create=True).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, peftdb
            db = peftdb.Store({str(path)!r})
            print("open", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(peftdb.StoreLockedError) as e:
            peftdb.Store(path)
        assert e.value.pid == holder.pid
        assert str(path) in str(e.value) and "read-only" in str(e.value)
        # Readers still work beside the writer.
        with peftdb.Store(path, read_only=True) as ro:
            assert ro.tasks() == []
            with pytest.raises(peftdb.ReadOnlyError):
                ro.ingest([FIXTURES / "ia3"])
    finally:
        holder.communicate("\n", timeout=30)
    with peftdb.Store(path) as db:  # released when the holder exits
        assert db.writable


def test_each_error_kind_has_its_class(tmp_path, model_dir):
    not_a_store = tmp_path / "junk.peftdb"
    not_a_store.write_bytes(b"\0" * 4096)
    with pytest.raises(peftdb.NotAStoreError, match="not a peftdb store"):
        peftdb.Store(not_a_store)
    with pytest.raises(peftdb.SchemaVersionError, match="older"):
        peftdb.Store(ROOT / "tests" / "fixtures" / "store-v1" / "three.peftdb", read_only=True)
    db = peftdb.Store(tmp_path / "z.peftdb", create=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(peftdb.InvalidAdapterError) as e:
        db.ingest([bad], strict=True)
    assert str(bad / "adapter_config.json") in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(peftdb.NotFoundError):
        db.nearest(task="nope")
    with pytest.raises(peftdb.InvalidInputError, match="exactly one"):
        db.nearest(task="a", object=1)
    with pytest.raises(peftdb.InvalidInputError, match="similarity"):
        db.nearest(task="a", similarity="euclid")
    with pytest.raises(peftdb.InvalidTaskError, match="unknown label"):
        peftdb.TaskData("t", {"pos": "positive", "neg": "negative"}, [("good", "pos"), ("bad", "meh")], [("ok", "pos")])
    with pytest.raises(peftdb.InvalidTaskError, match="verbalizer"):
        peftdb.TaskData("t", {"pos": "positive", "neg": " "}, [("good", "pos")], [("ok", "pos")])
    with pytest.raises(peftdb.ModelError, match="config.json"):
        peftdb.Model(tmp_path)
    task = peftdb.TaskData("t", {"pos": "positive", "neg": "negative"},
                           [("good", "pos"), ("bad", "neg")] * 4, [("fine", "pos"), ("awful", "neg")] * 4)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(peftdb.AlreadyExistsError, match="not empty"):
        peftdb.suggest(db, model_dir, task, full, progress=False)
    assert (full / "notes.txt").read_text() == "mine"
    with pytest.raises(peftdb.NoCandidatesError, match="ingest"):
        peftdb.suggest(db, model_dir, task, tmp_path / "init", steps=1, shots=2, progress=False)
    assert not (tmp_path / "init").exists()
    db.close()
    assert all(issubclass(getattr(peftdb, n), peftdb.Error) for n in peftdb.errors.__all__)


def test_ctrl_c_during_ingest_keeps_the_store_whole(tmp_path):
    path = tmp_path / "z.peftdb"
    seen = []

    def interrupt(event, done, total):
        seen.append(done)
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C

    with peftdb.Store(path, create=True) as db:
        try:
            db.ingest(DEMO_ZOO, batch_size=3, progress=interrupt)
            raised = False
        except KeyboardInterrupt:
            raised = True
        kept = db.objects()
    # Seen once in CI (session 22) and not reproduced: say what the callback saw if it happens again.
    assert raised, f"no KeyboardInterrupt; the callback saw done = {seen}, {len(kept)} objects stored"
    # A batch is reported once it is on the disk, which the store writes behind the next batch's commit:
    # the first batch's reports come after the second batch committed, and nothing after that is stored.
    assert len(kept) == 6 and max(seen) == 3
    with peftdb.Store(path) as db:  # reopens cleanly; re-running adds the rest, skipping what is stored
        rep = db.ingest(DEMO_ZOO, progress=False)
        assert (len(rep.ingested), len(rep.already_present)) == (8, 6)
        assert len(db.objects()) == 14


def test_an_exception_in_the_progress_callback_stops_the_ingestion(tmp_path):
    def fail(event, done, total):
        if done == 2:
            raise RuntimeError("stop here")

    with peftdb.Store(tmp_path / "z.peftdb", create=True) as db:
        with pytest.raises(RuntimeError, match="stop here"):
            db.ingest(DEMO_ZOO, batch_size=2, progress=fail)
        # The first batch is reported after the second committed (see above); nothing after it is stored.
        assert len(db.objects()) == 4
