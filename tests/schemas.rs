//! The JSON Schemas in schema/ describe what peftdb actually reads and writes: every schema is valid, and
//! real files and outputs validate against them.

mod common;

use common::peft_configs;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema(name: &str) -> jsonschema::Validator {
    let p = root().join("schema").join(name);
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    // Resolve the one relative $ref we use (the task record) by inlining it.
    inline_refs(&mut v);
    jsonschema::validator_for(&v).unwrap_or_else(|e| panic!("{name} is not a valid schema: {e}"))
}

fn inline_refs(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                if !r.starts_with('#') {
                    let sub: Value = serde_json::from_slice(
                        &std::fs::read(root().join("schema").join(r)).unwrap(),
                    )
                    .unwrap();
                    *v = sub;
                    inline_refs(v);
                    return;
                }
            }
            for x in m.values_mut() {
                inline_refs(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(inline_refs),
        _ => {}
    }
}

fn check(validator: &jsonschema::Validator, doc: &Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{what}: {errors:?}");
}

#[test]
fn every_schema_file_is_a_valid_schema() {
    for e in std::fs::read_dir(root().join("schema"))
        .unwrap()
        .chain(std::fs::read_dir(root().join("schema/store")).unwrap())
    {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let rel = p
                .strip_prefix(root().join("schema"))
                .unwrap()
                .to_string_lossy()
                .into_owned();
            schema(&rel);
        }
    }
}

#[test]
fn shared_tasks_and_peft_configs_validate() {
    let task = schema("task.schema.json");
    let mut n = 0;
    for e in std::fs::read_dir(common::tasks_dir()).unwrap() {
        // Task folders only (data/tasks also holds scripts/fetch-tasks.sh's completion marker).
        let p = e.unwrap().path().join("task.json");
        if !p.is_file() {
            continue;
        }
        n += 1;
        check(
            &task,
            &serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
            &p.display().to_string(),
        );
    }
    assert_eq!(n, 14, "the 14 tasks");
    let peft = schema("peft_adapter_config.schema.json");
    for e in std::fs::read_dir(common::fixtures()).unwrap() {
        let p = e.unwrap().path().join("adapter_config.json");
        if p.is_file() {
            check(
                &peft,
                &serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
                &p.display().to_string(),
            );
        }
    }
}

/// The PEFT config schema states the rules the reader enforces (src/object/peft_config.rs): it refuses the
/// hostile configs of tests/hostile.rs that JSON Schema can express, and accepts the PEFT-loadable variants
/// and the demo zoo's configs, which the reader also accepts.
#[test]
fn peft_config_schema_agrees_with_the_reader() {
    let peft = schema("peft_adapter_config.schema.json");
    let mut seen = 0;
    for c in peft_configs::refused() {
        let doc = peft_configs::edited(
            &common::fixture(c.fixture),
            c.set.into_iter().map(|(k, v)| (k.to_string(), v)),
        );
        if !c.schema_sees {
            continue;
        }
        seen += 1;
        assert!(
            !peft.is_valid(&doc),
            "{}: the schema accepts a config the reader refuses ({:?})",
            c.name,
            c.field
        );
    }
    assert!(seen >= 40, "only {seen} refused cases checked");
    for (fixture, set) in peft_configs::accepted() {
        let doc = peft_configs::edited(&common::fixture(fixture), set.as_object().unwrap().clone());
        check(
            &peft,
            &doc,
            &format!("accepted variant of {fixture}: {set}"),
        );
    }
    let demo = root().join("examples/demo-zoo");
    let mut n = 0;
    // The MiniLM demo zoo, and the SmolLM2 one (CAUSAL_LM adapters; filled as its training lands).
    let smol = std::fs::read_dir(root().join("examples/demo-zoo-smollm2"))
        .into_iter()
        .flatten();
    for e in std::fs::read_dir(&demo).unwrap().chain(smol) {
        let p = e.unwrap().path().join("lora/adapter_config.json");
        if p.is_file() {
            n += 1;
            check(
                &peft,
                &serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap(),
                &p.display().to_string(),
            );
        }
    }
    assert!(n > 0, "no demo-zoo configs under {}", demo.display());
}

