//! [`CopyBackend`]: the fallback where overlayfs cannot be mounted.
//!
//! `mount` materialises the merged view in the target by copying every layer, bottom
//! first, then the upper, honouring whiteouts (0/0 character devices) and opaque
//! directories exactly as overlayfs would. File data is cloned (`FICLONE`, a reflink)
//! when source and target share a filesystem that supports it, else copied with
//! `copy_file_range`, else read and written.
//!
//! `unmount` folds the sandbox's writes back into the upper in overlayfs format, so the
//! upper holds the same diff it would hold after a kernel overlay, then empties the
//! target. Finding the writes costs a walk of the target's directories plus a `stat`
//! per entry; only changed entries are copied.
//!
//! # How changes are found
//! At the end of `mount` the backend waits until the filesystem clock has moved past
//! the last copied entry, and records that instant (`T`) and the inode of every
//! directory in `<work>/rootfs-cache-copy`. Any later change to an entry (data, mode,
//! owner, xattrs, times, a rename or a new hardlink) sets its ctime past `T`, and any
//! entry added to or removed from a directory sets that directory's ctime past `T`. A
//! directory whose inode differs from the recorded one (renamed into place, or new) is
//! copied whole and marked opaque. Deleted names become whiteouts when a lower has them.
//!
//! The target is read by descriptor without following symlinks, so a sandbox that
//! swaps a directory for a symlink while the fold runs cannot make the backend read
//! files outside the target into the upper.
//!
//! The one thing overlayfs format cannot hold is a 0/0 character device: one created
//! in the target (the kernel overlay refuses with `EPERM`) becomes a whiteout, so the
//! name reads as deleted after unmount.
//!
//! # Crash safety
//! The state file is removed only after the writes are in the upper; while it exists a
//! new `mount` is refused ([`Error::AlreadyMounted`]) and `unmount` can be repeated
//! (folding is idempotent). Emptying the target happens after the state file is renamed
//! to `rootfs-cache-copy.clearing`, so a crash there never turns a half-emptied target
//! into whiteouts. The same marker stands while `mount` copies the view: a mount killed
//! midway leaves a target that `unmount` empties, never folds.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::libc;
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmodat, fstat, fstatat, futimens, mkdirat, mknodat,
    utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, linkat, symlinkat};

use super::{MountBackend, OverlaySpec, checked_spec, spec_problem};
use crate::error::{Error, Result};
use crate::fsutil::{
    child, clear_dir, is_empty_dir, kind, list_dir, open_dir_at, open_dir_path, remove_at, shown, stat_at,
};
use crate::sys;
use crate::unpack::whiteout::opaque_xattr;

pub(crate) const STATE: &str = "rootfs-cache-copy";
pub(crate) const CLEARING: &str = "rootfs-cache-copy.clearing";
const HEADER: &str = "rootfs-cache copy state 1";

/// Copies the layers into the target instead of mounting an overlay (see the module
/// docs). Use it where [`KernelOverlay`](super::KernelOverlay) cannot mount: no
/// overlayfs, no privilege, a nested sandbox. [`detect()`](super::detect) chooses.
///
/// The target must be an empty directory. The work dir holds the backend's state
/// while mounted (so any process can unmount), and the upper receives the writes on
/// unmount, in overlayfs format. Inode numbers in the target are those of the copies.
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyBackend {
    _private: (),
}

impl CopyBackend {
    /// The copy backend.
    pub fn new() -> Self {
        CopyBackend { _private: () }
    }
}

fn exists_at(dir: BorrowedFd<'_>, name: &str, display: &Path) -> Result<bool> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(Error::io("fstatat", display.join(name), e)),
    }
}

impl MountBackend for CopyBackend {
    /// False: the sandbox writes into the target; they reach the upper at unmount.
    fn writes_upper_live(&self) -> bool {
        false
    }

