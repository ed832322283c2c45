//! `RootfsCache` against real directories, threads and processes: hit/miss accounting,
//! dedup and eviction under 32 threads, SIGKILL during extraction and eviction, fetch and
//! extraction failures (digest, truncation, read errors, full disk), `Busy`, recovery of
//! a damaged directory at open, persisted leases and LRU order.
//!
//! The crash tests re-execute this test binary (`crash_child`, a no-op unless
//! `ROOTFS_CACHE_TEST_CHILD` is set). Randomised tests print their seed; replay one with
//! `CACHE_TEST_SEED=<n>`.

mod cache_support;

#[path = "common/tmpfs.rs"]
mod tmpfs;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tmpfs::with_small_tmpfs;

use cache_support::{
    Comp, Fault, Gate, Rng, TestFetcher, TestLayer, disk_usage, layer, names, require_root, require_tool, seed,
    snapshot, tree_diff,
};
use rootfs_cache::{CacheOptions, Digest, Error, Rootfs, RootfsCache};

// ---------------------------------------------------------------------------------------
// Helpers

fn opts(max_bytes: u64) -> CacheOptions {
    let mut o = CacheOptions::default();
    o.max_bytes = max_bytes;
    o
}

fn layer_dir(root: &Path, d: &Digest) -> PathBuf {
    root.join("layers").join(d.hex())
}

fn layer_fs(root: &Path, d: &Digest) -> PathBuf {
    layer_dir(root, d).join("fs")
}

fn hexes(layers: &[&TestLayer]) -> BTreeSet<String> {
    layers.iter().map(|l| l.desc.digest.hex()).collect()
}

fn empty() -> BTreeSet<String> {
    BTreeSet::new()
}

/// `r` is exactly `layers` (bottom first): digests, lower paths (top first) and the
/// content of every lower.
fn check_rootfs(root: &Path, r: &Rootfs, layers: &[&TestLayer]) {
    let want: Vec<Digest> = layers.iter().map(|l| l.desc.digest).collect();
    assert_eq!(r.layers(), &want[..]);
    assert_eq!(r.lowers().len(), layers.len());
    for (lower, l) in r.lowers().iter().zip(layers.iter().rev()) {
        assert_eq!(lower, &layer_fs(root, &l.desc.digest));
        check_tree(lower, l);
    }
}

fn check_tree(dir: &Path, l: &TestLayer) {
    let snap = snapshot(dir).unwrap_or_else(|e| panic!("snapshot {}: {e}", dir.display()));
    if let Some(d) = tree_diff(&snap, &l.tree) {
        panic!("layer {} at {}: {d}", l.desc.digest, dir.display());
    }
}

/// The layer digests an image record file lists.
fn record_layers(path: &Path) -> Vec<Digest> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().filter_map(|l| l.strip_prefix("layer ")).map(|d| d.parse().unwrap()).collect()
}

/// The on-disk invariants of a cache nobody is writing to: `tmp/` and `trash/` empty,
/// every `layers/` entry a known layer, complete (exact tree) and with a `meta`, every
/// image record naming only present layers, and the cache's view equal to the disk's.
fn check_quiescent(cache: &RootfsCache, known: &HashMap<Digest, &TestLayer>) {
    let root = cache.path();
    assert_eq!(names(&root.join("tmp")), empty(), "tmp/ not empty");
    assert_eq!(names(&root.join("trash")), empty(), "trash/ not empty");
    let on_disk = names(&root.join("layers"));
    for name in &on_disk {
        let d = Digest::from_hex(name).unwrap_or_else(|_| panic!("layers/{name} is not a digest"));
        let l = known.get(&d).unwrap_or_else(|| panic!("layers/{name} is not a layer of the test"));
        assert!(layer_dir(root, &d).join("meta").is_file(), "layers/{name}/meta missing");
        check_tree(&layer_fs(root, &d), l);
    }
    let listed: BTreeSet<String> = cache.layers().iter().map(|(d, _, _)| d.hex()).collect();
    assert_eq!(listed, on_disk, "RootfsCache::layers() vs layers/");
    for name in names(&root.join("images")) {
        assert!(Digest::from_hex(&name).is_ok(), "images/{name}: not a digest");
        for d in record_layers(&root.join("images").join(&name)) {
            assert!(on_disk.contains(&d.hex()), "images/{name} names missing layer {d}");
        }
    }
    for (d, size, _) in cache.layers() {
        assert_eq!(size, disk_usage(&layer_fs(root, &d)), "recorded size of {d}");
    }
    let s = cache.stats();
    let sizes: u64 = cache.layers().iter().map(|(_, size, _)| size).sum();
    assert_eq!(s.bytes_in_use, sizes);
    assert_eq!(s.entries, on_disk.len() as u64);
}

fn known<'a>(layers: impl IntoIterator<Item = &'a TestLayer>) -> HashMap<Digest, &'a TestLayer> {
    layers.into_iter().map(|l| (l.desc.digest, l)).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Hits, misses and fetcher calls

