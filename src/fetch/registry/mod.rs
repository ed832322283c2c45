//! The registry client: [`Registry`], an [`ImageFetcher`] over the OCI Distribution API.
//!
//! The user-facing documentation (usage, hosts.toml, credentials, security, the choice
//! not to use `oci-spec`) is on [`Registry`], since this module is private and its types
//! are re-exported at the crate root. Layout of the code, one concern per file:
//!
//! | file | concern |
//! |---|---|
//! | `reference.rs` | the docker reference grammar and Docker Hub normalisation (pure) |
//! | `hosts.rs` | containerd's `hosts.toml`: hosts per registry, in order (pure parse + file lookup) |
//! | `auth.rs` | credentials (embedder, auth files, helpers), `WWW-Authenticate`, token cache |
//! | `transport.rs` | one request: auth, redirects by hand, retries with backoff, `Retry-After` |
//! | `blob.rs` | `get_range` (blob bytes from an offset), `read_range` (`read_blob_range`) and the resuming, verifying blob reader |
//! | `mod.rs` | options, resolution (HEAD/GET manifests, index walk), host fallback |

mod auth;
mod blob;
mod hosts;
mod reference;
#[cfg(test)]
mod testutil;
mod transport;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ureq::http::Method;

pub use auth::Credential;
pub use reference::Reference;

use self::transport::{Client, Conn, Exchange, header};
use super::manifest::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Entry, MAX_INDEX_DEPTH, MAX_JSON_BYTES, OCI_INDEX, OCI_MANIFEST, Step,
    declared_kind, step,
};
use super::{Descriptor, FetchObserver, ImageFetcher, ImageManifest, NoObserver, Platform};
use crate::digest::Digest;
use crate::error::{Error, Result};

/// The `Accept` list for manifests: OCI manifest and index, Docker schema 2 manifest and
/// manifest list.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                      application/vnd.docker.distribution.manifest.v2+json, \
                      application/vnd.docker.distribution.manifest.list.v2+json";

/// How a [`Registry`] behaves: hosts configuration, credentials, platform, timeouts and
/// retry bounds. Build it with the `with_*` methods from [`RegistryOptions::default`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RegistryOptions {
    /// containerd's hosts directory (`<dir>/<host[:port]>/hosts.toml`, `_default`), e.g.
    /// `/etc/containerd/certs.d`. `None`: every registry is its own only host.
    pub hosts_dir: Option<PathBuf>,
    /// Speak plain HTTP to registries whose hosts entry does not name a scheme (and to
    /// registries without one). Loopback registries use HTTP regardless.
    pub plain_http: bool,
    /// The platform chosen from image indexes. Default: [`Platform::host`].
    pub platform: Platform,
    /// Credentials given by the embedder, per host (`HOST[:PORT]`, `docker.io` for Docker
    /// Hub), consulted before the auth files.
    pub credentials: Vec<(String, Credential)>,
    /// Read the Docker and podman auth files (and run credential helpers) for hosts
    /// without embedder credentials. Default: on.
    pub auth_files: bool,
    /// Connect timeout (DNS, TCP, TLS), unless a hosts entry sets `dial_timeout`.
    /// Default: 10 s.
    pub connect_timeout: Duration,
    /// Longest wait for any read (headers or body) before the connection counts as
    /// stalled and is retried (resumed, for a blob). Default: 30 s.
    pub read_timeout: Duration,
    /// Retries per request (and per stretch of a blob download without progress).
    /// Default: 5.
    pub max_retries: u32,
    /// Time spent retrying one request (or one stretch of a blob without progress)
    /// beyond which no further retry starts. Default: 60 s.
    pub max_retry_time: Duration,
    /// The `User-Agent` header. Default: `rootfs-cache/<version>`.
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            hosts_dir: None,
            plain_http: false,
            platform: Platform::host(),
            credentials: Vec::new(),
            auth_files: true,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            max_retries: 5,
            max_retry_time: Duration::from_secs(60),
            user_agent: concat!("rootfs-cache/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl RegistryOptions {
    /// Read mirrors and TLS settings from containerd's hosts directory `dir`.
    pub fn with_hosts_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.hosts_dir = Some(dir.into());
        self
    }
    /// Allow plain HTTP to every registry (see [`RegistryOptions::plain_http`]).
    pub fn with_plain_http(mut self, on: bool) -> Self {
        self.plain_http = on;
        self
    }
    /// Choose `platform` from image indexes.
    pub fn with_platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }
    /// Use `credential` for `host` (`HOST[:PORT]`; `docker.io` for Docker Hub), before
    /// any auth file. A later call for the same host does not replace an earlier one.
    pub fn with_credential(mut self, host: impl Into<String>, credential: Credential) -> Self {
        self.credentials.push((host.into(), credential));
        self
    }
    /// Read (or not) the Docker and podman auth files.
    pub fn with_auth_files(mut self, on: bool) -> Self {
        self.auth_files = on;
        self
    }
    /// Set the connect timeout.
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }
    /// Set the stalled-read timeout.
    pub fn with_read_timeout(mut self, t: Duration) -> Self {
        self.read_timeout = t;
        self
    }
    /// Set the retry count bound.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    /// Set the retry time bound.
    pub fn with_max_retry_time(mut self, t: Duration) -> Self {
        self.max_retry_time = t;
        self
    }
    /// Set the `User-Agent`.
    pub fn with_user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }
}

