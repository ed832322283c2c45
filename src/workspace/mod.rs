//! [`Workspace`]: one sandbox's writable view of a rootfs, and the diff engine.
//!
//! ```text
//! Workspace::create(dir, lowers, opts)        Workspace::convert(path, backend)
//!   dir/upper    private writes                 path.lower   the original directory
//!   dir/work     overlay's scratch              path.upper   writes
//!   dir/rootfs   the merged view (mount)        path.work    overlay's scratch
//!   dir/skeleton (after detach) the only lower  path         the merged view (mount)
//!   dir/mem      with UpperStorage::Tmpfs: a private tmpfs holding upper/ and work/
//! ```
//!
//! # Checkpoint and restore
//! [`checkpoint`] writes the upper to a file as a block-aligned tar (see
//! [`DiffOptions::aligned`]) whose file data the filesystem can share with the upper
//! (reflinks on XFS and btrfs) instead of copying it; [`restore`] makes a new workspace
//! from such a file, sharing the data back the same way. With
//! [`UpperStorage::Tmpfs`] the upper lives in memory while the sandbox runs and only
//! checkpoints touch the disk.
//!
//! ```no_run
//! # fn demo(lower: &std::path::Path, backend: rootfs_cache::KernelOverlay) -> rootfs_cache::Result<()> {
//! use rootfs_cache::{Workspace, WorkspaceOptions};
//! let mut ws = Workspace::create("/run/sbx/1", lower, WorkspaceOptions::default())?;
//! ws.mount(backend.clone())?;
//! // ... the sandbox runs; the runtime freezes it (`runsc checkpoint`, CRIU) ...
//! ws.checkpoint("/var/lib/ckpt/1.rootfs.tar")?;
//! ws.destroy()?;
//! // Later, maybe on another node with the same image:
//! let mut ws = Workspace::restore("/run/sbx/2", lower, WorkspaceOptions::default(), "/var/lib/ckpt/1.rootfs.tar")?;
//! ws.mount(backend)?;
//! # Ok(()) }
//! ```
//!
//! The diff engine reads the upper directly, never the merged mount: [`changes`]
//! (a [`ChangeSet`]), [`apply`] (flatten into a private lower), [`export_diff`] (an
//! OCI layer tar) and [`detach`] (copy everything up, drop the lowers). Uppers are in
//! overlayfs format whichever [`MountBackend`] mounted them.
//!
//! # Concurrency
//! A `Workspace` is owned by one thread at a time (`&mut self` for everything that
//! changes it). One handle per workspace, across processes: [`create`], [`open`] and
//! [`convert`] take an exclusive `flock` on the workspace dir itself (a converted
//! `path` is a mount point: on `path.lock` next to it instead) and hold it while
//! the handle lives; a second one gets [`Error::Busy`] naming the holder's pid. So
//! commands run from scripts (`rootfsctl`) never interleave on one workspace.
//!
//! # Crash safety
//! Every multi-step change records the step it reached in a journal file
//! (`dir/workspace.journal`, or `path.journal`) before its first change, and a process
//! killed midway (`SIGKILL`, a node losing power after the page cache reached disk)
//! leaves a workspace that the next [`open`] finishes or undoes before anything can
//! mount it:
//!
//! | operation | after a kill midway |
//! |---|---|
//! | [`import_diff`], [`import_diff_file`], [`restore`] | rolled back: the upper is empty again |
//! | [`reset`] | rolled forward: upper and work emptied |
//! | [`apply`] | rolled forward: the flatten (resumable) runs again |
//! | [`detach`] | rolled back before the upper swap (the copy is discarded), forward after it |
//! | [`destroy`] | `open` gives a handle that can only be destroyed, which finishes the job |
//! | [`convert`] | rolled back before the view is mounted (`path.lower` is `path` again) |
//! | [`checkpoint`] | the old checkpoint stays (temp file + rename) |
//! | [`mount`], [`unmount`] | one kernel call each; the copy backend's fold is resumable |
//!
//! A workspace whose tmpfs upper is gone (a reboot, another mount namespace) opens too,
//! for [`destroy`] only.
//!
//! [`create`]: Workspace::create
//! [`open`]: Workspace::open
//! [`convert`]: Workspace::convert
//! [`import_diff`]: Workspace::import_diff
//! [`import_diff_file`]: Workspace::import_diff_file
//! [`reset`]: Workspace::reset
//! [`destroy`]: Workspace::destroy
//! [`mount`]: Workspace::mount
//! [`unmount`]: Workspace::unmount
//!
//! [`changes`]: Workspace::changes
//! [`apply`]: Workspace::apply
//! [`export_diff`]: Workspace::export_diff
//! [`detach`]: Workspace::detach
//! [`checkpoint`]: Workspace::checkpoint
//! [`restore`]: Workspace::restore

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::cache::Rootfs;
use crate::error::{Error, Result};
use crate::fsutil::{clear_dir, open_dir_path};
use crate::mount::copy::{DataLowers, Xattrs, copy_layer};
use crate::mount::{MountBackend, OverlayOptions, OverlaySpec, is_mount_point};
use crate::unpack::{UnpackOptions, WhiteoutMode, unpack};

mod apply;
mod changes;
mod export;
mod journal;
mod scratch;
mod state;
pub(crate) mod tar_writer;
pub(crate) mod walk;

pub use apply::ApplyReport;
pub use changes::{Change, ChangeKind, ChangeSet};
pub use export::{DiffOptions, DiffStats};

/// Where a workspace's lowers come from.
#[derive(Debug)]
pub enum Lowers {
    /// A cached image: the workspace holds its lease until destroyed or detached, and
    /// mounts its data-only lowers ([`Rootfs::data_lowers`]) too.
    Rootfs(Rootfs),
    /// Plain directories, top first.
    Dirs(Vec<PathBuf>),
}

impl From<Rootfs> for Lowers {
    fn from(r: Rootfs) -> Self {
        Lowers::Rootfs(r)
    }
}

impl From<Vec<PathBuf>> for Lowers {
    fn from(d: Vec<PathBuf>) -> Self {
        Lowers::Dirs(d)
    }
}

impl From<&Path> for Lowers {
    fn from(d: &Path) -> Self {
        Lowers::Dirs(vec![d.to_path_buf()])
    }
}

/// Where a workspace keeps its upper and work dirs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpperStorage {
    /// `dir/upper` and `dir/work`, on the filesystem of the workspace dir. Default.
    #[default]
    Disk,
    /// A private tmpfs mounted at `dir/mem` (at most `size` bytes, mode 0700) holding
    /// `upper/` and `work/`: fast scratch space for the sandbox's writes, never written
    /// to disk. It lives until [`destroy`](Workspace::destroy), or until the handle that
    /// created it is dropped (a handle that [`keep`](Workspace::keep)s it, or adopted it
    /// through [`open`](Workspace::open), leaves it mounted); then its contents are gone. Keep what matters with
    /// [`checkpoint`](Workspace::checkpoint) (or [`export_diff`](Workspace::export_diff))
    /// first; [`restore`](Workspace::restore) fills a new one.
    ///
    /// Needs the right to mount tmpfs: root, or a user namespace that owns its mount
    /// namespace (`unshare -Urm`). As root the overlay keeps its metadata (whiteouts'
    /// opaque dirs, ...) in `trusted.overlay.*` xattrs, which tmpfs always supports.
    /// Rootless overlays use `userxattr`, and tmpfs supports `user.*` xattrs only from
    /// Linux 6.6: on older kernels `create` fails with [`Error::Unsupported`], and a
    /// rootless runtime uses [`UpperStorage::Disk`] (on a disk filesystem) instead.
    Tmpfs {
        /// Size limit in bytes (the tmpfs `size=`); writes beyond it fail with `ENOSPC`.
        /// Must not be 0 (which tmpfs would read as "unlimited").
        size: u64,
    },
}

/// Options for [`Workspace::create`].
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct WorkspaceOptions {
    /// Overlay features for every mount of this workspace (`volatile`, `userxattr`, ...).
    /// `fresh` is ignored: the workspace knows when its upper must be empty.
    pub overlay: OverlayOptions,
    /// Empty a leftover upper (a crashed sandbox's writes, or its leftover
    /// [`UpperStorage::Tmpfs`] mount) instead of refusing with [`Error::NotEmpty`] /
    /// [`Error::AlreadyMounted`]. Default: false.
    pub reset: bool,
    /// Where the upper lives. Default: [`UpperStorage::Disk`].
    pub upper: UpperStorage,
}

impl WorkspaceOptions {
    /// Options with the upper in a private tmpfs of at most `size` bytes (see
    /// [`UpperStorage::Tmpfs`]).
    pub fn tmpfs(size: u64) -> Self {
        WorkspaceOptions { upper: UpperStorage::Tmpfs { size }, ..Default::default() }
    }
}

/// A sandbox's upper, work dir and merged mount point, bound to its lowers.
///
/// # Ownership
/// A handle tears down only what it set up itself, and everything else only when asked:
///
/// | resource | set up by | torn down by |
/// |---|---|---|
/// | merged view (mount) | [`mount`], [`convert`] | [`unmount`], [`reset`], [`destroy`]; dropping **the handle that mounted it** |
/// | tmpfs upper ([`UpperStorage::Tmpfs`]) | [`create`], [`restore`] | [`destroy`]; dropping **the handle that created it** |
/// | upper, work, directories | [`create`], [`convert`] | [`reset`] (upper and work emptied), [`destroy`] |
/// | cache lease ([`Lowers::Rootfs`]) | [`create`] | [`detach`], [`destroy`], dropping the handle |
///
/// - A handle from [`open`] **adopts** a workspace: a view mounted and a tmpfs mounted
///   by an earlier handle or another process stay when it is dropped, whatever happened
///   in between (an error on any path included). Only what it mounted itself (a
///   [`mount`] after `open`) is unmounted on drop.
/// - [`keep`] gives up ownership of everything: the handle is dropped and the
///   workspace stays as it is, described for the next [`open`].
/// - Every method that fails leaves the mounts, the upper (on disk or in its tmpfs),
///   the lease and the cache as they were before the call ([`apply`], [`detach`] and
///   [`reset`] remount what they unmounted; a failed [`create`] removes what it made).
///   A failed [`destroy`] leaves the workspace as it is and describes it for [`open`].
/// - Dropping a handle whose own unmount fails keeps its cache lease pinned for the
///   rest of the process (the view still uses the layers) and its tmpfs mounted.
/// - Nothing here writes into a cache layer: [`apply`] and [`convert`] refuse one with
///   [`Error::ImmutableLayer`], however it is named.
///
/// [`mount`]: Workspace::mount
/// [`unmount`]: Workspace::unmount
/// [`convert`]: Workspace::convert
/// [`reset`]: Workspace::reset
/// [`destroy`]: Workspace::destroy
/// [`create`]: Workspace::create
/// [`restore`]: Workspace::restore
/// [`detach`]: Workspace::detach
/// [`open`]: Workspace::open
/// [`keep`]: Workspace::keep
/// [`apply`]: Workspace::apply
pub struct Workspace {
    dir: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    target: PathBuf,
    lowers: Vec<PathBuf>,
    /// Data-only lowers, top first: a lazy image's ([`Rootfs::data_lowers`]), else none.
    data_lowers: Vec<PathBuf>,
    rootfs: Option<Rootfs>,
    options: OverlayOptions,
    backend: Option<Box<dyn MountBackend>>,
    /// `convert`ed: `path.lower` is this workspace's own, and `destroy` puts it back.
    converted: bool,
    /// The tmpfs mount point holding upper and work ([`UpperStorage::Tmpfs`]).
    scratch: Option<PathBuf>,
    /// Where the upper lives (recorded for [`Workspace::open`]).
    storage: UpperStorage,
    /// What this handle set up itself, and so tears down when dropped (see
    /// `# Ownership` on [`Workspace`]).
    owns: Owns,
    /// The workspace's lock, held while the handle lives (one handle per workspace,
    /// across processes). `None` only after `keep`/`destroy` gave it up.
    lock: Option<crate::lockfile::LockFile>,
    /// Where the step of a multi-step change is recorded (see `journal`).
    journal: PathBuf,
    /// Found half destroyed by `open`: only `destroy` may run.
    destroying: bool,
    /// A tmpfs upper that is gone (unmounted by hand, a reboot): only `destroy` may run.
    scratch_lost: bool,
    /// A journal entry `open` could not act on because a view is mounted over it: only
    /// `unmount` and `destroy` may run (the next `open` recovers).
    pending: bool,
    /// `workspace.json` says what this handle knows (`keep` need not write it again).
    described: bool,
    /// The directories `create` made (deepest last), so that a `restore` failing after
    /// it removes exactly those.
    created: Vec<PathBuf>,
}