#[test]
fn hit_miss_accounting_and_fetcher_calls() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let l0 = layer(1, 3, 10_000, Comp::None);
    let l1 = layer(2, 2, 20_000, Comp::Gzip);
    let l2 = layer(3, 2, 5_000, Comp::Zstd);
    let l3 = layer(4, 1, 1_000, Comp::None);
    let mut f = TestFetcher::new();
    let x = f.image("x", &[&l0, &l1, &l2]);
    let y = f.image("y", &[&l0, &l3]);
    let z = f.image("z", &[&l3]);

    let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.extractions, s.entries, s.bytes_in_use), (0, 0, 0, 0, 0));

    // Unknown tag: the fetcher's error, nothing else happens.
    let err = cache.ensure(&f, "nope").unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    assert_eq!(f.calls(), (1, 0));

    // Cold tag: one resolve, one open per layer.
    let rx = cache.ensure(&f, "x").unwrap();
    check_rootfs(root, &rx, &[&l0, &l1, &l2]);
    assert_eq!(rx.manifest_digest(), x);
    assert_eq!(f.resolves(), 2);
    for l in [&l0, &l1, &l2] {
        assert_eq!(f.opens_of(&l.desc.digest), 1);
    }
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.extractions, s.evictions, s.dedup_waits), (0, 3, 3, 0, 0));
    assert_eq!(s.bytes_extracted, l0.desc.size + l1.desc.size + l2.desc.size, "compressed bytes read");
    assert_eq!((s.entries, s.leased_entries, s.over_budget_bytes), (3, 3, 0));
    let du: u64 = [&l0, &l1, &l2].iter().map(|l| disk_usage(&layer_fs(root, &l.desc.digest))).sum();
    assert_eq!(s.bytes_in_use, du, "bytes_in_use is the disk usage of the layers' fs/");
    for (d, size, leased) in cache.layers() {
        assert_eq!(size, disk_usage(&layer_fs(root, &d)));
        assert!(leased);
    }

    // A second image sharing the bottom layer: only its own layer is opened, the shared
    // one is stored once and served from the same directory.
    let ry = cache.ensure(&f, "y").unwrap();
    check_rootfs(root, &ry, &[&l0, &l3]);
    assert_eq!(f.resolves(), 3);
    assert_eq!(f.opens_of(&l0.desc.digest), 1, "a present layer is never opened");
    assert_eq!(f.opens_of(&l3.desc.digest), 1);
    assert_eq!(ry.lowers()[1], rx.lowers()[2]);
    assert_eq!(names(&root.join("layers")), hexes(&[&l0, &l1, &l2, &l3]));
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.extractions, s.entries, s.leased_entries), (1, 4, 4, 4, 4));

    // Digest references of a cached image (with and without '@'): no fetcher call at all.
    let calls = f.calls();
    let rx2 = cache.ensure(&f, &format!("@{x}")).unwrap();
    let rx3 = cache.ensure(&f, &x.to_string()).unwrap();
    assert_eq!(f.calls(), calls, "digest hit must not call the fetcher");
    assert_eq!(rx2.lowers(), rx.lowers());
    assert_eq!(rx3.lowers(), rx.lowers());
    assert_eq!(cache.stats().hits, 1 + 3 + 3);

    // A tag is always resolved, but nothing is opened.
    let rx4 = cache.ensure(&f, "x").unwrap();
    assert_eq!(f.calls(), (calls.0 + 1, calls.1));
    assert_eq!(cache.stats().hits, 10);

    // A digest reference of an image not seen yet: resolved, its (present) layer reused.
    let rz = cache.ensure(&f, &format!("@{z}")).unwrap();
    check_rootfs(root, &rz, &[&l3]);
    assert_eq!(f.calls(), (calls.0 + 2, calls.1));
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.extractions), (11, 4, 4));
    assert_eq!(s.hits + s.misses, 3 + 2 + 3 + 3 + 3 + 1, "one hit or miss per layer asked for");

    // Leases follow the live Rootfs values.
    drop(ry);
    assert_eq!(cache.stats().leased_entries, 4, "l3 is still leased by rz");
    drop(rz);
    assert_eq!(cache.stats().leased_entries, 3);
    drop((rx, rx2, rx3));
    assert_eq!(cache.stats().leased_entries, 3, "rx4 still holds x");
    drop(rx4);
    let s = cache.stats();
    assert_eq!(
        (s.leased_entries, s.entries, s.bytes_in_use),
        (0, 4, du + disk_usage(&layer_fs(root, &l3.desc.digest)))
    );
    check_quiescent(&cache, &known([&l0, &l1, &l2, &l3]));
    drop(cache);

    // Reopened: counters restart, gauges are reloaded, digest hits stay free.
    let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
    let s2 = cache.stats();
    assert_eq!((s2.hits, s2.misses, s2.extractions), (0, 0, 0));
    assert_eq!((s2.entries, s2.bytes_in_use, s2.leased_entries), (4, s.bytes_in_use, 0));
    let calls = f.calls();
    let rs: Vec<Rootfs> = [x, y, z].iter().map(|d| cache.ensure(&f, &format!("@{d}")).unwrap()).collect();
    assert_eq!(f.calls(), calls);
    check_rootfs(root, &rs[1], &[&l0, &l3]);
    assert_eq!(cache.stats().hits, 3 + 2 + 1);
    assert_eq!(cache.stats().leased_entries, 4);
}

/// A digest reference naming an index (which the fetcher resolves to a manifest): the
/// first ensure resolves it, later ones are free hits, and every `Rootfs` names the
/// manifest it resolved to.
#[test]
fn index_digest_reference_is_a_free_hit_naming_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let l0 = layer(10, 2, 3000, Comp::None);
    let mut f = TestFetcher::new();
    let x = f.image("x", &[&l0]);
    let index = Digest::of(b"an image index pointing at x");
    f.alias(&format!("@{index}"), "x");
    let mut o = CacheOptions::default();
    o.sync = true; // syncfs before publishing: same results
    let cache = RootfsCache::open(dir.path(), o).unwrap();

    let r1 = cache.ensure(&f, &format!("@{index}")).unwrap();
    assert_eq!(f.calls(), (1, 1));
    check_rootfs(dir.path(), &r1, &[&l0]);
    assert_eq!(r1.manifest_digest(), x);

    let r2 = cache.ensure(&f, &format!("@{index}")).unwrap();
    assert_eq!(f.calls(), (1, 1), "a cached index digest must not call the fetcher");
    check_rootfs(dir.path(), &r2, &[&l0]);
    let r3 = cache.ensure(&f, &format!("@{x}")).unwrap();
    assert_eq!(f.calls(), (1, 1), "the manifest digest was recorded too");
    assert_eq!(r3.manifest_digest(), x);
    assert_eq!(r2.manifest_digest(), x, "Rootfs::manifest_digest must be the manifest's, not the index's");
}

