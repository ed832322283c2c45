//! `RootfsCache::ensure_lazy` under faults (issue 14's list): a registry stopped mid-run,
//! corrupted chunks, a killed FUSE server, a process killed mid-completion, copy-up of
//! placeholders, eviction next to a live lazy view; and the red team's concurrency, drop
//! and error-path cases.
//!
//! Faults are made deterministic by [`Faulty`], a fetcher wrapper that holds (blocks),
//! fails, corrupts, delays and counts range reads of chosen byte ranges of the blob.
//! Processes that must die (the FUSE server, a completion) are this test binary re-run
//! as a child (`child_process`, ignored), in the parent thread's private mount namespace.
//!
//! Needs root, /dev/fuse and skopeo (docker-registry for the registry case): skips
//! without them (fails under `CI`).

#![cfg(all(feature = "registry", feature = "lazy"))]

#[path = "common/registry.rs"]
mod harness;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use harness::{Comp, Layout, RegistryConfig, RegistryServer};
use rootfs_cache::{
    CacheOptions, Descriptor, EnsureOptions, Error, ImageFetcher, ImageManifest, LayerToc, OciLayout, Registry, Result,
    Rootfs, RootfsCache, TocEntryKind, read_toc,
};
use support::{Cmp, Ent, Fmt};

fn require(test: &str) -> bool {
    if !support::require_root(test) || !support::require_tools(test, &["skopeo"]) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        assert!(std::env::var_os("CI").is_none(), "{test}: /dev/fuse is missing");
        support::skip(&format!("{test}: no /dev/fuse"));
        return false;
    }
    true
}

/// Big files (placeholders): `data/f0` .. `data/f{N-1}`.
const N: usize = 6;
const BIG: usize = 1 << 20;

fn big(i: usize) -> Vec<u8> {
    support::pseudo_random(100 + i as u64, BIG)
}

/// One layer: explicit directories (no implicit ones: their mtimes are not comparable),
/// small files (in the skeleton) and `N` big ones.
fn files() -> Vec<Ent> {
    let mut v = vec![
        Ent::dir("etc").mode(0o755),
        Ent::file("etc/small", "small\n").mode(0o644),
        Ent::file("etc/other", "other small\n").mode(0o600),
        Ent::dir("data").mode(0o755),
    ];
    for i in 0..N {
        v.push(Ent::file(&format!("data/f{i}"), big(i)).mode(0o755));
    }
    v
}

struct Images {
    _dir: tempfile::TempDir,
    /// The gzip original (eager reference).
    gzip: PathBuf,
    /// Its zstd:chunked copy, made by skopeo.
    chunked: PathBuf,
}

fn images() -> Images {
    let dir = support::tempdir();
    let gzip = dir.path().join("gzip");
    let mut layout = Layout::create(&gzip);
    layout.add_image(Some("t"), "amd64", &[(support::tar_of(&files(), Fmt::Pax), Comp::Gzip)]);
    let chunked = dir.path().join("chunked");
    support::zstd_chunked_copy(&gzip, &chunked);
    Images { _dir: dir, gzip, chunked }
}

/// Where each data file's bytes are in the blob, and its data id (`lazy/<hex>/data/<id:x>`).
struct TocInfo {
    desc: Descriptor,
    ranges: HashMap<String, (u64, u64)>,
    ids: HashMap<String, usize>,
}

impl TocInfo {
    fn of(f: &dyn ImageFetcher, reference: &str) -> TocInfo {
        let m = f.resolve(reference).unwrap();
        assert_eq!(m.layers.len(), 1);
        let desc = m.layers[0].clone();
        let toc = match read_toc(&desc, |o, l| f.read_blob_range(&desc, o, l)).unwrap() {
            LayerToc::Seekable(t) => t,
            LayerToc::NotSeekable(why) => panic!("not seekable: {why}"),
        };
        let (mut ranges, mut ids) = (HashMap::new(), HashMap::new());
        for e in &toc.entries {
            if let TocEntryKind::File { size, chunks, .. } = &e.kind {
                if *size == 0 {
                    continue;
                }
                let path = e.path.trim_start_matches("./").trim_start_matches('/').to_string();
                ids.insert(path.clone(), ids.len());
                let real = chunks.iter().filter(|c| !c.zeros);
                let start = real.clone().map(|c| c.compressed_offset).min().unwrap();
                let end = real.map(|c| c.compressed_offset + c.compressed_len).max().unwrap();
                ranges.insert(path, (start, end));
            }
        }
        TocInfo { desc, ranges, ids }
    }

    fn range(&self, path: &str) -> (u64, u64) {
        self.ranges[path]
    }

    fn data_file(&self, cache: &Path, path: &str) -> PathBuf {
        self.data_dir(cache).join(format!("{:x}", self.ids[path]))
    }

    fn data_dir(&self, cache: &Path) -> PathBuf {
        cache.join("lazy").join(self.desc.digest.hex()).join("data")
    }
}

/// Switches over a wrapped fetcher's range reads.
#[derive(Default)]
struct Faults {
    /// Reads overlapping one of these wait until it is released.
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
    /// Reads waiting on a hold now.
    waiting: AtomicUsize,
    /// Every range read fails.
    fail: AtomicBool,
    /// Range reads are refused (a mirror that ignores `Range`); whole blobs still come.
    no_ranges: AtomicBool,
    /// Corruption (`corrupt`) of range reads of this layer only, and not of whole blobs.
    corrupt_ranges_of: Mutex<Option<rootfs_cache::Digest>>,
    /// Reads overlapping this get one byte flipped.
    corrupt: Mutex<Option<(u64, u64)>>,
    delay_ms: AtomicU64,
    /// Bytes returned by range reads.
    bytes: AtomicU64,
}

