//! `OciLayout` against real layouts (written by `umoci` and `skopeo`) and hand-written
//! ones (nested indexes, Docker media types, and every way a layout can be wrong).
//!
//! The umoci/skopeo tests skip (or fail under `CI`) when the tools are missing.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_cache::{
    Descriptor, Digest, Error, ImageFetcher, ImageManifest, OciLayout, Platform, UnpackOptions, unpack,
};
use serde_json::{Value, json};
use support::{Ent, Fmt};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn options(digest: Digest) -> UnpackOptions {
    let mut o = if support::is_root() { UnpackOptions::default() } else { UnpackOptions::rootless() };
    o.expected_digest = Some(digest);
    o
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

// ---------------------------------------------------------------------------------------
// Real layouts: umoci and skopeo

const ROUNDS: usize = 3;

fn have_tools(test: &str) -> bool {
    support::require_tools(test, &["umoci", "skopeo"])
}

/// An image `t` in `t/L` with `ROUNDS` layers made by `umoci unpack` → edit → `umoci repack`.
fn umoci_image(t: &Path) -> PathBuf {
    let l = t.join("L");
    let b = t.join("B");
    let image = format!("{}:t", l.display());
    support::run(Command::new("umoci").args(["init", "--layout"]).arg(&l));
    support::run(Command::new("umoci").args(["new", "--image", &image]));
    for i in 0..ROUNDS {
        let mut unpack = Command::new("umoci");
        unpack.arg("unpack");
        if !support::is_root() {
            unpack.arg("--rootless");
        }
        support::run(unpack.args(["--image", &image]).arg(&b));
        let r = b.join("rootfs");
        std::fs::write(r.join(format!("layer{i}.txt")), format!("layer {i}\n").repeat(100 * (i + 1))).unwrap();
        std::fs::create_dir_all(r.join(format!("d{i}/sub"))).unwrap();
        std::fs::write(r.join(format!("d{i}/sub/f")), support::pseudo_random(i as u64, 50_000)).unwrap();
        std::os::unix::fs::symlink(format!("layer{i}.txt"), r.join(format!("link{i}"))).unwrap();
        if i > 0 {
            std::fs::write(r.join("layer0.txt"), format!("changed in {i}\n")).unwrap();
        }
        support::run(Command::new("umoci").args(["repack", "--image", &image]).arg(&b));
        std::fs::remove_dir_all(&b).unwrap();
    }
    l
}

fn skopeo(args: &[&str], from: &str, to: &str) {
    support::run(Command::new("skopeo").arg("copy").arg("--quiet").args(args).arg(from).arg(to));
}

fn skopeo_supports(flag: &str) -> bool {
    let help = Command::new("skopeo").args(["copy", "--help"]).output().unwrap();
    String::from_utf8_lossy(&help.stdout).contains(flag)
}

fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

/// Everything a caller relies on, checked against the files of the layout: tag and digest
/// resolution agree with index.json and the manifest blob, layer descriptors match the
/// blobs, `open_blob` gives exactly the blob, and every layer unpacks with its digest
/// verified. Returns the manifest.
fn check_real_layout(dir: &Path, tag: &str, layer_media_type: &str) -> ImageManifest {
    let layout = OciLayout::open(dir).unwrap();
    assert!(layout.tags().unwrap().iter().any(|t| t == tag), "{tag} not in {:?}", layout.tags().unwrap());

    let m = layout.resolve(tag).unwrap();
    assert_eq!(layout.resolve(&format!("@{}", m.digest)).unwrap(), m, "@digest");
    assert_eq!(layout.resolve(&m.digest.to_string()).unwrap(), m, "digest without @");

    // index.json says the same.
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["annotations"][REF_NAME] == tag)
        .unwrap_or_else(|| panic!("{tag} not in index.json"));
    assert_eq!(entry["digest"], m.digest.to_string());

    // The manifest blob lists the same layers.
    let blob = |d: &Digest| dir.join("blobs/sha256").join(d.hex());
    let manifest_bytes = std::fs::read(blob(&m.digest)).unwrap();
    assert_eq!(Digest::of(&manifest_bytes), m.digest);
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    let listed: Vec<Descriptor> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| Descriptor {
            digest: l["digest"].as_str().unwrap().parse().unwrap(),
            size: l["size"].as_u64().unwrap(),
            media_type: l["mediaType"].as_str().unwrap().to_string(),
            annotations: l["annotations"]
                .as_object()
                .map(|a| a.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect())
                .unwrap_or_default(),
        })
        .collect();
    assert_eq!(m.layers, listed);
    assert_eq!(m.layers.len(), ROUNDS);

    let t = support::tempdir();
    for (i, l) in m.layers.iter().enumerate() {
        assert_eq!(l.media_type, layer_media_type, "layer {i}");
        let bytes = std::fs::read(blob(&l.digest)).unwrap();
        assert_eq!(Digest::of(&bytes), l.digest, "layer {i} digest");
        assert_eq!(bytes.len() as u64, l.size, "layer {i} size");
        assert_eq!(read_all(layout.open_blob(l).unwrap()), bytes, "layer {i} open_blob");

        let dest = t.path().join(i.to_string());
        std::fs::create_dir(&dest).unwrap();
        let stats = unpack(layout.open_blob(l).unwrap(), &dest, &options(l.digest))
            .unwrap_or_else(|e| panic!("layer {i} ({}): {e}", l.media_type));
        assert_eq!(stats.digest, l.digest);
        assert_eq!(std::fs::read_link(dest.join(format!("link{i}"))).unwrap(), Path::new(&format!("layer{i}.txt")));
        assert_eq!(std::fs::read(dest.join(format!("d{i}/sub/f"))).unwrap(), support::pseudo_random(i as u64, 50_000));
    }
    m
}

