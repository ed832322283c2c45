//! Which hosts serve a registry, in containerd's `hosts.toml` format.
//!
//! ```text
//! <hosts_dir>/
//!   docker.io/hosts.toml          for references to docker.io
//!   127.0.0.1_5000_/hosts.toml    for 127.0.0.1:5000 (containerd's spelling of a port)
//!   127.0.0.1:5000/hosts.toml     (the literal spelling works too)
//!   _default/hosts.toml           for every registry without a directory of its own
//! ```
//!
//! ```toml
//! server = "https://registry.example"          # the registry itself, tried last
//!
//! [host."http://127.0.0.1:30500"]               # mirrors, tried first, in file order
//!   capabilities = ["pull", "resolve"]
//!   dial_timeout = "500ms"
//! [host."https://mirror.internal/v2/proxy"]
//!   capabilities = ["pull"]                      # blobs and digest lookups only
//!   ca = "mirror-ca.pem"                         # relative to the hosts.toml's directory
//!   skip_verify = false
//!   override_path = true                         # the URL path is the API root
//!   [host."https://mirror.internal/v2/proxy".header]
//!     x-mirror-token = "abc"
//! ```
//!
//! Without a file the registry's own host is the only one. A directory without
//! `hosts.toml` contributes its `*.crt` files as CAs of the registry's own host (the
//! Docker `certs.d` layout, as containerd). Hosts other than the registry itself (mirrors,
//! a `server` elsewhere) get `?ns=<registry>` on every request, as containerd sends, so
//! that one mirror can serve several upstreams. Parsing is pure; reading the files is
//! [`load`].

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::error::{Error, Result};

/// Largest `hosts.toml` read.
const MAX_HOSTS_TOML: u64 = 1 << 20;

/// One host to try for a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostEntry {
    /// `true` for `https`.
    pub(crate) tls: bool,
    /// `host[:port]` (IPv6 in brackets).
    pub(crate) authority: String,
    /// The API root path, e.g. `/v2`, `/v2/proxy`, no trailing '/'.
    pub(crate) path: String,
    /// May serve manifests by tag.
    pub(crate) resolve: bool,
    /// May serve blobs and manifests by digest.
    pub(crate) pull: bool,
    /// CA files (PEM) trusted for this host in addition to the system roots.
    pub(crate) ca: Vec<PathBuf>,
    /// Skip TLS verification (only when `skip_verify = true`).
    pub(crate) skip_verify: bool,
    /// Extra headers sent with every request to this host.
    pub(crate) headers: Vec<(String, String)>,
    /// Connect timeout for this host (`dial_timeout`).
    pub(crate) dial_timeout: Option<Duration>,
    /// The registry name to send as `?ns=` (hosts other than the registry itself).
    pub(crate) ns: Option<String>,
}

impl HostEntry {
    /// `scheme://authority/path` (the API root, `/v2` normally).
    pub(crate) fn base_url(&self) -> String {
        format!("{}://{}{}", if self.tls { "https" } else { "http" }, self.authority, self.path)
    }

    /// The URL of `<api root>/<rest>` with `?ns=` for mirrors.
    pub(crate) fn url(&self, rest: &str) -> String {
        let mut u = format!("{}/{rest}", self.base_url());
        if let Some(ns) = &self.ns {
            u.push_str("?ns=");
            u.push_str(&percent_encode(ns));
        }
        u
    }
}

impl fmt::Display for HostEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority)
    }
}

/// Percent-encode a query value (unreserved characters kept).
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `authority` (`host[:port]`) names the loopback interface: `localhost`,
/// 127.0.0.0/8 or `::1`, where docker and containerd allow plain HTTP.
pub(crate) fn is_loopback(authority: &str) -> bool {
    let host = split_port(authority).0;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `(host, port)` of `host[:port]` / `[v6][:port]`.
pub(crate) fn split_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.rfind("]:") {
            Some(i) => (&authority[..=i], Some(&authority[i + 2..])),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    }
}

/// The registry's own host when nothing configures it: `api_host` over HTTPS, or plain
/// HTTP for `plain_http` and for loopback hosts not on port 443.
pub(crate) fn default_host(api_host: &str, plain_http: bool) -> HostEntry {
    let loopback_http = is_loopback(api_host) && split_port(api_host).1 != Some("443");
    HostEntry {
        tls: !(plain_http || loopback_http),
        authority: api_host.to_string(),
        path: "/v2".to_string(),
        resolve: true,
        pull: true,
        ca: Vec::new(),
        skip_verify: false,
        headers: Vec::new(),
        dial_timeout: None,
        ns: None,
    }
}

