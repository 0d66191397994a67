//! The rerank stage on the real model with real PEFT adapters and a real task.

mod common;

use peftdb::engine::{Engine, EngineError};
use peftdb::object::{read_adapter, LightweightObject, ReadOptions};
use peftdb::rerank::indicators;
use peftdb::rerank::Indicator;
use peftdb::rerank::{rerank, RerankError, RerankInput, RerankOptions};
use peftdb::task::{few_shot, Task};

fn fixture(name: &str) -> LightweightObject {
    read_adapter(&common::fixture(name), &ReadOptions::default()).unwrap()
}

#[test]
fn indicators_on_real_adapters_agree_with_direct_computation() {
    let engine = Engine::load(&common::model_dir(), &candle_core::Device::Cpu).unwrap();
    let task = Task::load(&common::task_dir("movie_sentiment")).unwrap();
    let examples = few_shot(&task.dev, task.labels.len(), 8, 1).unwrap();
    let labels = task.label_texts();
    let (a, b, c) = (
        fixture("lora_r8_qv"),
        fixture("lora_rslora"),
        fixture("ia3"),
    );
    let input = RerankInput {
        engine: &engine,
        label_texts: &labels,
        examples: &examples,
        reference: Some(&a),
        weights: None,
    };
    let opts = RerankOptions {
        indicators: vec![
            Indicator::Loss,
            Indicator::Kl,
            Indicator::El2n,
            Indicator::CosLogits,
            Indicator::Grand,
            Indicator::WeightCosine,
        ],
        ..Default::default()
    };
    // Weight cosine needs candidates shaped like the reference: score the LoRA r=8 one against itself.
    let out = rerank(&input, &[&a], &opts, &mut |_, _| {}).unwrap();
    let s = &out[0].scores;
    assert!(
        s["kl"].abs() < 1e-6,
        "KL of the reference against itself: {}",
        s["kl"]
    );
    assert!((s["weight-cosine"] - 1.0).abs() < 1e-6);
    assert!(
        (s["loss"] + out[0].cross_entropy).abs() < 1e-4,
        "Loss = -CE"
    );
    assert!(s["grand"] < 0.0);

    // Mixed methods scored together; KL against a reference of another method is fine, weight cosine not.
    let opts = RerankOptions {
        indicators: vec![
            Indicator::Loss,
            Indicator::LossCal,
            Indicator::Kl,
            Indicator::El2n,
            Indicator::CosLogits,
        ],
        ..Default::default()
    };
    let out = rerank(&input, &[&b, &c], &opts, &mut |_, _| {}).unwrap();
    for o in &out {
        // The fitted temperature can only raise the log-likelihood (scale 1 is among those searched),
        // and the per-example terms add up to the indicators.
        assert!(
            o.scores["loss-cal"] >= o.scores["loss"] - 1e-9,
            "{:?}",
            o.scores
        );
        let n = examples.len() as f64;
        for (ind, mean) in [
            (Indicator::Loss, true),
            (Indicator::LossCal, true),
            (Indicator::El2n, false),
            (Indicator::CosLogits, false),
        ] {
            let t: f64 = o.per_example.series(ind).unwrap().iter().sum();
            let want = o.scores[ind.as_str()];
            let got = if mean { t / n } else { t };
            assert!(
                (got - want).abs() < 1e-9,
                "{}: {got} vs {want}",
                ind.as_str()
            );
        }
    }
    // Direct computation from the engine's probabilities.
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let targets: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let set = engine.prepare(&c).unwrap();
    let p: Vec<f32> = engine
        .label_probs(Some(&set), &labels, &texts, &Default::default())
        .unwrap()
        .into_iter()
        .flatten()
        .collect();
    let s = &out[1].scores;
    assert!((s["el2n"] - indicators::el2n(&p, 2, &targets)).abs() < 1e-9);
    assert!((s["cos-logits"] - indicators::cosine_logits_labels(&p, 2, &targets)).abs() < 1e-9);
    for o in &out {
        assert!(o.scores.values().all(|v| v.is_finite()));
        assert!(o.scores["kl"] <= 0.0);
    }

    // Errors: no reference for KL; weight cosine across shapes; an adapter for another model.
    let no_ref = RerankInput {
        reference: None,
        weights: None,
        ..input
    };
    assert!(matches!(
        rerank(&no_ref, &[&b], &opts, &mut |_, _| {}),
        Err(RerankError::NeedsReference("kl"))
    ));
    let wc = RerankOptions {
        indicators: vec![Indicator::WeightCosine],
        ..Default::default()
    };
    let input = RerankInput {
        engine: &engine,
        label_texts: &labels,
        examples: &examples,
        reference: Some(&a),
        weights: None,
    };
    assert!(matches!(
        rerank(&input, &[&b], &wc, &mut |_, _| {}),
        Err(RerankError::WeightMismatch { index: 0, .. })
    ));
    let big = peftdb::synth::lora(
        &peftdb::synth::ModelShape::bert_base(),
        8,
        &["query"],
        peftdb::synth::Seeds {
            group: 1,
            task: 2,
            object: 3,
        },
    );
    let e = rerank(&input, &[&big], &opts, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(&e, RerankError::Candidate { index: 0, source } if matches!(**source, EngineError::AdapterShape { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("768"), "{e}");

    // Example weights: all ones are no weights; doubling class 1's examples scales exactly its terms;
    // a wrong count is refused with both numbers.
    let plain_opts = RerankOptions {
        indicators: vec![Indicator::Loss, Indicator::LossCal, Indicator::El2n],
        ..Default::default()
    };
    let plain = rerank(&input, &[&a], &plain_opts, &mut |_, _| {}).unwrap();
    let ones = vec![1.0; examples.len()];
    let with_ones = RerankInput {
        weights: Some(&ones),
        ..input
    };
    let same = rerank(&with_ones, &[&a], &plain_opts, &mut |_, _| {}).unwrap();
    for k in ["loss", "loss-cal", "el2n"] {
        assert!(
            (plain[0].scores[k] - same[0].scores[k]).abs() < 1e-12,
            "{k}"
        );
    }
    assert_eq!(plain[0].accuracy, same[0].accuracy);
    let w: Vec<f64> = examples
        .iter()
        .map(|e| if e.label == 1 { 1.5 } else { 0.5 })
        .collect();
    let weighted = RerankInput {
        weights: Some(&w),
        ..input
    };
    let out_w = rerank(&weighted, &[&a], &plain_opts, &mut |_, _| {}).unwrap();
    let (pl, wl) = (&plain[0].per_example.loss, &out_w[0].per_example.loss);
    for j in 0..examples.len() {
        assert!((pl[j] * w[j] - wl[j]).abs() < 1e-9);
    }
    let short = vec![1.0; examples.len() - 1];
    let bad = RerankInput {
        weights: Some(&short),
        ..input
    };
    let e = rerank(&bad, &[&a], &plain_opts, &mut |_, _| {}).unwrap_err();
    assert!(
        matches!(e, RerankError::BadWeights { got, examples: n } if got + 1 == n),
        "{e}"
    );
}

/// A copy of a LoRA adapter with every value of the tensors matching `part` multiplied by `f`.
fn scaled(obj: &LightweightObject, part: &str, f: f32) -> LightweightObject {
    let mut o = obj.clone();
    for t in o.tensors.iter_mut().filter(|t| t.name.contains(part)) {
        let v: Vec<f32> = t.to_f32().into_iter().map(|x| x * f).collect();
        *t = peftdb::object::Tensor::from_f32(t.name.clone(), t.shape.clone(), &v);
    }
    o
}

#[test]
fn stacked_lora_candidates_score_like_one_pass_each() {
    let engine = Engine::load(&common::model_dir(), &candle_core::Device::Cpu).unwrap();
    let task = Task::load(&common::task_dir("tweet_sentiment")).unwrap();
    let examples = few_shot(&task.dev, task.labels.len(), 4, 3).unwrap();
    let labels = engine.tokenize(&task.label_texts()).unwrap();
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let inputs = engine.tokenize(&texts).unwrap();
    // Three different LoRA adapters of one layout (the real fixture and two rescaled copies), and an
    // IA3 adapter that cannot be stacked with them.
    let base = fixture("lora_r8_qv");
    let objs = [
        base.clone(),
        scaled(&base, "lora_B", -1.5),
        scaled(&base, "lora_A", 3.0),
        fixture("ia3"),
    ];
    let sets: Vec<_> = objs.iter().map(|o| engine.prepare(o).unwrap()).collect();
    let refs: Vec<_> = sets.iter().collect();
    let opts = peftdb::engine::ScoreOptions {
        batch_size: 5,
        ..Default::default()
    };
    assert!(peftdb::engine::AdapterSet::stack_lora(&refs[..3]).is_some());
    assert!(peftdb::engine::AdapterSet::stack_lora(&refs[2..]).is_none());
    let one_by_one: Vec<_> = refs
        .iter()
        .map(|s| engine.score(Some(s), &labels, &inputs, &opts).unwrap())
        .collect();
    // The copies really differ from the original.
    assert!(one_by_one[0].probs != one_by_one[1].probs);
    for stack in [1, 2, 3, 4] {
        let together = engine
            .score_many(&refs, &labels, &inputs, &opts, stack)
            .unwrap();
        assert_eq!(together.len(), refs.len());
        for (i, (a, b)) in together.iter().zip(&one_by_one).enumerate() {
            let worst = a
                .probs
                .iter()
                .flatten()
                .zip(b.probs.iter().flatten())
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-5, "stack {stack}, candidate {i}: {worst}");
        }
    }
}

/// `peftdb rerank` is a shell over `transfer::score_episode`: on the same episode (task, shots, seed,
/// label prior) the CLI's JSON gives the library's scores, accuracies and bare model.
#[test]
fn cli_rerank_is_the_library_stage() {
    use peftdb::transfer::{score_episode, Episode, LabelPrior};
    let task_dir = common::task_dir("movie_sentiment");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .args(["--db", "/nonexistent/none.peftdb", "rerank", "--json"])
        .arg("--model")
        .arg(common::model_dir())
        .arg("--task")
        .arg(&task_dir)
        .arg("--adapter")
        .arg(common::fixture("lora_r8_qv"))
        .arg("--adapter")
        .arg(common::fixture("lora_rslora"))
        .args([
            "--shots",
            "4",
            "--seed",
            "3",
            "--indicator",
            "loss,cos-logits",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&common::stdout_of(out)).unwrap();

    let engine = Engine::load(&common::model_dir(), &candle_core::Device::Cpu).unwrap();
    let task = Task::load(&task_dir).unwrap();
    let episode = Episode::sample(&task, 4, 3).unwrap();
    let cands = [fixture("lora_r8_qv"), fixture("lora_rslora")];
    let refs: Vec<&LightweightObject> = cands.iter().collect();
    let opts = RerankOptions {
        indicators: vec![Indicator::Loss, Indicator::CosLogits],
        seed: 3,
        ..Default::default()
    };
    let s = score_episode(
        &engine,
        &task,
        &episode,
        None,
        &refs,
        &opts,
        LabelPrior::Train,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(v["examples"], s.examples);
    assert!((v["bare"]["accuracy"].as_f64().unwrap() - s.bare.accuracy).abs() < 1e-9);
    let c = v["candidates"].as_array().unwrap();
    assert_eq!(c.len(), 2);
    for (j, lib) in c.iter().zip(&s.candidates) {
        assert!((j["accuracy"].as_f64().unwrap() - lib.accuracy).abs() < 1e-9);
        for k in ["loss", "cos-logits"] {
            let (a, b) = (j["scores"][k].as_f64().unwrap(), lib.scores[k]);
            assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{k}: {a} vs {b}");
        }
    }
}
