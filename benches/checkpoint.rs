//! Checkpoint and restore of a large diff on XFS with reflinks: the aligned fast path
//! (`Workspace::checkpoint` + `Workspace::restore`) against a plain export and import
//! (`export_diff` into a `BufWriter<File>`, `import_diff` from a `BufReader<File>`) of the
//! same upper, in one run.
//!
//! Set-up (untimed): a sparse image file of 3.5 x the data + 2 GiB (room for the upper,
//! the plain tar and the plain import side by side) in a temp dir under `/tmp`
//! (`CHECKPOINT_BENCH_DIR=dir` for another place), `mkfs.xfs -q -f -m reflink=1`, mounted
//! with `mount -o loop` (util-linux sets up the loop device with autoclear: unmounting
//! releases it). On it: a lower with a few small files; a `Workspace` over it, mounted
//! with `KernelOverlay`; `FILES` (default 50) files of `SIZE_MB` (default 100) MiB of
//! distinct pseudo-random data written through the merged view under `/data`; then the
//! workspace is unmounted and the filesystem synced.
//!
//! Timed: `RUNS` (default 3) rounds, each running both paths, plain first in odd rounds
//! and aligned first in even ones:
//! - plain export: `File::create(plain.tar)`, `export_diff(BufWriter::new(file),
//!   &DiffOptions::default())` (read/write, sha256-hashed), `fsync` of the tar;
//! - plain import: `Workspace::create(imp-plain, lower, ..)`,
//!   `import_diff(BufReader::new(File::open(plain.tar)))` (read/write), `syncfs`;
//! - aligned export: `ws.checkpoint(ckpt.tar)` (aligned `export_diff_file`, which
//!   `copy_file_range`s file data into the tar; it fsyncs the tar and its directory);
//! - aligned import: `Workspace::restore(imp-aligned, lower, .., ckpt.tar)`
//!   (`import_diff_file`: data `copy_file_range`d out of the tar), `syncfs`.
//!
//! Before every timed phase the page cache is dropped (`sync`, then
//! `echo 3 > /proc/sys/vm/drop_caches`), so both paths read from disk. Around each phase
//! the filesystem's free space (`statvfs`: `f_bfree * f_frsize`, after a `syncfs`) gives
//! the space the phase consumed: a full copy of the data for the plain path, next to
//! nothing where XFS shares extents. Removing the tars and the imported workspaces is not
//! timed. In the first round, outside the timing, both imported uppers are compared with
//! the original: the same entries, types, sizes, modes, owners and mtimes, and the same
//! sha256 for every regular file.
//!
//! Prints every round, the medians over the rounds, the ratios plain/aligned per phase
//! and of the totals, the space each phase consumed, a one-line summary and the command
//! that reproduces the run.
//!
//! Needs root: `sudo cargo bench --bench checkpoint`. Before anything else the process
//! moves into a private mount namespace of its own (`unshare(CLONE_NEWNS)`, then `/` made
//! recursively private), so the loop mount and the overlay are never visible outside it
//! and vanish with the process. The filesystem is unmounted and the image deleted at the
//! end, also when the bench panics. Not root: the bench prints why it is skipped and exits
//! 0 (under `CI` it fails instead). Run without `--bench` (`cargo test --benches`) it only
//! says so: the full run writes tens of GB.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use rootfs_cache::{DiffOptions, DiffStats, KernelOverlay, Workspace, WorkspaceOptions};
use sha2::{Digest as _, Sha256};

/// Env var: the directory for the image file's temp dir (default `/tmp`).
const DIR_VAR: &str = "CHECKPOINT_BENCH_DIR";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A positive number from the environment, or `default`.
fn env_num(name: &str, default: u64) -> u64 {
    let n = match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    };
    assert!(n > 0, "{name} must be above 0");
    n
}

