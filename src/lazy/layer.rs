//! One lazy layer's local state: the data store (whole, verified files fetched by
//! range reads of the blob), the skeleton, and the final, ordinary layer.
//!
//! ```text
//! lazy/<hex>/data/<id>        one file per placeholder (a regular file served by the
//!                             data-only lower), written under a temporary name,
//!                             verified chunk by chunk, renamed into place: a name here
//!                             is always whole. Survives restarts (fetched data is
//!                             never fetched again).
//! lazy/<hex>/data/inline      the small files' data, one after the other in id order
//!                             (one inode instead of thousands), written whole and
//!                             renamed into place like the others.
//! lazy/<hex>/mnt.<n>          the FUSE data-only lower over data/
//! lazy/view.<n>               a `Rootfs`'s merged skeleton of its lazy layers (built in
//!                             tmp/, renamed here whole; see `cache/lazy.rs`)
//! ```
//!
//! Data entries are numbered in TOC order. Small ones (up to [`INLINE_MAX`] bytes) are
//! fetched while the skeleton is built (a few multi-range reads of coalesced spans) and
//! land in the skeleton with their data as each batch comes in; the others become
//! placeholders (sparse files given their overlay xattrs by the extractor, see
//! [`placeholders`]) that the data-only lower serves, the ones on the image's prefetch
//! list fetched first in the background.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

use super::toc::{Toc, TocChunk, TocEntryKind, read_chunk};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::{Descriptor, FetchObserver, ImageFetcher};

/// Regular files up to this size come with the skeleton, not through the data-only lower
/// (in a Debian base, 3/4 of the files and 5% of the bytes).
pub(crate) const INLINE_MAX: u64 = 16 * 1024;
/// Background fetches wait this long after the last fetch an open waited for (and
/// after the layer is handed out), so that a starting sandbox's reads have the link.
const QUIET: std::time::Duration = std::time::Duration::from_millis(500);
/// Largest range read of one request.
const SPAN_MAX: u64 = 8 << 20;
/// Bytes between two files' data read through rather than split into two requests.
const GAP_MAX: u64 = 256 << 10;
/// Bytes of the small files' spans asked for in one request (several ranges of a blob at
/// once where the fetcher can).
const BATCH_BYTES: u64 = 4 << 20;
/// Range reads of one fetch running at once.
const PARALLEL: usize = 4;

/// Numbers of temporary files, process-wide: two stores over the same data dir (a layer
/// given up while a holder still serves it, and its new set-up) never write one file.
/// (Another process cannot: the cache is locked.)
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// What the lazy layers of one cache share.
pub(crate) struct Shared {
    /// Bytes of lazy layers' blobs read so far (range reads).
    pub(crate) fetched: AtomicU64,
    /// Fetches that an open is waiting for, running now, in any layer: background work
    /// yields to them.
    urgent: AtomicUsize,
    /// When the last of them ended (or a layer was handed out): background work waits
    /// for [`QUIET`] after it.
    busy_at: Mutex<std::time::Instant>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            fetched: AtomicU64::new(0),
            urgent: AtomicUsize::new(0),
            busy_at: Mutex::new(std::time::Instant::now()),
        }
    }
}

/// A lazy layer's data entries and where each one's bytes come from.
pub(crate) struct Store {
    /// The layer blob.
    pub(crate) desc: Descriptor,
    pub(crate) toc: Arc<Toc>,
    /// Entry index in the TOC of each data entry, by id.
    pub(crate) ids: Vec<usize>,
    /// Id of each data entry, by entry index.
    pub(crate) id_of: HashMap<usize, usize>,
    /// Whether each id is served by the data-only lower (else it is in the skeleton).
    pub(crate) placeholder: Vec<bool>,
    /// Where each small (non-placeholder) id's data sits in the `inline` pack.
    inline_at: Vec<Option<u64>>,
    /// The pack's length.
    inline_len: u64,
    /// Placeholders on the image's prefetch list.
    pub(crate) prefetch: HashSet<usize>,
    /// `lazy/<hex>/data`.
    pub(crate) dir: PathBuf,
    fetcher: Arc<dyn ImageFetcher>,
    observer: Arc<dyn FetchObserver>,
    sync: bool,
    inflight: Mutex<HashSet<usize>>,
    landed: Condvar,
    /// The entries those opens want, with how many wait: a background fetch of one of
    /// them (which holds its in-flight slot, so the open waits for it) never yields.
    wanted: Mutex<HashMap<usize, usize>>,
    /// What the cache's lazy layers share: bytes fetched, and the opens waiting on any of
    /// them (background work of every layer yields to those: they share the link).
    shared: Arc<Shared>,