/// The hosts for `registry` (as named in references; its API is at `api_host`), from
/// `hosts_dir` if given, in the order to try them.
///
/// # Errors
/// [`Error::InvalidConfig`] for a malformed `hosts.toml`; [`Error::Io`] when a file
/// cannot be read.
pub(crate) fn load(
    hosts_dir: Option<&Path>,
    registry: &str,
    api_host: &str,
    plain_http: bool,
) -> Result<Vec<HostEntry>> {
    let Some(root) = hosts_dir else { return Ok(vec![default_host(api_host, plain_http)]) };
    for dir in host_dirs(root, registry) {
        let file = dir.join("hosts.toml");
        match std::fs::symlink_metadata(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("stat", &dir, e)),
        }
        return match read_small(&file)? {
            Some(text) => parse(&text, &file, &dir, registry, api_host, plain_http),
            None => {
                let mut host = default_host(api_host, plain_http);
                host.ca = crt_files(&dir)?;
                Ok(vec![host])
            }
        };
    }
    Ok(vec![default_host(api_host, plain_http)])
}

/// The directories consulted for `registry`, most specific first (containerd's order).
pub(crate) fn host_dirs(root: &Path, registry: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let (host, Some(port)) = split_port(registry) {
        // containerd 1.7.25+ splits with net.SplitHostPort (`[::1]:5000` → `::1_5000_`);
        // earlier releases kept the brackets.
        if let Some(bare) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            dirs.push(root.join(format!("{bare}_{port}_")));
        }
        dirs.push(root.join(format!("{host}_{port}_")));
    }
    dirs.push(root.join(registry));
    dirs.push(root.join("_default"));
    dirs
}

fn read_small(path: &Path) -> Result<Option<String>> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let mut text = String::new();
    file.take(MAX_HOSTS_TOML + 1).read_to_string(&mut text).map_err(|e| Error::io("read", path, e))?;
    if text.len() as u64 > MAX_HOSTS_TOML {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_HOSTS_TOML} bytes"),
        });
    }
    Ok(Some(text))
}

fn crt_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return Err(Error::io("opendir", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("readdir", dir, e))?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "crt") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// The raw per-host (and top-level) keys of `hosts.toml`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawHost {
    capabilities: Option<Vec<String>>,
    ca: Option<StringOrList>,
    client: Option<toml::Value>,
    skip_verify: Option<bool>,
    header: Option<Ordered<StringOrList>>,
    override_path: bool,
    dial_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    host: Ordered<RawHost>,
    #[serde(flatten)]
    top: RawHost,
}

/// A TOML table read as `(key, value)` pairs in file order (for hosts, the order they
/// are tried in).
struct Ordered<V>(Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Pairs<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Pairs<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Pairs(std::marker::PhantomData))
    }
}

/// Parse a `hosts.toml` (`file`, in directory `dir`, for `registry`).
pub(crate) fn parse(
    text: &str,
    file: &Path,
    dir: &Path,
    registry: &str,
    api_host: &str,
    plain_http: bool,
) -> Result<Vec<HostEntry>> {
    let bad = |reason: String| Error::InvalidConfig { path: file.to_path_buf(), reason };
    let raw: RawFile = toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_string()))?;
    let mut hosts = Vec::new();
    for (url, host) in raw.host.0 {
        let mut entry = entry(&url, host, dir, plain_http).map_err(|r| bad(format!("host {url:?}: {r}")))?;
        if entry.authority != registry && entry.authority != api_host {
            entry.ns = Some(registry.to_string());
        }
        hosts.push(entry);
    }
    let server = raw.server.filter(|s| !s.is_empty());
    let last = match server {
        Some(url) => {
            let mut e = entry(&url, raw.top, dir, plain_http).map_err(|r| bad(format!("server {url:?}: {r}")))?;
            if e.authority != registry && e.authority != api_host {
                e.ns = Some(registry.to_string());
            }
            e
        }
        None => {
            // No server: the registry's own host, with the top-level settings.
            let mut e = entry(api_host, raw.top, dir, plain_http).map_err(|r| bad(format!("server: {r}")))?;
            let d = default_host(api_host, plain_http);
            e.tls = d.tls;
            e
        }
    };
    hosts.push(last);
    Ok(hosts)
}

