//! Batch ingestion of adapter zoos.
//!
//! 1. **Discover**: walk the given folders (following symlinks, refusing loops and links that leave the
//!    zoo folder) and collect every adapter folder (one holding `adapter_config.json`), or take the entries
//!    of a zoo manifest (schema/zoo_manifest.schema.json).
//! 2. **Prepare** in parallel (rayon): read and validate the files, hash the content, compute the TuPaTE
//!    embedding.
//! 3. **Commit** through the single writer in batches of [`IngestOptions::batch_size`], one redb transaction
//!    each, while the next batch is being prepared. Memory is bounded by two batches, whatever the zoo's size.
//!
//! A bad adapter is reported in the [`IngestReport`] and skipped ([`IngestOptions::strict`] stops at the
//! first one instead). Objects are processed in a deterministic order (sorted paths, or manifest order), so
//! ids are reproducible; ingesting the same bytes again is a no-op ("already present"), which also makes an
//! interrupted ingestion safe to re-run.
//!
//! How an adapter folder gets its task (first match wins):
//! - the manifest entry's `task`;
//! - `IngestOptions::task`;
//! - a `peftdb.json` sidecar in the adapter folder (`{"task": ..., "group": ..., "tags": [...],
//!   "train_size": ..., "description": ..., "stage": ..., "metrics": {...}}`, schema/sidecar.schema.json);
//! - the first folder below the walked root (`zoo/<task>/lora/...`), or the adapter folder's own name when
//!   it sits directly in the root.
//!
//! The stage is the sidecar's or manifest's `stage`, else the folder name when it is `early`, `best`,
//! `final` or `last`.

use crate::error::{IngestError, StoreError};
use crate::object::formats::{is_adapter_dir, ReadOptions};
use crate::object::read_adapter;
use crate::store::direct::Ticket;
use crate::store::{NewObject, ObjectId, Outcome, PreparedObject, Store, TaskRecord};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Options of an ingestion.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Stop at the first rejected adapter: the adapters before it are committed, none after it.
    pub strict: bool,
    /// Store adapters with NaN/Inf values instead of rejecting them.
    pub allow_non_finite: bool,
    /// Objects per transaction, at most: a transaction also holds no more than
    /// [`crate::store::BATCH_BYTES`] of stored values (or one object, if that alone is more).
    pub batch_size: usize,
    /// Task name for every adapter found (overrides sidecars and folder names, not manifest entries).
    pub task: Option<String>,
    /// Base model to record when an adapter's config does not name one.
    pub base_model: Option<String>,
    /// Set it (from a signal handler, a progress callback or another thread) to stop after the batch being
    /// committed: every batch committed so far stays, and the ingestion ends with
    /// [`IngestError::Interrupted`]. Re-running the same ingestion skips what is stored.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            strict: false,
            allow_non_finite: false,
            batch_size: 64,
            task: None,
            base_model: None,
            cancel: None,
        }
    }
}

/// Progress events (the library never prints; a CLI turns these into a progress bar).
#[derive(Debug, Clone)]
pub enum IngestEvent {
    /// Discovery finished: this many adapter folders will be processed.
    Discovered { total: usize },
    /// One adapter was processed: when it was stored, its batch is on the disk (reports of a batch come
    /// after the next batch has committed, which the store writes behind).
    Processed { path: PathBuf, outcome: ItemOutcome },
}

/// What happened to one adapter folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ItemOutcome {
    Ingested { id: ObjectId },
    AlreadyPresent { id: ObjectId },
    Rejected { reason: String },
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ItemReport {
    pub path: PathBuf,
    #[serde(flatten)]
    pub outcome: ItemOutcome,
}

/// The summary of an ingestion.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub items: Vec<ItemReport>,
}

impl IngestReport {
    pub fn ingested(&self) -> usize {
        self.count(|o| matches!(o, ItemOutcome::Ingested { .. }))
    }
    pub fn already_present(&self) -> usize {
        self.count(|o| matches!(o, ItemOutcome::AlreadyPresent { .. }))
    }
    pub fn rejected(&self) -> usize {
        self.count(|o| matches!(o, ItemOutcome::Rejected { .. }))
    }
    fn count(&self, f: impl Fn(&ItemOutcome) -> bool) -> usize {
        self.items.iter().filter(|i| f(&i.outcome)).count()
    }
}

