//! Applies parsed tar entries to a destination directory, by file descriptor.
//!
//! Syscall budget for the common case (a regular file whose parent was seen before, as
//! root, owner 0:0, mode without special bits): `openat`, `write`(s), `futimens`,
//! `close`. Parent directory descriptors are cached by path; ownership and mode are only
//! changed when they differ from what creation already produced; directory metadata
//! and mtimes are applied once, after every entry (creating children changes a
//! directory's mtime, and a read-only directory mode would stop an unprivileged
//! extraction from filling it).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};

use super::tar::{Header, Kind};
use super::whiteout::{self, Name};
use super::{DeviceNodes, UnpackOptions, WhiteoutMode};
use crate::error::{Error, Result};
use crate::root::{Root, escape, join, split_path};
use crate::sys;

/// Entry counts gathered while extracting.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counts {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub special: u64,
    pub whiteouts: u64,
    pub file_bytes: u64,
    pub skipped_devices: u64,
    pub skipped_xattrs: u64,
}

/// A regular file created by the [`Extractor`], for the [`Writer`] to fill.
pub(crate) struct OpenFile {
    file: File,
    hdr: Box<Header>,
    path: PathBuf,
}

/// A regular file being written.
struct Current {
    file: File,
    hdr: Box<Header>,
    path: PathBuf,
    /// Bytes of archive data consumed so far (for sparse files, position in the map).
    consumed: u64,
    seg: usize,
}

/// Directory metadata applied after all entries.
struct DirMeta {
    path: Vec<u8>,
    hdr: Box<Header>,
    /// The mode the directory was created with (before umask), or `None` if it existed.
    created_mode: Option<u32>,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
const FILE_FLAGS: OFlag =
    OFlag::O_WRONLY.union(OFlag::O_CREAT).union(OFlag::O_EXCL).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
/// Mode of parent directories the archive did not list (see DESIGN.md rule 3: they are
/// only ever created when missing, never applied over an existing directory).
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// Bound on cached directory descriptors. With the pipeline's bound on open files, an
/// extraction holds under 200 descriptors, well within the common 1024 limit.
const DIR_CACHE: usize = 64;

/// Creates entries (directories, links, special files, empty regular files) by
/// descriptor. Regular files are handed to a [`Writer`] as [`OpenFile`]s.
pub(crate) struct Extractor<'a> {
    root: &'a Root,
    opts: &'a UnpackOptions,
    dirs: HashMap<Vec<u8>, Rc<OwnedFd>>,
    deferred: Vec<DirMeta>,
    /// Paths this layer created (Apply mode): whiteouts never remove them.
    added: Option<HashSet<Vec<u8>>>,
    pub counts: Counts,
    meta: MetaPolicy,
}

/// Who we are and what the options allow, for applying entry metadata. `Copy`, so the
/// writer thread has its own.
#[derive(Clone, Copy)]
pub(crate) struct MetaPolicy {
    chown: bool,
    ignore_xattr_errors: bool,
    euid: u32,
    egid: u32,
    umask: u32,
}

impl MetaPolicy {
    pub(crate) fn new(opts: &UnpackOptions) -> Self {
        MetaPolicy {
            chown: opts.chown,
            ignore_xattr_errors: opts.ignore_xattr_errors,
            euid: nix::unistd::geteuid().as_raw(),
            egid: nix::unistd::getegid().as_raw(),
            umask: sys::umask(),
        }
    }

    /// Whether `h`'s owner differs from what creation gave the entry.
    fn needs_chown(&self, h: &Header) -> Result<Option<(Uid, Gid)>> {
        let uid = to_id(h.uid, "uid", h)?;
        let gid = to_id(h.gid, "gid", h)?;
        Ok((self.chown && (uid != self.euid || gid != self.egid)).then(|| (Uid::from_raw(uid), Gid::from_raw(gid))))
    }

