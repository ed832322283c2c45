#!/usr/bin/env bash
# Cold pull + unpack of a 4-layer gzip Debian image from a registry: `rootfsctl ensure
# docker://…` vs `ctr images pull` (containerd 1.6, overlayfs snapshotter) vs `podman
# pull` (overlay driver), side by side in one hyperfine run per case, every run of every
# client from empty storage on the same ext4 file system. Prints a Markdown table of
# medians and ratios, writes it to bench-data/cold-pull.md and into BENCHMARKS.md between
# the `coldpull` markers.
#
#   sudo benches/cold_pull.sh                              # loopback and shaped, all three
#   sudo RUNS=3 SHAPED=0 CLIENTS="ctr podman" benches/cold_pull.sh
#
# Environment:
#   RUNS=7          timed runs per client and case (WARMUP=1 untimed runs before them)
#   SHAPED=1        also the shaped case (0: loopback only; 2: shaped only)
#   RATE=1gbit      the shaped link's rate, each direction (tc tbf)
#   CLIENTS="ctr podman ours"   which clients to measure, in this order
#   OURS='{bin} --cache {cache} --plain-http ensure docker://{ref}'   our command;
#                   {bin} is the release rootfsctl (built when used), {cache} the cache dir
#                   on the ext4 mount, {ref} HOST:PORT/deb:v1
#   IMG_DIR=        where the ext4 image file lives (default: a tmpfs made by the script,
#                   so the file system is real ext4 but no disk adds noise)
#   UPDATE_DOC=1    write the table into BENCHMARKS.md (0: only bench-data/cold-pull.md)
#
# Setup, all made here and removed on exit (also on error or Ctrl-C; the script runs in
# its own mount namespace, so no mount outlives it):
# - Image: bench-data/rootfs.tar (a Debian bookworm `debootstrap --variant=minbase` tree,
#   made as benches/peer.sh makes it, or copied from ROOTFS_TAR) split by top-level
#   directories into 4 layers (base: /etc, the skeleton and /usr/lib*; programs: /usr/bin,
#   /usr/sbin, /usr/libexec, …; share: /usr/share; var: /var), each `gzip -n -6`, written
#   as an OCI layout in bench-data/cold-pull-image (deterministic for a given rootfs.tar).
# - Registry: Debian's docker-registry (distribution 2.8) with its storage on the tmpfs,
#   filled by `skopeo copy --preserve-digests oci:… docker://…`. Loopback case: on
#   127.0.0.1:PORT. Shaped case: a second registry in a network namespace, reached over a
#   veth pair with `tc tbf` at RATE on both ends.
# - Storage: one ext4 image file, made again (mkfs with no lazy init, so no background
#   zeroing competes) and loop-mounted before every run of every client (hyperfine
#   --prepare, untimed), so each run starts empty and no client finds data in the page
#   cache. containerd runs with its root, state and content store on that ext4 mount,
#   restarted before each of its runs; podman's --root/--runroot and its blob copy
#   directory are on it; its blob-info cache (/var/lib/containers/cache) is a private bind
#   mount, emptied too. Our cache directory is on it.
# - Each client is checked once per case before timing: every regular file of the image is
#   in its unpacked layer directories (containerd's snapshots, podman's overlay diffs, our
#   layers/*/fs).
# Needs root, hyperfine, containerd + ctr, podman, docker-registry, skopeo, iproute2, tc,
# python3, /usr/bin/time; debootstrap if bench-data/rootfs.tar is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
self="$PWD/benches/cold_pull.sh"

