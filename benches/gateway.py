#!/usr/bin/env python3
"""Egress gateway benchmarks against squid, tinyproxy and a direct connection,
all on loopback in the same run (DESIGN.md budgets):

  CONNECT throughput, 1 GiB through the tunnel       budget: >= 90 % of direct
  plain-HTTP requests/s with keep-alive, 1 and 64 connections (wrk)   budget: ahead of both peers
  added p50 latency per request, 1 connection (wrk --latency)         budget: < 100 us
  intercepted-HTTPS requests/s, keep-alive, 4 clients, against mitmproxy (when mitmdump is installed:
  `pip install mitmproxy`)

Usage: benches/gateway.py [--connect-only] [--runs N] [--baseline PATH]   (after `cargo build --release -p moat-gateway --examples`)
  --connect-only   only the CONNECT throughput section
  --runs N         transfers per proxy for CONNECT throughput (default 3); prints best and median
  --baseline PATH  also measure another build of the standalone example (as moat-base) in the same
                   run, e.g. a copy of target/release/examples/standalone from before a change
Installs squid, tinyproxy and wrk with apt when missing.
"""
# Whatever way this bench ends, it leaves nothing running (scripts/leftovers.py).
import os as _os, sys as _sys  # noqa: E402
_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "..", "scripts"))
import leftovers  # noqa: E402
leftovers.watch_this_script()
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CONNECT_ONLY = "--connect-only" in sys.argv
RUNS = int(sys.argv[sys.argv.index("--runs") + 1]) if "--runs" in sys.argv else 3
BASELINE = sys.argv[sys.argv.index("--baseline") + 1] if "--baseline" in sys.argv else None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "target/release/examples")
HTTP, BULK, BYTES, TLS = 18100, 18101, 1 << 30, 18102
PROXIES = {"moat": 3130, "squid": 3131, "tinyproxy": 3132}
if BASELINE:
    PROXIES["moat-base"] = 3134

missing = [p for p, c in [("squid", "squid"), ("tinyproxy", "tinyproxy"), ("wrk", "wrk")] if not shutil.which(c)]
if missing:
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
for b in ["standalone", "upstream"]:
    if not os.path.exists(os.path.join(EX, b)):
        sys.exit(f"build first: cargo build --release -p moat-gateway --examples ({b} is missing)")

tmp = tempfile.mkdtemp(prefix="moat-gw-bench-")
os.chmod(tmp, 0o777)
procs = []


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


def wait_port(port):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


squid_conf = os.path.join(tmp, "squid.conf")
with open(squid_conf, "w") as f:
    f.write(f"""http_port 127.0.0.1:{PROXIES['squid']}
http_access allow all
cache deny all
access_log none
cache_log /dev/null
pid_filename none
shutdown_lifetime 0 seconds
acl SSL_ports port 1-65535
acl CONNECT method CONNECT
""")
tiny_conf = os.path.join(tmp, "tinyproxy.conf")
with open(tiny_conf, "w") as f:
    f.write(f"""Port {PROXIES['tinyproxy']}
Listen 127.0.0.1
Timeout 600
MaxClients 1000
Allow 127.0.0.1
LogLevel Critical
DisableViaHeader Yes
""")