// ---------------------------------------------------------------------------------------
// 2. Concurrency: dedup and eviction under 32 threads

struct Pool {
    layers: Vec<TestLayer>,
    /// (tag, manifest digest, layer indices bottom first)
    images: Vec<(String, Digest, Vec<usize>)>,
}

/// 12 layers of ~260 KiB (4 files of 64 KiB), 8 images of 2-3 layers sharing them.
fn pool() -> Pool {
    let layers: Vec<TestLayer> = (0..12).map(|i| layer(100 + i, 4, 64 * 1024, Comp::None)).collect();
    let images = (0..8)
        .map(|k| {
            let mut idx = vec![k % 3, 3 + k];
            if k % 2 == 1 {
                idx.push(11);
            }
            (format!("img{k}"), Digest::from_hex(&"0".repeat(64)).unwrap(), idx)
        })
        .collect();
    Pool { layers, images }
}

fn pool_fetcher(p: &mut Pool, slow: Option<Duration>) -> TestFetcher {
    let mut f = TestFetcher::new();
    f.slow = slow;
    for (tag, digest, idx) in &mut p.images {
        let ls: Vec<&TestLayer> = idx.iter().map(|&i| &p.layers[i]).collect();
        *digest = f.image(tag, &ls);
    }
    f
}

/// `threads` threads × `iters` ensures of random images (every thread's first one is
/// `img0`, right after a barrier, to force overlapping extractions). Each checks the
/// full content of every lower while it holds the `Rootfs`. Returns the number of layers
/// asked for.
fn workload(cache: &RootfsCache, f: &TestFetcher, p: &Pool, threads: u64, iters: usize, seed: u64) -> u64 {
    let barrier = Barrier::new(threads as usize);
    let requests = AtomicU64::new(0);
    let root = cache.path();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, requests) = (&barrier, &requests);
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (t << 40));
                barrier.wait();
                for it in 0..iters {
                    let k = if it == 0 { 0 } else { rng.below(p.images.len() as u64) as usize };
                    let (tag, digest, idx) = &p.images[k];
                    let reference = if rng.below(2) == 0 { tag.clone() } else { format!("@{digest}") };
                    let r = cache.ensure(f, &reference).unwrap_or_else(|e| panic!("thread {t}: ensure {tag}: {e}"));
                    requests.fetch_add(idx.len() as u64, Ordering::Relaxed);
                    let ls: Vec<&TestLayer> = idx.iter().map(|&i| &p.layers[i]).collect();
                    check_rootfs(root, &r, &ls);
                    std::thread::sleep(Duration::from_micros(rng.below(2000)));
                    // Still there after the hold: nothing leased was evicted meanwhile.
                    for (lower, l) in r.lowers().iter().zip(ls.iter().rev()) {
                        check_tree(lower, l);
                    }
                    drop(r);
                }
            });
        }
    });
    requests.into_inner()
}

#[test]
fn concurrent_ensure_tight_budget_never_evicts_leased_and_dedups() {
    let seed = seed("concurrent_ensure_tight_budget");
    let mut p = pool();
    let f = pool_fetcher(&mut p, Some(Duration::from_millis(1)));
    let dir = tempfile::tempdir().unwrap();
    // Room for about 4 of the 12 layers.
    let budget = 4 * 290 * 1024;
    let cache = RootfsCache::open(dir.path(), opts(budget)).unwrap();
    let t0 = Instant::now();
    // Eviction passes also run beside the workload, not only after extractions: a cold
    // ensure extracts an image's layers in parallel, so the extractions (and the passes
    // after them) are over before most layers are ever unleased.
    let done = std::sync::atomic::AtomicBool::new(false);
    let requests = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                cache.gc().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let requests = workload(&cache, &f, &p, 32, 8, seed);
        done.store(true, Ordering::Relaxed);
        requests
    });
    eprintln!("tight budget: {:?}, {:?}", t0.elapsed(), cache.stats());

    let s = cache.stats();
    assert_eq!(f.max_concurrent_readers(), 1, "two extractions of the same layer ran at once");
    assert_eq!(f.opens() as u64, s.extractions, "every open_blob became one extraction");
    assert!(s.evictions > 0, "the budget should have forced evictions: {s:?}");
    assert_eq!(s.extractions - s.evictions, s.entries, "{s:?}");
    let blob_bytes: u64 = f
        .opens_map()
        .iter()
        .map(|(d, n)| *n as u64 * p.layers.iter().find(|l| l.desc.digest == *d).unwrap().desc.size)
        .sum();
    assert_eq!(s.bytes_extracted, blob_bytes);
    assert_eq!(s.hits + s.misses, requests, "one hit or miss per layer asked for: {s:?}");
    assert!(s.extractions <= s.misses && s.misses <= s.extractions + s.dedup_waits, "{s:?}");
    assert_eq!(s.leased_entries, 0);

    let rep = cache.gc().unwrap();
    let s = cache.stats();
    assert!(rep.bytes_in_use <= budget, "{rep:?}");
    assert_eq!(rep.over_budget_bytes, 0);
    assert_eq!((s.bytes_in_use, s.over_budget_bytes), (rep.bytes_in_use, 0));
    assert_eq!(s.extractions - s.evictions, s.entries, "{s:?}");
    check_quiescent(&cache, &known(&p.layers));
}

