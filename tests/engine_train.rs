//! Training on a real task, determinism, and a finite-difference check of the adapter gradients.

mod common;

use candle_core::{DType, Device, Tensor};
use peftdb::engine::{init_adapter, train, MethodSpec, TrainConfig, TrainData, TrainOutcome};
use peftdb::engine::{BertModel, Engine, EngineOptions, MatmulPrecision, TextTokenizer};
use peftdb::engine::{ScoreOptions, TokenIds};
use peftdb::object::build_object;
use peftdb::object::{read_adapter, write_adapter, LightweightObject, MethodKind, ReadOptions};
use peftdb::task::{few_shot, Example, Task};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// The heavy tests take turns: candle's CPU thread pool spins while it waits, so two trainings at once on
/// 2 cores slow each other down far more than twice.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn engine(max_len: usize) -> Engine {
    engine_at(max_len, MatmulPrecision::F32)
}

fn engine_at(max_len: usize, matmul: MatmulPrecision) -> Engine {
    Engine::load_with(
        &common::model_dir(),
        &Device::Cpu,
        &EngineOptions {
            max_len,
            matmul,
            ..Default::default()
        },
    )
    .expect("model loads")
}

fn bbc() -> Task {
    Task::load(&common::task_dir("bbc_topic")).expect("task loads")
}

/// Train `kind` for 24 steps of 8 on 8 examples per class of bbc_topic (5 classes, chance 0.2,
/// majority 0.23 on test; texts truncated to 32 tokens) and check: test accuracy (on 126 test examples)
/// is clearly above chance, and the dev loss is lower than the bare model's (the training improved on
/// zero-shot scoring, not only kept it).
fn learns_bbc(kind: MethodKind) -> TrainOutcome {
    learns_bbc_at(kind, MatmulPrecision::F32)
}

fn learns_bbc_at(kind: MethodKind, matmul: MatmulPrecision) -> TrainOutcome {
    let _turn = heavy();
    let engine = engine_at(32, matmul);
    let task = bbc();
    let train_ex = few_shot(&task.train, task.labels.len(), 8, 0).expect("sample");
    let dev: Vec<_> = task.dev.iter().step_by(5).cloned().collect(); // 41
    let test: Vec<_> = task.test.iter().step_by(4).cloned().collect(); // 126
    let labels = task.label_texts();
    let mut cfg = TrainConfig::new(kind);
    cfg.max_steps = Some(24);
    cfg.eval_every = 12;
    cfg.patience = None;
    cfg.seed = 1;
    let out = train(
        &engine,
        &TrainData {
            label_texts: &labels,
            train: &train_ex,
            dev: &dev,
            test: None,
        },
        &cfg,
        &mut |_| {},
    )
    .expect("trains");
    let lab = engine.tokenize(&labels).expect("tok");
    let (dev_ids, dev_t) = tokenized(&engine, &dev);
    let zero = engine
        .score(None, &lab, &dev_ids, &ScoreOptions::default())
        .expect("score")
        .cross_entropy(&dev_t);
    let best = engine.prepare(&out.best.object).expect("prepare");
    let (test_ids, test_t) = tokenized(&engine, &test);
    let acc = engine
        .score(Some(&best), &lab, &test_ids, &ScoreOptions::default())
        .expect("score")
        .accuracy(&test_t);
    let chance = 1.0 / labels.len() as f64;
    eprintln!(
        "{kind} ({} products): test accuracy {acc:.3} (chance {chance:.2}, margin {:.3}); dev loss zero-shot {zero:.4} -> {:?}",
        matmul.as_str(),
        acc - chance,
        out.history.iter().map(|h| h.dev_loss).collect::<Vec<_>>()
    );
    assert!(
        acc >= chance + 0.4,
        "{kind}: test accuracy {acc} not clearly above chance {chance}"
    );
    let best_loss = out
        .history
        .iter()
        .map(|h| h.dev_loss)
        .fold(f64::INFINITY, f64::min);
    assert!(
        best_loss < zero,
        "{kind}: dev loss {best_loss} did not improve on zero-shot {zero}"
    );
    // The trained adapter is a valid PEFT object that round-trips and scores the same after reload.
    let d = tempfile::tempdir().expect("tempdir");
    write_adapter(&out.best.object, &d.path().join("best")).expect("writes");
    let back = read_adapter(&d.path().join("best"), &ReadOptions::default()).expect("reads");
    assert_eq!(back.tensors, out.best.object.tensors);
    assert_eq!(back.method.kind(), kind);
    out
}

