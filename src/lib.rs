//! # rootfs-cache
//!
//! Restore a container or sandbox root filesystem in about a millisecond: each image
//! layer is extracted once per node into a digest-keyed cache, and every sandbox gets a
//! thin overlay mount over the shared, read-only layers.
//!
//! This release provides the foundation: [`Digest`] and hashing I/O, the crate-wide
//! [`Error`], and [`unpack()`]: streaming, safe extraction of one OCI layer (plain,
//! gzip or zstd) with digest verification and OCI → overlayfs whiteout conversion.
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
//! - `sys`: the only `unsafe` code (xattrs and other calls `nix` lacks);
//! - `root`: fd-based path resolution inside a root directory ([`Root`]);
//! - `unpack`: [`unpack()`], [`UnpackOptions`], [`UnpackStats`], whiteout modes.
#![deny(missing_docs)]
#![deny(unsafe_code)]

mod cache;
mod digest;
mod error;
mod fetch;
mod root;
mod sys;
mod unpack;

pub use cache::{CacheOptions, CacheStats, GcReport, Rootfs, RootfsCache};
pub use digest::{Digest, Hasher, HashingReader, HashingWriter};
pub use error::{Error, Result};
pub use fetch::{Descriptor, ImageFetcher, ImageManifest, LAYER_MEDIA_TYPES};
pub use fetch::{OciLayout, Platform};
pub use root::Root;
pub use unpack::{Compression, DeviceNodes, UnpackOptions, UnpackStats, WhiteoutMode, unpack, unpack_with_progress};
