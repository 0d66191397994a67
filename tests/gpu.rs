//! The CUDA path on a real GPU: every PEFT fixture in tests/fixtures/peft gives the same mean-pooled
//! embeddings on CUDA as on the CPU (to 1e-4, and the PEFT reference where there is one), stacked LoRA
//! label scoring (`Engine::score_many`) gives the same probabilities, and the rerank throughput of stacked
//! candidates is measured on both devices, the ratio printed.
//!
//! Runs only where a CUDA device is usable: a build with `--features cuda` on a machine where
//! `parse_device("cuda")` opens a device (`$PEFTDB_GPU_DEVICE`, default `cuda`). Anywhere else each test
//! prints why it skipped and returns. On a GPU machine:
//!
//! ```text
//! eval "$(bash scripts/cuda-toolkit.sh)"
//! cargo test --release --features cuda --test gpu -- --nocapture
//! ```

mod common;

use candle_core::Device;
use peftdb::engine::ScoreOptions;
use peftdb::engine::{parse_device, Engine, EngineOptions};
use peftdb::object::{read_adapter, LightweightObject, ReadOptions, Tensor};
use peftdb::task::{few_shot, Task};
use std::time::Instant;

const TOL: f32 = 1e-4;

/// The CUDA device, or `None` after saying why the test is skipped.
fn cuda(test: &str) -> Option<Device> {
    let spec = std::env::var("PEFTDB_GPU_DEVICE").unwrap_or_else(|_| "cuda".to_string());
    match parse_device(&spec) {
        Ok(d) if d.is_cuda() => Some(d),
        Ok(d) => {
            eprintln!("SKIPPED {test}: PEFTDB_GPU_DEVICE={spec} is {d:?}, not a CUDA device");
            None
        }
        Err(_) if !cfg!(feature = "cuda") => {
            eprintln!(
                "SKIPPED {test}: built without the cuda feature; on a GPU machine run \
                 `eval \"$(bash scripts/cuda-toolkit.sh)\"; cargo test --release --features cuda --test gpu`"
            );
            None
        }
        Err(e) => {
            eprintln!("SKIPPED {test}: no usable CUDA device here: {e}");
            None
        }
    }
}

fn engines(gpu: &Device) -> (Engine, Engine) {
    let opts = EngineOptions {
        max_len: 64,
        ..Default::default()
    };
    let cpu = Engine::load_with(&common::model_dir(), &Device::Cpu, &opts).expect("model on cpu");
    let gpu = Engine::load_with(&common::model_dir(), gpu, &opts).expect("model on cuda");
    (cpu, gpu)
}

fn fixture(name: &str) -> LightweightObject {
    read_adapter(&common::fixture(name), &ReadOptions::default()).expect("fixture reads")
}

