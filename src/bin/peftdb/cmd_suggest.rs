//! `peftdb suggest` (the whole pipeline) and `peftdb rerank` (the indicator stage alone).

use crate::table::render;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use peftdb::engine::ScoreOptions;
use peftdb::ensemble::MergeKind;
use peftdb::index::{IndexConfig, IndexManager};
use peftdb::object::{read_adapter, LightweightObject, MethodKind, ReadOptions};
use peftdb::query::Similarity;
use peftdb::rerank::Indicator;
use peftdb::rerank::RerankOptions;
use peftdb::store::Store;
use peftdb::suggest::{suggest, write_suggestion, SuggestConfig, SuggestEvent, SuggestInput};
use peftdb::task::Task;
use peftdb::transfer::{score_episode, Episode, Gain, Scores};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

fn bar() -> ProgressBar {
    let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix:<15} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb
}

#[derive(Args, Debug)]
pub struct SuggestArgs {
    #[command(flatten)]
    pub engine: crate::args::ModelArgs,
    #[command(flatten)]
    pub episode: crate::args::EpisodeArgs,
    /// A short-tuned adapter of the new task you already have (else one is trained for --steps).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Number of candidate tasks.
    #[arg(short = 'k', long, default_value_t = peftdb::suggest::DEFAULT_K)]
    pub k: usize,
    /// Indicator that ranks the candidates, tests them against the bare model (its per-example terms)
    /// and gives their softmax weights.
    #[arg(long, default_value = peftdb::suggest::DEFAULT_INDICATOR.as_str())]
    pub indicator: Indicator,
    /// Softmax temperature over per-example indicator scores (sums are divided by the example count).
    #[arg(long, default_value_t = peftdb::suggest::DEFAULT_TAU)]
    pub tau: f64,
    /// Method of the target and the candidates (lora, ia3, prefix, prompt, bitfit, adapter).
    #[arg(long, default_value = "lora")]
    pub method: MethodKind,
    /// How the candidates are combined: delta-cat (LoRA: the exact average of the updates B.A), delta-svd
    /// (the same, re-factored to --rank) or param (the average of the parameters).
    #[arg(long = "merge", default_value = "delta-cat")]
    pub merge: MergeKind,
    /// Target rank of delta-svd.
    #[arg(long)]
    pub rank: Option<usize>,
    /// Stage-1 similarity: tupate, centered or delta.
    #[arg(long, default_value = "delta")]
    pub similarity: Similarity,
    /// A candidate gets weight only if it beats the bare model on the examples by more than this many
    /// standard errors (paired, per-example term of the indicator); if none does, a from-scratch
    /// initialization is written and the report says so.
    #[arg(long, default_value_t = peftdb::suggest::DEFAULT_NOISE_Z)]
    pub noise_z: f64,
    /// The accuracy guard: a candidate (and the merge) also has to keep the bare model's accuracy on the
    /// (label-prior weighted) examples to get weight (`true` or `false`).
    #[arg(long, default_value_t = peftdb::suggest::DEFAULT_ACCURACY_GUARD, action = clap::ArgAction::Set)]
    pub accuracy_guard: bool,
    /// Steps of the short tune.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Base model name of the target (default: the store's, for --method).
    #[arg(long)]
    pub base_model: Option<String>,
    /// Output folder: the initialization (PEFT format) and peftdb_report.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn suggest_cmd(db: &Path, a: &SuggestArgs, json: bool) -> Result<u8> {
    peftdb::object::check_output_dir(&a.out)?;
    let similarity = a.similarity;
    let store = Store::open_for_reading(db)?;
    let pb = bar();
    pb.set_prefix("index");
    let config = IndexConfig {
        kind: Some(similarity.embedding_kind()),
        ..IndexConfig::one_shot()
    };
    let (index, _) = IndexManager::open(&store, config, &|_| {})?;
    let engine = a.engine.load()?;
    let task = Task::load(&a.episode.task)?;
    let adapter = match &a.adapter {
        Some(p) => Some(
            read_adapter(p, &ReadOptions::default())
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => None,
    };
    let cfg = SuggestConfig {
        method: a.method,
        k: a.k,
        indicator: a.indicator,
        tau: a.tau,
        merge: a.merge.mode(a.rank),
        similarity,
        shots: a.episode.shots,
        short_tune_steps: a.steps,
        seed: a.episode.seed,
        score: ScoreOptions {
            temperature: a.engine.temperature,
            ..Default::default()
        },
        noise_z: a.noise_z,
        accuracy_guard: a.accuracy_guard,
        base_model: a.base_model.clone(),
        prior: a.episode.label_prior,
    };
    let input = SuggestInput {
        store: &store,
        index: &index,
        engine: &engine,
        task: &task,
        adapter,
    };
    let result = suggest(&input, &cfg, &mut |ev| match ev {
        SuggestEvent::Stage(s) => {
            pb.set_prefix(s);
            pb.set_position(0);
            pb.set_length(1);
        }
        SuggestEvent::TrainStep { step, total } => {
            pb.set_length(total as u64);
            pb.set_position(step as u64);
        }
        SuggestEvent::Candidate { done, total } => {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        }
    });
    pb.finish_and_clear();
    let (obj, report) = result?;
    write_suggestion(&obj, &report, &a.out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    println!(
        "new task {} ({} method, {} similarity); target adapter {}",
        report.task, report.method, report.similarity, report.target
    );
    println!("space {}", report.space);
    let mut header = vec!["rank", "task", "object", "similarity", "retrieval rank"];
    let names: Vec<String> = report
        .candidates
        .first()
        .map(|c| c.scores.keys().cloned().collect())
        .unwrap_or_default();
    header.extend(names.iter().map(|s| s.as_str()));
    header.extend(["accuracy", "gain", "helps", "weight"]);
    let rows: Vec<Vec<String>> = report
        .candidates
        .iter()
        .map(|c| {
            let mut r = vec![
                c.rank.to_string(),
                c.task.clone(),
                c.object.to_string(),
                format!("{:.4}", c.similarity),
                c.retrieval_rank.to_string(),
            ];
            r.extend(names.iter().map(|n| format!("{:.4}", c.scores[n])));
            r.push(format!("{:.3}", c.accuracy));
            r.push(format!("{:+.3}+-{:.3}", c.gain, c.gain_se));
            r.push(if c.helps { "yes" } else { "no" }.to_string());
            r.push(format!("{:.4}", c.weight));
            r
        })
        .collect();
    print!("{}", render(&header, &rows));
    println!(
        "bare model on the {} scoring examples: accuracy {:.3}, loss {:.4} (candidates ranked by {}; gain: its mean per-example term minus the bare model's, +- its paired SE)",
        report.examples, report.bare.accuracy, report.bare.loss, report.indicator
    );
    println!(
        "helps: gain > 0 and beyond {} SE{}",
        report.noise_z,
        if report.accuracy_guard {
            ", and accuracy not below the bare model's (the accuracy guard)"
        } else {
            ""
        }
    );
    for n in &report.notes {
        println!("note: {n}");
    }
    let t: Vec<String> = report
        .timings
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}s"))
        .collect();
    println!("timings: {}", t.join(", "));
    let what = match report.decision {
        peftdb::suggest::Decision::Ensemble => format!(
            "{} merge of {} helping candidate(s) weighted by {}, tau {}",
            report.merge,
            report.candidates.iter().filter(|c| c.weight > 0.0).count(),
            report.indicator,
            report.tau
        ),
        peftdb::suggest::Decision::BestSingle => format!(
            "the best single candidate, {}",
            report
                .candidates
                .iter()
                .find(|c| c.weight > 0.0)
                .map(|c| c.task.as_str())
                .unwrap_or("-")
        ),
        peftdb::suggest::Decision::Scratch => {
            "a from-scratch initialization: no candidate helps".to_string()
        }
    };
    println!("wrote the initialization ({what}) to {}", a.out.display());
    Ok(0)
}

#[derive(Args, Debug)]
pub struct RerankArgs {
    #[command(flatten)]
    pub engine: crate::args::ModelArgs,
    #[command(flatten)]
    pub episode: crate::args::EpisodeArgs,
    /// Candidate objects (ids in --db).
    #[arg(long = "object", value_delimiter = ',')]
    pub objects: Vec<u64>,
    /// Candidate adapter folders.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Indicators to compute (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "loss-cal,loss,el2n,cos-logits"
    )]
    pub indicator: Vec<Indicator>,
    /// Reference adapter (a fresh adapter briefly trained on the new task), for kl and weight-cosine.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Training steps for euclidean / performance.
    #[arg(long, default_value_t = 10)]
    pub m_steps: usize,
}

