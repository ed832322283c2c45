//! The private tmpfs of a [`UpperStorage::Tmpfs`](super::UpperStorage::Tmpfs) workspace.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::sys::statfs::{TMPFS_MAGIC, fstatfs};

use crate::error::{Error, Result};
use crate::mount::is_mount_point;

/// What [`mount`] would refuse about `at`, checked without changing anything: a mount
/// point ([`Error::AlreadyMounted`]) or a non-empty directory ([`Error::NotEmpty`]).
/// Missing is fine.
pub(super) fn check(at: &Path) -> Result<()> {
    let fd = match open(at, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
    {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(Error::io("open", at, e)),
    };
    if is_mount_point(at)? {
        return Err(Error::AlreadyMounted { path: at.to_path_buf() });
    }
    if !crate::sys::dir_is_empty(fd.as_fd()).map_err(|e| Error::io("getdents64", at, e))? {
        return Err(Error::NotEmpty { path: at.to_path_buf() });
    }
    Ok(())
}

/// Mounts a new tmpfs of at most `size` bytes (mode 0700) on the directory `at`
/// (created if missing), which must not be a mount point already.
pub(super) fn mount(at: &Path, size: u64) -> Result<()> {
    super::mkdir(at)?;
    // Mount on the directory as opened (never a symlink swapped in after a check).
    let fd = open(at, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", at, e))?;
    if is_mount_point(at)? {
        return Err(Error::AlreadyMounted { path: at.to_path_buf() });
    }
    // `destroy` removes `at` and what is in it: never hide (and later delete) files of
    // someone else's under the mount.
    if !crate::sys::dir_is_empty(fd.as_fd()).map_err(|e| Error::io("getdents64", at, e))? {
        return Err(Error::NotEmpty { path: at.to_path_buf() });
    }
    let on = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let data = format!("size={size},mode=0700");
    nix::mount::mount(Some("tmpfs"), on.as_str(), Some("tmpfs"), MsFlags::empty(), Some(data.as_str())).map_err(|e| {
        Error::Mount { op: "mount tmpfs", target: at.to_path_buf(), source: e.into(), detail: String::new() }
    })
}

/// Unmounts the tmpfs at `at` (lazily: a still-mounted overlay keeps using it until it
/// goes) and checks that it is gone. Its contents are lost.
pub(super) fn unmount(at: &Path) -> Result<()> {
    match nix::mount::umount2(at, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::Mount {
                op: "umount2",
                target: at.to_path_buf(),
                source: e.into(),
                detail: String::new(),
            });
        }
    }
    if is_mount_point(at)? {
        return Err(Error::Mount {
            op: "umount2",
            target: at.to_path_buf(),
            source: std::io::Error::from_raw_os_error(nix::libc::EBUSY),
            detail: "still a mount point after unmount".into(),
        });
    }
    Ok(())
}

/// `create` with `reset`: a tmpfs left mounted at `at` by a workspace that was never
/// destroyed (its process died; recognised by its [`MARKS`] xattr) is unmounted, unless
/// the workspace's merged view (`target`) is still mounted. Anything else mounted at
/// `at` is left alone (and `create` then refuses with [`Error::AlreadyMounted`]).
pub(super) fn release_leftover(at: &Path, target: &Path) -> Result<()> {
    let fd = match open(at, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
    {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP) => return Ok(()),
        Err(e) => return Err(Error::io("open", at, e)),
    };
    if !is_mount_point(at)? {
        return Ok(());
    }
    let fs = fstatfs(fd.as_fd()).map_err(|e| Error::io("fstatfs", at, e))?;
    if fs.filesystem_type() != TMPFS_MAGIC || !is_marked(fd.as_fd()) {
        return Ok(());
    }
    drop(fd);
    super::refuse_mounts_under(&[target])?;
    unmount(at)
}

/// The xattr (`trusted.*` as root, `user.*` in a user namespace) that marks a tmpfs
/// root as a workspace's scratch: `reset` unmounts only tmpfs mounts carrying it.
const MARKS: [&[u8]; 2] = [b"trusted.rootfs-cache.scratch", b"user.rootfs-cache.scratch"];

/// Marks the tmpfs root `at` as a workspace's (see [`MARKS`]). With `userxattr` the
/// rootless overlay keeps its metadata in `user.*` xattrs, which tmpfs has only from
/// Linux 6.6 on: without them this fails here with a clear error rather than at the
/// first whiteout.
pub(super) fn mark(at: &Path, userxattr: bool) -> Result<()> {
    let fd = open(at, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", at, e))?;
    let mut last = None;
    for name in MARKS {
        match crate::sys::fsetxattr(fd.as_fd(), name, b"1") {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if userxattr && e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => Err(Error::Unsupported {
            what: format!(
                "{}: this tmpfs has no user.* xattrs (Linux < 6.6), which a rootless (userxattr) overlay needs; \
                 use UpperStorage::Disk",
                at.display()
            ),
        }),
        Some(e) if userxattr => Err(Error::io("fsetxattr", at, e)),
        // Unmarked: a leftover of this workspace is then refused, never unmounted, by `reset`.
        _ => Ok(()),
    }
}

fn is_marked(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    MARKS.iter().any(|n| crate::sys::fgetxattr(fd, n).is_ok_and(|v| v.is_some()))
}
