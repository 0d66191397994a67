//! One index per space, persisted beside the store, with load-or-rebuild on open.
//!
//! Files live in `<store file>.index/` (e.g. `zoo.peftdb.index/`):
//! `space-<id>-g<generation>.hnsw.graph`, `.hnsw.data` (hnsw_rs's dump) and `.ids` (the graph's object
//! ids, u64 little-endian). The store's `indexes` table records, per space, the current generation, the
//! BLAKE3 checksum of those three files and the parameters they were built with
//! ([`crate::store::index_meta::IndexMeta`]).
//!
//! **On open** every space's flat rows are loaded from the store (streaming). A space at or above the
//! HNSW switch-over then needs its graph: it is loaded only if the record exists, its parameters,
//! byte order and dimension match, the files exist and their checksum matches; otherwise (missing,
//! stale, other generation, truncated, corrupt) it is rebuilt from the store, with progress reported
//! through the callback, and written back. A loaded graph is reconciled with the store: objects added
//! since are inserted, objects removed since become tombstones.
//!
//! **Writing** a graph: dump under a temporary basename (`.tmp-...`), compute the checksum, rename the
//! files into place, record the new generation in the store, then delete the older generation's files.
//! A crash at any point leaves either the old record with its files or files without a record (ignored
//! and cleaned up by the next write).
//!
//! A read-only store never writes files or records: graphs it needs are built in memory.

use super::error::IndexError;
use super::hnsw::{files_for, HnswGraph};
use super::vectors::{self, VecsHeader};
use super::{IndexConfig, SpaceIndex};
use crate::embed::SpaceId;
use crate::store::index_meta::IndexMeta;
use crate::store::{ObjectFacts, ObjectId, ObjectRecord, SpaceRecord, Store};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version of the index files and of [`IndexMeta`].
pub const INDEX_FORMAT: u32 = 1;

/// What happened to a space's index on open or sync.
#[derive(Debug, Clone, PartialEq)]
pub enum SpaceState {
    /// Below the switch-over: flat scan only.
    Flat,
    /// Graph loaded from disk (`inserted` objects added since it was written).
    Loaded { generation: u64, inserted: usize },
    /// Graph (re)built from the store, and why.
    Rebuilt { reason: String },
}

/// Progress of a (re)build, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// Starting to build `space` of `total` vectors.
    Building { space: &'a str, total: u64 },
    /// Done with it.
    Built { space: &'a str },
}

/// Per-space outcome of [`IndexManager::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub spaces: Vec<(SpaceId, SpaceState)>,
    /// Problems that did not stop the open (e.g. an index that could not be written back).
    pub warnings: Vec<String>,
}

/// All space indexes of a store, plus the object facts filters need (task records are read from the
/// store when a query needs them: a filter by group or tag, the groups of the tasks it returns).
pub struct IndexManager {
    dir: PathBuf,
    config: IndexConfig,
    writable: bool,
    spaces: HashMap<SpaceId, SpaceIndex>,
    records: HashMap<SpaceId, SpaceRecord>,
    /// Sorted by id (the store lists them in id order): found by binary search, no hashing of 100k ids.
    objects: Vec<ObjectFacts>,
}

impl std::fmt::Debug for IndexManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexManager")
            .field("dir", &self.dir)
            .field("spaces", &self.spaces.len())
            .field("objects", &self.objects.len())
            .finish()
    }
}

