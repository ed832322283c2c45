//! Where layer blobs come from: the [`ImageFetcher`] trait and the descriptors it returns.
//!
//! A fetcher answers two questions, and the cache asks them as rarely as it can:
//! [`ImageFetcher::resolve`] (a tag or digest to an [`ImageManifest`]; cheap, and skipped
//! entirely when a digest reference is already cached) and [`ImageFetcher::open_blob`]
//! (a layer's bytes as stored, compressed; called only on a cache miss, and the bytes are
//! verified against the descriptor's digest while they are extracted). Lazy pulls also
//! read ranges of a blob with [`ImageFetcher::read_blob_range`] (unverified bytes, which
//! the caller checks against a TOC's digests).
//!
//! Fetchers provided here:
//! - [`OciLayout`]: a local OCI image layout directory (`skopeo copy … oci:DIR:TAG`),
//!   choosing one manifest per index by [`Platform`].
//! - `Registry` (feature `registry`, on by default): the OCI Distribution API, with
//!   containerd's `hosts.toml` mirrors, registry auth, retries and resumed downloads.

mod manifest;
mod oci_layout;
#[cfg(feature = "registry")]
mod registry;

use std::collections::BTreeMap;
use std::io::Read;

use crate::digest::Digest;
use crate::error::Result;

pub use manifest::Platform;
pub use oci_layout::OciLayout;
#[cfg(feature = "registry")]
pub use registry::{Credential, Reference, Registry, RegistryOptions};

/// What a manifest says about one blob.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// The blob's content digest.
    pub digest: Digest,
    /// The blob's size in bytes, as stored.
    pub size: u64,
    /// Its media type (e.g. `application/vnd.oci.image.layer.v1.tar+gzip`).
    pub media_type: String,
    /// The descriptor's annotations, as the manifest lists them (empty when it has none).
    /// Seekable layers are announced here: zstd:chunked TOC position and checksum,
    /// eStargz `containerd.io/snapshot/stargz/toc.digest` (see [`read_toc`](crate::read_toc)).
    /// They are as trustworthy as the manifest, which is verified by digest.
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// A descriptor without annotations.
    pub fn new(digest: Digest, size: u64, media_type: impl Into<String>) -> Descriptor {
        Descriptor { digest, size, media_type: media_type.into(), annotations: BTreeMap::new() }
    }
}

/// An image, resolved to what the cache needs: its manifest digest and its layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    /// Digest of the image manifest (after choosing a platform in an index).
    pub digest: Digest,
    /// The layers, bottom first (manifest order).
    pub layers: Vec<Descriptor>,
}

/// A source of images: a local layout, a registry client, a runtime's own store.
///
/// Implementations must be safe to call from several threads at once.
pub trait ImageFetcher: Send + Sync {
    /// Resolve a reference (`TAG`, or `@sha256:<hex>`) to an image manifest.
    ///
    /// Expected to be cheap (a registry HEAD and a GET of a small JSON document).
    ///
    /// # Errors
    /// Whatever the source reports; [`crate::Error::NotFound`] for an unknown reference is
    /// the convention. [`RootfsCache::ensure`](crate::RootfsCache::ensure) returns these
    /// errors unchanged.
    fn resolve(&self, reference: &str) -> Result<ImageManifest>;

    /// The blob of `layer`, as stored (compressed). Called only on a cache miss; the
    /// cache verifies the digest while extracting, so a fetcher need not.
    ///
    /// # Errors
    /// Whatever the source reports; [`crate::Error::NotFound`] for a missing blob is the
    /// convention ([`OciLayout`] follows it). [`RootfsCache::ensure`](crate::RootfsCache::ensure)
    /// returns these errors wrapped in [`crate::Error::Layer`], naming the layer.
    fn open_blob(&self, layer: &Descriptor) -> Result<Box<dyn Read + Send>>;

    /// [`open_blob`](ImageFetcher::open_blob), reporting what happened on the way
    /// (retries, resumed downloads, fallbacks to the next host) to `observer`, for the
    /// cache's counters ([`CacheStats`](crate::CacheStats)). The cache calls this one.
    /// The default ignores `observer` and calls `open_blob`; a fetcher that retries or
    /// falls back overrides it. Events may be reported while the returned reader is read,
    /// from the reading thread.
    ///
    /// # Errors
    /// As [`open_blob`](ImageFetcher::open_blob).
    fn open_blob_observed(
        &self,
        layer: &Descriptor,
        observer: std::sync::Arc<dyn FetchObserver>,
    ) -> Result<Box<dyn Read + Send>> {
        let _ = observer;
        self.open_blob(layer)
    }

