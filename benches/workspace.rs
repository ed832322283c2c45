//! Criterion bench: the workspace diff engine (`changes`, `export_diff`, `apply`) on a
//! small change over a Debian-sized lower, to show its cost follows the upper (the
//! sandbox's writes), not the rootfs.
//!
//! Lowers (extracted or generated once, before anything is timed):
//! - `debian`: `bench-data/rootfs.tar` (a Debian minbase rootfs, 6,768 entries, 211 MB;
//!   `WORKSPACE_BENCH_ROOTFS=path` for another tar) extracted with `rootfs_cache::unpack`
//!   (`WhiteoutMode::Apply`); when the tar is missing, a synthetic tree of ~7,000
//!   entries in ~700 directories instead;
//! - `1k`, `10k`: synthetic trees of ~1,000 and ~10,000 entries, for the size comparison.
//!
//! A change is made through the overlay mount, outside the timing: one byte written at
//! offset 0 of each changed file (content and mtime change; overlayfs copies the file and
//! its parent directories up first). The 1-file change is `/etc/hostname`; the 100-file
//! change is 100 regular files spread evenly over the sorted `debian` tree. Timed:
//! - `changes/{empty,1-file,100-files}`: `Workspace::changes()` of a mounted workspace
//!   (`Workspace::create` over the `debian` lower) with no change, the 1-file or the
//!   100-file change;
//! - `export/{empty,1-file,100-files}`: `export_diff(io::sink(), &DiffOptions::default())`
//!   of the same workspaces (uncompressed tar, both digests computed);
//! - `apply/unmounted/{debian,1k,10k}`: per run, the 1-file change and an unmount
//!   (untimed), then `Workspace::apply()` alone (the diff engine: checking and flattening
//!   the upper into the lower, emptying upper and work), then a mount again (untimed). Each
//!   workspace is a `Workspace::convert`ed copy of its lower, so the lower is its own;
//!   `apply/unmounted/debian-100-files`: the same with the 100-file change;
//! - `apply/mounted/{debian,1k,10k}`: the 1-file change (untimed), then `apply()` on the
//!   mounted workspace: the flatten plus the unmount and mount around it (which
//!   `benches/mount.rs` measures on its own);
//! - `reference/read-mountinfo`: one `std::fs::read("/proc/thread-self/mountinfo")`, the
//!   read `apply` does twice (its "nothing mounted under the dir we empty" check), for
//!   comparison.
//!
//! After criterion's report (in a real `cargo bench` run only, not `--test`/`--list`):
//! - an interleaved pass: `WORKSPACE_BENCH_ROUNDS` (default 2000) rounds that each run
//!   every operation above once, in a new random order every round, so that load from
//!   elsewhere on this shared machine hits all of them alike; it prints each operation's
//!   median run;
//! - a syscall count: the bench re-runs itself under `strace -f` (when `strace` is
//!   installed) to do one `changes`, `export_diff` and `apply` (unmounted, then mounted)
//!   of the 1-file and of the 100-file change over each lower, and prints the number of
//!   system calls each made (by name), found between marker `statx` calls in the trace.
//!
//! Needs root: `sudo cargo bench --bench workspace`. Before anything else the process
//! moves into a private mount namespace of its own (`unshare(CLONE_NEWNS)`, then `/` made
//! recursively private) and mounts a tmpfs of its own for all of the above (or, with
//! `WORKSPACE_BENCH_DIR=dir`, works in a temp dir under `dir`). Not root: the bench prints
//! why it is skipped and exits 0 (under `CI` it fails instead).

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use rootfs_cache::{
    ApplyReport, DiffOptions, KernelOverlay, UnpackOptions, WhiteoutMode, Workspace, WorkspaceOptions, unpack,
};

/// The file the 1-file change writes to (relative to the rootfs).
const CHANGED: &str = "etc/hostname";

/// Env var that turns the process into the traced child of the syscall count.
const TRACE_CHILD: &str = "WORKSPACE_BENCH_TRACE_CHILD";

/// Prefix of the marker paths the traced child `statx`es between operations.
const MARK: &str = "/WORKSPACE-BENCH-MARK/";

