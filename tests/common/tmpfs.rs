//! A tmpfs in a private mount namespace, shared by test binaries that need a small,
//! fillable file system. Included with `#[path = "common/tmpfs.rs"] mod tmpfs;`.

use std::path::Path;

/// Run `f` in a private mount namespace with a tmpfs of `size` mounted at `dir`.
///
/// The namespace belongs to this test's thread only (namespaces are per task, and
/// `unshare(CLONE_NEWNS)` is allowed in a multi-threaded process); threads that `f`
/// spawns inherit it. Nothing leaks onto the host, even without `unshare -m`.
pub fn with_small_tmpfs(dir: &Path, size: &str, f: impl FnOnce()) {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
    mount(Some("tmpfs"), dir, Some("tmpfs"), MsFlags::empty(), Some(format!("size={size}").as_str())).unwrap();
    f();
    umount2(dir, MntFlags::MNT_DETACH).unwrap();
}
