//! `KernelOverlay` against the real kernel: every mount API with 1 to 500 lowers at long
//! paths, writes landing in the upper (lowers checksummed before and after), refusals
//! that must not touch the kernel or leave anything mounted, harmless double unmounts,
//! the options that reach the kernel, mount errors, rootless mounts in a user namespace
//! and `detect()`.
//!
//! Every root test runs in its own mount namespace (`unshare(CLONE_NEWNS)` on the test's
//! thread, like `tests/common/tmpfs.rs`), on a private tmpfs: nothing leaks onto the host
//! even without `unshare -m`, mount counts are exact while other tests run in parallel,
//! and `/proc/thread-self/mountinfo` shows only this test's mounts.
//!
//! Tests that re-exec this binary (rootless, `detect` in a user namespace) pass their
//! scratch directory in [`CHILD_ENV`]; the `child_*` functions do nothing without it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use rootfs_cache::{
    BackendKind, DetectReason, Error, KernelOverlay, MAX_LOWERS, MountApi, MountBackend, OverlayMount, OverlaySpec,
    detect, in_user_namespace, is_mount_point,
};

const CHILD_ENV: &str = "ROOTFS_CACHE_MOUNT_KERNEL_CHILD";
/// The unprivileged uid/gid the rootless tests drop to (`nobody`).
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------------------
// Scratch: a private mount namespace and a tmpfs

/// A tmpfs mounted on a fresh temporary directory, in this thread's private mount
/// namespace. Dropping it detaches the tmpfs (and everything still mounted below it).
struct Scratch {
    tmp: tempfile::TempDir,
}

impl Scratch {
    fn path(&self) -> &Path {
        self.tmp.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = umount2(self.tmp.path(), MntFlags::MNT_DETACH);
    }
}

/// Moves this test's thread into a new mount namespace where nothing propagates back.
fn private_mount_namespace() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .expect("make / rprivate");
}

fn mount_tmpfs(dir: &Path, opts: &str) {
    mount(Some("tmpfs"), dir, Some("tmpfs"), MsFlags::empty(), Some(opts))
        .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", dir.display()));
}

/// Root, a private mount namespace, a tmpfs scratch dir, and a kernel that can mount
/// an overlay there at all; `None` (skipped, or a panic under CI) otherwise.
fn setup(test: &str) -> Option<Scratch> {
    if !support::require_root(test) {
        return None;
    }
    private_mount_namespace();
    let tmp = support::tempdir();
    mount_tmpfs(tmp.path(), "mode=0755");
    let s = Scratch { tmp };
    if let Err(e) = raw_overlay_probe(&s.path().join(".probe")) {
        support::skip(&format!("{test}: the kernel cannot mount overlayfs here: {e}"));
        return None;
    }
    Some(s)
}

/// A plain `mount(2)` of a one-layer overlay, without the crate.
fn raw_overlay_probe(dir: &Path) -> nix::Result<()> {
    for d in ["l", "u", "w", "m"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let data = format!("lowerdir={0}/l,upperdir={0}/u,workdir={0}/w", dir.to_str().expect("scratch paths are UTF-8"));
    let r = mount(Some("overlay"), &dir.join("m"), Some("overlay"), MsFlags::empty(), Some(data.as_str()));
    if r.is_ok() {
        umount2(&dir.join("m"), MntFlags::MNT_DETACH).unwrap();
    }
    fs::remove_dir_all(dir).unwrap();
    r
}

// ---------------------------------------------------------------------------------------
// Mount table (this thread's namespace)

#[derive(Debug)]
struct MountLine {
    mount_point: PathBuf,
    fstype: String,
    super_opts: String,
}

/// Decodes mountinfo's octal escapes (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(b[i + 1..i + 4].iter().fold(0u8, |a, c| a.wrapping_mul(8).wrapping_add(c - b'0')));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8 mount points")
}

/// This thread's mount table (`/proc/self` would show the main thread's namespace).
fn mounts() -> Vec<MountLine> {
    let text = fs::read_to_string("/proc/thread-self/mountinfo").expect("read /proc/thread-self/mountinfo");
    text.lines()
        .map(|line| {
            let (left, right) = line.split_once(" - ").unwrap_or_else(|| panic!("bad mountinfo line {line}"));
            let mount_point = PathBuf::from(unescape(left.split(' ').nth(4).expect("mount point field")));
            let mut r = right.splitn(3, ' ');
            let fstype = r.next().unwrap_or_default().to_string();
            let _source = r.next();
            MountLine { mount_point, fstype, super_opts: r.next().unwrap_or_default().to_string() }
        })
        .collect()
}

fn mount_count() -> usize {
    mounts().len()
}

/// The (topmost) mount at `target`.
fn mount_at(target: &Path) -> Option<MountLine> {
    mounts().into_iter().rfind(|m| m.mount_point == target)
}

fn assert_overlay_at(target: &Path, what: &str) {
    assert!(is_mount_point(target).unwrap(), "{what}: {} is not a mount point", target.display());
    let m = mount_at(target).unwrap_or_else(|| panic!("{what}: no mountinfo line for {}", target.display()));
    assert_eq!(m.fstype, "overlay", "{what}: {m:?}");
}

/// Asserts that `f` fails with an error `ok` accepts, and that it mounted nothing.
fn assert_refused(
    what: &str,
    target: &Path,
    ok: impl Fn(&Error) -> bool,
    f: impl FnOnce() -> rootfs_cache::Result<()>,
) {
    let before = mount_count();
    let was_mounted = is_mount_point(target).unwrap();
    match f() {
        Ok(()) => panic!("{what}: mounted, expected a refusal"),
        Err(e) => assert!(ok(&e), "{what}: unexpected error {e:?} ({e})"),
    }
    assert_eq!(mount_count(), before, "{what}: the mount table changed: {:#?}", mounts());
    assert_eq!(is_mount_point(target).unwrap(), was_mounted, "{what}: {}", target.display());
}

// ---------------------------------------------------------------------------------------
// Files

fn write(p: &Path, data: impl AsRef<[u8]>) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn mkdirs(p: &Path) -> PathBuf {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    p.to_path_buf()
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Everything, exactly: types, contents (sha256), modes, owners, xattrs, mtimes.
fn strict() -> support::Cmp {
    support::Cmp {
        mode: true,
        owner: true,
        xattrs: true,
        mtime: true,
        dir_mtime: true,
        mtime_nsec: true,
        hardlinks: true,
        ignore_xattrs: Vec::new(),
    }
}

fn assert_same_tree(what: &str, before: &BTreeMap<Vec<u8>, support::Node>, after: &BTreeMap<Vec<u8>, support::Node>) {
    support::assert_no_diffs(what, &support::diff_trees(before, after, &strict()));
}

fn assert_whiteout(p: &Path) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("no whiteout at {}: {e}", p.display()));
    assert!(m.file_type().is_char_device() && m.rdev() == 0, "{} is not a 0:0 whiteout: {m:?}", p.display());
}

/// Relative paths of everything under `root` that carries an xattr starting with `prefix`.
fn with_xattr(root: &Path, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let snap = support::snapshot(root);
    for (p, n) in &snap {
        for k in n.xattrs.keys() {
            if k.starts_with(prefix.as_bytes()) {
                out.push(format!("{} {}", support::show(p), support::show(k)));
            }
        }
    }
    out
}

fn kernel_version() -> (u32, u32) {
    let r = nix::sys::utsname::uname().expect("uname");
    let rel = r.release().to_string_lossy().into_owned();
    let mut it = rel.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// The concrete APIs this kernel has (best first), by what `Auto` probes.
fn supported_apis() -> Vec<MountApi> {
    let order = [MountApi::LayerFds, MountApi::LayerStrings, MountApi::Legacy];
    let best = KernelOverlay::new().api();
    let i = order.iter().position(|a| *a == best).unwrap_or_else(|| panic!("Auto resolved to {best:?}"));
    order[i..].to_vec()
}

/// Every API to test: the supported concrete ones, then `Auto`.
fn apis() -> Vec<MountApi> {
    let mut v = supported_apis();
    v.push(MountApi::Auto);
    v
}

fn tag(api: MountApi) -> &'static str {
    match api {
        MountApi::LayerFds => "fd",
        MountApi::LayerStrings => "str",
        MountApi::Legacy => "leg",
        _ => "auto",
    }
}

// ---------------------------------------------------------------------------------------
// 1. Many lowers at long paths

/// Length of the common prefix of the long-path layout: a lower at an even index is
/// `PREFIX/NNN` (255 bytes, passed to `fsconfig` as a string) and at an odd index
/// `PREFIX/NNNx` (256 bytes: past what `fsconfig` copies of a string, so `LayerStrings`
/// must `fchdir` into it).
const PREFIX_LEN: usize = 251;
const LAYERS: usize = MAX_LOWERS + 1;