    /// `len` bytes of `layer`'s blob (as stored, compressed) from byte `offset`: exactly
    /// those, or an error. For lazy pulls, which read a layer's table of contents and
    /// then single chunks ([`read_toc`](crate::read_toc), [`read_chunk`](crate::read_chunk)
    /// take a closure calling this).
    ///
    /// The bytes are **not** verified here: a range cannot be checked against the blob's
    /// digest. The caller verifies what it reads (`read_toc` checks the TOC against the
    /// digest in the layer's annotations, `read_chunk` each chunk against the TOC).
    ///
    /// The default opens the whole blob with [`open_blob`](ImageFetcher::open_blob),
    /// skips `offset` bytes and reads `len`: correct for any fetcher, but it transfers
    /// everything up to the range. [`OciLayout`] reads the range from the file
    /// (`pread`), `Registry` asks for it with `Range`.
    ///
    /// # Errors
    /// - [`Error::InvalidRange`](crate::Error::InvalidRange) when `offset + len` passes
    ///   `layer.size`;
    /// - [`Error::LimitExceeded`](crate::Error::LimitExceeded) when `len` is over
    ///   [`MAX_RANGE_BYTES`];
    /// - [`Error::Read`](crate::Error::Read) when the blob ends before the range does (the
    ///   default implementation), and whatever opening or reading the blob returns.
    fn read_blob_range(&self, layer: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        check_range(layer, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let blob = self.open_blob(layer)?;
        read_range_of(blob, offset, len)
    }

    /// [`read_blob_range`](ImageFetcher::read_blob_range), reporting retries, resumed
    /// reads and host fallbacks to `observer`. The default ignores `observer` and calls
    /// `read_blob_range`; a fetcher that retries or falls back overrides it.
    ///
    /// # Errors
    /// As [`read_blob_range`](ImageFetcher::read_blob_range).
    fn read_blob_range_observed(
        &self,
        layer: &Descriptor,
        offset: u64,
        len: u64,
        observer: &dyn FetchObserver,
    ) -> Result<Vec<u8>> {
        let _ = observer;
        self.read_blob_range(layer, offset, len)
    }

    /// Several ranges of a blob: `ranges` as `(offset, len)`, in increasing order and
    /// not overlapping; their bytes, in order. The default reads them one by one with
    /// [`read_blob_range_observed`](ImageFetcher::read_blob_range_observed); a fetcher
    /// that can ask for them in one request overrides it ([`Registry`] sends one
    /// multi-range `GET` and falls back to one request per range where a server does not
    /// answer it). A lazy layer's small files come this way.
    ///
    /// # Errors
    /// As [`read_blob_range`](ImageFetcher::read_blob_range), for any of the ranges.
    fn read_blob_ranges_observed(
        &self,
        layer: &Descriptor,
        ranges: &[(u64, u64)],
        observer: &dyn FetchObserver,
    ) -> Result<Vec<Vec<u8>>> {
        ranges_one_by_one(self, layer, ranges, observer)
    }

    /// [`resolve`](ImageFetcher::resolve), reporting retries and host fallbacks to
    /// `observer`. The cache calls this one; the default ignores `observer`.
    ///
    /// # Errors
    /// As [`resolve`](ImageFetcher::resolve).
    fn resolve_observed(&self, reference: &str, observer: &dyn FetchObserver) -> Result<ImageManifest> {
        let _ = observer;
        self.resolve(reference)
    }
}

/// `ranges` of `layer`'s blob read one by one with
/// [`read_blob_range_observed`](ImageFetcher::read_blob_range_observed): what
/// [`ImageFetcher::read_blob_ranges_observed`] does where ranges cannot come together.
pub(crate) fn ranges_one_by_one<F: ImageFetcher + ?Sized>(
    fetcher: &F,
    layer: &Descriptor,
    ranges: &[(u64, u64)],
    observer: &dyn FetchObserver,
) -> Result<Vec<Vec<u8>>> {
    ranges.iter().map(|&(offset, len)| fetcher.read_blob_range_observed(layer, offset, len, observer)).collect()
}

/// The largest range [`ImageFetcher::read_blob_range`] reads at once (256 MiB): a range
/// is read into memory. TOCs and chunks are far smaller (see
/// [`MAX_CHUNK_BYTES`](crate::MAX_CHUNK_BYTES)).
pub const MAX_RANGE_BYTES: u64 = 256 << 20;

/// Check a range asked of `layer`'s blob: within its size, at most [`MAX_RANGE_BYTES`].
pub(crate) fn check_range(layer: &Descriptor, offset: u64, len: u64) -> Result<()> {
    if len > MAX_RANGE_BYTES {
        return Err(crate::error::Error::LimitExceeded { what: "blob range", limit: MAX_RANGE_BYTES });
    }
    if offset.checked_add(len).is_none_or(|end| end > layer.size) {
        return Err(crate::error::Error::InvalidRange { layer: layer.digest, offset, len, size: layer.size });
    }
    Ok(())
}

/// Skip `offset` bytes of `blob`, then read exactly `len`.
fn read_range_of(blob: impl Read, offset: u64, len: u64) -> Result<Vec<u8>> {
    use crate::error::Error;
    let mut blob = blob;
    let short = |at: u64| Error::Read {
        what: "blob range",
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the blob ended at byte {at}, before the end of bytes {offset}+{len}"),
        ),
    };
    let skipped = std::io::copy(&mut (&mut blob).take(offset), &mut std::io::sink())
        .map_err(|source| Error::Read { what: "blob range", source })?;
    if skipped < offset {
        return Err(short(skipped));
    }
    let mut buf = Vec::with_capacity(len.min(1 << 20) as usize);
    blob.take(len).read_to_end(&mut buf).map_err(|source| Error::Read { what: "blob range", source })?;
    if (buf.len() as u64) < len {
        return Err(short(offset + buf.len() as u64));
    }
    Ok(buf)
}