/// The index directory of a store file: `<store>.index`.
pub fn index_dir(store_path: &Path) -> PathBuf {
    let mut s = store_path.as_os_str().to_owned();
    s.push(".index");
    PathBuf::from(s)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |e| IndexError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

fn basename(space: SpaceId, generation: u64) -> String {
    format!("space-{space}-g{generation}")
}

/// Whether an index with `config` keeps an index of the space ([`IndexConfig::kind`]).
fn wants(config: &IndexConfig, rec: &SpaceRecord) -> bool {
    config.kind.is_none_or(|k| k == rec.key.kind)
}

/// What the space's `.vecs` file must say to be current.
fn vecs_header(store: &Store, idx: &SpaceIndex, rec: &SpaceRecord) -> VecsHeader {
    VecsHeader {
        dim: idx.indexed_dim(),
        full_dim: rec.dim,
        n: rec.count as usize,
        uuid: store.uuid().unwrap_or(0),
        generation: rec.generation,
        projection_seed: idx.projection().map(|p| p.seed),
    }
}

/// Rebuild a space's index (graph included when it wants one), reporting it to `progress`.
fn rebuild_reporting(
    idx: &mut SpaceIndex,
    rec: &SpaceRecord,
    progress: &dyn Fn(Progress<'_>),
) -> Result<(), IndexError> {
    let label = rec.key.label();
    progress(Progress::Building {
        space: &label,
        total: idx.len() as u64,
    });
    idx.rebuild()?;
    progress(Progress::Built { space: &label });
    Ok(())
}

/// BLAKE3 over files, each prefixed by its length.
fn checksum(files: &[PathBuf]) -> Result<String, IndexError> {
    let mut h = blake3::Hasher::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(io_err(f))?;
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn endian() -> &'static str {
    if cfg!(target_endian = "little") {
        "little"
    } else {
        "big"
    }
}

impl IndexManager {
    /// Open (load or rebuild) the indexes of every space of the store.
    pub fn open(
        store: &Store,
        config: IndexConfig,
        progress: &dyn Fn(Progress<'_>),
    ) -> Result<(IndexManager, OpenReport), IndexError> {
        let mut m = IndexManager {
            dir: index_dir(store.path()),
            config,
            writable: store.is_writable(),
            spaces: HashMap::new(),
            records: HashMap::new(),
            objects: Vec::new(),
        };
        let mut report = OpenReport::default();
        // The spaces and the catalog from one read transaction, so they agree even while a writer commits.
        let snap = store.snapshot()?;
        let recs = snap.spaces()?;
        // A cold process spends most of its time reading the catalog (a redb scan) and mapping and
        // checksumming each wanted space's `.vecs` file: the two are independent, so they overlap.
        let (catalog, mut mapped) = rayon::join(
            || snap.object_facts(),
            || {
                recs.iter()
                    .filter(|rec| m.wants(rec))
                    .map(|rec| (rec.id, m.open_vectors(store, rec)))
                    .collect::<HashMap<_, _>>()
            },
        );
        m.set_catalog(catalog?);
        drop(snap);
        for rec in recs {
            if !m.wants(&rec) {
                m.records.insert(rec.id, rec);
                continue;
            }
            let pre = mapped.remove(&rec.id);
            let state = m.load_space(store, &rec, pre, progress, &mut report.warnings)?;
            report.spaces.push((rec.id, state));
            m.records.insert(rec.id, rec);
        }
        Ok((m, report))
    }

    /// Whether this manager keeps an index of the space ([`IndexConfig::kind`]).
    fn wants(&self, rec: &SpaceRecord) -> bool {
        wants(&self.config, rec)
    }

    /// The index directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }
    pub fn space(&self, id: SpaceId) -> Option<&SpaceIndex> {
        self.spaces.get(&id)
    }
    pub fn space_record(&self, id: SpaceId) -> Option<&SpaceRecord> {
        self.records.get(&id)
    }
    pub fn space_records(&self) -> impl Iterator<Item = &SpaceRecord> {
        self.records.values()
    }
    /// Facts about a live object.
    pub fn object(&self, id: ObjectId) -> Option<&ObjectFacts> {
        self.objects
            .binary_search_by_key(&id, |o| o.id)
            .ok()
            .map(|i| &self.objects[i])
    }
    /// Every live object's facts, in id order.
    pub fn objects(&self) -> &[ObjectFacts] {
        &self.objects
    }

    fn refresh_catalog(&mut self, store: &Store) -> Result<(), IndexError> {
        self.set_catalog(store.object_facts()?);
        Ok(())
    }

    fn set_catalog(&mut self, objects: Vec<ObjectFacts>) {
        self.objects = objects;
        if !self.objects.is_sorted_by_key(|o| o.id) {
            self.objects.sort_by_key(|o| o.id);
        }
    }

    /// Whether every space `config` opens has a current `.vecs` file (header and length; the checksums are
    /// checked when it is mapped). A process that only queries can then open the store read-only: it
    /// writes nothing (a writable open writes and syncs redb's header on open and close) and needs no
    /// write access; when some file is missing or stale, a writable handle rebuilds and saves it.
    pub fn vectors_current(store: &Store, config: IndexConfig) -> Result<bool, IndexError> {
        let dir = index_dir(store.path());
        Ok(store
            .spaces()?
            .iter()
            .filter(|r| wants(&config, r))
            .all(|rec| {
                let header = vecs_header(store, &SpaceIndex::for_record(rec, config), rec);
                vectors::header_current(&vectors::path_for(&dir, rec.id), &header)
            }))
    }

    /// Delete the derived files in the store's index folder that no query can use any more: the `.vecs`
    /// rows of a space that is gone or has changed since they were written (`config`'s projection), and
    /// the graph files of a space that is gone. They would be rebuilt on the next open anyway; `peftdb
    /// compact` calls this so that a compacted store does not keep the rows of objects it removed.
    /// Returns the bytes freed.
    pub fn remove_stale_files(store: &Store, config: IndexConfig) -> Result<u64, IndexError> {
        let dir = index_dir(store.path());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0); // no index folder: nothing derived yet
        };
        let spaces: HashMap<SpaceId, SpaceRecord> =
            store.spaces()?.into_iter().map(|r| (r.id, r)).collect();
        let mut freed = 0;
        for e in entries {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            let stale = if name.starts_with(".tmp-space-") {
                // A temporary file left by a write that never finished (only writers write, and the
                // caller holds the store's one write handle).
                true
            } else if let Some(rest) = name.strip_prefix("space-") {
                let id: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                let Ok(space) = id.parse::<SpaceId>() else {
                    continue;
                };
                match spaces.get(&space) {
                    None => true,
                    Some(rec) if name.ends_with(".vecs") => {
                        let header = vecs_header(store, &SpaceIndex::for_record(rec, config), rec);
                        !vectors::header_current(&e.path(), &header)
                    }
                    Some(_) => false,
                }
            } else {
                continue;
            };
            if stale {
                let len = e.metadata().map(|md| md.len()).unwrap_or(0);
                std::fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                freed += len;
            }
        }
        Ok(freed)
    }

    /// Write a space's live rows as its `.vecs` file (writable handles only; failures become warnings:
    /// the next open reads the store instead).
    fn persist_vectors(
        &self,
        store: &Store,
        idx: &SpaceIndex,
        rec: &SpaceRecord,
        warnings: &mut Vec<String>,
    ) {
        if !self.writable {
            return;
        }
        let (ids, rows) = idx.live_rows();
        if ids.len() as u64 != rec.count {
            return; // not the store's state (a concurrent change): the next open rebuilds
        }
        let header = vecs_header(store, idx, rec);
        if let Err(e) = vectors::write(&self.dir, idx.space(), &header, &ids, &rows) {
            warnings.push(format!("space {}: vectors not saved: {e}", idx.space()));
        }
    }

    /// The space's `.vecs` file, if it is current and whole (`Err(reason)`: rebuild from the store).
    fn open_vectors(
        &self,
        store: &Store,
        rec: &SpaceRecord,
    ) -> Result<vectors::MappedRows, String> {
        let idx = SpaceIndex::for_record(rec, self.config);
        let header = vecs_header(store, &idx, rec);
        vectors::open(&vectors::path_for(&self.dir, rec.id), &header)
    }

    /// Load a space's index: from its `.vecs` file (already opened as `pre`, or opened here) when it is
    /// current, else from the store (and the file rewritten).
    fn load_space(
        &mut self,
        store: &Store,
        rec: &SpaceRecord,
        pre: Option<Result<vectors::MappedRows, String>>,
        progress: &dyn Fn(Progress<'_>),
        warnings: &mut Vec<String>,
    ) -> Result<SpaceState, IndexError> {
        let mut idx = SpaceIndex::for_record(rec, self.config);
        let opened = pre.unwrap_or_else(|| self.open_vectors(store, rec));
        match opened {
            Ok(rows) => idx.attach_mapped(rows),
            Err(_) => {
                self.read_rows(store, rec, &mut idx)?;
                self.persist_vectors(store, &idx, rec, warnings);
            }
        }
        self.finish_space(store, rec, idx, progress, warnings)
    }

    /// Stream a space's embeddings from the store into its rows.
    fn read_rows(
        &self,
        store: &Store,
        rec: &SpaceRecord,
        idx: &mut SpaceIndex,
    ) -> Result<(), IndexError> {
        let mut err = None;
        let mut batch = Vec::new();
        store.for_each_embedding(rec.id, |id, v| {
            if err.is_some() {
                return;
            }
            batch.push((id, v));
            if batch.len() >= 1024 {
                if let Err(e) = idx.add(&batch) {
                    err = Some(e);
                }
                batch.clear();
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        idx.add(&batch)?;
        Ok(())
    }

    /// Load or build the space's graph when it wants one, and keep the space.
    fn finish_space(
        &mut self,
        store: &Store,
        rec: &SpaceRecord,
        mut idx: SpaceIndex,
        progress: &dyn Fn(Progress<'_>),
        warnings: &mut Vec<String>,
    ) -> Result<SpaceState, IndexError> {
        let state = if !idx.wants_graph() {
            SpaceState::Flat
        } else {
            match self.try_load_graph(store, &mut idx) {
                Ok((generation, inserted)) => {
                    if inserted > 0 || idx.needs_compaction() {
                        if idx.needs_compaction() {
                            idx.rebuild()?;
                        }
                        self.persist(store, &idx, warnings);
                    }
                    SpaceState::Loaded {
                        generation,
                        inserted,
                    }
                }
                Err(reason) => {
                    rebuild_reporting(&mut idx, rec, progress)?;
                    self.persist(store, &idx, warnings);
                    SpaceState::Rebuilt { reason }
                }
            }
        };
        self.spaces.insert(rec.id, idx);
        Ok(state)
    }

    /// Load the recorded graph of a space if it is trustworthy; Err(reason) otherwise.
    fn try_load_graph(&self, store: &Store, idx: &mut SpaceIndex) -> Result<(u64, usize), String> {
        let meta = store
            .index_meta(idx.space())
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no index recorded".to_string())?;
        let params = idx.config().hnsw;
        if meta.format != INDEX_FORMAT
            || meta.endian != endian()
            || meta.pointer_bits != usize::BITS
            || meta.indexed_dim != idx.indexed_dim()
            || meta.full_dim != idx.full_dim()
            || meta.projection_seed != idx.projection().map(|p| p.seed)
            || meta.m != params.m
            || meta.ef_construction != params.ef_construction
        {
            return Err(format!(
                "index generation {} was built with other parameters or on another platform",
                meta.generation
            ));
        }
        let base = basename(idx.space(), meta.generation);
        let [graph, data] = files_for(&self.dir, &base);
        let ids_path = self.dir.join(format!("{base}.ids"));
        let files = vec![graph, data, ids_path.clone()];
        for f in &files {
            if !f.is_file() {
                return Err(format!("{} is missing", f.display()));
            }
        }
        let sum = checksum(&files).map_err(|e| e.to_string())?;
        if sum != meta.checksum {
            return Err(format!(
                "checksum mismatch in {}.* (truncated, corrupt, or from another generation)",
                self.dir.join(&base).display()
            ));
        }
        let ids_bytes =
            std::fs::read(&ids_path).map_err(|e| format!("{}: {e}", ids_path.display()))?;
        if ids_bytes.len() % 8 != 0 {
            return Err(format!(
                "{}: length is not a multiple of 8",
                ids_path.display()
            ));
        }
        let graph_ids: Vec<u64> = ids_bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let g = HnswGraph::load(&self.dir, &base, idx.indexed_dim(), params)
            .map_err(|e| e.to_string())?;
        if g.len() != graph_ids.len() {
            return Err(format!(
                "{}: graph has {} points but the id list {}",
                self.dir.join(&base).display(),
                g.len(),
                graph_ids.len()
            ));
        }
        let inserted = idx.attach_graph(g, &graph_ids).map_err(|e| e.to_string())?;
        Ok((meta.generation, inserted))
    }

    /// Write a space's graph (best effort: failures become warnings; the index stays usable in memory).
    fn persist(&self, store: &Store, idx: &SpaceIndex, warnings: &mut Vec<String>) {
        if !self.writable {
            return;
        }
        if let Err(e) = self.write_graph(store, idx) {
            warnings.push(format!("space {}: index not saved: {e}", idx.space()));
        }
    }

    fn write_graph(&self, store: &Store, idx: &SpaceIndex) -> Result<(), IndexError> {
        let Some(g) = idx.graph() else {
            return Ok(());
        };
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let old = store.index_meta(idx.space())?;
        let generation = old.as_ref().map(|m| m.generation + 1).unwrap_or(1);
        let tmp = format!(
            ".tmp-{}-{}",
            basename(idx.space(), generation),
            std::process::id()
        );
        let [tg, td] = g.dump(&self.dir, &tmp)?;
        let ti = self.dir.join(format!("{tmp}.ids"));
        {
            let mut f = std::fs::File::create(&ti).map_err(io_err(&ti))?;
            let mut buf = Vec::with_capacity(idx.row_ids().len() * 8);
            for id in idx.row_ids() {
                buf.extend_from_slice(&id.to_le_bytes());
            }
            f.write_all(&buf).map_err(io_err(&ti))?;
            f.sync_all().map_err(io_err(&ti))?;
        }
        for f in [&tg, &td] {
            std::fs::File::open(f)
                .and_then(|f| f.sync_all())
                .map_err(io_err(f))?;
        }
        let sum = checksum(&[tg.clone(), td.clone(), ti.clone()])?;
        let base = basename(idx.space(), generation);
        let [fg, fd] = files_for(&self.dir, &base);
        let fi = self.dir.join(format!("{base}.ids"));
        for (from, to) in [(&tg, &fg), (&td, &fd), (&ti, &fi)] {
            std::fs::rename(from, to).map_err(io_err(to))?;
        }
        let name = |p: &Path| {
            p.file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let meta = IndexMeta {
            format: INDEX_FORMAT,
            generation,
            checksum: sum,
            files: vec![name(&fg), name(&fd), name(&fi)],
            built_from_count: idx.row_ids().len() as u64,
            tombstones: idx.tombstones() as u64,
            indexed_dim: idx.indexed_dim(),
            full_dim: idx.full_dim(),
            projection_seed: idx.projection().map(|p| p.seed),
            m: g.params().m,
            ef_construction: g.params().ef_construction,
            endian: endian().into(),
            pointer_bits: usize::BITS,
        };
        store.set_index_meta(idx.space(), Some(&meta))?;
        // Remove other generations and leftovers of this space.
        let prefix = format!("space-{}-", idx.space());
        let tmp_prefix = format!(".tmp-space-{}-", idx.space());
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let current = meta.files.contains(&n);
                if !current && (n.starts_with(&prefix) || n.starts_with(&tmp_prefix)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Bring the indexes up to date with the store after writes made outside the manager: new objects
    /// are inserted, removed ones hidden, new spaces indexed, emptied spaces dropped.
    pub fn sync(
        &mut self,
        store: &Store,
        progress: &dyn Fn(Progress<'_>),
    ) -> Result<OpenReport, IndexError> {
        let mut report = OpenReport::default();
        self.refresh_catalog(store)?;
        let recs = store.spaces()?;
        let live_spaces: HashSet<SpaceId> = recs.iter().map(|r| r.id).collect();
        self.spaces.retain(|id, _| live_spaces.contains(id));
        self.records.retain(|id, _| live_spaces.contains(id));
        for rec in recs {
            if !self.wants(&rec) {
                self.records.insert(rec.id, rec);
                continue;
            }
            if !self.spaces.contains_key(&rec.id) {
                let st = self.load_space(store, &rec, None, progress, &mut report.warnings)?;
                report.spaces.push((rec.id, st));
                self.records.insert(rec.id, rec);
                continue;
            }
            let ids = store.space_ids(rec.id)?;
            let idset: HashSet<u64> = ids.iter().copied().collect();
            let idx = self.spaces.get_mut(&rec.id).expect("present");
            let gone: Vec<u64> = idx
                .row_ids()
                .iter()
                .copied()
                .filter(|id| !idset.contains(id))
                .collect();
            idx.remove(&gone);
            let mut new = Vec::new();
            for id in ids {
                if !idx.contains(id) {
                    if let Some(v) = store.embedding(rec.id, id)? {
                        new.push((id, v));
                    }
                }
            }
            let had_graph = idx.has_graph();
            idx.add(&new)?;
            let mut changed = !new.is_empty() || !gone.is_empty();
            let state = if idx.needs_compaction() || (idx.wants_graph() && !had_graph) {
                rebuild_reporting(idx, &rec, progress)?;
                changed = true;
                SpaceState::Rebuilt {
                    reason: "tombstones over the rebuild fraction, or the space passed the HNSW switch-over".into(),
                }
            } else if idx.has_graph() {
                SpaceState::Loaded {
                    generation: 0,
                    inserted: new.len(),
                }
            } else {
                SpaceState::Flat
            };
            if changed {
                let idx = &self.spaces[&rec.id];
                if idx.has_graph() {
                    self.persist(store, idx, &mut report.warnings);
                }
                self.persist_vectors(store, idx, &rec, &mut report.warnings);
            }
            report.spaces.push((rec.id, state));
            self.records.insert(rec.id, rec);
        }
        Ok(report)
    }

    /// Remove objects from the store and hide them from every index at once. Spaces whose tombstones
    /// pass the rebuild fraction are rebuilt (and saved).
    pub fn remove(
        &mut self,
        store: &Store,
        ids: &[ObjectId],
    ) -> Result<Vec<ObjectRecord>, IndexError> {
        let removed = store.remove(ids)?;
        let mut warnings = Vec::new();
        for rec in &removed {
            if let Ok(i) = self.objects.binary_search_by_key(&rec.id, |o| o.id) {
                self.objects.remove(i);
            }
            for e in &rec.embeddings {
                if let Some(idx) = self.spaces.get_mut(&e.space) {
                    idx.remove(&[rec.id]);
                }
            }
        }
        let touched: HashSet<SpaceId> = removed
            .iter()
            .flat_map(|r| r.embeddings.iter().map(|e| e.space))
            .collect();
        for s in touched {
            let Some(idx) = self.spaces.get_mut(&s) else {
                continue;
            };
            if idx.is_empty() {
                self.spaces.remove(&s);
                self.records.remove(&s);
                if self.writable {
                    store.set_index_meta(s, None)?;
                }
                continue;
            }
            if idx.needs_compaction() {
                idx.rebuild()?;
                let idx = &self.spaces[&s];
                self.persist(store, idx, &mut warnings);
            }
            if let Ok(fresh) = store.space(s) {
                self.persist_vectors(store, &self.spaces[&s], &fresh, &mut warnings);
                self.records.insert(s, fresh);
            } else if let Some(r) = self.records.get_mut(&s) {
                r.count = self.spaces[&s].len() as u64;
            }
        }
        Ok(removed)
    }
}
