//! [`OciLayout`]: an [`ImageFetcher`] over a local OCI image layout directory, as written
//! by `skopeo copy … oci:DIR:TAG`, `umoci`, `buildah push … oci:DIR`, `docker buildx
//! --output type=oci` (untarred) and others.
//!
//! ```text
//! DIR/
//!   oci-layout              {"imageLayoutVersion": "1.0.0"}: marks the directory as a layout
//!   index.json              entry point: descriptors, tagged by the annotation
//!                           "org.opencontainers.image.ref.name" (skopeo writes the tag alone)
//!   blobs/sha256/<hex>      every blob, named by the sha256 of its content:
//!                             image indexes / Docker manifest lists  (JSON, may nest)
//!                             image manifests (OCI or Docker schema 2)  (JSON)
//!                             image configs  (JSON, not read here)
//!                             layers  (tar, tar+gzip, tar+zstd; handed to the cache as stored)
//! ```
//!
//! Resolving a reference walks `index.json` → (index →)* image manifest, choosing one
//! entry per index by [`Platform`], and returns the manifest's digest and its layer
//! descriptors. Layer blobs are only opened later, by [`ImageFetcher::open_blob`], on a
//! cache miss.
//!
//! # Concurrency
//! Stateless apart from the directory path and the chosen platform: every call re-reads
//! what it needs and only ever reads (details on [`OciLayout`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::manifest::{
    Entry, Kind, MAX_INDEX_DEPTH, MAX_JSON_BYTES, Platform, RawDescriptor, RawDoc, Step, declared_kind, no_platform,
    parse_json, select, step,
};
use super::{Descriptor, ImageFetcher, ImageManifest};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// A local OCI image layout directory, read as an [`ImageFetcher`].
///
/// ```no_run
/// use rootfs_cache::{ImageFetcher, OciLayout};
/// # fn main() -> rootfs_cache::Result<()> {
/// let layout = OciLayout::open("/var/lib/images/alpine")?;
/// let image = layout.resolve("3.20")?; // or "@sha256:…"
/// for layer in &image.layers {
///     println!("{} {} bytes {}", layer.digest, layer.size, layer.media_type);
/// }
/// # Ok(()) }
/// ```
///
/// The layout is `oci-layout` (the version marker), `index.json` (descriptors, tagged by
/// their `org.opencontainers.image.ref.name` annotation) and `blobs/sha256/<hex>` (every
/// index, manifest, config and layer, named by its sha256). A reference is resolved by
/// walking `index.json` → (index →)* image manifest, one entry per index chosen by
/// [`Platform`].
///
/// # Security
/// The layout's contents are treated as untrusted input. Every JSON document read from
/// `blobs/` is bounded (4 MiB), its size checked against the descriptor that names it and
/// its sha256 checked against the digest it was reached by, so a tag can only resolve to
/// content its parent vouches for. Blob paths are built from parsed [`Digest`]s (64
/// lowercase hex digits), so nothing in a document can name a file outside
/// `blobs/sha256/`. Blobs are opened with `O_NONBLOCK` and must be regular files, so a
/// FIFO or device planted in `blobs/` cannot block or feed a resolve. The layout
/// directory itself (and symlinks in it) is trusted as a location, like any path handed
/// to the crate. Layer blobs are not hashed here: the cache verifies them while
/// extracting.
///
/// # Concurrency
/// An `OciLayout` holds nothing but the directory path and the chosen platform: no open
/// files, no cached index. Every call re-reads what it needs, so tags added or moved by
/// another process (`skopeo copy` into the same layout) are seen by the next
/// [`resolve`](ImageFetcher::resolve), and any number of threads may share one value. It
/// only ever reads. A resolve racing a writer that rewrites `index.json` in place (not by
/// rename) may see a torn document and fail with [`Error::InvalidImage`]; retrying is safe.
#[derive(Clone, Debug)]
pub struct OciLayout {
    dir: PathBuf,
    platform: Platform,
}

