//! Pure overlay option building: parameters, the legacy `mount(2)` data string and
//! relative-path compaction. No I/O here; everything is table-tested below.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::OverlayOptions;

/// The kernel's limit on overlay lower layers (`OVL_MAX_STACK`, fs/overlayfs/params.h).
pub const MAX_LOWERS: usize = 500;

/// `mount(2)` copies at most one page of option data, NUL included.
pub const LEGACY_DATA_MAX: usize = 4095;

/// One overlay parameter besides the layers, as `fsconfig` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// A flag (`FSCONFIG_SET_FLAG`): `userxattr`, `volatile`.
    Flag(&'static str),
    /// A key with a value (`FSCONFIG_SET_STRING`): `index=off`.
    Value(&'static str, &'static str),
}

impl Param {
    fn push_to(&self, out: &mut Vec<u8>) {
        match *self {
            Param::Flag(k) => out.extend_from_slice(k.as_bytes()),
            Param::Value(k, v) => {
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                out.extend_from_slice(v.as_bytes());
            }
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// The parameters for `opts` (layers excluded), in the order they are set.
///
/// Every feature is spelled out, on or off, so the kernel's compiled-in defaults
/// (`CONFIG_OVERLAY_FS_INDEX`, `..._REDIRECT_DIR`, `..._METACOPY`, `..._XINO_AUTO`) and
/// module parameters never decide what ends up in an upper dir: the diff engine reads
/// uppers directly and must not meet redirect or metacopy xattrs.
pub fn params(opts: &OverlayOptions, userxattr: bool) -> Vec<Param> {
    let mut p = vec![
        Param::Value("index", on_off(opts.index)),
        // `nofollow`, not `off`: `off` still follows redirects found in lowers (when the
        // module's `redirect_always_follow` is set, the default), which a cache of
        // untrusted layers must not do, and the kernel refuses `off` with `userxattr`
        // ("conflicting options: userxattr,redirect_dir=follow").
        Param::Value("redirect_dir", if opts.redirect_dir { "on" } else { "nofollow" }),
        Param::Value("metacopy", on_off(opts.metacopy)),
        Param::Value("xino", if opts.xino { "auto" } else { "off" }),
    ];
    if userxattr {
        p.push(Param::Flag("userxattr"));
    }
    if opts.volatile {
        p.push(Param::Flag("volatile"));
    }
    p
}

/// Escapes a path for the legacy option string: overlay splits options on `,` and
/// lower dirs on `:`, both honouring `\` as an escape.
fn escape_into(path: &[u8], out: &mut Vec<u8>) {
    for &b in path {
        if matches!(b, b',' | b':' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// The `mount(2)` data string: `lowerdir=a:b,upperdir=u,workdir=w,index=off,...`, or
/// with data-only lowers `lowerdir=a:b::d1::d2,...` (they follow the normal lowers, each
/// after `::`; Linux 6.5+).
///
/// Returns `None` when it does not fit in [`LEGACY_DATA_MAX`] bytes.
pub fn legacy_data(
    lowers: &[&[u8]],
    data_lowers: &[&[u8]],
    upper: &[u8],
    work: &[u8],
    params: &[Param],
) -> Option<Vec<u8>> {
    let mut out = b"lowerdir=".to_vec();
    for (i, l) in lowers.iter().enumerate() {
        if i > 0 {
            out.push(b':');
        }
        escape_into(l, &mut out);
    }
    for d in data_lowers {
        out.extend_from_slice(b"::");
        escape_into(d, &mut out);
    }
    out.extend_from_slice(b",upperdir=");
    escape_into(upper, &mut out);
    out.extend_from_slice(b",workdir=");
    escape_into(work, &mut out);
    for p in params {
        out.push(b',');
        p.push_to(&mut out);
    }
    (out.len() <= LEGACY_DATA_MAX).then_some(out)
}

/// Relative-path compaction (what containerd does past a page of options): the deepest
/// directory containing every path, and each path relative to it. `None` when the only
/// common ancestor is `/` (nothing to gain) or a path is not absolute and normal.
pub fn compact(paths: &[&Path]) -> Option<(PathBuf, Vec<PathBuf>)> {
    let split: Vec<Vec<Component<'_>>> = paths.iter().map(|p| p.components().collect()).collect();
    let ok = |c: &[Component<'_>]| {
        c.first() == Some(&Component::RootDir) && c[1..].iter().all(|x| matches!(x, Component::Normal(_)))
    };
    if split.is_empty() || !split.iter().all(|c| ok(c)) {
        return None;
    }
    // Keep one component for each path itself: the base is a strict ancestor of every path.
    let mut n = split.iter().map(|c| c.len() - 1).min()?;
    for c in &split[1..] {
        n = n.min(split[0].iter().zip(c).take_while(|(a, b)| a == b).count());
    }
    if n <= 1 {
        return None;
    }
    let base: PathBuf = split[0][..n].iter().collect();
    let rel = split.iter().map(|c| c[n..].iter().collect()).collect();
    Some((base, rel))
}

/// The legacy data string past a page: every path (data-only lowers included) relative
/// to their deepest common directory ([`compact`]), and that directory, which the mount
/// must be made from. `None` when there is no such directory or the string still does
/// not fit.
pub fn compacted_legacy_data(
    lowers: &[&Path],
    data_lowers: &[&Path],
    upper: &Path,
    work: &Path,
    params: &[Param],
) -> Option<(PathBuf, Vec<u8>)> {
    let all: Vec<&Path> = lowers.iter().chain(data_lowers).copied().chain([upper, work]).collect();
    let (base, rel) = compact(&all)?;
    let (n, m) = (lowers.len(), data_lowers.len());
    fn b(r: &[PathBuf]) -> Vec<&[u8]> {
        r.iter().map(|p| bytes(p)).collect()
    }
    let data = legacy_data(&b(&rel[..n]), &b(&rel[n..n + m]), bytes(&rel[n + m]), bytes(&rel[n + m + 1]), params)?;
    Some((base, data))
}

/// The bytes of a path.
pub fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: impl FnOnce(&mut OverlayOptions)) -> OverlayOptions {
        let mut o = OverlayOptions::default();
        f(&mut o);
        o
    }

    #[test]
    fn params_table() {
        use Param::*;
        let base =
            [Value("index", "off"), Value("redirect_dir", "nofollow"), Value("metacopy", "off"), Value("xino", "off")];
        let cases: Vec<(OverlayOptions, bool, Vec<Param>)> = vec![
            (OverlayOptions::default(), false, base.to_vec()),
            (OverlayOptions::default(), true, [&base[..], &[Flag("userxattr")]].concat()),
            (opts(|o| o.volatile = true), false, [&base[..], &[Flag("volatile")]].concat()),
            (
                opts(|o| {
                    o.index = true;
                    o.redirect_dir = true;
                    o.metacopy = true;
                    o.xino = true;
                    o.volatile = true;
                }),
                true,
                vec![
                    Value("index", "on"),
                    Value("redirect_dir", "on"),
                    Value("metacopy", "on"),
                    Value("xino", "auto"),
                    Flag("userxattr"),
                    Flag("volatile"),
                ],
            ),
        ];
        for (o, ux, want) in cases {
            assert_eq!(params(&o, ux), want, "{o:?} userxattr={ux}");
        }
    }

    #[test]
    fn legacy_data_table() {
        let p = params(&OverlayOptions::default(), false);
        type Case<'a> = (Vec<&'a [u8]>, Vec<&'a [u8]>, &'a [u8], &'a [u8], &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                vec![b"/l1"],
                vec![],
                b"/u",
                b"/w",
                "lowerdir=/l1,upperdir=/u,workdir=/w,index=off,redirect_dir=nofollow,metacopy=off,xino=off",
            ),
            (
                vec![b"/a", b"/b"],
                vec![],
                b"/u",
                b"/w",
                "lowerdir=/a:/b,upperdir=/u,workdir=/w,index=off,redirect_dir=nofollow,metacopy=off,xino=off",
            ),
            (
                vec![b"/with:colon", b"/with,comma", b"/back\\slash"],
                vec![],
                b"/u,1",
                b"/w:2",
                r"lowerdir=/with\:colon:/with\,comma:/back\\slash,upperdir=/u\,1,workdir=/w\:2,index=off,redirect_dir=nofollow,metacopy=off,xino=off",
            ),
            // Data-only lowers: after all normal lowers, each after `::`.
            (
                vec![b"/skel"],
                vec![b"/data"],
                b"/u",
                b"/w",
                "lowerdir=/skel::/data,upperdir=/u,workdir=/w,index=off,redirect_dir=nofollow,metacopy=off,xino=off",
            ),
            (
                vec![b"/s1", b"/s2"],
                vec![b"/d1", b"/d2"],
                b"/u",
                b"/w",
                "lowerdir=/s1:/s2::/d1::/d2,upperdir=/u,workdir=/w,index=off,redirect_dir=nofollow,metacopy=off,xino=off",
            ),
            // Escaped as lowers are: an escaped `:` is never read as a separator.
            (
                vec![b"/s:1"],
                vec![b"/d:1", b"/d,2", b"/d\\3", b"/d::4"],
                b"/u",
                b"/w",
                r"lowerdir=/s\:1::/d\:1::/d\,2::/d\\3::/d\:\:4,upperdir=/u,workdir=/w,index=off,redirect_dir=nofollow,metacopy=off,xino=off",
            ),
        ];
        for (lowers, data, u, w, want) in cases {
            assert_eq!(String::from_utf8(legacy_data(&lowers, &data, u, w, &p).unwrap()).unwrap(), want);
        }
    }

    #[test]
    fn legacy_data_refuses_more_than_a_page() {
        let long = vec![b'x'; 4100];
        assert!(legacy_data(&[&long], &[], b"/u", b"/w", &[]).is_none());
        // Exactly at the limit still fits.
        let fixed = "lowerdir=,upperdir=/u,workdir=/w".len();
        let l = vec![b'y'; LEGACY_DATA_MAX - fixed];
        assert_eq!(legacy_data(&[&l], &[], b"/u", b"/w", &[]).unwrap().len(), LEGACY_DATA_MAX);
        let l = vec![b'y'; LEGACY_DATA_MAX - fixed + 1];
        assert!(legacy_data(&[&l], &[], b"/u", b"/w", &[]).is_none());
        // Data-only lowers count too, `::` included.
        let fixed = "lowerdir=/l::,upperdir=/u,workdir=/w".len();
        let d = vec![b'z'; LEGACY_DATA_MAX - fixed];
        assert_eq!(legacy_data(&[b"/l"], &[&d], b"/u", b"/w", &[]).unwrap().len(), LEGACY_DATA_MAX);
        let d = vec![b'z'; LEGACY_DATA_MAX - fixed + 1];
        assert!(legacy_data(&[b"/l"], &[&d], b"/u", b"/w", &[]).is_none());
    }

    #[test]
    fn compact_table() {
        let p = |s: &str| PathBuf::from(s);
        type Case<'a> = (Vec<&'a str>, Option<(&'a str, Vec<&'a str>)>);
        let cases: Vec<Case<'_>> = vec![
            (
                vec!["/c/layers/a/fs", "/c/layers/b/fs", "/c/ws/u", "/c/ws/w"],
                Some(("/c", vec!["layers/a/fs", "layers/b/fs", "ws/u", "ws/w"])),
            ),
            (vec!["/c/l/a", "/c/l/b"], Some(("/c/l", vec!["a", "b"]))),
            // The base is always a strict ancestor, even when one path contains the others.
            (vec!["/c/l", "/c/l/b"], Some(("/c", vec!["l", "l/b"]))),
            (vec!["/a/x", "/b/y"], None),
            (vec!["/x", "/y"], None),
            (vec!["relative/a", "relative/b"], None),
            (vec!["/c/../d/a", "/c/../d/b"], None),
            (vec![], None),
        ];
        for (input, want) in cases {
            let paths: Vec<PathBuf> = input.iter().map(|s| p(s)).collect();
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            let got = compact(&refs);
            let want = want.map(|(b, r)| (p(b), r.into_iter().map(p).collect::<Vec<_>>()));
            assert_eq!(got, want, "{input:?}");
        }
    }

