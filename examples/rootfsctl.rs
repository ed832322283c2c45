//! `rootfsctl`: a small command line over the `rootfs-cache` library.
//!
//! ```text
//! rootfsctl unpack [--apply] [--rootless] [--digest sha256:...] [--diff-id sha256:...] LAYER_BLOB DEST_DIR
//! rootfsctl --cache DIR [--max-bytes N] ensure REF    # prints the lower dirs, top layer first
//! rootfsctl --cache DIR ls                           # layers: digest, bytes, leased
//! rootfsctl --cache DIR stats [--prometheus]         # key=value counters
//! rootfsctl --cache DIR gc [--max-bytes N]           # evicted=… bytes_in_use=…
//! rootfsctl --cache DIR create [--tmpfs SIZE] REF WS_DIR   # a workspace, not mounted
//! rootfsctl mount WS_DIR                             # prints the merged dir
//! rootfsctl unmount WS_DIR
//! rootfsctl --cache DIR destroy WS_DIR               # (--cache: release its lease)
//! rootfsctl --cache DIR run [--keep] REF WS_DIR -- COMMAND [ARGS...]  # chrooted, in a fresh workspace
//! rootfsctl convert DIR                              # DIR becomes an overlay over DIR.lower
//! rootfsctl apply DIR|WS_DIR                         # flatten the writes into the lower
//! rootfsctl diff export WS_DIR OUT_TAR [--aligned] [--zstd|--gzip]
//! rootfsctl diff import WS_DIR IN_TAR
//! rootfsctl --cache DIR detach WS_DIR                # copy everything up, release the lease
//! rootfsctl reset WS_DIR                             # unmount, empty the upper
//! rootfsctl --cache DIR leases | release ID          # persisted leases
//! ```
//!
//! Every command on a workspace holds its lock while it runs: a second command on the
//! same workspace from another process fails with "in use by another process (pid N)".
//!
//! `REF` is `OCI_LAYOUT_DIR[:TAG]` or `OCI_LAYOUT_DIR@sha256:...` (TAG defaults to
//! `latest`), or skopeo's spellings `oci:DIR[:TAG]` and `docker://HOST/REPO[:TAG|@sha256:...]`
//! (a registry; global options `--hosts-dir DIR`, containerd's hosts directory for mirrors,
//! TLS and auth headers, and `--plain-http`; credentials come from the usual auth files).
//! `ensure` and `create` draw a progress bar on stderr when it is a terminal. Success prints only what is listed, exit 0; failure prints one line on
//! stderr and exits 1 (2 for a usage error). `COMMAND --help` explains each command.
//!
//! A workspace made by `create` outlives the command: its description is in
//! `WS_DIR/workspace.json` (`Workspace::open` reads it), and the cache keeps its image
//! with a persisted lease named after `WS_DIR` until `destroy` or `detach` releases it.

#[path = "common/chroot_exec.rs"]
mod chroot_exec;
#[path = "common/image_ref.rs"]
mod image_ref;

use image_ref::{ImageRef, RegistryFlags};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rootfs_cache::{
    CacheOptions, Compression, DiffOptions, EnsureOptions, EnsureProgress, ImageFetcher, LayerProgress, LayerState,
    MountBackend, Rootfs, RootfsCache, UnpackOptions, WhiteoutMode, Workspace, WorkspaceOptions, unpack,
};

const USAGE: &str = "usage:
  rootfsctl unpack [--apply] [--rootless] [--single-thread] [--digest DIGEST] [--diff-id DIGEST] LAYER_BLOB DEST_DIR
  rootfsctl --cache DIR [--max-bytes N] [--hosts-dir DIR] [--plain-http] [--sync] ensure REF
  rootfsctl --cache DIR ls | stats [--prometheus] | gc [--max-bytes N]
  rootfsctl --cache DIR create [--tmpfs SIZE] REF WS_DIR
  rootfsctl mount [--backend kernel|copy|auto] WS_DIR | unmount WS_DIR
  rootfsctl [--cache DIR] destroy WS_DIR
  rootfsctl --cache DIR run [--keep] [--backend kernel|copy|auto] [--tmpfs SIZE] REF WS_DIR -- COMMAND [ARGS...]
  rootfsctl convert [--backend kernel|copy|auto] DIR | apply DIR
  rootfsctl diff export WS_DIR OUT_TAR [--aligned] [--zstd|--gzip]
  rootfsctl diff import WS_DIR IN_TAR
  rootfsctl [--cache DIR] detach WS_DIR
  rootfsctl reset WS_DIR
  rootfsctl --cache DIR leases | release ID

REF is OCI_LAYOUT_DIR[:TAG] (TAG defaults to latest), OCI_LAYOUT_DIR@sha256:...,
oci:DIR[:TAG], or docker://HOST/REPO[:TAG|@sha256:...] (a registry: --hosts-dir DIR is
containerd's hosts directory, --plain-http allows http:// to every registry).
Run `rootfsctl COMMAND --help` for one command.";

