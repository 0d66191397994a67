//! Faults injected at the storage layer: a redb `StorageBackend` that wraps the file backend and, after N
//! operations (writes, syncs, length changes), fails every later one with an I/O error (a disk that
//! died or filled up) or fails just one (a transient error). This reaches paths the SIGKILL test cannot:
//! the process *survives* the failed write or fsync, gets an error back from redb in the middle of a
//! commit, reports it, and may keep using the store.
//!
//! For a seeded spread of fault points over a whole ingestion, it checks:
//! - the failure surfaces as `StoreError::Storage` (a clear error, never a panic);
//! - the handle that saw the fault answers later reads and writes with clear errors (redb asks for the
//!   database to be closed and reopened after any I/O error), never a panic;
//! - reopening the file with the plain file backend succeeds, shows only whole batches (a prefix of an
//!   uninterrupted run) with every tensor and embedding, and re-running the ingestion reaches exactly
//!   the uninterrupted state.
//!
//! Uses `Store::with_backend` (src/store/backend.rs).

mod common;

use common::{check_integrity, long_tests, snapshot, Rng, Snapshot};
use peftdb::error::{IngestError, OpenError, StoreError};
use peftdb::ingest::{ingest_zoo, IngestOptions};
use peftdb::object::MethodKind;
use peftdb::store::Store;
use peftdb::synth::{write_zoo, ModelShape};
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
struct Faults {
    /// Operations (write, sync_data, set_len) done so far.
    ops: AtomicU64,
    /// The operation index at which faults start.
    fail_at: AtomicU64,
    /// Fail every operation from `fail_at` on (true), or only that one (false).
    sticky: AtomicBool,
    /// How many operations failed.
    failed: AtomicU64,
    /// Whether the store was created (schema committed) before the first fault surfaced.
    created: AtomicBool,
}

