//! Registry authentication: credentials (given by the embedder, or from the Docker and
//! podman auth files and credential helpers), `WWW-Authenticate` challenges, and the
//! per-host token cache. The HTTP exchange for a token lives in the transport; everything
//! here is pure or local state.
//!
//! # Security
//! Credentials are looked up by the host actually contacted (a mirror gets the
//! mirror's credentials, never the upstream registry's) and are only ever attached to
//! requests for that host: the transport strips them from redirects to other hosts.
//! A Bearer realm gets the host's credentials only over HTTPS (or on loopback, or on the
//! host itself), since the realm is named by the server.

use std::collections::HashMap;
use std::fmt;
use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Credentials for one registry host.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Credential {
    /// A user name and password (or a personal access token as the password): sent as
    /// HTTP Basic to hosts that ask for it, and to their Bearer token service.
    Basic {
        /// The user name.
        username: String,
        /// The password or access token.
        password: String,
    },
    /// An OAuth2 refresh token (`identitytoken` in a Docker config), exchanged at the
    /// Bearer token service for access tokens.
    IdentityToken(String),
}

impl Credential {
    /// Basic credentials.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Credential {
        Credential::Basic { username: username.into(), password: password.into() }
    }

    /// The `Authorization` value for HTTP Basic, when these are basic credentials.
    pub(crate) fn basic_header(&self) -> Option<String> {
        match self {
            Credential::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Credential::IdentityToken(_) => None,
        }
    }
}

impl fmt::Debug for Credential {
    /// Never shows a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic {{ username: {username:?}, password: <redacted> }}"),
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Challenges

/// One `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// HTTP Basic.
    Basic,
    /// A token service (distribution's token auth).
    Bearer {
        /// Where to ask for a token.
        realm: String,
        /// The `service` parameter to pass along.
        service: Option<String>,
        /// The scope the server asked for, if it said.
        scope: Option<String>,
    },
}

/// The challenges of a `WWW-Authenticate` header value that this client can answer,
/// Bearer first (a server offering both prefers tokens). Unknown schemes are skipped;
/// a Bearer challenge without a realm is skipped.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    for (scheme, params) in parse_auth_header(header) {
        let get = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        match scheme.to_ascii_lowercase().as_str() {
            "bearer" => {
                if let Some(realm) = get("realm").filter(|r| !r.is_empty()) {
                    out.push(Challenge::Bearer { realm, service: get("service"), scope: get("scope") });
                }
            }
            "basic" => out.push(Challenge::Basic),
            _ => {}
        }
    }
    out.sort_by_key(|c| matches!(c, Challenge::Basic));
    out
}

/// RFC 7235 challenges: `scheme [param=value|param="quoted"] (, ...)*`, several
/// challenges separated by commas. Lenient: malformed parts are skipped.
fn parse_auth_header(s: &str) -> Vec<(String, Vec<(String, String)>)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            break;
        }
        // A token: a scheme, or a parameter name.
        let start = i;
        while i < b.len() && is_tchar(b[i]) {
            i += 1;
        }
        if i == start {
            i += 1; // junk byte
            continue;
        }
        let token = &s[start..i];
        let mut j = i;
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' && !out.is_empty() {
            // name=value (token68 values like `abc==` are folded in harmlessly).
            i = j + 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    // Push the whole UTF-8 character.
                    let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1; // closing quote
                v
            } else {
                let vs = i;
                while i < b.len() && b[i] != b',' && b[i] != b' ' && b[i] != b'\t' {
                    i += 1;
                }
                s[vs..i].to_string()
            };
            if let Some(last) = out.last_mut() {
                last.1.push((token.to_string(), value));
            }
        } else {
            out.push((token.to_string(), Vec::new()));
        }
    }
    out
}

/// The scope to ask a token for: `repository:<repo>:pull`.
pub(crate) fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// A token service answer.
#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Read a token service's JSON: `token` or `access_token`, and its lifetime
/// (`expires_in`, 60 s when absent as the spec says, at least 1 s).
pub(crate) fn parse_token_response(body: &[u8]) -> std::result::Result<(String, Duration), String> {
    let t: TokenResponse = serde_json::from_slice(body).map_err(|e| format!("malformed token response: {e}"))?;
    let token = t
        .token
        .filter(|t| !t.is_empty())
        .or(t.access_token.filter(|t| !t.is_empty()))
        .ok_or("token response without `token` or `access_token`")?;
    if token.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("token with control characters or spaces".into());
    }
    Ok((token, Duration::from_secs(t.expires_in.unwrap_or(60).max(1))))
}