    /// Copies the lowers, bottom first, then the upper into the empty `spec.target`, and
    /// records the backend's state in `spec.work`. If copying fails, the target is emptied
    /// again.
    ///
    /// # Errors
    /// - [`Error::InvalidSpec`]: no lowers, a lower listed twice (by path or through
    ///   different paths), or upper and work on different filesystems;
    /// - [`Error::LimitExceeded`]: more than [`MAX_LOWERS`](super::MAX_LOWERS) lowers;
    /// - [`Error::AlreadyMounted`]: the target is a mount point, or `spec.work` holds a
    ///   copy backend state (mounted already, or an unmount did not finish);
    /// - [`Error::NotEmpty`]: the target is not empty, or
    ///   [`fresh`](super::OverlayOptions::fresh) was asked for and the upper or work dir is
    ///   not;
    /// - [`Error::Unsupported`]: the spec has [data-only lowers](OverlaySpec::data_lowers)
    ///   (a lazy image): only the kernel follows their metacopy placeholders, and a copy
    ///   would hold the placeholders instead of the files. Nothing is touched.
    /// - [`Error::Io`]: a directory of the spec cannot be opened, or copying fails.
    fn mount(&self, spec: &OverlaySpec) -> Result<()> {
        let _span = span!("mount", backend = "copy", target = %spec.target.display(), lowers = spec.lowers.len());
        if !spec.data_lowers.is_empty() {
            return Err(Error::Unsupported {
                what: "data-only lowers (lazy layers) need the kernel overlay backend (Linux 6.5+), \
                       not the copy backend"
                    .into(),
            });
        }
        let c = checked_spec(spec)?;
        let p = &c.paths;
        if let Some(problem) = spec_problem(p)? {
            return Err(problem);
        }
        let work = open_dir_path(&p.work)?;
        if exists_at(work.as_fd(), STATE, &p.work)? || exists_at(work.as_fd(), CLEARING, &p.work)? {
            return Err(Error::AlreadyMounted { path: p.target.clone() });
        }
        if !is_empty_dir(&p.target)? {
            return Err(Error::NotEmpty { path: p.target.clone() });
        }
        let target = open_dir_path(&p.target)?;
        let mut layers: Vec<(OwnedFd, &Path)> = Vec::with_capacity(p.lowers.len() + 1);
        for l in p.lowers.iter().rev() {
            layers.push((open_dir_path(l)?, l));
        }
        layers.push((open_dir_path(&p.upper)?, &p.upper));
        // While the view is being copied it holds nothing of the sandbox's: the
        // `.clearing` marker says so first, so a process killed midway leaves a target
        // that `unmount` empties (never folds: a half copy would read as deletions).
        nix::fcntl::openat(
            &work,
            CLEARING,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| Error::io("openat", p.work.join(CLEARING), e))?;
        let copied = (|| {
            for (fd, path) in &layers {
                let xattrs = Xattrs::Unescape(Xattrs::prefix(c.userxattr));
                copy_layer(fd.as_fd(), target.as_fd(), c.userxattr, xattrs, None, path, &p.target)?;
            }
            let stamp = wait_for_tick(target.as_fd(), &p.target)?;
            let dirs = dir_inodes(target.as_fd(), &p.target)?;
            write_state(work.as_fd(), &p.work, stamp, &dirs)
        })();
        if let Err(e) = copied {
            // Leave the target as it was: empty.
            let _ = clear_dir(target.as_fd(), &p.target);
            let _ = nix::unistd::unlinkat(&work, CLEARING, nix::unistd::UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        // Mounted: from here on the state file speaks (an unmount folds, then clears).
        nix::unistd::unlinkat(&work, CLEARING, nix::unistd::UnlinkatFlags::NoRemoveDir)
            .map_err(|e| Error::io("unlinkat", p.work.join(CLEARING), e))?;
        Ok(())
    }

    /// Folds the writes made in `spec.target` since mount into `spec.upper` (overlayfs
    /// format), then empties the target. Not mounted (no state in `spec.work`, or no
    /// `spec.work` at all) is fine. Repeating an interrupted unmount is safe.
    ///
    /// # Errors
    /// - [`Error::AlreadyMounted`] (naming it) when something is mounted inside the
    ///   target: unmount it first; nothing is folded or deleted;
    /// - [`Error::InvalidImage`] when the state file in `spec.work` is corrupt;
    /// - [`Error::Io`] when a directory cannot be opened, or folding or emptying fails.
    fn unmount(&self, spec: &OverlaySpec) -> Result<()> {
        let _span = span!("unmount", backend = "copy", target = %spec.target.display());
        let display = spec.target.as_path();
        let work = match open_dir_path(&spec.work) {
            Ok(w) => w,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        // The runtime may have mounted volumes (or /proc) inside the materialised tree:
        // folding would copy their files into the upper, and emptying the target would
        // delete through them. Those must be unmounted first.
        if let Some(m) = super::mountinfo::mount_under(&[display], false)? {
            return Err(Error::AlreadyMounted { path: m });
        }
        if exists_at(work.as_fd(), STATE, &spec.work)? {
            let state = read_state(work.as_fd(), &spec.work)?;
            let mut lowers = Vec::with_capacity(spec.lowers.len());
            for l in &spec.lowers {
                lowers.push(open_dir_path(l)?);
            }
            let target = open_dir_path(display)?;
            let upper = open_dir_path(&spec.upper)?;
            let fold = Fold { state, lowers, upper, userxattr: spec.userxattr(), display, links: HashMap::new() };
            fold.run(target.as_fd())?;
            nix::fcntl::renameat(&work, STATE, &work, CLEARING)
                .map_err(|e| Error::io("renameat", spec.work.join(STATE), e))?;
        }
        if exists_at(work.as_fd(), CLEARING, &spec.work)? {
            match open_dir_path(display) {
                Ok(target) => clear_dir(target.as_fd(), display)?,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
            nix::unistd::unlinkat(&work, CLEARING, nix::unistd::UnlinkatFlags::NoRemoveDir)
                .map_err(|e| Error::io("unlinkat", spec.work.join(CLEARING), e))?;
        }
        Ok(())
    }
}

fn is_dir(st: &FileStat) -> bool {
    kind(st) == SFlag::S_IFDIR
}

pub(crate) fn is_whiteout(st: &FileStat) -> bool {
    kind(st) == SFlag::S_IFCHR && st.st_rdev == 0
}

fn ctime(st: &FileStat) -> (i64, i64) {
    (st.st_ctime, st.st_ctime_nsec)
}

pub(crate) fn is_opaque(dir: BorrowedFd<'_>, userxattr: bool) -> bool {
    matches!(sys::fgetxattr(dir, opaque_xattr(userxattr)), Ok(Some(v)) if v == b"y")
}

/// How xattr names change on the way. Layers store image xattrs in overlay's own
/// namespace escaped (`P.overlay.X` for `P.X`, with `P` = `trusted.overlay.`, or
/// `user.overlay.` under `userxattr`) and overlay metadata unescaped; the target is a
/// plain directory. Like the kernel, only the active namespace is special.
#[derive(Clone, Copy)]
pub(crate) enum Xattrs {
    /// Layer → target: drop overlay metadata, unescape image xattrs.
    Unescape(&'static [u8]),
    /// Target → upper: escape anything in the overlay namespace.
    Escape(&'static [u8]),
    /// Layer → layer: drop overlay metadata, keep escaped image xattrs escaped.
    Keep(&'static [u8]),
}

impl Xattrs {
    pub(crate) fn prefix(userxattr: bool) -> &'static [u8] {
        if userxattr { b"user.overlay." } else { b"trusted.overlay." }
    }

    /// The destination name for source xattr `name`; `None` to drop it.
    pub(crate) fn translate(self, name: &[u8]) -> Option<Vec<u8>> {
        match self {
            Xattrs::Unescape(p) => match name.strip_prefix(p) {
                None => Some(name.to_vec()),
                Some(rest) => rest.strip_prefix(b"overlay.").map(|r| [p, r].concat()),
            },
            Xattrs::Escape(p) => match name.strip_prefix(p) {
                None => Some(name.to_vec()),
                Some(rest) => Some([p, b"overlay.", rest].concat()),
            },
            Xattrs::Keep(p) => match name.strip_prefix(p) {
                Some(rest) if !rest.starts_with(b"overlay.") => None,
                _ => Some(name.to_vec()),
            },
        }
    }

    /// Whether a destination xattr is overlay's own metadata (an upper's opaque marker),
    /// which syncing must leave alone.
    fn is_private(self, name: &[u8]) -> bool {
        match self {
            Xattrs::Unescape(_) => false,
            Xattrs::Escape(p) | Xattrs::Keep(p) => {
                name.strip_prefix(p).is_some_and(|rest| !rest.starts_with(b"overlay."))
            }
        }
    }
}

/// Copies ownership, xattrs, mode and (unless a directory, done after its children)
/// times of `sdir/sname` onto `ddir/dname`, never following symlinks.
pub(crate) fn copy_meta(
    sdir: BorrowedFd<'_>,
    sname: &[u8],
    st: &FileStat,
    ddir: BorrowedFd<'_>,
    dname: &[u8],
    xattrs: Xattrs,
    display: &Path,
) -> Result<()> {
    let symlink = kind(st) == SFlag::S_IFLNK;
    match fchownat(
        ddir,
        dname,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(()) => {}
        // Unprivileged: files stay owned by us, as rootless extraction leaves them.
        Err(Errno::EPERM | Errno::EINVAL) if crate::privilege::unprivileged() => {}
        Err(e) => return Err(Error::io("fchownat", display, e)),
    }
    let names = match sys::listxattr_at_nofollow(sdir, sname) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP)) => Vec::new(),
        Err(e) => return Err(Error::io("llistxattr", display, e)),
    };
    let mut wanted = HashSet::new();
    for name in names {
        let Some(to) = xattrs.translate(&name) else { continue };
        let Some(value) =
            sys::getxattr_at_nofollow(sdir, sname, &name).map_err(|e| Error::io("lgetxattr", display, e))?
        else {
            continue;
        };
        match sys::setxattr_at_nofollow(ddir, dname, &to, &value) {
            Ok(()) => {}
            // `trusted.*` needs privilege; `user.*` is refused on symlinks; some
            // filesystems have no xattrs. overlayfs would show them; a copy cannot.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EOPNOTSUPP)) => {}
            Err(e) => return Err(Error::io("lsetxattr", display, e)),
        }
        wanted.insert(to);
    }
    if is_dir(st) {
        // A directory may already exist at the destination (merged from a lower layer,
        // or the upper's copy): drop what the source no longer has.
        let have = match sys::listxattr_at_nofollow(ddir, dname) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP)) => Vec::new(),
            Err(e) => return Err(Error::io("llistxattr", display, e)),
        };
        for name in have.iter().filter(|n| !wanted.contains(*n) && !xattrs.is_private(n)) {
            match sys::removexattr_at_nofollow(ddir, dname, name) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EPERM | libc::EOPNOTSUPP)) => {}
                Err(e) => return Err(Error::io("lremovexattr", display, e)),
            }
        }
    }
    if !symlink {
        // After chown, which clears set-id bits. Not a symlink, and created by us in a
        // directory we hold open, so following is safe.
        fchmodat(ddir, dname, Mode::from_bits_truncate(st.st_mode & 0o7777), FchmodatFlags::FollowSymlink)
            .map_err(|e| Error::io("fchmodat", display, e))?;
    }
    if !is_dir(st) {
        set_times(ddir, dname, st, display)?;
    }
    Ok(())
}

