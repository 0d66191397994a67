//! The PEWE indicators as pure functions of a candidate's label probabilities on the new task's examples
//! (`probs`: n rows of C probabilities, row-major), the gold labels, and, for KL, the probabilities of a
//! fresh adapter briefly trained on the new task. Higher is better for every indicator.
//!
//! | indicator | S_i |
//! |---|---|
//! | Loss | -(mean cross-entropy) = mean_j log P_ij\[y_j\] |
//! | calibrated Loss | mean_j log softmax(a_i log P_ij)\[y_j\], a_i fitted per candidate ([`calibration`]) |
//! | KL | -sum_j KL(P_ij \|\| P~_j) |
//! | EL2N | -sum_j \|\|P_ij - onehot(y_j)\|\|_2 |
//! | cosine of logits and labels | sum_j cos(P_ij, onehot(y_j)) = sum_j P_ij\[y_j\] / \|\|P_ij\|\|_2 |
//! | GraNd | -sqrt(sum over the candidate's parameters of (dL/dp)^2) |
//! | weight cosine | cos(flattened O~, flattened O_i) |
//! | Euclidean | -\|\|O_i after m steps - O_i\|\|_2 |
//! | performance | score after m steps - score before |
//!
//! Loss is a mean (as cross-entropy is usually reported), the others are sums over the examples, as in the
//! method's statement; the softmax temperature tau absorbs the difference of scale.

/// Probabilities are clamped to at least this before taking logarithms.
pub const EPS: f64 = 1e-12;

fn rows<'a>(probs: &'a [f32], classes: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
    probs.chunks_exact(classes.max(1))
}

/// Per-example terms of Loss: log P_j\[y_j\] (clamped at [`EPS`]).
pub fn loss_terms(probs: &[f32], classes: usize, labels: &[usize]) -> Vec<f64> {
    rows(probs, classes)
        .zip(labels)
        .map(|(p, &y)| (p[y] as f64).max(EPS).ln())
        .collect()
}

/// -(mean cross-entropy).
pub fn loss(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    loss_terms(probs, classes, labels).iter().sum::<f64>() / labels.len().max(1) as f64
}

/// Range of the calibration scale `a` searched by [`calibration`] (log-probabilities are multiplied by
/// it before the softmax, i.e. the logits' temperature is divided by it).
pub const CALIBRATION_RANGE: (f64, f64) = (1.0 / 32.0, 32.0);

/// Mean log-likelihood of the gold labels after rescaling each row's log-probabilities by `a`:
/// mean_j log softmax(a * log P_j)\[y_j\].
fn scaled_loglik(probs: &[f32], classes: usize, labels: &[usize], a: f64) -> Vec<f64> {
    rows(probs, classes)
        .zip(labels)
        .map(|(p, &y)| {
            let z: Vec<f64> = p.iter().map(|v| a * (*v as f64).max(EPS).ln()).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            z[y] - lse
        })
        .collect()
}

/// The one temperature that fits the candidate to these examples: the scale `a` (within
/// [`CALIBRATION_RANGE`]) that maximises the mean log-likelihood of the gold labels when every row's
/// log-probabilities are multiplied by it. The log-likelihood is concave in `a` (a log-sum-exp of
/// linear functions subtracted from a linear one), so a golden-section search on log `a` finds it.
pub fn calibration(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    calibration_weighted(probs, classes, labels, None)
}

