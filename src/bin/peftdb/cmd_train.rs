//! `peftdb train`: train a new adapter of any method on a task folder.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use peftdb::engine::{train, TrainConfig, TrainData, TrainProgress as Progress};
use peftdb::object::{read_adapter, write_adapter, MethodKind, ReadOptions};
use peftdb::task::{few_shot, Task};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// Train an adapter (writes OUT/best and OUT/early, plus OUT/train_report.json).
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub engine: crate::args::ModelArgs,
    /// Task folder (task.json + train/dev/test.jsonl).
    #[arg(long)]
    pub task: PathBuf,
    /// lora | ia3 | prefix | prompt | bitfit | adapter (ignored with --init/--init-object).
    #[arg(long, default_value = "lora")]
    pub method: MethodKind,
    /// Output folder (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Few-shot: k training examples per class (seeded); all of train.jsonl if omitted.
    #[arg(long)]
    pub k: Option<usize>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// LoRA: scale by alpha/sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// Target modules, comma-separated (LoRA, IA3), e.g. query,value.
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Virtual tokens of prefix / prompt tuning.
    #[arg(long, default_value_t = 20)]
    pub prefix_len: usize,
    /// Bottleneck width of a bottleneck adapter (default hidden/12).
    #[arg(long)]
    pub bottleneck: Option<usize>,
    /// Learning rate (default per method: LoRA/BitFit/adapter 5e-4, IA3 3e-3, prefix 5e-3, prompt 3e-2).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Training steps (default: --epochs epochs).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Evaluate on dev every N steps.
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Stop after N evaluations without improvement (0: never).
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate the starting adapter (--init, or the fresh one) on dev before the first step and keep it
    /// as a checkpoint (step 0): the best checkpoint is then never worse on dev than the start.
    #[arg(long)]
    pub keep_start: bool,
    /// Start from this PEFT / AdapterHub / BitFit folder.
    #[arg(long, conflicts_with = "init_object")]
    pub init: Option<PathBuf>,
    /// Start from this stored object (in the store of --db).
    #[arg(long)]
    pub init_object: Option<u64>,
    /// Base model name written into the adapter config (default: the model folder's name).
    #[arg(long)]
    pub base_model_name: Option<String>,
}

pub fn run(db: &Path, args: &TrainArgs, json: bool) -> anyhow::Result<()> {
    let engine = args.engine.load()?;
    let task = Task::load(&args.task)?;
    peftdb::object::check_output_dir(&args.out)?;
    let train_ex = match args.k {
        Some(k) => few_shot(&task.train, task.labels.len(), k, args.seed)?,
        None => task.train.clone(),
    };
    let mut cfg = TrainConfig::new(args.method);
    cfg.spec.r = args.r;
    cfg.spec.alpha = args.alpha;
    cfg.spec.use_rslora = args.rslora;
    cfg.spec.targets = args.targets.clone();
    cfg.spec.num_virtual_tokens = args.prefix_len;
    cfg.spec.bottleneck_size = args.bottleneck;
    cfg.lr = args.lr;
    cfg.weight_decay = args.weight_decay;
    cfg.batch_size = args.batch_size;
    cfg.max_steps = args.steps;
    cfg.epochs = args.epochs;
    cfg.eval_every = args.eval_every;
    cfg.patience = (args.patience > 0).then_some(args.patience);
    cfg.seed = args.seed;
    cfg.keep_start = args.keep_start;
    cfg.temperature = args.engine.temperature;
    cfg.base_model_name = args.base_model_name.clone();
    cfg.init = if let Some(dir) = &args.init {
        Some(read_adapter(dir, &ReadOptions::default())?)
    } else if let Some(id) = args.init_object {
        let store = peftdb::store::Store::open_for_reading(db)?;
        Some(store.get(id)?.1)
    } else {
        None
    };
    let labels = task.label_texts();
    let data = TrainData {
        label_texts: &labels,
        train: &train_ex,
        dev: &task.dev,
        test: Some(&task.test),
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps {msg} [{elapsed_precise}<{eta}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let started = std::time::Instant::now();
    let outcome = train(&engine, &data, &cfg, &mut |p| {
        if let Some(b) = &bar {
            match p {
                Progress::Step { step, total, loss } => {
                    b.set_length(*total as u64);
                    b.set_position(*step as u64);
                    b.set_message(format!("loss {loss:.4}"));
                }
                Progress::Eval(e) => b.println(format!(
                    "step {}: dev accuracy {:.4}, dev loss {:.4}, train loss {:.4}",
                    e.step, e.dev_accuracy, e.dev_loss, e.train_loss
                )),
            }
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    write_adapter(&outcome.best.object, &args.out.join("best"))?;
    write_adapter(&outcome.early.object, &args.out.join("early"))?;
    let report = peftdb::engine::TrainReport::new(
        &task.name,
        &cfg,
        &outcome,
        train_ex.len(),
        started.elapsed().as_secs_f64(),
        args.engine.max_len,
        args.engine.matmul,
        &args.out,
    );
    std::fs::write(
        args.out.join("train_report.json"),
        serde_json::to_vec_pretty(&report)?,
    )
    .with_context(|| format!("{}", args.out.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let fmt = |a: Option<f64>| a.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        println!(
            "{} on {}: {} steps; best (step {}) dev {:.4} test {}; early (step {}) dev {:.4} test {}",
            outcome.best.object.method.kind(),
            task.name,
            outcome.steps,
            outcome.best.step,
            outcome.best.dev_accuracy,
            fmt(outcome.best.test_accuracy),
            outcome.early.step,
            outcome.early.dev_accuracy,
            fmt(outcome.early.test_accuracy),
        );
        println!(
            "wrote {}/best and {}/early",
            args.out.display(),
            args.out.display()
        );
    }
    Ok(())
}
