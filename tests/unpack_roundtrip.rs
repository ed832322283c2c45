//! Property test: random trees → tar (GNU / ustar+PAX headers mixed per entry, plain,
//! gzip or zstd, single or multi member) → `unpack` → the tree on disk must match the
//! model exactly: types, content, permission bits (setuid/setgid/sticky included),
//! owners (also > 65535 and > 2^21, i.e. base-256 / PAX numbers), mtimes with
//! nanoseconds (pre-1970 included) on files, dirs, symlinks and special files, xattrs
//! (exact set, binary values, overlay names escaped), symlink targets, hardlink
//! identity and link counts, device numbers; and the returned `UnpackStats`.
//!
//! Needs root (ownership, `trusted.*` xattrs, device nodes). `PROPTEST_CASES` scales
//! the number of cases (default 64).

mod support;

use std::collections::BTreeMap;
use std::io::Read;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rootfs_cache::{Compression, UnpackOptions, WhiteoutMode, unpack};
use support::{EKind, Ent, Fmt, Ty};

// ---------------------------------------------------------------------------------------
// Generated specification

#[derive(Clone, Debug)]
enum NameSpec {
    Short(String),
    /// A component of this many bytes (> 100: GNU `L` / PAX `path` / ustar prefix).
    Long(usize),
}

#[derive(Clone, Debug)]
enum TargetSpec {
    Plain(String),
    Up(usize, String),
    Abs(String),
    Long(usize),
    Literal(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum XNs {
    User,
    Trusted,
    /// `trusted.overlay.*` from the image: must be stored escaped.
    TrustedOverlay,
}

#[derive(Clone, Debug)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    nsec: u32,
    xattrs: Vec<(XNs, String, Vec<u8>)>,
}

#[derive(Clone, Debug)]
enum KindSpec {
    File {
        class: u8,
        seed: u64,
    },
    Dir,
    Symlink(TargetSpec),
    /// Hardlink to the n-th earlier regular file (modulo their count).
    Hardlink(usize),
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
}

#[derive(Clone, Debug)]
struct Op {
    parent: usize,
    name: NameSpec,
    kind: KindSpec,
    meta: Meta,
    gnu: bool,
}

#[derive(Clone, Debug)]
struct Case {
    ops: Vec<Op>,
    /// Metadata for a `./` entry (the destination root itself).
    root: Option<(Meta, bool)>,
    /// 0 none, 1 gzip, 2 zstd, 3 gzip in two members, 4 zstd in two frames.
    compression: u8,
    /// Pad the tar to a 10 KiB record as GNU tar does.
    pad_record: bool,
    pipelined: bool,
    compute_diff_id: bool,
    apply: bool,
    /// Feed the blob in reads of at most this many bytes.
    chunk: Option<usize>,
}

fn name_spec() -> impl Strategy<Value = NameSpec> {
    prop_oneof![
        6 => "[a-z0-9][a-zA-Z0-9_.=-]{0,11}".prop_map(NameSpec::Short),
        1 => (101usize..=200).prop_map(NameSpec::Long),
    ]
}

fn target_spec() -> impl Strategy<Value = TargetSpec> {
    prop_oneof![
        "[a-zA-Z0-9_.-]{1,20}".prop_map(TargetSpec::Plain),
        (1usize..6, "[a-z]{1,8}").prop_map(|(n, s)| TargetSpec::Up(n, s)),
        "[a-z/]{0,30}".prop_map(TargetSpec::Abs),
        (101usize..400).prop_map(TargetSpec::Long),
        prop::sample::select(vec!["/", ".", "..", "../..", "a//b/./c/", "/etc/../etc/passwd", " spaced name "])
            .prop_map(TargetSpec::Literal),
    ]
}

fn mode() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => prop::sample::select(vec![0o644, 0o755, 0o600, 0o000, 0o4755, 0o2755, 0o1777, 0o6711, 0o7777, 0o444, 0o555, 0o1000]),
        1 => 0u32..0o10000,
    ]
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(0u64),
        2 => 1u64..1000,
        1 => Just(65534u64),
        1 => 65536u64..2_097_151,
        1 => Just(2_097_152u64),
        1 => 2_097_153u64..2_000_000_000,
    ]
}

