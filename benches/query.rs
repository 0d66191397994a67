//! Query latency and recall@10 of HNSW and exact (flat) search, next to a plain brute-force reference
//! measured in the same run (cosine over the raw full vectors, no index).
//!
//! Default run (a few minutes): 1k and 10k objects at dimension 384, and 1k and 10k at dimension 24,576
//! (indexed through the random projection, reranked exactly). `PEFTDB_BENCH_FULL=1` adds 100k objects.
//! Prints, per configuration: build time, mean latency and recall of each engine, and the ratios.
//!
//! Measured (bench profile, 2 cores shared with other builds, load average about 11; 30 queries, k = 10):
//!
//! | dim (indexed) | n | build | HNSW | flat | brute force | brute/HNSW | brute/flat | recall HNSW / flat |
//! |---|---|---|---|---|---|---|---|---|
//! | 384 (384) | 1k | 0.59 s | 0.69 ms | 0.067 ms | 0.52 ms | 0.8x | 7.7x | 1.000 / 1.000 |
//! | 384 (384) | 10k | 25.1 s | 4.00 ms | 2.37 ms | 6.85 ms | 1.7x | 2.9x | 1.000 / 1.000 |
//! | 24,576 (512) | 1k | 1.33 s | 7.25 ms | 5.86 ms | 40.9 ms | 5.6x | 7.0x | 1.000 / 1.000 |
//! | 24,576 (512) | 10k | 35.7 s | 13.9 ms | 10.3 ms | 404 ms | 29.0x | 39.3x | 1.000 / 1.000 |
//!
//! "flat" is the exact scan of the unit (for 24,576: projected, then exactly reranked) vectors; "brute
//! force" is cosine over the raw full vectors with no index. hnsw_rs's query does not beat the flat scan
//! below about 20k vectors here, hence the default switch-over ([`peftdb::index::DEFAULT_HNSW_MIN_VECTORS`]).

use criterion::{criterion_group, criterion_main, Criterion};
use peftdb::embed::SpaceId;
use peftdb::index::{brute_force, recall, IndexConfig, SearchMode, SpaceIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// Clustered vectors, about 50 per cluster, so a query's top 10 are well defined (with 5 per cluster the
/// rest of a top 10 are noise-level near-ties that no index can reproduce).
fn clustered(n: usize, dim: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..(n / 50).max(10))
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    (0..n)
        .map(|i| {
            let c = &centres[rng.random_range(0..centres.len())];
            (
                i as u64 + 1,
                c.iter()
                    .map(|x| x + 0.5 * rng.random_range(-1.0f32..1.0))
                    .collect(),
            )
        })
        .collect()
}

fn mean_time(qs: &[Vec<f32>], mut f: impl FnMut(&[f32])) -> Duration {
    let t = Instant::now();
    for q in qs {
        f(q);
    }
    t.elapsed() / qs.len() as u32
}

fn bench(c: &mut Criterion) {
    let full = std::env::var("PEFTDB_BENCH_FULL").is_ok();
    let mut configs = vec![
        (384usize, 1_000usize),
        (384, 10_000),
        (24_576, 1_000),
        (24_576, 10_000),
    ];
    if full {
        configs.push((384, 100_000));
        configs.push((24_576, 100_000));
    }
    let mut group = c.benchmark_group("nearest");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for (dim, n) in configs {
        let data = clustered(n, dim, 1);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let qs: Vec<Vec<f32>> = (0..30)
            .map(|_| {
                let (_, v) = &data[rng.random_range(0..n)];
                v.iter()
                    .map(|x| x + 0.2 * rng.random_range(-1.0f32..1.0))
                    .collect()
            })
            .collect();
        let config = IndexConfig {
            mode: SearchMode::Hnsw,
            ..IndexConfig::default()
        };
        let mut idx = SpaceIndex::new(SpaceId(1), dim, config);
        let t = Instant::now();
        idx.add(&data).unwrap();
        idx.rebuild().unwrap();
        let build = t.elapsed();
        let fetch = |id: u64| data.get(id as usize - 1).map(|(_, v)| v.clone());
        let full_fetch: Option<peftdb::index::FullVectors<'_>> = if idx.projection().is_some() {
            Some(&fetch)
        } else {
            None
        };
        let run =
            |mode: SearchMode, q: &[f32]| idx.search(q, 10, mode, &|_| true, full_fetch).unwrap().0;
        let truth: Vec<_> = qs
            .iter()
            .map(|q| brute_force(q, &data, 10, |_| true))
            .collect();
        let rec = |mode: SearchMode| {
            qs.iter()
                .zip(&truth)
                .map(|(q, t)| recall(&run(mode, q), t))
                .sum::<f64>()
                / qs.len() as f64
        };
        let (r_h, r_f) = (rec(SearchMode::Hnsw), rec(SearchMode::Exact));
        let t_h = mean_time(&qs, |q| {
            run(SearchMode::Hnsw, q);
        });
        let t_f = mean_time(&qs, |q| {
            run(SearchMode::Exact, q);
        });
        let t_b = mean_time(&qs, |q| {
            brute_force(q, &data, 10, |_| true);
        });
        println!(
            "dim {dim:>6} (indexed {:>4}) n {n:>7}: build {build:>10.2?} | hnsw {t_h:>10.2?} recall {r_h:.3} | flat {t_f:>10.2?} recall {r_f:.3} | brute-force {t_b:>10.2?} | brute/hnsw {:.1}x brute/flat {:.1}x flat/hnsw {:.2}x",
            idx.indexed_dim(),
            t_b.as_secs_f64() / t_h.as_secs_f64(),
            t_b.as_secs_f64() / t_f.as_secs_f64(),
            t_f.as_secs_f64() / t_h.as_secs_f64(),
        );
        let q = qs[0].clone();
        group.bench_function(format!("hnsw/d{dim}/n{n}"), |b| {
            b.iter(|| run(SearchMode::Hnsw, &q))
        });
        group.bench_function(format!("flat/d{dim}/n{n}"), |b| {
            b.iter(|| run(SearchMode::Exact, &q))
        });
        group.bench_function(format!("brute/d{dim}/n{n}"), |b| {
            b.iter(|| brute_force(&q, &data, 10, |_| true))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