/// A synthetic rootfs-like tree: `/etc` with a few files (`hostname` among them), then
/// `dirs` directories under `usr/lib/gNN/` with `files` small files each.
fn synthetic(root: &Path, dirs: usize, files: usize) {
    let etc = root.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    for (name, body) in
        [("hostname", "bench\n"), ("passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("os-release", "ID=x\n")]
    {
        std::fs::write(etc.join(name), body).unwrap();
    }
    for i in 0..dirs {
        let d = root.join(format!("usr/lib/g{:02}/d{i:05}", i / 50));
        std::fs::create_dir_all(&d).unwrap();
        for f in 0..files {
            let len = 64 + (i * 7 + f * 131) % 4000;
            std::fs::write(d.join(format!("f{f}")), vec![b'a' + (f % 26) as u8; len]).unwrap();
        }
    }
}

/// Every entry below `dir` (not `dir` itself), in sorted order: relative path and whether
/// it is a regular file.
fn entries(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, bool)>) {
    let mut names: Vec<_> = std::fs::read_dir(root.join(rel)).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    for n in names {
        let r = rel.join(n);
        let t = std::fs::symlink_metadata(root.join(&r)).unwrap().file_type();
        out.push((r.clone(), t.is_file()));
        if t.is_dir() {
            entries(root, &r, out);
        }
    }
}

fn count_entries(root: &Path) -> usize {
    let mut v = Vec::new();
    entries(root, Path::new(""), &mut v);
    v.len()
}

/// Extracts the Debian tar into `dest` (or generates a synthetic tree of the same size)
/// and describes what it made.
fn debian_lower(dest: &Path) -> String {
    let tar = std::env::var_os("WORKSPACE_BENCH_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-data/rootfs.tar"));
    std::fs::create_dir(dest).unwrap();
    match std::fs::File::open(&tar) {
        Ok(f) => {
            let mut opts = UnpackOptions::default();
            opts.whiteouts = WhiteoutMode::Apply;
            unpack(std::io::BufReader::new(f), dest, &opts).expect("unpack the rootfs tar");
            format!("{} ({} entries)", tar.display(), count_entries(dest))
        }
        Err(e) => {
            eprintln!("{}: {e}; using a synthetic Debian-sized tree instead", tar.display());
            synthetic(dest, 700, 9);
            format!("synthetic ({} entries)", count_entries(dest))
        }
    }
}

/// A synthetic lower of about `n` entries (`n` / 10 directories of 9 files).
fn synthetic_lower(dest: &Path, n: usize) -> String {
    std::fs::create_dir(dest).unwrap();
    synthetic(dest, n / 10, 9);
    format!("synthetic ({} entries)", count_entries(dest))
}

/// A mounted workspace over `lower`.
fn mounted(dir: PathBuf, lower: &Path) -> Workspace {
    let mut ws = Workspace::create(dir, vec![lower.to_path_buf()], WorkspaceOptions::default()).expect("create");
    ws.mount(KernelOverlay::new()).expect("mount");
    ws
}

/// `n` regular files of `lower` (relative paths), evenly spread over its sorted walk.
fn spread_files(lower: &Path, n: usize) -> Vec<PathBuf> {
    let mut all = Vec::new();
    entries(lower, Path::new(""), &mut all);
    let files: Vec<PathBuf> = all.into_iter().filter(|(_, f)| *f).map(|(p, _)| p).collect();
    assert!(files.len() >= n, "the lower has fewer than {n} regular files");
    (0..n).map(|i| files[i * files.len() / n].clone()).collect()
}

/// Makes a change through a mounted workspace: one byte written at offset 0 of each file
/// (content and mtime change, size stays; overlayfs copies the file and its parent
/// directories up first).
fn touch(ws: &Workspace, files: &[PathBuf]) {
    use std::os::unix::fs::FileExt;
    for f in files {
        let h = std::fs::OpenOptions::new().write(true).open(ws.target().join(f)).expect("open through mount");
        h.write_at(b"#", 0).expect("write through mount");
    }
}

/// A `convert`ed, mounted workspace whose (private) lower `apply` flattens into.
struct ApplyCase {
    ws: Workspace,
}

impl ApplyCase {
    fn new(path: &Path) -> Self {
        ApplyCase { ws: Workspace::convert(path, KernelOverlay::new()).expect("convert") }
    }

    fn check(r: &ApplyReport, files: &[PathBuf]) {
        assert_eq!(
            (r.moved, r.copied, r.deleted, r.replaced_dirs),
            (files.len() as u64, 0, 0, 0),
            "unexpected apply: {r:?}"
        );
    }

    /// Change and unmount (untimed), apply (timed), mount again (untimed).
    fn unmounted(&mut self, files: &[PathBuf]) -> Duration {
        touch(&self.ws, files);
        self.ws.unmount().expect("unmount");
        let t = Instant::now();
        let r = self.ws.apply().expect("apply");
        let d = t.elapsed();
        Self::check(&r, files);
        self.ws.mount(KernelOverlay::new()).expect("mount");
        d
    }

