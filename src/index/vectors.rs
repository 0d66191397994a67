//! A space's searched vectors as one file beside the store, memory-mapped by queries.
//!
//! A new process answering one query should not read every embedding of a space out of redb (10,000
//! MiniLM LoRAs are 245 MB of stored f16 rows) nor project them again. So the rows a space's exact scan
//! searches (unit vectors, projected for high-dimensional spaces: 2 KB per object at 512 dimensions) are
//! written once to `<store>.index/space-<id>.vecs`; a query maps the file and scans it in place, and reads
//! from redb only the full embeddings of the candidates it reranks.
//!
//! ```text
//!  0  magic "PEFTVECS"             8  format (u32 LE, = VECS_FORMAT)   12 indexed dimension (u32 LE)
//! 16  full dimension (u64 LE)      24 rows n (u64 LE)                  32 store uuid (u128 LE)
//! 48  space generation (u64 LE)    56 projection seed (u64 LE; u64::MAX: none)
//! 64  xxh3-64 of bytes 80.. (u64 LE)                                    72 xxh3-64 of bytes 0..72 (u64 LE)
//! 80  n object ids (u64 LE), then n x dim unit vectors, row-major: f16 LE for a projected space
//!     (projection seed set), f32 LE otherwise
//! ```
//!
//! A projected space's rows only shortlist candidates that are then scored exactly from the stored
//! embeddings, so they are kept at f16 (half the bytes to map, checksum and scan: 100 MB at 100k objects
//! of 512-d); the in-memory rows of such a space are rounded to f16 when built, so a mapped file and a
//! rebuilt index hold the same values and rank alike.
//!
//! **Trusted only if current and whole**: the file is used only when its header matches the store (its
//! uuid, the space's generation, which changes with every commit that adds or removes one of the space's
//! embeddings, its row count and dimensions, the projection seed), its length is exact and both checksums
//! match; anything else is rebuilt from the store (and rewritten by a writable handle). Files are written
//! under a temporary name, synced and renamed into place, and never modified in place, so a mapped file
//! never changes under a reader. Little-endian machines only (elsewhere the rows are built in memory).

use super::error::IndexError;
use crate::embed::SpaceId;
use memmap2::Mmap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Version of the `.vecs` layout.
pub const VECS_FORMAT: u32 = 2;
const MAGIC: &[u8; 8] = b"PEFTVECS";
const HEADER: usize = 80;

/// What a `.vecs` file must say to be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VecsHeader {
    pub dim: usize,
    pub full_dim: usize,
    pub n: usize,
    pub uuid: u128,
    pub generation: u64,
    pub projection_seed: Option<u64>,
}

impl VecsHeader {
    /// The length of the file this header describes (`None` if it overflows).
    fn file_len(&self) -> Option<usize> {
        self.n
            .checked_mul(8 + self.elem_bytes() * self.dim)
            .and_then(|b| b.checked_add(HEADER))
    }

    /// Bytes per row element: 2 (f16) for a projected space, 4 (f32) otherwise.
    pub fn elem_bytes(&self) -> usize {
        if self.projection_seed.is_some() {
            2
        } else {
            4
        }
    }

