//! Index persistence: reload, and detection + rebuild of corrupt, truncated, stale, foreign or missing
//! index files. Seeded data; no timing assertions.

use peftdb::embed::SpaceId;
use peftdb::index::index_dir;
use peftdb::index::{brute_force, recall, Hit, IndexConfig, IndexManager, SearchMode, SpaceState};
use peftdb::object::{AdapterFormat, LightweightObject, LoraBias, LoraConfig, Method, Tensor};
use peftdb::query::Nearest;
use peftdb::store::{NewObject, PreparedObject, Store, TaskRecord};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

const D: usize = 192; // r = 1 LoRA on one 192-wide module: embeddings of dimension 384

fn lora(v: &[f32]) -> LightweightObject {
    let name =
        |s: &str| format!("base_model.model.encoder.layer.0.attention.self.query.{s}.weight");
    LightweightObject {
        method: Method::Lora(LoraConfig {
            r: 1,
            alpha: 1.0,
            use_rslora: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            target_modules: vec!["query".into()],
            bias: LoraBias::None,
        }),
        base_model: "synthetic-192".into(),
        format: AdapterFormat::Peft,
        tensors: vec![
            Tensor::from_f32(name("lora_A"), vec![1, D], &v[..D]),
            Tensor::from_f32(name("lora_B"), vec![D, 1], &v[D..]),
        ],
        metadata: None,
        config_json: b"{}".to_vec(),
    }
}

fn vectors(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..2 * D).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.random_range(0..centres.len())];
            c.iter()
                .map(|x| x + 0.3 * rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect()
}

fn ingest(store: &Store, vs: &[Vec<f32>], first_task: usize) {
    for (c, chunk) in vs.chunks(2000).enumerate() {
        let batch = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| {
                PreparedObject::prepare(NewObject {
                    object: lora(v),
                    task: TaskRecord::named(format!("t{}", first_task + c * 2000 + i)),
                    source: None,
                    stage: None,
                    metrics: Default::default(),
                })
            })
            .collect();
        store.commit_batch(batch).unwrap();
    }
}

/// Default graph parameters, the graph forced (10k objects are below the default switch-over).
fn config() -> IndexConfig {
    IndexConfig {
        mode: SearchMode::Hnsw,
        ..IndexConfig::default()
    }
}

fn tupate_space(store: &Store) -> peftdb::embed::SpaceId {
    store
        .spaces()
        .unwrap()
        .into_iter()
        .find(|s| s.key.kind == peftdb::embed::EmbeddingKind::Tupate)
        .expect("a TuPaTE space")
        .id
}

fn open(store: &Store) -> (IndexManager, SpaceState) {
    let (m, report) = IndexManager::open(store, config(), &|_| {}).unwrap();
    // The TuPaTE space and the delta-sketch space of the LoRA objects.
    assert_eq!(report.spaces.len(), 2);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let tupate = tupate_space(store);
    let state = report
        .spaces
        .iter()
        .find(|(id, _)| *id == tupate)
        .map(|(_, s)| s.clone())
        .expect("the TuPaTE space");
    (m, state)
}

fn answers(store: &Store, m: &IndexManager, qs: &[Vec<f32>], mode: SearchMode) -> Vec<Vec<Hit>> {
    let space = tupate_space(store);
    let si = m.space(space).unwrap();
    qs.iter()
        .map(|q| {
            si.search(q, 10, mode, &|id| m.object(id).is_some(), None)
                .unwrap()
                .0
        })
        .collect()
}

fn check_recall(store: &Store, got: &[Vec<Hit>], qs: &[Vec<f32>]) {
    let space = tupate_space(store);
    let all = store.embeddings(space).unwrap();
    let mut total = 0.0;
    for (g, q) in got.iter().zip(qs) {
        assert_eq!(g.len(), 10);
        total += recall(g, &brute_force(q, &all, 10, |_| true));
    }
    let r = total / qs.len() as f64;
    assert!(r >= 0.99, "recall@10 {r}");
}

