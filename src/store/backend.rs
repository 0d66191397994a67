//! Opening a store over any redb [`StorageBackend`] (used by the fault-injection tests, which wrap the
//! file backend to fail writes and syncs on demand).

use super::Store;
use crate::error::OpenError;
use redb::StorageBackend;
use std::path::Path;

impl Store {
    /// Open a store over a redb storage backend, creating the schema when the backend holds none yet.
    /// `label` names the store in errors (it is not opened). No `.owner` sidecar is written, and whether a
    /// second writer is kept out depends on the backend's locking.
    pub fn with_backend(
        label: impl AsRef<Path>,
        backend: impl StorageBackend,
    ) -> Result<Store, OpenError> {
        let path = label.as_ref();
        let db = Store::builder()
            .create_with_backend(backend)
            .map_err(|e| Store::map_open_err(path, e))?;
        Store::from_writable(db, path)
    }
}
