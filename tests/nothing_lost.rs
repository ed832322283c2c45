//! Issue 13, "Nothing lost": a failed command or method never touches a running sandbox
//! or the shared cache (DESIGN rules 4, 8 and 11).
//!
//! Every test builds a live sandbox in its own private mount namespace, on a scratch
//! tmpfs: an OCI layout made here (a one-layer image `one`, a two-layer image `two` whose
//! second layer deletes a file, adds a directory and makes one opaque, and an unrelated
//! `extra`), a cache `C`, then `rootfsctl --cache C create [--tmpfs SIZE] L:two WS`,
//! `rootfsctl mount --backend kernel|copy WS` and writes through `WS/rootfs` (a new file
//! and directory, a lower file rewritten, a lower file deleted). Each test runs in four
//! variants: disk or tmpfs upper × kernel or copy backend (`::disk_kernel`,
//! `::tmpfs_kernel`, `::disk_copy`, `::tmpfs_copy`); the slow ones (a 200 MiB upper file)
//! only over the kernel backend, the one that exports while mounted.
//!
//! Then one kind of fault after another, each followed by [`Live::check`]:
//! 1. the merged view: still a mount point (kernel backend) or still holding the copy
//!    backend's state (copy backend), and its tree unchanged (names, types, content,
//!    modes, owners, xattrs, mtimes; the deleted file still absent);
//! 2. the upper: unchanged (`WS/upper`, or `WS/mem/upper` with `WS/mem` still a tmpfs
//!    mount point), and the workspace's description (`workspace.json`) too;
//! 3. every cache layer `C/layers/*/fs`: unchanged, strictly (xattrs and mtimes too);
//! 4. `C/leases/`: the same files, and `rootfsctl ls` shows the sandboxes' layers leased.
//!
//! and [`Live::finish`] at the end: `rootfsctl unmount WS` folds the writes into the upper
//! (both backends), `rootfsctl --cache C destroy WS` succeeds, `C/leases/` is empty, no
//! mount is left under the scratch dir and `gc --max-bytes 0` evicts every layer.
//! `rootfsctl` failures must exit 2 (usage) or 1 (anything else) with exactly one line on
//! stderr starting `rootfsctl:`; the line format is collected over the whole test and
//! asserted last, so a chatty usage message never hides a lost sandbox.
//!
//! Faults: `cli_*` through the `rootfsctl` binary (second mounts, exports into paths that
//! cannot take them or a full file system, usage errors, imports while mounted, creates
//! over the live workspace or with a leftover upper, apply/convert of cache layers,
//! commands on paths that hold no workspace, destroying a neighbour, commands racing an
//! export, SIGKILL mid-export and mid-import); `lib_*` through the crate (a handle from
//! `Workspace::open` that fails a call, or none, and is dropped; creates over the live
//! workspace; apply into cache layers; gc with a budget of 0) and, the other way round,
//! a handle that mounted itself tears its own mount (and its own tmpfs) down on drop.
//!
//! Needs root and `tar` (skipped otherwise, a failure under `CI=1`).

#[path = "common/rootfsctl.rs"]
mod rootfsctl;
#[path = "common/sandbox.rs"]
mod sandbox;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rootfs_cache::{
    CacheOptions, CopyBackend, DiffOptions, Error, KernelOverlay, OciLayout, RootfsCache, Workspace, WorkspaceOptions,
    is_mount_point,
};
use rootfsctl::{Ctl, kv, s};
use sandbox::{Snap, assert_writes_in_upper, build_layout, is_tmpfs_mount, mounts_under, names, sandbox_writes, tree};
use support::{Cmp, Ent, Fmt};

// ---------------------------------------------------------------------------------------
// Variants

#[derive(Clone, Copy, Debug)]
struct Variant {
    /// `create --tmpfs`: the upper in `WS/mem`.
    tmpfs: bool,
    /// `mount --backend copy` (else `kernel`).
    copy: bool,
}

impl Variant {
    fn backend(self) -> &'static str {
        if self.copy { "copy" } else { "kernel" }
    }

    /// `--tmpfs SIZE` for a `create` of this variant.
    fn create_flags(self, big: bool) -> Vec<&'static str> {
        match (self.tmpfs, big) {
            (false, _) => vec![],
            (true, false) => vec!["--tmpfs", "64M"],
            (true, true) => vec!["--tmpfs", "512M"],
        }
    }

    fn options(self) -> WorkspaceOptions {
        if self.tmpfs { WorkspaceOptions::tmpfs(64 << 20) } else { WorkspaceOptions::default() }
    }
}

/// `mod NAME { disk_kernel, tmpfs_kernel, disk_copy, tmpfs_copy }`, each calling `NAME(variant)`.
macro_rules! every_variant {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::Variant;
            #[test]
            fn disk_kernel() {
                super::$name(Variant { tmpfs: false, copy: false })
            }
            #[test]
            fn tmpfs_kernel() {
                super::$name(Variant { tmpfs: true, copy: false })
            }
            #[test]
            fn disk_copy() {
                super::$name(Variant { tmpfs: false, copy: true })
            }
            #[test]
            fn tmpfs_copy() {
                super::$name(Variant { tmpfs: true, copy: true })
            }
        }
    )*};
}

/// The kernel-backend variants only (exports while mounted; the copy backend refuses them).
macro_rules! kernel_variants {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::Variant;
            #[test]
            fn disk_kernel() {
                super::$name(Variant { tmpfs: false, copy: false })
            }
            #[test]
            fn tmpfs_kernel() {
                super::$name(Variant { tmpfs: true, copy: false })
            }
        }
    )*};
}

every_variant!(
    cli_mount_again,
    cli_export_failures,
    cli_export_into_full_fs,
    cli_import_refused,
    cli_create_over_live,
    cli_apply_and_convert_cache_layers,
    cli_failed_create_leaves_nothing,
    cli_usage_errors,
    cli_no_workspace,
    cli_destroy_other_workspace,
    lib_adopted_handle_drop,
    lib_mount_again,
    lib_export_errors,
    lib_import_mounted,
    lib_apply_cache_backed,
    lib_apply_cache_layer_named_as_lower,
    lib_create_over_live,
    lib_gc_keeps_leased_layers,
    lib_own_handle_tears_down,
);
kernel_variants!(cli_commands_racing_an_export, cli_sigkill_export, cli_sigkill_import);

// ---------------------------------------------------------------------------------------
// Small helpers (the image, the sandbox's writes and tree helpers: `common/sandbox.rs`)

fn assert_same_tree(what: &str, want: &Snap, got: &Snap) {
    support::assert_no_diffs(what, &support::diff_trees(want, got, &Cmp::strict()));
}

