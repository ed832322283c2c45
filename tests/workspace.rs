//! `Workspace` against the kernel's overlayfs as the oracle.
//!
//! - Random stacks (1–3 lowers in overlay format, top first, with whiteouts, opaque
//!   directories, escaped and metadata xattrs; plain directories or the same layers as
//!   tars through a `RootfsCache` and an in-memory `ImageFetcher`), random operations
//!   through a real overlay mount, then the merged view `M` must survive:
//!   (a) `apply` into a private flattened copy of the stack (the lower itself, a
//!   remount and a fresh mount all show `M`, the upper is empty);
//!   (b) `export_diff` → `import_diff` into a new workspace on the same lowers, in every
//!   compression;
//!   (c) `detach` (remounted, unleased), and after the cache evicted the image.
//!   Each case also checks `changes()` against the two views, applies a second session,
//!   and after `detach` writes more and imports the detached diff over an empty lower and
//!   over the original layers. The same with `CopyBackend` as the mount backend, checked
//!   against the kernel.
//! - Hand-written: hardlinked lowers and `apply`, `apply` cost (ctimes of a 10k-entry
//!   lower), stale uppers, lifecycle refusals, `changes()` classification, the export
//!   format (GNU tar, bsdtar) and export → import → export determinism.
//!
//! Needs root; run as the README says
//! (`unshare -m --propagation private -- cargo test --test workspace`).
//! The tests at the end pin library bugs these tests found (fixed since).

#[path = "common/ops.rs"]
mod ops;
mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ops::{
    LAYER_XATTRS, LEnt, OP_XATTRS, Op, OpMix, Snap, XattrPolicy, is_whiteout, ls, opaque, strict_cmp, view, write,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rootfs_cache::{
    CacheOptions, ChangeKind, Compression, CopyBackend, Descriptor, DiffOptions, Digest, Error, ImageFetcher,
    ImageManifest, KernelOverlay, Lowers, MountBackend, OverlaySpec, RootfsCache, Workspace, WorkspaceOptions,
};
use support::{Cmp, Ent, Fmt, Node, Ty};

// ---------------------------------------------------------------------------------------
// Helpers

/// A scratch directory on a tmpfs (`/dev/shm`) when there is one, traversable by all.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let d = if shm.is_dir() {
        tempfile::Builder::new().prefix("rootfs-cache-ws").tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("rootfs-cache-ws").tempdir()
    }
    .expect("tempdir");
    support::chmod(d.path(), 0o755);
    d
}

fn diffs(what: &str, expected: &Snap, actual: &Snap, cmp: &Cmp) -> Result<(), String> {
    let d = support::diff_trees(expected, actual, cmp);
    if d.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = d.iter().take(40).map(String::as_str).collect();
    Err(format!("{what}: {} differences:\n  {}", d.len(), shown.join("\n  ")))
}

fn ensure(what: &str, expected: &Snap, actual: &Snap, cmp: &Cmp) -> Result<(), TestCaseError> {
    diffs(what, expected, actual, cmp).map_err(TestCaseError::fail)
}

fn check(what: &str, expected: &Snap, actual: &Snap, cmp: &Cmp) {
    if let Err(e) = diffs(what, expected, actual, cmp) {
        panic!("{e}");
    }
}

fn mkdirs(base: &Path, names: &[&str]) {
    for n in names {
        let p = base.join(n);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    }
}

fn opts_reset() -> WorkspaceOptions {
    let mut o = WorkspaceOptions::default();
    o.reset = true;
    o
}

fn diff_opts(c: Compression) -> DiffOptions {
    let mut o = DiffOptions::default();
    o.compression = c;
    o
}

fn mount_tmpfs(p: &Path) {
    use nix::mount::{MsFlags, mount};
    fs::create_dir_all(p).unwrap();
    mount(Some("tmpfs"), p, Some("tmpfs"), MsFlags::empty(), Some("size=1m"))
        .unwrap_or_else(|e| panic!("mount tmpfs {}: {e}", p.display()));
}

fn umount(p: &Path) {
    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).unwrap_or_else(|e| panic!("umount {}: {e}", p.display()));
}

/// Xattr names as the merged view shows them, for a plain directory used as a lower:
/// escaped image xattrs (`trusted.overlay.overlay.X`) read as `trusted.overlay.X`, and
/// overlay metadata that leaked into it is marked (it must not be there at all).
fn unescape(mut s: Snap) -> Snap {
    for n in s.values_mut() {
        n.xattrs = std::mem::take(&mut n.xattrs)
            .into_iter()
            .map(|(k, v)| match k.strip_prefix(b"trusted.overlay.") {
                Some(rest) => match rest.strip_prefix(b"overlay.") {
                    Some(r) => ([b"trusted.overlay.".as_slice(), r].concat(), v),
                    None => ([b"LEAKED overlay metadata: ".as_slice(), &k].concat(), v),
                },
                None => (k, v),
            })
            .collect();
    }
    s
}

/// Copies the mounted view at `src` into the empty plain directory `dst` so that a
/// workspace over `dst` alone shows the same view: data, types, modes, owners, mtimes,
/// hardlinks, and xattrs (escaped when in overlay's namespace).
fn flatten(src: &Path, dst: &Path) {
    let snap = view(src);
    let set_meta = |d: &Path, n: &Node| {
        for (k, v) in &n.xattrs {
            let name = match k.strip_prefix(b"trusted.overlay.") {
                Some(rest) => [b"trusted.overlay.overlay.".as_slice(), rest].concat(),
                None => k.clone(),
            };
            support::lsetxattr(d, std::str::from_utf8(&name).unwrap(), v);
        }
        support::lchown(d, n.uid, n.gid);
        if n.ty != Ty::Symlink {
            support::chmod(d, n.mode);
        }
        support::set_mtime(d, n.mtime.0, n.mtime.1 as u32);
    };
    let mut links: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut dirs = Vec::new();
    for (rel, n) in &snap {
        if rel == b"." {
            continue;
        }
        let (s, d) = (support::at(src, rel), support::at(dst, rel));
        match n.ty {
            Ty::Dir => {
                fs::create_dir(&d).unwrap();
                dirs.push(rel.clone());
                continue;
            }
            Ty::File => {
                if n.nlink > 1 {
                    if let Some(first) = links.get(&n.ino) {
                        fs::hard_link(support::at(dst, first), &d).unwrap();
                        continue;
                    }
                    links.insert(n.ino, rel.clone());
                }
                write(&d, &fs::read(&s).unwrap());
            }
            Ty::Symlink => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(n.link.as_ref().unwrap()), &d).unwrap()
            }
            Ty::Fifo => support::mknod(&d, libc::S_IFIFO, 0o600, 0, 0),
            Ty::Char | Ty::Block => {
                let k = if n.ty == Ty::Char { libc::S_IFCHR } else { libc::S_IFBLK };
                let (ma, mi) = n.rdev.unwrap();
                support::mknod(&d, k, 0o600, ma, mi);
            }
            Ty::Socket => continue,
        }
        set_meta(&d, n);
    }
    for rel in dirs.iter().rev() {
        set_meta(&support::at(dst, rel), &snap[rel]);
    }
    set_meta(dst, &snap[&b"."[..]]);
}

// ---------------------------------------------------------------------------------------
// Random layer stacks (overlay format), after tests/mount_copy.rs

/// Random layers; files up to 3000 bytes.
fn layer_strategy(max: usize) -> impl Strategy<Value = Vec<LEnt>> {
    ops::layer_strategy(max, 1000..3000)
}

/// [`ops::build_layer`], directories with xattrs too.
fn build_layer(root: &Path, ents: &[LEnt]) {
    ops::build_layer(root, ents, &LAYER_XATTRS, true);
}

// ---------------------------------------------------------------------------------------
// Layers as tars, served from memory to a RootfsCache

/// The OCI layer tar of a layer directory in overlay format: whiteout devices become
/// `.wh.` entries, opaque xattrs `.wh..wh..opq`, escaped xattrs unescaped, overlay
/// metadata dropped. `pad` zero blocks are appended, so identical layers still have
/// distinct digests.
fn layer_tar(dir: &Path, pad: usize) -> Vec<u8> {
    let snap = support::snapshot(dir);
    let mut ents = Vec::new();
    let mut links: HashMap<u64, Vec<u8>> = HashMap::new();
    for (rel, n) in &snap {
        let p = std::str::from_utf8(rel).unwrap();
        let full = support::at(dir, rel);
        let mut opq = false;
        let xattrs: Vec<(String, Vec<u8>)> = n
            .xattrs
            .iter()
            .filter_map(|(k, v)| {
                let k = std::str::from_utf8(k).unwrap();
                match k.strip_prefix("trusted.overlay.") {
                    None => Some((k.to_string(), v.clone())),
                    Some(rest) => match rest.strip_prefix("overlay.") {
                        Some(r) => Some((format!("trusted.overlay.{r}"), v.clone())),
                        None => {
                            opq |= rest == "opaque" && v == b"y";
                            None
                        }
                    },
                }
            })
            .collect();
        let e = match n.ty {
            Ty::Char if n.rdev == Some((0, 0)) => {
                ents.push(Ent::whiteout(p));
                continue;
            }
            Ty::Dir => Ent::dir(p),
            Ty::File => {
                if n.nlink > 1 {
                    if let Some(first) = links.get(&n.ino) {
                        ents.push(Ent::hardlink(p, std::str::from_utf8(first).unwrap()));
                        continue;
                    }
                    links.insert(n.ino, rel.clone());
                }
                Ent::file(p, fs::read(&full).unwrap())
            }
            Ty::Symlink => Ent::symlink(p, std::str::from_utf8(n.link.as_ref().unwrap()).unwrap()),
            Ty::Fifo => Ent::fifo(p),
            Ty::Char => Ent::char_dev(p, n.rdev.unwrap().0, n.rdev.unwrap().1),
            Ty::Block => Ent::block_dev(p, n.rdev.unwrap().0, n.rdev.unwrap().1),
            Ty::Socket => continue,
        };
        let mut e = e.mode(n.mode).owner(u64::from(n.uid), u64::from(n.gid)).mtime(n.mtime.0, n.mtime.1 as u32);
        e.xattrs = xattrs;
        ents.push(e);
        if opq {
            ents.push(Ent::opaque(p));
        }
    }
    let mut tar = support::tar_of(&ents, Fmt::Pax);
    tar.extend(std::iter::repeat_n(0u8, 512 * pad));
    tar
}

