//! Hostile archives thrown at [`rootfs_cache::unpack`].
//!
//! Every archive is built here, header by header (the `tar` crate refuses to write most
//! of these), and extracted into a fresh `dest/` that sits next to a `canary/` sibling.
//! Each case runs in both whiteout modes, pipelined and not, and checks two things:
//! the exact error variant (or the exact result for the cases that must succeed), and
//! that nothing outside `dest/` changed: the canary tree (listing, content, mode,
//! owner, link count, mtime, ctime, xattrs) and the parent directory (its listing, its
//! mtime and ctime).

use std::ffi::CString;
use std::fs;
use std::io::{Cursor, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rootfs_cache::{Digest, Error, UnpackOptions, UnpackStats, WhiteoutMode, unpack};

// ---------------------------------------------------------------------------------------
// Raw tar construction
// ---------------------------------------------------------------------------------------

const BLOCK: usize = 512;
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// The magic of a header.
#[derive(Clone, Copy)]
enum Format {
    /// POSIX ustar: `ustar\0` `00`, with the prefix field.
    Ustar,
    /// GNU: `ustar  \0`, no prefix field.
    Gnu,
}

/// One 512-byte header block, checksummed when emitted.
#[derive(Clone)]
struct Hdr {
    b: [u8; BLOCK],
    bad_checksum: bool,
}

impl Hdr {
    fn new(format: Format, name: impl AsRef<[u8]>, typeflag: u8) -> Hdr {
        let mut h = Hdr { b: [0; BLOCK], bad_checksum: false };
        h = h
            .field(0, 100, name.as_ref())
            .octal(100, 8, 0o644)
            .octal(108, 8, 0)
            .octal(116, 8, 0)
            .octal(124, 12, 0)
            .octal(136, 12, 1_600_000_000)
            .octal(329, 8, 0)
            .octal(337, 8, 0);
        h.b[156] = typeflag;
        match format {
            Format::Ustar => h.field(257, 8, b"ustar\x0000"),
            Format::Gnu => h.field(257, 8, b"ustar  \0"),
        }
    }

    fn ustar(name: impl AsRef<[u8]>, typeflag: u8) -> Hdr {
        Hdr::new(Format::Ustar, name, typeflag)
    }

    /// Overwrite `len` bytes at `off` with `bytes`, NUL-padded.
    fn field(mut self, off: usize, len: usize, bytes: &[u8]) -> Hdr {
        assert!(bytes.len() <= len, "{} bytes do not fit a {len}-byte field", bytes.len());
        self.b[off..off + len].fill(0);
        self.b[off..off + bytes.len()].copy_from_slice(bytes);
        self
    }

    /// An octal number: `len - 1` digits and a NUL.
    fn octal(self, off: usize, len: usize, v: u64) -> Hdr {
        let s = format!("{v:0width$o}", width = len - 1);
        assert_eq!(s.len(), len - 1, "{v} does not fit {len} bytes of octal");
        self.field(off, len, s.as_bytes())
    }

    /// A GNU base-256 number (big endian, high bit of the first byte set).
    fn base256(mut self, off: usize, len: usize, v: u128) -> Hdr {
        assert!(len < 16 && v >> (8 * len - 1) == 0, "{v} does not fit {len} bytes of base-256");
        self.b[off..off + len].copy_from_slice(&v.to_be_bytes()[16 - len..]);
        self.b[off] |= 0x80;
        self
    }

    fn size(self, v: u64) -> Hdr {
        if v < 1 << 33 { self.octal(124, 12, v) } else { self.base256(124, 12, u128::from(v)) }
    }

    fn link(self, target: impl AsRef<[u8]>) -> Hdr {
        self.field(157, 100, target.as_ref())
    }

    fn prefix(self, p: impl AsRef<[u8]>) -> Hdr {
        self.field(345, 155, p.as_ref())
    }

    fn corrupt_checksum(mut self) -> Hdr {
        self.bad_checksum = true;
        self
    }

    fn block(&self) -> [u8; BLOCK] {
        let mut b = self.b;
        b[148..156].copy_from_slice(b"        ");
        let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
        let sum = if self.bad_checksum { sum + 1 } else { sum };
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }
}

/// One PAX record: `<len> <key>=<value>\n`, where `<len>` counts itself.
fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while base + len.to_string().len() != len {
        len = base + len.to_string().len();
    }
    let mut r = format!("{len} ").into_bytes();
    r.extend_from_slice(key);
    r.push(b'=');
    r.extend_from_slice(value);
    r.push(b'\n');
    assert_eq!(r.len(), len);
    r
}

/// An archive under construction.
#[derive(Default)]
struct Tar {
    buf: Vec<u8>,
}

impl Tar {
    fn new() -> Tar {
        Tar::default()
    }

    fn header(&mut self, h: &Hdr) -> &mut Tar {
        self.buf.extend_from_slice(&h.block());
        self
    }

    /// Raw data followed by zero padding to the next block.
    fn data(&mut self, d: &[u8]) -> &mut Tar {
        self.buf.extend_from_slice(d);
        self.buf.resize(self.buf.len().next_multiple_of(BLOCK), 0);
        self
    }

    fn raw(&mut self, d: &[u8]) -> &mut Tar {
        self.buf.extend_from_slice(d);
        self
    }

    /// A header whose size field is set to the length of `data`, then the data.
    fn entry(&mut self, h: Hdr, data: &[u8]) -> &mut Tar {
        self.header(&h.size(data.len() as u64)).data(data)
    }

    fn file(&mut self, name: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> &mut Tar {
        self.entry(Hdr::ustar(name, b'0'), data.as_ref())
    }

    fn dir(&mut self, name: impl AsRef<[u8]>) -> &mut Tar {
        self.header(&Hdr::ustar(name, b'5').octal(100, 8, 0o755))
    }

    fn symlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Tar {
        self.header(&Hdr::ustar(name, b'2').octal(100, 8, 0o777).link(target))
    }

    fn hardlink(&mut self, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> &mut Tar {
        self.header(&Hdr::ustar(name, b'1').link(target))
    }

    fn fifo(&mut self, name: impl AsRef<[u8]>) -> &mut Tar {
        self.header(&Hdr::ustar(name, b'6'))
    }

    /// A PAX extended header ('x') for the next entry.
    fn pax(&mut self, records: &[(&[u8], &[u8])]) -> &mut Tar {
        let mut d = Vec::new();
        for (k, v) in records {
            d.extend_from_slice(&pax_record(k, v));
        }
        self.entry(Hdr::ustar("PaxHeaders/x", b'x'), &d)
    }

    /// A GNU `././@LongLink` header: `L` (name) or `K` (link target) for the next entry.
    fn gnu_long(&mut self, flag: u8, value: &[u8]) -> &mut Tar {
        let mut d = value.to_vec();
        d.push(0);
        self.entry(Hdr::new(Format::Gnu, "././@LongLink", flag), &d)
    }

    /// The archive so far, without the end-of-archive marker.
    fn unterminated(&self) -> Vec<u8> {
        self.buf.clone()
    }

    /// The archive with its two zero blocks.
    fn finish(&self) -> Vec<u8> {
        let mut v = self.buf.clone();
        v.resize(v.len() + 2 * BLOCK, 0);
        v
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

/// Write a tar holding one file of 1 GiB of zeros to `w`, in 1 MiB chunks.
fn write_bomb_tar(w: &mut impl Write) {
    w.write_all(&Hdr::ustar("zeros", b'0').size(GIB).block()).unwrap();
    let chunk = vec![0u8; MIB as usize];
    for _ in 0..GIB / MIB {
        w.write_all(&chunk).unwrap();
    }
    w.write_all(&[0u8; 2 * BLOCK]).unwrap();
}

fn gzip_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        write_bomb_tar(&mut e);
        e.finish().unwrap()
    })
}

fn zstd_bomb() -> &'static [u8] {
    static BOMB: OnceLock<Vec<u8>> = OnceLock::new();
    BOMB.get_or_init(|| {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        write_bomb_tar(&mut e);
        e.finish().unwrap()
    })
}

