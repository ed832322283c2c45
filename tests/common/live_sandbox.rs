//! The live-sandbox fixture of `tests/nothing_lost.rs` (moved here unchanged so that
//! `tests/redteam_nothing_lost.rs` can reuse it): an OCI layout, a cache, live sandboxes
//! made with `rootfsctl`, and [`Live::check`], the invariants no fault may break.
//! Included with `#[path = "common/live_sandbox.rs"] mod live_sandbox;` next to
//! `mod support;`, `#[path = "common/rootfsctl.rs"] mod rootfsctl;` and
//! `#[path = "common/scratch_ns.rs"] mod scratch_ns;`.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rootfs_cache::{WorkspaceOptions, is_mount_point};
use serde_json::{Value, json};

use crate::rootfsctl::{self, Ctl, kv, s};
use crate::scratch_ns;
use crate::support::{self, Cmp, Ent, Fmt, Node};

pub type Snap = BTreeMap<Vec<u8>, Node>;

// ---------------------------------------------------------------------------------------
// Variants

#[derive(Clone, Copy, Debug)]
pub struct Variant {
    /// `create --tmpfs`: the upper in `WS/mem`.
    pub tmpfs: bool,
    /// `mount --backend copy` (else `kernel`).
    pub copy: bool,
}

impl Variant {
    pub fn backend(self) -> &'static str {
        if self.copy { "copy" } else { "kernel" }
    }

    /// `--tmpfs SIZE` for a `create` of this variant.
    pub fn create_flags(self, big: bool) -> Vec<&'static str> {
        match (self.tmpfs, big) {
            (false, _) => vec![],
            (true, false) => vec!["--tmpfs", "64M"],
            (true, true) => vec!["--tmpfs", "512M"],
        }
    }

    pub fn options(self) -> WorkspaceOptions {
        if self.tmpfs { WorkspaceOptions::tmpfs(64 << 20) } else { WorkspaceOptions::default() }
    }
}

// ---------------------------------------------------------------------------------------
// The image: an OCI layout written here

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn base_layer() -> Vec<Ent> {
    vec![
        Ent::dir("etc"),
        Ent::file("etc/hostname", "base\n"),
        Ent::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n").xattr("user.origin", "base layer"),
        Ent::file("etc/gone", "deleted by the second layer\n"),
        Ent::dir("usr"),
        Ent::dir("usr/bin"),
        Ent::file("usr/bin/tool", support::pseudo_random(1, 70_000)).mode(0o755),
        Ent::symlink("bin", "usr/bin"),
        Ent::dir("var"),
        Ent::dir("var/lib"),
        Ent::dir("var/lib/app").mode(0o750).owner(1000, 1000),
        Ent::file("var/lib/app/state", "old state\n").mode(0o640).owner(1000, 1000),
        Ent::file("doomed", "the sandbox deletes this\n"),
        Ent::dir("srv"),
    ]
}

pub fn top_layer() -> Vec<Ent> {
    let t = support::DEFAULT_MTIME + 100;
    vec![
        Ent::dir("etc").mtime(t, 0),
        Ent::whiteout("etc/gone"),
        Ent::file("etc/hostname", "two\n").mtime(t, 5),
        Ent::dir("opt").mtime(t, 0),
        Ent::dir("opt/new").mtime(t, 0),
        Ent::file("opt/new/readme", "added by the second layer\n").mtime(t, 0),
        Ent::dir("var").mtime(t, 0),
        Ent::dir("var/lib").mtime(t, 0),
        Ent::dir("var/lib/app").mode(0o750).owner(1000, 1000).mtime(t, 0),
        Ent::opaque("var/lib/app"),
        Ent::file("var/lib/app/fresh", "replaces the old state\n").owner(1000, 1000),
    ]
}

/// Stores `data` as a blob of `layout`; its descriptor.
pub fn blob(layout: &Path, media_type: &str, data: &[u8]) -> Value {
    let hex = support::sha256_hex(data);
    fs::write(layout.join("blobs/sha256").join(&hex), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// The layout `L` with tags `one` (the base layer, gzip), `two` (base + top, the top one
/// uncompressed) and `extra` (a layer of its own).
pub fn build_layout(l: &Path) -> PathBuf {
    fs::create_dir_all(l.join("blobs/sha256")).unwrap();
    fs::write(l.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let base = blob(l, OCI_GZIP, &support::gzip(&support::tar_of(&base_layer(), Fmt::Pax)));
    let top = blob(l, OCI_TAR, &support::tar_of(&top_layer(), Fmt::Gnu));
    let extra = blob(l, OCI_GZIP, &support::gzip(&support::tar_of(&[Ent::file("extra", "extra\n")], Fmt::Pax)));
    let manifest = |tag: &str, layers: Vec<Value>| {
        let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}});
        let config = blob(l, OCI_CONFIG, &serde_json::to_vec(&config).unwrap());
        let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers});
        let mut d = blob(l, OCI_MANIFEST, &serde_json::to_vec(&m).unwrap());
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        d
    };
    let manifests =
        vec![manifest("one", vec![base.clone()]), manifest("two", vec![base, top]), manifest("extra", vec![extra])];
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    fs::write(l.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    l.to_path_buf()
}

