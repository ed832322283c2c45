//! Extraction stays within a low open-file limit: regular files are opened by one stage
//! and closed by another, so descriptors in flight must be bounded by construction.
//!
//! A single test in its own binary, because it lowers `RLIMIT_NOFILE` for the process.

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use rootfs_cache::{UnpackOptions, unpack};

fn many_small_files(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..n / 100 {
        for f in 0..100 {
            let data = format!("{d}/{f}\n");
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            b.append_data(&mut h, format!("d{d}/sub/f{f}"), data.as_bytes()).unwrap();
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn extraction_fits_in_256_descriptors() {
    let blob = many_small_files(10_000);
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).unwrap();
    for pipelined in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = UnpackOptions::default();
        o.pipelined = pipelined;
        let s = unpack(&blob[..], dir.path(), &o).unwrap_or_else(|e| panic!("pipelined={pipelined}: {e}"));
        assert_eq!(s.files, 10_000);
        assert_eq!(std::fs::read_to_string(dir.path().join("d99/sub/f99")).unwrap(), "99/99\n");
    }
}