    /// Set when the layer's owner is gone: background work stops.
    pub(crate) stop: AtomicBool,
    /// The layer's ready copy (its `fs/`, leased while set), once complete: entries not
    /// fetched are read from there.
    pub(crate) ready_root: Mutex<Option<PathBuf>>,
    /// How far [`Store::fetch_small`] is: the skeleton is built while it runs, taking
    /// each small file's data as soon as it is in.
    feed: Mutex<Feed>,
    fed: Condvar,
}

/// Progress of the small files' fetch.
#[derive(Default)]
struct Feed {
    /// The pack being written (or the one in place).
    file: Option<Arc<File>>,
    /// By id: its data is in `file`.
    here: Vec<bool>,
    /// Set when the fetch has ended: the pack is in place, or why not.
    end: Option<std::result::Result<(), Arc<Error>>>,
}

/// The size of entry `e` when it is a regular file with content.
fn data_size(toc: &Toc, e: usize) -> Option<u64> {
    match &toc.entries[e].kind {
        TocEntryKind::File { size, .. } if *size > 0 => Some(*size),
        _ => None,
    }
}

fn chunks_of(toc: &Toc, e: usize) -> &[TocChunk] {
    match &toc.entries[e].kind {
        TocEntryKind::File { chunks, .. } => chunks,
        _ => &[],
    }
}

