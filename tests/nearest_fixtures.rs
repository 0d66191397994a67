//! `peftdb nearest` and the query builder on a store of the real PEFT fixtures and on a generated zoo.

use peftdb::embed::cosine;
use peftdb::embed::delta::{delta_cosine, LoraDelta};
use peftdb::index::{IndexConfig, IndexManager};
use peftdb::object::ReadOptions;
use peftdb::object::{read_adapter, LightweightObject, MethodKind, Tensor};
use peftdb::query::{Nearest, Similarity};
use peftdb::store::{NewObject, Outcome, Store, TaskRecord};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{fixture, FIXTURES};

fn add(store: &Store, object: LightweightObject, task: TaskRecord, stage: Option<&str>) -> u64 {
    match store
        .ingest(NewObject {
            object,
            task,
            source: None,
            stage: stage.map(String::from),
            metrics: Default::default(),
        })
        .unwrap()
    {
        Outcome::Added(id) => id,
        other => panic!("{other:?}"),
    }
}

fn fixture_store(dir: &Path) -> PathBuf {
    let path = dir.join("fixtures.peftdb");
    let store = Store::create(&path).unwrap();
    for f in FIXTURES {
        add(
            &store,
            read_adapter(&fixture(f), &ReadOptions::default()).unwrap(),
            TaskRecord::named(f),
            None,
        );
    }
    path
}

