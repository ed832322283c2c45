//! [`RootfsCache`]: a digest-keyed cache of extracted layers, shared by every sandbox on
//! a node.
//!
//! The first restore of an image extracts each of its layers once (overlay whiteout
//! format, digest verified while streaming); every later restore finds them by digest
//! and gets a [`Rootfs`]: the layer directories, ready to be overlay lowers, and a lease
//! that keeps them from being evicted while in use. On-disk layout: see `layout.rs`
//! (`layers/<hex>/{fs,meta}`, `images/`, `leases/`, `tmp/`, `trash/`, `LOCK`).
//!
//! # Invariants
//! - A layer is *ready* when `layers/<hex>` exists: it is extracted into `tmp/` and
//!   renamed into place whole, with its record, so no partial layer is ever visible,
//!   even after a crash (`tmp/` is emptied at open, and entries that fail validation
//!   are moved to `trash/`, never served).
//! - A ready layer is never modified. It leaves only by eviction: renamed into `trash/`
//!   under the lock (it is then no longer served), deleted after the lock is released.
//! - A leased layer is never evicted, even over budget.
//!
//! # The cold path
//! A cold [`RootfsCache::ensure`] streams every missing layer at once, up to
//! [`CacheOptions::concurrent_layers`] per call: blob bytes from the fetcher → digest →
//! decompression → extraction into `tmp/`, never landing a blob on disk whole. A layer
//! finished before the ones below it waits in `tmp/` until they are ready, then the
//! parent directories it omits get the lower layers' metadata and it is renamed into
//! `layers/`; layers become ready bottom first. See `ensure.rs` for the scheduling.
//!
//! # Concurrency
//! One process owns a cache directory (`flock` on `LOCK`; a second [`RootfsCache::open`],
//! from any process, gets [`Error::Busy`]). Within it, every method takes `&self` and is
//! safe to call from many threads. One mutex guards the in-memory index; it is never held
//! during extraction or deletion. Concurrent [`RootfsCache::ensure`] calls needing the
//! same missing layer (for the same image or different ones) wait for a single
//! extraction; if it fails, every waiter gets the same error (as [`Error::Layer`]) and
//! nothing is cached, so the next call retries. `ensure` runs its downloads on scoped
//! worker threads (named `rootfs-ensure`), all joined before it returns.

mod ensure;
mod layout;
mod lazy;
mod metrics;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstatat};
use parking_lot::{Condvar, Mutex};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::{FetchObserver, ImageFetcher};
use crate::fsutil::{list_dir, remove_tree};
use crate::unpack::UnpackOptions;
use layout::{ImageRecord, LayerMeta};

pub use ensure::{EnsureOptions, EnsureProgress, LayerProgress, LayerState};
pub use lazy::LazyStatus;

/// Options for [`RootfsCache::open`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CacheOptions {
    /// Disk budget for extracted layers, in bytes of allocated blocks. Unleased layers
    /// are evicted, least recently used first, to stay within it. Default: unlimited.
    pub max_bytes: u64,
    /// How layers are extracted: ownership, device nodes, xattr policy, `userxattr`
    /// (rootless), limits. The cache always sets the whiteout mode (overlay), the
    /// expected digest and the parent lowers. Default: [`UnpackOptions::default`].
    pub unpack: UnpackOptions,
    /// `syncfs` each extracted layer before it is made visible, so a power loss cannot
    /// leave a ready layer with missing data. Process crashes are safe without it.
    /// Default: false.
    pub sync: bool,
    /// How many missing layers one [`RootfsCache::ensure`] downloads and extracts at
    /// once (per call, like containerd's `max_concurrent_downloads`); each also uses the
    /// extraction's own helper threads ([`UnpackOptions::pipelined`]). 0 counts as 1.
    /// Default: 3.
    pub concurrent_layers: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions { max_bytes: u64::MAX, unpack: UnpackOptions::default(), sync: false, concurrent_layers: 3 }
    }
}

/// Counters and gauges of a [`RootfsCache`], read with [`RootfsCache::stats`];
/// [`CacheStats::prometheus`] renders them for a metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Layers found ready when asked for.
    pub hits: u64,
    /// Layers that had to be extracted (or waited for).
    pub misses: u64,
    /// Extractions completed.
    pub extractions: u64,
    /// Bytes of layer blobs read by completed extractions.
    pub bytes_extracted: u64,
    /// Layers evicted.
    pub evictions: u64,
    /// Times an `ensure` waited for another caller's extraction instead of starting one.
    pub dedup_waits: u64,
    /// Disk usage of ready layers, in bytes.
    pub bytes_in_use: u64,
    /// Ready layers.
    pub entries: u64,
    /// Ready layers currently leased.
    pub leased_entries: u64,
    /// How far `bytes_in_use` exceeded the budget after the last eviction pass (only
    /// leased layers can cause this).
    pub over_budget_bytes: u64,
    /// Automatic eviction passes (after an extraction) that failed; `gc()` tells why.
    pub failed_gc_passes: u64,
    /// Bytes of layer blobs read from fetchers (compressed, as stored), failed
    /// downloads included.
    pub bytes_downloaded: u64,
    /// Requests a fetcher retried on the same host ([`FetchObserver::retry`]).
    pub download_retries: u64,
    /// Broken blob downloads a fetcher resumed ([`FetchObserver::resumed`]).
    pub resumed_downloads: u64,
    /// Times a fetcher gave up on a host and tried the next one
    /// ([`FetchObserver::fallback`]).
    pub host_fallbacks: u64,
}

