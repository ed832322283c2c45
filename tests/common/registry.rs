//! A real registry for the tests: Debian's `docker-registry` (distribution 2.8) on a
//! free loopback port, with optional htpasswd, TLS (a CA and server cert made here with
//! the `openssl` CLI) and token auth; OCI image layouts generated here (gzip and zstd
//! layers, multi-platform indexes) and pushed with `skopeo`; containerd-style hosts
//! dirs. Included with `#[path = "common/registry.rs"] mod harness;` next to
//! `mod support;`.
//!
//! - [`RegistryServer`]: the registry process ([`RegistryConfig`]: htpasswd, TLS, token).
//! - [`TokenServer`]: a token endpoint the registry trusts (`auth.token`): checks Basic
//!   credentials, grants the requested scopes, signs RS256 JWTs with `openssl dgst` and
//!   sends the signing certificate as the `x5c` header (distribution 2.8 verifies it
//!   against its `rootcertbundle`; a `kid` would have to be the libtrust key id).
//! - [`FaultProxy`]: a plain-HTTP proxy (thread per connection, one request per
//!   connection) that logs every request and injects [`Fault`]s by [`Rule`]: cut a body
//!   after N bytes, answer a status (503, 429 + `Retry-After`, 401 + a challenge), stall,
//!   drop `Range`, flip a byte, redirect, hang up, refuse; also an "object store" on
//!   another loopback address (`127.0.0.2`) and a mirror under a path prefix.
//! - [`Layout`]: OCI image layouts written by hand (umoci cannot write zstd layers or
//!   indexes), [`image_layers`] for contents with files, dirs, symlinks, hardlinks, a
//!   fifo, whiteouts and an opaque dir; `umoci unpack` of an all-gzip twin is the
//!   reference tree, compared through a read-only overlay mount ([`assert_same_tree`]).
//! - [`HostsDir`], [`hosts_toml`]: containerd's `<dir>/<host:port>/hosts.toml`.
//!
//! # Ownership
//! A [`RegistryServer`] owns its process and its temp dir (config, storage, certs):
//! Drop kills the process (SIGKILL, then waits for it) and removes the dir. A
//! [`TokenServer`] or [`FaultProxy`] stops accepting on drop; connections in flight run
//! to their end on their own threads.
//!
//! Tools: `docker-registry`, `skopeo`, `htpasswd` (apache2-utils), `openssl`; the
//! reference unpacks use `umoci`. [`require`] skips (or fails under `CI`) without them.

#![allow(dead_code)] // each test crate uses a different subset

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Ent, Fmt};
use rootfs_cache::RegistryOptions;

/// Every tool the registry tests use.
pub const TOOLS: &[&str] = &["docker-registry", "skopeo", "htpasswd", "openssl", "umoci"];

/// `Registry` options for tests: short timeouts and backoffs, so that a failing case ends
/// in seconds. The read timeout leaves room for a loaded machine (a spurious timeout would
/// add requests that some tests count).
pub fn options() -> RegistryOptions {
    RegistryOptions::default()
        .with_connect_timeout(Duration::from_secs(2))
        .with_read_timeout(Duration::from_secs(5))
        .with_max_retries(3)
        .with_max_retry_time(Duration::from_secs(8))
        // Never the auth files of whoever runs the tests.
        .with_auth_files(false)
}

/// `true` when the registry tools are installed; otherwise skips (fails under `CI`).
pub fn require(test: &str) -> bool {
    support::require_tools(test, TOOLS)
}

/// Run a command, panicking with its output on failure; returns stdout.
fn run(cmd: &mut Command) -> Vec<u8> {
    support::run(cmd)
}

/// A free TCP port on 127.0.0.1 (bound and released: another process may take it before
/// ours binds it, so starting a server retries).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------
// TLS material

/// A CA and a server certificate for `127.0.0.1` and `localhost` signed by it (EC P-256),
/// PEM files in `dir`.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Tls {
    pub fn generate(dir: &Path) -> Tls {
        std::fs::create_dir_all(dir).unwrap();
        let p = |n: &str| dir.join(n);
        let ossl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(dir));
        };
        ossl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"]);
        ossl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            "2",
            "-subj",
            "/CN=rootfs-cache test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.crt",
        ]);
        ossl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key"]);
        ossl(&["req", "-new", "-key", "server.key", "-subj", "/CN=localhost", "-out", "server.csr"]);
        std::fs::write(
            p("server.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        ossl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-sha256",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        Tls { ca_cert: p("ca.crt"), ca_key: p("ca.key"), server_cert: p("server.crt"), server_key: p("server.key") }
    }
}

// ---------------------------------------------------------------------------------------
// The registry process

/// Token auth settings for the registry's `auth.token` section.
#[derive(Clone, Debug)]
pub struct TokenConfig {
    /// The token endpoint (`http://127.0.0.1:PORT/token`).
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// PEM certificate(s) whose keys sign the tokens.
    pub root_cert_bundle: PathBuf,
}

/// How to run the registry.
#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    /// htpasswd auth with these credentials.
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with a CA made for this registry.
    pub tls: bool,
    /// Token auth (Bearer), verified by the registry.
    pub token: Option<TokenConfig>,
}

impl RegistryConfig {
    pub fn plain() -> RegistryConfig {
        RegistryConfig::default()
    }
    pub fn htpasswd(mut self, user: &str, pass: &str) -> RegistryConfig {
        self.htpasswd = Some((user.into(), pass.into()));
        self
    }
    pub fn tls(mut self) -> RegistryConfig {
        self.tls = true;
        self
    }
    pub fn token(mut self, t: TokenConfig) -> RegistryConfig {
        self.token = Some(t);
        self
    }
}

/// A running `docker-registry`; killed on drop.
pub struct RegistryServer {
    dir: tempfile::TempDir,
    child: Child,
    pub port: u16,
    pub config: RegistryConfig,
    pub tls: Option<Tls>,
}