/// An [`ImageFetcher`] over the OCI Distribution API (Docker Hub, GHCR,
/// ECR, Harbor, `docker-registry`, a node-local mirror), synchronous, behind the default
/// cargo feature `registry`.
///
/// ```no_run
/// use rootfs_cache::{CacheOptions, Registry, RegistryOptions, RootfsCache};
/// # fn main() -> rootfs_cache::Result<()> {
/// let registry = Registry::new(RegistryOptions::default().with_hosts_dir("/etc/containerd/certs.d"))?;
/// let cache = RootfsCache::open("/var/lib/rootfs-cache", CacheOptions::default())?;
/// let rootfs = cache.ensure(&registry, "docker.io/library/alpine:3.20")?;
/// # let _ = rootfs; Ok(()) }
/// ```
///
/// # What it does
/// - **References** in the docker grammar ([`Reference`]): `ubuntu` is
///   `docker.io/library/ubuntu:latest`, served by `registry-1.docker.io`; a leading
///   `docker://` is accepted.
/// - **Resolution**: `HEAD <host>/v2/<repo>/manifests/<tag>` with an `Accept` list of the
///   OCI manifest and index and the Docker schema 2 manifest and manifest list; its
///   `Docker-Content-Digest` names the manifest, which is then fetched by digest (without
///   the header, by tag, and hashed). Manifests over 4 MiB are refused; every manifest is
///   checked against its digest (and its size, when a descriptor gives one); an index is
///   resolved to the entry for [`RegistryOptions::platform`] with the same rules as
///   [`OciLayout`](crate::OciLayout) (one shared implementation). A digest reference is
///   fetched by digest directly. The blobs of every manifest resolved are remembered
///   (digest → the registries and repositories that listed it) for
///   [`open_blob`](ImageFetcher::open_blob), which tries the most recently resolved
///   first and the others when it fails there.
/// - **Blobs**: `GET <host>/v2/<repo>/blobs/<digest>`, redirects followed (to object
///   storage, without credentials), a broken download resumed with `Range: bytes=N-`
///   (bytes skipped when the server ignores `Range`), retried with exponential backoff
///   and jitter, verified against the digest while streaming (see below).
/// - **Auth**: anonymous first; on `401` the `WWW-Authenticate` challenge is answered:
///   Bearer (a token from the realm for `repository:<repo>:pull`, with Basic credentials
///   when there are some, an identity token as an OAuth2 refresh token; `token` or
///   `access_token`; cached per host and scope until `expires_in`; one fresh token when a
///   cached one is rejected) or Basic.
/// - **Hosts and mirrors** from containerd's `hosts.toml` ([`RegistryOptions::hosts_dir`],
///   e.g. `/etc/containerd/certs.d`): see below.
///
/// # hosts.toml
/// For a reference to `REGISTRY`, the first of `<dir>/<host>_<port>_/hosts.toml`
/// (containerd's spelling of `host:port`), `<dir>/REGISTRY/hosts.toml`,
/// `<dir>/_default/hosts.toml` that exists is read; a directory without `hosts.toml`
/// contributes its `*.crt` files as CAs. Supported: `server` (the registry itself, tried
/// last; default `https://REGISTRY`, `registry-1.docker.io` for `docker.io`), ordered
/// `[host."URL"]` entries (mirrors, tried first, in file order) with `capabilities`
/// (`resolve`: may answer tags; `pull`: blobs and digests), `ca` (a file or a list,
/// relative to the directory), `skip_verify`, `header` (extra headers, a value or a list),
/// `override_path` (the URL's path is the API root instead of `<path>/v2`), `dial_timeout`
/// (`"500ms"`). Every host other than the registry itself (a mirror, or a `server`
/// elsewhere) gets `?ns=REGISTRY` on every request, as containerd sends, so that one
/// mirror can serve several registries. Client certificates (`client`) are refused rather
/// than ignored. Files are read once per registry per `Registry` value.
///
/// Hosts are tried in order: a dead host, an error status, a missing manifest, wrong bytes
/// move on to the next; when all fail, the error is [`Error::AllHostsFailed`] naming each
/// host and its failure ([`Error::NotFound`] when every host answered 404, the host's own
/// error when there was only one). A request that fails on a host followed by others (a
/// mirror) moves on at once, as containerd does, rather than spend the retry budget on a
/// mirror that is down; on the last host (usually the registry itself) connection errors,
/// timeouts, 408, 429 (after `Retry-After`) and 5xx are retried. A blob download broken
/// midway is resumed on the host that was serving it, whichever it is.
/// [`FetchObserver::retry`], [`FetchObserver::resumed`] and [`FetchObserver::fallback`]
/// report each event (through `resolve_observed` / `open_blob_observed`).
///
/// # Wrong bytes
/// A manifest is read whole and checked before use, so a host serving a wrong one is
/// simply left for the next. A blob is streamed to the caller while it is hashed, and its
/// digest can only be checked once every byte is in. So the reader holds back the last
/// MiB it received until the check: a blob up to 1 MiB is handed out only once verified,
/// a larger one only up to its last MiB. On a mismatch the held bytes are dropped, the
/// host is demoted for that digest (tried last by every later `open_blob` of it, and
/// reported to [`FetchObserver::fallback`]), and the download continues on the next
/// host from the number of bytes handed out; the digest is checked again at the end.
/// So wrong bytes within the held-back tail (any corruption of a small blob, a truncated
/// or wrong tail of a large one) never reach the caller and the same read succeeds from
/// the next host. Wrong bytes already handed out (early in a large blob) cannot be taken
/// back: the read fails with [`Error::ContentMismatch`] naming the host(s), and the next
/// `open_blob` of that digest starts at a host that has not lied about it (a stream its
/// reader drops midway demotes its hosts too). [`RootfsCache`](crate::RootfsCache) does
/// its part: when an extraction fails on the data (the decompressor usually trips over
/// wrong bytes long before the digest could tell) it reads the rest of the blob, so the
/// error is this `ContentMismatch` naming the host, and fetches the layer once more, which
/// now starts at the next host. Nothing wrong is cached either way: the cache verifies
/// every layer's digest too and keeps nothing of a failed extraction. (containerd's fetcher moves to the next host only on request
/// errors; a digest mismatch fails its ingest commit. This reader does better where it
/// can, at the cost of 1 MiB of buffer per open blob.) A host whose `Content-Length`
/// contradicts the descriptor is left before anything is read from it.
///
/// # Credentials
/// Looked up by the host actually contacted, once per host: the embedder's
/// ([`RegistryOptions::with_credential`]), then, unless
/// [`RegistryOptions::auth_files`] is off, `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, and `$DOCKER_CONFIG/config.json` (else
/// `~/.docker/config.json`), including `credHelpers` and `credsStore` (the helper
/// programs are run), through the `docker_credential` crate.
///
/// # Security
/// - TLS by default (rustls; the compiled-in webpki roots, or the system bundle plus the
///   host's `ca` files when `ca` is set). Plain HTTP only for a `hosts.toml` entry that
///   says `http://`, with [`RegistryOptions::plain_http`], or for a loopback registry
///   (127.0.0.0/8, `::1`, `localhost`, not on port 443), as docker and containerd allow.
///   `skip_verify` (and `ca`) apply only to the host whose `hosts.toml` entry sets them:
///   not to a redirect target or a token realm on another host (as containerd, whose
///   token fetches use its default client).
/// - Credentials go only to the host they are for: never to another mirror, never across
///   a redirect to another host (redirects are followed here, not by the HTTP library,
///   and lose `Authorization` and the `hosts.toml` headers when they leave the host), and
///   to a Bearer realm only over HTTPS (or loopback, or the host itself); a token realm
///   never gets the `hosts.toml` headers, which are the host's own.
/// - Everything read is bounded: manifests 4 MiB, token answers 1 MiB, error bodies 512
///   bytes; blobs exactly their descriptor's size. Every manifest and blob is verified
///   against its digest.
/// - Retries are bounded in count ([`RegistryOptions::max_retries`]) and time
///   ([`RegistryOptions::max_retry_time`]); connects and stalled reads time out.
///
/// # Why not `oci-spec`
/// The manifest and index types come from the crate's own `fetch::manifest` module, shared
/// with [`OciLayout`](crate::OciLayout), not from `oci-spec` (0.10, evaluated): what is
/// needed is a descriptor (digest, size, media type, platform) and the fields that tell an
/// index from a manifest, read leniently where registries and tools differ (a `null` list,
/// as Go writes an empty slice; an absent `mediaType`, or a manifest without a `config`
/// when only its layers matter) and strictly where it matters (sha256 digests only,
/// sizes, a `mediaType` contradicting its descriptor, the schema version). `oci-spec`
/// models the whole image, runtime and distribution specs with builders and getters,
/// pulls `derive_builder`, `getset`, `strum`, `regex` and `const_format` into a crate that
/// would use a tenth of it, makes `config` and the lists mandatory, and would still need
/// converting into this crate's [`Digest`] and [`Descriptor`]. One small module also keeps
/// platform selection (`arm64` = `arm64/v8`, the unplatformed fallback) identical for both
/// fetchers.
///
/// # Concurrency
/// A `Registry` is `Send + Sync` and cheap to clone (an `Arc` inside); clones share the
/// token cache, the host configuration, the digest → repository map and the demoted
/// hosts. Any number of threads may resolve and download at once; each blob reader owns
/// its connection. The library never prints.
///
/// # Example: one fetcher, used directly
/// ```no_run
/// use rootfs_cache::{ImageFetcher, Registry, RegistryOptions};
/// # fn main() -> rootfs_cache::Result<()> {
/// let registry = Registry::new(RegistryOptions::default())?;
/// let image = registry.resolve("127.0.0.1:5000/deb:v3")?;
/// let mut blob = registry.open_blob(&image.layers[0])?;
/// std::io::copy(&mut blob, &mut std::io::sink()).map_err(|e| rootfs_cache::Error::Read { what: "blob", source: e })?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("options", &self.inner.client.opts).finish_non_exhaustive()
    }
}

