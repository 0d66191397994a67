//! The transfer study: does `suggest` find the sources that transfer, and does its initialization beat the
//! bare model and training from scratch? Every number comes from the product's own path:
//! the zoo is ingested into a real store ([`crate::ingest::ingest_zoo`]), the answers are
//! [`crate::transfer`]'s stages and [`crate::transfer::suggest`] itself, and accuracy is
//! [`crate::transfer::evaluate`].
//!
//! Phases (each finished unit is appended and synced to `OUT/results.jsonl`, so a killed study resumes
//! where it stopped, and more seeds or targets extend it):
//! - `zero`: ground truth (a), each zoo adapter applied unchanged to each other task's full test split,
//!   the bare model, Average of Checkpoints (parameters averaged, as PEWE does), the uniform delta-W
//!   average and Manual Division (the delta-W average of the sources of the target's group);
//! - `tune`: per target and tuning seed, the retrieval rankings of every similarity, TEXTEMB and DATASIZE,
//!   every candidate's scores, and the dev-split accuracy of the answer of every setting of a grid
//!   (similarity, K, indicator, tau, noise threshold, merge): the defaults are chosen here, on dev;
//! - `final`: per target and seed, `suggest` at the configured defaults, its answer on the test split,
//!   and LIMITED few-shot training from it;
//! - `scratch`: per target and seed, LIMITED few-shot training from scratch on the same episode.
//!
//! The report (`report`) turns the records into tables: the zoo, the ground truth, the answer against
//! the baselines, few-shot against scratch, NDCG/rho of every predictor, the tuning grid, and the issue's
//! acceptance numbers.

use super::metrics::{ndcg, rho};
use super::results::{Record, ResultsError, ResultsFile};
use crate::engine::scoring::ScoreOptions;
use crate::engine::train::{train, TrainConfig, TrainData};
use crate::engine::{Engine, EngineError};
use crate::ensemble::{merge, MergeMode};
use crate::index::{IndexConfig, IndexManager};
use crate::ingest::{ingest_zoo, IngestOptions};
use crate::object::LightweightObject;
use crate::query::Similarity;
use crate::rerank::Indicator;
use crate::store::Store;
use crate::task::TaskError;
use crate::task::{Example, Task};
use crate::transfer::{
    decide, evaluate, retrieve, score, scratch_init, store_base_model, suggest, target_adapter,
    Decision, Episode, LabelPrior, SuggestConfig, SuggestInput, TransferError,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thiserror::Error;

/// Errors of the transfer study.
#[derive(Debug, Error)]
pub enum StudyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("task {task}: {source}")]
    Transfer {
        task: String,
        #[source]
        source: Box<TransferError>,
    },
    #[error("the zoo store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("record {key}: {source}")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, StudyError>;

fn terr(task: &str) -> impl Fn(TransferError) -> StudyError + '_ {
    move |e| StudyError::Transfer {
        task: task.to_string(),
        source: Box::new(e),
    }
}

fn eerr(task: &str) -> impl Fn(EngineError) -> StudyError + '_ {
    move |e| StudyError::Transfer {
        task: task.to_string(),
        source: Box::new(TransferError::Engine(e)),
    }
}

/// Which phases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Zero,
    Tune,
    Final,
    Scratch,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Zero, Phase::Tune, Phase::Scratch, Phase::Final];
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Zero => "zero",
            Phase::Tune => "tune",
            Phase::Final => "final",
            Phase::Scratch => "scratch",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// LIMITED few-shot training: the episode's train shots, early stopping on its dev shots.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FewShot {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub eval_every: usize,
    /// The starting adapter is a checkpoint too (evaluated before the first step,
    /// [`TrainConfig::keep_start`]): training never hands back worse on the dev shots than its start.
    #[serde(default)]
    pub keep_start: bool,
}

impl FewShot {
    /// The schedule, in the form the records' protocol hashed before `keep_start` existed.
    fn schedule(&self) -> String {
        let FewShot {
            steps,
            batch_size,
            lr,
            eval_every,
            keep_start: _,
        } = self;
        format!(
            "FewShot {{ steps: {steps}, batch_size: {batch_size}, lr: {lr:?}, eval_every: {eval_every} }}"
        )
    }

    /// What the records' protocol hashes: the schedule, and `keep_start` only when set, so the committed
    /// studies' records stay valid.
    fn protocol(&self) -> String {
        let mut p = self.schedule();
        if self.keep_start {
            p.push_str(";keep_start");
        }
        p
    }
}

impl Default for FewShot {
    fn default() -> Self {
        FewShot {
            steps: 32,
            batch_size: 8,
            lr: 1e-3,
            eval_every: 8,
            keep_start: false,
        }
    }
}

/// Settings of the study.
#[derive(Debug, Clone)]
pub struct StudyConfig {
    /// The adapter zoo (one folder per task, e.g. `examples/demo-zoo`), ingested into `OUT/zoo.peftdb`.
    pub zoo: PathBuf,
    /// Task folders (`../shared/tasks`).
    pub tasks: PathBuf,
    pub out: PathBuf,
    /// Seeds of the `final` and `scratch` phases (test split).
    pub seeds: Vec<u64>,
    /// Seeds of the `tune` phase (dev split).
    pub tune_seeds: Vec<u64>,
    /// Targets; empty: every task with an adapter in the zoo.
    pub targets: Vec<String>,
    /// The pipeline's settings for `final` (its seed is replaced by each study seed).
    pub suggest: SuggestConfig,
    pub few_shot: FewShot,
    /// Source examples of the TEXTEMB predictor (first N of each source's train split).
    pub textemb_examples: usize,
    /// Evaluate on the first N examples of the dev and test splits only (a quick check; `None`: the
    /// full splits, as every reported number is).
    pub eval_limit: Option<usize>,
}

/// The protocol of a phase: what its numbers depend on (the zoo's content, scoring, the episode, the
/// pipeline's settings), hashed into every record key so a changed setting re-runs what depends on it.
fn protocol(cfg: &StudyConfig, zoo_hash: &str, phase: Phase, max_len: usize) -> String {
    let s = &cfg.suggest;
    // Training from scratch does not depend on the zoo.
    let zoo = if phase == Phase::Scratch {
        "-"
    } else {
        zoo_hash
    };
    let mut p = format!(
        "zoo={zoo};len={max_len};T={};limit={:?};",
        s.score.temperature, cfg.eval_limit
    );
    match phase {
        Phase::Zero => {}
        Phase::Tune => {
            let _ = write!(
                p,
                "shots={};short={};grid={}",
                s.shots, s.short_tune_steps, GRID_VERSION
            );
        }
        Phase::Scratch => {
            let _ = write!(p, "shots={};fs={}", s.shots, cfg.few_shot.protocol());
        }
        Phase::Final => {
            let _ = write!(
                p,
                "shots={};short={};fs={};cfg={}",
                s.shots,
                s.short_tune_steps,
                cfg.few_shot.protocol(),
                config_label(s)
            );
        }
    }
    let h = blake3::hash(p.as_bytes()).to_hex();
    h.as_str()[..12].to_string()
}

/// A short label of a pipeline setting (similarity, K, indicator, tau, noise threshold, merge, label
/// prior, and `/acc` with the accuracy guard).
pub fn config_label(c: &SuggestConfig) -> String {
    format!(
        "{}/k{}/{}/tau{}/z{}/{}/prior-{}{}",
        c.similarity.as_str(),
        c.k,
        c.indicator.as_str(),
        c.tau,
        c.noise_z,
        crate::transfer::merge_name(c.effective_merge()),
        c.prior.as_str(),
        if c.accuracy_guard { "/acc" } else { "" }
    )
}

/// Bump when the tuning grid (or what a tune record holds) changes.
const GRID_VERSION: u32 = 4;

