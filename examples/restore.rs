//! The README's "run it" command: `cargo run --release --example restore`.
//!
//! Until the layer cache and overlay mounts land, this is the extraction demo: it builds
//! a small three-layer demo image in a temp dir (no network, no external tools: a base
//! layer of ~3000 files, an update layer that rewrites and deletes files, and a layer
//! with an opaque directory), then
//! 1. extracts each layer in overlay form (what the cache stores: whiteouts become
//!    character devices 0:0, opaque dirs get the opaque xattr), digest verified;
//! 2. flattens all three onto one directory (`WhiteoutMode::Apply`, like `umoci unpack`);
//!
//! and prints each phase's time. Its last line is a one-line summary for scripts.
//! Run it as root for ownership and `trusted.*` xattrs; unprivileged it uses
//! `UnpackOptions::rootless()` and says so.

use std::io::Write;
use std::time::Instant;

use rootfs_cache::{Digest, UnpackOptions, WhiteoutMode, unpack};

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

fn main() {
    let root = nix::unistd::geteuid().is_root();
    let base_opts = if root { UnpackOptions::default() } else { UnpackOptions::rootless() };
    println!(
        "rootfs-cache extraction demo ({})",
        if root { "root: owners and trusted.* xattrs applied" } else { "unprivileged: rootless options" }
    );
    let layers = demo_image();
    let work = tempfile::tempdir().expect("temp dir");

    let mut overlay_ms = Vec::new();
    let mut entries = 0;
    for (i, blob) in layers.iter().enumerate() {
        let dest = work.path().join(format!("layer{i}"));
        std::fs::create_dir(&dest).unwrap();
        let mut o = base_opts.clone();
        o.expected_digest = Some(Digest::of(blob));
        let t = Instant::now();
        let s = unpack(&blob[..], &dest, &o).unwrap_or_else(|e| panic!("layer {i}: {e}"));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        overlay_ms.push(ms);
        entries += s.entries;
        println!(
            "layer {i}: {:>5} entries, {:>8} bytes, {:>2} whiteouts, {ms:7.2} ms  {}",
            s.entries, s.file_bytes, s.whiteouts, s.digest
        );
    }

    let flat = work.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    let t = Instant::now();
    for blob in &layers {
        let mut o = base_opts.clone();
        o.whiteouts = WhiteoutMode::Apply;
        o.expected_digest = Some(Digest::of(blob));
        unpack(&blob[..], &flat, &o).expect("flatten");
    }
    let flatten_ms = t.elapsed().as_secs_f64() * 1e3;
    let release = std::fs::read_to_string(flat.join("etc/os-release")).unwrap();
    assert!(release.contains("VERSION=2"));
    assert!(!flat.join("usr/share/pkg1").exists() && !flat.join("var/cache/stale.bin").exists());
    println!("flattened 3 layers (whiteouts applied) in {flatten_ms:.2} ms; etc/os-release says {:?}", release.trim());

    let extract_ms: f64 = overlay_ms.iter().sum();
    println!(
        "layers={} entries={entries} extract_ms={extract_ms:.2} flatten_ms={flatten_ms:.2} mode={}",
        layers.len(),
        if root { "root" } else { "rootless" }
    );
}
