//! Applies parsed tar entries to a destination directory, by file descriptor.
//!
//! Syscall budget for the common case (a regular file whose parent was seen before, as
//! root, owner 0:0, mode without special bits): `openat`, `write`(s), `futimens`,
//! `close`. Parent directory descriptors are cached by path; ownership and mode are only
//! changed when they differ from what creation already produced; directory metadata
//! and mtimes are applied once, after every entry (creating children changes a
//! directory's mtime, and a read-only directory mode would stop an unprivileged
//! extraction from filling it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};

use super::tar::{Header, Kind, Xattrs};
use super::whiteout::{self, Name};
use super::{DeviceNodes, UnpackOptions, WhiteoutMode};
use crate::error::{Error, Result};
use crate::fsutil::{list_dir, remove_tree};
use crate::root::{Root, entry_name, escape, join, split_path};
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

/// What creating an entry gave it, so metadata calls are only made when they change
/// something. Creation in a setgid directory inherits its group (and, for directories,
/// the setgid bit); a default ACL replaces the umask, making the mode unpredictable.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Created {
    mode: u32,
    uid: u32,
    gid: u32,
    /// `false` when the mode cannot be predicted (default ACL): always chmod.
    exact: bool,
}

/// A regular file created by the [`Extractor`], for the [`Writer`] to fill.
pub(crate) struct OpenFile {
    file: File,
    hdr: Box<Header>,
    path: PathBuf,
    created: Created,
}

/// A regular file being written.
struct Current {
    file: File,
    hdr: Box<Header>,
    path: PathBuf,
    created: Created,
    /// Bytes of archive data consumed so far.
    consumed: u64,
    /// Sparse files: the map segment being filled, and the data bytes before it.
    seg: usize,
    seg_start: u64,
}

/// Directory metadata applied after all entries (keyed by path in the extractor): only
/// what the deferred pass needs, since a layer may hold hundreds of thousands of
/// directories.
struct DirMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    mtime_nsec: u32,
    /// What creation gave the directory, or `None` if it existed before this entry.
    created: Option<Created>,
    /// Xattrs to set in the deferred pass (only the root entry's: others are set at
    /// creation).
    xattrs: Option<Box<Xattrs>>,
    /// A parent directory this layer created without an entry, whose metadata comes from
    /// the lower layers later ([`Extractor::for_cache`]): not applied by the deferred
    /// pass, handed back by [`Extractor::take_implicit`].
    implicit: bool,
}

impl DirMeta {
    fn new(h: &Header, created: Option<Created>, with_xattrs: bool) -> DirMeta {
        DirMeta {
            mode: h.mode,
            uid: h.uid,
            gid: h.gid,
            mtime: h.mtime,
            mtime_nsec: h.mtime_nsec,
            created,
            xattrs: (with_xattrs && !h.xattrs.is_empty()).then(|| Box::new(h.xattrs.clone())),
            implicit: false,
        }
    }

    /// The metadata of the directory at `comps` in the first of `lowers` (top first) that
    /// has one there, for a directory a layer creates implicitly in its place; `None`
    /// when no lower has it, or a whiteout, file or symlink in a lower hides the ones
    /// below.
    ///
    /// # Errors
    /// What keeps a lower from being read for now (no descriptor or memory left, an I/O
    /// error): guessing then would silently give the directory default metadata.
    /// `lowers` are opened as the search goes down, so a caller opening them on demand
    /// holds one descriptor at a time however many layers there are.
    fn from_lowers<L: std::borrow::Borrow<Root>>(
        lowers: impl IntoIterator<Item = Result<L>>,
        comps: &[&[u8]],
    ) -> Result<Option<DirMeta>> {
        let mut found = None;
        for lower in lowers {
            let lower = lower?;
            let lower = lower.borrow();
            match lower.open_dir(comps, None, b"", &mut Vec::new()) {
                Ok(Some(fd)) => {
                    let st = nix::sys::stat::fstat(&fd).map_err(|e| Error::io("fstat", lower.display(comps), e))?;
                    found = Some((st, image_xattrs(fd.as_fd())));
                    break;
                }
                Ok(None) => continue, // not in this layer: look further down
                // Out of descriptors or memory, or a failing disk: not an answer.
                Err(e) if is_transient(&e) => return Err(e),
                Err(_) => break, // a whiteout, file or symlink hides lower ones
            }
        }
        let Some((st, xattrs)) = found else { return Ok(None) };
        Ok(Some(DirMeta {
            mode: st.st_mode & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
            created: None,
            xattrs: (!xattrs.is_empty()).then(|| Box::new(xattrs)),
            implicit: false,
        }))
    }

    /// The header `MetaPolicy::apply_fd` takes, rebuilt for the deferred pass.
    fn header(&self) -> Header {
        Header {
            path: Vec::new(),
            link: Vec::new(),
            kind: Kind::Dir,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
            mtime_nsec: self.mtime_nsec,
            size: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: self.xattrs.as_deref().cloned().unwrap_or_default(),
            sparse: None,
            offset: 0,
        }
    }
}

