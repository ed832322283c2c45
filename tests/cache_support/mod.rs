//! Helpers for `tests/cache.rs`: generated layers with a known expected tree, an
//! in-memory [`ImageFetcher`] that counts every call and can be made slow or faulty,
//! tree snapshots, disk usage, a small deterministic RNG and the skip policy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rootfs_cache::{Descriptor, Digest, Error, ImageFetcher, ImageManifest};

// ---------------------------------------------------------------------------------------
// Skip policy

/// `true` when running as root; otherwise skips (or fails under `CI`).
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root (CI is set)");
    eprintln!("skipping {test}: needs root");
    false
}

/// `true` when `tool` is on `PATH`; otherwise skips (or fails under `CI`).
pub fn require_tool(test: &str, tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).metadata().is_ok_and(|m| m.is_file())));
    if found {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs {tool} (CI is set)");
    eprintln!("skipping {test}: needs {tool}");
    false
}

// ---------------------------------------------------------------------------------------
// Randomness

/// SplitMix64: small, deterministic, good enough for picking images and delays.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from the clock, printed so a failure can be replayed (`CACHE_TEST_SEED`).
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("CACHE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: CACHE_TEST_SEED={s}");
    s
}

// ---------------------------------------------------------------------------------------
// Trees

/// One node of a file tree, as compared by the tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    /// Anything else (device, fifo, socket), by `st_mode`.
    Other(u32),
}

/// Relative path → node, for every entry below a root (the root itself excluded).
pub type Tree = BTreeMap<PathBuf, Node>;

/// Snapshot the tree below `root` (never following symlinks).
pub fn snapshot(root: &Path) -> io::Result<Tree> {
    let mut t = Tree::new();
    walk(root, Path::new(""), &mut t)?;
    Ok(t)
}

fn walk(root: &Path, rel: &Path, t: &mut Tree) -> io::Result<()> {
    for entry in std::fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let rel = rel.join(entry.file_name());
        let path = root.join(&rel);
        let md = std::fs::symlink_metadata(&path)?;
        let ft = md.file_type();
        let node = if ft.is_dir() {
            Node::Dir
        } else if ft.is_file() {
            Node::File(std::fs::read(&path)?)
        } else if ft.is_symlink() {
            Node::Symlink(std::fs::read_link(&path)?)
        } else {
            Node::Other(md.mode())
        };
        let is_dir = node == Node::Dir;
        t.insert(rel.clone(), node);
        if is_dir {
            walk(root, &rel, t)?;
        }
    }
    Ok(())
}

/// Describe how two trees differ (for assertion messages), or `None` if equal.
pub fn tree_diff(found: &Tree, expected: &Tree) -> Option<String> {
    if found == expected {
        return None;
    }
    let mut out = Vec::new();
    for (p, n) in expected {
        match found.get(p) {
            None => out.push(format!("missing {}", p.display())),
            Some(f) if f != n => out.push(format!("differs {}", p.display())),
            _ => {}
        }
    }
    for p in found.keys().filter(|p| !expected.contains_key(*p)) {
        out.push(format!("unexpected {}", p.display()));
    }
    out.truncate(10);
    Some(out.join(", "))
}

