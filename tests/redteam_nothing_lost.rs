//! Red team of issue 13, "Nothing lost" (DESIGN rules 4, 8, 9 and 11): attacks on a live
//! sandbox and on the shared cache through `rootfsctl` and the library, on the fixture
//! of `tests/nothing_lost.rs` (`tests/common/live_sandbox.rs`: a layout `L`, a cache `C`,
//! a live sandbox `WS` made by `rootfsctl create` + `mount` with writes through its view,
//! and [`Live::check`]: view, upper, description, every cache layer (strictly: xattrs,
//! file and directory mtimes) and the persisted leases unchanged).
//!
//! Each test either pins a finding (it fails until the library or `rootfsctl` is fixed)
//! or an attack that held up (a regression test). Tests are named after the attack;
//! the variant suffix is the sandbox's upper (disk/tmpfs) × backend (kernel/copy).
//! Where a command could reasonably either refuse or succeed, the test accepts both and
//! checks what matters afterwards (nothing lost, no lease leaked, no mount left).
//!
//! Needs root and `tar` (skipped otherwise, a failure under `CI=1`).

#[path = "common/live_sandbox.rs"]
mod live_sandbox;
#[path = "common/rootfsctl.rs"]
mod rootfsctl;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use live_sandbox::*;
use rootfs_cache::{
    CopyBackend, Error, KernelOverlay, MountBackend, OverlaySpec, Workspace, WorkspaceOptions, is_mount_point,
};
use rootfsctl::s;
use support::{Ent, Fmt};

/// `mod NAME { VARIANT... }`: one `#[test]` per listed variant (`disk_kernel`,
/// `tmpfs_kernel`, `disk_copy`, `tmpfs_copy`), each calling `NAME(variant)`.
macro_rules! variants {
    ($($name:ident: [$($v:ident),+ $(,)?]);+ $(;)?) => {$(
        mod $name {
            $(
                #[test]
                fn $v() {
                    super::$name(super::variant(stringify!($v)))
                }
            )+
        }
    )+};
}

fn variant(name: &str) -> Variant {
    Variant { tmpfs: name.starts_with("tmpfs"), copy: name.ends_with("copy") }
}

variants! {
    // Findings.
    cli_workspace_inside_the_cache_dir: [disk_kernel, tmpfs_kernel, disk_copy];
    cli_convert_a_cache_entry: [disk_kernel, tmpfs_copy];
    cli_convert_the_cache_or_its_layers_dir: [disk_kernel];
    cli_convert_a_live_workspace_dir: [disk_kernel, tmpfs_kernel, disk_copy, tmpfs_copy];
    lib_apply_into_a_lower_holding_a_cache_layer: [disk_kernel, disk_copy];
    lib_overlay_upper_holding_a_cache_layer: [disk_kernel, disk_copy];
    cli_export_into_a_cache_layer: [disk_kernel, tmpfs_kernel, disk_copy, tmpfs_copy];
    lib_checkpoint_into_a_cache_layer: [disk_kernel, tmpfs_kernel];
    cli_export_into_the_live_workspace: [disk_kernel, tmpfs_kernel, disk_copy, tmpfs_copy];
    lib_checkpoint_over_the_description: [disk_kernel, tmpfs_kernel];
    cli_unpack_into_a_cache_layer: [disk_kernel];
    lib_unpack_into_a_cache_entry: [disk_kernel];
    cli_create_on_a_full_filesystem: [disk_kernel, tmpfs_kernel];
    cli_mount_and_unmount_on_a_full_filesystem: [disk_kernel];
    cli_destroy_through_a_symlinked_ws_dir: [disk_kernel, tmpfs_kernel];
    cli_lease_follows_the_workspace_not_its_spelling: [disk_kernel];
    cli_destroy_with_another_cache: [disk_kernel];
    cli_destroy_after_the_tmpfs_is_gone: [tmpfs_kernel];
    lib_failed_create_keeps_what_was_there: [disk_kernel];
    lib_failed_restore_keeps_what_was_there: [disk_kernel, tmpfs_kernel];
    cli_destroy_and_detach_follow_no_symlink_into_a_cache_layer: [disk_kernel];
    cli_failed_destroy_keeps_the_tmpfs_upper: [tmpfs_kernel];
    cli_symlinked_workspace_dirs_reach_no_other_sandbox: [disk_kernel, tmpfs_kernel];
    cli_detach_keeps_the_sandbox_submounts: [disk_kernel, tmpfs_kernel];
    cli_apply_keeps_the_sandbox_submounts: [disk_kernel];
    lib_failed_reset_keeps_the_sandbox_submounts: [disk_kernel];
    cli_create_inside_a_live_workspace: [disk_kernel, tmpfs_kernel, disk_copy, tmpfs_copy];
    lib_mount_rechecks_a_swapped_upper: [disk_kernel, disk_copy];
    // Attacks that held up.
    held_cli_odd_names: [tmpfs_kernel, disk_copy];
    held_cli_relative_and_dotted_spellings: [disk_kernel];
    held_cli_apply_converted_lower_symlinked_to_a_cache_layer: [disk_kernel, disk_copy];
    held_cli_edited_description: [disk_kernel, tmpfs_kernel];
    held_cli_copy_mounted_with_a_mount_inside: [disk_copy, tmpfs_copy];
    held_cli_import_from_inside_a_live_workspace: [disk_kernel, tmpfs_copy];
    held_lib_unpack_and_apply_over_a_hardlink_farm_of_a_layer: [disk_kernel];
    held_lib_failed_reset_with_a_mount_in_the_upper: [disk_kernel, tmpfs_kernel];
    held_lib_restore_failing_midway_leaves_nothing: [disk_kernel, tmpfs_kernel];
    held_cli_detach_out_of_space_rolls_back: [tmpfs_kernel];
    held_cli_workspace_dir_is_the_view_or_the_tmpfs: [disk_kernel, tmpfs_kernel];
    held_cli_unpack_into_an_existing_layer_however_named: [disk_kernel];
}

// ---------------------------------------------------------------------------------------
// Helpers

/// `rootfsctl create [--tmpfs 64M] L:TAG DIR` with cache `C`, however it ends.
fn create_output(fx: &Fx, tag: &str, dir: &Path) -> Output {
    let image = fx.image(tag);
    let mut args = vec!["create"];
    args.extend(fx.v.create_flags(false));
    args.extend([image.as_str(), s(dir)]);
    fx.ctl.cached_output(&args)
}

/// `rootfsctl create ...` that must succeed.
fn create(fx: &Fx, tag: &str, dir: &Path) {
    let out = create_output(fx, tag, dir);
    assert!(out.status.success(), "create {}: {}", dir.display(), stderr(&out));
}

/// `rootfsctl mount --backend VARIANT DIR`: the view.
fn mount(fx: &Fx, dir: &Path) -> PathBuf {
    PathBuf::from(fx.ctl.run(&["mount", "--backend", fx.v.backend(), s(dir)]).trim_end())
}

/// The workspace's own upper (disk or tmpfs).
fn upper_of(fx: &Fx, dir: &Path) -> PathBuf {
    if fx.v.tmpfs { dir.join("mem/upper") } else { dir.join("upper") }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim_end().to_string()
}

fn leases(fx: &Fx) -> BTreeSet<String> {
    names(&fx.ctl.cache.join("leases"))
}

