//! A panic-free wrapper around hnsw_rs 0.3.5.
//!
//! - Vectors are unit-normalised by the caller and compared with hnsw_rs's `DistL2`; on unit vectors
//!   `cos = 1 - d^2 / 2`, so the ranking is the cosine ranking. (`DistDot` panics on normalised vectors
//!   without hnsw_rs's `simdeez_f` feature, and `DistCosine` asserts on rounding; L2 has neither problem.)
//! - hnsw_rs has no delete: callers pass a filter to [`HnswGraph::search`] (it is applied inside the graph
//!   walk, so `k` results still come back when some points are hidden).
//! - insert and search must not run at once: an `RwLock` guards the graph (search shares, insert excludes).
//! - every call into hnsw_rs that can panic (dump, reload, insert, search) runs under `catch_unwind` and
//!   turns a panic into [`IndexError::Hnsw`]. Files are checksummed by the manager before hnsw_rs ever
//!   reads them, so a damaged file never reaches its asserting reader in the first place.
//! - `file_dump` needs the graph built with `max_layer` = 16 ([`MAX_LAYER`]) into files that do not exist
//!   yet: the manager dumps under a fresh temporary basename and renames into place.
//! - `HnswIo::load_hnsw` borrows its loader for the index's lifetime; the loader (a few paths and options,
//!   the data is copied, not memory-mapped) is leaked, once per load, to give a `'static` graph.

use super::error::IndexError;
use hnsw_rs::prelude::{AnnT, DistL2, Hnsw, HnswIo};
use serde::{Deserialize, Serialize};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// hnsw_rs's maximum number of layers; `file_dump` works only with graphs built with it.
pub const MAX_LAYER: usize = 16;

/// Graph parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Neighbours kept per node and layer (hnsw_rs `max_nb_connection`, at most 255).
    pub m: usize,
    /// Candidate list size while building.
    pub ef_construction: usize,
    /// Candidate list size while searching (raised to `k` when smaller).
    pub ef_search: usize,
}

impl Default for HnswParams {
    /// Measured on 10k seeded clustered vectors of dimension 384: recall@10 1.0 unfiltered and >= 0.99
    /// with filters and deletes (tests/index_recall.rs); m = 24 / ef_construction = 200 built 2x slower
    /// for no measurable recall gain.
    fn default() -> Self {
        HnswParams {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

fn guarded<T>(during: &str, f: impl FnOnce() -> T) -> Result<T, IndexError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| IndexError::Hnsw {
        during: during.to_string(),
        detail: panic_text(p),
    })
}

/// An HNSW graph of unit vectors keyed by object id.
pub struct HnswGraph {
    dim: usize,
    params: HnswParams,
    inner: RwLock<Hnsw<'static, f32, DistL2>>,
}

impl std::fmt::Debug for HnswGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswGraph")
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("len", &self.len())
            .finish()
    }
}

impl HnswGraph {
    /// An empty graph sized for about `capacity` points.
    pub fn new(dim: usize, capacity: usize, params: HnswParams) -> Result<HnswGraph, IndexError> {
        let m = params.m.clamp(4, 255);
        let h = guarded("creating a graph", || {
            Hnsw::<f32, DistL2>::new(
                m,
                capacity.max(16),
                MAX_LAYER,
                params.ef_construction.max(m),
                DistL2,
            )
        })?;
        Ok(HnswGraph {
            dim,
            params,
            inner: RwLock::new(h),
        })
    }

