//! Helpers shared by the integration tests (`mod support;`): a small tar writer over the
//! `tar` crate with full control of the encoding (GNU or ustar+PAX), compression, tree
//! snapshots (lstat + xattrs), the skip policy for tests that need root or an external
//! tool, and temp dirs and executable copies another uid can reach ([`tempdir`],
//! [`shared_current_exe`]).
#![allow(dead_code)] // each test crate uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------------------
// Skip policy

/// Skip a test (returns) with a message, unless `CI` is set, in which case fail loudly.
pub fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("required test environment missing under CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `true` when running as root; otherwise reports the skip.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(&format!("{test} needs root"));
    false
}

/// Whether `tool` is on `PATH`.
pub fn have_tool(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&path).any(|d| {
        let p = d.join(tool);
        std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
    })
}

/// `true` when every tool is installed; otherwise reports the skip.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    skip(&format!("{test} needs {}", missing.join(", ")));
    false
}

/// Run a command, panicking with its output on failure. Returns stdout.
pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Copy tag `t` of the OCI layout `src` into a new layout `dst`, every layer recompressed
/// as zstd:chunked by `skopeo copy` (killed after 120 s: skopeo has been seen to hang on
/// such conversions). Panics with skopeo's output on failure.
pub fn zstd_chunked_copy(src: &Path, dst: &Path) {
    run(Command::new("timeout")
        .args(["120", "skopeo", "copy", "--quiet", "--dest-compress-format", "zstd:chunked"])
        .arg(format!("oci:{}:t", src.display()))
        .arg(format!("oci:{}:t", dst.display())));
}

/// A temporary directory whose root is traversable by everyone (tempfile makes it 0700),
/// for tests that hand paths to another uid.
///
/// It is made under `std::env::temp_dir()` (`$TMPDIR`, else `/tmp`), never inside the
/// checkout: a checkout (and its `target/`) may sit under a 0700 directory such as
/// `/root`, which another uid cannot traverse. Tests that run a child as another user
/// check the location with [`assert_reachable_by_others`] (through [`shared_exe`]).
pub fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("rootfs-cache-test").tempdir().expect("tempdir");
    chmod(d.path(), 0o755);
    d
}

/// Panics unless other users can search every directory from `/` down to `dir` (mode
/// `o+x`): a child running as nobody must reach it. ACLs and group bits are not
/// consulted; nobody is in no group of ours.
pub fn assert_reachable_by_others(dir: &Path) {
    for a in dir.ancestors() {
        let mode = std::fs::metadata(a).unwrap_or_else(|e| panic!("stat {}: {e}", a.display())).mode();
        assert!(
            mode & 0o001 != 0,
            "{} (mode {:o}) cannot be searched by other users, so a child running as another uid \
             cannot reach {}; set TMPDIR to a world-traversable directory such as /tmp",
            a.display(),
            mode & 0o7777,
            dir.display()
        );
    }
}

