//! `rootfsctl`: a small command line over the `rootfs-cache` library.
//!
//! ```text
//! rootfsctl unpack [--apply] [--rootless] [--digest sha256:...] [--diff-id sha256:...] LAYER_BLOB DEST_DIR
//! rootfsctl --cache DIR [--max-bytes N] ensure REF    # prints the lower dirs, top layer first
//! rootfsctl --cache DIR ls                           # layers: digest, bytes, leased
//! rootfsctl --cache DIR stats                        # key=value counters
//! rootfsctl --cache DIR gc [--max-bytes N]           # evicted=… bytes_in_use=…
//! ```
//!
//! `REF` is `OCI_LAYOUT_DIR[:TAG]` or `OCI_LAYOUT_DIR@sha256:...` (TAG defaults to
//! `latest`). Success prints only what is listed, exit 0; failure prints one line on
//! stderr and exits non-zero. The mount and workspace subcommands arrive with those
//! parts of the library.

use std::path::PathBuf;
use std::process::ExitCode;

use rootfs_cache::{CacheOptions, OciLayout, RootfsCache, UnpackOptions, WhiteoutMode, unpack};

const USAGE: &str = "usage:
  rootfsctl unpack [--apply] [--rootless] [--single-thread] [--digest DIGEST] [--diff-id DIGEST] LAYER_BLOB DEST_DIR
  rootfsctl --cache DIR [--max-bytes N] ensure REF
  rootfsctl --cache DIR ls | stats | gc [--max-bytes N]

unpack: extract one layer blob (tar, tar.gz or tar.zst, detected) into DEST_DIR (created
if missing). Whiteouts become overlay whiteouts unless --apply, which deletes the
whited-out paths from DEST_DIR instead (flattening, like `umoci unpack`).
ensure: make REF (OCI_LAYOUT_DIR[:TAG] or OCI_LAYOUT_DIR@sha256:...) ready in the cache
and print its lower directories, top layer first.
ls: the cached layers (digest, bytes, leased). stats: counters. gc: evict to the budget.";

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
        Some("--cache") => {
            let dir = args.get(1).ok_or("--cache needs a directory")?;
            cmd_cache(PathBuf::from(dir), &args[2..])
        }
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

/// Split `OCI_LAYOUT_DIR[:TAG]` / `OCI_LAYOUT_DIR@sha256:...` into the layout and the
/// reference the fetcher understands.
fn split_ref(r: &str) -> (&str, String) {
    if let Some(i) = r.rfind("@sha256:") {
        return (&r[..i], r[i..].to_string());
    }
    match r.rsplit_once(':') {
        // A colon inside the last path component is a tag separator.
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, tag.to_string()),
        _ => (r, "latest".to_string()),
    }
}

fn cmd_cache(dir: PathBuf, args: &[String]) -> Result<(), String> {
    let mut opts = CacheOptions::default();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            "--max-bytes" => {
                let v = it.next().ok_or("--max-bytes needs a value")?;
                opts.max_bytes = v.parse().map_err(|_| format!("--max-bytes: not a number: {v:?}"))?;
            }
            _ => rest.push(a.as_str()),
        }
    }
    let cache = RootfsCache::open(&dir, opts).map_err(|e| e.to_string())?;
    match rest.as_slice() {
        ["ensure", r] => {
            let (layout, reference) = split_ref(r);
            let fetcher = OciLayout::open(layout).map_err(|e| e.to_string())?;
            let rootfs = cache.ensure(&fetcher, &reference).map_err(|e| e.to_string())?;
            for l in rootfs.lowers() {
                println!("{}", l.display());
            }
        }
        ["ls"] => {
            for (d, bytes, leased) in cache.layers() {
                println!("{d} {bytes} {}", if leased { "leased" } else { "-" });
            }
        }
        ["stats"] => {
            let s = cache.stats();
            println!(
                "entries={} bytes_in_use={} leased_entries={} over_budget_bytes={} hits={} misses={} extractions={} bytes_extracted={} evictions={} dedup_waits={}",
                s.entries,
                s.bytes_in_use,
                s.leased_entries,
                s.over_budget_bytes,
                s.hits,
                s.misses,
                s.extractions,
                s.bytes_extracted,
                s.evictions,
                s.dedup_waits
            );
        }
        ["gc"] => {
            let r = cache.gc().map_err(|e| e.to_string())?;
            println!(
                "evicted={} evicted_bytes={} removed_images={} bytes_in_use={} over_budget_bytes={}",
                r.evicted.len(),
                r.evicted_bytes,
                r.removed_images.len(),
                r.bytes_in_use,
                r.over_budget_bytes
            );
        }
        [] => return Err(format!("--cache {}: missing command (ensure, ls, stats, gc)", dir.display())),
        other => return Err(format!("unknown cache command {:?} (try --help)", other.join(" "))),
    }
    Ok(())
}