#[test]
fn concurrent_ensure_unlimited_extracts_each_layer_once() {
    let seed = seed("concurrent_ensure_unlimited");
    let mut p = pool();
    let f = pool_fetcher(&mut p, Some(Duration::from_millis(1)));
    let dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::open(dir.path(), CacheOptions::default()).unwrap();
    let t0 = Instant::now();
    let requests = workload(&cache, &f, &p, 32, 8, seed);
    eprintln!("unlimited: {:?}, {:?}", t0.elapsed(), cache.stats());

    let s = cache.stats();
    let opens = f.opens_map();
    assert!(opens.values().all(|&n| n == 1), "a layer was extracted twice: {opens:?}");
    assert_eq!(opens.len(), p.layers.len(), "every layer is used by 256 random picks");
    assert_eq!(s.extractions, opens.len() as u64);
    assert_eq!(s.entries, opens.len() as u64);
    assert_eq!(s.evictions, 0);
    assert_eq!(s.misses, s.extractions + s.dedup_waits, "{s:?}");
    assert!(s.dedup_waits > 0, "32 threads starting on img0 together must wait for each other: {s:?}");
    assert_eq!(s.hits + s.misses, requests);
    assert_eq!(s.leased_entries, 0);
    check_quiescent(&cache, &known(&p.layers));
}

// ---------------------------------------------------------------------------------------
// 3. Crash safety: SIGKILL a child process during extraction and eviction

const CHILD_MODE: &str = "ROOTFS_CACHE_TEST_CHILD";
const CHILD_DIR: &str = "ROOTFS_CACHE_TEST_CHILD_DIR";
const READY: &str = "CRASH-CHILD-READY";

/// (layers, fetcher, (tag, layer indices) per image, the child's budget)
type CrashSetup = (Vec<TestLayer>, TestFetcher, Vec<(String, Vec<usize>)>, u64);

/// The images of a crash test (identical in parent and child) and the child's budget.
/// `extract`: one image of 4 layers (mixed compression), budget 0. `evict`: 4 images of
/// 2 layers of ~420 KiB in 16 files, budget for about 3 layers.
fn crash_setup(mode: &str) -> CrashSetup {
    let mut f = TestFetcher::new();
    match mode {
        "extract" => {
            let comps = [Comp::None, Comp::Gzip, Comp::Zstd, Comp::None];
            let layers: Vec<TestLayer> = (0..4).map(|i| layer(500 + i, 16, 24 * 1024, comps[i as usize])).collect();
            f.image("img", &layers.iter().collect::<Vec<_>>());
            (layers, f, vec![("img".into(), vec![0, 1, 2, 3])], 0)
        }
        "evict" => {
            let layers: Vec<TestLayer> = (0..8).map(|i| layer(600 + i, 16, 24 * 1024, Comp::None)).collect();
            let images: Vec<(String, Vec<usize>)> =
                (0..4).map(|k| (format!("big{k}"), vec![2 * k, 2 * k + 1])).collect();
            for (tag, idx) in &images {
                f.image(tag, &idx.iter().map(|&i| &layers[i]).collect::<Vec<_>>());
            }
            (layers, f, images, 1300 * 1024)
        }
        m => panic!("unknown crash mode {m}"),
    }
}

/// Runs only when re-executed by the `crash_*` tests. Opens the cache, prints `READY`,
/// then until killed: `extract` mode ensures its image, drops it and evicts everything
/// (budget 0); `evict` mode first evicts most of what the parent left (a full cache, a
/// budget for about 3 layers), then ensures the big images in a row, each extraction
/// evicting the previous image's layers.
#[test]
fn crash_child() {
    let Ok(mode) = std::env::var(CHILD_MODE) else { return };
    let dir = PathBuf::from(std::env::var_os(CHILD_DIR).expect("child dir"));
    let (_layers, mut f, images, budget) = crash_setup(&mode);
    if mode == "extract" {
        // Slow blobs: most kills land mid-extraction.
        f.slow = Some(Duration::from_millis(1));
    }
    let cache = RootfsCache::open(&dir, opts(budget)).expect("child: open");
    println!("\n{READY}");
    if mode == "evict" {
        cache.gc().expect("child: gc");
    }
    let start = Instant::now();
    for i in 0.. {
        let r = cache.ensure(&f, &images[i % images.len()].0).expect("child: ensure");
        drop(r);
        if mode == "extract" {
            cache.gc().expect("child: gc");
        }
        if start.elapsed() > Duration::from_secs(30) {
            // Never outlive a parent that failed to kill us.
            std::process::exit(3);
        }
    }
}

/// Kills and reaps a child we started if the test fails before it does.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn crash_iterations(mode: &str, iterations: usize) {
    let seed = seed(&format!("crash_{mode}"));
    let mut rng = Rng::new(seed);
    let (layers, f, images, _) = crash_setup(mode);
    let known = known(&layers);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let exe = std::env::current_exe().unwrap();
    let (mut tmp_leftovers, mut trash_leftovers, mut partial) = (0, 0, 0);
    for it in 0..iterations {
        let child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_MODE, mode)
            .env(CHILD_DIR, root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut child = Reaper(child);
        let mut out = BufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).unwrap();
            assert!(n > 0, "iteration {it}: child exited before READY: {:?}", child.0.wait());
            if line.contains(READY) {
                break;
            }
        }
        let delay = rng.below(151);
        std::thread::sleep(Duration::from_millis(delay));
        if mode == "evict" && it % 2 == 0 {
            // Aim at an eviction (every other time): kill as soon as something is in trash/.
            let deadline = Instant::now() + Duration::from_secs(2);
            while names(&root.join("trash")).is_empty() && Instant::now() < deadline {
                std::hint::spin_loop();
            }
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        let status = child.0.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "iteration {it}: child ended on its own: {status}");

        tmp_leftovers += usize::from(!names(&root.join("tmp")).is_empty());
        trash_leftovers += usize::from(!names(&root.join("trash")).is_empty());
        let cache = RootfsCache::open(root, CacheOptions::default())
            .unwrap_or_else(|e| panic!("iteration {it} (killed after {delay} ms): open: {e}"));
        check_quiescent(&cache, &known);
        // Every image works again, with the right content (and the cache is full for the
        // next child).
        for (tag, idx) in &images {
            let ls: Vec<&TestLayer> = idx.iter().map(|&i| &layers[i]).collect();
            partial += usize::from(ls.iter().any(|l| !layer_dir(root, &l.desc.digest).exists()));
            let r = cache.ensure(&f, tag).unwrap_or_else(|e| panic!("iteration {it}: ensure after crash: {e}"));
            check_rootfs(root, &r, &ls);
        }
        drop(cache);
    }
    eprintln!(
        "crash_{mode}: {iterations} kills; tmp/ had leftovers {tmp_leftovers} times, trash/ {trash_leftovers}, \
         images incomplete {partial}"
    );
    assert!(tmp_leftovers + trash_leftovers > 0, "no kill landed during an extraction or eviction");
}

