//! Red team: `Registry` against hostile registries, mirrors, token services and
//! hosts.toml files. Each attack is a scripted HTTP server in the test (a thread with a
//! `TcpListener` answering canned bytes) so that every lie is exactly the one meant; the
//! real-registry suite is `tests/registry.rs`.
//!
//! What is checked, everywhere: no panic, a typed error (naming the host) in bounded time
//! and with a bounded number of requests, no credential or hosts.toml header sent where
//! it does not belong, and never a wrong byte handed out as a verified blob.

#![cfg(feature = "registry")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rootfs_cache::{Credential, Descriptor, Error, ImageFetcher, Reference, Registry, RegistryOptions};

// ---------------------------------------------------------------------------------------
// A scripted server

/// A request as the hostile server saw it.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    target: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    fn range_start(&self) -> Option<usize> {
        self.header("range")?.strip_prefix("bytes=")?.split('-').next()?.parse().ok()
    }
}

type Log = Arc<Mutex<Vec<Req>>>;

fn read_req(s: &mut TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 || buf.len() > 1 << 20 {
            return None;
        }
        buf.push(b[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Req { method, target, headers })
}

/// Serve on `bind` (e.g. `127.0.0.1:0`): `handler(n, request, stream)` writes the answer
/// of the n-th request (one request per connection). Returns `host:port` and the log.
fn serve_on(bind: &str, handler: impl Fn(usize, &Req, &mut TcpStream) + Send + Sync + 'static) -> (String, Log) {
    let listener = TcpListener::bind(bind).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log: Log = Arc::default();
    let log2 = Arc::clone(&log);
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let (log, handler) = (Arc::clone(&log2), Arc::clone(&handler));
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                if let Some(req) = read_req(&mut s) {
                    let n = {
                        let mut l = log.lock().unwrap();
                        l.push(req.clone());
                        l.len() - 1
                    };
                    handler(n, &req, &mut s);
                }
            });
        }
    });
    (addr, log)
}

fn serve(handler: impl Fn(usize, &Req, &mut TcpStream) + Send + Sync + 'static) -> (String, Log) {
    serve_on("127.0.0.1:0", handler)
}

/// An HTTP/1.1 answer with a Content-Length of `len` (the body may be shorter: a cut).
fn reply(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8], len: usize) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn ok(s: &mut TcpStream, headers: &[(&str, String)], body: &[u8], head: bool) {
    reply(s, "200 OK", headers, if head { b"" } else { body }, body.len());
}

/// A chunked answer: the body in one chunk (of any size), no Content-Length.
fn chunked(s: &mut TcpStream, headers: &[(&str, String)], body: &[u8]) {
    let mut head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n".to_string();
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("\r\n{:x}\r\n", body.len()));
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.write_all(b"\r\n0\r\n\r\n");
}

fn n_requests(log: &Log) -> usize {
    log.lock().unwrap().len()
}

// ---------------------------------------------------------------------------------------
// Images

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn sha(b: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{:x}", sha2::Sha256::digest(b))
}

fn manifest_with(layers: &[(String, String)]) -> Vec<u8> {
    let list: Vec<String> =
        layers.iter().map(|(d, size)| format!(r#"{{"mediaType":"{LAYER}","digest":"{d}","size":{size}}}"#)).collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{}]}}"#,
        sha(b"{}"),
        list.join(",")
    )
    .into_bytes()
}

fn manifest(blobs: &[&[u8]]) -> Vec<u8> {
    manifest_with(&blobs.iter().map(|b| (sha(b), b.len().to_string())).collect::<Vec<_>>())
}

/// Pseudo-random bytes without a short period (a resume answered from offset 0 must
/// differ from the bytes it claims to be).
fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect()
}

/// A well-behaved registry for repository `r`: `m` under tag `t` and by digest, `blobs`
/// by digest (Range honoured).
fn honest(m: Vec<u8>, blobs: Vec<Vec<u8>>) -> (String, Log) {
    serve(move |_, req, s| honest_answer(&m, &blobs, req, s))
}

fn honest_answer(m: &[u8], blobs: &[Vec<u8>], req: &Req, s: &mut TcpStream) {
    let head = req.method == "HEAD";
    let path = req.path();
    if path == "/v2/r/manifests/t" || path == format!("/v2/r/manifests/{}", sha(m)) {
        let h = [("Content-Type", OCI_MANIFEST.to_string()), ("Docker-Content-Digest", sha(m))];
        return ok(s, &h, m, head);
    }
    if let Some(b) = blobs.iter().find(|b| path == format!("/v2/r/blobs/{}", sha(b))) {
        return match req.range_start() {
            Some(from) if from > 0 => {
                let cr = format!("bytes {from}-{}/{}", b.len() - 1, b.len());
                reply(s, "206 Partial Content", &[("Content-Range", cr)], &b[from..], b.len() - from);
            }
            _ => ok(s, &[], b, head),
        };
    }
    reply(s, "404 Not Found", &[], b"", 0);
}

/// Short timeouts, few retries, no auth files of whoever runs the tests.
fn fast() -> RegistryOptions {
    RegistryOptions::default()
        .with_auth_files(false)
        .with_connect_timeout(Duration::from_secs(1))
        .with_read_timeout(Duration::from_secs(1))
        .with_max_retries(2)
        .with_max_retry_time(Duration::from_secs(3))
}

