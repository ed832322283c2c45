#!/usr/bin/env python3
"""Inputs, raw numbers and SVG plots for BENCHMARKS.md (Python 3 standard library only).

Driven by benches/plots/measure.sh, which runs the crate's binaries in between:

  plot.py gen-tars DIR SIZE_MB...       layer tars of SIZE_MB MB of file data each, plus
                                        DIR/tars.txt: size_mb entries bytes sha256 path
  plot.py gen-layout DIR LAYERS         an OCI image layout with LAYERS gzip layers, tag "bench"
  plot.py bench-extract DIR RUNS ROOTFSCTL
                                        time rootfsctl unpack / tar / bsdtar on those tars,
                                        interleaved -> DIR/extract-<size>.json
  plot.py collect-extract DIR           those JSON files -> benches/plots/extract.csv
  plot.py wait-quiet [SECONDS]          wait (at most SECONDS, default 90) until no other
                                        process is running; exit 1 on timeout
  plot.py collect-restore DIR           `restore` outputs in DIR -> benches/plots/warm_restore.csv
  plot.py collect-ensure DIR            hyperfine JSON in DIR  -> benches/plots/ensure_warm.csv
  plot.py [svg]                         the CSVs -> benches/plots/*.svg (no measuring)

Everything generated is deterministic (fixed seeds, fixed mtimes), so the same sizes give
the same tars and digests on every machine.
"""

import csv
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRACT_CSV = os.path.join(HERE, "extract.csv")
RESTORE_CSV = os.path.join(HERE, "warm_restore.csv")
ENSURE_CSV = os.path.join(HERE, "ensure_warm.csv")
MTIME = 1_700_000_000
MB = 1_000_000

# ---------------------------------------------------------------------------- inputs