#[test]
fn crash_during_extraction_leaves_a_consistent_cache() {
    crash_iterations("extract", 20);
}

#[test]
fn crash_during_eviction_leaves_a_consistent_cache() {
    crash_iterations("evict", 20);
}

// ---------------------------------------------------------------------------------------
// 4. Failures

/// After a failed ensure: the error names `bad`, no entry for it, nothing in `tmp/`, no
/// lease left, and the cache works once the fetcher is fixed.
fn check_failure_then_recovery(fault: Fault, bad_comp: Comp, root_ok: impl Fn(&Error) -> bool) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = layer(200, 2, 4096, Comp::None);
    let bad = layer(201, 6, 32 * 1024, bad_comp);
    let mut f = TestFetcher::new();
    f.image("img", &[&good, &bad]);
    let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
    f.fault(bad.desc.digest, fault, false);

    let err = cache.ensure(&f, "img").unwrap_err();
    match &err {
        Error::Layer { digest, .. } => assert_eq!(*digest, bad.desc.digest, "{err}"),
        e => panic!("expected Error::Layer, got {e:?}"),
    }
    assert!(root_ok(err.root()), "unexpected cause: {:?}", err.root());
    assert_eq!(names(&root.join("layers")), hexes(&[&good]), "only the good layer is ready");
    assert_eq!(names(&root.join("tmp")), empty(), "tmp/ not cleaned after a failure");
    assert_eq!(names(&root.join("images")), empty());
    let s = cache.stats();
    assert_eq!((s.extractions, s.entries, s.leased_entries), (1, 1, 0), "{s:?}");

    // Still failing: retried (not cached), same kind of error.
    let err2 = cache.ensure(&f, "img").unwrap_err();
    assert!(root_ok(err2.root()), "{err2:?}");
    assert_eq!(f.opens_of(&bad.desc.digest), 2, "a failure must not be cached");
    assert_eq!(f.opens_of(&good.desc.digest), 1);

    f.clear_faults();
    let r = cache.ensure(&f, "img").unwrap();
    check_rootfs(root, &r, &[&good, &bad]);
    drop(r);
    check_quiescent(&cache, &known([&good, &bad]));
}

#[test]
fn digest_mismatch_is_a_layer_error_and_nothing_is_cached() {
    let other = layer(299, 6, 32 * 1024, Comp::None);
    check_failure_then_recovery(
        Fault::Bytes(other.blob.to_vec()),
        Comp::None,
        |e| matches!(e, Error::DigestMismatch { found, .. } if *found == other.desc.digest),
    );
}

#[test]
fn truncated_blob_is_a_layer_error() {
    for comp in [Comp::None, Comp::Gzip, Comp::Zstd] {
        let len = layer(201, 6, 32 * 1024, comp).blob.len();
        check_failure_then_recovery(Fault::Truncate(len / 2), comp, |e| {
            matches!(e, Error::InvalidArchive { .. } | Error::DigestMismatch { .. } | Error::Read { .. })
        });
    }
    // Cut exactly before the end-of-archive blocks: a tar reader may accept the rest, the
    // digest must not.
    let len = layer(201, 6, 32 * 1024, Comp::None).blob.len();
    check_failure_then_recovery(Fault::Truncate(len - 1024), Comp::None, |e| {
        matches!(e, Error::DigestMismatch { .. } | Error::InvalidArchive { .. })
    });
}

#[test]
fn reader_error_mid_stream_is_a_layer_error() {
    let len = layer(201, 6, 32 * 1024, Comp::Gzip).blob.len();
    check_failure_then_recovery(
        Fault::FailAfter(len / 2, None),
        Comp::Gzip,
        |e| matches!(e, Error::Read { source, .. } if source.to_string().contains("connection reset")),
    );
}

#[test]
fn open_blob_error_is_a_layer_error() {
    check_failure_then_recovery(
        Fault::Open,
        Comp::None,
        |e| matches!(e, Error::NotFound { what } if what.contains("injected")),
    );
}

#[test]
fn concurrent_waiters_on_a_failed_extraction_all_fail_and_the_failure_is_not_cached() {
    const N: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let big = layer(210, 8, 64 * 1024, Comp::None);
    let mut f = TestFetcher::new();
    f.slow = Some(Duration::from_millis(1));
    f.image("w", &[&big]);
    let cache = Arc::new(RootfsCache::open(&root, CacheOptions::default()).unwrap());
    // The reader fails half-way, once, but only when every other caller is waiting.
    let c = cache.clone();
    let gate: Gate = Arc::new(move || c.stats().dedup_waits >= N as u64 - 1);
    f.fault(big.desc.digest, Fault::FailAfter(big.blob.len() / 2, Some(gate)), true);

    let barrier = Barrier::new(N);
    let errors: Vec<Error> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..N)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    cache.ensure(&f, "w").map(drop)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().expect_err("every caller must fail")).collect()
    });
    for e in &errors {
        assert!(matches!(e, Error::Layer { digest, .. } if *digest == big.desc.digest), "{e:?}");
        assert!(matches!(e.root(), Error::Read { .. }), "{e:?}");
        assert_eq!(e.to_string(), errors[0].to_string(), "every waiter gets the same error");
    }
    let s = cache.stats();
    assert_eq!(f.opens_of(&big.desc.digest), 1, "one extraction for all callers");
    assert_eq!(
        (s.misses, s.dedup_waits, s.extractions, s.entries, s.leased_entries),
        (N as u64, N as u64 - 1, 0, 0, 0)
    );
    assert_eq!(names(&root.join("layers")), empty());
    assert_eq!(names(&root.join("tmp")), empty());

    // Not cached: the next call fetches again, and succeeds.
    let r = cache.ensure(&f, "w").unwrap();
    check_rootfs(&root, &r, &[&big]);
    assert_eq!(f.opens_of(&big.desc.digest), 2);
    drop(r);
    check_quiescent(&cache, &known([&big]));
}

