//! Store commands: init, ingest, ls, show, rm, export, stats.

use crate::table::render;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use peftdb::ingest::{ingest_zoo, IngestEvent, IngestOptions, ItemOutcome};
use peftdb::object::MethodKind;
use peftdb::store::{ObjectId, ObjectRecord, Store};
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

fn open_rw(db: &Path) -> Result<Store> {
    Ok(Store::open(db)?)
}

fn open_ro(db: &Path) -> Result<Store> {
    Ok(Store::open_for_reading(db)?)
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn init(db: &Path, json: bool) -> Result<u8> {
    let s = Store::create(db)?;
    if json {
        print_json(&json!({"created": s.path(), "schema_version": peftdb::store::SCHEMA_VERSION}))?;
    } else {
        println!("created {}", s.path().display());
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// Adapter folders or zoo folders to walk.
    pub paths: Vec<PathBuf>,
    /// A zoo manifest (schema/zoo_manifest.schema.json).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// Task name for every adapter found (else sidecar / folder name).
    #[arg(long)]
    pub task: Option<String>,
    /// Base model for adapters whose config names none.
    #[arg(long)]
    pub base_model: Option<String>,
    /// Stop at the first rejected adapter: the adapters before it are committed, none after it.
    #[arg(long)]
    pub strict: bool,
    /// Store adapters holding NaN/Inf values instead of rejecting them.
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Objects per transaction.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Create the store if it does not exist.
    #[arg(long)]
    pub create: bool,
}

pub fn ingest(db: &Path, a: &IngestArgs, json: bool) -> Result<u8> {
    if a.paths.is_empty() && a.manifest.is_none() {
        bail!("nothing to ingest: give adapter or zoo folders, or --manifest FILE");
    }
    let store = if a.create {
        Store::open_or_create(db)?
    } else {
        open_rw(db)?
    };
    let opts = IngestOptions {
        strict: a.strict,
        allow_non_finite: a.allow_non_finite,
        batch_size: a.batch_size,
        task: a.task.clone(),
        base_model: a.base_model.clone(),
        ..Default::default()
    };
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} ingesting [{bar:30}] {pos}/{len} {per_sec} {wide_msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let progress = |ev: IngestEvent| match ev {
        IngestEvent::Discovered { total } => pb.set_length(total as u64),
        IngestEvent::Processed { path, .. } => {
            pb.inc(1);
            pb.set_message(path.display().to_string());
        }
    };
    let report = ingest_zoo(&store, &a.paths, a.manifest.as_deref(), &opts, &progress);
    pb.finish_and_clear();
    let report = report?;
    if json {
        print_json(&json!({
            "ingested": report.ingested(),
            "already_present": report.already_present(),
            "rejected": report.rejected(),
            "items": report.items,
        }))?;
    } else {
        for it in &report.items {
            if let ItemOutcome::Rejected { reason } = &it.outcome {
                eprintln!("rejected {}: {reason}", it.path.display());
            }
        }
        println!(
            "{} ingested, {} already present, {} rejected ({} in all)",
            report.ingested(),
            report.already_present(),
            report.rejected(),
            report.items.len()
        );
    }
    Ok(if report.rejected() > 0 { 3 } else { 0 })
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LsWhat {
    Tasks,
    Objects,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// What to list.
    #[arg(value_enum, default_value = "tasks")]
    pub what: LsWhat,
    /// Only objects of this task.
    #[arg(long)]
    pub task: Option<String>,
    /// Only objects of this method (lora, ia3, prefix, prompt, bitfit, adapter).
    #[arg(long)]
    pub method: Option<String>,
}

fn object_json(o: &ObjectRecord) -> serde_json::Value {
    json!({
        "id": o.id,
        "task": o.task,
        "method": o.method_kind(),
        "base_model": o.base_model,
        "stage": o.stage,
        "format": o.format,
        "dtype": o.dtype,
        "tensors": o.tensor_count,
        "params": o.num_params,
        "bytes": o.data_bytes,
        "content_hash": o.content_hash,
        "source": o.source,
        "metrics": o.metrics,
        "spaces": o.embeddings.iter().map(|e| json!({"kind": e.kind, "space": e.space.to_string()})).collect::<Vec<_>>(),
        "no_embedding": o.no_embedding,
        "saved_modules": o.saved_modules(),
    })
}

pub fn ls(db: &Path, a: &LsArgs, json: bool) -> Result<u8> {
    let store = open_ro(db)?;
    match a.what {
        LsWhat::Tasks => {
            let tasks = store.tasks()?;
            let counts = store.objects_per_task()?;
            if json {
                let v: Vec<_> = tasks
                    .iter()
                    .map(|t| {
                        let mut v = serde_json::to_value(t).expect("json");
                        v["objects"] = json!(counts.get(&t.name).copied().unwrap_or(0));
                        v
                    })
                    .collect();
                print_json(&v)?;
            } else {
                let rows: Vec<Vec<String>> = tasks
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.group.clone().unwrap_or_default(),
                            t.train_size.map(|s| s.to_string()).unwrap_or_default(),
                            counts.get(&t.name).copied().unwrap_or(0).to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(&["task", "group", "train size", "objects"], &rows)
                );
            }
        }
        LsWhat::Objects => {
            let method = match &a.method {
                Some(m) => {
                    Some(MethodKind::parse(m).with_context(|| format!("unknown method {m:?}"))?)
                }
                None => None,
            };
            let objs: Vec<_> = store
                .objects()?
                .into_iter()
                .filter(|o| a.task.as_ref().is_none_or(|t| &o.task == t))
                .filter(|o| method.is_none_or(|m| o.method_kind() == m))
                .collect();
            if json {
                print_json(&objs.iter().map(object_json).collect::<Vec<_>>())?;
            } else {
                let spaces = store.spaces()?;
                let rows: Vec<Vec<String>> = objs
                    .iter()
                    .map(|o| {
                        let space = o
                            .tupate_space()
                            .map(|s| {
                                spaces
                                    .iter()
                                    .find(|r| r.id == s)
                                    .map(|r| format!("{} {}", s, r.key.label()))
                                    .unwrap_or_else(|| s.to_string())
                            })
                            .unwrap_or_else(|| "(no embedding)".into());
                        vec![
                            o.id.to_string(),
                            o.task.clone(),
                            o.method_kind().to_string(),
                            o.stage.clone().unwrap_or_default(),
                            o.num_params.to_string(),
                            space,
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    render(&["id", "task", "method", "stage", "params", "space"], &rows)
                );
            }
        }
    }
    Ok(0)
}

/// Resolve an object reference: a numeric id or a content-hash prefix (8+ hex digits).
fn resolve_object(store: &Store, s: &str) -> Result<Option<ObjectId>> {
    if let Ok(id) = s.parse::<u64>() {
        return Ok(Some(id));
    }
    Ok(store.find_by_hash(s)?)
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Object id, content-hash prefix, or task name.
    pub what: String,
}

pub fn show(db: &Path, a: &ShowArgs, json: bool) -> Result<u8> {
    let store = open_ro(db)?;
    if let Some(id) = resolve_object(&store, &a.what)? {
        if let Ok(o) = store.object(id) {
            if json {
                let mut v = object_json(&o);
                v["method_config"] = serde_json::to_value(&o.method)?;
                v["config_json"] =
                    serde_json::from_str(&o.config_json).unwrap_or(json!(o.config_json));
                print_json(&v)?;
            } else {
                println!("object {}", o.id);
                println!("  task          {}", o.task);
                println!("  method        {}", o.method_kind());
                println!("  base model    {}", o.base_model);
                println!("  stage         {}", o.stage.as_deref().unwrap_or("-"));
                println!("  format        {:?}", o.format);
                println!(
                    "  tensors       {} ({} params, {} bytes, {})",
                    o.tensor_count, o.num_params, o.data_bytes, o.dtype
                );
                println!("  content hash  {}", o.content_hash);
                println!("  source        {}", o.source.as_deref().unwrap_or("-"));
                for e in &o.embeddings {
                    let label = store
                        .space(e.space)
                        .map(|s| s.key.label())
                        .unwrap_or_default();
                    println!(
                        "  embedding     {} in space {} ({label})",
                        e.kind.as_str(),
                        e.space
                    );
                }
                for m in &o.no_embedding {
                    println!("  no {} embedding: {}", m.kind.as_str(), m.reason);
                }
                let saved = o.saved_modules();
                if !saved.is_empty() {
                    println!(
                        "  saved modules {} (modules_to_save: stored and exported, not embedded: whole \
                         trained copies of base-model modules, not the adapter's tuned update)",
                        saved.join(", ")
                    );
                }
                for (k, v) in &o.metrics {
                    println!("  metric        {k} = {v}");
                }
                println!("  config        {}", serde_json::to_string(&o.method)?);
            }
            return Ok(0);
        }
    }
    let t = store.task(&a.what)?;
    let objs: Vec<_> = store
        .objects()?
        .into_iter()
        .filter(|o| o.task == t.name)
        .collect();
    if json {
        let mut v = serde_json::to_value(&t)?;
        v["objects"] = json!(objs.iter().map(object_json).collect::<Vec<_>>());
        print_json(&v)?;
    } else {
        println!("task {}", t.name);
        println!("  group        {}", t.group.as_deref().unwrap_or("-"));
        println!("  tags         {}", t.tags.join(", "));
        println!(
            "  train size   {}",
            t.train_size.map(|s| s.to_string()).unwrap_or("-".into())
        );
        println!("  description  {}", t.description.as_deref().unwrap_or("-"));
        for o in objs {
            println!(
                "  object {:>6}  {:<8} {}",
                o.id,
                o.method_kind().to_string(),
                o.stage.unwrap_or_default()
            );
        }
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Object ids (or content-hash prefixes).
    pub ids: Vec<String>,
    /// Remove this task and all its objects.
    #[arg(long)]
    pub task: Option<String>,
}

pub fn rm(db: &Path, a: &RmArgs, json: bool) -> Result<u8> {
    let store = open_rw(db)?;
    let removed = if let Some(t) = &a.task {
        if !a.ids.is_empty() {
            bail!("give object ids or --task, not both");
        }
        store.remove_task(t)?
    } else {
        if a.ids.is_empty() {
            bail!("nothing to remove: give object ids or --task NAME");
        }
        let mut ids = Vec::new();
        for s in &a.ids {
            ids.push(resolve_object(&store, s)?.with_context(|| format!("no object {s:?}"))?);
        }
        store.remove(&ids)?
    };
    if json {
        print_json(&json!({"removed": removed.iter().map(|o| o.id).collect::<Vec<_>>()}))?;
    } else {
        println!("removed {} object(s)", removed.len());
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Object id or content-hash prefix (one object: --out is the adapter folder).
    pub id: Option<String>,
    /// Export every object of this task into --out/<method>-<stage>-<id>/.
    #[arg(long)]
    pub task: Option<String>,
    /// Target folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn export(db: &Path, a: &ExportArgs, json: bool) -> Result<u8> {
    let store = open_ro(db)?;
    let mut written = Vec::new();
    match (&a.id, &a.task) {
        (Some(s), None) => {
            let id = resolve_object(&store, s)?.with_context(|| format!("no object {s:?}"))?;
            store.export(id, &a.out)?;
            written.push((id, a.out.clone()));
        }
        (None, Some(t)) => {
            store.task(t)?;
            for o in store.objects()?.into_iter().filter(|o| &o.task == t) {
                // Folder names come from the store, never from a path: method and stage are validated words.
                let stage: String = o
                    .stage
                    .clone()
                    .unwrap_or_else(|| "object".into())
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let dir = a
                    .out
                    .join(format!("{}-{}-{}", o.method_kind(), stage, o.id));
                store.export(o.id, &dir)?;
                written.push((o.id, dir));
            }
        }
        _ => bail!("give one object id, or --task NAME"),
    }
    if json {
        print_json(
            &written
                .iter()
                .map(|(id, p)| json!({"id": id, "path": p}))
                .collect::<Vec<_>>(),
        )?;
    } else {
        for (id, p) in &written {
            println!("exported object {id} to {}", p.display());
        }
    }
    Ok(0)
}

pub fn compact(db: &Path, json: bool) -> Result<u8> {
    let mut store = open_rw(db)?;
    let (before, after) = store.compact()?;
    // Derived files of removed objects and changed spaces go too (rebuilt on the next query).
    let index_freed = peftdb::index::IndexManager::remove_stale_files(
        &store,
        peftdb::index::IndexConfig::default(),
    )?;
    if json {
        print_json(
            &json!({"path": db, "bytes_before": before, "bytes_after": after, "index_bytes_freed": index_freed}),
        )?;
    } else {
        println!(
            "{}: {before} -> {after} bytes ({:.1}% freed); {index_freed} bytes of stale index files removed",
            db.display(),
            if before > 0 {
                100.0 * (before.saturating_sub(after)) as f64 / before as f64
            } else {
                0.0
            }
        );
    }
    Ok(0)
}

pub fn stats(db: &Path, json: bool) -> Result<u8> {
    let store = open_ro(db)?;
    let s = store.stats()?;
    if json {
        print_json(&json!({
            "path": s.path,
            "schema_version": s.schema_version,
            "file_bytes": s.file_bytes,
            "tasks": s.tasks,
            "objects": s.objects,
            "tensor_bytes": s.tensor_bytes,
            "objects_by_method": s.objects_by_method,
            "objects_without_embedding": s.objects_without_embedding,
            "spaces": s.spaces.iter().map(|sp| json!({
                "id": sp.id.to_string(), "label": sp.key.label(), "base_model": sp.key.base_model,
                "method": sp.key.method, "kind": sp.key.kind, "dim": sp.dim, "count": sp.count,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        println!(
            "store        {} (schema v{}, {} bytes)",
            s.path.display(),
            s.schema_version,
            s.file_bytes
        );
        println!("tasks        {}", s.tasks);
        println!(
            "objects      {} ({} without embedding)",
            s.objects, s.objects_without_embedding
        );
        println!("tensor data  {} bytes", s.tensor_bytes);
        for (m, n) in &s.objects_by_method {
            println!("  {m:<8} {n}");
        }
        let rows: Vec<Vec<String>> = s
            .spaces
            .iter()
            .map(|sp| {
                vec![
                    sp.id.to_string(),
                    sp.key.method.to_string(),
                    sp.dim.to_string(),
                    sp.count.to_string(),
                    sp.key.base_model.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            render(&["space", "method", "dim", "objects", "base model"], &rows)
        );
    }
    Ok(0)
}