// ---------------------------------------------------------------------------------------
// The sandbox: dest/ next to canary/
// ---------------------------------------------------------------------------------------

struct Sandbox {
    _tmp: tempfile::TempDir,
    parent: PathBuf,
    dest: PathBuf,
    canary: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let tmp = tempfile::Builder::new().prefix("unpack-hostile-").tempdir().unwrap();
        let parent = tmp.path().to_path_buf();
        let dest = parent.join("dest");
        let canary = parent.join("canary");
        fs::create_dir(&dest).unwrap();
        fs::create_dir_all(canary.join("sub")).unwrap();
        fs::write(canary.join("f"), "canary f\n").unwrap();
        fs::write(canary.join("g"), "canary g\n").unwrap();
        fs::write(canary.join("sub/h"), "canary h\n").unwrap();
        std::os::unix::fs::symlink("f", canary.join("link")).unwrap();
        Sandbox { _tmp: tmp, parent, dest, canary }
    }

    /// Everything outside `dest` that an escape could change.
    fn snapshot(&self) -> Vec<String> {
        let mut out = vec![format!("parent: {}", describe(&self.parent))];
        let mut names: Vec<String> = fs::read_dir(&self.parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        out.push(format!("parent listing: {names:?}"));
        walk(&self.canary, Path::new("canary"), &mut out);
        out
    }

    /// Total size of the regular files under `dest`.
    fn dest_bytes(&self) -> u64 {
        fn sum(p: &Path) -> u64 {
            let m = fs::symlink_metadata(p).unwrap();
            if m.is_dir() { fs::read_dir(p).unwrap().map(|e| sum(&e.unwrap().path())).sum() } else { m.len() }
        }
        sum(&self.dest)
    }

    /// Sorted names directly under `dest`.
    fn dest_listing(&self) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(&self.dest).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }
}

fn walk(p: &Path, rel: &Path, out: &mut Vec<String>) {
    out.push(format!("{}: {}", rel.display(), describe(p)));
    if fs::symlink_metadata(p).unwrap().is_dir() {
        let mut children: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
        children.sort();
        for c in children {
            walk(&p.join(&c), &rel.join(&c), out);
        }
    }
}

fn describe(p: &Path) -> String {
    let m = fs::symlink_metadata(p).unwrap();
    let ft = m.file_type();
    let content = if ft.is_file() { Some(fs::read(p).unwrap()) } else { None };
    let link = if ft.is_symlink() { Some(fs::read_link(p).unwrap()) } else { None };
    format!(
        "{ft:?} mode={:o} uid={} gid={} nlink={} ino={} size={} mtime={}.{} ctime={}.{} content={content:?} \
         link={link:?} xattrs={:?}",
        m.mode(),
        m.uid(),
        m.gid(),
        m.nlink(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        llistxattr(p),
    )
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The xattr names on `p` (not following a symlink).
fn llistxattr(p: &Path) -> Vec<String> {
    let path = cpath(p);
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: `path` is NUL-terminated and `buf` is a valid writable buffer of its length.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), std::io::Error::last_os_error());
    buf.truncate(n as usize);
    let mut names: Vec<String> =
        buf.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
    names.sort();
    names
}

/// The value of xattr `name` on `p` (not following a symlink), `None` if unset.
fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = cpath(p);
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: both strings are NUL-terminated; `buf` is a valid writable buffer of its length.
    let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENODATA), "lgetxattr {}: {e}", p.display());
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

/// Whether tests that need root can run; panics under CI when they cannot.
fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs root (CI is set, so not skipping)");
    }
    eprintln!("skipping: this test needs root");
    false
}

// ---------------------------------------------------------------------------------------
// Running a case in every configuration
// ---------------------------------------------------------------------------------------

const CONFIGS: [(WhiteoutMode, bool); 4] = [
    (WhiteoutMode::Overlay, false),
    (WhiteoutMode::Overlay, true),
    (WhiteoutMode::Apply, false),
    (WhiteoutMode::Apply, true),
];

/// What a check sees: the sandbox, a label naming the configuration, the result and
/// the blob that was extracted.
struct Run<'a> {
    sb: &'a Sandbox,
    label: String,
    mode: WhiteoutMode,
    blob: &'a [u8],
}

