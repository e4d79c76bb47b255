"""Drive moat's model runner with the official `ollama` Python client, as the
many tools written against Ollama would.

usage: ollama_client.py HOST MODEL CHECK...
HOST is the runner's root (http://127.0.0.1:PORT). Each CHECK is one of:
version, list, show, chat, stream, generate, format, embed, ps, unload, errors.
Each prints one JSON line; the first failure exits non-zero with the reason.
"""
import json
import sys
import time

import jsonschema
import ollama

host, model, checks = sys.argv[1], sys.argv[2], sys.argv[3:]
client = ollama.Client(host=host, timeout=300)
messages = [{"role": "user", "content": "Write one short sentence about the sea."}]
options = {"temperature": 0, "num_predict": 24}


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


def check_version():
    # The client has no call for it; tools that check a minimum version GET it.
    import httpx

    version = httpx.get(f"{host}/api/version").json()["version"]
    if not version or int(version.split(".")[0]) != 0 or int(version.split(".")[1]) < 5:
        fail(f"/api/version is {version!r}")
    print(json.dumps({"version": version}))


def check_list():
    listed = client.list()
    names = [m.model for m in listed.models]
    if model not in names:
        fail(f"{model} is not in the list {names}")
    m = next(m for m in listed.models if m.model == model)
    if not m.size or m.size < 50_000_000 or not m.digest or len(m.digest) != 64 or m.modified_at is None:
        fail(f"the listed model lacks its size, digest or date: {m}")
    d = m.details
    if d.format != "gguf" or d.family != "llama" or d.quantization_level != "Q4_1" or not d.parameter_size:
        fail(f"the listed model's details: {d}")
    print(json.dumps({"list": names, "parameter_size": d.parameter_size, "size": int(m.size)}))


def check_show():
    s = client.show(model)
    if not s.template or "im_start" not in s.template:
        fail(f"show has no chat template (SmolLM2's is ChatML): {s.template!r}")
    if not s.modelfile or "FROM " not in s.modelfile:
        fail(f"show has no Modelfile: {s.modelfile!r}")
    if s.details.family != "llama" or s.details.quantization_level != "Q4_1":
        fail(f"show's details: {s.details}")
    info = s.modelinfo or {}
    if info.get("general.architecture") != "llama" or info.get("llama.context_length") != 8192:
        fail(f"show's model_info: architecture {info.get('general.architecture')!r}, "
             f"context {info.get('llama.context_length')!r}")
    if not info.get("general.parameter_count") or info["general.parameter_count"] < 100_000_000:
        fail(f"show's parameter count: {info.get('general.parameter_count')!r}")
    if "completion" not in (s.capabilities or []):
        fail(f"show's capabilities: {s.capabilities}")
    print(json.dumps({"show": {"capabilities": s.capabilities, "parameters": s.parameters,
                               "keys": len(info)}}))


def check_chat():
    r = client.chat(model=model, messages=messages, options=options)
    text = r.message.content
    if r.message.role != "assistant" or not text or not text.strip():
        fail(f"empty answer: {r}")
    if not r.done or r.done_reason not in ("stop", "length"):
        fail(f"the answer is not done: done={r.done} done_reason={r.done_reason!r}")
    if not r.prompt_eval_count or not r.eval_count or r.eval_count > 24:
        fail(f"counts: prompt_eval_count={r.prompt_eval_count} eval_count={r.eval_count}")
    if not r.total_duration or not r.eval_duration or r.total_duration < r.eval_duration:
        fail(f"durations: total={r.total_duration} eval={r.eval_duration}")
    # A conversation goes on: the answer is sent back with a new question.
    follow = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "And one about the sky."}]
    r2 = client.chat(model=model, messages=follow, options=options)
    if not r2.message.content.strip() or r2.prompt_eval_count <= r.prompt_eval_count:
        fail(f"the second turn: {r2.message.content!r}, {r2.prompt_eval_count} prompt tokens")
    # num_predict limits the answer and ends it with "length".
    r3 = client.chat(model=model, messages=messages, options={"temperature": 0, "num_predict": 2})
    if r3.done_reason != "length" or r3.eval_count != 2:
        fail(f"num_predict 2: done_reason={r3.done_reason!r} eval_count={r3.eval_count}")
    print(json.dumps({"chat": text, "done_reason": r.done_reason, "eval_count": r.eval_count,
                      "prompt_eval_count": r.prompt_eval_count}))


def check_stream():
    chunks = list(client.chat(model=model, messages=messages, options=options, stream=True))
    pieces = [c.message.content for c in chunks if not c.done and c.message.content]
    if len(pieces) < 2:
        fail(f"the stream came in {len(pieces)} pieces")
    if any(c.done for c in chunks[:-1]):
        fail("a chunk before the last is done")
    last = chunks[-1]
    if not last.done or last.done_reason not in ("stop", "length"):
        fail(f"the last chunk: done={last.done} done_reason={last.done_reason!r}")
    if not last.eval_count or not last.prompt_eval_count or not last.eval_duration:
        fail(f"the last chunk lacks its counts: {last}")
    whole = client.chat(model=model, messages=messages, options=options)
    if "".join(pieces) != whole.message.content:
        fail(f"streamed {''.join(pieces)!r} but whole {whole.message.content!r}")
    print(json.dumps({"stream": "".join(pieces), "chunks": len(chunks), "eval_count": last.eval_count}))


