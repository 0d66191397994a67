//! Every adapter written by Hugging Face PEFT in tests/fixtures/peft: read, embedded (checked against an
//! independent computation straight from the safetensors bytes), stored, and exported byte-identical.

use peftdb::embed::tupate;
use peftdb::embed::EmbeddingKind;
use peftdb::object::ReadOptions;
use peftdb::object::{read_adapter, DType, Method, MethodKind, Tensor};
use peftdb::store::{NewObject, Outcome, Store, TaskRecord};

mod common;

use common::fixtures;

const ALL: &[&str] = &common::FIXTURES;

/// Read a tensor as f32 with the reference safetensors crate (not peftdb's reader).
fn reference_tensors(dir: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixtures().join(dir).join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let vals = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.push((name, view.shape().to_vec(), vals));
    }
    out
}

fn get<'a>(ts: &'a [(String, Vec<usize>, Vec<f32>)], name: &str) -> &'a [f32] {
    &ts.iter()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .2
}

fn mean_of_layers(per_layer: Vec<Vec<f32>>) -> Vec<f32> {
    let n = per_layer.len() as f64;
    let d = per_layer[0].len();
    (0..d)
        .map(|j| (per_layer.iter().map(|v| v[j] as f64).sum::<f64>() / n) as f32)
        .collect()
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "dimension");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

/// TuPaTE by hand: the layer's tensors in the documented order, listed explicitly.
fn expected_by_names(
    dir: &str,
    layer_names: impl Fn(usize) -> Vec<String>,
    layers: usize,
) -> Vec<f32> {
    let ts = reference_tensors(dir);
    let per_layer: Vec<Vec<f32>> = (0..layers)
        .map(|i| {
            layer_names(i)
                .iter()
                .flat_map(|n| get(&ts, n).to_vec())
                .collect()
        })
        .collect();
    mean_of_layers(per_layer)
}

#[test]
fn lora_embeddings_match_independent_computation() {
    for dir in ["lora_r8_qv", "lora_rslora"] {
        let obj = read_adapter(&fixtures().join(dir), &ReadOptions::default()).unwrap();
        let e = tupate(&obj).unwrap();
        let want = expected_by_names(
            dir,
            |i| {
                let p = format!("base_model.model.encoder.layer.{i}.attention.self");
                vec![
                    format!("{p}.query.lora_A.weight"),
                    format!("{p}.query.lora_B.weight"),
                    format!("{p}.value.lora_A.weight"),
                    format!("{p}.value.lora_B.weight"),
                ]
            },
            6,
        );
        assert_close(&e.vector, &want);
        let r = if dir == "lora_r8_qv" { 8 } else { 16 };
        assert_eq!(e.space.dim(), 4 * r * 384);
    }
}

#[test]
fn ia3_embedding_matches_independent_computation() {
    let obj = read_adapter(&fixtures().join("ia3"), &ReadOptions::default()).unwrap();
    let e = tupate(&obj).unwrap();
    let want = expected_by_names(
        "ia3",
        |i| {
            let p = format!("base_model.model.encoder.layer.{i}");
            vec![
                format!("{p}.attention.output.dense.ia3_l"),
                format!("{p}.attention.self.key.ia3_l"),
                format!("{p}.attention.self.value.ia3_l"),
                format!("{p}.output.dense.ia3_l"),
            ]
        },
        6,
    );
    assert_close(&e.vector, &want);
    assert_eq!(e.space.dim(), 384 * 3 + 1536);
}

#[test]
fn bias_all_embedding_uses_every_in_layer_tensor() {
    let obj = read_adapter(&fixtures().join("lora_bias_all"), &ReadOptions::default()).unwrap();
    let e = tupate(&obj).unwrap();
    let ts = reference_tensors("lora_bias_all");
    let per_layer: Vec<Vec<f32>> = (0..6)
        .map(|i| {
            let prefix = format!("base_model.model.encoder.layer.{i}.");
            let mut names: Vec<(String, &str)> = ts
                .iter()
                .filter_map(|(n, _, _)| {
                    n.strip_prefix(&prefix).map(|rel| {
                        // key = module + role: drop PEFT's ".base_layer" and the trailing ".weight" of LoRA
                        let key = rel
                            .replace(".base_layer", "")
                            .replace(".lora_A.weight", ".lora_A")
                            .replace(".lora_B.weight", ".lora_B");
                        (key, n.as_str())
                    })
                })
                .collect();
            names.sort();
            names
                .iter()
                .flat_map(|(_, n)| get(&ts, n).to_vec())
                .collect()
        })
        .collect();
    let want = mean_of_layers(per_layer);
    assert_close(&e.vector, &want);
    // The embedding LayerNorm bias and the pooler are outside the layers and not part of the embedding.
    assert!(obj
        .tensors
        .iter()
        .any(|t| t.name.contains("embeddings.LayerNorm.bias")));
}

#[test]
fn prefix_embedding_splits_key_and_value_per_layer() {
    let obj = read_adapter(&fixtures().join("prefix_20"), &ReadOptions::default()).unwrap();
    let e = tupate(&obj).unwrap();
    let ts = reference_tensors("prefix_20");
    let table = get(&ts, "prompt_embeddings");
    let (rows, d, layers) = (20, 384, 6);
    let width = layers * 2 * d;
    let per_layer: Vec<Vec<f32>> = (0..layers)
        .map(|l| {
            let mut v = Vec::new();
            for kv in 0..2 {
                for r in 0..rows {
                    let start = r * width + (2 * l + kv) * d;
                    v.extend_from_slice(&table[start..start + d]);
                }
            }
            v
        })
        .collect();
    assert_close(&e.vector, &mean_of_layers(per_layer));
    assert_eq!(e.space.dim(), 2 * rows * d);
}