/// The graph files of the index folder (not the space's `.vecs` rows, tested in tests/store_v2.rs).
/// The graph files of one space (the TuPaTE space; the delta-sketch space has its own).
fn files(dir: &Path, space: SpaceId) -> Vec<PathBuf> {
    let prefix = format!("space-{space}-");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".vecs"))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    v.sort();
    v
}

fn file_ending(dir: &Path, space: SpaceId, suffix: &str) -> PathBuf {
    files(dir, space)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap_or_else(|| panic!("no *{suffix} in {}", dir.display()))
}

fn assert_rebuilt(state: &SpaceState, why: &str) {
    match state {
        SpaceState::Rebuilt { reason } => {
            assert!(reason.contains(why), "reason {reason:?} lacks {why:?}")
        }
        other => panic!("expected a rebuild ({why}), got {other:?}"),
    }
}

#[test]
fn reload_and_recovery() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("zoo.peftdb");
    let store = Store::create(&path).unwrap();
    let data = vectors(3_000, 1);
    ingest(&store, &data, 0);
    let space: SpaceId = tupate_space(&store);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let qs: Vec<Vec<f32>> = (0..100)
        .map(|_| {
            data[rng.random_range(0..data.len())]
                .iter()
                .map(|x| x + 0.2 * rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();

    // First open: no index recorded, built and saved.
    let (m, st) = open(&store);
    assert_rebuilt(&st, "no index recorded");
    assert!(m.space(space).unwrap().has_graph());
    let first = answers(&store, &m, &qs, SearchMode::Auto);
    check_recall(&store, &first, &qs);
    let exact = answers(&store, &m, &qs, SearchMode::Exact);
    drop(m);
    let dir = index_dir(&path);
    assert_eq!(
        files(&dir, space).len(),
        3,
        "graph, data and ids: {:?}",
        files(&dir, space)
    );
    assert_eq!(store.index_meta(space).unwrap().unwrap().generation, 1);

    // Reload: the same graph, the same answers.
    let (m, st) = open(&store);
    assert_eq!(
        st,
        SpaceState::Loaded {
            generation: 1,
            inserted: 0
        }
    );
    let ids = |a: &[Vec<Hit>]| -> Vec<Vec<u64>> {
        a.iter()
            .map(|h| {
                let mut v: Vec<u64> = h.iter().map(|x| x.id).collect();
                v.sort_unstable();
                v
            })
            .collect()
    };
    assert_eq!(
        ids(&answers(&store, &m, &qs, SearchMode::Auto)),
        ids(&first)
    );
    drop(m);

    // Corrupt a byte in the middle of the data file: detected by checksum, rebuilt, same top answers.
    let data_file = file_ending(&dir, space, ".hnsw.data");
    let mut bytes = std::fs::read(&data_file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data_file, &bytes).unwrap();
    let (m, st) = open(&store);
    assert_rebuilt(&st, "checksum");
    let after = answers(&store, &m, &qs, SearchMode::Auto);
    check_recall(&store, &after, &qs);
    for (a, e) in after.iter().zip(&exact) {
        assert_eq!(a[0].id, e[0].id);
    }
    drop(m);
    assert_eq!(store.index_meta(space).unwrap().unwrap().generation, 2);
    assert_eq!(
        files(&dir, space).len(),
        3,
        "old generation removed: {:?}",
        files(&dir, space)
    );

    // Truncate the graph file.
    let graph_file = file_ending(&dir, space, ".hnsw.graph");
    let len = std::fs::metadata(&graph_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&graph_file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let (m, st) = open(&store);
    assert_rebuilt(&st, "checksum");
    check_recall(&store, &answers(&store, &m, &qs, SearchMode::Auto), &qs);
    drop(m);

    // Files of another generation put in place of the current ones.
    let gen3: Vec<(PathBuf, Vec<u8>)> = files(&dir, space)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    std::fs::remove_file(file_ending(&dir, space, ".ids")).unwrap(); // missing file -> generation 4
    let (m, st) = open(&store);
    assert_rebuilt(&st, "missing");
    drop(m);
    for (p, b) in &gen3 {
        let name = p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace("-g3.", "-g4.");
        std::fs::write(dir.join(name), b).unwrap();
    }
    let (m, st) = open(&store);
    assert_rebuilt(&st, "checksum");
    drop(m);

    // Stale: built with other parameters.
    let mut meta = store.index_meta(space).unwrap().unwrap();
    meta.m += 1;
    store.set_index_meta(space, Some(&meta)).unwrap();
    let (m, st) = open(&store);
    assert_rebuilt(&st, "other parameters");
    drop(m);

    // Garbage where the record points, and a record that is not JSON: rebuilt, never a panic.
    std::fs::write(file_ending(&dir, space, ".hnsw.graph"), b"garbage").unwrap();
    let (m, st) = open(&store);
    assert_rebuilt(&st, "checksum");
    drop(m);

    // Objects added after the index was written: inserted on load, searchable.
    let extra = vectors(300, 77);
    ingest(&store, &extra, 100_000);
    let (mut m, st) = open(&store);
    assert!(
        matches!(st, SpaceState::Loaded { inserted: 300, .. }),
        "{st:?}"
    );
    let res = Nearest::vector(space, extra[5].clone())
        .k(3)
        .run(&store, &m)
        .unwrap();
    assert_eq!(res.tasks[0].task, "t100005");
    check_recall(&store, &answers(&store, &m, &qs, SearchMode::Auto), &qs);

    // Deletes through the manager: hidden at once, k results still come back.
    let top: Vec<u64> = answers(&store, &m, &qs[..1], SearchMode::Auto)[0]
        .iter()
        .map(|h| h.id)
        .collect();
    m.remove(&store, &top[..5]).unwrap();
    let now = answers(&store, &m, &qs[..1], SearchMode::Auto);
    assert_eq!(now[0].len(), 10);
    assert!(now[0].iter().all(|h| !top[..5].contains(&h.id)));
    check_recall(&store, &answers(&store, &m, &qs, SearchMode::Auto), &qs);
    drop(m);
    // After a reload the removed objects stay hidden (the graph still holds them as tombstones).
    let (m, _) = open(&store);
    let again = answers(&store, &m, &qs[..1], SearchMode::Auto);
    assert!(again[0].iter().all(|h| !top[..5].contains(&h.id)));
    check_recall(&store, &answers(&store, &m, &qs, SearchMode::Auto), &qs);
    drop(m);

    // Removal through the store alone, then sync: hidden too.
    let victim = again[0][0].id;
    store.remove(&[victim]).unwrap();
    let (mut m, _) = open(&store);
    assert!(m.object(victim).is_none());
    m.sync(&store, &|_| {}).unwrap();
    let after_sync = answers(&store, &m, &qs[..1], SearchMode::Auto);
    assert!(after_sync[0].iter().all(|h| h.id != victim));
}

#[test]
fn read_only_store_builds_in_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("zoo.peftdb");
    {
        let store = Store::create(&path).unwrap();
        ingest(&store, &vectors(300, 5), 0);
    }
    let store = Store::open_read_only(&path).unwrap();
    let config = IndexConfig {
        mode: SearchMode::Hnsw,
        ..IndexConfig::default()
    };
    let (m, report) = IndexManager::open(&store, config, &|_| {}).unwrap();
    assert!(matches!(report.spaces[0].1, SpaceState::Rebuilt { .. }));
    assert!(
        !index_dir(&path).exists(),
        "a read-only store writes nothing"
    );
    let space = tupate_space(&store);
    let v = store.embedding(space, 7).unwrap().unwrap();
    let res = Nearest::vector(space, v).k(1).run(&store, &m).unwrap();
    assert_eq!(res.tasks[0].task, "t6");
    assert_eq!(res.spaces[0].engine, "hnsw");
}
