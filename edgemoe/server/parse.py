"""Parsing and validation of OpenAI request bodies (no HTTP): every field of a completions
or chat request is checked here, and a bad one raises BadRequest naming it (the handler turns
it into a 4xx JSON error). UNSUPPORTED lists the OpenAI options refused unless off.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..api import MAX_TOP_LOGPROBS
from ..errors import InvalidArgument
from ..grammar import parse_response_format
from ..tool_calls import parse_tool_choice, parse_tools

MAX_STOP = 8  # stop strings per request
MAX_STOP_CHARS = 256  # each stop string is searched for after every token
MIN_TEMPERATURE = 1e-3  # below this (and above 0) logits / temperature overflows float32
MAX_TOKENS_LIMIT = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_DIGITS = re.compile(r"[0-9]{1,18}")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _show(value: Any, limit: int = 40) -> str:
    """A short rendering of a client-supplied value for an error message (containers by
    their kind only: they may be nested a thousand deep)."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**limit else f"a number with more than {limit} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = json.dumps(value[: limit + 1])
        return text if len(value) <= limit and len(text) <= limit + 2 else text[:limit] + '..."'
    return {"list": "a list", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False, label=None):
    """body[name] as a finite number within [lo, hi] ((lo, hi] when lo_open), or default when absent/null."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {_show(value)}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a finite number, got {value}", name)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        if label is None:
            left = "(" if lo_open else "["
            label = f"in {left}{lo}, {hi}]" if hi is not None else (f"> {lo}" if lo_open else f">= {lo}")
        raise BadRequest(f"'{name}' must be {label}, got {_show(value)}", name)
    return value


def check_text(text: str, param: str) -> None:
    """Strings from JSON may hold unpaired surrogates ("\\ud800"), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(
            f"'{param}' contains an unpaired UTF-16 surrogate (\\u{ord(text[e.start]):04x}) at character "
            f"{e.start}; text must be valid Unicode", param) from None


# OpenAI options this server does not implement. Each is accepted only at its "off" value, so a
# request that relies on one fails clearly instead of being answered without it.
UNSUPPORTED: dict[str, tuple[str, Any]] = {
    "suffix": ('""', lambda v: v == ""),  # fill-in-the-middle: no model edgemoe runs is trained for it
    "functions": ("[] (use 'tools')", lambda v: v == []),
    "function_call": ('"none" or "auto" (use \'tool_choice\')', lambda v: v in ("none", "auto")),
    "modalities": ('["text"]', lambda v: v == ["text"]),
    "audio": ("null", lambda v: False),
    "prediction": ("null", lambda v: False),
    "store": ("false", lambda v: v is False),  # nothing is kept after a request
    "reasoning_effort": ("null", lambda v: False),
    "verbosity": ("null", lambda v: False),
    "web_search_options": ("null", lambda v: False),
    "moderation": ("null", lambda v: False),
}
# Request metadata and caching hints that do not change the answer.
METADATA = ("user", "metadata", "service_tier", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
            "safety_identifier")
# Sampling options beyond OpenAI's, as llama.cpp and vLLM accept them; and a translation
# model's (NLLB-MoE) language codes, Engine.stream's target_lang and source_lang.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "target_lang", "source_lang")
COMMON = ("model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "response_format",
          *METADATA, *EXTENSIONS, *UNSUPPORTED)
KNOWN = {
    "completions": {"prompt", "best_of", "echo", *COMMON},
    "chat": {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
             *COMMON},
}
MAX_N = 16  # choices (n, or best_of) per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_SEQUENCES = 128  # prompts x best_of
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


def check_known(body: dict, endpoint: str) -> None:
    """Refuse a field this endpoint does not know, as OpenAI does."""
    for name in body:
        if name not in KNOWN[endpoint]:
            other = "chat" if endpoint == "completions" else "completions"
            hint = (f"; it is a parameter of /v1/{'chat/' if other == 'chat' else ''}completions"
                    if name in KNOWN[other] else "")
            raise BadRequest(f"unrecognized request argument {_show(name)}{hint}", name)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be a boolean, got {_show(value)}", name)
    return value


def parse_logit_bias(body: dict) -> dict[int, float] | None:
    """{"token id": bias in [-100, 100]} -> {id: bias} (ids are checked against the model later)."""
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, dict):
        raise BadRequest("'logit_bias' must be an object mapping token ids to numbers from -100 to 100", "logit_bias")
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' may have at most {MAX_LOGIT_BIAS} entries, got {len(bias)}", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not _DIGITS.fullmatch(key):
            raise BadRequest(f"'logit_bias' keys must be token ids (digits), got {_show(key)}", "logit_bias")
        try:
            out[int(key)] = _number(bias, key, None, -100, 100, label="in [-100, 100]")
        except BadRequest as e:
            raise BadRequest(f"'logit_bias': {e}", "logit_bias") from None
    return out


