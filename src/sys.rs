//! The crate's only `unsafe` code: thin wrappers over system calls that `nix` lacks.
//!
//! Every function takes file descriptors (never joined path strings for untrusted
//! names) and returns `io::Result`; callers attach the operation name and path for
//! the error message. Kernel-version differences are probed once and cached here.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
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

/// `lremovexattr(2)` on the entry `name` of directory `dirfd`, not following a final symlink.
pub fn removexattr_at_nofollow(dirfd: BorrowedFd<'_>, name: &[u8], xname: &[u8]) -> io::Result<()> {
    let path = proc_path(dirfd, name)?;
    let xname = cstring(xname)?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe { libc::lremovexattr(path.as_ptr(), xname.as_ptr()) })
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

/// `llistxattr(2)` on the entry `name` of directory `dirfd`: its xattr names, not
/// following a final symlink.
pub fn listxattr_at_nofollow(dirfd: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    let path = proc_path(dirfd, name)?;
    let raw = read_sized(|buf| {
        // SAFETY: `path` is NUL-terminated; `buf` is a valid writable slice.
        check_size(unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    })?;
    Ok(split_names(&raw))
}

/// `lgetxattr(2)` on the entry `name` of directory `dirfd`; `Ok(None)` when not set.
pub fn getxattr_at_nofollow(dirfd: BorrowedFd<'_>, name: &[u8], xname: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let path = proc_path(dirfd, name)?;
    let xname = cstring(xname)?;
    let r = read_sized(|buf| {
        // SAFETY: both strings are NUL-terminated; `buf` is a valid writable slice.
        check_size(unsafe { libc::lgetxattr(path.as_ptr(), xname.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    });
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `flistxattr(2)`: the xattr names on `fd`.
pub fn flistxattr(fd: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let raw = read_sized(|buf| {
        // SAFETY: `buf` is a valid writable slice.
        check_size(unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    })?;
    Ok(split_names(&raw))
}

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

// The new mount API (Linux 5.2+). Constants from `uapi/linux/mount.h`, spelled out here
// so the crate does not depend on the libc version that first exported them.
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// `fsopen(2)`: a new filesystem context for `fstype`, close-on-exec.
pub fn fsopen(fstype: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `fstype` is NUL-terminated and outlives the call.
    owned(unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) })
}

fn fsconfig(
    fd: BorrowedFd<'_>,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
    aux: i32,
) -> io::Result<()> {
    let key = key.map_or(std::ptr::null(), CStr::as_ptr);
    let value = value.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: key and value are NUL-terminated strings (or null where the command
    // takes none) that outlive the call; `fd` is a live fs context descriptor.
    let ret = unsafe { libc::syscall(libc::SYS_fsconfig, fd.as_raw_fd(), cmd, key, value, aux) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `fsconfig(FSCONFIG_SET_STRING, key, value)`.
pub fn fsconfig_set_string(fd: BorrowedFd<'_>, key: &CStr, value: &[u8]) -> io::Result<()> {
    fsconfig(fd, FSCONFIG_SET_STRING, Some(key), Some(&cstring(value)?), 0)
}

/// `fsconfig(FSCONFIG_SET_FLAG, key)`.
pub fn fsconfig_set_flag(fd: BorrowedFd<'_>, key: &CStr) -> io::Result<()> {
    fsconfig(fd, FSCONFIG_SET_FLAG, Some(key), None, 0)
}

/// `fsconfig(FSCONFIG_SET_FD, key, aux = dir)`: a layer given as an open directory.
pub fn fsconfig_set_fd(fd: BorrowedFd<'_>, key: &CStr, dir: BorrowedFd<'_>) -> io::Result<()> {
    fsconfig(fd, FSCONFIG_SET_FD, Some(key), None, dir.as_raw_fd())
}

/// `fsconfig(FSCONFIG_CMD_CREATE)`: build the superblock from the parameters set so far.
pub fn fsconfig_create(fd: BorrowedFd<'_>) -> io::Result<()> {
    fsconfig(fd, FSCONFIG_CMD_CREATE, None, None, 0)
}

/// The messages the kernel queued on a filesystem context (`e overlay: ...` lines),
/// joined with `; `. Reading drains them; empty when there are none.
pub fn fs_context_log(fd: BorrowedFd<'_>) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..32 {
        // SAFETY: `buf` is a valid writable buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let msg = String::from_utf8_lossy(&buf[..n as usize]);
        // Each message starts with its level: `e ` error, `w ` warning, `i ` info.
        let msg = msg.trim_end();
        out.push(msg.get(2..).filter(|_| msg.as_bytes().get(1) == Some(&b' ')).unwrap_or(msg).to_string());
    }
    out.join("; ")
}

/// `fsmount(2)`: a detached mount of the created superblock.
pub fn fsmount(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments on a live descriptor.
    owned(unsafe { libc::syscall(libc::SYS_fsmount, fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0 as libc::c_uint) })
}

/// `move_mount(2)` onto an open directory: attach the detached mount `mnt` exactly on
/// the directory `target` was opened on.
pub fn move_mount_to_fd(mnt: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: empty NUL-terminated paths with the EMPTY_PATH flags name the fds themselves.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        ) as libc::c_int
    })
}

/// Whether the directory open as `dir` (an `O_RDONLY` descriptor at offset 0) has no
/// entries besides `.` and `..`. Reads at most one `getdents64` buffer in the common
/// case. Moves the descriptor's offset.
pub fn dir_is_empty(dir: BorrowedFd<'_>) -> io::Result<bool> {
    let mut buf = [0u8; 512];
    loop {
        let n = getdents64(dir, &mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if dirent_names(&buf[..n]).any(|name| name != b"." && name != b"..") {
            return Ok(false);
        }
    }
}

/// The names in the directory open as `dir` (without `.` and `..`), in the order the
/// filesystem gives them: `getdents64` from the start (the position is rewound first, and
/// left at the end): three system calls for a small directory, where `opendir`/`readdir`
/// on a duplicate takes eight.
pub fn dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    thread_local! {
        // One buffer per thread, zeroed once: a fresh 32 KiB one per call cost more than
        // the system calls for the small directories of a workspace's teardown.
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 32 * 1024]);
    }
    rewind(dir)?;
    BUF.with(|cell| {
        let mut own;
        let mut borrowed = cell.try_borrow_mut();
        let buf: &mut [u8] = match borrowed.as_deref_mut() {
            Ok(b) => b,
            Err(_) => {
                own = vec![0u8; 32 * 1024];
                &mut own
            }
        };
        let mut names = Vec::new();
        loop {
            let n = getdents64(dir, buf)?;
            if n == 0 {
                break;
            }
            names.extend(dirent_names(&buf[..n]).filter(|n| *n != b"." && *n != b"..").map(<[u8]>::to_vec));
        }
        Ok(names)
    })
}

fn rewind(dir: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain lseek on a valid descriptor.
    if unsafe { libc::lseek(dir.as_raw_fd(), 0, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `getdents64` into `buf`; the number of bytes filled (0 at the end).
fn getdents64(dir: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid writable buffer of the given length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The names in a `getdents64` buffer (`struct linux_dirent64`: u64 ino, i64 off, u16
/// reclen, u8 type, NUL-terminated name).
fn dirent_names(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off + 19 > buf.len() {
            return None;
        }
        let reclen = usize::from(u16::from_ne_bytes([buf[off + 16], buf[off + 17]]));
        if reclen < 19 || off + reclen > buf.len() {
            return None;
        }
        let name = &buf[off + 19..off + reclen];
        off += reclen;
        Some(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())])
    })
}

/// Whether the directory open as `fd` is the root of a mount (`statx`
/// `STATX_ATTR_MOUNT_ROOT`, Linux 5.8+). `Ok(None)` when the kernel does not report it.
pub fn is_mount_root_fd(fd: BorrowedFd<'_>) -> io::Result<Option<bool>> {
    statx_mount_root(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
}

/// Whether `path` (a final symlink followed) is the root of a mount; see [`is_mount_root_fd`].
pub fn is_mount_root(path: &[u8]) -> io::Result<Option<bool>> {
    statx_mount_root(libc::AT_FDCWD, &cstring(path)?, 0)
}

fn statx_mount_root(dirfd: RawFd, path: &CStr, flags: libc::c_int) -> io::Result<Option<bool>> {
    statx_mount_root_mode(dirfd, path, flags).map(|(root, _)| root)
}

/// Whether `dir/name` (never followed) is the root of a mount (`None`: the kernel cannot
/// tell, before 5.8), and its `st_mode`.
pub fn mount_root_at_nofollow(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<(Option<bool>, u32)> {
    statx_mount_root_mode(dir.as_raw_fd(), &cstring(name)?, libc::AT_SYMLINK_NOFOLLOW)
}

fn statx_mount_root_mode(dirfd: RawFd, path: &CStr, flags: libc::c_int) -> io::Result<(Option<bool>, u32)> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `path` is NUL-terminated, `stx` is a valid buffer for one statx record.
    check(unsafe { libc::statx(dirfd, path.as_ptr(), flags, libc::STATX_TYPE, stx.as_mut_ptr()) })?;
    // SAFETY: statx succeeded, so the record is initialised.
    let stx = unsafe { stx.assume_init() };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok(((stx.stx_attributes_mask & bit != 0).then_some(stx.stx_attributes & bit != 0), u32::from(stx.stx_mode)))
}

/// `copy_file_range(2)` from the current offsets of `src` to `dst`, advancing both.
pub fn copy_file_range(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: null offsets mean "use and update the file positions"; plain fds otherwise.
    check_size(unsafe {
        libc::copy_file_range(src.as_raw_fd(), std::ptr::null_mut(), dst.as_raw_fd(), std::ptr::null_mut(), len, 0)
    })
}

/// `ioctl(FICLONE)`: make `dst` share all of `src`'s extents (a reflink).
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) })
}

