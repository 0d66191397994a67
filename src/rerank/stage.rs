//! The rerank stage: run the base model with each candidate on the new task's examples and compute the
//! requested indicators.
//!
//! Passes are shared: the verbalizers and the examples are tokenized once; each candidate needs one
//! batched forward pass over the examples for all data-based indicators (Loss, KL, EL2N, cosine of logits
//! and labels), one backward pass for GraNd, and `m` training steps for Euclidean and Performance. The
//! reference adapter O~ (for KL and weight cosine) is scored once. Candidates of different methods can be
//! scored together. LoRA candidates of one layout share their forward passes: `stack` of them are stacked
//! and run over the examples repeated once per candidate ([`Engine::score_many`]).

use super::indicators;
use super::Indicator;
use crate::engine::scoring::ScoreOptions;
use crate::engine::train::{train, TrainConfig, TrainData};
use crate::engine::{Engine, EngineError, TokenIds};
use crate::error::ErrorKind;
use crate::object::LightweightObject;
use crate::task::Example;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use thiserror::Error;

/// Errors of the rerank stage.
#[derive(Debug, Error)]
pub enum RerankError {
    #[error("no candidates to rerank")]
    NoCandidates,
    #[error("no examples to score candidates on")]
    NoExamples,
    #[error("{got} example weights for {examples} examples; give one finite, non-negative weight per example with a positive sum")]
    BadWeights { got: usize, examples: usize },
    #[error(
        "indicator {0} needs a reference adapter (a fresh adapter briefly trained on the new task)"
    )]
    NeedsReference(&'static str),
    #[error("candidate {index}: {source}")]
    Candidate {
        index: usize,
        #[source]
        source: Box<EngineError>,
    },
    #[error(
        "candidate {index} cannot be compared with the reference adapter by weights: {detail}"
    )]
    WeightMismatch { index: usize, detail: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl RerankError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RerankError::NoCandidates => ErrorKind::NoCandidates,
            RerankError::NoExamples
            | RerankError::BadWeights { .. }
            | RerankError::NeedsReference(_) => ErrorKind::InvalidInput,
            RerankError::Candidate { source, .. } => source.kind(),
            RerankError::WeightMismatch { .. } => ErrorKind::InvalidAdapter,
            RerankError::Engine(e) => e.kind(),
        }
    }
}

/// Options of the rerank stage.
#[derive(Debug, Clone)]
pub struct RerankOptions {
    pub indicators: Vec<Indicator>,
    pub score: ScoreOptions,
    /// Steps of training for Euclidean / Performance.
    pub m_steps: usize,
    pub seed: u64,
    /// LoRA candidates of one layout scored together, this many per forward pass
    /// ([`Engine::score_many`]); 1 scores each candidate alone.
    pub stack: usize,
}

impl Default for RerankOptions {
    fn default() -> Self {
        RerankOptions {
            indicators: vec![
                Indicator::Loss,
                Indicator::Kl,
                Indicator::El2n,
                Indicator::CosLogits,
            ],
            score: ScoreOptions::default(),
            m_steps: 10,
            seed: 0,
            stack: 4,
        }
    }
}

/// The scores of one candidate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CandidateScores {
    /// Indicator name -> S_i (higher is better).
    pub scores: BTreeMap<String, f64>,
    /// Accuracy of the candidate as is on the examples.
    pub accuracy: f64,
    /// Mean cross-entropy on the examples.
    pub cross_entropy: f64,
    /// Seconds spent on this candidate.
    pub seconds: f64,
    /// Each example's term of the label-only indicators (for paired comparisons with the bare model:
    /// [`paired_gain`]).
    #[serde(skip)]
    pub per_example: PerExample,
}

/// Each example's term of the label-only indicators, in example order (higher is better).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerExample {
    /// log P\[y_j\] (Loss).
    pub loss: Vec<f64>,
    /// log-likelihood after the fitted temperature (calibrated Loss).
    pub loss_cal: Vec<f64>,
    /// -||P_j - onehot(y_j)|| (EL2N).
    pub el2n: Vec<f64>,
    /// cos(P_j, onehot(y_j)) (cosine of logits and labels).
    pub cos_logits: Vec<f64>,
}

impl PerExample {
    /// The terms of every example; with `weights` (one per example, mean 1: [`RerankInput::weights`])
    /// each term is multiplied by its example's weight and the calibration is fitted on the weighted
    /// examples, so means and sums of the terms are the weighted indicators.
    pub fn of(
        probs: &[f32],
        classes: usize,
        targets: &[usize],
        weights: Option<&[f64]>,
    ) -> PerExample {
        let mut pe = PerExample {
            loss: indicators::loss_terms(probs, classes, targets),
            loss_cal: indicators::loss_calibrated_terms_weighted(probs, classes, targets, weights),
            el2n: indicators::el2n_terms(probs, classes, targets),
            cos_logits: indicators::cosine_terms(probs, classes, targets),
        };
        if let Some(w) = weights {
            for series in [
                &mut pe.loss,
                &mut pe.loss_cal,
                &mut pe.el2n,
                &mut pe.cos_logits,
            ] {
                for (x, w) in series.iter_mut().zip(w) {
                    *x *= w;
                }
            }
        }
        pe
    }

