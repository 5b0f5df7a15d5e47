"""The listening server: EdgeMoEServer (a thread per connection, a cap on connections, the
injected engine and what requests share of it) and make_server.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from ..api import Engine
from ..errors import InvalidArgument
from ..grammar import GrammarTokenizer
from ..logprobs import TokenText
from .endpoints import Handler
from .handler import DEFAULT_MAX_CONNECTIONS, DEFAULT_TIMEOUT


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
