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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use super::{Descriptor, ImageFetcher, ImageManifest, LAYER_MEDIA_TYPES};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Largest JSON document (`oci-layout`, `index.json`, index, manifest) read from a
/// layout. Real manifests are a few KiB; multi-platform indexes a few tens.
const MAX_JSON_BYTES: u64 = 4 << 20;

/// Deepest chain of nested indexes followed before giving up. Content addressing rules
/// out cycles; this bounds the work an adversarial layout can ask for.
const MAX_INDEX_DEPTH: usize = 8;

/// The annotation that carries a tag in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// The operating system, CPU architecture and (optionally) variant an image is built for,
/// as spelled in OCI image indexes (`linux`, `amd64`, `v8`: Go's `GOOS`/`GOARCH` names).
///
/// Used by [`OciLayout`] to choose one manifest from an index. The default is
/// [`Platform::host`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Platform {
    /// The operating system, e.g. `linux`.
    pub os: String,
    /// The CPU architecture, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// The CPU variant, e.g. `v7` for `arm`. `None` accepts any variant (the first
    /// matching index entry wins).
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from an OS and architecture, any variant.
    pub fn new(os: impl Into<String>, architecture: impl Into<String>) -> Self {
        Platform { os: os.into(), architecture: architecture.into(), variant: None }
    }

    /// The same platform, requiring `variant`.
    pub fn with_variant(mut self, variant: impl Into<String>) -> Self {
        self.variant = Some(variant.into());
        self
    }

    /// The platform this process runs on: `linux` and the Go name of the compile-time
    /// architecture (`x86_64` → `amd64`, `aarch64` → `arm64`, ...), any variant.
    pub fn host() -> Self {
        Platform::new("linux", go_arch(std::env::consts::ARCH, cfg!(target_endian = "little")))
    }

    /// Whether an index entry's platform satisfies this one.
    ///
    /// OS and architecture must be equal. A wanted variant must equal the entry's, except
    /// that `arm64` without a variant is `arm64/v8` (the OCI spec's normalisation); no
    /// wanted variant accepts any.
    fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        if self.os != os || self.architecture != architecture {
            return false;
        }
        fn normal<'a>(architecture: &str, variant: Option<&'a str>) -> Option<&'a str> {
            if architecture == "arm64" && variant.is_none() { Some("v8") } else { variant }
        }
        match &self.variant {
            None => true,
            Some(want) => normal(architecture, Some(want)) == normal(architecture, variant),
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform::host()
    }
}

impl fmt::Display for Platform {
    /// `os/architecture[/variant]`, as `docker --platform` spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = Error;

    /// Parse `os/architecture[/variant]`, e.g. `linux/arm64` or `linux/arm/v7`.
    ///
    /// # Errors
    /// [`Error::Unsupported`] for any other shape (empty parts, more than three parts).
    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform::new(os, arch)),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform::new(os, arch).with_variant(variant))
            }
            _ => Err(Error::Unsupported { what: format!("platform {s:?} (expected OS/ARCH or OS/ARCH/VARIANT)") }),
        }
    }
}

