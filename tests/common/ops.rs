//! Random operations through a mounted directory (an overlay's merged view or a copy
//! backend's target), shared by `tests/mount_copy.rs` and `tests/workspace.rs`, with the
//! tree snapshots and small file-system helpers both use. Included with
//! `#[path = "common/ops.rs"] mod ops;` next to `mod support;`.
//!
//! Each includer picks its mix of operations ([`OpMix`]) and which xattrs they touch
//! ([`XattrPolicy`]).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::strategy::Union;

use crate::support::{self, Cmp, Node, Ty};

pub type Snap = BTreeMap<Vec<u8>, Node>;

// ---------------------------------------------------------------------------------------
// Snapshots and small helpers

/// Every object under `root` plus `root` itself (key `.`), like `support::snapshot`,
/// except that names `readdir` lists but `lstat` does not find are left out: the kernel
/// lists whiteouts that sit in a directory only one lower layer has (such a directory
/// is read directly, not merged), although they cannot be looked up.
pub fn view(root: &Path) -> Snap {
    fn walk(root: &Path, rel: &Path, out: &mut Snap) {
        let dir = root.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            match fs::symlink_metadata(root.join(&r)) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                _ => {}
            }
            let nd = support::node(&root.join(&r));
            let is_dir = nd.ty == Ty::Dir;
            out.insert(r.as_os_str().as_bytes().to_vec(), nd);
            if is_dir {
                walk(root, &r, out);
            }
        }
    }
    let mut s = Snap::new();
    walk(root, Path::new(""), &mut s);
    s.insert(b".".to_vec(), support::node(root));
    s
}

