//! Ingestion throughput (criterion): a generated zoo of BERT-base-shaped LoRA adapters (r = 8 on query
//! and value, 12 layers, ~1.2 MB each), ingested into a fresh store (read + validate + hash + TuPaTE +
//! one redb transaction per batch), next to the raw read of the same files. Plus exact nearest-task
//! queries (brute-force cosine top-10 over 10k and 100k embeddings of dimension 384).
//!
//! ```text
//! cargo bench --bench ingest                       # 1000 adapters (PEFTDB_BENCH_ADAPTERS=N to change)
//! scripts/bench-python.sh                          # this, then the Python reference, then the ratios
//! ```
//!
//! Besides criterion's report, one direct measurement of each is printed as a summary and written to
//! `target/peftdb-bench/rust.json` (read by `scripts/bench-python.sh`). The zoo is generated once into
//! `target/peftdb-bench/zoo-<N>/` and reused (the Python reference reads the same files). All numbers are
//! with the zoo in the page cache (it was just written or read).

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use peftdb::ingest::{ingest_zoo, IngestOptions};
use peftdb::object::MethodKind;
use peftdb::store::Store;
use peftdb::synth::{write_zoo, ModelShape};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn n_adapters() -> usize {
    std::env::var("PEFTDB_BENCH_ADAPTERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn bench_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("peftdb-bench")
}

/// The zoo (generated once; a `.complete` marker says it is whole).
fn zoo(n: usize) -> PathBuf {
    let dir = bench_dir().join(format!("zoo-{n}"));
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "generating {n} BERT-base LoRA adapters into {} ...",
            dir.display()
        );
        write_zoo(
            &dir,
            &ModelShape::bert_base(),
            n,
            20,
            &[MethodKind::Lora],
            2024,
        )
        .expect("zoo written");
        std::fs::write(dir.join(".complete"), b"").unwrap();
    }
    dir
}

/// Every file of the zoo, sorted.
fn files(zoo: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(zoo)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter(|e| {
            let n = e.file_name().to_string_lossy();
            n.ends_with(".safetensors") || n == "adapter_config.json" || n == "peftdb.json"
        })
        .map(|e| e.into_path())
        .collect();
    v.sort();
    v
}

/// Raw read: every file into memory, in parallel like ingestion (rayon), returns bytes read.
fn raw_read(files: &[PathBuf]) -> u64 {
    use rayon::prelude::*;
    files
        .par_iter()
        .map(|p| std::fs::read(p).expect("read").len() as u64)
        .sum()
}

/// Ingest the zoo into a fresh store; returns (adapters ingested, elapsed).
fn ingest_once(zoo: &Path) -> (usize, Duration) {
    let dir = tempfile::tempdir_in(bench_dir()).unwrap();
    let store = Store::create(dir.path().join("bench.peftdb")).unwrap();
    let t0 = Instant::now();
    let r = ingest_zoo(
        &store,
        &[zoo.to_path_buf()],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    let el = t0.elapsed();
    assert_eq!(r.rejected(), 0);
    (r.ingested(), el)
}

/// Seeded unit-norm embeddings (xorshift; the distribution does not matter for brute-force speed).
fn embeddings(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let row: Vec<f32> = (0..dim)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let norm = row.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
        v.extend(row.iter().map(|a| a / norm));
    }
    v
}

/// Exact cosine top-k over unit-norm rows (a simple single-threaded loop): the baseline the index's
/// exact scan (`peftdb::index::FlatIndex`, what `peftdb nearest` runs below the HNSW switch-over) is
/// measured against.
fn top_k(rows: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, r) in rows.chunks_exact(dim).enumerate() {
        let s: f32 = r.iter().zip(q).map(|(a, b)| a * b).sum();
        if best.len() < k || s > best[best.len() - 1].1 {
            let pos = best.partition_point(|e| e.1 >= s);
            best.insert(pos, (i as u32, s));
            best.truncate(k);
        }
    }
    best
}

const DIM: usize = 384;
const QUERIES: usize = 100;

fn bench_ingest(c: &mut Criterion) {
    let n = n_adapters();
    let zoo = zoo(n);
    let files = files(&zoo);
    let bytes = raw_read(&files);
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(BenchmarkId::new("raw_read", n), |b| {
        b.iter(|| raw_read(&files))
    });
    g.bench_function(BenchmarkId::new("peftdb_ingest", n), |b| {
        b.iter_custom(|iters| (0..iters).map(|_| ingest_once(&zoo).1).sum())
    });
    g.finish();
}

fn bench_query(c: &mut Criterion) {
    let mut g = c.benchmark_group("nearest_task_exact");
    for n in [10_000usize, 100_000] {
        let rows = embeddings(n, DIM, 7);
        let queries = embeddings(QUERIES, DIM, 99);
        g.throughput(Throughput::Elements(QUERIES as u64));
        g.bench_function(BenchmarkId::new("brute_force_top10", n), |b| {
            b.iter(|| {
                queries
                    .chunks_exact(DIM)
                    .map(|q| top_k(&rows, DIM, q, 10)[0].0)
                    .sum::<u32>()
            })
        });
    }
    g.finish();
}