/// One image served from memory.
struct MemFetcher {
    manifest: ImageManifest,
    blobs: HashMap<Digest, Vec<u8>>,
}

impl MemFetcher {
    /// An image of `layers` (tar blobs, bottom first).
    fn new(layers: Vec<Vec<u8>>) -> MemFetcher {
        let mut blobs = HashMap::new();
        let mut descs = Vec::new();
        for b in layers {
            let digest = Digest::of(&b);
            descs.push(Descriptor {
                digest,
                size: b.len() as u64,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                annotations: Default::default(),
            });
            blobs.insert(digest, b);
        }
        let id: Vec<u8> = descs.iter().flat_map(|d| d.digest.to_string().into_bytes()).collect();
        MemFetcher { manifest: ImageManifest { digest: Digest::of(&id), layers: descs }, blobs }
    }

    /// An image of the layer directories `dirs` (top first, as overlay lists them).
    fn of_dirs(dirs: &[PathBuf]) -> MemFetcher {
        MemFetcher::new(dirs.iter().rev().enumerate().map(|(i, d)| layer_tar(d, i)).collect())
    }
}

impl ImageFetcher for MemFetcher {
    fn resolve(&self, _reference: &str) -> rootfs_cache::Result<ImageManifest> {
        Ok(self.manifest.clone())
    }

    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        let b = self.blobs.get(&layer.digest).ok_or_else(|| Error::NotFound { what: layer.digest.to_string() })?;
        Ok(Box::new(std::io::Cursor::new(b.clone())))
    }
}

/// A cache that evicts every unleased layer on `gc()`.
fn tiny_cache(dir: &Path) -> RootfsCache {
    let mut o = CacheOptions::default();
    o.max_bytes = 1;
    RootfsCache::open(dir, o).expect("open cache")
}

// ---------------------------------------------------------------------------------------
// Random operations through the merged mount, after tests/mount_copy.rs

/// Operations through the merged mount, the root itself and devices included.
fn op_strategy() -> impl Strategy<Value = Op> {
    ops::op_strategy(OpMix { root: true, mknod: true, big_write: 2000..5000 })
}

/// [`ops::apply`], xattrs set and removed on anything.
fn run_op(t: &Path, op: &Op) {
    let remove = ["user.x", "user.y", "trusted.t", "trusted.overlay.foo", "user.new"];
    ops::apply(t, op, &XattrPolicy { set: &OP_XATTRS, remove: &remove, set_on_dirs: true, remove_on_dirs: true });
}

// ---------------------------------------------------------------------------------------
// 1 & 8. The property: apply, export/import and detach all keep the merged view

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Kernel,
    Copy,
}

impl Backend {
    fn boxed(self) -> Box<dyn MountBackend> {
        match self {
            Backend::Kernel => Box::new(KernelOverlay::new()),
            Backend::Copy => Box::new(CopyBackend::new()),
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    /// Lower layers, top first.
    stack: Vec<Vec<LEnt>>,
    ops: Vec<Op>,
    /// More operations, in a later session: a second apply, writes after detach.
    ops2: Vec<Op>,
    compression: usize,
    /// Lowers from a `RootfsCache` (the layers as tars) instead of plain directories.
    cache: bool,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(layer_strategy(12), 1..=3),
        proptest::collection::vec(op_strategy(), 1..20),
        proptest::collection::vec(op_strategy(), 0..8),
        0..3usize,
        proptest::bool::weighted(0.35),
    )
        .prop_map(|(stack, ops, ops2, compression, cache)| Case { stack, ops, ops2, compression, cache })
}

const COMPRESSIONS: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

fn tc<T>(what: &str, r: rootfs_cache::Result<T>) -> Result<T, TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
}

/// Unmounts `ws` (a copy backend folds its writes into the upper) and checks that a
/// kernel overlay of the same lowers and upper shows `m`, then remounts with `backend`.
fn kernel_agrees(ws: &mut Workspace, backend: Backend, m: &Snap, what: &str) -> Result<(), TestCaseError> {
    if backend == Backend::Kernel {
        return Ok(());
    }
    tc("unmount (fold)", ws.unmount())?;
    tc("kernel mount", ws.mount(KernelOverlay::new()))?;
    let k = view(ws.target());
    tc("kernel unmount", ws.unmount())?;
    tc("remount", ws.mount(backend.boxed()))?;
    ensure(&format!("{what}: kernel view vs the copy backend's"), m, &k, &strict_cmp())
}

/// Runs `f` (a read of the upper) with the writes in the upper: the copy backend puts
/// them there at unmount, and the workspace refuses to read its upper while it is
/// mounted, so it is unmounted around `f` and mounted again.
fn upper_read<T>(
    ws: &mut Workspace,
    backend: Backend,
    what: &str,
    f: impl FnOnce(&mut Workspace) -> rootfs_cache::Result<T>,
) -> Result<T, TestCaseError> {
    if backend == Backend::Kernel {
        return tc(what, f(ws));
    }
    tc("unmount before reading the upper", ws.unmount())?;
    let r = tc(what, f(ws));
    tc("remount after reading the upper", ws.mount(backend.boxed()))?;
    r
}