/// Runs a command, panicking with its output when it fails.
fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An XFS (`reflink=1`) filesystem in a sparse image file, loop-mounted; unmounted and
/// the image deleted on drop (panics included).
struct Xfs {
    /// Holds the image and the mount point; removed last (after `Drop::drop`).
    _dir: tempfile::TempDir,
    img: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl Xfs {
    fn new(size: u64) -> Self {
        let base = std::env::var_os(DIR_VAR).map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix("checkpoint-bench.")
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("temp dir in {}: {e}", base.display()));
        let img = dir.path().join("xfs.img");
        let mnt = dir.path().join("mnt");
        // From here on, dropping `x` deletes the image (and unmounts once mounted).
        let mut x = Xfs { _dir: dir, img, mnt, mounted: false };
        File::create(&x.img).and_then(|f| f.set_len(size)).expect("create the sparse image");
        std::fs::create_dir(&x.mnt).expect("mkdir mnt");
        run(Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]).arg(&x.img));
        run(Command::new("mount").args(["-o", "loop"]).arg(&x.img).arg(&x.mnt));
        x.mounted = true;
        x
    }

    fn path(&self) -> &Path {
        &self.mnt
    }

    /// The mount's source (the loop device) and options, from this namespace's mountinfo.
    fn describe(&self) -> String {
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        let mnt = self.mnt.to_str().expect("utf-8 mount point");
        info.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let sep = f.iter().position(|&x| x == "-")?;
                (f.get(4) == Some(&mnt)).then(|| format!("{} {} ({})", f[sep + 1], f[sep + 2], f[sep + 3]))
            })
            .next_back()
            .unwrap_or_else(|| "not in mountinfo".into())
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.mnt, MntFlags::empty()) {
                eprintln!("umount {}: {e}; detaching it instead", self.mnt.display());
                let _ = umount2(&self.mnt, MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_file(&self.img);
    }
}

fn syncfs(p: &Path) {
    let d = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    nix::unistd::syncfs(&d).expect("syncfs");
}

/// `sync`, then drop the page cache (and dentries and inodes).
fn drop_caches() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches");
}

/// Free bytes of the filesystem holding `p` (`f_bfree * f_frsize`).
fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).expect("statvfs");
    s.blocks_free() * s.fragment_size()
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Writes `size` bytes (a multiple of 8) of pseudo-random data seeded by `seed` to a new
/// file `path`, `buf.len()` bytes per `write`; returns its sha256.
fn write_random(path: &Path, size: u64, seed: u64, buf: &mut [u8]) -> [u8; 32] {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut h = Sha256::new();
    // splitmix64 of the seed: far-apart, never-zero xorshift states.
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x = (x ^ (x >> 31)) | 1;
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for w in buf[..n].chunks_exact_mut(8) {
            x = xorshift(x);
            w.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
    h.finalize().into()
}

fn sha256_file(path: &Path) -> [u8; 32] {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

/// What the comparison of two uppers looks at, per entry.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    /// `S_IFMT` bits and permissions.
    mode: u32,
    uid: u32,
    gid: u32,
    /// For files and symlinks (directory sizes are the filesystem's business).
    size: Option<u64>,
    mtime: (i64, i64),
    sha256: Option<[u8; 32]>,
}

/// Every entry under `root` (the root as ""), with the sha256 of regular files: from
/// `known` when listed there, else read.
fn tree(root: &Path, known: &HashMap<PathBuf, [u8; 32]>) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, rel: &Path, known: &HashMap<PathBuf, [u8; 32]>, out: &mut BTreeMap<PathBuf, Entry>) {
        let p = root.join(rel);
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let t = m.file_type();
        let sha256 = t.is_file().then(|| known.get(rel).copied().unwrap_or_else(|| sha256_file(&p)));
        let size = (!t.is_dir()).then_some(m.len());
        out.insert(
            rel.to_path_buf(),
            Entry { mode: m.mode(), uid: m.uid(), gid: m.gid(), size, mtime: (m.mtime(), m.mtime_nsec()), sha256 },
        );
        if t.is_dir() {
            for e in std::fs::read_dir(&p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
                walk(root, &rel.join(e.expect("readdir entry").file_name()), known, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), known, &mut out);
    out
}

/// Panics with the first difference when the imported upper differs from the original.
fn verify(what: &str, original: &BTreeMap<PathBuf, Entry>, imported: &Path) -> usize {
    let got = tree(imported, &HashMap::new());
    for (p, e) in original {
        match got.get(p) {
            Some(g) if g == e => {}
            Some(g) => {
                panic!("{what}: /{} differs from the original upper:\n  original {e:?}\n  imported {g:?}", p.display())
            }
            None => panic!("{what}: /{} is missing from the imported upper", p.display()),
        }
    }
    if let Some(p) = got.keys().find(|p| !original.contains_key(*p)) {
        panic!("{what}: /{} is in the imported upper only", p.display());
    }
    got.values().filter(|e| e.sha256.is_some()).count()
}

/// One timed phase: how long it took and the free space it consumed.
#[derive(Clone, Copy)]
struct Phase {
    time: Duration,
    /// Bytes of free space consumed (negative: freed).
    used: i64,
}

/// Drops the page cache, then times `f` and measures the free space it consumed (after
/// a `syncfs`, outside the timing).
fn phase<T>(fs: &Path, f: impl FnOnce() -> T) -> (Phase, T) {
    drop_caches();
    syncfs(fs);
    let before = free_bytes(fs);
    let t = Instant::now();
    let out = f();
    let time = t.elapsed();
    syncfs(fs);
    let used = before as i64 - free_bytes(fs) as i64;
    (Phase { time, used }, out)
}

/// The two ways to save and restore a workspace's writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// `export_diff` into a `BufWriter<File>`, `import_diff` from a `BufReader<File>`.
    Plain,
    /// `checkpoint`, `restore`.
    Aligned,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Plain => "plain",
            Way::Aligned => "aligned",
        }
    }
}

