//! Focused behaviour tests for `unpack`: archives made by GNU tar and bsdtar (formats,
//! sparse files, xattrs, long names), OCI whiteouts in both modes and the same-layer
//! rule, multi-layer flattening, duplicate entries, metadata ordering (directory
//! mtimes, read-only directories, setuid after chown, capabilities), progress,
//! digests, and rootless extraction (user namespace, real unprivileged uid).
//!
//! Most tests need root; tests that run GNU tar, bsdtar, `unshare` or `setpriv` skip
//! when the tool is missing (and fail under `CI`).

mod support;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_cache::{Compression, Error, UnpackOptions, UnpackStats, WhiteoutMode, unpack, unpack_with_progress};
use support::{Cmp, Ent, Fmt, Node, Ty, at, node, snapshot};

fn opts(mode: WhiteoutMode) -> UnpackOptions {
    let mut o = UnpackOptions::default();
    o.whiteouts = mode;
    o
}

#[track_caller]
fn unpack_ok(blob: &[u8], dest: &Path, o: &UnpackOptions) -> UnpackStats {
    unpack(blob, dest, o).unwrap_or_else(|e| panic!("unpack into {}: {e}", dest.display()))
}

fn layer(entries: &[Ent]) -> Vec<u8> {
    support::tar_of(entries, Fmt::Pax)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Relative paths of everything under `root`, sorted.
fn listing(root: &Path) -> Vec<String> {
    snapshot(root).keys().map(|k| support::show(k)).collect()
}

fn is_whiteout(n: &Node) -> bool {
    n.ty == Ty::Char && n.rdev == Some((0, 0))
}

const FULL: Cmp = Cmp {
    mode: true,
    owner: true,
    xattrs: true,
    mtime: true,
    dir_mtime: true,
    mtime_nsec: true,
    hardlinks: true,
    ignore_xattrs: Vec::new(),
};

// ---------------------------------------------------------------------------------------
// Archives made by GNU tar and bsdtar

const LONG_COMPONENT: &str = "a-component-name-that-is-definitely-longer-than-one-hundred-bytes-so-it-needs-gnu-long-names-or-pax-path-records-xxxxxxxxxx";

/// A source tree with every kind of object and awkward metadata; mtimes set last,
/// bottom-up, with nanoseconds (one pre-1970).
fn make_source_tree(src: &Path, xattrs: bool) {
    use support::{chmod, lchown, lsetxattr, mknod};
    std::fs::create_dir_all(src).unwrap();
    let mk = |p: &str, mode: u32| {
        std::fs::create_dir_all(src.join(p)).unwrap();
        chmod(&src.join(p), mode);
    };
    let wr = |p: &str, data: &[u8], mode: u32| {
        std::fs::write(src.join(p), data).unwrap();
        chmod(&src.join(p), mode);
    };
    mk("etc", 0o755);
    wr("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644);
    wr("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640);
    lchown(&src.join("etc/shadow"), 0, 42);
    std::fs::hard_link(src.join("etc/passwd"), src.join("etc/passwd-")).unwrap();
    mk("bin", 0o755);
    wr("bin/su", &support::pseudo_random(1, 5000), 0o755);
    chmod(&src.join("bin/su"), 0o4755);
    wr("bin/own", b"#!/bin/sh\n", 0o755);
    lchown(&src.join("bin/own"), 1234, 1234);
    chmod(&src.join("bin/own"), 0o6755);
    wr("bin/tool", &support::pseudo_random(2, 100), 0o755);
    lchown(&src.join("bin/tool"), 1000, 2000);
    mk("home/user", 0o700);
    lchown(&src.join("home/user"), 123_456, 654_321);
    wr("home/user/big-ids", b"ids above 2^21", 0o600);
    lchown(&src.join("home/user/big-ids"), 3_000_000, 3_000_001);
    mk("tmp", 0o1777);
    mk("ro/sub", 0o755);
    wr("ro/f", b"in a read-only dir", 0o444);
    wr("ro/sub/g", b"deeper", 0o400);
    chmod(&src.join("ro/sub"), 0o500);
    chmod(&src.join("ro"), 0o555);
    wr("empty", b"", 0o644);
    wr("one-mib", &support::pseudo_random(3, 1 << 20), 0o644);
    wr("old", b"before 1970", 0o644);
    symlink("usr/lib", src.join("lib")).unwrap();
    symlink("/etc/passwd", src.join("abs")).unwrap();
    symlink("../../nowhere", src.join("dangling")).unwrap();
    symlink(format!("target/{LONG_COMPONENT}"), src.join("longlink")).unwrap();
    let long_dir = format!("long/{LONG_COMPONENT}/{LONG_COMPONENT}");
    mk(&long_dir, 0o750);
    wr(&format!("{long_dir}/{LONG_COMPONENT}.txt"), b"long path > 255 bytes", 0o644);
    std::fs::hard_link(src.join("bin/su"), src.join(format!("long/{LONG_COMPONENT}/su-link"))).unwrap();
    mk("run", 0o755);
    mknod(&src.join("run/fifo"), libc::S_IFIFO, 0o620, 0, 0);
    mk("dev", 0o755);
    mknod(&src.join("dev/null"), libc::S_IFCHR, 0o666, 1, 3);
    mknod(&src.join("dev/loop0"), libc::S_IFBLK, 0o660, 7, 0);
    lchown(&src.join("dev/loop0"), 0, 6);
    if xattrs {
        lsetxattr(&src.join("etc/passwd"), "user.mime", b"text/plain");
        lsetxattr(&src.join("etc/passwd"), "trusted.bin", b"\x00\x01\x02\xff");
        lsetxattr(&src.join("etc"), "user.dir", b"1");
        lsetxattr(&src.join("bin/tool"), "security.capability", &cap_net_bind_service());
        lsetxattr(&src.join("home/user/big-ids"), "user.empty", b"");
    }
    // mtimes, children before parents.
    let all: Vec<Vec<u8>> = snapshot(src).into_keys().rev().collect();
    for (i, p) in all.iter().enumerate() {
        let secs = 1_500_000_000 + i as i64 * 1000;
        support::set_mtime(&at(src, p), secs, (i as u32 + 1) * 1_000_003 % 1_000_000_000);
    }
    support::set_mtime(&src.join("old"), -100_001, 500_000_000);
    support::set_mtime(src, 1_400_000_000, 7);
}

/// `security.capability` v2 granting cap_net_bind_service, effective.
fn cap_net_bind_service() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // VFS_CAP_REVISION_2 | EFFECTIVE
    v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted: CAP_NET_BIND_SERVICE
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable
    v.extend_from_slice(&[0; 8]); // high words
    v
}

/// Extract `archive` (made from `src`) and compare with `src`, root included.
fn check_against_source(src: &Path, archive: &[u8], what: &str, nsec: bool, xattrs: bool) {
    let t = support::tempdir();
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    for pipelined in [true, false] {
        let dest = dest.join(if pipelined { "p" } else { "s" });
        std::fs::create_dir(&dest).unwrap();
        let mut o = opts(WhiteoutMode::Overlay);
        o.pipelined = pipelined;
        let stats = unpack_ok(archive, &dest, &o);
        let (a, b) = (snapshot(src), snapshot(&dest));
        let c = Cmp { mtime_nsec: nsec, xattrs, ..FULL.clone() };
        let mut diffs = support::diff_trees(&a, &b, &c);
        diffs.extend(support::diff_nodes(".", &node(src), &node(&dest), &c));
        if !xattrs {
            for (p, n) in &b {
                if !n.xattrs.is_empty() {
                    diffs.push(format!("{}: unexpected xattrs {:?}", support::show(p), n.xattrs));
                }
            }
        }
        support::assert_no_diffs(&format!("{what} (pipelined {pipelined})"), &diffs);
        assert_eq!(stats.digest.to_string(), support::sha256_digest(archive));
        assert_eq!(stats.skipped_devices, 0);
    }
}

fn gnu_tar(src: &Path, args: &[&str]) -> Vec<u8> {
    support::run(Command::new("tar").args(args).args(["--numeric-owner", "-cf", "-", "-C"]).arg(src).arg("."))
}

#[test]
fn gnu_tar_gnu_format() {
    if !support::require_root("gnu_tar_gnu_format") || !support::require_tools("gnu_tar_gnu_format", &["tar"]) {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    make_source_tree(&src, false);
    let archive = gnu_tar(&src, &["--format=gnu"]);
    // GNU format stores whole seconds only.
    check_against_source(&src, &archive, "tar --format=gnu", false, false);
    check_against_source(&src, &support::gzip(&archive), "tar --format=gnu | gzip", false, false);
}

#[test]
fn gnu_tar_posix_format() {
    if !support::require_root("gnu_tar_posix_format") || !support::require_tools("gnu_tar_posix_format", &["tar"]) {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    make_source_tree(&src, false);
    let archive = gnu_tar(&src, &["--format=posix"]);
    check_against_source(&src, &archive, "tar --format=posix", true, false);
    check_against_source(&src, &support::zstd(&archive), "tar --format=posix | zstd", true, false);
}

#[test]
fn gnu_tar_xattrs() {
    if !support::require_root("gnu_tar_xattrs") || !support::require_tools("gnu_tar_xattrs", &["tar"]) {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    make_source_tree(&src, true);
    let archive = gnu_tar(&src, &["--format=posix", "--xattrs", "--xattrs-include=*"]);
    check_against_source(&src, &archive, "tar --format=posix --xattrs", true, true);
    let dest = t.path().join("x");
    std::fs::create_dir(&dest).unwrap();
    unpack_ok(&archive, &dest, &opts(WhiteoutMode::Overlay));
    assert_eq!(support::lgetxattr(&dest.join("bin/tool"), b"security.capability"), Some(cap_net_bind_service()));
    assert_eq!(node(&dest.join("bin/tool")).uid, 1000);
}

#[test]
fn bsdtar_archive() {
    if !support::require_root("bsdtar_archive") || !support::require_tools("bsdtar_archive", &["bsdtar"]) {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    make_source_tree(&src, true);
    // libarchive writes a negative time with a fraction as `-S.F` meaning S seconds plus
    // F (so -100000.5 s becomes "-100001.5", which POSIX and GNU tar read as -100001.5 s):
    // keep the pre-1970 mtime whole so the archive means what the source says.
    support::set_mtime(&src.join("old"), -100_001, 0);
    // Restricted pax (the default) writes PAX headers only where ustar does not suffice,
    // so most entries lose their nanoseconds; `--format=pax` keeps them all.
    let restricted =
        support::run(Command::new("bsdtar").args(["--numeric-owner", "-cf", "-", "-C"]).arg(&src).arg("."));
    check_against_source(&src, &restricted, "bsdtar (restricted pax)", false, true);
    let pax = support::run(
        Command::new("bsdtar").args(["--format=pax", "--numeric-owner", "-cf", "-", "-C"]).arg(&src).arg("."),
    );
    check_against_source(&src, &pax, "bsdtar --format=pax", true, true);
    let ustar = support::run(
        Command::new("bsdtar")
            .args(["--format=ustar", "--numeric-owner", "-cf", "-", "-C"])
            .arg(&src)
            .arg("lib")
            .arg("etc"),
    );
    let dest = t.path().join("ustar");
    std::fs::create_dir(&dest).unwrap();
    unpack_ok(&ustar, &dest, &opts(WhiteoutMode::Overlay));
    assert_eq!(read(&dest.join("etc/passwd")), read(&src.join("etc/passwd")));
    assert_eq!(std::fs::read_link(dest.join("lib")).unwrap(), Path::new("usr/lib"));
}

/// A 64 MiB file with three small data regions, one 32 MiB file ending in a hole and
/// one 16 MiB file that is all hole.
fn make_sparse_files(src: &Path) -> Vec<&'static str> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(src).unwrap();
    let f = File::create(src.join("sparse")).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&support::pseudo_random(10, 4096), 0).unwrap();
    f.write_all_at(&support::pseudo_random(11, 5000), 10 << 20).unwrap();
    f.write_all_at(b"the end", (64 << 20) - 7).unwrap();
    let f = File::create(src.join("tail-hole")).unwrap();
    f.set_len(32 << 20).unwrap();
    f.write_all_at(&support::pseudo_random(12, 70_000), 1 << 20).unwrap();
    let f = File::create(src.join("all-hole")).unwrap();
    f.set_len(16 << 20).unwrap();
    std::fs::write(src.join("dense"), support::pseudo_random(13, 10_000)).unwrap();
    vec!["sparse", "tail-hole", "all-hole"]
}

fn check_sparse(src: &Path, archive: &[u8], what: &str, names: &[&str]) {
    assert!(
        archive.len() < 2 << 20,
        "{what}: archive of {} bytes; the tool did not write sparse entries",
        archive.len()
    );
    let t = support::tempdir();
    for pipelined in [true, false] {
        let dest = t.path().join(if pipelined { "p" } else { "s" });
        std::fs::create_dir(&dest).unwrap();
        let mut o = opts(WhiteoutMode::Overlay);
        o.pipelined = pipelined;
        unpack_ok(archive, &dest, &o);
        let c = Cmp { mode: true, owner: true, ..Cmp::default() };
        support::assert_no_diffs(what, &support::diff_trees(&snapshot(src), &snapshot(&dest), &c));
        for n in names {
            let (s, d) = (node(&src.join(n)), node(&dest.join(n)));
            assert_eq!(s.size, d.size, "{what}: {n} size");
            assert!(
                d.blocks * 512 <= 512 * 1024,
                "{what}: {n} uses {} bytes on disk for {} bytes of data: holes were filled",
                d.blocks * 512,
                s.blocks * 512
            );
        }
    }
}

#[test]
fn gnu_tar_sparse_gnu_format() {
    if !support::require_root("gnu_tar_sparse_gnu_format")
        || !support::require_tools("gnu_tar_sparse_gnu_format", &["tar"])
    {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    let names = make_sparse_files(&src);
    let archive = gnu_tar(&src, &["--format=gnu", "--sparse"]);
    check_sparse(&src, &archive, "tar --format=gnu --sparse", &names);
}

#[test]
fn gnu_tar_sparse_posix_format() {
    if !support::require_root("gnu_tar_sparse_posix_format")
        || !support::require_tools("gnu_tar_sparse_posix_format", &["tar"])
    {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    let names = make_sparse_files(&src);
    // GNU tar's default for posix is sparse format 1.0; say so explicitly.
    let archive = gnu_tar(&src, &["--format=posix", "--sparse", "--sparse-version=1.0"]);
    check_sparse(&src, &archive, "tar --format=posix --sparse", &names);
    check_sparse(&src, &support::gzip(&archive), "tar --format=posix --sparse | gzip", &names);
}

#[test]
fn gnu_tar_sparse_0x_is_refused_not_misread() {
    if !support::require_root("gnu_tar_sparse_0x") || !support::require_tools("gnu_tar_sparse_0x", &["tar"]) {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    make_sparse_files(&src);
    for v in ["0.0", "0.1"] {
        let archive = gnu_tar(&src, &["--format=posix", "--sparse", &format!("--sparse-version={v}")]);
        let dest = t.path().join(v);
        std::fs::create_dir(&dest).unwrap();
        let e = unpack(&archive[..], &dest, &opts(WhiteoutMode::Overlay)).expect_err("sparse 0.x accepted");
        assert!(matches!(e, Error::InvalidArchive { .. } | Error::Unsupported { .. }), "sparse {v}: {e}");
    }
}

#[test]
fn bsdtar_sparse() {
    if !support::require_root("bsdtar_sparse") || !support::require_tools("bsdtar_sparse", &["bsdtar"]) {
        return;
    }
    let t = support::tempdir();
    let src = t.path().join("src");
    let names = make_sparse_files(&src);
    let archive = support::run(Command::new("bsdtar").args(["--format=pax", "-cf", "-", "-C"]).arg(&src).arg("."));
    check_sparse(&src, &archive, "bsdtar --format=pax (sparse)", &names);
}

// ---------------------------------------------------------------------------------------
// Long names, built with the tar crate

#[test]
fn long_names_and_links() {
    if !support::require_root("long_names_and_links") {
        return;
    }
    let c150 = "c".repeat(150);
    let deep = format!("{c150}/{}/{}", "d".repeat(200), "e".repeat(120)); // > 255 bytes
    let prefixed = format!("{}/{}", "p".repeat(140), "n".repeat(90)); // fits ustar prefix+name
    let target = "t/".repeat(200); // 400-byte link target
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        let entries = vec![
            Ent::dir(&c150),
            Ent::dir(&format!("{c150}/{}", "d".repeat(200))),
            Ent::file(&deep, b"deep"),
            Ent::file(&prefixed, b"prefixed"),
            Ent::symlink(&format!("{c150}/link"), &target),
            Ent::symlink("short", &target),
            Ent::hardlink(&format!("{c150}/{}", "h".repeat(180)), &deep),
            Ent::hardlink("h2", &prefixed),
        ];
        let t = support::tempdir();
        let stats = unpack_ok(&support::tar_of(&entries, fmt), t.path(), &opts(WhiteoutMode::Overlay));
        assert_eq!(stats.entries, 8);
        let d = t.path();
        assert_eq!(read(&d.join(&deep)), b"deep", "{fmt:?}");
        assert_eq!(read(&d.join(&prefixed)), b"prefixed", "{fmt:?}");
        assert_eq!(std::fs::read_link(d.join(format!("{c150}/link"))).unwrap(), Path::new(&target), "{fmt:?}");
        assert_eq!(std::fs::read_link(d.join("short")).unwrap(), Path::new(&target), "{fmt:?}");
        let h = node(&d.join(format!("{c150}/{}", "h".repeat(180))));
        assert_eq!(h.ino, node(&d.join(&deep)).ino, "{fmt:?}");
        assert_eq!(h.nlink, 2);
        assert_eq!(node(&d.join("h2")).ino, node(&d.join(&prefixed)).ino, "{fmt:?}");
        assert_eq!(listing(d).len(), 9, "{fmt:?}: {:?}", listing(d));
    }
}

// ---------------------------------------------------------------------------------------
// Whiteouts

fn whiteout_layer(fmt: Fmt) -> Vec<u8> {
    support::tar_of(
        &[
            Ent::dir("d").mode(0o750).mtime(1000, 5),
            Ent::file("d/keep", b"k"),
            Ent::opaque("d"),
            Ent::whiteout("gone"),
            Ent::whiteout("e/x"),
            Ent::file(".wh..wh.plnk", b""),
            Ent::dir("img").xattr("trusted.overlay.opaque", b"y"),
            Ent::file("f", b"f").xattr("user.overlay.redirect", b"/x").xattr("trusted.overlay.origin", b"o"),
        ],
        fmt,
    )
}

#[test]
fn overlay_whiteouts_and_opaque_dirs() {
    if !support::require_root("overlay_whiteouts_and_opaque_dirs") {
        return;
    }
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        for userxattr in [false, true] {
            let t = support::tempdir();
            let d = t.path();
            let mut o = opts(WhiteoutMode::Overlay);
            o.userxattr = userxattr;
            let stats = unpack_ok(&whiteout_layer(fmt), d, &o);
            let what = format!("{fmt:?} userxattr={userxattr}");
            assert_eq!(stats.whiteouts, 3, "{what}");
            let (set, unset): (&[u8], &[u8]) = if userxattr {
                (b"user.overlay.opaque", b"trusted.overlay.opaque")
            } else {
                (b"trusted.overlay.opaque", b"user.overlay.opaque")
            };
            let dn = node(&d.join("d"));
            assert_eq!(dn.xattrs.get(set).map(Vec::as_slice), Some(&b"y"[..]), "{what}: {:?}", dn.xattrs);
            assert!(!dn.xattrs.contains_key(unset), "{what}");
            assert_eq!((dn.mode, dn.mtime), (0o750, (1000, 5)), "{what}: opaque dir metadata");
            assert_eq!(read(&d.join("d/keep")), b"k", "{what}");
            assert!(is_whiteout(&node(&d.join("gone"))), "{what}: {:?}", node(&d.join("gone")));
            assert!(is_whiteout(&node(&d.join("e/x"))), "{what}");
            assert_eq!(node(&d.join("e")).ty, Ty::Dir);
            assert!(!exists(&d.join(".wh..wh.plnk")), "{what}: AUFS metadata extracted");
            // Image-supplied overlay xattrs are stored escaped, never as overlay metadata.
            let img = node(&d.join("img"));
            assert!(!img.xattrs.contains_key(&b"trusted.overlay.opaque"[..]), "{what}: image opaque xattr interpreted");
            assert_eq!(img.xattrs.get(&b"trusted.overlay.overlay.opaque"[..]).map(Vec::as_slice), Some(&b"y"[..]));
            let f = node(&d.join("f"));
            let names: Vec<String> = f.xattrs.keys().map(|k| support::show(k)).collect();
            assert_eq!(names, ["trusted.overlay.overlay.origin", "user.overlay.overlay.redirect"], "{what}");
            let mut all = listing(d);
            all.sort();
            assert_eq!(all, ["d", "d/keep", "e", "e/x", "f", "gone", "img"], "{what}");
        }
    }
}

#[test]
fn same_layer_whiteouts_overlay() {
    if !support::require_root("same_layer_whiteouts_overlay") {
        return;
    }
    let entries = [
        Ent::file("a", b"A"),
        Ent::whiteout("a"),
        Ent::whiteout("b"),
        Ent::file("b", b"B"),
        Ent::dir("c"),
        Ent::file("c/x", b"x"),
        Ent::whiteout("c"),
        Ent::whiteout("s"),
        Ent::symlink("s", "target"),
        Ent::dir("d"),
        Ent::file("d/y", b"y"),
        Ent::opaque("d"),
        Ent::opaque("e"),
        Ent::dir("e").mode(0o711),
        Ent::file("e/z", b"z"),
    ];
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        let t = support::tempdir();
        let d = t.path();
        unpack_ok(&support::tar_of(&entries, fmt), d, &opts(WhiteoutMode::Overlay));
        assert_eq!(read(&d.join("a")), b"A", "whiteout after the file removed it");
        assert_eq!(read(&d.join("b")), b"B", "file after its whiteout");
        assert_eq!(read(&d.join("c/x")), b"x");
        assert_eq!(std::fs::read_link(d.join("s")).unwrap(), Path::new("target"));
        assert_eq!(read(&d.join("d/y")), b"y");
        assert_eq!(read(&d.join("e/z")), b"z");
        assert_eq!(node(&d.join("e")).mode, 0o711);
        for o in ["d", "e"] {
            assert_eq!(support::lgetxattr(&d.join(o), b"trusted.overlay.opaque").as_deref(), Some(&b"y"[..]), "{o}");
        }
        let mut all = listing(d);
        all.sort();
        assert_eq!(all, ["a", "b", "c", "c/x", "d", "d/y", "e", "e/z", "s"], "{fmt:?}");
    }
}

/// A lower layer for the Apply tests.
fn lower() -> Vec<Ent> {
    vec![
        Ent::file("a", b"old a"),
        Ent::file("b", b"old b"),
        Ent::dir("c"),
        Ent::file("c/old", b"c old"),
        Ent::dir("d"),
        Ent::file("d/old", b"d old"),
        Ent::dir("d/sub"),
        Ent::file("d/sub/z", b"z"),
        Ent::dir("e"),
        Ent::file("e/old", b"e old"),
        Ent::symlink("s", "old-target"),
    ]
}

#[test]
fn same_layer_whiteouts_apply() {
    if !support::require_root("same_layer_whiteouts_apply") {
        return;
    }
    let upper = [
        Ent::file("a", b"A"),
        Ent::whiteout("a"),
        Ent::whiteout("b"),
        Ent::file("b", b"B"),
        Ent::file("c/x", b"x"),
        Ent::whiteout("c"),
        Ent::dir("d"),
        Ent::file("d/y", b"y"),
        Ent::opaque("d"),
        Ent::opaque("e"),
        Ent::file("e/new", b"new"),
        Ent::symlink("s", "new-target"),
        Ent::whiteout("s"),
    ];
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        let t = support::tempdir();
        let d = t.path();
        unpack_ok(&layer(&lower()), d, &opts(WhiteoutMode::Apply));
        let stats = unpack_ok(&support::tar_of(&upper, fmt), d, &opts(WhiteoutMode::Apply));
        assert_eq!(stats.whiteouts, 6);
        assert_eq!(read(&d.join("a")), b"A");
        assert_eq!(read(&d.join("b")), b"B");
        assert_eq!(read(&d.join("c/x")), b"x");
        assert_eq!(read(&d.join("d/y")), b"y");
        assert_eq!(read(&d.join("e/new")), b"new");
        assert_eq!(std::fs::read_link(d.join("s")).unwrap(), Path::new("new-target"));
        assert!(support::lxattrs(&d.join("d")).is_empty(), "Apply mode must not leave overlay xattrs");
        let mut all = listing(d);
        all.sort();
        assert_eq!(all, ["a", "b", "c", "c/x", "d", "d/y", "e", "e/new", "s"], "{fmt:?}");
    }
}

/// The layer umoci writes when a directory with children becomes a file: the file
/// `d/c`, then whiteouts (and here an opaque marker) *below* it. They refer to lower
/// content that `d/c` already replaces, so they are no-ops, in both modes.
#[test]
fn whiteouts_below_a_replaced_non_directory_are_ignored() {
    if !support::require_root("whiteouts_below_a_replaced_non_directory_are_ignored") {
        return;
    }
    let lower =
        [Ent::dir("d"), Ent::dir("d/c"), Ent::file("d/c/x", b"x"), Ent::dir("d/c/sub"), Ent::file("d/c/sub/y", b"y")];
    let upper = [
        Ent::dir("d"),
        Ent::file("d/c", b"c is a file now"),
        Ent::whiteout("d/c/sub"),
        Ent::whiteout("d/c/x"),
        Ent::opaque("d/c"),
        Ent::symlink("d/l", "c"),
        Ent::whiteout("d/l/x"),
    ];
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        for mode in [WhiteoutMode::Apply, WhiteoutMode::Overlay] {
            let t = support::tempdir();
            let d = t.path();
            if mode == WhiteoutMode::Apply {
                unpack_ok(&layer(&lower), d, &opts(mode));
            }
            let r = unpack(&support::tar_of(&upper, fmt)[..], d, &opts(mode));
            if let Err(e) = r {
                panic!("{mode:?} {fmt:?}: {e}");
            }
            assert_eq!(read(&d.join("d/c")), b"c is a file now", "{mode:?}");
            let mut all = listing(d);
            all.sort();
            assert_eq!(all, ["d", "d/c", "d/l"], "{mode:?} {fmt:?}");
        }
    }
}

#[test]
fn apply_layers_in_sequence() {
    if !support::require_root("apply_layers_in_sequence") {
        return;
    }
    let l1 = vec![
        Ent::dir("etc"),
        Ent::file("etc/passwd", b"root\n"),
        Ent::file("etc/hosts", b"127.0.0.1\n"),
        Ent::dir("usr"),
        Ent::dir("usr/bin"),
        Ent::file("usr/bin/tool", b"tool v1").mode(0o755),
        Ent::hardlink("usr/bin/tool2", "usr/bin/tool"),
        Ent::hardlink("usr/bin/tool3", "usr/bin/tool"),
        Ent::symlink("bin", "usr/bin"),
        Ent::dir("var"),
        Ent::dir("var/lib"),
        Ent::dir("var/lib/x"),
        Ent::file("var/lib/x/a", b"a"),
        Ent::dir("var/lib/x/c").mode(0o555),
        Ent::file("var/lib/x/c/d", b"d"),
        Ent::dir("opq"),
        Ent::file("opq/1", b"1"),
        Ent::fifo("opq/fifo"),
    ];
    let l2 = vec![
        Ent::whiteout("etc/hosts"),
        Ent::opaque("var/lib/x"),
        Ent::file("var/lib/x/new", b"new"),
        // Replace one name of a hardlinked file: the other names keep the old content.
        Ent::file("usr/bin/tool", b"tool v2").mode(0o755).mtime(1_700_000_000, 0),
        Ent::whiteout("usr/bin/tool3"),
        Ent::whiteout("bin"),
        Ent::dir("bin"),
        Ent::file("bin/sh", b"sh"),
        Ent::opaque("opq"),
        // A hardlink to a file of the lower layer.
        Ent::hardlink("etc/passwd.link", "etc/passwd"),
    ];
    let l3 = vec![
        Ent::whiteout("var"),
        Ent::file("etc/hosts", b"::1\n"),
        Ent::whiteout("usr/bin/tool2"),
        Ent::file("opq/2", b"2"),
        Ent::whiteout("not/there/at/all"),
    ];
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        let t = support::tempdir();
        let d = t.path();
        let o = opts(WhiteoutMode::Apply);
        unpack_ok(&support::tar_of(&l1, fmt), d, &o);
        let tool2_ino = node(&d.join("usr/bin/tool2")).ino;
        unpack_ok(&support::gzip(&support::tar_of(&l2, fmt)), d, &o);
        let after2 = snapshot(d);
        let tool = &after2[&b"usr/bin/tool"[..]];
        let tool2 = &after2[&b"usr/bin/tool2"[..]];
        assert_eq!(read(&d.join("usr/bin/tool")), b"tool v2");
        assert_eq!(read(&d.join("usr/bin/tool2")), b"tool v1", "{fmt:?}: the other link was modified");
        assert_eq!(tool2.ino, tool2_ino, "tool2 must stay the same inode");
        assert_ne!(tool.ino, tool2.ino);
        assert_eq!((tool.nlink, tool2.nlink), (1, 1), "tool3 was whited out");
        assert_eq!(tool.mtime.0, 1_700_000_000);
        assert_eq!(node(&d.join("bin")).ty, Ty::Dir);
        let mut all = listing(d);
        all.sort();
        assert_eq!(node(&d.join("etc/passwd.link")).ino, node(&d.join("etc/passwd")).ino);
        let want2 = [
            "bin",
            "bin/sh",
            "etc",
            "etc/passwd",
            "etc/passwd.link",
            "opq",
            "usr",
            "usr/bin",
            "usr/bin/tool",
            "usr/bin/tool2",
            "var",
            "var/lib",
            "var/lib/x",
            "var/lib/x/new",
        ];
        assert_eq!(all, want2, "{fmt:?} after layer 2");
        unpack_ok(&support::zstd(&support::tar_of(&l3, fmt)), d, &o);
        let mut all = listing(d);
        all.sort();
        let want3 = [
            "bin",
            "bin/sh",
            "etc",
            "etc/hosts",
            "etc/passwd",
            "etc/passwd.link",
            "opq",
            "opq/2",
            "usr",
            "usr/bin",
            "usr/bin/tool",
        ];
        assert_eq!(all, want3, "{fmt:?} after layer 3");
        assert_eq!(read(&d.join("etc/hosts")), b"::1\n");
    }
}

// ---------------------------------------------------------------------------------------
// Duplicates and ordering

#[test]
fn duplicate_entries_later_wins() {
    if !support::require_root("duplicate_entries_later_wins") {
        return;
    }
    let entries = [
        Ent::file("f2d", b"one"),
        Ent::dir("f2d").mode(0o750).mtime(2000, 0),
        Ent::dir("d2f").mode(0o700),
        Ent::file("d2f", b"now a file").mode(0o640),
        Ent::symlink("s2f", "target"),
        Ent::file("s2f", b"was a symlink"),
        Ent::file("f2s", b"was a file"),
        Ent::symlink("f2s", "elsewhere"),
        Ent::dir("d2s"),
        Ent::symlink("d2s", "x"),
        Ent::file("f2f", b"first").mode(0o600).owner(1, 1).xattr("user.first", b"1"),
        Ent::file("f2f", b"second").mode(0o644).owner(2, 2).xattr("user.second", b"2"),
        Ent::dir("tree").mode(0o755),
        Ent::dir("tree/sub").mode(0o700),
        Ent::file("tree/sub/deep", b"deep"),
        Ent::file("tree/f", b"f"),
        Ent::file("tree", b"tree is a file now").mtime(3000, 0),
        Ent::file("orig", b"orig"),
        Ent::hardlink("link", "orig"),
        Ent::file("link", b"independent"),
        Ent::fifo("p2f"),
        Ent::file("p2f", b"was a fifo"),
    ];
    for mode in [WhiteoutMode::Overlay, WhiteoutMode::Apply] {
        for fmt in [Fmt::Gnu, Fmt::Pax] {
            let what = format!("{mode:?} {fmt:?}");
            let t = support::tempdir();
            let d = t.path();
            unpack_ok(&support::tar_of(&entries, fmt), d, &opts(mode));
            let n = node(&d.join("f2d"));
            assert_eq!((n.ty, n.mode, n.mtime.0), (Ty::Dir, 0o750, 2000), "{what}: f2d");
            let n = node(&d.join("d2f"));
            assert_eq!((n.ty, n.mode), (Ty::File, 0o640), "{what}: d2f");
            assert_eq!(read(&d.join("d2f")), b"now a file");
            assert_eq!(read(&d.join("s2f")), b"was a symlink", "{what}");
            assert_eq!(node(&d.join("s2f")).ty, Ty::File);
            assert_eq!(std::fs::read_link(d.join("f2s")).unwrap(), Path::new("elsewhere"), "{what}");
            assert_eq!(std::fs::read_link(d.join("d2s")).unwrap(), Path::new("x"), "{what}");
            let n = node(&d.join("f2f"));
            assert_eq!(read(&d.join("f2f")), b"second", "{what}");
            assert_eq!((n.mode, n.uid, n.gid), (0o644, 2, 2), "{what}: f2f metadata");
            let names: Vec<String> = n.xattrs.keys().map(|k| support::show(k)).collect();
            assert_eq!(names, ["user.second"], "{what}: xattrs of the replaced file leaked");
            let n = node(&d.join("tree"));
            assert_eq!((n.ty, n.mtime.0), (Ty::File, 3000), "{what}: tree");
            assert_eq!(read(&d.join("tree")), b"tree is a file now");
            assert_eq!(read(&d.join("orig")), b"orig", "{what}: writing `link` went through to `orig`");
            assert_eq!(read(&d.join("link")), b"independent");
            assert_eq!(node(&d.join("orig")).nlink, 1);
            assert_eq!(read(&d.join("p2f")), b"was a fifo");
            let mut all = listing(d);
            all.sort();
            assert_eq!(all, ["d2f", "d2s", "f2d", "f2f", "f2s", "link", "orig", "p2f", "s2f", "tree"], "{what}");
        }
    }
}

#[test]
fn duplicate_dir_entries_later_metadata_wins() {
    if !support::require_root("duplicate_dir_entries_later_metadata_wins") {
        return;
    }
    let entries = [
        Ent::dir("d").mode(0o700).owner(1, 1).mtime(1000, 0),
        Ent::file("d/f", b"f"),
        Ent::dir("d").mode(0o751).owner(2, 2).mtime(2000, 0),
        // dir → file → dir again
        Ent::dir("e").mode(0o700).mtime(1000, 0),
        Ent::file("e", b"file"),
        Ent::dir("e").mode(0o755).mtime(3000, 0),
    ];
    for mode in [WhiteoutMode::Overlay, WhiteoutMode::Apply] {
        let t = support::tempdir();
        let d = t.path();
        unpack_ok(&layer(&entries), d, &opts(mode));
        let n = node(&d.join("d"));
        assert_eq!(
            (n.mode, n.uid, n.gid, n.mtime.0),
            (0o751, 2, 2, 2000),
            "{mode:?}: `d` must have the later entry's mode, owner and mtime"
        );
        let n = node(&d.join("e"));
        assert_eq!(
            (n.ty, n.mode, n.mtime.0),
            (Ty::Dir, 0o755, 3000),
            "{mode:?}: `e` must have the last entry's mode and mtime"
        );
    }
}

#[test]
fn directory_mtimes_survive_later_children() {
    if !support::require_root("directory_mtimes_survive_later_children") {
        return;
    }
    let entries = [
        Ent::dir("a").mtime(1000, 1),
        Ent::dir("a/b").mtime(2000, 2),
        Ent::file("a/b/f", b"f").mtime(3000, 3),
        Ent::dir("z").mtime(4000, 4),
        Ent::file("a/late", b"late").mtime(5000, 5),
        Ent::symlink("a/b/l", "f").mtime(6000, 6),
        Ent::dir("a/b/c").mtime(7000, 7),
        Ent::fifo("a/b/c/p").mtime(8000, 8),
        Ent::file("z/zz", b"").mtime(9000, 9),
        Ent::whiteout("a/b/gone"),
    ];
    for pipelined in [true, false] {
        let t = support::tempdir();
        let d = t.path();
        let mut o = opts(WhiteoutMode::Overlay);
        o.pipelined = pipelined;
        unpack_ok(&layer(&entries), d, &o);
        for (p, want) in [
            ("a", (1000, 1)),
            ("a/b", (2000, 2)),
            ("a/b/f", (3000, 3)),
            ("z", (4000, 4)),
            ("a/late", (5000, 5)),
            ("a/b/l", (6000, 6)),
            ("a/b/c", (7000, 7)),
            ("a/b/c/p", (8000, 8)),
            ("z/zz", (9000, 9)),
        ] {
            assert_eq!(node(&d.join(p)).mtime, want, "{p} (pipelined {pipelined})");
        }
    }
}

#[test]
fn read_only_directories_are_filled() {
    if !support::require_root("read_only_directories_are_filled") {
        return;
    }
    let entries = [
        Ent::dir("ro").mode(0o555),
        Ent::dir("ro/sub").mode(0o500),
        Ent::file("ro/sub/f", b"f").mode(0o444),
        Ent::file("ro/g", b"g"),
        Ent::dir("none").mode(0o000),
        Ent::file("none/h", b"h"),
        Ent::symlink("ro/l", "g"),
    ];
    let t = support::tempdir();
    let d = t.path();
    unpack_ok(&layer(&entries), d, &opts(WhiteoutMode::Apply));
    assert_eq!(node(&d.join("ro")).mode, 0o555);
    assert_eq!(node(&d.join("ro/sub")).mode, 0o500);
    assert_eq!(node(&d.join("none")).mode, 0o000);
    assert_eq!(read(&d.join("ro/sub/f")), b"f");
    assert_eq!(read(&d.join("none/h")), b"h");
    // A second layer adds to and deletes from the read-only directories.
    let upper = [Ent::file("ro/new", b"new"), Ent::whiteout("ro/g"), Ent::opaque("none")];
    unpack_ok(&layer(&upper), d, &opts(WhiteoutMode::Apply));
    let mut all = listing(d);
    all.sort();
    assert_eq!(all, ["none", "ro", "ro/l", "ro/new", "ro/sub", "ro/sub/f"]);
    assert_eq!(node(&d.join("ro")).mode, 0o555, "mode of a directory the upper layer did not list");
}

#[test]
fn setuid_setgid_survive_chown() {
    if !support::require_root("setuid_setgid_survive_chown") {
        return;
    }
    let entries = [
        Ent::file("suid", b"#!").mode(0o4755).owner(1000, 1000),
        Ent::file("sgid", b"#!").mode(0o2755).owner(0, 4321),
        Ent::file("both", b"#!").mode(0o6711).owner(70_000, 80_000),
        Ent::file("sticky", b"").mode(0o1644).owner(5, 5),
        Ent::dir("sgdir").mode(0o2775).owner(0, 50),
        Ent::fifo("sfifo").mode(0o4644).owner(9, 9),
        Ent::file("capped", b"\x7fELF")
            .mode(0o4750)
            .owner(1000, 1000)
            .xattr("security.capability", cap_net_bind_service()),
    ];
    for pipelined in [true, false] {
        let t = support::tempdir();
        let d = t.path();
        let mut o = opts(WhiteoutMode::Overlay);
        o.pipelined = pipelined;
        unpack_ok(&layer(&entries), d, &o);
        for (p, mode, uid, gid) in [
            ("suid", 0o4755, 1000, 1000),
            ("sgid", 0o2755, 0, 4321),
            ("both", 0o6711, 70_000, 80_000),
            ("sticky", 0o1644, 5, 5),
            ("sgdir", 0o2775, 0, 50),
            ("sfifo", 0o4644, 9, 9),
            ("capped", 0o4750, 1000, 1000),
        ] {
            let n = node(&d.join(p));
            assert_eq!((n.mode, n.uid, n.gid), (mode, uid, gid), "{p}: mode {:o}", n.mode);
        }
        assert_eq!(
            support::lgetxattr(&d.join("capped"), b"security.capability"),
            Some(cap_net_bind_service()),
            "file capability lost (set before chown?)"
        );
    }
}

#[test]
fn apply_into_lower_setgid_dir_uses_header_owner_and_mode() {
    if !support::require_root("apply_into_lower_setgid_dir_uses_header_owner_and_mode") {
        return;
    }
    let t = support::tempdir();
    let d = t.path();
    let o = opts(WhiteoutMode::Apply);
    unpack_ok(&layer(&[Ent::dir("sg").mode(0o2775).owner(0, 50)]), d, &o);
    unpack_ok(
        &layer(&[
            Ent::file("sg/f", b"f").owner(0, 0),
            Ent::dir("sg/sub").mode(0o755).owner(0, 0),
            Ent::fifo("sg/p"),
            // Inside a directory this layer creates in the setgid one (itself setgid,
            // group 50, from creation on): its entries still end with the header's owner.
            Ent::file("sg/sub/f", b"f").owner(0, 0),
            Ent::dir("sg/sub/d").mode(0o755).owner(0, 0),
        ]),
        d,
        &o,
    );
    for (p, mode) in [("sg/f", 0o644), ("sg/sub", 0o755), ("sg/p", 0o644), ("sg/sub/f", 0o644), ("sg/sub/d", 0o755)] {
        let n = node(&d.join(p));
        assert_eq!((n.mode, n.uid, n.gid), (mode, 0, 0), "{p}: mode {:o} owner {}:{}", n.mode, n.uid, n.gid);
    }
}

#[test]
fn root_entry_metadata_applied() {
    if !support::require_root("root_entry_metadata_applied") {
        return;
    }
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        let t = support::tempdir();
        let d = t.path().join("dest");
        std::fs::create_dir(&d).unwrap();
        let root = Ent::dir(".").mode(0o751).owner(33, 44).mtime(1_234_567_890, 5).xattr("user.root", b"r");
        unpack_ok(&support::tar_of(&[root, Ent::file("f", b"f")], fmt), &d, &opts(WhiteoutMode::Overlay));
        let n = node(&d);
        assert_eq!((n.mode, n.uid, n.gid, n.mtime), (0o751, 33, 44, (1_234_567_890, 5)), "{fmt:?}");
        assert_eq!(n.xattrs.get(&b"user.root"[..]).map(Vec::as_slice), Some(&b"r"[..]), "{fmt:?}: root xattrs dropped");
    }
}

