//! [`RootfsCache::ensure_lazy`]: an image whose seekable layers are served before their
//! data is local, completed in the background into ordinary layers.
//!
//! ```text
//! ensure_lazy:
//!   the image's bottom layers, as long as each is seekable (read_toc) or lazy already:
//!     per layer (shared by every Rootfs of this process): small files + prefetch list
//!       fetched (coalesced range reads) into lazy/<hex>/data, FUSE data-only lower at
//!       lazy/<hex>/mnt.<n>, completion thread started
//!     per Rootfs: ONE skeleton of those layers merged (lazy/view.<n>): each layer's
//!       rebuilt tar extracted in order (whiteouts applied), its placeholders marked
//!   the layers above (from the first one that is cached or not seekable): as ensure
//!     (leased or pulled whole), their omitted parents from the skeleton; reasons kept
//!   lowers = [those layers, top first] + [the skeleton]; data lowers = the FUSE mounts
//! completion thread (per lazy layer, at nice 19, from when ensure_lazy returns):
//!   the prefetch list's files; then, once the lazy layers below are complete, the
//!   layer pulled whole by ensure's own path (blob streamed and verified against its
//!   digest, extracted, made ready in layers/<hex>), its reads waiting while opens
//!   wait; retried with backoff until the cache closes. The data-only lower then
//!   serves what was never fetched from the ready copy (leased while the lazy layer
//!   lives); new ensures use the ready layer, no FUSE.
//!
//! A lazy layer never puts into `layers/` anything built from its TOC: the TOC is
//! vouched for only by the manifest that carries it, while `layers/<hex>` is trusted by
//! every image naming that blob digest.
//! ```
//!
//! # Why one merged skeleton
//! overlayfs (6.18) follows a lower metacopy file into a data-only layer with
//! `metacopy=off` (rule 6: uppers must stay plain) only when no regular lower lies below
//! it: a placeholder in a lower above another fails with `EPERM` ("refusing to follow
//! metacopy origin"). So the lazy layers are merged into one skeleton that is the bottom
//! lower, and lazy mode covers the image's bottom layers up to the first one that is
//! cached already or not seekable (a cached base under lazy layers would have to be
//! merged too: not done yet; such images are pulled whole above the base).
//!
//! # Lifetimes
//! Every live lazy layer is in the state's `lazy` map, so there is at most one per
//! digest. [`Rootfs`] values hold it (its FUSE server serves as long as one does); it
//! leaves the map once complete and held by nobody else, and then its mount and data go.
//! A lazy layer's ready copy is never evicted while it is in the map. When the cache
//! closes, incomplete layers stop: their fetched data stays in `lazy/<hex>/data/` for
//! the next process, which fetches only the rest.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::layout;
use super::{Inner, Layer, Rootfs, RootfsCache, io, remove_path, write_atomic};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::{Descriptor, ImageFetcher, ImageManifest};
use crate::lazy::layer::{self as store, Store};
use crate::lazy::synth::{FileData, tar_stream};
use crate::lazy::{LayerToc, read_toc};
use crate::unpack::{WhiteoutMode, unpack_cache_entry};

use super::ensure::{EnsureOptions, EnsureProgress, LayerProgress, LayerState};

/// A skeleton build has not failed.
const NOT_FAILED: usize = usize::MAX;
/// A skeleton build failed, not on a layer's data (making its directory, renaming it).
const NOT_A_LAYER: usize = usize::MAX - 1;

/// Directory of lazy layers in the cache.
pub(super) const LAZY: &str = "lazy";

/// One lazy layer served by this process.
pub(crate) struct LazyLayer {
    pub(super) digest: Digest,
    pub(super) store: Arc<Store>,
    /// The data-only lower (a FUSE mount).
    pub(super) mnt: PathBuf,
    /// `lazy/<hex>`.
    dir: PathBuf,
    #[cfg(feature = "lazy")]
    server: Option<crate::lazy::fuse::DataServer>,
    pub(super) status: Arc<Status>,
    /// To give back the lease on the ready copy (taken at completion).
    cache: Weak<Inner>,
}

/// What the completion of a lazy layer has done.
#[derive(Default)]
pub(crate) struct Status {
    /// Its ordinary layer is ready in `layers/`.
    pub(super) complete: std::sync::atomic::AtomicBool,
    /// The last error of the background work (cleared by progress).
    pub(super) last_error: parking_lot::Mutex<Option<String>>,
    /// Set when the `ensure_lazy` that made the layer has returned: the background work
    /// waits for it, so that it never competes with building the skeleton (nor with the
    /// first reads of the sandbox, which it then yields to anyway).
    pub(super) go: std::sync::atomic::AtomicBool,
    /// The layer holds a lease on its ready copy (which serves what was not fetched).
    leased: std::sync::atomic::AtomicBool,
    /// The layer is gone without being complete (its last holder dropped it): the lazy
    /// layers above it stop waiting for it (their completion pulls it whole itself).
    pub(super) dead: std::sync::atomic::AtomicBool,
}

/// Longest wait between two tries of a completion that failed on the network.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest wait between two tries of a completion that failed on the blob's bytes (not
/// on the network): a registry that serves other bytes than the digest names is asked
/// again, in case a mirror is mended, but not for the whole blob every 30 s.
const REFUSED_BACKOFF_MAX: Duration = Duration::from_secs(600);

