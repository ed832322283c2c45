#!/usr/bin/env bash
# Lazy pull (issue 14): `rootfsctl run --lazy` against `rootfsctl run` (eager) of a
# ~400 MB zstd:chunked image whose workload reads a few files, from a registry behind a
# shaped link. Per link and mode, RUNS runs, each from a fresh cache on a new ext4:
#   - time until the workload has run (its last output line) and until `run` returned,
#     and for lazy the time until its first output line;
#   - bytes fetched from the registry until then and in all (counted on the veth);
#   - for lazy, the time until the image is fully local (see time_until_local);
# then, over the unshaped link, the read throughput of one large file of the image
# through a kept workspace, eager layer against lazy layer after completion. Prints a
# Markdown table of medians and ratios, writes it to bench-data/lazy-pull.md and, with
# UPDATE_DOC=1, into BENCHMARKS.md between the `lazypull` markers.
#
#   sudo benches/lazy_pull.sh
#   sudo RUNS=2 LINKS=1600mbit benches/lazy_pull.sh
#
# Environment:
#   RUNS=5          timed runs per link and mode (eager and lazy alternate)
#   LINKS="1600mbit 1gbit unshaped"   the links, in this order: a tc tbf rate on both
#                   ends of the veth, or `unshaped` (no qdisc on the veth)
#   BLOBS=5 BLOB_MIB=56 FILES=300 FILE_KIB=64   the image's data: BLOBS files of BLOB_MIB
#                   MiB (/opt/data/blobN) in one layer, FILES files of FILE_KIB KiB
#                   (/opt/data/files/fNNNN.bin) and known.txt in another; all random
#                   bytes but known.txt, so incompressible
#   READS=7         dd runs per read-throughput figure (median)
#   LOCAL_TIMEOUT=300   seconds to wait for a lazy image to become fully local
#   BIN=            a rootfsctl to use (default: the release build, built here)
#   ROOTFS_TAR=     the Debian base (default bench-data/rootfs.tar, made by debootstrap
#                   as benches/cold_pull.sh and benches/peer.sh make it)
#   IMG_DIR=        where the ext4 image file lives (default: the script's tmpfs)
#   UPDATE_DOC=0    1: write the table into BENCHMARKS.md
#   KEEP_RUNS=      a directory to copy each run's timings (JSON) and stderr into
#
# Setup, all made here and removed on exit (also on error or Ctrl-C; the script runs in
# its own mount namespace, so no mount outlives it):
# - Image, 3 layers: base (bench-data/rootfs.tar, a Debian bookworm minbase tree), blobs
#   (/opt/data/blob*), files (/opt/data/files/*), built with GNU tar into an OCI layout
#   with uncompressed layers and pushed by `skopeo copy --dest-compress-format
#   zstd:chunked`, which compresses every layer to zstd:chunked (checked in the pushed
#   manifest). The random data is new on every run of the script.
# - Workload: `sha256sum /bin/sh /etc/os-release /opt/data/files/known.txt
#   /opt/data/files/f0150.bin` run by `rootfsctl run`; its output must equal the same
#   command's output chrooted into the tree the layers were made from, or the bench fails.
# - Registry: Debian's docker-registry with its storage on a tmpfs, in a network
#   namespace, reached over a veth pair (10.213.8.1 <-> 10.213.8.2) with `tc tbf` on both
#   ends (burst 2mb, latency 20ms) or no qdisc. Bytes fetched: the host end's rx_bytes
#   (/sys/class/net/VETH/statistics/rx_bytes): every byte the registry sent, Ethernet,
#   IP and TCP headers included, measured independently of rootfsctl.
# - Storage: one ext4 image file (on the tmpfs unless IMG_DIR), made again (mkfs with no
#   lazy init) and loop-mounted before every run (untimed); cache and workspace live on it.
# Needs root, docker-registry, skopeo, GNU tar, python3, curl, iproute2 (ip, tc),
# mkfs.ext4, unshare, chroot, cargo (unless BIN); debootstrap if bench-data/rootfs.tar is
# missing. No hyperfine: every run needs its own first-line timestamp and byte counts.
set -euo pipefail
cd "$(dirname "$0")/.."
self="$PWD/benches/lazy_pull.sh"

