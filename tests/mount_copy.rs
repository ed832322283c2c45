//! `CopyBackend` against the kernel's overlayfs as the oracle.
//!
//! - Same visible tree: a hand-written layer stack (tar layers through `unpack`, with
//!   whiteouts, opaque dirs, type flips across layers, hardlinks, symlinks, devices,
//!   odd modes, owners, mtimes, escaped image xattrs) plus a pre-populated upper, and
//!   random stacks: the copy target must look exactly like a kernel overlay of the same
//!   layers (directory mtimes and hardlink groups included).
//! - Fold-back: mount with the copy backend, change things through the target, take
//!   the view `M`, unmount (fold into the upper). A kernel overlay of the same lowers
//!   and the resulting upper, and a second copy mount, must both show `M`. A property
//!   test (random lowers, random upper, one or two sessions of random operations;
//!   `PROPTEST_CASES`, default 64), hand-written scenarios, repeated sessions (also
//!   against the same sessions run through the kernel, and mixed kernel/copy sessions),
//!   operations issued the instant `mount` returns, and a target on a filesystem with
//!   one-second timestamps (the ctime-based change detection).
//! - Refusals and cleanup: `NotEmpty`, `AlreadyMounted`, repeated unmounts, the state
//!   file's lifecycle (resumed and damaged), lowers untouched (hardlinked ones too).
//! - Rootless: the copy backend inside an unprivileged user namespace (`user.overlay.*`
//!   xattrs, unprivileged 0:0 whiteouts), checked against a kernel overlay mounted in
//!   the same namespace with `userxattr`.
//!
//! What is not compared, on purpose: hardlink groups after a fold (a lower hardlink
//! pair is one inode in the copy target, while the kernel, with `index=off`, copies up
//! only the name that is written), link counts, and inode numbers. The random tests
//! run twice: a lenient variant, and a strict one that also covers directory mtimes
//! after a fold, directory xattrs in several layers, removed directory xattrs and
//! `user.overlay.*` xattrs (each first found as a bug, pinned by a test at the end).
//!
//! Needs root; run as the README says
//! (`unshare -m --propagation private -- cargo test --test mount_copy`).

#[path = "common/ops.rs"]
mod ops;
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use ops::{
    LAYER_XATTRS, LEnt, OP_XATTRS, Op, OpMix, Snap, XattrPolicy, is_whiteout, ls, opaque, strict_cmp, try_lremovexattr,
    view, whiteout, write,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rootfs_cache::{CopyBackend, Error, KernelOverlay, MountBackend, OverlayMount, OverlaySpec, UnpackOptions, unpack};
use support::{Cmp, Ent, Fmt, Ty};

const STATE: &str = "rootfs-cache-copy";
const ROOTLESS_ENV: &str = "ROOTFS_CACHE_TEST_ROOTLESS_DIR";

// ---------------------------------------------------------------------------------------
// Helpers

/// [`strict_cmp`] without directory mtimes (see `parent_dir_mtime_kept_after_child_copy_up`).
fn cmp_no_dir_mtime() -> Cmp {
    Cmp { dir_mtime: false, ..strict_cmp() }
}

fn check(what: &str, expected: &Snap, actual: &Snap, cmp: &Cmp) {
    support::assert_no_diffs(what, &support::diff_trees(expected, actual, cmp));
}

fn mkdirs(base: &Path, names: &[&str]) -> Vec<PathBuf> {
    names
        .iter()
        .map(|n| {
            let p = base.join(n);
            fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            p
        })
        .collect()
}

/// `cp -a src dst` (dst must not exist): data, modes, owners, times, xattrs (trusted.*
/// too, as root), hardlinks, whiteout devices.
fn cp_a(src: &Path, dst: &Path) {
    support::run(Command::new("cp").arg("-a").arg(src).arg(dst));
}

fn unique(base: &Path, prefix: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    base.join(format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed)))
}

/// The kernel overlay's view of `lowers` + a copy of `upper` (the upper itself is never
/// mounted, so it stays exactly as the copy backend left it).
fn kernel_view(lowers: &[PathBuf], upper: &Path, scratch: &Path) -> Snap {
    let base = unique(scratch, "kernel");
    fs::create_dir(&base).unwrap();
    let ku = base.join("upper");
    cp_a(upper, &ku);
    let (kw, kt) = (base.join("work"), base.join("merged"));
    fs::create_dir(&kw).unwrap();
    fs::create_dir(&kt).unwrap();
    let spec = OverlaySpec::new(lowers.to_vec(), &ku, &kw, &kt);
    let kernel = KernelOverlay::new();
    let m = OverlayMount::mount(&kernel, spec).unwrap_or_else(|e| panic!("kernel mount: {e}"));
    let v = view(&kt);
    m.unmount().expect("kernel unmount");
    fs::remove_dir_all(&base).unwrap();
    v
}

/// The copy backend's view of `lowers` + `upper`, unmounting afterwards without changes.
fn copy_view(lowers: &[PathBuf], upper: &Path, scratch: &Path) -> Snap {
    let base = unique(scratch, "copy");
    let (w, t) = (base.join("work"), base.join("target"));
    fs::create_dir_all(&w).unwrap();
    fs::create_dir_all(&t).unwrap();
    let spec = OverlaySpec::new(lowers.to_vec(), upper, &w, &t);
    let copy = CopyBackend::new();
    let m = OverlayMount::mount(&copy, spec).unwrap_or_else(|e| panic!("copy mount: {e}"));
    let v = view(&t);
    m.unmount().expect("copy unmount");
    fs::remove_dir_all(&base).unwrap();
    v
}

fn layer_from(entries: &[Ent], dest: &Path) {
    let blob = support::tar_of(entries, Fmt::Pax);
    fs::create_dir_all(dest).unwrap();
    unpack(&blob[..], dest, &UnpackOptions::default()).unwrap_or_else(|e| panic!("unpack {}: {e}", dest.display()));
}

fn is_opaque(p: &Path, name: &[u8]) -> bool {
    support::lgetxattr(p, name).as_deref() == Some(b"y")
}

fn assert_empty_dir(p: &Path, what: &str) {
    let l = ls(p);
    assert!(l.is_empty(), "{what} {} not empty: {l:?}", p.display());
}

/// One sandbox's dirs: lowers (top first), upper, work and target, all under `base`.
struct Sandbox {
    base: PathBuf,
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    target: PathBuf,
}

impl Sandbox {
    fn new(base: &Path, nlowers: usize) -> Sandbox {
        let lowers = (0..nlowers).map(|i| mkdirs(base, &[&format!("l{i}")]).remove(0)).collect();
        let [upper, work, target]: [PathBuf; 3] = mkdirs(base, &["upper", "work", "target"]).try_into().unwrap();
        Sandbox { base: base.to_path_buf(), lowers, upper, work, target }
    }

    fn spec(&self) -> OverlaySpec {
        OverlaySpec::new(self.lowers.clone(), &self.upper, &self.work, &self.target)
    }

    fn t(&self, rel: &str) -> PathBuf {
        self.target.join(rel)
    }

    /// Mounts with the copy backend, runs `ops` on the target, snapshots it (`M`),
    /// unmounts, and checks that the kernel and a second copy mount both show `M`.
    /// Returns `M`.
    fn session(&self, cmp: &Cmp, ops: impl FnOnce(&Path)) -> Snap {
        let copy = CopyBackend::new();
        copy.mount(&self.spec()).unwrap_or_else(|e| panic!("copy mount: {e}"));
        ops(&self.target);
        let m = view(&self.target);
        copy.unmount(&self.spec()).unwrap_or_else(|e| panic!("copy unmount: {e}"));
        self.assert_unmounted();
        check("kernel view after fold vs target before unmount", &m, &self.kernel(), cmp);
        check("copy view after fold vs target before unmount", &m, &self.copy(), cmp);
        m
    }

    fn kernel(&self) -> Snap {
        kernel_view(&self.lowers, &self.upper, &self.base)
    }

    fn copy(&self) -> Snap {
        copy_view(&self.lowers, &self.upper, &self.base)
    }

    fn assert_unmounted(&self) {
        assert_empty_dir(&self.target, "target after unmount");
        assert_empty_dir(&self.work, "work dir after unmount");
    }
}

// ---------------------------------------------------------------------------------------
// 1. Same visible tree as the kernel

fn elf(seed: u64) -> Vec<u8> {
    let mut v = b"\x7fELF".to_vec();
    v.extend(support::pseudo_random(seed, 3000));
    v
}

