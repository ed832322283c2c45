//! `Workspace::open` / `Workspace::keep`: a workspace handed from one process (or
//! handle) to the next, as `rootfsctl` runs one command per process: disk and tmpfs
//! uppers, kernel and copy mounts, converted directories, damaged descriptions.
//!
//! Needs root (mounts); each test runs in its own private mount namespace.

#[path = "common/ops.rs"]
mod ops;
#[path = "common/scratch_ns.rs"]
mod scratch_ns;
mod support;

use std::fs;
use std::path::Path;

use rootfs_cache::{CopyBackend, Error, KernelOverlay, Workspace, WorkspaceOptions, is_mount_point};

fn setup(test: &str) -> Option<(tempfile::TempDir, scratch_ns::Mounted)> {
    if !support::require_root(test) {
        return None;
    }
    scratch_ns::private_ns();
    let tmp = support::tempdir();
    let m = scratch_ns::tmpfs(tmp.path(), "size=256m,mode=0755");
    Some((tmp, m))
}

fn lower(base: &Path) -> std::path::PathBuf {
    let l = base.join("lower");
    fs::create_dir_all(l.join("etc")).unwrap();
    ops::write(&l.join("etc/config"), b"lower\n");
    ops::write(&l.join("gone"), b"deleted in the sandbox\n");
    l
}

#[test]
fn disk_workspace_survives_its_handle() {
    let Some((tmp, _m)) = setup("disk_workspace_survives_its_handle") else { return };
    let base = tmp.path();
    let l = lower(base);
    let dir = base.join("ws");
    let ws = Workspace::create(&dir, l.as_path(), WorkspaceOptions::default()).unwrap();
    assert_eq!(ws.lowers(), std::slice::from_ref(&l));
    assert!(!dir.join("workspace.json").exists(), "a handle used in one process writes no description");
    ws.keep().unwrap();
    assert!(dir.join("workspace.json").is_file());

    let mut ws = Workspace::open(&dir).unwrap();
    assert!(!ws.is_mounted() && !ws.is_leased() && !ws.is_tmpfs());
    assert_eq!(ws.lowers(), std::slice::from_ref(&l));
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    ops::write(&t.join("new"), b"from the first handle\n");
    fs::remove_file(t.join("gone")).unwrap();
    ws.keep().unwrap();
    assert!(is_mount_point(&t).unwrap(), "keep unmounted the view");

    // A new handle sees the mount and can unmount it.
    let mut ws = Workspace::open(&dir).unwrap();
    assert!(ws.is_mounted());
    assert_eq!(ws.changes().unwrap().changes.len(), 2);
    ws.unmount().unwrap();
    assert!(!is_mount_point(&t).unwrap());
    ws.keep().unwrap();
    let ws = Workspace::open(&dir).unwrap();
    assert!(!ws.is_mounted());
    assert_eq!(fs::read(ws.upper().join("new")).unwrap(), b"from the first handle\n");
    ws.destroy().unwrap();
    assert!(!dir.exists(), "destroy left {:?}", ops::ls(base));
    let e = Workspace::open(&dir).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
}

