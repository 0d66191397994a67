//! Formats without a PEFT fixture: AdapterHub bottleneck adapters and peftdb's BitFit bias sets; and the
//! base-model check across adapters.

use peftdb::embed::tupate;
use peftdb::error::ReadError;
use peftdb::object::safetensors_io;
use peftdb::object::ReadOptions;
use peftdb::object::{read_adapter, write_adapter, AdapterFormat, Method, Tensor};
use peftdb::store::{NewObject, Outcome, Store, TaskRecord};
use peftdb::synth::{bitfit, lora, ModelShape, Seeds};
use std::path::Path;

/// An AdapterHub-style Houlsby adapter folder, written the way the `adapters` library lays it out.
fn write_adapterhub(dir: &Path, layers: usize, hidden: usize, bottleneck: usize) -> Vec<Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "config": {
            "mh_adapter": true, "output_adapter": true, "reduction_factor": hidden / bottleneck,
            "non_linearity": "swish", "original_ln_before": true, "original_ln_after": true,
            "residual_before_ln": true, "adapter_residual_before_ln": false, "ln_before": false,
            "ln_after": false, "init_weights": "bert", "is_parallel": false, "scaling": 1.0,
            "use_gating": false, "architecture": "bottleneck"
        },
        "hidden_size": hidden, "model_class": "BertAdapterModel", "model_name": "bert-base-uncased",
        "model_type": "bert", "name": "sst-2", "version": "adapters.1.0.0"
    });
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    let mut tensors = Vec::new();
    let mut k = 0f32;
    let mut vals = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                k += 1.0;
                (k * 0.37).sin()
            })
            .collect()
    };
    for i in 0..layers {
        for place in ["attention.output", "output"] {
            let p = format!("bert.encoder.layer.{i}.{place}.adapters.sst-2");
            tensors.push(Tensor::from_f32(
                format!("{p}.adapter_down.0.weight"),
                vec![bottleneck, hidden],
                &vals(bottleneck * hidden),
            ));
            tensors.push(Tensor::from_f32(
                format!("{p}.adapter_down.0.bias"),
                vec![bottleneck],
                &vals(bottleneck),
            ));
            tensors.push(Tensor::from_f32(
                format!("{p}.adapter_up.weight"),
                vec![hidden, bottleneck],
                &vals(bottleneck * hidden),
            ));
            tensors.push(Tensor::from_f32(
                format!("{p}.adapter_up.bias"),
                vec![hidden],
                &vals(hidden),
            ));
        }
    }
    std::fs::write(
        dir.join("adapter.safetensors"),
        safetensors_io::serialize(&tensors, None),
    )
    .unwrap();
    tensors
}

#[test]
fn adapterhub_bottleneck_reads_embeds_and_exports_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hub");
    let tensors = write_adapterhub(&src, 3, 64, 4);
    let obj = read_adapter(&src, &ReadOptions::default()).unwrap();
    assert_eq!(obj.format, AdapterFormat::Adapterhub);
    assert_eq!(obj.base_model, "bert-base-uncased");
    match &obj.method {
        Method::Adapter(c) => {
            assert_eq!(
                (c.name.as_str(), c.hidden_size, c.bottleneck_size),
                ("sst-2", 64, 4)
            );
            assert!(c.mh_adapter && c.output_adapter);
            assert_eq!(c.non_linearity, "swish");
        }
        m => panic!("{m:?}"),
    }
    assert_eq!(obj.tensors, tensors);
    // Per layer: 2 placements x (down w, down b, up w, up b).
    let e = tupate(&obj).unwrap();
    assert_eq!(e.space.dim(), 2 * (4 * 64 + 4 + 64 * 4 + 64));
    // The mean of the three layers, in the documented order (attention.output before output; adapter_down
    // before adapter_up; weight before bias).
    let layer = |i: usize| -> Vec<f32> {
        let mut v = Vec::new();
        for place in ["attention.output", "output"] {
            for role in [
                "adapter_down.0.bias",
                "adapter_down.0.weight",
                "adapter_up.bias",
                "adapter_up.weight",
            ] {
                let name = format!("bert.encoder.layer.{i}.{place}.adapters.sst-2.{role}");
                v.extend(tensors.iter().find(|t| t.name == name).unwrap().to_f32());
            }
        }
        v
    };
    let (a, b, c) = (layer(0), layer(1), layer(2));
    // Order inside a layer follows the sorted keys: adapter_down.bias < adapter_down.weight < adapter_up.bias < ...
    for j in 0..a.len() {
        let want = (a[j] as f64 + b[j] as f64 + c[j] as f64) / 3.0;
        assert!((e.vector[j] as f64 - want).abs() < 1e-6, "element {j}");
    }
    let out = dir.path().join("out");
    write_adapter(&obj, &out).unwrap();
    for f in ["adapter_config.json", "adapter.safetensors"] {
        assert_eq!(
            std::fs::read(src.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn adapterhub_pickle_is_refused_with_the_conversion_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hub");
    write_adapterhub(&src, 1, 8, 2);
    std::fs::remove_file(src.join("adapter.safetensors")).unwrap();
    std::fs::write(
        src.join("pytorch_adapter.bin"),
        b"\x80\x04\x95 not really a pickle",
    )
    .unwrap();
    let err = read_adapter(&src, &ReadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ReadError::PickleRefused { ref path } if path.ends_with("pytorch_adapter.bin")),
        "{err}"
    );
    assert!(err.to_string().contains("save_file"), "{err}");
}

#[test]
fn bitfit_round_trips_and_rejects_non_bias_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let obj = bitfit(
        &ModelShape::minilm(),
        Seeds {
            group: 1,
            task: 2,
            object: 3,
        },
    );
    let p = dir.path().join("bitfit");
    write_adapter(&obj, &p).unwrap();
    let back = read_adapter(&p, &ReadOptions::default()).unwrap();
    assert_eq!(back, obj);
    assert_eq!(tupate(&back).unwrap().space.dim(), 7 * 384 + 1536);
    // A weight matrix in a BitFit set is refused.
    let mut bad = obj.clone();
    bad.tensors.push(Tensor::from_f32(
        "base_model.model.encoder.layer.0.attention.self.query.weight",
        vec![2, 2],
        &[0.0; 4],
    ));
    let q = dir.path().join("bad");
    write_adapter(&bad, &q).unwrap();
    let err = read_adapter(&q, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::UnexpectedTensor { .. }), "{err}");
}

#[test]
fn an_adapter_for_another_base_model_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path().join("z.redb")).unwrap();
    let s = Seeds {
        group: 1,
        task: 1,
        object: 1,
    };
    let small = lora(&ModelShape::minilm(), 8, &["query", "value"], s);
    let new = |object| NewObject {
        object,
        task: TaskRecord::named("t"),
        source: None,
        stage: None,
        metrics: Default::default(),
    };
    assert!(matches!(
        store.ingest(new(small)).unwrap(),
        Outcome::Added(_)
    ));
    // A BERT-base LoRA (768 wide) that claims to be for all-MiniLM-L6-v2.
    let mut big = lora(&ModelShape::bert_base(), 8, &["query", "value"], s);
    big.base_model = ModelShape::minilm().name;
    let before = store.stats().unwrap();
    match store.ingest(new(big)).unwrap() {
        Outcome::Rejected(reason) => {
            assert!(reason.contains("another base model"), "{reason}");
            assert!(reason.contains("attention.self.query.in = 768"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let after = store.stats().unwrap();
    assert_eq!(
        (after.objects, after.tensor_bytes, after.spaces.len()),
        (before.objects, before.tensor_bytes, before.spaces.len())
    );
}
