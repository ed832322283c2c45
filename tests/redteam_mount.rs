//! Red-team reproductions for `src/mount/` and `src/workspace/`.
//!
//! Each test pins a finding of the red-team review (all fixed) or a property it checked
//! and found sound. Needs root (mounts):
//! `unshare -m --propagation private -- cargo test --test redteam_mount`.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs_cache::{CopyBackend, KernelOverlay, MountBackend, OverlaySpec, Workspace, WorkspaceOptions};

fn tmp() -> tempfile::TempDir {
    support::tempdir()
}

fn bind(src: &Path, dst: &Path) {
    let st = Command::new("mount").arg("--bind").arg(src).arg(dst).status().unwrap();
    assert!(st.success(), "mount --bind");
}

fn umount(p: &Path) {
    let _ = Command::new("umount").arg("-l").arg(p).status();
}

fn copy_spec(base: &Path) -> OverlaySpec {
    for d in ["lower", "upper", "work", "target"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    fs::create_dir(base.join("lower/vol")).unwrap();
    fs::write(base.join("lower/etc-file"), b"image").unwrap();
    OverlaySpec::new([base.join("lower")], base.join("upper"), base.join("work"), base.join("target"))
}

/// A runtime that bind-mounted a host volume into a copy-backend rootfs and unmounts
/// without unmounting the volume first gets `AlreadyMounted`: the fold must not copy
/// the volume into the upper, and emptying the target must not delete through it
/// (regression: both happened). The kernel backend detaches the whole tree.
#[test]
fn copy_unmount_never_deletes_through_a_bind_mount_in_the_target() {
    if !support::require_root("copy_unmount_never_deletes_through_a_bind_mount_in_the_target") {
        return;
    }
    let d = tmp();
    let spec = copy_spec(d.path());
    let host_vol = d.path().join("host-volume");
    fs::create_dir(&host_vol).unwrap();
    fs::write(host_vol.join("precious"), b"host data").unwrap();

    CopyBackend::new().mount(&spec).unwrap();
    let mnt = spec.target.join("vol");
    bind(&host_vol, &mnt);
    let r = CopyBackend::new().unmount(&spec);
    umount(&mnt);
    let _ = CopyBackend::new().unmount(&spec);

    let survived = host_vol.join("precious").exists();
    let leaked = spec.upper.join("vol/precious").exists();
    assert!(
        survived && !leaked,
        "unmount returned {r:?}; host file survived: {survived}; host file copied into upper: {leaked}"
    );
}

/// Same with the whole `Workspace`: `destroy` with the copy backend must refuse before
/// its unmount step touches anything (regression).
#[test]
fn workspace_destroy_copy_backend_bind_mount() {
    if !support::require_root("workspace_destroy_copy_backend_bind_mount") {
        return;
    }
    let d = tmp();
    let lower = d.path().join("lower");
    fs::create_dir_all(lower.join("data")).unwrap();
    let host_vol = d.path().join("host-volume");
    fs::create_dir(&host_vol).unwrap();
    fs::write(host_vol.join("precious"), b"host data").unwrap();

    let mut ws = Workspace::create(d.path().join("ws"), vec![lower.clone()], WorkspaceOptions::default()).unwrap();
    ws.mount(CopyBackend::new()).unwrap();
    let mnt = ws.target().join("data");
    bind(&host_vol, &mnt);
    let r = ws.destroy();
    umount(&mnt);
    assert!(host_vol.join("precious").exists(), "destroy returned {r:?} and the host volume was emptied");
}

/// `detach` twice keeps the skeleton's names, so later deletions of the image's
/// top-level names still leave whiteouts (regression: the second detach emptied it).
#[test]
fn detach_twice_keeps_skeleton_names() {
    if !support::require_root("detach_twice_keeps_skeleton_names") {
        return;
    }
    let d = tmp();
    let lower = d.path().join("lower");
    fs::create_dir_all(lower.join("etc")).unwrap();
    fs::create_dir_all(lower.join("opt")).unwrap();
    fs::write(lower.join("etc/passwd"), b"root").unwrap();
    let mut ws = Workspace::create(d.path().join("ws"), vec![lower.clone()], WorkspaceOptions::default()).unwrap();
    ws.detach().unwrap();
    let skel = ws.lowers()[0].clone();
    let before: Vec<_> = fs::read_dir(&skel).unwrap().map(|e| e.unwrap().file_name()).collect();
    ws.detach().unwrap();
    let after: Vec<_> = fs::read_dir(&ws.lowers()[0]).unwrap().map(|e| e.unwrap().file_name()).collect();
    ws.destroy().unwrap();
    assert_eq!(before.len(), 2, "first skeleton");
    assert_eq!(after.len(), 2, "second skeleton lost the image's top-level names: {after:?}");
}

/// `convert` uses `path` itself as the workspace dir; `detach` would put its
/// directories inside the mount point and forget `path.lower`. It is refused for
/// converted workspaces, and `destroy` puts the original directory back (regression).
#[test]
fn convert_detach_destroy_restores_path() {
    if !support::require_root("convert_detach_destroy_restores_path") {
        return;
    }
    let d = tmp();
    let path = d.path().join("rootfs");
    fs::create_dir_all(path.join("etc")).unwrap();
    fs::write(path.join("etc/hosts"), b"orig").unwrap();
    let mut ws = Workspace::convert(&path, KernelOverlay::new()).unwrap();
    // A converted workspace's only lower is its own: detach is refused, nothing moves.
    assert!(matches!(ws.detach(), Err(rootfs_cache::Error::Unsupported { .. })));
    assert!(ws.is_mounted());
    let r = ws.destroy();
    let restored = fs::read(path.join("etc/hosts")).ok();
    let orphan = d.path().join("rootfs.lower").exists();
    // Clean up whatever is left mounted.
    umount(&path);
    assert!(
        r.is_ok() && restored.as_deref() == Some(&b"orig"[..]) && !orphan,
        "destroy: {r:?}; etc/hosts at path: {restored:?}; rootfs.lower orphaned: {orphan}"
    );
}

/// `Workspace::create` adopts an existing, non-empty directory; `destroy` deletes only
/// what the crate made there (regression: it emptied the whole directory).
#[test]
fn destroy_only_deletes_what_create_made() {
    if !support::require_root("destroy_only_deletes_what_create_made") {
        return;
    }
    let d = tmp();
    let lower = d.path().join("lower");
    fs::create_dir_all(&lower).unwrap();
    let dir = d.path().join("state");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("runtime-config.json"), b"{}").unwrap();
    let ws = Workspace::create(&dir, vec![lower], WorkspaceOptions::default()).unwrap();
    let r = ws.destroy();
    assert!(dir.join("runtime-config.json").exists(), "destroy returned {r:?} and deleted a file it did not create");
}

