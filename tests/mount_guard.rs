//! `OverlayMount` semantics with a recording backend (no root needed): drop unmounts
//! exactly once, explicit unmount reports errors, `keep_mounted` hands over.

#[path = "common/recording.rs"]
mod recording;

use recording::{Call, Recording};
use rootfs_cache::{Error, OverlayMount, OverlaySpec};

fn spec(t: &str) -> OverlaySpec {
    OverlaySpec::new(["/l1", "/l0"], "/u", "/w", t)
}

#[test]
fn drop_unmounts_once() {
    let b = Recording::new();
    {
        let m = OverlayMount::mount(&b, spec("/t")).unwrap();
        assert_eq!(m.target(), std::path::Path::new("/t"));
        assert_eq!(b.mounted(), vec![std::path::PathBuf::from("/t")]);
    }
    assert_eq!(b.calls(), vec![Call::Mount(spec("/t")), Call::Unmount("/t".into())]);
    assert!(b.mounted().is_empty());
}

#[test]
fn explicit_unmount_reports_errors_and_drop_does_not_retry() {
    let b = Recording::new();
    let m = OverlayMount::mount(&b, spec("/t")).unwrap();
    *b.fail_unmount.lock() = Some(libc::EBUSY);
    let e = m.unmount().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
    assert!(matches!(e, Error::Mount { op: "umount2", .. }), "{e:?}");
    // The guard was consumed by unmount(): no second attempt from Drop.
    assert_eq!(b.calls(), vec![Call::Mount(spec("/t"))]);
}

#[test]
fn failed_mount_gives_no_guard_and_no_unmount() {
    let b = Recording::new();
    *b.fail_mount.lock() = Some(libc::EPERM);
    let e = OverlayMount::mount(&b, spec("/t")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    assert!(e.to_string().contains("/t"), "{e}");
    assert!(b.calls().is_empty());
}

#[test]
fn drop_swallows_unmount_errors() {
    let b = Recording::new();
    let m = OverlayMount::mount(&b, spec("/t")).unwrap();
    *b.fail_unmount.lock() = Some(libc::EIO);
    drop(m); // must neither panic nor print
    assert_eq!(b.calls(), vec![Call::Mount(spec("/t"))]);
}

#[test]
fn keep_mounted_hands_over() {
    let b = Recording::new();
    let m = OverlayMount::mount(&b, spec("/t")).unwrap();
    let s = m.keep_mounted();
    assert_eq!(s, spec("/t"));
    assert_eq!(b.mounted(), vec![std::path::PathBuf::from("/t")]);
    rootfs_cache::MountBackend::unmount(&b, &s).unwrap();
    assert!(b.mounted().is_empty());
}
