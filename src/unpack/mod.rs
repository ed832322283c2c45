//! Streaming, safe extraction of one image layer.
//!
//! [`unpack`] reads a layer blob (plain tar, gzip or zstd, detected from its first
//! bytes) once, hashing the compressed bytes (and, when asked, the uncompressed tar
//! for the `diff_id`) while it extracts. Nothing is buffered beyond a few MiB,
//! whatever the layer size.
//!
//! ```text
//!  parser thread                                  calling thread
//!  read blob ─ sha256 ─ gunzip/unzstd ─ [sha256] ─ tar headers ══ batches ══▶ openat/write/…
//!                                                   (bounded channel, ≤ 2.5 MiB in flight)
//! ```
//!
//! On two or more cores, decompression and hashing run on one thread and file system
//! calls on the other ([`UnpackOptions::pipelined`]).
//!
//! # Security
//! Every entry is created by file descriptor inside the destination (see the `root`
//! module): absolute paths, `..` components, symlinked parents and hardlinks to outside
//! targets are refused with [`Error::PathEscape`], and nothing is ever written through a
//! symlink. Symlinks themselves may point anywhere: they are created, never followed.
//! Image xattrs in overlayfs's namespaces are escaped, never interpreted.
//! Decompression bombs are bounded by [`UnpackOptions::max_uncompressed_bytes`] and
//! [`UnpackOptions::max_entries`]; per-entry metadata by
//! [`UnpackOptions::max_header_bytes`].
//!
//! # Errors and partial output
//! A failure (bad digest, hostile entry, I/O error) returns an error and leaves the
//! destination as it is: the caller discards it. The cache extracts into `tmp/` and
//! renames into place only on success, so partial layers are never visible.

mod extract;
pub(crate) mod tar;
pub(crate) mod whiteout;

use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::mpsc;

use crate::digest::{Digest, Hasher};
use crate::error::{Error, Result};
use crate::root::Root;
use tar::{Header, Limits, TarReader};

/// How OCI whiteout entries (`.wh.NAME`, `.wh..wh..opq`) are materialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WhiteoutMode {
    /// Keep the layer as an overlayfs layer: `.wh.NAME` becomes a character device 0:0
    /// named `NAME`, `.wh..wh..opq` sets the opaque xattr on its directory. Used for
    /// cached layers, each extracted into its own empty directory.
    #[default]
    Overlay,
    /// Flatten onto the tree already in the destination (like `umoci unpack`): delete
    /// the whited-out path, empty the opaque directory. Never removes what the same
    /// layer added.
    Apply,
}

/// What to do with block and character device entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceNodes {
    /// Create them; `EPERM` (no `CAP_MKNOD`) is an [`Error::NotPermitted`].
    Create,
    /// Create them when permitted, silently skip (and count) them otherwise: what
    /// rootless container engines do.
    #[default]
    CreateOrSkip,
    /// Never create device nodes (they are counted in [`UnpackStats::skipped_devices`]).
    Skip,
}

/// The compression of a layer blob, detected from its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// An uncompressed tar.
    None,
    /// gzip (RFC 1952), possibly several concatenated members.
    Gzip,
    /// zstd, possibly several frames.
    Zstd,
}