/// Three tar layers (bottom, middle, top) and an upper, in overlay format via `unpack`.
fn stack_a(sb: &Sandbox) {
    let bottom = vec![
        Ent::dir("etc").mode(0o755).mtime(1_500_000_000, 1),
        Ent::file("etc/passwd", "root:x:0:0\n").mtime(1_500_000_001, 123_456_789),
        Ent::file("etc/group", "root:x:0:\n"),
        Ent::file("etc/shadow", "secret").mode(0o640).owner(0, 42),
        Ent::dir("bin").mtime(1_400_000_000, 0),
        Ent::file("bin/sh", elf(1)).mode(0o755),
        Ent::file("bin/su", elf(2)).mode(0o4755),
        Ent::file("bin/wall", elf(3)).mode(0o2755).owner(0, 5),
        Ent::dir("tmp").mode(0o1777),
        Ent::file("tmp/lower-tmp", "t"),
        Ent::dir("d2f"),
        Ent::file("d2f/inner", "x"),
        Ent::dir("d2f/sub"),
        Ent::file("d2f/sub/deep", "deep"),
        Ent::file("f2d", "was a file"),
        Ent::dir("hard"),
        Ent::file("hard/a", "shared").owner(1000, 1000).mode(0o600).mtime(1_234_567_890, 42),
        Ent::hardlink("hard/b", "hard/a"),
        Ent::hardlink("hard/c", "hard/a"),
        Ent::dir("opq"),
        Ent::file("opq/old1", "old"),
        Ent::dir("opq/olddir"),
        Ent::file("opq/olddir/x", "x"),
        Ent::dir("fakeopq"),
        Ent::file("fakeopq/bottom", "still visible"),
        Ent::dir("wh"),
        Ent::file("wh/gone", "gone"),
        Ent::file("wh/keep", "keep"),
        Ent::dir("wh/gonedir"),
        Ent::file("wh/gonedir/f", "f"),
        Ent::symlink("link", "etc/passwd").owner(3, 4).mtime(1_300_000_000, 7),
        Ent::fifo("fifo").mode(0o620).owner(7, 8).mtime(1_000, 1),
        Ent::char_dev("null", 1, 3),
        Ent::block_dev("blk", 7, 200).owner(0, 6),
        Ent::file("esc", "x").xattr("trusted.overlay.foo", "image").xattr("user.x", "1").xattr("trusted.t", "t"),
        Ent::dir("escdir").xattr("trusted.overlay.foo", "dir").xattr("user.d", "v"),
        Ent::file("neg", "old").mtime(-1_000_000, 5),
        Ent::dir("usr"),
        Ent::dir("usr/share"),
        Ent::file("usr/share/doc", "doc"),
        Ent::dir("usr/lib"),
        Ent::file("usr/lib/libc.so", elf(4)),
    ];
    let middle = vec![
        Ent::file("d2f", "now a file").mode(0o600),
        Ent::dir("f2d").mode(0o750).owner(1, 1).mtime(1_111_111_111, 111),
        Ent::file("f2d/child", "child"),
        Ent::dir("opq"),
        Ent::opaque("opq"),
        Ent::file("opq/new1", "new1"),
        Ent::dir("fakeopq"),
        Ent::file("fakeopq/middle", "m"),
        Ent::dir("wh"),
        Ent::whiteout("wh/gone"),
        Ent::whiteout("wh/gonedir"),
        Ent::dir("etc").mode(0o750).owner(0, 42).mtime(1_500_000_100, 999_999_999),
        Ent::file("etc/passwd", "root:x:0:0:changed\n").mode(0o600).mtime(1_500_000_200, 5),
        Ent::dir("hard"),
        Ent::whiteout("hard/c"),
        Ent::dir("usr"),
        Ent::whiteout("usr/share"),
        Ent::dir("usr/lib"),
        Ent::file("usr/lib/libnew.so", elf(5)),
        Ent::dir("newdir/nested/deeper").mode(0o711),
        Ent::file("newdir/nested/deeper/f", "deep new"),
        Ent::symlink("newdir/abs", "/nonexistent/abs/target"),
        Ent::dir("tmp").mode(0o1777),
        Ent::file("tmp/mid", "mid"),
    ];
    let top = vec![
        Ent::dir("d2f").mode(0o700).mtime(1_600_000_000, 5),
        Ent::file("d2f/again", "again"),
        Ent::file("f2d", "file again").mode(0o4711).owner(2, 3),
        Ent::dir("opq"),
        Ent::file("opq/top", "top"),
        Ent::dir("fakeopq").xattr("trusted.overlay.opaque", "y"),
        Ent::file("fakeopq/top", "t"),
        Ent::dir("usr"),
        Ent::dir("usr/share"),
        Ent::file("usr/share/readme", "readme"),
        Ent::dir("hard2"),
        Ent::file("hard2/x", "linked").mode(0o640).owner(5, 6),
        Ent::hardlink("hard2/y", "hard2/x"),
        Ent::symlink("dangling", "/nonexistent/path").mtime(1_200_000_000, 3),
        Ent::dir("etc"),
        Ent::symlink("etc/link2", "../bin/sh").xattr("trusted.sym", "s"),
        Ent::whiteout("neg"),
        Ent::file("esc2", "e").xattr("trusted.overlay.opaque", "y").xattr("trusted.overlay.overlay.x", "double"),
        Ent::file("big", support::pseudo_random(9, 200_000)).mode(0o444).mtime(1_650_000_000, 987_654_321),
    ];
    let upper = vec![
        Ent::dir("etc"),
        Ent::file("etc/group", "upper group").mode(0o664).owner(0, 7),
        Ent::whiteout("link"),
        Ent::dir("tmp").mode(0o1777),
        Ent::opaque("tmp"),
        Ent::file("tmp/upper-only", "u"),
        Ent::dir("wh"),
        Ent::whiteout("wh/keep"),
        Ent::dir("updir").mode(0o700).owner(1000, 1000).mtime(1_690_000_000, 1),
        Ent::file("updir/a", "upper linked"),
        Ent::hardlink("updir/b", "updir/a"),
        Ent::file("esc", "upper version").xattr("user.y", "2").xattr("trusted.overlay.bar", "u"),
        Ent::dir("usr"),
        Ent::dir("usr/lib"),
        Ent::opaque("usr/lib"),
        Ent::file("usr/lib/only", "only"),
        Ent::whiteout("nothing-below"),
    ];
    for (entries, dest) in [(&bottom, &sb.lowers[2]), (&middle, &sb.lowers[1]), (&top, &sb.lowers[0])] {
        layer_from(entries, dest);
    }
    layer_from(&upper, &sb.upper);
}

#[test]
fn same_view_as_kernel_hand_written_stack() {
    if !support::require_root("same_view_as_kernel_hand_written_stack") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 3);
    stack_a(&sb);
    let k = sb.kernel();
    let spec = sb.spec();
    let copy = CopyBackend::new();
    let m = OverlayMount::mount(&copy, spec).expect("copy mount");
    let c = view(&sb.target);
    let mut cmp = strict_cmp();
    cmp.hardlinks = true;
    check("copy vs kernel", &k, &c, &cmp);

    // A few of the expectations spelled out, so the oracle itself is sane.
    let names = |p: &str| ls(&sb.t(p));
    assert_eq!(names("opq"), ["new1", "top"]);
    assert_eq!(names("fakeopq"), ["bottom", "middle", "top"]);
    assert_eq!(names("wh"), Vec::<String>::new());
    assert_eq!(names("d2f"), ["again"]);
    assert_eq!(names("usr/share"), ["readme"]);
    assert_eq!(names("usr/lib"), ["only"]);
    assert_eq!(names("tmp"), ["upper-only"]);
    assert_eq!(names("hard"), ["a", "b"]);
    assert!(fs::symlink_metadata(sb.t("link")).is_err() && fs::symlink_metadata(sb.t("neg")).is_err());
    assert!(fs::symlink_metadata(sb.t("nothing-below")).is_err());
    assert_eq!(fs::read(sb.t("f2d")).unwrap(), b"file again");
    assert_eq!(fs::read(sb.t("esc")).unwrap(), b"upper version");
    assert_eq!(support::lgetxattr(&sb.t("esc"), b"trusted.overlay.bar").as_deref(), Some(&b"u"[..]));
    assert_eq!(support::lgetxattr(&sb.t("escdir"), b"trusted.overlay.foo").as_deref(), Some(&b"dir"[..]));
    assert_eq!(support::lgetxattr(&sb.t("esc2"), b"trusted.overlay.overlay.x").as_deref(), Some(&b"double"[..]));
    assert_eq!(support::lgetxattr(&sb.t("fakeopq"), b"trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
    for p in ["tmp", "usr/lib", "opq"] {
        assert_eq!(support::lgetxattr(&sb.t(p), b"trusted.overlay.opaque"), None, "{p}: overlay metadata shown");
    }
    assert_eq!(fs::symlink_metadata(sb.t("bin/su")).unwrap().mode() & 0o7777, 0o4755);
    m.unmount().expect("copy unmount");
    sb.assert_unmounted();
}

// ---------------------------------------------------------------------------------------
// Random layer stacks and operations

/// More, that only the strict variant uses (`user_overlay_xattrs_are_plain_in_trusted_mode`).
const LAYER_XATTRS_STRICT: [&str; 2] = ["user.overlay.overlay.bar", "user.overlay.baz"];
const OP_XATTRS_STRICT: [&str; 1] = ["user.overlay.q"];

/// Random stacks: `strict` also exercises what earlier bugs broke (per-layer directory
/// xattrs, `user.overlay.*` xattrs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Lenient,
    Strict,
}

/// Random layers; files up to 5000 bytes.
fn layer_strategy(max: usize) -> impl Strategy<Value = Vec<LEnt>> {
    ops::layer_strategy(max, 1000..5000)
}

/// [`ops::build_layer`] for a layer or an upper. Directories get xattrs only in strict
/// mode: a lower directory's xattrs leak into the copy backend's view of a merged
/// directory (`merged_dir_shows_only_the_top_layers_xattrs`).
fn build_layer(root: &Path, ents: &[LEnt], mode: Mode) {
    let pool: Vec<&'static str> = match mode {
        Mode::Lenient => LAYER_XATTRS.to_vec(),
        Mode::Strict => LAYER_XATTRS.iter().chain(&LAYER_XATTRS_STRICT).copied().collect(),
    };
    ops::build_layer(root, ents, &pool, mode == Mode::Strict);
}