/// Extract `build`'s archive in every configuration (after `prepare` ran on the fresh
/// sandbox and `tweak` on the options), assert that nothing outside `dest` changed,
/// then hand the result to `check`.
fn run_all(
    tweak: impl Fn(&mut UnpackOptions),
    prepare: impl Fn(&Sandbox),
    build: impl Fn(&Sandbox) -> Vec<u8>,
    check: impl Fn(&Run<'_>, rootfs_cache::Result<UnpackStats>),
) {
    for (mode, pipelined) in CONFIGS {
        let sb = Sandbox::new();
        prepare(&sb);
        let before = sb.snapshot();
        let blob = build(&sb);
        let mut opts = UnpackOptions::default();
        opts.whiteouts = mode;
        opts.pipelined = pipelined;
        tweak(&mut opts);
        // Name the archive by its first header's name field (garbage for compressed blobs).
        let first = blob.get(..100).map(|n| n.split(|&b| b == 0).next().unwrap_or_default()).unwrap_or_default();
        let label = format!("{mode:?}, pipelined={pipelined}, first name {:?}", String::from_utf8_lossy(first));
        let result = unpack(Cursor::new(&blob[..]), &sb.dest, &opts);
        let after = sb.snapshot();
        assert!(
            before == after,
            "[{label}] something outside dest changed (result: {result:?})\nbefore: {before:#?}\nafter: {after:#?}"
        );
        check(&Run { sb: &sb, label, mode, blob: &blob }, result);
    }
}

/// A hostile archive that must fail with an error satisfying `want`.
fn hostile_with(
    tweak: impl Fn(&mut UnpackOptions),
    prepare: impl Fn(&Sandbox),
    build: impl Fn(&Sandbox) -> Vec<u8>,
    want: impl Fn(&Error) -> bool,
) {
    run_all(tweak, prepare, build, |run, result| match result {
        Ok(stats) => panic!("[{}] expected an error, extraction succeeded: {stats:?}", run.label),
        Err(e) => assert!(want(&e), "[{}] wrong error: {e:?} ({e})", run.label),
    });
}

fn hostile(build: impl Fn(&Sandbox) -> Vec<u8>, want: impl Fn(&Error) -> bool) {
    hostile_with(|_| {}, |_| {}, build, want);
}

/// An archive that must extract successfully; `check` inspects the outcome.
fn benign_with(
    prepare: impl Fn(&Sandbox),
    build: impl Fn(&Sandbox) -> Vec<u8>,
    check: impl Fn(&Run<'_>, &UnpackStats),
) {
    run_all(
        |_| {},
        prepare,
        build,
        |run, result| match result {
            Ok(stats) => check(run, &stats),
            Err(e) => panic!("[{}] expected success, got {e:?} ({e})", run.label),
        },
    );
}

fn benign(build: impl Fn(&Sandbox) -> Vec<u8>, check: impl Fn(&Run<'_>, &UnpackStats)) {
    benign_with(|_| {}, build, check);
}

fn is_escape(e: &Error) -> bool {
    matches!(e, Error::PathEscape { .. })
}

fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidArchive { .. })
}

fn is_limit(e: &Error) -> bool {
    matches!(e, Error::LimitExceeded { .. })
}

fn is_unsupported(e: &Error) -> bool {
    matches!(e, Error::Unsupported { .. })
}

fn is_errno(e: &Error, errno: i32) -> bool {
    matches!(e, Error::Io { .. }) && e.raw_os_error() == Some(errno)
}

fn canary_abs(sb: &Sandbox) -> Vec<u8> {
    sb.canary.as_os_str().as_bytes().to_vec()
}

fn canary_abs_join(sb: &Sandbox, rest: &str) -> Vec<u8> {
    sb.canary.join(rest).as_os_str().as_bytes().to_vec()
}

fn is_symlink_to(p: &Path, target: impl AsRef<Path>) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
        && fs::read_link(p).is_ok_and(|t| t == target.as_ref())
}

/// One archive per entry kind named `name`.
fn archives_naming(name: &[u8]) -> Vec<Vec<u8>> {
    vec![
        Tar::new().file(name, "pwned\n").finish(),
        Tar::new().dir(name).finish(),
        Tar::new().symlink(name, "target").finish(),
        Tar::new().fifo(name).finish(),
        Tar::new().file("ok", "x").hardlink(name, "ok").finish(),
    ]
}

// ---------------------------------------------------------------------------------------
// Path escapes
// ---------------------------------------------------------------------------------------

#[test]
fn absolute_entry_paths_are_escapes() {
    for name in [&b"/etc/x"[..], b"//x", b"/", b"/canary/f", b"///etc/passwd"] {
        for a in archives_naming(name) {
            hostile(|_| a.clone(), is_escape);
        }
    }
    // An absolute path built from the ustar prefix field.
    hostile(|_| Tar::new().entry(Hdr::ustar("x", b'0').prefix("/etc"), b"pwned").finish(), is_escape);
    // The canary's own absolute path.
    hostile(|sb| Tar::new().file(canary_abs_join(sb, "f"), "pwned").finish(), is_escape);
}

#[test]
fn dotdot_components_are_escapes() {
    for name in
        [&b"../x"[..], b"a/../../x", b"a/..", b"..", b"./../x", b"a/../b", b"../canary/f", b"a/b/../../../canary/f"]
    {
        for a in archives_naming(name) {
            hostile(|_| a.clone(), is_escape);
        }
    }
    // A `..` assembled from the ustar prefix field.
    hostile(|_| Tar::new().entry(Hdr::ustar("canary/f", b'0').prefix(".."), b"pwned").finish(), is_escape);
    // A directory named `a/..` with its trailing slash.
    hostile(|_| Tar::new().dir("a/../").finish(), is_escape);
}

#[test]
fn pax_path_overriding_an_innocent_name_is_checked() {
    for bad in [&b"../canary/f"[..], b"/etc/evil", b"a/../../canary/g"] {
        hostile(|_| Tar::new().pax(&[(b"path", bad)]).file("innocent", "pwned").finish(), is_escape);
    }
    hostile(|sb| Tar::new().pax(&[(b"path", &canary_abs_join(sb, "f"))]).file("innocent", "pwned").finish(), is_escape);
    // GNU.sparse.name names the entry too (it wins over `path`).
    for bad in [&b"../canary/f"[..], b"/etc/evil"] {
        hostile(
            |_| Tar::new().pax(&[(b"path", b"innocent"), (b"GNU.sparse.name", bad)]).file("innocent", "pwned").finish(),
            is_escape,
        );
    }
}

#[test]
fn gnu_long_name_escapes() {
    let long_dotdot =
        [&b"a/"[..]; 80].concat().into_iter().chain(b"../".repeat(81)).chain(*b"canary/f").collect::<Vec<_>>();
    for bad in [&b"../../canary/f"[..], b"/etc/evil", &long_dotdot] {
        hostile(
            |_| Tar::new().gnu_long(b'L', bad).entry(Hdr::new(Format::Gnu, "innocent", b'0'), b"x").finish(),
            is_escape,
        );
    }
}

#[test]
fn nul_in_a_path_is_an_escape() {
    for bad in [&b"a\0../../canary/f"[..], b"ok\0", b"\0", b"dir/\0/x"] {
        hostile(|_| Tar::new().pax(&[(b"path", bad)]).file("innocent", "pwned").finish(), is_escape);
    }
    // GNU long names lose trailing NULs only.
    hostile(|_| Tar::new().gnu_long(b'L', b"a\0b").entry(Hdr::new(Format::Gnu, "x", b'0'), b"x").finish(), is_escape);
}

#[test]
fn non_directory_entries_naming_the_root_are_escapes() {
    for name in [&b"./"[..], b".", b"", b"./.", b".//"] {
        hostile(|_| Tar::new().file(name, "pwned").finish(), is_escape);
        hostile(|_| Tar::new().symlink(name, "../canary").finish(), is_escape);
        hostile(|_| Tar::new().fifo(name).finish(), is_escape);
        hostile(|_| Tar::new().file("f", "x").hardlink(name, "f").finish(), is_escape);
    }
}

// ---------------------------------------------------------------------------------------
// Symlinks: created, never followed
// ---------------------------------------------------------------------------------------

#[test]
fn relative_symlink_parent_is_an_escape() {
    hostile(|_| Tar::new().symlink("l", "../canary").file("l/pwned", "pwned").finish(), is_escape);
    // Overwriting an existing outside file through the link.
    hostile(|_| Tar::new().symlink("l", "../canary").file("l/f", "pwned").finish(), is_escape);
}

