//! `rootfsctl`: a small command line over the `rootfs-cache` library.
//!
//! ```text
//! rootfsctl unpack [--apply] [--rootless] [--digest sha256:...] [--diff-id sha256:...] LAYER_BLOB DEST_DIR
//! ```
//!
//! Success prints only what is listed (for `unpack`: one `key=value` summary line),
//! exit 0; failure prints one line on stderr and exits non-zero. The cache, mount and
//! workspace subcommands arrive with those parts of the library.

use std::path::PathBuf;
use std::process::ExitCode;

use rootfs_cache::{UnpackOptions, WhiteoutMode, unpack};

const USAGE: &str = "usage: rootfsctl unpack [--apply] [--rootless] [--single-thread] [--digest DIGEST] [--diff-id DIGEST] LAYER_BLOB DEST_DIR

Extract one layer blob (tar, tar.gz or tar.zst, detected) into DEST_DIR (created if
missing). Whiteouts become overlay whiteouts unless --apply, which deletes the
whited-out paths from DEST_DIR instead (flattening, like `umoci unpack`).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("rootfsctl: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("unpack") => cmd_unpack(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?} (try --help)")),
        None => Err(format!("missing command\n{USAGE}")),
    }
}

fn cmd_unpack(args: &[String]) -> Result<(), String> {
    let mut opts = UnpackOptions::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--apply" => opts.whiteouts = WhiteoutMode::Apply,
            "--rootless" => {
                let w = opts.whiteouts;
                opts = UnpackOptions::rootless();
                opts.whiteouts = w;
            }
            "--single-thread" => opts.pipelined = false,
            "--digest" => {
                let v = it.next().ok_or("--digest needs a value")?;
                opts.expected_digest = Some(v.parse().map_err(|e| format!("{e}"))?);
            }
            "--diff-id" => {
                let v = it.next().ok_or("--diff-id needs a value")?;
                opts.expected_diff_id = Some(v.parse().map_err(|e| format!("{e}"))?);
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s:?} (try --help)")),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [blob, dest] = positional.as_slice() else {
        return Err(format!("unpack needs LAYER_BLOB and DEST_DIR\n{USAGE}"));
    };
    let file = std::fs::File::open(blob).map_err(|e| format!("open {}: {e}", blob.display()))?;
    std::fs::create_dir_all(dest).map_err(|e| format!("mkdir {}: {e}", dest.display()))?;
    let s = unpack(file, dest, &opts).map_err(|e| e.to_string())?;
    let diff_id = s.diff_id.map(|d| d.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "entries={} files={} dirs={} symlinks={} hardlinks={} whiteouts={} bytes={} compressed_bytes={} digest={} diff_id={}",
        s.entries,
        s.files,
        s.dirs,
        s.symlinks,
        s.hardlinks,
        s.whiteouts,
        s.file_bytes,
        s.compressed_bytes,
        s.digest,
        diff_id
    );
    Ok(())
}
