//! Nearest-task queries: the query builder, filters, task-level ranking and similarity variants.
//!
//! ```no_run
//! # use peftdb::{store::Store, index::{IndexManager, IndexConfig}, query::{Nearest, Similarity}};
//! let store = Store::open_read_only("zoo.peftdb")?;
//! let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {})?;
//! let res = Nearest::task("rte").k(5).similarity(Similarity::Tupate).run(&store, &index)?;
//! for t in &res.tasks {
//!     println!("{} {:.4}", t.task, t.score);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **Targets**: a stored task ([`Nearest::task`]), a stored object ([`Nearest::object`]), an adapter folder
//! that is read and embedded on the fly ([`Nearest::adapter`]), or a raw vector of a space
//! ([`Nearest::vector`]).
//!
//! **Which query embedding** when a task has several objects in one space: the one whose stage is `best`,
//! else the most recently added (highest id).
//!
//! **Task-level ranking** (documented rules):
//! - *within a space*, a candidate task with several objects there (checkpoints) scores the **maximum** of
//!   its objects' similarities (its closest checkpoint);
//! - *across spaces* (the query task has objects in several spaces, e.g. LoRA, BitFit and prefix of one
//!   base model), a candidate task scores the **mean of its per-space scores** over the query's spaces in
//!   which it has an object: the paper's "3 ENSEMBLE". Per-space scores of tasks that a space's search did
//!   not return are computed exactly, so every mean is over the same spaces a task actually has.
//! - ties are broken by task name.
//!
//! **Filters** apply during the search (the index walks past objects that fail them, so `k` tasks still
//! come back): base model, method, task group, task tags (all must be present), and leave-one-out
//! exclusion of the query's own task (on by default for task and object targets).
//!
//! **Similarities** ([`Similarity`]):
//! - `tupate`: cosine of raw TuPaTE embeddings, through the space's index (HNSW or flat);
//! - `centered`: cosine after subtracting the space's mean embedding; an exact scan of the space's stored
//!   embeddings (two streaming passes) — not indexed yet;
//! - `delta`: cosine of LoRA weight updates `s B A` ([`crate::embed::delta`]), exact, any rank, rank
//!   patterns included (the factors are read from the store). Up to [`DELTA_SCAN_MAX`] LoRA objects of
//!   the query's base model every one is compared; in a larger zoo the index of the query's
//!   delta-sketch space (a seeded sketch of every module's update, stored at ingestion:
//!   [`crate::embed::delta_sketch`]) shortlists the candidates, which are then compared exactly.

use crate::embed::delta::{delta_cosine, LoraDelta};
use crate::embed::{cosine, delta_sketch_of, tupate, EmbeddingKind, SpaceId};
use crate::index::{Engine, IndexError, IndexManager, QueryError, SearchMode};
use crate::object::formats::ReadOptions;
use crate::object::{read_adapter, LightweightObject, MethodKind};
use crate::store::{ObjectId, Snapshot, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// How tasks are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Similarity {
    /// Cosine of raw TuPaTE embeddings (the paper).
    #[default]
    Tupate,
    /// Cosine after subtracting the space's mean embedding.
    Centered,
    /// Cosine of LoRA weight updates delta-W = s B A (LoRA only).
    Delta,
}

impl Similarity {
    pub const ALL: [Similarity; 3] = [Similarity::Tupate, Similarity::Centered, Similarity::Delta];

    /// The embedding kind whose index this similarity searches.
    pub fn embedding_kind(self) -> EmbeddingKind {
        match self {
            Similarity::Tupate | Similarity::Centered => EmbeddingKind::Tupate,
            Similarity::Delta => EmbeddingKind::DeltaSketch,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Similarity::Tupate => "tupate",
            Similarity::Centered => "centered",
            Similarity::Delta => "delta",
        }
    }
}

