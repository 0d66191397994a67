//! Crash safety: batch ingestion runs in a child process (the `peftdb` binary) and is killed with SIGKILL
//! at seeded random moments. After each kill the store is reopened and checked:
//!
//! - it opens (redb recovers from the torn write, if any);
//! - every listed object loads with all its tensors, its content hash matches its tensors, and every
//!   embedding it claims is there (and no embedding belongs to an unlisted object);
//! - what is visible is exactly a prefix of an uninterrupted run (same ids, same contents, in commit
//!   order): nothing half-written, nothing out of order;
//! - re-running the same ingestion ends in exactly the state of the uninterrupted run (objects, ids,
//!   hashes, embeddings bit for bit, tasks, spaces).
//!
//! Default: 50 trials on a small zoo (about a minute on 2 cores). `PEFTDB_LONG_TESTS=1` runs 300 trials on
//! a larger zoo with more methods. `PEFTDB_CRASH_TRIALS=N` overrides the trial count.
//!
//! The nearest-task index (HNSW files beside the store) is not written by ingestion yet; see
//! `check_index` below for where its checks plug in.

mod common;

use common::{check_integrity, long_tests, snapshot, Rng, Snapshot};
use peftdb::object::MethodKind;
use peftdb::store::Store;
use peftdb::synth::{write_zoo, ModelShape};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn peftdb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftdb"));
    c.env_remove("PEFTDB_PATH");
    c
}

