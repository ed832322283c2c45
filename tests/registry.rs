//! The `Registry` fetcher against a real registry (Debian's `docker-registry`,
//! distribution 2.8) filled by `skopeo`, with htpasswd, token auth, TLS, containerd
//! hosts.toml mirrors and a fault-injecting proxy; pulled trees compared with
//! `umoci unpack` of the same image.
//!
//! Every test starts its own registry (and proxies, token endpoint) on free loopback
//! ports, with short timeouts and backoffs ([`options`]), so the suite runs in parallel in
//! well under a minute. The fetcher's events are recorded by wrapping it ([`Observed`]),
//! so the tests do not depend on the cache's counters.
//!
//! Needs root (umoci unpack, overlay mounts) and the tools in [`harness::TOOLS`]; without
//! them each test skips with a message, or fails when `CI` is set.

#![cfg(feature = "registry")]

mod support;

#[path = "common/registry.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{
    Comp, Fault, FaultProxy, HostEntry, HostsDir, ImageInfo, Layout, RegistryConfig, RegistryServer, TokenPolicy,
    TokenServer, options,
};
use rootfs_cache::{
    CacheOptions, Credential, Descriptor, Error, FetchObserver, ImageFetcher, ImageManifest, Platform, Registry,
    RegistryOptions, RootfsCache,
};

/// A layout with a 3-layer image `mixed` (gzip, zstd, gzip), a multi-platform index
/// `multi` (amd64 + arm64, each also tagged `multi-<arch>`).
fn test_layout(dir: &Path, seed: u64) -> (Layout, harness::ImageInfo, harness::ImageInfo) {
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

// =======================================================================================
// The `Registry` fetcher

/// Whole downloads of `digest` through `proxy`: GETs without `Range` (a resumed request
/// is not a new download).
fn downloads(proxy: &FaultProxy, digest: &str) -> usize {
    proxy
        .requests()
        .iter()
        .filter(|q| q.method == "GET" && q.path().contains(digest) && q.header("range").is_none())
        .count()
}

fn with_creds(o: RegistryOptions, host: &str, user: &str, pass: &str) -> RegistryOptions {
    o.with_credential(host, Credential::basic(user, pass))
}

fn with_hosts_dir(o: RegistryOptions, dir: &Path) -> RegistryOptions {
    o.with_hosts_dir(dir)
}

fn with_platform(o: RegistryOptions, arch: &str) -> RegistryOptions {
    o.with_platform(Platform::new("linux", arch))
}

/// Every event a fetcher reported.
#[derive(Default, Debug)]
struct Events {
    retries: Mutex<Vec<(String, String)>>,
    resumed: Mutex<Vec<(String, u64)>>,
    fallbacks: Mutex<Vec<(String, String)>>,
}

impl Events {
    fn retries(&self) -> Vec<(String, String)> {
        self.retries.lock().unwrap().clone()
    }
    fn resumed(&self) -> Vec<(String, u64)> {
        self.resumed.lock().unwrap().clone()
    }
    fn fallbacks(&self) -> Vec<(String, String)> {
        self.fallbacks.lock().unwrap().clone()
    }
}

impl FetchObserver for Events {
    fn retry(&self, host: &str, reason: &str) {
        self.retries.lock().unwrap().push((host.into(), reason.into()));
    }
    fn resumed(&self, host: &str, offset: u64) {
        self.resumed.lock().unwrap().push((host.into(), offset));
    }
    fn fallback(&self, host: &str, reason: &str) {
        self.fallbacks.lock().unwrap().push((host.into(), reason.into()));
    }
}

/// Hands every event to two observers.
struct Tee<'a>(&'a dyn FetchObserver, &'a dyn FetchObserver);

impl FetchObserver for Tee<'_> {
    fn retry(&self, host: &str, reason: &str) {
        self.0.retry(host, reason);
        self.1.retry(host, reason);
    }
    fn resumed(&self, host: &str, offset: u64) {
        self.0.resumed(host, offset);
        self.1.resumed(host, offset);
    }
    fn fallback(&self, host: &str, reason: &str) {
        self.0.fallback(host, reason);
        self.1.fallback(host, reason);
    }
}

struct TeeArc(Arc<dyn FetchObserver>, Arc<Events>);

impl FetchObserver for TeeArc {
    fn retry(&self, host: &str, reason: &str) {
        Tee(&*self.0, &*self.1).retry(host, reason);
    }
    fn resumed(&self, host: &str, offset: u64) {
        Tee(&*self.0, &*self.1).resumed(host, offset);
    }
    fn fallback(&self, host: &str, reason: &str) {
        Tee(&*self.0, &*self.1).fallback(host, reason);
    }
}

/// A `Registry` whose events are recorded in `events` too (the cache still gets them).
struct Observed {
    inner: Registry,
    events: Arc<Events>,
}

impl Observed {
    fn new(opts: RegistryOptions) -> Observed {
        Observed { inner: Registry::new(opts).expect("Registry::new"), events: Arc::default() }
    }
}

impl ImageFetcher for Observed {
    fn resolve(&self, reference: &str) -> rootfs_cache::Result<ImageManifest> {
        self.inner.resolve_observed(reference, &*self.events)
    }
    fn open_blob(&self, layer: &Descriptor) -> rootfs_cache::Result<Box<dyn std::io::Read + Send>> {
        self.inner.open_blob_observed(layer, self.events.clone())
    }
    fn resolve_observed(&self, reference: &str, observer: &dyn FetchObserver) -> rootfs_cache::Result<ImageManifest> {
        self.inner.resolve_observed(reference, &Tee(observer, &*self.events))
    }
    fn open_blob_observed(
        &self,
        layer: &Descriptor,
        observer: Arc<dyn FetchObserver>,
    ) -> rootfs_cache::Result<Box<dyn std::io::Read + Send>> {
        self.inner.open_blob_observed(layer, Arc::new(TeeArc(observer, self.events.clone())))
    }
}

/// The registry error inside `e`: through `Error::Layer` and `source()` chains (an I/O
/// error from a blob reader may carry one).
fn registry_error(e: &Error) -> Option<&Error> {
    match e {
        Error::Registry { .. } | Error::Unauthorized { .. } | Error::AllHostsFailed { .. } => return Some(e),
        Error::ContentMismatch { .. } => return Some(e),
        Error::Layer { source, .. } => return registry_error(source),
        _ => {}
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = cur {
        if let Some(inner) = s.downcast_ref::<Error>() {
            return registry_error(inner);
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
                return registry_error(inner);
            }
        }
        cur = s.source();
    }
    None
}

/// The error of `r`; panics (saying `what` should have failed) on success.
fn must_fail<T>(r: rootfs_cache::Result<T>, what: &str) -> Error {
    match r {
        Ok(_) => panic!("{what}: succeeded"),
        Err(e) => e,
    }
}

/// Panic unless `e` is a typed registry error whose message names `host`.
fn assert_registry_error_naming(e: &Error, host: &str) {
    let inner = registry_error(e).unwrap_or_else(|| panic!("not a typed registry error: {e:?}"));
    assert!(e.to_string().contains(host), "error does not name {host}: {e}");
    assert!(inner.to_string().contains(host), "error does not name {host}: {inner}");
}

/// A registry filled with the test images, their umoci references and an empty cache.
struct Fx {
    t: tempfile::TempDir,
    reg: RegistryServer,
    layout: Layout,
    mixed: ImageInfo,
    arm: ImageInfo,
    /// `umoci unpack` of `mixed` (its all-gzip twin).
    reference: PathBuf,
    cache: RootfsCache,
}

/// Skip (or fail under `CI`) without root or the tools; else a registry run with
/// `config`, holding `test/mixed:v1` (gzip, zstd, gzip layers); the layout also has
/// `multi` (an index: amd64 = mixed, arm64 = one layer) for the tests that push it.
fn fixture(test: &str, config: RegistryConfig, seed: u64) -> Option<Fx> {
    if !support::require_root(test) || !harness::require(test) {
        return None;
    }
    let reg = RegistryServer::start(config);
    Some(fill(reg, seed))
}

fn fill(reg: RegistryServer, seed: u64) -> Fx {
    let t = support::tempdir();
    let (layout, mixed, arm) = test_layout(&t.path().join("L"), seed);
    let creds = match (&reg.config.htpasswd, &reg.config.token) {
        (Some((u, p)), _) => Some(format!("{u}:{p}")),
        (None, Some(_)) => Some("bob:hunter2".to_string()),
        _ => None,
    };
    reg.push(&layout.dir, "mixed", "test/mixed", "v1", creds.as_deref(), &[]);
    let reference = layout.umoci_unpack("mixed-ref", &t.path().join("ref"));
    let cache = RootfsCache::open(t.path().join("cache"), CacheOptions::default()).unwrap();
    Fx { t, reg, layout, mixed, arm, reference, cache }
}

impl Fx {
    fn scratch(&self) -> &Path {
        self.t.path()
    }

    /// A fresh cache next to the first one.
    fn new_cache(&self, name: &str) -> RootfsCache {
        RootfsCache::open(self.t.path().join(name), CacheOptions::default()).unwrap()
    }

    /// Ensure `reference` and check the tree against umoci's unpack of `mixed`.
    fn ensure_mixed(&self, cache: &RootfsCache, fetcher: &dyn ImageFetcher, reference: &str) -> rootfs_cache::Rootfs {
        let rootfs = cache
            .ensure(fetcher, reference)
            .unwrap_or_else(|e| panic!("ensure {reference}: {e}\n{e:?}\nregistry log:\n{}", self.reg.log()));
        let want: Vec<String> = self.mixed.layers.iter().rev().map(|l| l.digest.clone()).collect();
        let got: Vec<String> = rootfs.layers().iter().map(|d| d.to_string()).collect();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        assert_eq!(got_sorted, want_sorted, "layers of {reference}");
        harness::assert_same_tree(reference, &self.reference, rootfs.lowers(), self.scratch());
        assert_eq!(rootfs.manifest_digest().to_string(), self.mixed.manifest.digest);
        rootfs
    }
}

// ---------------------------------------------------------------------------------------
// Pulled trees