/// `path` with `ext` appended to its last component (`dir` → `dir.lower`).
fn sidecar(path: &Path, ext: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(ext);
    PathBuf::from(s)
}

/// A converted workspace's lock file, `path.lock` next to it (a created workspace locks
/// its own dir; a converted `path` is a mount point, so it cannot).
const LOCK_FILE: &str = ".lock";

/// The resources a [`Workspace`] handle set up itself (as opposed to adopted from an
/// earlier handle or process through [`Workspace::open`]).
#[derive(Clone, Copy, Debug, Default)]
struct Owns {
    /// This handle mounted the merged view: dropping it unmounts.
    mount: bool,
    /// This handle mounted the tmpfs holding the upper: dropping it unmounts (and its
    /// contents are gone).
    scratch: bool,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("dir", &self.dir)
            .field("lowers", &self.lowers)
            .field("data_lowers", &self.data_lowers)
            .field("mounted", &self.backend.is_some())
            .field("leased", &self.rootfs.is_some())
            .field("tmpfs", &self.scratch.is_some())
            .finish()
    }
}

/// Creates `p` unless it exists; whether it was created.
fn mkdir(p: &Path) -> Result<bool> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io("mkdir", p, e)),
    }
}

/// `path.lower`, `path.upper`, `path.work`: the directories of a `convert`ed `path`.
fn converted_dirs(path: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (sidecar(path, ".lower"), sidecar(path, ".upper"), sidecar(path, ".work"))
}

/// Empties `dir`, refusing if anything is mounted inside it.
fn empty_dir(dir: &Path) -> Result<()> {
    empty_dirs(&[dir])
}

/// Empties each of `dirs`, refusing before deleting anything if anything is mounted
/// inside one: small trees by one checked walk, others after one read of the mount table.
fn empty_dirs(dirs: &[&Path]) -> Result<()> {
    if crate::mount::mountinfo::clear_small(dirs)? {
        return Ok(());
    }
    refuse_mounts_under(dirs)?;
    for dir in dirs {
        let fd = open_dir_path(dir)?;
        clear_dir(fd.as_fd(), dir)?;
    }
    Ok(())
}

/// `dir` as the kernel resolves it (absolute, symlinks in the existing part resolved):
/// a workspace works on its real directory, never through a link, so a symlinked
/// `WS_DIR` cannot make `destroy` delete one thing and then fail on another.
fn canonical_dir(dir: &Path) -> Result<PathBuf> {
    crate::immutable::resolve(dir).ok_or_else(|| Error::InvalidSpec {
        reason: format!("{}: cannot be resolved (a `..` after a missing directory?)", dir.display()),
    })
}

/// Names a workspace makes in its dir (and in `mem/` for a tmpfs upper).
const OWN_NAMES: [&str; 7] = ["upper", "work", "rootfs", "mem", "skeleton", "upper.detach", "upper.old"];

/// Refuses a workspace dir inside another workspace's own directories (its upper, work
/// dir, merged view, tmpfs, ...) or a converted dir's `.lower`/`.upper`/`.work`:
/// creating one there would write into a live sandbox. Looks at the disk only for
/// ancestors named like those (a `stat` each).
fn refuse_inside_workspace(real: &Path) -> Result<()> {
    for a in real.ancestors() {
        let (Some(name), Some(parent)) = (a.file_name().and_then(|n| n.to_str()), a.parent()) else { continue };
        let owned = if OWN_NAMES.contains(&name) {
            [state::FILE, journal::FILE].iter().any(|f| parent.join(f).exists())
        } else if let Some(base) =
            name.strip_suffix(".lower").or_else(|| name.strip_suffix(".upper")).or_else(|| name.strip_suffix(".work"))
        {
            let (l, u, _) = converted_dirs(&parent.join(base));
            l.is_dir() && u.is_dir()
        } else {
            false
        };
        if owned {
            return Err(Error::InvalidSpec {
                reason: format!("{} is inside the workspace directory {}", real.display(), a.display()),
            });
        }
    }
    Ok(())
}

/// Undoes a `convert` killed before its mount: `path` (empty, as `convert` made it) and
/// `path.upper`/`path.work` (as `convert` made them: nothing written into them yet) go,
/// and `path.lower` is `path` again. Anything else there is refused, nothing deleted.
fn undo_convert(path: &Path, lower: &Path, upper: &Path, work: &Path) -> Result<()> {
    if !lower.is_dir() {
        return Ok(()); // never moved
    }
    for d in [path, upper, work] {
        refuse_link(d)?;
        if d.exists() && !crate::fsutil::is_empty_dir(d)? {
            return Err(Error::NotEmpty { path: d.to_path_buf() });
        }
    }
    for d in [upper, work] {
        if d.exists() {
            empty_dir(d)?;
            std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e))?;
        }
    }
    if path.exists() {
        std::fs::remove_dir(path).map_err(|e| Error::io("rmdir", path, e))?;
    }
    std::fs::rename(lower, path).map_err(|e| Error::io("rename", path, e))
}

/// Refuses `path` when it exists as anything but a real directory (a symlink, a file):
/// a workspace's own directories are used, emptied and deleted by name, and a link
/// there could reach another sandbox or a cache layer.
fn refuse_link(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_dir() => Err(Error::InvalidSpec {
            reason: format!("{} is not a directory of this workspace (a symlink or a file)", path.display()),
        }),
        _ => Ok(()),
    }
}

/// Rule 4: a cache layer (or anything inside one) is never written, whichever path
/// names it; see [`crate::immutable::cache_containing`].
fn refuse_cache_layer(path: &Path, op: &'static str) -> Result<()> {
    match crate::immutable::cache_containing(path) {
        Some(layer) => Err(Error::ImmutableLayer { op, path: layer }),
        None => Ok(()),
    }
}

/// Rule 8: never delete through a live mount.
fn refuse_mounts_under(dirs: &[&Path]) -> Result<()> {
    match crate::mount::mountinfo::mount_under(dirs, true)? {
        Some(m) => Err(Error::AlreadyMounted { path: m }),
        None => Ok(()),
    }
}

/// Gives the upper root the metadata of the top lower's root: overlayfs shows the
/// upper root's mode, owner and times as the merged root's.
fn seed_upper_root(upper: &Path, top_lower: &Path) -> Result<()> {
    seed_root(upper, top_lower, false, None)
}

/// [`seed_upper_root`]; `new`: the upper was just made (no xattrs of its own to clear);
/// `m`: the top lower's metadata, when the caller has it.
fn seed_root(upper: &Path, top_lower: &Path, new: bool, m: Option<&std::fs::Metadata>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let stat;
    let m = match m {
        Some(m) => m,
        None => {
            stat = std::fs::metadata(top_lower).map_err(|e| Error::io("stat", top_lower, e))?;
            &stat
        }
    };
    if nix::unistd::geteuid().is_root() {
        match std::os::unix::fs::chown(upper, Some(m.uid()), Some(m.gid())) {
            Ok(()) => {}
            // In a user namespace the lower's owner may be unmapped (shown as the
            // overflow id): the upper root stays ours, as rootless extraction leaves files.
            Err(e)
                if crate::privilege::in_user_namespace()
                    && matches!(e.raw_os_error(), Some(nix::libc::EINVAL | nix::libc::EPERM)) => {}
            Err(e) => return Err(Error::io("chown", upper, e)),
        }
    }
    std::fs::set_permissions(upper, std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(|e| Error::io("chmod", upper, e))?;
    sync_root_xattrs(upper, top_lower, new)?;
    let t = nix::sys::time::TimeSpec::new(m.mtime(), m.mtime_nsec());
    let a = nix::sys::time::TimeSpec::new(m.atime(), m.atime_nsec());
    nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, upper, &a, &t, nix::sys::stat::UtimensatFlags::FollowSymlink)
        .map_err(|e| Error::io("utimensat", upper, e))
}

/// Gives the upper root the top lower root's image xattrs (kept escaped, as both are
/// layers in overlay format) and removes any other image xattr a previous sandbox set
/// on `/`; overlay's own metadata on the upper root is left alone.
fn sync_root_xattrs(upper: &Path, top_lower: &Path, new: bool) -> Result<()> {
    use crate::unpack::whiteout::unescape_xattr;
    let list = |fd: std::os::fd::BorrowedFd<'_>, p: &Path| match crate::sys::flistxattr(fd) {
        Ok(names) => Ok(names.into_iter().filter(|n| unescape_xattr(n).is_some()).collect::<Vec<_>>()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => Ok(Vec::new()),
        Err(e) => Err(Error::io("flistxattr", p, e)),
    };
    let lfd = open_dir_path(top_lower)?;
    let want = list(lfd.as_fd(), top_lower)?;
    if new && want.is_empty() {
        return Ok(());
    }
    let ufd = open_dir_path(upper)?;
    // Unprivileged, `trusted.*` cannot be written (or read): skipped, as extraction does.
    let tolerable = |e: &std::io::Error| {
        crate::privilege::unprivileged() && matches!(e.raw_os_error(), Some(nix::libc::EPERM | nix::libc::EOPNOTSUPP))
    };
    let have = if new { Vec::new() } else { list(ufd.as_fd(), upper)? };
    for n in have.into_iter().filter(|n| !want.contains(n)) {
        match crate::sys::removexattr_at_nofollow(ufd.as_fd(), b".", &n) {
            Err(e) if !tolerable(&e) && e.raw_os_error() != Some(nix::libc::ENODATA) => {
                return Err(Error::io("lremovexattr", upper, e));
            }
            _ => {}
        }
    }
    for n in want {
        let Some(v) = crate::sys::fgetxattr(lfd.as_fd(), &n).map_err(|e| Error::io("fgetxattr", top_lower, e))? else {
            continue;
        };
        match crate::sys::fsetxattr(ufd.as_fd(), &n, &v) {
            Err(e) if !tolerable(&e) => return Err(Error::io("fsetxattr", upper, e)),
            _ => {}
        }
    }
    Ok(())
}

