//! The generic path: with the CPU kernels off (`engine::set_cpu_kernels(false)`), the model runs candle's
//! generic ops, the code every other device (CUDA) runs. Checked here on the CPU, so the GPU path's
//! forward pass and training are tested on every machine, not only where a GPU is lent:
//! - every PEFT fixture's mean-pooled output matches PEFT's reference (1e-4) and the kernel path's;
//! - stacked LoRA label scoring matches the kernel path;
//! - a short LoRA training follows the kernel path's losses and ends with nearly the same adapter.
//!
//! Its own test binary, with one test: the switch is per process.

mod common;

use candle_core::Device;
use peftdb::engine::{
    set_cpu_kernels, train, Engine, EngineOptions, ScoreOptions, TrainConfig, TrainData,
};
use peftdb::object::{read_adapter, LightweightObject, MethodKind, ReadOptions};
use peftdb::task::{few_shot, Task};

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// What each path computes: fixture embeddings, stacked scores, and a short training run.
struct Run {
    embeddings: Vec<(String, Vec<f32>)>,
    probs: Vec<Vec<f32>>,
    losses: Vec<f64>,
    trained: LightweightObject,
}

fn run(engine: &Engine, texts: &[&str], task: &Task) -> Run {
    let mut embeddings = Vec::new();
    for name in std::iter::once("base").chain(common::FIXTURES) {
        let obj = (name != "base").then(|| {
            read_adapter(&common::fixture(name), &ReadOptions::default()).expect("fixture")
        });
        let set = obj.as_ref().map(|o| engine.prepare(o).expect("fits"));
        let e = engine.embed_texts(texts, set.as_ref(), 2).expect("embeds");
        embeddings.push((name.to_string(), e.into_iter().flatten().collect()));
    }
    // Stacked LoRA scoring: the fixture and a rescaled copy in one pass.
    let lora = read_adapter(&common::fixture("lora_r8_qv"), &ReadOptions::default()).unwrap();
    let mut half = lora.clone();
    for t in half
        .tensors
        .iter_mut()
        .filter(|t| t.name.contains("lora_B"))
    {
        let v: Vec<f32> = t.to_f32().iter().map(|x| x * 0.5).collect();
        *t = peftdb::object::Tensor::from_f32(t.name.clone(), t.shape.clone(), &v);
    }
    let sets = [
        engine.prepare(&lora).unwrap(),
        engine.prepare(&half).unwrap(),
    ];
    let refs: Vec<_> = sets.iter().collect();
    let ex = few_shot(&task.dev, task.labels.len(), 4, 0).unwrap();
    let ex_texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
    let labels = engine.tokenize(&task.label_texts()).unwrap();
    let ids = engine.tokenize(&ex_texts).unwrap();
    let scores = engine
        .score_many(&refs, &labels, &ids, &ScoreOptions::default(), 2)
        .expect("stacked scores");
    let probs = scores
        .iter()
        .map(|s| s.probs.iter().flatten().copied().collect())
        .collect();
    // A short LoRA training (forward and backward through every layer).
    let train_ex = few_shot(&task.train, task.labels.len(), 4, 3).unwrap();
    let dev: Vec<_> = task.dev[..8].to_vec();
    let label_texts = task.label_texts();
    let mut cfg = TrainConfig::new(MethodKind::Lora);
    cfg.max_steps = Some(4);
    cfg.batch_size = 4;
    cfg.eval_every = 2;
    cfg.patience = None;
    cfg.seed = 7;
    let mut losses = Vec::new();
    let out = train(
        engine,
        &TrainData {
            label_texts: &label_texts,
            train: &train_ex,
            dev: &dev,
            test: None,
        },
        &cfg,
        &mut |p| {
            if let peftdb::engine::TrainProgress::Step { loss, .. } = p {
                losses.push(f64::from(*loss));
            }
        },
    )
    .expect("trains");
    Run {
        embeddings,
        probs,
        losses,
        trained: out.best.object,
    }
}

#[test]
fn the_generic_path_matches_peft_and_the_kernels() {
    let engine = Engine::load_with(
        &common::model_dir(),
        &Device::Cpu,
        &EngineOptions {
            max_len: 32,
            ..Default::default()
        },
    )
    .expect("model");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixture("reference_outputs.json")).unwrap())
            .unwrap();
    let text = reference["input"]["text"].as_str().unwrap();
    let texts = [
        text,
        "a second, longer sentence so that the first row of the batch is padded",
    ];
    let task = Task::load(&common::task_dir("movie_sentiment")).unwrap();

    let kernels = run(&engine, &texts, &task);
    set_cpu_kernels(false);
    let generic = run(&engine, &texts, &task);
    set_cpu_kernels(true);

    for ((name, g), (_, k)) in generic.embeddings.iter().zip(&kernels.embeddings) {
        let d = max_diff(g, k);
        assert!(
            d <= 1e-4,
            "{name}: generic path differs from the kernels by {d}"
        );
        if let Some(want) = reference[name.as_str()]["mean_pooled_first8"].as_array() {
            let want: Vec<f32> = want.iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let d = max_diff(&g[..8], &want);
            assert!(d <= 1e-4, "{name}: generic path differs from PEFT by {d}");
        }
    }
    for (g, k) in generic.probs.iter().zip(&kernels.probs) {
        let d = max_diff(g, k);
        assert!(d <= 1e-4, "stacked scores differ by {d}");
    }
    // Training: the same steps, losses within float noise of each other, nearly the same adapter.
    assert_eq!(generic.losses.len(), 4, "{:?}", generic.losses);
    assert_eq!(generic.losses.len(), kernels.losses.len());
    for (i, (g, k)) in generic.losses.iter().zip(&kernels.losses).enumerate() {
        assert!(g.is_finite(), "step {i}: loss {g}");
        assert!(
            (g - k).abs() <= 1e-3 * k.abs().max(1.0),
            "step {i}: loss {g} against {k}"
        );
    }
    assert_eq!(generic.trained.tensors.len(), kernels.trained.tensors.len());
    // Adam divides each gradient by its running RMS, so entries whose gradient is near zero can take
    // different steps on the two paths: compare whole tensors (relative L2), not single entries.
    let mut worst = 0f32;
    for (g, k) in generic.trained.tensors.iter().zip(&kernels.trained.tensors) {
        assert_eq!(g.name, k.name);
        let (gv, kv) = (g.to_f32(), k.to_f32());
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: Vec<f32> = gv.iter().zip(&kv).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(&kv).max(1e-12);
        worst = worst.max(rel);
        assert!(
            rel <= 0.01,
            "{}: trained weights differ by {rel} (relative L2)",
            g.name
        );
    }
    eprintln!(
        "trained adapters, generic path against kernels: worst relative L2 difference {worst:.2e}"
    );
    // The adapter moved: training did something on the generic path.
    let lora_b = generic
        .trained
        .tensors
        .iter()
        .find(|t| t.name.contains("lora_B"))
        .unwrap();
    assert!(lora_b.to_f32().iter().any(|v| *v != 0.0));
}
