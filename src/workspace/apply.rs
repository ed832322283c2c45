//! `Workspace::apply`: flatten an upper into a private lower.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::stat::{Mode, SFlag, mkdirat};

use super::changes::check_no_redirects;
use super::walk::{Event, walk};
use crate::error::{Error, Result};
use crate::fsutil::{kind, open_dir_at, open_dir_path, remove_tree, shown, stat_at};
use crate::mount::copy::{Xattrs, copy_leaf, copy_meta, set_dir_times};

/// What [`Workspace::apply`](super::Workspace::apply) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplyReport {
    /// Non-directory entries moved into the lower by `rename` (no data copied).
    pub moved: u64,
    /// Non-directory entries copied (upper and lower on different filesystems), then
    /// renamed into place.
    pub copied: u64,
    /// Directories created or updated in the lower.
    pub dirs: u64,
    /// Opaque directories: the lower's directory replaced as a whole.
    pub replaced_dirs: u64,
    /// Whiteouts: paths deleted from the lower.
    pub deleted: u64,
}

/// Directory times (`atime`, `mtime`, seconds and nanoseconds) by path in the upper.
type DirTimes = HashMap<Vec<u8>, [i64; 4]>;

/// Flattens `upper` into `lower`. `times_file` (in the work dir) keeps the upper
/// directories' times as they were before the first run: moving entries out of an upper
/// directory changes its mtime, so a rerun after a kill would otherwise give the lower
/// directories the time of the interrupted run.
pub(crate) fn apply(upper: &Path, lower: &Path, userxattr: bool, times_file: &Path) -> Result<ApplyReport> {
    // Refuse before changing anything.
    let mut seen = DirTimes::new();
    walk(upper, userxattr, |ev| {
        match ev {
            Event::Enter { parent, name, path, st, .. } => {
                if !path.is_empty() {
                    check_no_redirects(parent, name, userxattr, &shown(upper, path))?;
                }
                seen.insert(path.to_vec(), [st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec]);
            }
            Event::Leaf { parent, name, path, .. } => check_no_redirects(parent, name, userxattr, &shown(upper, path))?,
            _ => {}
        }
        Ok(true)
    })?;
    // A rerun keeps the first run's record (only directories it has not met are added).
    let mut times = load_times(times_file)?.unwrap_or_default();
    for (k, v) in seen {
        times.entry(k).or_insert(v);
    }
    save_times(times_file, &times)?;
    let original = |path: &[u8], st: &nix::sys::stat::FileStat| -> nix::sys::stat::FileStat {
        let mut st = *st;
        if let Some(&[a, an, m, mn]) = times.get(path) {
            (st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec) = (a, an, m, mn);
        }
        st
    };
    let keep = Xattrs::Keep(Xattrs::prefix(userxattr));
    let root = open_dir_path(lower)?;
    let mut report = ApplyReport::default();
    let mut stack: Vec<OwnedFd> = Vec::new();
    // Across filesystems: the lower path each multiply-linked upper file was copied to.
    let mut copies: std::collections::HashMap<(u64, u64), Vec<u8>> = std::collections::HashMap::new();
    walk(upper, userxattr, |ev| {
        match ev {
            Event::Enter { fd, path: [], st, .. } => {
                copy_meta(fd, b".", &original(&[], st), root.as_fd(), b".", keep, lower)?;
                stack.push(open_dir_at(root.as_fd(), b".", lower)?);
            }
            Event::Enter { parent, name, path, st, opaque, .. } => {
                let display = shown(lower, path);
                let ld = stack.last().expect("root entered").as_fd();
                let existing = stat_at(ld, name, &display)?;
                let is_dir = existing.as_ref().is_some_and(|s| kind(s) == SFlag::S_IFDIR);
                if opaque || !is_dir {
                    if existing.is_some() {
                        remove_tree(ld, name, name, None, &display)?;
                    }
                    mkdirat(ld, name, Mode::from_bits_truncate(0o700))
                        .map_err(|e| Error::io("mkdirat", &display, e))?;
                    report.replaced_dirs += u64::from(opaque);
                    if opaque {
                        // The lower directory is replaced now; entries move into it one
                        // by one. If apply stops halfway, a rerun must merge into it,
                        // not replace it again (and lose what already moved).
                        let x = crate::unpack::whiteout::opaque_xattr(userxattr);
                        match crate::sys::removexattr_at_nofollow(parent, name, x) {
                            Ok(()) => {}
                            Err(e) if e.raw_os_error() == Some(nix::libc::ENODATA) => {}
                            Err(e) => return Err(Error::io("lremovexattr", shown(upper, path), e)),
                        }
                    }
                }
                copy_meta(parent, name, &original(path, st), ld, name, keep, &display)?;
                report.dirs += 1;
                let sub = open_dir_at(ld, name, &display)?;
                stack.push(sub);
            }
            Event::Leave { path, st, .. } => {
                let ld = stack.pop().expect("entered");
                set_dir_times(ld.as_fd(), &original(path, st), &shown(lower, path))?;
            }
            Event::Whiteout { name, path, .. } => {
                let ld = stack.last().expect("root entered").as_fd();
                remove_tree(ld, name, name, None, &shown(lower, path))?;
                report.deleted += 1;
            }
            Event::Leaf { parent, name, path, st } => {
                let display = shown(lower, path);
                let ld = stack.last().expect("root entered").as_fd();
                if stat_at(ld, name, &display)?.is_some_and(|s| kind(&s) == SFlag::S_IFDIR) {
                    remove_tree(ld, name, name, None, &display)?;
                }
                // Copy-up left overlay's own xattrs (`origin`, `nlink`, ...) on the file;
                // in a lower they would be read as metadata. Stripped before the move, so
                // a run killed right after it never leaves them in the lower.
                strip_private(parent, name, userxattr, &shown(upper, path))?;
                // A rename replaces the lower's directory entry, never the file it named:
                // a lower file hardlinked into some shared file cache keeps its content.
                match nix::fcntl::renameat(parent, name, ld, name) {
                    Ok(()) => {
                        report.moved += 1;
                    }
                    Err(Errno::EXDEV) => {
                        let tmp = [b".rootfs-cache-apply-".as_slice(), name].concat();
                        let tmp = &tmp[..tmp.len().min(255)];
                        if stat_at(ld, tmp, &display)?.is_some() {
                            remove_tree(ld, tmp, tmp, None, &display)?;
                        }
                        // Names of one upper file stay one file: the first is copied,
                        // the others are linked to that copy.
                        let first = (st.st_nlink > 1).then(|| copies.get(&(st.st_dev, st.st_ino))).flatten();
                        match first {
                            Some(first) => nix::unistd::linkat(
                                root.as_fd(),
                                first.as_slice(),
                                ld,
                                tmp,
                                nix::fcntl::AtFlags::empty(),
                            )
                            .map_err(|e| Error::io("linkat", &display, e))?,
                            None => {
                                copy_leaf(parent, name, st, ld, tmp, keep, &display)?;
                                if st.st_nlink > 1 {
                                    copies.insert((st.st_dev, st.st_ino), path.to_vec());
                                }
                            }
                        }
                        nix::fcntl::renameat(ld, tmp, ld, name).map_err(|e| Error::io("renameat", &display, e))?;
                        report.copied += 1;
                    }
                    Err(e) => return Err(Error::io("renameat", &display, e)),
                }
            }
        }
        Ok(true)
    })?;
    Ok(report)
}