#[test]
fn absolute_symlink_parent_is_an_escape() {
    hostile(|sb| Tar::new().symlink("l", canary_abs(sb)).file("l/x", "pwned").finish(), is_escape);
    hostile(|sb| Tar::new().symlink("l", canary_abs(sb)).file("l/sub/h", "pwned").finish(), is_escape);
}

#[test]
fn symlink_chain_parent_is_an_escape() {
    hostile(|_| Tar::new().symlink("a", "b").symlink("b", "../canary").file("a/x", "pwned").finish(), is_escape);
    // Chain through a real directory.
    hostile(
        |_| Tar::new().dir("d").symlink("d/a", "../b").symlink("b", "../canary").file("d/a/x", "pwned").finish(),
        is_escape,
    );
}

#[test]
fn symlink_parent_pointing_inside_dest_is_refused_too() {
    hostile(|_| Tar::new().dir("d").symlink("l", "d").file("l/x", "x").finish(), is_escape);
    hostile(|_| Tar::new().symlink("l", ".").file("l/x", "x").finish(), is_escape);
    // A self-loop.
    hostile(|_| Tar::new().symlink("a", "a").file("a/x", "x").finish(), is_escape);
}

#[test]
fn directory_replaced_by_symlink_is_not_written_through() {
    hostile(|_| Tar::new().dir("d").symlink("d", "../canary").file("d/x", "pwned").finish(), is_escape);
    // The cached descriptor of a nested directory must go too.
    hostile(
        |_| {
            Tar::new()
                .dir("d")
                .dir("d/sub")
                .file("d/sub/a", "a")
                .symlink("d", "../canary")
                .file("d/sub/x", "x")
                .finish()
        },
        is_escape,
    );
    // An implicitly created parent, then replaced.
    hostile(|_| Tar::new().file("d/a", "a").symlink("d", "../canary").file("d/f", "pwned").finish(), is_escape);
}

#[test]
fn every_entry_kind_under_a_symlinked_parent_is_an_escape() {
    let build = |last: &dyn Fn(&mut Tar)| {
        let mut t = Tar::new();
        t.file("f", "inside").symlink("l", "../canary");
        last(&mut t);
        t.finish()
    };
    let cases: Vec<Vec<u8>> = vec![
        build(&|t: &mut Tar| {
            t.dir("l/newdir");
        }),
        build(&|t: &mut Tar| {
            t.symlink("l/s", "x");
        }),
        build(&|t: &mut Tar| {
            t.fifo("l/p");
        }),
        build(&|t: &mut Tar| {
            t.hardlink("l/h", "f");
        }),
        build(&|t: &mut Tar| {
            t.gnu_long(b'L', b"l/long").header(&Hdr::new(Format::Gnu, "x", b'0'));
        }),
        build(&|t: &mut Tar| {
            t.file("l/sub/deeper/x", "pwned");
        }),
    ];
    for a in cases {
        hostile(|_| a.clone(), is_escape);
    }
}

#[test]
fn outside_symlinks_are_created_not_followed() {
    benign(
        |sb| {
            Tar::new()
                .symlink("etc-passwd", "/etc/passwd")
                .symlink("rel", "../../canary/f")
                .symlink("abs", canary_abs_join(sb, "f"))
                .symlink("dir", "../canary")
                .gnu_long(b'K', &[&b"../"[..]; 60].concat())
                .header(&Hdr::new(Format::Gnu, "long", b'2'))
                .finish()
        },
        |run, stats| {
            let d = &run.sb.dest;
            assert!(is_symlink_to(&d.join("etc-passwd"), "/etc/passwd"), "[{}]", run.label);
            assert!(is_symlink_to(&d.join("rel"), "../../canary/f"), "[{}]", run.label);
            assert!(is_symlink_to(&d.join("abs"), run.sb.canary.join("f")), "[{}]", run.label);
            assert!(is_symlink_to(&d.join("dir"), "../canary"), "[{}]", run.label);
            assert!(is_symlink_to(&d.join("long"), "../".repeat(60)), "[{}]", run.label);
            assert_eq!(stats.symlinks, 5, "[{}]", run.label);
        },
    );
}

#[test]
fn file_replacing_a_symlink_does_not_write_through_it() {
    benign(
        |sb| {
            Tar::new()
                .symlink("l", "../canary/f")
                .file("l", "new content\n")
                .symlink("a", canary_abs_join(sb, "g"))
                .file("a", "abs new\n")
                .finish()
        },
        |run, _| {
            for (name, content) in [("l", "new content\n"), ("a", "abs new\n")] {
                let p = run.sb.dest.join(name);
                assert!(fs::symlink_metadata(&p).unwrap().is_file(), "[{}] {name} is not a regular file", run.label);
                assert_eq!(fs::read_to_string(&p).unwrap(), content, "[{}]", run.label);
            }
        },
    );
}

#[test]
fn fifo_and_directory_replacing_a_symlink_do_not_follow_it() {
    benign(
        |_| {
            Tar::new()
                .symlink("p", "../canary/f")
                .fifo("p")
                .symlink("d", "../canary")
                .dir("d")
                .file("d/x", "x")
                .finish()
        },
        |run, _| {
            let d = &run.sb.dest;
            assert!(fs::symlink_metadata(d.join("p")).unwrap().file_type().is_fifo(), "[{}]", run.label);
            assert!(fs::symlink_metadata(d.join("d")).unwrap().is_dir(), "[{}]", run.label);
            assert_eq!(fs::read_to_string(d.join("d/x")).unwrap(), "x", "[{}]", run.label);
        },
    );
}

#[test]
fn hardlink_replacing_a_symlink_does_not_follow_it() {
    benign(
        |_| Tar::new().symlink("l", "../canary/f").file("a", "inside\n").hardlink("l", "a").finish(),
        |run, _| {
            let d = &run.sb.dest;
            let (l, a) = (fs::symlink_metadata(d.join("l")).unwrap(), fs::metadata(d.join("a")).unwrap());
            assert!(l.is_file(), "[{}]", run.label);
            assert_eq!(l.ino(), a.ino(), "[{}]", run.label);
        },
    );
}

#[test]
fn file_over_a_hardlink_does_not_write_through_it() {
    benign(
        |_| Tar::new().file("f", "original\n").hardlink("h", "f").file("h", "replacement\n").finish(),
        |run, _| {
            let d = &run.sb.dest;
            assert_eq!(fs::read_to_string(d.join("f")).unwrap(), "original\n", "[{}]", run.label);
            assert_eq!(fs::read_to_string(d.join("h")).unwrap(), "replacement\n", "[{}]", run.label);
            assert_eq!(fs::metadata(d.join("f")).unwrap().nlink(), 1, "[{}]", run.label);
        },
    );
}

// ---------------------------------------------------------------------------------------
// Hardlinks
// ---------------------------------------------------------------------------------------

