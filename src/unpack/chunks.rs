//! Large shared buffers for the pipelined [`unpack`](super::unpack): the blob is read (and,
//! when compressed, decoded) into 1 MiB chunks that the hash thread, the tar parser and the
//! file writer all use in place, so file data crosses user space once (`read` in,
//! `write` out) and is never copied between buffers.
//!
//! ```text
//!  input ──read──▶ raw Chunk ─┬─▶ hash thread
//!                             └─▶ [decode thread: gunzip/unzstd ──▶ decoded Chunk]
//!                                   ──▶ ChunkSource (tar parser) ──▶ writer: write(&chunk[a..b])
//! ```
//!
//! A chunk goes back to its [`Pool`] when the last reference to it is dropped, wherever
//! that is, so buffers are reused (no page faults for fresh memory) and the number of
//! chunks alive is bounded by the pipeline's channels and batches.

use std::io::{self, BufRead, Read};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};

use super::tar::{LimitHit, Source};

/// Bytes in a chunk.
pub(super) const CHUNK_BYTES: usize = 1024 * 1024;
/// Alignment of chunk buffers, the destination of `read`.
const CHUNK_ALIGN: usize = 4096;
/// A read fills a chunk at least this far before it is handed on (or the input ends):
/// a network stream's small reads are gathered, and the first chunk always holds the
/// magic bytes.
const MIN_FILL: usize = 64 * 1024;

/// A buffer of the blob (or of the decoded stream), shared by `Arc`.
pub(super) struct Chunk {
    buf: Vec<u8>,
    /// Where the chunk's bytes start in `buf`: the first page boundary (see [`Pool::get`]).
    start: usize,
    len: usize,
    home: Option<Sender<Vec<u8>>>,
}

impl Chunk {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.start + self.len..self.start + CHUNK_BYTES]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(home) = &self.home {
            // The pool is gone when its producer has finished: the buffer is freed.
            let _ = home.send(std::mem::take(&mut self.buf));
        }
    }
}

/// Free chunk buffers of one producer.
pub(super) struct Pool {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

impl Pool {
    pub(super) fn new() -> Pool {
        let (tx, rx) = mpsc::channel();
        Pool { tx, rx }
    }

    /// An empty chunk of [`CHUNK_BYTES`] starting on a page boundary. The kernel copies
    /// file data into the buffer of `read`; with the destination 16 bytes past a page
    /// boundary (where a large `Vec` starts) that copy ran ~3× slower on an AMD EPYC
    /// (~70 ms more of CPU for a 211 MB plain tar); aligned, it costs what GNU tar's
    /// page-aligned reads cost.
    pub(super) fn get(&self) -> Chunk {
        let buf = self.rx.try_recv().unwrap_or_else(|_| vec![0; CHUNK_BYTES + CHUNK_ALIGN]);
        let start = buf.as_ptr().align_offset(CHUNK_ALIGN);
        Chunk { buf, start, len: 0, home: Some(self.tx.clone()) }
    }
}

/// Where a [`ChunkSource`] gets its chunks.
pub(super) trait Feed {
    /// The next chunk, `None` at the end of the stream.
    fn next(&mut self) -> io::Result<Option<Arc<Chunk>>>;
}

/// Where the blob's chunks go to be hashed.
pub(super) trait HashSink: Sync {
    /// Queue a chunk for hashing (may block, or do other work, while the queue is full).
    fn push(&self, chunk: Arc<Chunk>);
    /// No more chunks.
    fn end(&self);
}

/// Reads the blob into chunks, handing each to the hash thread as well. Dropping it ends
/// the hasher's input.
pub(super) struct RawFeed<'a, 'p, R: ?Sized> {
    inner: &'a mut R,
    pool: Pool,
    hash: &'a dyn HashSink,
    progress: Option<&'p mut (dyn FnMut(u64) + Send + 'p)>,
    total: u64,
}

impl<'a, 'p, R: Read + ?Sized> RawFeed<'a, 'p, R> {
    pub(super) fn new(
        inner: &'a mut R,
        hash: &'a dyn HashSink,
        progress: Option<&'p mut (dyn FnMut(u64) + Send + 'p)>,
    ) -> Self {
        RawFeed { inner, pool: Pool::new(), hash, progress, total: 0 }
    }
}

impl<R: ?Sized> Drop for RawFeed<'_, '_, R> {
    fn drop(&mut self) {
        self.hash.end();
    }
}

