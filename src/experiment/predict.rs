//! Transferability predictors: for each target task, a score for every other task (higher = predicted to
//! transfer better), computed from the experiment's zoo and records.
//!
//! | predictor | score of source s for target t |
//! |---|---|
//! | `tupate:M:C` | cosine of the TuPaTE embeddings of t's and s's method-M adapters, checkpoint C (early/best) |
//! | `centered:M:C` | the same after subtracting the mean embedding of all tasks' M/C adapters |
//! | `delta:lora:C` | cosine of the LoRA weight updates (delta-W = B A, scaled) |
//! | `ensemble3:C` | mean of `tupate:lora/bitfit/prefix:C` (the paper's "3 ENSEMBLE"; needs all three) |
//! | `ensemble:C` | mean of `tupate:M:C` over every zoo method |
//! | `tupate:M:limited` | t's embedding from its few-shot scratch adapters (mean cosine over seeds) against s's zoo adapter |
//! | `datasize` | s's training-set size |
//! | `textemb` | cosine of the base model's mean last-layer token states over t's and s's training texts |
//!
//! The random baseline is not a score: the report gives its expected rho and NDCG over seeded
//! permutations.

use super::results::ResultsFile;
use super::{zoo_dir, ExperimentConfig, ExperimentError};
use crate::embed::cosine;
use crate::embed::delta::{delta_cosine, LoraDelta};
use crate::embed::tupate;
use crate::object::formats::{read_adapter, ReadOptions};
use crate::object::MethodKind;
use crate::task::Task;
use std::collections::BTreeMap;
use std::path::Path;

/// Predictor name -> scores[target][source] (NaN on the diagonal and where an input is missing).
pub type Predictions = BTreeMap<String, Vec<Vec<f64>>>;

fn matrix(n: usize) -> Vec<Vec<f64>> {
    vec![vec![f64::NAN; n]; n]
}

fn cos_matrix(vecs: &[Option<Vec<f32>>]) -> Vec<Vec<f64>> {
    let n = vecs.len();
    let mut m = matrix(n);
    for t in 0..n {
        for s in 0..n {
            if let (true, Some(a), Some(b)) = (t != s, &vecs[t], &vecs[s]) {
                m[t][s] = cosine(a, b) as f64;
            }
        }
    }
    m
}

fn centered(vecs: &[Option<Vec<f32>>]) -> Vec<Option<Vec<f32>>> {
    let present: Vec<&Vec<f32>> = vecs.iter().flatten().collect();
    let Some(dim) = present.first().map(|v| v.len()) else {
        return vecs.to_vec();
    };
    let mut mean = vec![0f64; dim];
    for v in &present {
        for (m, x) in mean.iter_mut().zip(v.iter()) {
            *m += *x as f64 / present.len() as f64;
        }
    }
    vecs.iter()
        .map(|v| {
            v.as_ref()
                .map(|v| v.iter().zip(&mean).map(|(x, m)| x - *m as f32).collect())
        })
        .collect()
}

fn mean_of(ms: &[&Vec<Vec<f64>>], n: usize) -> Vec<Vec<f64>> {
    let mut out = matrix(n);
    for t in 0..n {
        for s in 0..n {
            if t != s {
                out[t][s] = ms.iter().map(|m| m[t][s]).sum::<f64>() / ms.len() as f64;
            }
        }
    }
    out
}

