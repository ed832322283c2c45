//! The stages of [`unpack`](super::unpack): read, hash, decompress+parse, create, write.
//!
//! # Concurrency
//! In pipelined mode three threads share the work, four for a compressed blob:
//! - the caller's thread reads the blob into 1 MiB page-aligned chunks (see
//!   [`chunks`](super::chunks)), parses the tar and creates entries (it owns the
//!   [`Extractor`], its root and directory descriptors);
//! - a scoped hash thread computes the blob's sha256 from the same chunks (shared by
//!   `Arc`): sha256 runs at ~2 GB/s even with SHA-NI, the single largest CPU cost of a
//!   plain tar, so it gets a thread to itself;
//! - for gzip and zstd, a scoped decode thread does the reading instead, and decompresses
//!   into chunks of its own for the parser: decompression is the largest cost of a
//!   compressed blob, and parsing and creating overlap it;
//! - there is no writer thread: batches of created files are filled (written from the
//!   chunks their data was read or decoded into, then closed) by whichever thread is
//!   free, one batch at a time and in order ([`Work`]): the hash thread when it has
//!   nothing to hash, the caller's (or decode) thread when the hash queue is full or
//!   too many batches wait. Hashing (~110 ms for a 211 MB tar) and reading, parsing and
//!   creating (~80 ms) differ in cost, and the file writes (~110 ms, onto tmpfs) even
//!   them out over two cores. A third thread for the writes, left to the kernel's fair
//!   scheduler, measured 15–30% slower (three runnable threads on two cores give the
//!   hash thread two thirds of a core while it needs four fifths).
//!
//! Bounded queues join them, so memory stays at a few MiB whatever the layer size
//! (chunks are recycled once their last user drops them), and open descriptors stay
//! under ~200 (see [`BATCH_FILES`]). Written batches go back to the caller for reuse.
//!
//! Shutdown: if the create stage fails, the caller stops, drops the batches not yet
//! written and its chunk source (the decode thread stops at its next send), and the
//! hash thread finishes what it holds; if writing fails, the caller's next batch is
//! refused and it stops. Errors are reported in causal order: create, then write, then
//! read/decode/parse.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};

use super::chunks::{self, ChannelFeed, Chunk, ChunkSource, Feed, HashSink, Pool, RawFeed};
use super::extract::{Extractor, OpenFile, Writer};
use super::tar::{self, Header, Limits, Source, TarReader};
use super::{Compression, UnpackOptions};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};

/// What the read and parse stages learned about the stream.
pub(super) struct Parsed {
    pub digest: Digest,
    pub compressed_bytes: u64,
    pub diff_id: Option<Digest>,
    pub uncompressed_bytes: u64,
    pub compression: Compression,
}

/// Entry headers and file data handed from the parser to the extractor, then (with
/// entries replaced by what the extractor made of them) to the writer.
enum Item {
    Entry(Box<Header>),
    /// A regular file the extractor created, to be filled by the writer.
    File(Box<OpenFile>),
    /// An entry the extractor handled completely.
    Done,
    Data(usize, usize),
    /// File data in place in a chunk: the range of its [`Chunk::bytes`] ([`run_pipelined`]).
    Shared(Arc<Chunk>, usize, usize),
    /// The current file's data: `(offset, length)` in the archive file, copied by the
    /// writer with `copy_file_range` ([`run_file`] only).
    Clone(u64, u64),
}

const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 512;
/// Regular files are opened by the create stage and closed by the writer, so the files
/// in a batch stay open until the writer reaches them. Bounding them per batch, with
/// [`WRITE_DEPTH`], bounds descriptors in flight: at most `BATCH_FILES * (WRITE_DEPTH + 2)`
/// = 128 files, plus the extractor's directory cache.
const BATCH_FILES: usize = 32;
const WRITE_DEPTH: usize = 2;
/// Bytes of chunk data a batch refers to before it is handed on ([`Item::Shared`]).
const SHARED_BATCH_BYTES: usize = chunks::CHUNK_BYTES;
const ZSTD_WINDOW_LOG_MAX: u32 = 25;
const HASH_DEPTH: usize = 4;
/// Decoded chunks queued for the parser.
const DECODE_DEPTH: usize = 4;

