//! Recall of the HNSW index against exact search (seeded data; no timing assertions).

use peftdb::embed::SpaceId;
use peftdb::index::{brute_force, recall, IndexConfig, SearchMode, SpaceIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr_free::gauss;

mod rand_distr_free {
    use rand::Rng;
    /// Standard normal by Box-Muller (rand_distr is not a dependency).
    pub fn gauss(rng: &mut impl Rng) -> f32 {
        let u: f64 = rng.random_range(1e-12..1.0);
        let v: f64 = rng.random_range(0.0..1.0);
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// Clustered vectors, like adapters of related tasks: `clusters` centres, points = centre + noise.
fn clustered(n: usize, dim: usize, clusters: usize, noise: f32, seed: u64) -> Vec<(u64, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| gauss(&mut rng)).collect())
        .collect();
    (0..n)
        .map(|i| {
            let c = &centres[rng.random_range(0..clusters)];
            (
                i as u64 + 1,
                c.iter().map(|x| x + noise * gauss(&mut rng)).collect(),
            )
        })
        .collect()
}

fn queries(data: &[(u64, Vec<f32>)], n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (_, v) = &data[rng.random_range(0..data.len())];
            v.iter().map(|x| x + 0.5 * gauss(&mut rng)).collect()
        })
        .collect()
}

fn mean_recall(
    idx: &SpaceIndex,
    data: &[(u64, Vec<f32>)],
    qs: &[Vec<f32>],
    filter: &(dyn Fn(u64) -> bool + Sync),
    full: Option<peftdb::index::FullVectors<'_>>,
) -> (f64, usize) {
    let mut total = 0.0;
    let mut graph_used = 0;
    for q in qs {
        let (got, engine) = idx.search(q, 10, SearchMode::Auto, filter, full).unwrap();
        if engine == peftdb::index::Engine::Hnsw {
            graph_used += 1;
        }
        assert_eq!(got.len(), 10, "k results come back");
        let truth = brute_force(q, data, 10, |id| idx.contains(id) && filter(id));
        total += recall(&got, &truth);
    }
    (total / qs.len() as f64, graph_used)
}