    /// Change (untimed), apply on the mounted workspace: unmount, flatten, mount (timed).
    fn mounted(&mut self, files: &[PathBuf]) -> Duration {
        touch(&self.ws, files);
        let t = Instant::now();
        let r = self.ws.apply().expect("apply");
        let d = t.elapsed();
        Self::check(&r, files);
        assert!(self.ws.is_mounted());
        d
    }
}

/// One timed operation.
enum Op<'a> {
    Changes(&'a Workspace),
    Export(&'a Workspace),
    ApplyUnmounted(&'a RefCell<ApplyCase>, &'a [PathBuf]),
    ApplyMounted(&'a RefCell<ApplyCase>, &'a [PathBuf]),
    /// For reference: one `std::fs::read` of `/proc/thread-self/mountinfo`.
    Mountinfo,
}

impl Op<'_> {
    fn run(&self) -> Duration {
        match self {
            Op::Changes(ws) => {
                let t = Instant::now();
                let c = ws.changes().expect("changes");
                let d = t.elapsed();
                std::hint::black_box(c);
                d
            }
            Op::Export(ws) => {
                let t = Instant::now();
                let s = ws.export_diff(std::io::sink(), &DiffOptions::default()).expect("export_diff");
                let d = t.elapsed();
                std::hint::black_box(s);
                d
            }
            Op::ApplyUnmounted(c, files) => c.borrow_mut().unmounted(files),
            Op::ApplyMounted(c, files) => c.borrow_mut().mounted(files),
            Op::Mountinfo => {
                let t = Instant::now();
                let m = std::fs::read("/proc/thread-self/mountinfo").expect("read mountinfo");
                let d = t.elapsed();
                std::hint::black_box(m);
                d
            }
        }
    }
}

