"""The OpenAI-compatible server, driven over real HTTP."""

import json
import re
import subprocess
import sys
import threading

import pytest
import requests

import edgemoe
from edgemoe.server import make_server


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    from conftest import save_checkpoint, tiny_config

    out = tmp_path_factory.mktemp("srv") / "mixtral"
    save_checkpoint(tiny_config("mixtral"), out, tokenizer_dir)
    return edgemoe.load(out)


@pytest.fixture(scope="module")
def url(engine):
    server = make_server(engine, port=0, model_name="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sse_chunks(resp):
    events = [l[len("data: "):] for l in resp.iter_lines(decode_unicode=True) if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_and_health(url):
    assert requests.get(f"{url}/health").json() == {"status": "ok"}
    data = requests.get(f"{url}/v1/models").json()["data"]
    assert data[0]["id"] == "tiny"


def test_completion_matches_engine(url, engine):
    r = requests.post(f"{url}/v1/completions", json={"prompt": "def f():", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    ref = engine.generate("def f():", max_tokens=6)
    assert body["choices"][0]["text"] == ref.text
    assert body["usage"]["completion_tokens"] == ref.stats.generated_tokens
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")


def test_streamed_completion_equals_non_streamed(url):
    req = {"prompt": "import os", "max_tokens": 8, "temperature": 0}
    full = requests.post(f"{url}/v1/completions", json=req).json()["choices"][0]["text"]
    with requests.post(f"{url}/v1/completions", json={**req, "stream": True}, stream=True) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        chunks = sse_chunks(r)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completion_and_stream(url, engine):
    msgs = [{"role": "user", "content": "hello"}]
    body = requests.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0}).json()
    ref = engine.chat(msgs, max_tokens=5)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
    with requests.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0,
                                                           "stream": True}, stream=True) as r:
        chunks = sse_chunks(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref.text


def test_token_id_prompt(url, engine):
    ids = engine.tokenizer.encode("class A:")
    r = requests.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == engine.generate(ids, max_tokens=3).text


@pytest.mark.parametrize("path,payload,param", [
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [10 ** 9]}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
])
def test_bad_requests_get_400_with_param(url, path, payload, param):
    r = requests.post(f"{url}{path}", json=payload)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_malformed_bodies(url):
    r = requests.post(f"{url}/v1/completions", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(f"{url}/v1/completions", data=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = requests.post(f"{url}/v1/completions", data=b"x" * (4 * 1024 * 1024 + 1))
    assert r.status_code == 413
    assert requests.post(f"{url}/v1/nothing", json={}).status_code == 404
    assert requests.get(f"{url}/v1/nothing").status_code == 404


def test_concurrent_requests_are_served(url):
    results = []

    def call():
        r = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4, "temperature": 0})
        results.append(r.json()["choices"][0]["text"])

    threads = [threading.Thread(target=call) for _ in range(3)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    assert len(results) == 3 and len(set(results)) == 1


def test_serve_cli_end_to_end(engine):
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe", "serve", str(engine.path), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r":(\d+)/v1", line).group(1))
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
