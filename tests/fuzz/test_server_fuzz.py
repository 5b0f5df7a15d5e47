"""Seeded fuzzing of the HTTP server: hundreds of malformed requests (wrong types, NaN and
huge numbers, bad UTF-8, surrogates, deep nesting, wrong methods, broken headers and
lengths, garbage bytes). Each must get an HTTP answer that is a JSON 4xx error (a 500
would be a bug), and the server must stay healthy afterwards."""

import json
import random
import threading
import time

import pytest
import requests

import edgemoe

from test_server_robust import Raw  # one raw-socket exchange, parsed
from edgemoe.server import MAX_BODY, make_server

SEED = 20261124
CASES = 320


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    from conftest import save_checkpoint, tiny_config

    out = tmp_path_factory.mktemp("fuzz") / "mixtral"
    save_checkpoint(tiny_config("mixtral"), out, tokenizer_dir)
    return edgemoe.load(out)


@pytest.fixture(scope="module")
def server(engine):
    server = make_server(engine, port=0, model_name="tiny", timeout=1.0)  # short: truncated requests time out fast
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()




def exchange(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes, parse the first response."""
    r = Raw(port, data, timeout=20)
    assert r.data.startswith(b"HTTP/1.1 "), f"no HTTP answer: {r.data[:100]!r}"
    return r.status, r.headers, r.body


def post(body: bytes, path: str = "/v1/completions", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


# -- generators of malformed requests; each returns (label, bytes)

COMPLETION = {"prompt": "def f():", "max_tokens": 2, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
WRONG_TYPES = ["hot", [], {}, [1], {"a": 1}, "1"]


def field_cases(rng: random.Random, ctx: int, vocab: int) -> list[tuple[str, dict]]:
    """Every (endpoint, fields to set) pair of the pools below; each makes a valid request
    certainly invalid, in one option."""
    x = rng.uniform(0.001, 1e6)
    special = [float("nan"), float("inf"), float("-inf"), True, False] + WRONG_TYPES
    numeric = {
        "temperature": [-x, 10 + x, 1e-300, 1e-5],
        "top_p": [0, -x, 1 + x, 0.0],
        "top_k": [-int(x) - 1, 1.5, 2.0],
        "min_p": [-x, 1 + x],
        "repetition_penalty": [0, -x, 10 + x],
        "seed": [2**64 + int(x), -(2**63) - 1 - int(x), 0.5, 10**40],
        "max_tokens": [0, -int(x), ctx + int(x), 10**30, 1.0],
        "max_completion_tokens": [0, -int(x), ctx + int(x), 2.5],
    }
    long_text = "x y z " * (ctx + rng.randint(1, 50))
    messages = [
        [], {}, "hi", None, [None], [5], [{"content": "x"}], [{"role": "wizard", "content": "x"}],
        [{"role": "user", "content": 5}], [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": rng.randint(-9, 9)}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [[]]}],
        [{"role": "user", "content": "ok \ud800 " + "x" * rng.randint(0, 50)}],
        [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
        [{"role": ["user"], "content": "x"}], [{"role": "user", "content": long_text}],
    ]
    prompts = [
        None, "", [], 5, 2.5, True, {"a": 1}, [[1, 2.5]], [1.5], [-1], [vocab + rng.randint(0, 10**6)],
        [True], ["a", 5], [1, "a"], [[]], [["a"]], ["x"] * 65, "\ud800", "x\udc00y", [5] * (ctx + rng.randint(0, 100)), long_text,
    ]
    either = [
        *({"stop": v} for v in [5, [1], ["a"] * 9, {"a": 1}, "s" * rng.randint(257, 5000), ["\udc00"], True]),
        *({"stream": v} for v in ["yes", 1, 0, [], {}, "true"]),
        {"stream_options": {"include_usage": True}},  # without "stream": true
        *({"stream": True, "stream_options": v} for v in [5, "x", [], {"include_usage": "yes"}]),
        *({k: v} for k, v in [("n", 17), ("n", 0), ("n", "1"), ("best_of", 0), ("logprobs", 21), ("logprobs", "yes"),
                              ("echo", "yes"), ("tools", [{"type": "function"}]), ("logit_bias", {"x": 5}),
                              ("logit_bias", {"1": 101}), ("logit_bias", {str(vocab + 1): 1}),
                              ("presence_penalty", 5), ("frequency_penalty", -3), ("suffix", "x"),
                              ("response_format", {"type": "yaml"}), ("top_logprobs", 2), ("model", "other"),
                              ("unknown_option", 1)]),
        *({"model": v} for v in [5, [], {}, True]),
        *({"ignore_eos": v} for v in ["true", 1, [], 0]),
        *({name: v} for name, values in numeric.items() for v in special + values),
    ]
    cases = [("chat", {"messages": v}) for v in messages] + [("completions", {"prompt": v}) for v in prompts]
    return cases + [(rng.choice(["chat", "completions"]), patch) for patch in either]


def field_request(endpoint: str, patch: dict) -> tuple[str, bytes]:
    body = {**(CHAT if endpoint == "chat" else COMPLETION), **patch}
    data = json.dumps(body).encode()  # NaN/Infinity as JSON's non-standard literals, surrogates as \ud800
    return f"{endpoint} {str(patch)[:60]}", post(data, f"/v1/{'chat/' if endpoint == 'chat' else ''}completions")


BODY_KINDS = 12


def mutate_body(rng: random.Random, kind: int) -> tuple[str, bytes]:
    valid = json.dumps(COMPLETION).encode()
    if kind == 0:
        body = json.dumps(rng.choice([[1, 2], "s", 5, None, True, []])).encode()
    elif kind == 1:
        body = valid[: rng.randint(1, len(valid) - 1)]
    elif kind == 2:
        body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
        if body[:1] == b"{":
            body = b"?" + body
    elif kind == 3:  # invalid UTF-8 inside a string
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"])
        body = b'{"prompt": "a' + bad + b'b", "max_tokens": 1}'
    elif kind == 4:
        depth = rng.randint(1100, 20000)
        opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        body = b'{"prompt": 5, "extra": ' + opener * depth + b"1" + closer * depth + b"}"
        if rng.random() < 0.5:
            body = opener * depth + closer * depth
    elif kind == 5:
        body = b'{"prompt": "x", "seed": ' + b"7" * rng.randint(4400, 9000) + b"}"
    elif kind == 6:
        body = b"\xef\xbb\xbf" + valid
    elif kind == 7:
        body = rng.choice([b"{}", b'{"prompt": null}', b'{"messages": []}', b" ", b"null"])
    elif kind == 8:
        body = valid.replace(b"0}", rng.choice([b"NaN}", b"Infinity}", b"-Infinity}", b"1e999}"]))
    elif kind == 9:  # UTF-16 / UTF-32 encodings of valid JSON
        body = json.dumps(COMPLETION).encode(rng.choice(["utf-16", "utf-16-le", "utf-32"]))
    elif kind == 10:
        body = valid + b" trailing"
    else:
        body = b'{"prompt": "x",' * rng.randint(1, 5) + b"}"
    return f"body kind {kind}", post(body)


PROTOCOL_KINDS = 16


def mutate_protocol(rng: random.Random, kind: int) -> tuple[str, bytes]:
    bad_json = b'{"prompt": 5}'
    if kind == 0:
        method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "get", "post",
                             "".join(rng.choice("ABCDEFXYZ_-") for _ in range(rng.randint(1, 12)))])
        path = rng.choice(["/v1/completions", "/v1/chat/completions", "/health", "/v1/models", "/nope"])
        data = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    elif kind == 1:
        path = rng.choice(["/", "/v1", "/v1/completion", "/v2/completions", "*", "/%00", "/v1/completions/x",
                           "/" + "".join(rng.choice("abc/%.") for _ in range(rng.randint(1, 30)))])
        data = post(bad_json, path=path)
    elif kind == 2:
        cl = rng.choice(["abc", "-1", "+5", "0x10", "1e3", "", " ", "5 5", "99999999999999999999", "\xb2"])
        data = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {cl}\r\n\r\n".encode("latin-1")
                + bad_json)
    elif kind == 3:
        data = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(bad_json)}\r\n"
                f"Content-Length: {len(bad_json) + rng.randint(1, 9)}\r\n\r\n").encode() + bad_json
    elif kind == 4:
        data = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    elif kind == 5:
        data = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BODY + rng.randint(1, 10**9)}\r\n\r\n"
        data = data.encode() + b"x" * rng.randint(0, 5000)
    elif kind == 6:  # fewer bytes than announced: the server times out (1 s) with a 408
        data = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(bad_json) + 10}\r\n\r\n".encode()
        data += bad_json if rng.random() < 0.9 else b""
    elif kind == 7:
        line = bytes(rng.randrange(256) for _ in range(rng.randint(1, 80))).replace(b"\n", b"")
        data = line + b"\r\n\r\n"
    elif kind == 8:
        version = rng.choice(["HTTP/1.1.1", "HTTQ/1.1", "HTTP/a.b", "HTTP/", "HTTP/1", "http/1.1", "HTTP/01234567890.1"])
        data = f"POST /v1/completions {version}\r\nHost: x\r\n\r\n".encode()
    elif kind == 9:
        data = b"GET /" + b"a" * rng.randint(65540, 80000) + b" HTTP/1.1\r\n\r\n"
    elif kind == 10:
        data = b"GET /health HTTP/1.1\r\nX-Long: " + b"v" * rng.randint(65540, 70000) + b"\r\n\r\n"
    elif kind == 11:
        data = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(rng.randint(101, 300))) + b"\r\n"
    elif kind == 12:  # header garbage in front of an invalid body: whatever the parser makes of it, a 4xx
        junk = rng.choice([b"NoColonHere", b": empty-name", b"X-Y:\x00\x01", b" folded continuation", b"\xff\xfe: x"])
        data = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + junk + b"\r\nContent-Length: "
                + str(len(bad_json)).encode() + b"\r\nConnection: close\r\n\r\n" + bad_json)
    elif kind == 13:
        data = rng.choice([b"POST /v1/completions\r\n\r\n", b"GET /health\r\n\r\n", b"DELETE /\r\n\r\n"])
    elif kind == 14:
        data = post(bad_json, extra="Expect: 100-continue\r\n")
    else:
        data = post(bad_json, extra=rng.choice(["Content-Type: text/plain\r\n", "Content-Encoding: gzip\r\n",
                                                "Accept: */*\r\n"]))
    return f"protocol kind {kind}", data


def test_malformed_requests_all_get_json_4xx(server, engine):
    port = server.server_address[1]
    rng = random.Random(SEED)
    fields = field_cases(rng, engine.ctx_size, engine.vocab_limit)
    cases = [field_request(*c) for c in fields]  # every pool entry once, then random picks
    cases += [mutate_body(rng, k) for k in range(BODY_KINDS) for _ in range(2)]
    cases += [mutate_protocol(rng, k) for k in range(PROTOCOL_KINDS) for _ in range(2)]
    while len(cases) < CASES:
        gen = rng.randrange(3)
        cases.append(field_request(*rng.choice(fields)) if gen == 0 else
                     mutate_body(rng, rng.randrange(BODY_KINDS)) if gen == 1 else
                     mutate_protocol(rng, rng.randrange(PROTOCOL_KINDS)))
    statuses = {}
    for i, (label, data) in enumerate(cases):
        status, headers, body = exchange(port, data)
        where = f"case {i} ({label}): {data[:120]!r} -> {status} {body[:200]!r}"
        assert 400 <= status < 500, where
        if data.split(b" ", 1)[0] != b"HEAD":
            assert headers["Content-Type"] == "application/json", where
            err = json.loads(body)["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], where
            assert "Traceback" not in err["message"], where
        statuses[status] = statuses.get(status, 0) + 1
    assert len(statuses) >= 5  # the mix reached many kinds of rejection (400, 404, 405, 411, 413, ...)
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "ok"}
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    deadline = time.monotonic() + 10
    while server.active_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.active_connections == 0  # no handler thread is left behind


def test_random_option_values_are_answered_200_or_400(server):
    """Options of the right type with random values, valid or not: every one gets 200 or a
    400 (never a 500, never a dropped connection), streamed or not."""
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rng = random.Random(SEED + 1)
    seen = set()
    for i in range(40):
        req = {
            "prompt": rng.choice(["def f():", "x", "héllo ✓ 你好", "\x00\x01"]),
            "max_tokens": rng.randint(-1, 3),
            "temperature": rng.choice([0, 1e-4, 1e-3, rng.uniform(-0.5, 11)]),
            "top_p": rng.choice([1.0, 1e-12, rng.uniform(-0.2, 1.2)]),
            "top_k": rng.randint(-2, 500),
            "min_p": rng.uniform(-0.2, 1.2),
            "repetition_penalty": rng.choice([1.0, rng.uniform(-0.5, 11)]),
            "seed": rng.choice([None, rng.randint(-(2**64), 2**65)]),
            "stop": rng.choice([[], ["\n"], "x", ["", "a"]]),
            "ignore_eos": rng.random() < 0.5,
            "stream": rng.random() < 0.3,
        }
        r = requests.post(f"{url}/v1/completions", json=req, timeout=60)
        where = f"case {i}: {req} -> {r.status_code} {r.text[:300]}"
        assert r.status_code in (200, 400), where
        if r.status_code == 400:
            assert r.json()["error"]["message"], where
        elif req["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]"), where
        else:
            assert r.json()["usage"]["completion_tokens"] <= req["max_tokens"], where
        seen.add(r.status_code)
    assert seen == {200, 400}
