//! Errors of the bottom layers, one enum per operation, as redb has them: reading an adapter
//! ([`ReadError`]), opening a store ([`OpenError`]), a transaction on an open store ([`StoreError`]),
//! ingesting a zoo ([`IngestError`]) and exporting an object ([`ExportError`]). This module imports
//! nothing above the leaf `crate::dtype`; the umbrella [`crate::Error`], which gathers every layer's
//! errors, sits at the top of the crate (`lib.rs`).
//!
//! Every variant that concerns a file names it, and the messages say what to do about the problem.

use crate::dtype::DType;
use std::path::PathBuf;
use thiserror::Error;

/// What kind of failure an error is, whichever layer raised it ([`crate::Error::kind`]): the stable
/// classification a caller branches on (the Python bindings map each kind to an exception class), while
/// the error itself keeps its message and sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Another process holds the store open for writing ([`OpenError::Locked`]).
    Locked,
    /// The store's schema is newer than this peftdb.
    NewerSchema,
    /// The store's schema is older and must be upgraded by a writable open.
    OlderSchema,
    /// No store at the path.
    StoreMissing,
    /// A store (or an output folder) already exists where a new one was asked for.
    AlreadyExists,
    /// The file is not a peftdb store.
    NotAStore,
    /// The last writer crashed and recovery needs a writable open.
    NeedsRecovery,
    /// A write on a store opened read-only.
    ReadOnly,
    /// No such task, object or space.
    NotFound,
    /// An adapter folder that cannot be read (or does not fit what it is used with).
    InvalidAdapter,
    /// Task data that breaks the task format.
    InvalidTask,
    /// A base model folder that cannot be loaded, or a device that cannot be used.
    Model,
    /// An option or argument out of its range.
    InvalidInput,
    /// Nothing to work with: no candidates in the store for this task and method.
    NoCandidates,
    /// Reading or writing files failed (disk full, permissions); what is stored is kept.
    Io,
    /// A stored record or derived file is damaged.
    Corrupt,
    /// The operation was stopped on request; what it committed is kept.
    Interrupted,
    /// Anything else (a computation that failed).
    Other,
}

/// A safetensors file that breaks the format's rules.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SafetensorsError {
    #[error("file is {len} bytes, shorter than the 8-byte header length: the file is truncated")]
    Truncated { len: u64 },
    #[error("header length {declared} exceeds the limit of {limit} bytes (header bomb or not a safetensors file)")]
    HeaderTooLarge { declared: u64, limit: u64 },
    #[error("header length {declared} is larger than the file ({file_len} bytes): the file is truncated or not safetensors")]
    HeaderBeyondFile { declared: u64, file_len: u64 },
    #[error("header is not valid UTF-8")]
    HeaderNotUtf8,
    #[error("header is not valid safetensors JSON: {0}")]
    HeaderJson(String),
    #[error("tensor name {name:?} appears twice in the header")]
    DuplicateTensor { name: String },
    #[error("tensor {tensor:?} has dtype {dtype}; peftdb stores F32, F16 and BF16 adapters (convert with `tensor.float()` before saving)")]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("tensor {tensor:?}: {reason}")]
    BadShape { tensor: String, reason: String },
    #[error("tensor {tensor:?}: data offsets [{begin}, {end}) are outside the data section ({data_len} bytes): the file is truncated or corrupt")]
    OffsetsOutOfRange {
        tensor: String,
        begin: u64,
        end: u64,
        data_len: u64,
    },
    #[error("tensor {tensor:?}: dtype {dtype} with shape {shape:?} needs {expected} bytes but its offsets span {found}")]
    LengthMismatch {
        tensor: String,
        dtype: DType,
        shape: Vec<u64>,
        expected: u64,
        found: u64,
    },
    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    Overlap { first: String, second: String },
    #[error("the data section has a gap at byte {at} (next tensor starts at {next})")]
    Gap { at: u64, next: u64 },
    #[error("the data section has {} unused trailing bytes", data_len - used)]
    TrailingBytes { used: u64, data_len: u64 },
    #[error("rejected by the reference safetensors reader: {0}")]
    Reference(String),
}

