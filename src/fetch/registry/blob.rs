//! Blob downloads: [`get_range`] (the bytes of a blob from an offset, on one host: the
//! building block for resumes and range reads), [`read_range`] (`read_blob_range`: one
//! range, resumed and falling over like a blob, not verified) and [`BlobReader`], the
//! reader `open_blob` hands out, which resumes, falls over to the next host and verifies.
//!
//! # What the reader guarantees
//! The bytes it returns are exactly the blob's: never more than the descriptor's size,
//! resumed at the exact offset after a break (with `Range: bytes=N-`, or by skipping `N`
//! bytes when a server ignores `Range` and answers 200), and hashed as they pass.
//!
//! # Wrong bytes: the held-back tail
//! A digest can only be checked once every byte is in, and by then the consumer (the
//! cache's extraction, streaming) has most of them. So the reader keeps the last
//! [`HOLD`] bytes it received to itself until the digest is checked: a blob up to 1 MiB
//! is handed out only once verified, and of a larger one only the part before its last
//! MiB goes out unverified. On a mismatch the held bytes are dropped, the host(s) that
//! served the stream are demoted for this digest (tried last from then on, reported to
//! [`FetchObserver::fallback`]) and the download continues *from the number of bytes
//! handed out* on the next host; the final digest check, over what was handed out plus
//! the new tail, decides again. So a mirror whose wrong bytes lie in the held-back tail
//! (any corruption of a small blob, truncation or a wrong tail of a large one) is healed
//! within the same read: the consumer never sees a wrong byte. Wrong bytes that were
//! already handed out cannot be taken back: the check then fails again and the read
//! fails with [`Error::ContentMismatch`] naming the hosts, before anything past them is
//! handed out; the consumer (the cache verifies each layer's digest too and keeps nothing
//! of a failed extraction, reads the rest of a blob whose data made extraction fail to
//! learn this cause, and then tries the layer once more) gets the next `open_blob` of the
//! digest from a host that has not lied about it. A stream its consumer drops midway (a
//! decompressor or tar parser choking on wrong bytes early in a large blob gives up long
//! before the digest could tell) demotes its hosts the same way. A host whose
//! `Content-Length` contradicts the descriptor is left before any byte is read from it.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Instant;

use ureq::http::Method;

use super::Inner;
use super::transport::{Conn, Exchange, backoff, header};
use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::fetch::{Descriptor, FetchObserver};

/// A body positioned at the offset asked for.
pub(crate) struct RangeBody {
    pub(crate) reader: Box<dyn Read + Send>,
    /// Bytes the server says remain from the offset (`None` if it did not say).
    pub(crate) remaining: Option<u64>,
    /// The blob's size as the server gives it (`Content-Range` total of a 206,
    /// `Content-Length` of a 200; `None` if it did not say).
    pub(crate) total: Option<u64>,
}

