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
//! While gathering is on, the backend also **writes behind** the commit (session 21): a sync queues the
//! gathered writes and the `fdatasync` for a writer thread and returns, so the next transaction is built
//! while the disk takes this one. Measured on 10,000 MiniLM LoRAs in a slow phase of the disk (dd 288
//! MB/s), the writing thread was busy about 9.5 s of a 13.5 s ingestion; writing behind took the
//! ingestion from 15.1 and 16.2 s to 13.1-15.2 s (six runs). The preparing side (CPU) then looked like
//! the longest path; timing each step in session 22 showed the commit waiting on reads instead (below).
//!
//! Two things keep the commit from waiting on the disk. redb's read cache takes the pages a commit
//! flushes only while it has room, so once an ingestion has filled it, the pages redb reads back in the
//! next transactions (branch pages, and leaves of the hash index, whose random keys touch about 50 of its
//! leaves per transaction: single 4 KiB pages) come from the backend. Written around the page cache, each
//! was a disk read queued behind the writer's megabytes (5.0-5.4 s of a 13.2 s ingestion, session 22),
//! and a read of a page still in the queue waited for the whole queue (4.1 s of another).
//! - A read that one queued write holds is served from the queue's memory (session 22).
//! - The **memo** keeps copies of the last 4,096 single pages written around the page cache (16
//!   MiB), and serves reads within one of them (session 23). It skips leaves of one key-value pair (redb's
//!   page format: the last chunk of a stored value, which nothing reads back during ingestion), so it
//!   holds the other single pages of the last 20-odd transactions. Every write to the file updates or
//!   forgets the copies it overlaps and a shrink forgets those past the end, so a copy is what the file
//!   holds once its write is done; a page the memo does not have is read from the file. (It also skips
//!   redb's leaves of freed-page lists, one pair each, which later commits read: 28-35 file reads per
//!   ingestion of 10,000 adapters.)
//!
//!   Session 22 wrote single pages through the page cache instead, where redb's reads found them. That
//!   broke each transaction's runs at every single page (about 360 per transaction), and the buffered
//!   pages went to the disk as scattered 4 KiB writes at the sync: on 10,000 MiniLM LoRAs the writer
//!   thread spent 9.2-9.5 s with every page written direct against 11.9-13.8 s (same binary, switched by
//!   a variable; the reads then cost 5.2-5.3 s, which the memo removes: 28-35 reads from the file, 0.2-0.3
//!   s). Whole ingestions, interleaved, the zoo warmed before each: medians 12.1 s with the memo against
//!   14.2 s before it (four each; the disk in its slow phase, `dd conv=fdatasync` 253-317 MB/s).
//!
//! The contract redb needs from a backend, and what the store adds:
//! - a read sees every earlier write (a read within one gathered write, or within the newest queued write
//!   that overlaps it, or within a page the memo keeps, is served from memory; a read that overlaps
//!   gathered writes, or queued writes that do not hold all of it, waits for them to be written first;
//!   the writer thread updates the memo before a job leaves the queue);
//! - a later write of the same bytes wins (an overlapping write queues the gathered ones first);
//! - the writer thread runs its jobs one after the other in the order redb asked for them (the gathered
//!   writes, then the sync, then redb's header write, then the next sync...), so the file on the disk is
//!   always one that the same commits made synchronously would have left at some moment, and other
//!   processes reading the file see a commit's header only after its pages; between two syncs the writes
//!   may reach the disk in any order, which the page cache's write-back already did, so redb's commit
//!   protocol is untouched;
//! - redb's commit returns before it is durable: the store reports a commit to its caller only once
//!   [`DirectWrites::wait`] says the sync after it is done ([`super::Store::commit_batch`] waits before
//!   it returns; ingestion reports each chunk of adapters after the next chunk's commit). A crash or a
//!   kill loses at most the commits not yet reported, as it would have lost the commits still running;
//! - at most one transaction's gathered writes wait in the queue (the next sync waits for them), so memory
//!   stays at two gathering budgets;
//! - with gathering off (every transaction but ingestion's), every operation first waits for the queue to
//!   empty, and a sync is done when it returns, as with redb's own backend.
//!
//! A transaction that gathers more than 32 MiB (bigger than redb's write buffer, so redb
//! writes some of its pages before the commit and reads them back for their checksums) writes what it
//! gathered, and the rest of its writes until the sync, through the page cache, where those reads find
//! them. Ingestion keeps its transactions under that ([`super::BATCH_BYTES`]).
//!
//! Writes that are not whole 4 KiB blocks at 4 KiB offsets (redb's header), writes on a file system that
//! refuses `O_DIRECT` (the open or the first write fails with `EINVAL`), every platform but Linux, and
//! every write when `PEFTDB_BUFFERED_WRITES=1` is set go through the buffered file as before (queued behind
//! earlier writes when gathering is on). After a failed write (on the writer thread too) the backend fails
//! every later operation, as redb does, and drops what was queued after it, so nothing reads a page whose
//! write was lost and nothing later reaches the disk: reopen the store.

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
/// Single pages written around the page cache that the backend keeps copies of, for redb's reads of
/// them (16 MiB). An ingestion transaction of 64 MiniLM LoRAs writes about 360 single pages, some 190 of
/// them the last chunks of its values, which the memo skips.
const MEMO_PAGES: usize = 4096;
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

