//! Regressions for what an adversarial review of `unpack` found: a stack overflow on deep
//! directory chains, unbounded retained metadata, an uncapped zstd window, quadratic
//! whiteout and xattr handling, stale deferred directory metadata, paths beyond
//! `PATH_MAX`, and sparse files with a huge apparent size.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use rootfs_cache::{Error, UnpackOptions, WhiteoutMode, unpack};

/// A raw ustar header (the `tar` crate refuses some of what these tests need).
fn header(name: &str, typeflag: u8, mode: u32, uid: u32, size: u64, link: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let oct = |v: u64, w: usize| format!("{v:0w$o}\0", w = w - 1).into_bytes();
    h[100..108].copy_from_slice(&oct(u64::from(mode), 8));
    h[108..116].copy_from_slice(&oct(u64::from(uid), 8));
    h[116..124].copy_from_slice(&oct(u64::from(uid), 8));
    h[124..136].copy_from_slice(&oct(size, 12));
    h[136..148].copy_from_slice(&oct(1_700_000_000, 12));
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// A PAX extended header carrying `path`, then a ustar header for the entry.
fn pax_entry(path: &[u8], typeflag: u8) -> Vec<u8> {
    let mut rec = format!(" path={}\n", String::from_utf8_lossy(path)).into_bytes();
    let mut len = rec.len() + 1;
    while len.to_string().len() + rec.len() != len {
        len = len.to_string().len() + rec.len();
    }
    let mut body = len.to_string().into_bytes();
    body.append(&mut rec);
    let mut out = header("pax", b'x', 0o644, 0, body.len() as u64, "").to_vec();
    out.extend_from_slice(&body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&header("placeholder", typeflag, 0o755, 0, 0, ""));
    out
}

fn end(mut t: Vec<u8>) -> Vec<u8> {
    t.extend_from_slice(&[0; 1024]);
    t
}

fn opts(mode: WhiteoutMode, pipelined: bool) -> UnpackOptions {
    let mut o = UnpackOptions::default();
    o.whiteouts = mode;
    o.pipelined = pipelined;
    o
}

#[test]
fn deep_chain_is_removed_iteratively_even_on_a_small_stack() {
    // 2000 nested directories, one entry per level (each parent is cached, so no single
    // path lookup is long), then a file replacing the top of the chain: the whole chain
    // is removed. A recursive removal needs ~1 MiB of stack here; run on 256 KiB.
    let mut t = Vec::new();
    let mut path = String::new();
    for _ in 0..2000 {
        path.push_str("a/");
        t.extend_from_slice(&pax_entry(path.as_bytes(), b'5'));
    }
    t.extend_from_slice(&header("a", b'0', 0o644, 0, 0, ""));
    let blob = end(t);
    for mode in [WhiteoutMode::Overlay, WhiteoutMode::Apply] {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().to_path_buf();
        let blob = blob.clone();
        let r = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || unpack(&blob[..], &dest, &opts(mode, false)).map(|s| s.entries))
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(r.unwrap(), 2001);
        assert!(std::fs::symlink_metadata(dir.path().join("a")).unwrap().is_file());
    }
}

#[test]
fn paths_beyond_path_max_are_refused_with_a_short_message() {
    let long = "d/".repeat(3000);
    for (name, kind) in [(format!("{long}f"), b'0'), (long.clone(), b'5')] {
        for pipelined in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let err =
                unpack(&end(pax_entry(name.as_bytes(), kind))[..], dir.path(), &opts(WhiteoutMode::Overlay, pipelined))
                    .unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
            assert!(err.to_string().len() < 1024, "message of {} bytes", err.to_string().len());
        }
    }
}

