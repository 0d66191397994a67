//! Binary value encodings of the store (specified in schema/store.md).

use crate::object::{DType, Tensor};

/// Version byte of the tensor value encoding.
pub const TENSOR_CODEC_V1: u8 = 1;

/// The length of a tensor's value ([`encode_tensor_into`]).
pub fn encoded_tensor_len(t: &Tensor) -> usize {
    5 + t.name.len() + 8 * t.shape.len() + t.data.len()
}

/// Append a tensor value to `v`:
/// `u8 version(=1) | u8 dtype (0=F32,1=F16,2=BF16) | u8 ndim | u16 LE name length | name (UTF-8) |
/// ndim x u64 LE dims | data (little-endian elements)`.
pub fn encode_tensor_into(t: &Tensor, v: &mut Vec<u8>) {
    let name = t.name.as_bytes();
    v.push(TENSOR_CODEC_V1);
    v.push(t.dtype.code());
    v.push(t.shape.len() as u8);
    v.extend_from_slice(&(name.len() as u16).to_le_bytes());
    v.extend_from_slice(name);
    for d in &t.shape {
        v.extend_from_slice(&(*d as u64).to_le_bytes());
    }
    v.extend_from_slice(&t.data);
}

/// Decode a tensor value, validating every length.
pub fn decode_tensor(b: &[u8]) -> Result<Tensor, String> {
    if b.len() < 5 {
        return Err(format!(
            "tensor value of {} bytes is shorter than its 5-byte header",
            b.len()
        ));
    }
    if b[0] != TENSOR_CODEC_V1 {
        return Err(format!("unknown tensor codec version {}", b[0]));
    }
    let dtype = DType::from_code(b[1]).ok_or_else(|| format!("unknown dtype code {}", b[1]))?;
    let ndim = b[2] as usize;
    let name_len = u16::from_le_bytes([b[3], b[4]]) as usize;
    let mut pos = 5;
    let name_end = pos + name_len;
    if b.len() < name_end + 8 * ndim {
        return Err("tensor value truncated in its name or shape".into());
    }
    let name = std::str::from_utf8(&b[pos..name_end])
        .map_err(|_| "tensor name is not UTF-8".to_string())?
        .to_string();
    pos = name_end;
    let mut shape = Vec::with_capacity(ndim);
    let mut numel: usize = 1;
    for _ in 0..ndim {
        let d = u64::from_le_bytes(b[pos..pos + 8].try_into().expect("8 bytes"));
        let d = usize::try_from(d).map_err(|_| "dimension too large".to_string())?;
        numel = numel.checked_mul(d).ok_or("shape overflows")?;
        shape.push(d);
        pos += 8;
    }
    let need = numel.checked_mul(dtype.size()).ok_or("shape overflows")?;
    if b.len() - pos != need {
        return Err(format!(
            "tensor {name:?}: {} data bytes where dtype {dtype} x shape {shape:?} needs {need}",
            b.len() - pos
        ));
    }
    Ok(Tensor {
        name,
        dtype,
        shape,
        data: b[pos..].to_vec(),
    })
}

