//! The experiment's report: `report.md` with every table, a CSV of every number, and PNG plots.
//!
//! Everything is recomputed from the results file and the zoo folders, so the report of a run cut short
//! shows what finished (and says how much that is).

use super::compare;
use super::metrics::{mean_sd, median, ndcg, rho};
use super::plot;
use super::predict::{predictions, Predictions};
use super::records::{IndicatorsData, LimitedData, ZooData};
use super::results::ResultsFile;
use super::{load_tasks, ExperimentConfig, ExperimentError};
use crate::task::Task;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Mean, spread and count of one quantity over seeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl Cell {
    pub(crate) fn of(xs: &[f64]) -> Option<Cell> {
        mean_sd(xs).map(|(mean, sd)| Cell {
            mean,
            sd,
            n: xs.len(),
        })
    }
    /// Standard error of the mean.
    pub fn se(&self) -> f64 {
        self.sd / (self.n.max(1) as f64).sqrt()
    }
    /// A *clear* gain: mean - 2 SE > 0, with an SE from at least 2 values.
    pub fn clear_gain(&self) -> bool {
        self.n > 1 && self.mean - 2.0 * self.se() > 0.0
    }
    /// A *clear* loss: mean + 2 SE < 0, with an SE from at least 2 values.
    pub fn clear_loss(&self) -> bool {
        self.n > 1 && self.mean + 2.0 * self.se() < 0.0
    }
}

/// The best source of a target picked on some seeds and measured on the others: what picking the best
/// source is worth, free of the upward bias (winner's curse) of the best of many noisy means measured
/// on the seeds that picked it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOut {
    /// Index of the picked source among the sources given.
    pub source: usize,
    /// Its gain over the selection seeds.
    pub selected: Cell,
    /// Its gain over the held-out seeds.
    pub held_out: Cell,
}

/// The item with the highest mean (the first of equal ones); `None` for no items.
pub fn best_by_mean<K>(items: impl IntoIterator<Item = (K, Cell)>) -> Option<(K, Cell)> {
    items.into_iter().fold(None, |best, (k, c)| match best {
        Some((_, b)) if c.mean <= b.mean => best,
        _ => Some((k, c)),
    })
}

/// The held-out check's split of `seeds`: selection seeds (the first half, rounded down) and held-out
/// seeds (the rest).
pub fn split_seeds(seeds: &[u64]) -> (&[u64], &[u64]) {
    seeds.split_at(seeds.len() / 2)
}

/// Split `seeds` with [`split_seeds`], pick the source with the highest mean gain over the selection
/// seeds (`gain(source, seed)`, `None` when not measured; a source unmeasured on any selection seed is
/// not a candidate) and measure its gain on the held-out seeds it has. `None` with fewer than 2 seeds
/// or no candidate with a held-out value.
pub fn held_out_best(
    n_sources: usize,
    seeds: &[u64],
    gain: impl Fn(usize, u64) -> Option<f64>,
) -> Option<HeldOut> {
    let (select, rest) = split_seeds(seeds);
    if select.is_empty() {
        return None;
    }
    let candidates = (0..n_sources).filter_map(|s| {
        let g: Vec<f64> = select.iter().map(|&k| gain(s, k)).collect::<Option<_>>()?;
        Some((s, Cell::of(&g)?))
    });
    let (source, selected) = best_by_mean(candidates)?;
    let h: Vec<f64> = rest.iter().filter_map(|&k| gain(source, k)).collect();
    Some(HeldOut {
        source,
        selected,
        held_out: Cell::of(&h)?,
    })
}

/// One predictor's results.
#[derive(Debug, Clone)]
pub struct PredictorResult {
    pub name: String,
    pub rho: Cell,
    pub ndcg: Cell,
    /// Per target: (target, rho, ndcg).
    pub per_target: Vec<(String, f64, Option<f64>)>,
}

/// Everything the report shows, as numbers.
#[derive(Debug, Clone, Default)]
pub struct ReportData {
    pub tasks: Vec<String>,
    pub seeds: Vec<u64>,
    /// Test accuracy of limited runs: (target, init label, seed) -> accuracy.
    pub limited: BTreeMap<(String, String, u64), f64>,
    /// gains\[target\]\[source\] over seeds (paired with scratch of the same seed); None on the diagonal or
    /// when missing.
    pub gains: Vec<Vec<Option<Cell>>>,
    pub scratch: Vec<Option<Cell>>,
    /// Per target: the best source picked on the first half of the seeds, its gain measured on the
    /// other half (`None` with fewer than 2 seeds or a source unmeasured on a selection seed).
    pub held_out: Vec<Option<HeldOut>>,
    /// Targets with a gain for every source.
    pub complete_targets: Vec<usize>,
    pub predictors: Vec<PredictorResult>,
    /// Init method -> (per-seed means over targets, paired differences to scratch over (target, seed)).
    pub pewe: Vec<(String, Cell, Cell)>,
    /// (seed, targets with every initialization measured) behind the PEWE table.
    pub pewe_targets: Vec<(u64, usize)>,
    pub runs_done: usize,
}

fn is_pewe_init(init: &str) -> bool {
    init == "average" || init == "manual" || init.starts_with("ensemble:")
}

