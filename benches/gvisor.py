#!/usr/bin/env python3
"""The gVisor tier against runsc run directly, in the same run (issue budgets):

  exec       `moat sandbox exec NAME true` (gvisor) vs `runsc exec ID true` on a running container   within 1.2x
  create     create + first command (gvisor) vs `runsc run` of `true` on the same root file system  within 1.2x
  file I/O   untar and delete a source tree in the workspace: inside each tier vs on the host       a ratio

The peer runs with the same runsc and platform, --ignore-cgroups and --network=none (moat runs
runsc with --network=host inside the sandbox's own network namespace, where runsc's control
socket, an abstract one, is reachable to its `runsc exec`; from the bench's namespace it would
not be), on a bundle of the same image (moat's shell template, unpacked from the cache). Usage: benches/gvisor.py [--moat target/release/moat] [--runs N]
[--io-runs N] [--roots DIR]. Uses its own state and runtime roots, and stops its daemon and
removes its containers at the end.
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--moat", default="target/release/moat")
ap.add_argument("--runs", type=int, default=50)
ap.add_argument("--io-runs", type=int, default=7)
ap.add_argument("--roots", default="/tmp/moat-bench-gvisor")
args = ap.parse_args()
MOAT = os.path.abspath(args.moat)
ROOTS = args.roots
ENV = dict(os.environ, MOAT_HOME=f"{ROOTS}/state", MOAT_RUNTIME_DIR=f"{ROOTS}/run")


def moat(*a, check=True):
    return subprocess.run([MOAT, *a], env=ENV, check=check, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def timed(cmd, env=None):
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def median_ms(xs):
    return statistics.median(xs) * 1000


def stop_daemon():
    try:
        os.kill(int(open(f"{ROOTS}/run/moat.lock").read().strip()), 9)
    except (OSError, ValueError):
        pass


moat("sandbox", "reset", "-f", check=False)
if "moat/shell:latest" not in moat("image", "ls", "-q").stdout.split():
    moat("template", "build", "shell")
ws = tempfile.mkdtemp(prefix="moat-bench-ws-")
os.chmod(ws, 0o777)
moat("sandbox", "create", "--isolation", "gvisor", "--name", "g", "shell", ws)
moat("sandbox", "create", "--name", "n", "shell", ws)
info = json.loads(moat("sandbox", "inspect", "g").stdout)[0]["isolation"]
runsc = info["runsc"].split(" (")[0]
platform = info["platform"]
print(f"runsc: {info['runsc']}, platform {platform}")

# --- the peer: runsc run directly on a bundle of the same image
peer = tempfile.mkdtemp(prefix="moat-bench-runsc-")
rootfs = os.path.join(peer, "rootfs")
os.mkdir(rootfs)
tarball = sorted(glob.glob(os.path.expanduser("~/.cache/moat/templates/shell-*.tar")))[-1]
subprocess.run(["tar", "xf", tarball, "-C", rootfs], check=True)
state = os.path.join(peer, "state")
os.mkdir(state)
runsc_cmd = [runsc, "--root", state, "--network=none", "--ignore-cgroups", f"--platform={platform}"]


def bundle(name, argv):
    d = os.path.join(peer, name)
    os.makedirs(d, exist_ok=True)
    subprocess.run([runsc, "spec", "--bundle", d], check=True)
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    c["root"] = {"path": rootfs, "readonly": False}
    c["process"]["terminal"] = False
    c["process"]["args"] = argv
    c["mounts"].append({"destination": ws, "type": "bind", "source": ws, "options": ["rbind", "rw"]})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f)
    return d


long_running = bundle("sleeper", ["sleep", "1000000"])
one_shot = bundle("oneshot", ["true"])
subprocess.run(runsc_cmd + ["run", "--detach", "--bundle", long_running, "sleeper"], check=True,
               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

try:
    # --- exec true, interleaved so that noise hits both alike
    moat_t, peer_t = [], []
    for _ in range(args.runs):
        moat_t.append(timed([MOAT, "sandbox", "exec", "g", "true"], ENV))
        peer_t.append(timed(runsc_cmd + ["exec", "sleeper", "true"]))
    m, p = median_ms(moat_t), median_ms(peer_t)
    print(f"exec true:    moat {m:.1f} ms   runsc exec {p:.1f} ms   ratio {m / p:.2f}x   (budget: within 1.2x)")

    # --- create + first command vs runsc run of `true`
    create_t, run_t = [], []
    for i in range(max(5, args.runs // 5)):
        t = time.perf_counter()
        moat("sandbox", "create", "--isolation", "gvisor", "--name", f"c{i}", "shell", ws)
        moat("sandbox", "exec", f"c{i}", "true")
        create_t.append(time.perf_counter() - t)
        moat("sandbox", "rm", f"c{i}")
        run_t.append(timed(runsc_cmd + ["run", "--bundle", one_shot, f"o{i}"]))
        subprocess.run(runsc_cmd + ["delete", "--force", f"o{i}"], stderr=subprocess.DEVNULL)
    m, p = median_ms(create_t), median_ms(run_t)
    print(f"create+exec:  moat {m:.0f} ms   runsc run {p:.0f} ms   ratio {m / p:.2f}x   (budget: within 1.2x)")

    # --- workspace file I/O: untar and remove a source tree, in each tier and on the host
    src = "/usr/lib/python3" if os.path.isdir("/usr/lib/python3") else "/usr/share"
    tree = os.path.join(ws, "tree.tar")
    subprocess.run(["tar", "cf", tree, "-C", os.path.dirname(src), os.path.basename(src)], check=True)
    os.chmod(tree, 0o644)
    script = f"mkdir -p {ws}/x && tar xf {tree} --no-same-owner -C {ws}/x && rm -rf {ws}/x"
    host_t, ns_t, gv_t = [], [], []
    for i in range(args.io_runs):
        for times, cmd, env in [(host_t, ["sh", "-c", script], None),
                                (ns_t, [MOAT, "sandbox", "exec", "n", "sh", "-c", script], ENV),
                                (gv_t, [MOAT, "sandbox", "exec", "g", "sh", "-c", script], ENV)]:
            times.append(timed(cmd, env))
    h = median_ms(host_t)
    size = os.path.getsize(tree) / 1e6
    print(f"file I/O:     untar+rm {size:.0f} MB tree: host {h:.0f} ms, namespaces {median_ms(ns_t):.0f} ms "
          f"({median_ms(ns_t) / h:.2f}x), gvisor {median_ms(gv_t):.0f} ms ({median_ms(gv_t) / h:.2f}x)")
finally:
    subprocess.run(runsc_cmd + ["kill", "--all", "sleeper", "KILL"], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    subprocess.run(runsc_cmd + ["delete", "--force", "sleeper"], stderr=subprocess.DEVNULL)
    moat("sandbox", "reset", "-f", check=False)
    stop_daemon()
    shutil.rmtree(ws, ignore_errors=True)
    shutil.rmtree(peer, ignore_errors=True)
