//! Index state kept in the store (table `indexes`), and streaming access to a space's embeddings for the
//! index builder. See `schema/index.md`.

use super::chunked::{self, SPACE_EMBEDDINGS};
use super::{During, ObjectId, Snapshot, Store};
use crate::embed::SpaceId;
use crate::error::StoreError;
use redb::{TableDefinition, TableError};
use serde::{Deserialize, Serialize};

/// space id -> JSON [`IndexMeta`].
pub(crate) const INDEXES: TableDefinition<u64, &[u8]> = TableDefinition::new("indexes");

/// What the store records about the current HNSW index files of a space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    /// Format of this record and of the files (bumped when either changes).
    pub format: u32,
    /// Increases with every write of the space's index; file names carry it.
    pub generation: u64,
    /// BLAKE3 (hex) over the files, in order, each prefixed by its length (u64 LE).
    pub checksum: String,
    /// File names, relative to the index directory.
    pub files: Vec<String>,
    /// Number of points in the graph when written (live or hidden).
    pub built_from_count: u64,
    /// Points in the graph that are no longer in the store when written.
    pub tombstones: u64,
    /// Dimension of the indexed vectors (the projected dimension for projected spaces).
    pub indexed_dim: usize,
    /// Dimension of the space's embeddings.
    pub full_dim: usize,
    /// Seed of the random projection, when the space is projected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection_seed: Option<u64>,
    /// hnsw_rs parameters (m, ef_construction).
    pub m: usize,
    pub ef_construction: usize,
    /// `little` or `big`, and pointer width: hnsw_rs dumps in native byte order.
    pub endian: String,
    pub pointer_bits: u32,
}

impl Store {
    /// The recorded index state of a space, if any.
    pub fn index_meta(&self, space: SpaceId) -> Result<Option<IndexMeta>, StoreError> {
        let r = self.read()?;
        let t = match r.open_table(INDEXES) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e).during(&self.path, "reading index state"),
        };
        match t.get(space.0).during(&self.path, "reading index state")? {
            // An unreadable record is not fatal: the index is derived data and is rebuilt.
            Some(v) => Ok(serde_json::from_slice(v.value()).ok()),
            None => Ok(None),
        }
    }

    /// Record (or with `None`, forget) the index state of a space.
    pub fn set_index_meta(
        &self,
        space: SpaceId,
        meta: Option<&IndexMeta>,
    ) -> Result<(), StoreError> {
        let w = self.write()?;
        {
            let mut t = w
                .open_table(INDEXES)
                .during(&self.path, "writing index state")?;
            match meta {
                Some(m) => {
                    t.insert(
                        space.0,
                        serde_json::to_vec(m).expect("serializes").as_slice(),
                    )
                    .during(&self.path, "writing index state")?;
                }
                None => {
                    t.remove(space.0)
                        .during(&self.path, "writing index state")?;
                }
            }
        }
        w.commit().during(&self.path, "writing index state")
    }

    /// Visit every embedding of a space in id order, one at a time (one read transaction; nothing
    /// accumulates). See [`Snapshot::for_each_embedding`].
    pub fn for_each_embedding(
        &self,
        space: SpaceId,
        f: impl FnMut(ObjectId, Vec<f32>),
    ) -> Result<(), StoreError> {
        self.snapshot()?.for_each_embedding(space, f)
    }

    /// The ids of a space's embeddings, in order (one read transaction).
    pub fn space_ids(&self, space: SpaceId) -> Result<Vec<ObjectId>, StoreError> {
        self.snapshot()?.space_ids(space)
    }
}

impl Snapshot<'_> {
    /// Visit every embedding of a space in id order, one at a time (nothing accumulates).
    pub fn for_each_embedding(
        &self,
        space: SpaceId,
        mut f: impl FnMut(ObjectId, Vec<f32>),
    ) -> Result<(), StoreError> {
        let r = &self.r;
        let t = r
            .open_table(SPACE_EMBEDDINGS)
            .during(&self.store.path, "reading embeddings")?;
        let mut bad = None;
        chunked::for_each_embedding(&t, space.0, |id, v| match v {
            Ok(v) if bad.is_none() => f(id, v),
            Ok(_) => {}
            Err(e) => {
                bad.get_or_insert((id, e));
            }
        })
        .during(&self.store.path, "reading embeddings")?;
        match bad {
            Some((id, e)) => {
                Err(self
                    .store
                    .corrupt("space_embeddings", format!("({space}, {id})"), e))
            }
            None => Ok(()),
        }
    }

    /// The ids of a space's embeddings, in order.
    pub fn space_ids(&self, space: SpaceId) -> Result<Vec<ObjectId>, StoreError> {
        let r = &self.r;
        let t = r
            .open_table(SPACE_EMBEDDINGS)
            .during(&self.store.path, "reading embeddings")?;
        let mut out = Vec::new();
        for item in t
            .range((space.0, 0u64, 0u32)..=(space.0, u64::MAX, u32::MAX))
            .during(&self.store.path, "reading embeddings")?
        {
            let (k, _) = item.during(&self.store.path, "reading embeddings")?;
            let (_, id, chunk) = k.value();
            if chunk == 0 {
                out.push(id);
            }
        }
        Ok(out)
    }
}