/// The directory times a first run recorded, if there is a record.
fn load_times(file: &Path) -> Result<Option<DirTimes>> {
    let Some(bytes) = crate::fsutil::read_record(file)? else { return Ok(None) };
    let text = String::from_utf8_lossy(&bytes);
    let bad = || Error::InvalidSpec { reason: format!("{}: not an apply record", file.display()) };
    let mut times = DirTimes::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [a, an, m, mn, hex] = f.as_slice() else { return Err(bad()) };
        let n = |v: &str| v.parse::<i64>().map_err(|_| bad());
        let path = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(bad)?;
        times.insert(path, [n(a)?, n(an)?, n(m)?, n(mn)?]);
    }
    Ok(Some(times))
}

/// Writes the record atomically (temp file + rename).
fn save_times(file: &Path, times: &DirTimes) -> Result<()> {
    let mut text = String::new();
    for (path, [a, an, m, mn]) in times {
        let hex: String = path.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&format!("{a} {an} {m} {mn} {hex}\n"));
    }
    crate::fsutil::write_record(file, text.as_bytes(), 0o600)
}

/// Removes overlay's private xattrs (in the active namespace, not escaped image ones)
/// from `dir/name`.
fn strip_private(dir: std::os::fd::BorrowedFd<'_>, name: &[u8], userxattr: bool, display: &Path) -> Result<()> {
    let prefix = Xattrs::prefix(userxattr);
    let names = match crate::sys::listxattr_at_nofollow(dir, name) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => return Ok(()),
        Err(e) => return Err(Error::io("llistxattr", display, e)),
    };
    for n in names.iter().filter(|n| n.strip_prefix(prefix).is_some_and(|r| !r.starts_with(b"overlay."))) {
        match crate::sys::removexattr_at_nofollow(dir, name, n) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODATA) => {}
            Err(e) => return Err(Error::io("lremovexattr", display, e)),
        }
    }
    Ok(())
}