/// Per-command help, printed by `COMMAND --help`.
fn help(cmd: &str) -> &'static str {
    match cmd {
        "unpack" => "rootfsctl unpack [--apply] [--rootless] [--single-thread] [--digest DIGEST] [--diff-id DIGEST] LAYER_BLOB DEST_DIR
extract one layer blob (tar, tar.gz or tar.zst, detected) into DEST_DIR (created if
missing), digests verified when given. Whiteouts become overlay whiteouts unless --apply,
which deletes the whited-out paths from DEST_DIR instead (flattening, like `umoci unpack`).
Prints entries=… files=… … digest=… diff_id=…",
        "ensure" => "rootfsctl --cache DIR [--hosts-dir DIR] [--plain-http] [--sync] ensure [--lazy] REF
make REF ready in the cache (pulling and extracting missing layers once, in parallel) and
print its lower directories, top layer first. REF: OCI_LAYOUT_DIR[:TAG|@sha256:...],
oci:DIR[:TAG] or docker://HOST/REPO[:TAG|@sha256:...]. A progress bar is drawn on stderr
when it is a terminal. --sync: each layer is flushed to disk (syncfs) before it is made
visible, so a power loss cannot leave a ready layer with missing data.
--lazy: pull it as a lazy run does (seekable layers by range reads of their files), and
wait until every layer is local before printing (for comparing pulls).",
        "ls" => "rootfsctl --cache DIR ls
the cached layers: digest, bytes, leased or -.",
        "stats" => "rootfsctl --cache DIR stats [--prometheus]
the cache's counters as key=value, or with --prometheus in the Prometheus text format.",
        "gc" => "rootfsctl --cache DIR gc [--max-bytes N]
evict unleased layers, least recently used first, down to the budget.",
        "create" => "rootfsctl --cache DIR create [--tmpfs SIZE] REF WS_DIR
make REF ready and a workspace over it in WS_DIR (fresh upper, not mounted); the cache
keeps the image with a persisted lease named after WS_DIR. --tmpfs: the upper lives in
a private tmpfs of SIZE bytes (suffixes K, M, G, T: 512M, 4G; gone when the workspace is
destroyed). A failed create leaves no lease, directory or tmpfs behind.",
        "mount" => "rootfsctl mount [--backend kernel|copy|auto] WS_DIR
mount the workspace's merged view and print its path. --backend: the kernel overlay, the
copy backend, or (auto, the default) the kernel overlay when it can be mounted here.",
        "unmount" => "rootfsctl unmount WS_DIR
unmount the merged view (verified); the writes stay in the upper.",
        "destroy" => "rootfsctl [--cache DIR] destroy WS_DIR
unmount and delete the workspace and release the image's persisted lease (the cache is
recorded in WS_DIR by create; --cache, if given, must name the same one). Works on a
workspace whose tmpfs upper is gone, and finishes a destroy that was killed midway.",
        "run" => "rootfsctl --cache DIR run [--lazy] [--keep] [--backend kernel|copy|auto] [--tmpfs SIZE] REF WS_DIR -- COMMAND [ARGS...]
make REF ready, a fresh workspace over it in WS_DIR (as create; WS_DIR must not exist or
be empty), mount it (as mount), run COMMAND with the merged view as its root directory,
then unmount and destroy the workspace. --keep: unmount it and keep it (mount, diff
export, destroy work on it afterwards). COMMAND is looked up in the new root's PATH
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin when PATH is unset),
starts in /, and inherits stdin, stdout, stderr and the environment; nothing is mounted
inside the view (no /proc, /dev). COMMAND gets a mount namespace of its own (and, when
rootfsctl is not root, a user namespace mapping only the caller's uid and gid, so that
it may chroot): mounts it makes stay there and go with it, while the view itself is
mounted in rootfsctl's namespace, where unmount and destroy see it. SIGINT, SIGTERM and
SIGHUP are passed on to COMMAND (a terminal's ^C reaches it directly), and rootfsctl
tears down once it has ended; COMMAND is killed if rootfsctl dies, and a rootfsctl
killed by SIGKILL leaves the workspace as create leaves it, for destroy. Prints nothing
itself on stdout; exits with COMMAND's status (128+N when killed by signal N, 127 when
it is not found, 126 when it cannot be executed); rootfsctl's own failures exit 1 with a
`rootfsctl:` line on stderr (2 for usage errors).
--lazy: start before the image is downloaded (RootfsCache::ensure_lazy): its seekable
(zstd:chunked, eStargz) bottom layers are served from a skeleton and FUSE data-only lowers
that fetch a file when it is first opened, while the rest is fetched in the background
(pulled whole: layers that are not seekable, and the ones above them). This process
serves the data while COMMAND runs and keeps the cache open (other commands get `busy`)
until it exits; data fetched stays in the cache for the next run. Needs root (FUSE and
the kernel overlay backend); not with --keep.",
        "convert" => "rootfsctl convert [--backend kernel|copy|auto] DIR
turn DIR into a workspace in place: DIR.lower holds the original, an overlay is mounted at DIR.",
        "apply" => "rootfsctl apply DIR
flatten the writes of a converted workspace (or one over a single private lower) into its lower.",
        "diff" => "rootfsctl diff export WS_DIR OUT_TAR [--aligned] [--zstd|--gzip]
rootfsctl diff import WS_DIR IN_TAR
export: the workspace's writes as an OCI layer tar (prints digest=… diff_id=… size=…
entries=…); --aligned: block-aligned file data, shared with the upper on XFS/btrfs.
import: a diff into the empty upper of an unmounted workspace.",
        "reset" => "rootfsctl reset WS_DIR
unmount the workspace and empty its upper: the next mount starts from the image again.",
        "leases" => "rootfsctl --cache DIR leases
the persisted leases, one id per line (rootfsctl names a workspace's lease rootfsctl-ws-…).",
        "release" => "rootfsctl --cache DIR release ID
release a persisted lease, e.g. one whose workspace is gone; its layers may then be evicted.",
        "detach" => "rootfsctl [--cache DIR] detach WS_DIR
copy everything the image shows into the upper, so the workspace no longer needs the
image, and release the image's persisted lease (as destroy finds it).",
        _ => USAGE,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(Fail(msg, is_usage)) => {
            // One line on stderr, whatever happened (scripts read it); usage errors point
            // at the help instead of printing it.
            let line = msg.lines().next().unwrap_or("failed");
            if is_usage && !line.contains("--help") {
                eprintln!("rootfsctl: {line} (try `rootfsctl --help` or `rootfsctl COMMAND --help`)");
            } else {
                eprintln!("rootfsctl: {line}");
            }
            ExitCode::from(if is_usage { 2 } else { 1 })
        }
    }
}

/// A failure: a message, and whether it is a usage error (exit 2) or not (exit 1).
struct Fail(String, bool);

impl From<String> for Fail {
    fn from(s: String) -> Self {
        Fail(s, false)
    }
}

impl From<&str> for Fail {
    fn from(s: &str) -> Self {
        Fail(s.to_string(), false)
    }
}

