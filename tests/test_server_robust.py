"""The server answers every request, bounds what one request may cost, and cannot be held
hostage by slow, idle or departed clients. Driven over real HTTP (raw sockets where the
request is malformed on purpose)."""

import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

import edgemoe
from edgemoe.errors import InvalidArgument
from edgemoe.server import LOCK_POLL_S, MAX_BODY, make_server


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    from conftest import save_checkpoint, tiny_config

    out = tmp_path_factory.mktemp("srv") / "mixtral"
    save_checkpoint(tiny_config("mixtral"), out, tokenizer_dir)
    return edgemoe.load(out)


def start(engine, **kwargs):
    server = make_server(engine, port=0, model_name="tiny", **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(engine):
    server = start(engine, timeout=10)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def port(server):
    return server.server_address[1]


@pytest.fixture
def url(port):
    return f"http://127.0.0.1:{port}"


class _Buffer(io.BytesIO):
    def close(self):  # http.client closes its file at the end of a body; keep our position
        pass


class _Bytes:
    def __init__(self, data):
        self.buf = _Buffer(data)

    def makefile(self, *args, **kwargs):
        return self.buf


class Raw:
    """One exchange over a raw socket, read until the server closes the connection."""

    def __init__(self, port, data: bytes, timeout: float = 15.0):
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before taking everything: the answer is still there
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        self.data = b"".join(chunks)
        assert self.data, f"no response at all to {data[:80]!r}"
        src = _Bytes(self.data)
        method = data.split(b" ", 1)[0].decode("latin-1")
        resp = http.client.HTTPResponse(src, method=method)
        resp.begin()
        self.status, self.headers, self.body = resp.status, resp.headers, resp.read()
        self.rest = self.data[src.buf.tell():]  # anything after the first response

    def json(self):
        assert self.headers["Content-Type"] == "application/json", self.data[:300]
        return json.loads(self.body)

    def error(self) -> dict:
        err = self.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert "Traceback" not in err["message"]
        return err


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode() + body


class Probe:
    """Wraps Engine.stream: counts calls and tokens, optionally slows each token, and
    records when generation was closed."""

    def __init__(self, engine, delay=0.0, fail_after=None):
        self.real, self.delay, self.fail_after = engine.stream, delay, fail_after
        self.calls = self.yielded = 0
        self.closed = threading.Event()

    def __call__(self, prompt, **kwargs):
        self.calls += 1
        inner = self.real(prompt, **kwargs)

        def run():
            try:
                for r in inner:
                    if self.fail_after is not None and self.yielded >= self.fail_after:
                        raise RuntimeError("secret internal detail")
                    self.yielded += 1
                    time.sleep(self.delay)
                    yield r
            finally:
                inner.close()
                self.closed.set()

        return run()


# -- 1. no request goes unanswered


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "temperature": Infinity}', "temperature"),
    (b'{"prompt": "x", "temperature": 1e-300}', "temperature"),
    (b'{"prompt": "x", "temperature": -0.5}', "temperature"),
    (b'{"prompt": "x", "top_p": NaN}', "top_p"),
    (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "x", "min_p": -Infinity}', "min_p"),
    (b'{"prompt": "x", "min_p": 1.5}', "min_p"),
    (b'{"prompt": "x", "repetition_penalty": 0}', "repetition_penalty"),
    (b'{"prompt": "x", "repetition_penalty": NaN}', "repetition_penalty"),
    (b'{"prompt": "x", "top_k": -1}', "top_k"),
    (b'{"prompt": "x", "top_k": 2.5}', "top_k"),
    (b'{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"prompt": "x", "seed": -9223372036854775809}', "seed"),
    (b'{"prompt": "x", "seed": 1.5}', "seed"),
    (b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": true}', "max_tokens"),
    (b'{"prompt": "x", "max_completion_tokens": -3}', "max_completion_tokens"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "ok \\udfff tail"}', "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    (b'{"prompt": "x", "stop": "' + b"s" * 300 + b'"}', "stop"),
    (b'{"prompt": "x", "stream": "yes", "max_tokens": 1}', "stream"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options"),
    (b'{"prompt": "x", "ignore_eos": 1}', "ignore_eos"),
    (b'{"prompt": "x", "n": 0}', "n"),
    (b'{"prompt": "x", "n": 17}', "n"),
    (b'{"prompt": "x", "logprobs": 21}', "logprobs"),
    (b'{"prompt": "x", "presence_penalty": 5}', "presence_penalty"),
    (b'{"prompt": "x", "frequency_penalty": -2.5}', "frequency_penalty"),
    (b'{"prompt": "x", "logit_bias": {"1": 101}}', "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"a": 1}}', "logit_bias"),
    (b'{"prompt": "x", "logit_bias": {"999999": 1}}', "logit_bias"),
    (b'{"prompt": "x", "best_of": 1, "n": 2}', "best_of"),
    (b'{"prompt": "x", "best_of": 3, "stream": true}', "best_of"),
    (b'{"prompt": "x", "echo": 1}', "echo"),
    (b'{"prompt": "x", "suffix": "y"}', "suffix"),
    (b'{"prompt": "x", "tools": []}', "tools"),
    (b'{"prompt": "x", "frobnicate": 1}', "frobnicate"),
    (b'{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}',
     "response_format"),
    (b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": true, "x": 1}}', "stream_options"),
    (b'{"prompt": [[1, 2], "a", [3.5]]}', "prompt"),
    (b'{"prompt": [[]]}', "prompt"),
    (b'{"prompt": "x", "model": 5}', "model"),
    (b'{"prompt": [1, true]}', "prompt"),
    (b'{"prompt": [-1]}', "prompt"),
])
def test_bad_values_get_400_naming_the_parameter(port, body, param):
    r = Raw(port, post("/v1/completions", body))
    assert r.status == 400, r.data[:300]
    assert r.error()["param"] == param


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": [5]}]}', "messages"),
    (b'{"messages": [{"role": "user", "content": null}]}', "messages"),
    (b'{"messages": {"role": "user"}}', "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', "tools"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}',
     "response_format"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}',
     "tools"),  # the model's template has no tool support
    (b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', "tool_choice"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', "top_logprobs"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": 2}', "logprobs"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "echo": true}', "echo"),
    (b'{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]}', "messages"),
])
def test_bad_chat_values_get_400(port, body, param):
    r = Raw(port, post("/v1/chat/completions", body))
    assert r.status == 400, r.data[:300]
    assert r.error()["param"] == param


