//! The README's "run it" command: `cargo run --release --example restore [REF]`.
//!
//! Without an argument it writes a demo image as an OCI layout in a temp dir (no network,
//! no external tool): a base layer of ~12,000 files (~80 MB, between a minimal distro
//! rootfs and a language runtime image), an update layer that rewrites files and deletes a file and a directory
//! (whiteouts), and a layer with an opaque directory. With `REF` it restores that image
//! instead: `OCI_DIR[:TAG]` (TAG defaults to `latest`), `OCI_DIR@sha256:...`, `oci:DIR[:TAG]`,
//! or `docker://HOST/REPO[:TAG|@sha256:...]` (pulled from a registry; credentials from the
//! usual auth files; plain HTTP only to a loopback registry).
//!
//! Then it shows the point of the crate, each phase timed:
//! 1. one cold restore: `RootfsCache::ensure` extracts every layer once (digests
//!    verified), then a fresh `Workspace` is created over the layers and mounted;
//! 2. 100 warm restores: `ensure` by digest (a cache hit, no fetcher call), a fresh
//!    `Workspace`, mount, one file written into the sandbox, unmount, destroy;
//! 3. the same 100 restores with the bare system calls alone (mkdir upper/work/target,
//!    `mount(2)`, the write, `umount2`, `std::fs::remove_dir_all`), the floor for any
//!    overlay restore (kernel backend only);
//! 4. re-extracting the image (what "untar on every restore" costs), 3 times.
//!
//! As root, or in a user namespace (`unshare -Urm`), it mounts with the kernel overlay
//! (`detect` probes it); otherwise it says why and uses the copy backend. The last line
//! is the summary for scripts:
//! `cold_ms=… warm_p50_ms=… warm_p99_ms=… speedup=…x backend=kernel|copy`.
//!
//! `restore --lazy REF [-- COMMAND [ARGS...]]` compares instead the time to the first
//! exec of a cold restore, eager (`ensure`) against lazy (`ensure_lazy`), each from an
//! empty cache: ensure, a fresh workspace, mount, then COMMAND (default `/bin/sh -c
//! true`) run chrooted in the view until it exits; for lazy also the time until the
//! image is local. Root only (FUSE and the kernel overlay). Last line:
//! `eager_first_exec_ms=… lazy_first_exec_ms=… speedup=…x lazy_local_ms=…`.

#[path = "common/image_ref.rs"]
mod image_ref;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use image_ref::{ImageRef, RegistryFlags};
use rootfs_cache::{
    BackendKind, CacheOptions, Digest, ImageFetcher, MountBackend, RootfsCache, UnpackOptions, WhiteoutMode, Workspace,
    WorkspaceOptions, detect, unpack,
};

const WARM_RUNS: usize = 100;
const REEXTRACT_RUNS: usize = 3;

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

/// Three uncompressed layer tars, bottom first.
fn demo_layers() -> Vec<Vec<u8>> {
    let mut base = tar::Builder::new(Vec::new());
    for d in 0..400 {
        dir(&mut base, &format!("usr/share/pkg{d}/"));
        for f in 0..30 {
            let text = format!("package {d} file {f}\n").repeat(100 + f * 30);
            file(&mut base, &format!("usr/share/pkg{d}/file{f}.txt"), text.as_bytes());
        }
    }
    dir(&mut base, "etc/");
    file(&mut base, "etc/os-release", b"NAME=demo\nVERSION=1\n");
    dir(&mut base, "var/cache/");
    file(&mut base, "var/cache/stale.bin", &[7u8; 100_000]);
    dir(&mut base, "tmp/");

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

    [base, update, clean].into_iter().map(|b| b.into_inner().unwrap()).collect()
}