impl Faults {
    fn hold(&self, r: (u64, u64)) {
        self.held.lock().unwrap().push(r);
    }
    fn release_all(&self) {
        self.held.lock().unwrap().clear();
        self.released.notify_all();
    }
    fn wait_for_waiters(&self, n: usize) {
        let t = Instant::now();
        while self.waiting.load(Ordering::SeqCst) < n {
            assert!(t.elapsed() < Duration::from_secs(60), "no read reached the hold");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn overlaps(a: (u64, u64), o: u64, l: u64) -> bool {
    a.0 < o + l && o < a.1
}

struct Faulty {
    inner: Box<dyn ImageFetcher>,
    f: Arc<Faults>,
}

fn faulty(inner: impl ImageFetcher + 'static) -> (Arc<dyn ImageFetcher>, Arc<Faults>) {
    let f = Arc::new(Faults::default());
    (Arc::new(Faulty { inner: Box::new(inner), f: Arc::clone(&f) }), f)
}

impl ImageFetcher for Faulty {
    fn resolve(&self, reference: &str) -> Result<ImageManifest> {
        self.inner.resolve(reference)
    }
    /// The whole blob (a lazy layer's completion): the same holds, failures, corruption
    /// and delay, applied to each read at its position (its bytes are not counted in `bytes`,
    /// which counts range reads only).
    fn open_blob(&self, layer: &Descriptor) -> Result<Box<dyn std::io::Read + Send>> {
        if self.f.fail.load(Ordering::SeqCst) {
            return Err(Error::Read { what: "blob (test: registry gone)", source: std::io::Error::other("gone") });
        }
        let inner = self.inner.open_blob(layer)?;
        Ok(Box::new(HeldReader { inner, f: Arc::clone(&self.f), pos: 0 }))
    }
    fn read_blob_range(&self, layer: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        {
            let mut held = self.f.held.lock().unwrap();
            if held.iter().any(|r| overlaps(*r, offset, len)) {
                self.f.waiting.fetch_add(1, Ordering::SeqCst);
                while held.iter().any(|r| overlaps(*r, offset, len)) {
                    held = self.f.released.wait(held).unwrap();
                }
                self.f.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        std::thread::sleep(Duration::from_millis(self.f.delay_ms.load(Ordering::Relaxed)));
        if self.f.no_ranges.load(Ordering::SeqCst) {
            return Err(Error::Unsupported { what: "range reads (test: a mirror without them)".into() });
        }
        if self.f.fail.load(Ordering::SeqCst) {
            return Err(Error::Read {
                what: "range read (test: registry gone)",
                source: std::io::Error::other("gone"),
            });
        }
        let mut v = self.inner.read_blob_range(layer, offset, len)?;
        self.f.bytes.fetch_add(v.len() as u64, Ordering::Relaxed);
        let only = *self.f.corrupt_ranges_of.lock().unwrap();
        if let Some(c) = (*self.f.corrupt.lock().unwrap()).filter(|_| only.is_none_or(|d| d == layer.digest)) {
            if overlaps(c, offset, len) {
                let at = (c.0.max(offset) - offset) as usize;
                v[at] ^= 0x40;
            }
        }
        Ok(v)
    }
}

struct HeldReader {
    inner: Box<dyn std::io::Read + Send>,
    f: Arc<Faults>,
    pos: u64,
}

impl std::io::Read for HeldReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = buf.len().min(64 << 10);
        {
            let mut held = self.f.held.lock().unwrap();
            if held.iter().any(|r| overlaps(*r, self.pos, len as u64)) {
                self.f.waiting.fetch_add(1, Ordering::SeqCst);
                while held.iter().any(|r| overlaps(*r, self.pos, len as u64)) {
                    held = self.f.released.wait(held).unwrap();
                }
                self.f.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
        std::thread::sleep(Duration::from_millis(self.f.delay_ms.load(Ordering::Relaxed)));
        if self.f.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("gone (test)"));
        }
        let n = self.inner.read(&mut buf[..len])?;
        let ranges_only = self.f.corrupt_ranges_of.lock().unwrap().is_some();
        if let Some(c) = (*self.f.corrupt.lock().unwrap()).filter(|_| !ranges_only) {
            if overlaps(c, self.pos, n as u64) {
                buf[(c.0.max(self.pos) - self.pos) as usize] ^= 0x40;
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The lowerdir string of `rootfs` (lowers, then `::` data-only lowers).
fn lowerdir(rootfs: &Rootfs) -> String {
    let lower: Vec<String> = rootfs.lowers().iter().map(|p| p.display().to_string()).collect();
    let mut parts = vec![lower.join(":")];
    parts.extend(rootfs.data_lowers().iter().map(|p| p.display().to_string()));
    parts.join("::")
}

/// A read-only overlay of `rootfs` (lowers and data-only lowers) at `at` (a bind mount
/// of a single lower: overlayfs wants two lowers without an upper).
fn mount_ro(rootfs: &Rootfs, at: &Path) -> scratch_ns::Mounted {
    std::fs::create_dir_all(at).unwrap();
    if rootfs.lowers().len() == 1 && rootfs.data_lowers().is_empty() {
        let flags = nix::mount::MsFlags::MS_BIND;
        nix::mount::mount(Some(&rootfs.lowers()[0]), at, None::<&str>, flags, None::<&str>).unwrap();
        return scratch_ns::Mounted(at.to_path_buf());
    }
    let opts = format!("lowerdir={},redirect_dir=nofollow,metacopy=off,index=off,xino=off", lowerdir(rootfs));
    nix::mount::mount(Some("overlay"), at, Some("overlay"), nix::mount::MsFlags::MS_RDONLY, Some(opts.as_str()))
        .unwrap_or_else(|e| panic!("mount {opts}: {e}"));
    scratch_ns::Mounted(at.to_path_buf())
}

/// A writable overlay of `rootfs` with `top/{upper,work,merged}`.
fn mount_rw(rootfs: &Rootfs, top: &Path) -> scratch_ns::Mounted {
    for d in ["upper", "work", "merged"] {
        std::fs::create_dir_all(top.join(d)).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},redirect_dir=nofollow,metacopy=off,index=off,xino=off",
        lowerdir(rootfs),
        top.join("upper").display(),
        top.join("work").display()
    );
    let at = top.join("merged");
    nix::mount::mount(Some("overlay"), &at, Some("overlay"), nix::mount::MsFlags::empty(), Some(opts.as_str()))
        .unwrap_or_else(|e| panic!("mount {opts}: {e}"));
    scratch_ns::Mounted(at)
}

fn in_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        scratch_ns::private_ns();
        f()
    })
    .join()
    .unwrap()
}

fn open(dir: &Path) -> RootfsCache {
    RootfsCache::open(dir, CacheOptions::default()).unwrap()
}

fn layout(p: &Path) -> OciLayout {
    OciLayout::open(p).unwrap()
}

fn errno(r: std::io::Result<Vec<u8>>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Every file of the merged view reads right.
fn check_all(merged: &Path) {
    for i in 0..N {
        let got = std::fs::read(merged.join(format!("data/f{i}"))).unwrap_or_else(|e| panic!("f{i}: {e}"));
        assert!(got == big(i), "data/f{i}: wrong bytes");
    }
    assert_eq!(std::fs::read(merged.join("etc/small")).unwrap(), b"small\n");
}

/// Entries of a directory (none if it is missing).
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

fn cmp() -> Cmp {
    let mut c = Cmp::strict();
    c.hardlinks = true;
    c
}

/// The eager tree of the gzip twin (one layer: its `fs/` is the tree).
fn eager_tree(img: &Images, t: &Path) -> std::collections::BTreeMap<Vec<u8>, support::Node> {
    let cache = open(&t.join("eager"));
    let r = cache.ensure(&layout(&img.gzip), "t").unwrap();
    support::snapshot(&r.lowers()[0])
}

// ---------------------------------------------------------------------------------------
// 1. Registry stopped mid-run

#[test]
fn a_registry_stopped_mid_run_gives_eio_and_keeps_what_was_fetched() {
    let test = "a_registry_stopped_mid_run_gives_eio_and_keeps_what_was_fetched";
    if !require(test) || !harness::require(test) {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let t = support::tempdir();
    let mut l = Layout::create(&t.path().join("L"));
    l.add_image(Some("t"), "amd64", &[(support::tar_of(&files(), Fmt::Pax), Comp::Gzip)]);
    reg.push(&l.dir, "t", "lazy/faults", "v1", None, &["--dest-compress-format", "zstd:chunked"]);
    let reference = format!("{}/lazy/faults:v1", reg.host());
    let t = t.path().to_path_buf();
    in_ns(move || {
        let registry = Registry::new(harness::options()).unwrap();
        let info = TocInfo::of(&registry, &reference);
        let (fetcher, faults) = faulty(registry);
        // Only f0 can be fetched while the registry is up: the completion waits on the
        // others (deterministic: it cannot fetch them before the registry stops).
        for i in 1..N {
            faults.hold(info.range(&format!("data/f{i}")));
        }
        let cache = open(&t.join("cache"));
        let lazy = cache.ensure_lazy(fetcher, &reference, &EnsureOptions::new()).unwrap();
        assert!(lazy.is_lazy());
        let m = mount_ro(&lazy, &t.join("m"));
        assert!(std::fs::read(m.0.join("data/f0")).unwrap() == big(0));
        faults.wait_for_waiters(1); // the completion is waiting on a held file
        drop(reg); // the registry stops (killed)
        // What the completion's stream had received before is cut off too.
        faults.fail.store(true, Ordering::SeqCst);
        faults.release_all();

        let start = Instant::now();
        let r = std::fs::read(m.0.join("data/f3"));
        assert_eq!(errno(r), Some(nix::libc::EIO), "a file that cannot be fetched");
        assert!(start.elapsed() < Duration::from_secs(120), "EIO took {:?}", start.elapsed());
        assert!(!info.data_file(&t.join("cache"), "data/f3").exists());
        // Fetched data still reads right; the tree still stats.
        assert!(std::fs::read(m.0.join("data/f0")).unwrap() == big(0));
        assert_eq!(std::fs::metadata(m.0.join("data/f5")).unwrap().len(), BIG as u64);
        assert_eq!(std::fs::read(m.0.join("etc/small")).unwrap(), b"small\n");
        let t0 = Instant::now();
        while lazy.lazy_status().last_error.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(120), "{:?}", lazy.lazy_status());
            std::thread::sleep(Duration::from_millis(50));
        }
        let st = lazy.lazy_status();
        assert_eq!(st.complete, 0, "{st:?}");
        assert!(st.local_bytes >= BIG as u64 && st.local_bytes < st.total_bytes, "{st:?}");
    });
}

/// A workspace over a lazy image, its layer complete, the registry then gone: `detach`
/// copies every file's data from local copies (nothing is fetched), the view stays right.
#[test]
fn detach_after_completion_needs_no_registry() {
    if !require("detach_after_completion_needs_no_registry") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let (fetcher, faults) = faulty(layout(&img.chunked));
        let cache = open(&t.join("cache"));
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        // Nothing read through the view: every big file is unfetched when the layer
        // completes (the completion's stream is not kept as fetched files).
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
        faults.fail.store(true, Ordering::SeqCst); // the registry is gone
        let mut ws =
            rootfs_cache::Workspace::create(t.join("ws"), lazy, rootfs_cache::WorkspaceOptions::default()).unwrap();
        ws.mount(rootfs_cache::KernelOverlay::new()).unwrap();
        let before = faults.bytes.load(Ordering::SeqCst);
        ws.detach().unwrap();
        assert!(ws.data_lowers().is_empty() && !ws.is_leased());
        check_all(ws.target());
        assert_eq!(faults.bytes.load(Ordering::SeqCst), before, "detach fetched");
        ws.destroy().unwrap();
    });
}

/// Over a real registry (through a logging proxy): the small files of spans apart come
/// in multi-range requests, split right; the view reads right before and after the
/// layer is local.
#[test]
fn a_lazy_pull_from_a_registry_asks_for_small_files_together() {
    let test = "a_lazy_pull_from_a_registry_asks_for_small_files_together";
    if !require(test) || !harness::require(test) {
        return;
    }
    // Small files between big ones: their data lies in spans far apart in the blob.
    let mut ents = vec![Ent::dir("d").mode(0o755)];
    for i in 0..4 {
        ents.push(Ent::file(&format!("d/small{i}"), format!("small file {i}\n").repeat(50 + i)).mode(0o644));
        ents.push(Ent::file(&format!("d/big{i}"), support::pseudo_random(i as u64 + 10, 700_000)).mode(0o644));
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let t = support::tempdir();
    let mut l = Layout::create(&t.path().join("L"));
    l.add_image(Some("t"), "amd64", &[(support::tar_of(&ents, Fmt::Pax), Comp::Gzip)]);
    reg.push(&l.dir, "t", "lazy/multi", "v1", None, &["--dest-compress-format", "zstd:chunked"]);
    let proxy = harness::FaultProxy::start(reg.addr());
    let reference = format!("{}/lazy/multi:v1", proxy.host());
    let t = t.path().to_path_buf();
    in_ns(move || {
        let cache = open(&t.join("cache"));
        let fetcher: Arc<dyn ImageFetcher> = Arc::new(Registry::new(harness::options()).unwrap());
        let lazy = cache.ensure_lazy(fetcher, &reference, &EnsureOptions::new()).unwrap();
        assert!(lazy.is_lazy(), "{:?}", lazy.lazy_status());
        let ranges: Vec<String> =
            proxy.requests().iter().filter_map(|q| q.header("range").map(str::to_string)).collect();
        assert!(ranges.iter().any(|r| r.contains(',')), "no multi-range request: {ranges:?}");
        let m = mount_ro(&lazy, &t.join("m"));
        let check = |m: &Path| {
            for i in 0..4 {
                let small = std::fs::read(m.join(format!("d/small{i}"))).unwrap();
                assert_eq!(small, format!("small file {i}\n").repeat(50 + i).into_bytes(), "small{i}");
                let big = std::fs::read(m.join(format!("d/big{i}"))).unwrap();
                assert!(big == support::pseudo_random(i as u64 + 10, 700_000), "big{i}");
            }
        };
        check(&m.0);
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
        check(&m.0);
    });
}

// ---------------------------------------------------------------------------------------
// 2. Corrupted chunks

#[test]
fn corrupted_chunks_give_eio_and_cache_nothing_until_they_are_right() {
    if !require("corrupted_chunks_give_eio_and_cache_nothing_until_they_are_right") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let (fetcher, faults) = faulty(layout(&img.chunked));
        let bad = info.range("data/f2");
        *faults.corrupt.lock().unwrap() = Some((bad.0, bad.0 + 1));
        let cache_dir = t.join("cache");
        let cache = open(&cache_dir);
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        let m = mount_ro(&lazy, &t.join("m"));
        assert_eq!(errno(std::fs::read(m.0.join("data/f2"))), Some(nix::libc::EIO));
        assert_eq!(errno(std::fs::read(m.0.join("data/f2"))), Some(nix::libc::EIO), "asked again");
        for i in [0, 1, 3, 4, 5] {
            assert!(std::fs::read(m.0.join(format!("data/f{i}"))).unwrap() == big(i), "f{i}");
        }
        // Nothing of f2 is cached (a temporary file of the background's retry in flight
        // may be there, never under the entry's name).
        let id = format!("{:x}", info.ids["data/f2"]);
        let left: Vec<String> = names(&info.data_dir(&cache_dir)).into_iter().filter(|n| *n == id).collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(!lazy.wait_local(Some(Duration::from_millis(200))));
        // The completion's retries of f2 fail too (progress elsewhere may clear it for
        // a while).
        let t0 = Instant::now();
        while lazy.lazy_status().last_error.is_none() {
            assert!(t0.elapsed() < Duration::from_secs(120), "{:?}", lazy.lazy_status());
            std::thread::sleep(Duration::from_millis(20));
        }
        // Bad bytes, not a bad network: said so, and asked again less and less often.
        let e = lazy.lazy_status().last_error.unwrap_or_default();
        assert!(e.contains("refused 1 times in a row"), "{e}");
        // The registry gets it right again: the file reads right, completion finishes.
        *faults.corrupt.lock().unwrap() = None;
        assert!(std::fs::read(m.0.join("data/f2")).unwrap() == big(2));
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
        check_all(&m.0);
    });
}

