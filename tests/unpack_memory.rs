//! Peak memory stays bounded whatever the layer size: a 768 MiB layer (plain and zstd),
//! generated on the fly so the test itself holds nothing, and a layer of 200 entries
//! with 1 MiB names each, must extract with the process's peak RSS (`VmHWM`) under
//! 64 MiB.
//!
//! This file holds a single test so the process's high-water mark is this test's alone.

use std::io::{self, Read, Write};

use rootfs_cache::{UnpackOptions, unpack};

const FILE_BYTES: u64 = 96 << 20;
const FILES: u64 = 8;

/// A tar stream of `FILES` files of `FILE_BYTES` pseudo-random-ish bytes, produced on
/// the fly.
struct GeneratedTar {
    file: u64,
    pos: u64, // position inside the current member (header + data + padding)
    trailer: usize,
    page: Box<[u8; 4096]>,
}

impl GeneratedTar {
    fn new() -> Self {
        GeneratedTar { file: 0, pos: 0, trailer: 1024, page: Box::new([0; 4096]) }
    }

    fn header(i: u64) -> [u8; 512] {
        let mut h = tar::Header::new_ustar();
        h.set_path(format!("data/file{i}.bin")).unwrap();
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
            let h = Self::header(self.file);
            let n = buf.len().min(512 - self.pos as usize);
            buf[..n].copy_from_slice(&h[self.pos as usize..self.pos as usize + n]);
            self.pos += n as u64;
            return Ok(n);
        }
        // Data: a 4 KiB pattern that differs per file (cheap to make in a debug build).
        let off = self.pos - 512;
        let n = buf.len().min((FILE_BYTES - off) as usize).min(4096 - (off % 4096) as usize);
        if off == 0 {
            for (i, b) in self.page.iter_mut().enumerate() {
                *b = (i % 251) as u8 ^ self.file as u8;
            }
        }
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

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Pipes `src` through a zstd encoder on a helper thread, so neither side holds the
/// stream.
fn zstd_stream(src: GeneratedTar) -> impl Read + Send {
    let (rx, tx) = nix::unistd::pipe().unwrap();
    let (rx, tx) = (std::fs::File::from(rx), std::fs::File::from(tx));
    std::thread::spawn(move || {
        let mut enc = zstd::stream::write::Encoder::new(tx, 1).unwrap();
        let mut src = src;
        io::copy(&mut src, &mut enc).unwrap();
        enc.finish().unwrap();
    });
    rx
}

#[test]
fn peak_rss_is_bounded_for_large_layers() {
    let base = vm_hwm_kib();
    for compressed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let opts = UnpackOptions::default();
        let stats = if compressed {
            unpack(zstd_stream(GeneratedTar::new()), dir.path(), &opts).unwrap()
        } else {
            unpack(GeneratedTar::new(), dir.path(), &opts).unwrap()
        };
        assert_eq!(stats.files, FILES);
        assert_eq!(stats.file_bytes, FILES * FILE_BYTES);
        assert_eq!(std::fs::metadata(dir.path().join("data/file3.bin")).unwrap().len(), FILE_BYTES);
    }
    // Metadata bombs: 200 entries each carrying ~1 MiB of PAX path (skipped AUFS names,
    // so nothing is retained): batches must be bounded by metadata bytes, not only by
    // entry count.
    // Streamed into the encoder entry by entry: the test never holds the 200 MB tar.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let filler = "./".repeat(500_000);
    for _ in 0..200 {
        let path = format!("{filler}x/.wh..wh.meta");
        let rec = format!(" path={path}\n");
        let mut len = rec.len() + 1;
        while len.to_string().len() + rec.len() != len {
            len = len.to_string().len() + rec.len();
        }
        let mut body = format!("{len}{rec}").into_bytes();
        let mut h = tar::Header::new_ustar();
        h.set_path("pax").unwrap();
        h.set_size(body.len() as u64);
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_cksum();
        enc.write_all(h.as_bytes()).unwrap();
        body.resize(body.len().div_ceil(512) * 512, 0);
        enc.write_all(&body).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path("placeholder").unwrap();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_cksum();
        enc.write_all(h.as_bytes()).unwrap();
    }
    enc.write_all(&[0; 1024]).unwrap();
    let blob = enc.finish().unwrap();
    for pipelined in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = UnpackOptions::default();
        o.pipelined = pipelined;
        assert_eq!(unpack(&blob[..], dir.path(), &o).unwrap().entries, 200);
    }

    let peak = vm_hwm_kib();
    eprintln!("VmHWM before {base} KiB, after {peak} KiB");
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB exceeds 64 MiB");
}
