//! The `Registry` fetcher against a real registry (Debian's `docker-registry`,
//! distribution 2.8) filled by `skopeo`, with htpasswd, token auth, TLS, containerd
//! hosts.toml mirrors and a fault-injecting proxy; pulled trees compared with
//! `umoci unpack` of the same image.
//!
//! Needs root (umoci unpack, overlay mounts) and the tools in [`harness::TOOLS`]; without
//! them each test skips with a message, or fails when `CI` is set.

mod support;

#[path = "common/registry.rs"]
mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Comp, Layout, RegistryConfig, RegistryServer};

/// A layout with a 3-layer image `mixed` (gzip, zstd, gzip), a multi-platform index
/// `multi` (amd64 + arm64, each also tagged `multi-<arch>`).
fn test_layout(dir: &std::path::Path, seed: u64) -> (Layout, harness::ImageInfo, harness::ImageInfo) {
    let mut l = Layout::create(dir);
    let tars = harness::image_layers(seed, 300_000);
    let mixed = l.add_image(
        Some("mixed"),
        "amd64",
        &[(tars[0].clone(), Comp::Gzip), (tars[1].clone(), Comp::Zstd), (tars[2].clone(), Comp::Gzip)],
    );
    let arm_tars = harness::image_layers(seed + 1, 10_000);
    let arm = l.add_image(Some("multi-arm64"), "arm64", &[(arm_tars[0].clone(), Comp::Gzip)]);
    l.tag(&mixed.manifest, "multi-amd64");
    l.add_index("multi", &[&mixed, &arm]);
    l.add_reference_twin("mixed-ref", "amd64", &tars);
    (l, mixed, arm)
}

// ---------------------------------------------------------------------------------------
// The harness itself, checked with skopeo and plain HTTP (not with our fetcher)

#[test]
fn harness_plain_registry_serves_pushed_images() {
    if !harness::require("harness_plain_registry_serves_pushed_images") {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let t = support::tempdir();
    let (l, mixed, arm) = test_layout(&t.path().join("L"), 1);
    reg.push(&l.dir, "mixed", "test/mixed", "v1", None, &[]);
    reg.push(&l.dir, "multi", "test/multi", "v1", None, &[]);
    let raw = reg.inspect_raw("test/mixed", "v1", None);
    assert_eq!(support::sha256_digest(raw.as_bytes()), mixed.manifest.digest, "{raw}");
    assert!(raw.contains("tar+zstd"), "{raw}");
    let raw = reg.inspect_raw("test/multi", "v1", None);
    assert!(raw.contains(&arm.manifest.digest) && raw.contains(&mixed.manifest.digest), "{raw}");
    // Blobs come back byte for byte.
    for b in &mixed.layers {
        let r = harness::http_get(reg.addr(), &format!("/v2/test/mixed/blobs/{}", b.digest), &[]).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(support::sha256_digest(&r.body), b.digest);
    }
    let r = harness::http_get(reg.addr(), &format!("/v2/test/multi/blobs/{}", arm.layers[0].digest), &[]).unwrap();
    assert_eq!(r.status, 200);
    // umoci reads the generated layout (zstd layer included) and applies the whiteouts.
    let root = l.umoci_unpack("mixed-ref", &t.path().join("ref"));
    assert_eq!(std::fs::read(root.join("usr/lib/fresh")).unwrap(), b"fresh 1");
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"host-1-v2\n");
    assert!(std::fs::symlink_metadata(root.join("home")).is_err());
    assert!(std::fs::symlink_metadata(root.join("opt/old/a")).is_err());
    assert!(root.join("replaceme/inner").exists());
}

