//! Validating safetensors reader and byte-exact writer.
//!
//! The reader parses the header itself (to keep tensor order and catch duplicate names, which a JSON map
//! would silently merge), checks every rule of the format (header inside the file, offsets in range,
//! contiguous and non-overlapping, byte length = shape x dtype size, no zero-sized tensors), then cross-checks
//! with the reference `safetensors` crate. The writer lays tensors out in the given order, with the header
//! written compactly and padded with spaces to a multiple of 8 bytes, which is what Python's `safetensors`
//! writes: a file read and written back is byte-identical.

use super::{DType, Tensor};
use crate::error::SafetensorsError;
use serde::de::{MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Upper bound on the JSON header (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;
/// Upper bound on the number of dimensions of a tensor.
pub const MAX_NDIM: usize = 8;

/// A parsed safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsFile {
    pub tensors: Vec<Tensor>,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// JSON object entries in file order, duplicates kept (so they can be reported).
struct OrderedEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for OrderedEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedEntries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(OrderedEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Parse and validate a whole safetensors file held in memory.
pub fn parse(bytes: &[u8]) -> Result<SafetensorsFile, SafetensorsError> {
    if bytes.len() < 8 {
        return Err(SafetensorsError::Truncated {
            len: bytes.len() as u64,
        });
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let file_len = bytes.len() as u64;
    if n > MAX_HEADER_BYTES {
        return Err(SafetensorsError::HeaderTooLarge {
            declared: n,
            limit: MAX_HEADER_BYTES,
        });
    }
    if n > file_len - 8 {
        return Err(SafetensorsError::HeaderBeyondFile {
            declared: n,
            file_len,
        });
    }
    let header = &bytes[8..8 + n as usize];
    let header_str =
        std::str::from_utf8(header).map_err(|_| SafetensorsError::HeaderNotUtf8)?;
    // Nesting is bounded by serde_json's recursion limit (128), so a deeply nested header is an error, not
    // a stack overflow.
    let entries: OrderedEntries = serde_json::from_str(header_str.trim_end_matches(' '))
        .map_err(|e| SafetensorsError::HeaderJson(e.to_string()))?;
    let data = &bytes[8 + n as usize..];
    let data_len = data.len() as u64;

    let mut metadata = None;
    let mut infos: Vec<(String, DType, Vec<usize>, u64, u64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(SafetensorsError::DuplicateTensor { name });
        }
        if name == "__metadata__" {
            let m: BTreeMap<String, String> = serde_json::from_value(value)
                .map_err(|e| SafetensorsError::HeaderJson(format!("__metadata__: {e}")))?;
            metadata = Some(m);
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
            SafetensorsError::HeaderJson(format!("entry {name:?}: {e}"))
        })?;
        let dtype = DType::parse(&info.dtype).ok_or_else(|| SafetensorsError::UnsupportedDtype {
            tensor: name.clone(),
            dtype: info.dtype.clone(),
        })?;
        if info.shape.len() > MAX_NDIM {
            return Err(SafetensorsError::BadShape {
                tensor: name,
                reason: format!("{} dimensions (at most {MAX_NDIM})", info.shape.len()),
            });
        }
        let mut numel: u64 = 1;
        for d in &info.shape {
            numel = numel.checked_mul(*d).ok_or_else(|| SafetensorsError::BadShape {
                tensor: name.clone(),
                reason: format!("shape {:?} overflows", info.shape),
            })?;
        }
        if numel == 0 {
            return Err(SafetensorsError::BadShape {
                tensor: name,
                reason: format!("shape {:?} has no elements", info.shape),
            });
        }
        let need = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| SafetensorsError::BadShape {
                tensor: name.clone(),
                reason: format!("shape {:?} overflows", info.shape),
            })?;
        let (b, e) = info.data_offsets;
        if b > e || e > data_len {
            return Err(SafetensorsError::OffsetsOutOfRange {
                tensor: name,
                begin: b,
                end: e,
                data_len,
            });
        }
        if e - b != need {
            return Err(SafetensorsError::LengthMismatch {
                tensor: name,
                dtype,
                shape: info.shape.clone(),
                expected: need,
                found: e - b,
            });
        }
        let shape = info
            .shape
            .iter()
            .map(|d| usize::try_from(*d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| SafetensorsError::BadShape {
                tensor: name.clone(),
                reason: "dimension does not fit this platform".into(),
            })?;
        infos.push((name, dtype, shape, b, e));
    }
    // Offsets must tile the data section exactly: sorted by begin, each starts where the previous ended.
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by_key(|&i| (infos[i].3, infos[i].4));
    let mut pos = 0u64;
    for (k, &i) in order.iter().enumerate() {
        let (ref name, _, _, b, e) = infos[i];
        if b < pos {
            let prev = &infos[order[k - 1]].0;
            return Err(SafetensorsError::Overlap {
                first: prev.clone(),
                second: name.clone(),
            });
        }
        if b > pos {
            return Err(SafetensorsError::Gap { at: pos, next: b });
        }
        pos = e;
    }
    if pos != data_len {
        return Err(SafetensorsError::TrailingBytes {
            used: pos,
            data_len,
        });
    }
    // Cross-check with the reference implementation (same rules; a disagreement is reported, not ignored).
    safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| SafetensorsError::Reference(e.to_string()))?;

    let tensors = infos
        .into_iter()
        .map(|(name, dtype, shape, b, e)| Tensor {
            name,
            dtype,
            shape,
            data: data[b as usize..e as usize].to_vec(),
        })
        .collect();
    Ok(SafetensorsFile { tensors, metadata })
}

/// Serialize tensors in the given order. The header is compact JSON (`__metadata__` first when present),
/// padded with spaces to a multiple of 8 bytes; data follows in the same order.
pub fn serialize(tensors: &[Tensor], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let mut header = String::from("{");
    let mut first = true;
    if let Some(m) = metadata {
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(m).expect("string map serializes"));
        first = false;
    }
    let mut off = 0usize;
    for t in tensors {
        if !first {
            header.push(',');
        }
        first = false;
        header.push_str(&serde_json::to_string(&t.name).expect("string serializes"));
        header.push_str(":{\"dtype\":\"");
        header.push_str(t.dtype.as_str());
        header.push_str("\",\"shape\":[");
        for (i, d) in t.shape.iter().enumerate() {
            if i > 0 {
                header.push(',');
            }
            header.push_str(&d.to_string());
        }
        let end = off + t.data.len();
        header.push_str(&format!("],\"data_offsets\":[{off},{end}]}}"));
        off = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + off);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(name: &str, shape: Vec<usize>, seed: u8) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape,
            data: (0..n * 4).map(|i| (i as u8).wrapping_mul(seed)).collect(),
        }
    }

    #[test]
    fn round_trip_simple() {
        let ts = vec![t("b", vec![2, 3], 7), t("a", vec![4], 3)];
        let bytes = serialize(&ts, None);
        let f = parse(&bytes).unwrap();
        assert_eq!(f.tensors, ts);
        assert_eq!(serialize(&f.tensors, None), bytes);
    }

    #[test]
    fn rejects_truncation_and_bombs() {
        let bytes = serialize(&[t("a", vec![4], 3)], None);
        assert!(matches!(parse(&bytes[..5]), Err(SafetensorsError::Truncated { .. })));
        assert!(matches!(
            parse(&bytes[..bytes.len() - 1]),
            Err(SafetensorsError::OffsetsOutOfRange { .. })
        ));
        let mut bomb = bytes.clone();
        bomb[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&bomb), Err(SafetensorsError::HeaderTooLarge { .. })));
        let mut beyond = bytes.clone();
        beyond[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        assert!(matches!(parse(&beyond), Err(SafetensorsError::HeaderBeyondFile { .. })));
    }

    proptest! {
        #[test]
        fn prop_round_trip(shapes in proptest::collection::vec(proptest::collection::vec(1usize..5, 1..4), 1..6),
                           meta in proptest::option::of(proptest::collection::btree_map("[a-z]{1,6}", "[ -~]{0,8}", 0..3))) {
            let ts: Vec<Tensor> = shapes.into_iter().enumerate()
                .map(|(i, s)| t(&format!("t.{i}.w"), s, i as u8 + 1)).collect();
            let bytes = serialize(&ts, meta.as_ref());
            let f = parse(&bytes).unwrap();
            prop_assert_eq!(&f.tensors, &ts);
            prop_assert_eq!(f.metadata.as_ref(), meta.as_ref());
            prop_assert_eq!(serialize(&f.tensors, f.metadata.as_ref()), bytes);
        }

        #[test]
        fn prop_parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&data);
        }
    }
}
