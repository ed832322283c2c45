//! [`KernelOverlay`]: overlayfs through the new mount API, or `mount(2)` on old kernels.
//!
//! # Kernel differences
//! Probed once per process on first use, and cached:
//! - **Layer fds** (`fsconfig(FSCONFIG_SET_FD, "lowerdir+")`, Linux 6.13+): each layer is
//!   handed over as an open directory, so neither path lengths nor the option page
//!   limit anything; the kernel's 500-lower limit is the only one.
//! - **Layer strings** (`fsconfig(FSCONFIG_SET_STRING, "lowerdir+")`, Linux 6.8+): one
//!   layer per call. `fsconfig` copies at most 256 bytes of a string, so a longer path
//!   is resolved as `.` from a helper thread that has `fchdir`ed into the layer.
//! - **Legacy** (`mount(2)`, any kernel with overlayfs): one option string, at most a
//!   page. Past a page, the paths are made relative to their deepest common directory
//!   and the mount is made from a helper thread that `chdir`s there (containerd's
//!   compaction). Helper threads `unshare(CLONE_FS)` first, so the process's working
//!   directory never changes.
//!
//! **Data-only lowers** ([`OverlaySpec::data_lowers`]) go after the normal lowers: as
//! `fsconfig(.., "datadir+")` calls (Linux 6.8+, as `lowerdir+`) with the new API, and
//! as `lowerdir=l1:l2::d1::d2` (Linux 6.5+) in the legacy option string. When a mount
//! with data-only lowers fails, [`data_only_lowers`] (a real probe, run once) tells
//! whether the kernel has them at all, and if it has not the error says so
//! ([`Error::Unsupported`]) instead of passing on the kernel's `EINVAL`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::fcntl::{OFlag, open};
use nix::libc;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;

use super::options::{self, Param, bytes};
use super::{MountBackend, OverlaySpec, checked_spec, mountinfo};
use crate::error::{Error, Result};
use crate::sys;

/// How [`KernelOverlay`] talks to the kernel. [`MountApi::Auto`] picks the best the
/// running kernel has; the others force one path (tests, benchmarks, working around a
/// kernel bug).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MountApi {
    /// Probe once, then use the best available.
    #[default]
    Auto,
    /// `fsopen` + `fsconfig(FSCONFIG_SET_FD, "lowerdir+")` per layer (Linux 6.13+).
    LayerFds,
    /// `fsopen` + `fsconfig(FSCONFIG_SET_STRING, "lowerdir+")` per layer (Linux 6.8+).
    LayerStrings,
    /// `mount(2)` with an option string, compacted past a page.
    Legacy,
}

/// The kernel's overlayfs.
///
/// Mounts with `index=off`, `redirect_dir=nofollow`, `metacopy=off` and `xino=off` unless the
/// spec's [`OverlayOptions`](super::OverlayOptions) ask otherwise, and with `userxattr`
/// when [`OverlaySpec::userxattr`] says so (by default: when this process is not root,
/// or is in a user namespace). Unmounting is `umount2(MNT_DETACH)` followed by a check that
/// the target is no longer a mount point; nothing is ever deleted.
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOverlay {
    api: MountApi,
}

static PROBED: AtomicU8 = AtomicU8::new(0);

impl KernelOverlay {
    /// The kernel backend, choosing the mount API by probing the kernel.
    pub fn new() -> Self {
        KernelOverlay { api: MountApi::Auto }
    }

    /// The kernel backend forced to one mount API. A forced API the kernel lacks fails at
    /// mount time with the kernel's error (`EINVAL` for an unknown `lowerdir+`). Data-only
    /// lowers go with every API: `datadir+` with the new ones, `::` with the legacy one.
    pub fn with_api(api: MountApi) -> Self {
        KernelOverlay { api }
    }

    /// The API mounts will use: the forced one, or what the probe found.
    pub fn api(&self) -> MountApi {
        match self.api {
            MountApi::Auto => probe(),
            api => api,
        }
    }
}