impl Workspace {
    /// A new workspace in `dir` (created if missing) over `lowers`, with an empty upper
    /// and work dir, not mounted.
    ///
    /// # Errors
    /// [`Error::NotEmpty`] when `dir/upper` holds writes or `dir` holds a kept
    /// workspace (`workspace.json`) (unless `opts.reset`), [`Error::AlreadyMounted`] when
    /// something is still mounted in `dir`, [`Error::ImmutableLayer`] for a `dir` inside a
    /// cache layer, [`Error::InvalidSpec`] without lowers, or I/O errors. A failed
    /// `create` removes the directories and the tmpfs it made (and drops the lease it
    /// was given); what was there before stays (except what `opts.reset` was asked to
    /// empty).
    pub fn create(dir: impl AsRef<Path>, lowers: impl Into<Lowers>, opts: WorkspaceOptions) -> Result<Self> {
        // The directory the kernel will use, symlinks resolved: every later step, and
        // `destroy`, works on it, never through a link.
        let (dir, dir_exists) = crate::immutable::resolve_exists(dir.as_ref()).ok_or_else(|| Error::InvalidSpec {
            reason: format!("{}: cannot be resolved (a `..` after a missing directory?)", dir.as_ref().display()),
        })?;
        let (lowers, data_lowers, rootfs) = match lowers.into() {
            Lowers::Rootfs(r) => (r.lowers().to_vec(), r.data_lowers().to_vec(), Some(r)),
            Lowers::Dirs(d) => (d, Vec::new(), None),
        };
        // Absolute: the workspace is mounted (and maybe reopened) from anywhere.
        let absolute = |dirs: &[PathBuf]| {
            dirs.iter()
                .map(|l| std::path::absolute(l).map_err(|e| Error::io("getcwd", l, e)))
                .collect::<Result<Vec<_>>>()
        };
        let (lowers, data_lowers) = (absolute(&lowers)?, absolute(&data_lowers)?);
        if lowers.is_empty() {
            return Err(Error::InvalidSpec { reason: "a workspace needs at least one lower directory".into() });
        }
        if opts.upper == (UpperStorage::Tmpfs { size: 0 }) {
            return Err(Error::InvalidSpec { reason: "a tmpfs upper needs a size limit above 0".into() });
        }
        // Rule 4, before anything is made (and never inside another workspace's dirs).
        if let Some(c) = crate::immutable::cache_in_with(&dir, dir_exists) {
            return Err(Error::ImmutableLayer { op: "create a workspace inside it", path: c });
        }
        refuse_inside_workspace(&dir)?;
        // The top lower gives the upper root its metadata: checked before anything is made.
        let top = std::fs::metadata(&lowers[0]).map_err(|e| Error::io("stat", &lowers[0], e))?;
        if !top.is_dir() {
            return Err(Error::InvalidSpec { reason: format!("lower {} is not a directory", lowers[0].display()) });
        }
        // What this call made, so that a failure removes exactly that (deepest last).
        let mut made: Vec<PathBuf> = Vec::new();
        // A directory made here holds nothing: no leftovers to check or clear.
        let fresh = match std::fs::create_dir(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(_) => {
                // Remember each missing ancestor, so a failure takes them away again.
                let missing: Vec<PathBuf> = dir
                    .ancestors()
                    .take_while(|a| std::fs::symlink_metadata(a).is_err())
                    .map(Path::to_path_buf)
                    .collect();
                if let Err(e) = std::fs::create_dir_all(&dir) {
                    // Made partway: take away what was made (deepest first).
                    for a in &missing {
                        let _ = std::fs::remove_dir(a);
                    }
                    return Err(Error::io("mkdir", &dir, e));
                }
                made.extend(missing.into_iter().rev());
                true
            }
        };
        if fresh && made.is_empty() {
            made.push(dir.clone());
        }
        let mut options = opts.overlay;
        options.fresh = false;
        let mut ws = Workspace {
            upper: dir.join("upper"),
            work: dir.join("work"),
            target: dir.join("rootfs"),
            journal: dir.join(journal::FILE),
            dir,
            lowers,
            data_lowers,
            rootfs,
            options,
            backend: None,
            converted: false,
            scratch: None,
            storage: opts.upper,
            owns: Owns::default(),
            lock: None,
            destroying: false,
            scratch_lost: false,
            pending: false,
            described: false,
            created: Vec::new(),
        };
        // A dir a killed `restore` left (a journal, no description) is taken over: its
        // upper is emptied as `reset` would (the import is rolled back).
        let half_made = !fresh && ws.journal.exists() && !ws.dir.join(state::FILE).exists();
        let reset = opts.reset || half_made;
        // Refusals first, before anything in an existing dir changes (its mtime too).
        if !fresh {
            ws.precheck(reset)?;
        }
        // The dir itself is the lock. A fresh dir that someone else locked first is
        // theirs now: leave it; any other failure takes away what this call made.
        match crate::lockfile::LockFile::acquire_dir(&ws.dir, fresh) {
            Ok(lock) => ws.lock = Some(lock),
            Err(e @ Error::Busy { .. }) => return Err(e),
            Err(e) => {
                ws.created = made;
                ws.undo_create();
                return Err(e);
            }
        }
        let done = if fresh {
            ws.populate(fresh, reset, &mut made, Some(&top))
        } else {
            // Again, now that no other handle can change the dir.
            ws.precheck(reset).and_then(|()| ws.populate(fresh, reset, &mut made, Some(&top)))
        };
        ws.created = made;
        let done = done.and_then(|()| {
            if !fresh {
                // `reset` over a kept or half-done workspace: its description and
                // journal are the old workspace's.
                if ws.dir.join(state::FILE).exists() {
                    ws.save_state()?;
                }
                journal::end(&ws.journal)?;
            }
            Ok(())
        });
        match done {
            Ok(()) => Ok(ws),
            Err(e) => {
                ws.undo_create();
                Err(e)
            }
        }
    }

