//! Store footprint, ingestion bandwidth and cold-process queries at scale, each against a reference measured
//! in the same run (issue #15):
//!
//! - **footprint**: bytes on disk (store file + its index folder) against the adapter files' bytes, after
//!   ingestion and again after `peftdb rm` of half the objects plus `peftdb compact`;
//! - **ingestion**: `peftdb ingest` of the zoo (a cold process, the zoo read into the page cache just
//!   before) in MB/s against `dd if=/dev/zero bs=1M conv=fdatasync` of the same number of bytes on the same
//!   disk, and against the same `dd` with `oflag=direct` (the disk's bandwidth without the page cache, the
//!   way the store writes its pages): `PEFTDB_SCALE_ROUNDS` (default 3) rounds of dd, dd direct, ingest,
//!   each after `sync` and 10 s for the disk to settle; the medians, and each round's ratio;
//! - **cold `nearest`**: `peftdb nearest --task T -k 10` as a new process each time (median wall time and
//!   peak RSS over 21 queries after one warm-up), against numpy brute force over the same embeddings stored
//!   as a `.npy` file (a new Python process each time, `np.load(mmap_mode="r")`, imports not counted, as
//!   in the issue).
//!
//! The zoo: `PEFTDB_SCALE_N` (default 10,000) LoRA adapters r=8 on query,value of all-MiniLM-L6-v2's shape
//! (6 layers x 384: 295 KB each, TuPaTE 12,288-d), seeded ([`peftdb::synth`]), written once under
//! `target/peftdb-bench/scale-N/` (a `.complete` marker says it is whole). `PEFTDB_SCALE_100K=1` adds a
//! 100,000-object store generated on the fly (no adapter files): one-layer LoRAs of hidden 384, so each
//! TuPaTE is also 12,288-d, ingested through the library's batch commit; only its cold query is measured.
//! `PEFTDB_PYTHON` names a Python with numpy (default `target/bench-venv/bin/python`, else `python3`); the
//! numpy rows are skipped with a message when none is found.
//!
//! Results go to stdout and `target/peftdb-bench/scale.json`. Run on a quiet machine: these are wall
//! times.

use peftdb::object::MethodKind;
use peftdb::store::{NewObject, PreparedObject, Store, TaskRecord};
use peftdb::synth::{lora, write_zoo, ModelShape, Seeds};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PEFTDB: &str = env!("CARGO_BIN_EXE_peftdb");
/// Queries per measurement (3 in the smoke run).
static QUERIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(21);

fn queries() -> usize {
    QUERIES.load(std::sync::atomic::Ordering::Relaxed)
}

fn bench_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("peftdb-bench")
}

fn dir_bytes(p: &Path) -> u64 {
    if p.is_file() {
        return std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    }
    walkdir::WalkDir::new(p)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes allocated on disk (st_blocks x 512): redb grows its file by whole regions, so the file's length
/// runs ahead of what it uses; the unused tail is a hole until written. `peftdb compact` trims it.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walkdir::WalkDir::new(p)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Bytes the store occupies on disk: the file and its index folder.
fn store_bytes(store: &Path) -> u64 {
    let mut idx = store.as_os_str().to_owned();
    idx.push(".index");
    allocated(store) + allocated(Path::new(&idx))
}

/// The store file's length (what a copy that does not keep holes writes).
fn file_len(store: &Path) -> u64 {
    std::fs::metadata(store).map(|m| m.len()).unwrap_or(0)
}

fn zoo(n: usize) -> PathBuf {
    let dir = bench_dir().join(format!("scale-{n}"));
    if !dir.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "generating {n} MiniLM-shaped LoRA adapters into {} ...",
            dir.display()
        );
        write_zoo(&dir, &ModelShape::minilm(), n, 50, &[MethodKind::Lora], 15).expect("zoo");
        std::fs::write(dir.join(".complete"), b"").unwrap();
    }
    dir
}

