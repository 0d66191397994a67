//! Seeded random projection for high-dimensional spaces.
//!
//! A sparse sign projection (Achlioptas / "very sparse" Johnson-Lindenstrauss, `s` non-zeros per input
//! coordinate): input coordinate `j` adds `x_j * sign(j, t)` to output `bucket(j, t)` for `t in 0..s`, and the
//! result is scaled by `1/sqrt(s)`. Signs and buckets come from a keyed hash (SplitMix64) of
//! `(seed, j, t)`, so the projection is a pure function of `(seed, in_dim, out_dim)`: nothing is stored but
//! those three numbers, it costs `O(s * d)` per vector and no `d x p` matrix is held in memory (a dense
//! Gaussian matrix for d = 100k, p = 512 would be 200 MB).
//!
//! Inner products are preserved in expectation (`E[<Px, Py>] = <x, y>`), with variance that falls as
//! `1/p`; the index therefore only *proposes* candidates, and the final ranking is the exact cosine of
//! the stored full embeddings (see [`crate::index`]).

use serde::{Deserialize, Serialize};

/// Non-zeros per input coordinate.
pub const NONZEROS: usize = 4;

/// A seeded sparse sign projection from `in_dim` to `out_dim` dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projection {
    pub seed: u64,
    pub in_dim: usize,
    pub out_dim: usize,
}

#[inline]
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Projection {
    pub fn new(seed: u64, in_dim: usize, out_dim: usize) -> Projection {
        Projection {
            seed,
            in_dim,
            out_dim: out_dim.max(1),
        }
    }

    /// Project `x` (length `in_dim`; shorter inputs are treated as zero-padded, longer ones truncated).
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.out_dim];
        self.apply_into(x, &mut out);
        out
    }

    /// Project into `out` (length `out_dim`), overwriting it.
    pub fn apply_into(&self, x: &[f32], out: &mut [f32]) {
        out.iter_mut().for_each(|v| *v = 0.0);
        let p = self.out_dim as u64;
        let key = splitmix(self.seed ^ 0x7065_6674_6462_7270); // "peftdbrp"
        for (j, &v) in x.iter().take(self.in_dim).enumerate() {
            if v == 0.0 {
                continue;
            }
            let mut h = splitmix(key ^ (j as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            for _ in 0..NONZEROS {
                let bucket = ((h >> 1) % p) as usize;
                if h & 1 == 1 {
                    out[bucket] += v;
                } else {
                    out[bucket] -= v;
                }
                h = splitmix(h);
            }
        }
        let scale = 1.0 / (NONZEROS as f32).sqrt();
        out.iter_mut().for_each(|v| *v *= scale);
    }
}

/// A projection with its per-coordinate buckets and signs precomputed (`in_dim * NONZEROS` u32, 1.6 MB
/// for d = 100k): the same result as [`Projection::apply`], several times faster.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionPlan {
    pub projection: Projection,
    /// `bucket << 1 | positive`.
    entries: Vec<u32>,
}

impl ProjectionPlan {
    pub fn new(projection: Projection) -> ProjectionPlan {
        let p = projection.out_dim as u64;
        let key = splitmix(projection.seed ^ 0x7065_6674_6462_7270);
        let mut entries = Vec::with_capacity(projection.in_dim * NONZEROS);
        for j in 0..projection.in_dim {
            let mut h = splitmix(key ^ (j as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            for _ in 0..NONZEROS {
                entries.push((((h >> 1) % p) as u32) << 1 | (h & 1) as u32);
                h = splitmix(h);
            }
        }
        ProjectionPlan {
            projection,
            entries,
        }
    }

    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.projection.out_dim];
        for (&v, e) in x.iter().zip(self.entries.chunks_exact(NONZEROS)) {
            for &b in e {
                let slot = &mut out[(b >> 1) as usize];
                if b & 1 == 1 {
                    *slot += v;
                } else {
                    *slot -= v;
                }
            }
        }
        let scale = 1.0 / (NONZEROS as f32).sqrt();
        out.iter_mut().for_each(|v| *v *= scale);
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn plan_matches_direct() {
        let x: Vec<f32> = (0..777).map(|i| (i as f32 * 0.37).cos()).collect();
        let p = Projection::new(5, 777, 100);
        let a = p.apply(&x);
        let b = ProjectionPlan::new(p).apply(&x);
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-4);
        }
    }

    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn deterministic_and_seed_dependent() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32).sin()).collect();
        let a = Projection::new(1, 1000, 64).apply(&x);
        assert_eq!(a, Projection::new(1, 1000, 64).apply(&x));
        assert_ne!(a, Projection::new(2, 1000, 64).apply(&x));
    }

    #[test]
    fn preserves_cosine_roughly() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let d = 20_000;
        let x: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let y: Vec<f32> = x
            .iter()
            .map(|v| v + 0.8 * rng.random_range(-1.0f32..1.0))
            .collect();
        let p = Projection::new(3, d, 512);
        let exact = crate::embed::cosine(&x, &y);
        let approx = crate::embed::cosine(&p.apply(&x), &p.apply(&y));
        assert!(
            (exact - approx).abs() < 0.1,
            "exact {exact} projected {approx}"
        );
    }
}