fn mtime() -> impl Strategy<Value = (i64, u32)> {
    let secs = prop_oneof![
        Just(0i64),
        Just(-1i64),
        -2_000_000_000i64..0,
        0i64..4_000_000_000,
        4_000_000_000i64..8_000_000_000,
    ];
    let nsec = prop_oneof![Just(0u32), 0u32..1_000_000_000];
    (secs, nsec)
}

fn xattrs() -> impl Strategy<Value = Vec<(XNs, String, Vec<u8>)>> {
    let ns = prop_oneof![3 => Just(XNs::User), 2 => Just(XNs::Trusted), 1 => Just(XNs::TrustedOverlay)];
    prop::collection::vec((ns, "[a-z0-9][a-z0-9._-]{0,15}", prop::collection::vec(any::<u8>(), 0..48)), 0..3)
}

fn meta() -> impl Strategy<Value = Meta> {
    let xa = prop_oneof![2 => Just(Vec::new()), 1 => xattrs()];
    (mode(), id(), id(), mtime(), xa).prop_map(|(mode, uid, gid, (mtime, nsec), xattrs)| Meta {
        mode,
        uid,
        gid,
        mtime,
        nsec,
        xattrs,
    })
}

fn kind_spec() -> impl Strategy<Value = KindSpec> {
    let class = prop_oneof![2 => Just(0u8), 8 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8)];
    prop_oneof![
        10 => (class, any::<u64>()).prop_map(|(class, seed)| KindSpec::File { class, seed }),
        6 => Just(KindSpec::Dir),
        3 => target_spec().prop_map(KindSpec::Symlink),
        2 => any::<usize>().prop_map(KindSpec::Hardlink),
        1 => Just(KindSpec::Fifo),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| KindSpec::Char(a, b)),
        1 => (0u32..4096, 0u32..256).prop_map(|(a, b)| KindSpec::Block(a, b)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    (any::<usize>(), name_spec(), kind_spec(), meta(), any::<bool>()).prop_map(|(parent, name, kind, meta, gnu)| Op {
        parent,
        name,
        kind,
        meta,
        gnu,
    })
}

fn case() -> impl Strategy<Value = Case> {
    let root = prop::option::weighted(0.3, (meta(), any::<bool>()));
    let chunk = prop::option::weighted(0.3, 1usize..5000);
    (
        prop::collection::vec(op(), 1..40),
        root,
        0u8..5,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        chunk,
    )
        .prop_map(|(ops, root, compression, pad_record, pipelined, compute_diff_id, apply, chunk)| Case {
            ops,
            root,
            compression,
            pad_record,
            pipelined,
            compute_diff_id,
            apply,
            chunk,
        })
}

// ---------------------------------------------------------------------------------------
// Model

/// Xattrs by name, as stored on disk.
type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// What one path must look like after extraction.
#[derive(Clone, Debug)]
struct Exp {
    ty: Ty,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: (i64, u32),
    content: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    rdev: Option<(u32, u32)>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Paths with the same inode number share one inode.
    inode: usize,
}

struct Built {
    entries: Vec<(Ent, Fmt)>,
    model: BTreeMap<Vec<u8>, Exp>,
    root: Option<Exp>,
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    special: u64,
    file_bytes: u64,
}

fn file_size(class: u8, seed: u64) -> usize {
    match class {
        0 => 0,
        1 => 1 + (seed % 2000) as usize,
        2 => 2000 + (seed % 68_000) as usize,
        _ => 300 * 1024 + (seed % (400 * 1024)) as usize,
    }
}

