//! File-descriptor based path resolution inside a root directory.
//!
//! Untrusted paths (tar entry names, hardlink targets, whiteout names) are never joined
//! onto the destination as strings and handed to the kernel: a string check such as
//! `canonicalize` + `starts_with` races with concurrent renames and misses symlinked
//! parents (tar-rs `validate_inside_dst`, CVE-2018-20997 in tar-rs; CVE-2019-14271 and
//! the `docker cp` symlink races in Docker). Instead:
//!
//! 1. [`split_path`] turns the raw name into components, rejecting absolute paths and
//!    any `..` component outright (pure function, table-tested).
//! 2. [`Root::open_dir`] resolves the parent directory from the root's file descriptor,
//!    with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` where
//!    the kernel has it (5.6+) and otherwise one `openat(O_NOFOLLOW | O_DIRECTORY)` per
//!    component. Extraction never follows a symlink: a symlink where a directory is
//!    expected is reported as an escape attempt, whether it points inside or outside.
//! 3. The final component is created with an `*at` call relative to that directory
//!    descriptor, with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW` semantics.
//!
//! # Security
//! `RESOLVE_IN_ROOT` is belt and braces: components are already free of `..` and
//! symlinks are refused, so resolution can only descend through real directories.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, mkdirat};

use crate::error::{Error, Result};
use crate::sys;

/// Why a path was refused by [`split_path`].
pub(crate) type Refusal = &'static str;

/// Split a raw archive path into normal components.
///
/// Empty and `.` components are dropped (`./usr//bin/` is `usr/bin`). An empty result
/// names the root itself.
///
/// # Errors
/// A reason string for absolute paths, `..` components and NUL bytes.
pub(crate) fn split_path(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, Refusal> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut out = Vec::with_capacity(8);
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("`..` path component"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Join components with `/` (the inverse of [`split_path`] for clean paths).
pub(crate) fn join(comps: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::with_capacity(comps.iter().map(|c| c.len() + 1).sum());
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c);
    }
    v
}

/// An open directory that untrusted paths are resolved inside.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

impl Root {
    /// Open `path` (which must be a directory, and may itself be reached through symlinks:
    /// it is trusted, the caller chose it).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be opened as a directory.
    pub fn open(path: &Path) -> Result<Root> {
        let fd =
            openat(nix::fcntl::AT_FDCWD, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| Error::io("open", path, e))?;
        Ok(Root { fd, path: path.to_path_buf() })
    }

    /// The root's path, as given to [`Root::open`]. Used only in messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The root's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The display path of `comps` under the root (for error messages only).
    pub(crate) fn display(&self, comps: &[&[u8]]) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let mut p = self.path.clone();
        for c in comps {
            p.push(std::ffi::OsStr::from_bytes(c));
        }
        p
    }

    /// Open the directory at `comps` without following any symlink.
    ///
    /// Missing components are created with `create` as mode (before umask) when it is
    /// `Some`, and the length of each created prefix is pushed onto `made`; otherwise a
    /// missing directory gives `Ok(None)`. Existing directories are never modified.
    ///
    /// # Errors
    /// [`Error::PathEscape`] (naming `entry`) when a component is a symlink;
    /// [`Error::Io`] for anything else, `ENOTDIR` included.
    pub(crate) fn open_dir(
        &self,
        comps: &[&[u8]],
        create: Option<u32>,
        entry: &[u8],
        made: &mut Vec<usize>,
    ) -> Result<Option<OwnedFd>> {
        if comps.is_empty() {
            let fd = self.fd.try_clone().map_err(|e| Error::io("dup", &self.path, e))?;
            return Ok(Some(fd));
        }
        if sys::has_openat2() {
            let how = OpenHow::new().flags(DIR_FLAGS).resolve(
                ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
            match openat2(self.fd.as_fd(), &join(comps)[..], how) {
                Ok(fd) => return Ok(Some(fd)),
                Err(Errno::ELOOP) => return Err(escape(entry, "a parent component is a symlink")),
                // Missing: fall through to the walk, which creates. ENOTDIR: a component is
                // not a directory, or the last one is a symlink (O_DIRECTORY|O_NOFOLLOW
                // reports that as ENOTDIR, not ELOOP); the walk tells which. EAGAIN: a
                // concurrent rename raced the lookup; the walk is immune. EXDEV: cannot
                // happen without `..`, but the walk gives the precise answer.
                Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EAGAIN | Errno::EXDEV) => {}
                Err(e) => return Err(Error::io("openat2", self.display(comps), e)),
            }
        }
        self.walk(comps, create, entry, made)
    }

    fn walk(
        &self,
        comps: &[&[u8]],
        create: Option<u32>,
        entry: &[u8],
        made: &mut Vec<usize>,
    ) -> Result<Option<OwnedFd>> {
        let mut cur: Option<OwnedFd> = None;
        for (i, c) in comps.iter().enumerate() {
            let dir = cur.as_ref().map_or(self.fd.as_fd(), |f| f.as_fd());
            let next = match openat(dir, *c, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                // O_DIRECTORY|O_NOFOLLOW on a symlink gives ENOTDIR, not ELOOP.
                Err(Errno::ENOTDIR) if is_symlink(dir, c) => {
                    return Err(escape(entry, "a parent component is a symlink"));
                }
                Err(Errno::ENOENT) => {
                    let Some(mode) = create else { return Ok(None) };
                    match mkdirat(dir, *c, Mode::from_bits_truncate(mode)) {
                        Ok(()) => made.push(i + 1),
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(Error::io("mkdirat", self.display(&comps[..=i]), e)),
                    }
                    match openat(dir, *c, DIR_FLAGS, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(Errno::ELOOP) => return Err(escape(entry, "a parent component is a symlink")),
                        Err(e) => return Err(Error::io("openat", self.display(&comps[..=i]), e)),
                    }
                }
                Err(Errno::ELOOP) => return Err(escape(entry, "a parent component is a symlink")),
                Err(e) => return Err(Error::io("openat", self.display(&comps[..=i]), e)),
            };
            cur = Some(next);
        }
        Ok(cur)
    }
}

