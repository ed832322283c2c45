//! The parallel cold `ensure`: layers extracted out of order still end with the parent
//! metadata a sequential extraction gives them, downloads overlap within the bound, a
//! failing layer leaves nothing behind (no tmp/ entry, lease or thread), concurrent
//! callers extract each layer once, and progress events and download counters add up.
//!
//! Tests that count threads or open readers hold `SERIAL`, so other tests of this
//! binary cannot disturb the count.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, SystemTime};

use rootfs_cache::{
    CacheOptions, Descriptor, Digest, EnsureOptions, EnsureProgress, Error, FetchObserver, ImageFetcher, ImageManifest,
    LayerProgress, LayerState, RootfsCache, UnpackOptions, WhiteoutMode, unpack,
};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root (CI is set)");
    eprintln!("skipping {test}: needs root");
    false
}

// ---------------------------------------------------------------------------------------
// Layers

/// One tar entry of a generated layer.
enum E<'a> {
    /// Directory: path, mode, uid, gid, mtime, xattrs.
    Dir(&'a str, u32, u64, u64, u64, &'a [(&'a str, &'a [u8])]),
    File(&'a str, &'a [u8]),
    /// An OCI whiteout (`.wh.NAME`) entry.
    Whiteout(&'a str),
}

#[derive(Clone)]
struct Layer {
    desc: Descriptor,
    blob: Arc<Vec<u8>>,
}

fn make_layer(entries: &[E<'_>], gzip: bool) -> Layer {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::Dir(path, mode, uid, gid, mtime, xattrs) => {
                if !xattrs.is_empty() {
                    let recs: Vec<(String, &[u8])> =
                        xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
                    b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
                }
                let mut h = tar::Header::new_ustar();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_mtime(*mtime);
                h.set_size(0);
                b.append_data(&mut h, path, io::empty()).unwrap();
            }
            E::File(path, data) => {
                let mut h = tar::Header::new_ustar();
                h.set_mode(0o644);
                h.set_mtime(1_600_000_000);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
            E::Whiteout(path) => {
                let mut h = tar::Header::new_ustar();
                h.set_mode(0o644);
                h.set_mtime(1_600_000_000);
                h.set_size(0);
                b.append_data(&mut h, path, io::empty()).unwrap();
            }
        }
    }
    let tar = b.into_inner().unwrap();
    let (blob, media) = if gzip {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&tar).unwrap();
        (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        (tar, "application/vnd.oci.image.layer.v1.tar")
    };
    let desc = Descriptor {
        digest: Digest::of(&blob),
        size: blob.len() as u64,
        media_type: media.into(),
        annotations: Default::default(),
    };
    Layer { desc, blob: Arc::new(blob) }
}

/// A layer of `files` files of `size` bytes under `p<id>/`, nothing else.
fn plain_layer(id: u32, files: usize, size: usize) -> Layer {
    let data: Vec<Vec<u8>> =
        (0..files).map(|j| vec![(id as u8).wrapping_mul(31).wrapping_add(j as u8); size]).collect();
    let names: Vec<String> = (0..files).map(|j| format!("p{id}/f{j}")).collect();
    let entries: Vec<E<'_>> = names.iter().zip(&data).map(|(n, d)| E::File(n, d)).collect();
    make_layer(&entries, id % 2 == 1)
}

