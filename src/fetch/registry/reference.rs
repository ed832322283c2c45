//! Image references in the docker grammar: `[HOST[:PORT]/]REPOSITORY[:TAG][@sha256:HEX]`,
//! normalised the way `docker pull` does (`ubuntu` → `docker.io/library/ubuntu`).
//!
//! The grammar is that of the distribution project's `reference` package (what docker,
//! containerd and podman accept), written out by hand; the parser is pure and table-tested.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// Docker Hub's name in references.
pub(crate) const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub(crate) const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Longest repository name accepted (registry part excluded), as docker.
const MAX_NAME: usize = 255;

/// A parsed, normalised image reference.
///
/// ```
/// use rootfs_cache::Reference;
/// let r: Reference = "ubuntu:24.04".parse()?;
/// assert_eq!(r.registry, "docker.io");
/// assert_eq!(r.repository, "library/ubuntu");
/// assert_eq!(r.tag.as_deref(), Some("24.04"));
/// assert_eq!(r.to_string(), "docker.io/library/ubuntu:24.04");
///
/// let r: Reference = "127.0.0.1:5000/team/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse()?;
/// assert_eq!(r.registry, "127.0.0.1:5000");
/// assert_eq!(r.repository, "team/app");
/// assert!(r.digest.is_some());
/// # Ok::<(), rootfs_cache::Error>(())
/// ```
///
/// Rules (docker's): the first `/`-separated component is the registry host when it
/// contains a `.` or a `:`, is `localhost`, or has an uppercase letter; otherwise the
/// registry is `docker.io`. On `docker.io` (also spelled `index.docker.io`) a repository
/// without a `/` lives under `library/`. Repository components are lowercase
/// alphanumerics separated by `.`, `_`, `__` or runs of `-`; uppercase is rejected. A tag
/// is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; a digest is `sha256:` and 64 lowercase hex
/// digits. A reference may carry both (the digest wins when resolving).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Reference {
    /// The registry as named in references: `docker.io`, `ghcr.io`, `127.0.0.1:5000`,
    /// `[::1]:5000`. (`docker.io` is served by `registry-1.docker.io`; the hosts actually
    /// contacted come from `hosts.toml`.)
    pub registry: String,
    /// The repository, e.g. `library/ubuntu`, `team/sub/app`.
    pub repository: String,
    /// The tag, if one was given.
    pub tag: Option<String>,
    /// The manifest digest, if one was given.
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to ask the registry for: the digest if there is one, else the tag, else
    /// `latest`.
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The host serving the registry's API when no `hosts.toml` says otherwise:
    /// `registry-1.docker.io` for `docker.io`, else the registry itself.
    pub(crate) fn default_api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_API } else { &self.registry }
    }
}

impl fmt::Display for Reference {
    /// The normalised form: `registry/repository[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = Error;

