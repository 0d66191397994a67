//! The element types peftdb stores ([`DType`]): a leaf module that imports nothing from the crate, so
//! that the error enums at the bottom layer can name a tensor's dtype (re-exported as `object::DType`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Element type of a stored tensor. peftdb keeps the bytes as stored and converts to f32 only to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// The safetensors spelling (`F32`, `F16`, `BF16`).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
    /// Parse the safetensors spelling; `None` for dtypes peftdb does not store (integers, f64, f8...).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }
    pub(crate) fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<DType> {
        match c {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}
