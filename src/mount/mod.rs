//! Mount backends: turning lower dirs plus a private upper into a mounted rootfs.
//!
//! - [`MountBackend`]: the trait; host runtimes may bring their own (FUSE, a remote
//!   snapshotter) and hand it to the workspace code.
//! - [`KernelOverlay`]: the kernel's overlayfs, through the new mount API when the
//!   kernel has it (see [`MountApi`]).
//! - [`CopyBackend`]: where overlay cannot be mounted, the layers are copied (reflinked
//!   where the filesystem can) into the target, and writes are folded back into the
//!   upper on unmount.
//! - [`detect()`]: picks one by trying a real overlay mount, and says why.
//! - [`OverlayMount`]: an RAII guard that unmounts on drop.
//!
//! ```text
//!   spec.lowers[0]  (top)        ┐
//!   spec.lowers[1]               │ read-only, shared (cache layers)
//!   ...                          ┘
//!   spec.data_lowers[..]           data-only (lazy images): reached only through the
//!                                  lowers' metacopy redirects, never seen by name
//!   spec.upper                     private writes of this sandbox
//!   spec.work                      overlay's scratch dir (same filesystem as upper)
//!   spec.target                    the merged view
//! ```
//!
//! # Concurrency
//! Backends are `Send + Sync` and keep no per-mount state in memory: everything a
//! backend needs to unmount is in the [`OverlaySpec`] and on disk, so a different
//! process (or a restarted runtime) can unmount what another mounted.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, fstat};

use crate::error::{Error, Result};

pub(crate) mod copy;
mod kernel;
pub(crate) mod mountinfo;
mod options;

pub use copy::CopyBackend;
pub use kernel::{KernelOverlay, MountApi};
pub use mountinfo::is_mount_point;
pub use options::MAX_LOWERS;

/// How an overlay is made. Implemented by [`KernelOverlay`] and [`CopyBackend`]; host
/// runtimes may implement their own.
///
/// A backend must leave the sandbox's writes in `spec.upper` in overlayfs format once
/// [`unmount`](MountBackend::unmount) returns (whiteouts as 0/0 character devices,
/// opaque directories marked with the `overlay.opaque` xattr), because the diff engine
/// reads the upper directly.
pub trait MountBackend: Send + Sync {
    /// Makes the merged view of `spec` appear at `spec.target`.
    ///
    /// # Errors
    /// What the backend reports. The built-in backends check the spec first and return
    /// [`Error::InvalidSpec`] (no or duplicate lowers), [`Error::LimitExceeded`] (more
    /// than [`MAX_LOWERS`]), [`Error::AlreadyMounted`] (target is a mount point),
    /// [`Error::NotEmpty`] (a fresh upper was asked for and is not empty) or
    /// [`Error::Io`] (a directory of the spec cannot be opened); then
    /// [`KernelOverlay`] returns [`Error::Mount`] with the kernel's message when the mount
    /// itself fails. Each backend's `mount` lists the details.
    fn mount(&self, spec: &OverlaySpec) -> Result<()>;

    /// Removes the merged view at `spec.target`. Unmounting something not mounted is not
    /// an error. Never deletes the upper or the lowers.
    ///
    /// # Errors
    /// What the backend reports: for [`KernelOverlay`], [`Error::Mount`] when the target
    /// is still a mount point afterwards; for [`CopyBackend`], [`Error::AlreadyMounted`]
    /// when something is mounted inside the target, [`Error::InvalidImage`] for a corrupt
    /// state file and [`Error::Io`] when the writes cannot be folded into the upper. Each
    /// backend's `unmount` lists the details.
    fn unmount(&self, spec: &OverlaySpec) -> Result<()>;

    /// Whether writes to the mounted view reach `spec.upper` as they happen (a kernel
    /// overlay), rather than only at [`unmount`](Self::unmount) ([`CopyBackend`]).
    /// While a backend that answers `false` is mounted, a [`Workspace`](crate::Workspace)
    /// refuses to read its upper (changes, export, checkpoint): what it would read is
    /// stale. Default: true.
    fn writes_upper_live(&self) -> bool {
        true
    }
}

impl<B: MountBackend + ?Sized> MountBackend for &B {
    fn mount(&self, spec: &OverlaySpec) -> Result<()> {
        (**self).mount(spec)
    }
    fn unmount(&self, spec: &OverlaySpec) -> Result<()> {
        (**self).unmount(spec)
    }
    fn writes_upper_live(&self) -> bool {
        (**self).writes_upper_live()
    }
}