/// Gather the numbers of the report.
pub fn gather(
    cfg: &ExperimentConfig,
    tasks: &[Task],
    results: &ResultsFile,
    preds: &Predictions,
) -> Result<ReportData, ExperimentError> {
    let names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
    let n = names.len();
    let (lim_p, pewe_p) = (cfg.protocol_hash("limited"), cfg.protocol_hash("pewe"));
    let mut limited = BTreeMap::new();
    let mut indicators: BTreeMap<(String, u64), IndicatorsData> = BTreeMap::new();
    let mut runs_done = 0;
    for r in results.records() {
        let current = match r.phase.as_str() {
            "limited" if is_pewe_init(&r.init) => r.protocol == pewe_p,
            "limited" => r.protocol == lim_p,
            "indicators" => r.protocol == pewe_p,
            "zoo" => r.protocol == cfg.protocol_hash("zoo"),
            "textemb" => r.protocol == cfg.protocol_hash("textemb"),
            _ => false,
        };
        // Runs of a target are reported only when the config names it a target (records of other
        // targets, e.g. from a config with a longer `limited.targets`, are left to that config's report).
        let seeded = matches!(r.phase.as_str(), "limited" | "indicators");
        if !current
            || !names.contains(&r.task)
            || (seeded && !(cfg.limited.seeds.contains(&r.seed) && cfg.limited.is_target(&r.task)))
        {
            continue;
        }
        runs_done += 1;
        if r.phase == "limited" {
            if let Some(a) = r.data_as::<LimitedData>()?.test_accuracy {
                limited.insert((r.task.clone(), r.init.clone(), r.seed), a);
            }
        } else if r.phase == "indicators" {
            indicators.insert((r.task.clone(), r.seed), r.data_as()?);
        }
    }
    let seeds = cfg.limited.seeds.clone();
    let acc =
        |t: &str, init: &str, seed: u64| limited.get(&(t.to_string(), init.to_string(), seed));
    // Gain of source `s` on target `t` in one seed, paired with scratch of the same seed.
    let gain_at = |t: usize, s: usize, seed: u64| {
        let a = acc(&names[t], &format!("source:{}", names[s]), seed)?;
        Some(a - acc(&names[t], "scratch", seed)?)
    };
    let mut gains = vec![vec![None; n]; n];
    let mut scratch = vec![None; n];
    for t in 0..n {
        let sc: Vec<f64> = seeds
            .iter()
            .filter_map(|&s| acc(&names[t], "scratch", s).copied())
            .collect();
        scratch[t] = Cell::of(&sc);
        for s in (0..n).filter(|&s| s != t) {
            let d: Vec<f64> = seeds
                .iter()
                .filter_map(|&seed| gain_at(t, s, seed))
                .collect();
            gains[t][s] = Cell::of(&d);
        }
    }
    let held_out: Vec<Option<HeldOut>> = (0..n)
        .map(|t| {
            let sources: Vec<usize> = (0..n).filter(|&s| s != t).collect();
            let h = held_out_best(sources.len(), &seeds, |i, seed| {
                gain_at(t, sources[i], seed)
            })?;
            Some(HeldOut {
                source: sources[h.source],
                ..h
            })
        })
        .collect();
    let complete_targets: Vec<usize> = (0..n)
        .filter(|&t| (0..n).all(|s| s == t || gains[t][s].is_some()))
        .collect();

    // Prediction quality. The true gains of target t's sources, in source order.
    let gain_row = |t: usize| -> Vec<f64> {
        (0..n)
            .filter(|&s| s != t)
            .map(|s| gains[t][s].map(|c| c.mean).unwrap_or(0.0))
            .collect()
    };
    let mut predictors = Vec::new();
    let eval = |row_scores: &dyn Fn(usize) -> Vec<f64>| {
        let mut rhos = Vec::new();
        let mut ndcgs = Vec::new();
        let mut per = Vec::new();
        for &t in &complete_targets {
            let g = gain_row(t);
            let sc = row_scores(t);
            if sc.iter().any(|x| !x.is_finite()) {
                continue;
            }
            let r = rho(&sc, &g).unwrap_or(f64::NAN);
            let nd = ndcg(&sc, &g);
            rhos.push(r);
            if let Some(x) = nd {
                ndcgs.push(x);
            }
            per.push((names[t].clone(), r, nd));
        }
        (Cell::of(&rhos), Cell::of(&ndcgs), per)
    };
    for (name, m) in preds {
        let (r, nd, per) = eval(&|t| (0..n).filter(|&s| s != t).map(|s| m[t][s]).collect());
        if let (Some(rho), Some(ndcg)) = (r, nd) {
            predictors.push(PredictorResult {
                name: name.clone(),
                rho,
                ndcg,
                per_target: per,
            });
        }
    }
    // Random: the expectation over seeded permutations (per target), then over targets.
    {
        let mut rng = ChaCha8Rng::seed_from_u64(2024);
        let perms = 2000;
        let mut rhos = Vec::new();
        let mut ndcgs = Vec::new();
        let mut per = Vec::new();
        for &t in &complete_targets {
            let g = gain_row(t);
            let mut rs = Vec::new();
            let mut ns = Vec::new();
            let mut sc: Vec<f64> = (0..g.len()).map(|i| i as f64).collect();
            for _ in 0..perms {
                sc.shuffle(&mut rng);
                rs.push(rho(&sc, &g).unwrap_or(f64::NAN));
                if let Some(x) = ndcg(&sc, &g) {
                    ns.push(x);
                }
            }
            let r = mean_sd(&rs).map(|c| c.0).unwrap_or(f64::NAN);
            let nd = mean_sd(&ns).map(|c| c.0);
            rhos.push(r);
            if let Some(x) = nd {
                ndcgs.push(x);
            }
            per.push((names[t].clone(), r, nd));
        }
        if let (Some(rho), Some(ndcg)) = (Cell::of(&rhos), Cell::of(&ndcgs)) {
            predictors.push(PredictorResult {
                name: "random".into(),
                rho,
                ndcg,
                per_target: per,
            });
        }
    }

    // PEWE: initialization methods.
    let mut inits: Vec<String> = vec!["scratch".into(), "average".into(), "manual".into()];
    for ind in &cfg.pewe.indicators {
        inits.push(format!("best-single:{}", ind.as_str()));
        inits.push(format!("ensemble:{}", ind.as_str()));
    }
    let value = |t: usize, init: &str, seed: u64| -> Option<f64> {
        if let Some(ind) = init.strip_prefix("best-single:") {
            let rec = indicators.get(&(names[t].clone(), seed))?;
            let scores = rec.scores.get(ind)?;
            let sources = &rec.sources;
            let best = super::metrics::predicted_order(scores).first().copied()?;
            acc(&names[t], &format!("source:{}", sources.get(best)?), seed).copied()
        } else {
            acc(&names[t], init, seed).copied()
        }
    };
    // Per seed, the targets with every initialization measured; means and paired differences over those.
    let mut pewe = Vec::new();
    let mut pewe_targets = Vec::new();
    if cfg.pewe.enabled {
        let complete: Vec<(u64, Vec<usize>)> = seeds
            .iter()
            .map(|&seed| {
                let ts = (0..n)
                    .filter(|&t| inits.iter().all(|i| value(t, i, seed).is_some()))
                    .collect::<Vec<_>>();
                (seed, ts)
            })
            .collect();
        for (seed, ts) in &complete {
            if !ts.is_empty() {
                pewe_targets.push((*seed, ts.len()));
            }
        }
        for init in &inits {
            let mut per_seed = Vec::new();
            let mut diffs = Vec::new();
            for (seed, ts) in &complete {
                if ts.is_empty() {
                    continue;
                }
                let vals: Vec<f64> = ts.iter().filter_map(|&t| value(t, init, *seed)).collect();
                per_seed.push(vals.iter().sum::<f64>() / vals.len() as f64);
                for &t in ts {
                    if let (Some(a), Some(b)) = (value(t, init, *seed), value(t, "scratch", *seed))
                    {
                        diffs.push(a - b);
                    }
                }
            }
            if let (Some(a), Some(d)) = (Cell::of(&per_seed), Cell::of(&diffs)) {
                pewe.push((init.clone(), a, d));
            }
        }
    }
    Ok(ReportData {
        tasks: names,
        seeds,
        limited,
        gains,
        scratch,
        held_out,
        complete_targets,
        predictors,
        pewe,
        pewe_targets,
        runs_done,
    })
}

