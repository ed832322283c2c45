//! The crate's one error type.
//!
//! Every variant is something a caller can act on. OS errors always carry the
//! operation and the path, so a failure reads like a line of `strace`:
//! `openat /var/lib/x/tmp/1/usr/bin/env: Permission denied (os error 13)`.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `rootfs-cache`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The operation, named after the system call or library function (`openat`, `mkdirat`, ...).
        op: &'static str,
        /// The path the operation was applied to (for display; resolution is always fd-based).
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },

    /// Reading the input stream failed (fetcher I/O error, decompression error).
    #[error("reading {what}: {source}")]
    Read {
        /// What was being read (`layer blob`, `gzip stream`, ...).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An archive entry would be written, linked or resolved outside the destination.
    ///
    /// Raised for `..` components, absolute paths, symlinked parents and hardlinks whose
    /// target lies outside the root. Nothing is written for the offending entry.
    #[error("archive entry {entry:?} escapes the destination: {reason}")]
    PathEscape {
        /// The entry's path as written in the archive (lossy UTF-8, cut at 256 bytes).
        entry: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// Content did not hash to the digest it was supposed to have.
    #[error("digest mismatch: expected {expected}, found {found}")]
    DigestMismatch {
        /// The digest the caller asked for.
        expected: Digest,
        /// The digest of the bytes actually read.
        found: Digest,
    },

    /// A string is not a valid digest.
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest {
        /// The rejected input (truncated to 100 characters).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The archive is malformed: bad header checksum, bad number field, truncated data, ...
    #[error("invalid archive at byte {offset}: {reason}")]
    InvalidArchive {
        /// Offset in the uncompressed tar stream where the problem was found.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// A limit was exceeded: a configured one (uncompressed size, entry count, header
    /// size) or the kernel's (overlay lower directories, `mount(2)` option data).
    #[error("limit exceeded: {what} is larger than {limit}")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// The limit.
        limit: u64,
    },

    /// Something asked for is not supported: a feature of the input (a compression
    /// format, an entry type, a media type), a name or id that cannot be used (a lease id),
    /// or an operation the current state does not allow.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
    },

    /// A layer could not be made ready (fetched, verified, extracted). Every caller that
    /// waited for the same extraction gets the same cause.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer's digest.
        digest: Digest,
        /// Why.
        #[source]
        source: std::sync::Arc<Error>,
    },

    /// Something asked for does not exist: a tag, a blob, a manifest for the
    /// platform, a layout, a lease.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for, and where.
        what: String,
    },

    /// An image description (`oci-layout`, `index.json`, an index, a manifest) is
    /// malformed, a blob does not match its descriptor, or a state file of this crate (the
    /// [`CopyBackend`](crate::CopyBackend)'s) is corrupt. For a document read from a
    /// registry, `path` is its URL.
    #[error("invalid image data in {}: {reason}", path.display())]
    InvalidImage {
        /// The file holding it (or, from a registry, the URL it was read from).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A cache directory or a workspace is locked by another process (or another handle
    /// in this one): a [`RootfsCache`](crate::RootfsCache) owns its directory, and a
    /// [`Workspace`](crate::Workspace) handle its workspace, for as long as it lives.
    #[error("{} is in use by another process{}", path.display(), pid.map_or_else(String::new, |p| format!(" (pid {p})")))]
    Busy {
        /// The cache directory, or the workspace directory.
        path: PathBuf,
        /// The holder's process id, as it recorded it in the lock file, when known.
        pid: Option<u32>,
    },

    /// The operation was refused because it lacks a privilege (device nodes when unprivileged, ...).
    #[error("{op} {}: not permitted ({hint})", path.display())]
    NotPermitted {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// What to configure instead.
        hint: &'static str,
    },

    /// The kernel refused a mount or unmount. `detail` carries the filesystem's own
    /// explanation when it gave one (the new mount API queues messages such as
    /// `overlay: upper fs does not support tmpfile`), else it is empty.
    #[error("{op} {}: {source}{}", target.display(), if detail.is_empty() { String::new() } else { format!(" ({detail})") })]
    Mount {
        /// The failing step: `fsconfig lowerdir+`, `fsconfig create`, `move_mount`, `mount`, `umount2`, ...
        op: &'static str,
        /// The mount target.
        target: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
        /// The kernel's message, if any.
        detail: String,
    },

    /// The path is already mounted (a mount point, or a target a backend still holds
    /// mounted), or is a mount point inside a tree about to be folded or deleted; refusing
    /// to stack another mount on it or to cross into it.
    #[error("{} is already a mount point", path.display())]
    AlreadyMounted {
        /// The mount point, or the target still mounted.
        path: PathBuf,
    },

    /// A directory that must be empty (a fresh upper or work dir, a copy target) is not.
    #[error("{} is not empty", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
    },

    /// The operation would write into a layer of a [`RootfsCache`](crate::RootfsCache)
    /// (`<cache>/layers/<hex>/fs`, also while it is being extracted or evicted): ready
    /// layers are shared by every sandbox of their images and never modified, whichever
    /// way the path was reached (a workspace's lowers, a `convert`, a path through a
    /// symlink). Flatten writes into a private copy instead (`detach`, or a workspace
    /// over a directory of its own).
    #[error("{} is a cache layer, shared and immutable: refusing to {op}", path.display())]
    ImmutableLayer {
        /// What was refused (`apply into it`, `convert it`, ...).
        op: &'static str,
        /// The cache layer's `fs` directory.
        path: PathBuf,
    },

    /// A registry request failed on one host: a connection error or timeout (after the
    /// retries it was allowed), an error status, a malformed or oversized answer.
    /// Missing manifests and blobs (404) are [`Error::NotFound`] instead; refused
    /// credentials are [`Error::Unauthorized`].
    #[error("registry {host}: {op}: {reason}")]
    Registry {
        /// The host (`HOST[:PORT]`) that failed.
        host: String,
        /// What was asked (`GET /v2/library/alpine/manifests/3.20`, `token from https://auth…`).
        op: String,
        /// The HTTP status, when the failure is one.
        status: Option<u16>,
        /// What went wrong.
        reason: String,
    },

    /// A registry (or its token service) refused access: no credentials where they are
    /// required, credentials rejected, or a token rejected even when fresh.
    #[error("registry {host}: {op}: unauthorized: {reason}")]
    Unauthorized {
        /// The host (`HOST[:PORT]`) that refused.
        host: String,
        /// What was asked.
        op: String,
        /// The server's explanation, or ours (`no credentials for this host`).
        reason: String,
    },

    /// Content served by a registry host (a manifest, a blob) does not hash to the digest
    /// it was asked for. Nothing of it is cached; the host is tried last for that digest
    /// from then on, so a retry goes to the next host.
    #[error("registry {host}: {what} hashes to {found}, not {expected} (wrong bytes from this host)")]
    ContentMismatch {
        /// The host (`HOST[:PORT]`) that served it.
        host: String,
        /// What it was (`blob sha256:… of library/alpine`).
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of the bytes served.
        found: Digest,
    },

    /// Every host configured for a registry (mirrors from `hosts.toml`, then the registry
    /// itself) failed; each host's own error, in the order they were tried.
    #[error("{what}: every host failed: {}", failures.iter().map(|(h, e)| format!("[{h}] {e}")).collect::<Vec<_>>().join("; "))]
    AllHostsFailed {
        /// What was asked (`resolve docker.io/library/alpine:3.20`, `blob sha256:…`).
        what: String,
        /// `(host, error)` per host tried, in order.
        failures: Vec<(String, Error)>,
    },

    /// An image reference does not follow the docker grammar
    /// (`[HOST[:PORT]/]REPOSITORY[:TAG][@sha256:HEX]`).
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference {
        /// The rejected input (truncated to 300 characters).
        input: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A configuration file read by the crate (a containerd `hosts.toml`, a CA file it
    /// names, a Docker or podman auth file) is malformed or unusable.
    #[error("invalid configuration in {}: {reason}", path.display())]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A seekable layer's table of contents (zstd:chunked, eStargz) is malformed or
    /// inconsistent: a bad footer or position annotation, JSON that does not parse, chunks
    /// out of order, overlapping or outside the blob, a hardlink to nothing. Hostile names
    /// (`..`, absolute paths) are [`Error::PathEscape`] instead.
    #[error("layer {layer}: invalid table of contents: {reason}")]
    InvalidToc {
        /// The layer blob's digest.
        layer: Digest,
        /// What is wrong.
        reason: String,
    },

    /// A layer carries a table of contents (its footer says so) but nothing to verify it
    /// against: the manifest lacks the digest annotation (`…zstd-chunked.manifest-checksum`,
    /// `containerd.io/snapshot/stargz/toc.digest`). Such a TOC is never used; the layer
    /// can still be pulled whole.
    #[error("layer {layer}: {format} table of contents without a digest annotation: not trusted")]
    UnverifiedToc {
        /// The layer blob's digest.
        layer: Digest,
        /// The format its footer announces (`zstd:chunked`, `eStargz`).
        format: &'static str,
    },

    /// Bytes read from a range of a layer blob (its table of contents, a file chunk) are
    /// not what the manifest or the verified TOC say: they hash to another digest, do not
    /// decompress, or decompress to another length. They are never returned.
    #[error("layer {layer}: {what}: {problem} (expected {expected})")]
    BlobRangeMismatch {
        /// The layer blob's digest.
        layer: Digest,
        /// What was read, and where (`zstd:chunked TOC at blob bytes 300371+771`).
        what: String,
        /// The digest the bytes must have.
        expected: Digest,
        /// What is wrong: `hashes to sha256:…`, the decompressor's error, a wrong length.
        problem: String,
    },

    /// A range of a blob asked for ([`ImageFetcher::read_blob_range`](crate::ImageFetcher::read_blob_range))
    /// does not lie within the blob's size as its descriptor gives it.
    #[error("blob {layer}: bytes {offset}+{len} are not within its {size} bytes")]
    InvalidRange {
        /// The blob's digest.
        layer: Digest,
        /// The first byte asked for.
        offset: u64,
        /// How many bytes were asked for.
        len: u64,
        /// The blob's size, from its descriptor.
        size: u64,
    },

    /// A mount or workspace description is unusable as given (no lowers, a lower listed
    /// twice, upper and work on different filesystems, ...), as found by this crate's own
    /// checks rather than reported by the kernel.
    #[error("invalid overlay spec: {reason}")]
    InvalidSpec {
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Build an [`Error::Io`] from an operation, a path and an OS error.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        Error::Io { op, path: path.into(), source: source.into() }
    }

    /// The errno behind this error, if it is an OS error (looking through
    /// [`Error::Layer`]).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Read { source, .. } | Error::Mount { source, .. } => {
                source.raw_os_error()
            }
            Error::Layer { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The underlying error: itself, or for [`Error::Layer`] the cause, so callers can
    /// match on the kind of failure (`matches!(e.root(), Error::DigestMismatch { .. })`).
    pub fn root(&self) -> &Error {
        match self {
            Error::Layer { source, .. } => source.root(),
            e => e,
        }
    }
}
