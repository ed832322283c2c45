//! The normalised TOC model, its construction from either format's JSON entries, and
//! chunk reads.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use serde::Deserialize;

use super::{estargz, zstd_chunked};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::fetch::Descriptor;

/// Largest TOC accepted, compressed or not (64 MiB): a TOC is held in memory whole.
pub const MAX_TOC_BYTES: u64 = 64 << 20;

/// Most entries (files and chunks) accepted in one TOC.
pub const MAX_TOC_ENTRIES: usize = 1 << 20;

/// Largest chunk [`read_chunk`] reads, compressed or not (256 MiB): a chunk is held in
/// memory whole. Both formats cut files into chunks of a few MiB at most.
pub const MAX_CHUNK_BYTES: u64 = 256 << 20;

/// Which seekable format a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TocFormat {
    /// zstd:chunked (containers/storage): a zstd frame per chunk, the TOC in a zstd
    /// skippable frame.
    ZstdChunked,
    /// eStargz (containerd/stargz-snapshotter): a gzip member per chunk, the TOC as the
    /// tar entry `stargz.index.json` in its own gzip member, then a 51-byte footer.
    Estargz,
}

impl TocFormat {
    /// The format's usual name: `zstd:chunked` or `eStargz`.
    pub fn name(self) -> &'static str {
        match self {
            TocFormat::ZstdChunked => "zstd:chunked",
            TocFormat::Estargz => "eStargz",
        }
    }
}

/// What [`read_toc`] found out about a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerToc {
    /// A seekable layer, and its verified TOC.
    Seekable(Toc),
    /// Not a seekable layer, and why (`plain gzip layer: not seekable`), for the caller to
    /// report when it falls back to pulling the layer whole.
    NotSeekable(String),
}

impl LayerToc {
    /// The TOC, if the layer is seekable.
    pub fn into_toc(self) -> Option<Toc> {
        match self {
            LayerToc::Seekable(toc) => Some(toc),
            LayerToc::NotSeekable(_) => None,
        }
    }

    /// Why the layer is not seekable, if it is not.
    pub fn reason(&self) -> Option<&str> {
        match self {
            LayerToc::Seekable(_) => None,
            LayerToc::NotSeekable(reason) => Some(reason),
        }
    }
}

/// A layer's verified table of contents, normalised across formats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toc {
    /// The layer's format.
    pub format: TocFormat,
    /// The layer blob's digest.
    pub layer: Digest,
    /// The layer blob's size in bytes.
    pub blob_size: u64,
    /// The digest the TOC was verified against (from the layer's annotations): of the
    /// compressed TOC for zstd:chunked, of the TOC JSON for eStargz.
    pub toc_digest: Digest,
    /// Where the TOC sits in the blob: offset and length of its compressed bytes.
    pub toc_range: (u64, u64),
    /// The entries, in TOC order (the order of the tar stream). Names are unique.
    pub entries: Vec<TocEntry>,
    /// eStargz's prefetch list: `None` when the layer has no landmark, an empty list
    /// for `.no.prefetch.landmark`, else the regular files (with data) that come before
    /// `.prefetch.landmark`, in order. The landmark files themselves stay in `entries`,
    /// as they are in the tar stream. Always `None` for zstd:chunked.
    pub prefetch: Option<Vec<String>>,
    /// zstd:chunked's tar-split data (what rebuilds the exact tar stream), when the layer
    /// has it. Its digest comes from the verified TOC (or the manifest's annotation).
    pub tar_split: Option<TarSplit>,
}

impl Toc {
    /// The entry named `path` (normalised like the entries: `usr/bin/env`, `""` for the
    /// root directory).
    pub fn entry(&self, path: &str) -> Option<&TocEntry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

/// Where zstd:chunked's tar-split data sits in the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarSplit {
    /// Offset of its compressed bytes in the blob.
    pub offset: u64,
    /// Length of its compressed bytes.
    pub len: u64,
    /// Its length once decompressed.
    pub uncompressed_len: u64,
    /// Digest of its compressed bytes, when known (`tarSplitDigest` in the TOC, or the
    /// older `tarsplit-checksum` annotation).
    pub digest: Option<Digest>,
}

