//! File-system helpers shared by the extraction, mount, workspace and cache code.
//!
//! What belongs here: small descriptor-based primitives that know nothing about
//! overlayfs, tar or the cache layout: open a directory (by path, or by name under a
//! descriptor without following symlinks), `lstat` a name, list a directory, remove a
//! tree or a directory's entries, build the relative and displayed paths of a walk.
//! They depend only on `error` and `sys`.
//!
//! Why a module of their own: `unpack`, `mount`, `workspace` and `cache` all need
//! them. Kept in `unpack` and `mount::copy`, where they were first written, they made
//! those two modules depend on each other. Overlay-specific rules (whiteouts, opaque
//! directories, xattr escaping, copying a layer) do not belong here: they stay in
//! `unpack::whiteout` and `mount::copy`.
//!
//! Like every module but `sys`, no `unsafe` code here.
#![forbid(unsafe_code)]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use crate::error::{Error, Result};

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// Opens the directory at `p` (following symlinks, as a path from the caller is meant).
pub(crate) fn open_dir_path(p: &Path) -> Result<OwnedFd> {
    nix::fcntl::open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", p, e))
}

/// Opens the directory `dir/name` without following a symlink there.
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8], display: &Path) -> Result<OwnedFd> {
    openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| Error::io("openat", display, e))
}

/// `lstat` of `dir/name`; `None` when it does not exist.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &[u8], display: &Path) -> Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(Error::io("fstatat", display, e)),
    }
}

/// The file type bits of `st` (`S_IFDIR`, `S_IFREG`, ...).
pub(crate) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Whether the directory at `path` has no entries besides `.` and `..`.
pub(crate) fn is_empty_dir(path: &Path) -> Result<bool> {
    let fd = open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", path, e))?;
    crate::sys::dir_is_empty(fd.as_fd()).map_err(|e| Error::io("getdents64", path, e))
}

/// Removes `dir/name`, whatever it is (a directory with everything under it).
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &[u8], display: &Path) -> Result<()> {
    remove_tree(dir, name, name, None, display).map(drop)
}

/// Removes every entry of `dir`, keeping `dir` itself.
pub(crate) fn clear_dir(dir: BorrowedFd<'_>, display: &Path) -> Result<()> {
    for name in list_dir(dir, display)? {
        remove_at(dir, &name, display)?;
    }
    Ok(())
}

