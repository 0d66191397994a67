//! The whole pipeline on a decoder LLM (SmolLM2-135M-Instruct from GGUF, scripts/fetch-decoder.sh), on
//! real tasks (`common::tasks_dir`): few-shot LoRA training through the engine, the delta-W merge, and
//! `suggest` over a store of decoder LoRAs, each answer written in PEFT's format for a causal LM. With
//! `PEFTDB_PEFT_PYTHON` set to a Python with torch, transformers, gguf and peft, the trained adapter is also
//! loaded by PEFT (scripts/decoder_peft_check.py) and must give the same test accuracy as peftdb.

mod common;

use candle_core::Device;
use peftdb::engine::{train, Engine, EngineOptions, ScoreOptions, TrainConfig, TrainData};
use peftdb::ensemble::{merge, MergeMode};
use peftdb::index::{IndexConfig, IndexManager};
use peftdb::object::{read_adapter, write_adapter, LightweightObject, MethodKind, ReadOptions};
use peftdb::store::{NewObject, Store, TaskRecord};
use peftdb::suggest::{suggest, write_suggestion, SuggestConfig, SuggestInput};
use peftdb::task::{few_shot, Task};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn gguf() -> PathBuf {
    let p = std::env::var_os("PEFTDB_DECODER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct")
        })
        .join("model.gguf");
    assert!(
        p.is_file(),
        "decoder test model not found at {}: run scripts/fetch-decoder.sh",
        p.display()
    );
    p
}

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::load_with(
            &gguf(),
            &Device::Cpu,
            &EngineOptions {
                max_len: 48,
                ..Default::default()
            },
        )
        .expect("the decoder loads")
    })
}

fn task(name: &str) -> Task {
    Task::load(&common::tasks_dir().join(name)).unwrap()
}

/// Accuracy on the first `n` examples of `split`.
fn accuracy(
    t: &Task,
    split: &[peftdb::task::Example],
    obj: Option<&LightweightObject>,
    n: usize,
) -> f64 {
    let e = engine();
    let set = obj.map(|o| e.prepare(o).unwrap());
    let ex = &split[..n.min(split.len())];
    let texts: Vec<&str> = ex.iter().map(|x| x.text.as_str()).collect();
    let labels = e.tokenize_labels(&t.label_texts()).unwrap();
    let ids = e.tokenize(&texts).unwrap();
    let targets: Vec<usize> = ex.iter().map(|x| x.label).collect();
    e.score(set.as_ref(), &labels, &ids, &ScoreOptions::default())
        .unwrap()
        .accuracy(&targets)
}

/// A 16-shot LoRA (q_proj, v_proj) trained through the engine; `steps` of batch 8.
fn few_shot_lora(name: &str, steps: usize, seed: u64) -> LightweightObject {
    few_shot_adapter(name, MethodKind::Lora, steps, seed)
}

/// A 16-shot adapter of `kind` (its defaults) trained through the engine; `steps` of batch 8.
fn few_shot_adapter(name: &str, kind: MethodKind, steps: usize, seed: u64) -> LightweightObject {
    let t = task(name);
    let labels = t.label_texts();
    let tr = few_shot(&t.train, labels.len(), 16, seed).unwrap();
    let dv = few_shot(&t.dev, labels.len(), 8, seed + 1).unwrap();
    let mut cfg = TrainConfig::new(kind);
    cfg.max_steps = Some(steps);
    cfg.eval_every = steps;
    cfg.patience = None;
    cfg.seed = seed;
    let data = TrainData {
        label_texts: &labels,
        train: &tr,
        dev: &dv,
        test: None,
    };
    train(engine(), &data, &cfg, &mut |_| {})
        .unwrap()
        .best
        .object
}