#[test]
fn harness_tls_htpasswd_registry() {
    if !harness::require("harness_tls_htpasswd_registry") || !support::require_tools("harness_tls", &["curl"]) {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain().htpasswd("alice", "s3cret").tls());
    let t = support::tempdir();
    let (l, mixed, _) = test_layout(&t.path().join("L"), 2);
    reg.push(&l.dir, "mixed", "auth/mixed", "v1", reg.creds().as_deref(), &[]);
    let raw = reg.inspect_raw("auth/mixed", "v1", reg.creds().as_deref());
    assert_eq!(support::sha256_digest(raw.as_bytes()), mixed.manifest.digest);
    let curl = |extra: &[&str]| -> String {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(reg.ca_path().unwrap())
            // Without the OCI type in Accept, distribution 2.8 answers 404 for an OCI
            // manifest (it has no schema1 form to offer).
            .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            .args(extra)
            .arg(format!("{}/v2/auth/mixed/manifests/v1", reg.base_url()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&[]), "401");
    assert_eq!(curl(&["-u", "alice:s3cret"]), "200");
    assert_eq!(curl(&["-u", "alice:wrong"]), "401");
    // The name in the certificate: localhost works too.
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "alice:s3cret", "--cacert"])
        .arg(reg.ca_path().unwrap())
        .arg(format!("https://localhost:{}/v2/", reg.port))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
}

