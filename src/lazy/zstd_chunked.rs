//! zstd:chunked (containers/storage `pkg/chunked`): annotations, footer, TOC frame.
//!
//! The TOC is zstd-compressed JSON in a zstd skippable frame (magic `50 2a 4d 18`, a
//! little-endian u32 length, the payload); the tar-split data follows in another, and a
//! last skippable frame holds the footer, little-endian u64s ending in a magic:
//!
//! ```text
//! 40-byte footer (2021–2023, "GnUlInUx"):  offset, length, uncompressed length, type=1, magic
//! 64-byte footer (since 2023, "GNUlInUx"): offset, length, uncompressed length, type=1,
//!                                          tar-split offset, length, uncompressed length, magic
//! ```
//!
//! The `manifest-position` annotation (`offset:length:uncompressed:type`) says the same
//! as the footer's first four fields; `manifest-checksum` is the digest of the compressed
//! TOC bytes, the only thing that makes the TOC trustworthy.

use super::toc::{Blob, MAX_TOC_BYTES, RawToc, TarSplit, Toc, TocFormat, build_entries, parse_json};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// TOC digest annotations, current name first.
pub(super) const CHECKSUM_KEYS: [&str; 2] =
    ["io.github.containers.zstd-chunked.manifest-checksum", "io.containers.zstd-chunked.manifest-checksum"];
/// TOC position annotations, current name first.
const POSITION_KEYS: [&str; 2] =
    ["io.github.containers.zstd-chunked.manifest-position", "io.containers.zstd-chunked.manifest-position"];
const TAR_SPLIT_POSITION_KEYS: [&str; 2] =
    ["io.github.containers.zstd-chunked.tarsplit-position", "io.containers.zstd-chunked.tarsplit-position"];
/// Written by containers/storage between 2023 and 2024, then replaced by the TOC's
/// `tarSplitDigest`.
const TAR_SPLIT_CHECKSUM_KEYS: [&str; 2] =
    ["io.github.containers.zstd-chunked.tarsplit-checksum", "io.containers.zstd-chunked.tarsplit-checksum"];

const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
const MAGIC_V1: &[u8; 8] = b"GnUlInUx";
const MAGIC_V2: &[u8; 8] = b"GNUlInUx";
const MANIFEST_TYPE_CRFS: u64 = 1;
/// The largest footer frame: an 8-byte skippable frame header and a 64-byte footer.
pub(super) const MAX_FOOTER_FRAME: u64 = 8 + 64;

/// Where the TOC (or the tar-split) is: offset and length of its compressed bytes, and
/// its uncompressed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Position {
    offset: u64,
    len: u64,
    uncompressed_len: u64,
}

/// What a footer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Footer {
    toc: Position,
    manifest_type: u64,
    tar_split: Option<Position>,
}

