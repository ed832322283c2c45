//! Criterion bench: mount + unmount of a 1-layer and a 10-layer overlay rootfs with a
//! fresh upper and work dir, through the crate and as the bare system calls, in one run.
//!
//! Per iteration, timed: `mkdir` upper + `mkdir` work (new names every iteration), then
//! - `bare/N`: `mount(2)` with the option string the crate uses
//!   (`lowerdir=…,upperdir=…,workdir=…,index=off,redirect_dir=nofollow,metacopy=off,xino=off`)
//!   and `umount2(MNT_DETACH)`: the system calls and nothing else;
//! - `crate/N`: `OverlayMount::mount(&KernelOverlay::new(), spec)` with
//!   `options.fresh = true`, then `.unmount()` (validation, the mount API the kernel
//!   probe picked, the post-unmount check);
//! - `crate-legacy/N`, `crate-strings/N`: the same with `MountApi::Legacy` and
//!   `MountApi::LayerStrings` forced, for information.
//!
//! Removing the upper and work dirs afterwards is not timed, in every variant. Layers,
//! uppers and the target live on a tmpfs the bench mounts for itself (the strictest
//! setting: the mount's own cost is smallest there), or with `MOUNT_BENCH_DIR=dir` in a
//! temp dir under `dir`.
//!
//! After criterion's report, the A/B comparison quoted in BENCHMARKS.md: per layer
//! count, `MOUNT_BENCH_ROUNDS` (default 4000) rounds that each run every variant once,
//! in a rotating order, so that load from elsewhere on the machine hits all variants
//! alike; it prints each variant's median run and its ratio to `bare`
//! (`MOUNT_BENCH_ROUNDS=0` skips it; `--test`, `--list` and `--profile-time` runs skip it).
//!
//! Needs root: `sudo cargo bench --bench mount`. Before anything else the process moves
//! into a private mount namespace of its own (`unshare(CLONE_NEWNS)`, then `/` made
//! recursively private), so nothing it mounts is ever visible outside it. Not root: the
//! bench prints why it is skipped and exits 0 (under `CI` it fails instead).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use rootfs_cache::{KernelOverlay, MountApi, OverlayMount, OverlaySpec};

const LAYER_COUNTS: [usize; 2] = [1, 10];

/// The mount options the crate sets by default (`options::params` in src/mount/options.rs).
const OPTIONS: &str = "index=off,redirect_dir=nofollow,metacopy=off,xino=off";

/// 10 small layers, a target dir and a scratch dir for uppers/works, on a tmpfs of the
/// bench's own or, with `MOUNT_BENCH_DIR`, in a temp dir under that directory.
struct Fixture {
    /// Holds everything; its tmpfs is unmounted on drop.
    _dir: common::Scratch,
    lowers: Vec<PathBuf>,
    target: PathBuf,
    scratch: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = common::Scratch::new("MOUNT_BENCH_DIR", "size=256m,mode=0755");
        let root = dir.path();
        let lowers: Vec<PathBuf> = (0..LAYER_COUNTS[1]).map(|i| root.join(format!("l{i}"))).collect();
        for (i, l) in lowers.iter().enumerate() {
            std::fs::create_dir_all(l.join("etc")).unwrap();
            std::fs::create_dir_all(l.join(format!("usr/lib/pkg{i}"))).unwrap();
            std::fs::write(l.join(format!("etc/layer{i}")), format!("layer {i}\n")).unwrap();
            for f in 0..4 {
                std::fs::write(l.join(format!("usr/lib/pkg{i}/f{f}")), vec![b'x'; 100 * (f + 1)]).unwrap();
            }
        }
        let (target, scratch) = (root.join("t"), root.join("s"));
        std::fs::create_dir(&target).unwrap();
        std::fs::create_dir(&scratch).unwrap();
        Fixture { _dir: dir, lowers, target, scratch }
    }
}

/// One variant of the timed operation: `mkdir` upper and work, mount, unmount.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Crate(MountApi),
}

const VARIANTS: [(&str, Variant); 4] = [
    ("bare", Variant::Bare),
    ("crate", Variant::Crate(MountApi::Auto)),
    ("crate-legacy", Variant::Crate(MountApi::Legacy)),
    ("crate-strings", Variant::Crate(MountApi::LayerStrings)),
];

/// A variant set up for `n` lowers.
struct Op<'a> {
    fx: &'a Fixture,
    variant: Variant,
    lowers: &'a [PathBuf],
    /// `lowerdir=` value for `mount(2)`.
    lowerdir: String,
    backend: KernelOverlay,
}