impl From<rootfs_cache::Error> for Fail {
    fn from(e: rootfs_cache::Error) -> Self {
        Fail(e.to_string(), false)
    }
}

fn usage(msg: impl Into<String>) -> Fail {
    Fail(msg.into(), true)
}

/// The command line's work; the exit code (0, or `run`'s command's status).
fn run(args: &[String]) -> Result<u8, Fail> {
    // Global options first: --cache DIR, --max-bytes N, --hosts-dir DIR, --plain-http.
    let mut cache_dir: Option<PathBuf> = None;
    let mut max_bytes: Option<u64> = None;
    let mut flags = RegistryFlags::default();
    let mut sync = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--hosts-dir" => {
                let d = args.get(i + 1).ok_or_else(|| usage("--hosts-dir needs a directory"))?;
                if !Path::new(d).is_dir() {
                    return Err(usage(format!("--hosts-dir: {d}: not a directory")));
                }
                flags.hosts_dir = Some(PathBuf::from(d));
                i += 2;
            }
            "--plain-http" => {
                flags.plain_http = true;
                i += 1;
            }
            "--sync" => {
                sync = true;
                i += 1;
            }
            "--cache" => {
                cache_dir = Some(PathBuf::from(args.get(i + 1).ok_or_else(|| usage("--cache needs a directory"))?));
                i += 2;
            }
            "--max-bytes" => {
                let v = args.get(i + 1).ok_or_else(|| usage("--max-bytes needs a value"))?;
                max_bytes = Some(parse_size("--max-bytes", v)?);
                i += 2;
            }
            _ => break,
        }
    }
    let Some(cmd) = args.get(i).map(String::as_str) else {
        return Err(usage(format!("missing command\n{USAGE}")));
    };
    // `run ... -- COMMAND [ARGS...]`: everything after `--` is the command's.
    let (ours, command) = match (cmd, args[i + 1..].iter().position(|a| a == "--")) {
        ("run", Some(p)) => (&args[i + 1..i + 1 + p], &args[i + 2 + p..]),
        _ => (&args[i + 1..], &[][..]),
    };
    let mut rest: Vec<&str> = ours.iter().map(String::as_str).collect();
    if matches!(cmd, "-h" | "--help" | "help") {
        println!("{USAGE}");
        return Ok(0);
    }
    if rest.iter().any(|a| matches!(*a, "-h" | "--help")) {
        println!("{}", help(cmd));
        return Ok(0);
    }
    // `gc --max-bytes N` also takes the budget after the command.
    if let Some(p) = rest.iter().position(|a| *a == "--max-bytes") {
        let v = rest.get(p + 1).ok_or_else(|| usage("--max-bytes needs a value"))?;
        max_bytes = Some(parse_size("--max-bytes", v)?);
        rest.drain(p..p + 2);
    }
    let open_cache = || -> Result<RootfsCache, Fail> {
        let dir = cache_dir.as_ref().ok_or_else(|| usage(format!("{cmd} needs --cache DIR")))?;
        let mut opts = CacheOptions::default();
        if let Some(m) = max_bytes {
            opts.max_bytes = m;
        }
        opts.sync = sync;
        Ok(RootfsCache::open(dir, opts)?)
    };
    if cmd == "run" {
        return cmd_run(&rest, command, cache_dir.as_deref(), &flags, &open_cache);
    }
    let done = match (cmd, rest.as_slice()) {
        ("unpack", _) => cmd_unpack(&args[i + 1..]),
        ("ensure", ["--lazy", r]) => {
            let image = ImageRef::parse(r).map_err(usage)?;
            let cache = open_cache()?;
            let (fetcher, reference) = image.fetcher(&flags)?;
            let lazy = cache.ensure_lazy(std::sync::Arc::from(fetcher), &reference, &EnsureOptions::new())?;
            lazy.wait_local(None);
            drop(lazy);
            let (fetcher, reference) = image.fetcher(&flags)?;
            let rootfs = cache.ensure(fetcher.as_ref(), &reference)?;
            for l in rootfs.lowers() {
                println!("{}", l.display());
            }
            Ok(())
        }
        ("ensure", [r]) => {
            let image = ImageRef::parse(r).map_err(usage)?;
            let cache = open_cache()?;
            let (fetcher, reference) = image.fetcher(&flags)?;
            let rootfs = ensure(&cache, fetcher.as_ref(), &reference)?;
            for l in rootfs.lowers() {
                println!("{}", l.display());
            }
            Ok(())
        }
        ("ls", []) => {
            for (d, bytes, leased) in open_cache()?.layers() {
                println!("{d} {bytes} {}", if leased { "leased" } else { "-" });
            }
            Ok(())
        }
        ("stats", ["--prometheus"]) => {
            print!("{}", open_cache()?.stats().prometheus());
            Ok(())
        }
        ("stats", []) => {
            let s = open_cache()?.stats();
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
            Ok(())
        }
        ("gc", []) => {
            let r = open_cache()?.gc()?;
            println!(
                "evicted={} evicted_bytes={} removed_images={} bytes_in_use={} over_budget_bytes={}",
                r.evicted.len(),
                r.evicted_bytes,
                r.removed_images.len(),
                r.bytes_in_use,
                r.over_budget_bytes
            );
            Ok(())
        }
        ("create", args) => {
            // Everything is checked before anything changes: the size, the arguments,
            // the workspace dir (not already a workspace), the image (ensured, but not
            // leased for the workspace yet).
            let (tmpfs, pos) = take_value(args, "--tmpfs")?;
            let [r, ws_dir] = pos.as_slice() else {
                return Err(usage(format!("create needs REF WS_DIR\n{}", help("create"))));
            };
            let opts = workspace_options(tmpfs)?;
            let image = ImageRef::parse(r).map_err(usage)?;
            let cache = open_cache()?;
            let (fetcher, reference) = image.fetcher(&flags)?;
            let rootfs = ensure(&cache, fetcher.as_ref(), &reference)?;
            let pinned = image.pinned(&rootfs.manifest_digest());
            let image = (fetcher.as_ref(), pinned.as_str());
            let (target, _) = create_workspace(&cache, cache_dir.as_deref(), image, rootfs, Path::new(ws_dir), opts)?;
            println!("{}", target.display());
            Ok(())
        }
        ("mount", args) => {
            let (kind, pos) = take_value(args, "--backend")?;
            let [ws_dir] = pos.as_slice() else {
                return Err(usage(format!("mount needs WS_DIR\n{}", help("mount"))));
            };
            let backend = backend(kind)?;
            let mut ws = Workspace::open(ws_dir)?;
            let t = ws.mount(backend)?.to_path_buf();
            println!("{}", t.display());
            ws.keep()?;
            Ok(())
        }
        ("unmount", [ws_dir]) => {
            let mut ws = Workspace::open(ws_dir)?;
            ws.unmount()?;
            ws.keep()?;
            Ok(())
        }
        ("destroy", [ws_dir]) => {
            // The cache first: a busy cache fails the command before anything is deleted
            // (never a destroyed workspace whose lease can no longer be released).
            let lease = lease_of(Path::new(ws_dir), cache_dir.as_deref(), &open_cache)?;
            match Workspace::open(ws_dir) {
                Ok(ws) => ws.destroy()?,
                // A destroy killed after the workspace went, before its lease did: what
                // is left is the record, or an empty (or no) dir and a lease named after
                // it. Finish; anything else is not a workspace.
                Err(rootfs_cache::Error::NotFound { .. })
                    if !mounted_in(Path::new(ws_dir)) && LeaseRecord::read(Path::new(ws_dir))?.is_some() => {}
                Err(e) => return Err(e.into()),
            }
            // The lease before the record: killed in between, the record tells the next
            // `destroy` to finish (a lease already gone is skipped).
            if let Some((cache, id)) = &lease {
                release(cache, id)?;
            }
            LeaseRecord::remove(Path::new(ws_dir))
        }
        ("reset", [ws_dir]) => {
            let mut ws = Workspace::open(ws_dir)?;
            ws.reset()?;
            ws.keep()?;
            Ok(())
        }
        ("leases", []) => {
            for id in open_cache()?.leases() {
                println!("{id}");
            }
            Ok(())
        }
        ("release", [id]) => {
            let cache = open_cache()?;
            if !cache.leases().iter().any(|l| l == id) {
                return Err(format!("no lease {id:?} in the cache").into());
            }
            Ok(cache.release(id)?)
        }
        ("convert", args) => {
            let (kind, pos) = take_value(args, "--backend")?;
            let [dir] = pos.as_slice() else {
                return Err(usage(format!("convert needs DIR\n{}", help("convert"))));
            };
            let ws = Workspace::convert(dir, backend(kind)?)?;
            println!("{}", ws.target().display());
            ws.keep()?;
            Ok(())
        }
        ("apply", [dir]) => {
            // apply unmounts around the flatten and remounts what was mounted.
            let mut ws = Workspace::open(dir)?;
            let r = ws.apply()?;
            println!(
                "moved={} copied={} dirs={} replaced_dirs={} deleted={}",
                r.moved, r.copied, r.dirs, r.replaced_dirs, r.deleted
            );
            ws.keep()?;
            Ok(())
        }
        ("diff", ["export", args @ ..]) => {
            let aligned = args.contains(&"--aligned");
            if args.contains(&"--zstd") && args.contains(&"--gzip") {
                return Err(usage("diff export: --zstd and --gzip exclude each other"));
            }
            let compression = if args.contains(&"--zstd") {
                Compression::Zstd
            } else if args.contains(&"--gzip") {
                Compression::Gzip
            } else {
                Compression::None
            };
            let pos: Vec<&str> = args.iter().copied().filter(|a| !a.starts_with("--")).collect();
            if let Some(bad) =
                args.iter().find(|a| a.starts_with("--") && !matches!(**a, "--aligned" | "--zstd" | "--gzip"))
            {
                return Err(usage(format!("diff export: unknown option {bad:?}")));
            }
            let [ws_dir, out] = pos.as_slice() else {
                return Err(usage(format!("diff export needs WS_DIR OUT_TAR\n{}", help("diff"))));
            };
            if aligned && compression != Compression::None {
                return Err(usage("diff export: --aligned is for uncompressed diffs only"));
            }
            let mut opts = DiffOptions::default();
            opts.aligned = aligned;
            opts.compression = compression;
            // An adopted handle: whatever fails below, the sandbox stays as it is.
            let ws = Workspace::open(ws_dir)?;
            // Checked (not in a cache, not in a workspace), written to a temporary file
            // and renamed: a failed or killed export never leaves a half-written OUT_TAR.
            let st = ws.export_diff_to(out, &opts)?;
            let show = |d: Option<rootfs_cache::Digest>| d.map_or_else(|| "-".to_string(), |d| d.to_string());
            println!(
                "digest={} diff_id={} size={} entries={} file_bytes={}",
                show(st.digest),
                show(st.diff_id),
                st.size,
                st.entries,
                st.file_bytes
            );
            ws.keep()?;
            Ok(())
        }
        ("diff", ["import", ws_dir, input]) => {
            let file = std::fs::File::open(input).map_err(|e| format!("open {input}: {e}"))?;
            let mut ws = Workspace::open(ws_dir)?;
            let st = ws.import_diff_file(&file)?;
            println!("entries={} file_bytes={} size={}", st.entries, st.file_bytes, st.size);
            ws.keep()?;
            Ok(())
        }
        ("detach", [ws_dir]) => {
            let lease = lease_of(Path::new(ws_dir), cache_dir.as_deref(), &open_cache)?;
            let mut ws = Workspace::open(ws_dir)?;
            ws.detach()?;
            ws.keep()?;
            if let Some((cache, id)) = &lease {
                release(cache, id)?;
            }
            Ok(())
        }
        (
            "ensure" | "ls" | "stats" | "gc" | "unmount" | "destroy" | "apply" | "diff" | "detach" | "reset" | "leases"
            | "release",
            _,
        ) => Err(usage(format!("wrong arguments\n{}", help(cmd)))),
        (other, _) => Err(usage(format!("unknown command {other:?} (try --help)"))),
    };
    done.map(|()| 0)
}

