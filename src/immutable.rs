//! Rule 4 of the design: a cache layer is never modified once it is ready, whichever
//! way a path leads to it. This module recognises cache layers from a path alone, by
//! the cache's on-disk layout (see `cache::layout`):
//!
//! ```text
//! <root>/LOCK
//! <root>/layers/<entry>/fs/   ready layers
//! <root>/tmp/<entry>/fs/      extractions in progress (the cache's alone)
//! <root>/trash/<entry>/fs/    evictions in progress
//! ```
//!
//! so it needs no open cache and works across processes and for caches this process
//! never opened. Symlinks are resolved first (the kernel's own name of an open
//! directory, or `canonicalize`). It depends on nothing else in the crate, so every
//! module that writes (`unpack`, `mount`, `workspace`) can ask it without depending on
//! the cache; the cache's layout test checks that the names agree.
//!
//! Not recognised: a bind mount of a layer at another path (the path no longer spells
//! the layout). The cache never makes one.

use std::path::{Path, PathBuf};

pub(crate) const LOCK: &str = "LOCK";
pub(crate) const LAYERS: &str = "layers";
pub(crate) const TMP: &str = "tmp";
pub(crate) const TRASH: &str = "trash";
pub(crate) const FS: &str = "fs";

/// The cache layer a path lies in, by its spelling: the innermost ancestor of `path`
/// (or `path` itself) that reads `<root>/{layers,tmp,trash}/<entry>/fs`, with the
/// `<root>` it belongs to. `path` should be canonical (symlinks resolved) for the
/// answer to mean anything; [`cache_layer_containing`] checks the root on disk.
pub(crate) fn layer_fs_in_path(path: &Path) -> Option<(&Path, &Path)> {
    path.ancestors().find_map(|a| {
        let entry = a.parent()?;
        let area = entry.parent()?;
        let root = area.parent()?;
        let named = |p: &Path, n: &str| p.file_name().is_some_and(|x| x == n);
        let in_area = named(area, LAYERS) || named(area, TMP) || named(area, TRASH);
        (named(a, FS) && in_area && entry.file_name().is_some()).then_some((a, root))
    })
}

/// The `fs` directory of the cache layer that `path` is, or lies in, if any: a path of
/// the form `<root>/{layers,tmp,trash}/<entry>/fs[/...]` once symlinks are resolved,
/// where `<root>` holds a cache `LOCK` file. Ready layers are never modified (and layers
/// being extracted or evicted are the cache's alone), so every operation that writes
/// into a directory it did not make asks this first, whatever path led it there: it
/// needs no open cache and works across processes. A path that does not exist (yet) is
/// judged by its nearest existing ancestor.
///
/// A bind mount of a layer elsewhere is not recognised (the path no longer spells the
/// layout); the cache never makes one.
pub(crate) fn cache_layer_containing(path: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    // Canonicalise the longest existing prefix; keep the rest as spelt (`..` in a missing
    // part cannot climb out of what exists: the kernel would fail such a path anyway).
    let mut real = None;
    for a in abs.ancestors() {
        if let Ok(c) = std::fs::canonicalize(a) {
            let rest = abs.strip_prefix(a).unwrap_or(Path::new(""));
            real = Some(if rest.as_os_str().is_empty() { c } else { c.join(rest) });
            break;
        }
    }
    let real = real?;
    let (layer, root) = layer_fs_in_path(&real)?;
    std::fs::symlink_metadata(root.join(LOCK)).ok().filter(|m| m.is_file())?;
    Some(layer.to_path_buf())
}

/// [`cache_layer_containing`] for an open directory: its path as the kernel knows it
/// (`/proc/self/fd/N`, one `readlink`, already canonical). Cheap enough for every mount.
pub(crate) fn cache_layer_of_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let (layer, root) = layer_fs_in_path(&real)?;
    std::fs::symlink_metadata(root.join(LOCK)).ok().filter(|m| m.is_file())?;
    Some(layer.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths() {
        let p = |s: &str| Path::new(s).to_path_buf();
        let hit = |s: &str| layer_fs_in_path(Path::new(s)).map(|(a, r)| (a.to_path_buf(), r.to_path_buf()));
        assert_eq!(hit("/c/layers/abc/fs"), Some((p("/c/layers/abc/fs"), p("/c"))));
        assert_eq!(hit("/c/layers/abc/fs/etc/x"), Some((p("/c/layers/abc/fs"), p("/c"))));
        assert_eq!(hit("/c/tmp/abc.1/fs/usr"), Some((p("/c/tmp/abc.1/fs"), p("/c"))));
        assert_eq!(hit("/c/trash/abc.2/fs"), Some((p("/c/trash/abc.2/fs"), p("/c"))));
        // A layer that holds a cache-like tree of its own: the innermost match counts.
        assert_eq!(
            hit("/c/layers/a/fs/x/layers/b/fs"),
            Some((p("/c/layers/a/fs/x/layers/b/fs"), p("/c/layers/a/fs/x")))
        );
        for miss in ["/", "/fs", "/layers/fs", "/c/layers/abc", "/c/layers/abc/meta", "/c/images/abc/fs", "/srv/rootfs"]
        {
            assert_eq!(hit(miss), None, "{miss}");
        }
    }
}
