//! Writes the generated demo zoo: one folder per task of ../shared/tasks (named and grouped like them), with
//! a LoRA, a BitFit and an IA3 adapter each, shaped for all-MiniLM-L6-v2.
//!
//! These adapters are **generated, not trained** (see `peftdb::synth`): tasks of one group are built to be
//! closer to each other, so the demo's nearest-task tables are meaningful as a demonstration of the
//! machinery, not as evidence about the tasks.
//!
//! Usage: cargo run --release --example make_demo_zoo -- OUT_DIR [TASKS_DIR]

use peftdb::object::MethodKind;
use peftdb::synth::{bitfit, ia3, lora, ModelShape, Seeds};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: make_demo_zoo OUT_DIR [TASKS_DIR]")?,
    );
    let tasks_dir = PathBuf::from(args.next().unwrap_or_else(|| "../shared/tasks".into()));
    let mut tasks: Vec<(String, String, u64, String)> = Vec::new();
    for entry in std::fs::read_dir(&tasks_dir)? {
        let p = entry?.path().join("task.json");
        if !p.is_file() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)?;
        tasks.push((
            v["name"]
                .as_str()
                .ok_or("task.json without name")?
                .to_string(),
            v["group"].as_str().unwrap_or("none").to_string(),
            v["counts"]["train"].as_u64().unwrap_or(0),
            v["description"].as_str().unwrap_or("").to_string(),
        ));
    }
    tasks.sort();
    let mut groups: Vec<String> = tasks.iter().map(|t| t.1.clone()).collect();
    groups.sort();
    groups.dedup();
    let shape = ModelShape::minilm();
    for (ti, (name, group, train, desc)) in tasks.iter().enumerate() {
        let gi = groups.iter().position(|g| g == group).unwrap_or(0) as u64;
        for (mi, method) in [MethodKind::Lora, MethodKind::Bitfit, MethodKind::Ia3]
            .iter()
            .enumerate()
        {
            let s = Seeds {
                group: 1000 + gi,
                task: 5000 + ti as u64,
                object: 9000 + (ti * 8 + mi) as u64,
            };
            let obj = match method {
                MethodKind::Lora => lora(&shape, 8, &["query", "value"], s),
                MethodKind::Bitfit => bitfit(&shape, s),
                _ => ia3(&shape, s),
            };
            let dir = out.join(name).join(method.as_str());
            if dir.exists() {
                continue;
            }
            peftdb::object::write_adapter(&obj, &dir)?;
            std::fs::write(
                dir.join("peftdb.json"),
                serde_json::to_vec_pretty(&serde_json::json!({
                    "task": name, "group": group, "train_size": train, "description": desc, "stage": "best"
                }))?,
            )?;
        }
    }
    println!(
        "wrote {} tasks x 3 methods under {}",
        tasks.len(),
        out.display()
    );
    Ok(())
}
