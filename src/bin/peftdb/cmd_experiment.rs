//! `peftdb experiment`: the replication harness (run or resume; write the report).

use anyhow::Context;
use peftdb::engine::{parse_device, Engine, EngineOptions};
use peftdb::experiment::write_report;
use peftdb::experiment::{run, ExperimentConfig, ExperimentEvent, RunOptions};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ExperimentCmd {
    /// Run (or resume) an experiment: zoo, transfer gains, PEWE; every finished run is appended to
    /// OUT/results.jsonl, so an interrupted run resumes where it stopped.
    Run(RunArgs),
    /// Write the markdown report, CSVs and PNG plots of an experiment's results.
    Report(ReportArgs),
    /// The transfer study: ground truth (each zoo adapter on each other task's test split), the tuning
    /// grid on dev, `suggest` at its defaults on test, and LIMITED few-shot training from its answer
    /// against from scratch; resumable (OUT/results.jsonl); writes OUT/report.md.
    Transfer(TransferArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TransferArgs {
    /// The adapter zoo folder (one folder per task), ingested into OUT/zoo.peftdb.
    #[arg(long, default_value = "examples/demo-zoo")]
    pub zoo: PathBuf,
    /// Task folders (../shared/tasks beside the repository, or data/tasks from scripts/fetch-tasks.sh: the
    /// same bytes).
    #[arg(long, default_value = "../shared/tasks")]
    pub tasks: PathBuf,
    /// Output folder (results.jsonl, zoo.peftdb, report.md).
    #[arg(long, default_value = "examples/transfer")]
    pub out: PathBuf,
    /// Base model folder.
    #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
    pub model: PathBuf,
    /// Phases to run: zero, tune, scratch, final (default all); none with --report-only.
    #[arg(long, value_delimiter = ',')]
    pub phases: Option<Vec<String>>,
    /// Only rewrite the report from the results file.
    #[arg(long)]
    pub report_only: bool,
    /// Seeds of the final and scratch phases.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4")]
    pub seeds: Vec<u64>,
    /// Seeds of the tuning phase.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub tune_seeds: Vec<u64>,
    /// Targets (default: every task of the zoo).
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Maximum tokens per text.
    #[arg(long, default_value_t = 64)]
    pub max_len: usize,
    /// LIMITED training steps.
    #[arg(long, default_value_t = 32)]
    pub few_shot_steps: usize,
    /// LIMITED training keeps its starting adapter as a checkpoint (step 0), so it never ends worse on
    /// the dev shots than it began (records under their own keys; the committed studies ran without it).
    #[arg(long)]
    pub few_shot_keep_start: bool,
    /// Evaluate on the first N dev/test examples only (a quick check, not for reported numbers).
    #[arg(long)]
    pub eval_limit: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Experiment config (JSON; schema/experiment_config.schema.json).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder (results.jsonl, zoo/, scratch/).
    #[arg(long)]
    pub out: PathBuf,
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Stop after this many new runs (resume later).
    #[arg(long)]
    pub max_runs: Option<usize>,
    /// Also write the report into OUT/report when done.
    #[arg(long)]
    pub report: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// Experiment config (JSON), the one the results were produced with.
    #[arg(long)]
    pub config: PathBuf,
    /// The experiment's output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Report folder (default OUT/report).
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// Another config over the same output folder (e.g. a smaller LIMITED setting): the report ends
    /// with a section comparing the two settings' gains and predictions.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

fn report(
    cfg: &ExperimentConfig,
    out: &std::path::Path,
    dir: Option<PathBuf>,
    baseline: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| out.join("report"));
    let base = match baseline {
        Some(p) => Some((ExperimentConfig::load(p)?, p.display().to_string())),
        None => None,
    };
    let (data, files) = write_report(cfg, out, &dir, base.as_ref().map(|(c, l)| (c, l.as_str())))
        .context("writing the report")?;
    if json {
        let v = serde_json::json!({
            "report_dir": dir,
            "files": files,
            "records": data.runs_done,
            "complete_targets": data.complete_targets.len(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "report: {} ({} records; {} of {} targets complete)",
            dir.join("report.md").display(),
            data.runs_done,
            data.complete_targets.len(),
            cfg.limited.target_count(data.tasks.len())
        );
    }
    Ok(())
}

pub fn run_cmd(cmd: &ExperimentCmd, json: bool) -> anyhow::Result<u8> {
    match cmd {
        ExperimentCmd::Run(a) => {
            let cfg = ExperimentConfig::load(&a.config)?;
            let device = parse_device(&a.device)?;
            let engine = Engine::load_with(
                &a.model,
                &device,
                &EngineOptions {
                    max_len: cfg.max_len,
                    ..Default::default()
                },
            )
            .with_context(|| format!("loading the model {}", a.model.display()))?;
            let opts = RunOptions {
                max_runs: a.max_runs,
            };
            let protocol: serde_json::Map<String, serde_json::Value> =
                ["zoo", "textemb", "limited", "pewe"]
                    .iter()
                    .map(|p| (p.to_string(), cfg.protocol_hash(p).into()))
                    .collect();
            if !json {
                let list: Vec<String> = protocol
                    .iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or_default()))
                    .collect();
                eprintln!("protocol hashes: {}", list.join(", "));
            }
            let summary = run(&cfg, &engine, &a.out, &opts, &mut |ev| match ev {
                ExperimentEvent::Start { key, done, total } => {
                    if !json {
                        eprint!("[{done}/{total}] {key} ... ");
                    }
                }
                ExperimentEvent::Finished { record } => {
                    if !json {
                        let acc = record.data["test_accuracy"]
                            .as_f64()
                            .map(|a| format!(" test {:.3}", a))
                            .unwrap_or_default();
                        eprintln!("{:.1} s{acc}", record.seconds);
                    }
                }
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "total": summary.total,
                        "cached": summary.cached,
                        "ran": summary.ran,
                        "stopped": summary.stopped,
                        "protocol": protocol,
                    }))?
                );
            } else {
                println!(
                    "{} runs planned: {} already done, {} ran now{}",
                    summary.total,
                    summary.cached,
                    summary.ran,
                    if summary.stopped {
                        " (stopped at --max-runs; run again to resume)"
                    } else {
                        ""
                    }
                );
            }
            if a.report {
                report(&cfg, &a.out, None, None, json)?;
            }
            Ok(0)
        }
        ExperimentCmd::Transfer(a) => transfer_cmd(a, json),
        ExperimentCmd::Report(a) => {
            let cfg = ExperimentConfig::load(&a.config)?;
            report(
                &cfg,
                &a.out,
                a.report_dir.clone(),
                a.baseline.as_deref(),
                json,
            )?;
            Ok(0)
        }
    }
}

