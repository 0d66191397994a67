//! The replication harness: does peftdb deliver what the TuPaTE and PEWE papers claim, on real tasks and a
//! real model?
//!
//! One [`ExperimentConfig`] drives four phases, every run of which is appended to a results file
//! (`results`) as it finishes, so an interrupted experiment resumes where it stopped:
//!
//! 1. **zoo** ([`run`]): for every task and method, an adapter trained on the task's training split, with
//!    an early (first evaluation) and a best (highest dev accuracy) checkpoint, written under
//!    `OUT/zoo/TASK/METHOD/{early,best}` with its dev/test accuracy and training-set size.
//! 2. **limited**: the LIMITED target setting. For every target task and seed, `shots` training and
//!    `dev_shots` dev examples per class are drawn; an adapter of `limited.method` is trained for a fixed
//!    number of steps from scratch and from every other task's zoo checkpoint (intermediate-task transfer).
//!    The transfer gain of a source is its test accuracy minus scratch's, averaged over seeds.
//! 3. **indicators** and **pewe** (leave-one-out): for every target and seed, the PEWE indicators of every
//!    other task's checkpoint on the target's few training examples (KL against the scratch adapter of the
//!    same seed), then the same training as in 2 from Average of Checkpoints, Manual Division (same
//!    group), and softmax(S/tau) ensembles per indicator. From Scratch and Best Single are the runs of 2.
//! 4. **textemb**: the TEXTEMB baseline's task vectors (the base model's mean last-layer token state over
//!    the training texts).
//!
//! `report` turns the results into the markdown report, CSVs and PNG plots; `metrics` holds rho and
//! NDCG. Runs are ordered zoo, textemb, then per seed and per target (scratch, every source, the
//! indicators and the PEWE initializations), so a run cut short still has whole targets to report.

pub(crate) mod compare;
pub(crate) mod metrics;
pub(crate) mod plot;
pub(crate) mod predict;
pub mod records;
pub(crate) mod report;
pub(crate) mod results;
pub mod transfer;

pub use compare::{compare, markdown as comparison_markdown, Comparison};
pub use report::{write_report, ReportData};
pub use results::{Record, ResultsError, ResultsFile};

use crate::engine::train::{train, MethodSpec, TrainConfig, TrainData};
use crate::engine::{Engine, EngineError};
use crate::ensemble::{average, merge, softmax_weights, EnsembleError, MergeMode};
use crate::error::{ExportError, ReadError};
use crate::object::formats::{read_adapter, write_adapter, ReadOptions};
use crate::object::{LightweightObject, MethodKind};
use crate::rerank::stage::{rerank, RerankError, RerankInput, RerankOptions};
use crate::rerank::Indicator;
use crate::task::TaskError;
use crate::task::{few_shot, shuffle, Example, Task};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use thiserror::Error;

/// Errors of the harness.
#[derive(Debug, Error)]
pub enum ExperimentError {
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("task {task}: {source}")]
    Engine {
        task: String,
        #[source]
        source: Box<EngineError>,
    },
    #[error("task {task}: {source}")]
    Rerank {
        task: String,
        #[source]
        source: Box<RerankError>,
    },
    #[error("task {task}: {source}")]
    Ensemble {
        task: String,
        #[source]
        source: EnsembleError,
    },
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("report: {0}")]
    Report(String),
}

type Result<T> = std::result::Result<T, ExperimentError>;

/// Settings of the zoo phase.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZooConfig {
    pub methods: Vec<MethodKind>,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub prefix_len: usize,
    pub bottleneck: usize,
    /// Training examples used (the first N of train.jsonl; it is stratified already); `None`: all.
    pub train_cap: Option<usize>,
    pub steps: usize,
    pub batch_size: usize,
    pub eval_every: usize,
    /// Dev and test examples evaluated (a fixed seeded subset).
    pub dev_cap: usize,
    pub test_cap: usize,
    pub seed: u64,
    /// Learning rate per method; a method not listed uses its default ([`MethodSpec::default_lr`]).
    #[serde(default)]
    pub lr: BTreeMap<MethodKind, f64>,
}

