//! Packs the replication run's trained zoo into the compact demo zoo committed under `examples/demo-zoo`:
//! the best checkpoint of the chosen methods, tensors in f16, one folder per task and method with a
//! `peftdb.json` sidecar (task, group, training-set size, stage, dev/test accuracy from the results file).
//!
//! Usage: cargo run --example pack_demo_zoo -- RUN_DIR OUT_DIR TASKS_DIR LEAVE_OUT METHOD...
//! e.g.   cargo run --example pack_demo_zoo -- examples/replication examples/demo-zoo ../shared/tasks \
//!            movie_sentiment lora bitfit

use half::f16;
use peftdb::object::formats::{read_adapter, write_adapter, ReadOptions};
use peftdb::object::{DType, Tensor};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err("usage: pack_demo_zoo RUN_DIR OUT_DIR TASKS_DIR LEAVE_OUT METHOD...".into());
    }
    let (run, out, tasks_dir, leave_out) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
        args[3].clone(),
    );
    let methods = &args[4..];
    // Accuracies of each zoo adapter, from the results file.
    let mut metrics = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(run.join("results.jsonl"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["phase"] == "zoo" {
            let key = (
                v["task"].as_str().unwrap_or("").to_string(),
                v["init"].as_str().unwrap_or("").to_string(),
            );
            metrics.insert(key, v["data"]["best"].clone());
        }
    }
    let mut tasks: Vec<_> = std::fs::read_dir(run.join("zoo"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|t| *t != leave_out)
        .collect();
    tasks.sort();
    let mut written = 0;
    for task in &tasks {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tasks_dir.join(task).join("task.json"))?)?;
        for m in methods {
            let src = run.join("zoo").join(task).join(m).join("best");
            if !src.is_dir() {
                continue;
            }
            let mut obj = read_adapter(&src, &ReadOptions::default())?;
            for t in obj.tensors.iter_mut() {
                let vals = t.to_f32();
                let mut data = Vec::with_capacity(vals.len() * 2);
                for v in vals {
                    data.extend_from_slice(&f16::from_f32(v).to_le_bytes());
                }
                *t = Tensor {
                    name: t.name.clone(),
                    dtype: DType::F16,
                    shape: t.shape.clone(),
                    data,
                };
            }
            let dst = out.join(task).join(m);
            if dst.exists() {
                std::fs::remove_dir_all(&dst)?;
            }
            std::fs::create_dir_all(dst.parent().ok_or("no parent")?)?;
            write_adapter(&obj, &dst)?;
            let best = metrics
                .get(&(task.clone(), m.clone()))
                .cloned()
                .unwrap_or_default();
            let mut metric = serde_json::Map::new();
            for k in ["dev_accuracy", "test_accuracy"] {
                if let Some(x) = best[k].as_f64() {
                    metric.insert(k.into(), x.into());
                }
            }
            let sidecar = serde_json::json!({
                "task": task,
                "group": info["group"],
                "train_size": info["counts"]["train"],
                "description": info["description"],
                "stage": "best",
                "metrics": metric,
            });
            std::fs::write(
                dst.join("peftdb.json"),
                serde_json::to_string_pretty(&sidecar)? + "\n",
            )?;
            written += 1;
        }
    }
    println!("{written} adapters written under {}", out.display());
    Ok(())
}