log() { echo "cold_pull: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------
# Helpers also run by hyperfine's --prepare (`cold_pull.sh __prepare CLIENT`), with the
# state in exported CP_* variables.

stop_containerd() {
  local pidf="$CP_T/ctd/pid" pid i
  [[ -f "$pidf" ]] || return 0
  pid=$(cat "$pidf")
  rm -f "$pidf"
  # The daemon's CPU time over its life (start, one pull), for the CPU figures.
  awk -v t="$(getconf CLK_TCK)" '{ print ($14 + $15) / t }' "/proc/$pid/stat" >>"$CP_T/ctd/cpu" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  echo "containerd ($pid) did not stop" >&2
  return 1
}

start_containerd() {
  local i
  setsid containerd --config "$CP_T/ctd/config.toml" >>"$CP_T/ctd/log" 2>&1 </dev/null &
  echo $! >"$CP_T/ctd/pid"
  for i in $(seq 200); do
    ctr -a "$CP_T/ctd/sock" version >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "containerd did not come up; $CP_T/ctd/log:" >&2
  tail -20 "$CP_T/ctd/log" >&2
  return 1
}

# Empty storage for the next run of CLIENT: a new ext4 file system, the podman blob-info
# cache emptied, containerd restarted (only for ctr; it is stopped otherwise).
prepare() {
  local client=$1
  stop_containerd
  if mountpoint -q "$CP_EXT"; then umount -R "$CP_EXT"; fi
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$CP_IMG"
  mount -o loop "$CP_IMG" "$CP_EXT"
  mkdir -p "$CP_EXT/containerd" "$CP_EXT/podman/tmp" "$CP_EXT/ours"
  find "$CP_T/bic" -mindepth 1 -delete
  rm -f /dev/shm/libpod_lock # our private /dev/shm
  if [[ "$client" == ctr ]]; then start_containerd; fi
  sync
  sleep 0.2
}

if [[ "${1:-}" == __prepare ]]; then
  prepare "$2"
  exit 0
fi

# ---------------------------------------------------------------------------------------
# Setup.

[[ $EUID -eq 0 ]] || die "needs root (mounts, mkfs, network namespaces, containerd)"
if [[ -z "${CP_UNSHARED:-}" ]]; then
  # Own mount namespace: the loop mount, the tmpfs and the bind mount die with us.
  exec env CP_UNSHARED=1 unshare -m --propagation private "$self" "$@"
fi

RUNS="${RUNS:-7}"
WARMUP="${WARMUP:-1}"
SHAPED="${SHAPED:-1}"
RATE="${RATE:-1gbit}"
CLIENTS="${CLIENTS:-ctr podman ours}"
OURS="${OURS:-"{bin} --cache {cache} --plain-http ensure docker://{ref}"}"
UPDATE_DOC="${UPDATE_DOC:-1}"
for c in $CLIENTS; do
  case "$c" in ctr | podman | ours) ;; *) die "unknown client $c (ctr, podman, ours)" ;; esac
done
case "$SHAPED" in 0) cases=loopback ;; 1) cases="loopback shaped" ;; 2) cases=shaped ;; *) die "SHAPED must be 0, 1 or 2" ;; esac
for t in hyperfine containerd ctr podman docker-registry skopeo ip tc curl python3 mkfs.ext4 unshare; do
  command -v "$t" >/dev/null || die "$t not found"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (apt-get install time)"

data=bench-data
mkdir -p "$data"
if [[ -n "${ROOTFS_TAR:-}" ]]; then
  cp "$ROOTFS_TAR" "$data/rootfs.tar"
elif [[ ! -f "$data/rootfs.tar" ]]; then
  tmp=$(mktemp -d)
  log "debootstrap --variant=minbase bookworm (one-time)..."
  debootstrap --variant=minbase bookworm "$tmp/rootfs" http://deb.debian.org/debian >/dev/null
  tar --numeric-owner --xattrs -C "$tmp/rootfs" -cf "$data/rootfs.tar" .
  rm -rf "$tmp"
fi

# The image: 4 gzip layers split by top-level directories, as an OCI layout tagged v1.
layout="$data/cold-pull-image"
stamp=$(stat -c '%s %Y' "$data/rootfs.tar")
if [[ ! -f "$layout/index.json" || "$(cat "$layout/.source" 2>/dev/null)" != "$stamp" ]]; then
  log "building the 4-layer OCI layout in $layout..."
  rm -rf "$layout"
  mkdir -p "$layout"
  python3 - "$data/rootfs.tar" "$layout" >"$layout/layers.tsv" <<'EOF'
