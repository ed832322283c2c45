//! `Workspace::export_diff`: an upper as an OCI layer diff tar.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::stat::{FileStat, SFlag, fstat, major, minor};

use super::changes::check_no_redirects;
use super::tar_writer::{EntryHeader, EntryKind, TarWriter};
use super::walk::{Event, kind, shown, walk};
use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};
use crate::mount::copy::Xattrs;
use crate::sys;
use crate::unpack::Compression;

/// Options for [`Workspace::export_diff`](super::Workspace::export_diff).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DiffOptions {
    /// Compression of the written blob. Default: none.
    pub compression: Compression,
    /// zstd or gzip level. Default: 3 (zstd) / 6 (gzip) when `None`.
    pub level: Option<i32>,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { compression: Compression::None, level: None }
    }
}

/// What an export or import of a diff handled.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiffStats {
    /// Digest of the blob as written or read (compressed, if it is).
    pub digest: Digest,
    /// Digest of the uncompressed tar (the layer's `diff_id`).
    pub diff_id: Digest,
    /// Size of the blob in bytes (compressed, if it is).
    pub size: u64,
    /// Tar entries (whiteouts and opaque markers included).
    pub entries: u64,
    /// Bytes of regular file data.
    pub file_bytes: u64,
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> Error {
    move |e| Error::io(what, "diff output", e)
}

/// The compressed stream, hashing what it writes to `out`.
enum Sink<W: Write> {
    Plain(HashingWriter<W>),
    Gzip(flate2::write::GzEncoder<HashingWriter<W>>),
    Zstd(zstd::Encoder<'static, HashingWriter<W>>),
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Gzip(w) => w.write(buf),
            Sink::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Gzip(w) => w.flush(),
            Sink::Zstd(w) => w.flush(),
        }
    }
}

impl<W: Write> Sink<W> {
    fn finish(self) -> io::Result<(Digest, u64)> {
        let h = match self {
            Sink::Plain(w) => w,
            Sink::Gzip(w) => w.finish()?,
            Sink::Zstd(w) => w.finish()?,
        };
        let (d, n, _) = h.finish();
        Ok((d, n))
    }
}

fn header(path: &[u8], kind: EntryKind, st: &FileStat, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> EntryHeader {
    EntryHeader {
        path: path.to_vec(),
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        xattrs,
    }
}

/// A `.wh.` marker. Its metadata means nothing and an import does not keep it, so it
/// is fixed (mode 0644, owner 0, mtime 0): exporting an imported diff again gives the
/// same bytes.
fn whiteout_entry(path: Vec<u8>) -> EntryHeader {
    EntryHeader {
        path,
        kind: EntryKind::File { size: 0 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: (0, 0),
        xattrs: Vec::new(),
    }
}

/// OCI layers reserve `.wh.` names for whiteouts: a file of the sandbox named so would
/// turn into a deletion on import.
fn refuse_reserved(name: &[u8], display: &Path) -> Result<()> {
    if name.starts_with(b".wh.") {
        return Err(Error::Unsupported {
            what: format!("{}: names starting with .wh. are reserved for whiteouts in OCI layers", display.display()),
        });
    }
    Ok(())
}

/// The image-visible xattrs of an upper entry: overlay metadata dropped, escaped
/// image xattrs back under their own names.
fn xattrs_of(
    dir: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
    userxattr: bool,
    display: &Path,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match sys::listxattr_at_nofollow(dir, name) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("llistxattr", display, e)),
    };
    let unescape = Xattrs::Unescape(Xattrs::prefix(userxattr));
    let mut out = Vec::new();
    for n in names {
        let Some(to) = unescape.translate(&n) else { continue };
        if to.contains(&b'=') {
            // PAX `SCHILY.xattr.<name>=<value>` records cannot hold one.
            return Err(Error::Unsupported {
                what: format!(
                    "{}: xattr {:?} has '=' in its name, which tar cannot record",
                    display.display(),
                    String::from_utf8_lossy(&to)
                ),
            });
        }
        if let Some(v) = sys::getxattr_at_nofollow(dir, name, &n).map_err(|e| Error::io("lgetxattr", display, e))? {
            out.push((to, v));
        }
    }
    out.sort();
    Ok(out)
}

fn with_prefix(path: &[u8], name: &[u8]) -> Vec<u8> {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => [&path[..=i], name].concat(),
        None => name.to_vec(),
    }
}

