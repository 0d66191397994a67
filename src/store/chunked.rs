//! Large values stored as page-sized chunks (schema version 2).
//!
//! redb gives a B-tree leaf that holds one value larger than a page a buddy allocation: the next power of
//! two of 4 KiB pages. A 12 KB LoRA factor took 16 KiB and a 49 KB TuPaTE row 64 KiB, so a version-1 store
//! of MiniLM LoRAs took 1.55-1.76x the bytes of its adapter files. Here every large value is cut into
//! chunks that each fill a power-of-two run of pages exactly: `4 KiB x 2^j - 32` bytes (redb's leaf header,
//! one value offset and the key take 8 + key bytes <= 32), the largest that fits what is left, up to 64
//! KiB ([`MAX_CHUNK_BYTES`]); the last chunk, under one page, takes one page. Two chunks never fit one
//! leaf, so redb splits between them, and each chunk is one allocation (one write): whole 4 KiB chunks
//! were as compact but made ingestion 40% slower (a redb page write and a B-tree entry per 4 KiB).
//!
//! - `object_tensors`, key `(object id, chunk index)`: an object's tensors as one stream, each tensor as
//!   `u32 LE length | tensor value` ([`super::codec::encode_tensor_into`]), cut into chunks;
//! - `space_embeddings`, key `(space id, object id, chunk index)`: an embedding value
//!   ([`super::codec::encode_embedding`]) cut into chunks. A space's rows stay one contiguous key range.

use super::codec;
use crate::object::Tensor;
use redb::{ReadableTable, StorageError, Table, TableDefinition};

const PAGE: usize = 4096;
/// Leaf bytes besides the value: 4 header + 4 value offset + the key (12 or 20 bytes), rounded up.
const LEAF_OVERHEAD: usize = 32;
const MAX_ORDER: u32 = 4;
/// The largest chunk: a one-chunk leaf of 16 pages.
pub const MAX_CHUNK_BYTES: usize = (PAGE << MAX_ORDER) - LEAF_OVERHEAD;

/// Cut a value into chunks that each fill a power-of-two run of redb pages (see the module docs).
pub(crate) fn chunks(mut b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(b.len() / MAX_CHUNK_BYTES + 5);
    while !b.is_empty() {
        let take = if b.len() <= PAGE - LEAF_OVERHEAD {
            b.len()
        } else {
            let mut j = MAX_ORDER;
            while (PAGE << j) - LEAF_OVERHEAD > b.len() {
                j -= 1;
            }
            (PAGE << j) - LEAF_OVERHEAD
        };
        let (a, rest) = b.split_at(take);
        out.push(a);
        b = rest;
    }
    out
}

/// `(object id, chunk)` -> part of the object's tensor stream.
pub(crate) const OBJECT_TENSORS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("object_tensors");
/// `(space id, object id, chunk)` -> part of an embedding value.
pub(crate) const SPACE_EMBEDDINGS: TableDefinition<(u64, u64, u32), &[u8]> =
    TableDefinition::new("space_embeddings");

/// The tensor stream of an object: each tensor as `u32 LE length | encoded tensor`.
pub(crate) fn tensor_stream(tensors: &[Tensor]) -> Vec<u8> {
    let total: usize = tensors
        .iter()
        .map(|t| 4 + codec::encoded_tensor_len(t))
        .sum();
    let mut out = Vec::with_capacity(total);
    for t in tensors {
        out.extend_from_slice(&(codec::encoded_tensor_len(t) as u32).to_le_bytes());
        codec::encode_tensor_into(t, &mut out);
    }
    out
}

/// Parse a tensor stream back, validating every length.
pub(crate) fn parse_tensor_stream(b: &[u8]) -> Result<Vec<Tensor>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        if b.len() - pos < 4 {
            return Err(format!("tensor stream truncated at byte {pos}"));
        }
        let n = u32::from_le_bytes(b[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        pos += 4;
        if b.len() - pos < n {
            return Err(format!(
                "tensor {} of the stream needs {n} bytes, {} are left",
                out.len(),
                b.len() - pos
            ));
        }
        out.push(codec::decode_tensor(&b[pos..pos + n])?);
        pos += n;
    }
    Ok(out)
}

