//! Blob downloads: [`get_range`] (the bytes of a blob from an offset, on one host: the
//! building block for resumes here and for range reads elsewhere) and [`BlobReader`], the
//! reader `open_blob` hands out, which resumes, falls over to the next host and verifies.
//!
//! # What the reader guarantees
//! The bytes it returns are exactly the blob's: never more than the descriptor's size,
//! resumed at the exact offset after a break (with `Range: bytes=N-`, or by skipping `N`
//! bytes when a server ignores `Range` and answers 200), and hashed as they pass. When
//! the last byte arrives the digest is checked *before* that last chunk is handed out:
//! on a mismatch the read fails with [`Error::ContentMismatch`] naming the host(s) that
//! served the bytes, and those hosts are tried last for this digest from then on.
//!
//! Bytes already handed to the consumer cannot be taken back, so a mismatch cannot be
//! healed inside one read of the stream: the consumer (the cache's extraction, which
//! verifies the digest too and keeps nothing of a failed layer) fails that attempt, and
//! its next `open_blob` for the digest starts at the next host. A host that announces a
//! different size (`Content-Length`) is left before any byte is read from it.

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
            return Ok(RangeBody { reader: Box::new(io::empty()), remaining: Some(0) });
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
        let start = parse_content_range_start(&range);
        if start != Some(offset) {
            return Err(fail(format!("asked for bytes from {offset}, got Content-Range {range:?}")));
        }
        let reader = resp.into_body().into_reader();
        let reader: Box<dyn Read + Send> = match end {
            Some(e) => Box::new(reader.take(e - offset)),
            None => Box::new(reader),
        };
        return Ok(RangeBody { reader, remaining: length });
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
    Ok(RangeBody { reader, remaining })
}

/// `bytes START-END/TOTAL` → START.
fn parse_content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

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
    /// Bytes handed out so far.
    offset: u64,
    hasher: Option<Hasher>,
    /// Hosts that served bytes of this stream.
    served_by: Vec<String>,
    /// Hosts given up on, and why.
    failures: Vec<(String, Error)>,
    /// Retries since the last byte arrived, and when that was.
    retries: u32,
    last_progress: Instant,
    /// The next open resumes a broken download.
    resuming: bool,
    /// Verified and finished, or failed for good.
    done: bool,
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
            offset: 0,
            hasher: Some(Hasher::new()),
            served_by: Vec::new(),
            failures: Vec::new(),
            retries: 0,
            last_progress: Instant::now(),
            resuming: false,
            done: false,
        };
        r.connect()?;
        Ok(r)
    }

    fn host(&self) -> &str {
        self.conns.get(self.idx).map_or("", |c| c.host())
    }

    /// Open the body at the current offset, on the current host or the next ones.
    fn connect(&mut self) -> Result<()> {
        while self.idx < self.conns.len() {
            let conn = Arc::clone(&self.conns[self.idx]);
            let last = self.idx + 1 == self.conns.len();
            let opened = get_range(
                &self.inner,
                &conn,
                &self.repository,
                &self.desc.digest,
                self.offset,
                None,
                self.observer.as_ref(),
                last,
            );
            let want = self.desc.size - self.offset;
            let outcome = match opened {
                Ok(body) => match body.remaining {
                    Some(n) if n != want => Err(Error::Registry {
                        host: conn.host().to_string(),
                        op: format!("GET {}/{}/blobs/{}", conn.entry.path, self.repository, self.desc.digest),
                        status: None,
                        reason: format!(
                            "serves {n} bytes from offset {}, the descriptor says {want} (size {})",
                            self.offset, self.desc.size
                        ),
                    }),
                    _ => Ok(body.reader),
                },
                Err(e) => Err(e),
            };
            match outcome {
                Ok(reader) => {
                    if self.resuming {
                        self.observer.resumed(conn.host(), self.offset);
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
        self.done = true;
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
            self.resuming = self.offset > 0;
        }
        self.failures.push((host, e));
        self.idx += 1;
        self.retries = 0;
        self.last_progress = Instant::now();
    }

    /// The body broke (an error, a stall, an early end): resume on this host after a
    /// backoff, or move on when its retry budget is spent.
    fn broken(&mut self, reason: String) {
        self.body = None;
        self.resuming = true;
        let opts = &self.inner.client.opts;
        let delay = backoff(self.retries);
        if self.retries >= opts.max_retries || self.last_progress.elapsed() + delay > opts.max_retry_time {
            let conn = &self.conns[self.idx];
            let e = Error::Registry {
                host: conn.host().to_string(),
                op: format!("GET {}/{}/blobs/{}", conn.entry.path, self.repository, self.desc.digest),
                status: None,
                reason: format!(
                    "{reason} at byte {} of {} (after {} retries)",
                    self.offset, self.desc.size, self.retries
                ),
            };
            self.give_up_on_host(e);
            return;
        }
        self.observer.retry(self.host(), &reason);
        std::thread::sleep(delay);
        self.retries += 1;
    }

    /// All bytes are in: check the digest.
    fn verify(&mut self) -> Result<()> {
        let found = self.hasher.take().map(Hasher::finish).unwrap_or_else(|| Digest::of(b""));
        if found == self.desc.digest {
            return Ok(());
        }
        let mut bad = self.inner.bad.lock();
        for h in &self.served_by {
            bad.insert((self.desc.digest, h.clone()));
        }
        drop(bad);
        let host = self.served_by.join(", ");
        for h in &self.served_by {
            self.observer.fallback(h, "blob digest mismatch");
        }
        Err(Error::ContentMismatch {
            host,
            what: format!("blob of {}", self.repository),
            expected: self.desc.digest,
            found,
        })
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        loop {
            let want = (self.desc.size - self.offset).min(buf.len() as u64) as usize;
            if want == 0 {
                // An empty blob: nothing to read, only to verify.
                self.done = true;
                self.verify().map_err(io::Error::other)?;
                return Ok(0);
            }
            if self.body.is_none() {
                self.connect().map_err(io::Error::other)?;
            }
            let body = self.body.as_mut().expect("connected");
            match body.read(&mut buf[..want]) {
                Ok(0) => self.broken("connection closed early".to_string()),
                Ok(n) => {
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&buf[..n]);
                    }
                    self.offset += n as u64;
                    self.retries = 0;
                    self.last_progress = Instant::now();
                    if self.offset == self.desc.size {
                        self.done = true;
                        self.body = None;
                        // Checked before the last chunk is handed out.
                        self.verify().map_err(io::Error::other)?;
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.broken(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(parse_content_range_start("bytes 0-0/*"), Some(0));
        assert_eq!(parse_content_range_start("bytes */200"), None);
        assert_eq!(parse_content_range_start("items 1-2/3"), None);
    }
}