/// A copy of an executable that any user can run: a 0755 file in a fresh 0755 temp
/// directory, removed (with the directory) on drop.
///
/// Tests re-execute their own binary as an unprivileged user (`setpriv --reuid=65534
/// ... unshare -Urm -- EXE`). A checkout under a 0700 directory (root's clones under
/// `/root`) keeps `target/` out of that user's reach, and the exec fails with
/// "Permission denied"; the copy does not depend on where the checkout is. Keep the
/// guard alive until the child has exited.
pub struct SharedExe {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SharedExe {
    /// The copy.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A [`SharedExe`] copy of `exe`.
pub fn shared_exe(exe: &Path) -> SharedExe {
    let dir = tempdir();
    assert_reachable_by_others(dir.path());
    let path = dir.path().join(exe.file_name().expect("an executable's file name"));
    // Copied by another process: a write descriptor of ours, inherited by a child that
    // another test thread forks meanwhile, would make the exec fail with ETXTBSY.
    run(Command::new("cp").arg("--").arg(exe).arg(&path));
    chmod(&path, 0o755);
    SharedExe { path, _dir: dir }
}

/// A [`SharedExe`] copy of this test binary, for a child run as another user.
pub fn shared_current_exe() -> SharedExe {
    shared_exe(&std::env::current_exe().expect("current_exe"))
}

// ---------------------------------------------------------------------------------------
// Hashing and compression

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64*), with some runs so compressors have
/// something to do.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed ^ 0x9e37_79b9_7f4a_7c15;
    if s == 0 {
        s = 1;
    }
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d);
        if v % 7 == 0 {
            let run = (v >> 8) as usize % 64;
            out.extend(std::iter::repeat_n((v >> 16) as u8, run.min(len - out.len())));
        } else {
            for b in v.to_le_bytes() {
                if out.len() < len {
                    out.push(b);
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Tar writing

/// What an archive entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EKind {
    File(Vec<u8>),
    Dir,
    Symlink(Vec<u8>),
    /// Hardlink to the given archive path.
    Hardlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One archive entry, with every field we want to control.
#[derive(Clone, Debug)]
pub struct Ent {
    pub path: Vec<u8>,
    pub kind: EKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    pub mtime_ns: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

pub const DEFAULT_MTIME: i64 = 1_600_000_000;

impl Ent {
    fn new(path: &str, kind: EKind, mode: u32) -> Ent {
        Ent {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            mtime_ns: 0,
            xattrs: Vec::new(),
        }
    }
    pub fn file(path: &str, content: impl AsRef<[u8]>) -> Ent {
        Ent::new(path, EKind::File(content.as_ref().to_vec()), 0o644)
    }
    pub fn dir(path: &str) -> Ent {
        Ent::new(path, EKind::Dir, 0o755)
    }
    pub fn symlink(path: &str, target: &str) -> Ent {
        Ent::new(path, EKind::Symlink(target.as_bytes().to_vec()), 0o777)
    }
    pub fn hardlink(path: &str, target: &str) -> Ent {
        Ent::new(path, EKind::Hardlink(target.as_bytes().to_vec()), 0o644)
    }
    pub fn fifo(path: &str) -> Ent {
        Ent::new(path, EKind::Fifo, 0o644)
    }
    pub fn char_dev(path: &str, major: u32, minor: u32) -> Ent {
        Ent::new(path, EKind::Char(major, minor), 0o666)
    }
    pub fn block_dev(path: &str, major: u32, minor: u32) -> Ent {
        Ent::new(path, EKind::Block(major, minor), 0o660)
    }
    /// An OCI whiteout for `path` (`dir/.wh.name`).
    pub fn whiteout(path: &str) -> Ent {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        Ent::file(&format!("{dir}.wh.{name}"), b"").mode(0o600)
    }
    /// An OCI opaque marker for directory `dir` (`""` for the root).
    pub fn opaque(dir: &str) -> Ent {
        let p = if dir.is_empty() { ".wh..wh..opq".to_string() } else { format!("{dir}/.wh..wh..opq") };
        Ent::file(&p, b"").mode(0o600)
    }
    pub fn mode(mut self, mode: u32) -> Ent {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Ent {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, secs: i64, nsec: u32) -> Ent {
        self.mtime = secs;
        self.mtime_ns = nsec;
        self
    }
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Ent {
        self.xattrs.push((name.to_string(), value.as_ref().to_vec()));
        self
    }
    pub fn raw_path(mut self, path: Vec<u8>) -> Ent {
        self.path = path;
        self
    }
}

/// Header encoding of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fmt {
    /// GNU header: `L`/`K` long names, base-256 numbers (negative mtimes too); a PAX
    /// header only for what GNU cannot express (sub-second mtimes, xattrs).
    Gnu,
    /// ustar header (prefix field when a path fits it), PAX records for the rest.
    Pax,
}

/// PAX time for (seconds, nanoseconds), seconds possibly negative.
pub fn pax_time(secs: i64, nsec: u32) -> String {
    if nsec == 0 {
        secs.to_string()
    } else if secs >= 0 {
        format!("{secs}.{nsec:09}")
    } else {
        // (secs, nsec) is secs + nsec/1e9, e.g. (-2, 5e8) = -1.5.
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nsec)
    }
}

fn gnu_long(b: &mut tar::Builder<Vec<u8>>, typ: u8, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_mode(0o644);
    h.set_size(data.len() as u64 + 1);
    h.set_entry_type(tar::EntryType::new(typ));
    h.set_cksum();
    let mut payload = data.to_vec();
    payload.push(0);
    b.append(&h, &payload[..]).unwrap();
}

fn put(field: &mut [u8], data: &[u8]) {
    let n = data.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&data[..n]);
}

/// Append `e` to `b` encoded as `fmt`.
pub fn append(b: &mut tar::Builder<Vec<u8>>, e: &Ent, fmt: Fmt) {
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut h = match fmt {
        Fmt::Gnu => tar::Header::new_gnu(),
        Fmt::Pax => tar::Header::new_ustar(),
    };
    let (typ, data, link): (tar::EntryType, &[u8], Option<&[u8]>) = match &e.kind {
        EKind::File(c) => (tar::EntryType::Regular, c, None),
        EKind::Dir => (tar::EntryType::Directory, b"", None),
        EKind::Symlink(t) => (tar::EntryType::Symlink, b"", Some(t)),
        EKind::Hardlink(t) => (tar::EntryType::Link, b"", Some(t)),
        EKind::Char(..) => (tar::EntryType::Char, b"", None),
        EKind::Block(..) => (tar::EntryType::Block, b"", None),
        EKind::Fifo => (tar::EntryType::Fifo, b"", None),
    };
    h.set_entry_type(typ);
    h.set_mode(e.mode);
    h.set_size(data.len() as u64);
    if let EKind::Char(ma, mi) | EKind::Block(ma, mi) = e.kind {
        h.set_device_major(ma).unwrap();
        h.set_device_minor(mi).unwrap();
    }
    // Owner.
    for (v, key, is_uid) in [(e.uid, "uid", true), (e.gid, "gid", false)] {
        let fits_octal = v < 0o7777777;
        let v = if fmt == Fmt::Pax && !fits_octal {
            pax.push((key.into(), v.to_string().into_bytes()));
            0
        } else {
            v // GNU: base-256 above 2097151 (done by the tar crate)
        };
        if is_uid { h.set_uid(v) } else { h.set_gid(v) }
    }
    // Time.
    let octal_ok = (0..0o77777777777).contains(&e.mtime);
    if e.mtime_ns != 0 || (fmt == Fmt::Pax && !octal_ok) {
        pax.push(("mtime".into(), pax_time(e.mtime, e.mtime_ns).into_bytes()));
        h.set_mtime(e.mtime.clamp(0, 0o77777777777) as u64);
    } else if e.mtime < 0 {
        // GNU base-256, two's complement over the 12-byte field.
        let mut f = [0xffu8; 12];
        f[4..].copy_from_slice(&e.mtime.to_be_bytes());
        h.as_old_mut().mtime = f;
    } else {
        h.set_mtime(e.mtime as u64);
    }
    for (k, v) in &e.xattrs {
        pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
    }
    // Names.
    let mut path = e.path.clone();
    if fmt == Fmt::Gnu && e.kind == EKind::Dir && !path.ends_with(b"/") {
        path.push(b'/'); // as GNU tar writes directories
    }
    let mut long_name = None;
    let mut long_link = None;
    match fmt {
        Fmt::Gnu => {
            if path.len() > 100 {
                long_name = Some(path.clone());
            }
            put(&mut h.as_old_mut().name, &path);
            if let Some(l) = link {
                if l.len() > 100 {
                    long_link = Some(l.to_vec());
                }
                put(&mut h.as_old_mut().linkname, l);
            }
        }
        Fmt::Pax => {
            let split = (path.len() > 100)
                .then(|| {
                    (0..path.len()).rev().find(|&i| {
                        path[i] == b'/' && i <= 155 && path.len() - i - 1 <= 100 && i > 0 && i + 1 < path.len()
                    })
                })
                .flatten();
            let u = h.as_ustar_mut().unwrap();
            if path.len() <= 100 {
                put(&mut u.name, &path);
            } else if let Some(i) = split {
                put(&mut u.prefix, &path[..i]);
                put(&mut u.name, &path[i + 1..]);
            } else {
                pax.push(("path".into(), path.clone()));
                put(&mut u.name, &path);
            }
            if let Some(l) = link {
                if l.len() > 100 {
                    pax.push(("linkpath".into(), l.to_vec()));
                }
                put(&mut h.as_old_mut().linkname, l);
            }
        }
    }
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), &v[..]))).unwrap();
    }
    if let Some(l) = long_link {
        gnu_long(b, b'K', &l);
    }
    if let Some(n) = long_name {
        gnu_long(b, b'L', &n);
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

/// A complete archive of `entries`, all encoded as `fmt`.
pub fn tar_of(entries: &[Ent], fmt: Fmt) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        append(&mut b, e, fmt);
    }
    b.into_inner().unwrap()
}