#[test]
fn umoci_layout() {
    if !have_tools("umoci_layout") {
        return;
    }
    let t = support::tempdir();
    let l = umoci_image(t.path());
    check_real_layout(&l, "t", OCI_GZIP);
}

#[test]
fn skopeo_copies_gzip_zstd_and_docker() {
    if !have_tools("skopeo_copies_gzip_zstd_and_docker") {
        return;
    }
    let t = support::tempdir();
    let l = umoci_image(t.path());
    let l2 = t.path().join("L2");
    let original = check_real_layout(&l, "t", OCI_GZIP);

    // As is: the same manifest, under a new tag in a new layout.
    skopeo(&[], &oci(&l, "t"), &oci(&l2, "t2"));
    let copy = check_real_layout(&l2, "t2", OCI_GZIP);
    assert_eq!(copy, original);

    // Recompressed to zstd. Into a layout of its own: copied into L2, skopeo would reuse
    // the gzip blobs already there (same uncompressed content) and write a gzip manifest.
    let l3 = t.path().join("L3");
    skopeo(&["--dest-compress", "--dest-compress-format", "zstd"], &oci(&l, "t"), &oci(&l3, "zstd"));
    let zstd = check_real_layout(&l3, "zstd", OCI_ZSTD);
    assert_ne!(zstd.digest, original.digest);

    // Docker schema 2 media types, stored as is in the OCI layout.
    skopeo(&["--format", "v2s2"], &oci(&l, "t"), &oci(&l2, "docker"));
    let docker = check_real_layout(&l2, "docker", DOCKER_GZIP);
    let docker_json: Value =
        serde_json::from_slice(&std::fs::read(l2.join("blobs/sha256").join(docker.digest.hex())).unwrap()).unwrap();
    assert_eq!(docker_json["mediaType"], DOCKER_MANIFEST);
    assert_eq!(
        docker.layers.iter().map(|d| d.digest).collect::<Vec<_>>(),
        original.layers.iter().map(|d| d.digest).collect::<Vec<_>>(),
        "same gzip blobs"
    );

    let tags = OciLayout::open(&l2).unwrap().tags().unwrap();
    assert_eq!(tags, ["t2", "docker"], "two tags in one layout");
}

