//! Helper for `benches/overlay_rw.sh` (small-file I/O through an overlay vs a plain
//! directory); the script builds it, mounts the overlays with it and runs its workloads
//! under hyperfine. Run on its own (as `cargo bench` does) it only says so.
//!
//! ```text
//! overlay_rw mount [--volatile] UPPER WORK TARGET LOWER...  # KernelOverlay, fresh upper; stays mounted
//! overlay_rw write DIR COUNT SIZE [--fsync]   # mkdir DIR; COUNT new files f0.. of SIZE bytes (+ fsync each)
//! overlay_rw read DIR COUNT                   # open, read to EOF, close DIR/f0..f{COUNT-1}
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use rootfs_cache::{KernelOverlay, OverlayMount, OverlaySpec};

fn usage() -> ExitCode {
    eprintln!(
        "overlay_rw: helper of benches/overlay_rw.sh (run `sudo benches/overlay_rw.sh`)\n\
         usage: overlay_rw mount [--volatile] UPPER WORK TARGET LOWER...\n\
         \x20      overlay_rw write DIR COUNT SIZE [--fsync]\n\
         \x20      overlay_rw read DIR COUNT"
    );
    ExitCode::SUCCESS
}

fn num(s: &str) -> usize {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

/// Mounts an overlay with the crate's kernel backend and leaves it mounted.
fn mount(args: &[String]) {
    let volatile = args.first().is_some_and(|a| a == "--volatile");
    let args = if volatile { &args[1..] } else { args };
    let [upper, work, target, lowers @ ..] = args else { panic!("mount: UPPER WORK TARGET LOWER...") };
    let mut spec = OverlaySpec::new(lowers, upper, work, target);
    spec.options.fresh = true;
    spec.options.volatile = volatile;
    let m = OverlayMount::mount(KernelOverlay::new(), spec).unwrap_or_else(|e| panic!("mount {target}: {e}"));
    let _ = m.keep_mounted();
}

/// Creates `dir` and `count` files of `size` bytes in it, each created, written in one
/// `write`, optionally `fsync`ed, and closed.
fn write(dir: &Path, count: usize, size: usize, fsync: bool) {
    std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    for i in 0..count {
        let mut f = File::create(dir.join(format!("f{i}"))).expect("create");
        f.write_all(&data).expect("write");
        if fsync {
            f.sync_all().expect("fsync");
        }
    }
}

/// Opens, reads to EOF (128 KiB reads) and closes `count` files; returns the bytes read.
fn read(dir: &Path, count: usize) -> u64 {
    let mut buf = vec![0u8; 128 << 10];
    let mut total = 0u64;
    for i in 0..count {
        let mut f = File::open(dir.join(format!("f{i}"))).expect("open");
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    total
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("mount") => mount(&args[1..]),
        Some("write") if args.len() >= 4 => {
            let fsync = args.get(4).is_some_and(|a| a == "--fsync");
            write(Path::new(&args[1]), num(&args[2]), num(&args[3]), fsync);
        }
        Some("read") if args.len() == 3 => {
            std::hint::black_box(read(Path::new(&args[1]), num(&args[2])));
        }
        _ => return usage(),
    }
    ExitCode::SUCCESS
}