/// Go's `GOARCH` name for a Rust `target_arch` (the spelling OCI indexes use).
fn go_arch(rust_arch: &str, little_endian: bool) -> &str {
    match (rust_arch, little_endian) {
        ("x86_64", _) => "amd64",
        ("x86", _) => "386",
        ("aarch64", _) => "arm64",
        ("arm", _) => "arm",
        ("powerpc64", true) => "ppc64le",
        ("powerpc64", false) => "ppc64",
        ("powerpc", _) => "ppc",
        ("mips", true) => "mipsle",
        ("mips64", true) => "mips64le",
        ("loongarch64", _) => "loong64",
        // s390x, riscv64, mips, mips64, sparc64, ...: the same name in both.
        (other, _) => other,
    }
}

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
        let available: Vec<String> = entries
            .iter()
            .map(|e| match &e.platform {
                Some(p) => {
                    let mut s = format!("{}/{}", p.os, p.architecture);
                    if let Some(v) = &p.variant {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                }
                None => "(no platform)".to_string(),
            })
            .collect();
        Error::NotFound {
            what: format!(
                "manifest for platform {} in {within} for {reference:?} of OCI layout {} (available: {})",
                self.platform,
                self.dir.display(),
                if available.is_empty() { "none".to_string() } else { available.join(", ") }
            ),
        }
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
        for _ in 0..=MAX_INDEX_DEPTH {
            // A descriptor that says what it is need not be read to be refused (it may be a
            // multi-GiB layer tagged by mistake).
            let declared = entry.media_type.as_deref().map(|m| kind_of(m, &entry.digest)).transpose()?;
            let what = if declared == Some(Kind::Index) { "index" } else { "manifest" };
            let bytes = self.read_json_blob(&entry, what)?;
            let path = self.blob_path(&entry.digest);
            let doc: RawDoc = parse_json(&bytes, &path)?;
            let media_type = media_type_of(&entry, &doc, &path)?;
            let kind = kind_of(&media_type, &entry.digest)?;
            check_schema(&doc, &path)?;
            match kind {
                Kind::Index => {
                    if doc.layers.is_some() {
                        return Err(Error::InvalidImage { path, reason: format!("{media_type} with \"layers\"") });
                    }
                    let entries: Vec<&RawDescriptor> = doc.manifests.iter().flatten().collect();
                    let within = format!("index {}", entry.digest);
                    let chosen = select(&entries, &self.platform)
                        .ok_or_else(|| self.no_platform(&entries, &within, reference))?;
                    entry = Entry::from_raw(chosen, &path, "index entry")?;
                }
                Kind::Image => {
                    if doc.manifests.is_some() {
                        return Err(Error::InvalidImage { path, reason: format!("{media_type} with \"manifests\"") });
                    }
                    let layers = doc
                        .layers
                        .unwrap_or_default()
                        .iter()
                        .map(|l| layer(l, &entry.digest, &path))
                        .collect::<Result<Vec<_>>>()?;
                    return Ok(ImageManifest { digest: entry.digest, layers });
                }
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
    /// - [`Error::Unsupported`]: a layer media type outside [`LAYER_MEDIA_TYPES`] (foreign /
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
        Ok(Box::new(file))
    }
}

// ---------------------------------------------------------------------------------------
// JSON documents

/// A descriptor, as found in `index.json`, indexes and manifests.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<RawPlatform>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

impl RawDescriptor {
    fn ref_name(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Deserialize)]
struct RawPlatform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

/// An index or an image manifest: the fields needed to tell them apart and walk them.
/// Unknown fields are ignored; duplicate fields are rejected by serde.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDoc {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    /// `None` when absent or `null` (Go's nil slice); either reads as empty.
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    /// As `manifests`.
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    /// Only checked for presence when sniffing an untyped document.
    #[serde(default)]
    config: Option<serde::de::IgnoredAny>,
}

/// A descriptor reached while walking: what the blob must be.
struct Entry {
    digest: Digest,
    /// `None` for a bare digest reference not listed in `index.json`.
    size: Option<u64>,
    media_type: Option<String>,
}

impl Entry {
    fn from_raw(raw: &RawDescriptor, path: &Path, what: &str) -> Result<Entry> {
        Ok(Entry {
            digest: parse_digest(&raw.digest, path, what)?,
            size: Some(raw.size),
            media_type: raw.media_type.clone(),
        })
    }
}

/// The media type of a document: its descriptor's and its own must agree when both are
/// given (a mismatch is how a manifest is passed off as an index, or the reverse). With
/// neither, the shape decides.
fn media_type_of(entry: &Entry, doc: &RawDoc, path: &Path) -> Result<String> {
    match (&entry.media_type, &doc.media_type) {
        (Some(d), Some(m)) if d != m => Err(Error::InvalidImage {
            path: path.to_path_buf(),
            reason: format!("mediaType {m:?} contradicts the descriptor's {d:?}"),
        }),
        (Some(t), _) | (None, Some(t)) => Ok(t.clone()),
        (None, None) if doc.manifests.is_some() && doc.layers.is_none() => Ok(OCI_INDEX.to_string()),
        (None, None) if doc.layers.is_some() && doc.config.is_some() && doc.manifests.is_none() => {
            Ok(OCI_MANIFEST.to_string())
        }
        (None, None) => Err(Error::InvalidImage {
            path: path.to_path_buf(),
            reason: "no mediaType, and neither an index nor an image manifest by its fields".to_string(),
        }),
    }
}

/// What a manifest-like document is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// An OCI image index or a Docker manifest list: choose an entry.
    Index,
    /// An OCI or Docker schema 2 image manifest: the layers.
    Image,
}