// ---------------------------------------------------------------------------------------
// Child processes (re-runs of this binary)

const CHILD_ENV: &str = "ROOTFS_CACHE_LAZY_FAULTS_CHILD";

/// Run `child_process` with `mode`, `dir` and `layout`; returns it once it printed
/// "ready".
fn spawn_child(mode: &str, dir: &Path, layout: &Path) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}\n{}\n{}", dir.display(), layout.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child {mode} ended early");
    }
    child
}

fn kill(mut child: std::process::Child) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// The child half of the tests that kill a process (mode `serve`: a lazy view mounted
/// at `<dir>/merged` with f0 read; mode `complete`: f0..f3 read through the view, the
/// completion's stream of the blob waiting at f4). Holds: the child never fetches more than the parent expects.
#[test]
#[ignore = "run by the tests that kill a process, in a child process"]
fn child_process() {
    let Ok(arg) = std::env::var(CHILD_ENV) else { return };
    let mut it = arg.lines();
    let (mode, dir, oci) = (it.next().unwrap(), PathBuf::from(it.next().unwrap()), PathBuf::from(it.next().unwrap()));
    let info = TocInfo::of(&layout(&oci), "t");
    let (fetcher, faults) = faulty(layout(&oci));
    let cache = open(&dir.join("cache"));
    match mode {
        "serve" => {
            for i in 1..N {
                faults.hold(info.range(&format!("data/f{i}")));
            }
            let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
            let m = mount_ro(&lazy, &dir.join("merged"));
            assert!(std::fs::read(m.0.join("data/f0")).unwrap() == big(0));
            std::mem::forget(m); // the parent reads it after our death
            println!("ready");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "complete" => {
            faults.hold(info.range("data/f4"));
            faults.hold(info.range("data/f5"));
            let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
            // Opens fetch f0..f3; the completion's stream of the blob waits at f4.
            let m = mount_ro(&lazy, &dir.join("merged"));
            for i in 0..4 {
                assert!(std::fs::read(m.0.join(format!("data/f{i}"))).unwrap() == big(i));
            }
            std::mem::forget(m);
            faults.wait_for_waiters(1);
            println!("ready");
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "rootless" => {
            // In `unshare -Urm`: the cache's defaults are the rootless ones (userxattr).
            assert!(rootfs_cache::in_user_namespace());
            let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
            assert!(lazy.is_lazy(), "not lazy in a user namespace: {:?}", lazy.lazy_status());
            let merged = dir.join("merged");
            std::fs::create_dir_all(&merged).unwrap();
            let opts =
                format!("lowerdir={},userxattr,redirect_dir=nofollow,metacopy=off,index=off,xino=off", lowerdir(&lazy));
            nix::mount::mount(
                Some("overlay"),
                &merged,
                Some("overlay"),
                nix::mount::MsFlags::MS_RDONLY,
                Some(opts.as_str()),
            )
            .unwrap_or_else(|e| panic!("mount {opts}: {e}"));
            check_all(&merged);
            assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
            check_all(&merged);
            println!("rootless lazy ok, passthrough={}", lazy.lazy_status().passthrough);
            nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
        other => panic!("unknown child mode {other}"),
    }
}

/// `ensure_lazy` in a user namespace (`unshare -Urm`, as the README's rootless column):
/// FUSE data-only lower mounted there, the skeleton's overlay metadata as `user.overlay.*`
/// (the cache's rootless defaults), a `userxattr` overlay reading right before and after
/// completion.
#[test]
fn a_lazy_view_works_in_a_user_namespace() {
    let test = "a_lazy_view_works_in_a_user_namespace";
    if !require(test) || !support::require_tools(test, &["unshare"]) {
        return;
    }
    let img = images();
    let t = support::tempdir();
    let out = Command::new("unshare")
        .args(["-Urm", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("rootless\n{}\n{}", t.path().display(), img.chunked.display()))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("rootless lazy ok"), "{stdout}\n{stderr}");
}

// ---------------------------------------------------------------------------------------
// 3. FUSE server killed

#[test]
fn a_killed_fuse_server_gives_enotconn_and_the_cache_recovers() {
    if !require("a_killed_fuse_server_gives_enotconn_and_the_cache_recovers") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let child = spawn_child("serve", &t, &img.chunked);
        let merged = t.join("merged");
        assert!(std::fs::read(merged.join("data/f0")).unwrap() == big(0), "served while alive");
        kill(child);
        // Not opened before the death: ENOTCONN, never an empty file or zeros.
        assert_eq!(errno(std::fs::read(merged.join("data/f1"))), Some(nix::libc::ENOTCONN));
        // The tree still stats and lists; the overlay comes off cleanly.
        assert_eq!(std::fs::metadata(merged.join("data/f4")).unwrap().len(), BIG as u64);
        assert_eq!(names(&merged.join("data")).len(), N);
        assert_eq!(std::fs::read(merged.join("etc/small")).unwrap(), b"small\n");
        nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();

        // Reopening recovers: the dead FUSE mount is detached, fetched data kept.
        let cache_dir = t.join("cache");
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let cache = open(&cache_dir);
        assert!(info.data_file(&cache_dir, "data/f0").exists(), "fetched data kept");
        let lazy_dir = cache_dir.join("lazy").join(info.desc.digest.hex());
        assert_eq!(names(&lazy_dir), ["data"], "only the data stays");
        let (fetcher, faults) = faulty(layout(&img.chunked));
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        let m = mount_ro(&lazy, &t.join("m2"));
        check_all(&m.0);
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
        // f0 was not fetched again.
        let (s, e) = info.range("data/f0");
        assert!(faults.bytes.load(Ordering::Relaxed) < info.desc.size - (e - s) / 2);
    });
}

// ---------------------------------------------------------------------------------------
// 4. SIGKILL mid-completion; the next process resumes

#[test]
fn a_process_killed_mid_completion_is_resumed_by_the_next() {
    if !require("a_process_killed_mid_completion_is_resumed_by_the_next") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let want = eager_tree(&img, &t);
        let child = spawn_child("complete", &t, &img.chunked);
        kill(child);
        let cache_dir = t.join("cache");
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let cache = open(&cache_dir);
        // No layer is partial: none is ready (the completion did not finish).
        assert!(names(&cache_dir.join("layers")).is_empty(), "{:?}", names(&cache_dir.join("layers")));
        assert!(names(&cache_dir.join("tmp")).is_empty());
        let fetched: Vec<usize> =
            (0..N).filter(|i| info.data_file(&cache_dir, &format!("data/f{i}")).exists()).collect();
        assert_eq!(fetched, [0, 1, 2, 3], "fetched before the kill, kept");
        assert!(names(&info.data_dir(&cache_dir)).iter().all(|n| !n.starts_with(".tmp-")));

        let (fetcher, faults) = faulty(layout(&img.chunked));
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
        let bytes = faults.bytes.load(Ordering::Relaxed);
        // No range read of what was fetched before (the completion streams the blob, to
        // check its digest: those bytes are not counted).
        let len = |i: usize| {
            let (s, e) = info.range(&format!("data/f{i}"));
            e - s
        };
        let before = (0..4).map(len).sum::<u64>();
        assert!(bytes < before / 2, "range reads {bytes}, fetched before {before}");
        drop(lazy);
        let plain = cache.ensure(&layout(&img.chunked), "t").unwrap();
        assert!(!plain.is_lazy());
        let got = support::snapshot(&plain.lowers()[0]);
        support::assert_no_diffs("resumed layer", &support::diff_trees(&want, &got, &cmp()));
    });
}