/// State shared by clones and blob readers.
pub(crate) struct Inner {
    client: Client,
    /// Hosts per registry (as named in references), loaded once.
    hosts: Mutex<HashMap<String, Arc<[Arc<Conn>]>>>,
    /// Blob digest → `(registry, repository)` it was seen in.
    seen: Mutex<HashMap<Digest, Vec<(String, String)>>>,
    /// `(blob digest, host)` pairs where the host served wrong bytes.
    bad: Mutex<HashSet<(Digest, String)>>,
    /// Hosts that did not answer a multi-range request with the ranges asked for: asked
    /// one range at a time from then on.
    single_range: Mutex<HashSet<String>>,
}

impl Registry {
    /// A registry client with `opts`. Nothing is read or contacted until the first
    /// [`resolve`](ImageFetcher::resolve).
    ///
    /// # Errors
    /// None today beyond building the HTTP client; kept fallible for configuration checks.
    pub fn new(opts: RegistryOptions) -> Result<Registry> {
        Ok(Registry {
            inner: Arc::new(Inner {
                client: Client::new(opts)?,
                hosts: Mutex::new(HashMap::new()),
                seen: Mutex::new(HashMap::new()),
                bad: Mutex::new(HashSet::new()),
                single_range: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// The options this registry was built with.
    pub fn options(&self) -> &RegistryOptions {
        &self.inner.client.opts
    }

    /// The hosts for `reference`'s registry, in order (from `hosts.toml`, loaded once).
    fn conns(&self, reference: &Reference) -> Result<Arc<[Arc<Conn>]>> {
        if let Some(c) = self.inner.hosts.lock().get(&reference.registry) {
            return Ok(Arc::clone(c));
        }
        let opts = &self.inner.client.opts;
        let entries =
            hosts::load(opts.hosts_dir.as_deref(), &reference.registry, reference.default_api_host(), opts.plain_http)?;
        let conns: Arc<[Arc<Conn>]> =
            entries.into_iter().map(|e| Conn::new(e, opts).map(Arc::new)).collect::<Result<Vec<_>>>()?.into();
        self.inner.hosts.lock().insert(reference.registry.clone(), Arc::clone(&conns));
        Ok(conns)
    }

    fn resolve_on(
        &self,
        conn: &Conn,
        r: &Reference,
        observer: &dyn FetchObserver,
        retry: bool,
    ) -> Result<ImageManifest> {
        let repo = &r.repository;
        let source = format!("registry {} repository {repo}", conn.host());
        let shown = r.to_string();
        // The first document: by digest, or a tag's digest from HEAD.
        let (bytes, media_type, digest) = match &r.digest {
            Some(d) => self.get_manifest(conn, repo, &d.to_string(), Some(d), None, observer, retry)?,
            None => {
                let tag = r.object();
                let rest = format!("{repo}/manifests/{tag}");
                let x = Exchange {
                    method: Method::HEAD,
                    url: conn.entry.url(&rest),
                    repository: repo,
                    headers: vec![("accept", ACCEPT.to_string())],
                    op: format!("HEAD {}/{rest}", conn.entry.path),
                };
                let digest = match self.inner.client.send(conn, &x, observer, retry) {
                    Ok(head) => {
                        let size = header(&head, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
                        if let Some(n) = size.filter(|&n| n > MAX_JSON_BYTES) {
                            return Err(too_big(conn, &x.op, n));
                        }
                        header(&head, "docker-content-digest").and_then(|d| d.trim().parse::<Digest>().ok())
                    }
                    // A server without HEAD for manifests: GET by tag instead.
                    Err(Error::Registry { status: Some(405 | 501), .. }) => None,
                    Err(e) => return Err(e),
                };
                match digest {
                    Some(d) => self.get_manifest(conn, repo, &d.to_string(), Some(&d), None, observer, retry)?,
                    None => self.get_manifest(conn, repo, &tag, None, None, observer, retry)?,
                }
            }
        };
        let mut entry = Entry { digest, size: Some(bytes.len() as u64), media_type };
        let mut bytes = Some(bytes);
        for _ in 0..=MAX_INDEX_DEPTH {
            let doc = match bytes.take() {
                Some(b) => b,
                None => {
                    declared_kind(&entry)?;
                    let (b, _, _) = self.get_manifest(
                        conn,
                        repo,
                        &entry.digest.to_string(),
                        Some(&entry.digest),
                        entry.size,
                        observer,
                        retry,
                    )?;
                    b
                }
            };
            let url = PathBuf::from(conn.entry.url(&format!("{repo}/manifests/{}", entry.digest)));
            match step(&entry, &doc, &url, &self.inner.client.opts.platform, &source, &shown)? {
                Step::Next(next) => entry = next,
                Step::Image(image) => return Ok(image),
            }
        }
        Err(Error::InvalidImage {
            path: PathBuf::from(conn.entry.url(&format!("{repo}/manifests/{}", entry.digest))),
            reason: format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
        })
    }

    /// GET a manifest by tag or digest: bounded, hashed, checked against `expected` (and
    /// `size`) or the server's `Docker-Content-Digest`. Returns the bytes, the media type
    /// the server gave (if it is a manifest type) and the digest.
    #[allow(clippy::too_many_arguments)]
    fn get_manifest(
        &self,
        conn: &Conn,
        repo: &str,
        object: &str,
        expected: Option<&Digest>,
        size: Option<u64>,
        observer: &dyn FetchObserver,
        retry: bool,
    ) -> Result<(Vec<u8>, Option<String>, Digest)> {
        let rest = format!("{repo}/manifests/{object}");
        let url = conn.entry.url(&rest);
        let x = Exchange {
            method: Method::GET,
            url: url.clone(),
            repository: repo,
            headers: vec![("accept", ACCEPT.to_string())],
            op: format!("GET {}/{rest}", conn.entry.path),
        };
        if let Some(n) = size.filter(|&n| n > MAX_JSON_BYTES) {
            return Err(too_big(conn, &x.op, n));
        }
        let (parts, bytes) = self.inner.client.fetch_small(conn, &x, observer, retry, MAX_JSON_BYTES, "manifest")?;
        let media_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(|t| t.split(';').next().unwrap_or("").trim().to_string())
            .filter(|t| [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST].contains(&t.as_str()));
        let server_digest = parts
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|d| d.trim().parse::<Digest>().ok());
        let found = Digest::of(&bytes);
        if let Some(want) = expected.or(server_digest.as_ref()) {
            if *want != found {
                return Err(Error::ContentMismatch {
                    host: conn.host().to_string(),
                    what: format!("manifest {object} of {repo}"),
                    expected: *want,
                    found,
                });
            }
        }
        if let Some(n) = size.filter(|&n| n != bytes.len() as u64) {
            return Err(Error::InvalidImage {
                path: PathBuf::from(url),
                reason: format!("{} bytes, its descriptor says {n}", bytes.len()),
            });
        }
        Ok((bytes, media_type, found))
    }

    /// The blob reader for `layer` from `repository` of `registry`, on its hosts that may
    /// pull (those that served wrong bytes for this digest last).
    fn open_blob_at(
        &self,
        registry: String,
        repository: String,
        layer: &Descriptor,
        observer: Arc<dyn FetchObserver>,
    ) -> Result<Box<dyn Read + Send>> {
        let ordered = self.pull_conns(registry, &repository, &layer.digest)?;
        let reader = blob::BlobReader::open(Arc::clone(&self.inner), ordered, repository, layer.clone(), observer)?;
        Ok(Box::new(reader))
    }

    /// The hosts of `registry` that may pull, in order, those that served wrong bytes for
    /// `digest` last.
    fn pull_conns(&self, registry: String, repository: &str, digest: &Digest) -> Result<Vec<Arc<Conn>>> {
        let r = Reference { registry, repository: repository.to_string(), tag: None, digest: None };
        let conns = self.conns(&r)?;
        let bad = self.inner.bad.lock();
        let mut ordered: Vec<Arc<Conn>> = conns.iter().filter(|c| c.entry.pull).cloned().collect();
        // Hosts that served wrong bytes for this digest go last (stable otherwise).
        ordered.sort_by_key(|c| bad.contains(&(*digest, c.host().to_string())));
        drop(bad);
        if ordered.is_empty() {
            return Err(Error::Unsupported {
                what: format!("no host configured for registry {} has the pull capability", r.registry),
            });
        }
        Ok(ordered)
    }

    /// The registries and repositories whose manifests listed `digest`, the most recently
    /// resolved first.
    fn places(&self, digest: &Digest) -> Result<Vec<(String, String)>> {
        let mut places = self.inner.seen.lock().get(digest).cloned().unwrap_or_default();
        if places.is_empty() {
            return Err(Error::NotFound { what: format!("blob {digest}: not in any manifest this Registry resolved") });
        }
        places.reverse();
        Ok(places)
    }

    fn remember(&self, r: &Reference, image: &ImageManifest) {
        let mut seen = self.inner.seen.lock();
        for layer in &image.layers {
            let where_ = (r.registry.clone(), r.repository.clone());
            let list = seen.entry(layer.digest).or_default();
            // The most recently resolved place last: `open_blob` tries it first.
            list.retain(|p| *p != where_);
            list.push(where_);
        }
    }
}

fn too_big(conn: &Conn, op: &str, n: u64) -> Error {
    Error::Registry {
        host: conn.host().to_string(),
        op: op.to_string(),
        status: None,
        reason: format!("manifest of {n} bytes, more than the {MAX_JSON_BYTES} allowed"),
    }
}

/// One error for a request that failed on every host: the host's own when there was one,
/// [`Error::NotFound`] when every host answered 404, else [`Error::AllHostsFailed`].
pub(crate) fn combine(mut failures: Vec<(String, Error)>, what: String) -> Error {
    if failures.len() == 1 {
        return failures.pop().map(|(_, e)| e).expect("one failure");
    }
    if failures.is_empty() {
        return Error::NotFound { what: format!("{what}: no host configured for it") };
    }
    if failures.iter().all(|(_, e)| matches!(e, Error::NotFound { .. })) {
        let hosts: Vec<&str> = failures.iter().map(|(h, _)| h.as_str()).collect();
        return Error::NotFound { what: format!("{what} on any host ({})", hosts.join(", ")) };
    }
    Error::AllHostsFailed { what, failures }
}

impl ImageFetcher for Registry {
    /// Resolve a docker reference (`127.0.0.1:5000/deb:v3`, `ubuntu`,
    /// `ghcr.io/a/b@sha256:…`, optionally prefixed `docker://`) to the manifest for
    /// [`RegistryOptions::platform`].
    ///
    /// # Errors
    /// [`Error::InvalidReference`]; [`Error::NotFound`] (unknown tag or digest on every
    /// host, no manifest for the platform); [`Error::Unauthorized`]; [`Error::Registry`]
    /// and [`Error::ContentMismatch`] from a single host, [`Error::AllHostsFailed`] from
    /// several; [`Error::InvalidImage`] / [`Error::Unsupported`] for documents (as
    /// [`OciLayout`](crate::OciLayout)); [`Error::InvalidConfig`] for a bad `hosts.toml`.
    fn resolve(&self, reference: &str) -> Result<ImageManifest> {
        self.resolve_observed(reference, &NoObserver)
    }

    /// The blob of `layer` (seen in a manifest this `Registry` resolved), streamed,
    /// resumed, verified (see the module docs).
    ///
    /// # Errors
    /// [`Error::NotFound`] for a digest no resolved manifest listed, or a blob missing on
    /// every host; the errors of [`resolve`](ImageFetcher::resolve) for the request.
    /// Reads fail with an [`std::io::Error`] wrapping an [`Error`] (`ContentMismatch`,
    /// `Registry`, `AllHostsFailed`).
    fn open_blob(&self, layer: &Descriptor) -> Result<Box<dyn Read + Send>> {
        self.open_blob_observed(layer, Arc::new(NoObserver))
    }

    fn open_blob_observed(&self, layer: &Descriptor, observer: Arc<dyn FetchObserver>) -> Result<Box<dyn Read + Send>> {
        // Every registry and repository whose manifests listed the digest, the most
        // recently resolved first (the image being ensured, as a rule: `open_blob` is not
        // told which image asks): a repository that lost the blob, a registry that went
        // away or credentials that do not reach a repository leave the others.
        let places = self.places(&layer.digest)?;
        let mut first_error = None;
        for (registry, repository) in places {
            match self.open_blob_at(registry, repository, layer, Arc::clone(&observer)) {
                Ok(reader) => return Ok(reader),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("at least one place was tried"))
    }

    /// `len` bytes of `layer`'s blob (seen in a manifest this `Registry` resolved) from
    /// `offset`: `GET /v2/<repo>/blobs/<digest>` with `Range: bytes=offset-(offset+len-1)`,
    /// through the same hosts, auth, redirects (no credentials to another host) and
    /// retries as [`open_blob`](ImageFetcher::open_blob). A server ignoring `Range` (200)
    /// has `offset` bytes skipped; a broken body is resumed on the same host; a host
    /// answering another range (`Content-Range`) or another blob size is left for the
    /// next one. Not verified: see [`ImageFetcher::read_blob_range`].
    ///
    /// # Errors
    /// [`Error::InvalidRange`], [`Error::LimitExceeded`] as
    /// [`ImageFetcher::read_blob_range`]; otherwise as
    /// [`open_blob`](ImageFetcher::open_blob) ([`Error::Registry`] naming the host for a
    /// wrong `Content-Range`, [`Error::AllHostsFailed`] when several hosts failed).
    fn read_blob_range(&self, layer: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.read_blob_range_observed(layer, offset, len, &NoObserver)
    }

    fn read_blob_range_observed(
        &self,
        layer: &Descriptor,
        offset: u64,
        len: u64,
        observer: &dyn FetchObserver,
    ) -> Result<Vec<u8>> {
        super::check_range(layer, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut first_error = None;
        for (registry, repository) in self.places(&layer.digest)? {
            let read = self
                .pull_conns(registry, &repository, &layer.digest)
                .and_then(|conns| blob::read_range(&self.inner, &conns, &repository, layer, offset, len, observer));
            match read {
                Ok(bytes) => return Ok(bytes),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.expect("at least one place was tried"))
    }

    /// One multi-range `GET` per [`blob::MULTI_MAX`] ranges on the first host that has
    /// the blob, split from its `multipart/byteranges` answer; where that host answers
    /// any other way (the whole blob, one range, other ranges) it is asked one range at a
    /// time from then on, and where the request fails the ranges are read one by one this
    /// time (with [`read_blob_range`](ImageFetcher::read_blob_range)'s retries and
    /// fallbacks).
    fn read_blob_ranges_observed(
        &self,
        layer: &Descriptor,
        ranges: &[(u64, u64)],
        observer: &dyn FetchObserver,
    ) -> Result<Vec<Vec<u8>>> {
        let one_by_one = |ranges: &[(u64, u64)]| crate::fetch::ranges_one_by_one(self, layer, ranges, observer);
        let mut total = 0u64;
        let mut prev_end = 0u64;
        for &(offset, len) in ranges {
            super::check_range(layer, offset, len)?;
            if len == 0 || offset < prev_end {
                return one_by_one(ranges); // not what a multi-range request can say
            }
            prev_end = offset + len;
            total += len;
        }
        if ranges.len() < 2 || total > crate::MAX_RANGE_BYTES {
            return one_by_one(ranges);
        }
        let Some((registry, repository)) = self.places(&layer.digest)?.into_iter().next() else {
            return one_by_one(ranges);
        };
        let Ok(conns) = self.pull_conns(registry, &repository, &layer.digest) else {
            return one_by_one(ranges);
        };
        let Some(conn) = conns.first() else { return one_by_one(ranges) };
        let mut out = Vec::with_capacity(ranges.len());
        for batch in ranges.chunks(blob::MULTI_MAX) {
            if batch.len() < 2 || self.inner.single_range.lock().contains(conn.host()) {
                out.extend(one_by_one(batch)?);
                continue;
            }
            match blob::get_multi(&self.inner, conn, &repository, layer, batch, observer) {
                Ok(Some(parts)) => out.extend(parts),
                Ok(None) => {
                    self.inner.single_range.lock().insert(conn.host().to_string());
                    out.extend(one_by_one(batch)?);
                }
                Err(e) => {
                    // A host that refuses the request itself (400, 413, 416, 431, ...: a
                    // header too long, ranges it will not serve) is asked one range at a
                    // time from then on; a network error or a missing blob only this time.
                    if let Error::Registry { status: Some(code), .. } = e {
                        if (400..500).contains(&code) && !matches!(code, 401 | 403 | 404 | 408 | 429) {
                            self.inner.single_range.lock().insert(conn.host().to_string());
                        }
                    }
                    out.extend(one_by_one(batch)?);
                }
            }
        }
        Ok(out)
    }

    fn resolve_observed(&self, reference: &str, observer: &dyn FetchObserver) -> Result<ImageManifest> {
        let reference = reference.strip_prefix("docker://").unwrap_or(reference);
        let r: Reference = reference.parse()?;
        let conns = self.conns(&r)?;
        let by_digest = r.digest.is_some();
        let candidates: Vec<&Arc<Conn>> =
            conns.iter().filter(|c| c.entry.resolve || (by_digest && c.entry.pull)).collect();
        if candidates.is_empty() {
            return Err(Error::Unsupported {
                what: format!("no host configured for registry {} has the resolve capability", r.registry),
            });
        }
        let mut failures = Vec::new();
        for (i, conn) in candidates.iter().enumerate() {
            let last = i + 1 == candidates.len();
            match self.resolve_on(conn, &r, observer, last) {
                Ok(image) => {
                    self.remember(&r, &image);
                    return Ok(image);
                }
                Err(e) => {
                    if !last {
                        observer.fallback(conn.host(), &e.to_string());
                    }
                    failures.push((conn.host().to_string(), e));
                }
            }
        }
        Err(combine(failures, format!("resolve {r}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testutil::{Events, header_of, response, server, target};

    const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    fn manifest(layer: &[u8]) -> Vec<u8> {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"{LAYER}","digest":"{}","size":{}}}]}}"#,
            Digest::of(b"{}"),
            Digest::of(layer),
            layer.len()
        )
        .into_bytes()
    }

    fn index(entries: &[(&[u8], &str)]) -> Vec<u8> {
        let list: Vec<String> = entries
            .iter()
            .map(|(m, arch)| {
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#,
                    Digest::of(m),
                    m.len()
                )
            })
            .collect();
        format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#, list.join(",")).into_bytes()
    }

    /// A registry serving `docs` (by digest, and `tag` → `docs[0]`) under `/v2/r/`, blobs
    /// `blobs` by digest; `head_digest`: whether HEAD gives Docker-Content-Digest.
    fn fake_registry(
        tag: &'static str,
        docs: Vec<(Vec<u8>, &'static str)>,
        blobs: Vec<Vec<u8>>,
        head_digest: bool,
    ) -> (String, Arc<parking_lot::Mutex<Vec<String>>>) {
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let (addr, _) = server(move |_, head| {
            let t = target(head);
            let method = head.split(' ').next().unwrap_or("").to_string();
            log.lock().push(format!("{method} {t}"));
            let path = t.split('?').next().unwrap_or("");
            let doc = if path == format!("/v2/r/manifests/{tag}") {
                docs.first()
            } else {
                docs.iter().find(|(d, _)| path == format!("/v2/r/manifests/{}", Digest::of(d)))
            };
            if let Some((d, media_type)) = doc {
                assert!(header_of(head, "accept").is_some_and(|a| a.contains(OCI_INDEX)), "{head}");
                let mut h = vec![("Content-Type", media_type.to_string())];
                if head_digest || method == "GET" {
                    h.push(("Docker-Content-Digest", Digest::of(d).to_string()));
                }
                let body: &[u8] = if method == "HEAD" { b"" } else { d };
                return response("200 OK", &h, body, d.len());
            }
            if let Some(b) = blobs.iter().find(|b| path == format!("/v2/r/blobs/{}", Digest::of(b))) {
                return response("200 OK", &[], b, b.len());
            }
            response("404 Not Found", &[], b"{}", 2)
        });
        (addr, seen)
    }

    fn registry(platform: &str) -> Registry {
        Registry::new(RegistryOptions::default().with_auth_files(false).with_platform(platform.parse().unwrap()))
            .unwrap()
    }

    #[test]
    fn resolve_head_then_get_by_digest_and_walk_the_index() {
        let (amd, arm) = (b"amd layer".to_vec(), b"arm layer".to_vec());
        let (ma, mr) = (manifest(&amd), manifest(&arm));
        let idx = index(&[(&ma, "amd64"), (&mr, "arm64")]);
        let docs = vec![(idx.clone(), OCI_INDEX), (ma.clone(), OCI_MANIFEST), (mr.clone(), OCI_MANIFEST)];
        let (host, log) = fake_registry("v1", docs, vec![amd.clone(), arm.clone()], true);
        let r = registry("linux/arm64");
        let image = r.resolve(&format!("docker://{host}/r:v1")).unwrap();
        assert_eq!(image.digest, Digest::of(&mr));
        assert_eq!(image.layers[0].digest, Digest::of(&arm));
        assert_eq!(
            *log.lock(),
            [
                "HEAD /v2/r/manifests/v1".to_string(),
                format!("GET /v2/r/manifests/{}", Digest::of(&idx)),
                format!("GET /v2/r/manifests/{}", Digest::of(&mr)),
            ]
        );
        // The layer is now known: its blob streams, verified.
        let mut got = Vec::new();
        r.open_blob(&image.layers[0]).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got, arm);
        // By digest: no HEAD.
        log.lock().clear();
        let image = r.resolve(&format!("{host}/r@{}", Digest::of(&ma))).unwrap();
        assert_eq!(image.digest, Digest::of(&ma));
        assert_eq!(*log.lock(), [format!("GET /v2/r/manifests/{}", Digest::of(&ma))]);
        // No entry for the platform.
        match registry("linux/s390x").resolve(&format!("{host}/r:v1")) {
            Err(Error::NotFound { what }) => assert!(what.contains("linux/amd64, linux/arm64"), "{what}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn resolve_without_a_digest_header_gets_by_tag_and_hashes() {
        let layer = b"x".to_vec();
        let m = manifest(&layer);
        let (host, log) = fake_registry("latest", vec![(m.clone(), OCI_MANIFEST)], vec![], false);
        let image = registry("linux/amd64").resolve(&format!("{host}/r")).unwrap();
        assert_eq!(image.digest, Digest::of(&m));
        assert_eq!(*log.lock(), ["HEAD /v2/r/manifests/latest", "GET /v2/r/manifests/latest"]);
    }

    #[test]
    fn a_mirror_with_a_wrong_manifest_or_none_is_left_for_the_next_host() {
        let layer = b"layer".to_vec();
        let m = manifest(&layer);
        let (good, good_log) = fake_registry("v1", vec![(m.clone(), OCI_MANIFEST)], vec![layer.clone()], true);
        // A mirror answering the digest with other bytes.
        let wrong = Digest::of(&m).to_string();
        let (liar, _) = server(move |_, head| {
            let h = vec![("Docker-Content-Digest", wrong.clone()), ("Content-Type", OCI_MANIFEST.to_string())];
            let full: &[u8] = br#"{"schemaVersion":2,"layers":[],"config":{}}"#;
            let body: &[u8] = if head.starts_with("HEAD") { b"" } else { full };
            response("200 OK", &h, body, full.len())
        });
        let (empty, empty_log) = server(|_, _| response("404 Not Found", &[], b"", 0));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("reg.example")).unwrap();
        std::fs::write(
            dir.path().join("reg.example/hosts.toml"),
            format!("server = \"http://{good}\"\n[host.\"http://{empty}\"]\n[host.\"http://{liar}\"]\n"),
        )
        .unwrap();
        let r = Registry::new(RegistryOptions::default().with_auth_files(false).with_hosts_dir(dir.path())).unwrap();
        let ev = Events::default();
        let image = r.resolve_observed("reg.example/r:v1", &ev).unwrap();
        assert_eq!(image.digest, Digest::of(&m));
        let events = ev.0.lock().unwrap().clone();
        assert!(events[0].starts_with(&format!("fallback {empty} not found")), "{events:?}");
        assert!(events[1].starts_with(&format!("fallback {liar}")) && events[1].contains("wrong bytes"), "{events:?}");
        // Hosts other than the registry itself are asked with ?ns= (the server here too,
        // as it is not reg.example; containerd does the same).
        assert!(target(&empty_log.lock().unwrap()[0]).ends_with("?ns=reg.example"));
        assert!(good_log.lock().iter().all(|l| l.ends_with("?ns=reg.example")), "{:?}", good_log.lock());
        // Every host missing the tag: NotFound naming them all.
        match r.resolve("reg.example/r:nope") {
            Err(Error::AllHostsFailed { failures, .. }) => {
                // The liar answers anything: its wrong bytes make it a failure of its own.
                assert_eq!(failures.len(), 3);
            }
            Err(Error::NotFound { what }) => assert!(what.contains(&empty) && what.contains(&good), "{what}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn oversized_manifests_are_refused() {
        let (host, _) = server(|_, head| {
            let h = vec![("Content-Type", OCI_MANIFEST.to_string())];
            if head.starts_with("HEAD") {
                response("200 OK", &h, b"", 5 << 20)
            } else {
                response("200 OK", &h, b"{}", 2)
            }
        });
        match registry("linux/amd64").resolve(&format!("{host}/r:big")) {
            Err(Error::Registry { reason, .. }) => assert!(reason.contains("more than the 4194304"), "{reason}"),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn registry_is_send_sync_and_cheap_to_clone() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Registry>();
        let r = Registry::new(RegistryOptions::default()).unwrap();
        let c = r.clone();
        assert!(Arc::ptr_eq(&r.inner, &c.inner));
    }

    #[test]
    fn unknown_blob_is_not_found_and_bad_reference_is_typed() {
        let r = Registry::new(RegistryOptions::default().with_auth_files(false)).unwrap();
        let d = Descriptor {
            digest: Digest::of(b"x"),
            size: 1,
            media_type: String::new(),
            annotations: Default::default(),
        };
        assert!(matches!(r.open_blob(&d), Err(Error::NotFound { .. })));
        assert!(matches!(r.resolve("Not/Valid"), Err(Error::InvalidReference { .. })));
    }

    #[test]
    fn failures_combine_into_one_error() {
        let nf = |h: &str| (h.to_string(), Error::NotFound { what: format!("x on {h}") });
        let reg = |h: &str| {
            (
                h.to_string(),
                Error::Registry { host: h.into(), op: "GET /v2/".into(), status: Some(503), reason: "HTTP 503".into() },
            )
        };
        assert!(matches!(combine(vec![reg("a")], "w".into()), Error::Registry { .. }));
        match combine(vec![nf("a"), nf("b")], "blob x".into()) {
            Error::NotFound { what } => assert!(what.contains("a, b"), "{what}"),
            e => panic!("{e}"),
        }
        let e = combine(vec![nf("a"), reg("b")], "resolve r".into());
        let text = e.to_string();
        assert!(matches!(e, Error::AllHostsFailed { ref failures, .. } if failures.len() == 2));
        assert!(text.contains("[a] not found") && text.contains("[b] registry b: GET /v2/: HTTP 503"), "{text}");
    }
}