struct Batch {
    items: Vec<Item>,
    data: Vec<u8>,
    /// Bytes of file data in the batch: copied into `data`, or referred to in chunks.
    used: usize,
    /// Bound on `used`.
    cap: usize,
    files: usize,
    /// Bytes of entry metadata (names, link targets, xattrs) held by `items`: each header
    /// may carry up to `max_header_bytes`, so this, not the item count, bounds memory.
    meta: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            items: Vec::with_capacity(BATCH_ITEMS),
            data: vec![0; BATCH_BYTES],
            used: 0,
            cap: BATCH_BYTES,
            files: 0,
            meta: 0,
        }
    }

    /// A batch whose file data stays in the chunks it was read into.
    fn shared() -> Batch {
        Batch {
            items: Vec::with_capacity(BATCH_ITEMS),
            data: Vec::new(),
            used: 0,
            cap: SHARED_BATCH_BYTES,
            files: 0,
            meta: 0,
        }
    }

    fn full(&self) -> bool {
        self.items.len() >= BATCH_ITEMS
            || self.used >= self.cap
            || self.files >= BATCH_FILES
            || self.meta >= BATCH_BYTES
    }
}

/// The create stage: make every entry of the batch, in order.
fn create(ex: &mut Extractor<'_>, b: &mut Batch) -> Result<()> {
    for item in &mut b.items {
        if let Item::Entry(_) = item {
            let Item::Entry(h) = std::mem::replace(item, Item::Done) else { unreachable!() };
            if let Some(f) = ex.begin(h)? {
                *item = Item::File(Box::new(f));
            }
        }
    }
    Ok(())
}

/// The write stage: fill the batch's files; the batch is left empty for reuse. `archive`
/// is the archive file that [`Item::Clone`] ranges are copied from.
fn write(w: &mut Writer, b: &mut Batch, archive: Option<&File>) -> Result<()> {
    let Batch { items, data, used, files, meta, .. } = b;
    *files = 0;
    *meta = 0;
    for item in items.drain(..) {
        match (item, archive) {
            (Item::File(f), _) => w.open(*f)?,
            (Item::Entry(_) | Item::Done, _) => w.close()?,
            (Item::Data(s, e), _) => w.data(&data[s..e])?,
            (Item::Shared(c, s, e), _) => w.data(&c.bytes()[s..e])?,
            (Item::Clone(off, len), Some(src)) => w.clone_data(src, off, len)?,
            (Item::Clone(..), None) => unreachable!("clone ranges come only with an archive file"),
        }
    }
    *used = 0;
    Ok(())
}

/// Hashes (and reports progress on) the raw blob as it is read: the inline fetch stage.
struct Tap<'a, 'p, R: ?Sized> {
    inner: &'a mut R,
    hasher: &'a mut Hasher,
    progress: Option<&'p mut (dyn FnMut(u64) + Send + 'p)>,
}

impl<R: Read + ?Sized> Read for Tap<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if let Some(p) = &mut self.progress {
            p(self.hasher.len());
        }
        Ok(n)
    }
}

/// All stages on the calling thread.
pub(super) fn run_inline<R: Read>(
    mut input: R,
    opts: &UnpackOptions,
    progress: Option<&mut (dyn FnMut(u64) + Send)>,
    ex: &mut Extractor<'_>,
) -> Result<Parsed> {
    let mut hasher = Hasher::new();
    let mut w = Writer::new(ex);
    let (compression, uncompressed_bytes, diff) = {
        let tap = Tap { inner: &mut input, hasher: &mut hasher, progress };
        let mut source = BufReader::with_capacity(64 * 1024, tap);
        parse(&mut source, opts, &mut |mut b| {
            create(ex, &mut b)?;
            write(&mut w, &mut b, None)?;
            Ok(b)
        })?
    };
    w.close()?;
    ex.counts.skipped_xattrs += w.skipped_xattrs;
    finish(hasher, compression, uncompressed_bytes, diff, opts)
}