fn run_case(c: &Case, backend: Backend) -> Result<(), TestCaseError> {
    let tmp = scratch();
    let base = tmp.path();
    let dirs: Vec<PathBuf> = (0..c.stack.len()).map(|i| base.join(format!("l{i}"))).collect();
    for (d, ents) in dirs.iter().zip(&c.stack) {
        fs::create_dir(d).unwrap();
        build_layer(d, ents);
    }
    let cmp = strict_cmp();

    // (a) apply, into a private plain copy of the stack's view.
    let v0 = {
        let mut w = tc("create v0", Workspace::create(base.join("v0"), dirs.clone(), WorkspaceOptions::default()))?;
        tc("mount v0", w.mount(KernelOverlay::new()))?;
        let v0 = view(w.target());
        let p = base.join("private");
        fs::create_dir(&p).unwrap();
        flatten(w.target(), &p);
        tc("destroy v0", w.destroy())?;
        v0
    };
    let private = base.join("private");
    let mut wp = tc("create over private", Workspace::create(base.join("wp"), private.as_path(), opts_reset()))?;
    tc("mount private", wp.mount(backend.boxed()))?;
    ensure("the flattened copy's view vs the stack's", &v0, &view(wp.target()), &cmp)?;
    for op in &c.ops {
        run_op(wp.target(), op);
    }
    let m = view(wp.target());
    kernel_agrees(&mut wp, backend, &m, "private, before apply")?;
    let report = tc("apply", wp.apply())?;
    prop_assert!(wp.is_mounted(), "apply did not remount");
    prop_assert!(ls(wp.upper()).is_empty(), "upper not empty after apply: {:?}", ls(wp.upper()));
    ensure(&format!("lower after apply ({report:?})"), &m, &unescape(view(&private)), &cmp)?;
    ensure("view after apply (remounted)", &m, &view(wp.target()), &cmp)?;
    prop_assert!(
        upper_read(&mut wp, backend, "changes after apply", |w| w.changes())?.is_empty(),
        "changes after apply"
    );
    tc("unmount private", wp.unmount())?;
    tc("mount private again", wp.mount(KernelOverlay::new()))?;
    ensure("kernel view of the applied lower", &m, &view(wp.target()), &cmp)?;
    // A second session and a second apply, with the backend under test.
    tc("unmount private", wp.unmount())?;
    tc("mount private, second session", wp.mount(backend.boxed()))?;
    for op in &c.ops2 {
        run_op(wp.target(), op);
    }
    let m2 = view(wp.target());
    kernel_agrees(&mut wp, backend, &m2, "private, second session")?;
    let report = tc("second apply", wp.apply())?;
    ensure(&format!("lower after a second apply ({report:?})"), &m2, &unescape(view(&private)), &cmp)?;
    ensure("view after a second apply", &m2, &view(wp.target()), &cmp)?;
    tc("destroy private", wp.destroy())?;

    // The stack itself, as plain directories or from a cache.
    let cache = c.cache.then(|| (tiny_cache(&base.join("cache")), MemFetcher::of_dirs(&dirs)));
    let lowers = |tag: &str| -> Result<Lowers, TestCaseError> {
        Ok(match &cache {
            Some((cache, fetcher)) => Lowers::Rootfs(tc("ensure", cache.ensure(fetcher, tag))?),
            None => Lowers::Dirs(dirs.clone()),
        })
    };
    let mut wa = tc("create a", Workspace::create(base.join("wa"), lowers("img")?, WorkspaceOptions::default()))?;
    prop_assert_eq!(wa.is_leased(), c.cache);
    tc("mount a", wa.mount(backend.boxed()))?;
    if c.cache {
        // The layer tars carry no root entry: the cache's layer roots have their own times.
        let no_root = |mut s: Snap| {
            s.remove(&b"."[..]);
            s
        };
        ensure("cache view vs directory view", &no_root(v0.clone()), &no_root(view(wa.target())), &cmp)?;
    }
    for op in &c.ops {
        run_op(wa.target(), op);
    }
    let m = view(wa.target());
    kernel_agrees(&mut wa, backend, &m, "a")?;
    if backend == Backend::Copy {
        let refused = wa.changes();
        prop_assert!(matches!(refused, Err(Error::Unsupported { .. })), "changes() of a copy mount: {:?}", refused);
    }
    check_changes(&v0, &m, &upper_read(&mut wa, backend, "changes", |w| w.changes())?, &dirs)
        .map_err(TestCaseError::fail)?;
    if c.cache {
        let r = wa.apply();
        prop_assert!(
            matches!(r, Err(Error::ImmutableLayer { .. })),
            "apply into cache layers was not refused: {:?}",
            r
        );
    }

    // (b) export, import into a new workspace on the same lowers.
    let comp = COMPRESSIONS[c.compression];
    let mut blob = Vec::new();
    let exported = upper_read(&mut wa, backend, "export", |w| w.export_diff(&mut blob, &diff_opts(comp)))?;
    prop_assert_eq!(exported.size, blob.len() as u64);
    prop_assert_eq!(exported.digest, Some(Digest::of(&blob)));
    if comp == Compression::None {
        prop_assert_eq!(exported.diff_id, exported.digest);
    }
    let mut wb = tc("create b", Workspace::create(base.join("wb"), lowers("@again")?, WorkspaceOptions::default()))?;
    let imported = tc("import", wb.import_diff(&blob[..]))?;
    prop_assert_eq!(imported.digest, exported.digest);
    prop_assert_eq!(imported.diff_id, exported.diff_id);
    prop_assert_eq!(imported.entries, exported.entries);
    tc("mount b", wb.mount(backend.boxed()))?;
    ensure(&format!("imported view ({comp:?})"), &m, &view(wb.target()), &cmp)?;
    kernel_agrees(&mut wb, backend, &m, "b")?;

    // (c) detach: the view stays, the lease goes, the cache may evict the image.
    tc("detach", wa.detach())?;
    prop_assert!(wa.is_mounted(), "detach did not remount");
    prop_assert!(!wa.is_leased(), "still leased after detach");
    ensure("view after detach", &m, &view(wa.target()), &cmp)?;
    if let Some((cache, _)) = &cache {
        let n = c.stack.len();
        prop_assert_eq!(tc("gc with b leased", cache.gc())?.evicted.len(), 0);
        tc("destroy b", wb.destroy())?;
        prop_assert!(cache.layers().iter().all(|l| !l.2), "layers still leased: {:?}", cache.layers());
        let gc = tc("gc", cache.gc())?;
        // Layers of no size (empty on tmpfs) fit any budget and stay.
        let left = cache.layers();
        prop_assert!(left.iter().all(|l| l.1 == 0), "gc left {:?} ({:?})", left, gc);
        prop_assert_eq!(gc.evicted.len() + left.len(), n);
        prop_assert!(
            wa.lowers().iter().all(|l| !l.starts_with(cache.path())),
            "detached lowers still in the cache: {:?}",
            wa.lowers()
        );
        ensure("view after the image was evicted", &m, &view(wa.target()), &cmp)?;
    } else {
        tc("destroy b", wb.destroy())?;
    }
    tc("unmount a", wa.unmount())?;
    tc("remount a", wa.mount(backend.boxed()))?;
    ensure("remounted view after detach", &m, &view(wa.target()), &cmp)?;
    // Writes after detach; the detached diff shows the same view imported over an empty
    // lower and over the original layers (deletions after detach included).
    for op in &c.ops2 {
        run_op(wa.target(), op);
    }
    let m2 = view(wa.target());
    kernel_agrees(&mut wa, backend, &m2, "a after detach")?;
    let mut blob = Vec::new();
    upper_read(&mut wa, backend, "export detached", |w| w.export_diff(&mut blob, &diff_opts(comp)))?;
    let empty = base.join("empty-base");
    fs::create_dir(&empty).unwrap();
    for (name, lowers) in [("empty", vec![empty.clone()]), ("original", dirs.clone())] {
        let mut wc = tc("create c", Workspace::create(base.join("wc"), lowers, WorkspaceOptions::default()))?;
        tc("import detached", wc.import_diff(&blob[..]))?;
        tc("mount c", wc.mount(KernelOverlay::new()))?;
        ensure(&format!("detached diff imported over the {name} lowers"), &m2, &view(wc.target()), &cmp)?;
        tc("destroy c", wc.destroy())?;
    }
    tc("destroy a", wa.destroy())?;
    prop_assert!(!base.join("wa").exists() && !base.join("wb").exists(), "destroy left a directory");
    Ok(())
}