/// One host from its URL (`[scheme://]host[:port][/path]`) and settings.
fn entry(url: &str, raw: RawHost, dir: &Path, plain_http: bool) -> std::result::Result<HostEntry, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if url.contains("://") {
        return Err("only http:// and https:// are supported".into());
    } else {
        // containerd reads a bare host as https; plain_http asks for http.
        (!plain_http, url)
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) {
        return Err(format!("invalid host {authority:?}"));
    }
    if path.contains(['?', '#']) {
        return Err("a query or fragment in a host URL is not supported".into());
    }
    let path = clean_path(path);
    let path = if raw.override_path || path.ends_with("/v2") { path } else { format!("{path}/v2") };
    let (mut resolve, mut pull) = (true, true);
    if let Some(caps) = raw.capabilities {
        (resolve, pull) = (false, false);
        for c in caps {
            match c.to_ascii_lowercase().as_str() {
                "pull" => pull = true,
                "resolve" => resolve = true,
                "push" => {}
                other => return Err(format!("unknown capability {other:?}")),
            }
        }
    }
    if raw.client.is_some() {
        return Err("client certificates (`client`) are not supported".into());
    }
    let ca = raw
        .ca
        .map(StringOrList::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|p| if Path::new(&p).is_absolute() { PathBuf::from(p) } else { dir.join(p) })
        .collect();
    let mut headers = Vec::new();
    for (k, v) in raw.header.unwrap_or_default().0 {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
            return Err(format!("invalid header name {k:?}"));
        }
        if k.eq_ignore_ascii_case("authorization") {
            return Err("an Authorization header in hosts.toml is not supported (use credentials)".into());
        }
        for value in v.into_vec() {
            if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(format!("invalid value for header {k:?}"));
            }
            headers.push((k.clone(), value));
        }
    }
    let dial_timeout = raw.dial_timeout.map(|d| parse_go_duration(&d)).transpose()?;
    Ok(HostEntry {
        tls,
        authority: authority.to_string(),
        path,
        resolve,
        pull,
        ca,
        skip_verify: raw.skip_verify.unwrap_or(false),
        headers,
        dial_timeout,
        ns: None,
    })
}

/// `/a//b/` → `/a/b`; `` → ``.
fn clean_path(path: &str) -> String {
    let mut out = String::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        out.push('/');
        out.push_str(part);
    }
    out
}