fn max_diff<'a>(a: impl IntoIterator<Item = &'a f32>, b: impl IntoIterator<Item = &'a f32>) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn fixtures_on_cuda_match_cpu() {
    let Some(gpu) = cuda("fixtures_on_cuda_match_cpu") else {
        return;
    };
    let (cpu, gpu) = engines(&gpu);
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::fixture("reference_outputs.json")).expect("reference_outputs.json"),
    )
    .expect("json");
    let text = reference["input"]["text"].as_str().expect("text");
    // The reference text and a longer one in one batch: padding and masks are exercised too.
    let texts = [
        text,
        "a considerably longer second sentence, so that the first row of the batch is padded",
    ];
    let mut failures = Vec::new();
    for name in std::iter::once("base").chain(common::FIXTURES) {
        let obj = (name != "base").then(|| fixture(name));
        let set_c = obj.as_ref().map(|o| cpu.prepare(o).expect("fits"));
        let set_g = obj.as_ref().map(|o| gpu.prepare(o).expect("fits"));
        let on_cpu = cpu.embed_texts(&texts, set_c.as_ref(), 2).expect("cpu");
        let on_gpu = gpu.embed_texts(&texts, set_g.as_ref(), 2).expect("cuda");
        let err = max_diff(on_cpu.iter().flatten(), on_gpu.iter().flatten());
        let finite = on_gpu.iter().flatten().all(|v| v.is_finite());
        // Against PEFT too, where reference_outputs.json has the fixture (the first 8 values).
        let peft = reference[name]["mean_pooled_first8"].as_array().map(|v| {
            let want: Vec<f32> = v
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect();
            max_diff(&want, &on_gpu[0][..8])
        });
        let vs_peft = peft.map_or_else(|| "no reference".to_string(), |p| format!("{p:.2e}"));
        eprintln!("{name}: cuda vs cpu max abs diff {err:.2e}; vs PEFT {vs_peft}");
        if err > TOL || !finite || peft.is_some_and(|p| p > TOL) {
            failures.push(format!(
                "{name}: cuda vs cpu {err}, vs PEFT {peft:?}, finite {finite}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "CUDA differs from the CPU:\n{}",
        failures.join("\n")
    );
}

#[test]
fn stacked_rerank_on_cuda_matches_cpu_and_is_timed() {
    let Some(gpu) = cuda("stacked_rerank_on_cuda_matches_cpu_and_is_timed") else {
        return;
    };
    let (cpu, gpu) = engines(&gpu);
    let task = Task::load(&common::task_dir("movie_sentiment")).expect("task");
    let examples = few_shot(&task.dev, task.labels.len(), 16, 0).expect("episode");
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let labels = task.label_texts();
    // The r=8 LoRA fixture and rescaled copies (one layout, so they stack), as in benches/rerank.rs.
    let base = fixture("lora_r8_qv");
    let cands: Vec<LightweightObject> = [1.0f32, -1.5, 0.5, 2.0]
        .iter()
        .map(|&f| {
            let mut o = base.clone();
            for t in o.tensors.iter_mut().filter(|t| t.name.contains("lora_B")) {
                let v: Vec<f32> = t.to_f32().into_iter().map(|x| x * f).collect();
                *t = Tensor::from_f32(t.name.clone(), t.shape.clone(), &v);
            }
            o
        })
        .collect();
    let so = ScoreOptions::default();
    let stack = cands.len();
    let ce = (cands.len() * texts.len()) as f64;
    // Candidate-examples per second of `reps` stacked passes (after one warm-up pass), and the scores.
    let run = |engine: &Engine, reps: usize| {
        let sets: Vec<_> = cands
            .iter()
            .map(|o| engine.prepare(o).expect("fits"))
            .collect();
        let refs: Vec<_> = sets.iter().collect();
        let lab = engine.tokenize(&labels).expect("labels");
        let ids = engine.tokenize(&texts).expect("texts");
        let scores = engine
            .score_many(&refs, &lab, &ids, &so, stack)
            .expect("score_many");
        let t = Instant::now();
        for _ in 0..reps {
            engine
                .score_many(&refs, &lab, &ids, &so, stack)
                .expect("score_many");
        }
        (ce * reps as f64 / t.elapsed().as_secs_f64(), scores)
    };
    let (cpu_rate, cpu_scores) = run(&cpu, 1);
    let (gpu_rate, gpu_scores) = run(&gpu, 5);
    println!(
        "rerank, {} LoRA candidates x {} movie_sentiment examples stacked in one pass (Engine::score_many): \
         cpu {cpu_rate:.1} candidate-examples/s, cuda {gpu_rate:.1} candidate-examples/s; cuda/cpu {:.1}x",
        cands.len(),
        texts.len(),
        gpu_rate / cpu_rate
    );
    for (i, (c, g)) in cpu_scores.iter().zip(&gpu_scores).enumerate() {
        let err = max_diff(c.probs.iter().flatten(), g.probs.iter().flatten());
        assert!(
            err <= TOL,
            "candidate {i}: label probabilities differ by {err} on CUDA"
        );
    }
}
