"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (with SSE
streaming), /v1/models and /health.

The engine is injected, so tests drive a real server over HTTP. One request runs at a
time (a device with one model has one set of cores); others wait on a lock.

Every request gets an HTTP answer: bad input is a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}), a bug is a JSON 500 (its traceback goes
to the server log, never to the client), and an error after a stream has started is sent
as a final SSE event. Prompts are tokenized before generation so that prompt plus
max_tokens can be checked against the model's context. A client that disconnects stops
its generation at the next token (or never starts it, if it was still waiting for the
lock); connections time out when idle and their number is capped.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .api import Engine
from .errors import EdgeMoEError, InvalidArgument

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
LOCK_POLL_S = 0.2  # how often a request waiting for the model checks that its client is still there

GET_PATHS = ("/health", "/v1/health", "/v1/models")
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


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# OpenAI options this server does not implement. Each is accepted only at its "off" value, so a
# request that relies on one fails clearly instead of being answered without it.
UNSUPPORTED: dict[str, tuple[str, Any]] = {
    "n": ("1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v == 1),
    "best_of": ("1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v == 1),
    "echo": ("false", lambda v: v is False),
    "logprobs": ("null or false", lambda v: v is False),
    "top_logprobs": ("0", _is_zero),
    "presence_penalty": ("0", _is_zero),
    "frequency_penalty": ("0", _is_zero),
    "logit_bias": ("{}", lambda v: v == {}),
    "suffix": ('""', lambda v: v == ""),
    "tools": ("[]", lambda v: v == []),
    "functions": ("[]", lambda v: v == []),
    "tool_choice": ('"none" or "auto"', lambda v: v in ("none", "auto")),
    "function_call": ('"none" or "auto"', lambda v: v in ("none", "auto")),
    "response_format": ('{"type": "text"}', lambda v: v == {"type": "text"}),
    "modalities": ('["text"]', lambda v: v == ["text"]),
    "audio": ("null", lambda v: False),
    "prediction": ("null", lambda v: False),
}


def parse_options(body: dict, default_max_tokens: int | None = None) -> dict:
    """Validate OpenAI sampling fields and map them to Engine.stream keyword arguments.

    max_tokens is None when the request gives none and no default is passed: the caller
    then picks one that fits the context.
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
    max_tokens = _number(body, name, default_max_tokens, 1, MAX_TOKENS_LIMIT, integer=True)
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
        seed=_number(body, "seed", None, SEED_MIN, SEED_MAX, integer=True, label="in [-2**63, 2**64)"),
        stop=stop,
        ignore_eos=ignore_eos,
    )


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
    return stream, options.get("include_usage", False)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"messages[{i}] needs a 'role' of system, user, assistant, developer or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text ones only
            texts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text":
                    raise BadRequest(f"messages[{i}].content[{j}]: only text content parts are supported", "messages")
                if not isinstance(p.get("text"), str):
                    raise BadRequest(f"messages[{i}].content[{j}].text must be a string", "messages")
                texts.append(p["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", "messages")
        check_text(content, "messages")
        out.append({"role": m["role"], "content": content})
    return out


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
        allow = "GET, HEAD" if path in GET_PATHS else "POST" if path in POST_PATHS else None
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

    def _completions(self, body: dict) -> None:
        opts, stream = parse_options(body), parse_stream(body)  # cheap checks before the tokenizer runs
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        engine = self.server.engine
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if max(prompt) >= engine.vocab_limit or min(prompt) < 0:
                raise BadRequest(f"'prompt' token ids must be in [0, {engine.vocab_limit})", "prompt")
            ids = list(prompt)
        elif isinstance(prompt, str) and prompt:
            check_text(prompt, "prompt")
            ids = engine.tokenizer.encode(prompt)
        else:
            raise BadRequest("'prompt' must be a non-empty string or a list of token ids", "prompt")
        self._respond(opts, stream, ids, "prompt", chat=False)

    def _chat(self, body: dict) -> None:
        opts, stream = parse_options(body), parse_stream(body)
        messages = parse_messages(body)
        try:
            ids = self.server.engine.chat_prompt(messages)
        except EdgeMoEError as e:
            raise BadRequest(str(e), "messages") from None
        self._respond(opts, stream, ids, "messages", chat=True)

    def _fit_context(self, opts: dict, n_prompt: int, param: str) -> None:
        """Check prompt + max_tokens against the context (or choose max_tokens to fit)."""
        engine, ctx = self.server.engine, self.server.engine.ctx_size
        if n_prompt < 1:
            raise BadRequest(f"'{param}' encodes to no tokens", param)
        if opts["max_tokens"] is None:
            room = ctx - n_prompt
            if room < 1:
                raise BadRequest(f"the prompt is {n_prompt} tokens, which leaves no room to generate in the "
                                 f"model's context of {ctx} tokens", param, code="context_length_exceeded")
            opts["max_tokens"] = min(self.server.default_max_tokens, room)
        try:
            engine.check_context(n_prompt, opts["max_tokens"])
        except EdgeMoEError:  # the engine's message speaks to its operator (--ctx-size); this one to the client
            n = opts["max_tokens"]
            raise BadRequest(f"the prompt ({n_prompt} tokens) plus max_tokens ({n}) is more than the model's context "
                             f"of {ctx} tokens; shorten the prompt or lower max_tokens",
                             "max_tokens" if n_prompt < ctx else param, code="context_length_exceeded") from None

    def _respond(self, opts: dict, stream_usage: tuple[bool, bool], ids: list[int], param: str, chat: bool) -> None:
        stream, usage = stream_usage
        self._fit_context(opts, len(ids), param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self._acquire()
        responses = None
        try:
            # Engine.stream validates its options when called, and the first response needs
            # the prefill: both happen before any header, so their errors are plain JSON.
            responses = self.server.engine.stream(ids, **opts)
            first = next(responses, None)
            if first is None:
                raise RuntimeError("the engine produced no response")
            chained = itertools.chain([first], responses)
            if stream:
                self._stream(rid, chat, chained, usage)
            else:
                self._complete(rid, chat, chained)
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # stops generation if we left early
            self.server.lock.release()

    def _acquire(self) -> None:
        """Take the generation lock, giving up if the client leaves while waiting."""
        lock = self.server.lock
        while not lock.acquire(timeout=LOCK_POLL_S):
            if self.client_gone():
                raise ClientGone()
        if self.client_gone():
            lock.release()
            raise ClientGone()

    def _tokens(self, responses: Iterator) -> Iterator:
        """The responses, stopping (ClientGone) when the client disconnects between tokens."""
        for r in responses:
            yield r
            if r.finish_reason is None and self.client_gone():
                raise ClientGone()

    def _complete(self, rid: str, chat: bool, responses: Iterator) -> None:
        parts, last = [], None
        for r in self._tokens(responses):
            parts.append(r.text)
            last = r
        text = "".join(parts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        s = last.stats
        self._send_json(200, {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.server.model_name, "choices": [choice],
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                      "total_tokens": s.prompt_tokens + s.generated_tokens},
            "stats": s.to_dict(),
        })

    def _stream(self, rid: str, chat: bool, responses: Iterator, usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self._sse = True
        self.close_connection = True
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def event(chunk_choices: list, **extra) -> bytes:
            chunk = {"id": rid, "object": obj, "created": created, "model": self.server.model_name,
                     "choices": chunk_choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        try:
            if chat:
                self.wfile.write(event([choice("", None, first=True)]))
            last = None
            for r in self._tokens(responses):
                last = r
                if r.text or r.finish_reason:
                    self.wfile.write(event([choice(r.text, r.finish_reason)]))
                    self.wfile.flush()
            if usage and last is not None:
                s = last.stats
                self.wfile.write(event([], usage={"prompt_tokens": s.prompt_tokens,
                                                  "completion_tokens": s.generated_tokens,
                                                  "total_tokens": s.prompt_tokens + s.generated_tokens}))
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
        self.lock = threading.Lock()  # one generation at a time
        self.stopping = False
        self.active_connections = 0
        self._count_lock = threading.Lock()
        self._rejecting = threading.BoundedSemaphore(max_connections)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "edgemoe"}

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
