//! peftdb: an embedded database for parameter-efficient adapters.
pub mod embed;
pub mod error;
pub mod ingest;
pub mod object;
pub mod store;
pub mod synth;

pub use error::{Error, Result};