fn set_times(ddir: BorrowedFd<'_>, dname: &[u8], st: &FileStat, display: &Path) -> Result<()> {
    let at = TimeSpec::new(st.st_atime, st.st_atime_nsec);
    let mt = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    utimensat(ddir, dname, &at, &mt, UtimensatFlags::NoFollowSymlink).map_err(|e| Error::io("utimensat", display, e))
}

pub(crate) fn set_dir_times(dir: BorrowedFd<'_>, st: &FileStat, display: &Path) -> Result<()> {
    let at = TimeSpec::new(st.st_atime, st.st_atime_nsec);
    let mt = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    futimens(dir, &at, &mt).map_err(|e| Error::io("futimens", display, e))
}

/// Copies a regular file's data: a reflink when the filesystem can, else
/// `copy_file_range`, else read and write.
pub(crate) fn copy_data(src: &File, dst: &File, display: &Path) -> Result<()> {
    if sys::ficlone(dst.as_fd(), src.as_fd()).is_ok() {
        return Ok(());
    }
    let mut kernel_copy = true;
    loop {
        if kernel_copy {
            match sys::copy_file_range(src.as_fd(), dst.as_fd(), 1 << 30) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                    Errno::EINTR => continue,
                    Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL => kernel_copy = false,
                    _ => return Err(Error::io("copy_file_range", display, e)),
                },
            }
        } else {
            let (mut s, mut d) = (src, dst);
            io::copy(&mut s, &mut d).map_err(|e| Error::io("write", display, e))?;
            return Ok(());
        }
    }
}

