//! `delta` over a zoo larger than [`DELTA_SCAN_MAX`]: the delta-sketch index shortlists, the exact
//! cosine decides. Checked against the exact scan of every object (`--mode exact`), as qdrant checks
//! its ANN against exact search; seeded data, no timing assertions.

use peftdb::embed::EmbeddingKind;
use peftdb::index::{IndexConfig, IndexManager, SearchMode};
use peftdb::query::{Nearest, Similarity, DELTA_SCAN_MAX};
use peftdb::store::{NewObject, PreparedObject, Store, TaskRecord};
use peftdb::synth::{lora, ModelShape, Seeds};
use std::collections::BTreeMap;

fn tiny() -> ModelShape {
    ModelShape {
        name: "tiny-bert".into(),
        layers: 2,
        hidden: 32,
        intermediate: 64,
        heads: 2,
    }
}

#[test]
fn sketch_index_shortlist_matches_the_exact_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("zoo.peftdb")).unwrap();
    let m = tiny();
    // 160 tasks in 16 groups, 4 checkpoints each: 640 LoRA objects, over the exact-scan limit. A few
    // adapt only `query`: another delta-sketch space, compared exactly whatever the index says.
    let (tasks, per_task) = (160u64, 4u64);
    assert!((tasks * per_task) as usize > DELTA_SCAN_MAX);
    let mut batch = Vec::new();
    for t in 0..tasks {
        for o in 0..per_task {
            let targets: &[&str] = if t % 40 == 7 {
                &["query"]
            } else {
                &["query", "value"]
            };
            let obj = lora(
                &m,
                4,
                targets,
                Seeds {
                    group: t % 16,
                    task: 1000 + t,
                    object: t * 100 + o,
                },
            );
            batch.push(PreparedObject::prepare(NewObject {
                object: obj,
                task: TaskRecord::named(format!("task{t:03}")),
                source: None,
                stage: Some(format!("step-{o}")),
                metrics: BTreeMap::new(),
            }));
        }
    }
    store.commit_batch(batch).unwrap();
    // Every LoRA object has its sketch, in a space of its own kind.
    let rec = store.objects().unwrap().remove(0);
    assert!(rec
        .embeddings
        .iter()
        .any(|e| e.kind == EmbeddingKind::DeltaSketch));
    let sketch_spaces: Vec<_> = store
        .spaces()
        .unwrap()
        .into_iter()
        .filter(|s| s.key.kind == EmbeddingKind::DeltaSketch)
        .collect();
    assert_eq!(sketch_spaces.len(), 2, "query+value and query-only");
    assert_eq!(sketch_spaces.iter().map(|s| s.count).sum::<u64>(), 640);

    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
    let k = 10;
    let mut overlap = 0usize;
    for t in (0..tasks).step_by(9) {
        let name = format!("task{t:03}");
        let q = Nearest::task(&name).k(k).similarity(Similarity::Delta);
        let auto = q.clone().run(&store, &index).unwrap();
        let exact = q
            .search_mode(SearchMode::Exact)
            .run(&store, &index)
            .unwrap();
        assert_ne!(auto.spaces[0].engine, "scan", "{name}: the index is used");
        assert_eq!(exact.spaces[0].engine, "scan");
        let a: Vec<&str> = auto.tasks.iter().map(|h| h.task.as_str()).collect();
        let e: Vec<&str> = exact.tasks.iter().map(|h| h.task.as_str()).collect();
        assert_eq!(a.len(), k);
        // The nearest task is the same, with the same exact score.
        assert_eq!(a[0], e[0], "{name}");
        assert!((auto.tasks[0].score - exact.tasks[0].score).abs() < 1e-6);
        // Scores of shortlisted tasks are exact: a task in both lists has the same score.
        for h in &auto.tasks {
            if let Some(x) = exact.tasks.iter().find(|x| x.task == h.task) {
                assert!((h.score - x.score).abs() < 1e-6, "{name} {}", h.task);
            }
        }
        overlap += a.iter().filter(|x| e.contains(x)).count();
        // The query-only tasks (another space) are compared exactly, so they are never missed.
        for x in &e {
            let n: u64 = x[4..].parse().unwrap();
            if n % 40 == 7 {
                assert!(a.contains(x), "{name}: {x} of the other space");
            }
        }
    }
    let queries = (0..tasks).step_by(9).count();
    let recall = overlap as f64 / (queries * k) as f64;
    eprintln!("top-{k} task recall over {queries} queries: {recall:.3}");
    assert!(recall >= 0.98, "top-{k} task recall {recall}");
}
