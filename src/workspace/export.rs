//! `Workspace::export_diff`: an upper as an OCI layer diff tar.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::stat::{FileStat, SFlag, fstat, major, minor};

use super::changes::check_no_redirects;
use super::tar_writer::{EntryHeader, EntryKind, TarWriter, sparse_map};
use super::walk::{Event, walk};
use crate::digest::{Digest, HashingWriter};
use crate::error::{Error, Result};
use crate::fsutil::{kind, shown};
use crate::mount::copy::Xattrs;
use crate::sys;
use crate::unpack::Compression;

/// Options for [`Workspace::export_diff`](super::Workspace::export_diff) and
/// [`Workspace::export_diff_file`](super::Workspace::export_diff_file).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DiffOptions {
    /// Compression of the written blob. Default: none.
    pub compression: Compression,
    /// zstd or gzip level. Default: 3 (zstd) / 6 (gzip) when `None`.
    pub level: Option<i32>,
    /// Block-aligned tar: every regular file's data starts at a multiple of the
    /// destination's block size, so a filesystem with reflinks (XFS `reflink=1`, btrfs)
    /// can share the data's extents instead of copying them, on export (with
    /// [`export_diff_file`](super::Workspace::export_diff_file)) and on import (with
    /// [`import_diff_file`](super::Workspace::import_diff_file)). The gaps are filled
    /// with PAX `comment` records, which every tar reader ignores: the archive is a
    /// standard tar that GNU tar, bsdtar and the `tar` crate read unchanged. (Sparse
    /// files, aligned or not, are PAX sparse 1.0 entries: GNU tar and bsdtar restore
    /// them; the `tar` crate shows them as `GNUSparseFile.0/<name>` holding the map and
    /// the data.) Needs [`Compression::None`]. Default: false.
    pub aligned: bool,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { compression: Compression::None, level: None, aligned: false }
    }
}

impl DiffOptions {
    /// An uncompressed, block-aligned diff: the checkpoint format (see
    /// [`aligned`](Self::aligned)).
    pub fn aligned() -> Self {
        DiffOptions { aligned: true, ..Default::default() }
    }
}

/// What an export or import of a diff handled.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiffStats {
    /// Digest of the blob as written or read (compressed, if it is). `None` when file
    /// data was copied inside the kernel without passing through this process (aligned
    /// [`export_diff_file`](super::Workspace::export_diff_file), the
    /// [`import_diff_file`](super::Workspace::import_diff_file) fast path): hashing would
    /// read every byte, which is what those paths avoid.
    pub digest: Option<Digest>,
    /// Digest of the uncompressed tar (the layer's `diff_id`), `None` as for `digest`.
    pub diff_id: Option<Digest>,
    /// Size of the blob in bytes (compressed, if it is).
    pub size: u64,
    /// Tar entries (whiteouts and opaque markers included).
    pub entries: u64,
    /// Bytes of regular file data stored (holes of sparse files excluded).
    pub file_bytes: u64,
}

fn io_err(what: &'static str) -> impl Fn(io::Error) -> Error {
    move |e| Error::io(what, "diff output", e)
}

/// A reader of a sandbox's file that remembers whether it failed, so that an error in a
/// copy from it into the output names the side that failed: the upper's file (`read`)
/// or the output (`write`, e.g. `ENOSPC`).
struct Tagged<R> {
    inner: R,
    failed: bool,
}

impl<R: io::Read> io::Read for Tagged<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf);
        self.failed |= r.as_ref().is_err_and(|e| e.kind() != io::ErrorKind::Interrupted);
        r
    }
}

/// Copies `data` (a sandbox file's bytes, shown as `display`) into the output with
/// `copy`, naming the failing side in the error.
fn copy_tagged<R: io::Read>(
    data: R,
    display: &Path,
    copy: impl FnOnce(&mut dyn io::Read) -> io::Result<()>,
) -> Result<()> {
    let mut t = Tagged { inner: data, failed: false };
    copy(&mut t).map_err(|e| if t.failed { Error::io("read", display, e) } else { io_err("write")(e) })
}

/// A `copy_file_range` error: the output's when it ran out of room, else the source's.
fn range_err(display: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |e| match e.raw_os_error() {
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT | nix::libc::EFBIG) => io_err("copy_file_range")(e),
        _ => Error::io("copy_file_range", display, e),
    }
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
    let mut total = 0usize;
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
            total += to.len() + v.len() + 32;
            if total > MAX_XATTR_BYTES {
                return Err(Error::Unsupported {
                    what: format!(
                        "{}: more than {} KiB of xattrs, which an import would refuse (1 MiB of headers per entry)",
                        display.display(),
                        MAX_XATTR_BYTES / 1024
                    ),
                });
            }
            out.push((to, v));
        }
    }
    out.sort();
    Ok(out)
}