impl std::str::FromStr for Similarity {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Self, QueryError> {
        Similarity::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                QueryError::Invalid(format!(
                    "unknown similarity {s:?} (tupate, centered, delta)"
                ))
            })
    }
}

/// What to search for.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Task(String),
    Object(ObjectId),
    Adapter(PathBuf),
    /// An adapter already in memory (the new task's short-tuned adapter in `suggest`): every similarity
    /// works on it, as on an adapter folder.
    Loaded(Box<LightweightObject>),
    Vector {
        space: SpaceId,
        vector: Vec<f32>,
    },
}

/// Up to this many LoRA objects (of the query's base model, after filters) `delta` computes every exact
/// cosine; beyond, the delta-sketch index shortlists them ([`Nearest::run`]).
pub const DELTA_SCAN_MAX: usize = 512;

/// A nearest-task query (builder).
#[derive(Debug, Clone)]
pub struct Nearest {
    target: Target,
    k: usize,
    similarity: Similarity,
    method: Option<MethodKind>,
    base_model: Option<String>,
    group: Option<String>,
    tags: Vec<String>,
    exclude_query_task: Option<bool>,
    mode: SearchMode,
}

/// One space's score of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceScore {
    /// The space (absent for `delta`, which compares LoRA updates across ranks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space: Option<SpaceId>,
    pub label: String,
    pub method: MethodKind,
    pub score: f32,
    /// The task's object that gave the score (its closest one).
    pub object: ObjectId,
}

/// An object of a result task, with its similarity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectHit {
    pub id: ObjectId,
    pub method: MethodKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space: Option<SpaceId>,
    pub score: f32,
}

/// A ranked task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskHit {
    pub rank: usize,
    pub task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Mean of `per_space` scores.
    pub score: f32,
    pub per_space: Vec<SpaceScore>,
    pub objects: Vec<ObjectHit>,
}

/// A space the query searched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuerySpace {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space: Option<SpaceId>,
    pub label: String,
    pub method: MethodKind,
    /// The query's object in the space (absent for adapter and vector targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectId>,
    /// `hnsw`, `flat`, or `scan` (exact scan of stored data, for `centered` and `delta`).
    pub engine: String,
}

/// The answer to a query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NearestResult {
    /// `task`, `object`, `adapter` or `vector`.
    pub target: String,
    /// Task name, object id, folder path or space id.
    pub query: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_task: Option<String>,
    pub similarity: Similarity,
    pub k: usize,
    pub spaces: Vec<QuerySpace>,
    pub tasks: Vec<TaskHit>,
}

/// The query side of one space.
struct QueryVec {
    space: SpaceId,
    object: Option<ObjectId>,
    vector: Vec<f32>,
}

/// The query's LoRA update (for `delta`).
struct QueryDelta {
    base_model: String,
    object: Option<ObjectId>,
    delta: LoraDelta,
}

fn pick_representative<'a>(
    objs: impl Iterator<Item = (ObjectId, Option<&'a str>)>,
) -> Option<ObjectId> {
    let all: Vec<_> = objs.collect();
    all.iter()
        .filter(|(_, s)| *s == Some("best"))
        .map(|(id, _)| *id)
        .max()
        .or_else(|| all.iter().map(|(id, _)| *id).max())
}

impl Nearest {
    fn new(target: Target) -> Nearest {
        Nearest {
            target,
            k: 10,
            similarity: Similarity::Tupate,
            method: None,
            base_model: None,
            group: None,
            tags: Vec::new(),
            exclude_query_task: None,
            mode: SearchMode::Auto,
        }
    }
    /// Tasks nearest to a stored task.
    pub fn task(name: impl Into<String>) -> Nearest {
        Nearest::new(Target::Task(name.into()))
    }
    /// Tasks nearest to a stored object.
    pub fn object(id: ObjectId) -> Nearest {
        Nearest::new(Target::Object(id))
    }
    /// Tasks nearest to an adapter folder that is not stored (read and embedded now).
    pub fn adapter(dir: impl Into<PathBuf>) -> Nearest {
        Nearest::new(Target::Adapter(dir.into()))
    }
    /// Tasks nearest to a raw embedding of a space.
    /// Nearest tasks of an adapter in memory (every similarity, `delta` included).
    pub fn loaded(obj: LightweightObject) -> Nearest {
        Nearest::new(Target::Loaded(Box::new(obj)))
    }