/// The entry dir (`C/layers/<hex>`) of a lower (`C/layers/<hex>/fs`).
fn entry_of(lower: &Path) -> PathBuf {
    lower.parent().unwrap().to_path_buf()
}

/// Fills the file system of `dir` until `ENOSPC`.
fn fill(dir: &Path) {
    let mut f = File::create(dir.join("fill")).unwrap();
    let chunk = vec![0x5a; 64 << 10];
    let e = loop {
        if let Err(e) = f.write_all(&chunk) {
            break e;
        }
    };
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "filling {}: {e}", dir.display());
}

fn tar_file(path: &Path, entries: &[Ent]) -> PathBuf {
    fs::write(path, support::tar_of(entries, Fmt::Pax)).unwrap();
    path.to_path_buf()
}

/// Mounts a small tmpfs at `at` holding `precious` (a runtime's `/tmp` or `/dev/shm`).
fn submount(at: &Path) -> scratch_ns::Mounted {
    let m = scratch_ns::tmpfs(at, "size=1m,mode=0755");
    fs::write(at.join("precious"), b"in the sandbox's own tmpfs\n").unwrap();
    m
}

/// A second live workspace `ws2` (image `two`, a write in its view) with a tmpfs of the
/// runtime's mounted at `/srv` inside the view: (ws2, its view, the submount, its guard).
fn ws2_with_a_submount(fx: &Fx) -> (PathBuf, PathBuf, PathBuf, scratch_ns::Mounted) {
    let ws2 = fx.base.join("ws2");
    create(fx, "two", &ws2);
    let view = mount(fx, &ws2);
    fs::write(view.join("etc/written"), b"x\n").unwrap();
    let srv = view.join("srv");
    let m = submount(&srv);
    (ws2, view, srv, m)
}

fn submount_intact(at: &Path) -> Result<(), String> {
    if !is_mount_point(at).unwrap() {
        return Err(format!("{} is no longer a mount point", at.display()));
    }
    match fs::read(at.join("precious")) {
        Ok(b) if b == b"in the sandbox's own tmpfs\n" => Ok(()),
        r => Err(format!("{}/precious: {r:?}", at.display())),
    }
}

fn mount_with(v: Variant, ws: &mut Workspace) -> PathBuf {
    if v.copy {
        ws.mount(CopyBackend::new()).unwrap().to_path_buf()
    } else {
        ws.mount(KernelOverlay::new()).unwrap().to_path_buf()
    }
}

/// `rootfsctl unmount` + `--cache C destroy`, that must succeed.
fn destroy(fx: &Fx, dir: &Path) {
    fx.ctl.run(&["unmount", s(dir)]);
    fx.ctl.cached(&["destroy", s(dir)]);
}

// ---------------------------------------------------------------------------------------
// Findings: the cache's own directories

/// A workspace made inside the cache dir (`C/tmp/ws`, `C/trash/ws`, `C/layers/ws`, or
/// `C/tmp` itself) is accepted; the next open of the cache (any `rootfsctl --cache C`
/// command) empties `tmp/`/`trash/` and moves unknown `layers/` entries to the trash,
/// deleting the live sandbox's upper and, through its mounts, its view. Either `create`
/// refuses such a directory, or the sandbox survives the cache's housekeeping.
fn cli_workspace_inside_the_cache_dir(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    for sub in ["tmp/ws", "trash/ws", "layers/ws", "tmp"] {
        let dir = fx.ctl.cache.join(sub);
        let before = leases(&fx);
        let out = create_output(&fx, "two", &dir);
        if !out.status.success() {
            live.check(&format!("a refused `create L:two C/{sub}`"));
            assert_eq!(out.status.code(), Some(1), "create C/{sub}: {}", stderr(&out));
            assert_eq!(leases(&fx), before, "a refused `create C/{sub}` left a lease");
            continue;
        }
        let view = mount(&fx, &dir);
        fs::write(view.join("etc/precious"), b"the sandbox's work\n").unwrap();
        let ls = fx.ctl.cached_output(&["ls"]);
        // Read from the upper: the view's dentry cache may still show a deleted file.
        let upper = upper_of(&fx, &dir);
        let kept = fs::read(upper.join("etc/precious"));
        let desc = dir.join("workspace.json").exists();
        assert!(
            kept.as_deref().is_ok_and(|b| b == b"the sandbox's work\n") && desc,
            "`rootfsctl --cache C create L:two C/{sub}` was accepted (a workspace inside the cache dir); after \
             `mount` and a write, the next cache open (`rootfsctl --cache C ls`: {}, {:?}) deleted the live \
             sandbox's writes: {}/etc/precious: {:?}; workspace.json exists: {desc}; view mounted: {}",
            ls.status,
            stderr(&ls),
            upper.display(),
            kept.map(drop),
            is_mount_point(&view).unwrap()
        );
        destroy(&fx, &dir);
    }
    live.check("workspaces inside the cache dir");
    live.finish();
}

/// `rootfsctl convert C/layers/<hex>` (a cache entry: the layer's `fs/` and `meta`) is
/// accepted: it renames the entry to `<hex>.lower` and mounts an overlay over it, and the
/// next cache open trashes `<hex>.lower` (not a digest) and deletes it: the layer the
/// live sandbox runs on is emptied under it (its `/etc/hostname` turns into the base
/// layer's). `convert` must refuse a directory holding a cache layer.
fn cli_convert_a_cache_entry(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let entry = entry_of(&live.sb().lowers[0]);
    let out = fx.ctl.output(&["convert", "--backend", v.backend(), s(&entry)]);
    let ls = fx.ctl.cached_output(&["ls"]);
    live.check(&format!(
        "`rootfsctl convert {}` ({}, {:?}) then `rootfsctl --cache C ls` ({})",
        entry.display(),
        out.status,
        stderr(&out),
        ls.status
    ));
    assert_eq!(out.status.code(), Some(1), "`convert {}` of a cache entry: {}", entry.display(), stderr(&out));
    live.finish();
}

/// `rootfsctl convert C` and `convert C/layers` (directories holding every layer) are
/// accepted: the cache moves to `C.lower` under an overlay (its LOCK copied up, so two
/// processes can each own "the" cache), and an `apply` would then write into
/// `C.lower/layers/*/fs`. `convert` must refuse them.
fn cli_convert_the_cache_or_its_layers_dir(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    for p in [fx.ctl.cache.clone(), fx.ctl.cache.join("layers")] {
        let out = fx.ctl.output(&["convert", s(&p)]);
        let converted = is_mount_point(&p).unwrap();
        if converted {
            // Put it back before anything else looks at the cache.
            fx.ctl.run(&["destroy", s(&p)]);
        }
        live.check(&format!("`rootfsctl convert {}`", p.display()));
        assert_eq!(
            out.status.code(),
            Some(1),
            "`rootfsctl convert {}` (holding every cache layer) was accepted: {} (mounted an overlay over it: {converted})",
            p.display(),
            out.status
        );
    }
    live.finish();
}