impl<B: MountBackend + ?Sized> MountBackend for Box<B> {
    fn mount(&self, spec: &OverlaySpec) -> Result<()> {
        (**self).mount(spec)
    }
    fn unmount(&self, spec: &OverlaySpec) -> Result<()> {
        (**self).unmount(spec)
    }
    fn writes_upper_live(&self) -> bool {
        (**self).writes_upper_live()
    }
}

impl<B: MountBackend + ?Sized> MountBackend for std::sync::Arc<B> {
    fn mount(&self, spec: &OverlaySpec) -> Result<()> {
        (**self).mount(spec)
    }
    fn unmount(&self, spec: &OverlaySpec) -> Result<()> {
        (**self).unmount(spec)
    }
    fn writes_upper_live(&self) -> bool {
        (**self).writes_upper_live()
    }
}

/// Overlay features. The defaults are what the diff engine needs; change them only if
/// you do not use [`Workspace`](crate::Workspace) diffs on this upper.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OverlayOptions {
    /// Refuse to mount unless the upper and work dirs are empty ([`Error::NotEmpty`]):
    /// a new sandbox must never see another's writes. Default: false (remounting an
    /// existing upper is the normal case after an unmount).
    pub fresh: bool,
    /// `volatile`: skip all syncs to the upper (fast scratch; after a crash the upper
    /// must be thrown away, and the kernel refuses to remount it). Default: false.
    pub volatile: bool,
    /// `userxattr`: overlay metadata in `user.overlay.*` instead of `trusted.overlay.*`,
    /// needed to mount inside a user namespace. `None` (default): on exactly when this
    /// process is unprivileged (not root, or in a non-initial user namespace), which is
    /// also when [`UnpackOptions::default`](crate::UnpackOptions) writes `user.overlay.*`
    /// metadata into the layers (the copy backend, which any user can run, follows it).
    pub userxattr: Option<bool>,
    /// `index=on`. Default: off.
    pub index: bool,
    /// `redirect_dir=on` (directory renames without copy-up, recorded as xattrs the diff
    /// engine refuses). Default: off, sent as `nofollow` (redirects are neither created
    /// nor followed; plain `off` would follow ones found in lowers, and is refused
    /// together with `userxattr`).
    pub redirect_dir: bool,
    /// `metacopy=on` (metadata-only copy-up, also refused by the diff engine). Default: off.
    pub metacopy: bool,
    /// `xino=auto` (unique inode numbers across layers). Default: off.
    pub xino: bool,
}

/// What to mount: lower dirs (top first), the private upper and work dirs, and the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlaySpec {
    /// Read-only lower dirs, top layer first (as [`Rootfs::lowers`](crate::Rootfs::lowers)).
    pub lowers: Vec<PathBuf>,
    /// Data-only lower dirs, top first (as [`Rootfs::data_lowers`](crate::Rootfs::data_lowers)):
    /// layers below all of `lowers` whose files are reached only through the metacopy
    /// placeholders (`overlay.metacopy` + an absolute `overlay.redirect`) of a lazy
    /// image's skeleton layers; their names never show in the merged view. Empty by
    /// default. Only [`KernelOverlay`] mounts them, and only on kernels whose overlayfs
    /// has data-only layers (Linux 6.5+); they count toward [`MAX_LOWERS`].
    pub data_lowers: Vec<PathBuf>,
    /// The writable upper dir.
    pub upper: PathBuf,
    /// Overlay's work dir: empty, on the same filesystem as the upper.
    pub work: PathBuf,
    /// Where the merged view appears. Must be an existing directory.
    pub target: PathBuf,
    /// Features.
    pub options: OverlayOptions,
}

impl OverlaySpec {
    /// A spec with default options.
    pub fn new<L: Into<PathBuf>>(
        lowers: impl IntoIterator<Item = L>,
        upper: impl Into<PathBuf>,
        work: impl Into<PathBuf>,
        target: impl Into<PathBuf>,
    ) -> Self {
        OverlaySpec {
            lowers: lowers.into_iter().map(Into::into).collect(),
            data_lowers: Vec::new(),
            upper: upper.into(),
            work: work.into(),
            target: target.into(),
            options: OverlayOptions::default(),
        }
    }

    /// This spec with `data_lowers` (top first) as its data-only lowers (see
    /// [`OverlaySpec::data_lowers`]).
    pub fn with_data_lowers<L: Into<PathBuf>>(mut self, data_lowers: impl IntoIterator<Item = L>) -> Self {
        self.data_lowers = data_lowers.into_iter().map(Into::into).collect();
        self
    }