/// What an eviction pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Layers evicted, least recently used first.
    pub evicted: Vec<Digest>,
    /// Disk bytes they used.
    pub evicted_bytes: u64,
    /// Image records dropped because a layer of theirs was evicted.
    pub removed_images: Vec<Digest>,
    /// Disk usage of ready layers after the pass.
    pub bytes_in_use: u64,
    /// Bytes over budget after the pass: what leased layers prevented from being freed.
    pub over_budget_bytes: u64,
}

struct Layer {
    meta: LayerMeta,
    /// Nanoseconds since the epoch; persisted as the mtime of `meta`.
    last_use: u64,
    persisted_use: u64,
    /// Live `Rootfs` values plus persisted leases holding this layer.
    leases: u32,
}

/// One extraction in progress; waiters read its outcome under the state lock.
struct Flight {
    outcome: OnceLock<std::result::Result<(), Arc<Error>>>,
    /// Leases that callers waiting for it want: its owner takes them for them when it
    /// publishes the layer, so it cannot be evicted before they see it. Changed only
    /// under the state lock.
    waiters: AtomicU32,
}

#[derive(Default)]
struct State {
    layers: HashMap<Digest, Layer>,
    images: HashMap<Digest, ImageRecord>,
    inflight: HashMap<Digest, Arc<Flight>>,
    /// Persisted leases by id.
    pins: HashMap<String, Vec<Digest>>,
    bytes: u64,
    /// Layers with at least one lease, kept as leases come and go so that reading it
    /// (every `ensure` publishes it) does not walk every layer.
    leased: u64,
    /// Lazy layers served by this process (see `lazy.rs`): never more than one per
    /// digest; their ready copies are never evicted while they are here.
    lazy: HashMap<Digest, Arc<lazy::LazyLayer>>,
}

impl State {
    /// Take a lease on a ready layer (no-op for a layer that is not there).
    fn lease(&mut self, d: &Digest) {
        if let Some(layer) = self.layers.get_mut(d) {
            if layer.leases == 0 {
                self.leased += 1;
            }
            layer.leases += 1;
        }
    }

