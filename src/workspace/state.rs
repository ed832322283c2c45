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
///
/// Version 1, or 2 when it has data-only lowers: a reader that predates them would
/// ignore the field and mount a lazy image's placeholders without their data, so it is
/// made to refuse the file instead. Files without the field load with none.
#[derive(Serialize, Deserialize)]
pub(super) struct State {
    /// Format version.
    pub version: u32,
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// Data-only lower dirs, top first (a lazy image's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_lowers: Vec<PathBuf>,
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
    pub(super) fn new(lowers: &[PathBuf], data_lowers: &[PathBuf], storage: UpperStorage, o: &OverlayOptions) -> State {
        State {
            version: if data_lowers.is_empty() { 1 } else { 2 },
            lowers: lowers.to_vec(),
            data_lowers: data_lowers.to_vec(),
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
        State::new(&[PathBuf::from("/")], &[], UpperStorage::Disk, &OverlayOptions::default())
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
        if !matches!(s.version, 1 | 2) || s.lowers.is_empty() {
            return Err(Error::InvalidSpec {
                reason: format!("{}: unknown version {} or no lowers", path.display(), s.version),
            });
        }
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    #[test]
    fn data_lowers_round_trip() {
        let d = dir();
        let (lowers, data) = (vec![PathBuf::from("/c/skel")], vec![PathBuf::from("/c/d1"), PathBuf::from("/c/d2")]);
        State::new(&lowers, &data, UpperStorage::Disk, &OverlayOptions::default()).save(d.path()).unwrap();
        let text = std::fs::read_to_string(d.path().join(FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        let s = State::load(d.path()).unwrap().unwrap();
        assert_eq!((s.lowers, s.data_lowers), (lowers, data));
    }

    #[test]
    fn without_data_lowers_the_file_is_version_1_as_before() {
        let d = dir();
        let lowers = vec![PathBuf::from("/c/l")];
        State::new(&lowers, &[], UpperStorage::Disk, &OverlayOptions::default()).save(d.path()).unwrap();
        let text = std::fs::read_to_string(d.path().join(FILE)).unwrap();
        assert!(text.contains("\"version\": 1") && !text.contains("data_lowers"), "{text}");
    }

    #[test]
    fn an_old_file_loads_with_no_data_lowers() {
        let d = dir();
        let old = r#"{"version":1,"lowers":["/c/l"],"tmpfs_size":null,"volatile":false,"userxattr":null,
            "index":false,"redirect_dir":false,"metacopy":false,"xino":false}"#;
        std::fs::write(d.path().join(FILE), old).unwrap();
        let s = State::load(d.path()).unwrap().unwrap();
        assert_eq!(s.lowers, [PathBuf::from("/c/l")]);
        assert!(s.data_lowers.is_empty());
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let d = dir();
        let new = r#"{"version":3,"lowers":["/c/l"],"tmpfs_size":null,"volatile":false,"userxattr":null,
            "index":false,"redirect_dir":false,"metacopy":false,"xino":false}"#;
        std::fs::write(d.path().join(FILE), new).unwrap();
        assert!(matches!(State::load(d.path()), Err(Error::InvalidSpec { .. })));
    }
}
