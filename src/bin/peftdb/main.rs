//! `peftdb`: the command-line shell over the peftdb library.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 finished, but some adapters were rejected (ingest);
//! 4 the store is held by another writer; 5 not found.

mod cmd_eval;
mod cmd_experiment;
mod cmd_merge;
mod cmd_nearest;
mod cmd_store;
mod cmd_suggest;
mod cmd_train;
mod table;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// peftdb: a database of parameter-efficient adapters with TuPaTE task embeddings.
#[derive(Parser, Debug)]
#[command(name = "peftdb", version, about, long_about = None)]
struct Cli {
    /// Store file (else $PEFTDB_PATH, else ./peftdb.redb).
    #[arg(
        long,
        global = true,
        env = "PEFTDB_PATH",
        default_value = "peftdb.redb"
    )]
    db: PathBuf,
    /// Machine-readable JSON output on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an empty store.
    Init,
    /// Ingest adapter folders, zoo folders and/or a zoo manifest.
    Ingest(cmd_store::IngestArgs),
    /// List tasks or objects.
    Ls(cmd_store::LsArgs),
    /// Show one object (by id or content-hash prefix) or task (by name).
    Show(cmd_store::ShowArgs),
    /// Remove objects, or a task with all its objects.
    Rm(cmd_store::RmArgs),
    /// Write stored objects back as adapter folders (byte-identical to what was ingested).
    Export(cmd_store::ExportArgs),
    /// Counts, sizes and embedding spaces.
    Stats,
    /// Merge objects or adapter folders (weights, or softmax of scores) into one adapter folder.
    Merge(cmd_merge::MergeArgs),
    /// Nearest tasks to a stored task, a stored object or an adapter folder (TuPaTE similarity).
    Nearest(cmd_nearest::NearestArgs),
    /// For a new task: retrieve candidate adapters, score them, and write their ensemble as its initialization.
    Suggest(cmd_suggest::SuggestArgs),
    /// Score given candidate adapters on a new task's examples with the PEWE indicators.
    Rerank(cmd_suggest::RerankArgs),
    /// Train a new adapter of any method on a task folder (few-shot or full).
    Train(cmd_train::TrainArgs),
    /// Accuracy and loss of an adapter (folder or stored object) on a task split.
    Eval(cmd_eval::EvalArgs),
    /// The replication harness: train a zoo, measure transfer gains and PEWE initializations, report.
    #[command(subcommand)]
    Experiment(cmd_experiment::ExperimentCmd),
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Exit(pub u8, pub anyhow::Error);

pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(pe) = cause.downcast_ref::<peftdb::error::StoreError>() {
            match pe {
                peftdb::error::StoreError::Locked { .. } => return 4,
                peftdb::error::StoreError::NotFound { .. } => return 5,
                _ => {}
            }
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Init => cmd_store::init(&cli.db, cli.json),
        Cmd::Ingest(a) => cmd_store::ingest(&cli.db, a, cli.json),
        Cmd::Ls(a) => cmd_store::ls(&cli.db, a, cli.json),
        Cmd::Show(a) => cmd_store::show(&cli.db, a, cli.json),
        Cmd::Rm(a) => cmd_store::rm(&cli.db, a, cli.json),
        Cmd::Export(a) => cmd_store::export(&cli.db, a, cli.json),
        Cmd::Stats => cmd_store::stats(&cli.db, cli.json),
        Cmd::Merge(a) => cmd_merge::run(&cli.db, a, cli.json),
        Cmd::Nearest(a) => cmd_nearest::run(&cli.db, a, cli.json).map(|()| 0),
        Cmd::Suggest(a) => cmd_suggest::suggest_cmd(&cli.db, a, cli.json),
        Cmd::Rerank(a) => cmd_suggest::rerank_cmd(&cli.db, a, cli.json),
        Cmd::Train(a) => {
            let mut a = a.clone();
            a.db = Some(cli.db.clone());
            cmd_train::run(a, cli.json).map(|()| 0)
        }
        Cmd::Experiment(c) => cmd_experiment::run_cmd(c, cli.json),
        Cmd::Eval(a) => {
            let mut a = a.clone();
            a.db = Some(cli.db.clone());
            cmd_eval::run(a, cli.json).map(|()| 0)
        }
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}