/// The fixture on the XFS filesystem.
struct Bench<'a> {
    fs: &'a Path,
    lower: &'a Path,
    ws: &'a Workspace,
    /// The original upper, for the correctness check.
    original: &'a BTreeMap<PathBuf, Entry>,
}

/// One way's round: export and import.
struct RoundResult {
    export: Phase,
    import: Phase,
    export_stats: DiffStats,
    /// `restore` returns none.
    import_stats: Option<DiffStats>,
    /// The outcome of the comparison with the original upper, when asked.
    verified: Option<String>,
}

impl Bench<'_> {
    /// Export and import one way; the tar and the imported workspace are removed
    /// afterwards (untimed). `check`: compare the import with the original (untimed).
    fn run(&self, way: Way, check: bool) -> RoundResult {
        let name = way.name();
        let tar = self.fs.join(if way == Way::Plain { "plain.tar" } else { "ckpt.tar" });
        let dir = self.fs.join(format!("imp-{name}"));
        let (export, export_stats) = match way {
            Way::Plain => phase(self.fs, || {
                let f = File::create(&tar).expect("create plain.tar");
                let mut w = BufWriter::new(f);
                let s = self.ws.export_diff(&mut w, &DiffOptions::default()).expect("export_diff");
                w.into_inner().expect("flush plain.tar").sync_all().expect("fsync plain.tar");
                s
            }),
            Way::Aligned => phase(self.fs, || self.ws.checkpoint(&tar).expect("checkpoint")),
        };
        let (import, (imp, import_stats)) = match way {
            Way::Plain => phase(self.fs, || {
                let mut imp =
                    Workspace::create(&dir, self.lower, WorkspaceOptions::default()).expect("create imp-plain");
                let input = BufReader::new(File::open(&tar).expect("open plain.tar"));
                let s = imp.import_diff(input).expect("import_diff");
                syncfs(self.fs);
                (imp, Some(s))
            }),
            Way::Aligned => phase(self.fs, || {
                let imp = Workspace::restore(&dir, self.lower, WorkspaceOptions::default(), &tar).expect("restore");
                syncfs(self.fs);
                (imp, None)
            }),
        };
        let verified = check.then(|| {
            let t = Instant::now();
            let n = verify(name, self.original, imp.upper());
            format!(
                "verified {name} import (untimed, {:.1} s): same entries, modes, owners, sizes and mtimes as the \
                 original upper, sha256 equal for all {n} files",
                t.elapsed().as_secs_f64()
            )
        });
        imp.destroy().expect("destroy the imported workspace");
        std::fs::remove_file(&tar).expect("remove the tar");
        RoundResult { export, import, export_stats, import_stats, verified }
    }
}

