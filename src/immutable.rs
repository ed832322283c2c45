//! Rule 4 of the design: a cache layer is never modified once it is ready, whichever
//! way a path leads to it, and nothing outside the cache writes into its directory.
//! This module recognises cache layers (and the rest of a cache directory) from a path
//! alone, by the cache's on-disk layout (see `cache::layout`):
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
//! directory, `/proc/self/fd/N`). It depends on nothing else in the crate, so every
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

/// The cache layers a path may lie in, by its spelling, innermost first: each ancestor
/// of `path` (or `path` itself) that reads `<root>/{layers,tmp,trash}/<entry>/fs`, with
/// the `<root>` it would belong to. `path` should be canonical (symlinks resolved) for
/// the answer to mean anything; [`layer_in`] checks each root on disk.
pub(crate) fn layer_fs_candidates(path: &Path) -> impl Iterator<Item = (&Path, &Path)> {
    path.ancestors().filter_map(|a| {
        let entry = a.parent()?;
        let area = entry.parent()?;
        let root = area.parent()?;
        let named = |p: &Path, n: &str| p.file_name().is_some_and(|x| x == n);
        let in_area = named(area, LAYERS) || named(area, TMP) || named(area, TRASH);
        (named(a, FS) && in_area && entry.file_name().is_some()).then_some((a, root))
    })
}

/// The cache's own directories: a path inside one of them belongs to the cache.
const AREAS: [&str; 5] = [LAYERS, TMP, TRASH, "images", "leases"];

/// Whether `root` is a cache directory: it holds the cache's `LOCK` file.
fn is_cache_root(root: &Path) -> bool {
    std::fs::symlink_metadata(root.join(LOCK)).is_ok_and(|m| m.is_file())
}

/// The cache layer the canonical path `real` lies in: the innermost candidate whose
/// root holds a cache `LOCK` file (a layer's own content may spell the layout too).
fn layer_in(real: &Path) -> Option<PathBuf> {
    layer_fs_candidates(real).find(|(_, root)| is_cache_root(root)).map(|(layer, _)| layer.to_path_buf())
}

/// What of a cache the canonical path `real` is or lies in: the layer (`…/fs`) if it
/// is in one, else the cache directory itself, when `real` is a cache directory or lies
/// in one of its areas (`layers/`, `tmp/`, `trash/`, `images/`, `leases/`). Only names
/// that spell the layout are looked at on disk (a `LOCK` stat each), plus `real` itself.
fn cache_in(real: &Path) -> Option<PathBuf> {
    cache_in_with(real, true)
}

/// [`cache_containing`] for a path already [`resolve`]d; `exists: false` when it is known
/// not to exist (it cannot be a cache directory itself: one `stat` saved).
pub(crate) fn cache_in_with(real: &Path, exists: bool) -> Option<PathBuf> {
    if let Some(layer) = layer_in(real) {
        return Some(layer);
    }
    let named_area = |a: &Path| a.file_name().is_some_and(|n| AREAS.iter().any(|x| n == *x));
    exists
        .then_some(real)
        .into_iter()
        .chain(real.ancestors().filter(|a| named_area(a)).filter_map(Path::parent))
        .find(|root| is_cache_root(root))
        .map(Path::to_path_buf)
}

/// The kernel's name of an open file: `/proc/self/fd/N` (one `readlink`; canonical).
fn fd_path(fd: std::os::fd::BorrowedFd<'_>) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()
}

/// `path` as the kernel would resolve it: absolute, its longest existing prefix with
/// symlinks resolved, the rest as spelt. Costs one `openat2` for a path without
/// symlinks or `..`, else an `open` (`O_PATH`) and a `readlink` of `/proc/self/fd`.
/// `None` when nothing of it resolves, or a `..` follows a missing component (the
/// kernel would fail such a path).
pub(crate) fn resolve(path: &Path) -> Option<PathBuf> {
    resolve_exists(path).map(|(p, _)| p)
}

/// [`resolve`], and whether the whole path exists.
pub(crate) fn resolve_exists(path: &Path) -> Option<(PathBuf, bool)> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    let abs = std::path::absolute(path).ok()?;
    let lexical = !abs.components().any(|c| matches!(c, std::path::Component::ParentDir));
    for a in abs.ancestors() {
        let rest = abs.strip_prefix(a).ok()?;
        if rest.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return None;
        }
        // The common case, without procfs: a path with no symlink and no `..` is its own
        // canonical name (one `openat2`; also tells whether it exists).
        if lexical && crate::sys::has_openat2() {
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match openat2(nix::fcntl::AT_FDCWD, a, how) {
                Ok(_) => return Some((abs.components().collect(), rest.as_os_str().is_empty())),
                Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => continue,
                Err(_) => {} // a symlink on the way (ELOOP), ...: ask the kernel its name
            }
        }
        // O_PATH follows symlinks, the last component's too: the directory meant.
        let Ok(fd) = open(a, OFlag::O_PATH | OFlag::O_CLOEXEC, nix::sys::stat::Mode::empty()) else { continue };
        let real = fd_path(std::os::fd::AsFd::as_fd(&fd))?;
        let whole = rest.as_os_str().is_empty();
        return Some((if whole { real } else { real.join(rest) }, whole));
    }
    None
}