/// `WorkspaceOptions` for `--tmpfs SIZE` (a disk upper without it).
fn workspace_options(tmpfs: Option<&str>) -> Result<WorkspaceOptions, Fail> {
    let Some(t) = tmpfs else { return Ok(WorkspaceOptions::default()) };
    let size = parse_size("--tmpfs", t)?;
    if size == 0 {
        return Err(usage("--tmpfs: the size must be above 0"));
    }
    Ok(WorkspaceOptions::tmpfs(size))
}

/// `create`'s work, shared with `run`: makes a workspace over `rootfs` (an image
/// `fetcher` ensured, `pinned` naming exactly it) in `ws_dir` (fresh upper, not mounted),
/// records the cache and a new persisted lease in it, and leaves it described for
/// `Workspace::open` (as `keep` does). Returns its merged dir and the lease's id. A
/// failure leaves no lease, directory or tmpfs behind.
fn create_workspace(
    cache: &RootfsCache,
    cache_dir: Option<&Path>,
    (fetcher, pinned): (&dyn ImageFetcher, &str),
    rootfs: Rootfs,
    ws_dir: &Path,
    opts: WorkspaceOptions,
) -> Result<(PathBuf, String), Fail> {
    // A lease of its own, never one a workspace made here before (and moved away
    // since) still holds.
    let id = new_lease_id(ws_dir)?;
    // The workspace first, then its record and description, the persisted lease
    // last: a create killed midway leaves no lease (a retry reuses the dirs it
    // finds), and a failure undoes all of it.
    let made = Workspace::create(ws_dir, rootfs, opts).map_err(Fail::from).and_then(|mut ws| {
        let target = ws.target().to_path_buf();
        let done = LeaseRecord::write(ws_dir, cache_dir.unwrap_or(Path::new(".")), &id)
            .and_then(|()| ws.describe().map_err(Fail::from))
            .and_then(|()| Ok(cache.ensure(fetcher, pinned)?.persist(&id)?));
        match done {
            Ok(()) => ws.keep().map(|()| target).map_err(Fail::from),
            Err(e) => {
                let _ = ws.destroy();
                let _ = LeaseRecord::remove(ws_dir);
                Err(e)
            }
        }
    });
    if made.is_err() && cache.leases().contains(&id) {
        let _ = cache.release(&id);
    }
    made.map(|target| (target, id))
}

