//! Embedding peftdb in a Rust program: create a store, ingest adapters (one, then a whole zoo), list, get,
//! read embeddings, export byte-identical, remove.
//!
//! Run: cargo run --example library (reads the PEFT fixtures in tests/fixtures/peft).

use peftdb::embed::cosine;
use peftdb::ingest::{ingest_zoo, IngestOptions};
use peftdb::object::{read_adapter, ReadOptions};
use peftdb::store::{NewObject, Outcome, Store, TaskRecord};
use std::path::Path;

fn main() -> Result<(), peftdb::Error> {
    let dir = std::env::temp_dir().join(format!("peftdb-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let store = Store::create(dir.join("zoo.redb"))?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");

    // One adapter, with its task's metadata.
    let object = read_adapter(&fixtures.join("lora_r8_qv"), &ReadOptions::default())?;
    let outcome = store.ingest(NewObject {
        object,
        task: TaskRecord {
            name: "qv-demo".into(),
            group: Some("demo".into()),
            ..Default::default()
        },
        source: Some("lora_r8_qv".into()),
        stage: Some("best".into()),
        metrics: [("dev_acc".to_string(), 0.87)].into(),
    })?;
    let Outcome::Added(id) = outcome else {
        unreachable!("a new store has nothing yet")
    };

    // A whole zoo folder (every adapter folder under it; bad ones are reported, not fatal).
    let report = ingest_zoo(
        &store,
        std::slice::from_ref(&fixtures),
        None,
        &IngestOptions::default(),
        &|_| {},
    )?;
    println!(
        "zoo: {} ingested, {} already present, {} rejected",
        report.ingested(),
        report.already_present(),
        report.rejected()
    );

    // List and look up.
    for o in store.objects()? {
        println!(
            "{:>3} {:<18} {:<7} space {:?}",
            o.id,
            o.task,
            o.method_kind(),
            o.tupate_space().map(|s| s.to_string())
        );
    }
    let (record, object) = store.get(id)?;
    println!(
        "object {id}: {} tensors, {} parameters, hash {}",
        object.tensors.len(),
        object.num_params(),
        &record.content_hash[..12]
    );

    // Embeddings of one space are comparable.
    let space = record
        .tupate_space()
        .expect("LoRA r=8 has a TuPaTE embedding");
    let embs = store.embeddings(space)?;
    let mine = store.embedding(space, id)?.expect("stored");
    for (other, v) in &embs {
        println!(
            "cosine(object {id}, object {other}) = {:.4}",
            cosine(&mine, v)
        );
    }

    // Export (byte-identical), then remove.
    store.export(id, &dir.join("export"))?;
    store.remove(&[id])?;
    println!(
        "exported to {} and removed object {id}; {} objects left",
        dir.join("export").display(),
        store.objects()?.len()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
