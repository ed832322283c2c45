//! The private tmpfs of a [`UpperStorage::Tmpfs`](super::UpperStorage::Tmpfs) workspace.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::sys::statfs::{TMPFS_MAGIC, fstatfs};

use crate::error::{Error, Result};
use crate::mount::is_mount_point;

/// Mounts a new tmpfs of at most `size` bytes (mode 0700) on the directory `at`
/// (created if missing), which must not be a mount point already.
pub(super) fn mount(at: &Path, size: u64) -> Result<()> {
    super::mkdir(at)?;
    // Mount on the directory as opened (never a symlink swapped in after a check).
    let fd = open(at, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", at, e))?;
    if is_mount_point(at)? {
        return Err(Error::AlreadyMounted { path: at.to_path_buf() });
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
/// destroyed (its process died) is unmounted, unless the workspace's merged view
/// (`target`) is still mounted over it. Anything else mounted at `at` is left alone
/// (and `create` then refuses with [`Error::AlreadyMounted`]).
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
    if fs.filesystem_type() != TMPFS_MAGIC {
        return Ok(());
    }
    drop(fd);
    super::refuse_mounts_under(&[target])?;
    unmount(at)
}

/// Rootless overlays keep their metadata in `user.*` xattrs: tmpfs has them from Linux
/// 6.6 on. Probes the tmpfs root `at` once (the xattr stays there, outside the upper),
/// so an older kernel fails here with a clear error rather than at the first whiteout.
pub(super) fn check_user_xattrs(at: &Path) -> Result<()> {
    let fd = open(at, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", at, e))?;
    match crate::sys::fsetxattr(fd.as_fd(), b"user.rootfs-cache.probe", b"1") {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => Err(Error::Unsupported {
            what: format!(
                "{}: this tmpfs has no user.* xattrs (Linux < 6.6), which a rootless (userxattr) overlay needs; \
                 use UpperStorage::Disk",
                at.display()
            ),
        }),
        Err(e) => Err(Error::io("fsetxattr", at, e)),
    }
}
