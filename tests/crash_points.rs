//! Issue 15: workspaces survive a `SIGKILL` at any step and a second process, and leases
//! are released however a workspace ended. Black box: everything goes through the
//! `rootfsctl` binary, as a runtime's supervisor (or a script) drives it on a node.
//!
//! Every test runs in its own private mount namespace on a scratch tmpfs, with the
//! OCI layout of `common/live_sandbox.rs` (image `two`: two layers, one deleting a file) and a
//! cache `C`. A *live sandbox* is `rootfsctl --cache C create [--tmpfs 64M] L:two WS`,
//! `rootfsctl mount --backend kernel|copy WS` and writes through `WS/rootfs`: a new file,
//! an appended file, a deleted file (a whiteout in the upper), a new directory.
//!
//! # Crash points
//! One test per operation: `detach` (disk and tmpfs upper), `apply` of a `convert`ed
//! directory, `diff import` into a fresh workspace (of an earlier `diff export`), `reset`,
//! `destroy` (disk and tmpfs), `unmount` of a copy-backend view (which folds the view's
//! writes into the upper), `create` next to a live sandbox, and `mount`.
//!
//! The operation runs once under `strace -f -e trace=SET -o TRACE` ([`MUTATING`]) on a
//! fresh scenario: that run must succeed, and it lists the mutating syscalls. strace
//! counts invocations per syscall and per tracee (thread), so the kill points are, in the
//! order they happen, each moment some thread makes its k-th call of syscall S for a k no
//! thread reached before: S and k for `strace -e inject=S:signal=KILL:when=k` (the
//! process is killed on entry, before the k-th call runs). With more than [`POINTS`] of
//! them, [`POINTS`] are taken: every point of a syscall made at most [`RARE`] times (the
//! step boundaries: renames, unlinks, mounts, ...) and an even spread of the others
//! (deterministic); `CRASH_POINTS_ALL=1` takes them all, `CRASH_POINTS_VERBOSE=1` shows
//! each point's outcome. The traced run itself is checked as the "complete" point.
//!
//! For each point a fresh scenario is built, the operation is killed there, and the test
//! does what a user would next:
//! - a. the state it left: never two overlays on one mount point; a view still mounted,
//!   or else the one `rootfsctl mount WS` makes, is EXACTLY (`support::diff_trees` with
//!   `Cmp::strict`: contents, types, modes, owners, xattrs, mtimes, whiteouts honoured)
//!   the view before the operation or the view after a completed one: for detach, apply,
//!   unmount and mount the same files; for reset the bare image; for import the bare image
//!   or the exported view; for create the bare image; for destroy only the one before (a
//!   destroyed workspace has no view). Otherwise that `mount` fails with exit 1 and one
//!   `rootfsctl: ...` line on stderr (for `mount` itself it must succeed);
//! - b. retrying the operation succeeds (an import or create whose workspace already
//!   shows the completed view is not retried: it is done; a `destroy` retried when nothing
//!   at all was left may also fail cleanly), and the state equals the completed
//!   operation's: detach releases the lease and keeps the view, apply leaves an empty
//!   upper, unmount leaves the writes in the upper, reset leaves it unmounted showing the
//!   image, destroy leaves nothing and no lease;
//! - c. nothing is lost: after detach, apply, unmount, mount the sandbox's writes are all
//!   visible, and a `create` next to a live sandbox leaves that sandbox's view unchanged;
//! - d. `rootfsctl --cache C destroy WS` works, its lease goes, no mount is left inside it;
//!   at the end of the test `C/leases/` is empty, no mount is left under the scratch dir
//!   and `rootfsctl --cache C gc --max-bytes 0` evicts every layer.
//!
//! Failures are collected per point (the first failing assertion of each) and reported
//! together at the end of the test, so one run shows which steps of an operation are not
//! crash-safe.
//!
//! # Concurrency
//! Four `rootfsctl` processes at a time race `mount`, `unmount`, `detach`, `diff export`,
//! `destroy` and `create` on one workspace, round after round: each exits 0 or 1, the
//! refused ones with one line saying the workspace is in use (`Error::Busy`, a
//! per-workspace lock) or why the state refuses them; never two overlays on `WS/rootfs`
//! (a thread samples the mount table all along), never `EBUSY` or overlayfs' "in-use"
//! warning (in stderr or the kernel log); the sandbox's writes survive every round no
//! `destroy` won, and a round a `destroy` won leaves nothing or a fresh workspace, never
//! a leaked lease.
//!
//! # Leases
//! `create WS/` then `destroy WS` (and the other way round) releases the lease;
//! `rootfsctl --cache C leases` lists the persisted leases and `release ID` drops one;
//! a tmpfs workspace whose tmpfs is gone (detached by hand, as after a reboot) can still
//! be destroyed and its lease goes; `destroy WS` without `--cache` releases the lease too
//! (the workspace records its cache).
//!
//! Needs root and `strace` (skipped otherwise, a failure under `CI=1`).

#[path = "common/live_sandbox.rs"]
mod live_sandbox;
#[path = "common/ops.rs"]
mod ops;
#[path = "common/rootfsctl.rs"]
mod rootfsctl;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use live_sandbox::{Snap, build_layout, detach_mounts, mounts_at, mounts_under, names, sandbox_writes, writes_in};
use rootfsctl::{Ctl, kv, s};
use support::{Cmp, Fmt};

// ---------------------------------------------------------------------------------------
// The tests

mod detach {
    use super::{Case, Op};
    #[test]
    fn disk() {
        super::crash_points(Case { op: Op::Detach, tmpfs: false })
    }
    #[test]
    fn tmpfs() {
        super::crash_points(Case { op: Op::Detach, tmpfs: true })
    }
}

mod destroy {
    use super::{Case, Op};
    #[test]
    fn disk() {
        super::crash_points(Case { op: Op::Destroy, tmpfs: false })
    }
    #[test]
    fn tmpfs() {
        super::crash_points(Case { op: Op::Destroy, tmpfs: true })
    }
}

#[test]
fn apply_converted() {
    crash_points(Case { op: Op::Apply, tmpfs: false })
}

#[test]
fn diff_import() {
    crash_points(Case { op: Op::Import, tmpfs: false })
}

#[test]
fn reset() {
    crash_points(Case { op: Op::Reset, tmpfs: false })
}

#[test]
fn unmount_copy() {
    crash_points(Case { op: Op::UnmountCopy, tmpfs: false })
}