impl<R: Read + ?Sized> Feed for RawFeed<'_, '_, R> {
    fn next(&mut self) -> io::Result<Option<Arc<Chunk>>> {
        let mut chunk = self.pool.get();
        while chunk.len < MIN_FILL {
            match self.inner.read(chunk.spare()) {
                Ok(0) => break,
                Ok(n) => chunk.len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if chunk.len == 0 {
            return Ok(None);
        }
        self.total += chunk.len as u64;
        if let Some(p) = &mut self.progress {
            p(self.total);
        }
        let chunk = Arc::new(chunk);
        self.hash.push(chunk.clone());
        Ok(Some(chunk))
    }
}

/// Decoded chunks from the decode thread.
pub(super) struct ChannelFeed(pub Receiver<io::Result<Arc<Chunk>>>);

impl Feed for ChannelFeed {
    fn next(&mut self) -> io::Result<Option<Arc<Chunk>>> {
        // A closed channel is the end of the stream: the decode thread sends its error
        // (if any) before it stops.
        self.0.recv().ok().transpose()
    }
}

/// Fills `chunk` from `r` until it is full or `r` ends.
pub(super) fn fill(r: &mut dyn Read, chunk: &mut Chunk) -> io::Result<()> {
    while chunk.len < CHUNK_BYTES {
        match r.read(chunk.spare()) {
            Ok(0) => break,
            Ok(n) => chunk.len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A byte stream over chunks: `Read`/`BufRead` (copying) for headers and decoders,
/// [`take`](Self::take) (in place) for file data. Counts the bytes it fetched, refusing
/// to go past `limit` (the uncompressed-size bound, when the chunks are the tar).
pub(super) struct ChunkSource<F> {
    feed: F,
    cur: Option<Arc<Chunk>>,
    pos: usize,
    pub count: u64,
    limit: Option<u64>,
    done: bool,
}

impl<F: Feed> ChunkSource<F> {
    pub(super) fn new(feed: F, limit: Option<u64>) -> Self {
        ChunkSource { feed, cur: None, pos: 0, count: 0, limit, done: false }
    }

    /// Bound the bytes fetched from now on (see [`ChunkSource::new`]).
    pub(super) fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }

    /// The current chunk with unread bytes, fetching the next one when needed; `None` at
    /// the end of the stream.
    fn current(&mut self) -> io::Result<Option<&Arc<Chunk>>> {
        let exhausted = self.cur.as_ref().is_none_or(|c| self.pos == c.len);
        if exhausted && !self.done {
            self.cur = None;
            match self.feed.next()? {
                None => self.done = true,
                Some(c) => {
                    self.count += c.len as u64;
                    if let Some(limit) = self.limit {
                        if self.count > limit {
                            return Err(io::Error::other(LimitHit(limit)));
                        }
                    }
                    self.cur = Some(c);
                    self.pos = 0;
                }
            }
        }
        Ok(self.cur.as_ref().filter(|c| self.pos < c.len))
    }

    /// Up to `max` bytes in place: the chunk and the range in its [`Chunk::bytes`]; `None`
    /// at the end of the stream.
    pub(super) fn take(&mut self, max: usize) -> io::Result<Option<(Arc<Chunk>, usize, usize)>> {
        let Some(c) = self.current()?.cloned() else { return Ok(None) };
        let pos = self.pos;
        let end = c.len.min(pos.saturating_add(max));
        self.pos = end;
        Ok(Some((c, pos, end)))
    }

    /// Reads the stream to its end, discarding it.
    pub(super) fn drain(&mut self) -> io::Result<()> {
        while self.take(usize::MAX)?.is_some() {}
        Ok(())
    }
}

impl<F: Feed> Read for ChunkSource<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<F: Feed> BufRead for ChunkSource<F> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.current()?.is_none() {
            return Ok(&[]);
        }
        let c = self.cur.as_ref().expect("current chunk");
        Ok(&c.bytes()[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        let len = self.cur.as_ref().map_or(0, |c| c.len);
        self.pos = (self.pos + n).min(len);
    }
}

impl<F: Feed> Source for ChunkSource<F> {
    fn skip_bytes(&mut self, n: u64) -> io::Result<u64> {
        let mut left = n;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX);
            let Some((_, a, b)) = self.take(want)? else { break };
            left -= (b - a) as u64;
        }
        Ok(n - left)
    }
}