/// Settings of the LIMITED target runs (transfer gains and PEWE initializations).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitedConfig {
    /// Method of the target adapter; sources are the zoo's checkpoints of this method.
    pub method: MethodKind,
    /// `early` or `best` zoo checkpoint as the source.
    pub checkpoint: String,
    /// Training / dev examples per class.
    pub shots: usize,
    pub dev_shots: usize,
    pub steps: usize,
    pub batch_size: usize,
    /// `None`: the method's default learning rate.
    pub lr: Option<f64>,
    pub test_cap: usize,
    pub seeds: Vec<u64>,
    /// The tasks (folder names) that are LIMITED targets; empty: every task. Every task of the config
    /// stays a source whatever this says, so a costlier setting can be run on a few targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
}

impl LimitedConfig {
    /// Whether task `name` is a LIMITED target (`targets` empty: every task is).
    pub fn is_target(&self, name: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == name)
    }

    /// How many of `n_tasks` tasks are targets (`targets` are checked against the tasks on load).
    pub fn target_count(&self, n_tasks: usize) -> usize {
        if self.targets.is_empty() {
            n_tasks
        } else {
            self.targets.len()
        }
    }
}

/// Settings of the PEWE phase.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeweConfig {
    pub enabled: bool,
    pub indicators: Vec<Indicator>,
    /// Softmax temperature over per-example indicator scores (see [`pewe_weights`]).
    pub tau: f64,
    /// Examples the indicators are computed on (the first N of the target's few-shot training set).
    pub indicator_examples: usize,
}

/// Everything an experiment run needs to know (schema/experiment_config.schema.json).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// Folder of task folders (task.json + train/dev/test.jsonl); relative paths are relative to the
    /// config file.
    pub tasks_dir: PathBuf,
    /// Task folder names; empty: every folder in `tasks_dir`.
    #[serde(default)]
    pub tasks: Vec<String>,
    pub max_len: usize,
    /// Label-scoring temperature (cosine / T).
    pub temperature: f64,
    pub zoo: ZooConfig,
    pub limited: LimitedConfig,
    pub pewe: PeweConfig,
    /// Training texts per task for the TEXTEMB baseline.
    pub textemb_examples: usize,
}

fn hash12(v: &serde_json::Value) -> String {
    blake3::hash(v.to_string().as_bytes()).to_hex()[..12].to_string()
}

