//! The demo image and the live sandbox of the `rootfsctl`-driven suites
//! (`tests/nothing_lost.rs`, `tests/crash_points.rs`): an OCI layout written here (a
//! one-layer image `one`, a two-layer image `two` whose second layer deletes a file, adds
//! a directory and makes one opaque, and an unrelated `extra`), what a sandbox writes
//! through its merged view and how to find those writes again, and small tree and
//! mount-table helpers. Included with `#[path = "common/sandbox.rs"] mod sandbox;` next
//! to `mod support;` and `#[path = "common/rootfsctl.rs"] mod rootfsctl;`.

#![allow(dead_code)] // each test crate uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rootfs_cache::is_mount_point;
use serde_json::{Value, json};

use crate::rootfsctl::s;
use crate::support::{self, Ent, Fmt, Node};

pub type Snap = BTreeMap<Vec<u8>, Node>;

// ---------------------------------------------------------------------------------------
// The image: an OCI layout written here

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn base_layer() -> Vec<Ent> {
    vec![
        Ent::dir("etc"),
        Ent::file("etc/hostname", "base\n"),
        Ent::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n").xattr("user.origin", "base layer"),
        Ent::file("etc/gone", "deleted by the second layer\n"),
        Ent::dir("usr"),
        Ent::dir("usr/bin"),
        Ent::file("usr/bin/tool", support::pseudo_random(1, 70_000)).mode(0o755),
        Ent::symlink("bin", "usr/bin"),
        Ent::dir("var"),
        Ent::dir("var/lib"),
        Ent::dir("var/lib/app").mode(0o750).owner(1000, 1000),
        Ent::file("var/lib/app/state", "old state\n").mode(0o640).owner(1000, 1000),
        Ent::file("doomed", "the sandbox deletes this\n"),
        Ent::dir("srv"),
    ]
}

pub fn top_layer() -> Vec<Ent> {
    let t = support::DEFAULT_MTIME + 100;
    vec![
        Ent::dir("etc").mtime(t, 0),
        Ent::whiteout("etc/gone"),
        Ent::file("etc/hostname", "two\n").mtime(t, 5),
        Ent::dir("opt").mtime(t, 0),
        Ent::dir("opt/new").mtime(t, 0),
        Ent::file("opt/new/readme", "added by the second layer\n").mtime(t, 0),
        Ent::dir("var").mtime(t, 0),
        Ent::dir("var/lib").mtime(t, 0),
        Ent::dir("var/lib/app").mode(0o750).owner(1000, 1000).mtime(t, 0),
        Ent::opaque("var/lib/app"),
        Ent::file("var/lib/app/fresh", "replaces the old state\n").owner(1000, 1000),
    ]
}

/// Stores `data` as a blob of `layout`; its descriptor.
pub fn blob(layout: &Path, media_type: &str, data: &[u8]) -> Value {
    let hex = support::sha256_hex(data);
    fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// The layout `L` with tags `one` (the base layer, gzip), `two` (base + top, the top one
/// uncompressed) and `extra` (a layer of its own).
pub fn build_layout(l: &Path) -> PathBuf {
    fs::create_dir_all(l.join("blobs/sha256")).unwrap();
    fs::write(l.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let base = blob(l, OCI_GZIP, &support::gzip(&support::tar_of(&base_layer(), Fmt::Pax)));
    let top = blob(l, OCI_TAR, &support::tar_of(&top_layer(), Fmt::Gnu));
    let extra = blob(l, OCI_GZIP, &support::gzip(&support::tar_of(&[Ent::file("extra", "extra\n")], Fmt::Pax)));
    let manifest = |tag: &str, layers: Vec<Value>| {
        let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}});
        let config = blob(l, OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers});
        let mut d = blob(l, OCI_MANIFEST, &serde_json::to_vec(&m).unwrap());
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        d
    };
    let manifests =
        vec![manifest("one", vec![base.clone()]), manifest("two", vec![base, top]), manifest("extra", vec![extra])];
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    l.to_path_buf()
}