/// `OverlayMount`/`Workspace` drop: the lease is released whatever unmount said. Here
/// the sanity part: a failed `destroy` (something stacked on the target) must keep the
/// workspace mounted and report it. Sound today; kept as a regression test.
#[test]
fn destroy_with_stacked_mount_refuses_and_deletes_nothing() {
    if !support::require_root("destroy_with_stacked_mount_refuses_and_deletes_nothing") {
        return;
    }
    let d = tmp();
    let lower = d.path().join("lower");
    fs::create_dir_all(lower.join("data")).unwrap();
    fs::write(lower.join("data/f"), b"x").unwrap();
    let host_vol = d.path().join("host-volume");
    fs::create_dir(&host_vol).unwrap();
    fs::write(host_vol.join("precious"), b"host data").unwrap();
    let mut ws = Workspace::create(d.path().join("ws"), vec![lower.clone()], WorkspaceOptions::default()).unwrap();
    ws.mount(KernelOverlay::new()).unwrap();
    let mnt = ws.target().join("data");
    bind(&host_vol, &mnt);
    let _ = ws.destroy();
    umount(&mnt);
    assert!(host_vol.join("precious").exists());
    assert!(lower.join("data/f").exists());
}

/// The lower must never change through the copy backend: a sandbox that replaces a
/// directory of the target by a symlink to the lower (or host) while unmount runs
/// cannot make the fold write there. Sound today (all by descriptor, `O_NOFOLLOW`).
#[test]
fn copy_fold_does_not_follow_symlinked_dirs() {
    if !support::require_root("copy_fold_does_not_follow_symlinked_dirs") {
        return;
    }
    let d = tmp();
    let spec = copy_spec(d.path());
    let host = d.path().join("host");
    fs::create_dir(&host).unwrap();
    fs::write(host.join("secret"), b"s").unwrap();
    CopyBackend::new().mount(&spec).unwrap();
    fs::remove_dir(spec.target.join("vol")).unwrap();
    std::os::unix::fs::symlink(&host, spec.target.join("vol")).unwrap();
    CopyBackend::new().unmount(&spec).unwrap();
    assert!(fs::symlink_metadata(spec.upper.join("vol")).unwrap().file_type().is_symlink());
    assert!(host.join("secret").exists());
    assert_eq!(fs::read(spec.lowers[0].join("etc-file")).unwrap(), b"image");
    let _: PathBuf = spec.upper.clone();
    let _ = fs::metadata(&spec.upper).unwrap().ino();
}

