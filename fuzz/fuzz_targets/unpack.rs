//! Feed arbitrary bytes to `rootfs_cache::unpack`, as a layer blob.
//!
//! Any result is acceptable; what is not: a panic, or any change next to the
//! destination. Each input is extracted in both whiteout modes into a fresh `dest/`
//! whose sibling `canary` file must keep its content and metadata, and nothing else
//! may appear in (or vanish from) the parent directory.
//!
//! Random mutations of a tar header almost always break its checksum, which stops the
//! reader at the first check. So an uncompressed input is also run a second time with
//! every header checksum recomputed (walking the blocks as a reader would), letting
//! mutated header fields reach the code behind that check.
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rootfs_cache::{UnpackOptions, WhiteoutMode, unpack};

const CANARY: &[u8] = b"canary: must never change\n";

/// What an escape could change about a path: type and mode, owner, inode, link count,
/// size, mtime, ctime, and content for a regular file.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    mode: u32,
    owner: (u32, u32),
    ino: u64,
    nlink: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
}

fn fingerprint(p: &Path) -> Fingerprint {
    let m = fs::symlink_metadata(p).expect("metadata");
    Fingerprint {
        mode: m.mode(),
        owner: (m.uid(), m.gid()),
        ino: m.ino(),
        nlink: m.nlink(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        content: if m.is_file() { fs::read(p).expect("read") } else { Vec::new() },
    }
}

fn listing(p: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = fs::read_dir(p).expect("read parent").map(|e| e.expect("dirent").file_name()).collect();
    v.sort();
    v
}

/// Make every directory under `p` writable again (an archive may chmod them to 0),
/// so the temporary directory can be removed when not running as root.
fn make_removable(p: &Path) {
    let Ok(m) = fs::symlink_metadata(p) else { return };
    if m.is_dir() {
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o700));
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                make_removable(&e.path());
            }
        }
    }
}

/// An octal (or, if it is one, small base-256) tar number field; `None` otherwise.
fn tar_number(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v = u64::from(f[0] & 0x7f);
        for &b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let mut digits = f.iter().skip_while(|&&b| b == b' ').take_while(|&&b| (b'0'..=b'7').contains(&b));
    digits.try_fold(0u64, |acc, &d| acc.checked_mul(8)?.checked_add(u64::from(d - b'0')))
}

/// `data` with the checksum of every header block recomputed, walking headers and data
/// the way a tar reader does. `None` for compressed input or when nothing changed.
fn with_fixed_checksums(data: &[u8]) -> Option<Vec<u8>> {
    if data.starts_with(&[0x1f, 0x8b]) || data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return None;
    }
    let mut v = data.to_vec();
    let mut off = 0usize;
    while off.checked_add(512).is_some_and(|end| end <= v.len()) {
        let b = &mut v[off..off + 512];
        if b.iter().all(|&x| x == 0) {
            off += 512;
            continue;
        }
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let Some(size) = tar_number(&b[124..136]) else { break };
        let Some(data_blocks) = usize::try_from(size.div_ceil(512)).ok().and_then(|n| n.checked_mul(512)) else {
            break;
        };
        let Some(next) = off.checked_add(512).and_then(|o| o.checked_add(data_blocks)) else { break };
        off = next;
    }
    (v != data).then_some(v)
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = with_fixed_checksums(data) {
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    // tmpfs when available: much faster than a disk for many tiny extractions.
    let base = if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") };
    for mode in [WhiteoutMode::Overlay, WhiteoutMode::Apply] {
        let tmp = tempfile::Builder::new().prefix("rootfs-fuzz-").tempdir_in(base).expect("tempdir");
        let parent = tmp.path();
        let dest = parent.join("dest");
        let canary = parent.join("canary");
        fs::create_dir(&dest).expect("mkdir dest");
        fs::write(&canary, CANARY).expect("write canary");
        let before = (fingerprint(&canary), fingerprint(parent), listing(parent));

        let mut opts = UnpackOptions::default();
        opts.whiteouts = mode;
        opts.pipelined = false;
        opts.max_uncompressed_bytes = Some(16 << 20);
        opts.max_entries = Some(10_000);
        opts.max_header_bytes = 64 << 10;
        let _ = unpack(data, &dest, &opts);

        let after = (fingerprint(&canary), fingerprint(parent), listing(parent));
        assert_eq!(before, after, "{mode:?}: something outside dest changed");
        make_removable(&dest);
    }
}