/// Compute every predictor the experiment's outputs allow.
pub fn predictions(
    cfg: &ExperimentConfig,
    out: &Path,
    tasks: &[Task],
    results: &ResultsFile,
) -> Result<Predictions, ExperimentError> {
    let n = tasks.len();
    let mut p = Predictions::new();
    let read = |dir: &Path| read_adapter(dir, &ReadOptions::default()).ok();
    for ckpt in ["early", "best"] {
        let mut per_method = Vec::new();
        for &m in &cfg.zoo.methods {
            let objs: Vec<_> = tasks
                .iter()
                .map(|t| read(&zoo_dir(out, &t.name, m, ckpt)))
                .collect();
            if objs.iter().any(|o| o.is_none()) {
                continue;
            }
            let vecs: Vec<Option<Vec<f32>>> = objs
                .iter()
                .map(|o| o.as_ref().and_then(|o| tupate(o).ok()).map(|e| e.vector))
                .collect();
            let cm = cos_matrix(&vecs);
            p.insert(format!("centered:{m}:{ckpt}"), cos_matrix(&centered(&vecs)));
            if m == MethodKind::Lora {
                let deltas: Vec<Option<LoraDelta>> = objs
                    .iter()
                    .map(|o| o.as_ref().and_then(|o| LoraDelta::from_object(o).ok()))
                    .collect();
                let mut dm = matrix(n);
                for t in 0..n {
                    for s in 0..n {
                        if let (true, Some(a), Some(b)) = (t != s, &deltas[t], &deltas[s]) {
                            dm[t][s] = delta_cosine(a, b);
                        }
                    }
                }
                p.insert(format!("delta:lora:{ckpt}"), dm);
            }
            per_method.push((m, cm.clone()));
            p.insert(format!("tupate:{m}:{ckpt}"), cm);
        }
        if per_method.len() > 1 {
            let all: Vec<&Vec<Vec<f64>>> = per_method.iter().map(|(_, m)| m).collect();
            p.insert(format!("ensemble:{ckpt}"), mean_of(&all, n));
        }
        let three: Vec<&Vec<Vec<f64>>> = per_method
            .iter()
            .filter(|(m, _)| {
                matches!(
                    m,
                    MethodKind::Lora | MethodKind::Bitfit | MethodKind::Prefix
                )
            })
            .map(|(_, m)| m)
            .collect();
        if three.len() == 3 {
            p.insert(format!("ensemble3:{ckpt}"), mean_of(&three, n));
        }
    }

    // The target's embedding from its few-shot scratch adapters.
    let lm = cfg.limited.method;
    let sources: Vec<Option<Vec<f32>>> = tasks
        .iter()
        .map(|t| {
            read(&zoo_dir(out, &t.name, lm, "best"))
                .and_then(|o| tupate(&o).ok())
                .map(|e| e.vector)
        })
        .collect();
    let mut lim = matrix(n);
    let mut any = false;
    for t in 0..n {
        let targets: Vec<Vec<f32>> = cfg
            .limited
            .seeds
            .iter()
            .filter_map(|seed| read(&super::scratch_dir(out, cfg, &tasks[t].name, *seed)))
            .filter_map(|o| tupate(&o).ok().map(|e| e.vector))
            .collect();
        if targets.is_empty() {
            continue;
        }
        for s in (0..n).filter(|&s| s != t) {
            if let Some(sv) = &sources[s] {
                lim[t][s] = targets.iter().map(|tv| cosine(tv, sv) as f64).sum::<f64>()
                    / targets.len() as f64;
                any = true;
            }
        }
    }
    if any {
        p.insert(format!("tupate:{lm}:limited"), lim);
    }

    // Baselines.
    let mut ds = matrix(n);
    for (t, row) in ds.iter_mut().enumerate() {
        for (s, v) in row.iter_mut().enumerate() {
            if s != t {
                *v = tasks[s].train.len() as f64;
            }
        }
    }
    p.insert("datasize".into(), ds);
    let textemb: Vec<Option<Vec<f32>>> = tasks
        .iter()
        .map(|t| {
            results
                .records()
                .find(|r| {
                    r.phase == "textemb"
                        && r.task == t.name
                        && r.protocol == cfg.protocol_hash("textemb")
                })
                .map(|r| r.data_as::<super::records::TextembData>())
                .transpose()
                .map(|d| d.map(|d| d.vector.iter().map(|x| *x as f32).collect()))
        })
        .collect::<Result<_, _>>()?;
    if textemb.iter().all(|v| v.is_some()) {
        p.insert("textemb".into(), cos_matrix(&textemb));
    }
    Ok(p)
}