#[test]
fn prompt_embedding_is_the_prompt_table() {
    let obj = read_adapter(&fixtures().join("prompt_10"), &ReadOptions::default()).unwrap();
    let e = tupate(&obj).unwrap();
    let ts = reference_tensors("prompt_10");
    assert_close(&e.vector, get(&ts, "prompt_embeddings"));
}

#[test]
fn rank_pattern_is_stored_without_embedding_and_says_why() {
    let obj = read_adapter(
        &fixtures().join("lora_rank_pattern"),
        &ReadOptions::default(),
    )
    .unwrap();
    match &obj.method {
        Method::Lora(c) => {
            assert_eq!(
                c.rank_alpha_for("encoder.layer.0.attention.self.query").0,
                2
            );
            assert_eq!(
                c.rank_alpha_for("encoder.layer.1.attention.self.query").0,
                4
            );
            assert_eq!(
                c.rank_alpha_for("encoder.layer.4.attention.self.value").0,
                6
            );
        }
        other => panic!("{other:?}"),
    }
    let why = tupate(&obj).unwrap_err();
    assert!(why.reason.contains("cannot be averaged"), "{}", why.reason);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("z.redb")).unwrap();
    let out = store
        .ingest(NewObject {
            object: obj,
            task: TaskRecord::named("rp"),
            source: None,
            stage: None,
            metrics: Default::default(),
        })
        .unwrap();
    let Outcome::Added(id) = out else {
        panic!("{out:?}")
    };
    let rec = store.object(id).unwrap();
    // No TuPaTE embedding (the layers differ in shape); the update's sketch has no such limit.
    assert!(rec.tupate_space().is_none());
    let kinds: Vec<EmbeddingKind> = rec.embeddings.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EmbeddingKind::DeltaSketch]);
    assert_eq!(rec.no_embedding.len(), 1);
    assert_eq!(rec.no_embedding[0].kind, EmbeddingKind::Tupate);
    assert!(
        rec.no_embedding[0].reason.contains("layer 0"),
        "{}",
        rec.no_embedding[0].reason
    );
}

#[test]
fn every_fixture_round_trips_byte_for_byte_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("z.redb")).unwrap();
    let kinds = [
        MethodKind::Lora,
        MethodKind::Lora,
        MethodKind::Lora,
        MethodKind::Lora,
        MethodKind::Ia3,
        MethodKind::Prefix,
        MethodKind::Prompt,
    ];
    for (name, kind) in ALL.iter().zip(kinds) {
        let src = fixtures().join(name);
        let obj = read_adapter(&src, &ReadOptions::default()).unwrap();
        assert_eq!(obj.method.kind(), kind, "{name}");
        assert_eq!(obj.base_model, "sentence-transformers/all-MiniLM-L6-v2");
        let out = store
            .ingest(NewObject {
                object: obj,
                task: TaskRecord::named(*name),
                source: Some(src.display().to_string()),
                stage: None,
                metrics: Default::default(),
            })
            .unwrap();
        let Outcome::Added(id) = out else {
            panic!("{name}: {out:?}")
        };
        let target = dir.path().join("out").join(name);
        store.export(id, &target).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let a = std::fs::read(src.join(f)).unwrap();
            let b = std::fs::read(target.join(f)).unwrap();
            assert!(a == b, "{name}/{f} differs after export");
        }
    }
    // Reopen: everything is still there, and the same bytes are recognised.
    drop(store);
    let store = Store::open(dir.path().join("z.redb")).unwrap();
    assert_eq!(store.objects().unwrap().len(), ALL.len());
    let again = read_adapter(&fixtures().join("ia3"), &ReadOptions::default()).unwrap();
    let out = store
        .ingest(NewObject {
            object: again,
            task: TaskRecord::named("ia3"),
            source: None,
            stage: None,
            metrics: Default::default(),
        })
        .unwrap();
    assert!(matches!(out, Outcome::AlreadyPresent(_)), "{out:?}");
    assert_eq!(store.objects().unwrap().len(), ALL.len());
}

#[test]
fn half_precision_is_kept_and_embedded_in_f32() {
    let obj = read_adapter(&fixtures().join("lora_r8_qv"), &ReadOptions::default()).unwrap();
    let e32 = tupate(&obj).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let mut o = obj.clone();
        o.tensors = o
            .tensors
            .iter()
            .map(|t| {
                let vals = t.to_f32();
                let mut data = Vec::new();
                for v in vals {
                    match dtype {
                        DType::F16 => data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                        _ => data.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                    }
                }
                Tensor {
                    name: t.name.clone(),
                    dtype,
                    shape: t.shape.clone(),
                    data,
                }
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        peftdb::object::write_adapter(&o, &p).unwrap();
        let back = read_adapter(&p, &ReadOptions::default()).unwrap();
        assert_eq!(back.tensors, o.tensors, "{dtype} tensors round-trip");
        let e = tupate(&back).unwrap();
        assert_eq!(e.space, e32.space);
        let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 };
        for (a, b) in e.vector.iter().zip(&e32.vector) {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{dtype}: {a} vs {b}"
            );
        }
    }
}
