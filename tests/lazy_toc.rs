//! Seekable layer TOCs (`read_toc`, `read_chunk`) against real and generated layers.
//!
//! - zstd:chunked layers made by `skopeo copy --dest-compress-format zstd:chunked` from a
//!   plain layer generated here: every regular file reassembled chunk by chunk equals the
//!   file in the plain tar; the TOC is verified against the `manifest-checksum`
//!   annotation; a flipped byte in the TOC or in a chunk is a typed error; the footer is
//!   used when the position annotations are stripped; both generations (the
//!   `io.containers.*` names with the 40-byte footer skopeo writes here, and the
//!   `io.github.containers.*` names with the 64-byte footer, made by rewriting that
//!   blob's annotations and footer).
//! - eStargz layers written by the builder below (a gzip member per chunk, the TOC member,
//!   the 51-byte footer, per stargz-snapshotter's `estargz/` docs): the same checks, plus
//!   shared members (`innerOffset`), prefetch landmarks, the legacy 47-byte footer and
//!   hostile TOCs whose digest is right (`..` names, chunks outside the blob or
//!   overlapping).
//! - A plain gzip (and zstd, and tar) layer is `NotSeekable` with a reason.
//!
//! The skopeo tests skip without `skopeo` (fail under `CI`).

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use rootfs_cache::{
    Descriptor, Digest, Error, ImageFetcher, LayerToc, OciLayout, Result, Toc, TocEntryKind, TocFormat, read_chunk,
    read_toc,
};
use serde_json::{Value, json};
use support::{Ent, Fmt};

// ---------------------------------------------------------------------------------------
// Helpers

/// A range reader over an in-memory blob.
fn reader(blob: &[u8]) -> impl Fn(u64, u64) -> Result<Vec<u8>> + '_ {
    move |offset, len| Ok(blob[offset as usize..(offset + len) as usize].to_vec())
}

fn norm(p: &str) -> String {
    p.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/")
}

/// What the plain tar says of one entry.
#[derive(Debug)]
struct Want {
    kind: u8,
    data: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    link: String,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn plain_entries(tar: &[u8]) -> BTreeMap<String, Want> {
    let mut a = tar::Archive::new(tar);
    let mut out = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = norm(std::str::from_utf8(&e.path_bytes()).unwrap());
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let h = e.header().clone();
        let link = e.link_name_bytes().map(|l| String::from_utf8(l.to_vec()).unwrap()).unwrap_or_default();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(
            path,
            Want {
                kind: h.entry_type().as_byte(),
                data,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap() as u32,
                gid: h.gid().unwrap() as u32,
                link,
                xattrs,
            },
        );
    }
    out
}

/// Reassemble every file of `toc` chunk by chunk and compare all entries with the tar.
/// Returns the largest chunk count of a file.
fn check_against_tar(toc: &Toc, blob: &[u8], tar: &[u8]) -> usize {
    let want = plain_entries(tar);
    let mut most_chunks = 0;
    let got: Vec<&str> = toc.entries.iter().map(|e| e.path.as_str()).collect();
    for path in want.keys() {
        assert!(got.contains(&path.as_str()), "{path:?} missing from the TOC: {got:?}");
    }
    for e in &toc.entries {
        let Some(w) = want.get(&e.path) else { panic!("{:?} in the TOC, not in the tar", e.path) };
        assert_eq!((e.mode, e.uid, e.gid), (w.mode, w.uid, w.gid), "{}", e.path);
        assert_eq!(e.xattrs, w.xattrs, "{}", e.path);
        match &e.kind {
            TocEntryKind::File { size, digest, chunks } => {
                assert_eq!(w.kind, b'0', "{}", e.path);
                assert_eq!(*size, w.data.len() as u64, "{}", e.path);
                if let Some(d) = digest {
                    assert_eq!(*d, Digest::of(&w.data), "{}", e.path);
                }
                let mut data = Vec::new();
                for c in chunks {
                    assert_eq!(c.file_offset, data.len() as u64);
                    data.extend(read_chunk(toc, c, reader(blob)).unwrap());
                }
                assert!(data == w.data, "{}: reassembled content differs", e.path);
                most_chunks = most_chunks.max(chunks.len());
            }
            TocEntryKind::Directory => assert_eq!(w.kind, b'5', "{}", e.path),
            TocEntryKind::Symlink { target } => assert_eq!((w.kind, target), (b'2', &w.link), "{}", e.path),
            TocEntryKind::Hardlink { target } => assert_eq!((w.kind, target), (b'1', &norm(&w.link)), "{}", e.path),
            TocEntryKind::Fifo => assert_eq!(w.kind, b'6', "{}", e.path),
            k => panic!("{}: unexpected {k:?}", e.path),
        }
    }
    most_chunks
}

