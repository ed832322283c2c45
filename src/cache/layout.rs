//! The cache directory's layout and record formats, as pure functions.
//!
//! ```text
//! <root>/
//!   LOCK                 flock(2)ed by the one RootfsCache that owns the directory
//!   layers/<hex>/fs/     one extracted layer (overlay whiteout format), never modified
//!   layers/<hex>/meta    layer record (below); its mtime is the layer's last use
//!   images/<hex>         image record: manifest digest -> layer digests, bottom first
//!   leases/<id>          persisted lease: the layers a live sandbox pins
//!   tmp/                 extractions in progress; emptied at open
//!   trash/               entries being deleted; emptied at open
//! ```
//!
//! Records are small line-oriented text files (`key value`), written to a temporary
//! file and renamed into place, so a reader sees the old or the new record, never half.

use std::path::{Path, PathBuf};

use crate::digest::Digest;

pub(crate) const LOCK: &str = "LOCK";
pub(crate) const LAYERS: &str = "layers";
pub(crate) const IMAGES: &str = "images";
pub(crate) const LEASES: &str = "leases";
pub(crate) const TMP: &str = "tmp";
pub(crate) const TRASH: &str = "trash";
pub(crate) const FS: &str = "fs";
pub(crate) const META: &str = "meta";

pub(crate) fn layer_dir(root: &Path, d: &Digest) -> PathBuf {
    root.join(LAYERS).join(d.hex())
}

pub(crate) fn layer_fs(root: &Path, d: &Digest) -> PathBuf {
    layer_dir(root, d).join(FS)
}

pub(crate) fn image_file(root: &Path, d: &Digest) -> PathBuf {
    root.join(IMAGES).join(d.hex())
}

/// A ready layer's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LayerMeta {
    /// Disk usage of `fs/` in bytes (allocated blocks, hardlinked inodes once).
    pub size: u64,
    /// Digest of the uncompressed layer, when known.
    pub diff_id: Option<Digest>,
    /// Seconds since the epoch.
    pub created: u64,
}

impl LayerMeta {
    pub(crate) fn encode(&self) -> String {
        let diff = self.diff_id.map_or_else(|| "-".to_string(), |d| d.to_string());
        format!("size {}\ndiff_id {diff}\ncreated {}\n", self.size, self.created)
    }

    pub(crate) fn decode(text: &str) -> Option<LayerMeta> {
        let mut size = None;
        let mut diff_id = None;
        let mut created = None;
        for line in text.lines() {
            let (k, v) = line.split_once(' ')?;
            match k {
                "size" => size = Some(v.parse().ok()?),
                "diff_id" if v == "-" => diff_id = Some(None),
                "diff_id" => diff_id = Some(Some(v.parse().ok()?)),
                "created" => created = Some(v.parse().ok()?),
                _ => {} // forward compatible: unknown keys are ignored
            }
        }
        Some(LayerMeta { size: size?, diff_id: diff_id?, created: created? })
    }
}

/// An image record: the image manifest digest (which differs from the record's key when
/// that is an index digest), its layers, bottom first, and the tags it was resolved from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ImageRecord {
    pub manifest: Option<Digest>,
    pub layers: Vec<Digest>,
    pub tags: Vec<String>,
}

impl ImageRecord {
    pub(crate) fn encode(&self) -> String {
        let mut s = String::new();
        if let Some(m) = &self.manifest {
            s.push_str(&format!("manifest {m}\n"));
        }
        for l in &self.layers {
            s.push_str(&format!("layer {l}\n"));
        }
        for t in &self.tags {
            s.push_str(&format!("tag {t}\n"));
        }
        s
    }

    pub(crate) fn decode(text: &str) -> Option<ImageRecord> {
        let mut r = ImageRecord::default();
        for line in text.lines() {
            match line.split_once(' ')? {
                ("manifest", v) => r.manifest = Some(v.parse().ok()?),
                ("layer", v) => r.layers.push(v.parse().ok()?),
                ("tag", v) => r.tags.push(v.to_string()),
                _ => {}
            }
        }
        Some(r) // zero layers is a valid image (`umoci new` makes one)
    }
}

/// A persisted lease: the layers it pins.
pub(crate) fn encode_lease(layers: &[Digest]) -> String {
    layers.iter().map(|l| format!("layer {l}\n")).collect()
}

pub(crate) fn decode_lease(text: &str) -> Option<Vec<Digest>> {
    text.lines().map(|l| l.strip_prefix("layer ").and_then(|d| d.parse().ok())).collect()
}

/// Lease ids name files: 1–128 of `[A-Za-z0-9._-]`, not starting with a dot.
pub(crate) fn valid_lease_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A reference that names a digest (`@sha256:…` or `sha256:…`), if it is one.
pub(crate) fn digest_ref(reference: &str) -> Option<Digest> {
    // `@sha256:…`, `sha256:…`, or a full `host/repo[:tag]@sha256:…` reference.
    reference.rsplit_once('@').map_or(reference, |(_, d)| d).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let d = Digest::of(b"x");
        let m = LayerMeta { size: 4096, diff_id: Some(d), created: 1_700_000_000 };
        assert_eq!(LayerMeta::decode(&m.encode()), Some(m.clone()));
        let m2 = LayerMeta { diff_id: None, ..m };
        assert_eq!(LayerMeta::decode(&m2.encode()), Some(m2));
        assert_eq!(LayerMeta::decode("size 1\n"), None);
        assert_eq!(LayerMeta::decode("size x\ndiff_id -\ncreated 1\n"), None);
        assert_eq!(LayerMeta::decode(""), None);

        let r = ImageRecord { manifest: Some(d), layers: vec![d, Digest::of(b"y")], tags: vec!["latest".into()] };
        assert_eq!(ImageRecord::decode(&r.encode()), Some(r));
        assert_eq!(
            ImageRecord::decode("tag x\n"),
            Some(ImageRecord { manifest: None, layers: vec![], tags: vec!["x".into()] })
        );
        assert_eq!(ImageRecord::decode("layer sha256:nothex\n"), None);

        let l = vec![d];
        assert_eq!(decode_lease(&encode_lease(&l)), Some(l));
        assert_eq!(decode_lease("layer garbage\n"), None);
    }

    #[test]
    fn lease_ids() {
        for ok in ["a", "sandbox-1", "ws_2.3", &"x".repeat(128)] {
            assert!(valid_lease_id(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "a\0", &"x".repeat(129)] {
            assert!(!valid_lease_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn immutable_knows_the_layout() {
        // `crate::immutable` recognises layers by these names without depending on the cache.
        assert_eq!(
            [LOCK, LAYERS, TMP, TRASH, FS],
            [
                crate::immutable::LOCK,
                crate::immutable::LAYERS,
                crate::immutable::TMP,
                crate::immutable::TRASH,
                crate::immutable::FS
            ]
        );
    }

    #[test]
    fn digest_refs() {
        let d = Digest::of(b"x");
        assert_eq!(digest_ref(&format!("@{d}")), Some(d));
        assert_eq!(digest_ref(&d.to_string()), Some(d));
        assert_eq!(digest_ref("latest"), None);
        assert_eq!(digest_ref("@sha256:abc"), None);
        assert_eq!(digest_ref(&format!("127.0.0.1:5000/a/b:v1@{d}")), Some(d));
        assert_eq!(digest_ref("127.0.0.1:5000/a/b:v1"), None);
    }
}