// ---------------------------------------------------------------------------------------
// Trees and mounts

/// Everything under `root`, and `root` itself as `.`.
pub fn tree(root: &Path) -> Snap {
    let mut t = support::snapshot(root);
    t.insert(b".".to_vec(), support::node(root));
    t
}

/// Mount points strictly inside `dir`, from this thread's mount table.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let mi = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let prefix = format!("{}/", s(dir));
    mi.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).map(String::from).collect()
}

pub fn is_tmpfs_mount(p: &Path) -> bool {
    is_mount_point(p).unwrap()
        && nix::sys::statfs::statfs(p).unwrap().filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
}

pub fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// How many mounts sit exactly on `p` (stacked ones counted), from this thread's mount
/// table.
pub fn mounts_at(p: &Path) -> usize {
    let mi = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    mi.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| *m == s(p)).count()
}

// ---------------------------------------------------------------------------------------
// The sandbox's writes

/// What the sandbox writes through its merged view.
pub const WRITTEN: &[u8] = b"written by the sandbox\n";
pub const BIG: usize = 200 << 20;

pub fn sandbox_writes(view: &Path, big: bool) {
    let w = |rel: &str, data: &[u8]| fs::write(view.join(rel), data).unwrap();
    w("etc/written", WRITTEN);
    support::chmod(&view.join("etc/written"), 0o640);
    // More than a page: no export fits into a full file system by accident.
    w("etc/blob", &support::pseudo_random(7, 100_000));
    let mut f = fs::OpenOptions::new().append(true).open(view.join("etc/hostname")).unwrap();
    f.write_all(b"+sandbox\n").unwrap();
    drop(f);
    fs::remove_file(view.join("doomed")).unwrap();
    fs::create_dir(view.join("srv/sandbox-dir")).unwrap();
    support::chmod(&view.join("srv/sandbox-dir"), 0o700);
    w("srv/sandbox-dir/f", b"in a new dir\n");
    if big {
        let chunk = support::pseudo_random(9, 1 << 20);
        let mut f = File::create(view.join("big.bin")).unwrap();
        for _ in 0..BIG / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
    }
}

/// The sandbox's writes as the upper holds them once the view is unmounted.
pub fn assert_writes_in_upper(upper: &Path, what: &str) {
    if let Err(e) = writes_in(upper, true) {
        panic!("{what}: {e}");
    }
}

/// Whether the tree at `root` holds every write of [`sandbox_writes`]: a merged view
/// (`upper: false`: the deleted file is absent), or an upper (`upper: true`: the deleted
/// file is a whiteout). The first write missing, if one is.
pub fn writes_in(root: &Path, upper: bool) -> Result<(), String> {
    let where_ = if upper { "upper" } else { "view" };
    let read = |rel: &str| fs::read(root.join(rel)).map_err(|e| format!("{rel} in the {where_}: {e}"));
    if read("etc/written")? != WRITTEN {
        return Err(format!("etc/written in the {where_} lost its contents"));
    }
    if read("etc/blob")? != support::pseudo_random(7, 100_000) {
        return Err(format!("etc/blob in the {where_} lost its contents"));
    }
    // Both images have an /etc/hostname of their own; the sandbox appended to it.
    if !read("etc/hostname")?.ends_with(b"\n+sandbox\n") {
        return Err(format!("etc/hostname in the {where_} lost the append"));
    }
    if read("srv/sandbox-dir/f")? != b"in a new dir\n" {
        return Err(format!("srv/sandbox-dir/f in the {where_} lost its contents"));
    }
    match (upper, fs::symlink_metadata(root.join("doomed"))) {
        (true, Ok(m)) if m.file_type().is_char_device() && m.rdev() == 0 => Ok(()),
        (true, Ok(_)) => Err("doomed is not a whiteout in the upper".into()),
        (true, Err(e)) => Err(format!("no whiteout for doomed in the upper: {e}")),
        (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        (false, _) => Err("doomed, deleted by the sandbox, is back in the view".into()),
    }
}