/// Opens the regular file `dir/name` for reading without ever opening anything else:
/// the entry is pinned with `O_PATH|O_NOFOLLOW` and checked, then that same inode is
/// reopened through `/proc/self/fd`. A sandbox swapping in a FIFO, a device or a
/// symlink between a `stat` and the open gets an error, never a blocking read or a
/// device's open side effects.
pub(crate) fn open_regular_at(dir: BorrowedFd<'_>, name: &[u8], display: &Path) -> Result<File> {
    let pinned = openat(dir, name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("openat", display, e))?;
    let st = fstat(pinned.as_fd()).map_err(|e| Error::io("fstat", display, e))?;
    if kind(&st) != SFlag::S_IFREG {
        return Err(Error::io("openat", display, Errno::EAGAIN));
    }
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    let fd = nix::fcntl::open(path.as_str(), OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", display, e))?;
    Ok(File::from(fd))
}

/// Creates a copy of the non-directory `sdir/sname` (described by `st`) at
/// `ddir/dname`, which must not exist.
pub(crate) fn copy_leaf(
    sdir: BorrowedFd<'_>,
    sname: &[u8],
    st: &FileStat,
    ddir: BorrowedFd<'_>,
    dname: &[u8],
    xattrs: Xattrs,
    display: &Path,
) -> Result<()> {
    match kind(st) {
        SFlag::S_IFREG => {
            let src = open_regular_at(sdir, sname, display)?;
            let now = fstat(src.as_fd()).map_err(|e| Error::io("fstat", display, e))?;
            if now.st_ino != st.st_ino {
                // Replaced between stat and open: the caller's ctime check will see it next time.
                return Err(Error::io("openat", display, Errno::EAGAIN));
            }
            let dst = openat(
                ddir,
                dname,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| Error::io("openat", display, e))?;
            copy_data(&src, &File::from(dst), display)?;
        }
        SFlag::S_IFLNK => {
            let link = readlinkat(sdir, sname).map_err(|e| Error::io("readlinkat", display, e))?;
            symlinkat(link.as_os_str(), ddir, dname).map_err(|e| Error::io("symlinkat", display, e))?;
        }
        k => {
            mknodat(ddir, dname, k, Mode::from_bits_truncate(0o600), st.st_rdev)
                .map_err(|e| Error::io("mknodat", display, e))?;
        }
    }
    copy_meta(sdir, sname, st, ddir, dname, xattrs, display)
}

/// Data-only lowers ([`OverlaySpec::data_lowers`]), opened: where [`copy_layer`] takes
/// the data of a lazy skeleton's metacopy placeholders from, as the kernel would.
pub(crate) struct DataLowers {
    roots: Vec<crate::root::Root>,
    metacopy: Vec<u8>,
    redirect: Vec<u8>,
}

impl DataLowers {
    /// Opens `dirs` (top first); overlay metadata in `user.overlay.*` under `userxattr`.
    pub(crate) fn open(dirs: &[std::path::PathBuf], userxattr: bool) -> Result<DataLowers> {
        let roots = dirs.iter().map(|d| crate::root::Root::open(d)).collect::<Result<Vec<_>>>()?;
        let prefix = Xattrs::prefix(userxattr);
        Ok(DataLowers { roots, metacopy: [prefix, b"metacopy"].concat(), redirect: [prefix, b"redirect"].concat() })
    }

    /// For the regular file `dir/name` (described by `st`) of a layer: `None` unless it
    /// is a metacopy placeholder; else the file holding its data, the placeholder's
    /// absolute redirect looked up in the data-only lowers, top first (by descriptor:
    /// no symlink, no `..`). The kernel looks in the normal lowers below first; a lazy
    /// skeleton's redirects only ever name data-only files, so this does not.
    fn data_of(&self, dir: BorrowedFd<'_>, name: &[u8], st: &FileStat, display: &Path) -> Result<Option<File>> {
        let get = |xname: &[u8]| match sys::getxattr_at_nofollow(dir, name, xname) {
            Ok(v) => Ok(v),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
            Err(e) => Err(Error::io("lgetxattr", display, e)),
        };
        if get(&self.metacopy)?.is_none() {
            return Ok(None);
        }
        let invalid = |reason: String| Error::InvalidImage { path: display.to_path_buf(), reason };
        let redirect = get(&self.redirect)?.unwrap_or_default();
        let Some(rel) = redirect.strip_prefix(b"/") else {
            return Err(invalid(
                "a metacopy placeholder without an absolute redirect (only data-only lowers are followed)".into(),
            ));
        };
        let comps = crate::root::split_path(rel).map_err(|r| invalid(format!("redirect: {r}")))?;
        let Some((last, parents)) = comps.split_last() else {
            return Err(invalid("a redirect to the root".into()));
        };
        for root in &self.roots {
            let Some(parent) = root.open_dir(parents, None, rel, &mut Vec::new())? else { continue };
            let shown = root.display(&comps);
            if stat_at(parent.as_fd(), last, &shown)?.is_none() {
                continue;
            }
            let data = open_regular_at(parent.as_fd(), last, &shown)?;
            let size = fstat(data.as_fd()).map_err(|e| Error::io("fstat", &shown, e))?.st_size;
            if size != st.st_size {
                return Err(invalid(format!(
                    "a metacopy placeholder of {} bytes over {} of {size} bytes",
                    st.st_size,
                    shown.display()
                )));
            }
            return Ok(Some(data));
        }
        Err(invalid(format!("redirect {} is in no data-only lower", String::from_utf8_lossy(&redirect))))
    }
}

/// Applies one layer (or the upper) to `dst` as overlayfs stacks it: whiteouts remove,
/// opaque directories replace, anything else replaces what is there. Hardlinks inside
/// the layer stay hardlinks. With `data`, a metacopy placeholder becomes a copy of the
/// file it redirects to (with the placeholder's metadata), as the kernel shows it.
pub(crate) fn copy_layer(
    src_root: BorrowedFd<'_>,
    dst_root: BorrowedFd<'_>,
    userxattr: bool,
    xattrs: Xattrs,
    data: Option<&DataLowers>,
    src_path: &Path,
    dst_path: &Path,
) -> Result<()> {
    struct Frame {
        src: OwnedFd,
        dst: OwnedFd,
        path: Vec<u8>,
        names: Vec<Vec<u8>>,
        st: FileStat,
    }
    let src = open_dir_at(src_root, b".", src_path)?;
    let dst = open_dir_at(dst_root, b".", dst_path)?;
    let st = fstat(src.as_fd()).map_err(|e| Error::io("fstat", src_path, e))?;
    // The merged root carries the top layer's metadata: each layer overwrites it.
    copy_meta(src.as_fd(), b".", &st, dst.as_fd(), b".", xattrs, dst_path)?;
    let names = list_dir(src.as_fd(), src_path)?;
    let mut stack = vec![Frame { src, dst, path: Vec::new(), names, st }];
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.pop() else {
            let done = stack.pop().expect("non-empty");
            set_dir_times(done.dst.as_fd(), &done.st, &shown(dst_path, &done.path))?;
            continue;
        };
        let path = child(&top.path, &name);
        let (sshow, dshow) = (shown(src_path, &path), shown(dst_path, &path));
        let Some(st) = stat_at(top.src.as_fd(), &name, &sshow)? else { continue };
        let existing = stat_at(top.dst.as_fd(), &name, &dshow)?;
        if is_whiteout(&st) {
            if existing.is_some() {
                remove_at(top.dst.as_fd(), &name, &dshow)?;
            }
            continue;
        }
        if is_dir(&st) {
            let sub = open_dir_at(top.src.as_fd(), &name, &sshow)?;
            let merge = existing.as_ref().is_some_and(is_dir) && !is_opaque(sub.as_fd(), userxattr);
            if !merge {
                if existing.is_some() {
                    remove_at(top.dst.as_fd(), &name, &dshow)?;
                }
                mkdirat(top.dst.as_fd(), name.as_slice(), Mode::from_bits_truncate(0o700))
                    .map_err(|e| Error::io("mkdirat", &dshow, e))?;
            }
            copy_meta(top.src.as_fd(), &name, &st, top.dst.as_fd(), &name, xattrs, &dshow)?;
            let dst = open_dir_at(top.dst.as_fd(), &name, &dshow)?;
            let names = list_dir(sub.as_fd(), &sshow)?;
            stack.push(Frame { src: sub, dst, path, names, st });
            continue;
        }
        if existing.is_some() {
            remove_at(top.dst.as_fd(), &name, &dshow)?;
        }
        if st.st_nlink > 1 && kind(&st) != SFlag::S_IFDIR {
            if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
                linkat(dst_root, first.as_slice(), top.dst.as_fd(), name.as_slice(), AtFlags::empty())
                    .map_err(|e| Error::io("linkat", &dshow, e))?;
                continue;
            }
            links.insert((st.st_dev, st.st_ino), path.clone());
        }
        let placeholder = match data {
            Some(d) if kind(&st) == SFlag::S_IFREG => d.data_of(top.src.as_fd(), &name, &st, &sshow)?,
            _ => None,
        };
        match placeholder {
            Some(file) => {
                let dst = openat(
                    top.dst.as_fd(),
                    name.as_slice(),
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| Error::io("openat", &dshow, e))?;
                copy_data(&file, &File::from(dst), &dshow)?;
                // The placeholder's metadata; its overlay metadata (metacopy, redirect) is
                // dropped as all overlay metadata is.
                copy_meta(top.src.as_fd(), &name, &st, top.dst.as_fd(), &name, xattrs, &dshow)?;
            }
            None => copy_leaf(top.src.as_fd(), &name, &st, top.dst.as_fd(), &name, xattrs, &dshow)?,
        }
    }
    Ok(())
}

