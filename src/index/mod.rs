//! Nearest-neighbour indexes over the embedding spaces.
//!
//! One [`SpaceIndex`] per space (embeddings of different spaces are not comparable). A space index holds
//! the unit-normalised vectors that are searched (a [`flat::FlatIndex`]) and, for spaces of at least
//! [`IndexConfig::hnsw_min_vectors`] vectors, an HNSW graph over the same vectors ([`hnsw::HnswGraph`]).
//!
//! **Exact vs HNSW.** Below the switch-over the flat scan is both exact and fast; above it the graph is
//! used. [`DEFAULT_HNSW_MIN_VECTORS`] = 20,000 comes from measurements on the 2-core build machine
//! (dimension 384, clustered data, k = 10, ef_search 64, other builds running, load average 8-13):
//!
//! | profile | n | HNSW | flat | brute force (unindexed cosine) |
//! |---|---|---|---|---|
//! | bench (`benches/query.rs`) | 1k | 1.03 ms | 0.10 ms | 0.63 ms |
//! | bench | 10k | 7.1 ms | 3.4 ms | 8.8 ms |
//! | dev (peftdb at opt-level 1) | 10k | 4.6 ms | 3.8 ms | |
//! | dev | 20k | 12.9 ms | 17.6 ms | |
//!
//! The flat scan grows linearly and hnsw_rs's query cost barely grows, so they cross between 10k and 20k
//! (dev) and at about 20k (bench profile: flat 3.4 ms at 10k extrapolates to 6.8 ms at 20k, the graph is
//! about 7-8 ms). Recall@10 of the graph was 1.0 in all these runs. A graph also costs 3-5 ms per vector to
//! build on that loaded machine (27.8 s for 10k). Force either engine with [`SearchMode`].
//!
//! **High-dimensional spaces** (dimension above [`IndexConfig::project_above`], default 4,096; a 7B LoRA
//! has 100k+) index a seeded sparse random projection (`projection::Projection`) of dimension
//! [`IndexConfig::projection_dim`] (default 512). The index proposes `max(rerank_factor * k, rerank_min)`
//! candidates and they are reranked by exact cosine of the stored full embeddings, so the scores returned
//! are exact; recall@10 against exact search on the full vectors is tested on 50k vectors
//! (tests/index_recall.rs).
//!
//! **Deletes.** hnsw_rs cannot delete: a removed object becomes a tombstone, filtered out *during* the
//! graph walk (so `k` results still come back). When tombstones exceed
//! [`IndexConfig::tombstone_rebuild_fraction`] (default 0.2) of the graph's points, the space is rebuilt.
//!
//! **Persistence** (see `manager`, `vectors` and `schema/index.md`): each space's scanned rows are a
//! `.vecs` file beside the store in `<store>.index/`, memory-mapped on open (a cold query reads no
//! embedding from redb but those it reranks); graphs are dumped there too, under temporary names then
//! renamed; the store records each graph's generation and checksum, and the space's generation that a
//! `.vecs` file must match; on open a missing, stale, foreign or unreadable file is rebuilt from the store.
//! A process answering one query uses [`IndexConfig::one_shot`]: it scans the mapped rows rather than
//! load a graph.
//!
//! **Memory**: a space holds its indexed vectors twice when it has a graph (flat copy + hnsw_rs's copy):
//! 100k x 384 f32 is 2 x 150 MB. Projected spaces hold only projected vectors (100k x 512 x 4 B x 2);
//! full embeddings stay in redb and are read only for the reranked candidates.
//!
//! **Partial** (as of this branch): the 100k-object benchmark configurations run only with
//! `PEFTDB_BENCH_FULL=1` and have not been measured on the build machine; the 50k high-dimensional recall
//! test scans the projections exactly (the graph over projected vectors is tested at 800 vectors); the
//! `centered` and `delta` similarities are exact scans, not indexed (see [`crate::query`]); `open` maps
//! every space's rows (and checks their checksums), even when a query needs one space.

