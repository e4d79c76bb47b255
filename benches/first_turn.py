#!/usr/bin/env python3
"""An agent's first turn, moat's model runner against llama.cpp's own llama-server, same model file,
same threads, same run, for SmolLM2-135M (Q4_1) and Gemma-3-270M (Q4_K_M).

The request is OpenClaw's real first turn (benches/data/openclaw-first-turn.json: OpenClaw 2026.9.6,
configured as start-openclaw configures it, captured once; its long fixed system prompt and its tool
schemas), replayed to /chat/completions with the server's model name, stream: true, temperature 0,
max_tokens 8. Time to first token (TTFT) is measured by this script: from sending the request to the
first streamed piece of an answer (content, reasoning or a tool call; the finishing chunk if none
comes). Each server's own `timings` (prompt_n, cache_n, prompt_ms) are read from its last chunk.

  cold          a fresh server (moat: a fresh daemon with empty state, so no prompt cache on disk;
                the model loaded with `moat model run -d` first; peer: a fresh llama-server, ready)
  after reload  moat: `moat model unload` (its worker saves its prompt cache to disk), then
                `moat model run -d` (the load is not timed), then the request; peer: llama-server
                restarted (it keeps nothing across restarts, so it reads the prompt again).
                Goal moat/peer <= 0.2x; moat's cache_n shows how much of the prompt came from disk
  warm          the same request once more, the model loaded on both: goal <= 1.0x
  RSS           the server's resident memory after load (moat: its model worker) at the same total
                context: moat `configure --context-size 8192` (4 slots sharing one pool), peer
                `llama-server -c 8192 -np 4 --kv-unified`: goal <= 1.1x
  cold also has the general budget of the model runner (DESIGN.md: at least 1.0x): goal <= 1.0x

Both servers run with those settings for every figure. Each run does one server's whole sequence
(cold, reload, warm) and then the other's, which goes first alternating run by run; only one server is
ever busy. The median of --runs is reported. Before the runs, the request is tried on a throwaway
llama-server with its tools and without: if the peer refuses the tool schemas, `tools` is dropped for
both servers, and the output says so; if its prompt is as long either way, its chat template left them
out (SmolLM2's has no tools; the Gemma GGUF, google/gemma-3-270m, the base model, has no template at
all and each server uses its own fallback), and the output says that too: the prompt token counts of
both servers are printed, and --drop-tools sends both the request without them. The load average is
printed: on a busy machine no figure means much.

Usage: benches/first_turn.py [--moat target/release/moat] [--llama-server PATH]
                             [--models smollm2,gemma3] [--runs 3] [--drop-tools]
(moat: a release build, `cargo build --release -p moat-cli`.) Fetches the models with scripts/models.sh
and builds the peer with scripts/llama-server.sh (once, cached), as benches/models.py does, whose
helpers this script uses. Each moat daemon runs with its own state under a temporary directory and its
model runner on --moat-port (MOAT_MODEL_PORT), so a daemon already on 12434 is left alone.
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import argparse
import copy
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "benches/data/openclaw-first-turn.json")


def load_models_bench():
    """benches/models.py as a module, for its helpers (servers, worker lookup, RSS): its code up to,
    not including, its final `main()` call, with its own command line left at its defaults."""
    path = os.path.join(ROOT, "benches/models.py")
    with open(path) as f:
        src = f.read()
    body, n = re.subn(r"\nmain\(\)\s*$", "\n", src)
    if n != 1:
        sys.exit(f"{path} no longer ends with its `main()` call; update load_models_bench()")
    mod = types.ModuleType("models_bench")
    mod.__file__ = path
    argv = sys.argv
    sys.argv = [path]
    try:
        exec(compile(body, path, "exec"), mod.__dict__)
    finally:
        sys.argv = argv
    return mod


M = load_models_bench()
MODELS, Unmeasured, ServerDied, Server = M.MODELS, M.Unmeasured, M.ServerDied, M.Server

CONTEXT = 8192  # total, both servers: OpenClaw's window as start-openclaw configures it
SLOTS = 4
GOALS = [
    # key, label, unit, goal for moat/peer (lower is better in each)
    ("cold", "TTFT cold", "ms", 1.0),
    ("reload", "TTFT after reload", "ms", 0.2),
    ("warm", "TTFT warm", "ms", 1.0),
    ("rss", "RSS after load", "MiB", 1.1),
]

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--models", default="smollm2,gemma3", help="comma-separated: " + ",".join(MODELS))
ap.add_argument("--runs", type=int, default=3, help="repetitions per figure (the median is reported)")
ap.add_argument("--threads", type=int, default=M.physical_cores(), help="llama-server -t (default: physical cores)")
ap.add_argument("--llama-server", help="llama-server binary (default: the one scripts/llama-server.sh builds)")
ap.add_argument("--peer-port", type=int, default=18434)
ap.add_argument("--moat", default=os.path.join(ROOT, "target/release/moat"))
ap.add_argument("--moat-port", type=int, default=18435, help="the model runner port of the daemons this script "
                                                              "starts (MOAT_MODEL_PORT)")
ap.add_argument("--drop-tools", action="store_true",
                help="send the request without its tool schemas to both servers (a peer whose chat template "
                     "has no tools leaves them out of its prompt)")
ap.add_argument("--timeout", type=float, default=300, help="seconds any one request may take")
args = ap.parse_args()
args.moat = os.path.abspath(args.moat)
keys = [k.strip() for k in args.models.split(",") if k.strip()]
for k in keys:
    if k not in MODELS:
        sys.exit(f"unknown model {k!r}; known: {', '.join(MODELS)}")
if args.runs < 1:
    sys.exit("--runs must be at least 1")


# ---------------------------------------------------------------- the request


def replay_body(model, drop_tools):
    with open(FIXTURE) as f:
        body = copy.deepcopy(json.load(f)["body"])
    body.pop("max_completion_tokens", None)  # it would win over max_tokens on llama-server
    body.update(model=model, stream=True, temperature=0, max_tokens=8)
    body.setdefault("stream_options", {"include_usage": True})
    if drop_tools:
        body.pop("tools", None)
        body.pop("tool_choice", None)
    return body


def replay(srv, body):
    """Sends the replayed first turn; returns TTFT (ms), what came first, the text, the server's
    timings and usage. A refusal raises Unmeasured with the server's answer."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=args.timeout)
    data = json.dumps(body).encode()
    try:
        t0 = time.perf_counter()
        conn.request("POST", srv.prefix + "/chat/completions", data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise Unmeasured(f"{srv.label}: /chat/completions answered {resp.status}: "
                             f"{resp.read(600).decode(errors='replace')}")
        out = {"first": None, "first_kind": None, "end": None, "text": "", "tool_calls": 0,
               "timings": None, "usage": None, "finish": None}
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            now = time.perf_counter()
            ev = json.loads(payload)
            if "error" in ev:
                raise Unmeasured(f"{srv.label}: streamed an error: {ev['error']}")
            for c in ev.get("choices") or []:
                d = c.get("delta") or {}
                for kind in ("content", "reasoning_content", "tool_calls"):
                    if d.get(kind):
                        if out["first"] is None:
                            out["first"], out["first_kind"] = now, kind
                        if kind == "content":
                            out["text"] += d[kind]
                        elif kind == "tool_calls":
                            out["tool_calls"] += 1
                if c.get("finish_reason"):
                    out["finish"], out["end"] = c["finish_reason"], now
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            if ev.get("timings"):
                out["timings"] = ev["timings"]
        if out["first"] is None:
            if out["end"] is None:
                raise Unmeasured(f"{srv.label}: the stream ended with neither a token nor a finish")
            out["first"], out["first_kind"] = out["end"], "finish"
        out["ttft"] = (out["first"] - t0) * 1000
        return out
    except Unmeasured:
        srv.check_alive()
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        srv.check_alive()
        raise Unmeasured(f"{srv.label}: /chat/completions failed: {e!r}")
    finally:
        conn.close()


def prompt_tokens(r):
    """(tokens of the prompt in all, of them from a cache) as the server reports them."""
    t, u = r["timings"] or {}, r["usage"] or {}
    cached = t.get("cache_n")
    if cached is None:
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    total = u.get("prompt_tokens")
    if total is None and "prompt_n" in t:
        total = t["prompt_n"] + (t.get("cache_n") or 0)
    return total, cached


def describe(r):
    total, cached = prompt_tokens(r)
    t = r["timings"] or {}
    ms = f", prompt_ms {t['prompt_ms']:.0f}" if isinstance(t.get("prompt_ms"), (int, float)) else ""
    first = "" if r["first_kind"] == "content" else f" (first: {r['first_kind']})"
    answer = repr(r["text"][:40]) + (f" + {r['tool_calls']} tool call deltas" if r["tool_calls"] else "")
    return f"TTFT {r['ttft']:.0f} ms{first}, prompt {total} tokens, cache_n {cached}{ms}; answer {answer}"


# ---------------------------------------------------------------- servers


def wait_health(srv, t0, limit=180):
    """llama-server's /health answers 200 once its model is loaded (no prompt is sent, so no cache is
    filled)."""
    url = f"http://{srv.host}:{srv.port}/health"
    while time.perf_counter() - t0 < limit:
        srv.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise Unmeasured(f"{srv.label} not ready after {limit} s; last log lines:\n" + srv.tail(5))


def peer_flags(binary):
    help_text = subprocess.run([binary, "--help"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True).stdout
    flags = ["-c", str(CONTEXT), "-np", str(SLOTS)]
    if "--kv-unified" not in help_text:
        sys.exit(f"{binary} has no --kv-unified (one KV pool for all slots); this bench needs it")
    return flags + ["--kv-unified"]


class Peer:
    def __init__(self, key, path, binary, flags, tmp):
        self.srv = Server("peer", f"http://127.0.0.1:{args.peer_port}/v1", MODELS[key][0],
                          os.path.join(tmp, f"peer-{key}.log"))
        self.cmd = [binary, "-m", path, "-t", str(args.threads), "--host", "127.0.0.1",
                    "--port", str(args.peer_port), *flags]

    def start(self):
        if M.port_open("127.0.0.1", args.peer_port):
            raise Unmeasured(f"port {args.peer_port} is busy; pass --peer-port")
        t0 = time.perf_counter()
        self.srv.start(self.cmd)
        wait_health(self.srv, t0)
        return time.perf_counter() - t0

    def stop(self):
        self.srv.stop()
        deadline = time.time() + 10
        while M.port_open("127.0.0.1", args.peer_port) and time.time() < deadline:
            time.sleep(0.05)


class Moat:
    """One moat daemon with its own, fresh state (store, prompt cache, runtime), its model packaged
    and configured; the model is not loaded yet."""

    def __init__(self, key, path, tmp, run):
        self.ref = MODELS[key][2]
        self.srv = Server("moat", f"http://127.0.0.1:{args.moat_port}/engines/llama.cpp/v1", self.ref,
                          os.path.join(tmp, f"moat-{key}.log"))
        self.state = os.path.join(tmp, f"moat-{key}-{run}")
        self.env = dict(os.environ, MOAT_HOME=os.path.join(self.state, "home"),
                        MOAT_RUNTIME_DIR=os.path.join(self.state, "run"),
                        MOAT_CACHE_DIR=os.path.join(self.state, "cache"), MOAT_MODEL_PORT=str(args.moat_port))
        self.path = path
        self.worker = None

    def cli(self, *a):
        p = subprocess.run([args.moat, *a], env=self.env, text=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            self.srv.check_alive()
            raise Unmeasured(f"moat {' '.join(a)} failed: {p.stdout.strip()}")
        return p.stdout

    def start(self):
        if not os.access(args.moat, os.X_OK):
            raise Unmeasured(f"{args.moat} is missing; cargo build --release -p moat-cli")
        if M.port_open(self.srv.host, self.srv.port):
            raise Unmeasured(f"{self.srv.host}:{self.srv.port} is busy; pass --moat-port")
        self.srv.start([args.moat, "daemon"], env=self.env)
        deadline = time.time() + 60
        while not M.port_open(self.srv.host, self.srv.port):
            self.srv.check_alive()
            if time.time() > deadline:
                raise Unmeasured(f"moat daemon does not listen on {self.srv.host}:{self.srv.port} after 60 s; "
                                 "last log lines:\n" + self.srv.tail(5))
            time.sleep(0.05)
        self.cli("model", "package", "--gguf", self.path, self.ref)
        self.cli("model", "configure", "--context-size", str(CONTEXT), self.ref)

    def load(self):
        """`moat model run -d`: loads the model, no prompt; returns the seconds it took."""
        t0 = time.perf_counter()
        out = self.cli("model", "run", "-d", self.ref)
        took = time.perf_counter() - t0
        m = re.search(r"worker pid (\d+)", out)
        self.worker = int(m.group(1)) if m else M.find_worker(self.ref, self.srv.proc.pid)
        return took

    def unload(self):
        """`moat model unload`, then until its worker is gone (it saves its prompt cache on the way
        out); returns the seconds in all."""
        t0 = time.perf_counter()
        self.cli("model", "unload", self.ref)
        while self.worker is not None and alive(self.worker):
            if time.perf_counter() - t0 > 120:
                raise Unmeasured(f"moat's worker {self.worker} still runs 120 s after `moat model unload`")
            time.sleep(0.02)
        self.worker = None
        return time.perf_counter() - t0

    def state_bytes(self):
        """Bytes under this daemon's state (store, caches, logs): what an unload adds is what the
        worker saved."""
        total = 0
        for root, _, files in os.walk(self.state):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def stop(self):
        self.srv.stop()
        shutil.rmtree(self.state, ignore_errors=True)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- sequences


def moat_sequence(key, path, tmp, run, body, res):
    m = Moat(key, path, tmp, run)
    try:
        m.start()
        M.warm_page_cache(path)
        load = m.load()
        res["rss"].append(M.rss(m.worker)[0])
        r = replay(m.srv, body)
        res["cold"].append(r["ttft"])
        res["tokens"].append(prompt_tokens(r)[0])
        print(f"    moat cold:   load {load:.2f} s, RSS {res['rss'][-1]:.1f} MiB; {describe(r)}")
        before = m.state_bytes()
        gone = m.unload()
        saved = m.state_bytes() - before
        load = m.load()
        r = replay(m.srv, body)
        res["reload"].append(r["ttft"])
        res["cache_n"].append(prompt_tokens(r)[1])
        print(f"    moat reload: unload {gone:.2f} s (state grew {saved / 2**20:.1f} MiB), "
              f"load {load:.2f} s; {describe(r)}")
        r = replay(m.srv, body)
        res["warm"].append(r["ttft"])
        print(f"    moat warm:   {describe(r)}")
    finally:
        m.stop()


def peer_sequence(peer, path, body, res):
    try:
        M.warm_page_cache(path)
        load = peer.start()
        res["rss"].append(M.rss(peer.srv.proc.pid)[0])
        r = replay(peer.srv, body)
        res["cold"].append(r["ttft"])
        res["tokens"].append(prompt_tokens(r)[0])
        print(f"    peer cold:   load {load:.2f} s, RSS {res['rss'][-1]:.1f} MiB; {describe(r)}")
        peer.stop()
        load = peer.start()
        r = replay(peer.srv, body)
        res["reload"].append(r["ttft"])
        res["cache_n"].append(prompt_tokens(r)[1])
        print(f"    peer reload: restart {load:.2f} s; {describe(r)}")
        r = replay(peer.srv, body)
        res["warm"].append(r["ttft"])
        print(f"    peer warm:   {describe(r)}")
    finally:
        peer.stop()


def preflight(peer, key):
    """The request tried once on a throwaway peer, with its tools and without: whether to drop them
    (the peer refuses them, or --drop-tools), and lines to print."""
    try:
        peer.start()
        try:
            with_tools = replay(peer.srv, replay_body(peer.srv.model, False))
        except Unmeasured as e:
            if isinstance(e, ServerDied) or "tool" not in str(e).lower():
                raise
            replay(peer.srv, replay_body(peer.srv.model, True))
            return True, [f"TOOLS DROPPED for both servers: the peer refuses them ({str(e)[:300]})"]
        without = replay(peer.srv, replay_body(peer.srv.model, True))
        n_with, n_without = prompt_tokens(with_tools)[0], prompt_tokens(without)[0]
        if args.drop_tools:
            lines = ["tools dropped for both servers (--drop-tools)"]
        else:
            lines = ["tools kept, as OpenClaw sends them (the peer takes them)"]
        if n_with is not None and n_with == n_without:
            n_tools = len(replay_body("", False).get("tools", []))
            lines.append(f"note: the peer's prompt is {n_with} tokens with or without the {n_tools} tools: its chat "
                         "template leaves them out, so "
                         "where moat renders them the two prompts differ (compare the prompt tokens below; "
                         "--drop-tools compares the prompts without them)")
        else:
            lines.append(f"the peer's prompt: {n_with} tokens with the tools, {n_without} without")
        return args.drop_tools, lines
    finally:
        peer.stop()


def run_model(key, path, binary, flags, tmp):
    res = {who: {k: [] for k in ("cold", "reload", "warm", "rss", "tokens", "cache_n")} for who in ("moat", "peer")}
    why = {}
    peer = Peer(key, path, binary, flags, tmp)
    try:
        drop_tools, lines = preflight(peer, key)
    except Unmeasured as e:
        print(f"  peer: the request, tried once: {e}")
        return res, {"peer": e, "moat": Unmeasured("the peer took no request, so nothing is compared")}, None
    for line in lines:
        print(f"  {line}")
    for i in range(args.runs):
        print(f"  run {i + 1}/{args.runs}")
        for who in (("moat", "peer") if i % 2 == 0 else ("peer", "moat")):
            if who in why:
                continue
            try:
                if who == "moat":
                    moat_sequence(key, path, tmp, i, replay_body(MODELS[key][2], drop_tools), res["moat"])
                else:
                    peer_sequence(peer, path, replay_body(MODELS[key][0], drop_tools), res["peer"])
            except Unmeasured as e:
                why[who] = e
                print(f"    {who}: {e}")
    return res, why, drop_tools


# ---------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def fmt(v, unit):
    if v is None:
        return "n/a"
    return f"{v:.0f}" if unit == "ms" and v >= 100 else f"{v:.1f}"


def table(key, res, why, drop_tools):
    label = MODELS[key][0]
    print(f"\n{label}: moat (context {CONTEXT}, {SLOTS} slots) vs llama-server -t {args.threads} -c {CONTEXT} "
          f"-np {SLOTS} --kv-unified; OpenClaw's first turn"
          + ("" if drop_tools is None else (", tools dropped" if drop_tools else ", with its tools")))
    print(f"  {'figure':20} {'unit':5} {'peer':>8} {'moat':>8} {'moat/peer':>10} {'goal':>7}  result")
    verdicts = []
    for k, name, unit, goal in GOALS:
        p, m = med(res["peer"][k]), med(res["moat"][k])
        ratio = m / p if p and m is not None else None
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= goal else "MISS")
        verdicts.append(verdict)
        print(f"  {name:20} {unit:5} {fmt(p, unit):>8} {fmt(m, unit):>8} "
              f"{(f'{ratio:.2f}x' if ratio is not None else ''):>10} {f'<={goal}x':>7}  {verdict}")
    print(f"  prompt tokens: moat {sorted(set(res['moat']['tokens']))}, peer {sorted(set(res['peer']['tokens']))}; "
          f"cache_n after reload: moat {res['moat']['cache_n']}, peer {res['peer']['cache_n']}")
    for who, e in why.items():
        print(f"  {who} not (fully) measured: " + str(e).replace("\n", "\n    "))
    return verdicts + ["n/a"] * len(why)


def main():
    # A SIGTERM unwinds like Ctrl-C, through the `finally`s that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("benches/first_turn.py: terminated"))
    if args.llama_server:
        binary = args.llama_server
    else:
        print("peer: scripts/llama-server.sh (builds llama-server once; a while the first time)")
        binary = M.run_script("llama-server.sh")[-1]
    flags = peer_flags(binary)
    files = dict(zip(["smollm2", "gemma3"], M.run_script("models.sh")))
    with open(FIXTURE) as f:
        fx = json.load(f)
    b = fx["body"]
    chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(json.dumps(m.get("content")))
                for m in b["messages"]) + len(json.dumps(b.get("tools", [])))
    print(f"request: {os.path.relpath(FIXTURE, ROOT)} ({fx['captured_from']}): {len(b['messages'])} messages, "
          f"{len(b.get('tools', []))} tools, {chars} characters")
    tmp = tempfile.mkdtemp(prefix="moat-first-turn-bench-")
    load = os.getloadavg()[0]
    print(f"moat {args.moat}, peer {binary}; threads {args.threads}, {args.runs} runs (median reported), "
          f"load average {load:.2f}; logs in {tmp}")
    if load > 0.5:
        print(f"  warning: the machine is busy (load {load:.2f}); the figures will be noisy")
    tables, ok = [], True
    try:
        for key in keys:
            print(f"\n== {MODELS[key][0]} ({files[key]})")
            tables.append((key, *run_model(key, files[key], binary, flags, tmp)))
        for t in tables:
            ok = "n/a" not in table(*t) and ok
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        print(f"(some figures were not measured; logs kept in {tmp})")
        sys.exit(1)


main()
