//! The cold path of [`RootfsCache::ensure_with`]: every missing layer of an image
//! downloaded, verified and extracted at once (bounded), then made ready bottom first.
//!
//! ```text
//!  worker threads (≤ CacheOptions::concurrent_layers), bottom layer first:
//!    open_blob_observed ─ count ─ unpack into tmp/<hex>.<n>/fs ─▶ channel
//!  the calling thread, bottom layer first:
//!    wait for the layer (ours: from the channel; another caller's: its flight)
//!    ─ parents it omits get the metadata of the ready layers below
//!    ─ meta, (syncfs), rename into layers/ ─ publish: flight outcome, leases
//! ```
//!
//! # Scheduling
//! One pass under the state lock sorts the image's layers into ready ones (leased at
//! once), ones another caller is extracting (we register as waiters: their owner leases
//! them for us when it publishes), and ours (a new flight each). Workers take our
//! layers bottom first and only fetch and extract: they never wait for anything but the
//! fetcher, so they need no slot for waiting and cannot deadlock. The calling thread
//! makes layers ready in image order, so when it reaches a layer every layer below it is
//! ready (or has failed): extracting the layers above first, as they finish downloading,
//! costs nothing but their tmp/ space while they wait.
//!
//! A caller waits only for flights that existed when it sorted its layers (another
//! caller's, created earlier) or for its own workers; since every wait goes to an
//! older flight, callers ensuring images that list the same layers in different orders
//! cannot wait for each other in a cycle.
//!
//! # Errors
//! The lowest layer that fails is reported (a layer's own failure, or a failed
//! extraction of another caller it waited for), whatever order failures happen in:
//! every layer below it is still made ready, every one of ours above it is abandoned
//! (its download stopped, its tmp/ entry removed, its waiters told which layer below
//! failed), and all workers are joined before `ensure` returns.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use super::layout::{self, LayerMeta};
use super::{Flight, Layer, Rootfs, RootfsCache, disk_usage, io, now_nanos, remove_path, write_atomic};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::{Descriptor, ImageFetcher, ImageManifest};
use crate::unpack::{WhiteoutMode, apply_implicit_parents, unpack_cache_entry};

/// Observes a [`RootfsCache::ensure_with`]: what happens to each layer of the image.
///
/// Called from the threads doing the work (the caller's thread and the cache's worker
/// threads, several at once), so implementations must be cheap, must not block, and must
/// be [`Sync`]. Events of one layer arrive in order; events of different layers
/// interleave. A layer the image lists twice is reported once, at its lowest index.
pub trait EnsureProgress: Sync {
    /// `layer` changed state or made progress.
    fn layer(&self, layer: &LayerProgress);
}

/// One progress event of a layer, for [`EnsureProgress`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerProgress {
    /// Position of the layer in the image, bottom first (0 is the base layer).
    pub index: usize,
    /// The layer blob's digest.
    pub digest: Digest,
    /// Where the layer is.
    pub state: LayerState,
    /// Bytes of the blob (compressed, as stored) read from the fetcher so far by this
    /// call; 0 for a layer that was cached or that another caller extracted.
    pub downloaded: u64,
    /// Bytes of the uncompressed tar stream extracted so far (entries created; exact when
    /// the layer is [`LayerState::Done`]); 0 when this call did not extract it.
    pub extracted: u64,
    /// The blob's size from its descriptor: what `downloaded` ends at.
    pub total: u64,
}

/// Where a layer of an [`RootfsCache::ensure_with`] is, in [`LayerProgress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerState {
    /// Ready in the cache already: nothing to do (final).
    Cached,
    /// Another caller is extracting it; this call waits for that extraction.
    Waiting,
    /// Missing; waiting for a worker ([`CacheOptions::concurrent_layers`](super::CacheOptions::concurrent_layers)).
    Queued,
    /// Being downloaded and extracted (sent repeatedly as bytes arrive).
    Downloading,
    /// Ready, and leased by this call (final).
    Done,
    /// Not made ready: it failed, a layer below it failed, or the extraction this call
    /// waited for failed (final).
    Failed,
    /// Served lazily ([`RootfsCache::ensure_lazy`]): its skeleton is local, its file data
    /// comes on demand and in the background (final for the call).
    Lazy,
}