/// Options for [`unpack`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UnpackOptions {
    /// How whiteouts are materialised. Default: [`WhiteoutMode::Overlay`].
    pub whiteouts: WhiteoutMode,
    /// Write overlay metadata as `user.overlay.*` (overlay mounted with `userxattr`,
    /// rootless) instead of `trusted.overlay.*`. Default: false.
    pub userxattr: bool,
    /// Verify the blob (as read, compressed) against this digest.
    pub expected_digest: Option<Digest>,
    /// Verify the uncompressed tar stream against this digest (the OCI `diff_id`).
    pub expected_diff_id: Option<Digest>,
    /// Compute the `diff_id` even when none is expected (costs one more sha256 pass
    /// over the uncompressed stream). Default: false.
    pub compute_diff_id: bool,
    /// Apply the archive's numeric uid/gid. Default: true when running as root.
    /// Without it, everything is owned by the extracting user.
    pub chown: bool,
    /// Device node policy. Default: [`DeviceNodes::CreateOrSkip`].
    pub devices: DeviceNodes,
    /// Skip (and count) xattrs the file system or our privileges refuse (`EPERM`,
    /// `EOPNOTSUPP`), e.g. `trusted.*` when unprivileged. Default: false as root,
    /// true otherwise.
    pub ignore_xattr_errors: bool,
    /// Abort with [`Error::LimitExceeded`] once the uncompressed stream passes this many
    /// bytes (decompression bombs). Default: `None` (unbounded).
    pub max_uncompressed_bytes: Option<u64>,
    /// Abort once the archive has more entries than this. Default: `None`.
    pub max_entries: Option<u64>,
    /// Bound on buffered metadata per entry: PAX records, GNU long names, sparse maps.
    /// Default: 1 MiB.
    pub max_header_bytes: u64,
    /// Decompress and parse on a helper thread while this thread writes files.
    /// Default: true when more than one CPU is available.
    pub pipelined: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        let root = nix::unistd::geteuid().is_root();
        UnpackOptions {
            whiteouts: WhiteoutMode::Overlay,
            userxattr: false,
            expected_digest: None,
            expected_diff_id: None,
            compute_diff_id: false,
            chown: root,
            devices: DeviceNodes::CreateOrSkip,
            ignore_xattr_errors: !root,
            max_uncompressed_bytes: None,
            max_entries: None,
            max_header_bytes: 1 << 20,
            pipelined: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
        }
    }
}

impl UnpackOptions {
    /// Options for an unprivileged extraction (inside or outside a user namespace):
    /// no chown, devices skipped, refused xattrs skipped, `user.overlay.*` metadata.
    pub fn rootless() -> Self {
        UnpackOptions {
            userxattr: true,
            chown: false,
            devices: DeviceNodes::Skip,
            ignore_xattr_errors: true,
            ..Default::default()
        }
    }
}

/// What [`unpack`] did.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct UnpackStats {
    /// Archive entries processed (metadata-only headers such as PAX records excluded).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directory entries.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hardlinks created.
    pub hardlinks: u64,
    /// Device nodes and fifos created.
    pub special: u64,
    /// Whiteout and opaque entries processed.
    pub whiteouts: u64,
    /// Bytes of regular-file data written.
    pub file_bytes: u64,
    /// Bytes of the blob as read (compressed).
    pub compressed_bytes: u64,
    /// Bytes of the uncompressed tar stream.
    pub uncompressed_bytes: u64,
    /// Digest of the blob as read.
    pub digest: Digest,
    /// Digest of the uncompressed stream, when computed (always for plain tar).
    pub diff_id: Option<Digest>,
    /// Detected compression.
    pub compression: Compression,
    /// Device nodes not created (policy or privileges).
    pub skipped_devices: u64,
    /// Xattrs not set (see [`UnpackOptions::ignore_xattr_errors`]).
    pub skipped_xattrs: u64,
}

/// Extract one layer blob from `input` into the existing directory `dest`.
///
/// See the [module docs](self) for the format support and the security model.
///
/// # Errors
/// - [`Error::PathEscape`] for an entry that would resolve outside `dest`;
/// - [`Error::DigestMismatch`] if the blob or the uncompressed stream does not match
///   [`UnpackOptions::expected_digest`] / [`UnpackOptions::expected_diff_id`];
/// - [`Error::InvalidArchive`] for malformed or truncated archives;
/// - [`Error::LimitExceeded`] when a configured bound is passed;
/// - [`Error::Unsupported`] for xz/bzip2 blobs and unknown entry types;
/// - [`Error::Read`] when `input` fails or the compressed stream is corrupt;
/// - [`Error::Io`] / [`Error::NotPermitted`] when the file system refuses an operation.
///
/// `dest` may hold partial output after an error; discard it.
///
/// # Security
/// `dest` itself is trusted; nothing in the archive can make extraction write, link or
/// follow outside it.
pub fn unpack<R: Read + Send>(input: R, dest: &Path, opts: &UnpackOptions) -> Result<UnpackStats> {
    unpack_inner(input, dest, opts, None)
}

