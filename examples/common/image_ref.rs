//! Image references shared by the examples (`#[path = "common/image_ref.rs"] mod image_ref;`):
//! `OCI_LAYOUT_DIR[:TAG]` / `OCI_LAYOUT_DIR@sha256:...`, and skopeo's spellings
//! `oci:DIR[:TAG]` and `docker://HOST/REPO[:TAG|@sha256:...]`.
#![allow(dead_code)] // each example uses part of it

use std::path::PathBuf;

use rootfs_cache::{Digest, ImageFetcher, OciLayout};
#[cfg(feature = "registry")]
use rootfs_cache::{Reference, Registry, RegistryOptions};

/// Where an image comes from, and the reference its fetcher resolves.
pub enum ImageRef {
    /// A local OCI layout and the tag or `@sha256:…` inside it.
    Layout { dir: PathBuf, reference: String },
    /// A registry reference, `HOST/REPO[:TAG][@sha256:…]` (docker's grammar).
    Docker(String),
}

/// How to reach registries: `--hosts-dir DIR`, `--plain-http`.
#[derive(Default)]
pub struct RegistryFlags {
    pub hosts_dir: Option<PathBuf>,
    pub plain_http: bool,
}

impl ImageRef {
    /// Parses `r`; errors are one line, for a usage message.
    pub fn parse(r: &str) -> Result<ImageRef, String> {
        if let Some(rest) = r.strip_prefix("docker://") {
            if rest.is_empty() {
                return Err(format!("{r:?}: docker:// needs HOST/REPO[:TAG]"));
            }
            #[cfg(feature = "registry")]
            {
                let parsed: Reference = rest.parse().map_err(|e| format!("{r:?}: {e}"))?;
                return Ok(ImageRef::Docker(parsed.to_string()));
            }
            #[cfg(not(feature = "registry"))]
            return Err(format!("{r:?}: built without the `registry` feature"));
        }
        let layout = r.strip_prefix("oci:").unwrap_or(r);
        if layout.is_empty() {
            return Err(format!("{r:?}: no layout directory"));
        }
        let (dir, reference) = split_ref(layout);
        Ok(ImageRef::Layout { dir: PathBuf::from(dir), reference })
    }

    /// The fetcher for this image, and the reference to give it.
    pub fn fetcher(&self, flags: &RegistryFlags) -> rootfs_cache::Result<(Box<dyn ImageFetcher>, String)> {
        match self {
            ImageRef::Layout { dir, reference } => Ok((Box::new(OciLayout::open(dir)?), reference.clone())),
            #[cfg(feature = "registry")]
            ImageRef::Docker(reference) => {
                let mut opts = RegistryOptions::default();
                if let Some(d) = &flags.hosts_dir {
                    opts = opts.with_hosts_dir(d);
                }
                opts = opts.with_plain_http(flags.plain_http);
                Ok((Box::new(Registry::new(opts)?), reference.clone()))
            }
            #[cfg(not(feature = "registry"))]
            ImageRef::Docker(_) => {
                let _ = flags;
                unreachable!("parse refuses docker:// without the feature")
            }
        }
    }

    /// The reference that names exactly the image `digest` resolved to (for a second
    /// `ensure` that must hit the cache: `@sha256:…`, or `HOST/REPO@sha256:…`).
    pub fn pinned(&self, digest: &Digest) -> String {
        match self {
            ImageRef::Layout { .. } => format!("@{digest}"),
            ImageRef::Docker(reference) => {
                // Drop the tag and any digest: `HOST/REPO@DIGEST`.
                let name = reference.rsplit_once('@').map_or(reference.as_str(), |(n, _)| n);
                let last = name.rfind('/').unwrap_or(0);
                let name = match name[last..].rfind(':') {
                    Some(i) => &name[..last + i],
                    None => name,
                };
                format!("{name}@{digest}")
            }
        }
    }

    /// For messages: the layout dir and reference, or the registry reference.
    pub fn describe(&self) -> String {
        match self {
            ImageRef::Layout { dir, reference } => format!("{}:{reference}", dir.display()),
            ImageRef::Docker(reference) => format!("docker://{reference}"),
        }
    }
}

/// Splits a layout reference into the layout directory and the reference `OciLayout`
/// understands (TAG defaults to `latest`).
pub fn split_ref(r: &str) -> (&str, String) {
    if let Some(i) = r.rfind("@sha256:") {
        return (&r[..i], r[i..].to_string());
    }
    match r.rsplit_once(':') {
        // A colon inside the last path component is a tag separator.
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, tag.to_string()),
        _ => (r, "latest".to_string()),
    }
}