/// Gathered writes and the blocks that hold them.
#[derive(Default)]
struct Gathering {
    blocks: Vec<Block>,
    /// Gathered writes by file offset; they never overlap.
    writes: BTreeMap<u64, Gathered>,
}

impl Gathering {
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
    /// Bytes gathered.
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

/// Copies of the last [`MEMO_PAGES`] single pages written around the page cache (module docs): each
/// holds what the file holds at that page once the write that made it is done. Every write to the file
/// goes through [`Io`], which updates or forgets the copies it overlaps right after the write (a shrink
/// forgets those past the new end). The moments in between are never seen: a job's write is read from
/// the queue until the job leaves it, after the memo was updated; and redb never writes a page that a
/// reader can see, so no read of a page races a write of it on the calling thread.
#[derive(Default)]
struct Memo {
    /// Page offset -> its slot in `slots`.
    at: std::collections::HashMap<u64, usize>,
    /// `(page offset, bytes)`; replaced oldest first, from `next`. A forgotten slot keeps its buffer.
    slots: Vec<(Option<u64>, Box<[u8]>)>,
    next: usize,
}

impl Memo {
    /// Keep a copy of the page written at `offset`.
    fn put(&mut self, offset: u64, page: &[u8]) {
        // A page written again is the newest again: its old slot is left free.
        self.drop_page(offset);
        let s = if self.slots.len() < MEMO_PAGES {
            self.slots.push((None, vec![0u8; ALIGN].into_boxed_slice()));
            self.slots.len() - 1
        } else {
            let s = self.next;
            self.next = (s + 1) % MEMO_PAGES;
            s
        };
        let (at, buf) = &mut self.slots[s];
        if let Some(old) = at.replace(offset) {
            self.at.remove(&old);
        }
        buf.copy_from_slice(page);
        self.at.insert(offset, s);
    }
    /// Forget the copies of every page that `offset..offset + len` touches.
    fn forget(&mut self, offset: u64, len: usize) {
        if self.at.is_empty() || len == 0 {
            return;
        }
        let first = offset - offset % ALIGN as u64;
        let end = offset + len as u64;
        if (end - first) / ALIGN as u64 > self.at.len() as u64 {
            self.drop_where(|o| o + ALIGN as u64 > offset && o < end);
        } else {
            for page in (first..end).step_by(ALIGN) {
                self.drop_page(page);
            }
        }
    }
    /// Forget the copies of the pages that reach past `len`.
    fn forget_past(&mut self, len: u64) {
        self.drop_where(|o| o + ALIGN as u64 > len);
    }
    /// Drop the copy of the page at `offset`, if there is one; its slot stays for reuse.
    fn drop_page(&mut self, offset: u64) {
        if let Some(s) = self.at.remove(&offset) {
            self.slots[s].0 = None;
        }
    }
    /// Drop the copies of the pages at the offsets where `gone` holds; their slots stay for reuse.
    fn drop_where(&mut self, gone: impl Fn(u64) -> bool) {
        let slots = &mut self.slots;
        self.at.retain(|&o, s| {
            let drop = gone(o);
            if drop {
                slots[*s].0 = None;
            }
            !drop
        });
    }
    /// Fill `out` from a copy, when one page holds all of `offset..offset + out.len()`.
    fn read(&self, offset: u64, out: &mut [u8]) -> bool {
        let page = offset - offset % ALIGN as u64;
        let skip = (offset - page) as usize;
        if skip + out.len() > ALIGN {
            return false;
        }
        match self.at.get(&page) {
            Some(&s) => {
                out.copy_from_slice(&self.slots[s].1[skip..skip + out.len()]);
                true
            }
            None => false,
        }
    }
}

#[derive(Default)]
struct State {
    gathering: Gathering,
    /// Set when more than [`FLUSH_AT`] bytes were gathered since the last sync: the rest of the
    /// transaction goes through the page cache (see [`DirectFileBackend::write`]).
    spilled: bool,
}

/// Work for the writer thread, in the order redb asked for it (see [`DirectWrites`]).
enum Job {
    /// Gathered page writes, around the page cache where the file system takes it.
    Runs(Gathering),
    /// One write through the page cache (redb's header), copied.
    Write { offset: u64, data: Vec<u8> },
    /// `fdatasync`: once it completes, every earlier job is durable.
    Sync,
}

impl Job {
    fn overlaps(&self, offset: u64, len: usize) -> bool {
        match self {
            Job::Runs(g) => g.overlaps(offset, len),
            Job::Write { offset: o, data } => {
                *o < offset + len as u64 && offset < o + data.len() as u64
            }
            Job::Sync => false,
        }
    }
    /// The bytes of `offset..offset + len` when this job writes all of them.
    fn held(&self, offset: u64, len: usize) -> Option<&[u8]> {
        match self {
            Job::Runs(g) => g.held(offset, len),
            Job::Write { offset: at, data } => {
                let skip = usize::try_from(offset.checked_sub(*at)?).ok()?;
                data.get(skip..skip.checked_add(len)?)
            }
            Job::Sync => None,
        }
    }
    fn end(&self) -> u64 {
        match self {
            Job::Runs(g) => g.end(),
            Job::Write { offset, data } => offset + data.len() as u64,
            Job::Sync => 0,
        }
    }
}

/// The writer thread's queue.
#[derive(Default)]
struct Queue {
    /// Jobs not yet done, oldest first; the writer thread works on the first.
    jobs: std::collections::VecDeque<std::sync::Arc<Job>>,
    /// Whether a writer thread is running (it exits when the queue is empty).
    running: bool,
    /// [`Job::Runs`] in `jobs`.
    runs: usize,
    /// Syncs queued, and syncs done, since the backend was made.
    queued_syncs: u64,
    done_syncs: u64,
    /// Set when a write failed: every later operation fails.
    failed: Option<String>,
    /// Blocks of written runs, for the next gathering.
    spare: Vec<Block>,
}

struct Shared {
    /// Whether gathering (and writing behind) is on.
    gather: std::sync::atomic::AtomicBool,
    queue: Mutex<Queue>,
    changed: std::sync::Condvar,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            gather: std::sync::atomic::AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            changed: std::sync::Condvar::new(),
        }
    }
}

