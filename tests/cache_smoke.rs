//! Basic flow of the cache with an in-memory fetcher: miss, hit, digest hit with zero
//! fetcher calls, persistence across reopen, Busy on a second open.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use rootfs_cache::{CacheOptions, Descriptor, Digest, Error, ImageFetcher, ImageManifest, RootfsCache};

fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

struct MemFetcher {
    blobs: HashMap<Digest, Vec<u8>>,
    images: HashMap<String, ImageManifest>,
    resolves: AtomicUsize,
    opens: Mutex<HashMap<Digest, usize>>,
}

impl MemFetcher {
    fn new() -> Self {
        MemFetcher {
            blobs: HashMap::new(),
            images: HashMap::new(),
            resolves: AtomicUsize::new(0),
            opens: Mutex::new(HashMap::new()),
        }
    }
    fn image(&mut self, tag: &str, layers: Vec<Vec<u8>>) -> Digest {
        let descs: Vec<Descriptor> = layers
            .into_iter()
            .map(|b| {
                let d = Digest::of(&b);
                let desc = Descriptor {
                    digest: d,
                    size: b.len() as u64,
                    media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                    annotations: Default::default(),
                };
                self.blobs.insert(d, b);
                desc
            })
            .collect();
        let digest = Digest::of(tag.as_bytes());
        let m = ImageManifest { digest, layers: descs };
        self.images.insert(tag.to_string(), m.clone());
        self.images.insert(format!("@{digest}"), m);
        digest
    }
    fn opens(&self) -> usize {
        self.opens.lock().unwrap().values().sum()
    }
}

impl ImageFetcher for MemFetcher {
    fn resolve(&self, reference: &str) -> rootfs_cache::Result<ImageManifest> {
        self.resolves.fetch_add(1, Ordering::SeqCst);
        self.images.get(reference).cloned().ok_or(Error::NotFound { what: reference.to_string() })
    }
    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        *self.opens.lock().unwrap().entry(layer.digest).or_default() += 1;
        Ok(Box::new(std::io::Cursor::new(self.blobs[&layer.digest].clone())))
    }
}

#[test]
fn miss_hit_digest_hit_reopen_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = MemFetcher::new();
    let base = layer(&[("etc/os-release", "v1"), ("bin/sh", "sh")]);
    let top = layer(&[("etc/os-release", "v2"), ("etc/.wh.gone", "")]);
    let app = layer(&[("app/run", "go")]);
    let d1 = f.image("one", vec![base.clone(), top]);
    let _d2 = f.image("two", vec![base, app]);

    let cache = RootfsCache::open(dir.path(), CacheOptions::default()).unwrap();
    let r = cache.ensure(&f, "one").unwrap();
    assert_eq!(r.lowers().len(), 2);
    assert_eq!(std::fs::read_to_string(r.lowers()[0].join("etc/os-release")).unwrap(), "v2");
    assert_eq!(std::fs::read_to_string(r.lowers()[1].join("bin/sh")).unwrap(), "sh");
    assert_eq!((f.resolves.load(Ordering::SeqCst), f.opens()), (1, 2));
    let s = cache.stats();
    assert_eq!((s.misses, s.hits, s.extractions, s.entries, s.leased_entries), (2, 0, 2, 2, 2));

    // Another image sharing the base layer: only its own layer is fetched.
    let r2 = cache.ensure(&f, "two").unwrap();
    assert_eq!(f.opens(), 3);
    assert_eq!(r2.lowers()[1], r.lowers()[1]);

    // Digest reference of a cached image: no fetcher call at all.
    let before = (f.resolves.load(Ordering::SeqCst), f.opens());
    let r3 = cache.ensure(&f, &format!("@{d1}")).unwrap();
    assert_eq!((f.resolves.load(Ordering::SeqCst), f.opens()), before);
    assert_eq!(r3.lowers(), r.lowers());

    // A second owner is refused.
    assert!(matches!(RootfsCache::open(dir.path(), CacheOptions::default()), Err(Error::Busy { .. })));
    drop((r, r2, r3));
    drop(cache);

    // Reopened: records survive; a digest hit is still free.
    let cache = RootfsCache::open(dir.path(), CacheOptions::default()).unwrap();
    assert_eq!(cache.stats().entries, 3);
    let r = cache.ensure(&f, &format!("@{d1}")).unwrap();
    assert_eq!((f.resolves.load(Ordering::SeqCst), f.opens()), before);
    assert_eq!(std::fs::read_to_string(r.lowers()[0].join("etc/os-release")).unwrap(), "v2");
}
