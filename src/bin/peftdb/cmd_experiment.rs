//! `peftdb experiment`: the replication harness (run or resume; write the report).

use anyhow::Context;
use peftdb::engine::{parse_device, Engine, EngineOptions};
use peftdb::experiment::report::write_report;
use peftdb::experiment::{run, ExperimentConfig, ExperimentEvent, RunOptions};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ExperimentCmd {
    /// Run (or resume) an experiment: zoo, transfer gains, PEWE; every finished run is appended to
    /// OUT/results.jsonl, so an interrupted run resumes where it stopped.
    Run(RunArgs),
    /// Write the markdown report, CSVs and PNG plots of an experiment's results.
    Report(ReportArgs),
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