/// What PEFT expects of an `adapter_config.json` field ([`ReadError::ConfigField`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PeftExpectation {
    /// The type or value PEFT accepts there.
    pub expected: String,
    /// What PEFT does with the field, and where (its source file and function): why a bad value fails.
    pub why: &'static str,
    /// How to fix the config.
    pub fix: &'static str,
}

/// Reading an adapter from files.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an adapter folder (no adapter_config.json); point at the folder PEFT's save_pretrained wrote")]
    NotAnAdapter { path: PathBuf },
    #[error("{path}: pickle weights are never loaded (unpickling can run arbitrary code); convert them once with Python: `import torch; from safetensors.torch import save_file; save_file(torch.load(p, weights_only=True), 'adapter_model.safetensors')`, or re-save with `save_pretrained(..., safe_serialization=True)`")]
    PickleRefused { path: PathBuf },
    #[error("{dir}: no weights file (expected {expected})")]
    MissingWeights { dir: PathBuf, expected: String },
    #[error("{path}: invalid adapter config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{path}: PEFT could not load this config: \"{field}\" is {found}, but PEFT expects {} ({}). Fix: {}", .peft.expected, .peft.why, .peft.fix)]
    ConfigField {
        path: PathBuf,
        /// The top-level config key to fix.
        field: &'static str,
        /// What the config holds (the offending list item or object key named).
        found: String,
        /// What PEFT accepts, why, and the fix (boxed: keeps `ReadError` small).
        peft: Box<PeftExpectation>,
    },
    #[error("{path}: unknown peft_type {peft_type:?}; peftdb reads LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, BITFIT (its own) and AdapterHub bottleneck adapters")]
    UnknownPeftType { path: PathBuf, peft_type: String },
    #[error("{path}: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: SafetensorsError,
    },
    #[error("{path}: tensor {tensor:?} has shape {found:?}, but the config implies {expected}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("{path}: tensors have different dtypes ({first:?} is {first_dtype}, {second:?} is {second_dtype}); save all tensors in one dtype")]
    MixedDtypes {
        path: PathBuf,
        first: String,
        first_dtype: DType,
        second: String,
        second_dtype: DType,
    },
    #[error("{path}: tensor {tensor:?} does not belong to a {method} adapter ({reason})")]
    UnexpectedTensor {
        path: PathBuf,
        tensor: String,
        method: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    MissingTensor { path: PathBuf, reason: String },
    #[error("{path}: the adapter has no tensors")]
    Empty { path: PathBuf },
    #[error("{path}: tensor {tensor:?} holds a NaN or infinite value at element {index}; the training run diverged (pass --allow-non-finite to store it anyway)")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
    },
}

/// Opening or creating a store ([`crate::store::Store::create`], `open`, `open_read_only`,
/// `open_for_reading`, `open_or_create`, `with_backend`): what can go wrong before a handle exists.
#[derive(Debug, Error)]
pub enum OpenError {
    #[error("{path}: the store is open for writing by another process{}; close it (one writer at a time), or open read-only", holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Locked {
        path: PathBuf,
        holder: Option<String>,
    },
    #[error("{path}: store schema version {found} is newer than this peftdb supports ({supported}); upgrade peftdb")]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: store schema version {found} is older than {supported}; open it once for writing to upgrade it in place (`peftdb compact` does), or re-ingest the zoo into a new store")]
    OlderSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: not a peftdb store ({reason})")]
    NotAStore { path: PathBuf, reason: String },
    #[error("{path}: no store here; create one with `peftdb init` (or `Store::create`)")]
    Missing { path: PathBuf },
    #[error("{path}: store already exists")]
    Exists { path: PathBuf },
    #[error("{path}: the last writer did not close cleanly (crash or failed write) and recovery needs a writable open: open the store for writing once (any peftdb write command, or Store::open / Store::open_for_reading)")]
    NeedsRecovery { path: PathBuf },
    /// Reading or writing the file while opening it (the schema check, its creation or upgrade).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reading or writing an open store: what a transaction on a [`crate::store::Store`] or a