impl ExperimentConfig {
    /// Read a config file (JSON, `schema/experiment_config.schema.json`).
    pub fn load(path: &Path) -> Result<ExperimentConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: ExperimentConfig =
            serde_json::from_str(&text).map_err(|e| ExperimentError::Config {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        if cfg.tasks_dir.is_relative() {
            if let Some(parent) = path.parent() {
                cfg.tasks_dir = parent.join(&cfg.tasks_dir);
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |detail: &str| {
            Err(ExperimentError::Config {
                path: path.to_path_buf(),
                detail: detail.to_string(),
            })
        };
        let z = &self.zoo;
        let l = &self.limited;
        if z.methods.is_empty() {
            return bad("zoo.methods is empty");
        }
        if !z.methods.contains(&l.method) {
            return bad(
                "limited.method must be one of zoo.methods (its sources come from the zoo)",
            );
        }
        if l.checkpoint != "early" && l.checkpoint != "best" {
            return bad("limited.checkpoint must be \"early\" or \"best\"");
        }
        if [
            z.steps,
            z.batch_size,
            z.eval_every,
            z.dev_cap,
            z.test_cap,
            l.shots,
            l.dev_shots,
            l.steps,
            l.batch_size,
            l.test_cap,
            self.max_len,
        ]
        .contains(&0)
        {
            return bad(
                "every count (steps, batch sizes, caps, shots, max_len) must be at least 1",
            );
        }
        if l.seeds.is_empty() {
            return bad("limited.seeds is empty");
        }
        if !(self.pewe.tau.is_finite() && self.pewe.tau > 0.0) {
            return bad("pewe.tau must be positive");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature must be positive");
        }
        Ok(())
    }

    /// Protocol hash of a phase: changes whenever a setting that phase's results depend on changes.
    ///
    /// The lists of LIMITED seeds and targets are left out: a run's seed and task are part of its own
    /// key, so adding seeds, targets (or tasks) to a config extends a finished experiment instead of
    /// invalidating it.
    pub fn protocol_hash(&self, phase: &str) -> String {
        let base = json!({"max_len": self.max_len, "temperature": self.temperature});
        let mut limited = json!(self.limited);
        if let Some(m) = limited.as_object_mut() {
            m.remove("seeds");
            m.remove("targets");
        }
        match phase {
            "zoo" => hash12(&json!([base, self.zoo])),
            "textemb" => hash12(&json!([self.max_len, self.textemb_examples])),
            "limited" => hash12(&json!([base, self.zoo, limited])),
            _ => hash12(&json!([
                base,
                self.zoo,
                limited,
                self.pewe.indicators,
                self.pewe.indicator_examples,
                self.pewe.tau
            ])),
        }
    }

    /// The task folders, in name order.
    pub fn task_dirs(&self) -> Result<Vec<PathBuf>> {
        let mut names = self.tasks.clone();
        if names.is_empty() {
            let rd = std::fs::read_dir(&self.tasks_dir).map_err(|source| ExperimentError::Io {
                path: self.tasks_dir.clone(),
                source,
            })?;
            for e in rd.flatten() {
                if e.path().join("task.json").is_file() {
                    names.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        if names.len() < 2 {
            return Err(ExperimentError::Config {
                path: self.tasks_dir.clone(),
                detail: "the experiment needs at least 2 tasks".into(),
            });
        }
        Ok(names.iter().map(|n| self.tasks_dir.join(n)).collect())
    }
}

/// Progress of a run (the library never prints).
#[derive(Debug, Clone)]
pub enum ExperimentEvent<'a> {
    /// A run is starting; `done` of `total` runs are finished (cached ones included).
    Start {
        key: &'a str,
        done: usize,
        total: usize,
    },
    /// A run finished and was recorded.
    Finished { record: &'a Record },
}

/// What [`run`] did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub total: usize,
    pub cached: usize,
    pub ran: usize,
    /// Whether the run stopped early because `max_runs` was reached.
    pub stopped: bool,
}

/// Options of [`run`] that do not change results.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this many new runs (to split a long experiment into sessions).
    pub max_runs: Option<usize>,
}

/// A fixed subset of `n` examples (seeded shuffle, then file order), the same in every run.
pub fn fixed_subset(examples: &[Example], n: usize) -> Vec<Example> {
    if examples.len() <= n {
        return examples.to_vec();
    }
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut idx, &mut ChaCha8Rng::seed_from_u64(0x7e57));
    let mut keep = idx[..n].to_vec();
    keep.sort();
    keep.into_iter().map(|i| examples[i].clone()).collect()
}

/// softmax(S / tau) weights of an indicator's per-example scores ([`Indicator::per_example`]).
pub fn pewe_weights(
    scores: &[f64],
    ind: Indicator,
    examples: usize,
    tau: f64,
) -> std::result::Result<Vec<f64>, EnsembleError> {
    let s: Vec<f64> = scores
        .iter()
        .map(|&x| ind.per_example(x, examples))
        .collect();
    softmax_weights(&s, tau)
}

/// Where the zoo's adapter of a task, method and checkpoint lives.
pub fn zoo_dir(out: &Path, task: &str, method: MethodKind, ckpt: &str) -> PathBuf {
    out.join("zoo").join(task).join(method.as_str()).join(ckpt)
}

/// Where the from-scratch LIMITED adapter of a target and seed lives (the KL indicator's reference),
/// under the LIMITED protocol hash so that two settings can share one output folder and its zoo.
pub(crate) fn scratch_dir(out: &Path, cfg: &ExperimentConfig, task: &str, seed: u64) -> PathBuf {
    out.join("scratch")
        .join(cfg.protocol_hash("limited"))
        .join(task)
        .join(format!("seed{seed}"))
}

fn write_fresh(obj: &LightweightObject, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| ExperimentError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if let Some(p) = dir.parent() {
        std::fs::create_dir_all(p).map_err(|source| ExperimentError::Io {
            path: p.to_path_buf(),
            source,
        })?;
    }
    write_adapter(obj, dir)?;
    Ok(())
}

/// One planned run.
#[derive(Debug, Clone)]
enum Job {
    Zoo { task: usize, method: MethodKind },
    TextEmb { task: usize },
    Limited { task: usize, init: Init, seed: u64 },
    Indicators { task: usize, seed: u64 },
}

#[derive(Debug, Clone, PartialEq)]
enum Init {
    Scratch,
    Source(usize),
    Average,
    Manual,
    Ensemble(Indicator),
}

impl Init {
    fn label(&self, tasks: &[Task]) -> String {
        match self {
            Init::Scratch => "scratch".into(),
            Init::Source(s) => format!("source:{}", tasks[*s].name),
            Init::Average => "average".into(),
            Init::Manual => "manual".into(),
            Init::Ensemble(i) => format!("ensemble:{}", i.as_str()),
        }
    }
}

struct Runner<'a> {
    cfg: &'a ExperimentConfig,
    engine: &'a Engine,
    out: &'a Path,
    tasks: Vec<Task>,
    results: ResultsFile,
}

impl Runner<'_> {
    fn key(&self, job: &Job) -> String {
        let t = |i: usize| self.tasks[i].name.as_str();
        match job {
            Job::Zoo { task, method } => Record::make_key(
                "zoo",
                t(*task),
                method.as_str(),
                self.cfg.zoo.seed,
                &self.cfg.protocol_hash("zoo"),
            ),
            Job::TextEmb { task } => Record::make_key(
                "textemb",
                t(*task),
                "base",
                0,
                &self.cfg.protocol_hash("textemb"),
            ),
            Job::Limited { task, init, seed } => {
                let phase = match init {
                    Init::Scratch | Init::Source(_) => "limited",
                    _ => "pewe",
                };
                Record::make_key(
                    "limited",
                    t(*task),
                    &init.label(&self.tasks),
                    *seed,
                    &self.cfg.protocol_hash(phase),
                )
            }
            Job::Indicators { task, seed } => Record::make_key(
                "indicators",
                t(*task),
                "zoo",
                *seed,
                &self.cfg.protocol_hash("pewe"),
            ),
        }
    }

    fn plan(&self) -> Vec<Job> {
        let n = self.tasks.len();
        let mut jobs = Vec::new();
        for task in 0..n {
            for &method in &self.cfg.zoo.methods {
                jobs.push(Job::Zoo { task, method });
            }
        }
        for task in 0..n {
            jobs.push(Job::TextEmb { task });
        }
        // Per seed, one target at a time (scratch, every source, then its PEWE runs), so a run cut short
        // leaves whole targets with both their gains and their PEWE results.
        let targets: Vec<usize> = (0..n)
            .filter(|&t| self.cfg.limited.is_target(&self.tasks[t].name))
            .collect();
        for &seed in &self.cfg.limited.seeds {
            for &task in &targets {
                jobs.push(Job::Limited {
                    task,
                    init: Init::Scratch,
                    seed,
                });
                for s in (0..n).filter(|&s| s != task) {
                    jobs.push(Job::Limited {
                        task,
                        init: Init::Source(s),
                        seed,
                    });
                }
                if self.cfg.pewe.enabled {
                    jobs.push(Job::Indicators { task, seed });
                    jobs.push(Job::Limited {
                        task,
                        init: Init::Average,
                        seed,
                    });
                    jobs.push(Job::Limited {
                        task,
                        init: Init::Manual,
                        seed,
                    });
                    for &ind in &self.cfg.pewe.indicators {
                        jobs.push(Job::Limited {
                            task,
                            init: Init::Ensemble(ind),
                            seed,
                        });
                    }
                }
            }
        }
        jobs
    }

    fn engine_err(&self, task: usize) -> impl Fn(EngineError) -> ExperimentError + '_ {
        move |e| ExperimentError::Engine {
            task: self.tasks[task].name.clone(),
            source: Box::new(e),
        }
    }