/// Which API the kernel has. Cached once it is known; not cached when the probe itself
/// is refused (`EPERM` before privileges are set up), so a later call probes again.
fn probe() -> MountApi {
    const APIS: [MountApi; 3] = [MountApi::LayerFds, MountApi::LayerStrings, MountApi::Legacy];
    if let n @ 1..=3 = PROBED.load(Ordering::Relaxed) {
        return APIS[usize::from(n - 1)];
    }
    let found = (|| {
        let root = open("/", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).ok()?;
        let ctx = match sys::fsopen(c"overlay") {
            Ok(c) => c,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Some(MountApi::Legacy),
            Err(_) => return None,
        };
        if sys::fsconfig_set_fd(ctx.as_fd(), c"lowerdir+", root.as_fd()).is_ok() {
            return Some(MountApi::LayerFds);
        }
        let ctx = sys::fsopen(c"overlay").ok()?;
        if sys::fsconfig_set_string(ctx.as_fd(), c"lowerdir+", b"/").is_ok() {
            return Some(MountApi::LayerStrings);
        }
        Some(MountApi::Legacy)
    })();
    match found {
        Some(api) => {
            let n = APIS.iter().position(|a| *a == api).unwrap_or(2) as u8 + 1;
            PROBED.store(n, Ordering::Relaxed);
            api
        }
        None => MountApi::Legacy,
    }
}

fn mount_err<'a, E: Into<io::Error>>(
    op: &'static str,
    target: &'a Path,
    detail: String,
) -> impl FnOnce(E) -> Error + 'a {
    move |source| Error::Mount { op, target: target.to_path_buf(), source: source.into(), detail }
}

/// Runs `f` on a helper thread with its own filesystem context (cwd), so changing
/// directory there never affects the rest of the process.
fn with_own_cwd<T: Send>(target: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            unshare(CloneFlags::CLONE_FS).map_err(mount_err("unshare CLONE_FS", target, String::new()))?;
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn set_param(ctx: BorrowedFd<'_>, p: &Param, target: &Path) -> Result<()> {
    let r = match *p {
        Param::Flag(k) => sys::fsconfig_set_flag(ctx, &cstr(k)),
        Param::Value(k, v) => sys::fsconfig_set_string(ctx, &cstr(k), v.as_bytes()),
    };
    r.map_err(|e| Error::Mount {
        op: "fsconfig",
        target: target.to_path_buf(),
        detail: sys::fs_context_log(ctx),
        source: e,
    })
}

fn cstr(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).expect("parameter names have no NUL")
}

/// Sets one layer parameter, attaching the kernel's message on failure.
fn set_layer(ctx: BorrowedFd<'_>, key: &'static CStr, how: Layer<'_>, path: &Path, target: &Path) -> Result<()> {
    let r = match how {
        Layer::Fd(fd) => sys::fsconfig_set_fd(ctx, key, fd),
        Layer::Str(s) => sys::fsconfig_set_string(ctx, key, s),
    };
    r.map_err(|e| {
        let log = sys::fs_context_log(ctx);
        let detail = if log.is_empty() { format!("{}", path.display()) } else { format!("{}: {log}", path.display()) };
        Error::Mount { op: op_name(key), target: target.to_path_buf(), source: e, detail }
    })
}

fn op_name(key: &CStr) -> &'static str {
    match key.to_bytes() {
        b"lowerdir+" => "fsconfig lowerdir+",
        b"datadir+" => "fsconfig datadir+",
        b"upperdir" => "fsconfig upperdir",
        _ => "fsconfig workdir",
    }
}