/// Encode an embedding value: f32 little-endian elements.
pub fn encode_f32(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Decode an embedding value.
pub fn decode_f32(b: &[u8]) -> Result<Vec<f32>, String> {
    if !b.len().is_multiple_of(4) {
        return Err(format!(
            "embedding value of {} bytes is not a multiple of 4",
            b.len()
        ));
    }
    Ok(b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Version byte of the embedding value encoding (schema version 2).
pub const EMBEDDING_CODEC_V2: u8 = 2;

/// Encode an embedding value:
/// `u8 version(=2) | u8 element type | u32 LE length n | payload`, where element type 1 (the normal case)
/// is `f32 LE scale | n x f16 LE` holding `x / scale` with `scale = max |x|` (relative error at most 2^-11
/// of the largest element; cosines move by about 1e-5), and element type 0 is `n x f32 LE`, used when a
/// value is not finite. Half the bytes of f32: a MiniLM LoRA's 12,288-d TuPaTE takes 24.6 KB, 8% of the
/// adapter.
pub fn encode_embedding(v: &[f32]) -> Vec<u8> {
    use half::slice::HalfFloatSliceExt;
    let finite = v.iter().all(|x| x.is_finite());
    let mut out = Vec::with_capacity(10 + v.len() * if finite { 2 } else { 4 });
    out.push(EMBEDDING_CODEC_V2);
    out.push(u8::from(finite));
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    if !finite {
        out.extend_from_slice(&encode_f32(v));
        return out;
    }
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max } else { 1.0 };
    out.extend_from_slice(&scale.to_le_bytes());
    let inv = 1.0 / scale;
    let scaled: Vec<f32> = v.iter().map(|x| x * inv).collect();
    let mut h = vec![half::f16::ZERO; v.len()];
    h.convert_from_f32_slice(&scaled);
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(&h));
    } else {
        for x in h {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Decode an embedding value, validating every length.
pub fn decode_embedding(b: &[u8]) -> Result<Vec<f32>, String> {
    use half::slice::HalfFloatSliceExt;
    if b.len() < 6 {
        return Err(format!(
            "embedding value of {} bytes is shorter than its 6-byte header",
            b.len()
        ));
    }
    if b[0] != EMBEDDING_CODEC_V2 {
        return Err(format!("unknown embedding codec version {}", b[0]));
    }
    let n = u32::from_le_bytes(b[2..6].try_into().expect("4 bytes")) as usize;
    match b[1] {
        0 => {
            let v = decode_f32(&b[6..])?;
            if v.len() != n {
                return Err(format!(
                    "{} f32 elements where the header says {n}",
                    v.len()
                ));
            }
            Ok(v)
        }
        1 => {
            if b.len() != 10 + 2 * n {
                return Err(format!(
                    "f16 embedding of {n} elements needs {} bytes, the value has {}",
                    10 + 2 * n,
                    b.len()
                ));
            }
            let scale = f32::from_le_bytes(b[6..10].try_into().expect("4 bytes"));
            let mut v = vec![0f32; n];
            match bytemuck::try_cast_slice::<u8, u16>(&b[10..]) {
                // In place when the bytes are 2-aligned (the usual case), on a little-endian machine.
                Ok(bits) if cfg!(target_endian = "little") => {
                    use half::slice::HalfBitsSliceExt;
                    let h: &[half::f16] = bits.reinterpret_cast();
                    h.convert_to_f32_slice(&mut v);
                }
                _ => {
                    let h: Vec<half::f16> = b[10..]
                        .chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    h.convert_to_f32_slice(&mut v);
                }
            }
            v.iter_mut().for_each(|x| *x *= scale);
            Ok(v)
        }
        t => Err(format!("unknown embedding element type {t}")),
    }
}

/// Encode an object's facts (table `object_facts`):
/// `u8 version(=1) | u8 len + method | u16 LE len + task | u16 LE len + base model |
/// u16 LE len + stage (0xFFFF: none) | u16 LE count + count x u64 LE space ids` (strings UTF-8).
pub fn encode_facts(f: &super::ObjectFacts) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + f.task.len() + f.base_model.len() + 8 * f.spaces.len());
    out.push(1);
    let m = f.method.as_str().as_bytes();
    out.push(m.len() as u8);
    out.extend_from_slice(m);
    for s in [&f.task, &f.base_model] {
        let b = &s.as_bytes()[..s.len().min(0xFFFE)];
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    }
    match &f.stage {
        Some(s) => {
            let b = &s.as_bytes()[..s.len().min(0xFFFE)];
            out.extend_from_slice(&(b.len() as u16).to_le_bytes());
            out.extend_from_slice(b);
        }
        None => out.extend_from_slice(&0xFFFFu16.to_le_bytes()),
    }
    out.extend_from_slice(&(f.spaces.len() as u16).to_le_bytes());
    for s in &f.spaces {
        out.extend_from_slice(&s.0.to_le_bytes());
    }
    out
}

/// Decode an object's facts, validating every length.
pub fn decode_facts(id: u64, b: &[u8]) -> Result<super::ObjectFacts, String> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("object facts truncated".into());
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u16(&mut self) -> Result<usize, String> {
            Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize)
        }
        fn str_ref(&mut self, n: usize) -> Result<&'a str, String> {
            std::str::from_utf8(self.take(n)?).map_err(|_| "object facts: not UTF-8".into())
        }
        fn str(&mut self, n: usize) -> Result<String, String> {
            self.str_ref(n).map(str::to_owned)
        }
    }
    let mut r = R(b);
    let v = r.take(1)?[0];
    if v != 1 {
        return Err(format!("unknown object facts version {v}"));
    }
    let mlen = r.take(1)?[0] as usize;
    let m = r.str_ref(mlen)?;
    let method = crate::object::MethodKind::parse(m)
        .ok_or_else(|| format!("unknown method {m:?} in object facts"))?;
    let tlen = r.u16()?;
    let task = r.str(tlen)?;
    let blen = r.u16()?;
    let base_model = r.str(blen)?;
    let slen = r.u16()?;
    let stage = if slen == 0xFFFF {
        None
    } else {
        Some(r.str(slen)?)
    };
    let n = r.u16()?;
    let mut spaces = Vec::with_capacity(n);
    for _ in 0..n {
        spaces.push(crate::embed::SpaceId(u64::from_le_bytes(
            r.take(8)?.try_into().expect("8 bytes"),
        )));
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the object facts", r.0.len()));
    }
    Ok(super::ObjectFacts {
        id,
        task,
        method,
        base_model,
        stage,
        spaces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_tensor(t: &Tensor) -> Vec<u8> {
        let mut v = Vec::new();
        encode_tensor_into(t, &mut v);
        v
    }

    proptest! {
        #[test]
        fn tensor_round_trip(name in "[a-zA-Z0-9._-]{0,40}", shape in proptest::collection::vec(0usize..6, 0..4), dt in 0u8..3) {
            let dtype = DType::from_code(dt).unwrap();
            let n: usize = shape.iter().product();
            let t = Tensor { name, dtype, shape, data: (0..n * dtype.size()).map(|i| i as u8).collect() };
            let enc = encode_tensor(&t);
            prop_assert_eq!(enc.len(), encoded_tensor_len(&t));
            prop_assert_eq!(decode_tensor(&enc).unwrap(), t.clone());
            // Any strict prefix or extension is refused, not misread.
            prop_assert!(decode_tensor(&enc[..enc.len() - 1]).is_err() || t.data.is_empty());
            let mut longer = enc.clone();
            longer.push(0);
            prop_assert!(decode_tensor(&longer).is_err());
        }

        #[test]
        fn tensor_names_of_any_script_round_trip(name in "[a-zA-Z0-9_.\\-/ \u{e9}\u{4e2d}]{1,40}") {
            let t = Tensor { name, dtype: DType::BF16, shape: vec![2], data: vec![1, 2, 3, 4] };
            prop_assert_eq!(decode_tensor(&encode_tensor(&t)).unwrap(), t);
        }

        #[test]
        fn tensor_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_tensor(&b);
        }

        #[test]
        fn embeddings_round_trip_within_f16_precision(v in proptest::collection::vec(-1e3f32..1e3, 0..300), tiny in any::<bool>()) {
            let v: Vec<f32> = if tiny { v.iter().map(|x| x * 1e-9).collect() } else { v };
            let d = decode_embedding(&encode_embedding(&v)).unwrap();
            prop_assert_eq!(d.len(), v.len());
            let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in d.iter().zip(&v) {
                // Scaled to [-1, 1]: f16's spacing is at most 2^-11 there, plus subnormal steps near 0.
                prop_assert!((a - b).abs() <= max * (1.0 / 2048.0) + max * 1e-7, "{a} vs {b} (max {max})");
            }
        }

        #[test]
        fn non_finite_embeddings_are_kept_exactly(mut v in proptest::collection::vec(any::<f32>(), 1..64)) {
            v[0] = f32::NAN;
            let d = decode_embedding(&encode_embedding(&v)).unwrap();
            for (a, b) in d.iter().zip(&v) { prop_assert_eq!(a.to_bits(), b.to_bits()); }
        }

        #[test]
        fn embedding_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_embedding(&b);
        }

        #[test]
        fn facts_round_trip(task in "[a-z0-9_]{0,30}", base in "[a-zA-Z/-]{0,40}", stage in proptest::option::of("[a-z]{0,8}"), m in 0usize..6, spaces in proptest::collection::vec(any::<u64>(), 0..4)) {
            let f = super::super::ObjectFacts {
                id: 7, task, method: crate::object::MethodKind::ALL[m], base_model: base, stage,
                spaces: spaces.into_iter().map(crate::embed::SpaceId).collect(),
            };
            prop_assert_eq!(decode_facts(7, &encode_facts(&f)).unwrap(), f);
        }

        #[test]
        fn facts_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_facts(1, &b);
        }

        #[test]
        fn f32_round_trip(v in proptest::collection::vec(any::<f32>(), 0..64)) {
            let d = decode_f32(&encode_f32(&v)).unwrap();
            prop_assert_eq!(d.len(), v.len());
            for (a, b) in d.iter().zip(&v) { prop_assert_eq!(a.to_bits(), b.to_bits()); }
        }
    }
}