/// `tar -tf`: the entry names, or the failure.
fn tar_list(p: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("tar").arg("-tf").arg(p).output().unwrap();
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim_end()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect())
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A `Write` that takes `left` bytes, then fails every write.
struct FailAfter {
    left: usize,
}

impl Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("injected write failure"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The fixture

struct Fx {
    v: Variant,
    base: PathBuf,
    layout: PathBuf,
    ctl: Ctl,
    /// Detached (with everything below it) before the directory is removed.
    _scratch: scratch_ns::Mounted,
    _tmp: tempfile::TempDir,
}

/// A private mount namespace, a scratch tmpfs of `size`, the layout and an empty cache
/// dir; `None` (skipped) without root or `tar`.
fn setup(v: Variant, size: &str) -> Option<Fx> {
    let test = std::thread::current().name().unwrap_or("nothing_lost").to_string();
    if !support::require_root(&test) || !support::require_tools(&test, &["tar"]) {
        return None;
    }
    scratch_ns::private_ns();
    let tmp = support::tempdir();
    let scratch = scratch_ns::tmpfs(tmp.path(), &format!("size={size},mode=0755"));
    let base = tmp.path().to_path_buf();
    let ctl = Ctl { cache: base.join("C"), tmp: base.join("tmp") };
    fs::create_dir(&ctl.tmp).unwrap();
    let layout = build_layout(&base.join("L"));
    rootfsctl::rootfsctl_bin();
    Some(Fx { v, base, layout, ctl, _scratch: scratch, _tmp: tmp })
}

/// One live sandbox and what it looked like right after its writes.
struct Sandbox {
    ws: PathBuf,
    view: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    tmpfs: bool,
    copy: bool,
    lowers: Vec<PathBuf>,
    view_before: Snap,
    upper_before: Snap,
    description: Vec<u8>,
}

/// The cache's state that no fault may change.
struct CacheState {
    layers: BTreeMap<String, Snap>,
    leases: BTreeSet<String>,
}

impl Fx {
    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", s(&self.layout))
    }

    /// `ensure` (the lowers, top first), `create`, `mount`, writes through the view.
    fn sandbox(&self, name: &str, tag: &str, big: bool) -> Sandbox {
        let ws = self.base.join(name);
        let image = self.image(tag);
        let lowers: Vec<PathBuf> = self.ctl.cached(&["ensure", &image]).lines().map(PathBuf::from).collect();
        let mut args = vec!["create"];
        args.extend(self.v.create_flags(big));
        args.extend([image.as_str(), s(&ws)]);
        assert_eq!(self.ctl.cached(&args).trim_end(), s(&ws.join("rootfs")));
        let view = PathBuf::from(self.ctl.run(&["mount", "--backend", self.v.backend(), s(&ws)]).trim_end());
        assert_eq!(view, ws.join("rootfs"));
        assert_eq!(is_mount_point(&view).unwrap(), !self.v.copy);
        sandbox_writes(&view, big);
        if tag == "two" {
            assert!(!view.join("etc/gone").exists(), "the second layer's whiteout did not apply");
        }
        let (upper, work) = if self.v.tmpfs {
            (ws.join("mem/upper"), ws.join("mem/work"))
        } else {
            (ws.join("upper"), ws.join("work"))
        };
        Sandbox {
            view_before: tree(&view),
            upper_before: tree(&upper),
            description: fs::read(ws.join("workspace.json")).unwrap(),
            ws,
            view,
            upper,
            work,
            tmpfs: self.v.tmpfs,
            copy: self.v.copy,
            lowers,
        }
    }

    fn cache_state(&self) -> CacheState {
        let layers_dir = self.ctl.cache.join("layers");
        let layers =
            names(&layers_dir).into_iter().map(|h| (h.clone(), tree(&layers_dir.join(h).join("fs")))).collect();
        CacheState { layers, leases: names(&self.ctl.cache.join("leases")) }
    }

    /// The sandboxes are live from here on; the cache as it is now is the baseline. (The
    /// first check also shows that walking the trees changes nothing by itself.)
    fn live(&self, sandboxes: Vec<Sandbox>) -> Live<'_> {
        let live = Live { fx: self, sbs: sandboxes, cache: self.cache_state(), format: RefCell::new(Vec::new()) };
        live.check("right after setup");
        live
    }
}

/// The live sandboxes of a test, the cache baseline and the `rootfsctl` output problems
/// seen so far.
struct Live<'a> {
    fx: &'a Fx,
    sbs: Vec<Sandbox>,
    cache: CacheState,
    /// Failures whose stderr was not exactly one `rootfsctl: ...` line.
    format: RefCell<Vec<String>>,
}