impl Store {
    /// The store for `toc` in `dir` (created if missing; files already there are kept).
    pub(crate) fn new(
        desc: Descriptor,
        toc: Toc,
        dir: PathBuf,
        fetcher: Arc<dyn ImageFetcher>,
        observer: Arc<dyn FetchObserver>,
        shared: Arc<Shared>,
        sync: bool,
    ) -> Result<Store> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", &dir, e))?;
        let prefetch: HashSet<&str> = toc.prefetch.iter().flatten().map(String::as_str).collect();
        let mut ids = Vec::new();
        let mut id_of = HashMap::new();
        let mut placeholder = Vec::new();
        let mut inline_at = Vec::new();
        let mut inline_len = 0u64;
        let mut prefetched = HashSet::new();
        for (i, e) in toc.entries.iter().enumerate() {
            if let Some(size) = data_size(&toc, i) {
                let id = ids.len();
                id_of.insert(i, id);
                ids.push(i);
                let big = size > INLINE_MAX;
                placeholder.push(big);
                inline_at.push((!big).then_some(inline_len));
                if !big {
                    inline_len += size;
                } else if prefetch.contains(e.path.as_str()) {
                    prefetched.insert(id);
                }
            }
        }
        Ok(Store {
            desc,
            toc: Arc::new(toc),
            ids,
            id_of,
            placeholder,
            inline_at,
            inline_len,
            prefetch: prefetched,
            dir,
            fetcher,
            observer,
            sync,
            inflight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            wanted: Mutex::new(HashMap::new()),
            shared,
            stop: AtomicBool::new(false),
            ready_root: Mutex::new(None),
            feed: Mutex::new(Feed::default()),
            fed: Condvar::new(),
        })
    }

    /// Entry `id`'s bytes, opened, if local: its fetched file, or the file in the
    /// layer's ready copy (opened by descriptor inside it, never through a symlink, and
    /// only a regular file of the right size).
    #[cfg_attr(not(feature = "lazy"), allow(dead_code))]
    pub(crate) fn open_local(&self, id: usize) -> Option<File> {
        let want = self.size(id);
        let ok = |f: &File| f.metadata().is_ok_and(|m| m.is_file() && m.len() == want);
        if let Ok(f) = File::open(self.path(id)) {
            if ok(&f) {
                return Some(f);
            }
        }
        let root = self.ready_root.lock().clone()?;
        let path = &self.toc.entries[self.ids[id]].path;
        let comps = crate::root::split_path(path.as_bytes()).ok()?;
        let (name, parent) = comps.split_last()?;
        let r = crate::root::Root::open(&root).ok()?;
        let dir = r.open_dir(parent, None, path.as_bytes(), &mut Vec::new()).ok()??;
        let fd = nix::fcntl::openat(
            std::os::fd::AsFd::as_fd(&dir),
            *name,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ok()?;
        let f = File::from(fd);
        ok(&f).then_some(f)
    }

    /// Where entry `id`'s bytes are once fetched.
    pub(crate) fn path(&self, id: usize) -> PathBuf {
        self.dir.join(format!("{id:x}"))
    }

    /// The size of data entry `id`.
    pub(crate) fn size(&self, id: usize) -> u64 {
        data_size(&self.toc, self.ids[id]).unwrap_or(0)
    }

    /// The pack of the small files' data.
    fn pack(&self) -> PathBuf {
        self.dir.join("inline")
    }

    /// Whether entry `id` is local: its file (or the pack, for a small one) is there
    /// with the right length.
    pub(crate) fn is_local(&self, id: usize) -> bool {
        let (path, len) = match self.inline_at[id] {
            Some(_) => (self.pack(), self.inline_len),
            None => (self.path(id), self.size(id)),
        };
        std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == len)
    }

    /// Small entry `id`'s bytes for the rebuilt tar, once [`Store::fetch_small`] has
    /// them (waiting for them meanwhile), or why they will not come.
    pub(crate) fn small_data(&self, id: usize) -> crate::lazy::synth::FileData {
        use crate::lazy::synth::FileData;
        let Some(at) = self.inline_at[id] else {
            return FileData::Failed(format!("entry {id} is not a small file"));
        };
        let mut feed = self.feed.lock();
        loop {
            if feed.here.get(id).copied().unwrap_or(false) {
                let file = Arc::clone(feed.file.as_ref().expect("data is here: the pack is open"));
                drop(feed);
                let mut buf = vec![0u8; self.size(id) as usize];
                return match file.read_exact_at(&mut buf, at) {
                    Ok(()) => FileData::Bytes(buf),
                    Err(e) => FileData::Failed(format!("reading the small files' pack: {e}")),
                };
            }
            if let Some(Err(e)) = &feed.end {
                return FileData::Failed(format!("fetching the small files: {e}"));
            }
            if matches!(feed.end, Some(Ok(()))) {
                return FileData::Failed(format!("entry {id} missing from a whole pack"));
            }
            self.fed.wait(&mut feed);
        }
    }

    /// How [`Store::fetch_small`] ended, waiting for it to end.
    pub(crate) fn small_result(&self) -> std::result::Result<(), Arc<Error>> {
        let mut feed = self.feed.lock();
        loop {
            if let Some(r) = &feed.end {
                return r.clone();
            }
            self.fed.wait(&mut feed);
        }
    }

    /// Read `ranges` (`(offset, len)`, increasing) of the blob, counted: in one request
    /// where the fetcher can.
    fn ranges(&self, ranges: &[(u64, u64)]) -> Result<Vec<Vec<u8>>> {
        let limit = SPAN_MAX.max(super::toc::MAX_CHUNK_BYTES);
        if ranges.iter().any(|&(_, len)| len > limit) {
            return Err(Error::LimitExceeded { what: "lazy range read", limit });
        }
        if ranges.len() == 1 {
            return Ok(vec![self.range(ranges[0].0, ranges[0].1)?]);
        }
        let v = self.fetcher.read_blob_ranges_observed(&self.desc, ranges, &*self.observer)?;
        if v.len() != ranges.len() || v.iter().zip(ranges).any(|(b, r)| b.len() as u64 != r.1) {
            return Err(Error::Read {
                what: "lazy range reads",
                source: std::io::Error::other("the fetcher returned other ranges than asked for"),
            });
        }
        let n: u64 = v.iter().map(|b| b.len() as u64).sum();
        self.shared.fetched.fetch_add(n, Ordering::Relaxed);
        Ok(v)
    }

    /// Read `len` bytes of the blob from `offset`, counted.
    fn range(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        // A span is at most SPAN_MAX, or one chunk (at most MAX_CHUNK_BYTES) on its own:
        // a hostile TOC does not make us allocate more.
        let limit = SPAN_MAX.max(super::toc::MAX_CHUNK_BYTES);
        if len > limit {
            return Err(Error::LimitExceeded { what: "lazy range read", limit });
        }
        let v = self.fetcher.read_blob_range_observed(&self.desc, offset, len, &*self.observer)?;
        self.shared.fetched.fetch_add(v.len() as u64, Ordering::Relaxed);
        Ok(v)
    }

    fn tmp_path(&self, id: usize) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(".tmp-{id:x}.{n}"))
    }

    /// Put a written temporary file in place as entry `id`.
    fn land(&self, tmp: &Path, file: &File, id: usize) -> Result<()> {
        if self.sync {
            file.sync_all().map_err(|e| Error::io("fsync", tmp, e))?;
        }
        let to = self.path(id);
        std::fs::rename(tmp, &to).map_err(|e| Error::io("rename", &to, e))
    }

    /// Note foreground activity now: background work waits [`QUIET`] from here.
    pub(crate) fn touch(&self) {
        *self.shared.busy_at.lock() = std::time::Instant::now();
    }

    /// Background work on entry `id`: wait while opens wait (unless one waits for `id`),
    /// and for [`QUIET`] after the last one; false when the store is stopping.
    fn yield_to_opens(&self, id: usize) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            if self.wanted.lock().contains_key(&id) {
                return true;
            }
            let quiet = self.shared.busy_at.lock().elapsed() >= QUIET;
            if quiet && self.shared.urgent.load(Ordering::SeqCst) == 0 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Background streaming of the whole blob: wait while opens wait, and for [`QUIET`]
    /// after the last one; false when the store is stopping.
    pub(crate) fn yield_to_any_open(&self) -> bool {
        self.yield_to_opens(usize::MAX)
    }

    /// An open waits for entry `id`: fetch it now, ahead of background work.
    #[cfg_attr(not(feature = "lazy"), allow(dead_code))]
    pub(crate) fn fetch_urgent(&self, id: usize) -> Result<()> {
        // Undone however the fetch ends (a panicking fetcher included).
        struct Urgent<'a>(&'a Store, usize);
        impl Drop for Urgent<'_> {
            fn drop(&mut self) {
                self.0.touch();
                self.0.shared.urgent.fetch_sub(1, Ordering::SeqCst);
                let mut wanted = self.0.wanted.lock();
                if let Some(n) = wanted.get_mut(&self.1) {
                    *n -= 1;
                    if *n == 0 {
                        wanted.remove(&self.1);
                    }
                }
            }
        }
        *self.wanted.lock().entry(id).or_default() += 1;
        self.shared.urgent.fetch_add(1, Ordering::SeqCst);
        let _urgent = Urgent(self, id);
        if self.stop.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        self.fetch(id, false)
    }

    /// Make entry `id` local (fetch, verify, land), unless it is already; concurrent
    /// calls for one entry share one fetch (a caller whose fetch failed does not make
    /// the others fail: each waiter then tries itself). `background`: yield to opens
    /// between range reads, and fewer at once.
    pub(crate) fn fetch(&self, id: usize, background: bool) -> Result<()> {
        {
            let mut inflight = self.inflight.lock();
            loop {
                if self.is_local(id) {
                    return Ok(());
                }
                if inflight.insert(id) {
                    break;
                }
                self.landed.wait(&mut inflight);
            }
        }
        // The slot is given back however the fetch ends (a panicking fetcher included):
        // other opens of the entry must not wait for ever.
        struct Slot<'a>(&'a Store, usize);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                self.0.inflight.lock().remove(&self.1);
                self.0.landed.notify_all();
            }
        }
        let _slot = Slot(self, id);
        self.fetch_file(id, background)
    }

    /// Fetch one file: its chunks in spans of up to [`SPAN_MAX`], [`PARALLEL`] at once,
    /// written at their offsets into a temporary file renamed into place when all are in.
    fn fetch_file(&self, id: usize, background: bool) -> Result<()> {
        let e = self.ids[id];
        let size = self.size(id);
        let chunks = chunks_of(&self.toc, e);
        let tmp = self.tmp_path(id);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp);
        let file = file.map_err(|err| Error::io("create", &tmp, err))?;
        let result = (|| {
            file.set_len(size).map_err(|err| Error::io("ftruncate", &tmp, err))?;
            let spans = spans(chunks.iter().filter(|c| !c.zeros).map(|c| (c.compressed_offset, c.compressed_len, c)));
            let next = AtomicUsize::new(0);
            let failed: Mutex<Option<Error>> = Mutex::new(None);
            let work = || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= spans.len() || failed.lock().is_some() {
                        return;
                    }
                    if background && !self.yield_to_opens(id) {
                        failed.lock().get_or_insert(stopped());
                        return;
                    }
                    if let Err(err) = self.fetch_span(&spans[i], &file, &tmp) {
                        failed.lock().get_or_insert(err);
                        return;
                    }
                }
            };
            let n = if background { 2 } else { PARALLEL }.min(spans.len());
            std::thread::scope(|s| {
                for _ in 1..n {
                    s.spawn(work);
                }
                work();
            });
            if let Some(err) = failed.into_inner() {
                return Err(err);
            }
            self.land(&tmp, &file, id)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn fetch_span(&self, span: &Span<'_, &TocChunk>, file: &File, tmp: &Path) -> Result<()> {
        let buf = self.range(span.start, span.end - span.start)?;
        for c in &span.items {
            let data = read_chunk(&self.toc, c, |o, l| slice(&buf, span.start, o, l))?;
            file.write_all_at(&data, c.file_offset).map_err(|err| Error::io("write", tmp, err))?;
        }
        Ok(())
    }

    /// Fetch the small entries (the skeleton's) into the pack, unless it is there
    /// already: their data grouped into coalesced range reads, [`PARALLEL`] at once,
    /// written at their offsets into a temporary pack renamed into place when whole.
    ///
    /// Runs while the skeleton is built ([`Store::small_data`] waits for each file's
    /// data); how it ended is [`Store::small_result`].
    pub(crate) fn fetch_small(&self) {
        // Ended, whatever way (a panic included): the skeleton never waits forever.
        struct Ended<'a>(&'a Store);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                let mut feed = self.0.feed.lock();
                feed.end.get_or_insert_with(|| {
                    Err(Arc::new(Error::Read {
                        what: "small files of a lazy layer",
                        source: std::io::Error::other("their fetch panicked"),
                    }))
                });
                drop(feed);
                self.0.fed.notify_all();
            }
        }
        let _ended = Ended(self);
        let r = self.fetch_small_into_pack().map_err(Arc::new);
        self.feed.lock().end = Some(r);
    }

    fn fetch_small_into_pack(&self) -> Result<()> {
        let pack = self.pack();
        if let Ok(f) = File::open(&pack) {
            if f.metadata().is_ok_and(|m| m.is_file() && m.len() == self.inline_len) {
                let mut feed = self.feed.lock();
                feed.file = Some(Arc::new(f));
                feed.here = self.inline_at.iter().map(Option::is_some).collect();
                return Ok(());
            }
        }
        let spans = spans((0..self.ids.len()).filter(|&id| self.inline_at[id].is_some()).filter_map(|id| {
            let (s, e) = file_range(chunks_of(&self.toc, self.ids[id]))?;
            Some((s, e - s, id))
        }));
        let tmp = self.dir.join(format!(".tmp-inline.{}", TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        // Read too: the skeleton takes each file's data from it as soon as it is in.
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp);
        let file = Arc::new(file.map_err(|err| Error::io("create", &tmp, err))?);
        let result = (|| {
            file.set_len(self.inline_len).map_err(|err| Error::io("ftruncate", &tmp, err))?;
            {
                let mut feed = self.feed.lock();
                feed.file = Some(Arc::clone(&file));
                // Small files without data chunks (all zeros) are here already.
                feed.here = (0..self.ids.len())
                    .map(|id| self.inline_at[id].is_some() && file_range(chunks_of(&self.toc, self.ids[id])).is_none())
                    .collect();
            }
            // Spans in batches of up to BATCH_BYTES, one request each where the fetcher
            // can ask for several ranges at once (a registry's per-request cost is paid
            // once per batch, not per span).
            let mut batches: Vec<std::ops::Range<usize>> = Vec::new();
            let mut bytes = 0;
            for (i, span) in spans.iter().enumerate() {
                let len = span.end - span.start;
                match batches.last_mut() {
                    Some(b) if bytes + len <= BATCH_BYTES => {
                        b.end = i + 1;
                        bytes += len;
                    }
                    _ => {
                        batches.push(i..i + 1);
                        bytes = len;
                    }
                }
            }
            let next = AtomicUsize::new(0);
            let failed: Mutex<Option<Error>> = Mutex::new(None);
            let work = || {
                loop {
                    if self.stop.load(Ordering::Relaxed) || failed.lock().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(batch) = batches.get(i) else { return };
                    if let Err(err) = self.fetch_files_spans(&spans[batch.clone()], &file, &tmp) {
                        failed.lock().get_or_insert(err);
                        return;
                    }
                    let mut feed = self.feed.lock();
                    for span in &spans[batch.clone()] {
                        for &id in &span.items {
                            feed.here[id] = true;
                        }
                    }
                    drop(feed);
                    self.fed.notify_all();
                }
            };
            std::thread::scope(|s| {
                for _ in 1..PARALLEL.min(batches.len()) {
                    s.spawn(work);
                }
                work();
            });
            if let Some(err) = failed.into_inner() {
                return Err(err);
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(stopped());
            }
            if self.sync {
                file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
            }
            std::fs::rename(&tmp, &pack).map_err(|e| Error::io("rename", &pack, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// The small files of some spans (one request where the fetcher can), decoded,
    /// verified and written into the pack.
    fn fetch_files_spans(&self, spans: &[Span<'_, usize>], pack: &File, tmp: &Path) -> Result<()> {
        let ranges: Vec<(u64, u64)> = spans.iter().map(|s| (s.start, s.end - s.start)).collect();
        let bufs = self.ranges(&ranges)?;
        for (span, buf) in spans.iter().zip(&bufs) {
            for &id in &span.items {
                let at = self.inline_at[id].expect("a small file");
                for c in chunks_of(&self.toc, self.ids[id]) {
                    if c.zeros {
                        continue;
                    }
                    let part = read_chunk(&self.toc, c, |o, l| slice(buf, span.start, o, l))?;
                    pack.write_all_at(&part, at + c.file_offset).map_err(|err| Error::io("write", tmp, err))?;
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn stopped() -> Error {
    Error::Unsupported { what: "lazy layer fetch after its cache was closed".into() }
}

/// The compressed range covering all of a file's (non-zero) chunks.
fn file_range(chunks: &[TocChunk]) -> Option<(u64, u64)> {
    let mut it = chunks.iter().filter(|c| !c.zeros);
    let first = it.next()?;
    let mut r = (first.compressed_offset, first.compressed_offset + first.compressed_len);
    for c in it {
        r.0 = r.0.min(c.compressed_offset);
        r.1 = r.1.max(c.compressed_offset + c.compressed_len);
    }
    Some(r)
}

/// Bytes `[offset, offset + len)` of the blob out of `buf`, which holds it from `start`.
fn slice(buf: &[u8], start: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
    offset
        .checked_sub(start)
        .and_then(|a| Some((a as usize, (a.checked_add(len)?) as usize)))
        .filter(|&(_, b)| b <= buf.len())
        .map(|(a, b)| buf[a..b].to_vec())
        .ok_or_else(|| Error::Read {
            what: "chunk outside its range read",
            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
        })
}

/// One range read and what it serves.
struct Span<'a, T> {
    start: u64,
    end: u64,
    items: Vec<T>,
    _life: std::marker::PhantomData<&'a ()>,
}

/// Group `(offset, len, item)` ranges into range reads: sorted by offset, merged while
/// the gap is at most [`GAP_MAX`] and the read at most [`SPAN_MAX`] (a single range
/// longer than that is a read of its own).
fn spans<'a, T>(items: impl Iterator<Item = (u64, u64, T)>) -> Vec<Span<'a, T>> {
    let mut v: Vec<(u64, u64, T)> = items.collect();
    v.sort_by_key(|(o, _, _)| *o);
    let mut out: Vec<Span<'a, T>> = Vec::new();
    for (o, l, t) in v {
        let end = o + l;
        if let Some(last) = out.last_mut() {
            let joined_end = last.end.max(end);
            if o <= last.end.saturating_add(GAP_MAX) && joined_end - last.start <= SPAN_MAX {
                last.end = joined_end;
                last.items.push(t);
                continue;
            }
        }
        out.push(Span { start: o, end, items: vec![t], _life: std::marker::PhantomData });
    }
    out
}

/// The xattr names of a placeholder, under `trusted.` (or `user.` with `userxattr`).
pub(crate) fn placeholder_xattrs(userxattr: bool) -> (&'static [u8], &'static [u8]) {
    if userxattr {
        (b"user.overlay.metacopy", b"user.overlay.redirect")
    } else {
        (b"trusted.overlay.metacopy", b"trusted.overlay.redirect")
    }
}

/// The name of data entry `id` of the layer `digest` in its data-only lower (and the
/// redirect of its placeholder, with a leading `/`).
pub(crate) fn data_name(digest: &Digest, id: usize) -> String {
    format!("{}-{id:x}", digest.hex())
}

/// The FUSE prefix of `digest`'s data names.
#[cfg_attr(not(feature = "lazy"), allow(dead_code))]
pub(crate) fn data_prefix(digest: &Digest) -> String {
    format!("{}-", digest.hex())
}

/// The overlay xattrs of `store`'s placeholders by path, for the extractor to set as it
/// closes each one ([`UnpackOptions::placeholders`](crate::unpack::UnpackOptions)):
/// `overlay.metacopy` (empty) and `overlay.redirect` to the entry's name in the layer's
/// data-only lower.
pub(crate) fn placeholders(store: &Arc<Store>, userxattr: bool) -> crate::unpack::Placeholders {
    let (metacopy, redirect) = placeholder_xattrs(userxattr);
    let by_path: HashMap<Vec<u8>, usize> = (0..store.ids.len())
        .filter(|&id| store.placeholder[id])
        .map(|id| (store.toc.entries[store.ids[id]].path.as_bytes().to_vec(), id))
        .collect();
    let layer = store.toc.layer;
    crate::unpack::Placeholders(Arc::new(move |path: &[u8]| {
        let id = *by_path.get(path)?;
        let target = format!("/{}", data_name(&layer, id));
        Some(vec![(metacopy.to_vec(), Vec::new()), (redirect.to_vec(), target.into_bytes())])
    }))
}

/// Set the mtime of each directory of `mtimes` (relative paths, `""` for the root) that
/// exists under `root` as a directory reached without following a symlink; others are
/// skipped (whited out or replaced by a later layer).
pub(crate) fn set_dir_mtimes(root: &Path, mtimes: &HashMap<String, (i64, u32)>) -> Result<()> {
    let r = crate::root::Root::open(root)?;
    for (path, (secs, nsec)) in mtimes {
        let Ok(comps) = crate::root::split_path(path.as_bytes()) else { continue };
        let Ok(Some(fd)) = r.open_dir(&comps, None, path.as_bytes(), &mut Vec::new()) else { continue };
        let t = nix::sys::time::TimeSpec::new(*secs, i64::from(*nsec));
        nix::sys::stat::futimens(&fd, &nix::sys::time::TimeSpec::UTIME_OMIT, &t)
            .map_err(|e| Error::io("futimens", r.display(&comps), e))?;
    }
    Ok(())
}

#[cfg(feature = "lazy")]
impl super::fuse::DataSource for Store {
    fn fetch(&self, id: usize) -> Result<()> {
        self.fetch_urgent(id)
    }

    fn open(&self, id: usize) -> Option<File> {
        self.open_local(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_coalesce_within_bounds() {
        let s = spans([(0u64, 10u64, 'a'), (20, 10, 'b'), (GAP_MAX + 30, 5, 'c')].into_iter());
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].start, s[0].end), (0, GAP_MAX + 35));
        let s = spans([(0u64, 10u64, 'a'), (GAP_MAX + 11, 5, 'b')].into_iter());
        assert_eq!(s.len(), 2);
        let s = spans([(0u64, SPAN_MAX, 'a'), (SPAN_MAX, 1, 'b'), (SPAN_MAX + 1, 1, 'c')].into_iter());
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].items, vec!['b', 'c']);
        // Ranges sharing a gzip member (eStargz inner offsets) share one read.
        let s = spans([(100u64, 50u64, 1), (100, 50, 2), (150, 10, 3)].into_iter());
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].start, s[0].end), (100, 160));
    }

    #[test]
    fn slice_refuses_outside_the_span() {
        let buf = vec![7u8; 100];
        assert_eq!(slice(&buf, 1000, 1010, 5).unwrap(), vec![7; 5]);
        assert!(slice(&buf, 1000, 999, 5).is_err());
        assert!(slice(&buf, 1000, 1090, 20).is_err());
        assert!(slice(&buf, 1000, u64::MAX, 2).is_err());
    }
}