// ---------------------------------------------------------------------------------------
// 5. Copy-up

#[test]
fn writes_copy_placeholders_up_whole() {
    if !require("writes_copy_placeholders_up_whole") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let (fetcher, faults) = faulty(layout(&img.chunked));
        // The completion must not make them local first.
        for i in 0..N {
            faults.hold(info.range(&format!("data/f{i}")));
        }
        let cache = open(&t.join("cache"));
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        let m = mount_rw(&lazy, &t.join("ws"));
        assert!(!info.data_file(&t.join("cache"), "data/f1").exists());
        faults.release_all();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(m.0.join("data/f1")).unwrap();
            f.write_all(b"appended").unwrap();
        }
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &m.0.join("data/f2"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .unwrap();
        let upper = t.join("ws/upper/data");
        let mut want = big(1);
        want.extend_from_slice(b"appended");
        assert!(std::fs::read(upper.join("f1")).unwrap() == want, "append: full data + appended");
        assert!(std::fs::read(upper.join("f2")).unwrap() == big(2), "chmod: full data");
        for f in ["f1", "f2"] {
            for x in [&b"trusted.overlay.metacopy"[..], b"trusted.overlay.redirect"] {
                assert!(support::lgetxattr(&upper.join(f), x).is_none(), "{f} has {}", String::from_utf8_lossy(x));
            }
        }
        assert!(std::fs::read(m.0.join("data/f1")).unwrap() == want);
    });
}

