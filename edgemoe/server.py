"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (with SSE
streaming), /v1/models, /v1/models/{id} and /health.

Every parameter of OpenAI's completions and chat APIs is implemented or refused with a 400
naming it (UNSUPPORTED; unknown fields too, as OpenAI does): log-probabilities with top
alternatives, echo with prompt scoring (max_tokens 0, what lm-eval's loglikelihood tasks
send), batches of prompts (strings or token-id lists), n and best_of, presence/frequency
penalties and logit_bias, stream_options.include_usage, response_format (JSON object or
JSON schema, by constrained decoding: edgemoe.grammar), and tools through the model's
chat template (edgemoe.tool_calls). An unknown model name is a 404.

The engine is injected, so tests drive a real server over HTTP. Requests share the
engine's batch scheduler (edgemoe.batching), as llama-server's parallel slots do: the
engine has `parallel` slots (edgemoe serve --parallel N; each keeps a KV cache of the
context size, all inside the memory budget); every sequence of a request (prompts x n)
is queued at once, a free slot admits the oldest waiting one and prefills it, and all
admitted sequences share each decode step. Sampling, stop strings, max_tokens and
log-probabilities stay per sequence; a sequence that ends, or whose client leaves, frees
its slot for the next one waiting.

Every request gets an HTTP answer: bad input is a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}), a bug is a JSON 500 (its traceback goes
to the server log, never to the client), and an error after a stream has started is sent
as a final SSE event. Prompts are tokenized before generation so that prompt plus
max_tokens can be checked against the model's context. A client that disconnects stops
its generation at the next token (or never starts it, if it was still waiting for a
slot); connections time out when idle and their number is capped.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import unquote

from .api import MAX_TOP_LOGPROBS, Engine
from .errors import EdgeMoEError, InvalidArgument
from .generate import GenerationResponse, GenerationStats, TokenLogprob, _hold_back
from .grammar import Grammar, GrammarTokenizer, json_schema_grammar, lark_grammar, parse_response_format
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .tool_calls import (FORMATS, ToolCall, call_grammar, parse_tool_calls, parse_tool_choice, parse_tools,
                         render_chat, template_messages, tool_format)

log = logging.getLogger("edgemoe.server")

MAX_BODY = 4 * 1024 * 1024
MAX_STOP = 8  # stop strings per request
MAX_STOP_CHARS = 256  # each stop string is searched for after every token
MIN_TEMPERATURE = 1e-3  # below this (and above 0) logits / temperature overflows float32
MAX_TOKENS_LIMIT = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 64
LINGER_S = 5.0  # after an error that left a body unread: how long to drain it before closing
LOCK_POLL_S = 0.2  # how often a request waiting for a slot checks that its client is still there (batching.POLL_S)

GET_PATHS = ("/health", "/v1/health", "/v1/models")
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{id}
POST_PATHS = ("/v1/completions", "/v1/chat/completions")
ALLOW_ALL = "GET, HEAD, POST"
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
# Sampling options beyond OpenAI's, as llama.cpp and vLLM accept them.
EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos")
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


@dataclass
class Job:
    """One prompt of a request."""

    ids: list[int]
    text: str  # the prompt as text (what echo returns)
    max_tokens: int


def ScoreOnly(job: Job) -> GenerationResponse:
    """The answer for echo with max_tokens 0 and no log-probabilities: nothing to run."""
    return GenerationResponse("", None, "length", GenerationStats(prompt_tokens=len(job.ids)))


class Output:
    """One generated sequence, gathered from its responses."""

    def __init__(self, prompt: int, job: Job):
        self.prompt, self.job = prompt, job
        self.pieces: list[tuple[str, int | None]] = []  # (text, token) per response
        self.tokens: list[int] = []  # tokens with log-probabilities (all, when they were asked for)
        self.entries: list[TokenLogprob] = []
        self.prompt_entries: list[TokenLogprob | None] | None = None
        self.finish_reason, self.stats, self.generated = None, None, 0

    def add(self, r: GenerationResponse) -> None:
        self.pieces.append((r.text, r.token))
        if r.logprobs is not None:
            self.entries.append(r.logprobs)
            self.tokens.append(r.token)
        if r.prompt_logprobs is not None:
            self.prompt_entries = r.prompt_logprobs
        if r.finish_reason is not None:
            self.finish_reason, self.stats, self.generated = r.finish_reason, r.stats, r.stats.generated_tokens

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


