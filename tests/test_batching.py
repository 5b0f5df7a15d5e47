"""The batch scheduler (edgemoe.batching) through Engine.generate_batch and concurrent
Engine.stream calls: every sequence gets what it gets alone (tokens, text, stop strings,
max_tokens, sampling with a seed, log-probabilities, prompt scoring), slots are freed by
sequences that end or are dropped, more sequences than slots wait, and the memory budget
holds one KV cache per slot."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import save_checkpoint, tiny_config

import edgemoe
from edgemoe.batching import MAX_PARALLEL, BatchScheduler
from edgemoe.errors import BudgetError, EdgeMoEError, InvalidArgument
from edgemoe.generate import PromptCache
from edgemoe.utils import format_bytes

PROMPTS = ["def add(a, b):", "class Point:\n    def __init__(self", "import os\nimport sys\nfor i in", "The quick",
           "print(i, 'h"]
SLOTS = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("batching") / "mixtral"
    save_checkpoint(tiny_config("mixtral", max_position_embeddings=256), out, tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def alone(model_dir):
    """An engine without batching: the reference."""
    engine = edgemoe.load(model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = edgemoe.load(model_dir, parallel=SLOTS)
    yield engine
    engine.close()


def same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)


def test_generate_batch_equals_each_prompt_alone(engine, alone):
    want = [alone.generate(p, max_tokens=24, ignore_eos=True) for p in PROMPTS]
    got = engine.generate_batch(PROMPTS, max_tokens=24, ignore_eos=True)  # 5 prompts, 3 slots: two wait
    for a, b in zip(got, want):
        same(a, b)
        assert a.stats.generated_tokens == 24 and a.stats.prompt_tokens == b.stats.prompt_tokens
        assert a.stats.ctx_size == 256 and a.stats.kv_used_bytes > 0
    s = engine.scheduler
    assert s.rows > s.steps  # decode steps did run several sequences at once
    assert not s.active and not s.waiting and len(s.free) == SLOTS


def test_options_are_per_sequence(engine, alone):
    """Concurrent calls with different options, each equal to the same call alone."""
    calls = [
        ("def add(a, b):", dict(max_tokens=30, stop=["\n"], ignore_eos=True)),
        ("class Point:", dict(max_tokens=5)),
        ("import os", dict(max_tokens=20, temperature=0.9, top_k=20, seed=3, ignore_eos=True)),
        ("The quick", dict(max_tokens=12, logprobs=3, ignore_eos=True)),
        ("for i in", dict(max_tokens=12, repetition_penalty=1.3, logit_bias={5: 4.0}, presence_penalty=0.5)),
        ("print(", dict(max_tokens=0, prompt_logprobs=True, logprobs=2)),
    ]
    want = [list(alone.stream(p, **o)) for p, o in calls]
    engine.start_batching()
    got: list = [None] * len(calls)

    def run(i: int) -> None:
        got[i] = list(engine.stream(calls[i][0], **calls[i][1]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (prompt, _), g, w in zip(calls, got, want):
        assert [(r.text, r.token, r.finish_reason) for r in g] == [(r.text, r.token, r.finish_reason) for r in w]
        for rg, rw in zip(g, w):
            assert (rg.logprobs is None) == (rw.logprobs is None)
            if rg.logprobs is not None:
                assert rg.logprobs.token == rw.logprobs.token
                assert rg.logprobs.logprob == pytest.approx(rw.logprobs.logprob, abs=1e-4)
                assert [t for t, _ in rg.logprobs.top] == [t for t, _ in rw.logprobs.top]
        if w[0].prompt_logprobs is not None:
            pg, pw = g[0].prompt_logprobs, w[0].prompt_logprobs
            assert len(pg) == len(pw) and pg[0] is None
            assert [e.logprob for e in pg[1:]] == pytest.approx([e.logprob for e in pw[1:]], abs=1e-4)


def test_closing_a_stream_frees_its_slot(engine, alone):
    engine.start_batching()
    s = engine.scheduler
    long = [engine.stream(p, max_tokens=200, ignore_eos=True) for p in PROMPTS[:SLOTS]]  # every slot taken
    try:
        for r in long:
            next(r)
        late = engine.stream(PROMPTS[3], max_tokens=6, ignore_eos=True)  # waits for a slot
        long[1].close()  # a stop string, a client that left, ...
        got = list(late)
        assert [r.token for r in got if r.token is not None] == alone.generate(PROMPTS[3], max_tokens=6,
                                                                                ignore_eos=True).token_ids
        assert len(s.active) == SLOTS - 1  # the two others still run
    finally:
        for r in long:
            r.close()
    deadline = threading.Event()
    for _ in range(50):
        if not s.active and len(s.free) == SLOTS:
            break
        deadline.wait(0.1)
    assert not s.active and len(s.free) == SLOTS


def test_a_failing_sequence_leaves_the_others_running(engine, alone):
    def broken(context, logits):
        if len(context) > 8:
            raise RuntimeError("processor failed")
        return logits

    engine.start_batching()
    bad = engine.stream("def add(a, b):", max_tokens=20, ignore_eos=True, logits_processors=[broken])
    good = engine.stream("class Point:", max_tokens=20, ignore_eos=True)
    with pytest.raises(RuntimeError, match="processor failed"):
        list(bad)
    assert [r.token for r in good if r.token is not None] == alone.generate("class Point:", max_tokens=20,
                                                                             ignore_eos=True).token_ids


def test_a_new_prompt_reuses_the_slot_holding_its_prefix(model_dir, alone):
    engine = edgemoe.load(model_dir, parallel=SLOTS)
    try:
        s = engine.scheduler
        engine.generate_batch(PROMPTS[:SLOTS], max_tokens=4, ignore_eos=True)  # one sequence left in each slot
        held = [list(c.tokens) for c in s.caches]
        assert all(held)
        follow = held[1] + [7, 8]  # the next turn of the second sequence
        got = engine.generate(follow, max_tokens=3, ignore_eos=True)
        assert s.caches[1].tokens[: len(follow)] == follow  # the slot holding its prefix took it
        assert [c.tokens for i, c in enumerate(s.caches) if i != 1] == [h for i, h in enumerate(held) if i != 1]
        assert got.token_ids == alone.generate(follow, max_tokens=3, ignore_eos=True).token_ids
    finally:
        engine.close()


def test_options_are_checked_before_anything_is_queued(engine):
    s = engine.scheduler
    before = s.prefills
    with pytest.raises(InvalidArgument):
        engine.generate_batch(["a", "b", [10**6]], max_tokens=4)  # the last id is not in the vocabulary
    with pytest.raises(InvalidArgument):
        engine.generate_batch("not a list")
    with pytest.raises(InvalidArgument):
        engine.generate_batch(["a"], cache=engine.new_cache())
    assert s.prefills == before and not s.waiting


def test_parallel_is_checked(model_dir):
    for bad in (0, -1, MAX_PARALLEL + 1, 2.0, True):
        with pytest.raises(InvalidArgument, match="parallel"):
            edgemoe.load(model_dir, parallel=bad)


def test_closed_engine_ends_waiting_sequences(model_dir):
    engine = edgemoe.load(model_dir, parallel=1)
    engine.start_batching()
    a = engine.stream("def", max_tokens=200, ignore_eos=True)
    b = engine.stream("class", max_tokens=200, ignore_eos=True)
    next(a)
    engine.close()
    for stream in (a, b):  # b never ran: an error, not a hang
        with pytest.raises(EdgeMoEError, match="engine was closed"):
            list(stream)
    with pytest.raises(EdgeMoEError, match="closed"):
        engine.stream("def", max_tokens=2)


def test_unsupported_family_scheduler_falls_back(model_dir, monkeypatch):
    """A model whose layers cannot take rows is decoded one row per forward, same tokens."""
    engine = edgemoe.load(model_dir, parallel=2)
    ref = edgemoe.load(model_dir)
    try:
        s = engine.scheduler
        s.rows_ok = False
        got = engine.generate_batch(PROMPTS[:2], max_tokens=10, ignore_eos=True)
        assert [r.token_ids for r in got] == [ref.generate(p, max_tokens=10, ignore_eos=True).token_ids
                                              for p in PROMPTS[:2]]
    finally:
        engine.close()
        ref.close()


# -- offloaded experts and the memory budget


@pytest.fixture(scope="module")
def converted(model_dir, tmp_path_factory):
    from edgemoe.store.convert import convert

    out = tmp_path_factory.mktemp("conv") / "out"
    convert(model_dir, out)
    return out


def test_offloaded_batch_equals_in_ram_alone(converted, alone):
    engine = edgemoe.load(converted, memory=None, parallel=SLOTS)
    budget = engine.info["min_budget_bytes"]
    engine.close()
    want = [alone.generate(p, max_tokens=12, ignore_eos=True).token_ids for p in PROMPTS]
    for memory, prefetch in ((budget, True), (budget, False), (None, False)):
        engine = edgemoe.load(converted, memory=memory, parallel=SLOTS, prefetch=prefetch)
        try:
            got = engine.generate_batch(PROMPTS, max_tokens=12, ignore_eos=True)
            assert [r.token_ids for r in got] == want, (memory, prefetch)
        finally:
            engine.close()


def test_budget_counts_one_kv_cache_per_slot(converted):
    one = edgemoe.load(converted, memory=None, ctx_size=128)
    four = edgemoe.load(converted, memory=None, ctx_size=128, parallel=4)
    try:
        kv = one.info["kv_bytes"]
        assert four.info["kv_bytes"] == 4 * kv and four.info["parallel"] == 4
        assert four.info["min_budget_bytes"] - one.info["min_budget_bytes"] >= 3 * kv
        need = four.info["min_budget_bytes"]
        assert one.info["min_budget_bytes"] < need
    finally:
        one.close()
        four.close()
    with pytest.raises(BudgetError) as e:  # enough for one slot, not for four
        edgemoe.load(converted, memory=need - 1, ctx_size=128, parallel=4)
    msg = str(e.value)
    assert "x 4 slots" in msg and format_bytes(4 * kv) in msg and f"--memory {need}" in msg and "--parallel" in msg
    engine = edgemoe.load(converted, memory=need, ctx_size=128, parallel=4)
    engine.close()


def test_default_context_shrinks_to_fit_the_slots(converted):
    one = edgemoe.load(converted, memory=None)
    budget = one.info["min_budget_bytes"] + 4 * 256 * (one.info["kv_bytes"] // one.info["ctx_size"]) + 2_000_000
    one.close()
    a = edgemoe.load(converted, memory=budget)
    b = edgemoe.load(converted, memory=budget, parallel=8)
    try:
        assert b.info["ctx_size"] <= a.info["ctx_size"]
        assert b.info["kv_bytes"] + b.info["resident_bytes"] + b.info["workspace_bytes"] <= budget
    finally:
        a.close()
        b.close()


def test_scheduler_needs_a_slot(engine):
    with pytest.raises(ValueError):
        BatchScheduler(engine.model, [])
    assert isinstance(engine.scheduler.caches[0], PromptCache)


def test_a_call_with_its_own_cache_takes_turns_with_the_scheduler(engine, alone):
    """An explicit cache runs outside the slots, on the caller's thread; with the scheduler's
    thread running, the two take turns at the model (both give what they give alone)."""
    engine.start_batching()
    want = alone.generate("class Point:", max_tokens=16, ignore_eos=True).token_ids
    background = [engine.stream(p, max_tokens=40, ignore_eos=True) for p in PROMPTS[:2]]
    cache = engine.new_cache()
    got = engine.generate("class Point:", max_tokens=16, ignore_eos=True, cache=cache).token_ids
    outs = [[r.token for r in s if r.token is not None] for s in background]
    assert got == want
    assert outs == [alone.generate(p, max_tokens=40, ignore_eos=True).token_ids for p in PROMPTS[:2]]