/// A point in the backend's writes: every sync queued before it ([`DirectWrites::ticket`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Whether a [`DirectFileBackend`] gathers page writes for direct I/O and writes behind now: off by
/// default, so a backend writes through the page cache like redb's own and each sync is done when it
/// returns; the store turns it on for ingestion's batch commits (bulk new pages, read back rarely), and
/// leaves it off for compaction, removals and the schema, whose transactions read back what they just
/// wrote (a compaction took 12.9 s with direct writes, 4.7-5.5 s without: its reads missed the page
/// cache).
///
/// While it is on, a sync queues the transaction's gathered writes and the `fdatasync` for a writer
/// thread and returns: redb's commit returns before its pages are durable, and the next transaction is
/// built while they are written. The writer thread keeps redb's order (every job starts after the one
/// before it ends), so the file on the disk is always one that the same commits done synchronously
/// would have left at some moment, and a crash or a kill loses at most the commits not yet durable.
/// The store reports a commit only once [`DirectWrites::wait`] says the sync after it is done. Anything
/// done with the switch off first waits for the queue to empty.
#[derive(Clone, Default)]
pub struct DirectWrites(std::sync::Arc<Shared>);

impl std::fmt::Debug for DirectWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DirectWrites").field(&self.get()).finish()
    }
}

impl DirectWrites {
    /// Turn gathering on until the guard is dropped.
    pub fn on(&self) -> DirectWritesOn<'_> {
        self.0
            .gather
            .store(true, std::sync::atomic::Ordering::SeqCst);
        DirectWritesOn(self)
    }
    fn get(&self) -> bool {
        self.0.gather.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Every sync queued so far: [`DirectWrites::wait`] on it returns once all of them are done.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.queue().queued_syncs)
    }
    /// Wait until every sync up to `t` is done, or fail with the write that failed.
    pub fn wait(&self, t: Ticket) -> io::Result<()> {
        self.wait_until(|q| q.done_syncs >= t.0)
    }
    /// Wait until the writer thread has done every queued job (fails like [`DirectWrites::wait`]).
    pub(crate) fn settle(&self) -> io::Result<()> {
        self.wait_until(|q| q.jobs.is_empty())
    }
    /// Wait while gathered writes of an earlier transaction are still queued (at most one transaction's
    /// writes wait in memory behind the one being built).
    fn wait_for_runs(&self) -> io::Result<()> {
        self.wait_until(|q| q.runs == 0)
    }
    /// Wait until `done` holds of the queue, or a write failed (then its error).
    fn wait_until(&self, done: impl Fn(&Queue) -> bool) -> io::Result<()> {
        let mut q = self.queue();
        while q.failed.is_none() && !done(&q) {
            q = self.0.changed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        check(&q)
    }
    /// Serve a read from the newest queued write that overlaps it, when that write holds all of it.
    /// Returns `Some(true)` when `out` was filled, `Some(false)` when queued writes overlap the read but
    /// that one does not hold all of it (wait for them), `None` when no queued write overlaps it.
    fn read_queued(&self, offset: u64, out: &mut [u8]) -> Option<bool> {
        let q = self.queue();
        let job = q
            .jobs
            .iter()
            .rev()
            .find(|j| j.overlaps(offset, out.len()))?;
        let held = job.held(offset, out.len());
        if let Some(bytes) = held {
            out.copy_from_slice(bytes);
        }
        Some(held.is_some())
    }
    /// Where the queued writes end.
    fn queued_end(&self) -> u64 {
        self.queue().jobs.iter().map(|j| j.end()).max().unwrap_or(0)
    }
    fn spare_block(&self) -> Block {
        self.queue().spare.pop().unwrap_or_else(Block::new)
    }
    /// Queue `job` for the writer thread, starting one if none runs.
    fn push(&self, io: &std::sync::Arc<Io>, job: Job) -> io::Result<()> {
        let mut q = self.queue();
        check(&q)?;
        match job {
            Job::Runs(_) => q.runs += 1,
            Job::Sync => q.queued_syncs += 1,
            Job::Write { .. } => {}
        }
        q.jobs.push_back(std::sync::Arc::new(job));
        if !q.running {
            q.running = true;
            let (io, me) = (io.clone(), self.clone());
            let started = std::thread::Builder::new()
                .name("peftdb-store-writer".into())
                .spawn(move || me.run_jobs(&io));
            if let Err(e) = started {
                q.running = false;
                q.jobs.clear();
                q.runs = 0;
                q.failed = Some(format!("could not start the store's writer thread: {e}"));
                self.0.changed.notify_all();
                return check(&q);
            }
        }
        Ok(())
    }
    /// The writer thread: the queued jobs in order, until the queue is empty or a write failed.
    fn run_jobs(&self, io: &Io) {
        loop {
            let job = {
                let mut q = self.queue();
                match q.jobs.front() {
                    Some(j) if q.failed.is_none() => j.clone(),
                    _ => {
                        q.running = false;
                        self.0.changed.notify_all();
                        return;
                    }
                }
            };
            // A panic in a job would leave every waiter waiting: it fails the job instead.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| io.run(&job)))
                .unwrap_or_else(|_| Err(io::Error::other("the store's writer thread panicked")));
            let mut q = self.queue();
            q.jobs.pop_front();
            match (&*job, &result) {
                (Job::Runs(_), _) => q.runs -= 1,
                (Job::Sync, Ok(())) => q.done_syncs += 1,
                _ => {}
            }
            if let Err(e) = result {
                // Nothing after a failed write may reach the disk: the queue is dropped.
                q.failed = Some(e.to_string());
                q.jobs.clear();
                q.runs = 0;
            }
            if let Ok(Job::Runs(g)) = std::sync::Arc::try_unwrap(job) {
                q.spare.extend(g.blocks.into_iter().map(|mut b| {
                    b.used = 0;
                    b
                }));
            }
            self.0.changed.notify_all();
        }
    }
}