fn seekable(desc: &Descriptor, blob: &[u8]) -> Toc {
    match read_toc(desc, reader(blob)).unwrap() {
        LayerToc::Seekable(toc) => toc,
        LayerToc::NotSeekable(r) => panic!("not seekable: {r}"),
    }
}

fn the_files() -> Vec<Ent> {
    vec![
        Ent::dir("etc").mode(0o755),
        Ent::file("etc/hello", "hello\n").mode(0o644).owner(1000, 1000),
        Ent::file("etc/empty", "").mode(0o600),
        Ent::file("etc/caps", "x").xattr("user.test", b"\x00\x01binary\xff"),
        Ent::symlink("etc/link", "hello"),
        Ent::hardlink("etc/hard", "etc/hello"),
        Ent::fifo("etc/pipe"),
        Ent::dir("usr/bin").mode(0o755),
        Ent::file("usr/bin/big", support::pseudo_random(1, 700_000)).mode(0o4755),
        Ent::file("usr/bin/medium", support::pseudo_random(2, 70_000)).mode(0o755),
        Ent::file("usr/zeros", vec![0u8; 200_000]),
        Ent::file("usr/a", "small a"),
        Ent::file("usr/b", "small b"),
    ]
}

fn mismatch(e: &Error) -> bool {
    matches!(e, Error::BlobRangeMismatch { .. })
}

// ---------------------------------------------------------------------------------------
// zstd:chunked, from skopeo

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// An OCI layout with one image `t` of one gzip layer.
fn write_layout(dir: &Path, layer: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = Digest::of(b);
        std::fs::write(blobs.join(d.hex()), b).unwrap();
        json!({"digest": d.to_string(), "size": b.len()})
    };
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", support::sha256_hex(&[]))]},
    }))
    .unwrap();
    let mut c = put(&config);
    c["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let mut l = put(layer);
    l["mediaType"] = GZIP.into();
    let manifest = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": [l]}),
    )
    .unwrap();
    let mut m = put(&manifest);
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    m["annotations"] = json!({"org.opencontainers.image.ref.name": "t"});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap())
        .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

struct Chunked {
    _dir: tempfile::TempDir,
    tar: Vec<u8>,
    gzip: Vec<u8>,
    desc: Descriptor,
    blob: Vec<u8>,
}

/// `the_files()` as a gzip layer, then copied to zstd:chunked by skopeo.
fn skopeo_zstd_chunked(test: &str) -> Option<Chunked> {
    if !support::require_tools(test, &["skopeo"]) {
        return None;
    }
    let dir = support::tempdir();
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    let gzip = support::gzip(&tar);
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    write_layout(&src, &gzip);
    support::zstd_chunked_copy(&src, &dst);
    // Through OciLayout: the annotations reach the descriptor.
    let layout = OciLayout::open(&dst).unwrap();
    let desc = layout.resolve("t").unwrap().layers.remove(0);
    let mut blob = Vec::new();
    layout.open_blob(&desc).unwrap().read_to_end(&mut blob).unwrap();
    assert!(desc.annotations.keys().any(|k| k.ends_with("zstd-chunked.manifest-checksum")), "{:?}", desc.annotations);
    Some(Chunked { _dir: dir, tar, gzip, desc, blob })
}

#[test]
fn zstd_chunked_files_reassemble_from_the_toc() {
    let Some(c) = skopeo_zstd_chunked("zstd_chunked_files_reassemble_from_the_toc") else { return };
    let toc = seekable(&c.desc, &c.blob);
    assert_eq!(toc.format, TocFormat::ZstdChunked);
    assert_eq!((toc.layer, toc.blob_size), (c.desc.digest, c.blob.len() as u64));
    let most = check_against_tar(&toc, &c.blob, &c.tar);
    assert!(most > 1, "the 700 kB file should be cut into chunks (rolling checksum)");
    assert_eq!(toc.prefetch, None);
    // The descriptor's digest is the blob's: the TOC was found in the real blob.
    assert_eq!(Digest::of(&c.blob), c.desc.digest);
}