#[derive(Clone, Copy)]
enum Layer<'a> {
    Fd(BorrowedFd<'a>),
    Str(&'a [u8]),
}

/// `fsconfig` copies at most this many bytes of a string value (`strndup_user(.., 256)`).
const FSCONFIG_STRING_MAX: usize = 255;

/// Whether a path can go to `fsconfig` as a string as is. Besides the length limit,
/// overlayfs strips `\` escapes from `upperdir`/`workdir` strings (not `lowerdir+`);
/// such paths take the `fchdir` + `.` route instead.
fn plain_string(path: &Path) -> bool {
    let b = bytes(path);
    b.len() <= FSCONFIG_STRING_MAX && !b.contains(&b'\\')
}

impl MountBackend for KernelOverlay {
    /// Mounts an overlay of `spec` at `spec.target` with the API of
    /// [`KernelOverlay::api`].
    ///
    /// # Errors
    /// - [`Error::InvalidSpec`]: no lowers, or a lower listed twice by path; after the
    ///   kernel refuses (`ELOOP`, `EINVAL`, `ENOENT`, `ENOTDIR`), also a lower reached
    ///   twice through different paths, or upper and work on different filesystems;
    /// - [`Error::LimitExceeded`]: more than [`MAX_LOWERS`](super::MAX_LOWERS) lowers, or
    ///   ([`MountApi::Legacy`]) option data longer than a page even after path compaction;
    /// - [`Error::AlreadyMounted`]: the target is already a mount point;
    /// - [`Error::NotEmpty`]: [`fresh`](super::OverlayOptions::fresh) was asked for and the
    ///   upper or work dir is not empty;
    /// - [`Error::Io`]: the upper, work or target dir cannot be opened (or, after the
    ///   kernel refuses, a lower), or the mount table cannot be read;
    /// - [`Error::Unsupported`]: the spec has [data-only lowers](OverlaySpec::data_lowers)
    ///   and this kernel's overlayfs has no data-only layers (before Linux 6.5);
    /// - [`Error::Mount`]: the kernel refused a step (`fsopen`, `fsconfig`, `fsmount`,
    ///   `move_mount`, `mount`), with its message in `detail` when it gave one.
    fn mount(&self, spec: &OverlaySpec) -> Result<()> {
        let _span = span!(
            "mount",
            backend = "kernel",
            target = %spec.target.display(),
            lowers = spec.lowers.len(),
            data_lowers = spec.data_lowers.len()
        );
        let c = checked_spec(spec)?;
        let params = options::params(&spec.options, c.userxattr);
        let r = match (self.api, self.api()) {
            (_, MountApi::Legacy | MountApi::Auto) => mount_legacy(&c.paths, &params),
            // Auto on a kernel with layer fds: a plain path costs the kernel one lookup
            // and us nothing, an fd costs an open and a close; fds only where needed.
            (MountApi::Auto, MountApi::LayerFds) => mount_new(&c, &params, Layers::Mixed),
            (_, MountApi::LayerFds) => mount_new(&c, &params, Layers::Fds),
            (_, MountApi::LayerStrings) => mount_new(&c, &params, Layers::Strings),
        };
        let e = match r {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EINVAL | libc::ENOENT | libc::ENOTDIR)) => {
                match super::spec_problem(&c.paths)? {
                    Some(problem) => return Err(problem),
                    None => e,
                }
            }
            Err(e) => e,
        };
        // Before Linux 6.5 the kernel says `EINVAL` ("empty lowerdir" for `::`, "Unknown
        // parameter" for `datadir+`): say what is missing instead.
        if !spec.data_lowers.is_empty() && matches!(e, Error::Mount { .. }) && data_only_lowers() == Some(false) {
            return Err(Error::Unsupported {
                what: format!(
                    "data-only lower layers (lazy images): this kernel's overlayfs has none (Linux 6.5+ has them); \
                     the mount failed with: {e}"
                ),
            });
        }
        Err(e)
    }

    /// Detaches the overlay at `spec.target` (`umount2(MNT_DETACH)`) and checks that the
    /// target is no longer a mount point. A target that is not mounted, or does not
    /// exist, is fine.
    ///
    /// # Errors
    /// [`Error::Mount`] (`umount2`) when the kernel refuses the unmount, or when the target
    /// is still a mount point afterwards (`EBUSY`: another mount stacked there, or a
    /// locked mount); [`Error::Io`] when the mount table cannot be read.
    fn unmount(&self, spec: &OverlaySpec) -> Result<()> {
        let _span = span!("unmount", backend = "kernel", target = %spec.target.display());
        unmount_target(&spec.target)
    }
}

/// Detaches whatever is mounted at `target` and checks that nothing is left there.
/// A target that is not mounted (or does not exist) is fine: unmounting twice is harmless.
pub(crate) fn unmount_target(target: &Path) -> Result<()> {
    // A final symlink is followed, as it was by mount.
    match nix::mount::umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(mount_err("umount2", target, String::new())(e)),
    }
    if mountinfo::is_mount_point(target)? {
        return Err(Error::Mount {
            op: "umount2",
            target: target.to_path_buf(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
            detail: "still a mount point after MNT_DETACH: another mount is stacked here, or it is locked".into(),
        });
    }
    Ok(())
}