/// The tuning grid. Every source is scored (K = 13 covers the zoo: on grid 1, scoring all sources beat
/// the top 3 or 5 of every similarity), so the grid varies what decides the answer: the label prior the
/// balanced episode is weighted to (the train split's label frequencies, or uniform) x the indicator
/// that ranks, weights and tests the candidates (Loss, calibrated Loss, EL2N, cosine of logits and
/// labels) x the noise threshold (1 or 2 SE), each without and with the accuracy guard (and z 0 with the
/// guard alone); then tau around (calibrated Loss, z 1, train prior); the retrieval's
/// top 5 by `delta`; and the papers' setting (TuPaTE, K 5, cosine of logits and labels, parameter
/// averaging, every candidate with a positive gain weighted, no prior).
pub fn grid(base: &SuggestConfig) -> Vec<SuggestConfig> {
    let mut out: Vec<SuggestConfig> = Vec::new();
    let mut push = |c: SuggestConfig| {
        if !out.iter().any(|o| config_label(o) == config_label(&c)) {
            out.push(c);
        }
    };
    let all = |f: &dyn Fn(&mut SuggestConfig)| {
        let mut c = base.clone();
        c.similarity = Similarity::Delta;
        c.k = 13;
        c.accuracy_guard = false;
        f(&mut c);
        c
    };
    for prior in LabelPrior::ALL {
        for ind in [
            Indicator::Loss,
            Indicator::LossCal,
            Indicator::El2n,
            Indicator::CosLogits,
        ] {
            for (z, guard) in [
                (1.0, false),
                (2.0, false),
                (0.0, true),
                (1.0, true),
                (2.0, true),
            ] {
                push(all(&|c| {
                    c.prior = prior;
                    c.indicator = ind;
                    c.noise_z = z;
                    c.accuracy_guard = guard;
                }));
            }
        }
    }
    for tau in [0.03, 1.0] {
        push(all(&|c| {
            c.prior = LabelPrior::Train;
            c.indicator = Indicator::LossCal;
            c.noise_z = 1.0;
            c.tau = tau;
        }));
    }
    push(all(&|c| {
        c.prior = LabelPrior::Train;
        c.indicator = Indicator::LossCal;
        c.noise_z = 1.0;
        c.k = 5;
    }));
    let mut c = base.clone();
    c.similarity = Similarity::Tupate;
    c.indicator = Indicator::CosLogits;
    c.merge = MergeMode::Param;
    c.k = 5;
    c.noise_z = 0.0;
    c.accuracy_guard = false;
    c.prior = LabelPrior::Uniform;
    push(c);
    out
}

/// One evaluation of an initialization on a split, with each example's correctness (for paired SEs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitEval {
    pub examples: usize,
    pub accuracy: f64,
    pub loss: f64,
    /// '1' / '0' per example, in split order.
    pub correct: String,
}

/// `zero` record: one initialization on one target's splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroRecord {
    /// `bare`, `source:NAME`, `average-param`, `average-delta`, `manual`.
    pub init: String,
    pub test: SplitEval,
    pub dev: Option<SplitEval>,
}

/// One candidate as the `tune` phase saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TunedCandidate {
    pub task: String,
    pub scores: BTreeMap<String, f64>,
    pub accuracy: f64,
    /// Log-likelihood gain over the bare model on the episode, and its paired SE.
    pub gain: f64,
    pub gain_se: f64,
    /// Indicator -> [gain, SE] of its per-example terms over the bare model's on the episode.
    #[serde(default)]
    pub gains: BTreeMap<String, [f64; 2]>,
    /// The source applied unchanged on the target's full dev split (dev ground truth for tuning).
    #[serde(default)]
    pub dev: Option<SplitEval>,
}

/// One grid setting's answer on the dev split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridAnswer {
    pub config: String,
    pub decision: Decision,
    /// Candidate task -> weight (weighted ones only).
    pub weights: BTreeMap<String, f64>,
    pub dev_accuracy: f64,
}

/// `tune` record: one target and tuning seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuneRecord {
    /// Similarity name (and `textemb`, `datasize`) -> score of each source task.
    pub predictors: BTreeMap<String, BTreeMap<String, f64>>,
    pub candidates: Vec<TunedCandidate>,
    pub bare_accuracy: f64,
    pub bare_dev_accuracy: f64,
    pub answers: Vec<GridAnswer>,
}

/// `tune` record `heldout`: each grid setting's answer on the dev split *without* the episode's dev shots,
/// which the answer was selected on (scored, weighted and gated with them). On the full dev split those
/// shots make every answer look better than it is, most on small splits (32 of metaphor_paraphrase's 80
/// dev examples); this is the evaluation the defaults are chosen on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOutRecord {
    /// Dev examples left out (the episode's dev shots) and kept.
    pub left_out: usize,
    pub examples: usize,
    pub bare_accuracy: f64,
    /// Grid setting (its [`config_label`]) -> accuracy of its answer on the kept dev examples.
    pub answers: BTreeMap<String, f64>,
}

/// `final` record: `suggest` at the defaults on one target and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalRecord {
    pub config: String,
    pub decision: Decision,
    /// Candidates in the order `suggest` ranks them (by the indicator) with their weights.
    pub candidates: Vec<(String, f64)>,
    pub test: SplitEval,
    /// Test accuracy after LIMITED training from the answer.
    pub few_shot_test: f64,
    pub few_shot_steps: usize,
}

/// `scratch` record: LIMITED training from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScratchRecord {
    pub test: f64,
    pub best_step: usize,
}

/// Progress of the study (the library never prints).
#[derive(Debug, Clone)]
pub enum StudyEvent {
    Ingested {
        objects: usize,
    },
    Unit {
        phase: &'static str,
        key: String,
        seconds: f64,
    },
}

fn split_eval(
    engine: &Engine,
    task: &Task,
    adapter: Option<&LightweightObject>,
    ex: &[Example],
    opts: &ScoreOptions,
) -> Result<SplitEval> {
    // The pipeline's own evaluation, with each example's correctness kept for paired SEs.
    let ev = evaluate(engine, task, adapter, ex, opts, &mut |_, _| {}).map_err(terr(&task.name))?;
    Ok(SplitEval {
        examples: ev.examples,
        accuracy: ev.accuracy,
        loss: ev.loss,
        correct: ev
            .correct
            .iter()
            .map(|c| if *c { '1' } else { '0' })
            .collect(),
    })
}

/// Paired difference of two correctness strings: mean and SE, in accuracy points (0-1).
pub fn paired_accuracy(a: &str, b: &str) -> (f64, f64) {
    let x: Vec<f64> = a.bytes().map(|c| (c == b'1') as u8 as f64).collect();
    let y: Vec<f64> = b.bytes().map(|c| (c == b'1') as u8 as f64).collect();
    crate::rerank::stage::paired_gain(&x, &y)
}

/// One unit of work of the study: its phase, target, initialization and seed (its record's key).
#[derive(Debug, Clone, Copy)]
struct Unit<'u> {
    phase: Phase,
    task: &'u str,
    init: &'u str,
    seed: u64,
}

impl Unit<'_> {
    fn key(&self, protocol: &str) -> String {
        Record::make_key(
            self.phase.as_str(),
            self.task,
            self.init,
            self.seed,
            protocol,
        )
    }
}

struct Study<'a> {
    cfg: &'a StudyConfig,
    engine: &'a Engine,
    tasks: Vec<Task>,
    store: Store,
    index: IndexManager,
    /// Task name -> its zoo object id (best checkpoint of the configured method).
    objects: BTreeMap<String, u64>,
    results: ResultsFile,
    /// The zoo's hash: each task and its adapter's content hash, in task order (so a store ingested in
    /// another order, or grown to the same content, gets the same hash).
    zoo_hash: String,
    /// The hash earlier versions filed zoo-wide records under (the same pairs in the store's id order),
    /// still looked up so that their records stay found.
    legacy_zoo_hash: String,
    /// Task name -> the first 12 hex digits of its zoo adapter's content hash.
    source_hash: BTreeMap<String, String>,
    max_len: usize,
}

fn load_tasks(dir: &Path) -> Result<Vec<Task>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| StudyError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("task.json").is_file())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        out.push(Task::load(&d)?);
    }
    Ok(out)
}