/// One entry of a [`Toc`]: a file, directory, link or special file, with its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocEntry {
    /// The normalised path: relative, `/`-separated, no `.` or empty components, no
    /// trailing `/` (`""` is the layer's root directory).
    pub path: String,
    /// What it is, with its data (chunks, link target, device numbers).
    pub kind: TocEntryKind,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (0 when the TOC has none).
    pub mtime: i64,
    /// Nanoseconds of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes (decoded from the TOC's base64).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// The kind of a [`TocEntry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TocEntryKind {
    /// A directory.
    Directory,
    /// A regular file.
    File {
        /// Its size in bytes.
        size: u64,
        /// The digest of its whole content, when the TOC gives one (zstd:chunked always
        /// does for non-empty files, eStargz usually).
        digest: Option<Digest>,
        /// Its content, chunk by chunk, in file order: contiguous from byte 0 to `size`
        /// (empty for an empty file).
        chunks: Vec<TocChunk>,
    },
    /// A symbolic link, and its target as written (never resolved).
    Symlink {
        /// The link's target.
        target: String,
    },
    /// A hard link to an earlier entry (a normalised path, like [`TocEntry::path`]).
    Hardlink {
        /// The entry linked to.
        target: String,
    },
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// A piece of a regular file's content and where its compressed bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocChunk {
    /// Offset in the blob of the compressed stream holding the chunk (a zstd frame, a
    /// gzip member).
    pub compressed_offset: u64,
    /// Length of that compressed range (up to the next stream boundary).
    pub compressed_len: u64,
    /// Decompressed bytes to skip before the chunk's (eStargz with `innerOffset`, where
    /// several small chunks share one gzip member; else 0).
    pub inner_offset: u64,
    /// Offset of the chunk within the file.
    pub file_offset: u64,
    /// Length of the chunk (decompressed).
    pub len: u64,
    /// The digest of the chunk's decompressed bytes (the file's digest for a file in one
    /// chunk).
    pub digest: Digest,
    /// zstd:chunked `chunkType: "zeros"`: the chunk is all zero bytes (a hole).
    pub zeros: bool,
}

// ---------------------------------------------------------------------------------------
// Reading

/// Find, fetch and verify the table of contents of `layer`, a zstd:chunked or eStargz
/// layer, with `range_read(offset, len)` returning exactly `len` bytes of the blob from
/// `offset` (an HTTP `Range` request, a `pread`).
///
/// The format is chosen from the annotations: zstd:chunked's
/// `io.github.containers.zstd-chunked.manifest-checksum` (or the older
/// `io.containers.zstd-chunked.manifest-checksum`), with the TOC located by the
/// `…manifest-position` annotation or, without it, by the footer at the end of the blob
/// (both footer generations: 40 bytes ending `GnUlInUx`, 64 bytes ending `GNUlInUx`);
/// eStargz's `containerd.io/snapshot/stargz/toc.digest`, with the TOC located by the
/// 51-byte (or legacy 47-byte) gzip footer. Without either annotation the blob's tail is
/// read once to tell a seekable layer lacking its digest (an error) from any other layer
/// (`NotSeekable`).
///
/// # Errors
/// - [`Error::UnverifiedToc`] for a seekable layer without a TOC digest annotation;
/// - [`Error::BlobRangeMismatch`] when the TOC does not match its digest;
/// - [`Error::InvalidToc`] for a malformed footer, annotation or TOC, or both formats'
///   annotations at once; [`Error::PathEscape`] for a `..` or absolute name;
/// - [`Error::LimitExceeded`] for a TOC over [`MAX_TOC_BYTES`] or [`MAX_TOC_ENTRIES`];
/// - [`Error::Read`] when `range_read` returns the wrong number of bytes, and whatever
///   `range_read` itself returns.
///
/// # Examples
/// ```no_run
/// use std::os::unix::fs::FileExt;
/// use rootfs_cache::{LayerToc, OciLayout, ImageFetcher, read_chunk, read_toc, TocEntryKind};
/// # fn main() -> rootfs_cache::Result<()> {
/// let image = OciLayout::open("/srv/images/app")?.resolve("zstd-chunked")?;
/// let layer = &image.layers[0];
/// let blob = std::fs::File::open(format!("/srv/images/app/blobs/sha256/{}", layer.digest.hex())).expect("open");
/// let range_read = |offset: u64, len: u64| {
///     let mut buf = vec![0; len as usize];
///     blob.read_exact_at(&mut buf, offset).map_err(|source| rootfs_cache::Error::Read { what: "blob", source })?;
///     Ok(buf)
/// };
/// match read_toc(layer, &range_read)? {
///     LayerToc::Seekable(toc) => {
///         if let Some(TocEntryKind::File { chunks, .. }) = toc.entry("usr/bin/env").map(|e| &e.kind) {
///             let first = read_chunk(&toc, &chunks[0], &range_read)?; // verified bytes
///             # let _ = first;
///         }
///     }
///     LayerToc::NotSeekable(reason) => eprintln!("pulling whole: {reason}"),
/// }
/// # Ok(()) }
/// ```
pub fn read_toc(layer: &Descriptor, range_read: impl Fn(u64, u64) -> Result<Vec<u8>>) -> Result<LayerToc> {
    let blob = Blob { layer, read: &range_read };
    let zstd_digest = zstd_chunked::CHECKSUM_KEYS.iter().find_map(|k| layer.annotations.get(*k));
    let estargz_digest = layer.annotations.get(estargz::TOC_DIGEST_KEY);
    match (zstd_digest, estargz_digest) {
        (Some(_), Some(_)) => {
            Err(blob.invalid("both zstd:chunked and eStargz TOC digest annotations: which one is meant is unknown"))
        }
        (Some(d), None) => {
            zstd_chunked::read(&blob, blob.parse_digest(d, "zstd:chunked manifest-checksum")?).map(LayerToc::Seekable)
        }
        (None, Some(d)) => estargz::read(&blob, blob.parse_digest(d, "eStargz toc.digest")?).map(LayerToc::Seekable),
        (None, None) => probe(&blob),
    }
}

