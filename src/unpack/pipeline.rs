//! The stages of [`unpack`](super::unpack): fetch+hash, decompress+parse, create, write.
//!
//! # Concurrency
//! In pipelined mode each stage has a thread: two scoped helpers before the caller's
//! thread (fetch, parse), the caller (create: owns the [`Extractor`], its root and
//! directory descriptors), and a scoped writer after it (fills and closes regular
//! files). Bounded channels join them, so memory stays at a few MiB whatever the layer
//! size, and open descriptors stay under ~200 (see [`BATCH_FILES`]). Batches go
//! parse → create → write and back to the parser for reuse.
//!
//! Shutdown:
//! - the create or write stage fails → it raises `abort` and drops its receiver; the
//!   stage before it stops at its next send; the fetcher sees `abort` and stops reading;
//! - the parser fails → it raises `abort` and returns, dropping its channel ends; the
//!   later stages drain what they have and stop;
//! - the parser finishes early (the compressed stream ended before the blob did) → the
//!   fetcher keeps reading and hashing to the end of the blob, so the digest covers all
//!   of it.
//!
//! Errors are reported in causal order: create, then write (the create stage stops
//! silently when the writer has gone), then fetch (an input I/O error is the root cause
//! of whatever the parser saw), then parse.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use super::extract::{Extractor, OpenFile, Writer};
use super::tar::{self, Header, Limits, TarReader};
use super::{Compression, UnpackOptions};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};

/// What the fetch and parse stages learned about the stream.
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
}

const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 512;
/// Regular files are opened by the create stage and closed by the writer, so the files
/// in a batch stay open until the writer reaches them. Bounding them per batch, with
/// [`WRITE_DEPTH`], bounds descriptors in flight: at most `BATCH_FILES * (WRITE_DEPTH + 2)`
/// = 128 files, plus the extractor's directory cache.
const BATCH_FILES: usize = 32;
const BATCH_DEPTH: usize = 8;
const WRITE_DEPTH: usize = 2;
const CHUNK_BYTES: usize = 256 * 1024;
const CHUNK_DEPTH: usize = 4;

struct Batch {
    items: Vec<Item>,
    data: Vec<u8>,
    used: usize,
    files: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch { items: Vec::with_capacity(BATCH_ITEMS), data: vec![0; BATCH_BYTES], used: 0, files: 0 }
    }

    fn full(&self) -> bool {
        self.items.len() >= BATCH_ITEMS || self.used == self.data.len() || self.files >= BATCH_FILES
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

/// The write stage: fill the batch's files; the batch is left empty for reuse.
fn write(w: &mut Writer, b: &mut Batch) -> Result<()> {
    let Batch { items, data, used, files } = b;
    *files = 0;
    for item in items.drain(..) {
        match item {
            Item::File(f) => w.open(*f)?,
            Item::Entry(_) | Item::Done => w.close()?,
            Item::Data(s, e) => w.data(&data[s..e])?,
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
    let mut w = Writer::new(opts);
    let (compression, uncompressed_bytes, diff) = {
        let tap = Tap { inner: &mut input, hasher: &mut hasher, progress };
        let mut source = BufReader::with_capacity(64 * 1024, tap);
        let r = parse(&mut source, opts, &mut |mut b| {
            create(ex, &mut b)?;
            write(&mut w, &mut b)?;
            Ok(b)
        })?;
        // Bytes a decoder did not need (after the last gzip member / zstd frame).
        io::copy(&mut source, &mut io::sink()).map_err(tar::read_err)?;
        r
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
    let abort = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (chunk_tx, chunk_rx) = mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(CHUNK_DEPTH);
        let (chunk_back_tx, chunk_back_rx) = mpsc::channel::<Vec<u8>>();
        let (batch_tx, batch_rx) = mpsc::sync_channel::<Batch>(BATCH_DEPTH);
        let (write_tx, write_rx) = mpsc::sync_channel::<Batch>(WRITE_DEPTH);
        let (batch_back_tx, batch_back_rx) = mpsc::channel::<Batch>();
        let abort = &abort;
        let input = &mut input;

        let fetcher = std::thread::Builder::new()
            .name("rootfs-fetch".into())
            .spawn_scoped(s, move || fetch(input, progress, chunk_tx, chunk_back_rx, abort))
            .map_err(|e| Error::io("spawn", "rootfs-fetch thread", e))?;
        let parser = std::thread::Builder::new()
            .name("rootfs-parse".into())
            .spawn_scoped(s, move || {
                let mut source = ChannelReader { rx: chunk_rx, back: chunk_back_tx, cur: Vec::new(), pos: 0, len: 0 };
                let r = parse(&mut source, opts, &mut |b| {
                    batch_tx.send(b).map_err(|_| stopped())?;
                    Ok(batch_back_rx.try_recv().unwrap_or_else(|_| Batch::new()))
                });
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                r
            })
            .map_err(|e| Error::io("spawn", "rootfs-parse thread", e))?;

        let writer = std::thread::Builder::new()
            .name("rootfs-write".into())
            .spawn_scoped(s, move || {
                let mut w = Writer::new(opts);
                let mut r = Ok(());
                for mut b in write_rx.iter() {
                    r = write(&mut w, &mut b);
                    if r.is_err() {
                        break;
                    }
                    let _ = batch_back_tx.send(b);
                }
                let r = r.and_then(|()| w.close()).map(|()| w.skipped_xattrs);
                if r.is_err() {
                    abort.store(true, Ordering::Relaxed);
                }
                r
            })
            .map_err(|e| Error::io("spawn", "rootfs-write thread", e))?;

        let mut failed = None;
        for mut b in batch_rx.iter() {
            if let Err(e) = create(ex, &mut b) {
                failed = Some(e);
                abort.store(true, Ordering::Relaxed);
                break;
            }
            if write_tx.send(b).is_err() {
                break; // the writer failed; its error is reported below
            }
        }
        drop(batch_rx);
        drop(write_tx);
        let written = writer.join().expect("rootfs-write thread panicked");
        let parsed = parser.join().expect("rootfs-parse thread panicked");
        let fetched = fetcher.join().expect("rootfs-fetch thread panicked");
        if let Some(e) = failed {
            return Err(e);
        }
        ex.counts.skipped_xattrs += written?;
        let hasher = fetched?;
        let (compression, uncompressed_bytes, diff) = parsed?;
        // `None` only after an abort, which only a failure above raises.
        let hasher = hasher.ok_or_else(stopped)?;
        finish(hasher, compression, uncompressed_bytes, diff, opts)
    })
}

fn stopped() -> Error {
    Error::Read { what: "layer blob", source: io::Error::other("extraction stopped") }
}

/// The fetch stage: read the blob in chunks, hash, hand chunks to the parser. Reads to
/// the end of the blob even after the parser is done with it, unless aborted.
fn fetch<R: Read + ?Sized>(
    input: &mut R,
    mut progress: Option<&mut (dyn FnMut(u64) + Send)>,
    tx: SyncSender<io::Result<(Vec<u8>, usize)>>,
    back: Receiver<Vec<u8>>,
    abort: &AtomicBool,
) -> Result<Option<Hasher>> {
    let mut hasher = Hasher::new();
    let mut sending = true;
    let mut spare = Vec::new();
    loop {
        if abort.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut buf = if sending { back.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK_BYTES]) } else { Vec::new() };
        if !sending && spare.is_empty() {
            spare = vec![0u8; CHUNK_BYTES];
        }
        let target = if sending { &mut buf } else { &mut spare };
        let n = match input.read(target) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if sending {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
                return Err(tar::read_err(e));
            }
        };
        hasher.update(&target[..n]);
        if let Some(p) = &mut progress {
            p(hasher.len());
        }
        if sending && tx.send(Ok((buf, n))).is_err() {
            sending = false;
        }
    }
    Ok(Some(hasher))
}