@pytest.mark.parametrize("body,fragment", [
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', "not valid UTF-8"),
    (b"\xef\xbb\xbf{}", "not valid JSON"),
    (b'"just a string"', "JSON object"),
    (b"{nope", "not valid JSON"),
])
def test_unparseable_bodies_get_400(port, body, fragment):
    r = Raw(port, post("/v1/completions", body))
    assert r.status == 400
    assert fragment in r.error()["message"]


def test_extreme_valid_seeds_are_accepted(url):
    for seed in (2**64 - 1, -(2**63), 0):
        r = requests.post(f"{url}/v1/completions",
                          json={"prompt": "x", "max_tokens": 2, "temperature": 0.7, "seed": seed})
        assert r.status_code == 200, r.text


def test_bug_is_a_json_500_and_logged_not_shown(url, engine, monkeypatch, caplog):
    def broken(prompt, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(engine, "stream", broken)
    for stream in (False, True):
        r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": stream})
        assert r.status_code == 500 and r.headers["Content-Type"] == "application/json"
        err = r.json()["error"]
        assert err["type"] == "server_error" and "RuntimeError" in err["message"]
        assert "secret" not in r.text and "Traceback" not in r.text
    assert any(rec.exc_info and "secret internal detail" in str(rec.exc_info[1]) for rec in caplog.records)
    monkeypatch.undo()
    assert requests.get(f"{url}/health").json() == {"status": "ok"}


def test_error_after_stream_started_is_an_sse_error_event(url, engine, monkeypatch):
    monkeypatch.setattr(engine, "stream", Probe(engine, fail_after=2))
    with requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 20, "ignore_eos": True,
                                                      "stream": True}, stream=True) as r:
        assert r.status_code == 200
        events = [l[len("data: "):] for l in r.iter_lines(decode_unicode=True) if l.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["type"] == "server_error" and "secret" not in events[-1]


def test_engine_validation_error_is_400_before_stream_headers(url, engine, monkeypatch):
    def strict(prompt, **kwargs):
        raise InvalidArgument("temperature is not acceptable")

    monkeypatch.setattr(engine, "stream", strict)
    for stream in (False, True):
        r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": stream})
        assert r.status_code == 400 and r.headers["Content-Type"] == "application/json"
        assert r.json()["error"]["message"] == "temperature is not acceptable"


# -- 2. methods


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS", "FOO", "get", "TRACE"])
def test_other_methods_get_json_405_with_allow(port, method):
    r = Raw(port, f"{method} /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert r.status == 405 and r.headers["Allow"] == "POST"
    assert r.error()["message"]
    r = Raw(port, f"{method} /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD, POST"


def test_wrong_known_method_and_head(url, port):
    r = requests.get(f"{url}/v1/chat/completions")
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and r.json()["error"]["message"]
    r = requests.post(f"{url}/health", json={})
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    r = Raw(port, b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.status == 200 and r.body == b"" and r.rest == b"" and int(r.headers["Content-Length"]) > 0
    r = Raw(port, b"HEAD /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert r.status == 405 and r.body == b"" and r.rest == b""


# -- 3. leftover bodies and malformed requests


SMUGGLED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 50


def test_413_closes_the_connection_and_never_parses_the_body(port):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    r = Raw(port, head + SMUGGLED)
    assert r.status == 413 and r.headers["Connection"] == "close"
    assert "too large" in r.error()["message"]
    assert r.rest == b""  # no second response: the body was not read as requests


def test_413_with_a_full_oversized_body_still_reads_the_answer(url):
    # the client sends everything before reading: the server drains it instead of resetting
    r = requests.post(f"{url}/v1/completions", data=b"x" * (3 * MAX_BODY))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("headers,status", [
    ("Content-Length: abc\r\n", 400),
    ("Content-Length: -5\r\n", 400),
    ("Content-Length: +5\r\n", 400),
    ("Content-Length: 5\r\nContent-Length: 6\r\n", 400),
    ("Content-Length: 99999999999999999999999\r\n", 400),
    ("Transfer-Encoding: chunked\r\n", 411),
    ("", 411),
])
def test_bad_lengths_get_json_errors_and_close(port, headers, status):
    r = Raw(port, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + SMUGGLED)
    assert r.status == status and r.headers["Connection"] == "close"
    r.error()
    assert r.rest == b""


def test_get_with_a_body_closes_the_connection(port):
    r = Raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(SMUGGLED)).encode()
            + b"\r\n\r\n" + SMUGGLED)
    assert r.status == 200 and r.headers["Connection"] == "close" and r.rest == b""


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x00\x01\x02 \xff\xfe\r\n\r\n", 400),
    (b"   \r\n\r\n", 400),
    (b"GET /health HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /health HTTP/x.y\r\n\r\n", 400),
    (b"GET /health HTTP/2.0\r\n\r\n", 505),
    (b"GET /health\r\n\r\n", 400),  # HTTP/0.9
    (b"POST /v1/completions\r\n\r\n", 400),
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\nX-Big: " + b"b" * 70000 + b"\r\n\r\n", 431),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431),
])
def test_malformed_requests_get_json_errors(port, request_bytes, status):
    r = Raw(port, request_bytes)
    assert r.data.startswith(b"HTTP/1.1 ")  # a real status line, even for HTTP/0.9
    assert r.status == status
    r.error()


def test_keep_alive_still_works(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(2):
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 2}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] >= 1
    sock = conn.sock
    conn.request("POST", "/v1/completions", body=b"{}")  # a 400 that read its body keeps the connection
    r = conn.getresponse()
    assert r.status == 400 and r.getheader("Connection") is None
    r.read()
    assert conn.sock is sock
    conn.close()