#[test]
fn skopeo_uncompressed_layers() {
    let test = "skopeo_uncompressed_layers";
    if !have_tools(test) {
        return;
    }
    if !skopeo_supports("--dest-oci-accept-uncompressed-layers") || !skopeo_supports("--dest-decompress") {
        support::skip(&format!("{test}: this skopeo cannot write uncompressed layers to an OCI layout"));
        return;
    }
    let t = support::tempdir();
    let l = umoci_image(t.path());
    let d = t.path().join("D");
    let l3 = t.path().join("L3");
    // Decompress through the `dir:` transport, then keep the plain tars in the layout.
    skopeo(&["--dest-decompress"], &oci(&l, "t"), &format!("dir:{}", d.display()));
    skopeo(&["--dest-oci-accept-uncompressed-layers"], &format!("dir:{}", d.display()), &oci(&l3, "plain"));
    check_real_layout(&l3, "plain", OCI_TAR);
}

// ---------------------------------------------------------------------------------------
// Hand-written layouts

/// A layout written by the test: blobs named by `Digest::of`, JSON written compactly.
struct Hand {
    dir: PathBuf,
    _t: tempfile::TempDir,
}

impl Hand {
    fn new() -> Hand {
        let t = support::tempdir();
        let dir = t.path().join("layout");
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let h = Hand { dir, _t: t };
        h.index(vec![]);
        h
    }

    fn open(&self) -> OciLayout {
        OciLayout::open(&self.dir).unwrap()
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    /// Store `data`; its descriptor.
    fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let d = Digest::of(data);
        std::fs::write(self.blob_path(&d), data).unwrap();
        json!({"mediaType": media_type, "digest": d.to_string(), "size": data.len()})
    }

    fn json(&self, media_type: &str, v: &Value) -> Value {
        self.blob(media_type, &serde_json::to_vec(v).unwrap())
    }

    /// Write index.json with these descriptors.
    fn index(&self, manifests: Vec<Value>) {
        let v = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    }

    /// A gzip layer holding `name` with `content`.
    fn layer(&self, media_type: &str, name: &str, content: &str) -> Value {
        self.blob(media_type, &support::gzip(&support::tar_of(&[Ent::file(name, content)], Fmt::Pax)))
    }

    /// An OCI image manifest over `layers`; its descriptor.
    fn manifest(&self, layers: Vec<Value>) -> Value {
        let config = self.json(OCI_CONFIG, &json!({"architecture": "amd64", "os": "linux", "rootfs": {}}));
        self.json(
            OCI_MANIFEST,
            &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}),
        )
    }

    /// A one-layer image whose layer holds `/which` = `tag`.
    fn simple(&self, tag: &str) -> Value {
        self.manifest(vec![self.layer(OCI_GZIP, "which", tag)])
    }
}

fn tagged(mut desc: Value, tag: &str) -> Value {
    desc["annotations"] = json!({ REF_NAME: tag });
    desc
}

fn with_platform(mut desc: Value, os: &str, arch: &str, variant: Option<&str>) -> Value {
    desc["platform"] = json!({"os": os, "architecture": arch});
    if let Some(v) = variant {
        desc["platform"]["variant"] = json!(v);
    }
    desc
}

fn digest_of(desc: &Value) -> Digest {
    desc["digest"].as_str().unwrap().parse().unwrap()
}

/// The content of `/which` in the image's only layer.
fn which(layout: &OciLayout, m: &ImageManifest) -> String {
    assert_eq!(m.layers.len(), 1);
    let t = support::tempdir();
    unpack(layout.open_blob(&m.layers[0]).unwrap(), t.path(), &options(m.layers[0].digest)).unwrap();
    std::fs::read_to_string(t.path().join("which")).unwrap()
}

#[track_caller]
fn assert_not_found(r: rootfs_cache::Result<impl std::fmt::Debug>, needles: &[&str]) {
    match r {
        Err(Error::NotFound { what }) => {
            for n in needles {
                assert!(what.contains(n), "{what:?} should mention {n:?}");
            }
        }
        r => panic!("expected NotFound, got {r:?}"),
    }
}

