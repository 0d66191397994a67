//! Batch ingestion of generated zoos (200+ adapters of three methods), manifests, re-runs, and the CLI.

use peftdb::ingest::{ingest_zoo, IngestOptions, ItemOutcome};
use peftdb::object::ReadOptions;
use peftdb::object::{read_adapter, MethodKind};
use peftdb::store::Store;
use peftdb::synth::{write_zoo, ModelShape};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const METHODS: [MethodKind; 3] = [MethodKind::Lora, MethodKind::Bitfit, MethodKind::Ia3];

fn no_progress() -> impl Fn(peftdb::ingest::IngestEvent) + Sync {
    |_| {}
}

#[test]
fn ingest_a_zoo_of_210_adapters_and_read_every_one_back() {
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    let items = write_zoo(&zoo, &ModelShape::minilm(), 70, 7, &METHODS, 42).unwrap();
    assert_eq!(items.len(), 210);
    let store = Store::create(dir.path().join("z.redb")).unwrap();
    let report = ingest_zoo(
        &store,
        std::slice::from_ref(&zoo),
        None,
        &IngestOptions::default(),
        &no_progress(),
    )
    .unwrap();
    assert_eq!(
        report.ingested(),
        210,
        "{:?}",
        report
            .items
            .iter()
            .find(|i| !matches!(i.outcome, ItemOutcome::Ingested { .. }))
    );
    assert_eq!(report.rejected(), 0);

    // Every object reads back identical to its source folder, with its task, group and space.
    let objects = store.objects().unwrap();
    assert_eq!(objects.len(), 210);
    for rec in &objects {
        let src = PathBuf::from(rec.source.as_ref().unwrap());
        let want = read_adapter(&src, &ReadOptions::default()).unwrap();
        let (_, got) = store.get(rec.id).unwrap();
        assert_eq!(got, want, "object {} ({})", rec.id, src.display());
        let item = items.iter().find(|i| i.path == src).unwrap();
        assert_eq!(rec.task, item.task);
        assert_eq!(rec.method_kind(), item.method);
        assert!(rec.tupate_space().is_some());
    }
    let tasks = store.tasks().unwrap();
    assert_eq!(tasks.len(), 70);
    assert!(tasks
        .iter()
        .all(|t| t.group.as_deref().unwrap().starts_with("group-")));
    // One TuPaTE space per method and the LoRA delta-sketch space, each with 70 embeddings of the
    // right dimension.
    let spaces = store.spaces().unwrap();
    assert_eq!(spaces.len(), 4);
    assert_eq!(
        spaces
            .iter()
            .filter(|s| s.key.kind == peftdb::embed::EmbeddingKind::DeltaSketch)
            .count(),
        1
    );
    for s in &spaces {
        assert_eq!(s.count, 70);
        let embs = store.embeddings(s.id).unwrap();
        assert_eq!(embs.len(), 70);
        assert!(embs.iter().all(|(_, v)| v.len() == s.dim));
    }
    let dims: BTreeSet<usize> = spaces.iter().map(|s| s.dim).collect();
    // LoRA r=8 q,v: 4*8*384; BitFit: 7*384+1536; IA3: 2*384+1536; the LoRA sketch: 12 modules of 16x16.
    assert_eq!(dims, BTreeSet::from([12288, 4224, 2304, 3072]));

    // Same bytes again: nothing new.
    let again = ingest_zoo(
        &store,
        &[zoo],
        None,
        &IngestOptions::default(),
        &no_progress(),
    )
    .unwrap();
    assert_eq!(again.already_present(), 210);
    assert_eq!(store.objects().unwrap().len(), 210);
}

/// A transaction holds at most `BATCH_BYTES` of values: 40 BERT-base LoRAs (1.2 MB each, 48 MB) with a
/// batch size of 64 are committed in several transactions (each bumps the space's generation), while 40
/// MiniLM LoRAs (0.3 MB each) fit one. Past redb's write buffer a transaction's pages are read back
/// before its commit (4x slower ingestion).
#[test]
fn batches_are_bounded_by_bytes_as_well_as_by_count() {
    let transactions = |shape: &ModelShape, seed| {
        let dir = tempfile::tempdir().unwrap();
        let zoo = dir.path().join("zoo");
        write_zoo(&zoo, shape, 40, 4, &[MethodKind::Lora], seed).unwrap();
        let store = Store::create(dir.path().join("z.redb")).unwrap();
        let opts = IngestOptions {
            batch_size: 64,
            ..IngestOptions::default()
        };
        let report = ingest_zoo(&store, &[zoo], None, &opts, &no_progress()).unwrap();
        assert_eq!(report.ingested(), 40);
        let spaces = store.spaces().unwrap();
        let tupate = spaces
            .iter()
            .find(|s| s.key.kind == peftdb::embed::EmbeddingKind::Tupate)
            .unwrap();
        assert_eq!(tupate.count, 40);
        (tupate.generation, store.objects().unwrap().len())
    };
    let bytes_per_object = 2 * 2 * 12 * 8 * 768 * 4; // A and B of query and value, 12 layers, r = 8
    let per_transaction = (peftdb::store::BATCH_BYTES / bytes_per_object).max(1);
    let (bert, n) = transactions(&ModelShape::bert_base(), 5);
    assert_eq!(n, 40);
    assert!(
        bert >= 40_u64.div_ceil(per_transaction as u64) && bert > 1,
        "40 BERT-base LoRAs in {bert} transactions, at most {per_transaction} per transaction"
    );
    let (minilm, _) = transactions(&ModelShape::minilm(), 6);
    assert_eq!(minilm, 1, "40 MiniLM LoRAs fit one transaction");
}

