//! Failures in the middle of an extraction: a full file system, an input that fails
//! mid-stream, a hostile entry after many good ones. Each must surface as the right typed
//! error, promptly (the pipeline must not deadlock when a stage stops), in both the
//! pipelined and the inline mode, for plain and compressed input.

#[path = "common/tmpfs.rs"]
mod tmpfs;
use std::io::{self, Read, Write};
use tmpfs::with_small_tmpfs;

use rootfs_cache::{Error, UnpackOptions, unpack};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skip (or, under CI, fail) when not root.
fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{test} needs root (CI is set)");
    eprintln!("skipping {test}: needs root");
    false
}

fn layer(files: usize, size: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..files {
        let data: Vec<u8> = (0..size).map(|j| (i * 31 + j) as u8).collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, format!("d{}/f{i}", i % 7), &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn variants(tar: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![("plain", tar.to_vec()), ("gzip", gzip(tar)), ("zstd", zstd::encode_all(tar, 1).unwrap())]
}

fn opts(pipelined: bool) -> UnpackOptions {
    let mut o = UnpackOptions::default();
    o.pipelined = pipelined;
    o
}

#[test]
fn full_file_system_is_enospc_not_a_hang() {
    if !require_root("full_file_system_is_enospc_not_a_hang") {
        return;
    }
    // 40 files of 256 KiB: 10 MiB into a 2 MiB tmpfs.
    let tar = layer(40, 256 * 1024);
    let t = tempfile::tempdir().unwrap();
    with_small_tmpfs(t.path(), "2m", || {
        for (name, blob) in variants(&tar) {
            for pipelined in [true, false] {
                let dest = t.path().join(format!("{name}-{pipelined}"));
                std::fs::create_dir(&dest).unwrap();
                let err = unpack(&blob[..], &dest, &opts(pipelined)).unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{name} pipelined={pipelined}: {err}");
                assert!(matches!(err, Error::Io { .. }), "{name} pipelined={pipelined}: {err:?}");
                // The message names the operation and the file (strace style).
                let msg = err.to_string();
                assert!(msg.contains(dest.to_str().unwrap()), "{msg}");
                std::fs::remove_dir_all(&dest).unwrap();
            }
        }
    });
}

/// Yields `limit` bytes of `data`, then fails with `kind`.
struct FailingReader<'a> {
    data: &'a [u8],
    pos: usize,
    limit: usize,
    kind: io::ErrorKind,
}

impl Read for FailingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.limit {
            return Err(io::Error::new(self.kind, "registry connection reset"));
        }
        // Small, uneven reads, like a network stream.
        let n = buf.len().min(self.limit - self.pos).min(7919);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn input_error_mid_stream_is_a_read_error() {
    let tar = layer(50, 64 * 1024);
    for (name, blob) in variants(&tar) {
        for pipelined in [true, false] {
            let dest = tempfile::tempdir().unwrap();
            let r = FailingReader { data: &blob, pos: 0, limit: blob.len() / 2, kind: io::ErrorKind::ConnectionReset };
            let err = unpack(r, dest.path(), &opts(pipelined)).unwrap_err();
            match &err {
                Error::Read { source, .. } => {
                    assert!(source.to_string().contains("connection reset"), "{name} pipelined={pipelined}: {err}")
                }
                e => panic!("{name} pipelined={pipelined}: expected Error::Read, got {e:?}"),
            }
        }
    }
}

/// Interrupted reads are retried, not errors.
struct InterruptingReader<'a> {
    data: &'a [u8],
    pos: usize,
    calls: usize,
}