/// The xattrs a kind of object can carry (user.* only on files and directories, as the
/// kernel requires), deduplicated (the last value wins, as in the archive), with the
/// names the extractor stores.
fn xattrs_for(m: &Meta, user_ok: bool) -> (Vec<(String, Vec<u8>)>, Xattrs) {
    let mut written: Vec<(String, Vec<u8>)> = Vec::new();
    for (ns, name, value) in &m.xattrs {
        let full = match ns {
            XNs::User if user_ok => format!("user.{name}"),
            XNs::User | XNs::Trusted => format!("trusted.{name}"),
            XNs::TrustedOverlay => format!("trusted.overlay.{name}"),
        };
        written.retain(|(n, _)| *n != full);
        written.push((full, value.clone()));
    }
    let stored = written
        .iter()
        .map(|(n, v)| {
            let n = match n.strip_prefix("trusted.overlay.") {
                Some(rest) => format!("trusted.overlay.overlay.{rest}"),
                None => n.clone(),
            };
            (n.into_bytes(), v.clone())
        })
        .collect();
    (written, stored)
}

fn target_bytes(t: &TargetSpec) -> Vec<u8> {
    match t {
        TargetSpec::Plain(s) => s.clone().into_bytes(),
        TargetSpec::Up(n, s) => format!("{}{s}", "../".repeat(*n)).into_bytes(),
        TargetSpec::Abs(s) => format!("/{s}").into_bytes(),
        TargetSpec::Long(n) => (0..*n).map(|i| if i % 17 == 16 { b'/' } else { b'a' + (i % 26) as u8 }).collect(),
        TargetSpec::Literal(s) => s.as_bytes().to_vec(),
    }
}

fn ent_with_meta(path: Vec<u8>, kind: EKind, m: &Meta, xattrs: Vec<(String, Vec<u8>)>) -> Ent {
    let mut e = Ent::dir("x").raw_path(path).mode(m.mode).owner(m.uid, m.gid).mtime(m.mtime, m.nsec);
    e.kind = kind;
    e.xattrs = xattrs;
    e
}

fn build(case: &Case) -> Built {
    let mut b = Built {
        entries: Vec::new(),
        model: BTreeMap::new(),
        root: None,
        files: 0,
        dirs: 0,
        symlinks: 0,
        hardlinks: 0,
        special: 0,
        file_bytes: 0,
    };
    if let Some((m, gnu)) = &case.root {
        let m = Meta { xattrs: Vec::new(), ..m.clone() };
        let fmt = if *gnu { Fmt::Gnu } else { Fmt::Pax };
        let path = if *gnu { b"./".to_vec() } else { b".".to_vec() };
        b.entries.push((ent_with_meta(path, EKind::Dir, &m, Vec::new()), fmt));
        b.dirs += 1;
        b.root = Some(Exp {
            ty: Ty::Dir,
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: (m.mtime, m.nsec),
            content: None,
            link: None,
            rdev: None,
            xattrs: BTreeMap::new(),
            inode: usize::MAX,
        });
    }
    let mut dirs: Vec<Vec<u8>> = vec![Vec::new()];
    let mut files: Vec<Vec<u8>> = Vec::new();
    for (i, op) in case.ops.iter().enumerate() {
        let parent = dirs[op.parent % dirs.len()].clone();
        let mut name = match &op.name {
            NameSpec::Short(s) => format!("{s}~{i}").into_bytes(),
            NameSpec::Long(n) => {
                let mut v = format!("long{i}_").into_bytes();
                v.resize(*n, b'L');
                v
            }
        };
        if parent.len() + name.len() > 2500 {
            name = format!("n{i}").into_bytes();
        }
        let path = if parent.is_empty() {
            name
        } else {
            let mut p = parent.clone();
            p.push(b'/');
            p.extend_from_slice(&name);
            p
        };
        let fmt = if op.gnu { Fmt::Gnu } else { Fmt::Pax };
        let m = &op.meta;
        let mut exp = Exp {
            ty: Ty::File,
            mode: m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: (m.mtime, m.nsec),
            content: None,
            link: None,
            rdev: None,
            xattrs: BTreeMap::new(),
            inode: i,
        };
        let kind = match &op.kind {
            KindSpec::Hardlink(n) if !files.is_empty() => {
                let target = files[n % files.len()].clone();
                let t = b.model[&target].clone();
                // Hardlink entries carry the target's metadata, as tar writers do.
                let hm =
                    Meta { mode: t.mode, uid: t.uid, gid: t.gid, mtime: t.mtime.0, nsec: t.mtime.1, xattrs: vec![] };
                b.entries.push((ent_with_meta(path.clone(), EKind::Hardlink(target), &hm, Vec::new()), fmt));
                b.hardlinks += 1;
                b.model.insert(path, t);
                continue;
            }
            KindSpec::Hardlink(_) => {
                // No earlier file: an empty file instead.
                b.files += 1;
                exp.content = Some(Vec::new());
                files.push(path.clone());
                EKind::File(Vec::new())
            }
            KindSpec::File { class, seed } => {
                let c = support::pseudo_random(*seed, file_size(*class, *seed));
                b.file_bytes += c.len() as u64;
                exp.content = Some(c.clone());
                b.files += 1;
                files.push(path.clone());
                EKind::File(c)
            }
            KindSpec::Dir => {
                exp.ty = Ty::Dir;
                b.dirs += 1;
                dirs.push(path.clone());
                EKind::Dir
            }
            KindSpec::Symlink(t) => {
                exp.ty = Ty::Symlink;
                let t = target_bytes(t);
                exp.link = Some(t.clone());
                b.symlinks += 1;
                EKind::Symlink(t)
            }
            KindSpec::Fifo => {
                exp.ty = Ty::Fifo;
                b.special += 1;
                EKind::Fifo
            }
            KindSpec::Char(ma, mi) => {
                exp.ty = Ty::Char;
                exp.rdev = Some((*ma, *mi));
                b.special += 1;
                EKind::Char(*ma, *mi)
            }
            KindSpec::Block(ma, mi) => {
                exp.ty = Ty::Block;
                exp.rdev = Some((*ma, *mi));
                b.special += 1;
                EKind::Block(*ma, *mi)
            }
        };
        let (written, stored) = xattrs_for(m, matches!(exp.ty, Ty::File | Ty::Dir));
        exp.xattrs = stored;
        b.entries.push((ent_with_meta(path.clone(), kind, m, written), fmt));
        b.model.insert(path, exp);
    }
    b
}