#[test]
fn zstd_chunked_flipped_bytes_are_typed_errors() {
    let Some(c) = skopeo_zstd_chunked("zstd_chunked_flipped_bytes_are_typed_errors") else { return };
    let toc = seekable(&c.desc, &c.blob);
    // A byte of the TOC.
    let (at, len) = toc.toc_range;
    let mut bad = c.blob.clone();
    bad[(at + len / 2) as usize] ^= 0x40;
    let err = read_toc(&c.desc, reader(&bad)).unwrap_err();
    assert!(matches!(&err, Error::BlobRangeMismatch { problem, .. } if problem.starts_with("hashes to")), "{err}");
    // A byte in a chunk: that chunk fails, typed; the others still read.
    let TocEntryKind::File { chunks, .. } = &toc.entry("usr/bin/big").unwrap().kind else { panic!() };
    let victim = &chunks[1];
    for (i, pos) in
        [victim.compressed_offset + victim.compressed_len / 2, victim.compressed_offset + 5].into_iter().enumerate()
    {
        let mut bad = c.blob.clone();
        bad[pos as usize] ^= 0x01;
        let err = read_chunk(&toc, victim, reader(&bad)).unwrap_err();
        assert!(mismatch(&err), "flip {i}: {err}");
        read_chunk(&toc, &chunks[0], reader(&bad)).unwrap();
        read_chunk(&toc, &chunks[2], reader(&bad)).unwrap();
    }
    // A wrong checksum annotation.
    let mut desc = c.desc.clone();
    for v in desc.annotations.values_mut() {
        if v.starts_with("sha256:") {
            *v = Digest::of(b"other").to_string();
        }
    }
    assert!(mismatch(&read_toc(&desc, reader(&c.blob)).unwrap_err()));
    // A short read from the range reader is an error, not a shorter chunk.
    let short = |o: u64, l: u64| Ok(c.blob[o as usize..(o + l - 1) as usize].to_vec());
    assert!(matches!(read_chunk(&toc, victim, short).unwrap_err(), Error::Read { .. }));
}

#[test]
fn zstd_chunked_footer_when_annotations_are_stripped() {
    let Some(c) = skopeo_zstd_chunked("zstd_chunked_footer_when_annotations_are_stripped") else { return };
    let toc = seekable(&c.desc, &c.blob);
    // Position annotations stripped, checksum kept: the footer locates the TOC.
    let mut desc = c.desc.clone();
    desc.annotations.retain(|k, _| k.ends_with("manifest-checksum"));
    assert_eq!(desc.annotations.len(), 1);
    let reads = std::cell::Cell::new(0);
    let counting = |o, l| {
        reads.set(reads.get() + 1);
        reader(&c.blob)(o, l)
    };
    assert_eq!(read_toc(&desc, counting).unwrap(), LayerToc::Seekable(toc.clone()));
    assert_eq!(reads.get(), 2, "footer, then TOC");
    // No annotations at all: found by its footer, but never trusted.
    desc.annotations.clear();
    let err = read_toc(&desc, reader(&c.blob)).unwrap_err();
    assert!(matches!(err, Error::UnverifiedToc { format: "zstd:chunked", .. }), "{err}");
}