impl Read for InterruptingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls % 3 == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.data.len() - self.pos).min(10_000);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn interrupted_reads_are_retried() {
    let tar = layer(20, 30_000);
    for (name, blob) in variants(&tar) {
        for pipelined in [true, false] {
            let dest = tempfile::tempdir().unwrap();
            let mut o = opts(pipelined);
            o.expected_digest = Some(rootfs_cache::Digest::of(&blob));
            let s = unpack(InterruptingReader { data: &blob, pos: 0, calls: 0 }, dest.path(), &o)
                .unwrap_or_else(|e| panic!("{name} pipelined={pipelined}: {e}"));
            assert_eq!(s.files, 20);
        }
    }
}

#[test]
fn hostile_entry_after_many_files_is_reported_as_such() {
    // Thousands of good entries fill the pipeline before the bad one arrives.
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..3000 {
        let mut h = tar::Header::new_gnu();
        h.set_size(100);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("ok/f{i}"), &[b'x'; 100][..]).unwrap();
    }
    let mut tar = b.into_inner().unwrap();
    // A raw header: the tar crate refuses to write `..` itself.
    tar.truncate(tar.len() - 1024);
    let mut h = tar::Header::new_ustar();
    h.as_mut_bytes()[..11].copy_from_slice(b"../escape\0\0");
    h.set_size(0);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(&[0; 1024]);
    for (name, blob) in variants(&tar) {
        for pipelined in [true, false] {
            let parent = tempfile::tempdir().unwrap();
            let dest = parent.path().join("dest");
            std::fs::create_dir(&dest).unwrap();
            let err = unpack(&blob[..], &dest, &opts(pipelined)).unwrap_err();
            assert!(
                matches!(&err, Error::PathEscape { entry, .. } if entry == "../escape"),
                "{name} pipelined={pipelined}: {err:?}"
            );
            assert!(!parent.path().join("escape").exists());
        }
    }
}

#[test]
fn write_stage_failure_stops_the_reader_promptly() {
    if !require_root("write_stage_failure_stops_the_reader_promptly") {
        return;
    }
    // An endless input: if a failed writer did not stop the pipeline, this would never
    // return. The generator serves one valid header, then file data forever.
    struct Endless {
        header: Vec<u8>,
        pos: usize,
        served: u64,
    }
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos < self.header.len() {
                let n = buf.len().min(self.header.len() - self.pos);
                buf[..n].copy_from_slice(&self.header[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            buf.fill(7);
            self.served += buf.len() as u64;
            Ok(buf.len())
        }
    }
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_cksum();
    let t = tempfile::tempdir().unwrap();
    with_small_tmpfs(t.path(), "4m", || {
        for pipelined in [true, false] {
            let dest = t.path().join(format!("d{pipelined}"));
            std::fs::create_dir(&dest).unwrap();
            let input = Endless { header: h.as_bytes().to_vec(), pos: 0, served: 0 };
            let err = unpack(input, &dest, &opts(pipelined)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "pipelined={pipelined}: {err}");
            std::fs::remove_dir_all(&dest).unwrap();
        }
    });
}

/// An input whose `read` panics half-way.
struct PanickingReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Read for PanickingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        assert!(self.pos < self.data.len() / 2, "input reader panics");
        let n = buf.len().min(self.data.len() - self.pos).min(64 * 1024);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A panic in a stage (here the input's `read`, on the caller's thread for a plain tar,
/// on the decode thread for gzip and zstd) reaches the caller: the helper threads stop,
/// nothing waits forever.
#[test]
fn panicking_input_propagates_not_a_hang() {
    let tar = layer(200, 20_000);
    for (name, blob) in variants(&tar) {
        for pipelined in [true, false] {
            let (tx, rx) = std::sync::mpsc::channel();
            let blob = blob.clone();
            std::thread::spawn(move || {
                let dest = tempfile::tempdir().unwrap();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    unpack(PanickingReader { data: &blob, pos: 0 }, dest.path(), &opts(pipelined))
                }));
                let _ = tx.send(r.is_err());
            });
            let panicked = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("{name} pipelined={pipelined}: hung after a panic in a stage"));
            assert!(panicked, "{name} pipelined={pipelined}: the panic was swallowed");
        }
    }
}
