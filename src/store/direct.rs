//! The store's file backend: redb's [`FileBackend`] for reads, locks, length and syncs, with page writes
//! gathered in memory until the next sync and then written in offset order around the page cache
//! (`O_DIRECT`).
//!
//! Why: a buffered write copies every byte into the page cache, and on this project's machines (virtual
//! machines that hand freed memory back to the host) that copy ran at 0.4-0.9 GB/s, touching memory the
//! host had to map again: it was most of ingestion's time, and most of `dd`'s too. A direct write hands
//! the device the bytes where they are, from a few reused aligned buffers, so the writing thread is left
//! with the tree work and the disk's own bandwidth (1.5-2.2 GB/s here against 0.4-0.9 GB/s buffered).
//!
//! Gathering is switched on only while the store commits an ingestion batch ([`DirectWrites`]): those
//! are bulk new pages that nothing reads back soon. Every other transaction (removals, compaction, the
//! schema) writes through the page cache as redb's own backend does, because it reads back what it
//! writes. The price of the switch: pages ingested this way are not in the page cache afterwards, so the
//! first reads of them come from the disk (a compaction right after ingesting 10,000 adapters took 8.5 s
//! against 4.5 s after a buffered ingestion).
//!
//! The contract redb needs from a backend holds as before:
//! - every write is on the device when `sync_data` returns (gathered writes are written, then the file is
//!   `fdatasync`ed, as before);
//! - a read sees every earlier write (a read within one gathered write is served from it; a read that
//!   overlaps gathered writes otherwise writes them first);
//! - a later write of the same bytes wins (an overlapping write writes the gathered ones first);
//! - between two syncs writes may reach the disk in any order, which the page cache's write-back already
//!   did, so redb's commit protocol is untouched.
//!
//! A transaction that gathers more than 32 MiB (bigger than redb's write buffer, so redb
//! writes some of its pages before the commit and reads them back for their checksums) writes what it
//! gathered, and the rest of its writes until the sync, through the page cache, where those reads find
//! them. Ingestion keeps its transactions under that ([`super::BATCH_BYTES`]).
//!
//! Writes that are not whole 4 KiB blocks at 4 KiB offsets (redb's header), writes on a file system that
//! refuses `O_DIRECT` (the open or the first write fails with `EINVAL`), every platform but Linux, and
//! every write when `PEFTDB_BUFFERED_WRITES=1` is set go through the buffered file as before. After a
//! failed write the backend fails every later operation, as redb does, so nothing reads a page whose
//! write was lost: reopen the store.

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::Mutex;

/// Direct I/O alignment of offsets, lengths and memory (covers 512-byte and 4 KiB sector devices).
const ALIGN: usize = 4096;
/// One gathering buffer.
const BLOCK: usize = 4 << 20;
/// Gathered bytes past which a transaction's writes go through the page cache instead (it is bigger than
/// ingestion's transactions, [`super::BATCH_BYTES`], and redb will read some of its pages back).
const FLUSH_AT: usize = 8 * BLOCK;
/// Direct writes in flight at once when writing gathered runs (the device takes 2 GB/s at depth 2
/// against 1.4 GB/s at depth 1 for 384 KiB writes here).
const IO_DEPTH: usize = 4;

/// A 4 KiB-aligned buffer of [`BLOCK`] bytes, kept between syncs so its memory stays mapped.
struct Block {
    buf: Vec<u8>,
    start: usize,
    used: usize,
}

