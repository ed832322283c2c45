//! `rootfsctl` and `restore` with `docker://` and `oci:` references, against a real
//! registry (Debian's `docker-registry`, filled by `skopeo`): `ensure`, `create`/`destroy`,
//! `--hosts-dir`, credentials from `REGISTRY_AUTH_FILE`, `stats --prometheus`, and the
//! one-line errors for bad references and unreachable or refusing registries.
//!
//! Needs the tools in `harness::TOOLS`; without them each test skips with a message, or
//! fails when `CI` is set.

#![cfg(feature = "registry")]

mod support;

#[path = "common/registry.rs"]
mod harness;

#[path = "common/rootfsctl.rs"]
mod rootfsctl;

use std::path::Path;

use harness::{Comp, HostEntry, HostsDir, Layout, RegistryConfig, RegistryServer};
use rootfsctl::{Ctl, s};

/// Layers of the test image (`harness::image_layers`).
const LAYERS: usize = 3;

/// A scratch dir with a cache dir and a layout holding `app:v1` (a gzip and a zstd layer).
fn setup(dir: &Path) -> (Ctl, Layout) {
    let mut layout = Layout::create(&dir.join("layout"));
    let tars = harness::image_layers(7, 100_000);
    assert_eq!(tars.len(), LAYERS);
    let layers: Vec<(Vec<u8>, Comp)> =
        tars.iter().enumerate().map(|(i, t)| (t.clone(), if i % 2 == 0 { Comp::Gzip } else { Comp::Zstd })).collect();
    layout.add_image(Some("v1"), "amd64", &layers);
    std::fs::create_dir(dir.join("tmp")).unwrap();
    (Ctl { cache: dir.join("cache"), tmp: dir.join("tmp") }, layout)
}

fn lines(out: &str) -> Vec<String> {
    out.lines().map(str::to_string).collect()
}

/// The single stderr line of a failed run, and its exit code.
fn failure(out: &std::process::Output) -> (i32, String) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure; stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.trim_end().lines().count(), 1, "one line on stderr: {err:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout after a failure");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn ensure_docker_ref_matches_the_layout_and_pins_by_digest() {
    if !harness::require("ensure_docker_ref_matches_the_layout_and_pins_by_digest") {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let dir = support::tempdir();
    let (ctl, layout) = setup(dir.path());
    reg.push(&layout.dir, "v1", "team/app", "v1", None, &[]);

    let pulled = lines(&ctl.cached(&["ensure", &format!("docker://{}/team/app:v1", reg.host())]));
    assert_eq!(pulled.len(), LAYERS, "{pulled:?}");
    // The same layers, ensured from the layout (skopeo's `oci:` spelling): a cache hit,
    // the same lower dirs.
    let from_layout = lines(&ctl.cached(&["ensure", &format!("oci:{}:v1", layout.dir.display())]));
    assert_eq!(pulled, from_layout);
    let bare = lines(&ctl.cached(&["ensure", &format!("{}:v1", layout.dir.display())]));
    assert_eq!(pulled, bare);

    // By digest, with the registry gone: served from the cache, no request.
    let raw = reg.inspect_raw("team/app", "v1", None);
    let digest = support::sha256_digest(raw.as_bytes());
    let host = reg.host();
    drop(reg);
    let pinned = lines(&ctl.cached(&["ensure", &format!("docker://{host}/team/app@{digest}")]));
    assert_eq!(pinned, pulled);

    let stats = ctl.cached(&["stats", "--prometheus"]);
    assert!(stats.contains("# TYPE rootfs_cache_hits_total counter"), "{stats}");
    assert!(stats.lines().any(|l| l == format!("rootfs_cache_layers {LAYERS}")), "{stats}");
}

#[test]
fn create_and_destroy_from_a_registry() {
    if !harness::require("create_and_destroy_from_a_registry") {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let dir = support::tempdir();
    let (ctl, layout) = setup(dir.path());
    reg.push(&layout.dir, "v1", "app", "v1", None, &[]);
    let ws = dir.path().join("ws");
    ctl.cached(&["create", &format!("docker://{}/app:v1", reg.host()), s(&ws)]);
    assert!(ws.join("workspace.json").is_file());
    let leases = ctl.cached(&["leases"]);
    assert_eq!(leases.lines().count(), 1, "one persisted lease: {leases:?}");
    ctl.cached(&["destroy", s(&ws)]);
    assert!(!ws.exists());
    assert_eq!(ctl.cached(&["leases"]).trim(), "", "lease released");
}

#[test]
fn credentials_from_the_auth_file_and_refusals() {
    if !harness::require("credentials_from_the_auth_file_and_refusals") {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain().htpasswd("alice", "s3cret"));
    let dir = support::tempdir();
    let (ctl, layout) = setup(dir.path());
    reg.push(&layout.dir, "v1", "private/app", "v1", reg.creds().as_deref(), &[]);
    let reference = format!("docker://{}/private/app:v1", reg.host());
    let empty_home = dir.path().join("home");
    std::fs::create_dir(&empty_home).unwrap();

    // No credentials anywhere: one line naming the host, exit 1, nothing cached.
    let out = ctl
        .cached_cmd(&["ensure", &reference])
        .env("HOME", &empty_home)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("DOCKER_CONFIG")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let (code, err) = failure(&out);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&reg.host()), "names the host: {err}");
    assert!(err.to_lowercase().contains("unauthorized") || err.contains("401"), "{err}");

    // containers-auth.json spelling.
    let auth = dir.path().join("auth.json");
    std::fs::write(
        &auth,
        format!(r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#, reg.host(), harness::base64(b"alice:s3cret")),
    )
    .unwrap();
    let out = ctl
        .cached_cmd(&["ensure", &reference])
        .env("HOME", &empty_home)
        .env("REGISTRY_AUTH_FILE", &auth)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), LAYERS);
}

#[test]
fn hosts_dir_mirror_and_usage_errors() {
    if !harness::require("hosts_dir_mirror_and_usage_errors") {
        return;
    }
    let reg = RegistryServer::start(RegistryConfig::plain());
    let dir = support::tempdir();
    let (ctl, layout) = setup(dir.path());
    reg.push(&layout.dir, "v1", "app", "v1", None, &[]);

    // `registry.example` exists only in hosts.toml: its one host is the real registry.
    let hosts = HostsDir::new(&dir.path().join("hosts"));
    hosts.write("registry.example", &harness::hosts_toml(None, &[HostEntry::new(reg.base_url())]));
    let out = ctl.cached(&["--hosts-dir", s(&dir.path().join("hosts")), "ensure", "docker://registry.example/app:v1"]);
    assert_eq!(out.lines().count(), LAYERS, "{out}");

    // Usage errors: one line, exit 2, before anything is opened.
    for args in [
        vec!["ensure", "docker://"],
        vec!["ensure", "docker://127.0.0.1:1/UPPER/case:v1"],
        vec!["ensure", "oci:"],
        vec!["--hosts-dir", "/nonexistent/hosts", "ensure", "docker://127.0.0.1:1/a:v1"],
    ] {
        let out = ctl.cached_output(&args);
        let (code, err) = failure(&out);
        assert_eq!(code, 2, "{args:?}: {err}");
    }

    // A registry nobody listens on: exit 1, the host named.
    let port = harness::free_port();
    let out = ctl.cached_output(&["ensure", &format!("docker://127.0.0.1:{port}/app:v1")]);
    let (code, err) = failure(&out);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