class ToolContext:
    """Tools of a chat request: the template's call format and, for tool_choice "required"
    or a named function, the tools the output is constrained to call."""

    def __init__(self, tokenizer, fmt: str, plan: Plan):
        self.fmt = fmt
        self.marker = FORMATS[fmt][0]
        # A marker that is a special token vanishes from decoded text: it is put back by id.
        tid = tokenizer.token_to_id(self.marker)
        self.marker_id = tid if tid is not None and tokenizer.decode([tid]) == "" else None
        choice = plan.tool_choice
        self.forced = plan.tools if choice == "required" else [choice] if isinstance(choice, dict) else None

    def piece(self, text: str, token: int | None) -> str:
        return self.marker + text if token is not None and token == self.marker_id else text

    def parse(self, pieces: list[tuple[str, int | None]]) -> tuple[str, list[ToolCall]]:
        return parse_tool_calls(self.fmt, "".join(self.piece(t, k) for t, k in pieces))

    def stream_filter(self) -> "ToolStreamFilter":
        return ToolStreamFilter(self)


class ToolStreamFilter:
    """Streams content until the tool-call marker appears (holding back text that may
    begin it), then buffers the rest to parse as calls at the end."""

    def __init__(self, tools: ToolContext):
        self.tools = tools
        self.raw = ""  # all output, markers included
        self.sent = 0  # characters of raw already streamed as content
        self.buffering = tools.forced is not None  # constrained output is calls only

    def feed(self, text: str, token: int | None) -> str:
        self.raw += self.tools.piece(text, token)
        if self.buffering:
            return ""
        at = self.raw.find(self.tools.marker, self.sent)
        if at >= 0:
            self.buffering = True
            end = at
        else:
            end = len(self.raw) - _hold_back(self.raw[self.sent:], [self.tools.marker])
        out, self.sent = self.raw[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, parsed calls)."""
        _, calls = parse_tool_calls(self.tools.fmt, self.raw)
        if calls:
            return "", calls
        rest, self.sent = self.raw[self.sent :], len(self.raw)
        return rest, []


class ClientGone(Exception):
    """The client closed its connection (or the server is stopping): drop the request."""


class Handler(BaseHTTPRequestHandler):
    server: "EdgeMoEServer"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # SSE chunks and small JSON answers go out at once

    # Per-request state, reset by handle_one_request.
    _responded = False  # a status line has been sent
    _sse = False  # ...and it started an event stream
    _body_unread = False  # the request has body bytes we did not read: close after answering
    _linger = False  # on close, drain what the client is still sending so it can read our answer

    def setup(self):
        self.timeout = self.server.request_timeout  # socket timeout: StreamRequestHandler.setup applies it
        super().setup()

    def log_message(self, fmt, *args):  # keep the console quiet unless asked
        if self.server.verbose:
            super().log_message(fmt, *args)

    # -- plumbing

    def send_response(self, code, message=None):
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # always answer with a status line and headers
        self._responded = True
        super().send_response(code, message)

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self._body_unread or self.close_connection or status >= 500:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    @staticmethod
    def _error_body(message: str, param: str | None, kind: str, code: str | None) -> dict:
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}

    def _error(self, status: int, message: str, param: str | None = None, kind: str | None = None,
               code: str | None = None, headers: dict | None = None) -> None:
        kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self._send_json(status, self._error_body(message, param, kind, code), headers)

    def _fail(self, status: int, message: str, param: str | None = None, kind: str | None = None,
              code: str | None = None) -> None:
        """Report an error whatever state the response is in."""
        if status >= 500:
            self.close_connection = True
        if not self._responded:
            self._error(status, message, param, kind, code)
            return
        self.close_connection = True  # a half-sent response cannot be followed by another
        if self._sse:
            kind = kind or ("invalid_request_error" if status < 500 else "server_error")
            event = json.dumps(self._error_body(message, param, kind, code))
            self.wfile.write(f"data: {event}\n\n".encode())
            self.wfile.flush()

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, oversized headers, ...), as JSON."""
        self._body_unread = self._linger = True  # whatever follows a broken request is not read
        self.close_connection = True
        if message is None:
            message = self.responses.get(code, ("error",))[0]
        message = message if len(message) <= 300 else message[:297] + "..."
        self.log_error("code %d, message %s", code, message)
        kind = "not_found_error" if code == 404 else None
        self._error(int(code), message, kind=kind)

    def handle_one_request(self):
        self._responded = self._sse = False
        self._body_unread = False
        try:
            for _ in range(8):  # RFC 9112: ignore empty lines before a request line
                self.raw_requestline = self.rfile.readline(65537)
                if self.raw_requestline not in (b"\r\n", b"\n"):
                    break
        except (TimeoutError, ConnectionError):  # idle keep-alive connection, or the client left
            self.close_connection = True
            return
        if not self.raw_requestline:
            self.close_connection = True
            return
        try:
            if len(self.raw_requestline) > 65536:
                self.requestline, self.request_version, self.command = "", "", ""
                self.send_error(414, "request line too long")
                return
            if not self.parse_request():
                if not self._responded:  # a request line of blanks: parse_request sends nothing
                    self.send_error(400, "empty request line")
                self._linger = True
                return
            self._dispatch()
            self.wfile.flush()
        except ClientGone:
            self.close_connection = True
            log.info("%s: client disconnected; request dropped", self.address_string())
        except BadRequest as e:
            self._answer_error(e.status, str(e), e.param, code=e.code)
        except InvalidArgument as e:
            self._answer_error(400, str(e))
        except EdgeMoEError as e:  # a model or store problem met while generating: not the client's fault
            log.error("%s %s: %s", self.command, _show(self.path, 200), e)
            self._answer_error(500, str(e))
        except TimeoutError:
            self._answer_error(408, f"request not received within {self.server.request_timeout:g} s of inactivity")
        except ConnectionError:  # broken pipe, reset: nobody left to answer
            self.close_connection = True
        except Exception as e:
            log.exception("internal error on %s %s", self.command, _show(self.path, 200))
            self._answer_error(500, f"internal server error ({type(e).__name__}); the server log has the details")
        finally:
            if self._body_unread:
                self.close_connection = self._linger = True

    def _answer_error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        try:
            self._fail(status, message, param, code=code)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def finish(self):
        try:
            super().finish()
        finally:
            if self._linger:
                self._drain()

    def _drain(self) -> None:
        """Close our side, then read what the client is still sending (an oversized body after
        a 413, ...) until it closes: closing with unread data would reset the connection and
        the client could lose our answer."""
        sock = self.connection
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(1.0)
            deadline, left = time.monotonic() + LINGER_S, 16 * MAX_BODY
            while left > 0 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    # -- connection state

    def client_gone(self) -> bool:
        """Whether the client has closed its connection (or the server is stopping). A
        readable socket whose peek returns no bytes is at end of file. (A client that only
        half-closes, shutdown(SHUT_WR) after its request, looks the same and is dropped too.)"""
        if self.server.stopping:
            return True
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN | select.POLLPRI)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- routes

    def _dispatch(self) -> None:
        if self.request_version == "HTTP/0.9":
            raise BadRequest("HTTP/0.9 requests are not supported")
        te = self.headers.get_all("Transfer-Encoding") or []
        cl = self.headers.get_all("Content-Length") or []
        self._body_unread = bool(te) or any(v.strip() != "0" for v in cl)
        path = self.path.split("?", 1)[0]
        model_path = path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX)
        allow = "GET, HEAD" if path in GET_PATHS or model_path else "POST" if path in POST_PATHS else None
        if self.command not in ("GET", "HEAD", "POST"):
            allowed = allow or ALLOW_ALL
            return self._error(405, f"method {_show(self.command)} is not allowed on {_show(path, 100)}; "
                                    f"use {allowed}", headers={"Allow": allowed})
        if allow is None:
            return self._error(404, f"unknown path {_show(path, 100)}", kind="not_found_error")
        if self.command not in allow:
            return self._error(405, f"{path} accepts {allow}, not {self.command}", headers={"Allow": allow})
        if path in ("/health", "/v1/health"):
            return self._send_json(200, {"status": "ok"})
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
        if model_path:
            self._check_model(unquote(path[len(MODEL_PREFIX):]), "model")
            return self._send_json(200, self.server.model_card())
        body = self._body()
        if path == "/v1/completions":
            self._completions(body)
        else:
            self._chat(body)

    def _body(self) -> dict:
        if self.headers.get_all("Transfer-Encoding"):
            raise BadRequest("chunked request bodies are not supported; send a Content-Length header", status=411)
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            raise BadRequest(f"Content-Encoding {_show(encoding)} is not supported; send plain JSON", status=415)
        values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        if not values:  # an HTTP/1.0-style body would run to the end of the connection: close it
            self._body_unread = True
            raise BadRequest("request body is empty; send a JSON object with a Content-Length header", status=411)
        if len(set(values)) != 1 or not _DIGITS.fullmatch(values[0]):
            raise BadRequest(f"invalid Content-Length header {_show(', '.join(values))}")
        length = int(values[0])
        if length == 0:
            raise BadRequest("request body is empty; send a JSON object")
        if length > MAX_BODY:
            raise BadRequest(f"request body too large ({length} bytes; limit {MAX_BODY} bytes)", status=413)
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise BadRequest(f"request body ended after {len(raw)} of {length} bytes")
        self._body_unread = False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
        try:
            body = json.loads(text)
        except RecursionError:
            raise BadRequest("request body is not valid JSON: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, or an integer with too many digits
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    def _check_model(self, model: str | None, param: str = "model") -> None:
        """An unknown model name is a 404, as OpenAI answers it."""
        if model is not None and model != self.server.model_name:
            raise BadRequest(f"the model {_show(model, 100)} does not exist; this server serves "
                             f"{_show(self.server.model_name, 100)} (GET /v1/models)", param, status=404,
                             code="model_not_found")

    def _completions(self, body: dict) -> None:
        plan = parse_request(body, chat=False)  # cheap checks before the tokenizer runs
        self._check_model(body.get("model"))
        jobs = self._prompts(body.get("prompt"), plan)
        self._check_bias(plan)
        self._run(plan, jobs, chat=False, constraint=self._constraint(plan, None))

    def _chat(self, body: dict) -> None:
        plan = parse_request(body, chat=True)
        self._check_model(body.get("model"))
        messages = parse_messages(body)
        engine = self.server.engine
        tools = None
        if plan.tools and plan.tool_choice != "none":
            try:
                tools = ToolContext(engine.tokenizer, tool_format(engine.tokenizer), plan)
                text = render_chat(engine.tokenizer, template_messages(messages), plan.tools)
            except InvalidArgument as e:
                raise BadRequest(str(e), "tools") from None
            ids = engine.tokenizer.encode(text, add_special_tokens=False)  # the template holds any BOS
        else:
            try:
                ids = engine.chat_prompt(template_messages(messages))
            except EdgeMoEError as e:
                raise BadRequest(str(e), "messages") from None
        self._check_bias(plan)
        job = Job(ids, "", self._fit_context(plan.opts["max_tokens"], len(ids), "messages"))
        self._run(plan, [job], chat=True, constraint=self._constraint(plan, tools), tools=tools)

    def _prompts(self, prompt, plan: Plan) -> list["Job"]:
        """The prompts of a completions request: a string, a list of token ids, or a list of
        either (a batch). Each is checked against the context."""
        engine = self.server.engine

        def is_ids(p) -> bool:
            return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

        batch = prompt if isinstance(prompt, list) and prompt and not is_ids(prompt) else [prompt]
        if len(batch) > MAX_PROMPTS:
            raise BadRequest(f"'prompt' may hold at most {MAX_PROMPTS} prompts, got {len(batch)}", "prompt")
        if len(batch) * plan.best_of > MAX_SEQUENCES:
            raise BadRequest(f"{len(batch)} prompts x {plan.best_of} choices is more than {MAX_SEQUENCES} "
                             "sequences in one request", "best_of" if plan.best_of > 1 else "n")
        jobs = []
        for p in batch:
            if is_ids(p):
                if max(p) >= engine.vocab_limit or min(p) < 0:
                    raise BadRequest(f"'prompt' token ids must be in [0, {engine.vocab_limit})", "prompt")
                ids, text = list(p), engine.tokenizer.decode(list(p), skip_special_tokens=False) if plan.echo else ""
            elif isinstance(p, str) and p:
                check_text(p, "prompt")
                ids, text = engine.tokenizer.encode(p), p
            else:
                raise BadRequest("'prompt' must be a non-empty string, a list of token ids, or a list of "
                                 "either", "prompt")
            jobs.append(Job(ids, text, self._fit_context(plan.opts["max_tokens"], len(ids), "prompt")))
        return jobs

    def _check_bias(self, plan: Plan) -> None:
        bias = plan.opts["logit_bias"]
        if bias and max(bias) >= self.server.engine.vocab_limit:
            raise BadRequest(f"'logit_bias' token id {max(bias)} is not in this model's vocabulary "
                             f"(0 to {self.server.engine.vocab_limit - 1})", "logit_bias")

    def _constraint(self, plan: Plan, tools: "ToolContext | None"):
        """A function returning fresh logits processors for one sequence (constrained
        decoding), or None when the request has no constraint."""
        grammar = None
        try:
            if plan.schema is not None:
                grammar = Grammar(self.server.grammar_tokenizer(), json_schema_grammar(plan.schema),
                                  "response_format")
            elif tools is not None and tools.forced is not None:
                gtok = self.server.grammar_tokenizer()
                grammar = Grammar(gtok, lark_grammar(call_grammar(tools.fmt, tools.forced, gtok,
                                                                  plan.parallel_tool_calls)), "tools")
        except InvalidArgument as e:
            raise BadRequest(str(e), "tools" if plan.schema is None else "response_format") from None
        if grammar is None:
            return None
        if plan.opts["ignore_eos"]:  # a finished grammar allows only end of sequence
            raise BadRequest("'ignore_eos' cannot be combined with constrained output ('response_format' or "
                             "'tool_choice' \"required\" or a named function)", "ignore_eos")
        return lambda: [grammar.processor()]

    def _fit_context(self, max_tokens: int | None, n_prompt: int, param: str) -> int:
        """Check prompt + max_tokens against the context (or choose max_tokens to fit)."""
        engine, ctx = self.server.engine, self.server.engine.ctx_size
        if n_prompt < 1:
            raise BadRequest(f"'{param}' encodes to no tokens", param)
        if max_tokens is None:
            room = ctx - n_prompt
            if room < 1:
                raise BadRequest(f"the prompt is {n_prompt} tokens, which leaves no room to generate in the "
                                 f"model's context of {ctx} tokens", param, code="context_length_exceeded")
            max_tokens = min(self.server.default_max_tokens, room)
        try:
            engine.check_context(n_prompt, max_tokens)
        except EdgeMoEError:  # the engine's message speaks to its operator (--ctx-size); this one to the client
            raise BadRequest(f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) is more than the model's "
                             f"context of {ctx} tokens; shorten the prompt or lower max_tokens",
                             "max_tokens" if n_prompt < ctx else param, code="context_length_exceeded") from None
        return max_tokens

    def _sequences(self, plan: Plan, jobs: list["Job"], constraint) -> Iterator[tuple[int, "Job", Iterator]]:
        """(prompt index, job, responses) for every sequence, in order: each prompt's
        best_of samples, seeds seed, seed + 1, ..."""
        engine = self.server.engine
        # best_of ranks samples by their log-probability: ask for it even when the client does not.
        logprobs = plan.logprobs if plan.logprobs is not None or plan.best_of == plan.n else 0
        for i, job in enumerate(jobs):
            for j in range(plan.best_of):
                opts = dict(plan.opts, max_tokens=job.max_tokens)
                if opts["seed"] is not None:
                    opts["seed"] = (opts["seed"] - SEED_MIN + j) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
                if job.max_tokens == 0 and plan.logprobs is None:
                    yield i, job, iter([ScoreOnly(job)])  # echo of the prompt alone: nothing to run
                    continue
                yield i, job, engine.stream(job.ids, **opts, logprobs=logprobs,
                                            prompt_logprobs=plan.echo and plan.logprobs is not None,
                                            logits_processors=constraint() if constraint else (),
                                            abort=self._abort_if_gone)

    def _run(self, plan: Plan, jobs: list["Job"], chat: bool, constraint, tools: "ToolContext | None" = None) -> None:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if self.client_gone():
            raise ClientGone()
        streams: list[tuple[int, "Job", Iterator]] = []
        try:
            # Every sequence is queued now: they run side by side in the engine's slots, and
            # are read in order. Engine.stream validates its options when called, and the first
            # response needs the prefill: both happen before any header, so their errors are
            # plain JSON.
            streams.extend(self._sequences(plan, jobs, constraint))
            i, job, current = streams[0]
            first = next(current, None)
            if first is None:
                raise RuntimeError("the engine produced no response")

            def runs() -> Iterator[tuple[int, "Job", Iterator]]:
                yield i, job, itertools.chain([first], current)
                yield from streams[1:]

            if plan.stream:
                self._stream(rid, chat, plan, runs(), tools)
            else:
                self._complete(rid, chat, plan, runs(), tools)
        finally:
            for _, _, responses in streams:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()  # frees the slot (or the place in the queue) if we left early

    def _abort_if_gone(self) -> None:
        """Called while a sequence waits for a slot or a token: give up if the client left."""
        if self.client_gone():
            raise ClientGone()

    def _tokens(self, responses: Iterator) -> Iterator:
        """The responses, stopping (ClientGone) when the client disconnects between tokens."""
        for r in responses:
            yield r
            if r.finish_reason is None and self.client_gone():
                raise ClientGone()

    def _usage(self, jobs_seen: dict, generated: int) -> dict:
        prompt = sum(jobs_seen.values())
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def _completion_logprobs(self, job: "Job", out: "Output", plan: Plan) -> dict | None:
        if plan.logprobs is None:
            return None
        tt = self.server.token_text
        if plan.echo:
            entries = (out.prompt_entries or [None] * len(job.ids)) + out.entries
            return completion_logprobs(tt, entries, job.ids + out.tokens)
        return completion_logprobs(tt, out.entries, out.tokens, offset=len(job.text))

    def _complete(self, rid: str, chat: bool, plan: Plan, runs: Iterator, tools: "ToolContext | None") -> None:
        per_prompt: dict[int, list[Output]] = {}
        prompts: dict[int, int] = {}
        generated, stats = 0, None
        for i, job, responses in runs:
            out = Output(i, job)
            for r in self._tokens(responses):
                out.add(r)
            per_prompt.setdefault(i, []).append(out)
            prompts[i] = len(job.ids)
            generated += out.generated
            stats = out.stats
        choices = []
        for i in sorted(per_prompt):
            outs = per_prompt[i]
            if plan.best_of > plan.n:  # the n samples the model finds likeliest
                outs = sorted(outs, key=lambda o: -sum(e.logprob for e in o.entries))[: plan.n]
            for j, out in enumerate(outs):
                choice: dict[str, Any] = {"index": i * plan.n + j, "finish_reason": out.finish_reason}
                if chat:
                    message: dict[str, Any] = {"role": "assistant", "content": out.text}
                    if tools is not None:
                        content, calls = tools.parse(out.pieces)
                        if calls:
                            message = {"role": "assistant", "content": content or None,
                                       "tool_calls": [c.to_openai() for c in calls]}
                            choice["finish_reason"] = "tool_calls"
                    choice["message"] = message
                    choice["logprobs"] = (None if plan.logprobs is None else
                                          {"content": chat_logprobs(self.server.token_text, out.entries),
                                           "refusal": None})
                else:
                    choice["text"] = (out.job.text if plan.echo else "") + out.text
                    choice["logprobs"] = self._completion_logprobs(out.job, out, plan)
                choices.append(choice)
        payload = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                   "model": self.server.model_name, "choices": choices, "usage": self._usage(prompts, generated)}
        if stats is not None:
            payload["stats"] = stats.to_dict()  # of the last sequence
        self._send_json(200, payload)

    def _stream(self, rid: str, chat: bool, plan: Plan, runs: Iterator, tools: "ToolContext | None") -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self._sse = True
        self.close_connection = True
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
        tt = self.server.token_text

        def send(chunk_choices: list, **extra) -> None:
            chunk = {"id": rid, "object": obj, "created": created, "model": self.server.model_name,
                     "choices": chunk_choices, **extra}
            if plan.include_usage and "usage" not in extra:
                chunk["usage"] = None
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def choice(index: int, text: str | None, finish: str | None, entries: list, job: "Job",
                   tokens: list[int], offset: int, delta: dict | None = None) -> dict:
            if chat:
                if delta is None:
                    delta = {"content": text} if text else {}
                lp = None if plan.logprobs is None else {"content": chat_logprobs(tt, entries), "refusal": None}
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            lp = None if plan.logprobs is None else completion_logprobs(tt, entries, tokens, offset)
            return {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}

        try:
            prompts: dict[int, int] = {}
            generated, count = 0, {}
            for i, job, responses in runs:
                j = count.get(i, 0)
                count[i] = j + 1
                index = i * plan.n + j
                prompts[i] = len(job.ids)
                offset = 0
                if chat:
                    send([choice(index, None, None, [], job, [], 0, delta={"role": "assistant", "content": ""})])
                elif plan.echo:
                    first = next(responses)
                    responses = itertools.chain([first], responses)
                    send([choice(index, job.text, None, first.prompt_logprobs or [None] * len(job.ids), job,
                                 job.ids, 0)])
                    offset = len(job.text)
                else:
                    offset = len(job.text)
                filt = tools.stream_filter() if tools is not None else None
                entries, tokens, last = [], [], None
                for r in self._tokens(responses):
                    last = r
                    if r.logprobs is not None:
                        entries.append(r.logprobs)
                        tokens.append(r.token)
                    text = r.text
                    if filt is not None:
                        text = filt.feed(r.text, r.token)
                    if text or (r.finish_reason and filt is None):
                        send([choice(index, text, r.finish_reason if filt is None else None, entries, job, tokens,
                                     offset)])
                        offset += sum(len(tt.text(t)) for t in tokens)
                        entries, tokens = [], []
                if filt is not None:
                    rest, calls = filt.finish()
                    finish = last.finish_reason if last is not None else "stop"
                    if rest or entries:
                        send([choice(index, rest, None, entries, job, tokens, offset)])
                    if calls:
                        send([choice(index, None, None, [], job, [], 0,
                                     delta={"tool_calls": [c.to_openai(k) for k, c in enumerate(calls)]})])
                        finish = "tool_calls"
                    send([choice(index, None, finish, [], job, [], 0)])
                if last is not None:
                    generated += last.stats.generated_tokens
            if plan.include_usage:
                send([], usage=self._usage(prompts, generated))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError):
            raise ClientGone() from None  # the client went away or stopped reading


class EdgeMoEServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # server_close does not wait for idle keep-alive connections
    request_queue_size = 128

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8080, model_name: str | None = None,
                 default_max_tokens: int = 256, verbose: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens < 1:
            raise InvalidArgument(f"default_max_tokens must be an integer >= 1, got {default_max_tokens!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
            raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise InvalidArgument(f"max_connections must be an integer >= 1, got {max_connections!r}")
        super().__init__((host, port), Handler)
        self.engine = engine
        self.model_name = model_name or engine.path.name
        self.default_max_tokens = default_max_tokens
        self.verbose = verbose
        self.request_timeout = float(timeout)
        self.max_connections = max_connections
        engine.start_batching()  # requests share decode steps in the engine's slots (edgemoe.batching)
        self.stopping = False
        self.active_connections = 0
        self._count_lock = threading.Lock()
        self._rejecting = threading.BoundedSemaphore(max_connections)
        self._token_text: TokenText | None = None
        self._grammar_tokenizer: GrammarTokenizer | None = None
        self._grammar_lock = threading.Lock()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "edgemoe"}

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.engine.tokenizer)
        return self._token_text

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """The vocabulary for constrained decoding, built on first use (about a second for
        a large vocabulary) and kept."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                self._grammar_tokenizer = GrammarTokenizer(self.engine.tokenizer, self.engine.vocab_limit)
            return self._grammar_tokenizer

    def process_request(self, request, client_address):
        with self._count_lock:
            full = self.active_connections >= self.max_connections
            if not full:
                self.active_connections += 1
        if full:
            return self._reject(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release_connection()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release_connection()

    def _release_connection(self) -> None:
        with self._count_lock:
            self.active_connections -= 1

    def _reject(self, sock: socket.socket) -> None:
        """Over the connection cap: answer 503 on a short-lived thread (or, when even those are
        all busy, just close)."""
        if not self._rejecting.acquire(blocking=False):
            self.shutdown_request(sock)
            return
        threading.Thread(target=self._send_busy, args=(sock,), daemon=True).start()

    def _send_busy(self, sock: socket.socket) -> None:
        try:
            body = json.dumps(Handler._error_body(
                f"server busy: {self.max_connections} connections are open (the limit); retry later",
                None, "server_error", "server_busy")).encode()
            head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
            sock.settimeout(1.0)
            sock.sendall(head + body)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.recv(65536):  # let the client finish sending
                pass
        except OSError:
            pass
        finally:
            sock.close()
            self._rejecting.release()

    def server_close(self) -> None:
        self.stopping = True  # running generations stop at their next token
        super().server_close()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8080, **kwargs) -> EdgeMoEServer:
    """A ready-to-serve server (port 0 picks a free port; see `server.server_address`).

    kwargs: model_name, default_max_tokens, verbose, timeout (seconds a connection may stay
    idle while a request is read), max_connections (more get a 503).
    """
    return EdgeMoEServer(engine, host, port, **kwargs)
