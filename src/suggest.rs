//! `suggest`: "here are a few examples of my new task; which of my adapters transfer, and what is the
//! initialization?" The pipeline itself is [`crate::transfer`] (one path that `suggest`, `rerank`,
//! `merge` and the transfer study compose); this module re-exports its entry point and writes the answer.

use crate::error::ExportError;
use crate::object::formats::write_adapter_with;
use crate::object::LightweightObject;
use std::path::Path;

pub use crate::transfer::{
    suggest, CandidateReport, Decision, LabelPrior, SuggestConfig, SuggestEvent, SuggestInput,
    SuggestReport, TransferError as SuggestError, DEFAULT_ACCURACY_GUARD, DEFAULT_INDICATOR,
    DEFAULT_K, DEFAULT_NOISE_Z, DEFAULT_PRIOR, DEFAULT_TAU,
};

/// Write the initialization and its report (`peftdb_report.json`) into `dir`, atomically: everything is
/// written into a temporary sibling folder that is renamed into place, so `dir` appears complete or not at
/// all.
pub fn write_suggestion(
    obj: &LightweightObject,
    report: &SuggestReport,
    dir: &Path,
) -> Result<(), ExportError> {
    let json = serde_json::to_vec_pretty(report).expect("report serializes");
    write_adapter_with(obj, dir, &[("peftdb_report.json", &json)])
}