#[track_caller]
fn assert_invalid(r: rootfs_cache::Result<impl std::fmt::Debug>, needle: &str) {
    match r {
        Err(Error::InvalidImage { reason, path }) => {
            assert!(reason.contains(needle), "{reason:?} ({}) should mention {needle:?}", path.display())
        }
        r => panic!("expected InvalidImage, got {r:?}"),
    }
}

#[track_caller]
fn assert_unsupported(r: rootfs_cache::Result<impl std::fmt::Debug>, needles: &[&str]) {
    match r {
        Err(Error::Unsupported { what }) => {
            for n in needles {
                assert!(what.contains(n), "{what:?} should mention {n:?}");
            }
        }
        r => panic!("expected Unsupported, got {r:?}"),
    }
}

#[test]
fn nested_index_picks_the_host_platform_or_the_configured_one() {
    let h = Hand::new();
    let host = Platform::host();
    let mut arches = vec!["amd64", "arm64"];
    if !arches.contains(&host.architecture.as_str()) {
        arches.push(&host.architecture);
    }
    let mut entries = Vec::new();
    let mut by_arch = std::collections::BTreeMap::new();
    for arch in &arches {
        let m = h.simple(arch);
        by_arch.insert(arch.to_string(), digest_of(&m));
        let variant = (*arch == "arm64").then_some("v8");
        entries.push(with_platform(m, "linux", arch, variant));
    }
    // Like a buildx attestation manifest: never chosen.
    entries.push(with_platform(h.simple("attestation"), "unknown", "unknown", None));
    let inner = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}));
    let outer = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [inner.clone()]}));
    h.index(vec![tagged(outer.clone(), "multi")]);

    let layout = h.open();
    assert_eq!(layout.platform(), &host);
    let m = layout.resolve("multi").unwrap();
    assert_eq!(m.digest, by_arch[&host.architecture]);
    assert_eq!(which(&layout, &m), host.architecture);

    for arch in ["amd64", "arm64"] {
        let l = h.open().with_platform(Platform::new("linux", arch));
        let m = l.resolve("multi").unwrap();
        assert_eq!(m.digest, by_arch[arch], "{arch}");
        assert_eq!(which(&l, &m), arch);
        // Through the outer and inner index digests too, and the platform manifest's own.
        assert_eq!(l.resolve(&format!("@{}", digest_of(&outer))).unwrap(), m);
        assert_eq!(l.resolve(&format!("@{}", digest_of(&inner))).unwrap(), m);
        assert_eq!(l.resolve(&format!("@{}", by_arch[arch])).unwrap(), m);
    }
    let v8 = h.open().with_platform("linux/arm64/v8".parse().unwrap()).resolve("multi").unwrap();
    assert_eq!(v8.digest, by_arch["arm64"]);

    let s390x = h.open().with_platform(Platform::new("linux", "s390x"));
    assert_not_found(s390x.resolve("multi"), &["linux/s390x", "linux/amd64", "linux/arm64/v8", "unknown/unknown"]);
    let v7 = h.open().with_platform(Platform::new("linux", "arm64").with_variant("v7"));
    assert_not_found(v7.resolve("multi"), &["linux/arm64/v7"]);
}

#[test]
fn index_nesting_is_bounded() {
    let h = Hand::new();
    let mut d = h.simple("deep");
    for depth in 1..=10 {
        d = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d]}));
        h.index(vec![tagged(d.clone(), "t")]);
        let r = h.open().resolve("t");
        if depth <= 8 {
            assert_eq!(r.unwrap().layers.len(), 1, "depth {depth}");
        } else {
            assert_invalid(r, "nested more than 8");
        }
    }
}