/// Like [`unpack`], calling `progress` with the number of blob bytes read so far.
///
/// # Errors
/// As [`unpack`].
pub fn unpack_with_progress<R: Read + Send>(
    input: R,
    dest: &Path,
    opts: &UnpackOptions,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<UnpackStats> {
    unpack_inner(input, dest, opts, Some(progress))
}

/// Entry headers and file data handed from the parser to the extractor.
enum Item {
    Entry(Box<Header>),
    Data(usize, usize),
}

const BATCH_BYTES: usize = 256 * 1024;
const BATCH_ITEMS: usize = 512;
const PIPELINE_DEPTH: usize = 8;

struct Batch {
    items: Vec<Item>,
    data: Vec<u8>,
    used: usize,
}

impl Batch {
    fn new() -> Batch {
        Batch { items: Vec::with_capacity(BATCH_ITEMS), data: vec![0; BATCH_BYTES], used: 0 }
    }

    fn clear(&mut self) {
        self.items.clear();
        self.used = 0;
    }
}

struct Parsed {
    digest: Digest,
    compressed_bytes: u64,
    diff_id: Option<Digest>,
    uncompressed_bytes: u64,
    compression: Compression,
}

fn unpack_inner<R: Read + Send>(
    mut input: R,
    dest: &Path,
    opts: &UnpackOptions,
    progress: Option<&mut (dyn FnMut(u64) + Send)>,
) -> Result<UnpackStats> {
    let root = Root::open(dest)?;
    let mut ex = extract::Extractor::new(&root, opts);
    let parsed = if opts.pipelined {
        std::thread::scope(|s| -> Result<Parsed> {
            let (tx, rx) = mpsc::sync_channel::<Batch>(PIPELINE_DEPTH);
            let (back_tx, back_rx) = mpsc::channel::<Batch>();
            let input = &mut input;
            let parser = std::thread::Builder::new()
                .name("rootfs-unpack".into())
                .spawn_scoped(s, move || {
                    parse(input, opts, progress, &mut |b| {
                        tx.send(b).map_err(|_| Error::Read {
                            what: "layer blob",
                            source: io::Error::other("extraction stopped"),
                        })?;
                        Ok(back_rx.try_recv().unwrap_or_else(|_| Batch::new()))
                    })
                })
                .map_err(|e| Error::io("spawn", "rootfs-unpack thread", e))?;
            let mut failed = None;
            for mut b in rx.iter() {
                if let Err(e) = apply(&mut ex, &b) {
                    failed = Some(e);
                    break;
                }
                b.clear();
                let _ = back_tx.send(b);
            }
            drop(rx);
            let parsed = parser.join().expect("unpack parser thread panicked");
            match failed {
                Some(e) => Err(e),
                None => parsed,
            }
        })?
    } else {
        let mut failed: Option<Error> = None;
        let r = parse(&mut input, opts, progress, &mut |mut b| {
            if let Err(e) = apply(&mut ex, &b) {
                let msg = e.to_string();
                failed = Some(e);
                return Err(Error::Read { what: "layer blob", source: io::Error::other(msg) });
            }
            b.clear();
            Ok(b)
        });
        match failed {
            Some(e) => return Err(e),
            None => r?,
        }
    };
    let c = ex.finish()?;
    Ok(UnpackStats {
        entries: c.entries,
        files: c.files,
        dirs: c.dirs,
        symlinks: c.symlinks,
        hardlinks: c.hardlinks,
        special: c.special,
        whiteouts: c.whiteouts,
        file_bytes: c.file_bytes,
        compressed_bytes: parsed.compressed_bytes,
        uncompressed_bytes: parsed.uncompressed_bytes,
        digest: parsed.digest,
        diff_id: parsed.diff_id,
        compression: parsed.compression,
        skipped_devices: c.skipped_devices,
        skipped_xattrs: c.skipped_xattrs,
    })
}

fn apply(ex: &mut extract::Extractor<'_>, b: &Batch) -> Result<()> {
    for item in &b.items {
        match item {
            Item::Entry(h) => ex.begin(h.clone())?,
            Item::Data(s, e) => ex.data(&b.data[*s..*e])?,
        }
    }
    Ok(())
}

/// Hashes (and reports progress on) the raw blob as it is read.
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
fn read_magic<R: Read>(r: &mut R) -> Result<([u8; 6], usize)> {
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

/// Read the whole blob: detect compression, parse entries into batches for `sink`,
/// drain the rest of the stream, verify digests.
fn parse<R: Read + ?Sized>(
    input: &mut R,
    opts: &UnpackOptions,
    progress: Option<&mut (dyn FnMut(u64) + Send)>,
    sink: &mut dyn FnMut(Batch) -> Result<Batch>,
) -> Result<Parsed> {
    let mut raw_hasher = Hasher::new();
    let mut st = CountState { hasher: None, count: 0, limit: opts.max_uncompressed_bytes };
    let want_diff = opts.expected_diff_id.is_some() || opts.compute_diff_id;
    let compression = {
        let mut tap = Tap { inner: &mut *input, hasher: &mut raw_hasher, progress };
        let (magic, n) = read_magic(&mut tap)?;
        let compression = detect(&magic[..n])?;
        let head = io::Cursor::new(magic).take(n as u64).chain(tap);
        let buffered = BufReader::with_capacity(128 * 1024, head);
        let decoded: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(buffered),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(buffered)
                    .map_err(|e| Error::Read { what: "zstd stream", source: e })?,
            ),
        };
        // A plain tar's diff_id is its digest: no second hash.
        st.hasher = (want_diff && compression != Compression::None).then(Hasher::new);
        let counted = Counted { inner: decoded, st: &mut st };
        // Decoders answer small reads slowly: buffer the 512-byte header reads.
        let reader: Box<dyn Read + '_> = if compression == Compression::None {
            Box::new(counted)
        } else {
            Box::new(BufReader::with_capacity(64 * 1024, counted))
        };
        let limits = Limits { max_header_bytes: opts.max_header_bytes, max_entries: opts.max_entries };
        let mut tar = TarReader::new(reader, limits);
        run(&mut tar, sink)?;
        // Whatever follows the end-of-archive marker is part of the blob and of the
        // diff_id (tar writers pad to 10 KiB records); reading it also makes the
        // decoders check their trailers (gzip CRC, zstd checksum).
        let mut rest = tar.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(tar::read_err)?;
        compression
    };
    // Bytes a decoder did not need (after the last gzip member / zstd frame).
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw_hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(tar::read_err(e)),
        }
    }
    let compressed_bytes = raw_hasher.len();
    let digest = raw_hasher.finish();
    let diff_id = match (compression, st.hasher.take()) {
        (Compression::None, _) => Some(digest),
        (_, Some(h)) => Some(h.finish()),
        (_, None) => None,
    };
    if let Some(expected) = &opts.expected_digest {
        expected.verify(&digest)?;
    }
    if let (Some(expected), Some(found)) = (&opts.expected_diff_id, &diff_id) {
        expected.verify(found)?;
    }
    Ok(Parsed { digest, compressed_bytes, diff_id, uncompressed_bytes: st.count, compression })
}

/// Move every entry and its data from the tar reader into batches.
fn run<R: Read>(tar: &mut TarReader<R>, sink: &mut dyn FnMut(Batch) -> Result<Batch>) -> Result<()> {
    let mut batch = Batch::new();
    while let Some(h) = tar.next_entry()? {
        let mut left = h.size;
        batch.items.push(Item::Entry(Box::new(h)));
        loop {
            if batch.items.len() >= BATCH_ITEMS || batch.used == batch.data.len() {
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