/// Write an object's tensors.
pub(crate) fn put_tensors(
    t: &mut Table<(u64, u32), &[u8]>,
    id: u64,
    tensors: &[Tensor],
) -> Result<(), StorageError> {
    put_tensor_stream(t, id, &tensor_stream(tensors))
}

/// Write an object's tensor stream ([`tensor_stream`]).
pub(crate) fn put_tensor_stream(
    t: &mut Table<(u64, u32), &[u8]>,
    id: u64,
    stream: &[u8],
) -> Result<(), StorageError> {
    for (i, c) in chunks(stream).into_iter().enumerate() {
        t.insert((id, i as u32), c)?;
    }
    Ok(())
}

/// Read an object's tensors: `Ok(Err(detail))` when the stored bytes do not decode.
pub(crate) fn get_tensors(
    t: &impl ReadableTable<(u64, u32), &'static [u8]>,
    id: u64,
) -> Result<Result<Vec<Tensor>, String>, StorageError> {
    let mut stream = Vec::new();
    for (expect, item) in t.range((id, 0u32)..=(id, u32::MAX))?.enumerate() {
        let (k, v) = item?;
        if k.value().1 as usize != expect {
            return Ok(Err(format!("chunk {expect} is missing")));
        }
        stream.extend_from_slice(v.value());
    }
    Ok(parse_tensor_stream(&stream))
}

/// Delete an object's tensors.
pub(crate) fn delete_tensors(
    t: &mut Table<(u64, u32), &[u8]>,
    id: u64,
) -> Result<(), StorageError> {
    t.retain_in((id, 0u32)..=(id, u32::MAX), |_, _| false)
}

/// Write an embedding.
pub(crate) fn put_embedding(
    t: &mut Table<(u64, u64, u32), &[u8]>,
    space: u64,
    id: u64,
    v: &[f32],
) -> Result<(), StorageError> {
    put_encoded_embedding(t, space, id, &codec::encode_embedding(v))
}

/// Write an embedding already encoded by [`codec::encode_embedding`].
pub(crate) fn put_encoded_embedding(
    t: &mut Table<(u64, u64, u32), &[u8]>,
    space: u64,
    id: u64,
    enc: &[u8],
) -> Result<(), StorageError> {
    for (i, c) in chunks(enc).into_iter().enumerate() {
        t.insert((space, id, i as u32), c)?;
    }
    Ok(())
}

/// Read one embedding: `None` when absent, `Some(Err(detail))` when its bytes do not decode.
pub(crate) fn get_embedding(
    t: &impl ReadableTable<(u64, u64, u32), &'static [u8]>,
    space: u64,
    id: u64,
) -> Result<Option<Result<Vec<f32>, String>>, StorageError> {
    let mut bytes = Vec::new();
    let mut n = 0usize;
    for item in t.range((space, id, 0u32)..=(space, id, u32::MAX))? {
        let (k, v) = item?;
        if k.value().2 as usize != n {
            return Ok(Some(Err(format!("chunk {n} is missing"))));
        }
        bytes.extend_from_slice(v.value());
        n += 1;
    }
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(codec::decode_embedding(&bytes)))
}

/// Delete an embedding.
pub(crate) fn delete_embedding(
    t: &mut Table<(u64, u64, u32), &[u8]>,
    space: u64,
    id: u64,
) -> Result<(), StorageError> {
    t.retain_in((space, id, 0u32)..=(space, id, u32::MAX), |_, _| false)
}