impl<'a> Study<'a> {
    fn open(
        cfg: &'a StudyConfig,
        engine: &'a Engine,
        max_len: usize,
        progress: &mut dyn FnMut(StudyEvent),
    ) -> Result<Study<'a>> {
        std::fs::create_dir_all(&cfg.out).map_err(|source| StudyError::Io {
            path: cfg.out.clone(),
            source,
        })?;
        let tasks = load_tasks(&cfg.tasks)?;
        let db = cfg.out.join("zoo.peftdb");
        let serr = |e: Box<dyn std::error::Error + Send + Sync>| StudyError::Store {
            path: db.clone(),
            source: e,
        };
        // The store is derived data, kept in step with the zoo: every run ingests the zoo folder, and
        // what is stored already is skipped (by content hash), so a zoo that grew is picked up.
        let store = Store::open_or_create(&db).map_err(|e| serr(e.into()))?;
        {
            let report = ingest_zoo(
                &store,
                std::slice::from_ref(&cfg.zoo),
                None,
                &IngestOptions::default(),
                &|_| {},
            )
            .map_err(|e| serr(e.into()))?;
            if report.rejected() > 0 {
                return Err(StudyError::Invalid(format!(
                    "{}: {} adapter(s) rejected at ingestion; fix the zoo first",
                    cfg.zoo.display(),
                    report.rejected()
                )));
            }
        }
        let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {})
            .map_err(|e| serr(e.into()))?;
        let mut objects = BTreeMap::new();
        let mut source_hash = BTreeMap::new();
        let mut full_hash = BTreeMap::new();
        let mut legacy = blake3::Hasher::new();
        let recs = store.objects().map_err(|e| serr(e.into()))?;
        for r in &recs {
            if r.method_kind() == cfg.suggest.method {
                objects.insert(r.task.clone(), r.id);
                source_hash.insert(r.task.clone(), r.content_hash[..12].to_string());
                full_hash.insert(r.task.clone(), r.content_hash.clone());
                legacy.update(r.task.as_bytes());
                legacy.update(r.content_hash.as_bytes());
            }
        }
        let mut hasher = blake3::Hasher::new();
        for (task, content) in &full_hash {
            hasher.update(task.as_bytes());
            hasher.update(content.as_bytes());
        }
        progress(StudyEvent::Ingested {
            objects: objects.len(),
        });
        let results = ResultsFile::open(&cfg.out.join("results.jsonl"))?;
        Ok(Study {
            cfg,
            engine,
            tasks,
            store,
            index,
            objects,
            results,
            zoo_hash: hasher.finalize().to_hex().as_str()[..12].to_string(),
            legacy_zoo_hash: legacy.finalize().to_hex().as_str()[..12].to_string(),
            source_hash,
            max_len,
        })
    }

    /// The evaluated part of a split: all of it, or the first `eval_limit` examples.
    fn limit<'t>(&self, ex: &'t [Example]) -> &'t [Example] {
        &ex[..self
            .cfg
            .eval_limit
            .unwrap_or(usize::MAX)
            .max(1)
            .min(ex.len())]
    }

    fn protocol(&self, phase: Phase) -> String {
        protocol(self.cfg, &self.zoo_hash, phase, self.max_len)
    }

    /// The protocols a unit's record may be filed under, the one new records get first. A zero-shot run
    /// of the bare model or of one source depends on nothing else of the zoo, so it is filed under that
    /// source's content hash ("-" for the bare model): it stays valid while the zoo grows. Records filed
    /// under the whole zoo's hash (as every unit was before), or under the legacy zoo hash, are still
    /// found.
    fn protocols(&self, unit: &Unit<'_>) -> Vec<String> {
        let own = match (unit.phase, unit.init) {
            (Phase::Zero, "bare") => Some("-"),
            (Phase::Zero, init) => init
                .strip_prefix("source:")
                .and_then(|t| self.source_hash.get(t))
                .map(String::as_str),
            _ => None,
        };
        let mut out: Vec<String> = own
            .map(|h| protocol(self.cfg, h, unit.phase, self.max_len))
            .into_iter()
            .collect();
        out.push(self.protocol(unit.phase));
        let legacy = protocol(self.cfg, &self.legacy_zoo_hash, unit.phase, self.max_len);
        if !out.contains(&legacy) {
            out.push(legacy);
        }
        out
    }

    /// A unit's record, under any of its [`Study::protocols`].
    fn find(&self, unit: Unit<'_>) -> Option<&Record> {
        self.protocols(&unit)
            .iter()
            .find_map(|p| self.results.get(&unit.key(p)))
    }

    fn targets(&self) -> Vec<usize> {
        (0..self.tasks.len())
            .filter(|&i| self.objects.contains_key(&self.tasks[i].name))
            .filter(|&i| {
                self.cfg.targets.is_empty() || self.cfg.targets.contains(&self.tasks[i].name)
            })
            .collect()
    }

    fn sources(&self, target: usize) -> Vec<usize> {
        (0..self.tasks.len())
            .filter(|&i| i != target && self.objects.contains_key(&self.tasks[i].name))
            .collect()
    }

    fn object(&self, task: usize) -> Result<LightweightObject> {
        let name = &self.tasks[task].name;
        let id = self.objects[name];
        self.store
            .get(id)
            .map(|(_, o)| o)
            .map_err(|e| StudyError::Store {
                path: self.store.path().to_path_buf(),
                source: Box::new(e),
            })
    }

    /// Append a finished unit (synced) and report it.
    fn append<T: Serialize>(
        &mut self,
        unit: Unit<'_>,
        started: Instant,
        data: &T,
        progress: &mut dyn FnMut(StudyEvent),
    ) -> Result<()> {
        let protocol = self.protocols(&unit).swap_remove(0);
        let key = unit.key(&protocol);
        let seconds = started.elapsed().as_secs_f64();
        let data = serde_json::to_value(data).map_err(|source| StudyError::Record {
            key: key.clone(),
            source,
        })?;
        self.results.append(Record {
            key: key.clone(),
            phase: unit.phase.as_str().to_string(),
            task: unit.task.to_string(),
            init: unit.init.to_string(),
            seed: unit.seed,
            protocol,
            seconds,
            data,
        })?;
        progress(StudyEvent::Unit {
            phase: unit.phase.as_str(),
            key,
            seconds,
        });
        Ok(())
    }

    /// Whether a unit is already in the results file under the current protocol.
    fn has(&self, unit: Unit<'_>) -> bool {
        self.find(unit).is_some()
    }

    fn run_zero(&mut self, progress: &mut dyn FnMut(StudyEvent)) -> Result<()> {
        let opts = self.cfg.suggest.score.clone();
        // Two passes: first the units that depend on one source (or none) for every target, then those
        // that merge the whole zoo. A run while the zoo is still growing thus spends its time on units
        // that stay valid, and the zoo-wide ones come last (they are rerun whenever the zoo changes).
        let mut plan: Vec<(usize, Vec<String>)> = Vec::new();
        for t in self.targets() {
            let mut inits = vec!["bare".to_string()];
            inits.extend(
                self.sources(t)
                    .iter()
                    .map(|&s| format!("source:{}", self.tasks[s].name)),
            );
            plan.push((t, inits));
        }
        for t in self.targets() {
            let zoo_wide = ["average-param", "average-delta", "manual"];
            plan.push((t, zoo_wide.map(String::from).to_vec()));
        }
        for (t, inits) in plan {
            let task = self.tasks[t].clone();
            let sources = self.sources(t);
            for init in inits {
                let unit = Unit {
                    phase: Phase::Zero,
                    task: &task.name,
                    init: &init,
                    seed: 0,
                };
                if self.has(unit) {
                    continue;
                }
                let started = Instant::now();
                let src_objs = || -> Result<Vec<LightweightObject>> {
                    sources.iter().map(|&s| self.object(s)).collect()
                };
                let adapter: Option<LightweightObject> = match init.as_str() {
                    "bare" => None,
                    "average-param" | "average-delta" => {
                        let objs = src_objs()?;
                        let refs: Vec<&LightweightObject> = objs.iter().collect();
                        let w = vec![1.0 / refs.len() as f64; refs.len()];
                        let mode = if init == "average-param" {
                            MergeMode::Param
                        } else {
                            MergeMode::DeltaCat
                        };
                        Some(merge(&refs, &w, mode).map_err(|e| terr(&task.name)(e.into()))?)
                    }
                    "manual" => {
                        let same: Vec<usize> = sources
                            .iter()
                            .copied()
                            .filter(|&s| task.group.is_some() && self.tasks[s].group == task.group)
                            .collect();
                        if same.is_empty() {
                            None
                        } else {
                            let objs: Vec<LightweightObject> = same
                                .iter()
                                .map(|&s| self.object(s))
                                .collect::<Result<_>>()?;
                            let refs: Vec<&LightweightObject> = objs.iter().collect();
                            let w = vec![1.0 / refs.len() as f64; refs.len()];
                            Some(
                                merge(&refs, &w, MergeMode::DeltaCat)
                                    .map_err(|e| terr(&task.name)(e.into()))?,
                            )
                        }
                    }
                    s => {
                        let name = s.trim_start_matches("source:");
                        let idx = self
                            .tasks
                            .iter()
                            .position(|x| x.name == name)
                            .ok_or_else(|| StudyError::Invalid(format!("no task {name}")))?;
                        Some(self.object(idx)?)
                    }
                };
                let test = split_eval(
                    self.engine,
                    &task,
                    adapter.as_ref(),
                    self.limit(&task.test),
                    &opts,
                )?;
                let dev = if init == "bare" {
                    Some(split_eval(
                        self.engine,
                        &task,
                        None,
                        self.limit(&task.dev),
                        &opts,
                    )?)
                } else {
                    None
                };
                let rec = ZeroRecord {
                    init: init.clone(),
                    test,
                    dev,
                };
                self.append(unit, started, &rec, progress)?;
            }
        }
        Ok(())
    }

    fn textemb(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let rows = self
            .engine
            .embed_texts(texts, None, 32)
            .map_err(eerr("textemb"))?;
        let dim = rows.first().map(|r| r.len()).unwrap_or(0);
        let mut m = vec![0f32; dim];
        for r in &rows {
            for (a, v) in m.iter_mut().zip(r) {
                *a += v / rows.len() as f32;
            }
        }
        Ok(m)
    }

    fn run_tune(&mut self, progress: &mut dyn FnMut(StudyEvent)) -> Result<()> {
        let base = self.cfg.suggest.clone();
        let configs = grid(&base);
        let opts = base.score.clone();
        // Source-side TEXTEMB vectors (seed-free).
        let mut src_textemb: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut dev_cache: BTreeMap<(String, String), SplitEval> = BTreeMap::new();
        for (t, seed) in self.missing_tune("grid") {
            let task = self.tasks[t].clone();
            let unit = Unit {
                phase: Phase::Tune,
                task: &task.name,
                init: "grid",
                seed,
            };
            let started = Instant::now();
            let te = terr(&task.name);
            let mut cfg = base.clone();
            cfg.seed = seed;
            let episode = Episode::sample(&task, cfg.shots, seed)?;
            let snap = self.store.snapshot().map_err(|e| te(e.into()))?;
            let base_model = store_base_model(&snap, &cfg).map_err(&te)?;
            let (target, _) = target_adapter(
                self.engine,
                &task,
                &episode,
                None,
                base_model.clone(),
                &cfg,
                &mut |_| {},
            )
            .map_err(&te)?;
            // Rankings of every similarity over all sources.
            let mut predictors: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
            let all = self.sources(t).len();
            for sim in Similarity::ALL {
                let hits = retrieve(
                    &snap,
                    &self.index,
                    &target,
                    sim,
                    cfg.method,
                    &task.name,
                    all,
                )
                .map_err(&te)?;
                predictors.insert(
                    sim.as_str().to_string(),
                    hits.iter()
                        .map(|h| (h.task.clone(), h.similarity as f64))
                        .collect(),
                );
            }
            let texts: Vec<&str> = episode.train.iter().map(|e| e.text.as_str()).collect();
            let q = self.textemb(&texts)?;
            let mut te_scores = BTreeMap::new();
            let mut ds_scores = BTreeMap::new();
            for s in self.sources(t) {
                let name = self.tasks[s].name.clone();
                if !src_textemb.contains_key(&name) {
                    let n = self.cfg.textemb_examples.min(self.tasks[s].train.len());
                    let texts: Vec<&str> = self.tasks[s].train[..n]
                        .iter()
                        .map(|e| e.text.as_str())
                        .collect();
                    let v = self.textemb(&texts)?;
                    src_textemb.insert(name.clone(), v);
                }
                te_scores.insert(
                    name.clone(),
                    crate::embed::cosine(&q, &src_textemb[&name]) as f64,
                );
                ds_scores.insert(name, self.tasks[s].train.len() as f64);
            }
            predictors.insert("textemb".into(), te_scores);
            predictors.insert("datasize".into(), ds_scores);
            // Every source scored once (scores are per candidate, so any top-K is a subset).
            let src: Vec<usize> = self.sources(t);
            let objs: Vec<LightweightObject> =
                src.iter().map(|&s| self.object(s)).collect::<Result<_>>()?;
            let refs: Vec<&LightweightObject> = objs.iter().collect();
            // Scored under each label prior; the candidates and the `rerank:` predictors are those
            // of the base setting's prior, the other prior's are `rerank:IND@PRIOR`.
            let mut by_prior: BTreeMap<&'static str, crate::transfer::Scores> = BTreeMap::new();
            for prior in LabelPrior::ALL {
                let mut pc = cfg.clone();
                pc.prior = prior;
                let sc = score(
                    self.engine,
                    &task,
                    &episode,
                    &target,
                    &refs,
                    &pc,
                    &mut |_| {},
                )
                .map_err(&te)?;
                by_prior.insert(prior.as_str(), sc);
            }
            let scores = &by_prior[cfg.prior.as_str()];
            let names: Vec<String> = src.iter().map(|&s| self.tasks[s].name.clone()).collect();
            let mut candidates: Vec<TunedCandidate> = Vec::with_capacity(names.len());
            for ((n, c), obj) in names.iter().zip(&scores.candidates).zip(&refs) {
                let gains: BTreeMap<String, [f64; 2]> = [
                    Indicator::Loss,
                    Indicator::LossCal,
                    Indicator::El2n,
                    Indicator::CosLogits,
                ]
                .into_iter()
                .map(|ind| {
                    let g = crate::transfer::Gain::of(c, &scores.bare, ind);
                    (ind.as_str().to_string(), [g.mean, g.se])
                })
                .collect();
                let [gain, gain_se] = gains[Indicator::Loss.as_str()];
                // A source's dev accuracy does not depend on the seed: evaluated once.
                let dev = match dev_cache.get(&(task.name.clone(), n.clone())) {
                    Some(d) => d.clone(),
                    None => {
                        let d = split_eval(
                            self.engine,
                            &task,
                            Some(obj),
                            self.limit(&task.dev),
                            &opts,
                        )?;
                        dev_cache.insert((task.name.clone(), n.clone()), d.clone());
                        d
                    }
                };
                candidates.push(TunedCandidate {
                    task: n.clone(),
                    scores: c.scores.clone(),
                    accuracy: c.accuracy,
                    gain,
                    gain_se,
                    gains,
                    dev: Some(dev),
                });
            }
            // A rerank predictor: each source's score of one indicator under one prior.
            let ranking = |sc: &crate::transfer::Scores, ind: Indicator| -> BTreeMap<String, f64> {
                names
                    .iter()
                    .zip(&sc.candidates)
                    .map(|(n, c)| {
                        (
                            n.clone(),
                            c.scores.get(ind.as_str()).copied().unwrap_or(f64::NAN),
                        )
                    })
                    .collect()
            };
            for ind in [
                Indicator::Loss,
                Indicator::LossCal,
                Indicator::CosLogits,
                Indicator::El2n,
                Indicator::Kl,
            ] {
                predictors.insert(format!("rerank:{}", ind.as_str()), ranking(scores, ind));
            }
            for (prior, sc) in &by_prior {
                if *prior == cfg.prior.as_str() {
                    continue;
                }
                for ind in [Indicator::Loss, Indicator::LossCal] {
                    predictors.insert(format!("rerank:{}@{prior}", ind.as_str()), ranking(sc, ind));
                }
            }
            let scratch = scratch_init(self.engine, &cfg, base_model).map_err(&te)?;
            // Each grid setting's answer, evaluated on the dev split (identical answers once).
            let mut cache: BTreeMap<String, f64> = BTreeMap::new();
            let bare_dev =
                split_eval(self.engine, &task, None, self.limit(&task.dev), &opts)?.accuracy;
            let mut answers = Vec::new();
            for c in &configs {
                let mut c = c.clone();
                c.seed = seed;
                let order = &predictors[c.similarity.as_str()];
                let mut ranked: Vec<(&String, &f64)> = order.iter().collect();
                ranked.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
                let pick: Vec<usize> = ranked
                    .iter()
                    .take(c.k)
                    .filter_map(|(n, _)| names.iter().position(|x| x == *n))
                    .collect();
                let ps = &by_prior[c.prior.as_str()];
                let sub = crate::transfer::Scores {
                    examples: ps.examples,
                    bare: ps.bare.clone(),
                    candidates: pick.iter().map(|&i| ps.candidates[i].clone()).collect(),
                };
                let sub_refs: Vec<&LightweightObject> = pick.iter().map(|&i| refs[i]).collect();
                let d = decide(self.engine, &task, &episode, &sub_refs, &sub, &scratch, &c)
                    .map_err(&te)?;
                let weights: BTreeMap<String, f64> = pick
                    .iter()
                    .zip(&d.weights)
                    .filter(|(_, w)| **w > 0.0)
                    .map(|(&i, w)| (names[i].clone(), *w))
                    .collect();
                let key = format!(
                    "{:?}/{:?}",
                    d.decision,
                    weights
                        .iter()
                        .map(|(n, w)| format!("{n}:{w:.6}"))
                        .collect::<Vec<_>>()
                ) + &crate::transfer::merge_name(c.effective_merge());
                let dev_accuracy = match (d.decision, cache.get(&key)) {
                    (Decision::Scratch, _) => bare_dev,
                    (_, Some(a)) => *a,
                    _ => {
                        let a = evaluate(
                            self.engine,
                            &task,
                            Some(&d.init),
                            self.limit(&task.dev),
                            &opts,
                            &mut |_, _| {},
                        )
                        .map_err(&te)?
                        .accuracy;
                        cache.insert(key, a);
                        a
                    }
                };
                answers.push(GridAnswer {
                    config: config_label(&c),
                    decision: d.decision,
                    weights,
                    dev_accuracy,
                });
            }
            let rec = TuneRecord {
                predictors,
                candidates,
                bare_accuracy: scores.bare.accuracy,
                bare_dev_accuracy: bare_dev,
                answers,
            };
            self.append(unit, started, &rec, progress)?;
        }
        self.run_heldout(&configs, progress)
    }

    /// The (target, tuning seed) pairs whose `tune` record `init` is not in the results file yet.
    fn missing_tune(&self, init: &str) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for t in self.targets() {
            for &seed in &self.cfg.tune_seeds {
                let unit = Unit {
                    phase: Phase::Tune,
                    task: &self.tasks[t].name,
                    init,
                    seed,
                };
                if !self.has(unit) {
                    out.push((t, seed));
                }
            }
        }
        out
    }

    /// The `heldout` records: every grid answer of a `grid` record on the dev split without the
    /// episode's dev shots. A best single source and the bare model are read from the grid record's
    /// per-example correctness; a merged answer is rebuilt from its recorded weights and evaluated.
    fn run_heldout(
        &mut self,
        configs: &[SuggestConfig],
        progress: &mut dyn FnMut(StudyEvent),
    ) -> Result<()> {
        let opts = self.cfg.suggest.score.clone();
        for (t, seed) in self.missing_tune("heldout") {
            let task = self.tasks[t].clone();
            let unit = Unit {
                phase: Phase::Tune,
                task: &task.name,
                init: "heldout",
                seed,
            };
            let grid_unit = Unit {
                init: "grid",
                ..unit
            };
            let Some(r) = self.find(grid_unit) else {
                continue;
            };
            let tr: TuneRecord = data(r)?;
            let started = Instant::now();
            let te = terr(&task.name);
            let dev = self.limit(&task.dev);
            let left: BTreeSet<usize> =
                Episode::dev_positions(&task, self.cfg.suggest.shots, seed)?
                    .into_iter()
                    .filter(|&i| i < dev.len())
                    .collect();
            let kept: Vec<usize> = (0..dev.len()).filter(|i| !left.contains(i)).collect();
            if kept.is_empty() {
                continue;
            }
            let kept_ex: Vec<Example> = kept.iter().map(|&i| dev[i].clone()).collect();
            let on_kept = |correct: &str| -> f64 {
                let b = correct.as_bytes();
                kept.iter().filter(|&&i| b.get(i) == Some(&b'1')).count() as f64 / kept.len() as f64
            };
            let bare = match self
                .find(Unit {
                    phase: Phase::Zero,
                    task: &task.name,
                    init: "bare",
                    seed: 0,
                })
                .map(data::<ZeroRecord>)
                .transpose()?
                .and_then(|z| z.dev)
            {
                Some(d) => on_kept(&d.correct),
                None => split_eval(self.engine, &task, None, &kept_ex, &opts)?.accuracy,
            };
            let single: BTreeMap<&str, f64> = tr
                .candidates
                .iter()
                .filter_map(|c| {
                    c.dev
                        .as_ref()
                        .map(|d| (c.task.as_str(), on_kept(&d.correct)))
                })
                .collect();
            let mut cache: BTreeMap<String, f64> = BTreeMap::new();
            let mut answers = BTreeMap::new();
            for a in &tr.answers {
                let acc = match a.decision {
                    Decision::Scratch => bare,
                    Decision::BestSingle if a.weights.len() == 1 => {
                        let name = a.weights.keys().next().expect("one");
                        match single.get(name.as_str()) {
                            Some(x) => *x,
                            None => continue,
                        }
                    }
                    _ => {
                        let Some(c) = configs.iter().find(|c| config_label(c) == a.config) else {
                            continue;
                        };
                        let mode = c.effective_merge();
                        let key = format!("{:?}{}", a.weights, crate::transfer::merge_name(mode));
                        match cache.get(&key) {
                            Some(x) => *x,
                            None => {
                                // Every weighted source, or no answer: a partial merge is another one.
                                let Some(idx) = a
                                    .weights
                                    .keys()
                                    .map(|name| self.tasks.iter().position(|x| &x.name == name))
                                    .collect::<Option<Vec<usize>>>()
                                else {
                                    continue;
                                };
                                let objs: Vec<LightweightObject> =
                                    idx.iter().map(|&i| self.object(i)).collect::<Result<_>>()?;
                                let w: Vec<f64> = a.weights.values().copied().collect();
                                let refs: Vec<&LightweightObject> = objs.iter().collect();
                                let merged = merge(&refs, &w, mode)
                                    .map_err(|e| te(TransferError::from(e)))?;
                                let x =
                                    split_eval(self.engine, &task, Some(&merged), &kept_ex, &opts)?
                                        .accuracy;
                                cache.insert(key, x);
                                x
                            }
                        }
                    }
                };
                answers.insert(a.config.clone(), acc);
            }
            let rec = HeldOutRecord {
                left_out: left.len(),
                examples: kept.len(),
                bare_accuracy: bare,
                answers,
            };
            self.append(unit, started, &rec, progress)?;
        }
        Ok(())
    }

    fn few_shot(
        &self,
        task: &Task,
        episode: &Episode,
        init: Option<LightweightObject>,
        seed: u64,
    ) -> Result<(f64, usize)> {
        let fs = self.cfg.few_shot;
        let mut tc = TrainConfig::new(self.cfg.suggest.method);
        tc.init = init;
        tc.lr = Some(fs.lr);
        tc.batch_size = fs.batch_size;
        tc.max_steps = Some(fs.steps);
        tc.eval_every = fs.eval_every;
        tc.patience = None;
        tc.keep_start = fs.keep_start;
        tc.seed = seed;
        tc.temperature = self.cfg.suggest.score.temperature;
        let labels = task.label_texts();
        let data = TrainData {
            label_texts: &labels,
            train: &episode.train,
            dev: &episode.dev,
            test: None,
        };
        let out = train(self.engine, &data, &tc, &mut |_| {}).map_err(eerr(&task.name))?;
        let acc = evaluate(
            self.engine,
            task,
            Some(&out.best.object),
            self.limit(&task.test),
            &self.cfg.suggest.score,
            &mut |_, _| {},
        )
        .map_err(terr(&task.name))?
        .accuracy;
        Ok((acc, out.best.step))
    }

    fn run_scratch(&mut self, progress: &mut dyn FnMut(StudyEvent)) -> Result<()> {
        // Every configured target, in the zoo or not: training from scratch needs no source.
        let targets: Vec<usize> = (0..self.tasks.len())
            .filter(|&i| {
                self.objects.contains_key(&self.tasks[i].name)
                    || self.cfg.targets.contains(&self.tasks[i].name)
            })
            .filter(|&i| {
                self.cfg.targets.is_empty() || self.cfg.targets.contains(&self.tasks[i].name)
            })
            .collect();
        for t in targets {
            for seed in self.cfg.seeds.clone() {
                let task = self.tasks[t].clone();
                let unit = Unit {
                    phase: Phase::Scratch,
                    task: &task.name,
                    init: "scratch",
                    seed,
                };
                if self.has(unit) {
                    continue;
                }
                let started = Instant::now();
                let episode = Episode::sample(&task, self.cfg.suggest.shots, seed)?;
                let (test, best_step) = self.few_shot(&task, &episode, None, seed)?;
                let rec = ScratchRecord { test, best_step };
                self.append(unit, started, &rec, progress)?;
            }
        }
        Ok(())
    }

    fn run_final(&mut self, progress: &mut dyn FnMut(StudyEvent)) -> Result<()> {
        for t in self.targets() {
            for seed in self.cfg.seeds.clone() {
                let task = self.tasks[t].clone();
                let unit = Unit {
                    phase: Phase::Final,
                    task: &task.name,
                    init: "suggest",
                    seed,
                };
                if self.has(unit) {
                    continue;
                }
                let started = Instant::now();
                let mut cfg = self.cfg.suggest.clone();
                cfg.seed = seed;
                let input = SuggestInput {
                    store: &self.store,
                    index: &self.index,
                    engine: self.engine,
                    task: &task,
                    adapter: None,
                };
                let (init, rep) = suggest(&input, &cfg, &mut |_| {}).map_err(terr(&task.name))?;
                let test = split_eval(
                    self.engine,
                    &task,
                    Some(&init),
                    self.limit(&task.test),
                    &cfg.score,
                )?;
                let episode = Episode::sample(&task, cfg.shots, seed)?;
                // A from-scratch answer means "train from scratch": exactly the scratch phase's run.
                let start = (rep.decision != Decision::Scratch).then_some(init);
                let (few_shot_test, few_shot_steps) =
                    self.few_shot(&task, &episode, start, seed)?;
                let rec = FinalRecord {
                    config: config_label(&cfg),
                    decision: rep.decision,
                    candidates: rep
                        .candidates
                        .iter()
                        .map(|c| (c.task.clone(), c.weight))
                        .collect(),
                    test,
                    few_shot_test,
                    few_shot_steps,
                };
                self.append(unit, started, &rec, progress)?;
            }
        }
        Ok(())
    }
}