#[test]
fn an_interrupted_ingestion_rerun_finishes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    write_zoo(&zoo, &ModelShape::minilm(), 12, 3, &METHODS, 7).unwrap();
    // Reference: one uninterrupted run.
    let full = Store::create(dir.path().join("full.redb")).unwrap();
    ingest_zoo(
        &full,
        std::slice::from_ref(&zoo),
        None,
        &IngestOptions::default(),
        &no_progress(),
    )
    .unwrap();
    // "Interrupted": only some task folders got in before the stop.
    let part = Store::create(dir.path().join("part.redb")).unwrap();
    let some: Vec<PathBuf> = (0..5).map(|t| zoo.join(format!("task-{t:03}"))).collect();
    let opts = IngestOptions {
        batch_size: 4,
        ..Default::default()
    };
    let r1 = ingest_zoo(&part, &some, None, &opts, &no_progress()).unwrap();
    assert_eq!(r1.ingested(), 15);
    let r2 = ingest_zoo(&part, &[zoo], None, &opts, &no_progress()).unwrap();
    assert_eq!((r2.ingested(), r2.already_present()), (21, 15));
    let key = |s: &Store| -> BTreeSet<(String, String, String)> {
        s.objects()
            .unwrap()
            .into_iter()
            .map(|o| (o.method_kind().to_string(), o.task, o.content_hash))
            .collect()
    };
    assert_eq!(key(&part), key(&full));
    assert_eq!(part.tasks().unwrap(), full.tasks().unwrap());
}

