//! The crate's only `unsafe` code: thin wrappers over system calls that `nix` lacks.
//!
//! Every function takes file descriptors (never joined path strings for untrusted
//! names) and returns `io::Result`; callers attach the operation name and path for
//! the error message. Kernel-version differences are probed once and cached here.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;

use nix::libc;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
}

/// The `/proc/self/fd/<dirfd>/<name>` path that names `name` inside `dirfd` without
/// re-resolving any parent: the kernel's magic link jumps straight to the directory,
/// and `name` is a single component checked by the caller to contain no `/`.
fn proc_path(dirfd: BorrowedFd<'_>, name: &[u8]) -> io::Result<CString> {
    if name.contains(&b'/') || name.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut p = format!("/proc/self/fd/{}/", dirfd.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    cstring(&p)
}

/// `fsetxattr(2)`.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: `name` is NUL-terminated, `value` is a valid slice for its length,
    // and `fd` is a live descriptor borrowed for the duration of the call.
    check(unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// `lsetxattr(2)` on the entry `name` of directory `dirfd`, not following a final symlink.
///
/// Used for symlinks and special files, which cannot be opened to get a descriptor.
pub fn setxattr_at_nofollow(dirfd: BorrowedFd<'_>, name: &[u8], xname: &[u8], value: &[u8]) -> io::Result<()> {
    let path = proc_path(dirfd, name)?;
    let xname = cstring(xname)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; value is a valid slice.
    check(unsafe { libc::lsetxattr(path.as_ptr(), xname.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// Calls `get(buf)` with a growing buffer until the value fits (the xattr size protocol).
fn read_sized(mut get: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        match get(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                let size = get(&mut [])?;
                buf.resize(size.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

/// `fgetxattr(2)`: the value of xattr `name` on `fd`; `Ok(None)` when it is not set.
pub fn fgetxattr(fd: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let name = cstring(name)?;
    let r = read_sized(|buf| {
        // SAFETY: `buf` is a valid writable slice (a zero-length slice asks for the size).
        check_size(unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    });
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
/// `flistxattr(2)`: the xattr names on `fd`.
pub fn flistxattr(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let raw = read_sized(|buf| {
        // SAFETY: `buf` is a valid writable slice.
        check_size(unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    })?;
    Ok(split_names(&raw))
}

#[cfg(test)]
fn split_names(raw: &[u8]) -> Vec<Vec<u8>> {
    raw.split(|&b| b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect()
}

/// The process umask, read without changing it (`/proc/self/status`, Linux 4.7+).
///
/// `umask(2)` can only be read by setting it, which races with other threads. Read once
/// per extraction, not cached for the process: a runtime may change its umask between
/// extractions, and the extractor skips `fchmod` when creation already gave the right
/// mode. Without procfs we assume 0o777, which makes every entry get an explicit chmod.
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o777)
}

/// Whether `openat2(2)` with `RESOLVE_*` flags works here (Linux 5.6+, not blocked by seccomp).
pub fn has_openat2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_DIRECTORY)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS);
        openat2(nix::fcntl::AT_FDCWD, c"/", how).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    #[test]
    fn xattr_round_trip_on_fd() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        match fsetxattr(f.as_fd(), b"user.test", b"value") {
            Ok(()) => {}
            // tmpfs before 6.6 and some overlay setups refuse user xattrs.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => panic!("{e}"),
        }
        assert_eq!(fgetxattr(f.as_fd(), b"user.test").unwrap().as_deref(), Some(&b"value"[..]));
        assert_eq!(fgetxattr(f.as_fd(), b"user.missing").unwrap(), None);
        assert!(flistxattr(f.as_fd()).unwrap().contains(&b"user.test".to_vec()));
        let big = vec![b'x'; 4000];
        fsetxattr(f.as_fd(), b"user.big", &big).unwrap();
        assert_eq!(fgetxattr(f.as_fd(), b"user.big").unwrap().unwrap(), big);
    }

    #[test]
    fn proc_path_rejects_multi_component_names() {
        let f = File::open("/").unwrap();
        assert!(proc_path(f.as_fd(), b"a/b").is_err());
        assert!(proc_path(f.as_fd(), b"").is_err());
    }

    #[test]
    fn umask_is_plausible() {
        assert_eq!(umask() & !0o777, 0);
    }
}