/// Longest path an import accepts (`PATH_MAX` less the NUL): a diff with a longer one
/// could be written but never restored, so the export refuses it.
const MAX_PATH: usize = 4095;

fn refuse_long(path: &[u8], display: &Path) -> Result<()> {
    if path.len() > MAX_PATH {
        return Err(Error::Unsupported {
            what: format!(
                "{}: a path of {} bytes, longer than PATH_MAX ({MAX_PATH}): an import could not recreate it",
                display.display(),
                path.len()
            ),
        });
    }
    Ok(())
}

/// Most bytes of xattrs (names, values and record overhead) one entry may carry: an
/// import bounds each entry's extended headers at 1 MiB, which must also hold the path
/// and link records and the alignment padding (up to 64 KiB).
const MAX_XATTR_BYTES: usize = 1024 * 1024 - 96 * 1024;

fn with_prefix(path: &[u8], name: &[u8]) -> Vec<u8> {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => [&path[..=i], name].concat(),
        None => name.to_vec(),
    }
}

/// Data offsets of an aligned export into a plain `Write` (the destination's block size
/// is unknown): the usual filesystem block size.
const STREAM_ALIGN: u64 = 4096;
/// Largest alignment honoured from `st_blksize` (network filesystems report up to MiBs,
/// which would pad every file by that much).
const MAX_ALIGN: u64 = 64 * 1024;

/// The alignment for data written to `file`: its `st_blksize` when that is a sane power
/// of two, else [`STREAM_ALIGN`].
fn file_align(file: &File) -> Result<u64> {
    let st = fstat(file.as_fd()).map_err(|e| io_err("fstat")(e.into()))?;
    let b = st.st_blksize as u64;
    Ok(if b.is_power_of_two() && (512..=MAX_ALIGN).contains(&b) { b } else { STREAM_ALIGN })
}

/// Where the tar goes: what differs between the streaming and the file export.
trait Emit {
    /// Appends a non-file entry (or an empty marker file).
    fn entry(&mut self, h: &EntryHeader, data: Option<&mut dyn io::Read>) -> Result<()>;
    /// Appends a regular file entry with the data of `f` (`size` bytes).
    fn file(&mut self, h: &EntryHeader, f: &File, size: u64, display: &Path) -> Result<()>;
    /// Appends a sparse file entry (`h.kind` is `Sparse`): `map` (from [`sparse_map`]),
    /// then the data of `f`'s `segments`.
    fn sparse(&mut self, h: &EntryHeader, f: &File, map: &[u8], segments: &[(u64, u64)], display: &Path) -> Result<()>;
}

/// Reads the data segments of a sparse file one after the other, by `pread`.
struct Segments<'a> {
    f: &'a File,
    segments: &'a [(u64, u64)],
    /// Bytes of `segments[0]` already read.
    done: u64,
}

impl io::Read for Segments<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        while let Some(&(off, len)) = self.segments.first() {
            if self.done == len {
                self.segments = &self.segments[1..];
                self.done = 0;
                continue;
            }
            let want = (len - self.done).min(buf.len() as u64) as usize;
            // 0 (the file shrank) ends the stream: the tar writer reports it as short.
            let n = self.f.read_at(&mut buf[..want], off + self.done)?;
            self.done += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

/// Into any `Write`, hashed (digest and diff_id), optionally compressed.
struct StreamEmit<W: Write> {
    tar: TarWriter<HashingWriter<Sink<W>>>,
    /// Data alignment inside the archive, if asked.
    align: Option<u64>,
}

impl<W: Write> Emit for StreamEmit<W> {
    fn entry(&mut self, h: &EntryHeader, data: Option<&mut dyn io::Read>) -> Result<()> {
        match (self.align, &h.kind, data) {
            // Markers too: every regular-file entry of an aligned tar is aligned.
            (Some(a), EntryKind::File { .. }, Some(d)) => {
                self.tar.append_file_header_aligned(h, a).map_err(io_err("write"))?;
                self.tar.write_pending_data(d).map_err(io_err("write"))
            }
            (_, _, data) => self.tar.append(h, data).map_err(io_err("write")),
        }
    }