#[derive(Clone, Debug)]
struct Stack {
    /// Top first.
    lowers: Vec<Vec<LEnt>>,
    upper: Vec<LEnt>,
}

fn stack_strategy() -> impl Strategy<Value = Stack> {
    (proptest::collection::vec(layer_strategy(16), 1..=3), prop_oneof![Just(Vec::new()), layer_strategy(8)])
        .prop_map(|(lowers, upper)| Stack { lowers, upper })
}

fn build_stack(base: &Path, stack: &Stack, mode: Mode) -> Sandbox {
    let sb = Sandbox::new(base, stack.lowers.len());
    for (l, ents) in sb.lowers.iter().zip(&stack.lowers) {
        build_layer(l, ents, mode);
    }
    build_layer(&sb.upper, &stack.upper, mode);
    sb
}

fn ensure(what: &str, expected: &Snap, actual: &Snap, cmp: &Cmp) -> Result<(), TestCaseError> {
    let d = support::diff_trees(expected, actual, cmp);
    if d.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = d.iter().take(40).map(String::as_str).collect();
    Err(TestCaseError::fail(format!("{what}: {} differences:\n  {}", d.len(), shown.join("\n  "))))
}

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

fn same_view_random(mode: Mode) {
    let result = runner().run(&stack_strategy(), |stack| {
        let tmp = support::tempdir();
        let sb = build_stack(tmp.path(), &stack, mode);
        let k = sb.kernel();
        let c = sb.copy();
        ensure("copy view vs kernel view", &k, &c, &strict_cmp())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn same_view_as_kernel_random_stacks() {
    if !support::require_root("same_view_as_kernel_random_stacks") {
        return;
    }
    same_view_random(Mode::Lenient);
}

// ---------------------------------------------------------------------------------------
// 2. Fold-back: the target's view survives unmount

/// The operations of a fold-back session: no `Sel::Root`, no `Op::Mknod`.
fn op_strategy() -> impl Strategy<Value = Op> {
    ops::op_strategy(OpMix { root: false, mknod: false, big_write: 4000..9000 })
}

/// [`ops::apply`]; strict mode adds what earlier bugs broke.
///
/// Lenient mode sets xattrs on directories only when `dir_xattrs` (the last session): a
/// directory xattr already in the upper survives a later `rm -rf d && mkdir d` when
/// the new directory reuses the inode number (`removed_dir_xattr_is_removed_by_the_fold`),
/// and removes none from directories.
fn apply(t: &Path, op: &Op, mode: Mode, dir_xattrs: bool) {
    let strict = mode == Mode::Strict;
    let set: Vec<&str> =
        if strict { OP_XATTRS.iter().chain(&OP_XATTRS_STRICT).copied().collect() } else { OP_XATTRS.to_vec() };
    let remove = ["user.x", "user.y", "user.d", "trusted.t", "trusted.overlay.foo", "user.new"];
    let policy = XattrPolicy { set: &set, remove: &remove, set_on_dirs: strict || dir_xattrs, remove_on_dirs: strict };
    ops::apply(t, op, &policy);
}

#[derive(Clone, Debug)]
struct FoldCase {
    stack: Stack,
    /// Operations of each session: one or two sessions on the same upper.
    sessions: Vec<Vec<Op>>,
}

fn fold_case() -> impl Strategy<Value = FoldCase> {
    let ops = || proptest::collection::vec(op_strategy(), 1..24);
    (stack_strategy(), proptest::collection::vec(ops(), 1..=2))
        .prop_map(|(stack, sessions)| FoldCase { stack, sessions })
}

fn fold_check(c: &FoldCase, mode: Mode) -> Result<(), TestCaseError> {
    let tmp = support::tempdir();
    let sb = build_stack(tmp.path(), &c.stack, mode);
    let lowers_before: Vec<Snap> = sb.lowers.iter().map(|l| view(l)).collect();
    let cmp = match mode {
        Mode::Lenient => cmp_no_dir_mtime(),
        Mode::Strict => strict_cmp(),
    };
    let copy = CopyBackend::new();
    for (i, ops) in c.sessions.iter().enumerate() {
        let n = i + 1;
        copy.mount(&sb.spec()).map_err(|e| TestCaseError::fail(format!("session {n}: copy mount: {e}")))?;
        // No pause: the operations start in the same clock tick as mount returns.
        for op in ops {
            apply(&sb.target, op, mode, i + 1 == c.sessions.len());
        }
        let m = view(&sb.target);
        copy.unmount(&sb.spec()).map_err(|e| TestCaseError::fail(format!("session {n}: copy unmount: {e}")))?;
        prop_assert!(ls(&sb.target).is_empty(), "session {}: target not emptied: {:?}", n, ls(&sb.target));
        prop_assert!(ls(&sb.work).is_empty(), "session {}: work dir not emptied: {:?}", n, ls(&sb.work));
        let what = format!("session {n}: kernel view of the folded upper vs the target before unmount");
        ensure(&what, &m, &sb.kernel(), &cmp)?;
        // A session without writes shows the same and leaves the upper as it was.
        let upper_before = view(&sb.upper);
        ensure(&format!("session {n}: next copy mount vs the target before unmount"), &m, &sb.copy(), &cmp)?;
        prop_assert!(upper_before == view(&sb.upper), "session {}: a session without writes changed the upper", n);
    }
    for (l, before) in sb.lowers.iter().zip(&lowers_before) {
        prop_assert!(&view(l) == before, "lower {} changed", l.display());
    }
    Ok(())
}

fn fold_random(mode: Mode) {
    let result = runner().run(&fold_case(), |c| fold_check(&c, mode));
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn fold_back_random_ops_match_kernel() {
    if !support::require_root("fold_back_random_ops_match_kernel") {
        return;
    }
    fold_random(Mode::Lenient);
}

/// The full property: directory mtimes, directory xattrs per layer and removed,
/// `user.overlay.*` xattrs. Fails on the bugs the `bug_*` tests below pin down.
#[test]
fn fold_back_random_ops_match_kernel_strict() {
    if !support::require_root("fold_back_random_ops_match_kernel_strict") {
        return;
    }
    same_view_random(Mode::Strict);
    fold_random(Mode::Strict);
}

/// A two-layer lower built with plain file operations, used by the hand-written scenarios.
fn simple_stack(sb: &Sandbox) {
    let (top, bottom) = (&sb.lowers[0], &sb.lowers[1]);
    mkdirs(bottom, &["etc", "var/lib/apt", "home/user/.cache", "opt/app/bin", "srv"]);
    write(&bottom.join("etc/hosts"), b"127.0.0.1 localhost\n");
    write(&bottom.join("etc/motd"), b"hello\n");
    write(&bottom.join("var/lib/apt/lists"), &support::pseudo_random(1, 10_000));
    write(&bottom.join("home/user/.profile"), b"export A=1\n");
    write(&bottom.join("home/user/.cache/blob"), b"blob");
    write(&bottom.join("opt/app/bin/app"), b"#!/bin/sh\n");
    write(&bottom.join("opt/app/README"), b"readme");
    write(&bottom.join("srv/data"), b"data");
    fs::hard_link(bottom.join("srv/data"), bottom.join("srv/data-link")).unwrap();
    std::os::unix::fs::symlink("../etc/hosts", bottom.join("srv/hosts")).unwrap();
    support::chmod(&bottom.join("opt/app/bin/app"), 0o4755);
    support::lchown(&bottom.join("home/user"), 1000, 1000);
    support::lchown(&bottom.join("home/user/.profile"), 1000, 1000);
    support::lsetxattr(&bottom.join("etc/motd"), "user.lang", b"en");
    support::lsetxattr(&bottom.join("etc/hosts"), "trusted.overlay.overlay.img", b"escaped");
    support::lsetxattr(&bottom.join("srv/data"), "trusted.overlay.overlay.img", b"escaped");
    support::lsetxattr(&bottom.join("opt/app/README"), "user.note", b"n");
    mkdirs(top, &["etc", "opt/app", "var/lib"]);
    write(&top.join("etc/hosts"), b"127.0.0.1 localhost top\n");
    whiteout(&top.join("etc/motd"));
    write(&top.join("opt/app/VERSION"), b"2");
    opaque(&top.join("var/lib"));
    write(&top.join("var/lib/state"), b"state");
    // Fixed times, so two sandboxes built from this are identical.
    for l in [bottom, top] {
        for (i, rel) in support::snapshot(l).keys().enumerate() {
            support::set_mtime(&support::at(l, rel), 1_500_000_000 + i as i64, 17);
        }
        support::set_mtime(l, 1_400_000_000, 0);
    }
}

/// Sets every mtime the current session produced (anything after 2023) to one fixed
/// time, so runs at different instants compare equal.
fn normalize_new_mtimes(t: &Path) {
    for (rel, n) in view(t) {
        if n.mtime.0 > 1_700_000_000 {
            support::set_mtime(&support::at(t, &rel), 1_777_777_777, 7);
        }
    }
}

#[test]
fn fold_back_hand_written_scenarios() {
    if !support::require_root("fold_back_hand_written_scenarios") {
        return;
    }
    type Scenario = (&'static str, fn(&Path));
    let scenarios: Vec<Scenario> = vec![
        ("create", |t| write(&t.join("etc/new.conf"), b"new")),
        ("overwrite lower", |t| write(&t.join("etc/hosts"), b"changed")),
        ("truncate lower", |t| {
            fs::OpenOptions::new().write(true).open(t.join("var/lib/state")).unwrap().set_len(2).unwrap()
        }),
        ("append lower", |t| {
            fs::OpenOptions::new().append(true).open(t.join("opt/app/README")).unwrap().write_all(b" more").unwrap()
        }),
        ("chmod lower", |t| support::chmod(&t.join("opt/app/bin/app"), 0o700)),
        ("chown lower", |t| support::lchown(&t.join("srv/data"), 5, 6)),
        ("chmod lower dir", |t| support::chmod(&t.join("opt/app"), 0o711)),
        ("rename lower file", |t| fs::rename(t.join("etc/hosts"), t.join("etc/hosts.bak")).unwrap()),
        ("rename lower dir", |t| fs::rename(t.join("opt/app"), t.join("opt/app2")).unwrap()),
        ("rename lower dir over new name elsewhere", |t| fs::rename(t.join("home/user"), t.join("srv/user")).unwrap()),
        ("swap two lower dirs", |t| {
            fs::rename(t.join("home"), t.join("tmp-swap")).unwrap();
            fs::rename(t.join("srv"), t.join("home")).unwrap();
            fs::rename(t.join("tmp-swap"), t.join("srv")).unwrap();
        }),
        ("rename dir away and back", |t| {
            fs::rename(t.join("opt/app"), t.join("opt/x")).unwrap();
            fs::rename(t.join("opt/x"), t.join("opt/app")).unwrap();
        }),
        ("unlink lower file", |t| fs::remove_file(t.join("home/user/.profile")).unwrap()),
        ("unlink one of a lower hardlink pair", |t| fs::remove_file(t.join("srv/data-link")).unwrap()),
        ("rmdir lower dir", |t| {
            fs::remove_file(t.join("home/user/.cache/blob")).unwrap();
            fs::remove_dir(t.join("home/user/.cache")).unwrap();
        }),
        ("rm -rf lower dir", |t| fs::remove_dir_all(t.join("var")).unwrap()),
        ("rm -rf && mkdir lower dir", |t| {
            fs::remove_dir_all(t.join("opt/app")).unwrap();
            fs::create_dir(t.join("opt/app")).unwrap();
        }),
        ("rm -rf && mkdir && refill lower dir", |t| {
            fs::remove_dir_all(t.join("home/user")).unwrap();
            fs::create_dir_all(t.join("home/user/.cache")).unwrap();
            write(&t.join("home/user/.profile"), b"fresh");
        }),
        ("file becomes dir", |t| {
            fs::remove_file(t.join("etc/hosts")).unwrap();
            fs::create_dir(t.join("etc/hosts")).unwrap();
            write(&t.join("etc/hosts/inside"), b"i");
        }),
        ("dir becomes file", |t| {
            fs::remove_dir_all(t.join("opt/app")).unwrap();
            write(&t.join("opt/app"), b"now a file");
        }),
        ("symlink", |t| std::os::unix::fs::symlink("/etc/passwd", t.join("etc/pw")).unwrap()),
        ("replace symlink", |t| {
            fs::remove_file(t.join("srv/hosts")).unwrap();
            std::os::unix::fs::symlink("elsewhere", t.join("srv/hosts")).unwrap();
        }),
        ("hardlink to lower file", |t| fs::hard_link(t.join("etc/hosts"), t.join("srv/hosts-link")).unwrap()),
        ("hardlink new file", |t| {
            write(&t.join("a"), b"a");
            fs::hard_link(t.join("a"), t.join("etc/b")).unwrap();
        }),
        ("write a lower hardlinked file", |t| write(&t.join("srv/data"), b"through the link")),
        ("setxattr user.x on lower file", |t| support::lsetxattr(&t.join("opt/app/README"), "user.x", b"1")),
        ("setxattr on lower dir", |t| support::lsetxattr(&t.join("etc"), "user.x", b"dir")),
        ("setxattr trusted.overlay.opaque on a dir", |t| {
            support::lsetxattr(&t.join("opt"), "trusted.overlay.opaque", b"y")
        }),
        ("remove escaped image xattr", |t| try_lremovexattr(&t.join("srv/data"), "trusted.overlay.img").unwrap()),
        ("remove xattr from lower file", |t| try_lremovexattr(&t.join("opt/app/README"), "user.note").unwrap()),
        ("unix socket", |t| drop(std::os::unix::net::UnixListener::bind(t.join("srv/sock")).unwrap())),
        ("mkfifo", |t| support::mknod(&t.join("srv/fifo"), libc::S_IFIFO, 0o600, 0, 0)),
        ("char device", |t| support::mknod(&t.join("srv/null"), libc::S_IFCHR, 0o666, 1, 3)),
        ("nested new dirs", |t| {
            fs::create_dir_all(t.join("new/a/b/c")).unwrap();
            write(&t.join("new/a/b/c/f"), b"deep");
            write(&t.join("new/top"), b"top");
        }),
        ("nested new dirs inside lower dir", |t| {
            fs::create_dir_all(t.join("var/lib/apt/x/y")).unwrap();
            write(&t.join("var/lib/apt/x/y/z"), b"z");
        }),
        ("touch dir and file", |t| {
            support::set_mtime(&t.join("etc"), 1_000_000, 5);
            support::set_mtime(&t.join("etc/hosts"), 2_000_000, 6);
        }),
        ("recreate file deleted by a lower whiteout", |t| write(&t.join("etc/motd"), b"back")),
        ("write into opaque lower dir", |t| write(&t.join("var/lib/state2"), b"s")),
        ("delete from root", |t| fs::remove_dir_all(t.join("srv")).unwrap()),
        ("chmod root", |t| support::chmod(t, 0o700)),
    ];
    let tmp = support::tempdir();
    for (i, (name, ops)) in scenarios.into_iter().enumerate() {
        let base = tmp.path().join(format!("s{i}"));
        fs::create_dir(&base).unwrap();
        let sb = Sandbox::new(&base, 2);
        simple_stack(&sb);
        let lowers_before: Vec<Snap> = sb.lowers.iter().map(|l| view(l)).collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sb.session(&cmp_no_dir_mtime(), ops)));
        if let Err(e) = r {
            let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
            panic!("scenario {name:?}: {msg}");
        }
        for (l, before) in sb.lowers.iter().zip(&lowers_before) {
            check(&format!("scenario {name:?}: lower {}", l.display()), before, &view(l), &strict_cmp());
            assert!(&view(l) == before, "scenario {name:?}: lower {} changed (inode, links or blocks)", l.display());
        }
    }
}

/// Spot checks of the upper's format after a fold (what the diff engine reads).
#[test]
fn fold_back_writes_overlay_format() {
    if !support::require_root("fold_back_writes_overlay_format") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    sb.session(&cmp_no_dir_mtime(), |t| {
        fs::remove_file(t.join("etc/hosts")).unwrap();
        fs::rename(t.join("opt/app"), t.join("opt/moved")).unwrap();
        fs::create_dir(t.join("brand-new")).unwrap();
        write(&t.join("brand-new/f"), b"f");
        support::lsetxattr(&t.join("srv/data"), "trusted.overlay.foo", b"sandbox");
        write(&t.join("untouched-dir-file"), b"x");
    });
    let u = |p: &str| sb.upper.join(p);
    assert!(is_whiteout(&u("etc/hosts")), "deleted lower file → 0:0 whiteout");
    assert!(is_whiteout(&u("opt/app")), "renamed-away lower dir → whiteout");
    assert!(is_opaque(&u("opt/moved"), b"trusted.overlay.opaque"), "renamed-in dir → opaque");
    assert_eq!(ls(&u("opt/moved")), ["README", "VERSION", "bin"]);
    assert!(fs::symlink_metadata(u("brand-new")).unwrap().is_dir());
    assert_eq!(support::lgetxattr(&u("srv/data"), b"trusted.overlay.overlay.foo").as_deref(), Some(&b"sandbox"[..]));
    assert_eq!(support::lgetxattr(&u("srv/data"), b"trusted.overlay.foo"), None, "sandbox xattr left unescaped");
    // Nothing that did not change.
    assert!(fs::symlink_metadata(u("var")).is_err(), "untouched lower dir copied up: {:?}", ls(&sb.upper));
    assert!(fs::symlink_metadata(u("home")).is_err(), "untouched lower dir copied up");
}

/// Operations issued the instant `mount` returns, many times over: the ctime stamp must
/// already be behind the clock.
#[test]
fn fold_back_ops_in_the_same_millisecond_as_mount() {
    if !support::require_root("fold_back_ops_in_the_same_millisecond_as_mount") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    let copy = CopyBackend::new();
    let mut worst = std::time::Duration::ZERO;
    for round in 0..25u32 {
        copy.mount(&sb.spec()).expect("mount");
        let t0 = std::time::Instant::now();
        let data = format!("round {round}");
        // Same size as the lower's content, so only the ctime can tell.
        let hosts = sb.t("etc/hosts");
        let len = fs::metadata(&hosts).unwrap().len() as usize;
        let mut same_len = data.clone().into_bytes();
        same_len.resize(len, b'.');
        fs::OpenOptions::new().write(true).open(&hosts).unwrap().write_all(&same_len).unwrap();
        support::chmod(&sb.t("opt/app/README"), 0o600 + (round % 2) * 0o44);
        support::lsetxattr(&sb.t("srv/data"), "user.round", data.as_bytes());
        let _ = fs::remove_file(sb.t(&format!("r{}", round.wrapping_sub(1))));
        write(&sb.t(&format!("r{round}")), data.as_bytes());
        worst = worst.max(t0.elapsed());
        let m = view(&sb.target);
        copy.unmount(&sb.spec()).expect("unmount");
        check(&format!("round {round}: kernel view vs target"), &m, &sb.kernel(), &cmp_no_dir_mtime());
    }
    eprintln!("slowest round of writes after mount returned: {worst:?}");
}

// ---------------------------------------------------------------------------------------
// 3. Repeated sessions

#[test]
fn repeated_sessions() {
    if !support::require_root("repeated_sessions") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    let cmp = cmp_no_dir_mtime();
    // Session 1: create, delete lower, modify lower, new dir tree, replace a lower dir.
    sb.session(&cmp, |t| {
        write(&t.join("s1-file"), b"from session 1");
        fs::create_dir_all(t.join("s1dir/sub")).unwrap();
        write(&t.join("s1dir/sub/f"), b"1");
        fs::remove_file(t.join("etc/hosts")).unwrap();
        write(&t.join("opt/app/README"), b"readme v1");
        fs::remove_dir_all(t.join("home/user")).unwrap();
        fs::create_dir(t.join("home/user")).unwrap();
        write(&t.join("home/user/.profile"), b"session 1 profile");
        support::lsetxattr(&t.join("srv"), "user.s", b"1");
    });
    // Session 2: delete what session 1 created, re-create what it deleted, rename
    // session 1's dir, modify session 1's file again.
    sb.session(&cmp, |t| {
        assert_eq!(fs::read(t.join("s1-file")).unwrap(), b"from session 1");
        assert!(fs::symlink_metadata(t.join("etc/hosts")).is_err());
        fs::remove_file(t.join("s1-file")).unwrap();
        write(&t.join("etc/hosts"), b"re-created in session 2");
        fs::rename(t.join("s1dir"), t.join("s2dir")).unwrap();
        write(&t.join("opt/app/README"), b"readme v2");
        fs::remove_file(t.join("home/user/.profile")).unwrap();
        fs::remove_file(t.join("opt/app/VERSION")).unwrap();
    });
    // Session 3: recreate session 1's file as a dir, delete session 2's re-creation
    // again, restore a deleted lower name, and change a dir back to a file.
    let m3 = sb.session(&cmp, |t| {
        fs::create_dir(t.join("s1-file")).unwrap();
        fs::remove_file(t.join("etc/hosts")).unwrap();
        write(&t.join("opt/app/VERSION"), b"3");
        fs::remove_dir_all(t.join("s2dir")).unwrap();
        write(&t.join("s2dir"), b"file now");
    });
    let k = sb.kernel();
    assert!(k.contains_key(&b"s1-file"[..]) && k[&b"s1-file"[..]].ty == Ty::Dir);
    assert!(!k.contains_key(&b"etc/hosts"[..]));
    assert!(!k.contains_key(&b"s1dir"[..]));
    assert_eq!(k[&b"s2dir"[..]].ty, Ty::File);
    assert!(!k.contains_key(&b"home/user/.profile"[..]));
    assert!(!k.contains_key(&b"home/user/.cache"[..]), "session 1 emptied home/user");
    check("final kernel view vs session 3 target", &m3, &k, &cmp);
    assert_eq!(support::lgetxattr(&sb.upper.join("srv"), b"user.s").as_deref(), Some(&b"1"[..]));
    assert!(is_whiteout(&sb.upper.join("etc/hosts")), "deleted again: whiteout again");
}

/// The same three sessions through the kernel overlay and through the copy backend end
/// in the same view (operations chosen to behave the same on both: no renames of lower
/// directories, which overlay answers with EXDEV without `redirect_dir`).
#[test]
fn repeated_sessions_match_kernel_sessions() {
    if !support::require_root("repeated_sessions_match_kernel_sessions") {
        return;
    }
    let sessions: [fn(&Path); 3] = [
        |t| {
            write(&t.join("new"), b"1");
            fs::remove_file(t.join("etc/hosts")).unwrap();
            fs::remove_dir_all(t.join("home/user")).unwrap();
            fs::create_dir(t.join("home/user")).unwrap();
            write(&t.join("home/user/x"), b"x");
            support::chmod(&t.join("opt/app/bin/app"), 0o755);
            support::lsetxattr(&t.join("opt/app/README"), "user.a", b"1");
            fs::create_dir_all(t.join("d1/d2")).unwrap();
        },
        |t| {
            fs::remove_file(t.join("new")).unwrap();
            write(&t.join("etc/hosts"), b"again");
            fs::rename(t.join("d1"), t.join("d3")).unwrap();
            // Not srv/data: a lower hardlink pair stays one inode in the copy target,
            // while the kernel (index=off) copies up only the name that was changed.
            support::lchown(&t.join("opt/app/VERSION"), 9, 9);
            fs::remove_dir_all(t.join("var")).unwrap();
        },
        |t| {
            write(&t.join("new"), b"3");
            fs::remove_file(t.join("etc/hosts")).unwrap();
            fs::create_dir(t.join("var")).unwrap();
            write(&t.join("var/v"), b"v");
            fs::remove_dir_all(t.join("d3")).unwrap();
        },
    ];
    let tmp = support::tempdir();
    let copy_sb = Sandbox::new(&tmp.path().join("copy"), 2);
    let kern_sb = Sandbox::new(&tmp.path().join("kernel"), 2);
    simple_stack(&copy_sb);
    simple_stack(&kern_sb);
    for (i, ops) in sessions.iter().enumerate() {
        let kernel = KernelOverlay::new();
        let m = OverlayMount::mount(&kernel, kern_sb.spec()).expect("kernel mount");
        ops(&kern_sb.target);
        normalize_new_mtimes(&kern_sb.target);
        m.unmount().unwrap();
        copy_sb.session(&cmp_no_dir_mtime(), |t| {
            ops(t);
            normalize_new_mtimes(t);
        });
        // Compare through the kernel, the reference reader of uppers.
        let (k, c) = (kern_sb.kernel(), copy_sb.kernel());
        check(&format!("after session {}: kernel sessions vs copy sessions", i + 1), &k, &c, &cmp_no_dir_mtime());
    }
}

// ---------------------------------------------------------------------------------------
// 4. Refusals and cleanup

#[test]
fn refuses_non_empty_target() {
    if !support::require_root("refuses_non_empty_target") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    write(&sb.t("squatter"), b"mine");
    match CopyBackend::new().mount(&sb.spec()) {
        Err(Error::NotEmpty { path }) => assert_eq!(path, sb.target),
        other => panic!("expected NotEmpty, got {other:?}"),
    }
    assert_eq!(ls(&sb.target), ["squatter"]);
    assert_eq!(fs::read(sb.t("squatter")).unwrap(), b"mine");
    assert_empty_dir(&sb.work, "work after refused mount");
    assert_empty_dir(&sb.upper, "upper after refused mount");
    // Unmounting what was never mounted leaves the squatter alone.
    CopyBackend::new().unmount(&sb.spec()).expect("unmount of never-mounted");
    assert_eq!(ls(&sb.target), ["squatter"]);
}

#[test]
fn refuses_second_mount_and_unmount_is_idempotent() {
    if !support::require_root("refuses_second_mount_and_unmount_is_idempotent") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    let copy = CopyBackend::new();
    // Never mounted: fine, also with a work dir that does not exist.
    copy.unmount(&sb.spec()).expect("unmount of never-mounted");
    let mut missing = sb.spec();
    missing.work = tmp.path().join("no-such-work");
    copy.unmount(&missing).expect("unmount with a missing work dir");

    copy.mount(&sb.spec()).expect("mount");
    assert!(sb.work.join(STATE).exists(), "state file while mounted: {:?}", ls(&sb.work));
    let before = view(&sb.target);
    match copy.mount(&sb.spec()) {
        Err(Error::AlreadyMounted { .. }) => {}
        other => panic!("expected AlreadyMounted, got {other:?}"),
    }
    // Same work dir, other (empty) target: still refused, the state is in the work dir.
    let other_target = mkdirs(tmp.path(), &["target2"]).remove(0);
    let mut other = sb.spec();
    other.target = other_target.clone();
    match copy.mount(&other) {
        Err(Error::AlreadyMounted { .. }) => {}
        other => panic!("expected AlreadyMounted for a second target on the same work dir, got {other:?}"),
    }
    assert_empty_dir(&other_target, "second target after refused mount");
    check("first mount after refused second mount", &before, &view(&sb.target), &strict_cmp());

    write(&sb.t("kept"), b"kept");
    copy.unmount(&sb.spec()).expect("unmount");
    sb.assert_unmounted();
    assert_eq!(fs::read(sb.upper.join("kept")).unwrap(), b"kept");
    let upper = view(&sb.upper);
    copy.unmount(&sb.spec()).expect("second unmount");
    copy.unmount(&sb.spec()).expect("third unmount");
    sb.assert_unmounted();
    check("upper after repeated unmounts", &upper, &view(&sb.upper), &strict_cmp());
    assert!(upper == view(&sb.upper), "repeated unmounts touched the upper");

    // Mountable again, and the write is there.
    let m = OverlayMount::mount(&copy, sb.spec()).expect("mount after unmount");
    assert_eq!(fs::read(sb.t("kept")).unwrap(), b"kept");
    write(&sb.t("dropped-guard"), b"guard");
    drop(m); // the guard folds and unmounts
    sb.assert_unmounted();
    assert_eq!(fs::read(sb.upper.join("dropped-guard")).unwrap(), b"guard");
}

/// Kernel and copy sessions take turns on one upper: the copy backend reads what the
/// kernel wrote (shared whiteout inodes, opaque dirs, `origin`/`impure` xattrs) and the
/// kernel reads what the copy backend folded.
#[test]
fn mixed_kernel_and_copy_sessions() {
    if !support::require_root("mixed_kernel_and_copy_sessions") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    let kernel = KernelOverlay::new();
    let kernel_session = |ops: &dyn Fn(&Path)| {
        let m = OverlayMount::mount(&kernel, sb.spec()).expect("kernel mount");
        ops(&sb.target);
        let v = view(&sb.target);
        m.unmount().expect("kernel unmount");
        // The kernel leaves its scratch dirs in the work dir; the copy backend ignores them.
        v
    };
    let k1 = kernel_session(&|t| {
        fs::remove_file(t.join("etc/hosts")).unwrap();
        fs::remove_file(t.join("srv/data")).unwrap();
        fs::remove_dir_all(t.join("opt/app")).unwrap();
        fs::create_dir(t.join("opt/app")).unwrap();
        write(&t.join("opt/app/k"), b"kernel");
        write(&t.join("var/lib/state"), b"kernel state");
        support::lsetxattr(&t.join("home/user/.profile"), "user.k", b"1");
    });
    check("copy view of the kernel's upper", &k1, &sb.copy(), &cmp_no_dir_mtime());
    let copy = CopyBackend::new();
    copy.mount(&sb.spec()).expect("copy mount");
    write(&sb.t("etc/hosts"), b"back, by copy");
    fs::remove_file(sb.t("opt/app/k")).unwrap();
    write(&sb.t("var/lib/state"), b"copy state");
    fs::remove_dir_all(sb.t("home/user")).unwrap();
    let m2 = view(&sb.target);
    copy.unmount(&sb.spec()).expect("copy unmount");
    let k2 = kernel_session(&|_| {});
    check("kernel view after a copy session on the kernel's upper", &m2, &k2, &cmp_no_dir_mtime());
    let k3 = kernel_session(&|t| write(&t.join("srv/data-link"), b"kernel again"));
    check("copy view after another kernel session", &k3, &sb.copy(), &cmp_no_dir_mtime());
}

/// A crash between the fold and the end of emptying the target leaves
/// `rootfs-cache-copy.clearing`: mounting is refused, and `unmount` finishes the job
/// without folding the half-emptied target (which would turn it into whiteouts).
#[test]
fn interrupted_unmount_resumes_without_folding() {
    if !support::require_root("interrupted_unmount_resumes_without_folding") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    let copy = CopyBackend::new();
    copy.mount(&sb.spec()).unwrap();
    write(&sb.t("folded"), b"x");
    // What a completed fold leaves behind: the write in the upper, the state renamed.
    cp_a(&sb.t("folded"), &sb.upper.join("folded"));
    fs::rename(sb.work.join(STATE), sb.work.join(format!("{STATE}.clearing"))).unwrap();
    // Half emptied.
    fs::remove_dir_all(sb.t("etc")).unwrap();
    fs::remove_dir_all(sb.t("opt")).unwrap();
    let upper = view(&sb.upper);
    match copy.mount(&sb.spec()) {
        Err(Error::AlreadyMounted { .. }) => {}
        other => panic!("expected AlreadyMounted while clearing, got {other:?}"),
    }
    // Another backend instance (as another process would) finishes the unmount.
    CopyBackend::new().unmount(&sb.spec()).expect("resumed unmount");
    sb.assert_unmounted();
    check("upper after resumed unmount", &upper, &view(&sb.upper), &strict_cmp());
    let v = sb.kernel();
    assert!(v.contains_key(&b"etc/hosts"[..]) && v.contains_key(&b"opt/app/README"[..]), "lower content whited out");
}

/// A damaged state file is an error, never a guess (no fold from a wrong stamp).
#[test]
fn damaged_state_file_is_an_error() {
    if !support::require_root("damaged_state_file_is_an_error") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    let copy = CopyBackend::new();
    copy.mount(&sb.spec()).unwrap();
    fs::remove_dir_all(sb.t("etc")).unwrap();
    let upper = view(&sb.upper);
    for bad in ["", "rootfs-cache copy state 1\nnot a stamp\n", "something else\n1 2\n"] {
        write(&sb.work.join(STATE), bad.as_bytes());
        let r = copy.unmount(&sb.spec());
        assert!(r.is_err(), "unmount with state {bad:?} succeeded");
        assert!(upper == view(&sb.upper), "unmount with state {bad:?} changed the upper");
        assert!(sb.work.join(STATE).exists(), "state file removed after a failed unmount");
    }
}

/// A fresh upper is refused when not empty (the spec's `fresh` option).
#[test]
fn fresh_option_refuses_used_upper() {
    if !support::require_root("fresh_option_refuses_used_upper") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    simple_stack(&sb);
    write(&sb.upper.join("old"), b"old");
    let mut spec = sb.spec();
    spec.options.fresh = true;
    match CopyBackend::new().mount(&spec) {
        Err(Error::NotEmpty { path }) => assert_eq!(path, sb.upper),
        other => panic!("expected NotEmpty, got {other:?}"),
    }
    assert_empty_dir(&sb.target, "target after refused mount");
    assert_empty_dir(&sb.work, "work after refused mount");
}

/// Lower files (inode, content, links, metadata) are never touched, whatever the
/// sandbox does to their copies, hardlinked ones included.
#[test]
fn lowers_are_never_modified() {
    if !support::require_root("lowers_are_never_modified") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 3);
    stack_a(&sb);
    type Ctimes = Vec<(PathBuf, i64, i64)>;
    let ctimes = |root: &Path| -> Ctimes {
        let mut v = Vec::new();
        for (rel, _) in support::snapshot(root) {
            let p = support::at(root, &rel);
            let m = fs::symlink_metadata(&p).unwrap();
            v.push((p, m.ctime(), m.ctime_nsec()));
        }
        v
    };
    let before: Vec<(Snap, Ctimes)> = sb.lowers.iter().map(|l| (view(l), ctimes(l))).collect();
    let hard_ino = fs::symlink_metadata(sb.lowers[2].join("hard/a")).unwrap().ino();
    sb.session(&cmp_no_dir_mtime(), |t| {
        // hard/a and hard/b are one inode in the bottom layer (and in the target).
        let mut f = fs::OpenOptions::new().append(true).open(t.join("hard/a")).unwrap();
        f.write_all(b" + sandbox").unwrap();
        drop(f);
        assert_eq!(fs::read(t.join("hard/b")).unwrap(), b"shared + sandbox");
        support::chmod(&t.join("hard/b"), 0o666);
        support::lchown(&t.join("hard2/x"), 77, 77);
        fs::hard_link(t.join("hard2/y"), t.join("hard2/z")).unwrap();
        write(&t.join("etc/passwd"), b"pwned");
        support::lsetxattr(&t.join("esc"), "user.x", b"changed");
        try_lremovexattr(&t.join("esc"), "user.y").unwrap();
        support::set_mtime(&t.join("bin/sh"), 5, 5);
        fs::remove_dir_all(t.join("usr")).unwrap();
        fs::rename(t.join("opq"), t.join("opq2")).unwrap();
        support::chmod(&t.join("fakeopq"), 0o700);
        fs::remove_file(t.join("bin/su")).unwrap();
    });
    for (l, (snap, ct)) in sb.lowers.iter().zip(&before) {
        check(&format!("lower {}", l.display()), snap, &view(l), &strict_cmp());
        assert!(snap == &view(l), "lower {} changed (inode, link count or blocks)", l.display());
        assert_eq!(ct, &ctimes(l), "ctime changed in lower {}", l.display());
    }
    let bottom = &sb.lowers[2];
    assert_eq!(fs::read(bottom.join("hard/a")).unwrap(), b"shared");
    let m = fs::symlink_metadata(bottom.join("hard/a")).unwrap();
    assert_eq!((m.ino(), m.nlink(), m.mode() & 0o7777), (hard_ino, 3, 0o600));
    // The upper has both names of the link group, linked to each other.
    let (a, b) = (sb.upper.join("hard/a"), sb.upper.join("hard/b"));
    assert_eq!(fs::read(&a).unwrap(), b"shared + sandbox");
    assert_eq!(fs::symlink_metadata(&a).unwrap().ino(), fs::symlink_metadata(&b).unwrap().ino());
}

// ---------------------------------------------------------------------------------------
// 5. Rootless, in an unprivileged user namespace

fn rootless_layout(base: &Path) -> Sandbox {
    let sb = Sandbox::new(base, 2);
    let (top, bottom) = (&sb.lowers[0], &sb.lowers[1]);
    mkdirs(bottom, &["d/sub", "keep", "dir"]);
    for (p, c) in [("d/a", "a"), ("d/sub/b", "b"), ("keep/k", "k"), ("dir/x", "x"), ("del", "del"), ("mod", "m")] {
        write(&bottom.join(p), c.as_bytes());
    }
    mkdirs(top, &["d"]);
    support::lsetxattr(&top.join("d"), "user.overlay.opaque", b"y");
    write(&top.join("d/c"), b"c");
    write(&top.join("img"), b"img");
    support::lsetxattr(&top.join("img"), "user.overlay.overlay.imgx", b"escaped");
    support::lsetxattr(&top.join("img"), "user.plain", b"p");
    sb
}

/// Runs inside `setpriv --reuid=65534 unshare -Urm`, started by `rootless_copy_backend`.
/// Does nothing otherwise.
#[test]
fn rootless_child() {
    let Some(base) = std::env::var_os(ROOTLESS_ENV) else { return };
    let base = PathBuf::from(base);
    let sb = Sandbox {
        lowers: vec![base.join("l0"), base.join("l1")],
        upper: base.join("upper"),
        work: base.join("work"),
        target: base.join("target"),
        base: base.clone(),
    };
    assert!(rootfs_cache::in_user_namespace(), "child not in a user namespace");
    assert!(sb.spec().userxattr(), "userxattr must be on in a user namespace");
    let copy = CopyBackend::new();
    copy.mount(&sb.spec()).unwrap_or_else(|e| panic!("rootless copy mount: {e}"));
    assert_eq!(ls(&sb.t("d")), ["c"], "user.overlay.opaque not honoured");
    assert_eq!(support::lgetxattr(&sb.t("d"), b"user.overlay.opaque"), None, "overlay metadata shown");
    assert_eq!(support::lgetxattr(&sb.t("img"), b"user.overlay.imgx").as_deref(), Some(&b"escaped"[..]));
    assert_eq!(support::lgetxattr(&sb.t("img"), b"user.plain").as_deref(), Some(&b"p"[..]));
    fs::remove_file(sb.t("del")).unwrap();
    fs::remove_file(sb.t("d/c")).unwrap();
    fs::create_dir_all(sb.t("newdir/sub")).unwrap();
    write(&sb.t("newdir/sub/f"), b"f");
    fs::remove_dir_all(sb.t("keep")).unwrap();
    fs::create_dir(sb.t("keep")).unwrap();
    fs::rename(sb.t("dir"), sb.t("moved")).unwrap();
    write(&sb.t("mod"), b"modified");
    support::lsetxattr(&sb.t("mod"), "user.overlay.sandbox", b"s");
    support::lsetxattr(&sb.t("mod"), "user.x", b"x");
    let m = view(&sb.target);
    copy.unmount(&sb.spec()).unwrap_or_else(|e| panic!("rootless copy unmount: {e}"));
    sb.assert_unmounted();

    let u = |p: &str| sb.upper.join(p);
    for w in ["del", "d/c", "dir"] {
        assert!(is_whiteout(&u(w)), "{w}: no 0:0 whiteout in the upper");
    }
    for o in ["newdir", "moved"] {
        assert!(is_opaque(&u(o), b"user.overlay.opaque"), "{o}: new dir not marked user.overlay.opaque");
    }
    assert_eq!(support::lgetxattr(&u("mod"), b"user.overlay.overlay.sandbox").as_deref(), Some(&b"s"[..]));
    let cmp = cmp_no_dir_mtime();
    check("rootless: copy remount vs target", &m, &sb.copy(), &cmp);
    // The kernel, mounted in this user namespace with userxattr, reads the upper alike.
    check("rootless: kernel (userxattr) vs target", &m, &sb.kernel(), &cmp);
    eprintln!("rootless child: ok");
}

#[test]
fn rootless_copy_backend() {
    if !support::require_root("rootless_copy_backend") || !support::require_tools("rootless", &["setpriv", "unshare"]) {
        return;
    }
    let tmp = support::tempdir();
    let base = tmp.path().join("rootless");
    fs::create_dir(&base).unwrap();
    let sb = rootless_layout(&base);
    support::run(Command::new("chown").arg("-R").arg("65534:65534").arg(&base));
    let exe = support::shared_current_exe(); // nobody may not reach target/ (a 0700 checkout)
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "-Urm", "--"])
        .arg(exe.path())
        .args(["rootless_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROOTLESS_ENV, &base)
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("rootless child: ok"), "rootless child failed:\n{text}");
    // Seen from outside: real 0:0 whiteouts and user.overlay.opaque, owned by the user.
    let del = fs::symlink_metadata(sb.upper.join("del")).unwrap();
    assert!(is_whiteout(&sb.upper.join("del")));
    assert_eq!((del.uid(), del.gid()), (65534, 65534));
    assert!(is_opaque(&sb.upper.join("newdir"), b"user.overlay.opaque"));
    assert_eq!(support::lgetxattr(&sb.upper.join("newdir"), b"trusted.overlay.opaque"), None);
}

// ---------------------------------------------------------------------------------------
// Library bugs, pinned down (run with `--ignored`)

/// A merged directory (in two layers, the higher one not opaque) shows the xattrs of
/// the higher layer's directory only, as the kernel does: the copy backend drops a
/// lower layer's directory xattrs when a higher layer's directory replaces its
/// metadata (regression: they used to leak into the view, the root included).
#[test]
fn merged_dir_shows_only_the_top_layers_xattrs() {
    if !support::require_root("merged_dir_shows_only_the_top_layers_xattrs") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 2);
    mkdirs(&sb.lowers[1], &["d"]);
    mkdirs(&sb.lowers[0], &["d"]);
    support::lsetxattr(&sb.lowers[1].join("d"), "user.lower", b"1");
    support::lsetxattr(&sb.lowers[1].join("d"), "trusted.lower", b"2");
    // The root too (it is merged from every layer and the upper).
    support::lsetxattr(&sb.lowers[1], "user.root", b"r");
    let k = sb.kernel();
    assert_eq!(k[&b"d"[..]].xattrs, BTreeMap::new(), "kernel: the top layer's directory has no xattrs");
    assert_eq!(k[&b"."[..]].xattrs, BTreeMap::new(), "kernel: the upper's root has no xattrs");
    let mut problems = support::diff_trees(&k, &sb.copy(), &strict_cmp());
    // And a session without any write puts the leaked root xattr into the upper: the
    // kernel view changes although the sandbox changed nothing.
    view_after_session(&sb, |_| {});
    problems.extend(support::diff_trees(&k, &sb.kernel(), &strict_cmp()));
    support::assert_no_diffs("copy vs kernel", &problems);
}

