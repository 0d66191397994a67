//! Helpers shared by the integration tests: the test model and the task data (engine, suggest), fixtures and
//! store snapshots (crash, concurrency, hostile input, resources, fault injection).
#![allow(dead_code)]

pub mod peft_configs;

use peftdb::store::Store;
use std::path::{Path, PathBuf};

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

/// The 14 task folders: `$PEFTDB_TASKS_DIR`, else `../shared/tasks` beside the repository when it is
/// there, else `<repo>/data/tasks` (built from the public packages by scripts/fetch-tasks.sh, byte for byte
/// the same). Panics (fails the test) with the fix when none exists: scripts/test.sh fetches them first.
pub fn tasks_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("PEFTDB_TASKS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            [here.join("../shared/tasks"), here.join("data/tasks")]
                .into_iter()
                .find(|d| d.join("social_support/task.json").is_file())
        });
    match dir {
        Some(d) => d,
        None => panic!(
            "task data not found: run scripts/fetch-tasks.sh (writes data/tasks), or set PEFTDB_TASKS_DIR"
        ),
    }
}

/// One task folder of [`tasks_dir`].
pub fn task_dir(name: &str) -> PathBuf {
    tasks_dir().join(name)
}

/// The stdout of a finished `peftdb` command, which must have succeeded (else its stderr is the message).
pub fn stdout_of(out: std::process::Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The adapters written by the real Hugging Face PEFT, with reference outputs (`tests/fixtures/peft`,
/// see its README.md), or `$PEFTDB_FIXTURES`.
pub fn fixtures() -> PathBuf {
    std::env::var_os("PEFTDB_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft"))
}

/// Every adapter folder of the PEFT fixtures (`tests/fixtures/peft/README.md`).
pub const FIXTURES: [&str; 7] = [
    "lora_r8_qv",
    "lora_rank_pattern",
    "lora_bias_all",
    "lora_rslora",
    "ia3",
    "prefix_20",
    "prompt_10",
];

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// Copy a flat folder (the fixtures have no subfolders).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Everything visible in a store, for "nothing changed" and "same final state" comparisons:
/// objects (id, task, hash, tensor count), their embeddings, tasks, spaces.
#[derive(Debug, PartialEq, Clone)]
pub struct Snapshot {
    pub objects: Vec<(u64, String, String, u32)>,
    pub embeddings: Vec<(u64, u64, Vec<u32>)>,
    pub tasks: Vec<String>,
    pub spaces: Vec<(u64, usize, u64)>,
}

pub fn snapshot(store: &Store) -> Snapshot {
    let objects = store
        .objects()
        .unwrap()
        .into_iter()
        .map(|o| (o.id, o.task, o.content_hash, o.tensor_count))
        .collect();
    let spaces = store.spaces().unwrap();
    let mut embeddings = Vec::new();
    for s in &spaces {
        for (id, v) in store.embeddings(s.id).unwrap() {
            embeddings.push((s.id.0, id, v.iter().map(|x| x.to_bits()).collect()));
        }
    }
    Snapshot {
        objects,
        embeddings,
        tasks: store.tasks().unwrap().into_iter().map(|t| t.name).collect(),
        spaces: spaces.iter().map(|s| (s.id.0, s.dim, s.count)).collect(),
    }
}

/// The same as [`snapshot`] but without ids (ids depend on how many objects were allocated, which
/// does not change on re-runs, but comparing by content makes a mismatch easier to read).
pub fn content_view(store: &Store) -> Vec<(String, String, u32)> {
    let mut v: Vec<_> = store
        .objects()
        .unwrap()
        .into_iter()
        .map(|o| (o.task, o.content_hash, o.tensor_count))
        .collect();
    v.sort();
    v
}

/// Full integrity check of an opened store: every listed object loads with all its tensors (the count the
/// record promises, each decodable), every embedding it claims exists with the space's dimension, every
/// embedding belongs to a listed object, and space counts match. Returns the number of objects.
pub fn check_integrity(store: &Store) -> usize {
    let objects = store.objects().expect("objects list");
    let spaces = store.spaces().expect("spaces list");
    let mut per_space = std::collections::BTreeMap::new();
    for o in &objects {
        let (rec, obj) = store
            .get(o.id)
            .unwrap_or_else(|e| panic!("object {} listed but does not load: {e}", o.id));
        assert_eq!(
            obj.tensors.len() as u32,
            rec.tensor_count,
            "object {}",
            o.id
        );
        assert!(!obj.tensors.is_empty(), "object {} has no tensors", o.id);
        let recomputed = peftdb::store::content_hash(&obj);
        let hex: String = recomputed.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex, rec.content_hash,
            "object {} content differs from its hash",
            o.id
        );
        for er in &rec.embeddings {
            let v = store
                .embedding(er.space, o.id)
                .unwrap()
                .unwrap_or_else(|| panic!("object {} has no embedding in {}", o.id, er.space));
            let sp = spaces
                .iter()
                .find(|s| s.id == er.space)
                .unwrap_or_else(|| panic!("space {} of object {} not listed", er.space, o.id));
            assert_eq!(v.len(), sp.dim, "object {} embedding dim", o.id);
            assert!(v.iter().all(|x| x.is_finite()), "object {} embedding", o.id);
            *per_space.entry(er.space.0).or_insert(0u64) += 1;
        }
    }
    for s in &spaces {
        let embs = store.embeddings(s.id).unwrap();
        for (id, _) in &embs {
            assert!(
                objects.iter().any(|o| o.id == *id),
                "embedding of unlisted object {id} in space {}",
                s.id
            );
        }
        assert_eq!(embs.len() as u64, s.count, "space {} count", s.id);
        assert_eq!(per_space.get(&s.id.0).copied().unwrap_or(0), s.count);
    }
    objects.len()
}

/// Seeded xorshift (tests need reproducible randomness without extra dependencies).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Whether the long variants run (`PEFTDB_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var("PEFTDB_LONG_TESTS")
        .map(|v| v == "1")
        .unwrap_or(false)
}
