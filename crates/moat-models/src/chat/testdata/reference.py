"""The reference for the expected prompts in template.rs's tests.

Renders the fixtures the way transformers' `apply_chat_template` does
(Jinja2's sandbox with trim_blocks, lstrip_blocks, loop controls, and its
tojson, raise_exception and strftime_now), for the conversations the Rust
tests send after moat's polyfills. Run: python3 reference.py (needs jinja2).
"""
import json
import os

# Renders chat templates the way transformers' apply_chat_template does
# (transformers/utils/chat_template_utils.py), to produce expected strings.
from datetime import datetime, timezone
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

NOW = None
def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    def strftime_now(fmt):
        return NOW.strftime(fmt)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env

def render(template, messages, tools=None, add_generation_prompt=False, bos_token="", eos_token="", now=0, **kw):
    global NOW
    NOW = datetime.fromtimestamp(now, timezone.utc)
    t = make_env().from_string(template)
    return t.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                    bos_token=bos_token, eos_token=eos_token, **kw)

def fnv_mistral(id_):
    if len(id_) == 9 and id_.isascii() and id_.isalnum():
        return id_
    h = 0xcbf29ce484222325
    for b in id_.encode():
        h ^= b
        h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    for _ in range(9):
        out += alphabet[h % 62]; h //= 62
    return out

T = os.path.dirname(os.path.abspath(__file__)) + "/"


def tpl(name):
    return open(T + name).read()

def tpl(n): return open(T + n).read()

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name."}}, "required": ["city"]}}}
SYSTEM = {"role": "system", "content": "You are a weather bot."}
USER = {"role": "user", "content": "What is the weather in Paris?"}
def assistant_call(id_="call_w1"):
    return {"role": "assistant", "content": "", "tool_calls": [{"id": id_, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
def tool_msg(id_="call_w1"):
    return {"role": "tool", "content": "{\"temperature\": 18, \"sky\": \"clear\"}", "tool_call_id": id_}
CONV = [SYSTEM, USER, assistant_call(), tool_msg()]

def tools_prompt(shape):
    return ("You can call the following tools. Each is described by a JSON object with its name, what it does and the JSON Schema of its arguments:\n"
            + json.dumps(TOOL["function"], ensure_ascii=False) + "\n"
            + "\nTo call a tool, answer with only this and nothing else: " + shape)
GENERIC_SHAPE = "{\"name\": <tool name>, \"arguments\": <arguments as a JSON object>}"
GENERIC_CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})

out = {}
out["qwen_tools"] = render(tpl("qwen2.5.jinja"), CONV, tools=[TOOL], add_generation_prompt=True)
out["qwen_plain"] = render(tpl("qwen2.5.jinja"), [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}], add_generation_prompt=True)
out["llama_tools"] = render(tpl("llama3.1.jinja"), CONV, tools=[TOOL], add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
out["llama_plain"] = render(tpl("llama3.1.jinja"), [SYSTEM, {"role": "user", "content": "  Hi  "}], add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
mid = fnv_mistral("call_w1")
out["mistral_id"] = mid
out["mistral_tools"] = render(tpl("mistral-v0.3.jinja"), [SYSTEM, USER, assistant_call(mid), tool_msg(mid)], tools=[TOOL], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
out["mistral_plain"] = render(tpl("mistral-v0.3.jinja"), [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Bye"}], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
# SmolLM2: no tools in the template -> tools in the system prompt, calls as generic JSON, tool role kept.
out["smollm2_tools"] = render(tpl("smollm2.jinja"), [
    {"role": "system", "content": "You are a weather bot.\n\n" + tools_prompt(GENERIC_SHAPE)}, USER,
    {"role": "assistant", "content": GENERIC_CALL}, tool_msg()], add_generation_prompt=True)
out["smollm2_plain"] = render(tpl("smollm2.jinja"), [{"role": "user", "content": "Hello\nthere"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Bye"}], add_generation_prompt=True)
# Gemma 3: no tool role either -> the result becomes a user turn.
out["gemma_tools"] = render(tpl("gemma3.jinja"), [
    {"role": "system", "content": "You are a weather bot.\n\n" + tools_prompt(GENERIC_SHAPE)}, USER,
    {"role": "assistant", "content": GENERIC_CALL},
    {"role": "user", "content": json.dumps({"tool_response": {"tool": "get_weather", "content": {"temperature": 18, "sky": "clear"}}})}],
    add_generation_prompt=True, bos_token="<bos>")
out["gemma_plain"] = render(tpl("gemma3.jinja"), [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}], add_generation_prompt=True, bos_token="<bos>")
CHATML = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
out["chatml"] = render(CHATML, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=True)
HELPERS = tpl('helpers.jinja')
out["helpers"] = render(HELPERS, [{"role": "user", "content": "  hello big world "}, {"role": "user", "content": "skip me"}, {"role": "user", "content": "now stop"}, {"role": "user", "content": "never"}],
    extra_map={"a": "b", "z": 1}, now=1721995200 + 3600*13 + 60*5)

# Llama 3.1 refuses two calls in one turn: moat splits the turn.
def call(id_, city):
    return {"id": id_, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
split = [{"role": "user", "content": "Weather in Paris and Rome?"},
         {"role": "assistant", "content": "", "tool_calls": [call("c1", "Paris")]},
         {"role": "assistant", "content": "", "tool_calls": [call("c2", "Rome")]},
         {"role": "tool", "content": "18", "tool_call_id": "c1"},
         {"role": "tool", "content": "21", "tool_call_id": "c2"}]
out2 = {"llama_parallel": render(tpl("llama3.1.jinja"), split, tools=[TOOL], add_generation_prompt=True, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")}
out.update(out2)

for name, text in out.items():
    print("=====", name)
    print(text)