/// The change-detection stamp is a file created with `O_EXCL` in the target's root
/// after the layers are copied (`wait_for_tick`, src/mount/copy.rs): an image with a
/// file of the same name at its root still mounts and shows it, as with the kernel
/// (regression: it used to fail with EEXIST).
#[test]
fn layer_file_named_like_the_stamp() {
    if !support::require_root("layer_file_named_like_the_stamp") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 1);
    write(&sb.lowers[0].join(".rootfs-cache-copy-stamp"), b"image content");
    let k = sb.kernel();
    let r = CopyBackend::new().mount(&sb.spec());
    assert!(r.is_ok(), "copy mount: {r:?}");
    let c = view(&sb.target);
    CopyBackend::new().unmount(&sb.spec()).unwrap();
    check("copy vs kernel", &k, &c, &strict_cmp());
}

/// Writing `d/f` (a lower file) through the copy target: the kernel copies `d` up and
/// restores its times after creating `f` in it, so `d` keeps the lower's mtime. The
/// fold must do the same for every upper directory it creates or adds entries to
/// (regression: ancestors created by a copy-up showed the fold's time).
#[test]
fn parent_dir_mtime_kept_after_child_copy_up() {
    if !support::require_root("parent_dir_mtime_kept_after_child_copy_up") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 1);
    mkdirs(&sb.lowers[0], &["d/e"]);
    write(&sb.lowers[0].join("d/e/f"), b"lower");
    support::set_mtime(&sb.lowers[0].join("d/e"), 1_500_000_000, 0);
    support::set_mtime(&sb.lowers[0].join("d"), 1_500_000_000, 0);

    // The reference: the same write through the kernel overlay.
    let ksb = Sandbox::new(&tmp.path().join("kernel"), 1);
    fs::remove_dir(&ksb.lowers[0]).unwrap();
    cp_a(&sb.lowers[0], &ksb.lowers[0]);
    let kernel = KernelOverlay::new();
    let m = OverlayMount::mount(&kernel, ksb.spec()).unwrap();
    write(&ksb.t("d/e/f"), b"changed");
    let kview = view(&ksb.target);
    m.unmount().unwrap();
    assert_eq!(kview[&b"d"[..]].mtime, (1_500_000_000, 0), "kernel keeps the parent's mtime");
    assert_eq!(kview[&b"d/e"[..]].mtime, (1_500_000_000, 0), "kernel keeps the parent's mtime");

    std::thread::sleep(std::time::Duration::from_millis(20));
    let m = sb.session(&cmp_no_dir_mtime(), |t| write(&t.join("d/e/f"), b"changed"));
    check("target (same as the kernel's) vs kernel view of the folded upper", &m, &sb.kernel(), &strict_cmp());
}