/// `root` extended with nested directories to exactly `len` bytes.
fn long_prefix(root: &Path, len: usize) -> PathBuf {
    let mut p = root.to_str().unwrap().to_string();
    assert!(p.len() + 4 < len, "scratch path {p} too long for the layout");
    let mut level = 0;
    while p.len() < len {
        let left = len - p.len();
        // Each component is "/" + name; never leave a remainder too small for one.
        let take = if left > 100 {
            60
        } else if left > 60 {
            left / 2
        } else {
            left
        };
        p.push('/');
        let name = format!("level{level:02}-");
        let fill = take - 1;
        p.push_str(&name[..name.len().min(fill)]);
        p.extend(std::iter::repeat_n('p', fill.saturating_sub(name.len())));
        level += 1;
    }
    assert_eq!(p.len(), len);
    PathBuf::from(p)
}

fn lower_name(i: usize) -> String {
    if i % 2 == 0 { format!("{i:03}") } else { format!("{i:03}x") }
}

/// `LAYERS` lowers under one long common prefix. Lower `i` holds `f{i}` ("{i}") and
/// `shared` ("layer {i}").
fn long_tree(root: &Path) -> (PathBuf, Vec<PathBuf>) {
    let prefix = mkdirs(&long_prefix(root, PREFIX_LEN));
    let lowers: Vec<PathBuf> = (0..LAYERS)
        .map(|i| {
            let l = mkdirs(&prefix.join(lower_name(i)));
            write(&l.join(format!("f{i}")), i.to_string());
            write(&l.join("shared"), format!("layer {i}"));
            l
        })
        .collect();
    for (i, l) in lowers.iter().enumerate() {
        assert_eq!(l.as_os_str().len(), PREFIX_LEN + 1 + lower_name(i).len());
    }
    (prefix, lowers)
}

/// The acceptance matrix: every API, N lowers (the last N of the tree, so the top layer
/// differs for each N), long paths (for N >= 50 far more than a page of option data),
/// read through the merged view and written through it.
#[test]
fn many_lowers_at_long_paths_with_every_api() {
    let Some(s) = setup("many_lowers_at_long_paths_with_every_api") else { return };
    let (prefix, lowers) = long_tree(s.path());
    let lowers_before = support::snapshot(&prefix);
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let backend = KernelOverlay::with_api(api);
        assert_ne!(backend.api(), MountApi::Auto);
        for n in [1usize, 2, 50, 200, 499, MAX_LOWERS] {
            let what = format!("{api:?} with {n} lowers");
            let first = LAYERS - n;
            let layer_paths = &lowers[first..];
            let option_bytes: usize = layer_paths.iter().map(|l| l.as_os_str().len() + 1).sum();
            if n >= 50 {
                assert!(option_bytes > 4096 * 3, "{what}: only {option_bytes} bytes of lowerdir");
            }
            let upper = mkdirs(&prefix.join(format!("u-{}-{n}", tag(api))));
            let work = mkdirs(&prefix.join(format!("w-{}-{n}", tag(api))));
            let mut spec = OverlaySpec::new(layer_paths.iter().cloned(), &upper, &work, &target);
            spec.options.fresh = true;
            let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_overlay_at(&target, &what);
            if backend.api() == MountApi::Legacy && n >= 50 {
                // Past a page: mounted with paths relative to the common prefix.
                let o = super_opts(&target);
                let lowerdir = opt(&o, "lowerdir").unwrap_or_else(|| panic!("{what}: no lowerdir in {o:?}"));
                assert!(lowerdir.starts_with(&lower_name(first)), "{what}: not compacted: {}", &lowerdir[..60]);
            }

            let mut want: BTreeSet<String> = (first..LAYERS).map(|i| format!("f{i}")).collect();
            want.insert("shared".into());
            assert_eq!(names(&target), want, "{what}: merged directory listing");
            for i in first..LAYERS {
                assert_eq!(read(&target.join(format!("f{i}"))), i.to_string(), "{what}: f{i}");
            }
            assert_eq!(read(&target.join("shared")), format!("layer {first}"), "{what}: the top layer must win");

            write(&target.join("shared"), "written");
            write(&target.join("new"), "new");
            m.unmount().unwrap_or_else(|e| panic!("{what}: unmount: {e}"));
            assert!(!is_mount_point(&target).unwrap(), "{what}: still mounted");
            assert_eq!(names(&upper), set(["new", "shared"]), "{what}: upper");
            assert_eq!(read(&upper.join("shared")), "written");
            assert!(names(&target).is_empty(), "{what}: the target dir itself was written");
        }
    }
    for api in apis() {
        // Remove this round's uppers and works so the lowers compare equal below.
        for n in [1usize, 2, 50, 200, 499, MAX_LOWERS] {
            for d in ["u", "w"] {
                fs::remove_dir_all(prefix.join(format!("{d}-{}-{n}", tag(api)))).unwrap();
            }
        }
    }
    assert_same_tree("lowers after all mounts", &lowers_before, &support::snapshot(&prefix));
}

/// 501 lowers: `LimitExceeded` from every API, before any lower is even opened.
#[test]
fn more_than_max_lowers_is_refused_before_the_kernel() {
    let Some(s) = setup("more_than_max_lowers_is_refused_before_the_kernel") else { return };
    let (prefix, lowers) = long_tree(s.path());
    assert_eq!(lowers.len(), MAX_LOWERS + 1);
    let upper = mkdirs(&prefix.join("u"));
    let work = mkdirs(&prefix.join("w"));
    let target = mkdirs(&s.path().join("m"));
    let missing: Vec<PathBuf> = (0..=MAX_LOWERS).map(|i| s.path().join(format!("does-not-exist-{i}"))).collect();
    for api in apis() {
        let backend = KernelOverlay::with_api(api);
        for (kind, ls) in [("real", &lowers), ("missing", &missing)] {
            let spec = OverlaySpec::new(ls.iter().cloned(), &upper, &work, &target);
            assert_refused(
                &format!("{api:?}: {} {kind} lowers", ls.len()),
                &target,
                |e| matches!(e, Error::LimitExceeded { limit, .. } if *limit == MAX_LOWERS as u64),
                || backend.mount(&spec),
            );
        }
    }
    assert!(names(&upper).is_empty() && names(&work).is_empty());
}

/// `mount(2)` takes one page of options. Compaction (relative to the deepest common
/// directory) makes 500 long paths fit when they share a deep prefix (tested above);
/// without a useful common prefix the answer is `LimitExceeded`, while the fsconfig
/// APIs mount the very same spec.
#[test]
fn legacy_without_a_common_prefix_is_limit_exceeded() {
    let Some(s) = setup("legacy_without_a_common_prefix_is_limit_exceeded") else { return };
    let (_prefix, lowers) = long_tree(s.path());
    let target = mkdirs(&s.path().join("m"));
    // Upper and work far from the lowers: the common directory is the scratch root (or
    // `/`), leaving each lower ~230 bytes even after compaction.
    let near = s.path().join("near");
    let other_root = tempfile::tempdir_in("/var/tmp").or_else(|_| tempfile::tempdir()).unwrap();
    let far = other_root.path().to_path_buf();
    for (case, base) in [("common directory = scratch root", &near), ("common directory = /", &far)] {
        let upper = mkdirs(&base.join("u"));
        let work = mkdirs(&base.join("w"));
        let spec = OverlaySpec::new(lowers[..50].iter().cloned(), &upper, &work, &target);
        assert_refused(
            &format!("Legacy, 50 long lowers, {case}"),
            &target,
            |e| matches!(e, Error::LimitExceeded { .. }),
            || KernelOverlay::with_api(MountApi::Legacy).mount(&spec),
        );
        for api in supported_apis().into_iter().filter(|a| *a != MountApi::Legacy) {
            let backend = KernelOverlay::with_api(api);
            let m = OverlayMount::mount(&backend, spec.clone()).unwrap_or_else(|e| panic!("{api:?}, {case}: {e}"));
            assert_eq!(read(&target.join("shared")), "layer 0");
            m.unmount().unwrap();
            fs::remove_dir_all(&work).unwrap();
            mkdirs(&work);
        }
        // A few lowers still fit without compaction.
        let spec = OverlaySpec::new(lowers[..3].iter().cloned(), &upper, &work, &target);
        let legacy = KernelOverlay::with_api(MountApi::Legacy);
        let m = OverlayMount::mount(&legacy, spec).unwrap_or_else(|e| panic!("Legacy, 3 lowers, {case}: {e}"));
        assert_eq!(names(m.target()), set(["f0", "f1", "f2", "shared"]));
        m.unmount().unwrap();
    }
    assert!(!is_mount_point(&target).unwrap());
}

