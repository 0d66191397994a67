//! Concurrency model: **one writer process, many readers**.
//!
//! - Inside a process a `Store` is `Sync`: any number of threads query while one thread ingests, and each
//!   query sees one consistent snapshot (a redb read transaction): a batch is visible entirely or not at
//!   all, and never goes backwards.
//! - A second process (or a second handle in the same process) that opens the store for writing gets
//!   `OpenError::Locked` naming the holder ("pid N on host"); the CLI exits with code 4 and says so.
//! - `Store::open_read_only` works while another process writes, and sees that writer's later commits.
//! - A writer killed with SIGKILL releases the lock (the stale `.owner` sidecar does not block anyone).
//!
//! The cross-process tests re-run this test binary as the child (`holder_child`, inert unless
//! `PEFTDB_HOLDER_DB` is set), driven over stdin/stdout, so nothing depends on timing.

mod common;

use common::{check_integrity, fixture};
use peftdb::error::{OpenError, StoreError};
use peftdb::index::{IndexConfig, IndexManager};
use peftdb::ingest::{ingest_zoo, IngestOptions};
use peftdb::object::MethodKind;
use peftdb::query::Nearest;
use peftdb::store::Store;
use peftdb::synth::{write_zoo, ModelShape};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

#[test]
fn readers_see_consistent_snapshots_while_one_thread_ingests() {
    const BATCH: usize = 3;
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    // LoRA only: one embedding space, so object and embedding counts move in whole batches.
    let tasks = 30;
    write_zoo(
        &zoo,
        &ModelShape::minilm(),
        tasks,
        5,
        &[MethodKind::Lora],
        11,
    )
    .unwrap();
    let store = Store::create(tmp.path().join("c.peftdb")).unwrap();
    let done = AtomicBool::new(false);
    let opts = IngestOptions {
        batch_size: BATCH,
        ..Default::default()
    };
    let observed: Vec<Vec<usize>> = std::thread::scope(|s| {
        let readers: Vec<_> = (0..3)
            .map(|r| {
                let store = &store;
                let done = &done;
                s.spawn(move || {
                    let mut seen = Vec::new();
                    let mut last = 0usize;
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        let objs = store.objects().unwrap();
                        let n = objs.len();
                        assert_eq!(
                            n % BATCH,
                            0,
                            "reader {r}: saw a partial batch ({n} objects)"
                        );
                        assert!(
                            n >= last,
                            "reader {r}: went back from {last} to {n} objects"
                        );
                        last = n;
                        // Ids are dense 1..=n: nothing from a later batch leaked in.
                        for (i, o) in objs.iter().enumerate() {
                            assert_eq!(o.id, i as u64 + 1, "reader {r}");
                        }
                        if let Some(space) = store.spaces().unwrap().first() {
                            let embs = store.embeddings(space.id).unwrap();
                            assert_eq!(embs.len() % BATCH, 0, "reader {r}: partial embeddings");
                            assert!(embs.len() >= n, "reader {r}: embeddings behind objects");
                        }
                        // Every listed object loads whole (tensors + hash) from its own snapshot.
                        if let Some(o) = objs.get(r * 7 % n.max(1)) {
                            let (rec, obj) = store.get(o.id).unwrap();
                            assert_eq!(obj.tensors.len() as u32, rec.tensor_count);
                            let h = peftdb::store::content_hash(&obj);
                            let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                            assert_eq!(hex, rec.content_hash);
                        }
                        seen.push(n);
                        if finished {
                            break;
                        }
                    }
                    seen
                })
            })
            .collect();
        let r = ingest_zoo(&store, std::slice::from_ref(&zoo), None, &opts, &|_| {}).unwrap();
        assert_eq!(r.ingested(), tasks);
        done.store(true, Ordering::Release);
        readers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for seen in &observed {
        assert_eq!(
            *seen.last().unwrap(),
            tasks,
            "a reader's last look must see everything"
        );
    }
    assert_eq!(check_integrity(&store), tasks);
}

/// A [`Snapshot`](peftdb::store::Snapshot) is one state of the store: taken before a batch is ingested,
/// it still lists the objects, spaces and embeddings of that state afterwards (and they agree exactly,
/// which reads in separate transactions cannot promise), its objects load whole, and a query run in it
/// ranks only what it saw; the store itself sees the new batch.
#[test]
fn a_snapshot_is_one_state_of_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo_a, zoo_b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_zoo(&zoo_a, &ModelShape::minilm(), 4, 5, &[MethodKind::Lora], 3).unwrap();
    write_zoo(&zoo_b, &ModelShape::minilm(), 7, 5, &[MethodKind::Lora], 4).unwrap();
    // The second batch: tasks 4-6 (write_zoo names tasks task-000, task-001, ...), new to the store.
    for i in 0..4 {
        std::fs::remove_dir_all(zoo_b.join(format!("task-{i:03}"))).unwrap();
    }
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let opts = IngestOptions::default();
    ingest_zoo(&store, std::slice::from_ref(&zoo_a), None, &opts, &|_| {}).unwrap();
    let snap = store.snapshot().unwrap();
    let before = snap.objects().unwrap();
    assert_eq!(before.len(), 4);
    let r = ingest_zoo(&store, std::slice::from_ref(&zoo_b), None, &opts, &|_| {}).unwrap();
    assert_eq!(r.ingested(), 3);
    // The store sees both batches; the snapshot, taken before, only the first, in every table.
    assert_eq!(store.objects().unwrap().len(), 7);
    assert_eq!(snap.objects().unwrap(), before);
    let space = snap.spaces().unwrap()[0].id;
    assert_eq!(snap.embeddings(space).unwrap().len(), 4);
    assert_eq!(snap.space_ids(space).unwrap().len(), 4);
    assert_eq!(store.embeddings(space).unwrap().len(), 7);
    assert_eq!(snap.object_facts().unwrap().len(), 4);
    assert_eq!(snap.tasks().unwrap().len(), 4);
    for o in &before {
        let (rec, obj) = snap.get(o.id).unwrap();
        assert_eq!(obj.tensors.len() as u32, rec.tensor_count);
        assert_eq!(snap.find_by_hash(&rec.content_hash).unwrap(), Some(o.id));
    }
    let newest = store.objects().unwrap().last().unwrap().id;
    assert!(matches!(
        snap.object(newest),
        Err(StoreError::NotFound { .. })
    ));
    // A query in the snapshot ranks only the tasks it saw, though the index was opened after the ingest.
    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
    let task = before[0].task.clone();
    let seen: std::collections::BTreeSet<String> = before.iter().map(|o| o.task.clone()).collect();
    let res = Nearest::task(&task).k(10).run_in(&snap, &index).unwrap();
    assert!(!res.tasks.is_empty());
    assert!(res.tasks.iter().all(|t| seen.contains(&t.task)), "{res:?}");
    let all = Nearest::task(&task).k(10).run(&store, &index).unwrap();
    assert!(all.tasks.len() > res.tasks.len(), "{all:?}");
}