/// The caller's thread and the hash thread, with the decode thread for a compressed
/// blob (see the module docs).
pub(super) fn run_pipelined<R: Read + Send>(
    mut input: R,
    opts: &UnpackOptions,
    progress: Option<&mut (dyn FnMut(u64) + Send)>,
    ex: &mut Extractor<'_>,
) -> Result<Parsed> {
    let work = Work::new(Writer::new(ex));
    std::thread::scope(|s| {
        let work = &work;
        let hasher = std::thread::Builder::new()
            .name("rootfs-hash".into())
            .spawn_scoped(s, move || work.hash_and_help())
            .map_err(|e| Error::io("spawn", "rootfs-hash thread", e))?;
        // Should this thread panic, the hash thread must still see the end of the batches
        // (the scope waits for it before the panic goes on).
        let _end = EndBatches(work);

        // Read (decompress on a thread of its own), parse and create on this thread.
        let mut failed = None;
        let parsed = {
            let raw = ChunkSource::new(RawFeed::new(&mut input, work, progress), None);
            parse_chunks(s, raw, opts, &mut |mut b| {
                if let Err(e) = create(ex, &mut b) {
                    failed = Some(e);
                    return Err(stopped());
                }
                // Fails only when writing has failed; that error is reported below.
                work.push_batch(b).ok_or_else(stopped)
            })
            // The raw source is dropped by now, ending the hasher's input.
        };
        // Write what is queued (nothing after a failure), and let the hash thread finish.
        work.end_batches(failed.is_none() && parsed.is_ok());
        let hasher = hasher.join().expect("rootfs-hash thread panicked");
        if let Some(e) = failed {
            return Err(e);
        }
        let skipped = work.close_writer()?;
        ex.counts.skipped_xattrs += skipped;
        let (compression, uncompressed_bytes, diff) = parsed?;
        finish(hasher, compression, uncompressed_bytes, diff, opts)
    })
}

/// Work shared by the threads of [`run_pipelined`]: blob chunks to hash, and batches of
/// created files to fill. Hashing is the hash thread's; batches are written by whichever
/// thread is free, one batch at a time and in order (the writer lock is held from taking
/// a batch to finishing it): the hash thread when it has nothing to hash, the caller's
/// (or decode) thread when the hash queue is full or too many batches wait. So the two
/// cores share the file writes, however hashing and creation compare in cost.
struct Work {
    q: Mutex<Queues>,
    cv: Condvar,
    writer: Mutex<WriterSlot>,
}

struct Queues {
    hash: VecDeque<Arc<Chunk>>,
    batches: VecDeque<Batch>,
    /// Written batches, for reuse.
    free: Vec<Batch>,
    /// No more chunks will come.
    chunks_done: bool,
    /// No more batches will come.
    batches_done: bool,
    /// Writing failed: the error is in the writer slot.
    failed: bool,
    /// The hash thread has stopped (only early if it panicked): chunks are not queued.
    hasher_gone: bool,
}

/// Ends the batches when dropped, on every way out of [`run_pipelined`]'s scope.
struct EndBatches<'w>(&'w Work);

impl Drop for EndBatches<'_> {
    fn drop(&mut self) {
        self.0.end_batches(false);
    }
}

/// Marks the hash thread as gone when dropped, however it ends.
struct HasherGone<'w>(&'w Work);

impl Drop for HasherGone<'_> {
    fn drop(&mut self) {
        self.0.lock().hasher_gone = true;
        self.0.cv.notify_all();
    }
}

struct WriterSlot {
    w: Writer,
    result: Result<()>,
}