/// Task metadata and provenance attached to an adapter folder before it is read. Every field is
/// optional: an absent one is empty.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Sidecar {
    pub task: Option<String>,
    pub group: Option<String>,
    pub tags: Vec<String>,
    pub train_size: Option<u64>,
    pub description: Option<String>,
    pub stage: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    pub base_model: Option<String>,
}

/// A zoo manifest (schema/zoo_manifest.schema.json).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZooManifest {
    /// Always 1 for this format version.
    pub version: u32,
    #[serde(default)]
    pub tasks: Vec<TaskRecord>,
    pub objects: Vec<ManifestEntry>,
}

/// One adapter of a manifest.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Adapter folder, relative to the manifest's folder (no `..`, not absolute).
    pub path: String,
    pub task: String,
    #[serde(default)]
    pub stage: Option<String>,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default)]
    pub base_model: Option<String>,
}

/// An adapter folder to ingest, with what is known of it before reading.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub path: PathBuf,
    pub task: TaskRecord,
    pub stage: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    pub base_model: Option<String>,
    /// A problem found during discovery (the candidate is reported as rejected).
    pub problem: Option<String>,
}

impl Candidate {
    /// A path that discovery found unusable (reported as rejected, never read).
    fn problem(path: PathBuf, reason: String) -> Candidate {
        Candidate {
            path,
            task: TaskRecord::named("?"),
            stage: None,
            metrics: BTreeMap::new(),
            base_model: None,
            problem: Some(reason),
        }
    }
}

/// The largest manifest read.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// Check a task name: non-empty, at most 200 bytes, no path separators, no `..`, no control characters
/// (names become folder names on export).
pub fn validate_task_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("task name is empty".into());
    }
    if name.len() > 200 {
        return Err(format!("task name is {} bytes (at most 200)", name.len()));
    }
    if name.contains(['/', '\\'])
        || name == "."
        || name == ".."
        || name.chars().any(|c| c.is_control())
    {
        return Err(format!(
            "task name {name:?} contains a path separator, a control character or is a relative folder name"
        ));
    }
    Ok(())
}

fn read_sidecar(dir: &Path) -> Result<Option<Sidecar>, String> {
    let p = dir.join("peftdb.json");
    if !p.is_file() {
        return Ok(None);
    }
    let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    if len > 1024 * 1024 {
        return Err(format!("{}: sidecar larger than 1 MiB", p.display()));
    }
    let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("{}: invalid peftdb.json: {e}", p.display()))
}

const STAGE_NAMES: &[&str] = &["early", "best", "final", "last"];

fn candidate_for(dir: &Path, root: &Path, opts: &IngestOptions) -> Candidate {
    let mut c = Candidate {
        path: dir.to_path_buf(),
        task: TaskRecord::default(),
        stage: None,
        metrics: BTreeMap::new(),
        base_model: opts.base_model.clone(),
        problem: None,
    };
    let sidecar = match read_sidecar(dir) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            c.problem = Some(e);
            Sidecar::default()
        }
    };
    let folder_task = dir
        .strip_prefix(root)
        .ok()
        .and_then(|rel| rel.components().next())
        .and_then(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .or_else(|| dir.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "default".into());
    let name = opts
        .task
        .clone()
        .or(sidecar.task.clone())
        .unwrap_or(folder_task);
    c.task = TaskRecord {
        name,
        group: sidecar.group,
        tags: sidecar.tags,
        train_size: sidecar.train_size,
        description: sidecar.description,
    };
    c.stage = sidecar.stage.or_else(|| {
        dir.file_name()
            .and_then(|s| s.to_str())
            .filter(|s| STAGE_NAMES.contains(s))
            .map(str::to_string)
    });
    c.metrics = sidecar.metrics;
    if sidecar.base_model.is_some() {
        c.base_model = sidecar.base_model;
    }
    if let Err(e) = validate_task_name(&c.task.name) {
        c.problem.get_or_insert(e);
    }
    c
}