// ---------------------------------------------------------------------------------------
// Reading trees back

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// All xattrs of `p` (not following a final symlink).
pub fn lxattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c = cpath(p);
    let mut out = BTreeMap::new();
    // SAFETY: c is NUL-terminated; a null buffer of size 0 asks for the size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), std::io::Error::last_os_error());
    let mut names = vec![0u8; n as usize];
    // SAFETY: names is a writable buffer of its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), std::io::Error::last_os_error());
    names.truncate(n as usize);
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let v = lgetxattr(p, name).unwrap_or_else(|| panic!("xattr vanished on {}", p.display()));
        out.insert(name.to_vec(), v);
    }
    out
}

/// One xattr of `p` (not following a final symlink), `None` when absent.
pub fn lgetxattr(p: &Path, name: &[u8]) -> Option<Vec<u8>> {
    let c = cpath(p);
    let cn = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings; size query with a null buffer.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "lgetxattr {}: {e}", p.display());
        return None;
    }
    let mut v = vec![0u8; n as usize];
    // SAFETY: v is a writable buffer of its length.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    assert!(n >= 0, "lgetxattr {}: {}", p.display(), std::io::Error::last_os_error());
    v.truncate(n as usize);
    Some(v)
}

/// Set an xattr on `p` without following a final symlink.
pub fn lsetxattr(p: &Path, name: &str, value: &[u8]) {
    let c = cpath(p);
    let cn = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings, value valid for its length.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), cn.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "lsetxattr {} {name}: {}", p.display(), std::io::Error::last_os_error());
}