#[test]
fn several_platforms_under_one_tag_in_index_json() {
    let h = Hand::new();
    let amd = h.simple("amd64");
    let arm = h.simple("arm64");
    h.index(vec![
        tagged(with_platform(amd.clone(), "linux", "amd64", None), "t"),
        tagged(with_platform(arm.clone(), "linux", "arm64", None), "t"),
    ]);
    assert_eq!(h.open().tags().unwrap(), ["t"]);
    let l = h.open().with_platform(Platform::new("linux", "arm64"));
    assert_eq!(l.resolve("t").unwrap().digest, digest_of(&arm));
    let l = h.open().with_platform(Platform::new("linux", "amd64"));
    assert_eq!(l.resolve("t").unwrap().digest, digest_of(&amd));
}

#[test]
fn index_with_one_unplatformed_manifest() {
    let h = Hand::new();
    let m = h.simple("only");
    let idx = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "manifests": [m.clone()]}));
    h.index(vec![tagged(idx, "t")]);
    let l = h.open().with_platform(Platform::new("linux", "riscv64"));
    let r = l.resolve("t").unwrap();
    assert_eq!(r.digest, digest_of(&m));
    assert_eq!(which(&l, &r), "only");

    // Two without a platform: no way to choose.
    let idx2 = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "manifests": [m.clone(), h.simple("other")]}));
    h.index(vec![tagged(idx2, "t")]);
    assert_not_found(h.open().resolve("t"), &["(no platform)"]);
}

#[test]
fn docker_manifest_list_and_schema2_manifest() {
    let h = Hand::new();
    let mut entries = Vec::new();
    let mut want = None;
    for arch in ["amd64", "arm64", "s390x", "riscv64", "ppc64le"] {
        let layer = h.layer(DOCKER_GZIP, "which", arch);
        let config = h.json(DOCKER_CONFIG, &json!({"architecture": arch, "os": "linux"}));
        let m = h.json(
            DOCKER_MANIFEST,
            &json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config, "layers": [layer]}),
        );
        if arch == Platform::host().architecture {
            want = Some((digest_of(&m), layer));
        }
        entries.push(with_platform(m, "linux", arch, None));
    }
    let list = h.json(DOCKER_LIST, &json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}));
    h.index(vec![tagged(list, "docker.io/library/busybox:1.36")]);

    let layout = h.open();
    assert_eq!(layout.tags().unwrap(), ["docker.io/library/busybox:1.36"]);
    // A full ref name resolves when it is what index.json says; the bare tag does not.
    assert_not_found(layout.resolve("1.36"), &["\"1.36\"", "docker.io/library/busybox:1.36"]);
    let Some((digest, layer)) = want else {
        support::skip("docker_manifest_list_and_schema2_manifest: no manifest for this host's architecture");
        return;
    };
    let m = layout.resolve("docker.io/library/busybox:1.36").unwrap();
    assert_eq!(m.digest, digest);
    assert_eq!(
        m.layers,
        [Descriptor {
            digest: digest_of(&layer),
            size: layer["size"].as_u64().unwrap(),
            media_type: DOCKER_GZIP.into(),
            annotations: Default::default()
        }]
    );
    assert_eq!(which(&layout, &m), Platform::host().architecture);
}

#[test]
fn manifest_without_media_type() {
    let h = Hand::new();
    let layer = h.layer(OCI_GZIP, "which", "untyped");
    let config = h.json(OCI_CONFIG, &json!({}));
    // Typed only by the descriptor in index.json.
    let m = h.json(OCI_MANIFEST, &json!({"schemaVersion": 2, "config": config, "layers": [layer]}));
    // Not typed at all: neither the blob nor (for a bare digest reference) a descriptor.
    let bare = h.json(OCI_MANIFEST, &json!({"schemaVersion": 2, "config": config, "layers": []}));
    let idx = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "manifests": [m.clone()]}));
    h.index(vec![tagged(m.clone(), "t"), tagged(idx.clone(), "i")]);
    let l = h.open();
    let r = l.resolve("t").unwrap();
    assert_eq!(r.digest, digest_of(&m));
    assert_eq!(which(&l, &r), "untyped");
    assert_eq!(l.resolve("i").unwrap(), r);
    let b = l.resolve(&format!("@{}", digest_of(&bare))).unwrap();
    assert_eq!((b.digest, b.layers.len()), (digest_of(&bare), 0));
    // An untyped index, reached by digest alone.
    let untyped_index = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "manifests": [m.clone()]}));
    assert_eq!(l.resolve(&format!("@{}", digest_of(&untyped_index))).unwrap(), r);
}