/// What a fetcher reports while it resolves or downloads, beyond the bytes themselves.
///
/// The cache implements it to count these events in [`CacheStats`](crate::CacheStats);
/// every method has an empty default. `host` is the host (`HOST[:PORT]`) the event
/// concerns. Implementations must be cheap and must not block.
pub trait FetchObserver: Send + Sync {
    /// A request to `host` failed and will be retried there (a connection error, a
    /// timeout, 408, 429 or 5xx).
    fn retry(&self, host: &str, reason: &str) {
        let _ = (host, reason);
    }
    /// A broken blob download was resumed at byte `offset` (with `Range`, or by skipping
    /// `offset` bytes where the server ignored it).
    fn resumed(&self, host: &str, offset: u64) {
        let _ = (host, offset);
    }
    /// `host` failed for good (dead, an error status, wrong bytes) and the next host
    /// configured for the registry is tried.
    fn fallback(&self, host: &str, reason: &str) {
        let _ = (host, reason);
    }
}

/// A [`FetchObserver`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl FetchObserver for NoObserver {}

/// The cause of a failed extraction of `layer`, according to the blob's source.
///
/// - `err` came from the blob reader itself (an `io::Error` carrying one of the crate's
///   errors, such as [`Error::ContentMismatch`](crate::Error::ContentMismatch) from a
///   `Registry` stream): that error, unwrapped.
/// - `err` is a complaint about the data (a decompressor or tar error, a digest
///   mismatch): wrong bytes early in a blob trip the decompressor long before the digest
///   could be known, so the rest of the blob (at most `layer.size` bytes) is read, and if
///   the reader then fails with a crate error (a `Registry` stream ends in
///   `ContentMismatch` naming the host that served the bytes, and demotes that host for
///   the digest), that is the cause.
/// - Anything else (a local I/O error, say), or a blob whose rest reads cleanly: `err`.
///
/// For the cache, which passes the blob to extraction by `&mut` so that it can ask here,
/// and tries a layer once more from a new `open_blob` when the cause is a
/// `ContentMismatch` (the next host serves it).
pub(crate) fn blame_source(err: crate::error::Error, blob: &mut dyn Read, layer: &Descriptor) -> crate::error::Error {
    use crate::error::Error;
    let err = match err {
        Error::Read { what, source } => match source.get_ref().is_some_and(|i| i.is::<Error>()) {
            true => return source.into_inner().and_then(|i| i.downcast::<Error>().ok()).map(|b| *b).expect("checked"),
            false => Error::Read { what, source },
        },
        e => e,
    };
    if !matches!(err, Error::Read { .. } | Error::InvalidArchive { .. } | Error::DigestMismatch { .. }) {
        return err;
    }
    let mut rest = blob.take(layer.size.saturating_add(1));
    match std::io::copy(&mut rest, &mut std::io::sink()) {
        Ok(_) => err,
        Err(e) => match e.into_inner().map(|i| i.downcast::<Error>()) {
            Some(Ok(cause)) => *cause,
            _ => err,
        },
    }
}

