//! Is a path a mount point? `statx` `STATX_ATTR_MOUNT_ROOT` (Linux 5.8+) answers in one
//! system call; older kernels fall back to scanning `/proc/self/mountinfo`.

use std::io;
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
pub(crate) fn mount_under(dirs: &[&Path], or_at: bool) -> Result<Option<PathBuf>> {
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

    #[test]
    fn root_is_a_mount_point_and_a_subdir_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()).unwrap());
        assert!(!is_mount_point(&d.path().join("missing")).unwrap());
    }
}
