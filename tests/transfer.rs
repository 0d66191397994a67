//! The transfer pipeline on the committed demo zoo (real adapters trained on the 14 tasks): the rules of
//! `suggest`'s answer (only candidates that beat the bare model beyond the noise get weight, softmax over
//! them, a from-scratch answer when none does), every similarity through an in-memory target, the stages
//! composing to exactly `suggest`'s answer (what the study relies on), and the study itself on two targets
//! with truncated splits (resume, records, report).

mod common;

use peftdb::engine::ScoreOptions;
use peftdb::engine::{Engine, EngineOptions};
use peftdb::index::{IndexConfig, IndexManager};
use peftdb::ingest::{ingest_zoo, IngestOptions};
use peftdb::object::LightweightObject;
use peftdb::query::Similarity;
use peftdb::store::Store;
use peftdb::suggest::{suggest, Decision, SuggestConfig, SuggestInput};
use peftdb::task::Task;
use peftdb::transfer::{
    decide, evaluate, retrieve, score, scratch_init, store_base_model, target_adapter, Episode,
};
use std::path::PathBuf;

fn demo_zoo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo-zoo")
}

fn task(name: &str) -> Task {
    Task::load(&common::tasks_dir().join(name)).unwrap()
}

fn engine() -> Engine {
    Engine::load_with(
        &common::model_dir(),
        &candle_core::Device::Cpu,
        &EngineOptions {
            max_len: 48,
            ..Default::default()
        },
    )
    .unwrap()
}

