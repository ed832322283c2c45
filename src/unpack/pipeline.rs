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
//! - a scoped writer thread fills and closes the regular files the caller created,
//!   writing file data straight from the chunks it was read or decoded into.
//!
//! Bounded channels join them, so memory stays at a few MiB whatever the layer size
//! (chunks are recycled once their last user drops them), and open descriptors stay
//! under ~200 (see [`BATCH_FILES`]). Batches go caller → writer → back to the caller for
//! reuse.
//!
//! Sharing the file writes between the writer and the hash thread (whichever is free)
//! instead of a writer thread was tried: no faster (plain tar onto tmpfs, 180 against
//! 176 ms), for more locking code.
//!
//! Shutdown: if the create stage fails, the caller stops and drops its channel ends, and
//! the helpers finish what they hold (the decode thread stops at its next send); if the
//! writer fails, it drops its receiver, so the caller's next send fails and it stops.
//! Errors are reported in causal order: create, then write (the caller stops silently
//! when the writer has gone), then read/decode/parse.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender};

use super::chunks::{self, ChannelFeed, Chunk, ChunkSource, Feed, Pool, RawFeed};
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

/// Each stage on its own thread (see the module docs).
pub(super) fn run_pipelined<R: Read + Send>(
    mut input: R,
    opts: &UnpackOptions,
    progress: Option<&mut (dyn FnMut(u64) + Send)>,
    ex: &mut Extractor<'_>,
) -> Result<Parsed> {
    std::thread::scope(|s| {
        let (hash_tx, hash_rx) = mpsc::sync_channel::<Arc<Chunk>>(HASH_DEPTH);
        let (write_tx, write_rx) = mpsc::sync_channel::<Batch>(WRITE_DEPTH);
        let (batch_back_tx, batch_back_rx) = mpsc::channel::<Batch>();
        let hasher = std::thread::Builder::new()
            .name("rootfs-hash".into())
            .spawn_scoped(s, move || {
                let mut h = Hasher::new();
                for c in hash_rx.iter() {
                    h.update(c.bytes());
                }
                h
            })
            .map_err(|e| Error::io("spawn", "rootfs-hash thread", e))?;
        let mut w = Writer::new(ex);
        let writer = std::thread::Builder::new()
            .name("rootfs-write".into())
            .spawn_scoped(s, move || {
                let mut r = Ok(());
                for mut b in write_rx.iter() {
                    r = write(&mut w, &mut b, None);
                    if r.is_err() {
                        break;
                    }
                    let _ = batch_back_tx.send(b);
                }
                // Dropping `write_rx` here makes the caller's next send fail if we failed.
                r.and_then(|()| w.close()).map(|()| w.skipped_xattrs)
            })
            .map_err(|e| Error::io("spawn", "rootfs-write thread", e))?;

        // Read (decompress on a thread of its own), parse and create on this thread.
        let mut failed = None;
        let parsed = {
            let raw = ChunkSource::new(RawFeed::new(&mut input, hash_tx, progress), None);
            parse_chunks(s, raw, opts, &mut |mut b| {
                if let Err(e) = create(ex, &mut b) {
                    failed = Some(e);
                    return Err(stopped());
                }
                // A send fails only when the writer has failed; its error is reported below.
                write_tx.send(b).map_err(|_| stopped())?;
                Ok(batch_back_rx.try_recv().unwrap_or_else(|_| Batch::shared()))
            })
            // The raw source is dropped by now, ending the hasher's input.
        };
        drop(write_tx);
        let written = writer.join().expect("rootfs-write thread panicked");
        let hasher = hasher.join().expect("rootfs-hash thread panicked");
        if let Some(e) = failed {
            return Err(e);
        }
        ex.counts.skipped_xattrs += written?;
        let (compression, uncompressed_bytes, diff) = parsed?;
        finish(hasher, compression, uncompressed_bytes, diff, opts)
    })
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