impl Block {
    fn new() -> Block {
        let buf = vec![0u8; BLOCK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Block {
            buf,
            start,
            used: 0,
        }
    }
    fn room(&self) -> usize {
        BLOCK - self.used
    }
    fn bytes(&self, pos: usize, len: usize) -> &[u8] {
        &self.buf[self.start + pos..self.start + pos + len]
    }
}

/// A gathered write: `len` bytes for file offset `offset`, at `pos` in block `block`.
#[derive(Clone, Copy)]
struct Gathered {
    block: usize,
    pos: usize,
    len: usize,
}

#[derive(Default)]
struct State {
    blocks: Vec<Block>,
    /// Gathered writes by file offset; they never overlap.
    writes: BTreeMap<u64, Gathered>,
    /// Whether direct writes still work here (false after `EINVAL`, or where the open failed).
    direct: bool,
    /// Set when a write failed: every later operation fails.
    failed: Option<String>,
    /// Set when more than [`FLUSH_AT`] bytes were gathered since the last sync: the rest of the
    /// transaction goes through the page cache (see [`DirectFileBackend::write`]).
    spilled: bool,
}

impl State {
    fn overlaps(&self, offset: u64, len: usize) -> bool {
        let end = offset + len as u64;
        if let Some((o, g)) = self.writes.range(..=offset).next_back() {
            if o + g.len as u64 > offset {
                return true;
            }
        }
        self.writes.range(offset..end).next().is_some()
    }
    /// The gathered bytes of `offset..offset + len` when one gathered write holds them all.
    fn held(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let (o, g) = self.writes.range(..=offset).next_back()?;
        let skip = (offset - o) as usize;
        (skip + len <= g.len).then(|| self.blocks[g.block].bytes(g.pos + skip, len))
    }
    /// Bytes gathered since the last flush.
    fn gathered(&self) -> usize {
        self.blocks.iter().map(|b| b.used).sum()
    }
    fn end(&self) -> u64 {
        self.writes
            .iter()
            .next_back()
            .map_or(0, |(o, g)| o + g.len as u64)
    }
}

/// Whether a [`DirectFileBackend`] gathers page writes for direct I/O now: off by default, so a backend
/// writes through the page cache like redb's own; the store turns it on for ingestion's batch commits
/// (bulk new pages, read back rarely), and leaves it off for compaction, removals and the schema, whose
/// transactions read back what they just wrote (a compaction took 12.9 s with direct writes, 4.7-5.5 s
/// without: its reads missed the page cache).
#[derive(Debug, Clone, Default)]
pub struct DirectWrites(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl DirectWrites {
    /// Turn gathering on until the guard is dropped.
    pub fn on(&self) -> DirectWritesOn<'_> {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        DirectWritesOn(self)
    }
    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Gathering stays on while this lives ([`DirectWrites::on`]).
pub struct DirectWritesOn<'a>(&'a DirectWrites);

impl Drop for DirectWritesOn<'_> {
    fn drop(&mut self) {
        self.0 .0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// redb's file backend with gathered direct writes (see the module docs).
pub struct DirectFileBackend {
    inner: FileBackend,
    switch: DirectWrites,
    /// The same file opened with `O_DIRECT`, where the platform and file system allow it.
    direct: Option<File>,
    state: Mutex<State>,
    /// Gathered bytes at which a transaction spills to the page cache ([`FLUSH_AT`]; less in tests).
    flush_at: usize,
}

impl std::fmt::Debug for DirectFileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFileBackend")
            .field("inner", &self.inner)
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

/// Set to `1` in the environment, every write goes through the page cache (redb's own file backend).
pub const BUFFERED_ENV: &str = "PEFTDB_BUFFERED_WRITES";

#[cfg(target_os = "linux")]
fn open_direct(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::env::var_os(BUFFERED_ENV).is_some_and(|v| v == "1") {
        return None;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &std::path::Path) -> Option<File> {
    None
}

impl DirectFileBackend {
    /// Wrap `file` (opened read-write at `path`); `path` is opened a second time for the direct writes.
    pub fn new(
        file: File,
        path: &std::path::Path,
    ) -> Result<DirectFileBackend, redb::DatabaseError> {
        let direct = open_direct(path);
        Ok(DirectFileBackend {
            inner: FileBackend::new(file)?,
            switch: DirectWrites::default(),
            state: Mutex::new(State {
                direct: direct.is_some(),
                ..State::default()
            }),
            direct,
            flush_at: FLUSH_AT,
        })
    }

    /// Whether page writes can go around the page cache here (the file system took the `O_DIRECT` open
    /// and no direct write has been refused since).
    pub fn writes_direct(&self) -> bool {
        self.lock().direct
    }

    /// The switch that turns gathering on and off ([`DirectWrites`]).
    pub fn switch(&self) -> DirectWrites {
        self.switch.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(st: &State) -> io::Result<()> {
        match &st.failed {
            Some(why) => Err(io::Error::other(format!(
                "an earlier write to the store failed ({why}); reopen the store"
            ))),
            None => Ok(()),
        }
    }

    /// Write every gathered write, in offset order, contiguous ones in one call.
    fn flush(&self, st: &mut State) -> io::Result<()> {
        self.flush_as(st, true)
    }

    /// [`Self::flush`], around the page cache where direct writes work (`direct`) or through it.
    fn flush_as(&self, st: &mut State, direct: bool) -> io::Result<()> {
        Self::check(st)?;
        if st.writes.is_empty() {
            return Ok(());
        }
        let result = self.write_runs(st, direct);
        st.writes.clear();
        for b in &mut st.blocks {
            b.used = 0;
        }
        if let Err(e) = &result {
            st.failed = Some(e.to_string());
        }
        result
    }

    fn write_runs(&self, st: &mut State, direct: bool) -> io::Result<()> {
        let blocks = &st.blocks;
        let runs: Vec<(u64, Vec<&[u8]>)> = runs(&st.writes)
            .into_iter()
            .map(|run| {
                let parts = run
                    .iter()
                    .map(|(_, g)| blocks[g.block].bytes(g.pos, g.len))
                    .collect();
                (run[0].0, parts)
            })
            .collect();
        if st.direct && direct {
            match self.write_runs_direct(&runs) {
                Ok(()) => return Ok(()),
                // The file system takes no direct writes after all: buffered from now on (runs already
                // written direct are written again, with the same bytes).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => st.direct = false,
                Err(e) => return Err(e),
            }
        }
        for (offset, parts) in &runs {
            let mut at = *offset;
            for p in parts {
                self.inner.write(at, p)?;
                at += p.len() as u64;
            }
        }
        Ok(())
    }

    /// The runs as direct writes, [`IO_DEPTH`] at a time when there are enough bytes to gain from it.
    fn write_runs_direct(&self, runs: &[(u64, Vec<&[u8]>)]) -> io::Result<()> {
        let total: usize = runs.iter().flat_map(|(_, p)| p).map(|p| p.len()).sum();
        let depth = IO_DEPTH.min(runs.len()).min(total / (1 << 20)).max(1);
        if depth == 1 {
            return runs
                .iter()
                .try_for_each(|(o, parts)| self.write_direct(*o, parts));
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..depth)
                .map(|_| {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((o, parts)) = runs.get(i) else {
                            return Ok(());
                        };
                        if let Err(e) = self.write_direct(*o, parts) {
                            next.store(runs.len(), std::sync::atomic::Ordering::Relaxed);
                            return Err(e);
                        }
                    })
                })
                .collect();
            let mut result = Ok(());
            for w in workers {
                let r = w
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a store writer thread panicked")));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    #[cfg(target_os = "linux")]
    fn write_direct(&self, mut offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self
            .direct
            .as_ref()
            .expect("direct writes only with a direct file")
            .as_raw_fd();
        // (part index, bytes of it already written)
        let (mut i, mut done) = (0usize, 0usize);
        while i < parts.len() {
            let iov: Vec<libc::iovec> = parts[i..]
                .iter()
                .take(512)
                .enumerate()
                .map(|(k, p)| {
                    let skip = if k == 0 { done } else { 0 };
                    libc::iovec {
                        iov_base: p[skip..].as_ptr() as *mut libc::c_void,
                        iov_len: p.len() - skip,
                    }
                })
                .collect();
            // SAFETY: every iovec points into a live slice of `parts` for the length given.
            let n = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, offset as i64) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the store file took no bytes",
                ));
            }
            let mut n = n as usize;
            offset += n as u64;
            while n > 0 {
                let left = parts[i].len() - done;
                if n >= left {
                    n -= left;
                    i += 1;
                    done = 0;
                } else {
                    done += n;
                    n = 0;
                }
            }
            if done % ALIGN != 0 {
                // A short direct write that ends inside a block: finish this part buffered.
                let rest = &parts[i][done..];
                self.inner.write(offset, rest)?;
                offset += rest.len() as u64;
                i += 1;
                done = 0;
            }
        }
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn write_direct(&self, _offset: u64, _parts: &[&[u8]]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

/// Gathered writes grouped into runs of contiguous offsets.
fn runs(w: &BTreeMap<u64, Gathered>) -> Vec<Vec<(u64, Gathered)>> {
    let mut out: Vec<Vec<(u64, Gathered)>> = Vec::new();
    let mut next = u64::MAX;
    for (&o, &g) in w {
        match out.last_mut() {
            Some(run) if o == next => run.push((o, g)),
            _ => out.push(vec![(o, g)]),
        }
        next = o + g.len as u64;
    }
    out
}

impl Drop for DirectFileBackend {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.flush(&mut st);
    }
}

impl StorageBackend for DirectFileBackend {
    fn len(&self) -> Result<u64, io::Error> {
        let mut st = self.lock();
        Self::check(&st)?;
        let len = self.inner.len()?;
        if st.end() > len {
            self.flush(&mut st)?;
            return self.inner.len();
        }
        Ok(len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        {
            let mut st = self.lock();
            Self::check(&st)?;
            // A page written since the last sync is read where it waits (redb reads back the pages of a
            // transaction bigger than its write buffer, for their checksums, before the commit).
            if let Some(bytes) = st.held(offset, out.len()) {
                out.copy_from_slice(bytes);
                return Ok(());
            }
            if st.overlaps(offset, out.len()) {
                self.flush(&mut st)?;
            }
        }
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut st = self.lock();
        self.flush(&mut st)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut st = self.lock();
        self.flush(&mut st)?;
        st.spilled = false;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut st = self.lock();
        Self::check(&st)?;
        let gatherable = st.direct
            && !st.spilled
            && self.switch.get()
            && offset % ALIGN as u64 == 0
            && data.len() % ALIGN == 0
            && !data.is_empty()
            && data.len() <= BLOCK;
        if !gatherable || st.overlaps(offset, data.len()) {
            self.flush(&mut st)?;
            if !gatherable {
                return self.inner.write(offset, data);
            }
        }
        if st.gathered() + data.len() > self.flush_at {
            // A transaction bigger than the gathering budget: redb reads some of its pages back before
            // the commit. Written around the page cache, each of those reads would go to the disk; so
            // what is gathered, and the rest of the transaction, go through the page cache.
            self.flush_as(&mut st, false)?;
            st.spilled = true;
            return self.inner.write(offset, data);
        }
        let block = match st.blocks.iter().position(|b| b.room() >= data.len()) {
            Some(b) => b,
            None => {
                st.blocks.push(Block::new());
                st.blocks.len() - 1
            }
        };
        let b = &mut st.blocks[block];
        let pos = b.used;
        let at = b.start + pos;
        b.buf[at..at + data.len()].copy_from_slice(data);
        b.used += data.len();
        st.writes.insert(
            offset,
            Gathered {
                block,
                pos,
                len: data.len(),
            },
        );
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        let flushed = {
            let mut st = self.lock();
            self.flush(&mut st)
        };
        let closed = self.inner.close();
        flushed.and(closed)
    }

    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(s, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Whole pages at a page offset (gathered), or a few bytes at an odd offset (buffered).
        Write {
            page: u64,
            pages: usize,
            aligned: bool,
            byte: u8,
        },
        Read {
            at: u64,
            len: usize,
        },
        Sync,
        SetLen {
            len: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..40, 1usize..5, proptest::bool::weighted(0.8), any::<u8>())
                .prop_map(|(page, pages, aligned, byte)| Op::Write { page, pages, aligned, byte }),
            3 => (0u64..180_000, 1usize..20_000).prop_map(|(at, len)| Op::Read { at, len }),
            1 => Just(Op::Sync),
            1 => (0u64..180_000).prop_map(|len| Op::SetLen { len }),
        ]
    }

    fn backend_spilling_at(
        path: &std::path::Path,
        direct: bool,
        flush_at: usize,
    ) -> DirectFileBackend {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        let mut b = DirectFileBackend::new(file, path).unwrap();
        b.flush_at = flush_at;
        if !direct {
            b.lock().direct = false;
        }
        b
    }

    /// Run `ops` against the backend and a byte vector; every read and the length agree with the vector
    /// before and after syncs, and the file holds the vector's bytes after the backend is dropped.
    fn agrees_with_a_byte_vector(
        ops: &[Op],
        direct: bool,
        flush_at: usize,
    ) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut model: Vec<u8> = Vec::new();
        {
            let b = backend_spilling_at(&path, direct, flush_at);
            let switch = b.switch();
            let _on = switch.on();
            for op in ops {
                match *op {
                    Op::Write {
                        page,
                        pages,
                        aligned,
                        byte,
                    } => {
                        let (at, len) = if aligned {
                            (page * ALIGN as u64, pages * ALIGN)
                        } else {
                            (page * ALIGN as u64 + 100, 300 * pages)
                        };
                        let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                        b.write(at, &data).unwrap();
                        let end = at as usize + len;
                        if model.len() < end {
                            model.resize(end, 0);
                        }
                        model[at as usize..end].copy_from_slice(&data);
                    }
                    Op::Read { at, len } => {
                        let mut out = vec![0u8; len];
                        let r = b.read(at, &mut out);
                        if at as usize + len <= model.len() {
                            r.unwrap();
                            prop_assert_eq!(&out[..], &model[at as usize..at as usize + len]);
                        } else {
                            prop_assert!(r.is_err(), "a read past the end must fail");
                        }
                    }
                    Op::Sync => b.sync_data().unwrap(),
                    Op::SetLen { len } => {
                        b.set_len(len).unwrap();
                        model.resize(len as usize, 0);
                    }
                }
                prop_assert_eq!(b.len().unwrap(), model.len() as u64);
            }
            b.close().unwrap();
        }
        prop_assert_eq!(std::fs::read(&path).unwrap(), model);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn gathered_direct_writes_behave_like_a_plain_file(ops in proptest::collection::vec(op(), 1..60)) {
            agrees_with_a_byte_vector(&ops, true, FLUSH_AT)?;
        }

        /// With a budget of a few pages, transactions spill to the page cache between syncs.
        #[test]
        fn spilling_past_the_budget_behaves_like_a_plain_file(
            ops in proptest::collection::vec(op(), 1..60),
            pages in 1usize..8,
        ) {
            agrees_with_a_byte_vector(&ops, true, pages * ALIGN)?;
        }

        #[test]
        fn with_direct_writes_off_it_is_the_buffered_file(ops in proptest::collection::vec(op(), 1..30)) {
            agrees_with_a_byte_vector(&ops, false, FLUSH_AT)?;
        }
    }

    /// Gathered writes leave in offset order as contiguous runs, whatever order redb wrote them in.
    #[test]
    fn runs_join_contiguous_offsets() {
        let g = |len| Gathered {
            block: 0,
            pos: 0,
            len,
        };
        let w: BTreeMap<u64, Gathered> = [
            (8192, g(4096)),
            (0, g(4096)),
            (4096, g(4096)),
            (20480, g(8192)),
            (28672, g(4096)),
            (40960, g(4096)),
        ]
        .into_iter()
        .collect();
        let starts: Vec<(u64, usize)> = runs(&w).iter().map(|r| (r[0].0, r.len())).collect();
        assert_eq!(starts, vec![(0, 3), (20480, 2), (40960, 1)]);
    }

    /// A store file written through the backend is a redb database that redb's own file backend reads,
    /// with direct writes on where the file system takes them (reported either way).
    #[test]
    fn a_store_written_through_it_reopens_with_redbs_own_backend() {
        written_through_the_backend_reopens(None, FLUSH_AT);
    }

    /// The same with transactions bigger than redb's write buffer (redb writes pages before the commit
    /// and reads them back) and than the backend's gathering budget (they spill to the page cache).
    #[test]
    fn transactions_past_the_write_buffer_and_the_budget_reopen_too() {
        written_through_the_backend_reopens(Some(256 << 10), 96 << 10);
    }

    fn written_through_the_backend_reopens(cache: Option<usize>, flush_at: usize) {
        use redb::{ReadableDatabase, TableDefinition};
        const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let b = backend_spilling_at(&path, true, flush_at);
        eprintln!(
            "direct writes on {}: {}",
            dir.path().display(),
            b.writes_direct()
        );
        let switch = b.switch();
        let _on = switch.on();
        let mut builder = redb::Builder::new();
        if let Some(c) = cache {
            builder.set_cache_size(c);
        }
        let db = builder.create_with_backend(b).unwrap();
        for batch in 0..5u64 {
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(T).unwrap();
                for i in 0..40u64 {
                    let v = vec![(batch * 40 + i) as u8; 1000 + 997 * i as usize];
                    t.insert(batch * 40 + i, v.as_slice()).unwrap();
                }
            }
            w.commit().unwrap();
        }
        drop(db);
        let db = redb::Database::open(&path).unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        for k in 0..200u64 {
            let v = t.get(k).unwrap().unwrap();
            assert_eq!(v.value().len(), 1000 + 997 * (k % 40) as usize);
            assert!(v.value().iter().all(|&x| x == k as u8));
        }
    }
}