import hashlib, json, os, subprocess, sys, tarfile
src, out = sys.argv[1], sys.argv[2]
LAYERS = [  # (name, path prefixes); an entry under none of them goes to "base"
    ("base", []),  # /etc, the skeleton, /usr/lib, /usr/lib64
    ("programs", ["usr/bin/", "usr/sbin/", "usr/libexec/", "usr/games/", "usr/include/", "usr/local/", "usr/src/"]),
    ("share", ["usr/share/"]),
    ("var", ["var/"]),
]
def layer_of(name):
    n = name[2:] if name.startswith("./") else name
    for i, (_, prefixes) in enumerate(LAYERS):
        if any((n + "/").startswith(p) and n + "/" != p for p in prefixes):
            return i
    return 0
os.makedirs(f"{out}/blobs/sha256", exist_ok=True)
tmp = [f"{out}/{name}.tar" for name, _ in LAYERS]
outs = [tarfile.open(t, "w", format=tarfile.PAX_FORMAT) for t in tmp]
dirs, emitted, where = {}, [set() for _ in LAYERS], {}
with tarfile.open(src) as tf:
    for m in tf:
        i = layer_of(m.name)
        # Every layer carries the directories above its entries, with their metadata.
        parts = m.name.rstrip("/").split("/")
        for k in range(1, len(parts)):
            d = "/".join(parts[:k])
            if d in dirs and d not in emitted[i]:
                outs[i].addfile(dirs[d])
                emitted[i].add(d)
        if m.isdir():
            dirs[m.name.rstrip("/")] = m
            emitted[i].add(m.name.rstrip("/"))
        if m.islnk() and where.get(m.linkname) != i:
            sys.exit(f"hard link {m.name} -> {m.linkname} crosses layers")
        where[m.name] = i
        outs[i].addfile(m, tf.extractfile(m) if m.isreg() else None)
for o in outs:
    o.close()
def blob(data):
    d = hashlib.sha256(data).hexdigest()
    with open(f"{out}/blobs/sha256/{d}", "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + d, "size": len(data)}
def js(o):
    return json.dumps(o, separators=(",", ":"), sort_keys=True).encode()
layers, diff_ids = [], []
for (name, _), t in zip(LAYERS, tmp):
    raw = open(t, "rb").read()
    diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    gz = subprocess.run(["gzip", "-n", "-6", "-c", t], check=True, stdout=subprocess.PIPE).stdout
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(gz)})
    entries = sum(1 for _ in tarfile.open(t))
    print(f"{name}\t{entries}\t{len(raw)}\t{len(gz)}")
    os.remove(t)
config = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/bash"]},
          "rootfs": {"type": "layers", "diff_ids": diff_ids}}
manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(js(config))},
            "layers": layers}
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
         "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", **blob(js(manifest)),
                        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
with open(f"{out}/index.json", "wb") as f:
    f.write(js(index))
with open(f"{out}/oci-layout", "wb") as f:
    f.write(js({"imageLayoutVersion": "1.0.0"}))
EOF
  echo "$stamp" >"$layout/.source"
fi
manifest_digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$layout/index.json")
# Regular files in the image (hard links count once per name, as find counts them).
expect_files=$(tar -tvf "$data/rootfs.tar" | grep -c '^[-h]')

bin=""
if [[ " $CLIENTS " == *" ours "* && "$OURS" == *"{bin}"* ]]; then
  log "building rootfsctl (release)..."
  cargo build --release --example rootfsctl >&2
  bin="$PWD/target/release/examples/rootfsctl"
fi