#[test]
fn create() {
    crash_points(Case { op: Op::Create, tmpfs: false })
}

#[test]
fn mount() {
    crash_points(Case { op: Op::Mount, tmpfs: false })
}

// ---------------------------------------------------------------------------------------
// The fixture

/// The mutating syscalls a kill point can be put before (all known to strace here).
const MUTATING: &str = "rename,renameat,renameat2,unlink,unlinkat,rmdir,mkdir,mkdirat,mknodat,symlinkat,linkat,\
openat,write,pwrite64,ftruncate,fsetxattr,setxattr,lsetxattr,fremovexattr,removexattr,lremovexattr,fchmod,\
fchmodat,fchown,fchownat,utimensat,copy_file_range,mount,umount2,move_mount,fsmount";

/// Kill points per operation unless `CRASH_POINTS_ALL=1`.
const POINTS: usize = 40;

/// A syscall made at most this many times in an operation marks its steps: each of its
/// kill points is taken.
const RARE: usize = 4;

/// A private mount namespace for this test thread, a scratch tmpfs, the layout `L` and
/// an (empty) cache dir `C`.
struct Fx {
    base: PathBuf,
    ctl: Ctl,
    /// `L:two`.
    image: String,
    /// Detached (with everything below it) before the directory is removed.
    _scratch: scratch_ns::Mounted,
    _tmp: tempfile::TempDir,
}

/// The fixture, or `None` (skipped) without root or strace.
fn setup() -> Option<Fx> {
    let test = std::thread::current().name().unwrap_or("crash_points").to_string();
    if !support::require_root(&test) || !support::require_tools(&test, &["strace"]) {
        return None;
    }
    scratch_ns::private_ns();
    let tmp = support::tempdir();
    let scratch = scratch_ns::tmpfs(tmp.path(), "size=1g,mode=0755");
    let base = tmp.path().to_path_buf();
    let ctl = Ctl { cache: base.join("C"), tmp: base.join("tmp") };
    fs::create_dir(&ctl.tmp).unwrap();
    let layout = build_layout(&base.join("L"));
    rootfsctl::rootfsctl_bin();
    Some(Fx { image: format!("{}:two", s(&layout)), base, ctl, _scratch: scratch, _tmp: tmp })
}

/// `rootfsctl [--cache C] ARGS` as a line for messages.
fn cmdline(cached: bool, args: &[&str]) -> String {
    format!("`rootfsctl {}{}`", if cached { "--cache C " } else { "" }, args.join(" "))
}

/// How a command ended, for messages.
fn ended(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let err = err.trim_end();
    if err.is_empty() { format!("{}", o.status) } else { format!("{}, stderr: {err}", o.status) }
}

/// A failure as `rootfsctl` promises it: exit 1 and exactly one `rootfsctl: ...` line.
fn clear_failure(what: &str, o: &Output) -> Result<(), String> {
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    if o.status.code() == Some(1) && lines.len() == 1 && lines[0].starts_with("rootfsctl: ") {
        Ok(())
    } else {
        Err(format!("{what} failed, but not cleanly (exit 1, one `rootfsctl:` line): {}", ended(o)))
    }
}

impl Fx {
    fn out(&self, cached: bool, args: &[&str]) -> Output {
        if cached { self.ctl.cached_output(args) } else { self.ctl.output(args) }
    }

    /// `rootfsctl [--cache C] ARGS` must succeed: its stdout, or what went wrong.
    fn ok(&self, cached: bool, args: &[&str]) -> Result<String, String> {
        let o = self.out(cached, args);
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!("{} failed: {}", cmdline(cached, args), ended(&o)))
        }
    }

    /// [`ok`](Fx::ok) or panic (setting up, where nothing is under test yet).
    fn must(&self, cached: bool, args: &[&str]) -> String {
        self.ok(cached, args).unwrap_or_else(|e| panic!("setting up: {e}"))
    }

    /// The persisted leases (`C/leases/`).
    fn leases(&self) -> BTreeSet<String> {
        let dir = self.ctl.cache.join("leases");
        if dir.exists() { names(&dir) } else { BTreeSet::new() }
    }

    /// A live sandbox in `ws`: created (`--tmpfs 64M` if asked), mounted with `backend`,
    /// written to. Its view.
    fn sandbox(&self, ws: &Path, tmpfs: bool, backend: &str) -> Snap {
        self.try_sandbox(ws, tmpfs, backend).unwrap_or_else(|e| panic!("setting up: {e}"))
    }

    /// [`sandbox`](Fx::sandbox), or why it cannot be made.
    fn try_sandbox(&self, ws: &Path, tmpfs: bool, backend: &str) -> Result<Snap, String> {
        let mut args = vec!["create"];
        if tmpfs {
            args.extend(["--tmpfs", "64M"]);
        }
        args.extend([self.image.as_str(), s(ws)]);
        self.ok(true, &args)?;
        let view = PathBuf::from(self.ok(false, &["mount", "--backend", backend, s(ws)])?.trim_end());
        assert_eq!(view, ws.join("rootfs"));
        sandbox_writes(&view, false);
        Ok(ops::view(&view))
    }

    /// The bare image's view: a fresh workspace, mounted, read, destroyed.
    fn image_view(&self) -> Snap {
        let ws = self.base.join("image-view");
        self.must(true, &["create", &self.image, s(&ws)]);
        self.must(false, &["mount", "--backend", "kernel", s(&ws)]);
        let v = ops::view(&ws.join("rootfs"));
        self.must(true, &["destroy", s(&ws)]);
        v
    }

    /// Invariant d at the end of a test: no lease, no mount, `gc --max-bytes 0` evicts
    /// every layer. Problems, one line each.
    fn end_state(&self) -> Vec<String> {
        let mut bad = Vec::new();
        let leases = self.leases();
        if !leases.is_empty() {
            bad.push(format!("C/leases/ not empty at the end: {leases:?}"));
        }
        let mounts = mounts_under(&self.base);
        if !mounts.is_empty() {
            bad.push(format!("mounts left under the scratch dir: {mounts:?}"));
        }
        let layers = names(&self.ctl.cache.join("layers")).len();
        match self.ok(true, &["gc", "--max-bytes", "0"]) {
            Ok(out) => {
                let gc = kv(out.trim_end());
                let left = names(&self.ctl.cache.join("layers"));
                if gc.get("evicted") != Some(&layers.to_string()) || !left.is_empty() {
                    bad.push(format!(
                        "gc --max-bytes 0 evicted {:?} of {layers} layers, left {left:?}",
                        gc.get("evicted")
                    ));
                }
            }
            Err(e) => bad.push(e),
        }
        bad
    }
}

