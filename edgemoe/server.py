"""OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (with SSE
streaming), /v1/models and /health.

The engine is injected, so tests drive a real server over HTTP. One request runs at a
time (a device with one model has one set of cores); others wait on a lock.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .api import Engine
from .errors import EdgeMoEError

MAX_BODY = 4 * 1024 * 1024


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {value}", name)
    return value


def parse_options(body: dict, default_max_tokens: int) -> dict:
    """Validate OpenAI sampling fields and map them to Engine.stream keyword arguments."""
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 8:
        raise BadRequest("'stop' must be a string or a list of at most 8 strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return dict(
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, 1, 1 << 20, integer=True),
        temperature=_number(body, "temperature", 1.0, 0, 10),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1),
        top_k=_number(body, "top_k", 0, 0, None, integer=True),
        min_p=_number(body, "min_p", 0.0, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-3, 10),
        seed=_number(body, "seed", None, None, None, integer=True),
        stop=stop,
    )


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise BadRequest(f"messages[{i}] needs a 'role' of system, user, assistant, developer or tool", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


class Handler(BaseHTTPRequestHandler):
    server: "EdgeMoEServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep the console quiet unless asked
        if self.server.verbose:
            super().log_message(fmt, *args)

    # -- plumbing

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("invalid Content-Length header") from None
        if length <= 0:
            raise BadRequest("request body is empty; send a JSON object")
        if length > MAX_BODY:
            raise BadRequest(f"request body too large (limit {MAX_BODY} bytes)", status=413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    # -- routes

    def do_GET(self):
        if self.path in ("/health", "/v1/health"):
            return self._send_json(200, {"status": "ok"})
        if self.path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [self.server.model_card()]})
        self._error(404, f"unknown path {self.path}", kind="not_found_error")

    def do_POST(self):
        routes = {"/v1/completions": self._completions, "/v1/chat/completions": self._chat}
        if self.path not in routes:
            return self._error(404, f"unknown path {self.path}", kind="not_found_error")
        try:
            body = self._body()
            routes[self.path](body)
        except BadRequest as e:
            self._error(e.status, str(e), e.param)
        except EdgeMoEError as e:
            self._error(400, str(e))

    def _completions(self, body: dict) -> None:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if max(prompt) >= self.server.engine.tokenizer.vocab_size or min(prompt) < 0:
                raise BadRequest("'prompt' token ids out of range", "prompt")
        elif not isinstance(prompt, str) or not prompt:
            raise BadRequest("'prompt' must be a non-empty string or a list of token ids", "prompt")
        self._respond(body, prompt, chat=False)

    def _chat(self, body: dict) -> None:
        messages = parse_messages(body)
        try:
            prompt = self.server.engine.chat_prompt(messages)
        except EdgeMoEError as e:
            raise BadRequest(str(e), "messages") from None
        self._respond(body, prompt, chat=True)

    def _respond(self, body: dict, prompt, chat: bool) -> None:
        opts = parse_options(body, self.server.default_max_tokens)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean", "stream")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        with self.server.lock:
            responses = self.server.engine.stream(prompt, **opts)
            if stream:
                self._stream(rid, chat, responses)
            else:
                self._complete(rid, chat, responses)

    def _complete(self, rid: str, chat: bool, responses: Iterator) -> None:
        parts, last = [], None
        for r in responses:
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

    def _stream(self, rid: str, chat: bool, responses: Iterator) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"

        def event(text: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            chunk = {"id": rid, "object": obj, "created": created, "model": self.server.model_name, "choices": [choice]}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        try:
            if chat:
                self.wfile.write(event("", None, first=True))
            for r in responses:
                if r.text or r.finish_reason:
                    self.wfile.write(event(r.text, r.finish_reason))
                    self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            responses.close()  # client went away: stop generating


class EdgeMoEServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8080, model_name: str | None = None,
                 default_max_tokens: int = 256, verbose: bool = False):
        super().__init__((host, port), Handler)
        self.engine = engine
        self.model_name = model_name or engine.path.name
        self.default_max_tokens = default_max_tokens
        self.verbose = verbose
        self.lock = threading.Lock()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "edgemoe"}


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8080, **kwargs) -> EdgeMoEServer:
    """A ready-to-serve server (port 0 picks a free port; see `server.server_address`)."""
    return EdgeMoEServer(engine, host, port, **kwargs)
