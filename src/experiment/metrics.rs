//! The transferability metrics of Vu et al. (2020), as used by the TuPaTE paper, and small statistics.
//!
//! For one target task, `scores[s]` is a predictor's score of source `s` (higher = predicted to transfer
//! better) and `gains[s]` the measured transfer gain of `s`:
//! - **rho**: the rank (1-based) in the predicted order of the source with the largest true gain; lower is
//!   better, 1 is perfect. Ties in the prediction are broken pessimistically (a tied source counts as
//!   ranked ahead), so a constant predictor cannot look good.
//! - **NDCG** (in %): DCG = sum_i rel(pi_i) / log2(i + 1) over the predicted order pi, divided by the
//!   DCG of the ideal order. Relevance is the gain shifted so that the worst source has 0:
//!   rel(s) = gain(s) - min_s gain(s), because gains can be negative and NDCG needs non-negative
//!   relevance. When all gains are equal NDCG is undefined (`None`).

/// Predicted order: indices sorted by descending score; ties keep index order.
pub fn predicted_order(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx
}

/// Rank of the truly best source (ties in the true gains: the best-ranked of the tied best sources).
pub fn rho(scores: &[f64], gains: &[f64]) -> Option<f64> {
    if scores.len() != gains.len() || gains.is_empty() {
        return None;
    }
    let best_gain = gains.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let rank_of = |s: usize| scores.iter().filter(|&&x| x >= scores[s]).count();
    (0..gains.len())
        .filter(|&s| gains[s] == best_gain)
        .map(rank_of)
        .min()
        .map(|r| r as f64)
}

/// NDCG of the predicted order in % (see the module docs).
pub fn ndcg(scores: &[f64], gains: &[f64]) -> Option<f64> {
    if scores.len() != gains.len() || gains.is_empty() {
        return None;
    }
    let min = gains.iter().cloned().fold(f64::INFINITY, f64::min);
    let rel: Vec<f64> = gains.iter().map(|g| g - min).collect();
    let dcg = |order: &[usize]| -> f64 {
        order
            .iter()
            .enumerate()
            .map(|(i, &s)| rel[s] / ((i + 2) as f64).log2())
            .sum()
    };
    let mut ideal: Vec<usize> = (0..rel.len()).collect();
    ideal.sort_by(|&a, &b| rel[b].total_cmp(&rel[a]));
    let idcg = dcg(&ideal);
    if idcg <= 0.0 {
        return None;
    }
    // Pessimistic ties: among equal scores, the less relevant source first.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .total_cmp(&scores[a])
            .then(rel[a].total_cmp(&rel[b]))
    });
    Some(100.0 * dcg(&order) / idcg)
}

/// Mean and sample standard deviation (0 for one value); `None` when empty.
pub fn mean_sd(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Some((m, sd))
}

/// The median (mean of the two middle values for an even count); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let k = v.len();
    match k {
        0 => None,
        _ if k % 2 == 1 => Some(v[k / 2]),
        _ => Some((v[k / 2 - 1] + v[k / 2]) / 2.0),
    }
}

/// Ranks 1..n of `xs` in ascending order, ties sharing their average rank.
pub fn average_ranks(xs: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut ranks = vec![0.0; xs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && xs[idx[j + 1]] == xs[idx[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) share the mean of ranks i+1..=j+1.
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation (Pearson correlation of average ranks); `None` when the lengths differ,
/// there are fewer than 2 values, or either side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (ra, rb) = (average_ranks(a), average_ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    if va <= 0.0 || vb <= 0.0 {
        return None;
    }
    Some(cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_by_hand() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        // Odd count: the middle value whatever the input order.
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        // Even count: the mean of the two middle values (2 and 4), not the upper one.
        assert_eq!(median(&[4.0, 1.0, 10.0, 2.0]), Some(3.0));
    }

    #[test]
    fn rho_by_hand() {
        // Gains: source 2 is truly best. Scores put it second.
        let gains = [0.01, -0.02, 0.05, 0.00];
        let scores = [0.9, 0.1, 0.8, 0.3];
        assert_eq!(rho(&scores, &gains), Some(2.0));
        // Perfect prediction.
        assert_eq!(rho(&[0.0, 0.0, 1.0, 0.5], &gains), Some(1.0));
        // A constant predictor: every source tied, pessimistically last.
        assert_eq!(rho(&[0.3; 4], &gains), Some(4.0));
        // Two truly best sources: the better ranked one counts.
        assert_eq!(rho(&[0.1, 0.9, 0.5], &[0.2, 0.2, 0.0]), Some(1.0));
    }

    #[test]
    fn ndcg_by_hand() {
        // rel = gains - min = [3, 0, 5, 2] (min is -2... below: gains [1, -2, 3, 0]).
        let gains = [1.0, -2.0, 3.0, 0.0];
        // rel = [3, 0, 5, 2]; ideal order 2,0,3,1: 5/1 + 3/log2(3) + 2/2 + 0 = 6 + 1.892789 = 7.892789
        // predicted order by scores [0.9, 0.1, 0.8, 0.3] = 0,2,3,1: 3 + 5/log2(3) + 2/2 + 0 = 4 + 3.154649
        let scores = [0.9, 0.1, 0.8, 0.3];
        let want = 100.0 * (4.0 + 5.0 / 3f64.log2()) / (6.0 + 3.0 / 3f64.log2());
        let got = ndcg(&scores, &gains).expect("defined");
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!((want - 90.64).abs() < 0.01, "hand value 90.64, got {want}");
        // Perfect order gives 100.
        let perfect = ndcg(&[2.0, 0.0, 3.0, 1.0], &gains).expect("defined");
        assert!((perfect - 100.0).abs() < 1e-12);
        // All gains equal: undefined.
        assert_eq!(ndcg(&scores, &[0.1; 4]), None);
        // A constant predictor takes the worst order among ties: 0,2,3,1 reversed by relevance = 1,3,0,2:
        // 0 + 2/log2(3) + 3/2 + 5/log2(5).
        let worst =
            100.0 * (2.0 / 3f64.log2() + 1.5 + 5.0 / 5f64.log2()) / (6.0 + 3.0 / 3f64.log2());
        let got = ndcg(&[0.0; 4], &gains).expect("defined");
        assert!((got - worst).abs() < 1e-9, "{got} vs {worst}");
    }

    #[test]
    fn mean_sd_by_hand() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0, 4.0]).expect("non-empty");
        assert_eq!(m, 2.5);
        assert!((sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_sd(&[7.0]), Some((7.0, 0.0)));
        assert_eq!(mean_sd(&[]), None);
    }
    #[test]
    fn spearman_by_hand() {
        assert_eq!(
            average_ranks(&[0.3, 0.1, 0.3, 0.2]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
        // Same order: 1; reversed: -1.
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        // No ties: 1 - 6 sum d^2 / (n (n^2 - 1)). Ranks a = 1,2,3,4; b = 2,1,4,3: d^2 = 4 -> 1 - 24/60 = 0.6.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[0.2, 0.1, 0.4, 0.3]).expect("defined");
        assert!((r - 0.6).abs() < 1e-12, "{r}");
        // Ties: ranks a = 1, 2.5, 2.5, 4 (mean 2.5), b = 1..4: cov = 1.5*1.5 + 0 + 0 + 1.5*1.5 = 4.5;
        // var a = 2.25 + 0 + 0 + 2.25 = 4.5, var b = 5 -> 4.5 / sqrt(22.5).
        let r = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]).expect("defined");
        assert!((r - 4.5 / 22.5f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0]), None);
    }
}