#[test]
fn pull_gzip_and_zstd_layers_matches_umoci() {
    let Some(f) = fixture("pull_gzip_and_zstd_layers_matches_umoci", RegistryConfig::plain(), 10) else { return };
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", f.reg.host()));
    assert!(r.events.retries().is_empty() && r.events.fallbacks().is_empty(), "{:?}", r.events);
    // By digest, in a fresh cache.
    let c2 = f.new_cache("c2");
    f.ensure_mixed(&c2, &r, &format!("{}/test/mixed@{}", f.reg.host(), f.mixed.manifest.digest));
}

#[test]
fn pull_docker_v2s2_and_recompressed_zstd() {
    let test = "pull_docker_v2s2_and_recompressed_zstd";
    let Some(f) = fixture(test, RegistryConfig::plain(), 11) else { return };
    // The all-gzip twin as a Docker schema 2 manifest, and everything recompressed to zstd
    // by skopeo: different blobs, the same tree.
    f.reg.push(&f.layout.dir, "mixed-ref", "test/docker", "v1", None, &["--format", "v2s2"]);
    let raw = f.reg.inspect_raw("test/docker", "v1", None);
    assert!(raw.contains("application/vnd.docker.distribution.manifest.v2+json"), "{raw}");
    f.reg.push(
        &f.layout.dir,
        "mixed-ref",
        "test/zstd",
        "v1",
        None,
        &["--dest-compress-format", "zstd", "--dest-compress"],
    );
    // A Docker manifest list (of the gzip twin and the arm64 image).
    let mut layout = Layout::create(&f.scratch().join("L2"));
    let tars = harness::image_layers(11, 300_000);
    let twin = layout.add_reference_twin("amd", "amd64", &tars);
    let arm = layout.add_image(Some("arm"), "arm64", &[(harness::small_layer("arm", 3), Comp::Gzip)]);
    layout.add_index("list", &[&twin, &arm]);
    f.reg.push(&layout.dir, "list", "test/list", "v1", None, &["--format", "v2s2"]);
    let raw = f.reg.inspect_raw("test/list", "v1", None);
    assert!(raw.contains("application/vnd.docker.distribution.manifest.list.v2+json"), "{raw}");
    let r = Registry::new(with_platform(options(), "amd64")).unwrap();
    for repo in ["test/docker", "test/zstd", "test/list"] {
        let reference = format!("{}/{repo}:v1", f.reg.host());
        let rootfs = f.cache.ensure(&r, &reference).unwrap_or_else(|e| panic!("{reference}: {e}"));
        harness::assert_same_tree(&reference, &f.reference, rootfs.lowers(), f.scratch());
    }
}

#[test]
fn multi_platform_index_chooses_the_platform() {
    let Some(f) = fixture("multi_platform_index_chooses_the_platform", RegistryConfig::plain(), 12) else { return };
    f.reg.push(&f.layout.dir, "multi", "test/multi", "v1", None, &[]);
    let reference = format!("{}/test/multi:v1", f.reg.host());
    let amd = Registry::new(with_platform(options(), "amd64")).unwrap();
    f.ensure_mixed(&f.cache, &amd, &reference);
    let arm = Registry::new(with_platform(options(), "arm64")).unwrap();
    let rootfs = f.cache.ensure(&arm, &reference).unwrap();
    assert_eq!(rootfs.manifest_digest().to_string(), f.arm.manifest.digest);
    assert_eq!(rootfs.layers().len(), 1);
    let arm_ref = f.layout.umoci_unpack("multi-arm64", &f.scratch().join("ref-arm"));
    harness::assert_same_tree("arm64 of the index", &arm_ref, rootfs.lowers(), f.scratch());
    // No such platform: a typed not-found, nothing pulled.
    let s390 = Registry::new(with_platform(options(), "s390x")).unwrap();
    match f.cache.ensure(&s390, &reference) {
        Err(Error::NotFound { what }) => assert!(what.contains("s390x") || what.contains("platform"), "{what}"),
        other => panic!("s390x: {:?}", other.map(|r| r.manifest_digest())),
    }
}

/// A digest reference the cache holds costs no request at all, even through a fresh
/// `Registry` that never resolved anything.
#[test]
fn cached_digest_reference_makes_no_request() {
    let Some(f) = fixture("cached_digest_reference_makes_no_request", RegistryConfig::plain(), 13) else { return };
    let proxy = FaultProxy::start(f.reg.addr());
    let r = Registry::new(options()).unwrap();
    let first = f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", proxy.host()));
    assert!(proxy.requests().len() >= 4);
    proxy.reset_log();
    let fresh = Registry::new(options()).unwrap();
    let again = f.cache.ensure(&fresh, &format!("{}/test/mixed@{}", proxy.host(), f.mixed.manifest.digest)).unwrap();
    assert_eq!(again.lowers(), first.lowers());
    let again = f.cache.ensure(&r, &format!("{}/test/mixed:v1@{}", proxy.host(), f.mixed.manifest.digest)).unwrap();
    assert_eq!(again.lowers(), first.lowers());
    assert!(proxy.requests().is_empty(), "requests for a cached digest: {:?}", proxy.requests());
    // Not cached: tag and digest, the digest wins (the tag is never asked for).
    let c2 = f.new_cache("c2");
    let reference = format!("{}/test/mixed:no-such-tag@{}", proxy.host(), f.mixed.manifest.digest);
    f.ensure_mixed(&c2, &fresh, &reference);
    let reqs = proxy.requests();
    assert!(!reqs.is_empty() && reqs.iter().all(|q| !q.path().contains("no-such-tag")), "{reqs:#?}");
    // `localhost` is loopback too: plain HTTP.
    let c3 = f.new_cache("c3");
    f.ensure_mixed(&c3, &fresh, &format!("localhost:{}/test/mixed:v1", f.reg.port));
}

// ---------------------------------------------------------------------------------------
// Auth

#[test]
fn htpasswd_basic_auth() {
    let Some(f) = fixture("htpasswd_basic_auth", RegistryConfig::plain().htpasswd("alice", "s3cret"), 20) else {
        return;
    };
    let reference = format!("{}/test/mixed:v1", f.reg.host());
    // Anonymous: refused, typed, naming the host; nothing cached.
    let anon = Registry::new(options()).unwrap();
    let e = must_fail(f.cache.ensure(&anon, &reference), "anonymous pull from an htpasswd registry");
    assert!(matches!(registry_error(&e), Some(Error::Unauthorized { .. })), "{e:?}");
    assert_registry_error_naming(&e, &f.reg.host());
    // Wrong password: refused too.
    let wrong = Registry::new(with_creds(options(), &f.reg.host(), "alice", "nope")).unwrap();
    let e = must_fail(f.cache.ensure(&wrong, &reference), "wrong password");
    assert!(matches!(registry_error(&e), Some(Error::Unauthorized { .. })), "{e:?}");
    assert!(!e.to_string().contains("nope"), "the password in an error: {e}");
    let good = Registry::new(with_creds(options(), &f.reg.host(), "alice", "s3cret")).unwrap();
    f.ensure_mixed(&f.cache, &good, &reference);
}

#[test]
fn token_auth_bearer_from_basic() {
    let test = "token_auth_bearer_from_basic";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let tokens =
        TokenServer::start(TokenPolicy { creds: Some(("bob".into(), "hunter2".into())), ..TokenPolicy::default() });
    let f = fill(RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config())), 21);
    let reference = format!("{}/test/mixed:v1", f.reg.host());
    let anon = Registry::new(options()).unwrap();
    let e = must_fail(f.cache.ensure(&anon, &reference), "anonymous pull with token auth");
    assert!(matches!(registry_error(&e), Some(Error::Unauthorized { .. })), "{e:?}");
    assert_registry_error_naming(&e, &f.reg.host());
    let before = tokens.request_count();
    let good = Registry::new(with_creds(options(), &f.reg.host(), "bob", "hunter2")).unwrap();
    f.ensure_mixed(&f.cache, &good, &reference);
    let reqs: Vec<harness::Request> = tokens.requests.lock().unwrap()[before..].to_vec();
    assert!(!reqs.is_empty());
    for r in &reqs {
        assert_eq!(r.header("authorization"), Some(harness::basic_auth("bob", "hunter2").as_str()), "{r:?}");
        assert_eq!(r.query_all("service"), vec![tokens.service.clone()]);
        assert!(r.query_all("scope").iter().any(|s| s == "repository:test/mixed:pull"), "{r:?}");
    }
    // One token for the manifest and every blob of the repository (cached until expiry).
    assert!(reqs.len() <= 2, "{} token requests for one repository: {reqs:?}", reqs.len());
}

/// Token auth with two repositories sharing layers, through one `Registry`: each pull
/// asks for its own repository's scope, and a blob already pulled from the first is not
/// downloaded again for the second.
#[test]
fn token_auth_two_repositories_sharing_layers() {
    let test = "token_auth_two_repositories_sharing_layers";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let tokens =
        TokenServer::start(TokenPolicy { creds: Some(("bob".into(), "hunter2".into())), ..TokenPolicy::default() });
    let f = fill(RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config())), 29);
    // The same image under a second name.
    f.reg.push(&f.layout.dir, "mixed", "other/copy", "v2", Some("bob:hunter2"), &[]);
    let proxy = FaultProxy::start(f.reg.addr());
    let r = Registry::new(with_creds(options(), &proxy.host(), "bob", "hunter2")).unwrap();
    let before = tokens.request_count();
    let first = f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", proxy.host()));
    let second = f.ensure_mixed(&f.cache, &r, &format!("{}/other/copy:v2", proxy.host()));
    assert_eq!(first.lowers(), second.lowers());
    for l in &f.mixed.layers {
        assert_eq!(downloads(&proxy, &l.digest), 1);
    }
    let reqs: Vec<harness::Request> = tokens.requests.lock().unwrap()[before..].to_vec();
    let scopes: Vec<String> = reqs.iter().flat_map(|q| q.query_all("scope")).collect();
    assert!(scopes.iter().any(|s| s == "repository:test/mixed:pull"), "{scopes:?}");
    assert!(scopes.iter().any(|s| s == "repository:other/copy:pull"), "{scopes:?}");
    // A digest no manifest listed: NotFound, no request.
    proxy.reset_log();
    let unknown = Descriptor {
        digest: rootfs_cache::Digest::of(b"not a blob"),
        size: 10,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        annotations: Default::default(),
    };
    match r.open_blob(&unknown) {
        Err(Error::NotFound { .. }) => {}
        Err(e) => panic!("not NotFound: {e:?}"),
        Ok(_) => panic!("a blob no manifest listed was opened"),
    }
    assert!(proxy.requests().is_empty(), "{:#?}", proxy.requests());
}