    /// Build a graph from unit vectors (parallel insertion).
    pub fn build(
        dim: usize,
        items: &[(u64, &[f32])],
        params: HnswParams,
    ) -> Result<HnswGraph, IndexError> {
        let g = HnswGraph::new(dim, items.len(), params)?;
        g.insert_many(items)?;
        Ok(g)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn params(&self) -> HnswParams {
        self.params
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Hnsw<'static, f32, DistL2>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Hnsw<'static, f32, DistL2>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of points in the graph (hidden ones included).
    pub fn len(&self) -> usize {
        self.read().get_nb_point()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check_dims(&self, items: &[(u64, &[f32])]) -> Result<(), IndexError> {
        if let Some((_, v)) = items.iter().find(|(_, v)| v.len() != self.dim) {
            return Err(IndexError::DimensionMismatch {
                space: "hnsw graph".into(),
                expected: self.dim,
                found: v.len(),
            });
        }
        Ok(())
    }

    /// Insert unit vectors (excludes concurrent searches while it runs).
    pub fn insert_many(&self, items: &[(u64, &[f32])]) -> Result<(), IndexError> {
        self.check_dims(items)?;
        let mut g = self.write();
        g.set_searching_mode(false);
        let data: Vec<(&[f32], usize)> = items.iter().map(|(id, v)| (*v, *id as usize)).collect();
        let r = guarded("inserting", || {
            if data.len() < 64 {
                for d in &data {
                    g.insert_slice(*d);
                }
            } else {
                g.parallel_insert_slice(&data);
            }
        });
        g.set_searching_mode(true);
        r
    }

    /// The `k` nearest (id, cosine) among ids passing `filter`; `ef` of 0 uses the default.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: &dyn Fn(u64) -> bool,
    ) -> Result<Vec<(u64, f32)>, IndexError> {
        if query.len() != self.dim {
            return Err(IndexError::DimensionMismatch {
                space: "hnsw graph".into(),
                expected: self.dim,
                found: query.len(),
            });
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        let ef = if ef == 0 { self.params.ef_search } else { ef }.max(k);
        let g = self.read();
        let f = |id: &usize| filter(*id as u64);
        let res = guarded("searching", || g.search_filter(query, k, ef, Some(&f)))?;
        Ok(res
            .into_iter()
            .map(|n| {
                let d = n.distance;
                (n.d_id as u64, 1.0 - d * d / 2.0)
            })
            .collect())
    }

    /// Dump to `dir/basename.hnsw.{graph,data}` (the files must not exist). Returns the two paths.
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<[PathBuf; 2], IndexError> {
        let files = files_for(dir, basename);
        for f in &files {
            if f.exists() {
                std::fs::remove_file(f).map_err(|e| IndexError::Io {
                    path: f.clone(),
                    source: e,
                })?;
            }
        }
        // hnsw_rs panics when it cannot open its output files: check that the directory is writable.
        let probe = dir.join(format!("{basename}.probe"));
        std::fs::write(&probe, b"").map_err(|e| IndexError::Io {
            path: probe.clone(),
            source: e,
        })?;
        let _ = std::fs::remove_file(&probe);
        let g = self.read();
        let name =
            guarded("dumping", || g.file_dump(dir, basename))?.map_err(|e| IndexError::Hnsw {
                during: "dumping".into(),
                detail: e.to_string(),
            })?;
        if name != basename {
            return Err(IndexError::Hnsw {
                during: "dumping".into(),
                detail: format!("hnsw_rs wrote basename {name:?} instead of {basename:?}"),
            });
        }
        Ok(files)
    }

    /// Load a dump. The caller verifies the files' checksum first; a panic inside hnsw_rs is still caught.
    pub fn load(
        dir: &Path,
        basename: &str,
        dim: usize,
        params: HnswParams,
    ) -> Result<HnswGraph, IndexError> {
        let [graph, data] = files_for(dir, basename);
        for f in [&graph, &data] {
            if !f.is_file() {
                return Err(IndexError::Corrupt {
                    path: f.clone(),
                    reason: "missing".into(),
                });
            }
        }
        let dir = dir.to_path_buf();
        let basename = basename.to_string();
        let h = guarded("loading", move || {
            // Leaked on purpose: hnsw_rs ties the graph's lifetime to its loader (see module docs).
            let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(&dir, &basename)));
            io.load_hnsw::<f32, DistL2>()
        })?
        .map_err(|e| IndexError::Corrupt {
            path: graph.clone(),
            reason: e.to_string(),
        })?;
        let found = h.get_point_indexation().get_data_dimension();
        if h.get_nb_point() > 0 && found != dim {
            return Err(IndexError::Corrupt {
                path: data,
                reason: format!("dimension {found}, expected {dim}"),
            });
        }
        let mut h = h;
        h.set_searching_mode(true);
        Ok(HnswGraph {
            dim,
            params,
            inner: RwLock::new(h),
        })
    }
}

/// The two files hnsw_rs writes for a basename: `.hnsw.graph` and `.hnsw.data`.
pub fn files_for(dir: &Path, basename: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{basename}.hnsw.graph")),
        dir.join(format!("{basename}.hnsw.data")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::flat::normalize;

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        normalize(&mut v);
        v
    }

    #[test]
    fn build_search_dump_load() {
        let vecs: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                unit(&[
                    (i as f32).sin(),
                    (i as f32 * 0.3).cos(),
                    1.0,
                    (i % 7) as f32,
                ])
            })
            .collect();
        let items: Vec<(u64, &[f32])> = vecs
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64 + 10, v.as_slice()))
            .collect();
        let g = HnswGraph::build(4, &items, HnswParams::default()).unwrap();
        let r = g.search(&vecs[5], 3, 0, &|_| true).unwrap();
        assert_eq!(r[0].0, 15);
        assert!((r[0].1 - 1.0).abs() < 1e-4);
        let r = g.search(&vecs[5], 3, 0, &|id| id != 15).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| x.0 != 15));
        let dir = tempfile::tempdir().unwrap();
        g.dump(dir.path(), "t").unwrap();
        let h = HnswGraph::load(dir.path(), "t", 4, HnswParams::default()).unwrap();
        assert_eq!(h.len(), 200);
        assert_eq!(h.search(&vecs[5], 1, 0, &|_| true).unwrap()[0].0, 15);
        assert!(g.search(&[1.0], 1, 0, &|_| true).is_err());
    }
}
