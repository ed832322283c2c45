//! A private mount namespace for this test thread and tmpfs mounts in it, shared by
//! `tests/checkpoint.rs` and `tests/redteam_checkpoint.rs`. Included with
//! `#[path = "common/scratch_ns.rs"] mod scratch_ns;`.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// This thread's own mount namespace (namespaces are per task), with nothing
/// propagating back to the host.
pub fn private_ns() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
}

/// A mount detached on drop (with everything below it; a loop device goes with it).
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// A tmpfs with mount options `opts` on `dir` (created if missing).
pub fn tmpfs(dir: &Path, opts: &str) -> Mounted {
    fs::create_dir_all(dir).unwrap();
    nix::mount::mount(Some("tmpfs"), dir, Some("tmpfs"), MsFlags::empty(), Some(opts)).unwrap();
    Mounted(dir.to_path_buf())
}