/// A cached directory descriptor and what it passes on to entries created in it.
struct Dir {
    fd: OwnedFd,
    path: Vec<u8>,
    /// The directory's group when it is setgid: new entries get it.
    sgid: Option<u32>,
    /// It has a default ACL, which replaces the umask for new entries.
    acl: bool,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
const FILE_FLAGS: OFlag =
    OFlag::O_WRONLY.union(OFlag::O_CREAT).union(OFlag::O_EXCL).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
/// Mode of parent directories the archive did not list, when no lower layer has them
/// (see DESIGN.md rule 3: they are only ever created when missing, never applied over an
/// existing directory).
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// Longest entry path accepted: Linux's `PATH_MAX` less the NUL. Longer paths cannot be
/// named by any tool reading the tree (and containerd or Docker could not have written
/// them); refusing them also bounds the metadata retained per directory.
const PATH_MAX: usize = 4095;
/// The xattr holding a directory's default POSIX ACL.
const DEFAULT_ACL: &[u8] = b"system.posix_acl_default";
/// Bound on cached directory descriptors. With the pipeline's bound on open files, an
/// extraction holds under 200 descriptors, well within the common 1024 limit.
const DIR_CACHE: usize = 64;

/// Creates entries (directories, links, special files, whiteouts, and regular files,
/// opened empty) by descriptor. Regular files are handed to a [`Writer`] as [`OpenFile`]s.
pub(crate) struct Extractor<'a> {
    root: &'a Root,
    opts: &'a UnpackOptions,
    dirs: HashMap<Vec<u8>, Rc<Dir>>,
    /// Directory metadata to apply at the end, by path; a later entry for the same
    /// directory replaces an earlier one (it would overwrite it anyway). A `BTreeMap` so
    /// that replacing a directory drops its subtree's entries by range.
    deferred: BTreeMap<Vec<u8>, DirMeta>,
    /// Paths this layer created (Apply mode), as keyed 64-bit hashes (8 bytes an entry,
    /// whatever the path length): whiteouts never remove them.
    added: Option<HashSet<u64>>,
    /// Random keys for `added` hashes, so an archive cannot aim for collisions.
    added_keys: std::collections::hash_map::RandomState,
    /// Apply mode: paths already emptied (opaque) or removed (whiteout) by this layer. A
    /// repeat has nothing left to do: everything still there was added by this layer.
    cleared: HashSet<Vec<u8>>,
    /// Existing read-only directories we made writable (unprivileged), and their modes.
    unlocked: Vec<(Vec<u8>, u32)>,
    /// [`UnpackOptions::parent_lowers`], opened on first use.
    lowers: Option<Vec<Root>>,
    /// Record implicit parents instead of looking them up ([`Extractor::for_cache`]).
    record_implicit: bool,
    /// Where the cache reads how far extraction got: the tar stream offset of the
    /// entry being created.
    position: Option<&'a AtomicU64>,
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

    /// What creating an entry with `mode` (before umask) in `dir` gives it.
    fn created(&self, dir: &Dir, mode: u32, is_dir: bool) -> Created {
        let mut m = if dir.acl { mode & 0o7777 } else { mode & 0o7777 & !self.umask };
        if is_dir && dir.sgid.is_some() {
            m |= 0o2000;
        }
        Created { mode: m, uid: self.euid, gid: dir.sgid.unwrap_or(self.egid), exact: !dir.acl }
    }

    /// The owner to set, when chown is on and it differs from what the entry has.
    fn chown_to(&self, h: &Header, created: Option<Created>) -> Result<Option<(Uid, Gid)>> {
        if !self.chown {
            return Ok(None);
        }
        let uid = to_id(h.uid, "uid", h)?;
        let gid = to_id(h.gid, "gid", h)?;
        let same = created.is_some_and(|c| c.uid == uid && c.gid == gid);
        Ok((!same).then(|| (Uid::from_raw(uid), Gid::from_raw(gid))))
    }

    fn needs_chmod(h: &Header, created: Option<Created>, chowned: bool) -> bool {
        match created {
            None => true,
            // chown clears setuid/setgid: put them back.
            Some(c) => !c.exact || c.mode != h.mode || (chowned && h.mode & 0o6000 != 0),
        }
    }

    /// Ownership, xattrs, mode and times on an open file or directory, in an order that
    /// keeps each: `fchown` clears setuid/setgid and file capabilities, so it comes first;
    /// xattrs before `fchmod`, because `user.*` xattrs need write permission the final
    /// mode may not give; times last.
    fn apply_fd(
        &self,
        fd: BorrowedFd<'_>,
        h: &Header,
        created: Option<Created>,
        path: &std::path::Path,
        xattrs: bool,
        skipped: &mut u64,
    ) -> Result<()> {
        let owner = self.chown_to(h, created)?;
        if let Some((uid, gid)) = owner {
            fchown(fd, Some(uid), Some(gid)).map_err(|e| Error::io("fchown", path, e))?;
        }
        if xattrs {
            self.set_xattrs(fd, &h.xattrs, path, skipped)?;
        }
        if Self::needs_chmod(h, created, owner.is_some()) {
            fchmod(fd, Mode::from_bits_truncate(h.mode)).map_err(|e| Error::io("fchmod", path, e))?;
        }
        let t = mtime(h);
        futimens(fd, &t, &t).map_err(|e| Error::io("futimens", path, e))?;
        Ok(())
    }