    /// Release a lease taken with [`State::lease`].
    fn unlease(&mut self, d: &Digest) {
        if let Some(layer) = self.layers.get_mut(d) {
            debug_assert!(layer.leases > 0, "lease count underflow on {d}");
            if layer.leases > 0 {
                layer.leases -= 1;
                if layer.leases == 0 {
                    self.leased -= 1;
                }
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    extractions: AtomicU64,
    bytes_extracted: AtomicU64,
    evictions: AtomicU64,
    dedup_waits: AtomicU64,
    bytes_in_use: AtomicU64,
    entries: AtomicU64,
    leased: AtomicU64,
    over_budget: AtomicU64,
    failed_gc: AtomicU64,
}

/// The download counters, fed by fetchers through [`FetchObserver`] (and by the cache
/// for bytes). Shared with fetchers by `Arc`, apart from the rest of the cache, so a
/// fetcher holding on to it does not keep the cache open.
#[derive(Default)]
struct Downloads {
    bytes: AtomicU64,
    retries: AtomicU64,
    resumed: AtomicU64,
    fallbacks: AtomicU64,
}

impl FetchObserver for Downloads {
    fn retry(&self, _host: &str, _reason: &str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }
    fn resumed(&self, _host: &str, _offset: u64) {
        self.resumed.fetch_add(1, Ordering::Relaxed);
    }
    fn fallback(&self, _host: &str, _reason: &str) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
    }
}

struct Inner {
    root: PathBuf,
    opts: CacheOptions,
    state: Mutex<State>,
    done: Condvar,
    counters: Counters,
    downloads: Arc<Downloads>,
    seq: AtomicU64,
    /// One lazy layer set-up per digest at a time.
    lazy_setup: Mutex<HashMap<Digest, Arc<Mutex<()>>>>,
    /// What the lazy layers share: bytes read by range, the opens waiting on any of them.
    lazy_shared: Arc<crate::lazy::layer::Shared>,
    _lock: crate::lockfile::LockFile,
}

/// A digest-keyed cache of extracted image layers in one directory.
///
/// The first restore of an image extracts each of its layers once (overlay whiteout
/// format, digest verified while streaming); every later restore finds them by digest
/// and gets a [`Rootfs`]: the layer directories, ready to be overlay lowers, and a lease
/// that keeps them from being evicted while in use.
///
/// ```text
/// <dir>/LOCK  layers/<hex>/{fs/,meta}  images/<hex>  leases/<id>  tmp/  trash/
/// ```
///
/// # Invariants
/// - A layer is ready when `layers/<hex>` exists: it is extracted into `tmp/` and
///   renamed into place whole, with its record, so no partial layer is ever visible,
///   even after a crash (`tmp/` is emptied at open; entries that fail validation are
///   moved to `trash/`, never served). A ready layer is never modified.
/// - Eviction takes only unleased layers, least recently used first: renamed into
///   `trash/` under the lock (no longer served), deleted after it is released.
///
/// # Concurrency
/// One process owns a cache directory (`flock` on `LOCK`; a second [`RootfsCache::open`]
/// gets [`Error::Busy`]). Every method takes `&self` and may be called from many
/// threads; no lock is held while extracting or deleting. Concurrent
/// [`RootfsCache::ensure`] calls needing the same missing layer wait for one extraction;
/// if it fails they all get the same cause (as [`Error::Layer`]) and nothing is cached.
/// One `ensure` downloads and extracts up to [`CacheOptions::concurrent_layers`] layers
/// at once on its own scoped threads, joined before it returns.
pub struct RootfsCache {
    inner: Arc<Inner>,
}

/// An image's layers, ready to be overlay lower directories, and a lease on them:
/// while a `Rootfs` (or a persisted lease made with [`Rootfs::persist`]) exists, none of
/// its layers is evicted. Dropping it releases the in-memory lease.
///
/// A `Rootfs` keeps its cache open: the cache directory stays locked (a new
/// [`RootfsCache::open`] gets [`Error::Busy`]) until every `Rootfs` from it is dropped.
pub struct Rootfs {
    inner: Arc<Inner>,
    manifest: Digest,
    /// Bottom first.
    layers: Vec<Digest>,
    /// Top first, as overlayfs `lowerdir` wants them.
    lowers: Vec<PathBuf>,
    /// Data-only lowers (overlayfs `datadir+`), top first: the FUSE mounts serving the
    /// file data of lazy layers. Empty for an image that is all local.
    data_lowers: Vec<PathBuf>,
    /// The lazy layers it holds, one per occurrence, in the order of the first
    /// `lazy.len()` entries of `layers`: not leased in the state, kept alive (served) by
    /// these references instead.
    lazy: Vec<Arc<lazy::LazyLayer>>,
    /// Layers a lazy ensure pulled whole, and why.
    eager: Vec<(Digest, String)>,
    /// The merged skeleton of its lazy layers (its bottom lower).
    view: Option<lazy::View>,
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(op, path, e)
}

/// Write `contents` to `path` atomically: a temporary file in the same directory, then
/// `rename(2)`.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().expect("records live in a directory");
    let tmp = dir.join(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(contents).map_err(io("write", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("rename", path))
}

fn set_mtime(path: &Path, nanos: u64) -> Result<()> {
    let t = nix::sys::time::TimeSpec::from(Duration::from_nanos(nanos));
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &nix::sys::time::TimeSpec::UTIME_OMIT,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| Error::io("utimensat", path, e))
}

/// Remove everything inside `dir` (by descriptor, never following symlinks).
fn empty_dir(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io("opendir", dir))? {
        let entry = entry.map_err(io("readdir", dir))?;
        remove_path(&entry.path())?;
    }
    Ok(())
}

/// `remove_tree` for a trusted path of ours (a `trash/` or `tmp/` entry).
fn remove_path(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let parent = path.parent().expect("an entry of a cache directory");
    let name = path.file_name().expect("an entry of a cache directory");
    let dir = File::open(parent).map_err(io("open", parent))?;
    remove_tree(dir.as_fd(), name.as_bytes(), name.as_bytes(), None, path).map(drop)
}

/// Disk usage of a tree: allocated blocks, each inode counted once, symlinks not followed.
///
/// Iterative (one descriptor per level), so a deep tree costs descriptors, not stack.
fn disk_usage(dir: &Path) -> Result<u64> {
    const DIR: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);
    let is_dir = |mode: u32| mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits();
    let fd = openat(nix::fcntl::AT_FDCWD, dir, DIR, Mode::empty()).map_err(|e| Error::io("open", dir, e))?;
    let mut total = nix::sys::stat::fstat(&fd).map_err(|e| Error::io("fstat", dir, e))?.st_blocks as u64 * 512;
    let mut seen = HashSet::new();
    let first = list_dir(fd.as_fd(), dir)?;
    let mut stack = vec![(fd, first)];
    while let Some((fd, pending)) = stack.last_mut() {
        let Some(name) = pending.pop() else {
            stack.pop();
            continue;
        };
        let st =
            fstatat(&*fd, name.as_slice(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| Error::io("fstatat", dir, e))?;
        if st.st_nlink > 1 && !is_dir(st.st_mode) && !seen.insert(st.st_ino) {
            continue; // another name of an inode already counted
        }
        total += st.st_blocks as u64 * 512;
        if is_dir(st.st_mode) {
            let sub = openat(&*fd, name.as_slice(), DIR, Mode::empty()).map_err(|e| Error::io("openat", dir, e))?;
            let n = list_dir(sub.as_fd(), dir)?;
            stack.push((sub, n));
        }
    }
    Ok(total)
}

impl RootfsCache {
    /// Open (creating if needed) the cache in `dir` and take ownership of it.
    ///
    /// Empties `tmp/` and `trash/` (leftovers of a crash), loads layer, image and lease
    /// records, and moves any layer entry that fails validation into `trash/`.
    ///
    /// # Errors
    /// [`Error::Busy`] if another process (or another `RootfsCache` in this one) owns the
    /// directory; [`Error::Io`] if it cannot be created or read, or if leftovers in `tmp/`
    /// and `trash/`, invalid layer entries or stale records cannot be removed.
    pub fn open(dir: impl AsRef<Path>, opts: CacheOptions) -> Result<RootfsCache> {
        let root = dir.as_ref().to_path_buf();
        for sub in ["", layout::LAYERS, layout::IMAGES, layout::LEASES, layout::TMP, layout::TRASH, lazy::LAZY] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io("mkdir", &p))?;
        }
        let lock_path = root.join(layout::LOCK);
        let lock = crate::lockfile::LockFile::acquire(&lock_path, &root)?;
        empty_dir(&root.join(layout::TMP))?;
        empty_dir(&root.join(layout::TRASH))?;