impl Work {
    fn new(w: Writer) -> Work {
        Work {
            q: Mutex::new(Queues {
                hash: VecDeque::new(),
                batches: VecDeque::new(),
                free: Vec::new(),
                chunks_done: false,
                batches_done: false,
                failed: false,
                hasher_gone: false,
            }),
            cv: Condvar::new(),
            writer: Mutex::new(WriterSlot { w, result: Ok(()) }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.q.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'g>(&self, g: MutexGuard<'g, Queues>) -> MutexGuard<'g, Queues> {
        self.cv.wait(g).unwrap_or_else(PoisonError::into_inner)
    }

    /// Write the oldest queued batch, if there is one (and, unless `block`, if no other
    /// thread is writing). Returns whether a batch was written.
    fn write_one(&self, block: bool) -> bool {
        let mut slot = match self.writer.try_lock() {
            Ok(slot) => slot,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if block => self.writer.lock().unwrap_or_else(PoisonError::into_inner),
            Err(TryLockError::WouldBlock) => return false,
        };
        let Some(mut b) = self.lock().batches.pop_front() else { return false };
        if slot.result.is_ok() {
            slot.result = write(&mut slot.w, &mut b, None);
        }
        let failed = slot.result.is_err();
        drop(slot);
        // After a failure, what is left closes its files here.
        b.items.clear();
        let mut q = self.lock();
        q.failed |= failed;
        q.free.push(b);
        drop(q);
        self.cv.notify_all();
        true
    }

    /// Queue a batch of created files; returns an empty batch to fill next, or `None`
    /// once writing has failed.
    fn push_batch(&self, b: Batch) -> Option<Batch> {
        let mut q = self.lock();
        q.batches.push_back(b);
        self.cv.notify_all();
        // Bound the batches waiting (their files are open: see `BATCH_FILES`).
        while q.batches.len() > WRITE_DEPTH && !q.failed {
            drop(q);
            self.write_one(true);
            q = self.lock();
        }
        if q.failed {
            return None;
        }
        Some(q.free.pop().unwrap_or_else(Batch::shared))
    }

    /// No more batches. With `write`, the queued ones are written on this thread (the hash
    /// thread helps); without, they are dropped (their files closed unwritten).
    fn end_batches(&self, write: bool) {
        if write {
            while self.write_one(true) {}
        }
        let mut q = self.lock();
        q.batches_done = true;
        let dropped = std::mem::take(&mut q.batches);
        drop(q);
        self.cv.notify_all();
        drop(dropped);
    }

    /// The hash thread: hash every chunk, and write batches while there is nothing to
    /// hash. Returns when the input has ended and no batches are left.
    fn hash_and_help(&self) -> Hasher {
        let _gone = HasherGone(self);
        let mut h = Hasher::new();
        let mut q = self.lock();
        loop {
            if let Some(c) = q.hash.pop_front() {
                drop(q);
                self.cv.notify_all();
                h.update(c.bytes());
                drop(c);
                q = self.lock();
            } else if !q.batches.is_empty() && !q.failed {
                drop(q);
                if !self.write_one(false) {
                    // Another thread is writing: wait for news rather than spin. Only while
                    // a batch is still queued: the writer may have taken the last one and
                    // ended the batches (notifying) before this lock was taken again, and
                    // then nothing would wake this wait; re-check the state instead.
                    q = self.lock();
                    if q.hash.is_empty() && !q.batches.is_empty() && !q.failed {
                        q = self.wait(q);
                    }
                    continue;
                }
                q = self.lock();
            } else if q.chunks_done && q.batches_done {
                return h;
            } else {
                q = self.wait(q);
            }
        }
    }

    /// Finish the last file; the number of xattrs skipped, or the first write error.
    fn close_writer(&self) -> Result<u64> {
        let mut slot = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let WriterSlot { w, result } = &mut *slot;
        std::mem::replace(result, Ok(()))?;
        w.close()?;
        Ok(w.skipped_xattrs)
    }
}

impl HashSink for Work {
    /// Queue a chunk for the hash thread; while its queue is full, write batches instead
    /// of waiting.
    fn push(&self, chunk: Arc<Chunk>) {
        let mut q = self.lock();
        if q.hasher_gone {
            return; // it panicked: its join reports that
        }
        while q.hash.len() >= HASH_DEPTH && !q.hasher_gone {
            if !q.batches.is_empty() && !q.failed {
                drop(q);
                let wrote = self.write_one(false);
                q = self.lock();
                if wrote {
                    continue;
                }
            }
            if q.hash.len() >= HASH_DEPTH && !q.hasher_gone {
                q = self.wait(q);
            }
        }
        q.hash.push_back(chunk);
        drop(q);
        self.cv.notify_all();
    }

