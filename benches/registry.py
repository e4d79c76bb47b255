#!/usr/bin/env python3
"""Save, push and pull against `skopeo copy` of the same image between the same places.

  save   `moat sandbox save NAME REF -o a.tar` (the sandbox's changes become a layer on its
         image, written as an OCI archive) vs `skopeo copy oci:STORE:REF oci-archive:b.tar`
         (the same image, already in moat's store, to an OCI archive)
  push   `moat image push` vs `skopeo copy oci:STORE:REF docker://…`, each to a registry of its own
  pull   `moat image pull` into an empty store vs `skopeo copy docker://… oci:DIR`

Goal: within 1.2x of skopeo on each (ratios are moat / skopeo; lower is better).
The image is the `shell` template (the `openclaw` template arrives with its issue)
plus a layer with 32 MiB of new files and a deleted one. Registries are Debian's
`docker-registry` on loopback, started here.

Usage: benches/registry.py [--moat target/release/moat] [--runs N]
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--moat", default="target/release/moat")
ap.add_argument("--runs", type=int, default=5)
args = ap.parse_args()
MOAT = os.path.abspath(args.moat)
BASE = "/tmp/moat-bench-registry"
shutil.rmtree(BASE, ignore_errors=True)
os.makedirs(BASE)


def env_for(name):
    return dict(os.environ, MOAT_HOME=f"{BASE}/{name}/state", MOAT_RUNTIME_DIR=f"{BASE}/{name}/run")


MAIN = env_for("main")


def run(cmd, env=None):
    r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def timed(cmd, env=None):
    t = time.perf_counter()
    run(cmd, env)
    return time.perf_counter() - t


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


registries = []


def registry():
    port = free_port()
    d = tempfile.mkdtemp(dir=BASE, prefix="registry-")
    cfg = f"{d}/config.yml"
    with open(cfg, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {d}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    p = subprocess.Popen(["docker-registry", "serve", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    registries.append(p)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return f"localhost:{port}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("docker-registry did not start")


def stop_daemon(env):
    try:
        pid = int(open(f"{env['MOAT_RUNTIME_DIR']}/moat.lock").read().strip())
        os.kill(pid, 9)
    except (OSError, ValueError):
        pass


try:
    run([MOAT, "template", "build", "shell"], MAIN)
    ws = tempfile.mkdtemp(dir=BASE, prefix="ws-")
    run([MOAT, "sandbox", "create", "--name", "bench", "shell", ws], MAIN)
    run([MOAT, "sandbox", "exec", "-u", "root", "bench", "sh", "-c",
         "head -c 33554432 /dev/urandom > /opt/blob && rm /etc/issue"], MAIN)
    run([MOAT, "sandbox", "stop", "bench"], MAIN)
    run([MOAT, "sandbox", "save", "bench", "bench/saved:v1"], MAIN)
    store = f"{MAIN['MOAT_HOME']}/images"

    rows = {"save": ([], []), "push": ([], []), "pull": ([], [])}
    for i in range(args.runs):
        a, b = f"{BASE}/a-{i}.tar", f"{BASE}/b-{i}.tar"
        rows["save"][0].append(timed([MOAT, "sandbox", "save", "bench", f"bench/archived:{i}", "-o", a], MAIN))
        rows["save"][1].append(timed(["skopeo", "copy", "-q", "oci:" + store + ":bench/saved:v1", "oci-archive:" + b]))
        os.remove(a), os.remove(b)

        r1, r2 = registry(), registry()
        target = f"{r1}/bench/saved:v1"
        run([MOAT, "image", "tag", "bench/saved:v1", target], MAIN)
        rows["push"][0].append(timed([MOAT, "image", "push", target], MAIN))
        rows["push"][1].append(timed(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                                      "oci:" + store + ":bench/saved:v1", f"docker://{r2}/bench/saved:v1"]))
        run([MOAT, "image", "rm", target], MAIN)

        fresh = env_for(f"pull-{i}")
        run([MOAT, "version"], fresh)  # the daemon starts outside the timing
        rows["pull"][0].append(timed([MOAT, "image", "pull", target], fresh))
        rows["pull"][1].append(timed(["skopeo", "copy", "-q", "--src-tls-verify=false",
                                      f"docker://{r2}/bench/saved:v1", f"oci:{BASE}/pulled-{i}:v1"]))
        stop_daemon(fresh)
        for p in registries:
            p.kill()
        registries.clear()

    print(f"image: shell template + one saved layer, {args.runs} runs, medians")
    for op, (m, s) in rows.items():
        mm, ss = statistics.median(m), statistics.median(s)
        print(f"{op:5} moat {mm * 1000:7.0f} ms   skopeo {ss * 1000:7.0f} ms   ratio {mm / ss:.2f}x   (goal: within 1.2x)")
finally:
    run([MOAT, "sandbox", "rm", "bench"], MAIN) if os.path.exists(f"{MAIN['MOAT_RUNTIME_DIR']}/moat.sock") else None
    stop_daemon(MAIN)
    for p in registries:
        p.kill()