/// The blob and annotations of the current generation (`io.github.containers.*`, 64-byte
/// footer with a tar-split frame) from skopeo's older-generation output.
fn current_generation(c: &Chunked) -> (Descriptor, Vec<u8>) {
    let old_footer_frame = 8 + 40;
    assert_eq!(&c.blob[c.blob.len() - 8..], b"GnUlInUx", "skopeo here writes the 40-byte footer");
    let mut blob = c.blob[..c.blob.len() - old_footer_frame].to_vec();
    let f = &c.blob[c.blob.len() - 40..];
    let u = |i: usize| u64::from_le_bytes(f[i * 8..i * 8 + 8].try_into().unwrap());
    let (toc_at, toc_len, toc_ulen) = (u(0), u(1), u(2));
    // A tar-split frame (content irrelevant here), then the 64-byte footer.
    let tar_split = support::zstd(b"{\"type\":1}\n");
    let frame = |b: &mut Vec<u8>, payload: &[u8]| {
        b.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18]);
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
    };
    let ts_at = blob.len() as u64 + 8;
    frame(&mut blob, &tar_split);
    let mut footer = Vec::new();
    for n in [toc_at, toc_len, toc_ulen, 1, ts_at, tar_split.len() as u64, 11] {
        footer.extend_from_slice(&n.to_le_bytes());
    }
    footer.extend_from_slice(b"GNUlInUx");
    frame(&mut blob, &footer);
    let mut desc = Descriptor::new(Digest::of(&blob), blob.len() as u64, c.desc.media_type.clone());
    for (k, v) in &c.desc.annotations {
        desc.annotations.insert(k.replace("io.containers.", "io.github.containers."), v.clone());
    }
    desc.annotations.insert(
        "io.github.containers.zstd-chunked.tarsplit-position".into(),
        format!("{ts_at}:{}:11", tar_split.len()),
    );
    (desc, blob)
}

#[test]
fn zstd_chunked_current_generation_annotations_and_footer() {
    let Some(c) = skopeo_zstd_chunked("zstd_chunked_current_generation_annotations_and_footer") else { return };
    let (desc, blob) = current_generation(&c);
    assert!(desc.annotations.keys().all(|k| !k.starts_with("io.containers.")));
    let toc = seekable(&desc, &blob);
    check_against_tar(&toc, &blob, &c.tar);
    let ts = toc.tar_split.clone().expect("tar-split position");
    assert_eq!((ts.offset + ts.len + 72, ts.uncompressed_len), (blob.len() as u64, 11));
    // Footer only (64-byte generation).
    let mut stripped = desc.clone();
    stripped.annotations.retain(|k, _| k.ends_with("manifest-checksum"));
    let from_footer = seekable(&stripped, &blob);
    assert_eq!(from_footer.entries, toc.entries);
    assert_eq!(from_footer.tar_split.map(|t| (t.offset, t.len)), Some((ts.offset, ts.len)));
    // Both formats' annotations at once: refused.
    let mut both = desc.clone();
    both.annotations.insert("containerd.io/snapshot/stargz/toc.digest".into(), Digest::of(b"").to_string());
    assert!(matches!(read_toc(&both, reader(&blob)).unwrap_err(), Error::InvalidToc { .. }));
}

#[test]
fn plain_layers_are_not_seekable() {
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    for (media, blob, word) in [
        (GZIP, support::gzip(&tar), "gzip"),
        ("application/vnd.oci.image.layer.v1.tar+zstd", support::zstd(&tar), "zstd"),
        ("application/vnd.oci.image.layer.v1.tar", tar.clone(), "uncompressed"),
        (GZIP, support::gzip(b""), "gzip"),
    ] {
        let desc = Descriptor::new(Digest::of(&blob), blob.len() as u64, media);
        match read_toc(&desc, reader(&blob)).unwrap() {
            LayerToc::NotSeekable(reason) => assert!(reason.contains(word), "{reason}"),
            LayerToc::Seekable(_) => panic!("{media} seekable"),
        }
    }
    // The gzip layer skopeo started from, too.
    if let Some(c) = skopeo_zstd_chunked("plain_layers_are_not_seekable") {
        let desc = Descriptor::new(Digest::of(&c.gzip), c.gzip.len() as u64, GZIP);
        let r = read_toc(&desc, reader(&c.gzip)).unwrap();
        assert_eq!(r.reason(), Some("plain gzip layer: not seekable (no zstd:chunked or eStargz table of contents)"));
    }
}

// ---------------------------------------------------------------------------------------
// eStargz, built here

fn b64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            s.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    s
}

struct Estargz {
    /// Largest chunk of a file.
    chunk_size: usize,
    /// Files up to this size join the current gzip member (eStargz `MinChunkSize`:
    /// `innerOffset`) instead of starting one.
    share_below: usize,
    legacy_footer: bool,
}

