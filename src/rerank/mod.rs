//! Reranking candidates with the PEWE indicators.
//!
//! [`indicators`] holds the formulas as pure functions of label probabilities (and gradients or weights);
//! the stage that runs the model engine with each candidate on the new task's examples sits on top of them.

pub mod indicators;
pub mod stage;

use serde::{Deserialize, Serialize};

/// The indicators peftdb can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    Loss,
    Kl,
    El2n,
    /// Cosine of logits (probabilities) and one-hot labels.
    CosLogits,
    Grand,
    WeightCosine,
    Euclidean,
    Performance,
}

impl Indicator {
    pub const ALL: [Indicator; 8] = [
        Indicator::Loss,
        Indicator::Kl,
        Indicator::El2n,
        Indicator::CosLogits,
        Indicator::Grand,
        Indicator::WeightCosine,
        Indicator::Euclidean,
        Indicator::Performance,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Indicator::Loss => "loss",
            Indicator::Kl => "kl",
            Indicator::El2n => "el2n",
            Indicator::CosLogits => "cos-logits",
            Indicator::Grand => "grand",
            Indicator::WeightCosine => "weight-cosine",
            Indicator::Euclidean => "euclidean",
            Indicator::Performance => "performance",
        }
    }
    pub fn parse(s: &str) -> Option<Indicator> {
        Indicator::ALL.into_iter().find(|i| i.as_str() == s)
    }
}