// ---------------------------------------------------------------------------------------
// 6. Eviction and leases

#[test]
fn gc_keeps_what_a_lazy_view_needs_and_evicts_it_once_complete() {
    if !require("gc_keeps_what_a_lazy_view_needs_and_evicts_it_once_complete") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let mut o = CacheOptions::default();
        o.max_bytes = 1;
        let cache_dir = t.join("cache");
        let cache = RootfsCache::open(&cache_dir, o).unwrap();
        // Something evictable: the gzip twin, ensured and dropped.
        let gz_layer = cache.ensure(&layout(&img.gzip), "t").unwrap().layers()[0];
        assert_eq!(cache.stats().entries, 1);
        let (fetcher, faults) = faulty(layout(&img.chunked));
        for i in 3..N {
            faults.hold(info.range(&format!("data/f{i}")));
        }
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        let m = mount_ro(&lazy, &t.join("m"));
        assert!(std::fs::read(m.0.join("data/f0")).unwrap() == big(0));
        let report = cache.gc().unwrap();
        assert_eq!(report.evicted, [gz_layer], "only the unleased eager layer goes");
        faults.release_all();
        check_all(&m.0);
        assert!(info.data_file(&cache_dir, "data/f0").exists());
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
        // Complete, but still in use: kept.
        assert!(cache.gc().unwrap().evicted.is_empty());
        check_all(&m.0);
        drop(m);
        drop(lazy);
        // An ordinary layer now: evictable, and no lazy state is left.
        let report = cache.gc().unwrap();
        assert_eq!(report.evicted, [info.desc.digest]);
        assert!(names(&cache_dir.join("lazy")).is_empty(), "{:?}", names(&cache_dir.join("lazy")));
    });
}