struct Fixture {
    /// Description of each lower, for the report.
    lowers: Vec<(&'static str, String)>,
    /// The 1-file change: `etc/hostname`.
    one: Vec<PathBuf>,
    /// The 100-file change: regular files spread over the `debian` lower.
    hundred: Vec<PathBuf>,
    /// `changes`/`export` workspaces over the `debian` lower: empty, 1 file, 100 files.
    diff: Vec<(&'static str, Workspace)>,
    /// `apply` workspaces: `debian`, `1k`, `10k`.
    apply: Vec<(&'static str, RefCell<ApplyCase>)>,
    /// Where the `apply` workspaces live (for the traced child, once they are destroyed).
    apply_paths: Vec<(&'static str, PathBuf)>,
}

impl Fixture {
    fn new(root: &Path) -> Self {
        let debian = root.join("debian");
        let mut lowers = vec![("debian", debian_lower(&debian))];
        // The apply workspaces' own copies (apply changes its lower).
        let mut apply_paths = vec![("debian", root.join("apply-debian"))];
        let t = Instant::now();
        let desc = debian_lower(&apply_paths[0].1);
        eprintln!("second copy of the debian lower: {desc}, {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        for (name, n) in [("1k", 1_000), ("10k", 10_000)] {
            let p = root.join(format!("apply-{name}"));
            lowers.push((name, synthetic_lower(&p, n)));
            apply_paths.push((name, p));
        }
        let one = vec![PathBuf::from(CHANGED)];
        let hundred = spread_files(&debian, 100);

        let diff: Vec<(&'static str, Workspace)> = [("empty", &[][..]), ("1-file", &one), ("100-files", &hundred)]
            .into_iter()
            .map(|(name, files)| {
                let ws = mounted(root.join(format!("ws-{name}")), &debian);
                touch(&ws, files);
                (name, ws)
            })
            .collect();
        let apply = apply_paths.iter().map(|(n, p)| (*n, RefCell::new(ApplyCase::new(p)))).collect();
        Fixture { lowers, one, hundred, diff, apply, apply_paths }
    }

    fn describe(&self) {
        for (name, d) in &self.lowers {
            eprintln!("lower {name}: {d}");
        }
        for (name, ws) in &self.diff {
            let c = ws.changes().expect("changes");
            let s = ws.export_diff(std::io::sink(), &DiffOptions::default()).expect("export");
            let shown: Vec<String> =
                c.changes.iter().take(4).map(|c| format!("{} {:?}", c.path.display(), c.kind)).collect();
            eprintln!(
                "workspace {name}: {} changes [{}{}], diff {} entries, {} bytes",
                c.len(),
                shown.join(", "),
                if c.len() > 4 { ", ..." } else { "" },
                s.entries,
                s.size
            );
        }
    }

    /// Every timed operation, named as in criterion's report.
    fn ops(&self) -> Vec<(String, Op<'_>)> {
        let mut v = Vec::new();
        for (name, ws) in &self.diff {
            v.push((format!("changes/{name}"), Op::Changes(ws)));
        }
        for (name, ws) in &self.diff {
            v.push((format!("export/{name}"), Op::Export(ws)));
        }
        for (name, c) in &self.apply {
            v.push((format!("apply/unmounted/{name}"), Op::ApplyUnmounted(c, &self.one)));
        }
        v.push(("apply/unmounted/debian-100-files".into(), Op::ApplyUnmounted(&self.apply[0].1, &self.hundred)));
        for (name, c) in &self.apply {
            v.push((format!("apply/mounted/{name}"), Op::ApplyMounted(c, &self.one)));
        }
        v.push(("reference/read-mountinfo".into(), Op::Mountinfo));
        v
    }
}

fn bench(c: &mut Criterion, fx: &Fixture) {
    for (name, op) in fx.ops() {
        let (group, id) = name.split_once('/').expect("group/name");
        let mut g = c.benchmark_group(group);
        if group == "apply" {
            // The untimed setup (write through the mount, unmount/mount) costs more than
            // the timed apply: keep the wall time in check.
            g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
        }
        if id.ends_with("100-files") {
            // Milliseconds per run: fewer, equal samples (criterion's linear sampling
            // would need 5,050 runs).
            g.sampling_mode(SamplingMode::Flat).sample_size(30);
        }
        g.bench_function(id, |b| b.iter_custom(|iters| (0..iters).map(|_| op.run()).sum()));
        g.finish();
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2 }
}

/// `rounds` rounds, each running every operation once in a new random order (so that
/// neither drift from other load on the machine nor the cache footprint of a heavy
/// operation favours the one that runs next); prints each operation's median run.
fn interleaved(fx: &Fixture, rounds: usize) {
    let ops = fx.ops();
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); ops.len()];
    let mut order: Vec<usize> = (0..ops.len()).collect();
    // xorshift64: a fixed seed, so runs shuffle alike.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..rounds {
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for &j in &order {
            times[j].push(ops[j].1.run());
        }
    }
    println!("\nworkspace operations interleaved, {rounds} runs each: median (p10 .. p90) per run");
    for ((name, _), t) in ops.iter().zip(&mut times) {
        let m = median(t);
        let (p10, p90) = (t[t.len() / 10], t[t.len() * 9 / 10]);
        println!("{name:<34}{:>10.1} µs   ({:.1} .. {:.1} µs)", us(m), us(p10), us(p90));
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Makes the traced child's markers: a `statx` of a path that does not exist.
fn mark(label: &str) {
    let _ = std::fs::symlink_metadata(format!("{MARK}{label}"));
}

/// The traced child: for each `name=path` in `spec` (`;`-separated), converts `path`
/// and, for a 1-file and then a 100-file change, does one `changes`, `export_diff` and
/// unmounted `apply`, then one mounted `apply` of the same change made again, each
/// between markers.
fn trace_child(spec: &str) {
    for item in spec.split(';') {
        let (name, path) = item.split_once('=').expect("name=path");
        let path = Path::new(path);
        let sets = [("1-file", vec![PathBuf::from(CHANGED)]), ("100-files", spread_files(path, 100))];
        let mut case = ApplyCase::new(path);
        for (set, files) in &sets {
            touch(&case.ws, files);
            case.ws.unmount().expect("unmount");
            mark(&format!("{name}/{set}/changes"));
            let c = case.ws.changes().expect("changes");
            mark(&format!("{name}/{set}/export"));
            let s = case.ws.export_diff(std::io::sink(), &DiffOptions::default()).expect("export");
            mark(&format!("{name}/{set}/apply-unmounted"));
            let r = case.ws.apply().expect("apply");
            mark("end");
            ApplyCase::check(&r, files);
            std::hint::black_box((c, s));
            case.ws.mount(KernelOverlay::new()).expect("mount");
            touch(&case.ws, files);
            mark(&format!("{name}/{set}/apply-mounted"));
            let r = case.ws.apply().expect("apply");
            mark("end");
            ApplyCase::check(&r, files);
        }
        case.ws.destroy().expect("destroy");
    }
}

/// Syscalls per marked section of an `strace -f -o` trace: section -> name -> count.
fn parse_trace(text: &str) -> Vec<(String, BTreeMap<String, u64>)> {
    let mut out: Vec<(String, BTreeMap<String, u64>)> = Vec::new();
    let mut open = false;
    for line in text.lines() {
        // `-f` prefixes each line with the pid.
        let l = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        if let Some(i) = l.find(MARK) {
            let label = l[i + MARK.len()..].split('"').next().unwrap_or("");
            open = label != "end";
            if open {
                out.push((label.to_string(), BTreeMap::new()));
            }
            continue;
        }
        if !open || l.starts_with("+++") || l.starts_with("---") || l.starts_with("<...") {
            continue;
        }
        if let Some((name, _)) = l.split_once('(') {
            *out.last_mut().expect("open section").1.entry(name.to_string()).or_default() += 1;
        }
    }
    out
}

/// Re-runs this binary under `strace -f` as the traced child over the `apply` lowers and
/// prints the syscall counts per operation.
fn syscall_count(root: &Path, paths: &[(&'static str, PathBuf)]) {
    let exe = std::env::current_exe().expect("current_exe");
    let out = root.join("strace.txt");
    let spec: Vec<String> = paths.iter().map(|(n, p)| format!("{n}={}", p.display())).collect();
    let status = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&out)
        .arg(&exe)
        .env(TRACE_CHILD, spec.join(";"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("traced child failed: {s}"),
        Err(e) => {
            println!("\nsyscall count skipped: cannot run strace ({e}); install it (apt-get install strace)");
            return;
        }
    }
    let text = std::fs::read_to_string(&out).expect("read the trace");
    let sections = parse_trace(&text);
    let total = |label: &str| -> String {
        sections.iter().find(|(l, _)| l == label).map_or("-".into(), |(_, c)| c.values().sum::<u64>().to_string())
    };
    println!("\nsystem calls of one operation (strace -f), 1-file change = /{CHANGED}:");
    println!(
        "{:<20}{:>10}{:>10}{:>18}{:>16}",
        "lower / change", "changes", "export", "apply unmounted", "apply mounted"
    );
    for (name, _) in paths {
        for set in ["1-file", "100-files"] {
            let cells: Vec<String> = ["changes", "export", "apply-unmounted", "apply-mounted"]
                .iter()
                .map(|op| total(&format!("{name}/{set}/{op}")))
                .collect();
            println!(
                "{:<20}{:>10}{:>10}{:>18}{:>16}",
                format!("{name} / {set}"),
                cells[0],
                cells[1],
                cells[2],
                cells[3]
            );
        }
    }
    println!("\nby system call:");
    for (label, counts) in &sections {
        let total: u64 = counts.values().sum();
        let mut by: Vec<(&String, &u64)> = counts.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = by.iter().map(|(n, c)| format!("{n} {c}")).collect();
        println!("{label:<34}{total:>5}: {}", list.join(", "));
    }
}

fn main() {
    if let Some(spec) = std::env::var_os(TRACE_CHILD) {
        // Already in the parent's private namespace, on its tmpfs.
        trace_child(spec.to_str().expect("utf-8 spec"));
        return;
    }
    if !common::require_root("workspace") {
        return;
    }
    common::private_namespace();
    // Two Debian copies (~2 x 211 MB), the synthetic lowers and the uppers.
    let scratch = common::Scratch::new("WORKSPACE_BENCH_DIR", "size=2g,mode=0755");
    let fx = Fixture::new(scratch.path());
    fx.describe();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &fx);
    c.final_summary();
    // The extra passes only in a real bench run (`cargo bench` passes --bench), not under
    // `--test`/`--list`/`--profile-time`; WORKSPACE_BENCH_ROUNDS=0 skips the interleaved one.
    let args: Vec<String> = std::env::args().collect();
    let real = args.iter().any(|a| a == "--bench")
        && !args.iter().any(|a| a == "--test" || a == "--list" || a.starts_with("--profile-time"));
    if !real {
        return;
    }
    let rounds = std::env::var("WORKSPACE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    if rounds > 0 {
        interleaved(&fx, rounds);
    }
    // The traced child converts the apply lowers itself: give them back first.
    let Fixture { diff, apply, apply_paths, .. } = fx;
    drop(diff);
    for (_, c) in apply {
        c.into_inner().ws.destroy().expect("destroy");
    }
    syscall_count(scratch.path(), &apply_paths);
}