        let mut st = State::default();
        let layers_dir = root.join(layout::LAYERS);
        for entry in fs::read_dir(&layers_dir).map_err(io("opendir", &layers_dir))? {
            let entry = entry.map_err(io("readdir", &layers_dir))?;
            let name = entry.file_name();
            let loaded = name.to_str().and_then(|n| Digest::from_hex(n).ok()).and_then(|d| {
                let meta_path = entry.path().join(layout::META);
                let meta = LayerMeta::decode(&fs::read_to_string(&meta_path).ok()?)?;
                entry.path().join(layout::FS).is_dir().then_some(())?;
                let mtime = fs::metadata(&meta_path).ok()?.modified().ok()?;
                let used = mtime.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
                Some((d, meta, used))
            });
            match loaded {
                Some((d, meta, used)) => {
                    st.bytes += meta.size;
                    st.layers.insert(d, Layer { meta, last_use: used, persisted_use: used, leases: 0 });
                }
                None => {
                    // Not a layer we made, or damaged: never served.
                    let to = root.join(layout::TRASH).join(format!("invalid-{}", name.to_string_lossy()));
                    fs::rename(entry.path(), &to).map_err(io("rename", &entry.path()))?;
                    remove_path(&to)?;
                }
            }
        }
        lazy::recover(&root, &st.layers)?;
        let images_dir = root.join(layout::IMAGES);
        for entry in fs::read_dir(&images_dir).map_err(io("opendir", &images_dir))? {
            let entry = entry.map_err(io("readdir", &images_dir))?;
            let rec = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
                .and_then(|d| Some((d, ImageRecord::decode(&fs::read_to_string(entry.path()).ok()?)?)));
            match rec {
                Some((d, r)) if r.layers.iter().all(|l| st.layers.contains_key(l)) => {
                    st.images.insert(d, r);
                }
                // A record of an image that lost a layer, or junk (a temporary file).
                _ => fs::remove_file(entry.path()).map_err(io("unlink", &entry.path()))?,
            }
        }
        let leases_dir = root.join(layout::LEASES);
        for entry in fs::read_dir(&leases_dir).map_err(io("opendir", &leases_dir))? {
            let entry = entry.map_err(io("readdir", &leases_dir))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            let pins = layout::valid_lease_id(&id)
                .then(|| fs::read_to_string(entry.path()).ok())
                .flatten()
                .and_then(|t| layout::decode_lease(&t));
            match pins {
                Some(pins) => {
                    for l in &pins {
                        st.lease(l);
                    }
                    st.pins.insert(id, pins);
                }
                None => fs::remove_file(entry.path()).map_err(io("unlink", &entry.path()))?,
            }
        }
        let inner = Arc::new(Inner {
            root,
            opts,
            state: Mutex::new(st),
            done: Condvar::new(),
            counters: Counters::default(),
            downloads: Arc::default(),
            seq: AtomicU64::new(0),
            lazy_setup: Mutex::new(HashMap::new()),
            lazy_shared: Arc::default(),
            _lock: lock,
        });
        inner.publish(&inner.state.lock());
        Ok(RootfsCache { inner })
    }

    /// The cache directory.
    pub fn path(&self) -> &Path {
        &self.inner.root
    }

    /// Make `reference` ready and lease its layers: [`RootfsCache::ensure_with`] with
    /// the default [`EnsureOptions`] (no progress observer).
    ///
    /// # Errors
    /// As [`RootfsCache::ensure_with`].
    pub fn ensure(&self, fetcher: &dyn ImageFetcher, reference: &str) -> Result<Rootfs> {
        self.ensure_with(fetcher, reference, &EnsureOptions::default())
    }

    /// Make `reference` ready and lease its layers, reporting progress per layer to
    /// [`EnsureOptions::progress`].
    ///
    /// `reference` is a tag or `@sha256:<hex>` (meaning whatever `fetcher` accepts). A
    /// digest reference whose image and layers are all cached is answered from memory,
    /// without calling `fetcher` at all. Otherwise the reference is resolved
    /// ([`ImageFetcher::resolve_observed`]), and every missing layer is fetched
    /// ([`ImageFetcher::open_blob_observed`]) and extracted once, streamed (no blob is
    /// stored whole), up to [`CacheOptions::concurrent_layers`] layers at once on worker
    /// threads, bottom layers first; an extraction of the same layer already in
    /// progress (another caller's) is waited for instead. A layer that finishes before
    /// the ones below it waits, in `tmp/`, until they are ready: parent directories it
    /// omits then get their metadata (mode, owner, xattrs, mtime) from the layers below,
    /// as if they had been extracted in order, and it is renamed into `layers/`. Layers
    /// are leased as they become ready, and released if the call fails. An eviction pass
    /// follows when anything was extracted (its failure is counted in
    /// [`CacheStats::failed_gc_passes`], not returned).
    ///
    /// The progress observer is called from the calling thread and from the worker
    /// threads, several at once (see [`EnsureProgress`]). All worker threads have ended
    /// when this returns, whatever the outcome. A panic in the observer or in the
    /// fetcher (its `open_blob` or its reader) is passed on to the caller, after the
    /// call's leases and `tmp/` entries are given back and callers waiting for its
    /// layers are told they failed.
    ///
    /// # Errors
    /// - the fetcher's errors from [`ImageFetcher::resolve`], unchanged;
    /// - [`Error::Layer`] naming the layer when its blob cannot be fetched
    ///   ([`ImageFetcher::open_blob`]) or extracted ([`Error::DigestMismatch`], a blob
    ///   longer than its descriptor's size ([`Error::Read`], cut off there),
    ///   [`Error::PathEscape`], a full disk...; see [`unpack`](crate::unpack())), the same
    ///   error for every caller waiting on that extraction ([`Error::root`] gives the
    ///   cause). When several layers fail, the lowest one is reported; the layers below
    ///   it are made ready (and cached), none above it is, and nothing is left in `tmp/`.
    ///   Callers waiting for a layer above a failed one get an [`Error::Layer`] naming
    ///   their layer, caused by an [`Error::Layer`] naming the failed one;
    /// - [`Error::Io`] if the image record cannot be written.
    pub fn ensure_with(&self, fetcher: &dyn ImageFetcher, reference: &str, opts: &EnsureOptions<'_>) -> Result<Rootfs> {
        let _span = span!("ensure", reference);
        let inner = &self.inner;
        if let Some(d) = layout::digest_ref(reference) {
            let mut st = inner.state.lock();
            if let Some(rec) = st.images.get(&d) {
                let layers = rec.layers.clone();
                let manifest = rec.manifest.unwrap_or(d);
                if layers.iter().all(|l| st.layers.contains_key(l)) {
                    let now = now_nanos();
                    for l in &layers {
                        st.lease(l);
                        st.layers.get_mut(l).expect("checked").last_use = now;
                    }
                    inner.counters.hits.fetch_add(layers.len() as u64, Ordering::Relaxed);
                    inner.publish(&st);
                    drop(st);
                    // The lease is owned before the observer runs: if it panics, the
                    // unwinding drop gives the leases back.
                    let rootfs = Rootfs::new(inner.clone(), manifest, layers);
                    let layers = rootfs.layers();
                    if let Some(p) = opts.progress {
                        // Sizes of blobs are not recorded: `total` is unknown (0) here.
                        let mut seen = HashSet::new();
                        for (index, digest) in layers.iter().enumerate().filter(|(_, d)| seen.insert(**d)) {
                            p.layer(&LayerProgress {
                                index,
                                digest: *digest,
                                state: LayerState::Cached,
                                downloaded: 0,
                                extracted: 0,
                                total: 0,
                            });
                        }
                    }
                    return Ok(rootfs);
                }
            }
        }
        let manifest = fetcher.resolve_observed(reference, &*inner.downloads)?;
        let before = inner.counters.extractions.load(Ordering::Relaxed);
        let mut partial = self.ensure_layers(fetcher, &manifest, opts, &[])?;
        // Anything extracted meanwhile, by this call or another one.
        if inner.counters.extractions.load(Ordering::Relaxed) != before {
            // The automatic eviction pass after extracting. Its failure (say, a `trash/`
            // entry that cannot be deleted) must not fail a restore whose layers are
            // ready: it is counted, and an explicit `gc()` reports it.
            if self.gc().is_err() {
                inner.counters.failed_gc.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.record_image(reference, &manifest, &partial.layers)?;
        partial.lowers = lowers_of(&inner.root, &partial.layers);
        Ok(partial)
    }

    /// Evict least-recently-used unleased layers until the cache fits its budget, then
    /// persist last-use times.
    ///
    /// # Errors
    /// [`Error::Io`] if a layer cannot be moved to `trash/` or deleted, an image record
    /// cannot be removed, or a last-use time cannot be written.
    pub fn gc(&self) -> Result<GcReport> {
        let inner = &self.inner;
        let mut report = GcReport::default();
        let mut doomed = Vec::new();
        {
            let mut st = inner.state.lock();
            if st.bytes > inner.opts.max_bytes {
                // Data a previous process fetched for a lazy layer nobody serves now goes
                // first.
                doomed.extend(lazy::trash_orphans(inner, &st)?);
                let mut candidates: Vec<(u64, Digest)> = st
                    .layers
                    .iter()
                    .filter(|(d, l)| l.leases == 0 && !st.lazy.contains_key(d))
                    .map(|(d, l)| (l.last_use, *d))
                    .collect();
                candidates.sort();
                for (_, d) in candidates {
                    if st.bytes <= inner.opts.max_bytes {
                        break;
                    }
                    let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
                    let to = inner.root.join(layout::TRASH).join(format!("{}.{seq}", d.hex()));
                    let from = layout::layer_dir(&inner.root, &d);
                    fs::rename(&from, &to).map_err(io("rename", &from))?;
                    let layer = st.layers.remove(&d).expect("candidate");
                    st.bytes -= layer.meta.size;
                    report.evicted.push(d);
                    report.evicted_bytes += layer.meta.size;
                    doomed.push(to);
                }
                let gone: HashSet<Digest> = report.evicted.iter().copied().collect();
                let dropped: Vec<Digest> = st
                    .images
                    .iter()
                    .filter(|(_, r)| r.layers.iter().any(|l| gone.contains(l)))
                    .map(|(d, _)| *d)
                    .collect();
                for d in dropped {
                    st.images.remove(&d);
                    let f = layout::image_file(&inner.root, &d);
                    fs::remove_file(&f).map_err(io("unlink", &f))?;
                    report.removed_images.push(d);
                }
            }
            report.bytes_in_use = st.bytes;
            report.over_budget_bytes = st.bytes.saturating_sub(inner.opts.max_bytes);
            inner.counters.evictions.fetch_add(report.evicted.len() as u64, Ordering::Relaxed);
            inner.counters.over_budget.store(report.over_budget_bytes, Ordering::Relaxed);
            inner.publish(&st);
        }
        // Phase two, outside the lock: nothing serves these any more.
        for p in doomed {
            remove_path(&p)?;
        }
        self.flush_last_use()?;
        Ok(report)
    }

    /// Persist last-use times changed since the last flush (as `meta` mtimes).
    fn flush_last_use(&self) -> Result<()> {
        let changed: Vec<(Digest, u64)> = {
            let mut st = self.inner.state.lock();
            st.layers
                .iter_mut()
                .filter(|(_, l)| l.last_use != l.persisted_use)
                .map(|(d, l)| {
                    l.persisted_use = l.last_use;
                    (*d, l.last_use)
                })
                .collect()
        };
        for (d, t) in changed {
            let p = layout::layer_dir(&self.inner.root, &d).join(layout::META);
            match set_mtime(&p, t) {
                Err(e) if e.raw_os_error() == Some(libc_enoent()) => {} // evicted meanwhile
                r => r?,
            }
        }
        Ok(())
    }

    /// Counters and gauges; cheap (atomics only).
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            extractions: c.extractions.load(Ordering::Relaxed),
            bytes_extracted: c.bytes_extracted.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            dedup_waits: c.dedup_waits.load(Ordering::Relaxed),
            bytes_in_use: c.bytes_in_use.load(Ordering::Relaxed),
            entries: c.entries.load(Ordering::Relaxed),
            leased_entries: c.leased.load(Ordering::Relaxed),
            over_budget_bytes: c.over_budget.load(Ordering::Relaxed),
            failed_gc_passes: c.failed_gc.load(Ordering::Relaxed),
            bytes_downloaded: self.inner.downloads.bytes.load(Ordering::Relaxed),
            download_retries: self.inner.downloads.retries.load(Ordering::Relaxed),
            resumed_downloads: self.inner.downloads.resumed.load(Ordering::Relaxed),
            host_fallbacks: self.inner.downloads.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// The ready layers, with their disk usage and whether they are leased.
    pub fn layers(&self) -> Vec<(Digest, u64, bool)> {
        let st = self.inner.state.lock();
        let mut v: Vec<_> = st.layers.iter().map(|(d, l)| (*d, l.meta.size, l.leases > 0)).collect();
        v.sort();
        v
    }

    /// Release a persisted lease made by [`Rootfs::persist`].
    ///
    /// # Errors
    /// [`Error::NotFound`] for an unknown id; [`Error::Io`] if its file cannot be removed.
    pub fn release(&self, id: &str) -> Result<()> {
        let mut st = self.inner.state.lock();
        if !st.pins.contains_key(id) {
            return Err(Error::NotFound { what: format!("lease {id:?}") });
        }
        // The record first: if it cannot be removed, the lease stays (listed, retryable).
        let f = self.inner.root.join(layout::LEASES).join(id);
        fs::remove_file(&f).map_err(io("unlink", &f))?;
        let pins = st.pins.remove(id).unwrap_or_default();
        for l in pins {
            st.unlease(&l);
        }
        self.inner.publish(&st);
        Ok(())
    }

    /// Ids of the persisted leases.
    pub fn leases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.inner.state.lock().pins.keys().cloned().collect();
        v.sort();
        v
    }
}

