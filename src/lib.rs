//! # peftdb
//!
//! An embedded database for parameter-efficient adapters ("lightweight objects": LoRA, IA3, prefix and
//! prompt tuning, BitFit, bottleneck adapters). It stores a zoo of adapters with their **TuPaTE** task
//! embeddings (tuned parameters of each layer concatenated, then averaged over layers) in one crash-safe
//! redb file, so that for a new task one can find the source tasks most likely to transfer.
//!
//! Data flows one way: files -> [`object`] -> [`embed`] -> [`store`] (via [`ingest`] for whole zoos).
//!
//! ```
//! use peftdb::object::{ReadOptions, read_adapter};
//! use peftdb::store::{NewObject, Outcome, Store, TaskRecord};
//! # let dir = tempfile::tempdir().unwrap();
//! # let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
//! let store = Store::create(dir.path().join("zoo.redb"))?;
//! let object = read_adapter(&fixtures.join("lora_r8_qv"), &ReadOptions::default())?;
//! let outcome = store.ingest(NewObject {
//!     object,
//!     task: TaskRecord::named("sst2"),
//!     source: None,
//!     stage: Some("best".into()),
//!     metrics: Default::default(),
//! })?;
//! let Outcome::Added(id) = outcome else { panic!("new store") };
//! let record = store.object(id)?;
//! let space = record.tupate_space().expect("uniform layers embed");
//! assert_eq!(store.space(space)?.dim, 4 * 8 * 384); // q and v, A (8x384) and B (384x8)
//! store.export(id, &dir.path().join("out"))?; // byte-identical PEFT folder
//! # Ok::<(), peftdb::Error>(())
//! ```
//!
//! The library never prints; the `peftdb` binary is a thin shell over it. See ARCHITECTURE.md for the
//! module map and schema/store.md for the file format.

mod dtype;
pub mod embed;
pub mod engine;
pub mod ensemble;
pub mod error;
pub mod experiment;
pub mod ingest;
pub mod memory;
pub mod object;
pub mod rerank;
pub mod store;
pub mod suggest;
pub mod synth;
pub mod task;
pub mod transfer;

pub mod index;
pub mod query;

/// Any peftdb error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Read(#[from] error::ReadError),
    #[error(transparent)]
    Open(#[from] error::OpenError),
    #[error(transparent)]
    Store(#[from] error::StoreError),
    #[error(transparent)]
    Ingest(#[from] error::IngestError),
    #[error(transparent)]
    Export(#[from] error::ExportError),
    #[error(transparent)]
    Engine(Box<crate::engine::EngineError>),
    #[error(transparent)]
    Task(#[from] crate::task::TaskError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error(transparent)]
    Query(#[from] crate::index::QueryError),
    #[error(transparent)]
    Rerank(Box<crate::rerank::stage::RerankError>),
    #[error(transparent)]
    Ensemble(#[from] crate::ensemble::EnsembleError),
    /// The transfer pipeline (`suggest`, `rerank`, `evaluate`): [`transfer::TransferError`].
    #[error(transparent)]
    Suggest(Box<crate::suggest::SuggestError>),
    #[error(transparent)]
    Experiment(Box<crate::experiment::ExperimentError>),
    #[error(transparent)]
    Study(Box<crate::experiment::transfer::StudyError>),
}

macro_rules! boxed_from {
    ($($variant:ident($ty:ty)),*) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}
boxed_from!(
    Engine(crate::engine::EngineError),
    Rerank(crate::rerank::stage::RerankError),
    Suggest(crate::suggest::SuggestError),
    Experiment(crate::experiment::ExperimentError),
    Study(crate::experiment::transfer::StudyError)
);

impl Error {
    /// What kind of failure this is, through every layer it crossed ([`error::ErrorKind`]).
    pub fn kind(&self) -> error::ErrorKind {
        use error::ErrorKind;
        match self {
            Error::Read(e) => e.kind(),
            Error::Open(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Ingest(e) => e.kind(),
            Error::Export(e) => e.kind(),
            Error::Engine(e) => e.kind(),
            Error::Task(e) => e.kind(),
            Error::Index(e) => e.kind(),
            Error::Query(e) => e.kind(),
            Error::Rerank(e) => e.kind(),
            Error::Ensemble(e) => e.kind(),
            Error::Suggest(e) => e.kind(),
            Error::Experiment(_) | Error::Study(_) => ErrorKind::Other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