/// The ingestion command every trial runs (batch size 3: many small transactions, many kill targets).
fn ingest_cmd(db: &Path, zoo: &Path) -> Command {
    let mut c = peftdb();
    c.arg("--db")
        .arg(db)
        .arg("ingest")
        .arg(zoo)
        .args(["--create", "--batch-size", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run_to_end(db: &Path, zoo: &Path) {
    let out = ingest_cmd(db, zoo).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "ingestion failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The index step every trial runs after ingesting: `nearest` with the HNSW graph forced, on a writable
/// store, so the graph files are built, dumped under temporary names, renamed and recorded in the store:
/// kill moments also fall inside index writes.
fn index_cmd(db: &Path) -> Command {
    let mut c = peftdb();
    c.arg("--db")
        .arg(db)
        .args([
            "nearest", "--task", "task-000", "--mode", "hnsw", "-k", "3", "--json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// After a crash, the index is valid for exactly the listed objects or is detected and rebuilt: opening
/// it (graph forced) never fails, every stored embedding finds itself first, and no unlisted id comes back.
fn check_index(store: &Store, snapshot: &Snapshot) {
    use peftdb::index::{IndexConfig, IndexManager, SearchMode};
    let cfg = IndexConfig {
        mode: SearchMode::Hnsw,
        ..IndexConfig::default()
    };
    let (m, _) = IndexManager::open(store, cfg, &|_| {}).unwrap();
    let listed: std::collections::BTreeSet<u64> = snapshot.objects.iter().map(|o| o.0).collect();
    for sp in store.spaces().unwrap() {
        let idx = m.space(sp.id).expect("every space has an index");
        for (id, v) in store.embeddings(sp.id).unwrap() {
            let (hits, _) = idx
                .search(&v, 3, SearchMode::Hnsw, &|_| true, None)
                .unwrap();
            assert_eq!(
                hits.first().map(|h| h.id),
                Some(id),
                "space {} object {id}",
                sp.id
            );
            assert!(
                hits.iter().all(|h| listed.contains(&h.id)),
                "unlisted id in {hits:?}"
            );
        }
    }
}

/// Visible state must be a prefix (by id) of the uninterrupted run: same ids, tasks, hashes, tensors.
fn assert_prefix(got: &Snapshot, reference: &Snapshot, trial: usize) {
    let n = got.objects.len();
    assert!(
        n <= reference.objects.len(),
        "trial {trial}: more objects than a full run"
    );
    assert_eq!(
        got.objects[..],
        reference.objects[..n],
        "trial {trial}: visible objects are not a prefix of the uninterrupted run"
    );
    let ids: Vec<u64> = got.objects.iter().map(|o| o.0).collect();
    let want: Vec<_> = reference
        .embeddings
        .iter()
        .filter(|e| ids.contains(&e.1))
        .cloned()
        .collect();
    assert_eq!(
        got.embeddings, want,
        "trial {trial}: embeddings differ from the uninterrupted run"
    );
}

struct Setup {
    _tmp: tempfile::TempDir,
    zoo: PathBuf,
    reference: Snapshot,
    full_run: Duration,
    dir: PathBuf,
}

fn setup(tasks: usize, methods: &[MethodKind]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    write_zoo(&zoo, &ModelShape::minilm(), tasks, 4, methods, 7).unwrap();
    let db = tmp.path().join("reference.peftdb");
    let t0 = Instant::now();
    run_to_end(&db, &zoo);
    let out = index_cmd(&db).output().unwrap();
    assert!(
        out.status.success(),
        "index step: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let full_run = t0.elapsed();
    let store = Store::open_read_only(&db).unwrap();
    let n = check_integrity(&store);
    assert_eq!(n, tasks * methods.len());
    let reference = snapshot(&store);
    let dir = tmp.path().join("trials");
    std::fs::create_dir_all(&dir).unwrap();
    Setup {
        zoo,
        reference,
        full_run,
        dir,
        _tmp: tmp,
    }
}

fn trials(default: usize, long: usize) -> usize {
    std::env::var("PEFTDB_CRASH_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if long_tests() { long } else { default })
}

#[test]
fn sigkill_during_batch_ingestion_never_leaves_a_half_written_store() {
    let (tasks, methods): (usize, &[MethodKind]) = if long_tests() {
        (
            40,
            &[
                MethodKind::Lora,
                MethodKind::Ia3,
                MethodKind::Bitfit,
                MethodKind::Prefix,
            ],
        )
    } else {
        (12, &[MethodKind::Lora, MethodKind::Ia3, MethodKind::Bitfit])
    };
    let s = setup(tasks, methods);
    let n_trials = trials(50, 300);
    let mut rng = Rng(0x5eed_c0ffee_u64);
    // Kill moments spread over [0, 1.1 x the uninterrupted run], so some land before the store exists,
    // during creation, between and inside commits, and a few after the run ended.
    let span_us = (s.full_run.as_micros() as u64).max(1000) * 11 / 10;
    let mut killed_mid_run = 0;
    let mut partial_states = std::collections::BTreeSet::new();
    for trial in 0..n_trials {
        let db = s.dir.join(format!("t{trial}.peftdb"));
        let delay = Duration::from_micros(rng.below(span_us));
        let start = Instant::now();
        let mut child = ingest_cmd(&db, &s.zoo).spawn().unwrap();
        // Ingest, then (if time is left before the kill moment) the index step.
        loop {
            if child.try_wait().unwrap().is_some() || start.elapsed() >= delay {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if child.try_wait().unwrap().is_some() && start.elapsed() < delay {
            child = index_cmd(&db).spawn().unwrap();
        }
        std::thread::sleep(delay.saturating_sub(start.elapsed()));
        let finished = child.try_wait().unwrap().is_some();
        // SIGKILL (std's kill on Unix), then reap.
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !finished {
            killed_mid_run += 1;
        }
        let _ = status;

        if !db.exists() {
            // Killed before the store file was created: nothing to check but the re-run.
            run_to_end(&db, &s.zoo);
        } else {
            // A read-only open first: it sees a consistent store, or (when the kill left recovery to do)
            // says clearly that a writable open is needed; never "not a peftdb store".
            match Store::open_read_only(&db) {
                Ok(ro) => {
                    check_integrity(&ro);
                    assert_prefix(&snapshot(&ro), &s.reference, trial);
                }
                Err(e @ peftdb::error::OpenError::NeedsRecovery { .. }) => {
                    assert!(
                        e.to_string().contains("for writing once"),
                        "trial {trial}: {e}"
                    )
                }
                Err(e) => panic!("trial {trial}: read-only open after a kill: {e:?}"),
            }
            let store = Store::open(&db).unwrap_or_else(|e| {
                panic!("trial {trial} (killed after {delay:?}): store does not reopen: {e}")
            });
            let n = check_integrity(&store);
            let got = snapshot(&store);
            assert_prefix(&got, &s.reference, trial);
            check_index(&store, &got);
            partial_states.insert(n);
            drop(store);
            run_to_end(&db, &s.zoo);
        }
        let store = Store::open_read_only(&db).unwrap();
        check_integrity(&store);
        let after = snapshot(&store);
        assert_eq!(
            after, s.reference,
            "trial {trial}: re-running the ingestion does not reach the uninterrupted state"
        );
        check_index(&store, &after);
        drop(store);
        let _ = std::fs::remove_file(&db);
    }
    eprintln!(
        "{n_trials} trials, {killed_mid_run} killed mid-run, distinct partial object counts seen: {partial_states:?}"
    );
    // How many kills hit a running ingestion depends on the machine's speed, so it is reported, not
    // asserted (pass/fail never depends on timing); on an idle 2-core machine nearly all of them do.
    if killed_mid_run * 2 < n_trials {
        eprintln!("warning: only {killed_mid_run}/{n_trials} kills hit a running ingestion");
    }
}

/// A kill between redb creating the file and peftdb's schema commit leaves a redb file without the
/// `meta` table. Reproduced deterministically here (the window is too small to hit reliably by timing):
/// re-running `peftdb ingest --create` must recover (the file holds no data, since the schema commit
/// is the first one), not fail forever with "not a peftdb store".
#[test]
fn a_crash_inside_store_creation_does_not_brick_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("s.peftdb");
    // What a kill right after `redb::Builder::create` leaves: an empty, valid redb file.
    drop(redb::Database::create(&db).unwrap());
    let zoo = tmp.path().join("zoo");
    write_zoo(&zoo, &ModelShape::minilm(), 2, 1, &[MethodKind::Ia3], 1).unwrap();
    let out = ingest_cmd(&db, &zoo).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "a store whose creation was interrupted cannot be re-created: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open_read_only(&db).unwrap();
    assert_eq!(check_integrity(&store), 2);
}

/// A kill while removing (one transaction) leaves the object either fully there or fully gone.
#[test]
fn sigkill_during_removal_is_all_or_nothing() {
    let s = setup(8, &[MethodKind::Lora, MethodKind::Ia3]);
    let n_trials = trials(10, 50);
    let mut rng = Rng(42);
    let all_ids: Vec<String> = s
        .reference
        .objects
        .iter()
        .map(|o| o.0.to_string())
        .collect();
    for trial in 0..n_trials {
        let db = s.dir.join(format!("rm{trial}.peftdb"));
        run_to_end(&db, &s.zoo);
        let t0 = Instant::now();
        let mut c = peftdb();
        c.arg("--db").arg(&db).arg("rm").args(&all_ids);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(60_000)));
        let _ = child.kill();
        let _ = child.wait();
        let _ = t0;
        let store = Store::open(&db).unwrap();
        let n = check_integrity(&store);
        assert!(
            n == 0 || n == s.reference.objects.len(),
            "trial {trial}: removal of all objects in one transaction left {n} objects"
        );
        if n > 0 {
            assert_eq!(snapshot(&store), s.reference);
        }
        drop(store);
        let _ = std::fs::remove_file(&db);
    }
}
