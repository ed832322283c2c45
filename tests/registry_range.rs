//! `Registry::read_blob_range` against a real registry (`docker-registry` on loopback,
//! images pushed with `skopeo`), the harness's `FaultProxy` and a hand-written lying
//! mirror: exact bytes at the start, middle and end of a blob, a range past the end is a
//! typed error, a server ignoring `Range` still gives the right bytes, a mirror answering
//! another `Content-Range` is left for the next host, no credentials across a redirect,
//! and `read_toc` / `read_chunk` over range reads of a zstd:chunked layer pushed with
//! `skopeo copy --dest-compress-format zstd:chunked`.
//!
//! Skips without the tools (fails under `CI`).

#![cfg(feature = "registry")]

mod support;

#[path = "common/registry.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::TcpListener;

use harness::{Comp, Fault, FaultProxy, HostEntry, HostsDir, Layout, RegistryConfig, RegistryServer, options};
use rootfs_cache::{
    Credential, Descriptor, Digest, Error, ImageFetcher, LayerToc, Registry, TocEntryKind, read_chunk, read_toc,
};
use support::{Ent, Fmt};

/// A registry (`config`) holding `range/img:v1`, one gzip layer of ~600 kB of
/// incompressible data; returns the layout dir (for the blob bytes) too.
fn fixture(test: &str, config: RegistryConfig) -> Option<(RegistryServer, tempfile::TempDir, Vec<u8>, String)> {
    if !harness::require(test) {
        return None;
    }
    let reg = RegistryServer::start(config);
    let t = support::tempdir();
    let mut layout = Layout::create(&t.path().join("L"));
    let tar = support::tar_of(&[Ent::file("blob", support::pseudo_random(7, 600_000))], Fmt::Pax);
    let image = layout.add_image(Some("v1"), "amd64", &[(tar, Comp::Gzip)]);
    reg.push(&layout.dir, "v1", "range/img", "v1", reg.creds().as_deref(), &[]);
    let digest = image.layers[0].digest.clone();
    let blob = std::fs::read(layout.blob_path(&digest)).unwrap();
    Some((reg, t, blob, digest))
}

fn layer_of(r: &Registry, reference: &str, digest: &str) -> Descriptor {
    let image = r.resolve(reference).unwrap_or_else(|e| panic!("resolve {reference}: {e}"));
    let layer = image.layers.into_iter().next().unwrap();
    assert_eq!(layer.digest.to_string(), digest);
    layer
}

/// Ranges at the start, in the middle, at the end, the whole blob: exactly those bytes.
fn check_ranges(r: &Registry, layer: &Descriptor, blob: &[u8]) {
    let size = blob.len() as u64;
    assert_eq!(layer.size, size);
    for (offset, len) in [(0, 1), (0, 4096), (size / 2 - 17, 100_003), (size - 10, 10), (size - 1, 1), (0, size)] {
        let got = r.read_blob_range(layer, offset, len).unwrap_or_else(|e| panic!("{offset}+{len}: {e}"));
        assert!(got == blob[offset as usize..(offset + len) as usize], "{offset}+{len}: wrong bytes");
    }
}

#[test]
fn ranges_from_a_real_registry_are_exact_and_bounded() {
    let Some((reg, _t, blob, digest)) =
        fixture("ranges_from_a_real_registry_are_exact_and_bounded", RegistryConfig::plain())
    else {
        return;
    };
    let proxy = FaultProxy::start(reg.addr());
    let r = Registry::new(options()).unwrap();
    let layer = layer_of(&r, &format!("{}/range/img:v1", proxy.host()), &digest);
    proxy.reset_log();
    check_ranges(&r, &layer, &blob);
    // Each read is one GET with the Range asked for.
    let gets: Vec<_> = proxy.requests().into_iter().filter(|q| q.path().contains("/blobs/")).collect();
    assert_eq!(gets.len(), 6, "{gets:?}");
    assert_eq!(gets[0].header("range"), Some("bytes=0-0"));
    assert_eq!(
        gets[3].header("range").map(str::to_string),
        Some(format!("bytes={}-{}", blob.len() - 10, blob.len() - 1))
    );
    // Past the end: typed, and nothing is asked of the registry.
    proxy.reset_log();
    let size = blob.len() as u64;
    for (offset, len) in [(size - 9, 10), (size, 1), (u64::MAX, 1)] {
        match r.read_blob_range(&layer, offset, len) {
            Err(Error::InvalidRange { offset: o, len: l, size: s, layer: d }) => {
                assert_eq!((o, l, s, d), (offset, len, size, layer.digest));
            }
            other => panic!("{offset}+{len}: {other:?}"),
        }
    }
    assert!(matches!(r.read_blob_range(&layer, 0, 1 << 30), Err(Error::LimitExceeded { .. })));
    assert!(proxy.requests().is_empty());
    // A blob no resolved manifest listed.
    let unknown = Descriptor::new(Digest::of(b"nope"), 10, "");
    assert!(matches!(r.read_blob_range(&unknown, 0, 1), Err(Error::NotFound { .. })));
}

