#!/usr/bin/env python3
"""Agent benchmarks (issue 5's figures), each measured in this run:

  build      `moat template build node` and `… openclaw` from a cold layer cache
             (the `shell` tarball is reused; mmdebstrap is not what is measured)
  startup    `moat sandbox run` of a stopped openclaw sandbox to OpenClaw's terminal UI
             showing the model and "connected" (its gateway up), through tmux
  turn       one `openclaw agent --local` turn on SmolLM2, inside the sandbox and with
             the same OpenClaw, configuration and model runner on the host, interleaved:
             the ratio is the sandbox's whole overhead on an agent turn

Usage: benches/agents.py [--moat target/release/moat] [--runs N]
after `cargo build --release` and `scripts/models.sh`. Uses its own state and
runtime roots under /tmp/moat-bench-agents and the model runner on 127.0.0.1:12434
(which must be free). OpenClaw for the host is installed once, from npm, under
~/.cache/moat/bench/openclaw (the same pinned version as the template).
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
ap.add_argument("--moat", default=os.path.join(ROOT, "target/release/moat"))
ap.add_argument("--runs", type=int, default=5)
args = ap.parse_args()
MOAT = os.path.abspath(args.moat)
MODEL = "ai/smollm2:135M-Q4_1"
OPENCLAW = "2026.9.6"
NPM = ("12.2.3", "sha512-ovmNRRe76Jvcp1E6iOePQ6H9Zr4XMOrqgfaeGNhtRvP3XSl2Lo/a9C1N5/jRlLLrsqCem/omgGdZHpZ5a6yn1Q==")
BASE = "/tmp/moat-bench-agents"
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moat")
ENV = dict(os.environ, MOAT_HOME=f"{BASE}/state", MOAT_RUNTIME_DIR=f"{BASE}/run",
           MOAT_CACHE_DIR=f"{BASE}/cache")


def moat(*a, check=True):
    p = subprocess.run([MOAT, *a], env=ENV, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        sys.exit(f"moat {' '.join(a)} failed:\n{p.stderr}")
    return p.stdout


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def host_openclaw():
    """OpenClaw on the host: node from scripts/node.sh, npm and openclaw from the registry."""
    node = subprocess.run([os.path.join(ROOT, "scripts/node.sh")], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.strip()
    prefix = os.path.join(CACHE, "bench/openclaw", OPENCLAW)
    entry = os.path.join(prefix, "lib/node_modules/openclaw/openclaw.mjs")
    if not os.path.exists(entry):
        npm_dir = os.path.join(CACHE, "bench/npm", NPM[0])
        if not os.path.exists(os.path.join(npm_dir, "bin/npm-cli.js")):
            data = urllib.request.urlopen(f"https://registry.npmjs.org/npm/-/npm-{NPM[0]}.tgz").read()
            got = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
            if got != NPM[1]:
                sys.exit(f"npm {NPM[0]}: sha512 {got}, not {NPM[1]}")
            tmp = tempfile.mkdtemp()
            path = os.path.join(tmp, "npm.tgz")
            open(path, "wb").write(data)
            with tarfile.open(path) as t:
                t.extractall(tmp, filter="data")
            os.makedirs(os.path.dirname(npm_dir), exist_ok=True)
            shutil.move(os.path.join(tmp, "package"), npm_dir)
        print(f"installing openclaw {OPENCLAW} for the host under {prefix}", file=sys.stderr)
        subprocess.run([node, os.path.join(npm_dir, "bin/npm-cli.js"), "install", "-g", "--prefix", prefix,
                        "--no-fund", "--no-audit", f"openclaw@{OPENCLAW}"], check=True,
                       stdout=subprocess.DEVNULL)
    return node, entry


def main():
    subprocess.run([MOAT, "sandbox", "reset", "-f"], env=ENV, capture_output=True)
    try:
        os.kill(int(open(f"{BASE}/run/moat.lock").read().strip()), 9)
        time.sleep(0.5)
    except (OSError, ValueError):
        pass
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(f"{BASE}/cache/templates")
    for f in os.listdir(os.path.join(CACHE, "templates")):
        if f.startswith("shell-") and f.endswith(".tar"):
            shutil.copy(os.path.join(CACHE, "templates", f), f"{BASE}/cache/templates/")
    gguf = subprocess.run([os.path.join(ROOT, "scripts/models.sh")], check=True,
                          stdout=subprocess.PIPE, text=True).stdout.split()[0]
    moat("model", "package", "--gguf", gguf, MODEL)
    moat("model", "configure", "--context-size", "8192", MODEL)
    moat("template", "build", "shell")

    print("template build, cold layer cache (s):")
    for name in ["node", "openclaw"]:
        print(f"  {name:9} {timed(lambda: moat('template', 'build', name)):6.1f}")

    ws = tempfile.mkdtemp(prefix="moat-bench-ws-")
    moat("sandbox", "create", "--name", "oc", "openclaw", ws)
    moat("sandbox", "exec", "oc", "start-openclaw", MODEL, "--configure-only")

    # Startup: a stopped sandbox, `moat sandbox run` to the TUI on the model.
    starts = []
    for i in range(min(args.runs, 3)):
        moat("sandbox", "stop", "oc")
        session = f"moat-bench-{os.getpid()}-{i}"
        cmd = (f"env MOAT_HOME={ENV['MOAT_HOME']} MOAT_RUNTIME_DIR={ENV['MOAT_RUNTIME_DIR']} "
               f"{MOAT} sandbox run oc -- -c 'start-openclaw {MODEL}'; sleep 60")
        t = time.perf_counter()
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "40", cmd], check=True)
        while True:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    stdout=subprocess.PIPE, text=True).stdout
            if MODEL in screen and "connected" in screen:
                starts.append(time.perf_counter() - t)
                break
            if time.perf_counter() - t > 120:
                sys.exit(f"OpenClaw's TUI never came up:\n{screen}")
            time.sleep(0.05)
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    # The last run's OpenClaw gateway would hold the state directory.
    moat("sandbox", "stop", "oc")
    moat("sandbox", "run", "oc", "--", "-c", "true")
    print(f"moat sandbox run to OpenClaw's TUI: median {statistics.median(starts):.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in starts)})")

    # Turns: the same OpenClaw, configuration and model, in the sandbox and on the host.
    node, entry = host_openclaw()
    home = tempfile.mkdtemp(prefix="moat-bench-home-")
    os.makedirs(f"{home}/.openclaw")
    config = moat("sandbox", "exec", "oc", "cat", "/home/agent/.openclaw/openclaw.json")
    open(f"{home}/.openclaw/openclaw.json", "w").write(config)
    host_env = dict(os.environ, HOME=home, FS_SAFE_NATIVE_MODE="off")
    for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]:
        host_env.pop(k, None)

    def inside(i):
        out = moat("sandbox", "exec", "oc", "openclaw", "agent", "--local", "--session-id", f"s{i}",
                   "--message", "Say hello in one short sentence.", "--json")
        assert json.loads(out)["payloads"][0]["text"].strip(), out

    def on_host(i):
        out = subprocess.run([node, entry, "agent", "--local", "--session-id", f"h{i}", "--message",
                              "Say hello in one short sentence.", "--json"], env=host_env, check=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
        assert json.loads(out)["payloads"][0]["text"].strip(), out

    inside(-1)
    on_host(-1)
    ins, host = [], []
    for i in range(args.runs):
        ins.append(timed(lambda: inside(i)))
        host.append(timed(lambda: on_host(i)))
    mi, mh = statistics.median(ins), statistics.median(host)
    print(f"one OpenClaw turn on {MODEL}: sandbox median {mi:.2f} s, host median {mh:.2f} s, "
          f"ratio {mi / mh:.3f}x")
    print(f"  sandbox runs: {', '.join(f'{x:.2f}' for x in ins)}")
    print(f"  host runs:    {', '.join(f'{x:.2f}' for x in host)}")
    moat("sandbox", "rm", "oc")
    subprocess.run([MOAT, "sandbox", "reset", "-f"], env=ENV, capture_output=True)


main()