fn peftdb(db: &Path, args: &[&str]) -> Value {
    let o = Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(db)
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        o.status.success() || o.status.code() == Some(3),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn written_files_and_records_validate() {
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    let items = peftdb::synth::write_zoo(
        &zoo,
        &peftdb::synth::ModelShape::minilm(),
        2,
        1,
        &[
            peftdb::object::MethodKind::Lora,
            peftdb::object::MethodKind::Bitfit,
        ],
        1,
    )
    .unwrap();
    let sidecar = schema("sidecar.schema.json");
    let bitfit = schema("bitfit_config.schema.json");
    for it in &items {
        check(
            &sidecar,
            &serde_json::from_slice(&std::fs::read(it.path.join("peftdb.json")).unwrap()).unwrap(),
            "sidecar",
        );
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(it.path.join("adapter_config.json")).unwrap())
                .unwrap();
        if cfg["peft_type"] == "BITFIT" {
            check(&bitfit, &cfg, "bitfit config");
        }
    }
    let manifest = serde_json::json!({"version": 1, "tasks": [{"name": "a", "group": "g", "train_size": 3}],
                                       "objects": [{"path": "task-000/lora", "task": "a", "stage": "best", "metrics": {"acc": 0.5}}]});
    check(&schema("zoo_manifest.schema.json"), &manifest, "manifest");
    std::fs::write(
        zoo.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();

    let db = dir.path().join("z.redb");
    peftdb(&db, &["init"]);
    let mut args = vec![
        "ingest".to_string(),
        zoo.display().to_string(),
        "--manifest".into(),
        zoo.join("manifest.json").display().to_string(),
    ];
    args.push(common::fixtures().display().to_string());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let report = peftdb(&db, &a);
    check(
        &schema("ingest_report.schema.json"),
        &report,
        "ingest report",
    );

    // The store's JSON records.
    let store = peftdb::store::Store::open_read_only(&db).unwrap();
    let (obj_s, task_s, space_s) = (
        schema("store/object.schema.json"),
        schema("store/task.schema.json"),
        schema("store/space.schema.json"),
    );
    for o in store.objects().unwrap() {
        check(
            &obj_s,
            &serde_json::to_value(&o).unwrap(),
            &format!("object {}", o.id),
        );
    }
    for t in store.tasks().unwrap() {
        check(&task_s, &serde_json::to_value(&t).unwrap(), &t.name);
    }
    for s in store.spaces().unwrap() {
        check(&space_s, &serde_json::to_value(&s).unwrap(), "space");
    }
}

#[test]
fn experiment_config_and_results_validate() {
    let cfg_schema = schema("experiment_config.schema.json");
    let rec_schema = schema("experiment_results.schema.json");
    let dir = root().join("examples/replication");
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    check(&cfg_schema, &cfg, "examples/replication/config.json");
    // The enlarged setting (every target), and that both parse as the harness's config.
    let large: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config-large.json")).unwrap()).unwrap();
    check(
        &cfg_schema,
        &large,
        "examples/replication/config-large.json",
    );
    for f in ["config.json", "config-large.json"] {
        peftdb::experiment::ExperimentConfig::load(&dir.join(f)).unwrap();
    }
    // The committed results of the replication run: every line is a valid record.
    let text = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        check(&rec_schema, &v, &format!("results.jsonl:{}", i + 1));
        n += 1;
    }
    assert!(n > 0, "the committed results file is empty");
    // And a config the schema must refuse.
    let mut bad = cfg.clone();
    bad["limited"]["checkpoint"] = "latest".into();
    assert!(!cfg_schema.is_valid(&bad));
    let mut bad = large.clone();
    bad["limited"]["targets"] = serde_json::json!([""]);
    assert!(!cfg_schema.is_valid(&bad));
}

#[test]
fn transfer_study_results_validate() {
    let schema = schema("transfer_results.schema.json");
    // The committed transfer study: every line is a valid record of its phase.
    let text = std::fs::read_to_string(root().join("examples/transfer/results.jsonl")).unwrap();
    let mut phases = std::collections::BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        check(
            &schema,
            &v,
            &format!("examples/transfer/results.jsonl:{}", i + 1),
        );
        phases.insert(v["phase"].as_str().unwrap().to_string());
    }
    for p in ["zero", "tune", "scratch", "final"] {
        assert!(phases.contains(p), "no {p} record in the committed study");
    }
    // A record the schema must refuse: a zero-shot evaluation without its per-example correctness.
    let first: Value = serde_json::from_str(
        text.lines()
            .find(|l| l.contains("\"phase\":\"zero\""))
            .unwrap(),
    )
    .unwrap();
    let mut bad = first.clone();
    bad["data"]["test"]
        .as_object_mut()
        .unwrap()
        .remove("correct");
    assert!(!schema.is_valid(&bad));
    // The tune phase holds two kinds of record, each checked against its own shape.
    let held: Value = serde_json::from_str(
        text.lines()
            .find(|l| l.contains("\"init\":\"heldout\""))
            .expect("a heldout record in the committed study"),
    )
    .unwrap();
    assert!(schema.is_valid(&held));
    let mut bad = held.clone();
    bad["data"].as_object_mut().unwrap().remove("answers");
    assert!(!schema.is_valid(&bad));
    let mut bad = held.clone();
    bad["init"] = "grid".into();
    assert!(
        !schema.is_valid(&bad),
        "a heldout record is not a grid record"
    );
    let mut bad = held;
    bad["init"] = "other".into();
    assert!(!schema.is_valid(&bad));
}