    /// Parse and normalise a reference (see [`Reference`] for the grammar).
    ///
    /// # Errors
    /// [`Error::InvalidReference`] naming the input and the rule it breaks.
    fn from_str(input: &str) -> Result<Reference> {
        let bad = |reason: &str| Error::InvalidReference {
            input: input.chars().take(300).collect(),
            reason: reason.to_string(),
        };
        if input.is_empty() {
            return Err(bad("empty"));
        }
        // Digest: after the last '@'.
        let (rest, digest) = match input.split_once('@') {
            Some((rest, d)) => {
                if d.contains('@') {
                    return Err(bad("more than one '@'"));
                }
                let digest: Digest = d.parse().map_err(|e| match e {
                    Error::InvalidDigest { reason, .. } => bad(&format!("digest {d:?}: {reason}")),
                    e => e,
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        // Registry: the first component, when it looks like a host.
        let (registry, path) = match rest.split_once('/') {
            Some((first, path)) if looks_like_host(first) => (first.to_string(), path),
            _ => (DOCKER_HUB.to_string(), rest),
        };
        // Tag: after a ':' in the last path component (a ':' before it would be a port,
        // which only the registry part may have).
        let last_slash = path.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match path[last_slash..].rfind(':') {
            Some(i) => (&path[..last_slash + i], Some(&path[last_slash + i + 1..])),
            None => (path, None),
        };
        if registry != DOCKER_HUB {
            check_host(&registry).map_err(|r| bad(&r))?;
        }
        let registry = if registry == "index.docker.io" { DOCKER_HUB.to_string() } else { registry };
        check_repository(repository).map_err(|r| bad(&r))?;
        if let Some(t) = tag {
            check_tag(t).map_err(|r| bad(&r))?;
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        if registry.len() + 1 + repository.len() > MAX_NAME {
            return Err(bad(&format!("name longer than {MAX_NAME} characters")));
        }
        Ok(Reference { registry, repository, tag: tag.map(str::to_string), digest })
    }
}

/// Docker's rule for "the first component is a registry host".
fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase())
}

/// `host[:port]`: DNS labels (letters, digits, inner '-') separated by '.', or an IPv6
/// literal in brackets; an optional decimal port.
fn check_host(registry: &str) -> std::result::Result<(), String> {
    let (host, port) = if let Some(rest) = registry.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { return Err("unterminated IPv6 literal".into()) };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("invalid IPv6 address {v6:?}"));
        }
        match after {
            "" => ("", None),
            p if p.starts_with(':') => ("", Some(&p[1..])),
            _ => return Err(format!("unexpected {after:?} after IPv6 literal")),
        }
    } else {
        match registry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.parse::<u16>().is_err() {
            return Err(format!("invalid port {p:?} in registry {registry:?}"));
        }
    }
    if registry.starts_with('[') {
        return Ok(());
    }
    if host.is_empty() {
        return Err(format!("empty registry host in {registry:?}"));
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("invalid registry host {host:?}"));
        }
    }
    Ok(())
}

/// Path components separated by '/', each `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn check_repository(repository: &str) -> std::result::Result<(), String> {
    if repository.is_empty() {
        return Err("empty repository name".into());
    }
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("repository name {repository:?} must be lowercase"));
    }
    for component in repository.split('/') {
        if !component_ok(component.as_bytes()) {
            return Err(format!(
                "invalid repository component {component:?} (lowercase letters and digits, separated by '.', '_', '__' or '-')"
            ));
        }
    }
    Ok(())
}