/// Write `obj` as a PEFT folder under `d`, check that its adapter_config.json is a CAUSAL_LM config of
/// `peft_type`, and return the folder and that config.
fn write_causal_lm(
    d: &tempfile::TempDir,
    obj: &LightweightObject,
    peft_type: &str,
) -> (PathBuf, serde_json::Value) {
    let dir = d.path().join(peft_type.to_lowercase());
    write_adapter(obj, &dir).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM", "{cfg}");
    assert_eq!(cfg["peft_type"], peft_type, "{cfg}");
    (dir, cfg)
}

/// With `PEFTDB_PEFT_PYTHON` set: the adapter folder `dir` loads in PEFT on the transformers model, and
/// scores the first `n` movie_sentiment test examples with peftdb's accuracies, bare and adapted; the first
/// three examples' label log-likelihoods with the adapter (`obj`, the object written to `dir`) match
/// peftdb's within 1e-3.
fn peft_check(
    dir: &Path,
    obj: &LightweightObject,
    peft_type: &str,
    n: usize,
    bare: f64,
    tuned: f64,
) {
    let Some(py) = std::env::var_os("PEFTDB_PEFT_PYTHON") else {
        eprintln!("PEFTDB_PEFT_PYTHON unset: the PEFT load check is skipped");
        return;
    };
    let out = std::process::Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/decoder_peft_check.py"))
        .arg(gguf())
        .arg(dir)
        .arg(common::tasks_dir().join("movie_sentiment"))
        .args(["--limit", &n.to_string(), "--max-len", "48"])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&common::stdout_of(out)).unwrap();
    assert_eq!(r["peft_type"], peft_type);
    assert_eq!(r["task_type"], "CAUSAL_LM");
    assert!(
        (r["bare_accuracy"].as_f64().unwrap() - bare).abs() < 1e-9,
        "{r}"
    );
    assert!(
        (r["adapter_accuracy"].as_f64().unwrap() - tuned).abs() < 1e-9,
        "{r}"
    );
    let e = engine();
    let t = task("movie_sentiment");
    let texts: Vec<&str> = t.test[..3].iter().map(|x| x.text.as_str()).collect();
    let rows = e.tokenize(&texts).unwrap();
    let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let labels = e.tokenize_labels(&t.label_texts()).unwrap();
    let set = e.prepare(obj).unwrap();
    let ours = e
        .label_logits(
            Some(&set),
            &labels,
            &rows,
            peftdb::engine::DEFAULT_TEMPERATURE,
            peftdb::engine::Grad::No,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let theirs: Vec<Vec<f64>> = serde_json::from_value(r["first_scores_adapter"].clone()).unwrap();
    assert_eq!(
        ours.iter().map(Vec::len).collect::<Vec<_>>(),
        theirs.iter().map(Vec::len).collect::<Vec<_>>(),
        "peftdb {ours:?} vs PEFT {theirs:?}: examples x labels differ"
    );
    for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
        assert!(
            (*a as f64 - b).abs() < 1e-3,
            "peftdb {ours:?} vs PEFT {theirs:?}"
        );
    }
}

/// Prompt tuning trained by peftdb on the decoder (16-shot, its default 20 virtual tokens and lr): a
/// PEFT-loadable CAUSAL_LM prompt table that, with `PEFTDB_PEFT_PYTHON` set, scores like peftdb in PEFT.
#[test]
fn a_few_shot_prompt_trained_on_the_decoder_scores_the_same_in_peft() {
    let t = task("movie_sentiment");
    let prompt = few_shot_adapter("movie_sentiment", MethodKind::Prompt, 12, 0);
    assert_eq!(prompt.tensors.len(), 1);
    assert_eq!(prompt.tensors[0].shape[1], 576);
    let n = 60;
    let bare = accuracy(&t, &t.test, None, n);
    let tuned = accuracy(&t, &t.test, Some(&prompt), n);
    eprintln!("16-shot prompt tuning {tuned:.3} vs bare {bare:.3} on {n} test examples");
    assert!(
        (tuned - bare).abs() > 1e-9 || {
            // Not the bare model: the table changes the scores.
            let e = engine();
            let ids = e.tokenize(&[t.test[0].text.as_str()]).unwrap();
            let labels = e.tokenize_labels(&t.label_texts()).unwrap();
            let opts = ScoreOptions::default();
            let p = e.prepare(&prompt).unwrap();
            e.score(Some(&p), &labels, &ids, &opts).unwrap().probs
                != e.score(None, &labels, &ids, &opts).unwrap().probs
        }
    );
    let d = tempfile::tempdir().unwrap();
    let (dir, _) = write_causal_lm(&d, &prompt, "PROMPT_TUNING");
    peft_check(&dir, &prompt, "PROMPT_TUNING", n, bare, tuned);
}