    fn file(&mut self, h: &EntryHeader, f: &File, _size: u64, display: &Path) -> Result<()> {
        match self.align {
            Some(a) => {
                self.tar.append_file_header_aligned(h, a).map_err(io_err("write"))?;
                copy_tagged(f, display, |d| self.tar.write_pending_data(d))
            }
            None => copy_tagged(f, display, |d| self.tar.append(h, Some(d))),
        }
    }

    fn sparse(&mut self, h: &EntryHeader, f: &File, map: &[u8], segments: &[(u64, u64)], display: &Path) -> Result<()> {
        let data = io::Read::chain(map, Segments { f, segments, done: 0 });
        match self.align {
            Some(a) => {
                self.tar.append_file_header_aligned(h, a).map_err(io_err("write"))?;
                copy_tagged(data, display, |d| self.tar.write_pending_data(d))
            }
            None => copy_tagged(data, display, |d| self.tar.append(h, Some(d))),
        }
    }
}

/// Into a `File`, aligned to its block size, file data by `copy_file_range`.
struct FileEmit<'f> {
    tar: TarWriter<BufWriter<&'f File>>,
    file: &'f File,
    align: u64,
    /// `copy_file_range` can write to `file` (not `O_APPEND`: `EBADF` there).
    kernel_copy: bool,
}

impl Emit for FileEmit<'_> {
    fn entry(&mut self, h: &EntryHeader, data: Option<&mut dyn io::Read>) -> Result<()> {
        match (&h.kind, data) {
            // Markers too: every regular-file entry of an aligned tar is aligned.
            (EntryKind::File { .. }, Some(d)) => {
                self.tar.append_file_header_aligned(h, self.align).map_err(io_err("write"))?;
                self.tar.write_pending_data(d).map_err(io_err("write"))
            }
            (_, data) => self.tar.append(h, data).map_err(io_err("write")),
        }
    }

    fn file(&mut self, h: &EntryHeader, f: &File, size: u64, display: &Path) -> Result<()> {
        self.tar.append_file_header_aligned(h, self.align).map_err(io_err("write"))?;
        if size < self.align || !self.kernel_copy {
            // Less than a block: nothing to share, and buffering beats a syscall pair.
            return copy_tagged(f, display, |d| self.tar.write_pending_data(d));
        }
        // The headers must reach the file before the kernel appends the data at its position.
        self.tar.get_mut().flush().map_err(io_err("write"))?;
        crate::reflink::copy_range(f, 0, self.file, size).map_err(range_err(display))?;
        self.tar.finish_data(size).map_err(io_err("write"))
    }

    fn sparse(&mut self, h: &EntryHeader, f: &File, map: &[u8], segments: &[(u64, u64)], display: &Path) -> Result<()> {
        self.tar.append_file_header_aligned(h, self.align).map_err(io_err("write"))?;
        if !self.kernel_copy {
            let data = io::Read::chain(map, Segments { f, segments, done: 0 });
            return copy_tagged(data, display, |d| self.tar.write_pending_data(d));
        }
        let out = self.tar.get_mut();
        out.write_all(map).map_err(io_err("write"))?;
        out.flush().map_err(io_err("write"))?;
        let mut stored = map.len() as u64;
        for &(off, len) in segments {
            crate::reflink::copy_range(f, off, self.file, len).map_err(range_err(display))?;
            stored += len;
        }
        self.tar.finish_data(stored).map_err(io_err("write"))
    }
}

/// Most segments a sparse entry gets: more are merged (their holes stored as zeros), so
/// the map stays far below the importer's 1 MiB bound on per-entry metadata.
const MAX_SEGMENTS: usize = 4096;

/// The data segments of `f` (`size` bytes) when it has holes, from `SEEK_DATA` /
/// `SEEK_HOLE`; `None` for a file without holes (or a filesystem that cannot tell).
/// A file that ends in a hole gets a last, empty segment at its end, as GNU tar writes.
fn sparse_segments(f: &File, st: &FileStat, display: &Path) -> Result<Option<Vec<(u64, u64)>>> {
    use nix::unistd::{Whence, lseek};
    let size = st.st_size as u64;
    // Allocated at least its size: no holes worth recording (cheap test first).
    if size == 0 || (st.st_blocks as u64).saturating_mul(512) >= size {
        return Ok(None);
    }
    let mut segs = Vec::new();
    let mut off = 0u64;
    while off < size {
        let data = match lseek(f, off as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) => return Ok(None),
            Err(e) => return Err(Error::io("lseek SEEK_DATA", display, e)),
        };
        if data >= size {
            break;
        }
        let hole = lseek(f, data as i64, Whence::SeekHole).map_err(|e| Error::io("lseek SEEK_HOLE", display, e))?;
        let end = (hole as u64).min(size);
        segs.push((data, end - data));
        off = end;
    }
    if segs == [(0, size)] {
        return Ok(None);
    }
    let mut gap = 4096u64;
    while segs.len() > MAX_SEGMENTS {
        segs = merge_close(&segs, gap);
        gap = gap.saturating_mul(2);
    }
    if segs.last().is_none_or(|&(o, l)| o + l < size) {
        segs.push((size, 0));
    }
    Ok(Some(segs))
}