#[test]
fn a_second_writer_in_the_same_process_is_refused_with_the_holder() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("s.peftdb");
    let _w = Store::create(&db).unwrap();
    match Store::open(&db) {
        Err(OpenError::Locked { holder, path }) => {
            assert_eq!(path, db);
            let h = holder.expect("holder named");
            assert!(
                h.starts_with(&format!("pid {} ", std::process::id())),
                "{h}"
            );
        }
        other => panic!("expected Locked, got {other:?}"),
    }
}

/// Child side: open the store for writing, then obey stdin ("ingest PATH", "quit").
#[test]
fn holder_child() {
    let Ok(db) = std::env::var("PEFTDB_HOLDER_DB") else {
        return; // inert in a normal test run
    };
    let store = Store::open_or_create(&db).unwrap();
    let stdin = std::io::stdin();
    // Not std::io::stdout(): libtest captures that even here; /dev/stdout is the pipe itself.
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/stdout")
        .unwrap();
    writeln!(out, "READY {}", std::process::id()).unwrap();
    out.flush().unwrap();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("ingest ") {
            let r = ingest_zoo(
                &store,
                &[PathBuf::from(p)],
                None,
                &IngestOptions::default(),
                &|_| {},
            )
            .unwrap();
            writeln!(out, "DONE {}", r.ingested()).unwrap();
            out.flush().unwrap();
        } else if line == "quit" {
            break;
        }
    }
}

struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Holder {
    fn start(db: &Path) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "holder_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("PEFTDB_HOLDER_DB", db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let pid = loop {
            let mut l = String::new();
            assert!(
                stdout.read_line(&mut l).unwrap() > 0,
                "holder died before READY"
            );
            // libtest prints "test holder_child ... " without a newline before the test runs.
            if let Some((_, p)) = l.trim().split_once("READY ") {
                break p.parse().unwrap();
            }
        };
        assert_eq!(pid, child.id());
        Holder {
            child,
            stdin,
            stdout,
            pid,
        }
    }
    fn ingest(&mut self, p: &Path) -> usize {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "ingest {}", p.display()).unwrap();
        stdin.flush().unwrap();
        loop {
            let mut l = String::new();
            assert!(self.stdout.read_line(&mut l).unwrap() > 0, "holder died");
            if let Some((_, n)) = l.trim().split_once("DONE ") {
                return n.parse().unwrap();
            }
        }
    }
    fn quit(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = writeln!(s, "quit");
        }
        assert!(self.child.wait().unwrap().success());
    }
}

#[test]
fn a_second_process_gets_a_clear_locked_error_and_may_read() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("s.peftdb");
    let mut holder = Holder::start(&db);

    // Library: Locked, naming the holder's pid.
    match Store::open(&db) {
        Err(e @ OpenError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("pid {}", holder.pid)), "{msg}");
            assert!(msg.contains("another process"), "{msg}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    // CLI: exit code 4, and the message names the process.
    let out = Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(&db)
        .arg("ingest")
        .arg(fixture("ia3"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {}", holder.pid)), "{err}");

    // Read-only open works while the writer holds the store, and follows its commits.
    let ro = Store::open_read_only(&db).unwrap();
    assert!(!ro.is_writable());
    assert_eq!(ro.objects().unwrap().len(), 0);
    assert_eq!(holder.ingest(&fixture("ia3")), 1);
    assert_eq!(
        ro.objects().unwrap().len(),
        1,
        "read-only handle misses the writer's commit"
    );
    check_integrity(&ro);
    assert!(matches!(ro.remove(&[1]), Err(StoreError::ReadOnly)));
    // The CLI's read commands work too.
    let out = Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(&db)
        .args(["--json", "ls", "objects"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    holder.quit();

    // Once the holder is gone, a writer gets in and sees everything.
    let w = Store::open(&db).unwrap();
    assert_eq!(check_integrity(&w), 1);
}

#[test]
fn a_killed_writer_releases_the_lock() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("s.peftdb");
    let mut holder = Holder::start(&db);
    assert_eq!(holder.ingest(&fixture("prompt_10")), 1);
    assert!(matches!(Store::open(&db), Err(OpenError::Locked { .. })));
    holder.child.kill().unwrap(); // SIGKILL: no destructor runs, the .owner sidecar stays behind
    holder.child.wait().unwrap();
    let mut owner = db.as_os_str().to_owned();
    owner.push(".owner");
    assert!(Path::new(&owner).exists(), "expected a stale owner sidecar");
    let w = Store::open(&db).expect("the lock dies with its process");
    assert_eq!(check_integrity(&w), 1);
}
