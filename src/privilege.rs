//! Who this process is, as far as the file-system code cares: root in the initial user
//! namespace, or not.
//!
//! The answer decides where overlay metadata lives (`trusted.overlay.*` as root,
//! `user.overlay.*` otherwise, the only xattrs an unprivileged process can write) and
//! whether ownership can be applied. Extraction ([`UnpackOptions`](crate::UnpackOptions)
//! defaults), the copy backend, `userxattr` mounts and workspaces must all agree on it,
//! so it is asked in one place that none of them owns: before this module it lived in
//! `mount`, which made `unpack` depend on `mount`. It is not a file-system helper, so it
//! is not in `fsutil` either.
//!
//! The user-namespace probe reads `/proc/self/uid_map` once and caches the answer.
#![forbid(unsafe_code)]

/// Not root in the initial user namespace: overlay metadata then lives in `user.*`
/// xattrs (the only ones an unprivileged process can write), for extraction, the copy
/// backend and `userxattr` mounts alike.
pub(crate) fn unprivileged() -> bool {
    !nix::unistd::geteuid().is_root() || in_user_namespace()
}

/// Whether this process runs in a user namespace other than the initial one (its uid
/// map is not the identity over the whole range).
pub fn in_user_namespace() -> bool {
    static IN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN.get_or_init(|| match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => map.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"],
        Err(_) => false,
    })
}