/// `changes()` against the kernel: every change is consistent with the views before
/// (`v0`) and after (`m`), and every difference between them is covered by a change at
/// the path, or at an ancestor that was added, replaced, deleted or changed type.
///
/// `_layers` (the lower directories) are kept for debugging output.
fn check_changes(v0: &Snap, m: &Snap, cs: &rootfs_cache::ChangeSet, _layers: &[PathBuf]) -> Result<(), String> {
    use ChangeKind::*;
    let mut problems = Vec::new();
    if !cs.changes.windows(2).all(|w| w[0].path < w[1].path) {
        problems.push("not in path order".to_string());
    }
    let key = |p: &Path| p.as_os_str().as_bytes().strip_prefix(b"/").unwrap_or(b"").to_vec();
    let mut by_path: BTreeMap<Vec<u8>, ChangeKind> = BTreeMap::new();
    for c in &cs.changes {
        let k = key(&c.path);
        let (before, after) = (v0.get(&k), m.get(&k));
        let ok = match c.kind {
            Added => after.is_some(),
            Deleted => after.is_none() && before.is_some(),
            Modified | Metadata => after.is_some() && before.is_some(),
            Opaque => after.is_some_and(|n| n.ty == Ty::Dir),
            _ => false,
        };
        if by_path.insert(k, c.kind).is_some() || !ok {
            problems.push(format!(
                "{} {:?}: before {:?}, after {:?}",
                c.path.display(),
                c.kind,
                before.map(|n| n.ty),
                after.map(|n| n.ty)
            ));
        }
        if c.kind == Metadata {
            if let (Some(b), Some(a)) = (before, after) {
                let data = b.ty != a.ty || b.link != a.link || b.rdev != a.rdev;
                // Regular files: a content change with the same size and mtime reads as
                // metadata (documented: changes() compares size and mtime, not data).
                let file = b.ty == Ty::File && (b.size != a.size || b.mtime != a.mtime) && b.sha != a.sha;
                if data || file {
                    problems.push(format!("{}: data changed, reported as Metadata", c.path.display()));
                }
            }
        }
    }
    let covered = |p: &[u8]| {
        by_path.contains_key(p)
            || p.iter().enumerate().any(|(i, &b)| b == b'/' && by_path.get(&p[..i]).is_some_and(|k| *k != Metadata))
    };
    let paths: BTreeSet<&Vec<u8>> = v0.keys().chain(m.keys()).filter(|k| k.as_slice() != b".").collect();
    for p in paths {
        let differs = match (v0.get(p), m.get(p)) {
            (Some(b), Some(a)) => !support::diff_nodes("", b, a, &strict_cmp()).is_empty(),
            _ => true,
        };
        if differs && !covered(p) {
            problems.push(format!("{}: changed but not reported", support::show(p)));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(format!("changes() vs the views: {problems:#?}\nchanges: {cs:#?}")) }
}

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn run_property(backend: Backend, default_cases: u32) {
    let config =
        Config { failure_persistence: None, max_shrink_iters: 512, ..Config::with_cases(cases(default_cases)) };
    let result = TestRunner::new(config).run(&case_strategy(), |c| run_case(&c, backend));
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn random_ops_apply_export_import_detach_match_kernel() {
    if !support::require_root("random_ops_apply_export_import_detach_match_kernel") {
        return;
    }
    run_property(Backend::Kernel, 256);
}

#[test]
fn random_ops_with_copy_backend_match_kernel() {
    if !support::require_root("random_ops_with_copy_backend_match_kernel") {
        return;
    }
    run_property(Backend::Copy, 24);
}

// ---------------------------------------------------------------------------------------
// 2. apply never writes a hardlinked lower file in place

fn hardlinked_lower(base: &Path) -> (PathBuf, PathBuf) {
    let lower = base.join("lower");
    let outside = base.join("file-cache");
    mkdirs(base, &["lower/sub", "file-cache"]);
    let blob = outside.join("blob");
    write(&blob, b"shared original");
    support::chmod(&blob, 0o644);
    for name in ["a", "sub/b", "c", "d"] {
        fs::hard_link(&blob, lower.join(name)).unwrap();
    }
    (lower, blob)
}

fn check_hardlinked_after_apply(lower: &Path, blob: &Path, ino: u64) {
    let m = fs::metadata(blob).unwrap();
    assert_eq!(fs::read(blob).unwrap(), b"shared original", "the file outside the lower was written in place");
    assert_eq!((m.ino(), m.mode() & 0o7777, m.uid()), (ino, 0o644, 0), "the outside file's inode or metadata changed");
    assert_eq!(fs::read(lower.join("a")).unwrap(), b"new content");
    assert_eq!(fs::read(lower.join("sub/b")).unwrap(), b"shared original appended");
    assert_eq!(fs::metadata(lower.join("c")).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(fs::read(lower.join("c")).unwrap(), b"shared original");
    for name in ["a", "sub/b", "c"] {
        assert_ne!(fs::metadata(lower.join(name)).unwrap().ino(), ino, "{name} still the shared inode");
    }
    // The untouched name still shares the inode: 2 links left (blob and d).
    assert_eq!(fs::metadata(lower.join("d")).unwrap().ino(), ino);
    assert_eq!(m.nlink(), 2);
}

fn write_through_hardlinks(t: &Path) {
    write(&t.join("a"), b"new content");
    fs::OpenOptions::new().append(true).open(t.join("sub/b")).unwrap().write_all(b" appended").unwrap();
    support::chmod(&t.join("c"), 0o600);
}

#[test]
fn apply_never_writes_a_hardlinked_lower_file_in_place() {
    if !support::require_root("apply_never_writes_a_hardlinked_lower_file_in_place") {
        return;
    }
    let tmp = scratch();
    let (lower, blob) = hardlinked_lower(tmp.path());
    let ino = fs::metadata(&blob).unwrap().ino();
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write_through_hardlinks(ws.target());
    let r = ws.apply().unwrap();
    assert_eq!((r.moved, r.copied), (3, 0), "{r:?}");
    check_hardlinked_after_apply(&lower, &blob, ino);
    ws.destroy().unwrap();
}

/// The same with the workspace on another filesystem than the lower: files are copied
/// next to their destination and renamed over it (`ApplyReport::copied`).
#[test]
fn apply_across_filesystems_copies_then_renames() {
    if !support::require_root("apply_across_filesystems_copies_then_renames") {
        return;
    }
    let tmp = scratch();
    let (lower, blob) = hardlinked_lower(tmp.path());
    let ino = fs::metadata(&blob).unwrap().ino();
    let other = tmp.path().join("other-fs");
    mount_tmpfs(&other);
    let r = std::panic::catch_unwind(|| {
        let mut ws = Workspace::create(other.join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
        ws.mount(KernelOverlay::new()).unwrap();
        write_through_hardlinks(ws.target());
        let m = view(ws.target());
        let r = ws.apply().unwrap();
        assert_eq!((r.moved, r.copied), (0, 3), "{r:?}");
        check_hardlinked_after_apply(&lower, &blob, ino);
        check("view after apply across filesystems", &m, &view(ws.target()), &strict_cmp());
        let leftovers: Vec<String> = ls(&lower).into_iter().filter(|n| n.starts_with(".rootfs-cache")).collect();
        assert!(leftovers.is_empty(), "temporary files left in the lower: {leftovers:?}");
        ws.destroy().unwrap();
    });
    umount(&other);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

// ---------------------------------------------------------------------------------------
// 3. apply costs O(upper)

#[test]
fn apply_touches_only_what_the_upper_holds() {
    if !support::require_root("apply_touches_only_what_the_upper_holds") {
        return;
    }
    let tmp = scratch();
    let lower = tmp.path().join("lower");
    for d in 0..100 {
        let dir = lower.join(format!("d{d:02}"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            write(&dir.join(format!("f{f:02}")), format!("{d} {f}\n").as_bytes());
        }
    }
    let ctimes = || -> BTreeMap<Vec<u8>, (i64, i64, u64)> {
        view(&lower)
            .into_keys()
            .map(|k| {
                let m = fs::symlink_metadata(support::at(&lower, &k)).unwrap();
                (k, (m.ctime(), m.ctime_nsec(), m.ino()))
            })
            .collect()
    };
    let before = ctimes();
    assert_eq!(before.len(), 100 * 100 + 100 + 1);
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("d42/f42"), b"changed\n");
    let changes = ws.changes().unwrap();
    assert_eq!(changes.changes.len(), 1, "{changes:?}");
    assert_eq!(
        (changes.changes[0].path.as_path(), changes.changes[0].kind),
        (Path::new("/d42/f42"), ChangeKind::Modified)
    );
    let t = std::time::Instant::now();
    let r = ws.apply().unwrap();
    let took = t.elapsed();
    assert_eq!((r.moved, r.copied, r.deleted, r.replaced_dirs, r.dirs), (1, 0, 0, 0, 1), "{r:?}");
    let after = ctimes();
    let changed: BTreeSet<String> =
        before.keys().filter(|k| before[*k] != after[*k]).map(|k| support::show(k)).collect();
    // The file (replaced by rename), its directory (an entry replaced) and the root
    // (metadata copied from the upper's root).
    let allowed: BTreeSet<String> = [".", "d42", "d42/f42"].iter().map(|s| s.to_string()).collect();
    assert!(changed.is_subset(&allowed) && changed.contains("d42/f42"), "ctime changed on {changed:?}");
    assert_eq!(fs::read(lower.join("d42/f42")).unwrap(), b"changed\n");
    eprintln!("apply of 1 changed file over a 10k-entry lower: {took:?}");
    ws.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. A new workspace never sees an old one's writes

#[test]
fn stale_upper_is_never_seen() {
    if !support::require_root("stale_upper_is_never_seen") {
        return;
    }
    let tmp = scratch();
    let lower = tmp.path().join("lower");
    mkdirs(&lower, &["etc"]);
    write(&lower.join("etc/hosts"), b"lower");
    let dir = tmp.path().join("ws");
    let clean = {
        let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()).unwrap();
        ws.mount(KernelOverlay::new()).unwrap();
        let clean = view(ws.target());
        write(&ws.target().join("secret"), b"old sandbox");
        write(&ws.target().join("etc/hosts"), b"old sandbox");
        fs::remove_dir_all(ws.target().join("etc")).unwrap();
        ws.destroy().unwrap();
        clean
    };
    assert!(!dir.exists(), "destroy left {}", dir.display());
    let check_clean = |ws: &mut Workspace, what: &str| {
        ws.mount(KernelOverlay::new()).unwrap();
        check(what, &clean, &view(ws.target()), &strict_cmp());
        ws.unmount().unwrap();
    };
    let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()).unwrap();
    check_clean(&mut ws, "new workspace in a destroyed one's directory");

    // Leftovers of a crashed sandbox (dropped, not destroyed): refused, or reset.
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("secret"), b"crashed sandbox");
    drop(ws); // unmounts, keeps the directories
    assert!(!rootfs_cache::is_mount_point(&dir.join("rootfs")).unwrap(), "drop left the overlay mounted");
    match Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()) {
        Err(Error::NotEmpty { path }) => assert_eq!(path, dir.join("upper")),
        other => panic!("leftover upper: expected NotEmpty, got {other:?}"),
    }
    assert_eq!(fs::read(dir.join("upper/secret")).unwrap(), b"crashed sandbox", "refusal changed the upper");
    let mut ws = Workspace::create(&dir, lower.as_path(), opts_reset()).unwrap();
    assert!(ls(ws.upper()).is_empty());
    check_clean(&mut ws, "reset workspace");
    // Leftover work dir content alone is no reason to refuse.
    fs::create_dir(dir.join("work/junk")).unwrap();
    drop(ws);
    let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()).unwrap();
    assert!(ls(&dir.join("work")).is_empty(), "work dir not emptied: {:?}", ls(&dir.join("work")));
    check_clean(&mut ws, "workspace over leftover work dir");
    ws.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Lifecycle and refusals

fn simple_lower(base: &Path) -> PathBuf {
    let lower = base.join("lower");
    mkdirs(&lower, &["etc", "usr/bin", "var/cache"]);
    write(&lower.join("etc/hosts"), b"127.0.0.1 localhost\n");
    write(&lower.join("usr/bin/sh"), b"#!sh\n");
    write(&lower.join("var/cache/blob"), b"blob");
    lower
}

#[test]
fn mount_twice_and_import_while_mounted_are_refused() {
    if !support::require_root("mount_twice_and_import_while_mounted_are_refused") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    assert!(!ws.is_mounted());
    assert_eq!(ws.mount(KernelOverlay::new()).unwrap(), tmp.path().join("ws/rootfs"));
    assert!(ws.is_mounted());
    assert!(matches!(ws.mount(KernelOverlay::new()), Err(Error::AlreadyMounted { .. })));
    assert!(matches!(ws.mount(CopyBackend::new()), Err(Error::AlreadyMounted { .. })));
    assert!(ws.is_mounted());
    write(&ws.target().join("new"), b"x");
    let mut blob = Vec::new();
    ws.export_diff(&mut blob, &DiffOptions::default()).unwrap();
    let r = ws.import_diff(&blob[..]);
    assert!(matches!(r, Err(Error::AlreadyMounted { .. })), "import while mounted: {r:?}");
    ws.unmount().unwrap();
    ws.unmount().unwrap(); // not mounted: fine
    assert!(!ws.is_mounted());
    // Into a non-empty upper.
    let r = ws.import_diff(&blob[..]);
    assert!(matches!(r, Err(Error::NotEmpty { .. })), "import into a used upper: {r:?}");
    assert_eq!(ls(ws.upper()), ["new"]);
    // Into an empty one, then the same refused again.
    let mut other = Workspace::create(tmp.path().join("other"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    other.import_diff(&blob[..]).unwrap();
    assert!(matches!(other.import_diff(&blob[..]), Err(Error::NotEmpty { .. })));
    other.destroy().unwrap();
    ws.destroy().unwrap();
}

#[test]
fn reset_empties_upper_and_work() {
    if !support::require_root("reset_empties_upper_and_work") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    support::chmod(&lower, 0o711);
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    let clean = view(ws.target());
    write(&ws.target().join("etc/hosts"), b"changed");
    fs::remove_dir_all(ws.target().join("var")).unwrap();
    support::chmod(ws.target(), 0o700);
    ws.reset().unwrap();
    assert!(!ws.is_mounted(), "reset leaves the workspace unmounted");
    assert!(ls(ws.upper()).is_empty(), "upper after reset: {:?}", ls(ws.upper()));
    assert!(ls(&tmp.path().join("ws/work")).is_empty(), "work after reset");
    assert_eq!(fs::metadata(ws.upper()).unwrap().mode() & 0o7777, 0o711, "upper root not reseeded from the lower");
    assert!(ws.changes().unwrap().is_empty());
    ws.mount(KernelOverlay::new()).unwrap();
    check("view after reset", &clean, &view(ws.target()), &strict_cmp());
    ws.destroy().unwrap();
}

#[test]
fn destroy_unmounts_and_removes_the_directory() {
    if !support::require_root("destroy_unmounts_and_removes_the_directory") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let before = view(&lower);
    for backend in [Backend::Kernel, Backend::Copy] {
        let dir = tmp.path().join(format!("ws-{backend:?}"));
        let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()).unwrap();
        ws.mount(backend.boxed()).unwrap();
        write(&ws.target().join("etc/new"), b"x");
        fs::remove_file(ws.target().join("usr/bin/sh")).unwrap();
        ws.destroy().unwrap();
        assert!(!dir.exists(), "{backend:?}: destroy left {}", dir.display());
        assert!(view(&lower) == before, "{backend:?}: destroy changed the lower");
    }
}

#[test]
fn destroy_refuses_while_something_is_mounted_inside() {
    if !support::require_root("destroy_refuses_while_something_is_mounted_inside") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let dir = tmp.path().join("ws");
    let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("keep"), b"sandbox data");
    ws.unmount().unwrap();
    let inner = dir.join("upper/x");
    mount_tmpfs(&inner);
    write(&inner.join("on-the-tmpfs"), b"not ours");
    let before = view(&dir);
    let r = ws.destroy();
    let ok = matches!(&r, Err(Error::AlreadyMounted { path }) if *path == inner);
    let mut after = view(&dir);
    umount(&inner);
    assert!(ok, "destroy with a mount inside: {r:?}");
    // The refused handle describes the workspace for `open` (it is gone itself): one
    // new file, so the dir's own mtime moved; everything else is exactly as it was.
    assert!(after.remove(b"workspace.json".as_slice()).is_some(), "a refused destroy left no description");
    let (mut before, mut after) = (before, after);
    for snap in [&mut before, &mut after] {
        snap.remove(b".".as_slice()).or_else(|| snap.remove(b"".as_slice()));
    }
    check("workspace dir after refused destroy", &before, &after, &strict_cmp());
    // Mounted workspace: destroy unmounts the overlay, then refuses the same way.
    let mut ws = Workspace::create(tmp.path().join("ws2"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    let inner2 = tmp.path().join("ws2/work/m");
    mount_tmpfs(&inner2);
    let r = ws.destroy();
    let ok = matches!(&r, Err(Error::AlreadyMounted { .. }));
    let still = tmp.path().join("ws2/upper").exists();
    umount(&inner2);
    assert!(ok && still, "destroy of a mounted workspace with a mount inside: {r:?}, upper kept: {still}");
    // Both are picked up and destroyed once nothing foreign is mounted inside.
    for d in [dir, tmp.path().join("ws2")] {
        let ws = Workspace::open(&d).unwrap();
        ws.destroy().unwrap();
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

#[test]
fn apply_is_refused_for_shared_lowers() {
    if !support::require_root("apply_is_refused_for_shared_lowers") {
        return;
    }
    let tmp = scratch();
    let base = tmp.path();
    let (l0, l1) = (base.join("l0"), base.join("l1"));
    mkdirs(base, &["l0/a", "l1/b"]);
    write(&l1.join("b/f"), b"bottom");
    // Two plain lowers.
    let mut ws =
        Workspace::create(base.join("two"), vec![l0.clone(), l1.clone()], WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("b/f"), b"changed");
    let before = (view(&l0), view(&l1), view(ws.upper()));
    let r = ws.apply();
    assert!(matches!(r, Err(Error::Unsupported { .. })), "apply over two lowers: {r:?}");
    assert!(ws.is_mounted(), "a refused apply unmounted the workspace");
    assert!((view(&l0), view(&l1), view(ws.upper())) == before, "a refused apply changed something");
    ws.destroy().unwrap();
    // A cached image.
    let cache = tiny_cache(&base.join("cache"));
    let fetcher = MemFetcher::new(vec![support::tar_of(&[Ent::dir("etc"), Ent::file("etc/f", "cached")], Fmt::Pax)]);
    let rootfs = cache.ensure(&fetcher, "img").unwrap();
    let layer = rootfs.lowers()[0].clone();
    let mut ws = Workspace::create(base.join("cached"), rootfs, WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("etc/f"), b"changed");
    let before = view(&layer);
    let r = ws.apply();
    assert!(matches!(r, Err(Error::ImmutableLayer { .. })), "apply into a cached layer: {r:?}");
    assert!(ws.is_mounted(), "a refused apply unmounted the workspace");
    assert!(view(&layer) == before, "a refused apply changed the cached layer");
    assert_eq!(fs::read(ws.target().join("etc/f")).unwrap(), b"changed");
    ws.destroy().unwrap();
}

/// A backend whose mount always fails (after checking nothing).
struct FailingBackend;

impl MountBackend for FailingBackend {
    fn mount(&self, _spec: &OverlaySpec) -> rootfs_cache::Result<()> {
        Err(Error::InvalidSpec { reason: "injected mount failure".into() })
    }
    fn unmount(&self, _spec: &OverlaySpec) -> rootfs_cache::Result<()> {
        Ok(())
    }
}

fn siblings(p: &Path) -> Vec<String> {
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    ls(p.parent().unwrap()).into_iter().filter(|n| n.starts_with(&name)).collect()
}

#[test]
fn convert_refusals_and_rollback() {
    if !support::require_root("convert_refusals_and_rollback") {
        return;
    }
    let tmp = scratch();
    let path = simple_lower(tmp.path());
    let before = view(&path);
    let ino = fs::metadata(&path).unwrap().ino();
    // The backend fails: everything is put back.
    let r = Workspace::convert(&path, FailingBackend);
    assert!(matches!(r, Err(Error::InvalidSpec { .. })), "convert with a failing backend: {r:?}");
    assert_eq!(siblings(&path), ["lower"], "convert left siblings");
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    check("converted dir after a failed mount", &before, &view(&path), &strict_cmp());
    // `path.lower` exists: refused before anything changes.
    fs::create_dir(tmp.path().join("lower.lower")).unwrap();
    let r = Workspace::convert(&path, KernelOverlay::new());
    assert!(r.is_err(), "convert with path.lower present: {r:?}");
    assert_eq!(siblings(&path), ["lower", "lower.lower"]);
    check("converted dir after refusal", &before, &view(&path), &strict_cmp());
    fs::remove_dir(tmp.path().join("lower.lower")).unwrap();
    // A mount point.
    let mp = tmp.path().join("mp");
    mount_tmpfs(&mp);
    write(&mp.join("f"), b"x");
    let r = Workspace::convert(&mp, KernelOverlay::new());
    let names = siblings(&mp);
    umount(&mp);
    assert!(matches!(r, Err(Error::AlreadyMounted { .. })), "convert of a mount point: {r:?}");
    assert_eq!(names, ["mp"]);
    // Not a directory.
    write(&tmp.path().join("file"), b"x");
    assert!(matches!(
        Workspace::convert(tmp.path().join("file"), KernelOverlay::new()),
        Err(Error::InvalidSpec { .. })
    ));
}

#[test]
fn convert_apply_destroy_puts_the_lower_back() {
    if !support::require_root("convert_apply_destroy_puts_the_lower_back") {
        return;
    }
    let tmp = scratch();
    let path = simple_lower(tmp.path());
    let mut ws = Workspace::convert(&path, KernelOverlay::new()).unwrap();
    assert!(ws.is_mounted() && rootfs_cache::is_mount_point(&path).unwrap());
    assert_eq!(ws.target(), path);
    assert_eq!(ws.lowers(), [tmp.path().join("lower.lower")]);
    write(&path.join("etc/hosts"), b"applied");
    fs::remove_dir_all(path.join("var")).unwrap();
    let m = view(&path);
    let r = ws.apply().unwrap();
    assert_eq!((r.moved, r.deleted), (1, 1), "{r:?}");
    check("converted view after apply", &m, &view(&path), &strict_cmp());
    write(&path.join("unapplied"), b"lost on destroy");
    ws.destroy().unwrap();
    assert!(!rootfs_cache::is_mount_point(&path).unwrap());
    assert_eq!(siblings(&path), ["lower"], "destroy left siblings");
    let mut expected = m.clone();
    expected.remove(&b"."[..]);
    let mut got = unescape(view(&path));
    got.remove(&b"."[..]);
    check("directory after destroy", &expected, &got, &strict_cmp());
}

#[test]
fn changes_and_export_refuse_redirects_and_metacopy() {
    if !support::require_root("changes_and_export_refuse_redirects_and_metacopy") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    for (what, xattr) in [("dir", "trusted.overlay.redirect"), ("file", "trusted.overlay.metacopy")] {
        let dir = tmp.path().join(format!("ws-{what}"));
        let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::default()).unwrap();
        ws.mount(KernelOverlay::new()).unwrap();
        fs::create_dir(ws.target().join("usr/new")).unwrap();
        write(&ws.target().join("usr/new/f"), b"f");
        write(&ws.target().join("etc/hosts"), b"changed");
        ws.unmount().unwrap();
        let victim = if what == "dir" { ws.upper().join("usr/new") } else { ws.upper().join("etc/hosts") };
        let value: &[u8] = if what == "dir" { b"/usr/old" } else { b"" };
        support::lsetxattr(&victim, xattr, value);
        let lower_before = view(&lower);
        let upper_before = view(ws.upper());
        let r = ws.changes();
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{what}: changes() with {xattr}: {r:?}");
        let r = ws.export_diff(std::io::sink(), &DiffOptions::default());
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{what}: export with {xattr}: {r:?}");
        let r = ws.apply();
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{what}: apply with {xattr}: {r:?}");
        assert!(view(&lower) == lower_before, "{what}: refused apply changed the lower");
        assert!(view(ws.upper()) == upper_before, "{what}: refused apply changed the upper");
        ws.destroy().unwrap();
    }
}

#[test]
fn lease_is_held_until_destroy_or_detach() {
    if !support::require_root("lease_is_held_until_destroy_or_detach") {
        return;
    }
    let tmp = scratch();
    let cache = tiny_cache(&tmp.path().join("cache"));
    let fetcher = MemFetcher::new(vec![
        support::tar_of(&[Ent::dir("etc"), Ent::file("etc/base", "base")], Fmt::Pax),
        support::tar_of(&[Ent::dir("etc"), Ent::file("etc/top", "top")], Fmt::Pax),
    ]);
    let leased = |c: &RootfsCache| c.stats().leased_entries;
    // destroy releases.
    let rootfs = cache.ensure(&fetcher, "img").unwrap();
    let layers = rootfs.lowers().to_vec();
    let mut ws = Workspace::create(tmp.path().join("ws"), rootfs, WorkspaceOptions::default()).unwrap();
    assert!(ws.is_leased());
    assert_eq!(leased(&cache), 2);
    ws.mount(KernelOverlay::new()).unwrap();
    assert!(cache.gc().unwrap().evicted.is_empty(), "gc evicted leased layers");
    assert_eq!(fs::read(ws.target().join("etc/base")).unwrap(), b"base");
    ws.destroy().unwrap();
    assert_eq!(leased(&cache), 0, "destroy did not release the lease");
    // drop releases too (the directories stay).
    let rootfs = cache.ensure(&fetcher, "img").unwrap();
    let ws = Workspace::create(tmp.path().join("ws"), rootfs, WorkspaceOptions::default()).unwrap();
    assert_eq!(leased(&cache), 2);
    drop(ws);
    assert_eq!(leased(&cache), 0, "drop did not release the lease");
    // detach releases while the workspace lives on; gc can then evict the image.
    let rootfs = cache.ensure(&fetcher, "img").unwrap();
    let mut ws = Workspace::create(tmp.path().join("ws"), rootfs, opts_reset()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("etc/mine"), b"mine");
    let m = view(ws.target());
    ws.detach().unwrap();
    assert!(!ws.is_leased());
    assert_eq!(leased(&cache), 0, "detach did not release the lease");
    assert_eq!(cache.gc().unwrap().evicted.len(), 2);
    assert!(layers.iter().all(|l| !l.exists()), "evicted layers still on disk");
    check("detached view after eviction", &m, &view(ws.target()), &strict_cmp());
    ws.unmount().unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    check("detached view after eviction, remounted", &m, &view(ws.target()), &strict_cmp());
    ws.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------
// 6. changes(): how each kind of write is classified

#[test]
fn changes_classification() {
    if !support::require_root("changes_classification") {
        return;
    }
    let tmp = scratch();
    let lower = tmp.path().join("lower");
    mkdirs(&lower, &["parent/sub", "opq/olddir", "deldir/x", "d2f", "chdir", "f2d-parent"]);
    for f in ["mod", "chm", "ownr", "xat", "del", "touched", "f2d", "parent/sub/deep", "opq/old", "deldir/x/y", "d2f/x"]
    {
        write(&lower.join(f), format!("lower {f}\n").as_bytes());
    }
    std::os::unix::fs::symlink("a", lower.join("sym")).unwrap();
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    assert!(ws.changes().unwrap().is_empty());
    let t = ws.target().to_path_buf();
    write(&t.join("new"), b"new");
    fs::create_dir(t.join("newdir")).unwrap();
    write(&t.join("newdir/f"), b"f");
    write(&t.join("mod"), b"modified content");
    support::chmod(&t.join("chm"), 0o600);
    support::lchown(&t.join("ownr"), 5, 5);
    support::lsetxattr(&t.join("xat"), "user.k", b"v");
    fs::remove_file(t.join("del")).unwrap();
    fs::remove_dir_all(t.join("deldir")).unwrap();
    fs::remove_dir_all(t.join("opq")).unwrap();
    fs::create_dir(t.join("opq")).unwrap();
    write(&t.join("opq/new"), b"n");
    fs::remove_file(t.join("f2d")).unwrap();
    fs::create_dir(t.join("f2d")).unwrap();
    fs::remove_dir_all(t.join("d2f")).unwrap();
    write(&t.join("d2f"), b"now a file");
    write(&t.join("parent/sub/deep"), b"deep change");
    support::chmod(&t.join("chdir"), 0o700);
    fs::remove_file(t.join("sym")).unwrap();
    std::os::unix::fs::symlink("b", t.join("sym")).unwrap();
    support::set_mtime(&t.join("touched"), 1_000_000, 0);
    use ChangeKind::*;
    let expected: Vec<(&str, ChangeKind)> = vec![
        ("/chdir", Metadata),
        ("/chm", Metadata),
        ("/d2f", Modified),
        ("/del", Deleted),
        ("/deldir", Deleted),
        // A directory made where a file was deleted is opaque (overlay marks it so).
        ("/f2d", Opaque),
        ("/mod", Modified),
        ("/new", Added),
        ("/newdir", Added),
        ("/newdir/f", Added),
        ("/opq", Opaque),
        ("/opq/new", Added),
        ("/ownr", Metadata),
        // `/parent` and `/parent/sub` were copied up only to hold `deep`: not reported.
        ("/parent/sub/deep", Modified),
        ("/sym", Modified),
        ("/touched", Modified),
        ("/xat", Metadata),
    ];
    let got_mounted = ws.changes().unwrap();
    ws.unmount().unwrap();
    let got = ws.changes().unwrap();
    assert_eq!(got, got_mounted, "changes() differ mounted and unmounted");
    let got_pairs: Vec<(String, ChangeKind)> =
        got.changes.iter().map(|c| (c.path.display().to_string(), c.kind)).collect();
    let want: Vec<(String, ChangeKind)> = expected.iter().map(|(p, k)| (p.to_string(), *k)).collect();
    assert_eq!(got_pairs, want);
    assert!(got.changes.windows(2).all(|w| w[0].path < w[1].path), "not in path order");
    assert_eq!(got.len(), expected.len());
    assert_eq!(got.of_kind(Deleted).count(), 2);
    // A child created in a lower directory changes the directory's mtime: reported.
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("chdir/child"), b"c");
    write(&ws.target().join("parent/created"), b"c");
    let kinds: BTreeMap<String, ChangeKind> =
        ws.changes().unwrap().changes.iter().map(|c| (c.path.display().to_string(), c.kind)).collect();
    assert_eq!(kinds.get("/parent"), Some(&Metadata), "{kinds:?}");
    assert_eq!(kinds.get("/parent/sub"), None, "{kinds:?}");
    assert_eq!(kinds.get("/parent/created"), Some(&Added));
    ws.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------
// 7. The export format

/// A workspace with one of each kind of change, unmounted.
fn varied_workspace(base: &Path, name: &str, lower: &Path) -> Workspace {
    let mut ws = Workspace::create(base.join(name), lower, WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    let t = ws.target().to_path_buf();
    fs::remove_file(t.join("gone")).unwrap();
    fs::remove_dir_all(t.join("dir/sub")).unwrap();
    fs::remove_dir_all(t.join("opq")).unwrap();
    fs::create_dir(t.join("opq")).unwrap();
    write(&t.join("opq/n"), b"inside the opaque dir");
    write(&t.join("dir/new"), b"new file");
    support::set_mtime(&t.join("dir/new"), 1_700_000_000, 123_456_789);
    support::lchown(&t.join("dir/new"), 3_000_000, 3_000_001);
    support::lsetxattr(&t.join("dir/new"), "user.note", b"hello");
    support::lsetxattr(&t.join("dir/new"), "trusted.overlay.escaped", b"image xattr");
    fs::hard_link(t.join("dir/new"), t.join("link-to-new")).unwrap();
    std::os::unix::fs::symlink("../some/where", t.join("dir/sym")).unwrap();
    support::mknod(&t.join("fifo"), libc::S_IFIFO, 0o640, 0, 0);
    support::mknod(&t.join("null"), libc::S_IFCHR, 0o666, 1, 3);
    let long = format!("long/{}/{}/{}", "a".repeat(60), "b".repeat(70), "c".repeat(80));
    fs::create_dir_all(t.join(&long)).unwrap();
    write(&t.join(&long).join(format!("{}.txt", "f".repeat(120))), b"deep");
    write(&t.join("etc/hosts"), b"changed lower file");
    ws.unmount().unwrap();
    ws
}

fn varied_lower(base: &Path) -> PathBuf {
    let lower = base.join("lower");
    mkdirs(&lower, &["dir/sub/deeper", "opq/olddir", "etc"]);
    write(&lower.join("gone"), b"gone");
    write(&lower.join("dir/sub/deeper/f"), b"f");
    write(&lower.join("opq/old"), b"old");
    write(&lower.join("etc/hosts"), b"lower hosts");
    lower
}

fn tar_names(listing: &[u8]) -> BTreeSet<String> {
    String::from_utf8_lossy(listing).lines().map(|l| l.trim_end_matches('/').to_string()).collect()
}

#[test]
fn export_is_read_by_gnu_tar_and_bsdtar() {
    if !support::require_root("export_is_read_by_gnu_tar_and_bsdtar")
        || !support::require_tools("export_is_read_by_gnu_tar_and_bsdtar", &["tar", "bsdtar"])
    {
        return;
    }
    let tmp = scratch();
    let lower = varied_lower(tmp.path());
    let ws = varied_workspace(tmp.path(), "ws", &lower);
    assert!(is_whiteout(&ws.upper().join("gone")) && is_whiteout(&ws.upper().join("dir/sub")));
    let long = format!("long/{}/{}/{}", "a".repeat(60), "b".repeat(70), "c".repeat(80));
    let long_file = format!("{long}/{}.txt", "f".repeat(120));
    let mut expected: BTreeSet<String> = [
        // The upper root's metadata, as `./`.
        ".",
        ".wh.gone",
        "dir",
        "dir/.wh.sub",
        "dir/new",
        "dir/sym",
        "etc",
        "etc/hosts",
        "fifo",
        "link-to-new",
        "null",
        "opq",
        "opq/.wh..wh..opq",
        "opq/n",
        "long",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = String::from("long");
    for part in long.split('/').skip(1) {
        p = format!("{p}/{part}");
        expected.insert(p.clone());
    }
    expected.insert(long_file.clone());
    for (comp, ext, gnu_flag) in [
        (Compression::None, "tar", None),
        (Compression::Gzip, "tar.gz", Some("-z")),
        (Compression::Zstd, "tar.zst", Some("--zstd")),
    ] {
        let file = tmp.path().join(format!("diff.{ext}"));
        let stats = ws.export_diff(fs::File::create(&file).unwrap(), &diff_opts(comp)).unwrap();
        assert_eq!(stats.size, fs::metadata(&file).unwrap().len());
        assert_eq!(stats.entries as usize, expected.len(), "{comp:?}: {stats:?}");
        let gnu_ok = gnu_flag != Some("--zstd") || support::have_tool("zstd");
        if gnu_ok {
            let mut cmd = Command::new("tar");
            cmd.args(gnu_flag).arg("-tf").arg(&file);
            assert_eq!(tar_names(&support::run(&mut cmd)), expected, "GNU tar listing of the {comp:?} diff");
            let mut cmd = Command::new("tar");
            cmd.args(gnu_flag).args(["--numeric-owner", "-tvf"]).arg(&file);
            let verbose = String::from_utf8(support::run(&mut cmd)).unwrap();
            let new_line = verbose.lines().find(|l| l.ends_with(" dir/new")).expect("dir/new listed");
            assert!(new_line.contains("3000000/3000001"), "large ids: {new_line}");
            assert!(
                verbose.lines().any(|l| l.starts_with('h') && l.contains("link-to-new link to dir/new")),
                "{verbose}"
            );
        }
        assert_eq!(tar_names(&support::run(Command::new("bsdtar").arg("-tf").arg(&file))), expected, "bsdtar {comp:?}");
        support::run(Command::new("bsdtar").arg("-tvf").arg(&file));
    }
    // GNU tar extracts it with data, hardlinks, long names, sub-second mtimes, xattrs.
    let x = tmp.path().join("x");
    fs::create_dir(&x).unwrap();
    support::run(
        Command::new("tar")
            .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
            .arg(tmp.path().join("diff.tar"))
            .arg("-C")
            .arg(&x),
    );
    assert_eq!(fs::read(x.join(&long_file)).unwrap(), b"deep");
    assert_eq!(fs::read(x.join("opq/n")).unwrap(), b"inside the opaque dir");
    let new = fs::metadata(x.join("dir/new")).unwrap();
    assert_eq!(new.ino(), fs::metadata(x.join("link-to-new")).unwrap().ino());
    assert_eq!(
        (new.mtime(), new.mtime_nsec(), new.uid(), new.gid()),
        (1_700_000_000, 123_456_789, 3_000_000, 3_000_001)
    );
    assert_eq!(support::lgetxattr(&x.join("dir/new"), b"user.note").as_deref(), Some(&b"hello"[..]));
    assert_eq!(
        support::lgetxattr(&x.join("dir/new"), b"trusted.overlay.escaped").as_deref(),
        Some(&b"image xattr"[..]),
        "escaped image xattr not exported under its own name"
    );
    assert!(fs::symlink_metadata(x.join(".wh.gone")).unwrap().is_file());
    drop(ws);
}

/// The headers of a tar stream, one line per entry, for comparing two exports.
fn tar_headers(tar: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let pax: Vec<String> = match e.pax_extensions().unwrap() {
                Some(exts) => exts
                    .map(|x| x.unwrap())
                    .map(|x| format!("{}={}", x.key().unwrap_or("?"), String::from_utf8_lossy(x.value_bytes())))
                    .collect(),
                None => Vec::new(),
            };
            format!(
                "{} {:?} mode={:o} {}:{} mtime={} size={} link={:?} pax={pax:?}",
                String::from_utf8_lossy(&e.path_bytes()),
                h.entry_type(),
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
                h.size().unwrap(),
                e.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Library bugs these tests found (fixed; kept as regression tests)

/// A chmod, chown, xattr or new entry at `/` survives export → import (regression: the
/// diff had no entry for the root, so the imported root kept the lower's mode and owner
/// and got the import's time).
#[test]
fn import_keeps_root_metadata() {
    if !support::require_root("import_keeps_root_metadata") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    support::chmod(ws.target(), 0o700);
    support::lchown(ws.target(), 7, 8);
    support::lsetxattr(ws.target(), "user.root", b"r");
    write(&ws.target().join("top"), b"t");
    let m = view(ws.target());
    let mut blob = Vec::new();
    ws.export_diff(&mut blob, &DiffOptions::default()).unwrap();
    let mut b = Workspace::create(tmp.path().join("b"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    b.import_diff(&blob[..]).unwrap();
    b.mount(KernelOverlay::new()).unwrap();
    check("imported view with a changed root", &m, &view(b.target()), &strict_cmp());
}

/// `apply` moves copied-up files into the lower with `rename`: the overlay metadata the
/// kernel put on them at copy-up (`trusted.overlay.origin`) must not come along into the
/// plain lower (regression: it did, and showed in a `convert`ed directory after
/// `destroy`).
#[test]
fn apply_leaves_no_overlay_metadata_in_the_lower() {
    if !support::require_root("apply_leaves_no_overlay_metadata_in_the_lower") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("etc/hosts"), b"changed");
    support::chmod(&ws.target().join("usr/bin/sh"), 0o700);
    ws.apply().unwrap();
    ws.destroy().unwrap();
    for f in ["etc/hosts", "usr/bin/sh"] {
        let leaked: Vec<String> = support::lxattrs(&lower.join(f))
            .into_keys()
            .map(|k| support::show(&k))
            .filter(|k| k.starts_with("trusted.overlay."))
            .collect();
        assert!(leaked.is_empty(), "{f}: overlay metadata in the applied lower: {leaked:?}");
    }
}

/// Export → import → export gives the same tar (the same `diff_id`): a diff moved
/// between nodes keeps its identity (regression: whiteout entries carried the whiteout
/// device's mtime, which an import does not keep).
#[test]
fn export_import_export_is_identical() {
    if !support::require_root("export_import_export_is_identical") {
        return;
    }
    let tmp = scratch();
    let lower = varied_lower(tmp.path());
    let ws = varied_workspace(tmp.path(), "ws", &lower);
    let mut first = Vec::new();
    let s1 = ws.export_diff(&mut first, &DiffOptions::default()).unwrap();
    // Import a second later, so any time the import makes up shows.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut again = Workspace::create(tmp.path().join("again"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    again.import_diff(&first[..]).unwrap();
    let mut second = Vec::new();
    let s2 = again.export_diff(&mut second, &DiffOptions::default()).unwrap();
    let (h1, h2) = (tar_headers(&first), tar_headers(&second));
    let differing: Vec<String> =
        h1.iter().zip(&h2).filter(|(a, b)| a != b).map(|(a, b)| format!("\n  first:  {a}\n  second: {b}")).collect();
    assert!(differing.is_empty() && h1.len() == h2.len(), "entries differ:{}", differing.concat());
    assert_eq!(s1.diff_id, s2.diff_id, "diff_ids differ with identical headers");
    drop((ws, again));
}

/// A sandbox may create files named `.wh.x` or `.wh..wh..opq` (ordinary names in the
/// merged view). An OCI layer cannot represent them: the export refuses
/// (`Error::Unsupported`) or round-trips them, never turns them into deletions
/// (regression: they were written as they are, and the import deleted `/etc` and
/// emptied `/usr`).
#[test]
fn sandbox_file_named_like_a_whiteout_is_never_a_deletion() {
    if !support::require_root("sandbox_file_named_like_a_whiteout_is_never_a_deletion") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join(".wh.etc"), b"just a file");
    write(&ws.target().join("usr/.wh..wh..opq"), b"also just a file");
    let m = view(ws.target());
    let mut blob = Vec::new();
    match ws.export_diff(&mut blob, &DiffOptions::default()) {
        Err(Error::Unsupported { .. }) => return, // refused: fine
        Err(e) => panic!("export: {e}"),
        Ok(_) => {}
    }
    let mut b = Workspace::create(tmp.path().join("b"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    b.import_diff(&blob[..]).unwrap();
    b.mount(KernelOverlay::new()).unwrap();
    check("imported view of a sandbox with .wh. names", &m, &view(b.target()), &strict_cmp());
}

/// An image whose manifest lists the same layer twice (identical blobs, as image
/// builders produce for repeated identical steps) mounts, showing the top-most copy
/// (regression: `Rootfs::lowers` listed the directory twice, which every mount refuses).
#[test]
fn image_with_a_repeated_layer_mounts() {
    if !support::require_root("image_with_a_repeated_layer_mounts") {
        return;
    }
    let tmp = scratch();
    let cache = tiny_cache(&tmp.path().join("cache"));
    let repeated = support::tar_of(&[Ent::dir("etc"), Ent::file("etc/conf", "repeated")], Fmt::Pax);
    let middle = support::tar_of(&[Ent::dir("etc"), Ent::file("etc/conf", "middle"), Ent::file("x", "x")], Fmt::Pax);
    let fetcher = MemFetcher::new(vec![repeated.clone(), middle, repeated]);
    let rootfs = cache.ensure(&fetcher, "img").unwrap();
    let mut ws = Workspace::create(tmp.path().join("ws"), rootfs, WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    assert_eq!(fs::read(ws.target().join("etc/conf")).unwrap(), b"repeated");
    assert_eq!(fs::read(ws.target().join("x")).unwrap(), b"x");
    ws.destroy().unwrap();
}

/// `convert` fails when `path.upper` or `path.work` already exists, and its rollback
/// removes only what it made (regression: it `rmdir`ed all three siblings, deleting a
/// pre-existing empty `path.work` or `path.upper`).
#[test]
fn convert_rollback_removes_only_what_it_made() {
    if !support::require_root("convert_rollback_removes_only_what_it_made") {
        return;
    }
    let tmp = scratch();
    let path = simple_lower(tmp.path());
    for sibling in ["lower.upper", "lower.work"] {
        let theirs = tmp.path().join(sibling);
        fs::create_dir(&theirs).unwrap();
        support::chmod(&theirs, 0o701);
        let before = view(&path);
        let r = Workspace::convert(&path, KernelOverlay::new());
        assert!(r.is_err(), "convert with {sibling} present: {:?}", r.map(|_| ()));
        check("the directory after a refused convert", &before, &view(&path), &strict_cmp());
        assert!(theirs.is_dir(), "convert's rollback deleted the pre-existing {sibling}");
        fs::remove_dir(&theirs).unwrap();
    }
}

/// `convert("dir/")` works like `convert("dir")` (regression: the trailing slash made
/// the siblings `dir/.lower`, ..., and the rename failed with `EINVAL`).
#[test]
fn convert_with_a_trailing_slash() {
    if !support::require_root("convert_with_a_trailing_slash") {
        return;
    }
    let tmp = scratch();
    let path = simple_lower(tmp.path());
    let ws = Workspace::convert(format!("{}/", path.display()), KernelOverlay::new()).unwrap();
    assert_eq!(ws.lowers(), [tmp.path().join("lower.lower")]);
    ws.destroy().unwrap();
    assert_eq!(siblings(&path), ["lower"]);
}

/// The diff of a detached workspace, imported over the image it came from (moving the
/// sandbox to another node with the same image), shows the detached view: top-level
/// entries of the image deleted after `detach` stay deleted although the root cannot be
/// opaque (regression: with an empty lower they left no whiteout and came back).
#[test]
fn detached_diff_over_the_image_keeps_top_level_deletions() {
    if !support::require_root("detached_diff_over_the_image_keeps_top_level_deletions") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    ws.detach().unwrap();
    fs::remove_dir_all(ws.target().join("var")).unwrap();
    fs::remove_dir_all(ws.target().join("usr/bin")).unwrap();
    let m = view(ws.target());
    let mut blob = Vec::new();
    ws.export_diff(&mut blob, &DiffOptions::default()).unwrap();
    let mut b = Workspace::create(tmp.path().join("b"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    b.import_diff(&blob[..]).unwrap();
    b.mount(KernelOverlay::new()).unwrap();
    check("the detached sandbox's diff over its image", &m, &view(b.target()), &strict_cmp());
}

/// `changes()` resolves a path in the lowers the way overlayfs does: a directory that is
/// opaque in a layer hides everything below it in lower layers, also where that layer
/// lacks the next component. Top `a/b/` (plain), middle `a/` opaque and empty, bottom
/// `a/b/f`: the view has no `a/b/f`, so writing it is `Added` (regression: the lookup
/// skipped to the next layer past the opaque parent and reported `Modified`).
#[test]
fn changes_respects_an_opaque_dir_above_a_missing_parent() {
    if !support::require_root("changes_respects_an_opaque_dir_above_a_missing_parent") {
        return;
    }
    let tmp = scratch();
    let (top, middle, bottom) = (tmp.path().join("l0"), tmp.path().join("l1"), tmp.path().join("l2"));
    mkdirs(tmp.path(), &["l0/a/b", "l1/a", "l2/a/b"]);
    opaque(&middle.join("a"));
    write(&bottom.join("a/b/f"), b"hidden by the middle layer's opaque a/");
    let mut ws =
        Workspace::create(tmp.path().join("ws"), vec![top, middle, bottom], WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    assert!(!ws.target().join("a/b/f").exists(), "kernel: the opaque a/ hides the bottom a/b/f");
    write(&ws.target().join("a/b/f"), b"new");
    let got: Vec<(String, ChangeKind)> =
        ws.changes().unwrap().changes.iter().map(|c| (c.path.display().to_string(), c.kind)).collect();
    assert!(got.contains(&("/a/b/f".to_string(), ChangeKind::Added)), "{got:?}");
    ws.destroy().unwrap();
}

/// A workspace created with `overlay.volatile` can be mounted again after its own clean
/// `unmount()`: overlayfs leaves `work/work/incompat/volatile` behind and refuses the
/// next mount until it is removed; after a verified unmount the workspace syncs the
/// upper and removes it (regression: the remount failed with EINVAL).
#[test]
fn volatile_workspace_can_be_remounted() {
    if !support::require_root("volatile_workspace_can_be_remounted") {
        return;
    }
    let tmp = scratch();
    let lower = simple_lower(tmp.path());
    let mut o = WorkspaceOptions::default();
    o.overlay.volatile = true;
    let mut ws = Workspace::create(tmp.path().join("ws"), lower.as_path(), o).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    write(&ws.target().join("etc/x"), b"x");
    ws.unmount().unwrap();
    ws.mount(KernelOverlay::new()).expect("remount of a cleanly unmounted volatile workspace");
    assert_eq!(fs::read(ws.target().join("etc/x")).unwrap(), b"x");
    ws.destroy().unwrap();
}