    /// Whether `userxattr` applies: the explicit option, else whether this process is
    /// unprivileged (not root, or in a user namespace), as extraction decides.
    pub fn userxattr(&self) -> bool {
        self.options.userxattr.unwrap_or_else(crate::privilege::unprivileged)
    }
}

/// A spec that passed the checks every backend makes before touching anything.
pub(crate) struct Checked {
    pub paths: kernel::Paths,
    pub userxattr: bool,
}

fn open_dir(path: &Path) -> Result<OwnedFd> {
    open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", path, e))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io("getcwd", p, e))
}

/// Validates `spec` and opens its directories: at least one lower and at most
/// [`MAX_LOWERS`] lowers and data-only lowers together, none listed twice by the same
/// path, every path an existing directory, a fresh upper/work empty when asked, and the
/// target (opened once, so the mount lands on exactly the directory checked) not already
/// a mount point.
///
/// Lowers are not even opened here: checks that need a syscall per layer run only
/// after the kernel refuses ([`spec_problem`]); this is the hot path of every restore.
pub(crate) fn checked_spec(spec: &OverlaySpec) -> Result<Checked> {
    if spec.lowers.is_empty() {
        return Err(Error::InvalidSpec { reason: "no lower directories".into() });
    }
    if spec.lowers.len() + spec.data_lowers.len() > MAX_LOWERS {
        return Err(Error::LimitExceeded {
            what: "overlay lower directories, data-only ones included (kernel maximum)",
            limit: MAX_LOWERS as u64,
        });
    }
    let lowers = spec.lowers.iter().map(|p| absolute(p)).collect::<Result<Vec<_>>>()?;
    let data_lowers = spec.data_lowers.iter().map(|p| absolute(p)).collect::<Result<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::with_capacity(lowers.len() + data_lowers.len());
    for l in lowers.iter().chain(&data_lowers) {
        if !seen.insert(l) {
            return Err(Error::InvalidSpec { reason: format!("lower {} is listed twice", l.display()) });
        }
    }
    let (upper, work, target) = (absolute(&spec.upper)?, absolute(&spec.work)?, absolute(&spec.target)?);
    // A workspace's own dirs, checked when it was made or opened, must still be those
    // dirs: a symlink swapped in since then is refused (`ELOOP`) rather than followed.
    let own = crate::immutable::dirs_checked();
    let nofollow = if own { OFlag::O_NOFOLLOW } else { OFlag::empty() };
    let swapped = |p: &Path, e: nix::errno::Errno| match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR if own => {
            Error::InvalidSpec { reason: format!("{} is a symlink, not the workspace's own directory", p.display()) }
        }
        e => Error::io("open", p, e),
    };
    let readable = |p: &Path| {
        open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | nofollow, Mode::empty())
            .map_err(|e| swapped(p, e))
    };
    let (upper_fd, work_fd) = (readable(&upper)?, readable(&work)?);
    if spec.options.fresh {
        for (fd, d) in [(&upper_fd, &upper), (&work_fd, &work)] {
            if !crate::sys::dir_is_empty(fd.as_fd()).map_err(|e| Error::io("getdents64", d.as_path(), e))? {
                return Err(Error::NotEmpty { path: d.clone() });
            }
        }
    }
    // Follows a symlink, as mount(2) and umount2(2) do: the checks, the mount and the
    // unmount all mean the directory the path names.
    let target_fd = if own {
        open(&target, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW, Mode::empty())
            .map_err(|e| swapped(&target, e))?
    } else {
        open_dir(&target)?
    };
    // Rule 4: the upper and work dirs are written, and so is the copy backend's target;
    // none of them may be (inside) a cache layer, whichever path names it.
    // (A workspace checked its own dirs when it made or opened them.)
    if !crate::immutable::dirs_checked() {
        for (fd, op) in [
            (&upper_fd, "use it as an overlay upper dir"),
            (&work_fd, "use it as an overlay work dir"),
            (&target_fd, "mount over it"),
        ] {
            if let Some(layer) = crate::immutable::cache_of_fd(fd.as_fd()) {
                return Err(Error::ImmutableLayer { op, path: layer });
            }
        }
    }
    let mounted = match crate::sys::is_mount_root_fd(target_fd.as_fd()) {
        Ok(Some(m)) => m,
        Ok(None) => is_mount_point(&target)?,
        Err(e) => return Err(Error::io("statx", target.as_path(), e)),
    };
    if mounted {
        return Err(Error::AlreadyMounted { path: target });
    }
    let paths = kernel::Paths { lowers, data_lowers, upper, work, target, upper_fd, work_fd, target_fd };
    Ok(Checked { paths, userxattr: spec.userxattr() })
}