// ---------------------------------------------------------------------------------------
// Red team

#[test]
fn two_lazy_ensures_at_once_share_one_layer_and_an_eager_one_may_race_them() {
    if !require("two_lazy_ensures_at_once_share_one_layer_and_an_eager_one_may_race_them") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let cache = Arc::new(open(&t.join("cache")));
        let fetcher: Arc<dyn ImageFetcher> = Arc::new(layout(&img.chunked));
        let go = Arc::new(std::sync::Barrier::new(3));
        let lazies: Vec<_> = (0..2)
            .map(|_| {
                let (c, f, go) = (Arc::clone(&cache), Arc::clone(&fetcher), Arc::clone(&go));
                std::thread::spawn(move || {
                    go.wait();
                    c.ensure_lazy(f, "t", &EnsureOptions::new()).unwrap()
                })
            })
            .collect();
        let eager = {
            let (c, dir, go) = (Arc::clone(&cache), img.chunked.clone(), Arc::clone(&go));
            std::thread::spawn(move || {
                go.wait();
                c.ensure(&layout(&dir), "t").unwrap()
            })
        };
        let lazies: Vec<Rootfs> = lazies.into_iter().map(|h| h.join().unwrap()).collect();
        let eager = eager.join().unwrap();
        let lazy: Vec<&Rootfs> = lazies.iter().filter(|r| r.is_lazy()).collect();
        if lazy.len() == 2 {
            assert_eq!(lazy[0].data_lowers(), lazy[1].data_lowers(), "one lazy layer per digest");
            assert_ne!(lazy[0].lowers(), lazy[1].lowers(), "one view per Rootfs");
        }
        for (i, r) in lazies.iter().enumerate() {
            let m = mount_ro(r, &t.join(format!("m{i}")));
            check_all(&m.0);
        }
        let m = mount_ro(&eager, &t.join("me"));
        check_all(&m.0);
        drop(m);
        for r in &lazies {
            assert!(r.wait_local(Some(Duration::from_secs(120))), "{:?}", r.lazy_status());
        }
        drop(lazies);
        drop(eager);
        assert_eq!(cache.stats().entries, 1);
        assert!(names(&t.join("cache/lazy")).is_empty(), "{:?}", names(&t.join("cache/lazy")));
    });
}

