//! eStargz (containerd/stargz-snapshotter `estargz/`): footer and TOC member.
//!
//! The blob ends with an empty gzip member whose extra field locates the TOC:
//!
//! ```text
//! 51 bytes: gzip header (FEXTRA), XLEN=26, 'S' 'G' LEN=22 "%016xSTARGZ", empty stored block, trailer
//! 47 bytes (legacy stargz): gzip header (FEXTRA), XLEN=22, "%016xSTARGZ", empty stored block, trailer
//! ```
//!
//! The hex number is the offset of the gzip member holding a one-entry tar stream,
//! `stargz.index.json`, the TOC JSON. The layer annotation
//! `containerd.io/snapshot/stargz/toc.digest` is the digest of that JSON.

use std::io::Read;

use super::toc::{Blob, MAX_TOC_BYTES, Toc, TocFormat, build_entries, parse_json, read_bounded};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// The TOC digest annotation.
pub(super) const TOC_DIGEST_KEY: &str = "containerd.io/snapshot/stargz/toc.digest";
const TOC_TAR_NAME: &str = "stargz.index.json";
const FOOTER_SIZE: usize = 51;
const LEGACY_FOOTER_SIZE: usize = 47;

/// The TOC offset and the footer's size, if `tail` (the blob's last bytes) ends in an
/// eStargz (or legacy stargz) footer.
pub(super) fn parse_footer(tail: &[u8]) -> Option<(u64, usize)> {
    for size in [FOOTER_SIZE, LEGACY_FOOTER_SIZE] {
        let Some(f) = tail.get(tail.len().saturating_sub(size)..).filter(|f| f.len() == size) else {
            continue;
        };
        // gzip magic, deflate, FEXTRA only.
        if f[..4] != [0x1f, 0x8b, 8, 4] {
            continue;
        }
        let xlen = u16::from_le_bytes([f[10], f[11]]) as usize;
        let subfield = match size {
            FOOTER_SIZE if xlen == 26 && &f[12..14] == b"SG" && u16::from_le_bytes([f[14], f[15]]) == 22 => &f[16..38],
            LEGACY_FOOTER_SIZE if xlen == 22 => &f[12..34],
            _ => continue,
        };
        if &subfield[16..] != b"STARGZ" {
            continue;
        }
        let hex = std::str::from_utf8(&subfield[..16]).ok()?;
        if let Ok(offset) = u64::from_str_radix(hex, 16) {
            return Some((offset, size));
        }
    }
    None
}

/// Read and verify the TOC of an eStargz layer whose `toc.digest` is `toc_digest`.
pub(super) fn read(blob: &Blob<'_>, toc_digest: Digest) -> Result<Toc> {
    let size = blob.layer.size;
    let tail_len = size.min(FOOTER_SIZE as u64);
    let tail = blob.read(size - tail_len, tail_len)?;
    let (toc_offset, footer_size) =
        parse_footer(&tail).ok_or_else(|| blob.invalid("no eStargz footer at the end of the blob"))?;
    let toc_end = size - footer_size as u64;
    if toc_offset == 0 || toc_offset >= toc_end {
        return Err(blob.invalid(format!("footer puts the TOC at blob byte {toc_offset}, outside 1..{toc_end}")));
    }
    let toc_len = toc_end - toc_offset;
    if toc_len > MAX_TOC_BYTES {
        return Err(Error::LimitExceeded { what: "compressed eStargz TOC", limit: MAX_TOC_BYTES });
    }
    let compressed = blob.read(toc_offset, toc_len)?;
    let what = "eStargz TOC".to_string();
    let json = toc_json(&compressed).map_err(|problem| match problem {
        Problem::Limit => Error::LimitExceeded { what: "eStargz TOC", limit: MAX_TOC_BYTES },
        Problem::Bad(problem) => blob.mismatch(what.clone(), (toc_offset, toc_len), toc_digest, None, problem),
    })?;
    let found = Digest::of(&json);
    if found != toc_digest {
        return Err(blob.mismatch(what, (toc_offset, toc_len), toc_digest, Some(found), String::new()));
    }
    let raw = parse_json(blob, &json)?;
    let (entries, prefetch) = build_entries(blob, TocFormat::Estargz, &raw, toc_offset)?;
    Ok(Toc {
        format: TocFormat::Estargz,
        layer: blob.layer.digest,
        blob_size: size,
        toc_digest,
        toc_range: (toc_offset, toc_len),
        entries,
        prefetch,
        tar_split: None,
    })
}