/// Token servers that answer `access_token` (OAuth style) instead of `token`, and a
/// registry whose token endpoint gives anonymous pulls.
#[test]
fn token_auth_access_token_field_and_anonymous_tokens() {
    let test = "token_auth_access_token_field_and_anonymous_tokens";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let tokens = TokenServer::start(TokenPolicy {
        creds: Some(("bob".into(), "hunter2".into())),
        anonymous_pull: true,
        access_token_field: true,
        ..TokenPolicy::default()
    });
    let f = fill(RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config())), 22);
    let anon = Registry::new(options()).unwrap();
    f.ensure_mixed(&f.cache, &anon, &format!("{}/test/mixed:v1", f.reg.host()));
    assert!(tokens.requests.lock().unwrap().iter().any(|r| r.header("authorization").is_none()));
}

/// Tokens are cached per host and scope until `expires_in`: a second pull of the same
/// repository through the same `Registry` asks for no token while it is valid, and for a
/// new one once it expired (the registry itself allows a minute of leeway, so only the
/// client's cache is tested here).
#[test]
fn token_cached_until_expiry() {
    let test = "token_cached_until_expiry";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    for (expires_in, want_new) in [(300, false), (1, true)] {
        let tokens = TokenServer::start(TokenPolicy {
            creds: Some(("bob".into(), "hunter2".into())),
            expires_in,
            ..TokenPolicy::default()
        });
        let f = fill(RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config())), 26);
        let reference = format!("{}/test/mixed:v1", f.reg.host());
        let r = Registry::new(with_creds(options(), &f.reg.host(), "bob", "hunter2")).unwrap();
        f.ensure_mixed(&f.cache, &r, &reference);
        std::thread::sleep(Duration::from_millis(1500));
        let before = tokens.request_count();
        f.ensure_mixed(&f.new_cache("c2"), &r, &reference);
        let n = tokens.request_count() - before;
        if want_new {
            assert!(n >= 1, "expires_in {expires_in}: an expired token reused");
        } else {
            assert_eq!(n, 0, "expires_in {expires_in}: a valid token fetched again");
        }
    }
}