#[test]
fn harness_token_auth_registry() {
    if !harness::require("harness_token_auth_registry") {
        return;
    }
    let tokens = harness::TokenServer::start(harness::TokenPolicy {
        creds: Some(("bob".into(), "hunter2".into())),
        ..Default::default()
    });
    let reg = RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config()));
    let t = support::tempdir();
    let (l, mixed, _) = test_layout(&t.path().join("L"), 3);
    reg.push(&l.dir, "mixed", "tok/mixed", "v1", Some("bob:hunter2"), &[]);
    let raw = reg.inspect_raw("tok/mixed", "v1", Some("bob:hunter2"));
    assert_eq!(support::sha256_digest(raw.as_bytes()), mixed.manifest.digest);
    assert!(tokens.request_count() > 0);
    // Anonymous: a Bearer challenge naming our endpoint, which refuses to issue.
    let r = harness::http_get(reg.addr(), "/v2/tok/mixed/manifests/v1", &[]).unwrap();
    assert_eq!(r.status, 401);
    let challenge = r.header("www-authenticate").unwrap();
    assert!(challenge.starts_with("Bearer ") && challenge.contains(&tokens.addr.to_string()), "{challenge}");
    let r = harness::http_get(
        tokens.addr,
        "/token?service=rootfs-cache-test-registry&scope=repository:tok/mixed:pull",
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 401);
    // With credentials: a token the registry takes.
    let auth = harness::basic_auth("bob", "hunter2");
    let r = harness::http_get(
        tokens.addr,
        "/token?service=rootfs-cache-test-registry&scope=repository%3Atok%2Fmixed%3Apull",
        &[("Authorization", &auth)],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let body = String::from_utf8(r.body).unwrap();
    let token = body.split('"').nth(3).unwrap();
    let bearer = format!("Bearer {token}");
    let r = harness::http_get(
        reg.addr(),
        "/v2/tok/mixed/manifests/v1",
        &[("Authorization", &bearer), ("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", reg.log());
    assert_eq!(support::sha256_digest(&r.body), mixed.manifest.digest);
    // A token for another repository does not open this one.
    let r = harness::http_get(
        tokens.addr,
        "/token?service=rootfs-cache-test-registry&scope=repository:other:pull",
        &[("Authorization", &auth)],
    )
    .unwrap();
    let body = String::from_utf8(r.body).unwrap();
    let bearer = format!("Bearer {}", body.split('"').nth(3).unwrap());
    let r = harness::http_get(reg.addr(), "/v2/tok/mixed/manifests/v1", &[("Authorization", &bearer)]).unwrap();
    assert_eq!(r.status, 401);
}

#[test]
fn harness_fault_proxy_injects_faults() {
    if !harness::require("harness_fault_proxy_injects_faults") {
        return;
    }
    use harness::Fault;
    let reg = RegistryServer::start(RegistryConfig::plain());
    let t = support::tempdir();
    let (l, mixed, _) = test_layout(&t.path().join("L"), 4);
    reg.push(&l.dir, "mixed", "p/mixed", "v1", None, &[]);
    let proxy = harness::FaultProxy::start(reg.addr());
    let big = &mixed.layers[0];
    assert!(big.size > 200_000, "{}", big.size);
    let path = format!("/v2/p/mixed/blobs/{}", big.digest);
    let get = |headers: &[(&str, &str)]| harness::http_get(proxy.addr, &path, headers).unwrap();
    // Passes through.
    let r = get(&[]);
    assert_eq!((r.status, support::sha256_digest(&r.body)), (200, big.digest.clone()));
    // Cut after 1000 body bytes, once.
    proxy.on_get(&big.digest, Fault::CutAfter(1000), Some(1));
    assert_eq!(get(&[]).body.len(), 1000);
    assert_eq!(get(&[]).body.len() as u64, big.size);
    // 503 twice, then served.
    proxy.on_get(&big.digest, Fault::Status(503, vec![]), Some(2));
    assert_eq!(get(&[]).status, 503);
    assert_eq!(get(&[]).status, 503);
    assert_eq!(get(&[]).status, 200);
    // 429 with Retry-After.
    proxy.on_get(&big.digest, Fault::Status(429, vec![("Retry-After".into(), "1".into())]), Some(1));
    let r = get(&[]);
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    // Range honoured by the registry, ignored through the fault.
    let r = get(&[("Range", "bytes=100-")]);
    assert_eq!((r.status, r.body.len() as u64), (206, big.size - 100));
    proxy.on_get(&big.digest, Fault::IgnoreRange, Some(1));
    let r = get(&[("Range", "bytes=100-")]);
    assert_eq!((r.status, r.body.len() as u64), (200, big.size));
    // A lying mirror.
    proxy.on_get(&big.digest, Fault::Corrupt(5000), Some(1));
    let r = get(&[]);
    assert_eq!(r.body.len() as u64, big.size);
    assert_ne!(support::sha256_digest(&r.body), big.digest);
    // A stall.
    proxy.on_get(&big.digest, Fault::Stall { after: 10, pause: Duration::from_millis(300) }, Some(1));
    let start = std::time::Instant::now();
    assert_eq!(get(&[]).body.len() as u64, big.size);
    assert!(start.elapsed() >= Duration::from_millis(300));
    // A redirect to a recording "object store" on another address.
    let store = harness::FaultProxy::start_on([127, 0, 0, 2], reg.addr(), None);
    proxy.on_get(&big.digest, Fault::Redirect(store.url()), Some(1));
    let r = get(&[("Authorization", "Basic c2VjcmV0")]);
    assert_eq!(r.status, 307);
    assert_eq!(r.header("location").unwrap(), format!("{}{path}", store.url()));
    // Hangup and refusing.
    proxy.on_get(&big.digest, Fault::Hangup, Some(1));
    assert!(harness::http_get(proxy.addr, &path, &[]).is_err());
    proxy.set_refusing(true);
    assert!(harness::http_get(proxy.addr, &path, &[]).is_err());
    proxy.set_refusing(false);
    assert!(harness::http_get(harness::dead_addr(), "/v2/", &[]).is_err());
    // Counted per path.
    assert_eq!(proxy.count("GET", &big.digest), 13); // refused connections are not requests
}

/// The comparison itself, on the local layout through `OciLayout`: the generated images
/// flatten to umoci's tree, so a difference in the registry tests is the fetcher's.
#[test]
fn harness_layout_through_cache_matches_umoci() {
    if !support::require_root("harness_layout_through_cache_matches_umoci")
        || !harness::require("harness_layout_through_cache_matches_umoci")
    {
        return;
    }
    let t = support::tempdir();
    let (l, _, _) = test_layout(&t.path().join("L"), 5);
    let reference = l.umoci_unpack("mixed-ref", &t.path().join("ref"));
    let cache = rootfs_cache::RootfsCache::open(t.path().join("cache"), rootfs_cache::CacheOptions::default()).unwrap();
    let layout = rootfs_cache::OciLayout::open(&l.dir).unwrap();
    let rootfs = cache.ensure(&layout, "mixed").unwrap();
    assert_eq!(rootfs.lowers().len(), 3);
    harness::assert_same_tree("OciLayout mixed", &reference, rootfs.lowers(), t.path());
}