/// `rootfsctl convert WS` of the live workspace's own directory is accepted: `WS` (with
/// the mounted view and tmpfs inside) is renamed to `WS.lower` and an overlay is mounted
/// at `WS`, so `WS/rootfs` no longer is the sandbox's view, `WS/mem` no longer its
/// tmpfs, and `rootfsctl` can neither unmount nor destroy it. `convert` must refuse a
/// directory with anything mounted inside (rule 8).
fn cli_convert_a_live_workspace_dir(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let out = fx.ctl.output(&["convert", ws]);
    let converted = is_mount_point(live.ws()).unwrap();
    let mounts = mounts_under(&fx.base);
    if converted {
        // Undo what can be undone, so that the message below is the first failure.
        let _ = nix::mount::umount2(live.ws(), nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(live.ws());
        let mut lower = live.ws().as_os_str().to_owned();
        lower.push(".lower");
        let _ = fs::rename(PathBuf::from(lower), live.ws());
    }
    assert!(
        !converted && out.status.code() == Some(1),
        "`rootfsctl convert {ws}` of a live workspace: {} {:?}; it mounted an overlay over the workspace dir and \
         moved the live view and tmpfs away (mounts: {mounts:?})",
        out.status,
        stderr(&out)
    );
    live.check(&format!("`rootfsctl convert {ws}`"));
    live.finish();
}

/// A workspace over a plain lower that *holds* a cache layer (`C/layers/<hex>`, with
/// `fs/` and `meta` in it): the sandbox writes `fs/etc/injected`, `apply` flattens it into
/// the real layer. Apply must refuse a lower that is, lies in, or holds a cache layer.
fn lib_apply_into_a_lower_holding_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let entry = entry_of(live.sb().lowers.last().unwrap());
    let dir = fx.base.join("plain");
    let mut ws = Workspace::create(&dir, vec![entry.clone()], v.options()).unwrap();
    let view = mount_with(v, &mut ws);
    fs::write(view.join("fs/etc/injected"), b"applied into a cache layer\n").unwrap();
    fs::remove_file(view.join("fs/doomed")).unwrap();
    let r = ws.apply();
    live.check(&format!("`apply` of a workspace over {} (a cache entry): {r:?}", entry.display()));
    let e = r.expect_err("apply into a cache entry");
    assert!(matches!(e, Error::ImmutableLayer { .. }), "{e:?}");
    ws.destroy().unwrap();
    live.finish();
}

/// `OverlayMount`/`MountBackend::mount` with the upper at a cache entry
/// (`C/layers/<hex>`, holding the layer's `fs/` and `meta`): the sandbox's writes under
/// `/fs` go straight into the layer (kernel), or at unmount (copy). Must be refused.
fn lib_overlay_upper_holding_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let entry = entry_of(live.sb().lowers.last().unwrap());
    let lower = fx.base.join("plain-lower");
    fs::create_dir_all(lower.join("data")).unwrap();
    for d in ["w", "t"] {
        fs::create_dir(fx.base.join(d)).unwrap();
    }
    let spec = OverlaySpec::new([lower], &entry, fx.base.join("w"), fx.base.join("t"));
    let backend: Box<dyn MountBackend> =
        if v.copy { Box::new(CopyBackend::new()) } else { Box::new(KernelOverlay::new()) };
    let r = backend.mount(&spec);
    if r.is_ok() {
        let w = fs::write(spec.target.join("fs/etc/injected"), b"written into a cache layer\n");
        backend.unmount(&spec).unwrap();
        live.check(&format!("a mount with upper {} (a cache entry), and a write under /fs ({w:?})", entry.display()));
    }
    live.check(&format!("a mount with upper {}", entry.display()));
    let e = r.expect_err("upper at a cache entry");
    assert!(matches!(e, Error::ImmutableLayer { .. }), "{e:?}");
    live.finish();
}

// ---------------------------------------------------------------------------------------
// Findings: outputs written where they must not be

/// `rootfsctl diff export WS OUT` with `OUT` in a cache layer (a new name, a file of the
/// layer the sandbox sees, through a symlink): the tar lands in (or replaces a file of)
/// the layer; with the copy backend the export is refused, but only after its temporary
/// file was created and deleted in the layer (its directory's mtime changes).
fn cli_export_into_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let base_fs = live.sb().lowers.last().unwrap().clone();
    let link = fx.base.join("layer-link");
    symlink(&base_fs, &link).unwrap();
    for out in [base_fs.join("export.tar"), base_fs.join("usr/bin/tool"), link.join("srv/x.tar")] {
        for flag in [None, Some("--aligned")] {
            let mut args = vec!["diff", "export", ws, s(&out)];
            args.extend(flag);
            live.fault(&args, 1);
        }
    }
    live.finish();
}

/// `Workspace::checkpoint` into a cache layer: written (rule 4 names no exception).
fn lib_checkpoint_into_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let base_fs = live.sb().lowers.last().unwrap().clone();
    for out in [base_fs.join("ckpt.tar"), base_fs.join("usr/bin/tool")] {
        let ws = Workspace::open(live.ws()).unwrap();
        let r = ws.checkpoint(&out);
        drop(ws);
        live.check(&format!("`checkpoint({})`: {r:?}", out.display()));
        let e = r.expect_err("checkpoint into a cache layer");
        assert!(matches!(e, Error::ImmutableLayer { .. } | Error::Unsupported { .. }), "{e:?}");
    }
    live.finish();
}

/// `rootfsctl diff export WS OUT` with `OUT` in the live sandbox's upper or merged view:
/// the tar becomes a file of the sandbox (kernel backend), or the refused export (copy
/// backend) still created and deleted its temporary file there, changing the upper's or
/// the view's directory mtime. (`Workspace::checkpoint` refuses both places.)
fn cli_export_into_the_live_workspace(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = s(live.ws());
    let sb = live.sb();
    for out in [sb.upper.join("x.tar"), sb.view.join("x.tar"), sb.view.join("srv/sandbox-dir/y.tar")] {
        live.fault(&["diff", "export", ws, s(&out)], 1);
    }
    live.finish();
}

/// `Workspace::checkpoint(WS/workspace.json)`: the description becomes a tar, and no
/// `rootfsctl` command (nor `Workspace::open`) can reach the workspace any more.
fn lib_checkpoint_over_the_description(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws = Workspace::open(live.ws()).unwrap();
    let r = ws.checkpoint(live.ws().join("workspace.json"));
    drop(ws);
    live.check(&format!("`checkpoint(WS/workspace.json)`: {r:?}"));
    assert!(r.is_err(), "checkpoint over the workspace's own description succeeded");
    live.finish();
}

/// `rootfsctl unpack` into a cache layer, however named: a missing `DEST_DIR` inside a
/// layer is created (`create_dir_all`) before the library refuses; a cache entry
/// (`C/layers/<hex>`) or the cache root is accepted and the archive's `fs/...` (or
/// `layers/<hex>/fs/...`) entries are written into the layer; with `--apply`, a
/// whiteout deletes from it.
fn cli_unpack_into_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let top = live.sb().lowers[0].clone();
    let entry = entry_of(&top);
    let hex = entry.file_name().unwrap().to_str().unwrap().to_string();
    let plain = tar_file(&fx.base.join("plain.tar"), &[Ent::file("e", "e\n")]);
    let into_entry = tar_file(
        &fx.base.join("entry.tar"),
        &[Ent::dir("fs"), Ent::dir("fs/etc"), Ent::file("fs/etc/injected", "into a cache layer\n")],
    );
    let into_root = tar_file(
        &fx.base.join("root.tar"),
        &[
            Ent::dir("layers"),
            Ent::dir(&format!("layers/{hex}")),
            Ent::dir(&format!("layers/{hex}/fs")),
            Ent::dir(&format!("layers/{hex}/fs/etc")),
            Ent::file(&format!("layers/{hex}/fs/etc/injected"), "into a cache layer\n"),
        ],
    );
    let whiteout =
        tar_file(&fx.base.join("wh.tar"), &[Ent::dir("fs"), Ent::dir("fs/etc"), Ent::whiteout("fs/etc/hostname")]);
    let cases: Vec<Vec<String>> = vec![
        vec!["unpack".into(), s(&plain).into(), s(&top.join("newdir")).into()],
        vec!["unpack".into(), s(&plain).into(), s(&top.join("etc/newdir/deeper")).into()],
        vec!["unpack".into(), s(&into_entry).into(), s(&entry).into()],
        vec!["unpack".into(), s(&into_root).into(), s(&fx.ctl.cache).into()],
        vec!["unpack".into(), "--apply".into(), s(&whiteout).into(), s(&entry).into()],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        live.fault(&args, 1);
    }
    live.finish();
}