    /// The series of `indicator`, for those that are a sum or mean of per-example terms of the label
    /// probabilities; `None` for the others (KL needs the reference, the rest are not per example).
    pub fn series(&self, indicator: Indicator) -> Option<&[f64]> {
        match indicator {
            Indicator::Loss => Some(&self.loss),
            Indicator::LossCal => Some(&self.loss_cal),
            Indicator::El2n => Some(&self.el2n),
            Indicator::CosLogits => Some(&self.cos_logits),
            _ => None,
        }
    }

    /// The indicator itself, from its terms: the mean for Loss and calibrated Loss, the sum for EL2N
    /// and the cosine of logits and labels (as [`indicators`] defines them); `None` for the others.
    pub fn indicator(&self, indicator: Indicator) -> Option<f64> {
        let terms = self.series(indicator)?;
        let sum = terms.iter().sum::<f64>();
        Some(match indicator {
            Indicator::Loss | Indicator::LossCal => sum / terms.len().max(1) as f64,
            _ => sum,
        })
    }
}

/// Accuracy with each example weighted (`weights` of mean 1, else plain accuracy).
fn weighted_accuracy(predictions: &[usize], targets: &[usize], weights: Option<&[f64]>) -> f64 {
    let hits: f64 = predictions
        .iter()
        .zip(targets)
        .enumerate()
        .filter(|(_, (a, b))| a == b)
        .map(|(j, _)| weights.map_or(1.0, |w| w[j]))
        .sum();
    hits / targets.len().max(1) as f64
}

/// Checks `input.weights` against the examples.
fn check_weights(input: &RerankInput<'_>) -> Result<(), RerankError> {
    if let Some(w) = input.weights {
        let ok = w.len() == input.examples.len()
            && w.iter().all(|x| x.is_finite() && *x >= 0.0)
            && w.iter().sum::<f64>() > 0.0;
        if !ok {
            return Err(RerankError::BadWeights {
                got: w.len(),
                examples: input.examples.len(),
            });
        }
    }
    Ok(())
}

/// Paired comparison of two per-example series over the same examples: the mean of `a_j - b_j` and its
/// standard error (sd / sqrt(n), 0 for fewer than two examples).
pub fn paired_gain(a: &[f64], b: &[f64]) -> (f64, f64) {
    let n = a.len().min(b.len());
    if n == 0 {
        return (0.0, 0.0);
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let mean = d.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = d.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// The bare model (no adapter) on the same examples: accuracy, mean cross-entropy, per-example terms and
/// the label-only indicators (Loss, calibrated Loss, EL2N, cosine of logits and labels); the reference
/// against which [`paired_gain`] tells whether a candidate helps.
pub fn bare(input: &RerankInput<'_>, opts: &RerankOptions) -> Result<CandidateScores, RerankError> {
    if input.examples.is_empty() {
        return Err(RerankError::NoExamples);
    }
    check_weights(input)?;
    let t0 = Instant::now();
    let engine = input.engine;
    let labels: Vec<TokenIds> = engine.tokenize_labels(input.label_texts)?;
    let texts: Vec<&str> = input.examples.iter().map(|e| e.text.as_str()).collect();
    let inputs: Vec<TokenIds> = engine.tokenize(&texts)?;
    let targets: Vec<usize> = input.examples.iter().map(|e| e.label).collect();
    let classes = input.label_texts.len();
    let sc = engine.score(None, &labels, &inputs, &opts.score)?;
    let accuracy = weighted_accuracy(&sc.predictions(), &targets, input.weights);
    let cross_entropy = sc.cross_entropy(&targets);
    let probs: Vec<f32> = sc.probs.into_iter().flatten().collect();
    let per_example = PerExample::of(&probs, classes, &targets, input.weights);
    let scores = [
        Indicator::Loss,
        Indicator::LossCal,
        Indicator::El2n,
        Indicator::CosLogits,
    ]
    .into_iter()
    .filter_map(|ind| Some((ind.as_str().to_string(), per_example.indicator(ind)?)))
    .collect();
    Ok(CandidateScores {
        scores,
        accuracy,
        cross_entropy,
        seconds: t0.elapsed().as_secs_f64(),
        per_example,
    })
}

/// The new task's side of the stage: its verbalizers, its examples and (for KL / weight cosine) the
/// reference adapter.
#[derive(Clone, Copy)]
pub struct RerankInput<'a> {
    pub engine: &'a Engine,
    pub label_texts: &'a [String],
    pub examples: &'a [Example],
    pub reference: Option<&'a LightweightObject>,
    /// Importance weight of each example (mean 1), e.g. to make a class-balanced sample stand for the
    /// task's label distribution: the label-only indicators, their per-example terms and the accuracy
    /// are weighted (KL and the weight- and gradient-based indicators are not). `None`: all 1.
    pub weights: Option<&'a [f64]>,
}

fn flat(o: &LightweightObject) -> Vec<f32> {
    let mut v = Vec::new();
    for t in &o.tensors {
        t.extend_f32(&mut v);
    }
    v
}

fn same_layout(a: &LightweightObject, b: &LightweightObject) -> Result<(), String> {
    if a.tensors.len() != b.tensors.len() {
        return Err(format!(
            "{} tensors vs {}",
            a.tensors.len(),
            b.tensors.len()
        ));
    }
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        if x.name != y.name || x.shape != y.shape {
            return Err(format!(
                "{} {:?} vs {} {:?}",
                x.name, x.shape, y.name, y.shape
            ));
        }
    }
    Ok(())
}