/// The kind of document a media type names; other types are refused.
fn kind_of(media_type: &str, digest: &Digest) -> Result<Kind> {
    match media_type {
        OCI_INDEX | DOCKER_MANIFEST_LIST => Ok(Kind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(Kind::Image),
        m if DOCKER_SCHEMA1.contains(&m) => Err(Error::Unsupported {
            what: format!("Docker image manifest schema 1 ({m}) {digest}; convert it with `skopeo copy --format oci`"),
        }),
        m => Err(Error::Unsupported {
            what: format!("manifest media type {m:?} of {digest} (not an image manifest or index)"),
        }),
    }
}

fn check_schema(doc: &RawDoc, path: &Path) -> Result<()> {
    if doc.schema_version == Some(2) {
        return Ok(());
    }
    Err(Error::InvalidImage {
        path: path.to_path_buf(),
        reason: format!("schemaVersion {:?}, expected 2", doc.schema_version),
    })
}

/// Parse one layer descriptor of manifest `manifest` (stored at `path`).
fn layer(raw: &RawDescriptor, manifest: &Digest, path: &Path) -> Result<Descriptor> {
    let media_type = raw.media_type.as_deref().unwrap_or("");
    if !LAYER_MEDIA_TYPES.contains(&media_type) {
        let kind = if is_foreign(media_type) { "non-distributable (foreign) layer" } else { "layer" };
        return Err(Error::Unsupported {
            what: format!(
                "{kind} media type {media_type:?} of layer {} in image manifest {manifest} \
                 (supported: tar, tar+gzip, tar+zstd)",
                raw.digest
            ),
        });
    }
    Ok(Descriptor {
        digest: parse_digest(&raw.digest, path, "layer")?,
        size: raw.size,
        media_type: media_type.to_string(),
    })
}

fn is_foreign(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.docker.image.rootfs.foreign.")
        || media_type.starts_with("application/vnd.oci.image.layer.nondistributable.")
}

/// Choose one index entry for `platform`: the first whose platform matches, else the only
/// entry without a platform, if there is exactly one.
fn select<'a>(entries: &[&'a RawDescriptor], platform: &Platform) -> Option<&'a RawDescriptor> {
    let matching = entries
        .iter()
        .find(|e| e.platform.as_ref().is_some_and(|p| platform.matches(&p.os, &p.architecture, p.variant.as_deref())));
    if let Some(e) = matching {
        return Some(e);
    }
    let mut unplatformed = entries.iter().filter(|e| e.platform.is_none());
    match (unplatformed.next(), unplatformed.next()) {
        (Some(e), None) => Some(e),
        _ => None,
    }
}

