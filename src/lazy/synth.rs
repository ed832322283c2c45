//! A layer's tar stream rebuilt from its verified [`Toc`], for the hardened extractor.
//!
//! A lazy layer is never extracted from its blob: its metadata comes from the TOC and
//! its file data from verified chunks. Rather than writing trees a second way, the TOC
//! is turned back into a tar stream and given to the same extractor every other layer
//! goes through ([`unpack_cache_entry`](crate::unpack::unpack_cache_entry)), so path
//! resolution by descriptor, whiteout conversion, `*.overlay.*` xattr escaping, hard
//! links, implicit parents and the order metadata is set in are the extractor's, not
//! re-done here.
//!
//! Each regular file is one of two things ([`FileData`]): a placeholder (a PAX sparse
//! 1.0 entry of the file's size with no data segment, which the extractor makes a
//! sparse file of that size: the skeleton's stand-in for data served by the data-only
//! lower) or its data (a small file's verified bytes, taken from the pack of small
//! files as soon as they are fetched).

use std::io::{self, Read, Write};
use std::sync::mpsc;

use super::toc::{Toc, TocEntryKind};
use crate::error::{Error, Result};
use crate::workspace::tar_writer::{EntryHeader, EntryKind, TarWriter, sparse_map};

/// Where a regular file's data comes from in a rebuilt stream.
pub(crate) enum FileData {
    /// A sparse stand-in of the file's size, no data.
    Placeholder,
    /// The whole content (its length must be the entry's size).
    Bytes(Vec<u8>),
    /// The content cannot be had: the stream fails with this.
    Failed(String),
}

/// Bytes handed from the writer thread to the reader at a time.
const PIECE: usize = 1 << 20;

/// A [`Read`] of the tar stream of `toc`, written on a thread of its own; `data(i)`
/// says where the data of entry `i` (a non-empty regular file) comes from.
///
/// Reading returns the writer's error (a data file missing or of the wrong size) as an
/// `io::Error`. Dropping the reader early stops the writer.
pub(crate) fn tar_stream(
    toc: std::sync::Arc<Toc>,
    data: impl Fn(usize) -> FileData + Send + 'static,
) -> Result<impl Read + Send> {
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let writer = std::thread::Builder::new()
        .name("lazy-tar".into())
        .spawn(move || {
            let out = Pieces { tx: tx.clone(), buf: Vec::with_capacity(PIECE) };
            if let Err(e) = write_tar(&toc, out, &data) {
                let _ = tx.send(Err(e));
            }
        })
        .map_err(|e| Error::Read { what: "rebuilt layer stream (spawn)", source: e })?;
    drop(writer); // detached: it ends when the stream is written or the reader is gone
    Ok(PieceReader { rx, cur: Vec::new(), at: 0, done: false })
}

fn write_tar(toc: &Toc, out: Pieces, data: &dyn Fn(usize) -> FileData) -> io::Result<()> {
    let mut w = TarWriter::new(out);
    for (i, e) in toc.entries.iter().enumerate() {
        let path = if e.path.is_empty() { b".".to_vec() } else { e.path.as_bytes().to_vec() };
        let mut h = EntryHeader {
            path,
            kind: EntryKind::Dir,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            mtime: (e.mtime, e.mtime_nsec.min(999_999_999)),
            xattrs: e.xattrs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.clone())).collect(),
        };
        match &e.kind {
            TocEntryKind::Directory => w.append(&h, None)?,
            TocEntryKind::Symlink { target } => {
                h.kind = EntryKind::Symlink { target: target.as_bytes().to_vec() };
                w.append(&h, None)?;
            }
            TocEntryKind::Hardlink { target } => {
                h.kind = EntryKind::Hardlink { target: target.as_bytes().to_vec() };
                w.append(&h, None)?;
            }
            TocEntryKind::CharDevice { major, minor } => {
                h.kind = EntryKind::Char { major: *major, minor: *minor };
                w.append(&h, None)?;
            }
            TocEntryKind::BlockDevice { major, minor } => {
                h.kind = EntryKind::Block { major: *major, minor: *minor };
                w.append(&h, None)?;
            }
            TocEntryKind::Fifo => {
                h.kind = EntryKind::Fifo;
                w.append(&h, None)?;
            }
            TocEntryKind::File { size: 0, .. } => {
                h.kind = EntryKind::File { size: 0 };
                w.append(&h, Some(&mut io::empty()))?;
            }
            TocEntryKind::File { size, .. } => match data(i) {
                FileData::Placeholder => {
                    let map = sparse_map(&[]);
                    h.kind = EntryKind::Sparse { size: map.len() as u64, real_size: *size };
                    w.append(&h, Some(&mut &map[..]))?;
                }
                FileData::Bytes(bytes) => {
                    if bytes.len() as u64 != *size {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: {} bytes, the TOC says {size}", e.path, bytes.len()),
                        ));
                    }
                    h.kind = EntryKind::File { size: *size };
                    w.append(&h, Some(&mut &bytes[..]))?;
                }
                FileData::Failed(why) => return Err(io::Error::other(format!("{}: {why}", e.path))),
            },
        }
    }
    w.finish()?.flush()
}

/// The writer end: pieces of [`PIECE`] bytes to the reader.
struct Pieces {
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl Write for Pieces {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == PIECE {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE));
            self.tx.send(Ok(piece)).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        }
        Ok(())
    }
}

struct PieceReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    at: usize,
    done: bool,
}

impl Read for PieceReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(piece)) => {
                    self.cur = piece;
                    self.at = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                // The writer finished (and flushed everything it wrote).
                Err(_) => self.done = true,
            }
        }
        let n = out.len().min(self.cur.len() - self.at);
        out[..n].copy_from_slice(&self.cur[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
