#!/usr/bin/env bash
# Cold restore: `rootfsctl --cache C ensure L:t` (extract each layer once into the cache,
# digest verified) vs `umoci unpack --image L:t OUT` (flatten all layers into one tree),
# on the same 3-layer gzip OCI layout, one hyperfine run. Both start cold every run
# (fresh cache dir / fresh bundle). Prints a Markdown table and writes it into
# BENCHMARKS.md between the `cache:cold` markers.
#
#   sudo BENCH_TMP=/mnt/tmpfs benches/cache.sh   # needs root, umoci, hyperfine; builds the image once
# BENCH_TMP: where the cache dir and the umoci bundle go (a tmpfs measures CPU, not disk).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-7}"
data=bench-data
mkdir -p "$data"
layout="$data/image"

if [[ ! -d "$layout" ]]; then
  [[ -f "$data/rootfs.tar" ]] || { echo "run benches/peer.sh first (it builds bench-data/rootfs.tar)" >&2; exit 2; }
  tmp=$(mktemp -d)
  umoci init --layout "$layout"
  umoci new --image "$layout:t"
  # Layer 1: the Debian minbase rootfs.
  umoci unpack --image "$layout:t" "$tmp/b"
  tar -xpf "$data/rootfs.tar" -C "$tmp/b/rootfs"
  umoci repack --image "$layout:t" "$tmp/b"
  rm -rf "$tmp/b"
  # Layer 2: an "apt install": 2,000 new files and some rewritten ones.
  umoci unpack --image "$layout:t" "$tmp/b"
  mkdir -p "$tmp/b/rootfs/usr/lib/app"
  for i in $(seq 1 2000); do head -c $((i * 37 % 40000 + 100)) /dev/urandom >"$tmp/b/rootfs/usr/lib/app/f$i"; done
  echo v2 >>"$tmp/b/rootfs/etc/os-release"
  umoci repack --image "$layout:t" "$tmp/b"
  rm -rf "$tmp/b"
  # Layer 3: deletions (whiteouts) and a config change.
  umoci unpack --image "$layout:t" "$tmp/b"
  rm -rf "$tmp/b/rootfs/usr/share/doc" "$tmp/b/rootfs/usr/share/man"
  echo app >"$tmp/b/rootfs/etc/hostname"
  umoci repack --image "$layout:t" "$tmp/b"
  rm -rf "$tmp"
fi

cargo build --release --example rootfsctl >&2
bin="$PWD/target/release/examples/rootfsctl"
out=$(mktemp -d -p "${BENCH_TMP:-${TMPDIR:-/tmp}}")
trap 'rm -rf "$out"' EXIT
json="$data/cache-cold.json"
hyperfine -N -w 1 -r "$RUNS" --export-json "$json" \
  --prepare "sh -c 'rm -rf $out/c $out/u && sync'" \
  "umoci unpack --image $layout:t $out/u" \
  "$bin --cache $out/c ensure $layout:t" >&2
python3 - "$json" BENCHMARKS.md <<'EOF' | tee "$data/cache-cold.md"
import json, re, statistics, sys
res = json.load(open(sys.argv[1]))["results"]
med = {r["command"].split()[0].split("/")[-1]: statistics.median(r["times"]) * 1000 for r in res}
u, o = med["umoci"], med["rootfsctl"]
table = (
    "| cold restore of a 3-layer gzip image | median |\n|---|---:|\n"
    f"| `umoci unpack` (flattened) | {u:.0f} ms |\n"
    f"| `rootfsctl ensure` (per-layer cache, digests verified) | {o:.0f} ms |\n"
    f"| speedup | {u / o:.2f}x |"
)
print(table)
doc = sys.argv[2]
text = open(doc).read()
pat = re.compile(r"(<!-- cache:cold:begin[^>]*-->\n).*?(\n<!-- cache:cold:end -->)", re.S)
if pat.search(text):
    open(doc, "w").write(pat.sub(lambda m: m.group(1) + table + m.group(2), text))
EOF