/// Prefix tuning trained by peftdb on the decoder (16-shot, its default 20 virtual tokens and lr): a
/// PEFT-loadable CAUSAL_LM prefix in PEFT's grouped-query layout that, with `PEFTDB_PEFT_PYTHON` set,
/// scores like peftdb in PEFT.
#[test]
fn a_few_shot_prefix_trained_on_the_decoder_scores_the_same_in_peft() {
    let t = task("movie_sentiment");
    let prefix = few_shot_adapter("movie_sentiment", MethodKind::Prefix, 12, 0);
    assert_eq!(prefix.tensors.len(), 1);
    assert_eq!(prefix.tensors[0].shape, vec![20, 30 * 2 * 192]);
    let n = 60;
    let bare = accuracy(&t, &t.test, None, n);
    let tuned = accuracy(&t, &t.test, Some(&prefix), n);
    eprintln!("16-shot prefix tuning {tuned:.3} vs bare {bare:.3} on {n} test examples");
    // Not the bare model: the prefix changes the scores.
    let e = engine();
    let ids = e.tokenize(&[t.test[0].text.as_str()]).unwrap();
    let labels = e.tokenize_labels(&t.label_texts()).unwrap();
    let opts = ScoreOptions::default();
    let p = e.prepare(&prefix).unwrap();
    let (with, without) = (
        e.score(Some(&p), &labels, &ids, &opts).unwrap().probs,
        e.score(None, &labels, &ids, &opts).unwrap().probs,
    );
    assert!(
        (with[0][0] - without[0][0]).abs() > 1e-3,
        "{with:?} {without:?}"
    );
    let d = tempfile::tempdir().unwrap();
    let (dir, cfg) = write_causal_lm(&d, &prefix, "PREFIX_TUNING");
    assert_eq!(
        (
            cfg["token_dim"].as_u64(),
            cfg["num_attention_heads"].as_u64()
        ),
        (Some(192), Some(3))
    );
    peft_check(&dir, &prefix, "PREFIX_TUNING", n, bare, tuned);
}

fn movie_lora() -> &'static LightweightObject {
    static L: OnceLock<LightweightObject> = OnceLock::new();
    L.get_or_init(|| few_shot_lora("movie_sentiment", 12, 0))
}

#[test]
fn a_few_shot_lora_trained_on_the_decoder_beats_the_bare_model_and_loads_in_peft() {
    let t = task("movie_sentiment");
    let lora = movie_lora();
    assert!(lora
        .tensors
        .iter()
        .all(|x| x.name.starts_with("base_model.model.model.layers.")));
    let n = 120;
    let bare = accuracy(&t, &t.test, None, n);
    let tuned = accuracy(&t, &t.test, Some(lora), n);
    assert!(
        tuned > bare + 0.10,
        "16-shot LoRA {tuned:.3} vs bare {bare:.3} on {n} test examples"
    );
    let d = tempfile::tempdir().unwrap();
    let (dir, cfg) = write_causal_lm(&d, lora, "LORA");
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    peft_check(&dir, lora, "LORA", n, bare, tuned);
}