/// A TCP forwarder to `upstream` on loopback counting the connections it accepts.
fn counting_forwarder(upstream: std::net::SocketAddr) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::net::{Shutdown, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Ok(server) = TcpStream::connect(upstream) else { return };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &client, &mut &server);
                let _ = server.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut &s2, &mut &c2);
                let _ = c2.shutdown(Shutdown::Write);
            });
        }
    });
    (addr.to_string(), accepted)
}

/// Range reads go over the client's pooled connections (found profiling lazy pulls: a
/// body read up to its Content-Length but not to its end kept the connection out of the
/// pool, and every range read paid a new one: a TLS handshake against a real registry).
#[test]
fn range_reads_reuse_their_connections() {
    let Some((reg, _t, blob, digest)) = fixture("range_reads_reuse_their_connections", RegistryConfig::plain()) else {
        return;
    };
    let (host, accepted) = counting_forwarder(reg.addr());
    let r = Registry::new(options()).unwrap();
    let layer = layer_of(&r, &format!("{host}/range/img:v1"), &digest);
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    for i in 0..20u64 {
        let (offset, len) = (i * 10_000 + 7, 5_000);
        let got = r.read_blob_range(&layer, offset, len).unwrap();
        assert!(got == blob[offset as usize..(offset + len) as usize], "{offset}+{len}");
    }
    let new = accepted.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(new <= 1, "{new} new connections for 20 range reads one after the other");
}

/// Several ranges in one request (a lazy layer's small files): one multi-range GET to a
/// real registry, split exactly; a server that answers it otherwise (here: the whole
/// blob) still gives the right bytes and is asked one range at a time from then on.
#[test]
fn several_ranges_come_in_one_request_where_the_server_can() {
    let Some((reg, _t, blob, digest)) =
        fixture("several_ranges_come_in_one_request_where_the_server_can", RegistryConfig::plain())
    else {
        return;
    };
    let proxy = FaultProxy::start(reg.addr());
    let r = Registry::new(options()).unwrap();
    let layer = layer_of(&r, &format!("{}/range/img:v1", proxy.host()), &digest);
    let size = blob.len() as u64;
    let ranges = [(0, 1), (17, 4000), (300_000, 65_536), (size - 10, 10)];
    let want: Vec<Vec<u8>> = ranges.iter().map(|&(o, l)| blob[o as usize..(o + l) as usize].to_vec()).collect();
    let read = || r.read_blob_ranges_observed(&layer, &ranges, &rootfs_cache::NoObserver).unwrap();
    proxy.reset_log();
    assert!(read() == want, "multi-range bytes");
    let gets: Vec<_> = proxy.requests().into_iter().filter(|q| q.path().contains("/blobs/")).collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    let spec = format!("bytes=0-0,17-4016,300000-365535,{}-{}", size - 10, size - 1);
    assert_eq!(gets[0].header("range"), Some(spec.as_str()));
    // A server ignoring the header: right bytes, then one range per request.
    proxy.on_get("/blobs/", Fault::IgnoreRange, None);
    proxy.reset_log();
    assert!(read() == want, "bytes from a server ignoring Range");
    proxy.clear();
    proxy.reset_log();
    assert!(read() == want);
    let gets: Vec<_> = proxy.requests().into_iter().filter(|q| q.path().contains("/blobs/")).collect();
    assert_eq!(gets.len(), ranges.len(), "{gets:?}");
    assert!(gets.iter().all(|q| q.header("range").is_some_and(|h| !h.contains(','))), "{gets:?}");
}

