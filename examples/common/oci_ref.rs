//! `OCI_LAYOUT_DIR[:TAG]` / `OCI_LAYOUT_DIR@sha256:...` references, shared by the
//! examples (`#[path = "common/oci_ref.rs"] mod oci_ref;`).

/// Splits a reference into the layout directory and the reference `OciLayout`
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
