//! Smoke test of the `Registry` fetcher against a real registry (Debian's
//! `docker-registry`, filled by `skopeo`), reached through the harness's proxy so that
//! every request is counted: a cold `ensure` equals the same image ensured from its OCI
//! layout, and a digest reference already cached makes no request at all.
//!
//! The full suite (auth, TLS, mirrors, faults, concurrency) is `tests/registry.rs`.

#![cfg(feature = "registry")]

mod support;

#[path = "common/registry.rs"]
mod harness;

use rootfs_cache::{CacheOptions, ImageFetcher, OciLayout, Registry, RegistryOptions, RootfsCache};

use harness::{Comp, FaultProxy, Layout, RegistryConfig, RegistryServer};

#[test]
fn cold_ensure_from_registry_equals_layout_and_digest_reensure_is_offline() {
    if !harness::require("cold_ensure_from_registry_equals_layout_and_digest_reensure_is_offline") {
        return;
    }
    let t = support::tempdir();
    let reg = RegistryServer::start(RegistryConfig::plain());
    let mut layout = Layout::create(&t.path().join("L"));
    let tars = harness::image_layers(42, 200_000);
    let image = layout.add_image(
        Some("mixed"),
        "amd64",
        &[(tars[0].clone(), Comp::Gzip), (tars[1].clone(), Comp::Zstd), (tars[2].clone(), Comp::Gzip)],
    );
    reg.push(&layout.dir, "mixed", "smoke/mixed", "v1", None, &[]);
    let proxy = FaultProxy::start(reg.addr());
    let reference = format!("{}/smoke/mixed:v1", proxy.host());

    // Resolution alone: the manifest and the layers the layout has.
    let registry = Registry::new(RegistryOptions::default().with_auth_files(false)).unwrap();
    let from_layout = OciLayout::open(&layout.dir).unwrap().resolve("mixed").unwrap();
    let resolved = registry.resolve(&format!("docker://{reference}")).unwrap();
    assert_eq!(resolved, from_layout);
    assert_eq!(resolved.digest.to_string(), image.manifest.digest);

    // A cold ensure from the registry, and one from the layout in another cache.
    let cache = RootfsCache::open(t.path().join("cache"), CacheOptions::default()).unwrap();
    let rootfs = cache.ensure(&registry, &reference).unwrap();
    let layout_cache = RootfsCache::open(t.path().join("cache2"), CacheOptions::default()).unwrap();
    let local = layout_cache.ensure(&OciLayout::open(&layout.dir).unwrap(), "mixed").unwrap();
    assert_eq!(rootfs.lowers().len(), 3);
    assert_eq!(rootfs.lowers().len(), local.lowers().len());
    // Whiteouts (char 0/0) carry the time they were made, not one from the image.
    let snap = |dir: &std::path::Path| {
        let mut s = support::snapshot(dir);
        for n in s.values_mut().filter(|n| n.rdev == Some((0, 0))) {
            n.mtime = (0, 0);
        }
        s
    };
    for (a, b) in rootfs.lowers().iter().zip(local.lowers()) {
        let diffs = support::diff_trees(&snap(a), &snap(b), &support::Cmp::strict());
        support::assert_no_diffs(&format!("layer {} vs {}", a.display(), b.display()), &diffs);
    }
    for layer in &image.layers {
        assert_eq!(proxy.count("GET", &layer.digest), 1, "one download per layer: {:?}", proxy.requests());
    }
    drop(rootfs);

    // By digest, already cached: no request reaches the registry.
    proxy.reset_log();
    let by_digest = format!("{}/smoke/mixed@{}", proxy.host(), image.manifest.digest);
    let again = cache.ensure(&registry, &by_digest).unwrap();
    assert_eq!(again.lowers().len(), 3);
    assert!(proxy.requests().is_empty(), "requests for a cached digest reference: {:?}", proxy.requests());

    // A fresh Registry (no memory of blobs) against a fresh cache, by digest: works too.
    let fresh = Registry::new(RegistryOptions::default().with_auth_files(false)).unwrap();
    let cache3 = RootfsCache::open(t.path().join("cache3"), CacheOptions::default()).unwrap();
    assert_eq!(cache3.ensure(&fresh, &by_digest).unwrap().lowers().len(), 3);

    // Unknown tag and repository: NotFound, naming the host.
    for missing in [format!("{}/smoke/mixed:nope", proxy.host()), format!("{}/smoke/none:v1", proxy.host())] {
        match registry.resolve(&missing) {
            Err(rootfs_cache::Error::NotFound { what }) => assert!(what.contains(&proxy.host()), "{what}"),
            r => panic!("{missing}: {r:?}"),
        }
    }
}