/// Options of one [`RootfsCache::ensure_with`] call.
///
/// ```
/// # use rootfs_cache::{EnsureOptions, EnsureProgress, LayerProgress};
/// struct Log;
/// impl EnsureProgress for Log {
///     fn layer(&self, l: &LayerProgress) {
///         let _ = (l.index, l.state, l.downloaded, l.total);
///     }
/// }
/// let log = Log;
/// let opts = EnsureOptions::new().with_progress(&log);
/// # let _ = opts;
/// ```
#[derive(Clone, Copy, Default)]
#[non_exhaustive]
pub struct EnsureOptions<'a> {
    /// Told about each layer as it is found, waited for, downloaded and made ready.
    /// Default: none.
    pub progress: Option<&'a dyn EnsureProgress>,
}

impl<'a> EnsureOptions<'a> {
    /// The defaults: no progress observer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Report progress to `progress`.
    pub fn with_progress(mut self, progress: &'a dyn EnsureProgress) -> Self {
        self.progress = Some(progress);
        self
    }
}

impl std::fmt::Debug for EnsureOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnsureOptions").field("progress", &self.progress.is_some()).finish()
    }
}

/// Bytes read between two [`LayerState::Downloading`] events of a layer.
const REPORT_EVERY: u64 = 256 * 1024;

/// What this call does for one distinct layer of the image.
enum Plan {
    /// Ready when sorted: leased then.
    Cached,
    /// Another caller's extraction; we are counted in its waiters.
    Foreign(Arc<Flight>),
    /// Ours to extract.
    Own(Arc<Flight>),
}

/// One distinct layer of the image, at its lowest position.
struct Job<'m> {
    index: usize,
    desc: &'m Descriptor,
    /// Times the image lists it: leases held once it is ready.
    occurrences: u32,
    plan: Plan,
    /// Set once this layer's final state ([`LayerState::Cached`], `Done` or `Failed`)
    /// was reported: events of a worker still reading it are dropped after that. Held
    /// while the observer is called, so a layer's events cannot overtake each other.
    reported_final: parking_lot::Mutex<bool>,
    /// For [`Plan::Foreign`]: this call has settled its part in the flight (it took the
    /// leases the owner made for it, or left the flight); [`Unwinding`] settles the rest.
    settled: AtomicBool,
}

/// A layer extracted into `tmp/`, not yet ready. Dropped before it is renamed into
/// `layers/` (abandoned, failed, or left behind by a panic), its `tmp/` entry goes.
struct Extracted {
    tmp: std::path::PathBuf,
    /// Disk usage of its `fs/`, before parents it omits get their metadata.
    size: u64,
    implicit: Vec<Vec<u8>>,
    diff_id: Option<Digest>,
    /// Renamed into `layers/`: nothing to remove.
    ready: bool,
}

impl Drop for Extracted {
    fn drop(&mut self) {
        if !self.ready && self.tmp.exists() {
            let _ = remove_path(&self.tmp); // best effort: `open` empties tmp/ anyway
        }
    }
}

/// What a worker hands back for one layer.
struct Done {
    result: Result<Extracted>,
    downloaded: u64,
    extracted: u64,
}

/// The image index above which our layers are abandoned (a layer at or below it failed).
struct Cancel(AtomicUsize);

impl Cancel {
    fn above(&self, index: usize) -> bool {
        index > self.0.load(Ordering::Relaxed)
    }
}

/// The blob as the fetcher serves it, counted (cache stats, progress), cut off past its
/// descriptor's size (a fetcher serving more would otherwise be read, and extracted, for
/// as long as it goes on: the digest is checked only at the end; a short blob fails that
/// check) and stopped early when a layer below has failed.
struct Metered<'a> {
    inner: Box<dyn Read + Send>,
    /// The descriptor's size.
    size: u64,
    inner_counter: &'a AtomicU64,
    downloaded: &'a AtomicU64,
    extracted: &'a AtomicU64,
    reported: u64,
    index: usize,
    cancel: &'a Cancel,
    report: &'a (dyn Fn(LayerState, u64, u64) + Sync),
}