/// A Go duration string as containerd's `dial_timeout` takes it: `500ms`, `5s`, `1m30s`,
/// `1.5s` (units ns, us, µs, ms, s, m, h).
pub(crate) fn parse_go_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        if n == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..n].parse().map_err(|_| bad())?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let unit = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        rest = &rest[u..];
        total += value * unit;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str, registry: &str) -> Vec<HostEntry> {
        let api = if registry == "docker.io" { "registry-1.docker.io" } else { registry };
        parse(text, Path::new("/etc/c/docker.io/hosts.toml"), Path::new("/etc/c/docker.io"), registry, api, false)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn full_file() {
        let hosts = p(
            r#"
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:30500"]
  capabilities = ["pull", "resolve"]
  dial_timeout = "500ms"

[host."https://mirror.internal/v2/proxy"]
  capabilities = ["pull"]
  ca = "mirror-ca.pem"
  skip_verify = true
  override_path = true
  [host."https://mirror.internal/v2/proxy".header]
    x-mirror-token = "abc"
    x-multi = ["1", "2"]

[host."zz.example:8443/base/"]
  ca = ["/abs/a.pem", "b.pem"]
"#,
            "docker.io",
        );
        let names: Vec<&str> = hosts.iter().map(|h| h.authority.as_str()).collect();
        assert_eq!(names, ["127.0.0.1:30500", "mirror.internal", "zz.example:8443", "registry-1.docker.io"]);
        let [local, mirror, zz, server] = &hosts[..] else { panic!() };
        assert!(!local.tls && local.resolve && local.pull);
        assert_eq!(local.dial_timeout, Some(Duration::from_millis(500)));
        assert_eq!(local.url("library/x/manifests/1"), "http://127.0.0.1:30500/v2/library/x/manifests/1?ns=docker.io");
        assert!(mirror.tls && mirror.pull && !mirror.resolve && mirror.skip_verify);
        assert_eq!(mirror.path, "/v2/proxy");
        assert_eq!(mirror.ca, [PathBuf::from("/etc/c/docker.io/mirror-ca.pem")]);
        assert_eq!(
            mirror.headers,
            [("x-mirror-token".into(), "abc".into()), ("x-multi".into(), "1".into()), ("x-multi".into(), "2".into())]
        );
        assert!(zz.tls);
        assert_eq!(zz.path, "/base/v2");
        assert_eq!(zz.ca, [PathBuf::from("/abs/a.pem"), PathBuf::from("/etc/c/docker.io/b.pem")]);
        assert!(server.tls && server.resolve && server.pull && server.ns.is_none());
        assert_eq!(server.base_url(), "https://registry-1.docker.io/v2");
        assert_eq!(server.url("library/x/blobs/sha256:1"), "https://registry-1.docker.io/v2/library/x/blobs/sha256:1");
    }

    #[test]
    fn order_is_file_order() {
        let hosts = p("[host.\"http://b\"]\n[host.\"http://a\"]\n[host.\"http://c\"]\n", "reg.io");
        let names: Vec<&str> = hosts.iter().map(|h| h.authority.as_str()).collect();
        assert_eq!(names, ["b", "a", "c", "reg.io"]);
        assert!(hosts[..3].iter().all(|h| h.ns.as_deref() == Some("reg.io")));
    }

    #[test]
    fn no_server_means_the_registry() {
        let hosts = p("skip_verify = true\nca = \"x.pem\"\n", "reg.io:5000");
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].authority, "reg.io:5000");
        assert!(hosts[0].tls && hosts[0].skip_verify);
        assert_eq!(hosts[0].ca, [PathBuf::from("/etc/c/docker.io/x.pem")]);
        // Loopback without a scheme: plain http, as without a file.
        let hosts = p("", "127.0.0.1:5000");
        assert!(!hosts[0].tls);
        assert_eq!(hosts[0].url("a/tags/list"), "http://127.0.0.1:5000/v2/a/tags/list");
        // An empty capabilities list means none.
        let hosts = p("[host.\"http://m\"]\ncapabilities = []\n", "reg.io");
        assert!(!hosts[0].pull && !hosts[0].resolve);
    }

    #[test]
    fn rejected() {
        for bad in [
            "server = 3",
            "[host.\"ftp://x\"]",
            "[host.\"http://x\"]\ncapabilities = [\"fly\"]",
            "[host.\"http://x\"]\ndial_timeout = \"5 parsecs\"",
            "[host.\"http://x\"]\nclient = \"c.pem\"",
            "[host.\"http://x\"]\n[host.\"http://x\".header]\nauthorization = \"Basic x\"",
            "[host.\"http://x\"]\n[host.\"http://x\".header]\n\"bad name\" = \"v\"",
            "[host.\"http://x?y=1\"]",
            "[host.\"http://\"]",
            "not toml at all [",
        ] {
            let r = parse(bad, Path::new("/h/hosts.toml"), Path::new("/h"), "reg.io", "reg.io", false);
            assert!(matches!(r, Err(Error::InvalidConfig { .. })), "{bad:?}: {r:?}");
        }
    }

    #[test]
    fn directories_and_defaults() {
        let root = Path::new("/etc/containerd/certs.d");
        assert_eq!(
            host_dirs(root, "127.0.0.1:5000"),
            [root.join("127.0.0.1_5000_"), root.join("127.0.0.1:5000"), root.join("_default")]
        );
        assert_eq!(host_dirs(root, "docker.io"), [root.join("docker.io"), root.join("_default")]);
        let dir = tempfile::tempdir().unwrap();
        // Nothing configured: the registry's own host.
        let hosts = load(Some(dir.path()), "docker.io", "registry-1.docker.io", false).unwrap();
        assert_eq!(hosts, [default_host("registry-1.docker.io", false)]);
        // _default applies to every registry without a directory of its own.
        std::fs::create_dir(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "[host.\"http://127.0.0.1:9\"]\n").unwrap();
        let hosts = load(Some(dir.path()), "quay.io", "quay.io", false).unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!(hosts[0].url("a/blobs/x"), "http://127.0.0.1:9/v2/a/blobs/x?ns=quay.io");
        assert_eq!(hosts[1].base_url(), "https://quay.io/v2");
        // A registry's own directory wins; without hosts.toml its *.crt files are CAs.
        std::fs::create_dir(dir.path().join("quay.io")).unwrap();
        std::fs::write(dir.path().join("quay.io/ca.crt"), "").unwrap();
        let hosts = load(Some(dir.path()), "quay.io", "quay.io", false).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].ca, [dir.path().join("quay.io/ca.crt")]);
        // Port directories in containerd's spelling.
        std::fs::create_dir(dir.path().join("localhost_5000_")).unwrap();
        std::fs::write(dir.path().join("localhost_5000_/hosts.toml"), "server = \"https://localhost:5000\"\n").unwrap();
        let hosts = load(Some(dir.path()), "localhost:5000", "localhost:5000", false).unwrap();
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].tls);
    }

    #[test]
    fn plain_http_and_loopback() {
        assert!(!default_host("127.0.0.1:5000", false).tls);
        assert!(!default_host("127.9.9.9:5000", false).tls);
        assert!(!default_host("localhost:5000", false).tls);
        assert!(!default_host("[::1]:5000", false).tls);
        assert!(default_host("127.0.0.1:443", false).tls);
        assert!(default_host("registry.example:5000", false).tls);
        assert!(!default_host("registry.example:5000", true).tls);
        assert!(default_host("128.0.0.1", false).tls);
        assert!(is_loopback("[::1]"));
        assert!(!is_loopback("[::2]:1"));
        assert!(!is_loopback("localhost.evil.example"));
    }

    #[test]
    fn go_durations() {
        for (s, ms) in [("500ms", 500), ("5s", 5000), ("1m30s", 90_000), ("1.5s", 1500), ("0", 0), ("2h", 7_200_000)] {
            assert_eq!(parse_go_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
        }
        for bad in ["", "5", "s", "5x", "-1s", "1..2s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
    }
}
