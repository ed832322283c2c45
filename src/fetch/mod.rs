//! Where layer blobs come from: the [`ImageFetcher`] trait and the descriptors it returns.
//!
//! A fetcher answers two questions, and the cache asks them as rarely as it can:
//! [`ImageFetcher::resolve`] (a tag or digest to an [`ImageManifest`]; cheap, and skipped
//! entirely when a digest reference is already cached) and [`ImageFetcher::open_blob`]
//! (a layer's bytes as stored, compressed; called only on a cache miss, and the bytes are
//! verified against the descriptor's digest while they are extracted).
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

/// Why reading `blob` failed, according to the blob's source: after an extraction error
/// (a decompressor or tar error on wrong bytes), read the rest of the blob (at most
/// `layer.size` bytes); if the fetcher's reader then fails with one of the crate's errors
/// (a `Registry` stream ends in [`Error::ContentMismatch`](crate::Error::ContentMismatch)
/// naming the host that served the bytes), that is the real cause and is returned.
/// `None` when the rest reads cleanly (the bytes were right; the extraction error stands)
/// or fails some other way.
///
/// For the cache: pass the blob to extraction by `&mut` so that it can be asked here.
#[allow(dead_code)] // for the cache's pipeline (issue 12); tested here
pub(crate) fn source_error(blob: &mut dyn Read, layer: &Descriptor) -> Option<crate::error::Error> {
    let mut rest = blob.take(layer.size.saturating_add(1));
    match std::io::copy(&mut rest, &mut std::io::sink()) {
        Ok(_) => None,
        Err(e) => {
            let inner = e.into_inner()?;
            inner.downcast::<crate::error::Error>().ok().map(|b| *b)
        }
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

    #[test]
    fn the_source_names_the_cause_of_an_extraction_failure() {
        let layer = Descriptor { digest: Digest::of(b"x"), size: 10, media_type: String::new() };
        let mismatch = Error::ContentMismatch {
            host: "mirror:5000".into(),
            what: "blob".into(),
            expected: Digest::of(b"x"),
            found: Digest::of(b"y"),
        };
        match source_error(&mut Failing(Some(mismatch)), &layer) {
            Some(Error::ContentMismatch { host, .. }) => assert_eq!(host, "mirror:5000"),
            other => panic!("{other:?}"),
        }
        assert!(source_error(&mut Failing(None), &layer).is_none());
        assert!(source_error(&mut std::io::Cursor::new(vec![0u8; 100]), &layer).is_none());
    }
}
