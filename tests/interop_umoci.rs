//! Differential tests against umoci, the reference flattener.
//!
//! An OCI image is built with `umoci init/new` and several rounds of `umoci unpack` →
//! change the rootfs (files of every kind, owners, modes, xattrs, hardlinks, deletions,
//! a directory replaced by a file and back, ...) → `umoci repack`; then one hand-made
//! uncompressed layer with an opaque whiteout is appended (umoci 0.4 writes individual
//! whiteouts only, and cannot write zstd or plain layers). `umoci unpack` of the result
//! is the reference. Our side reads the layout with plain string scanning and:
//! - flattens every layer in order with `WhiteoutMode::Apply` (digests and diff_ids
//!   verified) and compares the trees in detail;
//! - extracts every layer alone with `WhiteoutMode::Overlay` and mounts them as one
//!   read-only overlay in a private mount namespace: the kernel's merged view must list
//!   the same as the reference;
//! - repeats the Apply comparison on `skopeo copy` of the image, once as is and once
//!   recompressed to zstd.
//!
//! Xattrs umoci adds on its own (ignored in comparisons): `user.rootlesscontainers`
//! (rootless unpack only; we run as root, so it is not expected, but it would not be a
//! difference in content).
//!
//! Needs root, `umoci`, and for the other tests `unshare` + overlayfs, `skopeo`.

mod support;

use std::fs::File;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_cache::{Digest, UnpackOptions, WhiteoutMode, unpack};
use support::{Cmp, Ent, Fmt, snapshot};

/// Xattrs that umoci itself adds (see the module docs).
const UMOCI_XATTRS: &[&[u8]] = &[b"user.rootlesscontainers"];

fn umoci(args: &[&str], paths: &[&Path]) {
    support::run(Command::new("umoci").args(args).args(paths));
}

// ---------------------------------------------------------------------------------------
// Minimal JSON scanning (no serde): enough for index.json, manifests and configs.

/// The value text (string contents, or the raw `[...]`/`{...}`/number) of the first
/// `"key":` in `s`.
fn json_value(s: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let mut i = s.find(&pat)? + pat.len();
    let b = s.as_bytes();
    while b[i].is_ascii_whitespace() {
        i += 1;
    }
    if b[i] != b':' {
        return None;
    }
    i += 1;
    while b[i].is_ascii_whitespace() {
        i += 1;
    }
    match b[i] {
        b'"' => {
            let end = s[i + 1..].find('"')? + i + 1;
            Some(s[i + 1..end].to_string())
        }
        b'[' | b'{' => Some(s[i..i + balanced_len(&s[i..])].to_string()),
        _ => {
            let end = s[i..].find([',', '}', ']']).map_or(s.len(), |e| e + i);
            Some(s[i..end].trim().to_string())
        }
    }
}