    fn end(&self) {
        self.lock().chunks_done = true;
        self.cv.notify_all();
    }
}

/// [`parse`] over chunks: detect the compression; a plain tar is parsed from the raw
/// chunks on this thread, a compressed one is decoded on a scoped decode thread into
/// chunks of its own. File data is passed on in place ([`Item::Shared`]).
fn parse_chunks<'s, F: Feed + Send + 's>(
    scope: &'s std::thread::Scope<'s, '_>,
    mut raw: ChunkSource<F>,
    opts: &UnpackOptions,
    sink: &mut dyn FnMut(Batch) -> Result<Batch>,
) -> Result<(Compression, u64, Option<Hasher>)> {
    let head = raw.fill_buf().map_err(tar::read_err)?;
    let compression = detect(&head[..head.len().min(6)])?;
    let limits = Limits {
        max_header_bytes: opts.max_header_bytes,
        max_entries: opts.max_entries,
        max_sparse_size: opts.max_uncompressed_bytes,
        require_end: opts.require_end_of_archive,
    };
    if compression == Compression::None {
        raw.set_limit(opts.max_uncompressed_bytes);
        let mut tar = TarReader::new(raw, limits);
        run_shared(&mut tar, sink)?;
        // Whatever follows the end-of-archive marker is part of the digest.
        let mut rest = tar.into_inner();
        rest.drain().map_err(tar::read_err)?;
        // A plain tar's diff_id is its digest: no second hash.
        return Ok((compression, rest.count, None));
    }
    let want_diff = opts.expected_diff_id.is_some() || opts.compute_diff_id;
    let limit = opts.max_uncompressed_bytes;
    let (tx, rx) = mpsc::sync_channel(DECODE_DEPTH);
    let decoder = std::thread::Builder::new()
        .name("rootfs-decode".into())
        .spawn_scoped(scope, move || decode(raw, compression, want_diff, limit, &tx))
        .map_err(|e| Error::io("spawn", "rootfs-decode thread", e))?;
    let parsed = (|| {
        let mut tar = TarReader::new(ChunkSource::new(ChannelFeed(rx), None), limits);
        run_shared(&mut tar, sink)?;
        // Read to the end: the decoder checks its trailers (gzip CRC, zstd checksum) and
        // hashes the rest (tar writers pad to 10 KiB records) for the diff_id.
        tar.into_inner().drain().map_err(tar::read_err)
        // Dropping the receiver stops the decoder if we stopped early.
    })();
    let decoded = decoder.join().expect("rootfs-decode thread panicked");
    parsed?;
    // The parser read to the end of the channel, so the decoder finished: a failure of
    // its own would have been sent to (and returned by) the parser.
    let (count, diff) = decoded.expect("the decoder finished");
    Ok((compression, count, diff))
}

/// The decode stage: decompress `raw` into chunks for the parser, counting (and, for the
/// diff_id, hashing) them against the size bound; then read the blob to its end (bytes a
/// decoder did not need are still part of its digest). Errors go to the parser; `None`
/// if there was one or the parser stopped.
fn decode<F: Feed>(
    mut raw: ChunkSource<F>,
    compression: Compression,
    want_diff: bool,
    limit: Option<u64>,
    tx: &SyncSender<io::Result<Arc<Chunk>>>,
) -> Option<(u64, Option<Hasher>)> {
    let pool = Pool::new();
    let mut diff = want_diff.then(Hasher::new);
    let mut count = 0u64;
    let mut run = || -> io::Result<bool> {
        {
            let mut dec: Box<dyn Read + '_> = match compression {
                Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(&mut raw)),
                _ => {
                    let mut d = zstd::stream::read::Decoder::with_buffer(&mut raw)?;
                    // The decoder allocates the frame's window: without a cap a small blob
                    // can ask for 128 MiB or more. 2^25 (32 MiB) covers every zstd level
                    // through 19 and `--long` up to 25; larger windows are refused with a
                    // read error.
                    d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
                    Box::new(d)
                }
            };
            loop {
                let mut c = pool.get();
                chunks::fill(&mut dec, &mut c)?;
                let n = c.bytes().len();
                if n == 0 {
                    break;
                }
                count += n as u64;
                if let Some(limit) = limit.filter(|&l| count > l) {
                    return Err(io::Error::other(tar::LimitHit(limit)));
                }
                if let Some(h) = &mut diff {
                    h.update(c.bytes());
                }
                if tx.send(Ok(Arc::new(c))).is_err() {
                    return Ok(false);
                }
            }
        }
        raw.drain()?;
        Ok(true)
    };
    match run() {
        Ok(true) => Some((count, diff)),
        Ok(false) => None,
        Err(e) => {
            let _ = tx.send(Err(e));
            None
        }
    }
}