/// Set atime and mtime of `p` (not following a final symlink).
pub fn set_mtime(p: &Path, secs: i64, nsec: u32) {
    let c = cpath(p);
    let ts = libc::timespec { tv_sec: secs, tv_nsec: i64::from(nsec) };
    let times = [ts, ts];
    // SAFETY: valid path and a two-element timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(r, 0, "utimensat {}: {}", p.display(), std::io::Error::last_os_error());
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
}

pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub fn mknod(p: &Path, kind: libc::mode_t, perm: u32, major: u32, minor: u32) {
    let c = cpath(p);
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | perm, libc::makedev(major, minor)) };
    assert_eq!(r, 0, "mknod {}: {}", p.display(), std::io::Error::last_os_error());
}

/// File type, as `find -printf %y` letters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ty {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

/// Everything we compare about one file system object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub ty: Ty,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    /// sha256 of a regular file's content.
    pub sha: Option<String>,
    pub link: Option<Vec<u8>>,
    pub rdev: Option<(u32, u32)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub ino: u64,
    pub nlink: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
}

/// lstat + content hash + xattrs of one path.
pub fn node(p: &Path) -> Node {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    let ty = if ft.is_file() {
        Ty::File
    } else if ft.is_dir() {
        Ty::Dir
    } else if ft.is_symlink() {
        Ty::Symlink
    } else if ft.is_fifo() {
        Ty::Fifo
    } else if ft.is_char_device() {
        Ty::Char
    } else if ft.is_block_device() {
        Ty::Block
    } else {
        Ty::Socket
    };
    let sha =
        (ty == Ty::File).then(|| sha256_hex(&std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))));
    let link = (ty == Ty::Symlink).then(|| std::fs::read_link(p).unwrap().as_os_str().as_bytes().to_vec());
    let rdev = matches!(ty, Ty::Char | Ty::Block).then(|| (libc::major(m.rdev()), libc::minor(m.rdev())));
    Node {
        ty,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        sha,
        link,
        rdev,
        xattrs: lxattrs(p),
        ino: m.ino(),
        nlink: m.nlink(),
        blocks: m.blocks(),
    }
}

/// Every object under `root` (excluding `root` itself), keyed by relative path.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<Vec<u8>, Node>) {
        let dir = root.join(rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let nd = node(&root.join(&r));
            let is_dir = nd.ty == Ty::Dir;
            out.insert(r.as_os_str().as_bytes().to_vec(), nd);
            if is_dir {
                walk(root, &r, out);
            }
        }
    }
    walk(root, Path::new(""), &mut out);
    out
}