/// Names in a directory.
pub fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Disk usage of a tree: allocated blocks of every entry, `root` included, hardlinked
/// inodes once (what the cache's `meta` records as a layer's size).
pub fn disk_usage(root: &Path) -> u64 {
    fn go(p: &Path, seen: &mut BTreeSet<u64>) -> u64 {
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
    go(root, &mut BTreeSet::new())
}

// ---------------------------------------------------------------------------------------
// Layers

/// A generated layer: its blob, descriptor and the tree it must extract to.
#[derive(Clone)]
pub struct TestLayer {
    pub desc: Descriptor,
    pub blob: Arc<Vec<u8>>,
    pub tree: Tree,
}

/// Bytes that identify (layer `id`, file `j`) everywhere in the file.
fn content(id: u32, j: usize, size: usize) -> Vec<u8> {
    let mut rng = Rng::new(u64::from(id) << 32 | j as u64);
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(size);
    v
}

/// How a generated layer blob is compressed.
#[derive(Clone, Copy, Debug)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// Layer `id`: `files` files of `size` bytes under `l<id>/d<k>/`, a symlink, and a
/// `common` file every layer has (with its own content).
pub fn layer(id: u32, files: usize, size: usize, comp: Comp) -> TestLayer {
    let mut b = tar::Builder::new(Vec::new());
    let mut tree = Tree::new();
    let mut add = |b: &mut tar::Builder<Vec<u8>>, name: String, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, &name, data).unwrap();
        tree.insert(PathBuf::from(name), Node::File(data.to_vec()));
    };
    add(&mut b, "common".into(), format!("layer {id}\n").as_bytes());
    for j in 0..files {
        add(&mut b, format!("l{id}/d{}/f{j}", j % 4), &content(id, j, size));
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_mtime(1_700_000_000);
    b.append_link(&mut h, format!("l{id}/link"), "../common").unwrap();
    tree.insert(PathBuf::from(format!("l{id}/link")), Node::Symlink("../common".into()));
    tree.insert(PathBuf::from(format!("l{id}")), Node::Dir);
    for k in 0..files.min(4) {
        tree.insert(PathBuf::from(format!("l{id}/d{k}")), Node::Dir);
    }
    let tar = b.into_inner().unwrap();
    let (blob, media) = match comp {
        Comp::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            (e.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Comp::Zstd => (zstd::encode_all(&tar[..], 1).unwrap(), "application/vnd.oci.image.layer.v1.tar+zstd"),
    };
    let desc = Descriptor {
        digest: Digest::of(&blob),
        size: blob.len() as u64,
        media_type: media.into(),
        annotations: Default::default(),
    };
    TestLayer { desc, blob: Arc::new(blob), tree }
}

// ---------------------------------------------------------------------------------------
// Fetcher

/// What to do instead of serving a blob normally.
#[derive(Clone)]
pub enum Fault {
    /// Serve these bytes instead (the digest will not match).
    Bytes(Vec<u8>),
    /// Serve only the first `n` bytes, then a clean EOF.
    Truncate(usize),
    /// Serve `n` bytes, then wait for `gate` (at most 10 s), then fail with
    /// `ConnectionReset`.
    FailAfter(usize, Option<Gate>),
    /// `open_blob` itself fails with `NotFound`.
    Open,
}

/// A condition a faulty reader waits for before failing (to line up waiters).
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Default)]
struct Active {
    now: HashMap<Digest, usize>,
    /// Largest number of readers of one digest open at once.
    max: usize,
}

/// An in-memory registry: tags and `@digest`s → manifests, digests → blobs. Counts every
/// call, tracks concurrent readers per digest, and can be slowed down or made faulty.
pub struct TestFetcher {
    blobs: HashMap<Digest, Arc<Vec<u8>>>,
    images: HashMap<String, ImageManifest>,
    resolves: AtomicUsize,
    opens: Mutex<HashMap<Digest, usize>>,
    active: Arc<Mutex<Active>>,
    faults: Mutex<HashMap<Digest, (Fault, bool)>>,
    /// Sleep this long before serving each 64 KiB.
    pub slow: Option<Duration>,
}

impl Default for TestFetcher {
    fn default() -> Self {
        Self::new()
    }
}

impl TestFetcher {
    pub fn new() -> TestFetcher {
        TestFetcher {
            blobs: HashMap::new(),
            images: HashMap::new(),
            resolves: AtomicUsize::new(0),
            opens: Mutex::new(HashMap::new()),
            active: Arc::new(Mutex::new(Active::default())),
            faults: Mutex::new(HashMap::new()),
            slow: None,
        }
    }

    /// Register an image under `tag` (and under `@digest` and `digest`); its manifest
    /// digest is derived from the tag. Returns the manifest digest.
    pub fn image(&mut self, tag: &str, layers: &[&TestLayer]) -> Digest {
        let digest = Digest::of(format!("manifest of {tag}").as_bytes());
        let m = ImageManifest { digest, layers: layers.iter().map(|l| l.desc.clone()).collect() };
        for l in layers {
            self.blobs.insert(l.desc.digest, l.blob.clone());
        }
        self.images.insert(tag.to_string(), m.clone());
        self.images.insert(format!("@{digest}"), m.clone());
        self.images.insert(digest.to_string(), m);
        digest
    }

