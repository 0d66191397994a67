//! `peftdb`: the command-line shell over the peftdb library.
//!
//! Exit codes: 0 success; 1 error; 2 usage error; 3 finished, but some adapters were rejected (ingest);
//! 4 the store is held by another writer; 5 not found.

mod args;
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
    /// Give free space back to the file system (after `rm`), upgrading an older store's schema first.
    Compact,
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
        if let Some(peftdb::error::OpenError::Locked { .. }) = cause.downcast_ref() {
            return 4;
        }
        if let Some(peftdb::error::StoreError::NotFound { .. }) = cause.downcast_ref() {
            return 5;
        }
    }
    1
}

fn main() -> ExitCode {
    // Output piped into a reader that stops early (`peftdb ls | head`) ends the command quietly, as a
    // Unix tool does, instead of a panic in `println!` on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Init => cmd_store::init(&cli.db, cli.json),
        Cmd::Ingest(a) => cmd_store::ingest(&cli.db, a, cli.json),
        Cmd::Ls(a) => cmd_store::ls(&cli.db, a, cli.json),
        Cmd::Show(a) => cmd_store::show(&cli.db, a, cli.json),
        Cmd::Rm(a) => cmd_store::rm(&cli.db, a, cli.json),
        Cmd::Export(a) => cmd_store::export(&cli.db, a, cli.json),
        Cmd::Stats => cmd_store::stats(&cli.db, cli.json),
        Cmd::Compact => cmd_store::compact(&cli.db, cli.json),
        Cmd::Merge(a) => cmd_merge::run(&cli.db, a, cli.json),
        Cmd::Nearest(a) => cmd_nearest::run(&cli.db, a, cli.json).map(|()| 0),
        Cmd::Suggest(a) => cmd_suggest::suggest_cmd(&cli.db, a, cli.json),
        Cmd::Rerank(a) => cmd_suggest::rerank_cmd(&cli.db, a, cli.json),
        Cmd::Train(a) => cmd_train::run(&cli.db, a, cli.json).map(|()| 0),
        Cmd::Experiment(c) => cmd_experiment::run_cmd(c, cli.json),
        Cmd::Eval(a) => cmd_eval::run(&cli.db, a, cli.json).map(|()| 0),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// The error and its causes, joined by ": ", each cause left out when an earlier message already quotes it
/// (the library's messages name their cause, and keep it as the `source` for programs that walk the chain).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;
    use std::collections::BTreeSet;

    #[test]
    fn error_chain_quotes_each_cause_once() {
        let io = std::io::Error::other("disk full");
        let e = peftdb::error::StoreError::Storage {
            path: "z.peftdb".into(),
            during: "ingesting",
            source: Box::new(io.into()),
        };
        let msg = super::error_chain(&anyhow::Error::new(e).context("ingesting zoo/"));
        assert_eq!(msg.matches("disk full").count(), 1, "{msg}");
        assert!(
            msg.starts_with("ingesting zoo/: z.peftdb: storage error while ingesting"),
            "{msg}"
        );
    }
    use std::path::Path;

    fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Backticked snippets that quote the CLI: a peftdb command line, or a lone flag (two dashes first).
    fn quoted(text: &str) -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|s| s.starts_with("peftdb ") || s.starts_with("--"))
            .map(str::to_string)
            .collect()
    }

    fn flag_name(tok: &str) -> &str {
        tok.trim_start_matches("--")
            .split(['=', '[', '|', ')', ',', '.'])
            .next()
            .unwrap_or("")
    }

    fn all_flags(cmd: &clap::Command, out: &mut BTreeSet<String>) {
        out.extend(
            cmd.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string)),
        );
        for sc in cmd.get_subcommands() {
            all_flags(sc, out);
        }
    }

    /// Every peftdb command line and flag that a message, doc or comment in `src/`, the README or
    /// ARCHITECTURE.md quotes exists in the real CLI: a user who follows an error message's advice gets a command that parses.
    #[test]
    fn every_quoted_command_and_flag_exists() {
        let mut cli = Cli::command();
        cli.build();
        let mut flags = BTreeSet::new();
        all_flags(&cli, &mut flags);
        let mut files = Vec::new();
        rust_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut checked = 0;
        let mut bad = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            for q in quoted(&text) {
                checked += 1;
                let toks: Vec<&str> = q.split_whitespace().collect();
                if toks[0] != "peftdb" {
                    if !flags.contains(flag_name(toks[0])) {
                        bad.push(format!("{}: `{q}`: no such flag", f.display()));
                    }
                    continue;
                }
                let mut cmd = &cli;
                let mut i = 1;
                while let Some(sc) = toks.get(i).and_then(|t| cmd.find_subcommand(t)) {
                    cmd = sc;
                    i += 1;
                }
                if cmd.has_subcommands() && toks.get(i).is_some_and(|t| !t.starts_with('-')) {
                    bad.push(format!(
                        "{}: `{q}`: no subcommand {:?}",
                        f.display(),
                        toks[i]
                    ));
                    continue;
                }
                let opts = toks[i..].iter().map(|t| t.trim_start_matches(['[', '(']));
                for t in opts.filter(|t| t.starts_with("--")) {
                    let name = flag_name(t);
                    if !cmd.get_arguments().any(|a| a.get_long() == Some(name)) {
                        bad.push(format!(
                            "{}: `{q}`: `{}` has no flag --{name}",
                            f.display(),
                            cmd.get_name()
                        ));
                    }
                }
            }
        }
        assert!(checked > 10, "only {checked} quoted commands found");
        assert!(bad.is_empty(), "{}", bad.join("\n"));
        // The checker itself catches a wrong command and a wrong flag.
        assert!(cli.find_subcommand("tasks").is_none());
        assert!(!flags.contains("exact"));
    }
}