/// `GET <api>/<repository>/blobs/<digest>` from `offset` (to `end`, exclusive, if given)
/// on `conn`: the reader starts exactly at `offset` whether or not the server honoured
/// `Range` (bytes are skipped when it answered 200), and stops at `end`.
///
/// # Errors
/// As [`super::transport::Client::send`]; [`Error::Registry`] for a `Content-Range` that
/// does not start at `offset`, or a body shorter than `offset` when skipping.
#[allow(clippy::too_many_arguments)]
pub(crate) fn get_range(
    inner: &Inner,
    conn: &Conn,
    repository: &str,
    digest: &Digest,
    offset: u64,
    end: Option<u64>,
    observer: &dyn FetchObserver,
    retry: bool,
) -> Result<RangeBody> {
    let mut headers = Vec::new();
    match end {
        Some(e) if e <= offset => {
            return Ok(RangeBody { reader: Box::new(io::empty()), remaining: Some(0), total: None });
        }
        Some(e) => headers.push(("range", format!("bytes={offset}-{}", e - 1))),
        None if offset > 0 => headers.push(("range", format!("bytes={offset}-"))),
        None => {}
    }
    let rest = format!("{repository}/blobs/{digest}");
    let x = Exchange {
        method: Method::GET,
        url: conn.entry.url(&rest),
        repository,
        headers,
        op: format!("GET {}/{rest}", conn.entry.path),
    };
    let fail =
        |reason: String| Error::Registry { host: conn.host().to_string(), op: x.op.clone(), status: None, reason };
    let resp = inner.client.send(conn, &x, observer, retry)?;
    let status = resp.status().as_u16();
    let length = header(&resp, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
    if status == 206 {
        let range = header(&resp, "content-range").unwrap_or_default();
        let parsed = parse_content_range(&range);
        let asked = match end {
            Some(e) => format!("bytes {offset}-{}", e - 1),
            None => format!("bytes from {offset}"),
        };
        let matches = parsed.is_some_and(|(start, last, _)| start == offset && end.is_none_or(|e| last + 1 == e));
        if !matches {
            return Err(fail(format!("asked for {asked}, got Content-Range {range:?}")));
        }
        let total = parsed.and_then(|(_, _, total)| total);
        // Read on to the end only where the body's end is known (a length or chunked
        // framing): a body that ends only when the server closes would wait there.
        let framed = length.is_some()
            || header(&resp, "transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
        let reader = resp.into_body().into_reader();
        let reader: Box<dyn Read + Send> = match end {
            Some(e) if framed => Box::new(ToTheEnd { inner: reader, left: e - offset }),
            Some(e) => Box::new(reader.take(e - offset)),
            None => Box::new(reader),
        };
        return Ok(RangeBody { reader, remaining: length, total });
    }
    // 200: the whole blob. Skip to the offset (a server that ignores Range).
    let mut reader = resp.into_body().into_reader();
    if offset > 0 {
        let skipped = io::copy(&mut (&mut reader).take(offset), &mut io::sink())
            .map_err(|e| fail(format!("skipping {offset} bytes (the server ignored Range): {e}")))?;
        if skipped != offset {
            return Err(fail(format!("the body ended after {skipped} bytes, before offset {offset}")));
        }
    }
    let remaining = length.map(|l| l.saturating_sub(offset));
    let reader: Box<dyn Read + Send> = match end {
        Some(e) => Box::new(reader.take(e - offset)),
        None => Box::new(reader),
    };
    Ok(RangeBody { reader, remaining, total: length })
}

/// Most ranges asked for in one multi-range request (the header stays short: servers
/// bound their request headers).
pub(crate) const MULTI_MAX: usize = 32;

/// `ranges` (`(offset, len)`, increasing, not overlapping, each checked against the
/// blob) of `desc`'s blob in one `GET` with a multi-range `Range` header on `conn`, the
/// `multipart/byteranges` answer split into exactly the ranges asked for (stargz-
/// snapshotter reads lazy layers the same way: one request instead of one per range).
/// `Ok(None)` when the answer is anything else (a server that ignores such a header and
/// sends the blob, or one range; parts other than the ones asked for): the caller reads
/// the ranges one by one, and need not ask this host again. Not verified, as
/// [`read_range`].
///
/// # Errors
/// As [`super::transport::Client::send`]; [`Error::Registry`] for a body that breaks.
pub(crate) fn get_multi(
    inner: &Inner,
    conn: &Conn,
    repository: &str,
    desc: &Descriptor,
    ranges: &[(u64, u64)],
    observer: &dyn FetchObserver,
) -> Result<Option<Vec<Vec<u8>>>> {
    let spec: Vec<String> = ranges.iter().map(|&(o, l)| format!("{o}-{}", o + l - 1)).collect();
    let rest = format!("{repository}/blobs/{}", desc.digest);
    let x = Exchange {
        method: Method::GET,
        url: conn.entry.url(&rest),
        repository,
        headers: vec![("range", format!("bytes={}", spec.join(",")))],
        op: format!("GET {}/{rest}", conn.entry.path),
    };
    let resp = inner.client.send(conn, &x, observer, false)?;
    let boundary = header(&resp, "content-type").and_then(|t| multipart_boundary(&t));
    let (206, Some(boundary)) = (resp.status().as_u16(), boundary) else {
        return Ok(None); // dropped unread: the connection goes, not the whole blob
    };
    // The parts' headers are small (a type and a range): more than this is not an
    // answer to what was asked.
    let want: u64 = ranges.iter().map(|r| r.1).sum();
    let limit = want + 512 * ranges.len() as u64 + 4096;
    let mut body = Vec::with_capacity(want.min(64 << 20) as usize);
    let read = resp.into_body().into_reader().take(limit + 1).read_to_end(&mut body);
    read.map_err(|e| Error::Registry {
        host: conn.host().to_string(),
        op: x.op.clone(),
        status: Some(206),
        reason: format!("multi-range answer broke off: {e}"),
    })?;
    if body.len() as u64 > limit {
        return Ok(None);
    }
    Ok(split_byteranges(&body, &boundary, ranges, desc.size))
}

/// The `boundary` parameter of a `multipart/byteranges` content type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    let b = parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
    })?;
    (!b.is_empty() && b.len() <= 200).then_some(b)
}

/// The parts of a `multipart/byteranges` body, if they are exactly `ranges` of a blob of
/// `size` bytes, in order (RFC 9110 lets a server merge or reorder ranges: that answer
/// is not used).
fn split_byteranges(body: &[u8], boundary: &str, ranges: &[(u64, u64)], size: u64) -> Option<Vec<Vec<u8>>> {
    let delim = format!("--{boundary}");
    let delim = delim.as_bytes();
    // A preamble may come before the first delimiter.
    let mut pos = find(body, delim)?;
    let mut out = Vec::with_capacity(ranges.len());
    for &(offset, len) in ranges {
        pos = expect(body, pos, delim)?;
        pos = expect(body, pos, b"\r\n")?;
        let head_len = find(body.get(pos..pos + 1024.min(body.len() - pos))?, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&body[pos..pos + head_len]).ok()?;
        pos += head_len + 4;
        let range = head.split("\r\n").find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-range").then(|| parse_content_range(v))?
        })?;
        if range != (offset, offset + len - 1, Some(size)) {
            return None;
        }
        let end = pos.checked_add(usize::try_from(len).ok()?)?;
        out.push(body.get(pos..end)?.to_vec());
        pos = expect(body, end, b"\r\n")?;
    }
    pos = expect(body, pos, delim)?;
    expect(body, pos, b"--")?;
    Some(out)
}

/// Where `needle` first is in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The position after `want`, if `body` has it at `pos`.
fn expect(body: &[u8], pos: usize, want: &[u8]) -> Option<usize> {
    body.get(pos..)?.starts_with(want).then_some(pos + want.len())
}