/// A layer without TOC digest annotations: say why it is not seekable, or refuse a
/// seekable one whose TOC cannot be verified.
fn probe(blob: &Blob<'_>) -> Result<LayerToc> {
    let media = blob.layer.media_type.as_str();
    let kind = if media.ends_with("gzip") {
        "gzip"
    } else if media.ends_with("zstd") {
        "zstd"
    } else if media.ends_with(".tar") {
        return Ok(LayerToc::NotSeekable("uncompressed tar layer: no table of contents".into()));
    } else {
        "compressed"
    };
    let size = blob.layer.size;
    let tail_len = size.min(zstd_chunked::MAX_FOOTER_FRAME);
    let tail = blob.read(size - tail_len, tail_len)?;
    let unverified = |format| Err(Error::UnverifiedToc { layer: blob.layer.digest, format });
    if zstd_chunked::parse_footer(&tail).is_some() {
        return unverified(TocFormat::ZstdChunked.name());
    }
    if estargz::parse_footer(&tail).is_some() {
        return unverified(TocFormat::Estargz.name());
    }
    Ok(LayerToc::NotSeekable(format!(
        "plain {kind} layer: not seekable (no zstd:chunked or eStargz table of contents)"
    )))
}

/// Fetch one chunk's compressed bytes with `range_read`, decompress them (a zstd frame or
/// a gzip member) and verify them against the chunk's digest. `chunk` must come from
/// `toc` (any chunk of its entries).
///
/// # Errors
/// - [`Error::BlobRangeMismatch`] when the bytes do not decompress, decompress to another
///   length, or hash to another digest: wrong bytes are never returned;
/// - [`Error::LimitExceeded`] for a chunk over [`MAX_CHUNK_BYTES`];
/// - [`Error::Read`] when `range_read` returns the wrong number of bytes, and whatever
///   `range_read` itself returns.
pub fn read_chunk(toc: &Toc, chunk: &TocChunk, range_read: impl Fn(u64, u64) -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    if chunk.compressed_len > MAX_CHUNK_BYTES {
        return Err(Error::LimitExceeded { what: "compressed chunk", limit: MAX_CHUNK_BYTES });
    }
    if chunk.len.saturating_add(chunk.inner_offset) > MAX_CHUNK_BYTES {
        return Err(Error::LimitExceeded { what: "chunk", limit: MAX_CHUNK_BYTES });
    }
    let layer = Descriptor::new(toc.layer, toc.blob_size, "");
    let blob = Blob { layer: &layer, read: &range_read };
    let raw = blob.read(chunk.compressed_offset, chunk.compressed_len)?;
    let what = || format!("chunk at file offset {} ({} bytes)", chunk.file_offset, chunk.len);
    let data = match toc.format {
        // A zstd:chunked chunk is one frame holding exactly the chunk.
        TocFormat::ZstdChunked => zstd_chunked::decode_frame(&raw, chunk.len, true),
        // An eStargz member may go on with the next tar headers: take what is needed.
        TocFormat::Estargz => estargz::decode_member(&raw, chunk.inner_offset, chunk.len),
    };
    let data = data.map_err(|problem| {
        blob.mismatch(what(), (chunk.compressed_offset, raw.len() as u64), chunk.digest, None, problem)
    })?;
    let found = Digest::of(&data);
    if found != chunk.digest {
        return Err(blob.mismatch(
            what(),
            (chunk.compressed_offset, raw.len() as u64),
            chunk.digest,
            Some(found),
            String::new(),
        ));
    }
    Ok(data)
}