/// [`calibration`] with each example's log-likelihood weighted (`weights[j]`, e.g. the importance weight
/// that makes a class-balanced sample stand for the task's label distribution); `None`: all 1.
pub fn calibration_weighted(
    probs: &[f32],
    classes: usize,
    labels: &[usize],
    weights: Option<&[f64]>,
) -> f64 {
    let f = |la: f64| -> f64 {
        let t = scaled_loglik(probs, classes, labels, la.exp());
        match weights {
            Some(w) => t.iter().zip(w).map(|(x, w)| x * w).sum::<f64>(),
            None => t.iter().sum::<f64>(),
        }
    };
    let (mut lo, mut hi) = (CALIBRATION_RANGE.0.ln(), CALIBRATION_RANGE.1.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut x1 = hi - g * (hi - lo);
    let mut x2 = lo + g * (hi - lo);
    let (mut f1, mut f2) = (f(x1), f(x2));
    for _ in 0..40 {
        if f1 < f2 {
            lo = x1;
            x1 = x2;
            f1 = f2;
            x2 = lo + g * (hi - lo);
            f2 = f(x2);
        } else {
            hi = x2;
            x2 = x1;
            f2 = f1;
            x1 = hi - g * (hi - lo);
            f1 = f(x1);
        }
    }
    ((lo + hi) / 2.0).exp()
}

/// Per-example terms of calibrated Loss: log-likelihoods after the candidate's own fitted temperature
/// ([`calibration`]). Unlike Loss it does not punish a candidate for being over- or under-confident on
/// the new task's labels, only for ranking them wrong: a source trained on other labels is sharp, and a
/// sharp classifier that is right more often can still have the worse raw log-likelihood.
pub fn loss_calibrated_terms(probs: &[f32], classes: usize, labels: &[usize]) -> Vec<f64> {
    loss_calibrated_terms_weighted(probs, classes, labels, None)
}

/// [`loss_calibrated_terms`] with the temperature fitted on weighted examples
/// ([`calibration_weighted`]); the terms themselves are not multiplied by the weights.
pub fn loss_calibrated_terms_weighted(
    probs: &[f32],
    classes: usize,
    labels: &[usize],
    weights: Option<&[f64]>,
) -> Vec<f64> {
    let a = calibration_weighted(probs, classes, labels, weights);
    scaled_loglik(probs, classes, labels, a)
}

/// Calibrated Loss: mean of [`loss_calibrated_terms`].
pub fn loss_calibrated(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    loss_calibrated_terms(probs, classes, labels)
        .iter()
        .sum::<f64>()
        / labels.len().max(1) as f64
}

/// -sum_j KL(P_j || Q_j).
pub fn kl(probs: &[f32], reference: &[f32], classes: usize) -> f64 {
    -rows(probs, classes)
        .zip(rows(reference, classes))
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .filter(|(a, _)| **a > 0.0)
                .map(|(&a, &b)| a as f64 * ((a as f64).max(EPS).ln() - (b as f64).max(EPS).ln()))
                .sum::<f64>()
        })
        .sum::<f64>()
}