try:
    upstream_ca = os.path.join(tmp, "upstream-ca.pem")
    start([os.path.join(EX, "upstream"), f"127.0.0.1:{HTTP}", f"127.0.0.1:{BULK}", str(BYTES), f"127.0.0.1:{TLS}", upstream_ca])
    wait_port(TLS)
    moat_ca = os.path.join(tmp, "moat-ca.pem")
    start([os.path.join(EX, "standalone"), f"127.0.0.1:{PROXIES['moat']}", "deny-all", "localhost"],
          env=dict(os.environ, MOAT_BENCH_CA_OUT=moat_ca, MOAT_EXTRA_CA_CERTS=upstream_ca))
    if BASELINE:
        start([BASELINE, f"127.0.0.1:{PROXIES['moat-base']}", "deny-all", "localhost"])
    start(["squid", "-N", "-f", squid_conf])
    start(["tinyproxy", "-d", "-c", tiny_conf])
    for port in [HTTP, BULK, *PROXIES.values()]:
        wait_port(port)

    def bulk(proxy):
        s = socket.create_connection(("127.0.0.1", proxy or BULK))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        t = time.perf_counter()
        if proxy:
            s.sendall(f"CONNECT localhost:{BULK} HTTP/1.1\r\nHost: localhost:{BULK}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            assert head.split(b" ")[1] == b"200", head
        got, buf = 0, bytearray(1 << 20)
        while got < BYTES:
            n = s.recv_into(buf)
            if n == 0:
                break
            got += n
        s.close()
        assert got == BYTES, f"{got} of {BYTES} bytes through {proxy or 'direct'}"
        return got / (time.perf_counter() - t) / 1e9

    # Rounds go through every contender in turn, so that a busy spell on the
    # machine falls on all of them rather than on one.
    runs = {name: [] for name in ["direct", *PROXIES]}
    for _ in range(RUNS):
        for name in runs:
            runs[name].append(bulk(PROXIES.get(name)))
    print(f"CONNECT throughput, 1 GiB (GB/s, best and median of {RUNS}):")
    direct, direct_med = max(runs["direct"]), statistics.median(runs["direct"])
    for name, got in runs.items():
        best, med = max(got), statistics.median(got)
        print(f"  {name:10}  best {best:6.2f} {best / direct * 100:5.1f} %   median {med:6.2f} {med / direct_med * 100:5.1f} % of direct")
    if CONNECT_ONLY:
        sys.exit(0)

    lua = os.path.join(tmp, "proxy.lua")
    with open(lua, "w") as f:
        f.write(f'wrk.path = "http://localhost:{HTTP}/"\nwrk.headers["Host"] = "localhost:{HTTP}"\n')

    def wrk(port, conns, through_proxy):
        cmd = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", "-d5s", "--latency"]
        if through_proxy:
            cmd += ["-s", lua]
        cmd.append(f"http://127.0.0.1:{port}/")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        m = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
        p50 = float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]
        return rps, p50

    for conns in (1, 64):
        print(f"plain HTTP, keep-alive, {conns} connection(s) (requests/s; p50 latency):")
        d_rps, d_p50 = wrk(HTTP, conns, False)
        print(f"  direct      {d_rps:10.0f}   p50 {d_p50:7.1f} us")
        results = {}
        for name, port in PROXIES.items():
            rps, p50 = wrk(port, conns, True)
            results[name] = rps
            print(f"  {name:10}  {rps:10.0f}   p50 {p50:7.1f} us   added {p50 - d_p50:7.1f} us")
        print(f"  moat / squid {results['moat'] / results['squid']:.2f}x   moat / tinyproxy {results['moat'] / results['tinyproxy']:.2f}x")

    if shutil.which("mitmdump"):
        import multiprocessing
        import ssl
        mitm_dir = os.path.join(tmp, "mitm")
        start(["mitmdump", "-q", "--listen-host", "127.0.0.1", "-p", "3133", "--set", f"confdir={mitm_dir}", "--set", "ssl_insecure=true"])
        wait_port(3133)

        def client(proxy, cafile, seconds, q):
            s = socket.create_connection(("127.0.0.1", proxy))
            s.sendall(f"CONNECT localhost:{TLS} HTTP/1.1\r\nHost: localhost:{TLS}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(1)
            tls = ssl.create_default_context(cafile=cafile).wrap_socket(s, server_hostname="localhost")
            req = f"GET / HTTP/1.1\r\nHost: localhost:{TLS}\r\n\r\n".encode()
            f = tls.makefile("rb")
            n, end = 0, time.time() + seconds
            while time.time() < end:
                tls.sendall(req)
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
                n += 1
            q.put(n)

        def https_rps(proxy, cafile):
            q = multiprocessing.Queue()
            ps = [multiprocessing.Process(target=client, args=(proxy, cafile, 5, q)) for _ in range(4)]
            for p in ps:
                p.start()
            total = sum(q.get() for _ in ps)
            for p in ps:
                p.join()
            return total / 5

        print("intercepted HTTPS, keep-alive, 4 clients (requests/s):")
        m = https_rps(PROXIES["moat"], moat_ca)
        t = https_rps(3133, os.path.join(mitm_dir, "mitmproxy-ca-cert.pem"))
        print(f"  moat        {m:10.0f}\n  mitmproxy   {t:10.0f}\n  moat / mitmproxy {m / t:.2f}x")
    else:
        print("intercepted HTTPS: mitmdump is not installed (pip install mitmproxy); skipped")
finally:
    for p in procs:
        p.kill()
    shutil.rmtree(tmp, ignore_errors=True)