#[test]
fn lora_learns_bbc_topic() {
    let out = learns_bbc(MethodKind::Lora);
    assert!(out.early.step == 12 && out.best.step >= 12);
}

/// Training with the frozen products in bf16 (`--matmul bf16`) learns as well: the same bounds, and the
/// forward and backward passes both go through the bf16 kernel (README "Performance" has both runs'
/// accuracies).
#[test]
fn lora_learns_bbc_topic_with_bf16_products() {
    let out = learns_bbc_at(MethodKind::Lora, MatmulPrecision::Bf16);
    assert!(out.early.step == 12 && out.best.step >= 12);
}

#[test]
fn bitfit_learns_bbc_topic() {
    learns_bbc(MethodKind::Bitfit);
}

/// The examples' token ids and their labels.
fn tokenized(engine: &Engine, examples: &[Example]) -> (Vec<TokenIds>, Vec<usize>) {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let ids = engine.tokenize(&texts).expect("tok");
    (ids, examples.iter().map(|e| e.label).collect())
}

fn tiny_run(engine: &Engine, kind: MethodKind, seed: u64) -> LightweightObject {
    let task = Task::load(&common::task_dir("movie_sentiment")).expect("task");
    let train_ex = few_shot(&task.train, 2, 4, 3).expect("sample");
    let dev: Vec<_> = task.dev[..8].to_vec();
    let labels = task.label_texts();
    let mut cfg = TrainConfig::new(kind);
    cfg.max_steps = Some(3);
    cfg.batch_size = 4;
    cfg.eval_every = 3;
    cfg.seed = seed;
    train_quietly(engine, &labels, &train_ex, &dev, &cfg)
        .best
        .object
}

/// `train` without a test split or progress reports.
fn train_quietly(
    engine: &Engine,
    labels: &[String],
    train_ex: &[Example],
    dev: &[Example],
    cfg: &TrainConfig,
) -> TrainOutcome {
    train(
        engine,
        &TrainData {
            label_texts: labels,
            train: train_ex,
            dev,
            test: None,
        },
        cfg,
        &mut |_| {},
    )
    .expect("trains")
}

#[test]
fn training_is_bit_identical_for_a_seed() {
    let _turn = heavy();
    let engine = engine(24);
    for kind in [MethodKind::Lora, MethodKind::Adapter] {
        let a = tiny_run(&engine, kind, 5);
        let b = tiny_run(&engine, kind, 5);
        let c = tiny_run(&engine, kind, 6);
        assert_eq!(a.tensors, b.tensors, "{kind}: same seed, different adapter");
        assert_ne!(a.tensors, c.tensors, "{kind}: the seed has no effect");
    }
    // Bit-identical at bf16 precision too, and not the f32 result.
    let half = engine_at(24, MatmulPrecision::Bf16);
    let a = tiny_run(&half, MethodKind::Lora, 5);
    assert_eq!(
        a.tensors,
        tiny_run(&half, MethodKind::Lora, 5).tensors,
        "bf16: same seed, different adapter"
    );
    assert_ne!(
        a.tensors,
        tiny_run(&engine, MethodKind::Lora, 5).tensors,
        "bf16 products changed nothing"
    );
}