impl Live<'_> {
    fn ws(&self) -> &Path {
        &self.sbs[0].ws
    }

    fn sb(&self) -> &Sandbox {
        &self.sbs[0]
    }

    /// Invariants 1-4 for every live sandbox, after `what`.
    fn check(&self, what: &str) {
        self.check_with(what, &BTreeSet::new());
    }

    /// Only what is cheap: the views still mounted, the tmpfs uppers still there (every
    /// problem in one message).
    fn check_mounts(&self, what: &str) {
        let mut lost = Vec::new();
        for sb in &self.sbs {
            let ws = sb.ws.display();
            if sb.copy {
                if !sb.work.join("rootfs-cache-copy").is_file() {
                    lost.push(format!(
                        "{ws}: the copy backend's state is gone (the view was unmounted or its work dir emptied)"
                    ));
                }
            } else if !is_mount_point(&sb.view).unwrap() {
                lost.push(format!("{} is no longer a mount point", sb.view.display()));
            }
            if sb.tmpfs && !is_tmpfs_mount(&sb.ws.join("mem")) {
                lost.push(format!("{ws}/mem is no longer a tmpfs mount point (the tmpfs upper is gone)"));
            }
        }
        assert!(lost.is_empty(), "after {what}: {}", lost.join("; "));
    }

    /// [`check`](Live::check) while the persisted leases `extra` exist too.
    fn check_with(&self, what: &str, extra: &BTreeSet<String>) {
        self.check_mounts(what);
        for sb in &self.sbs {
            let ws = sb.ws.display();
            assert_same_tree(
                &format!("after {what}: merged view {}", sb.view.display()),
                &sb.view_before,
                &tree(&sb.view),
            );
            assert_same_tree(
                &format!("after {what}: upper {}", sb.upper.display()),
                &sb.upper_before,
                &tree(&sb.upper),
            );
            let desc = fs::read(sb.ws.join("workspace.json")).unwrap_or_else(|e| panic!("after {what}: {ws}: {e}"));
            assert!(
                desc == sb.description,
                "after {what}: {ws}/workspace.json changed: {}",
                String::from_utf8_lossy(&desc)
            );
        }
        let now = self.fx.cache_state();
        let leases: BTreeSet<String> = self.cache.leases.union(extra).cloned().collect();
        assert_eq!(now.leases, leases, "after {what}: the leases in C/leases changed");
        assert_eq!(
            now.layers.keys().collect::<Vec<_>>(),
            self.cache.layers.keys().collect::<Vec<_>>(),
            "after {what}: the set of cache layers changed"
        );
        for (hex, before) in &self.cache.layers {
            assert_same_tree(&format!("after {what}: cache layer {hex}"), before, &now.layers[hex]);
        }
        let ls = self.fx.ctl.cached(&["ls"]);
        for sb in &self.sbs {
            for l in &sb.lowers {
                let hex = l.parent().unwrap().file_name().unwrap().to_str().unwrap();
                let line = format!("sha256:{hex} ");
                assert!(
                    ls.lines().any(|x| x.starts_with(&line) && x.ends_with(" leased")),
                    "after {what}: layer {hex} of {} is not leased:\n{ls}",
                    sb.ws.display()
                );
            }
        }
    }

    /// `rootfsctl [--cache C] ARGS` must fail with `code`; checks the sandboxes first.
    fn fault_with(&self, cached: bool, args: &[&str], code: i32) -> Output {
        let out = if cached { self.fx.ctl.cached_output(args) } else { self.fx.ctl.output(args) };
        let what = format!("`rootfsctl {}{}`", if cached { "--cache C " } else { "" }, args.join(" "));
        self.check(&what);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{what}: exit status {} (expected {code}); stderr: {stderr}",
            out.status
        );
        let lines: Vec<&str> = stderr.lines().collect();
        if lines.len() != 1 || !lines[0].starts_with("rootfsctl: ") {
            let first = lines.first().copied().unwrap_or("");
            self.format.borrow_mut().push(format!("{what}: {} lines, the first {first:?}", lines.len()));
        }
        out
    }

    fn fault(&self, args: &[&str], code: i32) -> Output {
        self.fault_with(false, args, code)
    }

    fn fault_c(&self, args: &[&str], code: i32) -> Output {
        self.fault_with(true, args, code)
    }

    /// Invariant 5: unmount folds the writes, destroy, no lease, no mount, gc empties.
    fn finish(self) {
        let ctl = &self.fx.ctl;
        for sb in &self.sbs {
            ctl.run(&["unmount", s(&sb.ws)]);
            assert!(!is_mount_point(&sb.view).unwrap(), "unmount left {} mounted", sb.view.display());
            assert_writes_in_upper(&sb.upper, &format!("{} after unmount", sb.ws.display()));
            ctl.cached(&["destroy", s(&sb.ws)]);
            assert!(!sb.ws.exists(), "destroy left {}", sb.ws.display());
        }
        let leases = names(&ctl.cache.join("leases"));
        assert!(leases.is_empty(), "leases left after every destroy: {leases:?}");
        let ls = ctl.cached(&["ls"]);
        assert!(ls.lines().all(|l| l.ends_with(" -")), "still leased after every destroy:\n{ls}");
        let mounts = mounts_under(&self.fx.base);
        assert!(mounts.is_empty(), "mounts left under the scratch dir: {mounts:?}");
        let layers = names(&ctl.cache.join("layers")).len();
        let gc = kv(ctl.cached(&["gc", "--max-bytes", "0"]).trim_end());
        assert_eq!(gc["evicted"], layers.to_string(), "gc --max-bytes 0: {gc:?}");
        let left = names(&ctl.cache.join("layers"));
        assert!(left.is_empty(), "gc --max-bytes 0 left layers: {left:?}");
        let format = self.format.into_inner();
        assert!(
            format.is_empty(),
            "{} failures did not print exactly one line on stderr starting `rootfsctl:`:\n  {}",
            format.len(),
            format.join("\n  ")
        );
    }
}

// ---------------------------------------------------------------------------------------
// Faults through rootfsctl

/// A second `mount` of the live workspace, whichever backend it asks for.
fn cli_mount_again(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    live.fault(&["mount", ws], 1);
    for b in ["kernel", "copy", "auto"] {
        live.fault(&["mount", "--backend", b, ws], 1);
    }
    live.finish();
}

/// `diff export` into paths that cannot take it (and, with the copy backend, any path:
/// it refuses to export while mounted): exit 1, no output file.
fn cli_export_failures(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let missing = fx.base.join("no/such/dir/out.tar");
    for flag in [None, Some("--aligned"), Some("--zstd"), Some("--gzip")] {
        let mut args = vec!["diff", "export", ws, s(&missing)];
        args.extend(flag);
        live.fault(&args, 1);
        assert!(!fx.base.join("no").exists(), "`{}` made directories", args.join(" "));
    }
    // Into a directory.
    let dir = fx.base.join("outdir");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("kept"), b"kept").unwrap();
    let before = tree(&dir);
    for flag in [None, Some("--aligned")] {
        let mut args = vec!["diff", "export", ws, s(&dir)];
        args.extend(flag);
        live.fault(&args, 1);
        assert_same_tree(&format!("`{}`: the directory", args.join(" ")), &before, &tree(&dir));
    }
    // A path that would do.
    let out = fx.base.join("out.tar");
    if v.copy {
        for flag in [None, Some("--aligned"), Some("--gzip")] {
            let mut args = vec!["diff", "export", ws, s(&out)];
            args.extend(flag);
            live.fault(&args, 1);
            assert!(!out.exists(), "refused `{}` left {}", args.join(" "), out.display());
        }
    } else {
        let st = kv(fx.ctl.run(&["diff", "export", ws, s(&out)]).trim_end());
        live.check("a successful `diff export`");
        assert_eq!(st["size"], fs::metadata(&out).unwrap().len().to_string());
        let listed = tar_list(&out).unwrap();
        assert!(listed.iter().any(|n| n.trim_end_matches('/') == "etc/written"), "{listed:?}");
    }
    live.finish();
}