    /// Ownership, mode, xattrs and times on an open file or directory, in the order the
    /// kernel requires: `fchown` clears setuid/setgid and file capabilities, so it comes
    /// before `fchmod` and `fsetxattr`; times last.
    fn apply_fd(
        &self,
        fd: BorrowedFd<'_>,
        h: &Header,
        created_mode: Option<u32>,
        path: &std::path::Path,
        xattrs: bool,
        skipped: &mut u64,
    ) -> Result<()> {
        let owner = self.needs_chown(h)?;
        if let Some((uid, gid)) = owner {
            fchown(fd, Some(uid), Some(gid)).map_err(|e| Error::io("fchown", path, e))?;
        }
        let need_chmod = match created_mode {
            Some(m) => (m & !self.umask & 0o777) != h.mode || (owner.is_some() && h.mode & 0o6000 != 0),
            None => true,
        };
        if need_chmod {
            fchmod(fd, Mode::from_bits_truncate(h.mode)).map_err(|e| Error::io("fchmod", path, e))?;
        }
        if xattrs {
            for (k, v) in &h.xattrs {
                let k = whiteout::escape_xattr(k);
                if let Err(e) = sys::fsetxattr(fd, &k, v) {
                    self.xattr_error(e, path, skipped)?;
                }
            }
        }
        let t = mtime(h);
        futimens(fd, &t, &t).map_err(|e| Error::io("futimens", path, e))?;
        Ok(())
    }

    fn xattr_error(&self, e: std::io::Error, path: &std::path::Path, skipped: &mut u64) -> Result<()> {
        let tolerable = matches!(
            Errno::from_raw(e.raw_os_error().unwrap_or(0)),
            Errno::EPERM | Errno::EOPNOTSUPP | Errno::EACCES | Errno::EINVAL
        );
        if self.ignore_xattr_errors && tolerable {
            *skipped += 1;
            Ok(())
        } else {
            Err(Error::io("fsetxattr", path, e))
        }
    }
}

/// Writes regular files' data, then their metadata, and closes them. Runs on its own
/// thread in pipelined mode, so file data copies overlap entry creation.
pub(crate) struct Writer {
    meta: MetaPolicy,
    current: Option<Current>,
    /// Xattrs skipped under [`UnpackOptions::ignore_xattr_errors`].
    pub skipped_xattrs: u64,
}

impl Writer {
    pub(crate) fn new(opts: &UnpackOptions) -> Self {
        Writer { meta: MetaPolicy::new(opts), current: None, skipped_xattrs: 0 }
    }

    /// Start writing `f` (finishing the previous file).
    pub(crate) fn open(&mut self, f: OpenFile) -> Result<()> {
        self.close()?;
        self.current = Some(Current { file: f.file, hdr: f.hdr, path: f.path, consumed: 0, seg: 0 });
        Ok(())
    }

    /// Data for the current regular file; ignored when there is none (the data of an
    /// entry that was skipped, such as a whiteout with content).
    pub(crate) fn data(&mut self, buf: &[u8]) -> Result<()> {
        let Some(cur) = &mut self.current else {
            return Ok(());
        };
        match &cur.hdr.sparse {
            None => cur.file.write_all(buf).map_err(|e| Error::io("write", &cur.path, e))?,
            Some((map, _)) => {
                let mut buf = buf;
                while !buf.is_empty() {
                    // Position of `consumed` inside the map.
                    let Some(&(off, len)) = map.get(cur.seg) else {
                        return Err(Error::InvalidArchive {
                            offset: cur.hdr.offset,
                            reason: "sparse data beyond its map".into(),
                        });
                    };
                    let done_before: u64 = map[..cur.seg].iter().map(|s| s.1).sum();
                    let into = cur.consumed - done_before;
                    let n = (len - into).min(buf.len() as u64) as usize;
                    cur.file.write_all_at(&buf[..n], off + into).map_err(|e| Error::io("pwrite", &cur.path, e))?;
                    cur.consumed += n as u64;
                    buf = &buf[n..];
                    if cur.consumed - done_before == len {
                        cur.seg += 1;
                    }
                }
                return Ok(());
            }
        }
        cur.consumed += buf.len() as u64;
        Ok(())
    }

    /// Finish the current file: size (sparse), owner, mode, xattrs, times; close.
    pub(crate) fn close(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else { return Ok(()) };
        if let Some((_, real)) = &cur.hdr.sparse {
            cur.file.set_len(*real).map_err(|e| Error::io("ftruncate", &cur.path, e))?;
        }
        self.meta.apply_fd(cur.file.as_fd(), &cur.hdr, Some(cur.hdr.mode), &cur.path, true, &mut self.skipped_xattrs)
    }
}

fn to_id(v: u64, what: &str, h: &Header) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::InvalidArchive {
        offset: h.offset,
        reason: format!("{what} {v} out of range for {:?}", String::from_utf8_lossy(&h.path)),
    })
}

fn mtime(h: &Header) -> TimeSpec {
    TimeSpec::new(h.mtime, i64::from(h.mtime_nsec))
}

