//! The transfer study end to end on a small budget: every phase (zero-shot ground truth, the tuning grid,
//! scratch, `suggest` at its defaults) runs through the product's path on one target, writes one record
//! per unit under the key a rerun looks up, and the report is written; a second run finds every unit
//! done and appends nothing (the study is resumable).

mod common;

use candle_core::Device;
use peftdb::engine::{Engine, EngineOptions};
use peftdb::experiment::transfer::{config_label, run, FewShot, Phase, StudyConfig};
use peftdb::suggest::SuggestConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[test]
fn a_small_study_runs_every_phase_and_resumes() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let engine = Engine::load_with(
        &common::model_dir(),
        &Device::Cpu,
        &EngineOptions { max_len: 16 },
    )
    .expect("model");
    let cfg = StudyConfig {
        zoo: repo.join("examples/demo-zoo"),
        tasks: common::shared_dir().join("tasks"),
        out: tmp.path().to_path_buf(),
        seeds: vec![0],
        tune_seeds: vec![0],
        targets: vec!["strategyqa".into()],
        suggest: SuggestConfig {
            shots: 2,
            short_tune_steps: 2,
            ..Default::default()
        },
        few_shot: FewShot {
            steps: 2,
            batch_size: 4,
            lr: 1e-3,
            eval_every: 2,
        },
        textemb_examples: 4,
        eval_limit: Some(8),
    };
    let mut units = 0;
    run(&cfg, &engine, 16, &Phase::ALL, &mut |ev| {
        if let peftdb::experiment::transfer::StudyEvent::Unit { .. } = ev {
            units += 1;
        }
    })
    .expect("the study runs");
    let results = std::fs::read_to_string(tmp.path().join("results.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut per_phase: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        assert_eq!(r["task"], "strategyqa", "{r}");
        *per_phase
            .entry(r["phase"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    // Zero-shot: the bare model, 13 sources and 3 averages; one tune, scratch and final unit each.
    assert_eq!(per_phase["zero"], 17, "{per_phase:?}");
    assert_eq!(per_phase["tune"], 1, "{per_phase:?}");
    assert_eq!(per_phase["scratch"], 1, "{per_phase:?}");
    assert_eq!(per_phase["final"], 1, "{per_phase:?}");
    assert_eq!(units, records.len());
    let fin = records.iter().find(|r| r["phase"] == "final").unwrap();
    assert_eq!(fin["data"]["config"], config_label(&cfg.suggest));
    assert_eq!(fin["data"]["test"]["examples"], 8);
    let tune = records.iter().find(|r| r["phase"] == "tune").unwrap();
    assert_eq!(tune["data"]["candidates"].as_array().unwrap().len(), 13);
    assert!(tune["data"]["answers"].as_array().unwrap().len() >= 40);
    let report = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
    for section in ["## 1.", "## 2.", "## 3.", "## 4. Tuning grid"] {
        assert!(report.contains(section), "no {section} in the report");
    }
    // A second run: every unit is found under its key, nothing is appended, the report is the same.
    let mut again = 0;
    run(&cfg, &engine, 16, &Phase::ALL, &mut |ev| {
        if let peftdb::experiment::transfer::StudyEvent::Unit { .. } = ev {
            again += 1;
        }
    })
    .unwrap();
    assert_eq!(again, 0, "a rerun redid {again} units");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("results.jsonl")).unwrap(),
        results
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("report.md")).unwrap(),
        report
    );
}