/// A digest found in a document. Other algorithms are [`Error::Unsupported`] (the crate
/// keys everything by sha256); a malformed sha256 is [`Error::InvalidImage`].
fn parse_digest(s: &str, path: &Path, what: &str) -> Result<Digest> {
    match s.parse::<Digest>() {
        Ok(d) => Ok(d),
        Err(Error::InvalidDigest { reason, .. }) => match s.split_once(':') {
            Some((alg, _)) if alg != "sha256" && !alg.is_empty() => Err(Error::Unsupported {
                what: format!(
                    "digest algorithm {alg:?} of {what} {} in {} (only sha256 is supported)",
                    truncate(s),
                    path.display()
                ),
            }),
            _ => Err(Error::InvalidImage {
                path: path.to_path_buf(),
                reason: format!("{what} digest {:?}: {reason}", truncate(s)),
            }),
        },
        Err(e) => Err(e),
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 100 { s.to_string() } else { format!("{}…", s.chars().take(100).collect::<String>()) }
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

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::InvalidImage { path: path.to_path_buf(), reason: e.to_string() })
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
    fn go_arch_names() {
        for (rust, le, go) in [
            ("x86_64", true, "amd64"),
            ("x86", true, "386"),
            ("aarch64", true, "arm64"),
            ("arm", true, "arm"),
            ("powerpc64", true, "ppc64le"),
            ("powerpc64", false, "ppc64"),
            ("s390x", false, "s390x"),
            ("riscv64", true, "riscv64"),
            ("mips64", true, "mips64le"),
            ("mips64", false, "mips64"),
            ("loongarch64", true, "loong64"),
        ] {
            assert_eq!(go_arch(rust, le), go, "{rust} little_endian={le}");
        }
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert_eq!(host.variant, None);
        assert_eq!(host, Platform::default());
    }

    #[test]
    fn platform_matching() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        // (wanted, entry os, arch, variant, matches)
        for (want, os, arch, variant, ok) in [
            ("linux/amd64", "linux", "amd64", None, true),
            ("linux/amd64", "linux", "amd64", Some("v3"), true),
            ("linux/amd64", "linux", "arm64", None, false),
            ("linux/amd64", "windows", "amd64", None, false),
            ("linux/arm64", "linux", "arm64", Some("v8"), true),
            ("linux/arm64/v8", "linux", "arm64", None, true),
            ("linux/arm64/v8", "linux", "arm64", Some("v8"), true),
            ("linux/arm64/v9", "linux", "arm64", None, false),
            ("linux/arm/v7", "linux", "arm", Some("v7"), true),
            ("linux/arm/v7", "linux", "arm", Some("v6"), false),
            ("linux/arm/v7", "linux", "arm", None, false),
        ] {
            assert_eq!(p(want).matches(os, arch, variant), ok, "{want} vs {os}/{arch}/{variant:?}");
        }
    }

    #[test]
    fn platform_parse_and_display() {
        for s in ["linux/amd64", "linux/arm/v7"] {
            assert_eq!(s.parse::<Platform>().unwrap().to_string(), s);
        }
        for bad in ["", "linux", "linux/", "/amd64", "linux/arm/", "a/b/c/d"] {
            assert!(matches!(bad.parse::<Platform>(), Err(Error::Unsupported { .. })), "{bad:?}");
        }
    }

    fn desc(platform: Option<(&str, &str, Option<&str>)>) -> RawDescriptor {
        RawDescriptor {
            media_type: Some(OCI_MANIFEST.to_string()),
            digest: String::new(),
            size: 0,
            platform: platform.map(|(os, arch, v)| RawPlatform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: v.map(str::to_string),
            }),
            annotations: None,
        }
    }

    #[test]
    fn selection() {
        let amd = desc(Some(("linux", "amd64", None)));
        let arm = desc(Some(("linux", "arm64", Some("v8"))));
        let arm2 = desc(Some(("linux", "arm64", None)));
        let none = desc(None);
        let none2 = desc(None);
        let unknown = desc(Some(("unknown", "unknown", None)));
        let amd64 = Platform::new("linux", "amd64");
        let arm64 = Platform::new("linux", "arm64");
        let ptr = |d: Option<&RawDescriptor>| d.map(|d| d as *const RawDescriptor);
        assert_eq!(ptr(select(&[&arm, &amd], &amd64)), ptr(Some(&amd)));
        assert_eq!(ptr(select(&[&arm, &amd], &arm64)), ptr(Some(&arm)));
        // First match wins.
        assert_eq!(ptr(select(&[&arm2, &arm], &arm64)), ptr(Some(&arm2)));
        // No match: the one entry without a platform, if there is exactly one.
        assert_eq!(ptr(select(&[&none], &amd64)), ptr(Some(&none)));
        assert_eq!(ptr(select(&[&arm, &none], &amd64)), ptr(Some(&none)));
        assert_eq!(ptr(select(&[&none, &none2], &amd64)), None);
        assert_eq!(ptr(select(&[&arm, &unknown], &amd64)), None);
        assert_eq!(ptr(select(&[], &amd64)), None);
        // A platform match beats the unplatformed entry.
        assert_eq!(ptr(select(&[&none, &amd], &amd64)), ptr(Some(&amd)));
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

    #[test]
    fn document_digests() {
        let p = Path::new("/l/index.json");
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(parse_digest(&format!("sha256:{hex}"), p, "layer").is_ok());
        match parse_digest(&format!("sha512:{hex}{hex}"), p, "layer") {
            Err(Error::Unsupported { what }) => assert!(what.contains("sha512"), "{what}"),
            r => panic!("{:?}", r.map(|d| d.to_string())),
        }
        for bad in ["sha256:abc", "", "nohex", &format!("sha256:{}", hex.to_uppercase())] {
            assert!(matches!(parse_digest(bad, p, "layer"), Err(Error::InvalidImage { .. })), "{bad:?}");
        }
    }

    #[test]
    fn media_type_rules() {
        let p = Path::new("/x");
        let e = |mt: Option<&str>| Entry { digest: Digest::of(b""), size: None, media_type: mt.map(str::to_string) };
        let d = |json: &str| serde_json::from_str::<RawDoc>(json).unwrap();
        let manifest = d(r#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"y","size":1},"layers":[]}"#);
        let index = d(r#"{"schemaVersion":2,"manifests":[]}"#);
        let typed = d(&format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","layers":[]}}"#));
        assert_eq!(media_type_of(&e(Some(OCI_MANIFEST)), &manifest, p).unwrap(), OCI_MANIFEST);
        assert_eq!(media_type_of(&e(None), &manifest, p).unwrap(), OCI_MANIFEST);
        assert_eq!(media_type_of(&e(None), &index, p).unwrap(), OCI_INDEX);
        assert_eq!(media_type_of(&e(None), &typed, p).unwrap(), DOCKER_MANIFEST);
        assert_eq!(media_type_of(&e(Some(DOCKER_MANIFEST)), &typed, p).unwrap(), DOCKER_MANIFEST);
        assert!(matches!(media_type_of(&e(Some(OCI_INDEX)), &typed, p), Err(Error::InvalidImage { .. })));
        assert!(matches!(media_type_of(&e(None), &d("{}"), p), Err(Error::InvalidImage { .. })));
    }
}