fn zoo_store(dir: &std::path::Path) -> (Store, IndexManager) {
    let store = Store::create(dir.join("zoo.peftdb")).unwrap();
    let rep = ingest_zoo(
        &store,
        &[demo_zoo()],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(rep.rejected(), 0);
    assert!(rep.ingested() >= 3);
    let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
    (store, index)
}

fn quick() -> SuggestConfig {
    SuggestConfig {
        shots: 4,
        short_tune_steps: 4,
        ..Default::default()
    }
}

fn lora_b_all_zero(o: &LightweightObject) -> bool {
    o.tensors
        .iter()
        .filter(|t| t.name.contains("lora_B"))
        .all(|t| t.to_f32().iter().all(|v| *v == 0.0))
}

#[test]
fn suggest_weights_only_candidates_that_help_and_falls_back_to_scratch() {
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let (store, index) = zoo_store(dir.path());
    let new_task = task("tweet_sentiment");
    let cfg = quick();
    let input = SuggestInput {
        store: &store,
        index: &index,
        engine: &engine,
        task: &new_task,
        adapter: None,
    };
    let (obj, rep) = suggest(&input, &cfg, &mut |_| {}).unwrap();
    // The new task is never its own candidate, even though the zoo holds an adapter of it.
    assert!(rep.candidates.iter().all(|c| c.task != "tweet_sentiment"));
    assert_eq!(rep.k_used, rep.candidates.len());
    assert_eq!(rep.similarity, "delta");
    assert_eq!(rep.merge, "delta-cat");
    // 3 classes x (4 train + 4 dev shots).
    assert_eq!(rep.examples, 24);
    // Listed in the rerank's ranking (by the indicator), each with its place in the retrieval's.
    let key = |c: &peftdb::suggest::CandidateReport| c.scores[cfg.indicator.as_str()];
    assert!(rep.candidates.windows(2).all(|w| key(&w[0]) >= key(&w[1])));
    assert!(rep
        .candidates
        .iter()
        .enumerate()
        .all(|(i, c)| c.rank == i + 1));
    let mut retrieval: Vec<usize> = rep.candidates.iter().map(|c| c.retrieval_rank).collect();
    retrieval.sort();
    assert_eq!(retrieval, (1..=rep.candidates.len()).collect::<Vec<_>>());
    for c in &rep.candidates {
        assert_eq!(
            c.helps,
            c.gain > 0.0
                && c.gain > cfg.noise_z * c.gain_se
                && (!rep.accuracy_guard || c.accuracy >= rep.bare.accuracy),
            "{c:?}"
        );
        if !c.helps {
            assert_eq!(c.weight, 0.0, "{c:?}");
        }
    }
    let helping: Vec<_> = rep.candidates.iter().filter(|c| c.helps).collect();
    match rep.decision {
        Decision::Scratch => {
            assert!(helping.is_empty());
            assert!(rep.candidates.iter().all(|c| c.weight == 0.0));
            assert!(lora_b_all_zero(&obj));
            assert!(rep.notes.iter().any(|n| n.contains("from-scratch")));
        }
        Decision::Ensemble => {
            // Softmax of the indicator's per-example score over the helping candidates only.
            let s: Vec<f64> = helping
                .iter()
                .map(|c| {
                    cfg.indicator
                        .per_example(c.scores[cfg.indicator.as_str()], rep.examples)
                })
                .collect();
            let w = peftdb::ensemble::softmax_weights(&s, cfg.tau).unwrap();
            for (c, w) in helping.iter().zip(w) {
                assert!((c.weight - w).abs() < 1e-12);
            }
            assert!(rep.ensemble_gain.unwrap() > 0.0);
        }
        Decision::BestSingle => {
            assert_eq!(rep.candidates.iter().filter(|c| c.weight == 1.0).count(), 1);
        }
    }

    // An impossible noise threshold: nothing helps, so the answer is the from-scratch adapter, which is
    // exactly the bare model on any input.
    let strict = SuggestConfig {
        noise_z: 1e9,
        ..cfg.clone()
    };
    let (obj, rep) = suggest(&input, &strict, &mut |_| {}).unwrap();
    assert_eq!(rep.decision, Decision::Scratch);
    assert!(lora_b_all_zero(&obj));
    let ex = &new_task.test[..12];
    let opts = ScoreOptions::default();
    let a = evaluate(&engine, &new_task, Some(&obj), ex, &opts, &mut |_, _| {}).unwrap();
    let b = evaluate(&engine, &new_task, None, ex, &opts, &mut |_, _| {}).unwrap();
    assert_eq!(a.accuracy, b.accuracy);
    assert!((a.loss - b.loss).abs() < 1e-5, "{} vs {}", a.loss, b.loss);
    // ... and it is what training from scratch starts from.
    let fresh = scratch_init(
        &engine,
        &strict,
        store_base_model(&store.snapshot().unwrap(), &strict).unwrap(),
    )
    .unwrap();
    assert_eq!(obj.tensors, fresh.tensors);
    // A bad threshold is refused.
    let bad = SuggestConfig {
        noise_z: -1.0,
        ..cfg.clone()
    };
    assert!(suggest(&input, &bad, &mut |_| {})
        .unwrap_err()
        .to_string()
        .contains("noise threshold"));
}

#[test]
fn the_stages_compose_to_exactly_the_answer_of_suggest() {
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let (store, index) = zoo_store(dir.path());
    let new_task = task("movie_sentiment");
    // A lenient threshold so that candidates get weight and the merge is exercised.
    let cfg = SuggestConfig {
        noise_z: 0.0,
        k: 3,
        ..quick()
    };
    let input = SuggestInput {
        store: &store,
        index: &index,
        engine: &engine,
        task: &new_task,
        adapter: None,
    };
    let (obj, rep) = suggest(&input, &cfg, &mut |_| {}).unwrap();

    // The same stages by hand, as the transfer study composes them: every source scored once, then the
    // top K of the similarity's ranking decided on.
    let episode = Episode::sample(&new_task, cfg.shots, cfg.seed).unwrap();
    let snap = store.snapshot().unwrap();
    let base = store_base_model(&snap, &cfg).unwrap();
    let (target, _) = target_adapter(
        &engine,
        &new_task,
        &episode,
        None,
        base.clone(),
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    for sim in Similarity::ALL {
        let hits = retrieve(
            &snap,
            &index,
            &target,
            sim,
            cfg.method,
            "movie_sentiment",
            50,
        )
        .unwrap();
        assert!(!hits.is_empty(), "{sim:?}");
        assert!(hits.iter().all(|h| h.task != "movie_sentiment"));
        assert!(hits.windows(2).all(|w| w[0].similarity >= w[1].similarity));
    }
    let all = retrieve(
        &snap,
        &index,
        &target,
        cfg.similarity,
        cfg.method,
        "movie_sentiment",
        50,
    )
    .unwrap();
    let objs: Vec<LightweightObject> = all.iter().map(|h| snap.get(h.object).unwrap().1).collect();
    let refs: Vec<&LightweightObject> = objs.iter().collect();
    let scores = score(
        &engine,
        &new_task,
        &episode,
        &target,
        &refs,
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    let k = cfg.k.min(all.len());
    let sub = peftdb::transfer::Scores {
        examples: scores.examples,
        bare: scores.bare.clone(),
        candidates: scores.candidates[..k].to_vec(),
    };
    let scratch = scratch_init(&engine, &cfg, base).unwrap();
    let d = decide(
        &engine,
        &new_task,
        &episode,
        &refs[..k],
        &sub,
        &scratch,
        &cfg,
    )
    .unwrap();
    assert_eq!(d.decision, rep.decision);
    // The report lists the rerank's ranking; in retrieval order it is the stages' candidate list.
    let mut by_retrieval: Vec<_> = rep.candidates.iter().collect();
    by_retrieval.sort_by_key(|c| c.retrieval_rank);
    assert_eq!(
        by_retrieval
            .iter()
            .map(|c| c.task.as_str())
            .collect::<Vec<_>>(),
        all[..k].iter().map(|h| h.task.as_str()).collect::<Vec<_>>()
    );
    for (c, w) in by_retrieval.iter().zip(&d.weights) {
        assert!(
            (c.weight - w).abs() < 1e-6,
            "{} {} vs {w}",
            c.task,
            c.weight
        );
    }
    // Stacked scoring differs from one-by-one by float rounding only; the answers are the same tensors
    // whenever the weights agree to the last bit, and within 1e-4 otherwise.
    assert_eq!(obj.tensors.len(), d.init.tensors.len());
    for (a, b) in obj.tensors.iter().zip(&d.init.tensors) {
        assert_eq!((a.name.as_str(), &a.shape), (b.name.as_str(), &b.shape));
        for (x, y) in a.to_f32().iter().zip(b.to_f32()) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "{}: {x} vs {y}",
                a.name
            );
        }
    }
}

#[test]
fn the_study_runs_resumes_and_reports_through_suggest() {
    use peftdb::experiment::transfer::{run, FewShot, Phase, StudyConfig};
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let cfg = StudyConfig {
        zoo: demo_zoo(),
        tasks: common::tasks_dir(),
        out: dir.path().join("study"),
        seeds: vec![0],
        tune_seeds: vec![0],
        targets: vec!["social_support".into(), "tweet_sentiment".into()],
        suggest: quick(),
        few_shot: FewShot {
            steps: 2,
            eval_every: 2,
            ..FewShot::default()
        },
        textemb_examples: 8,
        eval_limit: Some(12),
    };
    let mut units = 0;
    run(&cfg, &engine, 48, &Phase::ALL, &mut |ev| {
        if let peftdb::experiment::transfer::StudyEvent::Unit { .. } = ev {
            units += 1;
        }
    })
    .unwrap();
    let results = std::fs::read_to_string(cfg.out.join("results.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), units);
    for phase in ["zero", "tune", "final", "scratch"] {
        assert!(lines.iter().any(|l| l["phase"] == phase), "{phase}");
    }
    // Per target: zero-shot for the bare model, 13 sources and 3 averages; one tune, scratch and final
    // unit each (one seed).
    for target in &cfg.targets {
        let count = |phase: &str| {
            lines
                .iter()
                .filter(|l| l["phase"] == phase && l["task"] == target.as_str())
                .count()
        };
        assert_eq!(
            [
                count("zero"),
                count("tune"),
                count("scratch"),
                count("final")
            ],
            [17, 2, 1, 1],
            "{target}"
        );
    }
    let mut left_somewhere = 0;
    // The held-out record: every grid answer on the (limited) dev split without the episode's dev
    // shots; a best single source's accuracy is its own dev correctness on exactly the kept examples.
    for target in &cfg.targets {
        let of = |init: &str| {
            lines
                .iter()
                .find(|l| l["phase"] == "tune" && l["task"] == target.as_str() && l["init"] == init)
                .unwrap()
        };
        let (grid_rec, held) = (&of("grid")["data"], &of("heldout")["data"]);
        let t = task(target);
        let left: std::collections::BTreeSet<usize> =
            peftdb::transfer::Episode::dev_positions(&t, cfg.suggest.shots, 0)
                .unwrap()
                .into_iter()
                .filter(|&i| i < 12)
                .collect();
        assert_eq!(held["left_out"], left.len(), "{target}");
        assert_eq!(held["examples"], 12 - left.len(), "{target}");
        assert!(held["examples"].as_u64().unwrap() > 0, "{target}");
        let answers = held["answers"].as_object().unwrap();
        assert_eq!(
            answers.len(),
            peftdb::experiment::transfer::grid(&cfg.suggest).len()
        );
        let on_kept = |correct: &str| {
            let kept: Vec<bool> = correct
                .bytes()
                .enumerate()
                .filter(|(i, _)| !left.contains(i))
                .map(|(_, c)| c == b'1')
                .collect();
            kept.iter().filter(|&&c| c).count() as f64 / kept.len() as f64
        };
        let mut singles = 0;
        for a in grid_rec["answers"].as_array().unwrap() {
            let weights = a["weights"].as_object().unwrap();
            if a["decision"] == "best-single" && weights.len() == 1 {
                let name = weights.keys().next().unwrap();
                let cand = grid_rec["candidates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["task"] == name.as_str())
                    .unwrap();
                let want = on_kept(cand["dev"]["correct"].as_str().unwrap());
                let got = answers[a["config"].as_str().unwrap()].as_f64().unwrap();
                assert!((got - want).abs() < 1e-12, "{target} {}", a["config"]);
                singles += 1;
            }
        }
        assert!(singles > 0, "{target}: no best-single answer to check");
        left_somewhere += left.len();
    }
    // (social_support's episode draws one of the first 12 dev examples: the masking is exercised.)
    assert!(left_somewhere > 0);
    let tune = lines
        .iter()
        .find(|l| l["phase"] == "tune" && l["init"] == "grid")
        .unwrap();
    assert_eq!(tune["data"]["candidates"].as_array().unwrap().len(), 13);
    assert_eq!(
        tune["data"]["answers"].as_array().unwrap().len(),
        peftdb::experiment::transfer::grid(&cfg.suggest).len()
    );
    for fin in lines.iter().filter(|l| l["phase"] == "final") {
        assert_eq!(
            fin["data"]["config"],
            peftdb::experiment::transfer::config_label(&cfg.suggest)
        );
        assert_eq!(fin["data"]["test"]["examples"], 12);
    }
    let md_first = std::fs::read_to_string(cfg.out.join("report.md")).unwrap();
    // Resume: nothing left to run, nothing appended, the same report.
    let mut again = 0;
    run(&cfg, &engine, 48, &Phase::ALL, &mut |ev| {
        if let peftdb::experiment::transfer::StudyEvent::Unit { .. } = ev {
            again += 1;
        }
    })
    .unwrap();
    assert_eq!(again, 0);
    assert_eq!(
        std::fs::read_to_string(cfg.out.join("results.jsonl")).unwrap(),
        results
    );
    assert_eq!(
        std::fs::read_to_string(cfg.out.join("report.md")).unwrap(),
        md_first
    );
    // The final phase's answer is suggest's: same decision and candidates as a direct call.
    let (store, index) = {
        let store = Store::open_for_reading(cfg.out.join("zoo.peftdb")).unwrap();
        let (index, _) = IndexManager::open(&store, IndexConfig::default(), &|_| {}).unwrap();
        (store, index)
    };
    let t = task("tweet_sentiment");
    let input = SuggestInput {
        store: &store,
        index: &index,
        engine: &engine,
        task: &t,
        adapter: None,
    };
    let (_, rep) = suggest(&input, &quick(), &mut |_| {}).unwrap();
    let fin = lines
        .iter()
        .find(|l| l["phase"] == "final" && l["task"] == "tweet_sentiment")
        .unwrap();
    assert_eq!(fin["data"]["decision"], rep.decision.as_str());
    let tasks: Vec<&str> = fin["data"]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0].as_str().unwrap())
        .collect();
    assert_eq!(
        tasks,
        rep.candidates
            .iter()
            .map(|c| c.task.as_str())
            .collect::<Vec<_>>()
    );
    let md = std::fs::read_to_string(cfg.out.join("report.md")).unwrap();
    for section in ["## 1.", "## 2.", "## 3.", "## 4.", "Acceptance numbers"] {
        assert!(md.contains(section), "{section}");
    }
    assert!(!md.contains("Not run"), "{md}");
    // Section 4 is evaluated held out and names the setting its rule picks.
    assert!(
        md.contains("on the dev split without the episode's dev shots")
            && md.contains("By that rule"),
        "{md}"
    );
}

/// A zoo folder `dir/zoo` of three demo-zoo LoRAs, and a zero-phase study of it for movie_sentiment
/// writing into `out` (`eval_limit` examples per split).
fn small_zoo_study(
    dir: &std::path::Path,
    out: std::path::PathBuf,
    eval_limit: usize,
) -> peftdb::experiment::transfer::StudyConfig {
    use peftdb::experiment::transfer::{FewShot, StudyConfig};
    let zoo = dir.join("zoo");
    for t in ["movie_sentiment", "tweet_sentiment", "bbc_topic"] {
        if !zoo.join(t).exists() {
            common::copy_dir(&demo_zoo().join(t).join("lora"), &zoo.join(t).join("lora"));
        }
    }
    StudyConfig {
        zoo,
        tasks: common::tasks_dir(),
        out,
        seeds: vec![0],
        tune_seeds: vec![0],
        targets: vec!["movie_sentiment".into()],
        suggest: quick(),
        few_shot: FewShot::default(),
        textemb_examples: 8,
        eval_limit: Some(eval_limit),
    }
}

/// A zoo that grows keeps its zero-shot ground truth: the bare model's and each source's unit depend on
/// that source alone (filed under its content hash), so adding a task runs only its own source unit and
/// the three averages over the zoo (which do change), and the grown zoo is ingested by the next run.
#[test]
fn a_growing_zoo_reruns_only_the_zero_shot_units_it_changes() {
    use peftdb::experiment::transfer::{run, Phase, StudyConfig, StudyEvent};
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_zoo_study(dir.path(), dir.path().join("study"), 8);
    let zoo = cfg.zoo.clone();
    let add =
        |t: &str| common::copy_dir(&demo_zoo().join(t).join("lora"), &zoo.join(t).join("lora"));
    let zero = |cfg: &StudyConfig| {
        let mut ran = Vec::new();
        run(cfg, &engine, 32, &[Phase::Zero], &mut |ev| {
            if let StudyEvent::Unit { key, .. } = ev {
                ran.push(key.split('@').next().unwrap().to_string());
            }
        })
        .unwrap();
        ran.sort();
        ran
    };
    // Bare, two sources, two averages and the manual (same-group) merge.
    assert_eq!(zero(&cfg).len(), 6);
    add("social_support");
    assert_eq!(
        zero(&cfg),
        [
            "zero/movie_sentiment/average-delta/0",
            "zero/movie_sentiment/average-param/0",
            "zero/movie_sentiment/manual/0",
            "zero/movie_sentiment/source:social_support/0",
        ]
    );
    assert!(zero(&cfg).is_empty(), "a rerun runs nothing");
    // Without tune records the report says that sections 3 and 4 were not run, not empty tables.
    let md = std::fs::read_to_string(cfg.out.join("report.md")).unwrap();
    assert!(
        md.contains("## 3.") && md.contains("Not run: this results file holds no `tune` records"),
        "{md}"
    );
    assert!(!md.contains("| random |"), "{md}");
}

/// The zoo-wide units are keyed by the zoo's content, not by the order its adapters entered the study's
/// store: a store that grew one adapter at a time (other ids) files them under the same keys as a store
/// ingested in one go, so records computed in another output folder can be merged and are found.
#[test]
fn zoo_wide_units_are_keyed_by_content_not_ingestion_order() {
    use peftdb::experiment::transfer::{run, Phase, StudyEvent};
    let engine = engine();
    let dir = tempfile::tempdir().unwrap();
    let keys = |out: &std::path::Path, order: &[&str]| {
        let cfg = small_zoo_study(dir.path(), out.to_path_buf(), 4);
        let zoo = cfg.zoo.clone();
        // Ingest the adapters into the study's store one at a time, in `order`, before the study opens it.
        std::fs::create_dir_all(out).unwrap();
        let store = Store::open_or_create(out.join("zoo.peftdb")).unwrap();
        for t in order {
            let r = ingest_zoo(
                &store,
                &[zoo.join(t)],
                None,
                &IngestOptions::default(),
                &|_| {},
            )
            .unwrap();
            assert_eq!(r.rejected(), 0);
        }
        drop(store);
        let mut ran = Vec::new();
        run(&cfg, &engine, 32, &[Phase::Zero], &mut |ev| {
            if let StudyEvent::Unit { key, .. } = ev {
                ran.push(key);
            }
        })
        .unwrap();
        ran.sort();
        ran
    };
    let a = keys(
        &dir.path().join("a"),
        &["bbc_topic", "movie_sentiment", "tweet_sentiment"],
    );
    let b = keys(
        &dir.path().join("b"),
        &["tweet_sentiment", "movie_sentiment", "bbc_topic"],
    );
    assert_eq!(a.len(), 6);
    assert!(a.iter().any(|k| k.contains("/average-delta/")), "{a:?}");
    assert_eq!(a, b);
}