impl Read for Metered<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.above(self.index) {
            return Err(io::Error::other("abandoned: a layer below failed"));
        }
        let n = self.inner.read(buf)?;
        self.inner_counter.fetch_add(n as u64, Ordering::Relaxed);
        let total = self.downloaded.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.size {
            let e = format!("the blob is longer than its descriptor's {} bytes", self.size);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if total - self.reported >= REPORT_EVERY || (n == 0 && total != self.reported) {
            self.reported = total;
            (self.report)(LayerState::Downloading, total, self.extracted.load(Ordering::Relaxed));
        }
        Ok(n)
    }
}

impl RootfsCache {
    /// Make every layer of `manifest` ready, in parallel where missing, and lease each
    /// occurrence. Returns the lease (layers bottom first).
    pub(super) fn ensure_layers(
        &self,
        fetcher: &dyn ImageFetcher,
        manifest: &ImageManifest,
        opts: &super::EnsureOptions<'_>,
        below: &[std::path::PathBuf],
    ) -> Result<Rootfs> {
        let inner = &self.inner;
        let layers = &manifest.layers;
        let report = |job: &Job<'_>, state: LayerState, downloaded: u64, extracted: u64| {
            if let Some(p) = opts.progress {
                let mut fin = job.reported_final.lock();
                if *fin {
                    return; // a worker still reading an abandoned layer
                }
                *fin = matches!(state, LayerState::Cached | LayerState::Done | LayerState::Failed);
                p.layer(&LayerProgress {
                    index: job.index,
                    digest: job.desc.digest,
                    state,
                    downloaded,
                    extracted,
                    total: job.desc.size,
                });
            }
        };
        // Leases are taken as layers become ready, so eviction cannot take a layer of
        // this image while others extract; `partial` gives them back on error.
        let mut partial = Rootfs::new(inner.clone(), manifest.digest, Vec::new());
        let jobs = self.sort_layers(layers, &mut partial);
        let _unwinding = Unwinding { cache: self, jobs: &jobs };
        for job in &jobs {
            let state = match job.plan {
                Plan::Cached => LayerState::Cached,
                Plan::Foreign(_) => LayerState::Waiting,
                Plan::Own(_) => LayerState::Queued,
            };
            report(job, state, 0, 0);
        }
        let own: Vec<usize> = (0..jobs.len()).filter(|&j| matches!(jobs[j].plan, Plan::Own(_))).collect();
        let cancel = Cancel(AtomicUsize::new(usize::MAX));
        // The lowest layer that failed, and why.
        let mut failure: Option<(Digest, Arc<Error>)> = None;

