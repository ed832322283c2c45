#!/usr/bin/env bash
# Seed the `unpack` fuzz corpus (fuzz/corpus/unpack, gitignored) with a few small,
# valid layers made by GNU tar: ustar, GNU and PAX formats, plain, gzip and zstd,
# with directories, symlinks, hardlinks, whiteouts, xattrs and a sparse file.
set -euo pipefail
cd "$(dirname "$0")"
out="$PWD/corpus/unpack"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

src="$work/src"
mkdir -p "$src/etc" "$src/usr/bin" "$src/opaque"
echo hello >"$src/etc/hostname"
printf '#!/bin/sh\necho hi\n' >"$src/usr/bin/hi"
chmod 755 "$src/usr/bin/hi"
ln -s ../etc/hostname "$src/usr/bin/link"
ln "$src/etc/hostname" "$src/etc/hardlink"
: >"$src/.wh.deleted"
: >"$src/opaque/.wh..wh..opq"
mkfifo "$src/fifo"
setfattr -n user.seed -v 1 "$src/etc/hostname" 2>/dev/null || true
truncate -s 8K "$src/sparse" && echo data | dd of="$src/sparse" bs=1 seek=4096 conv=notrunc status=none

t() { tar -b1 --sort=name --mtime=@1600000000 --owner=0 --group=0 --numeric-owner -C "$src" "$@" .; }
t --format=ustar -cf "$out/ustar.tar"
t --format=gnu --sparse -cf "$out/gnu-sparse.tar"
t --format=pax --xattrs --sparse -cf "$out/pax.tar"
t --format=pax -cf - | gzip -9n >"$out/pax.tar.gz"
t --format=gnu -cf - | zstd -q -19 >"$out/gnu.tar.zst"
# A long name (GNU `L` / PAX path) and a minimal one-file archive.
long="$work/long"
mkdir -p "$long/$(printf 'd%.0s' {1..120})"
echo x >"$long/$(printf 'd%.0s' {1..120})/f"
tar -b1 --format=gnu -C "$long" -cf "$out/gnu-long.tar" .
tar -b1 --format=pax -C "$long" -cf "$out/pax-long.tar" .
# Two hostile shapes for the fuzzer to mutate: a file written through a symlinked
# parent, and a whiteout through one (the canary sits next to dest while fuzzing).
mkdir -p "$work/h"
ln -s ../canary "$work/h/l"
echo pwned >"$work/h/x"
: >"$work/h/.wh.x"
tar -b1 --format=gnu -C "$work/h" -cf "$out/symlink-parent.tar" l
tar -b1 --format=gnu -C "$work/h" --transform='flags=r;s,^x$,l/pwned,' -rf "$out/symlink-parent.tar" x
tar -b1 --format=pax -C "$work/h" -cf "$out/whiteout-through-symlink.tar" l
tar -b1 --format=pax -C "$work/h" --transform='flags=r;s,^\.wh\.x$,l/.wh.x,' -rf "$out/whiteout-through-symlink.tar" .wh.x
echo "seeded $(ls "$out" | wc -l) inputs in $out"

# A libFuzzer dictionary: tar magics, type flags, PAX keywords, whiteout names, escapes
# and extreme numbers. Use with `-- -dict=fuzz/corpus/unpack.dict`.
cat >"$PWD/corpus/unpack.dict" <<'DICT'
"ustar\x0000"
"ustar  \x00"
"././@LongLink"
"0000644\x00"
"00000000000\x00"
"77777777777\x00"
"\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"
"\x80\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff"
"18446744073709551615"
"9223372036854775808"
"4294967296"
" path="
" linkpath="
" size="
" uid="
" gid="
" mtime="
" GNU.sparse.major="
" GNU.sparse.minor="
" GNU.sparse.name="
" GNU.sparse.realsize="
" SCHILY.xattr.trusted.overlay.opaque="
" SCHILY.xattr.user.overlay.redirect="
".wh."
".wh..wh..opq"
".wh..wh.plnk"
"../"
"../canary"
"/"
"./"
"\x1f\x8b\x08"
"\x28\xb5\x2f\xfd"
DICT
echo "dictionary in $PWD/corpus/unpack.dict"