/// Everything the kernel shows: content, type, mode, owner, xattrs, all mtimes to the
/// ns, directory mtimes included (the copy backend promises the same).
pub fn strict_cmp() -> Cmp {
    Cmp::strict()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn try_lsetxattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings, value valid for its length.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn try_lremovexattr(p: &Path, name: &str) -> std::io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings.
    let r = unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn try_mknod(p: &Path, kind: libc::mode_t, perm: u32, major: u32, minor: u32) -> std::io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | perm, libc::makedev(major, minor)) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn try_set_mtime(p: &Path, secs: i64, nsec: u32) -> std::io::Result<()> {
    let c = cpath(p);
    let ts = libc::timespec { tv_sec: secs, tv_nsec: i64::from(nsec) };
    let times = [ts, ts];
    // SAFETY: valid path and a two-element timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

pub fn whiteout(p: &Path) {
    support::mknod(p, libc::S_IFCHR, 0o000, 0, 0);
}

pub fn is_whiteout(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

pub fn opaque(p: &Path) {
    support::lsetxattr(p, "trusted.overlay.opaque", b"y");
}

pub fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

pub fn ls(p: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// Paths and values layers and operations use

/// Paths the layers use: names `a`, `b`, `c` up to three deep, so layers collide a lot.
pub fn layer_paths() -> Vec<String> {
    let names = ["a", "b", "c"];
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    for x in names {
        for y in names {
            v.push(format!("{x}/{y}"));
        }
    }
    for x in names {
        for y in names {
            for z in names {
                v.push(format!("{x}/{y}/{z}"));
            }
        }
    }
    v
}

/// Paths operations use: the layer paths plus some new names.
pub fn op_paths() -> Vec<String> {
    let mut v = layer_paths();
    v.extend(["n", "n/m", "n/m/o", "a/n", "a/b/n", "b/n", "b/n/m", "m"].iter().map(|s| s.to_string()));
    v
}

pub const FILE_MODES: [u32; 7] = [0o644, 0o600, 0o4755, 0o2711, 0o444, 0o000, 0o6755];
pub const DIR_MODES: [u32; 6] = [0o755, 0o700, 0o1777, 0o2755, 0o555, 0o000];
pub const OWNERS: [(u32, u32); 4] = [(0, 0), (1000, 1000), (65534, 7), (1, 2)];
pub const MTIMES: [(i64, u32); 6] = [
    (1_600_000_000, 0),
    (1_600_000_000, 1),
    (1_650_000_000, 999_999_999),
    (1_234_567_890, 123_456_789),
    (-86_400, 500),
    (0, 0),
];
pub const SYMLINK_TARGETS: [&str; 4] = ["a", "b/c", "/nonexistent/abs", "../sibling"];

/// Xattrs operations set through the mount (the overlay escapes `trusted.overlay.*`).
pub const OP_XATTRS: [&str; 5] = ["user.x", "user.new", "trusted.t", "trusted.overlay.foo", "trusted.overlay.opaque"];

// ---------------------------------------------------------------------------------------
// Random layers (overlay format)

/// Xattrs layers carry, as stored in a layer: `trusted.overlay.overlay.*` is an escaped
/// image xattr, `trusted.overlay.zzz` overlay metadata the view must not show.
pub const LAYER_XATTRS: [&str; 5] =
    ["user.x", "user.y", "trusted.t", "trusted.overlay.overlay.foo", "trusted.overlay.zzz"];

#[derive(Clone, Debug)]
pub struct Meta {
    pub mode: usize,
    pub owner: usize,
    pub mtime: usize,
    pub xattr: Option<(usize, u8)>,
}

#[derive(Clone, Debug)]
pub enum LKind {
    File {
        seed: u8,
        len: u16,
    },
    Dir {
        opaque: bool,
    },
    Symlink(usize),
    Whiteout,
    Fifo,
    CharDev,
    /// Hardlink to the n-th file created earlier in the same layer.
    Hardlink(usize),
}

#[derive(Clone, Debug)]
pub struct LEnt {
    pub path: usize,
    pub kind: LKind,
    pub meta: Meta,
}

pub fn meta_strategy() -> impl Strategy<Value = Meta> {
    (0..16usize, 0..OWNERS.len(), 0..MTIMES.len(), proptest::option::weighted(0.4, (0..16usize, any::<u8>())))
        .prop_map(|(mode, owner, mtime, xattr)| Meta { mode, owner, mtime, xattr })
}

pub fn lkind_strategy(big: std::ops::Range<u16>) -> impl Strategy<Value = LKind> {
    prop_oneof![
        5 => (any::<u8>(), prop_oneof![Just(0u16), 1..64u16, big]).prop_map(|(seed, len)| LKind::File { seed, len }),
        4 => any::<bool>().prop_map(|o| LKind::Dir { opaque: o }),
        1 => (0..SYMLINK_TARGETS.len()).prop_map(LKind::Symlink),
        3 => Just(LKind::Whiteout),
        1 => Just(LKind::Fifo),
        1 => Just(LKind::CharDev),
        1 => (0..8usize).prop_map(LKind::Hardlink),
    ]
}

pub fn layer_strategy(max: usize, big_file: std::ops::Range<u16>) -> impl Strategy<Value = Vec<LEnt>> {
    let n = layer_paths().len();
    proptest::collection::vec(
        (0..n, lkind_strategy(big_file), meta_strategy()).prop_map(|(path, kind, meta)| LEnt { path, kind, meta }),
        0..max,
    )
}

pub fn layer_xattr(meta: &Meta, pool: &[&'static str]) -> Option<(&'static str, Vec<u8>)> {
    let (i, v) = meta.xattr?;
    Some((pool[i % pool.len()], vec![b'v', v]))
}

/// Writes a layer in overlay format: whiteouts as 0:0 devices, opaque dirs by xattr.
/// Entries whose path is taken, or whose parent is not a directory in this layer, are
/// skipped. Xattrs come from `xattrs`; directories get them only with `dir_xattrs`.
pub fn build_layer(root: &Path, ents: &[LEnt], xattrs: &[&'static str], dir_xattrs: bool) {
    let paths = layer_paths();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut dirs: Vec<(String, Option<&Meta>)> = Vec::new();
    for e in ents {
        let rel = &paths[e.path % paths.len()];
        let p = root.join(rel);
        let comps: Vec<&str> = rel.split('/').collect();
        let mut ok = true;
        for i in 1..comps.len() {
            let anc = comps[..i].join("/");
            match fs::symlink_metadata(root.join(&anc)) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => ok = false,
                Err(_) => {
                    fs::create_dir(root.join(&anc)).unwrap();
                    dirs.push((anc, None));
                }
            }
            if !ok {
                break;
            }
        }
        if !ok || fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        let m = &e.meta;
        let (uid, gid) = OWNERS[m.owner];
        let (secs, nsec) = MTIMES[m.mtime];
        match &e.kind {
            LKind::Dir { opaque: o } => {
                fs::create_dir(&p).unwrap();
                if *o {
                    opaque(&p);
                }
                dirs.push((rel.clone(), Some(m)));
                continue;
            }
            LKind::Hardlink(n) => {
                if !files.is_empty() {
                    fs::hard_link(&files[n % files.len()], &p).unwrap();
                }
                continue;
            }
            LKind::Whiteout => {
                whiteout(&p);
                continue;
            }
            LKind::File { seed, len } => {
                write(&p, &support::pseudo_random(u64::from(*seed), usize::from(*len)));
                files.push(p.clone());
            }
            LKind::Symlink(t) => std::os::unix::fs::symlink(SYMLINK_TARGETS[*t], &p).unwrap(),
            LKind::Fifo => support::mknod(&p, libc::S_IFIFO, 0o644, 0, 0),
            LKind::CharDev => support::mknod(&p, libc::S_IFCHR, 0o666, 1, 3),
        }
        if let Some((name, value)) = layer_xattr(m, xattrs) {
            // `user.*` only on regular files and directories.
            if !name.starts_with("user.") || matches!(e.kind, LKind::File { .. }) {
                support::lsetxattr(&p, name, &value);
            }
        }
        support::lchown(&p, uid, gid);
        if !matches!(e.kind, LKind::Symlink(_)) {
            let perm = match e.kind {
                LKind::File { .. } => FILE_MODES[m.mode % FILE_MODES.len()],
                _ => [0o644, 0o600, 0o640][m.mode % 3],
            };
            support::chmod(&p, perm);
        }
        support::set_mtime(&p, secs, nsec);
    }
    // Directory metadata last (children change mtimes), deepest first.
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.matches('/').count()));
    for (rel, m) in dirs {
        let p = root.join(&rel);
        if let Some((name, value)) = m.filter(|_| dir_xattrs).and_then(|m| layer_xattr(m, xattrs)) {
            support::lsetxattr(&p, name, &value);
        }
        let (mode_bits, owner, mtime) = match m {
            Some(m) => (DIR_MODES[m.mode % DIR_MODES.len()], OWNERS[m.owner], MTIMES[m.mtime]),
            None => (0o755, (0, 0), (1_500_000_000, 0)),
        };
        support::lchown(&p, owner.0, owner.1);
        support::chmod(&p, mode_bits);
        support::set_mtime(&p, mtime.0, mtime.1);
    }
    support::set_mtime(root, 1_500_000_000, 0);
}

// ---------------------------------------------------------------------------------------
// Random operations

/// Which path an operation works on.
#[derive(Clone, Copy, Debug)]
pub enum Sel {
    /// The n-th (modulo) entry the target has right now, in sorted order.
    Existing(usize),
    /// The n-th (modulo) of [`op_paths`], which may or may not exist.
    Any(usize),
    /// The mounted root itself (only with [`OpMix::root`]).
    Root,
}

#[derive(Clone, Debug)]
pub enum Op {
    /// Create or truncate, then write.
    Write(Sel, u8, u16),
    /// Write at an offset without truncating.
    Overwrite(Sel, u8, u8),
    Append(Sel, u8),
    Truncate(Sel, u16),
    Chmod(Sel, usize),
    Chown(Sel, usize),
    Touch(Sel, usize),
    Rename(Sel, Sel),
    Unlink(Sel),
    Rmdir(Sel),
    RmRf(Sel),
    /// `rm -rf p && mkdir p`.
    Recreate(Sel),
    MkdirP(Sel),
    Symlink(Sel, usize),
    Hardlink(Sel, Sel),
    SetXattr(Sel, usize, u8),
    RemoveXattr(Sel, usize),
    Mkfifo(Sel),
    /// A character device (1, 3) (only with [`OpMix::mknod`]).
    Mknod(Sel),
}

/// Which operations [`op_strategy`] generates.
#[derive(Clone, Debug)]
pub struct OpMix {
    /// Also [`Sel::Root`] (1 in 51 paths; otherwise `Existing`:`Any` is 3:2 either way).
    pub root: bool,
    /// Also [`Op::Mknod`].
    pub mknod: bool,
    /// The length range of the larger half of [`Op::Write`]s (the other half is `0..64`).
    pub big_write: std::ops::Range<u16>,
}

pub fn op_strategy(mix: OpMix) -> impl Strategy<Value = Op> {
    let n = op_paths().len();
    let root = mix.root;
    let p = move || -> BoxedStrategy<Sel> {
        if root {
            prop_oneof![
                30 => any::<usize>().prop_map(Sel::Existing),
                20 => (0..n).prop_map(Sel::Any),
                1 => Just(Sel::Root),
            ]
            .boxed()
        } else {
            prop_oneof![3 => any::<usize>().prop_map(Sel::Existing), 2 => (0..n).prop_map(Sel::Any)].boxed()
        }
    };
    let big = mix.big_write;
    let mut ops: Vec<(u32, BoxedStrategy<Op>)> = vec![
        (3, (p(), any::<u8>(), prop_oneof![0..64u16, big]).prop_map(|(a, s, l)| Op::Write(a, s, l)).boxed()),
        (2, (p(), any::<u8>(), any::<u8>()).prop_map(|(a, s, o)| Op::Overwrite(a, s, o)).boxed()),
        (2, (p(), any::<u8>()).prop_map(|(a, s)| Op::Append(a, s)).boxed()),
        (1, (p(), 0..5000u16).prop_map(|(a, l)| Op::Truncate(a, l)).boxed()),
        (2, (p(), 0..16usize).prop_map(|(a, m)| Op::Chmod(a, m)).boxed()),
        (2, (p(), 0..OWNERS.len()).prop_map(|(a, o)| Op::Chown(a, o)).boxed()),
        (1, (p(), 0..MTIMES.len()).prop_map(|(a, t)| Op::Touch(a, t)).boxed()),
        (3, (p(), p()).prop_map(|(a, b)| Op::Rename(a, b)).boxed()),
        (2, p().prop_map(Op::Unlink).boxed()),
        (1, p().prop_map(Op::Rmdir).boxed()),
        (2, p().prop_map(Op::RmRf).boxed()),
        (2, p().prop_map(Op::Recreate).boxed()),
        (2, p().prop_map(Op::MkdirP).boxed()),
        (1, (p(), 0..SYMLINK_TARGETS.len()).prop_map(|(a, t)| Op::Symlink(a, t)).boxed()),
        (2, (p(), p()).prop_map(|(a, b)| Op::Hardlink(a, b)).boxed()),
        (2, (p(), 0..8usize, any::<u8>()).prop_map(|(a, x, v)| Op::SetXattr(a, x, v)).boxed()),
        (1, (p(), 0..8usize).prop_map(|(a, x)| Op::RemoveXattr(a, x)).boxed()),
        (1, p().prop_map(Op::Mkfifo).boxed()),
    ];
    if mix.mknod {
        ops.push((1, p().prop_map(Op::Mknod).boxed()));
    }
    Union::new_weighted(ops)
}

/// `root/rel` when no existing ancestor of it is anything but a real directory, so no
/// operation ever follows a symlink (lower symlinks point anywhere).
pub fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let comps: Vec<&str> = rel.split('/').collect();
    for i in 1..comps.len() {
        match fs::symlink_metadata(root.join(comps[..i].join("/"))) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return None,
            Err(_) => break,
        }
    }
    Some(root.join(rel))
}