    fn encode(&self, body_sum: u64) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VECS_FORMAT.to_le_bytes());
        h[12..16].copy_from_slice(&(self.dim as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(self.full_dim as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(self.n as u64).to_le_bytes());
        h[32..48].copy_from_slice(&self.uuid.to_le_bytes());
        h[48..56].copy_from_slice(&self.generation.to_le_bytes());
        h[56..64].copy_from_slice(&self.projection_seed.unwrap_or(u64::MAX).to_le_bytes());
        h[64..72].copy_from_slice(&body_sum.to_le_bytes());
        let head_sum = xxhash_rust::xxh3::xxh3_64(&h[0..72]);
        h[72..80].copy_from_slice(&head_sum.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> Result<(VecsHeader, u64), String> {
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        if h.len() < HEADER || &h[0..8] != MAGIC {
            return Err("not a peftdb vectors file".into());
        }
        if xxhash_rust::xxh3::xxh3_64(&h[0..72]) != u64_at(72) {
            return Err("header checksum mismatch".into());
        }
        let format = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        if format != VECS_FORMAT {
            return Err(format!("format {format}, this peftdb writes {VECS_FORMAT}"));
        }
        let seed = u64_at(56);
        Ok((
            VecsHeader {
                dim: u32::from_le_bytes(h[12..16].try_into().expect("4 bytes")) as usize,
                full_dim: u64_at(16) as usize,
                n: u64_at(24) as usize,
                uuid: u128::from_le_bytes(h[32..48].try_into().expect("16 bytes")),
                generation: u64_at(48),
                projection_seed: (seed != u64::MAX).then_some(seed),
            },
            u64_at(64),
        ))
    }
}

/// The file of a space.
pub fn path_for(dir: &Path, space: SpaceId) -> PathBuf {
    dir.join(format!("space-{space}.vecs"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |e| IndexError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Write a space's rows (`ids.len()` rows of `header.dim` in `rows`) atomically: temporary file, sync,
/// rename, sync of the folder.
pub fn write(
    dir: &Path,
    space: SpaceId,
    header: &VecsHeader,
    ids: &[u64],
    rows: &[f32],
) -> Result<PathBuf, IndexError> {
    if cfg!(target_endian = "big") {
        return Err(IndexError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other("vectors files are little-endian only"),
        });
    }
    assert_eq!(ids.len(), header.n, "one id per row");
    assert_eq!(
        rows.len(),
        header.n * header.dim,
        "rows of the header's dimension"
    );
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let ids_bytes: &[u8] = bytemuck::cast_slice(ids);
    let halves: Vec<half::f16>;
    let row_bytes: &[u8] = if header.elem_bytes() == 2 {
        halves = rows.iter().map(|x| half::f16::from_f32(*x)).collect();
        bytemuck::cast_slice(&halves)
    } else {
        bytemuck::cast_slice(rows)
    };
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(ids_bytes);
    h.update(row_bytes);
    let head = header.encode(h.digest());
    let tmp = dir.join(format!(".tmp-space-{space}-{}.vecs", std::process::id()));
    let fin = path_for(dir, space);
    let res = (|| {
        let mut f = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&tmp).map_err(io_err(&tmp))?,
        );
        f.write_all(&head).map_err(io_err(&tmp))?;
        f.write_all(ids_bytes).map_err(io_err(&tmp))?;
        f.write_all(row_bytes).map_err(io_err(&tmp))?;
        let f = f.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(fin.clone())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Rows mapped from a `.vecs` file.
#[derive(Debug, Clone)]
pub struct MappedRows {
    pub ids: Vec<u64>,
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    half: bool,
}

/// A mapped file's rows, in the element type the file holds.
pub enum RowSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl MappedRows {
    /// The rows, row-major (`ids.len() x dim`).
    pub fn rows(&self) -> RowSlice<'_> {
        // Checked when opened: in bounds and aligned (a page-aligned map plus 80 + 8 n bytes).
        if self.half {
            RowSlice::F16(bytemuck::cast_slice(
                &self.map[self.offset..self.offset + 2 * self.len],
            ))
        } else {
            RowSlice::F32(bytemuck::cast_slice(
                &self.map[self.offset..self.offset + 4 * self.len],
            ))
        }
    }

    /// The rows as f32: borrowed from an f32 file, converted from an f16 one.
    pub fn as_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self.rows() {
            RowSlice::F32(r) => std::borrow::Cow::Borrowed(r),
            RowSlice::F16(r) => {
                let mut out = vec![0f32; r.len()];
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(r, &mut out);
                std::borrow::Cow::Owned(out)
            }
        }
    }
}

/// Whether a space's file is there with the header and length `expected` implies (its first 80 bytes and
/// its size only: the checksums are checked when it is opened).
pub fn header_current(path: &Path, expected: &VecsHeader) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut h = [0u8; HEADER];
    if f.read_exact(&mut h).is_err() {
        return false;
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let want = expected.file_len();
    matches!(VecsHeader::decode(&h), Ok((found, _)) if found == *expected)
        && want == usize::try_from(len).ok()
}

/// Open a space's file if it is there, current and whole; `Err(reason)` otherwise (rebuild).
pub fn open(path: &Path, expected: &VecsHeader) -> Result<MappedRows, String> {
    if cfg!(target_endian = "big") {
        return Err("vectors files are little-endian only".into());
    }
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: peftdb never modifies a .vecs file in place (it writes a new file and renames it over), so
    // the mapping does not change while it is read; a file truncated behind peftdb's back fails the
    // length check below before any row is read.
    // `populate`: fault the whole file in at once (it is read whole by the checksum and every scan).
    let map = unsafe { memmap2::MmapOptions::new().populate().map(&f) }
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let (found, body_sum) =
        VecsHeader::decode(&map).map_err(|e| format!("{}: {e}", path.display()))?;
    if found != *expected {
        return Err(format!(
            "{} is for another state of the space (generation {} with {} rows, the store has generation {} with {})",
            path.display(),
            found.generation,
            found.n,
            expected.generation,
            expected.n
        ));
    }
    let n = found.n;
    let want = found.file_len();
    if want != Some(map.len()) {
        return Err(format!(
            "{}: {} bytes, the header implies {} (truncated?)",
            path.display(),
            map.len(),
            want.map(|w| w.to_string())
                .unwrap_or_else(|| "an overflow".into())
        ));
    }
    if xxhash_rust::xxh3::xxh3_64(&map[HEADER..]) != body_sum {
        return Err(format!("{}: checksum mismatch (corrupt)", path.display()));
    }
    let ids: Vec<u64> = map[HEADER..HEADER + 8 * n]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let offset = HEADER + 8 * n;
    let half = found.elem_bytes() == 2;
    let aligned = if half {
        bytemuck::try_cast_slice::<u8, half::f16>(&map[offset..]).is_ok()
    } else {
        bytemuck::try_cast_slice::<u8, f32>(&map[offset..]).is_ok()
    };
    if !aligned {
        return Err(format!("{}: rows are not aligned", path.display()));
    }
    Ok(MappedRows {
        ids,
        map: Arc::new(map),
        offset,
        len: n * found.dim,
        half,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n: usize) -> VecsHeader {
        VecsHeader {
            dim: 3,
            full_dim: 3,
            n,
            uuid: 77,
            generation: 5,
            projection_seed: None,
        }
    }

    /// A projected space's rows are stored at f16: half the bytes, values read back as the f16 rounding
    /// of what was written (the in-memory rows of such a space are rounded alike).
    #[test]
    fn projected_rows_are_f16() {
        let dir = tempfile::tempdir().unwrap();
        let h = VecsHeader {
            projection_seed: Some(9),
            ..header(3)
        };
        let ids = [1u64, 2, 3];
        let rows: Vec<f32> = (0..9).map(|i| (i as f32 / 7.0).sin()).collect();
        let p = write(dir.path(), SpaceId(2), &h, &ids, &rows).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().len() as usize,
            HEADER + 8 * 3 + 2 * 9
        );
        assert!(header_current(&p, &h));
        let m = open(&p, &h).unwrap();
        assert!(matches!(m.rows(), RowSlice::F16(_)));
        let want: Vec<f32> = rows
            .iter()
            .map(|x| half::f16::from_f32(*x).to_f32())
            .collect();
        assert_eq!(&*m.as_f32(), &want[..]);
        // The unprojected header of the same space is another file's.
        assert!(!header_current(&p, &header(3)));
    }

    #[test]
    fn round_trip_and_every_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ids = [4u64, 9, 11];
        let rows: Vec<f32> = (0..9).map(|i| i as f32 / 9.0).collect();
        let p = write(dir.path(), SpaceId(1), &header(3), &ids, &rows).unwrap();
        let m = open(&p, &header(3)).unwrap();
        assert_eq!(m.ids, ids);
        assert_eq!(&*m.as_f32(), &rows[..]);
        // Another generation, uuid, count or seed: not current.
        for h in [
            VecsHeader {
                generation: 6,
                ..header(3)
            },
            VecsHeader {
                uuid: 78,
                ..header(3)
            },
            VecsHeader {
                projection_seed: Some(1),
                ..header(3)
            },
            header(2),
        ] {
            assert!(open(&p, &h).is_err());
        }
        // A flipped byte in a row, a flipped header byte, a truncated file: not whole.
        let good = std::fs::read(&p).unwrap();
        for (i, how) in [(good.len() - 3, "row"), (20, "header")] {
            let mut b = good.clone();
            b[i] ^= 0x40;
            std::fs::write(&p, &b).unwrap();
            let e = open(&p, &header(3)).unwrap_err();
            assert!(e.contains("checksum"), "{how}: {e}");
        }
        std::fs::write(&p, &good[..good.len() - 4]).unwrap();
        assert!(open(&p, &header(3)).unwrap_err().contains("truncated"));
        std::fs::write(&p, b"short").unwrap();
        assert!(open(&p, &header(3)).is_err());
        assert!(open(&dir.path().join("missing.vecs"), &header(3)).is_err());
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["space-0000000000000001.vecs".to_string()]);
    }
}