/// One direct measurement of everything, printed and written as JSON for the Python comparison.
fn summary() {
    let n = n_adapters();
    let zoo = zoo(n);
    let files = files(&zoo);
    let bytes = raw_read(&files); // warm the page cache
    let t0 = Instant::now();
    let b2 = raw_read(&files);
    let raw_s = t0.elapsed().as_secs_f64();
    assert_eq!(bytes, b2);
    let (count, el) = ingest_once(&zoo);
    let ingest_s = el.as_secs_f64();
    let mb = bytes as f64 / 1e6;
    let mut queries_json = Vec::new();
    let mut loop_json = Vec::new();
    for nq in [10_000usize, 100_000] {
        let rows = embeddings(nq, DIM, 7);
        let queries = embeddings(QUERIES, DIM, 99);
        // peftdb's exact scan (the index's flat search, filter included, parallel over chunks).
        let mut flat = peftdb::index::FlatIndex::new(DIM);
        for (i, r) in rows.chunks_exact(DIM).enumerate() {
            flat.push_unit(i as u64, r);
        }
        let all = |_: u64| true;
        let t0 = Instant::now();
        let mut s = 0u64;
        for q in queries.chunks_exact(DIM) {
            s = s.wrapping_add(flat.search(q, 10, &all)[0].0);
        }
        std::hint::black_box(s);
        let per_q = t0.elapsed().as_secs_f64() / QUERIES as f64;
        // The plain loop, for reference (and a check that both find the same best row).
        let t0 = Instant::now();
        let mut s2 = 0u64;
        for q in queries.chunks_exact(DIM) {
            s2 = s2.wrapping_add(top_k(&rows, DIM, q, 10)[0].0 as u64);
        }
        let per_q_loop = t0.elapsed().as_secs_f64() / QUERIES as f64;
        assert_eq!(s, s2, "the index's scan and the plain loop disagree");
        println!(
            "query  exact cosine top-10 over {nq:>6} x {DIM}: index scan {:.3} ms/query, plain loop {:.3} ms/query",
            per_q * 1e3,
            per_q_loop * 1e3
        );
        queries_json.push(format!("\"{nq}\": {per_q}"));
        loop_json.push(format!("\"{nq}\": {per_q_loop}"));
    }
    // What each embedding costs per adapter, against reading it (same adapters, same run).
    let sample: Vec<_> = files
        .iter()
        .filter(|f| f.to_string_lossy().ends_with(".safetensors"))
        .take(50)
        .map(|f| f.parent().unwrap().to_path_buf())
        .collect();
    let read_opts = peftdb::object::ReadOptions::default();
    let t0 = Instant::now();
    let objs: Vec<_> = sample
        .iter()
        .map(|d| peftdb::object::read_adapter(d, &read_opts).expect("adapter"))
        .collect();
    let read_ms = t0.elapsed().as_secs_f64() * 1e3 / objs.len() as f64;
    let t0 = Instant::now();
    for o in &objs {
        std::hint::black_box(peftdb::embed::tupate(o).is_ok());
    }
    let tupate_ms = t0.elapsed().as_secs_f64() * 1e3 / objs.len() as f64;
    let t0 = Instant::now();
    for o in &objs {
        std::hint::black_box(peftdb::embed::delta_sketch(o).is_some());
    }
    let sketch_ms = t0.elapsed().as_secs_f64() * 1e3 / objs.len() as f64;
    println!(
        "per adapter: read + validate {read_ms:.2} ms, TuPaTE {tupate_ms:.2} ms, delta sketch {sketch_ms:.2} ms ({:.2}x TuPaTE)",
        sketch_ms / tupate_ms
    );
    println!(
        "ingest {count} adapters, {mb:.1} MB: {:.2} s = {:.1} adapters/s, {:.1} MB/s",
        ingest_s,
        count as f64 / ingest_s,
        mb / ingest_s
    );
    println!(
        "raw read of the same files: {:.3} s = {:.1} MB/s; ingest takes {:.1}x the raw read",
        raw_s,
        mb / raw_s,
        ingest_s / raw_s
    );
    let json = format!(
        "{{\"adapters\": {count}, \"bytes\": {bytes}, \"zoo\": {:?}, \"ingest_s\": {ingest_s}, \"raw_read_s\": {raw_s}, \"query_s\": {{{}}}, \"loop_query_s\": {{{}}}}}\n",
        zoo.display().to_string(),
        queries_json.join(", "),
        loop_json.join(", ")
    );
    std::fs::write(bench_dir().join("rust.json"), json).unwrap();
}

criterion_group!(benches, bench_ingest, bench_query);

fn main() {
    std::fs::create_dir_all(bench_dir()).unwrap();
    // `PEFTDB_BENCH_SUMMARY_ONLY=1`: skip criterion, just the one-shot measurement (what the comparison
    // script uses; criterion's repeated ingestion of 1000 adapters takes minutes).
    if std::env::var("PEFTDB_BENCH_SUMMARY_ONLY").is_err() {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    summary();
}