/// The smallest number of seeds n with mean - 2 sd / sqrt(n) > 0, were the mean and sd to stay as
/// measured; `None` for a gain that is not positive or an sd from fewer than 2 seeds.
pub fn seeds_to_be_clear(c: &Cell) -> Option<usize> {
    // Below 1e-9 (a billionth of a point) a mean is a rounding residue of equal accuracies, not a gain.
    if c.mean <= 1e-9 || c.n < 2 {
        return None;
    }
    let n = (2.0 * c.sd / c.mean).powi(2);
    Some((n.min(1e9).floor() as usize).saturating_add(1).max(2))
}

/// Section 2's held-out check: each target's best source picked on the first half of the seeds and
/// measured on the rest (markdown table and `held_out.csv`).
fn write_held_out(
    md: &mut String,
    data: &ReportData,
    dir: &Path,
    files: &mut Vec<PathBuf>,
) -> Result<(), ExperimentError> {
    let names = &data.tasks;
    let list = |s: &[u64]| {
        s.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (select, rest) = split_seeds(&data.seeds);
    let (select, rest) = (list(select), list(rest));
    let rows: Vec<(usize, HeldOut)> = data
        .held_out
        .iter()
        .enumerate()
        .filter_map(|(t, h)| Some((t, (*h)?)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let mut csv = String::from(
        "target,source,selected_gain_mean,selected_gain_sd,selected_seeds,held_out_gain_mean,held_out_gain_sd,held_out_seeds\n",
    );
    let _ = writeln!(
        md,
        "**Held-out check.** The best source of a target is the highest of 13 noisy means, biased upward \
         (winner's curse). Here it is picked on seeds {select} and its gain measured on seeds {rest}, \
         which did not pick it: an unbiased estimate of what picking the best source is worth.\n"
    );
    let _ = writeln!(
        md,
        "| target | picked on seeds {select} | gain there | gain on seeds {rest} | sd | clear |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---|");
    for (t, h) in &rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:+.1} | {:+.1} | {} | {} |",
            names[*t],
            names[h.source],
            100.0 * h.selected.mean,
            100.0 * h.held_out.mean,
            pct(h.held_out.sd),
            if h.held_out.clear_gain() {
                "gain"
            } else if h.held_out.clear_loss() {
                "loss"
            } else {
                "no"
            }
        );
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{}",
            names[*t],
            names[h.source],
            h.selected.mean,
            h.selected.sd,
            h.selected.n,
            h.held_out.mean,
            h.held_out.sd,
            h.held_out.n
        );
    }
    let sel: Vec<f64> = rows.iter().map(|(_, h)| h.selected.mean).collect();
    let held: Vec<f64> = rows.iter().map(|(_, h)| h.held_out.mean).collect();
    let fmt = |c: Option<Cell>| {
        c.map(|c| format!("{:+.1} +- {:.1}", 100.0 * c.mean, 100.0 * c.se()))
            .unwrap_or("-".into())
    };
    let _ = writeln!(
        md,
        "\nOver {} targets (mean +- SE): the picked sources' gain {} points on the seeds that picked them, \
         {} on the held-out seeds; clear on the held-out seeds: {} gains, {} losses.\n",
        rows.len(),
        fmt(Cell::of(&sel)),
        fmt(Cell::of(&held)),
        rows.iter().filter(|(_, h)| h.held_out.clear_gain()).count(),
        rows.iter().filter(|(_, h)| h.held_out.clear_loss()).count()
    );
    let p = dir.join("held_out.csv");
    write(&p, &csv)?;
    files.push(p);
    Ok(())
}

