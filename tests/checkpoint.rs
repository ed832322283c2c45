//! The checkpoint fast path: block-aligned diff tars, reflinked export and import,
//! memory-backed (tmpfs) uppers, `checkpoint`/`restore`.
//!
//! - Alignment: every regular file's data in an aligned export starts at a multiple of
//!   the block size, and GNU tar, bsdtar and the `tar` crate list and extract it exactly
//!   as the unaligned export of the same upper.
//! - XFS (`mkfs.xfs -m reflink=1` on a loop device made by the test): a multi-GiB diff
//!   checkpointed and restored shares its extents (FIEMAP) and consumes next to no new
//!   blocks, while the plain export (the control) consumes the data's size.
//! - Fallback on ext4 and tmpfs (no reflinks; the kernel or this process copies), and
//!   across filesystems (`EXDEV`): byte-identical archives and identical imports.
//! - tmpfs uppers: round trip through checkpoint → destroy → restore, size limit,
//!   drop/destroy unmount the tmpfs, a crashed process's leftover tmpfs and `reset`.
//! - Failures: a full disk during a checkpoint (the old checkpoint survives, no temp
//!   file), truncated and lying archives on the fast path (typed error, empty upper),
//!   hostile paths through `restore` (nothing left behind), refusals.
//!
//! Needs root (mounts); run as the README says. Each test runs in its own private mount
//! namespace (per thread), so nothing leaks onto the host.

#[path = "common/ops.rs"]
mod ops;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use nix::mount::{MntFlags, MsFlags};
use rootfs_cache::{
    Compression, CopyBackend, DiffOptions, Error, KernelOverlay, UpperStorage, Workspace, WorkspaceOptions,
};

use ops::{Snap, strict_cmp, view};
use scratch_ns::{Mounted, private_ns, tmpfs};

// ---------------------------------------------------------------------------------------
// Scratch: a private mount namespace, tmpfs, loop filesystems

/// A sparse image of `size` bytes at `img`, formatted with `mkfs` and loop-mounted at `dir`.
fn loop_fs(img: &Path, dir: &Path, size: u64, mkfs: &[&str]) -> Mounted {
    File::create(img).unwrap().set_len(size).unwrap();
    support::run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(img));
    fs::create_dir_all(dir).unwrap();
    support::run(Command::new("mount").arg("-o").arg("loop").arg(img).arg(dir));
    Mounted(dir.to_path_buf())
}

/// Root, a private namespace, and a tmpfs scratch dir (big enough for the tests' data).
fn setup(test: &str) -> Option<(tempfile::TempDir, Mounted)> {
    if !support::require_root(test) {
        return None;
    }
    private_ns();
    let tmp = support::tempdir();
    let m = tmpfs(tmp.path(), "size=6g,mode=0755");
    Some((tmp, m))
}

fn syncfs(p: &Path) {
    let f = File::open(p).unwrap();
    nix::unistd::syncfs(&f).unwrap();
}

fn free_bytes(p: &Path) -> u64 {
    syncfs(p);
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_free() * s.fragment_size()
}

fn fs_type(p: &Path) -> i64 {
    nix::sys::statfs::statfs(p).unwrap().filesystem_type().0
}

// ---------------------------------------------------------------------------------------
// Content

/// A lower: files to overwrite, delete and replace, with some metadata.
fn make_lower(lower: &Path) {
    for d in ["etc", "gone-dir/sub", "keep"] {
        fs::create_dir_all(lower.join(d)).unwrap();
    }
    ops::write(&lower.join("etc/config"), b"lower config\n");
    ops::write(&lower.join("delete-me"), b"lower file\n");
    ops::write(&lower.join("gone-dir/sub/f"), b"in a dir that is replaced\n");
    ops::write(&lower.join("keep/same"), b"untouched\n");
}

/// Writes through a mounted view: every kind of entry, files of sizes around the block
/// boundaries, long names, xattrs, hardlinks, a whiteout and an opaque dir.
fn write_sandbox(t: &Path) {
    let sizes = [0usize, 1, 511, 512, 513, 4095, 4096, 4097, 65_539, (1 << 20) + 17];
    fs::create_dir_all(t.join("data")).unwrap();
    for (i, n) in sizes.iter().enumerate() {
        ops::write(&t.join(format!("data/f{i}-{n}")), &support::pseudo_random(i as u64, *n));
    }
    let long = t.join(format!("data/{}", "l".repeat(150)));
    fs::create_dir_all(&long).unwrap();
    ops::write(&long.join(format!("{}.bin", "n".repeat(120))), &support::pseudo_random(99, 9000));
    ops::write(&t.join("etc/config"), b"sandbox config, longer than before\n");
    support::lsetxattr(&t.join("etc/config"), "user.note", b"\x00binary\xffvalue");
    fs::set_permissions(t.join("etc/config"), fs::Permissions::from_mode(0o640)).unwrap();
    support::lchown(&t.join("etc/config"), 1234, 5678);
    support::set_mtime(&t.join("etc/config"), 1_600_000_000, 123_456_789);
    fs::hard_link(t.join("data/f9-1048593"), t.join("data/hardlink")).unwrap();
    std::os::unix::fs::symlink("../etc/config", t.join("data/link")).unwrap();
    support::mknod(&t.join("data/fifo"), libc::S_IFIFO, 0o600, 0, 0);
    // A sparse file: stored as a PAX sparse entry (its data only).
    let sparse = File::create(t.join("data/sparse")).unwrap();
    sparse.set_len(10 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &support::pseudo_random(11, 70_000), 4 << 20).unwrap();
    drop(sparse);
    fs::remove_file(t.join("delete-me")).unwrap();
    fs::remove_dir_all(t.join("gone-dir")).unwrap();
    fs::create_dir(t.join("gone-dir")).unwrap();
    ops::write(&t.join("gone-dir/new"), b"the replacement dir\n");
}