/// `Auto` resolves to the best API the running kernel has.
#[test]
fn auto_probes_the_best_api() {
    if !support::require_root("auto_probes_the_best_api") {
        return;
    }
    let api = KernelOverlay::new().api();
    assert_ne!(api, MountApi::Auto);
    assert_eq!(KernelOverlay::new().api(), api, "the probe is stable");
    assert_eq!(KernelOverlay::with_api(MountApi::Legacy).api(), MountApi::Legacy);
    let v = kernel_version();
    if v >= (6, 13) {
        assert_eq!(api, MountApi::LayerFds, "kernel {v:?} has fsconfig(FSCONFIG_SET_FD, \"lowerdir+\")");
    } else if v >= (6, 8) {
        assert_ne!(api, MountApi::Legacy, "kernel {v:?} has fsconfig \"lowerdir+\" strings");
    }
}

/// Separators and escapes in paths: `,` `:` `\` and spaces in lowers, upper, work and
/// target survive every API (the legacy option string must escape them; `fsconfig`
/// string values for `upperdir`/`workdir` are unescaped by overlayfs, `lowerdir+`
/// values are not). Every API is tried before failing, so a report lists them all.
#[test]
fn special_characters_in_paths() {
    let Some(s) = setup("special_characters_in_paths") else { return };
    let layer_names = ["with:colon", "with,comma", "back\\slash", "with space"];
    let lowers: Vec<PathBuf> = layer_names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let l = mkdirs(&s.path().join("layers").join(n));
            write(&l.join(format!("f{i}")), n);
            write(&l.join("shared"), n);
            l
        })
        .collect();
    let target = mkdirs(&s.path().join("merged,:\\ x"));
    let mut failures = Vec::new();
    for api in apis() {
        for (u, w) in [("up,per:", "wo:rk "), ("up\\per", "wo\\rk")] {
            let what = format!("{api:?} upper {u:?} work {w:?}");
            let upper = mkdirs(&s.path().join(format!("{u}{}", tag(api))));
            let work = mkdirs(&s.path().join(format!("{w}{}", tag(api))));
            let mut spec = OverlaySpec::new(lowers.iter().cloned(), &upper, &work, &target);
            spec.options.fresh = true;
            let backend = KernelOverlay::with_api(api);
            let m = match OverlayMount::mount(&backend, spec) {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{what}: {e}"));
                    assert!(!is_mount_point(&target).unwrap());
                    continue;
                }
            };
            assert_overlay_at(&target, &what);
            assert_eq!(names(&target), set(["f0", "f1", "f2", "f3", "shared"]), "{what}");
            assert_eq!(read(&target.join("shared")), "with:colon", "{what}");
            write(&target.join("new"), "x");
            m.unmount().unwrap();
            assert_eq!(names(&upper), set(["new"]), "{what}");
        }
    }
    assert!(failures.is_empty(), "mounts failed:\n  {}", failures.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// 2. Writes land in the upper; lowers unchanged

/// Two lowers with files, dirs, a symlink, an executable.
fn small_lowers(root: &Path) -> Vec<PathBuf> {
    let top = mkdirs(&root.join("l0"));
    let bottom = mkdirs(&root.join("l1"));
    write(&top.join("a.txt"), "top a");
    write(&top.join("mod.txt"), "old");
    write(&top.join("del-me"), "bye");
    write(&top.join("ren-from"), "renamed content");
    write(&top.join("exec.sh"), "#!/bin/sh\necho hi\n");
    support::chmod(&top.join("exec.sh"), 0o755);
    mkdirs(&top.join("dir"));
    write(&top.join("dir/x"), "x0");
    mkdirs(&top.join("opq/sub"));
    write(&top.join("opq/k0"), "k0");
    write(&bottom.join("a.txt"), "bottom a");
    write(&bottom.join("bottom-only"), "b");
    mkdirs(&bottom.join("dir"));
    write(&bottom.join("dir/y"), "y1");
    mkdirs(&bottom.join("opq/sub"));
    write(&bottom.join("opq/k1"), "k1");
    write(&bottom.join("opq/sub/k2"), "k2");
    mkdirs(&bottom.join("lowdir"));
    write(&bottom.join("lowdir/z"), "z");
    std::os::unix::fs::symlink("a.txt", bottom.join("sym")).unwrap();
    vec![top, bottom]
}

#[test]
fn writes_land_in_the_upper_and_lowers_stay_unchanged() {
    let Some(s) = setup("writes_land_in_the_upper_and_lowers_stay_unchanged") else { return };
    let lroot = mkdirs(&s.path().join("lowers"));
    let lowers = small_lowers(&lroot);
    let before = support::snapshot(&lroot);
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let what = format!("{api:?}");
        let upper = mkdirs(&s.path().join(format!("u-{}", tag(api))));
        let work = mkdirs(&s.path().join(format!("w-{}", tag(api))));
        let mut spec = OverlaySpec::new(lowers.iter().cloned(), &upper, &work, &target);
        spec.options.fresh = true;
        let backend = KernelOverlay::with_api(api);
        let m = OverlayMount::mount(&backend, spec.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let t = |p: &str| target.join(p);
        assert_eq!(read(&t("a.txt")), "top a");
        assert_eq!(names(&t("dir")), set(["x", "y"]));
        assert_eq!(read(&t("sym")), "top a", "a relative symlink resolves in the merged view");

        write(&t("new.txt"), "new");
        write(&t("mod.txt"), "new content");
        fs::remove_file(t("del-me")).unwrap();
        fs::remove_file(t("bottom-only")).unwrap();
        support::chmod(&t("exec.sh"), 0o700);
        fs::rename(t("ren-from"), t("ren-to")).unwrap();
        fs::remove_dir_all(t("opq")).unwrap();
        mkdirs(&t("opq"));
        write(&t("opq/fresh"), "fresh");
        mkdirs(&t("newdir/inner"));
        write(&t("newdir/inner/f"), "f");
        // redirect_dir=off: a lower directory cannot be renamed (no redirect xattrs).
        let err = fs::rename(t("lowdir"), t("lowdir2")).expect_err("renaming a lower dir must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{what}: {err}");

        assert_eq!(
            names(&target),
            set(["a.txt", "dir", "exec.sh", "lowdir", "mod.txt", "new.txt", "newdir", "opq", "ren-to", "sym"]),
            "{what}: merged view"
        );
        assert_eq!(names(&t("opq")), set(["fresh"]), "{what}: the recreated dir hides the lowers'");
        let merged = support::snapshot(&target);
        m.unmount().unwrap_or_else(|e| panic!("{what}: unmount: {e}"));
        assert!(!is_mount_point(&target).unwrap());

        assert_same_tree(&format!("{what}: lowers"), &before, &support::snapshot(&lroot));

        let u = |p: &str| upper.join(p);
        assert_eq!(
            names(&upper),
            set(["bottom-only", "del-me", "exec.sh", "mod.txt", "new.txt", "newdir", "opq", "ren-from", "ren-to"]),
            "{what}: upper"
        );
        assert_eq!(read(&u("new.txt")), "new");
        assert_eq!(read(&u("mod.txt")), "new content");
        assert_whiteout(&u("del-me"));
        assert_whiteout(&u("bottom-only"));
        assert_whiteout(&u("ren-from"));
        assert_eq!(read(&u("ren-to")), "renamed content");
        // metacopy=off: a chmod copies the data up too.
        assert_eq!(fs::metadata(u("exec.sh")).unwrap().permissions().mode() & 0o7777, 0o700);
        assert_eq!(read(&u("exec.sh")), "#!/bin/sh\necho hi\n");
        assert_eq!(support::lgetxattr(&u("opq"), b"trusted.overlay.opaque").as_deref(), Some(&b"y"[..]), "{what}");
        assert_eq!(names(&u("opq")), set(["fresh"]));
        assert_eq!(read(&u("newdir/inner/f")), "f");
        for bad in ["trusted.overlay.redirect", "trusted.overlay.metacopy", "user.overlay."] {
            assert_eq!(with_xattr(&upper, bad), Vec::<String>::new(), "{what}: {bad} in the upper");
        }
        assert!(!work.join("index").exists(), "{what}: index=off, yet the work dir has an index");

        // Remounting the same upper (not fresh) shows the same merged view.
        let mut again = spec.clone();
        again.options.fresh = false;
        let m = OverlayMount::mount(&backend, again).unwrap_or_else(|e| panic!("{what}: remount: {e}"));
        let cmp = support::Cmp { mode: true, ..Default::default() };
        support::assert_no_diffs(
            &format!("{what}: merged view after remount"),
            &support::diff_trees(&merged, &support::snapshot(&target), &cmp),
        );
        drop(m);
        assert!(!is_mount_point(&target).unwrap());
    }
}

// ---------------------------------------------------------------------------------------
// 3. Refusals

#[test]
fn refusals_leave_nothing_mounted() {
    let Some(s) = setup("refusals_leave_nothing_mounted") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let (l0, l1) = (lowers[0].clone(), lowers[1].clone());
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let what = |w: &str| format!("{api:?}: {w}");
        let backend = KernelOverlay::with_api(api);
        let dir = mkdirs(&s.path().join(tag(api)));
        let upper = mkdirs(&dir.join("u"));
        let work = mkdirs(&dir.join("w"));
        let spec = |ls: Vec<PathBuf>| OverlaySpec::new(ls, &upper, &work, &target);

        // Target already a mount point: our own overlay, mounted twice.
        let m = OverlayMount::mount(&backend, spec(lowers.clone())).unwrap();
        let other_upper = mkdirs(&dir.join("u2"));
        let other_work = mkdirs(&dir.join("w2"));
        let second = OverlaySpec::new(lowers.clone(), &other_upper, &other_work, &target);
        assert_refused(
            &what("mounting twice on one target"),
            &target,
            |e| matches!(e, Error::AlreadyMounted { path } if *path == target),
            || backend.mount(&second),
        );
        assert_eq!(read(&target.join("a.txt")), "top a", "the first mount is untouched");
        // A stale mount left behind (keep_mounted, as by a crashed runtime) is refused too.
        let stale = m.keep_mounted();
        assert_refused(
            &what("a stale overlay at the target"),
            &target,
            |e| matches!(e, Error::AlreadyMounted { .. }),
            || backend.mount(&second),
        );
        backend.unmount(&stale).unwrap();
        assert!(!is_mount_point(&target).unwrap());
        assert!(names(&other_upper).is_empty() && names(&other_work).is_empty());

        // Target a tmpfs mount point.
        mount_tmpfs(&target, "size=1m");
        write(&target.join("tmpfs-file"), "t");
        assert_refused(
            &what("a tmpfs at the target"),
            &target,
            |e| matches!(e, Error::AlreadyMounted { .. }),
            || backend.mount(&spec(lowers.clone())),
        );
        assert_eq!(read(&target.join("tmpfs-file")), "t");
        umount2(&target, MntFlags::MNT_DETACH).unwrap();

        // Fresh upper/work that are not empty.
        write(&upper.join("leftover"), "x");
        let mut fresh = spec(lowers.clone());
        fresh.options.fresh = true;
        assert_refused(
            &what("fresh with a non-empty upper"),
            &target,
            |e| matches!(e, Error::NotEmpty { path } if *path == upper),
            || backend.mount(&fresh),
        );
        fs::remove_file(upper.join("leftover")).unwrap();
        mkdirs(&work.join("work"));
        assert_refused(
            &what("fresh with a non-empty work dir"),
            &target,
            |e| matches!(e, Error::NotEmpty { path } if *path == work),
            || backend.mount(&fresh),
        );
        // Not fresh: remounting a used upper and work is the normal case.
        write(&upper.join("leftover"), "x");
        let m = OverlayMount::mount(&backend, spec(lowers.clone())).unwrap();
        assert_eq!(read(&target.join("leftover")), "x");
        m.unmount().unwrap();

        // The same lower twice: literally, through a symlink, a bind mount, a `.` suffix.
        let link = dir.join("alias-link");
        std::os::unix::fs::symlink(&l1, &link).unwrap();
        let bind = mkdirs(&dir.join("alias-bind"));
        mount(Some(&l1), &bind, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
        for (case, ls) in [
            ("listed twice", vec![l0.clone(), l1.clone(), l1.clone()]),
            ("top listed twice", vec![l0.clone(), l0.clone()]),
            ("a symlink alias", vec![l0.clone(), l1.clone(), link.clone()]),
            ("a bind mount alias", vec![bind.clone(), l0.clone(), l1.clone()]),
            ("a trailing /.", vec![l0.clone(), l1.clone(), l0.join(".")]),
        ] {
            assert_refused(
                &what(&format!("duplicate lower: {case}")),
                &target,
                |e| matches!(e, Error::InvalidSpec { .. }),
                || backend.mount(&spec(ls)),
            );
        }
        umount2(&bind, MntFlags::MNT_DETACH).unwrap();

        assert_refused(
            &what("no lowers"),
            &target,
            |e| matches!(e, Error::InvalidSpec { .. }),
            || backend.mount(&spec(Vec::new())),
        );
        let many: Vec<PathBuf> = (0..=MAX_LOWERS).map(|_| l0.clone()).collect();
        assert_refused(
            &what("501 lowers"),
            &target,
            |e| matches!(e, Error::LimitExceeded { .. }),
            || backend.mount(&spec(many)),
        );
        assert_refused(
            &what("a missing lower"),
            &target,
            |e| matches!(e, Error::Io { .. }),
            || backend.mount(&spec(vec![l0.clone(), dir.join("missing")])),
        );
        assert_eq!(names(&upper), set(["leftover"]), "{api:?}: the refusals wrote to the upper");
    }
}

/// A target given as a symlink to a directory: whatever the backend does, an `Ok` from
/// `unmount` must leave nothing mounted, and it must not stack onto an existing mount
/// behind the link. Every API is tried before failing.
#[test]
fn symlinked_target_never_leaks_a_mount() {
    let Some(s) = setup("symlinked_target_never_leaks_a_mount") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let real = mkdirs(&s.path().join("real"));
    let link = s.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut failures = Vec::new();
    // Detaches everything this test stacked on `real`.
    let clean = |real: &Path| {
        while is_mount_point(real).unwrap() {
            umount2(real, MntFlags::MNT_DETACH).unwrap();
        }
    };
    for api in apis() {
        let dir = mkdirs(&s.path().join(tag(api)));
        let spec = OverlaySpec::new(lowers.clone(), mkdirs(&dir.join("u")), mkdirs(&dir.join("w")), &link);
        let backend = KernelOverlay::with_api(api);

        let before = mount_count();
        let mounted = backend.mount(&spec);
        let during = mount_count();
        let unmounted = backend.unmount(&spec);
        let after = mount_count();
        eprintln!(
            "{api:?}: mount via symlink: {mounted:?} ({before} -> {during} mounts); unmount: {unmounted:?} (-> {after})"
        );
        if mounted.is_err() && during != before {
            failures.push(format!("{api:?}: mount failed ({mounted:?}) but mounted something"));
        }
        if unmounted.is_ok() && after != before {
            failures.push(format!(
                "{api:?}: mount via a symlinked target {}, then unmount returned Ok but the overlay is still \
                 mounted on {}",
                if mounted.is_ok() { "succeeded" } else { "failed" },
                real.display()
            ));
        }
        clean(&real);

        // A tmpfs already on the real dir: the link leads to an existing mount point.
        mount_tmpfs(&real, "size=1m");
        let before = mount_count();
        let r = backend.mount(&spec);
        let after = mount_count();
        eprintln!("{api:?}: mount via symlink onto a tmpfs: {r:?} ({before} -> {after} mounts)");
        if after != before {
            failures.push(format!(
                "{api:?}: stacked an overlay onto the tmpfs mounted at {} through the symlink {} ({r:?})",
                real.display(),
                link.display()
            ));
        }
        let _ = backend.unmount(&spec);
        clean(&real);
    }
    assert!(failures.is_empty(), "symlinked targets:\n  {}", failures.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// 4. Unmounting

#[test]
fn double_unmount_is_harmless() {
    let Some(s) = setup("double_unmount_is_harmless") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let what = format!("{api:?}");
        let backend = KernelOverlay::with_api(api);
        let dir = mkdirs(&s.path().join(tag(api)));
        let upper = mkdirs(&dir.join("u"));
        let spec = OverlaySpec::new(lowers.clone(), &upper, mkdirs(&dir.join("w")), &target);
        let base = mount_count();

        // Never mounted, and a target that does not exist.
        backend.unmount(&spec).unwrap_or_else(|e| panic!("{what}: unmount of an unmounted target: {e}"));
        let mut nowhere = spec.clone();
        nowhere.target = dir.join("no-such-dir");
        backend.unmount(&nowhere).unwrap_or_else(|e| panic!("{what}: unmount of a missing target: {e}"));

        // Mounted: unmount twice.
        backend.mount(&spec).unwrap();
        write(&target.join("kept"), "kept");
        assert_eq!(mount_count(), base + 1);
        backend.unmount(&spec).unwrap();
        backend.unmount(&spec).unwrap_or_else(|e| panic!("{what}: second unmount: {e}"));
        assert_eq!(mount_count(), base);
        assert!(!is_mount_point(&target).unwrap());
        assert_eq!(read(&upper.join("kept")), "kept", "{what}: unmount must keep the upper");

        // The guard: explicit unmount, then drop (no second unmount); plain drop.
        let m = OverlayMount::mount(&backend, spec.clone()).unwrap();
        assert_eq!(m.target(), target);
        m.unmount().unwrap();
        assert!(!is_mount_point(&target).unwrap());
        {
            let m = OverlayMount::mount(&backend, spec.clone()).unwrap();
            assert!(is_mount_point(m.target()).unwrap());
            write(&target.join("kept2"), "kept2");
        }
        assert!(!is_mount_point(&target).unwrap(), "{what}: drop must unmount");
        assert_eq!(mount_count(), base);
        // keep_mounted hands the unmount over to the caller.
        let m = OverlayMount::mount(&backend, spec.clone()).unwrap();
        let kept = m.keep_mounted();
        assert_eq!(kept, spec);
        assert!(is_mount_point(&target).unwrap(), "{what}: keep_mounted must keep it mounted");
        backend.unmount(&kept).unwrap();
        backend.unmount(&kept).unwrap();
        assert_eq!(mount_count(), base);
        assert_eq!(names(&upper), set(["kept", "kept2"]), "{what}: upper contents");
        assert_eq!(names(&target), BTreeSet::new());
    }
}

// ---------------------------------------------------------------------------------------
// 5. Options reaching the kernel

/// A kernel overlay default (`/sys/module/overlay/parameters/NAME`): `Y`/`N`.
fn kernel_default_on(name: &str) -> Option<bool> {
    let v = fs::read_to_string(format!("/sys/module/overlay/parameters/{name}")).ok()?;
    Some(v.trim() == "Y")
}

fn super_opts(target: &Path) -> Vec<String> {
    let m = mount_at(target).unwrap_or_else(|| panic!("nothing mounted at {}", target.display()));
    assert_eq!(m.fstype, "overlay");
    m.super_opts.split(',').map(str::to_string).collect()
}

/// The value of `key=` in `opts`.
fn opt<'a>(opts: &'a [String], key: &str) -> Option<&'a str> {
    opts.iter().find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// The kernel lists a feature in mountinfo only when it differs from the kernel's
/// default (`ovl_show_options`): `index=off` appears only on kernels that default to
/// `index=on`. So a feature the crate turns off must be shown off, or be absent with
/// the kernel's default off.
fn assert_off(opts: &[String], key: &str, param: &str, off: &[&str]) {
    match opt(opts, key) {
        Some(v) => assert!(off.contains(&v), "{key}={v} in {opts:?}"),
        None => {
            assert_eq!(
                kernel_default_on(param),
                Some(false),
                "{key} not shown in {opts:?} but the kernel default is on"
            )
        }
    }
}

fn assert_on(opts: &[String], key: &str, param: &str, on: &str) {
    match opt(opts, key) {
        Some(v) => assert_eq!(v, on, "{key} in {opts:?}"),
        None => assert_eq!(kernel_default_on(param), Some(true), "{key}={on} not shown in {opts:?}"),
    }
}

#[test]
fn default_options_reach_the_kernel() {
    let Some(s) = setup("default_options_reach_the_kernel") else { return };
    // Lowers on another filesystem than the upper, so xino would be shown if on.
    let other = support::tempdir();
    let lowers = small_lowers(other.path());
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let what = format!("{api:?}");
        let dir = mkdirs(&s.path().join(tag(api)));
        let backend = KernelOverlay::with_api(api);
        let spec = OverlaySpec::new(lowers.clone(), mkdirs(&dir.join("u")), mkdirs(&dir.join("w")), &target);
        let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        let o = super_opts(&target);
        assert_off(&o, "index", "index", &["off"]);
        // "off" is the kernel's legacy spelling of "don't create redirects": it shows as
        // follow or nofollow, depending on redirect_always_follow.
        assert_off(&o, "redirect_dir", "redirect_dir", &["off", "follow", "nofollow"]);
        assert_off(&o, "metacopy", "metacopy", &["off"]);
        assert_off(&o, "xino", "xino_auto", &["off"]);
        let unwanted: &[&str] = if in_user_namespace() {
            &["volatile", "fsync=volatile"]
        } else {
            &["volatile", "fsync=volatile", "userxattr"]
        };
        for unwanted in unwanted {
            assert!(!o.iter().any(|x| x == unwanted), "{what}: {unwanted} in {o:?}");
        }
        drop(m);
        assert!(!dir.join("w/index").exists(), "{what}: index=off, yet an index dir");
    }
}