def check_generate():
    r = client.generate(model=model, prompt="Write one short sentence about the sea.", options=options)
    if not r.response or not r.response.strip() or not r.done or r.done_reason not in ("stop", "length"):
        fail(f"generate: {r}")
    # The same through the chat template: /api/generate is a one-turn chat.
    chat = client.chat(model=model, messages=messages, options=options)
    if chat.message.content != r.response:
        fail(f"generate {r.response!r} differs from the same chat {chat.message.content!r}")
    # raw: no template, a plain continuation.
    raw = client.generate(model=model, prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 8})
    if not raw.response:
        fail(f"raw generate: {raw}")
    streamed = list(client.generate(model=model, prompt="Write one short sentence about the sea.",
                                    options=options, stream=True))
    if "".join(c.response for c in streamed) != r.response or not streamed[-1].done:
        fail(f"streamed generate: {[c.response for c in streamed]}")
    print(json.dumps({"generate": r.response, "raw": raw.response}))


def check_format():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.chat(model=model, messages=[{"role": "user", "content": "Describe a fictional person as JSON."}],
                    format=schema, options={"temperature": 0, "num_predict": 64})
    try:
        value = json.loads(r.message.content)
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError) as e:
        fail(f"format {schema} gave {r.message.content!r} ({r.done_reason}): {e}")
    j = client.generate(model=model, format="json", options={"temperature": 0, "num_predict": 64},
                        prompt='What is the capital of France? Answer as a JSON object with the key "capital".')
    try:
        if j.done_reason != "stop":
            raise ValueError("the answer did not end by itself")
        if not isinstance(json.loads(j.response), dict):
            raise ValueError("not an object")
    except ValueError as e:
        fail(f"format json gave {j.response!r} ({j.done_reason}, {j.eval_count} tokens): {e}")
    print(json.dumps({"format": value}))


def check_embed():
    r = client.embed(model=model, input=["hello world", "the sea"])
    vectors = r.embeddings
    if len(vectors) != 2 or len(vectors[0]) < 64 or len(vectors[0]) != len(vectors[1]):
        fail(f"embed: {len(vectors)} vectors of {[len(v) for v in vectors]}")
    norm = sum(x * x for x in vectors[0]) ** 0.5
    if abs(norm - 1.0) > 1e-3:
        fail(f"the embedding is not normalised: {norm}")
    if vectors[0] == vectors[1]:
        fail("two different texts have the same embedding")
    one = client.embed(model=model, input="hello world")
    if len(one.embeddings) != 1 or max(abs(a - b) for a, b in zip(one.embeddings[0], vectors[0])) > 1e-4:
        fail("a single input does not embed as it does in a batch")
    if not r.prompt_eval_count:
        fail(f"embed has no prompt_eval_count: {r}")
    print(json.dumps({"embed": len(vectors[0]), "prompt_eval_count": r.prompt_eval_count}))


def loaded():
    return [m.model for m in client.ps().models]


def check_ps():
    client.chat(model=model, messages=messages, options={"temperature": 0, "num_predict": 2}, keep_alive="5m")
    ps = client.ps()
    entry = next((m for m in ps.models if m.model == model), None)
    if entry is None:
        fail(f"{model} is not loaded after a chat: {[m.model for m in ps.models]}")
    if not entry.size or entry.size_vram != 0 or not entry.context_length or not entry.expires_at:
        fail(f"the loaded model's entry: {entry}")
    left = entry.expires_at.timestamp() - time.time()
    if not 200 < left <= 301:
        fail(f"keep_alive 5m but the model expires in {left:.0f} s")
    print(json.dumps({"ps": [m.model for m in ps.models], "context_length": entry.context_length,
                      "size": int(entry.size)}))


def check_unload():
    client.chat(model=model, messages=messages, options={"temperature": 0, "num_predict": 2})
    if model not in loaded():
        fail(f"{model} is not loaded after a chat: {loaded()}")
    # keep_alive 0: the answer comes, then the model unloads.
    r = client.chat(model=model, messages=messages, options={"temperature": 0, "num_predict": 4}, keep_alive=0)
    if not r.message.content:
        fail(f"no answer with keep_alive 0: {r}")
    deadline = time.time() + 5
    while model in loaded():
        if time.time() > deadline:
            fail(f"{model} is still loaded 5 s after a chat with keep_alive 0: {client.ps()}")
        time.sleep(0.1)
    # An empty chat loads it again, and one with keep_alive 0 unloads it.
    r = client.chat(model=model, messages=[])
    if r.done_reason != "load" or model not in loaded():
        fail(f"an empty chat did not load the model: {r.done_reason!r}, {loaded()}")
    r = client.generate(model=model, keep_alive=0)
    if r.done_reason != "unload" or model in loaded():
        fail(f"an empty generate with keep_alive 0 did not unload: {r.done_reason!r}, {loaded()}")
    print(json.dumps({"unload": "ok"}))


def check_errors():
    try:
        client.chat(model="ai/no-such-model:1B", messages=messages)
        fail("an unknown model answered")
    except ollama.ResponseError as e:
        if e.status_code != 404 or "moat model pull" not in e.error:
            fail(f"an unknown model: {e.status_code} {e.error!r}")
        missing = e.error
    try:
        client.chat(model=model, messages=messages, options={"temperature": -1})
        fail("a negative temperature was accepted")
    except ollama.ResponseError as e:
        if e.status_code != 400 or "options.temperature" not in e.error:
            fail(f"a negative temperature: {e.status_code} {e.error!r}")
        bad = e.error
    print(json.dumps({"not_found": missing, "bad_request": bad}))


for check in checks:
    globals()[f"check_{check}"]()