impl OciLayout {
    /// Open the layout at `dir`, choosing manifests for [`Platform::host`].
    ///
    /// Checks that `dir/oci-layout` exists and declares a 1.x layout version. Nothing else
    /// is read (or kept open) until [`resolve`](ImageFetcher::resolve).
    ///
    /// # Errors
    /// - [`Error::NotFound`] if `dir` or `dir/oci-layout` does not exist (not a layout);
    /// - [`Error::InvalidImage`] if `oci-layout` is not the expected JSON, not a regular
    ///   file or larger than 4 MiB;
    /// - [`Error::Unsupported`] for an `imageLayoutVersion` other than 1.x;
    /// - [`Error::Io`] when it cannot be read.
    pub fn open(dir: impl AsRef<Path>) -> Result<OciLayout> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join("oci-layout");
        let bytes = match read_json_file(&path, None)? {
            Some(b) => b,
            None if dir.exists() => {
                return Err(Error::NotFound {
                    what: format!("{} (is {} an OCI image layout?)", path.display(), dir.display()),
                });
            }
            None => return Err(Error::NotFound { what: format!("OCI layout directory {}", dir.display()) }),
        };
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct RawLayout {
            image_layout_version: String,
        }
        let raw: RawLayout = parse_json(&bytes, &path)?;
        if !raw.image_layout_version.starts_with("1.") {
            return Err(Error::Unsupported {
                what: format!("OCI layout version {:?} in {} (expected 1.x)", raw.image_layout_version, path.display()),
            });
        }
        Ok(OciLayout { dir, platform: Platform::host() })
    }

    /// The same layout, choosing manifests from indexes for `platform` instead of the host.
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// The layout directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The platform chosen from indexes.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The tags (`org.opencontainers.image.ref.name` annotations) of `index.json`, in file
    /// order, each once. They may be bare tags (`latest`, as skopeo writes) or full names
    /// (`docker.io/library/alpine:3.20`); either resolves as written.
    ///
    /// # Errors
    /// - [`Error::NotFound`] if `index.json` does not exist;
    /// - [`Error::InvalidImage`] if it is malformed (or its `schemaVersion` is not 2), not
    ///   a regular file or larger than 4 MiB;
    /// - [`Error::Io`] when it cannot be read.
    pub fn tags(&self) -> Result<Vec<String>> {
        let index = self.read_index_json()?;
        let mut tags: Vec<String> = Vec::new();
        for name in index.manifests.iter().flatten().filter_map(RawDescriptor::ref_name) {
            if !tags.iter().any(|t| t == name) {
                tags.push(name.to_string());
            }
        }
        Ok(tags)
    }

    fn index_json_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(digest.hex())
    }

    /// `layer`'s blob file, opened as [`open_regular`] does, and its path: `NotFound` when
    /// it is not in the layout, `InvalidImage` when its size is not `layer.size`.
    fn blob_file(&self, layer: &Descriptor) -> Result<(File, PathBuf)> {
        let path = self.blob_path(&layer.digest);
        let Some((file, size)) = open_regular(&path)? else {
            return Err(Error::NotFound {
                what: format!("blob {} in OCI layout {}", layer.digest, self.dir.display()),
            });
        };
        if size != layer.size {
            return Err(Error::InvalidImage {
                path,
                reason: format!("blob is {size} bytes, its descriptor says {}", layer.size),
            });
        }
        Ok((file, path))
    }

    fn read_index_json(&self) -> Result<RawDoc> {
        let path = self.index_json_path();
        let bytes = read_json_file(&path, None)?
            .ok_or_else(|| Error::NotFound { what: format!("index.json in OCI layout {}", self.dir.display()) })?;
        let doc: RawDoc = parse_json(&bytes, &path)?;
        if doc.schema_version != Some(2) {
            return Err(Error::InvalidImage {
                path,
                reason: format!("schemaVersion {:?}, expected 2", doc.schema_version),
            });
        }
        Ok(doc)
    }

    /// The entry a reference starts from: one descriptor of `index.json`, or a bare digest.
    fn start(&self, reference: &str) -> Result<Entry> {
        if let Some(d) = reference.strip_prefix('@') {
            let digest: Digest = d.parse()?;
            return self.start_from_digest(digest, None);
        }
        let index = self.read_index_json()?;
        let tagged: Vec<&RawDescriptor> =
            index.manifests.iter().flatten().filter(|m| m.ref_name() == Some(reference)).collect();
        if !tagged.is_empty() {
            // Several entries under one tag: a layout holding one manifest per platform
            // directly in index.json (the OCI layout spec allows it). Choose as in an index.
            let chosen = if tagged.len() == 1 {
                tagged[0]
            } else {
                select(&tagged, &self.platform).ok_or_else(|| self.no_platform(&tagged, "index.json", reference))?
            };
            return Entry::from_raw(chosen, &self.index_json_path(), "index.json entry");
        }
        if looks_like_digest(reference) {
            let digest: Digest = reference.parse()?;
            return self.start_from_digest(digest, Some(&index));
        }
        let mut tags: Vec<&str> = Vec::new();
        for t in index.manifests.iter().flatten().filter_map(RawDescriptor::ref_name) {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let known = match tags.len() {
            0 => "it has no tags".to_string(),
            n if n <= 10 => format!("tags: {}", tags.join(", ")),
            n => format!("tags: {}, … ({n} in all)", tags[..10].join(", ")),
        };
        Err(Error::NotFound { what: format!("tag {reference:?} in OCI layout {} ({known})", self.dir.display()) })
    }

    /// A digest reference: use `index.json`'s descriptor for it when there is one (its size
    /// and media type are then checked too), else the blob alone (a platform manifest
    /// inside an index, say), typed by its own `mediaType`.
    fn start_from_digest(&self, digest: Digest, index: Option<&RawDoc>) -> Result<Entry> {
        let owned;
        let index = match index {
            Some(i) => i,
            None => {
                owned = self.read_index_json()?;
                &owned
            }
        };
        let wanted = digest.to_string();
        if let Some(raw) = index.manifests.iter().flatten().find(|m| m.digest == wanted) {
            return Entry::from_raw(raw, &self.index_json_path(), "index.json entry");
        }
        Ok(Entry { digest, size: None, media_type: None })
    }

    fn no_platform(&self, entries: &[&RawDescriptor], within: &str, reference: &str) -> Error {
        no_platform(entries, &self.platform, within, reference, &format!("OCI layout {}", self.dir.display()))
    }

    /// Read a JSON blob, checking it is present, within bounds, of the descriptor's size
    /// and hashing to its name.
    fn read_json_blob(&self, entry: &Entry, what: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(&entry.digest);
        if let Some(size) = entry.size.filter(|&s| s > MAX_JSON_BYTES) {
            return Err(Error::InvalidImage {
                path,
                reason: format!("{what} {} is {size} bytes, more than the {MAX_JSON_BYTES} allowed", entry.digest),
            });
        }
        let bytes = read_json_file(&path, entry.size)?.ok_or_else(|| Error::NotFound {
            what: format!("{what} {} in OCI layout {} (no blob {})", entry.digest, self.dir.display(), path.display()),
        })?;
        let found = Digest::of(&bytes);
        if found != entry.digest {
            return Err(Error::InvalidImage {
                path,
                reason: format!("{what} content hashes to {found}, not to {} (corrupt or tampered blob)", entry.digest),
            });
        }
        Ok(bytes)
    }

    /// Walk from `entry` down through indexes to one image manifest.
    fn walk(&self, mut entry: Entry, reference: &str) -> Result<ImageManifest> {
        let source = format!("OCI layout {}", self.dir.display());
        for _ in 0..=MAX_INDEX_DEPTH {
            let declared = declared_kind(&entry)?;
            let what = if declared == Some(Kind::Index) { "index" } else { "manifest" };
            let bytes = self.read_json_blob(&entry, what)?;
            let path = self.blob_path(&entry.digest);
            match step(&entry, &bytes, &path, &self.platform, &source, reference)? {
                Step::Next(next) => entry = next,
                Step::Image(image) => return Ok(image),
            }
        }
        Err(Error::InvalidImage {
            path: self.blob_path(&entry.digest),
            reason: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
        })
    }
}