pub(crate) fn export(upper: &Path, userxattr: bool, out: impl Write, opts: &DiffOptions) -> Result<DiffStats> {
    let hashed = HashingWriter::new(out);
    let sink = match opts.compression {
        Compression::None => Sink::Plain(hashed),
        Compression::Gzip => {
            let level =
                opts.level.map_or(flate2::Compression::default(), |l| flate2::Compression::new(l.clamp(0, 9) as u32));
            Sink::Gzip(flate2::write::GzEncoder::new(hashed, level))
        }
        Compression::Zstd => Sink::Zstd(zstd::Encoder::new(hashed, opts.level.unwrap_or(3)).map_err(io_err("zstd"))?),
    };
    // The diff_id is the digest of the uncompressed tar.
    let mut tar = TarWriter::new(HashingWriter::new(sink));
    let mut entries = 0u64;
    let mut file_bytes = 0u64;
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk(upper, userxattr, |ev| {
        match ev {
            // The merged root's own metadata is the upper root's: record it as `./`
            // (as umoci does), so an import reproduces a chmod or chown of `/`.
            Event::Enter { parent, name, path: [], st, .. } => {
                let x = xattrs_of(parent, name, userxattr, upper)?;
                tar.append(&header(b".", EntryKind::Dir, st, x), None).map_err(io_err("write"))?;
                entries += 1;
            }
            Event::Enter { parent, name, path, st, opaque, .. } => {
                let display = shown(upper, path);
                refuse_reserved(name, &display)?;
                check_no_redirects(parent, name, userxattr, &display)?;
                let x = xattrs_of(parent, name, userxattr, &display)?;
                tar.append(&header(path, EntryKind::Dir, st, x), None).map_err(io_err("write"))?;
                entries += 1;
                if opaque {
                    let marker = [path, b"/.wh..wh..opq".as_slice()].concat();
                    tar.append(&whiteout_entry(marker), Some(&mut io::empty())).map_err(io_err("write"))?;
                    entries += 1;
                }
            }
            Event::Leave { .. } => {}
            Event::Whiteout { name, path, .. } => {
                refuse_reserved(name, &shown(upper, path))?;
                let wh = with_prefix(path, &[b".wh.".as_slice(), name].concat());
                tar.append(&whiteout_entry(wh), Some(&mut io::empty())).map_err(io_err("write"))?;
                entries += 1;
            }
            Event::Leaf { parent, name, path, st } => {
                let display = shown(upper, path);
                refuse_reserved(name, &display)?;
                check_no_redirects(parent, name, userxattr, &display)?;
                if st.st_nlink > 1 {
                    if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
                        let h = header(path, EntryKind::Hardlink { target: first.clone() }, st, Vec::new());
                        tar.append(&h, None).map_err(io_err("write"))?;
                        entries += 1;
                        return Ok(true);
                    }
                    links.insert((st.st_dev, st.st_ino), path.to_vec());
                }
                let x = xattrs_of(parent, name, userxattr, &display)?;
                match kind(st) {
                    SFlag::S_IFREG => {
                        // Never a FIFO or device swapped in by a live sandbox.
                        let mut f = crate::mount::copy::open_regular_at(parent, name, &display)?;
                        // The size of the file as opened, not as listed.
                        let size = fstat(f.as_fd()).map_err(|e| Error::io("fstat", &display, e))?.st_size as u64;
                        let h = header(path, EntryKind::File { size }, st, x);
                        tar.append(&h, Some(&mut f)).map_err(|e| Error::io("read", &display, e))?;
                        file_bytes += size;
                    }
                    SFlag::S_IFLNK => {
                        let t =
                            nix::fcntl::readlinkat(parent, name).map_err(|e| Error::io("readlinkat", &display, e))?;
                        use std::os::unix::ffi::OsStrExt;
                        let h = header(path, EntryKind::Symlink { target: t.as_bytes().to_vec() }, st, x);
                        tar.append(&h, None).map_err(io_err("write"))?;
                    }
                    SFlag::S_IFCHR | SFlag::S_IFBLK => {
                        let (ma, mi) = (major(st.st_rdev) as u32, minor(st.st_rdev) as u32);
                        let k = if kind(st) == SFlag::S_IFCHR {
                            EntryKind::Char { major: ma, minor: mi }
                        } else {
                            EntryKind::Block { major: ma, minor: mi }
                        };
                        tar.append(&header(path, k, st, x), None).map_err(io_err("write"))?;
                    }
                    SFlag::S_IFIFO => {
                        tar.append(&header(path, EntryKind::Fifo, st, x), None).map_err(io_err("write"))?
                    }
                    // Sockets have no tar representation (GNU tar skips them too).
                    _ => return Ok(true),
                }
                entries += 1;
            }
        }
        Ok(true)
    })?;
    let hashed_tar = tar.finish().map_err(io_err("write"))?;
    let (diff_id, _, sink) = hashed_tar.finish();
    let (digest, size) = sink.finish().map_err(io_err("write"))?;
    Ok(DiffStats { digest, diff_id, size, entries, file_bytes })
}