/// Removing an xattr from a directory that already exists in the upper (pre-populated,
/// or from an earlier session) reaches the upper, as with the kernel. Also when
/// `rm -rf e && mkdir e` gives the new directory the old inode number (ext4 usually
/// does), so the fold takes it for the old directory rather than a fresh opaque one
/// (regression: the xattrs used to come back).
#[test]
fn removed_dir_xattr_is_removed_by_the_fold() {
    if !support::require_root("removed_dir_xattr_is_removed_by_the_fold") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 1);
    mkdirs(&sb.lowers[0], &["d", "e"]);
    write(&sb.lowers[0].join("e/f"), b"f");
    mkdirs(&sb.upper, &["d", "e"]);
    support::lsetxattr(&sb.upper.join("d"), "user.x", b"earlier session");
    support::lsetxattr(&sb.upper.join("e"), "user.x", b"earlier session");
    let mut reused = false;
    let m = view_after_session(&sb, |t| {
        // removexattr on a directory the upper already has.
        try_lremovexattr(&t.join("d"), "user.x").unwrap();
        // rm -rf e && mkdir e, where the new e gets the old inode number (made
        // certain here by making directories until one does, and renaming it to e).
        let old = fs::symlink_metadata(t.join("e")).unwrap().ino();
        fs::remove_dir_all(t.join("e")).unwrap();
        let mut made = Vec::new();
        for k in 0..20_000 {
            let p = t.join(format!("tmp{k}"));
            fs::create_dir(&p).unwrap();
            if fs::symlink_metadata(&p).unwrap().ino() == old {
                fs::rename(&p, t.join("e")).unwrap();
                reused = true;
                break;
            }
            made.push(p);
        }
        for p in made {
            fs::remove_dir(p).unwrap();
        }
        if !reused {
            fs::create_dir(t.join("e")).unwrap();
        }
    });
    eprintln!("rm -rf e && mkdir e reused the inode number: {reused}");
    assert_eq!(m[&b"d"[..]].xattrs, BTreeMap::new());
    assert_eq!(m[&b"e"[..]].xattrs, BTreeMap::new());
    check("kernel view of the folded upper vs the target", &m, &sb.kernel(), &strict_cmp());
}