def _pool(rng, n):
    """n bytes of half-random, half-text-like data to slice file contents from."""
    rand = rng.randbytes(n // 2)
    words = b" ".join(b"lib%d.so.%d" % (rng.randrange(1000), rng.randrange(10)) for _ in range(n // 20))
    return rand + words[: n - len(rand)]


def _info(name, kind=tarfile.REGTYPE, size=0, mode=0o644, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = kind, size, mode, MTIME
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.linkname = linkname
    return ti


def gen_tar(path, size_mb, seed):
    """A rootfs-like plain tar with size_mb MB of regular-file data: directories of ~25
    files whose sizes are log-uniform between 64 B and 256 KiB (mean ~31 KB, like the
    Debian minbase rootfs: 211 MB in 6,768 entries), a symlink per directory, one
    executable 2 MiB file per 25 MB. Returns (entries, sha256 hex)."""
    rng = random.Random(seed)
    pool = _pool(rng, 8 << 20)
    target = size_mb * MB
    written = entries = 0
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as t:
            d = 0
            while written < target:
                dname = f"usr/lib/pkg{d:05d}"
                t.addfile(_info(dname + "/", tarfile.DIRTYPE, mode=0o755))
                entries += 1
                nfiles = 1 if d % 40 == 39 else 25
                for i in range(nfiles):
                    if d % 40 == 39:
                        n = 2 << 20  # one big file every ~40 dirs
                    else:
                        n = int(math.exp(rng.uniform(math.log(64), math.log(256 << 10))))
                    n = min(n, target - written) or 1
                    off = rng.randrange(len(pool) - n) if n < len(pool) else 0
                    data = pool[off : off + n]
                    t.addfile(_info(f"{dname}/f{i}", size=len(data), mode=0o755 if n > (1 << 20) else 0o644), io.BytesIO(data))
                    written += len(data)
                    entries += 1
                    if written >= target:
                        break
                t.addfile(_info(f"{dname}/link", tarfile.SYMTYPE, mode=0o777, linkname="f0"))
                entries += 1
                d += 1
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return entries, h.hexdigest()


def cmd_gen_tars(out, sizes):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tars.txt"), "w") as idx:
        for s in sizes:
            s = int(s)
            path = os.path.join(out, f"layer-{s}MB.tar")
            entries, digest = gen_tar(path, s, seed=s)
            idx.write(f"{s} {entries} {os.path.getsize(path)} {digest} {path}\n")
            print(f"gen-tars: {path}: {entries} entries, {os.path.getsize(path)} bytes", file=sys.stderr)


def _layer(i, rng, pool):
    """Layer i (0 = bottom) as an uncompressed tar: 40 small files in a package dir of its
    own (~130 KB), a rewrite of /etc/os-release, and in the bottom layer /tmp (the
    restore example writes a file there)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in (["etc", "tmp", "usr", "usr/lib"] if i == 0 else ["etc", "usr", "usr/lib"]):
            t.addfile(_info(d + "/", tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755))
        rel = f"NAME=bench\nLAYER={i}\n".encode()
        t.addfile(_info("etc/os-release", size=len(rel)), io.BytesIO(rel))
        t.addfile(_info(f"usr/lib/pkg{i}/", tarfile.DIRTYPE, mode=0o755))
        for k in range(40):
            n = int(math.exp(rng.uniform(math.log(64), math.log(16 << 10))))
            off = rng.randrange(len(pool) - n)
            t.addfile(_info(f"usr/lib/pkg{i}/f{k}", size=n), io.BytesIO(pool[off : off + n]))
    return buf.getvalue()


def _blob(layout, data, media_type):
    hexd = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", hexd), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + hexd, "size": len(data)}


def cmd_gen_layout(layout, nlayers):
    """An OCI image layout (oci-layout, index.json tagged "bench", blobs/sha256/...) with
    nlayers gzip layers, as skopeo or umoci would write it."""
    nlayers = int(nlayers)
    rng = random.Random(1000 + nlayers)
    pool = _pool(rng, 1 << 20)
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers, diff_ids = [], []
    for i in range(nlayers):
        tar = _layer(i, rng, pool)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        gz = gzip.compress(tar, compresslevel=6, mtime=0)
        layers.append(_blob(layout, gz, "application/vnd.oci.image.layer.v1.tar+gzip"))
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config = _blob(layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers,
    }
    desc = _blob(layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    desc["annotations"] = {"org.opencontainers.image.ref.name": "bench"}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    print(desc["digest"])  # the manifest digest, for `ensure LAYOUT@sha256:...`


# ---------------------------------------------------------------------------- measure


def _running():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running "):
                return int(line.split()[1])
    return 1


def wait_quiet(max_s=90.0):
    """Wait until no other process is running on the machine (the mean of `procs_running`
    over 1 s, minus this process, below 0.3), at most max_s seconds. Other load skews
    these figures, the pipelined extraction most (it wants both cores). Returns whether
    it got quiet; on timeout it says so on stderr and measures anyway."""
    t0 = time.monotonic()
    while True:
        samples = []
        for _ in range(20):
            samples.append(_running())
            time.sleep(0.05)
        others = statistics.mean(samples) - 1
        if others < 0.3:
            return True
        if time.monotonic() - t0 > max_s:
            msg = f"wait-quiet: still {others:.1f} other runnable processes after {max_s:.0f} s, measuring anyway"
            print(msg, file=sys.stderr)
            if os.environ.get("PLOT_LOG"):  # measure.sh: into run.txt
                with open(os.environ["PLOT_LOG"], "a") as f:
                    f.write(time.strftime("%H:%M:%S ") + msg + "\n")
            return False
        time.sleep(2)


def cmd_bench_extract(d, runs, rootfsctl):
    """For every tar in d/tars.txt: `rootfsctl unpack --digest`, `tar -xpf` and
    `bsdtar -xpf` into d/out, interleaved: one warm-up round, then `runs` rounds that each
    run every command once, in an order rotated every round, so that load from elsewhere
    on the machine hits all three alike. Before every run (untimed) the destination is
    removed, re-created and `sync` is called. A run is timed around `subprocess.run`
    (spawn to exit). Writes d/extract-<size>.json in hyperfine's export format."""
    runs = int(runs)
    dest = os.path.join(d, "out")
    with open(os.path.join(d, "tars.txt")) as f:
        tars = [line.split() for line in f]
    for size, _entries, _nbytes, digest, tar in tars:
        wait_quiet()
        cmds = [[rootfsctl, "unpack", "--digest", "sha256:" + digest, tar, dest],
                ["tar", "-xpf", tar, "-C", dest],
                ["bsdtar", "-xpf", tar, "-C", dest]]
        times = [[] for _ in cmds]
        for r in range(runs + 1):
            for k in range(len(cmds)):
                j = (k + r) % len(cmds)
                shutil.rmtree(dest, ignore_errors=True)
                os.mkdir(dest)
                os.sync()
                t0 = time.perf_counter()
                subprocess.run(cmds[j], stdout=subprocess.DEVNULL, check=True)
                if r > 0:  # round 0 is the warm-up
                    times[j].append(time.perf_counter() - t0)
        shutil.rmtree(dest, ignore_errors=True)
        out = {"results": [{"command": " ".join(c), "times": t} for c, t in zip(cmds, times)]}
        with open(os.path.join(d, f"extract-{size}.json"), "w") as f:
            json.dump(out, f)
        meds = "  ".join(f"{c[0].rsplit('/', 1)[-1]} {statistics.median(t) * 1000:.1f} ms" for c, t in zip(cmds, times))
        print(f"extract {size} MB, median of {runs}: {meds}", file=sys.stderr)


# ---------------------------------------------------------------------------- collect


def _pct(v, q):
    """Nearest-rank percentile."""
    v = sorted(v)
    return v[max(1, min(len(v), math.ceil(len(v) * q))) - 1]


def cmd_collect_extract(d):
    """extract-<size>.json (hyperfine) -> extract.csv: one row per size and tool."""
    sizes = {}
    with open(os.path.join(d, "tars.txt")) as f:
        for line in f:
            s, entries, nbytes, _digest, _path = line.split()
            sizes[int(s)] = (int(entries), int(nbytes))
    rows = []
    for s in sorted(sizes):
        res = json.load(open(os.path.join(d, f"extract-{s}.json")))["results"]
        for r in res:
            c = r["command"]
            tool = "rootfs-cache" if " unpack " in c else "bsdtar" if c.startswith("bsdtar") else "gnu-tar"
            t = [x * 1000 for x in r["times"]]
            rows.append([s, *sizes[s], tool, len(t), f"{statistics.median(t):.1f}", f"{min(t):.1f}", f"{max(t):.1f}", c])
    with open(EXTRACT_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["size_mb", "entries", "tar_bytes", "tool", "runs", "median_ms", "min_ms", "max_ms", "command"])
        w.writerows(rows)
    print(f"wrote {EXTRACT_CSV}", file=sys.stderr)


def cmd_collect_restore(d):
    """restore-<layers>-<repeat>.txt (the restore example's output) -> warm_restore.csv."""
    rows = []
    for name in sorted(os.listdir(d)):
        m = re.fullmatch(r"restore-(\d+)-(\d+)\.txt", name)
        if not m:
            continue
        text = open(os.path.join(d, name)).read()

        def row(label, text=text, name=name):
            r = re.search(r"^" + re.escape(label) + r"[^\n]*?\s+([\d.]+)\s+([\d.]+)\s*$", text, re.M)
            if not r:
                sys.exit(f"collect-restore: no {label!r} line in {name}")
            return r.group(1), r.group(2)

        cold = re.search(r"cold_ms=([\d.]+)", text)
        if not cold:
            sys.exit(f"collect-restore: no summary line in {name} (did the run fail?)")
        p50, p99 = row("warm restore, total")
        b50, b99 = row("bare syscalls, same restore")
        phases = [row(f"warm: {p}")[0] for p in ("ensure (cache hit)", "create workspace", "mount", "write a file",
                                                  "unmount + destroy")]
        rows.append([int(m.group(1)), int(m.group(2)), p50, p99, b50, b99, *phases, cold.group(1)])
    rows.sort()
    with open(RESTORE_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["layers", "repeat", "warm_p50_ms", "warm_p99_ms", "bare_p50_ms", "bare_p99_ms",
                    "ensure_p50_ms", "create_p50_ms", "mount_p50_ms", "write_p50_ms", "destroy_p50_ms",
                    "cold_ms"])
        w.writerows(rows)
    print(f"wrote {RESTORE_CSV}", file=sys.stderr)


def cmd_collect_ensure(d):
    """ensure-<layers>.json (hyperfine) -> ensure_warm.csv."""
    rows = []
    for name in os.listdir(d):
        m = re.fullmatch(r"ensure-(\d+)\.json", name)
        if not m:
            continue
        (r,) = json.load(open(os.path.join(d, name)))["results"]
        t = [x * 1000 for x in r["times"]]
        rows.append([int(m.group(1)), len(t), f"{statistics.median(t):.3f}", f"{_pct(t, 0.99):.3f}",
                     f"{statistics.mean(t):.3f}", r["command"]])
    rows.sort()
    with open(ENSURE_CSV, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["layers", "runs", "p50_ms", "p99_ms", "mean_ms", "command"])
        w.writerows(rows)
    print(f"wrote {ENSURE_CSV}", file=sys.stderr)


# ---------------------------------------------------------------------------- SVG

W, H = 760, 460
L, R, T, B = 78, 24, 52, 62  # margins: left, right, top, bottom
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def _esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _nice_ticks(hi, n=6):
    """0, step, 2*step, ... covering hi, with step 1/2/2.5/5 x 10^k."""
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    top = step * math.ceil(hi / step - 1e-9)
    k = round(top / step)
    return [i * step for i in range(k + 1)]


def _fmt(v):
    return f"{v:g}" if v >= 1 or v == 0 else f"{v:.2g}"


def line_chart(path, title, xlabel, ylabel, series, xticks, logx=False, note="", footnote=""):
    """series: [(label, color, dasharray or None, [(x, y), ...])]."""
    pw, ph = W - L - R, H - T - B
    ys = [y for _, _, _, pts in series for _, y in pts]
    yt = _nice_ticks(max(ys) * 1.08)
    ymax = yt[-1]
    x0, x1 = min(xticks), max(xticks)
    if logx:
        fx = lambda x: L + pw * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    else:
        x0 = 0
        fx = lambda x: L + pw * (x - x0) / (x1 - x0)
    fy = lambda y: T + ph * (1 - y / ymax)
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" {FONT} font-size="13">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{_esc(title)}</text>']
    if note:
        o.append(f'<text x="{W / 2}" y="42" text-anchor="middle" font-size="11.5" fill="#555">{_esc(note)}</text>')
    for y in yt:  # horizontal grid + y tick labels
        o.append(f'<line x1="{L}" y1="{fy(y):.1f}" x2="{L + pw}" y2="{fy(y):.1f}" stroke="#e3e3e3"/>')
        o.append(f'<text x="{L - 8}" y="{fy(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    for x in xticks:  # vertical grid + x tick labels
        o.append(f'<line x1="{fx(x):.1f}" y1="{T}" x2="{fx(x):.1f}" y2="{T + ph}" stroke="#efefef"/>')
        o.append(f'<text x="{fx(x):.1f}" y="{T + ph + 18}" text-anchor="middle">{_fmt(x)}</text>')
    o.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    o.append(f'<text x="{L + pw / 2}" y="{H - 14}" text-anchor="middle">{_esc(xlabel)}</text>')
    o.append(f'<text transform="translate(20 {T + ph / 2}) rotate(-90)" text-anchor="middle">{_esc(ylabel)}</text>')
    for label, color, dash, pts in series:
        d = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in pts)
        da = f' stroke-dasharray="{dash}"' if dash else ""
        o.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2.2"{da}/>')
        for x, y in pts:
            o.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="3.6" fill="{color}"><title>{_esc(label)}: {_fmt(x)} -&gt; {y:g}</title></circle>')
    # Legend: the inside corner of the plot area that covers the fewest data points and
    # line samples (ties: top left).
    lw = 14 + 7.4 * max(len(s[0]) for s in series) + 34
    lh = 10 + 20 * len(series)
    samples = []
    for _, _, _, pts in series:
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            for i in range(21):
                u = i / 20
                samples.append((fx(xa) + u * (fx(xb) - fx(xa)), fy(ya) + u * (fy(yb) - fy(ya))))
        samples += [(fx(x), fy(y)) for x, y in pts]
    corners = [(L + 12, T + 12), (L + pw - 12 - lw, T + 12), (L + pw - 12 - lw, T + ph - 12 - lh), (L + 12, T + ph - 12 - lh)]
    hits = lambda c: sum(c[0] - 6 <= px <= c[0] + lw + 6 and c[1] - 6 <= py <= c[1] + lh + 6 for px, py in samples)
    lx, ly = min(corners, key=hits)
    o.append(f'<rect x="{lx}" y="{ly}" width="{lw:.0f}" height="{lh}" fill="white" fill-opacity="0.92" stroke="#999"/>')
    for i, (label, color, dash, _) in enumerate(series):
        yy = ly + 16 + 20 * i
        da = f' stroke-dasharray="{dash}"' if dash else ""
        o.append(f'<line x1="{lx + 8}" y1="{yy - 4}" x2="{lx + 34}" y2="{yy - 4}" stroke="{color}" stroke-width="2.2"{da}/>')
        o.append(f'<circle cx="{lx + 21}" cy="{yy - 4}" r="3.6" fill="{color}"/>')
        o.append(f'<text x="{lx + 42}" y="{yy}">{_esc(label)}</text>')
    if footnote:  # bottom right, inside the plot area
        o.append(f'<text x="{L + pw - 8}" y="{T + ph - 8}" text-anchor="end" font-size="11.5" fill="#555">{_esc(footnote)}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cmd_svg():
    if os.path.exists(EXTRACT_CSV):
        rows = _read(EXTRACT_CSV)
        names = {"rootfs-cache": ("rootfs-cache unpack (sha256 verified)", "#1f77b4", None),
                 "gnu-tar": ("GNU tar -xpf", "#d62728", "7 4"),
                 "bsdtar": ("bsdtar -xpf", "#7f7f7f", "2 3")}
        series = []
        for tool, (label, color, dash) in names.items():
            pts = sorted((int(r["size_mb"]), float(r["median_ms"])) for r in rows if r["tool"] == tool)
            if pts:
                series.append((label, color, dash, pts))
        sizes = sorted({int(r["size_mb"]) for r in rows})
        runs = max(int(r["runs"]) for r in rows)
        line_chart(os.path.join(HERE, "extract_vs_size.svg"),
                   "Cold extraction of one plain layer tar vs its size",
                   "file data in the layer (MB, ~32 entries per MB)", "wall time, median (ms)",
                   series, sizes,
                   note=f"destination and input on tmpfs, median of {runs} runs each; generated rootfs-like tars")
    if os.path.exists(RESTORE_CSV):
        rows = _read(RESTORE_CSV)
        by = {}
        for r in rows:
            by.setdefault(int(r["layers"]), []).append(r)
        med = lambda k: sorted((n, statistics.median(float(r[k]) for r in rs)) for n, rs in by.items())
        reps = max(len(v) for v in by.values())
        series = [("restore example (crate), p99", "#ff7f0e", "7 4", med("warm_p99_ms")),
                  ("restore example (crate), p50", "#1f77b4", None, med("warm_p50_ms")),
                  ("same restore, bare syscalls, p50", "#7f7f7f", "2 3", med("bare_p50_ms"))]
        xs = set(by)
        if os.path.exists(ENSURE_CSV):
            ens = _read(ENSURE_CSV)
            series.append(("rootfsctl ensure (cache hit, new process), p50", "#2ca02c", "9 3 2 3",
                           sorted((int(r["layers"]), float(r["p50_ms"])) for r in ens)))
            xs |= {int(r["layers"]) for r in ens}
        line_chart(os.path.join(HERE, "warm_restore_vs_layers.svg"),
                   "Warm restore latency vs number of layers",
                   "layers in the image (log scale)", "latency per restore (ms)",
                   series, sorted(xs), logx=True,
                   note=f"restore example: warm ensure + new workspace + mount + 1 file write + unmount/destroy; "
                        f"100 restores, median of {reps} runs",
                   footnote="" if max(by) >= max(xs) else
                   f"the restore example's bare mount(2) fails beyond ~35 layers: its curves stop at {max(by)}")


def main(argv):
    cmd = argv[1] if len(argv) > 1 else "svg"
    if cmd == "gen-tars":
        cmd_gen_tars(argv[2], argv[3:])
    elif cmd == "gen-layout":
        cmd_gen_layout(argv[2], argv[3])
    elif cmd == "wait-quiet":
        sys.exit(0 if wait_quiet(float(argv[2]) if len(argv) > 2 else 90.0) else 1)
    elif cmd == "bench-extract":
        cmd_bench_extract(argv[2], argv[3], argv[4])
    elif cmd == "collect-extract":
        cmd_collect_extract(argv[2])
    elif cmd == "collect-restore":
        cmd_collect_restore(argv[2])
    elif cmd == "collect-ensure":
        cmd_collect_ensure(argv[2])
    elif cmd == "svg":
        cmd_svg()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