/// An eStargz blob of the plain `tar` (kept byte for byte: a lossless conversion), its
/// TOC JSON passed through `edit` before the digest is taken, and the annotation value.
fn estargz(tar: &[u8], opts: &Estargz, edit: impl Fn(&mut Value)) -> (Vec<u8>, String) {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    let mut cur_at = 0usize; // compressed offset of the current member
    let mut cur_has_data = false;
    let mut entries = Vec::new();
    let mut done = 0usize; // tar bytes consumed
    let mut a = tar::Archive::new(tar);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let name = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        let data_at = e.raw_file_position() as usize;
        let size = h.size().unwrap() as usize;
        let ty = match h.entry_type() {
            tar::EntryType::Regular => "reg",
            tar::EntryType::Directory => "dir",
            tar::EntryType::Symlink => "symlink",
            tar::EntryType::Link => "hardlink",
            tar::EntryType::Fifo => "fifo",
            tar::EntryType::Char => "char",
            tar::EntryType::Block => "block",
            t => panic!("{t:?}"),
        };
        let mut xattrs = serde_json::Map::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for x in pax {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.into(), b64(x.value_bytes()).into());
                }
            }
        }
        let mut ent = json!({"name": name, "type": ty, "mode": h.mode().unwrap(), "uid": h.uid().unwrap(), "gid": h.gid().unwrap(),
            "modtime": "2020-09-13T12:26:40Z"});
        if !xattrs.is_empty() {
            ent["xattrs"] = xattrs.into();
        }
        if let Some(l) = e.link_name_bytes() {
            ent["linkName"] = String::from_utf8(l.to_vec()).unwrap().into();
        }
        let mut content = Vec::new();
        e.read_to_end(&mut content).unwrap();
        if ty != "reg" || size == 0 {
            if ty == "reg" {
                ent["digest"] = Digest::of(b"").to_string().into();
            }
            entries.push(ent);
            continue;
        }
        // Headers up to the data go into the current member.
        cur.extend_from_slice(&tar[done..data_at]);
        done = data_at;
        ent["size"] = size.into();
        ent["digest"] = Digest::of(&content).to_string().into();
        let mut written = 0;
        let mut first = true;
        while written < size {
            let n = opts.chunk_size.min(size - written);
            let mut c = if first { ent.take() } else { json!({"type": "chunk", "name": name}) };
            let share = size <= opts.share_below && cur_has_data;
            if share {
                c["offset"] = cur_at.into();
                c["innerOffset"] = cur.len().into();
            } else {
                out.extend(support::gzip(&cur));
                cur.clear();
                cur_at = out.len();
                c["offset"] = cur_at.into();
            }
            cur_has_data = true;
            c["chunkOffset"] = written.into();
            if n < size {
                c["chunkSize"] = n.into();
            }
            c["chunkDigest"] = Digest::of(&content[written..written + n]).to_string().into();
            cur.extend_from_slice(&tar[done..done + n]);
            done += n;
            written += n;
            first = false;
            entries.push(c);
        }
    }
    cur.extend_from_slice(&tar[done..]);
    out.extend(support::gzip(&cur));
    // The TOC member and the footer.
    let mut toc = json!({"version": 1, "entries": entries});
    edit(&mut toc);
    let json = serde_json::to_vec_pretty(&toc).unwrap();
    let toc_at = out.len();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "stargz.index.json", &json[..]).unwrap();
    out.extend(support::gzip(&b.into_inner().unwrap()));
    let sub = format!("{toc_at:016x}STARGZ");
    let extra: Vec<u8> =
        if opts.legacy_footer { sub.into_bytes() } else { [&b"SG"[..], &22u16.to_le_bytes(), sub.as_bytes()].concat() };
    let mut footer = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255];
    footer.extend_from_slice(&(extra.len() as u16).to_le_bytes());
    footer.extend_from_slice(&extra);
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend(footer);
    (out, Digest::of(&json).to_string())
}

fn estargz_desc(blob: &[u8], toc_digest: &str) -> Descriptor {
    let mut d = Descriptor::new(Digest::of(blob), blob.len() as u64, GZIP);
    d.annotations.insert("containerd.io/snapshot/stargz/toc.digest".into(), toc_digest.into());
    d
}

const OPTS: Estargz = Estargz { chunk_size: 64 << 10, share_below: 0, legacy_footer: false };

