//! peftdb: an embedded database for parameter-efficient adapters.
pub mod embed;
pub mod error;
pub mod object;
pub mod store;

pub use error::{Error, Result};
pub mod index;
pub mod query;