fn check(q: &Queue) -> io::Result<()> {
    match &q.failed {
        Some(why) => Err(io::Error::other(format!(
            "an earlier write to the store failed ({why}); reopen the store"
        ))),
        None => Ok(()),
    }
}

/// Gathering stays on while this lives ([`DirectWrites::on`]).
pub struct DirectWritesOn<'a>(&'a DirectWrites);

impl Drop for DirectWritesOn<'_> {
    fn drop(&mut self) {
        self.0
             .0
            .gather
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The files: the buffered one (redb's backend) and the same file opened with `O_DIRECT`.
struct Io {
    inner: FileBackend,
    /// The same file opened with `O_DIRECT`, where the platform and file system allow it.
    direct: Option<File>,
    /// Whether direct writes still work here (false after `EINVAL`, or where the open failed).
    direct_ok: std::sync::atomic::AtomicBool,
    /// Copies of the single pages last written around the page cache.
    memo: Mutex<Memo>,
    /// Reads that went to the file (tests check which reads the memo served).
    #[cfg(test)]
    file_reads: std::sync::atomic::AtomicUsize,
    /// Jobs the writer thread runs before the next one fails with `ENOSPC` (tests inject faults).
    #[cfg(test)]
    jobs_left: std::sync::atomic::AtomicUsize,
    /// Held by a test, the writer thread runs no job (tests keep jobs queued).
    #[cfg(test)]
    gate: Mutex<()>,
}

/// redb's file backend with gathered direct writes (see the module docs).
pub struct DirectFileBackend {
    io: std::sync::Arc<Io>,
    switch: DirectWrites,
    state: Mutex<State>,
    /// Gathered bytes at which a transaction spills to the page cache ([`FLUSH_AT`]; less in tests).
    flush_at: usize,
}

impl std::fmt::Debug for DirectFileBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectFileBackend")
            .field("inner", &self.io.inner)
            .field("direct", &self.io.direct.is_some())
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
            io: std::sync::Arc::new(Io {
                inner: FileBackend::new(file)?,
                direct_ok: std::sync::atomic::AtomicBool::new(direct.is_some()),
                direct,
                memo: Mutex::new(Memo::default()),
                #[cfg(test)]
                file_reads: std::sync::atomic::AtomicUsize::new(0),
                #[cfg(test)]
                jobs_left: std::sync::atomic::AtomicUsize::new(usize::MAX),
                #[cfg(test)]
                gate: Mutex::new(()),
            }),
            switch: DirectWrites::default(),
            state: Mutex::new(State::default()),
            flush_at: FLUSH_AT,
        })
    }

    /// Whether page writes can go around the page cache here (the file system took the `O_DIRECT` open
    /// and no direct write has been refused since).
    pub fn writes_direct(&self) -> bool {
        self.io.direct_ok()
    }

    /// The switch that turns gathering on and off ([`DirectWrites`]).
    pub fn switch(&self) -> DirectWrites {
        self.switch.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self) -> io::Result<()> {
        check(&self.switch.queue())
    }

    /// Whether this operation writes behind: gathering is on, direct writes work, and the transaction
    /// has not spilled to the page cache.
    fn behind(&self, st: &State) -> bool {
        self.switch.get() && self.io.direct_ok() && !st.spilled
    }

    /// Queue what is gathered, if anything, for the writer thread.
    fn push_gathered(&self, st: &mut State) -> io::Result<()> {
        if st.gathering.writes.is_empty() {
            return Ok(());
        }
        let g = std::mem::take(&mut st.gathering);
        self.switch.push(&self.io, Job::Runs(g))
    }

    /// Wait for the queue, then write every gathered write, in offset order, contiguous ones in one call.
    fn flush(&self, st: &mut State) -> io::Result<()> {
        self.flush_as(st, true)
    }

    /// [`Self::flush`], around the page cache where direct writes work (`direct`) or through it.
    fn flush_as(&self, st: &mut State, direct: bool) -> io::Result<()> {
        self.switch.settle()?;
        if st.gathering.writes.is_empty() {
            return Ok(());
        }
        let result = self.io.write_gathering(&st.gathering, direct);
        st.gathering.writes.clear();
        for b in &mut st.gathering.blocks {
            b.used = 0;
        }
        if let Err(e) = &result {
            self.switch.queue().failed = Some(e.to_string());
        }
        result
    }
}