/// Per-example terms of EL2N: -||P_j - onehot(y_j)||_2.
pub fn el2n_terms(probs: &[f32], classes: usize, labels: &[usize]) -> Vec<f64> {
    rows(probs, classes)
        .zip(labels)
        .map(|(p, &y)| {
            -p.iter()
                .enumerate()
                .map(|(c, &v)| {
                    let d = v as f64 - if c == y { 1.0 } else { 0.0 };
                    d * d
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// -sum_j ||P_j - onehot(y_j)||_2.
pub fn el2n(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    el2n_terms(probs, classes, labels).iter().sum()
}

/// Per-example terms of the cosine of logits and labels: cos(P_j, onehot(y_j)).
pub fn cosine_terms(probs: &[f32], classes: usize, labels: &[usize]) -> Vec<f64> {
    rows(probs, classes)
        .zip(labels)
        .map(|(p, &y)| {
            let norm = p.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            if norm == 0.0 {
                0.0
            } else {
                p[y] as f64 / norm
            }
        })
        .collect()
}

/// sum_j cos(P_j, onehot(y_j)).
pub fn cosine_logits_labels(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    cosine_terms(probs, classes, labels).iter().sum()
}

/// -sqrt(sum of squared gradients).
pub fn grand(sum_sq_grad: f64) -> f64 {
    -sum_sq_grad.max(0.0).sqrt()
}

/// Cosine of two flattened parameter vectors.
pub fn weight_cosine(a: &[f32], b: &[f32]) -> f64 {
    crate::embed::cosine(a, b) as f64
}

/// -||after - before||_2.
pub fn euclidean(before: &[f32], after: &[f32]) -> f64 {
    -before
        .iter()
        .zip(after)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Score gain after m steps.
pub fn performance(before: f64, after: f64) -> f64 {
    after - before
}

/// Row-wise softmax of logits (n x classes).
pub fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for r in logits.chunks_exact(classes.max(1)) {
        let m = r.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = r.iter().map(|v| ((v - m) as f64).exp()).collect();
        let z: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / z) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two examples, three classes; logits chosen by hand.
    const LOGITS: [f32; 6] = [2.0, 0.0, -1.0, 0.5, 0.5, 0.0];
    const Y: [usize; 2] = [0, 2];

    fn p() -> Vec<f32> {
        softmax_rows(&LOGITS, 3)
    }

    #[test]
    fn softmax_rows_by_hand() {
        let p = p();
        let z = 2f64.exp() + 1.0 + (-1f64).exp();
        assert!((p[0] as f64 - 2f64.exp() / z).abs() < 1e-7);
        assert!((p[3] as f64 - 0.5f64.exp() / (2.0 * 0.5f64.exp() + 1.0)).abs() < 1e-7);
    }

    #[test]
    fn loss_by_hand() {
        let p = p();
        let want = ((p[0] as f64).ln() + (p[5] as f64).ln()) / 2.0;
        assert!((loss(&p, 3, &Y) - want).abs() < 1e-12);
        assert!(loss(&p, 3, &Y) < 0.0);
    }

    #[test]
    fn kl_by_hand() {
        let p = p();
        let q = softmax_rows(&[0.0, 0.0, 0.0, 1.0, 0.0, 0.0], 3);
        let mut want = 0.0;
        for j in 0..2 {
            for c in 0..3 {
                let (a, b) = (p[j * 3 + c] as f64, q[j * 3 + c] as f64);
                want += a * (a / b).ln();
            }
        }
        assert!((kl(&p, &q, 3) + want).abs() < 1e-9);
        assert!(kl(&p, &p, 3).abs() < 1e-12);
    }

    #[test]
    fn el2n_and_cosine_by_hand() {
        let p = p();
        let e0 =
            ((p[0] as f64 - 1.0).powi(2) + (p[1] as f64).powi(2) + (p[2] as f64).powi(2)).sqrt();
        let e1 =
            ((p[3] as f64).powi(2) + (p[4] as f64).powi(2) + (p[5] as f64 - 1.0).powi(2)).sqrt();
        assert!((el2n(&p, 3, &Y) + e0 + e1).abs() < 1e-9);
        let n0 = p[..3]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let n1 = p[3..]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let want = p[0] as f64 / n0 + p[5] as f64 / n1;
        assert!((cosine_logits_labels(&p, 3, &Y) - want).abs() < 1e-9);
        // A perfect predictor maximises both.
        let perfect = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(el2n(&perfect, 3, &Y), 0.0);
        assert_eq!(cosine_logits_labels(&perfect, 3, &Y), 2.0);
    }

    #[test]
    fn calibration_finds_the_temperature_that_fits() {
        // Logits 3x too sharp: rows softmax(3 z) for z drawn so that the right scale is 1/3.
        let z = [1.0f32, 0.0, 0.2, 0.9, 0.3, -0.4, -0.1, 0.6];
        let y = [0usize, 1, 0, 0];
        let sharp: Vec<f32> = z.iter().map(|v| v * 3.0).collect();
        let p_sharp = softmax_rows(&sharp, 2);
        let p = softmax_rows(&z, 2);
        let a_sharp = calibration(&p_sharp, 2, &y);
        let a = calibration(&p, 2, &y);
        // Rescaling the logits by 3 divides the fitted scale by 3; the calibrated loss is the same.
        assert!((a_sharp * 3.0 - a).abs() < 1e-4 * a, "{a_sharp} {a}");
        assert!((loss_calibrated(&p_sharp, 2, &y) - loss_calibrated(&p, 2, &y)).abs() < 1e-6);
        // The fitted scale is the maximiser: never worse than the raw loss (a = 1 is in the range).
        assert!(loss_calibrated(&p_sharp, 2, &y) >= loss(&p_sharp, 2, &y) - 1e-9);
        // Terms sum to the indicators.
        let t = el2n_terms(&p, 2, &y);
        assert!((t.iter().sum::<f64>() - el2n(&p, 2, &y)).abs() < 1e-12);
        let t = cosine_terms(&p, 2, &y);
        assert!((t.iter().sum::<f64>() - cosine_logits_labels(&p, 2, &y)).abs() < 1e-12);
    }

    #[test]
    fn weighted_calibration_equals_repeating_examples() {
        // Weight 3 on an example fits the same temperature as that example written three times.
        let z = [1.0f32, 0.0, 0.2, 0.9, 0.3, -0.4, -0.1, 0.6];
        let p = softmax_rows(&z, 2);
        let y = [0usize, 1, 0, 0];
        let w = [3.0, 1.0, 1.0, 1.0];
        let mut rep = p.clone();
        rep.extend_from_slice(&p[..2]);
        rep.extend_from_slice(&p[..2]);
        let y_rep = [0usize, 1, 0, 0, 0, 0];
        let a_w = calibration_weighted(&p, 2, &y, Some(&w));
        let a_rep = calibration(&rep, 2, &y_rep);
        assert!((a_w - a_rep).abs() < 1e-6 * a_rep, "{a_w} {a_rep}");
        // All-ones weights are no weights.
        let ones = [1.0; 4];
        assert!(
            (calibration_weighted(&p, 2, &y, Some(&ones)) - calibration(&p, 2, &y)).abs() < 1e-12
        );
        assert_eq!(
            loss_calibrated_terms_weighted(&p, 2, &y, None),
            loss_calibrated_terms(&p, 2, &y)
        );
    }

    #[test]
    fn weight_indicators_by_hand() {
        assert_eq!(grand(9.0), -3.0);
        assert_eq!(euclidean(&[0.0, 0.0], &[3.0, 4.0]), -5.0);
        assert_eq!(performance(0.5, 0.75), 0.25);
        assert!((weight_cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-6);
    }
}
