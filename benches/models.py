#!/usr/bin/env python3
"""Model runner benchmarks against llama.cpp's own llama-server, same model file, same threads,
same run (DESIGN.md budgets: at least 1.0x on every figure, ahead on the agent replay and on
concurrent streams), for SmolLM2-135M (Q4_1) and Gemma-3-270M (Q4_K_M):

  decode        single-stream tokens/s, 128 tokens, temperature 0, ignore_eos     (client; server timings)
  prompt        prompt processing tokens/s on a 512-token prompt, each run a fresh prompt so that no
                cache helps                                  (server timings.prompt_per_second; client TTFT)
  agent replay  time to first token on the 10th turn of a replayed agent conversation that grows each
                turn and is resent whole each turn (prefix cache)
  8 streams     total tokens/s of 8 concurrent streams of 128 tokens
  cold load     process start to the first successful request (moat: `moat daemon` start, so the
                worker's start and the model load are in it)
  memory        RSS of the server process after load (moat: its model worker, a `moat` process with a
                `__model-worker` argument; --moat-worker changes the match)

Both servers are driven the same way, through the OpenAI-compatible API they both speak
(/v1/completions and /v1/chat/completions, stream: true), by this script alone (standard library only).
The peer runs as `llama-server -m FILE -t THREADS -c 4096 -np 4 --metrics`, threads = physical cores;
moat's runner defaults to the physical cores and 4 slots. Both stay loaded while a model is measured,
and each workload alternates between them run by run (which goes first alternates too), so that the
noise of a shared machine hits both alike; only one is ever busy. The load average is printed: on a busy
machine, threads that spin in OpenMP barriers lose most of their speed and no figure means much.
The Gemma GGUF (google/gemma-3-270m, the base model) has no chat template: llama-server falls back to
ChatML, and the agent replay prints each server's prompt size at turn 10 so the two can be compared.

Usage: benches/models.py [--peer-only] [--models smollm2,gemma3] [--runs 3] [--best]
                         [--moat target/release/moat] [--llama-server PATH]
(moat: a release build, `cargo build --release -p moat-cli`, which compiles llama.cpp in Release with
-C target-cpu=native as .cargo/config.toml sets; the peer is built with GGML_NATIVE=ON in Release.)
Fetches the models with scripts/models.sh and builds the peer with scripts/llama-server.sh (once,
cached). moat runs as its own daemon, with its own state under a temporary directory and its model
runner on --moat-port (MOAT_MODEL_PORT), so a daemon already on 12434 is left alone; --moat-running
uses a moat already serving --moat-url instead (the models already in its store; no cold load then).
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    # key: (label, file under the models cache, moat store name)
    "smollm2": ("SmolLM2-135M", "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "ai/smollm2:135M-Q4_1"),
    "gemma3": ("Gemma-3-270M", "gemma3/gemma-3-270m-q4_k_m.gguf", "ai/gemma3:270M-Q4_K_M"),
}


def physical_cores():
    cores, phys = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":")[1].strip()))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--peer-only", action="store_true", help="measure llama-server alone")
ap.add_argument("--models", default="smollm2,gemma3", help="comma-separated: " + ",".join(MODELS))
ap.add_argument("--runs", type=int, default=3, help="repetitions per figure (the median is reported)")
ap.add_argument("--best", action="store_true",
                help="report the best run instead of the median (on a shared, noisy machine)")
ap.add_argument("--threads", type=int, default=physical_cores(), help="llama-server -t (default: physical cores)")
ap.add_argument("--llama-server", help="llama-server binary (default: the one scripts/llama-server.sh builds)")
ap.add_argument("--peer-port", type=int, default=18434)
ap.add_argument("--moat", default=os.path.join(ROOT, "target/release/moat"))
ap.add_argument("--moat-running", action="store_true", help="use a moat already serving --moat-url")
ap.add_argument("--moat-port", type=int, default=18435,
                help="the model runner port of the daemon this script starts (MOAT_MODEL_PORT), so that it never "
                     "meets a daemon already on 12434")
ap.add_argument("--moat-url", help="moat's OpenAI base URL (default: http://127.0.0.1:PORT/engines/llama.cpp/v1, PORT "
                                   "12434 with --moat-running, else --moat-port)")
ap.add_argument("--moat-name", action="append", default=[], metavar="KEY=REF",
                help="moat store name for a model, e.g. smollm2=ai/smollm2:135M-Q4_1")
ap.add_argument("--moat-worker", default="moat:__model-worker", metavar="NAME:ARG",
                help="how to find moat's worker process: its program name and one of its arguments")
ap.add_argument("--timeout", type=float, default=300, help="seconds any one request may take")
args = ap.parse_args()
if not args.moat_url:
    args.moat_url = f"http://127.0.0.1:{12434 if args.moat_running else args.moat_port}/engines/llama.cpp/v1"

keys = [k.strip() for k in args.models.split(",") if k.strip()]
for k in keys:
    if k not in MODELS:
        sys.exit(f"unknown model {k!r}; known: {', '.join(MODELS)}")
moat_names = {k: v[2] for k, v in MODELS.items()}
for kv in args.moat_name:
    k, _, v = kv.partition("=")
    if k not in MODELS or not v:
        sys.exit(f"--moat-name wants KEY=REF with KEY one of {', '.join(MODELS)}")
    moat_names[k] = v
WORKER_PROG, _, WORKER_ARG = args.moat_worker.partition(":")


class Unmeasured(Exception):
    """A figure that could not be measured; the reason is printed instead of a number."""


class ServerDied(Unmeasured):
    pass


def run_script(name):
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", name)], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"scripts/{name} failed (its message is above)")
    return p.stdout.split()


# ---------------------------------------------------------------- servers


class Server:
    """One server under test: an OpenAI base URL, the model name to send, the processes to watch."""

    def __init__(self, label, base, model, log):
        self.label, self.base, self.model, self.log = label, base.rstrip("/"), model, log
        u = urllib.parse.urlsplit(self.base)
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path
        self.proc = None  # the process we started, if any

    def check_alive(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerDied(f"{self.label} exited with status {self.proc.returncode}; last log lines:\n{self.tail()}")

    def tail(self, n=15):
        try:
            with open(self.log, errors="replace") as f:
                return "".join("      " + line for line in f.readlines()[-n:])
        except OSError:
            return "      (no log)"

    def stop(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the group (moat's workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def start(self, cmd, env=None):
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                     start_new_session=True)
        logf.close()
        return self.proc


def request(srv, path, body, stream=True, timeout=None):
    """POSTs `body` to srv's base + path. Streaming: returns a dict with the arrival time of each
    content piece, the text, usage and timings; plain: the decoded JSON."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout or args.timeout)
    data = json.dumps(body).encode()
    try:
        t0 = time.perf_counter()
        conn.request("POST", srv.prefix + path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise Unmeasured(f"{srv.label}: {path} answered {resp.status}: {resp.read(500).decode(errors='replace')}")
        if not stream:
            return json.loads(resp.read())
        out = {"t0": t0, "times": [], "text": [], "usage": None, "timings": None, "finish": None}
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
                raise Unmeasured(f"{srv.label}: {path} streamed an error: {ev['error']}")
            for c in ev.get("choices") or []:
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if piece:
                    out["times"].append(now)
                    out["text"].append(piece)
                if c.get("finish_reason"):
                    out["finish"] = c["finish_reason"]
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            if ev.get("timings"):
                out["timings"] = ev["timings"]
        if not out["times"]:
            raise Unmeasured(f"{srv.label}: {path} streamed no tokens")
        return out
    except Unmeasured:
        srv.check_alive()
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        srv.check_alive()
        raise Unmeasured(f"{srv.label}: {path} failed: {e!r}")
    finally:
        conn.close()


def completion_tokens(r):
    if r["usage"] and r["usage"].get("completion_tokens"):
        return r["usage"]["completion_tokens"]
    if r["timings"] and r["timings"].get("predicted_n"):
        return r["timings"]["predicted_n"]
    return len(r["times"])


def wait_ready(srv, t0, limit=180):
    """Polls with a one-token completion until one succeeds; returns seconds since t0."""
    last = "nothing answered"
    while time.perf_counter() - t0 < limit:
        srv.check_alive()
        try:
            request(srv, "/completions", {"model": srv.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
                    stream=False, timeout=60)
            return time.perf_counter() - t0
        except ServerDied:
            raise
        except Unmeasured as e:
            last = str(e)
        time.sleep(0.02)
    raise Unmeasured(f"{srv.label} not ready after {limit} s: {last}; last log lines:\n" + srv.tail(5))


def rss(pid):
    """(VmRSS, RssAnon) in MiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                vals[k] = int(v.split()[0]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("RssAnon", 0.0)


def ancestors(pid):
    out = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


def find_worker(model_ref, daemon_pid=None):
    """moat's worker for the model: a process named WORKER_PROG with WORKER_ARG among its arguments,
    started by our daemon when we started one (other daemons on the machine have workers too)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if argv and WORKER_ARG in argv and WORKER_PROG in (os.path.basename(argv[0]), comm):
            if daemon_pid is None or daemon_pid in ancestors(int(pid)):
                found.append((int(pid), argv))
    if len(found) > 1:
        mine = [p for p in found if any(model_ref in a for a in p[1])]
        if len(mine) == 1:
            found = mine
    if len(found) != 1:
        raise Unmeasured(f"{len(found)} processes match --moat-worker {args.moat_worker}" +
                         "".join(f"\n      {pid}: {' '.join(a)}" for pid, a in found))
    return found[0][0]


def port_open(host, port):
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def warm_page_cache(path):
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# ---------------------------------------------------------------- workloads

WORDS = ("river stone garden window lantern quiet market engine harbor silver morning paper valley signal "
         "forest bridge candle mirror orchard thunder meadow castle compass ladder pocket saddle temple "
         "violet winter yellow anchor basket cactus dolphin eclipse falcon glacier hammer island jacket kettle "
         "lemon magnet needle oyster pepper quartz rocket shadow tunnel umbrella velvet walnut zipper copper "
         "planet desert ocean canyon pillow timber marble feather cotton bottle button carpet circle "
         "cloud coffee dragon empire fabric galaxy hollow insect jungle kitten legend mountain number office "
         "parrot rabbit saturn summer ticket turtle vacuum wizard").split()


def words(seed, n):
    r = random.Random(seed)
    return " ".join(r.choice(WORDS) for _ in range(n))


class Prompts:
    """Prompts of exactly (or as near as the tokenizer allows) n tokens, cut with the peer's /tokenize,
    which counts what a completion's prompt costs (BOS included). Every prompt starts differently so
    that no prefix cache can serve one from another."""

    def __init__(self, peer):
        self.peer = peer
        u = urllib.parse.urlsplit(peer.base)
        self.root = f"{u.scheme}://{u.netloc}"

    def count(self, text):
        conn = http.client.HTTPConnection(self.peer.host, self.peer.port, timeout=60)
        try:
            conn.request("POST", "/tokenize", json.dumps({"content": text, "add_special": True}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                raise Unmeasured(f"peer /tokenize answered {r.status}")
            return len(json.loads(r.read())["tokens"])
        finally:
            conn.close()

    FIRST = ("Alpha Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliet Kilo Lima Mike November Oscar Papa "
             "Quebec Romeo Sierra Tango Uniform Victor Whiskey Xray Yankee Zulu").split()

    def exact(self, i, seed, n):
        # each prompt's first word starts with another letter: no two share even their first token
        head = self.FIRST[i % len(self.FIRST)] + (str(i // len(self.FIRST)) if i >= len(self.FIRST) else "") + ": "
        lo, hi = 1, n  # words: never fewer than one token each
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            c = self.count(head + words(seed, mid))
            if c <= n:
                best = (mid, c)
                lo = mid + 1
            else:
                hi = mid - 1
        text = head + words(seed, best[0])
        return text, best[1]


AGENT_SYSTEM = ("You are a coding agent in a Linux sandbox. Run shell commands by writing them in a fenced "
                "block; their output comes back in the next message. Keep answers short.")
AGENT_TURNS = [
    ("The tests in tests/test_parse.py fail since this morning. Find out why.",
     "Let me run them first.\n```\npytest -q tests/test_parse.py\n```"),
    ("Output:\nFAILED test_dates - ValueError: unconverted data remains: Z\n1 failed, 11 passed",
     "The date parser rejects a trailing Z. Let me read it.\n```\nsed -n 1,20p src/parse.py\n```"),
    ("Output:\ndef parse_date(s):\n    return datetime.strptime(s, FORMAT)",
     "It uses a fixed format without a timezone. Which input has the Z?\n```\ngrep -n Z tests/data/*.txt\n```"),
    ("Output:\ntests/data/dates.txt:3:created=2024-05-01T10:00:00Z",
     "The fixtures now carry UTC times. Let me check when that changed.\n```\ngit log -1 --oneline tests/data\n```"),
    ("Output:\n4e1f2a9 fixtures: use UTC timestamps",
     "The fixtures changed, not the code. datetime.fromisoformat accepts Z on Python 3.11.\n```\npython3 --version\n```"),
    ("Output:\nPython 3.11.7",
     "Good. Editing the parser.\n```\nsed -i 's/strptime(s, FORMAT)/fromisoformat(s)/' src/parse.py\n```"),
    ("Done, no output.",
     "Running the tests again.\n```\npytest -q tests/test_parse.py\n```"),
    ("Output:\nFAILED test_naive - AssertionError\n1 failed, 11 passed",
     "A naive expectation fails now. Let me read that test.\n```\ngrep -n -A2 'def test_naive' tests/test_parse.py\n```"),
    ("Output:\ndef test_naive():\n    assert parse_date(NAIVE) == EXPECTED",
     "That input has no Z, so it stays naive. Which line fails?\n```\npytest -q -k naive --tb=line\n```"),
    ("Output:\ntests/test_parse.py:41: fixture line 3 compared with a naive datetime. Fix the test or the parser?",
     None),
]


def agent_messages(nonce, turn):
    msgs = [{"role": "system", "content": f"Session {nonce}. {AGENT_SYSTEM}"}]
    for user, assistant in AGENT_TURNS[:turn - 1]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": AGENT_TURNS[turn - 1][0]})
    return msgs


# ---------------------------------------------------------------- figures

FIGURES = [
    # key, label, unit, higher is better
    ("decode", "decode, 1 stream, client", "tok/s", True),
    ("decode_srv", "decode, 1 stream, server timings", "tok/s", True),
    ("pp_srv", "prompt 512 tok, server timings", "tok/s", True),
    ("pp_client", "prompt 512 tok, client (n/TTFT)", "tok/s", True),
    ("pp_ttft", "TTFT, 512-token prompt", "ms", False),
    ("agent_ttft", "TTFT, agent replay turn 10", "ms", False),
    ("agent_ttft1", "TTFT, agent replay turn 1", "ms", False),
    ("conc", "8 streams, total", "tok/s", True),
    ("cold", "cold load, start to 1st answer", "ms", False),
    ("rss", "RSS after load", "MiB", False),
]


def decode_once(srv, i, ctx):
    r = request(srv, "/completions", {
        "model": srv.model, "prompt": f"Story {i}. Once upon a time, in a small village by the sea,",
        "max_tokens": 128, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    n = completion_tokens(r)
    out = {"tokens": n}
    if len(r["times"]) >= 2:  # the tokens after the first, over the time from the first to the last
        out["decode"] = (n - 1) / (r["times"][-1] - r["times"][0])
    if (r["timings"] or {}).get("predicted_per_second"):
        out["decode_srv"] = r["timings"]["predicted_per_second"]
    if n < 128:
        out["note"] = f"only {n} of 128 tokens (ignore_eos not honoured?)"
    return out


def prompt_once(srv, i, ctx):
    text, n = ctx["prompts"][i]
    r = request(srv, "/completions", {"model": srv.model, "prompt": text, "max_tokens": 1, "temperature": 0,
                                      "stream": True, "stream_options": {"include_usage": True}})
    ttft = r["times"][0] - r["t0"]
    got = (r["usage"] or {}).get("prompt_tokens") or (r["timings"] or {}).get("prompt_n")
    out = {"pp_ttft": ttft * 1000, "pp_client": n / ttft, "tokens": got}
    if (r["timings"] or {}).get("prompt_per_second"):
        out["pp_srv"] = r["timings"]["prompt_per_second"]
    if (r["timings"] or {}).get("cache_n"):
        out["note"] = f"{r['timings']['cache_n']} prompt tokens came from a cache"
    return out


def agent_once(srv, i, ctx):
    nonce = f"{ctx['key']}-{i}-{ctx['salt']}"
    out = {}
    for turn in range(1, len(AGENT_TURNS) + 1):
        r = request(srv, "/chat/completions", {"model": srv.model, "messages": agent_messages(nonce, turn),
                                               "max_tokens": 8, "temperature": 0, "stream": True,
                                               "stream_options": {"include_usage": True}})
        ttft = (r["times"][0] - r["t0"]) * 1000
        if turn == 1:
            out["agent_ttft1"] = ttft
    out["agent_ttft"] = ttft
    t = r["timings"] or {}
    if "prompt_n" in t:
        out["tokens"] = f"{t['prompt_n']}+{t.get('cache_n', 0)} cached"
    elif r["usage"]:
        out["tokens"] = r["usage"].get("prompt_tokens")
    return out


def concurrent_once(srv, i, ctx):
    barrier = threading.Barrier(8)
    res = [None] * 8

    def one(j):
        barrier.wait()
        try:
            res[j] = request(srv, "/completions", {
                "model": srv.model, "prompt": f"Stream {i}-{j}. {words(1000 * i + j, 12)}. Write on:",
                "max_tokens": 128, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}})
        except Unmeasured as e:
            res[j] = e

    ts = [threading.Thread(target=one, args=(j,)) for j in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for r in res:
        if isinstance(r, Unmeasured):
            raise r
    t0 = min(r["t0"] for r in res)
    t1 = max(r["times"][-1] for r in res)
    n = [completion_tokens(r) for r in res]
    out = {"conc": sum(n) / (t1 - t0), "tokens": sum(n)}
    if min(n) < 128:
        out["note"] = f"streams ended after {n} tokens"
    return out


WORKLOADS = [("decode", decode_once, ["decode", "decode_srv"]),
             ("prompt", prompt_once, ["pp_srv", "pp_client", "pp_ttft"]),
             ("agent replay", agent_once, ["agent_ttft", "agent_ttft1"]),
             ("8 streams", concurrent_once, ["conc"])]


def pick(fig, xs):
    if not args.best:
        return statistics.median(xs)
    higher = next(h for k, _, _, h in FIGURES if k == fig)
    return max(xs) if higher else min(xs)


def measure(servers, results, ctx):
    """Runs every workload `args.runs` times on each live server, alternating which goes first so that
    the machine's noise hits both alike; fills results[label][figure] with medians or Unmeasured."""
    dead = {}
    for name, fn, figs in WORKLOADS:
        samples = {s.label: {f: [] for f in figs} for s in servers}
        info = {s.label: [] for s in servers}
        failed = {}
        for i in range(args.runs):
            for srv in (servers if i % 2 == 0 else servers[::-1]):
                if srv.label in dead or srv.label in failed:
                    continue
                try:
                    out = fn(srv, i, ctx)
                except ServerDied as e:
                    dead[srv.label] = e
                    print(f"  {srv.label}: {e}")
                    continue
                except Unmeasured as e:
                    failed[srv.label] = e
                    print(f"  {srv.label}: {name}: {e}")
                    continue
                for f in figs:
                    if f in out:
                        samples[srv.label][f].append(out[f])
                info[srv.label].append(f"{out.get('tokens')}" + (f" ({out['note']})" if "note" in out else ""))
        for srv in servers:
            why = dead.get(srv.label) or failed.get(srv.label)
            s = samples[srv.label]
            if not why:
                print(f"  {srv.label}: {name}: " + "; ".join(
                    f"{f} {[round(x, 1) for x in s[f]]}" for f in figs if s[f]) + f"; tokens {info[srv.label]}")
            for f in figs:
                if why:
                    results[srv.label].setdefault(f, why)
                elif s[f]:
                    results[srv.label][f] = pick(f, s[f])
                else:
                    results[srv.label][f] = Unmeasured(f"{srv.label} reported no {f} (no timings in its stream?)")


# ---------------------------------------------------------------- runs


def started(fn):
    """A server whose start fails is stopped before the failure goes on."""
    def wrapper(*a):
        holder = []
        try:
            return fn(holder, *a)
        except BaseException:
            for srv in holder:
                srv.stop()
            raise
    return wrapper


@started
def start_peer(holder, key, path, binary, tmp, res):
    srv = Server("peer", f"http://127.0.0.1:{args.peer_port}/v1", MODELS[key][0], os.path.join(tmp, f"peer-{key}.log"))
    holder.append(srv)
    if port_open("127.0.0.1", args.peer_port):
        raise Unmeasured(f"port {args.peer_port} is busy; pass --peer-port")
    warm_page_cache(path)
    t0 = time.perf_counter()
    srv.start([binary, "-m", path, "-t", str(args.threads), "--host", "127.0.0.1", "--port", str(args.peer_port),
               "-c", "4096", "-np", "4", "--metrics"])
    res["cold"] = wait_ready(srv, t0) * 1000
    res["rss"], anon = rss(srv.proc.pid)
    print(f"  peer: llama-server pid {srv.proc.pid}: cold load {res['cold']:.0f} ms, RSS {res['rss']:.1f} MiB "
          f"(anonymous {anon:.1f} MiB); log {srv.log}")
    return srv


@started
def start_moat(holder, key, path, tmp, res):
    ref = moat_names[key]
    srv = Server("moat", args.moat_url, ref, os.path.join(tmp, f"moat-{key}.log"))
    holder.append(srv)
    if args.moat_running:
        res["cold"] = Unmeasured("not measured with --moat-running")
        wait_ready(srv, time.perf_counter(), limit=300)
    else:
        if not os.access(args.moat, os.X_OK):
            raise Unmeasured(f"{args.moat} is missing; cargo build --release -p moat-cli")
        if port_open(srv.host, srv.port):
            raise Unmeasured(f"{srv.host}:{srv.port} is busy; pass --moat-port, or --moat-running to use what listens there")
        state = os.path.join(tmp, f"moat-{key}")
        env = dict(os.environ, MOAT_HOME=os.path.join(state, "home"), MOAT_RUNTIME_DIR=os.path.join(state, "run"),
                   MOAT_MODEL_PORT=str(srv.port))
        srv.start([args.moat, "daemon"], env=env)
        deadline = time.time() + 60
        while not port_open(srv.host, srv.port):
            srv.check_alive()
            if time.time() > deadline:
                raise Unmeasured(f"moat daemon does not listen on {srv.host}:{srv.port} after 60 s; last log lines:\n"
                                 + srv.tail(5))
            time.sleep(0.05)
        p = subprocess.run([args.moat, "model", "package", "--gguf", path, ref], env=env, text=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            raise Unmeasured(f"moat model package failed: {p.stdout.strip()}")
        srv.stop()  # the cold start is a fresh daemon with the model already in its store
        warm_page_cache(path)
        t0 = time.perf_counter()
        srv.start([args.moat, "daemon"], env=env)
        res["cold"] = wait_ready(srv, t0) * 1000
    try:
        worker = find_worker(ref, srv.proc.pid if srv.proc else None)
        res["rss"], anon = rss(worker)
        cold = res["cold"] if isinstance(res["cold"], Unmeasured) else f"{res['cold']:.0f} ms"
        print(f"  moat: cold load {cold}, worker pid {worker} RSS {res['rss']:.1f} MiB (anonymous {anon:.1f} MiB); "
              f"log {srv.log}")
    except Unmeasured as e:
        res["rss"] = e
        print(f"  moat: worker RSS: {e}")
    return srv


def run_model(key, path, binary, tmp):
    results = {"peer": {}, "moat": {}}
    servers = []
    try:
        try:
            peer = start_peer(key, path, binary, tmp, results["peer"])
            servers.append(peer)
            ctx = {"key": key, "salt": f"{random.randrange(1 << 32):08x}",
                   "prompts": [Prompts(peer).exact(i, f"{key}-{i}-{random.randrange(1 << 32):x}", 512)
                               for i in range(args.runs)]}
            print(f"  512-token prompts: {[n for _, n in ctx['prompts']]} tokens (peer's /tokenize)")
        except Unmeasured as e:
            print(f"  peer: {e}")
            for k, *_ in FIGURES:
                results["peer"].setdefault(k, e)
            ctx = None
        if not args.peer_only:
            try:
                servers.append(start_moat(key, path, tmp, results["moat"]))
            except Unmeasured as e:
                print(f"  moat: {e}")
                for k, *_ in FIGURES:
                    results["moat"].setdefault(k, e)
        if ctx is None:
            why = Unmeasured("the 512-token prompts are cut with the peer's tokenizer, and the peer did not start")
            for r in results.values():
                for k, *_ in FIGURES:
                    r.setdefault(k, why)
        elif servers:
            measure(servers, results, ctx)
    finally:
        for s in servers:
            s.stop()
    return results["peer"], None if args.peer_only else results["moat"]


def fmt(v, unit):
    if not isinstance(v, (int, float)):
        return "n/a"
    return f"{v:.1f}" if unit != "ms" or v < 100 else f"{v:.0f}"


def table(key, peer, moat):
    label = MODELS[key][0]
    print(f"\n{label}: llama-server -t {args.threads} -c 4096 -np 4 vs moat (store name {moat_names[key]})")
    print(f"  {'figure':34} {'unit':6} {'peer':>9} {'moat':>9} {'moat/peer':>10}  better")
    missing = {}
    for k, name, unit, higher in FIGURES:
        p = peer.get(k)
        m = moat.get(k) if moat is not None else None
        ratio = f"{m / p:.2f}x" if isinstance(p, (int, float)) and isinstance(m, (int, float)) and p > 0 else ""
        print(f"  {name:34} {unit:6} {fmt(p, unit):>9} {fmt(m, unit) if moat is not None else '-':>9} {ratio:>10}  "
              f"{'higher' if higher else 'lower'}")
        for who, v in (("peer", p), ("moat", m)):
            if (who == "peer" or moat is not None) and not isinstance(v, (int, float)):
                missing.setdefault((label, who, str(v)), []).append(name)
    return [f"{label} / {who} / {' | '.join(names) if len(names) < len(FIGURES) else 'every figure'}: {why}"
            for (label, who, why), names in missing.items()]


def main():
    # A SIGTERM unwinds like Ctrl-C, through the `finally`s that stop the servers (they run in their
    # own sessions, so nothing else would end them).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("benches/models.py: terminated"))
    if args.llama_server:
        binary = args.llama_server
    else:
        print("peer: scripts/llama-server.sh (builds llama-server once; a while the first time)")
        binary = run_script("llama-server.sh")[-1]
    files = dict(zip(["smollm2", "gemma3"], run_script("models.sh")))
    tmp = tempfile.mkdtemp(prefix="moat-models-bench-")
    load = os.getloadavg()[0]
    print(f"threads {args.threads}, {args.runs} runs per figure ({'best' if args.best else 'median'} reported), "
          f"load average {load:.2f}; logs in {tmp}")
    if load > 0.5:
        print(f"  warning: the machine is busy (load {load:.2f}); the figures will be noisy")
    missing, tables = [], []
    try:
        for key in keys:
            print(f"\n== {MODELS[key][0]} ({files[key]})")
            tables.append((key, *run_model(key, files[key], binary, tmp)))
        for t in tables:
            missing += table(*t)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    finally:
        if not missing:
            shutil.rmtree(tmp, ignore_errors=True)
    if missing:
        print("\nNot measured:")
        for m in missing:
            print("  " + m.replace("\n", "\n  "))
        print(f"(logs kept in {tmp})")
        sys.exit(1)


main()