/// Writes `blob` under `layout/blobs/sha256/`; returns its descriptor JSON.
fn put_blob(layout: &Path, blob: &[u8], media_type: &str) -> String {
    let d = Digest::of(blob);
    std::fs::write(layout.join("blobs/sha256").join(d.hex()), blob).unwrap();
    format!(r#"{{"mediaType":"{media_type}","digest":"{d}","size":{}}}"#, blob.len())
}

/// The demo image as an OCI layout (gzip layers) tagged `demo`.
fn write_demo_layout(layout: &Path) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in demo_layers() {
        diff_ids.push(format!("\"{}\"", Digest::of(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        layers.push(put_blob(layout, &gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip"));
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    let config = put_blob(layout, config.as_bytes(), "application/vnd.oci.image.config.v1+json");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{config},"layers":[{}]}}"#,
        layers.join(",")
    );
    let manifest = put_blob(layout, manifest.as_bytes(), "application/vnd.oci.image.manifest.v1+json");
    let tagged = manifest.replacen('{', r#"{"annotations":{"org.opencontainers.image.ref.name":"demo"},"#, 1);
    std::fs::write(layout.join("index.json"), format!(r#"{{"schemaVersion":2,"manifests":[{tagged}]}}"#)).unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and 99th percentile (nearest rank) in ms.
fn p50_p99(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: f64| ms(v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]);
    (at(0.50), at(0.99))
}

/// One restore with bare system calls: the floor under any overlay restore. `None` when
/// `mount(2)` refuses (its option data is one page: a few dozen layers at most).
fn bare_restore(base: &Path, lowerdir: &str) -> Option<Duration> {
    let t = Instant::now();
    let (upper, work, target) = (base.join("upper"), base.join("work"), base.join("rootfs"));
    for d in [base, &upper, &work, &target] {
        std::fs::create_dir(d).unwrap();
    }
    let data = format!("lowerdir={lowerdir},upperdir={},workdir={}", upper.display(), work.display());
    let mounted =
        nix::mount::mount(Some("overlay"), &target, Some("overlay"), nix::mount::MsFlags::empty(), Some(data.as_str()));
    if mounted.is_ok() {
        std::fs::write(target.join("tmp/sandbox.txt"), b"written by the sandbox\n").unwrap();
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    std::fs::remove_dir_all(base).unwrap();
    mounted.ok().map(|()| t.elapsed())
}

/// One warm restore through the crate; returns its phases.
fn warm_restore(
    cache: &RootfsCache,
    fetcher: &dyn ImageFetcher,
    reference: &str,
    dir: &Path,
    backend: &dyn Fn() -> Box<dyn MountBackend>,
) -> [Duration; 5] {
    let t0 = Instant::now();
    let rootfs = cache.ensure(fetcher, reference).expect("warm ensure");
    let t1 = Instant::now();
    let mut ws = Workspace::create(dir, rootfs, WorkspaceOptions::default()).expect("create workspace");
    let t2 = Instant::now();
    let target = ws.mount(backend()).expect("mount").to_path_buf();
    let t3 = Instant::now();
    std::fs::write(target.join("tmp/sandbox.txt"), b"written by the sandbox\n").unwrap();
    let t4 = Instant::now();
    ws.destroy().expect("destroy");
    let t5 = Instant::now();
    [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4]
}

/// `restore --lazy REF [-- COMMAND...]`: time to the first exec, eager against lazy.
fn lazy_main(args: &[String]) {
    let Some(r) = args.first() else {
        eprintln!("usage: restore --lazy REF [-- COMMAND [ARGS...]]");
        std::process::exit(2);
    };
    let command: Vec<String> = match args.iter().position(|a| a == "--") {
        Some(p) if p + 1 < args.len() => args[p + 1..].to_vec(),
        _ => vec!["/bin/sh".into(), "-c".into(), "true".into()],
    };
    let image = ImageRef::parse(r).unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().expect("temp dir");
    let mut times = Vec::new();
    for lazy in [false, true] {
        let mode = if lazy { "lazy" } else { "eager" };
        let (fetcher, reference) = image.fetcher(&RegistryFlags::default()).expect("fetcher");
        let cache =
            RootfsCache::open(work.path().join(format!("cache-{mode}")), CacheOptions::default()).expect("open");
        let t = Instant::now();
        let rootfs = if lazy {
            cache.ensure_lazy(std::sync::Arc::from(fetcher), &reference, &Default::default()).expect("ensure_lazy")
        } else {
            cache.ensure(fetcher.as_ref(), &reference).expect("ensure")
        };
        let ensured = t.elapsed();
        let status = rootfs.lazy_status();
        let lazy_layers = rootfs.is_lazy().then(|| rootfs.layers().to_vec());
        let mut ws = Workspace::create(work.path().join(format!("ws-{mode}")), rootfs, WorkspaceOptions::default())
            .expect("create");
        let view = ws.mount(rootfs_cache::KernelOverlay::new()).expect("mount").to_path_buf();
        let mut cmd = std::process::Command::new(&command[0]);
        cmd.args(&command[1..]);
        let root = view.clone();
        // SAFETY: chroot and chdir only (async-signal-safe), between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::unistd::chroot(&root).map_err(std::io::Error::from)?;
                nix::unistd::chdir("/").map_err(std::io::Error::from)
            });
        }
        let st = cmd.status().expect("run the command");
        let first_exec = t.elapsed();
        assert!(st.success(), "{command:?} in the {mode} view: {st}");
        // Local: every layer ready in the cache (the workspace holds the Rootfs).
        let local_ms = lazy_layers.map(|want| {
            while !want.iter().all(|d| cache.layers().iter().any(|(l, _, _)| l == d)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            t.elapsed().as_secs_f64() * 1e3
        });
        println!(
            "{mode:>5}: ensure {:8.1} ms, first exec done {:8.1} ms{}{}",
            ensured.as_secs_f64() * 1e3,
            first_exec.as_secs_f64() * 1e3,
            local_ms.map(|m| format!(", local after {m:.1} ms")).unwrap_or_default(),
            if status.eager.is_empty() {
                String::new()
            } else {
                format!(" ({} layers pulled whole)", status.eager.len())
            }
        );
        ws.destroy().expect("destroy");
        times.push((first_exec, local_ms));
    }
    let (eager, lazy) = (times[0].0.as_secs_f64() * 1e3, times[1].0.as_secs_f64() * 1e3);
    println!(
        "eager_first_exec_ms={eager:.1} lazy_first_exec_ms={lazy:.1} speedup={:.2}x lazy_local_ms={:.1}",
        eager / lazy,
        times[1].1.unwrap_or(lazy)
    );
}

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some("--lazy") {
        return lazy_main(&all[1..]);
    }
    let arg = std::env::args().nth(1);
    if matches!(arg.as_deref(), Some("-h" | "--help")) {
        println!(
            "usage: restore [OCI_DIR[:TAG] | OCI_DIR@sha256:... | oci:DIR[:TAG] | docker://HOST/REPO[:TAG|@sha256:...]]\n\
             (no argument: a generated demo image)\n\
             \x20      restore --lazy REF [-- COMMAND [ARGS...]]   (time to first exec, eager vs lazy)"
        );
        return;
    }
    let root = nix::unistd::geteuid().is_root() && !rootfs_cache::in_user_namespace();
    let work = tempfile::tempdir().expect("temp dir");
    let image = match &arg {
        Some(r) => ImageRef::parse(r).unwrap_or_else(|e| panic!("{e}")),
        None => {
            let dir = work.path().join("demo-layout");
            write_demo_layout(&dir);
            ImageRef::Layout { dir, reference: "demo".to_string() }
        }
    };
    let (fetcher, reference) =
        image.fetcher(&RegistryFlags::default()).unwrap_or_else(|e| panic!("{}: {e}", image.describe()));
    let fetcher = fetcher.as_ref();

    // The backend: a real probe mount on the filesystem the uppers go to.
    let sandboxes = work.path().join("sandboxes");
    std::fs::create_dir(&sandboxes).unwrap();
    let found = detect(&sandboxes).expect("detect");
    let kernel = found.kind == BackendKind::Kernel;
    let backend = || found.backend();
    println!(
        "rootfs-cache restore demo: image {}, backend {} ({:?}){}",
        image.describe(),
        if kernel { "kernel overlay" } else { "copy (overlay not mountable here)" },
        found.reason,
        if root { "" } else { ", unprivileged: rootless extraction" }
    );

    // Default extraction options follow the privileges (rootless ones when unprivileged).
    let cache = RootfsCache::open(work.path().join("cache"), CacheOptions::default()).expect("open cache");

    // 1. Cold: extract every layer, then a first sandbox.
    let t = Instant::now();
    let rootfs = cache.ensure(fetcher, &reference).expect("cold ensure");
    let extract = t.elapsed();
    let by_digest = image.pinned(&rootfs.manifest_digest());
    let layers = rootfs.lowers().to_vec();
    let t = Instant::now();
    let mut ws = Workspace::create(sandboxes.join("cold"), rootfs, WorkspaceOptions::default()).expect("create");
    let view = ws.mount(backend()).expect("cold mount").to_path_buf();
    let first_mount = t.elapsed();
    if arg.is_none() {
        // The merged view is the image: the update layer's file and whiteouts, the
        // opaque directory of the last layer.
        let release = std::fs::read_to_string(view.join("etc/os-release")).expect("os-release");
        assert!(release.contains("VERSION=2"), "{release}");
        assert!(!view.join("usr/share/pkg0/file0.txt").exists() && !view.join("usr/share/pkg1").exists());
        assert!(!view.join("var/cache/stale.bin").exists() && view.join("var/cache/fresh.txt").exists());
        println!("merged view checked: update applied, whiteouts and opaque directory honoured");
    }
    ws.destroy().expect("destroy");
    let cold = extract + first_mount;

    // 2. Warm: 100 fresh sandboxes from the cache, each followed by 3. the same restore
    // with bare system calls (kernel overlay only), so both see the same machine.
    let lowerdir = layers.iter().map(|l| l.display().to_string()).collect::<Vec<_>>().join(":");
    let mut phases: [Vec<Duration>; 5] = Default::default();
    let mut totals = Vec::with_capacity(WARM_RUNS);
    let mut bare_runs = Vec::with_capacity(WARM_RUNS);
    let mut bare_ok = true;
    for i in 0..WARM_RUNS {
        let p = warm_restore(&cache, fetcher, &by_digest, &sandboxes.join(format!("s{i}")), &backend);
        totals.push(p.iter().sum::<Duration>());
        for (v, d) in phases.iter_mut().zip(p) {
            v.push(d);
        }
        if kernel && bare_ok {
            match bare_restore(&sandboxes.join(format!("bare{i}")), &lowerdir) {
                Some(d) => bare_runs.push(d),
                None => bare_ok = false,
            }
        }
    }
    let (warm_p50, warm_p99) = p50_p99(&mut totals);
    if kernel && !bare_ok {
        println!("(no bare comparison: mount(2) refused {} layers in one option page)", layers.len());
    }
    let bare = (kernel && bare_ok).then(|| p50_p99(&mut bare_runs));

    // 4. Re-extracting the whole image, as untar-on-restore does.
    let mut reextract: Vec<Duration> = (0..REEXTRACT_RUNS)
        .map(|i| {
            let flat = work.path().join(format!("flat{i}"));
            std::fs::create_dir(&flat).unwrap();
            let manifest = fetcher.resolve(&reference).expect("resolve");
            let t = Instant::now();
            for desc in &manifest.layers {
                let mut o = UnpackOptions::default();
                o.whiteouts = WhiteoutMode::Apply;
                o.expected_digest = Some(desc.digest);
                let blob = fetcher.open_blob(desc).expect("open blob");
                unpack(blob, &flat, &o).expect("re-extract");
            }
            let e = t.elapsed();
            std::fs::remove_dir_all(&flat).unwrap();
            e
        })
        .collect();
    let (reextract_p50, _) = p50_p99(&mut reextract);

    let names = ["ensure (cache hit)", "create workspace", "mount", "write a file", "unmount + destroy"];
    println!();
    println!("{:<34} {:>10} {:>10}", "phase", "p50 ms", "p99 ms");
    println!("{:<34} {:>10.2} {:>10}", "cold: extract all layers", ms(extract), "");
    println!("{:<34} {:>10.2} {:>10}", "cold: first workspace + mount", ms(first_mount), "");
    for (name, v) in names.iter().zip(phases.iter_mut()) {
        let (a, b) = p50_p99(v);
        println!("{:<34} {:>10.3} {:>10.3}", format!("warm: {name}"), a, b);
    }
    println!("{:<34} {:>10.3} {:>10.3}", format!("warm restore, total ({WARM_RUNS} runs)"), warm_p50, warm_p99);
    if let Some((b50, b99)) = bare {
        println!("{:<34} {:>10.3} {:>10.3}", "bare syscalls, same restore", b50, b99);
    }
    println!("{:<34} {:>10.2} {:>10}", format!("re-extract the image ({REEXTRACT_RUNS} runs)"), reextract_p50, "");
    println!();
    let speedup = reextract_p50 / warm_p50;
    match bare {
        Some((b50, _)) => println!(
            "warm restore: {speedup:.0}x faster than re-extracting, {:.2}x the bare system calls",
            warm_p50 / b50
        ),
        None => {
            println!("warm restore: {speedup:.1}x faster than re-extracting (no bare comparison)");
            if !kernel {
                println!(
                    "the copy backend copies the image into every sandbox: run as root, or in a user namespace \
                     (`unshare -Urm`), for overlay mounts"
                );
            }
        }
    }
    println!(
        "cold_ms={:.2} warm_p50_ms={warm_p50:.3} warm_p99_ms={warm_p99:.3} speedup={speedup:.1}x backend={}",
        ms(cold),
        if kernel { "kernel" } else { "copy" }
    );
}