    pub fn vector(space: SpaceId, vector: Vec<f32>) -> Nearest {
        Nearest::new(Target::Vector { space, vector })
    }
    /// Number of tasks to return (default 10).
    pub fn k(mut self, k: usize) -> Nearest {
        self.k = k;
        self
    }
    pub fn similarity(mut self, s: Similarity) -> Nearest {
        self.similarity = s;
        self
    }
    /// Only objects of this method (and only the query's spaces of this method).
    pub fn method(mut self, m: MethodKind) -> Nearest {
        self.method = Some(m);
        self
    }
    /// Only objects of this base model.
    pub fn base_model(mut self, b: impl Into<String>) -> Nearest {
        self.base_model = Some(b.into());
        self
    }
    /// Only tasks of this group.
    pub fn group(mut self, g: impl Into<String>) -> Nearest {
        self.group = Some(g.into());
        self
    }
    /// Only tasks carrying this tag (repeat for several: all must be present).
    pub fn tag(mut self, t: impl Into<String>) -> Nearest {
        self.tags.push(t.into());
        self
    }
    /// Exclude the query's own task (default: yes for task and object targets).
    pub fn exclude_query_task(mut self, yes: bool) -> Nearest {
        self.exclude_query_task = Some(yes);
        self
    }
    /// Force the exact scan or the HNSW graph (default: automatic).
    pub fn search_mode(mut self, m: SearchMode) -> Nearest {
        self.mode = m;
        self
    }

    fn passes(
        &self,
        index: &IndexManager,
        tasks: &HashMap<String, crate::store::TaskRecord>,
        id: ObjectId,
        exclude: Option<&str>,
    ) -> bool {
        let Some(o) = index.object(id) else {
            return false;
        };
        if self.method.is_some_and(|m| m != o.method) {
            return false;
        }
        if self
            .base_model
            .as_deref()
            .is_some_and(|b| b != o.base_model)
        {
            return false;
        }
        if exclude == Some(o.task.as_str()) {
            return false;
        }
        if self.group.is_some() || !self.tags.is_empty() {
            let Some(t) = tasks.get(&o.task) else {
                return false;
            };
            if self.group.is_some() && t.group != self.group {
                return false;
            }
            if !self.tags.iter().all(|g| t.tags.contains(g)) {
                return false;
            }
        }
        true
    }

    fn read_target_adapter(dir: &std::path::Path) -> Result<LightweightObject, QueryError> {
        Ok(read_adapter(dir, &ReadOptions::default())?)
    }

    /// Run the query, in one read transaction of the store ([`Store::snapshot`]).
    pub fn run(&self, store: &Store, index: &IndexManager) -> Result<NearestResult, QueryError> {
        self.run_in(&store.snapshot()?, index)
    }