/// A tiny random BERT (2 layers, hidden 8) with the real tokenizer, for finite differences.
fn tiny_engine() -> Engine {
    let d = tempfile::tempdir().expect("tempdir");
    let (v, h, f, l, p) = (40usize, 8usize, 16usize, 2usize, 32usize);
    let cfg = serde_json::json!({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": v, "hidden_size": h,
        "num_hidden_layers": l, "num_attention_heads": 2, "intermediate_size": f,
        "hidden_act": "gelu", "max_position_embeddings": p, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
    });
    std::fs::write(d.path().join("config.json"), cfg.to_string()).expect("write");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let dev = Device::Cpu;
    let mut rnd = |shape: &[usize], scale: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(vals, shape, &dev).expect("tensor")
    };
    let mut w: HashMap<String, Tensor> = HashMap::new();
    w.insert(
        "embeddings.word_embeddings.weight".into(),
        rnd(&[v, h], 1.0),
    );
    w.insert(
        "embeddings.position_embeddings.weight".into(),
        rnd(&[p, h], 0.5),
    );
    w.insert(
        "embeddings.token_type_embeddings.weight".into(),
        rnd(&[2, h], 0.5),
    );
    w.insert(
        "embeddings.LayerNorm.weight".into(),
        (rnd(&[h], 0.2) + 1.0).expect("add"),
    );
    w.insert("embeddings.LayerNorm.bias".into(), rnd(&[h], 0.2));
    for i in 0..l {
        for (slot, o, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", f, h),
            ("output.dense", h, f),
        ] {
            w.insert(
                format!("encoder.layer.{i}.{slot}.weight"),
                rnd(&[o, inp], 0.6),
            );
            w.insert(format!("encoder.layer.{i}.{slot}.bias"), rnd(&[o], 0.2));
        }
        for ln in ["attention.output.LayerNorm", "output.LayerNorm"] {
            w.insert(
                format!("encoder.layer.{i}.{ln}.weight"),
                (rnd(&[h], 0.2) + 1.0).expect("add"),
            );
            w.insert(format!("encoder.layer.{i}.{ln}.bias"), rnd(&[h], 0.2));
        }
    }
    candle_core::safetensors::save(&w, d.path().join("model.safetensors")).expect("save");
    let model = BertModel::load(d.path(), &dev).expect("tiny model loads");
    let tokenizer = TextTokenizer::from_file(&common::model_dir().join("tokenizer.json"), 16)
        .expect("tokenizer");
    Engine {
        model: peftdb::engine::Backbone::Encoder(model),
        tokenizer,
        device: dev,
        model_dir: d.path().to_path_buf(),
        prompt: None,
    }
}

/// Perturb every value of an object a little (LoRA B starts at zero, bottleneck up too: make every
/// parameter's gradient non-trivial).
fn perturb(obj: &mut LightweightObject, rng: &mut rand_chacha::ChaCha8Rng) {
    for t in &mut obj.tensors {
        let vals: Vec<f32> = t
            .to_f32()
            .iter()
            .map(|v| v + rng.random_range(-0.3f32..0.3))
            .collect();
        *t = peftdb::object::Tensor::from_f32(t.name.clone(), t.shape.clone(), &vals);
    }
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let _turn = heavy();
    let engine = tiny_engine();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    // Token ids below the tiny vocabulary (40); [CLS]=2-like structure is irrelevant here.
    let inputs: Vec<Vec<u32>> = vec![vec![1, 5, 9, 14, 3], vec![1, 7, 22, 3], vec![1, 30, 3]];
    let labels: Vec<Vec<u32>> = vec![vec![1, 11, 3], vec![1, 17, 18, 3], vec![1, 25, 3]];
    let targets = vec![0usize, 2, 1];
    let opts = ScoreOptions {
        temperature: 0.5,
        batch_size: 8,
    };
    for kind in MethodKind::ALL {
        let mut spec = MethodSpec::new(kind);
        spec.num_virtual_tokens = 3;
        spec.r = 2;
        spec.bottleneck_size = Some(3);
        spec.non_linearity = "tanh".into(); // smooth, so finite differences are exact to O(eps^2)
        if kind == MethodKind::Lora {
            spec.targets = Some(vec!["query".into(), "value".into(), "output.dense".into()]);
        }
        let (m, ts) = init_adapter(&engine, &spec, &mut rng).expect("init");
        let mut obj = build_object(m, "tiny", ts);
        perturb(&mut obj, &mut rng);
        let g = engine
            .ce_gradients(&obj, &labels, &inputs, &targets, &opts)
            .expect("gradients");
        let loss_of = |o: &LightweightObject| -> f64 {
            let set = engine.prepare(o).expect("prepare");
            engine
                .score(Some(&set), &labels, &inputs, &opts)
                .expect("score")
                .cross_entropy(&targets)
        };
        let base = loss_of(&obj);
        assert!(
            (base - g.loss as f64).abs() < 1e-4,
            "{kind}: loss {base} vs {}",
            g.loss
        );
        let mut checked = 0;
        let mut worst = 0f64;
        for (ti, (name, grad)) in g.grads.iter().enumerate() {
            // A few coordinates per tensor, at most 6 tensors per method.
            if ti >= 6 {
                break;
            }
            for _ in 0..3 {
                let j = rng.random_range(0..grad.len());
                let eps = 1e-2f32;
                let mut plus = obj.clone();
                let mut minus = obj.clone();
                for (o, s) in [(&mut plus, eps), (&mut minus, -eps)] {
                    let mut vals = o.tensors[ti].to_f32();
                    vals[j] += s;
                    o.tensors[ti] = peftdb::object::Tensor::from_f32(
                        name.clone(),
                        o.tensors[ti].shape.clone(),
                        &vals,
                    );
                }
                let fd = (loss_of(&plus) - loss_of(&minus)) / (2.0 * eps as f64);
                let an = grad[j] as f64;
                let err = (fd - an).abs() / (1e-2 + fd.abs().max(an.abs()));
                worst = worst.max(err);
                assert!(
                    err < 0.05,
                    "{kind}: d loss / d {name}[{j}]: candle {an:.6}, finite difference {fd:.6}"
                );
                checked += 1;
            }
        }
        let norm = g.norm();
        eprintln!(
            "{kind}: {checked} coordinates, worst relative error {worst:.2e}, grad norm {norm:.3}"
        );
        assert!(norm > 1e-4, "{kind}: all-zero gradient");
        let _ = DType::F32;
    }
}

