//! LoRA weight updates compared through their factors: `delta-W = s * B A` (`A`: r x k, `B`: d x r, `s`
//! the module's scaling, alpha/r or alpha/sqrt(r) with rsLoRA).
//!
//! The Frobenius inner product of two low-rank updates needs no `d x k` matrix:
//!
//! `<s1 B1 A1, s2 B2 A2>_F = s1 s2 tr((B1^T B2) (A2 A1^T))`,
//!
//! with `B1^T B2` (r1 x r2) costing `r1 r2 d` and `A2 A1^T` (r2 x r1) costing `r1 r2 k`: O(r1 r2 (d + k))
//! per module, for any two ranks (so LoRAs with a `rank_pattern` compare too). The value depends on the
//! update only, not on its factorisation: `A -> R A`, `B -> B R^-1` leaves it unchanged.
//!
//! **Similarity rule** ([`delta_cosine`]): an adapter's update is the concatenation of its per-module
//! updates over all layers (modules keyed by their full path, e.g. `encoder.layer.3.attention.self.query`).
//! The cosine of two adapters is `sum_m <dW1_m, dW2_m> / (||dW1|| ||dW2||)`, the sum over modules present
//! in both and the norms over all modules of each: a module adapted by only one adapter lowers the
//! similarity.
//!
//! **Sketch** ([`DeltaSketch`]): `Y_m = Phi_m dW_m Psi_m^T` (p x q) with seeded CountSketch matrices (each
//! column one +-1 at a hashed row), so `Phi^T Phi` has ones on its diagonal and zero-mean entries off it,
//! and `E[<Y1, Y2>] = <dW1, dW2>`. It is computed from the factors as `(Phi B)(A Psi^T)`, in
//! O(r (d + k) + p q r), and is exactly as factorisation-invariant as the update. The concatenated sketch is a fixed-length vector for a given set of modules and can be
//! indexed like any embedding: the store keeps it as the `delta-sketch` embedding of every LoRA object
//! ([`crate::embed::delta_sketch`]), and `delta` queries over a large zoo shortlist through its index
//! before the exact comparison ([`crate::query`]).

use crate::object::layout::{parse_tensor_name, Role};
use crate::object::{LightweightObject, Method};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// One module's low-rank update `scale * B A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    /// r x k, row-major.
    pub a: Vec<f32>,
    /// d x r, row-major.
    pub b: Vec<f32>,
    pub r: usize,
    pub k: usize,
    pub d: usize,
    pub scale: f64,
}

impl LowRank {
    pub fn new(a: Vec<f32>, b: Vec<f32>, r: usize, k: usize, d: usize, scale: f64) -> LowRank {
        LowRank {
            a,
            b,
            r,
            k,
            d,
            scale,
        }
    }

    /// `scale * B A` formed explicitly (d x k): for tests and small checks only.
    pub fn dense(&self) -> Vec<f64> {
        let mut w = vec![0f64; self.d * self.k];
        for i in 0..self.d {
            for t in 0..self.r {
                let b = self.b[i * self.r + t] as f64;
                for j in 0..self.k {
                    w[i * self.k + j] += self.scale * b * self.a[t * self.k + j] as f64;
                }
            }
        }
        w
    }
}

/// Frobenius inner product of two low-rank updates (0 when their shapes differ).
pub fn inner(x: &LowRank, y: &LowRank) -> f64 {
    if x.d != y.d || x.k != y.k {
        return 0.0;
    }
    let (r1, r2) = (x.r, y.r);
    // G = B1^T B2 (r1 x r2)
    let mut g = vec![0f64; r1 * r2];
    for i in 0..x.d {
        let b1 = &x.b[i * r1..(i + 1) * r1];
        let b2 = &y.b[i * r2..(i + 1) * r2];
        for (s, &u) in b1.iter().enumerate() {
            for (t, &v) in b2.iter().enumerate() {
                g[s * r2 + t] += u as f64 * v as f64;
            }
        }
    }
    // H = A2 A1^T (r2 x r1); tr(G H) = sum_{s,t} G[s,t] H[t,s]
    let mut tr = 0f64;
    for t in 0..r2 {
        let a2 = &y.a[t * x.k..(t + 1) * x.k];
        for s in 0..r1 {
            let a1 = &x.a[s * x.k..(s + 1) * x.k];
            let h: f64 = a2.iter().zip(a1).map(|(p, q)| *p as f64 * *q as f64).sum();
            tr += g[s * r2 + t] * h;
        }
    }
    x.scale * y.scale * tr
}