#[test]
fn enabled_options_reach_the_kernel() {
    let Some(s) = setup("enabled_options_reach_the_kernel") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let what = format!("{api:?}");
        let dir = mkdirs(&s.path().join(tag(api)));
        let backend = KernelOverlay::with_api(api);
        let mut spec = OverlaySpec::new(lowers.clone(), mkdirs(&dir.join("u")), mkdirs(&dir.join("w")), &target);
        spec.options.index = true;
        spec.options.redirect_dir = true;
        spec.options.metacopy = true;
        let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        let o = super_opts(&target);
        assert_on(&o, "index", "index", "on");
        assert_on(&o, "redirect_dir", "redirect_dir", "on");
        assert_on(&o, "metacopy", "metacopy", "on");
        // redirect_dir=on: a lower dir can be renamed now.
        fs::rename(target.join("lowdir"), target.join("lowdir2")).unwrap_or_else(|e| panic!("{what}: {e}"));
        drop(m);
        assert!(dir.join("w/index").is_dir(), "{what}: index=on, yet no index dir");
        assert!(!with_xattr(&dir.join("u"), "trusted.overlay.redirect").is_empty(), "{what}: no redirect xattr");
    }
}

#[test]
fn volatile_reaches_the_kernel() {
    let Some(s) = setup("volatile_reaches_the_kernel") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let dir = mkdirs(&s.path().join(tag(api)));
        let mut spec = OverlaySpec::new(lowers.clone(), mkdirs(&dir.join("u")), mkdirs(&dir.join("w")), &target);
        spec.options.volatile = true;
        let backend = KernelOverlay::with_api(api);
        let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("{api:?}: {e}"));
        let o = super_opts(&target);
        // Shown as "volatile" by older kernels, "fsync=volatile" since 6.15.
        assert!(o.iter().any(|x| x == "volatile" || x == "fsync=volatile"), "{api:?}: {o:?}");
        drop(m);
    }
}

