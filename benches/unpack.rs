//! Criterion bench: unpacking a generated rootfs-like layer (thousands of small files,
//! directories, symlinks and hardlinks, plus a few large files), as plain tar, gzip and
//! zstd, pipelined and single-threaded.
//!
//! `cargo bench --bench unpack`. The destination is a fresh directory under
//! `$ROOTFS_BENCH_DIR` (default: the system temp dir); point it at a tmpfs to measure
//! CPU and syscall cost without disk writeback noise. For the comparison against GNU
//! tar on a real distribution rootfs see `benches/peer.sh`.

use std::io::Write;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rootfs_cache::{UnpackOptions, unpack};

/// A deterministic rootfs-like tar: ~4k small files in ~300 dirs, symlinks, hardlinks,
/// and 4 files of 8 MiB. About 60 MiB.
fn rootfs_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let header = |kind: tar::EntryType, size: u64, mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    for d in 0..300 {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, format!("usr/lib/pkg{d:03}/"), std::io::empty()).unwrap();
        for f in 0..13 {
            // Text-like content: compressible, like binaries and scripts in a real image.
            let len = (next() % 24_000) as usize + 64;
            let word = format!("pkg{d} file{f} {} ", next() % 1000);
            let data: Vec<u8> = word.bytes().cycle().take(len).collect();
            let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
            b.append_data(&mut h, format!("usr/lib/pkg{d:03}/f{f}.so"), &data[..]).unwrap();
        }
        let mut h = header(tar::EntryType::Symlink, 0, 0o777);
        b.append_link(&mut h, format!("usr/lib/pkg{d:03}/link"), "f0.so").unwrap();
        let mut h = header(tar::EntryType::Link, 0, 0o644);
        b.append_link(&mut h, format!("usr/lib/pkg{d:03}/hard"), format!("usr/lib/pkg{d:03}/f1.so")).unwrap();
    }
    for i in 0..4 {
        let data: Vec<u8> = (0..8 << 20).map(|_| (next() & 0x3f) as u8).collect();
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o755);
        b.append_data(&mut h, format!("opt/big{i}.bin"), &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn bench_dir() -> PathBuf {
    std::env::var_os("ROOTFS_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

fn bench(c: &mut Criterion) {
    let plain = rootfs_tar();
    let gzip = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&plain).unwrap();
        e.finish().unwrap()
    };
    let zstd = zstd::encode_all(&plain[..], 3).unwrap();
    let base = bench_dir();

    let mut g = c.benchmark_group("unpack");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(plain.len() as u64));
    for (name, blob) in [("plain", &plain), ("gzip", &gzip), ("zstd", &zstd)] {
        for pipelined in [true, false] {
            let id = format!("{name}/{}", if pipelined { "pipelined" } else { "single" });
            let digest = rootfs_cache::Digest::of(blob);
            g.bench_function(id, |bch| {
                bch.iter_batched(
                    || tempfile::tempdir_in(&base).unwrap(),
                    |dir| {
                        let mut o = UnpackOptions::default();
                        o.expected_digest = Some(digest);
                        o.pipelined = pipelined;
                        unpack(&blob[..], dir.path(), &o).unwrap();
                        dir // removed outside the timed section
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