/// `rootfs_cache::unpack` into a cache entry (`C/layers/<hex>`, not its `fs/`): the
/// archive's `fs/...` entries land in the layer. Must be refused like `fs/` itself.
fn lib_unpack_into_a_cache_entry(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let entry = entry_of(&live.sb().lowers[0]);
    let tar = support::tar_of(
        &[Ent::dir("fs"), Ent::dir("fs/etc"), Ent::file("fs/etc/injected", "into a cache layer\n")],
        Fmt::Pax,
    );
    let r = rootfs_cache::unpack(&tar[..], &entry, &rootfs_cache::UnpackOptions::default());
    live.check(&format!("`unpack(_, {})`: {:?}", entry.display(), r.as_ref().map(drop)));
    let e = r.expect_err("unpack into a cache entry");
    assert!(matches!(e, Error::ImmutableLayer { .. }), "{e:?}");
    live.finish();
}

// ---------------------------------------------------------------------------------------
// Findings: half-done commands

/// `rootfsctl create` on a full file system fails writing `workspace.json` (after
/// `Workspace::create` succeeded): `rootfsctl` gives the lease back, but `WS2/rootfs`,
/// `WS2/upper`/`work` or the mounted tmpfs `WS2/mem`, and `workspace.json.tmp` stay, and
/// the tmpfs then blocks every later `create` there ("already a mount point").
fn cli_create_on_a_full_filesystem(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let full = fx.base.join("full");
    let small = scratch_ns::tmpfs(&full, "size=1m,mode=0755");
    fill(&full);
    let ws2 = full.join("ws2");
    let out = create_output(&fx, "two", &ws2);
    live.check("`create` on a full file system");
    if out.status.success() {
        destroy(&fx, &ws2);
    } else {
        let left = if ws2.exists() { names(&ws2) } else { BTreeSet::new() };
        assert!(
            !ws2.exists() && mounts_under(&full).is_empty(),
            "a failed `create` ({:?}) left {} with {left:?}, mounts {:?}",
            stderr(&out),
            ws2.display(),
            mounts_under(&full)
        );
    }
    assert_eq!(leases(&fx), live.cache.leases, "leases after `create` on a full file system");
    drop(small);
    live.finish();
}

/// `rootfsctl mount` on a full file system mounts, prints the view, then fails writing
/// `workspace.json` and exits 1 with the view left mounted; `unmount` there exits 1 with
/// the view unmounted. A failing command must not have done its job half.
fn cli_mount_and_unmount_on_a_full_filesystem(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let full = fx.base.join("full");
    let small = scratch_ns::tmpfs(&full, "size=1m,mode=0755");
    let ws2 = full.join("ws2");
    create(&fx, "two", &ws2);
    fill(&full);
    let view = ws2.join("rootfs");
    let out = fx.ctl.output(&["mount", "--backend", v.backend(), s(&ws2)]);
    let mounted = is_mount_point(&view).unwrap();
    assert_eq!(
        out.status.success(),
        mounted,
        "`rootfsctl mount` on a full file system: {} {:?}, view mounted: {mounted}",
        out.status,
        stderr(&out)
    );
    if !mounted {
        // Refused cleanly: mount it with room to spare, then fill the file system again.
        fs::remove_file(full.join("fill")).unwrap();
        fx.ctl.run(&["mount", "--backend", v.backend(), s(&ws2)]);
        fill(&full);
    }
    let out = fx.ctl.output(&["unmount", s(&ws2)]);
    let mounted = is_mount_point(&view).unwrap();
    assert_eq!(
        out.status.success(),
        !mounted,
        "`rootfsctl unmount` on a full file system: {} {:?}, view still mounted: {mounted}",
        out.status,
        stderr(&out)
    );
    // ws2 (and its lease) go again, with room to spare.
    fs::remove_file(full.join("fill")).unwrap();
    fx.ctl.cached(&["destroy", s(&ws2)]);
    live.check("mount/unmount on a full file system");
    drop(small);
    live.finish();
}

/// `rootfsctl create L:two LINK` (LINK a symlink to an empty dir), then `destroy LINK`:
/// destroy deletes the upper (or unmounts the tmpfs), then fails (`rmdir LINK`: not a
/// directory), writes `workspace.json` back describing a workspace without its writes,
/// keeps the lease, and fails the same way forever.
fn cli_destroy_through_a_symlinked_ws_dir(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let real = fx.base.join("real");
    fs::create_dir(&real).unwrap();
    let link = fx.base.join("link");
    symlink(&real, &link).unwrap();
    create(&fx, "two", &link);
    let view = mount(&fx, &link);
    fs::write(view.join("etc/precious"), b"the sandbox's work\n").unwrap();
    fx.ctl.run(&["unmount", s(&link)]);
    let out = fx.ctl.cached_output(&["destroy", s(&link)]);
    if out.status.success() {
        assert_eq!(leases(&fx), live.cache.leases, "`destroy LINK` succeeded and kept the lease");
        assert!(mounts_under(&real).is_empty(), "`destroy LINK` left mounts {:?}", mounts_under(&real));
    } else {
        let upper = upper_of(&fx, &real);
        let kept = fs::read(upper.join("etc/precious"));
        assert!(
            kept.as_deref().is_ok_and(|b| b == b"the sandbox's work\n"),
            "`rootfsctl --cache C destroy LINK` failed ({}) after deleting the sandbox's writes ({}: {:?}); left \
             in {}: {:?}",
            stderr(&out),
            upper.display(),
            kept.map(drop),
            real.display(),
            names(&real)
        );
        fx.ctl.cached(&["destroy", s(&real)]);
    }
    live.check("`destroy LINK`");
    live.finish();
}