/// The token service fails transiently (503, a connection closed without an answer, a
/// 429 with `Retry-After`): retried like any other request, and the pull succeeds.
#[test]
fn token_service_faults_are_retried() {
    let test = "token_service_faults_are_retried";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let tokens =
        TokenServer::start(TokenPolicy { creds: Some(("bob".into(), "hunter2".into())), ..TokenPolicy::default() });
    // The registry sends clients to the token service through a fault proxy.
    let token_proxy = FaultProxy::start(tokens.addr);
    let mut config = tokens.registry_config();
    config.realm = format!("{}/token", token_proxy.url());
    let f = fill(RegistryServer::start(RegistryConfig::plain().token(config)), 27);
    let reference = format!("{}/test/mixed:v1", f.reg.host());
    let mut failures = Vec::new();
    let faults =
        [Fault::Status(503, vec![]), Fault::Hangup, Fault::Status(429, vec![("Retry-After".into(), "1".into())])];
    for (i, fault) in faults.into_iter().enumerate() {
        token_proxy.clear();
        token_proxy.on_get("/token", fault.clone(), Some(1));
        let r = Observed::new(with_creds(options(), &f.reg.host(), "bob", "hunter2"));
        let cache = f.new_cache(&format!("c{i}"));
        match cache.ensure(&r, &reference) {
            Ok(rootfs) => harness::assert_same_tree(&reference, &f.reference, rootfs.lowers(), f.scratch()),
            Err(e) => {
                assert_registry_error_naming(&e, &f.reg.host());
                failures.push(format!("{fault:?}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "token service faults not retried:\n{}", failures.join("\n"));
}

/// A cached token the registry rejects is replaced once (a fresh token is fetched and the
/// request retried); a fresh token that is rejected is `Unauthorized` at once (as
/// containerd does), after a bounded number of token requests.
#[test]
fn rejected_token_is_fetched_again_once() {
    let test = "rejected_token_is_fetched_again_once";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let tokens =
        TokenServer::start(TokenPolicy { creds: Some(("bob".into(), "hunter2".into())), ..TokenPolicy::default() });
    let f = fill(RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config())), 25);
    let proxy = FaultProxy::start(f.reg.addr());
    let reference = format!("{}/test/mixed:v1", proxy.host());
    // The token (cached since the manifest requests) is refused for one blob, as a
    // registry does after a key rotation.
    let challenge = format!(
        r#"Bearer realm="http://{}/token",service="{}",scope="repository:test/mixed:pull""#,
        tokens.addr, tokens.service
    );
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Status(401, vec![("WWW-Authenticate".into(), challenge)]), Some(1));
    let before = tokens.request_count();
    let r = Registry::new(with_creds(options(), &proxy.host(), "bob", "hunter2")).unwrap();
    f.ensure_mixed(&f.cache, &r, &reference);
    let n = tokens.request_count() - before;
    assert_eq!(n, 2, "token requests: one, then one for the rejected token");
    assert_eq!(proxy.count("GET", &big.digest), 2);
    let with_token = proxy
        .requests()
        .iter()
        .filter(|q| q.path().contains(&big.digest))
        .all(|q| q.header("authorization").is_some_and(|a| a.starts_with("Bearer ")));
    assert!(with_token, "{:#?}", proxy.requests());
    // Every token rejected (signed by an issuer the registry does not trust):
    // Unauthorized, naming the registry, after a bounded number of token requests.
    tokens.set_bad_tokens(usize::MAX);
    let before = tokens.request_count();
    let r = Registry::new(with_creds(options(), &proxy.host(), "bob", "hunter2")).unwrap();
    let e = must_fail(f.new_cache("c2").ensure(&r, &reference), "every token rejected");
    assert!(matches!(registry_error(&e), Some(Error::Unauthorized { .. })), "{e:?}");
    assert_registry_error_naming(&e, &proxy.host());
    let n = tokens.request_count() - before;
    assert!((1..=2).contains(&n), "{n} token requests when every token is rejected");
}

/// Credentials from the auth files, in a child process of this test binary per case so
/// the environment of the other tests is left alone: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json` (podman), `$DOCKER_CONFIG/config.json`,
/// `~/.docker/config.json`, a credential helper (`credHelpers`) and a store
/// (`credsStore`) run from `PATH`; and none of them: refused.
#[test]
fn credentials_from_auth_files_and_helpers() {
    let test = "credentials_from_auth_files_and_helpers";
    if let Ok(reference) = std::env::var("ROOTFS_CACHE_TEST_CHILD_REF") {
        // The child: only the auth files can authorise this pull.
        let r = Registry::new(options().with_auth_files(true)).unwrap();
        let cache = RootfsCache::open(std::env::var("ROOTFS_CACHE_TEST_CHILD_CACHE").unwrap(), CacheOptions::default())
            .unwrap();
        match cache.ensure(&r, &reference) {
            Ok(rootfs) => println!("CHILD-OK {}", rootfs.manifest_digest()),
            Err(e) => println!("CHILD-ERR {e}"),
        }
        return;
    }
    let Some(f) = fixture(test, RegistryConfig::plain().htpasswd("carol", "pa55"), 23) else { return };
    let host = f.reg.host();
    let auths = format!(r#"{{"auths":{{"{host}":{{"auth":"{}"}}}}}}"#, harness::base64(b"carol:pa55"));
    let case_dir = |name: &str| {
        let d = f.scratch().join("cases").join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // A credential helper: `docker-credential-rctest get` reads the server on stdin.
    let bin = case_dir("bin");
    let helper = bin.join("docker-credential-rctest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\n[ \"$server\" = \"{host}\" ] || \
             {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
             echo '{{\"ServerURL\":\"{host}\",\"Username\":\"carol\",\"Secret\":\"pa55\"}}'\n"
        ),
    )
    .unwrap();
    support::chmod(&helper, 0o755);
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    // (name, environment of the child, whether it can pull)
    type Case<'a> = (&'a str, Vec<(&'a str, PathBuf)>, bool);
    let mut cases: Vec<Case> = Vec::new();
    let home = case_dir("empty-home");
    cases.push(("nothing", vec![("HOME", home.clone())], false));
    let d = case_dir("registry-auth-file");
    std::fs::write(d.join("auth.json"), &auths).unwrap();
    cases.push(("REGISTRY_AUTH_FILE", vec![("HOME", home.clone()), ("REGISTRY_AUTH_FILE", d.join("auth.json"))], true));
    let d = case_dir("xdg");
    std::fs::create_dir_all(d.join("containers")).unwrap();
    std::fs::write(d.join("containers/auth.json"), &auths).unwrap();
    cases.push(("XDG_RUNTIME_DIR", vec![("HOME", home.clone()), ("XDG_RUNTIME_DIR", d)], true));
    let d = case_dir("docker-config");
    std::fs::write(d.join("config.json"), &auths).unwrap();
    cases.push(("DOCKER_CONFIG", vec![("HOME", home.clone()), ("DOCKER_CONFIG", d)], true));
    let d = case_dir("home");
    std::fs::create_dir_all(d.join(".docker")).unwrap();
    std::fs::write(d.join(".docker/config.json"), &auths).unwrap();
    cases.push(("~/.docker/config.json", vec![("HOME", d)], true));
    let d = case_dir("cred-helpers");
    std::fs::write(d.join("config.json"), format!(r#"{{"credHelpers":{{"{host}":"rctest"}}}}"#)).unwrap();
    cases.push(("credHelpers", vec![("HOME", home.clone()), ("DOCKER_CONFIG", d)], true));
    let d = case_dir("creds-store");
    std::fs::write(d.join("config.json"), r#"{"credsStore":"rctest"}"#).unwrap();
    cases.push(("credsStore", vec![("HOME", home.clone()), ("DOCKER_CONFIG", d)], true));
    let mut problems = Vec::new();
    for (i, (name, env, should_pull)) in cases.iter().enumerate() {
        // The child opens caches of its own (this process holds the lock of `f.cache`).
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("ROOTFS_CACHE_TEST_CHILD_REF", format!("{host}/test/mixed:v1"))
            .env("ROOTFS_CACHE_TEST_CHILD_CACHE", f.scratch().join(format!("child-cache-{i}")))
            .env("PATH", &path)
            .env_remove("DOCKER_CONFIG")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("REGISTRY_AUTH_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let ok = stdout.contains(&format!("CHILD-OK {}", f.mixed.manifest.digest));
        let refused = stdout.contains("CHILD-ERR");
        match (should_pull, ok, refused) {
            (true, true, _) | (false, false, true) => {}
            _ => problems.push(format!(
                "{name}: expected {}: {}{}",
                if *should_pull { "a pull" } else { "a refusal" },
                stdout.lines().filter(|l| l.starts_with("CHILD")).collect::<Vec<_>>().join(" "),
                if ok || refused { String::new() } else { String::from_utf8_lossy(&out.stderr).into_owned() }
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Without credentials, this process cannot pull.
    let anon = Registry::new(options()).unwrap();
    assert!(f.cache.ensure(&anon, &format!("{host}/test/mixed:v1")).is_err());
}

/// A blob GET answered with a redirect to another host (object storage): the pull
/// follows it, and the credentials for the registry never reach the other host.
#[test]
fn redirect_to_another_host_gets_no_credentials() {
    let Some(f) = fixture(
        "redirect_to_another_host_gets_no_credentials",
        RegistryConfig::plain().htpasswd("alice", "s3cret"),
        24,
    ) else {
        return;
    };
    let front = FaultProxy::start(f.reg.addr());
    // The "object store" authorises by itself: it adds the registry's credentials upstream
    // and logs what the client sent.
    let store = FaultProxy::start_on([127, 0, 0, 2], f.reg.addr(), Some(harness::basic_auth("alice", "s3cret")));
    front.on_get("/blobs/", Fault::Redirect(store.url()), None);
    let r = Registry::new(with_creds(options(), &front.host(), "alice", "s3cret")).unwrap();
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", front.host()));
    let got = store.requests();
    assert!(got.len() >= f.mixed.layers.len(), "store requests: {got:?}");
    for req in &got {
        assert!(req.header("authorization").is_none(), "credentials sent to the redirect target: {req:?}");
    }
    // The registry did get them.
    assert!(front.requests().iter().any(|r| r.header("authorization").is_some()));
}

/// Redirects that never end, and a redirect to a host that is down: typed errors naming
/// the registry, and the cache is usable afterwards.
#[test]
fn redirect_loops_and_dead_redirect_targets() {
    let Some((f, proxy, reference)) = behind_proxy("redirect_loops_and_dead_redirect_targets", 28) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Redirect(proxy.url()), None);
    let r = Registry::new(options()).unwrap();
    let start = Instant::now();
    let e = must_fail(f.cache.ensure(&r, &reference), "a redirect loop");
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    assert_registry_error_naming(&e, &proxy.host());
    let n = proxy.count("GET", &big.digest);
    assert!(n <= 50, "{n} requests in a redirect loop");
    proxy.clear();
    let dead = harness::dead_addr();
    proxy.on_get(&big.digest, Fault::Redirect(format!("http://{dead}")), None);
    let e = must_fail(f.cache.ensure(&r, &reference), "a redirect to a dead host");
    assert!(registry_error(&e).is_some(), "{e:?}");
    assert!(e.to_string().contains(&proxy.host()) || e.to_string().contains(&dead.to_string()), "{e}");
    proxy.clear();
    f.ensure_mixed(&f.cache, &r, &reference);
}

// ---------------------------------------------------------------------------------------
// TLS

fn tls_fixture(test: &str, seed: u64) -> Option<(Fx, HostsDir)> {
    let f = fixture(test, RegistryConfig::plain().tls(), seed)?;
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    Some((f, hosts))
}

#[test]
fn tls_ca_from_hosts_toml() {
    let Some((f, hosts)) = tls_fixture("tls_ca_from_hosts_toml", 30) else { return };
    // The CA named by `ca`, outside the host's directory (a `*.crt` inside it would be
    // picked up on its own, certs.d style).
    let ca = f.reg.ca_path().unwrap();
    hosts.write(
        &f.reg.host(),
        &harness::hosts_toml(Some(&f.reg.base_url()), &[HostEntry::new(f.reg.base_url()).ca(ca)]),
    );
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", f.reg.host()));
}

#[test]
fn tls_unknown_ca_is_a_typed_error_and_skip_verify_works() {
    let Some((f, hosts)) = tls_fixture("tls_unknown_ca_is_a_typed_error_and_skip_verify_works", 31) else { return };
    let reference = format!("{}/test/mixed:v1", f.reg.host());
    // https named, no CA: the certificate is not trusted.
    hosts.write(&f.reg.host(), &harness::hosts_toml(Some(&f.reg.base_url()), &[]));
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    let e = must_fail(f.cache.ensure(&r, &reference), "pull from an untrusted certificate");
    assert_registry_error_naming(&e, &f.reg.host());
    let text = format!("{e} {e:?}").to_ascii_lowercase();
    assert!(text.contains("certificate") || text.contains("tls"), "not a TLS error: {e}");
    // skip_verify = false is the same.
    hosts.write(
        &f.reg.host(),
        &harness::hosts_toml(Some(&f.reg.base_url()), &[HostEntry::new(f.reg.base_url()).skip_verify(false)]),
    );
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    assert!(f.cache.ensure(&r, &reference).is_err());
    // skip_verify = true: accepted.
    hosts.write(
        &f.reg.host(),
        &harness::hosts_toml(Some(&f.reg.base_url()), &[HostEntry::new(f.reg.base_url()).skip_verify(true)]),
    );
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    f.ensure_mixed(&f.cache, &r, &reference);
}

/// TLS and token auth together (the token endpoint on plain HTTP on loopback), the
/// registry named `localhost` (the certificate's DNS name), the CA from hosts.toml.
#[test]
fn tls_token_auth_by_localhost_name() {
    let test = "tls_token_auth_by_localhost_name";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let tokens =
        TokenServer::start(TokenPolicy { creds: Some(("bob".into(), "hunter2".into())), ..TokenPolicy::default() });
    let f = fill(RegistryServer::start(RegistryConfig::plain().tls().token(tokens.registry_config())), 32);
    let name = format!("localhost:{}", f.reg.port);
    let url = format!("https://{name}");
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&name, &harness::hosts_toml(Some(&url), &[HostEntry::new(url.clone()).ca(f.reg.ca_path().unwrap())]));
    let r = Registry::new(with_creds(with_hosts_dir(options(), &hosts.dir), &name, "bob", "hunter2")).unwrap();
    f.ensure_mixed(&f.cache, &r, &format!("{name}/test/mixed:v1"));
    assert!(tokens.request_count() > 0);
}

/// A hosts entry without a scheme: HTTPS unless the embedder allows plain HTTP
/// (`plain_http`); against a plain-HTTP server the HTTPS attempt is a typed error.
#[test]
fn hosts_entry_without_scheme_and_plain_http() {
    let Some(f) = fixture("hosts_entry_without_scheme_and_plain_http", RegistryConfig::plain(), 33) else { return };
    let name = "registry.rootfs-cache.invalid:5000";
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(name, &harness::hosts_toml(None, &[HostEntry::new(f.reg.host())]));
    let reference = format!("{name}/test/mixed:v1");
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir).with_plain_http(true)).unwrap();
    f.ensure_mixed(&f.cache, &r, &reference);
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    let e = must_fail(f.new_cache("c2").ensure(&r, &reference), "HTTPS to a plain-HTTP server");
    assert!(e.to_string().contains(&f.reg.host()), "{e}");
    assert!(registry_error(&e).is_some(), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// hosts.toml mirrors

#[test]
fn dead_mirror_then_upstream() {
    let Some(f) = fixture("dead_mirror_then_upstream", RegistryConfig::plain(), 40) else { return };
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    let dead = harness::dead_addr();
    hosts.write(&f.reg.host(), &harness::hosts_toml(None, &[HostEntry::new(format!("http://{dead}"))]));
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", f.reg.host()));
    let fb = r.events.fallbacks();
    assert!(fb.iter().any(|(h, _)| h == &dead.to_string()), "no fallback from the dead mirror: {fb:?}");
    let stats = f.cache.stats();
    assert_eq!(stats.host_fallbacks, fb.len() as u64, "{stats:?}");
}

/// A mirror serving wrong bytes for a blob: the next host (the registry) serves it within
/// the same `ensure`, and nothing of the mirror's bytes is cached.
///
/// The blob is smaller than the tail the `Registry` holds back until the digest is
/// checked, so the wrong bytes never reach extraction; for wrong bytes that do (a bigger
/// blob), see `wrong_bytes_early_in_a_big_blob`. Should the `ensure` fail, the test checks
/// what must hold anyway (a typed error naming the mirror, nothing wrong cached, the next
/// `ensure` served by the registry) before failing.
#[test]
fn lying_mirror_next_host_used_nothing_wrong_cached() {
    let Some(f) = fixture("lying_mirror_next_host_used_nothing_wrong_cached", RegistryConfig::plain(), 41) else {
        return;
    };
    let mirror = FaultProxy::start(f.reg.addr());
    let upstream = FaultProxy::start(f.reg.addr());
    let big = big_layer(&f).clone();
    // Near the end: the digest check, not the decompressor, is what notices.
    mirror.on_get(&big.digest, Fault::Corrupt(big.size as usize - 3), None);
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&upstream.host(), &harness::hosts_toml(None, &[HostEntry::new(mirror.url())]));
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    let reference = format!("{}/test/mixed:v1", upstream.host());
    let first = f.cache.ensure(&r, &reference).map(|_| ());
    for (d, _, _) in f.cache.layers() {
        assert!(f.mixed.layers.iter().any(|l| l.digest == d.to_string()), "unexpected layer {d}");
    }
    if let Err(e) = &first {
        assert!(matches!(registry_error(e), Some(Error::ContentMismatch { .. })), "{e:?}");
        assert_registry_error_naming(e, &mirror.host());
    }
    // Whatever happened, the cache is usable and ends with exactly the right tree, the
    // blob read once from each host.
    f.ensure_mixed(&f.cache, &r, &reference);
    assert_eq!(mirror.count("GET", &big.digest), 1, "{:#?}", mirror.requests());
    assert_eq!(upstream.count("GET", &big.digest), 1, "{:#?}", upstream.requests());
    if let Err(e) = first {
        panic!("wrong bytes from a mirror failed the ensure instead of moving on to the next host: {e}");
    }
    assert!(r.events.fallbacks().iter().any(|(h, _)| h == &mirror.host()), "{:?}", r.events);
}

/// A mirror that wants credentials gets none of the registry's: it fails (401) and the
/// registry, with its own credentials, serves everything.
#[test]
fn mirror_never_gets_the_registrys_credentials() {
    let Some(f) =
        fixture("mirror_never_gets_the_registrys_credentials", RegistryConfig::plain().htpasswd("alice", "s3cret"), 46)
    else {
        return;
    };
    let mirror = FaultProxy::start(f.reg.addr());
    let upstream = FaultProxy::start(f.reg.addr());
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&upstream.host(), &harness::hosts_toml(None, &[HostEntry::new(mirror.url())]));
    let r = Observed::new(with_creds(with_hosts_dir(options(), &hosts.dir), &upstream.host(), "alice", "s3cret"));
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", upstream.host()));
    let reqs = mirror.requests();
    assert!(!reqs.is_empty());
    for q in &reqs {
        assert!(q.header("authorization").is_none(), "credentials sent to the mirror: {q:?}");
    }
    assert!(r.events.fallbacks().iter().any(|(h, _)| h == &mirror.host()), "{:?}", r.events);
}

/// hosts.toml `header` entries reach the host they are for; a mirror with only the
/// `pull` capability is not asked to resolve the tag but serves the blobs; `_default`
/// applies to registries without a directory of their own.
#[test]
fn hosts_toml_headers_capabilities_and_default() {
    let Some(f) = fixture("hosts_toml_headers_capabilities_and_default", RegistryConfig::plain(), 47) else {
        return;
    };
    let mirror = FaultProxy::start(f.reg.addr());
    let upstream = FaultProxy::start(f.reg.addr());
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(
        "_default",
        &harness::hosts_toml(
            None,
            &[HostEntry::new(mirror.url()).capabilities(&["pull"]).header("X-Test-Mirror", "yes")],
        ),
    );
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", upstream.host()));
    let reqs = mirror.requests();
    for q in &reqs {
        assert_eq!(q.header("x-test-mirror"), Some("yes"), "{q:?}");
        assert!(!q.path().ends_with("/manifests/v1"), "a pull-only mirror asked for a tag: {q:?}");
    }
    for l in &f.mixed.layers {
        assert_eq!(mirror.count("GET", &l.digest), 1, "{reqs:#?}");
        assert_eq!(upstream.count("GET", &l.digest), 0);
    }
    assert!(upstream.requests().iter().any(|q| q.path().ends_with("/manifests/v1")));
    assert!(upstream.requests().iter().all(|q| q.header("x-test-mirror").is_none()));
}

/// A registry name that is not loopback (and does not resolve), served by the hosts.toml
/// `server` it maps to over plain HTTP (the entry says `http://`); without the hosts dir,
/// a typed error naming the host.
#[test]
fn hosts_toml_server_for_a_registry_name() {
    let Some(f) = fixture("hosts_toml_server_for_a_registry_name", RegistryConfig::plain(), 48) else { return };
    let server = FaultProxy::start(f.reg.addr());
    let name = "registry.rootfs-cache.invalid:5000";
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(name, &harness::hosts_toml(Some(&server.url()), &[]));
    let reference = format!("{name}/test/mixed:v1");
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    f.ensure_mixed(&f.cache, &r, &reference);
    // A host other than the registry named gets `?ns=` (containerd's `isProxy`: any host
    // whose name differs from the reference's, `server` included).
    assert!(server.requests().iter().all(|q| q.query_all("ns") == [name]), "{:#?}", server.requests());
    let r = Registry::new(options()).unwrap();
    let e = must_fail(f.new_cache("c2").ensure(&r, &reference), "an unresolvable registry name");
    assert_registry_error_naming(&e, name);
}

/// A mirror without the blob (404) hands it to the next host.
#[test]
fn mirror_missing_a_blob_next_host_used() {
    let Some(f) = fixture("mirror_missing_a_blob_next_host_used", RegistryConfig::plain(), 49) else { return };
    let mirror = FaultProxy::start(f.reg.addr());
    let upstream = FaultProxy::start(f.reg.addr());
    let big = big_layer(&f).clone();
    mirror.on_get(&big.digest, Fault::Status(404, vec![]), None);
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&upstream.host(), &harness::hosts_toml(None, &[HostEntry::new(mirror.url())]));
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", upstream.host()));
    assert_eq!(downloads(&upstream, &big.digest), 1);
    for l in f.mixed.layers.iter().filter(|l| l.digest != big.digest) {
        assert_eq!(downloads(&mirror, &l.digest), 1);
        assert_eq!(downloads(&upstream, &l.digest), 0);
    }
}

/// Docker Hub names through a node-local mirror (as Spegel or a pull-through cache is
/// set up): `busy:v1` is `docker.io/library/busy:v1`, asked of the mirror as
/// `/v2/library/busy/...?ns=docker.io`; Docker Hub itself is never contacted.
#[test]
fn docker_hub_names_through_a_mirror() {
    let Some(f) = fixture("docker_hub_names_through_a_mirror", RegistryConfig::plain(), 68) else { return };
    f.reg.push(&f.layout.dir, "mixed", "library/busy", "v1", None, &[]);
    f.reg.push(&f.layout.dir, "mixed", "someone/tool", "v2", None, &[]);
    let mirror = FaultProxy::start(f.reg.addr());
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    // The server is an address where nothing listens: reaching it would fail the pull.
    let dead = harness::dead_addr();
    hosts.write("docker.io", &harness::hosts_toml(Some(&format!("http://{dead}")), &[HostEntry::new(mirror.url())]));
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    for (reference, repo) in [
        ("busy:v1", "library/busy"),
        ("docker.io/library/busy:v1", "library/busy"),
        ("someone/tool:v2", "someone/tool"),
    ] {
        mirror.reset_log();
        let cache = f.new_cache(&format!("c-{}", repo.replace('/', "-")));
        f.ensure_mixed(&cache, &r, reference);
        let reqs = mirror.requests();
        // Manifests from the repository named; blobs from a repository where the
        // `Registry` saw them (the first one pulled, here).
        let manifests = reqs.iter().filter(|q| q.path().contains("/manifests/"));
        assert!(manifests.clone().count() > 0, "{reference}: {reqs:#?}");
        assert!(manifests.clone().all(|q| q.path().starts_with(&format!("/v2/{repo}/"))), "{reference}: {reqs:#?}");
        assert!(reqs.iter().all(|q| q.query_all("ns") == ["docker.io"]), "{reference}: {reqs:#?}");
    }
    assert!(r.events.fallbacks().is_empty(), "{:?}", r.events);
}

/// A mirror serving a wrong manifest: read whole and checked, so the next host answers.
#[test]
fn lying_mirror_manifest_next_host_used() {
    let Some(f) = fixture("lying_mirror_manifest_next_host_used", RegistryConfig::plain(), 45) else { return };
    let mirror = FaultProxy::start(f.reg.addr());
    mirror.on_get("/manifests/", Fault::Corrupt(20), None);
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&f.reg.host(), &harness::hosts_toml(None, &[HostEntry::new(mirror.url())]));
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", f.reg.host()));
    let fb = r.events.fallbacks();
    assert!(fb.iter().any(|(h, _)| h == &mirror.host()), "{fb:?}");
}

/// The only host serves wrong bytes for every blob: the pull fails, typed and naming the
/// host, nothing of those bytes is cached, and the same cache pulls once the host is fixed.
/// Twice: a byte flipped early (where a decompressor would trip over it, were it handed
/// out before the digest is checked) and one near the end (only the digest shows it).
#[test]
fn lying_only_host_fails_typed_and_caches_nothing() {
    let Some(f) = fixture("lying_only_host_fails_typed_and_caches_nothing", RegistryConfig::plain(), 42) else {
        return;
    };
    let liar = FaultProxy::start(f.reg.addr());
    let reference = format!("{}/test/mixed:v1", liar.host());
    let mut errors = Vec::new();
    for (i, early) in [false, true].into_iter().enumerate() {
        for l in &f.mixed.layers {
            liar.on_get(&l.digest, Fault::Corrupt(if early { 20 } else { l.size as usize - 3 }), None);
        }
        let cache = f.new_cache(&format!("c{i}"));
        let r = Registry::new(options()).unwrap();
        let e = must_fail(cache.ensure(&r, &reference), "a pull of corrupt blobs");
        assert!(cache.layers().len() < f.mixed.layers.len(), "{:?}", cache.layers());
        for (d, _, _) in cache.layers() {
            assert!(f.mixed.layers.iter().any(|l| l.digest == d.to_string()), "unexpected layer {d}");
        }
        // The same cache and fetcher then pull the right bytes.
        liar.clear();
        f.ensure_mixed(&cache, &r, &reference);
        errors.push((early, e));
    }
    for (early, e) in &errors {
        let what = if *early { "byte 20 flipped" } else { "a byte near the end flipped" };
        let typed = registry_error(e).is_some() && e.to_string().contains(&liar.host());
        assert!(typed, "{what}: not a typed error naming {}: {e}\n{e:?}", liar.host());
    }
}

/// Wrong bytes early in a blob larger than anything a fetcher can hold back (3 MiB): the
/// bytes reach extraction before the digest can be known. Alone, the host must still end
/// in a typed error naming it (not the decompressor's or the tar parser's complaint), and
/// behind a mirror the pull must end with the next host's bytes; nothing wrong is cached
/// either way, and the cache stays usable.
#[test]
fn wrong_bytes_early_in_a_big_blob() {
    let Some(f) = fixture("wrong_bytes_early_in_a_big_blob", RegistryConfig::plain(), 63) else { return };
    let mut layout = Layout::create(&f.scratch().join("LB"));
    let tars = harness::image_layers(63, 3 << 20);
    let layers: Vec<(Vec<u8>, Comp)> = tars.iter().map(|t| (t.clone(), Comp::Gzip)).collect();
    let image = layout.add_image(Some("big"), "amd64", &layers);
    let big = image.layers.iter().max_by_key(|l| l.size).unwrap().clone();
    assert!(big.size > 2 << 20, "{}", big.size);
    f.reg.push(&layout.dir, "big", "test/big", "v1", None, &[]);
    let reference_tree = layout.umoci_unpack("big", &f.scratch().join("ref-big"));
    let check = |cache: &RootfsCache, r: &dyn ImageFetcher, reference: &str| {
        let rootfs = cache.ensure(r, reference).unwrap_or_else(|e| panic!("{reference}: {e}"));
        harness::assert_same_tree(reference, &reference_tree, rootfs.lowers(), f.scratch());
    };
    let only_ours = |cache: &RootfsCache| {
        for (d, _, _) in cache.layers() {
            assert!(image.layers.iter().any(|l| l.digest == d.to_string()), "unexpected layer {d}");
        }
    };
    let mut problems = Vec::new();
    // One host, lying.
    let liar = FaultProxy::start(f.reg.addr());
    liar.on_get(&big.digest, Fault::Corrupt(5000), None);
    let reference = format!("{}/test/big:v1", liar.host());
    let cache = f.new_cache("alone");
    let r = Registry::new(options()).unwrap();
    match cache.ensure(&r, &reference) {
        Ok(_) => problems.push("alone: wrong bytes accepted".to_string()),
        Err(e) => {
            if registry_error(&e).is_none() || !e.to_string().contains(&liar.host()) {
                problems.push(format!("alone: not a typed error naming {}: {e}", liar.host()));
            }
        }
    }
    only_ours(&cache);
    liar.clear();
    check(&cache, &r, &reference);
    // Behind a mirror that lies.
    let mirror = FaultProxy::start(f.reg.addr());
    mirror.on_get(&big.digest, Fault::Corrupt(5000), None);
    let upstream = FaultProxy::start(f.reg.addr());
    let hosts = HostsDir::new(&f.scratch().join("hosts-big"));
    hosts.write(&upstream.host(), &harness::hosts_toml(None, &[HostEntry::new(mirror.url())]));
    let reference = format!("{}/test/big:v1", upstream.host());
    let cache = f.new_cache("mirrored");
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    match cache.ensure(&r, &reference) {
        Ok(rootfs) => harness::assert_same_tree(&reference, &reference_tree, rootfs.lowers(), f.scratch()),
        Err(e) => {
            problems.push(format!("mirrored: the next host was not used: {e}"));
            only_ours(&cache);
            // At least the next ensure must get past the lying mirror.
            if let Err(e) = cache.ensure(&r, &reference) {
                problems.push(format!("mirrored, second ensure: the lying mirror was asked again: {e}"));
            }
            only_ours(&cache);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn mirror_with_override_path_and_ns_parameter() {
    let Some(f) = fixture("mirror_with_override_path_and_ns_parameter", RegistryConfig::plain(), 43) else { return };
    // A mirror whose API lives under /mirror/v2 (override_path: the URL path is used as is).
    let mirror = FaultProxy::start(f.reg.addr());
    mirror.set_path_prefix("/mirror");
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(
        &f.reg.host(),
        &harness::hosts_toml(None, &[HostEntry::new(format!("{}/mirror/v2", mirror.url())).override_path()]),
    );
    let upstream = FaultProxy::start(f.reg.addr());
    let reference = format!("{}/test/mixed:v1", upstream.host());
    // The hosts dir is keyed by the registry named in the reference.
    std::fs::rename(hosts.dir.join(f.reg.host()), hosts.dir.join(upstream.host())).unwrap();
    let r = Observed::new(with_hosts_dir(options(), &hosts.dir));
    f.ensure_mixed(&f.cache, &r, &reference);
    let reqs = mirror.requests();
    assert!(reqs.iter().all(|q| q.path().starts_with("/mirror/v2/")), "{reqs:?}");
    assert!(reqs.iter().any(|q| q.path().contains("/manifests/")), "{reqs:?}");
    for l in &f.mixed.layers {
        assert_eq!(mirror.count("GET", &l.digest), 1, "{reqs:?}");
        assert_eq!(upstream.count("GET", &l.digest), 0);
    }
    // containerd's ?ns=: a mirror learns which registry the request is for.
    for q in &reqs {
        assert_eq!(q.query_all("ns"), vec![upstream.host()], "{q:?}");
    }
    assert!(r.events.fallbacks().is_empty(), "{:?}", r.events);
}

#[test]
fn all_hosts_failing_is_one_error_naming_each_host() {
    let Some(f) = fixture("all_hosts_failing_is_one_error_naming_each_host", RegistryConfig::plain(), 44) else {
        return;
    };
    let dead = harness::dead_addr();
    let flaky = FaultProxy::start(f.reg.addr());
    flaky.add(harness::Rule {
        method: None,
        path_contains: "/v2/".into(),
        fault: Fault::Status(500, vec![]),
        times: None,
    });
    let upstream = FaultProxy::start(f.reg.addr());
    upstream.add(harness::Rule {
        method: None,
        path_contains: "/v2/".into(),
        fault: Fault::Status(503, vec![]),
        times: None,
    });
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(
        &upstream.host(),
        &harness::hosts_toml(None, &[HostEntry::new(format!("http://{dead}")), HostEntry::new(flaky.url())]),
    );
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    let start = Instant::now();
    let e = must_fail(f.cache.ensure(&r, &format!("{}/test/mixed:v1", upstream.host())), "every host fails");
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());
    match registry_error(&e) {
        Some(Error::AllHostsFailed { failures, .. }) => {
            let names: Vec<&str> = failures.iter().map(|(h, _)| h.as_str()).collect();
            assert_eq!(names, vec![dead.to_string(), flaky.host(), upstream.host()], "{e}");
        }
        other => panic!("not AllHostsFailed: {other:?} / {e}"),
    }
    for h in [dead.to_string(), flaky.host(), upstream.host()] {
        assert!(e.to_string().contains(&h), "{h} not named: {e}");
    }
    // Hosts back: the same cache and fetcher work.
    flaky.clear();
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", upstream.host()));
}

// ---------------------------------------------------------------------------------------
// Faults on the wire

/// A registry behind a fault proxy, the reference naming the proxy.
fn behind_proxy(test: &str, seed: u64) -> Option<(Fx, FaultProxy, String)> {
    let f = fixture(test, RegistryConfig::plain(), seed)?;
    let proxy = FaultProxy::start(f.reg.addr());
    let reference = format!("{}/test/mixed:v1", proxy.host());
    Some((f, proxy, reference))
}

fn big_layer(f: &Fx) -> &harness::BlobInfo {
    f.mixed.layers.iter().max_by_key(|l| l.size).unwrap()
}

#[test]
fn cut_mid_blob_is_resumed() {
    let Some((f, proxy, reference)) = behind_proxy("cut_mid_blob_is_resumed", 50) else { return };
    let big = big_layer(&f).clone();
    assert!(big.size > 200_000);
    proxy.on_get(&big.digest, Fault::CutAfter(100_000), Some(1));
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &reference);
    let resumed = r.events.resumed();
    assert_eq!(resumed.len(), 1, "{:?}", r.events);
    assert_eq!(resumed[0].0, proxy.host());
    assert!(resumed[0].1 > 0 && resumed[0].1 <= 100_000, "{resumed:?}");
    let gets: Vec<harness::Request> =
        proxy.requests().into_iter().filter(|q| q.method == "GET" && q.path().contains(&big.digest)).collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].header("range"), Some(format!("bytes={}-", resumed[0].1).as_str()), "{gets:?}");
    // The cache's own counters saw it too; every byte downloaded once.
    let stats = f.cache.stats();
    assert_eq!(stats.resumed_downloads, 1, "{stats:?}");
    assert!(stats.download_retries >= 1, "{stats:?}");
    assert_eq!(stats.bytes_downloaded, f.mixed.layers.iter().map(|l| l.size).sum::<u64>(), "{stats:?}");
    assert!(stats.prometheus().contains("rootfs_cache_resumed_downloads_total 1\n"), "{}", stats.prometheus());
}

/// Every response cut after 60 000 bytes, `Range` honoured: each request makes progress,
/// so the download completes however many requests it takes (the retry budget is per
/// stretch without progress).
#[test]
fn progressive_cuts_complete() {
    let Some((f, proxy, reference)) = behind_proxy("progressive_cuts_complete", 62) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::CutAfter(60_000), None);
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &reference);
    let n = proxy.count("GET", &big.digest) as u64;
    assert_eq!(n, big.size.div_ceil(60_000), "requests for {} bytes", big.size);
    assert_eq!(r.events.resumed().len() as u64, n - 1, "{:?}", r.events);
}

/// Progress through a cut, a resume that the server answers from byte 0 (Range ignored)
/// and a 503: per layer, `downloaded` only grows, ends at `total` and
/// never passes it; the final state is `Done`.
#[test]
fn progress_through_faults_ends_at_total() {
    use rootfs_cache::{EnsureOptions, EnsureProgress, LayerProgress, LayerState};
    #[derive(Default)]
    struct Log(Mutex<Vec<LayerProgress>>);
    impl EnsureProgress for Log {
        fn layer(&self, l: &LayerProgress) {
            self.0.lock().unwrap().push(l.clone());
        }
    }
    let Some((f, proxy, reference)) = behind_proxy("progress_through_faults_ends_at_total", 67) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::CutAfter(100_000), Some(1));
    proxy.on_get(&big.digest, Fault::IgnoreRange, Some(1));
    let small = f.mixed.layers.iter().min_by_key(|l| l.size).unwrap().clone();
    proxy.on_get(&small.digest, Fault::Status(503, vec![]), Some(1));
    let log = Log::default();
    let r = Registry::new(options()).unwrap();
    let rootfs = f
        .cache
        .ensure_with(&r, &reference, &EnsureOptions::new().with_progress(&log))
        .unwrap_or_else(|e| panic!("{reference}: {e}"));
    harness::assert_same_tree(&reference, &f.reference, rootfs.lowers(), f.scratch());
    let events = log.0.into_inner().unwrap();
    for l in &f.mixed.layers {
        let mine: Vec<&LayerProgress> = events.iter().filter(|e| e.digest.to_string() == l.digest).collect();
        assert!(!mine.is_empty(), "no progress for {}", l.digest);
        let mut last = 0;
        for e in &mine {
            assert!(e.downloaded >= last, "{}: downloaded went back: {mine:#?}", l.digest);
            assert!(e.downloaded <= l.size, "{}: more than the blob: {mine:#?}", l.digest);
            assert_eq!(e.total, l.size, "{}", l.digest);
            last = e.downloaded;
        }
        let end = mine.last().unwrap();
        assert_eq!((end.state, end.downloaded), (LayerState::Done, l.size), "{}: {mine:#?}", l.digest);
    }
}

#[test]
fn server_ignoring_range_is_skipped_forward() {
    let Some((f, proxy, reference)) = behind_proxy("server_ignoring_range_is_skipped_forward", 51) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::CutAfter(150_000), Some(1));
    proxy.on_get(&big.digest, Fault::IgnoreRange, Some(1));
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &reference);
    assert_eq!(proxy.count("GET", &big.digest), 2);
    assert_eq!(r.events.resumed().len(), 1, "{:?}", r.events);
}