impl<'a> Extractor<'a> {
    pub(crate) fn new(root: &'a Root, opts: &'a UnpackOptions) -> Self {
        Extractor {
            root,
            opts,
            dirs: HashMap::new(),
            deferred: Vec::new(),
            added: (opts.whiteouts == WhiteoutMode::Apply).then(HashSet::new),
            counts: Counts::default(),
            meta: MetaPolicy::new(opts),
        }
    }

    /// The cached descriptor of the directory at `comps`, creating missing ones when
    /// `create` (with [`IMPLICIT_DIR_MODE`]).
    fn dir(&mut self, comps: &[&[u8]], create: bool, entry: &[u8]) -> Result<Option<Rc<OwnedFd>>> {
        let key = join(comps);
        if let Some(fd) = self.dirs.get(&key) {
            return Ok(Some(fd.clone()));
        }
        let Some(fd) = self.root.open_dir(comps, create.then_some(IMPLICIT_DIR_MODE), entry)? else {
            return Ok(None);
        };
        if self.dirs.len() >= DIR_CACHE {
            self.dirs.clear();
        }
        let fd = Rc::new(fd);
        self.dirs.insert(key, fd.clone());
        Ok(Some(fd))
    }

    /// Forget cached descriptors at or under `path` (it is about to be removed or replaced).
    fn invalidate(&mut self, path: &[u8]) {
        if path.is_empty() {
            self.dirs.clear();
            return;
        }
        self.dirs.retain(|k, _| !(k.starts_with(path) && (k.len() == path.len() || k[path.len()] == b'/')));
    }

    fn note_added(&mut self, path: Vec<u8>) {
        if let Some(a) = &mut self.added {
            a.insert(path);
        }
    }

    fn is_added(&self, path: &[u8]) -> bool {
        self.added.as_ref().is_some_and(|a| a.contains(path))
    }

    /// Create one entry. A regular file is returned open, for a [`Writer`] to fill.
    pub(crate) fn begin(&mut self, h: Box<Header>) -> Result<Option<OpenFile>> {
        self.counts.entries += 1;
        let path_bytes = h.path.clone();
        let comps = split_path(&path_bytes).map_err(|r| escape(&h.path, r))?;
        let Some((name, parent)) = comps.split_last() else {
            // `./` — metadata of the destination root itself.
            if h.kind == Kind::Dir {
                self.counts.dirs += 1;
                self.deferred.push(DirMeta { path: Vec::new(), hdr: h, created_mode: None });
                return Ok(None);
            }
            return Err(escape(&h.path, "a non-directory entry names the destination root"));
        };
        match whiteout::classify(name) {
            Name::Plain => {}
            Name::Meta => return Ok(None),
            Name::Invalid => return Err(escape(&h.path, "whiteout of an empty name, `.` or `..`")),
            Name::Opaque => return self.opaque(parent, &h).map(|()| None),
            Name::Whiteout(target) => return self.whiteout(parent, target, &h).map(|()| None),
        }
        let dir = self.dir(parent, true, &h.path)?.expect("created");
        let full = join(&comps);
        let display = self.root.display(&comps);
        match h.kind {
            Kind::File => return self.file(&dir, name, &full, display, h).map(Some),
            Kind::Dir => self.mkdir(&dir, name, &full, display, h)?,
            Kind::Symlink => self.symlink(&dir, name, &full, display, &h)?,
            Kind::Hardlink => self.hardlink(&dir, name, &comps, display, &h)?,
            Kind::Char | Kind::Block | Kind::Fifo => self.special(&dir, name, &full, display, &h)?,
        }
        Ok(None)
    }

    /// Apply deferred directory metadata (after every file is written and closed).
    pub(crate) fn finish(mut self) -> Result<Counts> {
        self.dirs.clear();
        let deferred = std::mem::take(&mut self.deferred);
        for d in deferred.iter().rev() {
            let comps: Vec<&[u8]> = if d.path.is_empty() { Vec::new() } else { d.path.split(|&b| b == b'/').collect() };
            // Removed or replaced by a later entry: nothing to apply.
            let fd = match self.root.open_dir(&comps, None, &d.hdr.path) {
                Ok(Some(fd)) => fd,
                Ok(None) | Err(Error::PathEscape { .. }) => continue,
                Err(e) if e.raw_os_error() == Some(libc_enotdir()) => continue,
                Err(e) => return Err(e),
            };
            let display = self.root.display(&comps);
            self.meta.apply_fd(fd.as_fd(), &d.hdr, d.created_mode, &display, false, &mut self.counts.skipped_xattrs)?;
        }
        Ok(self.counts)
    }