    #[test]
    fn compacted_legacy_data_table() {
        let p = |s: &str| PathBuf::from(s);
        type Case<'a> = (Vec<&'a str>, Vec<&'a str>, &'a str, &'a str, Option<(&'a str, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            (
                vec!["/c/layers/a/fs", "/c/layers/b/fs"],
                vec![],
                "/c/ws/u",
                "/c/ws/w",
                Some(("/c", "lowerdir=layers/a/fs:layers/b/fs,upperdir=ws/u,workdir=ws/w")),
            ),
            // Data-only lowers are compacted with the rest and keep their `::`.
            (
                vec!["/c/layers/a/fs"],
                vec!["/c/lazy/d1", "/c/lazy/d2"],
                "/c/ws/u",
                "/c/ws/w",
                Some(("/c", "lowerdir=layers/a/fs::lazy/d1::lazy/d2,upperdir=ws/u,workdir=ws/w")),
            ),
            (
                vec!["/c/l/a", "/c/l/b"],
                vec!["/c/l/d:1"],
                "/c/l/u",
                "/c/l/w",
                Some(("/c/l", r"lowerdir=a:b::d\:1,upperdir=u,workdir=w")),
            ),
            // A data-only lower elsewhere leaves no common directory.
            (vec!["/c/layers/a/fs"], vec!["/d/lazy"], "/c/ws/u", "/c/ws/w", None),
        ];
        for (lowers, data, u, w, want) in cases {
            let (lowers, data): (Vec<PathBuf>, Vec<PathBuf>) =
                (lowers.iter().map(|s| p(s)).collect(), data.iter().map(|s| p(s)).collect());
            let (l, d): (Vec<&Path>, Vec<&Path>) =
                (lowers.iter().map(PathBuf::as_path).collect(), data.iter().map(PathBuf::as_path).collect());
            let got = compacted_legacy_data(&l, &d, &p(u), &p(w), &[]);
            let got = got.map(|(b, s)| (b, String::from_utf8(s).unwrap()));
            assert_eq!(got, want.map(|(b, s)| (p(b), s.to_string())), "{lowers:?} {data:?}");
        }
        // Still longer than a page after compaction: `None`.
        let long: Vec<PathBuf> = (0..100).map(|i| p(&format!("/c/{}/{i}", "x".repeat(40)))).collect();
        let l: Vec<&Path> = long.iter().map(PathBuf::as_path).collect();
        assert!(compacted_legacy_data(&l[..1], &l[1..], &p("/c/u"), &p("/c/w"), &[]).is_none());
    }
}
