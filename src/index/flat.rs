//! Exact search: a flat scan of unit-normalised vectors by dot product (= cosine).
//!
//! Used for spaces below the HNSW switch-over ([`crate::index::DEFAULT_HNSW_MIN_VECTORS`]), for
//! restrictive filters, and as the ground truth in tests.

use super::vectors::RowSlice;
use rayon::prelude::*;
use std::borrow::Cow;

/// Normalise to unit length in place; returns the original norm (zero vectors stay zero).
pub fn normalize(v: &mut [f32]) -> f32 {
    let n = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if n > 0.0 {
        let inv = (1.0 / n) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
    n as f32
}

/// Dot product of two equal-length slices (8 independent accumulators so the compiler vectorises it).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Keep the best `k` (highest score; ties by lower id) of scored ids.
pub fn top_k(mut v: Vec<(u64, f32)>, k: usize) -> Vec<(u64, f32)> {
    let cmp = |a: &(u64, f32), b: &(u64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if v.len() > k && k > 0 {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.sort_by(cmp);
    v.truncate(k);
    v
}

/// Where the rows live: in memory, or in a memory-mapped `.vecs` file ([`super::vectors`]), copied into
/// memory on the first change.
#[derive(Debug, Clone)]
enum Rows {
    Owned(Vec<f32>),
    Mapped(super::vectors::MappedRows),
}

impl Default for Rows {
    fn default() -> Self {
        Rows::Owned(Vec::new())
    }
}

impl Rows {
    fn slice(&self) -> RowSlice<'_> {
        match self {
            Rows::Owned(v) => RowSlice::F32(v),
            Rows::Mapped(m) => m.rows(),
        }
    }
    fn to_mut(&mut self) -> &mut Vec<f32> {
        if let Rows::Mapped(m) = self {
            *self = Rows::Owned(m.as_f32().into_owned());
        }
        match self {
            Rows::Owned(v) => v,
            Rows::Mapped(_) => unreachable!("just made owned"),
        }
    }
}

/// Unit vectors and their ids, scanned exactly.
#[derive(Debug, Clone, Default)]
pub struct FlatIndex {
    dim: usize,
    ids: Vec<u64>,
    data: Rows,
}

impl FlatIndex {
    pub fn new(dim: usize) -> FlatIndex {
        FlatIndex {
            dim,
            ids: Vec::new(),
            data: Rows::default(),
        }
    }
    /// Rows mapped from a `.vecs` file (searched in place).
    pub(crate) fn mapped(dim: usize, mut rows: super::vectors::MappedRows) -> FlatIndex {
        FlatIndex {
            dim,
            // Moved, not copied: the mapped rows need only the map.
            ids: std::mem::take(&mut rows.ids),
            data: Rows::Mapped(rows),
        }
    }
    /// Whether the rows are searched in place in a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, Rows::Mapped(_))
    }
    /// All rows, row-major, as f32 (borrowed unless they are mapped f16 rows).
    pub fn rows(&self) -> Cow<'_, [f32]> {
        match &self.data {
            Rows::Owned(v) => Cow::Borrowed(v),
            Rows::Mapped(m) => m.as_f32(),
        }
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }
    /// The unit vector at a position.
    pub fn vector_at(&self, pos: usize) -> Cow<'_, [f32]> {
        let r = pos * self.dim..(pos + 1) * self.dim;
        match self.data.slice() {
            RowSlice::F32(rows) => Cow::Borrowed(&rows[r]),
            RowSlice::F16(rows) => {
                let mut out = vec![0f32; self.dim];
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&rows[r], &mut out);
                Cow::Owned(out)
            }
        }
    }
    /// Add a vector that is already unit-normalised (caller's duty) and of length `dim`.
    pub fn push_unit(&mut self, id: u64, v: &[f32]) {
        debug_assert_eq!(v.len(), self.dim);
        self.ids.push(id);
        self.data.to_mut().extend_from_slice(v);
    }
    /// Drop the rows whose id fails `keep`.
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let dim = self.dim;
        let data = self.data.to_mut();
        let mut w = 0;
        for r in 0..self.ids.len() {
            if keep(self.ids[r]) {
                if w != r {
                    self.ids[w] = self.ids[r];
                    data.copy_within(r * dim..(r + 1) * dim, w * dim);
                }
                w += 1;
            }
        }
        self.ids.truncate(w);
        data.truncate(w * dim);
    }

    /// The `k` best (id, cosine) for a unit query among ids passing `filter`.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: &(dyn Fn(u64) -> bool + Sync),
    ) -> Vec<(u64, f32)> {
        if k == 0 || self.dim == 0 {
            return Vec::new();
        }
        let chunk = 4096;
        let dim = self.dim;
        let rows = self.data.slice();
        let scored: Vec<(u64, f32)> = self
            .ids
            .par_chunks(chunk)
            .enumerate()
            .flat_map_iter(|(c, ids)| {
                let mut local = Vec::with_capacity(ids.len().min(4 * k));
                let mut buf = vec![0f32; dim];
                for (i, &id) in ids.iter().enumerate() {
                    if !filter(id) {
                        continue;
                    }
                    let r = (c * chunk + i) * dim..(c * chunk + i + 1) * dim;
                    let s = match &rows {
                        RowSlice::F32(rows) => dot(query, &rows[r]),
                        RowSlice::F16(rows) => {
                            half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                &rows[r], &mut buf,
                            );
                            dot(query, &buf)
                        }
                    };
                    local.push((id, s));
                }
                top_k(local, k)
            })
            .collect();
        top_k(scored, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_best_and_filters() {
        let mut f = FlatIndex::new(2);
        for (id, v) in [(1u64, [1.0f32, 0.0]), (2, [0.0, 1.0]), (3, [0.6, 0.8])] {
            let mut v = v.to_vec();
            normalize(&mut v);
            f.push_unit(id, &v);
        }
        let r = f.search(&[1.0, 0.0], 2, &|_| true);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        let r = f.search(&[1.0, 0.0], 2, &|id| id != 1);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 2]);
        f.retain(|id| id != 3);
        assert_eq!(f.ids(), &[1, 2]);
        assert_eq!(&*f.vector_at(1), &[0.0, 1.0]);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.1).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.05).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }
}
