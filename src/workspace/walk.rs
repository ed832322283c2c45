//! A depth-first walk of an overlay layer directory (an upper), by descriptor, never
//! following symlinks, in sorted name order, iterative (deep trees cost descriptors,
//! not stack). Shared by `changes`, `apply` and `export_diff`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::error::{Error, Result};
use crate::fsutil::{child, kind, list_dir, open_dir_at, shown, stat_at};

/// What the walk found.
pub(crate) enum Event<'a> {
    /// A directory, before its entries. `dir` is the parent; the root has `name == b"."`.
    Enter { parent: BorrowedFd<'a>, fd: BorrowedFd<'a>, name: &'a [u8], path: &'a [u8], st: &'a FileStat, opaque: bool },
    /// A directory, after its entries.
    Leave { path: &'a [u8], st: &'a FileStat },
    /// A whiteout (0/0 character device).
    Whiteout { name: &'a [u8], path: &'a [u8] },
    /// Anything else that is not a directory.
    Leaf { parent: BorrowedFd<'a>, name: &'a [u8], path: &'a [u8], st: &'a FileStat },
}

// The same overlay-format rules as the copy backend's.
use crate::mount::copy::{is_opaque, is_whiteout};

/// Walks the layer at `root`. `visit` returning `false` on `Enter` skips the directory's
/// entries (its `Leave` still comes).
pub(crate) fn walk(root: &Path, userxattr: bool, mut visit: impl FnMut(Event<'_>) -> Result<bool>) -> Result<()> {
    struct Frame {
        fd: OwnedFd,
        st: FileStat,
        path: Vec<u8>,
        names: Vec<Vec<u8>>,
    }
    let parent = nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", root, e))?;
    let fd = open_dir_at(parent.as_fd(), b".", root)?;
    let st = fstat(fd.as_fd()).map_err(|e| Error::io("fstat", root, e))?;
    let descend = visit(Event::Enter {
        parent: parent.as_fd(),
        fd: fd.as_fd(),
        name: b".",
        path: b"",
        st: &st,
        opaque: is_opaque(fd.as_fd(), userxattr),
    })?;
    let mut names = if descend { list_dir(fd.as_fd(), root)? } else { Vec::new() };
    names.sort_unstable_by(|a, b| b.cmp(a)); // popped from the end: ascending order
    let mut stack = vec![Frame { fd, st, path: Vec::new(), names }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.pop() else {
            let done = stack.pop().expect("non-empty");
            visit(Event::Leave { path: &done.path, st: &done.st })?;
            continue;
        };
        let path = child(&top.path, &name);
        let show = shown(root, &path);
        let Some(st) = stat_at(top.fd.as_fd(), &name, &show)? else { continue };
        if kind(&st) == SFlag::S_IFDIR {
            let fd = open_dir_at(top.fd.as_fd(), &name, &show)?;
            let opaque = is_opaque(fd.as_fd(), userxattr);
            let descend = visit(Event::Enter {
                parent: top.fd.as_fd(),
                fd: fd.as_fd(),
                name: &name,
                path: &path,
                st: &st,
                opaque,
            })?;
            let mut names = if descend { list_dir(fd.as_fd(), &show)? } else { Vec::new() };
            names.sort_unstable_by(|a, b| b.cmp(a));
            stack.push(Frame { fd, st, path, names });
        } else if is_whiteout(&st) {
            visit(Event::Whiteout { name: &name, path: &path })?;
        } else {
            visit(Event::Leaf { parent: top.fd.as_fd(), name: &name, path: &path, st: &st })?;
        }
    }
    Ok(())
}

/// The lowers of an overlay, resolved the way overlayfs resolves a path in them.
pub(crate) struct LowerView {
    lowers: Vec<(OwnedFd, PathBuf)>,
    userxattr: bool,
}

impl LowerView {
    pub(crate) fn open(lowers: &[PathBuf], userxattr: bool) -> Result<Self> {
        let mut v = Vec::with_capacity(lowers.len());
        for l in lowers {
            let fd =
                nix::fcntl::open(l.as_path(), OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| Error::io("open", l.as_path(), e))?;
            v.push((fd, l.clone()));
        }
        Ok(LowerView { lowers: v, userxattr })
    }

    /// The entry the lowers show at `path` (relative), with the directory holding it
    /// and its name; `None` when the merged lowers have nothing there.
    pub(crate) fn lookup(&self, path: &[u8]) -> Result<Option<(OwnedFd, FileStat)>> {
        let comps: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
        let Some((last, parents)) = comps.split_last() else { return Ok(None) };
        'layers: for (lower, lpath) in &self.lowers {
            let mut fd = open_dir_at(lower.as_fd(), b".", lpath)?;
            let mut stop_below = false;
            for c in parents {
                match stat_at(fd.as_fd(), c, lpath)? {
                    // An opaque parent in this layer hides the layers below.
                    None if stop_below => return Ok(None),
                    None => continue 'layers,
                    Some(st) if kind(&st) != SFlag::S_IFDIR => return Ok(None),
                    Some(_) => {
                        fd = open_dir_at(fd.as_fd(), c, lpath)?;
                        stop_below |= is_opaque(fd.as_fd(), self.userxattr);
                    }
                }
            }
            match stat_at(fd.as_fd(), last, lpath)? {
                Some(st) if is_whiteout(&st) => return Ok(None),
                Some(st) => return Ok(Some((fd, st))),
                None if stop_below => return Ok(None),
                None => {}
            }
        }
        Ok(None)
    }
}