    fn zoo_object(&self, task: usize, method: MethodKind, ckpt: &str) -> Result<LightweightObject> {
        let dir = zoo_dir(self.out, &self.tasks[task].name, method, ckpt);
        Ok(read_adapter(&dir, &ReadOptions::default())?)
    }

    fn labels(&self, task: usize) -> Vec<String> {
        self.tasks[task].label_texts()
    }

    fn run_job(&mut self, job: &Job, key: String) -> Result<Record> {
        let t0 = Instant::now();
        let (phase, task, init, seed, data) = match job {
            Job::Zoo { task, method } => {
                let data = self.zoo_run(*task, *method)?;
                (
                    "zoo",
                    *task,
                    method.as_str().to_string(),
                    self.cfg.zoo.seed,
                    data,
                )
            }
            Job::TextEmb { task } => {
                let t = &self.tasks[*task];
                let ex = fixed_subset(&t.train, self.cfg.textemb_examples.max(1));
                let texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
                let rows = self
                    .engine
                    .embed_texts(&texts, None, 32)
                    .map_err(self.engine_err(*task))?;
                let dim = rows.first().map(|r| r.len()).unwrap_or(0);
                let mut mean = vec![0f64; dim];
                for r in &rows {
                    for (m, x) in mean.iter_mut().zip(r) {
                        *m += *x as f64 / rows.len() as f64;
                    }
                }
                (
                    "textemb",
                    *task,
                    "base".to_string(),
                    0,
                    to_data(&records::TextembData {
                        vector: mean,
                        train_size: t.train.len(),
                        examples: rows.len(),
                    }),
                )
            }
            Job::Limited { task, init, seed } => {
                let data = self.limited_run(*task, init, *seed)?;
                ("limited", *task, init.label(&self.tasks), *seed, data)
            }
            Job::Indicators { task, seed } => {
                let data = self.indicators_run(*task, *seed)?;
                ("indicators", *task, "zoo".to_string(), *seed, data)
            }
        };
        let protocol = key.rsplit('@').next().unwrap_or_default().to_string();
        let rec = Record {
            key,
            phase: phase.into(),
            task: self.tasks[task].name.clone(),
            init,
            seed,
            protocol,
            seconds: t0.elapsed().as_secs_f64(),
            data,
        };
        self.results.append(rec.clone())?;
        Ok(rec)
    }