/// `path/name`, or `name` at the root (`path` empty): relative paths inside a walk.
pub(crate) fn child(path: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(path.len() + 1 + name.len());
    if !path.is_empty() {
        p.extend_from_slice(path);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// `root/rel` for error messages (`root` itself when `rel` is empty).
pub(crate) fn shown(root: &Path, rel: &[u8]) -> std::path::PathBuf {
    if rel.is_empty() { root.to_path_buf() } else { root.join(std::ffi::OsStr::from_bytes(rel)) }
}

/// The names in directory `fd`, without `.` and `..`.
pub(crate) fn list_dir(fd: BorrowedFd<'_>, display: &std::path::Path) -> Result<Vec<Vec<u8>>> {
    crate::sys::dir_names(fd).map_err(|e| Error::io("getdents64", display, e))
}

/// Decides which paths [`remove_tree`] keeps.
pub(crate) type KeepFn<'a> = dyn Fn(&[u8]) -> bool + 'a;

/// Remove `dir/name` and everything under it, by descriptor, never following symlinks.
/// Paths in `keep` (and their ancestors) survive. Returns whether anything was kept.
///
/// Iterative, with one descriptor per level being removed: a hostile archive can build
/// a chain of directories deeper than any thread's stack would survive in a recursive
/// walk; here the depth is bounded by the descriptor limit, and exceeding it is an
/// `EMFILE` error, not a crash. An unwritable directory (unprivileged, read-only mode)
/// gets owner rwx once so its entries can be removed.
pub(crate) fn remove_tree(
    dir: BorrowedFd<'_>,
    name: &[u8],
    path: &[u8],
    keep: Option<&KeepFn<'_>>,
    display: &std::path::Path,
) -> Result<bool> {
    struct Frame {
        fd: OwnedFd,
        name: Vec<u8>,
        path: Vec<u8>,
        children: Vec<Vec<u8>>,
        kept: bool,
        unlocked: bool,
    }
    let kept_path = |p: &[u8]| keep.is_some_and(|k| k(p));
    let open = |parent: BorrowedFd<'_>, name: &[u8]| -> Result<Option<(OwnedFd, Vec<Vec<u8>>)>> {
        match openat(parent, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => {
                let children = list_dir(fd.as_fd(), display)?;
                Ok(Some((fd, children)))
            }
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(Error::io("openat", display, e)),
        }
    };
    if kept_path(path) {
        return Ok(true);
    }
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(false),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(Error::io("unlinkat", display, e)),
    }
    let Some((fd, children)) = open(dir, name)? else { return Ok(false) };
    let mut stack =
        vec![Frame { fd, name: name.to_vec(), path: path.to_vec(), children, kept: false, unlocked: false }];
    while let Some(top) = stack.last_mut() {
        if let Some(child) = top.children.pop() {
            let cpath = self::child(&top.path, &child);
            if kept_path(&cpath) {
                top.kept = true;
                continue;
            }
            match unlinkat(&top.fd, child.as_slice(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::EISDIR) => {
                    if let Some((fd, children)) = open(top.fd.as_fd(), &child)? {
                        stack.push(Frame { fd, name: child, path: cpath, children, kept: false, unlocked: false });
                    }
                }
                Err(Errno::EACCES) if !top.unlocked => {
                    top.unlocked = true;
                    fchmod(&top.fd, Mode::from_bits_truncate(0o700)).map_err(|e| Error::io("fchmod", display, e))?;
                    top.children.push(child); // retry it
                }
                Err(e) => return Err(Error::io("unlinkat", display, e)),
            }
            continue;
        }
        // All children handled: remove this directory from its parent, unless it holds
        // something kept.
        let done = stack.pop().expect("non-empty");
        let Some(parent) = stack.last_mut() else {
            if !done.kept {
                unlinkat(dir, done.name.as_slice(), UnlinkatFlags::RemoveDir)
                    .map_err(|e| Error::io("unlinkat", display, e))?;
            }
            return Ok(done.kept);
        };
        if done.kept {
            parent.kept = true;
            continue;
        }
        drop(done.fd);
        let mut r = unlinkat(&parent.fd, done.name.as_slice(), UnlinkatFlags::RemoveDir);
        if r == Err(Errno::EACCES) && !parent.unlocked {
            parent.unlocked = true;
            fchmod(&parent.fd, Mode::from_bits_truncate(0o700)).map_err(|e| Error::io("fchmod", display, e))?;
            r = unlinkat(&parent.fd, done.name.as_slice(), UnlinkatFlags::RemoveDir);
        }
        match r {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(Error::io("unlinkat", display, e)),
        }
    }
    unreachable!("the loop returns when the first frame is done")
}

/// Writes `path` whole or not at all, never through a link: the bytes go to `path.tmp`
/// (any leftover of that name unlinked first, then created with `O_EXCL|O_NOFOLLOW`, so
/// a symlink planted there by whoever owns the directory is removed, not written
/// through), which is renamed over `path` (`rename` replaces a link at `path`, it does
/// not follow it). For the crate's small records in directories it does not own alone:
/// a workspace's description and journal, `apply`'s record.
pub(crate) fn write_record(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io("unlink", &tmp, e)),
        _ => {}
    }
    let done = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io("open", &tmp, e))
        .and_then(|mut f| f.write_all(bytes).map_err(|e| Error::io("write", &tmp, e)))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e)));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Reads the small record at `path`: `None` when there is none; an error for anything
/// but a regular file (opened `O_NOFOLLOW|O_NONBLOCK`: a symlink is refused, a FIFO put
/// there never blocks the reader).
pub(crate) fn read_record(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let m = f.metadata().map_err(|e| Error::io("fstat", path, e))?;
    if !m.is_file() || m.len() > 16 << 20 {
        return Err(Error::InvalidSpec { reason: format!("{}: not a regular file of this crate's", path.display()) });
    }
    let mut v = Vec::with_capacity(m.len() as usize);
    f.read_to_end(&mut v).map_err(|e| Error::io("read", path, e))?;
    Ok(Some(v))
}