#[test]
fn media_type_contradicting_its_descriptor_is_invalid() {
    let h = Hand::new();
    let m = h.simple("x");
    // An index.json entry claiming the manifest is an index.
    let mut lie = m.clone();
    lie["mediaType"] = json!(OCI_INDEX);
    h.index(vec![tagged(lie, "t")]);
    assert_invalid(h.open().resolve("t"), "contradicts");
}

#[test]
fn unknown_tag_is_not_found() {
    let h = Hand::new();
    h.index(vec![tagged(h.simple("a"), "a"), tagged(h.simple("b"), "b")]);
    assert_not_found(h.open().resolve("latest"), &["\"latest\"", "tags: a, b", h.dir.to_str().unwrap()]);
    h.index(vec![]);
    assert_not_found(h.open().resolve("latest"), &["no tags"]);
    assert!(h.open().tags().unwrap().is_empty());
}

#[test]
fn missing_manifest_blob_is_not_found() {
    let h = Hand::new();
    let m = h.simple("x");
    h.index(vec![tagged(m.clone(), "t")]);
    std::fs::remove_file(h.blob_path(&digest_of(&m))).unwrap();
    let d = digest_of(&m).to_string();
    assert_not_found(h.open().resolve("t"), &[&d, h.dir.to_str().unwrap()]);
    assert_not_found(h.open().resolve(&format!("@{d}")), &[&d]);
    // A digest that is nowhere.
    let nowhere = Digest::of(b"nowhere").to_string();
    assert_not_found(h.open().resolve(&nowhere), &[&nowhere]);
}

#[test]
fn open_blob_missing_or_wrong_size() {
    let h = Hand::new();
    let layer = h.layer(OCI_GZIP, "which", "x");
    let l = h.open();
    let mut desc = Descriptor {
        digest: digest_of(&layer),
        size: layer["size"].as_u64().unwrap(),
        media_type: OCI_GZIP.into(),
        annotations: Default::default(),
    };
    assert!(l.open_blob(&desc).is_ok());
    desc.size += 1;
    assert_invalid(l.open_blob(&desc).map(drop), "descriptor says");
    desc.digest = Digest::of(b"absent");
    assert_not_found(l.open_blob(&desc).map(drop), &[&desc.digest.to_string(), h.dir.to_str().unwrap()]);
}

#[test]
fn blob_not_matching_its_digest_is_invalid() {
    let h = Hand::new();
    let m = h.simple("x");
    h.index(vec![tagged(m.clone(), "t")]);
    // Same size, different content.
    let p = h.blob_path(&digest_of(&m));
    let mut bytes = std::fs::read(&p).unwrap();
    let i = bytes.iter().position(|&b| b == b'2').unwrap(); // "schemaVersion":2 → 3
    bytes[i] = b'3';
    std::fs::write(&p, &bytes).unwrap();
    assert_invalid(h.open().resolve("t"), "hashes to");
    assert_invalid(h.open().resolve(&format!("@{}", digest_of(&m))), "hashes to");
}

#[test]
fn descriptor_size_mismatch_is_invalid() {
    let h = Hand::new();
    for delta in [-1i64, 1] {
        let mut m = h.simple("x");
        m["size"] = json!(m["size"].as_i64().unwrap() + delta);
        h.index(vec![tagged(m, "t")]);
        assert_invalid(h.open().resolve("t"), "descriptor says");
    }
    // In a nested index too.
    let mut m = h.simple("y");
    m["size"] = json!(1);
    let idx = h.json(OCI_INDEX, &json!({"schemaVersion": 2, "manifests": [m]}));
    h.index(vec![tagged(idx, "t")]);
    assert_invalid(h.open().resolve("t"), "descriptor says");
}