#[test]
fn repeated_cuts_end_in_a_typed_error_and_the_cache_stays_usable() {
    let Some((f, proxy, reference)) = behind_proxy("repeated_cuts_end_in_a_typed_error_and_the_cache_stays_usable", 52)
    else {
        return;
    };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::CutAfter(50_000), None);
    proxy.on_get(&big.digest, Fault::IgnoreRange, None);
    let r = Registry::new(options()).unwrap();
    let start = Instant::now();
    let e = must_fail(f.cache.ensure(&r, &reference), "a blob that is always cut");
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    assert_registry_error_naming(&e, &proxy.host());
    let n = proxy.count("GET", &big.digest);
    assert!((2..=10).contains(&n), "{n} attempts");
    proxy.clear();
    f.ensure_mixed(&f.cache, &r, &reference);
}

#[test]
fn status_503_is_retried() {
    let Some((f, proxy, reference)) = behind_proxy("status_503_is_retried", 53) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Status(503, vec![]), Some(2));
    proxy.on_get("/manifests/", Fault::Status(502, vec![]), Some(1));
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &reference);
    assert_eq!(proxy.count("GET", &big.digest), 3);
    assert!(r.events.retries().len() >= 3, "{:?}", r.events);
    assert!(r.events.retries().iter().all(|(h, _)| h == &proxy.host()));
    let stats = f.cache.stats();
    assert_eq!(stats.download_retries, r.events.retries().len() as u64, "{stats:?}");
    assert_eq!(stats.resumed_downloads, 0, "{stats:?}");
}

