//! `suggest` end to end on a small zoo trained from the 14 tasks (`common::tasks_dir`), with the new task left out of the zoo.

mod common;

use peftdb::engine::ScoreOptions;
use peftdb::engine::{train, TrainConfig, TrainData};
use peftdb::engine::{Engine, EngineOptions};
use peftdb::ensemble::MergeMode;
use peftdb::index::{IndexConfig, IndexManager};
use peftdb::object::{read_adapter, MethodKind, ReadOptions};
use peftdb::store::{NewObject, Outcome, Store, TaskRecord};
use peftdb::suggest::{suggest, write_suggestion, SuggestConfig, SuggestError, SuggestInput};
use peftdb::task::{few_shot, Task};
use std::path::PathBuf;

const BASE: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn task(name: &str) -> Task {
    Task::load(&common::tasks_dir().join(name)).unwrap()
}

fn short_train(
    engine: &Engine,
    t: &Task,
    steps: usize,
    seed: u64,
) -> peftdb::object::LightweightObject {
    let labels = t.label_texts();
    let tr = few_shot(&t.train, labels.len(), 4, seed).unwrap();
    let dv = few_shot(&t.dev, labels.len(), 2, seed + 1).unwrap();
    let mut cfg = TrainConfig::new(MethodKind::Lora);
    cfg.max_steps = Some(steps);
    cfg.eval_every = steps;
    cfg.patience = None;
    cfg.seed = seed;
    cfg.base_model_name = Some(BASE.into());
    let data = TrainData {
        label_texts: &labels,
        train: &tr,
        dev: &dv,
        test: None,
    };
    train(engine, &data, &cfg, &mut |_| {}).unwrap().best.object
}

#[test]
fn suggest_end_to_end_on_a_trained_zoo() {
    let engine = Engine::load_with(
        &common::model_dir(),
        &candle_core::Device::Cpu,
        &EngineOptions {
            max_len: 48,
            ..Default::default()
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("zoo.redb");
    let store = Store::create(&db).unwrap();
    for (i, name) in ["movie_sentiment", "bbc_topic", "strategyqa"]
        .iter()
        .enumerate()
    {
        let t = task(name);
        let obj = short_train(&engine, &t, 6, i as u64);
        let out = store
            .ingest(NewObject {
                object: obj,
                task: TaskRecord {
                    name: t.name.clone(),
                    group: t.group.clone(),
                    ..Default::default()
                },
                source: None,
                stage: Some("best".into()),
                metrics: Default::default(),
            })
            .unwrap();
        assert!(matches!(out, Outcome::Added(_)));
    }
    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
    let new_task = task("tweet_sentiment");
    let cfg = SuggestConfig {
        k: 5,
        shots: 4,
        short_tune_steps: 4,
        merge: MergeMode::Param,
        tau: 0.5,
        ..Default::default()
    };
    let input = SuggestInput {
        store: &store,
        index: &index,
        engine: &engine,
        task: &new_task,
        adapter: None,
    };
    let (obj, report) = suggest(&input, &cfg, &mut |_| {}).unwrap();
    // K larger than the zoo: all three are used, and the report says so.
    assert_eq!((report.k_requested, report.k_used), (5, 3));
    assert!(
        report.notes.iter().any(|n| n.contains("only 3")),
        "{:?}",
        report.notes
    );
    // Weights: only candidates that beat the bare model beyond the noise; softmax over them; none at all
    // for a from-scratch answer.
    let wsum: f64 = report.candidates.iter().map(|c| c.weight).sum();
    match report.decision {
        peftdb::suggest::Decision::Scratch => assert_eq!(wsum, 0.0),
        _ => assert!((wsum - 1.0).abs() < 1e-9),
    }
    for c in &report.candidates {
        // Every indicator suggest always computes (Loss, calibrated Loss, KL, EL2N, cosine).
        let want: Vec<&str> = peftdb::transfer::default_indicators(cfg.indicator)
            .iter()
            .map(|i| i.as_str())
            .collect();
        assert_eq!(c.scores.len(), want.len(), "{:?}", c.scores);
        assert!(
            want.iter().all(|k| c.scores.contains_key(*k)),
            "{:?}",
            c.scores
        );
        assert!(c.scores.values().all(|v| v.is_finite()));
        assert!(c.scores["kl"] <= 0.0);
        assert_eq!(
            c.helps,
            c.gain > 0.0
                && c.gain > cfg.noise_z * c.gain_se
                && (!report.accuracy_guard || c.accuracy >= report.bare.accuracy)
        );
        if !c.helps {
            assert_eq!(c.weight, 0.0);
        }
    }
    // Candidates are scored on the episode's train and dev shots: 3 classes x (4 + 4).
    assert_eq!(report.examples, 24);
    assert!(report.bare.accuracy >= 0.0 && report.bare.accuracy <= 1.0);
    for stage in ["target", "retrieval", "rerank", "ensemble"] {
        assert!(report.timings.contains_key(stage), "{stage}");
    }
    // Written atomically, loads back, and evaluates.
    let out = dir.path().join("init");
    write_suggestion(&obj, &report, &out).unwrap();
    assert!(out.join("peftdb_report.json").is_file());
    let back = read_adapter(&out, &ReadOptions::default()).unwrap();
    assert_eq!(back.tensors, obj.tensors);
    let set = engine.prepare(&back).unwrap();
    let texts: Vec<&str> = new_task
        .test
        .iter()
        .take(16)
        .map(|e| e.text.as_str())
        .collect();
    let probs = engine
        .label_probs(
            Some(&set),
            &new_task.label_texts(),
            &texts,
            &ScoreOptions::default(),
        )
        .unwrap();
    assert_eq!(probs.len(), 16);
    assert!(
        write_suggestion(&obj, &report, &out).is_err(),
        "an existing output is never overwritten"
    );

    // Bad input: no candidates of that method; a temperature <= 0.
    let bitfit = SuggestConfig {
        method: MethodKind::Bitfit,
        ..cfg.clone()
    };
    assert!(matches!(
        suggest(&input, &bitfit, &mut |_| {}),
        Err(SuggestError::NoSpace { .. })
    ));
    let cold = SuggestConfig {
        tau: 0.0,
        ..cfg.clone()
    };
    assert!(suggest(&input, &cold, &mut |_| {})
        .unwrap_err()
        .to_string()
        .contains("temperature"));

    // The CLI on the same store: a table, the report, and the folder.
    drop(index);
    drop(store);
    let cli_out = dir.path().join("cli-init");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(&db)
        .args([
            "suggest",
            "--shots",
            "4",
            "--steps",
            "3",
            "--max-len",
            "48",
            "-k",
            "2",
            "--model",
        ])
        .arg(common::model_dir())
        .arg("--task")
        .arg(common::task_dir("tweet_sentiment"))
        .arg("--out")
        .arg(&cli_out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(peftdb::suggest::DEFAULT_INDICATOR.as_str()) && stdout.contains("weight"),
        "{stdout}"
    );
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cli_out.join("peftdb_report.json")).unwrap())
            .unwrap();
    assert_eq!(rep["k_used"], 2);
    assert!(rep["decision"].is_string() && rep["bare"]["accuracy"].is_number());
    let _: PathBuf = cli_out;
}
