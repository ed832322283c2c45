//! Exclusive `flock(2)` locks on files that name their holder: the cache directory's
//! `LOCK` and each workspace's lock file.
//!
//! The holder writes its process id into the file after taking the lock, so a process
//! turned away gets [`Error::Busy`] naming it. A lock file may be unlinked by its holder
//! (a workspace's, when it is destroyed): a process that opened it before and gets the
//! lock after finds the inode no longer at the path and starts over, so two holders
//! never think they own one path.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

/// A held lock; dropping it releases the lock.
pub(crate) struct LockFile {
    file: Flock<File>,
    path: PathBuf,
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
            let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((mut f, Errno::EWOULDBLOCK)) => {
                    let mut text = String::new();
                    let _ = f.read_to_string(&mut text);
                    return Err(Error::Busy { path: owner.to_path_buf(), pid: text.trim().parse().ok() });
                }
                Err((_, e)) => return Err(Error::io("flock", path, e)),
            };
            // Still the file at `path`? (Its holder may have unlinked it meanwhile.)
            let held = nix::sys::stat::fstat(file.as_fd()).map_err(|e| Error::io("fstat", path, e))?;
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.ino() == held.st_ino && m.dev() == held.st_dev => {}
                Ok(_) | Err(_) => continue,
            }
            let pid = format!("{}\n", std::process::id());
            file.set_len(0).map_err(|e| Error::io("ftruncate", path, e))?;
            file.seek(SeekFrom::Start(0)).map_err(|e| Error::io("lseek", path, e))?;
            file.write_all(pid.as_bytes()).map_err(|e| Error::io("write", path, e))?;
            return Ok(LockFile { file, path: path.to_path_buf() });
        }
    }

    /// Unlinks the lock file while still holding it (the thing it protects is gone); a
    /// waiter that opened it before sees the inode gone and starts over.
    pub(crate) fn remove(&self) -> Result<()> {
        let _ = &self.file;
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("unlink", &self.path, e)),
        }
    }
}