    fn zoo_run(&self, task: usize, method: MethodKind) -> Result<serde_json::Value> {
        let z = &self.cfg.zoo;
        let t = &self.tasks[task];
        let labels = self.labels(task);
        let train_ex: Vec<Example> = match z.train_cap {
            Some(c) => t.train.iter().take(c).cloned().collect(),
            None => t.train.clone(),
        };
        let dev = fixed_subset(&t.dev, z.dev_cap);
        let test = fixed_subset(&t.test, z.test_cap);
        let tc = self.train_config(
            method,
            z.lr.get(&method).copied(),
            (z.steps, z.eval_every, z.batch_size),
            z.seed,
        );
        let data = TrainData {
            label_texts: &labels,
            train: &train_ex,
            dev: &dev,
            test: Some(&test),
        };
        let out = train(self.engine, &data, &tc, &mut |_| {}).map_err(self.engine_err(task))?;
        for (ck, name) in [(&out.early, "early"), (&out.best, "best")] {
            write_fresh(&ck.object, &zoo_dir(self.out, &t.name, method, name))?;
        }
        let ck = |c: &crate::engine::train::Checkpoint| records::CheckpointData {
            step: c.step,
            dev_accuracy: c.dev_accuracy,
            test_accuracy: c.test_accuracy,
        };
        Ok(to_data(&records::ZooData {
            method: method.as_str().to_string(),
            train_size: t.train.len(),
            train_used: train_ex.len(),
            early: ck(&out.early),
            best: ck(&out.best),
            history: out
                .history
                .iter()
                .map(|h| records::HistoryPoint {
                    step: h.step,
                    dev_accuracy: h.dev_accuracy,
                    dev_loss: h.dev_loss,
                    train_loss: h.train_loss,
                })
                .collect(),
        }))
    }

    /// Training options shared by the zoo and the LIMITED runs: the zoo's adapter sizes, a fixed number
    /// of steps (no early stopping), the label-scoring temperature. `shape` is (steps, eval_every, batch).
    fn train_config(
        &self,
        method: MethodKind,
        lr: Option<f64>,
        shape: (usize, usize, usize),
        seed: u64,
    ) -> TrainConfig {
        let z = &self.cfg.zoo;
        let mut tc = TrainConfig::new(method);
        tc.spec = MethodSpec::new(method);
        tc.spec.r = z.lora_r;
        tc.spec.alpha = z.lora_alpha;
        tc.spec.num_virtual_tokens = z.prefix_len;
        tc.spec.bottleneck_size = Some(z.bottleneck);
        tc.lr = lr;
        (tc.max_steps, tc.eval_every, tc.batch_size) = (Some(shape.0), shape.1, shape.2);
        tc.patience = None;
        tc.seed = seed;
        tc.temperature = self.cfg.temperature;
        tc
    }