pub(crate) mod error;
pub(crate) mod flat;
pub(crate) mod hnsw;
pub(crate) mod manager;
pub(crate) mod projection;
pub(crate) mod vectors;

pub use error::{IndexError, QueryError};
pub use flat::FlatIndex;
pub use hnsw::{HnswGraph, HnswParams};
pub use manager::{index_dir, IndexManager, OpenReport, Progress, SpaceState};
pub use vectors::path_for as vectors_path;

use crate::embed::{EmbeddingKind, SpaceId};
use flat::normalize;

use projection::{Projection, ProjectionPlan};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// Default switch-over from flat scan to HNSW (vectors in the space), measured: see module docs.
pub const DEFAULT_HNSW_MIN_VECTORS: usize = 20_000;

/// How to search a space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// HNSW at or above the switch-over, flat below it, flat for restrictive filters.
    #[default]
    Auto,
    /// Always the exact flat scan.
    Exact,
    /// The graph whenever there is one (built on demand if missing).
    Hnsw,
}

/// Index configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct IndexConfig {
    pub hnsw: HnswParams,
    /// Spaces with fewer vectors are searched by flat scan only (no graph is built).
    pub hnsw_min_vectors: usize,
    /// Spaces of a higher dimension are indexed through a random projection.
    pub project_above: usize,
    pub projection_dim: usize,
    /// Seed of the projections (mixed with the space id).
    pub seed: u64,
    /// Candidates reranked in projected spaces: `max(rerank_factor * k, rerank_min)`.
    pub rerank_factor: usize,
    pub rerank_min: usize,
    /// Rebuild a graph when its hidden points exceed this fraction.
    pub tombstone_rebuild_fraction: f64,
    /// A filter that lets through less than this fraction of a space is searched by flat scan (a graph
    /// walk loses recall when most nodes are filtered out).
    pub filter_flat_below: f64,
    pub mode: SearchMode,
    /// Open the indexes of this embedding kind's spaces only (a process that answers one kind of query:
    /// the CLI's `nearest` and `suggest`); the other spaces' records stay known, their indexes are not
    /// read. `None`: every space.
    #[serde(default)]
    pub kind: Option<EmbeddingKind>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            hnsw: HnswParams::default(),
            hnsw_min_vectors: DEFAULT_HNSW_MIN_VECTORS,
            project_above: 4096,
            projection_dim: 512,
            seed: 0x7065_6674_6462,
            rerank_factor: 10,
            rerank_min: 100,
            tombstone_rebuild_fraction: 0.2,
            filter_flat_below: 0.1,
            mode: SearchMode::Auto,
            kind: None,
        }
    }
}

impl IndexConfig {
    /// For a process that answers one query and exits (the CLI): `Auto` never loads or builds a graph.
    /// Loading one reads and checksums its dump (at least the rows the exact scan reads, plus the links)
    /// and building one takes minutes at 100k, while the scan of the space's memory-mapped rows
    /// (`vectors`) reads each row once: a graph pays off only in a process that keeps it for many
    /// queries (the library default). `SearchMode::Hnsw` still forces one.
    pub fn one_shot() -> IndexConfig {
        IndexConfig {
            hnsw_min_vectors: usize::MAX,
            ..IndexConfig::default()
        }
    }
}

/// Which engine answered a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Flat,
    Hnsw,
}

/// A search result: object id and cosine similarity (exact unless the space is projected and no full
/// vectors were supplied for reranking).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
}

/// Fetches an object's full embedding (for reranking projected spaces).
pub type FullVectors<'a> = &'a (dyn Fn(u64) -> Option<Vec<f32>> + Sync);