#[test]
fn full_disk_is_enospc_without_a_partial_layer() {
    if !require_root("full_disk_is_enospc_without_a_partial_layer") {
        return;
    }
    let medium = layer(220, 3, 256 * 1024, Comp::None);
    let big = layer(221, 12, 256 * 1024, Comp::Gzip);
    let small = layer(222, 2, 1024, Comp::None);
    let mut f = TestFetcher::new();
    f.image("medium", &[&medium]);
    f.image("big", &[&big]);
    f.image("small", &[&small]);
    let t = tempfile::tempdir().unwrap();
    with_small_tmpfs(t.path(), "2m", || {
        let root = t.path().join("cache");
        let cache = RootfsCache::open(&root, opts(256 * 1024)).unwrap();
        let rm = cache.ensure(&f, "medium").unwrap();
        check_rootfs(&root, &rm, &[&medium]);

        let err = cache.ensure(&f, "big").unwrap_err();
        assert!(matches!(err, Error::Layer { digest, .. } if digest == big.desc.digest), "{err:?}");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert_eq!(names(&root.join("layers")), hexes(&[&medium]), "no partial layer");
        assert_eq!(names(&root.join("tmp")), empty(), "tmp/ cleaned after ENOSPC");
        assert_eq!(cache.stats().entries, 1);

        // Free the space: drop the lease, collect, and the cache works again.
        drop(rm);
        let rep = cache.gc().unwrap();
        assert_eq!(rep.evicted, vec![medium.desc.digest]);
        let rs = cache.ensure(&f, "small").unwrap();
        check_rootfs(&root, &rs, &[&small]);
        let rm = cache.ensure(&f, "medium").unwrap();
        check_rootfs(&root, &rm, &[&medium]);
        drop((rs, rm));
        check_quiescent(&cache, &known([&medium, &big, &small]));
    });
}

// ---------------------------------------------------------------------------------------
// 5. Busy

