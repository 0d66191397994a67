//! Two LIMITED settings side by side: does a larger target setting (more examples, steps, test examples)
//! separate the sources that the noisier one could not, and does it agree with it?
//!
//! Both settings' numbers come from [`super::report::gather`] over the same results file (one output
//! folder holds several settings; each has its own protocol hash). Only targets with every source
//! measured in *both* settings are compared, so a setting still running compares on what it has.
//!
//! Per target: scratch accuracy, the median seed-to-seed sd of a gain, the number of clear gains and
//! losses (mean +- 2 SE excludes 0), the best source in each setting, Spearman's rank correlation of the
//! two settings' mean gains over the sources, and the NDCG of the baseline's gains used as a predictor
//! of this setting's gains (100 = the baseline ranks this setting's sources perfectly). Per predictor:
//! NDCG and its paired difference to random in each setting, over the common targets.

use super::metrics::{median, ndcg, spearman};
use super::report::{best_by_mean, pct, Cell, ReportData};

/// One quantity in this setting and in the baseline.
pub type Pair<T> = (T, T);

/// One target in both settings.
#[derive(Debug, Clone)]
pub struct TargetComparison {
    pub target: String,
    /// Sources compared.
    pub sources: usize,
    /// From-scratch test accuracy (this, baseline).
    pub scratch: Pair<Cell>,
    /// Median seed-to-seed sd of the target's gains.
    pub median_gain_sd: Pair<f64>,
    /// Sources with a clear gain / a clear loss.
    pub clear_gains: Pair<usize>,
    pub clear_losses: Pair<usize>,
    /// The source with the highest mean gain and that gain.
    pub best: Pair<(String, Cell)>,
    /// Whether that best gain is clear (mean - 2 SE > 0).
    pub best_clear: Pair<bool>,
    /// Spearman correlation of the two settings' mean gains over the sources (`None`: a constant side).
    pub spearman: Option<f64>,
    /// NDCG (%) of the baseline's mean gains as a ranking of this setting's gains.
    pub ndcg_of_baseline: Option<f64>,
}

/// One predictor in both settings, over the common targets.
#[derive(Debug, Clone)]
pub struct PredictorComparison {
    pub name: String,
    /// Mean NDCG (%) over the common targets.
    pub ndcg: Pair<f64>,
    /// Paired NDCG - random over the common targets (mean, sd, n).
    pub vs_random: Pair<Cell>,
}

/// The comparison of two settings.
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    pub targets: Vec<TargetComparison>,
    pub predictors: Vec<PredictorComparison>,
    /// Spearman correlation of the mean gains, over the common targets.
    pub spearman: Option<Cell>,
    /// Targets whose best source is the same in both settings.
    pub same_best: usize,
    /// Targets whose baseline-best source is among this setting's 3 best.
    pub baseline_best_in_top3: usize,
    /// Median seed-to-seed sd of a gain over every pair of the common targets.
    pub median_gain_sd: Pair<f64>,
}

/// The gains of target `t` in `d`, in source order (every source measured: `t` is a complete target).
fn row(d: &ReportData, t: usize) -> Vec<(usize, Cell)> {
    (0..d.tasks.len())
        .filter(|&s| s != t)
        .filter_map(|s| d.gains[t][s].map(|c| (s, c)))
        .collect()
}