fn median<T: Ord + Copy + std::ops::Add<Output = T> + std::ops::Div<u32, Output = T>>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_unstable();
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2 }
}

/// Median of signed byte counts, in MiB.
fn median_mib(v: &[i64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    let m = v.len() / 2;
    let b = if v.len() % 2 == 1 { v[m] as f64 } else { (v[m - 1] + v[m]) as f64 / 2.0 };
    b / MIB as f64
}

fn mib(b: i64) -> f64 {
    b as f64 / MIB as f64
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("checkpoint bench: not a `cargo bench` run, skipped (run `sudo cargo bench --bench checkpoint`)");
        return;
    }
    if !common::require_root("checkpoint") {
        return;
    }
    let files = env_num("FILES", 50);
    let size_mb = env_num("SIZE_MB", 100);
    let runs = env_num("RUNS", 3) as usize;
    let data = files * size_mb * MIB;
    // The upper, the plain tar and the plain import side by side, plus slack.
    let image = (data * 7 / 2 + 2 * GIB).div_ceil(MIB) * MIB;
    let mut command = String::from("sudo ");
    if let Some(d) = std::env::var_os(DIR_VAR) {
        command.push_str(&format!("{DIR_VAR}={} ", d.to_string_lossy()));
    }
    command.push_str(&format!("FILES={files} SIZE_MB={size_mb} RUNS={runs} cargo bench --bench checkpoint"));

    common::private_namespace();
    let xfs = Xfs::new(image);
    let fs = xfs.path();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "checkpoint bench: {files} files x {size_mb} MiB = {} MiB of file data; Linux {}",
        files * size_mb,
        kernel.trim()
    );
    println!(
        "filesystem: mkfs.xfs -m reflink=1 on a {:.1} GiB sparse image {}, mounted: {}",
        image as f64 / GIB as f64,
        xfs.img.display(),
        xfs.describe()
    );

    // The lower: a few small files.
    let lower = fs.join("lower");
    for (p, body) in [
        ("etc/hostname", "bench\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/os-release", "ID=bench\n"),
        ("usr/bin/tool", "#!/bin/sh\necho tool\n"),
    ] {
        let p = lower.join(p);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir lower");
        std::fs::write(&p, body).expect("write lower file");
    }

    // The sandbox's writes, through the merged view.
    let mut ws = Workspace::create(fs.join("ws"), lower.as_path(), WorkspaceOptions::default()).expect("create ws");
    ws.mount(KernelOverlay::new()).expect("mount ws");
    let t = Instant::now();
    std::fs::create_dir(ws.target().join("data")).expect("mkdir /data");
    let mut buf = vec![0u8; MIB as usize];
    let mut known = HashMap::new();
    for i in 0..files {
        let rel = PathBuf::from(format!("data/f{i:03}"));
        known.insert(rel.clone(), write_random(&ws.target().join(&rel), size_mb * MIB, i, &mut buf));
    }
    ws.unmount().expect("unmount ws");
    syncfs(fs);
    println!(
        "set-up (untimed): wrote the {files} files through the overlay and synced in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let original = tree(ws.upper(), &known);

    println!(
        "timed: plain = export_diff(BufWriter<File>, DiffOptions::default()) + fsync, then Workspace::create + \
         import_diff(BufReader<File>) + syncfs"
    );
    println!(
        "       aligned = Workspace::checkpoint (aligned export_diff_file + fsync), then Workspace::restore \
         (import_diff_file) + syncfs"
    );
    println!(
        "page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed phase: both paths read \
         from disk"
    );
    println!("MiB = free space consumed by the phase (statvfs f_bfree*f_frsize before/after, after syncfs)");
    println!("{runs} rounds, each running both paths (plain first in odd rounds, aligned first in even ones):");

    let bench = Bench { fs, lower: &lower, ws: &ws, original: &original };
    let mut results: [Vec<RoundResult>; 2] = [Vec::new(), Vec::new()];
    for r in 0..runs {
        let order = if r % 2 == 0 { [Way::Plain, Way::Aligned] } else { [Way::Aligned, Way::Plain] };
        for way in order {
            let res = bench.run(way, r == 0);
            println!(
                "round {}/{runs} {:<8} export {:>9.4} s ({:>9.2} MiB)   import {:>9.4} s ({:>9.2} MiB)   total {:>9.4} s",
                r + 1,
                way.name(),
                secs(res.export.time),
                mib(res.export.used),
                secs(res.import.time),
                mib(res.import.used),
                secs(res.export.time + res.import.time)
            );
            if let Some(v) = &res.verified {
                println!("  {v}");
            }
            if r == 0 {
                let e = &res.export_stats;
                let imported = match &res.import_stats {
                    Some(s) => format!("import read {} entries, {} file bytes", s.entries, s.file_bytes),
                    None => "restore returns no stats".into(),
                };
                println!(
                    "  {} tar: {} bytes, {} entries, {} file bytes, digest {}; {imported}",
                    way.name(),
                    e.size,
                    e.entries,
                    e.file_bytes,
                    if e.digest.is_some() { "computed" } else { "none (data not read)" },
                );
            }
            results[usize::from(way == Way::Aligned)].push(res);
        }
    }
    ws.destroy().expect("destroy ws");
    let img = xfs.img.clone();
    drop(xfs);
    println!("cleaned up: workspace destroyed, XFS unmounted, {} deleted", img.display());

    // Medians per way: export, import, total (the median of each round's total), MiB.
    let stats = |v: &[RoundResult]| {
        let ex: Vec<Duration> = v.iter().map(|r| r.export.time).collect();
        let im: Vec<Duration> = v.iter().map(|r| r.import.time).collect();
        let to: Vec<Duration> = v.iter().map(|r| r.export.time + r.import.time).collect();
        let exu: Vec<i64> = v.iter().map(|r| r.export.used).collect();
        let imu: Vec<i64> = v.iter().map(|r| r.import.used).collect();
        (secs(median(&ex)), secs(median(&im)), secs(median(&to)), median_mib(&exu), median_mib(&imu))
    };
    let p = stats(&results[0]);
    let a = stats(&results[1]);
    println!("\nmedians over {runs} runs:");
    println!("{:<16}{:>12}{:>12}{:>12}{:>14}{:>14}", "", "export s", "import s", "total s", "export MiB", "import MiB");
    for (name, s) in [("plain", p), ("aligned", a)] {
        println!("{name:<16}{:>12.4}{:>12.4}{:>12.4}{:>14.2}{:>14.2}", s.0, s.1, s.2, s.3, s.4);
    }
    println!("{:<16}{:>11.1}x{:>11.1}x{:>11.1}x", "plain/aligned", p.0 / a.0, p.1 / a.1, p.2 / a.2);
    let speedup = p.2 / a.2;
    let data_mib = (files * size_mb) as f64;
    if a.3 > data_mib / 100.0 || a.4 > data_mib / 100.0 {
        println!(
            "WARNING: the aligned path consumed {:.1} + {:.1} MiB for {data_mib} MiB of data: extents not shared?",
            a.3, a.4
        );
    }
    println!(
        "bar (export + import at least 20x faster than plain): {}",
        if speedup >= 20.0 { "met" } else { "NOT met" }
    );
    println!(
        "checkpoint files={files} size_mb={size_mb} plain_total_s={:.3} aligned_total_s={:.4} speedup={speedup:.1}x",
        p.2, a.2
    );
    println!("reproduce: {command}");
}