fn registry(opts: RegistryOptions) -> Registry {
    Registry::new(opts).unwrap()
}

/// Read the whole blob; the bytes handed out and the error, if any.
fn read_blob(r: &Registry, d: &Descriptor) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut reader = match r.open_blob(d) {
        Ok(rd) => rd,
        Err(e) => return (got, Some(std::io::Error::other(e))),
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

fn hosts_dir(dir: &Path, name: &str, toml: &str) {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    std::fs::write(dir.join(name).join("hosts.toml"), toml).unwrap();
}

fn basic_u_p() -> &'static str {
    "Basic dTpw" // u:p
}

// ---------------------------------------------------------------------------------------
// Retry-After and token lifetimes a hostile server picks

#[test]
fn retry_after_of_u64_max_seconds_fails_typed_without_panicking() {
    let (host, log) = serve(|_, _, s| {
        reply(s, "429 Too Many Requests", &[("Retry-After", u64::MAX.to_string())], b"", 0);
    });
    let start = Instant::now();
    let r = registry(fast()).resolve(&format!("{host}/r:t"));
    match r {
        Err(Error::Registry { host: h, status: Some(429), .. }) => assert_eq!(h, host),
        r => panic!("{r:?}"),
    }
    // Not waited for, not retried.
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(n_requests(&log), 1);
}

