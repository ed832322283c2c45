//! Set-up shared by the benches that mount: the root check, a private mount namespace
//! and a scratch directory on a tmpfs of the bench's own.
#![allow(dead_code)] // each bench uses a different subset

use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Whether the bench can run: root is needed to mount. Not root: a message and `false`,
/// or a panic when `CI` is set (a bench that needs root must not pass silently there).
pub fn require_root(bench: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "the {bench} bench needs root (CI is set, so not skipping)");
    eprintln!("{bench} bench skipped: needs root (run `sudo cargo bench --bench {bench}`)");
    false
}

/// Enters a private mount namespace (the process is still single-threaded here).
pub fn private_namespace() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .expect("make / rprivate");
}

/// A scratch directory on a tmpfs of the bench's own (mounted with `tmpfs_options`) or,
/// when the environment variable `dir_var` is set, a temp dir under that directory.
pub struct Scratch {
    dir: tempfile::TempDir,
    own_tmpfs: bool,
}

impl Scratch {
    pub fn new(dir_var: &str, tmpfs_options: &str) -> Self {
        let base = std::env::var_os(dir_var);
        let dir = match &base {
            Some(b) => tempfile::tempdir_in(b).unwrap_or_else(|e| panic!("tempdir in {dir_var}: {e}")),
            None => tempfile::tempdir().expect("tempdir"),
        };
        if base.is_none() {
            mount(Some("tmpfs"), dir.path(), Some("tmpfs"), MsFlags::empty(), Some(tmpfs_options))
                .expect("mount tmpfs");
        }
        Scratch { dir, own_tmpfs: base.is_none() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Unmount the tmpfs so that TempDir only removes the empty mount point.
        if self.own_tmpfs {
            let _ = umount2(self.dir.path(), MntFlags::MNT_DETACH);
        }
    }
}
