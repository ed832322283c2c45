//! A fake [`MountBackend`] that records calls instead of mounting, for tests that run
//! without root (workspace lifecycle, error paths). It can be told to fail the next
//! mount or unmount with a given errno.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::PathBuf;

use parking_lot::Mutex;
use rootfs_cache::{Error, MountBackend, OverlaySpec, Result};

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Mount(OverlaySpec),
    Unmount(PathBuf),
}

#[derive(Default)]
pub struct Recording {
    pub calls: Mutex<Vec<Call>>,
    /// Errno for the next `mount` to fail with.
    pub fail_mount: Mutex<Option<i32>>,
    /// Errno for the next `unmount` to fail with.
    pub fail_unmount: Mutex<Option<i32>>,
}

impl Recording {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }

    /// Targets currently "mounted": mounted more often than unmounted.
    pub fn mounted(&self) -> Vec<PathBuf> {
        let mut live: Vec<PathBuf> = Vec::new();
        for c in self.calls.lock().iter() {
            match c {
                Call::Mount(s) => live.push(s.target.clone()),
                Call::Unmount(t) => live.retain(|x| x != t),
            }
        }
        live
    }
}

fn fail(op: &'static str, target: &std::path::Path, errno: i32) -> Error {
    Error::Mount {
        op,
        target: target.to_path_buf(),
        source: std::io::Error::from_raw_os_error(errno),
        detail: "injected by the recording backend".into(),
    }
}

impl MountBackend for Recording {
    fn mount(&self, spec: &OverlaySpec) -> Result<()> {
        if let Some(errno) = self.fail_mount.lock().take() {
            return Err(fail("mount", &spec.target, errno));
        }
        self.calls.lock().push(Call::Mount(spec.clone()));
        Ok(())
    }

    fn unmount(&self, spec: &OverlaySpec) -> Result<()> {
        if let Some(errno) = self.fail_unmount.lock().take() {
            return Err(fail("umount2", &spec.target, errno));
        }
        self.calls.lock().push(Call::Unmount(spec.target.clone()));
        Ok(())
    }
}
