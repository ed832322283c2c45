//! Streaming, safe extraction of one image layer.
//!
//! [`unpack`] reads a layer blob (plain tar, gzip or zstd, detected from its first
//! bytes) once, hashing the compressed bytes (and, when asked, the uncompressed tar
//! for the `diff_id`) while it extracts. Nothing is buffered beyond a few MiB,
//! whatever the layer size.
//!
//! ```text
//!  (decode thread, gzip/zstd)               calling thread       whichever thread is free
//!  read blob ─┬─ gunzip/unzstd ─ [sha256] ══▶ tar ─ openat… ══▶ write/fchown/futimens/close
//!             └══▶ sha256 (hash thread)       (≤ 128 files, a few MiB in flight)
//! ```
//!
//! With [`UnpackOptions::pipelined`] (the default on multi-core machines) hashing and
//! decompressing the blob run on helper threads, file data is written by whichever
//! thread is free, from the buffers it was read or decoded into; without it, everything
//! runs inline on the calling thread.
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

mod chunks;
mod extract;
mod pipeline;
pub(crate) mod tar;
pub(crate) mod whiteout;

use std::io::Read;
use std::path::Path;

use crate::digest::Digest;
#[allow(unused_imports)] // linked from the docs
use crate::error::{Error, Result};
use crate::root::Root;

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
    /// rootless) instead of `trusted.overlay.*`. Default: false as root, true when
    /// unprivileged (not root, or in a user namespace).
    pub userxattr: bool,
    /// Lower layer directories of the image, top first (Overlay mode). When the layer
    /// creates a file under a parent directory it does not list (umoci and others omit
    /// unchanged parents), that parent is created with the mode, owner and mtime of the
    /// same directory in the first of these that has it, instead of 0755 owned by the
    /// extracting user, which would hide the real metadata in the merged overlay view.
    /// Default: empty.
    pub parent_lowers: Vec<std::path::PathBuf>,
    /// Verify the blob (as read, compressed) against this digest.
    pub expected_digest: Option<Digest>,
    /// Verify the uncompressed tar stream against this digest (the OCI `diff_id`).
    pub expected_diff_id: Option<Digest>,
    /// Compute the `diff_id` even when none is expected (costs one more sha256 pass
    /// over the uncompressed stream). Default: false.
    pub compute_diff_id: bool,
    /// Apply the archive's numeric uid/gid. Default: true when running as root (in the
    /// initial user namespace).
    /// Without it, everything is owned by the extracting user.
    pub chown: bool,
    /// Device node policy. Default: [`DeviceNodes::CreateOrSkip`] as root,
    /// [`DeviceNodes::Skip`] when unprivileged.
    pub devices: DeviceNodes,
    /// Skip (and count) xattrs the file system or our privileges refuse (`EPERM`,
    /// `EOPNOTSUPP`), e.g. `trusted.*` when unprivileged. Default: false as root,
    /// true otherwise.
    pub ignore_xattr_errors: bool,
    /// Abort with [`Error::LimitExceeded`] once the uncompressed stream passes this many
    /// bytes (decompression bombs). Default: `None` (unbounded).
    pub max_uncompressed_bytes: Option<u64>,
    /// Abort with [`Error::LimitExceeded`] once the archive has more entries than this.
    /// Default: `None`.
    pub max_entries: Option<u64>,
    /// Bound on buffered metadata per entry: PAX records, GNU long names, sparse maps.
    /// Default: 1 MiB.
    pub max_header_bytes: u64,
    /// Decompress and parse on a helper thread while this thread writes files.
    /// Default: true when more than one CPU is available.
    pub pipelined: bool,
    /// Treat a stream that ends without the end-of-archive marker (the zero blocks every
    /// tar writer ends with) as truncated: [`Error::InvalidArchive`]. Without a digest to
    /// verify, this is what tells a cut-off archive from a complete one. Default: false
    /// (accepted, as GNU tar and the tar libraries do); workspace diff imports set it.
    pub require_end_of_archive: bool,
    /// Crate-internal: a lazy layer's skeleton, whose rebuilt stream writes each data-only
    /// placeholder as a sparse file: the overlay xattrs (metacopy, redirect) each one
    /// gets, by path, set unescaped on the open file. A sparse file it has none for is an
    /// error (never a file of zeros). Never set for an image's own archive.
    pub(crate) placeholders: Option<Placeholders>,
}

/// The overlay xattrs of a skeleton's placeholders, by entry path (see
/// `UnpackOptions::placeholders`).
#[derive(Clone)]
pub(crate) struct Placeholders(
    #[allow(clippy::type_complexity)] pub(crate) std::sync::Arc<dyn Fn(&[u8]) -> Option<tar::Xattrs> + Send + Sync>,
);

impl std::fmt::Debug for Placeholders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Placeholders")
    }
}