#[test]
fn tmpfs_workspace_is_picked_up_where_it_is_mounted() {
    let Some((tmp, _m)) = setup("tmpfs_workspace_is_picked_up_where_it_is_mounted") else { return };
    let base = tmp.path();
    let l = lower(base);
    let dir = base.join("ws");
    let mut ws = Workspace::create(&dir, l.as_path(), WorkspaceOptions::tmpfs(8 << 20)).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    ops::write(&t.join("in-memory"), b"kept across handles\n");
    ws.keep().unwrap();
    assert!(is_mount_point(&dir.join("mem")).unwrap(), "keep dropped the tmpfs");

    let mut ws = Workspace::open(&dir).unwrap();
    assert!(ws.is_tmpfs() && ws.is_mounted());
    ws.unmount().unwrap();
    // Checkpoint and restore through handles of their own.
    let ckpt = base.join("ckpt.tar");
    ws.checkpoint(&ckpt).unwrap();
    ws.destroy().unwrap();
    assert!(!dir.exists());
    let r = Workspace::restore(base.join("r"), l.as_path(), WorkspaceOptions::tmpfs(8 << 20), &ckpt).unwrap();
    r.keep().unwrap();
    let mut r = Workspace::open(base.join("r")).unwrap();
    let t = r.mount(KernelOverlay::new()).unwrap().to_path_buf();
    assert_eq!(fs::read(t.join("in-memory")).unwrap(), b"kept across handles\n");
    r.destroy().unwrap();

    // A tmpfs upper that is gone (its namespace ended, a reboot): never recreated empty
    // and mounted; the workspace can only be destroyed.
    let ws = Workspace::create(base.join("lost"), l.as_path(), WorkspaceOptions::tmpfs(8 << 20)).unwrap();
    ws.keep().unwrap();
    nix::mount::umount2(&base.join("lost/mem"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    let mut ws = Workspace::open(base.join("lost")).unwrap();
    assert!(!ws.is_tmpfs() && !ws.is_mounted());
    let e = ws.mount(KernelOverlay::new()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    assert!(matches!(ws.changes(), Err(Error::Unsupported { .. })));
    assert!(!is_mount_point(&base.join("lost/rootfs")).unwrap());
    ws.destroy().unwrap();
    assert!(!base.join("lost").exists(), "destroy left {:?}", ops::ls(base));
}

#[test]
fn copy_mount_and_converted_dirs_are_recognised() {
    let Some((tmp, _m)) = setup("copy_mount_and_converted_dirs_are_recognised") else { return };
    let base = tmp.path();
    let l = lower(base);
    // The copy backend: its writes reach the upper when a later handle unmounts.
    let dir = base.join("copy");
    let mut ws = Workspace::create(&dir, l.as_path(), WorkspaceOptions::default()).unwrap();
    let t = ws.mount(CopyBackend::new()).unwrap().to_path_buf();
    ops::write(&t.join("copied"), b"written into the copy\n");
    ws.keep().unwrap();
    let mut ws = Workspace::open(&dir).unwrap();
    assert!(ws.is_mounted());
    assert!(matches!(ws.changes(), Err(Error::Unsupported { .. })), "the copy backend was not recognised");
    ws.unmount().unwrap();
    assert_eq!(fs::read(ws.upper().join("copied")).unwrap(), b"written into the copy\n");
    ws.destroy().unwrap();

    // A converted directory: apply from a new handle, destroy puts the lower back.
    let app = base.join("app");
    fs::create_dir(&app).unwrap();
    ops::write(&app.join("file"), b"v1\n");
    let ws = Workspace::convert(&app, KernelOverlay::new()).unwrap();
    ops::write(&app.join("file"), b"v2\n");
    ws.keep().unwrap();
    let mut ws = Workspace::open(&app).unwrap();
    assert!(ws.is_mounted());
    ws.apply().unwrap();
    ws.keep().unwrap();
    let ws = Workspace::open(&app).unwrap();
    ws.destroy().unwrap();
    assert_eq!(fs::read(app.join("file")).unwrap(), b"v2\n");
    assert!(!is_mount_point(&app).unwrap());
}

#[test]
fn damaged_descriptions_are_refused() {
    let Some((tmp, _m)) = setup("damaged_descriptions_are_refused") else { return };
    let base = tmp.path();
    let dir = base.join("ws");
    fs::create_dir(&dir).unwrap();
    let e = Workspace::open(&dir).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    for bad in [&b"not json"[..], br#"{"version":7,"lowers":["/x"]}"#, br#"{"version":1,"lowers":[]}"#] {
        fs::write(dir.join("workspace.json"), bad).unwrap();
        let e = Workspace::open(&dir).unwrap_err();
        assert!(matches!(e, Error::InvalidSpec { .. }), "{}: {e:?}", String::from_utf8_lossy(bad));
    }
}

/// The upper root carries the top lower root's image xattrs (the merged `/` shows the
/// upper root's), and `reset` takes away what a sandbox set on `/`.
#[test]
fn upper_root_xattrs_follow_the_image_across_reset() {
    let Some((tmp, _m)) = setup("upper_root_xattrs_follow_the_image_across_reset") else { return };
    let base = tmp.path();
    let l = lower(base);
    support::lsetxattr(&l, "user.image", b"from the image");
    let mut ws = Workspace::create(base.join("ws"), l.as_path(), WorkspaceOptions::default()).unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    assert_eq!(support::lgetxattr(&t, b"user.image").as_deref(), Some(&b"from the image"[..]));
    support::lsetxattr(&t, "user.sandbox", b"set on /");
    ws.reset().unwrap();
    let t = ws.mount(KernelOverlay::new()).unwrap().to_path_buf();
    assert_eq!(support::lgetxattr(&t, b"user.sandbox"), None, "reset kept the sandbox's xattr on /");
    assert_eq!(support::lgetxattr(&t, b"user.image").as_deref(), Some(&b"from the image"[..]));
    ws.destroy().unwrap();
}
