//! Exclusive `flock(2)` locks that name their holder: the cache directory's `LOCK`, a
//! converted workspace's `path.lock`, and a created workspace's own directory.
//!
//! A process turned away gets [`Error::Busy`] naming the holder, found in
//! `/proc/locks` by the lock file's inode (nothing is written into the file: taking a
//! lock works on a full disk and changes nothing). A lock file may be unlinked by its holder
//! (a workspace's, when it is destroyed): a process that opened it before and gets the
//! lock after finds the inode no longer at the path and starts over, so two holders
//! never think they own one path.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

/// A held lock; dropping it releases the lock.
pub(crate) struct LockFile {
    /// Held, never read: dropping it releases the lock.
    _file: Flock<File>,
    path: PathBuf,
    /// The lock is on a directory itself (nothing to unlink).
    dir: bool,
}

impl std::fmt::Debug for LockFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockFile").field("path", &self.path).finish()
    }
}

impl LockFile {
    /// Takes the lock on `path` (created mode 0600 if missing) without waiting.
    ///
    /// # Errors
    /// [`Error::Busy`] naming `owner` (what the lock protects) and the holder's pid when
    /// another open file description holds it; I/O errors.
    pub(crate) fn acquire(path: &Path, owner: &Path) -> Result<LockFile> {
        use std::os::unix::fs::OpenOptionsExt;
        loop {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(path)
                .map_err(|e| Error::io("open", path, e))?;
            let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((f, Errno::EWOULDBLOCK)) => {
                    return Err(Error::Busy { path: owner.to_path_buf(), pid: holder(&f) });
                }
                Err((_, e)) => return Err(Error::io("flock", path, e)),
            };
            // Still the file at `path`? (Its holder may have unlinked it meanwhile.)
            let held = nix::sys::stat::fstat(file.as_fd()).map_err(|e| Error::io("fstat", path, e))?;
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.ino() == held.st_ino && m.dev() == held.st_dev => {}
                Ok(_) | Err(_) => continue,
            }
            return Ok(LockFile { _file: file, path: path.to_path_buf(), dir: false });
        }
    }

    /// Takes the lock on the directory `dir` itself (no lock file: nothing to create on
    /// a full disk, nothing to unlink). `fresh`: the caller just made `dir`, so nobody
    /// can have removed it meanwhile; otherwise a directory removed between `open` and
    /// `flock` (its holder destroyed it) is [`Error::NotFound`].
    ///
    /// # Errors
    /// [`Error::Busy`] naming the holder's pid; [`Error::NotFound`]; I/O errors.
    pub(crate) fn acquire_dir(dir: &Path, fresh: bool) -> Result<LockFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::options()
            .read(true)
            .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
            .open(dir)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound { what: format!("a workspace in {}", dir.display()) },
                _ => Error::io("open", dir, e),
            })?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((f, Errno::EWOULDBLOCK)) => return Err(Error::Busy { path: dir.to_path_buf(), pid: holder(&f) }),
            Err((_, e)) => return Err(Error::io("flock", dir, e)),
        };
        if !fresh && nix::sys::stat::fstat(file.as_fd()).map_err(|e| Error::io("fstat", dir, e))?.st_nlink == 0 {
            return Err(Error::NotFound { what: format!("a workspace in {} (removed meanwhile)", dir.display()) });
        }
        Ok(LockFile { _file: file, path: dir.to_path_buf(), dir: true })
    }

    /// Unlinks the lock file while still holding it (the thing it protects is gone); a
    /// waiter that opened it before sees the inode gone and starts over. A directory
    /// lock has nothing to unlink.
    pub(crate) fn remove(&self) -> Result<()> {
        if self.dir {
            return Ok(());
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("unlink", &self.path, e)),
        }
    }
}

/// The process holding a `flock` on `file`: its line in `/proc/locks` (`FLOCK … PID
/// MAJ:MIN:INO …`, device numbers in hex). `None` when it cannot be told (an OFD lock,
/// no procfs).
fn holder(file: &File) -> Option<u32> {
    let st = nix::sys::stat::fstat(file.as_fd()).ok()?;
    let dev =
        format!("{:02x}:{:02x}:{}", nix::sys::stat::major(st.st_dev), nix::sys::stat::minor(st.st_dev), st.st_ino);
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    parse_holder(&locks, &dev)
}

/// The pid of the `FLOCK` line for the file `dev` (`MAJ:MIN:INO`) in `/proc/locks` text.
fn parse_holder(locks: &str, dev: &str) -> Option<u32> {
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; blocked waiters have "->".
        let f = if f.get(1) == Some(&"->") { &f[1..] } else { &f[..] };
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&dev)).then(|| f.get(4)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines() {
        let text = "1: POSIX  ADVISORY  WRITE 99 08:01:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 5151 00:2a:1234 0 EOF\n";
        assert_eq!(parse_holder(text, "00:2a:1234"), Some(4242));
        assert_eq!(parse_holder(text, "08:01:77"), None, "POSIX locks are not ours");
        assert_eq!(parse_holder(text, "00:2a:9"), None);
    }

    #[test]
    fn a_directory_is_its_own_lock() {
        let d = std::env::temp_dir().join(format!("rootfs-cache-dirlock-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let held = LockFile::acquire_dir(&d, true).unwrap();
        match LockFile::acquire_dir(&d, false) {
            Err(Error::Busy { path, pid }) => assert_eq!((path, pid), (d.clone(), Some(std::process::id()))),
            other => panic!("{other:?}"),
        }
        // Removed by its holder: whoever comes next finds no workspace, never a lock on
        // a deleted directory.
        std::fs::remove_dir(&d).unwrap();
        drop(held);
        assert!(matches!(LockFile::acquire_dir(&d, false), Err(Error::NotFound { .. })));
        assert_eq!(
            std::fs::read_dir(std::env::temp_dir()).unwrap().filter_map(|e| e.ok()).filter(|e| e.path() == d).count(),
            0
        );
    }

    #[test]
    fn a_second_holder_is_told_who() {
        let d = std::env::temp_dir().join(format!("rootfs-cache-lockfile-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("LOCK");
        let held = LockFile::acquire(&p, &d).unwrap();
        match LockFile::acquire(&p, &d) {
            Err(Error::Busy { path, pid }) => {
                assert_eq!(path, d);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        held.remove().unwrap();
        drop(held);
        // Unlinked by its holder: a new lock is a new file.
        let again = LockFile::acquire(&p, &d).unwrap();
        drop(again);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