enum Problem {
    Limit,
    Bad(String),
}

/// The JSON of the `stargz.index.json` tar entry in the gzip member `member`.
fn toc_json(member: &[u8]) -> std::result::Result<Vec<u8>, Problem> {
    let mut gz = flate2::read::GzDecoder::new(member);
    let mut header = [0u8; 512];
    gz.read_exact(&mut header).map_err(|e| Problem::Bad(format!("TOC tar header: {e}")))?;
    let name_end = header[..100].iter().position(|&b| b == 0).unwrap_or(100);
    if &header[..name_end] != TOC_TAR_NAME.as_bytes() || !matches!(header[156], b'0' | 0) {
        return Err(Problem::Bad(format!("first tar entry is not the regular file {TOC_TAR_NAME}")));
    }
    let size_field = &header[124..136];
    let digits: Vec<u8> =
        size_field.iter().copied().skip_while(|&b| b == b' ').take_while(|&b| (b'0'..=b'7').contains(&b)).collect();
    let rest_ok = size_field.iter().skip_while(|&&b| b == b' ').skip(digits.len()).all(|&b| b == 0 || b == b' ');
    let size = std::str::from_utf8(&digits)
        .ok()
        .filter(|d| !d.is_empty() && rest_ok)
        .and_then(|d| u64::from_str_radix(d, 8).ok())
        .ok_or_else(|| Problem::Bad("TOC tar header: bad size field".into()))?;
    if size > MAX_TOC_BYTES {
        return Err(Problem::Limit);
    }
    let json = read_bounded(gz, size).map_err(Problem::Bad)?;
    if json.len() as u64 != size {
        return Err(Problem::Bad(format!("TOC tar entry truncated: {} of {size} bytes", json.len())));
    }
    Ok(json)
}

/// Skip `inner` decompressed bytes of the gzip member starting `raw`, then take `len`.
pub(super) fn decode_member(raw: &[u8], inner: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
    let mut gz = flate2::read::GzDecoder::new(raw);
    let skipped = std::io::copy(&mut gz.by_ref().take(inner), &mut std::io::sink()).map_err(|e| e.to_string())?;
    if skipped != inner {
        return Err(format!("member ends after {skipped} bytes, before inner offset {inner}"));
    }
    let out = read_bounded(gz, len)?;
    if out.len() as u64 != len {
        return Err(format!("member holds {} bytes of the chunk, not {len}", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A footer as stargz-snapshotter's `gzipFooterBytes` writes it.
    fn footer(offset: u64, legacy: bool) -> Vec<u8> {
        let sub = format!("{offset:016x}STARGZ");
        let extra: Vec<u8> = if legacy {
            sub.into_bytes()
        } else {
            let mut e = b"SG".to_vec();
            e.extend_from_slice(&22u16.to_le_bytes());
            e.extend_from_slice(sub.as_bytes());
            e
        };
        let mut v = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255];
        v.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        v.extend_from_slice(&extra);
        v.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
        v.extend_from_slice(&[0; 8]);
        v
    }

    #[test]
    fn footers() {
        let f = footer(0x1234, false);
        assert_eq!(f.len(), FOOTER_SIZE);
        // The footer is a valid (empty) gzip member, carrying the offset in its extra field.
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&f[..]).read_to_end(&mut out).unwrap();
        assert!(out.is_empty());
        let mut tail = vec![7u8; 30];
        tail.extend_from_slice(&f);
        assert_eq!(parse_footer(&tail), Some((0x1234, FOOTER_SIZE)));
        let legacy = footer(99, true);
        assert_eq!(legacy.len(), LEGACY_FOOTER_SIZE);
        assert_eq!(parse_footer(&legacy), Some((99, LEGACY_FOOTER_SIZE)));
        let mut bad = f.clone();
        bad[35] = b'X'; // inside "STARGZ"
        assert_eq!(parse_footer(&bad), None);
        let mut bad = f.clone();
        bad[16] = b'g'; // not hex
        assert_eq!(parse_footer(&bad), None);
        assert_eq!(parse_footer(&f[1..]), None);
    }
}
