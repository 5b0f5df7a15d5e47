"""Concurrent requests over HTTP share decode steps (edgemoe serve --parallel): each
request gets the tokens it gets alone, streaming or not, with its own stop strings,
max_tokens, sampling and log-probabilities; more requests than slots wait; a client that
leaves frees its slot."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import save_checkpoint, tiny_config

import edgemoe
from edgemoe.server import make_server

SLOTS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("parallel") / "mixtral"
    save_checkpoint(tiny_config("mixtral", max_position_embeddings=512), out, tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = edgemoe.load(model_dir, parallel=SLOTS)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def url(engine):
    server = make_server(engine, port=0, model_name="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


GREEDY = {"temperature": 0}  # OpenAI's default temperature is 1
BODIES = [
    {"prompt": "def add(a, b):", "max_tokens": 40, "ignore_eos": True, **GREEDY},
    {"prompt": "class Point:", "max_tokens": 30, "stop": ["\n\n", "self"], "ignore_eos": True, **GREEDY},
    {"prompt": "import os\nimport", "max_tokens": 7, **GREEDY},
    {"prompt": "The quick brown", "max_tokens": 25, "temperature": 0.8, "seed": 11, "ignore_eos": True},
    {"prompt": "for i in range(", "max_tokens": 20, "logprobs": 2, "ignore_eos": True, **GREEDY},
    {"prompt": ["x = 1", "y = 2"], "max_tokens": 15, "ignore_eos": True, **GREEDY},  # two prompts: two slots
    {"prompt": "a", "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 5},  # two samples: two slots
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "ignore_eos": True, **GREEDY},
    {"prompt": "print(", "max_tokens": 0, "echo": True, "logprobs": 1},
]


def post(url: str, body: dict, stream: bool) -> list:
    """The choices' texts (and tokens' log-probabilities) of one request, streamed or not."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = requests.post(url + path, json=dict(body, stream=stream), timeout=120, stream=stream)
    assert r.status_code == 200, r.text
    chat = "messages" in body
    if not stream:
        out = []
        for c in r.json()["choices"]:
            text = c["message"]["content"] if chat else c["text"]
            lp = c["logprobs"]
            out.append((c["index"], text, c["finish_reason"], _round(lp)))
        return sorted(out, key=lambda x: x[0])
    texts, finish = {}, {}
    for line in r.iter_lines(decode_unicode=True):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for c in json.loads(line[6:])["choices"]:
            piece = c["delta"].get("content") if chat else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + (piece or "")
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    return sorted((i, texts[i], finish.get(i)) for i in texts)


def _round(lp):
    """Log-probabilities to 4 decimals: batched matmuls round differently in the last bits."""
    if lp is None:
        return None
    values = lp.get("token_logprobs") if "token_logprobs" in lp else [e["logprob"] for e in lp["content"]]
    return [None if v is None else round(v, 4) for v in values]


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_requests_get_what_they_get_alone(url, engine, stream):
    want = [post(url, b, stream) for b in BODIES]  # one at a time
    steps, rows = engine.scheduler.steps, engine.scheduler.rows
    got: list = [None] * len(BODIES)

    def run(i: int) -> None:
        got[i] = post(url, BODIES[i], stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(BODIES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want
    assert engine.scheduler.rows - rows > engine.scheduler.steps - steps  # steps did hold several requests


def test_more_requests_than_slots_wait_their_turn(url, engine):
    bodies = [{"prompt": f"x = {i}", "max_tokens": 12, "ignore_eos": True, **GREEDY} for i in range(3 * SLOTS)]
    want = [post(url, b, False) for b in bodies]
    got: list = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, post(url, bodies[i], False)))
               for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_client_that_leaves_frees_its_slot(url, engine):
    port = int(url.rsplit(":", 1)[1])
    s = engine.scheduler
    socks = []
    for i in range(SLOTS):  # every slot busy with a long stream
        body = json.dumps({"prompt": f"def f{i}(", "max_tokens": 400, "ignore_eos": True, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        socks.append(sock)
    try:
        time.sleep(0.3)
        socks[0].close()
        t0 = time.monotonic()
        r = requests.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and time.monotonic() - t0 < 20
    finally:
        for sock in socks:
            sock.close()
    for _ in range(100):
        if not s.active and not s.waiting:
            break
        time.sleep(0.1)
    assert not s.active and not s.waiting and len(s.free) == SLOTS


def test_serve_parallel_option(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "--parallel", "0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "--parallel must be between 1 and 64" in out.stderr
    help_text = subprocess.run([sys.executable, "-m", "edgemoe", "serve", "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    assert "--parallel" in help_text and "default 4" in help_text


def test_serve_copy_of_max_parallel_matches():
    from edgemoe.batching import MAX_PARALLEL
    from edgemoe.cli import serve

    assert serve.MAX_PARALLEL == MAX_PARALLEL