/// What of a [`RootfsCache`](crate::RootfsCache) directory `path` is or lies in, if
/// anything: the layer's `fs` directory, or the cache directory for its other parts
/// (`tmp/`, `trash/`, `images/`, `leases/`, `layers/` itself, the cache directory
/// itself). Nothing outside the cache may write there (layers are shared by every
/// sandbox of their images and never modified); this crate's own writers ask this
/// first, and a runtime that writes paths it was given (an extraction target, a diff
/// output) can too. Works across processes, without opening the cache: caches are
/// recognised by their layout and `LOCK` file.
///
/// A path that does not exist (yet) is judged by its nearest existing ancestor, as the
/// kernel would resolve it (symlinks followed); an unresolvable one (a `..` after a
/// missing component) by its spelling. A bind mount of a layer elsewhere is not
/// recognised.
///
/// # Examples
/// ```no_run
/// if let Some(owner) = rootfs_cache::cache_containing("/var/lib/rt/cache/layers/4f2a/fs/etc".as_ref()) {
///     eprintln!("refusing to write into {}", owner.display());
/// }
/// ```
pub fn cache_containing(path: &Path) -> Option<PathBuf> {
    match resolve(path) {
        Some(real) => cache_in(&real),
        None => cache_in(&std::path::absolute(path).ok()?.components().collect::<PathBuf>()),
    }
}

/// [`cache_containing`] for an open directory (one `readlink`).
pub(crate) fn cache_of_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<PathBuf> {
    cache_in(&fd_path(fd)?)
}

thread_local! {
    /// Set while a [`Workspace`](crate::Workspace) mounts its own upper, work dir and
    /// target, which it checked when it made or opened them: the backends' per-mount
    /// check (three `readlink`s, ~10 µs of a ~350 µs warm restore) is skipped then.
    static CHECKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a mount of a workspace's own, already checked dirs) with the backends'
/// cache-layer check of upper, work and target skipped on this thread.
pub(crate) fn with_dirs_checked<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            CHECKED.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(CHECKED.with(|c| c.replace(true)));
    f()
}

/// Whether the caller's dirs were checked already (see [`with_dirs_checked`]).
pub(crate) fn dirs_checked() -> bool {
    CHECKED.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths() {
        let p = |s: &str| Path::new(s).to_path_buf();
        let hit = |s: &str| layer_fs_candidates(Path::new(s)).next().map(|(a, r)| (a.to_path_buf(), r.to_path_buf()));
        assert_eq!(hit("/c/layers/abc/fs"), Some((p("/c/layers/abc/fs"), p("/c"))));
        assert_eq!(hit("/c/layers/abc/fs/etc/x"), Some((p("/c/layers/abc/fs"), p("/c"))));
        assert_eq!(hit("/c/tmp/abc.1/fs/usr"), Some((p("/c/tmp/abc.1/fs"), p("/c"))));
        assert_eq!(hit("/c/trash/abc.2/fs"), Some((p("/c/trash/abc.2/fs"), p("/c"))));
        // A layer that holds a cache-like tree of its own: both are candidates, innermost first.
        let all: Vec<_> = layer_fs_candidates(Path::new("/c/layers/a/fs/x/layers/b/fs/y")).map(|(l, _)| l).collect();
        assert_eq!(all, [Path::new("/c/layers/a/fs/x/layers/b/fs"), Path::new("/c/layers/a/fs")]);
        for miss in ["/", "/fs", "/layers/fs", "/c/layers/abc", "/c/layers/abc/meta", "/c/images/abc/fs", "/srv/rootfs"]
        {
            assert_eq!(hit(miss), None, "{miss}");
        }
    }
}

#[cfg(test)]
mod disk_tests {
    use super::*;

    /// A real cache-shaped tree: found through symlinks and missing tails; a layer whose
    /// content spells the layout does not hide the real layer around it.
    #[test]
    fn recognised_on_disk() {
        let t = std::env::temp_dir().join(format!("rootfs-cache-immutable-{}", std::process::id()));
        let layer = t.join("c/layers/abc/fs");
        std::fs::create_dir_all(layer.join("x/layers/def/fs/y")).unwrap();
        std::fs::write(t.join("c/LOCK"), b"").unwrap();
        std::os::unix::fs::symlink(&layer, t.join("link")).unwrap();
        assert_eq!(cache_containing(&layer), Some(layer.clone()));
        assert_eq!(cache_containing(&t.join("link")), Some(layer.clone()));
        assert_eq!(cache_containing(&t.join("link/not/yet")), Some(layer.clone()));
        assert_eq!(cache_containing(&layer.join("x/layers/def/fs/y")), Some(layer.clone()));
        // The rest of the cache is the cache's too (reported as the cache dir).
        let c = t.join("c");
        for inside in ["c", "c/layers", "c/layers/abc", "c/layers/abc/meta", "c/tmp/x", "c/leases/new"] {
            assert_eq!(cache_containing(&t.join(inside)), Some(c.clone()), "{inside}");
        }
        assert_eq!(cache_containing(&t.join("link/../x")), Some(c.clone()), "through a symlink and ..");
        assert_eq!(cache_containing(&t), None);
        assert_eq!(cache_containing(&t.join("elsewhere/layers/x")), None);
        std::fs::remove_file(t.join("c/LOCK")).unwrap();
        assert_eq!(cache_containing(&layer), None, "no LOCK: not a cache");
        assert_eq!(cache_containing(&c), None, "no LOCK: not a cache");
        std::fs::remove_dir_all(&t).unwrap();
    }
}