/// `run [--keep] [--backend B] [--tmpfs SIZE] REF WS_DIR -- COMMAND [ARGS...]`: the
/// image ensured, a fresh workspace in WS_DIR made as `create` makes it (so a
/// `rootfsctl` killed from here on leaves a workspace `destroy` takes away), mounted,
/// COMMAND run chrooted into its view, then the workspace unmounted and destroyed (or,
/// with `--keep`, unmounted and kept). Returns COMMAND's status.
fn cmd_run(
    rest: &[&str],
    command: &[String],
    cache_dir: Option<&Path>,
    flags: &RegistryFlags,
    open_cache: &dyn Fn() -> Result<RootfsCache, Fail>,
) -> Result<u8, Fail> {
    // Everything is checked before anything changes.
    let (mut keep, mut kind, mut tmpfs, mut pos) = (false, None, None, Vec::new());
    let mut lazy = false;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match *a {
            "--keep" => keep = true,
            "--lazy" => lazy = true,
            "--backend" => kind = Some(*it.next().ok_or_else(|| usage("--backend needs a value"))?),
            "--tmpfs" => tmpfs = Some(*it.next().ok_or_else(|| usage("--tmpfs needs a value"))?),
            a if a.starts_with('-') => return Err(usage(format!("run: unknown option {a:?}"))),
            a => pos.push(a),
        }
    }
    let ([r, ws_dir], false) = (pos.as_slice(), command.is_empty()) else {
        return Err(usage(format!("run needs REF WS_DIR -- COMMAND [ARGS...]\n{}", help("run"))));
    };
    let ws_dir = Path::new(ws_dir);
    let opts = workspace_options(tmpfs)?;
    let image = ImageRef::parse(r).map_err(usage)?;
    // `auto` probes overlayfs with a mount in the temp dir, now.
    let backend = backend(kind)?;
    // A fresh workspace only, in a new or empty directory: whatever else is there is
    // refused untouched (and so never destroyed afterwards).
    match std::fs::read_dir(ws_dir).map(|mut entries| entries.next().is_some()) {
        Ok(true) => {
            return Err(format!("{}: exists and is not empty (run makes a fresh workspace)", ws_dir.display()).into());
        }
        Ok(false) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", ws_dir.display()).into()),
    }
    let cache_dir = cache_dir.ok_or_else(|| usage("run needs --cache DIR"))?;
    if lazy {
        if keep {
            return Err(usage("run: --lazy and --keep: a kept workspace needs the image local (run without --lazy)"));
        }
        return run_lazy(&image, flags, ws_dir, opts, backend, command, open_cache);
    }
    // The image first (a failed or interrupted ensure has made no workspace), then the
    // workspace and its persisted lease, as `create` leaves them.
    let (id, blocked) = {
        let cache = open_cache()?;
        let (fetcher, reference) = image.fetcher(flags)?;
        let rootfs = ensure(&cache, fetcher.as_ref(), &reference)?;
        let pinned = image.pinned(&rootfs.manifest_digest());
        // From here to the end, SIGINT, SIGTERM and SIGHUP wait: the command gets them,
        // and this process always tears down what it set up.
        let blocked = chroot_exec::Blocked::block()?;
        let image = (fetcher.as_ref(), pinned.as_str());
        let (_, id) = create_workspace(&cache, Some(cache_dir), image, rootfs, ws_dir, opts)?;
        (id, blocked)
        // The cache is closed here, so other commands may use it while COMMAND runs:
        // the persisted lease keeps the image's layers.
    };
    let mut ws = Workspace::open(ws_dir)
        .map_err(|e| format!("{e} (the workspace is left in {} for `rootfsctl destroy`)", ws_dir.display()))?;
    let target = match ws.mount(backend) {
        Ok(t) => t.to_path_buf(),
        Err(e) => {
            let torn = destroy_run(ws, ws_dir, cache_dir, &id);
            return Err(with_teardown(e.to_string(), torn));
        }
    };
    let result = chroot_exec::run(&blocked, &target, command);
    let ran = matches!(result, Ok(_) | Err(chroot_exec::Failure::Exec(_)));
    // Never a still-mounted upper removed: `unmount` and `destroy` verify the unmount
    // and leave the workspace described (for `rootfsctl destroy`) when it fails.
    let torn = if keep && ran {
        let unmounted = ws.unmount().map_err(Fail::from);
        let kept = ws.keep().map_err(Fail::from);
        unmounted.and(kept)
    } else {
        destroy_run(ws, ws_dir, cache_dir, &id)
    };
    run_outcome(result, torn, &command[0], &target)
}