fn mount_tmpfs(p: &Path) {
    fs::create_dir_all(p).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(p).status().unwrap();
    assert!(st.success());
}

/// `apply` is restartable: it moves files out of the upper one by one, and an opaque
/// directory makes it replace the lower directory first. If apply stops midway (here an
/// immutable file that cannot be renamed), a second run must merge, not replace the
/// lower directory again with the already-moved files in it (regression: they were lost).
#[test]
fn apply_is_restartable_after_an_interruption() {
    if !support::require_root("apply_is_restartable_after_an_interruption") {
        return;
    }
    let d = tmp();
    let fsroot = d.path().join("fs");
    mount_tmpfs(&fsroot); // lower and upper on one filesystem: files are renamed
    let lower = fsroot.join("lower");
    fs::create_dir_all(lower.join("D")).unwrap();
    fs::write(lower.join("D/old"), b"old").unwrap();
    let mut ws = Workspace::create(fsroot.join("ws"), vec![lower.clone()], WorkspaceOptions::default()).unwrap();
    let up = ws.upper().to_path_buf();
    fs::create_dir(up.join("D")).unwrap();
    let ok = Command::new("setfattr").args(["-n", "trusted.overlay.opaque", "-v", "y"]).arg(up.join("D")).status();
    if !ok.is_ok_and(|s| s.success()) {
        // No setfattr: use the crate-independent libc call.
        let p = std::ffi::CString::new(up.join("D").as_os_str().as_encoded_bytes()).unwrap();
        let r = unsafe { libc::setxattr(p.as_ptr(), c"trusted.overlay.opaque".as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        assert_eq!(r, 0);
    }
    fs::write(up.join("D/a"), b"new a").unwrap();
    fs::write(up.join("D/b"), b"new b").unwrap();
    assert!(Command::new("chattr").arg("+i").arg(up.join("D/b")).status().unwrap().success());
    let first = ws.apply();
    assert!(Command::new("chattr").arg("-i").arg(up.join("D/b")).status().unwrap().success());
    assert!(first.is_err(), "first apply should fail on the immutable file");
    let second = ws.apply();
    let a = fs::read(lower.join("D/a")).ok();
    let b = fs::read(lower.join("D/b")).ok();
    drop(ws);
    Command::new("umount").arg("-l").arg(&fsroot).status().unwrap();
    assert!(second.is_ok(), "second apply: {second:?}");
    assert_eq!(b.as_deref(), Some(&b"new b"[..]));
    assert_eq!(a.as_deref(), Some(&b"new a"[..]), "D/a was moved by the first apply and deleted by the second");
}