/// The index of one space.
#[derive(Debug)]
pub struct SpaceIndex {
    space: SpaceId,
    full_dim: usize,
    projection: Option<Projection>,
    plan: Option<ProjectionPlan>,
    config: IndexConfig,
    flat: FlatIndex,
    /// Row of each id, built on first use: a cold query that only scans never needs it (100k inserts
    /// were 5% of one).
    pos: std::sync::OnceLock<HashMap<u64, usize>>,
    hnsw: Option<HnswGraph>,
    /// Ids in the graph/flat rows that are no longer live.
    dead: HashSet<u64>,
}

impl SpaceIndex {
    /// An empty index for a space of dimension `full_dim`.
    pub fn new(space: SpaceId, full_dim: usize, config: IndexConfig) -> SpaceIndex {
        let projection = (full_dim > config.project_above)
            .then(|| Projection::new(config.seed ^ space.0, full_dim, config.projection_dim));
        let dim = projection.map(|p| p.out_dim).unwrap_or(full_dim);
        SpaceIndex {
            space,
            full_dim,
            projection,
            plan: projection.map(ProjectionPlan::new),
            config,
            flat: FlatIndex::new(dim),
            pos: std::sync::OnceLock::new(),
            hnsw: None,
            dead: HashSet::new(),
        }
    }

    /// An empty index for a stored space. A delta-sketch space (`EmbeddingKind::DeltaSketch`) only
    /// shortlists objects whose updates are then compared exactly, and its own search reranks from the
    /// stored sketches, so it is projected whenever that makes its rows smaller (above
    /// [`IndexConfig::projection_dim`]): a MiniLM LoRA's 3,072-d sketch row takes 2 KB, not 12 KB.
    pub fn for_record(rec: &crate::store::SpaceRecord, config: IndexConfig) -> SpaceIndex {
        let mut c = config;
        if rec.key.kind == crate::embed::EmbeddingKind::DeltaSketch {
            c.project_above = c.project_above.min(c.projection_dim);
        }
        SpaceIndex::new(rec.id, rec.dim, c)
    }

    /// Use rows mapped from the space's `.vecs` file (no graph; see [`SpaceIndex::rebuild`]).
    pub(crate) fn attach_mapped(&mut self, rows: vectors::MappedRows) {
        self.flat = FlatIndex::mapped(self.flat.dim(), rows);
        self.pos = std::sync::OnceLock::new();
        self.dead.clear();
        self.hnsw = None;
    }