/// `run --lazy`: the image ensured lazily and served by this process while COMMAND runs,
/// in a workspace that is never persisted (its lease lives in this process).
fn run_lazy(
    image: &ImageRef,
    flags: &RegistryFlags,
    ws_dir: &Path,
    opts: WorkspaceOptions,
    backend: Box<dyn MountBackend>,
    command: &[String],
    open_cache: &dyn Fn() -> Result<RootfsCache, Fail>,
) -> Result<u8, Fail> {
    // Signals are blocked before the cache starts its FUSE and completion threads: they
    // inherit the mask, so SIGINT reaches the command, never a serving thread.
    let blocked = chroot_exec::Blocked::block()?;
    let cache = open_cache()?;
    let (fetcher, reference) = image.fetcher(flags)?;
    let rootfs = cache.ensure_lazy(std::sync::Arc::from(fetcher), &reference, &EnsureOptions::new())?;
    let mut ws = Workspace::create(ws_dir, rootfs, opts)?;
    let target = match ws.mount(backend) {
        Ok(t) => t.to_path_buf(),
        Err(e) => {
            let torn = ws.destroy().map_err(Fail::from);
            return Err(with_teardown(e.to_string(), torn));
        }
    };
    let result = chroot_exec::run(&blocked, &target, command);
    let torn = ws.destroy().map_err(|e| Fail::from(format!("{e} (left for `rootfsctl destroy {}`)", ws_dir.display())));
    run_outcome(result, torn, &command[0], &target)
}

/// `run`'s exit: COMMAND's status, or what went wrong (running it, then tearing down).
fn run_outcome(
    result: Result<chroot_exec::Ended, chroot_exec::Failure>,
    torn: Result<(), Fail>,
    prog: &str,
    target: &Path,
) -> Result<u8, Fail> {
    match result {
        Ok(ended) => match torn {
            Ok(()) => Ok(ended.code()),
            Err(e) => Err(with_teardown(format!("run: {prog} exited with status {}", ended.code()), Err(e))),
        },
        Err(chroot_exec::Failure::Exec(errno)) => {
            // As shells say it: 127 when there is no such command, 126 when it cannot
            // be executed.
            let (what, code) = match errno {
                nix::errno::Errno::ENOENT => ("command not found".to_string(), 127),
                e => (e.desc().to_string(), 126),
            };
            let msg = format!("run: {prog}: {what}");
            torn.map_err(|e| with_teardown(msg.clone(), Err(e)))?;
            eprintln!("rootfsctl: {msg}");
            Ok(code)
        }
        Err(chroot_exec::Failure::Setup(step, errno)) => {
            Err(with_teardown(format!("run: {step} {}: {}", target.display(), errno.desc()), torn))
        }
        Err(chroot_exec::Failure::Start(msg)) => Err(with_teardown(format!("run: {msg}"), torn)),
    }
}

/// `msg`, and what went wrong tearing down after it, as one line.
fn with_teardown(msg: String, torn: Result<(), Fail>) -> Fail {
    match torn {
        Ok(()) => Fail(msg, false),
        Err(Fail(e, _)) => Fail(format!("{msg}; then tearing down: {e}"), false),
    }
}

/// `run`'s teardown without `--keep`: what `destroy` does. The workspace (unmounted,
/// verified), then the persisted lease, then the record; a failure on the way leaves
/// what is left for `rootfsctl destroy WS_DIR`.
fn destroy_run(ws: Workspace, ws_dir: &Path, cache_dir: &Path, id: &str) -> Result<(), Fail> {
    let left = |e: String| Fail::from(format!("{e} (left for `rootfsctl destroy {}`)", ws_dir.display()));
    ws.destroy().map_err(|e| left(e.to_string()))?;
    // The cache may be busy with another command for a while (another `run`'s ensure):
    // wait for it rather than leave the lease behind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let cache = loop {
        match RootfsCache::open(cache_dir, CacheOptions::default()) {
            Err(rootfs_cache::Error::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => break other.map_err(|e| left(e.to_string()))?,
        }
    };
    release(&cache, id).map_err(|Fail(e, _)| left(e))?;
    LeaseRecord::remove(ws_dir)
}

/// A size in bytes: a number with an optional binary suffix (`K`, `M`, `G`, `T`,
/// optionally followed by `i`/`iB`/`B`: `512M`, `4GiB`, `1024`).
fn parse_size(flag: &str, v: &str) -> Result<u64, Fail> {
    let bad = || usage(format!("{flag}: not a size: {v:?} (a number of bytes, or with a suffix: 512M, 4G)"));
    let t = v.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match suffix.trim_end_matches("iB").trim_end_matches('i').trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `cache.ensure`, with a progress bar on stderr when it is a terminal (nothing otherwise).
fn ensure(cache: &RootfsCache, fetcher: &dyn ImageFetcher, reference: &str) -> Result<Rootfs, Fail> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return Ok(cache.ensure(fetcher, reference)?);
    }
    let bar = ProgressBar::default();
    let result = cache.ensure_with(fetcher, reference, &EnsureOptions::new().with_progress(&bar));
    bar.finish();
    Ok(result?)
}

