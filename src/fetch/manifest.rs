//! Image documents shared by the fetchers ([`OciLayout`](super::OciLayout) and, with
//! feature `registry`, [`Registry`](super::Registry)): the JSON shapes of OCI image
//! indexes, image manifests and their Docker schema 2 equivalents, the media-type rules,
//! and [`Platform`] selection in an index.
//!
//! Everything here is pure: a document arrives as bytes already checked against the
//! digest (and size) it was reached by, and [`step`] says what it leads to: the next
//! descriptor to fetch (an index entry chosen by platform) or the image's layers. Where
//! the bytes come from (a file, an HTTP response) is the fetcher's business.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

use super::{Descriptor, ImageManifest, LAYER_MEDIA_TYPES};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// Largest JSON document (`oci-layout`, `index.json`, index, manifest) read from a
/// layout. Real manifests are a few KiB; multi-platform indexes a few tens.
pub(crate) const MAX_JSON_BYTES: u64 = 4 << 20;

/// Deepest chain of nested indexes followed before giving up. Content addressing rules
/// out cycles; this bounds the work an adversarial layout can ask for.
pub(crate) const MAX_INDEX_DEPTH: usize = 8;

/// The annotation that carries a tag in `index.json`.
pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(crate) const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// The operating system, CPU architecture and (optionally) variant an image is built for,
/// as spelled in OCI image indexes (`linux`, `amd64`, `v8`: Go's `GOOS`/`GOARCH` names).
///
/// Used by [`OciLayout`](super::OciLayout) (and the registry fetcher) to choose one manifest from an index. The default is
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
    pub(crate) fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
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

// ---------------------------------------------------------------------------------------
// JSON documents

/// A descriptor, as found in `index.json`, indexes and manifests.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawDescriptor {
    #[serde(default)]
    pub(crate) media_type: Option<String>,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    platform: Option<RawPlatform>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

impl RawDescriptor {
    pub(crate) fn ref_name(&self) -> Option<&str> {
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
pub(crate) struct RawDoc {
    #[serde(default)]
    pub(crate) schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    /// `None` when absent or `null` (Go's nil slice); either reads as empty.
    #[serde(default)]
    pub(crate) manifests: Option<Vec<RawDescriptor>>,
    /// As `manifests`.
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    /// Only checked for presence when sniffing an untyped document.
    #[serde(default)]
    config: Option<serde::de::IgnoredAny>,
}

/// A descriptor reached while walking: what the blob must be.
pub(crate) struct Entry {
    pub(crate) digest: Digest,
    /// `None` for a bare digest reference not listed in `index.json`.
    pub(crate) size: Option<u64>,
    pub(crate) media_type: Option<String>,
}

impl Entry {
    pub(crate) fn from_raw(raw: &RawDescriptor, path: &Path, what: &str) -> Result<Entry> {
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
pub(crate) enum Kind {
    /// An OCI image index or a Docker manifest list: choose an entry.
    Index,
    /// An OCI or Docker schema 2 image manifest: the layers.
    Image,
}

/// The kind of document a media type names; other types are refused.
pub(crate) fn kind_of(media_type: &str, digest: &Digest) -> Result<Kind> {
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
        annotations: raw.annotations.clone().unwrap_or_default(),
    })
}

fn is_foreign(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.docker.image.rootfs.foreign.")
        || media_type.starts_with("application/vnd.oci.image.layer.nondistributable.")
}

/// Choose one index entry for `platform`: the first whose platform matches, else the only
/// entry without a platform, if there is exactly one.
pub(crate) fn select<'a>(entries: &[&'a RawDescriptor], platform: &Platform) -> Option<&'a RawDescriptor> {
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
pub(crate) fn parse_digest(s: &str, path: &Path, what: &str) -> Result<Digest> {
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

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::InvalidImage { path: path.to_path_buf(), reason: e.to_string() })
}

