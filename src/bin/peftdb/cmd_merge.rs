//! `peftdb merge`: combine stored objects and/or adapter folders into one adapter folder.

use anyhow::{bail, Context, Result};
use clap::Args;
use peftdb::ensemble::{merge, softmax_weights, MergeKind, MergeMode};
use peftdb::object::{read_adapter, write_adapter, LightweightObject, ReadOptions};
use peftdb::store::Store;
use serde_json::json;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Stored objects to merge (ids).
    #[arg(long = "object", value_delimiter = ',')]
    pub objects: Vec<u64>,
    /// Adapter folders to merge.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Weights, one per candidate (objects first, then folders); they must sum to 1. Default: equal.
    #[arg(long, value_delimiter = ',', conflicts_with = "scores")]
    pub weights: Vec<f64>,
    /// Indicator scores, one per candidate: weights = softmax(scores / tau).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub scores: Vec<f64>,
    /// Softmax temperature for --scores.
    #[arg(long, default_value_t = 1.0)]
    pub tau: f64,
    /// How to merge: param (the weighted average of the parameters), delta-cat (LoRA only: the exact
    /// merge of the updates B.A by concatenating factors, rank = sum of ranks) or delta-svd (LoRA only:
    /// the same, re-factored by truncated SVD). Default: delta-cat when every candidate is a LoRA, param
    /// otherwise, where averaging parameters is averaging updates.
    #[arg(long = "merge")]
    pub mode: Option<MergeKind>,
    /// Target rank for delta-svd (default: the highest-weight candidate's rank per module).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Output adapter folder (must not exist, or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(db: &Path, a: &MergeArgs, json: bool) -> Result<u8> {
    let mut cands: Vec<LightweightObject> = Vec::new();
    let mut labels = Vec::new();
    if !a.objects.is_empty() {
        let store = Store::open_for_reading(db)?;
        for id in &a.objects {
            cands.push(store.get(*id)?.1);
            labels.push(format!("object {id}"));
        }
    }
    for p in &a.adapters {
        cands.push(
            read_adapter(p, &ReadOptions::default())
                .with_context(|| format!("reading {}", p.display()))?,
        );
        labels.push(p.display().to_string());
    }
    if cands.is_empty() {
        bail!("nothing to merge: give --object IDS and/or --adapter DIR");
    }
    let weights = if !a.scores.is_empty() {
        if a.scores.len() != cands.len() {
            bail!("{} scores for {} candidates", a.scores.len(), cands.len());
        }
        softmax_weights(&a.scores, a.tau)?
    } else if !a.weights.is_empty() {
        a.weights.clone()
    } else {
        vec![1.0 / cands.len() as f64; cands.len()]
    };
    let all_lora = cands
        .iter()
        .all(|c| c.method.kind() == peftdb::object::MethodKind::Lora);
    let mode = match a.mode {
        Some(kind) => kind.mode(a.rank),
        None if all_lora => MergeMode::DeltaCat,
        None => MergeMode::Param,
    };
    let refs: Vec<&LightweightObject> = cands.iter().collect();
    let merged = merge(&refs, &weights, mode)?;
    write_adapter(&merged, &a.out)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "out": a.out,
                "candidates": labels.iter().zip(&weights).map(|(l, w)| json!({"candidate": l, "weight": w})).collect::<Vec<_>>(),
                "method": merged.method.kind(),
            }))?
        );
    } else {
        for (l, w) in labels.iter().zip(&weights) {
            println!("{w:>8.4}  {l}");
        }
        println!("wrote {} ({})", a.out.display(), merged.method.kind());
    }
    Ok(0)
}