/// Open `dir`, waiting (a bounded time) while a completion still holds it.
fn reopen(dir: &Path) -> RootfsCache {
    let t0 = Instant::now();
    loop {
        match RootfsCache::open(dir, CacheOptions::default()) {
            Ok(c) => return c,
            Err(rootfs_cache::Error::Busy { .. }) if t0.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

#[test]
fn dropping_everything_mid_completion_releases_the_cache() {
    if !require("dropping_everything_mid_completion_releases_the_cache") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let (fetcher, faults) = faulty(layout(&img.chunked));
        for i in 2..N {
            faults.hold(info.range(&format!("data/f{i}")));
        }
        let cache_dir = t.join("cache");
        let cache = open(&cache_dir);
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        faults.wait_for_waiters(1); // the completion's stream of the blob is held
        // The Rootfs first, then the cache, while the completion is stuck in a fetch.
        drop(lazy);
        drop(cache);
        // The completion holds the cache until its download ends (documented): once
        // the fetcher returns, the LOCK is free.
        faults.release_all();
        drop(reopen(&cache_dir));

        // The other order: the cache first, the Rootfs (still serving) later.
        let (fetcher, faults) = faulty(layout(&img.chunked));
        faults.hold(info.range("data/f5"));
        let cache = open(&cache_dir);
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        drop(cache);
        let m = mount_ro(&lazy, &t.join("m"));
        assert!(std::fs::read(m.0.join("data/f3")).unwrap() == big(3), "served after the cache handle went");
        drop(m);
        drop(lazy);
        faults.release_all();
        drop(reopen(&cache_dir));
    });
}

#[test]
fn a_failed_lazy_ensure_gives_back_its_leases_and_leaves_no_view() {
    if !require("a_failed_lazy_ensure_gives_back_its_leases_and_leaves_no_view") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let cache_dir = t.join("cache");
        let cache = open(&cache_dir);
        // Skeleton data cannot be fetched: the layer fails, nothing is mounted.
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let (fetcher, faults) = faulty(layout(&img.chunked));
        faults.corrupt.lock().unwrap().replace(info.range("etc/small"));
        let err = cache.ensure_lazy(Arc::clone(&fetcher), "t", &EnsureOptions::new()).unwrap_err();
        assert!(matches!(err, Error::Layer { .. }), "{err}");
        let lazy_dir = cache_dir.join("lazy");
        assert_eq!(names(&lazy_dir), [info.desc.digest.hex()], "no view");
        assert_eq!(names(&lazy_dir.join(info.desc.digest.hex())), ["data"], "no mount point left");
        assert_eq!(cache.stats().leased_entries, 0);
        // Fixed: the next try works.
        faults.corrupt.lock().unwrap().take();
        let lazy = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        let m = mount_ro(&lazy, &t.join("m"));
        check_all(&m.0);
    });
}

/// A layer that cannot be served lazily (here: a mirror that refuses range reads) is
/// pulled whole, with the reason, instead of failing the call.
#[test]
fn a_layer_that_cannot_be_served_lazily_is_pulled_whole() {
    if !require("a_layer_that_cannot_be_served_lazily_is_pulled_whole") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let cache_dir = t.join("cache");
        let cache = open(&cache_dir);
        let (fetcher, faults) = faulty(layout(&img.chunked));
        faults.no_ranges.store(true, Ordering::SeqCst);
        let rootfs = cache.ensure_lazy(Arc::clone(&fetcher), "t", &EnsureOptions::new()).unwrap();
        assert!(!rootfs.is_lazy());
        assert!(rootfs.data_lowers().is_empty());
        let st = rootfs.lazy_status();
        assert_eq!(st.eager.len(), 1, "{st:?}");
        assert!(st.eager[0].1.contains("range reads"), "{st:?}");
        assert!(rootfs.wait_local(Some(Duration::ZERO)));
        let m = mount_ro(&rootfs, &t.join("m"));
        check_all(&m.0);
        let diffs = support::diff_trees(&eager_tree(&img, &t), &support::snapshot(&m.0), &cmp());
        support::assert_no_diffs("the whole pull's tree", &diffs);
        drop(m);
        assert_eq!(cache.stats().leased_entries, 1);
        drop(rootfs);
        assert_eq!(cache.stats().leased_entries, 0);
        // Nothing lazy is left mounted or half made.
        let lazy_dir = cache_dir.join("lazy");
        assert!(names(&lazy_dir).iter().all(|n| !n.starts_with("view.")), "{:?}", names(&lazy_dir));
        for n in names(&lazy_dir) {
            assert!(names(&lazy_dir.join(&n)).iter().all(|e| !e.starts_with("mnt.")), "{n}");
        }
    });
}