        let next = AtomicUsize::new(0);
        let work = |tx: mpsc::Sender<(usize, Done)>| {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&j) = own.get(k) else { break };
                let job = &jobs[j];
                let done = if cancel.above(job.index) {
                    Done { result: Err(abandoned()), downloaded: 0, extracted: 0 }
                } else {
                    let rep = |state, d, e| report(job, state, d, e);
                    let done = self.fetch_extract(fetcher, job, &cancel, &rep);
                    if done.result.is_err() {
                        // No layer above this one can be made ready now: stop them early.
                        cancel.0.fetch_min(job.index, Ordering::Relaxed);
                    }
                    done
                };
                // If nobody will make it ready, dropping it removes its tmp/ entry.
                let _ = tx.send((j, done));
            }
        };
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<(usize, Done)>();
            let workers = inner.opts.concurrent_layers.clamp(1, own.len().max(1));
            let mut handles = Vec::with_capacity(workers);
            if !own.is_empty() {
                let work = &work;
                for _ in 0..workers {
                    let tx = tx.clone();
                    let spawn =
                        std::thread::Builder::new().name("rootfs-ensure".into()).spawn_scoped(s, move || work(tx));
                    handles.extend(spawn.ok());
                }
                if handles.is_empty() {
                    // No thread to spare: do the work here, then make it ready below.
                    work(tx.clone());
                }
            }
            drop(tx);

            // Make layers ready bottom first (see the module docs).
            let mut results: HashMap<usize, Done> = HashMap::new();
            for (j, job) in jobs.iter().enumerate() {
                let d = job.desc.digest;
                match &job.plan {
                    Plan::Cached => {}
                    Plan::Foreign(flight) => {
                        if failure.is_some() {
                            self.stop_waiting(flight, job, &mut partial);
                            job.settled.store(true, Ordering::Relaxed);
                            report(job, LayerState::Failed, 0, 0);
                            continue;
                        }
                        let mut st = inner.state.lock();
                        while flight.outcome.get().is_none() {
                            inner.done.wait(&mut st);
                        }
                        match flight.outcome.get().expect("waited for") {
                            // Its owner took our leases when it published the layer.
                            Ok(()) => {
                                partial.layers.extend(std::iter::repeat_n(d, job.occurrences as usize));
                                job.settled.store(true, Ordering::Relaxed);
                                drop(st);
                                report(job, LayerState::Done, 0, 0);
                            }
                            Err(e) => {
                                let e = e.clone();
                                job.settled.store(true, Ordering::Relaxed);
                                drop(st);
                                cancel.0.fetch_min(job.index, Ordering::Relaxed);
                                failure = Some((d, e));
                                report(job, LayerState::Failed, 0, 0);
                            }
                        }
                    }
                    Plan::Own(flight) => {
                        if let Some((below, cause)) = &failure {
                            // Abandoned: its worker stops reading, its tmp/ entry goes;
                            // its waiters learn which layer below failed.
                            let e = Error::Layer { digest: *below, source: cause.clone() };
                            self.publish_failure(flight, &d, Arc::new(e));
                            report(job, LayerState::Failed, 0, 0);
                            continue;
                        }
                        let done = loop {
                            if let Some(done) = results.remove(&j) {
                                break done;
                            }
                            let Ok((k, done)) = rx.recv() else {
                                // Every worker has ended and this layer's never reported:
                                // its worker panicked. Pass its panic on, once the layers
                                // the others extracted are out of tmp/.
                                discard(results.drain().chain(rx.try_iter()));
                                for h in handles.drain(..) {
                                    if let Err(panic) = h.join() {
                                        std::panic::resume_unwind(panic);
                                    }
                                }
                                unreachable!("a worker that ends normally reports every layer it takes");
                            };
                            results.insert(k, done);
                        };
                        let ready = done.result.and_then(|ex| self.make_ready(layers, job, ex, below));
                        match ready {
                            Ok((meta, blob_bytes)) => {
                                self.publish_ready(flight, job, meta, blob_bytes);
                                partial.layers.extend(std::iter::repeat_n(d, job.occurrences as usize));
                                report(job, LayerState::Done, done.downloaded, done.extracted);
                            }
                            Err(e) => {
                                let e = Arc::new(e);
                                cancel.0.fetch_min(job.index, Ordering::Relaxed);
                                self.publish_failure(flight, &d, e.clone());
                                failure = Some((d, e));
                                report(job, LayerState::Failed, done.downloaded, done.extracted);
                            }
                        }
                    }
                }
            }
            // Extractions of abandoned layers that finished anyway.
            discard(results.drain().chain(rx.iter()));
            for h in handles {
                // Joined, not only finished: no thread of ours outlives the call. A panic
                // in one is passed on.
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        if let Some((digest, source)) = failure {
            return Err(Error::Layer { digest, source });
        }
        partial.layers = layers.iter().map(|l| l.digest).collect();
        Ok(partial)
    }

    /// Sort the image's distinct layers (one pass under the lock): lease the ready ones
    /// (into `partial`), join the flights of those another caller extracts, and start a
    /// flight for each of the others.
    fn sort_layers<'m>(&self, layers: &'m [Descriptor], partial: &mut Rootfs) -> Vec<Job<'m>> {
        let inner = &self.inner;
        let mut occurrences: HashMap<Digest, u32> = HashMap::new();
        for l in layers {
            *occurrences.entry(l.digest).or_default() += 1;
        }
        let c = &inner.counters;
        let mut jobs = Vec::with_capacity(occurrences.len());
        let mut st = inner.state.lock();
        let now = now_nanos();
        for (index, desc) in layers.iter().enumerate() {
            let d = desc.digest;
            let Some(n) = occurrences.remove(&d) else { continue }; // listed below already
            let plan = if let Some(layer) = st.layers.get_mut(&d) {
                layer.last_use = now;
                for _ in 0..n {
                    st.lease(&d);
                }
                partial.layers.extend(std::iter::repeat_n(d, n as usize));
                c.hits.fetch_add(u64::from(n), Ordering::Relaxed);
                Plan::Cached
            } else {
                // Asked for again higher up, it is found ready by then: a hit.
                c.hits.fetch_add(u64::from(n - 1), Ordering::Relaxed);
                c.misses.fetch_add(1, Ordering::Relaxed);
                if let Some(flight) = st.inflight.get(&d) {
                    c.dedup_waits.fetch_add(1, Ordering::Relaxed);
                    flight.waiters.fetch_add(n, Ordering::Relaxed);
                    Plan::Foreign(flight.clone())
                } else {
                    let flight =
                        Arc::new(Flight { outcome: OnceLock::new(), waiters: std::sync::atomic::AtomicU32::new(0) });
                    st.inflight.insert(d, flight.clone());
                    Plan::Own(flight)
                }
            };
            jobs.push(Job {
                index,
                desc,
                occurrences: n,
                plan,
                reported_final: parking_lot::Mutex::new(false),
                settled: AtomicBool::new(false),
            });
        }
        inner.publish(&st);
        jobs
    }

    /// Leave a flight of another caller we no longer wait for (a layer below failed): if
    /// it published the layer already, the leases it took for us go into `partial`, to be
    /// released with it.
    fn stop_waiting(&self, flight: &Flight, job: &Job<'_>, partial: &mut Rootfs) {
        let _st = self.inner.state.lock();
        match flight.outcome.get() {
            None => {
                flight.waiters.fetch_sub(job.occurrences, Ordering::Relaxed);
            }
            Some(Ok(())) => partial.layers.extend(std::iter::repeat_n(job.desc.digest, job.occurrences as usize)),
            Some(Err(_)) => {}
        }
    }

    /// Fetch and extract one of our layers into `tmp/` (on a worker thread).
    fn fetch_extract(
        &self,
        fetcher: &dyn ImageFetcher,
        job: &Job<'_>,
        cancel: &Cancel,
        report: &(dyn Fn(LayerState, u64, u64) + Sync),
    ) -> Done {
        let inner = &self.inner;
        let desc = job.desc;
        let _span = span!("extract", digest = %desc.digest, size = desc.size);
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = inner.root.join(layout::TMP).join(format!("{}.{seq}", desc.digest.hex()));
        let downloaded = AtomicU64::new(0);
        let position = AtomicU64::new(0);
        report(LayerState::Downloading, 0, 0);
        // A panic in the fetcher's reader (or the observer) must not leave it in tmp/.
        let _cleanup = RemoveOnUnwind(&tmp);
        let result = (|| {
            let fs_dir = tmp.join(layout::FS);
            let mut attempt = 0;
            let (stats, implicit) = loop {
                std::fs::create_dir_all(&fs_dir).map_err(io("mkdir", &fs_dir))?;
                let blob = fetcher.open_blob_observed(desc, inner.downloads.clone())?;
                let mut blob = Metered {
                    inner: blob,
                    size: desc.size,
                    inner_counter: &inner.downloads.bytes,
                    downloaded: &downloaded,
                    extracted: &position,
                    reported: 0,
                    index: job.index,
                    cancel,
                    report,
                };
                let mut opts = inner.opts.unpack.clone();
                opts.whiteouts = WhiteoutMode::Overlay;
                opts.expected_digest = Some(desc.digest);
                // Parents this layer omits get their metadata from the layers below once
                // those are ready (`make_ready`), not now.
                opts.parent_lowers = Vec::new();
                match unpack_cache_entry(&mut blob, &fs_dir, &opts, &position) {
                    Ok(done) => break done,
                    Err(e) => {
                        // Wrong bytes trip the decompressor or the tar parser before the
                        // digest can tell: the source names the real cause (a registry
                        // host that lied, which it then tries last for this digest)...
                        let e = crate::fetch::blame_source(e, &mut blob, desc);
                        // ...and one more try from a new `open_blob` goes to another host.
                        if attempt == 0 && matches!(e, Error::ContentMismatch { .. }) && !cancel.above(job.index) {
                            attempt += 1;
                            drop(blob);
                            remove_path(&tmp)?;
                            downloaded.store(0, Ordering::Relaxed);
                            position.store(0, Ordering::Relaxed);
                            continue;
                        }
                        return Err(e);
                    }
                }
            };
            position.store(stats.uncompressed_bytes, Ordering::Relaxed);
            if inner.opts.sync {
                // The bulk of the data, flushed here in parallel; `make_ready` syncs again.
                let d = std::fs::File::open(&tmp).map_err(io("open", &tmp))?;
                nix::unistd::syncfs(&d).map_err(|e| Error::io("syncfs", &tmp, e))?;
            }
            // Measured here, in parallel; `make_ready` adds what it changes.
            let size = disk_usage(&fs_dir)?;
            Ok(Extracted { tmp: tmp.clone(), size, implicit, diff_id: stats.diff_id, ready: false })
        })();
        if result.is_err() && tmp.exists() {
            // Best effort: `open` empties tmp/ anyway.
            let _ = remove_path(&tmp);
        }
        Done { result, downloaded: downloaded.load(Ordering::Relaxed), extracted: position.load(Ordering::Relaxed) }
    }

    /// Finish an extracted layer once every layer below it is ready: parents it omits
    /// get the lower layers' metadata, then its record, then the rename into `layers/`.
    fn make_ready(
        &self,
        layers: &[Descriptor],
        job: &Job<'_>,
        mut ex: Extracted,
        below: &[std::path::PathBuf],
    ) -> Result<(LayerMeta, u64)> {
        let inner = &self.inner;
        let tmp = &ex.tmp.clone();
        let result = (|| {
            let fs_dir = tmp.join(layout::FS);
            // The layers below, top first, as `UnpackOptions::parent_lowers` takes them.
            // (`below`: lower dirs under the image's bottom layer, for a lazy ensure's
            // single layers.)
            let lowers: Vec<_> = layers[..job.index]
                .iter()
                .rev()
                .map(|l| layout::layer_fs(&inner.root, &l.digest))
                .chain(below.iter().cloned())
                .collect();
            let grown = apply_implicit_parents(&fs_dir, &ex.implicit, &lowers, &inner.opts.unpack)?;
            let size = ex.size.saturating_add_signed(grown);
            let meta = LayerMeta { size, diff_id: ex.diff_id, created: now_nanos() / 1_000_000_000 };
            write_atomic(&tmp.join(layout::META), meta.encode().as_bytes())?;
            if inner.opts.sync {
                let d = std::fs::File::open(tmp).map_err(io("open", tmp))?;
                nix::unistd::syncfs(&d).map_err(|e| Error::io("syncfs", tmp, e))?;
            }
            let dest = layout::layer_dir(&inner.root, &job.desc.digest);
            std::fs::rename(tmp, &dest).map_err(io("rename", &dest))?;
            Ok(meta)
        })();
        // On error, dropping `ex` removes its tmp/ entry.
        ex.ready = result.is_ok();
        Ok((result?, job.desc.size))
    }

    /// Publish one of our layers as ready: leased for us (each occurrence), for every
    /// caller waiting on the flight, and for persisted leases naming it.
    fn publish_ready(&self, flight: &Arc<Flight>, job: &Job<'_>, meta: LayerMeta, blob_bytes: u64) {
        let inner = &self.inner;
        let d = job.desc.digest;
        let mut st = inner.state.lock();
        forget_flight(&mut st, &d, flight);
        st.bytes += meta.size;
        let now = now_nanos();
        // It may have been lost and extracted again since those leases were persisted.
        // (`persist` leases every occurrence: an image may list a layer twice.)
        let pins = st.pins.values().flatten().filter(|p| **p == d).count() as u32;
        let leases = job.occurrences + pins + flight.waiters.load(Ordering::Relaxed);
        st.layers.insert(d, Layer { meta, last_use: now, persisted_use: now, leases });
        st.leased += 1;
        inner.counters.extractions.fetch_add(1, Ordering::Relaxed);
        inner.counters.bytes_extracted.fetch_add(blob_bytes, Ordering::Relaxed);
        let _ = flight.outcome.set(Ok(()));
        inner.done.notify_all();
        inner.publish(&st);
    }

    /// Publish the failure of one of our flights: every waiter gets `cause`, nothing is
    /// cached, and the next `ensure` starts again.
    fn publish_failure(&self, flight: &Arc<Flight>, d: &Digest, cause: Arc<Error>) {
        let inner = &self.inner;
        let mut st = inner.state.lock();
        forget_flight(&mut st, d, flight);
        let _ = flight.outcome.set(Err(cause));
        inner.done.notify_all();
        inner.publish(&st);
    }
}

