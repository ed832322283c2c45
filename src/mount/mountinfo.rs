//! Is a path a mount point? `statx` `STATX_ATTR_MOUNT_ROOT` (Linux 5.8+) answers in one
//! system call; older kernels fall back to scanning `/proc/self/mountinfo`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;

use super::options::bytes;

/// Decodes the octal escapes (`\040` for a space, `\012`, `\134`) mountinfo uses in paths.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() && field[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = field[i + 1..i + 4].iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// The mount points (field 5) listed in a mountinfo text.
pub fn mount_points(text: &[u8]) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    text.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|f| PathBuf::from(std::ffi::OsString::from_vec(unescape(f))))
        .collect()
}

/// Whether `path` (a final symlink followed) is currently a mount point in this mount
/// namespace. A missing path is not.
///
/// # Errors
/// [`Error::Io`] when `statx` fails (other than `ENOENT`), or, on kernels before 5.8,
/// when `realpath` or reading `/proc/thread-self/mountinfo` does.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    match sys::is_mount_root(bytes(path)) {
        Ok(Some(v)) => return Ok(v),
        Ok(None) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(false),
        Err(e) => return Err(Error::io("statx", path, e)),
    }
    let canon = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("realpath", path, e)),
    };
    // thread-self: a thread may have its own mount namespace (`unshare(CLONE_NEWNS)`).
    let text = std::fs::read("/proc/thread-self/mountinfo")
        .map_err(|e| Error::io("read", "/proc/thread-self/mountinfo", e))?;
    Ok(mount_points(&text).contains(&canon))
}

/// The first mount point inside any of `dirs` (strictly inside unless `or_at`: also
/// one of `dirs` itself), if any, from one read of the mount table. Deleting or walking
/// such a directory without this check would cross into that filesystem (DESIGN rule 8).
///
/// Small trees (the usual workspace: a few entries in upper, work and the mount point)
/// are answered without the mount table, by one `statx` per entry
/// (`STATX_ATTR_MOUNT_ROOT`): reading mountinfo costs ~0.1 ms, as much as a mount.
pub(crate) fn mount_under(dirs: &[&Path], or_at: bool) -> Result<Option<PathBuf>> {
    if let Some(found) = mount_under_small(dirs, or_at)? {
        return Ok(found);
    }
    let mut canon = Vec::with_capacity(dirs.len());
    for dir in dirs {
        match std::fs::canonicalize(dir) {
            Ok(c) => canon.push(c),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("realpath", dir, e)),
        }
    }
    if canon.is_empty() {
        return Ok(None);
    }
    let text = std::fs::read("/proc/thread-self/mountinfo")
        .map_err(|e| Error::io("read", "/proc/thread-self/mountinfo", e))?;
    Ok(mount_points(&text).into_iter().find(|m| canon.iter().any(|c| m.starts_with(c) && (or_at || m != c))))
}

/// Entries a small-tree walk examines before it leaves the question to the mount table
/// (a `statx` costs ~1 µs, the table ~100 µs).
const SMALL_TREE: usize = 128;

/// A walk of small trees: every entry below some directories, each checked with `statx`
/// (`STATX_ATTR_MOUNT_ROOT`), with what it takes to delete them.
struct SmallTree {
    /// The first mount point found, if any (the walk stops there).
    mounted: Option<PathBuf>,
    /// Open directories: the walked roots and every directory below them.
    fds: Vec<std::os::fd::OwnedFd>,
    /// Entries in pre-order (a directory before what it holds): index of the parent in
    /// `fds`, name, whether it is a directory.
    entries: Vec<(usize, Vec<u8>, bool)>,
}

/// Walks `dirs` (followed, as the mount table check resolves them; nothing below them
/// is followed). `None` when this cannot answer: more than [`SMALL_TREE`] entries, a
/// kernel without `STATX_ATTR_MOUNT_ROOT`, a directory that cannot be read.
fn small_tree(dirs: &[&Path], or_at: bool) -> Result<Option<SmallTree>> {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::Mode;
    use std::os::fd::AsFd;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let mut t = SmallTree { mounted: None, fds: Vec::new(), entries: Vec::new() };
    let mut paths = Vec::new();
    for dir in dirs {
        let fd = match open(*dir, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(_) => return Ok(None),
        };
        if or_at {
            match sys::is_mount_root_fd(fd.as_fd()) {
                Ok(Some(true)) => {
                    t.mounted = Some(dir.to_path_buf());
                    return Ok(Some(t));
                }
                Ok(Some(false)) => {}
                _ => return Ok(None),
            }
        }
        t.fds.push(fd);
        paths.push(dir.to_path_buf());
    }
    let mut next = 0;
    while next < t.fds.len() {
        let Ok(names) = crate::fsutil::list_dir(t.fds[next].as_fd(), &paths[next]) else { return Ok(None) };
        for name in names {
            if t.entries.len() == SMALL_TREE {
                return Ok(None);
            }
            let (root, mode) = match sys::mount_root_at_nofollow(t.fds[next].as_fd(), &name) {
                Ok((Some(root), mode)) => (root, mode),
                // Gone meanwhile: nothing mounted there.
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => continue,
                _ => return Ok(None),
            };
            let child = paths[next].join(std::ffi::OsStr::from_bytes(&name));
            if root {
                t.mounted = Some(child);
                return Ok(Some(t));
            }
            let is_dir = mode & nix::libc::S_IFMT == nix::libc::S_IFDIR;
            if is_dir {
                match openat(t.fds[next].as_fd(), name.as_slice(), flags | OFlag::O_NOFOLLOW, Mode::empty()) {
                    Ok(sub) => {
                        t.fds.push(sub);
                        paths.push(child);
                    }
                    Err(nix::errno::Errno::ENOENT) => continue,
                    Err(_) => return Ok(None),
                }
            }
            t.entries.push((next, name, is_dir));
        }
        next += 1;
    }
    Ok(Some(t))
}