impl ImageFetcher for OciLayout {
    /// Resolve `reference` in this layout.
    ///
    /// `reference` is a tag, matched exactly against the `org.opencontainers.image.ref.name`
    /// annotations of `index.json` (a bare tag as skopeo writes it, or whatever full name
    /// another tool wrote), or a digest, `@sha256:<hex>` (or `sha256:<hex>` when no tag is
    /// spelled that way). A digest need not be listed in `index.json`: the platform
    /// manifest inside an index resolves too. Indexes (OCI, or Docker manifest lists),
    /// nested or not, are resolved to the entry for [`OciLayout::platform`]; an index
    /// without one, but with exactly one entry lacking a platform, resolves to that entry.
    ///
    /// # Errors
    /// - [`Error::NotFound`]: unknown tag, a missing `index.json`, manifest or index blob,
    ///   or no entry for the platform (each message names the layout, and what is
    ///   available);
    /// - [`Error::InvalidDigest`]: a malformed digest reference (and any algorithm but sha256);
    /// - [`Error::InvalidImage`]: malformed JSON, a wrong `schemaVersion`, a blob whose
    ///   sha256 or size differs from its descriptor, a document over 4 MiB, a `mediaType`
    ///   contradicting the descriptor's (or none, with fields that do not tell), a
    ///   malformed digest in a document, a blob that is not a regular file, indexes
    ///   nested more than 8 deep;
    /// - [`Error::Unsupported`]: a layer media type outside [`LAYER_MEDIA_TYPES`](super::LAYER_MEDIA_TYPES) (foreign /
    ///   non-distributable layers included; the message names the type and the layer), a
    ///   manifest type that is not an image manifest or index, a digest algorithm other
    ///   than sha256 in a document;
    /// - [`Error::Io`] when a file cannot be read.
    fn resolve(&self, reference: &str) -> Result<ImageManifest> {
        let entry = self.start(reference)?;
        self.walk(entry, reference)
    }