    fn few_shot_sets(&self, task: usize, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
        let t = &self.tasks[task];
        let l = &self.cfg.limited;
        let nl = t.labels.len();
        let train_ex = few_shot(&t.train, nl, l.shots, seed)?;
        let dev_ex = few_shot(&t.dev, nl, l.dev_shots, seed.wrapping_add(1_000_003))?;
        Ok((train_ex, dev_ex))
    }

    fn sources(&self, task: usize) -> Result<(Vec<usize>, Vec<LightweightObject>)> {
        let l = &self.cfg.limited;
        let idx: Vec<usize> = (0..self.tasks.len()).filter(|&s| s != task).collect();
        let objs = idx
            .iter()
            .map(|&s| self.zoo_object(s, l.method, &l.checkpoint))
            .collect::<Result<Vec<_>>>()?;
        Ok((idx, objs))
    }

    fn indicator_record(&self, task: usize, seed: u64) -> Result<&Record> {
        let key = self.key(&Job::Indicators { task, seed });
        self.results
            .get(&key)
            .ok_or_else(|| ExperimentError::Report(format!("missing indicator scores for {key}")))
    }

    fn init_object(
        &self,
        task: usize,
        init: &Init,
        seed: u64,
    ) -> Result<(Option<LightweightObject>, records::InitData)> {
        let l = &self.cfg.limited;
        let name = self.tasks[task].name.clone();
        let ens = |source| ExperimentError::Ensemble {
            task: name.clone(),
            source,
        };
        Ok(match init {
            Init::Scratch => (None, records::InitData::default()),
            Init::Source(s) => (
                Some(self.zoo_object(*s, l.method, &l.checkpoint)?),
                records::InitData::default(),
            ),
            Init::Average => {
                let (_, objs) = self.sources(task)?;
                let refs: Vec<&LightweightObject> = objs.iter().collect();
                (
                    Some(average(&refs).map_err(ens)?),
                    records::InitData::default(),
                )
            }
            Init::Manual => {
                let (idx, objs) = self.sources(task)?;
                let group = &self.tasks[task].group;
                let same: Vec<&LightweightObject> = idx
                    .iter()
                    .zip(&objs)
                    .filter(|(s, _)| group.is_some() && self.tasks[**s].group == *group)
                    .map(|(_, o)| o)
                    .collect();
                let members: Vec<&str> = idx
                    .iter()
                    .filter(|s| group.is_some() && self.tasks[**s].group == *group)
                    .map(|s| self.tasks[*s].name.as_str())
                    .collect();
                if same.is_empty() {
                    // No other task of the group: Manual Division falls back to the plain average.
                    let refs: Vec<&LightweightObject> = objs.iter().collect();
                    (
                        Some(average(&refs).map_err(ens)?),
                        records::InitData {
                            group_members: Some(Vec::new()),
                            fallback: Some("average".into()),
                            ..Default::default()
                        },
                    )
                } else {
                    (
                        Some(average(&same).map_err(ens)?),
                        records::InitData {
                            group_members: Some(members.iter().map(|m| m.to_string()).collect()),
                            ..Default::default()
                        },
                    )
                }
            }
            Init::Ensemble(ind) => {
                let rec = self.indicator_record(task, seed)?;
                // Every field is required (typed): a missing count would silently rescale the weights.
                let data: records::IndicatorsData = rec.data_as()?;
                let bad = |what: String| {
                    ExperimentError::Report(format!(
                        "record {} has {what}; remove that line from results.jsonl and re-run to compute it again",
                        rec.key
                    ))
                };
                let scores: Vec<f64> = data
                    .scores
                    .get(ind.as_str())
                    .cloned()
                    .ok_or_else(|| bad(format!("no {} scores", ind.as_str())))?;
                let n = data.examples;
                if n == 0 {
                    return Err(bad("an \"examples\" count of 0".to_string()));
                }
                let (idx, objs) = self.sources(task)?;
                if scores.len() != objs.len() {
                    return Err(ExperimentError::Report(format!(
                        "indicator {} has {} scores for {} sources",
                        ind.as_str(),
                        scores.len(),
                        objs.len()
                    )));
                }
                let w = pewe_weights(&scores, *ind, n, self.cfg.pewe.tau).map_err(ens)?;
                let refs: Vec<&LightweightObject> = objs.iter().collect();
                let obj = merge(&refs, &w, MergeMode::Param).map_err(ens)?;
                let names: Vec<&str> = idx.iter().map(|s| self.tasks[*s].name.as_str()).collect();
                (
                    Some(obj),
                    records::InitData {
                        sources: Some(names.iter().map(|n| n.to_string()).collect()),
                        weights: Some(w),
                        ..Default::default()
                    },
                )
            }
        })
    }