/// Where one document leads.
pub(crate) enum Step {
    /// An index: the entry chosen for the platform, to fetch next.
    Next(Entry),
    /// An image manifest: the result.
    Image(ImageManifest),
}

/// The kind a descriptor declares, checked before its document is fetched: a descriptor
/// that says what it is need not be read to be refused (it may be a multi-GiB layer
/// tagged by mistake). `Ok(None)` when it declares nothing.
pub(crate) fn declared_kind(entry: &Entry) -> Result<Option<Kind>> {
    entry.media_type.as_deref().map(|m| kind_of(m, &entry.digest)).transpose()
}

/// Interpret one document (`bytes`, already verified against `entry`'s digest and size),
/// found at `path` (a file, or a URL for a registry): an index yields the entry for
/// `platform`, an image manifest its layers. `source` names where it came from in
/// messages (`OCI layout /x`, `registry 127.0.0.1:5000 repository deb`).
pub(crate) fn step(
    entry: &Entry,
    bytes: &[u8],
    path: &Path,
    platform: &Platform,
    source: &str,
    reference: &str,
) -> Result<Step> {
    let doc: RawDoc = parse_json(bytes, path)?;
    let media_type = media_type_of(entry, &doc, path)?;
    let kind = kind_of(&media_type, &entry.digest)?;
    check_schema(&doc, path)?;
    match kind {
        Kind::Index => {
            if doc.layers.is_some() {
                return Err(Error::InvalidImage {
                    path: path.to_path_buf(),
                    reason: format!("{media_type} with \"layers\""),
                });
            }
            let entries: Vec<&RawDescriptor> = doc.manifests.iter().flatten().collect();
            let within = format!("index {}", entry.digest);
            let chosen = select(&entries, platform)
                .ok_or_else(|| no_platform(&entries, platform, &within, reference, source))?;
            Ok(Step::Next(Entry::from_raw(chosen, path, "index entry")?))
        }
        Kind::Image => {
            if doc.manifests.is_some() {
                return Err(Error::InvalidImage {
                    path: path.to_path_buf(),
                    reason: format!("{media_type} with \"manifests\""),
                });
            }
            let layers = doc
                .layers
                .unwrap_or_default()
                .iter()
                .map(|l| layer(l, &entry.digest, path))
                .collect::<Result<Vec<_>>>()?;
            Ok(Step::Image(ImageManifest { digest: entry.digest, layers }))
        }
    }
}

/// The error for an index (or a set of `index.json` entries) without an entry for
/// `platform`, listing the platforms it has.
pub(crate) fn no_platform(
    entries: &[&RawDescriptor],
    platform: &Platform,
    within: &str,
    reference: &str,
    source: &str,
) -> Error {
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
            "manifest for platform {platform} in {within} for {reference:?} of {source} (available: {})",
            if available.is_empty() { "none".to_string() } else { available.join(", ") }
        ),
    }
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

    /// Layer annotations (zstd:chunked and eStargz TOC digests) reach the descriptor, for
    /// `OciLayout` and `Registry` alike (both walk documents with `step`).
    #[test]
    fn layer_annotations_reach_the_descriptor() {
        let layer = Digest::of(b"layer");
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{c}","size":1}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{layer}","size":5,
                 "annotations":{{"io.github.containers.zstd-chunked.manifest-checksum":"{layer}"}}}},
                 {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":5}}]}}"#,
            c = Digest::of(b"c"),
        );
        let entry = Entry { digest: Digest::of(doc.as_bytes()), size: None, media_type: None };
        let Step::Image(m) = step(&entry, doc.as_bytes(), Path::new("m"), &Platform::host(), "test", "t").unwrap()
        else {
            panic!("not an image")
        };
        let want: BTreeMap<String, String> =
            [("io.github.containers.zstd-chunked.manifest-checksum".to_string(), layer.to_string())].into();
        assert_eq!(m.layers[0].annotations, want);
        assert!(m.layers[1].annotations.is_empty());
    }
}