def parse_options(body: dict, default_max_tokens: int | None = None, min_tokens: int = 1) -> dict:
    """Validate OpenAI sampling fields and map them to Engine.stream keyword arguments.

    max_tokens is None when the request gives none and no default is passed: the caller
    then picks one that fits the context. min_tokens is 0 for scoring requests (echo).
    """
    for name, (off, is_off) in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not is_off(value):
            raise BadRequest(f"'{name}' is not supported by this server (only {off} is accepted)", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", "model")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOP} strings", "stop")
    for s in stop:
        check_text(s, "stop")
        if len(s) > MAX_STOP_CHARS:
            raise BadRequest(f"each 'stop' string must be at most {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("'ignore_eos' must be a boolean", "ignore_eos")
    for lang in ("target_lang", "source_lang"):  # the model checks the code itself
        if body.get(lang) is not None and not isinstance(body[lang], str):
            raise BadRequest(f"'{lang}' must be a language code (a string such as \"deu_Latn\"), got "
                             f"{_show(body[lang])}", lang)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, default_max_tokens, min_tokens, MAX_TOKENS_LIMIT, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, 10)
    if 0 < temperature < MIN_TEMPERATURE:
        raise BadRequest(f"'temperature' must be 0 (greedy) or between {MIN_TEMPERATURE} and 10, "
                         f"got {_show(temperature)}", "temperature")
    return dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=_number(body, "top_k", 0, 0, None, integer=True),
        min_p=_number(body, "min_p", 0.0, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, lo_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        logit_bias=parse_logit_bias(body),
        seed=_number(body, "seed", None, SEED_MIN, SEED_MAX, integer=True, label="in [-2**63, 2**64)"),
        stop=stop,
        ignore_eos=ignore_eos,
        target_lang=body.get("target_lang"),
        source_lang=body.get("source_lang"),
    )


@dataclass
class Plan:
    """What a request asks for beyond Engine.stream's options."""

    opts: dict  # Engine.stream keyword arguments (max_tokens None: fit to each prompt)
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    best_of: int = 1  # completions: sequences generated per prompt, of which the n likeliest are returned
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token; None: no log-probabilities
    schema: dict | None = None  # response_format as a JSON schema
    tools: list = field(default_factory=list)
    tool_choice: Any = "none"
    parallel_tool_calls: bool = True


def parse_request(body: dict, chat: bool) -> Plan:
    """Every option of a completions or chat request, checked (BadRequest names the field)."""
    check_known(body, "chat" if chat else "completions")
    echo = False if chat else _bool(body, "echo", False)
    plan = Plan(parse_options(body, min_tokens=0 if echo else 1), echo=echo)
    plan.stream, plan.include_usage = parse_stream(body)
    plan.n = plan.best_of = _number(body, "n", 1, 1, MAX_N, integer=True)
    if not chat:
        plan.best_of = _number(body, "best_of", plan.n, 1, MAX_N, integer=True)
        if plan.best_of < plan.n:
            raise BadRequest(f"'best_of' ({plan.best_of}) must be at least 'n' ({plan.n})", "best_of")
        if plan.stream and plan.best_of > plan.n:
            raise BadRequest("'best_of' greater than 'n' cannot be streamed", "best_of")
        plan.logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    else:
        want = _bool(body, "logprobs", False)
        top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not want:
            raise BadRequest("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
        plan.logprobs = (top or 0) if want else None
    try:
        plan.schema = parse_response_format(body.get("response_format"))
    except InvalidArgument as e:
        raise BadRequest(str(e), "response_format") from None
    if chat:
        try:
            plan.tools = parse_tools(body["tools"]) if body.get("tools") is not None else []
        except InvalidArgument as e:
            raise BadRequest(str(e), "tools") from None
        try:
            plan.tool_choice = parse_tool_choice(body.get("tool_choice"), plan.tools)
        except InvalidArgument as e:
            raise BadRequest(str(e), "tool_choice") from None
        plan.parallel_tool_calls = _bool(body, "parallel_tool_calls", True)
        if plan.schema is not None and plan.tools and plan.tool_choice != "none":
            raise BadRequest("'response_format' cannot be combined with 'tools' (the reply is either JSON or "
                             "tool calls); send one of them", "response_format")
    return plan


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage) from "stream" and "stream_options"."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise BadRequest("'stream_options' is only allowed with \"stream\": true", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    for key, value in options.items():
        if key == "include_obfuscation" and value is not False:  # padding against length side channels
            raise BadRequest("'stream_options.include_obfuscation' is not supported (only false is accepted)",
                             "stream_options")
        if key not in ("include_usage", "include_obfuscation"):
            raise BadRequest(f"unrecognized 'stream_options' field {_show(key)}", "stream_options")
    return stream, options.get("include_usage", False)


def _text_content(content, where: str) -> str:
    if isinstance(content, list):  # content parts: text ones only
        texts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text":
                raise BadRequest(f"{where}.content[{j}]: only text content parts are supported", "messages")
            if not isinstance(p.get("text"), str):
                raise BadRequest(f"{where}.content[{j}].text must be a string", "messages")
            texts.append(p["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts", "messages")
    check_text(content, "messages")
    return content


def _message_tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise BadRequest(f"{where}.tool_calls must be a non-empty list", "messages")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise BadRequest(f"{where}.tool_calls[{k}] must be {{\"type\": \"function\", \"id\": ..., \"function\": "
                             "{\"name\": string, \"arguments\": string}}", "messages")
        check_text(fn["name"] + fn["arguments"], "messages")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def parse_messages(body: dict) -> list[dict]:
    """Chat messages, checked, as chat templates take them: role and content, plus an
    assistant's tool_calls and a tool reply's tool_call_id (and any message's name)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"{where} needs a 'role' of system, user, assistant, developer or tool", "messages")
        msg = {"role": m["role"]}
        if m["role"] == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _message_tool_calls(m["tool_calls"], where)
            msg["content"] = "" if m.get("content") is None else _text_content(m["content"], where)
        else:
            msg["content"] = _text_content(m.get("content"), where)
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                if not isinstance(m[key], str):
                    raise BadRequest(f"{where}.{key} must be a string", "messages")
                check_text(m[key], "messages")
                msg[key] = m[key]
        out.append(msg)
    return out