/// [`run`] for chunked input: file data is referred to in place, not copied.
fn run_shared<F: Feed>(
    tar: &mut TarReader<ChunkSource<F>>,
    sink: &mut dyn FnMut(Batch) -> Result<Batch>,
) -> Result<()> {
    let mut batch = Batch::shared();
    while let Some(h) = tar.next_entry()? {
        if h.kind == tar::Kind::File {
            batch.files += 1;
        }
        batch.meta += h.path.len() + h.link.len() + h.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        batch.items.push(Item::Entry(Box::new(h)));
        loop {
            if batch.full() {
                batch = sink(batch)?;
            }
            let left = tar.data_left();
            if left == 0 {
                break;
            }
            let want = left.min((batch.cap - batch.used) as u64) as usize;
            match tar.source_mut().take(want).map_err(tar::read_err)? {
                Some((c, a, b)) => {
                    tar.consumed_data(b - a)?;
                    batch.used += b - a;
                    batch.items.push(Item::Shared(c, a, b));
                }
                None => tar.consumed_data(0)?,
            }
        }
    }
    if !batch.items.is_empty() {
        sink(batch)?;
    }
    Ok(())
}

fn stopped() -> Error {
    Error::Read { what: "layer blob", source: io::Error::other("extraction stopped") }
}

/// Counts (and optionally hashes) the uncompressed stream, enforcing the size bound.
struct CountState {
    hasher: Option<Hasher>,
    count: u64,
    limit: Option<u64>,
}

struct Counted<'a, R> {
    inner: R,
    st: &'a mut CountState,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.st.count += n as u64;
        if let Some(limit) = self.st.limit {
            if self.st.count > limit {
                return Err(io::Error::other(tar::LimitHit(limit)));
            }
        }
        if let Some(h) = &mut self.st.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

pub(super) fn detect(magic: &[u8]) -> Result<Compression> {
    match magic {
        [0x1f, 0x8b, ..] => Ok(Compression::Gzip),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Ok(Compression::Zstd),
        // zstd skippable frame (0x184D2A50..=0x184D2A5F, little endian)
        [b, 0x2a, 0x4d, 0x18, ..] if b & 0xf0 == 0x50 => Ok(Compression::Zstd),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => {
            Err(Error::Unsupported { what: "xz-compressed layer (OCI layers are tar, tar+gzip or tar+zstd)".into() })
        }
        [b'B', b'Z', b'h', ..] => {
            Err(Error::Unsupported { what: "bzip2-compressed layer (OCI layers are tar, tar+gzip or tar+zstd)".into() })
        }
        _ => Ok(Compression::None),
    }
}