/// Reads at most `n` bytes per call.
struct Chunked<'a> {
    data: &'a [u8],
    n: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.n.min(buf.len()).min(self.data.len());
        buf[..k].copy_from_slice(&self.data[..k]);
        self.data = &self.data[k..];
        Ok(k)
    }
}

fn compress(tar: &[u8], how: u8) -> (Vec<u8>, Compression) {
    let half = (tar.len() / 1024) * 512;
    match how {
        0 => (tar.to_vec(), Compression::None),
        1 => (support::gzip(tar), Compression::Gzip),
        2 => (support::zstd(tar), Compression::Zstd),
        3 => ([support::gzip(&tar[..half]), support::gzip(&tar[half..])].concat(), Compression::Gzip),
        _ => ([support::zstd(&tar[..half]), support::zstd(&tar[half..])].concat(), Compression::Zstd),
    }
}

fn check(case: &Case) -> Result<(), TestCaseError> {
    let built = build(case);
    let mut ar = tar::Builder::new(Vec::new());
    for (e, fmt) in &built.entries {
        support::append(&mut ar, e, *fmt);
    }
    let mut tar = ar.into_inner().unwrap();
    if case.pad_record {
        tar.resize(tar.len().div_ceil(10240) * 10240, 0);
    }
    let (blob, compression) = compress(&tar, case.compression);

    let dir = support::tempdir();
    let dest = dir.path();
    let mut opts = UnpackOptions::default();
    opts.pipelined = case.pipelined;
    opts.compute_diff_id = case.compute_diff_id;
    if case.apply {
        opts.whiteouts = WhiteoutMode::Apply;
    }
    let result = match case.chunk {
        Some(n) => unpack(Chunked { data: &blob, n }, dest, &opts),
        None => unpack(&blob[..], dest, &opts),
    };
    let stats = result.map_err(|e| TestCaseError::fail(format!("unpack failed: {e}")))?;

    // Stats.
    let n_entries = built.entries.len() as u64;
    prop_assert_eq!(stats.entries, n_entries, "entries");
    prop_assert_eq!(stats.files, built.files, "files");
    prop_assert_eq!(stats.dirs, built.dirs, "dirs");
    prop_assert_eq!(stats.symlinks, built.symlinks, "symlinks");
    prop_assert_eq!(stats.hardlinks, built.hardlinks, "hardlinks");
    prop_assert_eq!(stats.special, built.special, "special");
    prop_assert_eq!(stats.whiteouts, 0, "whiteouts");
    prop_assert_eq!(stats.skipped_devices, 0, "skipped_devices");
    prop_assert_eq!(stats.skipped_xattrs, 0, "skipped_xattrs");
    prop_assert_eq!(stats.file_bytes, built.file_bytes, "file_bytes");
    prop_assert_eq!(stats.compressed_bytes, blob.len() as u64, "compressed_bytes");
    prop_assert_eq!(stats.uncompressed_bytes, tar.len() as u64, "uncompressed_bytes");
    prop_assert_eq!(stats.compression, compression, "compression");
    prop_assert_eq!(stats.digest.to_string(), support::sha256_digest(&blob), "digest");
    let tar_digest = support::sha256_digest(&tar);
    match &stats.diff_id {
        Some(d) => prop_assert_eq!(d.to_string(), tar_digest, "diff_id"),
        None => prop_assert!(
            !case.compute_diff_id && compression != Compression::None,
            "diff_id missing although computed (compute_diff_id or plain tar)"
        ),
    }

    // Tree.
    let snap = support::snapshot(dest);
    let mut diffs: Vec<String> = Vec::new();
    for p in snap.keys().filter(|p| !built.model.contains_key(*p)) {
        diffs.push(format!("unexpected path {}", support::show(p)));
    }
    let mut inodes: BTreeMap<usize, (u64, Vec<Vec<u8>>)> = BTreeMap::new();
    for (p, e) in &built.model {
        let Some(n) = snap.get(p) else {
            diffs.push(format!("missing path {}", support::show(p)));
            continue;
        };
        diffs.extend(compare(&support::show(p), e, n));
        let slot = inodes.entry(e.inode).or_insert((n.ino, Vec::new()));
        if slot.0 != n.ino {
            diffs.push(format!("{}: not the same inode as {}", support::show(p), support::show(&slot.1[0])));
        }
        slot.1.push(p.clone());
    }
    for (ino, paths) in inodes.values() {
        let nlink = snap[&paths[0]].nlink;
        if snap[&paths[0]].ty != Ty::Dir && nlink != paths.len() as u64 {
            diffs.push(format!("{}: nlink {nlink}, expected {} (inode {ino})", support::show(&paths[0]), paths.len()));
        }
    }
    if let Some(r) = &built.root {
        diffs.extend(compare(".", r, &support::node(dest)));
    }
    if !diffs.is_empty() {
        let shown: Vec<String> = diffs.into_iter().take(40).collect();
        return Err(TestCaseError::fail(format!("tree differs from the model:\n  {}", shown.join("\n  "))));
    }
    Ok(())
}