// ---------------------------------------------------------------------------------------
// State

/// A host and a token scope.
type HostScope = (String, String);

/// What this client knows about authenticating to hosts: the challenge each host gave,
/// tokens per host and scope, credentials looked up per host.
#[derive(Default)]
pub(crate) struct AuthState {
    challenges: Mutex<HashMap<String, Challenge>>,
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
    /// One token request at a time per host and scope: threads that find no token (or
    /// had the same one rejected) wait for the one asking, then use what it got.
    flights: Mutex<HashMap<HostScope, Arc<Mutex<()>>>>,
    creds: Mutex<HashMap<String, Option<Credential>>>,
}

impl AuthState {
    /// The challenge `host` last answered with, if any.
    pub(crate) fn challenge(&self, host: &str) -> Option<Challenge> {
        self.challenges.lock().get(host).cloned()
    }

    pub(crate) fn set_challenge(&self, host: &str, c: Challenge) {
        self.challenges.lock().insert(host.to_string(), c);
    }

    /// A cached, unexpired `Authorization` value for `host` and `scope`.
    pub(crate) fn token(&self, host: &str, scope: &str) -> Option<String> {
        let mut tokens = self.tokens.lock();
        let key = (host.to_string(), scope.to_string());
        match tokens.get(&key) {
            Some((v, until)) if Instant::now() < *until => Some(v.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Cache a token, a little short of its lifetime (so it is not used as it expires).
    pub(crate) fn set_token(&self, host: &str, scope: &str, header: String, lifetime: Duration) {
        let margin = (lifetime / 10).min(Duration::from_secs(10));
        // A hostile `expires_in` (u64::MAX seconds) must not overflow `Instant`: a year.
        let now = Instant::now();
        let until = now.checked_add(lifetime - margin).unwrap_or_else(|| now + Duration::from_secs(365 * 86_400));
        self.tokens.lock().insert((host.to_string(), scope.to_string()), (header, until));
    }

    /// Drop the cached token for `host` and `scope` if it is still `rejected` (another
    /// thread may have replaced it with a fresh one meanwhile: that one stays).
    pub(crate) fn forget_token(&self, host: &str, scope: &str, rejected: &str) {
        let mut tokens = self.tokens.lock();
        let key = (host.to_string(), scope.to_string());
        if tokens.get(&key).is_some_and(|(v, _)| v == rejected) {
            tokens.remove(&key);
        }
    }

    /// The lock to hold while asking for a token for `host` and `scope`.
    pub(crate) fn token_flight(&self, host: &str, scope: &str) -> Arc<Mutex<()>> {
        let mut flights = self.flights.lock();
        Arc::clone(flights.entry((host.to_string(), scope.to_string())).or_default())
    }

    /// The credentials for `host`, looked up once: the embedder's, else the auth files'.
    pub(crate) fn credentials(
        &self,
        host: &str,
        given: &[(String, Credential)],
        auth_files: bool,
    ) -> Result<Option<Credential>> {
        if let Some(c) = self.creds.lock().get(host) {
            return Ok(c.clone());
        }
        let found = match given.iter().find(|(h, _)| same_registry(h, host)) {
            Some((_, c)) => Some(c.clone()),
            None if auth_files => from_auth_files(host, &auth_file_paths(&|k| std::env::var_os(k)))?,
            None => None,
        };
        self.creds.lock().insert(host.to_string(), found.clone());
        Ok(found)
    }
}

/// Whether a credentials key names `host` (Docker Hub's several names are one).
fn same_registry(key: &str, host: &str) -> bool {
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    key == host || (hub(key) && hub(host))
}

/// The auth files consulted, in order: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json` (podman, skopeo, buildah), then Docker's
/// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`. `(path, is_docker)`.
pub(crate) fn auth_file_paths(env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if let Some(p) = env("REGISTRY_AUTH_FILE").filter(|p| !p.is_empty()) {
        out.push((PathBuf::from(p), false));
    }
    if let Some(d) = env("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        out.push((PathBuf::from(d).join("containers/auth.json"), false));
    }
    if let Some(d) = env("DOCKER_CONFIG").filter(|p| !p.is_empty()) {
        out.push((PathBuf::from(d).join("config.json"), true));
    } else if let Some(h) = env("HOME").filter(|p| !p.is_empty()) {
        out.push((PathBuf::from(h).join(".docker/config.json"), true));
    }
    out
}

/// The first credentials for `host` in `files` (credential helpers and `credsStore`
/// included, through `docker_credential`).
///
/// # Errors
/// [`Error::InvalidConfig`] for a malformed file or entry; [`Error::Unauthorized`] when a
/// credential helper fails.
pub(crate) fn from_auth_files(host: &str, files: &[(PathBuf, bool)]) -> Result<Option<Credential>> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let hub = same_registry("docker.io", host);
    for (path, is_docker) in files {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io("open", path, e)),
        };
        // Docker keys Docker Hub by its v1 URL (and hands helpers that); podman by name.
        let key = match (hub, is_docker) {
            (true, true) => "https://index.docker.io/v1/",
            (true, false) => "docker.io",
            _ => host,
        };
        match docker_credential::get_credential_from_reader(BufReader::new(file), key) {
            Ok(DockerCredential::UsernamePassword(u, p)) => return Ok(Some(Credential::basic(u, p))),
            Ok(DockerCredential::IdentityToken(t)) => return Ok(Some(Credential::IdentityToken(t))),
            Err(E::NoCredentialConfigured) => continue,
            Err(E::ConfigReadError | E::ConfigNotFound) => {
                return Err(Error::InvalidConfig {
                    path: path.clone(),
                    reason: "not a valid auth file (JSON with \"auths\")".into(),
                });
            }
            Err(E::CredentialDecodingError | E::CredentialMismatchError) => {
                return Err(Error::InvalidConfig {
                    path: path.clone(),
                    reason: format!(
                        "malformed credentials for {host} (\"auth\" is not base64 of user:password, or contradicts \"username\"/\"password\")"
                    ),
                });
            }
            Err(e @ (E::HelperCommunicationError | E::MalformedHelperResponse | E::HelperFailure { .. })) => {
                let reason = match e {
                    E::HelperFailure { helper, .. } => format!("credential helper docker-credential-{helper} failed"),
                    e => e.to_string(),
                };
                return Err(Error::Unauthorized {
                    host: host.to_string(),
                    op: format!("credentials from {}", path.display()),
                    reason,
                });
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let b = |realm: &str, service: Option<&str>, scope: Option<&str>| Challenge::Bearer {
            realm: realm.into(),
            service: service.map(Into::into),
            scope: scope.map(Into::into),
        };
        for (header, want) in [
            (
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/ubuntu:pull""#,
                vec![b(
                    "https://auth.docker.io/token",
                    Some("registry.docker.io"),
                    Some("repository:library/ubuntu:pull"),
                )],
            ),
            (r#"Basic realm="Registry Realm""#, vec![Challenge::Basic]),
            (r#"basic realm=x"#, vec![Challenge::Basic]),
            (
                r#"Basic realm="a, b", Bearer realm="https://t/x", service=reg"#,
                vec![b("https://t/x", Some("reg"), None), Challenge::Basic],
            ),
            (
                r#"Bearer realm="https://t/\"q\"",scope="repository:a:pull,push" , error="insufficient_scope""#,
                vec![b(r#"https://t/"q""#, None, Some("repository:a:pull,push"))],
            ),
            (r#"BEARER  REALM = "https://t" "#, vec![b("https://t", None, None)]),
            (r#"Bearer service="x""#, vec![]),
            (r#"Negotiate abc==, NTLM"#, vec![]),
            ("", vec![]),
            ("Bearer realm=\"unterminated", vec![b("unterminated", None, None)]),
        ] {
            assert_eq!(parse_challenges(header), want, "{header}");
        }
    }

    #[test]
    fn token_responses() {
        let (t, d) = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.as_str(), d), ("abc", Duration::from_secs(300)));
        let (t, d) = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), d), ("xyz", Duration::from_secs(60)));
        let (t, _) =
            parse_token_response(br#"{"token":"","access_token":"xyz","issued_at":"2024-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!(t, "xyz");
        for bad in [&br#"{}"#[..], br#"{"token":"a b"}"#, b"not json", br#"{"token":"a\nb"}"#] {
            assert!(parse_token_response(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn token_cache() {
        let s = AuthState::default();
        s.set_token("h", "repository:a:pull", "Bearer t".into(), Duration::from_secs(60));
        assert_eq!(s.token("h", "repository:a:pull").as_deref(), Some("Bearer t"));
        assert_eq!(s.token("h", "repository:b:pull"), None);
        assert_eq!(s.token("other", "repository:a:pull"), None);
        // Only the token that was rejected is forgotten, not a fresh one set meanwhile.
        s.forget_token("h", "repository:a:pull", "Bearer older");
        assert_eq!(s.token("h", "repository:a:pull").as_deref(), Some("Bearer t"));
        s.forget_token("h", "repository:a:pull", "Bearer t");
        assert_eq!(s.token("h", "repository:a:pull"), None);
        s.set_token("h", "x", "Bearer t".into(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.token("h", "x"), None);
    }

    #[test]
    fn basic_header_and_redaction() {
        let c = Credential::basic("user", "pa:ss");
        assert_eq!(c.basic_header().unwrap(), "Basic dXNlcjpwYTpzcw==");
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert!(!format!("{:?}", Credential::IdentityToken("secret".into())).contains("secret"));
    }

    #[test]
    fn auth_files() {
        let dir = tempfile::tempdir().unwrap();
        let podman = dir.path().join("auth.json");
        let docker = dir.path().join("config.json");
        // "user:pw" and "hub:pw2"
        std::fs::write(&podman, r#"{"auths":{"reg.example:5000":{"auth":"dXNlcjpwdw=="}}}"#).unwrap();
        std::fs::write(
            &docker,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"aHViOnB3Mg=="},"reg.example:5000":{"auth":"eDp5"},"tok.example":{"identitytoken":"rt"}}}"#,
        )
        .unwrap();
        let files = vec![(podman.clone(), false), (docker.clone(), true)];
        assert_eq!(from_auth_files("reg.example:5000", &files).unwrap(), Some(Credential::basic("user", "pw")));
        assert_eq!(from_auth_files("registry-1.docker.io", &files).unwrap(), Some(Credential::basic("hub", "pw2")));
        assert_eq!(from_auth_files("tok.example", &files).unwrap(), Some(Credential::IdentityToken("rt".into())));
        assert_eq!(from_auth_files("nowhere.example", &files).unwrap(), None);
        // Missing files are skipped; a malformed one is an error naming it.
        assert_eq!(from_auth_files("reg.example:5000", &[(dir.path().join("none.json"), false)]).unwrap(), None);
        std::fs::write(&podman, "{not json").unwrap();
        match from_auth_files("reg.example:5000", &files) {
            Err(Error::InvalidConfig { path, .. }) => assert_eq!(path, podman),
            r => panic!("{r:?}"),
        }
        std::fs::write(&podman, r#"{"auths":{"reg.example:5000":{"auth":"!!!"}}}"#).unwrap();
        assert!(matches!(from_auth_files("reg.example:5000", &files), Err(Error::InvalidConfig { .. })));
    }

    #[test]
    fn auth_file_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| std::ffi::OsString::from(v))
        };
        let all = env(&[
            ("REGISTRY_AUTH_FILE", "/a.json"),
            ("XDG_RUNTIME_DIR", "/run/u"),
            ("DOCKER_CONFIG", "/d"),
            ("HOME", "/h"),
        ]);
        assert_eq!(
            auth_file_paths(&all),
            [
                (PathBuf::from("/a.json"), false),
                (PathBuf::from("/run/u/containers/auth.json"), false),
                (PathBuf::from("/d/config.json"), true)
            ]
        );
        assert_eq!(auth_file_paths(&env(&[("HOME", "/h")])), [(PathBuf::from("/h/.docker/config.json"), true)]);
        assert!(auth_file_paths(&env(&[])).is_empty());
    }

    #[test]
    fn given_credentials_match_by_host() {
        let s = AuthState::default();
        let given = vec![("docker.io".to_string(), Credential::basic("a", "b"))];
        assert_eq!(s.credentials("registry-1.docker.io", &given, false).unwrap(), Some(Credential::basic("a", "b")));
        assert_eq!(s.credentials("mirror.example", &given, false).unwrap(), None);
    }
}