fn transfer_cmd(a: &TransferArgs, json: bool) -> anyhow::Result<u8> {
    use peftdb::experiment::transfer::{run as run_study, FewShot, Phase, StudyConfig, StudyEvent};
    let phases: Vec<Phase> = if a.report_only {
        Vec::new()
    } else {
        match &a.phases {
            None => Phase::ALL.to_vec(),
            Some(list) => list
                .iter()
                .map(|p| {
                    Phase::parse(p).with_context(|| {
                        format!("unknown phase {p:?}; one of zero, tune, scratch, final")
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        }
    };
    let device = parse_device(&a.device)?;
    let engine = Engine::load_with(
        &a.model,
        &device,
        &EngineOptions {
            max_len: a.max_len,
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the model {}", a.model.display()))?;
    let cfg = StudyConfig {
        zoo: a.zoo.clone(),
        tasks: a.tasks.clone(),
        out: a.out.clone(),
        seeds: a.seeds.clone(),
        tune_seeds: a.tune_seeds.clone(),
        targets: a.targets.clone().unwrap_or_default(),
        suggest: peftdb::suggest::SuggestConfig::default(),
        few_shot: FewShot {
            steps: a.few_shot_steps,
            keep_start: a.few_shot_keep_start,
            ..FewShot::default()
        },
        textemb_examples: 64,
        eval_limit: a.eval_limit,
    };
    run_study(&cfg, &engine, a.max_len, &phases, &mut |ev| {
        if json {
            return;
        }
        match ev {
            StudyEvent::Ingested { objects } => eprintln!("zoo: {objects} adapters in the store"),
            StudyEvent::Unit { key, seconds, .. } => eprintln!("{key}: {seconds:.1} s"),
        }
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"report": a.out.join("report.md")}))?
        );
    } else {
        println!("report: {}", a.out.join("report.md").display());
    }
    Ok(0)
}