/// Whether the completion's error `e` is about the blob's bytes (a digest that does not
/// match, a stream the decompressor or the extractor refuses, a limit): the next try
/// fetches the same bytes unless the registry is mended. A read error counts only when
/// this completion's own stream (`own`) gave bytes and never failed (an error of the
/// network, or of another caller's download it waited for, is not the bytes' fault). A
/// local error (a full disk) is not either.
fn is_refused(e: &Error, own: &SourceSeen) -> bool {
    match e {
        Error::Layer { source, .. } => is_refused(source, own),
        Error::DigestMismatch { .. }
        | Error::ContentMismatch { .. }
        | Error::InvalidArchive { .. }
        | Error::LimitExceeded { .. }
        | Error::PathEscape { .. }
        | Error::InvalidImage { .. } => true,
        Error::Read { .. } => own.read.load(Ordering::Relaxed) && !own.failed.load(Ordering::Relaxed),
        _ => false,
    }
}

/// Lets the completion of the lazy layers an `ensure_lazy` made start when it returns,
/// whatever way it returns.
struct StartOnDrop(Vec<Arc<Status>>);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        for s in &self.0 {
            s.go.store(true, Ordering::Relaxed);
        }
    }
}

impl LazyLayer {
    /// Add this layer's FUSE figures to `s`.
    pub(super) fn add_server_stats(&self, s: &mut LazyStatus) {
        #[cfg(feature = "lazy")]
        if let Some(server) = &self.server {
            let st = server.stats();
            s.waited_opens += st.waited_opens.load(Ordering::Relaxed);
            s.failed_fetches += st.failed_fetches.load(Ordering::Relaxed);
            s.passthrough &= server.passthrough();
            return;
        }
        s.passthrough = false;
    }
}

impl Drop for LazyLayer {
    fn drop(&mut self) {
        self.store.stop.store(true, Ordering::Relaxed);
        self.status.dead.store(true, Ordering::Relaxed);
        if self.status.leased.load(Ordering::Relaxed) {
            if let Some(inner) = self.cache.upgrade() {
                let mut st = inner.state.lock();
                st.unlease(&self.digest);
                inner.publish(&st);
            }
        }
        #[cfg(feature = "lazy")]
        drop(self.server.take());
        // Best effort: the next open cleans what is left.
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.mnt);
        if self.status.complete.load(Ordering::Relaxed) {
            let _ = remove_path(&self.dir);
        }
    }
}

/// Progress of the lazy layers of a [`Rootfs`], from [`Rootfs::lazy_status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LazyStatus {
    /// Layers served lazily by this `Rootfs` (each once).
    pub layers: usize,
    /// Of those, the ones complete: ready in the cache as ordinary layers.
    pub complete: usize,
    /// Bytes of file data served by the data-only lowers, in all.
    pub total_bytes: u64,
    /// Of those, the bytes local already.
    pub local_bytes: u64,
    /// Bytes of the layers' blobs read so far (range reads: skeletons, opens, completion).
    pub fetched_bytes: u64,
    /// The last error the background work met (it retries), if it has not made progress
    /// since.
    pub last_error: Option<String>,
    /// Layers pulled whole instead, and why (not seekable: `plain gzip layer ...`).
    pub eager: Vec<(Digest, String)>,
    /// Opens that waited for a fetch, in all.
    pub waited_opens: u64,
    /// Fetches for opens that failed (their opens got `EIO`).
    pub failed_fetches: u64,
    /// Whether every data-only lower hands fetched files to the kernel (FUSE
    /// passthrough: reads at native speed); false for none or where refused.
    pub passthrough: bool,
}

/// Offsets the indexes of a sub-image's progress events to the whole image's.
struct Offset<'a> {
    inner: &'a dyn EnsureProgress,
    base: usize,
}

impl EnsureProgress for Offset<'_> {
    fn layer(&self, l: &LayerProgress) {
        let mut l = l.clone();
        l.index += self.base;
        self.inner.layer(&l);
    }
}