/// What is wrong with a checked spec that the kernel explains badly: a lower (or
/// data-only lower) that cannot be opened (`mount(2)` says `ENOENT` without naming it),
/// the same lower reached twice through different paths (symlinks, bind mounts; the
/// kernel says `ELOOP`), or upper and work on different filesystems (`EINVAL`, reason in
/// dmesg).
pub(crate) fn spec_problem(p: &kernel::Paths) -> Result<Option<Error>> {
    let stat = |fd: &OwnedFd, path: &Path| fstat(fd.as_fd()).map_err(|e| Error::io("fstat", path, e));
    let mut seen = std::collections::HashMap::with_capacity(p.lowers.len() + p.data_lowers.len());
    for l in p.lowers.iter().chain(&p.data_lowers) {
        let fd = match open_dir(l) {
            Ok(fd) => fd,
            Err(e) => return Ok(Some(e)),
        };
        let st = stat(&fd, l)?;
        if let Some(first) = seen.insert((st.st_dev, st.st_ino), l) {
            return Ok(Some(Error::InvalidSpec {
                reason: format!("lower {} is listed twice (also as {})", l.display(), first.display()),
            }));
        }
    }
    if stat(&p.upper_fd, &p.upper)?.st_dev != stat(&p.work_fd, &p.work)?.st_dev {
        return Ok(Some(Error::InvalidSpec {
            reason: format!("upper {} and work {} are on different filesystems", p.upper.display(), p.work.display()),
        }));
    }
    Ok(None)
}

/// A mounted overlay that is unmounted when dropped.
///
/// Drop ignores unmount errors (it never panics and never prints); call
/// [`unmount`](OverlayMount::unmount) to see them.
///
/// ```no_run
/// use rootfs_cache::{KernelOverlay, OverlayMount, OverlaySpec};
/// # fn main() -> rootfs_cache::Result<()> {
/// let spec = OverlaySpec::new(["/cache/layers/ab/fs"], "/sb/1/upper", "/sb/1/work", "/sb/1/rootfs");
/// let m = OverlayMount::mount(KernelOverlay::new(), spec)?; // or `&backend`, or a Box<dyn MountBackend>
/// std::fs::write(m.target().join("tmp/hello"), b"hi").expect("write"); // lands in /sb/1/upper
/// m.unmount()?;
/// # Ok(()) }
/// ```
#[must_use = "dropping an OverlayMount unmounts it"]
pub struct OverlayMount<B: MountBackend> {
    backend: B,
    spec: OverlaySpec,
    mounted: bool,
}

impl<B: MountBackend> OverlayMount<B> {
    /// Mounts `spec` with `backend` (owned, or borrowed: `&B` is a backend too).
    ///
    /// # Errors
    /// Whatever [`MountBackend::mount`] returns.
    pub fn mount(backend: B, spec: OverlaySpec) -> Result<Self> {
        backend.mount(&spec)?;
        Ok(OverlayMount { backend, spec, mounted: true })
    }

    /// The merged view.
    pub fn target(&self) -> &Path {
        &self.spec.target
    }

    /// What was mounted.
    pub fn spec(&self) -> &OverlaySpec {
        &self.spec
    }

    /// Unmounts now, reporting errors.
    ///
    /// # Errors
    /// Whatever [`MountBackend::unmount`] returns.
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        self.backend.unmount(&self.spec)
    }

    /// Gives up the guard and leaves the overlay mounted; the caller must unmount it
    /// with `backend.unmount(&spec)` later.
    pub fn keep_mounted(mut self) -> OverlaySpec {
        self.mounted = false;
        std::mem::replace(&mut self.spec, OverlaySpec::new(Vec::<PathBuf>::new(), "", "", ""))
    }
}

impl<B: MountBackend> Drop for OverlayMount<B> {
    fn drop(&mut self) {
        if self.mounted {
            let _ = self.backend.unmount(&self.spec);
        }
    }
}

impl<B: MountBackend> std::fmt::Debug for OverlayMount<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayMount").field("spec", &self.spec).field("mounted", &self.mounted).finish()
    }
}