/// `segs` with neighbours at most `gap` bytes apart merged into one segment.
fn merge_close(segs: &[(u64, u64)], gap: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(segs.len());
    for &(o, l) in segs {
        match out.last_mut() {
            Some((po, pl)) if o - (*po + *pl) <= gap => *pl = o + l - *po,
            _ => out.push((o, l)),
        }
    }
    out
}

/// Writes the upper as a diff tar to `out` (hashed, optionally compressed and aligned
/// within the stream).
pub(crate) fn export(upper: &Path, userxattr: bool, out: impl Write, opts: &DiffOptions) -> Result<DiffStats> {
    check_aligned(opts)?;
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
    let mut emit =
        StreamEmit { tar: TarWriter::new(HashingWriter::new(sink)), align: opts.aligned.then_some(STREAM_ALIGN) };
    let (entries, file_bytes) = walk_upper(upper, userxattr, &mut emit)?;
    let hashed_tar = emit.tar.finish().map_err(io_err("write"))?;
    let (diff_id, _, sink) = hashed_tar.finish();
    let (digest, size) = sink.finish().map_err(io_err("write"))?;
    Ok(DiffStats { digest: Some(digest), diff_id: Some(diff_id), size, entries, file_bytes })
}

/// Writes the upper as a diff tar into `file` at its position. Aligned: data at
/// block-aligned file offsets, copied by `copy_file_range` (reflinked where the
/// filesystem can), not hashed. Otherwise as [`export`].
pub(crate) fn export_file(upper: &Path, userxattr: bool, file: &File, opts: &DiffOptions) -> Result<DiffStats> {
    check_aligned(opts)?;
    if !opts.aligned {
        return export(upper, userxattr, BufWriter::with_capacity(256 * 1024, file), opts);
    }
    // Writes go to the position, or to the end of an `O_APPEND` file (where
    // `copy_file_range` refuses to write: the data is then copied by this process).
    let append = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL)
        .map(|fl| nix::fcntl::OFlag::from_bits_truncate(fl).contains(nix::fcntl::OFlag::O_APPEND))
        .map_err(|e| io_err("fcntl")(e.into()))?;
    let start = if append {
        file.metadata().map_err(io_err("fstat"))?.len()
    } else {
        let mut f = file;
        io::Seek::stream_position(&mut f).map_err(io_err("lseek"))?
    };
    let align = file_align(file)?;
    let mut emit = FileEmit {
        tar: TarWriter::at_offset(BufWriter::with_capacity(256 * 1024, file), start),
        file,
        align,
        kernel_copy: !append,
    };
    let (entries, file_bytes) = walk_upper(upper, userxattr, &mut emit)?;
    emit.tar.finish().map_err(io_err("write"))?.into_inner().map_err(|e| io_err("write")(e.into_error()))?;
    let end = if append {
        file.metadata().map_err(io_err("fstat"))?.len()
    } else {
        let mut f = file;
        io::Seek::stream_position(&mut f).map_err(io_err("lseek"))?
    };
    let size = end - start;
    Ok(DiffStats { digest: None, diff_id: None, size, entries, file_bytes })
}

fn check_aligned(opts: &DiffOptions) -> Result<()> {
    if opts.aligned && opts.compression != Compression::None {
        return Err(Error::Unsupported {
            what: "an aligned diff must be uncompressed: compression moves file data off block boundaries".into(),
        });
    }
    Ok(())
}