/// `diff export` into a full file system: exit 1, no partial file, and a file that was
/// there keeps its old bytes.
fn cli_export_into_full_fs(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let full = fx.base.join("full");
    let small = scratch_ns::tmpfs(&full, "size=1m,mode=0755");
    let old = full.join("old.tar");
    fs::write(&old, b"the bytes of an earlier export\n").unwrap();
    let mut fill = File::create(full.join("fill")).unwrap();
    let chunk = vec![0x5a; 64 << 10];
    let e = loop {
        if let Err(e) = fill.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", full.display());
    drop(fill);
    let listing = names(&full);
    let new = full.join("new.tar");
    for flag in [None, Some("--aligned"), Some("--zstd"), Some("--gzip")] {
        let mut args = vec!["diff", "export", ws, s(&new)];
        args.extend(flag);
        let out = live.fault(&args, 1);
        assert!(!new.exists(), "failed `{}` left a partial {}", args.join(" "), new.display());
        // DESIGN: every OS error names the operation and the path, here the output's
        // (the copy backend refuses an export while mounted before anything is written).
        let stderr = String::from_utf8_lossy(&out.stderr);
        let refused = stderr.contains("unmount first");
        assert!(
            refused || (stderr.contains(s(&full)) && !stderr.contains(s(&live.sb().upper))),
            "failed `{}`: the error does not name the output but {stderr}",
            args.join(" ")
        );
        let mut args = vec!["diff", "export", ws, s(&old)];
        args.extend(flag);
        live.fault(&args, 1);
        assert_eq!(
            fs::read(&old).unwrap(),
            b"the bytes of an earlier export\n",
            "failed `{}` changed the existing output file",
            args.join(" ")
        );
        assert_eq!(names(&full), listing, "failed `{}` left files behind", args.join(" "));
    }
    drop(small);
    live.finish();
}

/// `diff import` into the live (mounted) workspace, from a good, a missing, a garbage
/// and a directory input: exit 1, upper untouched.
fn cli_import_refused(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let good = fx.base.join("in.tar");
    fs::write(&good, support::tar_of(&[Ent::file("imported", "would land in the upper\n")], Fmt::Pax)).unwrap();
    let garbage = fx.base.join("garbage.tar");
    fs::write(&garbage, support::pseudo_random(3, 30_000)).unwrap();
    let dir = fx.base.join("indir");
    fs::create_dir(&dir).unwrap();
    for input in [&good, &fx.base.join("missing.tar"), &garbage, &dir] {
        live.fault(&["diff", "import", ws, s(input)], 1);
    }
    live.finish();
}

/// `create` over the live workspace: with the same cache (its lease is there), another
/// image, a tmpfs upper, and another cache (which knows no lease for it): exit 1, and no
/// lease left in either cache.
fn cli_create_over_live(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let (two, one) = (fx.image("two"), fx.image("one"));
    live.fault_c(&["create", &two, ws], 1);
    live.fault_c(&["create", &one, ws], 1);
    live.fault_c(&["create", "--tmpfs", "64M", &two, ws], 1);
    let c2 = fx.base.join("C2");
    for extra in [&[][..], &["--tmpfs", "64M"][..]] {
        let mut args = vec!["--cache", s(&c2), "create"];
        args.extend(extra);
        args.extend([two.as_str(), ws]);
        live.fault(&args, 1);
        let left = names(&c2.join("leases"));
        assert!(left.is_empty(), "failed `{}` left leases in C2: {left:?}", args.join(" "));
    }
    live.finish();
}

/// `apply` of the cache-backed workspaces (one and two layers) and `convert`/`apply` of a
/// cache layer however it is named: exit 1, layers untouched, the message names the
/// cache layer.
fn cli_apply_and_convert_cache_layers(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws1", "one", false), fx.sandbox("ws", "two", false)]);
    for sb in &live.sbs {
        let out = live.fault(&["apply", s(&sb.ws)], 1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cache layer"),
            "`apply {}` ({} lowers): the message does not mention the cache layer: {stderr}",
            sb.ws.display(),
            sb.lowers.len()
        );
    }
    let lowers = live.sbs[1].lowers.clone();
    let layers_link = fx.base.join("layers-link");
    symlink(fx.ctl.cache.join("layers"), &layers_link).unwrap();
    for (i, l) in lowers.iter().enumerate() {
        let link = fx.base.join(format!("layer-link-{i}"));
        symlink(l, &link).unwrap();
        let hex = l.parent().unwrap().file_name().unwrap();
        let via_parent = layers_link.join(hex).join("fs");
        for p in [l, &link, &via_parent] {
            live.fault(&["convert", s(p)], 1);
            live.fault(&["convert", "--backend", "copy", s(p)], 1);
            live.fault(&["apply", s(p)], 1);
            let entry = l.parent().unwrap();
            assert_eq!(
                names(entry),
                BTreeSet::from(["fs".to_string(), "meta".to_string()]),
                "`convert {}` left the cache entry changed",
                p.display()
            );
        }
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink to the layer was replaced");
    }
    live.finish();
}

/// Failed `create`s of a second workspace: bad sizes, a missing image or layout, a dir
/// holding a crashed sandbox's upper or a non-empty `mem/`: non-zero exit, no lease, the
/// directory as it was; later correct creates succeed (no leaked lease blocks them).
fn cli_failed_create_leaves_nothing(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let two = fx.image("two");
    let ws2 = fx.base.join("ws2");
    let w2 = s(&ws2);
    let flags = v.create_flags(false);
    let with = |extra: &[&'static str], rest: &[&str]| -> Vec<String> {
        let mut a = vec!["create".to_string()];
        a.extend(extra.iter().map(|x| x.to_string()));
        a.extend(rest.iter().map(|x| x.to_string()));
        a
    };
    let no_layout = format!("{}:two", s(&fx.base.join("no-layout")));
    let cases: Vec<(Vec<String>, i32)> = vec![
        (with(&["--tmpfs", "1X"], &[&two, w2]), 2),
        (with(&["--tmpfs", "0"], &[&two, w2]), 2),
        (with(&["--tmpfs", "-5M"], &[&two, w2]), 2),
        (with(&["--tmpfs"], &[&two, w2]), 2),
        (with(&flags, &[&two]), 2),
        (with(&flags, &[&fx.image("missing-tag"), w2]), 1),
        (with(&flags, &[s(&fx.layout), w2]), 1),
        (with(&flags, &[&no_layout, w2]), 1),
    ];
    for (args, code) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        live.fault_c(&args, *code);
        assert!(!ws2.exists(), "failed `create` made {}", ws2.display());
    }
    // A crashed disk sandbox's upper, and a mem/ that is not a tmpfs of ours.
    let ws3 = fx.base.join("ws3");
    fs::create_dir_all(ws3.join("upper/etc")).unwrap();
    fs::write(ws3.join("upper/etc/crashed"), b"a crashed sandbox's writes\n").unwrap();
    let ws4 = fx.base.join("ws4");
    fs::create_dir_all(ws4.join("mem")).unwrap();
    fs::write(ws4.join("mem/someone-elses"), b"not ours\n").unwrap();
    let (before3, before4) = (tree(&ws3), tree(&ws4));
    for (dir, extra, before) in [(&ws3, &[][..], &before3), (&ws4, &["--tmpfs", "64M"][..], &before4)] {
        let mut args = vec!["create"];
        args.extend(extra);
        args.extend([two.as_str(), s(dir)]);
        live.fault_c(&args, 1);
        assert_same_tree(&format!("failed `{}`: the directory", args.join(" ")), before, &tree(dir));
    }
    // Correct creates now succeed: nothing leaked under these names.
    let mut args = vec!["create"];
    args.extend(&flags);
    args.extend([two.as_str(), w2]);
    fx.ctl.cached(&args);
    fs::remove_dir_all(ws3.join("upper")).unwrap();
    fx.ctl.cached(&["create", &two, s(&ws3)]);
    fs::remove_file(ws4.join("mem/someone-elses")).unwrap();
    fx.ctl.cached(&["create", "--tmpfs", "64M", &two, s(&ws4)]);
    for d in [&ws2, &ws3, &ws4] {
        fx.ctl.cached(&["destroy", s(d)]);
    }
    live.check("creating and destroying ws2, ws3 and ws4");
    live.finish();
}