    /// Set image xattrs on an open file or directory, escaping overlay's namespaces.
    fn set_xattrs(&self, fd: BorrowedFd<'_>, xattrs: &Xattrs, path: &std::path::Path, skipped: &mut u64) -> Result<()> {
        for (k, v) in xattrs {
            let k = whiteout::escape_xattr(k);
            if let Err(e) = sys::fsetxattr(fd, &k, v) {
                self.xattr_error(e, path, skipped)?;
            }
        }
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
    /// [`UnpackOptions::placeholders`].
    placeholders: Option<super::Placeholders>,
    current: Option<Current>,
    /// Xattrs skipped under [`UnpackOptions::ignore_xattr_errors`].
    pub skipped_xattrs: u64,
}

impl Writer {
    /// A writer applying metadata as `ex` does (same identity, umask and options).
    pub(crate) fn new(ex: &Extractor<'_>) -> Self {
        Writer { meta: ex.meta, placeholders: ex.opts.placeholders.clone(), current: None, skipped_xattrs: 0 }
    }

    /// Start writing `f` (finishing the previous file).
    pub(crate) fn open(&mut self, f: OpenFile) -> Result<()> {
        self.close()?;
        self.current = Some(Current {
            file: f.file,
            hdr: f.hdr,
            path: f.path,
            created: f.created,
            consumed: 0,
            seg: 0,
            seg_start: 0,
        });
        Ok(())
    }

    /// Data for the current regular file; ignored when there is none (the data of an
    /// entry that was skipped, such as a whiteout with content).
    pub(crate) fn data(&mut self, buf: &[u8]) -> Result<()> {
        let Some(cur) = &mut self.current else {
            return Ok(());
        };
        let Some((map, _)) = &cur.hdr.sparse else {
            cur.file.write_all(buf).map_err(|e| Error::io("write", &cur.path, e))?;
            cur.consumed += buf.len() as u64;
            return Ok(());
        };
        let mut buf = buf;
        while !buf.is_empty() {
            // Position of `consumed` inside the map.
            let Some(&(off, len)) = map.get(cur.seg) else {
                return Err(Error::InvalidArchive {
                    offset: cur.hdr.offset,
                    reason: "sparse data beyond its map".into(),
                });
            };
            let into = cur.consumed - cur.seg_start;
            let n = (len - into).min(buf.len() as u64) as usize;
            cur.file.write_all_at(&buf[..n], off + into).map_err(|e| Error::io("pwrite", &cur.path, e))?;
            cur.consumed += n as u64;
            buf = &buf[n..];
            if cur.consumed - cur.seg_start == len {
                cur.seg += 1;
                cur.seg_start = cur.consumed;
            }
        }
        Ok(())
    }