#[test]
fn train_reports_validate_and_read_back_typed() {
    let schema = schema("train_report.schema.json");
    // The zoo's reports, written by `peftdb train` (scripts/train-zoo.sh): schema-valid, and read back into
    // the library's type with every field required.
    let mut n = 0;
    let smol = std::fs::read_dir(root().join("examples/transfer-smollm2/zoo"))
        .into_iter()
        .flatten();
    for e in std::fs::read_dir(root().join("examples/transfer/zoo"))
        .unwrap()
        .chain(smol)
    {
        let p = e.unwrap().path().join("train_report.json");
        if !p.exists() {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        check(&schema, &v, &p.display().to_string());
        let r: peftdb::engine::TrainReport =
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut back = serde_json::to_value(&r).unwrap();
        // Reports written before `--matmul` existed have no `matmul`: they read back as f32.
        if v.get("matmul").is_none() {
            assert_eq!(r.matmul, peftdb::engine::MatmulPrecision::F32);
            back.as_object_mut().unwrap().remove("matmul");
        }
        assert_eq!(back, v, "{}", p.display());
        assert!(r.history.iter().any(|h| h.step == r.best.step));
        if p.starts_with(root().join("examples/transfer/zoo")) {
            n += 1;
        }
    }
    assert_eq!(n, 14, "one report per task of the MiniLM zoo");
    // A fresh one from the CLI: the file and the --json output are the same valid report.
    let model = std::env::var_os("PEFTDB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"));
    let task = common::task_dir("intent_recognition");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let train = |out: &Path, matmul: &str| {
        peftdb(
            &dir.path().join("unused.peftdb"),
            &[
                "train",
                "--model",
                model.to_str().unwrap(),
                "--task",
                task.to_str().unwrap(),
                "--method",
                "lora",
                "--k",
                "2",
                "--steps",
                "2",
                "--eval-every",
                "1",
                "--max-len",
                "24",
                "--keep-start",
                "--matmul",
                matmul,
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    let printed = train(&out, "f32");
    let written: Value =
        serde_json::from_slice(&std::fs::read(out.join("train_report.json")).unwrap()).unwrap();
    check(&schema, &written, "peftdb train's train_report.json");
    assert_eq!(printed, written);
    let r: peftdb::engine::TrainReport = serde_json::from_value(written).unwrap();
    // --keep-start: the start is evaluated at step 0, then steps 1 and 2.
    assert_eq!((r.steps, r.history.len(), r.max_len), (2, 3, 24));
    assert_eq!(
        r.history.iter().map(|h| h.step).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(r.best.path.join("adapter_config.json").exists());
    assert_eq!(r.matmul, peftdb::engine::MatmulPrecision::F32);
    // Trained with bf16 products, the report says so.
    let half = dir.path().join("half");
    let printed = train(&half, "bf16");
    check(&schema, &printed, "peftdb train --matmul bf16's report");
    assert_eq!(printed["matmul"], "bf16");
    // What the schema and the type refuse: a report without its history.
    let one = std::fs::read_dir(root().join("examples/transfer/zoo"))
        .unwrap()
        .map(|e| e.unwrap().path().join("train_report.json"))
        .find(|p| p.exists())
        .unwrap();
    let mut bad: Value = serde_json::from_slice(&std::fs::read(one).unwrap()).unwrap();
    bad.as_object_mut().unwrap().remove("history");
    assert!(!schema.is_valid(&bad));
    assert!(serde_json::from_value::<peftdb::engine::TrainReport>(bad).is_err());
}
