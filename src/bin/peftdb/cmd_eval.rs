//! `peftdb eval`: accuracy and loss of an adapter (or the bare model) on a task split, by head-free label
//! scoring.

use indicatif::ProgressBar;
use peftdb::object::{read_adapter, ReadOptions};
use peftdb::task::{Split, Task};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Evaluate an adapter on a task split.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub engine: crate::args::ModelArgs,
    /// Task folder (task.json + train/dev/test.jsonl).
    #[arg(long)]
    pub task: PathBuf,
    /// Adapter folder (PEFT, AdapterHub or BitFit); neither this nor --object: the bare model.
    #[arg(long, conflicts_with = "object")]
    pub adapter: Option<PathBuf>,
    /// Stored object id (in the store of --db).
    #[arg(long)]
    pub object: Option<u64>,
    #[arg(long, default_value = "test")]
    pub split: Split,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

pub fn run(db: &Path, args: &EvalArgs, json: bool) -> anyhow::Result<()> {
    let engine = args.engine.load()?;
    let task = Task::load(&args.task)?;
    let (obj, source) = if let Some(dir) = &args.adapter {
        (
            Some(read_adapter(dir, &ReadOptions::default())?),
            dir.display().to_string(),
        )
    } else if let Some(id) = args.object {
        let store = peftdb::store::Store::open_for_reading(db)?;
        (Some(store.get(id)?.1), format!("object {id}"))
    } else {
        (None, "base model".to_string())
    };
    let examples = task.split(args.split);
    let opts = args.engine.score(args.batch_size);
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| ProgressBar::new(examples.len() as u64));
    // The pipeline's own evaluation (the number the transfer study reports).
    let ev = peftdb::transfer::evaluate(
        &engine,
        &task,
        obj.as_ref(),
        examples,
        &opts,
        &mut |done, _| {
            if let Some(b) = &bar {
                b.set_position(done as u64);
            }
        },
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r =
        peftdb::transfer::EvalReport::new(&task, args.split, source, &ev, args.engine.temperature);
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} on {} {} ({} examples): accuracy {:.4} (majority {:.4}), loss {:.4}",
            r.adapter, r.task, r.split, r.examples, r.accuracy, r.majority_rate, r.loss
        );
    }
    Ok(())
}