/// The first `n` differences, for a message.
fn first_diffs(d: &[String], n: usize) -> String {
    let mut t: Vec<&str> = d.iter().take(n).map(String::as_str).collect();
    if d.len() > n {
        t.push("...");
    }
    format!("{} differences: {}", d.len(), t.join("; "))
}

// ---------------------------------------------------------------------------------------
// Kill points

/// Kill before the `k`-th call of `sys` (per tracee).
#[derive(Clone, Debug)]
struct Point {
    sys: String,
    k: usize,
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} k={}", self.sys, self.k)
    }
}

/// The kill points of an `strace -f` trace, in the order they happen: each line where
/// a tracee makes its k-th call of a syscall and no tracee made a k-th call of it before.
fn kill_points(trace: &str) -> Vec<Point> {
    let mut calls: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut reached: BTreeMap<&str, usize> = BTreeMap::new();
    let mut points = Vec::new();
    for line in trace.lines() {
        // `PID NAME(ARGS...) = RET`, or `PID NAME(ARGS... <unfinished ...>`; resumed
        // calls (`PID <... NAME resumed>`), signals and exits are no new calls.
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        let Some(name) = rest.split_once('(').map(|(n, _)| n) else { continue };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
            continue;
        }
        let n = calls.entry((pid, name)).or_default();
        *n += 1;
        let top = reached.entry(name).or_default();
        if *n > *top {
            *top = *n;
            points.push(Point { sys: name.to_string(), k: *n });
        }
    }
    points
}

/// At most [`POINTS`] of `points` (all of them with `CRASH_POINTS_ALL=1`), in their
/// order: every point of a syscall made at most [`RARE`] times (the step boundaries:
/// renames, unlinks, mounts, ...), and an even spread of the others (first and last
/// included) for the rest of the budget.
fn spread(points: Vec<Point>) -> Vec<Point> {
    let all = std::env::var("CRASH_POINTS_ALL").is_ok_and(|v| v == "1");
    if all || points.len() <= POINTS {
        return points;
    }
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for p in &points {
        *per.entry(p.sys.as_str()).or_default() += 1;
    }
    let (rare, common): (Vec<usize>, Vec<usize>) =
        (0..points.len()).partition(|&i| per[points[i].sys.as_str()] <= RARE);
    let even = |from: &[usize], n: usize| -> Vec<usize> {
        match n {
            0 => Vec::new(),
            _ if from.len() <= n => from.to_vec(),
            1 => vec![from[0]],
            _ => (0..n).map(|i| from[i * (from.len() - 1) / (n - 1)]).collect(),
        }
    };
    let mut chosen = even(&rare, POINTS);
    chosen.extend(even(&common, POINTS - chosen.len()));
    chosen.sort_unstable();
    chosen.into_iter().map(|i| points[i].clone()).collect()
}

// ---------------------------------------------------------------------------------------
// Operations and scenarios

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `--cache C detach WS` of a live sandbox.
    Detach,
    /// `apply DIR` of a converted, written-to directory.
    Apply,
    /// `diff import WS TAR` into a fresh workspace, `TAR` exported from a live sandbox.
    Import,
    /// `reset WS` of a live sandbox.
    Reset,
    /// `--cache C destroy WS` of a live sandbox.
    Destroy,
    /// `unmount WS` of a live sandbox mounted with the copy backend.
    UnmountCopy,
    /// `--cache C create L:two WS` next to a live sandbox.
    Create,
    /// `mount --backend kernel WS` of an unmounted sandbox holding writes.
    Mount,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    op: Op,
    /// `create --tmpfs 64M`.
    tmpfs: bool,
}

impl Case {
    fn name(self) -> String {
        format!("{:?}{}", self.op, if self.tmpfs { " (tmpfs)" } else { "" })
    }

    fn backend(self) -> &'static str {
        if self.op == Op::UnmountCopy { "copy" } else { "kernel" }
    }
}

/// Which view a workspace showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Before,
    After,
}

/// What a test's scenarios share.
struct Shared {
    /// The bare image's view.
    image: Snap,
    /// `Create`, `Import`: the live sandbox next to the scenarios, and its view.
    live: Option<(PathBuf, Snap)>,
    /// `Import`: the exported diff of the live sandbox.
    tar: Option<PathBuf>,
}

/// One fresh setting for the operation.
struct Scenario {
    case: Case,
    /// The directory the operation works on (a workspace, or a converted dir).
    ws: PathBuf,
    /// Its merged view.
    view: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    /// The operation: whether with `--cache C`, and its arguments.
    cached: bool,
    args: Vec<String>,
    /// The view before the operation (`None`: there was none) and after a completed one.
    before: Option<Snap>,
    after: Option<Snap>,
    /// The persisted leases before the scenario made anything.
    leases: BTreeSet<String>,
}

impl Shared {
    fn new(fx: &Fx, case: Case) -> Shared {
        let image = fx.image_view();
        let (live, tar) = match case.op {
            Op::Create | Op::Import => {
                let ws = fx.base.join("live");
                let view = fx.sandbox(&ws, false, "kernel");
                let tar = (case.op == Op::Import).then(|| {
                    let tar = fx.base.join("live.tar");
                    fx.must(false, &["diff", "export", s(&ws), s(&tar)]);
                    tar
                });
                (Some((ws, view)), tar)
            }
            _ => (None, None),
        };
        Shared { image, live, tar }
    }
}

