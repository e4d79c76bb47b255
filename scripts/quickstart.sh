#!/usr/bin/env bash
# The main job on a fresh machine: install what moat needs, build it, and run
# a command in a sandbox on the sample workspace (examples/hello). The first
# run builds the `shell` template from Debian's packages (about a minute) and
# caches it under ~/.cache/moat.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --quiet
moat=target/release/moat
ws=$(pwd)/examples/hello
$moat sandbox rm quickstart >/dev/null 2>&1 || true
$moat sandbox create --name quickstart shell "$ws"
$moat sandbox exec quickstart python3 hello.py
$moat sandbox ls
$moat sandbox rm quickstart >/dev/null