/// Set this thread's nice value (Linux keeps one per thread; threads it starts later
/// inherit it).
pub fn nice_this_thread(nice: i32) -> io::Result<()> {
    // SAFETY: plain system calls on this thread's id.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    /// `dir_names` lists what `read_dir` lists, over several `getdents64` buffers, from
    /// the start whatever the position, and `dir_is_empty` agrees.
    #[test]
    fn dir_names_match_read_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = File::open(dir.path()).unwrap();
        assert!(dir_names(d.as_fd()).unwrap().is_empty());
        assert!(dir_is_empty(d.as_fd()).unwrap());
        for i in 0..3000 {
            std::fs::write(dir.path().join(format!("entry-with-a-longish-name-{i:05}")), b"").unwrap();
        }
        let mut want: Vec<Vec<u8>> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| std::os::unix::ffi::OsStrExt::as_bytes(e.unwrap().file_name().as_os_str()).to_vec())
            .collect();
        want.sort();
        let d = File::open(dir.path()).unwrap();
        assert!(!dir_is_empty(d.as_fd()).unwrap(), "moves the position");
        for _ in 0..2 {
            let mut got = dir_names(d.as_fd()).unwrap();
            got.sort();
            assert_eq!(got, want);
        }
    }

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
    fn dir_is_empty_sees_any_entry() {
        let dir = tempfile::tempdir().unwrap();
        let open = || File::open(dir.path()).unwrap();
        assert!(dir_is_empty(open().as_fd()).unwrap());
        // A name long enough that `.` and `..` plus it do not fit one small record run.
        std::fs::write(dir.path().join("x".repeat(250)), b"").unwrap();
        assert!(!dir_is_empty(open().as_fd()).unwrap());
        std::fs::remove_file(dir.path().join("x".repeat(250))).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        assert!(!dir_is_empty(open().as_fd()).unwrap());
    }

    #[test]
    fn umask_is_plausible() {
        assert_eq!(umask() & !0o777, 0);
    }
}