/// `userxattr` (forced on, as root in the initial namespace) must reach the kernel and
/// mount: overlay then keeps its metadata in `user.overlay.*`.
#[test]
fn userxattr_reaches_the_kernel() {
    let Some(s) = setup("userxattr_reaches_the_kernel") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let target = mkdirs(&s.path().join("m"));
    for api in apis() {
        let what = format!("{api:?}");
        let dir = mkdirs(&s.path().join(tag(api)));
        let upper = mkdirs(&dir.join("u"));
        let mut spec = OverlaySpec::new(lowers.clone(), &upper, mkdirs(&dir.join("w")), &target);
        spec.options.userxattr = Some(true);
        assert!(spec.userxattr());
        let backend = KernelOverlay::with_api(api);
        let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        let o = super_opts(&target);
        assert!(o.iter().any(|x| x == "userxattr"), "{what}: {o:?}");
        fs::remove_dir_all(target.join("opq")).unwrap();
        mkdirs(&target.join("opq"));
        drop(m);
        assert_eq!(support::lgetxattr(&upper.join("opq"), b"user.overlay.opaque").as_deref(), Some(&b"y"[..]));
        assert_eq!(with_xattr(&upper, "trusted.overlay."), Vec::<String>::new(), "{what}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. Mount failures

/// The kernel refuses upper and work on different filesystems: `Error::Mount` naming
/// the target, with the errno, and nothing mounted or written.
#[test]
fn kernel_refusal_is_a_useful_error() {
    let Some(s) = setup("kernel_refusal_is_a_useful_error") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let target = mkdirs(&s.path().join("merged-target"));
    // Upper on /tmp's filesystem, work on the scratch tmpfs: refused before the kernel
    // (which would only say EINVAL), naming both directories.
    let upper_root = support::tempdir();
    for api in apis() {
        let what = format!("{api:?}");
        let upper = mkdirs(&upper_root.path().join(tag(api)));
        let work = mkdirs(&s.path().join(format!("w-{}", tag(api))));
        let spec = OverlaySpec::new(lowers.clone(), &upper, &work, &target);
        let before = mount_count();
        let e = KernelOverlay::with_api(api).mount(&spec).expect_err("upper and work on different filesystems");
        match &e {
            Error::InvalidSpec { reason } => {
                assert!(reason.contains("different filesystems"), "{what}: {reason}");
                assert!(
                    reason.contains(upper.to_str().unwrap()) && reason.contains(work.to_str().unwrap()),
                    "{reason}"
                );
            }
            other => panic!("{what}: expected Error::InvalidSpec, got {other:?}"),
        }
        assert_eq!(mount_count(), before, "{what}");
        assert!(names(&upper).is_empty(), "{what}: a refused mount wrote to the upper");
    }
    // Work inside the upper: only the kernel knows it is wrong, and it says so.
    for api in apis() {
        let what = format!("{api:?}");
        let upper = mkdirs(&s.path().join(format!("u-{}", tag(api))));
        let work = mkdirs(&upper.join("work"));
        let spec = OverlaySpec::new(lowers.clone(), &upper, &work, &target);
        let before = mount_count();
        let e = KernelOverlay::with_api(api).mount(&spec).expect_err("work inside the upper");
        let msg = e.to_string();
        eprintln!("{what}: {msg}");
        match &e {
            Error::Mount { target: t, op, .. } => {
                assert_eq!(t, &target, "{what}");
                assert!(!op.is_empty());
            }
            other => panic!("{what}: expected Error::Mount, got {other:?}"),
        }
        assert!(msg.contains(target.to_str().unwrap()), "{what}: the message does not name the target: {msg}");
        assert_eq!(mount_count(), before, "{what}");
        assert!(!is_mount_point(&target).unwrap());
    }
}

/// A read-only upper is refused while the layers are set, and the new mount API passes
/// the kernel's own explanation on.
#[test]
fn read_only_upper_error_carries_the_kernel_message() {
    let Some(s) = setup("read_only_upper_error_carries_the_kernel_message") else { return };
    let lowers = small_lowers(&mkdirs(&s.path().join("lowers")));
    let target = mkdirs(&s.path().join("m"));
    let ro = mkdirs(&s.path().join("ro"));
    mount(Some(&ro), &ro, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
    mount(None::<&str>, &ro, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>)
        .unwrap();
    for api in apis() {
        let what = format!("{api:?}");
        let spec = OverlaySpec::new(lowers.clone(), &ro, mkdirs(&s.path().join(tag(api))), &target);
        let before = mount_count();
        let e = KernelOverlay::with_api(api).mount(&spec).expect_err("a read-only upper");
        let msg = e.to_string();
        eprintln!("{what}: {msg}");
        assert!(matches!(e, Error::Mount { .. }), "{what}: {e:?}");
        assert!(msg.contains(target.to_str().unwrap()), "{what}: {msg}");
        if KernelOverlay::with_api(api).api() != MountApi::Legacy {
            assert!(msg.contains("read-only"), "{what}: the kernel's message is missing: {msg}");
        }
        assert_eq!(mount_count(), before, "{what}");
    }
    umount2(&ro, MntFlags::MNT_DETACH).unwrap();
}

// ---------------------------------------------------------------------------------------
// 6b. Data-only lowers (lazy images)

const METACOPY: &str = "trusted.overlay.metacopy";
const REDIRECT: &str = "trusted.overlay.redirect";

/// Whether this kernel's overlayfs has data-only lower layers (Linux 6.5+).
fn has_data_only_lowers() -> bool {
    kernel_version() >= (6, 5)
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    xattr_set(p, name, value).unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) -> nix::Result<()> {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings and a valid buffer.
    let r = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    nix::errno::Errno::result(r).map(drop)
}

/// A metacopy placeholder of `size` bytes at `p` whose data is `redirect` in a data-only lower.
fn placeholder(p: &Path, size: u64, redirect: &str) {
    fs::File::create(p).unwrap().set_len(size).unwrap();
    set_xattr(p, METACOPY, b"");
    set_xattr(p, REDIRECT, redirect.as_bytes());
}

/// A lazy image made by hand: the skeleton `skel` (placeholders `f` → `/x1` and
/// `sub/g` → `/ab/x2`, a plain file, an empty dir) and data-only lowers `data` (top
/// first): `/x1` in the top one and, to be shadowed, in the bottom one; `/ab/x2` only
/// in the bottom one.
fn lazy_layers(skel: &Path, data: &[PathBuf]) {
    mkdirs(&skel.join("sub"));
    mkdirs(&skel.join("empty"));
    write(&skel.join("plain"), "plain file\n");
    placeholder(&skel.join("f"), 6, "/x1");
    placeholder(&skel.join("sub/g"), 12, "/ab/x2");
    for d in data {
        mkdirs(d);
    }
    let (top, bottom) = (&data[0], data.last().unwrap());
    write(&top.join("x1"), "hello\n");
    if bottom != top {
        write(&bottom.join("x1"), "HIDDEN\n");
    }
    mkdirs(&bottom.join("ab"));
    write(&bottom.join("ab/x2"), "nested data\n");
}

/// Reads through the placeholders, appends to one and changes another's mode, checks
/// the upper holds full copies without metacopy or redirect xattrs.
fn check_lazy_view(what: &str, target: &Path, upper: &Path) {
    assert_eq!(names(target), set(["empty", "f", "plain", "sub"]), "{what}: data-only names must not show");
    assert_eq!(read(&target.join("f")), "hello\n", "{what}: f (the top data-only lower wins)");
    assert_eq!(read(&target.join("sub/g")), "nested data\n", "{what}: sub/g");
    assert_eq!(read(&target.join("plain")), "plain file\n", "{what}: plain");
    assert!(names(&target.join("empty")).is_empty());
    let mut f = fs::OpenOptions::new().append(true).open(target.join("f")).unwrap();
    std::io::Write::write_all(&mut f, b"more\n").unwrap();
    drop(f);
    support::chmod(&target.join("sub/g"), 0o600);
    assert_eq!(read(&target.join("f")), "hello\nmore\n", "{what}");
    assert_eq!(read(&upper.join("f")), "hello\nmore\n", "{what}: upper f holds the full data");
    assert_eq!(read(&upper.join("sub/g")), "nested data\n", "{what}: a metadata change copies the data up too");
    assert_eq!(fs::metadata(upper.join("sub/g")).unwrap().permissions().mode() & 0o7777, 0o600);
    let marks: Vec<String> = [with_xattr(upper, METACOPY), with_xattr(upper, REDIRECT)].concat();
    assert!(marks.is_empty(), "{what}: metacopy/redirect xattrs in the upper: {marks:?}");
}

/// A skeleton over data-only lowers with every API, short paths and long ones (256-byte
/// paths `fsconfig` cannot take as strings, more than a page of legacy option data, so
/// the legacy mount compacts): reads give the data, writes copy the full data up, and
/// the layers stay as they were. On a kernel without data-only lowers: `Unsupported`.
#[test]
fn data_only_lowers_with_every_api() {
    let Some(s) = setup("data_only_lowers_with_every_api") else { return };
    let target = mkdirs(&s.path().join("m"));
    if !has_data_only_lowers() {
        let (skel, data) = (s.path().join("skel"), vec![s.path().join("data")]);
        lazy_layers(&skel, &data);
        for api in apis() {
            let (u, w) = (mkdirs(&s.path().join(format!("u-{}", tag(api)))), mkdirs(&s.path().join("w")));
            let spec = OverlaySpec::new([&skel], &u, &w, &target).with_data_lowers(data.clone());
            assert_refused(
                &format!("{api:?} on kernel {:?}", kernel_version()),
                &target,
                |e| matches!(e, Error::Unsupported { what } if what.contains("data-only")),
                || KernelOverlay::with_api(api).mount(&spec),
            );
        }
        return;
    }
    // Short: one data-only lower. Long: 20, at paths of 255 and 256 bytes.
    let short_root = mkdirs(&s.path().join("short"));
    let short = (short_root.join("skel"), vec![short_root.join("data")]);
    let long_root = mkdirs(&long_prefix(&s.path().join("long"), PREFIX_LEN));
    let long = (long_root.join("skel"), (0..20).map(|i| long_root.join(lower_name(i))).collect::<Vec<_>>());
    assert!(long.1.iter().map(|d| d.as_os_str().len() + 2).sum::<usize>() > 4096);
    for (layout, root, (skel, data)) in [("short", &short_root, &short), ("long", &long_root, &long)] {
        lazy_layers(skel, data);
        let before = support::snapshot(root);
        for api in apis() {
            let what = format!("{api:?}, {layout} paths");
            let upper = mkdirs(&root.join(format!("u-{}", tag(api))));
            let work = mkdirs(&root.join(format!("w-{}", tag(api))));
            let mut spec = OverlaySpec::new([skel], &upper, &work, &target).with_data_lowers(data.iter().cloned());
            spec.options.fresh = true;
            let backend = KernelOverlay::with_api(api);
            let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_overlay_at(&target, &what);
            // Shown as `lowerdir=l::d1::d2` (the legacy string), or `lowerdir+=` and
            // `datadir+=` entries (the new API).
            let o = super_opts(&target);
            let shown = o.iter().filter(|x| x.starts_with("datadir+=")).count()
                + opt(&o, "lowerdir").map_or(0, |l| l.matches("::").count());
            assert_eq!(shown, data.len(), "{what}: {o:?}");
            if backend.api() == MountApi::Legacy && layout == "long" {
                let lowerdir = opt(&o, "lowerdir").unwrap_or_else(|| panic!("{what}: no lowerdir in {o:?}"));
                assert!(lowerdir.starts_with("skel::"), "{what}: not compacted: {lowerdir}");
            }
            check_lazy_view(&what, &target, &upper);
            m.unmount().unwrap_or_else(|e| panic!("{what}: unmount: {e}"));
            assert!(names(&target).is_empty(), "{what}: the target dir itself was written");
            fs::remove_dir_all(&upper).unwrap();
            fs::remove_dir_all(&work).unwrap();
        }
        assert_same_tree(&format!("{layout} layers after all mounts"), &before, &support::snapshot(root));
    }
}

/// Data-only lowers are checked with the lowers: listed twice, also a lower, missing,
/// or too many together are refused before (or, reached by another path, instead of)
/// the kernel's own error; other kernel refusals pass through unchanged (not as
/// `Unsupported`) on a kernel that has data-only lowers.
#[test]
fn data_only_lower_refusals() {
    let Some(s) = setup("data_only_lower_refusals") else { return };
    let (skel, data) = (s.path().join("skel"), s.path().join("data"));
    lazy_layers(&skel, std::slice::from_ref(&data));
    let target = mkdirs(&s.path().join("m"));
    let (upper, work) = (mkdirs(&s.path().join("u")), mkdirs(&s.path().join("w")));
    let alias = s.path().join("data-alias");
    std::os::unix::fs::symlink(&data, &alias).unwrap();
    let missing = s.path().join("no-such-data");
    let spec =
        |data_lowers: Vec<PathBuf>| OverlaySpec::new([&skel], &upper, &work, &target).with_data_lowers(data_lowers);
    let many: Vec<PathBuf> = (0..MAX_LOWERS).map(|i| s.path().join(format!("d{i}"))).collect();
    for api in apis() {
        let backend = KernelOverlay::with_api(api);
        let invalid: fn(&Error) -> bool = |e| matches!(e, Error::InvalidSpec { .. });
        let cases = [
            ("a data-only lower twice", spec(vec![data.clone(), data.clone()]), invalid),
            ("a lower as a data-only lower", spec(vec![skel.clone()]), invalid),
            ("more than MAX_LOWERS together", spec(many.clone()), |e| matches!(e, Error::LimitExceeded { .. })),
        ];
        for (what, spec, ok) in cases {
            assert_refused(&format!("{api:?}: {what}"), &target, ok, || backend.mount(&spec));
        }
        if has_data_only_lowers() {
            // Reached twice through a symlink: only the kernel sees it; named anyway.
            assert_refused(
                &format!("{api:?}: a data-only lower twice by another path"),
                &target,
                |e| matches!(e, Error::InvalidSpec { reason } if reason.contains("listed twice")),
                || backend.mount(&spec(vec![data.clone(), alias.clone()])),
            );
            assert_refused(
                &format!("{api:?}: a missing data-only lower"),
                &target,
                |e| e.raw_os_error() == Some(libc::ENOENT) && e.to_string().contains("no-such-data"),
                || backend.mount(&spec(vec![missing.clone()])),
            );
            // Work inside the upper: the kernel's refusal, not a data-only one.
            let inner = mkdirs(&upper.join("work"));
            let bad = OverlaySpec::new([&skel], &upper, &inner, &target).with_data_lowers([&data]);
            assert_refused(
                &format!("{api:?}: work inside the upper, with data-only lowers"),
                &target,
                |e| matches!(e, Error::Mount { .. }),
                || backend.mount(&bad),
            );
            fs::remove_dir_all(&inner).unwrap();
        }
    }
    assert!(names(&upper).is_empty(), "{:?} {:?}", names(&upper), names(&work));
}

// ---------------------------------------------------------------------------------------
// 7 & 8. User namespaces (re-exec of this binary)

/// The wrapper that runs a child unprivileged: `setpriv` to nobody when available (then
/// `owned` is chowned to nobody), else root's own user namespace.
fn unprivileged(owned: &[&Path]) -> (Vec<String>, bool) {
    if support::have_tool("setpriv") {
        for p in owned {
            chown_tree(p, NOBODY);
        }
        let id = NOBODY.to_string();
        let v = [format!("--reuid={id}"), format!("--regid={id}"), "--clear-groups".into(), "--".into()];
        (std::iter::once("setpriv".to_string()).chain(v).collect(), true)
    } else {
        // Without setpriv: root creates the user namespace itself (still a non-initial
        // user namespace, so userxattr and the namespace's mount rules apply).
        eprintln!("setpriv missing: running the user-namespace child as root");
        (Vec::new(), false)
    }
}

fn chown_tree(p: &Path, id: u32) {
    support::lchown(p, id, id);
    if fs::symlink_metadata(p).unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap() {
            chown_tree(&e.unwrap().path(), id);
        }
    }
}

/// Runs `child_test` under `wrapper` + `unshare unshare_args`; returns its `CHILD-` lines.
fn run_child(wrapper: &[String], unshare_args: &[&str], child_test: &str, arg: &Path) -> Vec<String> {
    let exe = support::shared_current_exe(); // nobody may not reach target/ (a 0700 checkout)
    let mut cmd = Command::new(wrapper.first().map_or("unshare", String::as_str));
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg("unshare");
    }
    cmd.args(unshare_args)
        .arg("--")
        .arg(exe.path())
        .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, arg);
    let out = support::run(&mut cmd);
    let text = String::from_utf8_lossy(&out).into_owned();
    let lines: Vec<String> = text.lines().filter_map(|l| l.find("CHILD-").map(|i| l[i..].to_string())).collect();
    assert!(lines.iter().any(|l| l.starts_with("CHILD-DONE")), "{child_test} did not finish: {text}");
    lines
}

fn require_userns(test: &str) -> bool {
    if !support::require_tools(test, &["unshare"]) {
        return false;
    }
    if !Command::new("unshare").args(["-Ur", "true"]).status().is_ok_and(|s| s.success()) {
        support::skip(&format!("{test}: `unshare -Ur` does not work here"));
        return false;
    }
    true
}

/// Rootless end to end: as nobody, in a new user + mount namespace, `KernelOverlay::new()`
/// (auto API, `userxattr` on automatically) mounts, writes, deletes a lower file and
/// replaces a lower dir; the upper then holds a whiteout and a `user.overlay.opaque`
/// dir, and no `trusted.*` xattr.
#[test]
fn rootless_mount_in_a_user_namespace() {
    let test = "rootless_mount_in_a_user_namespace";
    let Some(s) = setup(test) else { return };
    if !require_userns(test) {
        return;
    }
    let dir = mkdirs(&s.path().join("rootless"));
    let lowers = small_lowers(&dir);
    for d in ["u", "w", "m", "scratch"] {
        mkdirs(&dir.join(d));
    }
    let (wrapper, dropped) = unprivileged(&[&dir]);
    let before = support::snapshot(&dir.join("l0"));
    let before1 = support::snapshot(&dir.join("l1"));
    let lines = run_child(&wrapper, &["-Urm", "--propagation", "private"], "child_rootless_mount", &dir);
    eprintln!("{lines:#?}");
    assert!(!is_mount_point(&dir.join("m")).unwrap(), "the child's mount is gone with its namespace");

    let upper = dir.join("u");
    assert_eq!(names(&upper), set(["del-me", "new.txt", "opq"]));
    assert_eq!(read(&upper.join("new.txt")), "from the user namespace");
    assert_whiteout(&upper.join("del-me"));
    assert_eq!(support::lgetxattr(&upper.join("opq"), b"user.overlay.opaque").as_deref(), Some(&b"y"[..]));
    assert_eq!(with_xattr(&upper, "trusted."), Vec::<String>::new(), "trusted xattrs in a rootless upper");
    if dropped {
        let m = fs::metadata(upper.join("new.txt")).unwrap();
        assert_eq!((m.uid(), m.gid()), (NOBODY, NOBODY), "written as the unprivileged user");
    }
    assert_same_tree("l0", &before, &support::snapshot(&lowers[0]));
    assert_same_tree("l1", &before1, &support::snapshot(&lowers[1]));
    assert!(names(&dir.join("scratch")).is_empty(), "detect() left its probe behind");
}

#[test]
fn child_rootless_mount() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    println!("CHILD-ID uid={} in_userns={}", nix::unistd::getuid(), in_user_namespace());
    assert!(in_user_namespace(), "the child must run in a user namespace");
    let backend = KernelOverlay::new();
    println!("CHILD-API {:?}", backend.api());
    let target = dir.join("m");
    let spec = OverlaySpec::new([dir.join("l0"), dir.join("l1")], dir.join("u"), dir.join("w"), &target);
    assert!(spec.userxattr(), "userxattr must default to on in a user namespace");
    let m = OverlayMount::mount(&backend, spec).unwrap_or_else(|e| panic!("rootless mount: {e}"));
    assert_eq!(read(&target.join("a.txt")), "top a");
    write(&target.join("new.txt"), "from the user namespace");
    fs::remove_file(target.join("del-me")).unwrap();
    fs::remove_dir_all(target.join("opq")).unwrap();
    mkdirs(&target.join("opq"));
    m.unmount().unwrap();
    assert!(!is_mount_point(&target).unwrap());

    let d = detect(&dir.join("scratch")).unwrap();
    println!("CHILD-DETECT {d:?}");
    assert_eq!((d.kind, d.reason, d.userxattr), (BackendKind::Kernel, DetectReason::OverlayMounted, true));
    // The data-only probe works rootless too (its own mount namespace inside ours).
    assert_eq!(d.data_only_lowers, has_data_only_lowers(), "kernel {:?}", kernel_version());
    println!("CHILD-DONE");
}