/// With `trusted.*` overlay metadata (the default as real root) the kernel treats
/// `user.overlay.*` as ordinary xattrs: it shows `user.overlay.baz` and
/// `user.overlay.overlay.bar` on a lower file exactly as stored, and stores an
/// xattr `user.overlay.q` set through the mount as `user.overlay.q`. The copy backend
/// does the same: only the active namespace is overlay metadata (regression: it used
/// to treat `user.overlay.*` as metadata in both modes).
#[test]
fn user_overlay_xattrs_are_plain_in_trusted_mode() {
    if !support::require_root("user_overlay_xattrs_are_plain_in_trusted_mode") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 1);
    write(&sb.lowers[0].join("f"), b"f");
    support::lsetxattr(&sb.lowers[0].join("f"), "user.overlay.baz", b"raw");
    support::lsetxattr(&sb.lowers[0].join("f"), "user.overlay.overlay.bar", b"escaped");
    write(&sb.lowers[0].join("g"), b"g");
    let k = sb.kernel();
    assert!(k[&b"f"[..]].xattrs.contains_key(&b"user.overlay.baz"[..]), "kernel shows user.overlay.* as is");
    let copy = sb.copy();
    let mut problems = support::diff_trees(&k, &copy, &strict_cmp());
    let m = view_after_session(&sb, |t| support::lsetxattr(&t.join("g"), "user.overlay.q", b"q"));
    problems.extend(support::diff_trees(&m, &sb.kernel(), &strict_cmp()));
    support::assert_no_diffs("user.overlay.* in trusted mode", &problems);
}

