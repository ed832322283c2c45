#!/usr/bin/env bash
# Small-file I/O through an overlay (mounted with the crate's KernelOverlay) vs a plain
# directory on the same file system, with and without `volatile`, for 1 B, 1 KiB,
# 10 KiB and 100 KiB files: write COUNT new files; write + fsync each; read COUNT files
# that sit in the lower layer (plain: the same files in the plain dir). One hyperfine
# run per (workload, size) with three commands: plain, overlay, overlay with volatile.
# Prints a Markdown table of medians and overheads, writes it to
# bench-data/overlay-rw-<fs>.md and, for FS=xfs, into BENCHMARKS.md between the
# `overlay-rw` markers.
#
#   sudo benches/overlay_rw.sh                    # XFS loop file system on a tmpfs file
#   sudo FS=ext4 RUNS=21 COUNT=4000 benches/overlay_rw.sh
#
# FS: xfs (default; `mkfs.xfs -m reflink=1`) or ext4 on a loop file held in /dev/shm
# (the real file system code paths without disk noise), or tmpfs. The plain dir, the
# lower layer, both uppers and work dirs are all on it. COUNT files per run (default
# 10000; a quarter of that for 100 KiB files, and for write + fsync a quarter again).
# Times are of the whole helper process (its start-up is ~1 ms). Caches are warm:
# every command gets warm-up runs, and reads re-read the same files. Writes start from a missing dir
# (`--prepare` removes the previous run's and syncs, outside the timing).
#
# Needs root (mounts), hyperfine, xfsprogs/e2fsprogs, python3. Runs itself in a private
# mount namespace (`unshare -m --propagation private`), so its mounts never leak.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${OVERLAY_RW_IN_NS:-}" ]]; then
  [[ $EUID -eq 0 ]] || { echo "overlay_rw.sh: needs root (mounts)" >&2; exit 2; }
  exec env OVERLAY_RW_IN_NS=1 unshare -m --propagation private -- "$0" "$@"
fi
RUNS="${RUNS:-15}"
COUNT="${COUNT:-10000}"
FS="${FS:-xfs}"
SIZES="${SIZES:-1 1024 10240 102400}"
data=bench-data
mkdir -p "$data"

bin=$(cargo bench --bench overlay_rw --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "overlay_rw" and m.get("executable"):
        print(m["executable"])')
[[ -x "$bin" ]] || { echo "overlay_rw.sh: could not build the overlay_rw helper" >&2; exit 2; }

img=$(mktemp -d /dev/shm/overlay-rw.XXXXXX)
m=$(mktemp -d)
cleanup() {
  umount "$m/t" "$m/tv" 2>/dev/null || true
  umount "$m" 2>/dev/null || true
  rmdir "$m" 2>/dev/null || true
  rm -rf "$img"
}
trap cleanup EXIT
case "$FS" in
  xfs | ext4)
    truncate -s 3G "$img/fs.img"
    if [[ "$FS" == xfs ]]; then mkfs.xfs -q -f -m reflink=1 "$img/fs.img"; else mkfs.ext4 -q -F "$img/fs.img"; fi
    mount -o loop "$img/fs.img" "$m"
    ;;
  tmpfs) mount -t tmpfs -o size=3g tmpfs "$m" ;;
  *) echo "unknown FS $FS" >&2; exit 2 ;;
esac

# Files per run for a size and workload.
count_for() {
  local n=$COUNT
  if (($1 >= 102400)); then n=$((n / 4)); fi
  if [[ "${2:-}" == fsync ]]; then n=$((n / 4)); fi
  echo "$n"
}

mkdir -p "$m"/{plain,lower,ovl/upper,ovl/work,ovlv/upper,ovlv/work,t,tv}
for size in $SIZES; do
  n=$(count_for "$size")
  "$bin" write "$m/lower/r$size" "$n" "$size"
  "$bin" write "$m/plain/r$size" "$n" "$size"
done
"$bin" mount "$m/ovl/upper" "$m/ovl/work" "$m/t" "$m/lower"
"$bin" mount --volatile "$m/ovlv/upper" "$m/ovlv/work" "$m/tv" "$m/lower"
grep -E " $m/tv? " /proc/self/mountinfo >&2
sync

jsons=()
for size in $SIZES; do
  for op in write fsync read; do
    n=$(count_for "$size" "$op")
    json="$data/overlay-rw-$FS-$op-$size-n$n.json"
    jsons+=("$json")
    if [[ "$op" == read ]]; then
      hyperfine -N -w 3 -r "$RUNS" --export-json "$json" \
        -n plain "$bin read $m/plain/r$size $n" \
        -n overlay "$bin read $m/t/r$size $n" \
        -n overlay-volatile "$bin read $m/tv/r$size $n" >&2
    else
      flag=""
      [[ "$op" == fsync ]] && flag=" --fsync"
      hyperfine -N -w 3 -r "$RUNS" --export-json "$json" \
        --prepare "sh -c 'rm -rf $m/plain/w && sync'" \
        --prepare "sh -c 'rm -rf $m/t/w && sync'" \
        --prepare "sh -c 'rm -rf $m/tv/w && sync'" \
        -n plain "$bin write $m/plain/w $n $size$flag" \
        -n overlay "$bin write $m/t/w $n $size$flag" \
        -n overlay-volatile "$bin write $m/tv/w $n $size$flag" >&2
      rm -rf "$m/plain/w" "$m/t/w" "$m/tv/w"
    fi
  done
done

python3 - "$FS" "$RUNS" "${jsons[@]}" <<'EOF' | tee "$data/overlay-rw-$FS.md"
import json, re, statistics, sys
fs, runs, files = sys.argv[1], sys.argv[2], sys.argv[3:]
ops = {"write": "write", "fsync": "write + fsync", "read": "read"}
def human(n):
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"
print(f"File system: {fs}; median of {runs} runs per command (whole process, ms); "
      "overhead = overlay / plain - 1.\n")
print("| size | files | workload | plain | overlay | overhead | overlay, volatile | overhead |")
print("|---|---:|---|---:|---:|---:|---:|---:|")
for f in files:
    op, size, n = re.search(r"-(write|fsync|read)-(\d+)-n(\d+)\.json$", f).groups()
    res = {r["command"]: statistics.median(r["times"]) * 1000 for r in json.load(open(f))["results"]}
    p, o, v = res["plain"], res["overlay"], res["overlay-volatile"]
    print(f"| {human(int(size))} | {n} | {ops[op]} | {p:.1f} ms | {o:.1f} ms | {(o / p - 1) * 100:+.0f}% "
          f"| {v:.1f} ms | {(v / p - 1) * 100:+.0f}% |")
EOF

# The table in BENCHMARKS.md is the XFS one; other file systems only go to bench-data/.
if [[ "$FS" == xfs ]]; then
  python3 - "$data/overlay-rw-$FS.md" BENCHMARKS.md <<'EOF'
import re, sys
table, doc = open(sys.argv[1]).read().strip(), sys.argv[2]
text = open(doc).read()
pat = re.compile(r"(<!-- overlay-rw:begin[^>]*-->\n).*?(<!-- overlay-rw:end -->)", re.S)
if pat.search(text):
    open(doc, "w").write(pat.sub(lambda mo: mo.group(1) + table + "\n" + mo.group(2), text))
else:
    print("overlay_rw.sh: no overlay-rw markers in BENCHMARKS.md; table not written there", file=sys.stderr)
EOF
fi