#[test]
fn retry_after_dates_far_in_the_future_fail_typed_without_panicking() {
    for date in [
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Fri, 31 Dec 299999999999 23:59:59 GMT",
        "Fri, 31 Dec 9223372036854775807 23:59:59 GMT",
    ] {
        let (host, log) = serve(move |_, _, s| {
            reply(s, "503 Service Unavailable", &[("Retry-After", date.to_string())], b"", 0);
        });
        let start = Instant::now();
        match registry(fast()).resolve(&format!("{host}/r:t")) {
            Err(Error::Registry { status: Some(503), .. }) => {}
            r => panic!("{date}: {r:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{date}");
        assert_eq!(n_requests(&log), 1, "{date}");
    }
}

#[test]
fn retry_after_of_a_billion_seconds_is_bounded_by_max_retry_time() {
    let (host, log) =
        serve(|_, _, s| reply(s, "429 Too Many Requests", &[("Retry-After", "1000000000".into())], b"", 0));
    let start = Instant::now();
    assert!(matches!(registry(fast()).resolve(&format!("{host}/r:t")), Err(Error::Registry { status: Some(429), .. })));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(n_requests(&log), 1);
}

/// A registry wanting `Bearer <token>` from a token service at `realm`.
fn bearer_registry(realm: String, token: &'static str, m: Vec<u8>) -> (String, Log) {
    serve(move |_, req, s| {
        if req.header("authorization") == Some(&format!("Bearer {token}")) {
            return honest_answer(&m, &[], req, s);
        }
        let c = format!(r#"Bearer realm="{realm}",service="svc""#);
        reply(s, "401 Unauthorized", &[("WWW-Authenticate", c)], b"", 0);
    })
}

#[test]
fn a_token_that_never_expires_does_not_panic() {
    let (tokens, _) = serve(|_, _, s| {
        let body = format!(r#"{{"token":"forever","expires_in":{}}}"#, u64::MAX);
        ok(s, &[], body.as_bytes(), false);
    });
    let m = manifest(&[b"x"]);
    let (host, _) = bearer_registry(format!("http://{tokens}/token"), "forever", m.clone());
    let image = registry(fast()).resolve(&format!("{host}/r:t")).unwrap();
    assert_eq!(image.digest.to_string(), sha(&m));
}

#[test]
fn a_token_always_rejected_is_one_retry_then_unauthorized() {
    let (tokens, token_log) = serve(|n, _, s| {
        let body = format!(r#"{{"token":"t{n}","expires_in":300}}"#);
        ok(s, &[], body.as_bytes(), false);
    });
    let (host, log) = bearer_registry(format!("http://{tokens}/token"), "never-this-one", manifest(&[b"x"]));
    let start = Instant::now();
    match registry(fast()).resolve(&format!("{host}/r:t")) {
        Err(Error::Unauthorized { host: h, .. }) => assert_eq!(h, host),
        r => panic!("{r:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(n_requests(&token_log) <= 2, "{:?}", token_log.lock().unwrap());
    assert!(n_requests(&log) <= 3, "{:?}", log.lock().unwrap());
}

#[test]
fn huge_or_malformed_challenges_are_typed_errors() {
    for challenge in [
        format!("Bearer realm=\"http://127.0.0.1:1/{}\"", "a".repeat(60_000)),
        "Bearer realm=".to_string(),
        "Bearer realm=\"ftp://x/\"".to_string(),
        "Bearer realm=\"http://user:pw@127.0.0.1:1/token\"".to_string(),
        "Bearer ,,,,=\"\"\"".to_string(),
        "Negotiate abc".to_string(),
        "Bearer realm=\"\u{7f}\"".to_string(),
    ] {
        let c = challenge.clone();
        let (host, log) =
            serve(move |_, _, s| reply(s, "401 Unauthorized", &[("WWW-Authenticate", c.clone())], b"", 0));
        let start = Instant::now();
        match registry(fast()).resolve(&format!("{host}/r:t")) {
            Err(Error::Unauthorized { .. } | Error::Registry { .. }) => {}
            r => panic!("{}: {r:?}", &challenge[..challenge.len().min(60)]),
        }
        assert!(start.elapsed() < Duration::from_secs(4), "{}", &challenge[..challenge.len().min(60)]);
        assert!(n_requests(&log) <= 4, "{}", &challenge[..challenge.len().min(60)]);
    }
}

// ---------------------------------------------------------------------------------------
// Credentials and hosts.toml headers go only where they belong

/// A registry wanting Basic `u:p`; once authenticated, every request is redirected to
/// `to(request)`.
fn redirecting_registry(to: impl Fn(&Req) -> String + Send + Sync + 'static) -> (String, Log) {
    serve(move |_, req, s| {
        if req.header("authorization") == Some(basic_u_p()) {
            reply(s, "307 Temporary Redirect", &[("Location", to(req))], b"", 0);
        } else {
            reply(s, "401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="r""#.into())], b"", 0);
        }
    })
}

fn secret_header_opts(dir: &Path, host: &str) -> RegistryOptions {
    let (h, p) = host.rsplit_once(':').unwrap();
    hosts_dir(
        dir,
        &format!("{h}_{p}_"),
        &format!("server = \"http://{host}\"\n[header]\n  x-mirror-secret = \"s3cr3t\"\n"),
    );
    fast().with_hosts_dir(dir).with_credential(host, Credential::basic("u", "p"))
}

fn assert_no_secrets(who: &str, log: &Log) {
    for req in log.lock().unwrap().iter() {
        assert_eq!(req.header("authorization"), None, "{who}: {req:?}");
        assert_eq!(req.header("x-mirror-secret"), None, "{who}: {req:?}");
    }
}

#[test]
fn redirects_to_another_port_or_loopback_address_get_no_credentials_or_headers() {
    // The target answers 404: the test is about what it was sent.
    let (other_port, other_log) = serve(|_, _, s| reply(s, "404 Not Found", &[], b"", 0));
    let (other_ip, other_ip_log) = serve_on("127.0.0.2:0", |_, _, s| reply(s, "404 Not Found", &[], b"", 0));
    for (target, log) in [(other_port, other_log), (other_ip, other_ip_log)] {
        let t = target.clone();
        let (host, reg_log) = redirecting_registry(move |req| format!("http://{t}{}", req.target));
        let dir = tempfile::tempdir().unwrap();
        let r = registry(secret_header_opts(dir.path(), &host));
        assert!(r.resolve(&format!("{host}/r:t")).is_err());
        assert!(n_requests(&log) >= 1, "{target}: the redirect was not followed");
        assert_no_secrets(&target, &log);
        // The registry itself got them.
        let reg = reg_log.lock().unwrap();
        assert!(reg.iter().any(|q| q.header("authorization") == Some(basic_u_p())));
        assert!(reg.iter().all(|q| q.header("x-mirror-secret") == Some("s3cr3t")), "{reg:?}");
    }
}

#[test]
fn redirects_to_the_same_socket_under_another_name_get_no_credentials() {
    // localhost:P is 127.0.0.1:P on the wire, but another host to docker and containerd.
    let (host, log) = redirecting_registry(|_| String::new());
    let port = host.rsplit_once(':').unwrap().1.to_string();
    let (host2, log2) = {
        // A second registry whose redirect goes to localhost:<its own port>.
        let listener_port = Arc::new(Mutex::new(String::new()));
        let lp = Arc::clone(&listener_port);
        let (h, l) = redirecting_registry(move |req| format!("http://localhost:{}{}", lp.lock().unwrap(), req.target));
        *listener_port.lock().unwrap() = h.rsplit_once(':').unwrap().1.to_string();
        (h, l)
    };
    let _ = (host, log, port);
    let dir = tempfile::tempdir().unwrap();
    let r = registry(secret_header_opts(dir.path(), &host2));
    assert!(r.resolve(&format!("{host2}/r:t")).is_err());
    let reqs = log2.lock().unwrap().clone();
    // Requests that came back through `localhost`: Host header says so.
    let via_localhost: Vec<&Req> =
        reqs.iter().filter(|q| q.header("host").is_some_and(|h| h.starts_with("localhost"))).collect();
    assert!(!via_localhost.is_empty(), "{reqs:?}");
    for q in via_localhost {
        assert_eq!(q.header("authorization"), None, "{q:?}");
        assert_eq!(q.header("x-mirror-secret"), None, "{q:?}");
    }
    assert!(reqs.len() <= 12, "{}", reqs.len());
}

#[test]
fn redirects_to_userinfo_urls_are_refused_unsent() {
    let (target, tlog) = serve(|_, _, s| reply(s, "200 OK", &[], b"{}", 2));
    let t = target.clone();
    let (host, _) = redirecting_registry(move |req| format!("http://evil:pass@{t}{}", req.target));
    let dir = tempfile::tempdir().unwrap();
    match registry(secret_header_opts(dir.path(), &host)).resolve(&format!("{host}/r:t")) {
        Err(Error::Registry { host: h, .. }) => assert_eq!(h, host),
        r => panic!("{r:?}"),
    }
    assert_eq!(n_requests(&tlog), 0);
}

#[test]
fn a_redirect_chain_through_another_host_carries_nothing_there() {
    // A → B → A: B gets nothing; A (the host the credentials are for) may get them back.
    let m = manifest(&[b"x"]);
    let b_addr: Arc<Mutex<String>> = Arc::default();
    let b2 = Arc::clone(&b_addr);
    let m2 = m.clone();
    let (a, a_log) = serve(move |_, req, s| {
        if req.header("authorization") != Some(basic_u_p()) {
            return reply(s, "401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="r""#.into())], b"", 0);
        }
        if req.target.contains("back=1") {
            return honest_answer(&m2, &[], req, s);
        }
        let sep = if req.target.contains('?') { '&' } else { '?' };
        let loc = format!("http://{}/bounce?to={}{sep}back=1", b2.lock().unwrap(), req.target);
        reply(s, "302 Found", &[("Location", loc)], b"", 0);
    });
    let a2 = a.clone();
    let (b, b_log) = serve(move |_, req, s| {
        let to = req.target.split_once("to=").map(|(_, t)| t.to_string()).unwrap_or_default();
        reply(s, "302 Found", &[("Location", format!("http://{a2}{to}"))], b"", 0);
    });
    *b_addr.lock().unwrap() = b.clone();
    let dir = tempfile::tempdir().unwrap();
    let image = registry(secret_header_opts(dir.path(), &a)).resolve(&format!("{a}/r:t")).unwrap();
    assert_eq!(image.digest.to_string(), sha(&m));
    assert!(n_requests(&b_log) >= 1);
    assert_no_secrets("B", &b_log);
    assert!(n_requests(&a_log) >= 2);
}

#[test]
fn hosts_toml_headers_do_not_go_to_a_token_realm_on_another_host() {
    // containerd sends hosts.toml `header`s with the registry requests only; its token
    // fetches (docker.NewDockerAuthorizer) never see them.
    let (tokens, token_log) = serve(|_, _, s| ok(s, &[], br#"{"token":"tk","expires_in":300}"#, false));
    let m = manifest(&[b"x"]);
    let (host, reg_log) = bearer_registry(format!("http://{tokens}/token"), "tk", m);
    let dir = tempfile::tempdir().unwrap();
    let r = registry(secret_header_opts(dir.path(), &host));
    r.resolve(&format!("{host}/r:t")).unwrap();
    assert!(n_requests(&token_log) >= 1);
    for q in token_log.lock().unwrap().iter() {
        assert_eq!(q.header("x-mirror-secret"), None, "token service got the hosts.toml header: {q:?}");
        // Basic credentials to a realm elsewhere are Docker's protocol (loopback here).
        assert_eq!(q.header("authorization"), Some(basic_u_p()), "{q:?}");
    }
    assert!(reg_log.lock().unwrap().iter().all(|q| q.header("x-mirror-secret") == Some("s3cr3t")));
}

#[test]
fn credentials_of_the_registry_never_go_to_its_mirror() {
    let m = manifest(&[b"x"]);
    // The mirror asks for Basic: it must fail without being sent the registry's creds.
    let (mirror, mirror_log) =
        serve(|_, _, s| reply(s, "401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="m""#.into())], b"", 0));
    let m2 = m.clone();
    let (host, _) = serve(move |_, req, s| {
        if req.header("authorization") == Some(basic_u_p()) {
            honest_answer(&m2, &[], req, s)
        } else {
            reply(s, "401 Unauthorized", &[("WWW-Authenticate", r#"Basic realm="r""#.into())], b"", 0)
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (h, p) = host.rsplit_once(':').unwrap();
    hosts_dir(dir.path(), &format!("{h}_{p}_"), &format!("server = \"http://{host}\"\n[host.\"http://{mirror}\"]\n"));
    let r = registry(fast().with_hosts_dir(dir.path()).with_credential(&host, Credential::basic("u", "p")));
    let image = r.resolve(&format!("{host}/r:t")).unwrap();
    assert_eq!(image.digest.to_string(), sha(&m));
    assert!(n_requests(&mirror_log) >= 1);
    assert_no_secrets("mirror", &mirror_log);
}

#[test]
fn secrets_stay_out_of_debug_output_and_error_messages() {
    let opts = fast()
        .with_credential("a.example", Credential::basic("user", "hunter2"))
        .with_credential("b.example", Credential::IdentityToken("idtok-SECRET".into()));
    let shown = format!("{opts:?} {:?}", registry(opts.clone()));
    assert!(!shown.contains("hunter2") && !shown.contains("idtok-SECRET"), "{shown}");
    // A redirect to a signed URL that then fails: the signature is not in the error.
    let (host, _) = redirecting_registry(|_| "http://127.0.0.1:1/blob?X-Amz-Signature=SIGSECRET".to_string());
    let e = registry(fast().with_credential(&host, Credential::basic("u", "hunter2")))
        .resolve(&format!("{host}/r:t"))
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("SIGSECRET") && !text.contains("hunter2") && !text.contains("dTpodW50ZXIy"), "{text}");
    // A rejected token is not echoed.
    let (tokens, _) = serve(|_, _, s| ok(s, &[], br#"{"token":"TOKSECRET","expires_in":300}"#, false));
    let (host, _) = bearer_registry(format!("http://{tokens}/token"), "other", manifest(&[b"x"]));
    let e = registry(fast()).resolve(&format!("{host}/r:t")).unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("TOKSECRET"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Lying manifests

#[test]
fn a_docker_content_digest_contradicting_the_body_is_a_content_mismatch() {
    let m = manifest(&[b"x"]);
    let other = manifest(&[b"y"]);
    // HEAD names m's digest; GET by that digest returns other bytes.
    let (m2, o2) = (m.clone(), other.clone());
    let (host, _) = serve(move |_, req, s| {
        let h = [("Content-Type", OCI_MANIFEST.to_string()), ("Docker-Content-Digest", sha(&m2))];
        ok(s, &h, &o2, req.method == "HEAD");
    });
    match registry(fast()).resolve(&format!("{host}/r:t")) {
        Err(Error::ContentMismatch { host: h, .. }) => assert_eq!(h, host),
        r => panic!("{r:?}"),
    }
    // No HEAD support, GET by tag with a digest header that lies.
    let (host, _) = serve(move |_, req, s| {
        if req.method == "HEAD" {
            return reply(s, "405 Method Not Allowed", &[], b"", 0);
        }
        let h = [("Content-Type", OCI_MANIFEST.to_string()), ("Docker-Content-Digest", sha(&m))];
        ok(s, &h, &other, false);
    });
    assert!(matches!(registry(fast()).resolve(&format!("{host}/r:t")), Err(Error::ContentMismatch { .. })));
    // A digest reference answered with other bytes.
    let want = sha(b"nope");
    let (host, _) =
        serve(|_, req, s| ok(s, &[("Content-Type", OCI_MANIFEST.into())], &manifest(&[b"z"]), req.method == "HEAD"));
    assert!(matches!(registry(fast()).resolve(&format!("{host}/r@{want}")), Err(Error::ContentMismatch { .. })));
}

#[test]
fn manifests_over_4_mib_are_refused_with_and_without_content_length() {
    let big = {
        let mut m = manifest(&[b"x"]);
        let pad = (4 << 20) + 1 - m.len();
        m.truncate(m.len() - 1);
        m.extend_from_slice(format!(r#","annotations":{{"p":"{}"}}}}"#, "x".repeat(pad - 22)).as_bytes());
        m
    };
    assert!(big.len() > 4 << 20 && big.len() < (4 << 20) + 64, "{}", big.len());
    for with_length in [true, false] {
        let b = big.clone();
        let (host, _) = serve(move |_, req, s| {
            let h = [("Content-Type", OCI_MANIFEST.to_string())];
            if req.method == "HEAD" {
                return reply(s, "200 OK", &h, b"", 2);
            }
            if with_length { ok(s, &h, &b, false) } else { chunked(s, &h, &b) }
        });
        match registry(fast()).resolve(&format!("{host}/r:t")) {
            Err(Error::Registry { reason, .. }) => assert!(reason.contains("4194304"), "{reason}"),
            r => panic!("with_length={with_length}: {r:?}"),
        }
    }
    // Exactly 4 MiB is fine.
    let mut exact = big.clone();
    let cut = exact.len() - (4 << 20);
    let at = exact.len() - 4;
    exact.drain(at - cut..at);
    assert_eq!(exact.len(), 4 << 20);
    let (host, _) = honest(exact.clone(), vec![]);
    assert_eq!(registry(fast()).resolve(&format!("{host}/r:t")).unwrap().digest.to_string(), sha(&exact));
}

#[test]
fn an_index_pointing_to_itself_or_nested_too_deep_is_refused_in_bounded_requests() {
    // An index cannot contain its own digest, but a chain of indexes can be as deep as
    // the registry likes: a(0) → a(1) → … → a(20).
    let mut chain: Vec<Vec<u8>> = Vec::new();
    let mut next = manifest(&[b"x"]);
    let leaf = next.clone();
    for _ in 0..20 {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_INDEX}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            sha(&next),
            next.len()
        );
        chain.push(next);
        next = idx.into_bytes();
    }
    chain.push(leaf);
    let top = next.clone();
    let (host, log) = serve(move |_, req, s| {
        let path = req.path();
        let doc = if path == "/v2/r/manifests/t" || path == format!("/v2/r/manifests/{}", sha(&top)) {
            Some(&top)
        } else {
            chain.iter().find(|d| path == format!("/v2/r/manifests/{}", sha(d)))
        };
        match doc {
            Some(d) => {
                ok(s, &[("Content-Type", OCI_INDEX.into()), ("Docker-Content-Digest", sha(d))], d, req.method == "HEAD")
            }
            None => reply(s, "404 Not Found", &[], b"", 0),
        }
    });
    let opts = fast().with_platform("linux/amd64".parse().unwrap());
    match registry(opts).resolve(&format!("{host}/r:t")) {
        Err(Error::InvalidImage { reason, .. }) => assert!(reason.contains("nested"), "{reason}"),
        r => panic!("{r:?}"),
    }
    assert!(n_requests(&log) <= 12, "{}", n_requests(&log));
}

#[test]
fn schema1_json_bombs_and_odd_documents_are_clean_errors() {
    let schema1 = br#"{"schemaVersion":1,"name":"r","tag":"t","fsLayers":[],"signatures":[]}"#.to_vec();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let deep_obj =
        format!(r#"{{"schemaVersion":2,"layers":{}{}}}"#, "[".repeat(50_000), "]".repeat(50_000)).into_bytes();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("application/vnd.docker.distribution.manifest.v1+prettyjws", schema1.clone()),
        ("application/vnd.docker.distribution.manifest.v1+json", schema1.clone()),
        ("application/json", schema1),
        (OCI_MANIFEST, deep),
        (OCI_MANIFEST, deep_obj),
        (OCI_MANIFEST, b"null".to_vec()),
        (OCI_MANIFEST, b"".to_vec()),
        (
            OCI_MANIFEST,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","layers":[]}"#.to_vec(),
        ),
        (OCI_MANIFEST, manifest_with(&[(sha(b"a"), "-1".into())])),
        (OCI_MANIFEST, manifest_with(&[(sha(b"a"), "1e3".into())])),
        (OCI_MANIFEST, manifest_with(&[(sha(b"a"), "18446744073709551616".into())])),
        (OCI_MANIFEST, manifest_with(&[("sha512:00".into(), "1".into())])),
        (OCI_MANIFEST, manifest_with(&[(sha(b"a").to_uppercase().replace("SHA256", "sha256"), "1".into())])),
        (OCI_MANIFEST, manifest_with(&[("sha256:../../etc/passwd".into(), "1".into())])),
    ];
    for (ct, body) in cases {
        let (b, c) = (body.clone(), ct.to_string());
        let (host, _) = serve(move |_, req, s| {
            ok(s, &[("Content-Type", c.clone()), ("Docker-Content-Digest", sha(&b))], &b, req.method == "HEAD")
        });
        let start = Instant::now();
        match registry(fast()).resolve(&format!("{host}/r:t")) {
            Err(Error::Unsupported { .. } | Error::InvalidImage { .. } | Error::InvalidDigest { .. }) => {}
            r => panic!("{ct} {:?}: {r:?}", String::from_utf8_lossy(&body[..body.len().min(80)])),
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{ct}");
    }
}

#[test]
fn a_manifest_with_many_layers_resolves_without_blowing_up() {
    let layers: Vec<(String, String)> = (0..20_000u32).map(|i| (sha(&i.to_le_bytes()), "1".to_string())).collect();
    let m = manifest_with(&layers);
    assert!(m.len() < 4 << 20);
    let (host, _) = honest(m, vec![]);
    let start = Instant::now();
    let image = registry(fast()).resolve(&format!("{host}/r:t")).unwrap();
    assert_eq!(image.layers.len(), 20_000);
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------------------
// Lying blobs

/// Resolve `m` from `host` (tag `t`) and return the registry and its first layer.
fn first_layer(host: &str, opts: RegistryOptions) -> (Registry, Descriptor) {
    let r = registry(opts);
    let image = r.resolve(&format!("{host}/r:t")).unwrap();
    let d = image.layers[0].clone();
    (r, d)
}

#[test]
fn descriptor_sizes_of_zero_and_u64_max_fail_typed_and_hand_out_nothing_wrong() {
    let blob = data(300_000, 1);
    for size in ["0".to_string(), u64::MAX.to_string(), (blob.len() + 1).to_string()] {
        let m = manifest_with(&[(sha(&blob), size.clone())]);
        for chunk in [false, true] {
            let (b, m2) = (blob.clone(), m.clone());
            let (host, log) = serve(move |_, req, s| {
                if req.path().contains("/blobs/") && chunk {
                    return chunked(s, &[], &b);
                }
                honest_answer(&m2, std::slice::from_ref(&b), req, s)
            });
            let (r, d) = first_layer(&host, fast());
            let start = Instant::now();
            let (got, err) = read_blob(&r, &d);
            assert!(err.is_some(), "size {size} chunked={chunk}: read {} bytes and no error", got.len());
            assert!(blob.starts_with(&got), "size {size}: wrong bytes handed out");
            assert!(start.elapsed() < Duration::from_secs(6), "size {size} chunked={chunk}");
            assert!(n_requests(&log) <= 8, "size {size} chunked={chunk}: {}", n_requests(&log));
        }
    }
}

#[test]
fn a_blob_longer_than_its_descriptor_yields_exactly_the_blob() {
    let blob = data(300_000, 2);
    let m = manifest(&[&blob]);
    let (b, m2) = (blob.clone(), m.clone());
    let (host, _) = serve(move |_, req, s| {
        if req.path().contains("/blobs/") {
            let mut longer = b.clone();
            longer.extend_from_slice(&data(5_000_000, 9));
            return chunked(s, &[], &longer);
        }
        honest_answer(&m2, &[], req, s)
    });
    let (r, d) = first_layer(&host, fast());
    let (got, err) = read_blob(&r, &d);
    assert!(err.is_none(), "{err:?}");
    assert!(got == blob);
}

#[test]
fn content_length_lies_are_typed_errors() {
    let blob = data(300_000, 3);
    let m = manifest(&[&blob]);
    for declared in [blob.len() + 10, blob.len() - 10, 0] {
        let (b, m2) = (blob.clone(), m.clone());
        let (host, _) = serve(move |_, req, s| {
            if req.path().contains("/blobs/") {
                return reply(s, "200 OK", &[], &b, declared);
            }
            honest_answer(&m2, &[], req, s)
        });
        let (r, d) = first_layer(&host, fast());
        let (got, err) = read_blob(&r, &d);
        assert!(err.is_some(), "Content-Length {declared}");
        assert!(blob.starts_with(&got));
    }
}

#[test]
fn a_resume_answered_at_the_wrong_offset_or_with_other_bytes_never_hands_out_wrong_bytes() {
    let blob = data(3 << 20, 4);
    let m = manifest(&[&blob]);
    // mode 0: 206 with a Content-Range starting at 0 (and the bytes from 0);
    // mode 1: 206 claiming the right start but carrying bytes from offset 0;
    // mode 2: 200 (Range ignored) with a different blob of the same length.
    for mode in 0..3 {
        let (b, m2) = (blob.clone(), m.clone());
        let (host, _) = serve(move |n, req, s| {
            if !req.path().contains("/blobs/") {
                return honest_answer(&m2, &[], req, s);
            }
            match req.range_start() {
                None => reply(s, "200 OK", &[], &b[..2 << 20], b.len()), // cut at 2 MiB
                Some(from) => match mode {
                    0 => {
                        let cr = format!("bytes 0-{}/{}", b.len() - 1, b.len());
                        reply(s, "206 Partial Content", &[("Content-Range", cr)], &b, b.len())
                    }
                    1 => {
                        let cr = format!("bytes {from}-{}/{}", b.len() - 1, b.len());
                        reply(s, "206 Partial Content", &[("Content-Range", cr)], &b[..b.len() - from], b.len() - from)
                    }
                    _ => {
                        let other = data(b.len(), 99 + n as u32);
                        reply(s, "200 OK", &[], &other, other.len())
                    }
                },
            }
        });
        let (r, d) = first_layer(&host, fast());
        let (got, err) = read_blob(&r, &d);
        assert!(err.is_some(), "mode {mode}: no error");
        assert!(blob.starts_with(&got), "mode {mode}: wrong bytes handed out ({} bytes)", got.len());
        // Only the unverified head (the blob less its held-back last MiB) went out.
        assert!(got.len() <= blob.len() - (1 << 20), "mode {mode}: {}", got.len());
    }
}

#[test]
fn a_small_blob_from_a_lying_host_is_never_handed_out() {
    let blob = data(500_000, 5);
    let m = manifest(&[&blob]);
    let m2 = m.clone();
    let (host, _) = serve(move |_, req, s| {
        if req.path().contains("/blobs/") {
            let mut bad = data(500_000, 5);
            bad[499_999] ^= 1;
            return ok(s, &[], &bad, false);
        }
        honest_answer(&m2, &[], req, s)
    });
    let (r, d) = first_layer(&host, fast());
    let (got, err) = read_blob(&r, &d);
    assert!(got.is_empty(), "{} bytes handed out", got.len());
    let err = err.unwrap();
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
    assert!(matches!(inner, Some(Error::ContentMismatch { .. })), "{err}");
}

// ---------------------------------------------------------------------------------------
// Servers that hang, loop or trickle

#[test]
fn a_redirect_loop_is_a_bounded_typed_error() {
    let (host, log) = serve(|_, req, s| reply(s, "302 Found", &[("Location", req.target.clone())], b"", 0));
    let start = Instant::now();
    match registry(fast()).resolve(&format!("{host}/r:t")) {
        Err(Error::Registry { host: h, .. }) => assert_eq!(h, host),
        r => panic!("{r:?}"),
    }
    assert!(n_requests(&log) <= 11 * 3, "{}", n_requests(&log));
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_server_that_never_answers_times_out_typed() {
    let (host, log) = serve(|_, _, _s| std::thread::sleep(Duration::from_secs(30)));
    let start = Instant::now();
    match registry(fast()).resolve(&format!("{host}/r:t")) {
        Err(Error::Registry { host: h, .. }) => assert_eq!(h, host),
        r => panic!("{r:?}"),
    }
    // read timeout 1 s, 2 retries, 3 s of retry time.
    assert!(start.elapsed() < Duration::from_secs(8), "{:?}", start.elapsed());
    assert!(n_requests(&log) <= 3);
}

#[test]
fn a_blob_that_stalls_midway_is_resumed_then_given_up_in_bounded_time() {
    let blob = data(400_000, 6);
    let m = manifest(&[&blob]);
    let (b, m2) = (blob.clone(), m.clone());
    let (host, log) = serve(move |_, req, s| {
        if !req.path().contains("/blobs/") {
            return honest_answer(&m2, &[], req, s);
        }
        // Headers and some bytes, then silence.
        let from = req.range_start().unwrap_or(0);
        let mut head = format!(
            "HTTP/1.1 {}\r\nContent-Length: {}\r\n",
            if from > 0 { "206 Partial Content" } else { "200 OK" },
            b.len() - from
        );
        if from > 0 {
            head.push_str(&format!("Content-Range: bytes {from}-{}/{}\r\n", b.len() - 1, b.len()));
        }
        head.push_str("\r\n");
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&b[from..(from + 1000).min(b.len())]);
        std::thread::sleep(Duration::from_secs(30));
    });
    let (r, d) = first_layer(&host, fast());
    let start = Instant::now();
    let (got, err) = read_blob(&r, &d);
    assert!(err.is_some());
    assert!(got.is_empty(), "small blob: nothing unverified goes out");
    assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
    assert!(n_requests(&log) <= 8);
}

// ---------------------------------------------------------------------------------------
// hosts.toml

#[test]
fn hosts_toml_errors_name_the_file_and_odd_settings_are_typed() {
    for (toml, want_config_error) in [
        ("server = 5\n", true),
        ("[host.\"http://127.0.0.1:1\"]\n  capabilities = \"pull\"\n", true),
        ("[host.\"http://127.0.0.1:1\"]\n  skip_verify = \"yes\"\n", true),
        ("[host.\"http://127.0.0.1:1\"]\n  dial_timeout = \"1e400s\"\n", true),
        ("[host.\"http://127.0.0.1:1\"]\n  header = { \"bad name\" = \"v\" }\n", true),
        ("[host.\"http://127.0.0.1:1\"]\n  header = { x = \"a\\r\\nInjected: 1\" }\n", true),
        ("[host.\"http://127.0.0.1:1?ns=evil\"]\n", true),
        ("[host.\"gopher://127.0.0.1:1\"]\n", true),
        ("server = \"http://u:p@127.0.0.1:1\"\n", true),
        ("this is not toml", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        hosts_dir(dir.path(), "reg.example", toml);
        match registry(fast().with_hosts_dir(dir.path())).resolve("reg.example/r:t") {
            Err(Error::InvalidConfig { path, .. }) if want_config_error => {
                assert_eq!(path, dir.path().join("reg.example/hosts.toml"), "{toml}")
            }
            r => panic!("{toml:?}: {r:?}"),
        }
    }
    // capabilities = []: no host may resolve or pull.
    let dir = tempfile::tempdir().unwrap();
    hosts_dir(dir.path(), "reg.example", "server = \"http://127.0.0.1:1\"\ncapabilities = []\n");
    assert!(matches!(
        registry(fast().with_hosts_dir(dir.path())).resolve("reg.example/r:t"),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn a_relative_ca_path_is_read_from_the_hosts_directory_not_the_cwd() {
    let dir = tempfile::tempdir().unwrap();
    hosts_dir(dir.path(), "reg.example", "server = \"https://127.0.0.1:1\"\nca = \"../../etc/hostname\"\n");
    // The path is relative to the registry's directory; escaping it is allowed (containerd
    // too) but it is a file, not a CA: a typed config error naming it.
    match registry(fast().with_hosts_dir(dir.path())).resolve("reg.example/r:t") {
        Err(Error::InvalidConfig { path, .. }) => {
            assert!(path.starts_with(dir.path().join("reg.example")), "{}", path.display())
        }
        Err(Error::Io { .. }) => {}
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_mirror_is_found_for_an_ipv6_loopback_registry_as_containerd_names_its_directory() {
    // containerd (hostPaths) splits `[::1]:5000` with net.SplitHostPort: `::1_5000_`.
    let Ok(probe) = TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback: skipped");
        return;
    };
    drop(probe);
    let m = manifest(&[b"x"]);
    let (mirror, mirror_log) = honest(m.clone(), vec![]);
    let (v6, _) = serve_on("[::1]:0", |_, _, s| reply(s, "503 Service Unavailable", &[], b"", 0));
    let port = v6.rsplit_once(':').unwrap().1;
    let dir = tempfile::tempdir().unwrap();
    hosts_dir(dir.path(), &format!("::1_{port}_"), &format!("[host.\"http://{mirror}\"]\n"));
    let r = registry(fast().with_hosts_dir(dir.path()));
    let image = r.resolve(&format!("[::1]:{port}/r:t")).unwrap();
    assert_eq!(image.digest.to_string(), sha(&m));
    assert!(n_requests(&mirror_log) >= 1);
}

// ---------------------------------------------------------------------------------------
// References

#[test]
fn reference_corner_cases() {
    let hex = "a".repeat(64);
    let good = [
        "localhost:5000/a".to_string(),
        format!("a/b/c/d:tag@sha256:{hex}"),
        format!("reg.example:443/a/b/c/d:{}", "t".repeat(128)),
        "[::1]:5000/a:t".to_string(),
    ];
    for g in &good {
        assert!(g.parse::<Reference>().is_ok(), "{g}");
    }
    let bad = [
        format!("a:{}", "t".repeat(129)),
        format!("a@sha256:{}", "A".repeat(64)),
        format!("a@sha512:{}", "a".repeat(128)),
        format!("a@sha256:{}", "a".repeat(63)),
        "../a".to_string(),
        "reg.example/../a".to_string(),
        "a//b".to_string(),
        "a:".to_string(),
        "".to_string(),
        "reg.example:99999999999999999999/a".to_string(),
        "user:pw@reg.example/a".to_string(),
        "reg.example/a?ns=x".to_string(),
    ];
    for b in &bad {
        match b.parse::<Reference>() {
            Err(Error::InvalidReference { .. }) => {}
            r => panic!("{b:?}: {r:?}"),
        }
    }
    // A well-formed reference naming a hosts dir outside the root: `..` can't be a host.
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(registry(fast().with_hosts_dir(dir.path())).resolve(".."), Err(Error::InvalidReference { .. })));
}
