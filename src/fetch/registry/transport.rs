//! The request loop: one HTTP exchange with a registry host, with authentication,
//! redirects (followed here, so credentials never cross to another host), and retries
//! with exponential backoff and jitter, bounded in count and time.
//!
//! # Which failures are retried
//! On the last host configured for a registry (usually the only one), connection errors,
//! timeouts, 408, 429 (after `Retry-After`) and 5xx are retried. On a host followed by
//! others (a mirror) they are not: the caller moves on to the next host at once, as
//! containerd does, instead of spending the retry budget on a mirror that is down. A
//! broken body is resumed by the blob reader, on the same host, with `Range`.

use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::time::{Duration, Instant, SystemTime};

use ureq::Agent;
use ureq::http::{self, Method, Response};

use super::RegistryOptions;
use super::auth::{AuthState, Challenge, Credential, parse_challenges, parse_token_response, pull_scope};
use super::hosts::{HostEntry, is_loopback};
use crate::error::{Error, Result};
use crate::fetch::FetchObserver;

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// First backoff delay; doubled per attempt up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Largest token service answer read.
const MAX_TOKEN_BYTES: u64 = 1 << 20;
/// Well-known system CA bundles, trusted (with the host's `ca` files) when a host has a
/// `ca`; without one, the compiled-in webpki (Mozilla) roots are used.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// A host to talk to and the HTTP agent configured for it (TLS roots, timeouts).
pub(crate) struct Conn {
    pub(crate) entry: HostEntry,
    agent: Agent,
}

impl Conn {
    pub(crate) fn new(entry: HostEntry, opts: &RegistryOptions) -> Result<Conn> {
        let agent = build_agent(Some(&entry), opts)?;
        Ok(Conn { entry, agent })
    }

    pub(crate) fn host(&self) -> &str {
        &self.entry.authority
    }
}

/// An agent: redirects off (followed by hand), statuses as values, no compression
/// negotiated (blobs must arrive as stored), the options' timeouts and the host's TLS.
pub(crate) fn build_agent(entry: Option<&HostEntry>, opts: &RegistryOptions) -> Result<Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(e) = entry {
        if !e.ca.is_empty() {
            let mut certs: Vec<Certificate<'static>> = Vec::new();
            for path in SYSTEM_BUNDLES.iter().map(std::path::Path::new).filter(|p| p.exists()).take(1) {
                let pem = std::fs::read(path).map_err(|err| Error::io("read", path, err))?;
                certs.extend(pem_certs(&pem));
            }
            for path in &e.ca {
                let pem = std::fs::read(path).map_err(|err| Error::io("read", path, err))?;
                let found = pem_certs(&pem);
                if found.is_empty() {
                    return Err(Error::InvalidConfig {
                        path: path.clone(),
                        reason: format!("no PEM certificate in this `ca` file (for host {})", e.authority),
                    });
                }
                certs.extend(found);
            }
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        if e.skip_verify {
            tls = tls.disable_verification(true);
        }
    }
    let connect = entry.and_then(|e| e.dial_timeout).unwrap_or(opts.connect_timeout);
    let mut config = Agent::config_builder();
    // Proxies from the environment (`HTTPS_PROXY`, `NO_PROXY`), except for loopback
    // hosts, which no proxy can reach (Go's ProxyFromEnvironment makes the same exception).
    if entry.is_some_and(|e| is_loopback(&e.authority)) {
        config = config.proxy(None);
    }
    let config = config
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(opts.user_agent.as_str())
        .accept_encoding("identity")
        .timeout_connect(Some(connect))
        .timeout_resolve(Some(connect))
        .timeout_per_read(Some(opts.read_timeout))
        .timeout_recv_response(Some(opts.read_timeout.max(connect)))
        .tls_config(tls.build())
        .build();
    Ok(config.new_agent())
}

fn pem_certs(pem: &[u8]) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// One request to send.
pub(crate) struct Exchange<'a> {
    pub(crate) method: Method,
    /// The full URL (from [`HostEntry::url`]).
    pub(crate) url: String,
    /// The repository, for the token scope.
    pub(crate) repository: &'a str,
    /// Extra headers (`Accept`, `Range`).
    pub(crate) headers: Vec<(&'static str, String)>,
    /// What this is, for errors (`HEAD /v2/x/manifests/latest`).
    pub(crate) op: String,
}

/// The shared machinery: options, auth state and an agent for other hosts (redirect
/// targets such as object storage), which never carries a host's relaxed TLS settings.
pub(crate) struct Client {
    pub(crate) opts: RegistryOptions,
    pub(crate) auth: AuthState,
    foreign: Agent,
}

/// Why an attempt failed, and whether it may be tried again.
struct Failure {
    reason: String,
    status: Option<u16>,
    retry_after: Option<Duration>,
    retryable: bool,
}

