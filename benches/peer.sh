#!/usr/bin/env bash
# Extraction of a real distribution rootfs: rootfs-cache vs GNU tar (and bsdtar), same
# input, same destination file system, one hyperfine run per file system. Prints a
# Markdown table of medians and ratios, writes it to bench-data/peer-<fs>.md and into
# BENCHMARKS.md between the `peer:<fs>` markers.
#
#   sudo benches/peer.sh                  # tmpfs and an XFS loop file system (on tmpfs)
#   sudo FS="tmpfs xfs ext4" RUNS=15 benches/peer.sh
#
# Input: a Debian bookworm minbase tree made with debootstrap (cached in bench-data/),
# or, with ROOTFS_TAR=path, any tar. Needs root (tar -p, mknod, mounts), hyperfine,
# zstd, gzip, bsdtar, xfsprogs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-11}"
FS="${FS:-tmpfs xfs}"
data=bench-data
mkdir -p "$data"

if [[ -n "${ROOTFS_TAR:-}" ]]; then
  cp "$ROOTFS_TAR" "$data/rootfs.tar"
elif [[ ! -f "$data/rootfs.tar" ]]; then
  tmp=$(mktemp -d)
  echo "peer: debootstrap --variant=minbase bookworm (one-time)..." >&2
  debootstrap --variant=minbase bookworm "$tmp/rootfs" http://deb.debian.org/debian >/dev/null
  tar --numeric-owner --xattrs -C "$tmp/rootfs" -cf "$data/rootfs.tar" .
  rm -rf "$tmp"
fi
[[ -f "$data/rootfs.tar.gz" ]] || gzip -6 -k -c "$data/rootfs.tar" >"$data/rootfs.tar.gz"
[[ -f "$data/rootfs.tar.zst" ]] || zstd -q -3 -c "$data/rootfs.tar" >"$data/rootfs.tar.zst"

cargo build --release --example rootfsctl >&2
bin="$PWD/target/release/examples/rootfsctl"
entries=$(tar -tf "$data/rootfs.tar" | wc -l)
size=$(stat -c %s "$data/rootfs.tar")

mnt=$(mktemp -d)
cleanup() {
  umount "$mnt/xfs" 2>/dev/null || true
  umount "$mnt/ext4" 2>/dev/null || true
  umount "$mnt" 2>/dev/null || true
  rmdir "$mnt" 2>/dev/null || true
}
trap cleanup EXIT
mount -t tmpfs -o size=4g tmpfs "$mnt"

for fs in $FS; do
  case "$fs" in
    tmpfs) dest="$mnt/out" ;;
    xfs | ext4)
      truncate -s 3G "$mnt/$fs.img"
      if [[ "$fs" == xfs ]]; then mkfs.xfs -q -f -m reflink=1 "$mnt/$fs.img"; else mkfs.ext4 -q -F "$mnt/$fs.img"; fi
      mkdir -p "$mnt/$fs"
      mount -o loop "$mnt/$fs.img" "$mnt/$fs"
      dest="$mnt/$fs/out"
      ;;
    *) echo "unknown FS $fs" >&2; exit 2 ;;
  esac
  json="$data/peer-$fs.json"
  cmds=()
  for c in tar tar.gz tar.zst; do
    f="$data/rootfs.$c"
    d=$(sha256sum "$f" | cut -d' ' -f1)
    cmds+=("tar -xpf $f -C $dest" "$bin unpack --digest sha256:$d $f $dest")
  done
  cmds+=("bsdtar -xpf $data/rootfs.tar -C $dest")
  hyperfine -N -w 2 -r "$RUNS" --export-json "$json" \
    --prepare "sh -c 'rm -rf $dest && mkdir $dest && sync'" "${cmds[@]}" >&2
  python3 - "$json" "$fs" "$entries" "$size" <<'EOF' | tee "$data/peer-$fs.md"
import json, statistics, sys
res = json.load(open(sys.argv[1]))["results"]
fs, entries, size = sys.argv[2], sys.argv[3], int(sys.argv[4])
med = {r["command"]: statistics.median(r["times"]) * 1000 for r in res}
print(f"Destination: {fs}; input: {entries} entries, {size / 1e6:.0f} MB uncompressed; median of each command's runs (ms).\n")
print("| input | GNU `tar -xpf` | rootfs-cache (digest verified) | speedup |")
print("|---|---:|---:|---:|")
for c in ["tar", "tar.gz", "tar.zst"]:
    t = next(v for k, v in med.items() if k.startswith("tar ") and f"rootfs.{c} " in k + " ")
    o = next(v for k, v in med.items() if " unpack " in k and f"rootfs.{c} " in k + " ")
    print(f"| {c} | {t:.0f} ms | {o:.0f} ms | {t / o:.2f}x |")
b = next(v for k, v in med.items() if k.startswith("bsdtar"))
print(f"\nbsdtar `-xpf` on the plain tar: {b:.0f} ms.")
EOF
  # Replace this file system's table in BENCHMARKS.md, between its markers.
  python3 - "$fs" "$data/peer-$fs.md" BENCHMARKS.md <<'EOF'
import re, sys
fs, table, doc = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3]
text = open(doc).read()
body = table.split("\n\n", 1)[1].strip()  # drop the "Destination:" line
pat = re.compile(r"(<!-- peer:" + fs + r":begin[^>]*-->\n).*?(\n<!-- peer:" + fs + r":end -->)", re.S)
if pat.search(text):
    open(doc, "w").write(pat.sub(lambda m: m.group(1) + body + m.group(2), text))
EOF
  if [[ "$fs" != tmpfs ]]; then umount "$mnt/$fs"; rm -f "$mnt/$fs.img"; fi
done
