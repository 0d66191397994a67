//! The `delta` similarity: Frobenius inner products of LoRA updates from their factors, against delta-W
//! formed explicitly, and invariance to A -> R A, B -> B R^-1.

use peftdb::embed::delta::{delta_cosine, inner, DeltaSketch, LoraDelta, LowRank};
use peftdb::object::{AdapterFormat, LightweightObject, LoraBias, LoraConfig, Method, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

fn rand_mat(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect()
}

fn dense_inner(x: &LowRank, y: &LowRank) -> f64 {
    x.dense().iter().zip(y.dense()).map(|(a, b)| a * b).sum()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn inner_matches_explicit_delta_w_for_any_ranks() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (d, k) = (13, 11);
    for (r1, r2) in [(1, 1), (2, 5), (8, 3), (4, 4)] {
        let x = LowRank::new(
            rand_mat(&mut rng, r1, k),
            rand_mat(&mut rng, d, r1),
            r1,
            k,
            d,
            2.0,
        );
        let y = LowRank::new(
            rand_mat(&mut rng, r2, k),
            rand_mat(&mut rng, d, r2),
            r2,
            k,
            d,
            0.5,
        );
        let exact = dense_inner(&x, &y);
        let fast = inner(&x, &y);
        assert!(rel(fast, exact) < 1e-9, "r {r1},{r2}: {fast} vs {exact}");
        assert!(rel(inner(&x, &x), dense_inner(&x, &x)) < 1e-9);
    }
    // Shapes that differ do not compare.
    let a = LowRank::new(vec![1.0; 3], vec![1.0; 4], 1, 3, 4, 1.0);
    let b = LowRank::new(vec![1.0; 4], vec![1.0; 4], 1, 4, 4, 1.0);
    assert_eq!(inner(&a, &b), 0.0);
}

/// Inverse of a small well-conditioned matrix (Gauss-Jordan, f64).
fn inverse(m: &[f64], n: usize) -> Vec<f64> {
    let mut a = m.to_vec();
    let mut inv: Vec<f64> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))
            .unwrap();
        for j in 0..n {
            a.swap(c * n + j, p * n + j);
            inv.swap(c * n + j, p * n + j);
        }
        let piv = a[c * n + c];
        for j in 0..n {
            a[c * n + j] /= piv;
            inv[c * n + j] /= piv;
        }
        for i in 0..n {
            if i != c {
                let f = a[i * n + c];
                for j in 0..n {
                    a[i * n + j] -= f * a[c * n + j];
                    inv[i * n + j] -= f * inv[c * n + j];
                }
            }
        }
    }
    inv
}

fn matmul(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * p];
    for i in 0..n {
        for t in 0..m {
            for j in 0..p {
                out[i * p + j] += a[i * m + t] * b[t * p + j];
            }
        }
    }
    out
}

fn lora_object(
    layers: &[(Vec<f32>, Vec<f32>)],
    r: usize,
    d: usize,
    alpha: f64,
) -> LightweightObject {
    let mut tensors = Vec::new();
    for (i, (a, b)) in layers.iter().enumerate() {
        let n =
            |s: &str| format!("base_model.model.encoder.layer.{i}.attention.self.query.{s}.weight");
        tensors.push(Tensor::from_f32(n("lora_A"), vec![r, d], a));
        tensors.push(Tensor::from_f32(n("lora_B"), vec![d, r], b));
    }
    LightweightObject {
        method: Method::Lora(LoraConfig {
            r,
            alpha,
            use_rslora: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target_modules: vec!["query".into()],
            bias: LoraBias::None,
        }),
        base_model: "m".into(),
        format: AdapterFormat::Peft,
        tensors,
        metadata: None,
        config_json: b"{}".to_vec(),
    }
}

