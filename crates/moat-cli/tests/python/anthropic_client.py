"""Drive moat's model runner with the official Anthropic SDK, as Claude Code's
users would point it at a local model.

usage: anthropic_client.py BASE_URL MODEL CHECK...
BASE_URL is the runner's root (http://127.0.0.1:PORT); the SDK adds /v1/messages.
Each CHECK is one of: messages, stream, tools, structured, count_tokens,
prefix, errors.
Each prints one JSON line; the first failure exits non-zero with the reason.
"""
import json
import sys

import anthropic
import jsonschema

base, model, checks = sys.argv[1], sys.argv[2], sys.argv[3:]


def make_client(url):
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=300)


client = make_client(base)
# This SDK has no `temperature` argument (the API still takes the field):
# greedy decoding, so that answers can be compared.
T0 = {"temperature": 0}
messages = [{"role": "user", "content": "Write one short sentence about the sea."}]


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def check_messages():
    r = client.messages.create(model=model, max_tokens=24, extra_body=T0, messages=messages,
                               system="You answer briefly.")
    if r.type != "message" or r.role != "assistant" or not r.id.startswith("msg_"):
        fail(f"not an assistant message: {r}")
    if r.model != model:
        fail(f"the message names the model {r.model!r}, not {model!r}")
    text = text_of(r)
    if not text.strip():
        fail(f"empty answer: {r}")
    if r.stop_reason not in ("end_turn", "max_tokens"):
        fail(f"stop_reason {r.stop_reason!r}")
    if r.usage.input_tokens <= 0 or r.usage.output_tokens <= 0:
        fail(f"usage missing: {r.usage}")
    if r.usage.output_tokens > 24:
        fail(f"{r.usage.output_tokens} output tokens with max_tokens=24")
    # A one-token limit ends with max_tokens.
    short = client.messages.create(model=model, max_tokens=1, extra_body=T0, messages=messages)
    if short.stop_reason != "max_tokens" or short.usage.output_tokens != 1:
        fail(f"max_tokens=1 ended with {short.stop_reason!r} after {short.usage.output_tokens} tokens")
    again = client.messages.create(model=model, max_tokens=24, extra_body=T0, messages=messages,
                                   system="You answer briefly.")
    if text_of(again) != text:
        fail(f"temperature 0 is not deterministic: {text!r} vs {text_of(again)!r}")
    # A stop sequence (the answer's third word) cuts the answer before it.
    words = text.split()
    if len(words) < 3:
        fail(f"the answer is too short to try a stop sequence on: {text!r}")
    stop = " " + words[2]
    cut = client.messages.create(model=model, max_tokens=24, extra_body=T0, messages=messages,
                                 system="You answer briefly.", stop_sequences=[stop])
    if text_of(cut) != text[:text.index(stop)]:
        fail(f"stop_sequences [{stop!r}] gave {text_of(cut)!r} from {text!r}")
    if cut.stop_reason == "max_tokens":
        fail(f"a stop sequence ended with {cut.stop_reason!r}")
    print(json.dumps({"messages": text, "stop_reason": r.stop_reason, "cut": text_of(cut), "cut_reason": cut.stop_reason,
                      "input_tokens": r.usage.input_tokens, "output_tokens": r.usage.output_tokens}))


def check_stream():
    pieces, events = [], []
    with client.messages.stream(model=model, max_tokens=24, extra_body=T0, messages=messages) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "text":
                pieces.append(event.text)
        final = stream.get_final_message()
    if len(pieces) < 2:
        fail(f"the stream came in {len(pieces)} text pieces")
    if events[0] != "message_start" or events[-1] != "message_stop":
        fail(f"events out of order: {events}")
    if "".join(pieces) != text_of(final):
        fail(f"the final message {text_of(final)!r} is not the deltas {''.join(pieces)!r}")
    if final.stop_reason not in ("end_turn", "max_tokens"):
        fail(f"the stream ended with stop_reason {final.stop_reason!r}")
    if final.usage.output_tokens <= 0 or final.usage.input_tokens <= 0:
        fail(f"the final message has no usage: {final.usage}")
    # The same request, whole: the same answer.
    whole = client.messages.create(model=model, max_tokens=24, extra_body=T0, messages=messages)
    if text_of(whole) != text_of(final):
        fail(f"streamed {text_of(final)!r} but whole {text_of(whole)!r}")
    print(json.dumps({"stream": "".join(pieces), "pieces": len(pieces),
                      "output_tokens": final.usage.output_tokens}))


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
    {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER},
    {"name": "get_time", "description": "The time in a city",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def tool_uses(message):
    return [b for b in message.content if b.type == "tool_use"]


def validate(use):
    schema = next(t["input_schema"] for t in TOOLS if t["name"] == use.name)
    try:
        jsonschema.validate(use.input, schema)
    except jsonschema.ValidationError as e:
        fail(f"the input of {use.name} does not follow its schema: {use.input}: {e.message}")


def check_tools():
    r = client.messages.create(model=model, max_tokens=96, extra_body=T0, messages=ASK,
                               tools=TOOLS, tool_choice={"type": "any"})
    uses = tool_uses(r)
    if not uses or r.stop_reason != "tool_use":
        fail(f"no tool_use with tool_choice any: {r}")
    use = uses[0]
    if not use.id.startswith("toolu_") or use.name not in ("get_weather", "get_time"):
        fail(f"a tool_use without its id or a known name: {use}")
    validate(use)
    # A named tool, streamed: the input arrives as input_json_delta.
    with client.messages.stream(model=model, max_tokens=96, extra_body=T0, messages=ASK, tools=TOOLS,
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        json_deltas = [e for e in stream if e.type == "input_json"]
        streamed = stream.get_final_message()
    streamed_uses = tool_uses(streamed)
    if not json_deltas or not streamed_uses or streamed.stop_reason != "tool_use":
        fail(f"streamed tool use: {len(json_deltas)} json deltas, message {streamed}")
    if streamed_uses[0].name != "get_weather":
        fail(f"tool_choice named get_weather but the model used {streamed_uses[0].name}")
    validate(streamed_uses[0])
    # The result goes back in a user turn; the model answers in text.
    follow = ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}]},
    ]
    answer = client.messages.create(model=model, max_tokens=32, extra_body=T0, messages=follow,
                                    tools=TOOLS, tool_choice={"type": "none"})
    if tool_uses(answer) or not text_of(answer).strip() or answer.stop_reason == "tool_use":
        fail(f"no text answer after the tool result: {answer}")
    print(json.dumps({"tool": use.name, "input": use.input, "streamed": streamed_uses[0].input,
                      "answer": text_of(answer)}))