#[test]
fn a_cancelled_ingestion_keeps_its_committed_batches_and_a_rerun_adds_the_rest() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    write_zoo(&zoo, &ModelShape::minilm(), 4, 3, &METHODS, 11).unwrap();
    let store = Store::create(dir.path().join("z.redb")).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = IngestOptions {
        batch_size: 3,
        cancel: Some(cancel.clone()),
        ..Default::default()
    };
    // The progress callback asks to stop after the first batch (as the Python bindings do on Ctrl-C).
    // A batch is reported once it is on the disk, which the store writes behind the next batch's commit:
    // when the first batch is reported, the second is committed too, and the ingestion stops there.
    let stop = |ev: peftdb::ingest::IngestEvent| {
        if matches!(ev, peftdb::ingest::IngestEvent::Processed { .. }) {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let e = ingest_zoo(&store, std::slice::from_ref(&zoo), None, &opts, &stop).unwrap_err();
    assert!(
        matches!(
            e,
            peftdb::error::IngestError::Interrupted {
                done: 6,
                remaining: 6
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string().contains("run the same ingestion again"),
        "{e}"
    );
    assert_eq!(store.objects().unwrap().len(), 6);
    cancel.store(false, Ordering::SeqCst);
    let r = ingest_zoo(&store, &[zoo], None, &opts, &no_progress()).unwrap();
    assert_eq!((r.ingested(), r.already_present()), (6, 6));
    assert_eq!(store.objects().unwrap().len(), 12);
}

#[test]
fn manifest_names_tasks_and_rejects_escaping_paths() {
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    write_zoo(&zoo, &ModelShape::minilm(), 2, 1, &[MethodKind::Lora], 3).unwrap();
    let manifest = dir.path().join("zoo").join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&serde_json::json!({
            "version": 1,
            "tasks": [{"name": "sst2", "group": "sentiment", "train_size": 67349, "tags": ["glue"]}],
            "objects": [
                {"path": "task-000/lora", "task": "sst2", "stage": "best", "metrics": {"dev_acc": 0.91}},
                {"path": "../zoo/task-001/lora", "task": "evil"},
                {"path": "task-001/lora", "task": "../etc"}
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    let store = Store::create(dir.path().join("z.redb")).unwrap();
    let r = ingest_zoo(
        &store,
        &[],
        Some(&manifest),
        &IngestOptions::default(),
        &no_progress(),
    )
    .unwrap();
    assert_eq!((r.ingested(), r.rejected()), (1, 2));
    let reasons: Vec<String> = r
        .items
        .iter()
        .filter_map(|i| match &i.outcome {
            ItemOutcome::Rejected { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert!(reasons[0].contains("`..`"), "{}", reasons[0]);
    assert!(reasons[1].contains("path separator"), "{}", reasons[1]);
    let t = store.task("sst2").unwrap();
    assert_eq!(
        (t.group.as_deref(), t.train_size),
        (Some("sentiment"), Some(67349))
    );
    let objs = store.objects().unwrap();
    assert_eq!(
        (objs[0].stage.as_deref(), objs[0].metrics["dev_acc"]),
        (Some("best"), 0.91)
    );
}

fn peftdb(db: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftdb"));
    c.arg("--db").arg(db);
    c
}

#[test]
fn cli_ingest_ls_export_cmp() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cli.redb");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    let out = peftdb(&db).arg("init").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = peftdb(&db)
        .args(["ingest", "--json"])
        .arg(&fixtures)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ingested"], 7);

    let out = peftdb(&db)
        .args(["ls", "objects", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let objs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(objs.len(), 7);
    let lora = objs.iter().find(|o| o["task"] == "lora_r8_qv").unwrap();
    assert_eq!(lora["method"], "lora");
    let kinds = |o: &serde_json::Value| -> Vec<String> {
        o["spaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(kinds(lora), ["tupate", "delta-sketch"]);
    let rp = objs
        .iter()
        .find(|o| o["task"] == "lora_rank_pattern")
        .unwrap();
    // Ranks that differ by layer have no TuPaTE space; their update still has a sketch (`delta`
    // compares any ranks).
    assert_eq!(kinds(rp), ["delta-sketch"]);

    let id = lora["id"].as_u64().unwrap().to_string();
    let target = dir.path().join("exported");
    let out = peftdb(&db)
        .args(["export", &id, "--out"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cmp = Command::new("cmp")
        .arg(target.join("adapter_model.safetensors"))
        .arg(fixtures.join("lora_r8_qv/adapter_model.safetensors"))
        .status()
        .unwrap();
    assert!(cmp.success(), "exported tensors differ");

    // Exporting onto a non-empty folder is refused.
    let out = peftdb(&db)
        .args(["export", &id, "--out"])
        .arg(&target)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    // Unknown object: exit code 5. Bad adapter: exit code 3 with the reason.
    let out = peftdb(&db).args(["show", "999"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        br#"{"peft_type": "LOHA", "base_model_name_or_path": "m"}"#,
    )
    .unwrap();
    let out = peftdb(&db).arg("ingest").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown peft_type \"LOHA\""));

    // rm, then stats.
    let out = peftdb(&db).args(["rm", &id]).output().unwrap();
    assert!(out.status.success());
    let out = peftdb(&db).args(["stats", "--json"]).output().unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["objects"], 6);
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_and_readers_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lock.redb");
    let store = Store::create(&db).unwrap();
    // Another process tries to write.
    let out = peftdb(&db)
        .arg("ingest")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/ia3"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    // Readers in other processes are fine.
    let out = peftdb(&db).args(["ls", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(store);
    let out = peftdb(&db)
        .arg("ingest")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/ia3"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `find_by_hash` (a range lookup in the hash table) answers exactly what a scan of every record's hash
/// answers: for the demo zoo's real adapters, at every prefix length from 8 to 64 hex digits (odd ones
/// included), upper case, a prefix no object has, one too short and one that is not hex. `space` (a
/// lookup by key) likewise answers what the list of all spaces holds.
#[test]
fn hash_prefix_lookup_matches_a_scan_of_every_record() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let zoo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo-zoo");
    let r = ingest_zoo(
        &store,
        &[zoo],
        None,
        &IngestOptions::default(),
        &no_progress(),
    )
    .unwrap();
    assert_eq!(r.rejected(), 0);
    let objects = store.objects().unwrap();
    assert!(objects.len() >= 10);
    let scan = |prefix: &str| {
        let p = prefix.to_ascii_lowercase();
        let hits: Vec<u64> = objects
            .iter()
            .filter(|o| o.content_hash.starts_with(&p))
            .map(|o| o.id)
            .collect();
        (hits.len() == 1).then(|| hits[0])
    };
    let mut checked = 0;
    for o in &objects {
        assert_eq!(o.content_hash.len(), 64);
        for n in 8..=64 {
            let p = &o.content_hash[..n];
            assert_eq!(store.find_by_hash(p).unwrap(), scan(p), "{p}");
            assert_eq!(store.find_by_hash(p).unwrap(), Some(o.id), "{p}");
            checked += 1;
        }
        let upper = o.content_hash[..12].to_ascii_uppercase();
        assert_eq!(store.find_by_hash(&upper).unwrap(), Some(o.id));
    }
    assert!(checked > 500);
    // Prefixes that match no object (or, by chance, several): the same answer as the scan.
    let shared = &objects[0].content_hash[..1];
    let ambiguous = format!("{shared}0000000");
    assert_eq!(store.find_by_hash(&ambiguous).unwrap(), scan(&ambiguous));
    let absent = "ffffffffffffffff";
    assert_eq!(store.find_by_hash(absent).unwrap(), scan(absent));
    assert_eq!(
        store.find_by_hash(&objects[0].content_hash[..7]).unwrap(),
        None
    );
    assert_eq!(store.find_by_hash("zzzzzzzzzz").unwrap(), None);
    // `space` (a lookup by key) answers what the list of every space holds.
    let spaces = store.spaces().unwrap();
    assert!(!spaces.is_empty());
    for s in &spaces {
        assert_eq!(&store.space(s.id).unwrap(), s);
    }
    let unknown = peftdb::embed::SpaceId(spaces.iter().map(|s| s.id.0).max().unwrap() ^ 1);
    if !spaces.iter().any(|s| s.id == unknown) {
        assert!(matches!(
            store.space(unknown),
            Err(peftdb::error::StoreError::NotFound { what: "space", .. })
        ));
    }
}

/// `peftdb ARGS` on a store, which must succeed; its stdout.
fn run_ok(db: &Path, args: &[&str]) -> Vec<u8> {
    let out = peftdb(db).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A store of the real PEFT fixtures made by the CLI (`init`, then `ingest`) in `dir`.
fn cli_fixture_store(dir: &Path) -> PathBuf {
    let db = dir.join("fixtures.peftdb");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    run_ok(&db, &["init"]);
    run_ok(&db, &["ingest", fixtures.to_str().expect("UTF-8 path")]);
    db
}

/// A cold `nearest` whose derived files are current opens the store read-only and writes nothing to it
/// (a writable open writes and syncs redb's header on open and close); the first query after a change
/// rebuilds the `.vecs` rows with a writable handle and saves them.
#[test]
fn cli_nearest_writes_nothing_once_its_index_files_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let db = cli_fixture_store(dir.path());
    let query = || {
        run_ok(
            &db,
            &["--json", "nearest", "--task", "lora_r8_qv", "-k", "3"],
        );
    };
    let index = peftdb::index::index_dir(&db);
    let _ = std::fs::remove_dir_all(&index);
    query(); // rebuilds and saves the rows
    let saved = std::fs::read_dir(&index).unwrap().count();
    assert!(saved > 0, "the first query saves the index files");
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = (stamp(&db), std::fs::read(&db).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(20));
    query();
    query();
    assert_eq!(
        stamp(&db),
        before.0,
        "a query with current index files modified the store"
    );
    assert!(
        std::fs::read(&db).unwrap() == before.1,
        "the store's bytes changed"
    );
}

/// `peftdb compact` after `rm` removes the derived files no query can use (the `.vecs` rows of a changed
/// space, a temporary file a killed writer left), keeps what is current, and queries work after it.
#[test]
fn cli_compact_removes_stale_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = cli_fixture_store(dir.path());
    let run = |args: &[&str]| run_ok(&db, args);
    run(&["nearest", "--task", "lora_r8_qv", "-k", "3"]);
    let index = peftdb::index::index_dir(&db);
    let vecs = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect()
    };
    let before = vecs(&index);
    assert!(!before.is_empty());
    std::fs::write(index.join(".tmp-space-00-1234.vecs"), b"half written").unwrap();
    // Nothing is stale yet: compact keeps every current file and drops the leftover.
    let v: serde_json::Value = serde_json::from_slice(&run(&["--json", "compact"])).unwrap();
    assert_eq!(v["index_bytes_freed"], 12, "{v}");
    assert_eq!(vecs(&index), before);
    // Remove the objects of one task: its space's rows are stale, and compact removes them.
    let objs: Vec<serde_json::Value> =
        serde_json::from_slice(&run(&["ls", "objects", "--json"])).unwrap();
    let id = objs.iter().find(|o| o["task"] == "lora_r8_qv").unwrap()["id"].to_string();
    run(&["rm", &id]);
    let v: serde_json::Value = serde_json::from_slice(&run(&["--json", "compact"])).unwrap();
    assert!(v["index_bytes_freed"].as_u64().unwrap() > 0, "{v}");
    assert!(vecs(&index).len() < before.len());
    // The next query rebuilds what it needs.
    run(&["nearest", "--task", "lora_rslora", "-k", "3"]);
}
