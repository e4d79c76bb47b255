"""Drive moat's model runner with the official OpenAI SDK, as a user would.

usage: openai_client.py BASE_URL MODEL CHECK...
Each CHECK is one of: chat, stream, tools, schema, completions, models,
embeddings, concurrent, responses. Exits non-zero with the reason on the first failure.
"""
import json
import sys
import threading

import jsonschema
import openai

base, model, checks = sys.argv[1], sys.argv[2], sys.argv[3:]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
messages = [{"role": "user", "content": "Write one short sentence about the sea."}]


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


def check_chat():
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    if not text or not text.strip():
        fail(f"empty answer: {r}")
    if r.usage.completion_tokens <= 0 or r.usage.prompt_tokens <= 0:
        fail(f"usage missing: {r.usage}")
    if r.choices[0].finish_reason not in ("stop", "length"):
        fail(f"finish_reason {r.choices[0].finish_reason}")
    # The same request again: the prompt is served from the prefix cache.
    r2 = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    if r2.choices[0].message.content != text:
        fail(f"temperature 0 is not deterministic: {text!r} vs {r2.choices[0].message.content!r}")
    cached = r2.usage.prompt_tokens_details.cached_tokens
    if cached < r2.usage.prompt_tokens - 1:
        fail(f"second identical prompt reused only {cached} of {r2.usage.prompt_tokens} tokens")
    print(json.dumps({"chat": text, "cached": cached}))


def check_stream():
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, stream=True,
        stream_options={"include_usage": True}, temperature=0)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    if len(pieces) < 2:
        fail(f"the stream came in {len(pieces)} pieces")
    if finish not in ("stop", "length") or usage is None or usage.completion_tokens <= 0:
        fail(f"stream ended with finish={finish} usage={usage}")
    print(json.dumps({"stream": "".join(pieces), "completion_tokens": usage.completion_tokens}))


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]


def check_tools():
    ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    r = client.chat.completions.create(model=model, messages=ask, tools=TOOLS, tool_choice="required", max_tokens=96, temperature=0)
    calls = r.choices[0].message.tool_calls
    if not calls or r.choices[0].finish_reason != "tool_calls":
        fail(f"no tool call with tool_choice=required: {r}")
    call = calls[0]
    args = json.loads(call.function.arguments)
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(args, schema)
    # A named function, streamed: the first delta carries the id and name.
    stream = client.chat.completions.create(
        model=model, messages=ask, tools=TOOLS, max_tokens=96, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    deltas, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.tool_calls:
                deltas.extend(c.delta.tool_calls)
            if c.finish_reason:
                finish = c.finish_reason
    if not deltas or finish != "tool_calls":
        fail(f"streamed tool call: deltas={deltas} finish={finish}")
    first = deltas[0]
    if not first.id or first.function.name != "get_weather":
        fail(f"the first tool-call delta lacks its id or name: {first}")
    if any(d.id for d in deltas[1:]):
        fail("a later tool-call delta carries an id")
    streamed = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(streamed), WEATHER)
    # The call's result goes back and the model answers in text.
    follow = ask + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, tool_choice="none", max_tokens=32, temperature=0)
    if not r.choices[0].message.content:
        fail(f"no answer after the tool result: {r}")
    print(json.dumps({"tool": call.function.name, "arguments": args, "streamed": streamed}))


def check_schema():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=model, max_tokens=128, temperature=0,
        messages=[{"role": "user", "content": "Describe a fictional person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    jsonschema.validate(value, schema)
    r = client.chat.completions.create(
        model=model, max_tokens=256, temperature=0,
        messages=[{"role": "user", "content": "Give me a JSON object with one key, \"color\", and its value."}],
        response_format={"type": "json_object"})
    if r.choices[0].finish_reason != "stop":
        fail(f"json_object ran out of tokens: {r.choices[0].message.content!r}")
    if not isinstance(json.loads(r.choices[0].message.content), dict):
        fail("json_object did not give an object")
    print(json.dumps({"schema": value}))


def check_completions():
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    if not r.choices[0].text:
        fail(f"empty completion: {r}")
    print(json.dumps({"completion": r.choices[0].text}))


def check_models():
    ids = [m.id for m in client.models.list()]
    if model not in ids:
        fail(f"{model} not in the model list {ids}")
    print(json.dumps({"models": ids}))


def check_embeddings():
    r = client.embeddings.create(model=model, input=["hello world", "the sea"])
    if len(r.data) != 2 or len(r.data[0].embedding) < 64:
        fail(f"embeddings: {len(r.data)} vectors of {len(r.data[0].embedding) if r.data else 0}")
    norm = sum(x * x for x in r.data[0].embedding) ** 0.5
    if abs(norm - 1.0) > 1e-3:
        fail(f"the embedding is not normalised: {norm}")
    print(json.dumps({"embedding_length": len(r.data[0].embedding)}))


def check_concurrent():
    results, errors = {}, []

    def one(i):
        try:
            stream = client.chat.completions.create(
                model=model, max_tokens=24, stream=True, temperature=0,
                messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}])
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # noqa: BLE001 - report every failure
            errors.append(f"{i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors or len(results) != 8 or not all(results.values()):
        fail(f"8 concurrent streams: errors={errors} results={results}")
    print(json.dumps({"concurrent": len(results)}))


def check_responses():
    """The Responses API (Codex's): plain, streamed, and a required tool call."""
    r = client.responses.create(model=model, input=messages[0]["content"], max_output_tokens=24, temperature=0)
    text = r.output_text
    if not text.strip() or r.status not in ("completed", "incomplete") or r.usage.output_tokens <= 0:
        fail(f"responses: {r}")
    pieces, done = [], None
    for event in client.responses.create(model=model, input=messages, max_output_tokens=24, temperature=0, stream=True):
        if event.type == "response.output_text.delta":
            pieces.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            done = event.response
    if done is None or "".join(pieces) != done.output_text or len(pieces) < 2:
        fail(f"streamed response: pieces={pieces} done={done}")
    tool = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}
    r = client.responses.create(model=model, input="What is the weather in Paris, in celsius?", tools=[tool],
                                tool_choice="required", max_output_tokens=96, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    if not calls or not calls[0].call_id:
        fail(f"no function call with tool_choice=required: {r}")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # The call's output goes back as an item, and the model answers in text.
    follow = [{"role": "user", "content": "What is the weather in Paris, in celsius?"},
              {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}]
    r = client.responses.create(model=model, input=follow, tools=[tool], tool_choice="none", max_output_tokens=32, temperature=0)
    if not r.output_text.strip():
        fail(f"no answer after the function output: {r}")
    print(json.dumps({"responses": text, "responses_stream": "".join(pieces), "responses_tool": calls[0].name}))


for check in checks:
    globals()[f"check_{check}"]()