/// `bytes START-END/TOTAL` → (START, END, TOTAL); TOTAL `*` is `None`.
fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, rest) = rest.split_once('-')?;
    let (last, total) = rest.split_once('/')?;
    let (start, last): (u64, u64) = (start.trim().parse().ok()?, last.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    (start <= last && total.is_none_or(|t| last < t)).then_some((start, last, total))
}

/// `len` bytes of `desc`'s blob from `offset` (already checked against its size and
/// [`MAX_RANGE_BYTES`](crate::MAX_RANGE_BYTES)), from `repository` on `conns` in order:
/// `Range: bytes=offset-(offset+len-1)`, bytes skipped where a server answers 200, a
/// broken body resumed on the same host (backoff, bounded as blob reads), a host whose
/// answer contradicts the request (`Content-Range`, the blob's size) left for the next,
/// which continues from the bytes already read. Not verified (see
/// `ImageFetcher::read_blob_range`).
pub(crate) fn read_range(
    inner: &Inner,
    conns: &[Arc<Conn>],
    repository: &str,
    desc: &Descriptor,
    offset: u64,
    len: u64,
    observer: &dyn FetchObserver,
) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(HOLD as u64) as usize);
    let mut failures = Vec::new();
    for (i, conn) in conns.iter().enumerate() {
        let last = i + 1 == conns.len();
        if !buf.is_empty() {
            observer.resumed(conn.host(), offset + buf.len() as u64);
        }
        match range_on(inner, conn, repository, desc, offset, len, &mut buf, observer, last) {
            Ok(()) => return Ok(buf),
            Err(e) => {
                if !last {
                    observer.fallback(conn.host(), &e.to_string());
                }
                failures.push((conn.host().to_string(), e));
            }
        }
    }
    Err(super::combine(failures, format!("bytes {offset}+{len} of blob {} of {repository}", desc.digest)))
}

/// [`read_range`] on one host, appending to `buf` (which may hold the range's first
/// bytes, from a host before).
#[allow(clippy::too_many_arguments)]
fn range_on(
    inner: &Inner,
    conn: &Conn,
    repository: &str,
    desc: &Descriptor,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
    observer: &dyn FetchObserver,
    retry: bool,
) -> Result<()> {
    let end = offset + len;
    let opts = &inner.client.opts;
    let (mut retries, mut last_progress, mut mark) = (0u32, Instant::now(), buf.len());
    let fail = |reason: String| Error::Registry {
        host: conn.host().to_string(),
        op: format!("GET {}/{repository}/blobs/{}", conn.entry.path, desc.digest),
        status: None,
        reason,
    };
    loop {
        let at = offset + buf.len() as u64;
        if at == end {
            return Ok(());
        }
        let body = get_range(inner, conn, repository, &desc.digest, at, Some(end), observer, retry)?;
        if let Some(t) = body.total.filter(|&t| t != desc.size) {
            return Err(fail(format!("serves a blob of {t} bytes, the descriptor says {}", desc.size)));
        }
        let got = body.reader.take(end - at).read_to_end(buf);
        if buf.len() as u64 == len {
            return Ok(());
        }
        let reason = match got {
            Ok(_) => "connection closed early".to_string(),
            Err(e) => e.to_string(),
        };
        if buf.len() - mark >= PROGRESS as usize {
            retries = 0;
            last_progress = Instant::now();
            mark = buf.len();
        }
        let delay = backoff(retries);
        if retries >= opts.max_retries || last_progress.elapsed() + delay > opts.max_retry_time {
            return Err(fail(format!(
                "{reason} at byte {} of bytes {offset}+{len} (after {retries} retries)",
                offset + buf.len() as u64
            )));
        }
        observer.retry(conn.host(), &reason);
        std::thread::sleep(delay);
        retries += 1;
        observer.resumed(conn.host(), offset + buf.len() as u64);
    }
}

/// The first `left` bytes of a response body, read on to its end once they are in (one
/// more read, which takes no bytes when the server sent what it said): the client then
/// puts the connection back in its pool, where a body left short would be dropped, and
/// each range read of a lazy layer would pay a new connection (a TLS handshake).
struct ToTheEnd<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ToTheEnd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        if self.left == 0 {
            // Best effort: a body that goes on is not read (the connection is dropped).
            let _ = self.inner.read(&mut [0u8; 1]);
        }
        Ok(n)
    }
}

/// Bytes held back from the consumer until the blob's digest is checked (see the module
/// docs). Memory per open blob: about twice this.
pub(crate) const HOLD: usize = 1 << 20;
/// Largest read from the network at a time.
const CHUNK: usize = 128 << 10;

/// Bytes a connection must deliver before its breaks stop counting against the retry
/// budget: progress, as opposed to a trickle.
const PROGRESS: u64 = 1 << 20;