/// Usage errors of every command, several naming the live workspace: exit 2, nothing
/// changes (a `destroy WS extra` destroys nothing, a `gc` with a bad budget evicts nothing).
fn cli_usage_errors(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    // An unleased layer a bad `gc` must not evict.
    fx.ctl.cached(&["ensure", &fx.image("extra")]);
    let live = Live { cache: fx.cache_state(), ..live };
    let ws = s(live.ws());
    let out = fx.base.join("u.tar");
    let o = s(&out);
    let two = fx.image("two");
    let plain: &[&[&str]] = &[
        &[],
        &["bogus"],
        &["mount"],
        &["mount", "--backend"],
        &["mount", "--backend", "bogus", ws],
        &["mount", "--bogus", ws],
        &["mount", ws, "extra"],
        &["unmount"],
        &["unmount", ws, "extra"],
        &["unmount", "--bogus", ws],
        &["destroy"],
        &["destroy", ws, "extra"],
        &["destroy", "--cache", s(&fx.ctl.cache), ws],
        &["detach"],
        &["detach", ws, "extra"],
        &["apply"],
        &["apply", ws, "extra"],
        &["convert"],
        &["convert", "--backend", "bogus", ws],
        &["diff"],
        &["diff", "bogus", ws, o],
        &["diff", "export"],
        &["diff", "export", ws],
        &["diff", "export", ws, o, "--bogus"],
        &["diff", "export", ws, o, "extra"],
        &["diff", "import", ws],
        &["diff", "import", ws, o, "extra"],
        &["--cache"],
        &["--max-bytes", "lots", "ls"],
    ];
    for args in plain {
        live.fault(args, 2);
        assert!(!out.exists(), "`{}` made {o}", args.join(" "));
    }
    let cached: &[&[&str]] = &[
        &["create"],
        &["create", &two],
        &["create", "--tmpfs", "1X", &two, ws],
        &["create", "--bogus", &two, ws],
        &["gc", "--max-bytes", "lots"],
        &["gc", "--max-bytes"],
        &["gc", "now"],
        &["ls", "extra"],
        &["destroy", ws, "extra"],
        &["detach", ws, "extra"],
        &["ensure"],
    ];
    for args in cached {
        live.fault_c(args, 2);
    }
    live.finish();
}

/// Commands on paths that hold no workspace (missing, empty, someone's dir, and the live
/// workspace's own mount point, upper and tmpfs): exit 1, nothing changes.
fn cli_no_workspace(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let good = fx.base.join("in.tar");
    fs::write(&good, support::tar_of(&[Ent::file("imported", "x\n")], Fmt::Pax)).unwrap();
    let missing = fx.base.join("nows");
    let empty = fx.base.join("empty");
    fs::create_dir(&empty).unwrap();
    let someones = fx.base.join("someones");
    fs::create_dir_all(someones.join("upper")).unwrap();
    fs::write(someones.join("upper/file"), b"not a workspace\n").unwrap();
    fs::write(someones.join("workspace.txt"), b"not a description\n").unwrap();
    let before = tree(&someones);
    let sb = live.sb();
    let mut dirs = vec![missing.clone(), empty.clone(), someones.clone(), sb.view.clone()];
    dirs.push(if sb.tmpfs { sb.ws.join("mem") } else { sb.upper.clone() });
    let out = fx.base.join("x.tar");
    for d in &dirs {
        let d = s(d);
        for args in [
            &["mount", d][..],
            &["mount", "--backend", "kernel", d],
            &["unmount", d],
            &["apply", d],
            &["detach", d],
            &["destroy", d],
            &["diff", "export", d, s(&out)],
            &["diff", "import", d, s(&good)],
        ] {
            live.fault(args, 1);
            assert!(!out.exists(), "`{}` made {}", args.join(" "), out.display());
        }
        live.fault_c(&["destroy", d], 1);
        live.fault_c(&["detach", d], 1);
        assert!(!missing.exists(), "a failed command made {}", missing.display());
        assert!(names(&empty).is_empty(), "a failed command wrote into {}", empty.display());
        assert_same_tree("someone's dir", &before, &tree(&someones));
    }
    live.finish();
}

/// `destroy` of a neighbour (`ws2` next to `ws`, a name `ws` is a prefix of), mounted or
/// not: it goes, `ws` stays, and the leases are as before `ws2` was made.
fn cli_destroy_other_workspace(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.sandbox("ws2", "one", false);
    fx.ctl.cached(&["destroy", s(&ws2.ws)]);
    assert!(!ws2.ws.exists());
    live.check("`destroy ws2` (mounted, one layer)");
    let ws2 = fx.sandbox("ws2", "two", false);
    fx.ctl.cached(&["destroy", s(&ws2.ws)]);
    live.check("`destroy ws2` (mounted, the same image)");
    let mut args = vec!["create"];
    args.extend(v.create_flags(false));
    let (two, w3) = (fx.image("two"), fx.base.join("w"));
    args.extend([two.as_str(), s(&w3)]);
    fx.ctl.cached(&args);
    fx.ctl.cached(&["destroy", s(&w3)]);
    assert!(!w3.exists());
    live.check("`destroy w` (unmounted, a prefix of ws)");
    live.finish();
}