/// Walk folders and return the adapter folders in them, sorted by path. Problems met on the way
/// (symlink loops, links out of the zoo, unreadable folders) come back as candidates with a `problem`.
pub fn discover(roots: &[PathBuf], opts: &IngestOptions) -> Result<Vec<Candidate>, IngestError> {
    let mut out = Vec::new();
    for root in roots {
        if !root.exists() {
            return Err(IngestError::Walk {
                path: root.clone(),
                reason: "no such file or folder".into(),
            });
        }
        if root.is_file() {
            // A lone file: let the reader explain (pickle, or not an adapter folder).
            out.push(candidate_for(root, root.parent().unwrap_or(root), opts));
            continue;
        }
        if is_adapter_dir(root) {
            let parent = root.parent().unwrap_or(root).to_path_buf();
            out.push(candidate_for(root, &parent, opts));
            continue;
        }
        let canon_root = root.canonicalize().map_err(|e| IngestError::Walk {
            path: root.clone(),
            reason: e.to_string(),
        })?;
        let mut it = walkdir::WalkDir::new(root)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = it.next() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e
                        .path()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| root.clone());
                    let reason = if e.loop_ancestor().is_some() {
                        format!(
                            "symlink loop: {} points back to {}",
                            path.display(),
                            e.loop_ancestor()
                                .map(|p| p.display().to_string())
                                .unwrap_or_default()
                        )
                    } else {
                        format!("cannot walk: {e}")
                    };
                    out.push(Candidate::problem(path, reason));
                    continue;
                }
            };
            if !entry.file_type().is_dir() {
                continue;
            }
            if entry.path_is_symlink() {
                match entry.path().canonicalize() {
                    Ok(target) if target.starts_with(&canon_root) => {}
                    Ok(target) => {
                        out.push(Candidate::problem(
                            entry.path().to_path_buf(),
                            format!(
                                "symlink leads outside the zoo folder (to {}); copy the adapter into the zoo or ingest that folder directly",
                                target.display()
                            ),
                        ));
                        it.skip_current_dir();
                        continue;
                    }
                    Err(e) => {
                        out.push(Candidate::problem(
                            entry.path().to_path_buf(),
                            format!("broken symlink: {e}"),
                        ));
                        it.skip_current_dir();
                        continue;
                    }
                }
            }
            if is_adapter_dir(entry.path()) {
                out.push(candidate_for(entry.path(), root, opts));
                it.skip_current_dir();
            }
        }
    }
    Ok(out)
}