/// Why an object has no delta representation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLora(pub String);

impl fmt::Display for NotLora {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An adapter's per-module updates, keyed by full module path.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoraDelta {
    pub modules: BTreeMap<String, LowRank>,
}

impl LoraDelta {
    /// Collect the LoRA factors of an object (`lora_A`/`lora_B`, and `lora_embedding_A`/`_B` whose update
    /// is compared in the same transposed layout for every adapter).
    pub fn from_object(obj: &LightweightObject) -> Result<LoraDelta, NotLora> {
        let cfg = match &obj.method {
            Method::Lora(c) => c,
            other => {
                return Err(NotLora(format!(
                    "a {} adapter has no LoRA factors",
                    other.kind()
                )))
            }
        };
        let mut a_of: BTreeMap<String, (Vec<f32>, usize, usize)> = BTreeMap::new();
        let mut b_of: BTreeMap<String, (Vec<f32>, usize, usize)> = BTreeMap::new();
        // Saved modules (`modules_to_save`) are whole copies, not low-rank updates.
        let saved = obj.saved_modules();
        for t in &obj.tensors {
            if crate::object::is_saved_module_tensor(&t.name, &saved) {
                continue;
            }
            let loc = parse_tensor_name(&t.name);
            let side = match loc.role {
                Role::LoraA | Role::LoraEmbeddingA => &mut a_of,
                Role::LoraB | Role::LoraEmbeddingB => &mut b_of,
                _ => continue,
            };
            if t.shape.len() != 2 {
                return Err(NotLora(format!(
                    "{}: shape {:?} is not a matrix",
                    t.name, t.shape
                )));
            }
            side.insert(
                loc.module_path.clone(),
                (t.to_f32(), t.shape[0], t.shape[1]),
            );
        }
        let mut modules = BTreeMap::new();
        for (path, (a, r, k)) in a_of {
            let Some((b, d, rb)) = b_of.remove(&path) else {
                return Err(NotLora(format!("{path}: lora_A without lora_B")));
            };
            if rb != r {
                return Err(NotLora(format!(
                    "{path}: lora_A has rank {r} but lora_B {rb}"
                )));
            }
            let scale = cfg.scaling_for(&path);
            modules.insert(path, LowRank::new(a, b, r, k, d, scale));
        }
        if let Some(path) = b_of.keys().next() {
            return Err(NotLora(format!("{path}: lora_B without lora_A")));
        }
        if modules.is_empty() {
            return Err(NotLora("no LoRA factors".into()));
        }
        Ok(LoraDelta { modules })
    }

    /// Squared Frobenius norm of the whole update.
    pub fn norm_sq(&self) -> f64 {
        self.modules.values().map(|m| inner(m, m)).sum()
    }

    /// Inner product with another adapter's update (modules present in both).
    pub fn inner(&self, other: &LoraDelta) -> f64 {
        self.modules
            .iter()
            .filter_map(|(p, m)| other.modules.get(p).map(|o| inner(m, o)))
            .sum()
    }
}

/// Cosine of two adapters' updates (0 when either is zero). See the module docs for the rule.
pub fn delta_cosine(x: &LoraDelta, y: &LoraDelta) -> f64 {
    let (nx, ny) = (x.norm_sq(), y.norm_sq());
    if nx <= 0.0 || ny <= 0.0 {
        return 0.0;
    }
    x.inner(y) / (nx.sqrt() * ny.sqrt())
}