/// A workspace over `lower` in `dir`, written by [`write_sandbox`] through a kernel
/// overlay, unmounted; returns it with the merged view it showed.
fn written_workspace(dir: &Path, lower: &Path, opts: WorkspaceOptions) -> (Workspace, Snap) {
    let mut ws = Workspace::create(dir, lower, opts).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    write_sandbox(&t);
    let m = view(&t);
    ws.unmount().unwrap();
    (ws, m)
}

fn mounted_view(ws: &mut Workspace) -> Snap {
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    let v = view(&t);
    ws.unmount().unwrap();
    v
}

fn assert_same(what: &str, want: &Snap, got: &Snap) {
    let d = support::diff_trees(want, got, &strict_cmp());
    assert!(d.is_empty(), "{what}: {d:#?}");
}

/// Offsets of every regular file's data, as the `tar` crate reads the archive.
fn file_data_offsets(tar_bytes: &[u8]) -> Vec<(String, u64, u64)> {
    let mut a = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type() == tar::EntryType::Regular {
            out.push((e.path().unwrap().display().to_string(), e.raw_file_position(), e.size()));
        }
    }
    out
}

/// Everything the `tar` crate sees of each entry (PAX `comment` padding left out).
fn tar_rs_listing(tar_bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut pax: Vec<String> = match e.pax_extensions().unwrap() {
            Some(exts) => exts
                .map(|x| x.unwrap())
                .filter(|x| x.key_bytes() != b"comment")
                .map(|x| format!("{}={:?}", String::from_utf8_lossy(x.key_bytes()), x.value_bytes()))
                .collect(),
            None => Vec::new(),
        };
        pax.sort();
        let h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(format!(
            "{} {:?} mode={:o} uid={} gid={} mtime={} link={:?} size={} sha={} pax={pax:?}",
            e.path().unwrap().display(),
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.mtime().unwrap(),
            e.link_name().unwrap(),
            data.len(),
            support::sha256_hex(&data),
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------
// 1. Alignment: a standard tar that every reader reads like the unaligned one

#[test]
fn aligned_export_is_a_standard_tar_with_block_aligned_data() {
    let test = "aligned_export_is_a_standard_tar_with_block_aligned_data";
    let Some((tmp, _m)) = setup(test) else { return };
    if !support::require_tools(test, &["tar", "bsdtar"]) {
        return;
    }
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let (ws, m) = written_workspace(&base.join("ws"), &lower, WorkspaceOptions::default());

    let mut plain = Vec::new();
    let ps = ws.export_diff(&mut plain, &DiffOptions::default()).unwrap();
    let mut stream = Vec::new();
    let ss = ws.export_diff(&mut stream, &DiffOptions::aligned()).unwrap();
    assert_eq!(ss.size, stream.len() as u64);
    assert_eq!(ss.digest, Some(rootfs_cache::Digest::of(&stream)), "a stream export is hashed");
    assert_eq!((ps.entries, ps.file_bytes), (ss.entries, ss.file_bytes));

    // Into a file (tmpfs: st_blksize 4096): the same bytes, data copied by the kernel.
    let path = base.join("aligned.tar");
    let f = File::create(&path).unwrap();
    assert_eq!(f.metadata().unwrap().blksize(), 4096);
    let fs_stats = ws.export_diff_file(&f, &DiffOptions::aligned()).unwrap();
    drop(f);
    let file_bytes = fs::read(&path).unwrap();
    assert!(file_bytes == stream, "export_diff_file and export_diff (aligned) differ");
    assert_eq!((fs_stats.size, fs_stats.digest, fs_stats.diff_id), (stream.len() as u64, None, None));
    assert!(stream.len() > plain.len(), "no padding at all?");

    // Every regular file's data at a multiple of 4096 (empty files included); the
    // unaligned export has some that are not (so this check can fail).
    let offs = file_data_offsets(&stream);
    assert!(offs.len() >= 14, "{offs:?}");
    for (p, off, _) in &offs {
        assert_eq!(off % 4096, 0, "{p} at {off}");
    }
    assert!(file_data_offsets(&plain).iter().any(|(_, off, _)| off % 4096 != 0));

    // The tar crate: the same entries, metadata, xattrs and data.
    assert_eq!(tar_rs_listing(&plain), tar_rs_listing(&stream));

    // GNU tar and bsdtar: identical listings and extractions.
    let plain_tar = base.join("plain.tar");
    fs::write(&plain_tar, &plain).unwrap();
    let list = |tool: &str, t: &Path| {
        let out = support::run(Command::new(tool).args(["--numeric-owner", "--full-time", "-tvf"]).arg(t));
        String::from_utf8(out).unwrap()
    };
    assert_eq!(list("tar", &plain_tar), list("tar", &path));
    let bsd = |t: &Path| String::from_utf8(support::run(Command::new("bsdtar").arg("-tvf").arg(t))).unwrap();
    assert_eq!(bsd(&plain_tar), bsd(&path));
    let extract = |what: &str, cmd: &mut Command, dest: &Path| {
        fs::create_dir_all(dest).unwrap();
        let out = cmd.current_dir(dest).output().unwrap();
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        support::snapshot(dest)
    };
    let gnu = |t: &Path, dest: &Path| {
        extract(
            "tar",
            Command::new("tar").args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"]).arg(t),
            dest,
        )
    };
    let cmp = strict_cmp();
    let (a, b) = (gnu(&plain_tar, &base.join("gnu-plain")), gnu(&path, &base.join("gnu-aligned")));
    assert!(a.len() > 20);
    assert_eq!(support::diff_trees(&a, &b, &cmp), Vec::<String>::new(), "GNU tar");
    let sparse_sha = m[&b"data/sparse"[..]].sha.clone();
    assert_eq!(b[&b"data/sparse"[..]].sha, sparse_sha, "GNU tar's sparse file");
    assert!(plain.len() < 4 << 20, "the sparse file was stored dense");
    let bsdx = |t: &Path, dest: &Path| {
        extract("bsdtar", Command::new("bsdtar").args(["--xattrs", "--numeric-owner", "-xpf"]).arg(t), dest)
    };
    let (a, b) = (bsdx(&plain_tar, &base.join("bsd-plain")), bsdx(&path, &base.join("bsd-aligned")));
    assert_eq!(support::diff_trees(&a, &b, &cmp), Vec::<String>::new(), "bsdtar");
    assert_eq!(b[&b"data/sparse"[..]].sha, sparse_sha, "bsdtar's sparse file");
    let tar_rs = |bytes: &[u8], dest: &Path| {
        fs::create_dir_all(dest).unwrap();
        let mut a = tar::Archive::new(bytes);
        a.set_preserve_permissions(true);
        a.set_preserve_ownerships(true);
        a.set_unpack_xattrs(true);
        a.unpack(dest).unwrap();
        support::snapshot(dest)
    };
    let (a, b) = (tar_rs(&plain, &base.join("rs-plain")), tar_rs(&stream, &base.join("rs-aligned")));
    // The tar crate sets no directory mtimes after filling them: compare without them.
    let loose = support::Cmp { dir_mtime: false, ..strict_cmp() };
    assert_eq!(support::diff_trees(&a, &b, &loose), Vec::<String>::new(), "tar crate");

    // And our own import of each, fast path and stream, shows the sandbox's view.
    let mut w1 = Workspace::create(base.join("w1"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    let st = w1.import_diff_file(&File::open(&path).unwrap()).unwrap();
    assert_eq!((st.digest, st.entries, st.file_bytes), (None, ss.entries, ss.file_bytes));
    assert_same("fast-path import of the aligned export", &m, &mounted_view(&mut w1));
    let mut w2 = Workspace::create(base.join("w2"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    let st = w2.import_diff(&plain[..]).unwrap();
    assert_eq!(st.digest, ps.digest);
    assert_same("stream import of the plain export", &m, &mounted_view(&mut w2));
    // The fast path on an unaligned archive (the kernel copies what it cannot share).
    let mut w3 = Workspace::create(base.join("w3"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    w3.import_diff_file(&File::open(&plain_tar).unwrap()).unwrap();
    assert_same("fast-path import of the plain export", &m, &mounted_view(&mut w3));
    for w in [w1, w2, w3] {
        w.destroy().unwrap();
    }
}

#[test]
fn aligned_export_appends_at_the_file_position_and_import_reads_from_it() {
    let test = "aligned_export_appends_at_the_file_position_and_import_reads_from_it";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let (ws, m) = written_workspace(&base.join("ws"), &lower, WorkspaceOptions::default());
    let mut stream = Vec::new();
    ws.export_diff(&mut stream, &DiffOptions::aligned()).unwrap();
    // After a 4096-byte prefix the archive is the same bytes (alignment is absolute).
    let path = base.join("prefixed");
    let mut f = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    f.write_all(&[b'p'; 4096]).unwrap();
    ws.export_diff_file(&f, &DiffOptions::aligned()).unwrap();
    let all = fs::read(&path).unwrap();
    assert!(all[4096..] == stream[..], "a 4096-byte prefix changed the archive");
    // After a 1024-byte prefix, data is still aligned in the file.
    let path2 = base.join("prefixed-1k");
    let mut f2 = File::options().read(true).write(true).create_new(true).open(&path2).unwrap();
    f2.write_all(&[b'p'; 1024]).unwrap();
    ws.export_diff_file(&f2, &DiffOptions::aligned()).unwrap();
    let all2 = fs::read(&path2).unwrap();
    for (p, off, _) in file_data_offsets(&all2[1024..]) {
        assert_eq!((off + 1024) % 4096, 0, "{p}");
    }
    // An O_APPEND file: data still aligned where it lands (at the end of the file).
    let path3 = base.join("append");
    fs::write(&path3, [b'a'; 1536]).unwrap();
    let f3 = File::options().append(true).open(&path3).unwrap();
    let st = ws.export_diff_file(&f3, &DiffOptions::aligned()).unwrap();
    let all3 = fs::read(&path3).unwrap();
    assert_eq!(st.size, all3.len() as u64 - 1536);
    for (p, off, _) in file_data_offsets(&all3[1536..]) {
        assert_eq!((off + 1536) % 4096, 0, "O_APPEND: {p}");
    }
    // Import from the position: the prefix is not part of the archive.
    f2.seek(SeekFrom::Start(1024)).unwrap();
    let mut w = Workspace::create(base.join("w"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    w.import_diff_file(&f2).unwrap();
    assert_eq!(f2.stream_position().unwrap(), all2.len() as u64, "the file is consumed");
    assert_same("import from an offset", &m, &mounted_view(&mut w));
    w.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------
// 2. Fallbacks: ext4 and tmpfs (no reflinks), across filesystems (EXDEV)

/// On `fs_dir`: workspace, aligned export into a file on `tar_dir`, fast-path import
/// into a second workspace on `fs_dir`. The archive must equal the stream export and
/// the imported upper the stream-imported one.
fn fallback_round_trip(what: &str, fs_dir: &Path, tar_dir: &Path, lower: &Path) {
    let (ws, m) = written_workspace(&fs_dir.join("ws"), lower, WorkspaceOptions::default());
    let mut stream = Vec::new();
    ws.export_diff(&mut stream, &DiffOptions::aligned()).unwrap();
    let path = tar_dir.join("ckpt.tar");
    ws.checkpoint(&path).unwrap();
    assert!(fs::read(&path).unwrap() == stream, "{what}: the checkpoint differs from the aligned stream export");
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600, "{what}: checkpoint mode");
    let mut fast = Workspace::restore(fs_dir.join("fast"), lower, WorkspaceOptions::default(), &path).unwrap();
    let mut slow = Workspace::create(fs_dir.join("slow"), lower, WorkspaceOptions::default()).unwrap();
    slow.import_diff(&stream[..]).unwrap();
    // Whiteouts' own mtimes are their creation times (they are not part of the view).
    let upper = |w: &Workspace| {
        let mut s = support::snapshot(w.upper());
        for n in s.values_mut().filter(|n| n.ty == support::Ty::Char && n.rdev == Some((0, 0))) {
            n.mtime = (0, 0);
        }
        s
    };
    let (a, b) = (upper(&slow), upper(&fast));
    assert_eq!(support::diff_trees(&a, &b, &strict_cmp()), Vec::<String>::new(), "{what}: uppers differ");
    assert_same(what, &m, &mounted_view(&mut fast));
    for w in [ws, fast, slow] {
        w.destroy().unwrap();
    }
    fs::remove_file(&path).unwrap();
}

#[test]
fn fallback_on_ext4_tmpfs_and_across_filesystems_is_byte_identical() {
    let test = "fallback_on_ext4_tmpfs_and_across_filesystems_is_byte_identical";
    let Some((tmp, _m)) = setup(test) else { return };
    if !support::require_tools(test, &["mkfs.ext4", "mount"]) {
        return;
    }
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let ext4 = base.join("ext4");
    let _e = loop_fs(&base.join("ext4.img"), &ext4, 256 << 20, &["mkfs.ext4", "-q", "-F", "-b", "4096"]);
    assert_eq!(fs_type(&ext4), libc::EXT4_SUPER_MAGIC);
    // Data is aligned to the destination's block size: 1 KiB blocks give 1 KiB alignment
    // (and so a different archive from the 4 KiB-aligned stream export).
    let ext4k = base.join("ext4-1k");
    let _k = loop_fs(&base.join("ext4k.img"), &ext4k, 64 << 20, &["mkfs.ext4", "-q", "-F", "-b", "1024"]);
    {
        let (ws, _) = written_workspace(&base.join("ws1k"), &lower, WorkspaceOptions::default());
        let p = ext4k.join("ckpt");
        ws.checkpoint(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().blksize(), 1024);
        let offs = file_data_offsets(&fs::read(&p).unwrap());
        assert!(offs.iter().all(|o| o.1 % 1024 == 0) && offs.iter().any(|o| o.1 % 4096 != 0), "{offs:?}");
        ws.destroy().unwrap();
    }
    let shm = base.join("t");
    fs::create_dir(&shm).unwrap();
    fallback_round_trip("tmpfs", &shm, &shm, &lower);
    fallback_round_trip("ext4", &ext4, &ext4, &lower);
    // Upper on tmpfs, archive on ext4 and back: copy_file_range gives EXDEV, this
    // process copies.
    fallback_round_trip("tmpfs upper, ext4 archive", &shm, &ext4, &lower);
    fallback_round_trip("ext4 upper, tmpfs archive", &ext4, &shm, &lower);
}

// ---------------------------------------------------------------------------------------
// 3. XFS with reflinks: a multi-GiB diff shares its extents both ways

const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped: u32,
    count: u32,
    reserved: u32,
    extents: [FiemapExtent; 256],
}

/// Bytes of `path` in extents the filesystem reports as shared, and in all extents.
fn shared_bytes(path: &Path) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap();
    let (mut shared, mut total, mut start) = (0u64, 0u64, 0u64);
    loop {
        let mut m = Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped: 0,
            count: 256,
            reserved: 0,
            extents: [FiemapExtent::default(); 256],
        };
        // SAFETY: FS_IOC_FIEMAP fills at most `count` extents of the struct we own.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, &mut m as *mut Fiemap) };
        assert_eq!(r, 0, "FIEMAP {}: {}", path.display(), std::io::Error::last_os_error());
        if m.mapped == 0 {
            return (shared, total);
        }
        for e in &m.extents[..m.mapped as usize] {
            total += e.length;
            if e.flags & FIEMAP_EXTENT_SHARED != 0 {
                shared += e.length;
            }
            start = e.logical + e.length;
            if e.flags & FIEMAP_EXTENT_LAST != 0 {
                return (shared, total);
            }
        }
    }
}

const MIB: usize = 1 << 20;

/// Chunk `j` of big file `i`: distinct per file and chunk, cheap to regenerate.
fn chunk(base: &[u8], i: usize, j: usize) -> Vec<u8> {
    let mut c = base.to_vec();
    c[..8].copy_from_slice(&(i as u64).to_le_bytes());
    c[8..16].copy_from_slice(&(j as u64).to_le_bytes());
    c
}

fn check_big_files(dir: &Path, files: usize, mib: usize, base: &[u8], what: &str) {
    let mut buf = vec![0u8; MIB];
    for i in 0..files {
        let p = dir.join(format!("big/{i}.bin"));
        let mut f = BufReader::new(File::open(&p).unwrap());
        assert_eq!(fs::metadata(&p).unwrap().len(), (mib * MIB + i) as u64, "{what}: size of {}", p.display());
        for j in 0..mib {
            f.read_exact(&mut buf).unwrap();
            assert!(buf == chunk(base, i, j), "{what}: {} differs in MiB {j}", p.display());
        }
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).unwrap();
        assert_eq!(tail, vec![b't'; i], "{what}: tail of {}", p.display());
    }
}

#[test]
fn xfs_reflink_checkpoint_and_restore_share_extents() {
    let test = "xfs_reflink_checkpoint_and_restore_share_extents";
    let Some((tmp, _m)) = setup(test) else { return };
    if !support::require_tools(test, &["mkfs.xfs", "mount"]) {
        return;
    }
    // 4 × 512 MiB by default (a multi-GiB diff); CHECKPOINT_TEST_MIB sets the file size.
    let files = 4;
    let mib: usize = std::env::var("CHECKPOINT_TEST_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    let data = (files * mib * MIB) as u64;
    let base = tmp.path();
    let xfs = base.join("xfs");
    let _x = loop_fs(&base.join("xfs.img"), &xfs, 3 * data + (1 << 30), &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
    assert_eq!(fs_type(&xfs), libc::XFS_SUPER_MAGIC);
    let lower = xfs.join("lower");
    make_lower(&lower);

    let mut ws = Workspace::create(xfs.join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    fs::create_dir(t.join("big")).unwrap();
    let pattern = support::pseudo_random(7, MIB);
    for i in 0..files {
        let mut f = std::io::BufWriter::new(File::create(t.join(format!("big/{i}.bin"))).unwrap());
        for j in 0..mib {
            f.write_all(&chunk(&pattern, i, j)).unwrap();
        }
        // Unaligned sizes: each file ends in a partial block, which is copied, not shared.
        f.write_all(&vec![b't'; i]).unwrap();
    }
    fs::remove_file(t.join("delete-me")).unwrap();
    // Checkpointed while mounted (the sandbox frozen): the upper is read directly.
    let free0 = free_bytes(&xfs);
    let ckpt = xfs.join("ckpt.tar");
    let stats = ws.checkpoint(&ckpt).unwrap();
    let free1 = free_bytes(&xfs);
    assert_eq!(stats.file_bytes, data + (0..files as u64).sum::<u64>());
    let slack = data / 100 + (16 << 20);
    assert!(
        free0 - free1 < slack,
        "the checkpoint consumed {} MiB for {} MiB of data",
        (free0 - free1) >> 20,
        data >> 20
    );
    let (shared, total) = shared_bytes(&ckpt);
    assert!(shared >= data - (files as u64) * 4096, "checkpoint: {shared} of {total} bytes shared, data {data}");

    // Restore next to it: the upper's files share the checkpoint's extents.
    let mut restored =
        Workspace::restore(xfs.join("restored"), lower.as_path(), WorkspaceOptions::default(), &ckpt).unwrap();
    let free2 = free_bytes(&xfs);
    assert!(free1 - free2 < slack, "the restore consumed {} MiB for {} MiB of data", (free1 - free2) >> 20, data >> 20);
    for i in 0..files {
        let (shared, _) = shared_bytes(&restored.upper().join(format!("big/{i}.bin")));
        assert!(shared >= (mib * MIB) as u64 - 4096, "restored big/{i}.bin: only {shared} bytes shared");
    }
    let rt = restored.mount(KernelOverlay::new()).unwrap().to_path_buf();
    check_big_files(&rt, files, mib, &pattern, "restored view");
    assert!(!rt.join("delete-me").exists() && rt.join("keep/same").exists());
    restored.destroy().unwrap();

    // The control: a plain export copies every byte (so the accounting above can fail).
    let plain = xfs.join("plain.tar");
    ws.unmount().unwrap();
    let f = File::create(&plain).unwrap();
    ws.export_diff_file(&f, &DiffOptions::default()).unwrap();
    drop(f);
    let free3 = free_bytes(&xfs);
    assert!(free2 - free3 >= data * 9 / 10, "plain export consumed only {} MiB", (free2 - free3) >> 20);
    assert_eq!(shared_bytes(&plain).0, 0, "a plain export shares nothing");
    ws.destroy().unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Memory-backed uppers

#[test]
fn tmpfs_upper_round_trip_through_checkpoint_destroy_restore() {
    let test = "tmpfs_upper_round_trip_through_checkpoint_destroy_restore";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    // The checkpoint goes to a disk filesystem (ext4 here when available, else the scratch tmpfs).
    let disk = base.join("disk");
    fs::create_dir(&disk).unwrap();

    let dir = base.join("ws");
    let mut ws = Workspace::create(&dir, lower.as_path(), WorkspaceOptions::tmpfs(64 << 20)).unwrap();
    assert!(ws.is_tmpfs());
    assert!(ws.upper().starts_with(dir.join("mem")), "{}", ws.upper().display());
    assert!(rootfs_cache::is_mount_point(&dir.join("mem")).unwrap());
    assert_eq!(fs_type(ws.upper()), libc::TMPFS_MAGIC);
    assert_eq!(fs::metadata(dir.join("mem")).unwrap().mode() & 0o777, 0o700);
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    write_sandbox(&t);
    let m = view(&t);
    let ckpt = disk.join("sandbox.ckpt");
    ws.checkpoint(&ckpt).unwrap();
    // Writes after the checkpoint are not in it.
    ops::write(&t.join("after-checkpoint"), b"lost on purpose");
    ws.destroy().unwrap();
    assert!(!dir.exists(), "destroy left {}", dir.display());

    for (name, opts) in [("tmpfs", WorkspaceOptions::tmpfs(64 << 20)), ("disk", WorkspaceOptions::default())] {
        let mut r = Workspace::restore(base.join(name), lower.as_path(), opts, &ckpt).unwrap();
        assert_eq!(r.is_tmpfs(), name == "tmpfs");
        assert_same(&format!("restored into a {name} upper"), &m, &mounted_view(&mut r));
        // A restored tmpfs workspace checkpoints again to the same bytes.
        let again = disk.join(format!("{name}.again"));
        r.checkpoint(&again).unwrap();
        assert!(fs::read(&again).unwrap() == fs::read(&ckpt).unwrap(), "{name}: second checkpoint differs");
        r.destroy().unwrap();
    }
}

fn reset_tmpfs(size: u64) -> WorkspaceOptions {
    let mut o = WorkspaceOptions::tmpfs(size);
    o.reset = true;
    o
}

#[test]
fn tmpfs_upper_lifecycle() {
    let test = "tmpfs_upper_lifecycle";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let is_mp = |p: &Path| rootfs_cache::is_mount_point(p).unwrap();

    // Size 0 would be an unlimited tmpfs: refused.
    let e = Workspace::create(base.join("zero"), lower.as_path(), WorkspaceOptions::tmpfs(0)).unwrap_err();
    assert!(matches!(e, Error::InvalidSpec { .. }), "{e:?}");

    // The size limit holds inside the sandbox.
    let mut ws = Workspace::create(base.join("small"), lower.as_path(), WorkspaceOptions::tmpfs(1 << 20)).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    let e = fs::write(t.join("big"), vec![0u8; 2 << 20]).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // reset, detach, apply-free paths work inside the tmpfs.
    ws.reset().unwrap();
    assert!(is_mp(&base.join("small/mem")), "reset unmounted the tmpfs");
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    ops::write(&t.join("kept"), b"through detach");
    ws.detach().unwrap();
    assert_eq!(fs::read(t.join("kept")).unwrap(), b"through detach");
    assert_eq!(fs::read(t.join("keep/same")).unwrap(), b"untouched\n");
    assert!(!base.join("small/upper.detach").exists() && !base.join("small/upper").exists());
    // Drop unmounts the overlay, then the tmpfs.
    drop(ws);
    assert!(!is_mp(&base.join("small/rootfs")) && !is_mp(&base.join("small/mem")), "drop left mounts");

    // A process that died with its workspace: the tmpfs stays mounted. A new create
    // refuses it, unless asked to reset (then the old writes are gone).
    let crashed = base.join("crashed");
    let mut ws = Workspace::create(&crashed, lower.as_path(), WorkspaceOptions::tmpfs(8 << 20)).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    ops::write(&t.join("stale"), b"from the dead process");
    ws.unmount().unwrap();
    // A process that died without a word: its tmpfs stays mounted, nothing describes it
    // (its lock went with it).
    ws.keep().unwrap();
    fs::remove_file(crashed.join("workspace.json")).unwrap();
    assert!(is_mp(&crashed.join("mem")));
    let e = Workspace::create(&crashed, lower.as_path(), WorkspaceOptions::tmpfs(8 << 20)).unwrap_err();
    assert!(matches!(&e, Error::AlreadyMounted { path } if path == &crashed.join("mem")), "{e:?}");
    let e = Workspace::create(&crashed, lower.as_path(), WorkspaceOptions::default()).unwrap_err();
    assert!(matches!(e, Error::AlreadyMounted { .. }), "a disk workspace over a leftover tmpfs: {e:?}");
    let opts = reset_tmpfs(8 << 20);
    let mut ws = Workspace::create(&crashed, lower.as_path(), opts).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    assert!(!t.join("stale").exists(), "reset kept the dead process's writes");
    // destroy refuses (deleting nothing) while something else is mounted on the view;
    // the refused handle gives everything up: the workspace stays as it is (its tmpfs
    // too), described for `open`.
    ws.unmount().unwrap();
    let t = ws.target().to_path_buf();
    nix::mount::mount(Some("tmpfs"), &t, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
    let e = ws.destroy().unwrap_err();
    assert!(matches!(e, Error::AlreadyMounted { .. }), "{e:?}");
    assert!(is_mp(&t) && crashed.join("mem").exists(), "a refused destroy deleted or unmounted the view");
    assert!(is_mp(&crashed.join("mem")), "a refused destroy threw the tmpfs upper away");
    nix::mount::umount2(&t, MntFlags::MNT_DETACH).unwrap();
    Workspace::open(&crashed).unwrap().destroy().unwrap();
    assert!(!crashed.exists() && !is_mp(&crashed.join("mem")));
    let opts = reset_tmpfs(8 << 20);
    Workspace::create(&crashed, lower.as_path(), opts).unwrap().destroy().unwrap();
    assert!(!crashed.exists());

    // A `mem` of someone else's with files in it is never mounted over (destroy would
    // delete them).
    let theirs = base.join("theirs");
    fs::create_dir_all(theirs.join("mem")).unwrap();
    ops::write(&theirs.join("mem/precious"), b"not the crate's");
    let e = Workspace::create(&theirs, lower.as_path(), WorkspaceOptions::tmpfs(8 << 20)).unwrap_err();
    assert!(matches!(e, Error::NotEmpty { .. }), "{e:?}");
    assert!(!is_mp(&theirs.join("mem")));
    assert_eq!(fs::read(theirs.join("mem/precious")).unwrap(), b"not the crate's");

    // A leftover mount of the crate's kind but without its mark is never unmounted by reset.
    let odd = base.join("odd");
    fs::create_dir_all(odd.join("mem")).unwrap();
    nix::mount::mount(Some(lower.as_path()), &odd.join("mem"), None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
    let opts = reset_tmpfs(8 << 20);
    let e = Workspace::create(&odd, lower.as_path(), opts).unwrap_err();
    assert!(matches!(e, Error::AlreadyMounted { .. }), "{e:?}");
    assert!(is_mp(&odd.join("mem")));
    nix::mount::umount2(&odd.join("mem"), MntFlags::MNT_DETACH).unwrap();
}

// ---------------------------------------------------------------------------------------
// 5. Failures

#[test]
fn checkpoint_on_a_full_disk_keeps_the_previous_checkpoint() {
    let test = "checkpoint_on_a_full_disk_keeps_the_previous_checkpoint";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let small = base.join("small");
    let _s = tmpfs(&small, "size=1m");
    let mut ws = Workspace::create(base.join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    ops::write(&t.join("small"), b"fits");
    let ckpt = small.join("ckpt");
    ws.checkpoint(&ckpt).unwrap();
    let before = fs::read(&ckpt).unwrap();
    ops::write(&t.join("big"), &support::pseudo_random(3, 3 << 20));
    let e = ws.checkpoint(&ckpt).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e:?}");
    assert!(fs::read(&ckpt).unwrap() == before, "the previous checkpoint changed");
    let names: Vec<_> = fs::read_dir(&small).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ckpt")], "temporary files left behind");
    ws.destroy().unwrap();
}

#[test]
fn broken_archives_on_the_fast_path_leave_an_empty_upper() {
    let test = "broken_archives_on_the_fast_path_leave_an_empty_upper";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let (ws, _) = written_workspace(&base.join("ws"), &lower, WorkspaceOptions::default());
    let mut good = Vec::new();
    ws.export_diff(&mut good, &DiffOptions::aligned()).unwrap();
    let offs = file_data_offsets(&good);
    let (_, big_off, big_len) = offs.iter().max_by_key(|o| o.2).unwrap().clone();

    // Cut inside the biggest file's data, and just after its header.
    let cuts = [big_off + big_len / 2, big_off, good.len() as u64 - 1024 - 700];
    let mut w = Workspace::create(base.join("w"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    for cut in cuts {
        let p = base.join(format!("cut-{cut}"));
        fs::write(&p, &good[..cut as usize]).unwrap();
        let e = w.import_diff_file(&File::open(&p).unwrap()).unwrap_err();
        assert!(matches!(e, Error::InvalidArchive { .. }), "cut at {cut}: {e:?}");
        assert!(ops::ls(w.upper()).is_empty(), "cut at {cut}: upper holds {:?}", ops::ls(w.upper()));
    }
    // A header that claims more data than the file holds (checksum fixed up).
    let mut lying = good.clone();
    let hdr = (big_off - 512) as usize;
    let size_field = format!("{:011o}\0", big_len * 1000);
    lying[hdr + 124..hdr + 136].copy_from_slice(size_field.as_bytes());
    lying[hdr + 148..hdr + 156].copy_from_slice(b"        ");
    let sum: u32 = lying[hdr..hdr + 512].iter().map(|&b| u32::from(b)).sum();
    lying[hdr + 148..hdr + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let p = base.join("lying");
    fs::write(&p, &lying).unwrap();
    let e = w.import_diff_file(&File::open(&p).unwrap()).unwrap_err();
    assert!(matches!(e, Error::InvalidArchive { .. }), "lying size: {e:?}");
    assert!(ops::ls(w.upper()).is_empty());
    // The intact archive imports fine afterwards.
    let p = base.join("good");
    fs::write(&p, &good).unwrap();
    w.import_diff_file(&File::open(&p).unwrap()).unwrap();
    w.destroy().unwrap();
    ws.destroy().unwrap();
}

#[test]
fn restore_of_hostile_or_missing_checkpoints_leaves_nothing() {
    let test = "restore_of_hostile_or_missing_checkpoints_leaves_nothing";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let e = Workspace::restore(base.join("a"), lower.as_path(), WorkspaceOptions::default(), base.join("missing"))
        .unwrap_err();
    assert!(matches!(e, Error::Io { op: "open", .. }), "{e:?}");
    assert!(!base.join("a").exists());

    let hostile =
        support::tar_of(&[support::Ent::file("ok", "fine"), support::Ent::file("../escape", "out")], support::Fmt::Gnu);
    let p = base.join("hostile.tar");
    fs::write(&p, &hostile).unwrap();
    for (name, opts) in [("b", WorkspaceOptions::default()), ("c", WorkspaceOptions::tmpfs(8 << 20))] {
        let e = Workspace::restore(base.join(name), lower.as_path(), opts, &p).unwrap_err();
        assert!(matches!(e, Error::PathEscape { .. }), "{e:?}");
        assert!(!base.join(name).exists(), "{name}: restore left its workspace behind");
    }
    assert!(!base.join("escape").exists() && !tmp.path().join("escape").exists());
    // Compressed checkpoints go the ordinary way (with digests).
    let z = base.join("z.tar.zst");
    fs::write(&z, support::zstd(&support::tar_of(&[support::Ent::file("z", "zstd")], support::Fmt::Gnu))).unwrap();
    let mut w = Workspace::restore(base.join("d"), lower.as_path(), WorkspaceOptions::default(), &z).unwrap();
    assert_eq!(fs::read(w.upper().join("z")).unwrap(), b"zstd");
    let mut again = Workspace::create(base.join("e"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    let st = again.import_diff_file(&File::open(&z).unwrap()).unwrap();
    assert!(st.digest.is_some() && st.diff_id.is_some(), "a streamed import has digests");
    w.mount(KernelOverlay::new()).unwrap();
    w.destroy().unwrap();
    again.destroy().unwrap();
}

#[test]
fn refusals() {
    let test = "refusals";
    let Some((tmp, _m)) = setup(test) else { return };
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let mut ws = Workspace::create(base.join("ws"), lower.as_path(), WorkspaceOptions::default()).unwrap();
    // Aligned and compressed contradict each other.
    let mut opts = DiffOptions::aligned();
    opts.compression = Compression::Zstd;
    let e = ws.export_diff(Vec::new(), &opts).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    let f = File::create(base.join("x")).unwrap();
    let e = ws.export_diff_file(&f, &opts).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert_eq!(f.metadata().unwrap().len(), 0, "a refused export wrote something");
    // The copy backend puts writes in the upper only at unmount: reading the upper while
    // it is mounted would miss them.
    let t = ws.mount(CopyBackend::new()).unwrap().to_path_buf();
    ops::write(&t.join("in-the-copy"), b"only in the target until unmount");
    let e = ws.checkpoint(base.join("c")).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert!(!base.join("c").exists());
    assert!(matches!(ws.changes(), Err(Error::Unsupported { .. })));
    ws.unmount().unwrap();
    ws.checkpoint(base.join("c")).unwrap();
    let mut r =
        Workspace::restore(base.join("r"), lower.as_path(), WorkspaceOptions::default(), base.join("c")).unwrap();
    assert_eq!(fs::read(r.upper().join("in-the-copy")).unwrap(), b"only in the target until unmount");
    // Import into a mounted or non-empty workspace.
    let e = r.import_diff_file(&File::open(base.join("c")).unwrap()).unwrap_err();
    assert!(matches!(e, Error::NotEmpty { .. }), "{e:?}");
    r.mount(KernelOverlay::new()).unwrap();
    let e = r.import_diff_file(&File::open(base.join("c")).unwrap()).unwrap_err();
    assert!(matches!(e, Error::AlreadyMounted { .. }), "{e:?}");
    // A checkpoint path that names no file.
    let e = r.checkpoint("/").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    r.destroy().unwrap();
    ws.destroy().unwrap();
    let _ = UpperStorage::Disk;
}

/// GNU tar archives (sparse entries in both GNU and PAX 1.0 formats, hardlinks, long
/// names) through the fast path: sparse data is read, the rest cloned, and the result
/// is what the streaming import makes of the same archive.
#[test]
fn fast_path_imports_gnu_tar_archives_like_the_stream_path() {
    let test = "fast_path_imports_gnu_tar_archives_like_the_stream_path";
    let Some((tmp, _m)) = setup(test) else { return };
    if !support::require_tools(test, &["tar"]) {
        return;
    }
    let base = tmp.path();
    let lower = base.join("lower");
    make_lower(&lower);
    let src = base.join("src");
    fs::create_dir(&src).unwrap();
    let f = File::create(src.join("sparse")).unwrap();
    f.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"in the middle", 3 << 20).unwrap();
    f.write_all_at(&support::pseudo_random(5, 70_000), 6 << 20).unwrap();
    drop(f);
    ops::write(&src.join("plain"), &support::pseudo_random(6, 123_457));
    fs::hard_link(src.join("plain"), src.join("plain-link")).unwrap();
    let deep = src.join("d".repeat(120));
    fs::create_dir(&deep).unwrap();
    ops::write(&deep.join("f".repeat(110)), b"long name");
    for format in ["gnu", "posix"] {
        let archive = base.join(format!("{format}.tar"));
        support::run(
            Command::new("tar")
                .args(["--sparse", &format!("--format={format}"), "-C"])
                .arg(&src)
                .arg("-cf")
                .arg(&archive)
                .arg("."),
        );
        let mut fast =
            Workspace::create(base.join(format!("fast-{format}")), lower.as_path(), Default::default()).unwrap();
        let st = fast.import_diff_file(&File::open(&archive).unwrap()).unwrap();
        assert_eq!(st.digest, None, "{format}: the fast path was not taken");
        let mut slow =
            Workspace::create(base.join(format!("slow-{format}")), lower.as_path(), Default::default()).unwrap();
        slow.import_diff(File::open(&archive).unwrap()).unwrap();
        let (a, b) = (support::snapshot(slow.upper()), support::snapshot(fast.upper()));
        let cmp = support::Cmp { hardlinks: true, ..strict_cmp() };
        assert_eq!(support::diff_trees(&a, &b, &cmp), Vec::<String>::new(), "{format}");
        assert_eq!(fs::read(fast.upper().join("sparse")).unwrap(), fs::read(src.join("sparse")).unwrap());
        assert_eq!(
            fs::metadata(fast.upper().join("plain")).unwrap().ino(),
            fs::metadata(fast.upper().join("plain-link")).unwrap().ino()
        );
        fast.destroy().unwrap();
        slow.destroy().unwrap();
    }
}
