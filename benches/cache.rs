//! Criterion bench: a warm `ensure` by digest (the cache-hit path every restore takes),
//! and a warm `ensure` by tag (one `resolve` call, layers present).
//!
//! `cargo bench --bench cache`

use std::collections::HashMap;
use std::io::Read;

use criterion::{Criterion, criterion_group, criterion_main};
use rootfs_cache::{CacheOptions, Descriptor, Digest, ImageFetcher, ImageManifest, RootfsCache};

/// An in-memory fetcher: the bench measures the cache, not a source.
struct MemFetcher {
    blobs: HashMap<Digest, Vec<u8>>,
    manifest: ImageManifest,
}

impl ImageFetcher for MemFetcher {
    fn resolve(&self, _reference: &str) -> rootfs_cache::Result<ImageManifest> {
        Ok(self.manifest.clone())
    }
    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::io::Cursor::new(self.blobs[&layer.digest].clone())))
    }
}

fn layer(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..20 {
        let data = format!("layer {n} file {i}");
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("l{n}/f{i}"), data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn bench(c: &mut Criterion) {
    let mut blobs = HashMap::new();
    let mut layers = Vec::new();
    for n in 0..3 {
        let b = layer(n);
        let d = Digest::of(&b);
        layers.push(Descriptor {
            digest: d,
            size: b.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            annotations: Default::default(),
        });
        blobs.insert(d, b);
    }
    let manifest = ImageManifest { digest: Digest::of(b"bench image"), layers };
    let reference = format!("@{}", manifest.digest);
    let f = MemFetcher { blobs, manifest };
    let dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::open(dir.path(), CacheOptions::default()).unwrap();
    drop(cache.ensure(&f, "t").unwrap()); // cold, once

    let mut g = c.benchmark_group("ensure_warm");
    g.bench_function("by_digest_3_layers", |b| b.iter(|| drop(cache.ensure(&f, &reference).unwrap())));
    g.bench_function("by_tag_3_layers", |b| b.iter(|| drop(cache.ensure(&f, "t").unwrap())));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