impl Io {
    fn direct_ok(&self) -> bool {
        self.direct_ok.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn run(&self, job: &Job) -> io::Result<()> {
        #[cfg(test)]
        let _gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        #[cfg(test)]
        if self
            .jobs_left
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_err()
        {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        match job {
            Job::Runs(g) => self.write_gathering(g, true),
            Job::Write { offset, data } => self.write_buffered(*offset, data),
            Job::Sync => self.inner.sync_data(),
        }
    }

    fn write_gathering(&self, g: &Gathering, direct: bool) -> io::Result<()> {
        let blocks = &g.blocks;
        let direct = direct && self.direct_ok();
        let runs: Vec<(u64, Vec<&[u8]>)> = runs(&g.writes)
            .into_iter()
            .map(|run| {
                let parts = run
                    .iter()
                    .map(|(_, g)| blocks[g.block].bytes(g.pos, g.len))
                    .collect();
                (run[0].0, parts)
            })
            .collect();
        if direct {
            match self.write_runs_direct(&runs) {
                Ok(()) => {
                    // The single pages are kept for redb's reads of them (module docs).
                    let mut memo = self.memo();
                    for (&offset, w) in &g.writes {
                        let bytes = blocks[w.block].bytes(w.pos, w.len);
                        if w.len == ALIGN && !holds_one_value(bytes) {
                            memo.put(offset, bytes);
                        } else {
                            memo.forget(offset, w.len);
                        }
                    }
                    return Ok(());
                }
                // The file system takes no direct writes after all: buffered from now on (runs already
                // written direct are written again, with the same bytes).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self
                    .direct_ok
                    .store(false, std::sync::atomic::Ordering::SeqCst),
                Err(e) => return Err(e),
            }
        }
        for (offset, parts) in &runs {
            let mut at = *offset;
            for p in parts {
                self.write_buffered(at, p)?;
                at += p.len() as u64;
            }
        }
        Ok(())
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write through the page cache; the memo forgets what it overwrites.
    fn write_buffered(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let result = self.inner.write(offset, data);
        self.memo().forget(offset, data.len());
        result
    }

    /// Resize the file; the memo forgets the pages past its end.
    fn set_len(&self, len: u64) -> io::Result<()> {
        let result = self.inner.set_len(len);
        self.memo().forget_past(len);
        result
    }

    /// Read from the memo or, failing that, from the file.
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        if self.memo().read(offset, out) {
            return Ok(());
        }
        #[cfg(test)]
        self.file_reads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read(offset, out)
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
                self.write_buffered(offset, rest)?;
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

/// Whether a page is a redb leaf of one key-value pair (its file format, redb's `docs/design.md`: a
/// type byte, 1 for a leaf, and the number of pairs as `u16` LE at bytes 2..4): the last chunk of a
/// stored value, which ingestion does not read back. The memo keeps the other single pages (branches
/// and leaves of many small pairs, which the next transactions read and rewrite); a wrong guess costs a
/// read from the disk, never a wrong byte.
fn holds_one_value(page: &[u8]) -> bool {
    page.len() >= 4 && page[0] == 1 && u16::from_le_bytes([page[2], page[3]]) == 1
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
        self.check()?;
        // The queue before the file: a job leaves the queue only after its write is done.
        let queued_end = self.switch.queued_end();
        let len = self.io.inner.len()?;
        if self.behind(&st) {
            // Queued and gathered writes only ever extend the file.
            return Ok(len.max(st.gathering.end()).max(queued_end));
        }
        if st.gathering.end() > len || queued_end > len {
            self.flush(&mut st)?;
            return self.io.inner.len();
        }
        Ok(len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        {
            let mut st = self.lock();
            self.check()?;
            // A page written since the last sync is read where it waits (redb reads back the pages of a
            // transaction bigger than its write buffer, for their checksums, before the commit).
            if let Some(bytes) = st.gathering.held(offset, out.len()) {
                out.copy_from_slice(bytes);
                return Ok(());
            }
            // A read of gathered or queued bytes, or of a hole that a gathered or queued write past the
            // end of the file will make, waits for them to be written.
            let end = offset + out.len() as u64;
            let pending_end = st.gathering.end().max(self.switch.queued_end());
            let extends = pending_end >= end && end > self.io.inner.len()?;
            if extends || st.gathering.overlaps(offset, out.len()) {
                if self.behind(&st) {
                    self.push_gathered(&mut st)?;
                    self.switch.settle()?;
                } else {
                    self.flush(&mut st)?;
                }
            } else {
                match self.switch.read_queued(offset, out) {
                    Some(true) => return Ok(()),
                    Some(false) => self.switch.settle()?,
                    None => {}
                }
            }
        }
        self.io.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut st = self.lock();
        self.check()?;
        // Growing the file leaves every queued write where it is; shrinking waits for them. The queue is
        // read before the file: a job leaves the queue only after its write is done.
        if self.behind(&st)
            && len >= st.gathering.end()
            && len >= self.switch.queued_end()
            && len >= self.io.inner.len()?
        {
            return self.io.set_len(len);
        }
        self.flush(&mut st)?;
        self.io.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut st = self.lock();
        self.check()?;
        if self.behind(&st) {
            if !st.gathering.writes.is_empty() {
                self.switch.wait_for_runs()?;
                self.push_gathered(&mut st)?;
            }
            return self.switch.push(&self.io, Job::Sync);
        }
        self.flush(&mut st)?;
        st.spilled = false;
        self.io.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut st = self.lock();
        self.check()?;
        let behind = self.behind(&st);
        let gatherable = behind
            && offset.is_multiple_of(ALIGN as u64)
            && data.len().is_multiple_of(ALIGN)
            && !data.is_empty()
            && data.len() <= BLOCK;
        if !gatherable {
            if behind {
                // redb's header, between the syncs of a commit: after every queued write, without
                // waiting for them.
                self.push_gathered(&mut st)?;
                return self.switch.push(
                    &self.io,
                    Job::Write {
                        offset,
                        data: data.to_vec(),
                    },
                );
            }
            self.flush(&mut st)?;
            return self.io.write_buffered(offset, data);
        }
        if st.gathering.overlaps(offset, data.len()) {
            // A later write of gathered bytes: the earlier ones go first.
            self.push_gathered(&mut st)?;
        }
        if st.gathering.gathered() + data.len() > self.flush_at {
            // A transaction bigger than the gathering budget: redb reads some of its pages back before
            // the commit. Written around the page cache, each of those reads would go to the disk; so
            // what is gathered, and the rest of the transaction, go through the page cache.
            self.flush_as(&mut st, false)?;
            st.spilled = true;
            return self.io.write_buffered(offset, data);
        }
        let g = &mut st.gathering;
        let block = match g.blocks.iter().position(|b| b.room() >= data.len()) {
            Some(b) => b,
            None => {
                g.blocks.push(self.switch.spare_block());
                g.blocks.len() - 1
            }
        };
        let b = &mut g.blocks[block];
        let pos = b.used;
        let at = b.start + pos;
        b.buf[at..at + data.len()].copy_from_slice(data);
        b.used += data.len();
        g.writes.insert(
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
        let closed = self.io.inner.close();
        flushed.and(closed)
    }

    fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.io.inner.try_lock_range(s, e)
    }
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.io.inner.try_lock_shared_range(s, e)
    }
    fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.io.inner.lock_range(s, e)
    }
    fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.io.inner.lock_shared_range(s, e)
    }
    fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
        self.io.inner.unlock_range(s, e)
    }
    fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
        self.io.inner.query_lock_range(s, e)
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
        /// Turn gathering off (writes go through the page cache), or back on.
        Switch,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..40, 1usize..5, proptest::bool::weighted(0.8), any::<u8>())
                .prop_map(|(page, pages, aligned, byte)| Op::Write { page, pages, aligned, byte }),
            3 => (0u64..180_000, 1usize..20_000).prop_map(|(at, len)| Op::Read { at, len }),
            // Within one page (what the memo serves).
            2 => (0u64..45, 0usize..4000, 1usize..97)
                .prop_map(|(page, skip, len)| Op::Read { at: page * ALIGN as u64 + skip as u64, len }),
            1 => Just(Op::Sync),
            1 => (0u64..180_000).prop_map(|len| Op::SetLen { len }),
            1 => Just(Op::Switch),
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
            b.io.direct_ok
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        b
    }

    /// A backend at `path` that writes around the page cache, or `None` (with a message) where the file
    /// system refuses `O_DIRECT`.
    fn direct_backend(path: &std::path::Path) -> Option<DirectFileBackend> {
        let b = backend_spilling_at(path, true, FLUSH_AT);
        if !b.writes_direct() {
            eprintln!("no direct writes on {}: skipped", path.display());
            return None;
        }
        Some(b)
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
            let mut on = Some(switch.on());
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
                        let mut data: Vec<u8> =
                            (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                        if aligned && byte % 4 == 0 {
                            // Pages that look like redb leaves of one value (the memo skips them).
                            for p in data.chunks_mut(ALIGN) {
                                p[..4].copy_from_slice(&[1, 0, 1, 0]);
                            }
                        }
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
                    Op::Sync => {
                        b.sync_data().unwrap();
                        // Once the sync is done, the file on the disk holds every write before it.
                        switch.wait(switch.ticket()).unwrap();
                        prop_assert_eq!(&std::fs::read(&path).unwrap(), &model);
                    }
                    Op::SetLen { len } => {
                        b.set_len(len).unwrap();
                        model.resize(len as usize, 0);
                    }
                    Op::Switch => {
                        on = match on {
                            Some(_) => None,
                            None => Some(switch.on()),
                        };
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

    /// A write behind the commit that fails poisons the backend: waiting for the sync after it fails,
    /// every later operation fails, and nothing queued after the failed job reaches the file.
    #[test]
    fn a_failed_write_behind_stops_every_later_write() {
        for fail_at in [0usize, 1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            let Some(b) = direct_backend(&path) else {
                return;
            };
            let switch = b.switch();
            let _on = switch.on();
            let page = |byte: u8| vec![byte; 2 * ALIGN];
            b.write(0, &page(1)).unwrap();
            b.sync_data().unwrap();
            switch.wait(switch.ticket()).unwrap();
            let durable = std::fs::read(&path).unwrap();
            assert_eq!(durable, page(1));
            // The next jobs: the runs (page 2 over page 1), the sync, a header-like write, a sync.
            b.io.jobs_left
                .store(fail_at, std::sync::atomic::Ordering::SeqCst);
            b.write(0, &page(2)).unwrap();
            // The writer thread may fail before these are queued: then they fail at once.
            let _ = b.sync_data();
            let _ = b.write(3, b"header");
            let _ = b.sync_data();
            let e = switch
                .wait(switch.ticket())
                .expect_err("the sync after a failed write cannot be durable");
            assert!(e.to_string().contains("reopen the store"), "{e}");
            assert!(b.write(0, &page(3)).is_err());
            assert!(b.sync_data().is_err());
            assert!(b.read(0, &mut [0u8; 16]).is_err());
            drop(b);
            let on_disk = std::fs::read(&path).unwrap();
            match fail_at {
                // The runs failed: page 1 stays, and the header-like write never landed.
                0 => assert_eq!(on_disk, durable),
                // The runs landed, the sync or what follows failed: never the header-like write.
                _ => assert_eq!(on_disk, page(2)),
            }
        }
    }

    /// While the writer thread is held, a read of a page in a queued write is served from the queue
    /// (it does not wait for the writer), and a read that the queued writes hold only in part waits for
    /// them and then reads the file.
    #[test]
    fn a_read_of_queued_bytes_is_served_from_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Without direct writes nothing is written behind, so nothing is ever queued.
        let Some(b) = direct_backend(&path) else {
            return;
        };
        let b = std::sync::Arc::new(b);
        let switch = b.switch();
        let _on = switch.on();
        b.write(0, &[1u8; 3 * ALIGN]).unwrap();
        b.sync_data().unwrap();
        switch.wait(switch.ticket()).unwrap();
        let gate = b.io.gate.lock().unwrap();
        // Pages 1 and 2 again (one queued write), and a header-like write (queued on its own).
        b.write(ALIGN as u64, &[2u8; 2 * ALIGN]).unwrap();
        b.sync_data().unwrap();
        b.write(10, b"header").unwrap();
        let read = |at: u64, len: usize| {
            let (tx, rx) = std::sync::mpsc::channel();
            let b = b.clone();
            std::thread::spawn(move || {
                let mut out = vec![0u8; len];
                let r = b.read(at, &mut out).map(|()| out);
                let _ = tx.send(r);
            });
            rx
        };
        let within = std::time::Duration::from_secs(20);
        let page = read(ALIGN as u64 + 100, 1000).recv_timeout(within);
        let header = read(12, 3).recv_timeout(within);
        // Part in the queue, part only in the file: must wait for the writer.
        let across = read(ALIGN as u64 - 8, 16);
        assert!(across
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(gate);
        assert_eq!(
            page.expect("a queued page is read without the writer")
                .unwrap(),
            vec![2u8; 1000]
        );
        assert_eq!(header.expect("read from the queued write").unwrap(), b"ade");
        let mut want = vec![1u8; 8];
        want.extend([2u8; 8]);
        assert_eq!(across.recv_timeout(within).unwrap().unwrap(), want);
    }

    /// A single page written around the page cache is read back from the memo, unless it is a leaf of
    /// one value; a longer write is read from the file. A buffered write over a kept page, and a shrink
    /// past it, make the memo forget it.
    #[test]
    fn single_pages_written_direct_are_read_from_the_memo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let Some(b) = direct_backend(&path) else {
            return;
        };
        let file_reads = || b.io.file_reads.load(std::sync::atomic::Ordering::SeqCst);
        let read = |at: u64, len: usize| {
            let mut out = vec![0u8; len];
            b.read(at, &mut out).unwrap();
            out
        };
        // A branch-like page 0, a leaf of one value at page 1, pages 2..18 as one write.
        let mut branch = vec![9u8; ALIGN];
        branch[0] = 2;
        let mut one_value = vec![5u8; ALIGN];
        one_value[..4].copy_from_slice(&[1, 0, 1, 0]);
        let switch = b.switch();
        // Written with gathering on, then synced and waited for until the writer thread is done.
        let write_direct = |at: u64, data: &[u8]| {
            let _on = switch.on();
            b.write(at, data).unwrap();
            b.sync_data().unwrap();
            switch.wait(switch.ticket()).unwrap();
            switch.settle().unwrap();
        };
        write_direct(0, &branch);
        write_direct(ALIGN as u64, &one_value);
        write_direct(2 * ALIGN as u64, &[8u8; 16 * ALIGN]);
        if !b.writes_direct() {
            eprintln!("direct writes refused at the first write: skipped");
            return;
        }
        assert_eq!(std::fs::read(&path).unwrap()[..ALIGN], branch[..]);
        let before = file_reads();
        assert_eq!(read(0, ALIGN), branch);
        assert_eq!(read(100, 50), branch[100..150]);
        assert_eq!(file_reads(), before, "the kept page is read from memory");
        assert_eq!(read(ALIGN as u64, ALIGN), one_value);
        assert_eq!(file_reads(), before + 1, "a leaf of one value is not kept");
        assert_eq!(read(4 * ALIGN as u64, ALIGN), vec![8u8; ALIGN]);
        let across = read(ALIGN as u64 - 8, 16);
        assert_eq!(across[..8], branch[ALIGN - 8..]);
        assert_eq!(across[8..], one_value[..8]);
        assert_eq!(
            file_reads(),
            before + 3,
            "pages of a long write, and reads across pages, are not kept"
        );
        // A buffered write over part of the kept page: the memo forgets it.
        b.write(10, b"buffered").unwrap();
        let mut want = branch.clone();
        want[10..18].copy_from_slice(b"buffered");
        assert_eq!(read(0, ALIGN), want);
        assert_eq!(file_reads(), before + 4);
        // Kept again, then cut off by a shrink and grown back: zeros, from the file.
        write_direct(0, &branch);
        assert_eq!(read(0, ALIGN), branch);
        assert_eq!(file_reads(), before + 4);
        // A leaf of one value written direct over the kept page: forgotten, read from the file.
        write_direct(0, &one_value);
        assert_eq!(read(0, ALIGN), one_value);
        assert_eq!(file_reads(), before + 5);
        write_direct(0, &branch);
        assert_eq!(read(0, ALIGN), branch);
        assert_eq!(file_reads(), before + 5);
        b.set_len(100).unwrap();
        b.set_len(18 * ALIGN as u64).unwrap();
        let mut want = vec![0u8; ALIGN];
        want[..100].copy_from_slice(&branch[..100]);
        assert_eq!(read(0, ALIGN), want);
        assert_eq!(file_reads(), before + 6);
    }

    /// The memo against a map of pages: it never returns bytes other than the last ones put for a page,
    /// forgets what it is told to, and keeps at most [`MEMO_PAGES`] pages, the newest.
    #[test]
    fn the_memo_keeps_the_newest_pages_and_forgets_overwritten_ones() {
        let mut memo = Memo::default();
        let page = |o: u64, tag: u8| {
            let mut p = vec![tag; ALIGN];
            p[..8].copy_from_slice(&o.to_le_bytes());
            p
        };
        let mut out = vec![0u8; ALIGN];
        for i in 0..(MEMO_PAGES as u64 + 10) {
            memo.put(i * ALIGN as u64, &page(i, 1));
        }
        // The oldest ten were replaced; the rest are whole and right.
        for i in 0..(MEMO_PAGES as u64 + 10) {
            let kept = memo.read(i * ALIGN as u64, &mut out);
            assert_eq!(kept, i >= 10, "page {i}");
            if kept {
                assert_eq!(out, page(i, 1));
            }
        }
        assert_eq!(memo.at.len(), MEMO_PAGES);
        // Put again: the new bytes (the oldest page, 10, makes room).
        memo.put(20 * ALIGN as u64, &page(20, 2));
        assert!(memo.read(20 * ALIGN as u64, &mut out));
        assert_eq!(out, page(20, 2));
        assert!(!memo.read(10 * ALIGN as u64, &mut out));
        // Writes over one byte of page 30 (its last), over pages 40..=50 (from inside 40 to inside 50).
        let a = ALIGN as u64;
        memo.forget(30 * a + 4095, 1);
        memo.forget(40 * a + 1, 10 * ALIGN);
        for i in 25..60u64 {
            let kept = i != 30 && !(40..=50).contains(&i);
            assert_eq!(memo.read(i * a, &mut out), kept, "page {i}");
        }
        // Then over pages ..1000 (page by page).
        memo.forget(0, 1000 * ALIGN);
        // Pages 1000.. are left; a write over more pages than the memo holds (through the whole map).
        memo.forget(1500 * a, MEMO_PAGES * ALIGN);
        for i in 0..(MEMO_PAGES as u64 + 10) {
            let kept = (1000..1500).contains(&i);
            assert_eq!(memo.read(i * a, &mut out), kept, "page {i}");
        }
        memo.forget_past(1200 * a + 1);
        assert!(!memo.read(1200 * a, &mut out), "reaches past the end");
        assert!(memo.read(1199 * a, &mut out));
        assert_eq!(out, page(1199, 1));
        // A page put again is the newest again: it outlives every page put before it.
        let mut renewed = Memo::default();
        for i in 0..MEMO_PAGES as u64 {
            renewed.put(i * a, &page(i, 1));
        }
        renewed.put(0, &page(0, 2));
        for i in 0..MEMO_PAGES as u64 - 1 {
            renewed.put((10_000 + i) * a, &page(10_000 + i, 1));
        }
        assert!(renewed.read(0, &mut out), "the page put again stays");
        assert_eq!(out, page(0, 2));
        assert!((1..MEMO_PAGES as u64).all(|i| !renewed.read(i * a, &mut out)));
        assert_eq!(renewed.at.len(), MEMO_PAGES);
        // Forgotten slots are used again, and the map and the slots still agree.
        for i in 0..MEMO_PAGES as u64 {
            memo.put((5000 + i) * ALIGN as u64, &page(5000 + i, 3));
        }
        assert_eq!(memo.at.len(), MEMO_PAGES);
        for (&o, &s) in &memo.at {
            assert_eq!(memo.slots[s].0, Some(o));
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
