"""Tool calling through the model's chat template: tools go into the template (as
transformers passes them), and tool calls are parsed back from the output in the format
that template defines.

Formats understood (the families edgemoe runs):
- "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
  (Qwen2/Qwen3 MoE and other Hermes-style templates);
- "mistral": `[TOOL_CALLS]` then a JSON list of {"name", "arguments"} (Mixtral 8x22B
  Instruct and other Mistral templates).

A template that never reads `tools`, or whose tool-call markup is neither of these, is
refused: its model would be given tools it cannot see, or return calls we cannot parse.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgument

FORMATS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]", None),
}


def template_variables(template: str) -> set[str]:
    """Names a Jinja template reads from its context."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    except TemplateSyntaxError:
        return set()


def tool_format(tokenizer) -> str:
    """The tool-call format of a tokenizer's chat template; InvalidArgument when it has none."""
    template = tokenizer.chat_template
    source = tokenizer.chat_template_source
    if not template:
        raise InvalidArgument(f"this model has no chat template ({source}), so it cannot be given tools")
    if "tools" not in template_variables(template):
        raise InvalidArgument(f"this model's chat template ({source}) has no tool support (it never reads 'tools'); "
                              "send the request without 'tools'")
    for name, (start, _) in FORMATS.items():
        if start in template:
            return name
    raise InvalidArgument(f"this model's chat template ({source}) takes tools, but its tool-call format is not one "
                          f"edgemoe can parse (it expects {' or '.join(s for s, _ in FORMATS.values())})")


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool = True) -> str:
    """Render messages and tools with the model's chat template (Tokenizer.apply_chat_template)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt, tools=tools or None)


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message)


def parse_tools(tools: Any) -> list[dict]:
    """Validate OpenAI `tools`: a list of {"type": "function", "function": {"name", ...}}."""
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    names = set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise _bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise _bad(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise _bad(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(f"tools[{i}].function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"tools[{i}].function.description must be a string")
    return tools


def parse_tool_choice(choice: Any, tools: list[dict]) -> str | dict:
    """"none", "auto", "required" or the tool named by {"type": "function", "function": {"name"}}."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise _bad("'tool_choice' is \"required\" but no 'tools' were given")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        match = next((t for t in tools if t["function"]["name"] == name), None)
        if match is None:
            raise _bad(f"'tool_choice' names the function {name!r}, which is not among 'tools'")
        return match
    raise _bad("'tool_choice' must be \"none\", \"auto\", \"required\" or "
               "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call ({"name", "arguments"}) to any of `tools`."""
    options = []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def call_grammar(fmt: str, tools: list[dict], gtok, parallel: bool) -> str:
    """A Lark grammar (llguidance) for output that is only tool calls to `tools`."""
    from .grammar import JSON_OPTIONS

    start, end = FORMATS[fmt]
    if fmt == "hermes":
        calls = 'call ("\\n" call)*' if parallel else "call"
        schema = {**call_schema(tools), "x-guidance": JSON_OPTIONS}
        return (f"start: {calls}\n"
                f'call: {gtok.literal(start)} "\\n" args "\\n" {gtok.literal(end)}\n'
                f"args: %json {json.dumps(schema)}\n")
    array = {"type": "array", "items": call_schema(tools), "minItems": 1,  # mistral: [TOOL_CALLS] [{...}, ...]
             "x-guidance": JSON_OPTIONS}
    if not parallel:
        array["maxItems"] = 1
    return f'start: {gtok.literal(start)} " "? calls\ncalls: %json {json.dumps(array)}\n'


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI returns it
    id: str

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def _call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), "call_" + uuid.uuid4().hex[:24])


def parse_tool_calls(fmt: str, text: str) -> tuple[str, list[ToolCall]]:
    """Split model output into (content, tool calls). Output whose calls do not parse is
    content with no calls, as the model wrote it."""
    start, end = FORMATS[fmt]
    at = text.find(start)
    if at < 0:
        return text, []
    content, rest = text[:at].strip(), text[at:]
    calls: list[ToolCall] = []
    if fmt == "hermes":
        pattern = re.escape(start) + r"\s*(.*?)\s*(?:" + re.escape(end) + r"|$)"
        for m in re.finditer(pattern, rest, re.S):
            try:
                call = _call(json.loads(m.group(1)))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
    else:
        try:
            data = json.JSONDecoder().raw_decode(rest[len(start):].lstrip())[0]
        except ValueError:
            return text, []
        data = data if isinstance(data, list) else [data]
        for obj in data:
            call = _call(obj)
            if call is None:
                return text, []
            calls.append(call)
    return content, calls


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: assistant tool calls with their arguments as
    objects (transformers' convention), not the JSON text OpenAI sends."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = dict(m)
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                    if isinstance(args, dict):
                        fn["arguments"] = args
                except ValueError:
                    pass
                calls.append({**c, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out