#[test]
fn second_owner_is_busy_in_process_and_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let lock = root.join("LOCK");
    let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
    let err = RootfsCache::open(root, CacheOptions::default()).err().expect("second open must fail");
    assert!(matches!(&err, Error::Busy { path, pid: Some(p) } if path == root && *p == std::process::id()), "{err:?}");
    assert!(err.to_string().contains(root.to_str().unwrap()), "{err}");

    let have_flock = require_tool("second_owner_is_busy (flock part)", "flock");
    if have_flock {
        let st = Command::new("flock").arg("-n").arg(&lock).arg("true").status().unwrap();
        assert!(!st.success(), "flock -n must fail while the cache is open: {st}");
    }
    drop(cache);
    if have_flock {
        let st = Command::new("flock").arg("-n").arg(&lock).arg("true").status().unwrap();
        assert!(st.success(), "flock -n must succeed once the cache is dropped: {st}");

        // Another process holding the lock: open is Busy until it lets go.
        let child = Command::new("flock")
            .arg("-n")
            .arg(&lock)
            .args(["-c", "echo locked; read x; exit 0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Reaper(child);
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        assert!(matches!(RootfsCache::open(root, CacheOptions::default()), Err(Error::Busy { .. })));
        drop(child.0.stdin.take()); // `read` sees EOF; the shell and flock exit
        assert!(child.0.wait().unwrap().success());
    }
    RootfsCache::open(root, CacheOptions::default()).expect("open after every owner is gone");
}

// ---------------------------------------------------------------------------------------
// 6. Recovery at open

#[test]
fn open_discards_junk_and_invalid_entries_and_keeps_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("canary"), "alive").unwrap();

    let g0 = layer(300, 2, 3000, Comp::None);
    let g1 = layer(301, 2, 3000, Comp::Gzip);
    let p: Vec<TestLayer> = (0..5).map(|i| layer(310 + i, 2, 2000, Comp::None)).collect();
    let mut f = TestFetcher::new();
    let good = f.image("good", &[&g0, &g1]);
    let w = f.image("w", &p.iter().collect::<Vec<_>>());
    {
        let cache = RootfsCache::open(&root, CacheOptions::default()).unwrap();
        let r = cache.ensure(&f, "good").unwrap();
        r.persist("keep").unwrap();
    }
    let valid_meta = std::fs::read_to_string(layer_dir(&root, &g0.desc.digest).join("meta")).unwrap();
    let plant = |rel: &str, contents: &str| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    };
    let hx = |i: usize| p[i].desc.digest.hex();
    // Layers of image `w` planted with wrong content, each damaged in another way.
    plant(&format!("layers/{}/fs/planted", hx(0)), "no meta");
    plant(&format!("layers/{}/fs/planted", hx(1)), "corrupt meta");
    plant(&format!("layers/{}/meta", hx(1)), "size lots\n");
    plant(&format!("layers/{}/meta", hx(2)), &valid_meta); // no fs/
    plant(&format!("layers/{}", hx(3)), "a file, not a directory");
    plant(&format!("layers/{}/fs/planted", hx(4)), "empty meta");
    plant(&format!("layers/{}/meta", hx(4)), "");
    // Not digests at all (upper case is not a spelling the cache uses).
    plant("layers/not-a-digest/fs/planted", "x");
    plant("layers/not-a-digest/meta", &valid_meta);
    let upper = g0.desc.digest.hex().to_uppercase();
    plant(&format!("layers/{upper}/fs/planted"), "x");
    plant(&format!("layers/{upper}/meta"), &valid_meta);
    // Leftovers of crashes, including symlinks out of the cache that must not be followed.
    plant("tmp/abc.0/fs/a/b/c", "partial");
    plant("tmp/loose", "x");
    plant("trash/def.1/fs/x", "doomed");
    std::os::unix::fs::symlink(&outside, root.join("tmp/escape")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("trash/escape")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("tmp/abc.0/fs/a/escape")).unwrap();
    // Image records: one naming the damaged layers, one naming a layer that never existed,
    // garbage, a leftover temporary file.
    let w_record: String = p.iter().map(|l| format!("layer {}\n", l.desc.digest)).collect();
    plant(&format!("images/{}", w.hex()), &w_record);
    plant(&format!("images/{}", Digest::of(b"ghost").hex()), &format!("layer {}\n", Digest::of(b"nothing")));
    plant(&format!("images/{}", Digest::of(b"garbage").hex()), "nonsense");
    plant(&format!("images/.{}.tmp", good.hex()), &format!("layer {}\n", g0.desc.digest));
    plant("images/not-a-digest", &format!("layer {}\n", g0.desc.digest));
    // Leases: malformed, a leftover temporary file, an invalid id.
    plant("leases/bad", "garbage\n");
    plant("leases/.keep2.tmp", &format!("layer {}\n", g0.desc.digest));
    plant("leases/a b", &format!("layer {}\n", g0.desc.digest));

    let cache = RootfsCache::open(&root, CacheOptions::default()).unwrap();
    assert_eq!(names(&root.join("tmp")), empty());
    assert_eq!(names(&root.join("trash")), empty());
    assert_eq!(std::fs::read_to_string(outside.join("canary")).unwrap(), "alive", "a symlink was followed");
    assert_eq!(names(&root.join("layers")), hexes(&[&g0, &g1]));
    assert_eq!(names(&root.join("images")), [good.hex()].into_iter().collect());
    assert_eq!(names(&root.join("leases")), ["keep".to_string()].into_iter().collect());
    assert_eq!(cache.leases(), vec!["keep".to_string()]);
    let s = cache.stats();
    assert_eq!((s.entries, s.leased_entries), (2, 2));
    check_quiescent(&cache, &known([&g0, &g1]));

    // Valid entries are served without the fetcher.
    let calls = f.calls();
    let rg = cache.ensure(&f, &format!("@{good}")).unwrap();
    assert_eq!(f.calls(), calls);
    check_rootfs(&root, &rg, &[&g0, &g1]);

    // None of the damaged ones is: the record is gone (resolve is called) and every layer
    // is fetched and extracted afresh.
    let rw = cache.ensure(&f, &format!("@{w}")).unwrap();
    assert_eq!(f.resolves(), calls.0 + 1, "a record naming damaged layers was served");
    for l in &p {
        assert_eq!(f.opens_of(&l.desc.digest), 1);
    }
    check_rootfs(&root, &rw, &p.iter().collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------
// 7. Leases and LRU

#[test]
fn persisted_lease_pins_layers_across_reopen_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = layer(400, 2, 8192, Comp::None);
    let b = layer(401, 2, 8192, Comp::Gzip);
    let c = layer(402, 2, 8192, Comp::None);
    let mut f = TestFetcher::new();
    let pinned = f.image("pinned", &[&a, &b]);
    let other = f.image("other", &[&c]);
    {
        let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
        let r = cache.ensure(&f, "pinned").unwrap();
        r.persist("sb1").unwrap();
        assert_eq!(names(&root.join("leases")), ["sb1".to_string()].into_iter().collect());
        let _ro = cache.ensure(&f, "other").unwrap();
    }

    let cache = RootfsCache::open(root, opts(1)).unwrap();
    assert_eq!(cache.leases(), vec!["sb1".to_string()]);
    let s = cache.stats();
    assert_eq!((s.entries, s.leased_entries), (3, 2));
    let pinned_bytes: u64 = cache.layers().iter().filter(|(d, _, _)| *d != c.desc.digest).map(|(_, s, _)| s).sum();

    let rep = cache.gc().unwrap();
    assert_eq!(rep.evicted, vec![c.desc.digest], "only the unpinned layer goes");
    assert_eq!(rep.removed_images, vec![other]);
    assert_eq!(rep.bytes_in_use, pinned_bytes);
    assert_eq!(rep.over_budget_bytes, pinned_bytes - 1);
    assert!(rep.over_budget_bytes > 0);
    let s = cache.stats();
    assert_eq!((s.over_budget_bytes, s.bytes_in_use, s.evictions), (rep.over_budget_bytes, pinned_bytes, 1));
    assert_eq!(names(&root.join("layers")), hexes(&[&a, &b]));
    assert_eq!(names(&root.join("images")), [pinned.hex()].into_iter().collect());
    // Again: nothing more to do.
    assert_eq!(cache.gc().unwrap().evicted, vec![]);

    // Lease ids name files: anything else is refused, and so is an id in use.
    let calls = f.calls();
    let r = cache.ensure(&f, &format!("@{pinned}")).unwrap();
    assert_eq!(f.calls(), calls);
    let long = "x".repeat(129);
    for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "a\nb", long.as_str()] {
        let e = r.persist(bad).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{bad:?}: {e:?}");
    }
    assert!(matches!(r.persist("sb1"), Err(Error::Unsupported { .. })), "id in use");
    assert_eq!(names(&root.join("leases")), ["sb1".to_string()].into_iter().collect());
    r.persist("sb2").unwrap();
    cache.release("sb2").unwrap();
    assert!(matches!(cache.release("sb2"), Err(Error::NotFound { .. })));
    assert!(matches!(cache.release("nope"), Err(Error::NotFound { .. })));
    drop(r);
    assert_eq!(cache.gc().unwrap().evicted, vec![], "sb1 still pins them");

    cache.release("sb1").unwrap();
    assert_eq!(cache.leases(), Vec::<String>::new());
    assert_eq!(names(&root.join("leases")), empty());
    assert_eq!(cache.stats().leased_entries, 0);
    let rep = cache.gc().unwrap();
    let evicted: BTreeSet<Digest> = rep.evicted.iter().copied().collect();
    assert_eq!(evicted, [a.desc.digest, b.desc.digest].into_iter().collect());
    assert_eq!(rep.removed_images, vec![pinned]);
    assert_eq!((rep.bytes_in_use, rep.over_budget_bytes), (0, 0));
    assert_eq!(cache.stats().over_budget_bytes, 0);
    assert_eq!(names(&root.join("layers")), empty());
    assert_eq!(names(&root.join("images")), empty());

    // The image record went with its layers: a digest reference goes back to the fetcher.
    let calls = f.calls();
    let r = cache.ensure(&f, &format!("@{pinned}")).unwrap();
    assert_eq!(f.calls(), (calls.0 + 1, calls.1 + 2));
    check_rootfs(root, &r, &[&a, &b]);
}