#[test]
fn status_503_forever_is_a_typed_error_naming_the_host() {
    let Some((f, proxy, reference)) = behind_proxy("status_503_forever_is_a_typed_error_naming_the_host", 54) else {
        return;
    };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Status(503, vec![]), None);
    let r = Registry::new(options()).unwrap();
    let e = must_fail(f.cache.ensure(&r, &reference), "503 forever");
    assert_registry_error_naming(&e, &proxy.host());
    assert!(e.to_string().contains("503"), "{e}");
    let n = proxy.count("GET", &big.digest);
    assert!((2..=4).contains(&n), "{n} attempts with max_retries = 3");
    proxy.clear();
    f.ensure_mixed(&f.cache, &r, &reference);
}

#[test]
fn status_429_honours_retry_after() {
    let Some((f, proxy, reference)) = behind_proxy("status_429_honours_retry_after", 55) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Status(429, vec![("Retry-After".into(), "2".into())]), Some(1));
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &reference);
    let gets: Vec<_> = proxy.requests().into_iter().filter(|q| q.path().contains(&big.digest)).collect();
    assert_eq!(gets.len(), 2);
    assert_eq!(r.events.retries().len(), 1, "{:?}", r.events);
    // The retry waited for Retry-After (timestamps of the proxy's log are not kept: time
    // the whole pull instead, in a second run).
    proxy.on_get(&big.digest, Fault::Status(429, vec![("Retry-After".into(), "2".into())]), Some(1));
    let c2 = f.new_cache("c2");
    let start = Instant::now();
    f.ensure_mixed(&c2, &r, &reference);
    assert!(start.elapsed() >= Duration::from_millis(1900), "Retry-After: 2 not honoured: {:?}", start.elapsed());
}