/// Media types of layers the cache can extract (tar, tar+gzip, tar+zstd; OCI and Docker).
pub const LAYER_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    struct Failing(Option<Error>);
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            match self.0.take() {
                Some(e) => Err(std::io::Error::other(e)),
                None => Err(std::io::Error::other("plain io error")),
            }
        }
    }

    fn mismatch() -> Error {
        Error::ContentMismatch {
            host: "mirror:5000".into(),
            what: "blob".into(),
            expected: Digest::of(b"x"),
            found: Digest::of(b"y"),
        }
    }

    /// A fetcher with one in-memory blob, using the default range read.
    struct Mem(Vec<u8>);
    impl ImageFetcher for Mem {
        fn resolve(&self, _: &str) -> Result<ImageManifest> {
            unreachable!()
        }
        fn open_blob(&self, _: &Descriptor) -> Result<Box<dyn Read + Send>> {
            Ok(Box::new(std::io::Cursor::new(self.0.clone())))
        }
    }

    #[test]
    fn the_default_range_read_skips_and_reads_exactly() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let desc = Descriptor::new(Digest::of(&data), data.len() as u64, "");
        let m = Mem(data.clone());
        for (offset, len) in [(0, 10), (0, 100_000), (50_000, 1234), (99_990, 10), (100_000, 0), (7, 0)] {
            let got = m.read_blob_range(&desc, offset, len).unwrap();
            assert!(got == data[offset as usize..(offset + len) as usize], "{offset}+{len}");
            let got = m.read_blob_range_observed(&desc, offset, len, &NoObserver).unwrap();
            assert_eq!(got.len() as u64, len);
        }
        for (offset, len) in [(99_991, 10), (100_001, 0), (u64::MAX, 2), (1, u64::MAX - 1)] {
            match m.read_blob_range(&desc, offset, len) {
                Err(Error::InvalidRange { offset: o, len: l, size: 100_000, .. }) => assert_eq!((o, l), (offset, len)),
                Err(Error::LimitExceeded { .. }) if len > MAX_RANGE_BYTES => {}
                r => panic!("{offset}+{len}: {r:?}"),
            }
        }
        let huge = Descriptor::new(desc.digest, 1 << 40, "");
        assert!(matches!(
            m.read_blob_range(&huge, 0, MAX_RANGE_BYTES + 1),
            Err(Error::LimitExceeded { what: "blob range", .. })
        ));
        // The blob is shorter than its descriptor: a read error, not short bytes.
        let long = Descriptor::new(desc.digest, 200_000, "");
        for offset in [99_995, 150_000] {
            match m.read_blob_range(&long, offset, 10) {
                Err(Error::Read { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{source}");
                }
                r => panic!("{r:?}"),
            }
        }
    }

    #[test]
    fn the_source_names_the_cause_of_an_extraction_failure() {
        let layer = Descriptor::new(Digest::of(b"x"), 10, "");
        let data_error = || Error::InvalidArchive { offset: 0, reason: "header checksum mismatch".into() };
        let named = |e: Error| matches!(e, Error::ContentMismatch { ref host, .. } if host == "mirror:5000");
        // The rest of the blob fails with the source's own error: that is the cause.
        assert!(named(blame_source(data_error(), &mut Failing(Some(mismatch())), &layer)));
        // The extraction error already carries it (the reader failed first).
        let carried = Error::Read { what: "layer blob", source: std::io::Error::other(mismatch()) };
        assert!(named(blame_source(carried, &mut std::io::empty(), &layer)));
        // Otherwise the extraction error stands.
        assert!(matches!(blame_source(data_error(), &mut Failing(None), &layer), Error::InvalidArchive { .. }));
        assert!(matches!(
            blame_source(data_error(), &mut std::io::Cursor::new(vec![0u8; 100]), &layer),
            Error::InvalidArchive { .. }
        ));
        // A local error is not blamed on the source, and the blob is not read for it.
        let local = Error::io("openat", "/x", std::io::Error::from_raw_os_error(28));
        assert!(matches!(blame_source(local, &mut Failing(Some(mismatch())), &layer), Error::Io { .. }));
    }
}