/// A fresh scenario number `i` for `case`.
fn scenario(fx: &Fx, sh: &Shared, case: Case, i: usize) -> Scenario {
    let leases = fx.leases();
    let ws = fx.base.join(format!("ws{i}"));
    let (upper, work) =
        if case.tmpfs { (ws.join("mem/upper"), ws.join("mem/work")) } else { (ws.join("upper"), ws.join("work")) };
    let w = s(&ws).to_string();
    let sc = |cached: bool, args: &[&str], before: Option<Snap>, after: Option<Snap>| Scenario {
        case,
        view: ws.join("rootfs"),
        ws: ws.clone(),
        upper: upper.clone(),
        work: work.clone(),
        cached,
        args: args.iter().map(|a| a.to_string()).collect(),
        before,
        after,
        leases: leases.clone(),
    };
    match case.op {
        Op::Detach | Op::Destroy | Op::Reset | Op::UnmountCopy | Op::Mount => {
            let before = fx.sandbox(&ws, case.tmpfs, case.backend());
            match case.op {
                Op::Detach => sc(true, &["detach", &w], Some(before.clone()), Some(before)),
                Op::Destroy => sc(true, &["destroy", &w], Some(before), None),
                Op::Reset => sc(false, &["reset", &w], Some(before), Some(sh.image.clone())),
                Op::UnmountCopy => sc(false, &["unmount", &w], Some(before.clone()), Some(before)),
                _ => {
                    fx.must(false, &["unmount", &w]);
                    sc(false, &["mount", "--backend", "kernel", &w], Some(before.clone()), Some(before))
                }
            }
        }
        Op::Import => {
            fx.must(true, &["create", &fx.image, &w]);
            let tar = sh.tar.as_ref().unwrap();
            let exported = sh.live.as_ref().unwrap().1.clone();
            sc(false, &["diff", "import", &w, s(tar)], Some(sh.image.clone()), Some(exported))
        }
        Op::Create => sc(true, &["create", &fx.image, &w], None, Some(sh.image.clone())),
        Op::Apply => {
            // A directory of its own (the base layer's files), converted, written to.
            let dir = fx.base.join(format!("dir{i}"));
            let d = s(&dir).to_string();
            fs::create_dir(&dir).unwrap();
            let tar = support::tar_of(&live_sandbox::base_layer(), Fmt::Pax);
            rootfs_cache::unpack(&tar[..], &dir, &rootfs_cache::UnpackOptions::default()).unwrap();
            fx.must(false, &["convert", "--backend", "kernel", &d]);
            sandbox_writes(&dir, false);
            let before = ops::view(&dir);
            let sibling = |ext: &str| PathBuf::from(format!("{d}.{ext}"));
            Scenario {
                case,
                view: dir.clone(),
                upper: sibling("upper"),
                work: sibling("work"),
                ws: dir,
                cached: false,
                args: vec!["apply".into(), d.clone()],
                before: Some(before.clone()),
                after: Some(before),
                leases,
            }
        }
    }
}

impl Scenario {
    fn args(&self) -> Vec<&str> {
        self.args.iter().map(String::as_str).collect()
    }

    fn op_line(&self) -> String {
        cmdline(self.cached, &self.args())
    }

    fn w(&self) -> &str {
        s(&self.ws)
    }

    /// Whether the view is mounted: a mount on it (kernel), or the copy backend's state.
    fn mounted(&self) -> bool {
        match self.case.backend() {
            "copy" => self.work.join("rootfs-cache-copy").exists(),
            _ => mounts_at(&self.view) > 0,
        }
    }

    /// Never two overlays on one mount point.
    fn not_stacked(&self, when: &str) -> Result<(), String> {
        let n = mounts_at(&self.view);
        if n > 1 {
            return Err(format!("{when}: {n} mounts stacked on {}", self.view.display()));
        }
        Ok(())
    }

    /// The view now: the one before the operation or the one after it (`allowed`), exactly.
    fn view_is(&self, when: &str, allowed: &[Which]) -> Result<Which, String> {
        let got = ops::view(&self.view);
        let mut tried = Vec::new();
        for &which in allowed {
            let want = match which {
                Which::Before => &self.before,
                Which::After => &self.after,
            };
            let Some(want) = want else { continue };
            let d = support::diff_trees(want, &got, &Cmp::strict());
            if d.is_empty() {
                return Ok(which);
            }
            tried.push(format!("against the view {} the operation: {}", which_name(which), first_diffs(&d, 4)));
        }
        Err(format!("{when}: a view that is neither before nor after the operation ({})", tried.join("; ")))
    }

    fn mount_line(&self) -> Vec<&str> {
        vec!["mount", "--backend", self.case.backend(), self.w()]
    }
}

fn which_name(w: Which) -> &'static str {
    match w {
        Which::Before => "before",
        Which::After => "after",
    }
}

// ---------------------------------------------------------------------------------------
// The harness