#[test]
fn detect_as_root_chooses_the_kernel() {
    let Some(s) = setup("detect_as_root_chooses_the_kernel") else { return };
    let scratch = mkdirs(&s.path().join("scratch"));
    write(&scratch.join("existing"), "x");
    let before = mount_count();
    let d = detect(&scratch).unwrap();
    assert_eq!((d.kind, d.reason, d.userxattr), (BackendKind::Kernel, DetectReason::OverlayMounted, false));
    assert_eq!(d.data_only_lowers, has_data_only_lowers(), "kernel {:?}", kernel_version());
    assert_eq!(names(&scratch), set(["existing"]), "detect() left its probe behind");
    assert_eq!(mount_count(), before);
    // And again (a second probe gets a new name and is removed too).
    detect(&scratch).unwrap();
    assert_eq!(names(&scratch), set(["existing"]));
}

/// In a user namespace without its own mount namespace, mounting is not permitted:
/// `detect()` picks the copy backend and says why.
#[test]
fn detect_in_a_user_namespace_without_mount_namespace_chooses_copy() {
    let test = "detect_in_a_user_namespace_without_mount_namespace_chooses_copy";
    let Some(s) = setup(test) else { return };
    if !require_userns(test) {
        return;
    }
    let scratch = mkdirs(&s.path().join("scratch"));
    let (wrapper, _) = unprivileged(&[&scratch]);
    let lines = run_child(&wrapper, &["-Ur"], "child_detect", &scratch);
    eprintln!("{lines:#?}");
    assert!(names(&scratch).is_empty(), "detect() left its probe behind");
}