/// A fraction as accuracy points with one decimal; `-` for a value not measured (NaN).
pub(crate) fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "-".into()
    }
}

fn write(path: &Path, text: &str) -> Result<(), ExperimentError> {
    std::fs::write(path, text).map_err(|source| ExperimentError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Write the report into `dir` (created): report.md, *.csv and *.png. Returns the files written.
///
/// With a `baseline` (another config over the same output folder, and a label naming it), the report
/// ends with a section comparing the two LIMITED settings ([`super::compare`]), `comparison.csv` and
/// `gains_vs_baseline.png`.
pub fn write_report(
    cfg: &ExperimentConfig,
    out: &Path,
    dir: &Path,
    baseline: Option<(&ExperimentConfig, &str)>,
) -> Result<(ReportData, Vec<PathBuf>), ExperimentError> {
    std::fs::create_dir_all(dir).map_err(|source| ExperimentError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tasks = load_tasks(cfg)?;
    let results = ResultsFile::open(&out.join("results.jsonl"))?;
    let preds = predictions(cfg, out, &tasks, &results)?;
    let data = gather(cfg, &tasks, &results, &preds)?;
    let names = &data.tasks;
    let n = names.len();
    let mut files = Vec::new();
    let mut md = String::new();
    let l = &cfg.limited;
    let z = &cfg.zoo;
    let n_targets = l.target_count(n);
    let expected_limited = l.seeds.len() * n_targets * n;
    let have_limited = data
        .limited
        .keys()
        .filter(|(_, i, _)| i == "scratch" || i.starts_with("source:"))
        .count();
    let _ = writeln!(md, "# peftdb replication report\n");
    let _ = writeln!(
        md,
        "Base model: the engine's model folder; {} tasks from `{}`; {} result records of the current \
         protocol. Transfer runs finished: {have_limited} of {expected_limited} ({} seeds x {n_targets} \
         targets x (scratch + {} sources)). Targets with every source measured: {} of {n_targets}.\n",
        n,
        cfg.tasks_dir.display(),
        data.runs_done,
        l.seeds.len(),
        n.saturating_sub(1),
        data.complete_targets.len()
    );
    let _ = writeln!(md, "## Settings\n");
    let _ = writeln!(
        md,
        "- Texts truncated to {} tokens; label scoring cosine / {} (head-free).",
        cfg.max_len, cfg.temperature
    );
    let _ = writeln!(
        md,
        "- **Zoo**: methods {}; LoRA r={} alpha={} on query,value; prefix {} tokens; bottleneck {}; {} steps of \
         batch {} on the first {} training examples, dev ({} examples) every {} steps; early = first \
         evaluation, best = highest dev accuracy; test on {} examples; seed {}.",
        z.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", "),
        z.lora_r,
        z.lora_alpha,
        z.prefix_len,
        z.bottleneck,
        z.steps,
        z.batch_size,
        z.train_cap.map(|c| c.to_string()).unwrap_or_else(|| "all".into()),
        z.dev_cap,
        z.eval_every,
        z.test_cap,
        z.seed
    );
    let _ = writeln!(
        md,
        "- **LIMITED target setting**: {} adapters, {} training and {} dev examples per class (seeded per \
         seed), {} steps of batch {}, learning rate {}; source = the zoo's `{}` checkpoint; test accuracy \
         on a fixed subset of {} test examples after the last step; seeds {:?}. Gain = test accuracy \
         from the source minus from scratch with the same seed (same examples), averaged over seeds.",
        l.method,
        l.shots,
        l.dev_shots,
        l.steps,
        l.batch_size,
        l.lr.map(|x| x.to_string()).unwrap_or_else(|| "the method's default".into()),
        l.checkpoint,
        l.test_cap,
        l.seeds
    );
    if cfg.pewe.enabled {
        let _ = writeln!(
            md,
            "- **PEWE**: indicators {} on the first {} few-shot training examples, scaled per example; \
             weights softmax(S/tau), tau = {}; KL against the scratch adapter of the same seed; the \
             ensemble is then trained exactly like a LIMITED run.",
            cfg.pewe
                .indicators
                .iter()
                .map(|i| i.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            cfg.pewe.indicator_examples,
            cfg.pewe.tau
        );
    }
    let _ = writeln!(md);

    // Zoo table.
    let zoo_p = cfg.protocol_hash("zoo");
    let mut zoo_csv =
        String::from("task,group,train_size,method,checkpoint,step,dev_accuracy,test_accuracy\n");
    let _ = writeln!(md, "## 1. The zoo\n");
    let mut header = String::from("| task | group | train | ");
    let mut sep = String::from("|---|---|---:|");
    for m in &z.methods {
        let _ = write!(header, "{m} early | {m} best | ");
        sep.push_str("---:|---:|");
    }
    let _ = writeln!(
        md,
        "Test accuracy (%) of each zoo adapter; majority-class rate for reference.\n"
    );
    let _ = writeln!(md, "{header}majority |");
    let _ = writeln!(md, "{sep}---:|");
    for t in &tasks {
        let mut row = format!(
            "| {} | {} | {} | ",
            t.name,
            t.group.clone().unwrap_or_default(),
            t.train.len()
        );
        for m in &z.methods {
            let rec = results.records().find(|r| {
                r.phase == "zoo" && r.task == t.name && r.init == m.as_str() && r.protocol == zoo_p
            });
            let zoo: Option<ZooData> = rec.map(|r| r.data_as()).transpose()?;
            for ck in ["early", "best"] {
                match &zoo {
                    Some(z) => {
                        let c = if ck == "early" { &z.early } else { &z.best };
                        // Numbers as the JSON spells them (the CSV's format since the first report).
                        let num = |x: Option<f64>| serde_json::Value::from(x);
                        let _ =
                            write!(row, "{} | ", c.test_accuracy.map(pct).unwrap_or("-".into()));
                        let _ = writeln!(
                            zoo_csv,
                            "{},{},{},{},{},{},{},{}",
                            t.name,
                            t.group.clone().unwrap_or_default(),
                            t.train.len(),
                            m,
                            ck,
                            c.step,
                            num(Some(c.dev_accuracy)),
                            num(c.test_accuracy)
                        );
                    }
                    None => row.push_str("- | "),
                }
            }
        }
        let _ = writeln!(
            md,
            "{row}{} |",
            pct(t.majority_rate(crate::task::Split::Test))
        );
    }
    let p = dir.join("zoo.csv");
    write(&p, &zoo_csv)?;
    files.push(p);

    // Transfer gains.
    let _ = writeln!(md, "\n## 2. Transfer gains (LIMITED)\n");
    let mut runs_csv = String::from("target,init,seed,test_accuracy\n");
    for ((t, i, s), a) in &data.limited {
        let _ = writeln!(runs_csv, "{t},{i},{s},{a}");
    }
    let p = dir.join("limited_runs.csv");
    write(&p, &runs_csv)?;
    files.push(p);
    let mut gains_csv = String::from("target,source,gain_mean,gain_sd,seeds\n");
    for t in 0..n {
        for s in 0..n {
            if let Some(c) = data.gains[t][s] {
                let _ = writeln!(
                    gains_csv,
                    "{},{},{},{},{}",
                    names[t], names[s], c.mean, c.sd, c.n
                );
            }
        }
    }
    let p = dir.join("gains.csv");
    write(&p, &gains_csv)?;
    files.push(p);
    let _ = writeln!(
        md,
        "From-scratch test accuracy and the best source per target (gains in accuracy points, mean +- sd \
         over seeds; a gain is *clear* when mean - 2 SE > 0).\n"
    );
    let _ = writeln!(
        md,
        "| target | scratch | scratch sd | best source | gain | gain sd | clear | seeds to be clear | sources with clear gain | with clear loss |"
    );
    let _ = writeln!(md, "|---|---:|---:|---|---:|---:|---|---:|---:|---:|");
    let mut gain_sds = Vec::new();
    let mut clear_pos = 0;
    let mut clear_neg = 0;
    let mut measured = 0;
    for t in 0..n {
        let Some(sc) = data.scratch[t] else { continue };
        let (mut pos, mut neg) = (0, 0);
        for s in (0..n).filter(|&s| s != t) {
            if let Some(c) = data.gains[t][s] {
                measured += 1;
                if c.n > 1 {
                    gain_sds.push(c.sd);
                    if c.clear_gain() {
                        pos += 1;
                    }
                    if c.clear_loss() {
                        neg += 1;
                    }
                }
            }
        }
        clear_pos += pos;
        clear_neg += neg;
        let best = best_by_mean(
            (0..n)
                .filter(|&s| s != t)
                .filter_map(|s| Some((s, data.gains[t][s]?))),
        );
        if let Some((s, c)) = best {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:+.1} | {} | {} | {} | {pos} | {neg} |",
                names[t],
                pct(sc.mean),
                pct(sc.sd),
                names[s],
                100.0 * c.mean,
                pct(c.sd),
                if c.clear_gain() { "yes" } else { "no" },
                seeds_to_be_clear(&c)
                    .map(|k| k.to_string())
                    .unwrap_or("-".into())
            );
        }
    }
    let _ = writeln!(
        md,
        "\n*Seeds to be clear*: how many seeds would make the best gain clear if its mean and sd stayed \
         as measured, the smallest n with 2 sd / sqrt(n) < mean (`-`: not a gain, or sd not measured)."
    );
    let med = median(&gain_sds);
    let _ = writeln!(
        md,
        "\nSpread: median seed-to-seed sd of a gain {} points; of {measured} measured pairs, {clear_pos} \
         have a clear gain and {clear_neg} a clear loss (mean +- 2 SE excludes 0).\n",
        med.map(pct).unwrap_or("-".into())
    );
    write_held_out(&mut md, &data, dir, &mut files)?;
    let heat = dir.join("gains_heatmap.png");
    let values: Vec<Vec<f64>> = (0..n)
        .map(|t| {
            (0..n)
                .map(|s| data.gains[t][s].map(|c| 100.0 * c.mean).unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    plot::heatmap(
        &heat,
        "Transfer gain (accuracy points): rows = target, columns = source",
        names,
        names,
        &values,
        &|v| format!("{v:+.1}"),
    )
    .map_err(ExperimentError::Report)?;
    files.push(heat);
    let _ = writeln!(md, "![gains](gains_heatmap.png)\n");

    // Prediction.
    let _ = writeln!(md, "## 3. Predicting the best source (rho, NDCG)\n");
    let _ = writeln!(
        md,
        "Over the {} targets with every source measured. rho: rank of the truly best source in the \
         predicted order (1 best; the `random` row is its expectation, below (sources + 1) / 2 when \
         several sources tie for the best gain); NDCG in % with gains shifted to be non-negative. Mean \
         +- SE over targets.\n",
        data.complete_targets.len(),
    );
    let mut sorted = data.predictors.clone();
    sorted.sort_by(|a, b| b.ndcg.mean.total_cmp(&a.ndcg.mean));
    let random = sorted.iter().find(|p| p.name == "random").cloned();
    let _ = writeln!(
        md,
        "| predictor | rho | NDCG | NDCG - random (paired, +- SE) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let mut pred_csv = String::from("predictor,target,rho,ndcg\n");
    let mut sum_csv = String::from("predictor,rho_mean,rho_se,ndcg_mean,ndcg_se,targets\n");
    for p in &sorted {
        let vs = random.as_ref().and_then(|r| {
            // Paired by target (a predictor may lack some targets).
            let d: Vec<f64> = p
                .per_target
                .iter()
                .filter_map(|a| {
                    let b = r.per_target.iter().find(|b| b.0 == a.0)?;
                    Some(a.2? - b.2?)
                })
                .collect();
            Cell::of(&d)
        });
        let vs_random = match (p.name.as_str(), vs) {
            ("random", _) | (_, None) => "".to_string(),
            (_, Some(c)) => {
                let star = if c.mean.abs() > 2.0 * c.se() {
                    " *"
                } else {
                    ""
                };
                format!("{:+.1} +- {:.1}{star}", c.mean, c.se())
            }
        };
        let (name, rho, ndcg) = (
            &p.name,
            [p.rho.mean, p.rho.se()],
            [p.ndcg.mean, p.ndcg.se()],
        );
        let _ = writeln!(
            md,
            "| {name} | {:.2} +- {:.2} | {:.1} +- {:.1} | {vs_random} |",
            rho[0], rho[1], ndcg[0], ndcg[1]
        );
        let _ = writeln!(
            sum_csv,
            "{name},{},{},{},{},{}",
            rho[0], rho[1], ndcg[0], ndcg[1], p.rho.n
        );
        for (t, r, nd) in &p.per_target {
            let _ = writeln!(
                pred_csv,
                "{},{t},{r},{}",
                p.name,
                nd.map(|x| x.to_string()).unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        md,
        "\n`*`: the difference to random exceeds 2 SE over targets.\n\nThe papers (BERT-base, FULL->FULL, \
         10 in-class sources): DATASIZE rho 3.6 / NDCG 80.4, TEXTEMB 5.2 / 76.4, TuPaTE+LoRA 2.7 / 83.0, \
         +BitFit 2.5 / 83.5, +prefix 2.5 / 83.7, 3 ENSEMBLE 2.3 / 83.9.\n"
    );
    for (name, text) in [
        ("prediction.csv", &pred_csv),
        ("prediction_summary.csv", &sum_csv),
    ] {
        let p = dir.join(name);
        write(&p, text)?;
        files.push(p);
    }
    if !sorted.is_empty() {
        let png = dir.join("prediction_ndcg.png");
        let bars: Vec<(String, f64, Option<f64>)> = sorted
            .iter()
            .map(|p| (p.name.clone(), p.ndcg.mean, Some(p.ndcg.se())))
            .collect();
        let lo = bars
            .iter()
            .map(|b| b.1 - b.2.unwrap_or(0.0))
            .fold(100.0f64, f64::min);
        plot::hbars(
            &png,
            "NDCG (%) of each predictor, mean +- SE over targets",
            "NDCG (%)",
            &bars,
            ((lo - 5.0).max(0.0).floor(), 100.0),
            random.as_ref().map(|r| (r.ndcg.mean, "random")),
        )
        .map_err(ExperimentError::Report)?;
        files.push(png.clone());
        let png2 = dir.join("prediction_rho.png");
        let mut by_rho = sorted.clone();
        by_rho.sort_by(|a, b| a.rho.mean.total_cmp(&b.rho.mean));
        let bars: Vec<(String, f64, Option<f64>)> = by_rho
            .iter()
            .map(|p| (p.name.clone(), p.rho.mean, Some(p.rho.se())))
            .collect();
        plot::hbars(
            &png2,
            "rho (rank of the best source; lower is better), mean +- SE over targets",
            "rho",
            &bars,
            (0.0, n as f64),
            random.as_ref().map(|r| (r.rho.mean, "random")),
        )
        .map_err(ExperimentError::Report)?;
        files.push(png2);
        let _ = writeln!(
            md,
            "![ndcg](prediction_ndcg.png)\n\n![rho](prediction_rho.png)\n"
        );
    }

    // PEWE.
    if cfg.pewe.enabled {
        let _ = writeln!(md, "## 4. Initializing a new task (PEWE, leave-one-out)\n");
        let _ = writeln!(
            md,
            "Test accuracy (%) after the same LIMITED training from each initialization: mean over the \
             targets with every initialization measured in a seed, then mean +- sd over seeds; and the \
             paired difference to From Scratch over (target, seed), +- SE (`*`: beyond 2 SE). Targets \
             per seed: {}.\n",
            data.pewe_targets
                .iter()
                .map(|(s, k)| format!("seed {s}: {k} of {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(md, "| initialization | accuracy | seeds | vs scratch |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        let mut pewe_csv =
            String::from("init,acc_mean,acc_sd_over_seeds,seeds,diff_mean,diff_se,pairs\n");
        for (init, a, d) in &data.pewe {
            let _ = writeln!(
                md,
                "| {init} | {} +- {} | {} | {:+.1} +- {:.1}{} |",
                pct(a.mean),
                pct(a.sd),
                a.n,
                100.0 * d.mean,
                100.0 * d.se(),
                if init != "scratch" && d.mean.abs() > 2.0 * d.se() {
                    " *"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                pewe_csv,
                "{init},{},{},{},{},{},{}",
                a.mean,
                a.sd,
                a.n,
                d.mean,
                d.se(),
                d.n
            );
        }
        let _ = writeln!(
            md,
            "\nThe paper (T5-base, 32 QA tasks, LoRA column): From Scratch 31.5, Average 33.8, Manual 35.4, \
             GraNd 35.4, Loss 38.7, KL 37.1, EL2N 39.1, cosine of logits and labels 39.5.\n"
        );
        let p = dir.join("pewe.csv");
        write(&p, &pewe_csv)?;
        files.push(p);
        if !data.pewe.is_empty() {
            let png = dir.join("pewe_accuracy.png");
            let bars: Vec<(String, f64, Option<f64>)> = data
                .pewe
                .iter()
                .map(|(i, a, _)| (i.clone(), 100.0 * a.mean, Some(100.0 * a.sd)))
                .collect();
            let lo = bars.iter().map(|b| b.1).fold(100.0f64, f64::min);
            let hi = bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
            plot::hbars(
                &png,
                "Test accuracy (%) per initialization, mean over targets, +- sd over seeds",
                "accuracy (%)",
                &bars,
                ((lo - 5.0).max(0.0).floor(), (hi + 5.0).min(100.0).ceil()),
                data.pewe
                    .iter()
                    .find(|p| p.0 == "scratch")
                    .map(|p| (100.0 * p.1.mean, "from scratch")),
            )
            .map_err(ExperimentError::Report)?;
            files.push(png);
            let _ = writeln!(md, "![pewe](pewe_accuracy.png)\n");
        }
    }

    // Defaults chosen from the results.
    let _ = writeln!(md, "## 5. What the results choose\n");
    let pick = |prefixes: &[&str]| {
        data.predictors
            .iter()
            .filter(|p| prefixes.iter().any(|x| p.name.starts_with(x)))
            .max_by(|a, b| a.ndcg.mean.total_cmp(&b.ndcg.mean))
    };
    if let Some(p) = pick(&["tupate:", "centered:", "delta:"]) {
        let _ = writeln!(
            md,
            "- Best single-method similarity: `{}` (NDCG {:.1}, rho {:.2}).",
            p.name, p.ndcg.mean, p.rho.mean
        );
    }
    if let Some(p) = pick(&["tupate:lora:", "centered:lora:", "delta:lora:"]) {
        let _ = writeln!(
            md,
            "- Best LoRA similarity variant: `{}` (NDCG {:.1}, rho {:.2}).",
            p.name, p.ndcg.mean, p.rho.mean
        );
    }
    if let Some((init, a, d)) = data
        .pewe
        .iter()
        .filter(|p| p.0.starts_with("ensemble:"))
        .max_by(|a, b| a.1.mean.total_cmp(&b.1.mean))
    {
        let _ = writeln!(
            md,
            "- Best indicator ensemble: `{init}` ({} %, {:+.1} +- {:.1} points vs scratch).",
            pct(a.mean),
            100.0 * d.mean,
            100.0 * d.se()
        );
    }
    if let Some((bcfg, label)) = baseline {
        let btasks = load_tasks(bcfg)?;
        let bpreds = predictions(bcfg, out, &btasks, &results)?;
        let bdata = gather(bcfg, &btasks, &results, &bpreds)?;
        let c = compare::compare(&data, &bdata);
        md.push_str(&compare::markdown(&c, label));
        let mut csv = String::from(
            "target,source,gain_mean,gain_sd,seeds,baseline_gain_mean,baseline_gain_sd,baseline_seeds\n",
        );
        let mut points = Vec::new();
        for t in &c.targets {
            let (Some(ti), Some(bti)) = (
                data.tasks.iter().position(|x| x == &t.target),
                bdata.tasks.iter().position(|x| x == &t.target),
            ) else {
                continue;
            };
            for (s, name) in data.tasks.iter().enumerate() {
                let bs = bdata.tasks.iter().position(|x| x == name);
                if let (Some(a), Some(b)) =
                    (data.gains[ti][s], bs.and_then(|bs| bdata.gains[bti][bs]))
                {
                    let _ = writeln!(
                        csv,
                        "{},{name},{},{},{},{},{},{}",
                        t.target, a.mean, a.sd, a.n, b.mean, b.sd, b.n
                    );
                    points.push((100.0 * b.mean, 100.0 * a.mean));
                }
            }
        }
        let p = dir.join("comparison.csv");
        write(&p, &csv)?;
        files.push(p);
        if !points.is_empty() {
            let png = dir.join("gains_vs_baseline.png");
            plot::scatter(
                &png,
                "Transfer gain per (target, source): baseline vs this setting",
                "gain in the baseline setting (points)",
                "gain in this setting (points)",
                &points,
            )
            .map_err(ExperimentError::Report)?;
            files.push(png);
            md.push_str("![gains vs baseline](gains_vs_baseline.png)\n\n");
        }
    }
    let p = dir.join("report.md");
    write(&p, &md)?;
    files.push(p);
    Ok((data, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_by_mean_by_hand() {
        let c = |mean| Cell {
            mean,
            sd: 0.0,
            n: 1,
        };
        assert_eq!(best_by_mean(Vec::<(usize, Cell)>::new()), None);
        // The highest mean wins; of equal ones the first.
        let items = vec![("a", c(0.1)), ("b", c(0.3)), ("c", c(0.3)), ("d", c(-1.0))];
        assert_eq!(best_by_mean(items).map(|b| b.0), Some("b"));
    }

    #[test]
    fn held_out_best_by_hand() {
        // gains[source][seed] for seeds 10, 11, 12, 13, 14: selection = seeds 10, 11 (5 / 2 = 2),
        // held out = 12, 13, 14.
        let g = [
            [0.10, 0.00, -0.02, 0.00, -0.01], // selection mean 0.05, the highest
            [0.03, 0.03, 0.05, 0.06, 0.07],   // selection mean 0.03
            [0.04, f64::NAN, 0.50, 0.50, 0.50], // unmeasured on seed 11: not a candidate
        ];
        let seeds = [10, 11, 12, 13, 14];
        let gain = |s: usize, seed: u64| {
            let v = g[s][(seed - 10) as usize];
            (!v.is_nan()).then_some(v)
        };
        let h = held_out_best(3, &seeds, gain).unwrap();
        assert_eq!(h.source, 0);
        assert_eq!(h.selected.n, 2);
        assert!((h.selected.mean - 0.05).abs() < 1e-12);
        // Held out: mean of -0.02, 0, -0.01 = -0.01; sd = 0.01.
        assert_eq!(h.held_out.n, 3);
        assert!((h.held_out.mean + 0.01).abs() < 1e-12);
        assert!((h.held_out.sd - 0.01).abs() < 1e-12);
        assert!(!h.held_out.clear_gain());
        // One seed: nothing to hold out from.
        assert_eq!(held_out_best(3, &[10], gain), None);
        // Two seeds: pick on seed 10 (source 0, 0.10), measure on seed 11 (0.00, one value).
        let h2 = held_out_best(3, &[10, 11], gain).unwrap();
        assert_eq!((h2.source, h2.held_out.n), (0, 1));
        assert_eq!(h2.held_out.mean, 0.0);
        // No source measured on the held-out seed: None.
        let none = |_: usize, seed: u64| (seed == 10).then_some(0.1);
        assert_eq!(held_out_best(3, &[10, 11], none), None);
    }

    #[test]
    fn seeds_to_be_clear_by_hand() {
        let c = |mean, sd, n| Cell { mean, sd, n };
        // (2 * 0.04 / 0.02)^2 = 16: n must exceed 16.
        assert_eq!(seeds_to_be_clear(&c(0.02, 0.04, 3)), Some(17));
        // (2 * 0.01 / 0.03)^2 = 0.44: 2 seeds at least (an sd needs two).
        assert_eq!(seeds_to_be_clear(&c(0.03, 0.01, 3)), Some(2));
        // (2 * 0.05 / 0.04)^2 = 6.25 -> 7; the gain is clear at 7 seeds and not at 6.
        let k = seeds_to_be_clear(&c(0.04, 0.05, 3)).unwrap();
        assert_eq!(k, 7);
        assert!(0.04 - 2.0 * 0.05 / (k as f64).sqrt() > 0.0);
        assert!(0.04 - 2.0 * 0.05 / ((k - 1) as f64).sqrt() <= 0.0);
        assert_eq!(seeds_to_be_clear(&c(-0.01, 0.01, 3)), None);
        assert_eq!(seeds_to_be_clear(&c(0.01, 0.0, 1)), None);
        // A residue of equal accuracies is no gain (this once overflowed).
        assert_eq!(seeds_to_be_clear(&c(1e-17, 0.05, 3)), None);
        // A tiny real gain needs absurdly many seeds; the count is capped at 1e9 (+1), never overflows.
        assert_eq!(seeds_to_be_clear(&c(1e-8, 0.05, 3)), Some(1_000_000_001));
    }
}
