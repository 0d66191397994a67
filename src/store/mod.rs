//! The store: one redb file holding tasks, objects, their tensors, embeddings and spaces.
//!
//! Tables, keys and value encodings are specified in `schema/store.md`; [`SCHEMA_VERSION`] is the version
//! this code reads and writes. Concurrency model: **one writer process, many readers**. A process opens the
//! store for writing with [`Store::open`] (redb's `SingleWriter` mode: a second writer is refused with
//! [`OpenError::Locked`], naming the holder's pid), or read-only with [`Store::open_read_only`], which
//! follows the writer's commits. Inside a process, a [`Store`] is `Sync`: many threads may read while one
//! writes; every read sees a consistent snapshot (a redb read transaction).
//!
//! Every ingestion batch is one write transaction: an object, its tensors and its embedding become visible
//! together or not at all.

pub(crate) mod backend;
pub(crate) mod chunked;
pub(crate) mod codec;
pub mod direct;
pub(crate) mod index_meta;
mod migrate;

pub use chunked::MAX_CHUNK_BYTES;
use chunked::{OBJECT_TENSORS, SPACE_EMBEDDINGS};

use crate::embed::{
    delta_sketch, tupate, Embedding, EmbeddingKind, NoEmbedding, SpaceId, SpaceKey,
};
use crate::error::{ExportError, OpenError, StoreError};
use crate::object::layout::{parse_tensor_name, Role};
use crate::object::{AdapterFormat, LightweightObject, Method, MethodKind};
use redb::{
    ConcurrencyMode, Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// redb's page cache per open store. redb's default (1 GiB) let ingestion's resident memory grow with the
/// zoo (every written page stayed cached); the OS page cache still caches the file.
pub const CACHE_BYTES: usize = 64 << 20;
/// The most bytes of values ingestion puts in one transaction (more when one object alone is bigger).
/// redb holds a transaction's pages in its write buffer (half of [`CACHE_BYTES`]) until the commit; pages
/// of a bigger transaction are written out early and read back at the commit for their checksums. Batches
/// of 128 MiniLM LoRAs (40 MB) took 26-35 s to ingest 10,000 of them against 6 s for batches of 64 (20
/// MB), most of it reading back what had just been written.
pub const BATCH_BYTES: usize = CACHE_BYTES * 3 / 8;

/// The schema version this peftdb reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
pub(crate) const OBJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("objects");
pub(crate) const OBJECT_BY_HASH: TableDefinition<&[u8], u64> =
    TableDefinition::new("object_by_hash");
/// Version 1's whole-value tables (read only by the migration to version 2).
pub(crate) const TENSORS_V1: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("tensors");
pub(crate) const EMBEDDINGS_V1: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("embeddings");
pub(crate) const SPACES: TableDefinition<u64, &[u8]> = TableDefinition::new("spaces");
/// object id -> [`ObjectFacts`] (binary, [`codec::encode_facts`]): what queries filter and group by, without
/// decoding whole object records.
pub(crate) const OBJECT_FACTS: TableDefinition<u64, &[u8]> = TableDefinition::new("object_facts");
/// Storage failures with their context (the private extension that keeps redb's error as the source):
/// `table.get(k).during(&self.path, "reading objects")?`.
pub(crate) trait During<T> {
    fn during(self, path: &Path, what: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> During<T> for Result<T, E> {
    fn during(self, path: &Path, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Storage {
            path: path.to_path_buf(),
            during: what,
            source: Box::new(e.into()),
        })
    }
}

/// Catalogs of at least this many objects are read on two threads.
const FACTS_SPLIT: usize = 20_000;
pub(crate) const BASE_MODELS: TableDefinition<&str, &[u8]> = TableDefinition::new("base_models");

/// The object id: allocated in increasing order by the store, never reused.
pub type ObjectId = u64;

/// A task: the unit the zoo is organised by (one task may have several objects: methods, checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskRecord {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl TaskRecord {
    pub fn named(name: impl Into<String>) -> TaskRecord {
        TaskRecord {
            name: name.into(),
            ..Default::default()
        }
    }
    /// Fill fields this record lacks from `other` (later information wins where both have a value).
    fn merge_from(&mut self, other: &TaskRecord) {
        if other.group.is_some() {
            self.group = other.group.clone();
        }
        for t in &other.tags {
            if !self.tags.contains(t) {
                self.tags.push(t.clone());
            }
        }
        if other.train_size.is_some() {
            self.train_size = other.train_size;
        }
        if other.description.is_some() {
            self.description = other.description.clone();
        }
    }
}

/// Which embedding an object has in which space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRef {
    pub kind: EmbeddingKind,
    pub space: SpaceId,
}

/// Why an object has no embedding of a kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissingEmbedding {
    pub kind: EmbeddingKind,
    pub reason: String,
}

/// An object's record (everything but its tensors and embedding vectors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub id: ObjectId,
    pub task: String,
    pub method: Method,
    pub base_model: String,
    pub format: AdapterFormat,
    /// Where it was ingested from (a path or a label), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// BLAKE3 of the object's content (hex), see [`content_hash`].
    pub content_hash: String,
    /// Training stage, e.g. `early` or `best`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    pub dtype: crate::object::DType,
    pub tensor_count: u32,
    pub num_params: u64,
    pub data_bytes: u64,
    #[serde(default)]
    pub embeddings: Vec<EmbeddingRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_embedding: Vec<MissingEmbedding>,
    /// safetensors `__metadata__`, for byte-identical export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safetensors_metadata: Option<BTreeMap<String, String>>,
    /// The verbatim adapter_config.json.
    pub config_json: String,
    /// Seconds since the Unix epoch.
    pub added_at: u64,
}

impl ObjectRecord {
    pub fn method_kind(&self) -> MethodKind {
        self.method.kind()
    }
    /// The modules its config saves whole (`modules_to_save`): stored and exported with the adapter, but
    /// not embedded ([`crate::object::LightweightObject::saved_modules`]).
    pub fn saved_modules(&self) -> Vec<String> {
        crate::object::saved_modules_of(self.config_json.as_bytes())
    }
    /// The TuPaTE space of this object, if it has an embedding there.
    pub fn tupate_space(&self) -> Option<SpaceId> {
        self.embeddings
            .iter()
            .find(|e| e.kind == EmbeddingKind::Tupate)
            .map(|e| e.space)
    }
}

/// The facts about an object that queries filter and group by (table `object_facts`): a few dozen bytes,
/// where the full [`ObjectRecord`] carries the adapter's config and metadata too.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectFacts {
    pub id: ObjectId,
    pub task: String,
    pub method: MethodKind,
    pub base_model: String,
    pub stage: Option<String>,
    pub spaces: Vec<SpaceId>,
}

impl ObjectFacts {
    /// The facts of a record.
    pub fn of(rec: &ObjectRecord) -> ObjectFacts {
        ObjectFacts {
            id: rec.id,
            task: rec.task.clone(),
            method: rec.method_kind(),
            base_model: rec.base_model.clone(),
            stage: rec.stage.clone(),
            spaces: rec.embeddings.iter().map(|e| e.space).collect(),
        }
    }
}