/// The blob being read: its descriptor and the caller's range reader.
pub(super) struct Blob<'a> {
    pub(super) layer: &'a Descriptor,
    pub(super) read: &'a dyn Fn(u64, u64) -> Result<Vec<u8>>,
}

impl Blob<'_> {
    /// `len` bytes at `offset`, inside the blob, exactly.
    pub(super) fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layer.size => {}
            _ => {
                return Err(
                    self.invalid(format!("range {offset}+{len} lies outside the blob ({} bytes)", self.layer.size))
                );
            }
        }
        let bytes = (self.read)(offset, len)?;
        if bytes.len() as u64 != len {
            return Err(Error::Read {
                what: "layer blob range",
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("asked for {len} bytes at {offset}, got {}", bytes.len()),
                ),
            });
        }
        Ok(bytes)
    }

    pub(super) fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidToc { layer: self.layer.digest, reason: reason.into() }
    }

    /// The bytes at `offset`+`len`, `what`, are not those of `expected`: `found` is
    /// their digest, or `None` when `problem` says why there is none.
    pub(super) fn mismatch(
        &self,
        what: String,
        (offset, len): (u64, u64),
        expected: Digest,
        found: Option<Digest>,
        problem: String,
    ) -> Error {
        let problem = match found {
            Some(found) => format!("hashes to {found}"),
            None => problem,
        };
        let what = format!("{what} at blob bytes {offset}+{len}");
        Error::BlobRangeMismatch { layer: self.layer.digest, what, expected, problem }
    }

    pub(super) fn parse_digest(&self, s: &str, what: &str) -> Result<Digest> {
        s.parse().map_err(|e| self.invalid(format!("{what}: {e}")))
    }
}

/// Decompress at most `limit` bytes of `r`; `Err` with the decompressor's message.
pub(super) fn read_bounded(mut r: impl Read, limit: u64) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    r.by_ref().take(limit).read_to_end(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The TOC JSON, common to both formats (eStargz's TOC is zstd:chunked's ancestor, CRFS).

/// The TOC document. Unknown fields are ignored; duplicate fields are refused by serde.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RawToc {
    #[serde(default)]
    version: i64,
    #[serde(default)]
    entries: Vec<RawEntry>,
    /// zstd:chunked: digest of the compressed tar-split frame.
    #[serde(default)]
    pub(super) tar_split_digest: Option<String>,
}

/// One TOC entry as serialised by Go (`omitempty` everywhere: absent means zero).
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    link_name: String,
    mode: i64,
    size: i64,
    uid: i64,
    gid: i64,
    modtime: Option<String>,
    dev_major: i64,
    dev_minor: i64,
    xattrs: Option<BTreeMap<String, String>>,
    digest: String,
    offset: i64,
    end_offset: i64,
    inner_offset: i64,
    chunk_size: i64,
    chunk_offset: i64,
    chunk_digest: String,
    chunk_type: String,
}

pub(super) fn parse_json(blob: &Blob<'_>, json: &[u8]) -> Result<RawToc> {
    let raw: RawToc = serde_json::from_slice(json).map_err(|e| blob.invalid(format!("TOC JSON: {e}")))?;
    if raw.version != 1 {
        return Err(blob.invalid(format!("TOC version {}, expected 1", raw.version)));
    }
    if raw.entries.len() > MAX_TOC_ENTRIES {
        return Err(Error::LimitExceeded { what: "TOC entries", limit: MAX_TOC_ENTRIES as u64 });
    }
    Ok(raw)
}