// ---------------------------------------------------------------------------------------
// Small helpers

/// Everything under `root`, and `root` itself as `.`.
pub fn tree(root: &Path) -> Snap {
    let mut t = support::snapshot(root);
    t.insert(b".".to_vec(), support::node(root));
    t
}

pub fn assert_same_tree(what: &str, want: &Snap, got: &Snap) {
    support::assert_no_diffs(what, &support::diff_trees(want, got, &Cmp::strict()));
}

/// Mount points strictly inside `dir`, from this thread's mount table.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let mi = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    let prefix = format!("{}/", s(dir));
    mi.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).map(String::from).collect()
}

/// How many mounts sit exactly on `p` (stacked ones counted), from this thread's mount
/// table.
pub fn mounts_at(p: &Path) -> usize {
    let mi = fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
    mi.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| *m == s(p)).count()
}

/// `umount -l` of every mount on or under `dir`, deepest first: what a failed case left,
/// so that the next ones start clean.
pub fn detach_mounts(dir: &Path) {
    let mut m = mounts_under(dir);
    if mounts_at(dir) > 0 {
        m.push(s(dir).to_string());
    }
    m.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in m {
        let _ = nix::mount::umount2(Path::new(&p), nix::mount::MntFlags::MNT_DETACH);
    }
}

pub fn is_tmpfs_mount(p: &Path) -> bool {
    is_mount_point(p).unwrap()
        && nix::sys::statfs::statfs(p).unwrap().filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
}