/// Runs one copy session and returns the target's view before unmount, without
/// checking anything.
fn view_after_session(sb: &Sandbox, ops: impl FnOnce(&Path)) -> Snap {
    let copy = CopyBackend::new();
    copy.mount(&sb.spec()).unwrap();
    ops(&sb.target);
    let m = view(&sb.target);
    copy.unmount(&sb.spec()).unwrap();
    m
}

/// A sandbox with CAP_MKNOD can create a 0:0 character device in the copy target (the
/// kernel overlay refuses it with EPERM). Overlay format cannot hold one: the fold
/// stores it as what it means in an upper, a whiteout, so the name reads as deleted
/// (documented in src/mount/copy.rs). The sandbox's deletion of the lower file is kept.
#[test]
fn whiteout_device_created_in_target_reads_as_deleted() {
    if !support::require_root("whiteout_device_created_in_target_reads_as_deleted") {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 1);
    write(&sb.lowers[0].join("x"), b"x");
    write(&sb.lowers[0].join("keep"), b"k");
    let _ = view_after_session(&sb, |t| {
        fs::remove_file(t.join("x")).unwrap();
        whiteout(&t.join("x"));
        whiteout(&t.join("y"));
    });
    let k = sb.kernel();
    let names: Vec<String> = k.keys().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    let has = |want: &str| names.iter().any(|n| n == want || n.ends_with(&format!("/{want}")));
    assert!(!has("x") && !has("y"), "{names:?}");
    assert!(has("keep"), "{names:?}");
}