/// Remove `flight` from the in-flight map (only that flight: once its outcome is
/// published, another caller may have started a new one for the same layer).
fn forget_flight(st: &mut super::State, d: &Digest, flight: &Arc<Flight>) {
    if st.inflight.get(d).is_some_and(|f| Arc::ptr_eq(f, flight)) {
        st.inflight.remove(d);
    }
}

/// Removes a `tmp/` entry when its worker unwinds.
struct RemoveOnUnwind<'p>(&'p std::path::Path);

impl Drop for RemoveOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() && self.0.exists() {
            let _ = remove_path(self.0);
        }
    }
}

/// Fails our flights still unpublished when `ensure_layers` unwinds (a panic in a
/// progress observer or a fetcher's reader), so callers waiting for them do not wait
/// forever, and leaves the flights of other callers we have not settled with (we would
/// otherwise keep the leases their owners take for us when they publish); a no-op
/// otherwise, since every flight is published or settled before it returns.
struct Unwinding<'c, 'j, 'm> {
    cache: &'c RootfsCache,
    jobs: &'j [Job<'m>],
}

impl Drop for Unwinding<'_, '_, '_> {
    fn drop(&mut self) {
        for job in self.jobs {
            match &job.plan {
                Plan::Own(flight) if flight.outcome.get().is_none() => {
                    let e = Error::Unsupported { what: "ensure of this layer panicked".into() };
                    self.cache.publish_failure(flight, &job.desc.digest, Arc::new(e));
                }
                Plan::Foreign(flight) if !job.settled.load(Ordering::Relaxed) => {
                    let inner = &self.cache.inner;
                    let mut st = inner.state.lock();
                    match flight.outcome.get() {
                        None => {
                            flight.waiters.fetch_sub(job.occurrences, Ordering::Relaxed);
                        }
                        Some(Ok(())) => {
                            for _ in 0..job.occurrences {
                                st.unlease(&job.desc.digest);
                            }
                        }
                        Some(Err(_)) => {}
                    }
                    inner.publish(&st);
                }
                _ => {}
            }
        }
    }
}

/// Remove the `tmp/` entries of extracted layers that will not be made ready.
fn discard(done: impl Iterator<Item = (usize, Done)>) {
    done.for_each(drop); // `Extracted` removes its tmp/ entry when dropped
}

/// The error a worker gives a layer it never started because a layer below failed.
fn abandoned() -> Error {
    Error::Read { what: "layer blob", source: io::Error::other("abandoned: a layer below failed") }
}
