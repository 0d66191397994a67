//! Ensembling on real PEFT adapters: one-hot identity in every mode, delta merges against delta-W formed
//! explicitly, rsLoRA / rank_pattern scaling preserved, and the errors.

use peftdb::ensemble::{average, best_single, merge, softmax_weights, EnsembleError, MergeMode};
use peftdb::object::ReadOptions;
use peftdb::object::{parse_tensor_name, Role};
use peftdb::object::{read_adapter, write_adapter, LightweightObject, Method};
use std::collections::BTreeMap;
use std::path::Path;

/// delta-W per module path: (out, in, row-major values).
type Deltas = BTreeMap<String, (usize, usize, Vec<f64>)>;

fn fixture(name: &str) -> LightweightObject {
    read_adapter(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/peft")
            .join(name),
        &ReadOptions::default(),
    )
    .unwrap()
}

/// delta-W of every LoRA module, formed explicitly: s * B (out x r) @ A (r x in).
fn delta_w(o: &LightweightObject) -> Deltas {
    let Method::Lora(cfg) = &o.method else {
        panic!("not LoRA")
    };
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for t in &o.tensors {
        let loc = parse_tensor_name(&t.name);
        match loc.role {
            Role::LoraA => {
                a.insert(loc.module_path, t);
            }
            Role::LoraB => {
                b.insert(loc.module_path, t);
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    for (m, at) in a {
        let bt = b[&m];
        let (r, n, k) = (at.shape[0], at.shape[1], bt.shape[0]);
        let (av, bv) = (at.to_f32(), bt.to_f32());
        let s = cfg.scaling_for(&m);
        let mut d = vec![0f64; k * n];
        for i in 0..k {
            for j in 0..n {
                let mut acc = 0f64;
                for q in 0..r {
                    acc += bv[i * r + q] as f64 * av[q * n + j] as f64;
                }
                d[i * n + j] = s * acc;
            }
        }
        out.insert(m, (k, n, d));
    }
    out
}

fn assert_delta_close(got: &Deltas, want: &Deltas, tol: f64) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (m, (_, _, g)) in got {
        let w = &want[m].2;
        let scale = w.iter().fold(0f64, |a, x| a.max(x.abs())).max(1e-12);
        for (x, y) in g.iter().zip(w) {
            assert!((x - y).abs() <= tol * scale, "{m}: {x} vs {y}");
        }
    }
}

fn combine(parts: &[(f64, &Deltas)]) -> Deltas {
    let mut out: Deltas = BTreeMap::new();
    for (w, d) in parts {
        for (m, (k, n, v)) in d.iter() {
            let e = out.entry(m.clone()).or_insert((*k, *n, vec![0.0; v.len()]));
            for (a, x) in e.2.iter_mut().zip(v) {
                *a += w * x;
            }
        }
    }
    out
}

#[test]
fn one_hot_weights_reproduce_the_candidate_in_every_mode() {
    let names = [
        "lora_r8_qv",
        "lora_rslora",
        "lora_rank_pattern",
        "lora_bias_all",
    ];
    let objs: Vec<LightweightObject> = names.iter().map(|n| fixture(n)).collect();
    for (hot, name) in names.iter().enumerate() {
        let mut w = vec![0.0; names.len()];
        w[hot] = 1.0;
        let refs: Vec<&LightweightObject> = objs.iter().collect();
        // delta-cat: exact bytes and config (the other candidates carry zero weight).
        let cat = merge(&refs, &w, MergeMode::DeltaCat).unwrap();
        assert_eq!(cat, objs[hot], "delta-cat one-hot on {name}");
        // delta-svd: same delta-W (factors re-factored), same scaling config.
        let svd = merge(&refs, &w, MergeMode::DeltaSvd { rank: None }).unwrap();
        assert_eq!(svd.method, objs[hot].method, "{name}: config kept");
        assert_delta_close(&delta_w(&svd), &delta_w(&objs[hot]), 1e-5);
        // param: among candidates of the same configuration.
        let same = [&objs[hot], &objs[hot]];
        let p = merge(&same, &[1.0, 0.0], MergeMode::Param).unwrap();
        assert_eq!(p, objs[hot], "param one-hot on {name}");
        // and it still writes and reads back as the same adapter.
        let dir = tempfile::tempdir().unwrap();
        write_adapter(&cat, &dir.path().join("x")).unwrap();
        assert_eq!(
            read_adapter(&dir.path().join("x"), &ReadOptions::default()).unwrap(),
            objs[hot]
        );
    }
}

#[test]
fn delta_cat_is_exact_across_ranks_and_rslora() {
    let (a, b) = (fixture("lora_r8_qv"), fixture("lora_rslora")); // r=8 alpha 16; r=16 rsLoRA alpha 16
    let w = [0.3, 0.7];
    let m = merge(&[&a, &b], &w, MergeMode::DeltaCat).unwrap();
    let Method::Lora(cfg) = &m.method else {
        panic!()
    };
    // The output keeps the highest-weight candidate's scaling mode (rsLoRA) at rank 24.
    assert!(cfg.use_rslora);
    assert_eq!(
        cfg.rank_alpha_for("encoder.layer.3.attention.self.query").0,
        24
    );
    let want = combine(&[(w[0], &delta_w(&a)), (w[1], &delta_w(&b))]);
    assert_delta_close(&delta_w(&m), &want, 1e-5);
    // It is a valid PEFT folder that reads back with the same rank_pattern.
    let dir = tempfile::tempdir().unwrap();
    write_adapter(&m, &dir.path().join("m")).unwrap();
    let back = read_adapter(&dir.path().join("m"), &ReadOptions::default()).unwrap();
    assert_delta_close(&delta_w(&back), &want, 1e-5);
}

#[test]
fn delta_svd_is_the_best_rank_r_approximation() {
    let (a, b) = (fixture("lora_r8_qv"), fixture("lora_rank_pattern"));
    let w = [0.6, 0.4];
    // Target rank = sum of ranks per module: the SVD merge is then exact too.
    let full = merge(&[&a, &b], &w, MergeMode::DeltaSvd { rank: Some(64) }).unwrap();
    let want = combine(&[(w[0], &delta_w(&a)), (w[1], &delta_w(&b))]);
    assert_delta_close(&delta_w(&full), &want, 1e-4);
    // key modules only exist in lora_rank_pattern: they are merged with weight 0.4.
    assert!(want.keys().any(|m| m.ends_with("key")));
    // Default target rank (the base's r per module) loses information but stays a valid adapter of rank 8.
    let trunc = merge(&[&a, &b], &w, MergeMode::DeltaSvd { rank: None }).unwrap();
    let Method::Lora(cfg) = &trunc.method else {
        panic!()
    };
    assert_eq!(
        cfg.rank_alpha_for("encoder.layer.1.attention.self.value").0,
        8
    );
    let err: f64 = delta_w(&trunc)
        .iter()
        .map(|(m, (_, _, d))| {
            d.iter()
                .zip(&want[m].2)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
        })
        .sum();
    assert!(err > 0.0);
}

#[test]
fn param_mode_refuses_mixed_shapes_and_points_to_delta_merges() {
    let (a, b) = (fixture("lora_r8_qv"), fixture("lora_rslora"));
    let e = merge(&[&a, &b], &[0.5, 0.5], MergeMode::Param).unwrap_err();
    assert!(matches!(e, EnsembleError::MixedShapes { .. }));
    assert!(e.to_string().contains("delta-cat"), "{e}");
    let ia3 = fixture("ia3");
    assert!(matches!(
        merge(&[&a, &ia3], &[0.5, 0.5], MergeMode::DeltaCat),
        Err(EnsembleError::NotLora { index: 1, .. })
    ));
    assert!(matches!(
        merge(&[&a], &[0.5], MergeMode::Param),
        Err(EnsembleError::BadWeights(_))
    ));
    assert_eq!(average(&[]), Err(EnsembleError::NoCandidates));
}

#[test]
fn baselines() {
    let a = fixture("ia3");
    let mut b = a.clone();
    for t in &mut b.tensors {
        let v: Vec<f32> = t.to_f32().iter().map(|x| x * 3.0).collect();
        *t = peftdb::object::Tensor::from_f32(t.name.clone(), t.shape.clone(), &v);
    }
    let avg = average(&[&a, &b]).unwrap();
    for (t, x) in avg.tensors.iter().zip(&a.tensors) {
        for (p, q) in t.to_f32().iter().zip(x.to_f32()) {
            assert!((p - 2.0 * q).abs() <= 1e-6 * (1.0 + q.abs()));
        }
    }
    assert_eq!(best_single(&[&a, &b], &[0.1, 0.2]).unwrap(), b);
    // softmax of a dominant score puts almost all weight on it, like best single.
    let w = softmax_weights(&[0.1, 5.0], 1.0).unwrap();
    assert!(w[1] > 0.99);
}

#[test]
fn cli_merge_writes_a_loadable_adapter_and_one_hot_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    let run = |args: &[&str], out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
            .args(["merge", "--adapter"])
            .arg(fx.join("lora_r8_qv"))
            .arg("--adapter")
            .arg(fx.join("lora_rslora"))
            .args(args)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let one_hot = dir.path().join("one-hot");
    let o = run(&["--weights", "0,1", "--merge", "delta-cat"], &one_hot);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert_eq!(
            std::fs::read(one_hot.join(f)).unwrap(),
            std::fs::read(fx.join("lora_rslora").join(f)).unwrap(),
            "{f}"
        );
    }
    let soft = dir.path().join("soft");
    let o = run(
        &[
            "--scores",
            "0.2,0.1",
            "--tau",
            "0.1",
            "--merge",
            "delta-svd",
        ],
        &soft,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = read_adapter(&soft, &ReadOptions::default()).unwrap();
    assert!(matches!(back.method, Method::Lora(_)));
    // The default for LoRA candidates is the exact delta-W merge: mixed ranks (8 and 16) are fine.
    let default = dir.path().join("default");
    let o = run(&[], &default);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = read_adapter(&default, &ReadOptions::default()).unwrap();
    assert!(matches!(back.method, Method::Lora(_)));
    // Mixed ranks in parameter space: a clear error, nothing written.
    let bad = dir.path().join("bad");
    let o = run(&["--merge", "param"], &bad);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("delta merge"));
    assert!(!bad.exists());
    // A temperature <= 0 is refused.
    let o = run(&["--scores", "1,2", "--tau", "0"], &dir.path().join("t0"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("temperature"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