/// Which backend [`detect()`] chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// [`KernelOverlay`].
    Kernel,
    /// [`CopyBackend`].
    Copy,
}

/// Why [`detect()`] chose its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DetectReason {
    /// A probe overlay mount (upper on the scratch filesystem) worked.
    OverlayMounted,
    /// The kernel has no overlay filesystem (`ENODEV`; module missing or not loadable).
    NoOverlayfs,
    /// Mounting is not permitted here (`EPERM`/`EACCES`): no `CAP_SYS_ADMIN` over this
    /// mount namespace, or a seccomp or LSM policy refused it.
    NotPermitted,
    /// Overlayfs exists but refused this setup (`EINVAL`, `EOPNOTSUPP`, ...): typically
    /// the scratch filesystem cannot hold an upper (it is itself an overlay, lacks
    /// xattrs or `O_TMPFILE`), or the stack is nested too deep. `errno` is the error.
    OverlayRefused {
        /// The errno the probe mount failed with (0 if its error carried none).
        errno: i32,
    },
}

/// What [`detect()`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Detection {
    /// The backend to use.
    pub kind: BackendKind,
    /// Why.
    pub reason: DetectReason,
    /// Whether the probe mount used `userxattr` (as it does when this process is
    /// unprivileged: not root, or in a user namespace).
    pub userxattr: bool,
    /// Whether the kernel overlay takes [data-only lowers](OverlaySpec::data_lowers) (Linux
    /// 6.5+), which a lazy image needs: measured with a real mount of a tiny overlay with a
    /// data-only lower, in a private mount namespace. Always false with
    /// [`BackendKind::Copy`], which cannot use them at all.
    pub data_only_lowers: bool,
}

impl Detection {
    /// A boxed instance of the chosen backend.
    pub fn backend(&self) -> Box<dyn MountBackend> {
        match self.kind {
            BackendKind::Kernel => Box::new(KernelOverlay::new()),
            BackendKind::Copy => Box::new(CopyBackend::new()),
        }
    }
}

/// Picks a backend by mounting a tiny probe overlay whose upper lives in `scratch` (use
/// the directory that will hold the uppers: whether overlay works depends on that
/// filesystem). The probe is unmounted and removed before returning. When the kernel
/// overlay works, whether it takes data-only lowers is probed too
/// ([`Detection::data_only_lowers`]): an image with them (a lazy one) needs the kernel
/// backend, and [`CopyBackend`] refuses it with [`Error::Unsupported`], never copying
/// its placeholders.
///
/// # Errors
/// [`Error::Io`] when the probe directories cannot be created in or removed from
/// `scratch`; [`Error::Mount`] (or [`Error::Io`], reading the mount table) when the probe
/// mounted but cannot be unmounted (it is then left in place: nothing is deleted through
/// a mount). A failing probe mount is an answer ([`BackendKind::Copy`]), not an error.
pub fn detect(scratch: &Path) -> Result<Detection> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = scratch.join(format!(".rootfs-cache-probe-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let sub = |n: &str| dir.join(n);
    for d in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir_all(sub(d)).map_err(|e| Error::io("mkdir", sub(d), e))?;
    }
    let mut spec = OverlaySpec::new([sub("lower")], sub("upper"), sub("work"), sub("merged"));
    spec.options.fresh = true;
    let userxattr = spec.userxattr();
    let kernel = KernelOverlay::new();
    let outcome = kernel.mount(&spec);
    let unmounted = if outcome.is_ok() { kernel.unmount(&spec) } else { Ok(()) };
    // Never delete through a mount: only remove the probe once it is verifiably unmounted.
    unmounted?;
    let parent = open(scratch, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", scratch, e))?;
    let name = dir.file_name().expect("a probe name").as_encoded_bytes();
    crate::fsutil::remove_tree(parent.as_fd(), name, name, None, &dir)?;
    let (kind, reason) = match outcome {
        Ok(()) => (BackendKind::Kernel, DetectReason::OverlayMounted),
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            let reason = match errno {
                nix::libc::ENODEV => DetectReason::NoOverlayfs,
                nix::libc::EPERM | nix::libc::EACCES => DetectReason::NotPermitted,
                _ => DetectReason::OverlayRefused { errno },
            };
            (BackendKind::Copy, reason)
        }
    };
    let data_only_lowers = kind == BackendKind::Kernel && kernel::data_only_lowers() == Some(true);
    Ok(Detection { kind, reason, userxattr, data_only_lowers })
}