impl RootfsCache {
    /// Make `reference` usable at once: like [`RootfsCache::ensure_with`], except that
    /// each missing *seekable* layer (zstd:chunked or eStargz with a verified TOC, see
    /// [`read_toc`]) is not downloaded: its metadata skeleton is made (directories,
    /// links, devices, whiteouts, xattrs, and every file of up to 16 KiB with its data:
    /// the layers' skeletons merged into one) and the rest of its file data is served by a
    /// FUSE data-only lower that fetches a file, by range reads of the blob, when it is
    /// first opened. The returned [`Rootfs`] lists the skeletons in
    /// [`lowers`](Rootfs::lowers) and the FUSE mounts in
    /// [`data_lowers`](Rootfs::data_lowers): mount both (the kernel overlay backend does;
    /// Linux 6.5+ for data-only lowers, 6.9+ for FUSE passthrough, which makes reads of
    /// fetched data run at native speed).
    ///
    /// Meanwhile a background thread per lazy layer (at the lowest CPU priority, its
    /// reads waiting while opens wait) pulls the layer whole the way `ensure` does (blob
    /// digest verified) and makes it an ordinary cached layer: later `ensure` calls use it
    /// without FUSE, and running sandboxes keep their lazy view, now served from it with
    /// no network (or [`detach`](crate::Workspace::detach)).
    /// [`Rootfs::lazy_status`] and [`Rootfs::wait_local`] follow it. The fetcher is kept
    /// (hence the `Arc`) for as long as the background work runs.
    ///
    /// Lazy mode covers the image's bottom layers up to the first one that is cached
    /// already or not seekable; that layer and the ones above are used or pulled whole
    /// as by `ensure` (overlayfs follows a placeholder into a data-only lower with
    /// `metacopy=off` only from the bottom regular lower: see `cache/lazy.rs`). Where
    /// this process cannot mount FUSE (no `/dev/fuse`, not root in its namespace) the
    /// whole image is pulled as by `ensure`. The reasons are in [`LazyStatus::eager`].
    /// Progress events report a lazy layer as [`LayerState::Lazy`].
    ///
    /// # Guarantees
    /// A read of data that cannot be fetched fails with `EIO` once the fetcher has given
    /// up (never blocks for ever on a fetcher that returns, never returns bytes that do not
    /// match the TOC's chunk digests, which are checked before a file is made visible). If
    /// this process dies, reads of data not yet opened fail with `ENOTCONN`. Fetched
    /// files survive a restart of the process (they are whole and verified), so a new
    /// lazy ensure fetches only the rest; a layer is never ready before all its data is
    /// local and its tree is extracted whole.
    ///
    /// # Limits
    /// A `Rootfs` with lazy layers cannot be [`persist`](Rootfs::persist)ed (its data is
    /// served by this process), and a workspace over it mounts only with the kernel
    /// backend. A completion in progress keeps the cache open (its directory locked)
    /// until its download ends, even once every handle is dropped. Mounting FUSE needs root, or an unprivileged user namespace (then the
    /// cache must use `userxattr`; FUSE passthrough is not available there, so reads go
    /// through the server).
    ///
    /// A layer whose lazy setup fails (its TOC cannot be fetched or verified:
    /// [`Error::InvalidToc`], [`Error::UnverifiedToc`]; a mirror that refuses range
    /// reads; its small files' chunks do not match the TOC: [`Error::BlobRangeMismatch`];
    /// a TOC over the cache's extraction bounds (`max_entries`, its files' sizes summed
    /// against `max_uncompressed_bytes`); its FUSE lower cannot be mounted) is not an
    /// error: it and the layers above are pulled whole, the reason in
    /// [`LazyStatus::eager`]. If the blob itself is bad, that pull's checks fail the call.
    ///
    /// # Errors
    /// As [`RootfsCache::ensure_with`]; [`Error::Unsupported`] without the `lazy`
    /// feature. A failed call gives back the leases it took and leaves no skeleton
    /// behind; lazy layers it set up before the failure stay served and complete in the
    /// background (as `ensure` keeps the layers below a failed one), and data files it
    /// fetched stay for the next try.
    pub fn ensure_lazy(
        &self,
        fetcher: Arc<dyn ImageFetcher>,
        reference: &str,
        opts: &EnsureOptions<'_>,
    ) -> Result<Rootfs> {
        if !cfg!(feature = "lazy") {
            return Err(Error::Unsupported { what: "lazy ensure (built without the `lazy` feature)".into() });
        }
        let _span = span!("ensure_lazy", reference);
        let inner = &self.inner;
        if let Some(why) = lazy_unavailable() {
            let mut rootfs = self.ensure_with(&*fetcher, reference, opts)?;
            rootfs.eager = rootfs.layers.iter().map(|d| (*d, why.to_string())).collect();
            return Ok(rootfs);
        }
        let manifest = fetcher.resolve_observed(reference, &*inner.downloads)?;
        let report = |index: usize, desc: &Descriptor, state: LayerState| {
            if let Some(p) = opts.progress {
                p.layer(&LayerProgress {
                    index,
                    digest: desc.digest,
                    state,
                    downloaded: 0,
                    extracted: 0,
                    total: desc.size,
                });
            }
        };
        // The bottom run of lazy layers (one entry per occurrence).
        let mut run: Vec<Arc<LazyLayer>> = Vec::new();
        let mut start = StartOnDrop(Vec::new());
        let mut eager: Vec<(Digest, String)> = Vec::new();
        // The skeleton is built on a thread of its own, layer by layer as each one is set
        // up here, taking the small files' data as their fetch brings it in: the TOCs,
        // the FUSE mounts, the range reads and the extraction overlap.
        let (to_skeleton, layers_in) = std::sync::mpsc::channel::<Arc<LazyLayer>>();
        let skeleton_failed = Arc::new(std::sync::atomic::AtomicUsize::new(NOT_FAILED));
        let builder = {
            let cache = RootfsCache { inner: Arc::clone(inner) };
            let failed = Arc::clone(&skeleton_failed);
            std::thread::Builder::new()
                .name("lazy-skeleton".into())
                .spawn(move || cache.merged_skeleton(layers_in, &failed))
                .map_err(|e| Error::io("spawn", "lazy-skeleton thread", e))?
        };
        // The layers this call set up (not shared from another): given up if the
        // skeleton fails on one below them.
        let mut created: Vec<Arc<LazyLayer>> = Vec::new();
        for desc in &manifest.layers {
            if skeleton_failed.load(Ordering::Relaxed) != NOT_FAILED {
                break; // settled below: no more layers set up for a skeleton that failed
            }
            let d = desc.digest;
            if let Some(l) = run.iter().find(|l| l.digest == d).cloned() {
                let _ = to_skeleton.send(Arc::clone(&l));
                run.push(l);
                continue;
            }
            {
                let st = inner.state.lock();
                if st.layers.contains_key(&d) {
                    break; // cached: it and everything above are used as by ensure
                }
                if let Some(l) = st.lazy.get(&d).cloned() {
                    drop(st);
                    let _ = to_skeleton.send(Arc::clone(&l));
                    run.push(l);
                    continue;
                }
            }
            // A layer that cannot be served lazily (its TOC unreadable or unverifiable,
            // range reads refused by a mirror, its skeleton data not fetchable, FUSE not
            // mountable) is pulled whole with the reason, as containerd's remote
            // snapshotters fall back to a plain pull: if the blob itself is bad, that
            // pull's digest check says so.
            let toc = read_toc(desc, |o, l| {
                let v = fetcher.read_blob_range_observed(desc, o, l, &*inner.downloads)?;
                inner.downloads.bytes.fetch_add(v.len() as u64, Ordering::Relaxed);
                Ok(v)
            });
            match toc {
                Ok(LayerToc::Seekable(toc)) => {
                    let below: Vec<(Digest, Arc<Status>)> =
                        run.iter().map(|l| (l.digest, Arc::clone(&l.status))).collect();
                    let prefix = manifest.layers[..=run.len()].to_vec();
                    match self.lazy_layer(&fetcher, desc, toc, below, prefix) {
                        Ok((l, new)) => {
                            inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                            if new {
                                created.push(Arc::clone(&l));
                            }
                            start.0.push(Arc::clone(&l.status));
                            let _ = to_skeleton.send(Arc::clone(&l));
                            run.push(l);
                        }
                        Err(e) => {
                            eager.push((d, format!("cannot be served lazily: {e}")));
                            break;
                        }
                    }
                }
                Ok(LayerToc::NotSeekable(reason)) => {
                    eager.push((d, reason));
                    break;
                }
                Err(e) => {
                    eager.push((d, format!("no usable TOC: {e}")));
                    break;
                }
            }
        }
        drop(to_skeleton);
        let built = builder.join().unwrap_or_else(|_| {
            Err(Error::Read { what: "lazy skeleton", source: std::io::Error::other("its builder panicked") })
        });
        let view = match built {
            Ok(view) => view,
            Err(e) => {
                let k = skeleton_failed.load(Ordering::Relaxed);
                // The skeleton failed on layer `k`. If that layer's small files could not
                // be fetched, it is pulled whole, with the layers above it (those this call
                // set up are given up: unmounted, their fetches stopped, once dropped),
                // and the skeleton is made again without them.
                let Some(why) = run.get(k).and_then(|l| l.store.small_result().err()) else {
                    return Err(e);
                };
                eager.clear(); // the layers above it are pulled whole for its sake
                eager.push((run[k].digest, format!("cannot be served lazily: {why}")));
                let above: HashSet<Digest> = run[k..].iter().map(|l| l.digest).collect();
                run.truncate(k);
                let below: HashSet<Digest> = run.iter().map(|l| l.digest).collect();
                for l in created.drain(..) {
                    if above.contains(&l.digest) && !below.contains(&l.digest) {
                        self.forget_lazy(l);
                    }
                }
                let (tx, rx) = std::sync::mpsc::channel();
                for l in &run {
                    let _ = tx.send(Arc::clone(l));
                }
                drop(tx);
                self.merged_skeleton(rx, &std::sync::atomic::AtomicUsize::new(NOT_FAILED))?
            }
        };
        drop(created);
        let mut rootfs = Rootfs::new(inner.clone(), manifest.digest, Vec::new());
        let mut lowers: Vec<PathBuf> = Vec::new();
        if let Some(view) = view {
            // `layers` and `lazy` in step before anything else can fail or panic: the
            // first `lazy.len()` layers are the ones Drop does not unlease.
            rootfs.layers.extend(run.iter().map(|l| l.digest));
            rootfs.lazy = run.clone();
            for index in 0..run.len() {
                report(index, &manifest.layers[index], LayerState::Lazy);
            }
            lowers.push(view.0.clone());
            rootfs.view = Some(view);
            let mut seen = HashSet::new();
            rootfs.data_lowers = run.iter().rev().filter(|l| seen.insert(l.digest)).map(|l| l.mnt.clone()).collect();
        }
        let n = run.len();
        if n < manifest.layers.len() {
            // The rest, as ensure does it (cached ones leased, others pulled whole), over
            // the skeleton.
            let rest = ImageManifest { digest: manifest.digest, layers: manifest.layers[n..].to_vec() };
            let offset = opts.progress.map(|p| Offset { inner: p, base: n });
            let mut sub = EnsureOptions::new();
            if let Some(o) = &offset {
                sub = sub.with_progress(o);
            }
            let below: Vec<PathBuf> = lowers.clone();
            let before = inner.counters.extractions.load(Ordering::Relaxed);
            let mut part = self.ensure_layers(&*fetcher, &rest, &sub, &below)?;
            if !run.is_empty() || !eager.is_empty() {
                let why = eager.first().map(|(d, r)| format!("above {d} ({r})"));
                for l in &rest.layers {
                    if !eager.iter().any(|(d, _)| *d == l.digest) {
                        let r = why.clone().unwrap_or_else(|| "above a cached layer".into());
                        eager.push((l.digest, r));
                    }
                }
            }
            let mut seen = HashSet::new();
            let top: Vec<PathBuf> = part
                .layers
                .iter()
                .rev()
                .filter(|d| seen.insert(**d))
                .map(|d| layout::layer_fs(&inner.root, d))
                .collect();
            lowers.splice(0..0, top);
            rootfs.layers.append(&mut part.layers); // its leases move into ours
            if inner.counters.extractions.load(Ordering::Relaxed) != before && self.gc().is_err() {
                inner.counters.failed_gc.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.record_image(reference, &manifest, &rootfs.layers)?;
        rootfs.lowers = lowers;
        rootfs.eager = eager;
        Ok(rootfs)
    }

    /// One skeleton of the lazy layers `layers` sends (bottom first) in a new
    /// `lazy/view.<n>`, none if it sends none: each layer's rebuilt tar extracted over the
    /// ones below (whiteouts applied), its placeholders then marked. A small file's data
    /// is waited for while its layer's fetch brings it in.
    ///
    /// On failure `failed_at` says on which layer (its index among the layers sent;
    /// [`NOT_A_LAYER`] for the rest of the work), set before it returns, so that the
    /// sender stops setting layers up.
    fn merged_skeleton(
        &self,
        layers: std::sync::mpsc::Receiver<Arc<LazyLayer>>,
        failed_at: &std::sync::atomic::AtomicUsize,
    ) -> Result<Option<View>> {
        let inner = &self.inner;
        let mut layers = layers.into_iter().peekable();
        if layers.peek().is_none() {
            return Ok(None);
        }
        let mut at = NOT_A_LAYER; // not a layer's failure until one is taken
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = inner.root.join(layout::TMP).join(format!("lazy-view.{seq}"));
        let view = inner.root.join(LAZY).join(format!("view.{seq}"));
        let built = (|| {
            std::fs::create_dir_all(&tmp).map_err(io("mkdir", &tmp))?;
            let mut opts = lazy_unpack_options(&inner.opts.unpack);
            opts.whiteouts = WhiteoutMode::Apply;
            // Placeholders are sparse: their sizes are not extracted bytes.
            opts.max_uncompressed_bytes = None;
            // Extracting a layer over the ones below touches the directories it changes
            // without listing them; in an overlay each directory shows the mtime of the
            // top-most layer listing it.
            let mut mtimes: HashMap<String, (i64, u32)> = HashMap::new();
            for (i, l) in layers.enumerate() {
                at = i;
                let s = Arc::clone(&l.store);
                let stream = tar_stream(Arc::clone(&l.store.toc), move |e| {
                    let id = s.id_of[&e];
                    if s.placeholder[id] { FileData::Placeholder } else { s.small_data(id) }
                })?;
                // Each placeholder gets its overlay xattrs as the extractor closes it (no
                // second pass over the tree).
                opts.placeholders = Some(store::placeholders(&l.store, opts.userxattr));
                unpack_cache_entry(stream, &tmp, &opts, &AtomicU64::new(0))
                    .map_err(|e| Error::Layer { digest: l.digest, source: Arc::new(e) })?;
                for e in &l.store.toc.entries {
                    if matches!(e.kind, crate::lazy::TocEntryKind::Directory) {
                        mtimes.insert(e.path.clone(), (e.mtime, e.mtime_nsec.min(999_999_999)));
                    }
                }
            }
            at = NOT_A_LAYER;
            store::set_dir_mtimes(&tmp, &mtimes)?;
            std::fs::rename(&tmp, &view).map_err(io("rename", &view))
        })();
        if let Err(e) = built {
            failed_at.store(at, Ordering::Relaxed);
            let _ = remove_path(&tmp);
            return Err(e);
        }
        Ok(Some(View(view)))
    }

    /// Give up the lazy layer `l` this call set up or shared (its small files could not
    /// be fetched): out of the live map, so that the next `ensure_lazy` sets it up
    /// afresh; served until its last holder lets go.
    fn forget_lazy(&self, l: Arc<LazyLayer>) {
        let mut st = self.inner.state.lock();
        if st.lazy.get(&l.digest).is_some_and(|m| Arc::ptr_eq(m, &l)) {
            st.lazy.remove(&l.digest);
        }
        drop(st);
        drop(l);
    }

    /// Set up (or share) the lazy layer `desc`: fetch its small files (and prefetch
    /// list), mount its data-only lower, start its completion (which waits for `below`,
    /// the lazy layers under it, to complete before it finishes).
    fn lazy_layer(
        &self,
        fetcher: &Arc<dyn ImageFetcher>,
        desc: &Descriptor,
        toc: crate::lazy::Toc,
        below: Vec<(Digest, Arc<Status>)>,
        prefix: Vec<Descriptor>,
    ) -> Result<(Arc<LazyLayer>, bool)> {
        let inner = &self.inner;
        let d = desc.digest;
        // One setup per digest at a time: a second caller waits, then shares it.
        let gate = inner.lazy_setup.lock().entry(d).or_default().clone();
        let _gate = gate.lock();
        if let Some(l) = inner.state.lock().lazy.get(&d).cloned() {
            return Ok((l, false));
        }
        check_toc_limits(&toc, &inner.opts.unpack)?;
        let dir = inner.root.join(LAZY).join(d.hex());
        let status = Arc::new(Status::default());
        let store = Arc::new(Store::new(
            desc.clone(),
            toc,
            dir.join("data"),
            Arc::clone(fetcher),
            inner.downloads.clone(),
            Arc::clone(&inner.lazy_shared),
            inner.opts.sync,
        )?);
        // The small files come in while the FUSE lower is mounted and the skeleton is
        // built (which waits for each one's data).
        let small = std::thread::Builder::new().name(format!("lazy-small-{}", &d.hex()[..8])).spawn({
            let store = Arc::clone(&store);
            move || store.fetch_small()
        });
        if small.is_err() {
            store.fetch_small();
        }
        // Should the mount fail, the small files' fetch stops (what it wrote stays for the
        // next try, as any fetched data).
        struct StopUnlessServed(Option<Arc<Store>>);
        impl Drop for StopUnlessServed {
            fn drop(&mut self) {
                if let Some(s) = self.0.take() {
                    s.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        let mut unserved = StopUnlessServed(Some(Arc::clone(&store)));
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let mnt = dir.join(format!("mnt.{seq}"));
        std::fs::create_dir_all(&mnt).map_err(io("mkdir", &mnt))?;
        #[cfg(feature = "lazy")]
        let server = {
            let sizes = (0..store.ids.len()).map(|id| store.size(id)).collect();
            let source: Arc<dyn crate::lazy::fuse::DataSource> = store.clone();
            match crate::lazy::fuse::DataServer::mount(&mnt, &store::data_prefix(&d), sizes, source) {
                Ok(s) => Some(s),
                Err(e) => {
                    let _ = std::fs::remove_dir(&mnt);
                    return Err(e);
                }
            }
        };
        let layer = Arc::new(LazyLayer {
            digest: d,
            store: Arc::clone(&store),
            mnt,
            dir,
            #[cfg(feature = "lazy")]
            server,
            status: Arc::clone(&status),
            cache: Arc::downgrade(inner),
        });
        unserved.0 = None; // the layer stops it when dropped
        inner.state.lock().lazy.insert(d, Arc::clone(&layer));
        let weak = Arc::downgrade(inner);
        let spawned = std::thread::Builder::new().name(format!("lazy-complete-{}", &d.hex()[..8])).spawn({
            let fetcher = Arc::clone(fetcher);
            move || complete(weak, store, status, below, prefix, fetcher)
        });
        if let Err(e) = spawned {
            // Served, but never completed by this process: say so.
            *layer.status.last_error.lock() = Some(format!("cannot start its completion: {e}"));
        }
        Ok((layer, true))
    }

    /// Record `reference` → `manifest`'s layers (in memory and in `images/`), merging
    /// tags with an identical record; under the manifest digest and, for a digest
    /// reference (an index), under that digest too.
    pub(super) fn record_image(&self, reference: &str, manifest: &ImageManifest, layers: &[Digest]) -> Result<()> {
        let inner = &self.inner;
        let rec = layout::ImageRecord {
            manifest: Some(manifest.digest),
            layers: layers.to_vec(),
            tags: if layout::digest_ref(reference).is_some() { Vec::new() } else { vec![reference.to_string()] },
        };
        let mut keys = vec![manifest.digest];
        if let Some(d) = layout::digest_ref(reference) {
            keys.push(d); // an index digest resolves to this manifest
        }
        for key in keys {
            let mut st = inner.state.lock();
            let merged = match st.images.get(&key) {
                Some(old) if old.layers == rec.layers => {
                    let mut m = old.clone();
                    for t in &rec.tags {
                        if !m.tags.contains(t) {
                            m.tags.push(t.clone());
                        }
                    }
                    m
                }
                _ => rec.clone(),
            };
            if st.images.get(&key) != Some(&merged) {
                write_atomic(&layout::image_file(&inner.root, &key), merged.encode().as_bytes())?;
                st.images.insert(key, merged);
            }
        }
        Ok(())
    }
}

/// Why this process cannot serve lazy layers, if it cannot: FUSE needs `/dev/fuse` and
/// a mount (root, or root in a user namespace that owns its mount namespace).
fn lazy_unavailable() -> Option<&'static str> {
    if !std::path::Path::new("/dev/fuse").exists() {
        return Some("lazy pull needs FUSE: /dev/fuse is missing");
    }
    if !nix::unistd::geteuid().is_root() {
        return Some("lazy pull needs to mount FUSE: not root (run in a user namespace, as its root)");
    }
    None
}

/// The unpack options of skeletons and completed lazy layers: the cache's, with
/// overlay whiteouts, nothing to verify (the data was verified chunk by chunk) and no
/// parents from lowers (done after extraction).
fn lazy_unpack_options(base: &crate::unpack::UnpackOptions) -> crate::unpack::UnpackOptions {
    let mut opts = base.clone();
    opts.whiteouts = WhiteoutMode::Overlay;
    opts.expected_digest = None;
    opts.expected_diff_id = None;
    opts.compute_diff_id = false;
    opts.parent_lowers = Vec::new();
    // The rebuilt stream ends with its end-of-archive marker: a writer that died early
    // (its channel closed) is an error, never a shorter tree.
    opts.require_end_of_archive = true;
    opts
}

/// The cache's extraction bounds, applied to a TOC before anything of it is served: a
/// layer is refused lazily as it would be when pulled whole (the sum of its files' sizes
/// against [`UnpackOptions::max_uncompressed_bytes`], so that a TOC cannot declare
/// terabytes of "zeros" chunks; its entries against `max_entries`).
///
/// [`UnpackOptions::max_uncompressed_bytes`]: crate::unpack::UnpackOptions::max_uncompressed_bytes
fn check_toc_limits(toc: &crate::lazy::Toc, opts: &crate::unpack::UnpackOptions) -> Result<()> {
    if let Some(limit) = opts.max_entries {
        if toc.entries.len() as u64 > limit {
            return Err(Error::LimitExceeded { what: "TOC entries (max_entries)", limit });
        }
    }
    if let Some(limit) = opts.max_uncompressed_bytes {
        let mut total = 0u64;
        for e in &toc.entries {
            if let crate::lazy::TocEntryKind::File { size, .. } = e.kind {
                total = total.saturating_add(size);
                if total > limit {
                    return Err(Error::LimitExceeded { what: "file bytes in the TOC (max_uncompressed_bytes)", limit });
                }
            }
        }
    }
    Ok(())
}

/// Sleep `d`, in slices, unless `stop` is set; false when stopped.
fn nap(store: &Store, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if store.stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
    !store.stop.load(Ordering::Relaxed)
}

/// The completion thread of one lazy layer: once `ensure_lazy` has returned and the
/// lazy layers below are complete, the layer is pulled whole through `ensure`'s own path
/// (the blob streamed, its digest verified, extracted, made ready in `layers/` with the
/// layers below leased for its omitted parents), yielding to waiting opens between
/// reads. A layer in `layers/` is thus always one whose blob matched its digest: a TOC,
/// whose digest only the manifest that carries it vouches for, never puts anything
/// there. Then the data-only lower serves what was not fetched from the ready copy.
fn complete(
    weak: Weak<Inner>,
    store: Arc<Store>,
    status: Arc<Status>,
    below: Vec<(Digest, Arc<Status>)>,
    prefix: Vec<Descriptor>,
    fetcher: Arc<dyn ImageFetcher>,
) {
    // Background work: the lowest CPU priority (threads inherit it; on Linux a nice
    // value is per thread). Waiting opens are served by the FUSE workers, at the
    // process's priority.
    let _ = crate::sys::nice_this_thread(19);
    while !status.go.load(Ordering::Relaxed) {
        if !nap(&store, Duration::from_millis(10)) {
            return;
        }
    }
    store.touch();
    // The image's prefetch list first (eStargz landmarks), file by file.
    let mut prefetch: Vec<usize> = store.prefetch.iter().copied().collect();
    prefetch.sort_unstable();
    for id in prefetch {
        if store.stop.load(Ordering::Relaxed) {
            return;
        }
        let _ = store.fetch(id, true); // best effort: opens fetch what this misses
    }
    while !below.iter().all(|(_, s)| s.complete.load(Ordering::Relaxed) || s.dead.load(Ordering::Relaxed)) {
        if !nap(&store, Duration::from_millis(50)) {
            return;
        }
    }
    let d = store.desc.digest;
    let image = ImageManifest { digest: d, layers: prefix };
    let seen = Arc::new(SourceSeen::default());
    let yielding = Yielding { inner: fetcher, store: Arc::clone(&store), seen: Arc::clone(&seen) };
    let mut backoff = Duration::from_millis(500);
    let mut refused = 0u32;
    while !store.stop.load(Ordering::Relaxed) {
        // Not even the request before a quiet moment: a server answers it at once, and
        // what it sends fills the socket's buffers (megabytes) on the link the opens of
        // a starting sandbox need, read or not.
        if !store.yield_to_any_open() {
            return;
        }
        let Some(inner) = weak.upgrade() else { return };
        let cache = RootfsCache { inner: Arc::clone(&inner) };
        seen.read.store(false, Ordering::Relaxed);
        seen.failed.store(false, Ordering::Relaxed);
        let e = match cache.ensure_layers(&yielding, &image, &EnsureOptions::new(), &[]) {
            Ok(part) => {
                {
                    let mut st = inner.state.lock();
                    st.lease(&d);
                    inner.publish(&st);
                }
                status.leased.store(true, Ordering::Relaxed);
                *store.ready_root.lock() = Some(layout::layer_fs(&inner.root, &d));
                status.complete.store(true, Ordering::Relaxed);
                *status.last_error.lock() = None;
                drop(part);
                drop(cache);
                reap(&inner);
                return;
            }
            Err(e) => e,
        };
        drop(cache);
        drop(inner);
        refused = if is_refused(&e, &seen) { refused + 1 } else { 0 };
        let max = if refused > 0 { REFUSED_BACKOFF_MAX } else { BACKOFF_MAX };
        backoff = backoff.min(max);
        *status.last_error.lock() = Some(match refused {
            0 => e.to_string(),
            n => format!("{e} (refused {n} times in a row; next try in {:.1} s)", backoff.as_secs_f64()),
        });
        if !nap(&store, backoff) {
            return;
        }
        backoff = (backoff * 2).min(max);
    }
}

/// What a completion's own blob stream did in one try.
#[derive(Default)]
struct SourceSeen {
    /// It gave bytes.
    read: AtomicBool,
    /// Opening it or a read of it failed.
    failed: AtomicBool,
}

/// The layer's fetcher for its completion: blob reads wait while opens wait (and for a
/// quiet moment after), so that a starting sandbox has the link first. Notes in `seen`
/// what the source did.
struct Yielding {
    inner: Arc<dyn ImageFetcher>,
    store: Arc<Store>,
    seen: Arc<SourceSeen>,
}

impl Yielding {
    fn wrap(&self, r: Result<Box<dyn std::io::Read + Send>>) -> Result<Box<dyn std::io::Read + Send>> {
        match r {
            Ok(inner) => {
                Ok(Box::new(YieldingRead { inner, store: Arc::clone(&self.store), seen: Arc::clone(&self.seen) }))
            }
            Err(e) => {
                self.seen.failed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

impl ImageFetcher for Yielding {
    fn resolve(&self, reference: &str) -> Result<ImageManifest> {
        self.inner.resolve(reference)
    }

    fn open_blob(&self, layer: &Descriptor) -> Result<Box<dyn std::io::Read + Send>> {
        self.wrap(self.inner.open_blob(layer))
    }

    fn open_blob_observed(
        &self,
        layer: &Descriptor,
        observer: Arc<dyn crate::fetch::FetchObserver>,
    ) -> Result<Box<dyn std::io::Read + Send>> {
        self.wrap(self.inner.open_blob_observed(layer, observer))
    }
}

struct YieldingRead {
    inner: Box<dyn std::io::Read + Send>,
    store: Arc<Store>,
    seen: Arc<SourceSeen>,
}

impl std::io::Read for YieldingRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.store.yield_to_any_open() {
            return Err(std::io::Error::other("the lazy layer's cache was closed"));
        }
        let r = self.inner.read(buf);
        match &r {
            Ok(n) if *n > 0 => self.seen.read.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(_) => self.seen.failed.store(true, Ordering::Relaxed),
        }
        r
    }
}

/// Drop the lazy layers that are complete and held by nobody but the map (outside the
/// lock: unmounting waits for the FUSE session).
pub(super) fn reap(inner: &Inner) {
    let gone: Vec<Arc<LazyLayer>> = {
        let mut st = inner.state.lock();
        let done: Vec<Digest> = st
            .lazy
            .iter()
            .filter(|(_, l)| Arc::strong_count(l) == 1 && l.status.complete.load(Ordering::Relaxed))
            .map(|(d, _)| *d)
            .collect();
        done.iter().filter_map(|d| st.lazy.remove(d)).collect()
    };
    drop(gone);
}

/// At open: what a previous process left in `lazy/`. Layers that became ready lose their
/// lazy dir; the others keep only their fetched data (stale FUSE mounts of a dead
/// process are detached first, never deleted through).
pub(super) fn recover(root: &Path, ready: &HashMap<Digest, Layer>) -> Result<()> {
    let lazy = root.join(LAZY);
    std::fs::create_dir_all(&lazy).map_err(io("mkdir", &lazy))?;
    // Only the owner passes: fetched data (the small files' pack holds every small file,
    // `/etc/shadow` included) and the FUSE mounts are read by the overlay with the
    // mounter's credentials; other users see the files only through the merged view,
    // which keeps their modes.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&lazy, std::fs::Permissions::from_mode(0o700)).map_err(io("chmod", &lazy))?;
    }
    for entry in std::fs::read_dir(&lazy).map_err(io("opendir", &lazy))? {
        let entry = entry.map_err(io("readdir", &lazy))?;
        let path = entry.path();
        let digest = entry.file_name().to_str().and_then(|n| Digest::from_hex(n).ok());
        for sub in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let name = sub.file_name();
            if name.to_string_lossy().starts_with("mnt.") {
                let _ = nix::mount::umount2(&sub.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
        match digest {
            Some(d) if !ready.contains_key(&d) && path.is_dir() => {
                for sub in std::fs::read_dir(&path).map_err(io("opendir", &path))? {
                    let sub = sub.map_err(io("readdir", &path))?;
                    if sub.file_name() != "data" {
                        remove_path(&sub.path())?;
                    }
                }
                let data = path.join("data");
                for f in std::fs::read_dir(&data).into_iter().flatten().flatten() {
                    if f.file_name().to_string_lossy().starts_with(".tmp-") {
                        remove_path(&f.path())?;
                    }
                }
            }
            _ => remove_path(&path)?,
        }
    }
    Ok(())
}

/// A merged skeleton of one [`Rootfs`], removed when it goes.
pub(crate) struct View(pub(super) PathBuf);

impl Drop for View {
    fn drop(&mut self) {
        let _ = remove_path(&self.0); // best effort: the next open removes it anyway
    }
}

/// Move the lazy layer dirs no live lazy layer uses (data a previous process, or a
/// failed set-up, fetched) into `trash/`; returns where they went. Called under the state
/// lock (`st`).
///
/// A layer being set up is not in the live map yet, but its data dir is in use: each dir
/// is moved only while holding its digest's set-up gate, and skipped when a set-up holds
/// it (found by the red team: `gc` over budget, from any `ensure`, trashed the data dir
/// of a lazy `ensure` in progress, which then failed with `ENOENT`). Never blocks: a
/// set-up takes the gate and then the state lock, so this only tries the gate.
pub(super) fn trash_orphans(inner: &Inner, st: &super::State) -> Result<Vec<PathBuf>> {
    let lazy = inner.root.join(LAZY);
    let orphans: Vec<(Digest, PathBuf)> = std::fs::read_dir(&lazy)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let d = e.file_name().to_str().and_then(|n| Digest::from_hex(n).ok())?;
            (!st.lazy.contains_key(&d)).then(|| (d, e.path()))
        })
        .collect();
    let mut moved = Vec::new();
    for (d, p) in orphans {
        let gate = inner.lazy_setup.lock().entry(d).or_default().clone();
        let Some(_setup) = gate.try_lock() else { continue };
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let to = inner.root.join(layout::TRASH).join(format!("lazy.{seq}"));
        std::fs::rename(&p, &to).map_err(io("rename", &p))?;
        moved.push(to);
    }
    Ok(moved)
}