/// Length of the balanced `[...]` or `{...}` that `s` starts with (strings respected).
fn balanced_len(s: &str) -> usize {
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for (i, c) in s.char_indices() {
        if in_str {
            match c {
                _ if esc => esc = false,
                '\\' => esc = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced JSON: {s}");
}

/// The top-level `{...}` elements of a JSON array text.
fn json_objects(array: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = &array[1..];
    while let Some(i) = rest.find(['{', ']']) {
        if rest.as_bytes()[i] == b']' {
            break;
        }
        let n = balanced_len(&rest[i..]);
        out.push(rest[i..i + n].to_string());
        rest = &rest[i + n..];
    }
    out
}

/// The string elements of a JSON array text.
fn json_strings(array: &str) -> Vec<String> {
    array
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    layout.join("blobs/sha256").join(hex)
}

fn read_blob(layout: &Path, digest: &str) -> String {
    String::from_utf8(std::fs::read(blob_path(layout, digest)).unwrap()).unwrap()
}

struct Layer {
    digest: String,
    media_type: String,
    diff_id: String,
}

/// The manifest digest of `tag`, its manifest and config texts, and its layers in order.
fn image(layout: &Path, tag: &str) -> (String, String, String, Vec<Layer>) {
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
    let manifests = json_objects(&json_value(&index, "manifests").expect("index.json without manifests"));
    let desc = manifests
        .iter()
        .find(|m| json_value(m, "org.opencontainers.image.ref.name").as_deref() == Some(tag))
        .unwrap_or_else(|| panic!("no manifest tagged {tag} in {index}"));
    let mdigest = json_value(desc, "digest").unwrap();
    let manifest = read_blob(layout, &mdigest);
    let config_desc = json_value(&manifest, "config").unwrap();
    let config = read_blob(layout, &json_value(&config_desc, "digest").unwrap());
    let diff_ids = json_strings(&json_value(&config, "diff_ids").expect("config without diff_ids"));
    let layers = json_objects(&json_value(&manifest, "layers").expect("manifest without layers"));
    assert_eq!(layers.len(), diff_ids.len(), "layers vs diff_ids in {manifest} / {config}");
    let layers = layers
        .iter()
        .zip(diff_ids)
        .map(|(l, diff_id)| Layer {
            digest: json_value(l, "digest").unwrap(),
            media_type: json_value(l, "mediaType").unwrap(),
            diff_id,
        })
        .collect();
    (mdigest, manifest, config, layers)
}

fn put_blob(layout: &Path, data: &[u8]) -> String {
    let d = support::sha256_digest(data);
    std::fs::write(blob_path(layout, &d), data).unwrap();
    d
}

/// Append an uncompressed layer to `tag` by hand: new blob, config (diff_ids, history),
/// manifest and index entry.
fn append_plain_layer(layout: &Path, tag: &str, tar: &[u8]) {
    let (mdigest, manifest, config, _) = image(layout, tag);
    let ldigest = put_blob(layout, tar);
    let insert_before_close = |text: &str, key: &str, item: &str| -> String {
        let arr = json_value(text, key).unwrap();
        let start = text.find(&arr).unwrap();
        let close = start + arr.len() - 1;
        let sep = if json_strings(&arr).is_empty() && json_objects(&arr).is_empty() { "" } else { "," };
        format!("{}{sep}{item}{}", &text[..close], &text[close..])
    };
    let mut config = insert_before_close(&config, "diff_ids", &format!("\"{ldigest}\""));
    if json_value(&config, "history").is_some() {
        config = insert_before_close(&config, "history", r#"{"created_by":"interop_umoci hand-made layer"}"#);
    }
    let old_cdigest = json_value(&json_value(&manifest, "config").unwrap(), "digest").unwrap();
    let cdigest = put_blob(layout, config.as_bytes());
    let old_csize = format!("\"size\":{}", std::fs::metadata(blob_path(layout, &old_cdigest)).unwrap().len());
    let manifest =
        manifest.replace(&old_cdigest, &cdigest).replacen(&old_csize, &format!("\"size\":{}", config.len()), 1);
    let layer_desc = format!(
        r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ldigest}","size":{}}}"#,
        tar.len()
    );
    let manifest = insert_before_close(&manifest, "layers", &layer_desc);
    let new_mdigest = put_blob(layout, manifest.as_bytes());
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
    let old_msize = format!("\"size\":{}", std::fs::metadata(blob_path(layout, &mdigest)).unwrap().len());
    let at = index.find(&mdigest).unwrap();
    let (head, tail) = index.split_at(at);
    let tail =
        tail.replacen(&mdigest, &new_mdigest, 1).replacen(&old_msize, &format!("\"size\":{}", manifest.len()), 1);
    std::fs::write(layout.join("index.json"), format!("{head}{tail}")).unwrap();
    let (_, _, _, layers) = image(layout, tag);
    assert_eq!(layers.last().unwrap().digest, ldigest);
}

// ---------------------------------------------------------------------------------------
// Building the image

fn w(r: &Path, p: &str, data: &[u8], mode: u32) {
    let path = r.join(p);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, data).unwrap();
    support::chmod(&path, mode);
}

fn mkdir(r: &Path, p: &str, mode: u32) {
    std::fs::create_dir_all(r.join(p)).unwrap();
    support::chmod(&r.join(p), mode);
}

fn rm(r: &Path, p: &str) {
    let path = r.join(p);
    if std::fs::symlink_metadata(&path).unwrap().is_dir() {
        std::fs::remove_dir_all(&path).unwrap();
    } else {
        std::fs::remove_file(&path).unwrap();
    }
}

fn own(r: &Path, p: &str, uid: u32, gid: u32) {
    support::lchown(&r.join(p), uid, gid);
}

fn lremovexattr(p: &Path, name: &str) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings.
    let r = unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) };
    assert_eq!(r, 0, "lremovexattr {}: {}", p.display(), std::io::Error::last_os_error());
}