const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// The normalised entries of `raw`, validated against the blob: file data must lie in
/// `[0, data_end)` (everything before the TOC), and for eStargz a chunk's compressed
/// range runs to the next gzip member boundary (the next data offset, or `data_end`).
pub(super) fn build_entries(
    blob: &Blob<'_>,
    format: TocFormat,
    raw: &RawToc,
    data_end: u64,
) -> Result<(Vec<TocEntry>, Option<Vec<String>>)> {
    let invalid = |reason: String| blob.invalid(reason);
    // eStargz member boundaries: every data offset, and the TOC.
    let mut boundaries: Vec<u64> = Vec::new();
    if format == TocFormat::Estargz {
        boundaries = raw
            .entries
            .iter()
            .filter(|e| (e.kind == "reg" && e.size > 0) || e.kind == "chunk")
            .filter_map(|e| u64::try_from(e.offset).ok())
            .collect();
        boundaries.push(data_end);
        boundaries.sort_unstable();
        boundaries.dedup();
    }
    let mut entries: Vec<TocEntry> = Vec::with_capacity(raw.entries.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(raw.entries.len());
    let mut ranges: Vec<(u64, u64, u64)> = Vec::new(); // (offset, end, inner) of every chunk
    let mut i = 0;
    while i < raw.entries.len() {
        let e = &raw.entries[i];
        i += 1;
        let path = normalise(&e.name)?;
        let num =
            |v: i64, what: &str| u32::try_from(v).map_err(|_| invalid(format!("{path:?}: {what} {v} out of range")));
        let kind = match e.kind.as_str() {
            "dir" => TocEntryKind::Directory,
            "symlink" => {
                if e.link_name.is_empty() || e.link_name.contains('\0') {
                    return Err(invalid(format!("{path:?}: symlink target empty or with a NUL byte")));
                }
                TocEntryKind::Symlink { target: e.link_name.clone() }
            }
            "hardlink" => {
                let target = normalise(&e.link_name)?;
                match index.get(&target).map(|&t| &entries[t].kind) {
                    Some(TocEntryKind::Directory) | None => {
                        return Err(invalid(format!(
                            "{path:?}: hardlink to {target:?}, not an earlier non-directory entry"
                        )));
                    }
                    Some(_) => TocEntryKind::Hardlink { target },
                }
            }
            "char" => {
                TocEntryKind::CharDevice { major: num(e.dev_major, "devMajor")?, minor: num(e.dev_minor, "devMinor")? }
            }
            "block" => {
                TocEntryKind::BlockDevice { major: num(e.dev_major, "devMajor")?, minor: num(e.dev_minor, "devMinor")? }
            }
            "fifo" => TocEntryKind::Fifo,
            "reg" => {
                // The file's chunk entries follow it.
                let first = i - 1;
                while i < raw.entries.len() && raw.entries[i].kind == "chunk" {
                    let c = &raw.entries[i];
                    // eStargz leaves the name of later chunks out; zstd:chunked repeats it.
                    if !c.name.is_empty() && normalise(&c.name)? != path {
                        return Err(invalid(format!("chunk of {:?} follows {path:?}", c.name)));
                    }
                    i += 1;
                }
                let parts = &raw.entries[first..i];
                file(blob, format, &path, parts, &boundaries, data_end, &mut ranges)?
            }
            "chunk" => return Err(invalid(format!("chunk entry {path:?} without a regular file before it"))),
            other => return Err(invalid(format!("{path:?}: unknown entry type {other:?}"))),
        };
        if e.mode < 0 {
            return Err(invalid(format!("{path:?}: negative mode")));
        }
        let (mtime, mtime_nsec) = match e.modtime.as_deref() {
            None | Some("") => (0, 0),
            Some(t) => parse_rfc3339(t).ok_or_else(|| invalid(format!("{path:?}: modtime {t:?} is not RFC 3339")))?,
        };
        let mut xattrs = BTreeMap::new();
        for (k, v) in e.xattrs.iter().flatten() {
            if k.is_empty() || k.contains('\0') {
                return Err(invalid(format!("{path:?}: xattr name {k:?}")));
            }
            let v = base64_decode(v).ok_or_else(|| invalid(format!("{path:?}: xattr {k:?} is not base64")))?;
            xattrs.insert(k.clone(), v);
        }
        if index.insert(path.clone(), entries.len()).is_some() {
            return Err(invalid(format!("{path:?} listed twice")));
        }
        entries.push(TocEntry {
            mode: (e.mode & 0o7777) as u32,
            uid: num(e.uid, "uid")?,
            gid: num(e.gid, "gid")?,
            mtime,
            mtime_nsec,
            xattrs,
            kind,
            path,
        });
    }
    // Chunks of different files never overlap (eStargz chunks may share a gzip member,
    // at increasing inner offsets).
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((a, a_end, a_inner), (b, b_end, b_inner)) = (w[0], w[1]);
        let shared = format == TocFormat::Estargz && a == b && a_end == b_end && a_inner < b_inner;
        if !shared && b < a_end {
            return Err(invalid(format!("chunks at blob bytes {a}..{a_end} and {b}..{b_end} overlap")));
        }
    }
    let prefetch = match format {
        TocFormat::ZstdChunked => None,
        TocFormat::Estargz if index.contains_key(NO_PREFETCH_LANDMARK) => Some(Vec::new()),
        TocFormat::Estargz => index.get(PREFETCH_LANDMARK).map(|&at| {
            entries[..at]
                .iter()
                .filter(|e| matches!(&e.kind, TocEntryKind::File { size, .. } if *size > 0))
                .map(|e| e.path.clone())
                .collect()
        }),
    };
    Ok((entries, prefetch))
}

