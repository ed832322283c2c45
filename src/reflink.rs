//! Range copies between files that the filesystem can turn into reflinks.
//!
//! `copy_file_range(2)` copies inside the kernel; on XFS (`reflink=1`) and btrfs, with
//! both files on one filesystem, it shares the extents of the block-aligned part of the
//! range instead of copying it (only a partial last block is copied). Where the kernel
//! cannot (different filesystems, `EXDEV`; no support, `EOPNOTSUPP`/`ENOSYS`; a
//! refused pair of files, `EINVAL`) the copy falls back to `pread` + `write`.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use nix::errno::Errno;

/// Largest single `copy_file_range` request (the kernel caps requests near 2 GiB).
const MAX_CHUNK: u64 = 1 << 30;
/// Buffer for the read/write fallback.
const FALLBACK_BUF: usize = 256 * 1024;

/// How a range copy went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Copied {
    /// Bytes the kernel copied (or shared) with `copy_file_range`.
    pub kernel: u64,
    /// Bytes copied through a user-space buffer.
    pub buffered: u64,
}

/// Copies exactly `len` bytes from `src` at `src_off` to `dst` at `dst`'s file position
/// (advancing it). `src`'s own position is left alone.
///
/// # Errors
/// The OS error of either side; `io::ErrorKind::UnexpectedEof` when `src` ends before
/// `src_off + len` (nothing says how much of the range was written then).
pub(crate) fn copy_range(src: &File, src_off: u64, dst: &File, len: u64) -> io::Result<Copied> {
    let mut done = Copied::default();
    let mut off = src_off;
    let mut left = len;
    while left > 0 {
        let mut o = i64::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let want = left.min(MAX_CHUNK) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut o), dst, None, want) {
            Ok(0) => return Err(short(len, left)),
            Ok(n) => {
                off += n as u64;
                left -= n as u64;
                done.kernel += n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EXDEV | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {
                done.buffered = buffered_copy(src, off, dst, left)
                    .map_err(|e| if e.kind() == io::ErrorKind::UnexpectedEof { short(len, left) } else { e })?;
                return Ok(done);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}

fn short(len: u64, left: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("source ended {left} bytes short of a {len}-byte range"))
}

/// `pread` from `src` at `off`, `write` to `dst`'s position, `len` bytes.
fn buffered_copy(src: &File, mut off: u64, mut dst: &File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; FALLBACK_BUF.min(len as usize)];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match src.read_at(&mut buf[..want], off) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        off += n as u64;
        left -= n as u64;
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn file_with(dir: &std::path::Path, name: &str, data: &[u8]) -> File {
        let mut f = File::options().read(true).write(true).create_new(true).open(dir.join(name)).unwrap();
        f.write_all(data).unwrap();
        f
    }

    #[test]
    fn copies_a_range_at_the_destination_position() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let src = file_with(dir.path(), "src", &data);
        let mut dst = file_with(dir.path(), "dst", b"head");
        let c = copy_range(&src, 1000, &dst, 200_000).unwrap();
        assert_eq!(c.kernel + c.buffered, 200_000);
        dst.write_all(b"tail").unwrap();
        let mut out = Vec::new();
        dst.seek(SeekFrom::Start(0)).unwrap();
        dst.read_to_end(&mut out).unwrap();
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[4..200_004], &data[1000..201_000]);
        assert_eq!(&out[200_004..], b"tail");
    }

    #[test]
    fn source_ending_early_is_unexpected_eof() {
        let dir = tempfile::tempdir().unwrap();
        let src = file_with(dir.path(), "src", &[7u8; 5000]);
        let dst = file_with(dir.path(), "dst", b"");
        let e = copy_range(&src, 4000, &dst, 2000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = buffered_copy(&src, 4000, &dst, 2000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn buffered_fallback_matches() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let src = file_with(dir.path(), "src", &data);
        let mut dst = file_with(dir.path(), "dst", b"");
        assert_eq!(buffered_copy(&src, 3, &dst, 600_000).unwrap(), 600_000);
        let mut out = Vec::new();
        dst.seek(SeekFrom::Start(0)).unwrap();
        dst.read_to_end(&mut out).unwrap();
        assert_eq!(out, &data[3..600_003]);
    }
}