/// Groups (size ≥ 2) of paths that share an inode.
pub fn hardlink_groups(snap: &BTreeMap<Vec<u8>, Node>) -> BTreeSet<BTreeSet<Vec<u8>>> {
    let mut by_ino: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (p, n) in snap {
        if n.ty != Ty::Dir {
            by_ino.entry(n.ino).or_default().insert(p.clone());
        }
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

/// What [`diff_trees`] compares beyond type, content, link target and device numbers.
#[derive(Clone, Debug, Default)]
pub struct Cmp {
    pub mode: bool,
    pub owner: bool,
    pub xattrs: bool,
    /// mtimes of non-directories.
    pub mtime: bool,
    pub dir_mtime: bool,
    /// Compare nanoseconds too (else seconds only).
    pub mtime_nsec: bool,
    pub hardlinks: bool,
    /// Xattr names ignored on both sides.
    pub ignore_xattrs: Vec<Vec<u8>>,
}

impl Cmp {
    /// Everything: mode, owner, xattrs, file and directory mtimes to the nanosecond
    /// (hardlink groups not compared).
    pub fn strict() -> Cmp {
        Cmp {
            mode: true,
            owner: true,
            xattrs: true,
            mtime: true,
            dir_mtime: true,
            mtime_nsec: true,
            hardlinks: false,
            ignore_xattrs: Vec::new(),
        }
    }
}

pub fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Differences between two snapshots, one line each (empty when equal).
pub fn diff_trees(a: &BTreeMap<Vec<u8>, Node>, b: &BTreeMap<Vec<u8>, Node>, c: &Cmp) -> Vec<String> {
    let mut d = Vec::new();
    for p in a.keys().filter(|p| !b.contains_key(*p)) {
        d.push(format!("only in expected: {}", show(p)));
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        d.push(format!("only in actual: {}", show(p)));
    }
    for (p, x) in a {
        let Some(y) = b.get(p) else { continue };
        d.extend(diff_nodes(&show(p), x, y, c));
    }
    if c.hardlinks {
        let (ga, gb) = (hardlink_groups(a), hardlink_groups(b));
        if ga != gb {
            let f = |g: &BTreeSet<BTreeSet<Vec<u8>>>| -> Vec<Vec<String>> {
                g.iter().map(|s| s.iter().map(|p| show(p)).collect()).collect()
            };
            d.push(format!("hardlink groups differ: expected {:?}, actual {:?}", f(&ga), f(&gb)));
        }
    }
    d
}

pub fn diff_nodes(p: &str, x: &Node, y: &Node, c: &Cmp) -> Vec<String> {
    let mut d = Vec::new();
    let mut check = |what: &str, l: String, r: String| {
        if l != r {
            d.push(format!("{p}: {what} expected {l}, actual {r}"));
        }
    };
    check("type", format!("{:?}", x.ty), format!("{:?}", y.ty));
    if x.ty != y.ty {
        return d;
    }
    check("content", format!("{:?}", x.sha), format!("{:?}", y.sha));
    check("link", format!("{:?}", x.link.as_deref().map(show)), format!("{:?}", y.link.as_deref().map(show)));
    check("rdev", format!("{:?}", x.rdev), format!("{:?}", y.rdev));
    if x.ty == Ty::File {
        check("size", x.size.to_string(), y.size.to_string());
    }
    if c.mode && x.ty != Ty::Symlink {
        check("mode", format!("{:o}", x.mode), format!("{:o}", y.mode));
    }
    if c.owner {
        check("owner", format!("{}:{}", x.uid, x.gid), format!("{}:{}", y.uid, y.gid));
    }
    if c.xattrs {
        let f = |m: &BTreeMap<Vec<u8>, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
            m.iter().filter(|(k, _)| !c.ignore_xattrs.contains(k)).map(|(k, v)| (show(k), v.clone())).collect()
        };
        check("xattrs", format!("{:?}", f(&x.xattrs)), format!("{:?}", f(&y.xattrs)));
    }
    let want_mtime = if x.ty == Ty::Dir { c.dir_mtime } else { c.mtime };
    if want_mtime {
        let f = |t: (i64, i64)| if c.mtime_nsec { format!("{}.{:09}", t.0, t.1) } else { t.0.to_string() };
        check("mtime", f(x.mtime), f(y.mtime));
    }
    d
}

/// Panic with a readable report when `diffs` is not empty.
pub fn assert_no_diffs(what: &str, diffs: &[String]) {
    if !diffs.is_empty() {
        let shown: Vec<&String> = diffs.iter().take(60).collect();
        panic!(
            "{what}: {} differences:\n  {}",
            diffs.len(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
        );
    }
}

/// The path of `rel` under `root`, from raw bytes.
pub fn at(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(std::ffi::OsStr::from_bytes(rel))
}