#[test]
fn foreign_and_other_layer_types_are_unsupported() {
    for media_type in [
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+bzip2",
        "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        "application/octet-stream",
    ] {
        let h = Hand::new();
        let ok = h.layer(OCI_GZIP, "a", "a");
        let bad = h.layer(media_type, "b", "b");
        h.index(vec![tagged(h.manifest(vec![ok, bad.clone()]), "t")]);
        let bad_digest = bad["digest"].as_str().unwrap();
        let mut needles = vec![media_type, bad_digest];
        if media_type.contains("foreign") || media_type.contains("nondistributable") {
            needles.push("non-distributable");
        }
        assert_unsupported(h.open().resolve("t"), &needles);
    }
    // A layer without a media type at all.
    let h = Hand::new();
    let mut layer = h.layer(OCI_GZIP, "a", "a");
    layer.as_object_mut().unwrap().remove("mediaType");
    h.index(vec![tagged(h.manifest(vec![layer]), "t")]);
    assert_unsupported(h.open().resolve("t"), &["layer media type \"\""]);
}

#[test]
fn non_manifest_media_types_are_unsupported() {
    let h = Hand::new();
    // A tag on a layer (large, not JSON): refused by its descriptor, never read.
    let layer = h.blob(OCI_GZIP, &vec![0u8; 5 << 20]);
    let config = h.json(OCI_CONFIG, &json!({}));
    let schema1 = h.json("application/vnd.docker.distribution.manifest.v1+prettyjws", &json!({"schemaVersion": 1}));
    h.index(vec![tagged(layer, "layer"), tagged(config, "config"), tagged(schema1, "v1")]);
    let l = h.open();
    assert_unsupported(l.resolve("layer"), &[OCI_GZIP]);
    assert_unsupported(l.resolve("config"), &[OCI_CONFIG]);
    assert_unsupported(l.resolve("v1"), &["schema 1"]);
}

#[test]
fn sha512_digests_are_rejected_clearly() {
    let hex512 = "ab".repeat(64);
    // In a manifest's layer.
    let h = Hand::new();
    let mut layer = h.layer(OCI_GZIP, "a", "a");
    layer["digest"] = json!(format!("sha512:{hex512}"));
    h.index(vec![tagged(h.manifest(vec![layer]), "t")]);
    assert_unsupported(h.open().resolve("t"), &["sha512", "only sha256"]);
    // In index.json.
    let mut m = h.simple("x");
    m["digest"] = json!(format!("sha512:{hex512}"));
    h.index(vec![tagged(m, "t")]);
    assert_unsupported(h.open().resolve("t"), &["sha512", "only sha256"]);
    // As the reference.
    for r in [format!("@sha512:{hex512}"), format!("sha512:{hex512}")] {
        match h.open().resolve(&r) {
            Err(Error::InvalidDigest { reason, .. }) => assert!(reason.contains("sha256"), "{reason}"),
            r => panic!("expected InvalidDigest, got {r:?}"),
        }
    }
    // A malformed sha256 in a document.
    let mut m = h.simple("x");
    m["digest"] = json!("sha256:XYZ");
    h.index(vec![tagged(m, "t")]);
    assert_invalid(h.open().resolve("t"), "XYZ");
}