# Work dir: a tmpfs holding the registry storage, the ext4 image (unless IMG_DIR), the
# daemons' configs and sockets.
T=$(mktemp -d /tmp/cold_pull.XXXXXX)
NS="coldpull$$"
VH="cp$$h"
VN="cp$$n"
reg_pids=()
child=""
shm=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n "$child" ]]; then
    kill -TERM -- "-$child" 2>/dev/null
    for _ in $(seq 100); do kill -0 -- "-$child" 2>/dev/null || break; sleep 0.05; done
    kill -KILL -- "-$child" 2>/dev/null
  fi
  [[ -n "${CP_T:-}" ]] && stop_containerd
  for p in "${reg_pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null
  ip link del "$VH" 2>/dev/null
  ip netns del "$NS" 2>/dev/null
  mountpoint -q /var/lib/containers/cache && umount /var/lib/containers/cache
  [[ -n "$shm" ]] && umount /dev/shm
  # podman's overlay driver bind-mounts its home on itself (left behind if it is killed).
  mountpoint -q "$T" && { umount -R "$T" || umount -R -l "$T"; }
  rm -rf "$T"
  [[ -n "${IMG_DIR:-}" ]] && rm -f "$IMG_DIR/cold_pull.$$.img"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mount -t tmpfs -o size=6g tmpfs "$T"
mkdir -p "$T/reg" "$T/ext4" "$T/bic" "$T/ctd" "$T/pod"
export CP_T="$T" CP_EXT="$T/ext4" CP_IMG="${IMG_DIR:+$IMG_DIR/cold_pull.$$.img}"
CP_IMG="${CP_IMG:-$T/ext4.img}"
truncate -s 4G "$CP_IMG"

# podman (as root) keeps a blob-info cache in /var/lib/containers/cache, outside --root:
# give it an empty private one (this mount namespace only), emptied before every run.
# (The directory is made on the host if missing: an empty mount point.)
mkdir -p /var/lib/containers/cache
mount --bind "$T/bic" /var/lib/containers/cache
# podman's lock segment (/dev/shm/libpod_lock) would outlive us: a private /dev/shm.
mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm
shm=1

# containerd: everything on the ext4 mount but the sockets (also its "opt" dir, by default
# /opt/containerd); no CRI, overlayfs snapshotter.
cat >"$T/ctd/config.toml" <<EOF
version = 2
root = "$CP_EXT/containerd/root"
state = "$CP_EXT/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$T/ctd/sock"
[ttrpc]
  address = "$T/ctd/sock.ttrpc"
[debug]
  address = "$T/ctd/debug.sock"
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$CP_EXT/containerd/opt"
EOF
# podman: storage, the blob copy directory (default /var/tmp) and its run-time directory
# (default /run/libpod) on the ext4 mount.
cat >"$T/pod/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CP_EXT/podman/root"
runroot = "$CP_EXT/podman/run"
EOF
cat >"$T/pod/containers.conf" <<EOF
[engine]
events_logger = "file"
image_copy_tmp_dir = "$CP_EXT/podman/tmp"
tmp_dir = "$CP_EXT/podman/libpod"
EOF
export CONTAINERS_CONF="$T/pod/containers.conf" CONTAINERS_STORAGE_CONF="$T/pod/storage.conf"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# start_registry ADDR [netns]: distribution 2.8 on ADDR, storage on the tmpfs.
start_registry() {
  local addr=$1 ns=${2:-} i
  cat >"$T/registry-$addr.yml" <<EOF
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
  addr: $addr
EOF
  if [[ -n "$ns" ]]; then
    ip netns exec "$ns" docker-registry serve "$T/registry-$addr.yml" >>"$T/registry.log" 2>&1 </dev/null &
  else
    docker-registry serve "$T/registry-$addr.yml" >>"$T/registry.log" 2>&1 </dev/null &
  fi
  reg_pids+=($!)
  for i in $(seq 100); do
    curl -sf "http://$addr/v2/" >/dev/null && return 0
    sleep 0.05
  done
  tail "$T/registry.log" >&2
  die "registry on $addr did not come up"
}

log "registry on 127.0.0.1:$port, pushing the image..."
start_registry "127.0.0.1:$port"
skopeo copy -q --preserve-digests --dest-tls-verify=false "oci:$layout:v1" "docker://127.0.0.1:$port/deb:v1" >&2
got=$(curl -sfI -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://127.0.0.1:$port/v2/deb/manifests/v1" |
  tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }')
[[ "$got" == "$manifest_digest" ]] || die "registry serves manifest $got, the layout has $manifest_digest"
find "$T/bic" -mindepth 1 -delete # skopeo's push filled it