/// Score every candidate with every requested indicator.
pub fn rerank(
    input: &RerankInput<'_>,
    candidates: &[&LightweightObject],
    opts: &RerankOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<CandidateScores>, RerankError> {
    if candidates.is_empty() {
        return Err(RerankError::NoCandidates);
    }
    if input.examples.is_empty() {
        return Err(RerankError::NoExamples);
    }
    check_weights(input)?;
    let engine = input.engine;
    let want = |i: Indicator| opts.indicators.contains(&i);
    let needs_ref = [Indicator::Kl, Indicator::WeightCosine]
        .into_iter()
        .find(|i| want(*i));
    if let (Some(i), None) = (needs_ref, input.reference) {
        return Err(RerankError::NeedsReference(i.as_str()));
    }
    let labels: Vec<TokenIds> = engine.tokenize_labels(input.label_texts)?;
    let texts: Vec<&str> = input.examples.iter().map(|e| e.text.as_str()).collect();
    let inputs: Vec<TokenIds> = engine.tokenize(&texts)?;
    let targets: Vec<usize> = input.examples.iter().map(|e| e.label).collect();
    let classes = input.label_texts.len();
    let flatten = |rows: Vec<Vec<f32>>| rows.into_iter().flatten().collect::<Vec<f32>>();
    let reference_probs = match (input.reference, want(Indicator::Kl)) {
        (Some(r), true) => {
            let set = engine.prepare(r)?;
            Some(flatten(
                engine
                    .score(Some(&set), &labels, &inputs, &opts.score)?
                    .probs,
            ))
        }
        _ => None,
    };
    let reference_flat = match (input.reference, want(Indicator::WeightCosine)) {
        (Some(r), true) => Some(flat(r)),
        _ => None,
    };
    // Label probabilities of every candidate, LoRA candidates of one layout several per forward pass.
    let t_all = Instant::now();
    let mut sets = Vec::with_capacity(candidates.len());
    for (index, cand) in candidates.iter().enumerate() {
        sets.push(
            engine
                .prepare(cand)
                .map_err(|source| RerankError::Candidate {
                    index,
                    source: Box::new(source),
                })?,
        );
    }
    progress(0, candidates.len());
    let set_refs: Vec<&crate::engine::AdapterSet> = sets.iter().collect();
    let all_scores = engine.score_many(&set_refs, &labels, &inputs, &opts.score, opts.stack)?;
    let shared = t_all.elapsed().as_secs_f64() / candidates.len() as f64;
    let mut out = Vec::with_capacity(candidates.len());
    for ((index, cand), sc) in candidates.iter().enumerate().zip(all_scores) {
        progress(index, candidates.len());
        let t0 = Instant::now();
        let ce = |source| RerankError::Candidate {
            index,
            source: Box::new(source),
        };
        let accuracy = weighted_accuracy(&sc.predictions(), &targets, input.weights);
        let cross_entropy = sc.cross_entropy(&targets);
        let probs = flatten(sc.probs);
        // The label-only indicators come from their per-example terms (computed once, calibration
        // included).
        let per_example = PerExample::of(&probs, classes, &targets, input.weights);
        let mut scores = BTreeMap::new();
        for ind in &opts.indicators {
            let s = match ind {
                Indicator::Loss | Indicator::LossCal | Indicator::El2n | Indicator::CosLogits => {
                    per_example.indicator(*ind).expect("label-only indicator")
                }
                Indicator::Kl => indicators::kl(
                    &probs,
                    reference_probs.as_deref().expect("checked"),
                    classes,
                ),
                Indicator::Grand => {
                    let g = engine
                        .ce_gradients(cand, &labels, &inputs, &targets, &opts.score)
                        .map_err(ce)?;
                    indicators::grand(g.norm().powi(2))
                }
                Indicator::WeightCosine => {
                    let r = input.reference.expect("checked");
                    same_layout(cand, r)
                        .map_err(|detail| RerankError::WeightMismatch { index, detail })?;
                    indicators::weight_cosine(
                        &flat(cand),
                        reference_flat.as_deref().expect("checked"),
                    )
                }
                Indicator::Euclidean | Indicator::Performance => {
                    // Train the candidate m steps on the examples; evaluate on the same examples.
                    let mut cfg = TrainConfig::new(cand.method.kind());
                    cfg.init = Some((*cand).clone());
                    cfg.max_steps = Some(opts.m_steps.max(1));
                    cfg.eval_every = opts.m_steps.max(1);
                    cfg.patience = None;
                    cfg.seed = opts.seed;
                    cfg.temperature = opts.score.temperature;
                    let data = TrainData {
                        label_texts: input.label_texts,
                        train: input.examples,
                        dev: input.examples,
                        test: None,
                    };
                    let outcome = train(engine, &data, &cfg, &mut |_| {}).map_err(ce)?;
                    // With one evaluation at step m, the "early" checkpoint is the state after m steps.
                    let after = &outcome.early;
                    if *ind == Indicator::Euclidean {
                        indicators::euclidean(&flat(cand), &flat(&after.object))
                    } else {
                        indicators::performance(accuracy, after.dev_accuracy)
                    }
                }
            };
            scores.insert(ind.as_str().to_string(), s);
        }
        out.push(CandidateScores {
            scores,
            accuracy,
            cross_entropy,
            seconds: shared + t0.elapsed().as_secs_f64(),
            per_example,
        });
    }
    progress(candidates.len(), candidates.len());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_gain_by_hand() {
        // d = (1, 2, 3): mean 2, sd 1, SE 1/sqrt(3).
        let (m, se) = paired_gain(&[2.0, 4.0, 6.0], &[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12);
        assert!((se - 1.0 / 3f64.sqrt()).abs() < 1e-12);
        // Identical series: no gain, no noise.
        assert_eq!(paired_gain(&[0.5, 0.1], &[0.5, 0.1]), (0.0, 0.0));
        // One example: a mean, no SE; none: zeros.
        assert_eq!(paired_gain(&[1.0], &[0.25]), (0.75, 0.0));
        assert_eq!(paired_gain(&[], &[]), (0.0, 0.0));
    }

    #[test]
    fn per_example_terms_pick_the_gold_label_and_clamp() {
        let probs = [0.25f32, 0.75, 1.0, 0.0];
        let pe = PerExample::of(&probs, 2, &[1, 1], None);
        let ll = pe.series(Indicator::Loss).unwrap();
        assert!((ll[0] - 0.75f64.ln()).abs() < 1e-7);
        assert!((ll[1] - indicators::EPS.ln()).abs() < 1e-9);
        assert_eq!(pe.series(Indicator::El2n).unwrap().len(), 2);
        assert!(pe.series(Indicator::Kl).is_none());
        // Calibration can only raise the log-likelihood of the examples it is fitted on.
        let cal = pe.series(Indicator::LossCal).unwrap();
        assert!(cal.iter().sum::<f64>() >= ll.iter().sum::<f64>() - 1e-9);
    }

    #[test]
    fn weights_scale_each_term_and_the_accuracy() {
        let probs = [0.25f32, 0.75, 0.9, 0.1, 0.4, 0.6];
        let y = [1usize, 1, 1];
        let w = [0.5, 2.0, 0.5];
        let plain = PerExample::of(&probs, 2, &y, None);
        let weighted = PerExample::of(&probs, 2, &y, Some(&w));
        for ind in [Indicator::Loss, Indicator::El2n, Indicator::CosLogits] {
            let (a, b) = (plain.series(ind).unwrap(), weighted.series(ind).unwrap());
            for j in 0..3 {
                assert!((a[j] * w[j] - b[j]).abs() < 1e-12, "{ind:?} {j}");
            }
        }
        // Predictions 1, 0, 1 against 1, 1, 1: plain 2/3, weighted (0.5 + 0.5) / 3.
        assert!((weighted_accuracy(&[1, 0, 1], &y, None) - 2.0 / 3.0).abs() < 1e-12);
        assert!((weighted_accuracy(&[1, 0, 1], &y, Some(&w)) - 1.0 / 3.0).abs() < 1e-12);
    }
}