/// A persisted lease naming a layer that is lost before the next open (damaged `meta`),
/// then extracted again: releasing the lease must keep the lease accounting sane.
#[test]
fn lease_on_a_layer_lost_before_open_can_be_released() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = layer(450, 2, 4096, Comp::None);
    let mut f = TestFetcher::new();
    f.image("img", &[&a]);
    {
        let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
        cache.ensure(&f, "img").unwrap().persist("p").unwrap();
    }
    std::fs::write(layer_dir(root, &a.desc.digest).join("meta"), "damaged").unwrap();

    let cache = RootfsCache::open(root, opts(1)).unwrap();
    assert_eq!(cache.stats().entries, 0, "a damaged layer is not served");
    let r = cache.ensure(&f, "img").unwrap();
    assert_eq!(f.opens_of(&a.desc.digest), 2);
    check_rootfs(root, &r, &[&a]);
    drop(r);
    // Whether or not the lease still pins the new copy, releasing it must work and leave
    // nothing leased.
    match cache.release("p") {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => panic!("release: {e:?}"),
    }
    assert_eq!(cache.stats().leased_entries, 0, "{:?}", cache.layers());
    assert_eq!(cache.gc().unwrap().evicted, vec![a.desc.digest]);
}

#[test]
fn eviction_is_least_recently_used_first_also_across_reopen() {
    let ls: Vec<TestLayer> = (0..5).map(|i| layer(700 + i, 2, 16 * 1024, Comp::None)).collect();
    let [la, _, lc, ld, le] = [&ls[0], &ls[1], &ls[2], &ls[3], &ls[4]];
    let mut f = TestFetcher::new();
    for (tag, l) in ["a", "b", "c", "d", "e"].iter().zip(&ls) {
        f.image(tag, &[l]);
    }
    // All five have the same shape, so the same disk usage: measure it once.
    let size = {
        let scratch = tempfile::tempdir().unwrap();
        let c = RootfsCache::open(scratch.path(), CacheOptions::default()).unwrap();
        let _r = c.ensure(&f, "a").unwrap();
        c.stats().bytes_in_use
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let pause = || std::thread::sleep(Duration::from_millis(30));
    {
        // Room for three and a half.
        let cache = RootfsCache::open(root, opts(3 * size + size / 2)).unwrap();
        for tag in ["a", "b", "c", "a"] {
            drop(cache.ensure(&f, tag).unwrap());
            pause();
        }
        // Use order: b, c, a. A fourth layer pushes out the least recently used: b.
        drop(cache.ensure(&f, "d").unwrap());
        assert_eq!(names(&root.join("layers")), hexes(&[la, lc, ld]));
        pause();
        drop(cache.ensure(&f, "e").unwrap());
        assert_eq!(names(&root.join("layers")), hexes(&[la, ld, le]));
        assert_eq!(cache.stats().evictions, 2);
        pause();
        // Touch d (a hit, persisted when the cache is dropped): order a, e, d.
        drop(cache.ensure(&f, "d").unwrap());
        assert_eq!(f.opens_of(&ld.desc.digest), 1);
    }
    // After a reopen the order comes from the persisted last-use times.
    let cache = RootfsCache::open(root, opts(0)).unwrap();
    let rep = cache.gc().unwrap();
    assert_eq!(
        rep.evicted,
        vec![la.desc.digest, le.desc.digest, ld.desc.digest],
        "expected a, e, d (a={}, e={}, d={})",
        la.desc.digest,
        le.desc.digest,
        ld.desc.digest
    );
    assert_eq!(rep.evicted_bytes, 3 * size);
}

/// An image that lists a layer twice (common for identical empty layers), persisted,
/// whose layer is lost and extracted again: every occurrence stays counted, so dropping
/// the handle and releasing the lease leave the layer unleased exactly once (before:
/// a lease count underflow, a debug assertion in debug builds).
#[test]
fn repeated_layer_with_a_persisted_lease_survives_re_extraction() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a = layer(450, 2, 4096, Comp::None);
    let mut f = TestFetcher::new();
    f.image("twice", &[&a, &a]);
    {
        let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
        cache.ensure(&f, "twice").unwrap().persist("p").unwrap();
    }
    // The layer is lost (an operator's cleanup): the next ensure extracts it again.
    std::fs::remove_dir_all(root.join("layers").join(a.desc.digest.hex())).unwrap();
    let cache = RootfsCache::open(root, CacheOptions::default()).unwrap();
    let r = cache.ensure(&f, "twice").unwrap();
    assert_eq!(cache.stats().leased_entries, 1);
    drop(r);
    assert_eq!(cache.stats().leased_entries, 1, "the persisted lease still pins it");
    assert!(cache.layers().iter().all(|l| l.2));
    cache.release("p").unwrap();
    assert_eq!(cache.stats().leased_entries, 0);
    assert!(cache.layers().iter().all(|l| !l.2));
    assert_eq!(cache.gc().unwrap().evicted.len(), 0, "within budget");
}