/// [`crate::store::Snapshot`] can meet.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: storage error while {during}: {source}; the store keeps every earlier commit (free disk space and re-run)")]
    Storage {
        path: PathBuf,
        during: &'static str,
        /// redb's error (an I/O error from the disk arrives as `redb::Error::Io`), boxed: it is large.
        #[source]
        source: Box<redb::Error>,
    },
    #[error("{path}: corrupt record in table {table} (key {key}): {detail}")]
    Corrupt {
        path: PathBuf,
        table: &'static str,
        key: String,
        detail: String,
    },
    #[error("no {what} {key:?} in the store")]
    NotFound { what: &'static str, key: String },
    #[error("adapter for base model {base_model:?} does not fit that model: {detail}")]
    BaseModelMismatch { base_model: String, detail: String },
    #[error("the store is read-only (opened with open_read_only)")]
    ReadOnly,
}

/// Batch ingestion of a zoo (errors that stop the whole batch; per-adapter problems are reported in the
/// [`crate::ingest::IngestReport`]).
#[derive(Debug, Error)]
pub enum IngestError {
    #[error("{path}: {reason}")]
    Walk { path: PathBuf, reason: String },
    #[error("{path}: invalid zoo manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: rejected, and --strict stops at the first bad adapter (the adapters before it are committed, none after it; fix or remove this one and re-run: what is stored is skipped as already present): {reason}")]
    Strict { path: PathBuf, reason: String },
    #[error("interrupted after {done} adapters ({remaining} not done): every batch committed so far is stored; run the same ingestion again to add the rest (what is stored is skipped)")]
    Interrupted { done: usize, remaining: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writing an object back to files.
#[derive(Debug, Error)]
pub enum ExportError {
    /// Reading the object out of the store.
    #[error("{source}")]
    Store {
        #[from]
        source: StoreError,
    },
    #[error("{path}: already exists and is not empty; choose a new folder or remove it")]
    TargetExists { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ReadError {
    /// [`ErrorKind::Io`] for an unreadable file, else [`ErrorKind::InvalidAdapter`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReadError::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::InvalidAdapter,
        }
    }
}

impl OpenError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OpenError::Locked { .. } => ErrorKind::Locked,
            OpenError::NewerSchema { .. } => ErrorKind::NewerSchema,
            OpenError::OlderSchema { .. } => ErrorKind::OlderSchema,
            OpenError::NotAStore { .. } => ErrorKind::NotAStore,
            OpenError::Missing { .. } => ErrorKind::StoreMissing,
            OpenError::Exists { .. } => ErrorKind::AlreadyExists,
            OpenError::NeedsRecovery { .. } => ErrorKind::NeedsRecovery,
            OpenError::Store(e) => e.kind(),
        }
    }
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Storage { .. } => ErrorKind::Io,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::BaseModelMismatch { .. } => ErrorKind::InvalidAdapter,
            StoreError::ReadOnly => ErrorKind::ReadOnly,
        }
    }
}

impl IngestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            IngestError::Walk { .. } => ErrorKind::Io,
            IngestError::Manifest { .. } => ErrorKind::InvalidInput,
            IngestError::Strict { .. } => ErrorKind::InvalidAdapter,
            IngestError::Interrupted { .. } => ErrorKind::Interrupted,
            IngestError::Store(e) => e.kind(),
        }
    }
}

impl ExportError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExportError::Store { source } => source.kind(),
            ExportError::TargetExists { .. } => ErrorKind::AlreadyExists,
            ExportError::Io { .. } => ErrorKind::Io,
        }
    }
}
