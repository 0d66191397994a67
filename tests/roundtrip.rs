//! Property tests (proptest) for encode/decode round trips through the public API (the store codec's own
//! are its unit tests): safetensors serialize -> parse (any names, dtypes, shapes, metadata), mutated bytes
//! (never panics), and adapters through write_adapter -> read_adapter -> store -> export byte-identically.

use peftdb::object::safetensors_io::{parse, serialize};
use peftdb::object::{DType, Tensor};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

fn tensor() -> impl Strategy<Value = (String, DType, Vec<usize>)> {
    (
        "[a-zA-Z0-9_.\\-/ \u{e9}\u{4e2d}]{1,40}",
        dtype(),
        proptest::collection::vec(1usize..5, 0..4),
    )
}

fn tensors() -> impl Strategy<Value = Vec<Tensor>> {
    proptest::collection::vec((tensor(), any::<u64>()), 1..6).prop_map(|ts| {
        let mut seen = std::collections::HashSet::new();
        ts.into_iter()
            .filter(|((n, _, _), _)| n != "__metadata__" && seen.insert(n.clone()))
            .map(|((name, dtype, shape), seed)| {
                let n: usize = shape.iter().product::<usize>() * dtype.size();
                let mut x = seed | 1;
                let data = (0..n)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                Tensor {
                    name,
                    dtype,
                    shape,
                    data,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_round_trip(ts in tensors(), meta in proptest::option::of(proptest::collection::btree_map("[a-z\"\\\\]{1,8}", "[ -~]{0,12}", 0..3))) {
        let bytes = serialize(&ts, meta.as_ref());
        let f = parse(&bytes).unwrap();
        prop_assert_eq!(&f.tensors, &ts);
        let meta: Option<BTreeMap<String, String>> = meta;
        prop_assert_eq!(&f.metadata, &meta);
        // Byte-identical when written again.
        prop_assert_eq!(serialize(&f.tensors, f.metadata.as_ref()), bytes);
    }

    #[test]
    fn safetensors_mutations_never_panic(ts in tensors(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8), cut in any::<usize>()) {
        let mut bytes = serialize(&ts, None);
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] ^= b;
        }
        let _ = parse(&bytes);
        let _ = parse(&bytes[..cut % (bytes.len() + 1)]);
    }
}

/// Adapters of every synthetic method: write -> read -> store -> export is byte-identical.
#[test]
fn adapters_round_trip_through_the_store_byte_identically() {
    use peftdb::object::ReadOptions;
    use peftdb::synth::{bitfit, ia3, lora, prefix, ModelShape, Seeds};
    let tmp = tempfile::tempdir().unwrap();
    let m = ModelShape::minilm();
    let store = peftdb::store::Store::create(tmp.path().join("r.peftdb")).unwrap();
    for seed in 0..4u64 {
        let s = Seeds {
            group: seed,
            task: seed * 3,
            object: seed * 7,
        };
        for (i, obj) in [
            lora(&m, 1 + seed as usize, &["query", "value"], s),
            bitfit(&m, s),
            ia3(&m, s),
            prefix(&m, 5 + seed as usize, s),
        ]
        .into_iter()
        .enumerate()
        {
            let dir = tmp.path().join(format!("a{seed}-{i}"));
            peftdb::object::write_adapter(&obj, &dir).unwrap();
            let back = peftdb::object::read_adapter(&dir, &ReadOptions::default()).unwrap();
            assert_eq!(back.tensors, obj.tensors);
            let id = match store
                .ingest(peftdb::store::NewObject {
                    object: back,
                    task: peftdb::store::TaskRecord::named(format!("t{seed}")),
                    source: None,
                    stage: None,
                    metrics: Default::default(),
                })
                .unwrap()
            {
                peftdb::store::Outcome::Added(id) => id,
                o => panic!("{o:?}"),
            };
            let out = tmp.path().join(format!("e{seed}-{i}"));
            store.export(id, &out).unwrap();
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap();
                assert_eq!(
                    std::fs::read(f.path()).unwrap(),
                    std::fs::read(out.join(f.file_name())).unwrap(),
                    "{:?}",
                    f.file_name()
                );
            }
        }
    }
}