    /// Make room for a new entry at `dir/name`. Returns `true` if an existing directory
    /// was kept (only when `keep_dir`).
    fn clear_slot(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        full: &[u8],
        display: &std::path::Path,
        keep_dir: bool,
    ) -> Result<bool> {
        let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(Error::io("fstatat", display, e)),
        };
        if is_dir(&st) {
            if keep_dir {
                return Ok(true);
            }
            self.invalidate(full);
            remove_tree(dir.as_fd(), name, full, None, display)?;
        } else {
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|e| Error::io("unlinkat", display, e))?;
        }
        Ok(false)
    }

    fn file(&mut self, dir: &OwnedFd, name: &[u8], full: &[u8], path: PathBuf, h: Box<Header>) -> Result<OpenFile> {
        let mode = Mode::from_bits_truncate(h.mode & 0o777);
        let fd = match openat(dir, name, FILE_FLAGS, mode) {
            Ok(fd) => fd,
            Err(Errno::EEXIST) => {
                self.clear_slot(dir, name, full, &path, false)?;
                openat(dir, name, FILE_FLAGS, mode).map_err(|e| Error::io("openat", &path, e))?
            }
            Err(e) => return Err(Error::io("openat", &path, e)),
        };
        self.counts.files += 1;
        self.counts.file_bytes += h.size;
        self.note_added(full.to_vec());
        Ok(OpenFile { file: File::from(fd), hdr: h, path })
    }

    fn mkdir(&mut self, dir: &OwnedFd, name: &[u8], full: &[u8], path: PathBuf, h: Box<Header>) -> Result<()> {
        // Owner rwx until the deferred pass sets the real mode: an unprivileged extraction
        // must be able to fill a directory the archive marks read-only.
        let initial = (h.mode & 0o777) | 0o700;
        let created = match mkdirat(dir, name, Mode::from_bits_truncate(initial)) {
            Ok(()) => Some(initial),
            Err(Errno::EEXIST) => {
                if self.clear_slot(dir, name, full, &path, true)? {
                    None
                } else {
                    mkdirat(dir, name, Mode::from_bits_truncate(initial))
                        .map_err(|e| Error::io("mkdirat", &path, e))?;
                    Some(initial)
                }
            }
            Err(e) => return Err(Error::io("mkdirat", &path, e)),
        };
        self.counts.dirs += 1;
        // Open it now: its children usually follow, and xattrs (including an opaque
        // marker from this same layer) need a descriptor.
        let fd = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| Error::io("openat", &path, e))?;
        for (k, v) in &h.xattrs {
            let k = whiteout::escape_xattr(k);
            if let Err(e) = sys::fsetxattr(fd.as_fd(), &k, v) {
                self.meta.xattr_error(e, &path, &mut self.counts.skipped_xattrs)?;
            }
        }
        if self.dirs.len() >= DIR_CACHE {
            self.dirs.clear();
        }
        self.dirs.insert(full.to_vec(), Rc::new(fd));
        self.note_added(full.to_vec());
        self.deferred.push(DirMeta { path: full.to_vec(), hdr: h, created_mode: created });
        Ok(())
    }

    fn symlink(&mut self, dir: &OwnedFd, name: &[u8], full: &[u8], path: PathBuf, h: &Header) -> Result<()> {
        if h.link.is_empty() {
            return Err(Error::InvalidArchive {
                offset: h.offset,
                reason: format!("symlink {:?} has an empty target", String::from_utf8_lossy(&h.path)),
            });
        }
        match symlinkat(&h.link[..], dir, name) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                self.clear_slot(dir, name, full, &path, false)?;
                symlinkat(&h.link[..], dir, name).map_err(|e| Error::io("symlinkat", &path, e))?;
            }
            Err(e) => return Err(Error::io("symlinkat", &path, e)),
        }
        self.counts.symlinks += 1;
        self.note_added(full.to_vec());
        self.set_meta_at(dir, name, h, &path, false)
    }

    /// Ownership, (mode), xattrs and times on a non-openable entry, never following it.
    fn set_meta_at(
        &mut self,
        dir: &OwnedFd,
        name: &[u8],
        h: &Header,
        path: &std::path::Path,
        chmod: bool,
    ) -> Result<()> {
        if let Some((uid, gid)) = self.meta.needs_chown(h)? {
            fchownat(dir, name, Some(uid), Some(gid), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| Error::io("fchownat", path, e))?;
        }
        // Only special files get here with `chmod`: a device or fifo we just created in a
        // directory we hold open (Linux has no `AT_SYMLINK_NOFOLLOW` for fchmodat before 6.6).
        if chmod && (h.mode & !0o777 != 0 || h.mode & self.meta.umask != 0) {
            fchmodat(dir, name, Mode::from_bits_truncate(h.mode), FchmodatFlags::FollowSymlink)
                .map_err(|e| Error::io("fchmodat", path, e))?;
        }
        for (k, v) in &h.xattrs {
            let k = whiteout::escape_xattr(k);
            match sys::setxattr_at_nofollow(dir.as_fd(), name, &k, v) {
                Ok(()) => {}
                // The kernel never allows `user.*` xattrs on symlinks and special files
                // (xattr(7)); GNU tar warns and goes on, so do we (counted).
                Err(e) if e.raw_os_error() == Some(Errno::EPERM as i32) && k.starts_with(b"user.") => {
                    self.counts.skipped_xattrs += 1;
                }
                Err(e) => self.meta.xattr_error(e, path, &mut self.counts.skipped_xattrs)?,
            }
        }
        let t = mtime(h);
        utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|e| Error::io("utimensat", path, e))?;
        Ok(())
    }

    fn hardlink(&mut self, dir: &OwnedFd, name: &[u8], comps: &[&[u8]], path: PathBuf, h: &Header) -> Result<()> {
        let target = split_path(&h.link).map_err(|r| escape(&h.path, r))?;
        let Some((tname, tparent)) = target.split_last() else {
            return Err(escape(&h.path, "hardlink to the destination root"));
        };
        if target == comps {
            return Ok(()); // a link to itself: nothing to do
        }
        let tdisplay = self.root.display(&target);
        let Some(tdir) = self.dir(tparent, false, &h.path)? else {
            return Err(Error::io("linkat", tdisplay, Errno::ENOENT));
        };
        // Flags 0: a symlink target is linked itself, never followed.
        match linkat(tdir.as_fd(), *tname, dir, name, AtFlags::empty()) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let full = join(comps);
                self.clear_slot(dir, name, &full, &path, false)?;
                linkat(tdir.as_fd(), *tname, dir, name, AtFlags::empty()).map_err(|e| Error::io("linkat", &path, e))?;
            }
            Err(e) => return Err(Error::io("linkat", &tdisplay, e)),
        }
        self.counts.hardlinks += 1;
        self.note_added(join(comps));
        Ok(())
    }

    fn special(&mut self, dir: &OwnedFd, name: &[u8], full: &[u8], path: PathBuf, h: &Header) -> Result<()> {
        let (kind, dev) = match h.kind {
            Kind::Char => (SFlag::S_IFCHR, makedev(h.dev_major.into(), h.dev_minor.into())),
            Kind::Block => (SFlag::S_IFBLK, makedev(h.dev_major.into(), h.dev_minor.into())),
            _ => (SFlag::S_IFIFO, 0),
        };
        let device = kind != SFlag::S_IFIFO;
        if device && self.opts.devices == DeviceNodes::Skip {
            self.counts.skipped_devices += 1;
            return Ok(());
        }
        let perm = Mode::from_bits_truncate(h.mode & 0o777);
        let r = match mknodat(dir, name, kind, perm, dev) {
            Err(Errno::EEXIST) => {
                self.clear_slot(dir, name, full, &path, false)?;
                mknodat(dir, name, kind, perm, dev)
            }
            r => r,
        };
        match r {
            Ok(()) => {}
            Err(Errno::EPERM) if device && self.opts.devices == DeviceNodes::CreateOrSkip => {
                self.counts.skipped_devices += 1;
                return Ok(());
            }
            Err(Errno::EPERM) if device => {
                return Err(Error::NotPermitted {
                    op: "mknodat",
                    path,
                    hint: "device nodes need CAP_MKNOD; set UnpackOptions::devices to Skip or CreateOrSkip",
                });
            }
            Err(e) => return Err(Error::io("mknodat", &path, e)),
        }
        self.counts.special += 1;
        self.note_added(full.to_vec());
        self.set_meta_at(dir, name, h, &path, true)
    }

    fn opaque(&mut self, parent: &[&[u8]], h: &Header) -> Result<()> {
        self.counts.whiteouts += 1;
        let display = self.root.display(parent);
        match self.opts.whiteouts {
            WhiteoutMode::Overlay => {
                let dir = self.dir(parent, true, &h.path)?.expect("created");
                let name = whiteout::opaque_xattr(self.opts.userxattr);
                sys::fsetxattr(dir.as_fd(), name, b"y").map_err(|e| Error::io("fsetxattr", display, e))
            }
            WhiteoutMode::Apply => {
                let Some(dir) = self.dir(parent, false, &h.path)? else { return Ok(()) };
                let dpath = join(parent);
                for child in list_dir(dir.as_fd(), &display)? {
                    let cpath = child_path(&dpath, &child);
                    self.invalidate(&cpath);
                    remove_tree(dir.as_fd(), &child, &cpath, self.added.as_ref(), &display)?;
                }
                Ok(())
            }
        }
    }

    fn whiteout(&mut self, parent: &[&[u8]], target: &[u8], h: &Header) -> Result<()> {
        self.counts.whiteouts += 1;
        let mut comps = parent.to_vec();
        comps.push(target);
        let display = self.root.display(&comps);
        let full = join(&comps);
        match self.opts.whiteouts {
            WhiteoutMode::Overlay => {
                let dir = self.dir(parent, true, &h.path)?.expect("created");
                // Something of that name from this same layer: the whiteout only hides
                // lower layers, so it is dropped (OCI image-spec, "Whiteouts").
                match fstatat(&*dir, target, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(_) => return Ok(()),
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(Error::io("fstatat", display, e)),
                }
                mknodat(&*dir, target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(|e| match e {
                    Errno::EPERM => Error::NotPermitted {
                        op: "mknodat",
                        path: display.clone(),
                        hint: "overlay whiteouts (char 0:0) need Linux 5.8+ or CAP_MKNOD",
                    },
                    e => Error::io("mknodat", display.clone(), e),
                })
            }
            WhiteoutMode::Apply => {
                if self.is_added(&full) {
                    return Ok(());
                }
                let Some(dir) = self.dir(parent, false, &h.path)? else { return Ok(()) };
                self.invalidate(&full);
                remove_tree(dir.as_fd(), target, &full, self.added.as_ref(), &display)?;
                Ok(())
            }
        }
    }
}