fn compare(p: &str, e: &Exp, n: &support::Node) -> Vec<String> {
    let mut d = Vec::new();
    if e.ty != n.ty {
        d.push(format!("{p}: type {:?}, expected {:?}", n.ty, e.ty));
        return d;
    }
    if let Some(c) = &e.content {
        if n.size != c.len() as u64 || n.sha.as_deref() != Some(&support::sha256_hex(c)[..]) {
            d.push(format!("{p}: content differs (size {} vs {})", n.size, c.len()));
        }
    }
    if e.ty != Ty::Symlink && n.mode != e.mode & 0o7777 {
        d.push(format!("{p}: mode {:o}, expected {:o}", n.mode, e.mode));
    }
    if (u64::from(n.uid), u64::from(n.gid)) != (e.uid, e.gid) {
        d.push(format!("{p}: owner {}:{}, expected {}:{}", n.uid, n.gid, e.uid, e.gid));
    }
    if n.mtime != (e.mtime.0, i64::from(e.mtime.1)) {
        d.push(format!("{p}: mtime {}.{:09}, expected {}.{:09}", n.mtime.0, n.mtime.1, e.mtime.0, e.mtime.1));
    }
    if n.link != e.link {
        d.push(format!(
            "{p}: link {:?}, expected {:?}",
            n.link.as_deref().map(support::show),
            e.link.as_deref().map(support::show)
        ));
    }
    if n.rdev != e.rdev {
        d.push(format!("{p}: rdev {:?}, expected {:?}", n.rdev, e.rdev));
    }
    if n.xattrs != e.xattrs {
        let f = |m: &BTreeMap<Vec<u8>, Vec<u8>>| m.keys().map(|k| support::show(k)).collect::<Vec<_>>();
        d.push(format!(
            "{p}: xattrs {:?} ({:?}), expected {:?} ({:?})",
            f(&n.xattrs),
            n.xattrs,
            f(&e.xattrs),
            e.xattrs
        ));
    }
    d
}

