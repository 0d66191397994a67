//! The end-to-end pipeline: "here are a few examples of my new task; which of my adapters transfer, and
//! what is the initialization?"
//!
//! 1. **Target adapter**: the user's short-tuned adapter, or a fresh one trained for a few steps on
//!    `shots` training examples per class (its early checkpoint, as TuPaTE shows early checkpoints are
//!    nearly as predictive as the best).
//! 2. **Embedding**: its TuPaTE embedding, in the space of the requested method and base model.
//! 3. **Retrieval**: the top-K tasks of that space through the index ([`crate::query::Nearest`]), the new
//!    task itself excluded (leave-one-out); each task contributes its object of that space.
//! 4. **Rerank**: every data-based indicator (Loss, KL against the target adapter, EL2N, cosine of logits and
//!    labels) on `shots` dev examples per class, plus the chosen indicator if it is another one.
//! 5. **Ensemble**: weights softmax(S / tau) of the chosen indicator on its per-example scale
//!    ([`Indicator::per_example`]); merge in parameter space (the paper)
//!    or, for LoRA, by delta-W.
//! 6. **Output**: a PEFT folder with the initialization and `peftdb_report.json` (candidates, every score,
//!    weights, similarities, timings of each stage), written atomically by [`write_suggestion`].

use crate::embed::{tupate, SpaceId};
use crate::engine::scoring::ScoreOptions;
use crate::engine::task::{few_shot, Task};
use crate::engine::train::{train, Progress as TrainProgress, TrainConfig, TrainData};
use crate::engine::{Engine, EngineError};
use crate::ensemble::{merge, softmax_weights, EnsembleError, MergeMode};
use crate::error::{ExportError, StoreError};
use crate::index::{IndexManager, QueryError};
use crate::object::formats::write_adapter_with;
use crate::object::{LightweightObject, MethodKind};
use crate::query::{Nearest, Similarity};
use crate::rerank::stage::{rerank, RerankError, RerankInput, RerankOptions};
use crate::rerank::Indicator;
use crate::store::Store;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use thiserror::Error;

/// Errors of the suggest pipeline.
#[derive(Debug, Error)]
pub enum SuggestError {
    #[error("no candidates in the space of the target adapter ({space}): the store has {available}; train the target with the method and base model of your zoo (--method, --base-model)")]
    NoSpace { space: String, available: String },
    #[error("the target adapter has no TuPaTE embedding: {0}")]
    NoEmbedding(String),
    #[error("no candidate tasks in space {space} once the new task {task:?} is excluded")]
    NoCandidates { space: String, task: String },
    #[error("the target adapter is {found} but --method asks for {wanted}")]
    MethodMismatch { wanted: String, found: String },
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Rerank(Box<RerankError>),
    #[error(transparent)]
    Ensemble(#[from] EnsembleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] ExportError),
}

impl From<RerankError> for SuggestError {
    fn from(e: RerankError) -> Self {
        SuggestError::Rerank(Box::new(e))
    }
}

/// Default softmax temperature, over per-example indicator scores ([`Indicator::per_example`]): the
/// value the replication run (examples/replication) measured.
pub const DEFAULT_TAU: f64 = 0.1;

/// Options of [`suggest`].
#[derive(Debug, Clone)]
pub struct SuggestConfig {
    /// Method of the target adapter and of the candidates.
    pub method: MethodKind,
    /// Number of candidate tasks.
    pub k: usize,
    pub indicator: Indicator,
    pub tau: f64,
    pub merge: MergeMode,
    pub similarity: Similarity,
    /// Examples per class for short-tuning (train split) and for the indicators (dev split).
    pub shots: usize,
    /// Training steps of the short-tuned target adapter.
    pub short_tune_steps: usize,
    pub seed: u64,
    pub score: ScoreOptions,
    /// Base model name of the target adapter; `None`: the base model of the store's spaces of `method`
    /// when there is exactly one.
    pub base_model: Option<String>,
}

impl Default for SuggestConfig {
    fn default() -> Self {
        SuggestConfig {
            method: MethodKind::Lora,
            k: 5,
            indicator: Indicator::CosLogits,
            tau: DEFAULT_TAU,
            merge: MergeMode::Param,
            similarity: Similarity::Tupate,
            shots: 16,
            short_tune_steps: 20,
            seed: 0,
            score: ScoreOptions::default(),
            base_model: None,
        }
    }
}

/// Progress of the pipeline (the library never prints).
#[derive(Debug, Clone)]
pub enum SuggestEvent {
    Stage(&'static str),
    TrainStep { step: usize, total: usize },
    Candidate { done: usize, total: usize },
}

/// One candidate in the report.
#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    pub rank: usize,
    pub task: String,
    pub object: u64,
    /// Similarity of its task to the new task (stage 1).
    pub similarity: f32,
    /// Every computed indicator (higher is better).
    pub scores: BTreeMap<String, f64>,
    /// Accuracy of the candidate as is on the indicator examples.
    pub accuracy: f64,
    pub weight: f64,
}

/// The JSON report of a suggestion (schema/suggest_report.schema.json).
#[derive(Debug, Clone, Serialize)]
pub struct SuggestReport {
    pub task: String,
    pub method: MethodKind,
    pub indicator: String,
    pub tau: f64,
    /// Examples the indicators were computed on (sums are divided by this before the softmax).
    pub examples: usize,
    pub merge: String,
    pub similarity: String,
    pub k_requested: usize,
    pub k_used: usize,
    /// `given` or `short-tuned (N steps, dev accuracy X)`.
    pub target: String,
    pub space: String,
    pub candidates: Vec<CandidateReport>,
    /// Seconds per stage.
    pub timings: BTreeMap<String, f64>,
    pub notes: Vec<String>,
}

/// What [`suggest`] works on.
pub struct SuggestInput<'a> {
    pub store: &'a Store,
    pub index: &'a IndexManager,
    pub engine: &'a Engine,
    /// The new task (its train and dev splits are sampled `shots` per class).
    pub task: &'a Task,
    /// A short-tuned adapter the user already has; `None` trains one.
    pub adapter: Option<LightweightObject>,
}

