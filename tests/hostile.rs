//! Hostile input: a corpus of malformed adapters, generated from the real PEFT fixtures into a temporary
//! folder. Every case must be refused by the reader with its *specific* error (the variant is asserted, and
//! the message must name the offending file), and ingesting it must store nothing: the store's full
//! snapshot (objects, tensors' hashes, embeddings, tasks, spaces) is identical before and after.
//! No pickle is ever deserialized (a pickle that would create a marker file when unpickled is offered).

mod common;

use common::{copy_dir, fixture, peft_configs, snapshot};
use peftdb::error::{ReadError, SafetensorsError};
use peftdb::ingest::{ingest_zoo, IngestOptions, ItemOutcome};
use peftdb::object::safetensors_io;
use peftdb::object::ReadOptions;
use peftdb::object::{read_adapter, DType, Tensor};
use peftdb::store::Store;
use std::path::{Path, PathBuf};

const ST: &str = "adapter_model.safetensors";
const CFG: &str = "adapter_config.json";

fn lora_fixture_tensors() -> Vec<Tensor> {
    let b = std::fs::read(fixture("lora_r8_qv").join(ST)).unwrap();
    safetensors_io::parse(&b).unwrap().tensors
}

/// A safetensors file from a raw header string and data section (header padded like the writer does).
fn raw_st(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// Header entries for tensors laid out contiguously (optionally with per-entry overrides).
fn header_for(tensors: &[Tensor]) -> (Vec<String>, Vec<u8>) {
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for t in tensors {
        let b = data.len();
        data.extend_from_slice(&t.data);
        entries.push(format!(
            "{:?}:{{\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{},{}]}}",
            t.name,
            t.dtype.as_str(),
            t.shape,
            b,
            data.len()
        ));
    }
    (entries, data)
}

/// Make a case folder: a copy of `base` fixture, then `edit` it.
fn case(root: &Path, name: &str, base: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = root.join(name);
    copy_dir(&fixture(base), &dir);
    edit(&dir);
    dir
}

fn write_st(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join(ST), bytes).unwrap();
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join(CFG);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn set_f32(t: &mut Tensor, index: usize, v: f32) {
    assert_eq!(t.dtype, DType::F32);
    t.data[index * 4..index * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

fn to_f16(t: &Tensor) -> Tensor {
    let vals = t.to_f32();
    let mut data = Vec::with_capacity(vals.len() * 2);
    for v in vals {
        data.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    Tensor {
        name: t.name.clone(),
        dtype: DType::F16,
        shape: t.shape.clone(),
        data,
    }
}

type Check = Box<dyn Fn(&ReadError) -> bool>;

struct Case {
    name: &'static str,
    dir: PathBuf,
    /// The file the error must name (defaults to the case folder).
    names: PathBuf,
    check: Check,
}

fn st_err(f: impl Fn(&SafetensorsError) -> bool + 'static) -> Check {
    Box::new(move |e| matches!(e, ReadError::Safetensors { source, .. } if f(source)))
}

/// Build the whole corpus (every case a folder under `root`).
fn corpus(root: &Path) -> Vec<Case> {
    let tensors = lora_fixture_tensors();
    let mut v: Vec<Case> = Vec::new();
    let mut add = |name: &'static str, dir: PathBuf, names: PathBuf, check: Check| {
        v.push(Case {
            name,
            dir,
            names,
            check,
        })
    };

    // 1. Truncated in the data section.
    let d = case(root, "truncated_data", "lora_r8_qv", |d| {
        let b = std::fs::read(d.join(ST)).unwrap();
        write_st(d, &b[..b.len() - 1000]);
    });
    add(
        "truncated_data",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::OffsetsOutOfRange { .. })),
    );
    // 2. Truncated below the 8-byte length prefix.
    let d = case(root, "truncated_prefix", "lora_r8_qv", |d| {
        write_st(d, &[1, 2, 3, 4, 5]);
    });
    add(
        "truncated_prefix",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::Truncated { len: 5 })),
    );
    // 3. Header length larger than the file.
    let d = case(root, "header_beyond_file", "lora_r8_qv", |d| {
        let mut b = std::fs::read(d.join(ST)).unwrap();
        let n = b.len() as u64; // > len - 8
        b[..8].copy_from_slice(&n.to_le_bytes());
        write_st(d, &b);
    });
    add(
        "header_beyond_file",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::HeaderBeyondFile { .. })),
    );
    // 4. Header bomb: a declared header of u64::MAX bytes (must not allocate it).
    let d = case(root, "header_bomb", "lora_r8_qv", |d| {
        let mut b = std::fs::read(d.join(ST)).unwrap();
        b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        write_st(d, &b);
    });
    add(
        "header_bomb",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::HeaderTooLarge { .. })),
    );
    // 5. Header that is not UTF-8 (a tensor name with invalid bytes).
    let d = case(root, "header_not_utf8", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e[0] = e[0].replacen("base_model", "base_\u{1}odel", 1);
        let mut b = raw_st(&format!("{{{}}}", e.join(",")), &data);
        let pos = b.windows(7).position(|w| w == b"base_\x01o").unwrap();
        b[pos + 5] = 0xff; // invalid UTF-8 byte in the name
        write_st(d, &b);
    });
    add(
        "header_not_utf8",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::HeaderNotUtf8)),
    );
    // 6. Header that is not JSON.
    let d = case(root, "header_not_json", "lora_r8_qv", |d| {
        write_st(d, &raw_st("{\"a\": [1, 2,", &[0u8; 16]));
    });
    add(
        "header_not_json",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::HeaderJson(_))),
    );
    // 7. Deeply nested header JSON (stack-overflow attempt).
    let d = case(root, "header_deep_nesting", "lora_r8_qv", |d| {
        let depth = 100_000;
        let h = format!("{{\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        write_st(d, &raw_st(&h, &[]));
    });
    add(
        "header_deep_nesting",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::HeaderJson(_))),
    );
    // 8. Duplicate tensor names (a JSON map would silently keep one).
    let d = case(root, "duplicate_tensor", "lora_r8_qv", |d| {
        let mut ts = tensors.clone();
        ts[1].name = ts[0].name.clone();
        ts[1].shape = ts[0].shape.clone();
        let (e, data) = header_for(&ts);
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    let dup = tensors[0].name.clone();
    add(
        "duplicate_tensor",
        d.clone(),
        d.join(ST),
        st_err(move |s| matches!(s, SafetensorsError::DuplicateTensor { name } if *name == dup)),
    );
    // 9. A dtype peftdb does not store (I64 / F64).
    let d = case(root, "unsupported_dtype", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e[2] = e[2].replace("\"F32\"", "\"F64\"");
        // F64 with the same byte span would be a length mismatch too; the dtype is checked first.
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "unsupported_dtype",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::UnsupportedDtype { dtype, .. } if dtype == "F64")),
    );
    // 10. Zero-sized shape.
    let d = case(root, "zero_sized_shape", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        let n = tensors.len();
        e.push(format!(
            "\"extra.lora_A.weight\":{{\"dtype\":\"F32\",\"shape\":[0,384],\"data_offsets\":[{0},{0}]}}",
            data.len()
        ));
        assert_eq!(e.len(), n + 1);
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "zero_sized_shape",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::BadShape { .. })),
    );
    // 11. Huge shape whose element count overflows u64.
    let d = case(root, "huge_shape_overflow", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e[0] = e[0].replace("[8, 384]", &format!("[{}, 4]", u64::MAX / 2));
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "huge_shape_overflow",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::BadShape { .. })),
    );
    // 12. Huge (non-overflowing) shape claiming terabytes: never allocated, a length mismatch.
    let d = case(root, "huge_shape_terabytes", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e[0] = e[0].replace("[8, 384]", "[1048576, 1048576]");
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "huge_shape_terabytes",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::LengthMismatch { .. })),
    );
    // 13. Too many dimensions.
    let d = case(root, "too_many_dims", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e[0] = e[0].replace("[8, 384]", "[1,1,1,1,1,1,1,8,384]");
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "too_many_dims",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::BadShape { .. })),
    );
    // 14. Overlapping offsets (two tensors share bytes; the section keeps its length).
    let d = case(root, "overlapping_offsets", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        // tensor 1 is [384, 8] at [12288, 24576): move it to start inside tensor 0 and shrink the section use
        e[1] = e[1].replace("[12288,24576]", "[6144,18432]");
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "overlapping_offsets",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::Overlap { .. })),
    );
    // 15. Offsets beyond the data section.
    let d = case(root, "offsets_out_of_range", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        let last = e.len() - 1;
        let end = data.len();
        e[last] = e[last].replace(
            &format!(",{end}]"),
            &format!(",{}]", end as u64 + (1 << 40)),
        );
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "offsets_out_of_range",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::OffsetsOutOfRange { .. })),
    );
    // 16. Reversed offsets (begin > end).
    let d = case(root, "offsets_reversed", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e[0] = e[0].replace("[0,12288]", "[12288,0]");
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "offsets_reversed",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::OffsetsOutOfRange { .. })),
    );
    // 17. A gap in the data section.
    let d = case(root, "data_gap", "lora_r8_qv", |d| {
        let (e, mut data) = header_for(&tensors[1..2]);
        let e0 = e[0].replace("[0,12288]", "[16,12304]");
        let mut pad = vec![0u8; 16];
        pad.append(&mut data);
        write_st(d, &raw_st(&format!("{{{e0}}}"), &pad));
    });
    add(
        "data_gap",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::Gap { at: 0, next: 16 })),
    );
    // 18. Trailing bytes after the last tensor.
    let d = case(root, "trailing_bytes", "lora_r8_qv", |d| {
        let mut b = std::fs::read(d.join(ST)).unwrap();
        b.extend_from_slice(&[0u8; 64]);
        write_st(d, &b);
    });
    add(
        "trailing_bytes",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::TrailingBytes { .. })),
    );
    // 19. Metadata values that are not strings.
    let d = case(root, "metadata_not_strings", "lora_r8_qv", |d| {
        let (mut e, data) = header_for(&tensors);
        e.insert(
            0,
            "\"__metadata__\":{\"format\":{\"nested\":[1,2,3]}}".into(),
        );
        write_st(d, &raw_st(&format!("{{{}}}", e.join(",")), &data));
    });
    add(
        "metadata_not_strings",
        d.clone(),
        d.join(ST),
        st_err(|s| matches!(s, SafetensorsError::HeaderJson(m) if m.contains("__metadata__"))),
    );
    // 20. Mixed dtypes (one tensor saved as F16): the dtype the rest of the adapter does not match.
    let d = case(root, "mixed_dtypes", "lora_r8_qv", |d| {
        let mut ts = tensors.clone();
        ts[3] = to_f16(&ts[3]);
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "mixed_dtypes",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::MixedDtypes { .. })),
    );
    // 21. LoRA A whose rank is not the config's r.
    let d = case(root, "lora_rank_not_r", "lora_r8_qv", |d| {
        edit_config(d, |c| {
            c.insert("r".into(), 4.into());
        });
    });
    add(
        "lora_rank_not_r",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::ShapeMismatch { .. })),
    );
    // 22. LoRA A and B with inconsistent ranks (A is [4, 384], B stays [384, 8]).
    let d = case(root, "lora_a_b_rank_disagree", "lora_r8_qv", |d| {
        let mut ts = tensors.clone();
        ts[0].shape = vec![4, 384];
        ts[0].data.truncate(4 * 384 * 4);
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "lora_a_b_rank_disagree",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::ShapeMismatch { .. })),
    );
    // 23. A LoRA B with no A.
    let d = case(root, "lora_missing_a", "lora_r8_qv", |d| {
        let ts: Vec<Tensor> = tensors[1..].to_vec();
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "lora_missing_a",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::MissingTensor { .. })),
    );
    // 24. A tensor that does not belong to a LoRA adapter.
    let d = case(root, "lora_unexpected_tensor", "lora_r8_qv", |d| {
        let mut ts = tensors.clone();
        ts.push(Tensor::from_f32(
            "classifier.weight",
            vec![2, 384],
            &[0.5; 768],
        ));
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "lora_unexpected_tensor",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::UnexpectedTensor { .. })),
    );
    // 25. No tensors at all.
    let d = case(root, "empty_weights", "lora_r8_qv", |d| {
        write_st(d, &raw_st("{}", &[]));
    });
    add(
        "empty_weights",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::Empty { .. })),
    );
    // 26. NaN values.
    let d = case(root, "nan_values", "lora_r8_qv", |d| {
        let mut ts = tensors.clone();
        set_f32(&mut ts[5], 17, f32::NAN);
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "nan_values",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::NonFinite { index: 17, .. })),
    );
    // 27. Infinite values (in the prompt-tuning table).
    let d = case(root, "inf_values", "prompt_10", |d| {
        let b = std::fs::read(d.join(ST)).unwrap();
        let mut ts = safetensors_io::parse(&b).unwrap().tensors;
        set_f32(&mut ts[0], 3, f32::NEG_INFINITY);
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "inf_values",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::NonFinite { index: 3, .. })),
    );
    // 28. Missing adapter_config.json.
    let d = case(root, "missing_config", "lora_r8_qv", |d| {
        std::fs::remove_file(d.join(CFG)).unwrap();
    });
    add(
        "missing_config",
        d.clone(),
        d.clone(),
        Box::new(|e| matches!(e, ReadError::NotAnAdapter { .. })),
    );
    // 29. adapter_config.json that is not JSON.
    let d = case(root, "config_not_json", "lora_r8_qv", |d| {
        std::fs::write(d.join(CFG), b"{\"peft_type\": \"LORA\", \"r\": 8,,}").unwrap();
    });
    add(
        "config_not_json",
        d.clone(),
        d.join(CFG),
        Box::new(|e| matches!(e, ReadError::Config { .. })),
    );
    // 30. Config JSON bomb (larger than the config limit).
    let d = case(root, "config_json_bomb", "lora_r8_qv", |d| {
        let big = format!(
            "{{\"peft_type\":\"LORA\",\"r\":8,\"lora_alpha\":16,\"pad\":\"{}\"}}",
            "A".repeat(5 * 1024 * 1024)
        );
        std::fs::write(d.join(CFG), big).unwrap();
    });
    add(
        "config_json_bomb",
        d.clone(),
        d.join(CFG),
        Box::new(|e| matches!(e, ReadError::Config { reason, .. } if reason.contains("limit"))),
    );
    // 31. Deeply nested config JSON (stack-overflow attempt, well under the size limit).
    let d = case(root, "config_deep_nesting", "lora_r8_qv", |d| {
        let depth = 1_000_000;
        let s = format!(
            "{{\"peft_type\":\"LORA\",\"x\":{}{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        std::fs::write(d.join(CFG), s).unwrap();
    });
    add(
        "config_deep_nesting",
        d.clone(),
        d.join(CFG),
        Box::new(|e| matches!(e, ReadError::Config { reason, .. } if reason.contains("JSON"))),
    );
    // 32. Config whose top level is not an object.
    let d = case(root, "config_not_object", "lora_r8_qv", |d| {
        std::fs::write(d.join(CFG), b"[\"LORA\"]").unwrap();
    });
    add(
        "config_not_object",
        d.clone(),
        d.join(CFG),
        Box::new(|e| matches!(e, ReadError::Config { .. })),
    );
    // 33. Config with r of the wrong type.
    let d = case(root, "config_r_not_integer", "lora_r8_qv", |d| {
        edit_config(d, |c| {
            c.insert("r".into(), "eight".into());
        });
    });
    add(
        "config_r_not_integer",
        d.clone(),
        d.join(CFG),
        config_field("r"),
    );
    // 34. Unknown peft_type.
    let d = case(root, "unknown_peft_type", "lora_r8_qv", |d| {
        edit_config(d, |c| {
            c.insert("peft_type".into(), "LOHA".into());
        });
    });
    add(
        "unknown_peft_type",
        d.clone(),
        d.join(CFG),
        Box::new(
            |e| matches!(e, ReadError::UnknownPeftType { peft_type, .. } if peft_type == "LOHA"),
        ),
    );
    // 35. Pickle weights only (with a payload that would create a marker file if ever unpickled).
    let d = case(root, "pickle_weights", "lora_r8_qv", |d| {
        std::fs::remove_file(d.join(ST)).unwrap();
        std::fs::write(
            d.join("adapter_model.bin"),
            evil_pickle(&root.join("PWNED")),
        )
        .unwrap();
    });
    add(
        "pickle_weights",
        d.clone(),
        d.join("adapter_model.bin"),
        Box::new(|e| matches!(e, ReadError::PickleRefused { .. })),
    );
    // 36. No weights at all.
    let d = case(root, "missing_weights", "lora_r8_qv", |d| {
        std::fs::remove_file(d.join(ST)).unwrap();
    });
    add(
        "missing_weights",
        d.clone(),
        d.clone(),
        Box::new(|e| matches!(e, ReadError::MissingWeights { .. })),
    );
    // 37. Prefix tuning whose table contradicts num_layers x 2 x token_dim.
    let d = case(root, "prefix_shape_vs_config", "prefix_20", |d| {
        edit_config(d, |c| {
            c.insert("num_layers".into(), 5.into());
        });
    });
    add(
        "prefix_shape_vs_config",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::ShapeMismatch { .. })),
    );
    // 38. IA3 vector that is a matrix.
    let d = case(root, "ia3_not_vector", "ia3", |d| {
        let b = std::fs::read(d.join(ST)).unwrap();
        let mut ts = safetensors_io::parse(&b).unwrap().tensors;
        let n = ts[0].numel();
        assert_eq!(n % 2, 0);
        ts[0].shape = vec![2, n / 2];
        write_st(d, &safetensors_io::serialize(&ts, None));
    });
    add(
        "ia3_not_vector",
        d.clone(),
        d.join(ST),
        Box::new(|e| matches!(e, ReadError::ShapeMismatch { .. })),
    );
    // 39+. Config fields PEFT reads, of a type or value PEFT refuses (or would read differently from
    // peftdb): each refused with ReadError::ConfigField naming the field (see src/object/peft_config.rs).
    for c in peft_configs::refused() {
        let d = case(root, c.name, c.fixture, |d| {
            edit_config(d, |cfg| {
                for (k, val) in c.set {
                    cfg.insert(k.to_string(), val);
                }
            });
        });
        add(c.name, d.clone(), d.join(CFG), config_field(c.field));
    }
    v
}