/// The reader `open_blob` returns: see the module docs.
pub(crate) struct BlobReader {
    inner: Arc<Inner>,
    conns: Vec<Arc<Conn>>,
    repository: String,
    desc: Descriptor,
    observer: Arc<dyn FetchObserver>,
    /// The host in use.
    idx: usize,
    body: Option<Box<dyn Read + Send>>,
    /// Bytes received from the network (and in order): handed out, or held.
    received: u64,
    /// Bytes handed to the consumer.
    handed: u64,
    /// `hold[hold_start..]`: received, not yet handed out.
    hold: Vec<u8>,
    hold_start: usize,
    /// The hash of the bytes handed out.
    hasher: Hasher,
    /// The digest checked out: the rest of `hold` may go.
    verified: bool,
    /// Hosts that served bytes of this stream.
    served_by: Vec<String>,
    /// After wrong bytes: the hosts that served them (and so what was handed out).
    liars: Option<Vec<String>>,
    /// Hosts given up on, and why.
    failures: Vec<(String, Error)>,
    /// Retries since the last real progress ([`PROGRESS`] bytes, or a new host), when
    /// that was, and `received` then. A server that trickles a few bytes per connection
    /// and stalls must not reset the budget for ever.
    retries: u32,
    last_progress: Instant,
    progress_mark: u64,
    /// The next open resumes a broken download.
    resuming: bool,
    /// Failed for good: every later read fails the same way (never a clean EOF).
    failed: Option<String>,
}

impl BlobReader {
    /// A reader of `desc` from `repository`, over `conns` in order; the first host is
    /// opened at once so that a missing blob fails here rather than mid-read.
    pub(crate) fn open(
        inner: Arc<Inner>,
        conns: Vec<Arc<Conn>>,
        repository: String,
        desc: Descriptor,
        observer: Arc<dyn FetchObserver>,
    ) -> Result<BlobReader> {
        let mut r = BlobReader {
            inner,
            conns,
            repository,
            desc,
            observer,
            idx: 0,
            body: None,
            received: 0,
            handed: 0,
            hold: Vec::new(),
            hold_start: 0,
            hasher: Hasher::new(),
            verified: false,
            served_by: Vec::new(),
            liars: None,
            failures: Vec::new(),
            retries: 0,
            last_progress: Instant::now(),
            progress_mark: 0,
            resuming: false,
            failed: None,
        };
        r.connect()?;
        Ok(r)
    }

    fn host(&self) -> &str {
        self.conns.get(self.idx).map_or("", |c| c.host())
    }

    fn op(&self, conn: &Conn) -> String {
        format!("GET {}/{}/blobs/{}", conn.entry.path, self.repository, self.desc.digest)
    }