impl RegistryServer {
    /// Start a registry and wait until `/v2/` answers (at most 20 s).
    pub fn start(config: RegistryConfig) -> RegistryServer {
        let dir = support::tempdir();
        let tls = config.tls.then(|| Tls::generate(&dir.path().join("tls")));
        if let Some((user, pass)) = &config.htpasswd {
            let out = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            std::fs::write(dir.path().join("htpasswd"), out).unwrap();
        }
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let yaml = Self::yaml(dir.path(), port, &config, tls.as_ref());
            let cfg = dir.path().join("config.yml");
            std::fs::write(&cfg, yaml).unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn docker-registry: {e}"));
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            match wait_ready(&mut child, addr, tls.is_some(), Duration::from_secs(20)) {
                Ok(()) => return RegistryServer { dir, child, port, config, tls },
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
                    last_log = format!("{why}; log:\n{log}");
                }
            }
        }
        panic!("docker-registry did not start: {last_log}");
    }

    fn yaml(dir: &Path, port: u16, config: &RegistryConfig, tls: Option<&Tls>) -> String {
        let mut y = String::new();
        writeln!(y, "version: 0.1").unwrap();
        writeln!(y, "log:\n  level: info\n  accesslog:\n    disabled: false").unwrap();
        writeln!(y, "storage:\n  filesystem:\n    rootdirectory: {}", dir.join("data").display()).unwrap();
        writeln!(y, "  delete:\n    enabled: true").unwrap();
        writeln!(y, "  maintenance:\n    uploadpurging:\n      enabled: false").unwrap();
        writeln!(y, "http:\n  addr: 127.0.0.1:{port}\n  secret: rootfs-cache-test-secret").unwrap();
        if let Some(t) = tls {
            writeln!(y, "  tls:\n    certificate: {}\n    key: {}", t.server_cert.display(), t.server_key.display())
                .unwrap();
        }
        if config.htpasswd.is_some() {
            writeln!(
                y,
                "auth:\n  htpasswd:\n    realm: rootfs-cache-test\n    path: {}",
                dir.join("htpasswd").display()
            )
            .unwrap();
        } else if let Some(t) = &config.token {
            writeln!(
                y,
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}",
                t.realm,
                t.service,
                t.issuer,
                t.root_cert_bundle.display()
            )
            .unwrap();
        }
        y
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// The CA that signed the server certificate (TLS only).
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_cert.as_path())
    }

    /// `user:pass` when the registry wants credentials.
    pub fn creds(&self) -> Option<String> {
        self.config.htpasswd.as_ref().map(|(u, p)| format!("{u}:{p}"))
    }

    /// The registry's log so far (stdout and stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A scratch dir that lives as long as the server.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `skopeo copy oci:LAYOUT:TAG docker://HOST/REPO:DEST_TAG` with the credentials
    /// `creds` (`user:pass`, e.g. [`creds`](Self::creds)); `--all` copies an index with
    /// every platform. Digests are preserved (skopeo fails rather than rewrite).
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, dest_tag: &str, creds: Option<&str>, extra: &[&str]) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--quiet", "--all", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.arg("--dest-creds").arg(c);
        }
        cmd.args(extra);
        cmd.arg(format!("oci:{}:{tag}", layout.display()));
        cmd.arg(format!("docker://{}/{repo}:{dest_tag}", self.host()));
        // skopeo may want a writable home for its auth file lookups.
        cmd.env("HOME", self.dir.path());
        let out = cmd.output().unwrap_or_else(|e| panic!("spawn skopeo: {e}"));
        assert!(
            out.status.success(),
            "skopeo push {tag} → {repo}:{dest_tag} failed: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log(), 4000)
        );
    }

    /// `skopeo inspect --raw docker://HOST/REPO:TAG`: the manifest (or index) as stored.
    pub fn inspect_raw(&self, repo: &str, tag: &str, creds: Option<&str>) -> String {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "inspect", "--raw", "--tls-verify=false"]);
        if let Some(c) = creds {
            cmd.arg("--creds").arg(c);
        }
        cmd.arg(format!("docker://{}/{repo}:{tag}", self.host()));
        cmd.env("HOME", self.dir.path());
        String::from_utf8(run(&mut cmd)).unwrap()
    }

    /// The registry's storage: blob data files (for tests that damage them).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join("data/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }
}