/// Every kill point of `case`'s operation, each on a fresh scenario; see the module docs.
fn crash_points(case: Case) {
    let Some(fx) = setup() else { return };
    let started = Instant::now();
    let sh = Shared::new(&fx, case);
    // The traced run: the kill points, and the completed operation checked like a point.
    let sc = scenario(&fx, &sh, case, 0);
    let trace = fx.base.join("trace");
    let traced = fx
        .ctl
        .wrapped(&["strace", "-f", "-qq", "-o", s(&trace), "-e", &format!("trace={MUTATING}")], sc.cached, &sc.args())
        .output()
        .unwrap();
    assert!(
        traced.status.success(),
        "{}: the operation {} fails on a fresh scenario, so nothing can be killed in it: {}",
        case.name(),
        sc.op_line(),
        ended(&traced)
    );
    let trace = fs::read_to_string(&trace).unwrap();
    let all = kill_points(&trace);
    assert!(!all.is_empty(), "{}: the trace of {} shows no mutating syscall", case.name(), sc.op_line());
    let total = all.len();
    let verbose = std::env::var("CRASH_POINTS_VERBOSE").is_ok_and(|v| v == "1");
    if verbose {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &all {
            *per.entry(p.sys.as_str()).or_default() += 1;
        }
        let tracees: BTreeSet<&str> = trace.lines().filter_map(|l| l.split_once(' ').map(|(p, _)| p)).collect();
        eprintln!("{}: {total} kill points in {} tracees: {per:?}", case.name(), tracees.len());
    }
    let points = spread(all);
    let mut failures: Vec<(String, String)> = Vec::new();
    let mut record = |label: String, sc: &Scenario, r: std::thread::Result<Result<String, String>>| {
        let msg = match r {
            Ok(Ok(note)) => {
                if verbose {
                    eprintln!("  {label}: ok: {note}");
                }
                return;
            }
            Ok(Err(e)) => e,
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|m| m.to_string()))
                .unwrap_or_else(|| "panicked".into()),
        };
        // What a failed point left mounted must not disturb the next ones.
        detach_mounts(&sc.ws);
        if verbose {
            eprintln!("  {label}: FAILED: {msg}");
        }
        failures.push((label, msg));
    };
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| recover(&fx, &sh, &sc)));
    record("complete (no kill)".into(), &sc, r);
    let mut killed = 0;
    for (i, p) in points.iter().enumerate() {
        let sc = scenario(&fx, &sh, case, i + 1);
        let inject = format!("inject={}:signal=KILL:when={}", p.sys, p.k);
        let trace_one = format!("trace={}", p.sys);
        let o = fx
            .ctl
            .wrapped(
                &["strace", "-f", "-qq", "-o", "/dev/null", "-e", &trace_one, "-e", &inject],
                sc.cached,
                &sc.args(),
            )
            .output()
            .unwrap();
        let r = if o.status.signal() == Some(libc::SIGKILL) {
            killed += 1;
            std::panic::catch_unwind(AssertUnwindSafe(|| recover(&fx, &sh, &sc)))
        } else if o.status.success() {
            // This run made fewer such calls than the traced one: a completed operation.
            std::panic::catch_unwind(AssertUnwindSafe(|| recover(&fx, &sh, &sc)))
        } else {
            Ok(Err(format!("{} was not killed but failed: {}", sc.op_line(), ended(&o))))
        };
        record(p.to_string(), &sc, r);
    }
    // The live sandbox next to the scenarios is intact, and goes.
    if let Some((ws, view)) = &sh.live {
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<String, String> {
            let d = support::diff_trees(view, &ops::view(&ws.join("rootfs")), &Cmp::strict());
            if !d.is_empty() {
                return Err(format!("the live sandbox's view changed: {}", first_diffs(&d, 6)));
            }
            fx.ok(true, &["destroy", s(ws)])
        }));
        let sc = Scenario { ws: ws.clone(), ..scenario_stub(case) };
        record("the live sandbox next to them".into(), &sc, r);
    }
    for e in fx.end_state() {
        failures.push(("end".into(), e));
    }
    let took = started.elapsed();
    eprintln!(
        "{}: {} of {total} kill points run ({killed} killed), {} failed, {:.1} s",
        case.name(),
        points.len(),
        failures.len(),
        took.as_secs_f64()
    );
    if !failures.is_empty() {
        let lines: Vec<String> = failures
            .iter()
            .map(|(label, msg)| {
                let mut m = msg.replace('\n', " ");
                if m.len() > 600 {
                    let mut cut = 600;
                    while !m.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    m.truncate(cut);
                    m.push_str(" ...");
                }
                format!("{label}: {m}")
            })
            .collect();
        panic!(
            "{} {}: {} of {} points failed ({killed} killed, {} kill points in all):\n  {}",
            case.name(),
            sc.op_line(),
            failures.len(),
            points.len() + 1,
            total,
            lines.join("\n  ")
        );
    }
    assert!(killed * 2 >= points.len(), "{}: only {killed} of {} runs were killed", case.name(), points.len());
}

/// A scenario that only names a directory (for [`detach_mounts`] after a failure).
fn scenario_stub(case: Case) -> Scenario {
    Scenario {
        case,
        ws: PathBuf::new(),
        view: PathBuf::new(),
        upper: PathBuf::new(),
        work: PathBuf::new(),
        cached: false,
        args: Vec::new(),
        before: None,
        after: None,
        leases: BTreeSet::new(),
    }
}

/// What a user does after the operation ended (killed or not), with invariants a-d; a
/// note of the path taken (in the error too: what happened before it).
fn recover(fx: &Fx, sh: &Shared, sc: &Scenario) -> Result<String, String> {
    let mut note = String::new();
    match recover_noting(fx, sh, sc, &mut note) {
        Ok(()) => Ok(note),
        Err(e) if note.is_empty() => Err(e),
        Err(e) => Err(format!("{e} [so far: {note}]")),
    }
}