#[test]
fn stalled_read_times_out_and_is_retried() {
    let Some((f, proxy, reference)) = behind_proxy("stalled_read_times_out_and_is_retried", 56) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Stall { after: 80_000, pause: Duration::from_secs(20) }, Some(1));
    let r = Observed::new(options());
    let start = Instant::now();
    f.ensure_mixed(&f.cache, &r, &reference);
    assert!(start.elapsed() < Duration::from_secs(15), "a stalled read was waited out: {:?}", start.elapsed());
    assert_eq!(proxy.count("GET", &big.digest), 2);
    assert!(!r.events.resumed().is_empty() || !r.events.retries().is_empty(), "{:?}", r.events);
}

/// Registries that answer HEAD on manifests with 405, or without `Docker-Content-Digest`:
/// the tag is fetched with GET and hashed.
#[test]
fn head_refused_or_without_digest_header() {
    let Some((f, proxy, reference)) = behind_proxy("head_refused_or_without_digest_header", 64) else { return };
    let mut problems = Vec::new();
    let cases = [
        ("no Docker-Content-Digest", None, Fault::StripResponseHeader("Docker-Content-Digest".into())),
        ("HEAD answered 405", Some("HEAD".to_string()), Fault::Status(405, vec![])),
    ];
    for (i, (name, method, fault)) in cases.into_iter().enumerate() {
        proxy.clear();
        proxy.reset_log();
        proxy.add(harness::Rule { method, path_contains: "/manifests/".into(), fault, times: None });
        let cache = f.new_cache(&format!("c{i}"));
        let r = Registry::new(options()).unwrap();
        match cache.ensure(&r, &reference) {
            Ok(rootfs) => {
                harness::assert_same_tree(&reference, &f.reference, rootfs.lowers(), f.scratch());
                assert_eq!(rootfs.manifest_digest().to_string(), f.mixed.manifest.digest);
                assert!(proxy.count("GET", "/manifests/v1") >= 1, "{name}: {:#?}", proxy.requests());
            }
            Err(e) => problems.push(format!("{name}: {e}\n{:#?}", proxy.requests())),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A host that never answers the connect (SYNs dropped): the connect timeout ends it, a
/// typed error naming the host, in a bounded time; behind it as a mirror, the registry
/// serves the pull.
#[test]
fn connect_timeout_on_a_blackholed_host() {
    let Some(f) = fixture("connect_timeout_on_a_blackholed_host", RegistryConfig::plain(), 65) else { return };
    let hole = harness::Blackhole::start();
    assert!(hole.hangs(Duration::from_millis(300)), "the blackhole accepts connections");
    let opts = || options().with_connect_timeout(Duration::from_millis(500));
    let r = Registry::new(opts()).unwrap();
    let start = Instant::now();
    let e = must_fail(f.cache.ensure(&r, &format!("{}/test/mixed:v1", hole.addr)), "a blackholed registry");
    let took = start.elapsed();
    assert_registry_error_naming(&e, &hole.addr.to_string());
    // Connect timeout 0.5 s, max_retry_time 8 s.
    assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(15), "{took:?}");
    // As a mirror: left for the registry (mirrors are not retried).
    let upstream = FaultProxy::start(f.reg.addr());
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&upstream.host(), &harness::hosts_toml(None, &[HostEntry::new(format!("http://{}", hole.addr))]));
    // Every request tries the mirror first and waits out its connect timeout (as
    // containerd does): 4 requests here.
    let r = Observed::new(with_hosts_dir(opts(), &hosts.dir));
    let start = Instant::now();
    f.ensure_mixed(&f.new_cache("c2"), &r, &format!("{}/test/mixed:v1", upstream.host()));
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
    assert!(r.events.fallbacks().iter().any(|(h, _)| h == &hole.addr.to_string()), "{:?}", r.events);
}

/// A connection closed without an answer (on the tag's HEAD) is retried; a host where
/// nothing listens is a typed error naming it, soon; a `Retry-After` longer than
/// `max_retry_time` is not waited for.
#[test]
fn hangups_dead_hosts_and_long_retry_after() {
    let Some((f, proxy, reference)) = behind_proxy("hangups_dead_hosts_and_long_retry_after", 59) else { return };
    proxy.add(harness::Rule {
        method: Some("HEAD".into()),
        path_contains: "/manifests/".into(),
        fault: Fault::Hangup,
        times: Some(1),
    });
    let r = Observed::new(options());
    f.ensure_mixed(&f.cache, &r, &reference);
    assert_eq!(r.events.retries().len(), 1, "{:?}", r.events);
    // Nothing listening.
    let dead = harness::dead_addr();
    let start = Instant::now();
    let e = must_fail(f.new_cache("c2").ensure(&r, &format!("{dead}/test/mixed:v1")), "a dead registry");
    assert_registry_error_naming(&e, &dead.to_string());
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    // Retry-After: one hour.
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::Status(429, vec![("Retry-After".into(), "3600".into())]), None);
    let start = Instant::now();
    let e = must_fail(f.new_cache("c3").ensure(&r, &reference), "429 for an hour");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    assert_registry_error_naming(&e, &proxy.host());
    assert!(e.to_string().contains("429"), "{e}");
}

/// A manifest body that stalls (headers sent, then nothing) or is cut short: retried
/// like any other request, within `max_retries`.
#[test]
fn stalled_or_cut_manifest_body_is_retried() {
    let Some((f, proxy, reference)) = behind_proxy("stalled_or_cut_manifest_body_is_retried", 57) else {
        return;
    };
    let mut failures = Vec::new();
    for (i, fault) in
        [Fault::Stall { after: 0, pause: Duration::from_secs(20) }, Fault::CutAfter(10)].into_iter().enumerate()
    {
        proxy.clear();
        proxy.reset_log();
        proxy.on_get("/manifests/", fault.clone(), Some(1));
        let cache = f.new_cache(&format!("c{i}"));
        let r = Observed::new(options());
        let start = Instant::now();
        match cache.ensure(&r, &reference) {
            Ok(rootfs) => {
                assert!(start.elapsed() < Duration::from_secs(15), "{fault:?}: {:?}", start.elapsed());
                harness::assert_same_tree(&reference, &f.reference, rootfs.lowers(), f.scratch());
                assert_eq!(r.events.retries().len(), 1, "{fault:?}: {:?}", r.events);
            }
            Err(e) => {
                // Still typed and naming the host, and the next ensure works.
                assert_registry_error_naming(&e, &proxy.host());
                f.ensure_mixed(&cache, &r, &reference);
                failures.push(format!("{fault:?} (manifest GETs: {}): {e}", proxy.count("GET", "/manifests/")));
            }
        }
    }
    assert!(failures.is_empty(), "manifest body faults not retried:\n{}", failures.join("\n"));
}