if [[ " $cases " == *" shaped "* ]]; then
  if ip -4 route show to match 10.213.7.2 | grep -vq '^default'; then die "10.213.7.0/30 is in use here"; fi
  log "network namespace $NS, veth $VH <-> $VN, tbf $RATE both ways..."
  ip netns add "$NS"
  ip link add "$VH" type veth peer name "$VN"
  ip link set "$VN" netns "$NS"
  ip addr add 10.213.7.1/30 dev "$VH"
  ip link set "$VH" up
  ip -n "$NS" addr add 10.213.7.2/30 dev "$VN"
  ip -n "$NS" link set "$VN" up
  ip -n "$NS" link set lo up
  # Token bucket at RATE. The bucket (1 MiB) must hold more than one timer tick's worth of
  # bytes (1 Gbit/s / HZ 250 = 0.5 MB), or the link falls short of RATE; checked below.
  tc qdisc add dev "$VH" root tbf rate "$RATE" burst 1mb latency 20ms
  ip netns exec "$NS" tc qdisc add dev "$VN" root tbf rate "$RATE" burst 1mb latency 20ms
  start_registry "10.213.7.2:$port" "$NS"
fi
# The links' throughput for one stream: the largest layer blob fetched with curl.
big=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]+"/blobs/sha256/"+sys.argv[2][7:])); print(max(m["layers"], key=lambda l: l["size"])["digest"])' "$layout" "$manifest_digest")
for case in $cases; do
  if [[ "$case" == loopback ]]; then host="127.0.0.1:$port"; else host="10.213.7.2:$port"; fi
  curl -sfo /dev/null -w "%{size_download} %{time_total}\n" "http://$host/v2/deb/blobs/$big" |
    awk -v c="$case" '{ printf "cold_pull: %s link: one %.1f MB blob in %.3f s, %.0f MB/s\n", c, $1 / 1e6, $2, $1 / 1e6 / $2 }' >&2
done

