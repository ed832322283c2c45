//! # rootfs-cache
//!
//! Restore a container or sandbox root filesystem in about a millisecond: each image
//! layer is extracted once per node into a digest-keyed cache ([`RootfsCache`]), and
//! every sandbox gets the shared, read-only layer directories ([`Rootfs::lowers`]) to
//! mount as overlay lowers under its own private upper.
//!
//! ```no_run
//! use rootfs_cache::{CacheOptions, OciLayout, RootfsCache};
//! # fn main() -> rootfs_cache::Result<()> {
//! let mut opts = CacheOptions::default();
//! opts.max_bytes = 20 << 30; // evict unleased layers beyond 20 GiB
//! let cache = RootfsCache::open("/var/lib/rt/rootfs-cache", opts)?;
//! let images = OciLayout::open("/srv/images/python")?; // or your registry ImageFetcher
//!
//! let rootfs = cache.ensure(&images, "3.12")?; // cold: missing layers extracted once
//! let lowerdir: Vec<String> = rootfs.lowers().iter().map(|p| p.display().to_string()).collect();
//! println!("mount -t overlay overlay -o lowerdir={},upperdir=…,workdir=… /run/sb/rootfs", lowerdir.join(":"));
//!
//! // Warm: a digest reference of a cached image answers from memory (~1 µs).
//! let again = cache.ensure(&images, &format!("@{}", rootfs.manifest_digest()))?;
//! rootfs.persist("sandbox-42")?; // keep the layers pinned across restarts
//! drop((rootfs, again)); // in-memory leases released; `cache.release("sandbox-42")` later
//! # Ok(()) }
//! ```
//!
//! The lowers become a sandbox's rootfs with a [`MountBackend`]: [`KernelOverlay`]
//! (overlayfs through the new mount API, one layer per `fsconfig` call, so the 4 KiB
//! option page never limits the layer count), or [`CopyBackend`] where overlay cannot
//! be mounted; [`detect()`] tries a real probe mount and says why it chose.
//!
//! ```no_run
//! use rootfs_cache::{detect, OverlayMount, OverlaySpec};
//! # fn main() -> rootfs_cache::Result<()> {
//! # let cache = rootfs_cache::RootfsCache::open("/var/lib/rt/rootfs-cache", Default::default())?;
//! # let rootfs = cache.ensure(&rootfs_cache::OciLayout::open("/srv/images/python")?, "3.12")?;
//! let backend = detect("/run/sb".as_ref())?.backend(); // Kernel, or Copy (and why: Detection::reason)
//! for d in ["upper", "work", "rootfs"] {
//!     std::fs::create_dir_all(format!("/run/sb/42/{d}")).expect("mkdir");
//! }
//! let mut spec = OverlaySpec::new(rootfs.lowers(), "/run/sb/42/upper", "/run/sb/42/work", "/run/sb/42/rootfs");
//! spec.options.fresh = true; // refuse an upper that holds another sandbox's writes
//! let mounted = OverlayMount::mount(backend, spec)?;
//! // ... run the sandbox on /run/sb/42/rootfs; its writes land in /run/sb/42/upper ...
//! mounted.unmount()?; // or drop it: unmounts (MNT_DETACH) and verifies
//! # Ok(()) }
//! ```
//!
//! A [`Workspace`] is one sandbox's view: a fresh upper over the lowers, mounted with
//! any backend, holding the image's lease. Its writes move around as a diff read from
//! the upper alone: [`Workspace::changes`], [`Workspace::export_diff`] /
//! [`Workspace::import_diff`] (an OCI layer diff), [`Workspace::checkpoint`] /
//! [`Workspace::restore`] (a block-aligned diff whose file data XFS and btrfs share
//! instead of copying; uppers can live in a tmpfs, [`UpperStorage::Tmpfs`]),
//! [`Workspace::apply`] (flatten into a private lower; CI runners recycling a workspace)
//! and [`Workspace::detach`] (copy everything up and let the cache evict the image).
//!
//! ```no_run
//! use rootfs_cache::{DiffOptions, KernelOverlay, Workspace, WorkspaceOptions};
//! # fn main() -> rootfs_cache::Result<()> {
//! # let cache = rootfs_cache::RootfsCache::open("/var/lib/rt/rootfs-cache", Default::default())?;
//! # let images = rootfs_cache::OciLayout::open("/srv/images/python")?;
//! let mut ws = Workspace::create("/run/sb/42", cache.ensure(&images, "3.12")?, WorkspaceOptions::default())?;
//! let rootfs = ws.mount(KernelOverlay::new())?.to_path_buf(); // /run/sb/42/rootfs
//! # let _ = rootfs;
//! // ... the sandbox runs; then its writes as a compressed OCI layer (to push somewhere):
//! let blob = std::fs::File::create("/var/lib/rt/layers/42.tar.zst").expect("create");
//! let mut opts = DiffOptions::default();
//! opts.compression = rootfs_cache::Compression::Zstd;
//! let stats = ws.export_diff(blob, &opts)?; // stats.digest, stats.diff_id
//! // ... or, frozen, as a checkpoint that reflinks instead of copying (same filesystem):
//! ws.checkpoint("/var/lib/rt/ckpt/42.tar")?;
//! ws.destroy()?; // unmounts, deletes, releases the lease
//!
//! // Restore: a fresh workspace on the same image with the checkpoint's writes.
//! let image = cache.ensure(&images, "3.12")?;
//! let mut ws = Workspace::restore("/run/sb/43", image, WorkspaceOptions::default(), "/var/lib/rt/ckpt/42.tar")?;
//! ws.mount(KernelOverlay::new())?;
//! # let _ = stats;
//! # Ok(()) }
//! ```
//!
//! Layers can also be extracted directly with [`unpack()`]: streaming, safe extraction of
//! one OCI layer (plain, gzip or zstd) with digest verification and OCI → overlayfs
//! whiteout conversion (or flattening).
//!
//! ```no_run
//! use rootfs_cache::{unpack, Digest, UnpackOptions};
//! # fn main() -> rootfs_cache::Result<()> {
//! let blob = std::fs::File::open("layer.tar.gz").expect("open");
//! let mut opts = UnpackOptions::default();
//! opts.expected_digest = Some("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".parse()?);
//! std::fs::create_dir_all("/tmp/layer").expect("mkdir");
//! let stats = unpack(blob, "/tmp/layer".as_ref(), &opts)?;
//! println!("{} entries, {} bytes, digest {}", stats.entries, stats.file_bytes, stats.digest);
//! # let _: Digest = stats.digest;
//! # Ok(()) }
//! ```
//!
//! ## Modules
//! - `digest`: [`Digest`] (`sha256:<64 lowercase hex>` only), [`HashingReader`], [`HashingWriter`];
//! - `error`: [`Error`], one `#[non_exhaustive]` enum; OS errors name the operation and path;
//! - `sys`: the only `unsafe` code (xattrs, the new mount API and other calls `nix` lacks);
//! - `root`: fd-based path resolution inside a root directory ([`Root`]);
//! - `fsutil`: descriptor-based file-system helpers shared by the modules below (list,
//!   open, `lstat`, remove a tree), nothing overlay-specific;
//! - `privilege`: whether this process is unprivileged ([`in_user_namespace`]), which
//!   decides the overlay xattr namespace for extraction, mounts and workspaces alike;
//! - `immutable`: recognises cache layers by path, so nothing writes into one (rule 4);
//! - `lockfile`: exclusive `flock` locks that name their holder's pid ([`Error::Busy`]);
//! - `unpack`: [`unpack()`], [`UnpackOptions`], [`UnpackStats`], whiteout modes;
//! - `fetch`: [`ImageFetcher`], [`Descriptor`], [`ImageManifest`], [`OciLayout`];
//! - `cache`: [`RootfsCache`], [`Rootfs`], [`CacheOptions`], [`CacheStats`], [`GcReport`],
//!   [`EnsureOptions`] with an [`EnsureProgress`] observer ([`LayerProgress`], [`LayerState`]);
//! - `mount`: [`MountBackend`], [`OverlaySpec`], [`OverlayOptions`], [`KernelOverlay`]
//!   ([`MountApi`]), [`CopyBackend`], [`OverlayMount`], [`detect()`] ([`Detection`],
//!   [`BackendKind`], [`DetectReason`]);
//! - `lazy`: seekable layer TOCs (zstd:chunked, eStargz) for lazy pulling: [`read_toc`]
//!   ([`LayerToc`], [`Toc`], [`TocEntry`], [`TocChunk`]) and verified [`read_chunk`];
//! - `workspace`: [`Workspace`], [`WorkspaceOptions`], [`Lowers`], [`ChangeSet`],
//!   [`Change`], [`ChangeKind`], [`ApplyReport`], [`DiffOptions`], [`DiffStats`].
#![deny(missing_docs)]
#![deny(unsafe_code)]