/// Defaults follow the process's privileges: as root in the initial user namespace,
/// `trusted.overlay.*` metadata, owners applied, refused xattrs are errors; otherwise
/// (not root, or in a user namespace, where `trusted.*` cannot be written and most ids
/// are unmapped) the [`UnpackOptions::rootless`] settings.
impl Default for UnpackOptions {
    fn default() -> Self {
        let root = !crate::privilege::unprivileged();
        UnpackOptions {
            whiteouts: WhiteoutMode::Overlay,
            userxattr: !root,
            parent_lowers: Vec::new(),
            expected_digest: None,
            expected_diff_id: None,
            compute_diff_id: false,
            chown: root,
            devices: if root { DeviceNodes::CreateOrSkip } else { DeviceNodes::Skip },
            ignore_xattr_errors: !root,
            max_uncompressed_bytes: None,
            max_entries: None,
            max_header_bytes: 1 << 20,
            pipelined: std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            require_end_of_archive: false,
            placeholders: None,
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
/// One pass over the blob: its compression (none, gzip, zstd) is detected from the first
/// bytes; its sha256 (and, when asked, the uncompressed stream's) is computed while
/// extracting. Formats: ustar, GNU (long names and links, base-256 numbers, sparse) and
/// PAX (`path`, `linkpath`, `size`, `uid`, `gid`, nanosecond `mtime`, `SCHILY.xattr.*`,
/// sparse 1.0). Memory stays at a few MiB whatever the layer size.
///
/// Entries keep their mode (setuid/setgid/sticky included), numeric owner (with
/// [`UnpackOptions::chown`]), mtime, xattrs, hardlinks, symlinks, fifos and device nodes
/// (per [`UnpackOptions::devices`]). Directory metadata is applied after all entries.
/// Later duplicates of a path replace earlier ones. Whiteouts follow
/// [`UnpackOptions::whiteouts`]; a whiteout never removes what the same layer added.
/// Parent directories missing from the archive are created with mode 0755, only when
/// absent (an existing directory is never altered by an entry below it).
///
/// # Errors
/// - [`Error::ImmutableLayer`] when `dest` is (or lies in) a cache layer (nothing is
///   written);
/// - [`Error::PathEscape`] for an entry that would resolve outside `dest`;
/// - [`Error::DigestMismatch`] if the blob or the uncompressed stream does not match
///   [`UnpackOptions::expected_digest`] / [`UnpackOptions::expected_diff_id`];
/// - [`Error::InvalidArchive`] for malformed or truncated archives;
/// - [`Error::LimitExceeded`] when a configured bound is passed;
/// - [`Error::Unsupported`] for xz/bzip2 blobs, unknown entry types, PAX sparse
///   versions other than 1.0, and paths or hardlink targets longer than `PATH_MAX`;
/// - [`Error::Read`] when `input` fails or the compressed stream is corrupt;
/// - [`Error::NotPermitted`] for a device node with [`DeviceNodes::Create`] without
///   `CAP_MKNOD`, or an overlay whiteout the kernel does not let this process create;
/// - [`Error::Io`] when `dest` cannot be opened, the file system refuses any other
///   operation, or a helper thread cannot be spawned.
///
/// `dest` may hold partial output after an error; discard it.
///
/// # Security
/// `dest` itself is trusted; nothing in the archive can make extraction write, link or
/// follow outside it. Every path is resolved by file descriptor from `dest`
/// (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)`, or an `O_NOFOLLOW` walk before
/// Linux 5.6), never by joining strings: absolute paths, `..` components, symlinked
/// parents and hardlinks whose target lies outside are refused with
/// [`Error::PathEscape`]. Extraction never follows a symlink, even one pointing inside
/// `dest`; symlinks themselves may point anywhere (created, never followed). Image
/// xattrs in `trusted.overlay.*`/`user.overlay.*` are stored escaped
/// (`trusted.overlay.overlay.*`), never interpreted by overlayfs. Set
/// [`UnpackOptions::max_uncompressed_bytes`] and [`UnpackOptions::max_entries`] for
/// untrusted sources (decompression bombs); buffered per-entry metadata is bounded by
/// [`UnpackOptions::max_header_bytes`].
pub fn unpack<R: Read + Send>(input: R, dest: &Path, opts: &UnpackOptions) -> Result<UnpackStats> {
    refuse_cache_layer(dest)?;
    unpack_inner(input, dest, opts, None, None).map(|(stats, _)| stats)
}

/// [`unpack`] by the cache itself, into its own `tmp/<entry>/fs` (which callers
/// outside the cache may not write: see [`refuse_cache_layer`]).
///
/// The layers below may not be ready yet, so [`UnpackOptions::parent_lowers`] is not
/// used: the parent directories the layer creates without listing them are returned
/// instead (relative paths, sorted), for [`apply_implicit_parents`] once they are.
/// `position` follows the tar stream offset of the entry being created (progress).
pub(crate) fn unpack_cache_entry<R: Read + Send>(
    input: R,
    dest: &Path,
    opts: &UnpackOptions,
    position: &std::sync::atomic::AtomicU64,
) -> Result<(UnpackStats, Vec<Vec<u8>>)> {
    unpack_inner(input, dest, opts, None, Some(position))
}

pub(crate) use extract::apply_implicit_parents;

/// Rule 4: nothing is extracted into a cache layer (a ready one, or one the cache is
/// extracting or evicting), whichever path names it.
fn refuse_cache_layer(dest: &Path) -> Result<()> {
    match crate::immutable::cache_containing(dest) {
        Some(path) => Err(Error::ImmutableLayer { op: "extract a layer into it", path }),
        None => Ok(()),
    }
}

/// Like [`unpack`], calling `progress` with the number of blob bytes read so far.
///
/// # Errors
/// As [`unpack`]: the same variants, for the same reasons.
///
/// # Security
/// As [`unpack`](unpack#security): the same guarantees, and the same advice to set
/// [`UnpackOptions::max_uncompressed_bytes`] and [`UnpackOptions::max_entries`] for
/// untrusted input. `progress` only observes byte counts.
pub fn unpack_with_progress<R: Read + Send>(
    input: R,
    dest: &Path,
    opts: &UnpackOptions,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<UnpackStats> {
    refuse_cache_layer(dest)?;
    unpack_inner(input, dest, opts, Some(progress), None).map(|(stats, _)| stats)
}

/// What [`unpack_file`] did.
pub(crate) enum FileUnpacked {
    /// The fast path: file data copied out of the archive by the kernel, nothing hashed.
    Cloned {
        /// Archive entries processed.
        entries: u64,
        /// Bytes of regular-file data.
        file_bytes: u64,
        /// Bytes of the archive.
        bytes: u64,
    },
    /// An ordinary [`unpack`] (compressed, or not a regular file, or digests to check).
    Streamed(UnpackStats),
}

/// [`unpack`] of the blob in `file` from its position to its end, with a fast path for
/// an uncompressed tar in a regular file: file data is copied out of the archive with
/// `copy_file_range` instead of being read and written, so on a filesystem with reflinks
/// the data blocks of a block-aligned archive on the same filesystem are shared, not
/// copied. The fast path hashes nothing, so it is taken only when no digest is expected.
/// The file's position ends at its end, as after reading it.
pub(crate) fn unpack_file(file: &std::fs::File, dest: &Path, opts: &UnpackOptions) -> Result<FileUnpacked> {
    refuse_cache_layer(dest)?;
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::{FileExt, FileTypeExt};
    let mut f = file;
    let meta = file.metadata().map_err(|e| Error::io("fstat", "diff input", e))?;
    // Pipes, sockets and devices have no position to clone from: read them.
    if !meta.file_type().is_file() || meta.file_type().is_fifo() {
        return unpack(file, dest, opts).map(FileUnpacked::Streamed);
    }
    let start = f.stream_position().map_err(|e| Error::io("lseek", "diff input", e))?;
    let end = meta.len();
    if end > start && opts.expected_digest.is_none() && opts.expected_diff_id.is_none() {
        let mut magic = [0u8; 6];
        let n = file.read_at(&mut magic, start).map_err(|e| Error::Read { what: "layer blob", source: e })?;
        if pipeline::detect(&magic[..n])? == Compression::None {
            let _span = span!("unpack_file", dest = %dest.display(), bytes = end - start);
            let root = Root::open(dest)?;
            let mut ex = extract::Extractor::new(&root, opts);
            pipeline::run_file(file, start, end, opts, &mut ex)?;
            let c = ex.finish()?;
            f.seek(SeekFrom::Start(end)).map_err(|e| Error::io("lseek", "diff input", e))?;
            return Ok(FileUnpacked::Cloned { entries: c.entries, file_bytes: c.file_bytes, bytes: end - start });
        }
    }
    unpack(file, dest, opts).map(FileUnpacked::Streamed)
}

fn unpack_inner<R: Read + Send>(
    input: R,
    dest: &Path,
    opts: &UnpackOptions,
    progress: Option<&mut (dyn FnMut(u64) + Send)>,
    position: Option<&std::sync::atomic::AtomicU64>,
) -> Result<(UnpackStats, Vec<Vec<u8>>)> {
    let _span = span!("unpack", dest = %dest.display());
    let root = Root::open(dest)?;
    let mut ex = match position {
        Some(p) => extract::Extractor::for_cache(&root, opts, p),
        None => extract::Extractor::new(&root, opts),
    };
    let parsed = if opts.pipelined {
        pipeline::run_pipelined(input, opts, progress, &mut ex)?
    } else {
        pipeline::run_inline(input, opts, progress, &mut ex)?
    };
    let implicit = ex.take_implicit();
    let c = ex.finish()?;
    event!(entries = c.entries, file_bytes = c.file_bytes, compressed_bytes = parsed.compressed_bytes, digest = %parsed.digest, "unpacked");
    let stats = UnpackStats {
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
    };
    Ok((stats, implicit))
}