#[test]
fn random_trees_round_trip() {
    if !support::require_root("random_trees_round_trip") {
        return;
    }
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&case(), |c| check(&c));
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// One fixed case with every feature at once, so a failure of the basics shows up
/// with a readable input even before proptest shrinks anything.
#[test]
fn fixed_tree_round_trip() {
    if !support::require_root("fixed_tree_round_trip") {
        return;
    }
    let m = |mode, uid, gid, mtime, nsec, xattrs| Meta { mode, uid, gid, mtime, nsec, xattrs };
    let op = |parent, name: &str, kind, meta, gnu| Op { parent, name: NameSpec::Short(name.into()), kind, meta, gnu };
    let x = |ns, n: &str, v: &[u8]| (ns, n.to_string(), v.to_vec());
    let ops = vec![
        op(
            0,
            "d",
            KindSpec::Dir,
            m(0o2755, 70000, 3_000_000, -5, 999_999_999, vec![x(XNs::User, "d", b"\0\xff")]),
            true,
        ),
        op(1, "big", KindSpec::File { class: 3, seed: 7 }, m(0o4755, 1000, 1000, 1_700_000_000, 123, vec![]), false),
        op(
            1,
            "s",
            KindSpec::Symlink(TargetSpec::Up(3, "etc".into())),
            m(0o777, 5, 6, -86400, 5, vec![x(XNs::Trusted, "t", b"v")]),
            true,
        ),
        op(0, "h", KindSpec::Hardlink(0), m(0o644, 0, 0, 0, 0, vec![]), false),
        op(0, "p", KindSpec::Fifo, m(0o1640, 7, 8, 12345, 1, vec![x(XNs::TrustedOverlay, "opaque", b"y")]), true),
        op(0, "c", KindSpec::Char(1, 3), m(0o666, 0, 5, 1, 2, vec![]), false),
        op(
            1,
            "ro",
            KindSpec::Dir,
            m(0o000, 1, 1, 99, 9, vec![x(XNs::User, "a", b""), x(XNs::Trusted, "b", b"bin\0")]),
            false,
        ),
        op(
            2,
            "inside",
            KindSpec::File { class: 1, seed: 3 },
            m(0o6711, 2_097_152, 2_097_153, 4_000_000_001, 0, vec![]),
            true,
        ),
        Op {
            parent: 2,
            name: NameSpec::Long(180),
            kind: KindSpec::Dir,
            meta: m(0o1777, 0, 0, 10, 0, vec![]),
            gnu: false,
        },
        Op {
            parent: 3,
            name: NameSpec::Long(150),
            kind: KindSpec::Symlink(TargetSpec::Long(300)),
            meta: m(0o777, 0, 0, 10, 0, vec![]),
            gnu: true,
        },
        Op {
            parent: 3,
            name: NameSpec::Long(120),
            kind: KindSpec::Hardlink(1),
            meta: m(0o644, 0, 0, 10, 0, vec![]),
            gnu: false,
        },
    ];
    for compression in 0..5 {
        for pipelined in [false, true] {
            let case = Case {
                ops: ops.clone(),
                root: Some((m(0o751, 33, 44, 1_234_567_890, 42, vec![]), compression % 2 == 0)),
                compression,
                pad_record: pipelined,
                pipelined,
                compute_diff_id: compression != 2,
                apply: compression == 4,
                chunk: (compression == 3).then_some(333),
            };
            if let Err(e) = check(&case) {
                panic!("compression {compression} pipelined {pipelined}: {e}");
            }
        }
    }
}