/// Read a zoo manifest and return its candidates (in manifest order) and task records.
pub fn read_manifest(
    path: &Path,
    opts: &IngestOptions,
) -> Result<(Vec<Candidate>, Vec<TaskRecord>), IngestError> {
    let merr = |reason: String| IngestError::Manifest {
        path: path.to_path_buf(),
        reason,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| merr(e.to_string()))?
        .len();
    if len > MAX_MANIFEST_BYTES {
        return Err(merr(format!(
            "{len} bytes, over the {MAX_MANIFEST_BYTES}-byte limit"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| merr(e.to_string()))?;
    let m: ZooManifest = serde_json::from_slice(&bytes).map_err(|e| merr(e.to_string()))?;
    if m.version != 1 {
        return Err(merr(format!(
            "version {} is not supported (this peftdb reads version 1)",
            m.version
        )));
    }
    for t in &m.tasks {
        validate_task_name(&t.name).map_err(|e| merr(format!("tasks: {e}")))?;
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let canon_base = base.canonicalize().map_err(|e| merr(e.to_string()))?;
    let tasks: BTreeMap<&str, &TaskRecord> = m.tasks.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for e in &m.objects {
        let rel = Path::new(&e.path);
        let mut problem = None;
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            problem = Some(format!(
                "manifest path {:?} must be relative to the manifest's folder and must not contain `..`",
                e.path
            ));
        }
        let full = base.join(rel);
        if problem.is_none() {
            if let Ok(c) = full.canonicalize() {
                if !c.starts_with(&canon_base) {
                    problem = Some(format!(
                        "manifest path {:?} leads outside the manifest's folder (symlink)",
                        e.path
                    ));
                }
            }
        }
        if let Err(err) = validate_task_name(&e.task) {
            problem.get_or_insert(err);
        }
        let task = tasks
            .get(e.task.as_str())
            .map(|t| (*t).clone())
            .unwrap_or_else(|| TaskRecord::named(e.task.clone()));
        out.push(Candidate {
            path: full,
            task,
            stage: e.stage.clone(),
            metrics: e.metrics.clone(),
            base_model: e.base_model.clone().or_else(|| opts.base_model.clone()),
            problem,
        });
    }
    Ok((out, m.tasks))
}

fn prepare(c: &Candidate, opts: &IngestOptions) -> Result<PreparedObject, String> {
    if let Some(p) = &c.problem {
        return Err(p.clone());
    }
    let ro = ReadOptions {
        allow_non_finite: opts.allow_non_finite,
        base_model: c.base_model.clone(),
    };
    let object = read_adapter(&c.path, &ro).map_err(|e| e.to_string())?;
    Ok(PreparedObject::prepare(NewObject {
        object,
        task: c.task.clone(),
        source: Some(c.path.display().to_string()),
        stage: c.stage.clone(),
        metrics: c.metrics.clone(),
    }))
}

/// Ingest candidates: prepare in parallel, commit in batches, report every item through `progress`.
pub fn ingest_candidates(
    store: &Store,
    candidates: &[Candidate],
    opts: &IngestOptions,
    progress: &(dyn Fn(IngestEvent) + Sync),
) -> Result<IngestReport, IngestError> {
    let result = ingest_in_chunks(store, candidates, opts, progress);
    // Every write queued behind the commits (redb's last header write too) is done before the caller
    // goes on: a process that ends without closing the store leaves the same file as one that closes it.
    let written = store.wait_all_written();
    match (result, written) {
        (Ok(report), Ok(())) => Ok(report),
        (Ok(_), Err(e)) => Err(e.into()),
        (Err(e), _) => Err(e),
    }
}

/// [`ingest_candidates`] up to the last commit.
fn ingest_in_chunks(
    store: &Store,
    candidates: &[Candidate],
    opts: &IngestOptions,
    progress: &(dyn Fn(IngestEvent) + Sync),
) -> Result<IngestReport, IngestError> {
    progress(IngestEvent::Discovered {
        total: candidates.len(),
    });
    // Every adapter file and encoded value is a large buffer: keep freed ones in the heap.
    crate::memory::keep_freed_memory();
    let mut report = IngestReport::default();
    let batch = opts.batch_size.max(1);
    let chunks: Vec<&[Candidate]> = candidates.chunks(batch).collect();
    let prep = |chunk: &[Candidate]| -> Vec<Result<PreparedObject, String>> {
        chunk.par_iter().map(|c| prepare(c, opts)).collect()
    };
    let mut pending: Option<(usize, Vec<Result<PreparedObject, String>>)> =
        chunks.first().map(|c| (0, prep(c)));
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    };
    let mut spent: Vec<PreparedObject> = Vec::new();
    // A chunk's adapters are reported once its commits are on the disk: the store writes them behind
    // the next chunk's commits, so the reports trail by one chunk.
    let mut held: Option<(Ticket, Vec<ItemReport>)> = None;
    let release = |held: Option<(Ticket, Vec<ItemReport>)>,
                   report: &mut IngestReport|
     -> Result<(), IngestError> {
        let Some((ticket, items)) = held else {
            return Ok(());
        };
        store.wait_durable(ticket)?;
        for it in items {
            progress(IngestEvent::Processed {
                path: it.path.clone(),
                outcome: it.outcome.clone(),
            });
            report.items.push(it);
        }
        Ok(())
    };
    while let Some((ci, prepared)) = pending.take() {
        let chunk = chunks[ci];
        if cancelled() {
            release(held.take(), &mut report)?;
            return Err(IngestError::Interrupted {
                done: report.items.len(),
                remaining: candidates.len() - report.items.len(),
            });
        }
        // Commit this chunk while the next one is being prepared (and the last one freed).
        let freed = std::mem::take(&mut spent);
        let (committed, next) = rayon::join(
            || commit_chunk(store, chunk, prepared, opts, &mut spent),
            || {
                drop(freed);
                chunks.get(ci + 1).map(|c| (ci + 1, prep(c)))
            },
        );
        // What was committed is reported even when a later transaction of the chunk failed.
        let (items, failed) = committed;
        let ticket = store.write_ticket();
        release(held.replace((ticket, items)), &mut report)?;
        if let Some(e) = failed {
            release(held.take(), &mut report)?;
            return Err(e);
        }
        pending = next;
    }
    release(held.take(), &mut report)?;
    Ok(report)
}

/// Commit `objects` in transactions of at most [`crate::store::BATCH_BYTES`] of stored values (at least one
/// object each). With `stop_at_rejection`, no transaction follows one that ended with a rejection. Returns
/// the outcomes of the committed transactions, and the error that stopped the rest, if one did.
fn commit_in_transactions(
    store: &Store,
    objects: &[PreparedObject],
    stop_at_rejection: bool,
) -> (Vec<Outcome>, Option<StoreError>) {
    let mut outcomes = Vec::with_capacity(objects.len());
    let mut start = 0;
    while start < objects.len() {
        let mut end = start + 1;
        let mut bytes = objects[start].stored_bytes();
        while end < objects.len()
            && bytes + objects[end].stored_bytes() <= crate::store::BATCH_BYTES
        {
            bytes += objects[end].stored_bytes();
            end += 1;
        }
        match store.commit_prepared(&objects[start..end], stop_at_rejection) {
            Ok(o) => {
                let rejected = matches!(o.last(), Some(Outcome::Rejected(_)));
                outcomes.extend(o);
                if stop_at_rejection && rejected {
                    break;
                }
            }
            Err(e) => return (outcomes, Some(e)),
        }
        start = end;
    }
    (outcomes, None)
}

/// Commit one chunk; the prepared objects go into `spent`, for the caller to free off the writer's thread.
/// Returns the reports of the chunk's adapters up to the first one a failed transaction left undecided,
/// and that failure.
fn commit_chunk(
    store: &Store,
    chunk: &[Candidate],
    prepared: Vec<Result<PreparedObject, String>>,
    opts: &IngestOptions,
    spent: &mut Vec<PreparedObject>,
) -> (Vec<ItemReport>, Option<IngestError>) {
    if opts.strict {
        return commit_chunk_strict(store, chunk, prepared, spent);
    }
    let mut items: Vec<Option<ItemReport>> = vec![None; chunk.len()];
    let mut to_commit = Vec::new();
    let mut positions = Vec::new();
    for (i, (c, p)) in chunk.iter().zip(prepared).enumerate() {
        match p {
            Ok(p) => {
                to_commit.push(p);
                positions.push(i);
            }
            Err(reason) => {
                items[i] = Some(ItemReport {
                    path: c.path.clone(),
                    outcome: ItemOutcome::Rejected { reason },
                });
            }
        }
    }
    let (outcomes, failed) = commit_in_transactions(store, &to_commit, false);
    *spent = to_commit;
    for (pos, o) in positions.into_iter().zip(outcomes) {
        items[pos] = Some(ItemReport {
            path: chunk[pos].path.clone(),
            outcome: item_outcome(o),
        });
    }
    (
        items.into_iter().map_while(|i| i).collect(),
        failed.map(IngestError::from),
    )
}

/// What the report says of the store's outcome for one adapter.
fn item_outcome(o: Outcome) -> ItemOutcome {
    match o {
        Outcome::Added(id) => ItemOutcome::Ingested { id },
        Outcome::AlreadyPresent(id) => ItemOutcome::AlreadyPresent { id },
        Outcome::Rejected(reason) => ItemOutcome::Rejected { reason },
    }
}

/// `--strict`: commit the chunk's adapters up to the first rejected one (refused when read, or by the
/// store when committed), then stop with that one's error; nothing after it is committed.
fn commit_chunk_strict(
    store: &Store,
    chunk: &[Candidate],
    prepared: Vec<Result<PreparedObject, String>>,
    spent: &mut Vec<PreparedObject>,
) -> (Vec<ItemReport>, Option<IngestError>) {
    let first_bad = prepared.iter().position(|p| p.is_err());
    let mut prepared = prepared.into_iter();
    let good: Vec<PreparedObject> = prepared
        .by_ref()
        .take(first_bad.unwrap_or(chunk.len()))
        .map(|p| p.expect("before the first error"))
        .collect();
    let (outcomes, failed) = commit_in_transactions(store, &good, true);
    *spent = good;
    let mut items = Vec::with_capacity(outcomes.len());
    for (c, o) in chunk.iter().zip(outcomes) {
        if let Outcome::Rejected(reason) = o {
            let e = IngestError::Strict {
                path: c.path.clone(),
                reason,
            };
            return (items, Some(e));
        }
        items.push(ItemReport {
            path: c.path.clone(),
            outcome: item_outcome(o),
        });
    }
    if let Some(e) = failed {
        return (items, Some(e.into()));
    }
    if let (Some(i), Some(Err(reason))) = (first_bad, prepared.next()) {
        let e = IngestError::Strict {
            path: chunk[i].path.clone(),
            reason,
        };
        return (items, Some(e));
    }
    (items, None)
}

/// Discover and ingest folders (and/or a manifest) into the store.
pub fn ingest_zoo(
    store: &Store,
    roots: &[PathBuf],
    manifest: Option<&Path>,
    opts: &IngestOptions,
    progress: &(dyn Fn(IngestEvent) + Sync),
) -> Result<IngestReport, IngestError> {
    let mut candidates = Vec::new();
    if let Some(m) = manifest {
        let (c, tasks) = read_manifest(m, opts)?;
        for t in &tasks {
            store.put_task(t)?;
        }
        candidates.extend(c);
    }
    candidates.extend(discover(roots, opts)?);
    ingest_candidates(store, &candidates, opts, progress)
}
