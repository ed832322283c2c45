//! `dir/workspace.json`: what [`Workspace::open`](super::Workspace::open) needs to pick a
//! workspace up again in another process (the `rootfsctl` commands run one per process).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::UpperStorage;
use crate::error::{Error, Result};
use crate::mount::OverlayOptions;

/// The file's name in the workspace dir.
pub(super) const FILE: &str = "workspace.json";

/// The persisted description of a (non-converted) workspace.
#[derive(Serialize, Deserialize)]
pub(super) struct State {
    /// Format version.
    pub version: u32,
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// Size of a tmpfs upper; `None` for a disk upper.
    pub tmpfs_size: Option<u64>,
    pub volatile: bool,
    pub userxattr: Option<bool>,
    pub index: bool,
    pub redirect_dir: bool,
    pub metacopy: bool,
    pub xino: bool,
}

impl State {
    pub(super) fn new(lowers: &[PathBuf], storage: UpperStorage, o: &OverlayOptions) -> State {
        State {
            version: 1,
            lowers: lowers.to_vec(),
            tmpfs_size: match storage {
                UpperStorage::Tmpfs { size } => Some(size),
                UpperStorage::Disk => None,
            },
            volatile: o.volatile,
            userxattr: o.userxattr,
            index: o.index,
            redirect_dir: o.redirect_dir,
            metacopy: o.metacopy,
            xino: o.xino,
        }
    }

    /// Stands in for a description a killed `destroy` already removed: enough for the
    /// handle to finish the destroy (a disk upper; what is left is deleted by name).
    pub(super) fn gone() -> State {
        State::new(&[PathBuf::from("/")], UpperStorage::Disk, &OverlayOptions::default())
    }

    pub(super) fn options(&self) -> OverlayOptions {
        OverlayOptions {
            volatile: self.volatile,
            userxattr: self.userxattr,
            index: self.index,
            redirect_dir: self.redirect_dir,
            metacopy: self.metacopy,
            xino: self.xino,
            ..Default::default()
        }
    }

    /// Writes the state into `dir` atomically (temp file + rename).
    pub(super) fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| Error::io("serialize", &path, std::io::Error::other(e)))?;
        crate::fsutil::write_record(&path, &text, 0o644)
    }

    /// Reads the state of the workspace in `dir`; `Ok(None)` when there is none.
    pub(super) fn load(dir: &Path) -> Result<Option<State>> {
        let path = dir.join(FILE);
        let Some(text) = crate::fsutil::read_record(&path)? else { return Ok(None) };
        let s: State = serde_json::from_slice(&text).map_err(|e| Error::InvalidSpec {
            reason: format!("{}: not a workspace description: {e}", path.display()),
        })?;
        if s.version != 1 || s.lowers.is_empty() {
            return Err(Error::InvalidSpec {
                reason: format!("{}: unknown version {} or no lowers", path.display(), s.version),
            });
        }
        Ok(Some(s))
    }
}