/// Up to 6 leading bytes, for [`detect`].
fn read_magic<R: Read + ?Sized>(r: &mut R) -> Result<([u8; 6], usize)> {
    let mut m = [0u8; 6];
    let mut n = 0;
    while n < m.len() {
        match r.read(&mut m[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(tar::read_err(e)),
        }
    }
    Ok((m, n))
}

/// The parse stage: detect compression, decode, parse entries into batches for `sink`,
/// then read the decoded stream, and the blob, to their ends. Returns the compression, the uncompressed
/// size and the uncompressed-stream hasher (when a diff_id was asked for).
fn parse<S: BufRead + ?Sized>(
    source: &mut S,
    opts: &UnpackOptions,
    sink: &mut dyn FnMut(Batch) -> Result<Batch>,
) -> Result<(Compression, u64, Option<Hasher>)> {
    let (magic, n) = read_magic(source)?;
    let compression = detect(&magic[..n])?;
    let head = io::Cursor::new(magic).take(n as u64);
    let joined = Read::chain(head, &mut *source);
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(joined),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(joined)),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(joined)
                .map_err(|e| Error::Read { what: "zstd stream", source: e })?;
            // The decoder allocates the frame's window: without a cap a small blob can ask
            // for 128 MiB or more. 2^25 (32 MiB) covers every zstd level through 19 and
            // `--long` up to 25; larger windows are refused with a read error.
            d.window_log_max(ZSTD_WINDOW_LOG_MAX).map_err(|e| Error::Read { what: "zstd stream", source: e })?;
            Box::new(d)
        }
    };
    let want_diff = opts.expected_diff_id.is_some() || opts.compute_diff_id;
    let mut st = CountState {
        // A plain tar's diff_id is its digest: no second hash.
        hasher: (want_diff && compression != Compression::None).then(Hasher::new),
        count: 0,
        limit: opts.max_uncompressed_bytes,
    };
    {
        let counted = Counted { inner: decoded, st: &mut st };
        // Decoders answer small reads slowly: buffer the 512-byte header reads. A plain
        // tar is already buffered by the source.
        let reader: Box<dyn Read + '_> = if compression == Compression::None {
            Box::new(counted)
        } else {
            Box::new(BufReader::with_capacity(64 * 1024, counted))
        };
        let limits = Limits {
            max_header_bytes: opts.max_header_bytes,
            max_entries: opts.max_entries,
            max_sparse_size: opts.max_uncompressed_bytes,
            require_end: opts.require_end_of_archive,
        };
        let mut tar = TarReader::new(reader, limits);
        run(&mut tar, None, sink)?;
        // Whatever follows the end-of-archive marker is part of the diff_id (tar writers
        // pad to 10 KiB records); reading it also makes the decoders check their trailers
        // (gzip CRC, zstd checksum).
        let mut rest = tar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(tar::read_err)?;
    }
    // Bytes a decoder did not need (after the last gzip member / zstd frame) are still
    // part of the blob and its digest.
    io::copy(source, &mut io::sink()).map_err(tar::read_err)?;
    Ok((compression, st.count, st.hasher))
}

/// Move every entry and its data from the tar reader into batches. With `clone_base`
/// (the archive's offset in its file), plain regular files' data is not read but passed
/// on as an [`Item::Clone`] range; the reader skips it.
fn run<R: Source>(
    tar: &mut TarReader<R>,
    clone_base: Option<u64>,
    sink: &mut dyn FnMut(Batch) -> Result<Batch>,
) -> Result<()> {
    let mut batch = Batch::new();
    while let Some(h) = tar.next_entry()? {
        let mut left = h.size;
        if h.kind == tar::Kind::File {
            batch.files += 1;
        }
        batch.meta += h.path.len() + h.link.len() + h.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let clone = clone_base.filter(|_| h.kind == tar::Kind::File && h.sparse.is_none() && h.size > 0);
        batch.items.push(Item::Entry(Box::new(h)));
        if let Some(base) = clone {
            batch.items.push(Item::Clone(base + tar.position(), left));
            // Skipped (not read) by the next `next_entry`.
            left = 0;
        }
        loop {
            if batch.full() {
                batch = sink(batch)?;
            }
            if left == 0 {
                break;
            }
            let start = batch.used;
            let want = left.min((batch.data.len() - start) as u64) as usize;
            let n = tar.read_data(&mut batch.data[start..start + want])?;
            batch.used += n;
            left -= n as u64;
            match batch.items.last_mut() {
                Some(Item::Data(_, end)) if *end == start => *end += n,
                _ => batch.items.push(Item::Data(start, start + n)),
            }
        }
    }
    if !batch.items.is_empty() {
        sink(batch)?;
    }
    Ok(())
}