# -- 4. requests are bounded by the context


def test_prompt_longer_than_the_context_is_400(url, engine):
    ctx = engine.ctx_size
    r = requests.post(f"{url}/v1/completions", json={"prompt": [5] * ctx, "max_tokens": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and err["code"] == "context_length_exceeded"
    r = requests.post(f"{url}/v1/completions", json={"prompt": [5] * ctx})  # no max_tokens: no room either
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    text = "x y z " * ctx
    assert len(engine.tokenizer.encode(text)) > ctx
    r = requests.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_max_tokens_beyond_the_context_is_400(url, engine):
    r = requests.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": engine.ctx_size})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    r = requests.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 10**30})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_default_max_tokens_shrinks_to_fit(url, engine):
    ids = [5] * (engine.ctx_size - 3)
    r = requests.post(f"{url}/v1/completions", json={"prompt": ids, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def test_token_ids_are_checked_against_the_embedding(url, engine):
    r = requests.post(f"{url}/v1/completions", json={"prompt": [engine.vocab_limit], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = requests.post(f"{url}/v1/completions", json={"prompt": [engine.vocab_limit - 1], "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_stream_options_usage_and_ignore_eos(url):
    req = {"prompt": "x", "max_tokens": 4, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{url}/v1/completions", json=req, stream=True) as r:
        events = [l[len("data: "):] for l in r.iter_lines(decode_unicode=True) if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4


# -- 6. departed clients stop their work


def _slow_request(port, stream: bool):
    body = json.dumps({"prompt": "def f():", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                       "stream": stream}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(post("/v1/completions", body))
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_disconnected_client_stops_generation(url, port, engine, monkeypatch, stream):
    probe = Probe(engine, delay=0.02)  # 400 tokens would take 8 s
    monkeypatch.setattr(engine, "stream", probe)
    s = _slow_request(port, stream)
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    time.sleep(0.5)
    s.close()
    assert probe.closed.wait(5), "generation went on after the client left"
    assert probe.yielded < 100
    monkeypatch.undo()
    t0 = time.monotonic()
    r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and time.monotonic() - t0 < 5


def test_request_whose_client_left_while_waiting_never_runs(server, port, engine, monkeypatch):
    probe = Probe(engine)
    monkeypatch.setattr(engine, "stream", probe)
    scheduler = engine.scheduler
    prefills = scheduler.prefills
    scheduler.model_lock.acquire()  # the model is busy: the request waits in the queue
    try:
        s = _slow_request(port, stream=False)
        time.sleep(0.3)
        s.close()
        time.sleep(3 * LOCK_POLL_S)
    finally:
        scheduler.model_lock.release()
    time.sleep(0.5)
    assert probe.calls == 1 and probe.yielded == 0  # queued, then dropped before its prefill
    assert scheduler.prefills == prefills and not scheduler.waiting and not scheduler.active


# -- 7. slow, idle and too many connections


@pytest.fixture
def strict(engine):
    server = start(engine, timeout=0.5, max_connections=2)
    yield server
    server.shutdown()
    server.server_close()


def _closed_within(s: socket.socket, seconds: float) -> bytes:
    s.settimeout(seconds)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_idle_and_slow_connections_time_out(strict):
    addr = ("127.0.0.1", strict.server_address[1])
    with socket.create_connection(addr) as s:  # says nothing: closed without an answer
        t0 = time.monotonic()
        assert _closed_within(s, 5) == b""
        assert time.monotonic() - t0 < 3
    with socket.create_connection(addr) as s:  # stops in the middle of its headers: 408
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        data = _closed_within(s, 5)
        assert data.startswith(b"HTTP/1.1 408") and b'"error"' in data
    with socket.create_connection(addr) as s:  # stops in the middle of its body: 408
        s.sendall(post("/v1/completions", b'{"prompt": "x"}' + b" " * 50)[:-30])
        data = _closed_within(s, 5)
        assert data.startswith(b"HTTP/1.1 408") and b"inactivity" in data


def test_connections_over_the_cap_get_503(strict):
    addr = ("127.0.0.1", strict.server_address[1])
    url = f"http://{addr[0]}:{addr[1]}"
    held = [socket.create_connection(addr) for _ in range(2)]
    deadline = time.monotonic() + 5
    while strict.active_connections < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert strict.active_connections == 2
    r = requests.get(f"{url}/health", timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
    for s in held:
        s.close()
    while strict.active_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert requests.get(f"{url}/health", timeout=5).status_code == 200


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": float("nan")}, {"max_connections": 0},
                                    {"default_max_tokens": 0}])
def test_server_options_are_checked(engine, kwargs):
    with pytest.raises(InvalidArgument):
        make_server(engine, port=0, **kwargs)


# -- CLI flags


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--port", "-1"], "--port must be between 0 and 65535"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
])
def test_serve_flags_are_checked(capsys, argv, message):
    from edgemoe.cli import main

    assert main(["serve", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgemoe: error: ") and message in err and "Traceback" not in err


def test_serve_cli_timeout_and_connection_cap(engine):
    bad = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "--timeout", "-1"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == "edgemoe: error: --timeout must be a positive number " \
                                                         "of seconds, got -1"
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", str(engine.path), "--port", "0",
                             "--timeout", "1", "--max-connections", "1"], stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r":(\d+)/v1", proc.stderr.readline()).group(1))
        url = f"http://127.0.0.1:{port}"
        idle = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.3)
        r = requests.get(f"{url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        t0 = time.monotonic()
        assert _closed_within(idle, 10) == b""  # the idle connection times out after ~1 s
        assert time.monotonic() - t0 < 5
        idle.close()
        time.sleep(0.2)
        r = requests.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_verifies_every_expert_read_by_default(tmp_path):
    """A converted model served over HTTP checks every expert it reads from storage
    (--verify always) unless told otherwise; generate keeps the cheaper 'first'."""
    from edgemoe import assets
    from edgemoe.store.convert import convert

    conv = tmp_path / "conv"
    convert(assets.MODEL_DIR, conv)
    for flags, want in (([], "always"), (["--verify", "first"], "first")):
        proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", str(conv), "--port", "0", *flags],
                                stderr=subprocess.PIPE, text=True)
        try:
            port = int(re.search(r":(\d+)/v1", proc.stderr.readline()).group(1))
            r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a", "max_tokens": 2},
                              timeout=60)
            assert r.status_code == 200 and r.json()["stats"]["verify"] == want
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    out = subprocess.run([sys.executable, "-m", "edgemoe", "generate", str(conv), "-p", "a", "-n", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["stats"]["verify"] == "first"