/// Run the requested phases (resumable), then write the report into `OUT/report.md`.
pub fn run(
    cfg: &StudyConfig,
    engine: &Engine,
    max_len: usize,
    phases: &[Phase],
    progress: &mut dyn FnMut(StudyEvent),
) -> Result<()> {
    let mut study = Study::open(cfg, engine, max_len, progress)?;
    let mut phases = phases.to_vec();
    phases.sort();
    for p in phases {
        match p {
            Phase::Zero => study.run_zero(progress)?,
            Phase::Tune => study.run_tune(progress)?,
            Phase::Scratch => study.run_scratch(progress)?,
            Phase::Final => study.run_final(progress)?,
        }
    }
    let md = report(&study)?;
    let path = cfg.out.join("report.md");
    std::fs::write(&path, md).map_err(|source| StudyError::Io { path, source })?;
    Ok(())
}

fn mean_se(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (m, f64::NAN);
    }
    let v = xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    (m, (v / n as f64).sqrt())
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "-".into()
    }
}

fn pm(m: f64, se: f64) -> String {
    if se.is_finite() {
        format!("{:+.1} +- {:.1}", 100.0 * m, 100.0 * se)
    } else {
        format!("{:+.1}", 100.0 * m)
    }
}

fn pm_plain(m: f64, se: f64) -> String {
    if se.is_finite() {
        format!("{m:.1} +- {se:.1}")
    } else {
        format!("{m:.1}")
    }
}