fn libc_enoent() -> i32 {
    Errno::ENOENT as i32
}

impl Drop for RootfsCache {
    fn drop(&mut self) {
        // Last-use times are best effort; errors have nowhere to go from a Drop.
        let _ = self.flush_last_use();
    }
}

impl Inner {
    /// Refresh the gauges read by [`RootfsCache::stats`].
    fn publish(&self, st: &State) {
        let c = &self.counters;
        c.bytes_in_use.store(st.bytes, Ordering::Relaxed);
        c.entries.store(st.layers.len() as u64, Ordering::Relaxed);
        c.leased.store(st.leased, Ordering::Relaxed);
    }
}

/// Lower directories, top first, of layers listed bottom first.
///
/// A layer listed twice (two identical empty `RUN` layers are common) appears once, at
/// its top-most position: overlayfs refuses a lower listed twice (`ELOOP`), and
/// stacking `L, M, L, R` shows the same tree as `L, M, R`, since the upper copy of `L`
/// re-adds or hides again everything its lower copy does.
fn lowers_of(root: &Path, layers: &[Digest]) -> Vec<PathBuf> {
    let mut seen = std::collections::HashSet::with_capacity(layers.len());
    layers.iter().rev().filter(|d| seen.insert(*d)).map(|d| layout::layer_fs(root, d)).collect()
}