/// A `ReadError::ConfigField` for exactly `field`, whose message names the field (quoted).
fn config_field(field: &'static str) -> Check {
    Box::new(move |e| {
        matches!(e, ReadError::ConfigField { field: f, .. } if *f == field)
            && e.to_string().contains(&format!("\"{field}\""))
    })
}

/// A protocol-2 pickle that calls `os.system("touch <marker>")` when loaded.
fn evil_pickle(marker: &Path) -> Vec<u8> {
    let cmd = format!("touch {}", marker.display());
    let mut p = vec![0x80, 0x02]; // PROTO 2
    p.extend_from_slice(b"cposix\nsystem\n"); // GLOBAL
    p.push(b'X'); // BINUNICODE
    p.extend_from_slice(&(cmd.len() as u32).to_le_bytes());
    p.extend_from_slice(cmd.as_bytes());
    p.push(0x85); // TUPLE1
    p.push(b'R'); // REDUCE
    p.push(b'.'); // STOP
    p
}

/// A store holding one good adapter, so "stores nothing" is checked against a non-empty state.
fn seeded_store(dir: &Path) -> Store {
    let store = Store::create(dir.join("h.peftdb")).unwrap();
    let r = ingest_zoo(
        &store,
        &[fixture("lora_rslora")],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.ingested(), 1, "{:?}", r.items);
    store
}