impl Client {
    pub(crate) fn new(opts: RegistryOptions) -> Result<Client> {
        let foreign = build_agent(None, &opts)?;
        Ok(Client { opts, auth: AuthState::default(), foreign })
    }

    /// Send `x` to `conn`, authenticating, following redirects and retrying (when
    /// `retry`) as the options allow. Returns a 2xx response.
    ///
    /// # Errors
    /// [`Error::NotFound`] for 404, [`Error::Unauthorized`] for 401/403 that credentials
    /// did not cure, [`Error::Registry`] for anything else (naming the host, the request,
    /// the status or connection error, and the retries made).
    pub(crate) fn send(
        &self,
        conn: &Conn,
        x: &Exchange<'_>,
        observer: &dyn FetchObserver,
        retry: bool,
    ) -> Result<Response<ureq::Body>> {
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let mut unauthorized = 0;
        let scope = pull_scope(x.repository);
        loop {
            let auth = self.authorization(conn, &scope, observer, retry)?;
            let failure = match self.send_once(conn, &x.method, &x.url, &x.headers, auth.as_deref(), None) {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200..=299 => return Ok(resp),
                        401 => {
                            unauthorized += 1;
                            let sent = auth.as_deref();
                            self.on_unauthorized(conn, x, &scope, &resp, sent, unauthorized, observer, retry)?;
                            continue;
                        }
                        403 => {
                            return Err(Error::Unauthorized {
                                host: conn.host().to_string(),
                                op: x.op.clone(),
                                reason: format!("403 Forbidden{}", error_detail(resp)),
                            });
                        }
                        404 => {
                            return Err(Error::NotFound { what: format!("{} on {}", x.op, conn.host()) });
                        }
                        _ => status_failure(resp),
                    }
                }
                Err(e) => transport_failure(e),
            };
            let Some(delay) = self.may_retry(retry, &failure, attempt, started) else {
                return Err(Error::Registry {
                    host: conn.host().to_string(),
                    op: x.op.clone(),
                    status: failure.status,
                    reason: with_tries(&failure.reason, attempt),
                });
            };
            observer.retry(conn.host(), &failure.reason);
            std::thread::sleep(delay);
            attempt += 1;
        }
    }

    /// [`send`](Client::send) and read the whole body, at most `max` bytes (`what` names
    /// it in errors): a body that breaks or stalls is asked for again, within the same
    /// retry bounds. Returns the response head and the body.
    ///
    /// # Errors
    /// As `send`; [`Error::Registry`] for a body over `max` bytes, or one that kept
    /// breaking.
    pub(crate) fn fetch_small(
        &self,
        conn: &Conn,
        x: &Exchange<'_>,
        observer: &dyn FetchObserver,
        retry: bool,
        max: u64,
        what: &str,
    ) -> Result<(http::response::Parts, Vec<u8>)> {
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let fail =
            |reason: String| Error::Registry { host: conn.host().to_string(), op: x.op.clone(), status: None, reason };
        let too_big = |n: u64| fail(format!("{what} of {n} bytes, more than the {max} allowed"));
        loop {
            let (parts, body) = self.send(conn, x, observer, retry)?.into_parts();
            let length = parts.headers.get("content-length").and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
            if let Some(n) = length.filter(|&n| n > max) {
                return Err(too_big(n));
            }
            let mut bytes = Vec::new();
            match body.into_reader().take(max + 1).read_to_end(&mut bytes) {
                Ok(_) if bytes.len() as u64 > max => return Err(too_big(bytes.len() as u64)),
                Ok(_) => return Ok((parts, bytes)),
                Err(e) => {
                    let reason = format!("reading the {what}: {e}");
                    let failure = Failure { reason: reason.clone(), status: None, retry_after: None, retryable: true };
                    let Some(delay) = self.may_retry(retry, &failure, attempt, started) else {
                        return Err(fail(with_tries(&reason, attempt)));
                    };
                    observer.retry(conn.host(), &reason);
                    std::thread::sleep(delay);
                    attempt += 1;
                }
            }
        }
    }

    /// The `Authorization` value to send to `conn` for `scope`, from what the host asked
    /// for before: none until it challenges, then Basic credentials or a (cached, else
    /// fetched) Bearer token.
    fn authorization(
        &self,
        conn: &Conn,
        scope: &str,
        observer: &dyn FetchObserver,
        retry: bool,
    ) -> Result<Option<String>> {
        match self.auth.challenge(conn.host()) {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self.credentials(conn)?.and_then(|c| c.basic_header())),
            Some(challenge @ Challenge::Bearer { .. }) => {
                if let Some(t) = self.auth.token(conn.host(), scope) {
                    return Ok(Some(t));
                }
                self.fetch_token(conn, &challenge, scope, None, observer, retry).map(Some)
            }
        }
    }

    fn credentials(&self, conn: &Conn) -> Result<Option<Credential>> {
        self.auth.credentials(conn.host(), &self.opts.credentials, self.opts.auth_files)
    }

    /// A 401: learn the challenge (and drop a rejected token) so that the next attempt
    /// authenticates, or fail when that cannot help.
    #[allow(clippy::too_many_arguments)]
    fn on_unauthorized(
        &self,
        conn: &Conn,
        x: &Exchange<'_>,
        scope: &str,
        resp: &Response<ureq::Body>,
        sent: Option<&str>,
        count: u32,
        observer: &dyn FetchObserver,
        retry: bool,
    ) -> Result<()> {
        let host = conn.host();
        let denied = |reason: String| Error::Unauthorized { host: host.to_string(), op: x.op.clone(), reason };
        let challenges: Vec<Challenge> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let Some(challenge) = challenges.into_iter().next() else {
            return Err(denied("401 without a Basic or Bearer challenge".into()));
        };
        // Anonymous, then a token (or Basic), then one fresh token if a cached one was
        // rejected: more 401s than that are final.
        if count > 2 {
            return Err(denied("credentials or token rejected".into()));
        }
        match &challenge {
            Challenge::Basic => {
                if sent.is_some() && matches!(self.auth.challenge(host), Some(Challenge::Basic)) {
                    return Err(denied("Basic credentials rejected".into()));
                }
                if self.credentials(conn)?.and_then(|c| c.basic_header()).is_none() {
                    return Err(denied(
                        "the registry asks for Basic credentials and none are configured for this host".into(),
                    ));
                }
            }
            Challenge::Bearer { .. } => {
                if let Some(rejected) = sent {
                    self.auth.forget_token(host, scope, rejected);
                }
                if sent.is_some() && count > 1 {
                    return Err(denied("a fresh token was rejected".into()));
                }
                self.auth.set_challenge(host, challenge.clone());
                // Asked with the server's scope too, when it named another one.
                let extra = match &challenge {
                    Challenge::Bearer { scope: Some(s), .. } if s != scope => Some(s.as_str()),
                    _ => None,
                };
                self.fetch_token(conn, &challenge, scope, extra, observer, retry)?;
                return Ok(());
            }
        }
        self.auth.set_challenge(host, challenge);
        Ok(())
    }

    /// Ask the challenge's realm for a token for `scope` (and `extra`, a scope the server
    /// named), with the host's credentials when there are some and the realm may have
    /// them. Caches it under `scope` until it expires.
    fn fetch_token(
        &self,
        conn: &Conn,
        challenge: &Challenge,
        scope: &str,
        extra: Option<&str>,
        observer: &dyn FetchObserver,
        retry: bool,
    ) -> Result<String> {
        let Challenge::Bearer { realm, service, .. } = challenge else { unreachable!("fetch_token on Basic") };
        let host = conn.host();
        // One request per host and scope at a time; whoever waited uses what it got (a
        // token the cache still holds was not the rejected one: see `forget_token`).
        let flight = self.auth.token_flight(host, scope);
        let _flight = flight.lock();
        if extra.is_none()
            && let Some(t) = self.auth.token(host, scope)
        {
            return Ok(t);
        }
        let op = format!("token from {realm}");
        let fail = |status: Option<u16>, reason: String| Error::Registry {
            host: host.to_string(),
            op: op.clone(),
            status,
            reason,
        };
        let Some((scheme, realm_authority)) = origin(realm) else {
            return Err(fail(None, "the Bearer realm is not an http(s) URL".into()));
        };
        // Credentials go to the realm only over TLS, or to loopback, or to the host itself.
        let creds = self.credentials(conn)?;
        let realm_trusted = scheme == "https" || is_loopback(&realm_authority) || realm_authority == host;
        let creds = creds.filter(|_| realm_trusted);
        let mut query = Vec::new();
        if let Some(s) = service {
            query.push(format!("service={}", super::hosts::percent_encode(s)));
        }
        for s in std::iter::once(scope).chain(extra) {
            query.push(format!("scope={}", super::hosts::percent_encode(s)));
        }
        let (method, url, body, auth) = match &creds {
            Some(Credential::IdentityToken(t)) => {
                let mut form = vec![
                    "grant_type=refresh_token".to_string(),
                    format!("refresh_token={}", super::hosts::percent_encode(t)),
                    "client_id=rootfs-cache".to_string(),
                ];
                form.extend(query);
                (Method::POST, realm.clone(), Some(form.join("&")), None)
            }
            other => {
                let sep = if realm.contains('?') { '&' } else { '?' };
                let url = format!("{realm}{sep}{}", query.join("&"));
                (Method::GET, url, None, other.as_ref().and_then(Credential::basic_header))
            }
        };
        let headers: Vec<(&'static str, String)> = match body {
            Some(_) => vec![("content-type", "application/x-www-form-urlencoded".into())],
            None => Vec::new(),
        };
        let started = Instant::now();
        let mut attempt: u32 = 0;
        let body = loop {
            let failure = match self.send_once(conn, &method, &url, &headers, auth.as_deref(), body.as_deref()) {
                Ok(resp) => match resp.status().as_u16() {
                    200 => {
                        let mut bytes = Vec::new();
                        match resp.into_body().into_reader().take(MAX_TOKEN_BYTES).read_to_end(&mut bytes) {
                            Ok(_) => break bytes,
                            Err(e) => Failure {
                                reason: format!("reading the token: {e}"),
                                status: None,
                                retry_after: None,
                                retryable: true,
                            },
                        }
                    }
                    status @ (401 | 403) => {
                        return Err(Error::Unauthorized {
                            host: host.to_string(),
                            op,
                            reason: format!(
                                "the token service answered {status}{}",
                                if creds.is_some() {
                                    " to this host's credentials"
                                } else {
                                    " (no credentials for this host)"
                                }
                            ),
                        });
                    }
                    _ => status_failure(resp),
                },
                Err(e) => transport_failure(e),
            };
            let Some(delay) = self.may_retry(retry, &failure, attempt, started) else {
                return Err(fail(failure.status, with_tries(&failure.reason, attempt)));
            };
            observer.retry(host, &format!("token service: {}", failure.reason));
            std::thread::sleep(delay);
            attempt += 1;
        };
        let (token, lifetime) = parse_token_response(&body).map_err(|r| fail(None, r))?;
        let header = format!("Bearer {token}");
        self.auth.set_token(host, scope, header.clone(), lifetime);
        Ok(header)
    }

    /// One request, redirects followed by hand: `Authorization` goes only to the origin
    /// of `url` (the host, or a token realm), the host's `hosts.toml` headers and TLS
    /// settings (`ca`, `skip_verify`) only to the host itself; another host (object
    /// storage behind a redirect, a token realm elsewhere) gets an agent with default TLS
    /// settings.
    pub(crate) fn send_once(
        &self,
        conn: &Conn,
        method: &Method,
        url: &str,
        headers: &[(&'static str, String)],
        auth: Option<&str>,
        body: Option<&str>,
    ) -> std::result::Result<Response<ureq::Body>, ureq::Error> {
        // `auth` is for the origin of the first URL (the host, or a token realm); the
        // host's `hosts.toml` headers and TLS settings are for the host's own origin only,
        // never for a token realm elsewhere (containerd's authorizer sees neither).
        let home = origin(url);
        let own = origin(&conn.entry.base_url());
        let mut url = url.to_string();
        let mut method = method.clone();
        for _ in 0..=MAX_REDIRECTS {
            let here = origin(&url);
            let (same, on_host) = (here == home, here == own);
            let mut req = http::Request::builder().method(method.clone()).uri(url.as_str());
            let host_headers: &[(String, String)] = if on_host { &conn.entry.headers } else { &[] };
            for (k, v) in hop_headers(same, headers, host_headers, auth) {
                req = req.header(k, v);
            }
            let agent = if on_host { &conn.agent } else { &self.foreign };
            let resp = match body {
                Some(b) => agent.run(req.body(b).map_err(ureq::Error::Http)?)?,
                None => agent.run(req.body(()).map_err(ureq::Error::Http)?)?,
            };
            let status = resp.status().as_u16();
            if !matches!(status, 301 | 302 | 303 | 307 | 308) || body.is_some() {
                return Ok(resp);
            }
            let Some(next) = header(&resp, "location").and_then(|l| resolve_location(&url, &l)) else {
                return Err(ureq::Error::BadUri(format!("redirect {status} without a usable Location")));
            };
            if status == 303 && method != Method::HEAD {
                method = Method::GET;
            }
            url = next;
        }
        Err(ureq::Error::TooManyRedirects)
    }
}

/// The headers of one hop: the request's own (`Accept`, `Range`) always; the host's
/// `hosts.toml` headers and `Authorization` only while the URL is on the host the request
/// was for (`same_origin`), never after a redirect to another one.
fn hop_headers<'a>(
    same_origin: bool,
    request: &'a [(&'static str, String)],
    host: &'a [(String, String)],
    auth: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<(&str, &str)> = request.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if same_origin {
        out.extend(host.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(a) = auth {
            out.push(("authorization", a));
        }
    }
    out
}