impl Rootfs {
    /// A `Rootfs` over `layers`, which the caller has leased: dropping it releases them.
    fn new(inner: Arc<Inner>, manifest: Digest, layers: Vec<Digest>) -> Rootfs {
        let lowers = lowers_of(&inner.root, &layers);
        Rootfs {
            inner,
            manifest,
            layers,
            lowers,
            data_lowers: Vec::new(),
            lazy: Vec::new(),
            eager: Vec::new(),
            view: None,
        }
    }

    /// The lower directories, top layer first (the order of overlayfs `lowerdir=`),
    /// each layer once even when the image lists it twice.
    pub fn lowers(&self) -> &[PathBuf] {
        &self.lowers
    }

    /// The data-only lower directories, top first, for overlayfs `datadir+` (or `::` in
    /// a `lowerdir=` string), after every [`lowers`](Rootfs::lowers) entry: the FUSE
    /// mounts serving the file data of layers ensured lazily
    /// (`RootfsCache::ensure_lazy`). Empty when every layer is local; an overlay over
    /// [`lowers`](Rootfs::lowers) alone is then complete.
    pub fn data_lowers(&self) -> &[PathBuf] {
        &self.data_lowers
    }

    /// Whether any layer is served lazily (its data through a data-only lower), even if
    /// complete by now: see [`lazy_status`](Rootfs::lazy_status).
    pub fn is_lazy(&self) -> bool {
        !self.lazy.is_empty()
    }