/// Six layers whose upper ones omit parents the lower ones define with distinctive
/// metadata (mode, owner, xattrs, mtime), one of them defined again explicitly later in
/// its archive, a whiteout under an omitted parent and an omitted parent no lower has.
fn metadata_image() -> Vec<Layer> {
    let big = vec![7u8; 256 * 1024];
    // Too large to live in an ext4 inode: a directory given it takes a block more.
    let big_xattr = vec![b'x'; 1500];
    vec![
        make_layer(
            &[
                E::Dir("./", 0o751, 0, 0, 1_500_000_000, &[("user.root", b"r0")]),
                E::Dir("a/", 0o750, 12, 34, 1_500_000_100, &[("user.a", &big_xattr[..])]),
                E::Dir("a/b/", 0o711, 56, 78, 1_500_000_200, &[]),
                E::File("a/b/base", b"base"),
                E::Dir("opt/", 0o700, 5, 5, 1_500_000_300, &[]),
                E::File("opt/x", &big),
            ],
            true,
        ),
        make_layer(
            &[
                E::Dir("a/b/c/", 0o705, 9, 9, 1_500_001_000, &[("user.c", b"c1")]),
                E::File("a/b/c/one", b"one"),
                E::Dir("opt/", 0o755, 7, 7, 1_500_001_100, &[]),
                E::File("opt/y", &big),
            ],
            false,
        ),
        make_layer(&[E::File("a/b/c/two", b"two"), E::File("a/b/two", b"two")], true),
        make_layer(
            &[
                E::File("a/b/c/d/three", b"three"),
                E::File("opt/z", b"z"),
                E::Dir("a/", 0o770, 1, 2, 1_500_003_000, &[]),
            ],
            false,
        ),
        make_layer(&[E::Whiteout("a/b/.wh.base"), E::File("opt/deep/q", b"q")], true),
        make_layer(&[E::File("a/b/c/five", b"five"), E::File("a/b/c/d/five", b"five")], false),
    ]
}

/// What the tests compare of one entry: type and mode, owner, xattrs, the mtime (only
/// when it came from an archive, i.e. predates the test), content or link target.
type Meta = (u32, u32, u32, Vec<(Vec<u8>, Vec<u8>)>, Option<(i64, i64)>, Vec<u8>);

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), io::Error::last_os_error());
    let mut out = Vec::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer of the given length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0, "lgetxattr {}: {}", p.display(), io::Error::last_os_error());
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

fn meta_tree(root: &Path, since: i64) -> BTreeMap<PathBuf, Meta> {
    fn go(root: &Path, rel: &Path, since: i64, out: &mut BTreeMap<PathBuf, Meta>) {
        let p = root.join(rel);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let body = if md.is_file() {
            std::fs::read(&p).unwrap()
        } else if md.file_type().is_symlink() {
            std::fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()
        } else {
            Vec::new()
        };
        let mtime = (md.mtime() < since).then_some((md.mtime(), md.mtime_nsec()));
        out.insert(rel.to_path_buf(), (md.mode(), md.uid(), md.gid(), xattrs(&p), mtime, body));
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                go(root, &rel.join(e.unwrap().file_name()), since, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, Path::new(""), since, &mut out);
    out
}

fn assert_same_meta(found: &Path, expected: &Path, since: i64, what: &str) {
    let (f, e) = (meta_tree(found, since), meta_tree(expected, since));
    let keys: std::collections::BTreeSet<&PathBuf> = f.keys().chain(e.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| f.get(*k) != e.get(*k))
        .map(|k| format!("{:?}: found {:?}, expected {:?}", k, f.get(k), e.get(k)))
        .collect();
    assert!(diffs.is_empty(), "{what}: {} differences:\n{}", diffs.len(), diffs.join("\n"));
}

/// Each layer extracted in order with `unpack` and the layers below as
/// `parent_lowers`: the sequential reference.
fn sequential_reference(layers: &[Layer], dir: &Path) -> Vec<PathBuf> {
    let mut done: Vec<PathBuf> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let d = dir.join(format!("l{i}"));
        std::fs::create_dir(&d).unwrap();
        let mut o = UnpackOptions::default();
        o.whiteouts = WhiteoutMode::Overlay;
        o.parent_lowers = done.iter().rev().cloned().collect();
        unpack(&l.blob[..], &d, &o).unwrap();
        done.push(d);
    }
    done
}

// ---------------------------------------------------------------------------------------
// Fetcher

#[derive(Clone)]
enum Fault {
    /// `open_blob` fails at once.
    Open,
    /// Serve other bytes (a digest mismatch), after a delay.
    WrongBytes(Duration),
}