    fn limited_run(&self, task: usize, init: &Init, seed: u64) -> Result<serde_json::Value> {
        let l = &self.cfg.limited;
        let t = &self.tasks[task];
        let labels = self.labels(task);
        let (train_ex, dev_ex) = self.few_shot_sets(task, seed)?;
        let test = fixed_subset(&t.test, l.test_cap);
        let (obj, extra) = self.init_object(task, init, seed)?;
        let mut tc = self.train_config(l.method, l.lr, (l.steps, l.steps, l.batch_size), seed);
        tc.init = obj;
        let data = TrainData {
            label_texts: &labels,
            train: &train_ex,
            dev: &dev_ex,
            test: Some(&test),
        };
        let out = train(self.engine, &data, &tc, &mut |_| {}).map_err(self.engine_err(task))?;
        if *init == Init::Scratch {
            // The reference adapter O~ of the KL indicator for this target and seed.
            write_fresh(
                &out.best.object,
                &scratch_dir(self.out, self.cfg, &t.name, seed),
            )?;
        }
        Ok(to_data(&records::LimitedData {
            test_accuracy: out.best.test_accuracy,
            dev_accuracy: out.best.dev_accuracy,
            train_examples: train_ex.len(),
            test_examples: test.len(),
            init: extra,
        }))
    }

    fn indicators_run(&self, task: usize, seed: u64) -> Result<serde_json::Value> {
        let t = &self.tasks[task];
        let labels = self.labels(task);
        let (train_ex, _) = self.few_shot_sets(task, seed)?;
        let n = self.cfg.pewe.indicator_examples.max(1).min(train_ex.len());
        let examples = &train_ex[..n];
        let reference = read_adapter(
            &scratch_dir(self.out, self.cfg, &t.name, seed),
            &Default::default(),
        )?;
        let (idx, objs) = self.sources(task)?;
        let refs: Vec<&LightweightObject> = objs.iter().collect();
        let opts = RerankOptions {
            indicators: self.cfg.pewe.indicators.clone(),
            score: crate::engine::scoring::ScoreOptions {
                temperature: self.cfg.temperature,
                batch_size: 32,
            },
            m_steps: 10,
            seed,
            ..Default::default()
        };
        let input = RerankInput {
            engine: self.engine,
            label_texts: &labels,
            examples,
            reference: Some(&reference),
            weights: None,
        };
        let scores =
            rerank(&input, &refs, &opts, &mut |_, _| {}).map_err(|e| ExperimentError::Rerank {
                task: t.name.clone(),
                source: Box::new(e),
            })?;
        let mut by_ind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for ind in &self.cfg.pewe.indicators {
            by_ind.insert(
                ind.as_str().to_string(),
                scores.iter().map(|c| c.scores[ind.as_str()]).collect(),
            );
        }
        Ok(to_data(&records::IndicatorsData {
            sources: idx.iter().map(|s| self.tasks[*s].name.clone()).collect(),
            examples: n,
            scores: by_ind,
            accuracy: scores.iter().map(|c| c.accuracy).collect(),
        }))
    }
}

/// A record's data from its phase's type (the JSON the harness always wrote: keys sorted).
fn to_data<T: serde::Serialize>(data: &T) -> serde_json::Value {
    serde_json::to_value(data).expect("records serialize: plain numbers, strings and lists")
}