/// Walks the upper, emitting its entries in path order; returns (entries, file bytes).
fn walk_upper(upper: &Path, userxattr: bool, tar: &mut dyn Emit) -> Result<(u64, u64)> {
    let mut entries = 0u64;
    let mut file_bytes = 0u64;
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk(upper, userxattr, |ev| {
        match ev {
            // The merged root's own metadata is the upper root's: record it as `./`
            // (as umoci does), so an import reproduces a chmod or chown of `/`.
            Event::Enter { parent, name, path: [], st, .. } => {
                let x = xattrs_of(parent, name, userxattr, upper)?;
                tar.entry(&header(b".", EntryKind::Dir, st, x), None)?;
                entries += 1;
            }
            Event::Enter { parent, name, path, st, opaque, .. } => {
                let display = shown(upper, path);
                refuse_reserved(name, &display)?;
                refuse_long(path, &display)?;
                check_no_redirects(parent, name, userxattr, &display)?;
                let x = xattrs_of(parent, name, userxattr, &display)?;
                tar.entry(&header(path, EntryKind::Dir, st, x), None)?;
                entries += 1;
                if opaque {
                    let marker = [path, b"/.wh..wh..opq".as_slice()].concat();
                    tar.entry(&whiteout_entry(marker), Some(&mut io::empty()))?;
                    entries += 1;
                }
            }
            Event::Leave { .. } => {}
            Event::Whiteout { name, path, .. } => {
                refuse_reserved(name, &shown(upper, path))?;
                refuse_long(path, &shown(upper, path))?;
                let wh = with_prefix(path, &[b".wh.".as_slice(), name].concat());
                tar.entry(&whiteout_entry(wh), Some(&mut io::empty()))?;
                entries += 1;
            }
            Event::Leaf { parent, name, path, st } => {
                let display = shown(upper, path);
                refuse_reserved(name, &display)?;
                refuse_long(path, &display)?;
                check_no_redirects(parent, name, userxattr, &display)?;
                if st.st_nlink > 1 {
                    if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
                        let h = header(path, EntryKind::Hardlink { target: first.clone() }, st, Vec::new());
                        tar.entry(&h, None)?;
                        entries += 1;
                        return Ok(true);
                    }
                    links.insert((st.st_dev, st.st_ino), path.to_vec());
                }
                let x = xattrs_of(parent, name, userxattr, &display)?;
                match kind(st) {
                    SFlag::S_IFREG => {
                        // Never a FIFO or device swapped in by a live sandbox.
                        let f = crate::mount::copy::open_regular_at(parent, name, &display)?;
                        // The size of the file as opened, not as listed.
                        let now = fstat(f.as_fd()).map_err(|e| Error::io("fstat", &display, e))?;
                        let size = now.st_size as u64;
                        // Holes stay holes: a sandbox's sparse file (up to exabytes of
                        // apparent size) is stored as its data only.
                        match sparse_segments(&f, &now, &display)? {
                            None => {
                                let h = header(path, EntryKind::File { size }, st, x);
                                tar.file(&h, &f, size, &display)?;
                                file_bytes += size;
                            }
                            Some(segments) => {
                                let map = sparse_map(&segments);
                                let data: u64 = segments.iter().map(|s| s.1).sum();
                                let stored = map.len() as u64 + data;
                                let h = header(path, EntryKind::Sparse { size: stored, real_size: size }, st, x);
                                tar.sparse(&h, &f, &map, &segments, &display)?;
                                file_bytes += data;
                            }
                        }
                    }
                    SFlag::S_IFLNK => {
                        let t =
                            nix::fcntl::readlinkat(parent, name).map_err(|e| Error::io("readlinkat", &display, e))?;
                        use std::os::unix::ffi::OsStrExt;
                        let h = header(path, EntryKind::Symlink { target: t.as_bytes().to_vec() }, st, x);
                        tar.entry(&h, None)?;
                    }
                    SFlag::S_IFCHR | SFlag::S_IFBLK => {
                        let (ma, mi) = (major(st.st_rdev) as u32, minor(st.st_rdev) as u32);
                        let k = if kind(st) == SFlag::S_IFCHR {
                            EntryKind::Char { major: ma, minor: mi }
                        } else {
                            EntryKind::Block { major: ma, minor: mi }
                        };
                        tar.entry(&header(path, k, st, x), None)?;
                    }
                    SFlag::S_IFIFO => tar.entry(&header(path, EntryKind::Fifo, st, x), None)?,
                    // Sockets have no tar representation (GNU tar skips them too); a
                    // whiteout keeps a lower entry the socket replaced from coming back.
                    _ => {
                        let wh = with_prefix(path, &[b".wh.".as_slice(), name].concat());
                        tar.entry(&whiteout_entry(wh), Some(&mut io::empty()))?;
                    }
                }
                entries += 1;
            }
        }
        Ok(true)
    })?;
    Ok((entries, file_bytes))
}
