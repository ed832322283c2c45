//! Lazy pulling: seekable layer tables of contents, and what serves a layer from them.
//!
//! A seekable layer is an ordinary compressed tar whose compression restarts at file
//! boundaries and which carries a table of contents (TOC): where each file's bytes sit in
//! the compressed blob. With it, one file can be served from a few range reads of the
//! blob instead of the whole layer. Two formats exist in the wild, both still valid
//! `tar+zstd` / `tar+gzip` layers for any other reader:
//!
//! ```text
//! zstd:chunked (containers/storage pkg/chunked)      eStargz (containerd/stargz-snapshotter)
//! ┌─────────────────────────────┐                     ┌──────────────────────────────┐
//! │ zstd frame: tar headers     │                     │ gzip member: tar headers     │
//! │ zstd frame: file chunk      │ ← entry offset      │ gzip member: chunk (+ next   │ ← entry offset
//! │ zstd frame: file chunk …    │                     │   headers) …                 │
//! │ skippable frame: TOC (zstd  │ ← manifest-position │ gzip member: tar entry       │ ← footer offset
//! │   compressed JSON)          │   annotation        │   stargz.index.json (TOC)    │
//! │ skippable frame: tar-split  │                     │ 51-byte gzip footer:         │
//! │ skippable frame: footer     │                     │   extra "%016xSTARGZ"        │
//! │   (offsets, "GNUlInUx")     │                     └──────────────────────────────┘
//! └─────────────────────────────┘
//! ```
//!
//! [`read_toc`] finds and verifies a layer's TOC from its [`Descriptor`](crate::Descriptor)
//! (annotations) and a range-read function over the blob, and returns a normalised
//! [`Toc`]; [`read_chunk`] fetches, decompresses and verifies one [`TocChunk`].
//!
//! # Security
//! A TOC is used only when its digest comes from the manifest (which is itself verified):
//! zstd:chunked's `manifest-checksum` covers the compressed TOC, eStargz's `toc.digest`
//! the TOC JSON. A footer alone locates a TOC but never vouches for it
//! ([`Error::UnverifiedToc`](crate::Error::UnverifiedToc)). Within a verified TOC nothing
//! else is trusted: names are normalised and `..` or absolute names refused
//! ([`Error::PathEscape`](crate::Error::PathEscape)), every chunk must lie inside the blob,
//! before the TOC, in order and without overlapping another, sizes and entry counts are
//! bounded ([`MAX_TOC_BYTES`], [`MAX_TOC_ENTRIES`], [`MAX_CHUNK_BYTES`]), and every chunk
//! is verified against its digest before its bytes are returned.
//!
//! # Concurrency
//! Everything here is a pure function of its inputs: a [`Toc`] is plain data, and the
//! range-read function is called from the calling thread only.
//!
//! ## How lazy layers are served
//!
//! Checked on Linux 6.18:
//!
//! - **Skeleton + data-only lower works with the crate's existing mount options.** A
//!   skeleton layer whose regular files are sparse placeholders of the right size with
//!   `trusted.overlay.metacopy` (empty) and `trusted.overlay.redirect=/<name>` mounts as
//!   `lowerdir=skel::data` (the `::` makes `data` a data-only lower, 6.5+) *with*
//!   `metacopy=off,redirect_dir=nofollow,index=off` (rule 6): the kernel still follows the
//!   lower metacopy into the data-only layer, and a copy-up (chmod, append) copies the
//!   full data into the upper, which gets no `metacopy`/`redirect` xattr (only `origin`,
//!   as for any copy-up). So uppers stay plain and `changes`/`apply`/`export_diff` need
//!   no change.
//! - **Only `open` reaches the data layer.** `stat` (size from the placeholder) and
//!   `readdir` of the merged view never look the data path up ("lazy lowerdata
//!   lookup"); opening a file whose data path is missing fails with ENOENT and logs
//!   `lazy lowerdata lookup failed`. So a FUSE server behind the data-only lower sees
//!   `lookup` + `open` + `read` of data files only, never the tree.
//! - **Rootless:** the same with `user.overlay.metacopy`/`user.overlay.redirect` and
//!   `userxattr`, mounted in `unshare -Urm` as an unprivileged user.
//! - **FUSE passthrough** (6.9+): `fuser` exposes `ReplyOpen::open_backing` +
//!   `opened_passthrough`, so an opened, fetched file is read by the kernel from its
//!   backing file at native speed; only not-yet-fetched opens wait on the server.
//! - **But only from the bottom regular lower.** With `metacopy=off`, 6.18 refuses
//!   (`EPERM`, "refusing to follow metacopy origin") a metacopy file found in a lower
//!   that has another regular lower below it. So [`RootfsCache::ensure_lazy`](crate::RootfsCache::ensure_lazy)
//!   merges the lazy layers of an image into one skeleton, which is the bottom lower
//!   (see `cache/lazy.rs`), and serves lazily only the image's bottom run of seekable
//!   layers.
//!
//! The pieces: [`read_toc`] (`toc.rs`), the layer's tar rebuilt from its TOC for the
//! hardened extractor (`synth.rs`: placeholders as sparse entries, or the data from the
//! store), the per-layer data store fetching whole files by coalesced, verified range
//! reads (`layer.rs`), the FUSE server (`fuse.rs`), and the cache's side (`ensure_lazy`,
//! merged skeletons, background completion into ordinary layers: `cache/lazy.rs`).

mod estargz;
#[cfg(feature = "lazy")]
pub(crate) mod fuse;
pub(crate) mod layer;
pub(crate) mod synth;
mod toc;
mod zstd_chunked;

pub use toc::{
    LayerToc, MAX_CHUNK_BYTES, MAX_TOC_BYTES, MAX_TOC_ENTRIES, TarSplit, Toc, TocChunk, TocEntry, TocEntryKind,
    TocFormat, read_chunk, read_toc,
};