/// Wait until the registry on `addr` answers `/v2/` (200, or 401 with auth).
fn wait_ready(child: &mut Child, addr: SocketAddr, tls: bool, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("docker-registry exited with {status}"));
        }
        if tls {
            // Go's ListenAndServeTLS loads the certificate before it listens.
            if TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
        } else if let Ok(resp) = http_get(addr, "/v2/", &[]) {
            if resp.status == 200 || resp.status == 401 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("no answer on /v2/".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (plain TCP), for readiness checks and the proxy tests

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET path` on `addr` over plain HTTP, `Connection: close`, reading to EOF.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        write!(req, "{k}: {v}\r\n").unwrap();
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| std::io::Error::other("malformed HTTP response"))
}

/// Parse a complete `Connection: close` response (chunked bodies decoded).
pub fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    }
    Some(Response { status, headers, body })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let e = find(b, b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..e]).ok()?.split(';').next()?.trim(), 16).ok()?;
        b = &b[e + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------
// OCI image layouts

/// How a generated layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    Gzip,
    Zstd,
    None,
}

impl Comp {
    fn media_type(self) -> &'static str {
        match self {
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
    fn compress(self, tar: &[u8]) -> Vec<u8> {
        match self {
            Comp::Gzip => support::gzip(tar),
            Comp::Zstd => support::zstd(tar),
            Comp::None => tar.to_vec(),
        }
    }
}

/// A blob written to a layout.
#[derive(Clone, Debug)]
pub struct BlobInfo {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

impl BlobInfo {
    fn descriptor_json(&self, extra: &str) -> String {
        format!(r#"{{"mediaType":"{}","digest":"{}","size":{}{extra}}}"#, self.media_type, self.digest, self.size)
    }
}

/// One image written to a layout: its manifest and its layer blobs (bottom first).
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub manifest: BlobInfo,
    pub config: BlobInfo,
    pub layers: Vec<BlobInfo>,
    pub arch: String,
}

/// An OCI image layout being written (by hand: umoci cannot write zstd layers or indexes).
pub struct Layout {
    pub dir: PathBuf,
    /// `index.json` entries: (descriptor JSON without the closing brace, tag).
    refs: Vec<(BlobInfo, String)>,
}

impl Layout {
    pub fn create(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let l = Layout { dir: dir.to_path_buf(), refs: Vec::new() };
        l.write_index();
        l
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
    }

    pub fn put_blob(&self, data: &[u8], media_type: &str) -> BlobInfo {
        let digest = support::sha256_digest(data);
        std::fs::write(self.blob_path(&digest), data).unwrap();
        BlobInfo { digest, size: data.len() as u64, media_type: media_type.into() }
    }

    /// Write an image for `arch` (linux) with these layers (bottom first); tag it `tag`
    /// when given.
    pub fn add_image(&mut self, tag: Option<&str>, arch: &str, layers: &[(Vec<u8>, Comp)]) -> ImageInfo {
        let mut blobs = Vec::new();
        let mut diff_ids = Vec::new();
        for (tar, comp) in layers {
            diff_ids.push(format!("\"{}\"", support::sha256_digest(tar)));
            blobs.push(self.put_blob(&comp.compress(tar), comp.media_type()));
        }
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","config":{{"Env":["PATH=/usr/bin:/bin"]}},"rootfs":{{"type":"layers","diff_ids":[{}]}},"history":[]}}"#,
            diff_ids.join(",")
        );
        let config = self.put_blob(config.as_bytes(), "application/vnd.oci.image.config.v1+json");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[{}]}}"#,
            config.descriptor_json(""),
            blobs.iter().map(|b| b.descriptor_json("")).collect::<Vec<_>>().join(",")
        );
        let manifest = self.put_blob(manifest.as_bytes(), "application/vnd.oci.image.manifest.v1+json");
        if let Some(tag) = tag {
            self.tag(&manifest, tag);
        }
        ImageInfo { manifest, config, layers: blobs, arch: arch.into() }
    }

    /// The same layer tars as an all-gzip image tagged `tag` (same diff_ids, so the same
    /// tree), for `umoci unpack`, which cannot read zstd layers.
    pub fn add_reference_twin(&mut self, tag: &str, arch: &str, tars: &[Vec<u8>]) -> ImageInfo {
        let layers: Vec<(Vec<u8>, Comp)> = tars.iter().map(|t| (t.clone(), Comp::Gzip)).collect();
        self.add_image(Some(tag), arch, &layers)
    }

    /// Write an image index of `images` (linux, their arch), tagged `tag`.
    pub fn add_index(&mut self, tag: &str, images: &[&ImageInfo]) -> BlobInfo {
        let entries: Vec<String> = images
            .iter()
            .map(|i| {
                i.manifest.descriptor_json(&format!(r#","platform":{{"architecture":"{}","os":"linux"}}"#, i.arch))
            })
            .collect();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        );
        let index = self.put_blob(index.as_bytes(), "application/vnd.oci.image.index.v1+json");
        self.tag(&index, tag);
        index
    }

    pub fn tag(&mut self, blob: &BlobInfo, tag: &str) {
        self.refs.retain(|(_, t)| t != tag);
        self.refs.push((blob.clone(), tag.into()));
        self.write_index();
    }

    fn write_index(&self) {
        let entries: Vec<String> = self
            .refs
            .iter()
            .map(|(b, t)| {
                b.descriptor_json(&format!(r#","annotations":{{"org.opencontainers.image.ref.name":"{t}"}}"#))
            })
            .collect();
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, entries.join(","));
        let tmp = self.dir.join("index.json.tmp");
        std::fs::write(&tmp, index).unwrap();
        std::fs::rename(tmp, self.dir.join("index.json")).unwrap();
    }

    /// `umoci unpack` of `tag` (an image manifest, not an index) into `dest`; returns
    /// the rootfs path. umoci 0.4 reads gzip and plain layers only: for an image with
    /// zstd layers, unpack its twin from [`add_reference_twin`](Self::add_reference_twin).
    pub fn umoci_unpack(&self, tag: &str, dest: &Path) -> PathBuf {
        run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", self.dir.display())).arg(dest));
        dest.join("rootfs")
    }
}

// ---------------------------------------------------------------------------------------
// Generated layer contents

/// The layer tars of a test image (bottom first), `seed` varying every file's content so
/// images built from different seeds share no layer. Files of several sizes (one of
/// `big` bytes, for tests that cut a download midway), directories with odd modes and
/// owners, symlinks (relative, absolute, dangling), hardlinks, a fifo, and in the upper
/// layers whiteouts, an opaque directory and a file replaced by a directory.
pub fn image_layers(seed: u64, big: usize) -> Vec<Vec<u8>> {
    let t = 1_650_000_000 + seed as i64;
    let base = vec![
        Ent::dir("etc").mtime(t, 0),
        Ent::file("etc/hostname", format!("host-{seed}\n")).mtime(t, 0),
        Ent::file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n").mtime(t, 0),
        Ent::hardlink("etc/passwd-", "etc/passwd"),
        Ent::file("etc/shadow", b"root:*::::::\n").mode(0o640).owner(0, 42).mtime(t, 0),
        Ent::dir("usr").mtime(t, 0),
        Ent::dir("usr/bin").mtime(t, 0),
        Ent::file("usr/bin/tool", support::pseudo_random(seed * 10 + 1, 50_000)).mode(0o755).mtime(t, 0),
        Ent::hardlink("usr/bin/tool-hl", "usr/bin/tool"),
        Ent::file("usr/bin/suid", b"#!/bin/sh\n").mode(0o4755).owner(1000, 1000).mtime(t, 0),
        Ent::dir("usr/lib").mtime(t, 0),
        Ent::file("usr/lib/big.so", support::pseudo_random(seed * 10 + 2, big)).mtime(t, 0),
        Ent::file("usr/lib/other", b"other").mtime(t, 0),
        Ent::symlink("bin", "usr/bin").mtime(t, 0),
        Ent::symlink("abs", "/etc/passwd").mtime(t, 0),
        Ent::symlink("dangling", "../../nowhere").mtime(t, 0),
        Ent::dir("opt").mtime(t, 0),
        Ent::dir("opt/old").mtime(t, 0),
        Ent::file("opt/old/a", b"a").mtime(t, 0),
        Ent::file("opt/old/b", b"b").mode(0o600).mtime(t, 0),
        Ent::file("replaceme", b"a file for now").mtime(t, 0),
        Ent::dir("home").mtime(t, 0),
        Ent::dir("home/user").mode(0o700).owner(1000, 1000).mtime(t, 0),
        Ent::file("home/user/.profile", b"export A=1\n").owner(1000, 1000).mtime(t, 0),
        Ent::dir("tmp").mode(0o1777).mtime(t, 0),
        Ent::dir("run").mtime(t, 0),
        Ent::fifo("run/fifo").mtime(t, 0),
    ];
    let t1 = t + 1000;
    let middle = vec![
        Ent::dir("etc").mtime(t1, 0),
        Ent::whiteout("etc/passwd-"),
        Ent::file("etc/hostname", format!("host-{seed}-v2\n")).mtime(t1, 0),
        Ent::dir("opt").mtime(t1, 0),
        Ent::dir("opt/old").mode(0o750).mtime(t1, 0),
        Ent::opaque("opt/old"),
        Ent::file("opt/old/new1", b"new1").mtime(t1, 0),
        Ent::whiteout("replaceme"),
        Ent::dir("replaceme").mtime(t1, 0),
        Ent::file("replaceme/inner", b"inner").mtime(t1, 0),
        Ent::dir("data").mtime(t1, 0),
        Ent::file("data/x", support::pseudo_random(seed * 10 + 3, 30_000)).mtime(t1, 0),
        Ent::hardlink("data/y", "data/x"),
    ];
    let t2 = t + 2000;
    let top = vec![
        Ent::whiteout("home"),
        Ent::whiteout("dangling"),
        Ent::dir("usr").mtime(t2, 0),
        Ent::dir("usr/lib").mtime(t2, 0),
        Ent::whiteout("usr/lib/other"),
        Ent::file("usr/lib/fresh", format!("fresh {seed}")).mtime(t2, 0),
        Ent::dir("a").mtime(t2, 0),
        Ent::dir("a/b").mtime(t2, 0),
        Ent::file("a/b/deep", b"deep").mtime(t2, 0),
    ];
    vec![support::tar_of(&base, Fmt::Pax), support::tar_of(&middle, Fmt::Gnu), support::tar_of(&top, Fmt::Pax)]
}

fn name_seed(name: &str) -> u64 {
    u64::from_str_radix(&support::sha256_hex(name.as_bytes())[..12], 16).unwrap()
}

/// A layer of `n` files (for images that share their base with others): `shared/<name>/…`.
pub fn small_layer(name: &str, n: usize) -> Vec<u8> {
    let mut ents = vec![Ent::dir("shared"), Ent::dir(&format!("shared/{name}"))];
    for i in 0..n {
        ents.push(Ent::file(
            &format!("shared/{name}/f{i}"),
            support::pseudo_random(name_seed(name) + i as u64, 5_000 + i * 100),
        ));
    }
    support::tar_of(&ents, Fmt::Pax)
}

// ---------------------------------------------------------------------------------------
// containerd hosts dirs

/// A containerd hosts directory: `<dir>/<host[:port]>/hosts.toml`.
pub struct HostsDir {
    pub dir: PathBuf,
}

impl HostsDir {
    pub fn new(dir: &Path) -> HostsDir {
        std::fs::create_dir_all(dir).unwrap();
        HostsDir { dir: dir.to_path_buf() }
    }

    /// Write `<dir>/<namespace>/hosts.toml` (`namespace` is `host:port` or `_default`).
    pub fn write(&self, namespace: &str, toml: &str) -> PathBuf {
        let d = self.dir.join(namespace);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("hosts.toml");
        std::fs::write(&p, toml).unwrap();
        p
    }

    /// Copy a file (a CA, say) into the namespace dir; returns its path.
    pub fn put_file(&self, namespace: &str, name: &str, from: &Path) -> PathBuf {
        let d = self.dir.join(namespace);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        std::fs::copy(from, &p).unwrap();
        p
    }
}

/// One `[host."URL"]` entry of a hosts.toml.
#[derive(Clone, Debug, Default)]
pub struct HostEntry {
    pub url: String,
    pub capabilities: Vec<&'static str>,
    pub ca: Option<PathBuf>,
    pub skip_verify: Option<bool>,
    pub override_path: bool,
    pub headers: Vec<(String, String)>,
}

impl HostEntry {
    pub fn new(url: impl Into<String>) -> HostEntry {
        HostEntry { url: url.into(), capabilities: vec!["pull", "resolve"], ..HostEntry::default() }
    }
    pub fn ca(mut self, p: &Path) -> HostEntry {
        self.ca = Some(p.to_path_buf());
        self
    }
    pub fn skip_verify(mut self, v: bool) -> HostEntry {
        self.skip_verify = Some(v);
        self
    }
    pub fn capabilities(mut self, c: &[&'static str]) -> HostEntry {
        self.capabilities = c.to_vec();
        self
    }
    pub fn override_path(mut self) -> HostEntry {
        self.override_path = true;
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> HostEntry {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// The text of a hosts.toml: `server` (if any), then the host entries in order.
pub fn hosts_toml(server: Option<&str>, hosts: &[HostEntry]) -> String {
    let mut s = String::new();
    if let Some(server) = server {
        writeln!(s, "server = \"{server}\"\n").unwrap();
    }
    for h in hosts {
        writeln!(s, "[host.\"{}\"]", h.url).unwrap();
        let caps: Vec<String> = h.capabilities.iter().map(|c| format!("\"{c}\"")).collect();
        writeln!(s, "  capabilities = [{}]", caps.join(", ")).unwrap();
        if let Some(ca) = &h.ca {
            writeln!(s, "  ca = \"{}\"", ca.display()).unwrap();
        }
        if let Some(v) = h.skip_verify {
            writeln!(s, "  skip_verify = {v}").unwrap();
        }
        if h.override_path {
            writeln!(s, "  override_path = true").unwrap();
        }
        if !h.headers.is_empty() {
            writeln!(s, "  [host.\"{}\".header]", h.url).unwrap();
            for (k, v) in &h.headers {
                writeln!(s, "    {k} = \"{v}\"").unwrap();
            }
        }
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------
// Small encoders

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// base64url without padding (JWT segments).
pub fn base64url(data: &[u8]) -> String {
    base64(data).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

/// `Basic base64(user:pass)`.
pub fn basic_auth(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}

/// Decode `%XX` escapes and `+` in a query component.
fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 request reading (server side)

/// A request as a test server saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    /// Every value of query parameter `key`, decoded.
    pub fn query_all(&self, key: &str) -> Vec<String> {
        let Some((_, q)) = self.target.split_once('?') else { return Vec::new() };
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| url_decode(v))
            .collect()
    }
}

/// Read one request head from `s` (the body, if any, is left unread). `None` at EOF
/// before a request starts or on garbage.
fn read_request(s: &mut TcpStream) -> Option<(Request, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(e) = find(&buf, b"\r\n\r\n") {
            break e;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = buf[end + 4..].to_vec();
    Some((Request { method, target, headers }, rest))
}

fn write_response(s: &mut TcpStream, status: u16, reason: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        write!(head, "{k}: {v}\r\n").unwrap();
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

/// Accept connections on `listener` until `stop`, one thread per connection.
fn serve(
    listener: TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    listener.set_nonblocking(true).unwrap();
    let handle = std::sync::Arc::new(handle);
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let h = handle.clone();
                    std::thread::spawn(move || h(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Token auth: an issuer the registry trusts

/// What the token endpoint does.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// Basic credentials the endpoint accepts; `None`: anyone, anonymous included.
    pub creds: Option<(String, String)>,
    /// Anonymous requests get a token (with pull access only) even when `creds` is set.
    pub anonymous_pull: bool,
    /// `expires_in` of issued tokens (seconds).
    pub expires_in: u64,
    /// Name the token under `access_token` instead of `token`.
    pub access_token_field: bool,
    /// Sign the first this many tokens with a key the registry does not trust (it
    /// rejects them with 401); see also [`TokenServer::set_bad_tokens`].
    pub bad_tokens: usize,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy { creds: None, anonymous_pull: false, expires_in: 300, access_token_field: false, bad_tokens: 0 }
    }
}

/// A token endpoint (`GET /token?service=…&scope=…`) that checks Basic credentials and
/// signs RS256 JWTs the registry verifies: the header carries the signing certificate
/// (`x5c`), which the registry's `rootcertbundle` holds. Stops on drop.
pub struct TokenServer {
    pub addr: SocketAddr,
    pub service: String,
    pub issuer: String,
    pub cert: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Every request the endpoint got.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
    bad_tokens: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(policy: TokenPolicy) -> TokenServer {
        let dir = support::tempdir();
        let key = dir.path().join("token.key");
        let cert = dir.path().join("token.crt");
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2"])
            .args(["-subj", "/CN=rootfs-cache test token issuer"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = run(Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert));
        let x5c = base64(&der);
        // A second issuer the registry does not know, for rejected tokens.
        let bad_key = dir.path().join("bad.key");
        let bad_cert = dir.path().join("bad.crt");
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2"])
            .args(["-subj", "/CN=an issuer nobody trusts"])
            .arg("-keyout")
            .arg(&bad_key)
            .arg("-out")
            .arg(&bad_cert));
        let bad_x5c = base64(&run(Command::new("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&bad_cert)));
        let bad_tokens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(policy.bad_tokens));
        let bad_left = bad_tokens.clone();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let service = "rootfs-cache-test-registry".to_string();
        let issuer = "rootfs-cache-test-issuer".to_string();
        let (svc, iss, reqs) = (service.clone(), issuer.clone(), requests.clone());
        serve(listener, stop.clone(), move |mut s| {
            let Some((req, _)) = read_request(&mut s) else { return };
            reqs.lock().unwrap().push(req.clone());
            let authorized = match (&policy.creds, req.header("authorization")) {
                (None, _) => Some(String::new()),
                (Some((u, p)), Some(h)) if h == basic_auth(u, p) => Some(u.clone()),
                (Some(_), Some(_)) => None,
                (Some(_), None) if policy.anonymous_pull => Some(String::new()),
                (Some(_), None) => None,
            };
            let Some(subject) = authorized else {
                write_response(
                    &mut s,
                    401,
                    "Unauthorized",
                    &[("Content-Type", "application/json".into())],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                );
                return;
            };
            if req.query_all("service").first() != Some(&svc) {
                write_response(&mut s, 400, "Bad Request", &[], b"unknown service");
                return;
            }
            let anonymous = subject.is_empty() && policy.creds.is_some();
            let mut access = Vec::new();
            for scope in
                req.query_all("scope").iter().flat_map(|s| s.split(' ').map(str::to_string).collect::<Vec<_>>())
            {
                // type:name:actions, the name possibly holding ':' (never in repositories).
                let Some((typ, rest)) = scope.split_once(':') else { continue };
                let Some((name, actions)) = rest.rsplit_once(':') else { continue };
                let actions: Vec<String> =
                    actions.split(',').filter(|a| !anonymous || *a == "pull").map(|a| format!("\"{a}\"")).collect();
                access.push(format!(r#"{{"type":"{typ}","name":"{name}","actions":[{}]}}"#, actions.join(",")));
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let bad = bad_left
                .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| {
                    n.checked_sub(1)
                })
                .is_ok();
            let (key, x5c) = if bad { (&bad_key, &bad_x5c) } else { (&key, &x5c) };
            let header = format!(r#"{{"typ":"JWT","alg":"RS256","x5c":["{x5c}"]}}"#);
            let claims = format!(
                r#"{{"iss":"{iss}","sub":"{subject}","aud":"{svc}","exp":{},"nbf":{},"iat":{now},"jti":"{now}-{}","access":[{}]}}"#,
                now + policy.expires_in,
                now - 5,
                std::process::id(),
                access.join(",")
            );
            let signing_input = format!("{}.{}", base64url(header.as_bytes()), base64url(claims.as_bytes()));
            let sig = sign_rs256(key, signing_input.as_bytes());
            let jwt = format!("{signing_input}.{}", base64url(&sig));
            let field = if policy.access_token_field { "access_token" } else { "token" };
            let body = format!(r#"{{"{field}":"{jwt}","expires_in":{}}}"#, policy.expires_in);
            write_response(&mut s, 200, "OK", &[("Content-Type", "application/json".into())], body.as_bytes());
        });
        TokenServer { addr, service, issuer, cert, stop, requests, bad_tokens, _dir: dir }
    }

    /// The registry's `auth.token` settings for this issuer.
    pub fn registry_config(&self) -> TokenConfig {
        TokenConfig {
            realm: format!("http://{}/token", self.addr),
            service: self.service.clone(),
            issuer: self.issuer.clone(),
            root_cert_bundle: self.cert.clone(),
        }
    }

    /// Sign the next `n` tokens with the untrusted key.
    pub fn set_bad_tokens(&self, n: usize) {
        self.bad_tokens.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Requests the endpoint got so far.
    pub fn request_count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// RSASSA-PKCS1-v1_5 with SHA-256 (`RS256`) by the openssl CLI.
fn sign_rs256(key: &Path, data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "openssl dgst -sign: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

// ---------------------------------------------------------------------------------------
// A fault-injecting HTTP proxy

/// An address where nothing listens (connections are refused): a dead mirror.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// What the proxy does to a request that a [`Rule`] matches.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward, but close the connection after `n` bytes of the response body.
    CutAfter(usize),
    /// Answer this status with these headers (and a short body) instead of forwarding.
    Status(u16, Vec<(String, String)>),
    /// Forward; after `after` bytes of the body send nothing for `pause`, then go on.
    Stall { after: usize, pause: Duration },
    /// Forward without the request's `Range` header: a server that ignores Range (200,
    /// the whole blob).
    IgnoreRange,
    /// Forward, flipping every bit of the body byte at this offset (a lying mirror).
    Corrupt(usize),
    /// Answer `307 Temporary Redirect` to this base URL + the request target.
    Redirect(String),
    /// Close the connection without answering.
    Hangup,
    /// Forward, removing this header (any case) from the response.
    StripResponseHeader(String),
}

/// A fault for requests whose method is `method` (any when `None`) and whose path
/// contains `path_contains`; applied `times` times (always when `None`).
#[derive(Clone, Debug)]
pub struct Rule {
    pub method: Option<String>,
    pub path_contains: String,
    pub fault: Fault,
    pub times: Option<usize>,
}

struct ProxyState {
    upstream: SocketAddr,
    /// `Authorization` sent upstream instead of the client's (`None`: the client's).
    upstream_auth: Option<String>,
    rules: std::sync::Mutex<Vec<Rule>>,
    log: std::sync::Mutex<Vec<Request>>,
    refusing: std::sync::atomic::AtomicBool,
    /// Served under this path prefix only (stripped before forwarding).
    prefix: std::sync::Mutex<Option<String>>,
}

/// A plain-HTTP proxy in front of a registry (or anything HTTP), one request per
/// connection, that logs every request and injects [`Fault`]s by rule. Stops accepting
/// on drop (connections in flight finish).
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: std::sync::Arc<ProxyState>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// A proxy on 127.0.0.1 in front of `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        FaultProxy::start_on([127, 0, 0, 1], upstream, None)
    }

    /// A proxy on `ip` (any 127/8 address: a "different host") in front of `upstream`,
    /// sending `upstream_auth` as the `Authorization` upstream when given (an object
    /// store that authorises its own way) — the client's header is still logged.
    pub fn start_on(ip: [u8; 4], upstream: SocketAddr, upstream_auth: Option<String>) -> FaultProxy {
        let listener = TcpListener::bind(SocketAddr::from((ip, 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(ProxyState {
            upstream,
            upstream_auth,
            rules: std::sync::Mutex::new(Vec::new()),
            log: std::sync::Mutex::new(Vec::new()),
            refusing: std::sync::atomic::AtomicBool::new(false),
            prefix: std::sync::Mutex::new(None),
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = state.clone();
        serve(listener, stop.clone(), move |s| proxy_connection(&st, s));
        FaultProxy { addr, state, stop }
    }

    /// `127.0.0.1:PORT` (or the address it was started on).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add(&self, rule: Rule) {
        self.state.rules.lock().unwrap().push(rule);
    }

    /// Add a rule for GETs of paths containing `path_contains`.
    pub fn on_get(&self, path_contains: &str, fault: Fault, times: Option<usize>) {
        self.add(Rule { method: Some("GET".into()), path_contains: path_contains.into(), fault, times });
    }

    /// Remove every rule.
    pub fn clear(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// Accept connections and close them at once (`true`), or serve again.
    pub fn set_refusing(&self, on: bool) {
        self.state.refusing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Serve only requests under `prefix` (e.g. `/mirror/acme`), forwarding them with
    /// the prefix stripped; anything else gets 404. For `override_path` mirrors.
    pub fn set_path_prefix(&self, prefix: &str) {
        *self.state.prefix.lock().unwrap() = Some(prefix.to_string());
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    /// Requests with this method whose path contains `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.state.log.lock().unwrap().iter().filter(|r| r.method == method && r.path().contains(path_contains)).count()
    }

    /// Forget the request log.
    pub fn reset_log(&self) {
        self.state.log.lock().unwrap().clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the rules matching one request do to it.
#[derive(Default)]
struct Effects {
    /// Answered by the proxy (`Status`, `Redirect`, `Hangup`): nothing is forwarded.
    answer: Option<Fault>,
    ignore_range: bool,
    cut: Option<usize>,
    stall: Option<(usize, Duration)>,
    corrupt: Option<usize>,
    strip: Vec<String>,
}

/// The faults for `req`: the first matching rule that answers by itself, if any (and
/// only it is used up); otherwise every matching rule, one per kind (an `IgnoreRange`
/// rule only matches requests that have a `Range`).
fn take_faults(state: &ProxyState, req: &Request) -> Effects {
    let mut rules = state.rules.lock().unwrap();
    let matches = |r: &Rule| {
        r.method.as_deref().is_none_or(|m| m == req.method)
            && req.path().contains(&r.path_contains)
            && r.times.is_none_or(|n| n > 0)
            && (!matches!(r.fault, Fault::IgnoreRange) || req.header("range").is_some())
    };
    let answers = |f: &Fault| matches!(f, Fault::Status(..) | Fault::Redirect(_) | Fault::Hangup);
    let mut fx = Effects::default();
    if let Some(i) = rules.iter().position(|r| matches(r) && answers(&r.fault)) {
        if let Some(n) = &mut rules[i].times {
            *n -= 1;
        }
        fx.answer = Some(rules[i].fault.clone());
        return fx;
    }
    for r in rules.iter_mut().filter(|r| matches(r)) {
        let used = match &r.fault {
            Fault::IgnoreRange if !fx.ignore_range => {
                fx.ignore_range = true;
                true
            }
            Fault::CutAfter(n) if fx.cut.is_none() => {
                fx.cut = Some(*n);
                true
            }
            Fault::Stall { after, pause } if fx.stall.is_none() => {
                fx.stall = Some((*after, *pause));
                true
            }
            Fault::Corrupt(at) if fx.corrupt.is_none() => {
                fx.corrupt = Some(*at);
                true
            }
            Fault::StripResponseHeader(name) => {
                fx.strip.push(name.to_ascii_lowercase());
                true
            }
            _ => false,
        };
        if used {
            if let Some(n) = &mut r.times {
                *n -= 1;
            }
        }
    }
    fx
}

fn proxy_connection(state: &ProxyState, mut client: TcpStream) {
    if state.refusing.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let Some((req, rest)) = read_request(&mut client) else { return };
    state.log.lock().unwrap().push(req.clone());
    let fx = take_faults(state, &req);
    match &fx.answer {
        Some(Fault::Status(code, headers)) => {
            let h: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            // A HEAD answer has no body (its Content-Length would be the GET's).
            let body: &[u8] = if req.method == "HEAD" { b"" } else { b"injected by the test proxy\n" };
            write_response(&mut client, *code, "Injected", &h, body);
            return;
        }
        Some(Fault::Redirect(base)) => {
            write_response(
                &mut client,
                307,
                "Temporary Redirect",
                &[("Location", format!("{base}{}", req.target))],
                b"",
            );
            return;
        }
        Some(Fault::Hangup) => {
            let _ = client.shutdown(std::net::Shutdown::Both);
            return;
        }
        _ => {}
    }
    let mut target = req.target.clone();
    if let Some(prefix) = state.prefix.lock().unwrap().as_deref() {
        match target.strip_prefix(prefix) {
            Some(rest) if rest.starts_with('/') => target = rest.to_string(),
            _ => {
                write_response(&mut client, 404, "Not Found", &[], b"outside the served prefix\n");
                return;
            }
        }
    }
    // The request as forwarded: one request per connection.
    let mut head = format!("{} {target} HTTP/1.1\r\n", req.method);
    let ignore_range = fx.ignore_range;
    for (k, v) in &req.headers {
        let skip = k == "connection"
            || (ignore_range && (k == "range" || k == "if-range"))
            || (k == "authorization" && state.upstream_auth.is_some());
        if !skip {
            write!(head, "{k}: {v}\r\n").unwrap();
        }
    }
    if let Some(a) = &state.upstream_auth {
        write!(head, "authorization: {a}\r\n").unwrap();
    }
    head.push_str("connection: close\r\n\r\n");
    let Ok(mut up) = TcpStream::connect_timeout(&state.upstream, Duration::from_secs(5)) else {
        write_response(&mut client, 502, "Bad Gateway", &[], b"upstream down\n");
        return;
    };
    let _ = up.set_read_timeout(Some(Duration::from_secs(30)));
    if up.write_all(head.as_bytes()).is_err() || up.write_all(&rest).is_err() {
        return;
    }
    let body_len: usize = req.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    if body_len > rest.len() {
        let mut remaining = (&mut client).take((body_len - rest.len()) as u64);
        if std::io::copy(&mut remaining, &mut up).is_err() {
            return;
        }
    }
    // The response head, as is.
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let end = loop {
        if let Some(e) = find(&buf, b"\r\n\r\n") {
            break e + 4;
        }
        match up.read(&mut chunk) {
            Ok(0) | Err(_) => {
                let _ = client.write_all(&buf);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head: Vec<u8> = if fx.strip.is_empty() {
        buf[..end].to_vec()
    } else {
        let text = String::from_utf8_lossy(&buf[..end]);
        text.split_inclusive("\r\n")
            .filter(|line| {
                let name = line.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
                !fx.strip.contains(&name)
            })
            .collect::<String>()
            .into_bytes()
    };
    if client.write_all(&head).is_err() {
        return;
    }
    let mut body = buf[end..].to_vec();
    let mut sent = 0usize;
    let mut stall = fx.stall;
    loop {
        if !body.is_empty() {
            if let Some(at) = fx.corrupt {
                if at >= sent && at < sent + body.len() {
                    body[at - sent] ^= 0xff;
                }
            }
            let mut piece: &[u8] = &body;
            if let Some(n) = fx.cut {
                if sent + piece.len() >= n {
                    let _ = client.write_all(&piece[..n - sent]);
                    let _ = client.flush();
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            if let Some((after, pause)) = stall {
                if sent <= after && sent + piece.len() > after {
                    let k = after - sent;
                    if client.write_all(&piece[..k]).is_err() {
                        return;
                    }
                    let _ = client.flush();
                    std::thread::sleep(pause);
                    sent += k;
                    piece = &piece[k..];
                    // The pause happens once.
                    stall = None;
                }
            }
            if client.write_all(piece).is_err() {
                return;
            }
            sent += piece.len();
            body.clear();
        }
        match up.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = client.flush();
}

// ---------------------------------------------------------------------------------------
// Trees

/// Snapshot of the read-only overlay of `lowers` (top first), mounted in a private mount
/// namespace of a thread of its own (nothing leaks onto the host). Needs root.
pub fn merged_snapshot(lowers: &[PathBuf], scratch: &Path) -> std::collections::BTreeMap<Vec<u8>, support::Node> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let mnt = scratch.join(format!("merged-{}", free_port()));
    std::fs::create_dir_all(&mnt).unwrap();
    let mut lowers = lowers.to_vec();
    // One lower alone cannot be mounted without an upper (nor twice): add an empty one
    // below it.
    if lowers.len() == 1 {
        let empty = scratch.join(format!("empty-lower-{}", free_port()));
        std::fs::create_dir_all(&empty).unwrap();
        lowers.push(empty);
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!("ro,lowerdir={}", lowerdir.join(":"));
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).unwrap();
        mount(Some("overlay"), &mnt, Some("overlay"), MsFlags::MS_RDONLY, Some(opts.as_str()))
            .unwrap_or_else(|e| panic!("mount overlay {opts}: {e}"));
        let snap = support::snapshot(&mnt);
        umount2(&mnt, MntFlags::MNT_DETACH).unwrap();
        snap
    })
    .join()
    .unwrap()
}

/// Xattrs umoci adds on its own (rootless unpacks only).
pub const UMOCI_XATTRS: &[&[u8]] = &[b"user.rootlesscontainers"];

/// Panic unless the overlay of `lowers` shows exactly the tree at `reference` (an
/// `umoci unpack` rootfs): types, contents, links, modes, owners, xattrs, file mtimes,
/// hardlink groups.
pub fn assert_same_tree(what: &str, reference: &Path, lowers: &[PathBuf], scratch: &Path) {
    let cmp = support::Cmp {
        mode: true,
        owner: true,
        xattrs: true,
        mtime: true,
        dir_mtime: false,
        mtime_nsec: false,
        hardlinks: true,
        ignore_xattrs: UMOCI_XATTRS.iter().map(|x| x.to_vec()).collect(),
    };
    let want = support::snapshot(reference);
    assert!(want.len() > 15, "reference tree suspiciously small: {} entries", want.len());
    let got = merged_snapshot(lowers, scratch);
    support::assert_no_diffs(&format!("{what}: pulled vs umoci unpack"), &support::diff_trees(&want, &got, &cmp));
}

// ---------------------------------------------------------------------------------------
// A host that never completes a connection

/// A listening socket whose accept queue is full and never drained: the kernel drops
/// further SYNs, so a connect to [`Blackhole::addr`] hangs until the client's connect
/// timeout (a host behind a firewall that drops packets). Closed on drop.
pub struct Blackhole {
    pub addr: SocketAddr,
    fd: std::os::fd::OwnedFd,
    _fillers: Vec<TcpStream>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        use std::os::fd::{AsRawFd, FromRawFd};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // SAFETY: listen(2) on a socket we own; a backlog of 0 leaves room for one
        // pending connection.
        let r = unsafe { libc::listen(listener.as_raw_fd(), 0) };
        assert_eq!(r, 0, "listen: {}", std::io::Error::last_os_error());
        let mut fillers = Vec::new();
        // Fill the accept queue: connects complete until it is full, then hang.
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => fillers.push(s),
                Err(_) => break,
            }
        }
        // SAFETY: into_raw_fd hands over ownership of the listening socket.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(listener)) };
        Blackhole { addr, fd, _fillers: fillers }
    }

    /// Whether a connect now hangs (for `timeout`) rather than completing or failing.
    pub fn hangs(&self, timeout: Duration) -> bool {
        let _ = &self.fd;
        match TcpStream::connect_timeout(&self.addr, timeout) {
            Err(e) => e.kind() == std::io::ErrorKind::TimedOut || e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }
}