#[test]
fn a_server_ignoring_range_and_a_cut_body_still_give_the_right_bytes() {
    let Some((reg, _t, blob, digest)) =
        fixture("a_server_ignoring_range_and_a_cut_body_still_give_the_right_bytes", RegistryConfig::plain())
    else {
        return;
    };
    let proxy = FaultProxy::start(reg.addr());
    let r = Registry::new(options()).unwrap();
    let layer = layer_of(&r, &format!("{}/range/img:v1", proxy.host()), &digest);
    proxy.on_get("/blobs/", Fault::IgnoreRange, None);
    check_ranges(&r, &layer, &blob);
    proxy.clear();
    // The first answer cut after 5000 bytes: resumed with Range from there.
    proxy.on_get("/blobs/", Fault::CutAfter(5000), Some(1));
    proxy.reset_log();
    let got = r.read_blob_range(&layer, 100_000, 300_000).unwrap();
    assert!(got == blob[100_000..400_000]);
    let ranges: Vec<_> = proxy.requests().iter().filter_map(|q| q.header("range").map(str::to_string)).collect();
    assert_eq!(ranges, ["bytes=100000-399999", "bytes=105000-399999"]);
}

/// A mirror that answers every blob GET with 206 and a `Content-Range` one byte off
/// (and 404 for anything else). Returns its `host:port`.
fn lying_mirror() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).is_ok_and(|n| n == 1) {
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let range = head.lines().find_map(|l| l.strip_prefix("range: bytes=")).and_then(|r| {
                let (a, b) = r.trim().split_once('-')?;
                Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
            });
            let answer = match range {
                Some((a, b)) if head.contains("/blobs/") => {
                    let n = b - a + 1;
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {}-{}/*\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{}",
                        a + 1,
                        b + 1,
                        "x".repeat(n as usize)
                    )
                }
                _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
            };
            let _ = s.write_all(answer.as_bytes());
        }
    });
    addr
}

#[test]
fn a_mirror_with_a_wrong_content_range_falls_over_to_the_next_host() {
    let Some((reg, t, blob, digest)) =
        fixture("a_mirror_with_a_wrong_content_range_falls_over_to_the_next_host", RegistryConfig::plain())
    else {
        return;
    };
    let liar = lying_mirror();
    let hosts = HostsDir::new(&t.path().join("hosts"));
    hosts.write(&reg.host(), &harness::hosts_toml(Some(&reg.base_url()), &[HostEntry::new(format!("http://{liar}"))]));
    let r = Registry::new(options().with_hosts_dir(&hosts.dir)).unwrap();
    let layer = layer_of(&r, &format!("{}/range/img:v1", reg.host()), &digest);
    #[derive(Default)]
    struct Fallbacks(std::sync::Mutex<Vec<(String, String)>>);
    impl rootfs_cache::FetchObserver for Fallbacks {
        fn fallback(&self, host: &str, reason: &str) {
            self.0.lock().unwrap().push((host.into(), reason.into()));
        }
    }
    let seen = Fallbacks::default();
    let got = r.read_blob_range_observed(&layer, 1000, 50_000, &seen).unwrap();
    assert!(got == blob[1000..51_000]);
    let fallbacks = seen.0.lock().unwrap().clone();
    assert_eq!(fallbacks.len(), 1, "{fallbacks:?}");
    assert_eq!(fallbacks[0].0, liar);
    assert!(fallbacks[0].1.contains(&liar) && fallbacks[0].1.contains("Content-Range"), "{fallbacks:?}");
}

#[test]
fn range_reads_send_no_credentials_across_a_redirect() {
    let Some((reg, _t, blob, digest)) = fixture(
        "range_reads_send_no_credentials_across_a_redirect",
        RegistryConfig::plain().htpasswd("alice", "s3cret"),
    ) else {
        return;
    };
    let front = FaultProxy::start(reg.addr());
    let store = FaultProxy::start_on([127, 0, 0, 2], reg.addr(), Some(harness::basic_auth("alice", "s3cret")));
    front.on_get("/blobs/", Fault::Redirect(store.url()), None);
    let r = Registry::new(options().with_credential(front.host(), Credential::basic("alice", "s3cret"))).unwrap();
    let layer = layer_of(&r, &format!("{}/range/img:v1", front.host()), &digest);
    check_ranges(&r, &layer, &blob);
    let got = store.requests();
    assert_eq!(got.len(), 6, "{got:?}");
    for q in &got {
        assert!(q.header("authorization").is_none(), "credentials sent to the redirect target: {q:?}");
        assert!(q.header("range").is_some(), "Range lost across the redirect: {q:?}");
    }
    assert!(front.requests().iter().any(|q| q.path().contains("/blobs/") && q.header("authorization").is_some()));
}

/// Files of several sizes (one cut into chunks by the rolling checksum), a link and a dir.
fn the_files() -> Vec<Ent> {
    vec![
        Ent::dir("etc").mode(0o755),
        Ent::file("etc/hello", "hello\n").mode(0o644),
        Ent::file("etc/empty", ""),
        Ent::symlink("etc/link", "hello"),
        Ent::dir("usr/bin").mode(0o755),
        Ent::file("usr/bin/big", support::pseudo_random(1, 700_000)).mode(0o755),
        Ent::file("usr/bin/medium", support::pseudo_random(2, 70_000)).mode(0o755),
        Ent::file("usr/zeros", vec![0u8; 200_000]),
    ]
}

#[test]
fn zstd_chunked_toc_and_files_through_registry_range_reads() {
    if !harness::require("zstd_chunked_toc_and_files_through_registry_range_reads") {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let t = support::tempdir();
    let mut layout = Layout::create(&t.path().join("L"));
    let tar = support::tar_of(&the_files(), Fmt::Pax);
    layout.add_image(Some("t"), "amd64", &[(tar.clone(), Comp::Gzip)]);
    reg.push(&layout.dir, "t", "lazy/zc", "v1", None, &["--dest-compress-format", "zstd:chunked"]);
    let proxy = FaultProxy::start(reg.addr());
    let r = Registry::new(options()).unwrap();
    let image = r.resolve(&format!("{}/lazy/zc:v1", proxy.host())).unwrap();
    let layer = &image.layers[0];
    assert!(layer.annotations.keys().any(|k| k.ends_with("zstd-chunked.manifest-checksum")), "{:?}", layer.annotations);
    proxy.reset_log();
    let read = |offset: u64, len: u64| r.read_blob_range(layer, offset, len);
    let toc = match read_toc(layer, read).unwrap() {
        LayerToc::Seekable(toc) => toc,
        LayerToc::NotSeekable(why) => panic!("not seekable: {why}"),
    };
    // The TOC came from range reads, not a whole-blob download.
    let gets: Vec<_> = proxy.requests().into_iter().filter(|q| q.path().contains("/blobs/")).collect();
    assert!(!gets.is_empty() && gets.iter().all(|q| q.header("range").is_some()), "{gets:?}");
    // Every file reassembles chunk by chunk, equal to the tar's.
    let mut want = std::collections::BTreeMap::new();
    let mut a = tar::Archive::new(&tar[..]);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().to_vec()).unwrap().trim_end_matches('/').to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        want.insert(path, (e.header().entry_type().as_byte(), data));
    }
    let mut files = 0;
    let mut most_chunks = 0;
    for entry in &toc.entries {
        let Some((kind, data)) = want.get(&entry.path) else { panic!("{:?} not in the tar", entry.path) };
        if let TocEntryKind::File { chunks, size, .. } = &entry.kind {
            assert_eq!(*kind, b'0', "{}", entry.path);
            assert_eq!(*size, data.len() as u64, "{}", entry.path);
            let mut got = Vec::new();
            for c in chunks {
                got.extend(read_chunk(&toc, c, read).unwrap());
            }
            assert!(got == *data, "{}: reassembled content differs", entry.path);
            files += 1;
            most_chunks = most_chunks.max(chunks.len());
        }
    }
    let regular = want.values().filter(|(k, _)| *k == b'0').count();
    assert_eq!(files, regular);
    assert!(most_chunks > 1, "the 700 kB file should be cut into chunks");
}