    /// Removes what `create` made (its tmpfs and directories), nothing else: a failed
    /// `create` or `restore` leaves the dir as it found it.
    fn undo_create(&mut self) {
        if let Some(mem) = self.scratch.take() {
            if scratch::unmount(&mem).is_err() {
                // Still mounted: leave everything (the handle gives it up).
                self.owns = Owns::default();
                return;
            }
            self.owns.scratch = false;
        }
        for d in std::mem::take(&mut self.created).iter().rev() {
            let _ = empty_dir(d).and_then(|()| std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e)));
        }
    }

    /// What [`create`](Workspace::create) refuses about an existing `dir`, checked
    /// without changing anything: cache layers (rule 4; leftovers may be symlinks), a
    /// kept or half-changed workspace (unless `reset`), a live copy-backend view (even
    /// with `reset`), mounts inside, a non-empty upper or tmpfs mount point.
    fn precheck(&self, reset: bool) -> Result<()> {
        self.check_own_dirs()?;
        let mem = self.dir.join("mem");
        for d in [&self.dir, &self.upper, &self.work, &self.target, &mem] {
            refuse_cache_layer(d, "create a workspace inside it")?;
        }
        if !reset {
            // A kept workspace (maybe mounted by another process), or one a crashed
            // process was changing: never adopt its directories as a new one's.
            let state = self.dir.join(state::FILE);
            if state.exists() {
                return Err(Error::NotEmpty { path: state });
            }
        }
        // A view mounted with the copy backend is no mount: its state in the work dir
        // says it is live (or its process died with the writes still in the view).
        // Never empty that work dir or pull its tmpfs, `reset` or not.
        for work in [&self.work, &mem.join("work")] {
            if [crate::mount::copy::STATE, crate::mount::copy::CLEARING].iter().any(|f| work.join(f).exists()) {
                return Err(Error::AlreadyMounted { path: self.target.clone() });
            }
        }
        if !reset {
            refuse_mounts_under(&[&self.dir])?;
            match self.storage {
                UpperStorage::Disk => {
                    if self.upper.exists() && !crate::fsutil::is_empty_dir(&self.upper)? {
                        return Err(Error::NotEmpty { path: self.upper.clone() });
                    }
                }
                UpperStorage::Tmpfs { .. } => scratch::check(&mem)?,
            }
        }
        Ok(())
    }

    /// The part of [`create`](Workspace::create) that makes (or resets) the upper, work
    /// and mount point dirs in `self.dir`, recording each directory it makes in `made`.
    fn populate(
        &mut self,
        fresh: bool,
        reset: bool,
        made: &mut Vec<PathBuf>,
        top: Option<&std::fs::Metadata>,
    ) -> Result<()> {
        let mk = |p: &Path, made: &mut Vec<PathBuf>| -> Result<bool> {
            let new = mkdir(p)?;
            if new {
                made.push(p.to_path_buf());
            }
            Ok(new)
        };
        let mem = self.dir.join("mem");
        if !fresh {
            // (`precheck` has refused what must be refused.)
            if reset {
                scratch::release_leftover(&mem, &self.target)?;
            }
            refuse_mounts_under(&[&self.dir])?;
        }
        // A new upper has no xattrs to clear from its root.
        let mut new_upper = true;
        match self.storage {
            UpperStorage::Disk => {
                if !fresh && self.upper.exists() && !crate::fsutil::is_empty_dir(&self.upper)? {
                    if !reset {
                        return Err(Error::NotEmpty { path: self.upper.clone() });
                    }
                    empty_dir(&self.upper)?;
                }
                new_upper = mk(&self.upper, made)?;
                let new_work = mk(&self.work, made)?;
                mk(&self.target, made)?;
                // Work holds only overlay scratch (and a crashed volatile mount's marker):
                // never data, always thrown away.
                if !new_work {
                    empty_dir(&self.work)?;
                }
            }
            UpperStorage::Tmpfs { size } => {
                // What `scratch::mount` refuses, refused before anything is made.
                scratch::check(&mem)?;
                mk(&self.target, made)?;
                if std::fs::symlink_metadata(&mem).is_err() {
                    made.push(mem.clone());
                }
                scratch::mount(&mem, size)?;
                // From here on, this handle owns the tmpfs: dropping it unmounts it.
                self.scratch = Some(mem.clone());
                self.owns.scratch = true;
                self.upper = mem.join("upper");
                self.work = mem.join("work");
                for d in [&self.upper, &self.work] {
                    mkdir(d)?;
                }
                scratch::mark(&mem, self.userxattr())?;
            }
        }
        seed_root(&self.upper, &self.lowers[0], new_upper, top)
    }

    /// Records what [`open`](Workspace::open) needs in `dir/workspace.json`.
    fn save_state(&mut self) -> Result<()> {
        if self.converted {
            return Ok(());
        }
        state::State::new(&self.lowers, &self.data_lowers, self.storage, &self.options).save(&self.dir)?;
        self.described = true;
        Ok(())
    }

    /// Writes the workspace's description (`dir/workspace.json`, atomically) now, so that
    /// [`open`](Workspace::open) can find it, and keeps the handle: a caller that hands
    /// the workspace over can see this fail while it can still undo (`destroy`) what it
    /// made. [`keep`](Workspace::keep) writes it too, when it is not up to date.
    ///
    /// # Errors
    /// I/O errors (`ENOSPC`, ...); the description is then the old one (or none).
    pub fn describe(&mut self) -> Result<()> {
        self.save_state()
    }

    /// Picks up a workspace made earlier, maybe by another process: one made by
    /// [`create`](Workspace::create) in `dir` and left with [`keep`](Workspace::keep)
    /// (from `dir/workspace.json`), or one made by
    /// [`convert`](Workspace::convert) of `dir` (`dir.lower`, `dir.upper`, `dir.work`
    /// next to it). A merged view still mounted is recognised (a kernel overlay on the
    /// mount point, or the copy backend's state in the work dir), so
    /// [`unmount`](Workspace::unmount) works from here; a tmpfs upper is picked up where
    /// it is mounted.
    ///
    /// The handle holds no cache lease: a process that hands a workspace over to another
    /// keeps its image with a persisted lease ([`Rootfs::persist`](crate::Rootfs::persist)).
    /// The handle **adopts** what it finds: dropping it (after an error, too) leaves a
    /// mounted view and a tmpfs upper as they are; only what it sets up itself (a
    /// [`mount`](Workspace::mount)) is torn down on drop, and [`unmount`](Workspace::unmount)
    /// and [`destroy`](Workspace::destroy) tear down on request (see `# Ownership` on
    /// [`Workspace`]). End with [`keep`](Workspace::keep) to record what changed.
    ///
    /// # Errors
    /// [`Error::NotFound`] when `dir` holds no workspace; [`Error::InvalidSpec`] for a
    /// damaged `workspace.json`; [`Error::Unsupported`] when a tmpfs upper is no longer
    /// mounted (its contents are gone); I/O errors.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = canonical_dir(dir.as_ref())?;
        // Which kind, without making anything (no lock file in a dir that holds no
        // workspace): a created one (described, or half destroyed), or a converted dir.
        let (lower, upper, work) = converted_dirs(&dir);
        let created = |d: &Path| d.join(state::FILE).exists() || d.join(journal::FILE).exists();
        let converted_journal = sidecar(&dir, ".journal");
        let converted =
            !created(&dir) && ((lower.is_dir() && upper.is_dir() && work.is_dir()) || converted_journal.exists());
        if !created(&dir) && !converted {
            return Err(Error::NotFound { what: format!("a workspace in {}", dir.display()) });
        }
        let (lock_path, journal_path) = if converted {
            (sidecar(&dir, LOCK_FILE), sidecar(&dir, ".journal"))
        } else {
            (dir.clone(), dir.join(journal::FILE))
        };
        let lock = if converted {
            crate::lockfile::LockFile::acquire(&lock_path, &dir)?
        } else {
            crate::lockfile::LockFile::acquire_dir(&lock_path, false)?
        };
        // Under the lock: still there? (Another process may have destroyed it.)
        if !(if converted { (lower.is_dir() && upper.is_dir()) || converted_journal.exists() } else { created(&dir) }) {
            let _ = lock.remove();
            return Err(Error::NotFound { what: format!("a workspace in {}", dir.display()) });
        }
        // An entry this code cannot read (a power cut after the rename, before the data
        // reached the disk; a hand-edited file) says some change was in progress, not
        // which: the workspace can only be destroyed.
        let step = match journal::read(&journal_path) {
            Ok(step) => step,
            Err(Error::InvalidSpec { .. }) => Some(journal::Step::Destroy),
            Err(e) => return Err(e),
        };
        if converted && step == Some(journal::Step::Convert) {
            if is_mount_point(&dir)? || work.join(crate::mount::copy::STATE).exists() {
                // Killed after the mount: the convert is complete but for its journal.
                journal::end(&journal_path)?;
            } else {
                // A copy-backend view killed while being copied into `path`: what is
                // there are copies, never the sandbox's (the `.clearing` marker says so).
                let clearing = work.join(crate::mount::copy::CLEARING);
                if clearing.exists() {
                    empty_dir(&dir)?;
                    std::fs::remove_file(&clearing).map_err(|e| Error::io("unlink", &clearing, e))?;
                }
                undo_convert(&dir, &lower, &upper, &work)?;
                journal::end(&journal_path)?;
                let _ = lock.remove();
                return Err(Error::NotFound {
                    what: format!("a workspace in {} (an interrupted convert was undone)", dir.display()),
                });
            }
        }
        let mut ws = if converted {
            Workspace {
                target: dir.clone(),
                dir,
                upper,
                work,
                options: OverlayOptions::default(),
                lowers: vec![lower],
                data_lowers: Vec::new(),
                rootfs: None,
                backend: None,
                converted: true,
                scratch: None,
                storage: UpperStorage::Disk,
                owns: Owns::default(),
                lock: Some(lock),
                journal: journal_path,
                destroying: step == Some(journal::Step::Destroy),
                scratch_lost: false,
                pending: false,
                described: true,
                created: Vec::new(),
            }
        } else {
            let st = state::State::load(&dir)?;
            // A journal without a description: a `restore` (or a destroy) killed midway,
            // whose lowers nobody recorded. It can only be destroyed (or made anew by
            // `create`, which takes such a dir over).
            let destroying = step == Some(journal::Step::Destroy) || st.is_none();
            let Some(st) = st.or_else(|| destroying.then(state::State::gone)) else {
                return Err(Error::NotFound { what: format!("a workspace in {}", dir.display()) });
            };
            let mem = dir.join("mem");
            let (upper, work, scratch, storage, scratch_lost) = match st.tmpfs_size {
                None => (dir.join("upper"), dir.join("work"), None, UpperStorage::Disk, false),
                Some(size) => {
                    // Gone (unmounted by hand, a reboot, another mount namespace): its
                    // contents are lost; the handle can still be destroyed.
                    let lost = !is_mount_point(&mem)?;
                    let scratch = (!lost).then(|| mem.clone());
                    (mem.join("upper"), mem.join("work"), scratch, UpperStorage::Tmpfs { size }, lost)
                }
            };
            Workspace {
                target: dir.join("rootfs"),
                dir,
                upper,
                work,
                options: st.options(),
                lowers: st.lowers,
                data_lowers: st.data_lowers,
                rootfs: None,
                backend: None,
                converted: false,
                scratch,
                storage,
                // Adopted: whatever is mounted stays mounted when this handle goes.
                owns: Owns::default(),
                lock: Some(lock),
                journal: journal_path,
                destroying,
                scratch_lost,
                pending: false,
                described: true,
                created: Vec::new(),
            }
        };
        // Rule 4: this handle may mount, reset, import into and apply to these dirs,
        // whatever `workspace.json` or a symlink in `dir` says they are; and its own
        // directories are real ones, never links to another sandbox's.
        for d in [&ws.dir, &ws.upper, &ws.work, &ws.target] {
            refuse_cache_layer(d, "use it in a workspace")?;
        }
        ws.check_own_dirs()?;
        if is_mount_point(&ws.target)? {
            ws.backend = Some(Box::new(crate::mount::KernelOverlay::new()));
        } else if [crate::mount::copy::STATE, crate::mount::copy::CLEARING].iter().any(|f| ws.work.join(f).exists()) {
            // A copy-backend view, or one whose unmount was killed while clearing the
            // target (unmount finishes it).
            ws.backend = Some(Box::new(crate::mount::CopyBackend::new()));
        }
        if let Some(step) = step {
            if ws.backend.is_some() && !ws.destroying {
                // A view mounted over a half-done change is not this crate's doing (every
                // journalled step runs unmounted): leave both alone; `unmount` and
                // `destroy` still work, and the next `open` after `unmount` recovers.
                ws.pending = true;
            } else if !ws.destroying && !ws.scratch_lost {
                ws.recover(step)?;
            }
        }
        Ok(ws)
    }

    /// Finishes or undoes the step a killed process left in the journal (see
    /// `journal`): after this, the workspace is whole and may be mounted.
    fn recover(&mut self, step: journal::Step) -> Result<()> {
        use journal::Step;
        match step {
            Step::Import => self.empty_upper(false)?,
            Step::Reset => self.empty_upper(true)?,
            Step::Apply => {
                apply::apply(&self.upper, &self.lowers[0], self.userxattr(), &self.apply_times())?;
                self.empty_upper(true)?;
                journal::end(&self.journal)?;
                let _ = std::fs::remove_file(self.apply_times());
                return Ok(());
            }
            Step::Detach | Step::DetachSwapped => self.recover_detach(step == Step::DetachSwapped)?,
            Step::Destroy => return Ok(()),
            // Only a converted dir's (undone in `open`); anywhere else it means nothing.
            Step::Convert => {}
        }
        journal::end(&self.journal)
    }

    /// Empties the upper (and the work dir) and gives the upper root the lower's
    /// metadata again: an empty upper, as `create` makes it.
    fn empty_upper(&self, work: bool) -> Result<()> {
        if work {
            empty_dirs(&[&self.upper, &self.work])?;
        } else {
            empty_dir(&self.upper)?;
        }
        seed_upper_root(&self.upper, &self.lowers[0])
    }

    /// `detach` killed midway: before the swap, the original upper is put back and the
    /// copy thrown away; after it, the detached upper stays and the lowers become the
    /// skeleton (the lease is released by whoever holds it: `destroy`, `release`).
    fn recover_detach(&mut self, swapped: bool) -> Result<()> {
        let fresh = self.upper.with_file_name("upper.detach");
        let old = self.upper.with_file_name("upper.old");
        let remove = |d: &Path| -> Result<()> {
            if d.exists() {
                empty_dir(d)?;
                std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e))?;
            }
            Ok(())
        };
        // Both there: the second rename happened (only its journal entry did not).
        if swapped || (self.upper.is_dir() && old.is_dir()) {
            remove(&old)?;
            remove(&fresh)?;
            empty_dir(&self.work)?;
            self.lowers = vec![self.dir.join("skeleton")];
            self.data_lowers.clear();
            self.save_state()
        } else {
            if !self.upper.exists() && old.is_dir() {
                std::fs::rename(&old, &self.upper).map_err(|e| Error::io("rename", &self.upper, e))?;
            }
            remove(&fresh)?;
            remove(&old)
        }
    }

    /// Where `apply` records the upper directories' times before its first change, next
    /// to the journal (kept until the journal entry goes, so a rerun after a kill gives
    /// the lower directories the sandbox's times, not those of the interrupted run).
    fn apply_times(&self) -> PathBuf {
        sidecar(&self.journal, ".times")
    }

    /// Refuses a workspace whose own directories are links or files (see [`refuse_link`]).
    fn check_own_dirs(&self) -> Result<()> {
        if self.converted {
            let (l, u, w) = converted_dirs(&self.dir);
            return [l, u, w].iter().try_for_each(|d| refuse_link(d));
        }
        let mem = self.dir.join("mem");
        OWN_NAMES
            .iter()
            .map(|n| self.dir.join(n))
            .chain([mem.join("upper"), mem.join("work")])
            .try_for_each(|d| refuse_link(&d))
    }

    /// Refuses work on a workspace `open` found half destroyed, or whose tmpfs upper is
    /// gone: only [`destroy`](Workspace::destroy) makes sense there.
    fn usable(&self, what: &str) -> Result<()> {
        if self.destroying {
            return Err(Error::Unsupported {
                what: format!("{what} of {}: it was being destroyed; destroy it again", self.dir.display()),
            });
        }
        if self.pending {
            return Err(Error::Unsupported {
                what: format!(
                    "{what} of {}: a change was left half done under a mounted view; unmount, then open it again",
                    self.dir.display()
                ),
            });
        }
        if self.scratch_lost {
            return Err(Error::Unsupported {
                what: format!(
                    "{what} of {}: its tmpfs upper is not mounted any more (its writes are gone); destroy it",
                    self.dir.display()
                ),
            });
        }
        Ok(())
    }

    /// Writes the workspace's description (`dir/workspace.json`, atomically), then drops
    /// the handle and leaves the workspace as it is: mounted or not, its tmpfs upper in
    /// place, its lease (if any) released. [`open`](Workspace::open) picks it up again,
    /// in this process or another. (A workspace used by one handle from `create` to
    /// `destroy` never writes a description.)
    ///
    /// # Errors
    /// I/O errors writing the description; the workspace is left as it is all the same.
    pub fn keep(mut self) -> Result<()> {
        // A half-destroyed workspace keeps its journal, not a description; one already
        // described is not written again (a full disk cannot fail a finished `mount`).
        let current = self.described && (self.converted || self.dir.join(state::FILE).exists());
        let saved = if self.destroying || current { Ok(()) } else { self.save_state() };
        self.owns = Owns::default();
        saved
    }

    /// Turns the existing directory `path` into a workspace in place and mounts it:
    /// `path` is renamed to `path.lower`, `path.upper` and `path.work` are created, and
    /// the overlay is mounted at `path`, so callers keep using `path`.
    ///
    /// # Errors
    /// [`Error::AlreadyMounted`] when `path` is a mount point; I/O errors (`EEXIST`
    /// when `path.lower` exists); the backend's mount error, after which `path` is
    /// restored.
    pub fn convert(path: impl AsRef<Path>, backend: impl MountBackend + 'static) -> Result<Self> {
        // Resolved (`dir/` names `dir`; a symlink names its target): `path.lower` is
        // derived from the real directory.
        let path = canonical_dir(path.as_ref())?;
        refuse_cache_layer(&path, "convert it into a workspace")?;
        refuse_inside_workspace(&path)?;
        if is_mount_point(&path)? {
            return Err(Error::AlreadyMounted { path });
        }
        // Rule 8: never move a tree that has something mounted inside (a live workspace's
        // view or tmpfs) from under it.
        refuse_mounts_under(&[&path])?;
        if [state::FILE, journal::FILE].iter().any(|f| path.join(f).exists()) {
            return Err(Error::InvalidSpec {
                reason: format!("{} holds a workspace: destroy it, or open it", path.display()),
            });
        }
        let (lower, upper, work) = converted_dirs(&path);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("lstat", &path, e))?;
        if !meta.is_dir() {
            return Err(Error::InvalidSpec { reason: format!("{} is not a directory", path.display()) });
        }
        // Never adopt (and later delete) directories someone else made.
        for d in [&upper, &work, &lower] {
            if std::fs::symlink_metadata(d).is_ok() {
                return Err(Error::io("mkdir", d, std::io::Error::from_raw_os_error(nix::libc::EEXIST)));
            }
        }
        let lock_path = sidecar(&path, LOCK_FILE);
        let made_lock = std::fs::symlink_metadata(&lock_path).is_err();
        let lock = crate::lockfile::LockFile::acquire(&lock_path, &path)?;
        let journal_path = sidecar(&path, ".journal");
        let undo_lock = |lock: &crate::lockfile::LockFile| {
            let _ = journal::end(&journal_path);
            if made_lock {
                let _ = lock.remove();
            }
        };
        // Killed from here until the view is mounted, `open` puts `path` back.
        if let Err(e) = journal::begin(&journal_path, journal::Step::Convert) {
            undo_lock(&lock);
            return Err(e);
        }
        if let Err(e) = nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            path.as_path(),
            nix::fcntl::AT_FDCWD,
            lower.as_path(),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ) {
            undo_lock(&lock);
            return Err(Error::io("renameat2", &lower, e));
        }
        let mut lock = Some(lock);
        let mut created: Vec<&PathBuf> = Vec::new();
        let made = (|| {
            for d in [&upper, &work, &path] {
                std::fs::create_dir(d).map_err(|e| Error::io("mkdir", d, e))?;
                created.push(d);
            }
            seed_upper_root(&upper, &lower)?;
            let mut ws = Workspace {
                dir: path.clone(),
                upper: upper.clone(),
                work: work.clone(),
                target: path.clone(),
                lowers: vec![lower.clone()],
                data_lowers: Vec::new(),
                rootfs: None,
                options: OverlayOptions::default(),
                backend: None,
                converted: true,
                scratch: None,
                storage: UpperStorage::Disk,
                owns: Owns::default(),
                lock: None,
                journal: sidecar(&path, ".journal"),
                destroying: false,
                scratch_lost: false,
                pending: false,
                described: true,
                created: Vec::new(),
            };
            ws.mount(backend)?;
            journal::end(&ws.journal)?;
            ws.lock = lock.take();
            Ok(ws)
        })();
        if made.is_err() {
            // Put everything back as it was: remove only what was created here.
            for d in created {
                let _ = empty_dir(d).and_then(|()| std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e)));
            }
            let _ = std::fs::rename(&lower, &path);
            if let Some(l) = &lock {
                undo_lock(l);
            }
        }
        made
    }

    /// The merged view's mount point.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The upper dir (the sandbox's writes, overlayfs format).
    pub fn upper(&self) -> &Path {
        &self.upper
    }

    /// The lower dirs, top first.
    pub fn lowers(&self) -> &[PathBuf] {
        &self.lowers
    }

    /// The data-only lower dirs, top first (see [`OverlaySpec::data_lowers`]): a lazy
    /// image's ([`Rootfs::data_lowers`]) until [`detach`](Workspace::detach); empty for
    /// a workspace over plain directories.
    pub fn data_lowers(&self) -> &[PathBuf] {
        &self.data_lowers
    }

    /// Whether the merged view is mounted.
    pub fn is_mounted(&self) -> bool {
        self.backend.is_some()
    }

    /// Whether the upper lives in a private tmpfs ([`UpperStorage::Tmpfs`]).
    pub fn is_tmpfs(&self) -> bool {
        self.scratch.is_some()
    }

    /// Whether the workspace still holds a cache lease (not detached).
    pub fn is_leased(&self) -> bool {
        self.rootfs.is_some()
    }

    fn spec(&self) -> OverlaySpec {
        OverlaySpec {
            lowers: self.lowers.clone(),
            data_lowers: self.data_lowers.clone(),
            upper: self.upper.clone(),
            work: self.work.clone(),
            target: self.target.clone(),
            options: self.options.clone(),
        }
    }

    fn userxattr(&self) -> bool {
        self.spec().userxattr()
    }

    /// Mounts the merged view with `backend` (kept to unmount later) and returns its path.
    ///
    /// # Errors
    /// [`Error::AlreadyMounted`] when already mounted; the backend's errors.
    pub fn mount(&mut self, backend: impl MountBackend + 'static) -> Result<&Path> {
        if self.backend.is_some() {
            return Err(Error::AlreadyMounted { path: self.target.clone() });
        }
        self.usable("mount")?;
        // Upper, work and target were checked for cache layers by `create`/`open`.
        crate::immutable::with_dirs_checked(|| backend.mount(&self.spec()))?;
        self.backend = Some(Box::new(backend));
        // Mounted by this handle: dropping it unmounts (see `# Ownership`).
        self.owns.mount = true;
        Ok(&self.target)
    }

    /// Unmounts the merged view (verified). Not mounted is fine. This unmounts a view
    /// this handle adopted from [`open`](Workspace::open) too: the caller asked.
    ///
    /// # Errors
    /// The backend's unmount error; the workspace then still counts as mounted.
    pub fn unmount(&mut self) -> Result<()> {
        self.suspend().map(drop)
    }

    /// Unmounts the merged view for a change that must not happen under a live overlay,
    /// and returns what [`resume`](Self::resume) needs to mount it again as it was (same
    /// backend, same ownership). Not mounted: `None`. On error nothing changed.
    fn suspend(&mut self) -> Result<Option<(Box<dyn MountBackend>, bool)>> {
        let Some(b) = self.backend.take() else { return Ok(None) };
        if let Err(e) = b.unmount(&self.spec()) {
            self.backend = Some(b);
            return Err(e);
        }
        let owned = std::mem::take(&mut self.owns.mount);
        let was = Some((b, owned));
        if self.options.volatile {
            if let Err(e) = self.settle_volatile() {
                // Put the view back: the caller's operation does not happen.
                let _ = self.resume(was);
                return Err(e);
            }
        }
        Ok(was)
    }

    /// Refuses a change that unmounts and remounts the view while the sandbox has mounts
    /// of its own inside it (`/proc`, volumes): the unmount is recursive (`MNT_DETACH`)
    /// and the remount brings back only the overlay.
    fn refuse_submounts(&self) -> Result<()> {
        if self.backend.is_none() {
            return Ok(());
        }
        match crate::mount::mountinfo::mount_under(&[&self.target], false)? {
            Some(m) => Err(Error::AlreadyMounted { path: m }),
            None => Ok(()),
        }
    }

    /// Mounts again what [`suspend`](Self::suspend) unmounted, with the workspace's
    /// current lowers and upper.
    fn resume(&mut self, was: Option<(Box<dyn MountBackend>, bool)>) -> Result<()> {
        if let Some((b, owned)) = was {
            crate::immutable::with_dirs_checked(|| b.mount(&self.spec()))?;
            self.backend = Some(b);
            self.owns.mount = owned;
        }
        Ok(())
    }

    /// After a clean unmount of a `volatile` overlay: flush the upper and remove the
    /// marker the kernel leaves in the work dir (`work/incompat/volatile`), which makes
    /// it refuse to mount the upper again. A crashed volatile mount never gets here, so
    /// its upper stays refused and must be thrown away (`reset`, or `create` with
    /// `reset`), as the kernel documentation requires.
    fn settle_volatile(&self) -> Result<()> {
        let up = open_dir_path(&self.upper)?;
        nix::unistd::syncfs(up.as_fd()).map_err(|e| Error::io("syncfs", &self.upper, e))?;
        let incompat = self.work.join("work").join("incompat");
        match open_dir_path(&incompat) {
            Ok(fd) => crate::fsutil::remove_tree(fd.as_fd(), b"volatile", b"volatile", None, &incompat).map(drop),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Unmounts, then empties the upper and work dirs: the next mount starts clean
    /// (runner recycling). The workspace is left unmounted.
    ///
    /// Crash-safe: rolls forward. A process killed midway leaves a journal entry, and
    /// the next [`open`](Workspace::open) finishes emptying before anything can mount.
    ///
    /// # Errors
    /// Unmount and I/O errors; [`Error::AlreadyMounted`] when something else is mounted
    /// inside the upper or work dir (nothing is deleted then, and the view is mounted
    /// again if it was). After an I/O error midway the workspace stays unmounted with
    /// its journal entry: `reset` again (or the next `open`) finishes.
    pub fn reset(&mut self) -> Result<()> {
        self.usable("reset")?;
        self.refuse_submounts()?;
        let was = self.suspend()?;
        if let Err(e) = journal::begin(&self.journal, journal::Step::Reset) {
            let _ = self.resume(was);
            return Err(e);
        }
        match self.empty_upper(true) {
            Ok(()) => journal::end(&self.journal),
            // Refused before anything was deleted (something mounted inside): as it was.
            Err(e @ Error::AlreadyMounted { .. }) => {
                let _ = journal::end(&self.journal);
                let _ = self.resume(was);
                Err(e)
            }
            // Midway: half the writes may be gone. The journal stays, so the next `open`
            // (or `reset`) finishes the job; a half-emptied upper is never mounted.
            Err(e) => Err(e),
        }
    }

    /// Unmounts (verified), then deletes the directories this crate made in the
    /// workspace dir (and the dir itself if nothing else is left) and releases the
    /// lease. A `convert`ed workspace gets its lower back at the original path (with
    /// whatever was [`apply`](Workspace::apply)ed, without unapplied writes). This tears
    /// down an adopted workspace ([`open`](Workspace::open)) too: the caller asked.
    ///
    /// # Errors
    /// [`Error::AlreadyMounted`] when anything else is still mounted inside (nothing is
    /// deleted then); unmount and I/O errors. After an error the workspace is left as it
    /// is (its view mounted again if it was and can be), described in
    /// `dir/workspace.json` for [`open`](Workspace::open), its lease kept for the rest of
    /// the process: the handle gives everything up rather than tear down more.
    pub fn destroy(mut self) -> Result<()> {
        let done = self.teardown();
        if done.is_err() {
            // Past the journal entry, `open` knows it is half destroyed; before it, the
            // workspace is whole, and described so that `open` can find it.
            if !self.destroying && !self.converted && self.dir.is_dir() {
                let _ = self.save_state();
            }
            self.owns = Owns::default();
            std::mem::forget(self.rootfs.take());
        }
        done
    }

    /// [`destroy`](Workspace::destroy) but for the handle.
    fn teardown(&mut self) -> Result<()> {
        // What the dir holds, from one listing (entry types from `getdents`, no `stat`
        // per name): a created workspace is torn down by name.
        let present: std::collections::HashMap<String, bool> = if self.converted {
            Default::default()
        } else {
            let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io("opendir", &self.dir, e))?;
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let dir = e.file_type().is_ok_and(|t| t.is_dir());
                    e.file_name().into_string().ok().map(|n| (n, dir))
                })
                .collect()
        };
        // Refused before anything changes: own directories that are links or files.
        if self.converted {
            self.check_own_dirs()?;
        } else {
            for n in OWN_NAMES {
                if present.get(n) == Some(&false) {
                    return Err(Error::InvalidSpec {
                        reason: format!(
                            "{} is not a directory of this workspace (a symlink or a file)",
                            self.dir.join(n).display()
                        ),
                    });
                }
            }
            if present.contains_key("mem") {
                let mem = self.dir.join("mem");
                [mem.join("upper"), mem.join("work")].iter().try_for_each(|d| refuse_link(d))?;
            }
        }
        let was = self.suspend()?;
        // A workspace another process can find (described, converted, or already half
        // destroyed) journals its destruction; one handle's own from `create` to
        // `destroy` (the warm restore) has nobody to tell.
        let journaled = self.converted || self.destroying || present.contains_key(state::FILE);
        let tmpfs = matches!(self.storage, UpperStorage::Tmpfs { .. });
        // Only what this crate made: anything else the caller keeps in `dir` stays, and
        // then `dir` itself does too. A tmpfs workspace's upper and work were inside
        // `mem`: a `dir/upper` next to it is a disk workspace's leftover, not this one's.
        let names: &[&str] = if self.converted {
            &[]
        } else if self.destroying {
            &OWN_NAMES
        } else if tmpfs {
            &["mem", "rootfs", "skeleton"]
        } else {
            &["upper", "work", "rootfs", "skeleton", "upper.detach", "upper.old"]
        };
        let ours: Vec<PathBuf> = if self.converted {
            [&self.upper, &self.work].into_iter().filter(|p| p.exists()).cloned().collect()
        } else {
            names.iter().filter(|n| present.contains_key(**n)).map(|n| self.dir.join(n)).collect()
        };
        let refs: Vec<&Path> = ours.iter().map(PathBuf::as_path).collect();
        // Refusals, before anything is lost: never pull the tmpfs from under a view
        // someone else mounted, never delete through a mount.
        let refused = (|| {
            // Half made or half destroyed, its description gone: a tmpfs of this crate's
            // still at `mem` (marked, its view not mounted) goes first.
            if self.destroying && self.scratch.is_none() && present.contains_key("mem") {
                scratch::release_leftover(&self.dir.join("mem"), &self.target)?;
            }
            if self.scratch.is_some() {
                refuse_mounts_under(&[&self.target])?;
            }
            if journaled {
                // The tmpfs itself is mounted at `mem` (unmounted below): only mounts
                // inside it count there.
                let (at_mem, others): (Vec<&Path>, Vec<&Path>) =
                    refs.iter().partition(|p| self.scratch.as_deref() == Some(**p));
                refuse_mounts_under(&others)?;
                if let Some(m) = crate::mount::mountinfo::mount_under(&at_mem, false)? {
                    return Err(Error::AlreadyMounted { path: m });
                }
                if !self.destroying {
                    journal::begin(&self.journal, journal::Step::Destroy)?;
                    self.destroying = true;
                }
            }
            Ok(())
        })();
        if let Err(e) = refused {
            let _ = self.resume(was);
            return Err(e);
        }
        if let Some(mem) = self.scratch.clone() {
            scratch::unmount(&mem)?;
            self.scratch = None;
            self.owns.scratch = false;
        }
        if self.converted {
            for d in &ours {
                empty_dir(d)?;
                std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e))?;
            }
            if self.lowers[0].is_dir() {
                match std::fs::remove_dir(&self.target) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("rmdir", &self.target, e));
                    }
                    _ => {}
                }
                std::fs::rename(&self.lowers[0], &self.target).map_err(|e| Error::io("rename", &self.target, e))?;
            }
        } else {
            if let Err(e) = empty_dirs(&refs) {
                // Refused before anything was deleted (something mounted inside), or an
                // I/O error midway: put the view back where it can be.
                if !journaled {
                    let _ = self.resume(was);
                }
                return Err(e);
            }
            for d in &ours {
                std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e))?;
            }
            // The description, `apply`'s record, and what a write of either (or of the
            // journal) killed midway left (`fsutil::write_record` writes `NAME.tmp`).
            let times = self.apply_times();
            let times = times.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let leftovers = [state::FILE.to_string(), times.to_string()];
            let tmps = [state::FILE, journal::FILE, times].map(|f| format!("{f}.tmp"));
            for f in leftovers.iter().chain(&tmps) {
                if !present.contains_key(f) {
                    continue;
                }
                let st = self.dir.join(f);
                match std::fs::remove_file(&st) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("unlink", &st, e)),
                }
            }
        }
        if self.converted {
            let _ = std::fs::remove_file(self.apply_times());
        }
        // The lock file before the journal entry: killed in between, `open` still finds
        // a workspace being destroyed (and `destroy` finishes it).
        if let Some(lock) = &self.lock {
            lock.remove()?;
        }
        if journaled {
            journal::end(&self.journal)?;
        }
        if !self.converted {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => {}
                Err(e) => return Err(Error::io("rmdir", &self.dir, e)),
            }
        }
        self.rootfs = None;
        Ok(())
    }

    /// Unpacks an OCI layer diff (as written by [`export_diff`](Workspace::export_diff),
    /// plain, gzip or zstd) into the empty upper of an unmounted workspace, with safe
    /// extraction and overlay whiteouts: mounting then shows the view it was taken from.
    /// On error the upper is emptied again: a half-imported diff is never left to mount.
    /// Everything is read through this process (and hashed for [`DiffStats::digest`]);
    /// to let the filesystem share file data with an archive in a file, use
    /// [`import_diff_file`](Workspace::import_diff_file).
    ///
    /// # Errors
    /// [`Error::AlreadyMounted`] when mounted, [`Error::NotEmpty`] when the upper holds
    /// writes, and every [`unpack`](crate::unpack()) error (hostile entries, ...).
    pub fn import_diff(&mut self, input: impl Read + Send) -> Result<DiffStats> {
        let _span = span!("import_diff", dir = %self.dir.display());
        let opts = self.import_options()?;
        journal::begin(&self.journal, journal::Step::Import)?;
        let stats = unpack(input, &self.upper, &opts);
        self.discard_on_error(stats).map(streamed_stats)
    }

    /// [`import_diff`](Workspace::import_diff) from a file, from its position to its end.
    /// An uncompressed tar in a regular file takes the fast path: file data is never
    /// read by this process but copied out of the archive with `copy_file_range`, which
    /// XFS (`reflink=1`) and btrfs turn into shared extents for the block-aligned part
    /// of each file when the archive is on the upper's filesystem (an
    /// [aligned](DiffOptions::aligned) export, such as a [`checkpoint`](Workspace::checkpoint),
    /// is entirely block-aligned); elsewhere the kernel copies, or this process does
    /// where the kernel cannot (another filesystem type). The fast path does not hash,
    /// so [`DiffStats::digest`] and [`DiffStats::diff_id`] are `None`; compressed blobs
    /// and non-regular files go the ordinary way, with digests.
    ///
    /// # Errors
    /// As [`import_diff`](Workspace::import_diff).
    pub fn import_diff_file(&mut self, file: &File) -> Result<DiffStats> {
        let _span = span!("import_diff_file", dir = %self.dir.display());
        let opts = self.import_options()?;
        journal::begin(&self.journal, journal::Step::Import)?;
        let done = crate::unpack::unpack_file(file, &self.upper, &opts);
        Ok(match self.discard_on_error(done)? {
            crate::unpack::FileUnpacked::Cloned { entries, file_bytes, bytes } => {
                DiffStats { digest: None, diff_id: None, size: bytes, entries, file_bytes }
            }
            crate::unpack::FileUnpacked::Streamed(stats) => streamed_stats(stats),
        })
    }

    /// Checks that an import may start and gives its extraction options.
    fn import_options(&self) -> Result<UnpackOptions> {
        self.usable("import")?;
        if self.backend.is_some() {
            return Err(Error::AlreadyMounted { path: self.target.clone() });
        }
        if !crate::fsutil::is_empty_dir(&self.upper)? {
            return Err(Error::NotEmpty { path: self.upper.clone() });
        }
        Ok(UnpackOptions {
            whiteouts: WhiteoutMode::Overlay,
            userxattr: self.userxattr(),
            parent_lowers: self.lowers.clone(),
            compute_diff_id: true,
            // No digest to check a diff against: a missing end marker means it was cut off.
            require_end_of_archive: true,
            ..Default::default()
        })
    }

    /// After a failed import, empties the upper again (best effort: the import's error is
    /// what the caller needs to see).
    /// Also ends the import's journal entry: after success, or once the upper is empty
    /// again (if emptying fails, the entry stays and the next `open` empties it).
    fn discard_on_error<T>(&self, r: Result<T>) -> Result<T> {
        let settled = match &r {
            Ok(_) => Ok(()),
            Err(_) => self.empty_upper(false),
        };
        if settled.is_ok() {
            let _ = journal::end(&self.journal);
        }
        r
    }

    /// Writes the sandbox's writes to `path` as a block-aligned, uncompressed diff tar
    /// (an [aligned](DiffOptions::aligned) [`export_diff_file`](Workspace::export_diff_file)),
    /// atomically and durably: the tar is written to a temporary file next to `path`
    /// (mode 0600), synced, then renamed over `path`, and the directory is synced. On
    /// XFS (`reflink=1`) and btrfs, with `path` on the upper's filesystem, file data is
    /// shared with the upper rather than copied: a checkpoint of gigabytes takes
    /// milliseconds and almost no space. Call it with the sandbox frozen (after `runsc
    /// checkpoint`, CRIU's dump, a cgroup freeze): the upper is read as it is.
    ///
    /// Holes in sparse files stay holes (PAX sparse entries), so a sandbox's huge sparse
    /// file costs its data, not its apparent size. The temporary file is
    /// `.rootfs-cache-checkpoint-<pid>-<n>.partial` in `path`'s directory; one left by a
    /// crash can be deleted.
    ///
    /// # Errors
    /// [`Error::Unsupported`] while mounted with a backend that writes the upper only at
    /// unmount ([`CopyBackend`](crate::CopyBackend): unmount first), for a `path` inside
    /// the upper or the mounted view, and for uppers a restore could not recreate
    /// (redirect/metacopy xattrs, paths longer than `PATH_MAX`, more than 928 KiB of
    /// xattrs on one entry, names starting with `.wh.`); I/O errors (`ENOSPC`, ...).
    /// After an error `path` is as it was (unless only the final sync of its directory
    /// failed) and no temporary file is left.
    pub fn checkpoint(&self, path: impl AsRef<Path>) -> Result<DiffStats> {
        let path = path.as_ref();
        let _span = span!("checkpoint", dir = %self.dir.display(), path = %path.display());
        self.write_diff_to(path, &DiffOptions::aligned(), "checkpoint")
    }

    /// [`export_diff`](Workspace::export_diff) into the file `path`, all or nothing: the
    /// diff is written to a temporary file next to `path`
    /// (`.rootfs-cache-export-<pid>-<n>.partial`, mode 0600), synced, renamed over
    /// `path`, and the directory is synced; a failure (or a kill) never leaves a
    /// half-written `path`. [Aligned](DiffOptions::aligned) diffs take the
    /// [`export_diff_file`](Workspace::export_diff_file) fast path (file data shared with
    /// the upper on XFS/btrfs). [`checkpoint`](Workspace::checkpoint) is this with
    /// [`DiffOptions::aligned`].
    ///
    /// # Errors
    /// [`Error::ImmutableLayer`] for a `path` in a cache; [`Error::Unsupported`] for a
    /// `path` inside this workspace (its upper, work dir, mounted view, tmpfs or own
    /// files) or another's, and as [`export_diff`](Workspace::export_diff); I/O errors
    /// naming `path`'s temporary file (`ENOSPC`, ...). After an error `path` is as it was
    /// (unless only the final sync of its directory failed) and no temporary file is left.
    pub fn export_diff_to(&self, path: impl AsRef<Path>, opts: &DiffOptions) -> Result<DiffStats> {
        let path = path.as_ref();
        let _span = span!("export_diff_to", dir = %self.dir.display(), path = %path.display());
        self.write_diff_to(path, opts, "export")
    }

    /// [`export_diff_to`](Workspace::export_diff_to); `what` names the temporary file.
    fn write_diff_to(&self, path: &Path, opts: &DiffOptions, what: &str) -> Result<DiffStats> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        self.usable(what)?;
        self.check_upper_current(what)?;
        let Some(name) = path.file_name() else {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "names no file");
            return Err(Error::io("open", path, e));
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        self.refuse_inside(parent, name)?;
        // Short, whatever the target's length (NAME_MAX is 255).
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(".rootfs-cache-{what}-{}-{seq}.partial", std::process::id()));
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io("open", &tmp, e))?
        };
        // The export names its output "diff output": here it is the temporary file.
        let named = |e: Error| match e {
            Error::Io { op, path: p, source } if p.as_os_str() == "diff output" => {
                Error::Io { op, path: tmp.clone(), source }
            }
            e => e,
        };
        let done = (|| {
            let stats = if opts.aligned {
                export::export_file(&self.upper, self.userxattr(), &file, opts)
            } else {
                let mut w = std::io::BufWriter::with_capacity(256 * 1024, &file);
                export::export(&self.upper, self.userxattr(), &mut w, opts).and_then(|st| {
                    w.flush().map_err(|e| Error::io("write", &tmp, e))?;
                    Ok(st)
                })
            }
            .map_err(named)?;
            file.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
            std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))?;
            let dir = File::open(parent).map_err(|e| Error::io("open", parent, e))?;
            dir.sync_all().map_err(|e| Error::io("fsync", parent, e))?;
            Ok(stats)
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }

    /// A new workspace in `dir` over `lowers` (as [`create`](Workspace::create)) holding
    /// the writes saved by [`checkpoint`](Workspace::checkpoint) in `checkpoint` (any
    /// diff tar: plain, gzip or zstd), not mounted. The checkpoint's file data is shared
    /// with it where the filesystem can (see [`import_diff_file`](Workspace::import_diff_file)).
    /// The lowers must be the image the checkpoint was taken over.
    ///
    /// # Errors
    /// I/O errors opening `checkpoint`, or when it is not a regular file (nothing is
    /// created then); [`Error::InvalidArchive`] for a truncated one (no end-of-archive
    /// marker); [`create`](Workspace::create)
    /// and [`import_diff`](Workspace::import_diff) errors, after which the new workspace's
    /// directories are removed again.
    pub fn restore(
        dir: impl AsRef<Path>,
        lowers: impl Into<Lowers>,
        opts: WorkspaceOptions,
        checkpoint: impl AsRef<Path>,
    ) -> Result<Self> {
        let checkpoint = checkpoint.as_ref();
        let _span = span!("restore", checkpoint = %checkpoint.display());
        // Non-blocking: a FIFO put in its place must not hang the restore in open.
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            File::options().read(true).custom_flags(nix::libc::O_NONBLOCK).open(checkpoint)
        }
        .map_err(|e| Error::io("open", checkpoint, e))?;
        if !file.metadata().map_err(|e| Error::io("fstat", checkpoint, e))?.is_file() {
            return Err(Error::io("open", checkpoint, std::io::Error::other("not a regular file")));
        }
        let mut ws = Self::create(dir, lowers, opts)?;
        match ws.import_diff_file(&file) {
            Ok(_) => Ok(ws),
            Err(e) => {
                // Only what `create` made goes: the import emptied the upper again.
                ws.undo_create();
                Err(e)
            }
        }
    }

    /// Refuses a diff written into a cache, into this workspace (its upper, work dir,
    /// mounted view, tmpfs, or over one of its own files: it would become part of the
    /// sandbox's files, or of the workspace's records), or into another workspace's dirs.
    fn refuse_inside(&self, parent: &Path, name: &std::ffi::OsStr) -> Result<()> {
        let Some(real) = crate::immutable::resolve(parent) else { return Ok(()) }; // open reports it
        if let Some(c) = crate::immutable::cache_in_with(&real, true) {
            return Err(Error::ImmutableLayer { op: "write a diff into it", path: c });
        }
        let canon = |p: &Path| crate::immutable::resolve(p).unwrap_or_else(|| p.to_path_buf());
        let mut inside = vec![canon(&self.upper), canon(&self.work)];
        if let Some(mem) = &self.scratch {
            inside.push(canon(mem));
        }
        if self.backend.is_some() {
            inside.push(canon(&self.target));
        }
        let own_file = real == canon(&self.dir)
            && name.to_str().is_some_and(|n| {
                [state::FILE, journal::FILE].contains(&n) || OWN_NAMES.contains(&n) || n.starts_with("workspace.")
            });
        if own_file || inside.iter().any(|d| real.starts_with(d)) {
            return Err(Error::Unsupported {
                what: format!("a diff written to {}, inside the workspace it saves", parent.join(name).display()),
            });
        }
        refuse_inside_workspace(&real.join(name)).map_err(|_| Error::Unsupported {
            what: format!("a diff written to {}, inside a workspace's own directories", parent.join(name).display()),
        })
    }

    /// Refuses to read the upper while a backend that fills it only at unmount is mounted.
    fn check_upper_current(&self, what: &str) -> Result<()> {
        match &self.backend {
            Some(b) if !b.writes_upper_live() => Err(Error::Unsupported {
                what: format!(
                    "{what} while mounted with a backend that writes the upper only at unmount (CopyBackend): \
                     unmount first"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Copies everything the lowers show into the upper (reflinked where the
    /// filesystem can), marks every directory opaque, remounts (if it was mounted) with
    /// the upper over a private skeleton lower (empty stubs of the image's top-level
    /// names, so later deletions still leave whiteouts for [`export_diff`]), and releases
    /// the cache lease: the cache may evict the image while the sandbox keeps its full
    /// view. Inode numbers of files that came from the lowers change. A lazy image's
    /// placeholders are copied with the data of the files they redirect to in the
    /// [data-only lowers](Workspace::data_lowers) (fetching what is not local yet), which
    /// the workspace then no longer uses.
    ///
    /// [`export_diff`]: Workspace::export_diff
    ///
    /// # Errors
    /// [`Error::Unsupported`] for a `convert`ed workspace (nothing to detach from);
    /// [`Error::InvalidImage`] for a placeholder whose data no data-only lower has (or
    /// of another size); unmount, copy and mount errors. After an error the workspace has its original
    /// upper and lowers (or, past the swap, the detached ones) and is mounted again if it
    /// was.
    pub fn detach(&mut self) -> Result<()> {
        let _span = span!("detach", dir = %self.dir.display());
        if self.converted {
            return Err(Error::Unsupported {
                what: "detach of a converted workspace: its only lower is its own already".into(),
            });
        }
        self.usable("detach")?;
        self.refuse_submounts()?;
        let was = self.suspend()?;
        if let Err(e) = self.detach_unmounted() {
            // Before the swap everything was put back: mount again. Past it (an I/O error
            // finishing up), the journal entry stays for `open` to roll forward, and the
            // view stays unmounted until then.
            if journal::read(&self.journal).ok().flatten().is_none() {
                let _ = self.resume(was);
            }
            return Err(e);
        }
        self.resume(was)
    }

    /// [`detach`](Workspace::detach) with the view unmounted.
    fn detach_unmounted(&mut self) -> Result<()> {
        let userxattr = self.userxattr();
        // Next to the upper (inside a tmpfs upper's mount), so the swap is a rename.
        let fresh = self.upper.with_file_name("upper.detach");
        let old = self.upper.with_file_name("upper.old");
        if !self.upper.exists() && old.is_dir() {
            // An earlier detach died between its two renames: the sandbox's upper is
            // `upper.old`. Roll back to it before anything is deleted.
            std::fs::rename(&old, &self.upper).map_err(|e| Error::io("rename", &self.upper, e))?;
        }
        journal::begin(&self.journal, journal::Step::Detach)?;
        let skeleton = self.dir.join("skeleton");
        // Up to the swap, an error (or a kill: `open` rolls back) leaves the original
        // upper in place and the copy discarded.
        let before_swap = (|| {
            for d in [&fresh, &old] {
                if d.exists() {
                    empty_dir(d)?;
                    std::fs::remove_dir(d).map_err(|e| Error::io("rmdir", d, e))?;
                }
            }
            mkdir(&fresh)?;
            let dst = open_dir_path(&fresh)?;
            let xattrs = Xattrs::Keep(Xattrs::prefix(userxattr));
            // A lazy image's placeholders become copies of the files they redirect to.
            let data = match self.data_lowers.is_empty() {
                true => None,
                false => Some(DataLowers::open(&self.data_lowers, userxattr)?),
            };
            for l in self.lowers.iter().rev().chain([&self.upper]) {
                let src = open_dir_path(l)?;
                copy_layer(src.as_fd(), dst.as_fd(), userxattr, xattrs, data.as_ref(), l, &fresh)?;
            }
            mark_opaque(&fresh, userxattr)?;
            // The root cannot be opaque: names the lowers have at the top level and the
            // view does not get whiteouts, so a diff of the detached upper applied over
            // the image (export, import elsewhere) does not bring them back.
            whiteout_missing_roots(&self.lowers, &fresh)?;
            // Detached before: the skeleton already holds the image's top-level names.
            if self.lowers != [skeleton.clone()] {
                make_skeleton(&self.lowers, &skeleton)?;
            }
            std::fs::rename(&self.upper, &old).map_err(|e| Error::io("rename", &old, e))?;
            if let Err(e) = std::fs::rename(&fresh, &self.upper) {
                // Put the sandbox's upper back before anything else.
                let _ = std::fs::rename(&old, &self.upper);
                return Err(Error::io("rename", &self.upper, e));
            }
            Ok(())
        })();
        if let Err(e) = before_swap {
            if fresh.exists() {
                let _ = empty_dir(&fresh)
                    .and_then(|()| std::fs::remove_dir(&fresh).map_err(|e| Error::io("rmdir", &fresh, e)));
            }
            let _ = journal::end(&self.journal);
            return Err(e);
        }
        // Swapped: from here on the detach rolls forward (a kill: `open` finishes it).
        journal::begin(&self.journal, journal::Step::DetachSwapped)?;
        self.lowers = vec![skeleton];
        // The data-only lowers are the image's too: they go with the lease.
        self.data_lowers.clear();
        self.rootfs = None;
        empty_dir(&old)?;
        std::fs::remove_dir(&old).map_err(|e| Error::io("rmdir", &old, e))?;
        empty_dir(&self.work)?;
        // A kept workspace's description follows (a handle only used in this process
        // has none: `keep` writes it).
        if self.dir.join(state::FILE).exists() {
            self.save_state()?;
        }
        journal::end(&self.journal)
    }

    /// Writes the upper as an OCI layer diff to `out`; see [`DiffOptions`]. Everything
    /// passes through this process (hashed for [`DiffStats::digest`]); an
    /// [aligned](DiffOptions::aligned) diff is aligned to 4096 bytes from the start of
    /// `out`. To let the filesystem share file data, write into a `File` with
    /// [`export_diff_file`](Workspace::export_diff_file).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for uppers with redirect or metacopy xattrs, for `aligned`
    /// with compression, and while mounted with a backend that writes the upper only at
    /// unmount ([`CopyBackend`](crate::CopyBackend)); I/O errors.
    pub fn export_diff(&self, out: impl Write, opts: &DiffOptions) -> Result<DiffStats> {
        let _span = span!("export_diff", dir = %self.dir.display(), aligned = opts.aligned);
        self.usable("export_diff")?;
        self.check_upper_current("export_diff")?;
        let st = export::export(&self.upper, self.userxattr(), out, opts)?;
        event!(entries = st.entries, file_bytes = st.file_bytes, size = st.size, "exported");
        Ok(st)
    }

    /// [`export_diff`](Workspace::export_diff) into `file` at its position (appending
    /// where it is). With [`DiffOptions::aligned`] each regular file's data starts at a
    /// multiple of `file`'s block size (`st_blksize`, capped at 64 KiB) and is copied
    /// with `copy_file_range`, which XFS (`reflink=1`) and btrfs turn into shared
    /// extents when `file` is on the upper's filesystem (elsewhere the kernel copies, or
    /// this process does where the kernel cannot); such data is never read by this
    /// process, so [`DiffStats::digest`] and [`DiffStats::diff_id`] are `None`. Without
    /// `aligned` this is `export_diff` into a buffered `file`.
    ///
    /// # Errors
    /// As [`export_diff`](Workspace::export_diff).
    pub fn export_diff_file(&self, file: &File, opts: &DiffOptions) -> Result<DiffStats> {
        let _span = span!("export_diff_file", dir = %self.dir.display(), aligned = opts.aligned);
        self.usable("export_diff_file")?;
        self.check_upper_current("export_diff_file")?;
        let st = export::export_file(&self.upper, self.userxattr(), file, opts)?;
        event!(entries = st.entries, file_bytes = st.file_bytes, size = st.size, "exported");
        Ok(st)
    }

    /// The changes in the upper relative to the lowers (scans the upper only: cost
    /// proportional to the writes, not the rootfs).
    ///
    /// # Errors
    /// [`Error::Unsupported`] for redirect or metacopy xattrs; I/O errors.
    pub fn changes(&self) -> Result<ChangeSet> {
        self.usable("changes")?;
        self.check_upper_current("changes")?;
        changes::scan(&self.upper, &self.lowers, self.userxattr())
    }

    /// Flattens the upper into the workspace's single private lower (a `convert`ed
    /// workspace, or one created over one directory of its own), then empties the upper:
    /// whiteouts delete, opaque directories replace the lower directory, files are moved
    /// or replaced by rename (a lower file hardlinked elsewhere is never written in
    /// place), directory metadata and xattrs carried over. Unmounts first and remounts
    /// afterwards if it was mounted (changing a lower under a live overlay is undefined).
    ///
    /// # Errors
    /// [`Error::ImmutableLayer`] when the lower is (or lies in) a cache layer, however it
    /// is named; [`Error::Unsupported`] when the lowers are shared (a cached image, or
    /// several) or the upper holds redirect/metacopy xattrs; unmount, mount and I/O
    /// errors. After an error past the unmount the view is mounted again (if it was) and
    /// shows what was applied and what was not; `apply` can be run again (it resumes:
    /// what already moved stays moved).
    pub fn apply(&mut self) -> Result<ApplyReport> {
        let _span = span!("apply", dir = %self.dir.display());
        // Rule 4 first, and for every lower: the reason to give for a cache-backed
        // workspace is that its layers are the cache's, however many there are.
        for l in &self.lowers {
            refuse_cache_layer(l, "apply a sandbox's writes into it")?;
        }
        if self.rootfs.is_some() || self.lowers.len() != 1 {
            return Err(Error::Unsupported {
                what: "apply into shared lowers: apply needs a workspace with exactly one private lower".into(),
            });
        }
        self.usable("apply")?;
        self.refuse_submounts()?;
        // A record left by a run that finished but died before removing it is stale.
        let _ = std::fs::remove_file(self.apply_times());
        let was = self.suspend()?;
        if let Err(e) = journal::begin(&self.journal, journal::Step::Apply) {
            let _ = self.resume(was);
            return Err(e);
        }
        let done =
            apply::apply(&self.upper, &self.lowers[0], self.userxattr(), &self.apply_times()).and_then(|report| {
                self.empty_upper(true)?;
                Ok(report)
            });
        // Mounted again whatever happened: the writes not applied yet are still in the
        // upper, the applied ones in the lower, and the view shows both (a killed
        // process leaves the journal entry instead, and the next `open` finishes). The
        // sandbox may write on: a later apply records the directories' times afresh.
        let _ = journal::end(&self.journal);
        let _ = std::fs::remove_file(self.apply_times());
        let resumed = self.resume(was);
        let report = done?;
        resumed?;
        event!(moved = report.moved, copied = report.copied, deleted = report.deleted, dirs = report.dirs, "applied");
        Ok(report)
    }
}

/// What an import that read (and hashed) everything did.
fn streamed_stats(s: crate::unpack::UnpackStats) -> DiffStats {
    DiffStats {
        digest: Some(s.digest),
        diff_id: Some(s.diff_id.unwrap_or(s.digest)),
        size: s.compressed_bytes,
        entries: s.entries,
        file_bytes: s.file_bytes,
    }
}

/// The lower of a detached workspace: an empty stub for every top-level name the old
/// lowers had. The upper hides them all (its directories are opaque), but because the
/// lower has the names, deleting one later makes the kernel leave a whiteout, so a
/// diff of the detached upper still deletes it when imported over the image.
fn make_skeleton(lowers: &[PathBuf], skeleton: &Path) -> Result<()> {
    if skeleton.exists() {
        empty_dir(skeleton)?;
    }
    mkdir(skeleton)?;
    let sfd = open_dir_path(skeleton)?;
    for l in lowers {
        let lfd = open_dir_path(l)?;
        for name in crate::fsutil::list_dir(lfd.as_fd(), l)? {
            let shown = crate::fsutil::shown(skeleton, &name);
            match nix::fcntl::openat(
                sfd.as_fd(),
                name.as_slice(),
                nix::fcntl::OFlag::O_WRONLY
                    | nix::fcntl::OFlag::O_CREAT
                    | nix::fcntl::OFlag::O_EXCL
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            ) {
                Ok(_) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(Error::io("openat", &shown, e)),
            }
        }
    }
    Ok(())
}

/// Whiteouts in `upper`'s root for every top-level name of `lowers` it lacks.
fn whiteout_missing_roots(lowers: &[PathBuf], upper: &Path) -> Result<()> {
    let ufd = open_dir_path(upper)?;
    let times = nix::sys::stat::fstat(ufd.as_fd()).map_err(|e| Error::io("fstat", upper, e))?;
    for l in lowers {
        let lfd = open_dir_path(l)?;
        for name in crate::fsutil::list_dir(lfd.as_fd(), l)? {
            let shown = crate::fsutil::shown(upper, &name);
            if crate::fsutil::stat_at(ufd.as_fd(), &name, &shown)?.is_none() {
                nix::sys::stat::mknodat(
                    ufd.as_fd(),
                    name.as_slice(),
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    0,
                )
                .map_err(|e| Error::io("mknodat", &shown, e))?;
            }
        }
    }
    // The whiteouts are invisible; the root's times must stay the view's.
    crate::mount::copy::set_dir_times(ufd.as_fd(), &times, upper)
}

/// Sets the opaque xattr on every directory under `root` (not the root itself).
fn mark_opaque(root: &Path, userxattr: bool) -> Result<()> {
    let name = crate::unpack::whiteout::opaque_xattr(userxattr);
    walk::walk(root, userxattr, |ev| {
        if let walk::Event::Enter { fd, path, .. } = ev {
            if !path.is_empty() {
                crate::sys::fsetxattr(fd, name, b"y")
                    .map_err(|e| Error::io("fsetxattr", crate::fsutil::shown(root, path), e))?;
            }
        }
        Ok(true)
    })
}

impl Drop for Workspace {
    /// Tears down what this handle set up itself, nothing else (see `# Ownership`).
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            if !self.owns.mount || b.unmount(&self.spec()).is_err() {
                // Still mounted (adopted, or the unmount failed): releasing the lease would
                // let the cache evict live lowers. Keep the layers pinned for the rest of
                // this process instead, and the tmpfs upper the view still uses.
                std::mem::forget(self.rootfs.take());
                return;
            }
        }
        if let Some(mem) = self.scratch.take() {
            if self.owns.scratch {
                let _ = scratch::unmount(&mem);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The data-only lowers' plumbing, with a backend that records specs instead of
    //! mounting (a workspace gets data-only lowers only from a lazy `Rootfs`; here they
    //! are set on one over plain directories). Real mounts: `tests/mount_kernel.rs`.
    use super::*;
    use std::sync::Arc;

    #[derive(Default)]
    struct Recorder(parking_lot::Mutex<Vec<OverlaySpec>>);

    impl MountBackend for Recorder {
        fn mount(&self, spec: &OverlaySpec) -> Result<()> {
            self.0.lock().push(spec.clone());
            Ok(())
        }
        fn unmount(&self, _: &OverlaySpec) -> Result<()> {
            Ok(())
        }
    }

    const META: &[u8] = b"user.overlay.metacopy";
    const REDIRECT: &[u8] = b"user.overlay.redirect";

    fn set_xattr(p: &Path, name: &[u8], value: &[u8]) {
        let dir = open_dir_path(p.parent().unwrap()).unwrap();
        let file = p.file_name().unwrap().as_encoded_bytes();
        crate::sys::setxattr_at_nofollow(dir.as_fd(), file, name, value).unwrap();
    }

    fn get_xattr(p: &Path, name: &[u8]) -> Option<Vec<u8>> {
        let dir = open_dir_path(p.parent().unwrap()).unwrap();
        crate::sys::getxattr_at_nofollow(dir.as_fd(), p.file_name().unwrap().as_encoded_bytes(), name).unwrap()
    }

    /// A lazy image by hand: a skeleton lower (a placeholder redirecting into the data
    /// lower, a plain file, a subdir with another placeholder) and a data-only lower.
    fn lazy_image(root: &Path) -> (PathBuf, PathBuf) {
        let (skel, data) = (root.join("skel"), root.join("data"));
        std::fs::create_dir_all(skel.join("sub")).unwrap();
        std::fs::create_dir_all(data.join("ab")).unwrap();
        std::fs::write(data.join("x1"), "hello\n").unwrap();
        std::fs::write(data.join("ab/x2"), "nested data\n").unwrap();
        std::fs::write(skel.join("plain"), "plain\n").unwrap();
        for (p, size, to) in [(skel.join("f"), 6, "/x1"), (skel.join("sub/g"), 12, "/ab/x2")] {
            std::fs::File::create(&p).unwrap().set_len(size).unwrap();
            set_xattr(&p, META, b"");
            set_xattr(&p, REDIRECT, to.as_bytes());
        }
        (skel, data)
    }

    fn options() -> WorkspaceOptions {
        let mut o = WorkspaceOptions::default();
        o.overlay.userxattr = Some(true);
        o
    }

    #[test]
    fn data_lowers_reach_every_mount_and_the_description() {
        let tmp = tempfile::tempdir().unwrap();
        let (skel, data) = lazy_image(tmp.path());
        let ws_dir = tmp.path().join("ws");
        let mut ws = Workspace::create(&ws_dir, vec![skel.clone()], options()).unwrap();
        assert!(ws.data_lowers().is_empty(), "plain lowers have no data-only lowers");
        ws.data_lowers = vec![data.clone()];
        let rec = Arc::new(Recorder::default());
        ws.mount(rec.clone()).unwrap();
        // A remount (reset unmounts and mounts again) keeps them.
        ws.reset().unwrap();
        ws.mount(rec.clone()).unwrap();
        let specs = rec.0.lock().clone();
        assert_eq!(specs.len(), 2);
        for s in &specs {
            assert_eq!((&s.lowers, &s.data_lowers), (&vec![skel.clone()], &vec![data.clone()]));
        }
        ws.unmount().unwrap();
        ws.keep().unwrap();
        let ws = Workspace::open(&ws_dir).unwrap();
        assert_eq!((ws.lowers(), ws.data_lowers()), (&[skel][..], &[data][..]));
    }

    #[test]
    fn detach_copies_the_data_of_placeholders_and_drops_the_data_lowers() {
        let tmp = tempfile::tempdir().unwrap();
        let (skel, data) = lazy_image(tmp.path());
        let ws_dir = tmp.path().join("ws");
        let mut ws = Workspace::create(&ws_dir, vec![skel.clone()], options()).unwrap();
        ws.data_lowers = vec![data.clone()];
        let rec = Arc::new(Recorder::default());
        ws.mount(rec.clone()).unwrap();
        ws.describe().unwrap();
        ws.detach().unwrap();
        assert!(ws.data_lowers().is_empty());
        assert_eq!(ws.lowers(), [ws_dir.join("skeleton")]);
        let last = rec.0.lock().last().cloned().unwrap();
        assert!(last.data_lowers.is_empty(), "remounted with {last:?}");
        let up = ws.upper().to_path_buf();
        for (name, want) in [("f", "hello\n"), ("sub/g", "nested data\n"), ("plain", "plain\n")] {
            assert_eq!(std::fs::read_to_string(up.join(name)).unwrap(), want, "{name}");
            assert_eq!(get_xattr(&up.join(name), META), None, "{name}");
            assert_eq!(get_xattr(&up.join(name), REDIRECT), None, "{name}");
        }
        // The description follows.
        let st = state::State::load(&ws_dir).unwrap().unwrap();
        assert!(st.data_lowers.is_empty());
        // The layers are as they were.
        assert_eq!(std::fs::metadata(skel.join("f")).unwrap().len(), 6);
        assert_eq!(get_xattr(&skel.join("f"), REDIRECT).as_deref(), Some(&b"/x1"[..]));
        assert_eq!(std::fs::read_to_string(data.join("x1")).unwrap(), "hello\n");
    }

    #[test]
    fn detach_refuses_a_placeholder_whose_data_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let (skel, data) = lazy_image(tmp.path());
        std::fs::remove_file(data.join("x1")).unwrap();
        let mut ws = Workspace::create(tmp.path().join("ws"), vec![skel], options()).unwrap();
        ws.data_lowers = vec![data.clone()];
        let err = ws.detach().unwrap_err();
        assert!(matches!(err, Error::InvalidImage { .. }), "{err}");
        // Nothing changed: the data-only lowers stay, the upper is still empty.
        assert_eq!(ws.data_lowers(), [data]);
        assert!(crate::fsutil::is_empty_dir(ws.upper()).unwrap());
    }
}