/// The persisted lease is named after the spelling of WS_DIR (its parent canonicalized
/// when it exists, the last component not), so a workspace made through a symlink and
/// destroyed by its real path, or made as `x/../ws3` with `x` missing (`create` then
/// makes `x` and leaves it) and destroyed as `ws3`, keeps its lease for ever: `destroy`
/// succeeds, the image stays pinned, and no later command can name the lease.
fn cli_lease_follows_the_workspace_not_its_spelling(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let real = fx.base.join("real");
    fs::create_dir(&real).unwrap();
    let link = fx.base.join("link");
    symlink(&real, &link).unwrap();
    let dotted = fx.base.join("x/../ws3");
    for (made, destroyed) in [(link.clone(), real.clone()), (dotted, fx.base.join("ws3"))] {
        let out = create_output(&fx, "two", &made);
        if !out.status.success() {
            // Refused cleanly (a `..` after a missing directory cannot be resolved):
            // nothing made, no lease.
            assert!(!destroyed.exists() && leases(&fx) == live.cache.leases, "a refused create left something");
            continue;
        }
        let out = fx.ctl.cached_output(&["destroy", s(&destroyed)]);
        assert!(out.status.success(), "destroy {}: {}", destroyed.display(), stderr(&out));
        assert!(!destroyed.exists(), "destroy left {}", destroyed.display());
        let left: Vec<String> = leases(&fx).difference(&live.cache.leases).cloned().collect();
        assert!(
            left.is_empty(),
            "`create L:two {}` then `destroy {}` (the same workspace) succeeded but leaked the lease {left:?}",
            made.display(),
            destroyed.display()
        );
    }
    assert!(!fx.base.join("x").exists(), "`create L:two {}/x/../ws3` left {}/x behind", s(&fx.base), s(&fx.base));
    live.finish();
}

/// `rootfsctl --cache C2 destroy WS2` (another cache than the one that made WS2):
/// WS2 is destroyed, "its" lease is looked up in C2 (not there: fine), and the real
/// lease in C stays for ever. The workspace could record its cache, or destroy refuse.
fn cli_destroy_with_another_cache(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.base.join("ws2");
    create(&fx, "two", &ws2);
    let c2 = fx.base.join("C2");
    let out = fx.ctl.output(&["--cache", s(&c2), "destroy", s(&ws2)]);
    if ws2.exists() {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        fx.ctl.cached(&["destroy", s(&ws2)]);
    }
    let left: Vec<String> = leases(&fx).difference(&live.cache.leases).cloned().collect();
    assert!(
        left.is_empty(),
        "`rootfsctl --cache C2 destroy WS2` ({}) destroyed a workspace made with cache C and left its lease {left:?} \
         in C",
        out.status
    );
    live.finish();
}