/// The parser's view of the fetch stage's chunks, as a `BufRead`.
struct ChannelReader {
    rx: Receiver<io::Result<(Vec<u8>, usize)>>,
    back: Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    len: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.len {
            match self.rx.recv() {
                Ok(Ok((chunk, len))) => {
                    let old = std::mem::replace(&mut self.cur, chunk);
                    if !old.is_empty() {
                        let _ = self.back.send(old);
                    }
                    self.pos = 0;
                    self.len = len;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {} // end of blob
            }
        }
        Ok(&self.cur[self.pos..self.len])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.len);
    }
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

fn detect(magic: &[u8]) -> Result<Compression> {
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
/// then read the decoded stream to its end. Returns the compression, the uncompressed
/// size and the uncompressed-stream hasher (when a diff_id was asked for).
fn parse<S: BufRead + ?Sized>(
    source: &mut S,
    opts: &UnpackOptions,
    sink: &mut dyn FnMut(Batch) -> Result<Batch>,
) -> Result<(Compression, u64, Option<Hasher>)> {
    let (magic, n) = read_magic(source)?;
    let compression = detect(&magic[..n])?;
    let head = io::Cursor::new(magic).take(n as u64);
    let joined = Read::chain(head, source);
    let decoded: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(joined),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(joined)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(joined)
                .map_err(|e| Error::Read { what: "zstd stream", source: e })?,
        ),
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
        let limits = Limits { max_header_bytes: opts.max_header_bytes, max_entries: opts.max_entries };
        let mut tar = TarReader::new(reader, limits);
        run(&mut tar, sink)?;
        // Whatever follows the end-of-archive marker is part of the diff_id (tar writers
        // pad to 10 KiB records); reading it also makes the decoders check their trailers
        // (gzip CRC, zstd checksum).
        let mut rest = tar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(tar::read_err)?;
    }
    Ok((compression, st.count, st.hasher))
}

/// Move every entry and its data from the tar reader into batches.
fn run<R: Read>(tar: &mut TarReader<R>, sink: &mut dyn FnMut(Batch) -> Result<Batch>) -> Result<()> {
    let mut batch = Batch::new();
    while let Some(h) = tar.next_entry()? {
        let mut left = h.size;
        if h.kind == tar::Kind::File {
            batch.files += 1;
        }
        batch.items.push(Item::Entry(Box::new(h)));
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