    /// Run the query in a snapshot the caller holds (every read of the query sees that snapshot: records,
    /// embeddings and tensors agree even while another process writes).
    pub fn run_in(
        &self,
        store: &Snapshot<'_>,
        index: &IndexManager,
    ) -> Result<NearestResult, QueryError> {
        if self.k == 0 {
            return Err(QueryError::Invalid("k must be at least 1".into()));
        }
        let (target, query_label, query_task) = match &self.target {
            Target::Task(n) => {
                if store.task(n).is_err() {
                    return Err(QueryError::UnknownTask { name: n.clone() });
                }
                ("task", n.clone(), Some(n.clone()))
            }
            Target::Object(id) => {
                let o = index
                    .object(*id)
                    .ok_or(QueryError::UnknownObject { id: *id })?;
                ("object", id.to_string(), Some(o.task.clone()))
            }
            Target::Adapter(p) => ("adapter", p.display().to_string(), None),
            Target::Loaded(_) => ("adapter", "(in memory)".to_string(), None),
            Target::Vector { space, .. } => ("vector", space.to_string(), None),
        };
        let exclude_on = self.exclude_query_task.unwrap_or(query_task.is_some());
        let exclude = if exclude_on { query_task.clone() } else { None };
        // Task records only when a filter needs them (a group or tag): reading every task of a large store
        // costs more than the rest of a cold query.
        let tasks: HashMap<String, crate::store::TaskRecord> =
            if self.group.is_some() || !self.tags.is_empty() {
                store
                    .tasks()?
                    .into_iter()
                    .map(|t| (t.name.clone(), t))
                    .collect()
            } else {
                HashMap::new()
            };
        // The excluded task's objects, found once: with no other filter, the per-row test is a lookup in
        // this small set (a scan of 100k rows called a catalog lookup and a string compare per row).
        let excluded: Vec<ObjectId> = match &exclude {
            Some(t) => index
                .objects()
                .iter()
                .filter(|o| &o.task == t)
                .map(|o| o.id)
                .collect(), // in id order
            None => Vec::new(),
        };
        let other_filters = self.method.is_some()
            || self.base_model.is_some()
            || self.group.is_some()
            || !self.tags.is_empty();
        let filter = |id: ObjectId| {
            excluded.binary_search(&id).is_err()
                && (!other_filters || self.passes(index, &tasks, id, None))
        };

        // per task: space key -> SpaceScore; objects
        let mut per_task: BTreeMap<String, (BTreeMap<String, SpaceScore>, Vec<ObjectHit>)> =
            BTreeMap::new();
        let mut spaces_out = Vec::new();
        match self.similarity {
            Similarity::Delta => {
                let q = self.query_delta(store, index)?;
                let mut engine_label = format!("lora-delta@{}", q.base_model);
                if let Some(m) = self.method {
                    if m != MethodKind::Lora {
                        engine_label.push_str(" (method filter excludes LoRA)");
                    }
                }
                let mut ids: Vec<ObjectId> = index
                    .objects()
                    .iter()
                    .filter(|o| {
                        o.method == MethodKind::Lora && o.base_model == q.base_model && filter(o.id)
                    })
                    .map(|o| o.id)
                    .collect();
                ids.sort_unstable();
                let (ids, engine) = self.delta_shortlist(store, index, &q, ids, &filter)?;
                use rayon::prelude::*;
                let scored: Vec<(ObjectId, f32)> = ids
                    .par_iter()
                    .filter_map(|id| {
                        let (_, obj) = store.get(*id).ok()?;
                        let d = LoraDelta::from_object(&obj).ok()?;
                        Some((*id, delta_cosine(&q.delta, &d) as f32))
                    })
                    .collect();
                for (id, score) in scored {
                    let o = index.object(id).expect("filtered");
                    add_score(
                        &mut per_task,
                        &o.task,
                        &engine_label,
                        None,
                        MethodKind::Lora,
                        id,
                        o.stage.clone(),
                        score,
                    );
                }
                spaces_out.push(QuerySpace {
                    space: None,
                    label: engine_label,
                    method: MethodKind::Lora,
                    object: q.object,
                    engine: engine.into(),
                });
            }
            Similarity::Tupate | Similarity::Centered => {
                let qvs = self.query_vectors(store, index)?;
                for qv in &qvs {
                    let rec =
                        index
                            .space_record(qv.space)
                            .ok_or_else(|| IndexError::UnknownSpace {
                                space: qv.space.to_string(),
                            })?;
                    let label = rec.key.label();
                    let method = rec.key.method;
                    let engine = if self.similarity == Similarity::Tupate {
                        let si = index
                            .space(qv.space)
                            .ok_or_else(|| IndexError::UnknownSpace {
                                space: qv.space.to_string(),
                            })?;
                        let fetch = |id: u64| store.embedding(qv.space, id).ok().flatten();
                        // Objects to retrieve for k tasks. Several query spaces are averaged per task, so
                        // each space looks deeper (a task ranked k+1 in every space can win the mean).
                        // One space: start at k objects (one per task is the common zoo) and widen
                        // until k tasks are found; a projected space reranks 10x that many exactly, each
                        // a read from the store, so asking for 50 objects read 500 embeddings.
                        let (hits, engine) = if qvs.len() > 1 {
                            let k_obj = (self.k * 5).max(50);
                            si.search(&qv.vector, k_obj, self.mode, &filter, Some(&fetch))?
                        } else {
                            let mut k_obj = self.k;
                            loop {
                                let (hits, engine) =
                                    si.search(&qv.vector, k_obj, self.mode, &filter, Some(&fetch))?;
                                let tasks_found: std::collections::HashSet<&str> = hits
                                    .iter()
                                    .filter_map(|h| index.object(h.id))
                                    .map(|o| o.task.as_str())
                                    .collect();
                                if tasks_found.len() >= self.k
                                    || hits.len() < k_obj
                                    || k_obj >= si.len()
                                {
                                    break (hits, engine);
                                }
                                k_obj *= 4;
                            }
                        };
                        for h in hits {
                            add_hit(
                                &mut per_task,
                                index,
                                &label,
                                qv.space,
                                method,
                                h.id,
                                h.score,
                            );
                        }
                        match engine {
                            Engine::Hnsw => "hnsw",
                            Engine::Flat => "flat",
                        }
                    } else {
                        for (id, score) in centered_scan(store, qv.space, &qv.vector, &filter)? {
                            add_hit(&mut per_task, index, &label, qv.space, method, id, score);
                        }
                        "scan"
                    };
                    spaces_out.push(QuerySpace {
                        space: Some(qv.space),
                        label,
                        method,
                        object: qv.object,
                        engine: engine.into(),
                    });
                }
                // Ensemble: fill exact per-space scores that a space's search did not return.
                if qvs.len() > 1 && self.similarity == Similarity::Tupate {
                    let mut by_task_space: HashMap<(&str, SpaceId), Vec<ObjectId>> = HashMap::new();
                    for o in index.objects() {
                        let id = &o.id;
                        if per_task.contains_key(&o.task) && filter(*id) {
                            for s in &o.spaces {
                                by_task_space
                                    .entry((o.task.as_str(), *s))
                                    .or_default()
                                    .push(*id);
                            }
                        }
                    }
                    let names: Vec<String> = per_task.keys().cloned().collect();
                    for name in names {
                        for qv in &qvs {
                            let label = index
                                .space_record(qv.space)
                                .map(|r| r.key.label())
                                .unwrap_or_default();
                            if per_task[&name].0.contains_key(&label) {
                                continue;
                            }
                            let Some(ids) = by_task_space.get(&(name.as_str(), qv.space)) else {
                                continue;
                            };
                            let method = index
                                .space_record(qv.space)
                                .map(|r| r.key.method)
                                .unwrap_or(MethodKind::Lora);
                            for id in ids {
                                if let Some(v) = store.embedding(qv.space, *id)? {
                                    let o = index.object(*id).expect("filtered");
                                    add_score(
                                        &mut per_task,
                                        &name,
                                        &label,
                                        Some(qv.space),
                                        method,
                                        *id,
                                        o.stage.clone(),
                                        cosine(&qv.vector, &v),
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut tasks: Vec<TaskHit> = per_task
            .into_iter()
            .map(|(task, (spaces, mut objects))| {
                let per_space: Vec<SpaceScore> = spaces.into_values().collect();
                let score = per_space.iter().map(|s| s.score as f64).sum::<f64>()
                    / per_space.len().max(1) as f64;
                objects.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
                objects.dedup_by_key(|o| (o.id, o.space));
                TaskHit {
                    rank: 0,
                    group: store.task(&task).ok().and_then(|t| t.group),
                    task,
                    score: score as f32,
                    per_space,
                    objects,
                }
            })
            .collect();
        tasks.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.task.cmp(&b.task)));
        // Only objects of the snapshot are answers: the index's catalog may be newer than the snapshot
        // (objects ingested or removed since), so the first k tasks are checked, a key lookup per object.
        let mut kept = Vec::with_capacity(self.k.min(tasks.len()));
        for mut t in tasks {
            if kept.len() == self.k {
                break;
            }
            let mut objects = Vec::with_capacity(t.objects.len());
            for o in t.objects {
                if store.contains(o.id)? {
                    objects.push(o);
                }
            }
            if !objects.is_empty() {
                t.objects = objects;
                kept.push(t);
            }
        }
        let mut tasks = kept;
        for (i, t) in tasks.iter_mut().enumerate() {
            t.rank = i + 1;
        }
        Ok(NearestResult {
            target: target.into(),
            query: query_label,
            query_task,
            similarity: self.similarity,
            k: self.k,
            spaces: spaces_out,
            tasks,
        })
    }

    fn query_vectors(
        &self,
        store: &Snapshot<'_>,
        index: &IndexManager,
    ) -> Result<Vec<QueryVec>, QueryError> {
        let method_ok = |s: SpaceId| {
            index.space_record(s).is_some_and(|r| {
                r.key.kind == EmbeddingKind::Tupate
                    && self.method.is_none_or(|m| r.key.method == m)
                    && self
                        .base_model
                        .as_deref()
                        .is_none_or(|b| r.key.base_model == b)
            })
        };
        let from_objects = |ids: Vec<ObjectId>| -> Result<Vec<QueryVec>, QueryError> {
            let mut by_space: BTreeMap<SpaceId, Vec<(ObjectId, Option<&str>)>> = BTreeMap::new();
            for id in ids {
                if let Some(o) = index.object(id) {
                    for s in &o.spaces {
                        if method_ok(*s) {
                            by_space
                                .entry(*s)
                                .or_default()
                                .push((id, o.stage.as_deref()));
                        }
                    }
                }
            }
            let mut out = Vec::new();
            for (space, mut objs) in by_space {
                // The representative among the objects the snapshot has (the index may know newer ones).
                while let Some(id) = pick_representative(objs.iter().copied()) {
                    if let Some(vector) = store.embedding(space, id)? {
                        out.push(QueryVec {
                            space,
                            object: Some(id),
                            vector,
                        });
                        break;
                    }
                    objs.retain(|(o, _)| *o != id);
                }
            }
            Ok(out)
        };
        let out = match &self.target {
            Target::Task(name) => {
                let ids: Vec<ObjectId> = index
                    .objects()
                    .iter()
                    .filter(|o| &o.task == name)
                    .map(|o| o.id)
                    .collect();
                from_objects(ids)?
            }
            Target::Object(id) => from_objects(vec![*id])?,
            Target::Adapter(_) | Target::Loaded(_) => {
                let (obj, what) = match &self.target {
                    Target::Adapter(dir) => {
                        (Self::read_target_adapter(dir)?, dir.display().to_string())
                    }
                    Target::Loaded(o) => ((**o).clone(), "the adapter".to_string()),
                    _ => unreachable!("matched above"),
                };
                let e = tupate(&obj).map_err(|e| QueryError::NoEmbedding { reason: e.reason })?;
                let space = e.space.id();
                if index.space(space).is_none() {
                    return Err(QueryError::NoEmbedding {
                        reason: format!(
                            "{what}: no stored adapter shares its space {} (same base model, method and per-layer shapes)",
                            e.space.label()
                        ),
                    });
                }
                vec![QueryVec {
                    space,
                    object: None,
                    vector: e.vector,
                }]
            }
            Target::Vector { space, vector } => {
                let si = index
                    .space(*space)
                    .ok_or_else(|| IndexError::UnknownSpace {
                        space: space.to_string(),
                    })?;
                if vector.len() != si.full_dim() {
                    return Err(IndexError::DimensionMismatch {
                        space: space.to_string(),
                        expected: si.full_dim(),
                        found: vector.len(),
                    }
                    .into());
                }
                vec![QueryVec {
                    space: *space,
                    object: None,
                    vector: vector.clone(),
                }]
            }
        };
        if out.is_empty() {
            return Err(QueryError::NoEmbedding {
                reason: format!(
                    "{} has no embedding in any indexed space{}",
                    match &self.target {
                        Target::Task(n) => format!("task {n:?}"),
                        Target::Object(id) => format!("object {id}"),
                        _ => "the query".into(),
                    },
                    if self.method.is_some() || self.base_model.is_some() {
                        " matching the method/base-model filter"
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(out)
    }

    /// The LoRA objects whose exact `delta` cosine is computed. Up to [`DELTA_SCAN_MAX`] objects (or with
    /// [`SearchMode::Exact`]) all of them; beyond, the index of the query's delta-sketch space (the
    /// same modules: [`crate::embed::delta_sketch`]) shortlists the nearest objects by sketch cosine,
    /// widened until they hold four times `k` tasks; every object of those tasks and every LoRA object outside
    /// that space (other modules, or stored before sketches existed) is then compared exactly, so only
    /// the sketch's estimate decides which tasks are left out. Returns the ids and the engine's name (`scan`, `hnsw` or `flat`).
    fn delta_shortlist(
        &self,
        store: &Snapshot<'_>,
        index: &IndexManager,
        q: &QueryDelta,
        ids: Vec<ObjectId>,
        filter: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<(Vec<ObjectId>, &'static str), QueryError> {
        if ids.len() <= DELTA_SCAN_MAX || self.mode == SearchMode::Exact {
            return Ok((ids, "scan"));
        }
        let Ok(sketch) = delta_sketch_of(&q.delta, &q.base_model) else {
            return Ok((ids, "scan"));
        };
        let (sid, vector) = (sketch.space.id(), sketch.vector);
        let Some(si) = index.space(sid) else {
            return Ok((ids, "scan"));
        };
        let fetch = |id: u64| store.embedding(sid, id).ok().flatten();
        let mut want = (self.k * 8).max(64);
        let (tasks, engine) = loop {
            let (hits, engine) = si.search(&vector, want, self.mode, filter, Some(&fetch))?;
            let tasks: std::collections::HashSet<&str> = hits
                .iter()
                .filter_map(|h| index.object(h.id))
                .map(|o| o.task.as_str())
                .collect();
            if tasks.len() >= 4 * self.k || hits.len() < want || want >= si.len() {
                break (tasks, engine);
            }
            want *= 4;
        };
        // Every object of a shortlisted task is compared (a task scores its closest object), and every
        // object outside the sketch space; `ids` is sorted and distinct, and so is this subset of it.
        let out: Vec<ObjectId> = ids
            .iter()
            .copied()
            .filter(|id| {
                index
                    .object(*id)
                    .is_some_and(|o| !o.spaces.contains(&sid) || tasks.contains(o.task.as_str()))
            })
            .collect();
        Ok((
            out,
            match engine {
                Engine::Hnsw => "hnsw",
                Engine::Flat => "flat",
            },
        ))
    }

    fn query_delta(
        &self,
        store: &Snapshot<'_>,
        index: &IndexManager,
    ) -> Result<QueryDelta, QueryError> {
        let (obj, object) = match &self.target {
            Target::Task(name) => {
                let lora: Vec<(ObjectId, Option<&str>)> = index
                    .objects()
                    .iter()
                    .filter(|o| &o.task == name && o.method == MethodKind::Lora)
                    .map(|o| (o.id, o.stage.as_deref()))
                    .collect();
                let id = pick_representative(lora.into_iter()).ok_or_else(|| {
                    QueryError::DeltaNeedsLora {
                        what: format!("task {name:?}"),
                        method: "without a LoRA object".into(),
                    }
                })?;
                (store.get(id)?.1, Some(id))
            }
            Target::Object(id) => (store.get(*id)?.1, Some(*id)),
            Target::Adapter(dir) => (Self::read_target_adapter(dir)?, None),
            Target::Loaded(o) => ((**o).clone(), None),
            Target::Vector { .. } => {
                return Err(QueryError::Invalid(
                    "similarity `delta` compares LoRA factors; a raw vector query has none".into(),
                ))
            }
        };
        let delta = LoraDelta::from_object(&obj).map_err(|e| match obj.method.kind() {
            MethodKind::Lora => QueryError::NoEmbedding { reason: e.0 },
            m => QueryError::DeltaNeedsLora {
                what: "the query".into(),
                method: m.to_string(),
            },
        })?;
        Ok(QueryDelta {
            base_model: obj.base_model.clone(),
            object,
            delta,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn add_score(
    per_task: &mut BTreeMap<String, (BTreeMap<String, SpaceScore>, Vec<ObjectHit>)>,
    task: &str,
    label: &str,
    space: Option<SpaceId>,
    method: MethodKind,
    id: ObjectId,
    stage: Option<String>,
    score: f32,
) {
    let e = per_task.entry(task.to_string()).or_default();
    let s = e.0.entry(label.to_string()).or_insert(SpaceScore {
        space,
        label: label.to_string(),
        method,
        score: f32::NEG_INFINITY,
        object: id,
    });
    if score > s.score {
        s.score = score;
        s.object = id;
    }
    e.1.push(ObjectHit {
        id,
        method,
        stage,
        space,
        score,
    });
}

/// [`add_score`] for a hit of a space's search, its task and stage from the index's catalog. A row committed
/// after the catalog was read has no facts yet: it is skipped.
fn add_hit(
    per_task: &mut BTreeMap<String, (BTreeMap<String, SpaceScore>, Vec<ObjectHit>)>,
    index: &IndexManager,
    label: &str,
    space: SpaceId,
    method: MethodKind,
    id: ObjectId,
    score: f32,
) {
    if let Some(o) = index.object(id) {
        add_score(
            per_task,
            &o.task,
            label,
            Some(space),
            method,
            id,
            o.stage.clone(),
            score,
        );
    }
}

/// Centered cosine of every filtered embedding of a space against `query` (two streaming passes).
pub fn centered_scan(
    store: &Snapshot<'_>,
    space: SpaceId,
    query: &[f32],
    filter: &dyn Fn(ObjectId) -> bool,
) -> Result<Vec<(ObjectId, f32)>, QueryError> {
    let mut sum = vec![0f64; query.len()];
    let mut n = 0usize;
    store.for_each_embedding(space, |_, v| {
        for (s, x) in sum.iter_mut().zip(&v) {
            *s += *x as f64;
        }
        n += 1;
    })?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mean: Vec<f32> = sum.iter().map(|s| (*s / n as f64) as f32).collect();
    let qc: Vec<f32> = query.iter().zip(&mean).map(|(q, m)| q - m).collect();
    let mut out = Vec::new();
    let mut buf = Vec::with_capacity(query.len());
    store.for_each_embedding(space, |id, v| {
        if !filter(id) {
            return;
        }
        buf.clear();
        buf.extend(v.iter().zip(&mean).map(|(x, m)| x - m));
        out.push((id, cosine(&qc, &buf)));
    })?;
    Ok(out)
}
