#!/usr/bin/env bash
# Measures the two plots in BENCHMARKS.md with the crate's own binaries, writes the raw
# numbers to benches/plots/*.csv and draws benches/plots/*.svg from them (plot.py).
#
#   sudo benches/plots/measure.sh        # root, hyperfine, bsdtar, GNU tar, unshare; 2-5 min
#   python3 benches/plots/plot.py        # redraw the SVGs from the CSVs, no measuring
#
# Knobs (environment): SIZES, LAYERS, ENSURE_LAYERS, RUNS, REPEATS (defaults below).
# Before each extraction size, restore run and ensure series it waits (up to 90 / 30 /
# 30 s) until no other process is running: other load skews these figures, the
# pipelined extraction most (it wants both cores of this 2-vCPU machine). run.txt gets
# the machine, the load average before and after, and any wait that timed out.
#
# 1. Cold extraction vs layer size: generated rootfs-like plain tars of $SIZES MB of file
#    data, `rootfsctl unpack --digest sha256:…` (digest verified) against `tar -xpf` and
#    `bsdtar -xpf`, $RUNS rounds per size that run the three interleaved (plot.py
#    bench-extract), input and destination on tmpfs, the destination emptied before every
#    run (untimed).                                               -> extract.csv
# 2. Warm restore vs layer count: generated OCI layouts of $LAYERS gzip layers; the
#    `restore` example (ensure by digest, new Workspace, overlay mount, one file written,
#    unmount + destroy; 100 restores, each followed by the same restore with the bare
#    system calls) run $REPEATS times per layer count in a private mount namespace, cache
#    and sandboxes on tmpfs.                                      -> warm_restore.csv
#    The example's bare comparison passes all lowers to mount(2) in one option string,
#    which the kernel cuts at 4 KiB: beyond ~35 layers at these paths it fails (ENOENT)
#    and the example panics, so $LAYERS stops at 30.
# 3. Warm `rootfsctl --cache C ensure LAYOUT@sha256:…` (a whole process: start, open the
#    cache, cache hit, print the lowers) vs layer count, $ENSURE_LAYERS, hyperfine.
#                                                                 -> ensure_warm.csv
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES="${SIZES:-10 25 50 100 200}"
LAYERS="${LAYERS:-1 2 5 10 20 30}"
ENSURE_LAYERS="${ENSURE_LAYERS:-1 2 5 10 20 30 50}"
RUNS="${RUNS:-15}"
REPEATS="${REPEATS:-5}"
plots=benches/plots

[[ $(id -u) == 0 ]] || { echo "measure.sh: needs root (tar -p, overlay mounts)" >&2; exit 2; }
for t in hyperfine bsdtar tar unshare python3; do
  command -v "$t" >/dev/null || { echo "measure.sh: $t not found" >&2; exit 2; }
done

cargo build --release --example rootfsctl --example restore >&2
bin="$PWD/target/release/examples/rootfsctl"
restore="$PWD/target/release/examples/restore"

scratch=$(mktemp -d /dev/shm/rfc-plots.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
# The machine and its load: other processes skew these figures (pipelined extraction
# wants both cores), so run.txt records the load average before and after.
{
  echo "date: $(date -u +%FT%TZ)"
  echo "kernel: $(uname -sr)"
  echo "cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
  echo "rustc: $(rustc --version)"
  echo "tools: $(tar --version | head -1); $(bsdtar --version); $(hyperfine --version)"
  echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >$plots/run.txt
export PLOT_LOG="$PWD/$plots/run.txt" # wait-quiet timeouts are logged there

# 1. Cold extraction vs size.
x="$scratch/x"
python3 $plots/plot.py gen-tars "$x" $SIZES
python3 $plots/plot.py bench-extract "$x" "$RUNS" "$bin"
python3 $plots/plot.py collect-extract "$x"

# 2. Warm restore (the restore example) vs layer count; the repeats interleave the counts.
r="$scratch/r"
mkdir -p "$r"
for n in $LAYERS; do python3 $plots/plot.py gen-layout "$r/oci$n" "$n" >/dev/null; done
for rep in $(seq 1 "$REPEATS"); do
  for n in $LAYERS; do
    echo "== restore: $n layers, run $rep/$REPEATS" >&2
    python3 $plots/plot.py wait-quiet 30 || true
    mkdir "$r/t"
    TMPDIR="$r/t" unshare -m --propagation private "$restore" "$r/oci$n:bench" >"$r/restore-$n-$rep.txt"
    tail -1 "$r/restore-$n-$rep.txt" >&2
    rm -rf "$r/t"
  done
done
python3 $plots/plot.py collect-restore "$r"

# 3. Warm rootfsctl ensure (by manifest digest) vs layer count.
e="$scratch/e"
mkdir -p "$e"
for n in $ENSURE_LAYERS; do
  echo "== ensure: $n layers" >&2
  m=$(python3 $plots/plot.py gen-layout "$e/oci$n" "$n")
  "$bin" --cache "$e/c$n" ensure "$e/oci$n:bench" >/dev/null # cold, once
  python3 $plots/plot.py wait-quiet 30 || true
  hyperfine -N -w 5 -r 200 --export-json "$e/ensure-$n.json" \
    "$bin --cache $e/c$n ensure $e/oci$n@$m" >&2
done
python3 $plots/plot.py collect-ensure "$e"

echo "loadavg after: $(cut -d' ' -f1-3 /proc/loadavg)" >>$plots/run.txt
python3 $plots/plot.py svg
