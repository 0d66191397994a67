//! Shared helpers of the engine's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The test model: `$PEFTDB_MODEL_DIR`, else `<repo>/models/all-MiniLM-L6-v2`. Panics (fails the test)
/// with the fix when it is absent: CI runs scripts/fetch-model.sh first, so absence is a setup error.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("PEFTDB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
        });
    assert!(
        dir.join("model.safetensors").is_file(),
        "test model not found at {}: run scripts/fetch-model.sh (or set PEFTDB_MODEL_DIR)",
        dir.display()
    );
    dir
}

/// `../shared` next to the repository (fixtures and tasks), or `$PEFTDB_SHARED_DIR`.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("PEFTDB_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("peft-fixtures").is_dir(),
        "shared test data not found at {} (set PEFTDB_SHARED_DIR)",
        dir.display()
    );
    dir
}
