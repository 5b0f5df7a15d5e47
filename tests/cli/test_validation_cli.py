"""Options are checked before any work, the same way in the API and the CLI: sampling
values, thread counts, output paths, the context size (issue: reliability)."""

from __future__ import annotations

import json
import math
import re

import pytest

import edgemoe
from edgemoe.errors import ContextLengthError, InvalidArgument

from .helpers import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def engine():
    e = edgemoe.load()  # the bundled model: 256 positions
    yield e
    e.close()


BAD_SAMPLING = [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": 1e-300}, "too small"),
    ({"temperature": -1}, "temperature must be in"),
    ({"temperature": "0.5"}, "temperature must be a number"),
    ({"min_p": 1.5}, "min_p must be in"),
    ({"min_p": -0.1}, "min_p must be in"),
    ({"min_p": math.nan}, "min_p must be a finite number"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_p": 1.01}, "top_p must be in"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"top_k": -1}, "top_k must be an integer"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"repetition_penalty": math.nan}, "repetition_penalty must be a finite number"),
    ({"repetition_penalty": math.inf}, "repetition_penalty must be a finite number"),
    ({"repetition_penalty": 0}, "repetition_penalty must be in"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be in"),
    ({"seed": 2**64}, "seed must be an integer"),
    ({"seed": -(2**63) - 1}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"max_tokens": True}, "max_tokens must be an integer >= 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SAMPLING)
def test_api_refuses_bad_sampling_options_before_running(engine, kwargs, message):
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")):
        engine.stream("def f", **kwargs)  # raised at the call: nothing has been generated


def test_extreme_but_valid_options_run(engine):
    for kw in ({"seed": 2**64 - 1, "temperature": 1.0}, {"seed": -(2**63), "temperature": 1.0},
               {"temperature": 1e-6, "seed": 0}, {"temperature": 100.0, "seed": 1}, {"min_p": 1.0, "temperature": 1.0}):
        r = engine.generate("def f", max_tokens=3, ignore_eos=True, **kw)
        assert len(r.token_ids) == 3


@pytest.mark.parametrize("flags,message", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "1e-300"], "too small"),
    (["--min-p", "2"], "min_p must be in"),
    (["--top-p", "0"], "top_p must be in"),
    (["--repetition-penalty", "inf"], "repetition_penalty must be a finite number"),
    (["--seed", str(2**64)], "seed must be an integer"),
    (["--threads", "10000"], "threads must be at least 1 and at most"),
    (["--threads", "0"], "threads must be at least 1"),
    (["--ctx-size", "0"], "ctx_size must be a positive integer"),
    (["--ctx-size", "100000"], "more than the 256 positions"),
    (["-n", "300"], "more than the context size of 256"),
    (["--record-trace", "/nonexistent/dir/t.npz"], "directory /nonexistent/dir does not exist"),
])
def test_cli_refuses_bad_options_cleanly(flags, message):
    proc = run_cli("generate", "-p", "def f", *flags)
    assert_clean_error(proc, message)
    assert proc.stdout == ""  # refused before generating anything


def test_threads_bound_in_the_api():
    with pytest.raises(InvalidArgument, match="at most"):
        edgemoe.load(threads=10_000)


def test_output_paths_checked_before_work(tmp_path):
    assert_clean_error(run_cli("trace", "-o", "/nonexistent/dir/t.npz"), "-o /nonexistent/dir/t.npz")
    assert_clean_error(run_cli("trace", "-o", tmp_path), "is a directory")
    assert_clean_error(run_cli("profile", "-o", "/nonexistent/p.json"), "directory /nonexistent does not exist")


def test_prompt_longer_than_the_context_is_refused(engine):
    ids = [5] * 923  # the bundled model has 256 positions
    with pytest.raises(ContextLengthError, match=r"prompt \(923 tokens\).*context size of 256"):
        engine.stream(ids, max_tokens=1)
    with pytest.raises(ContextLengthError, match="context size of 256"):
        engine.stream(ids[:250], max_tokens=7)
    proc = run_cli("generate", "-p", "def f(x): return x\n" * 60, "-n", "4")
    assert_clean_error(proc, "more than the context size of 256")


def test_default_max_tokens_fits_the_context(engine):
    r = engine.generate([5] * 250, ignore_eos=True)  # no max_tokens: 256 - 250 positions are left
    assert len(r.token_ids) == 6 and r.finish_reason == "length"
    assert r.stats.ctx_size == 256 and r.stats.kv_used_bytes <= r.stats.kv_bytes


def test_token_ids_checked_against_the_embedding(engine):
    with pytest.raises(InvalidArgument, match="not an id of this model's vocabulary"):
        engine.stream([1, engine.vocab_limit], max_tokens=1)
    with pytest.raises(InvalidArgument, match="empty"):
        engine.stream([], max_tokens=1)


def test_kv_bytes_in_the_stats():
    proc = run_cli("generate", "-p", "def f", "-n", "4", "--ignore-eos", "--ctx-size", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)["stats"]
    e = edgemoe.load(ctx_size=64)
    try:
        per_token = e.model.kv_bytes_per_token()
    finally:
        e.close()
    assert s["ctx_size"] == 64 and s["kv_bytes"] == 64 * per_token
    assert s["kv_used_bytes"] == (s["prompt_tokens"] + 3) * per_token  # the last token is never fed back


def test_chat_drops_the_oldest_turns_when_the_context_is_full():
    long = "word " * 80
    proc = run_cli("chat", "--ctx-size", "48", "-n", "4", "--temperature", "0",
                   input="hello there my friend\nwhat is this thing\nanother message here\n" + long + "\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"context full: dropped the \d+ oldest messages? to fit 48 tokens", proc.stderr), proc.stderr
    assert "does not fit the context of 48 tokens" in proc.stderr  # the 80-word message alone
    assert "Traceback" not in proc.stderr
