//! [`ChangeSet`]: what a sandbox changed, from a scan of its upper alone.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{FileStat, SFlag};

use super::walk::{Event, LowerView};
use crate::error::{Error, Result};
use crate::fsutil::{kind, shown};
use crate::sys;

/// How a path changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ChangeKind {
    /// New: the lowers have nothing at this path.
    Added,
    /// Content or type changed (for regular files: size or mtime differ from the lower).
    Modified,
    /// Same type and content (regular files: same size and mtime); mode, owner, xattrs
    /// or (directories) times differ, or nothing visible changed but the entry was
    /// copied up. A directory gets this when entries were added to or removed from it.
    Metadata,
    /// Removed (a whiteout in the upper).
    Deleted,
    /// A directory replaced as a whole (opaque): nothing of the lowers' directory shows.
    Opaque,
}

/// One changed path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The path inside the rootfs, starting with `/`.
    pub path: PathBuf,
    /// How it changed.
    pub kind: ChangeKind,
}

/// Everything a sandbox changed, in path order (a directory before its entries).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// The changes.
    pub changes: Vec<Change>,
}

impl ChangeSet {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The number of changed paths.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// The changes of one kind.
    pub fn of_kind(&self, kind: ChangeKind) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(move |c| c.kind == kind)
    }
}

/// Refuses overlay metadata the diff engine cannot interpret (off by default).
pub(crate) fn check_no_redirects(
    fd: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
    userxattr: bool,
    display: &Path,
) -> Result<()> {
    let prefix: &[u8] = if userxattr { b"user.overlay." } else { b"trusted.overlay." };
    for x in [&b"redirect"[..], b"metacopy"] {
        let full = [prefix, x].concat();
        match sys::getxattr_at_nofollow(fd, name, &full) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(Error::Unsupported {
                    what: format!(
                        "{}: upper has overlay {} metadata (mounted with redirect_dir/metacopy on?)",
                        display.display(),
                        String::from_utf8_lossy(x)
                    ),
                });
            }
            // No xattr support at all: nothing to find.
            Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => {}
            Err(e) => return Err(Error::io("lgetxattr", display, e)),
        }
    }
    Ok(())
}

/// Xattrs of an entry without overlay's own metadata, sorted.
fn visible_xattrs(
    fd: std::os::fd::BorrowedFd<'_>,
    name: &[u8],
    userxattr: bool,
    display: &Path,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let prefix: &[u8] = if userxattr { b"user.overlay." } else { b"trusted.overlay." };
    let mut names = match sys::listxattr_at_nofollow(fd, name) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("llistxattr", display, e)),
    };
    names.retain(|n| n.strip_prefix(prefix).is_none_or(|r| r.starts_with(b"overlay.")));
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        if let Some(v) = sys::getxattr_at_nofollow(fd, name, &n).map_err(|e| Error::io("lgetxattr", display, e))? {
            out.push((n, v));
        }
    }
    Ok(out)
}

fn rooted(path: &[u8]) -> PathBuf {
    let mut p = b"/".to_vec();
    p.extend_from_slice(path);
    PathBuf::from(std::ffi::OsStr::from_bytes(&p))
}

fn same_meta(a: &FileStat, b: &FileStat) -> bool {
    a.st_mode == b.st_mode && a.st_uid == b.st_uid && a.st_gid == b.st_gid
}

/// Scans `upper` against `lowers`.
pub(crate) fn scan(upper: &Path, lowers: &[PathBuf], userxattr: bool) -> Result<ChangeSet> {
    let view = LowerView::open(lowers, userxattr)?;
    let mut out = ChangeSet::default();
    // `None`: copied up for a child's sake only (a directory whose own metadata is the
    // lower's), not a change of its own.
    let classify = |parent: BorrowedFd<'_>, name: &[u8], path: &[u8], st: &FileStat| -> Result<Option<ChangeKind>> {
        let display = shown(upper, path);
        check_no_redirects(parent, name, userxattr, &display)?;
        let Some((ldir, lst)) = view.lookup(path)? else { return Ok(Some(ChangeKind::Added)) };
        if kind(&lst) != kind(st) {
            return Ok(Some(ChangeKind::Modified));
        }
        let lname = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
        let same_mtime = (st.st_mtime, st.st_mtime_nsec) == (lst.st_mtime, lst.st_mtime_nsec);
        let data_same = match kind(st) {
            SFlag::S_IFREG => st.st_size == lst.st_size && same_mtime,
            SFlag::S_IFLNK => {
                let a = nix::fcntl::readlinkat(parent, name).map_err(|e| Error::io("readlinkat", &display, e))?;
                let b = nix::fcntl::readlinkat(&ldir, lname).map_err(|e| Error::io("readlinkat", &display, e))?;
                a == b
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK => st.st_rdev == lst.st_rdev,
            _ => true,
        };
        if !data_same {
            return Ok(Some(ChangeKind::Modified));
        }
        if kind(st) == SFlag::S_IFDIR
            && same_meta(st, &lst)
            && same_mtime
            && visible_xattrs(parent, name, userxattr, &display)?
                == visible_xattrs(ldir.as_fd(), lname, userxattr, &display)?
        {
            return Ok(None);
        }
        Ok(Some(ChangeKind::Metadata))
    };
    // Per open directory: whether everything below it is new (added or opaque).
    let mut fresh: Vec<bool> = Vec::new();
    super::walk::walk(upper, userxattr, |ev| {
        match ev {
            Event::Enter { path: [], .. } => fresh.push(false),
            Event::Enter { parent, name, path, st, opaque, .. } => {
                let under = *fresh.last().expect("root entered");
                let k = if under {
                    check_no_redirects(parent, name, userxattr, &shown(upper, path))?;
                    Some(ChangeKind::Added)
                } else if opaque {
                    Some(ChangeKind::Opaque)
                } else {
                    classify(parent, name, path, st)?
                };
                if let Some(k) = k {
                    out.changes.push(Change { path: rooted(path), kind: k });
                }
                fresh.push(under || matches!(k, Some(ChangeKind::Added | ChangeKind::Opaque)));
            }
            Event::Leave { .. } => {
                fresh.pop();
            }
            Event::Whiteout { path, .. } => out.changes.push(Change { path: rooted(path), kind: ChangeKind::Deleted }),
            Event::Leaf { parent, name, path, st } => {
                let k = if *fresh.last().expect("root entered") {
                    check_no_redirects(parent, name, userxattr, &shown(upper, path))?;
                    Some(ChangeKind::Added)
                } else {
                    classify(parent, name, path, st)?
                };
                out.changes.push(Change { path: rooted(path), kind: k.unwrap_or(ChangeKind::Metadata) });
            }
        }
        Ok(true)
    })?;
    Ok(out)
}