#[test]
fn estargz_files_reassemble_from_the_toc() {
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    for opts in [
        OPTS,
        Estargz { chunk_size: 1 << 20, share_below: 100, legacy_footer: false },
        Estargz { chunk_size: 100_000, share_below: 0, legacy_footer: true },
    ] {
        let (blob, d) = estargz(&tar, &opts, |_| {});
        // Still an ordinary gzip layer: the tar comes back whole.
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut plain).unwrap();
        assert!(plain.starts_with(&tar));
        let toc = seekable(&estargz_desc(&blob, &d), &blob);
        assert_eq!(toc.format, TocFormat::Estargz);
        let most = check_against_tar(&toc, &blob, &tar);
        assert_eq!(most, 700_000usize.div_ceil(opts.chunk_size.min(700_000)), "chunk size {}", opts.chunk_size);
        let inner: Vec<u64> = toc
            .entries
            .iter()
            .filter_map(|e| match &e.kind {
                TocEntryKind::File { chunks, .. } => Some(chunks.iter().map(|c| c.inner_offset)),
                _ => None,
            })
            .flatten()
            .filter(|&o| o > 0)
            .collect();
        assert_eq!(inner.is_empty(), opts.share_below == 0, "{inner:?}");
        assert_eq!(toc.prefetch, None);
    }
}

#[test]
fn estargz_prefetch_landmarks() {
    let mut files = the_files();
    files.insert(3, Ent::file(".prefetch.landmark", [0xfu8]));
    let tar = support::tar_of(&files, Fmt::Pax);
    let (blob, d) = estargz(&tar, &OPTS, |_| {});
    let toc = seekable(&estargz_desc(&blob, &d), &blob);
    assert_eq!(toc.prefetch, Some(vec!["etc/hello".to_string()]));
    let tar = support::tar_of(&[vec![Ent::file(".no.prefetch.landmark", [0xfu8])], the_files()].concat(), Fmt::Pax);
    let (blob, d) = estargz(&tar, &OPTS, |_| {});
    assert_eq!(seekable(&estargz_desc(&blob, &d), &blob).prefetch, Some(vec![]));
}

#[test]
fn estargz_wrong_bytes_are_typed_errors() {
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    let (blob, d) = estargz(&tar, &OPTS, |_| {});
    let desc = estargz_desc(&blob, &d);
    let toc = seekable(&desc, &blob);
    // A byte of the compressed TOC: a decompression failure or a different JSON.
    let (at, len) = toc.toc_range;
    // (Not the gzip trailer: the JSON is verified by its digest, what follows it is not read.)
    for pos in [at + len / 4, at + len / 2] {
        let mut bad = blob.clone();
        bad[pos as usize] ^= 0x10;
        let err = read_toc(&desc, reader(&bad)).unwrap_err();
        assert!(mismatch(&err), "{pos}: {err}");
    }
    // Another digest in the annotation.
    let other = estargz_desc(&blob, &Digest::of(b"{}").to_string());
    assert!(
        matches!(read_toc(&other, reader(&blob)).unwrap_err(), Error::BlobRangeMismatch { problem, .. } if problem.starts_with("hashes to"))
    );
    // A byte in a chunk.
    let TocEntryKind::File { chunks, .. } = &toc.entry("usr/bin/big").unwrap().kind else { panic!() };
    let mut bad = blob.clone();
    bad[(chunks[3].compressed_offset + chunks[3].compressed_len / 3) as usize] ^= 0x01;
    assert!(mismatch(&read_chunk(&toc, &chunks[3], reader(&bad)).unwrap_err()));
    read_chunk(&toc, &chunks[4], reader(&bad)).unwrap();
    // No annotation: the footer is found, the TOC is not trusted.
    let bare = Descriptor::new(desc.digest, desc.size, GZIP);
    let err = read_toc(&bare, reader(&blob)).unwrap_err();
    assert!(matches!(err, Error::UnverifiedToc { format: "eStargz", .. }), "{err}");
    // A sha512 (or otherwise unusable) annotation is refused, not ignored.
    let weird = estargz_desc(&blob, "sha512:abcd");
    assert!(matches!(read_toc(&weird, reader(&blob)).unwrap_err(), Error::InvalidToc { .. }));
}

