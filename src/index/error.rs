//! Errors of the index and of queries.

use crate::error::{ErrorKind, ReadError, StoreError};
use std::path::PathBuf;
use thiserror::Error;

/// Building, loading, saving or searching an index.
///
/// A damaged index file is never an error a user sees from [`crate::index::IndexManager::open`]: it is
/// rebuilt from the store. These variants surface only when rebuilding is impossible too.
#[derive(Debug, Error)]
pub enum IndexError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}; check permissions and free disk space, then re-run (the index is rebuilt from the store)")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: index file unusable ({reason}); it is derived data: delete it and it will be rebuilt from the store")]
    Corrupt { path: PathBuf, reason: String },
    #[error("hnsw_rs failed while {during}: {detail}; the index is derived data and will be rebuilt (or force exact search with `peftdb nearest --mode exact`)")]
    Hnsw { during: String, detail: String },
    #[error("query vector has dimension {found}, but space {space} has dimension {expected}")]
    DimensionMismatch {
        space: String,
        expected: usize,
        found: usize,
    },
    #[error("no space {space} in the store (list spaces with `peftdb stats`)")]
    UnknownSpace { space: String },
}

/// Resolving and running a nearest-task query.
#[derive(Debug, Error)]
pub enum QueryError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("no task {name:?} in the store (list tasks with `peftdb ls`)")]
    UnknownTask { name: String },
    #[error("no object {id} in the store")]
    UnknownObject { id: u64 },
    #[error("the query has no embedding to search with: {reason}")]
    NoEmbedding { reason: String },
    #[error("similarity `delta` needs a LoRA query, but {what} is {method}; use --similarity tupate or centered")]
    DeltaNeedsLora { what: String, method: String },
    #[error("{path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("invalid query: {0}")]
    Invalid(String),
}

impl IndexError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            IndexError::Store(e) => e.kind(),
            IndexError::Io { .. } => ErrorKind::Io,
            IndexError::Corrupt { .. } | IndexError::Hnsw { .. } => ErrorKind::Corrupt,
            IndexError::DimensionMismatch { .. } => ErrorKind::InvalidInput,
            IndexError::UnknownSpace { .. } => ErrorKind::NotFound,
        }
    }
}

impl QueryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            QueryError::Index(e) => e.kind(),
            QueryError::Store(e) => e.kind(),
            QueryError::Read(e) => e.kind(),
            QueryError::UnknownTask { .. } | QueryError::UnknownObject { .. } => {
                ErrorKind::NotFound
            }
            QueryError::NoEmbedding { .. }
            | QueryError::DeltaNeedsLora { .. }
            | QueryError::Invalid(_) => ErrorKind::InvalidInput,
            QueryError::Adapter { .. } => ErrorKind::InvalidAdapter,
        }
    }
}