/// Two lazy layers, the small files of the lower one unfetchable (wrong bytes from range
/// reads; whole blobs are right): both are pulled whole, with the reason, and the layer
/// set up above the failed one is given up (found by review: it stayed mounted and
/// fetching, used by nobody).
#[test]
fn a_lower_layer_whose_small_files_fail_takes_the_layers_above_to_a_whole_pull() {
    let test = "a_lower_layer_whose_small_files_fail_takes_the_layers_above_to_a_whole_pull";
    if !require(test) {
        return;
    }
    let dir = support::tempdir();
    let gzip = dir.path().join("gzip");
    let mut l = Layout::create(&gzip);
    let upper = vec![
        Ent::dir("up").mode(0o755),
        Ent::file("up/small", "upper small\n").mode(0o644),
        Ent::file("up/big", support::pseudo_random(77, 300_000)).mode(0o644),
    ];
    let tars = [(support::tar_of(&files(), Fmt::Pax), Comp::Gzip), (support::tar_of(&upper, Fmt::Pax), Comp::Gzip)];
    l.add_image(Some("t"), "amd64", &tars);
    let chunked = dir.path().join("chunked");
    support::zstd_chunked_copy(&gzip, &chunked);
    let t = dir.path().to_path_buf();
    in_ns(move || {
        let f = layout(&chunked);
        let m = f.resolve("t").unwrap();
        let lower = m.layers[0].clone();
        let toc = match read_toc(&lower, |o, l| f.read_blob_range(&lower, o, l)).unwrap() {
            LayerToc::Seekable(t) => t,
            LayerToc::NotSeekable(why) => panic!("not seekable: {why}"),
        };
        let small = toc.entries.iter().find(|e| e.path == "etc/small").unwrap();
        let TocEntryKind::File { chunks, .. } = &small.kind else { panic!("etc/small is a file") };
        let at = chunks[0].compressed_offset;
        let (fetcher, faults) = faulty(layout(&chunked));
        faults.corrupt_ranges_of.lock().unwrap().replace(lower.digest);
        faults.corrupt.lock().unwrap().replace((at, at + 1));
        let cache_dir = t.join("cache");
        let cache = open(&cache_dir);
        let rootfs = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap();
        assert!(!rootfs.is_lazy());
        let st = rootfs.lazy_status();
        assert_eq!(st.eager.len(), 2, "{st:?}");
        assert_eq!(st.eager[0].0, lower.digest, "{st:?}");
        assert!(st.eager[0].1.contains("cannot be served lazily"), "{st:?}");
        // Nothing lazy is left mounted or half made: no view, no FUSE mount point.
        let lazy_dir = cache_dir.join("lazy");
        for n in names(&lazy_dir) {
            assert!(!n.starts_with("view."), "{n}");
            assert!(
                names(&lazy_dir.join(&n)).iter().all(|e| !e.starts_with("mnt.")),
                "{n}: {:?}",
                names(&lazy_dir.join(&n))
            );
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&cache_dir.display().to_string()), "{mounts}");
        // The tree is the whole pull's.
        let m = mount_ro(&rootfs, &t.join("m"));
        check_all(&m.0);
        assert_eq!(std::fs::read(m.0.join("up/small")).unwrap(), b"upper small\n");
        assert!(std::fs::read(m.0.join("up/big")).unwrap() == support::pseudo_random(77, 300_000));
    });
}

/// A TOC over the cache's extraction bounds is refused lazily as the whole layer would
/// be: the layer is pulled whole instead, whose extraction then fails on the same bound.
#[test]
fn a_toc_over_the_extraction_bounds_is_not_served() {
    if !require("a_toc_over_the_extraction_bounds_is_not_served") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let cache_dir = t.join("cache");
        let mut o = CacheOptions::default();
        o.unpack.max_uncompressed_bytes = Some(2 << 20); // the files are 6 MiB
        let cache = RootfsCache::open(&cache_dir, o).unwrap();
        let fetcher: Arc<dyn ImageFetcher> = Arc::new(layout(&img.chunked));
        let err = cache.ensure_lazy(fetcher, "t", &EnsureOptions::new()).unwrap_err();
        assert!(format!("{err:?}").contains("LimitExceeded"), "{err:?}");
        // Refused before anything of it was fetched or made.
        assert!(names(&cache_dir.join("lazy")).is_empty(), "{:?}", names(&cache_dir.join("lazy")));
        assert_eq!(cache.stats().leased_entries, 0);
    });
}

/// Found by the red team: `gc` over budget moved the data dir of a lazy layer being set
/// up (not yet in the live map, so an "orphan") to trash; the setup then failed, or
/// served from a data dir that was gone.
#[test]
fn gc_during_a_lazy_setup_leaves_its_data_alone() {
    if !require("gc_during_a_lazy_setup_leaves_its_data_alone") {
        return;
    }
    let img = images();
    let t = support::tempdir().path().to_path_buf();
    in_ns(move || {
        let info = TocInfo::of(&layout(&img.chunked), "t");
        let mut o = CacheOptions::default();
        o.max_bytes = 1;
        let cache_dir = t.join("cache");
        let cache = Arc::new(RootfsCache::open(&cache_dir, o).unwrap());
        drop(cache.ensure(&layout(&img.gzip), "t").unwrap()); // over budget: gc evicts
        let (fetcher, faults) = faulty(layout(&img.chunked));
        faults.hold(info.range("etc/small")); // the skeleton's small files
        let setup = {
            let c = Arc::clone(&cache);
            std::thread::spawn(move || c.ensure_lazy(fetcher, "t", &EnsureOptions::new()))
        };
        faults.wait_for_waiters(1);
        assert!(info.data_dir(&cache_dir).is_dir());
        cache.gc().unwrap();
        faults.release_all();
        let lazy = setup.join().unwrap().unwrap_or_else(|e| panic!("lazy ensure next to gc: {e}"));
        let m = mount_ro(&lazy, &t.join("m"));
        check_all(&m.0);
        assert!(lazy.wait_local(Some(Duration::from_secs(120))), "{:?}", lazy.lazy_status());
    });
}