/// A tmpfs workspace whose tmpfs is gone (a reboot, an `umount`): `destroy` fails
/// ("the tmpfs upper is not mounted any more") and `create` there refuses ("still holds
/// its image"): nothing can release its lease or remove it. With nothing left to lose,
/// `destroy` should finish the job.
fn cli_destroy_after_the_tmpfs_is_gone(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.base.join("ws2");
    create(&fx, "two", &ws2);
    nix::mount::umount2(&ws2.join("mem"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let out = fx.ctl.cached_output(&["destroy", s(&ws2)]);
    let left: Vec<String> = leases(&fx).difference(&live.cache.leases).cloned().collect();
    assert!(
        out.status.success() && left.is_empty() && !ws2.exists(),
        "`destroy` of a workspace whose tmpfs is gone: {} {:?}; lease left {left:?}; {} exists: {}",
        out.status,
        stderr(&out),
        ws2.display(),
        ws2.exists()
    );
    live.finish();
}

/// `Workspace::create` over an existing directory whose `work/` holds files fails later
/// (here: its lower does not exist) after emptying `work/`. "A failed create removes what
/// it made; what was there before stays."
fn lib_failed_create_keeps_what_was_there(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let dir = fx.base.join("existing");
    fs::create_dir_all(dir.join("work")).unwrap();
    fs::write(dir.join("work/notes"), b"someone's notes\n").unwrap();
    let before = tree(&dir.join("work"));
    let r = Workspace::create(&dir, vec![fx.base.join("no-such-lower")], v.options());
    let e = r.expect_err("create over a missing lower");
    assert!(dir.join("work").exists(), "a failed `Workspace::create` ({e}) removed {}/work", dir.display());
    assert_same_tree(
        &format!("a failed `Workspace::create` ({e}): {}/work", dir.display()),
        &before,
        &tree(&dir.join("work")),
    );
    live.check("a failed `Workspace::create`");
    live.finish();
}

/// `Workspace::restore` into an existing directory that holds a `rootfs/` (and
/// `skeleton/`) of someone else's, from a damaged checkpoint: create succeeds, the import
/// fails, and the clean-up (`destroy`) deletes those directories too.
fn lib_failed_restore_keeps_what_was_there(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let dir = fx.base.join("existing");
    for d in ["rootfs", "skeleton"] {
        fs::create_dir_all(dir.join(d)).unwrap();
        fs::write(dir.join(d).join("keep"), b"not the crate's\n").unwrap();
    }
    let before: Vec<Snap> = ["rootfs", "skeleton"].iter().map(|d| tree(&dir.join(d))).collect();
    let bad = fx.base.join("damaged.tar");
    fs::write(&bad, &support::tar_of(&[Ent::file("a", "a\n")], Fmt::Pax)[..1000]).unwrap();
    let r = Workspace::restore(&dir, live.sb().lowers.clone(), v.options(), &bad);
    let e = r.expect_err("restore of a damaged checkpoint");
    assert!(dir.exists(), "a failed `Workspace::restore` ({e}) removed {} with what it held", dir.display());
    for (d, before) in ["rootfs", "skeleton"].iter().zip(&before) {
        let p = dir.join(d);
        assert!(p.exists(), "a failed `Workspace::restore` ({e}) removed {}", p.display());
        assert_same_tree(&format!("a failed `Workspace::restore` ({e}): {}", p.display()), before, &tree(&p));
    }
    assert!(mounts_under(&dir).is_empty(), "{:?}", mounts_under(&dir));
    live.check("a failed `Workspace::restore`");
    live.finish();
}

/// `WS2/upper.old`, `WS2/upper.detach` or `WS2/skeleton` a symlink to a cache layer:
/// `open` checks `upper`, `work` and `rootfs` for cache layers but not these, and
/// `destroy` empties them through the symlink (the layer is emptied; then `rmdir` fails),
/// `detach` empties `upper.detach`/`skeleton` and writes stubs into it.
fn cli_destroy_and_detach_follow_no_symlink_into_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let base_fs = live.sb().lowers.last().unwrap().clone();
    for (i, name) in ["upper.old", "upper.detach", "skeleton"].into_iter().enumerate() {
        for cmd in ["destroy", "detach"] {
            let ws2 = fx.base.join(format!("w{i}-{cmd}"));
            create(&fx, "two", &ws2);
            symlink(&base_fs, ws2.join(name)).unwrap();
            let out = fx.ctl.cached_output(&[cmd, s(&ws2)]);
            live.check_with(
                &format!("`rootfsctl {cmd} WS2` with WS2/{name} -> a cache layer ({})", out.status),
                &leases(&fx).difference(&live.cache.leases).cloned().collect::<BTreeSet<_>>(),
            );
            if ws2.exists() {
                let _ = fs::remove_file(ws2.join(name));
                fx.ctl.cached(&["destroy", s(&ws2)]);
            }
        }
    }
    live.finish();
}

/// A workspace WS2 whose own `rootfs`, `upper` or `mem` is a symlink to the live
/// sandbox's (view, disk upper, tmpfs): `open` follows them (it only refuses cache
/// layers), so `unmount WS2` unmounts the live view (`umount2` follows the symlink),
/// `destroy WS2` empties the live upper or unmounts the live tmpfs (its writes are gone).
/// The commands may refuse or succeed; the live sandbox must not notice.
fn cli_symlinked_workspace_dirs_reach_no_other_sandbox(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let sb = live.sb();
    // The one that loses the sandbox's writes first.
    let mut cases = if v.tmpfs {
        vec![("mem", live.ws().join("mem"), "destroy")]
    } else {
        vec![("upper", sb.upper.clone(), "destroy")]
    };
    cases.extend([("rootfs", sb.view.clone(), "unmount"), ("rootfs", sb.view.clone(), "destroy")]);
    for (i, (name, target, cmd)) in cases.into_iter().enumerate() {
        let ws2 = fx.base.join(format!("n{i}"));
        create(&fx, "two", &ws2);
        let own = ws2.join(name);
        if is_mount_point(&own).unwrap() {
            nix::mount::umount2(&own, nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
        fs::remove_dir(&own).unwrap();
        symlink(&target, &own).unwrap();
        let out = fx.ctl.cached_output(&[cmd, s(&ws2)]);
        let extra: BTreeSet<String> = leases(&fx).difference(&live.cache.leases).cloned().collect();
        live.check_with(
            &format!(
                "`rootfsctl {cmd} WS2` with WS2/{name} a symlink to {} ({}, {:?})",
                target.display(),
                out.status,
                stderr(&out)
            ),
            &extra,
        );
        // Clean up WS2 (its own dir back in place).
        if ws2.exists() {
            let _ = fs::remove_file(&own);
            fs::create_dir_all(&own).unwrap();
            let _m = (name == "mem").then(|| scratch_ns::tmpfs(&own, "size=1m"));
            fx.ctl.cached(&["destroy", s(&ws2)]);
        }
    }
    live.finish();
}

/// A tmpfs workspace with a stray file named `skeleton` in its dir: `destroy` unmounts
/// the tmpfs (the writes are gone), then fails emptying `skeleton` ("not a directory"),
/// re-describes the workspace, and every later command fails ("the tmpfs upper is not
/// mounted any more"). A failed destroy must leave the workspace as it was.
fn cli_failed_destroy_keeps_the_tmpfs_upper(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.base.join("ws2");
    create(&fx, "two", &ws2);
    let view = mount(&fx, &ws2);
    fs::write(view.join("etc/precious"), b"the sandbox's work\n").unwrap();
    fs::write(ws2.join("skeleton"), b"a stray file\n").unwrap();
    let out = fx.ctl.cached_output(&["destroy", s(&ws2)]);
    if !out.status.success() {
        let kept = fs::read(ws2.join("mem/upper/etc/precious"));
        assert!(
            is_mount_point(&ws2.join("mem")).unwrap() && kept.as_deref().is_ok_and(|b| b == b"the sandbox's work\n"),
            "`destroy` failed ({:?}) after unmounting the tmpfs upper: the sandbox's writes are gone ({:?}); view \
             mounted: {}",
            stderr(&out),
            kept.map(drop),
            is_mount_point(&view).unwrap()
        );
        fs::remove_file(ws2.join("skeleton")).unwrap();
        fx.ctl.cached(&["destroy", s(&ws2)]);
    }
    assert_eq!(leases(&fx), live.cache.leases);
    live.finish();
}

/// `rootfsctl --cache C detach WS` while the runtime has a tmpfs mounted inside the
/// view (`/srv` here; `/tmp`, `/dev/shm`, `/proc` in practice): detach unmounts the view
/// with `MNT_DETACH` (taking the submount with it) and remounts only the overlay, so the
/// sandbox's tmpfs and its files are gone. "detach remounts what it unmounted." (The copy
/// backend refuses instead: something is mounted inside.)
fn cli_detach_keeps_the_sandbox_submounts(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let (ws2, _view, srv, _m) = ws2_with_a_submount(&fx);
    let out = fx.ctl.cached_output(&["detach", s(&ws2)]);
    let r = submount_intact(&srv);
    assert!(
        r.is_ok(),
        "`rootfsctl --cache C detach WS` ({}, {:?}) with a tmpfs mounted in the view: {}",
        out.status,
        stderr(&out),
        r.unwrap_err()
    );
}

/// `rootfsctl apply DIR` of a `convert`ed, mounted dir with a tmpfs mounted inside:
/// the same as detach (unmount with `MNT_DETACH`, remount only the overlay).
fn cli_apply_keeps_the_sandbox_submounts(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let dir = fx.base.join("app");
    fs::create_dir_all(dir.join("srv")).unwrap();
    fs::write(dir.join("file"), b"original\n").unwrap();
    fx.ctl.run(&["convert", "--backend", v.backend(), s(&dir)]);
    fs::write(dir.join("new"), b"to apply\n").unwrap();
    let srv = dir.join("srv");
    let _m = submount(&srv);
    let out = fx.ctl.output(&["apply", s(&dir)]);
    let r = submount_intact(&srv);
    assert!(r.is_ok(), "`rootfsctl apply DIR` ({}) with a tmpfs mounted in the view: {}", out.status, r.unwrap_err());
}

/// `Workspace::reset` of a live view with a tmpfs mounted in the view and something
/// mounted in the upper: reset unmounts the view (and with it the view's submount),
/// refuses (`AlreadyMounted`: the upper's mount), remounts the overlay only: a failed
/// reset lost the sandbox's tmpfs.
fn lib_failed_reset_keeps_the_sandbox_submounts(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let ws2 = fx.base.join("ws2");
    create(&fx, "two", &ws2);
    let view = mount(&fx, &ws2);
    fs::create_dir(view.join("srv/in-upper")).unwrap();
    let in_upper = upper_of(&fx, &ws2).join("srv/in-upper");
    let _u = scratch_ns::tmpfs(&in_upper, "size=1m");
    let srv = view.join("srv");
    let _m = submount(&srv);
    let mut ws = Workspace::open(&ws2).unwrap();
    let r = ws.reset();
    drop(ws);
    assert!(r.is_err(), "reset with a mount in the upper succeeded");
    let intact = submount_intact(&srv);
    assert!(
        is_mount_point(&view).unwrap() && intact.is_ok(),
        "a failed `reset` ({:?}): view mounted: {}; the view's submount: {intact:?}",
        r.unwrap_err(),
        is_mount_point(&view).unwrap()
    );
}

/// `rootfsctl --cache C create L:two DIR` with DIR the live workspace's upper (disk or
/// tmpfs), its work dir, or (copy backend, where the view is no mount point) its view:
/// accepted, and `upper/`, `work/`, `rootfs/`, `workspace.json` appear in the live
/// sandbox (a kernel view refuses: it is a mount point).
fn cli_create_inside_a_live_workspace(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let two = fx.image("two");
    let sb = live.sb();
    for dir in [sb.upper.clone(), sb.view.clone(), sb.work.clone(), sb.upper.join("srv/sandbox-dir")] {
        for extra in [&[][..], &["--tmpfs", "16M"][..]] {
            let mut args = vec!["create"];
            args.extend(extra);
            args.extend([two.as_str(), s(&dir)]);
            live.fault_c(&args, 1);
        }
    }
    live.finish();
}

/// A library handle made by `create` mounts its own dirs without the per-mount cache
/// check ("checked at create/open"); if `dir/upper` was swapped for a symlink to a cache
/// layer meanwhile, the overlay's upper is that layer and the sandbox writes into it.
fn lib_mount_rechecks_a_swapped_upper(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let top_fs = live.sb().lowers[0].clone();
    let lower = fx.base.join("plain-lower");
    fs::create_dir_all(lower.join("etc")).unwrap();
    let dir = fx.base.join("lib-ws");
    let mut ws = Workspace::create(&dir, vec![lower], WorkspaceOptions::default()).unwrap();
    fs::remove_dir(dir.join("upper")).unwrap();
    symlink(&top_fs, dir.join("upper")).unwrap();
    let r = if v.copy { ws.mount(CopyBackend::new()).map(drop) } else { ws.mount(KernelOverlay::new()).map(drop) };
    if r.is_ok() {
        let w = fs::write(dir.join("rootfs/etc/injected"), b"into a cache layer\n");
        let _ = ws.unmount();
        live.check(&format!("a mount whose upper became a symlink to a cache layer, and a write ({w:?})"));
    }
    live.check("a mount whose upper became a symlink to a cache layer");
    // Refused: as a cache layer, or as a link where the workspace's own upper must be.
    assert!(matches!(r, Err(Error::ImmutableLayer { .. } | Error::InvalidSpec { .. })), "{r:?}");
    drop(ws);
    live.finish();
}

// ---------------------------------------------------------------------------------------
// Attacks that held up

/// A workspace named with a space, a newline, `,`, `:` and `\`: the whole lifecycle
/// (create, mount, detach, export, unmount, destroy) works and leaves nothing.
fn held_cli_odd_names(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.base.join("a b\nc,d:e\\f");
    create(&fx, "two", &ws2);
    let view = mount(&fx, &ws2);
    fs::write(view.join("etc/odd"), b"odd\n").unwrap();
    fx.ctl.cached(&["detach", s(&ws2)]);
    assert_eq!(fs::read(view.join("etc/odd")).unwrap(), b"odd\n");
    fx.ctl.run(&["unmount", s(&ws2)]);
    fx.ctl.run(&["diff", "export", s(&ws2), s(&fx.base.join("odd.tar"))]);
    fx.ctl.cached(&["destroy", s(&ws2)]);
    assert!(!ws2.exists());
    assert_eq!(leases(&fx), live.cache.leases);
    live.check("the lifecycle of a workspace with an odd name");
    live.finish();
}

/// `ws2` from the base dir, destroyed as `./ws2/`; `ws3/` destroyed as `BASE/./ws3`;
/// `plink/ws4` (plink a symlink to the base dir) destroyed as `BASE/ws4`: one lease each,
/// released.
fn held_cli_relative_and_dotted_spellings(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let two = fx.image("two");
    symlink(&fx.base, fx.base.join("plink")).unwrap();
    let run = |args: &[&str]| {
        let mut c: Command = fx.ctl.cached_cmd(args);
        let out = c.current_dir(&fx.base).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    let base = s(&fx.base);
    for (made, destroyed) in [
        ("ws2".to_string(), "./ws2/".to_string()),
        ("ws3/".to_string(), format!("{base}/./ws3")),
        ("plink/ws4".to_string(), format!("{base}/ws4")),
    ] {
        run(&["create", &two, &made]);
        run(&["destroy", &destroyed]);
        assert_eq!(leases(&fx), live.cache.leases, "create {made}, destroy {destroyed}");
    }
    live.check("relative and dotted spellings");
    live.finish();
}

/// A converted-looking `P` whose `P.lower` is a symlink to a cache layer, with writes
/// in `P.upper`: `apply P` refuses (`ImmutableLayer`), the layer is untouched.
fn held_cli_apply_converted_lower_symlinked_to_a_cache_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let p = fx.base.join("p");
    for d in ["p", "p.upper/etc", "p.work"] {
        fs::create_dir_all(fx.base.join(d)).unwrap();
    }
    fs::write(fx.base.join("p.upper/etc/injected"), b"x\n").unwrap();
    symlink(&live.sb().lowers[0], fx.base.join("p.lower")).unwrap();
    let out = live.fault(&["apply", s(&p)], 1);
    // Refused as a cache layer, or already as a link where a workspace's own dir must be.
    let err = stderr(&out);
    assert!(err.contains("cache layer") || err.contains("not a directory of this workspace"), "{err}");
    live.finish();
}

/// A kept workspace whose `workspace.json` was edited: lowers naming a cache layer
/// through a symlink (apply refuses), or garbage (every command exits 1, nothing moves).
fn held_cli_edited_description(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.base.join("ws2");
    create(&fx, "two", &ws2);
    // ws2's lease is part of the baseline from here on.
    let live = Live { cache: fx.cache_state(), ..live };
    let link = fx.base.join("layer-link");
    symlink(live.sb().lowers.last().unwrap(), &link).unwrap();
    let desc = ws2.join("workspace.json");
    let mut j: serde_json::Value = serde_json::from_slice(&fs::read(&desc).unwrap()).unwrap();
    j["lowers"] = serde_json::json!([s(&link)]);
    fs::write(&desc, serde_json::to_vec(&j).unwrap()).unwrap();
    let view = mount(&fx, &ws2);
    fs::write(view.join("etc/injected"), b"x\n").unwrap();
    let out = live.fault(&["apply", s(&ws2)], 1);
    assert!(stderr(&out).contains("cache layer"), "{}", stderr(&out));
    fx.ctl.run(&["unmount", s(&ws2)]);
    fs::write(&desc, b"{\"version\": 1, \"lowers\": [\"/\"], \"bogus\"").unwrap();
    let before = tree(&ws2);
    let out_tar = fx.base.join("o.tar");
    for args in [
        &["mount", s(&ws2)][..],
        &["unmount", s(&ws2)],
        &["apply", s(&ws2)],
        &["detach", s(&ws2)],
        &["destroy", s(&ws2)],
        &["diff", "export", s(&ws2), s(&out_tar)],
    ] {
        live.fault(args, 1);
        assert_same_tree(&format!("{args:?} with a garbage description"), &before, &tree(&ws2));
        assert!(!out_tar.exists());
    }
    fs::write(&desc, serde_json::to_vec(&j).unwrap()).unwrap();
    fx.ctl.cached(&["destroy", s(&ws2)]);
    live.finish();
}

/// Copy-mounted workspaces with a tmpfs mounted inside the view: unmount, detach,
/// destroy, apply, reset (library) refuse, and the view, its submount and the upper stay.
fn held_cli_copy_mounted_with_a_mount_inside(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let (ws2, view, srv, _m) = ws2_with_a_submount(&fx);
    let upper = upper_of(&fx, &ws2);
    let before = tree(&upper);
    for args in [&["unmount", s(&ws2)][..], &["detach", s(&ws2)], &["destroy", s(&ws2)], &["apply", s(&ws2)]] {
        let out = fx.ctl.cached_output(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        submount_intact(&srv).unwrap();
        assert_eq!(fs::read(view.join("etc/written")).unwrap(), b"x\n");
        assert_same_tree(&format!("{args:?}: the upper"), &before, &tree(&upper));
    }
    let mut ws = Workspace::open(&ws2).unwrap();
    assert!(ws.reset().is_err());
    drop(ws);
    submount_intact(&srv).unwrap();
    assert_eq!(fs::read(view.join("etc/written")).unwrap(), b"x\n");
}

/// `diff import WS2 IN` with IN a file of the live sandbox (garbage to tar) and WS2 the
/// live workspace's own upper: refused, the live workspace untouched, WS2 still empty.
fn held_cli_import_from_inside_a_live_workspace(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let ws2 = fx.base.join("ws2");
    create(&fx, "two", &ws2);
    let live = Live { cache: fx.cache_state(), ..live };
    // The workspace dir's own mtime may move (the import's journal entry came and
    // went); everything in it is as it was.
    let ws_tree = |p: &Path| {
        let mut t = tree(p);
        t.remove(b".".as_slice());
        t
    };
    let before = ws_tree(&ws2);
    let sb = live.sb();
    live.fault(&["diff", "import", s(&ws2), s(&sb.upper.join("etc/blob"))], 1);
    assert_same_tree("ws2 after a refused import", &before, &ws_tree(&ws2));
    live.fault(&["diff", "import", s(&sb.upper), s(&sb.upper.join("etc/blob"))], 1);
    fx.ctl.cached(&["destroy", s(&ws2)]);
    live.finish();
}

/// A hardlink farm of a cache layer (`cp -al`): `unpack` over it and `apply` of a
/// converted copy replace the linked files instead of writing through the links.
fn held_lib_unpack_and_apply_over_a_hardlink_farm_of_a_layer(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let base_fs = live.sb().lowers.last().unwrap().clone();
    let farm = fx.base.join("farm");
    support::run(Command::new("cp").arg("-al").arg(&base_fs).arg(&farm));
    let tar = tar_file(
        &fx.base.join("h.tar"),
        &[Ent::dir("usr"), Ent::dir("usr/bin"), Ent::file("usr/bin/tool", "replaced\n").mode(0o700)],
    );
    for apply in [false, true] {
        let mut args = vec!["unpack"];
        if apply {
            args.push("--apply");
        }
        args.extend([s(&tar), s(&farm)]);
        fx.ctl.run(&args);
        live.check(&format!("`rootfsctl {}` over a hardlink farm of a layer", args.join(" ")));
    }
    let farm2 = fx.base.join("farm2");
    support::run(Command::new("cp").arg("-al").arg(&base_fs).arg(&farm2));
    fx.ctl.run(&["convert", "--backend", v.backend(), s(&farm2)]);
    support::chmod(&farm2.join("etc/passwd"), 0o600);
    let mut f = fs::OpenOptions::new().append(true).open(farm2.join("etc/hostname")).unwrap();
    f.write_all(b"appended\n").unwrap();
    drop(f);
    fx.ctl.run(&["apply", s(&farm2)]);
    live.check("`apply` of a converted hardlink farm of a layer");
    fx.ctl.run(&["destroy", s(&farm2)]);
    live.finish();
}

/// `Workspace::reset` of the live view with something mounted in the upper: refused
/// (`AlreadyMounted`), the view mounted again, the upper as it was.
fn held_lib_failed_reset_with_a_mount_in_the_upper(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let inside = live.sb().upper.join("srv/sandbox-dir");
    let m = scratch_ns::tmpfs(&inside, "size=1m");
    let mut ws = Workspace::open(live.ws()).unwrap();
    let r = ws.reset();
    drop(ws);
    drop(m);
    live.check(&format!("`reset` with a mount in the upper: {r:?}"));
    assert!(matches!(r, Err(Error::AlreadyMounted { .. })), "{r:?}");
    live.finish();
}

/// `Workspace::restore` of a new dir from a truncated, a garbage and a hostile
/// checkpoint: an error, and no dir, mount or lease left.
fn held_lib_restore_failing_midway_leaves_nothing(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let good = support::tar_of(&[Ent::file("a", vec![7u8; 10_000])], Fmt::Pax);
    let hostile = support::tar_of(&[Ent::symlink("esc", "/"), Ent::file("esc/pwned", "x")], Fmt::Pax);
    for (i, data) in
        [good[..good.len() - 2048].to_vec(), support::pseudo_random(4, 5000), hostile].into_iter().enumerate()
    {
        let ckpt = fx.base.join(format!("c{i}.tar"));
        fs::write(&ckpt, &data).unwrap();
        let dir = fx.base.join(format!("r{i}"));
        let r = Workspace::restore(&dir, live.sb().lowers.clone(), v.options(), &ckpt);
        assert!(r.is_err(), "restore {i} succeeded");
        drop(r);
        assert!(!dir.exists(), "a failed restore left {}", dir.display());
        live.check(&format!("a failed `Workspace::restore` ({i})"));
    }
    live.finish();
}

/// `detach` of a tmpfs workspace whose tmpfs cannot hold the copy-up: refused midway
/// (`ENOSPC`), rolled back: the view mounted, the upper as it was, the lease kept.
fn held_cli_detach_out_of_space_rolls_back(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let two = fx.image("two");
    let ws2 = fx.base.join("ws2");
    fx.ctl.cached(&["create", "--tmpfs", "1M", &two, s(&ws2)]);
    let view = mount(&fx, &ws2);
    fs::write(view.join("fill"), support::pseudo_random(2, 900_000)).unwrap();
    let upper = ws2.join("mem/upper");
    let before = tree(&upper);
    let leases_before = leases(&fx);
    let out = fx.ctl.cached_output(&["detach", s(&ws2)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(is_mount_point(&view).unwrap());
    assert_same_tree("the upper after a failed detach", &before, &tree(&upper));
    assert_eq!(leases(&fx), leases_before);
    destroy(&fx, &ws2);
}

/// WS_DIR given as the live view (kernel: a mount point) or the tmpfs (`WS/mem`):
/// `create`, `destroy`, `detach`, `convert` refuse; nothing moves.
fn held_cli_workspace_dir_is_the_view_or_the_tmpfs(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let two = fx.image("two");
    let mut dirs = vec![live.sb().view.clone()];
    if v.tmpfs {
        dirs.push(live.ws().join("mem"));
    }
    for d in &dirs {
        let d = s(d);
        live.fault_c(&["create", &two, d], 1);
        live.fault_c(&["create", "--tmpfs", "16M", &two, d], 1);
        live.fault_c(&["destroy", d], 1);
        live.fault_c(&["detach", d], 1);
        live.fault(&["convert", d], 1);
    }
    live.finish();
}

/// `rootfsctl unpack` into an existing cache layer named through a symlink, with `..`,
/// or relative to the working directory: refused (exit 1), the layers untouched.
fn held_cli_unpack_into_an_existing_layer_however_named(v: Variant) {
    let Some(fx) = setup(v, "512m") else { return };
    let live = fx.live(vec![fx.sandbox("ws", "two", false)]);
    let top = live.sb().lowers[0].clone();
    let link = fx.base.join("layer-link");
    symlink(&top, &link).unwrap();
    let tar = tar_file(&fx.base.join("t.tar"), &[Ent::dir("etc"), Ent::file("etc/injected", "x\n")]);
    let rel = top.strip_prefix(&fx.base).unwrap().to_path_buf();
    for dest in [link.clone(), link.join("etc"), top.join("etc/../../fs"), fx.base.join("layer-link/.")] {
        live.fault(&["unpack", s(&tar), s(&dest)], 1);
        live.fault(&["unpack", "--apply", s(&tar), s(&dest)], 1);
    }
    let out = fx.ctl.cmd(&["unpack", s(&tar), s(&rel)]).current_dir(&fx.base).output().unwrap();
    live.check("`rootfsctl unpack` into a layer by a relative path");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    live.finish();
}