#[test]
fn the_delta_merge_of_decoder_loras_is_their_weighted_update() {
    let e = engine();
    let a = movie_lora();
    let mut b = read_adapter(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder/lora_r8_all"),
        &ReadOptions::default(),
    )
    .unwrap();
    // PEFT wrote the hub name; peftdb names a GGUF model by its folder. Same weights.
    b.base_model = a.base_model.clone();
    // Another layout (all seven modules) merges too: delta-cat keeps every module's exact update.
    let merged = merge(&[a, &b], &[0.75, 0.25], MergeMode::DeltaCat).unwrap();
    let set = e.prepare(&merged).expect("the merge fits the decoder");
    // The merged adapter's outputs equal the model with 0.75 dW_a + 0.25 dW_b merged into its weights.
    let Backbone::Decoder(m) = &e.model else {
        panic!("a decoder")
    };
    let scaled = |o: &LightweightObject, w: f64| {
        let mut o = o.clone();
        if let peftdb::object::Method::Lora(c) = &mut o.method {
            c.alpha *= w;
            for v in c.alpha_pattern.values_mut() {
                *v *= w;
            }
        }
        o
    };
    let want_model = m
        .with_lora(&scaled(a, 0.75))
        .unwrap()
        .with_lora(&scaled(&b, 0.25))
        .unwrap();
    let texts = ["a wonderful, moving film", "dull and long"];
    let ids = e.tokenize(&texts).unwrap();
    let labels = e.tokenize_labels(&["positive", "negative"]).unwrap();
    let got = e
        .score(Some(&set), &labels, &ids, &ScoreOptions::default())
        .unwrap();
    let want = want_model
        .label_logliks(&ids, &labels, false, 8, 2)
        .unwrap();
    for (g, w) in got.logits.iter().zip(&want) {
        for (x, y) in g.iter().zip(w) {
            assert!((*x as f64 - y).abs() < 2e-3, "{x} vs {y}");
        }
    }
}

use peftdb::engine::Backbone;

#[test]
fn suggest_over_a_store_of_decoder_loras_writes_a_causal_lm_initialization() {
    let e = engine();
    let d = tempfile::tempdir().unwrap();
    let store = Store::create(d.path().join("zoo.redb")).unwrap();
    let strategy = few_shot_lora("strategyqa", 4, 1);
    for (name, obj) in [
        ("movie_sentiment", movie_lora().clone()),
        ("strategyqa", strategy),
    ] {
        store
            .ingest(NewObject {
                object: obj,
                task: TaskRecord {
                    name: name.into(),
                    ..Default::default()
                },
                source: None,
                stage: Some("best".into()),
                metrics: Default::default(),
            })
            .unwrap();
    }
    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
    let new_task = task("tweet_sentiment");
    let cfg = SuggestConfig {
        k: 5,
        shots: 4,
        short_tune_steps: 3,
        ..Default::default()
    };
    let input = SuggestInput {
        store: &store,
        index: &index,
        engine: e,
        task: &new_task,
        adapter: None,
    };
    let (obj, report) = suggest(&input, &cfg, &mut |_| {}).unwrap();
    assert_eq!(report.k_used, 2, "{:?}", report.notes);
    assert_eq!(report.candidates.len(), 2);
    let out = d.path().join("init");
    write_suggestion(&obj, &report, &out).unwrap();
    let back = read_adapter(&out, &ReadOptions::default()).unwrap();
    e.prepare(&back).expect("the answer runs on the decoder");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
}