/// [`mount_under`] by a [`small_tree`] walk; `None` when that cannot answer.
fn mount_under_small(dirs: &[&Path], or_at: bool) -> Result<Option<Option<PathBuf>>> {
    Ok(small_tree(dirs, or_at)?.map(|t| t.mounted))
}

/// Empties `dirs` when they are small trees with nothing mounted in them or on them,
/// from one walk that both checks and plans the deletion (the usual workspace: a few
/// entries in upper, work and the mount point). `Ok(false)` when it cannot (a big tree,
/// an old kernel) or did not finish (a directory it cannot empty: permissions, entries
/// added meanwhile): the caller then checks the mount table and clears the slow way.
/// [`Error::AlreadyMounted`] (nothing deleted) for a mount inside or on one of them.
pub(crate) fn clear_small(dirs: &[&Path]) -> Result<bool> {
    use nix::unistd::{UnlinkatFlags, unlinkat};
    let Some(t) = small_tree(dirs, true)? else { return Ok(false) };
    if let Some(path) = t.mounted {
        return Err(Error::AlreadyMounted { path });
    }
    // Reverse pre-order: what a directory holds goes before the directory.
    for (parent, name, is_dir) in t.entries.iter().rev() {
        let how = if *is_dir { UnlinkatFlags::RemoveDir } else { UnlinkatFlags::NoRemoveDir };
        match unlinkat(&t.fds[*parent], name.as_slice(), how) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_points_with_escapes() {
        let text = b"22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw\n\
            90 22 0:50 / /run/with\\040space rw - tmpfs tmpfs rw\n\
            91 22 0:51 / /back\\134slash\\012nl rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(text),
            vec![PathBuf::from("/proc"), PathBuf::from("/run/with space"), PathBuf::from("/back\\slash\nnl")]
        );
    }

    /// The statx walk and the mount table agree: a bind mount deep in a small tree, at
    /// the top (`or_at`), none; a tree over the budget falls back to the table.
    #[test]
    fn small_tree_walk_finds_what_the_mount_table_lists() {
        use nix::mount::{MntFlags, MsFlags, mount, umount2};
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root under CI");
            return;
        }
        // This thread's own mount namespace: nothing leaks onto the host.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
        let d = tempfile::tempdir().unwrap();
        let (a, deep) = (d.path().join("a"), d.path().join("a/b/c"));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(d.path().join("a/b/file"), b"x").unwrap();
        let from_table = |dirs: &[&Path], or_at: bool| {
            let text = std::fs::read("/proc/thread-self/mountinfo").unwrap();
            let canon: Vec<PathBuf> = dirs.iter().map(|p| std::fs::canonicalize(p).unwrap()).collect();
            mount_points(&text).into_iter().find(|m| canon.iter().any(|c| m.starts_with(c) && (or_at || m != c)))
        };
        assert_eq!(mount_under_small(&[&a], true).unwrap(), Some(None));
        mount(Some("tmpfs"), &deep, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        assert_eq!(mount_under_small(&[&a], false).unwrap(), Some(Some(deep.clone())));
        assert_eq!(from_table(&[&a], false), Some(std::fs::canonicalize(&deep).unwrap()));
        assert_eq!(mount_under(&[&a], false).unwrap(), Some(deep.clone()));
        // At the top: only with `or_at`.
        assert_eq!(mount_under_small(&[&deep], false).unwrap(), Some(None));
        assert_eq!(mount_under_small(&[&deep], true).unwrap(), Some(Some(deep.clone())));
        umount2(&deep, MntFlags::MNT_DETACH).unwrap();
        // Over the budget: the mount table answers.
        for i in 0..=SMALL_TREE {
            std::fs::write(d.path().join(format!("a/f{i}")), b"").unwrap();
        }
        assert_eq!(mount_under_small(&[&a], true).unwrap(), None);
        assert_eq!(mount_under(&[&a], true).unwrap(), None);
    }

    #[test]
    fn root_is_a_mount_point_and_a_subdir_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()).unwrap());
        assert!(!is_mount_point(&d.path().join("missing")).unwrap());
    }
}
