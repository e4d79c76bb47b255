"""A local server that speaks the part of the Hugging Face Hub's HTTP API a
model pull uses, for the end-to-end tests (no hub is reachable from here).

  GET /api/models/ORG/REPO/tree/main?recursive=true   the file list, two entries a
                                                      page, `Link: <…>; rel="next"`
  GET /ORG/REPO/resolve/main/PATH                     302 to the CDN port's /cdn/…,
                                                      as the Hub redirects to its CDN
  GET /cdn/ORG/REPO/PATH     (on CDN_PORT)            the bytes, with Range (206)

Both API routes want `Authorization: Bearer TOKEN`; the CDN's URLs are
"signed" and take none, as the Hub's are. Every request is appended to the
log file as a JSON line (method, path, range, authorization present).

  hf_hub.py PORT CDN_PORT TOKEN LOG --repo ORG/REPO=DIR … [--private ORG/REPO]
            [--cut ORG/REPO=BYTES] [--wrong-sha ORG/REPO]

--cut closes the first download of each file of that repository after
BYTES bytes;
--wrong-sha lists a SHA-256 for that repository's files that is not theirs.
"""

import argparse
import hashlib
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PAGE = 2


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Hub:
    def __init__(self, args):
        self.token = args.token
        self.log = args.log
        self.private = set(args.private)
        self.wrong_sha = set(args.wrong_sha)
        self.cut = {r: int(n) for r, _, n in (c.partition("=") for c in args.cut)}
        self.cut_done = set()
        self.cdn_port = args.cdn_port
        self.lock = threading.Lock()
        self.repos = {}
        for spec in args.repo:
            name, _, folder = spec.partition("=")
            files = []
            for root, _, names in os.walk(folder, followlinks=True):
                for n in names:
                    full = os.path.join(root, n)
                    files.append((os.path.relpath(full, folder), full))
            files.sort()
            self.repos[name] = files

    def tree(self, repo):
        out = []
        for rel, full in self.repos[repo]:
            size = os.path.getsize(full)
            entry = {"type": "file", "oid": "0" * 40, "size": size, "path": rel}
            if rel.endswith(".gguf"):
                oid = "f" * 64 if repo in self.wrong_sha else sha256(full)
                entry["lfs"] = {"oid": oid, "size": size, "pointerSize": 134}
            out.append(entry)
        return out

    def file(self, repo, rel):
        for r, full in self.repos.get(repo, []):
            if r == rel:
                return full
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None

    def log_message(self, *a):
        pass

    def record(self):
        line = {
            "method": self.command,
            "path": self.path,
            "range": self.headers.get("Range"),
            "auth": self.headers.get("Authorization") is not None,
            "port": self.server.server_address[1],
        }
        with self.hub.lock, open(self.hub.log, "a") as f:
            f.write(json.dumps(line) + "\n")

    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def error(self, status, message):
        body = json.dumps({"error": message}).encode()
        self.reply(status, body, [("Content-Type", "application/json")])

    def authorized(self, repo):
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return False
        return repo not in self.hub.private

    def do_GET(self):
        self.record()
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and parts[4:6] == ["tree", "main"]:
            return self.list_tree("/".join(parts[2:4]), parse_qs(url.query))
        if len(parts) >= 5 and parts[2:4] == ["resolve", "main"]:
            repo = "/".join(parts[:2])
            if not self.authorized(repo):
                return self.error(401, "Invalid credentials in Authorization header")
            rel = "/".join(parts[4:])
            if self.hub.file(repo, rel) is None:
                return self.error(404, "Entry not found")
            cdn = f"http://127.0.0.1:{self.hub.cdn_port}/cdn/{repo}/{rel}"
            return self.reply(302, b"", [("Location", cdn)])
        if parts[0] == "cdn" and len(parts) >= 4:
            return self.send_file("/".join(parts[1:3]), "/".join(parts[3:]))
        self.error(404, "Not found")

    def list_tree(self, repo, query):
        if repo not in self.hub.repos and repo not in self.hub.private:
            return self.error(401, "Repository not found")
        if not self.authorized(repo):
            return self.error(401, "Invalid credentials in Authorization header")
        entries = self.hub.tree(repo)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start:start + PAGE]
        headers = [("Content-Type", "application/json")]
        if start + PAGE < len(entries):
            host = self.headers.get("Host")
            nxt = f"http://{host}/api/models/{repo}/tree/main?recursive=true&cursor={start + PAGE}"
            headers.append(("Link", f'<{nxt}>; rel="next"'))
        self.reply(200, json.dumps(page).encode(), headers)

    def send_file(self, repo, rel):
        full = self.hub.file(repo, rel)
        if full is None:
            return self.error(404, "Entry not found")
        size = os.path.getsize(full)
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes="):-1])
        key = (repo, rel)
        with self.hub.lock:
            limit = self.hub.cut.get(repo) if key not in self.hub.cut_done else None
            self.hub.cut_done.add(key)
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        sent = 0
        with open(full, "rb") as f:
            f.seek(start)
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                if limit is not None and sent + len(chunk) > limit:
                    self.wfile.write(chunk[: limit - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("cdn_port", type=int)
    p.add_argument("token")
    p.add_argument("log")
    p.add_argument("--repo", action="append", default=[])
    p.add_argument("--private", action="append", default=[])
    p.add_argument("--wrong-sha", action="append", default=[])
    p.add_argument("--cut", action="append", default=[])
    args = p.parse_args()
    Handler.hub = Hub(args)
    cdn = ThreadingHTTPServer(("127.0.0.1", args.cdn_port), Handler)
    threading.Thread(target=cdn.serve_forever, daemon=True).start()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