/// `keep_start`: the starting adapter is evaluated before the first step and kept as a checkpoint, so a
/// good initialization (the demo zoo's movie_sentiment LoRA, on its own task) that a destructive learning
/// rate wrecks is handed back unchanged; without it, training hands back one of the wrecked checkpoints.
#[test]
fn keep_start_hands_back_a_good_init_that_training_wrecks() {
    let _turn = heavy();
    let engine = engine(32);
    let task = Task::load(&common::task_dir("movie_sentiment")).expect("task loads");
    let init = read_adapter(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/demo-zoo/movie_sentiment/lora"),
        &ReadOptions::default(),
    )
    .expect("the demo zoo's adapter reads");
    let train_ex = few_shot(&task.train, task.labels.len(), 8, 0).expect("sample");
    let dev: Vec<_> = task.dev.iter().step_by(4).cloned().collect(); // 50
    let labels = task.label_texts();
    let run = |keep_start: bool| {
        let mut cfg = TrainConfig::new(MethodKind::Lora);
        cfg.init = Some(init.clone());
        cfg.lr = Some(0.5); // destructive on purpose
        cfg.max_steps = Some(4);
        cfg.eval_every = 2;
        cfg.patience = None;
        cfg.seed = 3;
        cfg.keep_start = keep_start;
        train_quietly(&engine, &labels, &train_ex, &dev, &cfg)
    };
    // The start's own dev accuracy, scored directly.
    let lab = engine.tokenize(&labels).expect("tok");
    let (dev_ids, dev_t) = tokenized(&engine, &dev);
    let start = engine
        .score(
            Some(&engine.prepare(&init).expect("prepare")),
            &lab,
            &dev_ids,
            &ScoreOptions::default(),
        )
        .expect("score")
        .accuracy(&dev_t);

    let kept = run(true);
    assert_eq!(
        kept.history.iter().map(|h| h.step).collect::<Vec<_>>(),
        [0, 2, 4]
    );
    assert!((kept.history[0].dev_accuracy - start).abs() < 1e-12);
    assert!(kept.history[0].train_loss.is_finite() && kept.history[0].train_loss > 0.0);
    let trained_best = kept.history[1..]
        .iter()
        .map(|h| h.dev_accuracy)
        .fold(f64::NEG_INFINITY, f64::max);
    eprintln!("start {start:.3}, trained checkpoints {trained_best:.3}");
    assert!(
        trained_best < start,
        "the destructive rate did not hurt ({trained_best} >= {start}): the test shows nothing"
    );
    assert_eq!(kept.best.step, 0);
    assert_eq!(kept.best.dev_accuracy, start);
    // The start itself (the demo zoo stores f16; the checkpoint holds the same values).
    assert_eq!(kept.best.object.tensors.len(), init.tensors.len());
    for (a, b) in kept.best.object.tensors.iter().zip(&init.tensors) {
        assert_eq!((&a.name, a.to_f32()), (&b.name, b.to_f32()));
    }

    let plain = run(false);
    assert_eq!(
        plain.history.iter().map(|h| h.step).collect::<Vec<_>>(),
        [2, 4]
    );
    assert!(plain.best.step > 0 && plain.best.dev_accuracy < start);
    // The trained checkpoints are the same with and without the extra evaluation.
    assert_eq!(plain.history[..], kept.history[1..]);
}