    /// Make `reference` resolve to the manifest `of` resolves to (an index digest, say).
    pub fn alias(&mut self, reference: &str, of: &str) {
        let m = self.images[of].clone();
        self.images.insert(reference.to_string(), m);
    }

    /// Make the next `open_blob` of `digest` (or every one, unless `once`) misbehave.
    pub fn fault(&self, digest: Digest, fault: Fault, once: bool) {
        self.faults.lock().unwrap().insert(digest, (fault, once));
    }

    pub fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
    }

    pub fn resolves(&self) -> usize {
        self.resolves.load(Ordering::SeqCst)
    }

    /// `open_blob` calls per digest.
    pub fn opens_of(&self, d: &Digest) -> usize {
        self.opens.lock().unwrap().get(d).copied().unwrap_or(0)
    }

    /// All `open_blob` calls.
    pub fn opens(&self) -> usize {
        self.opens.lock().unwrap().values().sum()
    }

    pub fn opens_map(&self) -> HashMap<Digest, usize> {
        self.opens.lock().unwrap().clone()
    }

    /// The largest number of readers of one digest that were open at the same time.
    pub fn max_concurrent_readers(&self) -> usize {
        self.active.lock().unwrap().max
    }

    /// (resolves, opens): a snapshot for "no fetcher call" assertions.
    pub fn calls(&self) -> (usize, usize) {
        (self.resolves(), self.opens())
    }
}

impl ImageFetcher for TestFetcher {
    fn resolve(&self, reference: &str) -> rootfs_cache::Result<ImageManifest> {
        self.resolves.fetch_add(1, Ordering::SeqCst);
        self.images.get(reference).cloned().ok_or_else(|| Error::NotFound { what: format!("tag {reference}") })
    }

    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        *self.opens.lock().unwrap().entry(layer.digest).or_default() += 1;
        let fault = {
            let mut faults = self.faults.lock().unwrap();
            match faults.get(&layer.digest) {
                Some((_, true)) => faults.remove(&layer.digest).map(|(f, _)| f),
                Some((f, false)) => Some(f.clone()),
                None => None,
            }
        };
        let mut data = self
            .blobs
            .get(&layer.digest)
            .cloned()
            .ok_or_else(|| Error::NotFound { what: format!("blob {}", layer.digest) })?;
        let mut fail_at = None;
        match fault {
            Some(Fault::Open) => return Err(Error::NotFound { what: format!("blob {} (injected)", layer.digest) }),
            Some(Fault::Bytes(b)) => data = Arc::new(b),
            Some(Fault::Truncate(n)) => data = Arc::new(data[..n.min(data.len())].to_vec()),
            Some(Fault::FailAfter(n, gate)) => fail_at = Some((n, gate)),
            None => {}
        }
        {
            let mut a = self.active.lock().unwrap();
            let n = a.now.entry(layer.digest).or_default();
            *n += 1;
            let n = *n;
            a.max = a.max.max(n);
        }
        Ok(Box::new(TestReader {
            data,
            pos: 0,
            fail_at,
            slow: self.slow,
            active: self.active.clone(),
            digest: layer.digest,
        }))
    }
}

struct TestReader {
    data: Arc<Vec<u8>>,
    pos: usize,
    fail_at: Option<(usize, Option<Gate>)>,
    slow: Option<Duration>,
    active: Arc<Mutex<Active>>,
    digest: Digest,
}

const CHUNK: usize = 64 * 1024;

impl Read for TestReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut end = self.data.len();
        if let Some((n, gate)) = &self.fail_at {
            if self.pos >= *n {
                if let Some(gate) = gate {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !gate() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "injected: connection reset"));
            }
            end = end.min(*n);
        }
        if self.pos >= end {
            return Ok(0);
        }
        // One chunk at most per read, never crossing a 64 KiB boundary, so a slow
        // reader sleeps once per 64 KiB served.
        let chunk_end = ((self.pos / CHUNK) + 1) * CHUNK;
        let n = buf.len().min(end - self.pos).min(chunk_end - self.pos);
        if let Some(d) = self.slow {
            if self.pos % CHUNK == 0 {
                std::thread::sleep(d);
            }
        }
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for TestReader {
    fn drop(&mut self) {
        let mut a = self.active.lock().unwrap();
        if let Some(n) = a.now.get_mut(&self.digest) {
            *n -= 1;
        }
    }
}
