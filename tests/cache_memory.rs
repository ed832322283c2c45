//! Peak memory of a cold, parallel `ensure` stays bounded: a 4-layer image (plain tar,
//! gzip, zstd, plain; 48 MiB of files each), generated on the fly by the fetcher so
//! neither the test nor the cache ever holds a blob, extracted 3 layers at a time with
//! the process's peak RSS (`VmHWM`) under 64 MiB.
//!
//! This file holds a single test so the process's high-water mark is this test's alone.

use std::io::{self, Read};

use rootfs_cache::{CacheOptions, Descriptor, Digest, Error, Hasher, ImageFetcher, ImageManifest, RootfsCache};

const FILE_BYTES: u64 = 24 << 20;
const FILES: u64 = 2;

/// A tar stream of `FILES` files of `FILE_BYTES` bytes (a pattern that differs per layer
/// and file), produced on the fly.
struct GeneratedTar {
    layer: u8,
    file: u64,
    pos: u64,
    trailer: usize,
    page: Box<[u8; 4096]>,
}

impl GeneratedTar {
    fn new(layer: u8) -> Self {
        GeneratedTar { layer, file: 0, pos: 0, trailer: 1024, page: Box::new([0; 4096]) }
    }

    fn header(&self) -> [u8; 512] {
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("l{}/file{}.bin", self.layer, self.file)).unwrap();
        h.set_size(FILE_BYTES);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        *h.as_bytes()
    }
}

impl Read for GeneratedTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.file == FILES {
            let n = buf.len().min(self.trailer);
            buf[..n].fill(0);
            self.trailer -= n;
            return Ok(n);
        }
        if self.pos < 512 {
            let h = self.header();
            let n = buf.len().min(512 - self.pos as usize);
            buf[..n].copy_from_slice(&h[self.pos as usize..self.pos as usize + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        let off = self.pos - 512;
        if off == 0 {
            for (i, b) in self.page.iter_mut().enumerate() {
                *b = (i % 251) as u8 ^ (self.file as u8) ^ self.layer.wrapping_mul(17);
            }
        }
        let n = buf.len().min((FILE_BYTES - off) as usize).min(4096 - (off % 4096) as usize);
        let start = (off % 4096) as usize;
        buf[..n].copy_from_slice(&self.page[start..start + n]);
        self.pos += n as u64;
        if self.pos == 512 + FILE_BYTES {
            self.file += 1;
            self.pos = 0;
        }
        Ok(n)
    }
}

/// Layer `i`'s blob, generated (and compressed) on the fly.
fn blob(i: u8) -> Box<dyn Read + Send> {
    let tar = GeneratedTar::new(i);
    match i % 4 {
        1 => Box::new(flate2::read::GzEncoder::new(tar, flate2::Compression::fast())),
        2 => Box::new(zstd::stream::read::Encoder::new(tar, 1).unwrap()),
        _ => Box::new(tar),
    }
}

struct Generated {
    manifest: ImageManifest,
}

impl ImageFetcher for Generated {
    fn resolve(&self, _reference: &str) -> rootfs_cache::Result<ImageManifest> {
        Ok(self.manifest.clone())
    }

    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        let i = self.manifest.layers.iter().position(|l| l == layer).ok_or(Error::NotFound { what: "blob".into() })?;
        Ok(blob(i as u8))
    }
}

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn peak_rss_of_a_cold_parallel_ensure_is_bounded() {
    let base = vm_hwm_kib();
    let layers: Vec<Descriptor> = (0..4u8)
        .map(|i| {
            let mut h = Hasher::new();
            let mut r = blob(i);
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = r.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let size = h.len();
            Descriptor {
                digest: h.finish(),
                size,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                annotations: Default::default(),
            }
        })
        .collect();
    let f = Generated { manifest: ImageManifest { digest: Digest::of(b"generated"), layers } };
    let dir = tempfile::tempdir().unwrap();
    let cache = RootfsCache::open(dir.path(), CacheOptions::default()).unwrap();
    assert_eq!(CacheOptions::default().concurrent_layers, 3);
    let r = cache.ensure(&f, "img").unwrap();
    for (i, lower) in r.lowers().iter().rev().enumerate() {
        let md = std::fs::metadata(lower.join(format!("l{i}/file1.bin"))).unwrap();
        assert_eq!(md.len(), FILE_BYTES);
    }
    let s = cache.stats();
    assert_eq!(s.extractions, 4);
    assert_eq!(s.bytes_downloaded, f.manifest.layers.iter().map(|l| l.size).sum::<u64>());
    let peak = vm_hwm_kib();
    eprintln!("VmHWM before {base} KiB, after {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB exceeds 64 MiB");
}