/// Runs `f` in a private mount namespace with a fresh ext4 of 128-byte inodes (one
/// second timestamp granularity) mounted at `dir`; `None` when that cannot be set up.
fn with_coarse_fs<T>(img: &Path, dir: &Path, f: impl FnOnce() -> T) -> Option<T> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    fs::File::create(img).ok()?.set_len(32 << 20).ok()?;
    let ok = Command::new("mkfs.ext4").args(["-q", "-F", "-I", "128"]).arg(img).output().ok()?.status.success();
    if !ok {
        return None;
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).ok()?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).ok()?;
    fs::create_dir_all(dir).ok()?;
    let out = Command::new("mount").args(["-o", "loop"]).arg(img).arg(dir).output().ok()?;
    if !out.status.success() {
        eprintln!("mount -o loop: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let r = f();
    umount2(dir, MntFlags::MNT_DETACH).unwrap();
    Some(r)
}

/// A target on a filesystem with coarser timestamps (ext4 with 128-byte inodes: 1 s;
/// also ext3, FAT, many FUSE and network file systems) than the work dir's (ns): changes
/// made in the same second as the mount get ctimes truncated to that second, so the
/// change-detection stamp must come from the target's filesystem, not the work dir's.
#[test]
fn fold_back_on_coarse_timestamp_target() {
    if !support::require_root("fold_back_on_coarse_timestamp_target")
        || !support::require_tools("fold_back_on_coarse_timestamp_target", &["mkfs.ext4", "mount"])
    {
        return;
    }
    let tmp = support::tempdir();
    let sb = Sandbox::new(tmp.path(), 1);
    write(&sb.lowers[0].join("f"), b"lower");
    write(&sb.lowers[0].join("gone"), b"gone");
    mkdirs(&sb.lowers[0], &["d"]);
    write(&sb.lowers[0].join("d/g"), b"g");
    let (img, coarse) = (tmp.path().join("ext4.img"), tmp.path().join("coarse"));
    let sb_ref = &sb;
    let coarse_ref = &coarse;
    // The mount namespace is per thread: run on a thread of our own.
    let ran = std::thread::scope(|s| {
        s.spawn(move || {
            with_coarse_fs(&img, coarse_ref, || {
                let mut spec = sb_ref.spec();
                spec.target = coarse_ref.join("target");
                fs::create_dir(&spec.target).unwrap();
                // Start early in a second, so the writes land in the second the mount
                // ends in (a stamp from the work dir's ns clock would then be later).
                let subsec =
                    || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_millis();
                while subsec() > 300 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let copy = CopyBackend::new();
                copy.mount(&spec).unwrap();
                let t = &spec.target;
                write(&t.join("f"), b"sandbox");
                write(&t.join("new"), b"new");
                fs::remove_file(t.join("gone")).unwrap();
                support::chmod(&t.join("d/g"), 0o600);
                let m = view(t);
                copy.unmount(&spec).unwrap();
                assert_empty_dir(t, "target after unmount");
                m
            })
        })
        .join()
        .unwrap()
    });
    let Some(m) = ran else {
        support::skip("fold_back_on_coarse_timestamp_target: no loop-mounted ext4");
        return;
    };
    assert_eq!(fs::read(sb.upper.join("f")).ok().as_deref(), Some(&b"sandbox"[..]), "write lost");
    check("kernel view of the folded upper vs the coarse target", &m, &sb.kernel(), &cmp_no_dir_mtime());
}

/// Data-only lowers (a lazy image) need the kernel, which follows the skeleton's
/// metacopy placeholders: the copy backend refuses them before touching anything,
/// rather than copying placeholders. Needs no root.
#[test]
fn data_only_lowers_are_refused_and_nothing_changes() {
    let tmp = support::tempdir();
    let [lower, data, upper, work, target] = [
        tmp.path().join("lower"),
        tmp.path().join("data"),
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("target"),
    ];
    for d in [&lower, &data, &upper, &work, &target] {
        fs::create_dir(d).unwrap();
    }
    write(&lower.join("f"), b"\0\0\0");
    write(&data.join("x1"), b"hi\n");
    write(&upper.join("kept"), b"the sandbox's");
    let before = support::snapshot(tmp.path());
    let spec = OverlaySpec::new([&lower], &upper, &work, &target).with_data_lowers([&data]);
    for attempt in ["mount", "OverlayMount::mount"] {
        let e = match attempt {
            "mount" => CopyBackend::new().mount(&spec).unwrap_err(),
            _ => OverlayMount::mount(CopyBackend::new(), spec.clone()).unwrap_err(),
        };
        match &e {
            Error::Unsupported { what } => {
                assert!(what.contains("data-only lowers") && what.contains("kernel overlay"), "{what}")
            }
            other => panic!("{attempt}: expected Unsupported, got {other:?}"),
        }
        check(&format!("after a refused {attempt}"), &before, &support::snapshot(tmp.path()), &strict_cmp());
    }
    // Nothing was mounted, so unmounting is a no-op and changes nothing either.
    CopyBackend::new().unmount(&spec).unwrap();
    check("after unmount", &before, &support::snapshot(tmp.path()), &strict_cmp());
}