/// One bar for a whole `ensure`: blob bytes downloaded of the missing layers' total, and
/// layers ready of all.
#[derive(Default)]
struct ProgressBar {
    bar: std::sync::OnceLock<indicatif::ProgressBar>,
    /// index -> (downloaded, total, final)
    layers: std::sync::Mutex<std::collections::BTreeMap<usize, (u64, u64, bool)>>,
}

impl ProgressBar {
    fn finish(&self) {
        if let Some(b) = self.bar.get() {
            b.finish_and_clear();
        }
    }
}

impl EnsureProgress for ProgressBar {
    fn layer(&self, l: &LayerProgress) {
        let bar = self.bar.get_or_init(|| {
            let b = indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b
        });
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        let done = matches!(l.state, LayerState::Cached | LayerState::Done | LayerState::Failed);
        let total = if l.state == LayerState::Cached { 0 } else { l.total };
        layers.insert(l.index, (l.downloaded, total, done));
        let (got, all) = layers.values().fold((0, 0), |(g, a), (d, t, _)| (g + d.min(t), a + t));
        let ready = layers.values().filter(|v| v.2).count();
        bar.set_length(all);
        bar.set_position(got);
        bar.set_message(format!("{ready}/{} layers", layers.len()));
    }
}

/// `--flag VALUE` taken out of `args`; the rest.
fn take_value<'a>(args: &[&'a str], flag: &str) -> Result<(Option<&'a str>, Vec<&'a str>), Fail> {
    let mut value = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == flag {
            value = Some(*it.next().ok_or_else(|| usage(format!("{flag} needs a value")))?);
        } else if a.starts_with("--") {
            return Err(usage(format!("unknown option {a:?}")));
        } else {
            rest.push(*a);
        }
    }
    Ok((value, rest))
}

/// The backend for a mount: `--backend kernel|copy`, or (`auto`, the default) the
/// kernel overlay where it can be mounted, else the copy backend (`detect` probes with a
/// real mount in the temp dir).
fn backend(kind: Option<&str>) -> Result<Box<dyn MountBackend>, Fail> {
    match kind.unwrap_or("auto") {
        "kernel" => Ok(Box::new(rootfs_cache::KernelOverlay::new())),
        "copy" => Ok(Box::new(rootfs_cache::CopyBackend::new())),
        "auto" => Ok(rootfs_cache::detect(&std::env::temp_dir())?.backend()),
        other => Err(usage(format!("--backend: {other:?} is not kernel, copy or auto"))),
    }
}

/// The persisted lease of the workspace in `ws_dir`: named after its canonical path
/// (`WS`, `WS/`, `./WS` and a path through a symlinked parent name the same lease).
/// A new persisted lease id for a workspace made at `ws_dir`: named after its path (to
/// read in `leases`) and made unique, so a workspace moved away keeps its own.
fn new_lease_id(ws_dir: &Path) -> Result<String, Fail> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let salt = rootfs_cache::Digest::of(format!("{} {nanos}", std::process::id()).as_bytes());
    Ok(format!("{}-{}", lease_id(ws_dir)?, &salt.hex()[..8]))
}

fn lease_id(ws_dir: &Path) -> Result<String, Fail> {
    let abs = std::path::absolute(ws_dir).map_err(|e| format!("{}: {e}", ws_dir.display()))?;
    let abs: PathBuf = abs.components().collect();
    // The whole path when it exists (WS_DIR may be a symlink to the workspace), else its
    // parent's real path and the name it will get.
    let canon = std::fs::canonicalize(&abs).unwrap_or_else(|_| match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).map(|p| p.join(name)).unwrap_or(abs.clone()),
        _ => abs.clone(),
    });
    let d = rootfs_cache::Digest::of(canon.as_os_str().as_encoded_bytes());
    Ok(format!("rootfsctl-ws-{}", &d.hex()[..16]))
}

/// `WS_DIR/rootfsctl.lease`: the cache and the persisted lease of a workspace made by
/// `create`, so that `destroy` and `detach` find them whatever `--cache` and the spelling
/// of `WS_DIR` are then.
struct LeaseRecord;

impl LeaseRecord {
    const FILE: &'static str = "rootfsctl.lease";

    fn write(ws_dir: &Path, cache: &Path, id: &str) -> Result<(), Fail> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let cache = std::fs::canonicalize(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
        let path = ws_dir.join(Self::FILE);
        let text = format!("cache {}\nlease {id}\n", cache.display());
        // Never through a link someone planted in WS_DIR: a new file, O_EXCL|O_NOFOLLOW.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("unlink {}: {e}", path.display()).into());
            }
            _ => {}
        }
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("write {}: {e}", path.display()).into())
    }

    /// The recorded cache dir and lease id, if any.
    fn read(ws_dir: &Path) -> Result<Option<(PathBuf, String)>, Fail> {
        let path = ws_dir.join(Self::FILE);
        // A regular file only: no link followed, no FIFO blocked on.
        let Some(bytes) = read_regular(&path)? else { return Ok(None) };
        let text = String::from_utf8_lossy(&bytes);
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(str::to_string));
        match (field("cache "), field("lease ")) {
            (Some(c), Some(id)) => Ok(Some((PathBuf::from(c), id))),
            _ => Err(format!("{}: not a lease record", path.display()).into()),
        }
    }

    /// Removes the record (after `destroy`), and `ws_dir` if that leaves it empty.
    fn remove(ws_dir: &Path) -> Result<(), Fail> {
        // The real dir (WS_DIR may be a symlink to it; the link itself is the caller's).
        let real = std::fs::canonicalize(ws_dir).unwrap_or_else(|_| ws_dir.to_path_buf());
        let ws_dir = real.as_path();
        let path = ws_dir.join(Self::FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("unlink {}: {e}", path.display()).into()),
        }
        match std::fs::remove_dir(ws_dir) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::NotFound) => {
                Ok(())
            }
            Err(e) => Err(format!("rmdir {}: {e}", ws_dir.display()).into()),
            Ok(()) => Ok(()),
        }
    }
}