/// A regular file from its `reg` entry and the `chunk` entries after it.
fn file(
    blob: &Blob<'_>,
    format: TocFormat,
    path: &str,
    parts: &[RawEntry],
    boundaries: &[u64],
    data_end: u64,
    ranges: &mut Vec<(u64, u64, u64)>,
) -> Result<TocEntryKind> {
    let invalid = |reason: String| blob.invalid(format!("{path:?}: {reason}"));
    let reg = &parts[0];
    let size = u64::try_from(reg.size).map_err(|_| invalid(format!("negative size {}", reg.size)))?;
    let digest = match reg.digest.as_str() {
        "" => None,
        d => Some(blob.parse_digest(d, &format!("{path:?} digest"))?),
    };
    if size == 0 {
        if parts.len() > 1 {
            return Err(invalid("empty file with chunks".into()));
        }
        return Ok(TocEntryKind::File { size, digest, chunks: Vec::new() });
    }
    let u = |v: i64, what: &str| u64::try_from(v).map_err(|_| invalid(format!("negative {what} {v}")));
    let mut chunks: Vec<TocChunk> = Vec::with_capacity(parts.len());
    let single = parts.len() == 1;
    for (k, p) in parts.iter().enumerate() {
        let offset = u(p.offset, "offset")?;
        let file_offset = u(p.chunk_offset, "chunkOffset")?;
        let expected_at = chunks.last().map_or(0, |c: &TocChunk| c.file_offset + c.len);
        if file_offset != expected_at {
            return Err(invalid(format!("chunk {k} at file offset {file_offset}, expected {expected_at}")));
        }
        let mut len = u(p.chunk_size, "chunkSize")?;
        if len == 0 {
            // zstd:chunked: a file in one chunk has no chunk fields. eStargz: zero means
            // "to the end of the file".
            if format == TocFormat::ZstdChunked && !single {
                return Err(invalid(format!("chunk {k} without a size")));
            }
            len = size - file_offset.min(size);
        }
        if len == 0 {
            return Err(invalid(format!("chunk {k} is empty")));
        }
        let chunk_digest = match p.chunk_digest.as_str() {
            "" if single => digest.ok_or_else(|| invalid("neither a chunk digest nor a file digest".into()))?,
            "" => return Err(invalid(format!("chunk {k} without a digest"))),
            d => blob.parse_digest(d, &format!("{path:?} chunk {k} digest"))?,
        };
        let (inner_offset, end) = match format {
            TocFormat::ZstdChunked => {
                // A chunk's frame ends where the next chunk's starts; the last at endOffset.
                let end = match parts.get(k + 1) {
                    Some(next) => u(next.offset, "offset")?,
                    None => u(reg.end_offset, "endOffset")?,
                };
                (0, end)
            }
            TocFormat::Estargz => {
                let end = boundaries.iter().find(|&&b| b > offset).copied().unwrap_or(offset);
                (u(p.inner_offset, "innerOffset")?, end)
            }
        };
        if offset == 0 || end <= offset || end > data_end {
            return Err(invalid(format!(
                "chunk {k} at blob bytes {offset}..{end}, outside the data before the TOC (0..{data_end})"
            )));
        }
        if let Some(prev) = chunks.last() {
            let prev_end = prev.compressed_offset + prev.compressed_len;
            let shares =
                format == TocFormat::Estargz && prev.compressed_offset == offset && prev.inner_offset < inner_offset;
            if !shares && offset < prev_end {
                return Err(invalid(format!("chunk {k} at blob byte {offset} is not after chunk {}", k - 1)));
            }
        }
        let zeros = match p.chunk_type.as_str() {
            "" => false,
            "zeros" => true,
            other => return Err(invalid(format!("unknown chunkType {other:?}"))),
        };
        chunks.push(TocChunk {
            compressed_offset: offset,
            compressed_len: end - offset,
            inner_offset,
            file_offset,
            len,
            digest: chunk_digest,
            zeros,
        });
        ranges.push((offset, end, inner_offset));
    }
    let total = chunks.last().map_or(0, |c| c.file_offset + c.len);
    if total != size {
        return Err(invalid(format!("chunks cover {total} bytes of {size}")));
    }
    Ok(TocEntryKind::File { size, digest, chunks })
}

