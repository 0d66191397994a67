//! Throughput of the indicator stage (candidate-examples per second) next to the engine's plain forward
//! throughput (examples per second) on the same examples, measured in one run.
//!
//! Needs the test model (`scripts/fetch-model.sh`, or `PEFTDB_MODEL_DIR`) and the task data (../shared/tasks or data/tasks); skips with a
//! message otherwise. `cargo bench --bench rerank`.

use criterion::{criterion_group, criterion_main, Criterion};
use peftdb::engine::ScoreOptions;
use peftdb::engine::{Engine, EngineOptions};
use peftdb::object::{read_adapter, LightweightObject, ReadOptions};
use peftdb::rerank::{rerank, RerankInput, RerankOptions};
use peftdb::task::{few_shot, Task};
use std::path::PathBuf;
use std::time::Instant;

fn setup() -> Option<(Engine, Task, Vec<LightweightObject>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("PEFTDB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/all-MiniLM-L6-v2"));
    // The task data: ../shared/tasks beside the repository, else data/tasks (scripts/fetch-tasks.sh).
    let tasks = [root.join("../shared/tasks"), root.join("data/tasks")]
        .into_iter()
        .find(|d| d.join("movie_sentiment/task.json").is_file());
    let (true, Some(tasks)) = (model.join("model.safetensors").is_file(), tasks) else {
        eprintln!(
            "rerank bench skipped: no model at {} (run scripts/fetch-model.sh) or no task data (scripts/fetch-tasks.sh)",
            model.display()
        );
        return None;
    };
    let engine = Engine::load_with(
        &model,
        &candle_core::Device::Cpu,
        &EngineOptions {
            max_len: 64,
            ..Default::default()
        },
    )
    .ok()?;
    let task = Task::load(&tasks.join("movie_sentiment")).ok()?;
    let cands = ["lora_r8_qv", "lora_rslora", "ia3", "prefix_20"]
        .iter()
        .map(|n| {
            read_adapter(
                &root.join("tests/fixtures/peft").join(n),
                &ReadOptions::default(),
            )
            .unwrap()
        })
        .collect();
    Some((engine, task, cands))
}

fn bench(c: &mut Criterion) {
    let Some((engine, task, cands)) = setup() else {
        return;
    };
    let examples = few_shot(&task.dev, task.labels.len(), 16, 0).unwrap();
    let labels = task.label_texts();
    let refs: Vec<&LightweightObject> = cands.iter().collect();
    let input = RerankInput {
        engine: &engine,
        label_texts: &labels,
        examples: &examples,
        reference: Some(&cands[0]),
        weights: None,
    };
    let opts = RerankOptions::default(); // Loss, KL, EL2N, cosine of logits and labels
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let forward = || {
        engine
            .label_probs(None, &labels, &texts, &ScoreOptions::default())
            .unwrap()
    };
    let stage = || rerank(&input, &refs, &opts, &mut |_, _| {}).unwrap();

    let mut g = c.benchmark_group("rerank");
    g.sample_size(10);
    g.bench_function("plain forward (examples)", |b| b.iter(forward));
    g.bench_function("indicator stage (4 candidates)", |b| b.iter(stage));
    g.finish();

    // One direct side-by-side measurement, as ratios (only under `cargo bench`, not `cargo test`).
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let reps = 3;
    let t = Instant::now();
    for _ in 0..reps {
        forward();
    }
    let fwd = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        stage();
    }
    let st = t.elapsed().as_secs_f64() / reps as f64;
    let n = examples.len() as f64;
    let k = refs.len() as f64;
    println!(
        "plain forward: {:.1} examples/s; indicator stage: {:.1} candidate-examples/s ({} candidates x {} examples, KL reference included); ratio {:.2}",
        n / fwd,
        k * n / st,
        k,
        n,
        (k * n / st) / (n / fwd)
    );

    // Several LoRA candidates in one forward pass vs one pass each: the real r=8 fixture and three
    // rescaled copies (one layout), scored on the same examples.
    let base = &cands[0];
    let lora: Vec<LightweightObject> = [1.0f32, -1.5, 0.5, 2.0]
        .iter()
        .map(|&f| {
            let mut o = base.clone();
            for t in o.tensors.iter_mut().filter(|t| t.name.contains("lora_B")) {
                let v: Vec<f32> = t.to_f32().into_iter().map(|x| x * f).collect();
                *t = peftdb::object::Tensor::from_f32(t.name.clone(), t.shape.clone(), &v);
            }
            o
        })
        .collect();
    let sets: Vec<_> = lora.iter().map(|o| engine.prepare(o).unwrap()).collect();
    let set_refs: Vec<_> = sets.iter().collect();
    let lab_ids = engine.tokenize(&labels).unwrap();
    let in_ids = engine.tokenize(&texts).unwrap();
    let so = ScoreOptions::default();
    let timed = |stack: usize| {
        let t = Instant::now();
        for _ in 0..reps {
            engine
                .score_many(&set_refs, &lab_ids, &in_ids, &so, stack)
                .unwrap();
        }
        t.elapsed().as_secs_f64() / reps as f64
    };
    let one = timed(1);
    let four = timed(4);
    let ce = set_refs.len() as f64 * n;
    println!(
        "4 LoRA candidates x {} examples: one pass each {:.1} candidate-examples/s; stacked 4 per pass {:.1} candidate-examples/s; ratio {:.2}",
        n,
        ce / one,
        ce / four,
        one / four
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
