#!/usr/bin/env bash
# The Python clients the model runner's tests drive it with (the official SDKs, not hand-written
# HTTP): openai, anthropic, ollama, and jsonschema to validate structured output, in a venv at
# ${XDG_CACHE_HOME:-~/.cache}/moat/venv, created once and reused. Installs python3-venv and
# python3-pip with apt only when missing. Prints the venv's python.
set -euo pipefail
reqs=(openai==3.54.0 anthropic==2.12.0 ollama==0.6.3 jsonschema==4.26.0)
venv=${XDG_CACHE_HOME:-$HOME/.cache}/moat/venv
stamp=$venv/.moat-requirements

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${reqs[*]}" ]; then
  echo "$venv/bin/python"
  exit 0
fi

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  echo "moat: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$(dirname "$venv")"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rm -rf "$venv"
if ! python3 -m venv "$venv" >"$log" 2>&1; then
  echo "moat: cannot create a Python venv at $venv: $(tail -n 1 "$log")" >&2
  exit 1
fi
echo "moat: installing ${reqs[*]} into $venv" >&2
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "${reqs[@]}" >"$log" 2>&1; then
  echo "moat: pip install into $venv failed: $(grep -m 1 ERROR "$log" || tail -n 1 "$log")" >&2
  exit 1
fi
echo "${reqs[*]}" >"$stamp"
echo "$venv/bin/python"
