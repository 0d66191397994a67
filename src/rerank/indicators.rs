//! The PEWE indicators as pure functions of a candidate's label probabilities on the new task's examples
//! (`probs`: n rows of C probabilities, row-major), the gold labels, and, for KL, the probabilities of a
//! fresh adapter briefly trained on the new task. Higher is better for every indicator.
//!
//! | indicator | S_i |
//! |---|---|
//! | Loss | -(mean cross-entropy) = mean_j log P_ij[y_j] |
//! | KL | -sum_j KL(P_ij \|\| P~_j) |
//! | EL2N | -sum_j \|\|P_ij - onehot(y_j)\|\|_2 |
//! | cosine of logits and labels | sum_j cos(P_ij, onehot(y_j)) = sum_j P_ij[y_j] / \|\|P_ij\|\|_2 |
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

/// -(mean cross-entropy).
pub fn loss(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    let n = labels.len().max(1) as f64;
    rows(probs, classes)
        .zip(labels)
        .map(|(p, &y)| (p[y] as f64).max(EPS).ln())
        .sum::<f64>()
        / n
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

/// -sum_j ||P_j - onehot(y_j)||_2.
pub fn el2n(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
    -rows(probs, classes)
        .zip(labels)
        .map(|(p, &y)| {
            p.iter()
                .enumerate()
                .map(|(c, &v)| {
                    let d = v as f64 - if c == y { 1.0 } else { 0.0 };
                    d * d
                })
                .sum::<f64>()
                .sqrt()
        })
        .sum::<f64>()
}

/// sum_j cos(P_j, onehot(y_j)).
pub fn cosine_logits_labels(probs: &[f32], classes: usize, labels: &[usize]) -> f64 {
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
        .sum()
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
    fn weight_indicators_by_hand() {
        assert_eq!(grand(9.0), -3.0);
        assert_eq!(euclidean(&[0.0, 0.0], &[3.0, 4.0]), -5.0);
        assert_eq!(performance(0.5, 0.75), 0.25);
        assert!((weight_cosine(&[1.0, 0.0], &[1.0, 1.0]) - 0.5f64.sqrt()).abs() < 1e-6);
    }
}
