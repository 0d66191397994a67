//! The replication harness in a small configuration (3 real tasks, 2 methods, a few steps): it runs end
//! to end, resumes without redoing finished runs, recomputes the same gains the results file implies,
//! and writes a report with its tables, CSVs and plots.

mod common;

use peftdb::engine::{Engine, EngineOptions};
use peftdb::experiment::write_report;
use peftdb::experiment::ResultsFile;
use peftdb::experiment::{run, ExperimentConfig, RunOptions};
use std::collections::BTreeMap;
use std::path::Path;

fn small_config(dir: &Path) -> ExperimentConfig {
    let text = format!(
        r#"{{
  "tasks_dir": {tasks:?},
  "tasks": ["movie_sentiment", "tweet_sentiment", "bbc_topic"],
  "max_len": 24,
  "temperature": 0.05,
  "zoo": {{"methods": ["lora", "bitfit"], "lora_r": 4, "lora_alpha": 8, "prefix_len": 4, "bottleneck": 4,
          "train_cap": 32, "steps": 4, "batch_size": 4, "eval_every": 2, "dev_cap": 8, "test_cap": 12,
          "seed": 0, "lr": {{"lora": 0.002}}}},
  "limited": {{"method": "lora", "checkpoint": "best", "shots": 2, "dev_shots": 1, "steps": 2,
              "batch_size": 4, "lr": 0.002, "test_cap": 12, "seeds": [0, 1]}},
  "pewe": {{"enabled": true, "indicators": ["loss", "cos_logits"], "tau": 0.1, "indicator_examples": 4}},
  "textemb_examples": 8
}}"#,
        tasks = common::tasks_dir()
    );
    let p = dir.join("config.json");
    std::fs::write(&p, text).unwrap();
    ExperimentConfig::load(&p).unwrap()
}