#[test]
fn oversized_json_is_invalid() {
    let h = Hand::new();
    let layer = h.layer(OCI_GZIP, "a", "a");
    let big = "x".repeat(4 << 20);
    let m = h.json(
        OCI_MANIFEST,
        &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [layer], "annotations": {"pad": big}}),
    );
    assert!(m["size"].as_u64().unwrap() > 4 << 20);
    h.index(vec![tagged(m.clone(), "t")]);
    // By its descriptor's size, and by the file's size (bare digest: no descriptor).
    assert_invalid(h.open().resolve("t"), "more than");
    assert_invalid(h.open().resolve(&format!("@{}", digest_of(&m))), "more than");
    // index.json itself.
    let v = json!({"schemaVersion": 2, "manifests": [], "annotations": {"pad": big}});
    std::fs::write(h.dir.join("index.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    assert_invalid(h.open().resolve("t"), "more than");
    assert_invalid(h.open().tags(), "more than");
}

#[test]
fn malformed_documents_are_invalid() {
    let h = Hand::new();
    std::fs::write(h.dir.join("index.json"), b"{not json").unwrap();
    assert_invalid(h.open().resolve("t"), "");
    std::fs::write(h.dir.join("index.json"), br#"{"schemaVersion": 1, "manifests": []}"#).unwrap();
    assert_invalid(h.open().resolve("t"), "schemaVersion");
    // Duplicate keys are refused, not resolved by whichever a parser prefers.
    let m = h.simple("x");
    let dup = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","digest":"{}","size":{}}}]}}"#,
        m["digest"].as_str().unwrap(),
        Digest::of(b"other"),
        m["size"]
    );
    std::fs::write(h.dir.join("index.json"), dup).unwrap();
    assert_invalid(h.open().tags(), "duplicate");
    // A manifest of the wrong schema version, and one that is not an object.
    let bad = h.json(OCI_MANIFEST, &json!({"schemaVersion": 1, "mediaType": OCI_MANIFEST, "layers": []}));
    let array = h.json(OCI_MANIFEST, &json!([1, 2]));
    h.index(vec![tagged(bad, "v1"), tagged(array, "array")]);
    assert_invalid(h.open().resolve("v1"), "schemaVersion");
    assert_invalid(h.open().resolve("array"), "");
}

#[test]
fn blob_that_is_not_a_regular_file_is_invalid_without_blocking() {
    let h = Hand::new();
    let m = h.simple("x");
    let p = h.blob_path(&digest_of(&m));
    std::fs::remove_file(&p).unwrap();
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    h.index(vec![tagged(m.clone(), "t")]);
    assert_invalid(h.open().resolve("t"), "regular file");
    let desc =
        Descriptor { digest: digest_of(&m), size: 0, media_type: OCI_GZIP.into(), annotations: Default::default() };
    assert_invalid(h.open().open_blob(&desc).map(drop), "regular file");
}

#[test]
fn open_requires_an_oci_layout_file() {
    let h = Hand::new();
    assert!(OciLayout::open(&h.dir).is_ok());
    std::fs::write(h.dir.join("oci-layout"), br#"{"imageLayoutVersion":"2.0.0"}"#).unwrap();
    assert_unsupported(OciLayout::open(&h.dir), &["2.0.0"]);
    std::fs::write(h.dir.join("oci-layout"), b"{}").unwrap();
    assert_invalid(OciLayout::open(&h.dir), "imageLayoutVersion");
    std::fs::remove_file(h.dir.join("oci-layout")).unwrap();
    assert_not_found(OciLayout::open(&h.dir), &["oci-layout"]);
    assert_not_found(OciLayout::open(h.dir.join("absent")), &["absent"]);
    // index.json missing: open succeeds (nothing else is read), resolve says what is missing.
    let h = Hand::new();
    std::fs::remove_file(h.dir.join("index.json")).unwrap();
    assert_not_found(h.open().resolve("t"), &["index.json"]);
}

#[test]
fn is_a_shareable_fetcher() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<OciLayout>();
    let h = Hand::new();
    let m = h.simple("x");
    h.index(vec![tagged(m.clone(), "t")]);
    let fetcher: std::sync::Arc<dyn ImageFetcher> = std::sync::Arc::new(h.open());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let f = fetcher.clone();
            std::thread::spawn(move || f.resolve("t").unwrap())
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().digest, digest_of(&m));
    }
    // A tag added after open is seen: nothing is cached.
    let m2 = h.simple("y");
    h.index(vec![tagged(m.clone(), "t"), tagged(m2.clone(), "new")]);
    assert_eq!(fetcher.resolve("new").unwrap().digest, digest_of(&m2));
}
