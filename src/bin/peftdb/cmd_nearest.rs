//! `peftdb nearest`: the tasks nearest to a task, an object or an adapter folder.

use anyhow::Context;
use clap::{ArgGroup, Args, ValueEnum};
use peftdb::index::Progress;
use peftdb::index::{IndexConfig, IndexManager, SearchMode, SpaceState};
use peftdb::object::MethodKind;
use peftdb::query::{Nearest, NearestResult, Similarity};
use peftdb::store::Store;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// The exact scan of the space's memory-mapped rows (a one-shot process gains nothing from loading a
    /// graph), or a graph the process already holds.
    Auto,
    /// Always the exact scan.
    Exact,
    /// Always the HNSW graph.
    Hnsw,
}

/// Arguments of `peftdb nearest`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["task", "object", "adapter"])))]
pub struct NearestArgs {
    /// A stored task (its objects in every space; several spaces are averaged, "3 ENSEMBLE").
    #[arg(long)]
    pub task: Option<String>,
    /// A stored object id.
    #[arg(long)]
    pub object: Option<u64>,
    /// An adapter folder that is not stored (read and embedded now).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Number of tasks to return.
    #[arg(short = 'k', long = "top", default_value_t = 10)]
    pub k: usize,
    /// Similarity: tupate (cosine of raw TuPaTE embeddings, the paper), centered (cosine after
    /// subtracting each space's mean embedding) or delta (cosine of LoRA weight updates s B A; LoRA only).
    #[arg(long, default_value = "tupate")]
    pub similarity: Similarity,
    /// Only objects of this method (lora, ia3, prefix, prompt, bitfit, adapter).
    #[arg(long)]
    pub method: Option<MethodKind>,
    /// Only tasks of this group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only tasks with this tag (repeatable; all must be present).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Only objects of this base model.
    #[arg(long)]
    pub base_model: Option<String>,
    /// Keep the query's own task in the results (excluded by default: leave-one-out).
    #[arg(long)]
    pub include_self: bool,
    /// Search engine.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
}

/// Run `peftdb nearest`.
pub fn run(store_path: &Path, args: &NearestArgs, json: bool) -> anyhow::Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    let progress = |p: Progress<'_>| {
        if let Some(b) = &bar {
            match p {
                Progress::Building { space, total } => {
                    b.set_message(format!("building the index of {space} ({total} vectors)"))
                }
                Progress::Built { space } => b.set_message(format!("built {space}")),
            }
        }
    };
    let mode = match args.mode {
        ModeArg::Auto => SearchMode::Auto,
        ModeArg::Exact => SearchMode::Exact,
        ModeArg::Hnsw => SearchMode::Hnsw,
    };
    // One query and exit: scan the memory-mapped rows rather than load a graph (`--mode hnsw` forces one).
    let similarity = args.similarity;
    // Only the spaces this similarity searches are opened.
    let config = IndexConfig {
        mode,
        kind: Some(similarity.embedding_kind()),
        ..IndexConfig::one_shot()
    };
    // Read-only when the derived files are current (a query then writes nothing: a writable open writes
    // and syncs redb's header twice, which under a busy disk cost more than the query); writable when
    // indexes must be rebuilt, so that they are saved for the next query; read-only again when another
    // process writes.
    let store = Store::open_for_reading(store_path)?;
    let store = if matches!(args.mode, ModeArg::Hnsw)
        || !IndexManager::vectors_current(&store, config)?
    {
        drop(store);
        match Store::open(store_path) {
            Ok(s) => s,
            Err(peftdb::error::OpenError::Locked { .. }) => Store::open_for_reading(store_path)?,
            Err(e) => return Err(e.into()),
        }
    } else {
        store
    };
    let (index, report) = IndexManager::open(&store, config, &progress)
        .with_context(|| format!("opening the indexes of {}", store_path.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for (space, st) in &report.spaces {
        if let SpaceState::Rebuilt { reason } = st {
            if std::io::stderr().is_terminal() {
                eprintln!("rebuilt the index of space {space} ({reason})");
            }
        }
    }
    let mut q = if let Some(t) = &args.task {
        Nearest::task(t.clone())
    } else if let Some(id) = args.object {
        Nearest::object(id)
    } else if let Some(dir) = &args.adapter {
        Nearest::adapter(dir.clone())
    } else {
        anyhow::bail!("give --task, --object or --adapter");
    };
    q = q.k(args.k).search_mode(mode).similarity(similarity);
    if let Some(m) = args.method {
        q = q.method(m);
    }
    if let Some(g) = &args.group {
        q = q.group(g.clone());
    }
    for t in &args.tags {
        q = q.tag(t.clone());
    }
    if let Some(b) = &args.base_model {
        q = q.base_model(b.clone());
    }
    if args.include_self {
        q = q.exclude_query_task(false);
    }
    let res = q.run(&store, &index)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&res)?);
    } else {
        print!("{}", render(&res));
    }
    // The process exits now: freeing the catalog of a large store (100k objects' strings) cost a fifth of a
    // cold query. The store itself is closed properly (its drop ends the writable redb handle cleanly).
    std::mem::forget(index);
    Ok(())
}

fn render(res: &NearestResult) -> String {
    let mut out = format!(
        "nearest tasks to {} {} (similarity {}, k {})\n",
        res.target,
        res.query,
        res.similarity.as_str(),
        res.k
    );
    for s in &res.spaces {
        out.push_str(&format!(
            "  space {} via {}{}\n",
            s.label,
            s.engine,
            s.object
                .map(|o| format!(", query object {o}"))
                .unwrap_or_default()
        ));
    }
    let labels: Vec<&str> = res.spaces.iter().map(|s| s.label.as_str()).collect();
    let mut header = vec!["rank".to_string(), "task".into(), "score".into()];
    if labels.len() > 1 {
        header.extend(res.spaces.iter().map(|s| s.method.to_string()));
    }
    header.push("objects".into());
    let mut rows = Vec::new();
    for t in &res.tasks {
        let mut r = vec![
            t.rank.to_string(),
            t.task.clone(),
            format!("{:.4}", t.score),
        ];
        if labels.len() > 1 {
            for l in &labels {
                r.push(
                    t.per_space
                        .iter()
                        .find(|p| p.label == *l)
                        .map(|p| format!("{:.4}", p.score))
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
        let mut ids: Vec<String> = t.objects.iter().map(|o| o.id.to_string()).collect();
        ids.dedup();
        r.push(ids.join(","));
        rows.push(r);
    }
    if rows.is_empty() {
        out.push_str("no task passes the filters\n");
        return out;
    }
    let header: Vec<&str> = header.iter().map(|h| h.as_str()).collect();
    out.push_str(&crate::table::render(&header, &rows));
    out
}