/// An in-memory fetcher: per-blob delays before the first byte, a delay per 64 KiB,
/// faults, and a record of open readers (at once, in total) and of which blobs were read
/// to their end, in order.
#[derive(Default)]
struct Fetcher {
    blobs: HashMap<Digest, Arc<Vec<u8>>>,
    images: HashMap<String, ImageManifest>,
    delay: HashMap<Digest, Duration>,
    per_chunk: Option<Duration>,
    faults: Mutex<HashMap<Digest, Fault>>,
    open_now: Arc<AtomicUsize>,
    max_open: Arc<AtomicUsize>,
    opens: Mutex<HashMap<Digest, usize>>,
    finished: Arc<Mutex<Vec<Digest>>>,
}

impl Fetcher {
    fn image(&mut self, tag: &str, layers: &[&Layer]) {
        let digest = Digest::of(format!("manifest of {tag}").as_bytes());
        for l in layers {
            self.blobs.insert(l.desc.digest, l.blob.clone());
        }
        let m = ImageManifest { digest, layers: layers.iter().map(|l| l.desc.clone()).collect() };
        self.images.insert(tag.into(), m);
    }

    fn opens_of(&self, d: &Digest) -> usize {
        self.opens.lock().unwrap().get(d).copied().unwrap_or(0)
    }
}

impl ImageFetcher for Fetcher {
    fn resolve(&self, reference: &str) -> rootfs_cache::Result<ImageManifest> {
        self.images.get(reference).cloned().ok_or_else(|| Error::NotFound { what: reference.into() })
    }

    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        *self.opens.lock().unwrap().entry(layer.digest).or_default() += 1;
        let mut data = self.blobs[&layer.digest].clone();
        let mut delay = self.delay.get(&layer.digest).copied();
        match self.faults.lock().unwrap().get(&layer.digest).cloned() {
            Some(Fault::Open) => return Err(Error::NotFound { what: format!("blob {} (injected)", layer.digest) }),
            Some(Fault::WrongBytes(d)) => {
                let mut v = data.to_vec();
                let last = v.len() - 1;
                v[last] ^= 1;
                data = Arc::new(v);
                delay = Some(d);
            }
            None => {}
        }
        let now = self.open_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_open.fetch_max(now, Ordering::SeqCst);
        Ok(Box::new(Reader {
            data,
            pos: 0,
            delay,
            per_chunk: self.per_chunk,
            open_now: self.open_now.clone(),
            finished: self.finished.clone(),
            digest: layer.digest,
            ended: false,
        }))
    }
}