/// A space's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceRecord {
    pub id: SpaceId,
    pub key: SpaceKey,
    pub dim: usize,
    /// Number of embeddings in the space.
    pub count: u64,
    /// The store's change sequence number of the last commit that added or removed one of the space's
    /// embeddings (meta `change_seq`): never the same for two different contents of the space in one
    /// store, so derived files that record it can tell whether they are current.
    #[serde(default)]
    pub generation: u64,
}

/// What the store learned of a base model's shapes from the adapters ingested for it: a dimension per
/// (module, side), e.g. `attention.self.query.in` = 384. A new adapter that contradicts it was trained on
/// another model and is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BaseModelProfile {
    pub name: String,
    pub dims: BTreeMap<String, usize>,
}

/// Per-module dimensions an object implies about its base model (key -> (dim, tensor that shows it)).
pub fn implied_dims(obj: &LightweightObject) -> BTreeMap<String, (usize, String)> {
    let mut m = BTreeMap::new();
    for t in &obj.tensors {
        let loc = parse_tensor_name(&t.name);
        let module = loc.module.clone();
        let (key, dim) = match (&loc.role, t.shape.as_slice()) {
            (Role::LoraA, [_, i]) => (format!("{module}.in"), *i),
            (Role::LoraB, [o, _]) => (format!("{module}.out"), *o),
            (Role::Bias, [o]) => (format!("{module}.out"), *o),
            (Role::Ia3, [o, 1]) => (format!("{module}.ia3"), *o),
            (Role::Ia3, [1, i]) => (format!("{module}.ia3"), *i),
            (Role::AdapterDownWeight, [_, h]) => ("hidden".to_string(), *h),
            (Role::PromptEmbeddings, [_, w]) => match &obj.method {
                Method::Prefix(c) => {
                    m.insert("hidden".to_string(), (c.token_dim, t.name.clone()));
                    ("layers".to_string(), w / (2 * c.token_dim.max(1)))
                }
                _ => ("hidden".to_string(), *w),
            },
            _ => continue,
        };
        m.entry(key).or_insert((dim, t.name.clone()));
    }
    m
}

