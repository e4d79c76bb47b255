#!/usr/bin/env python3
"""Sandbox benchmarks, each against its peer in the same run (DESIGN.md budgets).

  exec       `moat sandbox exec NAME true` vs `bwrap --unshare-all --ro-bind / / true`   budget: within 2x
  create     `moat sandbox create` + first command, image local                     budget: < 100 ms median
  memory     host memory per idle running sandbox (daemon side + init)              budget: < 5 MiB
  file I/O   untar and delete a source tree in the workspace, inside vs on the host budget: within 5 %

Usage: benches/sandbox.py [--moat target/release/moat] [--runs N] [--io-runs N] [--roots DIR]
                          [--baseline PATH] [--skip memory,io]
--baseline PATH also measures another build of moat (a copy from before a change), interleaved with
this one in the same loops, on roots of its own (DIR-base), and prints its figures beside.
Uses its own state and runtime roots under --roots (/tmp/moat-bench; give two
builds different ones), and stops its daemon at the end; the template comes
from the cache (~/.cache/moat), built on first use.
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--moat", default="target/release/moat")
ap.add_argument("--runs", type=int, default=200)
ap.add_argument("--io-runs", type=int, default=21)
ap.add_argument("--roots", default="/tmp/moat-bench")
ap.add_argument("--skip", default="", help="comma-separated parts to leave out: memory,io")
ap.add_argument("--baseline", default=None, help="another moat binary, measured in the same loops")
args = ap.parse_args()
MOAT = os.path.abspath(args.moat)
ROOTS = args.roots
ENV = dict(os.environ, MOAT_HOME=f"{ROOTS}/state", MOAT_RUNTIME_DIR=f"{ROOTS}/run")
SKIP = set(filter(None, args.skip.split(",")))
BASE = os.path.abspath(args.baseline) if args.baseline else None
BASE_ENV = dict(os.environ, MOAT_HOME=f"{ROOTS}-base/state", MOAT_RUNTIME_DIR=f"{ROOTS}-base/run")


def base(*a, check=True):
    return subprocess.run([BASE, *a], env=BASE_ENV, check=check, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_daemon():
    """The daemons this bench started, by the pids in their lock files."""
    for roots in (ROOTS, f"{ROOTS}-base"):
        try:
            os.kill(int(open(f"{roots}/run/moat.lock").read().strip()), 9)
        except (OSError, ValueError):
            pass


def moat(*a, check=True):
    return subprocess.run([MOAT, *a], env=ENV, check=check, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def timed(cmd, env=None):
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def median_ms(xs):
    return statistics.median(xs) * 1000


moat("sandbox", "reset", "-f", check=False)
moat("template", "build", "shell") if "moat/shell:latest" not in moat("image", "ls", "-q").stdout.split() else None
ws = tempfile.mkdtemp(prefix="moat-bench-ws-")
moat("sandbox", "create", "--name", "bench", "shell", ws)
if BASE:
    base("sandbox", "reset", "-f", check=False)
    base("template", "build", "shell") if "moat/shell:latest" not in base("image", "ls", "-q").stdout.split() else None
    base("sandbox", "create", "--name", "bench", "shell", ws)

# --- exec vs bwrap, interleaved so that noise hits both alike
moat_t, bwrap_t, base_t = [], [], []
for _ in range(args.runs):
    moat_t.append(timed([MOAT, "sandbox", "exec", "bench", "true"], ENV))
    bwrap_t.append(timed(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"]))
    if BASE:
        base_t.append(timed([BASE, "sandbox", "exec", "bench", "true"], BASE_ENV))
m, b = median_ms(moat_t), median_ms(bwrap_t)
print(f"exec true:   moat {m:.2f} ms   bwrap {b:.2f} ms   ratio {m / b:.2f}x   (budget: within 2x)")
if BASE:
    bb = median_ms(base_t)
    print(f"             baseline {bb:.2f} ms   ratio {bb / b:.2f}x;   moat / baseline {m / bb:.3f}")

# --- create + first command
create_t, base_create_t = [], []
for i in range(20):
    for times, run in [(create_t, moat)] + ([(base_create_t, base)] if BASE else []):
        name = f"c{i}"
        t = time.perf_counter()
        run("sandbox", "create", "--name", name, "shell", ws)
        run("sandbox", "exec", name, "true")
        times.append(time.perf_counter() - t)
        run("sandbox", "rm", name)
print(f"create+exec: median {median_ms(create_t):.1f} ms  (p90 {sorted(create_t)[17] * 1000:.1f} ms; budget: < 100 ms)")
if BASE:
    print(f"             baseline median {median_ms(base_create_t):.1f} ms;   moat / baseline {median_ms(create_t) / median_ms(base_create_t):.3f}")
if BASE:
    base("sandbox", "reset", "-f", check=False)


# --- memory per idle sandbox
def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


daemon = int(open(f"{ROOTS}/run/moat.lock").read().strip())
N = 0 if "memory" in SKIP else 10
before = rss_kib(daemon)
for i in range(N):
    moat("sandbox", "create", "--name", f"m{i}", "shell", ws)
time.sleep(1)
after = rss_kib(daemon)
import json
pids = [json.loads(moat("sandbox", "inspect", f"m{i}").stdout)[0]["pid"] for i in range(N)]
init_pss = statistics.mean(pss_kib(p) for p in pids) if pids else 0
init_rss = statistics.mean(rss_kib(p) for p in pids) if pids else 0
per = (after - before) / N + init_pss if N else 0
if N: print(f"memory:      {per / 1024:.2f} MiB per idle sandbox (daemon +{(after - before) / N:.0f} KiB, init PSS {init_pss:.0f} KiB, init RSS {init_rss:.0f} KiB; budget: < 5 MiB)")
for i in range(N):
    moat("sandbox", "rm", f"m{i}")

# --- file I/O: untar and delete a source tree, inside vs on the host
src = "/usr/lib/python3" if os.path.isdir("/usr/lib/python3") else "/usr/share"
tarball = os.path.join(ws, "tree.tar")
subprocess.run(["tar", "cf", tarball, "-C", os.path.dirname(src), os.path.basename(src)], check=True)
script = f"mkdir -p {ws}/x && tar xf {tarball} --no-same-owner -C {ws}/x && rm -rf {ws}/x"
# tar does the same work on both sides (as root on the host it would also
# chown every file). The same probe on both sides reports wall time and the CPU time the work took
# (user + system of its processes), which the machine's noise disturbs less.
probe = ("import resource,subprocess,sys,time;t=time.perf_counter();"
         "subprocess.run(['sh','-c',sys.argv[1]],check=True);w=time.perf_counter()-t;"
         "r=resource.getrusage(resource.RUSAGE_CHILDREN);print(w,r.ru_utime+r.ru_stime)")
with open(os.path.join(ws, "probe.py"), "w") as f:
    f.write(probe)


def measured(cmd, env=None):
    out = subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True).stdout
    wall, cpu = out.split()
    return float(wall), float(cpu)


host_t, in_t = [], []
# Interleaved, alternating which goes first: this machine's disk and CPUs are shared and noisy.
for i in range(0 if "io" in SKIP else args.io_runs):
    pair = [(host_t, ["python3", f"{ws}/probe.py", script], None),
            (in_t, [MOAT, "sandbox", "exec", "bench", "python3", f"{ws}/probe.py", script], ENV)]
    for times, cmd, env in (pair if i % 2 == 0 else pair[::-1]):
        times.append(measured(cmd, env))
if host_t:
  hw, iw = median_ms([w for w, _ in host_t]), median_ms([w for w, _ in in_t])
  hc, ic = median_ms([c for _, c in host_t]), median_ms([c for _, c in in_t])
  size = os.path.getsize(tarball) / 1e6
  print(f"file I/O:    untar+rm {size:.0f} MB tree: wall inside {iw:.0f} ms / host {hw:.0f} ms = {iw / hw:.3f};"
      f"  cpu inside {ic:.0f} ms / host {hc:.0f} ms = {ic / hc:.3f}  (budget: within 5 %)")

moat("sandbox", "reset", "-f")
stop_daemon()
shutil.rmtree(ws, ignore_errors=True)
