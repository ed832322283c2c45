//! Lazy pulling (issue 14), part 1: seekable layer tables of contents.
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

mod estargz;
mod toc;
mod zstd_chunked;

pub use toc::{
    LayerToc, MAX_CHUNK_BYTES, MAX_TOC_BYTES, MAX_TOC_ENTRIES, TarSplit, Toc, TocChunk, TocEntry, TocEntryKind,
    TocFormat, read_chunk, read_toc,
};