/// Run a command; returns (wall seconds, peak RSS in KiB from GNU time, stdout). Without GNU time
/// (`/usr/bin/time`, Debian package `time`) the RSS is reported as 0.
fn timed(cmd: &mut Command) -> (f64, u64, String) {
    let rss_file = bench_dir().join(".rss");
    let _ = std::fs::remove_file(&rss_file);
    let prog = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let gnu_time = Path::new("/usr/bin/time").is_file();
    let mut c = if gnu_time {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-f").arg("%M").arg("-o").arg(&rss_file).arg(prog);
        c
    } else {
        Command::new(prog)
    };
    c.args(args);
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    let t0 = Instant::now();
    let out = c.output().expect("command runs");
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    let rss = std::fs::read_to_string(&rss_file)
        .ok()
        .and_then(|s| s.trim().lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    (wall, rss, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// dd of `bytes` with fdatasync into the bench folder (`oflag=direct` too when `direct`): MB/s.
fn dd_mb_s(bytes: u64, direct: bool) -> f64 {
    let f = bench_dir().join(".dd");
    let mb = bytes.div_ceil(1 << 20);
    let mut cmd = Command::new("dd");
    cmd.arg("if=/dev/zero")
        .arg(format!("of={}", f.display()))
        .arg("bs=1M")
        .arg(format!("count={mb}"))
        .arg("conv=fdatasync")
        .arg("status=none");
    if direct {
        cmd.arg("oflag=direct");
    }
    let (wall, _, _) = timed(&mut cmd);
    let _ = std::fs::remove_file(&f);
    (mb << 20) as f64 / 1e6 / wall
}

/// Let the disk settle before a timed write: write back what is dirty and wait. On the build machine a
/// write right after a large file was deleted ran up to 3x slower (the cause was not found: the disk
/// counted no discards meanwhile).
fn settle(smoke: bool) {
    let _ = Command::new("sync").status();
    if !smoke {
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
}

/// Read every file of the zoo, so ingestion reads it from the page cache, as a zoo just written or used
/// is (the build machine's kernel pages cold page cache out within minutes).
fn warm(dir: &Path) {
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_file() {
            let _ = std::fs::read(e.path());
        }
    }
}

fn python() -> Option<String> {
    let venv = bench_dir().parent().unwrap().join("bench-venv/bin/python");
    let cands = [
        std::env::var("PEFTDB_PYTHON").ok(),
        Some(venv.display().to_string()),
        Some("python3".into()),
    ];
    cands.into_iter().flatten().find(|p| {
        Command::new(p)
            .args(["-c", "import numpy"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

const NUMPY_QUERY: &str = r#"
import sys, time
import numpy as np
t0 = time.perf_counter()
e = np.load(sys.argv[1], mmap_mode="r")
q = np.array(e[int(sys.argv[2])], dtype=np.float32)
norms = np.sqrt(np.einsum("ij,ij->i", e, e))
s = (e @ q) / (norms * np.linalg.norm(q) + 1e-30)
top = np.argpartition(-s, 11)[:11]
top = top[np.argsort(-s[top])]
print(time.perf_counter() - t0)
"#;

/// Write a space's embeddings as a .npy (f32, C order); returns the file and the row count.
fn write_npy(store: &Path, out: &Path) -> usize {
    let s = Store::open_read_only(store).expect("store");
    let space = s.spaces().expect("spaces")[0].id;
    let rows = s.embeddings(space).expect("embeddings");
    let dim = rows[0].1.len();
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    use std::io::Write;
    let header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {dim}), }}",
        rows.len()
    );
    let pad = 64 - (10 + header.len() + 1) % 64;
    let header = format!("{header}{}\n", " ".repeat(pad));
    f.write_all(b"\x93NUMPY\x01\x00").unwrap();
    f.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    for (_, v) in &rows {
        for x in v {
            f.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    rows.len()
}

struct ColdQuery {
    median_ms: f64,
    peak_rss_mb: f64,
    numpy_ms: Option<f64>,
}

/// `QUERIES` cold `peftdb nearest` runs over seeded task names (after one warm-up run), and numpy.
fn cold_queries(store: &Path, tasks: usize, npy: Option<(&Path, &str)>) -> ColdQuery {
    let task = |i: usize| format!("task-{:03}", (i * 7919 + 13) % tasks);
    let run = |i: usize| {
        timed(
            Command::new(PEFTDB)
                .arg("--db")
                .arg(store)
                .arg("--json")
                .arg("nearest")
                .arg("--task")
                .arg(task(i))
                .arg("-k")
                .arg("10"),
        )
    };
    let _ = run(queries()); // warm-up: page cache, and any derived file a first query writes
    let mut walls = Vec::new();
    let mut peak = 0u64;
    for i in 0..queries() {
        let (w, rss, out) = run(i);
        let v: serde_json::Value = serde_json::from_str(&out).expect("nearest --json prints JSON");
        assert!(v.to_string().contains("task-"), "no task in {out}");
        walls.push(w);
        peak = peak.max(rss);
    }
    let numpy_ms = npy.map(|(file, py)| {
        let mut v = Vec::new();
        for i in 0..queries().min(7) {
            let (_, _, out) = timed(
                Command::new(py)
                    .arg("-c")
                    .arg(NUMPY_QUERY)
                    .arg(file)
                    .arg(((i * 7919 + 13) % tasks).to_string()),
            );
            v.push(out.trim().parse::<f64>().expect("seconds") * 1e3);
        }
        median(v)
    });
    ColdQuery {
        median_ms: median(walls) * 1e3,
        peak_rss_mb: peak as f64 / 1024.0,
        numpy_ms,
    }
}

/// A 100k store of one-layer LoRAs (12,288-d TuPaTE), generated on the fly; reused when complete.
fn store_100k() -> PathBuf {
    let dir = bench_dir().join("scale-100k");
    let store = dir.join("s.peftdb");
    if dir.join(".complete").exists() {
        return store;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let s = Store::create(&store).unwrap();
    let shape = ModelShape {
        name: "synthetic/one-layer-384".into(),
        layers: 1,
        hidden: 384,
        intermediate: 1536,
        heads: 12,
    };
    eprintln!("generating a 100,000-object store in {} ...", dir.display());
    use rayon::prelude::*;
    for chunk in (0..100_000usize).collect::<Vec<_>>().chunks(2000) {
        let batch: Vec<PreparedObject> = chunk
            .par_iter()
            .map(|&t| {
                let s = Seeds {
                    group: (t % 200) as u64,
                    task: t as u64,
                    object: t as u64,
                };
                PreparedObject::prepare(NewObject {
                    object: lora(&shape, 8, &["query", "value"], s),
                    task: TaskRecord::named(format!("task-{t:03}")),
                    source: None,
                    stage: None,
                    metrics: Default::default(),
                })
            })
            .collect();
        s.commit_batch(batch).unwrap();
    }
    drop(s);
    std::fs::write(dir.join(".complete"), b"").unwrap();
    store
}

fn main() {
    // `cargo test --all-targets` runs this without `--bench`: a smoke run of the same steps on 60 adapters
    // (the CLI path ingest -> nearest -> rm -> compact), its figures not worth printing as results.
    let smoke = !std::env::args().any(|a| a == "--bench");
    if smoke {
        QUERIES.store(3, std::sync::atomic::Ordering::Relaxed);
    }
    let n: usize = if smoke {
        60
    } else {
        std::env::var("PEFTDB_SCALE_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000)
    };
    std::fs::create_dir_all(bench_dir()).unwrap();
    let py = if smoke { None } else { python() };
    if py.is_none() && !smoke {
        eprintln!("numpy not found (set PEFTDB_PYTHON, or python3 -m venv target/bench-venv && target/bench-venv/bin/pip install numpy): numpy rows skipped");
    }
    let zoo = zoo(n);
    let adapter_bytes = dir_bytes(&zoo) - dir_bytes(&zoo.join(".complete"));
    let work = bench_dir().join(format!("scale-{n}-store"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let store = work.join("zoo.peftdb");

    // Ingestion against dd: rounds of (dd, dd direct, ingest), each after the disk settled, the zoo read
    // into the page cache before each ingestion; medians, and each round's ratio.
    let rounds: usize = if smoke {
        1
    } else {
        std::env::var("PEFTDB_SCALE_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
    };
    let (mut dds, mut dd_directs, mut ingests, mut ingest_rss) = (vec![], vec![], vec![], 0);
    for _ in 0..rounds {
        let _ = std::fs::remove_file(&store);
        settle(smoke);
        dds.push(dd_mb_s(adapter_bytes, false));
        settle(smoke);
        dd_directs.push(dd_mb_s(adapter_bytes, true));
        settle(smoke);
        timed(Command::new(PEFTDB).arg("--db").arg(&store).arg("init"));
        warm(&zoo);
        let (s, rss, _) = timed(
            Command::new(PEFTDB)
                .arg("--db")
                .arg(&store)
                .arg("ingest")
                .arg(&zoo),
        );
        ingests.push(s);
        ingest_rss = ingest_rss.max(rss);
    }
    let round_ratios: Vec<String> = ingests
        .iter()
        .zip(&dds)
        .map(|(s, dd)| format!("{:.2}", adapter_bytes as f64 / 1e6 / s / dd))
        .collect();
    let dd = median(dds.clone());
    let dd_direct = median(dd_directs.clone());
    let ingest_s = median(ingests.clone());
    let ingest_mb_s = adapter_bytes as f64 / 1e6 / ingest_s;
    let after_ingest = store_bytes(&store);
    let len_after_ingest = file_len(&store);

    // Cold queries (the warm-up writes any derived files; the footprint is taken after it).
    let npy = work.join("embeddings.npy");
    if py.is_some() {
        write_npy(&store, &npy);
    }
    settle(smoke);
    let q10k = cold_queries(&store, n, py.as_deref().map(|p| (npy.as_path(), p)));
    let after_query = store_bytes(&store);
    let _ = std::fs::remove_file(&npy);

    // rm half, compact.
    let ids: Vec<String> = (1..=n as u64)
        .filter(|i| i % 2 == 0)
        .map(|i| i.to_string())
        .collect();
    let kept_bytes: u64 = (0..n)
        .filter(|i| (i + 1) % 2 == 1)
        .map(|i| dir_bytes(&zoo.join(format!("task-{i:03}"))))
        .sum();
    for chunk in ids.chunks(2000) {
        timed(
            Command::new(PEFTDB)
                .arg("--db")
                .arg(&store)
                .arg("rm")
                .args(chunk),
        );
    }
    let after_rm = store_bytes(&store);
    let (compact_s, _, _) = timed(Command::new(PEFTDB).arg("--db").arg(&store).arg("compact"));
    let after_compact = store_bytes(&store);
    let len_after_compact = file_len(&store);

    let q100k = (!smoke && std::env::var("PEFTDB_SCALE_100K").is_ok()).then(|| {
        let s = store_100k();
        let npy = bench_dir().join("scale-100k/embeddings.npy");
        if py.is_some() && !npy.exists() {
            write_npy(&s, &npy);
        }
        // Generating the store and its .npy writes about 15 GB: let the write-back finish first, or
        // the queries time the disk flushing it (session 26: 103.6 ms median without this wait, 60-70
        // ms run alone a minute later).
        settle(smoke);
        cold_queries(&s, 100_000, py.as_deref().map(|p| (npy.as_path(), p)))
    });

    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "## {n} MiniLM-shaped LoRA adapters ({:.2} GB of adapter files)",
        gb(adapter_bytes)
    );
    println!("| measure | peftdb | reference (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| ingest (`peftdb ingest`, whole command; median of {rounds}) | {ingest_mb_s:.0} MB/s, peak RSS {:.0} MB | `dd bs=1M conv=fdatasync`: {dd:.0} MB/s (median) | {:.2}x of dd (rounds: {}) |",
        ingest_rss as f64 / 1024.0,
        ingest_mb_s / dd,
        round_ratios.join(", ")
    );
    println!(
        "| ingest against the disk's direct-write bandwidth | {ingest_mb_s:.0} MB/s | `dd bs=1M oflag=direct conv=fdatasync`: {dd_direct:.0} MB/s (median) | {:.2}x |",
        ingest_mb_s / dd_direct
    );
    println!(
        "| disk after ingest | {:.2} GB | adapter files: {:.2} GB | {:.3}x |",
        gb(after_ingest),
        gb(adapter_bytes),
        after_ingest as f64 / adapter_bytes as f64
    );
    println!(
        "| store file length after ingest (redb grows by regions; the tail is a hole) | {:.2} GB | adapter files: {:.2} GB | {:.3}x |",
        gb(len_after_ingest),
        gb(adapter_bytes),
        len_after_ingest as f64 / adapter_bytes as f64
    );
    println!(
        "| disk after the first queries (index files) | {:.2} GB | adapter files: {:.2} GB | {:.3}x |",
        gb(after_query),
        gb(adapter_bytes),
        after_query as f64 / adapter_bytes as f64
    );
    println!(
        "| disk after `rm` of half, before compact | {:.2} GB | kept adapters' files: {:.2} GB | {:.3}x |",
        gb(after_rm),
        gb(kept_bytes),
        after_rm as f64 / kept_bytes as f64
    );
    println!(
        "| disk after `peftdb compact` ({compact_s:.1} s) | {:.2} GB | kept adapters' files: {:.2} GB | {:.3}x |",
        gb(after_compact),
        gb(kept_bytes),
        after_compact as f64 / kept_bytes as f64
    );
    println!(
        "| store file length after compact | {:.2} GB | kept adapters' files: {:.2} GB | {:.3}x |",
        gb(len_after_compact),
        gb(kept_bytes),
        len_after_compact as f64 / kept_bytes as f64
    );
    let qrow = |label: &str, q: &ColdQuery| {
        let np = q
            .numpy_ms
            .map(|ms| {
                format!(
                    "numpy brute force over a .npy: {ms:.0} ms | {:.1}x faster",
                    ms / q.median_ms
                )
            })
            .unwrap_or_else(|| "numpy: not run | -".into());
        println!(
            "| cold `nearest -k 10`, {label} | {:.1} ms median, peak RSS {:.0} MB | {np} |",
            q.median_ms, q.peak_rss_mb
        );
    };
    qrow(&format!("{n} x 12,288-d"), &q10k);
    if let Some(q) = &q100k {
        qrow("100,000 x 12,288-d", q);
    }
    let json = serde_json::json!({
        "n": n, "adapter_bytes": adapter_bytes, "ingest_s": ingest_s, "ingest_mb_s": ingest_mb_s,
        "dd_mb_s": dd, "dd_direct_mb_s": dd_direct, "rounds": {"dd_mb_s": dds, "dd_direct_mb_s": dd_directs, "ingest_s": ingests},
        "after_ingest": after_ingest, "after_query": after_query, "kept_bytes": kept_bytes,
        "after_rm": after_rm, "after_compact": after_compact,
        "file_len_after_ingest": len_after_ingest, "file_len_after_compact": len_after_compact, "compact_s": compact_s,
        "cold_query_ms": q10k.median_ms, "cold_query_rss_mb": q10k.peak_rss_mb, "numpy_ms": q10k.numpy_ms,
        "cold_query_100k_ms": q100k.as_ref().map(|q| q.median_ms),
        "cold_query_100k_rss_mb": q100k.as_ref().map(|q| q.peak_rss_mb),
        "numpy_100k_ms": q100k.as_ref().and_then(|q| q.numpy_ms),
    });
    let name = if smoke {
        "scale-smoke.json"
    } else {
        "scale.json"
    };
    std::fs::write(bench_dir().join(name), format!("{json:#}\n")).unwrap();
}
