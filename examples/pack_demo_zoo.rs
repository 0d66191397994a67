//! Packs a zoo trained by `scripts/train-zoo.sh` (`ZOO/<task>/best` + `ZOO/<task>/train_report.json`) into
//! the compact demo zoo committed under `examples/demo-zoo`: the best checkpoint of every task, tensors in
//! f16, one folder `OUT/<task>/lora` per task with a `peftdb.json` sidecar (task, group, training-set
//! size, stage, and the training report's dev/test accuracy, steps and seconds).
//!
//! Usage: cargo run --release --example pack_demo_zoo -- ZOO OUT TASKS_DIR
//! e.g.   cargo run --release --example pack_demo_zoo -- examples/transfer/zoo examples/demo-zoo ../shared/tasks

use half::f16;
use peftdb::object::{read_adapter, write_adapter, ReadOptions};
use peftdb::object::{DType, Tensor};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        return Err("usage: pack_demo_zoo ZOO OUT TASKS_DIR".into());
    }
    let (zoo, out, tasks_dir) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let mut tasks: Vec<String> = std::fs::read_dir(&zoo)?
        .flatten()
        .filter(|e| e.path().join("train_report.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tasks.sort();
    let mut written = 0;
    for task in &tasks {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tasks_dir.join(task).join("task.json"))?)?;
        let rep: serde_json::Value =
            serde_json::from_slice(&std::fs::read(zoo.join(task).join("train_report.json"))?)?;
        let mut obj = read_adapter(&zoo.join(task).join("best"), &ReadOptions::default())?;
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
        let method = obj.method.kind().as_str().to_string();
        let dst = out.join(task).join(&method);
        if dst.exists() {
            std::fs::remove_dir_all(&dst)?;
        }
        std::fs::create_dir_all(dst.parent().ok_or("no parent")?)?;
        write_adapter(&obj, &dst)?;
        let mut metric = serde_json::Map::new();
        for k in ["dev_accuracy", "test_accuracy", "step"] {
            if let Some(x) = rep["best"][k].as_f64() {
                metric.insert(k.into(), x.into());
            }
        }
        for (k, name) in [("steps", "steps_trained"), ("seconds", "train_seconds")] {
            if let Some(x) = rep[k].as_f64() {
                metric.insert(name.into(), x.into());
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
    println!("{written} adapters written under {}", out.display());
    Ok(())
}