#[test]
fn symlink_xattrs_from_pax() {
    if !support::require_root("symlink_xattrs_from_pax") {
        return;
    }
    for fmt in [Fmt::Gnu, Fmt::Pax] {
        let t = support::tempdir();
        let d = t.path();
        let entries = [
            Ent::file("target", b"t"),
            Ent::symlink("link", "target").xattr("trusted.on-link", b"\x00link").mtime(1111, 2),
            Ent::symlink("dangling", "/nope").xattr("trusted.x", b"").owner(7, 8),
        ];
        unpack_ok(&support::tar_of(&entries, fmt), d, &opts(WhiteoutMode::Overlay));
        let l = node(&d.join("link"));
        assert_eq!(l.ty, Ty::Symlink);
        assert_eq!(l.xattrs.get(&b"trusted.on-link"[..]).map(Vec::as_slice), Some(&b"\x00link"[..]), "{fmt:?}");
        assert_eq!(l.mtime, (1111, 2));
        assert!(node(&d.join("target")).xattrs.is_empty(), "{fmt:?}: xattr went through the symlink");
        let n = node(&d.join("dangling"));
        assert_eq!((n.uid, n.gid), (7, 8));
        assert!(n.xattrs.contains_key(&b"trusted.x"[..]));
    }
}

/// More directories than the extractor caches descriptors for, revisited out of order.
#[test]
fn many_directories_revisited() {
    if !support::require_root("many_directories_revisited") {
        return;
    }
    let n = 700;
    let mut entries = Vec::new();
    for i in 0..n {
        entries.push(Ent::dir(&format!("d{i}")).mode(0o750).mtime(i, 0));
        entries.push(Ent::file(&format!("d{i}/first"), b"1"));
    }
    for i in (0..n).rev() {
        entries.push(Ent::file(&format!("d{i}/second"), format!("{i}")));
        entries.push(Ent::file(&format!("d{i}/nested/x/y"), b"y"));
    }
    let t = support::tempdir();
    let d = t.path();
    for pipelined in [true, false] {
        let dest = d.join(format!("{pipelined}"));
        std::fs::create_dir(&dest).unwrap();
        let mut o = opts(WhiteoutMode::Overlay);
        o.pipelined = pipelined;
        let stats = unpack_ok(&layer(&entries), &dest, &o);
        assert_eq!(stats.files, 3 * n as u64);
        for i in 0..n {
            let p = dest.join(format!("d{i}"));
            assert_eq!(read(&p.join("second")), format!("{i}").as_bytes());
            assert_eq!(read(&p.join("nested/x/y")), b"y");
            let m = node(&p);
            assert_eq!((m.mode, m.mtime.0), (0o750, i), "d{i}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Progress and digests

struct Chunked<'a>(&'a [u8], usize);

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.1.min(buf.len()).min(self.0.len());
        buf[..k].copy_from_slice(&self.0[..k]);
        self.0 = &self.0[k..];
        Ok(k)
    }
}

fn sample_tar() -> Vec<u8> {
    let mut entries = vec![Ent::dir("d")];
    for i in 0..20 {
        entries.push(Ent::file(&format!("d/f{i}"), support::pseudo_random(i, 40_000 + i as usize * 997)));
    }
    entries.push(Ent::symlink("l", "d/f1"));
    let mut tar = layer(&entries);
    tar.resize(tar.len().div_ceil(10240) * 10240, 0);
    tar
}

#[test]
fn progress_reports_blob_bytes() {
    let tar = sample_tar();
    for (blob, what) in [(tar.clone(), "tar"), (support::gzip(&tar), "gzip"), (support::zstd(&tar), "zstd")] {
        for pipelined in [true, false] {
            let t = support::tempdir();
            let mut o = UnpackOptions::default();
            o.pipelined = pipelined;
            o.chown = false;
            let mut seen: Vec<u64> = Vec::new();
            let stats = unpack_with_progress(Chunked(&blob, 7000), t.path(), &o, &mut |n| seen.push(n))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(seen.len() > 2, "{what}: {} progress calls", seen.len());
            assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{what}: progress went backwards: {seen:?}");
            assert!(seen.windows(2).any(|w| w[0] < w[1]));
            assert_eq!(seen.last().copied(), Some(blob.len() as u64), "{what} pipelined={pipelined}");
            assert!(seen.iter().all(|&n| n <= blob.len() as u64));
            assert_eq!(stats.compressed_bytes, blob.len() as u64);
        }
    }
}

#[test]
fn digest_and_diff_id_verification() {
    let tar = sample_tar();
    let diff_id: rootfs_cache::Digest = support::sha256_digest(&tar).parse().unwrap();
    for (blob, c) in [
        (tar.clone(), Compression::None),
        (support::gzip(&tar), Compression::Gzip),
        (support::zstd(&tar), Compression::Zstd),
    ] {
        let digest: rootfs_cache::Digest = support::sha256_digest(&blob).parse().unwrap();
        for pipelined in [true, false] {
            let t = support::tempdir();
            let mut o = UnpackOptions::default();
            o.pipelined = pipelined;
            o.expected_digest = Some(digest);
            o.expected_diff_id = Some(diff_id);
            let stats = unpack(&blob[..], t.path(), &o).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            assert_eq!(stats.digest, digest);
            assert_eq!(stats.diff_id, Some(diff_id), "{c:?}");
            assert_eq!(stats.compression, c);
            assert_eq!(stats.uncompressed_bytes, tar.len() as u64);
            assert_eq!(stats.files, 20);
            assert_eq!(read(&t.path().join("d/f3")), support::pseudo_random(3, 40_000 + 3 * 997));
            // The same blob against a wrong digest fails as a digest mismatch.
            let wrong: rootfs_cache::Digest = support::sha256_digest(b"something else").parse().unwrap();
            for (dig, did) in [(Some(wrong), None), (None, Some(wrong))] {
                let t = support::tempdir();
                let mut o = UnpackOptions::default();
                o.pipelined = pipelined;
                o.expected_digest = dig;
                o.expected_diff_id = did;
                match unpack(&blob[..], t.path(), &o) {
                    Err(Error::DigestMismatch { expected, found }) => {
                        assert_eq!(expected, wrong);
                        assert!(found == digest || found == diff_id);
                    }
                    other => panic!("{c:?}: expected a digest mismatch, got {other:?}"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rootless: in a user namespace, and as a real unprivileged uid

const CHILD_ENV: &str = "ROOTFS_CACHE_FEATURES_CHILD";

/// Not a test by itself: the body that `run_child` runs in another process, under
/// `unshare -Ur` or `setpriv`. The spec is `DEST\nMODE\nLAYER...`; extraction uses
/// `UnpackOptions::rootless()` (with `--apply`-like Apply mode when MODE is `apply`).
#[test]
fn child_unpack_helper() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let mut lines = spec.lines();
    let dest = PathBuf::from(lines.next().unwrap());
    let mut o = UnpackOptions::rootless();
    if lines.next() == Some("apply") {
        o.whiteouts = WhiteoutMode::Apply;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap_or("CapEff: ?").to_string();
    println!("CHILD-ID euid={} {}", nix::unistd::geteuid(), cap_eff.replace('\t', " "));
    for layer in lines {
        let f = File::open(layer).unwrap();
        match unpack(f, &dest, &o) {
            Ok(s) => println!(
                "CHILD-STATS skipped_devices={} skipped_xattrs={} whiteouts={} files={}",
                s.skipped_devices, s.skipped_xattrs, s.whiteouts, s.files
            ),
            Err(e) => {
                println!("CHILD-ERROR {layer}: {e}");
                return;
            }
        }
    }
}

/// Run `child_unpack_helper` under `wrapper`; returns the `CHILD-*` lines.
fn run_child(wrapper: &[&str], dest: &Path, mode: &str, layers: &[PathBuf]) -> Vec<String> {
    let exe = support::shared_current_exe(); // nobody may not reach target/ (a 0700 checkout)
    let mut spec = format!("{}\n{mode}", dest.display());
    for l in layers {
        spec.push('\n');
        spec.push_str(l.to_str().unwrap());
    }
    let out = support::run(
        Command::new(wrapper[0])
            .args(&wrapper[1..])
            .arg(exe.path())
            .args(["--exact", "child_unpack_helper", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, spec),
    );
    let lines: Vec<String> =
        String::from_utf8_lossy(&out).lines().filter_map(|l| l.find("CHILD-").map(|i| l[i..].to_string())).collect();
    assert!(lines.iter().any(|l| l.starts_with("CHILD-ID")), "helper did not run: {}", String::from_utf8_lossy(&out));
    if let Some(e) = lines.iter().find(|l| l.starts_with("CHILD-ERROR")) {
        panic!("unprivileged extraction failed: {e}\n{lines:#?}");
    }
    lines
}

fn stat_field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

fn rootless_layer() -> Vec<Ent> {
    vec![
        Ent::dir("d").mode(0o755),
        Ent::file("d/keep", b"keep").xattr("user.ok", b"1").xattr("trusted.refused", b"1"),
        Ent::opaque("d"),
        Ent::whiteout("gone"),
        Ent::char_dev("null", 1, 3),
        Ent::block_dev("loop0", 7, 0),
        Ent::fifo("fifo").mode(0o600),
        Ent::dir("ro").mode(0o555),
        Ent::dir("ro/sub").mode(0o500),
        Ent::file("ro/sub/f", b"f").mode(0o400),
        Ent::file("ro/g", b"g"),
        Ent::dir("none").mode(0o000),
        Ent::file("none/h", b"h"),
        Ent::file("suid", b"#!").mode(0o4755).owner(0, 0),
        Ent::symlink("link", "/etc/passwd").owner(5, 5),
        Ent::hardlink("hl", "d/keep"),
    ]
}

fn check_rootless_tree(d: &Path, uid: u32, lines: &[String]) {
    let stats = lines.iter().find(|l| l.starts_with("CHILD-STATS")).expect("stats line");
    assert_eq!(stat_field(stats, "skipped_devices"), 2, "{stats}");
    assert_eq!(stat_field(stats, "skipped_xattrs"), 1, "{stats}");
    assert_eq!(stat_field(stats, "whiteouts"), 2, "{stats}");
    let dn = node(&d.join("d"));
    assert_eq!(dn.xattrs.get(&b"user.overlay.opaque"[..]).map(Vec::as_slice), Some(&b"y"[..]), "{:?}", dn.xattrs);
    assert!(!dn.xattrs.contains_key(&b"trusted.overlay.opaque"[..]));
    assert!(is_whiteout(&node(&d.join("gone"))), "{:?}", node(&d.join("gone")));
    assert!(!exists(&d.join("null")) && !exists(&d.join("loop0")), "devices were not skipped");
    assert_eq!(node(&d.join("fifo")).ty, Ty::Fifo);
    let keep = node(&d.join("d/keep"));
    let names: Vec<String> = keep.xattrs.keys().map(|k| support::show(k)).collect();
    assert_eq!(names, ["user.ok"]);
    assert_eq!(keep.ino, node(&d.join("hl")).ino);
    assert_eq!((node(&d.join("ro")).mode, node(&d.join("ro/sub")).mode, node(&d.join("none")).mode), (0o555, 0o500, 0));
    assert_eq!(read(&d.join("ro/sub/f")), b"f");
    assert_eq!(read(&d.join("none/h")), b"h");
    let s = node(&d.join("suid"));
    assert_eq!((s.mode, s.uid), (0o4755, uid));
    for (p, n) in snapshot(d) {
        assert_eq!(n.uid, uid, "{} not owned by the extracting user", support::show(&p));
    }
}

fn write_layer(dir: &Path, name: &str, entries: &[Ent]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, support::gzip(&layer(entries))).unwrap();
    p
}

#[test]
fn rootless_in_user_namespace() {
    if !support::require_root("rootless_in_user_namespace")
        || !support::require_tools("rootless_in_user_namespace", &["unshare"])
    {
        return;
    }
    if !Command::new("unshare").args(["-Ur", "true"]).status().is_ok_and(|s| s.success()) {
        support::skip("rootless_in_user_namespace: `unshare -Ur` does not work here");
        return;
    }
    let t = support::tempdir();
    let l = write_layer(t.path(), "layer.tar.gz", &rootless_layer());
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let lines = run_child(&["unshare", "-Ur", "--"], &dest, "overlay", &[l]);
    let id = &lines[0];
    assert!(id.contains("euid=0"), "{id}");
    // uid 0 in the namespace is uid 0 outside (unshare -r maps the caller).
    check_rootless_tree(&dest, 0, &lines);
}

#[test]
fn rootless_as_unprivileged_uid() {
    if !support::require_root("rootless_as_unprivileged_uid")
        || !support::require_tools("rootless_as_unprivileged_uid", &["setpriv"])
    {
        return;
    }
    let t = support::tempdir();
    let l = write_layer(t.path(), "layer.tar.gz", &rootless_layer());
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    support::lchown(&dest, 65534, 65534);
    let lines =
        run_child(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"], &dest, "overlay", &[l]);
    assert!(lines[0].contains("euid=65534") && lines[0].contains("CapEff: 0000000000000000"), "{}", lines[0]);
    check_rootless_tree(&dest, 65534, &lines);
}

/// Unprivileged, `user.*` xattrs need write permission on the inode: a file the archive
/// marks read-only must still get its xattrs (set them before the final mode).
#[test]
fn rootless_unprivileged_keeps_user_xattrs_on_read_only_files() {
    if !support::require_root("rootless_unprivileged_keeps_user_xattrs_on_read_only_files")
        || !support::require_tools("rootless_unprivileged_keeps_user_xattrs_on_read_only_files", &["setpriv"])
    {
        return;
    }
    let t = support::tempdir();
    let l = write_layer(
        t.path(),
        "layer.tar.gz",
        &[
            Ent::file("r444", b"r").mode(0o444).xattr("user.keep", b"1"),
            Ent::file("r000", b"r").mode(0o000).xattr("user.keep", b"2"),
            Ent::file("rw", b"w").mode(0o644).xattr("user.keep", b"3"),
        ],
    );
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    support::lchown(&dest, 65534, 65534);
    let lines =
        run_child(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"], &dest, "overlay", &[l]);
    for (p, v, mode) in [("rw", b"3", 0o644), ("r444", b"1", 0o444), ("r000", b"2", 0)] {
        let n = node(&dest.join(p));
        assert_eq!(n.mode, mode, "{p}");
        assert_eq!(
            n.xattrs.get(&b"user.keep"[..]).map(Vec::as_slice),
            Some(&v[..]),
            "{p} (mode {mode:o}) lost its user xattr: {lines:?}"
        );
    }
}

/// Flattening several layers as an unprivileged user: later layers add to, delete from
/// and make opaque directories that earlier layers made read-only (as Fedora's
/// `dr-xr-xr-x /usr/bin` is).
#[test]
fn rootless_apply_into_read_only_lower_dirs() {
    if !support::require_root("rootless_apply_into_read_only_lower_dirs")
        || !support::require_tools("rootless_apply_into_read_only_lower_dirs", &["setpriv"])
    {
        return;
    }
    let t = support::tempdir();
    let l1 = write_layer(
        t.path(),
        "l1.tar.gz",
        &[
            Ent::dir("usr").mode(0o755),
            Ent::dir("usr/bin").mode(0o555),
            Ent::file("usr/bin/a", b"a").mode(0o755),
            Ent::file("usr/bin/b", b"b").mode(0o755),
            Ent::dir("usr/lib").mode(0o555),
            Ent::file("usr/lib/x", b"x"),
            Ent::dir("usr/lib/ro").mode(0o555),
            Ent::file("usr/lib/ro/y", b"y"),
            Ent::dir("gone").mode(0o555),
            Ent::file("gone/z", b"z"),
        ],
    );
    let l2 = write_layer(
        t.path(),
        "l2.tar.gz",
        &[
            Ent::file("usr/bin/new", b"new").mode(0o755),
            Ent::whiteout("usr/bin/a"),
            Ent::file("usr/bin/b", b"b2").mode(0o755),
            Ent::opaque("usr/lib"),
            Ent::whiteout("gone"),
        ],
    );
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    support::lchown(&dest, 65534, 65534);
    run_child(&["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"], &dest, "apply", &[l1, l2]);
    let mut all = listing(&dest);
    all.sort();
    assert_eq!(all, ["usr", "usr/bin", "usr/bin/b", "usr/bin/new", "usr/lib"]);
    assert_eq!(read(&dest.join("usr/bin/b")), b"b2");
    assert_eq!(node(&dest.join("usr/bin")).mode, 0o555, "read-only mode not restored");
    assert_eq!(node(&dest.join("usr/lib")).mode, 0o555, "read-only mode not restored");
}

#[test]
fn rootless_options_as_root_skip_devices() {
    // Without any privilege change: rootless() must not create devices even when it could.
    let t = support::tempdir();
    let stats = unpack_ok(&layer(&rootless_layer()), t.path(), &UnpackOptions::rootless());
    assert_eq!(stats.skipped_devices, 2);
    assert!(!exists(&t.path().join("null")));
    assert_eq!(std::fs::metadata(t.path().join("ro")).unwrap().permissions().mode() & 0o7777, 0o555);
    assert_eq!(std::fs::metadata(t.path().join("d/keep")).unwrap().uid(), nix::unistd::geteuid().as_raw());
}