    /// Open `layer`'s blob, `blobs/sha256/<hex>`, as stored.
    ///
    /// Not hashed here: the cache verifies the digest while extracting.
    ///
    /// # Errors
    /// - [`Error::NotFound`] if the blob is not in the layout;
    /// - [`Error::InvalidImage`] if it is not a regular file or its size differs from
    ///   `layer.size`;
    /// - [`Error::Io`] when it cannot be opened or stat'ed.
    fn open_blob(&self, layer: &Descriptor) -> Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.blob_file(layer)?.0))
    }

    /// `len` bytes of `layer`'s blob from `offset`, read from the file with `pread`
    /// (nothing else of the blob is read). Not verified: see
    /// [`ImageFetcher::read_blob_range`].
    ///
    /// # Errors
    /// As [`open_blob`](ImageFetcher::open_blob) (the file's size is checked against
    /// `layer.size` the same way); [`Error::InvalidRange`] and [`Error::LimitExceeded`] as
    /// [`ImageFetcher::read_blob_range`]; [`Error::Io`] (`pread`) when the read fails or
    /// the file shrank meanwhile.
    fn read_blob_range(&self, layer: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        super::check_range(layer, offset, len)?;
        let (file, path) = self.blob_file(layer)?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset).map_err(|e| Error::io("pread", &path, e))?;
        Ok(buf)
    }
}