#[test]
fn small_experiment_runs_resumes_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(dir.path());
    let engine = Engine::load_with(
        &common::model_dir(),
        &candle_core::Device::Cpu,
        &EngineOptions {
            max_len: cfg.max_len,
            ..Default::default()
        },
    )
    .unwrap();
    let out = dir.path().join("out");
    let s = run(&cfg, &engine, &out, &RunOptions::default(), &mut |_| {}).unwrap();
    // zoo 3x2 + textemb 3 + per seed (3 scratch + 6 sources + 3 x (indicators + average + manual + 2 ensembles)).
    let per_seed = 3 + 6 + 3 * 5;
    assert_eq!(s.total, 6 + 3 + 2 * per_seed);
    assert_eq!((s.ran, s.cached, s.stopped), (s.total, 0, false));

    // Resuming does nothing new.
    let again = run(&cfg, &engine, &out, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!((again.ran, again.cached), (0, s.total));

    // Fewer seeds and a subset of targets select finished runs: nothing new runs, nothing is invalidated.
    let mut sub = cfg.clone();
    sub.limited.seeds = vec![1];
    sub.limited.targets = vec!["tweet_sentiment".to_string()];
    let s1 = run(&sub, &engine, &out, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(s1.total, 6 + 3 + (1 + 2 + 5));
    assert_eq!((s1.ran, s1.cached), (0, s1.total));
    // ... and its report covers just that target and seed.
    let (sub_data, _) = write_report(&sub, &out, &dir.path().join("report-sub"), None).unwrap();
    let tw = sub_data
        .tasks
        .iter()
        .position(|x| x == "tweet_sentiment")
        .unwrap();
    assert_eq!(sub_data.complete_targets, vec![tw]);
    assert!(sub_data
        .limited
        .keys()
        .all(|(t, _, seed)| t == "tweet_sentiment" && *seed == 1));

    // A run cut short: drop the last record (and leave half a line), then resume runs exactly that one.
    let results_path = out.join("results.jsonl");
    let text = std::fs::read_to_string(&results_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let last_key: serde_json::Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
    let mut cut = lines[..lines.len() - 1].join("\n");
    cut.push_str("\n{\"key\":\"half");
    std::fs::write(&results_path, cut).unwrap();
    let mut ran_keys = Vec::new();
    let resumed = run(&cfg, &engine, &out, &RunOptions::default(), &mut |e| {
        if let peftdb::experiment::ExperimentEvent::Start { key, .. } = e {
            ran_keys.push(key.to_string());
        }
    })
    .unwrap();
    assert_eq!(resumed.ran, 1);
    assert_eq!(
        ran_keys,
        vec![last_key["key"].as_str().unwrap().to_string()]
    );

    // Deterministic: the re-run record has the same numbers as before.
    let r = ResultsFile::open(&results_path).unwrap();
    let rerun = r.get(last_key["key"].as_str().unwrap()).unwrap();
    assert_eq!(rerun.data, last_key["data"]);

    // Deleted scratch adapters (read by the KL indicator and the `limited` predictor) are trained
    // again, one per target and seed, with the same numbers.
    let scratch = out.join("scratch");
    assert!(scratch.is_dir());
    std::fs::remove_dir_all(&scratch).unwrap();
    let s2 = run(&cfg, &engine, &out, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(s2.ran, 3 * 2);
    let after = ResultsFile::open(&results_path).unwrap();
    for rec in r.records().filter(|x| x.init == "scratch") {
        assert_eq!(after.get(&rec.key).unwrap().data, rec.data, "{}", rec.key);
    }

    // --max-runs stops and says so.
    let other = dir.path().join("other");
    let part = run(
        &cfg,
        &engine,
        &other,
        &RunOptions { max_runs: Some(2) },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((part.ran, part.stopped), (2, true));

    // An indicator record without its example count (a hand-edited or foreign results file) stops the
    // ensemble runs that need it with an error naming the record; it used to count as 1 example and
    // silently rescale the softmax weights.
    let tampered = dir.path().join("tampered");
    common::copy_dir(&out, &tampered);
    let text = std::fs::read_to_string(tampered.join("results.jsonl")).unwrap();
    let mut kept = Vec::new();
    let mut broken_key = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let init = v["init"].as_str().unwrap_or_default().to_string();
        if init.starts_with("ensemble:") {
            continue; // these re-run, and need the indicator record
        }
        if v["phase"] == "indicators" && broken_key.is_empty() {
            v["data"].as_object_mut().unwrap().remove("examples");
            broken_key = v["key"].as_str().unwrap().to_string();
        }
        kept.push(v.to_string());
    }
    assert!(!broken_key.is_empty());
    std::fs::write(tampered.join("results.jsonl"), kept.join("\n") + "\n").unwrap();
    match run(
        &cfg,
        &engine,
        &tampered,
        &RunOptions::default(),
        &mut |_| {},
    ) {
        Err(e @ peftdb::experiment::ExperimentError::Results(_)) => {
            // The typed record refuses the missing count, naming the record and the field.
            let msg = e.to_string();
            assert!(msg.contains(&broken_key), "{msg}");
            assert!(msg.contains("`examples`"), "{msg}");
        }
        other => panic!("expected an error naming {broken_key}, got {other:?}"),
    }

    // The report: files, and gains that match the results file computed by hand here.
    let report_dir = dir.path().join("report");
    let (data, files) = write_report(&cfg, &out, &report_dir, None).unwrap();
    for f in [
        "report.md",
        "zoo.csv",
        "gains.csv",
        "limited_runs.csv",
        "held_out.csv",
        "prediction.csv",
        "prediction_summary.csv",
        "pewe.csv",
        "gains_heatmap.png",
        "prediction_ndcg.png",
        "prediction_rho.png",
        "pewe_accuracy.png",
    ] {
        let p = report_dir.join(f);
        assert!(files.contains(&p), "{f} not reported");
        assert!(std::fs::metadata(&p).unwrap().len() > 0, "{f} empty");
    }
    let png = std::fs::read(report_dir.join("gains_heatmap.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let mut acc: BTreeMap<(String, String, u64), f64> = BTreeMap::new();
    for rec in r.records().filter(|x| x.phase == "limited") {
        acc.insert(
            (rec.task.clone(), rec.init.clone(), rec.seed),
            rec.data["test_accuracy"].as_f64().unwrap(),
        );
    }
    let t = data
        .tasks
        .iter()
        .position(|x| x == "tweet_sentiment")
        .unwrap();
    let src = data.tasks.iter().position(|x| x == "bbc_topic").unwrap();
    let by_hand: Vec<f64> = [0u64, 1]
        .iter()
        .map(|&seed| {
            acc[&("tweet_sentiment".into(), "source:bbc_topic".into(), seed)]
                - acc[&("tweet_sentiment".into(), "scratch".into(), seed)]
        })
        .collect();
    let g = data.gains[t][src].unwrap();
    assert_eq!(g.n, 2);
    assert!((g.mean - (by_hand[0] + by_hand[1]) / 2.0).abs() < 1e-12);
    assert_eq!(data.complete_targets.len(), 3);
    // Held-out check (seeds [0, 1]): the source picked on seed 0 is the one with the higher seed-0
    // gain, and its held-out gain is its seed-1 gain.
    let gain = |src: &str, seed: u64| {
        acc[&("tweet_sentiment".into(), format!("source:{src}"), seed)]
            - acc[&("tweet_sentiment".into(), "scratch".into(), seed)]
    };
    let h = data.held_out[t].unwrap();
    let picked = data.tasks[h.source].as_str();
    assert_ne!(picked, "tweet_sentiment");
    for other in data.tasks.iter().filter(|x| *x != "tweet_sentiment") {
        assert!(gain(picked, 0) >= gain(other, 0), "{picked} vs {other}");
    }
    assert_eq!(h.held_out.n, 1);
    assert!((h.held_out.mean - gain(picked, 1)).abs() < 1e-12);
    let names: Vec<&str> = data.predictors.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "tupate:lora:best",
        "tupate:bitfit:early",
        "centered:lora:best",
        "delta:lora:best",
        "ensemble:best",
        "tupate:lora:limited",
        "datasize",
        "textemb",
        "random",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // Every predictor's rho is a rank among the 2 sources.
    for p in &data.predictors {
        assert!(
            (1.0..=2.0).contains(&p.rho.mean),
            "{}: {}",
            p.name,
            p.rho.mean
        );
    }
    let inits: Vec<&str> = data.pewe.iter().map(|p| p.0.as_str()).collect();
    for want in [
        "scratch",
        "average",
        "manual",
        "best-single:loss",
        "ensemble:cos-logits",
    ] {
        assert!(inits.contains(&want), "{want} missing from {inits:?}");
    }
    let md = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    assert!(md.contains("## 3. Predicting the best source"));
    assert!(!md.contains("## 6. Against the baseline"));

    // A second LIMITED setting (one more step) in the same output folder, reported against the first.
    let mut big = cfg.clone();
    big.limited.steps = 3;
    big.pewe.enabled = false;
    assert_ne!(big.protocol_hash("limited"), cfg.protocol_hash("limited"));
    assert_eq!(big.protocol_hash("zoo"), cfg.protocol_hash("zoo"));
    let sb = run(&big, &engine, &out, &RunOptions::default(), &mut |_| {}).unwrap();
    // Only its transfer runs are new: 2 seeds x 3 targets x (scratch + 2 sources).
    assert_eq!(sb.ran, 2 * 3 * 3);
    let big_dir = dir.path().join("report-big");
    let (big_data, files) = write_report(&big, &out, &big_dir, Some((&cfg, "small"))).unwrap();
    for f in ["comparison.csv", "gains_vs_baseline.png"] {
        assert!(files.contains(&big_dir.join(f)), "{f} not reported");
    }
    let md = std::fs::read_to_string(big_dir.join("report.md")).unwrap();
    assert!(
        md.contains("## 6. Against the baseline setting (small)"),
        "{md}"
    );
    let csv = std::fs::read_to_string(big_dir.join("comparison.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 3 * 2, "{csv}");
    // The comparison's numbers against both settings' gains, worked out here.
    let c = peftdb::experiment::compare(&big_data, &data);
    assert_eq!(c.targets.len(), 3);
    for tc in &c.targets {
        let t = data.tasks.iter().position(|x| x == &tc.target).unwrap();
        let srcs: Vec<usize> = (0..3).filter(|&s| s != t).collect();
        let gb: Vec<f64> = srcs
            .iter()
            .map(|&s| big_data.gains[t][s].unwrap().mean)
            .collect();
        let gs: Vec<f64> = srcs
            .iter()
            .map(|&s| data.gains[t][s].unwrap().mean)
            .collect();
        let best = |g: &[f64]| if g[1] > g[0] { srcs[1] } else { srcs[0] };
        assert_eq!(tc.best.0 .0, data.tasks[best(&gb)], "{}", tc.target);
        assert_eq!(tc.best.1 .0, data.tasks[best(&gs)], "{}", tc.target);
        let want = if gb[0] == gb[1] || gs[0] == gs[1] {
            None
        } else if (gb[0] < gb[1]) == (gs[0] < gs[1]) {
            Some(1.0)
        } else {
            Some(-1.0)
        };
        assert_eq!(tc.spearman, want, "{}", tc.target);
        assert_eq!(tc.scratch.1, data.scratch[t].unwrap());
    }
    // A setting against itself agrees everywhere.
    let same = peftdb::experiment::compare(&data, &data);
    assert_eq!(same.same_best, 3);
    for tc in &same.targets {
        assert!(matches!(tc.spearman, None | Some(1.0)), "{:?}", tc.spearman);
        if let Some(x) = tc.ndcg_of_baseline {
            assert!((x - 100.0).abs() < 1e-9);
        }
    }

    // Results records and the config validate against their schemas (checked in tests/schemas.rs too).
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&results_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One line per run, plus the six scratch runs trained again above (same key: the last line wins)
    // and the second setting's runs.
    assert_eq!(records.len(), s.total + 3 * 2 + sb.ran);
}

#[test]
fn bad_configs_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.json");
    std::fs::write(&p, "{\"tasks_dir\": 3}").unwrap();
    let e = ExperimentConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("c.json"), "{e}");
    let cfg = small_config(dir.path());
    let mut v = serde_json::to_value(&cfg).unwrap();
    v["limited"]["method"] = "prefix".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = ExperimentConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("limited.method"), "{e}");
    v["limited"]["method"] = "lora".into();
    v["limited"]["targets"] = serde_json::json!(["no_such_task"]);
    std::fs::write(&p, v.to_string()).unwrap();
    let e = peftdb::experiment::load_tasks(&ExperimentConfig::load(&p).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no_such_task") && e.contains("limited.targets"),
        "{e}"
    );
    v["limited"]["targets"] = serde_json::json!([]);
    v["pewe"]["tau"] = 0.0.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = ExperimentConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("tau"), "{e}");
}

/// Every record of the committed replication results reads back as its phase's typed data (a missing or
/// mistyped field would be an error naming the record), and writing it again gives the same JSON.
#[test]
fn committed_records_read_back_typed() {
    use peftdb::experiment::records::{IndicatorsData, LimitedData, TextembData, ZooData};
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("results.jsonl");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/replication/results.jsonl"),
        &copy,
    )
    .unwrap();
    let r = ResultsFile::open(&copy).unwrap();
    fn again<T: serde::Serialize + serde::de::DeserializeOwned>(
        rec: &peftdb::experiment::Record,
    ) -> serde_json::Value {
        serde_json::to_value(rec.data_as::<T>().unwrap()).unwrap()
    }
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for rec in r.records() {
        let back = match rec.phase.as_str() {
            "zoo" => again::<ZooData>(rec),
            "textemb" => again::<TextembData>(rec),
            "limited" => again::<LimitedData>(rec),
            "indicators" => again::<IndicatorsData>(rec),
            other => panic!("record {}: unknown phase {other}", rec.key),
        };
        assert_eq!(
            back, rec.data,
            "record {} changes when written again",
            rec.key
        );
        *seen.entry(rec.phase.clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    // A record missing its example count is refused, naming it.
    let mut bad = r
        .records()
        .find(|x| x.phase == "indicators")
        .unwrap()
        .clone();
    bad.data.as_object_mut().unwrap().remove("examples");
    let e = bad.data_as::<IndicatorsData>().unwrap_err().to_string();
    assert!(e.contains(&bad.key) && e.contains("examples"), "{e}");
}