#[test]
fn child_detect() {
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    assert!(in_user_namespace());
    let d = detect(&dir).unwrap();
    println!("CHILD-DETECT {d:?}");
    assert_eq!((d.kind, d.reason, d.userxattr), (BackendKind::Copy, DetectReason::NotPermitted, true));
    assert!(!d.data_only_lowers, "the copy backend never takes data-only lowers");
    println!("CHILD-DONE");
}

/// A rootless workspace end to end: as nobody, in a new user + mount namespace, a
/// `Workspace` over plain lowers is created, mounted (userxattr on automatically),
/// written, exported, imported into a second workspace, detached and destroyed; then a
/// tmpfs-backed one is checkpointed, destroyed and restored into a new tmpfs.
#[test]
fn rootless_workspace_in_a_user_namespace() {
    let test = "rootless_workspace_in_a_user_namespace";
    let Some(s) = setup(test) else { return };
    if !require_userns(test) {
        return;
    }
    let dir = mkdirs(&s.path().join("rootless-ws"));
    let lowers = small_lowers(&dir);
    let (wrapper, _dropped) = unprivileged(&[&dir]);
    let before = support::snapshot(&lowers[0]);
    let lines = run_child(&wrapper, &["-Urm", "--propagation", "private"], "child_rootless_workspace", &dir);
    eprintln!("{lines:#?}");
    assert!(lines.iter().any(|l| l == "CHILD-CHANGES /del-me:Deleted /new.txt:Added"), "{lines:#?}");
    assert_same_tree("l0", &before, &support::snapshot(&lowers[0]));
    assert!(!dir.join("a").exists() && !dir.join("b").exists(), "destroy left a workspace behind");
    assert!(!dir.join("c").exists() && !dir.join("d").exists(), "destroy left a tmpfs workspace behind");
    assert!(dir.join("ckpt.tar").is_file(), "no rootless checkpoint");
}