/// Waits until the target filesystem's clock for new ctimes has moved past every
/// entry copied so far, and returns the last instant before that.
///
/// The stamp lives in the target itself so it has the target filesystem's timestamp
/// granularity. Removing it changes the root's ctime, so the root always counts as
/// changed (a metadata sync and a scan of its names, nothing more); its times are put
/// back so the stamp leaves no trace in the view.
fn wait_for_tick(target: BorrowedFd<'_>, display: &Path) -> Result<(i64, i64)> {
    let root = fstat(target).map_err(|e| Error::io("fstat", display, e))?;
    // A layer may hold any name: pick one that is free.
    let mut n = 0u32;
    let (name, fd) = loop {
        let name = format!(".rootfs-cache-copy-stamp-{}-{n}", std::process::id());
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC;
        match openat(target, name.as_str(), flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => break (name, fd),
            Err(Errno::EEXIST) if n < 1000 => n += 1,
            Err(e) => return Err(Error::io("openat", display.join(&name), e)),
        }
    };
    let name = name.as_str();
    let shown = display.join(name);
    let first = ctime(&fstat(fd.as_fd()).map_err(|e| Error::io("fstat", &shown, e))?);
    let mut result = Err(Error::io("fstat", &shown, Errno::ETIMEDOUT));
    for _ in 0..5000 {
        nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(0o600))
            .map_err(|e| Error::io("fchmod", &shown, e))?;
        let now = ctime(&fstat(fd.as_fd()).map_err(|e| Error::io("fstat", &shown, e))?);
        if now > first {
            result = Ok(first);
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
    drop(fd);
    nix::unistd::unlinkat(target, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
        .map_err(|e| Error::io("unlinkat", &shown, e))?;
    set_dir_times(target, &root, display)?;
    result
}

/// The inode of every directory in the tree, by relative path (`""` for the root).
fn dir_inodes(root: BorrowedFd<'_>, display: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    let fd = open_dir_at(root, b".", display)?;
    let st = fstat(fd.as_fd()).map_err(|e| Error::io("fstat", display, e))?;
    let mut out = vec![(st.st_ino, Vec::new())];
    let names = list_dir(fd.as_fd(), display)?;
    let mut stack = vec![(fd, Vec::<u8>::new(), names)];
    while let Some((fd, path, names)) = stack.last_mut() {
        let Some(name) = names.pop() else {
            stack.pop();
            continue;
        };
        let p = child(path, &name);
        let show = shown(display, &p);
        let Some(st) = stat_at(fd.as_fd(), &name, &show)? else { continue };
        if is_dir(&st) {
            let sub = open_dir_at(fd.as_fd(), &name, &show)?;
            out.push((st.st_ino, p.clone()));
            let names = list_dir(sub.as_fd(), &show)?;
            stack.push((sub, p, names));
        }
    }
    Ok(out)
}

struct State {
    stamp: (i64, i64),
    dirs: HashMap<Vec<u8>, u64>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (s.len() % 2 == 0).then_some(())?;
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn write_state(work: BorrowedFd<'_>, display: &Path, stamp: (i64, i64), dirs: &[(u64, Vec<u8>)]) -> Result<()> {
    let mut text = format!("{HEADER}\n{} {}\n", stamp.0, stamp.1);
    for (ino, path) in dirs {
        text.push_str(&format!("{ino} {}\n", hex(path)));
    }
    let tmp = format!("{STATE}.tmp");
    let shown = display.join(&tmp);
    let fd = openat(
        work,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| Error::io("openat", &shown, e))?;
    let mut f = File::from(fd);
    f.write_all(text.as_bytes()).map_err(|e| Error::io("write", &shown, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &shown, e))?;
    nix::fcntl::renameat(work, tmp.as_str(), work, STATE).map_err(|e| Error::io("renameat", &shown, e))
}

fn read_state(work: BorrowedFd<'_>, display: &Path) -> Result<State> {
    let path = display.join(STATE);
    let fd = openat(work, STATE, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("openat", &path, e))?;
    let text = io::read_to_string(File::from(fd)).map_err(|e| Error::io("read", &path, e))?;
    let bad = |reason: &str| Error::InvalidImage { path: path.clone(), reason: reason.to_string() };
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(bad("not a copy backend state file"));
    }
    let stamp = lines
        .next()
        .and_then(|l| l.split_once(' '))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| bad("bad timestamp line"))?;
    let mut dirs = HashMap::new();
    for l in lines {
        let (ino, p) = l.split_once(' ').ok_or_else(|| bad("bad directory line"))?;
        let ino = ino.parse().map_err(|_| bad("bad inode number"))?;
        dirs.insert(unhex(p).ok_or_else(|| bad("bad path"))?, ino);
    }
    Ok(State { stamp, dirs })
}

/// Folds the target's changes since mount into the upper.
struct Fold<'a> {
    state: State,
    lowers: Vec<OwnedFd>,
    upper: OwnedFd,
    userxattr: bool,
    display: &'a Path,
    /// Target (device, inode) → upper path of its first copy, to keep hardlinks.
    links: HashMap<(u64, u64), Vec<u8>>,
}