#[macro_use]
mod trace;
mod cache;
mod digest;
mod error;
mod fetch;
mod fsutil;
mod immutable;
mod lazy;
mod lockfile;
mod mount;
mod privilege;
mod reflink;
mod root;
mod sys;
mod unpack;
mod workspace;

pub use cache::{
    CacheOptions, CacheStats, EnsureOptions, EnsureProgress, GcReport, LayerProgress, LayerState, LazyStatus, Rootfs,
    RootfsCache,
};
pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::{Error, Result};
#[cfg(feature = "registry")]
pub use fetch::{Credential, Reference, Registry, RegistryOptions};
pub use fetch::{
    Descriptor, FetchObserver, ImageFetcher, ImageManifest, LAYER_MEDIA_TYPES, MAX_RANGE_BYTES, NoObserver,
};
pub use fetch::{OciLayout, Platform};
pub use immutable::cache_containing;
pub use lazy::{
    LayerToc, MAX_CHUNK_BYTES, MAX_TOC_BYTES, MAX_TOC_ENTRIES, TarSplit, Toc, TocChunk, TocEntry, TocEntryKind,
    TocFormat, read_chunk, read_toc,
};
pub use mount::{
    BackendKind, CopyBackend, DetectReason, Detection, KernelOverlay, MAX_LOWERS, MountApi, MountBackend, OverlayMount,
    OverlayOptions, OverlaySpec, detect, is_mount_point,
};
pub use privilege::in_user_namespace;
pub use root::Root;
pub use unpack::{Compression, DeviceNodes, UnpackOptions, UnpackStats, WhiteoutMode, unpack, unpack_with_progress};
pub use workspace::{
    ApplyReport, Change, ChangeKind, ChangeSet, DiffOptions, DiffStats, Lowers, UpperStorage, Workspace,
    WorkspaceOptions,
};

// The README's examples compile (`cargo test --doc`), so the API tour stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