fn is_symlink(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    use nix::sys::stat::{SFlag, fstatat};
    fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits())
}

/// An archive entry name for messages: lossy UTF-8, cut at 256 bytes (hostile names can
/// be megabytes long).
pub(crate) fn entry_name(entry: &[u8]) -> String {
    const MAX: usize = 256;
    if entry.len() <= MAX {
        return format!("{:?}", String::from_utf8_lossy(entry));
    }
    format!("{:?}… ({} bytes)", String::from_utf8_lossy(&entry[..MAX]), entry.len())
}

/// A [`Error::PathEscape`] for `entry` (its name cut at 256 bytes).
pub(crate) fn escape(entry: &[u8], reason: &'static str) -> Error {
    let name = if entry.len() <= 256 {
        String::from_utf8_lossy(entry).into_owned()
    } else {
        format!("{}… ({} bytes)", String::from_utf8_lossy(&entry[..256]), entry.len())
    };
    Error::PathEscape { entry: name, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_table() {
        let ok: &[(&str, &[&str])] = &[
            ("a", &["a"]),
            ("./a/b", &["a", "b"]),
            ("a//b/./c/", &["a", "b", "c"]),
            ("./", &[]),
            (".", &[]),
            ("", &[]),
            ("a/.../b", &["a", "...", "b"]),
            ("..a/b..", &["..a", "b.."]),
        ];
        for (raw, want) in ok {
            let got = split_path(raw.as_bytes()).unwrap();
            let want: Vec<&[u8]> = want.iter().map(|s| s.as_bytes()).collect();
            assert_eq!(got, want, "{raw}");
        }
        for bad in ["/etc/passwd", "//x", "..", "../x", "a/../b", "a/..", "./../x", "a\0b"] {
            assert!(split_path(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn open_dir_refuses_symlinks_and_creates_missing() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("out")).unwrap();
        std::os::unix::fs::symlink("real", t.path().join("in")).unwrap();
        let root = Root::open(t.path()).unwrap();
        assert!(root.open_dir(&[b"real"], None, b"x", &mut Vec::new()).unwrap().is_some());
        assert!(root.open_dir(&[b"missing"], None, b"x", &mut Vec::new()).unwrap().is_none());
        for link in [&b"out"[..], b"in"] {
            let e = root.open_dir(&[link, b"sub"], Some(0o755), b"x", &mut Vec::new()).unwrap_err();
            assert!(matches!(e, Error::PathEscape { .. }), "{e}");
        }
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        let mut made = Vec::new();
        root.open_dir(&[b"a", b"b", b"c"], Some(0o755), b"x", &mut made).unwrap().unwrap();
        assert!(t.path().join("a/b/c").is_dir());
        assert_eq!(made, [1, 2, 3]);
        let mut made = Vec::new();
        root.open_dir(&[b"a", b"b", b"d"], Some(0o755), b"x", &mut made).unwrap().unwrap();
        assert_eq!(made, [3]);
    }

    #[test]
    fn walk_fallback_matches_openat2() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::os::unix::fs::symlink("/", t.path().join("a/l")).unwrap();
        let root = Root::open(t.path()).unwrap();
        assert!(root.walk(&[b"a", b"b"], None, b"x", &mut Vec::new()).unwrap().is_some());
        assert!(root.walk(&[b"a", b"nope"], None, b"x", &mut Vec::new()).unwrap().is_none());
        assert!(matches!(
            root.walk(&[b"a", b"l", b"etc"], Some(0o755), b"x", &mut Vec::new()).unwrap_err(),
            Error::PathEscape { .. }
        ));
    }
}
