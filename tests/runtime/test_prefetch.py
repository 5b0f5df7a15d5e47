"""Expert preloading: the same tokens with and without it, protection of what the current
and next layers need, cancellation, late arrivals, errors from the loader threads, the read
throttle, and the trace / fit-predictor / generate commands."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import edgemoe
from edgemoe import assets
from edgemoe.errors import EdgeMoEError, StoreError
from edgemoe.runtime.cache import DEMAND, PREFETCH, CacheFull, ExpertCache
from edgemoe.runtime.policies import PolicyContext, make_policy
from edgemoe.runtime.fit import fit
from edgemoe.runtime.predict import PREDICTOR_FILE, PredictorStats
from edgemoe.runtime.trace import TraceRecorder
from edgemoe.store.reader import ExpertStore, ReadAborted
from edgemoe.store.throttle import CHUNK, TokenBucket, parse_rate

from store.helpers import PROMPTS, deadline, make_checkpoint, make_converted, min_budget, reference

N_NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """A tiny Mixtral with 8 experts x 4 layers, converted, with a predictor fitted on a
    routing trace of random token windows (not the test prompts)."""
    d = tmp_path_factory.mktemp("prefetch")
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir, num_local_experts=8, num_hidden_layers=4)
    ref = reference(hf)
    conv = make_converted(hf, d / "conv")
    engine = edgemoe.load(hf)
    rec = TraceRecorder(engine.model, lookahead=2)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(8):
            engine.model(torch.randint(2, 384, (1, 64), generator=g))
    trace = rec.save(d / "trace.npz")
    engine.close()
    fitted = d / "fitted"
    fitted.mkdir()
    fit([trace]).save(fitted / PREDICTOR_FILE)
    e = edgemoe.load(conv)
    lo, cache_min = e.info["min_budget_bytes"], e.info["min_cache_bytes"]
    e.close()
    # `resident`: what every budget holds besides the expert cache (resident weights, KV cache,
    # workspace), so that resident + k * cache_min leaves room for k layers' experts.
    return SimpleNamespace(hf=hf, conv=conv, ref=ref, trace=trace, predictor=fitted / PREDICTOR_FILE, lo=lo,
                           cache_min=cache_min, resident=lo - cache_min, dir=d)


def run(engine, prompts=PROMPTS, n=N_NEW):
    out, stats = [], []
    for p in prompts:
        r = engine.generate(p, max_tokens=n, ignore_eos=True)
        out.append(r.token_ids)
        stats.append(r.stats.extra)
    return out, stats


def with_predictor(tiny, tmp_path):
    """The converted model with the fitted predictor beside it (a private copy)."""
    import shutil

    conv = tmp_path / "conv"
    shutil.copytree(tiny.conv, conv)
    shutil.copy(tiny.predictor, conv / PREDICTOR_FILE)
    return conv


# ----------------------------------------------------------------------------- same tokens


@pytest.mark.parametrize("policy", ["lru", "lfu", "edgemoe"])
@pytest.mark.parametrize("budget", ["small", "unlimited"])
def test_prefetch_gives_the_same_tokens(tiny, tmp_path, policy, budget):
    conv = with_predictor(tiny, tmp_path)
    memory = tiny.resident + 3 * tiny.cache_min if budget == "small" else None
    seen = {}
    for predictor, extra in (("gate", {}), ("table", {"prefetch_experts": 4}),
                             ("combined", {"prefetch_layers": 2, "prefetch_threads": 2})):
        engine = edgemoe.load(conv, memory=memory, cache_policy=policy, predictor=predictor, **extra)
        try:
            with deadline(60):
                tokens, stats = run(engine)
        finally:
            engine.close()
        assert tokens == tiny.ref, predictor
        s = stats[0]
        assert s["prefetch"] and s["predictor"] == predictor
        assert s["cache_peak_bytes"] <= s["cache_bytes"]
        if memory is not None:
            assert s["budget_used_bytes"] <= memory
        seen[predictor] = s
    engine = edgemoe.load(conv, memory=memory, cache_policy=policy, prefetch=False)
    try:
        tokens, stats = run(engine)
    finally:
        engine.close()
    assert tokens == tiny.ref and stats[0]["prefetch"] is False
    assert sum(s["prefetch_reads"] for s in seen.values()) > 0  # preloading really read experts
    if budget == "unlimited":  # nothing is ever evicted, so every prefetched expert is a later hit
        assert all(s["hits"] >= stats[0]["hits"] for s in seen.values())


def test_bundled_model_same_tokens_with_and_without_prefetch(tmp_path):
    from edgemoe.store.convert import convert

    conv = tmp_path / "conv"
    convert(assets.MODEL_DIR, conv)
    ref = edgemoe.load(assets.MODEL_DIR)
    prompt = "def fibonacci(n):"
    want = ref.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    ref.close()
    info = edgemoe.load(conv).info
    expert_bytes, fixed = info["expert_bytes"], info["min_budget_bytes"] - info["min_cache_bytes"]
    runs = {"off": dict(prefetch=False), "gate": dict(predictor="gate"),
            "gate-throttled": dict(predictor="gate", read_throttle="200MB/s", prefetch_layers=2, prefetch_threads=2)}
    for name, kw in runs.items():
        engine = edgemoe.load(conv, memory=fixed + expert_bytes // 4, **kw)
        try:
            with deadline(120):
                r = engine.generate(prompt, max_tokens=12, ignore_eos=True)
        finally:
            engine.close()
        assert r.token_ids == want, name
        s = r.stats.extra
        if name == "gate":
            assert s["prefetch_hits"] > 0 and 0 < s["decode_predictor_recall"] <= 1
        elif name != "off":  # paced: it read ahead, or knew the link could not deliver in time
            assert s["prefetch_reads"] + s["prefetch_no_window"] > 0
    assert s["read_throttle_bps"] == 200_000_000 and s["throttle_wait_s"] > 0


# ----------------------------------------------------------------------------- protection


def new_cache(conv, capacity: int, policy: str = "lru") -> ExpertCache:
    store = ExpertStore(conv)
    a = store.args
    return ExpertCache(store, capacity, make_policy(policy, PolicyContext(a.moe_layers(), a.experts_per_layer, a.top_k)),
                       a.hidden_act, torch.float32)


def use(cache, key):
    entry, hit = cache.acquire(key)
    cache.release(entry)
    return hit


def wait_until_loading(cache, key, limit_s: float = 10) -> None:
    """Wait (up to limit_s) for the background loader to start on `key`."""
    t0 = time.monotonic()
    while cache.state(key) is None and time.monotonic() - t0 < limit_s:
        time.sleep(0.001)


def test_background_loads_never_evict_guarded_or_pinned_experts(tiny):
    size = next(iter(ExpertStore(tiny.conv).entries.values())).length
    cache = new_cache(tiny.conv, 3 * size)
    keys = sorted(cache._store.entries)
    for k in keys[:3]:
        use(cache, k)
    assert cache.request(keys[0][0], [keys[0]], now=10) == [keys[0]]  # layer request 10 pins what it needs
    assert cache.guard([keys[1], keys[2], (99, 9)], until=11) == [keys[1], keys[2]]
    with pytest.raises(CacheFull):
        cache.load(keys[3])  # a prefetch: everything is pinned or guarded for the next layer
    assert all(k in cache for k in keys[:3])
    assert cache.submit(keys[3], PREFETCH).exception(timeout=10).__class__ is CacheFull
    # A demand load takes a guarded expert when nothing else can go, never a pinned one.
    assert use(cache, keys[3]) is False
    assert keys[0] in cache and sum(k in cache for k in keys[1:3]) == 1
    cache.request(keys[1][0], [], now=11)  # the guarded layer's turn came: guards lapse
    cache.unpin([keys[0]])
    assert cache.load(keys[4]) is True
    cache.close()


def test_stale_prefetches_are_cancelled_and_aborted(tiny):
    """A loader too slow to keep up: prefetches still queued when their layer comes are
    cancelled, one still reading and not needed is aborted, and tokens do not change."""
    engine = edgemoe.load(tiny.conv, memory=tiny.resident + 4 * tiny.cache_min, prefetch_experts=6,
                          prefetch_layers=2, read_throttle="2MB/s", prefetch_pacing=False, prefetch_threshold=0)
    try:
        with deadline(120):
            tokens, stats = run(engine, PROMPTS[:1], 4)
    finally:
        engine.close()
    assert tokens == tiny.ref[:1] or tokens[0] == tiny.ref[0][:4]
    s = stats[0]
    assert s["prefetch_cancelled"] > 0
    assert s["prefetch_aborted"] + s["prefetch_cancelled"] > s["prefetch_hits"]
    assert s["prefetch_wasted_bytes"] <= s["prefetch_bytes"]


def test_demand_waits_for_a_late_prefetch_and_promotes_it(tiny):
    """A throttled background read of an expert the compute thread needs now: the demand
    waits for it (no second read) and the read moves ahead of other background reads."""
    cache = new_cache(tiny.conv, 10 ** 7)
    cache._store.throttle = TokenBucket(parse_rate("2MB/s"))
    key = sorted(cache._store.entries)[0]
    fut = cache.submit(key, PREFETCH)
    wait_until_loading(cache, key)
    with deadline(30):
        entry, hit = cache.acquire(key)
    cache.release(entry)
    assert hit and cache.stats()["waits"] == 1 and cache._store.reads == 1
    assert cache._entries[key].urgent is True
    assert fut.result(timeout=10) is True
    cache.close()


def test_unwanted_prefetch_is_aborted_mid_read(tiny):
    """Aborting a background read in progress stops it at the next chunk: the request ends
    in ReadAborted, the room it had taken is given back, and the partial bytes are counted."""
    cache = new_cache(tiny.conv, 10 ** 7)
    cache._store.throttle = TokenBucket(parse_rate("128KB/s"))  # 0.5 s per chunk
    key = sorted(cache._store.entries)[0]
    assert cache._store.entries[key].length > CHUNK
    fut = cache.submit(key, PREFETCH)
    wait_until_loading(cache, key)
    time.sleep(0.05)
    assert fut.running()
    assert fut.abort() is False  # too late to cancel: it is reading
    with deadline(30):
        err = fut.exception(timeout=20)
    assert isinstance(err, ReadAborted) and err.bytes_read < cache._store.entries[key].length
    assert key not in cache and cache.used == 0
    assert cache.submit(key, DEMAND).result(timeout=30) is True  # a demand load reads it in full
    cache.close()


# ----------------------------------------------------------------------------- errors


def _fail_in_loader(real):
    def preadv(fd, bufs, offset):
        if threading.current_thread().name.startswith("edgemoe-loader"):
            raise OSError(5, "Input/output error")
        return real(fd, bufs, offset)

    return preadv


def test_failing_read_in_the_loader_raises_in_the_caller(tiny, monkeypatch):
    engine = edgemoe.load(tiny.conv, memory=tiny.resident + 3 * tiny.cache_min)
    monkeypatch.setattr(os, "preadv", _fail_in_loader(os.preadv))
    try:
        with deadline(60):
            with pytest.raises(StoreError, match=r"layer \d+ expert \d+: read failed .*Input/output error"):
                run(engine, PROMPTS[:1])
        monkeypatch.undo()
        with deadline(60):
            tokens, _ = run(engine)  # and it recovers
        assert tokens == tiny.ref
    finally:
        engine.close()


def test_aborted_and_throttled_reads(tiny):
    store = ExpertStore(tiny.conv, throttle=parse_rate("4MB/s"))
    entry = next(iter(store.entries.values()))
    buf = memoryview(bytearray(entry.length + 4096))
    with pytest.raises(ReadAborted) as err:
        store.read_into(entry, buf, urgent=False, abort=lambda: True)
    assert err.value.bytes_read == 0
    t0 = time.perf_counter()
    store.read_into(entry, buf)  # the bucket starts with one chunk in it
    dt = time.perf_counter() - t0
    assert dt >= 0.9 * max(entry.length - CHUNK, 0) / 4e6
    store.close()


# ----------------------------------------------------------------------------- throttle


def test_parse_rate():
    assert parse_rate("90MB/s") == 90_000_000
    assert parse_rate("550 MB/s") == 550_000_000
    assert parse_rate("1.5GB/s") == 1_500_000_000
    assert parse_rate("64MiB/s") == 64 * 1024**2
    assert parse_rate("1000000") == 1_000_000
    for bad in ("fast", "90MB/h", "-1MB/s", "1"):
        with pytest.raises(EdgeMoEError):
            parse_rate(bad)


def test_token_bucket_rate_and_priority():
    rate = 4_000_000
    b = TokenBucket(rate)
    t0 = time.monotonic()
    for _ in range(10):
        b.take(CHUNK)
    dt = time.monotonic() - t0
    assert 0.9 * 10 * CHUNK / rate <= dt <= 10 * CHUNK / rate + 0.5  # no burst: every chunk waits

    order = []
    b = TokenBucket(1_000_000)

    def taker(name, urgent, delay):
        time.sleep(delay)
        b.take(CHUNK, urgent)
        order.append(name)

    # The device is busy with "first" for 65 ms; a background chunk that arrives meanwhile
    # waits for it to be free, and a demand chunk that arrives later still goes before it.
    threads = [threading.Thread(target=taker, args=("first", True, 0.0)),
               threading.Thread(target=taker, args=("background", False, 0.005)),
               threading.Thread(target=taker, args=("demand", True, 0.02))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert order == ["first", "demand", "background"]


# ----------------------------------------------------------------------------- command line


def test_trace_fit_and_generate_commands(tiny, tmp_path, capsys):
    from edgemoe.cli import main

    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    conv = tmp_path / "conv"
    import shutil

    shutil.copytree(tiny.conv, conv)
    assert main(["trace", str(tiny.hf), "--text", str(text), "-o", str(tmp_path / "t.npz"), "--window", "32",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] > 100 and summary["lookahead_depth"] == 2
    assert main(["trace", str(conv), "--text", str(text), "-o", str(tmp_path / "h.npz"), "--window", "16",
                 "--max-tokens", "200"]) == 0
    capsys.readouterr()
    assert main(["fit-predictor", str(conv), "--trace", str(tmp_path / "t.npz"), "--eval", str(tmp_path / "h.npz"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (conv / PREDICTOR_FILE).exists() and report["held_out"]
    assert set(report["results"]) >= {"freq@1", "table@1", "gate@1", "combined@1"}
    assert PredictorStats.load(conv / PREDICTOR_FILE).max_distance == 2

    base = ["generate", str(conv), "-p", "def add(a, b):", "-n", "6", "--ignore-eos",
            "--memory", str(tiny.resident + 3 * tiny.cache_min)]
    args = base + ["--json"]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)["stats"]
    for key in ("prefetch", "predictor", "prefetch_hits", "prefetch_wasted_bytes", "stall_s_per_token",
                "decode_stall_s_per_token", "predictor_recall", "predictor_precision", "decode_predictor_recall",
                "prefetch_layers", "prefetch_experts"):
        assert key in s, key
    assert s["prefetch"] is True and s["predictor"] == "combined" and s["prefetch_experts"] == 3
    assert main(args + ["--no-prefetch", "--read-throttle", "50MB/s"]) == 0
    s = json.loads(capsys.readouterr().out)["stats"]
    assert s["prefetch"] is False and s["read_throttle_bps"] == 50_000_000
    assert main(base + ["--predictor", "gate", "--prefetch-experts", "2", "--prefetch-layers", "2"]) == 0
    assert "prefetch: gate predictor, 2 experts x 2 layer(s) ahead" in capsys.readouterr().err
    for bad, needle in ((["--read-throttle", "fast"], "cannot parse read rate"),
                        (["--prefetch-experts", "0"], "at least 1")):
        assert main(args + bad) == 1
        assert needle in capsys.readouterr().err
    os.remove(conv / PREDICTOR_FILE)
    assert main(args + ["--predictor", "table"]) == 1
    assert "edgemoe fit-predictor" in capsys.readouterr().err