#[test]
fn replaced_directory_does_not_pass_its_metadata_on() {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root (CI is set)");
        eprintln!("skipping: needs root");
        return;
    }
    // dir `a` (01777, uid 1234), then `a` becomes a symlink, then a new dir `a` (0755, root).
    let mut t = header("a", b'5', 0o1777, 1234, 0, "").to_vec();
    t.extend_from_slice(&header("a", b'2', 0o777, 0, 0, "x"));
    t.extend_from_slice(&header("a", b'5', 0o755, 0, 0, ""));
    let blob = end(t);
    for mode in [WhiteoutMode::Overlay, WhiteoutMode::Apply] {
        for pipelined in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            unpack(&blob[..], dir.path(), &opts(mode, pipelined)).unwrap();
            let md = std::fs::symlink_metadata(dir.path().join("a")).unwrap();
            assert_eq!((md.mode() & 0o7777, md.uid()), (0o755, 0), "{mode:?} pipelined={pipelined}");
        }
    }
}

#[test]
fn large_zstd_windows_are_refused() {
    let mut b = tar::Builder::new(Vec::new());
    let data = vec![7u8; 1 << 20];
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "f", &data[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.window_log(27).unwrap(); // a frame asking the decoder for a 128 MiB window
    enc.write_all(&tar).unwrap();
    let blob = enc.finish().unwrap();
    for pipelined in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let err = unpack(&blob[..], dir.path(), &opts(WhiteoutMode::Overlay, pipelined)).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err:?}");
    }
    // Ordinary frames (level 19 uses a 8 MiB window) are fine.
    let blob = zstd::encode_all(&tar[..], 19).unwrap();
    let dir = tempfile::tempdir().unwrap();
    unpack(&blob[..], dir.path(), &opts(WhiteoutMode::Overlay, true)).unwrap();
}

#[test]
fn repeated_opaque_markers_and_whiteouts_keep_the_layer_and_are_cheap() {
    // `d/` with files from this layer, then the same opaque marker and whiteout many times:
    // the first empties what lower layers had, the rest have nothing to do.
    let mut b = tar::Builder::new(Vec::new());
    let mut dirh = tar::Header::new_gnu();
    dirh.set_entry_type(tar::EntryType::Directory);
    dirh.set_mode(0o755);
    dirh.set_size(0);
    b.append_data(&mut dirh.clone(), "d/", std::io::empty()).unwrap();
    for i in 0..2000 {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("d/f{i}"), &b"x"[..]).unwrap();
    }
    for _ in 0..2000 {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h.clone(), "d/.wh..wh..opq", std::io::empty()).unwrap();
        b.append_data(&mut h, "e/.wh.gone", std::io::empty()).unwrap();
    }
    let blob = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("d")).unwrap();
    std::fs::write(dir.path().join("d/lower"), "lower").unwrap();
    std::fs::create_dir_all(dir.path().join("e/gone")).unwrap();
    let s = unpack(&blob[..], dir.path(), &opts(WhiteoutMode::Apply, true)).unwrap();
    assert_eq!(s.whiteouts, 4000);
    assert!(!dir.path().join("d/lower").exists() && !dir.path().join("e/gone").exists());
    assert_eq!(std::fs::read_dir(dir.path().join("d")).unwrap().count(), 2000);
}

#[test]
fn sparse_apparent_size_is_bounded_by_the_uncompressed_limit() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("holey")).unwrap();
    f.set_len(1 << 30).unwrap(); // 1 GiB apparent, no data
    drop(f);
    let out = Command::new("tar").args(["--sparse", "--format=posix", "-cf", "-", "-C"]).arg(&src).arg(".").output();
    let Ok(out) = out else {
        assert!(std::env::var_os("CI").is_none(), "GNU tar missing (CI is set)");
        return;
    };
    assert!(out.status.success());
    let mut o = opts(WhiteoutMode::Overlay, true);
    o.max_uncompressed_bytes = Some(64 << 20);
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let err = unpack(&out.stdout[..], &dest, &o).unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err:?}");
    // Without the limit the hole is recreated, not written.
    let dest2 = t.path().join("dest2");
    std::fs::create_dir(&dest2).unwrap();
    unpack(&out.stdout[..], &dest2, &opts(WhiteoutMode::Overlay, true)).unwrap();
    let md = std::fs::metadata(dest2.join("holey")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(md.blocks() < 1024, "{} blocks", md.blocks());
}