/// The footer in `tail`, the last bytes of a blob (up to [`MAX_FOOTER_FRAME`]), if it
/// ends in one of the two generations' footer frames.
pub(super) fn parse_footer(tail: &[u8]) -> Option<Footer> {
    let magic = tail.get(tail.len().checked_sub(8)?..)?;
    let size = if magic == MAGIC_V2 {
        64
    } else if magic == MAGIC_V1 {
        40
    } else {
        return None;
    };
    let frame = tail.get(tail.len().checked_sub(8 + size)?..)?;
    if frame[..4] != SKIPPABLE_MAGIC || u32::from_le_bytes(frame[4..8].try_into().ok()?) as usize != size {
        return None;
    }
    let f = &frame[8..];
    let u = |i: usize| u64::from_le_bytes(f[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let toc = Position { offset: u(0), len: u(1), uncompressed_len: u(2) };
    let tar_split = (size == 64 && u(4) != 0).then(|| Position { offset: u(4), len: u(5), uncompressed_len: u(6) });
    Some(Footer { toc, manifest_type: u(3), tar_split })
}

/// `N:N:N[:N]` of decimal u64s.
fn parse_numbers<const K: usize>(s: &str) -> Option<[u64; K]> {
    let mut out = [0u64; K];
    let mut parts = s.split(':');
    for slot in &mut out {
        let p = parts.next()?;
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn annotation<'a>(blob: &'a Blob<'_>, keys: &[&str]) -> Option<&'a String> {
    keys.iter().find_map(|k| blob.layer.annotations.get(*k))
}

/// Read and verify the TOC of a zstd:chunked layer whose `manifest-checksum` is `checksum`.
pub(super) fn read(blob: &Blob<'_>, checksum: Digest) -> Result<Toc> {
    let (toc_pos, manifest_type, mut tar_split) = match annotation(blob, &POSITION_KEYS) {
        Some(s) => {
            let [offset, len, uncompressed_len, kind] = parse_numbers::<4>(s).ok_or_else(|| {
                blob.invalid(format!("manifest-position annotation {s:?} is not offset:length:length:type"))
            })?;
            let tar_split = match annotation(blob, &TAR_SPLIT_POSITION_KEYS) {
                Some(s) => {
                    let [offset, len, uncompressed_len] = parse_numbers::<3>(s).ok_or_else(|| {
                        blob.invalid(format!("tarsplit-position annotation {s:?} is not offset:length:length"))
                    })?;
                    (offset > 0).then_some(Position { offset, len, uncompressed_len })
                }
                None => None,
            };
            (Position { offset, len, uncompressed_len }, kind, tar_split)
        }
        None => {
            let size = blob.layer.size;
            let tail_len = size.min(MAX_FOOTER_FRAME);
            let tail = blob.read(size - tail_len, tail_len)?;
            let footer = parse_footer(&tail).ok_or_else(|| {
                blob.invalid("no manifest-position annotation and no zstd:chunked footer at the end of the blob")
            })?;
            (footer.toc, footer.manifest_type, footer.tar_split)
        }
    };
    if manifest_type != MANIFEST_TYPE_CRFS {
        return Err(blob.invalid(format!("manifest type {manifest_type}, expected {MANIFEST_TYPE_CRFS}")));
    }
    if toc_pos.len > MAX_TOC_BYTES {
        return Err(Error::LimitExceeded { what: "compressed zstd:chunked TOC", limit: MAX_TOC_BYTES });
    }
    if toc_pos.uncompressed_len > MAX_TOC_BYTES {
        return Err(Error::LimitExceeded { what: "zstd:chunked TOC", limit: MAX_TOC_BYTES });
    }
    // The frame header sits before the TOC bytes; all file data lies before that.
    let data_end = toc_pos
        .offset
        .checked_sub(8)
        .ok_or_else(|| blob.invalid(format!("TOC at blob byte {}: no room for its frame header", toc_pos.offset)))?;
    let compressed = blob.read(toc_pos.offset, toc_pos.len)?;
    let what = "zstd:chunked TOC".to_string();
    let found = Digest::of(&compressed);
    if found != checksum {
        return Err(blob.mismatch(what, (toc_pos.offset, toc_pos.len), checksum, Some(found), String::new()));
    }
    let json = decode_frame(&compressed, toc_pos.uncompressed_len, false)
        .map_err(|problem| blob.mismatch(what, (toc_pos.offset, toc_pos.len), checksum, None, problem))?;
    let raw: RawToc = parse_json(blob, &json)?;
    let (entries, prefetch) = build_entries(blob, TocFormat::ZstdChunked, &raw, data_end)?;

    let digest = match (&raw.tar_split_digest, annotation(blob, &TAR_SPLIT_CHECKSUM_KEYS)) {
        (Some(d), _) | (None, Some(d)) if !d.is_empty() => Some(blob.parse_digest(d, "tar-split digest")?),
        _ => None,
    };
    if let Some(p) = tar_split {
        match p.offset.checked_add(p.len) {
            Some(end) if p.offset >= toc_pos.offset + toc_pos.len && end <= blob.layer.size => {}
            _ => {
                return Err(blob.invalid(format!(
                    "tar-split at blob bytes {}+{}: not after the TOC, inside the blob",
                    p.offset, p.len
                )));
            }
        }
    }
    let tar_split = tar_split.take().map(|p| TarSplit {
        offset: p.offset,
        len: p.len,
        uncompressed_len: p.uncompressed_len,
        digest,
    });
    Ok(Toc {
        format: TocFormat::ZstdChunked,
        layer: blob.layer.digest,
        blob_size: blob.layer.size,
        toc_digest: checksum,
        toc_range: (toc_pos.offset, toc_pos.len),
        entries,
        prefetch,
        tar_split,
    })
}

/// Decompress one zstd frame of `len` bytes (`exact`: to exactly `len` bytes; else to at
/// most `len`, `0` meaning unknown and bounded by [`MAX_TOC_BYTES`]).
pub(super) fn decode_frame(raw: &[u8], len: u64, exact: bool) -> std::result::Result<Vec<u8>, String> {
    use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer, ResetDirective, get_error_name};
    thread_local! {
        /// One decompression context per thread, reused: a lazy layer's small files are
        /// thousands of frames, and making a context for each showed in profiles.
        static DCTX: std::cell::RefCell<Option<DCtx<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let limit = if len == 0 && !exact { MAX_TOC_BYTES } else { len };
    let zerr = |c| get_error_name(c).to_string();
    let out = DCTX.with(|cell| {
        let mut cell = cell.borrow_mut();
        let dctx = cell.get_or_insert_with(DCtx::create);
        // Whatever a failed frame left behind is dropped; parameters stay (defaults).
        dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
        let mut out: Vec<u8> = Vec::with_capacity((limit + 1).min(1 << 20) as usize);
        let mut input = InBuffer::around(raw);
        loop {
            if out.len() == out.capacity() {
                if out.len() as u64 > limit {
                    break; // said below
                }
                let more = (limit + 1 - out.len() as u64).min(out.capacity().max(64 << 10) as u64);
                out.reserve_exact(more as usize);
            }
            let pos = out.len();
            let hint = dctx.decompress_stream(&mut OutBuffer::around_pos(&mut out, pos), &mut input).map_err(zerr)?;
            if hint == 0 {
                break; // the frame is complete
            }
            if input.pos() == raw.len() && out.len() < out.capacity() {
                return Err("incomplete frame".to_string());
            }
        }
        Ok(out)
    })?;
    if out.len() as u64 > limit {
        return Err(format!("decompresses to more than {limit} bytes"));
    }
    if (exact || len != 0) && out.len() as u64 != len {
        return Err(format!("decompresses to {} bytes, not {len}", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut v = SKIPPABLE_MAGIC.to_vec();
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn both_footer_generations() {
        let mut v1 = Vec::new();
        for n in [100u64, 20, 30, 1] {
            v1.extend_from_slice(&n.to_le_bytes());
        }
        v1.extend_from_slice(MAGIC_V1);
        let mut tail = b"junk".to_vec();
        tail.extend(frame(&v1));
        let f = parse_footer(&tail).unwrap();
        assert_eq!(f.toc, Position { offset: 100, len: 20, uncompressed_len: 30 });
        assert_eq!((f.manifest_type, f.tar_split), (1, None));

        let mut v2 = Vec::new();
        for n in [100u64, 20, 30, 1, 128, 5, 6] {
            v2.extend_from_slice(&n.to_le_bytes());
        }
        v2.extend_from_slice(MAGIC_V2);
        let f = parse_footer(&frame(&v2)).unwrap();
        assert_eq!(f.tar_split, Some(Position { offset: 128, len: 5, uncompressed_len: 6 }));

        // Wrong magic, wrong frame length, a v1 magic at the end of a v2-sized footer, too short.
        let mut bad = frame(&v2);
        *bad.last_mut().unwrap() = b'y';
        assert_eq!(parse_footer(&bad), None);
        let mut bad = frame(&v1);
        bad[4] = 41;
        assert_eq!(parse_footer(&bad), None);
        let mut mixed = v2.clone();
        mixed[56..].copy_from_slice(MAGIC_V1);
        assert_eq!(parse_footer(&frame(&mixed)), None);
        assert_eq!(parse_footer(MAGIC_V2), None);
    }

    #[test]
    fn position_annotations() {
        assert_eq!(parse_numbers::<4>("300371:771:2193:1"), Some([300371, 771, 2193, 1]));
        assert_eq!(parse_numbers::<3>("1:2:3"), Some([1, 2, 3]));
        for bad in ["1:2:3", "1:2:3:4:5", "1:2:-3:4", "1::3:4", " 1:2:3:4", "1:2:3:99999999999999999999"] {
            assert_eq!(parse_numbers::<4>(bad), None, "{bad}");
        }
    }

    #[test]
    fn frames_decode_exactly_and_a_bad_one_leaves_the_context_usable() {
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let frame = zstd::encode_all(&data[..], 3).unwrap();
        let n = data.len() as u64;
        assert_eq!(decode_frame(&frame, n, true).unwrap(), data);
        // Truncated: an error, and the next frame on this thread decodes right.
        let err = decode_frame(&frame[..frame.len() / 2], n, true).unwrap_err();
        assert!(err.contains("incomplete"), "{err}");
        assert_eq!(decode_frame(&frame, n, true).unwrap(), data);
        // Larger than said: stopped at the bound.
        assert!(decode_frame(&frame, n - 1, true).unwrap_err().contains("more than"));
        assert!(decode_frame(&frame, n + 1, true).unwrap_err().contains("not"));
        // Unknown length (a TOC): up to the bound, exactly what the frame holds.
        assert_eq!(decode_frame(&frame, 0, false).unwrap(), data);
        // Garbage; then a frame followed by more bytes decodes the frame only.
        assert!(decode_frame(b"not zstd at all", 3, true).is_err());
        let mut two = frame.clone();
        two.extend_from_slice(&zstd::encode_all(&b"more"[..], 3).unwrap());
        assert_eq!(decode_frame(&two, n, true).unwrap(), data);
        // Empty frame.
        assert_eq!(decode_frame(&zstd::encode_all(&b""[..], 3).unwrap(), 0, true).unwrap(), b"");
    }
}