impl Faults {
    fn new(fail_at: u64, sticky: bool) -> Arc<Faults> {
        let f = Faults::default();
        f.fail_at.store(fail_at, Ordering::SeqCst);
        f.sticky.store(sticky, Ordering::SeqCst);
        Arc::new(f)
    }
    fn check(&self, what: &str) -> io::Result<()> {
        let i = self.ops.fetch_add(1, Ordering::SeqCst);
        let at = self.fail_at.load(Ordering::SeqCst);
        let hit = if self.sticky.load(Ordering::SeqCst) {
            i >= at
        } else {
            i == at
        };
        if hit {
            self.failed.fetch_add(1, Ordering::SeqCst);
            // ENOSPC, as a full disk reports it.
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("injected fault in {what} (op {i})"),
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FaultyBackend {
    inner: FileBackend,
    faults: Arc<Faults>,
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.faults.check("set_len")?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        self.faults.check("sync_data")?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.faults.check("write")?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }
    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

fn faulty(path: &Path, faults: &Arc<Faults>) -> FaultyBackend {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    FaultyBackend {
        inner: FileBackend::new(file).unwrap(),
        faults: faults.clone(),
    }
}

fn opts() -> IngestOptions {
    IngestOptions {
        batch_size: 2,
        ..Default::default()
    }
}

/// Run a whole ingestion through a faulty backend; returns the outcome of open + ingest.
fn ingest_through(path: &Path, zoo: &Path, faults: &Arc<Faults>) -> Result<(), StoreError> {
    // A fault while opening surfaces as the storage error inside `OpenError::Store`.
    let store = Store::with_backend(path, faulty(path, faults)).map_err(|e| match e {
        OpenError::Store(e) => e,
        other => panic!("opening through faults: not a storage error: {other}"),
    })?;
    faults.created.store(true, Ordering::SeqCst);
    match ingest_zoo(&store, &[zoo.to_path_buf()], None, &opts(), &|_| {}) {
        Ok(r) => {
            assert_eq!(r.rejected(), 0);
            Ok(())
        }
        Err(IngestError::Store(e)) => {
            // After an I/O error redb refuses further use of this handle until it is reopened: the same
            // process gets clear errors (never a panic, never a half-visible batch) for reads and writes.
            match store.objects() {
                Ok(_) => {
                    check_integrity(&store);
                }
                Err(StoreError::Storage { source, .. }) => {
                    // redb's own error is kept as the source, not flattened into a string.
                    let detail = source.to_string();
                    assert!(detail.contains("re-open"), "{detail}")
                }
                Err(other) => panic!("unclear error after a fault: {other:?}"),
            }
            assert!(matches!(
                store.remove(&[1]),
                Err(StoreError::Storage { .. } | StoreError::NotFound { .. })
            ));
            Err(e)
        }
        Err(other) => panic!("unexpected ingestion error: {other:?}"),
    }
}

fn full_run(path: &Path, zoo: &Path) -> Snapshot {
    let store = Store::open_or_create(path).unwrap();
    let r = ingest_zoo(&store, &[zoo.to_path_buf()], None, &opts(), &|_| {}).unwrap();
    assert_eq!(r.rejected(), 0);
    check_integrity(&store);
    snapshot(&store)
}

#[test]
fn injected_write_and_sync_faults_never_corrupt_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    let tasks = if long_tests() { 20 } else { 8 };
    write_zoo(
        &zoo,
        &ModelShape::minilm(),
        tasks,
        3,
        &[MethodKind::Lora, MethodKind::Bitfit],
        3,
    )
    .unwrap();
    // Reference: an uninterrupted run through the same (fault-free) backend, counting its operations.
    let counting = Faults::new(u64::MAX, true);
    let ref_path = tmp.path().join("ref.peftdb");
    ingest_through(&ref_path, &zoo, &counting).unwrap();
    let total_ops = counting.ops.load(Ordering::SeqCst);
    assert!(total_ops > 10, "only {total_ops} storage operations");
    let reference = {
        let s = Store::open_read_only(&ref_path).unwrap();
        assert_eq!(check_integrity(&s), tasks * 2);
        snapshot(&s)
    };

    let mut rng = Rng(0xfa17_5eed);
    let points = if long_tests() { 200 } else { 40 };
    let mut errors_seen = 0;
    for trial in 0..points {
        let at = rng.below(total_ops);
        let sticky = trial % 2 == 0;
        let path = tmp.path().join(format!("f{trial}.peftdb"));
        let faults = Faults::new(at, sticky);
        let outcome = ingest_through(&path, &zoo, &faults);
        let failed = faults.failed.load(Ordering::SeqCst);
        match &outcome {
            Err(StoreError::Storage { source: detail, .. }) => {
                errors_seen += 1;
                assert!(
                    failed > 0,
                    "trial {trial}: storage error without a fault: {detail}"
                );
            }
            Err(e) => {
                panic!("trial {trial} (fault at op {at}, sticky {sticky}): unclear error {e:?}")
            }
            Ok(()) => {
                // redb may absorb a fault it can retry; it must then have done everything.
            }
        }
        // A fault while the store was being created (before its header and schema were committed) leaves
        // a file that never was a store: empty, or a partial header ("magic number mismatch"). At a real
        // store path this cannot happen, because `Store::create` builds under a temporary name and links
        // the finished file into place; this test creates through the raw backend, so it discards the
        // failed creation the same way.
        if !faults.created.load(Ordering::SeqCst) {
            assert!(
                outcome.is_err(),
                "trial {trial}: creation failed but reported success"
            );
            if path.exists() {
                std::fs::remove_file(&path).unwrap();
            }
        }
        // Reopen with the plain file backend: whole batches only, then a re-run converges.
        let store = Store::open_or_create(&path).unwrap_or_else(|e| {
            panic!("trial {trial} (fault at op {at}, sticky {sticky}): store does not reopen: {e}")
        });
        check_integrity(&store);
        let got = snapshot(&store);
        let n = got.objects.len();
        assert_eq!(
            got.objects[..],
            reference.objects[..n],
            "trial {trial} (fault at op {at}): not a prefix of the uninterrupted run"
        );
        if outcome.is_ok() {
            assert_eq!(
                got, reference,
                "trial {trial}: reported success but incomplete"
            );
        }
        drop(store);
        let after = full_run(&path, &zoo);
        assert_eq!(
            after, reference,
            "trial {trial} (fault at op {at}, sticky {sticky}): re-run does not converge"
        );
    }
    eprintln!("{points} fault points over {total_ops} storage operations, {errors_seen} surfaced as errors");
    assert!(
        errors_seen * 2 >= points,
        "faults did not reach the store ({errors_seen}/{points})"
    );
}

/// `remove_task` under a fault at every storage operation it does: the task is removed whole or stays
/// whole (its task row and all its objects, tensors and embeddings), never a task row without objects or
/// objects without their task (it used to be two transactions: objects, then the task row).
#[test]
fn remove_task_is_all_or_nothing_under_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    write_zoo(
        &zoo,
        &ModelShape::minilm(),
        3,
        3,
        &[MethodKind::Lora, MethodKind::Bitfit],
        3,
    )
    .unwrap();
    let base = tmp.path().join("base.peftdb");
    let before = full_run(&base, &zoo);
    let victim = before.tasks[1].clone();
    let victim_objects = before.objects.iter().filter(|o| o.1 == victim).count();
    assert!(victim_objects >= 2, "{victim_objects}");
    // The reference: the whole removal, counting its storage operations.
    let counting = Faults::new(u64::MAX, true);
    let ref_path = tmp.path().join("ref.peftdb");
    std::fs::copy(&base, &ref_path).unwrap();
    let (start, total) = {
        let store = Store::with_backend(&ref_path, faulty(&ref_path, &counting)).unwrap();
        let start = counting.ops.load(Ordering::SeqCst);
        let removed = store.remove_task(&victim).unwrap();
        assert_eq!(removed.len(), victim_objects);
        (start, counting.ops.load(Ordering::SeqCst))
    };
    assert!(total > start, "the removal wrote nothing");
    let after = snapshot(&Store::open_read_only(&ref_path).unwrap());
    assert!(!after.tasks.contains(&victim));
    let mut outcomes = [0usize; 2];
    for (trial, at) in (start..total).enumerate() {
        for sticky in [true, false] {
            let path = tmp.path().join(format!("t{trial}-{sticky}.peftdb"));
            std::fs::copy(&base, &path).unwrap();
            let faults = Faults::new(at, sticky);
            let result = {
                let store = Store::with_backend(&path, faulty(&path, &faults)).unwrap();
                store.remove_task(&victim)
            };
            if let Err(e) = &result {
                assert!(
                    matches!(e, StoreError::Storage { .. }),
                    "fault at op {at}: unclear error {e:?}"
                );
            }
            let store = Store::open_or_create(&path).unwrap();
            check_integrity(&store);
            let got = snapshot(&store);
            let whole = got == before;
            let gone = got == after;
            assert!(
                whole || gone,
                "fault at op {at} (sticky {sticky}, result {result:?}): half a task: tasks {:?}, {} objects of {victim}",
                got.tasks,
                got.objects.iter().filter(|o| o.1 == victim).count()
            );
            outcomes[gone as usize] += 1;
        }
    }
    // Faults early in the commit keep the task; a transient one late may still let it through.
    assert!(outcomes[0] > 0, "no fault kept the task: {outcomes:?}");
}