struct Reader {
    data: Arc<Vec<u8>>,
    pos: usize,
    delay: Option<Duration>,
    per_chunk: Option<Duration>,
    open_now: Arc<AtomicUsize>,
    finished: Arc<Mutex<Vec<Digest>>>,
    digest: Digest,
    ended: bool,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.delay.take() {
            std::thread::sleep(d);
        }
        if self.pos == self.data.len() {
            if !self.ended {
                self.ended = true;
                self.finished.lock().unwrap().push(self.digest);
            }
            return Ok(0);
        }
        const CHUNK: usize = 64 * 1024;
        if let Some(d) = self.per_chunk {
            if self.pos % CHUNK == 0 {
                std::thread::sleep(d);
            }
        }
        let end = ((self.pos / CHUNK) + 1) * CHUNK;
        let n = buf.len().min(self.data.len() - self.pos).min(end - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.open_now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn cache_opts(concurrent_layers: usize) -> CacheOptions {
    let mut o = CacheOptions::default();
    o.concurrent_layers = concurrent_layers;
    o
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Threads of this process whose name starts with `rootfs-` (the cache's workers and
/// the extraction's helpers). A thread that was joined can still be listed for a moment
/// while the kernel finishes its exit: a thread left running stays listed for good.
fn rootfs_threads() -> usize {
    let count = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter(|t| {
                let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).unwrap_or_default();
                comm.starts_with("rootfs-")
            })
            .count()
    };
    for _ in 0..100 {
        if count() == 0 {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    count()
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64 - 1
}

// ---------------------------------------------------------------------------------------
// Tests

/// The bottom layers' blobs arrive last, so the upper layers are extracted first; every
/// layer still ends with exactly the metadata a sequential extraction gives it (parents
/// it omits take the lower layers' mode, owner, xattrs and mtime).
#[test]
fn upper_layers_extracted_first_get_the_lower_parent_metadata() {
    let test = "upper_layers_extracted_first_get_the_lower_parent_metadata";
    if !require_root(test) {
        return;
    }
    let _g = serial();
    let since = now_secs();
    let layers = metadata_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("ref")).unwrap();
    let reference = sequential_reference(&layers, &t.path().join("ref"));
    for bound in [3, 1] {
        let mut f = Fetcher::default();
        f.image("img", &layers.iter().collect::<Vec<_>>());
        if bound > 1 {
            f.delay.insert(layers[0].desc.digest, Duration::from_millis(600));
            f.delay.insert(layers[1].desc.digest, Duration::from_millis(300));
        }
        let root = t.path().join(format!("cache{bound}"));
        let cache = RootfsCache::open(&root, cache_opts(bound)).unwrap();
        let r = cache.ensure(&f, "img").unwrap();
        let finished = f.finished.lock().unwrap().clone();
        let pos = |l: &Layer| finished.iter().position(|d| *d == l.desc.digest).unwrap();
        if bound > 1 {
            assert!(pos(&layers[5]) < pos(&layers[0]), "the top layer must finish before the bottom one");
            assert!(pos(&layers[2]) < pos(&layers[1]));
        } else {
            assert_eq!(finished, layers.iter().map(|l| l.desc.digest).collect::<Vec<_>>(), "bound 1: in order");
        }
        for (i, (lower, expected)) in r.lowers().iter().rev().zip(&reference).enumerate() {
            assert_same_meta(lower, expected, since, &format!("bound {bound}, layer {i}"));
        }
        assert_eq!(names(&root.join("tmp")), Vec::<String>::new());
        for (d, size, _) in cache.layers() {
            let fs = root.join("layers").join(d.hex()).join("fs");
            assert_eq!(size, disk_usage(&fs), "recorded size of {d}");
        }
    }
}

/// Allocated bytes of a tree, hardlinked inodes once (what the cache records).
fn disk_usage(p: &Path) -> u64 {
    fn go(p: &Path, seen: &mut std::collections::BTreeSet<u64>) -> u64 {
        let md = std::fs::symlink_metadata(p).unwrap();
        let mut total = 0;
        if md.is_dir() || md.nlink() == 1 || seen.insert(md.ino()) {
            total += md.blocks() * 512;
        }
        if md.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                total += go(&e.unwrap().path(), seen);
            }
        }
        total
    }
    go(p, &mut Default::default())
}

/// Downloads overlap, never more than the bound at once; a bound of 1 reads one blob at
/// a time; the layers are complete either way.
#[test]
fn downloads_overlap_within_the_bound() {
    let _g = serial();
    let layers: Vec<Layer> = (0..8).map(|i| plain_layer(i, 3, 100 * 1024)).collect();
    for bound in [1, 2, 3, 16] {
        let mut f = Fetcher { per_chunk: Some(Duration::from_millis(3)), ..Default::default() };
        f.image("img", &layers.iter().collect::<Vec<_>>());
        let t = tempfile::tempdir().unwrap();
        let cache = RootfsCache::open(t.path(), cache_opts(bound)).unwrap();
        let r = cache.ensure(&f, "img").unwrap();
        let max = f.max_open.load(Ordering::SeqCst);
        assert!(max <= bound, "bound {bound}: {max} blobs open at once");
        if bound > 1 {
            assert!(max > 1, "bound {bound}: downloads never overlapped");
        }
        assert_eq!(r.lowers().len(), 8);
        for (i, lower) in r.lowers().iter().rev().enumerate() {
            for j in 0..3 {
                let data = std::fs::read(lower.join(format!("p{i}/f{j}"))).unwrap();
                assert_eq!(data.len(), 100 * 1024);
            }
        }
        for l in &layers {
            assert_eq!(f.opens_of(&l.desc.digest), 1);
        }
        assert_eq!(cache.stats().extractions, 8);
        assert_eq!(rootfs_threads(), 0, "bound {bound}: threads left running");
    }
}

/// Two layers fail (the upper one first, at once; the lower one later): the error names
/// the lower one, the layers below it are cached, nothing else is, no tmp/ entry, lease
/// or thread is left, and the next ensure succeeds.
#[test]
fn the_lowest_failing_layer_is_reported_and_nothing_is_left_behind() {
    let _g = serial();
    let layers: Vec<Layer> = (0..7).map(|i| plain_layer(10 + i, 2, 64 * 1024)).collect();
    let mut f = Fetcher::default();
    f.image("img", &layers.iter().collect::<Vec<_>>());
    f.per_chunk = Some(Duration::from_millis(2));
    // Slow enough that the failures below happen while it downloads.
    f.delay.insert(layers[6].desc.digest, Duration::from_millis(300));
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    let cache = RootfsCache::open(root, cache_opts(3)).unwrap();
    f.faults.lock().unwrap().insert(layers[2].desc.digest, Fault::WrongBytes(Duration::from_millis(200)));
    f.faults.lock().unwrap().insert(layers[4].desc.digest, Fault::Open);
    for attempt in 0..2 {
        let err = cache.ensure(&f, "img").unwrap_err();
        match &err {
            Error::Layer { digest, .. } => assert_eq!(*digest, layers[2].desc.digest, "attempt {attempt}: {err}"),
            e => panic!("expected Error::Layer, got {e:?}"),
        }
        assert!(matches!(err.root(), Error::DigestMismatch { .. }), "{err:?}");
        let mut ready = vec![layers[0].desc.digest.hex(), layers[1].desc.digest.hex()];
        ready.sort();
        assert_eq!(names(&root.join("layers")), ready, "only the layers below the failure are ready");
        assert_eq!(names(&root.join("tmp")), Vec::<String>::new(), "tmp/ not cleaned");
        assert_eq!(names(&root.join("images")), Vec::<String>::new());
        let s = cache.stats();
        assert_eq!((s.entries, s.leased_entries), (2, 0), "{s:?}");
        assert_eq!(rootfs_threads(), 0, "threads left running");
    }
    assert_eq!(f.opens_of(&layers[2].desc.digest), 2, "a failure is not cached");
    assert_eq!(f.opens_of(&layers[0].desc.digest), 1);

    f.faults.lock().unwrap().clear();
    let r = cache.ensure(&f, "img").unwrap();
    assert_eq!(r.layers(), layers.iter().map(|l| l.desc.digest).collect::<Vec<_>>());
    assert_eq!(f.opens_of(&layers[2].desc.digest), 3);
    assert_eq!(cache.stats().leased_entries, 7);
    drop(r);
    assert_eq!(cache.stats().leased_entries, 0);
    assert_eq!(names(&root.join("tmp")), Vec::<String>::new());
}

/// 8 threads ensure 8 images sharing layers, in different orders (some images list the
/// same layers reversed): each layer is extracted once, nobody deadlocks, every lease
/// is given back.
#[test]
fn eight_threads_overlapping_images_extract_each_layer_once() {
    let _g = serial();
    let layers: Vec<Layer> = (0..10).map(|i| plain_layer(100 + i, 2, 48 * 1024)).collect();
    let mut f = Fetcher { per_chunk: Some(Duration::from_millis(1)), ..Default::default() };
    let mut images = Vec::new();
    for k in 0..8usize {
        let mut idx: Vec<usize> = (0..5).map(|j| (k + j * 3) % 10).collect();
        if k % 2 == 1 {
            idx.reverse();
        }
        idx.dedup();
        let ls: Vec<&Layer> = idx.iter().map(|&i| &layers[i]).collect();
        f.image(&format!("img{k}"), &ls);
        images.push(idx);
    }
    let t = tempfile::tempdir().unwrap();
    let cache = Arc::new(RootfsCache::open(t.path(), cache_opts(3)).unwrap());
    let f = Arc::new(f);
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (cache, f) = (cache.clone(), f.clone());
        std::thread::spawn(move || {
            let barrier = Barrier::new(8);
            std::thread::scope(|s| {
                for th in 0..8usize {
                    let (cache, f, barrier) = (&cache, &f, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        for n in 0..8 {
                            let k = (th + n) % 8;
                            let r = cache.ensure(&**f, &format!("img{k}")).unwrap();
                            assert_eq!(r.layers().len(), 5);
                        }
                    });
                }
            });
            tx.send(()).unwrap();
        });
    }
    rx.recv_timeout(Duration::from_secs(300)).expect("8 threads did not finish in 300 s (deadlock?)");
    for l in &layers {
        assert_eq!(f.opens_of(&l.desc.digest), 1, "layer opened more than once");
    }
    let s = cache.stats();
    assert_eq!((s.extractions, s.entries, s.leased_entries), (10, 10, 0), "{s:?}");
    assert_eq!(s.misses, s.extractions + s.dedup_waits, "{s:?}");
    assert_eq!(s.hits + s.misses, 8 * 8 * 5);
    assert_eq!(names(&t.path().join("tmp")), Vec::<String>::new());
}