/// Whether a reference that matched no tag should be read as a digest: `ALG:HEX` with
/// at least 32 hex digits (no tag or image name looks like that).
fn looks_like_digest(reference: &str) -> bool {
    reference.split_once(':').is_some_and(|(alg, hex)| {
        !alg.is_empty()
            && alg.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && hex.len() >= 32
            && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

// ---------------------------------------------------------------------------------------
// Files

/// Open `path` read-only, non-blocking (a FIFO must not hang us), and check it is a
/// regular file. `Ok(None)` when it does not exist. Returns the file and its size.
fn open_regular(path: &Path) -> Result<Option<(File, u64)>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits() | nix::fcntl::OFlag::O_NOCTTY.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let meta = file.metadata().map_err(|e| Error::io("fstat", path, e))?;
    if !meta.file_type().is_file() {
        return Err(Error::InvalidImage { path: path.to_path_buf(), reason: "not a regular file".to_string() });
    }
    Ok(Some((file, meta.len())))
}

/// Read a whole JSON file of at most [`MAX_JSON_BYTES`], checking its size against
/// `expected` when given. `Ok(None)` when it does not exist.
fn read_json_file(path: &Path, expected: Option<u64>) -> Result<Option<Vec<u8>>> {
    let Some((file, size)) = open_regular(path)? else { return Ok(None) };
    let too_big = |n: u64| Error::InvalidImage {
        path: path.to_path_buf(),
        reason: format!("{n} bytes, more than the {MAX_JSON_BYTES} allowed for a JSON document"),
    };
    let wrong_size = |n: u64, e: u64| Error::InvalidImage {
        path: path.to_path_buf(),
        reason: format!("{n} bytes, its descriptor says {e}"),
    };
    if size > MAX_JSON_BYTES {
        return Err(too_big(size));
    }
    if let Some(e) = expected.filter(|&e| e != size) {
        return Err(wrong_size(size, e));
    }
    // The file may change under us: bound the read itself, not just the fstat size.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_JSON_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io("read", path, e))?;
    let n = bytes.len() as u64;
    if n > MAX_JSON_BYTES {
        return Err(too_big(n));
    }
    if let Some(e) = expected.filter(|&e| e != n) {
        return Err(wrong_size(n, e));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_reads_pread_the_blob_and_check_its_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 256) as u8).collect();
        let desc = Descriptor::new(Digest::of(&data), data.len() as u64, "");
        let layout = OciLayout::open(dir.path()).unwrap();
        assert!(matches!(layout.read_blob_range(&desc, 0, 1), Err(Error::NotFound { .. })));
        std::fs::write(layout.blob_path(&desc.digest), &data).unwrap();
        for (offset, len) in [(0, 100), (123_456, 65_536), (299_999, 1), (0, 300_000), (300_000, 0)] {
            let got = layout.read_blob_range(&desc, offset, len).unwrap();
            assert!(got == data[offset as usize..(offset + len) as usize], "{offset}+{len}");
        }
        assert!(matches!(
            layout.read_blob_range(&desc, 299_999, 2),
            Err(Error::InvalidRange { offset: 299_999, len: 2, size: 300_000, .. })
        ));
        assert!(matches!(layout.read_blob_range(&desc, 0, 1 << 30), Err(Error::LimitExceeded { .. })));
        // A blob file of another size than its descriptor says.
        let other = Descriptor::new(desc.digest, 400_000, "");
        assert!(matches!(layout.read_blob_range(&other, 0, 10), Err(Error::InvalidImage { .. })));
    }

    #[test]
    fn digest_like_references() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(looks_like_digest(&format!("sha256:{hex}")));
        assert!(looks_like_digest(&format!("sha512:{hex}{hex}")));
        for tag in ["latest", "3.20", "alpine:3.20", "docker.io/library/alpine:latest", "foo:abc", ":"] {
            assert!(!looks_like_digest(tag), "{tag}");
        }
    }
}