/// Ingest a whole zoo folder with the default options (bad adapters become report lines).
fn ingest_all(store: &Store, zoo: &Path) -> peftdb::ingest::IngestReport {
    ingest_zoo(
        store,
        &[zoo.to_path_buf()],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap()
}

#[test]
fn every_malformed_adapter_gets_its_specific_error_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("corpus");
    std::fs::create_dir_all(&root).unwrap();
    let cases = corpus(&root);
    assert!(cases.len() >= 20, "only {} kinds", cases.len());
    let store = seeded_store(tmp.path());
    let before = snapshot(&store);
    let mut failures = Vec::new();
    for c in &cases {
        // The reader: the specific variant, and the message names the file.
        match read_adapter(&c.dir, &ReadOptions::default()) {
            Ok(_) => failures.push(format!("{}: accepted", c.name)),
            Err(e) => {
                if !(c.check)(&e) {
                    failures.push(format!("{}: wrong error: {e:?}", c.name));
                }
                let msg = e.to_string();
                if !msg.contains(&c.names.display().to_string()) {
                    failures.push(format!(
                        "{}: message does not name {}: {msg}",
                        c.name,
                        c.names.display()
                    ));
                }
            }
        }
        // Ingestion: rejected (or, without a config, not an adapter at all), nothing stored.
        let r = ingest_zoo(
            &store,
            std::slice::from_ref(&c.dir),
            None,
            &IngestOptions::default(),
            &|_| {},
        )
        .unwrap();
        if c.name != "missing_config" {
            if r.rejected() != 1 || r.items.len() != 1 {
                failures.push(format!("{}: ingest report {:?}", c.name, r.items));
            }
        } else if r.ingested() != 0 {
            failures.push(format!("{}: ingested", c.name));
        }
        if snapshot(&store) != before {
            failures.push(format!("{}: the store changed", c.name));
        }
    }
    assert!(
        !root.join("PWNED").exists(),
        "a pickle was deserialized (marker file created)"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The CLI over the whole corpus in one run: exit 3 (some rejected), nothing stored.
    drop(store);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(tmp.path().join("h.peftdb"))
        .arg("ingest")
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(tmp.path().join("h.peftdb")).unwrap();
    assert_eq!(snapshot(&store), before);
    assert!(!root.join("PWNED").exists());
}

#[test]
fn non_finite_values_are_stored_only_with_the_explicit_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("corpus");
    std::fs::create_dir_all(&root).unwrap();
    let cases = corpus(&root);
    let nan = cases.iter().find(|c| c.name == "nan_values").unwrap();
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let opts = IngestOptions {
        allow_non_finite: true,
        ..Default::default()
    };
    let r = ingest_zoo(&store, std::slice::from_ref(&nan.dir), None, &opts, &|_| {}).unwrap();
    assert_eq!(r.ingested(), 1, "{:?}", r.items);
    let (_, obj) = store.get(1).unwrap();
    assert!(obj.tensors.iter().any(|t| t.first_non_finite().is_some()));
}