#[derive(Default)]
struct Recorder(Mutex<Vec<LayerProgress>>);

impl EnsureProgress for Recorder {
    fn layer(&self, l: &LayerProgress) {
        self.0.lock().unwrap().push(l.clone());
    }
}

/// Every layer gets a complete, ordered story: cached ones one `Cached` event; missing
/// ones `Queued`, `Downloading` with growing counts, then `Done` with the whole blob
/// downloaded and the whole tar extracted; a waiter `Waiting` then `Done`.
#[test]
fn progress_events_are_complete_and_consistent() {
    let _g = serial();
    let layers: Vec<Layer> = (0..4).map(|i| plain_layer(200 + i, 4, 200 * 1024)).collect();
    let mut f = Fetcher::default();
    f.image("one", &[&layers[0]]);
    f.image("img", &layers.iter().collect::<Vec<_>>());
    let t = tempfile::tempdir().unwrap();
    let cache = RootfsCache::open(t.path(), CacheOptions::default()).unwrap();
    let _base = cache.ensure(&f, "one").unwrap();
    let rec = Recorder::default();
    let r = cache.ensure_with(&f, "img", &EnsureOptions::new().with_progress(&rec)).unwrap();
    let events = rec.0.into_inner().unwrap();
    let mut by_index: BTreeMap<usize, Vec<LayerProgress>> = BTreeMap::new();
    for e in events {
        by_index.entry(e.index).or_default().push(e);
    }
    assert_eq!(by_index.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    let cached = &by_index[&0];
    assert_eq!(cached.len(), 1);
    assert_eq!(cached[0].state, LayerState::Cached);
    let mut downloaded_total = 0;
    for i in 1..4 {
        let ev = &by_index[&i];
        let l = &layers[i];
        assert!(ev.iter().all(|e| e.digest == l.desc.digest && e.total == l.desc.size));
        assert_eq!(ev[0].state, LayerState::Queued);
        let last = ev.last().unwrap();
        assert_eq!(last.state, LayerState::Done, "{ev:?}");
        assert_eq!(last.downloaded, l.desc.size);
        let tar_len = if i % 2 == 1 {
            let mut v = Vec::new();
            flate2::read::GzDecoder::new(&l.blob[..]).read_to_end(&mut v).unwrap();
            v.len() as u64
        } else {
            l.desc.size
        };
        assert_eq!(last.extracted, tar_len, "layer {i}: extracted ends at the tar size");
        let mid = &ev[1..ev.len() - 1];
        assert!(mid.len() >= 2, "layer {i}: some progress while downloading: {ev:?}");
        assert!(mid.iter().all(|e| e.state == LayerState::Downloading));
        for w in ev.windows(2) {
            assert!(w[0].downloaded <= w[1].downloaded && w[0].extracted <= w[1].extracted, "{w:?}");
        }
        downloaded_total += l.desc.size;
    }
    assert_eq!(cache.stats().bytes_downloaded, layers[0].desc.size + downloaded_total);
    drop(r);

    // A caller waiting for another one's extraction: Waiting, then Done.
    let slow = plain_layer(300, 8, 128 * 1024);
    let mut f2 = Fetcher { per_chunk: Some(Duration::from_millis(5)), ..Default::default() };
    f2.image("slow", &[&slow]);
    let rec = Recorder::default();
    std::thread::scope(|s| {
        let h = s.spawn(|| cache.ensure(&f2, "slow").unwrap());
        while cache.stats().misses < 5 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let r2 = cache.ensure_with(&f2, "slow", &EnsureOptions::new().with_progress(&rec)).unwrap();
        drop((h.join().unwrap(), r2));
    });
    let states: Vec<LayerState> = rec.0.into_inner().unwrap().iter().map(|e| e.state).collect();
    assert_eq!(states, [LayerState::Waiting, LayerState::Done]);
    assert_eq!(f2.opens_of(&slow.desc.digest), 1);
}

/// A fetcher reporting retries, resumed downloads and fallbacks through the observer
/// the cache hands it.
struct Observed(Fetcher);

impl ImageFetcher for Observed {
    fn resolve(&self, reference: &str) -> rootfs_cache::Result<ImageManifest> {
        self.0.resolve(reference)
    }
    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        self.0.open_blob(layer)
    }
    fn open_blob_observed(
        &self,
        layer: &Descriptor,
        observer: Arc<dyn FetchObserver>,
    ) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        observer.retry("mirror.test", "503");
        observer.retry("mirror.test", "503");
        observer.fallback("mirror.test", "down");
        observer.resumed("registry.test", 10);
        self.0.open_blob(layer)
    }
    fn resolve_observed(&self, reference: &str, observer: &dyn FetchObserver) -> rootfs_cache::Result<ImageManifest> {
        observer.retry("registry.test", "429");
        self.0.resolve(reference)
    }
}