impl Client {
    /// The delay before another attempt, if one may start: the caller allows retries,
    /// the failure is transient, and neither the count nor the time bound is reached.
    fn may_retry(&self, retry: bool, failure: &Failure, attempt: u32, started: Instant) -> Option<Duration> {
        let delay = failure.retry_after.unwrap_or_else(|| backoff(attempt));
        let ok = retry
            && failure.retryable
            && attempt < self.opts.max_retries
            && started.elapsed().saturating_add(delay) <= self.opts.max_retry_time;
        ok.then_some(delay)
    }
}

/// `reason`, with the number of retries made when there were some.
fn with_tries(reason: &str, attempt: u32) -> String {
    if attempt > 0 { format!("{reason} (after {attempt} retries)") } else { reason.to_string() }
}

/// A non-2xx status other than 401/403/404 as a failure: 408, 429 (with its
/// `Retry-After`) and 5xx are transient; the registry's explanation is kept.
fn status_failure(resp: Response<ureq::Body>) -> Failure {
    let status = resp.status().as_u16();
    let retry_after = header(&resp, "retry-after").and_then(|v| parse_retry_after(&v, SystemTime::now()));
    let transient = matches!(status, 408 | 429 | 500..=599);
    let what = if transient { "HTTP" } else { "unexpected HTTP" };
    Failure {
        reason: format!("{what} {status}{}", error_detail(resp)),
        status: Some(status),
        retry_after: retry_after.filter(|_| transient),
        retryable: transient,
    }
}