#[test]
fn invariant_to_refactorisation_and_scaled_by_config() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (r, d) = (4, 16);
    let layers: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|_| (rand_mat(&mut rng, r, d), rand_mat(&mut rng, d, r)))
        .collect();
    let other: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|_| (rand_mat(&mut rng, r, d), rand_mat(&mut rng, d, r)))
        .collect();
    // A -> R A, B -> B R^-1 with a well-conditioned R.
    let rm: Vec<f64> = (0..r * r)
        .map(|i| if i / r == i % r { 2.0 } else { 0.0 } + rng.random_range(-0.5..0.5))
        .collect();
    let rinv = inverse(&rm, r);
    let id = matmul(&rm, &rinv, r, r, r);
    for i in 0..r {
        assert!((id[i * r + i] - 1.0).abs() < 1e-9);
    }
    let refactored: Vec<(Vec<f32>, Vec<f32>)> = layers
        .iter()
        .map(|(a, b)| {
            let a64: Vec<f64> = a.iter().map(|v| *v as f64).collect();
            let b64: Vec<f64> = b.iter().map(|v| *v as f64).collect();
            let ra = matmul(&rm, &a64, r, r, d);
            let bri = matmul(&b64, &rinv, d, r, r);
            (
                ra.iter().map(|v| *v as f32).collect(),
                bri.iter().map(|v| *v as f32).collect(),
            )
        })
        .collect();
    let x = LoraDelta::from_object(&lora_object(&layers, r, d, 8.0)).unwrap();
    let x2 = LoraDelta::from_object(&lora_object(&refactored, r, d, 8.0)).unwrap();
    let y = LoraDelta::from_object(&lora_object(&other, r, d, 8.0)).unwrap();
    // The factors differ, the updates do not.
    assert!(peftdb::embed::cosine(&layers[0].0, &refactored[0].0) < 0.99);
    assert!(rel(x2.norm_sq(), x.norm_sq()) < 1e-5);
    assert!(rel(x2.inner(&y), x.inner(&y)) < 1e-4);
    assert!((delta_cosine(&x, &x2) - 1.0).abs() < 1e-5);
    // The sketch inherits the invariance.
    let s = DeltaSketch::default();
    let (p1, v1) = s.sketch(&x);
    let (p2, v2) = s.sketch(&x2);
    assert_eq!(p1, p2);
    assert!(peftdb::embed::cosine(&v1, &v2) > 0.9999);
    // Scaling alpha/r enters squared in the norm: alpha 8 -> 16 multiplies it by 4.
    let x16 = LoraDelta::from_object(&lora_object(&layers, r, d, 16.0)).unwrap();
    assert!(rel(x16.norm_sq(), 4.0 * x.norm_sq()) < 1e-9);
    // The per-module inner products add up to the explicit delta-W over all layers.
    let explicit: f64 = x
        .modules
        .values()
        .zip(y.modules.values())
        .map(|(a, b)| dense_inner(a, b))
        .sum();
    assert!(rel(x.inner(&y), explicit) < 1e-9);
}

#[test]
fn sketch_inner_product_is_unbiased() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (d, k, r) = (24, 20, 3);
    let x = LowRank::new(
        rand_mat(&mut rng, r, k),
        rand_mat(&mut rng, d, r),
        r,
        k,
        d,
        1.0,
    );
    let mut yb = x.b.clone();
    yb.iter_mut()
        .for_each(|v| *v += 0.5 * rng.random_range(-1.0f32..1.0));
    let y = LowRank::new(x.a.clone(), yb, r, k, d, 1.0);
    let exact = inner(&x, &y);
    let seeds = 200;
    let mut mean = 0.0;
    for seed in 0..seeds {
        let s = DeltaSketch { seed, p: 8, q: 8 };
        let (a, b) = (s.module("m", &x), s.module("m", &y));
        mean += a
            .iter()
            .zip(&b)
            .map(|(u, v)| *u as f64 * *v as f64)
            .sum::<f64>()
            / seeds as f64;
    }
    assert!(
        rel(mean, exact) < 0.1,
        "sketch mean {mean} vs exact {exact}"
    );
}

#[test]
fn non_lora_has_no_delta() {
    let mut o = lora_object(&[(vec![1.0; 4], vec![1.0; 4])], 1, 4, 1.0);
    o.method = Method::Bitfit(Default::default());
    assert!(LoraDelta::from_object(&o).is_err());
}