/// The cache (opened: a busy one fails before anything changes) and lease id a
/// workspace holds: from its record, else from `--cache` and its path. `--cache` naming
/// another cache than the record is refused.
fn lease_of(
    ws_dir: &Path,
    cache_dir: Option<&Path>,
    open_cache: &dyn Fn() -> Result<RootfsCache, Fail>,
) -> Result<Option<(RootfsCache, String)>, Fail> {
    match (LeaseRecord::read(ws_dir)?, cache_dir) {
        (Some((recorded, id)), given) => {
            // The record sits in a directory its owner can write: trust it only as far as
            // it agrees with what is checkable. Its cache must be a cache (never make or
            // clean one anywhere a record points), its lease the one of this path.
            if !(recorded.join("LOCK").is_file() && recorded.join("layers").is_dir()) {
                return Err(format!("{}: {} is not a cache", ws_dir.display(), recorded.display()).into());
            }
            // Its lease must pin exactly this workspace's layers: a record naming another
            // image's lease is refused (one naming another workspace of the same image
            // changes no layer's pin count).
            if !id.starts_with("rootfsctl-ws-") || id.contains('/') {
                return Err(format!("{}: {id:?} is not a lease of rootfsctl's", ws_dir.display()).into());
            }
            // Made here (its id names this path), or moved here with the lease of its own
            // image's layers; anything else is released by hand (`release ID`).
            let here = id.starts_with(&format!("{}-", lease_id(ws_dir)?));
            let same_layers = matches!(
                (lease_layers(&recorded, &id), workspace_layers(ws_dir)),
                (Some(pinned), Some(mine)) if pinned == mine
            );
            let cache = RootfsCache::open(&recorded, CacheOptions::default())?;
            if !here && !same_layers && cache.leases().contains(&id) {
                return Err(format!(
                    "{}: its record names the lease {id}, which was not made for this path or image; \
                     `rootfsctl --cache {} release {id}` it by hand if it is this workspace's",
                    ws_dir.display(),
                    recorded.display()
                )
                .into());
            }
            if let Some(g) = given {
                let g = std::fs::canonicalize(g).unwrap_or_else(|_| g.to_path_buf());
                if g != recorded {
                    return Err(format!(
                        "{} holds its image in the cache {}, not {}",
                        ws_dir.display(),
                        recorded.display(),
                        g.display()
                    )
                    .into());
                }
            }
            Ok(Some((cache, id)))
        }
        // No record: no lease of rootfsctl's (a workspace made by the library itself).
        (None, Some(_)) => {
            open_cache()?;
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

/// The layer digests (hex) a persisted lease pins: `C/leases/ID`, `layer sha256:…` lines.
fn lease_layers(cache: &Path, id: &str) -> Option<std::collections::BTreeSet<String>> {
    let text = std::fs::read_to_string(cache.join("leases").join(id)).ok()?;
    text.lines().map(|l| l.strip_prefix("layer sha256:").map(str::to_string)).collect()
}

/// The layer digests (hex) of the cache layers a workspace's description lists (`None`
/// unless every lower is one: `…/layers/<hex>/fs`).
fn workspace_layers(ws_dir: &Path) -> Option<std::collections::BTreeSet<String>> {
    let v: serde_json::Value = serde_json::from_slice(&read_regular(&ws_dir.join("workspace.json")).ok()??).ok()?;
    v["lowers"]
        .as_array()?
        .iter()
        .map(|l| {
            let fs = Path::new(l.as_str()?);
            let entry = fs.parent()?;
            let cached = fs.file_name()? == "fs" && entry.parent()?.file_name()? == "layers";
            cached.then(|| entry.file_name()?.to_str().map(str::to_string)).flatten()
        })
        .collect()
}

/// The bytes of the regular file `path` (`None` when missing): opened `O_NOFOLLOW |
/// O_NONBLOCK`, so a link is refused and a FIFO put there never blocks the command.
fn read_regular(path: &Path) -> Result<Option<Vec<u8>>, Fail> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("open {}: {e}", path.display()).into()),
    };
    if !f.metadata().is_ok_and(|m| m.is_file() && m.len() < 16 << 20) {
        return Err(format!("{}: not a regular file", path.display()).into());
    }
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|e| format!("read {}: {e}", path.display()))?;
    Ok(Some(v))
}

/// Whether a view or tmpfs is mounted in `ws_dir` (a workspace whose description is gone
/// may still be running: its lease must stay).
fn mounted_in(ws_dir: &Path) -> bool {
    ["rootfs", "mem"]
        .iter()
        .map(|n| ws_dir.join(n))
        .any(|p| p.exists() && rootfs_cache::is_mount_point(&p).unwrap_or(true))
        || ws_dir.join("work/rootfs-cache-copy").exists()
}

/// Releases a persisted lease (a workspace made without --cache has none).
fn release(cache: &RootfsCache, id: &str) -> Result<(), Fail> {
    if cache.leases().iter().any(|l| l == id) {
        cache.release(id)?;
    }
    Ok(())
}

fn cmd_unpack(args: &[String]) -> Result<(), Fail> {
    let mut opts = UnpackOptions::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
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
            s if s.starts_with('-') => return Err(usage(format!("unknown option {s:?} (try --help)"))),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [blob, dest] = positional.as_slice() else {
        return Err(usage(format!("unpack needs LAYER_BLOB and DEST_DIR\n{}", help("unpack"))));
    };
    let file = std::fs::File::open(blob).map_err(|e| format!("open {}: {e}", blob.display()))?;
    // Refused before the destination is made: nothing is ever written into a cache.
    if let Some(c) = rootfs_cache::cache_containing(dest) {
        return Err(format!("{} is in the cache {}: refusing to extract into it", dest.display(), c.display()).into());
    }
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