#[test]
fn hardlink_targets_outside_are_escapes() {
    for target in [&b"../canary/f"[..], b"/etc/passwd", b"a/../../canary/f", b"//etc/passwd", b"..", b"x/.."] {
        hostile(|_| Tar::new().hardlink("h", target).finish(), is_escape);
    }
    hostile(|sb| Tar::new().hardlink("h", canary_abs_join(sb, "f")).finish(), is_escape);
}

#[test]
fn hardlink_target_through_a_symlinked_parent_is_an_escape() {
    hostile(|_| Tar::new().symlink("l", "../canary").hardlink("h", "l/f").finish(), is_escape);
    hostile(|sb| Tar::new().symlink("l", canary_abs(sb)).hardlink("h", "l/sub/h").finish(), is_escape);
    // Even when the symlink points inside.
    hostile(|_| Tar::new().file("d/f", "x").symlink("l", "d").hardlink("h", "l/f").finish(), is_escape);
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink_itself() {
    benign(
        |_| Tar::new().symlink("s", "../canary/f").hardlink("h", "s").finish(),
        |run, stats| {
            let d = &run.sb.dest;
            assert!(is_symlink_to(&d.join("h"), "../canary/f"), "[{}]", run.label);
            let (s, h) = (fs::symlink_metadata(d.join("s")).unwrap(), fs::symlink_metadata(d.join("h")).unwrap());
            assert_eq!(s.ino(), h.ino(), "[{}]", run.label);
            assert_eq!(h.nlink(), 2, "[{}]", run.label);
            assert_eq!(stats.hardlinks, 1, "[{}]", run.label);
        },
    );
}

#[test]
fn hardlink_to_a_missing_target_is_enoent() {
    hostile(|_| Tar::new().hardlink("h", "missing").finish(), |e| is_errno(e, libc::ENOENT));
    hostile(|_| Tar::new().hardlink("h", "nodir/missing").finish(), |e| is_errno(e, libc::ENOENT));
    hostile(|_| Tar::new().dir("d").hardlink("h", "d/missing").finish(), |e| is_errno(e, libc::ENOENT));
}

#[test]
fn hardlink_to_a_directory_is_refused_by_the_kernel() {
    hostile(|_| Tar::new().dir("d").hardlink("h", "d").finish(), |e| is_errno(e, libc::EPERM));
}

#[test]
fn pax_linkpath_escapes_are_checked() {
    for bad in [&b"../canary/f"[..], b"/etc/passwd", b"ok\0../../canary/f", b"a/../../canary/f"] {
        hostile(
            |_| {
                Tar::new().file("ok", "x").pax(&[(b"linkpath", bad)]).header(&Hdr::ustar("h", b'1').link("ok")).finish()
            },
            is_escape,
        );
    }
}

#[test]
fn gnu_long_link_escapes_are_checked() {
    let long = [&b"../"[..]; 40].concat().into_iter().chain(*b"canary/f").collect::<Vec<_>>();
    for bad in [&b"../../canary/f"[..], b"/etc/shadow", &long] {
        hostile(
            |_| {
                Tar::new()
                    .file("ok", "x")
                    .gnu_long(b'K', bad)
                    .header(&Hdr::new(Format::Gnu, "h", b'1').link("ok"))
                    .finish()
            },
            is_escape,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Whiteouts
// ---------------------------------------------------------------------------------------

#[test]
fn invalid_whiteout_names_are_escapes() {
    for name in [&b".wh.."[..], b".wh.", b".wh...", b"a/.wh..", b"a/b/.wh.", b"./.wh.."] {
        hostile(|_| Tar::new().file(name, "").finish(), is_escape);
        hostile(|_| Tar::new().dir("a/b").file(name, "").finish(), is_escape);
    }
}

#[test]
fn whiteouts_with_dotdot_or_absolute_paths_are_escapes() {
    for name in
        [&b"../.wh.x"[..], b"../canary/.wh.f", b"a/../../canary/.wh.f", b"/.wh.x", b"../.wh..wh..opq", b"/.wh..wh..opq"]
    {
        hostile(|_| Tar::new().file(name, "").finish(), is_escape);
    }
    hostile(|sb| Tar::new().file(canary_abs_join(sb, ".wh.f"), "").finish(), is_escape);
    hostile(|sb| Tar::new().file(canary_abs_join(sb, ".wh..wh..opq"), "").finish(), is_escape);
}

// Whiteouts below a symlink hide nothing (nothing exists below a non-directory, and
// umoci writes `d/.wh.x` after turning `d` into a symlink in the same layer), so they are
// dropped: never followed, nothing created or removed anywhere. The harness checks that
// the canary beside `dest` is untouched; these check `dest` itself.

/// `dest` holds exactly the symlink `l` (and `abs` when `both`), still symlinks.
fn only_links_remain(run: &Run<'_>, both: bool) {
    let want: &[&str] = if both { &["abs", "l"] } else { &["l"] };
    assert_eq!(run.sb.dest_listing(), want, "[{}]", run.label);
    for name in want {
        let md = fs::symlink_metadata(run.sb.dest.join(name)).unwrap();
        assert!(md.file_type().is_symlink(), "[{}] {name} is no longer a symlink", run.label);
    }
}

#[test]
fn whiteout_through_a_symlinked_parent_is_dropped_not_followed() {
    for name in ["l/.wh.f", "l/.wh.sub", "l/sub/.wh.h"] {
        benign(
            |_| Tar::new().symlink("l", "../canary").file(name, "").finish(),
            |run, _| only_links_remain(run, false),
        );
    }
    benign(
        |sb| Tar::new().symlink("l", canary_abs(sb)).file("l/.wh.g", "").finish(),
        |run, _| only_links_remain(run, false),
    );
}

#[test]
fn opaque_through_a_symlinked_parent_does_not_empty_the_canary() {
    for name in ["l/.wh..wh..opq", "l/sub/.wh..wh..opq"] {
        benign(
            |_| Tar::new().symlink("l", "../canary").file(name, "").finish(),
            |run, _| only_links_remain(run, false),
        );
    }
    benign(
        |sb| Tar::new().symlink("l", canary_abs(sb)).file("l/.wh..wh..opq", "").finish(),
        |run, _| only_links_remain(run, false),
    );
}

#[test]
fn whiteouts_through_a_preexisting_symlink_in_dest_are_dropped() {
    // Apply mode flattens onto a tree that earlier layers may have filled with symlinks.
    let prepare = |sb: &Sandbox| {
        std::os::unix::fs::symlink("../canary", sb.dest.join("l")).unwrap();
        std::os::unix::fs::symlink(&sb.canary, sb.dest.join("abs")).unwrap();
    };
    for name in [&b"l/.wh.f"[..], b"l/.wh..wh..opq", b"abs/.wh.g", b"abs/.wh..wh..opq", b"abs/sub/.wh..wh..opq"] {
        benign_with(prepare, |_| Tar::new().file(name, "").finish(), |run, _| only_links_remain(run, true));
    }
}

#[test]
fn whiteout_of_a_symlink_removes_only_the_link() {
    benign_with(
        |sb| {
            std::os::unix::fs::symlink("../canary", sb.dest.join("l")).unwrap();
            fs::create_dir(sb.dest.join("d")).unwrap();
            std::os::unix::fs::symlink("../../canary", sb.dest.join("d/inner")).unwrap();
            std::os::unix::fs::symlink(&sb.canary, sb.dest.join("d/abs")).unwrap();
        },
        |_| Tar::new().file(".wh.l", "").file("d/.wh.inner", "").file(".wh.d", "").file(".wh.canary", "").finish(),
        |run, stats| {
            assert_eq!(stats.whiteouts, 4, "[{}]", run.label);
            if run.mode == WhiteoutMode::Apply {
                assert_eq!(run.sb.dest_listing(), Vec::<String>::new(), "[{}]", run.label);
            }
        },
    );
}

#[test]
fn opaque_at_the_root_empties_only_dest() {
    // Unprivileged, the Overlay-mode marker goes to `user.overlay.opaque`.
    let userxattr = !nix::unistd::geteuid().is_root();
    run_all(
        |o| o.userxattr = userxattr,
        |sb| {
            fs::write(sb.dest.join("old"), "old").unwrap();
            fs::create_dir_all(sb.dest.join("olddir/deeper")).unwrap();
            fs::write(sb.dest.join("olddir/deeper/x"), "x").unwrap();
            std::os::unix::fs::symlink("../canary", sb.dest.join("link")).unwrap();
            std::os::unix::fs::symlink(&sb.canary, sb.dest.join("olddir/abs")).unwrap();
        },
        |_| Tar::new().file("new", "new").file(".wh..wh..opq", "").file("./.wh..wh..opq", "").finish(),
        |run, r| {
            assert!(r.is_ok(), "[{}] {r:?}", run.label);
            match run.mode {
                WhiteoutMode::Apply => assert_eq!(run.sb.dest_listing(), ["new"], "[{}]", run.label),
                _ => {
                    let name = if userxattr { "user.overlay.opaque" } else { "trusted.overlay.opaque" };
                    assert_eq!(lgetxattr(&run.sb.dest, name).as_deref(), Some(&b"y"[..]), "[{}]", run.label);
                    assert_eq!(run.sb.dest_listing(), ["link", "new", "old", "olddir"], "[{}]", run.label);
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------
// Metadata bounds
// ---------------------------------------------------------------------------------------

/// A metadata header claiming `size` bytes but carrying only a few.
fn lying_meta_header(typeflag: u8, size: u64) -> Vec<u8> {
    let format = if matches!(typeflag, b'L' | b'K') { Format::Gnu } else { Format::Ustar };
    let mut t = Tar::new();
    t.header(&Hdr::new(format, "././@LongLink", typeflag).size(size)).raw(b"20 path=aaaaaaaaaaa\n");
    t.unterminated()
}

#[test]
fn oversized_pax_headers_hit_the_limit_without_allocating() {
    for size in [8 * GIB, (1 << 33) - 1, MIB + 1, u64::MAX >> 1, u64::MAX] {
        hostile(|_| lying_meta_header(b'x', size), is_limit);
        hostile(|_| lying_meta_header(b'g', size), is_limit);
    }
}

#[test]
fn oversized_gnu_long_names_hit_the_limit_without_allocating() {
    for size in [8 * GIB, 2 * MIB, u64::MAX] {
        hostile(|_| lying_meta_header(b'L', size), is_limit);
        hostile(|_| lying_meta_header(b'K', size), is_limit);
    }
}

#[test]
fn configured_small_header_limit_is_enforced() {
    let small = |o: &mut UnpackOptions| o.max_header_bytes = 256;
    let long_value = vec![b'a'; 300];
    hostile_with(small, |_| {}, |_| Tar::new().pax(&[(b"comment", &long_value)]).file("f", "x").finish(), is_limit);
    hostile_with(small, |_| {}, |_| Tar::new().gnu_long(b'L', &long_value).file("f", "x").finish(), is_limit);
    hostile_with(small, |_| {}, |_| Tar::new().gnu_long(b'K', &long_value).symlink("s", "x").finish(), is_limit);
    hostile_with(small, |_| {}, |_| lying_meta_header(b'x', 8 * GIB), is_limit);
    // Under the limit: fine.
    run_all(
        small,
        |_| {},
        |_| Tar::new().pax(&[(b"comment", &[b'a'; 200])]).file("f", "x").finish(),
        |run, r| assert!(r.is_ok(), "[{}] {r:?}", run.label),
    );
}

#[test]
fn chained_pax_headers_are_limited_in_total() {
    // Default limit (1 MiB): three headers of 400 KiB each, each under the limit.
    let big = vec![b'c'; 400 * KIB as usize];
    hostile(
        |_| {
            let mut t = Tar::new();
            for _ in 0..3 {
                t.pax(&[(b"comment", &big)]);
            }
            t.file("f", "x").finish()
        },
        is_limit,
    );
    // A mix of kinds against a small limit.
    hostile_with(
        |o| o.max_header_bytes = 1000,
        |_| {},
        |_| {
            let mut t = Tar::new();
            for i in 0..10 {
                match i % 3 {
                    0 => t.pax(&[(b"comment", &[b'c'; 100])]),
                    1 => t.gnu_long(b'L', &[b'n'; 100]),
                    _ => t.gnu_long(b'K', &[b'k'; 100]),
                };
            }
            t.file("f", "x").finish()
        },
        is_limit,
    );
}

#[test]
fn chained_header_sizes_cannot_overflow_the_total() {
    // The second claimed size would wrap a naive running total.
    for second in [u64::MAX, u64::MAX - 50, u64::MAX - 511] {
        hostile(
            |_| {
                let mut t = Tar::new();
                t.pax(&[(b"comment", b"x")]);
                t.header(&Hdr::ustar("PaxHeaders/y", b'x').size(second)).raw(&[b'a'; 100]);
                t.unterminated()
            },
            is_limit,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Malformed archives
// ---------------------------------------------------------------------------------------

#[test]
fn bad_header_checksum_is_invalid() {
    hostile(|_| Tar::new().header(&Hdr::ustar("f", b'0').corrupt_checksum()).finish(), is_invalid);
    hostile(|_| Tar::new().file("ok", "x").header(&Hdr::ustar("f", b'0').corrupt_checksum()).finish(), is_invalid);
    // A non-octal checksum field.
    hostile(
        |_| {
            let mut b = Hdr::ustar("f", b'0').block();
            b[148..156].copy_from_slice(b"0000x0\0 ");
            Tar::new().raw(&b).raw(&[0; 1024]).unterminated()
        },
        is_invalid,
    );
    // Garbage that is not a tar at all.
    hostile(|_| vec![b'A'; 4096], is_invalid);
}

#[test]
fn bad_numeric_fields_are_invalid() {
    let fields: [(usize, usize, &[u8]); 7] = [
        (124, 12, b"00000000008\0"), // size
        (124, 12, b"0000000 1 2\0"), // size with inner space
        (100, 8, b"0000x44\0"),      // mode
        (108, 8, b"000-001\0"),      // uid
        (116, 8, b"00000 9\0"),      // gid
        (136, 12, b"1234567890z\0"), // mtime
        (124, 12, &[0xff; 12]),      // negative base-256 size
    ];
    for (off, len, value) in fields {
        hostile(|_| Tar::new().header(&Hdr::ustar("f", b'0').field(off, len, value)).finish(), is_invalid);
    }
    // devmajor of a device node.
    hostile(|_| Tar::new().header(&Hdr::ustar("c", b'3').field(329, 8, b"99999999")).finish(), is_invalid);
}

#[test]
fn ids_out_of_range_are_invalid() {
    let over = (u64::from(u32::MAX) + 1).to_string();
    let huge = b"99999999999999999999999";
    for (key, value) in [(&b"uid"[..], over.as_bytes()), (b"gid", over.as_bytes()), (b"uid", &huge[..])] {
        hostile(|_| Tar::new().pax(&[(key, value)]).file("f", "x").finish(), is_invalid);
        hostile(|_| Tar::new().pax(&[(key, value)]).dir("d").finish(), is_invalid);
        hostile(|_| Tar::new().pax(&[(key, value)]).symlink("s", "t").finish(), is_invalid);
        hostile(|_| Tar::new().pax(&[(key, value)]).fifo("p").finish(), is_invalid);
    }
    // Base-256 uid over u32::MAX in the header itself.
    hostile(|_| Tar::new().header(&Hdr::ustar("f", b'0').base256(108, 8, 1 << 40)).finish(), is_invalid);
}

#[test]
fn truncated_inside_a_header_is_invalid() {
    let full = Tar::new().file("a", "aaaa").file("b", "bbbb").finish();
    for cut in [7, 300, BLOCK * 2 + 100, BLOCK * 2 + 511] {
        hostile(|_| full[..cut].to_vec(), is_invalid);
    }
    // The stream ends right after an extended header.
    hostile(|_| Tar::new().file("a", "a").pax(&[(b"path", b"b")]).unterminated(), is_invalid);
    hostile(|_| Tar::new().gnu_long(b'L', b"long").unterminated(), is_invalid);
}

#[test]
fn truncated_inside_data_is_invalid() {
    let data = vec![b'd'; 3000];
    let full = Tar::new().file("big", &data).finish();
    for cut in [BLOCK + 1, BLOCK + 1500, BLOCK + 2999, BLOCK + 3000, BLOCK + 3071] {
        hostile(|_| full[..cut].to_vec(), is_invalid);
    }
    // Inside PAX data, inside a long name.
    let pax = Tar::new().pax(&[(b"path", &[b'p'; 400])]).file("x", "x").finish();
    hostile(|_| pax[..BLOCK + 200].to_vec(), is_invalid);
    let long = Tar::new().gnu_long(b'L', &[b'n'; 400]).file("x", "x").finish();
    hostile(|_| long[..BLOCK + 200].to_vec(), is_invalid);
    // A huge PAX size on a file whose data is missing: no huge allocation, no huge file.
    hostile(|_| Tar::new().pax(&[(b"size", b"1099511627776")]).file("f", "just a little").finish(), is_invalid);
}

#[test]
fn truncated_compressed_blobs_are_errors() {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let tar = Tar::new().file("a", &data).file("b", &data).finish();
    for blob in [gzip(&tar), zstd(&tar)] {
        for cut in [blob.len() / 2, blob.len() - 4, 20] {
            hostile(|_| blob[..cut].to_vec(), |e| matches!(e, Error::Read { .. } | Error::InvalidArchive { .. }));
        }
    }
}

#[test]
fn huge_sizes_on_entries_without_data_do_not_overflow() {
    // PAX size on a directory: its "data" is skipped, which must not wrap.
    for size in [&b"18446744073709551615"[..], b"18446744073709551000", b"1099511627776"] {
        hostile(|_| Tar::new().pax(&[(b"size", size)]).dir("d").unterminated(), is_invalid);
        hostile(|_| Tar::new().pax(&[(b"size", size)]).symlink("s", "t").unterminated(), is_invalid);
    }
    // A GNU volume label claiming the largest size.
    for size in [u64::MAX, u64::MAX - 100, 8 * GIB] {
        hostile(
            |_| Tar::new().header(&Hdr::new(Format::Gnu, "label", b'V').size(size)).file("f", "x").finish(),
            is_invalid,
        );
    }
}

#[test]
fn sparse_maps_that_overflow_are_invalid() {
    // Old GNU sparse: two segments of 2^63 bytes each, claimed real size u64::MAX.
    hostile(
        |_| {
            let h = Hdr::new(Format::Gnu, "sparse", b'S')
                .size(0)
                .base256(386, 12, 0)
                .base256(398, 12, 1 << 63)
                .base256(410, 12, 0)
                .base256(422, 12, 1 << 63)
                .base256(483, 12, u128::from(u64::MAX));
            Tar::new().header(&h).finish()
        },
        is_invalid,
    );
    // PAX sparse 1.0, same map.
    hostile(
        |_| {
            let map = b"2\n0\n9223372036854775808\n0\n9223372036854775808\n";
            Tar::new()
                .pax(&[
                    (b"GNU.sparse.major", b"1"),
                    (b"GNU.sparse.minor", b"0"),
                    (b"GNU.sparse.name", b"sparse"),
                    (b"GNU.sparse.realsize", b"18446744073709551615"),
                ])
                .entry(Hdr::ustar("GNUSparseFile.0/sparse", b'0'), &{
                    let mut m = map.to_vec();
                    m.resize(BLOCK, 0);
                    m
                })
                .finish()
        },
        is_invalid,
    );
}

// ---------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------

#[test]
fn wrong_blob_digest_is_a_mismatch() {
    let wrong = Digest::of(b"some other layer");
    let tar = Tar::new().file("f", "content").finish();
    for blob in [tar.clone(), gzip(&tar), zstd(&tar)] {
        run_all(
            |o| o.expected_digest = Some(wrong),
            |_| {},
            |_| blob.clone(),
            |run, r| match r {
                Err(Error::DigestMismatch { expected, found }) => {
                    assert_eq!(expected, wrong, "[{}]", run.label);
                    assert_eq!(found, Digest::of(run.blob), "[{}]", run.label);
                }
                other => panic!("[{}] expected DigestMismatch, got {other:?}", run.label),
            },
        );
    }
}

#[test]
fn wrong_diff_id_is_a_mismatch() {
    let wrong = Digest::of(b"some other diff");
    let tar = Tar::new().file("f", "content").dir("d").finish();
    for blob in [gzip(&tar), zstd(&tar), tar.clone()] {
        run_all(
            |o| o.expected_diff_id = Some(wrong),
            |_| {},
            |_| blob.clone(),
            |run, r| match r {
                Err(Error::DigestMismatch { expected, found }) => {
                    assert_eq!(expected, wrong, "[{}]", run.label);
                    assert_eq!(found, Digest::of(&tar), "[{}]", run.label);
                }
                other => panic!("[{}] expected DigestMismatch, got {other:?}", run.label),
            },
        );
    }
    // The right pair passes.
    let blob = gzip(&tar);
    run_all(
        |o| {
            o.expected_digest = Some(Digest::of(&blob));
            o.expected_diff_id = Some(Digest::of(&tar));
        },
        |_| {},
        |_| blob.clone(),
        |run, r| assert!(r.is_ok(), "[{}] {r:?}", run.label),
    );
}

// ---------------------------------------------------------------------------------------
// Bombs
// ---------------------------------------------------------------------------------------

fn bomb_case(blob: &'static [u8]) {
    assert!(blob.len() < 64 * MIB as usize, "bomb is {} bytes", blob.len());
    run_all(
        |o| o.max_uncompressed_bytes = Some(10 * MIB),
        |_| {},
        |_| blob.to_vec(),
        |run, r| {
            match r {
                Err(Error::LimitExceeded { limit, .. }) => assert_eq!(limit, 10 * MIB, "[{}]", run.label),
                other => panic!("[{}] expected LimitExceeded, got {other:?}", run.label),
            }
            let written = run.sb.dest_bytes();
            assert!(written < 20 * MIB, "[{}] dest holds {written} bytes", run.label);
        },
    );
}

#[test]
fn gzip_bomb_is_bounded() {
    bomb_case(gzip_bomb());
}

#[test]
fn zstd_bomb_is_bounded() {
    bomb_case(zstd_bomb());
}

#[test]
fn too_many_entries_hit_the_limit() {
    let mut t = Tar::new();
    for i in 0..1000 {
        t.file(format!("f{i}"), "");
    }
    let tar = t.finish();
    hostile_with(|o| o.max_entries = Some(100), |_| {}, |_| tar.clone(), is_limit);
    // Metadata-only headers do not count, but the entries they describe do.
    let mut t = Tar::new();
    for i in 0..101 {
        t.pax(&[(b"comment", b"x")]).file(format!("f{i}"), "");
    }
    let tar = t.finish();
    hostile_with(|o| o.max_entries = Some(100), |_| {}, |_| tar.clone(), is_limit);
}

// ---------------------------------------------------------------------------------------
// Unsupported input
// ---------------------------------------------------------------------------------------

#[test]
fn xz_and_bzip2_are_unsupported() {
    let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0x00];
    xz.extend_from_slice(&[0x42; 600]);
    let mut bz = b"BZh91AY&SY".to_vec();
    bz.extend_from_slice(&[0x42; 600]);
    for blob in [xz, bz] {
        hostile(|_| blob.clone(), is_unsupported);
    }
}

#[test]
fn unknown_entry_types_are_unsupported() {
    for flag in [b'Z', b'M', b'N', b'D', b'9'] {
        hostile(|_| Tar::new().file("ok", "x").entry(Hdr::ustar("weird", flag), b"data").finish(), is_unsupported);
    }
}

// ---------------------------------------------------------------------------------------
// Overlay xattrs in the image
// ---------------------------------------------------------------------------------------

#[test]
fn overlay_xattrs_in_the_image_are_escaped() {
    if !require_root() {
        return;
    }
    benign(
        |_| {
            Tar::new()
                .pax(&[(b"SCHILY.xattr.trusted.overlay.opaque", b"y")])
                .dir("./")
                .pax(&[(b"SCHILY.xattr.trusted.overlay.opaque", b"y")])
                .dir("d")
                .pax(&[
                    (b"SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
                    (b"SCHILY.xattr.user.overlay.opaque", b"y"),
                ])
                .file("d/f", "x")
                .pax(&[(b"SCHILY.xattr.trusted.overlay.origin", b"\x00\xfb")])
                .symlink("s", "d")
                .pax(&[(b"SCHILY.xattr.trusted.overlay.overlay.opaque", b"y")])
                .dir("e")
                .finish()
        },
        |run, _| {
            let d = &run.sb.dest;
            let get = |p: &str, name: &str| lgetxattr(&d.join(p), name);
            let l = &run.label;
            assert_eq!(lgetxattr(d, "trusted.overlay.opaque"), None, "[{l}] dest itself");
            assert_eq!(get("d", "trusted.overlay.opaque"), None, "[{l}]");
            assert_eq!(get("d", "trusted.overlay.overlay.opaque").as_deref(), Some(&b"y"[..]), "[{l}]");
            assert_eq!(get("d/f", "trusted.overlay.redirect"), None, "[{l}]");
            assert_eq!(get("d/f", "trusted.overlay.overlay.redirect").as_deref(), Some(&b"/etc"[..]), "[{l}]");
            assert_eq!(get("d/f", "user.overlay.opaque"), None, "[{l}]");
            assert_eq!(get("d/f", "user.overlay.overlay.opaque").as_deref(), Some(&b"y"[..]), "[{l}]");
            assert_eq!(get("s", "trusted.overlay.origin"), None, "[{l}]");
            assert_eq!(get("s", "trusted.overlay.overlay.origin").as_deref(), Some(&b"\x00\xfb"[..]), "[{l}]");
            assert_eq!(get("e", "trusted.overlay.overlay.opaque"), None, "[{l}]");
            assert_eq!(get("e", "trusted.overlay.overlay.overlay.opaque").as_deref(), Some(&b"y"[..]), "[{l}]");
        },
    );
}

// ---------------------------------------------------------------------------------------
// Odd but legitimate input stays inside
// ---------------------------------------------------------------------------------------

#[test]
fn extreme_timestamps_are_applied_or_clamped() {
    benign(
        |_| {
            Tar::new()
                .pax(&[(b"mtime", b"9223372036854775807")])
                .file("max", "x")
                .pax(&[(b"mtime", b"-9223372036854775807.999999999")])
                .dir("min")
                .header(&Hdr::ustar("neg", b'2').link("t").field(136, 12, &[0xff; 12]))
                .pax(&[(b"mtime", b"1.0000000000000000000000000000000000001")])
                .fifo("frac")
                .finish()
        },
        |run, stats| assert_eq!(stats.entries, 4, "[{}]", run.label),
    );
}

#[test]
fn odd_but_legal_names_stay_inside_dest() {
    let names: [&[u8]; 8] = [b"..\\x", b"...", b".. ", b" ..", b"a/.../b", b"..a", b".wh", b"\xff\xfe"];
    benign(
        |_| {
            let mut t = Tar::new();
            for n in names {
                t.file(n, "inside");
            }
            t.finish()
        },
        |run, stats| {
            assert_eq!(stats.files, names.len() as u64, "[{}]", run.label);
            for n in names {
                let p = run.sb.dest.join(std::ffi::OsStr::from_bytes(n));
                assert_eq!(fs::read(&p).unwrap(), b"inside", "[{}] {}", run.label, p.display());
            }
        },
    );
}