/// Content hash of an object: BLAKE3 over a domain tag, the config bytes, then each tensor's name, dtype,
/// shape and data (lengths prefixed). Two ingestions of the same adapter bytes hash equal.
///
/// The bytes are laid out in one buffer (reused per thread) and hashed at once: fed piece by piece, BLAKE3
/// could not hash a tensor's chunks side by side (a small prefix before each tensor leaves its chunks
/// unaligned to the tree), and ran at 2 GB/s instead of the 5-6 GB/s its SIMD path reaches.
pub fn content_hash(obj: &LightweightObject) -> [u8; 32] {
    thread_local! {
        static INPUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Kept for the next object of a zoo, not the largest object ever hashed.
    crate::memory::with_reused_buffer(&INPUT, 64 << 20, |b| {
        content_hash_input(obj, b);
        *blake3::hash(b).as_bytes()
    })
}

/// The bytes [`content_hash`] hashes (the store's format: see schema/store.md).
fn content_hash_input(obj: &LightweightObject, b: &mut Vec<u8>) {
    let data: usize = obj
        .tensors
        .iter()
        .map(|t| t.data.len() + t.name.len() + 64)
        .sum();
    b.reserve(64 + obj.config_json.len() + data);
    b.extend_from_slice(b"peftdb-object-v1\0");
    b.extend_from_slice(&(obj.config_json.len() as u64).to_le_bytes());
    b.extend_from_slice(&obj.config_json);
    if let Some(m) = &obj.metadata {
        for (k, v) in m {
            b.extend_from_slice(&(k.len() as u64).to_le_bytes());
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            b.extend_from_slice(v.as_bytes());
        }
    }
    for t in &obj.tensors {
        b.extend_from_slice(&(t.name.len() as u64).to_le_bytes());
        b.extend_from_slice(t.name.as_bytes());
        b.extend_from_slice(&[t.dtype.code(), t.shape.len() as u8]);
        for d in &t.shape {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        b.extend_from_slice(&(t.data.len() as u64).to_le_bytes());
        b.extend_from_slice(&t.data);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An object to ingest, with the task it belongs to and its provenance.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub object: LightweightObject,
    pub task: TaskRecord,
    pub source: Option<String>,
    pub stage: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

/// An object with its hash and embeddings computed, and its stored values encoded (the parallel part of
/// ingestion, so the single writer only inserts bytes). Build it with [`PreparedObject::prepare`]; the
/// fields are for reading: the encoded values are made from them once, there.
#[derive(Debug, Clone)]
pub struct PreparedObject {
    pub new: NewObject,
    pub hash: [u8; 32],
    pub tupate: Result<Embedding, NoEmbedding>,
    /// LoRA only: the delta-W sketch ([`delta_sketch`]).
    pub sketch: Option<Result<Embedding, NoEmbedding>>,
    /// The tensor stream ([`chunked::tensor_stream`]).
    stream: Vec<u8>,
    /// Each embedding of [`Self::embeddings`] encoded ([`codec::encode_embedding`]), `None` where absent.
    encoded: Vec<Option<Vec<u8>>>,
}

impl PreparedObject {
    pub fn prepare(new: NewObject) -> PreparedObject {
        let hash = content_hash(&new.object);
        let tupate = tupate(&new.object);
        let sketch = delta_sketch(&new.object);
        let stream = chunked::tensor_stream(&new.object.tensors);
        let mut p = PreparedObject {
            new,
            hash,
            tupate,
            sketch,
            stream,
            encoded: Vec::new(),
        };
        p.encoded = p
            .embeddings()
            .into_iter()
            .map(|(_, e)| e.as_ref().ok().map(|e| codec::encode_embedding(&e.vector)))
            .collect();
        p
    }

    /// Bytes of the values this object adds to the store (its tensor stream and encoded embeddings).
    pub(crate) fn stored_bytes(&self) -> usize {
        self.stream.len() + self.encoded.iter().flatten().map(Vec::len).sum::<usize>()
    }

    /// Every embedding of the object by kind (TuPaTE first), or why it has none of that kind.
    fn embeddings(&self) -> Vec<(EmbeddingKind, &Result<Embedding, NoEmbedding>)> {
        let mut v = vec![(EmbeddingKind::Tupate, &self.tupate)];
        if let Some(s) = &self.sketch {
            v.push((EmbeddingKind::DeltaSketch, s));
        }
        v
    }
}

/// What happened to one object of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Added(ObjectId),
    /// The same content is already stored under this id.
    AlreadyPresent(ObjectId),
    /// Refused (e.g. it does not fit its base model); nothing of it was stored.
    Rejected(String),
}

enum Db {
    Rw(Database),
    Ro(ReadOnlyDatabase),
}

/// An open store.
pub struct Store {
    db: Db,
    path: PathBuf,
    owner_file: Option<PathBuf>,
    /// Direct page writes, where the store was opened over [`direct::DirectFileBackend`].
    direct: Option<direct::DirectWrites>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The sidecar naming the process that holds the store for writing (removed on close).
fn owner_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".owner");
    PathBuf::from(s)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Statistics of a store.
#[derive(Debug, Clone, Serialize)]
pub struct StoreStats {
    pub path: PathBuf,
    pub schema_version: u32,
    pub file_bytes: u64,
    pub tasks: u64,
    pub objects: u64,
    pub tensor_bytes: u64,
    pub objects_by_method: BTreeMap<String, u64>,
    pub objects_without_embedding: u64,
    pub spaces: Vec<SpaceRecord>,
}

impl Store {
    fn map_open_err(path: &Path, e: redb::DatabaseError) -> OpenError {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen
            | redb::DatabaseError::LockProtocolMismatch => {
                let holder = std::fs::read_to_string(owner_path(path))
                    .ok()
                    .map(|s| s.trim().to_string());
                OpenError::Locked {
                    path: path.to_path_buf(),
                    holder,
                }
            }
            redb::DatabaseError::RepairAborted => OpenError::NeedsRecovery {
                path: path.to_path_buf(),
            },
            redb::DatabaseError::UpgradeRequired(v) => OpenError::NotAStore {
                path: path.to_path_buf(),
                reason: format!("redb file format {v} needs an upgrade"),
            },
            // redb reports a file that is not one of its databases as invalid data: not a disk failure.
            redb::DatabaseError::Storage(redb::StorageError::Io(io))
                if io.kind() == std::io::ErrorKind::InvalidData =>
            {
                OpenError::NotAStore {
                    path: path.to_path_buf(),
                    reason: io.to_string(),
                }
            }
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
                OpenError::Store(StoreError::Storage {
                    path: path.to_path_buf(),
                    during: "opening",
                    source: Box::new(io.into()),
                })
            }
            other => OpenError::NotAStore {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        }
    }

    /// Create a new, empty store. Fails if the file exists.
    pub fn create(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        let path = path.as_ref();
        if path.exists() {
            return Err(OpenError::Exists {
                path: path.to_path_buf(),
            });
        }
        // Atomic creation: build the file (redb header + schema commit) under a temporary name, then link
        // it into place, so a crash never leaves a half-created store at `path`.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".creating-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let (db, direct) = Store::open_file(&tmp, true).map_err(|e| Self::map_open_err(path, e))?;
        let store = Store {
            db: Db::Rw(db),
            path: path.to_path_buf(),
            owner_file: None,
            direct,
        };
        let linked = store.init_schema().map_err(OpenError::from).and_then(|()| {
            std::fs::hard_link(&tmp, path)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Err(e)
                    } else {
                        std::fs::rename(&tmp, path)
                    }
                })
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        OpenError::Exists {
                            path: path.to_path_buf(),
                        }
                    } else {
                        OpenError::Store(StoreError::Storage {
                            path: path.to_path_buf(),
                            during: "creating",
                            source: Box::new(e.into()),
                        })
                    }
                })
        });
        let _ = std::fs::remove_file(&tmp);
        linked?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(store.with_owner_file())
    }

    /// Open an existing store for writing (and reading).
    pub fn open(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(OpenError::Missing {
                path: path.to_path_buf(),
            });
        }
        let (db, direct) =
            Store::open_file(path, false).map_err(|e| Self::map_open_err(path, e))?;
        let mut store = Store::from_writable(db, path)?;
        store.direct = direct;
        Ok(store.with_owner_file())
    }

    /// Open (or, with `create`, create) the redb file for writing over [`direct::DirectFileBackend`].
    /// An existing empty file is not a store: it goes through redb's own open, which refuses it.
    fn open_file(
        path: &Path,
        create: bool,
    ) -> Result<(Database, Option<direct::DirectWrites>), redb::DatabaseError> {
        let io = |e: std::io::Error| redb::DatabaseError::Storage(redb::StorageError::Io(e));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        if !create && file.metadata().map_err(io)?.len() == 0 {
            drop(file);
            return Ok((Store::builder().open(path)?, None));
        }
        let backend = direct::DirectFileBackend::new(file, path)?;
        let switch = backend.switch();
        Ok((Store::builder().create_with_backend(backend)?, Some(switch)))
    }

    fn has_no_tables(&self) -> Result<bool, StoreError> {
        let r = self.read()?;
        let mut tables = r.list_tables().during(&self.path, "opening")?;
        let mut multimap = r.list_multimap_tables().during(&self.path, "opening")?;
        Ok(tables.next().is_none() && multimap.next().is_none())
    }

    /// Open the store, creating it if it does not exist.
    pub fn open_or_create(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        if path.as_ref().exists() {
            Store::open(path)
        } else {
            Store::create(path)
        }
    }

    /// Open read-only. Works while another process has the store open for writing, and sees its commits.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(OpenError::Missing {
                path: path.to_path_buf(),
            });
        }
        let db = Store::builder()
            .open_read_only(path)
            .map_err(|e| Self::map_open_err(path, e))?;
        let store = Store {
            db: Db::Ro(db),
            path: path.to_path_buf(),
            owner_file: None,
            direct: None,
        };
        store.check_schema()?;
        Ok(store)
    }

    /// The redb builder every handle uses: one writer, many readers; a bounded page cache.
    fn builder() -> redb::Builder {
        let mut b = redb::Builder::new();
        b.set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_cache_size(CACHE_BYTES);
        b
    }

    /// Wrap a writable database, checking its schema. A crash between redb creating the file and the
    /// schema commit (the first one) leaves a redb file with no tables at all: finish the creation instead
    /// of refusing the path forever.
    pub(crate) fn from_writable(db: Database, path: &Path) -> Result<Store, OpenError> {
        let store = Store {
            db: Db::Rw(db),
            path: path.to_path_buf(),
            owner_file: None,
            direct: None,
        };
        if store.check_schema().is_err() && store.has_no_tables()? {
            store.init_schema()?;
        }
        store.check_schema()?;
        Ok(store)
    }

    /// Open for reading, recovering first when needed: a store whose last writer did not close cleanly
    /// (a crash, a full disk) can only be repaired by a writable open, so when the read-only open reports
    /// [`OpenError::NeedsRecovery`] and no other process holds the store, it is opened for writing once
    /// (redb repairs it, keeping every committed transaction), closed, and reopened read-only.
    pub fn open_for_reading(path: impl AsRef<Path>) -> Result<Store, OpenError> {
        let path = path.as_ref();
        match Store::open_read_only(path) {
            Err(OpenError::NeedsRecovery { .. }) => {
                drop(Store::open(path)?);
                Store::open_read_only(path)
            }
            other => other,
        }
    }

    fn with_owner_file(mut self) -> Store {
        let p = owner_path(&self.path);
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let text = format!("pid {} on {host}", std::process::id());
        if std::fs::write(&p, text).is_ok() {
            self.owner_file = Some(p);
        }
        self
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this handle can write.
    pub fn is_writable(&self) -> bool {
        matches!(self.db, Db::Rw(_))
    }

    fn read(&self) -> Result<ReadTransaction, StoreError> {
        let r = match &self.db {
            Db::Rw(d) => d.begin_read(),
            Db::Ro(d) => d.begin_read(),
        };
        r.during(&self.path, "starting a read")
    }

    fn write(&self) -> Result<WriteTransaction, StoreError> {
        match &self.db {
            Db::Rw(d) => d.begin_write().during(&self.path, "starting a write"),
            Db::Ro(_) => Err(StoreError::ReadOnly),
        }
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let w = self.write()?;
        {
            let mut meta = w.open_table(META).during(&self.path, "creating tables")?;
            meta.insert("format", b"peftdb".as_slice())
                .during(&self.path, "creating tables")?;
            meta.insert("schema_version", SCHEMA_VERSION.to_le_bytes().as_slice())
                .during(&self.path, "creating tables")?;
            meta.insert("next_object_id", 1u64.to_le_bytes().as_slice())
                .during(&self.path, "creating tables")?;
            meta.insert("change_seq", 0u64.to_le_bytes().as_slice())
                .during(&self.path, "creating tables")?;
            meta.insert(
                "store_uuid",
                rand::random::<u128>().to_le_bytes().as_slice(),
            )
            .during(&self.path, "creating tables")?;
            for t in [TASKS, BASE_MODELS] {
                w.open_table(t).during(&self.path, "creating tables")?;
            }
            for t in [OBJECTS, SPACES, OBJECT_FACTS] {
                w.open_table(t).during(&self.path, "creating tables")?;
            }
            w.open_table(OBJECT_BY_HASH)
                .during(&self.path, "creating tables")?;
            w.open_table(OBJECT_TENSORS)
                .during(&self.path, "creating tables")?;
            w.open_table(SPACE_EMBEDDINGS)
                .during(&self.path, "creating tables")?;
        }
        w.commit().during(&self.path, "creating tables")
    }

    fn check_schema(&self) -> Result<(), OpenError> {
        let r = self.read()?;
        let not_store = |reason: &str| OpenError::NotAStore {
            path: self.path.clone(),
            reason: reason.to_string(),
        };
        let meta = r
            .open_table(META)
            .map_err(|_| not_store("a redb file without peftdb's meta table"))?;
        let fmt = meta
            .get("format")
            .during(&self.path, "reading meta")?
            .ok_or_else(|| not_store("no format marker"))?;
        if fmt.value() != b"peftdb" {
            return Err(not_store("wrong format marker"));
        }
        let v = meta
            .get("schema_version")
            .during(&self.path, "reading meta")?
            .ok_or_else(|| not_store("no schema version"))?;
        let v = v.value();
        if v.len() != 4 {
            return Err(not_store("malformed schema version"));
        }
        let found = u32::from_le_bytes(v.try_into().expect("4 bytes"));
        if found > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < SCHEMA_VERSION {
            if found == 1 && self.is_writable() {
                drop(meta);
                drop(r);
                return Ok(self.migrate_v1_to_v2()?);
            }
            return Err(OpenError::OlderSchema {
                path: self.path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    /// The schema version recorded in the file.
    pub fn schema_version(&self) -> Result<u32, OpenError> {
        self.check_schema()?;
        Ok(SCHEMA_VERSION)
    }

    /// A u64 LE value of the meta table (0 when absent).
    fn meta_u64(
        &self,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &'static str,
    ) -> Result<u64, StoreError> {
        match meta.get(key).during(&self.path, "reading meta")? {
            Some(v) => {
                let b: [u8; 8] = v
                    .value()
                    .try_into()
                    .map_err(|_| self.corrupt("meta", key, "not 8 bytes"))?;
                Ok(u64::from_le_bytes(b))
            }
            None => Ok(0),
        }
    }

    /// The store's identity (random, drawn at creation or migration): derived files beside the store
    /// record it, so files left by another store at the same path are never taken for this one's.
    pub fn uuid(&self) -> Result<u128, StoreError> {
        let r = self.read()?;
        let meta = r.open_table(META).during(&self.path, "reading meta")?;
        let v = meta
            .get("store_uuid")
            .during(&self.path, "reading meta")?
            .ok_or_else(|| self.corrupt("meta", "store_uuid", "missing"))?;
        let b: [u8; 16] = v
            .value()
            .try_into()
            .map_err(|_| self.corrupt("meta", "store_uuid", "not 16 bytes"))?;
        Ok(u128::from_le_bytes(b))
    }

    /// Give the file's free pages back to the file system (after `rm`, or after a large ingestion that
    /// replaced pages): redb moves live pages down and truncates the file. Needs a writable handle and no
    /// other open transaction in this process. Returns the file's bytes before and after.
    pub fn compact(&mut self) -> Result<(u64, u64), StoreError> {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let before = size(&self.path);
        let path = self.path.clone();
        match &mut self.db {
            Db::Rw(d) => {
                // Each call moves what it can; repeat until nothing moves (bounded, in case).
                for _ in 0..16 {
                    match d.compact() {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            return Err(StoreError::Storage {
                                path,
                                during: "compacting",
                                source: Box::new(e.into()),
                            })
                        }
                    }
                }
            }
            Db::Ro(_) => return Err(StoreError::ReadOnly),
        }
        Ok((before, size(&self.path)))
    }

    fn corrupt(
        &self,
        table: &'static str,
        key: impl ToString,
        detail: impl ToString,
    ) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            table,
            key: key.to_string(),
            detail: detail.to_string(),
        }
    }

    fn decode_object(&self, id: u64, bytes: &[u8]) -> Result<ObjectRecord, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| self.corrupt("objects", id, e))
    }

    /// Commit a batch of prepared objects in one transaction. Per-object refusals come back as
    /// [`Outcome::Rejected`]; a storage failure aborts the whole batch (nothing of it is stored, every
    /// earlier batch stays).
    pub fn commit_batch(&self, batch: Vec<PreparedObject>) -> Result<Vec<Outcome>, StoreError> {
        let outcomes = self.commit_prepared(&batch, false)?;
        self.wait_all_written()?;
        Ok(outcomes)
    }

    /// [`Store::commit_batch`] (or, with `stop_at_rejection`, [`Store::commit_batch_until_rejected`])
    /// leaving the batch to the caller, so ingestion frees it on another thread than the writer's.
    /// Returns once the transaction is committed, maybe before it is durable: the caller waits for
    /// [`Store::write_ticket`] with [`Store::wait_durable`] before it reports the objects stored.
    pub(crate) fn commit_prepared(
        &self,
        batch: &[PreparedObject],
        stop_at_rejection: bool,
    ) -> Result<Vec<Outcome>, StoreError> {
        // A batch is new pages, read back rarely: write them around the page cache, behind the commit.
        let _direct = self.direct.as_ref().map(|d| d.on());
        let w = self.write()?;
        let outcomes = self.apply_batch(&w, batch, stop_at_rejection)?;
        w.commit().during(&self.path, "committing a batch")?;
        Ok(outcomes)
    }

    /// Every commit so far ([`direct::DirectWrites`]): [`Store::wait_durable`] on it returns once they
    /// are all on the disk.
    pub(crate) fn write_ticket(&self) -> direct::Ticket {
        self.direct
            .as_ref()
            .map_or_else(direct::Ticket::default, |d| d.ticket())
    }

    /// Wait until every write queued behind the commits is done (the commits are durable, and so is
    /// redb's header write after the last one); fails like [`Store::wait_durable`].
    pub(crate) fn wait_all_written(&self) -> Result<(), StoreError> {
        match &self.direct {
            Some(d) => d
                .settle()
                .map_err(redb::StorageError::from)
                .during(&self.path, "writing committed batches to the disk"),
            None => Ok(()),
        }
    }

    /// Wait until the commits up to `t` are on the disk; fails when a write behind them failed (the
    /// store must then be reopened; what was durable before stays).
    pub(crate) fn wait_durable(&self, t: direct::Ticket) -> Result<(), StoreError> {
        match &self.direct {
            Some(d) => d
                .wait(t)
                .map_err(redb::StorageError::from)
                .during(&self.path, "writing committed batches to the disk"),
            None => Ok(()),
        }
    }

    /// Like [`Store::commit_batch`], but stops at the first rejected object: only the objects before it
    /// are committed, and the last outcome is the rejection (`ingest --strict`).
    pub fn commit_batch_until_rejected(
        &self,
        batch: Vec<PreparedObject>,
    ) -> Result<Vec<Outcome>, StoreError> {
        let outcomes = self.commit_prepared(&batch, true)?;
        self.wait_all_written()?;
        Ok(outcomes)
    }

    fn apply_batch(
        &self,
        w: &WriteTransaction,
        batch: &[PreparedObject],
        stop_at_rejection: bool,
    ) -> Result<Vec<Outcome>, StoreError> {
        let mut meta = w.open_table(META).during(&self.path, "ingesting")?;
        let mut tasks = w.open_table(TASKS).during(&self.path, "ingesting")?;
        let mut objects = w.open_table(OBJECTS).during(&self.path, "ingesting")?;
        let mut by_hash = w
            .open_table(OBJECT_BY_HASH)
            .during(&self.path, "ingesting")?;
        let mut tensors = w
            .open_table(OBJECT_TENSORS)
            .during(&self.path, "ingesting")?;
        let mut embeddings = w
            .open_table(SPACE_EMBEDDINGS)
            .during(&self.path, "ingesting")?;
        let mut spaces = w.open_table(SPACES).during(&self.path, "ingesting")?;
        let mut facts = w.open_table(OBJECT_FACTS).during(&self.path, "ingesting")?;
        let mut base_models = w.open_table(BASE_MODELS).during(&self.path, "ingesting")?;

        let mut next_id = {
            let v = meta
                .get("next_object_id")
                .during(&self.path, "ingesting")?
                .ok_or_else(|| self.corrupt("meta", "next_object_id", "missing"))?;
            let b: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| self.corrupt("meta", "next_object_id", "not 8 bytes"))?;
            u64::from_le_bytes(b)
        };
        let seq = self.meta_u64(&meta, "change_seq")? + 1;
        let mut outcomes = Vec::with_capacity(batch.len());
        for p in batch {
            if let Some(id) = by_hash
                .get(p.hash.as_slice())
                .during(&self.path, "ingesting")?
            {
                outcomes.push(Outcome::AlreadyPresent(id.value()));
                continue;
            }
            let obj = &p.new.object;
            // Base-model fit: the adapter's implied dimensions must agree with what is known of the model.
            let mut profile: BaseModelProfile = match base_models
                .get(obj.base_model.as_str())
                .during(&self.path, "ingesting")?
            {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|e| self.corrupt("base_models", &obj.base_model, e))?,
                None => BaseModelProfile {
                    name: obj.base_model.clone(),
                    dims: BTreeMap::new(),
                },
            };
            let mut conflict = None;
            for (k, (d, tname)) in implied_dims(obj) {
                match profile.dims.get(&k) {
                    Some(known) if *known != d => {
                        conflict = Some(format!(
                            "tensor {tname:?} implies {k} = {d}, but adapters already stored for this model have {k} = {known}; is it for another base model?"
                        ));
                        break;
                    }
                    Some(_) => {}
                    None => {
                        profile.dims.insert(k, d);
                    }
                }
            }
            if let Some(c) = conflict {
                outcomes.push(Outcome::Rejected(
                    StoreError::BaseModelMismatch {
                        base_model: obj.base_model.clone(),
                        detail: c,
                    }
                    .to_string(),
                ));
                if stop_at_rejection {
                    break;
                }
                continue;
            }
            base_models
                .insert(
                    obj.base_model.as_str(),
                    serde_json::to_vec(&profile).expect("serializes").as_slice(),
                )
                .during(&self.path, "ingesting")?;

            // Task: create, or merge new metadata in.
            let mut task = match tasks
                .get(p.new.task.name.as_str())
                .during(&self.path, "ingesting")?
            {
                Some(v) => serde_json::from_slice::<TaskRecord>(v.value())
                    .map_err(|e| self.corrupt("tasks", &p.new.task.name, e))?,
                None => TaskRecord::named(p.new.task.name.clone()),
            };
            task.merge_from(&p.new.task);
            tasks
                .insert(
                    task.name.as_str(),
                    serde_json::to_vec(&task).expect("serializes").as_slice(),
                )
                .during(&self.path, "ingesting")?;

            let id = next_id;
            next_id += 1;
            chunked::put_tensor_stream(&mut tensors, id, &p.stream)
                .during(&self.path, "writing tensors")?;
            let mut emb_refs = Vec::new();
            let mut missing = Vec::new();
            for ((kind, emb), enc) in p.embeddings().into_iter().zip(&p.encoded) {
                match emb {
                    Ok(e) => {
                        let sid = e.space.id();
                        let mut rec = match spaces.get(sid.0).during(&self.path, "ingesting")? {
                            Some(v) => serde_json::from_slice::<SpaceRecord>(v.value())
                                .map_err(|e| self.corrupt("spaces", sid, e))?,
                            None => SpaceRecord {
                                id: sid,
                                key: e.space.clone(),
                                dim: e.vector.len(),
                                count: 0,
                                generation: 0,
                            },
                        };
                        rec.count += 1;
                        rec.generation = seq;
                        spaces
                            .insert(
                                sid.0,
                                serde_json::to_vec(&rec).expect("serializes").as_slice(),
                            )
                            .during(&self.path, "ingesting")?;
                        let written = match enc {
                            Some(enc) => {
                                chunked::put_encoded_embedding(&mut embeddings, sid.0, id, enc)
                            }
                            None => chunked::put_embedding(&mut embeddings, sid.0, id, &e.vector),
                        };
                        written.during(&self.path, "writing embeddings")?;
                        emb_refs.push(EmbeddingRef { kind, space: sid });
                    }
                    Err(n) => missing.push(MissingEmbedding {
                        kind,
                        reason: n.reason.clone(),
                    }),
                }
            }
            let rec = ObjectRecord {
                id,
                task: task.name.clone(),
                method: obj.method.clone(),
                base_model: obj.base_model.clone(),
                format: obj.format,
                source: p.new.source.clone(),
                content_hash: hex(&p.hash),
                stage: p.new.stage.clone(),
                metrics: p.new.metrics.clone(),
                dtype: obj
                    .tensors
                    .first()
                    .map(|t| t.dtype)
                    .unwrap_or(crate::object::DType::F32),
                tensor_count: obj.tensors.len() as u32,
                num_params: obj.num_params() as u64,
                data_bytes: obj.data_bytes() as u64,
                embeddings: emb_refs,
                no_embedding: missing,
                safetensors_metadata: obj.metadata.clone(),
                config_json: String::from_utf8_lossy(&obj.config_json).into_owned(),
                added_at: now_secs(),
            };
            objects
                .insert(id, serde_json::to_vec(&rec).expect("serializes").as_slice())
                .during(&self.path, "ingesting")?;
            facts
                .insert(id, codec::encode_facts(&ObjectFacts::of(&rec)).as_slice())
                .during(&self.path, "ingesting")?;
            by_hash
                .insert(p.hash.as_slice(), id)
                .during(&self.path, "ingesting")?;
            outcomes.push(Outcome::Added(id));
        }
        meta.insert("next_object_id", next_id.to_le_bytes().as_slice())
            .during(&self.path, "ingesting")?;
        meta.insert("change_seq", seq.to_le_bytes().as_slice())
            .during(&self.path, "ingesting")?;
        Ok(outcomes)
    }

    /// Ingest one object (hash, embed, commit). Returns what happened.
    pub fn ingest(&self, new: NewObject) -> Result<Outcome, StoreError> {
        let p = PreparedObject::prepare(new);
        Ok(self.commit_batch(vec![p])?.pop().expect("one outcome"))
    }

    /// Insert or update a task's metadata.
    pub fn put_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        let w = self.write()?;
        {
            let mut tasks = w.open_table(TASKS).during(&self.path, "writing a task")?;
            let mut cur = match tasks
                .get(task.name.as_str())
                .during(&self.path, "writing a task")?
            {
                Some(v) => serde_json::from_slice::<TaskRecord>(v.value())
                    .map_err(|e| self.corrupt("tasks", &task.name, e))?,
                None => TaskRecord::named(task.name.clone()),
            };
            cur.merge_from(task);
            tasks
                .insert(
                    task.name.as_str(),
                    serde_json::to_vec(&cur).expect("serializes").as_slice(),
                )
                .during(&self.path, "writing a task")?;
        }
        w.commit().during(&self.path, "writing a task")
    }

    /// A [`Snapshot`]: one read transaction, a consistent view of the store that a whole query or
    /// `suggest` works in. Writers that commit meanwhile are not seen (and their freed pages are not reused
    /// until the snapshot is dropped).
    pub fn snapshot(&self) -> Result<Snapshot<'_>, StoreError> {
        Ok(Snapshot {
            store: self,
            r: self.read()?,
        })
    }

    /// All tasks, by name.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.snapshot()?.tasks()
    }

    /// One task.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn task(&self, name: &str) -> Result<TaskRecord, StoreError> {
        self.snapshot()?.task(name)
    }

    /// All object records, by id.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn objects(&self) -> Result<Vec<ObjectRecord>, StoreError> {
        self.snapshot()?.objects()
    }

    /// One object's record.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn object(&self, id: ObjectId) -> Result<ObjectRecord, StoreError> {
        self.snapshot()?.object(id)
    }

    /// Find an object by its content hash (full hex, or a unique prefix of at least 8 hex digits).
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn find_by_hash(&self, hex_prefix: &str) -> Result<Option<ObjectId>, StoreError> {
        self.snapshot()?.find_by_hash(hex_prefix)
    }

    /// Load an object with its tensors.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn get(&self, id: ObjectId) -> Result<(ObjectRecord, LightweightObject), StoreError> {
        self.snapshot()?.get(id)
    }

    /// The facts of every object, in id order (what an index manager's catalog holds).
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn object_facts(&self) -> Result<Vec<ObjectFacts>, StoreError> {
        self.snapshot()?.object_facts()
    }

    /// Every space.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn spaces(&self) -> Result<Vec<SpaceRecord>, StoreError> {
        self.snapshot()?.spaces()
    }

    /// One space.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn space(&self, id: SpaceId) -> Result<SpaceRecord, StoreError> {
        self.snapshot()?.space(id)
    }

    /// All embeddings of a space, by object id.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn embeddings(&self, space: SpaceId) -> Result<Vec<(ObjectId, Vec<f32>)>, StoreError> {
        self.snapshot()?.embeddings(space)
    }

    /// An object's embedding in a space.
    ///
    /// In a read transaction of its own; see [`Store::snapshot`] for several reads that must agree.
    pub fn embedding(&self, space: SpaceId, id: ObjectId) -> Result<Option<Vec<f32>>, StoreError> {
        self.snapshot()?.embedding(space, id)
    }

    /// Export an object as a folder in its format (byte-identical to what was ingested).
    pub fn export(&self, id: ObjectId, dir: &Path) -> Result<(), ExportError> {
        let (_, obj) = self.get(id)?;
        crate::object::write_adapter(&obj, dir)?;
        Ok(())
    }

    /// Remove objects (with their tensors and embeddings) in one transaction. Unknown ids are an error and
    /// nothing is removed.
    pub fn remove(&self, ids: &[ObjectId]) -> Result<Vec<ObjectRecord>, StoreError> {
        let w = self.write()?;
        let removed = self.remove_in(&w, ids)?;
        w.commit().during(&self.path, "removing")?;
        Ok(removed)
    }

    /// Remove objects inside the write transaction `w` (committed by the caller).
    fn remove_in(
        &self,
        w: &WriteTransaction,
        ids: &[ObjectId],
    ) -> Result<Vec<ObjectRecord>, StoreError> {
        let mut removed = Vec::new();
        {
            const DURING: &str = "removing";
            let mut objects = w.open_table(OBJECTS).during(&self.path, DURING)?;
            let mut by_hash = w.open_table(OBJECT_BY_HASH).during(&self.path, DURING)?;
            let mut tensors = w.open_table(OBJECT_TENSORS).during(&self.path, DURING)?;
            let mut embeddings = w.open_table(SPACE_EMBEDDINGS).during(&self.path, DURING)?;
            let mut spaces = w.open_table(SPACES).during(&self.path, DURING)?;
            let mut facts = w.open_table(OBJECT_FACTS).during(&self.path, DURING)?;
            let mut meta = w.open_table(META).during(&self.path, DURING)?;
            let seq = self.meta_u64(&meta, "change_seq")? + 1;
            meta.insert("change_seq", seq.to_le_bytes().as_slice())
                .during(&self.path, DURING)?;
            for &id in ids {
                let rec = match objects.remove(id).during(&self.path, DURING)? {
                    Some(v) => self.decode_object(id, v.value())?,
                    None => {
                        return Err(StoreError::NotFound {
                            what: "object",
                            key: id.to_string(),
                        })
                    }
                };
                let hash: Vec<u8> = (0..rec.content_hash.len() / 2)
                    .filter_map(|i| {
                        u8::from_str_radix(&rec.content_hash[2 * i..2 * i + 2], 16).ok()
                    })
                    .collect();
                by_hash.remove(hash.as_slice()).during(&self.path, DURING)?;
                chunked::delete_tensors(&mut tensors, id).during(&self.path, DURING)?;
                facts.remove(id).during(&self.path, DURING)?;
                for er in &rec.embeddings {
                    chunked::delete_embedding(&mut embeddings, er.space.0, id)
                        .during(&self.path, DURING)?;
                    let cur = spaces
                        .get(er.space.0)
                        .during(&self.path, DURING)?
                        .map(|v| serde_json::from_slice::<SpaceRecord>(v.value()));
                    if let Some(cur) = cur {
                        let mut s = cur.map_err(|e| self.corrupt("spaces", er.space, e))?;
                        s.count = s.count.saturating_sub(1);
                        s.generation = seq;
                        if s.count == 0 {
                            spaces.remove(er.space.0).during(&self.path, DURING)?;
                        } else {
                            spaces
                                .insert(
                                    er.space.0,
                                    serde_json::to_vec(&s).expect("serializes").as_slice(),
                                )
                                .during(&self.path, DURING)?;
                        }
                    }
                }
                removed.push(rec);
            }
        }
        Ok(removed)
    }

    /// Remove a task and all its objects, in one transaction: a failure (or a killed process) leaves the
    /// task whole or gone, never a task row without its objects.
    pub fn remove_task(&self, name: &str) -> Result<Vec<ObjectRecord>, StoreError> {
        self.task(name)?;
        let w = self.write()?;
        // The task's objects as this transaction sees them.
        let ids = {
            const DURING: &str = "removing";
            let t = w.open_table(OBJECTS).during(&self.path, DURING)?;
            let mut ids = Vec::new();
            for item in t.iter().during(&self.path, DURING)? {
                let (k, v) = item.during(&self.path, DURING)?;
                if self.decode_object(k.value(), v.value())?.task == name {
                    ids.push(k.value());
                }
            }
            ids
        };
        let removed = self.remove_in(&w, &ids)?;
        {
            let mut tasks = w.open_table(TASKS).during(&self.path, "removing")?;
            tasks.remove(name).during(&self.path, "removing")?;
        }
        w.commit().during(&self.path, "removing")?;
        Ok(removed)
    }

    /// Counts and sizes.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let objects = self.objects()?;
        let r = self.read()?;
        let tasks = r
            .open_table(TASKS)
            .and_then(|t| t.len().map_err(Into::into))
            .during(&self.path, "counting")?;
        let mut by_method: BTreeMap<String, u64> = BTreeMap::new();
        for o in &objects {
            *by_method.entry(o.method_kind().to_string()).or_default() += 1;
        }
        Ok(StoreStats {
            path: self.path.clone(),
            schema_version: SCHEMA_VERSION,
            file_bytes: std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0),
            tasks,
            objects: objects.len() as u64,
            tensor_bytes: objects.iter().map(|o| o.data_bytes).sum(),
            objects_by_method: by_method,
            objects_without_embedding: objects.iter().filter(|o| o.embeddings.is_empty()).count()
                as u64,
            spaces: self.spaces()?,
        })
    }

    /// Object counts per task (for listings).
    pub fn objects_per_task(&self) -> Result<HashMap<String, usize>, StoreError> {
        let mut m = HashMap::new();
        for o in self.objects()? {
            *m.entry(o.task).or_default() += 1;
        }
        Ok(m)
    }
}