# client_cmd CLIENT REF: the measured command line.
client_cmd() {
  local ref=$2 c
  case "$1" in
    ctr) echo "ctr -a $T/ctd/sock images pull --plain-http --snapshotter overlayfs $ref" ;;
    podman) echo "podman --root $CP_EXT/podman/root --runroot $CP_EXT/podman/run --storage-driver overlay pull -q --tls-verify=false $ref" ;;
    ours)
      c=${OURS//\{bin\}/$bin}
      c=${c//\{cache\}/$CP_EXT/ours}
      echo "${c//\{ref\}/$ref}"
      ;;
  esac
}

# verify CLIENT: every regular file of the image is in the client's unpacked layers.
verify() {
  local dirs n mb
  case "$1" in
    ctr) dirs=("$CP_EXT"/containerd/root/io.containerd.snapshotter.v1.overlayfs/snapshots/*/fs) ;;
    podman) dirs=("$CP_EXT"/podman/root/overlay/*/diff) ;;
    ours) dirs=("$CP_EXT"/ours/layers/*/fs) ;;
  esac
  n=$(find "${dirs[@]}" -type f 2>/dev/null | wc -l)
  mb=$(du -smc "${dirs[@]}" 2>/dev/null | tail -1 | cut -f1)
  log "  $1: ${#dirs[@]} layer dirs, $n regular files, $mb MB (image: $expect_files files)"
  [[ ${#dirs[@]} -eq 4 && $n -eq $expect_files ]] || die "$1 did not unpack the image"
}

results=()
for case in $cases; do
  if [[ "$case" == loopback ]]; then ref="127.0.0.1:$port/deb:v1"; else ref="10.213.7.2:$port/deb:v1"; fi
  log "== $case: checking every client once ($ref)"
  args=()
  for c in $CLIENTS; do
    cmd=$(client_cmd "$c" "$ref")
    prepare "$c"
    # eval: quotes in OURS split as hyperfine -N splits them (shell words).
    eval "$cmd" >"$T/check.out" 2>&1 || { tail -20 "$T/check.out" >&2; die "$c failed: $cmd"; }
    verify "$c"
    args+=(--prepare "$self __prepare $c" -n "$c" "$cmd")
  done
  log "== $case: hyperfine, $RUNS runs + $WARMUP warm-up per client (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  # In its own process group, waited for in the background: a signal to this script
  # runs the cleanup at once, and the cleanup stops hyperfine and the client it runs.
  setsid hyperfine -N -w "$WARMUP" -r "$RUNS" --export-json "$data/cold-pull-$case.json" "${args[@]}" >&2 &
  child=$!
  wait "$child"
  child=""
  rss=""
  if [[ " $CLIENTS " == *" ours "* ]]; then
    prepare ours
    eval "/usr/bin/time -f %M -o $T/rss $(client_cmd ours "$ref")" >/dev/null 2>&1
    rss=$(cat "$T/rss")
    log "  ours: peak RSS $((rss / 1024)) MiB"
  fi
  stop_containerd
  # containerd's CPU time in the timed runs (the last RUNS daemons stopped).
  tail -n "$RUNS" "$T/ctd/cpu" 2>/dev/null | paste -sd, >"$data/cold-pull-$case.containerd-cpu"
  results+=("$case:$data/cold-pull-$case.json:$rss:$data/cold-pull-$case.containerd-cpu")
done

load=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$layout/layers.tsv" "$RUNS" "$RATE" "$load" "${results[@]}" <<'EOF' | tee "$data/cold-pull.md"
import json, statistics, sys
tsv, runs, rate, load = sys.argv[1:5]
layers = [l.split("\t") for l in open(tsv).read().split("\n") if l]
cpus = []
names = {"loopback": "loopback (127.0.0.1)", "shaped": f"veth into a netns, tbf {rate} both ways"}
print(f"Image: {len(layers)} gzip layers, " + ", ".join(
    f"{n} {int(raw) / 1e6:.1f} → {int(gz) / 1e6:.1f} MB ({e} entries)" for n, e, raw, gz in layers)
      + f"; medians of {runs} runs (load average at the end: {load}).\n")
print("| registry link | `ctr images pull` | `podman pull` | `rootfsctl ensure` | faster peer / ours | ours: peak RSS |")
print("|---|---:|---:|---:|---:|---:|")
for arg in sys.argv[5:]:
    case, path, rss, ctd = arg.split(":")
    res = json.load(open(path))["results"]
    med = {r["command"]: statistics.median(r["times"]) for r in res}
    cpu = {r["command"]: r["user"] + r["system"] for r in res}
    ctd = [float(x) for x in open(ctd).read().strip().split(",") if x]
    if "ctr" in cpu and ctd:
        cpu["ctr"] += statistics.mean(ctd)
    cpus.append(f"{names[case]}: " + ", ".join(f"{c} {cpu[c]:.2f} s" for c in ("ctr", "podman", "ours") if c in cpu))
    cell = lambda c: f"{med[c]:.2f} s" if c in med else "–"
    peers = [med[c] for c in ("ctr", "podman") if c in med]
    ratio = f"{min(peers) / med['ours']:.2f}x" if peers and "ours" in med else "–"
    mem = f"{int(rss) / 1024:.0f} MiB" if rss else "–"
    print(f"| {names[case]} | {cell('ctr')} | {cell('podman')} | {cell('ours')} | {ratio} | {mem} |")
print("\nCPU time per pull (user + system, mean; ctr's includes the containerd daemon's, started"
      " fresh for the run): " + "; ".join(cpus) + ".")
EOF
if [[ "$UPDATE_DOC" == 1 ]]; then
  python3 - "$data/cold-pull.md" BENCHMARKS.md <<'EOF'
import re, sys
table, doc = open(sys.argv[1]).read().strip(), sys.argv[2]
text = open(doc).read()
pat = re.compile(r"(<!-- coldpull:begin[^>]*-->\n).*?(<!-- coldpull:end -->)", re.S)
if not pat.search(text):
    sys.exit("cold_pull: no coldpull markers in " + doc)
open(doc, "w").write(pat.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text))
EOF
  log "table written into BENCHMARKS.md"
fi