    /// Where the lazy layers of this `Rootfs` stand (all zero for an eager one).
    pub fn lazy_status(&self) -> LazyStatus {
        let mut s =
            LazyStatus { eager: self.eager.clone(), passthrough: !self.lazy.is_empty(), ..LazyStatus::default() };
        let mut seen = HashSet::new();
        for l in self.lazy.iter().filter(|l| seen.insert(l.digest)) {
            s.layers += 1;
            if l.status.complete.load(Ordering::Relaxed) {
                s.complete += 1;
            }
            let store = &l.store;
            s.total_bytes +=
                (0..store.ids.len()).filter(|&id| store.placeholder[id]).map(|id| store.size(id)).sum::<u64>();
            let complete = l.status.complete.load(Ordering::Relaxed);
            s.local_bytes += (0..store.ids.len())
                .filter(|&id| store.placeholder[id] && (complete || store.is_local(id)))
                .map(|id| store.size(id))
                .sum::<u64>();
            if s.last_error.is_none() {
                s.last_error = l.status.last_error.lock().clone();
            }
            l.add_server_stats(&mut s);
        }
        s.fetched_bytes = self.inner.lazy_shared.fetched.load(Ordering::Relaxed);
        s
    }

    /// Wait until every lazy layer of this `Rootfs` is complete (an ordinary layer in the
    /// cache: a new `ensure` needs no network and no FUSE), or `timeout` passes. Returns
    /// whether they are. The sandboxes over this `Rootfs` keep their lazy view; their
    /// data is local from now on (no fetch can fail any more).
    /// A completion whose blob does not match its digest (or is refused by the
    /// extractor) is tried again less and less often, up to every 10 minutes, in case
    /// the registry is mended; [`LazyStatus::last_error`] says so meanwhile.
    pub fn wait_local(&self, timeout: Option<Duration>) -> bool {
        let start = std::time::Instant::now();
        loop {
            if self.lazy.iter().all(|l| l.status.complete.load(Ordering::Relaxed)) {
                return true;
            }
            if timeout.is_some_and(|t| start.elapsed() >= t) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The layer digests, bottom first.
    pub fn layers(&self) -> &[Digest] {
        &self.layers
    }

    /// The image manifest digest.
    pub fn manifest_digest(&self) -> Digest {
        self.manifest
    }

    /// Persist this lease as `leases/<id>`, so its layers stay pinned across restarts of
    /// the process until [`RootfsCache::release`] (for sandboxes that outlive it).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for an id that is not 1–128 of `[A-Za-z0-9._-]` (not
    /// starting with a dot) or is already in use; [`Error::Io`] if the record cannot be
    /// written.
    pub fn persist(&self, id: &str) -> Result<()> {
        if !layout::valid_lease_id(id) {
            return Err(Error::Unsupported { what: format!("lease id {id:?} (use 1-128 of [A-Za-z0-9._-])") });
        }
        if !self.lazy.is_empty() {
            return Err(Error::Unsupported {
                what:
                    "persisting a lease on lazy layers (this process serves their data; wait_local, then ensure again)"
                        .into(),
            });
        }
        let mut st = self.inner.state.lock();
        if st.pins.contains_key(id) {
            return Err(Error::Unsupported { what: format!("lease id {id:?} is already in use") });
        }
        let f = self.inner.root.join(layout::LEASES).join(id);
        write_atomic(&f, layout::encode_lease(&self.layers).as_bytes())?;
        for l in &self.layers {
            st.lease(l);
        }
        st.pins.insert(id.to_string(), self.layers.clone());
        self.inner.publish(&st);
        Ok(())
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let lazy = std::mem::take(&mut self.lazy);
        let mut st = self.inner.state.lock();
        // The lazy layers come first in `layers`, one per occurrence, held by reference,
        // not leased; every layer after them is leased (even one that is also lazy
        // lower down: it was pulled whole above a layer that is not seekable).
        for l in self.layers.iter().skip(lazy.len()) {
            st.unlease(l);
        }
        self.inner.publish(&st);
        drop(st);
        if !lazy.is_empty() {
            drop(lazy);
            lazy::reap(&self.inner);
        }
        // The skeleton goes while `inner` (and so the cache's LOCK) is still held: the
        // fields drop after this, `inner` first, and a new open of the directory must not
        // meet a view being deleted.
        drop(self.view.take());
    }
}

impl std::fmt::Debug for Rootfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rootfs").field("manifest", &self.manifest).field("lowers", &self.lowers).finish()
    }
}