#[test]
fn hnsw_recall_default_params_filters_and_deletes() {
    let data = clustered(10_000, 384, 200, 1.0, 1);
    let t = std::time::Instant::now();
    // Default graph parameters; the graph forced (10k is below the default switch-over of 20k).
    let config = IndexConfig {
        mode: SearchMode::Hnsw,
        ..IndexConfig::default()
    };
    let mut idx = SpaceIndex::new(SpaceId(1), 384, config);
    idx.add(&data).unwrap();
    idx.rebuild().unwrap();
    assert!(idx.has_graph());
    eprintln!("built 10k x 384 in {:?}", t.elapsed());
    let qs = queries(&data, 100, 2);

    let (r, used) = mean_recall(&idx, &data, &qs, &|_| true, None);
    assert_eq!(used, qs.len());
    assert!(r >= 0.99, "recall@10 {r}");

    // A filter during the search (two thirds of the objects pass): still k results, same recall.
    let (r, used) = mean_recall(&idx, &data, &qs, &|id| id % 3 != 0, None);
    assert_eq!(used, qs.len());
    assert!(r >= 0.99, "filtered recall@10 {r}");

    // A restrictive filter (2%) goes to the exact scan.
    let (r, used) = mean_recall(&idx, &data, &qs, &|id| id % 50 == 0, None);
    assert_eq!(used, 0);
    assert_eq!(r, 1.0);

    // Delete 15% (below the rebuild fraction): hidden at once, the graph is kept.
    let gone: Vec<u64> = data
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| id % 7 == 0)
        .collect();
    assert_eq!(idx.remove(&gone), gone.len());
    assert!(!idx.needs_compaction());
    let (r, used) = mean_recall(&idx, &data, &qs, &|_| true, None);
    assert_eq!(used, qs.len());
    assert!(r >= 0.99, "recall@10 after deletes {r}");
    for q in &qs[..20] {
        let (got, _) = idx
            .search(q, 10, SearchMode::Auto, &|_| true, None)
            .unwrap();
        assert!(
            got.iter().all(|h| h.id % 7 != 0),
            "a deleted object came back"
        );
    }

    // After a reload (dump, load): the same answers, deletes still hidden.
    let before: Vec<_> = qs
        .iter()
        .map(|q| {
            idx.search(q, 10, SearchMode::Auto, &|_| true, None)
                .unwrap()
                .0
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    idx.graph().unwrap().dump(dir.path(), "g").unwrap();
    let g =
        peftdb::index::HnswGraph::load(dir.path(), "g", 384, IndexConfig::default().hnsw).unwrap();
    // Same answers as sets: the order of near-ties (equal scores to float precision) is not part of the
    // answer and may differ between the built and the reloaded graph.
    for (q, b) in qs.iter().zip(&before) {
        let got = g.search(q, 10, 0, &|id| id % 7 != 0).unwrap();
        let mut got: Vec<u64> = got.iter().map(|h| h.0).collect();
        let mut want: Vec<u64> = b.iter().map(|h| h.id).collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    // Added after the build: searchable.
    let extra = clustered(500, 384, 10, 0.1, 9)
        .into_iter()
        .map(|(id, v)| (id + 1_000_000, v))
        .collect::<Vec<_>>();
    idx.add(&extra).unwrap();
    let (got, _) = idx
        .search(&extra[3].1, 1, SearchMode::Auto, &|_| true, None)
        .unwrap();
    assert_eq!(got[0].id, extra[3].0);
}

/// Vectors of low intrinsic dimension in a high-dimensional space, like real adapters: each is a
/// weighted sum of 3 of 300 seeded directions plus uniform noise.
fn latent(n: usize, dim: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let basis: Vec<Vec<f32>> = (0..300)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            let mut v: Vec<f32> = (0..dim)
                .map(|_| 0.1 * rng.random_range(-1.0f32..1.0))
                .collect();
            for _ in 0..3 {
                let b = &basis[rng.random_range(0..basis.len())];
                let w = gauss(&mut rng);
                for (x, y) in v.iter_mut().zip(b) {
                    *x += w * y;
                }
            }
            (i as u64 + 1, v)
        })
        .collect()
}

#[test]
fn projected_high_dim_recall_after_exact_rerank() {
    let dim = 4_608;
    let n = 50_000;
    let data = latent(n, dim, 3);
    // The exact scan of the projections, then the exact rerank: this isolates the projection's recall
    // (the graph over projected vectors is exercised at a smaller size in the unit tests).
    let config = IndexConfig {
        mode: SearchMode::Exact,
        ..IndexConfig::default()
    };
    assert!(dim > config.project_above);
    let mut idx = SpaceIndex::new(SpaceId(2), dim, config);
    for chunk in data.chunks(5_000) {
        idx.add(chunk).unwrap();
    }
    assert!(!idx.has_graph());
    assert_eq!(idx.indexed_dim(), config.projection_dim);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let qs: Vec<Vec<f32>> = (0..40)
        .map(|_| {
            let (_, v) = &data[rng.random_range(0..n)];
            v.iter()
                .map(|x| x + 0.1 * rng.random_range(-1.0f32..1.0))
                .collect()
        })
        .collect();
    let fetch = |id: u64| data.get(id as usize - 1).map(|(_, v)| v.clone());
    let (r, _) = mean_recall(&idx, &data, &qs, &|_| true, Some(&fetch));
    eprintln!("projected recall@10 {r}");
    assert!(r >= 0.99, "projected recall@10 {r}");
    // Scores are exact cosines of the full vectors.
    let (got, _) = idx
        .search(&qs[0], 10, SearchMode::Auto, &|_| true, Some(&fetch))
        .unwrap();
    let truth = brute_force(&qs[0], &data, 10, |_| true);
    assert!((got[0].score - truth[0].score).abs() < 1e-4);
}