fn data<T: for<'de> Deserialize<'de>>(r: &Record) -> Result<T> {
    serde_json::from_value(r.data.clone()).map_err(|source| StudyError::Record {
        key: r.key.clone(),
        source,
    })
}

/// The report of the study's records (markdown).
fn report(study: &Study<'_>) -> Result<String> {
    let mut md = String::new();
    let cfg = study.cfg;
    let get = |phase: Phase, task: &str, init: &str, seed: u64| {
        let unit = Unit {
            phase,
            task,
            init,
            seed,
        };
        study.find(unit)
    };
    let targets = study.targets();
    // The default as the grid spells it: a K above the number of sources scores every source, as the
    // grid's K = 13 does on the 14-task zoo.
    let default_in_grid = {
        let mut c = cfg.suggest.clone();
        let sources = targets
            .iter()
            .map(|&t| study.sources(t).len())
            .max()
            .unwrap_or(0);
        if sources > 0 {
            c.k = c.k.min(sources);
        }
        config_label(&c)
    };
    let _ = writeln!(md, "# Transfer study\n");
    let _ = writeln!(
        md,
        "Zoo `{}` ({} adapters of method {}), tasks `{}`, pipeline defaults `{}`, seeds {:?} (final, scratch), tuning seeds {:?}, {} shots per class, LIMITED training {}{}. Generated by `peftdb experiment transfer`; every number comes from the product's own path (store, `suggest`, `evaluate`).\n",
        cfg.zoo.display(),
        study.objects.len(),
        cfg.suggest.method,
        cfg.tasks.display(),
        config_label(&cfg.suggest),
        cfg.seeds,
        cfg.tune_seeds,
        cfg.suggest.shots,
        cfg.few_shot.schedule(),
        if cfg.few_shot.keep_start {
            ", the starting adapter kept as a checkpoint (step 0)"
        } else {
            ""
        }
    );

    // 0. The zoo.
    let _ = writeln!(md, "## 0. The zoo\n");
    let _ = writeln!(md, "Each adapter's training as its sidecar records it (`scripts/train-zoo.sh`, or `scripts/train-zoo-smollm2.sh` for SmolLM2: full train split, early stopping on the full dev split), and the bare model on the same test split.\n");
    let _ = writeln!(md, "| task | group | steps trained | best step | seconds | dev acc | test acc | bare test acc |");
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
    let mut total_seconds = 0.0;
    for (name, id) in &study.objects {
        let rec = study.store.object(*id).map_err(|e| StudyError::Store {
            path: study.store.path().to_path_buf(),
            source: Box::new(e),
        })?;
        let m = |k: &str| rec.metrics.get(k).copied().unwrap_or(f64::NAN);
        let bare = get(Phase::Zero, name, "bare", 0)
            .map(|r| data::<ZeroRecord>(r).map(|z| pct(z.test.accuracy)))
            .transpose()?
            .unwrap_or_else(|| "-".into());
        let group = study
            .tasks
            .iter()
            .find(|t| &t.name == name)
            .and_then(|t| t.group.clone())
            .unwrap_or_default();
        if m("train_seconds").is_finite() {
            total_seconds += m("train_seconds");
        }
        let _ = writeln!(
            md,
            "| {name} | {group} | {:.0} | {:.0} | {:.0} | {} | {} | {bare} |",
            m("steps_trained"),
            m("step"),
            m("train_seconds"),
            pct(m("dev_accuracy")),
            pct(m("test_accuracy")),
        );
    }
    let _ = writeln!(
        md,
        "\nTraining cost of the zoo: {:.0} s of wall-clock in all.\n",
        total_seconds
    );

    // 1. Ground truth (a).
    let _ = writeln!(
        md,
        "## 1. Zero-shot ground truth: each source applied unchanged (test split)\n"
    );
    let _ = writeln!(md, "A *transfer target* has a source whose test accuracy beats the bare model's by more than 2 paired SE of its test split.\n");
    let _ = writeln!(md, "| target | n test | bare | oracle source (a) | oracle acc | gain +- SE | transfer target | Average (param) | Average (dW) | Manual |");
    let _ = writeln!(md, "|---|---:|---:|---|---:|---:|:-:|---:|---:|---:|");
    let mut transfer_targets = BTreeSet::new();
    let mut zero: BTreeMap<String, BTreeMap<String, SplitEval>> = BTreeMap::new();
    for &t in &targets {
        let name = &study.tasks[t].name;
        let mut row: BTreeMap<String, SplitEval> = BTreeMap::new();
        for init in ["bare", "average-param", "average-delta", "manual"]
            .into_iter()
            .map(String::from)
            .chain(
                study
                    .sources(t)
                    .iter()
                    .map(|&s| format!("source:{}", study.tasks[s].name)),
            )
        {
            if let Some(r) = get(Phase::Zero, name, &init, 0) {
                let z: ZeroRecord = data(r)?;
                row.insert(init, z.test);
            }
        }
        let Some(bare) = row.get("bare").cloned() else {
            continue;
        };
        let best = row
            .iter()
            .filter(|(k, _)| k.starts_with("source:"))
            .max_by(|a, b| a.1.accuracy.total_cmp(&b.1.accuracy).then(b.0.cmp(a.0)));
        let (bname, bacc, bgain) = match best {
            Some((k, e)) => {
                let (g, se) = paired_accuracy(&e.correct, &bare.correct);
                if g > 2.0 * se {
                    transfer_targets.insert(name.clone());
                }
                (
                    k.trim_start_matches("source:").to_string(),
                    e.accuracy,
                    pm(g, se),
                )
            }
            None => ("-".into(), f64::NAN, "-".into()),
        };
        let acc = |k: &str| {
            row.get(k)
                .map(|e| pct(e.accuracy))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {bname} | {} | {bgain} | {} | {} | {} | {} |",
            bare.examples,
            pct(bare.accuracy),
            pct(bacc),
            if transfer_targets.contains(name) {
                "yes"
            } else {
                "no"
            },
            acc("average-param"),
            acc("average-delta"),
            acc("manual"),
        );
        zero.insert(name.clone(), row);
    }
    let _ = writeln!(
        md,
        "\nTransfer targets: {} of {} ({}).\n",
        transfer_targets.len(),
        zero.len(),
        transfer_targets
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 2. The answer (final) against the baselines.
    let _ = writeln!(
        md,
        "## 2. The answer of `suggest` at its defaults (test split)\n"
    );
    let _ = writeln!(md, "Zero-shot accuracy of the initialization (mean +- SE over seeds) against the bare model, Average of Checkpoints, Manual Division and the oracle single source; few-shot accuracy after LIMITED training from it against From Scratch on the same episodes. `top5` says whether the top 5 of `suggest`'s ranking (its candidates by the indicator, as its table lists them) holds the oracle source or one within 1 point of it (share of seeds).\n");
    let _ = writeln!(md, "| target | transfer | bare | answer | answer - bare | Average (param) | Manual | oracle | decisions | top5 | scratch (few-shot) | from answer (few-shot) | diff +- SE |");
    let _ = writeln!(
        md,
        "|---|:-:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    );
    let mut gains_tt = Vec::new();
    let mut vs_avg_tt = Vec::new();
    let mut worst: Option<(String, f64)> = None;
    let mut fs_diffs_tt = Vec::new();
    let mut top5_tt = Vec::new();
    let mut gains_all = Vec::new();
    for &t in &targets {
        let name = &study.tasks[t].name;
        let Some(row) = zero.get(name) else { continue };
        let bare = row["bare"].accuracy;
        let oracle = row
            .iter()
            .filter(|(k, _)| k.starts_with("source:"))
            .map(|(_, e)| e.accuracy)
            .fold(f64::NAN, f64::max);
        let good: BTreeSet<String> = row
            .iter()
            .filter(|(k, e)| k.starts_with("source:") && e.accuracy >= oracle - 0.01)
            .map(|(k, _)| k.trim_start_matches("source:").to_string())
            .collect();
        let mut acc = Vec::new();
        let mut fs = Vec::new();
        let mut diffs = Vec::new();
        let mut decisions: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut top5 = Vec::new();
        for &seed in &cfg.seeds {
            let Some(r) = get(Phase::Final, name, "suggest", seed) else {
                continue;
            };
            let f: FinalRecord = data(r)?;
            acc.push(f.test.accuracy);
            *decisions.entry(f.decision.as_str()).or_default() += 1;
            top5.push(f.candidates.iter().take(5).any(|(c, _)| good.contains(c)) as u8 as f64);
            if let Some(s) = get(Phase::Scratch, name, "scratch", seed) {
                let s: ScratchRecord = data(s)?;
                fs.push((s.test, f.few_shot_test));
                diffs.push(f.few_shot_test - s.test);
            }
        }
        if acc.is_empty() {
            continue;
        }
        let (am, ase) = mean_se(&acc);
        let is_tt = transfer_targets.contains(name);
        gains_all.push(am - bare);
        if is_tt {
            gains_tt.push(am - bare);
            if let Some(a) = row.get("average-param") {
                vs_avg_tt.push(am - a.accuracy);
            }
            fs_diffs_tt.extend(diffs.iter().copied());
            top5_tt.push(mean_se(&top5).0);
        }
        if worst.as_ref().is_none_or(|w| am - bare < w.1) {
            worst = Some((name.clone(), am - bare));
        }
        let (sm, _) = mean_se(&fs.iter().map(|x| x.0).collect::<Vec<_>>());
        let (fm, _) = mean_se(&fs.iter().map(|x| x.1).collect::<Vec<_>>());
        let (dm, dse) = mean_se(&diffs);
        let acc_of = |k: &str| {
            row.get(k)
                .map(|e| pct(e.accuracy))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} +- {} | {} | {} | {} | {} | {} | {:.0}% | {} | {} | {} |",
            if is_tt { "yes" } else { "no" },
            pct(bare),
            pct(am),
            if ase.is_finite() {
                format!("{:.1}", 100.0 * ase)
            } else {
                "-".into()
            },
            pm(am - bare, f64::NAN),
            acc_of("average-param"),
            acc_of("manual"),
            pct(oracle),
            decisions
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * mean_se(&top5).0,
            pct(sm),
            pct(fm),
            pm(dm, dse),
        );
    }
    let (g, gse) = mean_se(&gains_tt);
    let (va, vase) = mean_se(&vs_avg_tt);
    let (fd, fdse) = mean_se(&fs_diffs_tt);
    let _ = writeln!(
        md,
        "\n### Acceptance numbers (transfer targets: {})\n",
        gains_tt.len()
    );
    let _ = writeln!(md, "- the top 5 of `suggest`'s ranking holds the oracle source (or one within 1 point) for {:.0}% of transfer targets (averaged over seeds; goal 80%)", 100.0 * mean_se(&top5_tt).0);
    let _ = writeln!(
        md,
        "- answer minus bare model, mean over transfer targets: {} points (goal +3.0)",
        pm(g, gse)
    );
    let _ = writeln!(
        md,
        "- answer minus Average of Checkpoints (param), transfer targets: {} points (goal > 0)",
        pm(va, vase)
    );
    if let Some((w, d)) = &worst {
        let _ = writeln!(
            md,
            "- worst target, answer minus bare: {w} {:+.1} points (goal >= -1.0)",
            100.0 * d
        );
    }
    let _ = writeln!(
        md,
        "- answer minus bare over all {} targets: {} points",
        gains_all.len(),
        pm(mean_se(&gains_all).0, mean_se(&gains_all).1)
    );
    let _ = writeln!(md, "- few-shot from the answer minus From Scratch, paired over transfer targets x seeds ({} pairs): {} points (goal > 2 SE)\n", fs_diffs_tt.len(), pm(fd, fdse));

    // Dev ground truth (for tuning): each source unchanged on the full dev split (tune records), against
    // the bare model's dev split (zero record); a dev transfer target has a source beyond 2 paired SE.
    let mut dev_gains: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut dev_transfer: BTreeSet<String> = BTreeSet::new();
    for &t in &targets {
        let name = &study.tasks[t].name;
        let Some(bare_dev) = get(Phase::Zero, name, "bare", 0)
            .map(data::<ZeroRecord>)
            .transpose()?
            .and_then(|z| z.dev)
        else {
            continue;
        };
        let Some(seed) = cfg.tune_seeds.first() else {
            continue;
        };
        let Some(r) = get(Phase::Tune, name, "grid", *seed) else {
            continue;
        };
        let tr: TuneRecord = data(r)?;
        let mut g = BTreeMap::new();
        for c in &tr.candidates {
            if let Some(d) = &c.dev {
                let (m, se) = paired_accuracy(&d.correct, &bare_dev.correct);
                if m > 2.0 * se {
                    dev_transfer.insert(name.clone());
                }
                g.insert(c.task.clone(), m);
            }
        }
        if !g.is_empty() {
            dev_gains.insert(name.clone(), g);
        }
    }

    // 3. Predictors.
    let _ = writeln!(
        md,
        "## 3. Which ranking finds the sources that transfer (tuning seeds)\n"
    );
    let tuned = targets.iter().any(|&t| {
        cfg.tune_seeds
            .iter()
            .any(|&s| get(Phase::Tune, &study.tasks[t].name, "grid", s).is_some())
    });
    if !tuned {
        // Sections 3 and 4 both come from the tune phase's records.
        let _ = writeln!(md, "Not run: this results file holds no `tune` records (`--phases tune` computes them), so sections 3 and 4 are empty and the defaults `{}` were not chosen on this zoo.\n", config_label(&cfg.suggest));
        let _ = writeln!(
            md,
            "## 4. Tuning grid (dev split): answer's dev accuracy minus the bare model's\n"
        );
        let _ = writeln!(md, "Not run (see section 3).");
        return Ok(md);
    }
    let _ = writeln!(md, "NDCG (%) and rho (rank of the oracle source) of each predictor's ranking of the sources, relevance = zero-shot test gain over the bare model; mean over targets (+- SE) and seeds. `random` is the expectation over 200 seeded permutations. The dev columns (what the defaults are chosen on) use the same sources on the full dev split: NDCG against dev gains, and `top5` = share of the {} dev transfer targets (x tuning seeds) whose dev-oracle source (or one within 1 point of it) the predictor ranks in its top 5.\n", dev_transfer.len());
    let mut dev_pred: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for (name, g) in &dev_gains {
        let srcs: Vec<&String> = g.keys().collect();
        let gains: Vec<f64> = srcs.iter().map(|s| g[*s]).collect();
        let best = gains.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut records = Vec::new();
        for &seed in &cfg.tune_seeds {
            if let Some(r) = get(Phase::Tune, name, "grid", seed) {
                records.push(data::<TuneRecord>(r)?);
            }
        }
        for (p, sc) in records.iter().flat_map(|tr| &tr.predictors) {
            let scores: Vec<f64> = srcs
                .iter()
                .map(|s| sc.get(*s).copied().unwrap_or(f64::NEG_INFINITY))
                .collect();
            let e = dev_pred.entry(p.clone()).or_default();
            if let Some(n) = ndcg(&scores, &gains) {
                e.0.push(n);
            }
            if dev_transfer.contains(name) {
                let mut order: Vec<usize> = (0..srcs.len()).collect();
                order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
                let hit = order.iter().take(5).any(|&i| gains[i] >= best - 0.01);
                e.1.push(hit as u8 as f64);
            }
        }
    }
    let mut per_pred: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut random_ndcg = Vec::new();
    for &t in &targets {
        let name = &study.tasks[t].name;
        let Some(row) = zero.get(name) else { continue };
        let bare = row["bare"].accuracy;
        for &seed in &cfg.tune_seeds {
            let Some(r) = get(Phase::Tune, name, "grid", seed) else {
                continue;
            };
            let tr: TuneRecord = data(r)?;
            let srcs: Vec<String> = study
                .sources(t)
                .iter()
                .map(|&s| study.tasks[s].name.clone())
                .collect();
            let gains: Vec<f64> = srcs
                .iter()
                .map(|s| {
                    row.get(&format!("source:{s}"))
                        .map(|e| e.accuracy - bare)
                        .unwrap_or(f64::NAN)
                })
                .collect();
            if gains.iter().any(|g| !g.is_finite()) {
                continue;
            }
            for (p, sc) in &tr.predictors {
                let scores: Vec<f64> = srcs
                    .iter()
                    .map(|s| sc.get(s).copied().unwrap_or(f64::NEG_INFINITY))
                    .collect();
                if let (Some(n), Some(r)) = (ndcg(&scores, &gains), rho(&scores, &gains)) {
                    let e = per_pred.entry(p.clone()).or_default();
                    e.0.push(n);
                    e.1.push(r);
                }
            }
            // Random: expectation over seeded permutations.
            let mut rng_state = 0x5eed_u64 ^ seed;
            let mut acc = 0.0;
            let mut cnt = 0.0;
            for _ in 0..200 {
                let scores: Vec<f64> = (0..srcs.len())
                    .map(|_| {
                        rng_state = rng_state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (rng_state >> 11) as f64
                    })
                    .collect();
                if let Some(n) = ndcg(&scores, &gains) {
                    acc += n;
                    cnt += 1.0;
                }
            }
            if cnt > 0.0 {
                random_ndcg.push(acc / cnt);
            }
        }
    }
    let _ = writeln!(
        md,
        "| predictor | NDCG | rho | targets x seeds | NDCG (dev) | top5 (dev) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let mut rows: Vec<(String, f64, f64, f64, usize)> = per_pred
        .iter()
        .map(|(p, (n, r))| {
            let (nm, nse) = mean_se(n);
            (p.clone(), nm, nse, mean_se(r).0, n.len())
        })
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (p, nm, nse, rm, n) in &rows {
        let (dn, dt) = match dev_pred.get(p) {
            Some((n, t)) if !n.is_empty() => {
                let (m, se) = mean_se(n);
                (
                    pm_plain(m, se),
                    if t.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.0}%", 100.0 * mean_se(t).0)
                    },
                )
            }
            _ => ("-".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            md,
            "| {p} | {} | {rm:.2} | {n} | {dn} | {dt} |",
            pm_plain(*nm, *nse)
        );
    }
    let (rn, rse) = mean_se(&random_ndcg);
    let _ = writeln!(
        md,
        "| random | {} | - | {} | - | - |\n",
        pm_plain(rn, rse),
        random_ndcg.len()
    );

    // 4. The tuning grid.
    let _ = writeln!(
        md,
        "## 4. Tuning grid (dev split): answer's dev accuracy minus the bare model's\n"
    );
    // Held out: the answer on the dev split without the episode's dev shots it was selected on (the
    // `heldout` records); the full dev split only where a grid record has none yet.
    let mut held_units = 0usize;
    let mut full_units = 0usize;
    let mut full_targets: BTreeSet<String> = BTreeSet::new();
    // Per setting: dev gains of all targets, of transfer targets, per target (for the worst target's
    // mean over seeds), and decision counts.
    type CfgStats = (
        Vec<f64>,
        Vec<f64>,
        BTreeMap<String, Vec<f64>>,
        BTreeMap<String, usize>,
    );
    let mut per_cfg: BTreeMap<String, CfgStats> = BTreeMap::new();
    for &t in &targets {
        let name = &study.tasks[t].name;
        for &seed in &cfg.tune_seeds {
            let Some(r) = get(Phase::Tune, name, "grid", seed) else {
                continue;
            };
            let tr: TuneRecord = data(r)?;
            let held: Option<HeldOutRecord> = get(Phase::Tune, name, "heldout", seed)
                .map(data)
                .transpose()?;
            if held.is_some() {
                held_units += 1;
            } else {
                full_units += 1;
                full_targets.insert(name.clone());
            }
            for a in &tr.answers {
                let d = match &held {
                    Some(h) => match h.answers.get(&a.config) {
                        Some(x) => x - h.bare_accuracy,
                        None => continue,
                    },
                    None => a.dev_accuracy - tr.bare_dev_accuracy,
                };
                let e = per_cfg.entry(a.config.clone()).or_default();
                e.0.push(d);
                if dev_transfer.contains(name) {
                    e.1.push(d);
                }
                e.2.entry(name.clone()).or_default().push(d);
                *e.3.entry(a.decision.as_str().to_string()).or_default() += 1;
            }
        }
    }
    let held_out = "on the dev split without the episode's dev shots (the answer was scored, weighted and gated on them, so they are left out: held out)";
    let what = if full_units == 0 {
        held_out.to_string()
    } else {
        format!("{held_out} for {held_units} target x seed units; on the full dev split, the episode's dev shots included, for the {full_units} units without a `heldout` record ({}: an episode that takes every dev example, as 16 shots of each of 7 classes do of an 80-example split, leaves nothing to hold out)", full_targets.iter().cloned().collect::<Vec<_>>().join(", "))
    };
    let _ = writeln!(md, "Answer's accuracy {what}, minus the bare model's on the same examples. Mean over targets and tuning seeds; `transfer` over the {} dev transfer targets only (a source beats the bare model on the full dev split beyond 2 paired SE: {}); `worst` is the lowest target's mean over tuning seeds. The defaults are chosen from this table and the dev columns of section 3, never from the test split, by the rule: the highest mean over all targets among the settings whose worst target is within 1 point of the bare model.\n", dev_transfer.len(), dev_transfer.iter().cloned().collect::<Vec<_>>().join(", "));
    let worst_of = |per_target: &BTreeMap<String, Vec<f64>>| {
        per_target
            .values()
            .map(|v| mean_se(v).0)
            .fold(f64::INFINITY, f64::min)
    };
    let pick = per_cfg
        .iter()
        .filter(|(_, st)| worst_of(&st.2) >= -0.01 - 1e-9)
        .max_by(|a, b| mean_se(&a.1 .0).0.total_cmp(&mean_se(&b.1 .0).0))
        .map(|(c, _)| c.clone());
    match &pick {
        Some(p) => {
            let _ = writeln!(
                md,
                "By that rule: `{p}`{}.\n",
                if *p == default_in_grid {
                    " (the default)"
                } else {
                    " (not the default this report was run with)"
                }
            );
        }
        None => {
            let _ = writeln!(
                md,
                "By that rule: no setting keeps every target within 1 point.\n"
            );
        }
    }
    let _ = writeln!(
        md,
        "| setting | all targets | transfer targets | worst | decisions |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let mut rows: Vec<_> = per_cfg.into_iter().collect();
    rows.sort_by(|a, b| mean_se(&b.1 .0).0.total_cmp(&mean_se(&a.1 .0).0));
    for (c, (all, tt, per_target, dec)) in rows {
        let (m, se) = mean_se(&all);
        let (tm, tse) = mean_se(&tt);
        let w = worst_of(&per_target);
        let mark = if c == default_in_grid {
            " **(default)**"
        } else {
            ""
        };
        let _ = writeln!(
            md,
            "| `{c}`{mark} | {} | {} | {:+.1} | {} |",
            pm(m, se),
            pm(tm, tse),
            100.0 * w,
            dec.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_few_shot_protocol_keeps_its_old_form_unless_the_start_is_kept() {
        // The committed studies' scratch and final records were keyed with the derived Debug form.
        let fs = super::FewShot::default();
        assert_eq!(
            fs.protocol(),
            "FewShot { steps: 32, batch_size: 8, lr: 0.001, eval_every: 8 }"
        );
        let kept = super::FewShot {
            keep_start: true,
            ..fs
        };
        assert_eq!(kept.protocol(), format!("{};keep_start", fs.protocol()));
    }
}