/// The absolute paths of a checked spec, with open descriptors for upper, work and the
/// target (lowers are opened only where `fsconfig` needs an fd).
pub(crate) struct Paths {
    pub lowers: Vec<PathBuf>,
    /// Data-only lowers, top first.
    pub data_lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub target: PathBuf,
    pub upper_fd: OwnedFd,
    pub work_fd: OwnedFd,
    /// The target, opened once: the mount goes exactly where the checks looked.
    pub target_fd: OwnedFd,
}

/// How layers are handed to `fsconfig`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layers {
    /// Every layer as an open directory.
    Fds,
    /// Plain paths as strings, the rest as open directories.
    Mixed,
    /// Plain paths as strings, the rest as `.` from a helper thread `fchdir`ed there.
    Strings,
}

fn open_layer(path: &Path) -> Result<OwnedFd> {
    open(path, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::io("open", path, e))
}

fn mount_new(c: &super::Checked, params: &[Param], how: Layers) -> Result<()> {
    let p = &c.paths;
    let target = &p.target;
    let ctx = sys::fsopen(c"overlay").map_err(mount_err("fsopen overlay", target, String::new()))?;
    let ctx = ctx.as_fd();
    for param in params {
        set_param(ctx, param, target)?;
    }
    let layers = p.lowers.iter().map(|path| (c"lowerdir+", None, path));
    // Data-only lowers after every normal one: the kernel refuses `lowerdir+` after `datadir+`.
    let layers = layers.chain(p.data_lowers.iter().map(|path| (c"datadir+", None, path)));
    let layers = layers.chain([(c"upperdir", Some(&p.upper_fd), &p.upper), (c"workdir", Some(&p.work_fd), &p.work)]);
    let layers: Vec<(&CStr, Option<&OwnedFd>, &PathBuf)> = layers.collect();
    let set = |key: &'static CStr, fd: Option<&OwnedFd>, path: &Path, as_fd: bool| -> Result<()> {
        if !as_fd {
            return set_layer(ctx, key, Layer::Str(bytes(path)), path, target);
        }
        match fd {
            Some(fd) => set_layer(ctx, key, Layer::Fd(fd.as_fd()), path, target),
            None => set_layer(ctx, key, Layer::Fd(open_layer(path)?.as_fd()), path, target),
        }
    };
    if how != Layers::Strings {
        for &(key, fd, path) in &layers {
            set(key, fd, path, how == Layers::Fds || !plain_string(path))?;
        }
    } else if layers.iter().all(|(_, _, path)| plain_string(path)) {
        for &(key, fd, path) in &layers {
            set(key, fd, path, false)?;
        }
    } else {
        with_own_cwd(target, || {
            for &(key, fd, path) in &layers {
                if plain_string(path) {
                    set(key, fd, path, false)?;
                } else {
                    let opened;
                    let dir = match fd {
                        Some(fd) => fd,
                        None => {
                            opened = open_layer(path)?;
                            &opened
                        }
                    };
                    nix::unistd::fchdir(dir).map_err(|e| Error::io("fchdir", path.as_path(), e))?;
                    set_layer(ctx, key, Layer::Str(b"."), path, target)?;
                }
            }
            Ok(())
        })?;
    }
    sys::fsconfig_create(ctx).map_err(|e| Error::Mount {
        op: "fsconfig create",
        target: target.clone(),
        detail: sys::fs_context_log(ctx),
        source: e,
    })?;
    let mnt = sys::fsmount(ctx).map_err(|e| Error::Mount {
        op: "fsmount",
        target: target.clone(),
        detail: sys::fs_context_log(ctx),
        source: e,
    })?;
    sys::move_mount_to_fd(mnt.as_fd(), p.target_fd.as_fd()).map_err(mount_err("move_mount", target, String::new()))
}