fn cap_v2() -> Vec<u8> {
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v
}

const LONG: &str =
    "a-component-longer-than-one-hundred-bytes-forces-pax-or-gnu-long-names-in-the-layer-tar-stream-xxxxxxxxxxxxxx";

/// The changes of each `umoci repack` round, applied to `B/rootfs`.
fn round(r: &Path, n: usize) {
    round_with(r, n, true);
}

/// As [`round`]; `touch_ro`: later rounds also change the content of the read-only
/// directory `ro`, which umoci then writes without a `ro/` entry (an implied parent).
fn round_with(r: &Path, n: usize, touch_ro: bool) {
    match n {
        0 => {
            mkdir(r, "etc", 0o755);
            w(r, "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644);
            w(r, "etc/group", b"root:x:0:\n", 0o644);
            w(r, "etc/shadow", b"root:*::::::\n", 0o640);
            own(r, "etc/shadow", 0, 42);
            std::fs::hard_link(r.join("etc/passwd"), r.join("etc/passwd-")).unwrap();
            support::lsetxattr(&r.join("etc/passwd"), "user.test", b"\x00\x01binary");
            support::lsetxattr(&r.join("etc"), "user.dir", b"d");
            w(r, "usr/bin/tool", &support::pseudo_random(1, 20_000), 0o755);
            std::fs::hard_link(r.join("usr/bin/tool"), r.join("usr/bin/tool-hl")).unwrap();
            w(r, "usr/bin/suid", b"#!/bin/sh\n", 0o755);
            own(r, "usr/bin/suid", 1000, 1000);
            support::chmod(&r.join("usr/bin/suid"), 0o4755);
            w(r, "usr/bin/sgid", b"#!/bin/sh\n", 0o755);
            own(r, "usr/bin/sgid", 0, 50);
            support::chmod(&r.join("usr/bin/sgid"), 0o2755);
            w(r, "usr/bin/cap", b"\x7fELF", 0o755);
            support::lsetxattr(&r.join("usr/bin/cap"), "security.capability", &cap_v2());
            w(r, "usr/lib/libx.so", &support::pseudo_random(2, 300_000), 0o644);
            support::lsetxattr(&r.join("usr/lib/libx.so"), "trusted.t", b"tv");
            w(r, "usr/lib/other", b"other", 0o644);
            support::lsetxattr(&r.join("usr/lib/other"), "trusted.o", b"o");
            mkdir(r, "opt/old/c", 0o755);
            w(r, "opt/old/a", b"a", 0o644);
            w(r, "opt/old/b", b"b", 0o600);
            w(r, "opt/old/c/d", b"d", 0o644);
            w(r, "replaceme", b"a file for now", 0o644);
            w(r, "big-ids", b"ids", 0o644);
            own(r, "big-ids", 3_000_000, 3_000_001);
            mkdir(r, "home/user", 0o700);
            w(r, "home/user/.profile", b"export A=1\n", 0o644);
            own(r, "home/user/.profile", 1000, 1000);
            own(r, "home/user", 1000, 1000);
            mkdir(r, "tmp", 0o1777);
            mkdir(r, "var/empty", 0o711);
            w(r, "empty", b"", 0o644);
            w(r, "tofifo", b"becomes a fifo", 0o644);
            w(r, "old", b"pre-1970", 0o644);
            support::set_mtime(&r.join("old"), -86_400 * 400, 0);
            w(r, "future", b"far future", 0o644);
            support::set_mtime(&r.join("future"), 8_000_000_000, 0);
            symlink("usr/bin", r.join("bin")).unwrap();
            symlink("/etc/passwd", r.join("abs")).unwrap();
            symlink("../../nowhere", r.join("dangling")).unwrap();
            symlink("usr/lib", r.join("lib64")).unwrap();
            mkdir(r, "run", 0o755);
            support::mknod(&r.join("run/fifo"), libc::S_IFIFO, 0o620, 0, 0);
            mkdir(r, "dev", 0o755);
            support::mknod(&r.join("dev/null"), libc::S_IFCHR, 0o666, 1, 3);
            support::mknod(&r.join("dev/loop0"), libc::S_IFBLK, 0o660, 7, 0);
            own(r, "dev/loop0", 0, 6);
            mkdir(r, "ro", 0o755);
            w(r, "ro/f", b"in a read-only dir", 0o444);
            support::chmod(&r.join("ro"), 0o555);
        }
        1 => {
            rm(r, "etc/group");
            rm(r, "usr/bin/tool"); // tool-hl survives with nlink 1
            w(r, "usr/lib/libx.so", &support::pseudo_random(3, 310_000), 0o644);
            lremovexattr(&r.join("usr/lib/other"), "trusted.o"); // xattr-only change
            support::lsetxattr(&r.join("usr/lib/libx.so"), "user.new", b"n");
            rm(r, "opt/old");
            mkdir(r, "opt/old", 0o750);
            w(r, "opt/old/new1", b"new1", 0o644);
            w(r, "opt/old/c/e", b"c was recreated", 0o644);
            rm(r, "replaceme");
            mkdir(r, "replaceme", 0o755);
            w(r, "replaceme/inner", b"inner", 0o644);
            support::chmod(&r.join("etc/passwd"), 0o600);
            support::lsetxattr(&r.join("etc/passwd"), "user.test", b"changed");
            w(r, "data/x", b"linked pair", 0o644);
            std::fs::hard_link(r.join("data/x"), r.join("data/y")).unwrap();
            let long_dir = format!("long/{LONG}/{LONG}");
            mkdir(r, &long_dir, 0o755);
            w(r, &format!("{long_dir}/{LONG}.txt"), b"path longer than 255 bytes", 0o644);
            symlink(format!("../{LONG}/{LONG}/target"), r.join("long/link")).unwrap();
        }
        2 => {
            rm(r, "home");
            rm(r, "tofifo");
            support::mknod(&r.join("tofifo"), libc::S_IFIFO, 0o644, 0, 0);
            rm(r, "bin");
            mkdir(r, "bin", 0o755);
            w(r, "bin/sh", b"#!sh", 0o755);
            rm(r, "abs");
            w(r, "abs", b"was a symlink", 0o644);
            own(r, "usr/bin/suid", 2000, 2000);
            support::chmod(&r.join("usr/bin/suid"), 0o4750);
            if touch_ro {
                support::chmod(&r.join("ro"), 0o755);
                w(r, "ro/g", b"added later", 0o644);
                support::chmod(&r.join("ro"), 0o555);
            }
            rm(r, "dev/null");
            rm(r, "etc/shadow");
            symlink("passwd", r.join("etc/shadow")).unwrap();
        }
        3 => {
            rm(r, "opt");
            mkdir(r, "opt", 0o755);
            w(r, "opt/new", b"new opt", 0o644);
            rm(r, "data/y");
            if touch_ro {
                support::chmod(&r.join("ro"), 0o755);
                rm(r, "ro/f");
                support::chmod(&r.join("ro"), 0o555);
            }
            w(r, "a/b/c/d/e/f", b"deep", 0o644);
            support::chmod(&r.join("tmp"), 0o755);
            rm(r, "empty");
        }
        _ => unreachable!(),
    }
}

const ROUNDS: usize = 4;

/// The hand-made last layer: an opaque directory, whiteouts of a symlink and of one
/// name of a hardlinked file (plain tar, so also an uncompressed layer).
fn hand_made_layer() -> Vec<u8> {
    let t = 1_650_000_000;
    support::tar_of(
        &[
            Ent::dir("usr").mtime(t, 0),
            Ent::dir("usr/lib").mtime(t, 0),
            Ent::opaque("usr/lib"),
            Ent::file("usr/lib/fresh", b"fresh").mtime(t, 0),
            Ent::whiteout("lib64"),
            Ent::dir("etc").mtime(t, 0).xattr("user.dir", b"d"),
            Ent::whiteout("etc/passwd-"),
        ],
        Fmt::Pax,
    )
}

/// Build the image in `t/L`; returns the layout path.
fn build_image(t: &Path, rounds: &dyn Fn(&Path, usize), n: usize, hand_made: bool) -> PathBuf {
    let l = t.join("L");
    let b = t.join("B");
    umoci(&["init", "--layout"], &[&l]);
    umoci(&["new", "--image", &format!("{}:t", l.display())], &[]);
    let image = format!("{}:t", l.display());
    for i in 0..n {
        umoci(&["unpack", "--image", &image], &[&b]);
        rounds(&b.join("rootfs"), i);
        umoci(&["repack", "--image", &image], &[&b]);
        std::fs::remove_dir_all(&b).unwrap();
    }
    if hand_made {
        append_plain_layer(&l, "t", &hand_made_layer());
    }
    l
}

fn reference(t: &Path, layout: &Path) -> PathBuf {
    let r = t.join("REF");
    umoci(&["unpack", "--image", &format!("{}:t", layout.display())], &[&r]);
    r.join("rootfs")
}

/// Flatten `tag` of `layout` into `dest` with Apply mode, verifying digests.
fn apply_all(layout: &Path, dest: &Path) -> Vec<rootfs_cache::UnpackStats> {
    std::fs::create_dir_all(dest).unwrap();
    let (_, _, _, layers) = image(layout, "t");
    layers
        .iter()
        .map(|l| {
            let mut o = UnpackOptions::default();
            o.whiteouts = WhiteoutMode::Apply;
            o.expected_digest = Some(l.digest.parse::<Digest>().unwrap());
            o.expected_diff_id = Some(l.diff_id.parse::<Digest>().unwrap());
            let f = File::open(blob_path(layout, &l.digest)).unwrap();
            unpack(f, dest, &o).unwrap_or_else(|e| panic!("layer {} ({}): {e}", l.digest, l.media_type))
        })
        .collect()
}

fn compare_with_reference(what: &str, reference: &Path, ours: &Path) {
    let cmp = Cmp {
        mode: true,
        owner: true,
        xattrs: true,
        mtime: true,
        dir_mtime: false,
        mtime_nsec: true,
        hardlinks: true,
        ignore_xattrs: UMOCI_XATTRS.iter().map(|x| x.to_vec()).collect(),
    };
    let (a, b) = (snapshot(reference), snapshot(ours));
    assert!(a.len() > 30, "reference tree suspiciously small: {} entries", a.len());
    let mut diffs = support::diff_trees(&a, &b, &cmp);
    let root_cmp = Cmp { mode: true, owner: true, ..Cmp::default() };
    diffs.extend(support::diff_nodes(".", &support::node(reference), &support::node(ours), &root_cmp));
    support::assert_no_diffs(&format!("{what}: ours vs umoci unpack"), &diffs);
}

fn have_umoci(test: &str) -> bool {
    support::require_root(test) && support::require_tools(test, &["umoci"])
}

#[test]
fn apply_matches_umoci_unpack() {
    if !have_umoci("apply_matches_umoci_unpack") {
        return;
    }
    let t = support::tempdir();
    let l = build_image(t.path(), &round, ROUNDS, true);
    let (_, _, _, layers) = image(&l, "t");
    assert_eq!(layers.len(), ROUNDS + 1);
    let reference = reference(t.path(), &l);
    let ours = t.path().join("ours");
    let stats = apply_all(&l, &ours);
    assert!(stats.iter().map(|s| s.whiteouts).sum::<u64>() >= 10, "too few whiteouts exercised: {stats:?}");
    assert_eq!(stats.last().unwrap().compression, rootfs_cache::Compression::None);
    compare_with_reference("Apply", &reference, &ours);
    // Spot checks that the scenario did what it should.
    assert_eq!(std::fs::read(ours.join("usr/lib/fresh")).unwrap(), b"fresh");
    assert!(!ours.join("usr/lib/other").exists(), "opaque whiteout not applied");
    assert!(std::fs::symlink_metadata(ours.join("lib64")).is_err());
    assert!(std::fs::symlink_metadata(ours.join("home")).is_err());
    assert_eq!(std::fs::metadata(ours.join("ro")).unwrap().permissions().mode() & 0o7777, 0o555);
}

/// A file or directory that a later layer adds to a setgid directory of an earlier
/// layer, owned 0:0 in the archive.
#[test]
fn apply_setgid_lower_dir_matches_umoci_unpack() {
    if !have_umoci("apply_setgid_lower_dir_matches_umoci_unpack") {
        return;
    }
    let rounds = |r: &Path, n: usize| match n {
        0 => {
            mkdir(r, "sg", 0o755);
            own(r, "sg", 0, 50);
            support::chmod(&r.join("sg"), 0o2775);
            for i in 0..30 {
                w(r, &format!("filler/{i}"), b"x", 0o644); // the reference size check
            }
        }
        _ => {
            w(r, "sg/file", b"root-owned", 0o644);
            own(r, "sg/file", 0, 0);
            mkdir(r, "sg/sub", 0o755);
            own(r, "sg/sub", 0, 0);
            support::chmod(&r.join("sg/sub"), 0o755); // drop the inherited setgid bit
        }
    };
    let t = support::tempdir();
    let l = build_image(t.path(), &rounds, 2, false);
    let reference = reference(t.path(), &l);
    let ours = t.path().join("ours");
    apply_all(&l, &ours);
    compare_with_reference("Apply (setgid lower dir)", &reference, &ours);
}

/// Directories with children replaced by a file and by a symlink: umoci writes the new
/// `d/c` (or `d/s`) and then whiteouts for the old children *below* it (`d/c/.wh.x`),
/// in the same layer.
#[test]
fn dir_replaced_by_file_or_symlink_matches_umoci_unpack() {
    if !have_umoci("dir_replaced_by_file_or_symlink_matches_umoci_unpack") {
        return;
    }
    let rounds = |r: &Path, n: usize| match n {
        0 => {
            mkdir(r, "d/c/sub", 0o755);
            w(r, "d/c/x", b"x", 0o644);
            w(r, "d/c/sub/y", b"y", 0o644);
            mkdir(r, "d/s", 0o755);
            w(r, "d/s/z", b"z", 0o644);
            for i in 0..30 {
                w(r, &format!("filler/{i}"), b"x", 0o644); // the reference size check
            }
        }
        _ => {
            rm(r, "d/c");
            w(r, "d/c", b"c is a file now", 0o644);
            rm(r, "d/s");
            symlink("c", r.join("d/s")).unwrap();
        }
    };
    let t = support::tempdir();
    let l = build_image(t.path(), &rounds, 2, false);
    let reference = reference(t.path(), &l);
    // Overlay mode: the layer alone must extract too (the whiteouts below `d/c` hide
    // nothing that `d/c` itself does not already hide).
    let (_, _, _, layers) = image(&l, "t");
    let d = t.path().join("top");
    std::fs::create_dir(&d).unwrap();
    let blob = File::open(blob_path(&l, &layers[1].digest)).unwrap();
    let overlay = unpack(blob, &d, &UnpackOptions::default()).map(|_| ()).map_err(|e| e.to_string());
    let ours = t.path().join("ours");
    apply_all(&l, &ours);
    compare_with_reference("Apply (dir replaced by file and symlink)", &reference, &ours);
    assert_eq!(overlay, Ok(()), "Overlay mode");
    assert_eq!(std::fs::read(d.join("d/c")).unwrap(), b"c is a file now");
}

// ---------------------------------------------------------------------------------------
// Overlay: the kernel's view of the separately extracted layers

/// One line per path: `path|type|mode|uid|gid|size|sha256|link`, plus device numbers;
/// directory sizes are file system details and are blanked.
const LISTING: &str = r#"cd "$1" || exit 1
find . -mindepth 1 -printf '%P|%y|%m|%U|%G|%s|%l\n' | LC_ALL=C sort
echo '--sha256--'
find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
echo '--devices--'
find . \( -type c -o -type b \) -print0 | LC_ALL=C sort -z | xargs -0 -r stat -c '%n %t %T'
"#;

fn normalize_listing(raw: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(raw)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            if f.len() == 7 && f[1] == "d" {
                format!("{}|{}|{}|{}|{}|-|{}", f[0], f[1], f[2], f[3], f[4], f[6])
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// Extract every layer of `t/L` alone (Overlay mode), mount them as one read-only
/// overlay in a private mount namespace and compare its listing with umoci's tree.
/// Mount `lowers` (top first) read-only as an overlay in a private mount namespace and
/// list the merged tree. `None` (after a skip message) if overlayfs cannot be mounted.
fn overlay_listing(test: &str, scratch: &Path, lowers: &[PathBuf]) -> Option<Vec<String>> {
    let mnt = scratch.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut lowers = lowers.to_vec();
    // A single lower layer cannot be mounted without an upper one: repeat it.
    if lowers.len() == 1 {
        lowers.push(lowers[0].clone());
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let script = format!("mount -t overlay overlay -o ro,lowerdir={} \"$1\" || exit 99\n{LISTING}", lowerdir.join(":"));
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "--", "sh", "-c", &script, "sh"])
        .arg(&mnt)
        .output()
        .unwrap();
    if out.status.code() == Some(99) {
        support::skip(&format!("{test}: cannot mount overlayfs here: {}", String::from_utf8_lossy(&out.stderr)));
        return None;
    }
    assert!(out.status.success(), "listing the overlay failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(normalize_listing(&out.stdout))
}

fn overlay_matches_reference(test: &str, rounds: &dyn Fn(&Path, usize), n: usize, hand_made: bool) {
    if !have_umoci(test) || !support::require_tools(test, &["unshare", "find", "sha256sum", "xargs", "stat"]) {
        return;
    }
    let t = support::tempdir();
    let l = build_image(t.path(), rounds, n, hand_made);
    let reference = reference(t.path(), &l);
    let (_, _, _, layers) = image(&l, "t");
    let mut lowers = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let d = t.path().join(format!("layer{i}"));
        std::fs::create_dir(&d).unwrap();
        let mut o = UnpackOptions::default();
        o.expected_digest = Some(layer.digest.parse().unwrap());
        // The layers below, top first: parents a layer omits take their metadata from
        // them, as the cache does when it extracts an image's layers.
        o.parent_lowers = lowers.iter().rev().cloned().collect();
        unpack(File::open(blob_path(&l, &layer.digest)).unwrap(), &d, &o).unwrap_or_else(|e| panic!("layer {i}: {e}"));
        lowers.push(d);
    }
    // `lowers` is bottom first; overlayfs wants the top first.
    let top_first: Vec<PathBuf> = lowers.iter().rev().cloned().collect();
    let Some(merged) = overlay_listing(test, t.path(), &top_first) else { return };
    let want = normalize_listing(&support::run(Command::new("sh").args(["-c", LISTING, "sh"]).arg(&reference)));
    assert!(want.len() > 30, "{want:?}");
    let missing: Vec<&String> = want.iter().filter(|l| !merged.contains(l)).collect();
    let extra: Vec<&String> = merged.iter().filter(|l| !want.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{test}: overlay view differs from umoci's tree:\n  umoci only: {missing:#?}\n  overlay only: {extra:#?}"
    );
}

#[test]
fn overlay_mount_matches_umoci_unpack() {
    overlay_matches_reference("overlay_mount_matches_umoci_unpack", &|r, n| round_with(r, n, false), ROUNDS, true);
}

/// umoci omits a directory whose own metadata did not change from a layer that adds
/// or deletes something inside it. The overlay view must still show the directory as
/// the lower layer has it (mode, owner), as umoci's flattened tree does.
#[test]
fn overlay_mount_implied_parent_dirs_match_umoci_unpack() {
    let rounds = |r: &Path, n: usize| match n {
        0 => {
            mkdir(r, "ro", 0o755);
            w(r, "ro/f", b"f", 0o644);
            support::chmod(&r.join("ro"), 0o555);
            mkdir(r, "home/user", 0o700);
            w(r, "home/user/old", b"old", 0o644);
            own(r, "home/user", 1000, 1000);
            for i in 0..30 {
                w(r, &format!("filler/{i}"), b"x", 0o644); // the reference size check
            }
        }
        _ => {
            support::chmod(&r.join("ro"), 0o755);
            w(r, "ro/g", b"g", 0o644);
            rm(r, "ro/f");
            support::chmod(&r.join("ro"), 0o555);
            w(r, "home/user/new", b"new", 0o644);
            rm(r, "home/user/old");
        }
    };
    // Same mtimes in every round: umoci (go-mtree) then sees the directories unchanged
    // and writes their new children without a directory entry, whatever the clock does.
    let rounds = move |r: &Path, n: usize| {
        rounds(r, n);
        for p in ["ro", "home/user"] {
            support::set_mtime(&r.join(p), 1_600_000_000, 0);
        }
    };
    overlay_matches_reference("overlay_mount_implied_parent_dirs_match_umoci_unpack", &rounds, 2, false);
}

// ---------------------------------------------------------------------------------------
// skopeo copies (same layers, or recompressed to zstd)

fn skopeo_copy(test: &str, extra: &[&str], check: impl Fn(&[Layer])) {
    if !have_umoci(test) || !support::require_tools(test, &["skopeo"]) {
        return;
    }
    let t = support::tempdir();
    let l = build_image(t.path(), &round, ROUNDS, true);
    let reference = reference(t.path(), &l);
    let l2 = t.path().join("L2");
    support::run(
        Command::new("skopeo")
            .arg("copy")
            .args(extra)
            .arg(format!("oci:{}:t", l.display()))
            .arg(format!("oci:{}:t", l2.display())),
    );
    let (_, _, _, layers) = image(&l2, "t");
    assert_eq!(layers.len(), ROUNDS + 1);
    check(&layers);
    let ours = t.path().join("ours");
    apply_all(&l2, &ours);
    compare_with_reference(test, &reference, &ours);
}

#[test]
fn skopeo_copy_apply_matches_umoci_unpack() {
    skopeo_copy("skopeo_copy_apply_matches_umoci_unpack", &[], |_| {});
}

#[test]
fn skopeo_zstd_copy_apply_matches_umoci_unpack() {
    skopeo_copy(
        "skopeo_zstd_copy_apply_matches_umoci_unpack",
        &["--dest-compress-format", "zstd", "--dest-compress"],
        |layers| {
            for l in layers {
                assert!(l.media_type.ends_with("+zstd"), "not recompressed: {}", l.media_type);
            }
        },
    );
}

/// The cache end to end on real layouts: an image built with umoci, copied with skopeo
/// (as is, and recompressed to zstd), loaded through `OciLayout` into one `RootfsCache`;
/// mounting each returned `Rootfs` as an overlay gives umoci's flattened tree.
#[test]
fn cache_ensure_of_umoci_and_skopeo_layouts_matches_umoci_unpack() {
    let test = "cache_ensure_of_umoci_and_skopeo_layouts_matches_umoci_unpack";
    if !have_umoci(test) || !support::require_tools(test, &["skopeo", "unshare", "find", "sha256sum", "xargs", "stat"])
    {
        return;
    }
    let t = support::tempdir();
    let l = build_image(t.path(), &|r, n| round_with(r, n, false), ROUNDS, true);
    let reference = reference(t.path(), &l);
    let want = normalize_listing(&support::run(Command::new("sh").args(["-c", LISTING, "sh"]).arg(&reference)));
    assert!(want.len() > 30, "{want:?}");
    let copy = |name: &str, extra: &[&str]| {
        let dest = t.path().join(name);
        support::run(
            Command::new("skopeo")
                .arg("copy")
                .args(extra)
                .arg(format!("oci:{}:t", l.display()))
                .arg(format!("oci:{}:t", dest.display())),
        );
        dest
    };
    let l2 = copy("L2", &[]);
    let l3 = copy("L3", &["--dest-compress-format", "zstd", "--dest-compress"]);
    let cache = rootfs_cache::RootfsCache::open(t.path().join("cache"), rootfs_cache::CacheOptions::default()).unwrap();
    let mut distinct = std::collections::HashSet::new();
    for (i, layout) in [&l, &l2, &l3].into_iter().enumerate() {
        let fetcher = rootfs_cache::OciLayout::open(layout).unwrap();
        let rootfs = cache.ensure(&fetcher, "t").unwrap_or_else(|e| panic!("{}: {e}", layout.display()));
        assert_eq!(rootfs.lowers().len(), ROUNDS + 1);
        distinct.extend(rootfs.layers().iter().copied());
        let Some(merged) = overlay_listing(test, &t.path().join(format!("m{i}")), rootfs.lowers()) else { return };
        let missing: Vec<&String> = want.iter().filter(|x| !merged.contains(x)).collect();
        let extra: Vec<&String> = merged.iter().filter(|x| !want.contains(x)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: overlay of the cached layers differs from umoci's tree:\n  umoci only: {missing:#?}\n  overlay only: {extra:#?}",
            layout.display()
        );
        // A digest reference of what is now cached costs no extraction.
        let before = cache.stats().extractions;
        let again = cache.ensure(&fetcher, &format!("@{}", rootfs.manifest_digest())).unwrap();
        assert_eq!(again.lowers(), rootfs.lowers());
        assert_eq!(cache.stats().extractions, before);
    }
    // Each distinct layer blob was extracted exactly once (skopeo's plain copy reuses
    // umoci's gzip blobs; it gzips the uncompressed hand-made layer, and the zstd copy
    // recompresses everything).
    let s = cache.stats();
    assert_eq!(s.extractions, distinct.len() as u64, "{s:?}");
    assert!(distinct.len() > ROUNDS + 1 && distinct.len() < 3 * (ROUNDS + 1), "{}", distinct.len());
}