fn cli(db: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn fixtures_library_queries() {
    let tmp = tempfile::tempdir().unwrap();
    let path = fixture_store(tmp.path());
    let store = Store::open(&path).unwrap();
    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();

    // Leave-one-out by default: the query task is not in its own results; scores are exact cosines.
    let res = Nearest::task("lora_r8_qv").run(&store, &index).unwrap();
    assert_eq!(res.spaces.len(), 1);
    assert_eq!(res.spaces[0].engine, "flat");
    assert!(res.tasks.iter().all(|t| t.task != "lora_r8_qv"));
    let space = res.spaces[0].space.unwrap();
    let q = store
        .embedding(space, res.spaces[0].object.unwrap())
        .unwrap()
        .unwrap();
    for t in &res.tasks {
        let o = t.per_space[0].object;
        let v = store.embedding(space, o).unwrap().unwrap();
        assert!((t.score - cosine(&q, &v)).abs() < 1e-5);
    }
    let n_in_space = store.space(space).unwrap().count as usize;
    assert_eq!(res.tasks.len(), n_in_space - 1);

    // An adapter folder that is not stored: read and embedded now; itself (stored) comes first.
    let res = Nearest::adapter(fixture("lora_r8_qv"))
        .run(&store, &index)
        .unwrap();
    assert_eq!(res.tasks[0].task, "lora_r8_qv");
    assert!((res.tasks[0].score - 1.0).abs() < 1e-5);
    let res = Nearest::object(1)
        .exclude_query_task(false)
        .k(1)
        .run(&store, &index)
        .unwrap();
    assert_eq!(res.tasks[0].task, "lora_r8_qv");

    // delta: every LoRA of the base model, whatever its ranks (the rank_pattern one has no TuPaTE space).
    let res = Nearest::task("lora_r8_qv")
        .similarity(Similarity::Delta)
        .run(&store, &index)
        .unwrap();
    let names: Vec<&str> = res.tasks.iter().map(|t| t.task.as_str()).collect();
    assert!(names.contains(&"lora_rank_pattern"), "{names:?}");
    assert!(names
        .iter()
        .all(|n| n.starts_with("lora_") && *n != "lora_r8_qv"));
    let qd = LoraDelta::from_object(
        &read_adapter(&fixture("lora_r8_qv"), &ReadOptions::default()).unwrap(),
    )
    .unwrap();
    for t in &res.tasks {
        let od = LoraDelta::from_object(
            &read_adapter(&fixture(&t.task), &ReadOptions::default()).unwrap(),
        )
        .unwrap();
        assert!((t.score as f64 - delta_cosine(&qd, &od)).abs() < 1e-5);
    }
    // delta of a non-LoRA query is a clear error.
    let err = Nearest::task("ia3")
        .similarity(Similarity::Delta)
        .run(&store, &index)
        .unwrap_err();
    assert!(err.to_string().contains("LoRA"), "{err}");
    // Unknown names are errors, not panics.
    assert!(Nearest::task("nope").run(&store, &index).is_err());
    assert!(Nearest::object(9999).run(&store, &index).is_err());
    assert!(Nearest::adapter(tmp.path()).run(&store, &index).is_err());
}

#[test]
fn fixtures_cli_table_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let path = fixture_store(tmp.path());
    // lora_r8_qv is alone in its space: leave-one-out leaves nothing, and says so.
    let (ok, out, err) = cli(&path, &["nearest", "--task", "lora_r8_qv"]);
    assert!(ok, "{err}");
    assert!(out.contains("no task passes"), "{out}");
    let (ok, out, err) = cli(
        &path,
        &["nearest", "--task", "lora_r8_qv", "--include-self"],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("rank") && out.contains("score") && out.contains("lora_r8_qv"),
        "{out}"
    );
    let (ok, out, err) = cli(
        &path,
        &[
            "--json",
            "nearest",
            "--task",
            "lora_r8_qv",
            "-k",
            "2",
            "--include-self",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["similarity"], "tupate");
    assert_eq!(v["target"], "task");
    assert!(v["tasks"].as_array().unwrap().len() <= 2);
    assert_eq!(v["tasks"][0]["rank"], 1);
    let adapter = fixture("ia3");
    let (ok, out, err) = cli(
        &path,
        &[
            "--json",
            "nearest",
            "--adapter",
            adapter.to_str().unwrap(),
            "--include-self",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tasks"][0]["task"], "ia3");
    let (ok, out, err) = cli(
        &path,
        &["nearest", "--task", "lora_r8_qv", "--similarity", "delta"],
    );
    assert!(ok, "{err}");
    assert!(out.contains("lora_rank_pattern"), "{out}");
    let (ok, _, err) = cli(&path, &["nearest", "--task", "missing-task"]);
    assert!(!ok);
    assert!(err.contains("missing-task"), "{err}");
}

/// Perturb every tensor of a fixture: `base + shift * direction(task) + noise`.
fn perturbed(
    base: &LightweightObject,
    task_seed: u64,
    shift: f32,
    noise_seed: u64,
) -> LightweightObject {
    let mut dir_rng = ChaCha8Rng::seed_from_u64(task_seed);
    let mut noise = ChaCha8Rng::seed_from_u64(noise_seed);
    let mut o = base.clone();
    o.tensors = base
        .tensors
        .iter()
        .map(|t| {
            let v: Vec<f32> = t
                .to_f32()
                .iter()
                .map(|x| {
                    x + shift * dir_rng.random_range(-1.0f32..1.0)
                        + 0.01 * noise.random_range(-1.0f32..1.0)
                })
                .collect();
            Tensor::from_f32(t.name.clone(), t.shape.clone(), &v)
        })
        .collect();
    o
}

#[test]
fn generated_zoo_ensemble_filters_and_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("zoo.peftdb");
    let store = Store::create(&path).unwrap();
    let lora = read_adapter(&fixture("lora_r8_qv"), &ReadOptions::default()).unwrap();
    let ia3 = read_adapter(&fixture("ia3"), &ReadOptions::default()).unwrap();
    // 12 tasks in 3 groups; tasks of a group share a direction. Each task: LoRA early + best, and IA3.
    for t in 0..12u64 {
        let task = TaskRecord {
            name: format!("task{t:02}"),
            group: Some(format!("g{}", t % 3)),
            tags: vec![if t < 6 { "low".into() } else { "high".into() }],
            ..Default::default()
        };
        let g = 100 + t % 3;
        add(
            &store,
            perturbed(&lora, g, 0.05, 1000 + t),
            task.clone(),
            Some("early"),
        );
        add(
            &store,
            perturbed(&lora, g, 0.05, 2000 + t),
            task.clone(),
            Some("best"),
        );
        add(&store, perturbed(&ia3, g, 0.5, 3000 + t), task, None);
    }
    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
    let res = Nearest::task("task03").k(3).run(&store, &index).unwrap();
    assert_eq!(res.spaces.len(), 2, "LoRA and IA3 spaces");
    let lora_space = res
        .spaces
        .iter()
        .find(|s| s.method == MethodKind::Lora)
        .unwrap();
    let best = store.object(lora_space.object.unwrap()).unwrap();
    assert_eq!(
        best.stage.as_deref(),
        Some("best"),
        "the query uses the best checkpoint"
    );
    for t in &res.tasks {
        assert_ne!(t.task, "task03");
        assert_eq!(t.per_space.len(), 2);
        let mean = (t.per_space[0].score + t.per_space[1].score) / 2.0;
        assert!(
            (t.score - mean).abs() < 1e-6,
            "3 ENSEMBLE: mean of per-space scores"
        );
        assert_eq!(
            t.group.as_deref(),
            Some("g0"),
            "same-group tasks are nearest: {res:?}"
        );
    }
    // Within a space, a task's score is its closest checkpoint.
    let top = &res.tasks[0];
    let lora_score = top
        .per_space
        .iter()
        .find(|p| p.method == MethodKind::Lora)
        .unwrap();
    let q = store
        .embedding(lora_space.space.unwrap(), lora_space.object.unwrap())
        .unwrap()
        .unwrap();
    let max = index
        .objects()
        .iter()
        .filter(|o| o.task == top.task && o.method == MethodKind::Lora)
        .map(|o| {
            cosine(
                &q,
                &store
                    .embedding(lora_space.space.unwrap(), o.id)
                    .unwrap()
                    .unwrap(),
            )
        })
        .fold(f32::MIN, f32::max);
    assert!((lora_score.score - max).abs() < 1e-5);
    // Filters: group, tag, method.
    let res = Nearest::task("task03")
        .group("g1")
        .run(&store, &index)
        .unwrap();
    assert_eq!(res.tasks.len(), 4);
    assert!(res.tasks.iter().all(|t| t.group.as_deref() == Some("g1")));
    let res = Nearest::task("task03")
        .tag("high")
        .run(&store, &index)
        .unwrap();
    assert_eq!(res.tasks.len(), 6);
    let res = Nearest::task("task03")
        .method(MethodKind::Ia3)
        .run(&store, &index)
        .unwrap();
    assert_eq!(res.spaces.len(), 1);
    assert!(res
        .tasks
        .iter()
        .all(|t| t.per_space.len() == 1 && t.per_space[0].method == MethodKind::Ia3));
    // centered and delta variants run and keep leave-one-out.
    for s in [Similarity::Centered, Similarity::Delta] {
        let res = Nearest::task("task03")
            .similarity(s)
            .k(3)
            .run(&store, &index)
            .unwrap();
        assert_eq!(res.tasks.len(), 3);
        assert!(res.tasks.iter().all(|t| t.task != "task03"));
        assert_eq!(res.tasks[0].group.as_deref(), Some("g0"), "{s:?}");
    }
    drop(index);
    drop(store);
    let (ok, out, err) = cli(&path, &["nearest", "--task", "task03", "-k", "3"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("lora") && out.contains("ia3"),
        "per-space columns: {out}"
    );
    let (ok, out, err) = cli(
        &path,
        &[
            "--json",
            "nearest",
            "--task",
            "task03",
            "--similarity",
            "centered",
            "--group",
            "g2",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["similarity"], "centered");
    assert_eq!(v["tasks"].as_array().unwrap().len(), 4);
}
