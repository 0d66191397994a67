//! Errors of the model engine, one enum per operation: loading a model ([`LoadError`]) and running
//! it ([`EngineError`]); task data has its own ([`crate::task::TaskError`]).
//!
//! Every variant that concerns a file or a tensor names it, and the message says what to do.

use crate::error::ErrorKind;
use crate::task::TaskError;
use std::path::PathBuf;
use thiserror::Error;

/// Loading a base model ([`crate::engine::Engine::load`]) or choosing the device it runs on: the model
/// folder or file, its config, weights and tokenizer.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{dir}: model folder has no {file}; a Hugging Face model folder needs config.json, model.safetensors and tokenizer.json (run scripts/fetch-model.sh for the test model)")]
    ModelFileMissing { dir: PathBuf, file: &'static str },
    #[error("{path}: invalid model config: {reason}")]
    ModelConfig { path: PathBuf, reason: String },
    #[error("{path}: unsupported architecture {found}; the engine runs BERT-family encoders (model_type bert, roberta, xlm-roberta; absolute position embeddings) and Llama-family decoders (GGUF general.architecture llama, or a Hugging Face folder with model_type llama, mistral or qwen2; plain rotary embeddings, no rope_scaling)")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("{path}: weight {tensor:?} is missing{hint}")]
    MissingWeight {
        path: PathBuf,
        tensor: String,
        hint: String,
    },
    #[error("{path}: weight {tensor:?} has shape {found:?} but config.json implies {expected:?}")]
    WeightShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: cannot read the weights: {reason}")]
    Weights { path: PathBuf, reason: String },
    #[error("{path}: {reason} (peftdb reads GGUF files of the llama architecture whose tensors are F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or k-quants, dequantized to f32 at load)")]
    Gguf { path: PathBuf, reason: String },
    #[error("{path}: tokenizer does not load: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("device {requested:?} requested, but this peftdb was built without CUDA; rebuild with `cargo build --release --features cuda` or use `--device cpu`")]
    CudaNotCompiled { requested: String },
    #[error("device {spec:?}: {reason}")]
    Device { spec: String, reason: String },
}

/// Running the engine: tokenizing, scoring, training and evaluating with adapters on a loaded model.
#[derive(Debug, Error)]
pub enum EngineError {
    /// Loading the base model or choosing its device ([`LoadError`]).
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    #[error("adapter tensor {tensor:?} has shape {found:?} but this base model needs {expected:?}; the adapter was trained for another base model")]
    AdapterShape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("adapter tensor {tensor:?}: {reason}")]
    AdapterTensor { tensor: String, reason: String },
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Task(#[from] TaskError),
    #[error(transparent)]
    Read(#[from] crate::error::ReadError),
    #[error(transparent)]
    Export(#[from] crate::error::ExportError),
    #[error("tensor computation failed: {0}")]
    Compute(#[from] candle_core::Error),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Load(_) => ErrorKind::Model,
            EngineError::AdapterShape { .. }
            | EngineError::AdapterTensor { .. }
            | EngineError::Adapter(_) => ErrorKind::InvalidAdapter,
            EngineError::InvalidArgument(_) => ErrorKind::InvalidInput,
            EngineError::Io { .. } => ErrorKind::Io,
            EngineError::Task(_) => ErrorKind::InvalidTask,
            EngineError::Read(e) => e.kind(),
            EngineError::Export(e) => e.kind(),
            EngineError::Tokenize(_) | EngineError::Compute(_) => ErrorKind::Other,
        }
    }
}

/// Result of the engine.
pub type EngineResult<T> = std::result::Result<T, EngineError>;