#[inline]
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seeded sketch of LoRA updates (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaSketch {
    pub seed: u64,
    /// Rows of the left sketch (output side).
    pub p: usize,
    /// Rows of the right sketch (input side).
    pub q: usize,
}

impl Default for DeltaSketch {
    fn default() -> Self {
        DeltaSketch {
            seed: 0x64656c7461,
            p: 16,
            q: 16,
        }
    }
}

impl DeltaSketch {
    /// Bucket (of `buckets`) and sign of index `i` on `side` (1: the output side, Phi; 2: the input side,
    /// Psi): one SplitMix64 draw of (seed, module, side, i); bit 0 is the sign, the rest the bucket.
    fn hash(&self, module: u64, side: u64, i: usize, buckets: usize) -> (usize, f64) {
        let h = mix(self.seed ^ mix(module ^ mix(side ^ mix(i as u64))));
        let sign = if h & 1 == 1 { 1.0 } else { -1.0 };
        (((h >> 1) % buckets as u64) as usize, sign)
    }

    /// `Phi dW Psi^T` of one module (p x q, row-major), from the factors. Phi and Psi are CountSketch
    /// matrices: column i of Phi has a single +-1 at a hashed row, so `Phi B` adds each row of B, signed,
    /// into one of p buckets (O(d r)), and `A Psi^T` each column of A into one of q (O(k r)).
    pub fn module(&self, path: &str, m: &LowRank) -> Vec<f32> {
        let key = u64::from_le_bytes(
            blake3::hash(path.as_bytes()).as_bytes()[..8]
                .try_into()
                .expect("8"),
        );
        let (p, q, r) = (self.p.max(1), self.q.max(1), m.r);
        let rows = self.buckets(key, 1, m.d, p);
        let cols = self.buckets(key, 2, m.k, q);
        // L = Phi B (p x r)
        let mut l = vec![0f64; p * r];
        for (i, &(u, s)) in rows.iter().enumerate() {
            let brow = &m.b[i * r..(i + 1) * r];
            let lrow = &mut l[u as usize * r..(u as usize + 1) * r];
            for (o, b) in lrow.iter_mut().zip(brow) {
                *o += s * *b as f64;
            }
        }
        // R^T = A Psi^T (r x q): row t of A adds, signed, into q buckets, column by column, so each
        // R^T[t][v] sums its terms in the order the first implementation did.
        let mut rt = vec![0f64; r * q];
        for t in 0..r {
            let arow = &m.a[t * m.k..(t + 1) * m.k];
            let rtrow = &mut rt[t * q..(t + 1) * q];
            for (&x, &(v, s)) in arow.iter().zip(cols.iter()) {
                rtrow[v as usize] += s * x as f64;
            }
        }
        // Y = L R^T (p x q): the q sums of a row side by side, each over t in order (the same bits as one
        // dot product per entry).
        let mut y = vec![0f32; p * q];
        let mut acc = vec![0f64; q];
        for u in 0..p {
            let lrow = &l[u * r..(u + 1) * r];
            acc.fill(0.0);
            for (t, &lt) in lrow.iter().enumerate() {
                for (a, &b) in acc.iter_mut().zip(&rt[t * q..(t + 1) * q]) {
                    *a += lt * b;
                }
            }
            for (out, a) in y[u * q..(u + 1) * q].iter_mut().zip(&acc) {
                *out = (m.scale * a) as f32;
            }
        }
        y
    }

    /// The (bucket, sign) of indices `0..n` on one side of a module: [`Self::hash`] of each, computed
    /// once per (sketch, module, side, n) and shared (every adapter of a zoo has the same modules, and the
    /// hashing was most of a sketch's cost).
    fn buckets(&self, module: u64, side: u64, n: usize, buckets: usize) -> Arc<[(u32, f64)]> {
        type Key = (DeltaSketch, u64, u64, usize, usize);
        type Buckets = Arc<[(u32, f64)]>;
        static CACHE: OnceLock<Mutex<HashMap<Key, Buckets>>> = OnceLock::new();
        let key = (*self, module, side, n, buckets);
        let cache = CACHE.get_or_init(Default::default);
        if let Some(hit) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return hit;
        }
        let v: Buckets = (0..n)
            .map(|i| {
                let (b, s) = self.hash(module, side, i, buckets);
                (b as u32, s)
            })
            .collect();
        if let Ok(mut c) = cache.lock() {
            // Bounded: a process sketching adapters of very many shapes starts over.
            if c.len() >= 4096 {
                c.clear();
            }
            c.insert(key, v.clone());
        }
        v
    }

    /// The concatenated sketch of every module, in module-path order, with the paths.
    pub fn sketch(&self, delta: &LoraDelta) -> (Vec<String>, Vec<f32>) {
        let mut paths = Vec::new();
        let mut out = Vec::with_capacity(delta.modules.len() * self.p * self.q);
        for (path, m) in &delta.modules {
            paths.push(path.clone());
            out.extend(self.module(path, m));
        }
        (paths, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sketch's arithmetic as first written (A Psi^T by single scattered adds), which stored stores'
    /// sketches came from: [`DeltaSketch::module`] must give the same bits.
    fn module_as_first_written(s: &DeltaSketch, path: &str, m: &LowRank) -> Vec<f32> {
        let key = u64::from_le_bytes(
            blake3::hash(path.as_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap(),
        );
        let (p, q, r) = (s.p.max(1), s.q.max(1), m.r);
        let mut l = vec![0f64; p * r];
        for i in 0..m.d {
            let (u, sg) = s.hash(key, 1, i, p);
            for t in 0..r {
                l[u * r + t] += sg * m.b[i * r + t] as f64;
            }
        }
        let mut rt = vec![0f64; r * q];
        for t in 0..r {
            for i in 0..m.k {
                let (v, sg) = s.hash(key, 2, i, q);
                rt[t * q + v] += sg * m.a[t * m.k + i] as f64;
            }
        }
        let mut y = vec![0f32; p * q];
        for u in 0..p {
            for v in 0..q {
                let mut acc = 0f64;
                for t in 0..r {
                    acc += l[u * r + t] * rt[t * q + v];
                }
                y[u * q + v] = (m.scale * acc) as f32;
            }
        }
        y
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        #[test]
        fn module_gives_the_bits_of_the_first_implementation(
            (d, k, r) in (1usize..40, 1usize..40, 1usize..9),
            seed in proptest::prelude::any::<u64>(),
            (p, q) in (1usize..20, 1usize..20),
        ) {
            let val = |i: usize, m: u64| (((i as u64).wrapping_mul(m) ^ seed) % 1000) as f32 / 333.0 - 1.5;
            let a: Vec<f32> = (0..r * k).map(|i| val(i, 7)).collect();
            let b: Vec<f32> = (0..d * r).map(|i| val(i, 13)).collect();
            let m = LowRank::new(a, b, r, k, d, 0.75);
            let s = DeltaSketch { seed, p, q };
            let got = s.module("encoder.layer.0.attention.self.query", &m);
            let want = module_as_first_written(&s, "encoder.layer.0.attention.self.query", &m);
            proptest::prop_assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// The sketch equals `scale * Phi (B A) Psi^T` with Phi and Psi built densely from [`DeltaSketch::hash`]
    /// (the format schema/store.md specifies), on the first call and on a cached second call.
    #[test]
    fn module_is_phi_delta_psi_t() {
        let (d, k, r) = (13, 11, 3);
        let a: Vec<f32> = (0..r * k)
            .map(|i| ((i * 7 % 5) as f32 - 2.0) / 3.0)
            .collect();
        let b: Vec<f32> = (0..d * r)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0)
            .collect();
        let m = LowRank::new(a.clone(), b.clone(), r, k, d, 2.5);
        let s = DeltaSketch {
            seed: 42,
            p: 4,
            q: 5,
        };
        let key = u64::from_le_bytes(blake3::hash(b"x.q").as_bytes()[..8].try_into().unwrap());
        let mut phi = vec![0f64; s.p * d];
        for i in 0..d {
            let (u, sg) = s.hash(key, 1, i, s.p);
            phi[u * d + i] = sg;
        }
        let mut psi = vec![0f64; s.q * k];
        for j in 0..k {
            let (v, sg) = s.hash(key, 2, j, s.q);
            psi[v * k + j] = sg;
        }
        let dw = |i: usize, j: usize| {
            (0..r)
                .map(|t| b[i * r + t] as f64 * a[t * k + j] as f64)
                .sum::<f64>()
        };
        for _ in 0..2 {
            let y = s.module("x.q", &m);
            for u in 0..s.p {
                for v in 0..s.q {
                    let mut want = 0.0;
                    for i in 0..d {
                        for j in 0..k {
                            want += phi[u * d + i] * dw(i, j) * psi[v * k + j];
                        }
                    }
                    want *= 2.5;
                    assert!((y[u * s.q + v] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
                }
            }
        }
    }
}