/// A TOC name, normalised as the extractor does (`./usr//bin/` is `usr/bin`).
///
/// # Errors
/// [`Error::PathEscape`] for absolute names, `..` components and NUL bytes.
fn normalise(name: &str) -> Result<String> {
    match crate::root::split_path(name.as_bytes()) {
        Ok(comps) => Ok(String::from_utf8(crate::root::join(&comps)).expect("components of a str")),
        Err(reason) => Err(Error::PathEscape { entry: name.chars().take(256).collect(), reason }),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` (Go's RFC 3339 with nanoseconds) to seconds
/// and nanoseconds since the epoch.
fn parse_rfc3339(s: &str) -> Option<(i64, u32)> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, min, sec) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut at = 19;
    let mut nsec = 0u32;
    if b[at] == b'.' {
        let start = at + 1;
        at = start;
        while at < b.len() && b[at].is_ascii_digit() {
            at += 1;
        }
        let frac = &b[start..at];
        if frac.is_empty() || frac.len() > 9 {
            return None;
        }
        nsec = frac.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')) * 10u32.pow(9 - frac.len() as u32);
    }
    let offset = match &b[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = digits(at + 1..at + 3)?;
            let m = digits(at + 4..at + 6)?;
            let _ = (h1, h2, m1, m2);
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some((days * 86400 + hour * 3600 + min * 60 + sec - offset, nsec))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Standard base64 with padding (Go's `encoding/json` form of `[]byte`).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let b = s.as_bytes();
    if b.len() % 4 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks_exact(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_table() {
        for (s, want) in [
            ("1970-01-01T00:00:00Z", Some((0, 0))),
            ("2026-12-03T06:56:50Z", Some((1_796_281_010, 0))),
            ("2001-09-09T01:46:40.5Z", Some((1_000_000_000, 500_000_000))),
            ("2001-09-09T03:46:40.000000001+02:00", Some((1_000_000_000, 1))),
            ("0001-01-01T00:00:00Z", Some((-62_135_596_800, 0))),
            ("1969-12-31T23:59:59Z", Some((-1, 0))),
            ("2001-09-09 01:46:40Z", None),
            ("2001-13-09T01:46:40Z", None),
            ("2001-09-09T01:46:40", None),
            ("2001-09-09T01:46:40.Z", None),
            ("2001-09-09T01:46:40.1234567890Z", None),
        ] {
            assert_eq!(parse_rfc3339(s), want, "{s}");
        }
    }

    #[test]
    fn base64_table() {
        for (s, want) in [
            ("", Some(&b""[..])),
            ("YQ==", Some(&b"a"[..])),
            ("YWI=", Some(&b"ab"[..])),
            ("YWJj", Some(&b"abc"[..])),
            ("AAEC/w==", Some(&[0u8, 1, 2, 255][..])),
            ("YQ=", None),
            ("Y===", None),
            ("YQ==YWJj", None),
            ("YW!j", None),
        ] {
            assert_eq!(base64_decode(s).as_deref(), want, "{s}");
        }
    }

    /// zstd:chunked TOCs (the JSON only) against a blob whose data ends at byte 1000.
    #[test]
    fn zstd_chunked_entries_table() {
        let layer = Descriptor::new(Digest::of(b"blob"), 2000, "");
        let read = |_: u64, _: u64| -> Result<Vec<u8>> { unreachable!() };
        let blob = Blob { layer: &layer, read: &read };
        let d = |s: &str| Digest::of(s.as_bytes()).to_string();
        let build = |entries: serde_json::Value| {
            let json = serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).unwrap();
            let raw = parse_json(&blob, &json)?;
            build_entries(&blob, TocFormat::ZstdChunked, &raw, 1000).map(|(e, _)| e)
        };
        // One file in one frame, one in three chunks.
        let ok = serde_json::json!([
            {"type": "dir", "name": "./", "mode": 0o40755},
            {"type": "reg", "name": "./a", "size": 10, "digest": d("a"), "offset": 100, "endOffset": 150},
            {"type": "reg", "name": "b", "size": 30, "digest": d("b"), "offset": 200, "endOffset": 400,
             "chunkSize": 10, "chunkDigest": d("b0")},
            {"type": "chunk", "name": "b", "offset": 250, "chunkOffset": 10, "chunkSize": 15, "chunkDigest": d("b1")},
            {"type": "chunk", "name": "b", "offset": 300, "chunkOffset": 25, "chunkSize": 5, "chunkDigest": d("b2"),
             "chunkType": "zeros"},
        ]);
        let entries = build(ok.clone()).unwrap();
        assert_eq!(entries[0].path, "");
        assert_eq!(entries[0].mode, 0o755);
        let TocEntryKind::File { chunks, .. } = &entries[2].kind else { panic!() };
        let got: Vec<_> =
            chunks.iter().map(|c| (c.compressed_offset, c.compressed_len, c.file_offset, c.len, c.zeros)).collect();
        assert_eq!(got, [(200, 50, 0, 10, false), (250, 50, 10, 15, false), (300, 100, 25, 5, true)]);
        let TocEntryKind::File { chunks, .. } = &entries[1].kind else { panic!() };
        assert_eq!((chunks[0].compressed_len, chunks[0].digest.to_string()), (50, d("a")));

        let bad = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = ok.clone();
            edit(&mut v);
            build(v).unwrap_err()
        };
        let invalid = |e: Error| assert!(matches!(e, Error::InvalidToc { .. }), "{e}");
        invalid(bad(&|v| v[1]["endOffset"] = 1001.into())); // into the TOC
        invalid(bad(&|v| v[1]["endOffset"] = 210.into())); // overlaps b
        invalid(bad(&|v| v[1]["digest"] = "".into())); // nothing to verify with
        invalid(bad(&|v| v[3]["chunkDigest"] = "".into()));
        invalid(bad(&|v| v[3]["offset"] = 199.into())); // before the previous chunk
        invalid(bad(&|v| v[3]["chunkSize"] = 14.into())); // a gap in the file
        invalid(bad(&|v| v[4]["chunkType"] = "holes".into()));
        invalid(bad(&|v| v[4]["name"] = "a".into())); // a chunk of another file
        invalid(bad(&|v| v[1]["uid"] = (1i64 << 32).into()));
        invalid(bad(&|v| v[1]["modtime"] = "yesterday".into()));
        invalid(bad(&|v| v[1]["xattrs"] = serde_json::json!({"user.x": "not base64!"})));
        assert!(matches!(bad(&|v| v[1]["name"] = "a/../../b".into()), Error::PathEscape { .. }));
        let many: Vec<_> = (0..=MAX_TOC_ENTRIES).map(|_| serde_json::json!({})).collect();
        assert!(matches!(build(many.into()).unwrap_err(), Error::LimitExceeded { .. }));
    }

    #[test]
    fn names_are_normalised_and_hostile_ones_refused() {
        assert_eq!(normalise("./usr//bin/").unwrap(), "usr/bin");
        assert_eq!(normalise("./").unwrap(), "");
        assert_eq!(normalise("a/./b").unwrap(), "a/b");
        for bad in ["/etc/passwd", "../x", "a/../../b", "a\0b"] {
            assert!(matches!(normalise(bad), Err(Error::PathEscape { .. })), "{bad:?}");
        }
    }
}