/// Blobs are fetched through a repository where the `Registry` saw them. When that
/// repository no longer serves one (its link deleted, as after a `DELETE` or a
/// retention policy), the pull of another repository holding the same blob must still
/// succeed through its own repository; and a pull from a second registry must not
/// depend on the first one (gone here) because it served the same blob before.
#[test]
fn blob_gone_from_the_first_repository_is_fetched_from_the_image_own() {
    let Some(f) =
        fixture("blob_gone_from_the_first_repository_is_fetched_from_the_image_own", RegistryConfig::plain(), 69)
    else {
        return;
    };
    f.reg.push(&f.layout.dir, "mixed", "other/copy", "v2", None, &[]);
    let proxy = FaultProxy::start(f.reg.addr());
    let r = Registry::new(options()).unwrap();
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", proxy.host()));
    // test/mixed loses its link to the big layer; other/copy keeps its own.
    let big = big_layer(&f).clone();
    let mut s = std::net::TcpStream::connect(f.reg.addr()).unwrap();
    use std::io::{Read as _, Write as _};
    write!(s, "DELETE /v2/test/mixed/blobs/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", big.digest).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let r2 = harness::http_get(f.reg.addr(), &format!("/v2/other/copy/blobs/{}", big.digest), &[]).unwrap();
    assert_eq!(r2.status, 200, "other/copy lost the blob too");
    proxy.reset_log();
    let c2 = f.new_cache("c2");
    let result = c2.ensure(&r, &format!("{}/other/copy:v2", proxy.host()));
    let tried: Vec<String> =
        proxy.requests().iter().filter(|q| q.path().contains("/blobs/")).map(|q| q.path().to_string()).collect();
    let mut problems = Vec::new();
    match result {
        Ok(rootfs) => harness::assert_same_tree("other/copy", &f.reference, rootfs.lowers(), f.scratch()),
        Err(e) => problems.push(format!("the image's own repository was not tried: {e}\nblob requests: {tried:#?}")),
    }
    // Across registries: the same image on a second registry, the first one gone.
    let second = RegistryServer::start(RegistryConfig::plain());
    second.push(&f.layout.dir, "mixed", "test/mixed", "v1", None, &[]);
    let first_host = proxy.host();
    drop(proxy);
    let c3 = f.new_cache("c3");
    match c3.ensure(&r, &format!("{}/test/mixed:v1", second.host())) {
        Ok(rootfs) => harness::assert_same_tree("second registry", &f.reference, rootfs.lowers(), f.scratch()),
        Err(e) => problems.push(format!(
            "a pull from {} fetched blobs from {first_host}, where the Registry saw them first: {e}",
            second.host()
        )),
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A tag that does not exist, and a blob deleted from the registry's storage: typed
/// errors naming the host, and the cache is usable afterwards.
#[test]
fn missing_tag_and_deleted_blob_are_typed_errors() {
    let Some(f) = fixture("missing_tag_and_deleted_blob_are_typed_errors", RegistryConfig::plain(), 58) else {
        return;
    };
    let r = Registry::new(options()).unwrap();
    let e = must_fail(f.cache.ensure(&r, &format!("{}/test/mixed:nope", f.reg.host())), "a missing tag");
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    assert!(e.to_string().contains(&f.reg.host()), "{e}");
    let e = must_fail(f.cache.ensure(&r, &format!("{}/test/absent:v1", f.reg.host())), "a missing repository");
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    // Delete a layer blob from the registry (the API, delete is enabled).
    let big = big_layer(&f).clone();
    let mut s = std::net::TcpStream::connect(f.reg.addr()).unwrap();
    use std::io::{Read as _, Write as _};
    write!(s, "DELETE /v2/test/mixed/blobs/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", big.digest).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let e = must_fail(f.cache.ensure(&r, &format!("{}/test/mixed:v1", f.reg.host())), "a deleted blob");
    let text = e.to_string();
    assert!(text.contains(&f.reg.host()) && text.contains(&big.digest), "{text}");
    assert!(matches!(&e, Error::Layer { source, .. } if matches!(**source, Error::NotFound { .. })), "{e:?}");
    // Pushed again: the same cache completes the image.
    f.reg.push(&f.layout.dir, "mixed", "test/mixed", "v1", None, &[]);
    f.ensure_mixed(&f.cache, &r, &format!("{}/test/mixed:v1", f.reg.host()));
}

// ---------------------------------------------------------------------------------------
// Concurrency

/// 8 threads ensure 4 images that share layers (a common base, two middles), in one
/// cache through one `Registry`: every layer blob is downloaded once.
#[test]
fn eight_threads_one_download_per_layer() {
    let test = "eight_threads_one_download_per_layer";
    if !support::require_root(test) || !harness::require(test) {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let t = support::tempdir();
    let mut l = Layout::create(&t.path().join("L"));
    let base = harness::image_layers(60, 400_000);
    let mids = [harness::small_layer("mid-a", 40), harness::small_layer("mid-b", 40)];
    let mut images = Vec::new();
    for i in 0..4 {
        let top = harness::small_layer(&format!("top-{i}"), 10 + i);
        let comp = if i % 2 == 0 { Comp::Gzip } else { Comp::Zstd };
        let img = l.add_image(
            Some(&format!("img{i}")),
            "amd64",
            &[(base[0].clone(), Comp::Gzip), (mids[i % 2].clone(), comp), (top, Comp::Zstd)],
        );
        images.push(img);
    }
    for i in 0..4 {
        // Two repositories: the shared blobs are in both.
        reg.push(&l.dir, &format!("img{i}"), &format!("conc/r{}", i % 2), &format!("t{i}"), None, &[]);
    }
    let proxy = FaultProxy::start(reg.addr());
    let cache = RootfsCache::open(t.path().join("cache"), CacheOptions::default()).unwrap();
    let r = Registry::new(options()).unwrap();
    std::thread::scope(|s| {
        for k in 0..8 {
            let (cache, r, proxy) = (&cache, &r, &proxy);
            s.spawn(move || {
                let i = k % 4;
                let reference = format!("{}/conc/r{}:t{i}", proxy.host(), i % 2);
                let rootfs = cache.ensure(r, &reference).unwrap_or_else(|e| panic!("{reference}: {e}"));
                assert_eq!(rootfs.layers().len(), 3);
            });
        }
    });
    let mut distinct: Vec<&str> = images.iter().flat_map(|i| i.layers.iter().map(|l| l.digest.as_str())).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 1 + 2 + 4);
    for d in distinct {
        assert_eq!(downloads(&proxy, d), 1, "downloads of {d}: {:#?}", proxy.requests());
    }
}

/// 8 threads, one image, its big layer cut once mid-download: one download plus one
/// resumed request for that layer, one for the others.
#[test]
fn eight_threads_with_a_cut_download() {
    let Some((f, proxy, reference)) = behind_proxy("eight_threads_with_a_cut_download", 61) else { return };
    let big = big_layer(&f).clone();
    proxy.on_get(&big.digest, Fault::CutAfter(120_000), Some(1));
    let r = Observed::new(options());
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let rootfs = f.cache.ensure(&r, &reference).unwrap_or_else(|e| panic!("{reference}: {e}"));
                assert_eq!(rootfs.layers().len(), 3);
            });
        }
    });
    for l in &f.mixed.layers {
        assert_eq!(downloads(&proxy, &l.digest), 1, "{:#?}", proxy.requests());
    }
    assert!(proxy.count("GET", &big.digest) >= 2, "{:#?}", proxy.requests());
    assert!(!r.events.resumed().is_empty(), "{:?}", r.events);
    f.ensure_mixed(&f.cache, &r, &reference);
}

/// 8 threads ensure an image with a 3 MiB layer through a mirror that corrupts that
/// layer early (past anything held back): every thread gets the right image, the
/// mirror is asked for the layer once and the registry once, and it is extracted once.
#[test]
fn eight_threads_lying_mirror_big_blob() {
    let Some(f) = fixture("eight_threads_lying_mirror_big_blob", RegistryConfig::plain(), 66) else { return };
    let mut layout = Layout::create(&f.scratch().join("LB"));
    let tars = harness::image_layers(66, 3 << 20);
    let layers: Vec<(Vec<u8>, Comp)> = tars.iter().map(|t| (t.clone(), Comp::Gzip)).collect();
    let image = layout.add_image(Some("big"), "amd64", &layers);
    let big = image.layers.iter().max_by_key(|l| l.size).unwrap().clone();
    assert!(big.size > 2 << 20, "{}", big.size);
    f.reg.push(&layout.dir, "big", "test/big", "v1", None, &[]);
    let reference_tree = layout.umoci_unpack("big", &f.scratch().join("ref-big"));
    let mirror = FaultProxy::start(f.reg.addr());
    mirror.on_get(&big.digest, Fault::Corrupt(5000), None);
    let upstream = FaultProxy::start(f.reg.addr());
    let hosts = HostsDir::new(&f.scratch().join("hosts"));
    hosts.write(&upstream.host(), &harness::hosts_toml(None, &[HostEntry::new(mirror.url())]));
    let reference = format!("{}/test/big:v1", upstream.host());
    let r = Registry::new(with_hosts_dir(options(), &hosts.dir)).unwrap();
    let lowers: Vec<Vec<PathBuf>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let rootfs = f.cache.ensure(&r, &reference).unwrap_or_else(|e| panic!("{reference}: {e}"));
                    rootfs.lowers().to_vec()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(lowers.windows(2).all(|w| w[0] == w[1]));
    harness::assert_same_tree(&reference, &reference_tree, &lowers[0], f.scratch());
    assert_eq!(downloads(&mirror, &big.digest), 1, "{:#?}", mirror.requests());
    assert_eq!(downloads(&upstream, &big.digest), 1, "{:#?}", upstream.requests());
    let stats = f.cache.stats();
    assert_eq!(stats.extractions, image.layers.len() as u64, "{stats:?}");
    for (d, _, _) in f.cache.layers() {
        assert!(image.layers.iter().any(|l| l.digest == d.to_string()), "unexpected layer {d}");
    }
}