/// TOCs whose digest is right but whose content is hostile or inconsistent.
#[test]
fn estargz_hostile_tocs_are_refused() {
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    let find = |t: &mut Value, name: &str| -> usize {
        t["entries"].as_array().unwrap().iter().position(|e| e["name"] == name).unwrap()
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    type Check = fn(&Error) -> bool;
    let cases: Vec<(&str, Edit, Check)> = vec![
        ("dotdot name", Box::new(|t| t["entries"][0]["name"] = "../../etc/passwd".into()), |e| {
            matches!(e, Error::PathEscape { .. })
        }),
        ("absolute name", Box::new(|t| t["entries"][1]["name"] = "/etc/shadow".into()), |e| {
            matches!(e, Error::PathEscape { .. })
        }),
        (
            "hardlink outside",
            Box::new(move |t| {
                let i = find(t, "etc/hard");
                t["entries"][i]["linkName"] = "../x".into();
            }),
            |e| matches!(e, Error::PathEscape { .. }),
        ),
        (
            "hardlink to nothing",
            Box::new(move |t| {
                let i = find(t, "etc/hard");
                t["entries"][i]["linkName"] = "etc/nothing".into();
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        (
            "chunk past the TOC",
            Box::new(move |t| {
                let i = find(t, "usr/a");
                t["entries"][i]["offset"] = 1_000_000_000.into();
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        (
            "overlapping chunks",
            Box::new(move |t| {
                let (a, b) = (find(t, "usr/a"), find(t, "usr/b"));
                t["entries"][b]["offset"] = t["entries"][a]["offset"].clone();
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        (
            "chunks out of order",
            Box::new(move |t| {
                let i = find(t, "usr/bin/big");
                t["entries"][i + 2]["chunkOffset"] = 1.into();
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        (
            "duplicate name",
            Box::new(move |t| {
                let i = find(t, "usr/a");
                t["entries"][i]["name"] = "./usr/b".into();
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        (
            "negative size",
            Box::new(move |t| {
                let i = find(t, "usr/a");
                t["entries"][i]["size"] = (-5).into();
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        ("unknown type", Box::new(|t| t["entries"][0]["type"] = "socket".into()), |e| {
            matches!(e, Error::InvalidToc { .. })
        }),
        (
            "orphan chunk",
            Box::new(|t| {
                let c = json!({"type": "chunk", "name": "x", "offset": 1, "chunkSize": 1});
                t["entries"].as_array_mut().unwrap().insert(0, c);
            }),
            |e| matches!(e, Error::InvalidToc { .. }),
        ),
        ("wrong version", Box::new(|t| t["version"] = 2.into()), |e| matches!(e, Error::InvalidToc { .. })),
    ];
    for (what, edit, ok) in cases {
        let (blob, d) = estargz(&tar, &OPTS, edit);
        let err = read_toc(&estargz_desc(&blob, &d), reader(&blob)).unwrap_err();
        assert!(ok(&err), "{what}: {err}");
    }
    // A chunk digest that lies: the TOC is accepted, the chunk is not returned.
    let (blob, d) = estargz(&tar, &OPTS, |t| {
        let i = t["entries"].as_array().unwrap().iter().position(|e| e["name"] == "usr/a").unwrap();
        t["entries"][i]["chunkDigest"] = Digest::of(b"lie").to_string().into();
    });
    let toc = seekable(&estargz_desc(&blob, &d), &blob);
    let TocEntryKind::File { chunks, .. } = &toc.entry("usr/a").unwrap().kind else { panic!() };
    assert!(matches!(
        read_chunk(&toc, &chunks[0], reader(&blob)).unwrap_err(),
        Error::BlobRangeMismatch { problem, .. } if problem.starts_with("hashes to")
    ));
}

#[test]
fn a_range_reader_error_is_returned_unchanged() {
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    let (blob, d) = estargz(&tar, &OPTS, |_| {});
    let failing = |_: u64, _: u64| -> Result<Vec<u8>> { Err(Error::NotFound { what: "blob".into() }) };
    assert!(matches!(read_toc(&estargz_desc(&blob, &d), failing).unwrap_err(), Error::NotFound { .. }));
}