fn libc_enotdir() -> i32 {
    Errno::ENOTDIR as i32
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
}

fn child_path(parent: &[u8], child: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return child.to_vec();
    }
    let mut p = Vec::with_capacity(parent.len() + 1 + child.len());
    p.extend_from_slice(parent);
    p.push(b'/');
    p.extend_from_slice(child);
    p
}

fn list_dir(fd: BorrowedFd<'_>, display: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    let dup = fd.try_clone_to_owned().map_err(|e| Error::io("dup", display, e))?;
    let mut d = nix::dir::Dir::from_fd(dup).map_err(|e| Error::io("fdopendir", display, e))?;
    let mut names = Vec::new();
    for ent in d.iter() {
        let ent = ent.map_err(|e| Error::io("getdents64", display, e))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    Ok(names)
}

/// Remove `dir/name` and everything under it, by descriptor, never following symlinks.
/// Paths in `keep` (and their ancestors) survive. Returns whether anything was kept.
pub(crate) fn remove_tree(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: &[u8],
    keep: Option<&HashSet<Vec<u8>>>,
    display: &std::path::Path,
) -> Result<bool> {
    if keep.is_some_and(|k| k.contains(path)) {
        return Ok(true);
    }
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(false),
        Err(Errno::ENOENT) => return Ok(false),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(Error::io("unlinkat", display, e)),
    }
    let sub = match openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(false),
        Err(e) => return Err(Error::io("openat", display, e)),
    };
    let mut kept = false;
    let mut made_writable = false;
    for child in list_dir(sub.as_fd(), display)? {
        let cpath = child_path(path, &child);
        let r = remove_tree(sub.as_fd(), &child, &cpath, keep, display);
        let r = match r {
            // A read-only directory (unprivileged): make it writable once and retry.
            Err(ref e) if e.raw_os_error() == Some(Errno::EACCES as i32) && !made_writable => {
                made_writable = true;
                fchmod(&sub, Mode::from_bits_truncate(0o700)).map_err(|e| Error::io("fchmod", display, e))?;
                remove_tree(sub.as_fd(), &child, &cpath, keep, display)
            }
            r => r,
        };
        kept |= r?;
    }
    if !kept {
        unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(|e| Error::io("unlinkat", display, e))?;
    }
    Ok(kept)
}