log() { echo "lazy_pull: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

[[ $EUID -eq 0 ]] || die "needs root (mounts, mkfs, network namespaces)"
missing=()
for t in docker-registry skopeo tar python3 curl ip tc mkfs.ext4 unshare chroot mountpoint timeout dd du; do
  command -v "$t" >/dev/null || missing+=("$t")
done
[[ -n "${BIN:-}" ]] || command -v cargo >/dev/null || missing+=(cargo)
if [[ -z "${ROOTFS_TAR:-}" && ! -f bench-data/rootfs.tar ]]; then
  command -v debootstrap >/dev/null || missing+=(debootstrap)
fi
[[ ${#missing[@]} -eq 0 ]] || die "missing: ${missing[*]} (Debian: apt-get install docker-registry skopeo iproute2 e2fsprogs debootstrap)"
if [[ -z "${LP_UNSHARED:-}" ]]; then
  # Own mount namespace: the loop mount and the tmpfs die with us.
  exec env LP_UNSHARED=1 unshare -m --propagation private "$self" "$@"
fi

RUNS="${RUNS:-5}"
LINKS="${LINKS:-1600mbit 1gbit unshaped}"
BLOBS="${BLOBS:-5}"
BLOB_MIB="${BLOB_MIB:-56}"
FILES="${FILES:-300}"
FILE_KIB="${FILE_KIB:-64}"
READS="${READS:-7}"
LOCAL_TIMEOUT="${LOCAL_TIMEOUT:-300}"
UPDATE_DOC="${UPDATE_DOC:-0}"
WORKLOAD=(sha256sum /bin/sh /etc/os-release /opt/data/files/known.txt /opt/data/files/f0150.bin)
((FILES >= 150)) || die "FILES must be at least 150 (the workload reads f0150.bin)"
for l in $LINKS; do
  [[ "$l" == unshaped || "$l" =~ ^[0-9]+(k|m|g)?bit$ ]] || die "link $l: a tc rate (1600mbit, 1gbit) or unshaped"
done

data=bench-data
mkdir -p "$data"
rootfs_tar="${ROOTFS_TAR:-$data/rootfs.tar}"
if [[ ! -f "$rootfs_tar" ]]; then
  tmp=$(mktemp -d)
  log "debootstrap --variant=minbase bookworm (one-time)..."
  debootstrap --variant=minbase bookworm "$tmp/rootfs" http://deb.debian.org/debian >/dev/null
  tar --numeric-owner --xattrs -C "$tmp/rootfs" -cf "$rootfs_tar" .
  rm -rf "$tmp"
fi

if [[ -n "${BIN:-}" ]]; then
  bin=$(realpath "$BIN")
else
  log "building rootfsctl (release)..."
  cargo build --release --example rootfsctl >&2
  bin="$PWD/target/release/examples/rootfsctl"
fi

T=$(mktemp -d /tmp/lazy_pull.XXXXXX)
NS="lazypull$$"
VH="lp$$h"
VN="lp$$n"
REG="10.213.8.2:5000"
REF="docker://$REG/lazy:v1"
EXT="$T/ext4"
CACHE="$EXT/cache" # the cache of the run at hand
IMG="${IMG_DIR:+$IMG_DIR/lazy_pull.$$.img}"
IMG="${IMG:-$T/ext4.img}"
reg_pid=""
run_pgid=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [[ -n "$run_pgid" ]] && kill -KILL -- "-$run_pgid" 2>/dev/null
  [[ -n "$reg_pid" ]] && kill "$reg_pid" 2>/dev/null && wait "$reg_pid" 2>/dev/null
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null
  ip link del "$VH" 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  [[ -n "${KEEP_RUNS:-}" && -d "$T/runs" ]] && mkdir -p "$KEEP_RUNS" && cp -r "$T/runs/." "$KEEP_RUNS/"
  if mountpoint -q "$T"; then umount -R "$T" 2>/dev/null || umount -R -l "$T"; fi
  rm -rf "$T"
  [[ -n "${IMG_DIR:-}" ]] && rm -f "$IMG"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mount -t tmpfs -o size=8g tmpfs "$T"
mkdir -p "$T/reg" "$EXT" "$T/runs"

# ---------------------------------------------------------------------------------------
# The image.

log "building the image (${BLOBS} x ${BLOB_MIB} MiB + ${FILES} x ${FILE_KIB} KiB of random data over the Debian base)..."
ref="$T/ref"
mkdir -p "$ref"
tar --numeric-owner -xpf "$rootfs_tar" -C "$ref"
mkdir -p "$ref/opt/data/files"
chmod 755 "$ref/opt" "$ref/opt/data" "$ref/opt/data/files"
for i in $(seq 1 "$BLOBS"); do
  head -c "$((BLOB_MIB << 20))" /dev/urandom >"$ref/opt/data/blob$i"
done
for i in $(seq -f %04g 1 "$FILES"); do
  head -c "$((FILE_KIB << 10))" /dev/urandom >"$ref/opt/data/files/f$i.bin"
done
echo "rootfs-cache lazy pull bench: the bytes the workload must see" >"$ref/opt/data/files/known.txt"
chmod 644 "$ref"/opt/data/blob* "$ref"/opt/data/files/*
# What the workload must print: the same command over the tree the layers are made of.
chroot "$ref" "${WORKLOAD[@]}" >"$T/expected"
# The image's bytes once unpacked (for "fully local": the cache must hold about this much).
image_raw=$(du -s -B1 --apparent-size "$ref" | cut -f1)
layout="$T/layout"
mkdir -p "$layout/blobs/sha256"
cp "$rootfs_tar" "$layout/base.tar"
# layer_tar NAME < PATHS: a layer of PATHS (relative to $ref) and /opt, /opt/data above
# them; no "./" entry, which would give the image's root this layer's metadata.
layer_tar() {
  { printf 'opt\nopt/data\n' && cat; } | tar --numeric-owner --no-recursion -C "$ref" -cf "$layout/$1.tar" -T -
}
(cd "$ref" && find opt/data -maxdepth 1 -name 'blob*' | sort) | layer_tar blobs
(cd "$ref" && find opt/data/files | sort) | layer_tar files
rm -rf "$ref"
python3 - "$layout" base blobs files >"$T/layers.tsv" <<'EOF'
import hashlib, json, os, sys, tarfile
out, names = sys.argv[1], sys.argv[2:]
def put(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    d = h.hexdigest()
    size = os.path.getsize(path)
    os.rename(path, f"{out}/blobs/sha256/{d}")
    return {"digest": "sha256:" + d, "size": size}
def put_bytes(data):
    p = f"{out}/blob.tmp"
    open(p, "wb").write(data)
    return put(p)
def js(o):
    return json.dumps(o, separators=(",", ":"), sort_keys=True).encode()
layers = []
for n in names:
    t = f"{out}/{n}.tar"
    entries = sum(1 for _ in tarfile.open(t))
    d = put(t)
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", **d})
    print(f"{n}\t{entries}\t{d['size']}\t{d['digest']}")
config = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
          "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]}}
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put_bytes(js(config))},
            "layers": layers}
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **put_bytes(js(manifest)),
                        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
open(f"{out}/index.json", "wb").write(js(index))
open(f"{out}/oci-layout", "wb").write(js({"imageLayoutVersion": "1.0.0"}))
EOF

# ---------------------------------------------------------------------------------------
# The registry, in a network namespace behind a veth pair.

if ip -4 route show to match 10.213.8.2 | grep -vq '^default'; then die "10.213.8.0/30 is in use here"; fi
log "network namespace $NS, veth $VH <-> $VN, registry on $REG..."
ip netns add "$NS"
ip link add "$VH" type veth peer name "$VN"
ip link set "$VN" netns "$NS"
ip addr add 10.213.8.1/30 dev "$VH"
ip link set "$VH" up
ip -n "$NS" addr add 10.213.8.2/30 dev "$VN"
ip -n "$NS" link set "$VN" up
ip -n "$NS" link set lo up
cat >"$T/registry.yml" <<EOF
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $T/reg
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $REG
EOF
ip netns exec "$NS" docker-registry serve "$T/registry.yml" >>"$T/registry.log" 2>&1 </dev/null &
reg_pid=$!
for _ in $(seq 100); do
  curl -sf "http://$REG/v2/" >/dev/null && break
  sleep 0.05
done
curl -sf "http://$REG/v2/" >/dev/null || {
  tail "$T/registry.log" >&2
  die "registry on $REG did not come up"
}
rx_file="/sys/class/net/$VH/statistics/rx_bytes"

log "pushing the image as zstd:chunked (skopeo $(skopeo --version | awk '{ print $3 }'))..."
# skopeo is known to hang converting some images to zstd:chunked: bounded.
if ! timeout 600 skopeo copy -q --dest-compress-format zstd:chunked --dest-tls-verify=false \
  "oci:$layout:v1" "docker://$REG/lazy:v1" >&2; then
  die "skopeo copy to zstd:chunked failed or timed out (600 s)"
fi
rm -rf "$layout"
curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/lazy/manifests/v1" >"$T/manifest.json"
# Every layer must be zstd:chunked: zstd with the TOC annotations (containers/storage's
# io.github.containers.zstd-chunked.manifest-checksum and -position).
python3 - "$T/manifest.json" "$T/layers.tsv" >"$T/image.tsv" <<'EOF' || die "the pushed image is not zstd:chunked (see above)"
import json, sys
m = json.load(open(sys.argv[1]))
rows = [l.split("\t") for l in open(sys.argv[2]).read().splitlines()]
if len(m["layers"]) != len(rows):
    sys.exit(f"{len(m['layers'])} layers pushed, {len(rows)} made")
for l, (name, entries, raw, _) in zip(m["layers"], rows):
    ann = l.get("annotations", {})
    if not l["mediaType"].endswith("+zstd") or not any("zstd-chunked" in k for k in ann):
        sys.exit(f"layer {name}: {l['mediaType']}, annotations {sorted(ann)}")
    print(f"{name}\t{entries}\t{raw}\t{l['size']}\t{l['digest']}")
EOF
image_bytes=$(awk -F'\t' '{ s += $4 } END { print s }' "$T/image.tsv")
biggest=$(sort -t$'\t' -k4,4n "$T/image.tsv" | tail -1 | cut -f5)
log "image: $(awk -F'\t' '{ printf "%s%s %.1f MB (%d entries, %.1f MB as tar)", (NR > 1 ? ", " : ""), $1, $4 / 1e6, $2, $3 / 1e6 }' "$T/image.tsv"); $((image_bytes / 1000000)) MB in all"

# ---------------------------------------------------------------------------------------
# One run.

# set_link LINK: a tbf at LINK on both ends of the veth, or none.
set_link() {
  tc qdisc del dev "$VH" root 2>/dev/null || true
  ip netns exec "$NS" tc qdisc del dev "$VN" root 2>/dev/null || true
  [[ "$1" == unshaped ]] && return 0
  # The bucket must hold more than one timer tick's worth of bytes (1600 mbit/s / HZ 250
  # = 0.8 MB), or the link falls short of the rate; the curl check below shows the rate.
  tc qdisc add dev "$VH" root tbf rate "$1" burst 2mb latency 20ms
  ip netns exec "$NS" tc qdisc add dev "$VN" root tbf rate "$1" burst 2mb latency 20ms
}

# fresh_fs: a new, empty ext4 at $EXT (mkfs without lazy init: no background zeroing).
fresh_fs() {
  if mountpoint -q "$EXT"; then umount -R "$EXT" 2>/dev/null || umount -R -l "$EXT"; fi
  rm -f "$IMG"
  truncate -s 4G "$IMG"
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$IMG"
  mount -o loop "$IMG" "$EXT"
  sync
}

# The timed run: rootfsctl's stdout read line by line with timestamps, the veth's rx
# counter read at the workload's last line and when rootfsctl has exited. Exits with
# rootfsctl's status; prints its process group.
cat >"$T/timed.py" <<'EOF'
import json, subprocess, sys, threading, time
out_json, err_file, rx_file, expected = sys.argv[1:5]
cmd = sys.argv[6:]  # after "--"
want = len(open(expected).read().splitlines())
rx = lambda: int(open(rx_file).read())
lines, first, done = [], [None], [None, None]
rx0, wall0, t0 = rx(), time.time(), time.monotonic()
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(err_file, "wb"), start_new_session=True)
def reader():
    for line in p.stdout:
        now = time.monotonic() - t0
        lines.append(line.decode(errors="replace").rstrip("\n"))
        if first[0] is None:
            first[0] = now
        if len(lines) == want:
            done[:] = [now, rx() - rx0]
th = threading.Thread(target=reader, daemon=True)
th.start()
rc = p.wait()
t_exit, rx_exit = time.monotonic() - t0, rx() - rx0
th.join(2)  # a child still holding stdout is not waited for
json.dump({"rc": rc, "pgid": p.pid, "wall0": wall0, "rx0": rx0, "first": first[0], "t_done": done[0],
           "rx_done": done[1], "exit": t_exit, "rx_exit": rx_exit, "lines": list(lines)}, open(out_json, "w"))
print(p.pid)  # its process group, for the caller to end what it leaves running
sys.exit(rc if rc >= 0 else 128 - rc)
EOF

# jget JSON KEY: one value of a run's record.
jget() { python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))[sys.argv[2]]; print("" if v is None else v)' "$1" "$2"; }

# check_output JSON WHAT: the workload printed what it must, or the bench fails.
check_output() {
  python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["lines"] != open(sys.argv[2]).read().splitlines())' "$1" "$T/expected" ||
    die "$2: the workload saw wrong bytes: $(jget "$1" lines) (expected: $(cat "$T/expected"))"
}

# local_bytes: bytes allocated under the layers/ of the cache $CACHE (hard links once;
# -x: not into a FUSE mount, should lazy mode have one there).
local_bytes() { { du -sx -B1 "$CACHE/layers" 2>/dev/null || echo 0; } | cut -f1; }

# ---------------------------------------------------------------------------------------
# Time until fully local (lazy). How `run --lazy` tells that the image has become fully
# local is up to it; this takes the first that applies:
#  1. a `fully_local_ms=N` in the run's stderr (N: milliseconds since the run started),
#     if `run --lazy` waits for or reports its background completion;
#  2. otherwise `rootfsctl --cache C ensure --lazy REF` right after the run (plain
#     `ensure` where rootfsctl has no `ensure --lazy`), retried while it fails (a
#     background completion may hold the cache), then polling until the cache's layers/
#     holds the image's unpacked bytes (98%): the time from the run's start until then.
#     `run --lazy` serves the image only while it runs (its background completion stops
#     when it exits), so this includes the ensure finishing the pull, from what the run
#     left in the cache.
# Prints seconds, or nothing after LOCAL_TIMEOUT seconds. Called as soon as the run has
# returned: nothing slow (no python) runs before the end time is taken.
time_until_local() {
  local json=$1 err=$2 ms now deadline
  ms=$(grep -o 'fully_local_ms=[0-9.]*' "$err" | tail -1 | cut -d= -f2 || true)
  if [[ -n "$ms" ]]; then
    awk -v ms="$ms" 'BEGIN { printf "%.3f\n", ms / 1000 }'
    return 0
  fi
  deadline=$((SECONDS + LOCAL_TIMEOUT))
  until "$bin" --cache "$CACHE" --plain-http ensure "${ensure_lazy[@]}" "$REF" >/dev/null 2>"$T/ensure.err"; do
    ((SECONDS < deadline)) || {
      log "  ensure after the lazy run still fails: $(tail -1 "$T/ensure.err")"
      return 0
    }
    sleep 0.05
  done
  until (($(local_bytes) * 100 >= image_raw * 98)); do
    ((SECONDS < deadline)) || {
      log "  not fully local after ${LOCAL_TIMEOUT} s: layers/ holds $(local_bytes) of $image_raw bytes"
      return 0
    }
    sleep 0.05
  done
  now=$(date +%s.%N)
  awk -v a="$(jget "$json" wall0)" -v z="$now" 'BEGIN { printf "%.3f\n", z - a }'
}

ensure_lazy=()
if "$bin" ensure --help 2>&1 | grep -q -- --lazy; then ensure_lazy=(--lazy); fi
lazy=unknown # unknown until the first lazy run: yes, or no (the option is rejected)
# one_run LINK MODE N: one timed run from a fresh cache; appends a row to runs.tsv.
# When MODE is lazy and rootfsctl rejects --lazy, sets lazy=no and records nothing.
one_run() {
  local link=$1 mode=$2 n=$3 j="$T/runs/$1-$2-$3.json" e="$T/runs/$1-$2-$3.err" rc=0 flag=() local_s="" total
  fresh_fs
  CACHE="$EXT/cache"
  [[ "$mode" == lazy ]] && flag=(--lazy)
  run_pgid=$(python3 "$T/timed.py" "$j" "$e" "$rx_file" "$T/expected" -- \
    "$bin" --cache "$CACHE" --plain-http run "${flag[@]}" "$REF" "$EXT/ws" -- "${WORKLOAD[@]}") || rc=$?
  if [[ "$mode" == lazy && "$lazy" == unknown ]]; then
    if [[ "$rc" == 2 ]] && grep -q -- '--lazy' "$e"; then
      lazy=no
      log "lazy: not available (rootfsctl run --lazy rejected: $(tail -1 "$e"))"
      return 0
    fi
    lazy=yes
  fi
  [[ "$rc" == 0 ]] || die "$mode run $n over $link: exit $rc; stderr: $(tail -3 "$e")"
  [[ "$mode" == lazy ]] && local_s=$(time_until_local "$j" "$e")
  check_output "$j" "$mode run $n over $link"
  if [[ "$mode" == eager ]] && (($(local_bytes) * 100 < image_raw * 98)); then
    die "eager run $n over $link: the cache holds $(local_bytes) bytes, the image $image_raw"
  fi
  total=$(($(cat "$rx_file") - $(jget "$j" rx0)))
  # Whatever the run left running (a background completion) ends before the next run.
  if kill -0 -- "-$run_pgid" 2>/dev/null; then
    log "  processes of the $mode run left running: killed"
    kill -KILL -- "-$run_pgid" 2>/dev/null || true
  fi
  run_pgid=""
  "$bin" --cache "$CACHE" stats >>"$data/lazy-pull-stats.log" 2>&1 || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$link" "$mode" "$n" "$(jget "$j" first)" "$(jget "$j" t_done)" \
    "$(jget "$j" exit)" "$(jget "$j" rx_done)" "$(jget "$j" rx_exit)" "$local_s" "$total" >>"$T/runs.tsv"
  log "  $mode $n: workload done $(jget "$j" t_done) s, run returned $(jget "$j" exit) s, $(($(jget "$j" rx_done) / 1000000)) MB by done${local_s:+, fully local $local_s s}"
}

# mbps BYTES T0 T1: MB/s.
mbps() { awk -v b="$1" -v a="$2" -v z="$3" 'BEGIN { print b / 1e6 / (z - a) }'; }

# The read-throughput phase (modes as arguments): for each mode a kept workspace over its
# own cache, both on one new ext4, both mounted; lazy: `run --lazy` (which takes no
# --keep), then once fully local the kept workspace by `run --keep` over the same cache
# (checked to fetch nothing: it reads the layers the lazy pull completed); then READS
# rounds, each reading the largest file with dd in every mode in turn (so that other load
# on the machine hits both alike): cold, its page cache dropped first (fadvise DONTNEED
# through the overlay: `dd iflag=nocache count=0`), then warm. Appends "MODE cold_MBps
# warm_MBps" (medians) to reads.tsv, or "MODE - - why".
read_phase() {
  local mode flag dir ready=() why i t0 t1 bytes f
  fresh_fs
  for mode in "$@"; do
    dir="$EXT/read-$mode"
    CACHE="$dir/cache"
    why=""
    if [[ "$mode" == lazy ]]; then
      run_pgid=$(python3 "$T/timed.py" "$T/read.json" "$T/read.err" "$rx_file" "$T/expected" -- \
        "$bin" --cache "$CACHE" --plain-http run --lazy "$REF" "$dir/lazy-ws" -- "${WORKLOAD[@]}") ||
        die "lazy run: $(tail -3 "$T/read.err")"
      check_output "$T/read.json" "lazy run before the reads"
      [[ -n "$(time_until_local "$T/read.json" "$T/read.err")" ]] || why="not fully local after ${LOCAL_TIMEOUT} s"
      kill -KILL -- "-$run_pgid" 2>/dev/null || true
    fi
    if [[ -z "$why" ]]; then
      run_pgid=$(python3 "$T/timed.py" "$T/read.json" "$T/read.err" "$rx_file" "$T/expected" -- \
        "$bin" --cache "$CACHE" --plain-http run --keep "$REF" "$dir/ws" -- "${WORKLOAD[@]}") ||
        die "$mode run --keep: $(tail -3 "$T/read.err")"
      check_output "$T/read.json" "$mode run --keep"
      if [[ "$mode" == lazy ]] && (($(jget "$T/read.json" rx_exit) > 1000000)); then
        why="the kept workspace's run fetched $(jget "$T/read.json" rx_exit) bytes: the lazy pull left layers to fetch"
      fi
    fi
    run_pgid=""
    if [[ -z "$why" ]] && ! "$bin" mount "$dir/ws" >"$dir/merged" 2>"$T/mount.err"; then
      why="rootfsctl mount of the kept workspace failed: $(tail -1 "$T/mount.err")"
    fi
    if [[ -n "$why" ]]; then
      log "  $mode: $why"
      printf '%s\t-\t-\t%s\n' "$mode" "$why" >>"$T/reads.tsv"
    else
      ready+=("$mode")
      : >"$dir/cold"
      : >"$dir/warm"
    fi
  done
  sync -f "$EXT" # no writeback of the extractions competes with the reads
  for i in $(seq "$READS"); do
    for mode in ${ready[@]+"${ready[@]}"}; do
      dir="$EXT/read-$mode"
      f="$(cat "$dir/merged")/opt/data/blob1"
      bytes=$(stat -c %s "$f")
      dd if="$f" iflag=nocache count=0 status=none
      t0=$(date +%s.%N)
      dd if="$f" of=/dev/null bs=1M status=none
      t1=$(date +%s.%N)
      mbps "$bytes" "$t0" "$t1" >>"$dir/cold"
      t0=$(date +%s.%N)
      dd if="$f" of=/dev/null bs=1M status=none
      t1=$(date +%s.%N)
      mbps "$bytes" "$t0" "$t1" >>"$dir/warm"
    done
  done
  for mode in ${ready[@]+"${ready[@]}"}; do
    dir="$EXT/read-$mode"
    printf '%s\t%s\t%s\t\n' "$mode" "$(sort -g "$dir/cold" | sed -n "$(((READS + 1) / 2))p")" \
      "$(sort -g "$dir/warm" | sed -n "$(((READS + 1) / 2))p")" >>"$T/reads.tsv"
    log "  $mode: read of blob1 ($((bytes >> 20)) MiB), MB/s: cold $(paste -sd' ' "$dir/cold"), warm $(paste -sd' ' "$dir/warm")"
    "$bin" unmount "$dir/ws" >/dev/null
    "$bin" --cache "$dir/cache" destroy "$dir/ws" >/dev/null
  done
}

# ---------------------------------------------------------------------------------------
# The runs.

: >"$T/runs.tsv"
: >"$T/reads.tsv"
: >"$T/links.tsv"
: >"$data/lazy-pull-stats.log"
for link in $LINKS; do
  set_link "$link"
  rate=$(curl -sfo /dev/null -w "%{size_download} %{time_total}\n" "http://$REG/v2/lazy/blobs/$biggest" |
    awk '{ printf "%.0f", $1 / 1e6 / $2 }')
  printf '%s\t%s\n' "$link" "$rate" >>"$T/links.tsv"
  log "== $link: one stream gets $rate MB/s; $RUNS runs per mode (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  for n in $(seq "$RUNS"); do
    one_run "$link" eager "$n"
    if [[ "$lazy" != no ]]; then one_run "$link" lazy "$n"; fi
  done
done
log "== read throughput (unshaped link)"
set_link unshaped
if [[ "$lazy" == yes ]]; then read_phase eager lazy; else read_phase eager; fi
if [[ "$lazy" == no ]]; then echo "lazy: not available (rootfsctl run --lazy rejected)"; fi

load=$(cut -d' ' -f1-3 /proc/loadavg)
fs_desc="ext4 on a loop file in ${IMG_DIR:-tmpfs}"
cmd="sudo RUNS=$RUNS"
[[ "$LINKS" == "1600mbit 1gbit unshaped" ]] || cmd+=" LINKS=\"$LINKS\""
[[ "$BLOBS $BLOB_MIB $FILES $FILE_KIB" == "5 56 300 64" ]] || cmd+=" BLOBS=$BLOBS BLOB_MIB=$BLOB_MIB FILES=$FILES FILE_KIB=$FILE_KIB"
cmd+=" benches/lazy_pull.sh"
python3 - "$T/image.tsv" "$T/runs.tsv" "$T/reads.tsv" "$T/links.tsv" "$RUNS" "$lazy" "$load" "$fs_desc" \
  "$cmd" "$(git rev-parse --short HEAD 2>/dev/null || echo -)" "${WORKLOAD[*]}" "$BLOB_MIB" <<'EOF' | tee "$data/lazy-pull.md"
import statistics, sys, time
image, runs, reads, links, nruns, lazy, load, fs, cmd, commit, workload, blob_mib = sys.argv[1:13]
layers = [l.split("\t") for l in open(image).read().splitlines()]
total = sum(int(l[3]) for l in layers)
rows = [l.split("\t") for l in open(runs).read().splitlines()]
rates = dict(l.split("\t") for l in open(links).read().splitlines())
def med(link, mode, col):
    v = [float(r[col]) for r in rows if r[0] == link and r[1] == mode and r[col] != ""]
    return statistics.median(v) if v else None
s = lambda v: "–" if v is None else f"{v:.2f} s"
mb = lambda v: "–" if v is None else f"{v / 1e6:.1f} MB ({100 * v / total:.1f}%)"
def name(link):
    if link == "unshaped":
        return "unshaped veth"
    num, unit = link[:-4].rstrip("kmg"), link[-4:-3]
    bits = float(num) * {"k": 1e3, "m": 1e6, "g": 1e9}.get(unit, 1)
    return f"tbf {link} ({bits / 8e6:.0f} MB/s)"
print(f"Run {time.strftime('%Y-%m-%d')} at commit `{commit}`: `{cmd}`. File system: {fs}, a new one for every run. "
      f"Link: a veth into a network namespace with `tc tbf` at the rate on both ends (or none), "
      f"Debian's docker-registry on the far end, storage on tmpfs. "
      f"Image: {len(layers)} zstd:chunked layers (skopeo), " + ", ".join(
          f"{n} {int(c) / 1e6:.1f} MB ({e} entries, {int(r) / 1e6:.1f} MB as tar)" for n, e, r, c, _ in layers)
      + f"; {total / 1e6:.1f} MB in all. Workload: `{workload}`, its output checked. "
      f"Medians of {nruns} runs per mode, each from an empty cache (load average at the end: {load}). "
      f"Fetched: bytes the registry sent, counted on the veth (headers included), in % of the image's {total / 1e6:.1f} MB.\n")
if lazy == "no":
    print("lazy: not available (rootfsctl run --lazy rejected)\n")
print("| link | one curl stream | eager: workload done / `run` returned | lazy: first line / workload done / `run` returned "
      "| eager / lazy, workload done | lazy: fetched by workload done | lazy: fully local | fetched in all, eager / lazy |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
bar = None
for link in dict.fromkeys(r[0] for r in rows):
    ed, ex = med(link, "eager", 4), med(link, "eager", 5)
    lf, ld, lx = med(link, "lazy", 3), med(link, "lazy", 4), med(link, "lazy", 5)
    ratio = f"{ed / ld:.1f}×" if ed and ld else "–"
    lrx = med(link, "lazy", 6)
    print(f"| {name(link)} | {rates.get(link, '?')} MB/s | {s(ed)} / {s(ex)} | {s(lf)} / {s(ld)} / {s(lx)} | {ratio} "
          f"| {mb(lrx)} | {s(med(link, 'lazy', 8))} | {mb(med(link, 'eager', 9))} / {mb(med(link, 'lazy', 9))} |")
    if link == "1600mbit" and ed and ld and lrx is not None:
        ok = ed / ld >= 5 and lrx < 0.1 * total
        bar = (f"\n**Against the bar** (200 MB/s: workload done ≥ 5× sooner than eager, < 10% of the image fetched by then): "
               f"{'met' if ok else 'not met'}, {ed / ld:.1f}× and {100 * lrx / total:.1f}%.")
if bar:
    print(bar)
rd = [l.split("\t") for l in open(reads).read().splitlines()]
if rd:
    print(f"\nRead of /opt/data/blob1 ({blob_mib} MiB) with `dd bs=1M` through a kept workspace's merged view "
          "(unshaped link; lazy: over the layers a lazy pull completed), median of the dd runs; cold: the file's page cache dropped first "
          "(`dd iflag=nocache count=0`):\n")
    print("| layer | cold | warm |")
    print("|---|---:|---:|")
    label = {"eager": "eager (extracted by `run`)", "lazy": "lazy, after completion"}
    for mode, cold, warm, why in (r + [""] * (4 - len(r)) for r in rd):
        if cold == "-":
            print(f"| {label[mode]} | – | – ({why}) |")
        else:
            print(f"| {label[mode]} | {float(cold):.0f} MB/s | {float(warm):.0f} MB/s |")
EOF
cp "$T/runs.tsv" "$data/lazy-pull-runs.tsv"
if [[ "$UPDATE_DOC" == 1 ]]; then
  python3 - "$data/lazy-pull.md" BENCHMARKS.md <<'EOF'
import re, sys
table, doc = open(sys.argv[1]).read().strip(), sys.argv[2]
text = open(doc).read()
pat = re.compile(r"(<!-- lazypull:begin[^>]*-->\n).*?(<!-- lazypull:end -->)", re.S)
if not pat.search(text):
    sys.exit("lazy_pull: no lazypull markers in " + doc)
open(doc, "w").write(pat.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))
EOF
  log "table written into BENCHMARKS.md"
fi