    /// Row position of every id in the flat rows.
    /// The row of each id (built from the rows on first use).
    fn pos(&self) -> &HashMap<u64, usize> {
        self.pos.get_or_init(|| {
            self.flat
                .ids()
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, i))
                .collect()
        })
    }

    fn pos_mut(&mut self) -> &mut HashMap<u64, usize> {
        self.pos();
        self.pos.get_mut().expect("initialised above")
    }

    /// Whether the rows are searched in place in a mapped `.vecs` file.
    pub fn is_mapped(&self) -> bool {
        self.flat.is_mapped()
    }

    /// The live rows: ids and their indexed vectors, row-major (what a `.vecs` file holds).
    pub fn live_rows(&self) -> (Vec<u64>, Vec<f32>) {
        let dim = self.flat.dim();
        let mut ids = Vec::with_capacity(self.len());
        let mut rows = Vec::with_capacity(self.len() * dim);
        for (p, id) in self.flat.ids().iter().enumerate() {
            if !self.dead.contains(id) {
                ids.push(*id);
                rows.extend_from_slice(&self.flat.vector_at(p));
            }
        }
        (ids, rows)
    }

    pub fn space(&self) -> SpaceId {
        self.space
    }
    pub fn full_dim(&self) -> usize {
        self.full_dim
    }
    pub fn indexed_dim(&self) -> usize {
        self.flat.dim()
    }
    pub fn projection(&self) -> Option<Projection> {
        self.projection
    }
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }
    /// Live vectors.
    pub fn len(&self) -> usize {
        self.flat.len() - self.dead.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn tombstones(&self) -> usize {
        self.dead.len()
    }
    pub fn has_graph(&self) -> bool {
        self.hnsw.is_some()
    }
    pub fn graph(&self) -> Option<&HnswGraph> {
        self.hnsw.as_ref()
    }
    pub fn contains(&self, id: u64) -> bool {
        self.pos().contains_key(&id) && !self.dead.contains(&id)
    }
    /// All ids in the index rows (live and hidden).
    pub fn row_ids(&self) -> &[u64] {
        self.flat.ids()
    }
    /// The indexed unit vector of a live id.
    pub fn indexed_vector(&self, id: u64) -> Option<Cow<'_, [f32]>> {
        if self.dead.contains(&id) {
            return None;
        }
        self.pos().get(&id).map(|&p| self.flat.vector_at(p))
    }

    /// The unit vector that is indexed for a full embedding (projected if the space is).
    pub fn prepare(&self, full: &[f32]) -> Result<Vec<f32>, IndexError> {
        if full.len() != self.full_dim {
            return Err(IndexError::DimensionMismatch {
                space: self.space.to_string(),
                expected: self.full_dim,
                found: full.len(),
            });
        }
        let mut v = match &self.plan {
            Some(p) => p.apply(full),
            None => full.to_vec(),
        };
        normalize(&mut v);
        Ok(v)
    }

    /// Add a full embedding to the flat rows (not to the graph; see [`SpaceIndex::add`]). An id already
    /// present is revived if hidden and otherwise left alone.
    fn push_row(&mut self, id: u64, full: &[f32]) -> Result<bool, IndexError> {
        if self.pos().contains_key(&id) {
            self.dead.remove(&id);
            return Ok(false);
        }
        let mut v = self.prepare(full)?;
        if self.projection.is_some() {
            // Projected rows are kept at f16 in the `.vecs` file: round them here too, so that a
            // rebuilt index and a mapped file hold the same values.
            v.iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
        let row = self.flat.len();
        self.pos_mut().insert(id, row);
        self.flat.push_unit(id, &v);
        Ok(true)
    }

    /// Add embeddings (flat rows, and the graph if there is one). Returns how many were new.
    pub fn add(&mut self, items: &[(u64, Vec<f32>)]) -> Result<usize, IndexError> {
        let mut new = Vec::new();
        for (id, v) in items {
            if self.push_row(*id, v)? {
                new.push(*id);
            }
        }
        if let Some(g) = &self.hnsw {
            let owned: Vec<(u64, Cow<'_, [f32]>)> = new
                .iter()
                .map(|id| (*id, self.flat.vector_at(self.pos()[id])))
                .collect();
            g.insert_many(&borrowed(&owned))?;
        }
        Ok(new.len())
    }

    /// Hide ids (tombstones). Returns how many were live.
    pub fn remove(&mut self, ids: &[u64]) -> usize {
        ids.iter()
            .filter(|id| self.pos().contains_key(id) && self.dead.insert(**id))
            .count()
    }

    /// Whether hidden points exceed the rebuild fraction.
    pub fn needs_compaction(&self) -> bool {
        let n = self.flat.len();
        n > 0 && self.dead.len() as f64 > self.config.tombstone_rebuild_fraction * n as f64
    }

    /// Whether a graph should exist for this space under the configuration.
    pub fn wants_graph(&self) -> bool {
        match self.config.mode {
            SearchMode::Exact => false,
            SearchMode::Hnsw => !self.is_empty(),
            SearchMode::Auto => self.len() >= self.config.hnsw_min_vectors,
        }
    }

    /// Drop hidden rows and (re)build the graph over the live rows if [`SpaceIndex::wants_graph`].
    pub fn rebuild(&mut self) -> Result<(), IndexError> {
        if !self.dead.is_empty() {
            let dead = std::mem::take(&mut self.dead);
            self.flat.retain(|id| !dead.contains(&id));
            self.pos = std::sync::OnceLock::new();
        }
        self.hnsw = None;
        if self.wants_graph() {
            let owned: Vec<(u64, Cow<'_, [f32]>)> = (0..self.flat.len())
                .map(|p| (self.flat.ids()[p], self.flat.vector_at(p)))
                .collect();
            self.hnsw = Some(HnswGraph::build(
                self.flat.dim(),
                &borrowed(&owned),
                self.config.hnsw,
            )?);
        }
        Ok(())
    }

    /// Use a graph loaded from disk, whose points are `graph_ids`: ids in it that are not rows become
    /// tombstones (they were removed from the store), rows missing from it are inserted.
    pub(crate) fn attach_graph(
        &mut self,
        g: HnswGraph,
        graph_ids: &[u64],
    ) -> Result<usize, IndexError> {
        let in_graph: HashSet<u64> = graph_ids.iter().copied().collect();
        let missing: Vec<u64> = self
            .flat
            .ids()
            .iter()
            .copied()
            .filter(|id| !in_graph.contains(id))
            .collect();
        for id in graph_ids {
            if !self.pos().contains_key(id) {
                // Present in the graph only: keep a zero row so positions stay aligned, hidden.
                let row = self.flat.len();
                self.pos_mut().insert(*id, row);
                self.flat.push_unit(*id, &vec![0.0; self.flat.dim()]);
                self.dead.insert(*id);
            }
        }
        let owned: Vec<(u64, Cow<'_, [f32]>)> = missing
            .iter()
            .map(|id| (*id, self.flat.vector_at(self.pos()[id])))
            .collect();
        g.insert_many(&borrowed(&owned))?;
        self.hnsw = Some(g);
        Ok(missing.len())
    }

    /// Search the `k` best live ids passing `filter`, for a full-dimensional query.
    ///
    /// For projected spaces, `full` supplies stored full embeddings for the exact rerank; without it the
    /// scores are those of the projection. Returns the hits and the engine used.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        mode: SearchMode,
        filter: &(dyn Fn(u64) -> bool + Sync),
        full: Option<FullVectors<'_>>,
    ) -> Result<(Vec<Hit>, Engine), IndexError> {
        let q = self.prepare(query)?;
        let live = |id: u64| !self.dead.contains(&id) && filter(id);
        let want = match (&self.projection, full) {
            (Some(_), Some(_)) => (self.config.rerank_factor * k).max(self.config.rerank_min),
            _ => k,
        };
        let use_graph = match mode {
            SearchMode::Exact => false,
            SearchMode::Hnsw => self.hnsw.is_some(),
            SearchMode::Auto => {
                self.hnsw.is_some() && {
                    // Estimate the filter's selectivity on a sample of rows.
                    let ids = self.flat.ids();
                    let step = (ids.len() / 512).max(1);
                    let sample: Vec<u64> = ids.iter().step_by(step).copied().collect();
                    let pass = sample.iter().filter(|id| live(**id)).count();
                    pass as f64 >= self.config.filter_flat_below * sample.len() as f64
                }
            }
        };
        let (cands, engine) = if use_graph {
            let g = self.hnsw.as_ref().expect("checked");
            let ef = self.config.hnsw.ef_search.max(want);
            (g.search(&q, want, ef, &live)?, Engine::Hnsw)
        } else {
            (self.flat.search(&q, want, &live), Engine::Flat)
        };
        let hits = match (&self.projection, full) {
            (Some(_), Some(fetch)) => flat::top_k(rescore(&cands, query, fetch), k),
            _ => cands,
        };
        Ok((
            hits.into_iter()
                .map(|(id, score)| Hit { id, score })
                .collect(),
            engine,
        ))
    }
}

/// Readers of [`rescore`]: reads in flight at once when the store is not in the page cache.
const RERANK_READERS: usize = 16;

/// A (second) read slower than this says the store is not in the page cache.
const RERANK_COLD_READ: std::time::Duration = std::time::Duration::from_micros(100);

/// The exact cosine of each candidate's stored full vector (candidates without one are dropped).
///
/// With the store in the page cache a read is a copy and a decode (tens of µs for a 12,288-d
/// vector), and the candidates are scored on rayon's threads. From a cold page cache the reads are
/// what a query waits on (a B-tree walk and a 24 KB value per candidate, from disk): when the second
/// read takes longer than [`RERANK_COLD_READ`], the rest run on up to [`RERANK_READERS`] threads
/// whatever the cores, so that reads in flight overlap (100k, store out of the page cache: 91.6 ->
/// 76.1 ms median). Each score depends on its candidate alone, so the result does not depend on the
/// split.
fn rescore(cands: &[(u64, f32)], query: &[f32], fetch: FullVectors<'_>) -> Vec<(u64, f32)> {
    use rayon::prelude::*;
    let one = |(id, _): &(u64, f32)| fetch(*id).map(|v| (*id, crate::embed::cosine(query, &v)));
    let score = |part: &[(u64, f32)]| -> Vec<(u64, f32)> { part.iter().filter_map(one).collect() };
    if cands.len() < 2 {
        return score(cands);
    }
    // The first read of a new process also pays for mapping the file in; the second one tells
    // whether the store is in the page cache.
    let (head, rest) = cands.split_at(2);
    let mut out: Vec<(u64, f32)> = one(&head[0]).into_iter().collect();
    let t0 = std::time::Instant::now();
    out.extend(one(&head[1]));
    let threads = RERANK_READERS.min(rest.len().div_ceil(4));
    if t0.elapsed() < RERANK_COLD_READ || threads <= 1 {
        out.par_extend(rest.par_iter().filter_map(one));
        return out;
    }
    let score = &score;
    let chunk = rest.len().div_ceil(threads);
    std::thread::scope(|s| {
        let started: Vec<_> = rest
            .chunks(chunk)
            .map(|part| {
                let reader = std::thread::Builder::new().spawn_scoped(s, move || score(part));
                (part, reader)
            })
            .collect();
        for (part, reader) in started {
            match reader {
                Ok(h) => match h.join() {
                    Ok(v) => out.extend(v),
                    Err(panic) => std::panic::resume_unwind(panic),
                },
                // No thread to be had: read this part here.
                Err(_) => out.extend(score(part)),
            }
        }
        out
    })
}

/// `(id, row)` pairs borrowed from rows that may be copies (mapped f16 rows are converted).
fn borrowed<'a>(owned: &'a [(u64, Cow<'_, [f32]>)]) -> Vec<(u64, &'a [f32])> {
    owned.iter().map(|(id, v)| (*id, &**v)).collect()
}

/// Exact cosine top-k over full vectors: the ground truth for tests and benchmarks.
pub fn brute_force(
    query: &[f32],
    vectors: &[(u64, Vec<f32>)],
    k: usize,
    filter: impl Fn(u64) -> bool,
) -> Vec<Hit> {
    let scored: Vec<(u64, f32)> = vectors
        .iter()
        .filter(|(id, _)| filter(*id))
        .map(|(id, v)| (*id, crate::embed::cosine(query, v)))
        .collect();
    flat::top_k(scored, k)
        .into_iter()
        .map(|(id, score)| Hit { id, score })
        .collect()
}

/// Fraction of `truth`'s ids found in `got`.
pub fn recall(got: &[Hit], truth: &[Hit]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let g: HashSet<u64> = got.iter().map(|h| h.id).collect();
    truth.iter().filter(|h| g.contains(&h.id)).count() as f64 / truth.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_rerank_from_slow_reads_scores_as_one_from_fast_reads() {
        // Slow reads (as from a cold page cache) take the many-readers path, fast ones rayon's;
        // both must give every candidate with a stored vector its exact cosine, and drop the rest.
        let vectors = data(200, 48, 21);
        let query = vectors[3].1.clone();
        let cands: Vec<(u64, f32)> = vectors.iter().map(|(id, _)| (*id, 0.0)).collect();
        let slow = std::sync::atomic::AtomicUsize::new(0);
        let fetch_with = |delay: bool| {
            let vectors = &vectors;
            let slow = &slow;
            move |id: u64| -> Option<Vec<f32>> {
                if delay {
                    slow.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
                // Every seventh candidate has no stored vector.
                (!id.is_multiple_of(7))
                    .then(|| vectors.iter().find(|(i, _)| *i == id).unwrap().1.clone())
            }
        };
        let sorted = |mut v: Vec<(u64, f32)>| {
            v.sort_by_key(|(id, _)| *id);
            v
        };
        let fast = fetch_with(false);
        let slow_fetch = fetch_with(true);
        let a = sorted(rescore(&cands, &query, &fast));
        let b = sorted(rescore(&cands, &query, &slow_fetch));
        assert_eq!(slow.load(std::sync::atomic::Ordering::Relaxed), cands.len());
        let want: Vec<(u64, f32)> = vectors
            .iter()
            .filter(|(id, _)| id % 7 != 0)
            .map(|(id, v)| (*id, crate::embed::cosine(&query, v)))
            .collect();
        assert_eq!(a, sorted(want));
        assert_eq!(a, b);
        assert!(rescore(&[], &query, &fast).is_empty());
        assert_eq!(rescore(&cands[1..2], &query, &fast).len(), 1);
    }

    fn data(n: usize, dim: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> = (0..20)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
            .collect();
        (0..n)
            .map(|i| {
                let c = &centres[i % 20];
                (
                    i as u64 + 1,
                    c.iter()
                        .map(|x| x + 0.3 * rng.random_range(-1.0f32..1.0))
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn compaction_rebuilds_over_live_rows() {
        let d = data(600, 32, 1);
        let config = IndexConfig {
            mode: SearchMode::Hnsw,
            ..IndexConfig::default()
        };
        let mut idx = SpaceIndex::new(SpaceId(9), 32, config);
        idx.add(&d).unwrap();
        idx.rebuild().unwrap();
        assert_eq!(idx.graph().unwrap().len(), 600);
        let gone: Vec<u64> = (1..=200).collect();
        assert_eq!(idx.remove(&gone), 200);
        assert_eq!(idx.remove(&gone), 0, "removing twice counts once");
        assert!(idx.needs_compaction());
        idx.rebuild().unwrap();
        assert_eq!(idx.tombstones(), 0);
        assert_eq!(idx.len(), 400);
        assert_eq!(idx.graph().unwrap().len(), 400);
        let (hits, engine) = idx
            .search(&d[300].1, 10, SearchMode::Auto, &|_| true, None)
            .unwrap();
        assert_eq!(engine, Engine::Hnsw);
        assert_eq!(hits[0].id, d[300].0);
        assert!(hits.iter().all(|h| h.id > 200));
    }

    #[test]
    fn projected_graph_with_rerank_gives_exact_scores() {
        let dim = 5000;
        let d = data(800, dim, 2);
        let config = IndexConfig {
            mode: SearchMode::Hnsw,
            ..IndexConfig::default()
        };
        let mut idx = SpaceIndex::new(SpaceId(3), dim, config);
        idx.add(&d).unwrap();
        idx.rebuild().unwrap();
        assert_eq!(idx.indexed_dim(), config.projection_dim);
        let fetch = |id: u64| d.get(id as usize - 1).map(|(_, v)| v.clone());
        let q = &d[17].1;
        let (hits, engine) = idx
            .search(q, 10, SearchMode::Auto, &|_| true, Some(&fetch))
            .unwrap();
        assert_eq!(engine, Engine::Hnsw);
        let truth = brute_force(q, &d, 10, |_| true);
        assert!(recall(&hits, &truth) >= 0.9);
        assert_eq!(hits[0].id, 18);
        assert!(
            (hits[1].score - crate::embed::cosine(q, &fetch(hits[1].id).unwrap())).abs() < 1e-6
        );
        assert!(idx
            .search(&[1.0; 3], 1, SearchMode::Auto, &|_| true, None)
            .is_err());
    }
}