/// A LoRA that also saves a whole module (`modules_to_save`): PEFT's SEQ_CLS task type trains a new `score`
/// head and saves it as `base_model.model.score.weight` beside the LoRA (fixture written by PEFT,
/// scripts/decoder_saved_modules_fixture.py). It is stored and exported byte-identical, embedded exactly
/// like the same LoRA without the head (TuPaTE and the ΔW sketch), and refused by the engine naming the
/// saved tensor. With a config that does not list the module, the head is refused at read, named.
#[test]
fn a_lora_with_saved_modules_is_stored_and_exported_but_not_embedded_or_run() {
    use peftdb::embed::{delta::LoraDelta, tupate};
    const HEAD: &str = "base_model.model.score.weight";
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoder/lora_seq_cls_score");
    let saved = read_adapter(&fixture, &ReadOptions::default()).unwrap();
    assert_eq!(saved.saved_modules(), vec!["classifier", "score"]);
    assert!(saved.tensor(HEAD).is_some());
    assert!(saved.is_saved_module_tensor(HEAD));
    assert!(!saved.is_saved_module_tensor(&saved.tensors[0].name));
    // The same LoRA without the head, and the head without the config listing it.
    let tmp = tempfile::tempdir().unwrap();
    let rewrite = |keep_head: bool, dir: &Path| {
        let mut obj = saved.clone();
        obj.tensors.retain(|t| keep_head || t.name != HEAD);
        let mut cfg: serde_json::Value = serde_json::from_slice(&obj.config_json).unwrap();
        cfg["modules_to_save"] = serde_json::Value::Null;
        obj.config_json = serde_json::to_vec_pretty(&cfg).unwrap();
        write_adapter(&obj, dir).unwrap();
        read_adapter(dir, &ReadOptions::default())
    };
    let e = rewrite(true, &tmp.path().join("unlisted")).unwrap_err();
    assert!(e.to_string().contains(HEAD), "{e}");
    // Only the saved head, none of the LoRA: refused, saying so.
    let mut head_only = saved.clone();
    head_only.tensors.retain(|t| t.name == HEAD);
    let dir = tmp.path().join("head_only");
    write_adapter(&head_only, &dir).unwrap();
    let e = read_adapter(&dir, &ReadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("modules_to_save"), "{e}");
    let plain = rewrite(false, &tmp.path().join("plain")).unwrap();
    assert_eq!(plain.tensors.len() + 1, saved.tensors.len());
    assert_eq!(
        tupate(&saved).unwrap().vector,
        tupate(&plain).unwrap().vector
    );
    assert_eq!(
        LoraDelta::from_object(&saved).unwrap(),
        LoraDelta::from_object(&plain).unwrap()
    );
    // The store keeps it whole: the plain LoRA's embeddings, an exact export.
    let store = Store::create(tmp.path().join("z.peftdb")).unwrap();
    let add = |obj: LightweightObject, task: &str| match store
        .ingest(NewObject {
            object: obj,
            task: TaskRecord::named(task),
            source: None,
            stage: None,
            metrics: Default::default(),
        })
        .unwrap()
    {
        peftdb::store::Outcome::Added(id) => id,
        other => panic!("not added: {other:?}"),
    };
    let (id_plain, id_saved) = (add(plain.clone(), "plain"), add(saved.clone(), "saved"));
    let (rp, rs) = (
        store.object(id_plain).unwrap(),
        store.object(id_saved).unwrap(),
    );
    assert_eq!(rs.saved_modules(), vec!["classifier", "score"]);
    assert_eq!(rs.embeddings.len(), 2, "TuPaTE and the ΔW sketch");
    assert_eq!(rs.embeddings.len(), rp.embeddings.len());
    for (ep, es) in rp.embeddings.iter().zip(&rs.embeddings) {
        assert_eq!(ep.space, es.space);
        assert_eq!(
            store.embedding(ep.space, id_plain).unwrap(),
            store.embedding(es.space, id_saved).unwrap()
        );
    }
    let out = tmp.path().join("export");
    store.export(id_saved, &out).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(fixture.join(f)).unwrap(),
            "{f}"
        );
    }
    // The engine runs the base model's own modules: it refuses, naming the tensor and the reason.
    let e = peftdb::engine::AdapterSet::from_object(&engine().model, &saved).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(HEAD), "{msg}");
    assert!(msg.contains("modules_to_save"), "{msg}");
    assert!(peftdb::engine::AdapterSet::from_object(&engine().model, &plain).is_ok());
}