/// One read transaction over a [`Store`] ([`Store::snapshot`]): every read through it sees the store as it
/// was when the snapshot was taken, so a query or `suggest` that reads records, embeddings and tensors
/// in several steps never mixes two states of the store. The read methods are those of [`Store`] (which
/// open a transaction per call).
pub struct Snapshot<'s> {
    store: &'s Store,
    r: ReadTransaction,
}

impl std::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("path", &self.store.path)
            .finish()
    }
}

impl<'s> Snapshot<'s> {
    /// The store this is a snapshot of.
    pub fn store(&self) -> &'s Store {
        self.store
    }

    /// All tasks, by name.
    pub fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(TASKS)
            .during(&self.store.path, "listing tasks")?;
        let mut out = Vec::new();
        for item in t.iter().during(&self.store.path, "listing tasks")? {
            let (k, v) = item.during(&self.store.path, "listing tasks")?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| self.store.corrupt("tasks", k.value(), e))?,
            );
        }
        Ok(out)
    }

    /// One task.
    pub fn task(&self, name: &str) -> Result<TaskRecord, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(TASKS)
            .during(&self.store.path, "reading a task")?;
        let v = t
            .get(name)
            .during(&self.store.path, "reading a task")?
            .ok_or_else(|| StoreError::NotFound {
                what: "task",
                key: name.to_string(),
            })?;
        serde_json::from_slice(v.value()).map_err(|e| self.store.corrupt("tasks", name, e))
    }

    /// All object records, by id.
    pub fn objects(&self) -> Result<Vec<ObjectRecord>, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(OBJECTS)
            .during(&self.store.path, "listing objects")?;
        let mut out = Vec::new();
        for item in t.iter().during(&self.store.path, "listing objects")? {
            let (k, v) = item.during(&self.store.path, "listing objects")?;
            out.push(self.store.decode_object(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Whether the object is in this snapshot (one key lookup, nothing decoded).
    pub fn contains(&self, id: ObjectId) -> Result<bool, StoreError> {
        let t = self
            .r
            .open_table(OBJECTS)
            .during(&self.store.path, "reading an object")?;
        Ok(t.get(id)
            .during(&self.store.path, "reading an object")?
            .is_some())
    }

    /// One object's record.
    pub fn object(&self, id: ObjectId) -> Result<ObjectRecord, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(OBJECTS)
            .during(&self.store.path, "reading an object")?;
        let v = t
            .get(id)
            .during(&self.store.path, "reading an object")?
            .ok_or_else(|| StoreError::NotFound {
                what: "object",
                key: id.to_string(),
            })?;
        self.store.decode_object(id, v.value())
    }

    /// Find an object by its content hash (full hex, or a unique prefix of at least 8 hex digits).
    pub fn find_by_hash(&self, hex_prefix: &str) -> Result<Option<ObjectId>, StoreError> {
        // At least 8 hex digits (32 bits), at most the whole BLAKE3 hash.
        let hex = hex_prefix.to_ascii_lowercase();
        if hex.len() < 8 || hex.len() > 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Ok(None);
        }
        // The range of 32-byte hashes that start with the prefix: a lookup in the hash table, not a
        // scan of every record (an odd last digit fixes the high nibble of its byte only).
        let nib = |c: u8| (c as char).to_digit(16).expect("checked hex") as u8;
        let digits = hex.as_bytes();
        let (mut lo, mut hi) = (vec![0u8; 32], vec![0xffu8; 32]);
        for (i, pair) in digits.chunks(2).enumerate() {
            if pair.len() == 2 {
                lo[i] = nib(pair[0]) << 4 | nib(pair[1]);
                hi[i] = lo[i];
            } else {
                lo[i] = nib(pair[0]) << 4;
                hi[i] = lo[i] | 0x0f;
            }
        }
        let r = &self.r;
        let t = r
            .open_table(OBJECT_BY_HASH)
            .during(&self.store.path, "looking up a hash")?;
        let mut hits = Vec::new();
        for item in t
            .range(lo.as_slice()..=hi.as_slice())
            .during(&self.store.path, "looking up a hash")?
            .take(2)
        {
            let (_, v) = item.during(&self.store.path, "looking up a hash")?;
            hits.push(v.value());
        }
        Ok((hits.len() == 1).then(|| hits[0]))
    }

    /// Load an object with its tensors.
    pub fn get(&self, id: ObjectId) -> Result<(ObjectRecord, LightweightObject), StoreError> {
        let r = &self.r;
        let rec = self.object(id)?;
        let t = r
            .open_table(OBJECT_TENSORS)
            .during(&self.store.path, "reading tensors")?;
        let tensors = chunked::get_tensors(&t, id)
            .during(&self.store.path, "reading tensors")?
            .map_err(|e| self.store.corrupt("object_tensors", id, e))?;
        if tensors.len() != rec.tensor_count as usize {
            return Err(self.store.corrupt(
                "object_tensors",
                id,
                format!(
                    "{} tensors stored, record says {}",
                    tensors.len(),
                    rec.tensor_count
                ),
            ));
        }
        let obj = LightweightObject {
            method: rec.method.clone(),
            base_model: rec.base_model.clone(),
            format: rec.format,
            tensors,
            metadata: rec.safetensors_metadata.clone(),
            config_json: rec.config_json.clone().into_bytes(),
        };
        Ok((rec, obj))
    }

    /// The facts of every object, in id order (what an index manager's catalog holds).
    pub fn object_facts(&self) -> Result<Vec<ObjectFacts>, StoreError> {
        let r = &self.r;
        let t = match r.open_table(OBJECT_FACTS) {
            Ok(t) => t,
            // A store written before the table existed: derive the facts from the records.
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok(self.objects()?.iter().map(ObjectFacts::of).collect());
            }
            Err(e) => return Err(e).during(&self.store.path, "listing objects"),
        };
        let se = |e: redb::StorageError| StoreError::Storage {
            path: self.store.path.clone(),
            during: "listing objects",
            source: Box::new(e.into()),
        };
        let n = usize::try_from(t.len().map_err(se)?).unwrap_or(0);
        // Facts of the ids in `range`, in id order.
        let read = |range: (std::ops::Bound<u64>, std::ops::Bound<u64>),
                    cap: usize|
         -> Result<Vec<ObjectFacts>, StoreError> {
            let mut out = Vec::with_capacity(cap);
            for item in t.range(range).map_err(se)? {
                let (k, v) = item.map_err(se)?;
                out.push(
                    codec::decode_facts(k.value(), v.value())
                        .map_err(|e| self.store.corrupt("object_facts", k.value(), e))?,
                );
            }
            Ok(out)
        };
        use std::ops::Bound::{Excluded, Included, Unbounded};
        // A large catalog is read in two halves of the key range on two threads (one snapshot).
        let bounds = (t.first().map_err(se)?, t.last().map_err(se)?);
        match bounds {
            (Some((lo, _)), Some((hi, _))) if n >= FACTS_SPLIT => {
                let (lo, hi) = (lo.value(), hi.value());
                let mid = lo + (hi - lo) / 2;
                let (a, b) = rayon::join(
                    || read((Unbounded, Included(mid)), n / 2 + 1),
                    || read((Excluded(mid), Unbounded), n / 2 + 1),
                );
                let mut a = a?;
                a.extend(b?);
                Ok(a)
            }
            _ => read((Unbounded, Unbounded), n),
        }
    }

    /// Every space.
    pub fn spaces(&self) -> Result<Vec<SpaceRecord>, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(SPACES)
            .during(&self.store.path, "listing spaces")?;
        let mut out = Vec::new();
        for item in t.iter().during(&self.store.path, "listing spaces")? {
            let (k, v) = item.during(&self.store.path, "listing spaces")?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| self.store.corrupt("spaces", SpaceId(k.value()), e))?,
            );
        }
        Ok(out)
    }

    /// One space.
    pub fn space(&self, id: SpaceId) -> Result<SpaceRecord, StoreError> {
        // One lookup by key (not a decode of every space).
        let r = &self.r;
        let t = r
            .open_table(SPACES)
            .during(&self.store.path, "reading a space")?;
        let v = t
            .get(id.0)
            .during(&self.store.path, "reading a space")?
            .ok_or_else(|| StoreError::NotFound {
                what: "space",
                key: id.to_string(),
            })?;
        serde_json::from_slice(v.value()).map_err(|e| self.store.corrupt("spaces", id, e))
    }

    /// All embeddings of a space, by object id.
    pub fn embeddings(&self, space: SpaceId) -> Result<Vec<(ObjectId, Vec<f32>)>, StoreError> {
        let mut out = Vec::new();
        self.for_each_embedding(space, |id, v| out.push((id, v)))?;
        Ok(out)
    }

    /// An object's embedding in a space.
    pub fn embedding(&self, space: SpaceId, id: ObjectId) -> Result<Option<Vec<f32>>, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(SPACE_EMBEDDINGS)
            .during(&self.store.path, "reading embeddings")?;
        match chunked::get_embedding(&t, space.0, id)
            .during(&self.store.path, "reading embeddings")?
        {
            Some(v) => Ok(Some(v.map_err(|e| {
                self.store
                    .corrupt("space_embeddings", format!("({space}, {id})"), e)
            })?)),
            None => Ok(None),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(p) = &self.owner_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// [`content_hash`] as first written: the same bytes fed to the hasher piece by piece.
    fn piecewise(obj: &LightweightObject) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        h.update(b"peftdb-object-v1\0");
        h.update(&(obj.config_json.len() as u64).to_le_bytes());
        h.update(&obj.config_json);
        for (k, v) in obj.metadata.iter().flatten() {
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
        for t in &obj.tensors {
            h.update(&(t.name.len() as u64).to_le_bytes());
            h.update(t.name.as_bytes());
            h.update(&[t.dtype.code(), t.shape.len() as u8]);
            for d in &t.shape {
                h.update(&(*d as u64).to_le_bytes());
            }
            h.update(&(t.data.len() as u64).to_le_bytes());
            h.update(&t.data);
        }
        *h.finalize().as_bytes()
    }

    /// A real PEFT adapter, with and without a metadata map, hashes as the piecewise definition does.
    #[test]
    fn content_hash_of_a_peft_adapter_is_the_piecewise_hash() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peft-fixtures/lora_r8_qv");
        let mut obj = crate::object::read_adapter(&dir, &Default::default()).unwrap();
        assert_eq!(content_hash(&obj), piecewise(&obj));
        obj.metadata = Some(BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("note".to_string(), "x".repeat(3000)),
        ]));
        assert_eq!(content_hash(&obj), piecewise(&obj));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Objects of random tensor sizes (chunk-aligned or not) and metadata hash as the piecewise
        /// definition does, one after another on the same thread (the reused buffer).
        #[test]
        fn content_hash_is_the_piecewise_hash(
            sizes in proptest::collection::vec(0usize..5000, 0..6),
            meta in proptest::option::of(proptest::collection::btree_map("[a-z]{0,8}", "[ -~]{0,40}", 0..4)),
            config in proptest::collection::vec(any::<u8>(), 0..300),
            seed in any::<u8>(),
        ) {
            let tensors = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| crate::object::Tensor {
                    name: format!("t{i}.weight"),
                    dtype: crate::dtype::DType::F32,
                    shape: vec![n],
                    data: (0..4 * n).map(|j| (j as u8).wrapping_mul(seed)).collect(),
                })
                .collect();
            let obj = LightweightObject {
                method: crate::object::Method::Bitfit(Default::default()),
                base_model: "m".into(),
                format: crate::object::AdapterFormat::Bitfit,
                tensors,
                metadata: meta,
                config_json: config,
            };
            prop_assert_eq!(content_hash(&obj), piecewise(&obj));
        }
    }
}