#[test]
fn child_rootless_workspace() {
    use rootfs_cache::{DiffOptions, Workspace, WorkspaceOptions};
    let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else { return };
    assert!(in_user_namespace(), "the child must run in a user namespace");
    let lowers = vec![dir.join("l0"), dir.join("l1")];
    let mut a = Workspace::create(dir.join("a"), lowers.clone(), WorkspaceOptions::default()).expect("create");
    let t = a.mount(KernelOverlay::new()).expect("rootless workspace mount").to_path_buf();
    write(&t.join("new.txt"), "from the user namespace");
    fs::remove_file(t.join("del-me")).unwrap();
    let changes: Vec<String> =
        a.changes().unwrap().changes.iter().map(|c| format!("{}:{:?}", c.path.display(), c.kind)).collect();
    println!("CHILD-CHANGES {}", changes.join(" "));
    let mut blob = Vec::new();
    a.export_diff(&mut blob, &DiffOptions::default()).expect("export");
    let mut b = Workspace::create(dir.join("b"), lowers.clone(), WorkspaceOptions::default()).expect("create b");
    b.import_diff(&blob[..]).expect("rootless import");
    let tb = b.mount(KernelOverlay::new()).expect("mount b").to_path_buf();
    assert_eq!(read(&tb.join("new.txt")), "from the user namespace");
    assert!(!tb.join("del-me").exists());
    b.detach().expect("rootless detach");
    assert_eq!(read(&tb.join("a.txt")), "top a");
    assert!(!tb.join("del-me").exists());
    a.destroy().expect("destroy a");
    b.destroy().expect("destroy b");

    // A memory-backed upper (tmpfs in the user namespace, user.* xattrs), checkpointed
    // to disk, destroyed, restored into a new tmpfs upper.
    let mut c = Workspace::create(dir.join("c"), lowers.clone(), WorkspaceOptions::tmpfs(16 << 20)).expect("tmpfs");
    let tc = c.mount(KernelOverlay::new()).expect("mount c").to_path_buf();
    write(&tc.join("new.txt"), "in memory");
    fs::remove_file(tc.join("del-me")).unwrap();
    fs::remove_dir_all(tc.join("opq")).unwrap();
    fs::create_dir(tc.join("opq")).unwrap();
    write(&tc.join("opq/only"), "replaced dir");
    c.checkpoint(dir.join("ckpt.tar")).expect("rootless checkpoint");
    c.destroy().expect("destroy c");
    let mut d = Workspace::restore(dir.join("d"), lowers, WorkspaceOptions::tmpfs(16 << 20), dir.join("ckpt.tar"))
        .expect("rootless restore");
    let td = d.mount(KernelOverlay::new()).expect("mount d").to_path_buf();
    assert_eq!(read(&td.join("new.txt")), "in memory");
    assert!(!td.join("del-me").exists());
    assert_eq!(names(&td.join("opq")), set(["only"]));
    assert_eq!(support::lgetxattr(&d.upper().join("opq"), b"user.overlay.opaque").as_deref(), Some(&b"y"[..]));
    d.destroy().expect("destroy d");
    println!("CHILD-DONE");
}