/// Classify a transport error.
fn transport_failure(e: ureq::Error) -> Failure {
    let retryable = matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
    );
    Failure { reason: e.to_string(), status: None, retry_after: None, retryable }
}

/// A header's value as a string.
pub(crate) fn header(resp: &Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// The first part of a registry's JSON error body, for messages (consumes the response).
fn error_detail(resp: Response<ureq::Body>) -> String {
    let mut body = Vec::new();
    let _ = resp.into_body().into_reader().take(512).read_to_end(&mut body);
    detail_text(&body)
}

fn detail_text(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body).chars().filter(|c| !c.is_control()).take(200).collect();
    if text.trim().is_empty() { String::new() } else { format!(": {}", text.trim()) }
}

/// `(scheme, authority)` of an absolute http(s) URL, lowercased scheme.
pub(crate) fn origin(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    // Userinfo in a URL would be a credential of its own: refuse it.
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    // The default port is the same origin as no port.
    let authority = match (scheme.as_str(), authority.strip_suffix(":443"), authority.strip_suffix(":80")) {
        ("https", Some(a), _) | ("http", _, Some(a)) => a.to_string(),
        _ => authority,
    };
    Some((scheme, authority))
}

/// The absolute URL a `Location` header points to, from the URL that answered.
pub(crate) fn resolve_location(base: &str, location: &str) -> Option<String> {
    let location = location.trim();
    if location.is_empty() || location.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    if origin(location).is_some() {
        return Some(location.to_string());
    }
    if location.contains("://") {
        return None; // another scheme
    }
    let (scheme, rest) = base.split_once("://")?;
    if let Some(r) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{r}"));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if location.starts_with('/') {
        return Some(format!("{scheme}://{authority}{location}"));
    }
    // Relative to the base path's directory.
    let path = rest[end..].split(['?', '#']).next().unwrap_or("");
    let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
    let dir = if dir.is_empty() { "/" } else { dir };
    Some(format!("{scheme}://{authority}{dir}{location}"))
}

