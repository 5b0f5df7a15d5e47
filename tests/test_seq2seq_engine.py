"""Encoder-decoder models end to end (issue 14 §1): `edgemoe.load` -> Engine.generate /
stream run text-to-text on a tiny Switch Transformers model, from its Hugging Face
directory and converted under the smallest memory budget; `edgemoe generate`; the server's
/v1/completions (streamed and not) and its refusals; `edgemoe serve --parallel N` falling
back to one sequence at a time. The reference is edgemoe.seq2seq on the in-RAM model,
itself checked against transformers in tests/test_seq2seq.py."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import threading

import pytest
import requests
import torch

import edgemoe
from edgemoe import seq2seq
from edgemoe.checkpoint import load_hf
from edgemoe.cli import run as cli_run
from edgemoe.errors import ContextLengthError, InvalidArgument
from edgemoe.sample import make_sampler
from edgemoe.server import make_server
from edgemoe.store.convert import convert

from models import seq2seq_parity as sp
from models.families import test_switch_transformers as switch

PROMPT = "translate English to German: The quick brown fox."
NEW = 8
CTX = 64

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_switch(out, tokenizer_dir, chat_template: bool = True):
    """The first tiny Switch config (capacity drops in the encoder), with the test tokenizer."""
    sp.save(next(iter(switch.SEQ2SEQ_CONFIGS.values()))(), out, gain=switch.GAIN)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    if not chat_template:
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        cfg.pop("chat_template")
        (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer_dir):
    """(Hugging Face dir without a chat template, its conversion, the smallest budget)."""
    d = tmp_path_factory.mktemp("switch")
    hf = save_switch(d / "hf", tokenizer_dir, chat_template=False)
    conv = convert(hf, d / "conv").out
    probe = edgemoe.load(conv, ctx_size=CTX)
    smallest = probe.info["min_budget_bytes"]
    probe.close()
    return hf, conv, smallest


@pytest.fixture(scope="module")
def reference(dirs):
    """The in-RAM model, its tokenizer's source ids for PROMPT and seq2seq's greedy target."""
    hf = dirs[0]
    engine = edgemoe.load(hf, ctx_size=CTX)
    source = engine.tokenizer.encode(PROMPT)
    target = seq2seq.generate(engine.model, source, max_tokens=NEW, ignore_eos=True)
    return engine, source, target


def test_engine_generate_is_seq2seq(dirs, reference):
    """Greedy and seeded sampling through the Engine give seq2seq's tokens, from the
    Hugging Face directory and converted at the smallest budget; stats describe the run
    (offloaded: the runtime's counters too)."""
    engine, source, target = reference
    model = engine.model
    sampled = list(seq2seq.generate_step(model, source, make_sampler(0.9, top_k=20, seed=7), max_tokens=NEW))
    conv, smallest = dirs[1], dirs[2]
    with edgemoe.load(conv, memory=smallest, ctx_size=CTX) as offloaded:
        for e in (engine, offloaded):
            r = e.generate(PROMPT, max_tokens=NEW, ignore_eos=True)
            assert r.token_ids == target and r.finish_reason == "length"
            assert r.text == e.tokenizer.decode(target)
            assert r.stats.prompt_tokens == len(source) and r.stats.generated_tokens == NEW
            assert r.stats.ctx_size == CTX and r.stats.kv_bytes == CTX * model.kv_bytes_per_token()
            # filled: the source's cross-attention K/V and the decoder start + NEW - 1 target positions
            assert r.stats.kv_used_bytes == (len(source) + NEW) * model.kv_bytes_per_token() // 2
            assert e.generate(PROMPT, max_tokens=NEW, ignore_eos=True, temperature=0.9, top_k=20,
                              seed=7).token_ids == sampled
        stats = offloaded.generate(PROMPT, max_tokens=NEW, ignore_eos=True).stats.extra
        assert stats["misses"] > 0 and stats["budget_bytes"] == smallest
        assert stats["forward_tokens"] == len(source) + NEW  # the encoder once, then one token per step


def test_stream_logprobs_stop_and_processors(reference):
    """Streamed deltas join to the text; log-probabilities are the model's own; a logits
    processor sees the target so far (decoder start first); a stop string cuts the text."""
    engine, source, target = reference
    parts, entries = [], []
    for r in engine.stream(PROMPT, max_tokens=NEW, ignore_eos=True, logprobs=2):
        parts.append(r.text)
        if r.logprobs is not None:
            entries.append(r.logprobs)
    assert "".join(parts) == engine.tokenizer.decode(target)
    want = [lp for _, lp in seq2seq.generate_step(engine.model, source, max_tokens=NEW, logprobs=True)]
    assert [e.token for e in entries] == target and len(entries[0].top) == 2
    for e, lp in zip(entries, want):
        assert e.logprob == pytest.approx(float(lp[e.token]), abs=1e-5)

    forced = engine.tokenizer.encode("hello world foo", add_special_tokens=False)
    seen = []

    def force(context, logits):  # the target so far: the decoder start, then what was generated
        seen.append(list(context))
        out = torch.full_like(logits, -1e9)
        out[forced[len(context) - 1]] = 0.0
        return out

    r = engine.generate(PROMPT, max_tokens=len(forced), logits_processors=[force], stop=["world"])
    assert r.text == "hello " and r.finish_reason == "stop"
    assert seen[0] == [engine.model.args.decoder_start_token_id]


def test_context_and_refusals(reference, dirs):
    """The source and the target each fit ctx_size; options that cannot apply are refused
    by name."""
    engine, source, _ = reference
    assert engine.room(len(source)) == CTX  # the default max_tokens: the whole target room
    with pytest.raises(ContextLengthError, match="the source, 65 tokens"):
        engine.generate([5] * (CTX + 1), max_tokens=1)
    with pytest.raises(ContextLengthError, match=f"max_tokens \\({CTX + 1}\\) is more than the {CTX} target tokens"):
        engine.generate(PROMPT, max_tokens=CTX + 1)
    assert len(engine.generate([5] * CTX, max_tokens=CTX, ignore_eos=True).token_ids) == CTX  # both full
    with pytest.raises(InvalidArgument, match="^cache: an encoder-decoder model"):
        engine.generate(PROMPT, cache=engine.new_cache())
    with pytest.raises(InvalidArgument, match="^prompt_logprobs"):
        engine.generate(PROMPT, prompt_logprobs=True, max_tokens=1)
    with pytest.raises(InvalidArgument, match="no batch scheduler"):
        engine.scheduler
    with pytest.raises(InvalidArgument, match="parallel 2: an encoder-decoder model decodes one sequence at a time"):
        edgemoe.load(dirs[0], parallel=2)


def test_batch_and_threads_take_turns(reference):
    """generate_batch runs its prompts one after another; calls from several threads (the
    server's) take turns for whole sequences and each gets its own answer."""
    engine, _, _ = reference
    prompts = ["a b c", "hello world", "def add(a, b):"]
    want = [engine.generate(p, max_tokens=5, ignore_eos=True).token_ids for p in prompts]
    assert [c.token_ids for c in engine.generate_batch(prompts, max_tokens=5, ignore_eos=True)] == want
    engine.start_batching()  # no scheduler: a no-op
    got = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(
        i, engine.generate(prompts[i], max_tokens=5, ignore_eos=True).token_ids)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want


def test_close_ends_the_running_sequence(dirs):
    """Engine.close waits for the step in progress; the running sequence then ends with an
    error, and no call starts after it."""
    from edgemoe.errors import EdgeMoEError

    engine = edgemoe.load(dirs[0], ctx_size=CTX)
    responses = engine.stream(PROMPT, max_tokens=NEW, ignore_eos=True)
    assert next(responses).token is not None
    engine.close()
    with pytest.raises(EdgeMoEError, match="closed before this sequence finished"):
        list(responses)
    with pytest.raises(EdgeMoEError, match="the engine is closed"):
        engine.generate(PROMPT, max_tokens=1)


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_run([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_generate(dirs, reference, tmp_path):
    """`edgemoe generate MODEL -p "translate English to German: ..."` on both directories;
    a routing trace recorded with --record-trace replays through the belady policy (the
    other stack's layers of each forward asked for nothing)."""
    hf, conv, smallest = dirs
    _, _, target = reference
    trace = tmp_path / "t.npz"
    for model, extra in ((hf, ()), (conv, ("--memory", smallest, "--record-trace", trace)),
                         (conv, ("--memory", smallest, "--cache-policy", "belady", "--trace", trace))):
        code, out, err = cli("generate", model, "-p", PROMPT, "-n", NEW, "--ignore-eos", "--ctx-size", CTX,
                             "--json", "-t", 1, *extra)
        assert code == 0, err
        assert json.loads(out)["token_ids"] == target
    assert json.loads(out)["load"]["cache_policy"] == "belady"
    code, out, err = cli("generate", hf, "-p", PROMPT, "-n", 3, "--chat", "-t", 1)
    assert code == 1 and "has no chat template" in err and "Traceback" not in err
    code, out, err = cli("chat", hf, "-t", 1)
    assert code == 1 and "edgemoe chat continues one conversation in a prompt cache" in err


@pytest.fixture(scope="module")
def url(dirs):
    engine = edgemoe.load(dirs[1], memory=dirs[2], ctx_size=CTX)
    server = make_server(engine, port=0, model_name="switch")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    engine.close()


def test_server_completions(url, reference):
    """/v1/completions runs text-to-text, streamed and not, a batch of prompts too."""
    _, _, target = reference
    engine = reference[0]
    req = {"prompt": PROMPT, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    body = requests.post(f"{url}/v1/completions", json=req).json()
    assert body["choices"][0]["text"] == engine.tokenizer.decode(target)
    assert body["usage"]["completion_tokens"] == NEW and body["stats"]["misses"] > 0
    with requests.post(f"{url}/v1/completions", json={**req, "stream": True}, stream=True) as r:
        events = [x[6:] for x in r.iter_lines(decode_unicode=True) if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]
    batch = requests.post(f"{url}/v1/completions", json={**req, "prompt": [PROMPT, "hello"], "max_tokens": 3}).json()
    assert [c["text"] for c in batch["choices"]] == [engine.generate(p, max_tokens=3, ignore_eos=True).text
                                                     for p in (PROMPT, "hello")]


def test_server_refusals(url):
    """Chat without a chat template, echo scoring and a source beyond the context are
    400s naming the field."""
    r = requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "has no chat template" in r.json()["error"]["message"]
    r = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, "echo": True, "logprobs": 1, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    r = requests.post(f"{url}/v1/completions", json={"prompt": [5] * (CTX + 1), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = requests.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": CTX + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_serve_parallel_falls_back(dirs, monkeypatch):
    """`edgemoe serve --parallel 4` on an encoder-decoder model says at startup that
    requests run one at a time, and serves them."""
    import edgemoe.server as server_module

    started, ready = [], threading.Event()
    make = server_module.make_server

    def capture(*args, **kwargs):
        started.append(make(*args, **kwargs))
        ready.set()
        return started[-1]

    monkeypatch.setattr(server_module, "make_server", capture)
    handlers = list(logging.getLogger("edgemoe.server").handlers)
    err, result = io.StringIO(), {}

    def serve():
        with contextlib.redirect_stderr(err):
            result["code"] = cli_run(["serve", str(dirs[0]), "--port", "0", "-t", "1", "--parallel", "4",
                                      "--ctx-size", str(CTX)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the server did not start"
        port = started[0].server_address[1]
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200
    finally:
        if started:
            started[0].shutdown()
        thread.join(60)
        logger = logging.getLogger("edgemoe.server")
        for h in logger.handlers[len(handlers):]:
            logger.removeHandler(h)
    assert result.get("code") == 0
    assert "is an encoder-decoder model: requests run one at a time" in err.getvalue()
    assert "1 slot of 64 tokens" in err.getvalue()