fn recover_noting(fx: &Fx, sh: &Shared, sc: &Scenario, note: &mut String) -> Result<(), String> {
    let op = sc.case.op;
    // a. What the kill left: one view, the one before or after.
    sc.not_stacked("after the kill")?;
    let allowed = [Which::Before, Which::After];
    let shown = if sc.mounted() {
        let w = sc.view_is("the view left mounted", &allowed)?;
        *note = format!("left mounted, the view {}", which_name(w));
        Some(w)
    } else {
        let o = fx.out(false, &sc.mount_line());
        if o.status.success() {
            sc.not_stacked("`mount` after the kill")?;
            let w = sc.view_is("`mount` after the kill", &allowed)?;
            *note = format!("mounts the view {}", which_name(w));
            Some(w)
        } else if op == Op::Mount {
            return Err(format!("retried `mount` failed: {}", ended(&o)));
        } else {
            clear_failure("`mount` after the kill", &o)?;
            *note = format!("mount refused ({})", String::from_utf8_lossy(&o.stderr).trim_end());
            None
        }
    };
    // b. The retry (unless the workspace shows the completed operation already where
    // a retry must be refused), then the completed operation's state.
    // A kill at destroy's very last `rmdir` leaves the workspace's dir empty, with
    // nothing to say it was one: a retried destroy refuses it ("not found"), and it is
    // an empty directory, nothing more (removed here so the end state can be checked).
    let empty_dir_left = op == Op::Destroy && fs::read_dir(&sc.ws).is_ok_and(|mut d| d.next().is_none());
    let nothing_left = (!sc.ws.exists() || empty_dir_left) && fx.leases() == sc.leases;
    match op {
        Op::Mount => {}
        Op::Import | Op::Create if shown == Some(Which::After) => {
            fx.ok(false, &["unmount", sc.w()])?;
            note.push_str(", done: no retry");
        }
        _ => {
            if op == Op::Import && shown.is_some() {
                fx.ok(false, &["unmount", sc.w()])?;
            }
            let o = fx.out(sc.cached, &sc.args());
            if o.status.success() {
                note.push_str(", retried");
            } else {
                let what = format!("the retried {}", sc.op_line());
                if op == Op::Destroy && nothing_left {
                    clear_failure(&what, &o)?;
                    if empty_dir_left {
                        fs::remove_dir(&sc.ws).map_err(|e| format!("{}: {e}", sc.ws.display()))?;
                    }
                    note.push_str(", nothing left: the retry refused cleanly");
                } else {
                    return Err(format!("{what} failed: {}", ended(&o)));
                }
            }
        }
    }
    let mount = || -> Result<(), String> {
        if !sc.mounted() {
            fx.ok(false, &sc.mount_line()).map_err(|e| format!("after the retry: {e}"))?;
        }
        sc.not_stacked("after the retry")
    };
    match op {
        Op::Detach | Op::Apply | Op::Mount => {
            mount()?;
            sc.view_is("after the retry", &[Which::After])?;
            writes_in(&sc.view, false).map_err(|e| format!("after the retry: {e}"))?;
            if op == Op::Detach && fx.leases() != sc.leases {
                return Err(format!(
                    "after the retried detach: the lease is kept: {:?} (before the workspace: {:?})",
                    fx.leases(),
                    sc.leases
                ));
            }
            if op == Op::Apply && !names(&sc.upper).is_empty() {
                return Err(format!("after the retried apply: the upper still holds {:?}", names(&sc.upper)));
            }
        }
        Op::UnmountCopy => {
            if sc.mounted() {
                return Err("after the retried unmount: the copy backend's state is still there".into());
            }
            writes_in(&sc.upper, true).map_err(|e| format!("after the retried unmount: {e}"))?;
            mount()?;
            sc.view_is("after the retry", &[Which::After])?;
            writes_in(&sc.view, false).map_err(|e| format!("after the retry: {e}"))?;
        }
        Op::Reset => {
            if sc.mounted() {
                return Err("after the retried reset: still mounted".into());
            }
            mount()?;
            sc.view_is("after the retried reset", &[Which::After])?;
        }
        Op::Import | Op::Create => {
            mount()?;
            sc.view_is("after the retry", &[Which::After])?;
            fx.ok(false, &["unmount", sc.w()])?;
        }
        Op::Destroy => {
            if sc.ws.exists() {
                return Err(format!("after the retried destroy: {} is still there: {:?}", sc.w(), names(&sc.ws)));
            }
            if fx.leases() != sc.leases {
                return Err(format!("after the retried destroy: leases {:?}, before {:?}", fx.leases(), sc.leases));
            }
            if mounts_at(&sc.view) > 0 || !mounts_under(&sc.ws).is_empty() {
                return Err(format!("after the retried destroy: still mounted: {:?}", mounts_under(&sc.ws)));
            }
        }
    }
    // c. The live sandbox next to a created one: untouched.
    if op == Op::Create {
        let (ws, view) = sh.live.as_ref().unwrap();
        let d = support::diff_trees(view, &ops::view(&ws.join("rootfs")), &Cmp::strict());
        if !d.is_empty() {
            return Err(format!("the live sandbox next to the created workspace changed: {}", first_diffs(&d, 4)));
        }
    }
    // d. It can be destroyed, and the lease goes.
    match op {
        Op::Destroy => {}
        Op::Apply => {
            fx.ok(false, &["destroy", sc.w()])?;
            if mounts_at(&sc.ws) > 0 {
                return Err(format!("`destroy {}` left it mounted", sc.w()));
            }
            for ext in ["lower", "upper", "work"] {
                let p = PathBuf::from(format!("{}.{ext}", sc.w()));
                if p.exists() {
                    return Err(format!("`destroy {}` left {}", sc.w(), p.display()));
                }
            }
            let d = support::diff_trees(sc.after.as_ref().unwrap(), &ops::view(&sc.ws), &Cmp::strict());
            if !d.is_empty() {
                return Err(format!(
                    "the directory given back by `destroy` is not the applied view: {}",
                    first_diffs(&d, 4)
                ));
            }
            fs::remove_dir_all(&sc.ws).unwrap();
        }
        _ => {
            fx.ok(true, &["destroy", sc.w()])?;
            if sc.ws.exists() {
                return Err(format!("`destroy {}` left {:?}", sc.w(), names(&sc.ws)));
            }
            if fx.leases() != sc.leases {
                return Err(format!("after `destroy`: leases {:?}, before the workspace {:?}", fx.leases(), sc.leases));
            }
            if mounts_at(&sc.view) > 0 || !mounts_under(&sc.ws).is_empty() {
                return Err(format!("after `destroy`: still mounted: {:?}", mounts_under(&sc.ws)));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Concurrency

/// New kernel log records since [`Kmsg::open`], read without blocking.
struct Kmsg(Option<fs::File>);

impl Kmsg {
    fn open() -> Kmsg {
        let f = fs::File::options().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok();
        Kmsg(f.and_then(|mut f| f.seek(SeekFrom::End(0)).ok().map(|_| f)))
    }

    /// overlayfs' "upperdir/workdir is in-use" warnings logged since.
    fn in_use_warnings(&mut self) -> Vec<String> {
        let Some(f) = &mut self.0 else { return Vec::new() };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    let msg = rec.split_once(';').map_or(&*rec, |(_, m)| m).trim_end().to_string();
                    if msg.contains("overlayfs") && msg.contains("in-use") {
                        out.push(msg);
                    }
                }
                // Overwritten records: go on with the next one.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(_) => break,
            }
        }
        out
    }
}

/// What a racing command may say when it is refused: the workspace is in use (busy), or
/// its state does not allow it at that moment.
const REFUSALS: &[&str] = &["in use", "already a mount point", "not found", "destroy it first", "is not empty"];

/// After a problem is recorded, what is left of the workspace goes by hand (mounts
/// detached, the directory removed, its lease released or, without `release`, deleted),
/// so that the next round starts from a fresh sandbox.
fn force_clean(fx: &Fx, ws: &Path) {
    detach_mounts(ws);
    let _ = fs::remove_dir_all(ws);
    for id in fx.leases() {
        if fx.ok(true, &["release", &id]).is_err() {
            let _ = fs::remove_file(fx.ctl.cache.join("leases").join(&id));
        }
    }
}

/// The racing commands of each round (`export` is `diff export` into a file of its own).
const SCHEDULE: [[&str; 4]; 10] = [
    ["mount", "mount", "mount", "mount"],
    ["mount", "mount", "unmount", "unmount"],
    ["mount", "detach", "mount", "detach"],
    ["detach", "detach", "export", "export"],
    ["mount", "unmount", "export", "detach"],
    ["destroy", "mount", "export", "detach"],
    ["create", "destroy", "mount", "unmount"],
    ["export", "export", "mount", "unmount"],
    ["detach", "unmount", "mount", "export"],
    ["destroy", "create", "create", "mount"],
];

/// Four processes at a time racing `mount`, `unmount`, `detach`, `diff export`,
/// `destroy` and `create` on one workspace, each mix of [`SCHEDULE`] from an unmounted
/// and from a mounted workspace; see the module docs.
#[test]
fn concurrent_commands() {
    let Some(fx) = setup() else { return };
    let mut kmsg = Kmsg::open();
    let started = Instant::now();
    let image = fx.image_view();
    let ws = fx.base.join("ws");
    let view = ws.join("rootfs");
    let w = s(&ws).to_string();
    fx.sandbox(&ws, false, "kernel");
    // Sample the mount table all along: never two mounts on the view.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, view) = (stop.clone(), view.clone());
        std::thread::spawn(move || {
            let mut worst = 0;
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                worst = worst.max(mounts_at(&view));
                samples += 1;
                std::thread::sleep(Duration::from_micros(500));
            }
            (worst, samples)
        })
    };
    let mut problems: Vec<String> = Vec::new();
    let (mut rounds, mut refused, mut won) = (0, 0, 0);
    for round in 0..2 * SCHEDULE.len() {
        if started.elapsed() > Duration::from_secs(40) {
            break;
        }
        rounds += 1;
        // Each mix twice: from an unmounted workspace, then from a mounted one.
        let start_mounted = round >= SCHEDULE.len();
        if (mounts_at(&view) == 1) != start_mounted {
            let line = if start_mounted { vec!["mount", "--backend", "kernel", &w] } else { vec!["unmount", &w] };
            if let Err(e) = fx.ok(false, &line) {
                problems.push(format!("round {round}, before the race: {e}"));
            }
        }
        let mut children = Vec::new();
        for (j, &kind) in SCHEDULE[round % SCHEDULE.len()].iter().enumerate() {
            let out = fx.base.join(format!("out-{round}-{j}.tar"));
            let (cached, args): (bool, Vec<String>) = match kind {
                "mount" => (false, vec!["mount".into(), "--backend".into(), "kernel".into(), w.clone()]),
                "unmount" => (false, vec!["unmount".into(), w.clone()]),
                "detach" => (true, vec!["detach".into(), w.clone()]),
                "export" => (false, vec!["diff".into(), "export".into(), w.clone(), s(&out).into()]),
                "destroy" => (true, vec!["destroy".into(), w.clone()]),
                _ => (true, vec!["create".into(), fx.image.clone(), w.clone()]),
            };
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut c = if cached { fx.ctl.cached_cmd(&a) } else { fx.ctl.cmd(&a) };
            let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
            children.push((kind, cmdline(cached, &a), child));
        }
        let mut destroyed = false;
        for (kind, line, child) in children {
            let o = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr).trim_end().to_string();
            let what = format!("round {round}: {line}");
            match o.status.code() {
                Some(0) => {
                    won += 1;
                    destroyed |= kind == "destroy";
                }
                Some(1) => {
                    refused += 1;
                    let lower = err.to_lowercase();
                    if let Err(e) = clear_failure(&what, &o) {
                        problems.push(e);
                    } else if lower.contains("busy") || lower.contains("in-use") {
                        problems.push(format!("{what}: EBUSY / in-use, a mount stacked or pulled away: {err}"));
                    } else if !REFUSALS.iter().any(|r| err.contains(r)) {
                        problems.push(format!("{what}: refused for no reason of the race: {err}"));
                    }
                }
                _ => problems.push(format!("{what}: {}", ended(&o))),
            }
        }
        for j in 0..4 {
            let _ = fs::remove_file(fx.base.join(format!("out-{round}-{j}.tar")));
        }
        // The round's outcome: the sandbox intact unless a destroy won; else nothing or a
        // fresh workspace, and no leaked lease.
        let n = mounts_at(&view);
        if n > 1 {
            problems.push(format!("round {round}: {n} mounts on {}", view.display()));
        }
        let rebuild = if !ws.exists() {
            if !destroyed {
                problems.push(format!("round {round}: the workspace is gone, but no destroy succeeded"));
            }
            let leases = fx.leases();
            if !leases.is_empty() {
                problems.push(format!("round {round}: the workspace is gone, its lease is not: {leases:?}"));
                force_clean(&fx, &ws);
            }
            true
        } else {
            let mounted = mounts_at(&view) == 1 || {
                let o = fx.out(false, &["mount", "--backend", "kernel", &w]);
                if !o.status.success() {
                    problems
                        .push(format!("round {round}: the workspace cannot be mounted after the race: {}", ended(&o)));
                }
                o.status.success()
            };
            if !mounted {
            } else if destroyed {
                let d = support::diff_trees(&image, &ops::view(&view), &Cmp::strict());
                if !d.is_empty() {
                    problems.push(format!(
                        "round {round}: after a destroy, the recreated workspace is not the bare image: {}",
                        first_diffs(&d, 4)
                    ));
                }
            } else if let Err(e) = writes_in(&view, false) {
                problems.push(format!("round {round}: the sandbox lost its writes in the race: {e}"));
            }
            if destroyed || !mounted {
                // Start the next round with the sandbox again.
                if let Err(e) = fx.ok(true, &["destroy", &w]) {
                    problems.push(format!("round {round}: {e}"));
                    force_clean(&fx, &ws);
                }
                true
            } else {
                false
            }
        };
        if rebuild {
            if let Err(e) = fx.try_sandbox(&ws, false, "kernel") {
                problems.push(format!("round {round}: the next sandbox cannot be made: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (worst, samples) = watcher.join().unwrap();
    if worst > 1 {
        problems.push(format!("{worst} mounts stacked on {} at once during the races", view.display()));
    }
    if let Err(e) = fx.ok(true, &["destroy", &w]) {
        problems.push(format!("the final destroy: {e}"));
    }
    problems.extend(fx.end_state());
    problems.extend(kmsg.in_use_warnings().into_iter().map(|m| format!("kernel log: {m}")));
    eprintln!(
        "concurrent_commands: {rounds} rounds, {won} commands succeeded, {refused} refused, {samples} mount-table \
         samples, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{} problems in the races:\n  {}", problems.len(), problems.join("\n  "));
}

// ---------------------------------------------------------------------------------------
// Leases

/// `create WS/` then `destroy WS`, and `create WS` then `destroy WS/`, and through a
/// symlinked parent: the lease goes each time.
#[test]
fn lease_path_spellings() {
    let Some(fx) = setup() else { return };
    let ws = fx.base.join("ws");
    let link = fx.base.join("link");
    std::os::unix::fs::symlink(&fx.base, &link).unwrap();
    let slash = format!("{}/", s(&ws));
    let via_link = format!("{}/ws", s(&link));
    let dotted = format!("{}/./ws", s(&fx.base));
    let mut problems = Vec::new();
    let plain = s(&ws);
    for (made, gone) in
        [(slash.as_str(), plain), (plain, slash.as_str()), (via_link.as_str(), plain), (plain, dotted.as_str())]
    {
        fx.must(true, &["create", &fx.image, made]);
        if fx.leases().len() != 1 {
            problems.push(format!("`create {made}`: leases {:?}", fx.leases()));
        }
        if let Err(e) = fx.ok(true, &["destroy", gone]) {
            problems.push(e);
        }
        if ws.exists() {
            problems.push(format!("`destroy {gone}` left {}", ws.display()));
            let _ = fx.ok(true, &["destroy", s(&ws)]);
        }
        let leases = fx.leases();
        if !leases.is_empty() {
            problems.push(format!("`create {made}` then `destroy {gone}` left the lease: {leases:?}"));
            for id in leases {
                let _ = fx.ok(true, &["release", &id]);
            }
        }
    }
    problems.extend(fx.end_state());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `rootfsctl --cache C leases` lists the persisted leases, one id per line;
/// `release ID` drops one; gc then evicts only what no lease pins.
#[test]
fn leases_and_release() {
    let Some(fx) = setup() else { return };
    let (ws1, ws2) = (fx.base.join("ws1"), fx.base.join("ws2"));
    fx.must(true, &["create", &fx.image, s(&ws1)]);
    fx.must(true, &["create", "--tmpfs", "64M", &fx.image, s(&ws2)]);
    let ids = fx.leases();
    assert_eq!(ids.len(), 2, "two workspaces, leases {ids:?}");
    let listed = fx.ok(true, &["leases"]).unwrap_or_else(|e| panic!("{e}"));
    let listed: BTreeSet<String> = listed.lines().map(String::from).collect();
    assert_eq!(listed, ids, "`rootfsctl leases` does not list the persisted leases (C/leases/) one per line");
    // Release the first workspace's lease by hand.
    let before = fx.leases();
    fx.ok(true, &["destroy", s(&ws2)]).unwrap_or_else(|e| panic!("{e}"));
    let ws2_id: Vec<String> = before.difference(&fx.leases()).cloned().collect();
    assert_eq!(ws2_id.len(), 1, "destroying ws2 released {ws2_id:?}");
    let ws1_id = fx.leases().into_iter().next().expect("ws1's lease");
    fx.ok(true, &["release", &ws1_id]).unwrap_or_else(|e| panic!("{e}"));
    assert!(fx.leases().is_empty(), "`release {ws1_id}` left {:?}", fx.leases());
    let listed = fx.ok(true, &["leases"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(listed.trim().is_empty(), "`leases` after the release: {listed:?}");
    // The workspace whose lease was released by hand still goes.
    fx.ok(true, &["destroy", s(&ws1)]).unwrap_or_else(|e| panic!("{e}"));
    assert!(!ws1.exists());
    let bad = fx.end_state();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// How a tmpfs workspace's tmpfs went away by hand (`umount -l`, as a reboot would).
#[derive(Clone, Copy, Debug)]
enum Gone {
    /// Unmounted by `rootfsctl unmount`, then the tmpfs detached.
    TmpfsOfUnmounted,
    /// The view still mounted, the tmpfs detached under it.
    TmpfsUnderView,
    /// Both detached: the view, then the tmpfs (a reboot).
    Both,
}

/// A tmpfs sandbox in `ws` whose tmpfs is gone as `how` says.
fn gone_tmpfs_sandbox(fx: &Fx, ws: &Path, how: Gone) {
    fx.sandbox(ws, true, "kernel");
    let detach = |p: &Path| nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).unwrap();
    match how {
        Gone::TmpfsOfUnmounted => {
            fx.must(false, &["unmount", s(ws)]);
            detach(&ws.join("mem"));
        }
        Gone::TmpfsUnderView => detach(&ws.join("mem")),
        Gone::Both => {
            detach(&ws.join("rootfs"));
            detach(&ws.join("mem"));
        }
    }
}

/// A tmpfs workspace whose tmpfs is gone can still be destroyed, and its lease goes.
#[test]
fn destroy_gone_tmpfs() {
    let Some(fx) = setup() else { return };
    let mut problems = Vec::new();
    for (i, how) in [Gone::TmpfsOfUnmounted, Gone::TmpfsUnderView, Gone::Both].into_iter().enumerate() {
        let ws = fx.base.join(format!("ws{i}"));
        gone_tmpfs_sandbox(&fx, &ws, how);
        check_destroyed(&fx, &ws, true, &format!("{how:?}"), &mut problems);
    }
    problems.extend(fx.end_state());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `destroy WS` without `--cache` releases the lease too: of a disk workspace (mounted
/// or not) and of a tmpfs one whose tmpfs is gone.
#[test]
fn destroy_without_cache() {
    let Some(fx) = setup() else { return };
    let mut problems = Vec::new();
    let ws = fx.base.join("plain");
    fx.must(true, &["create", &fx.image, s(&ws)]);
    check_destroyed(&fx, &ws, false, "unmounted disk workspace", &mut problems);
    let ws = fx.base.join("live");
    fx.sandbox(&ws, false, "kernel");
    check_destroyed(&fx, &ws, false, "mounted disk workspace", &mut problems);
    let ws = fx.base.join("gone");
    gone_tmpfs_sandbox(&fx, &ws, Gone::Both);
    check_destroyed(&fx, &ws, false, "tmpfs workspace whose tmpfs is gone", &mut problems);
    problems.extend(fx.end_state());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `rootfsctl [--cache C] destroy WS` succeeds, leaves nothing mounted or on disk and
/// releases the workspace's lease (the only one).
fn check_destroyed(fx: &Fx, ws: &Path, cached: bool, what: &str, problems: &mut Vec<String>) {
    let line = cmdline(cached, &["destroy", s(ws)]);
    if let Err(e) = fx.ok(cached, &["destroy", s(ws)]) {
        problems.push(format!("{what}: {e}"));
    }
    let mounts = mounts_under(ws);
    if !mounts.is_empty() {
        problems.push(format!("{what}: {line} left mounts {mounts:?}"));
        detach_mounts(ws);
    }
    if ws.exists() {
        problems.push(format!("{what}: {line} left {:?}", names(ws)));
        let _ = fs::remove_dir_all(ws);
    }
    let leases = fx.leases();
    if !leases.is_empty() {
        problems.push(format!("{what}: {line} left the lease {leases:?}"));
        for id in leases {
            let _ = fx.ok(true, &["release", &id]);
        }
    }
}