/// Reads an archive held in a file with `pread`, buffering only headers' worth: entry data
/// that is skipped is never read.
pub(super) struct FileSource<'f> {
    file: &'f File,
    /// File offset of the byte after the buffered ones.
    pos: u64,
    /// End of the archive in the file.
    end: u64,
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
}

/// Read-ahead of [`FileSource`]: a few headers, little of the data that follows them.
const FILE_SOURCE_BUF: usize = 32 * 1024;

impl<'f> FileSource<'f> {
    pub(super) fn new(file: &'f File, start: u64, end: u64) -> Self {
        FileSource { file, pos: start, end, buf: vec![0; FILE_SOURCE_BUF], lo: 0, hi: 0 }
    }
}

impl Read for FileSource<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.lo == self.hi {
            let want = (self.end.saturating_sub(self.pos)).min(self.buf.len() as u64) as usize;
            let n = self.file.read_at(&mut self.buf[..want], self.pos)?;
            self.pos += n as u64;
            self.lo = 0;
            self.hi = n;
        }
        let n = (self.hi - self.lo).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.lo..self.lo + n]);
        self.lo += n;
        Ok(n)
    }
}

impl Source for FileSource<'_> {
    fn skip_bytes(&mut self, n: u64) -> io::Result<u64> {
        let buffered = (self.hi - self.lo) as u64;
        if n <= buffered {
            self.lo += n as usize;
            return Ok(n);
        }
        self.lo = self.hi;
        let beyond = (n - buffered).min(self.end.saturating_sub(self.pos));
        self.pos += beyond;
        Ok(buffered + beyond)
    }
}

/// The fast path for an uncompressed archive in a regular file (bytes `start..end`):
/// headers are read with `pread`, regular files' data is never read here but copied from
/// the archive into each new file with `copy_file_range` (extents shared where the
/// filesystem can). Nothing is hashed. Runs on the calling thread.
pub(super) fn run_file(file: &File, start: u64, end: u64, opts: &UnpackOptions, ex: &mut Extractor<'_>) -> Result<()> {
    if let Some(limit) = opts.max_uncompressed_bytes {
        if end - start > limit {
            return Err(Error::LimitExceeded { what: "uncompressed layer size", limit });
        }
    }
    let limits = Limits {
        max_header_bytes: opts.max_header_bytes,
        max_entries: opts.max_entries,
        max_sparse_size: opts.max_uncompressed_bytes,
        require_end: opts.require_end_of_archive,
    };
    let mut w = Writer::new(ex);
    let mut tar = TarReader::new(FileSource::new(file, start, end), limits);
    run(&mut tar, Some(start), &mut |mut b| {
        create(ex, &mut b)?;
        write(&mut w, &mut b, Some(file))?;
        Ok(b)
    })?;
    w.close()?;
    ex.counts.skipped_xattrs += w.skipped_xattrs;
    Ok(())
}

/// Finish the digests and verify them against the expected ones.
fn finish(
    hasher: Hasher,
    compression: Compression,
    uncompressed_bytes: u64,
    diff: Option<Hasher>,
    opts: &UnpackOptions,
) -> Result<Parsed> {
    let compressed_bytes = hasher.len();
    let digest = hasher.finish();
    let diff_id = match compression {
        Compression::None => Some(digest),
        _ => diff.map(Hasher::finish),
    };
    if let Some(expected) = &opts.expected_digest {
        expected.verify(&digest)?;
    }
    if let (Some(expected), Some(found)) = (&opts.expected_diff_id, &diff_id) {
        expected.verify(found)?;
    }
    Ok(Parsed { digest, compressed_bytes, diff_id, uncompressed_bytes, compression })
}
