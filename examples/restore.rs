//! The README's "run it" command: `cargo run --release --example restore`.
//!
//! Builds a small three-layer demo image in memory (no network, no external tools: a
//! base layer of ~3000 files, an update layer that rewrites and deletes files, and a
//! layer with an opaque directory), serves it through an in-memory `ImageFetcher`, and
//! shows the point of the crate:
//! 1. one cold restore: `RootfsCache::ensure` extracts each layer once (digest verified,
//!    overlay whiteout format);
//! 2. 100 warm restores by digest: answered from the cache's index, no fetcher call;
//! 3. for comparison, re-extracting the image (what "untar on every restore" costs).
//!
//! Overlay mounts arrive with the mount backends; until then a restore ends at the
//! lower directories a runtime would mount. The last line is a one-line summary for
//! scripts. Run as root for ownership and `trusted.*` xattrs; unprivileged it uses
//! `UnpackOptions::rootless()` and says so.

use std::io::Write;
use std::time::Instant;

use std::io::Read;

use rootfs_cache::{
    CacheOptions, Descriptor, Digest, ImageFetcher, ImageManifest, RootfsCache, UnpackOptions, WhiteoutMode, unpack,
};

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    b.append_data(&mut header(tar::EntryType::Regular, data.len() as u64, 0o644), path, data).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    b.append_data(&mut header(tar::EntryType::Directory, 0, 0o755), path, std::io::empty()).unwrap();
}

/// Three gzip-compressed layers, bottom first.
fn demo_image() -> Vec<Vec<u8>> {
    let mut base = tar::Builder::new(Vec::new());
    for d in 0..100 {
        dir(&mut base, &format!("usr/share/pkg{d}/"));
        for f in 0..30 {
            let text = format!("package {d} file {f}\n").repeat(50 + f * 20);
            file(&mut base, &format!("usr/share/pkg{d}/file{f}.txt"), text.as_bytes());
        }
    }
    dir(&mut base, "etc/");
    file(&mut base, "etc/os-release", b"NAME=demo\nVERSION=1\n");
    dir(&mut base, "var/cache/");
    file(&mut base, "var/cache/stale.bin", &[7u8; 100_000]);

    let mut update = tar::Builder::new(Vec::new());
    dir(&mut update, "etc/");
    file(&mut update, "etc/os-release", b"NAME=demo\nVERSION=2\n");
    dir(&mut update, "usr/share/pkg0/");
    file(&mut update, "usr/share/pkg0/.wh.file0.txt", b""); // delete a file
    file(&mut update, "usr/share/.wh.pkg1", b""); // delete a directory

    let mut clean = tar::Builder::new(Vec::new());
    dir(&mut clean, "var/cache/");
    file(&mut clean, "var/cache/.wh..wh..opq", b""); // empty the directory...
    file(&mut clean, "var/cache/fresh.txt", b"rebuilt\n"); // ...then refill it

    [base, update, clean]
        .into_iter()
        .map(|b| {
            let tar = b.into_inner().unwrap();
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&tar).unwrap();
            gz.finish().unwrap()
        })
        .collect()
}

/// Serves the demo image from memory.
struct DemoFetcher {
    manifest: ImageManifest,
    blobs: Vec<Vec<u8>>,
}

impl ImageFetcher for DemoFetcher {
    fn resolve(&self, _reference: &str) -> rootfs_cache::Result<ImageManifest> {
        Ok(self.manifest.clone())
    }
    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn Read + Send>> {
        let i = self.manifest.layers.iter().position(|l| l.digest == layer.digest).expect("a demo layer");
        Ok(Box::new(std::io::Cursor::new(self.blobs[i].clone())))
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let root = nix::unistd::geteuid().is_root();
    let unpack_opts = if root { UnpackOptions::default() } else { UnpackOptions::rootless() };
    println!(
        "rootfs-cache restore demo ({})",
        if root { "root: owners and trusted.* xattrs applied" } else { "unprivileged: rootless extraction options" }
    );
    let blobs = demo_image();
    let layers = blobs
        .iter()
        .map(|b| Descriptor {
            digest: Digest::of(b),
            size: b.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        })
        .collect();
    let fetcher = DemoFetcher { manifest: ImageManifest { digest: Digest::of(b"demo image"), layers }, blobs };
    let work = tempfile::tempdir().expect("temp dir");

    let mut opts = CacheOptions::default();
    opts.unpack = unpack_opts.clone();
    let cache = RootfsCache::open(work.path().join("cache"), opts).expect("open cache");
    let t = Instant::now();
    let rootfs = cache.ensure(&fetcher, "demo:latest").expect("cold ensure");
    let cold = t.elapsed();
    let top = rootfs.lowers()[0].clone();
    println!(
        "cold restore: {:7.2} ms  ({} layers extracted into {})",
        ms(cold),
        rootfs.lowers().len(),
        work.path().display()
    );
    let reference = format!("@{}", rootfs.manifest_digest());
    drop(rootfs);

    let mut warm: Vec<f64> = (0..100)
        .map(|_| {
            let t = Instant::now();
            let r = cache.ensure(&fetcher, &reference).expect("warm ensure");
            let e = ms(t.elapsed());
            drop(r);
            e
        })
        .collect();
    warm.sort_by(f64::total_cmp);
    let (p50, p99) = (warm[49], warm[98]);
    println!("warm restore: p50 {:.4} ms, p99 {:.4} ms  (100 restores by digest, no fetcher call)", p50, p99);

    // What re-extracting on every restore would cost: flatten the image once more.
    let flat = work.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    let t = Instant::now();
    for (blob, desc) in fetcher.blobs.iter().zip(&fetcher.manifest.layers) {
        let mut o = unpack_opts.clone();
        o.whiteouts = WhiteoutMode::Apply;
        o.expected_digest = Some(desc.digest);
        unpack(&blob[..], &flat, &o).expect("flatten");
    }
    let reextract = t.elapsed();
    let release = std::fs::read_to_string(flat.join("etc/os-release")).unwrap();
    assert!(release.contains("VERSION=2"));
    assert!(!flat.join("usr/share/pkg1").exists() && !flat.join("var/cache/stale.bin").exists());
    assert!(top.join("var/cache/fresh.txt").exists());
    println!("re-extract:   {:7.2} ms  (flattening all layers again, as untar-on-restore does)", ms(reextract));
    let s = cache.stats();
    println!("cache: {} layers, {} bytes, {} hits, {} misses", s.entries, s.bytes_in_use, s.hits, s.misses);
    println!(
        "cold_ms={:.2} warm_p50_ms={:.4} warm_p99_ms={:.4} speedup={:.0}x reextract_ms={:.2} mode={}",
        ms(cold),
        p50,
        p99,
        ms(reextract) / p50,
        ms(reextract),
        if root { "root" } else { "rootless" }
    );
}