/// Commands racing a long `diff export` of the live workspace from other processes: the
/// refused ones fail, the export (and a second one) completes, the sandbox is intact.
fn cli_commands_racing_an_export(v: Variant) {
    let Some(fx) = setup(v, "2g") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", true)]);
    let ws = s(live.ws());
    let two = fx.image("two");
    let good = fx.base.join("in.tar");
    fs::write(&good, support::tar_of(&[Ent::file("imported", "x\n")], Fmt::Pax)).unwrap();
    let (out1, out2) = (fx.base.join("out1.tar"), fx.base.join("out2.tar"));
    let spawn = |out: &Path| {
        fx.ctl.cmd(&["diff", "export", ws, s(out)]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let mut export = spawn(&out1);
    sleep_ms(20);
    let second = spawn(&out2);
    let racing: &[(bool, &[&str], i32)] = &[
        (false, &["mount", ws], 1),
        (true, &["create", &two, ws], 1),
        (false, &["apply", ws], 1),
        (false, &["mount", "--backend", "copy", ws], 1),
        (false, &["diff", "import", ws, s(&good)], 1),
        (true, &["create", "--tmpfs", "64M", &two, ws], 1),
    ];
    let mut raced = 0;
    for (cached, args, code) in racing {
        let running = export.try_wait().unwrap().is_none();
        let o = if *cached { fx.ctl.cached_output(args) } else { fx.ctl.output(args) };
        raced += usize::from(running);
        let what = format!("`{}` during an export", args.join(" "));
        live.check_mounts(&what);
        assert_eq!(o.status.code(), Some(*code), "{what}: {o:?}");
    }
    for (child, out) in [(export, &out1), (second, &out2)] {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "the export into {} failed: {o:?}", out.display());
        let st = kv(String::from_utf8_lossy(&o.stdout).trim_end());
        assert_eq!(st["size"], fs::metadata(out).unwrap().len().to_string());
        let listed = tar_list(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
        assert!(listed.iter().any(|n| n == "big.bin"), "{}: {listed:?}", out.display());
    }
    live.check("commands racing two exports");
    assert!(raced > 0, "the export finished before any other command ran: nothing raced it");
    live.finish();
}

/// A complete export of the live workspace (to compare killed ones with): its size and
/// entry names.
fn reference_export(fx: &Fx, ws: &Path) -> (PathBuf, u64, Vec<String>) {
    let r = fx.base.join("ref");
    fs::create_dir(&r).unwrap();
    let out = r.join("ref.tar");
    fx.ctl.run(&["diff", "export", s(ws), s(&out)]);
    let listed = tar_list(&out).unwrap();
    (out.clone(), fs::metadata(&out).unwrap().len(), listed)
}

/// `kill -9` of `diff export` at several points: the sandbox is intact, and the output
/// is absent, complete, or (when a file was there) its old bytes; nothing else but a
/// crashed `.rootfs-cache-*.partial` is left next to it.
fn cli_sigkill_export(v: Variant) {
    let Some(fx) = setup(v, "2g") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", true)]);
    let (_, size, listed) = reference_export(&fx, live.ws());
    let mut killed = 0;
    for (i, ms) in [5, 20, 50, 100, 200, 400].into_iter().enumerate() {
        let dir = fx.base.join(format!("k{i}"));
        fs::create_dir(&dir).unwrap();
        let out = dir.join("out.tar");
        let old = i % 2 == 1;
        if old {
            fs::write(&out, b"old bytes\n").unwrap();
        }
        let mut child = fx
            .ctl
            .cmd(&["diff", "export", s(live.ws()), s(&out)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        sleep_ms(ms);
        let _ = child.kill();
        let status = child.wait().unwrap();
        killed += usize::from(status.signal() == Some(libc::SIGKILL));
        let what = format!("`diff export` killed after {ms} ms ({status})");
        live.check(&what);
        for n in names(&dir) {
            assert!(
                n == "out.tar" || (n.starts_with(".rootfs-cache-") && n.ends_with(".partial")),
                "{what}: {n} left next to the output"
            );
        }
        let kept_old = old && fs::read(&out).is_ok_and(|b| b == b"old bytes\n");
        if out.exists() && !kept_old {
            let got = tar_list(&out).map_err(|e| format!("{what}: the output is not a whole tar: {e}")).unwrap();
            assert_eq!(got, listed, "{what}: the output lists other entries than a complete export");
            assert_eq!(fs::metadata(&out).unwrap().len(), size, "{what}: the output is half-written");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
    assert!(killed > 0, "every export finished before its SIGKILL: nothing was killed mid-way");
    live.finish();
}

/// `kill -9` of `diff import` into a second, unmounted workspace: the live one is
/// untouched, and the second can still be destroyed.
fn cli_sigkill_import(v: Variant) {
    let Some(fx) = setup(v, "2g") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", true)]);
    let (tar, ..) = reference_export(&fx, live.ws());
    let two = fx.image("two");
    let ws2 = fx.base.join("ws2");
    let mut killed = 0;
    for ms in [5, 30, 80, 150] {
        let mut args = vec!["create"];
        args.extend(v.create_flags(true));
        args.extend([two.as_str(), s(&ws2)]);
        let before = names(&fx.ctl.cache.join("leases"));
        fx.ctl.cached(&args);
        let ws2_lease: BTreeSet<String> = names(&fx.ctl.cache.join("leases")).difference(&before).cloned().collect();
        assert_eq!(ws2_lease.len(), 1, "create ws2 made leases {ws2_lease:?}");
        let mut child = fx
            .ctl
            .cmd(&["diff", "import", s(&ws2), s(&tar)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        sleep_ms(ms);
        let _ = child.kill();
        let status = child.wait().unwrap();
        killed += usize::from(status.signal() == Some(libc::SIGKILL));
        live.check_with(&format!("`diff import ws2` killed after {ms} ms ({status})"), &ws2_lease);
        fx.ctl.cached(&["destroy", s(&ws2)]);
        assert!(!ws2.exists(), "destroy of the half-imported ws2 left it");
        live.check("destroying the half-imported ws2");
    }
    assert!(killed > 0, "every import finished before its SIGKILL: nothing was killed mid-way");
    live.finish();
}

// ---------------------------------------------------------------------------------------
// Faults through the library: handles from `Workspace::open` are adopted

/// Dropping an adopted handle, having called nothing (the core ownership rule).
fn lib_adopted_handle_drop(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = Workspace::open(live.ws()).unwrap();
    assert!(ws.is_mounted(), "open did not recognise the live mount");
    assert_eq!(ws.is_tmpfs(), v.tmpfs);
    assert!(!ws.is_leased());
    drop(ws);
    live.check("dropping a handle from `Workspace::open`");
    let (a, b) = (Workspace::open(live.ws()).unwrap(), Workspace::open(live.ws()).unwrap());
    drop(a);
    live.check("dropping the first of two handles from `open`");
    drop(b);
    live.check("dropping the second of two handles from `open`");
    live.finish();
}

/// `mount` on an adopted, mounted handle: `AlreadyMounted`, and the drop leaves it.
fn lib_mount_again(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let mut ws = Workspace::open(live.ws()).unwrap();
    let e = ws.mount(KernelOverlay::new()).map(|_| ()).unwrap_err();
    drop(ws);
    live.check("`open` + `mount(KernelOverlay)` + drop");
    assert!(matches!(e, Error::AlreadyMounted { .. }), "{e:?}");
    let mut ws = Workspace::open(live.ws()).unwrap();
    let e = ws.mount(CopyBackend::new()).map(|_| ()).unwrap_err();
    drop(ws);
    live.check("`open` + `mount(CopyBackend)` + drop");
    assert!(matches!(e, Error::AlreadyMounted { .. }), "{e:?}");
    live.finish();
}

/// Exports and checkpoints that fail (a writer that breaks, a read-only file, a missing
/// dir, a checkpoint into the upper or the view) on adopted handles.
fn lib_export_errors(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let sb = live.sb();
    let with = |what: &str, f: &dyn Fn(&Workspace) -> rootfs_cache::Result<()>| {
        let ws = Workspace::open(&sb.ws).unwrap();
        let r = f(&ws);
        drop(ws);
        live.check(&format!("`open` + {what} + drop"));
        let e = r.expect_err(what);
        if v.copy {
            assert!(matches!(e, Error::Unsupported { .. }), "{what} while copy-mounted: {e:?}");
        }
    };
    for n in [0, 1000, 100_000] {
        with(&format!("`export_diff` into a writer failing after {n} bytes"), &|ws| {
            ws.export_diff(FailAfter { left: n }, &DiffOptions::default()).map(drop)
        });
    }
    with("`export_diff` (gzip) into a failing writer", &|ws| {
        let mut o = DiffOptions::default();
        o.compression = rootfs_cache::Compression::Gzip;
        ws.export_diff(FailAfter { left: 1000 }, &o).map(drop)
    });
    let ro = fx.base.join("read-only.tar");
    fs::write(&ro, b"old").unwrap();
    for aligned in [false, true] {
        with(&format!("`export_diff_file` (aligned: {aligned}) into a read-only File"), &|ws| {
            let mut o = DiffOptions::default();
            o.aligned = aligned;
            ws.export_diff_file(&File::open(&ro).unwrap(), &o).map(drop)
        });
        assert_eq!(fs::read(&ro).unwrap(), b"old");
    }
    let missing = fx.base.join("no/such/ckpt.tar");
    with("`checkpoint` into a missing dir", &|ws| ws.checkpoint(&missing).map(drop));
    assert!(!fx.base.join("no").exists());
    with("`checkpoint` into the upper", &|ws| ws.checkpoint(sb.upper.join("ckpt.tar")).map(drop));
    with("`checkpoint` into the merged view", &|ws| ws.checkpoint(sb.view.join("ckpt.tar")).map(drop));
    // `changes` fails only while copy-mounted; either way the drop leaves everything.
    let ws = Workspace::open(&sb.ws).unwrap();
    let r = ws.changes();
    drop(ws);
    live.check("`open` + `changes` + drop");
    assert_eq!(r.is_err(), v.copy, "{r:?}");
    live.finish();
}

/// `import_diff` / `import_diff_file` into the mounted workspace: `AlreadyMounted`.
fn lib_import_mounted(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let tar = fx.base.join("in.tar");
    fs::write(&tar, support::tar_of(&[Ent::file("imported", "would land in the upper\n")], Fmt::Pax)).unwrap();
    let garbage = support::pseudo_random(5, 10_000);
    for (what, which) in [("`import_diff`", 0), ("`import_diff_file`", 1), ("`import_diff` of garbage", 2)] {
        let mut ws = Workspace::open(live.ws()).unwrap();
        let r = match which {
            0 => ws.import_diff(File::open(&tar).unwrap()),
            1 => ws.import_diff_file(&File::open(&tar).unwrap()),
            _ => ws.import_diff(&garbage[..]),
        };
        drop(ws);
        live.check(&format!("`open` + {what} while mounted + drop"));
        let e = r.expect_err(what);
        assert!(matches!(e, Error::AlreadyMounted { .. }), "{what}: {e:?}");
    }
    live.finish();
}

/// `apply` on adopted handles of cache-backed workspaces (one layer, two layers):
/// `ImmutableLayer`, still mounted after the drop, layers untouched.
fn lib_apply_cache_backed(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws1", "one", false), fx.sandbox("ws", "two", false)]);
    for sb in &live.sbs {
        let mut ws = Workspace::open(&sb.ws).unwrap();
        let r = ws.apply();
        drop(ws);
        let what = format!("`open` + `apply` of {} ({} cache lowers) + drop", sb.ws.display(), sb.lowers.len());
        live.check(&what);
        let e = r.expect_err(&what);
        assert!(matches!(e, Error::ImmutableLayer { .. }), "{what}: {e:?}");
    }
    live.finish();
}

/// A cache layer named as a plain lower directory (directly and through a symlink), and
/// a workspace inside a layer: `apply` and `create` refuse with `ImmutableLayer`; a
/// handle that mounted itself stays mounted after the refused `apply`.
fn lib_apply_cache_layer_named_as_lower(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let layer = live.sb().lowers.last().unwrap().clone(); // the base layer
    let link = fx.base.join("layer-link");
    symlink(&layer, &link).unwrap();
    for (i, lower) in [&layer, &link].into_iter().enumerate() {
        let dir = fx.base.join(format!("plain{i}"));
        let mut ws = Workspace::create(&dir, vec![lower.clone()], v.options()).unwrap();
        let e = ws.apply().unwrap_err();
        live.check(&format!("`apply` (unmounted) over {}", lower.display()));
        assert!(matches!(e, Error::ImmutableLayer { .. }), "{e:?}");
        let view = if v.copy {
            ws.mount(CopyBackend::new()).unwrap().to_path_buf()
        } else {
            ws.mount(KernelOverlay::new()).unwrap().to_path_buf()
        };
        fs::write(view.join("etc/applied"), b"must not reach the layer\n").unwrap();
        fs::remove_file(view.join("doomed")).unwrap();
        let e = ws.apply().unwrap_err();
        live.check(&format!("`apply` (mounted) over {}", lower.display()));
        assert!(matches!(e, Error::ImmutableLayer { .. }), "{e:?}");
        assert!(ws.is_mounted(), "the refused apply unmounted its own handle's view");
        assert_eq!(fs::read(view.join("etc/applied")).unwrap(), b"must not reach the layer\n");
        ws.destroy().unwrap();
        assert!(!dir.exists());
    }
    let inside = layer.join("inner-ws");
    let e = Workspace::create(&inside, vec![layer.clone()], v.options()).unwrap_err();
    assert!(matches!(e, Error::ImmutableLayer { .. }), "{e:?}");
    live.check("`create` inside a cache layer");
    live.finish();
}

/// `Workspace::create` / `restore` over the live workspace (plain, tmpfs, `reset`):
/// refused, and nothing of the live one touched.
fn lib_create_over_live(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let lowers = live.sb().lowers.clone();
    let ckpt = fx.base.join("ckpt.tar");
    fs::write(&ckpt, support::tar_of(&[Ent::file("restored", "from a checkpoint\n")], Fmt::Pax)).unwrap();
    let mut reset = v.options();
    reset.reset = true;
    let mut tmpfs_reset = WorkspaceOptions::tmpfs(64 << 20);
    tmpfs_reset.reset = true;
    let cases = [
        ("default", WorkspaceOptions::default()),
        ("tmpfs", WorkspaceOptions::tmpfs(64 << 20)),
        ("reset", reset),
        ("tmpfs + reset", tmpfs_reset),
    ];
    for (name, opts) in &cases {
        let r = Workspace::create(live.ws(), lowers.clone(), opts.clone());
        let ok = r.is_ok();
        drop(r);
        let what = format!("`Workspace::create` ({name}) over the live workspace");
        live.check(&what);
        assert!(!ok, "{what} succeeded");
        let r = Workspace::restore(live.ws(), lowers.clone(), opts.clone(), &ckpt);
        let ok = r.is_ok();
        drop(r);
        let what = format!("`Workspace::restore` ({name}) over the live workspace");
        live.check(&what);
        assert!(!ok, "{what} succeeded");
    }
    live.finish();
}

/// `gc` with a budget of 0 from a `RootfsCache` of this process: only the unleased layer
/// goes; the live workspace's layers (a persisted lease) stay, and so does the sandbox.
fn lib_gc_keeps_leased_layers(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let extra: Vec<String> = fx.ctl.cached(&["ensure", &fx.image("extra")]).lines().map(String::from).collect();
    let extra_hex = Path::new(&extra[0]).parent().unwrap().file_name().unwrap().to_str().unwrap().to_string();
    {
        let mut opts = CacheOptions::default();
        opts.max_bytes = 0;
        let cache = RootfsCache::open(&fx.ctl.cache, opts).unwrap();
        let report = cache.gc().unwrap();
        let evicted: Vec<String> = report.evicted.iter().map(|d| d.hex().to_string()).collect();
        assert_eq!(evicted, vec![extra_hex], "gc with a budget of 0 evicted {evicted:?}");
        assert!(report.over_budget_bytes > 0, "{report:?}");
    }
    live.check("`RootfsCache::gc` with a budget of 0");
    let gc = kv(fx.ctl.cached(&["gc", "--max-bytes", "0"]).trim_end());
    assert_eq!(gc["evicted"], "0", "{gc:?}");
    live.check("`rootfsctl gc --max-bytes 0`");
    live.finish();
}

/// The rule the other way round: a handle tears down what it set up. `create` + `mount`
/// in one handle, dropped: unmounted, its tmpfs gone (the copy backend folds the writes
/// into a disk upper first). `open` of an unmounted workspace + `mount`, dropped: its own
/// mount goes, the adopted tmpfs stays with the writes. The live sandbox never notices.
fn lib_own_handle_tears_down(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let mount = |ws: &mut Workspace| -> PathBuf {
        if v.copy {
            ws.mount(CopyBackend::new()).unwrap().to_path_buf()
        } else {
            ws.mount(KernelOverlay::new()).unwrap().to_path_buf()
        }
    };
    let own = fx.base.join("own");
    {
        let cache = RootfsCache::open(&fx.ctl.cache, CacheOptions::default()).unwrap();
        let rootfs = cache.ensure(&OciLayout::open(&fx.layout).unwrap(), "two").unwrap();
        let mut ws = Workspace::create(&own, rootfs, v.options()).unwrap();
        let view = mount(&mut ws);
        fs::write(view.join("etc/own"), b"own handle\n").unwrap();
        assert_eq!(is_mount_point(&view).unwrap(), !v.copy);
        drop(ws);
    }
    assert!(!is_mount_point(&own.join("rootfs")).unwrap(), "dropping its own handle left the view mounted");
    if v.tmpfs {
        assert!(!is_mount_point(&own.join("mem")).unwrap(), "dropping its own handle left its tmpfs mounted");
    } else {
        assert_eq!(fs::read(own.join("upper/etc/own")).unwrap(), b"own handle\n", "the writes did not reach the upper");
        assert!(!own.join("work/rootfs-cache-copy").exists(), "the copy backend still counts as mounted");
    }
    assert!(mounts_under(&own).is_empty(), "{:?}", mounts_under(&own));
    fs::remove_dir_all(&own).unwrap();
    live.check("dropping a handle that created and mounted its own workspace");

    // Adopted tmpfs, own mount.
    let own2 = fx.base.join("own2");
    let mut args = vec!["create"];
    args.extend(v.create_flags(false));
    let two = fx.image("two");
    args.extend([two.as_str(), s(&own2)]);
    fx.ctl.cached(&args);
    let mut ws = Workspace::open(&own2).unwrap();
    assert!(!ws.is_mounted());
    let view = mount(&mut ws);
    fs::write(view.join("etc/own2"), b"own mount, adopted upper\n").unwrap();
    let upper = ws.upper().to_path_buf();
    drop(ws);
    assert!(!is_mount_point(&view).unwrap(), "dropping the handle left the view it mounted");
    if v.tmpfs {
        assert!(is_tmpfs_mount(&own2.join("mem")), "dropping the handle unmounted the tmpfs it only adopted");
    }
    assert_eq!(fs::read(upper.join("etc/own2")).unwrap(), b"own mount, adopted upper\n");
    fx.ctl.cached(&["destroy", s(&own2)]);
    assert!(!own2.exists());
    live.check("`open` + `mount` + drop of another workspace");
    live.finish();
}