/// Visit a space's embeddings in id order, one at a time (`f` gets the decode result).
pub(crate) fn for_each_embedding(
    t: &impl ReadableTable<(u64, u64, u32), &'static [u8]>,
    space: u64,
    mut f: impl FnMut(u64, Result<Vec<f32>, String>),
) -> Result<(), StorageError> {
    let mut cur: Option<u64> = None;
    let mut bytes = Vec::new();
    let mut next_chunk = 0u32;
    let mut broken: Option<String> = None;
    let mut flush = |id: u64, bytes: &mut Vec<u8>, broken: &mut Option<String>| {
        let r = match broken.take() {
            Some(e) => Err(e),
            None => codec::decode_embedding(bytes),
        };
        f(id, r);
        bytes.clear();
    };
    for item in t.range((space, 0u64, 0u32)..=(space, u64::MAX, u32::MAX))? {
        let (k, v) = item?;
        let (_, id, chunk) = k.value();
        if cur != Some(id) {
            if let Some(prev) = cur {
                flush(prev, &mut bytes, &mut broken);
            }
            cur = Some(id);
            next_chunk = 0;
        }
        if chunk != next_chunk && broken.is_none() {
            broken = Some(format!("chunk {next_chunk} is missing"));
        }
        next_chunk = chunk + 1;
        bytes.extend_from_slice(v.value());
    }
    if let Some(prev) = cur {
        flush(prev, &mut bytes, &mut broken);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::DType;
    use proptest::prelude::*;
    use redb::ReadableDatabase;

    fn tensor(name: &str, n: usize, seed: u8) -> Tensor {
        Tensor {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
            data: (0..n * 4).map(|i| (i as u8).wrapping_mul(seed)).collect(),
        }
    }

    proptest! {
        #[test]
        fn tensor_streams_round_trip(sizes in proptest::collection::vec(0usize..3000, 0..6)) {
            let ts: Vec<Tensor> = sizes.iter().enumerate().map(|(i, n)| tensor(&format!("t{i}"), *n, i as u8 + 3)).collect();
            prop_assert_eq!(parse_tensor_stream(&tensor_stream(&ts)).unwrap(), ts);
        }

        #[test]
        fn chunks_cover_the_value_and_fill_page_runs(n in 0usize..300_000) {
            let b: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let cs = chunks(&b);
            prop_assert_eq!(&cs.concat(), &b);
            for (i, c) in cs.iter().enumerate() {
                let last = i + 1 == cs.len();
                let fills_run = (0..=MAX_ORDER).any(|j| c.len() == (PAGE << j) - LEAF_OVERHEAD);
                prop_assert!(fills_run || (last && c.len() <= PAGE - LEAF_OVERHEAD), "chunk {i} of {}: {} bytes", cs.len(), c.len());
            }
        }

        #[test]
        fn parsing_any_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_tensor_stream(&b);
        }
    }

    /// The point of the chunking: a store of many large values takes close to their bytes on disk.
    #[test]
    fn chunked_values_fill_whole_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let db = redb::Database::create(&path).unwrap();
        let mut payload = 0u64;
        // 60 objects shaped like a MiniLM LoRA r=8 on query,value (24 factors of 12,288 bytes) with a
        // 12,288-d embedding each, committed in batches like ingestion.
        for batch in 0..6u64 {
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(OBJECT_TENSORS).unwrap();
                let mut e = w.open_table(SPACE_EMBEDDINGS).unwrap();
                for i in 0..10u64 {
                    let id = batch * 10 + i;
                    let ts: Vec<Tensor> = (0..24)
                        .map(|j| tensor(&format!("t{j}"), 3072, j as u8 + 1))
                        .collect();
                    payload += ts.iter().map(|t| t.data.len() as u64).sum::<u64>();
                    put_tensors(&mut t, id, &ts).unwrap();
                    let v: Vec<f32> = (0..12_288).map(|j| (j as f32 * 0.37).sin()).collect();
                    payload += 12_288 * 2;
                    put_embedding(&mut e, 1, id, &v).unwrap();
                }
            }
            w.commit().unwrap();
        }
        // Pages redb has allocated (the file itself grows by whole regions ahead of use).
        let w = db.begin_write().unwrap();
        let stats = w.stats().unwrap();
        w.abort().unwrap();
        let on_disk = stats.allocated_pages() * stats.page_size() as u64;
        let ratio = on_disk as f64 / payload as f64;
        // Version 1's whole values took 1.33x for these sizes before any overhead.
        assert!(
            ratio < 1.1,
            "{on_disk} bytes allocated for {payload} of payload ({ratio:.3}x)"
        );
        drop(db);
        let db = redb::Database::open(&path).unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(OBJECT_TENSORS).unwrap();
        let got = get_tensors(&t, 17).unwrap().unwrap();
        assert_eq!(got.len(), 24);
        assert_eq!(got[5], tensor("t5", 3072, 6));
        let e = r.open_table(SPACE_EMBEDDINGS).unwrap();
        let mut seen = 0;
        for_each_embedding(&e, 1, |_, v| {
            assert_eq!(v.unwrap().len(), 12_288);
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, 60);
        assert!(get_embedding(&e, 1, 99).unwrap().is_none());
    }
}
