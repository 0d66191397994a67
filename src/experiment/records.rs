//! The typed data of the replication harness's records, one struct per phase (`zoo`, `textemb`,
//! `limited`, `indicators`). A record's `data` is written from these and read back into them, so a
//! missing or mistyped field is an error naming the record, never a silent default (a missing
//! `"examples"` count once rescaled the ensemble weights). The JSON is the one the harness always wrote:
//! the committed results files read back unchanged (`tests/experiment.rs` parses every record).

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// An optional value that must still be present (as a number or `null`): serde would read a missing
/// `Option` field as `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<T>::deserialize(d)
}

/// A checkpoint of a zoo run (`early` or `best`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointData {
    pub step: usize,
    pub dev_accuracy: f64,
    #[serde(deserialize_with = "present")]
    pub test_accuracy: Option<f64>,
}

/// One dev evaluation of a zoo run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    pub step: usize,
    pub dev_accuracy: f64,
    pub dev_loss: f64,
    pub train_loss: f64,
}

/// Phase `zoo`: one adapter trained on a task's train split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZooData {
    pub method: String,
    pub train_size: usize,
    pub train_used: usize,
    pub early: CheckpointData,
    pub best: CheckpointData,
    pub history: Vec<HistoryPoint>,
}

/// Phase `textemb`: the mean text embedding of a task's training examples (the TEXTEMB predictor).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextembData {
    pub vector: Vec<f64>,
    pub train_size: usize,
    pub examples: usize,
}

/// How a LIMITED run's initialization was built (empty for scratch, a source and the average).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitData {
    /// Manual Division: the other tasks of the target's group that were averaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_members: Option<Vec<String>>,
    /// Manual Division with no other task of the group: `"average"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// PEWE ensemble: the sources and their softmax weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
}

/// Phase `limited`: LIMITED training of a target from one initialization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LimitedData {
    #[serde(deserialize_with = "present")]
    pub test_accuracy: Option<f64>,
    pub dev_accuracy: f64,
    pub train_examples: usize,
    pub test_examples: usize,
    pub init: InitData,
}

/// Phase `indicators`: every indicator's score of every source on a target's examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndicatorsData {
    pub sources: Vec<String>,
    /// Examples the scores were computed on (the per-example scale of the softmax).
    pub examples: usize,
    /// Indicator name -> one score per source, in `sources` order.
    pub scores: BTreeMap<String, Vec<f64>>,
    /// Each source's accuracy on the examples.
    pub accuracy: Vec<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_are_errors_and_nulls_are_kept() {
        let ok = r#"{"test_accuracy": null, "dev_accuracy": 0.5, "train_examples": 32, "test_examples": 100, "init": {}}"#;
        let l: LimitedData = serde_json::from_str(ok).unwrap();
        assert_eq!(l.test_accuracy, None);
        assert_eq!(l.init, InitData::default());
        let missing =
            r#"{"dev_accuracy": 0.5, "train_examples": 32, "test_examples": 100, "init": {}}"#;
        let e = serde_json::from_str::<LimitedData>(missing).unwrap_err();
        assert!(e.to_string().contains("test_accuracy"), "{e}");
        let no_count = r#"{"sources": ["a"], "scores": {"loss": [0.1]}, "accuracy": [0.5]}"#;
        let e = serde_json::from_str::<IndicatorsData>(no_count).unwrap_err();
        assert!(e.to_string().contains("examples"), "{e}");
    }

    #[test]
    fn the_json_written_is_the_json_the_harness_always_wrote() {
        let i = InitData {
            group_members: Some(vec!["b".into()]),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&i).unwrap(),
            serde_json::json!({"group_members": ["b"]})
        );
        assert_eq!(
            serde_json::to_value(InitData::default()).unwrap(),
            serde_json::json!({})
        );
    }
}
