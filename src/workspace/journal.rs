//! The step a multi-step change of a workspace has reached, on disk, so that a process
//! killed in the middle leaves something [`Workspace::open`](super::Workspace::open)
//! can finish or undo (the containerd metastore and git's lock files do the same).
//!
//! One small file per workspace (`dir/workspace.journal`, or `path.journal` next to a
//! converted `path`), written (temp file + rename) before the first change and removed
//! after the last. What `open` does with each entry:
//!
//! | entry | written by | `open` after a crash |
//! |---|---|---|
//! | `import` | `import_diff`, `import_diff_file`, `restore` | rolls back: empties the upper |
//! | `reset` | `reset` | rolls forward: empties upper and work |
//! | `apply` | `apply` | rolls forward: runs the (resumable) flatten again |
//! | `detach` | `detach`, before the upper swap | rolls back: the original upper is put back, the copy discarded |
//! | `detach-swapped` | `detach`, right after the swap | rolls forward: the detached upper stays, lowers become the skeleton |
//! | `destroy` | `destroy` | the handle can only be destroyed (again) |
//! | `convert` | `convert`, before moving the directory | rolled back: `path.lower` is `path` again (forward if the view got mounted) |
//!
//! Until the entry is dealt with, nothing mounts the workspace: a half-done state is
//! never shown to a sandbox.

use std::path::Path;

use crate::error::{Error, Result};

/// The file's name in a workspace dir.
pub(super) const FILE: &str = "workspace.journal";

/// A step in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Import,
    Reset,
    Apply,
    Detach,
    DetachSwapped,
    Destroy,
    Convert,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Import => "import",
            Step::Reset => "reset",
            Step::Apply => "apply",
            Step::Detach => "detach",
            Step::DetachSwapped => "detach-swapped",
            Step::Destroy => "destroy",
            Step::Convert => "convert",
        }
    }

    fn parse(s: &str) -> Option<Step> {
        [Step::Import, Step::Reset, Step::Apply, Step::Detach, Step::DetachSwapped, Step::Destroy, Step::Convert]
            .into_iter()
            .find(|st| st.name() == s)
    }
}

/// Records `step` at `path` (atomically: a reader sees the old entry or the new one).
pub(super) fn begin(path: &Path, step: Step) -> Result<()> {
    crate::fsutil::write_record(path, format!("{}\n", step.name()).as_bytes(), 0o600)
}

/// Removes the entry: the change is complete (or undone).
pub(super) fn end(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("unlink", path, e)),
    }
}

/// The step recorded at `path`, if any.
///
/// # Errors
/// [`Error::InvalidSpec`] for an entry this version does not know; I/O errors.
pub(super) fn read(path: &Path) -> Result<Option<Step>> {
    let Some(bytes) = crate::fsutil::read_record(path)? else { return Ok(None) };
    let t = String::from_utf8_lossy(&bytes);
    Step::parse(t.trim()).map(Some).ok_or_else(|| Error::InvalidSpec {
        reason: format!("{}: unknown journal entry {:?}", path.display(), t.trim()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let d = std::env::temp_dir().join(format!("rootfs-cache-journal-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(FILE);
        assert_eq!(read(&p).unwrap(), None);
        for st in
            [Step::Import, Step::Reset, Step::Apply, Step::Detach, Step::DetachSwapped, Step::Destroy, Step::Convert]
        {
            begin(&p, st).unwrap();
            assert_eq!(read(&p).unwrap(), Some(st));
        }
        end(&p).unwrap();
        end(&p).unwrap();
        assert_eq!(read(&p).unwrap(), None);
        std::fs::write(&p, "frobnicate\n").unwrap();
        assert!(matches!(read(&p), Err(Error::InvalidSpec { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