struct Frame {
    /// The target directory.
    fd: OwnedFd,
    st: FileStat,
    path: Vec<u8>,
    names: Vec<Vec<u8>>,
    /// The matching upper directory, once it exists.
    upper: Option<OwnedFd>,
    /// Everything under here is new: copy it all.
    copy_all: bool,
}

impl Fold<'_> {
    fn changed(&self, st: &FileStat) -> bool {
        ctime(st) > self.state.stamp
    }

    fn run(mut self, target: BorrowedFd<'_>) -> Result<()> {
        let fd = open_dir_at(target, b".", self.display)?;
        let st = fstat(fd.as_fd()).map_err(|e| Error::io("fstat", self.display, e))?;
        let upper = open_dir_at(self.upper.as_fd(), b".", self.display)?;
        let changed = self.changed(&st) || self.state.dirs.get(&Vec::new()) != Some(&st.st_ino);
        let names = list_dir(fd.as_fd(), self.display)?;
        let mut stack = vec![Frame { fd, st, path: Vec::new(), names, upper: Some(upper), copy_all: false }];
        if changed {
            self.sync_dir(&mut stack, false)?;
        }
        while let Some(top) = stack.last_mut() {
            let Some(name) = top.names.pop() else {
                // Any upper directory we touched (created, or added entries to) gets the
                // target's times back, as overlayfs restores a parent's times after a
                // copy-up. Children are done, so nothing changes it afterwards.
                let done = stack.pop().expect("non-empty");
                if let Some(u) = &done.upper {
                    set_dir_times(u.as_fd(), &done.st, &shown(self.display, &done.path))?;
                }
                continue;
            };
            let path = child(&top.path, &name);
            let show = shown(self.display, &path);
            let Some(st) = stat_at(top.fd.as_fd(), &name, &show)? else { continue };
            if is_dir(&st) {
                let fd = open_dir_at(top.fd.as_fd(), &name, &show)?;
                let st = fstat(fd.as_fd()).map_err(|e| Error::io("fstat", &show, e))?;
                let new = self.state.dirs.get(&path) != Some(&st.st_ino);
                let copy_all = top.copy_all || new;
                let changed = copy_all || self.changed(&st);
                let names = list_dir(fd.as_fd(), &show)?;
                stack.push(Frame { fd, st, path, names, upper: None, copy_all });
                if changed {
                    // A directory new at this path (created, or renamed here) hides
                    // whatever the lowers have under the same name: opaque.
                    self.sync_dir(&mut stack, new)?;
                }
            } else if top.copy_all || self.changed(&st) {
                // A 0/0 character device made in the target (overlayfs refuses to create
                // one) lands in the upper as what it means there: a whiteout.
                self.copy_up(&mut stack, &name, &st, &path)?;
            }
        }
        Ok(())
    }

    /// Makes sure the upper has the directory of `stack[depth]`, creating missing
    /// parents with the target's metadata (overlayfs copy-up of parents).
    fn upper_dir(&self, stack: &mut [Frame], depth: usize) -> Result<()> {
        if stack[depth].upper.is_some() {
            return Ok(());
        }
        self.upper_dir(stack, depth - 1)?;
        let (parents, rest) = stack.split_at_mut(depth);
        let parent = &parents[depth - 1];
        let me = &mut rest[0];
        let name = me.path.rsplit(|&b| b == b'/').next().expect("a name").to_vec();
        let show = shown(self.display, &me.path);
        let pu = parent.upper.as_ref().expect("ensured").as_fd();
        match stat_at(pu, &name, &show)? {
            Some(st) if is_dir(&st) => {}
            existing => {
                if existing.is_some() {
                    remove_at(pu, &name, &show)?;
                }
                mkdirat(pu, name.as_slice(), Mode::from_bits_truncate(0o700))
                    .map_err(|e| Error::io("mkdirat", &show, e))?;
                copy_meta(
                    parent.fd.as_fd(),
                    &name,
                    &me.st,
                    pu,
                    &name,
                    Xattrs::Escape(Xattrs::prefix(self.userxattr)),
                    &show,
                )?;
                let u = open_dir_at(pu, &name, &show)?;
                set_dir_times(u.as_fd(), &me.st, &show)?;
                me.upper = Some(u);
                return Ok(());
            }
        }
        me.upper = Some(open_dir_at(pu, &name, &show)?);
        Ok(())
    }

    /// The top frame's directory changed: bring its upper copy's metadata up to date
    /// and record deletions. With `fresh`, replace the upper directory by an empty,
    /// opaque one.
    fn sync_dir(&self, stack: &mut [Frame], fresh: bool) -> Result<()> {
        let depth = stack.len() - 1;
        let show = shown(self.display, &stack[depth].path);
        if depth > 0 {
            if fresh {
                let (parents, rest) = stack.split_at_mut(depth);
                self.upper_dir(parents, depth - 1)?;
                let parent = &parents[depth - 1];
                let me = &mut rest[0];
                let name = me.path.rsplit(|&b| b == b'/').next().expect("a name").to_vec();
                let pu = parent.upper.as_ref().expect("ensured").as_fd();
                if stat_at(pu, &name, &show)?.is_some() {
                    remove_at(pu, &name, &show)?;
                }
                mkdirat(pu, name.as_slice(), Mode::from_bits_truncate(0o700))
                    .map_err(|e| Error::io("mkdirat", &show, e))?;
                let u = open_dir_at(pu, &name, &show)?;
                sys::fsetxattr(u.as_fd(), opaque_xattr(self.userxattr), b"y")
                    .map_err(|e| Error::io("fsetxattr", &show, e))?;
                me.upper = Some(u);
            } else {
                self.upper_dir(stack, depth)?;
            }
            let parent = &stack[depth - 1];
            let me = &stack[depth];
            let name = me.path.rsplit(|&b| b == b'/').next().expect("a name");
            let pu = parent.upper.as_ref().expect("ensured").as_fd();
            copy_meta(
                parent.fd.as_fd(),
                name,
                &me.st,
                pu,
                name,
                Xattrs::Escape(Xattrs::prefix(self.userxattr)),
                &show,
            )?;
        } else {
            let me = &stack[0];
            let u = me.upper.as_ref().expect("root").as_fd();
            copy_meta(me.fd.as_fd(), b".", &me.st, u, b".", Xattrs::Escape(Xattrs::prefix(self.userxattr)), &show)?;
        }
        if fresh {
            return Ok(());
        }
        // Deletions: names the merged view had (lowers, or the upper's own entries)
        // that the target no longer has.
        let me = &stack[depth];
        let u = me.upper.as_ref().expect("ensured").as_fd();
        let now: HashSet<Vec<u8>> = list_dir(me.fd.as_fd(), &show)?.into_iter().collect();
        let lower = self.lower_names(&me.path)?;
        let mut gone: HashSet<Vec<u8>> = lower.iter().filter(|n| !now.contains(*n)).cloned().collect();
        gone.extend(list_dir(u, &show)?.into_iter().filter(|n| !now.contains(n)));
        for name in gone {
            let cshow = shown(self.display, &child(&me.path, &name));
            let existing = stat_at(u, &name, &cshow)?;
            let needs_whiteout = lower.contains(&name);
            if existing.as_ref().is_some_and(is_whiteout) && needs_whiteout {
                continue;
            }
            if existing.is_some() {
                remove_at(u, &name, &cshow)?;
            }
            if needs_whiteout {
                mknodat(u, name.as_slice(), SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), 0)
                    .map_err(|e| Error::io("mknodat", &cshow, e))?;
            }
        }
        Ok(())
    }

    fn copy_up(&mut self, stack: &mut [Frame], name: &[u8], st: &FileStat, path: &[u8]) -> Result<()> {
        let depth = stack.len() - 1;
        self.upper_dir(stack, depth)?;
        let top = &stack[depth];
        let u = top.upper.as_ref().expect("ensured").as_fd();
        let show = shown(self.display, path);
        if stat_at(u, name, &show)?.is_some() {
            remove_at(u, name, &show)?;
        }
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&(st.st_dev, st.st_ino)) {
                return linkat(self.upper.as_fd(), first.as_slice(), u, name, AtFlags::empty())
                    .map_err(|e| Error::io("linkat", &show, e));
            }
            self.links.insert((st.st_dev, st.st_ino), path.to_vec());
        }
        copy_leaf(top.fd.as_fd(), name, st, u, name, Xattrs::Escape(Xattrs::prefix(self.userxattr)), &show)
    }

    /// The names the lowers alone show in directory `path`, resolved as overlayfs does.
    fn lower_names(&self, path: &[u8]) -> Result<HashSet<Vec<u8>>> {
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
        let mut seen = HashSet::new();
        let mut whited = HashSet::new();
        'layers: for lower in &self.lowers {
            let mut fd = open_dir_at(lower.as_fd(), b".", self.display)?;
            let mut last = false;
            for c in &comps {
                match stat_at(fd.as_fd(), c, self.display)? {
                    None => continue 'layers,
                    Some(st) if !is_dir(&st) => break 'layers,
                    Some(_) => {
                        fd = open_dir_at(fd.as_fd(), c, self.display)?;
                        last |= is_opaque(fd.as_fd(), self.userxattr);
                    }
                }
            }
            for name in list_dir(fd.as_fd(), self.display)? {
                if seen.contains(&name) || whited.contains(&name) {
                    continue;
                }
                match stat_at(fd.as_fd(), &name, self.display)? {
                    Some(st) if is_whiteout(&st) => whited.insert(name),
                    Some(_) => seen.insert(name),
                    None => false,
                };
            }
            if last {
                break;
            }
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        for b in [&b""[..], b"a", b"usr/lib/\xff\x00x"] {
            assert_eq!(unhex(&hex(b)).unwrap(), b);
        }
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