/// Load the tasks of a config.
///
/// A LIMITED target that is not one of the tasks is an error naming the tasks folder.
pub fn load_tasks(cfg: &ExperimentConfig) -> Result<Vec<Task>> {
    let tasks: Vec<Task> = cfg
        .task_dirs()?
        .iter()
        .map(|d| Task::load(d).map_err(ExperimentError::from))
        .collect::<Result<_>>()?;
    if let Some(t) = cfg
        .limited
        .targets
        .iter()
        .find(|t| !tasks.iter().any(|x| &x.name == *t))
    {
        return Err(ExperimentError::Config {
            path: cfg.tasks_dir.clone(),
            detail: format!(
                "limited.targets names {t:?}, which is not one of the config's tasks here; \
                 list task folder names"
            ),
        });
    }
    Ok(tasks)
}

/// Run (or resume) the experiment into `out` (results.jsonl, zoo/, scratch/).
pub fn run(
    cfg: &ExperimentConfig,
    engine: &Engine,
    out: &Path,
    opts: &RunOptions,
    progress: &mut dyn FnMut(ExperimentEvent<'_>),
) -> Result<RunSummary> {
    std::fs::create_dir_all(out).map_err(|source| ExperimentError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let tasks = load_tasks(cfg)?;
    let results = ResultsFile::open(&out.join("results.jsonl"))?;
    let mut runner = Runner {
        cfg,
        engine,
        out,
        tasks,
        results,
    };
    let jobs = runner.plan();
    let mut summary = RunSummary {
        total: jobs.len(),
        ..Default::default()
    };
    for (i, job) in jobs.iter().enumerate() {
        let key = runner.key(job);
        if runner.results.get(&key).is_some() && outputs_present(&runner, job) {
            summary.cached += 1;
            continue;
        }
        if opts.max_runs.map(|m| summary.ran >= m).unwrap_or(false) {
            summary.stopped = true;
            break;
        }
        progress(ExperimentEvent::Start {
            key: &key,
            done: i,
            total: jobs.len(),
        });
        let rec = runner.run_job(job, key)?;
        summary.ran += 1;
        progress(ExperimentEvent::Finished { record: &rec });
    }
    Ok(summary)
}

/// A recorded run whose files are gone (e.g. a deleted zoo folder, a scratch adapter the KL indicator
/// and the `tupate:M:limited` predictor read) is run again.
fn outputs_present(r: &Runner<'_>, job: &Job) -> bool {
    match job {
        Job::Zoo { task, method } => ["early", "best"]
            .iter()
            .all(|c| zoo_dir(r.out, &r.tasks[*task].name, *method, c).is_dir()),
        Job::Limited {
            task,
            init: Init::Scratch,
            seed,
        } => scratch_dir(r.out, r.cfg, &r.tasks[*task].name, *seed).is_dir(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ExperimentConfig {
        let text = include_str!("../../examples/replication/config.json");
        serde_json::from_str(text).expect("the committed replication config parses")
    }

    #[test]
    fn seeds_extend_an_experiment_without_changing_its_protocol() {
        let a = config();
        let mut b = a.clone();
        b.limited.seeds.push(99);
        for phase in ["zoo", "textemb", "limited", "pewe"] {
            assert_eq!(a.protocol_hash(phase), b.protocol_hash(phase), "{phase}");
        }
    }

    #[test]
    fn a_setting_a_phase_depends_on_changes_its_protocol() {
        let a = config();
        let mut b = a.clone();
        b.limited.steps += 1;
        assert_eq!(a.protocol_hash("zoo"), b.protocol_hash("zoo"));
        assert_ne!(a.protocol_hash("limited"), b.protocol_hash("limited"));
        assert_ne!(a.protocol_hash("pewe"), b.protocol_hash("pewe"));
        let mut c = a.clone();
        c.pewe.tau = 0.5;
        assert_eq!(a.protocol_hash("limited"), c.protocol_hash("limited"));
        assert_ne!(a.protocol_hash("pewe"), c.protocol_hash("pewe"));
        let mut d = a.clone();
        d.zoo.steps += 1;
        for phase in ["zoo", "limited", "pewe"] {
            assert_ne!(a.protocol_hash(phase), d.protocol_hash(phase), "{phase}");
        }
    }
}
