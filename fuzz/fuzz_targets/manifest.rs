//! The zoo manifest reader: arbitrary bytes as a manifest file; never panics, and every accepted entry
//! that has no problem stays inside the manifest's folder.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peftdb::ingest::{read_manifest, IngestOptions};
use std::path::PathBuf;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("peftdb-fuzz-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    let p = dir.join("zoo.json");
    std::fs::write(&p, data).unwrap();
    if let Ok((cands, _tasks)) = read_manifest(&p, &IngestOptions::default()) {
        for c in cands {
            if c.problem.is_none() {
                assert!(c.path.starts_with(&dir), "{:?} escapes {:?}", c.path, dir);
                assert!(!c
                    .path
                    .components()
                    .any(|x| matches!(x, std::path::Component::ParentDir)));
                peftdb::ingest::validate_task_name(&c.task.name).unwrap();
            }
        }
    }
});