/// Compare `this` setting with `base`. Targets are matched by name; a target is compared when every
/// source is measured in both (and both have the same sources).
pub fn compare(this: &ReportData, base: &ReportData) -> Comparison {
    let mut out = Comparison::default();
    let mut rhos = Vec::new();
    let mut common: Vec<String> = Vec::new();
    let (mut sds_this, mut sds_base) = (Vec::new(), Vec::new());
    for &t in &this.complete_targets {
        let name = &this.tasks[t];
        let Some(bt) = base.tasks.iter().position(|x| x == name) else {
            continue;
        };
        if !base.complete_targets.contains(&bt) {
            continue;
        }
        let (Some(sc_this), Some(sc_base)) = (this.scratch[t], base.scratch[bt]) else {
            continue;
        };
        let r_this = row(this, t);
        let r_base = row(base, bt);
        // Sources matched by name, in this setting's order.
        let mut pairs: Vec<(String, Cell, Cell)> = Vec::new();
        for (s, c) in &r_this {
            let sname = &this.tasks[*s];
            if let Some((_, cb)) = r_base.iter().find(|(bs, _)| &base.tasks[*bs] == sname) {
                pairs.push((sname.clone(), *c, *cb));
            }
        }
        if pairs.is_empty() || pairs.len() != r_this.len() || pairs.len() != r_base.len() {
            continue;
        }
        let g_this: Vec<f64> = pairs.iter().map(|p| p.1.mean).collect();
        let g_base: Vec<f64> = pairs.iter().map(|p| p.2.mean).collect();
        let best_of = |side: usize| {
            best_by_mean(
                pairs
                    .iter()
                    .map(|p| (p.0.clone(), if side == 0 { p.1 } else { p.2 })),
            )
            .expect("non-empty")
        };
        let (b_this, b_base) = (best_of(0), best_of(1));
        let sd_this: Vec<f64> = pairs.iter().filter(|p| p.1.n > 1).map(|p| p.1.sd).collect();
        let sd_base: Vec<f64> = pairs.iter().filter(|p| p.2.n > 1).map(|p| p.2.sd).collect();
        sds_this.extend(&sd_this);
        sds_base.extend(&sd_base);
        let rho_s = spearman(&g_this, &g_base);
        if let Some(r) = rho_s {
            rhos.push(r);
        }
        if b_this.0 == b_base.0 {
            out.same_best += 1;
        }
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by(|&a, &b| g_this[b].total_cmp(&g_this[a]));
        if order.iter().take(3).any(|&i| pairs[i].0 == b_base.0) {
            out.baseline_best_in_top3 += 1;
        }
        out.targets.push(TargetComparison {
            target: name.clone(),
            sources: pairs.len(),
            scratch: (sc_this, sc_base),
            median_gain_sd: (
                median(&sd_this).unwrap_or(f64::NAN),
                median(&sd_base).unwrap_or(f64::NAN),
            ),
            clear_gains: (
                pairs.iter().filter(|p| p.1.clear_gain()).count(),
                pairs.iter().filter(|p| p.2.clear_gain()).count(),
            ),
            clear_losses: (
                pairs.iter().filter(|p| p.1.clear_loss()).count(),
                pairs.iter().filter(|p| p.2.clear_loss()).count(),
            ),
            best_clear: (b_this.1.clear_gain(), b_base.1.clear_gain()),
            best: (b_this, b_base),
            spearman: rho_s,
            ndcg_of_baseline: ndcg(&g_base, &g_this),
        });
        common.push(name.clone());
    }
    out.spearman = Cell::of(&rhos);
    out.median_gain_sd = (
        median(&sds_this).unwrap_or(f64::NAN),
        median(&sds_base).unwrap_or(f64::NAN),
    );

    // Predictors present in both, over the common targets, paired with random per target.
    let per_target = |d: &ReportData, p: &str| -> Vec<(String, f64)> {
        d.predictors
            .iter()
            .find(|x| x.name == p)
            .map(|x| {
                x.per_target
                    .iter()
                    .filter_map(|(t, _, nd)| nd.map(|v| (t.clone(), v)))
                    .filter(|(t, _)| common.contains(t))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (rand_this, rand_base) = (per_target(this, "random"), per_target(base, "random"));
    for p in this.predictors.iter().filter(|p| p.name != "random") {
        let (a, b) = (per_target(this, &p.name), per_target(base, &p.name));
        if a.len() != common.len() || b.len() != common.len() || common.is_empty() {
            continue;
        }
        let diffs = |v: &[(String, f64)], r: &[(String, f64)]| -> Vec<f64> {
            v.iter()
                .filter_map(|(t, x)| r.iter().find(|(rt, _)| rt == t).map(|(_, y)| x - y))
                .collect()
        };
        let mean = |v: &[(String, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
        let (Some(da), Some(db)) = (
            Cell::of(&diffs(&a, &rand_this)),
            Cell::of(&diffs(&b, &rand_base)),
        ) else {
            continue;
        };
        out.predictors.push(PredictorComparison {
            name: p.name.clone(),
            ndcg: (mean(&a), mean(&b)),
            vs_random: (da, db),
        });
    }
    out.predictors
        .sort_by(|x, y| y.ndcg.0.total_cmp(&x.ndcg.0).then(x.name.cmp(&y.name)));
    out
}

fn star(c: &Cell) -> &'static str {
    if c.clear_gain() || c.clear_loss() {
        " *"
    } else {
        ""
    }
}

/// The markdown section of the comparison (`label`: how to name the baseline, e.g. its config file).
pub fn markdown(c: &Comparison, label: &str) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "## 6. Against the baseline setting ({label})\n");
    if c.targets.is_empty() {
        let _ = writeln!(
            md,
            "No target has every source measured in both settings yet.\n"
        );
        return md;
    }
    let _ = writeln!(
        md,
        "Targets with every source measured in both settings: {}. Each cell: this setting / the baseline. \
         Spearman: rank correlation of the two settings' mean gains over the sources; NDCG(base): the \
         baseline's gains used as a predictor of this setting's (%).\n",
        c.targets.len()
    );
    let _ = writeln!(
        md,
        "| target | scratch | median gain sd | clear gains | clear losses | best source (this) | best source (baseline) | Spearman | NDCG(base) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---|---|---:|---:|");
    for t in &c.targets {
        let best = |b: &(String, Cell), clear: bool| {
            format!(
                "{} {:+.1}{}",
                b.0,
                100.0 * b.1.mean,
                if clear { " (clear)" } else { "" }
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} | {} | {} |",
            t.target,
            pct(t.scratch.0.mean),
            pct(t.scratch.1.mean),
            pct(t.median_gain_sd.0),
            pct(t.median_gain_sd.1),
            t.clear_gains.0,
            t.clear_gains.1,
            t.clear_losses.0,
            t.clear_losses.1,
            best(&t.best.0, t.best_clear.0),
            best(&t.best.1, t.best_clear.1),
            t.spearman.map(|r| format!("{r:+.2}")).unwrap_or("-".into()),
            t.ndcg_of_baseline
                .map(|x| format!("{x:.1}"))
                .unwrap_or("-".into()),
        );
    }
    let sum = |f: &dyn Fn(&TargetComparison) -> usize| c.targets.iter().map(f).sum::<usize>();
    let _ = writeln!(
        md,
        "\nOver these targets: median sd of a gain {} points here vs {} in the baseline; clear gains {} vs \
         {}, clear losses {} vs {} (of {} pairs); the best source is the same in {} of {} targets, and \
         the baseline's best is among this setting's 3 best in {}; Spearman of the gains {}.\n",
        pct(c.median_gain_sd.0),
        pct(c.median_gain_sd.1),
        sum(&|t| t.clear_gains.0),
        sum(&|t| t.clear_gains.1),
        sum(&|t| t.clear_losses.0),
        sum(&|t| t.clear_losses.1),
        sum(&|t| t.sources),
        c.same_best,
        c.targets.len(),
        c.baseline_best_in_top3,
        c.spearman
            .map(|s| format!("{:+.2} +- {:.2} (mean +- SE over targets)", s.mean, s.se()))
            .unwrap_or("-".into())
    );
    if !c.predictors.is_empty() {
        let _ = writeln!(
            md,
            "Prediction in both settings over the same targets (NDCG %, and its paired difference to random \
             +- SE; `*`: beyond 2 SE):\n"
        );
        let _ = writeln!(
            md,
            "| predictor | NDCG | NDCG (baseline) | - random | - random (baseline) |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for p in &c.predictors {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} | {:+.1} +- {:.1}{} | {:+.1} +- {:.1}{} |",
                p.name,
                p.ndcg.0,
                p.ndcg.1,
                p.vs_random.0.mean,
                p.vs_random.0.se(),
                star(&p.vs_random.0),
                p.vs_random.1.mean,
                p.vs_random.1.se(),
                star(&p.vs_random.1),
            );
        }
        let _ = writeln!(md);
    }
    md
}
