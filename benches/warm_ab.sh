#!/usr/bin/env bash
# Warm restore before/after a change: the README demo (`examples/restore`, generated
# 3-layer image, kernel overlay) built at two commits, run alternately in one session
# with TMPDIR on tmpfs, an ext4 loop image and an XFS (reflink) loop image, inside a
# private mount namespace. Prints each run's summary line and the medians per file
# system: warm p50 and "of bare" for both builds.
#
#   sudo BEFORE=3747c01 AFTER=HEAD RUNS=5 benches/warm_ab.sh
#
# Needs root (mounts), xfsprogs, e2fsprogs.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE="${BEFORE:?BEFORE=<commit> is required}"
AFTER="${AFTER:-HEAD}"
RUNS="${RUNS:-5}"

work=$(mktemp -d)
cleanup() {
  # The loop images live in the tmpfs: unmount them first.
  for m in ext4 xfs tmpfs; do umount "$work/mnt/$m" 2>/dev/null || true; done
  git worktree remove --force "$work/src-before" 2>/dev/null || true
  git worktree remove --force "$work/src-after" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

build() { # commit name
  git worktree add -q --detach "$work/src-$2" "$1"
  CARGO_TARGET_DIR="$PWD/target/warm-ab" cargo build -q --release --example restore \
    --manifest-path "$work/src-$2/Cargo.toml" >&2
  cp "$PWD/target/warm-ab/release/examples/restore" "$work/restore-$2"
}
build "$BEFORE" before
build "$AFTER" after

mkdir -p "$work/mnt/tmpfs" "$work/mnt/ext4" "$work/mnt/xfs"
mount -t tmpfs -o size=2g tmpfs "$work/mnt/tmpfs"
truncate -s 3G "$work/mnt/tmpfs/ext4.img" "$work/mnt/tmpfs/xfs.img"
mkfs.ext4 -q -F "$work/mnt/tmpfs/ext4.img"
mkfs.xfs -q -f -m reflink=1 "$work/mnt/tmpfs/xfs.img"
mount -o loop "$work/mnt/tmpfs/ext4.img" "$work/mnt/ext4"
mount -o loop "$work/mnt/tmpfs/xfs.img" "$work/mnt/xfs"
mkdir -p "$work/mnt/tmpfs/scratch"

results="$work/results"
: >"$results"
for fs in tmpfs ext4 xfs; do
  dir="$work/mnt/$fs"
  [[ $fs == tmpfs ]] && dir="$work/mnt/tmpfs/scratch"
  for ((i = 0; i < RUNS; i++)); do
    for v in before after; do
      out=$(TMPDIR="$dir" unshare -m --propagation private "$work/restore-$v")
      bare=$(grep -o '[0-9.]*x the bare' <<<"$out" | cut -dx -f1)
      echo "$fs $v $(tail -1 <<<"$out") of_bare=$bare" | tee -a "$results" >&2
    done
  done
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
field() { grep -o "$1=[0-9.]*" | cut -d= -f2; }
echo "| scratch file system | warm p50 before → after (ms) | of bare before → after |"
echo "|---|---:|---:|"
for fs in tmpfs ext4 xfs; do
  row="| $fs"
  p50b=$(grep "^$fs before" "$results" | field warm_p50_ms | median)
  p50a=$(grep "^$fs after" "$results" | field warm_p50_ms | median)
  barb=$(grep "^$fs before" "$results" | field of_bare | median)
  bara=$(grep "^$fs after" "$results" | field of_bare | median)
  echo "$row | $p50b → $p50a | ${barb}× → ${bara}× |"
done