fn mount_legacy(p: &Paths, params: &[Param]) -> Result<()> {
    let target = &p.target;
    // Mount on the directory the checks looked at, not on whatever the path names now.
    let on = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&p.target_fd));
    let sys_mount = |data: &[u8]| {
        nix::mount::mount(Some("overlay"), on.as_str(), Some("overlay"), MsFlags::empty(), Some(data))
            .map_err(mount_err("mount", target, String::new()))
    };
    let lowers: Vec<&[u8]> = p.lowers.iter().map(|l| bytes(l)).collect();
    let data_lowers: Vec<&[u8]> = p.data_lowers.iter().map(|l| bytes(l)).collect();
    if let Some(data) = options::legacy_data(&lowers, &data_lowers, bytes(&p.upper), bytes(&p.work), params) {
        return sys_mount(&data);
    }
    let too_long = || Error::LimitExceeded { what: "overlay mount(2) option data after path compaction", limit: 4095 };
    let lowers: Vec<&Path> = p.lowers.iter().map(PathBuf::as_path).collect();
    let data_lowers: Vec<&Path> = p.data_lowers.iter().map(PathBuf::as_path).collect();
    let (base, data) =
        options::compacted_legacy_data(&lowers, &data_lowers, &p.upper, &p.work, params).ok_or_else(too_long)?;
    with_own_cwd(target, || {
        nix::unistd::chdir(base.as_path()).map_err(|e| Error::io("chdir", base.as_path(), e))?;
        sys_mount(&data)
    })
}

/// 0: not known yet; 1: no; 2: yes.
static DATA_ONLY: AtomicU8 = AtomicU8::new(0);

/// Whether this kernel's overlayfs takes data-only lower layers (`lowerdir=l::d`, Linux
/// 6.5+; the new API's `datadir+` came with `lowerdir+` in 6.8).
///
/// Measured once for real, then cached: a helper thread moves into a private mount
/// namespace (nothing it mounts is seen anywhere else, and everything goes when it
/// exits), mounts a small tmpfs over the temp dir there and a read-only overlay of an
/// empty lower over an empty data-only lower inside it. `None` (not cached) when the
/// probe cannot run at all: no right to make a mount namespace or mount there.
pub(crate) fn data_only_lowers() -> Option<bool> {
    match DATA_ONLY.load(Ordering::Relaxed) {
        1 => return Some(false),
        2 => return Some(true),
        _ => {}
    }
    let found = std::thread::scope(|s| s.spawn(probe_data_only).join().ok().flatten());
    if let Some(yes) = found {
        DATA_ONLY.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
    }
    found
}

/// The probe of [`data_only_lowers`]; runs on a helper thread of its own.
fn probe_data_only() -> Option<bool> {
    unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).ok()?;
    // Nothing mounted below may propagate back into the namespace we came from.
    nix::mount::mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).ok()?;
    let dir = std::env::temp_dir();
    nix::mount::mount(Some("tmpfs"), &dir, Some("tmpfs"), MsFlags::empty(), Some("size=64k,mode=0700")).ok()?;
    let found = (|| {
        nix::unistd::chdir(&dir).ok()?;
        for d in ["l", "d", "m"] {
            nix::unistd::mkdir(d, Mode::from_bits_truncate(0o700)).ok()?;
        }
        let with_data: &[u8] =
            if crate::privilege::unprivileged() { b"lowerdir=l::d,userxattr" } else { b"lowerdir=l::d" };
        // Two normal lowers: old kernels refuse a single one without an upper.
        let without: &[u8] = if crate::privilege::unprivileged() { b"lowerdir=l:d,userxattr" } else { b"lowerdir=l:d" };
        let mount_ro = |data: &[u8]| {
            let r = nix::mount::mount(Some("overlay"), "m", Some("overlay"), MsFlags::MS_RDONLY, Some(data));
            if r.is_ok() {
                let _ = nix::mount::umount2("m", MntFlags::MNT_DETACH);
            }
            r
        };
        match mount_ro(with_data) {
            Ok(()) => Some(true),
            // An answer only if the same overlay mounts with the data-only lower as a
            // normal one.
            Err(_) => mount_ro(without).is_ok().then_some(false),
        }
    })();
    let _ = nix::unistd::chdir("/");
    let _ = nix::mount::umount2(&dir, MntFlags::MNT_DETACH);
    found
}