pub fn lstat(p: &Path) -> Option<fs::Metadata> {
    fs::symlink_metadata(p).ok()
}

/// Opens a regular file (never a fifo, device or symlink) for writing.
pub fn open_reg(p: &Path, create: bool, truncate: bool, append: bool) -> Option<fs::File> {
    match lstat(p) {
        Some(m) if m.is_file() => {}
        None if create => {}
        _ => return None,
    }
    let mut o = fs::OpenOptions::new();
    o.write(true).create(create).truncate(truncate).append(append);
    o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).mode(0o644);
    o.open(p).ok()
}

/// The xattrs [`Op::SetXattr`] and [`Op::RemoveXattr`] use (each picks the n-th,
/// modulo), and whether they touch directories.
pub struct XattrPolicy<'a> {
    pub set: &'a [&'a str],
    pub remove: &'a [&'a str],
    pub set_on_dirs: bool,
    pub remove_on_dirs: bool,
}

/// Applies `op` to the tree at `t`, best effort: an operation that does not apply
/// (missing path, wrong type, a directory rename overlay refuses) does nothing. What
/// removes or replaces an entry never applies to `t` itself.
pub fn apply(t: &Path, op: &Op, xattrs: &XattrPolicy) {
    let paths = op_paths();
    let at = |sel: &Sel| match *sel {
        Sel::Any(i) => inside(t, &paths[i % paths.len()]),
        Sel::Existing(i) => {
            // Found by walking real directories only: never under a symlink.
            let names: Vec<Vec<u8>> = view(t).into_keys().filter(|k| k != b".").collect();
            (!names.is_empty()).then(|| support::at(t, &names[i % names.len()]))
        }
        Sel::Root => Some(t.to_path_buf()),
    };
    let at_nonroot = |sel: &Sel| at(sel).filter(|p| p != t);
    let is_dir = |p: &Path| lstat(p).is_some_and(|m| m.is_dir());
    match op {
        Op::Write(i, seed, len) => {
            if let Some(mut f) = at(i).and_then(|p| open_reg(&p, true, true, false)) {
                let _ = f.write_all(&support::pseudo_random(u64::from(*seed) + 1000, usize::from(*len)));
            }
        }
        Op::Overwrite(i, seed, off) => {
            if let Some(mut f) = at(i).and_then(|p| open_reg(&p, false, false, false)) {
                let _ = f.seek(SeekFrom::Start(u64::from(*off)));
                let _ = f.write_all(&support::pseudo_random(u64::from(*seed) + 2000, 17));
            }
        }
        Op::Append(i, seed) => {
            if let Some(mut f) = at(i).and_then(|p| open_reg(&p, false, false, true)) {
                let _ = f.write_all(&support::pseudo_random(u64::from(*seed) + 3000, 33));
            }
        }
        Op::Truncate(i, len) => {
            if let Some(f) = at(i).and_then(|p| open_reg(&p, false, false, false)) {
                let _ = f.set_len(u64::from(*len));
            }
        }
        Op::Chmod(i, m) => {
            if let Some(p) = at(i) {
                if let Some(md) = lstat(&p).filter(|md| !md.file_type().is_symlink()) {
                    let bits =
                        if md.is_dir() { DIR_MODES[m % DIR_MODES.len()] } else { FILE_MODES[m % FILE_MODES.len()] };
                    let _ = fs::set_permissions(&p, fs::Permissions::from_mode(bits));
                }
            }
        }
        Op::Chown(i, o) => {
            if let Some(p) = at(i) {
                let _ = std::os::unix::fs::lchown(&p, Some(OWNERS[*o].0), Some(OWNERS[*o].1));
            }
        }
        Op::Touch(i, m) => {
            if let Some(p) = at(i) {
                let _ = try_set_mtime(&p, MTIMES[*m].0, MTIMES[*m].1);
            }
        }
        Op::Rename(a, b) => {
            if let (Some(a), Some(b)) = (at_nonroot(a), at_nonroot(b)) {
                let _ = fs::rename(a, b);
            }
        }
        Op::Unlink(i) => {
            if let Some(p) = at_nonroot(i).filter(|p| !is_dir(p)) {
                let _ = fs::remove_file(p);
            }
        }
        Op::Rmdir(i) => {
            if let Some(p) = at_nonroot(i) {
                let _ = fs::remove_dir(p);
            }
        }
        Op::RmRf(i) | Op::Recreate(i) => {
            if let Some(p) = at_nonroot(i) {
                let _ = if is_dir(&p) { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
                if matches!(op, Op::Recreate(_)) {
                    let _ = fs::create_dir(&p);
                }
            }
        }
        Op::MkdirP(i) => {
            if let Some(p) = at(i) {
                let _ = fs::create_dir_all(p);
            }
        }
        Op::Symlink(i, tg) => {
            if let Some(p) = at(i) {
                let _ = std::os::unix::fs::symlink(SYMLINK_TARGETS[*tg], p);
            }
        }
        Op::Hardlink(a, b) => {
            if let (Some(a), Some(b)) = (at(a), at(b)) {
                let _ = fs::hard_link(a, b);
            }
        }
        Op::SetXattr(i, x, v) => {
            if let Some(p) = at(i).filter(|p| xattrs.set_on_dirs || !is_dir(p)) {
                let name = xattrs.set[x % xattrs.set.len()];
                let value = if name == "trusted.overlay.opaque" { vec![b'y'] } else { vec![b'o', *v] };
                let _ = try_lsetxattr(&p, name, &value);
            }
        }
        Op::RemoveXattr(i, x) => {
            if let Some(p) = at(i).filter(|p| xattrs.remove_on_dirs || !is_dir(p)) {
                let _ = try_lremovexattr(&p, xattrs.remove[x % xattrs.remove.len()]);
            }
        }
        Op::Mkfifo(i) => {
            if let Some(p) = at(i) {
                let _ = try_mknod(&p, libc::S_IFIFO, 0o640, 0, 0);
            }
        }
        Op::Mknod(i) => {
            if let Some(p) = at(i) {
                let _ = try_mknod(&p, libc::S_IFCHR, 0o620, 1, 3);
            }
        }
    }
}
