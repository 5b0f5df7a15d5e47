"""The HTTP plumbing of the server (http.server underneath): reading a request and its
body (limits, encodings, timeouts), routing, writing JSON and errors in OpenAI's shape (also
after an event stream has started), draining and closing, and noticing a client that left.
The completion endpoints themselves are the subclass in endpoints.py.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import unquote

from ..errors import EdgeMoEError, InvalidArgument
from .parse import _DIGITS, BadRequest, _show

if TYPE_CHECKING:
    from .httpd import EdgeMoEServer

log = logging.getLogger("edgemoe.server")

MAX_BODY = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 64
LINGER_S = 5.0  # after an error that left a body unread: how long to drain it before closing
LOCK_POLL_S = 0.2  # how often a request waiting for a slot checks that its client is still there (batching.POLL_S)

GET_PATHS = ("/health", "/v1/health", "/v1/models")
MODEL_PREFIX = "/v1/models/"  # GET /v1/models/{id}
POST_PATHS = ("/v1/completions", "/v1/chat/completions")
ALLOW_ALL = "GET, HEAD, POST"


class ClientGone(Exception):
    """The client closed its connection (or the server is stopping): drop the request."""


class HTTPHandler(BaseHTTPRequestHandler):
    """One connection's requests: everything but the completion endpoints, which a subclass
    provides as `_completions(body)` and `_chat(body)` (endpoints.Handler)."""

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