fn component_ok(c: &[u8]) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    // [a-z0-9]+
    let run = |i: &mut usize| {
        let start = *i;
        while *i < c.len() && alnum(c[*i]) {
            *i += 1;
        }
        *i > start
    };
    if !run(&mut i) {
        return false;
    }
    while i < c.len() {
        // separator: '.', '_', '__', or '-'+
        match c[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < c.len() && c[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < c.len() && c[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !run(&mut i) {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> std::result::Result<(), String> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let ok = !b.is_empty() && b.len() <= 128 && word(b[0]) && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-');
    if ok { Ok(()) } else { Err(format!("invalid tag {tag:?} (letters, digits, '_', '.', '-'; at most 128)")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn parse(s: &str) -> (String, String, Option<String>, Option<String>) {
        let r: Reference = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        (r.registry, r.repository, r.tag, r.digest.map(|d| d.to_string()))
    }

    #[test]
    fn grammar_and_normalisation() {
        let d = format!("sha256:{HEX}");
        let s = |x: &str| Some(x.to_string());
        for (input, registry, repo, tag, digest) in [
            ("ubuntu", "docker.io", "library/ubuntu", None, None),
            ("ubuntu:24.04", "docker.io", "library/ubuntu", s("24.04"), None),
            ("library/ubuntu", "docker.io", "library/ubuntu", None, None),
            ("docker.io/ubuntu", "docker.io", "library/ubuntu", None, None),
            ("index.docker.io/ubuntu:x", "docker.io", "library/ubuntu", s("x"), None),
            ("docker.io/team/app", "docker.io", "team/app", None, None),
            ("team/app:v1", "docker.io", "team/app", s("v1"), None),
            ("ghcr.io/a/b/c/d:1.0", "ghcr.io", "a/b/c/d", s("1.0"), None),
            ("127.0.0.1:5000/deb:v3", "127.0.0.1:5000", "deb", s("v3"), None),
            ("localhost/app", "localhost", "app", None, None),
            ("localhost:5000/app:latest", "localhost:5000", "app", s("latest"), None),
            ("[::1]:5000/app", "[::1]:5000", "app", None, None),
            ("[::1]/app", "[::1]", "app", None, None),
            ("Registry.Example/app", "Registry.Example", "app", None, None),
            ("reg.example:443/a__b/c-d--e/f.g_h", "reg.example:443", "a__b/c-d--e/f.g_h", None, None),
            ("a/b:Tag_1.x-y", "docker.io", "a/b", s("Tag_1.x-y"), None),
        ] {
            assert_eq!(parse(input), (registry.to_string(), repo.to_string(), tag, digest), "{input}");
        }
        assert_eq!(parse(&format!("alpine@{d}")), ("docker.io".into(), "library/alpine".into(), None, s(&d)));
        assert_eq!(
            parse(&format!("127.0.0.1:5000/x/y:v2@{d}")),
            ("127.0.0.1:5000".into(), "x/y".into(), s("v2"), s(&d))
        );
        // The port is not a tag.
        assert_eq!(parse("host:5000/app"), ("host:5000".into(), "app".into(), None, None));
    }

    #[test]
    fn display_round_trips() {
        for (input, shown) in [
            ("ubuntu", "docker.io/library/ubuntu"),
            ("ubuntu:24.04", "docker.io/library/ubuntu:24.04"),
            ("127.0.0.1:5000/deb:v3", "127.0.0.1:5000/deb:v3"),
        ] {
            let r: Reference = input.parse().unwrap();
            assert_eq!(r.to_string(), shown);
            assert_eq!(r.to_string().parse::<Reference>().unwrap(), r);
        }
        let r: Reference = format!("a.io/b:c@sha256:{HEX}").parse().unwrap();
        assert_eq!(r.to_string(), format!("a.io/b:c@sha256:{HEX}"));
        assert_eq!(r.object(), format!("sha256:{HEX}"));
        assert_eq!("a.io/b:c".parse::<Reference>().unwrap().object(), "c");
        assert_eq!("a.io/b".parse::<Reference>().unwrap().object(), "latest");
        assert_eq!("ubuntu".parse::<Reference>().unwrap().default_api_host(), "registry-1.docker.io");
        assert_eq!("a.io/b".parse::<Reference>().unwrap().default_api_host(), "a.io");
    }

    #[test]
    fn rejected() {
        for bad in [
            "",
            "Ubuntu",
            "docker.io/Library/ubuntu",
            "ghcr.io/Team/app",
            "a//b",
            "/a",
            "a/",
            "a:",
            "a:-tag",
            "a:.tag",
            "a@",
            "a@sha256:abc",
            "a@sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "a@md5:d41d8cd98f00b204e9800998ecf8427e",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "a.-b",
            "host:port/app",
            "host:99999/app",
            "ho_st.io/app",
            "-host.io/app",
            "[::1/app",
            "[zz]:5000/app",
            "a b",
            "a/b c:d",
            "a:b:c",
            "a@b@c",
        ] {
            match bad.parse::<Reference>() {
                Err(Error::InvalidReference { .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let long = "a".repeat(300);
        assert!(long.parse::<Reference>().is_err());
        assert!(format!("a:{}", "t".repeat(129)).parse::<Reference>().is_err());
        assert!(format!("a:{}", "t".repeat(128)).parse::<Reference>().is_ok());
    }
}