pub fn rerank_cmd(db: &Path, a: &RerankArgs, json: bool) -> Result<u8> {
    let mut cands: Vec<(String, LightweightObject)> = Vec::new();
    if !a.objects.is_empty() {
        let store = Store::open_for_reading(db)?;
        for id in &a.objects {
            let (rec, o) = store.get(*id)?;
            cands.push((format!("object {id} ({})", rec.task), o));
        }
    }
    for p in &a.adapters {
        cands.push((
            p.display().to_string(),
            read_adapter(p, &ReadOptions::default())
                .with_context(|| format!("reading {}", p.display()))?,
        ));
    }
    if cands.is_empty() {
        bail!("no candidates: give --object IDS and/or --adapter DIR");
    }
    let reference = match &a.reference {
        Some(p) => Some(
            read_adapter(p, &ReadOptions::default())
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => None,
    };
    let engine = a.engine.load()?;
    let task = Task::load(&a.episode.task)?;
    // The pipeline's episode: the same examples `suggest --shots N --seed S` scores candidates on.
    let episode = Episode::sample(&task, a.episode.shots, a.episode.seed)?;
    let opts = RerankOptions {
        indicators: a.indicator.clone(),
        score: ScoreOptions {
            temperature: a.engine.temperature,
            ..Default::default()
        },
        m_steps: a.m_steps,
        seed: a.episode.seed,
        ..Default::default()
    };
    let pb = bar();
    pb.set_prefix("rerank");
    let refs: Vec<&LightweightObject> = cands.iter().map(|(_, o)| o).collect();
    let scored = score_episode(
        &engine,
        &task,
        &episode,
        reference.as_ref(),
        &refs,
        &opts,
        a.episode.label_prior,
        &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    );
    pb.finish_and_clear();
    let Scores {
        examples,
        bare,
        candidates: scores,
    } = scored?;
    // Gains in the units of the first requested indicator that has per-example terms (else Loss).
    let basis = a
        .indicator
        .iter()
        .copied()
        .find(|i| bare.per_example.series(*i).is_some())
        .unwrap_or(Indicator::Loss);
    let gains: Vec<Gain> = scores.iter().map(|s| Gain::of(s, &bare, basis)).collect();
    if json {
        let v: Vec<_> = cands.iter().zip(&scores).zip(&gains).map(|(((n, _), s), g)| serde_json::json!({"candidate": n, "scores": s.scores, "accuracy": s.accuracy, "cross_entropy": s.cross_entropy, "gain": g.mean, "gain_se": g.se, "seconds": s.seconds})).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "examples": examples,
                "bare": {"accuracy": bare.accuracy, "cross_entropy": bare.cross_entropy},
                "candidates": v,
            }))?
        );
        return Ok(0);
    }
    let names: Vec<&str> = a.indicator.iter().map(|i| i.as_str()).collect();
    let mut header = vec!["candidate"];
    header.extend(names.iter());
    header.extend(["accuracy", "gain", "seconds"]);
    let rows: Vec<Vec<String>> = cands
        .iter()
        .zip(&scores)
        .zip(&gains)
        .map(|(((n, _), s), g)| {
            let mut r = vec![n.clone()];
            r.extend(names.iter().map(|k| format!("{:.4}", s.scores[*k])));
            r.push(format!("{:.3}", s.accuracy));
            r.push(format!("{:+.3}+-{:.3}", g.mean, g.se));
            r.push(format!("{:.2}", s.seconds));
            r
        })
        .collect();
    print!("{}", render(&header, &rows));
    println!(
        "bare model: accuracy {:.3}, loss {:.4}; {} examples of {} ({} train + {} dev shots per class, seed {}); gain = mean per-example {} term minus the bare model's, +- paired SE",
        bare.accuracy,
        bare.cross_entropy,
        examples,
        task.name,
        a.episode.shots,
        a.episode.shots,
        a.episode.seed,
        basis.as_str()
    );
    Ok(0)
}