#[test]
fn download_counters_and_prometheus() {
    let _g = serial();
    let layers: Vec<Layer> = (0..3).map(|i| plain_layer(400 + i, 2, 32 * 1024)).collect();
    let mut f = Fetcher::default();
    f.image("img", &layers.iter().collect::<Vec<_>>());
    let f = Observed(f);
    let t = tempfile::tempdir().unwrap();
    let cache = RootfsCache::open(t.path(), CacheOptions::default()).unwrap();
    let r = cache.ensure(&f, "img").unwrap();
    let s = cache.stats();
    let bytes: u64 = layers.iter().map(|l| l.desc.size).sum();
    assert_eq!(
        (s.bytes_downloaded, s.download_retries, s.host_fallbacks, s.resumed_downloads),
        (bytes, 1 + 3 * 2, 3, 3),
        "{s:?}"
    );
    // A tag resolves again (a retry), nothing is downloaded.
    drop(cache.ensure(&f, "img").unwrap());
    let s = cache.stats();
    assert_eq!((s.bytes_downloaded, s.download_retries), (bytes, 8));
    let text = s.prometheus();
    for line in [
        format!("rootfs_cache_downloaded_bytes_total {bytes}"),
        "rootfs_cache_download_retries_total 8".into(),
        "rootfs_cache_host_fallbacks_total 3".into(),
        "rootfs_cache_resumed_downloads_total 3".into(),
        "rootfs_cache_extractions_total 3".into(),
        "rootfs_cache_misses_total 3".into(),
        "rootfs_cache_hits_total 3".into(),
        "rootfs_cache_layers 3".into(),
        "rootfs_cache_leased_layers 3".into(),
        "# TYPE rootfs_cache_layer_bytes gauge".into(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
    }
    drop(r);
}