impl<'a> Op<'a> {
    fn new(fx: &'a Fixture, variant: Variant, n: usize) -> Self {
        let lowers = &fx.lowers[..n];
        let lowerdir = lowers.iter().map(|l| l.to_str().unwrap()).collect::<Vec<_>>().join(":");
        let backend = match variant {
            Variant::Crate(MountApi::Auto) | Variant::Bare => KernelOverlay::new(),
            Variant::Crate(api) => KernelOverlay::with_api(api),
        };
        Op { fx, variant, lowers, lowerdir, backend }
    }

    /// One timed run with fresh upper/work names `u{i}`/`w{i}`; their removal afterwards
    /// is not timed.
    fn run(&self, i: u64) -> Duration {
        let (upper, work) = (self.fx.scratch.join(format!("u{i}")), self.fx.scratch.join(format!("w{i}")));
        let target = self.fx.target.as_path();
        // The bare variant's option string is built before the clock starts.
        let data = (self.variant == Variant::Bare).then(|| {
            format!("lowerdir={},upperdir={},workdir={},{OPTIONS}", self.lowerdir, upper.display(), work.display())
        });
        let t = Instant::now();
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&work).unwrap();
        match data {
            Some(data) => {
                mount(Some("overlay"), target, Some("overlay"), MsFlags::empty(), Some(data.as_str()))
                    .expect("mount(2) overlay");
                umount2(target, MntFlags::MNT_DETACH).expect("umount2");
            }
            None => {
                let mut spec = OverlaySpec::new(self.lowers.iter().cloned(), &upper, &work, target);
                spec.options.fresh = true;
                let m = OverlayMount::mount(&self.backend, spec).expect("crate mount");
                m.unmount().expect("crate unmount");
            }
        }
        let d = t.elapsed();
        std::fs::remove_dir_all(&upper).unwrap();
        std::fs::remove_dir_all(&work).unwrap();
        d
    }
}

fn bench(c: &mut Criterion, fx: &Fixture) {
    let mut g = c.benchmark_group("mount_umount");
    g.measurement_time(Duration::from_secs(10));
    for n in LAYER_COUNTS {
        for (name, variant) in VARIANTS {
            let op = Op::new(fx, variant, n);
            g.bench_function(BenchmarkId::new(name, n), |b| b.iter_custom(|iters| (0..iters).map(|i| op.run(i)).sum()));
        }
    }
    g.finish();
}

fn median_ms(v: &mut [Duration]) -> f64 {
    v.sort_unstable();
    let m = v.len() / 2;
    let d = if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2 };
    d.as_secs_f64() * 1e3
}

/// The A/B comparison: `rounds` rounds per layer count, each round running every variant
/// once (in an order rotated every round), so that drift from other load on the machine
/// hits all variants alike. Prints the median of each variant's runs and its ratio to
/// `bare`.
fn interleaved(fx: &Fixture, rounds: u64) {
    println!("\nmount + umount with fresh upper/work, variants interleaved, {rounds} runs each:");
    println!("median per run (ratio to bare)");
    let header: Vec<String> = VARIANTS.iter().map(|(name, _)| format!("{name:>20}")).collect();
    println!("{:<7}{}", "lowers", header.join(""));
    for n in LAYER_COUNTS {
        let ops: Vec<Op<'_>> = VARIANTS.iter().map(|&(_, v)| Op::new(fx, v, n)).collect();
        let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds as usize); ops.len()];
        for r in 0..rounds {
            for k in 0..ops.len() {
                let j = (k + r as usize) % ops.len();
                times[j].push(ops[j].run(r));
            }
        }
        let medians: Vec<f64> = times.iter_mut().map(|t| median_ms(t)).collect();
        let cells: Vec<String> = medians
            .iter()
            .enumerate()
            .map(|(j, m)| {
                let cell = if j == 0 { format!("{m:.3} ms") } else { format!("{m:.3} ms ({:.2}x)", m / medians[0]) };
                format!("{cell:>20}")
            })
            .collect();
        println!("{n:<7}{}", cells.join(""));
    }
}

fn main() {
    if !common::require_root("mount") {
        return;
    }
    common::private_namespace();
    let fx = Fixture::new();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &fx);
    c.final_summary();
    // The interleaved comparison only in a real bench run (`cargo bench` passes --bench),
    // not under `--test`/`--list`; MOUNT_BENCH_ROUNDS=0 skips it.
    let args: Vec<String> = std::env::args().collect();
    let real = args.iter().any(|a| a == "--bench")
        && !args.iter().any(|a| a == "--test" || a == "--list" || a.starts_with("--profile-time"));
    let rounds = std::env::var("MOUNT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    if real && rounds > 0 {
        interleaved(&fx, rounds);
    }
}