pub fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// `tar -tf`: the entry names, or the failure.
pub fn tar_list(p: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("tar").arg("-tf").arg(p).output().unwrap();
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim_end()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect())
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A `Write` that takes `left` bytes, then fails every write.
pub struct FailAfter {
    pub left: usize,
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

/// What the sandbox writes through its merged view.
pub const WRITTEN: &[u8] = b"written by the sandbox\n";
pub const BIG: usize = 200 << 20;

pub fn sandbox_writes(view: &Path, big: bool) {
    let w = |rel: &str, data: &[u8]| fs::write(view.join(rel), data).unwrap();
    w("etc/written", WRITTEN);
    support::chmod(&view.join("etc/written"), 0o640);
    // More than a page: no export fits into a full file system by accident.
    w("etc/blob", &support::pseudo_random(7, 100_000));
    let mut f = fs::OpenOptions::new().append(true).open(view.join("etc/hostname")).unwrap();
    f.write_all(b"+sandbox\n").unwrap();
    drop(f);
    fs::remove_file(view.join("doomed")).unwrap();
    fs::create_dir(view.join("srv/sandbox-dir")).unwrap();
    support::chmod(&view.join("srv/sandbox-dir"), 0o700);
    w("srv/sandbox-dir/f", b"in a new dir\n");
    if big {
        let chunk = support::pseudo_random(9, 1 << 20);
        let mut f = File::create(view.join("big.bin")).unwrap();
        for _ in 0..BIG / chunk.len() {
            f.write_all(&chunk).unwrap();
        }
    }
}

/// The sandbox's writes as the upper holds them once the view is unmounted.
pub fn assert_writes_in_upper(upper: &Path, what: &str) {
    if let Err(e) = writes_in(upper, true) {
        panic!("{what}: {e}");
    }
}

/// Whether the tree at `root` holds every write of [`sandbox_writes`]: a merged view
/// (`upper: false`: the deleted file is absent), or an upper (`upper: true`: the deleted
/// file is a whiteout). The first write missing, if one is.
pub fn writes_in(root: &Path, upper: bool) -> Result<(), String> {
    let where_ = if upper { "upper" } else { "view" };
    let read = |rel: &str| fs::read(root.join(rel)).map_err(|e| format!("{rel} in the {where_}: {e}"));
    if read("etc/written")? != WRITTEN {
        return Err(format!("etc/written in the {where_} lost its contents"));
    }
    if read("etc/blob")? != support::pseudo_random(7, 100_000) {
        return Err(format!("etc/blob in the {where_} lost its contents"));
    }
    // Both images have an /etc/hostname of their own; the sandbox appended to it.
    if !read("etc/hostname")?.ends_with(b"\n+sandbox\n") {
        return Err(format!("etc/hostname in the {where_} lost the append"));
    }
    if read("srv/sandbox-dir/f")? != b"in a new dir\n" {
        return Err(format!("srv/sandbox-dir/f in the {where_} lost its contents"));
    }
    match (upper, fs::symlink_metadata(root.join("doomed"))) {
        (true, Ok(m)) if m.file_type().is_char_device() && m.rdev() == 0 => Ok(()),
        (true, Ok(_)) => Err("doomed is not a whiteout in the upper".into()),
        (true, Err(e)) => Err(format!("no whiteout for doomed in the upper: {e}")),
        (false, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        (false, _) => Err("doomed, deleted by the sandbox, is back in the view".into()),
    }
}

// ---------------------------------------------------------------------------------------
// The fixture

pub struct Fx {
    pub v: Variant,
    pub base: PathBuf,
    pub layout: PathBuf,
    pub ctl: Ctl,
    /// Detached (with everything below it) before the directory is removed.
    pub _scratch: scratch_ns::Mounted,
    pub _tmp: tempfile::TempDir,
}

/// A private mount namespace, a scratch tmpfs of `size`, the layout and an empty cache
/// dir; `None` (skipped) without root or `tar`.
pub fn setup(v: Variant, size: &str) -> Option<Fx> {
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
pub struct Sandbox {
    pub ws: PathBuf,
    pub view: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub tmpfs: bool,
    pub copy: bool,
    pub lowers: Vec<PathBuf>,
    pub view_before: Snap,
    pub upper_before: Snap,
    pub description: Vec<u8>,
}

/// The cache's state that no fault may change.
pub struct CacheState {
    pub layers: BTreeMap<String, Snap>,
    pub leases: BTreeSet<String>,
}

impl Fx {
    pub fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", s(&self.layout))
    }

    /// `ensure` (the lowers, top first), `create`, `mount`, writes through the view.
    pub fn sandbox(&self, name: &str, tag: &str, big: bool) -> Sandbox {
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

    pub fn cache_state(&self) -> CacheState {
        let layers_dir = self.ctl.cache.join("layers");
        let layers =
            names(&layers_dir).into_iter().map(|h| (h.clone(), tree(&layers_dir.join(h).join("fs")))).collect();
        CacheState { layers, leases: names(&self.ctl.cache.join("leases")) }
    }

    /// The sandboxes are live from here on; the cache as it is now is the baseline. (The
    /// first check also shows that walking the trees changes nothing by itself.)
    pub fn live(&self, sandboxes: Vec<Sandbox>) -> Live<'_> {
        let live = Live { fx: self, sbs: sandboxes, cache: self.cache_state(), format: RefCell::new(Vec::new()) };
        live.check("right after setup");
        live
    }
}

/// The live sandboxes of a test, the cache baseline and the `rootfsctl` output problems
/// seen so far.
pub struct Live<'a> {
    pub fx: &'a Fx,
    pub sbs: Vec<Sandbox>,
    pub cache: CacheState,
    /// Failures whose stderr was not exactly one `rootfsctl: ...` line.
    pub format: RefCell<Vec<String>>,
}

impl Live<'_> {
    pub fn ws(&self) -> &Path {
        &self.sbs[0].ws
    }

    pub fn sb(&self) -> &Sandbox {
        &self.sbs[0]
    }

    /// Invariants 1-4 for every live sandbox, after `what`.
    pub fn check(&self, what: &str) {
        self.check_with(what, &BTreeSet::new());
    }

    /// Only what is cheap: the views still mounted, the tmpfs uppers still there (every
    /// problem in one message).
    pub fn check_mounts(&self, what: &str) {
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
    pub fn check_with(&self, what: &str, extra: &BTreeSet<String>) {
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
    pub fn fault_with(&self, cached: bool, args: &[&str], code: i32) -> Output {
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

    pub fn fault(&self, args: &[&str], code: i32) -> Output {
        self.fault_with(false, args, code)
    }

    pub fn fault_c(&self, args: &[&str], code: i32) -> Output {
        self.fault_with(true, args, code)
    }

    /// Invariant 5: unmount folds the writes, destroy, no lease, no mount, gc empties.
    pub fn finish(self) {
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
