//! OCI whiteout and overlay xattr rules, as pure functions.
//!
//! OCI image-spec `layer.md`: a file named `.wh.NAME` hides `NAME` from lower layers;
//! `.wh..wh..opq` in a directory hides every lower entry of that directory. Overlayfs
//! expresses the same with a character device 0:0 named `NAME` and the xattr
//! `trusted.overlay.opaque=y` (`user.overlay.opaque` when mounted with `userxattr`).
//! See the kernel's `Documentation/filesystems/overlayfs.rst`.

use std::borrow::Cow;

/// What a file name means to the whiteout machinery.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Name<'a> {
    /// An ordinary name.
    Plain,
    /// `.wh..wh..opq`: the containing directory is opaque.
    Opaque,
    /// `.wh.NAME`: `NAME` is deleted.
    Whiteout(&'a [u8]),
    /// Other `.wh..wh.*` names (AUFS bookkeeping such as `.wh..wh.plnk`): not content,
    /// skipped as containerd and Docker do.
    Meta,
    /// `.wh.` alone, `.wh..` or `.wh...`: a whiteout of nothing, or of `.`/`..`.
    Invalid,
}

const WH: &[u8] = b".wh.";
const OPQ: &[u8] = b".wh..wh..opq";

/// Classify the final component of an entry path.
pub(crate) fn classify(name: &[u8]) -> Name<'_> {
    if name == OPQ {
        return Name::Opaque;
    }
    let Some(rest) = name.strip_prefix(WH) else {
        return Name::Plain;
    };
    if rest.starts_with(WH) {
        return Name::Meta;
    }
    match rest {
        b"" | b"." | b".." => Name::Invalid,
        r => Name::Whiteout(r),
    }
}

/// The overlay xattr namespace prefixes whose image-supplied values must never be
/// interpreted by the kernel.
const OVERLAY_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// Escape an image-supplied xattr name so overlayfs does not interpret it.
///
/// Since Linux 6.7 overlayfs presents a lower file's `trusted.overlay.overlay.X` as
/// `trusted.overlay.X` in the merged view (and likewise for `user.overlay.`), so the
/// content survives without being mistaken for overlay metadata (an image could
/// otherwise smuggle an `opaque` or `redirect` marker). Older kernels simply show the
/// escaped name. umoci escapes the same way.
pub(crate) fn escape_xattr(name: &[u8]) -> Cow<'_, [u8]> {
    for p in OVERLAY_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            let mut v = Vec::with_capacity(name.len() + 8);
            v.extend_from_slice(p);
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(rest);
            return Cow::Owned(v);
        }
    }
    Cow::Borrowed(name)
}

/// The inverse of [`escape_xattr`], for readers of an extracted layer (implicit parent
/// directories take their lower's image xattrs). Returns `None` for unescaped overlay
/// xattrs: those are overlay's own metadata.
pub(crate) fn unescape_xattr(name: &[u8]) -> Option<Cow<'_, [u8]>> {
    for p in OVERLAY_PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return rest.strip_prefix(b"overlay.").map(|r| {
                let mut v = p.to_vec();
                v.extend_from_slice(r);
                Cow::Owned(v)
            });
        }
    }
    Some(Cow::Borrowed(name))
}

/// The opaque-directory xattr name for the chosen namespace.
pub(crate) fn opaque_xattr(userxattr: bool) -> &'static [u8] {
    if userxattr { b"user.overlay.opaque" } else { b"trusted.overlay.opaque" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let cases: &[(&[u8], Name<'_>)] = &[
            (b"file", Name::Plain),
            (b".wh", Name::Plain),
            (b"wh.x", Name::Plain),
            (b".whx", Name::Plain),
            (b".wh..wh..opq", Name::Opaque),
            (b".wh.file", Name::Whiteout(b"file")),
            (b".wh..hidden", Name::Whiteout(b".hidden")),
            (b".wh..wh.plnk", Name::Meta),
            (b".wh..wh..opqx", Name::Meta),
            (b".wh.", Name::Invalid),
            (b".wh..", Name::Invalid),
            (b".wh...", Name::Invalid),
        ];
        for (name, want) in cases {
            assert_eq!(&classify(name), want, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn xattr_escaping_round_trips() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"user.foo", b"user.foo"),
            (b"security.capability", b"security.capability"),
            (b"trusted.overlay.opaque", b"trusted.overlay.overlay.opaque"),
            (b"user.overlay.redirect", b"user.overlay.overlay.redirect"),
            (b"trusted.overlay.overlay.x", b"trusted.overlay.overlay.overlay.x"),
            (b"trusted.overlayx", b"trusted.overlayx"),
        ];
        for (raw, escaped) in cases {
            assert_eq!(&*escape_xattr(raw), *escaped);
            assert_eq!(&*unescape_xattr(escaped).unwrap(), *raw);
        }
        assert!(unescape_xattr(b"trusted.overlay.opaque").is_none());
    }
}