    /// Data for the current (non-sparse) regular file, copied from `len` bytes at `off` in
    /// the archive file `src` (shared extents where the filesystem can); ignored when
    /// there is no current file, as for [`data`](Self::data).
    pub(crate) fn clone_data(&mut self, src: &File, off: u64, len: u64) -> Result<()> {
        let Some(cur) = &mut self.current else {
            return Ok(());
        };
        debug_assert!(cur.hdr.sparse.is_none(), "sparse data is never cloned");
        crate::reflink::copy_range(src, off, &cur.file, len).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::InvalidArchive {
                    offset: cur.hdr.offset,
                    reason: "truncated archive: entry data ends early".into(),
                }
            } else {
                Error::io("copy_file_range", &cur.path, e)
            }
        })?;
        cur.consumed += len;
        Ok(())
    }

    /// Finish the current file: size (sparse), owner, xattrs, mode, times; close.
    pub(crate) fn close(&mut self) -> Result<()> {
        let Some(cur) = self.current.take() else { return Ok(()) };
        if let Some((_, real)) = &cur.hdr.sparse {
            cur.file.set_len(*real).map_err(|e| Error::io("ftruncate", &cur.path, e))?;
            if let Some(p) = &self.placeholders {
                let path = cur.hdr.path.strip_prefix(b"./").unwrap_or(&cur.hdr.path);
                let xattrs = (p.0)(path).ok_or_else(|| Error::InvalidArchive {
                    offset: cur.hdr.offset,
                    reason: format!("sparse file {:?} is no placeholder of the layer", String::from_utf8_lossy(path)),
                })?;
                for (k, v) in &xattrs {
                    sys::fsetxattr(cur.file.as_fd(), k, v).map_err(|e| Error::io("fsetxattr", &cur.path, e))?;
                }
            }
        }
        self.meta.apply_fd(cur.file.as_fd(), &cur.hdr, Some(cur.created), &cur.path, true, &mut self.skipped_xattrs)
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

fn comps_of(path: &[u8]) -> Vec<&[u8]> {
    if path.is_empty() { Vec::new() } else { path.split(|&b| b == b'/').collect() }
}

impl<'a> Extractor<'a> {
    pub(crate) fn new(root: &'a Root, opts: &'a UnpackOptions) -> Self {
        Self::build(root, opts, None)
    }

    /// An extractor for the cache, which may extract a layer before the layers below it
    /// are ready: parents the layer omits are recorded (see [`Self::take_implicit`])
    /// instead of being looked up in [`UnpackOptions::parent_lowers`], and the tar offset
    /// of each entry is stored in `position` as it is created (progress).
    pub(crate) fn for_cache(root: &'a Root, opts: &'a UnpackOptions, position: &'a AtomicU64) -> Self {
        Self::build(root, opts, Some(position))
    }

    fn build(root: &'a Root, opts: &'a UnpackOptions, position: Option<&'a AtomicU64>) -> Self {
        let mut ex = Extractor {
            root,
            opts,
            dirs: HashMap::new(),
            deferred: BTreeMap::new(),
            added: (opts.whiteouts == WhiteoutMode::Apply).then(HashSet::new),
            added_keys: std::collections::hash_map::RandomState::new(),
            cleared: HashSet::new(),
            unlocked: Vec::new(),
            lowers: None,
            record_implicit: position.is_some(),
            position,
            counts: Counts::default(),
            meta: MetaPolicy::new(opts),
        };
        // A layer without a `./` entry leaves the root as the layers below have it
        // (a `./` entry, deferred later, replaces this).
        ex.implicit_parent(&[]);
        ex
    }

    /// Wrap a directory descriptor, learning what it passes on to new entries.
    fn describe(fd: OwnedFd, path: Vec<u8>) -> Dir {
        let sgid = nix::sys::stat::fstat(&fd).ok().filter(|st| st.st_mode & 0o2000 != 0).map(|st| st.st_gid);
        let acl = matches!(sys::fgetxattr(fd.as_fd(), b"system.posix_acl_default"), Ok(Some(_)));
        Dir { fd, path, sgid, acl }
    }

    fn cache(&mut self, dir: Dir) -> Rc<Dir> {
        if self.dirs.len() >= DIR_CACHE {
            self.dirs.clear();
        }
        let dir = Rc::new(dir);
        self.dirs.insert(dir.path.clone(), dir.clone());
        dir
    }

    /// The cached directory at `comps`, creating missing ones when `create` (with the
    /// metadata of the same directory in [`UnpackOptions::parent_lowers`], or
    /// [`IMPLICIT_DIR_MODE`]).
    fn dir(&mut self, comps: &[&[u8]], create: bool, entry: &[u8]) -> Result<Option<Rc<Dir>>> {
        let key = join(comps);
        if let Some(d) = self.dirs.get(&key) {
            return Ok(Some(d.clone()));
        }
        let mut made = Vec::new();
        let Some(fd) = self.root.open_dir(comps, create.then_some(IMPLICIT_DIR_MODE), entry, &mut made)? else {
            return Ok(None);
        };
        for n in made {
            self.implicit_parent(&comps[..n]);
        }
        Ok(Some(self.cache(Self::describe(fd, key))))
    }

    /// A parent directory the layer did not list was just created: give it the metadata
    /// the image's lower layers have for it (what applying the layer through the merged
    /// overlay view, as containerd does, would show), applied in the deferred pass.
    fn implicit_parent(&mut self, comps: &[&[u8]]) {
        if self.record_implicit {
            // A placeholder: replaced if an entry for the directory follows, dropped if
            // the directory is removed, like any deferred metadata.
            let meta = DirMeta {
                mode: IMPLICIT_DIR_MODE,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                created: None,
                xattrs: None,
                implicit: true,
            };
            self.defer(join(comps), meta);
            return;
        }
        if self.opts.parent_lowers.is_empty() {
            return;
        }
        let lowers = self
            .lowers
            .get_or_insert_with(|| self.opts.parent_lowers.iter().filter_map(|p| Root::open(p).ok()).collect());
        if let Ok(Some(meta)) = DirMeta::from_lowers(lowers.iter().map(Ok), comps) {
            self.defer(join(comps), meta);
        }
    }

    /// The parent directories this layer created without ever listing them (relative
    /// paths, `""` for the root), sorted; they are left out of [`Self::finish`]. Only an
    /// extractor made with [`Self::for_cache`] records them.
    pub(crate) fn take_implicit(&mut self) -> Vec<Vec<u8>> {
        let paths: Vec<Vec<u8>> = self.deferred.iter().filter(|(_, d)| d.implicit).map(|(p, _)| p.clone()).collect();
        for p in &paths {
            self.deferred.remove(p);
        }
        paths
    }

    /// Forget cached descriptors at or under `path` (it is about to be removed or replaced).
    fn invalidate(&mut self, path: &[u8]) {
        if path.is_empty() {
            self.dirs.clear();
            return;
        }
        self.dirs.retain(|k, _| !(k.starts_with(path) && (k.len() == path.len() || k[path.len()] == b'/')));
    }

    fn defer(&mut self, path: Vec<u8>, meta: DirMeta) {
        self.deferred.insert(path, meta);
    }

    /// Drop deferred metadata at or under `path`: the directory there is being removed,
    /// and a later entry of the same name must not inherit it.
    fn forget_deferred(&mut self, path: &[u8]) {
        if path.is_empty() {
            self.deferred.clear();
            return;
        }
        self.deferred.remove(path);
        // Keys under `path/` sort between `path/` and `path0` ('0' follows '/').
        let mut lo = path.to_vec();
        lo.push(b'/');
        let mut hi = path.to_vec();
        hi.push(b'0');
        let doomed: Vec<Vec<u8>> = self.deferred.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.deferred.remove(&k);
        }
    }

    fn note_added(&mut self, path: Vec<u8>) {
        use std::hash::BuildHasher;
        let key = self.added_keys.hash_one(&path);
        if let Some(a) = &mut self.added {
            a.insert(key);
        }
    }

    fn is_added(&self, path: &[u8]) -> bool {
        use std::hash::BuildHasher;
        self.added.as_ref().is_some_and(|a| a.contains(&self.added_keys.hash_one(path)))
    }

    /// Run `op` (a creation or removal in `dir`); if it fails with `EACCES` because `dir`
    /// is an existing read-only directory we own (an unprivileged flatten into, say, a
    /// 0555 `/usr/bin` of a lower layer), make `dir` writable and retry. Its mode is
    /// restored in [`Self::finish`].
    fn writable<T>(&mut self, dir: &Dir, mut op: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
        match op() {
            Err(Errno::EACCES) if self.unlock(dir) => op(),
            r => r,
        }
    }

    /// Give the owner write and search permission on `dir`, remembering its mode. `false`
    /// if that cannot help (not ours, already writable, already unlocked).
    fn unlock(&mut self, dir: &Dir) -> bool {
        let Ok(st) = nix::sys::stat::fstat(&dir.fd) else { return false };
        let mode = st.st_mode & 0o7777;
        if st.st_uid != self.meta.euid || mode & 0o300 == 0o300 || self.unlocked.iter().any(|(p, _)| *p == dir.path) {
            return false;
        }
        if fchmod(&dir.fd, Mode::from_bits_truncate(mode | 0o700)).is_err() {
            return false;
        }
        self.unlocked.push((dir.path.clone(), mode));
        true
    }

    /// Create one entry. A regular file is returned open, for a [`Writer`] to fill.
    pub(crate) fn begin(&mut self, h: Box<Header>) -> Result<Option<OpenFile>> {
        self.counts.entries += 1;
        if let Some(p) = self.position {
            p.store(h.offset, Ordering::Relaxed);
        }
        let path_bytes = h.path.clone();
        let comps = split_path(&path_bytes).map_err(|r| escape(&h.path, r))?;
        let Some((name, parent)) = comps.split_last() else {
            // `./`: metadata of the destination root itself.
            if h.kind == Kind::Dir {
                self.meta.chown_to(&h, None)?; // reject out-of-range ids now, with the name
                self.counts.dirs += 1;
                self.defer(Vec::new(), DirMeta::new(&h, None, true));
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
        let full = join(&comps);
        if full.len() > PATH_MAX {
            return Err(Error::Unsupported {
                what: format!("entry {} longer than {PATH_MAX} bytes (PATH_MAX)", entry_name(&h.path)),
            });
        }
        let dir = self.dir(parent, true, &h.path)?.expect("created");
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

    /// Restore directories made writable, then apply deferred directory metadata in
    /// archive order (a later entry for the same directory wins). Call after every file
    /// is written and closed.
    pub(crate) fn finish(mut self) -> Result<Counts> {
        self.dirs.clear();
        for (path, mode) in std::mem::take(&mut self.unlocked) {
            let comps = comps_of(&path);
            if let Ok(Some(fd)) = self.root.open_dir(&comps, None, &path, &mut Vec::new()) {
                fchmod(&fd, Mode::from_bits_truncate(mode))
                    .map_err(|e| Error::io("fchmod", self.root.display(&comps), e))?;
            }
        }
        for (path, d) in std::mem::take(&mut self.deferred) {
            if d.implicit {
                continue; // the cache applies lower metadata once the lowers are ready
            }
            let comps = comps_of(&path);
            // Removed or replaced by a later entry: nothing to apply.
            let fd = match self.root.open_dir(&comps, None, &path, &mut Vec::new()) {
                Ok(Some(fd)) => fd,
                Ok(None) | Err(Error::PathEscape { .. }) => continue,
                Err(e) if e.raw_os_error() == Some(Errno::ENOTDIR as i32) => continue,
                Err(e) => return Err(e),
            };
            let display = self.root.display(&comps);
            let with_xattrs = d.xattrs.is_some();
            self.meta.apply_fd(
                fd.as_fd(),
                &d.header(),
                d.created,
                &display,
                with_xattrs,
                &mut self.counts.skipped_xattrs,
            )?;
        }
        Ok(self.counts)
    }

    /// Make room for a new entry at `dir/name`. Returns `true` if an existing directory
    /// was kept (only when `keep_dir`).
    fn clear_slot(
        &mut self,
        dir: &Dir,
        name: &[u8],
        full: &[u8],
        display: &std::path::Path,
        keep_dir: bool,
    ) -> Result<bool> {
        let st = match fstatat(&dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(Error::io("fstatat", display, e)),
        };
        if is_dir(&st) {
            if keep_dir {
                return Ok(true);
            }
            self.invalidate(full);
            self.forget_deferred(full);
            self.remove(dir, name, full, false, display)?;
        } else {
            self.writable(dir, || unlinkat(&dir.fd, name, UnlinkatFlags::NoRemoveDir))
                .map_err(|e| Error::io("unlinkat", display, e))?;
        }
        Ok(false)
    }

    /// [`remove_tree`] of `dir/name`, making `dir` writable first if needed; with
    /// `keep_added`, what this layer added survives.
    fn remove(
        &mut self,
        dir: &Dir,
        name: &[u8],
        full: &[u8],
        keep_added: bool,
        display: &std::path::Path,
    ) -> Result<bool> {
        let keep = |p: &[u8]| keep_added && self.is_added(p);
        match remove_tree(dir.fd.as_fd(), name, full, Some(&keep), display) {
            Err(e) if e.raw_os_error() == Some(Errno::EACCES as i32) && self.unlock(dir) => {
                let keep = |p: &[u8]| keep_added && self.is_added(p);
                remove_tree(dir.fd.as_fd(), name, full, Some(&keep), display)
            }
            r => r,
        }
    }

    fn file(&mut self, dir: &Dir, name: &[u8], full: &[u8], path: PathBuf, h: Box<Header>) -> Result<OpenFile> {
        // Unprivileged, `user.*` xattrs need write permission on the file: keep owner-write
        // until the writer has set them (it then applies the real mode).
        let mut want = h.mode & 0o777;
        if self.meta.euid != 0 && !h.xattrs.is_empty() {
            want |= 0o200;
        }
        let mode = Mode::from_bits_truncate(want);
        let fd = match self.writable(dir, || openat(&dir.fd, name, FILE_FLAGS, mode)) {
            Ok(fd) => fd,
            Err(Errno::EEXIST) => {
                self.clear_slot(dir, name, full, &path, false)?;
                self.writable(dir, || openat(&dir.fd, name, FILE_FLAGS, mode))
                    .map_err(|e| Error::io("openat", &path, e))?
            }
            Err(e) => return Err(Error::io("openat", &path, e)),
        };
        self.counts.files += 1;
        self.counts.file_bytes += h.size;
        self.note_added(full.to_vec());
        let created = self.meta.created(dir, want, false);
        Ok(OpenFile { file: File::from(fd), hdr: h, path, created })
    }

    fn mkdir(&mut self, dir: &Dir, name: &[u8], full: &[u8], path: PathBuf, h: Box<Header>) -> Result<()> {
        self.meta.chown_to(&h, None)?; // reject out-of-range ids now, with the name
        // Owner rwx until the deferred pass sets the real mode: an unprivileged extraction
        // must be able to fill a directory the archive marks read-only.
        let initial = (h.mode & 0o777) | 0o700;
        let mode = Mode::from_bits_truncate(initial);
        let created = match self.writable(dir, || mkdirat(&dir.fd, name, mode)) {
            Ok(()) => Some(self.meta.created(dir, initial, true)),
            Err(Errno::EEXIST) => {
                if self.clear_slot(dir, name, full, &path, true)? {
                    None
                } else {
                    self.writable(dir, || mkdirat(&dir.fd, name, mode)).map_err(|e| Error::io("mkdirat", &path, e))?;
                    Some(self.meta.created(dir, initial, true))
                }
            }
            Err(e) => return Err(Error::io("mkdirat", &path, e)),
        };
        self.counts.dirs += 1;
        // Open it now: its children usually follow, and xattrs (including an opaque
        // marker from this same layer) need a descriptor.
        let fd = openat(&dir.fd, name, DIR_FLAGS, Mode::empty()).map_err(|e| Error::io("openat", &path, e))?;
        // A default ACL would be inherited by every entry created in the directory from
        // now on, which the archive did not ask for: it is set in the deferred pass.
        let (now, later): (Xattrs, Xattrs) = h.xattrs.iter().cloned().partition(|(k, _)| k != DEFAULT_ACL);
        self.meta.set_xattrs(fd.as_fd(), &now, &path, &mut self.counts.skipped_xattrs)?;
        let d = match created {
            // What it passes on follows from its parent (no fstat, no fgetxattr): setgid
            // and the group are inherited from a setgid parent, a default ACL from a
            // parent with one (the archive's own is only set in the deferred pass).
            Some(_) => Dir { fd, path: full.to_vec(), sgid: dir.sgid, acl: dir.acl },
            None => Self::describe(fd, full.to_vec()),
        };
        self.cache(d);
        self.note_added(full.to_vec());
        let mut meta = DirMeta::new(&h, created, false);
        if !later.is_empty() {
            meta.xattrs = Some(Box::new(later));
        }
        self.defer(full.to_vec(), meta);
        Ok(())
    }

    fn symlink(&mut self, dir: &Dir, name: &[u8], full: &[u8], path: PathBuf, h: &Header) -> Result<()> {
        if h.link.is_empty() {
            return Err(Error::InvalidArchive {
                offset: h.offset,
                reason: format!("symlink {:?} has an empty target", String::from_utf8_lossy(&h.path)),
            });
        }
        match self.writable(dir, || symlinkat(&h.link[..], &dir.fd, name)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                self.clear_slot(dir, name, full, &path, false)?;
                self.writable(dir, || symlinkat(&h.link[..], &dir.fd, name))
                    .map_err(|e| Error::io("symlinkat", &path, e))?;
            }
            Err(e) => return Err(Error::io("symlinkat", &path, e)),
        }
        self.counts.symlinks += 1;
        self.note_added(full.to_vec());
        let created = self.meta.created(dir, 0o777, false);
        self.set_meta_at(dir, name, h, created, &path, false)
    }

    /// Ownership, (mode), xattrs and times on a non-openable entry, never following it.
    fn set_meta_at(
        &mut self,
        dir: &Dir,
        name: &[u8],
        h: &Header,
        created: Created,
        path: &std::path::Path,
        chmod: bool,
    ) -> Result<()> {
        let owner = self.meta.chown_to(h, Some(created))?;
        if let Some((uid, gid)) = owner {
            fchownat(&dir.fd, name, Some(uid), Some(gid), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| Error::io("fchownat", path, e))?;
        }
        for (k, v) in &h.xattrs {
            let k = whiteout::escape_xattr(k);
            match sys::setxattr_at_nofollow(dir.fd.as_fd(), name, &k, v) {
                Ok(()) => {}
                // The kernel never allows `user.*` xattrs on symlinks and special files
                // (xattr(7)); GNU tar warns and goes on, so do we (counted).
                Err(e) if e.raw_os_error() == Some(Errno::EPERM as i32) && k.starts_with(b"user.") => {
                    self.counts.skipped_xattrs += 1;
                }
                Err(e) => self.meta.xattr_error(e, path, &mut self.counts.skipped_xattrs)?,
            }
        }
        // Only special files get here with `chmod`: a device or fifo we just created in a
        // directory we hold open (Linux has no `AT_SYMLINK_NOFOLLOW` for fchmodat before 6.6).
        if chmod && MetaPolicy::needs_chmod(h, Some(created), owner.is_some()) {
            fchmodat(&dir.fd, name, Mode::from_bits_truncate(h.mode), FchmodatFlags::FollowSymlink)
                .map_err(|e| Error::io("fchmodat", path, e))?;
        }
        let t = mtime(h);
        utimensat(&dir.fd, name, &t, &t, UtimensatFlags::NoFollowSymlink)
            .map_err(|e| Error::io("utimensat", path, e))?;
        Ok(())
    }

    fn hardlink(&mut self, dir: &Dir, name: &[u8], comps: &[&[u8]], path: PathBuf, h: &Header) -> Result<()> {
        let target = split_path(&h.link).map_err(|r| escape(&h.path, r))?;
        if join(&target).len() > PATH_MAX {
            return Err(Error::Unsupported {
                what: format!("hardlink target of {} longer than {PATH_MAX} bytes", entry_name(&h.path)),
            });
        }
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
        let link = || linkat(&tdir.fd, *tname, &dir.fd, name, AtFlags::empty());
        match self.writable(dir, link) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                let full = join(comps);
                self.clear_slot(dir, name, &full, &path, false)?;
                self.writable(dir, link).map_err(|e| Error::io("linkat", &path, e))?;
            }
            Err(e) => return Err(Error::io("linkat", &tdisplay, e)),
        }
        self.counts.hardlinks += 1;
        self.note_added(join(comps));
        Ok(())
    }

    fn special(&mut self, dir: &Dir, name: &[u8], full: &[u8], path: PathBuf, h: &Header) -> Result<()> {
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
        let r = match self.writable(dir, || mknodat(&dir.fd, name, kind, perm, dev)) {
            Err(Errno::EEXIST) => {
                self.clear_slot(dir, name, full, &path, false)?;
                self.writable(dir, || mknodat(&dir.fd, name, kind, perm, dev))
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
        let created = self.meta.created(dir, h.mode & 0o777, false);
        self.set_meta_at(dir, name, h, created, &path, true)
    }

    /// The directory a whiteout applies in. `None` when there is nothing to hide: it is
    /// missing (Apply mode), or a file or symlink stands on the way. umoci writes
    /// `d/.wh.x` after turning `d` into a symlink in the same layer; nothing below a
    /// non-directory exists, so such whiteouts are dropped (never followed).
    fn whiteout_dir(&mut self, parent: &[&[u8]], create: bool, entry: &[u8]) -> Result<Option<Rc<Dir>>> {
        match self.dir(parent, create, entry) {
            Err(Error::PathEscape { .. }) => Ok(None),
            Err(e) if e.raw_os_error() == Some(Errno::ENOTDIR as i32) => Ok(None),
            r => r,
        }
    }

    fn opaque(&mut self, parent: &[&[u8]], h: &Header) -> Result<()> {
        self.counts.whiteouts += 1;
        let display = self.root.display(parent);
        match self.opts.whiteouts {
            WhiteoutMode::Overlay => {
                let Some(dir) = self.whiteout_dir(parent, true, &h.path)? else { return Ok(()) };
                let name = whiteout::opaque_xattr(self.opts.userxattr);
                sys::fsetxattr(dir.fd.as_fd(), name, b"y").map_err(|e| Error::io("fsetxattr", display, e))
            }
            WhiteoutMode::Apply => {
                if !self.cleared.insert(join(parent)) {
                    return Ok(());
                }
                let Some(dir) = self.whiteout_dir(parent, false, &h.path)? else { return Ok(()) };
                for child in list_dir(dir.fd.as_fd(), &display)? {
                    let cpath = crate::fsutil::child(&dir.path, &child);
                    self.invalidate(&cpath);
                    self.remove(&dir, &child, &cpath, true, &display)?;
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
                let Some(dir) = self.whiteout_dir(parent, true, &h.path)? else { return Ok(()) };
                // Something of that name from this same layer: the whiteout only hides
                // lower layers, so it is dropped (OCI image-spec, "Whiteouts").
                match fstatat(&dir.fd, target, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(_) => return Ok(()),
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(Error::io("fstatat", display, e)),
                }
                self.writable(&dir, || mknodat(&dir.fd, target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))).map_err(
                    |e| match e {
                        Errno::EPERM => Error::NotPermitted {
                            op: "mknodat",
                            path: display.clone(),
                            hint: "overlay whiteouts (char 0:0) need Linux 5.8+ or CAP_MKNOD",
                        },
                        e => Error::io("mknodat", display.clone(), e),
                    },
                )
            }
            WhiteoutMode::Apply => {
                if self.is_added(&full) || !self.cleared.insert(full.clone()) {
                    return Ok(());
                }
                let Some(dir) = self.whiteout_dir(parent, false, &h.path)? else { return Ok(()) };
                self.invalidate(&full);
                self.remove(&dir, target, &full, true, &display).map(drop)
            }
        }
    }
}

/// Give the parent directories a layer extracted by an [`Extractor::for_cache`] created
/// without listing them (`implicit`, from [`Extractor::take_implicit`]) the metadata the
/// same directories have in `lowers` (top first), exactly as [`Extractor::new`] with
/// [`UnpackOptions::parent_lowers`] would have during extraction. Directories no lower
/// has keep what creation gave them. Returns how many bytes of disk the directories
/// use more than before (xattrs may take a block of their own).
pub(crate) fn apply_implicit_parents(
    dest: &std::path::Path,
    implicit: &[Vec<u8>],
    lowers: &[PathBuf],
    opts: &UnpackOptions,
) -> Result<i64> {
    let mut skipped = 0;
    let mut grown = 0i64;
    if implicit.is_empty() || lowers.is_empty() {
        return Ok(grown);
    }
    let root = Root::open(dest)?;
    let meta = MetaPolicy::new(opts);
    for path in implicit {
        let comps = comps_of(path);
        // Every lower is a ready, leased layer: one that cannot be opened (no descriptor
        // left) is an error, not a layer to skip. Opened one at a time, as the search
        // goes down: a tall image costs no more descriptors than a short one.
        let Some(d) = DirMeta::from_lowers(lowers.iter().map(|p| Root::open(p)), &comps)? else { continue };
        let fd = match root.open_dir(&comps, None, path, &mut Vec::new())? {
            Some(fd) => fd,
            None => continue,
        };
        let display = root.display(&comps);
        let blocks = |fd: &OwnedFd| {
            nix::sys::stat::fstat(fd).map(|st| st.st_blocks).map_err(|e| Error::io("fstat", &display, e))
        };
        let before = blocks(&fd)?;
        meta.apply_fd(fd.as_fd(), &d.header(), d.created, &display, d.xattrs.is_some(), &mut skipped)?;
        grown += (blocks(&fd)? - before) * 512;
    }
    Ok(grown)
}

/// An error that says nothing about the tree it happened in: out of descriptors or
/// memory, or an I/O error.
fn is_transient(e: &Error) -> bool {
    matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM | Errno::EIO))
}

/// The image xattrs of a directory in an extracted layer (overlay's own metadata left
/// out, escaped image xattrs under their own names), for a directory this layer creates
/// implicitly in its place. Best effort: what cannot be read is left out.
fn image_xattrs(fd: BorrowedFd<'_>) -> Xattrs {
    let Ok(names) = sys::flistxattr(fd) else { return Vec::new() };
    let mut out = Vec::new();
    for n in names {
        let Some(name) = whiteout::unescape_xattr(&n) else { continue };
        if let Ok(Some(v)) = sys::fgetxattr(fd, &n) {
            out.push((name.into_owned(), v));
        }
    }
    out
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
}