/// Exponential backoff with jitter: `BASE·2^attempt` capped at [`MAX_BACKOFF`], of which
/// a random half is waited on top of the other half ("equal jitter").
pub(crate) fn backoff(attempt: u32) -> Duration {
    let full = BASE_BACKOFF.saturating_mul(1u32 << attempt.min(16)).min(MAX_BACKOFF);
    let half = full / 2;
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    let r = h.finish();
    half + Duration::from_nanos(r % (half.as_nanos() as u64).max(1))
}

/// `Retry-After`: delay-seconds or an HTTP-date (IMF-fixdate), relative to `now`.
/// A date in the past is zero; anything else unparsable is `None`.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = parse_http_date(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    let (_, rest) = s.split_once(", ")?;
    let parts: Vec<&str> = rest.split(' ').collect();
    let [day, month, year, time, "GMT"] = parts[..] else { return None };
    let day: u64 = day.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == month)? as u64
        + 1;
    // IMF-fixdate has four digits; a longer year is simply far in the future (and would
    // overflow the arithmetic below).
    let year: i64 = year.parse::<i64>().ok()?.min(9999);
    let hms: Vec<u64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let [h, m, sec] = hms[..] else { return None };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    // A hostile year (`Retry-After: …, 9223372036854775807 …`) must not overflow.
    let days = era.checked_mul(146_097)?.checked_add(doe - 719_468)?;
    let secs = u64::try_from(days).ok()?.checked_mul(86_400)?.checked_add(h * 3600 + m * 60 + sec)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now), Some(Duration::ZERO));
        assert_eq!(
            parse_http_date("Thu, 01 Jan 2026 00:00:00 GMT"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600))
        );
        for bad in ["", "-1", "1.5", "soon", "Sun, 06 Nov 1994 08:49:37 PST", "Sun, 32 Nov 1994 08:49:37 GMT"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        for attempt in 0..20 {
            let full = BASE_BACKOFF.saturating_mul(1 << attempt.min(16)).min(MAX_BACKOFF);
            let d = backoff(attempt);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(30) <= MAX_BACKOFF);
        // Jitter: not always the same.
        let all: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(3)).collect();
        assert!(all.len() > 1);
    }

    #[test]
    fn origins() {
        assert_eq!(origin("https://Reg.Example:443/v2/x"), Some(("https".into(), "reg.example".into())));
        assert_eq!(origin("http://127.0.0.1:5000/v2/"), Some(("http".into(), "127.0.0.1:5000".into())));
        assert_eq!(origin("http://h:80"), Some(("http".into(), "h".into())));
        assert_eq!(origin("https://h:80/"), Some(("https".into(), "h:80".into())));
        assert_eq!(origin("https://user:pw@h/"), None);
        assert_eq!(origin("ftp://h/"), None);
        assert_eq!(origin("/relative"), None);
    }

    #[test]
    fn redirects_resolve_and_cross_host_is_detected() {
        let base = "https://reg.example/v2/a/blobs/sha256:1?ns=docker.io";
        for (loc, want) in [
            ("https://s3.example/bucket/x?sig=1", Some("https://s3.example/bucket/x?sig=1")),
            ("//cdn.example/x", Some("https://cdn.example/x")),
            ("/v2/a/blobs/other", Some("https://reg.example/v2/a/blobs/other")),
            ("other", Some("https://reg.example/v2/a/blobs/other")),
            ("", None),
            ("ftp://x/y", None),
            ("https://x/a b", None),
        ] {
            assert_eq!(resolve_location(base, loc).as_deref(), want, "{loc:?}");
        }
        // What send_once compares: a redirect to another host is another origin (no
        // Authorization, no hosts.toml headers); to the same host it is not.
        let home = origin(base);
        assert_ne!(origin(&resolve_location(base, "https://s3.example/x").unwrap()), home);
        assert_ne!(origin(&resolve_location(base, "//reg.example.evil/x").unwrap()), home);
        assert_ne!(origin(&resolve_location(base, "http://reg.example/x").unwrap()), home);
        assert_eq!(origin(&resolve_location(base, "/x").unwrap()), home);
        assert_eq!(origin(&resolve_location(base, "https://REG.example:443/x").unwrap()), home);
    }

    #[test]
    fn credentials_do_not_cross_redirects() {
        let request = vec![("accept", "application/json".to_string()), ("range", "bytes=10-".to_string())];
        let host = vec![("x-mirror-token".to_string(), "t".to_string())];
        let base = "https://reg.example/v2/a/blobs/sha256:1";
        for (location, same) in [
            ("/v2/a/blobs/sha256:1?retry", true),
            ("https://reg.example:443/elsewhere", true),
            ("https://s3.example/bucket/blob?sig=x", false),
            ("http://reg.example/v2/a/blobs/sha256:1", false),
            ("https://reg.example:8443/v2/", false),
            ("//reg.example.evil/x", false),
        ] {
            let next = resolve_location(base, location).unwrap();
            let is_same = origin(&next) == origin(base);
            assert_eq!(is_same, same, "{location}");
            let sent = hop_headers(is_same, &request, &host, Some("Bearer secret"));
            let names: Vec<&str> = sent.iter().map(|(k, _)| *k).collect();
            assert!(names.contains(&"accept") && names.contains(&"range"), "{location}: {names:?}");
            assert_eq!(names.contains(&"authorization"), same, "{location}: {names:?}");
            assert_eq!(names.contains(&"x-mirror-token"), same, "{location}: {names:?}");
        }
    }

    use std::sync::{Arc, Mutex};

    use super::super::auth::Credential;
    use super::super::hosts::default_host;
    use super::super::testutil::{Events, header_of, response, server, target};

    fn client(creds: Option<(&str, Credential)>) -> (Client, RegistryOptions) {
        let mut opts = RegistryOptions::default().with_auth_files(false).with_max_retries(3);
        if let Some((h, c)) = creds {
            opts = opts.with_credential(h, c);
        }
        (Client::new(opts.clone()).unwrap(), opts)
    }

    fn get<'a>(conn: &Conn, repo: &'a str) -> Exchange<'a> {
        let rest = format!("{repo}/manifests/v1");
        Exchange {
            method: Method::GET,
            url: conn.entry.url(&rest),
            repository: repo,
            headers: vec![],
            op: format!("GET /v2/{rest}"),
        }
    }

    /// A token service: Basic `u:p` gets token `tok-<n>` for the scope asked; counts requests.
    fn token_service(lifetime: u64) -> (String, Arc<Mutex<Vec<String>>>) {
        server(move |n, head| {
            if header_of(head, "authorization").as_deref() != Some("Basic dTpw") {
                return response("401 Unauthorized", &[], b"", 0);
            }
            let body = format!(r#"{{"token":"tok-{n}","expires_in":{lifetime}}}"#);
            response("200 OK", &[("Content-Type", "application/json".into())], body.as_bytes(), body.len())
        })
    }

    #[test]
    fn bearer_tokens_are_fetched_with_credentials_cached_per_scope_and_refreshed_once() {
        let (tokens, token_log) = token_service(300);
        // The registry takes a token only for the repository it was issued for, and
        // rejects `tok-0` once it has been used twice (a revoked token).
        let issued: Arc<Mutex<Vec<String>>> = Arc::default();
        let uses = Arc::new(Mutex::new(0));
        let realm = format!("http://{tokens}/token");
        let (issued2, uses2) = (Arc::clone(&issued), Arc::clone(&uses));
        let (reg, reg_log) = server(move |_, head| {
            let challenge = vec![("WWW-Authenticate", format!(r#"Bearer realm="{realm}",service="svc""#))];
            match header_of(head, "authorization") {
                Some(a) if a.starts_with("Bearer tok-") => {
                    if a == "Bearer tok-0" {
                        let mut u = uses2.lock().unwrap();
                        *u += 1;
                        if *u > 2 {
                            return response("401 Unauthorized", &challenge, b"", 0);
                        }
                    }
                    issued2.lock().unwrap().push(a);
                    response("200 OK", &[], b"{}", 2)
                }
                _ => response("401 Unauthorized", &challenge, b"", 0),
            }
        });
        let (c, opts) = client(Some((&reg, Credential::basic("u", "p"))));
        let conn = Conn::new(default_host(&reg, false), &opts).unwrap();
        let ev = Events::default();
        // Anonymous, 401, token (with Basic), retried with it.
        c.send(&conn, &get(&conn, "a"), &ev, true).unwrap();
        assert_eq!(reg_log.lock().unwrap().len(), 2);
        let t = token_log.lock().unwrap().clone();
        assert_eq!(t.len(), 1);
        assert!(
            target(&t[0]).contains("service=svc") && target(&t[0]).contains("scope=repository%3Aa%3Apull"),
            "{t:?}"
        );
        // Cached for the scope: no token request, no 401.
        c.send(&conn, &get(&conn, "a"), &ev, true).unwrap();
        assert_eq!((reg_log.lock().unwrap().len(), token_log.lock().unwrap().len()), (3, 1));
        // Another repository: a token of its own, fetched up front (the host is known to
        // want Bearer).
        c.send(&conn, &get(&conn, "b"), &ev, true).unwrap();
        assert_eq!((reg_log.lock().unwrap().len(), token_log.lock().unwrap().len()), (4, 2));
        assert_eq!(issued.lock().unwrap().last().map(String::as_str), Some("Bearer tok-1"));
        // tok-0 is now rejected: one fresh token, and the request goes through.
        c.send(&conn, &get(&conn, "a"), &ev, true).unwrap();
        assert_eq!(token_log.lock().unwrap().len(), 3);
        assert_eq!(issued.lock().unwrap().last().map(String::as_str), Some("Bearer tok-2"));
    }

    #[test]
    fn concurrent_requests_with_a_rejected_token_share_one_fresh_token() {
        let (tokens, token_log) = token_service(300);
        let realm = format!("http://{tokens}/token");
        // `tok-0` works once (the warm-up), then is revoked; later tokens work.
        let (reg, _) = server(move |n, head| {
            let challenge = vec![("WWW-Authenticate", format!(r#"Bearer realm="{realm}",service="svc""#))];
            match header_of(head, "authorization") {
                Some(a) if a.starts_with("Bearer tok-") && (a != "Bearer tok-0" || n < 2) => {
                    response("200 OK", &[], b"{}", 2)
                }
                _ => response("401 Unauthorized", &challenge, b"", 0),
            }
        });
        let (c, opts) = client(Some((&reg, Credential::basic("u", "p"))));
        let c = Arc::new(c);
        let conn = Arc::new(Conn::new(default_host(&reg, false), &opts).unwrap());
        c.send(&conn, &get(&conn, "a"), &Events::default(), true).unwrap();
        assert_eq!(token_log.lock().unwrap().len(), 1);
        // Eight requests at once, all with the revoked `tok-0`: one of them asks for a
        // fresh token, the others wait for it and use it (none forgets it again).
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, conn) = (Arc::clone(&c), Arc::clone(&conn));
                std::thread::spawn(move || c.send(&conn, &get(&conn, "a"), &Events::default(), true).map(drop))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let asked = token_log.lock().unwrap().len();
        assert_eq!(asked, 2, "token requests");
    }

    #[test]
    fn a_rejected_fresh_token_and_missing_credentials_are_unauthorized() {
        let (tokens, token_log) = token_service(300);
        let realm = format!("http://{tokens}/token");
        let (reg, _) = server(move |_, _| {
            response("401 Unauthorized", &[("WWW-Authenticate", format!(r#"Bearer realm="{realm}""#))], b"", 0)
        });
        let (c, opts) = client(Some((&reg, Credential::basic("u", "p"))));
        let conn = Conn::new(default_host(&reg, false), &opts).unwrap();
        match c.send(&conn, &get(&conn, "a"), &Events::default(), true) {
            Err(Error::Unauthorized { host, .. }) => assert_eq!(host, reg),
            r => panic!("{:?}", r.map(|_| ())),
        }
        assert!(token_log.lock().unwrap().len() <= 2, "{:?}", token_log.lock().unwrap());
        // Without credentials the token service refuses: Unauthorized, naming the host.
        let (c, opts) = client(None);
        let conn = Conn::new(default_host(&reg, false), &opts).unwrap();
        match c.send(&conn, &get(&conn, "a"), &Events::default(), true) {
            Err(Error::Unauthorized { host, reason, .. }) => {
                assert_eq!(host, reg);
                assert!(reason.contains("no credentials"), "{reason}");
            }
            r => panic!("{:?}", r.map(|_| ())),
        }
    }

    #[test]
    fn basic_auth_and_no_credentials_across_a_redirect() {
        let (store, store_log) = server(|_, _| response("200 OK", &[], b"blob", 4));
        let store_url = format!("http://{store}");
        let (reg, reg_log) = server(move |_, head| match header_of(head, "authorization") {
            Some(a) if a == "Basic dTpw" => {
                response("307 Temporary Redirect", &[("Location", format!("{store_url}/bucket/x?sig=1"))], b"", 0)
            }
            _ => response("401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="r""#.into())], b"", 0),
        });
        let (c, opts) = client(Some((&reg, Credential::basic("u", "p"))));
        let mut entry = default_host(&reg, false);
        entry.headers.push(("x-mirror-token".into(), "secret".into()));
        let conn = Conn::new(entry, &opts).unwrap();
        let mut resp = c.send(&conn, &get(&conn, "a"), &Events::default(), true).unwrap();
        let mut body = String::new();
        resp.body_mut().as_reader().read_to_string(&mut body).unwrap();
        assert_eq!(body, "blob");
        let reg_heads = reg_log.lock().unwrap().clone();
        assert_eq!(reg_heads.len(), 2);
        assert_eq!(header_of(&reg_heads[1], "x-mirror-token").as_deref(), Some("secret"));
        let store_heads = store_log.lock().unwrap().clone();
        assert_eq!(store_heads.len(), 1);
        assert_eq!(target(&store_heads[0]), "/bucket/x?sig=1");
        assert_eq!(header_of(&store_heads[0], "authorization"), None, "{}", store_heads[0]);
        assert_eq!(header_of(&store_heads[0], "x-mirror-token"), None, "{}", store_heads[0]);
    }

    #[test]
    fn retry_after_is_honoured_and_retries_are_bounded() {
        let (reg, log) = server(|n, _| match n {
            0 => response("429 Too Many Requests", &[("Retry-After", "1".into())], b"", 0),
            1 => response("503 Service Unavailable", &[], b"", 0),
            _ => response("200 OK", &[], b"{}", 2),
        });
        let (c, opts) = client(None);
        let conn = Conn::new(default_host(&reg, false), &opts).unwrap();
        let ev = Events::default();
        let start = Instant::now();
        c.send(&conn, &get(&conn, "a"), &ev, true).unwrap();
        assert!(start.elapsed() >= Duration::from_secs(1));
        assert_eq!(log.lock().unwrap().len(), 3);
        let events = ev.0.lock().unwrap().clone();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(events[0].contains("HTTP 429") && events[1].contains("HTTP 503"), "{events:?}");
        // Always 500: max_retries (3) retries, then an error naming the host and status.
        let (reg, log) = server(|_, _| response("500 Internal Server Error", &[], b"boom", 4));
        let conn = Conn::new(default_host(&reg, false), &opts).unwrap();
        match c.send(&conn, &get(&conn, "a"), &Events::default(), true) {
            Err(Error::Registry { host, status: Some(500), reason, .. }) => {
                assert_eq!(host, reg);
                assert!(reason.contains("boom") && reason.contains("after 3 retries"), "{reason}");
            }
            r => panic!("{:?}", r.map(|_| ())),
        }
        assert_eq!(log.lock().unwrap().len(), 4);
        // Not retried when the caller says so (a mirror with hosts after it).
        let (reg, log) = server(|_, _| response("503 Service Unavailable", &[], b"", 0));
        let conn = Conn::new(default_host(&reg, false), &opts).unwrap();
        assert!(c.send(&conn, &get(&conn, "a"), &Events::default(), false).is_err());
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn error_details() {
        assert_eq!(detail_text(br#"{"errors":[{"code":"DENIED"}]}"#), r#": {"errors":[{"code":"DENIED"}]}"#);
        assert_eq!(detail_text(b"  \n"), "");
    }
}