def check_count_tokens():
    counted = client.messages.count_tokens(model=model, messages=messages)
    r = client.messages.create(model=model, max_tokens=4, extra_body=T0, messages=messages)
    if counted.input_tokens <= 0 or counted.input_tokens != r.usage.input_tokens:
        fail(f"count_tokens says {counted.input_tokens}, the message used {r.usage.input_tokens}")
    # (SmolLM2's template puts in a system prompt of its own when none is
    # given, so a short one can count fewer tokens than none.)
    short = "You answer briefly."
    with_system = client.messages.count_tokens(model=model, messages=messages, system=short)
    answered = client.messages.create(model=model, max_tokens=4, extra_body=T0, messages=messages, system=short)
    if with_system.input_tokens != answered.usage.input_tokens:
        fail(f"with a system prompt, count_tokens says {with_system.input_tokens}, "
             f"the message used {answered.usage.input_tokens}")
    longer = client.messages.count_tokens(
        model=model, messages=messages, system=short + " You are a sailor who answers in rhymes.")
    if longer.input_tokens <= with_system.input_tokens:
        fail(f"a longer system prompt did not add tokens: {longer.input_tokens} vs {with_system.input_tokens}")
    with_tools = client.messages.count_tokens(model=model, messages=ASK, tools=TOOLS)
    without_tools = client.messages.count_tokens(model=model, messages=ASK)
    if with_tools.input_tokens <= without_tools.input_tokens:
        fail(f"tools did not add tokens: {with_tools.input_tokens} vs {without_tools.input_tokens}")
    print(json.dumps({"count_tokens": counted.input_tokens, "with_system": with_system.input_tokens,
                      "with_tools": with_tools.input_tokens, "without_tools": without_tools.input_tokens}))


def check_structured():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "Describe a fictional person as JSON."}]
    r = client.messages.create(model=model, max_tokens=128, extra_body=T0, messages=ask,
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    try:
        value = json.loads(text_of(r))
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError) as e:
        fail(f"output_config.format gave {text_of(r)!r}: {e}")
    # The SDK's own way: a Pydantic type, turned into a schema and parsed back.
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        country: str

    parsed = client.messages.parse(model=model, max_tokens=64, extra_body=T0, output_format=City,
                                   messages=[{"role": "user", "content": "Name a city in France."}])
    city = parsed.parsed_output
    if not isinstance(city, City):
        fail(f"messages.parse gave no City: {parsed}")
    print(json.dumps({"structured": value, "city": city.model_dump()}))


def check_prefix():
    # Claude Code's ANTHROPIC_BASE_URL style: the API under /anthropic.
    prefixed = make_client(base.rstrip("/") + "/anthropic")
    r = prefixed.messages.create(model=model, max_tokens=24, extra_body=T0, messages=messages)
    plain = client.messages.create(model=model, max_tokens=24, extra_body=T0, messages=messages)
    if not text_of(r).strip() or text_of(r) != text_of(plain):
        fail(f"/anthropic/v1 answered {text_of(r)!r}, /v1 {text_of(plain)!r}")
    counted = prefixed.messages.count_tokens(model=model, messages=messages)
    if counted.input_tokens != r.usage.input_tokens:
        fail(f"/anthropic/v1 count_tokens {counted.input_tokens} vs {r.usage.input_tokens}")
    print(json.dumps({"prefix": text_of(r)}))


def check_errors():
    try:
        client.messages.create(model="ai/no-such-model:1B", max_tokens=8, messages=messages)
        fail("an unknown model answered")
    except anthropic.NotFoundError as e:
        if e.body.get("type") != "error" or e.body["error"].get("type") != "not_found_error":
            fail(f"the 404 is not in Anthropic's error shape: {e.body}")
        if "moat model pull" not in e.body["error"]["message"]:
            fail(f"the 404 does not say how to get the model: {e.body}")
        missing = e.body["error"]["message"]
    try:
        client.messages.create(model=model, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
        fail("an image block was accepted by a text model")
    except anthropic.BadRequestError as e:
        if "messages[0].content[0].type" not in e.body["error"]["message"]:
            fail(f"the 400 does not name the field: {e.body}")
        bad = e.body["error"]["message"]
    print(json.dumps({"not_found": missing, "bad_request": bad}))


for check in checks:
    globals()[f"check_{check}"]()