#[test]
fn a_lone_pickle_file_is_refused_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("PWNED");
    for ext in ["bin", "pt", "pth", "ckpt", "pkl", "PT"] {
        let p = tmp.path().join(format!("adapter_model.{ext}"));
        std::fs::write(&p, evil_pickle(&marker)).unwrap();
        let e = read_adapter(&p, &ReadOptions::default()).unwrap_err();
        assert!(
            matches!(e, ReadError::PickleRefused { ref path } if *path == p),
            "{e:?}"
        );
        let store = Store::create(tmp.path().join(format!("{ext}.peftdb"))).unwrap();
        let r = ingest_zoo(
            &store,
            std::slice::from_ref(&p),
            None,
            &IngestOptions::default(),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r.rejected(), 1);
        assert!(store.objects().unwrap().is_empty());
    }
    assert!(!marker.exists());
}

#[test]
fn adapter_for_another_base_model_is_refused_by_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    // The real MiniLM LoRA teaches the store MiniLM's dims (384) ...
    let r = ingest_zoo(
        &store,
        &[fixture("lora_r8_qv")],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.ingested(), 1);
    let before = snapshot(&store);
    // ... then a BERT-base-shaped LoRA (768) that claims to be for MiniLM.
    let obj = minilm_impostor();
    let dir = tmp.path().join("zoo/impostor/lora");
    peftdb::object::write_adapter(&obj, &dir).unwrap();
    let r = ingest_zoo(
        &store,
        &[tmp.path().join("zoo")],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.rejected(), 1, "{:?}", r.items);
    match &r.items[0].outcome {
        ItemOutcome::Rejected { reason } => {
            assert!(reason.contains("does not fit that model"), "{reason}");
            assert!(reason.contains("another base model"), "{reason}");
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(snapshot(&store), before);
}

/// A BERT-base-shaped LoRA (768 wide) whose config names MiniLM (384 wide).
fn minilm_impostor() -> peftdb::object::LightweightObject {
    use peftdb::synth::{lora, ModelShape, Seeds};
    let mut shape = ModelShape::bert_base();
    shape.name = ModelShape::minilm().name;
    lora(
        &shape,
        8,
        &["query", "value"],
        Seeds {
            group: 1,
            task: 2,
            object: 3,
        },
    )
}

fn reasons(r: &peftdb::ingest::IngestReport) -> Vec<String> {
    r.items
        .iter()
        .filter_map(|i| match &i.outcome {
            ItemOutcome::Rejected { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn symlink_loops_and_links_out_of_the_zoo_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    copy_dir(&fixture("ia3"), &zoo.join("good/ia3"));
    // A loop: zoo/loop/again -> zoo/loop.
    std::fs::create_dir_all(zoo.join("loop")).unwrap();
    std::os::unix::fs::symlink(zoo.join("loop"), zoo.join("loop/again")).unwrap();
    // A link leaving the zoo: zoo/escape -> <outside>/secret (a valid adapter!).
    let outside = tmp.path().join("outside/secret");
    copy_dir(&fixture("lora_r8_qv"), &outside);
    std::os::unix::fs::symlink(&outside, zoo.join("escape")).unwrap();
    // A broken link.
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), zoo.join("dangling")).unwrap();

    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let r = ingest_all(&store, &zoo);
    let rs = reasons(&r);
    assert_eq!(r.ingested(), 1, "{:?}", r.items);
    assert!(rs.iter().any(|s| s.contains("symlink loop")), "{rs:?}");
    assert!(rs.iter().any(|s| s.contains("outside the zoo")), "{rs:?}");
    // Only the good adapter is stored; the one behind the escaping link is not.
    let objs = store.objects().unwrap();
    assert_eq!(objs.len(), 1);
    assert_eq!(objs[0].task, "good");
}

#[test]
fn manifest_paths_that_leave_the_manifest_folder_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("m");
    copy_dir(&fixture("ia3"), &base.join("ok"));
    copy_dir(&fixture("lora_r8_qv"), &tmp.path().join("secret"));
    std::os::unix::fs::symlink(tmp.path().join("secret"), base.join("sneaky")).unwrap();
    let manifest = base.join("zoo.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&serde_json::json!({
            "version": 1,
            "objects": [
                {"path": "ok", "task": "fine"},
                {"path": "../secret", "task": "t1"},
                {"path": tmp.path().join("secret").display().to_string(), "task": "t2"},
                {"path": "sneaky", "task": "t3"},
                {"path": "ok", "task": "../../etc"},
                {"path": "ok", "task": "a/b"},
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let r = ingest_zoo(
        &store,
        &[],
        Some(&manifest),
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.ingested(), 1, "{:?}", r.items);
    assert_eq!(r.rejected(), 5, "{:?}", r.items);
    let rs = reasons(&r);
    assert_eq!(
        rs.iter().filter(|s| s.contains("`..`")).count(),
        2,
        "{rs:?}"
    );
    assert!(
        rs.iter()
            .any(|s| s.contains("outside the manifest's folder")),
        "{rs:?}"
    );
    assert_eq!(
        rs.iter().filter(|s| s.contains("path separator")).count(),
        2,
        "{rs:?}"
    );
    assert_eq!(store.objects().unwrap().len(), 1);
    assert_eq!(store.tasks().unwrap().len(), 1);

    // Manifests that are themselves hostile: bombs, nesting, wrong version, unknown fields.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not_json", b"{\"version\": 1, \"objects\": [".to_vec()),
        (
            "deep",
            format!(
                "{{\"version\":1,\"objects\":{}{}}}",
                "[".repeat(200_000),
                "]".repeat(200_000)
            )
            .into_bytes(),
        ),
        ("version", b"{\"version\": 2, \"objects\": []}".to_vec()),
        (
            "unknown_field",
            b"{\"version\": 1, \"objects\": [], \"x\": 1}".to_vec(),
        ),
        (
            "bad_task",
            b"{\"version\": 1, \"tasks\": [{\"name\": \"..\"}], \"objects\": []}".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let p = base.join(format!("{name}.json"));
        std::fs::write(&p, bytes).unwrap();
        let e = ingest_zoo(&store, &[], Some(&p), &IngestOptions::default(), &|_| {}).unwrap_err();
        assert!(
            matches!(e, peftdb::error::IngestError::Manifest { ref path, .. } if *path == p),
            "{name}: {e:?}"
        );
    }
    // A manifest over the size limit (sparse file: no disk used).
    let p = base.join("huge.json");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(peftdb::ingest::MAX_MANIFEST_BYTES + 1).unwrap();
    let e = ingest_zoo(&store, &[], Some(&p), &IngestOptions::default(), &|_| {}).unwrap_err();
    assert!(
        matches!(e, peftdb::error::IngestError::Manifest { ref reason, .. } if reason.contains("limit")),
        "{e:?}"
    );
    assert_eq!(store.objects().unwrap().len(), 1);
}

#[test]
fn hostile_sidecars_and_task_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    let cases: &[(&str, &[u8])] = &[
        ("traversal", b"{\"task\": \"../../etc\"}"),
        ("control", b"{\"task\": \"a\\u0000b\"}"),
        ("unknown_field", b"{\"task\": \"x\", \"evil\": true}"),
        ("not_json", b"{\"task\": "),
    ];
    for (name, sidecar) in cases {
        let d = zoo.join(name);
        copy_dir(&fixture("ia3"), &d);
        std::fs::write(d.join("peftdb.json"), sidecar).unwrap();
    }
    // Sidecar bomb (> 1 MiB).
    let d = zoo.join("bomb");
    copy_dir(&fixture("ia3"), &d);
    std::fs::write(
        d.join("peftdb.json"),
        format!(
            "{{\"task\": \"x\", \"description\": \"{}\"}}",
            "A".repeat(2 << 20)
        ),
    )
    .unwrap();
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let r = ingest_zoo(&store, &[zoo], None, &IngestOptions::default(), &|_| {}).unwrap();
    assert_eq!(r.rejected(), cases.len() + 1, "{:?}", r.items);
    assert!(store.objects().unwrap().is_empty());
    assert!(store.tasks().unwrap().is_empty());
}

#[test]
fn non_utf8_folder_names_do_not_panic_and_are_recorded_lossily() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    let weird = zoo.join(std::ffi::OsStr::from_bytes(b"task-\xff\xfe"));
    copy_dir(&fixture("ia3"), &weird.join("ia3"));
    let store = Store::create(tmp.path().join("s.peftdb")).unwrap();
    let r = ingest_zoo(&store, &[zoo], None, &IngestOptions::default(), &|_| {}).unwrap();
    assert_eq!(r.items.len(), 1);
    // Accepted with a lossy (U+FFFD) task name; the task name stays a valid, separator-free name.
    assert_eq!(r.ingested(), 1, "{:?}", r.items);
    let t = &store.tasks().unwrap()[0].name;
    assert!(t.starts_with("task-") && t.contains('\u{fffd}'), "{t:?}");
    peftdb::ingest::validate_task_name(t).unwrap();
}

#[test]
fn export_targets_cannot_be_clobbered_or_escape_through_names() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("s.peftdb");
    let store = Store::create(&db).unwrap();
    let r = ingest_zoo(
        &store,
        &[fixture("ia3")],
        None,
        &IngestOptions::default(),
        &|_| {},
    )
    .unwrap();
    assert_eq!(r.ingested(), 1);
    // An existing non-empty target is refused and left untouched.
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let e = store.export(1, &out).unwrap_err();
    assert!(
        matches!(e, peftdb::error::ExportError::TargetExists { .. }),
        "{e:?}"
    );
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    drop(store);
    // Task export builds folder names from stored words only: a task name with separators cannot exist
    // (refused at ingestion, tested above), and the exported folders all sit directly under --out.
    let out2 = tmp.path().join("out2");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(&db)
        .args(["export", "--task", "ia3", "--out"])
        .arg(&out2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for e in std::fs::read_dir(&out2).unwrap() {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_dir());
        assert!(!e.file_name().to_string_lossy().contains(".."));
    }
    // Exporting a task that does not exist (even a traversal-looking one) is "not found" (exit 5).
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .arg("--db")
        .arg(&db)
        .args(["export", "--task", "../../etc", "--out"])
        .arg(tmp.path().join("out3"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!tmp.path().join("out3").exists());
}

/// `ingest --strict` stops at the first rejected adapter: the adapters before it (in the deterministic
/// walk order) are committed, the rejected one and every one after it are not, whether the rejection
/// comes when the files are read (a truncated safetensors file) or when the store commits (an adapter
/// whose shapes do not fit the base model it names). It used to commit the rest of the batch after a
/// commit-time rejection, and nothing of the batch (not even the adapters before) after a read-time one.
#[test]
fn strict_ingestion_commits_exactly_the_adapters_before_the_first_rejection() {
    use peftdb::error::IngestError;
    use peftdb::object::MethodKind;
    let tmp = tempfile::tempdir().unwrap();
    // Read-time rejection in the middle.
    let zoo = tmp.path().join("zoo1");
    copy_dir(&fixture("lora_r8_qv"), &zoo.join("a_first/lora"));
    copy_dir(&fixture("lora_r8_qv"), &zoo.join("b_broken/lora"));
    let st = zoo.join("b_broken/lora/adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    copy_dir(&fixture("ia3"), &zoo.join("c_after/ia3"));
    // Commit-time rejection in the middle: a BERT-base-shaped LoRA that names MiniLM.
    let zoo2 = tmp.path().join("zoo2");
    copy_dir(&fixture("lora_r8_qv"), &zoo2.join("a_first/lora"));
    peftdb::object::write_adapter(&minilm_impostor(), &zoo2.join("b_impostor/lora")).unwrap();
    copy_dir(&fixture("ia3"), &zoo2.join("c_after/ia3"));
    let strict = IngestOptions {
        strict: true,
        ..Default::default()
    };
    for (zoo, bad, why) in [
        (&zoo, "b_broken", "adapter_model.safetensors"),
        (&zoo2, "b_impostor", "another base model"),
    ] {
        let store = Store::create(tmp.path().join(format!("{bad}.peftdb"))).unwrap();
        match ingest_zoo(&store, std::slice::from_ref(zoo), None, &strict, &|_| {}) {
            Err(IngestError::Strict { path, reason }) => {
                assert!(path.to_string_lossy().contains(bad), "{}", path.display());
                assert!(reason.contains(why), "{reason}");
            }
            other => panic!("{bad}: {other:?}"),
        }
        let tasks: Vec<String> = store
            .objects()
            .unwrap()
            .into_iter()
            .map(|o| o.task)
            .collect();
        assert_eq!(tasks, vec!["a_first".to_string()], "{bad}");
        // Without --strict the rejection is reported and everything else is ingested.
        let r = ingest_zoo(
            &store,
            std::slice::from_ref(zoo),
            None,
            &IngestOptions::default(),
            &|_| {},
        )
        .unwrap();
        assert_eq!(r.rejected(), 1, "{bad}");
        let objects = store.objects().unwrap();
        assert_eq!(objects.len(), 2, "{bad}");
        assert!(objects.iter().any(|o| o.method_kind() == MethodKind::Ia3));
    }
}

#[test]
fn configs_peft_loads_are_still_accepted_verbatim() {
    // Values PEFT accepts that a checker could wrongly refuse (see peft_configs::accepted).
    let variants = peft_configs::accepted();
    let tmp = tempfile::tempdir().unwrap();
    for (i, (fixture_name, set)) in variants.into_iter().enumerate() {
        let d = case(tmp.path(), &format!("ok_{i}"), fixture_name, |d| {
            edit_config(d, |c| {
                for (k, v) in set.as_object().unwrap() {
                    c.insert(k.clone(), v.clone());
                }
            });
        });
        let obj = read_adapter(&d, &ReadOptions::default())
            .unwrap_or_else(|e| panic!("variant {i} of {fixture_name} refused: {e}"));
        assert_eq!(obj.config_json, std::fs::read(d.join(CFG)).unwrap());
    }
}

#[test]
fn a_zoo_with_configs_peft_cannot_load_stores_only_the_good_adapters() {
    use serde_json::json;
    let tmp = tempfile::tempdir().unwrap();
    let zoo = tmp.path().join("zoo");
    copy_dir(&fixture("lora_r8_qv"), &zoo.join("a_good/lora"));
    let bad_lora = case(&zoo.join("b_bad_bias"), "lora", "lora_bias_all", |d| {
        edit_config(d, |c| {
            c.insert("bias".into(), json!("everything"));
        })
    });
    copy_dir(&fixture("ia3"), &zoo.join("c_good/ia3"));
    let bad_prompt = case(&zoo.join("d_bad_prompt"), "prompt", "prompt_10", |d| {
        edit_config(d, |c| {
            c.insert("num_virtual_tokens".into(), json!("10"));
        })
    });
    copy_dir(&fixture("prefix_20"), &zoo.join("e_good/prefix"));

    let store = Store::create(tmp.path().join("z.peftdb")).unwrap();
    let r = ingest_all(&store, &zoo);
    assert_eq!((r.ingested(), r.rejected()), (3, 2), "{:?}", r.items);
    for (dir, field) in [(&bad_lora, "bias"), (&bad_prompt, "num_virtual_tokens")] {
        let rel = dir.strip_prefix(&zoo).unwrap();
        let item = r
            .items
            .iter()
            .find(|i| i.path.ends_with(rel))
            .unwrap_or_else(|| panic!("{} not in the report: {:?}", dir.display(), r.items));
        match &item.outcome {
            ItemOutcome::Rejected { reason } => {
                assert!(reason.contains(&format!("\"{field}\"")), "{reason}");
                assert!(reason.contains("adapter_config.json"), "{reason}");
            }
            other => panic!("{}: {other:?}", dir.display()),
        }
    }
    let mut tasks: Vec<String> = store
        .objects()
        .unwrap()
        .into_iter()
        .map(|o| o.task)
        .collect();
    tasks.sort();
    assert_eq!(tasks, ["a_good", "c_good", "e_good"]);
}

/// Output piped into a reader that stops early ends the command quietly: no panic on the broken pipe.
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_command_without_a_panic() {
    use std::io::Read;
    use std::process::Stdio;
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("z.peftdb");
    let store = Store::create(&db).unwrap();
    let r = ingest_all(&store, fixture("lora_r8_qv").parent().unwrap());
    assert!(r.ingested() > 0, "{:?}", r.items);
    drop(store);
    // The reading end is closed before the command has opened the store, so its first write meets it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_peftdb"))
        .args(["--db", db.to_str().unwrap(), "ls", "objects"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(status.code(), Some(101), "{err}");
}