    /// Open the body at `received`, on the current host or the next ones.
    fn connect(&mut self) -> Result<()> {
        while self.idx < self.conns.len() {
            let conn = Arc::clone(&self.conns[self.idx]);
            let last = self.idx + 1 == self.conns.len();
            let opened = get_range(
                &self.inner,
                &conn,
                &self.repository,
                &self.desc.digest,
                self.received,
                None,
                self.observer.as_ref(),
                last,
            );
            let want = self.desc.size - self.received;
            let outcome = match opened {
                Ok(body) => match body.remaining {
                    Some(n) if n != want => Err(Error::Registry {
                        host: conn.host().to_string(),
                        op: self.op(&conn),
                        status: None,
                        reason: format!(
                            "serves {n} bytes from offset {}, the descriptor says {want} (size {})",
                            self.received, self.desc.size
                        ),
                    }),
                    _ => Ok(body.reader),
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok(reader) => {
                    if self.resuming {
                        self.observer.resumed(conn.host(), self.received);
                        self.resuming = false;
                    }
                    self.body = Some(reader);
                    if !self.served_by.iter().any(|h| h == conn.host()) {
                        self.served_by.push(conn.host().to_string());
                    }
                    return Ok(());
                }
                Err(e) => self.give_up_on_host(e),
            }
        }
        Err(super::combine(
            std::mem::take(&mut self.failures),
            format!("blob {} of {}", self.desc.digest, self.repository),
        ))
    }

    /// Record the current host's failure and move to the next one.
    fn give_up_on_host(&mut self, e: Error) {
        let host = self.host().to_string();
        if self.idx + 1 < self.conns.len() {
            self.observer.fallback(&host, &e.to_string());
            self.resuming = self.received > 0;
        }
        self.failures.push((host, e));
        self.idx += 1;
        self.retries = 0;
        self.last_progress = Instant::now();
        self.progress_mark = self.received;
    }

    /// The body broke (an error, a stall, an early end): resume on this host after a
    /// backoff, or move on when its retry budget is spent.
    fn broken(&mut self, reason: String) {
        self.body = None;
        self.resuming = true;
        let opts = &self.inner.client.opts;
        let delay = backoff(self.retries);
        if self.retries >= opts.max_retries || self.last_progress.elapsed() + delay > opts.max_retry_time {
            let conn = Arc::clone(&self.conns[self.idx]);
            let e = Error::Registry {
                host: conn.host().to_string(),
                op: self.op(&conn),
                status: None,
                reason: format!(
                    "{reason} at byte {} of {} (after {} retries)",
                    self.received, self.desc.size, self.retries
                ),
            };
            self.give_up_on_host(e);
            return;
        }
        self.observer.retry(self.host(), &reason);
        std::thread::sleep(delay);
        self.retries += 1;
    }

    /// All bytes are in: the digest of what was handed out plus what is held.
    fn digest_of_all(&self) -> Digest {
        let mut h = self.hasher.clone();
        h.update(&self.hold[self.hold_start..]);
        h.finish()
    }

    /// The stream hashed to `found`: demote the hosts that served it, and continue from
    /// the bytes handed out on a host that has not served it yet; or fail.
    fn wrong_bytes(&mut self, found: Digest) -> Result<()> {
        if let Some(liars) = &self.liars {
            // Wrong again with a new tail: the bytes handed out before were wrong, and they
            // came from the hosts already demoted. The new host is not blamed.
            return Err(Error::ContentMismatch {
                host: liars.join(", "),
                what: format!("blob of {}", self.repository),
                expected: self.desc.digest,
                found,
            });
        }
        {
            let mut bad = self.inner.bad.lock();
            for h in &self.served_by {
                bad.insert((self.desc.digest, h.clone()));
            }
        }
        self.liars = Some(self.served_by.clone());
        let next =
            (self.idx + 1..self.conns.len()).find(|&i| !self.served_by.iter().any(|h| h == self.conns[i].host()));
        if next.is_some() {
            for h in &self.served_by {
                self.observer.fallback(h, "blob digest mismatch");
            }
        }
        let mismatch = Error::ContentMismatch {
            host: self.served_by.join(", "),
            what: format!("blob of {}", self.repository),
            expected: self.desc.digest,
            found,
        };
        let Some(next) = next else { return Err(mismatch) };
        // Only the held bytes are withdrawn; what was handed out stays, and the digest
        // check at the end decides again.
        self.failures.push((self.host().to_string(), mismatch));
        self.idx = next;
        self.hold.clear();
        self.hold_start = 0;
        self.received = self.handed;
        self.body = None;
        self.resuming = self.received > 0;
        self.retries = 0;
        self.last_progress = Instant::now();
        self.progress_mark = self.received;
        Ok(())
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(io::Error::other(format!("{why} (reading on after the failure)")));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_inner(buf).map_err(|e| {
            self.failed = Some(e.to_string());
            self.body = None;
            self.hold = Vec::new();
            io::Error::other(e)
        })
    }
}

impl Drop for BlobReader {
    /// A stream dropped after bytes were handed out but before its end, without an error
    /// of ours: its consumer gave up, almost always because the bytes made no sense (a
    /// decompressor or tar error on wrong bytes early in a large blob, which the digest
    /// would only have shown at the end). With other hosts to turn to, the hosts that
    /// served it go last for this digest, so the consumer's retry (or the next pull) starts
    /// elsewhere; the next stream is verified as always. Nothing is read or sent here.
    fn drop(&mut self) {
        let abandoned = !self.verified && self.failed.is_none() && self.handed > 0;
        if abandoned && self.conns.len() > 1 {
            let mut bad = self.inner.bad.lock();
            for h in &self.served_by {
                bad.insert((self.desc.digest, h.clone()));
            }
        }
    }
}

impl BlobReader {
    fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            // Hand out what may go: all of it once verified, else what lies beyond the window.
            let held = self.hold.len() - self.hold_start;
            let free = if self.verified { held } else { held.saturating_sub(HOLD) };
            if free > 0 {
                let n = free.min(buf.len());
                let s = self.hold_start;
                buf[..n].copy_from_slice(&self.hold[s..s + n]);
                if !self.verified {
                    self.hasher.update(&buf[..n]);
                }
                self.hold_start += n;
                self.handed += n as u64;
                if self.hold_start == self.hold.len() {
                    self.hold.clear();
                    self.hold_start = 0;
                } else if self.hold_start >= HOLD {
                    self.hold.drain(..self.hold_start);
                    self.hold_start = 0;
                }
                return Ok(n);
            }
            if self.verified {
                return Ok(0);
            }
            if self.received == self.desc.size {
                let found = self.digest_of_all();
                if found == self.desc.digest {
                    self.verified = true;
                    self.body = None;
                    continue;
                }
                self.wrong_bytes(found)?;
                continue;
            }
            if self.body.is_none() {
                self.connect()?;
            }
            let want = (self.desc.size - self.received).min(CHUNK as u64) as usize;
            let len = self.hold.len();
            self.hold.resize(len + want, 0);
            let body = self.body.as_mut().expect("connected");
            let got = body.read(&mut self.hold[len..]);
            self.hold.truncate(len + *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => self.broken("connection closed early".to_string()),
                Ok(n) => {
                    self.received += n as u64;
                    if self.received - self.progress_mark >= PROGRESS {
                        self.retries = 0;
                        self.last_progress = Instant::now();
                        self.progress_mark = self.received;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.broken(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {

    fn multipart(boundary: &str, parts: &[(u64, u64, &[u8])], size: u64) -> Vec<u8> {
        let mut b = Vec::new();
        for (a, z, data) in parts {
            b.extend_from_slice(
                format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{z}/{size}\r\n\r\n"
                )
                .as_bytes(),
            );
            b.extend_from_slice(data);
        }
        b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        b[2..].to_vec() // Go's writer: no CRLF before the first delimiter
    }

    #[test]
    fn byteranges_are_split_only_when_they_are_exactly_the_ranges_asked_for() {
        let blob: Vec<u8> = (0..200u8).collect();
        let ranges = [(3u64, 4u64), (50, 1), (190, 10)];
        let part = |&(o, l): &(u64, u64)| (o, o + l - 1, &blob[o as usize..(o + l) as usize]);
        let parts: Vec<_> = ranges.iter().map(part).collect();
        let body = multipart("XyZ", &parts, 200);
        let got = split_byteranges(&body, "XyZ", &ranges, 200).unwrap();
        assert_eq!(got, vec![blob[3..7].to_vec(), blob[50..51].to_vec(), blob[190..200].to_vec()]);
        // With a preamble; a part that holds the delimiter's bytes is still split by length.
        let mut pre = b"ignored preamble\r\n".to_vec();
        pre.extend_from_slice(&body);
        assert!(split_byteranges(&pre, "XyZ", &ranges, 200).is_some());
        let tricky = b"\r\n--XyZ\r\n";
        let body2 = multipart("XyZ", &[(0, 8, tricky.as_slice())], 200);
        assert_eq!(split_byteranges(&body2, "XyZ", &[(0, 9)], 200).unwrap(), vec![tricky.to_vec()]);
        // Not what was asked: another order, merged ranges, another size, a short part,
        // no closing delimiter, another boundary.
        let swapped = multipart("XyZ", &[parts[1], parts[0], parts[2]], 200);
        assert!(split_byteranges(&swapped, "XyZ", &ranges, 200).is_none());
        let merged = multipart("XyZ", &[(3, 50, &blob[3..51]), parts[2]], 200);
        assert!(split_byteranges(&merged, "XyZ", &ranges, 200).is_none());
        assert!(split_byteranges(&multipart("XyZ", &parts, 201), "XyZ", &ranges, 200).is_none());
        assert!(split_byteranges(&body[..body.len() - 30], "XyZ", &ranges, 200).is_none());
        assert!(split_byteranges(&body[..body.len() - 4], "XyZ", &ranges, 200).is_none());
        assert!(split_byteranges(&body, "Other", &ranges, 200).is_none());
        // Fewer parts than ranges.
        assert!(split_byteranges(&multipart("XyZ", &parts[..2], 200), "XyZ", &ranges, 200).is_none());
    }

    #[test]
    fn the_boundary_comes_from_a_multipart_byteranges_type_only() {
        assert_eq!(multipart_boundary("multipart/byteranges; boundary=abc").as_deref(), Some("abc"));
        assert_eq!(multipart_boundary("Multipart/ByteRanges;boundary=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(multipart_boundary("multipart/byteranges"), None);
        assert_eq!(multipart_boundary("multipart/byteranges; boundary="), None);
        assert_eq!(multipart_boundary("application/octet-stream; boundary=abc"), None);
    }

    use std::sync::Mutex;

    use super::*;
    use crate::fetch::registry::hosts::default_host;
    use crate::fetch::registry::testutil::{Events, header_of, range_start, response, server};
    use crate::fetch::registry::{Registry, RegistryOptions};

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, 199, Some(200))));
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, 0, None)));
        assert_eq!(parse_content_range("bytes */200"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
        assert_eq!(parse_content_range("bytes 5-4/10"), None);
        assert_eq!(parse_content_range("bytes 5-10/10"), None);
        assert_eq!(parse_content_range("bytes 5-9"), None);
    }

    fn blob() -> (Vec<u8>, Descriptor) {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let desc = Descriptor {
            digest: Digest::of(&data),
            size: data.len() as u64,
            media_type: String::new(),
            annotations: Default::default(),
        };
        (data, desc)
    }

    fn reader(hosts: &[&str], desc: &Descriptor, events: Arc<Events>) -> Result<(Registry, BlobReader)> {
        let opts = RegistryOptions::default()
            .with_auth_files(false)
            .with_max_retries(3)
            .with_read_timeout(std::time::Duration::from_secs(5));
        let registry = Registry::new(opts.clone())?;
        let conns = hosts.iter().map(|h| Arc::new(Conn::new(default_host(h, false), &opts).unwrap())).collect();
        let r = BlobReader::open(Arc::clone(&registry.inner), conns, "r".into(), desc.clone(), events)?;
        Ok((registry, r))
    }

    #[test]
    fn a_broken_download_resumes_with_range_or_by_skipping() {
        let (data, desc) = blob();
        for honour_range in [true, false] {
            let body = data.clone();
            // 1st connection: cut at 70 000 bytes; then ranges (or the whole blob).
            let (host, seen) = server(move |n, head| {
                let from = if honour_range { range_start(head).unwrap_or(0) } else { 0 };
                let rest = &body[from..];
                let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
                let headers: Vec<(&str, String)> = if from > 0 {
                    vec![("Content-Range", format!("bytes {from}-{}/{}", body.len() - 1, body.len()))]
                } else {
                    vec![]
                };
                let sent = if n == 0 { &rest[..70_000] } else { rest };
                response(status, &headers, sent, rest.len())
            });
            let events = Arc::new(Events::default());
            let (_reg, mut r) = reader(&[&host], &desc, Arc::clone(&events)).unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            assert!(got == data, "honour_range={honour_range}: {} bytes", got.len());
            let heads = seen.lock().unwrap().clone();
            assert_eq!(heads.len(), 2, "{heads:?}");
            assert_eq!(range_start(&heads[1]), Some(70_000));
            let ev = events.0.lock().unwrap().clone();
            assert!(ev.iter().any(|e| e == &format!("resumed {host} 70000")), "{ev:?}");
        }
    }

    /// A blob of `len` bytes served correctly by one server (with Range) and with byte
    /// `flip` flipped by another.
    /// What the good server saw.
    type Log = Arc<Mutex<Vec<String>>>;

    fn liar_and_good(len: usize, flip: usize) -> (Vec<u8>, Descriptor, String, String, Log) {
        let data: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let desc = Descriptor {
            digest: Digest::of(&data),
            size: data.len() as u64,
            media_type: String::new(),
            annotations: Default::default(),
        };
        let mut bad = data.clone();
        bad[flip] ^= 0xff;
        let (liar, _) = server(move |_, _| response("200 OK", &[], &bad, bad.len()));
        let body = data.clone();
        let (good, good_log) = server(move |_, head| {
            let from = range_start(head).unwrap_or(0);
            let headers: Vec<(&str, String)> = if from > 0 {
                vec![("Content-Range", format!("bytes {from}-{}/{}", body.len() - 1, body.len()))]
            } else {
                vec![]
            };
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            response(status, &headers, &body[from..], body.len() - from)
        });
        (data, desc, liar, good, good_log)
    }

    fn read_all(r: &mut BlobReader) -> (Vec<u8>, Option<io::Error>) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return (got, None),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Some(e)),
            }
        }
    }

    #[test]
    fn wrong_bytes_in_the_held_back_tail_are_healed_from_the_next_host() {
        // A small blob (all of it held back) with a byte flipped anywhere, and a large one
        // with a byte flipped in its last MiB.
        for (len, flip) in [(200_000, 10), (200_000, 199_999), (3 * HOLD, 3 * HOLD - 3), (3 * HOLD, 2 * HOLD + 5)] {
            let (data, desc, liar, good, good_log) = liar_and_good(len, flip);
            let events = Arc::new(Events::default());
            let (reg, mut r) = reader(&[&liar, &good], &desc, Arc::clone(&events)).unwrap();
            let (got, err) = read_all(&mut r);
            assert!(err.is_none(), "{len}/{flip}: {err:?}");
            assert!(got == data, "{len}/{flip}: wrong bytes handed out");
            // The good host was asked for what had not been handed out, only.
            let heads = good_log.lock().unwrap().clone();
            assert_eq!(heads.len(), 1, "{heads:?}");
            let expected_from = if len <= HOLD { None } else { Some(len - HOLD - CHUNK..=len - HOLD) };
            match (range_start(&heads[0]), expected_from) {
                (None, None) => {}
                (Some(from), Some(range)) => assert!(range.contains(&from), "{len}/{flip}: from {from}"),
                other => panic!("{len}/{flip}: {other:?}"),
            }
            assert!(events.0.lock().unwrap().iter().any(|e| e == &format!("fallback {liar} blob digest mismatch")));
            assert!(reg.inner.bad.lock().contains(&(desc.digest, liar.clone())));
        }
    }

    #[test]
    fn wrong_bytes_already_handed_out_fail_typed_and_reading_on_fails() {
        // Flipped early in a large blob: handed out before the check; the next host's tail
        // cannot make it right.
        let (data, desc, liar, good, _) = liar_and_good(3 * HOLD, 100);
        let events = Arc::new(Events::default());
        let (reg, mut r) = reader(&[&liar, &good], &desc, Arc::clone(&events)).unwrap();
        let (got, err) = read_all(&mut r);
        let err = err.expect("an error");
        assert!(got.len() < data.len() - HOLD + CHUNK, "{}", got.len());
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>()).expect("a crate error inside");
        match inner {
            Error::ContentMismatch { host, expected, .. } => {
                // The host whose bytes were handed out, not the one asked for the tail.
                assert_eq!(host, &liar);
                assert_eq!(expected, &desc.digest);
            }
            e => panic!("{e}"),
        }
        assert!(reg.inner.bad.lock().contains(&(desc.digest, liar.clone())));
        assert!(!reg.inner.bad.lock().contains(&(desc.digest, good.clone())));
        let mut buf = [0u8; 10];
        assert!(r.read(&mut buf).is_err());
        // The only host lying about a small blob: nothing at all is handed out.
        let (_, desc, liar, _, _) = liar_and_good(5000, 4999);
        let (_reg, mut r) = reader(&[&liar], &desc, Arc::new(Events::default())).unwrap();
        let (got, err) = read_all(&mut r);
        assert!(got.is_empty() && err.is_some());
    }

    #[test]
    fn a_stream_abandoned_midway_demotes_its_host() {
        let (_, desc, liar, good, _) = liar_and_good(3 * HOLD, 100);
        let (reg, mut r) = reader(&[&liar, &good], &desc, Arc::new(Events::default())).unwrap();
        let mut buf = vec![0u8; 4096];
        while r.read(&mut buf).unwrap() > 0 && r.handed == 0 {}
        drop(r);
        assert!(reg.inner.bad.lock().contains(&(desc.digest, liar.clone())));
        // Dropped before anything was handed out, or with one host only: no demotion.
        let (reg, r) = reader(&[&liar, &good], &desc, Arc::new(Events::default())).unwrap();
        drop(r);
        assert!(reg.inner.bad.lock().is_empty());
        let (reg, mut r) = reader(&[&good], &desc, Arc::new(Events::default())).unwrap();
        while r.read(&mut buf).unwrap() > 0 && r.handed == 0 {}
        drop(r);
        assert!(reg.inner.bad.lock().is_empty());
    }

    #[test]
    fn a_size_contradicting_the_descriptor_moves_on_before_reading() {
        let (data, desc) = blob();
        let short = data[..1000].to_vec();
        let (liar, liar_seen) = server(move |_, _| response("200 OK", &[], &short, short.len()));
        let body = data.clone();
        let (good, _) = server(move |_, _| response("200 OK", &[], &body, body.len()));
        let events = Arc::new(Events::default());
        let (_reg, mut r) = reader(&[&liar, &good], &desc, Arc::clone(&events)).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert!(got == data);
        assert_eq!(liar_seen.lock().unwrap().len(), 1);
        let ev = events.0.lock().unwrap().clone();
        assert!(
            ev.iter().any(|e| e.starts_with(&format!("fallback {liar}")) && e.contains("serves 1000 bytes")),
            "{ev:?}"
        );
    }

    /// A server of `data` answering ranges as `mode` says: "honour", "ignore" (200, the
    /// whole blob), "wrong" (206 with another Content-Range), "cut" (the first answer cut
    /// after 1000 bytes, then honoured).
    fn ranged(data: Vec<u8>, mode: &'static str) -> (String, Log) {
        server(move |n, head| {
            let range = header_of(head, "range").and_then(|r| {
                let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
                Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
            });
            let total = data.len();
            match (mode, range) {
                ("ignore", _) | (_, None) => response("200 OK", &[], &data, total),
                ("wrong", Some((a, b))) => {
                    let cr = format!("bytes {}-{}/{total}", a + 1, b + 1);
                    response("206 Partial Content", &[("Content-Range", cr)], &data[a + 1..b + 2], b - a + 1)
                }
                (_, Some((a, b))) => {
                    let cr = format!("bytes {a}-{b}/{total}");
                    let body = &data[a..=b];
                    let sent = if mode == "cut" && n == 0 { &body[..1000] } else { body };
                    response("206 Partial Content", &[("Content-Range", cr)], sent, body.len())
                }
            }
        })
    }

    fn conns(hosts: &[&str]) -> (Registry, Vec<Arc<Conn>>) {
        let opts = RegistryOptions::default()
            .with_auth_files(false)
            .with_max_retries(3)
            .with_read_timeout(std::time::Duration::from_secs(5));
        let registry = Registry::new(opts.clone()).unwrap();
        let conns = hosts.iter().map(|h| Arc::new(Conn::new(default_host(h, false), &opts).unwrap())).collect();
        (registry, conns)
    }

    #[test]
    fn range_reads_ask_for_the_range_and_get_exactly_it() {
        let (data, desc) = blob();
        for mode in ["honour", "ignore"] {
            let (host, log) = ranged(data.clone(), mode);
            let (reg, conns) = conns(&[&host]);
            let events = Events::default();
            for (offset, len) in [(0u64, 10u64), (70_000, 5000), (199_990, 10), (0, 200_000)] {
                let got = read_range(&reg.inner, &conns, "r", &desc, offset, len, &events).unwrap();
                assert!(got == data[offset as usize..(offset + len) as usize], "{mode}: {offset}+{len}");
            }
            let heads = log.lock().unwrap().clone();
            assert_eq!(header_of(&heads[0], "range").as_deref(), Some("bytes=0-9"), "{mode}");
            assert_eq!(heads.len(), 4, "{mode}: {heads:?}");
        }
        // A cut body is resumed on the same host from where it broke.
        let (host, log) = ranged(data.clone(), "cut");
        let (reg, conns) = conns(&[&host]);
        let events = Events::default();
        let got = read_range(&reg.inner, &conns, "r", &desc, 50_000, 20_000, &events).unwrap();
        assert!(got == data[50_000..70_000]);
        let heads = log.lock().unwrap().clone();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert_eq!(header_of(&heads[1], "range").as_deref(), Some("bytes=51000-69999"));
        assert!(events.0.lock().unwrap().iter().any(|e| e == &format!("resumed {host} 51000")));
    }

    #[test]
    fn a_wrong_content_range_moves_to_the_next_host() {
        let (data, desc) = blob();
        let (liar, _) = ranged(data.clone(), "wrong");
        let (good, _) = ranged(data.clone(), "honour");
        let (reg, both) = conns(&[&liar, &good]);
        let events = Events::default();
        let got = read_range(&reg.inner, &both, "r", &desc, 1000, 3000, &events).unwrap();
        assert!(got == data[1000..4000]);
        let ev = events.0.lock().unwrap().clone();
        assert!(ev.iter().any(|e| e.starts_with(&format!("fallback {liar}")) && e.contains("Content-Range")), "{ev:?}");
        // Alone, the liar is an error naming it.
        let (reg, only) = conns(&[&liar]);
        match read_range(&reg.inner, &only, "r", &desc, 1000, 3000, &Events::default()) {
            Err(e @ Error::Registry { .. }) => assert!(e.to_string().contains(&liar), "{e}"),
            r => panic!("{r:?}"),
        }
        // A server whose blob has another size is left too.
        let (short, _) = ranged(data[..150_000].to_vec(), "honour");
        let (reg, only) = conns(&[&short]);
        match read_range(&reg.inner, &only, "r", &desc, 0, 10, &Events::default()) {
            Err(Error::Registry { reason, .. }) => assert!(reason.contains("150000 bytes"), "{reason}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn every_host_failing_is_one_error_naming_each() {
        let (_, desc) = blob();
        let (a, _) = server(|_, _| response("404 Not Found", &[], b"", 0));
        let (b, _) = server(|_, _| response("400 Bad Request", &[], b"no", 2));
        match reader(&[&a, &b], &desc, Arc::new(Events::default())) {
            Err(Error::AllHostsFailed { failures, .. }) => {
                assert_eq!(failures.len(), 2);
                assert_eq!(failures[0].0, a);
                assert!(matches!(failures[0].1, Error::NotFound { .. }));
                assert!(matches!(failures[1].1, Error::Registry { status: Some(400), .. }), "{}", failures[1].1);
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened"),
        }
    }
}