fn merge_name(m: MergeMode) -> String {
    match m {
        MergeMode::Param => "param".into(),
        MergeMode::DeltaCat => "delta-cat".into(),
        MergeMode::DeltaSvd { rank: None } => "delta-svd".into(),
        MergeMode::DeltaSvd { rank: Some(r) } => format!("delta-svd (rank {r})"),
    }
}

/// Run the pipeline; returns the initialization and its report.
pub fn suggest(
    input: &SuggestInput<'_>,
    cfg: &SuggestConfig,
    progress: &mut dyn FnMut(SuggestEvent),
) -> Result<(LightweightObject, SuggestReport), SuggestError> {
    if cfg.k == 0 {
        return Err(SuggestError::Invalid("k must be at least 1".into()));
    }
    if !(cfg.tau.is_finite() && cfg.tau > 0.0) {
        return Err(EnsembleError::BadTemperature(cfg.tau).into());
    }
    let task = input.task;
    let engine = input.engine;
    let mut timings = BTreeMap::new();
    let mut notes = Vec::new();
    let labels = task.label_texts();
    let train_ex =
        few_shot(&task.train, labels.len(), cfg.shots, cfg.seed).map_err(EngineError::from)?;
    let dev_ex = few_shot(&task.dev, labels.len(), cfg.shots, cfg.seed.wrapping_add(1))
        .map_err(EngineError::from)?;

    // Which base model the target must be for: the store's, for this method.
    let spaces = input.store.spaces()?;
    let of_method: Vec<_> = spaces
        .iter()
        .filter(|s| s.key.method == cfg.method)
        .collect();
    let base_model = match &cfg.base_model {
        Some(b) => Some(b.clone()),
        None => {
            let mut names: Vec<&str> = of_method
                .iter()
                .map(|s| s.key.base_model.as_str())
                .collect();
            names.sort();
            names.dedup();
            (names.len() == 1).then(|| names[0].to_string())
        }
    };

    // 1. Target adapter.
    progress(SuggestEvent::Stage("target adapter"));
    let t0 = Instant::now();
    let (target, target_desc) = match &input.adapter {
        Some(a) => {
            if a.method.kind() != cfg.method {
                return Err(SuggestError::MethodMismatch {
                    wanted: cfg.method.to_string(),
                    found: a.method.kind().to_string(),
                });
            }
            (a.clone(), "given".to_string())
        }
        None => {
            let mut tc = TrainConfig::new(cfg.method);
            tc.max_steps = Some(cfg.short_tune_steps.max(1));
            tc.eval_every = cfg.short_tune_steps.max(1);
            tc.patience = None;
            tc.seed = cfg.seed;
            tc.temperature = cfg.score.temperature;
            tc.base_model_name = base_model.clone();
            let data = TrainData {
                label_texts: &labels,
                train: &train_ex,
                dev: &dev_ex,
                test: None,
            };
            let total = cfg.short_tune_steps.max(1);
            let out = train(engine, &data, &tc, &mut |p| {
                if let TrainProgress::Step { step, .. } = p {
                    progress(SuggestEvent::TrainStep { step: *step, total });
                }
            })?;
            let desc = format!(
                "short-tuned ({} steps on {} examples, dev accuracy {:.3})",
                out.early.step,
                train_ex.len(),
                out.early.dev_accuracy
            );
            (out.early.object, desc)
        }
    };
    timings.insert("target".to_string(), t0.elapsed().as_secs_f64());

    // 2. Embedding and its space.
    progress(SuggestEvent::Stage("embedding"));
    let t0 = Instant::now();
    let emb = tupate(&target).map_err(|e| SuggestError::NoEmbedding(e.reason))?;
    let space_id: SpaceId = emb.space.id();
    let space_label = emb.space.label();
    if !spaces.iter().any(|s| s.id == space_id) {
        let available = if of_method.is_empty() {
            format!("no {} space", cfg.method)
        } else {
            of_method
                .iter()
                .map(|s| s.key.label())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(SuggestError::NoSpace {
            space: space_label,
            available,
        });
    }
    timings.insert("embedding".to_string(), t0.elapsed().as_secs_f64());

    // 3. Retrieval.
    progress(SuggestEvent::Stage("retrieval"));
    let t0 = Instant::now();
    let res = Nearest::vector(space_id, emb.vector.clone())
        .k(cfg.k + 1)
        .similarity(cfg.similarity)
        .method(cfg.method)
        .run(input.store, input.index)?;
    let mut hits = Vec::new();
    for t in res.tasks.into_iter().filter(|t| t.task != task.name) {
        if let Some(o) = t
            .objects
            .iter()
            .filter(|o| o.space == Some(space_id))
            .max_by(|a, b| a.score.total_cmp(&b.score))
        {
            hits.push((t.task.clone(), o.id, t.score));
        }
        if hits.len() == cfg.k {
            break;
        }
    }
    if hits.is_empty() {
        return Err(SuggestError::NoCandidates {
            space: space_label,
            task: task.name.clone(),
        });
    }
    if hits.len() < cfg.k {
        notes.push(format!(
            "k = {} but the space has only {} other task(s): using them all",
            cfg.k,
            hits.len()
        ));
    }
    timings.insert("retrieval".to_string(), t0.elapsed().as_secs_f64());

    // 4. Rerank.
    progress(SuggestEvent::Stage("rerank"));
    let t0 = Instant::now();
    let cands: Vec<LightweightObject> = hits
        .iter()
        .map(|(_, id, _)| input.store.get(*id).map(|(_, o)| o))
        .collect::<Result<_, _>>()?;
    let refs: Vec<&LightweightObject> = cands.iter().collect();
    let mut indicators = vec![
        Indicator::Loss,
        Indicator::Kl,
        Indicator::El2n,
        Indicator::CosLogits,
    ];
    if !indicators.contains(&cfg.indicator) {
        indicators.push(cfg.indicator);
    }
    let ropts = RerankOptions {
        indicators,
        score: cfg.score.clone(),
        m_steps: 10,
        seed: cfg.seed,
        ..Default::default()
    };
    let rin = RerankInput {
        engine,
        label_texts: &labels,
        examples: &dev_ex,
        reference: Some(&target),
    };
    let scored = rerank(&rin, &refs, &ropts, &mut |done, total| {
        progress(SuggestEvent::Candidate { done, total })
    })?;
    timings.insert("rerank".to_string(), t0.elapsed().as_secs_f64());

    // 5. Ensemble.
    progress(SuggestEvent::Stage("ensemble"));
    let t0 = Instant::now();
    let s: Vec<f64> = scored
        .iter()
        .map(|c| {
            cfg.indicator
                .per_example(c.scores[cfg.indicator.as_str()], dev_ex.len())
        })
        .collect();
    let weights = softmax_weights(&s, cfg.tau)?;
    let merged = merge(&refs, &weights, cfg.merge)?;
    timings.insert("ensemble".to_string(), t0.elapsed().as_secs_f64());

    let candidates = hits
        .iter()
        .zip(&scored)
        .zip(&weights)
        .enumerate()
        .map(|(i, (((task, id, sim), sc), w))| CandidateReport {
            rank: i + 1,
            task: task.clone(),
            object: *id,
            similarity: *sim,
            scores: sc.scores.clone(),
            accuracy: sc.accuracy,
            weight: *w,
        })
        .collect();
    let report = SuggestReport {
        task: task.name.clone(),
        method: cfg.method,
        indicator: cfg.indicator.as_str().to_string(),
        tau: cfg.tau,
        examples: dev_ex.len(),
        merge: merge_name(cfg.merge),
        similarity: cfg.similarity.as_str().to_string(),
        k_requested: cfg.k,
        k_used: hits.len(),
        target: target_desc,
        space: format!("{space_id} {space_label}"),
        candidates,
        timings,
        notes,
    };
    Ok((merged, report))
}

/// Write the initialization and its report (`peftdb_report.json`) into `dir`, atomically: everything is
/// written into a temporary sibling folder that is renamed into place, so `dir` appears complete or not at
/// all.
pub fn write_suggestion(
    obj: &LightweightObject,
    report: &SuggestReport,
    dir: &Path,
) -> Result<(), ExportError> {
    let json = serde_json::to_vec_pretty(report).expect("report serializes");
    write_adapter_with(obj, dir, &[("peftdb_report.json", &json)])
}
