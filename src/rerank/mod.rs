//! Reranking candidates with the PEWE indicators.
//!
//! [`indicators`] holds the formulas as pure functions of label probabilities (and gradients or weights);
//! the stage that runs the model engine with each candidate on the new task's examples sits on top of them.

pub mod indicators;
pub(crate) mod stage;

pub use stage::{
    bare, paired_gain, rerank, CandidateScores, PerExample, RerankError, RerankInput, RerankOptions,
};

use serde::{Deserialize, Serialize};

/// The indicators peftdb can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Indicator {
    Loss,
    /// Loss after one temperature fitted per candidate on the examples
    /// ([`indicators::calibration`]): how well it ranks the labels, whatever its confidence.
    LossCal,
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
    pub const ALL: [Indicator; 9] = [
        Indicator::Loss,
        Indicator::LossCal,
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
            Indicator::LossCal => "loss-cal",
            Indicator::Kl => "kl",
            Indicator::El2n => "el2n",
            Indicator::CosLogits => "cos-logits",
            Indicator::Grand => "grand",
            Indicator::WeightCosine => "weight-cosine",
            Indicator::Euclidean => "euclidean",
            Indicator::Performance => "performance",
        }
    }
    /// The score on a per-example scale, so that one softmax temperature means the same for every
    /// indicator and any number of examples: Loss and calibrated Loss are means already; KL, EL2N and cosine of logits and
    /// labels are sums over the examples and are divided by their count; the gradient- and weight-based
    /// indicators are left as they are.
    pub fn per_example(self, score: f64, examples: usize) -> f64 {
        match self {
            Indicator::Kl | Indicator::El2n | Indicator::CosLogits => {
                score / examples.max(1) as f64
            }
            _ => score,
        }
    }
    pub fn parse(s: &str) -> Option<Indicator> {
        Indicator::ALL.into_iter().find(|i| i.as_str() == s)
    }
}

impl std::str::FromStr for Indicator {
    type Err = String;
    /// The one parser of an indicator name (`loss`, `loss-cal`, `cos-logits`, ...).
    fn from_str(s: &str) -> Result<Self, String> {
        Indicator::parse(s).ok_or_else(|| {
            let all: Vec<&str> = Indicator::ALL.iter().map(|i| i.as_str()).collect();
            format!("unknown indicator {s:?}; one of {}", all.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_example_scale_divides_sums_only() {
        // Sums over 4 examples become means; Loss (a mean) and GraNd (a norm) stay.
        assert_eq!(Indicator::CosLogits.per_example(3.0, 4), 0.75);
        assert_eq!(Indicator::El2n.per_example(-2.0, 4), -0.5);
        assert_eq!(Indicator::Kl.per_example(-1.0, 4), -0.25);
        assert_eq!(Indicator::Loss.per_example(-0.7, 4), -0.7);
        assert_eq!(Indicator::LossCal.per_example(-0.7, 4), -0.7);
        assert_eq!(Indicator::Grand.per_example(-5.0, 4), -5.0);
        // No examples: no division by zero.
        assert_eq!(Indicator::CosLogits.per_example(3.0, 0), 3.0);
        for i in Indicator::ALL {
            assert_eq!(Indicator::parse(i.as_str()), Some(i));
        }
    }
}
